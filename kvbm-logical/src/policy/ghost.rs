//! Ghost lists: the hashes of recently evicted blocks, without their blocks.
//!
//! ARC and S3-FIFO remember what they evicted so that a block that comes back soon can be
//! recognised and treated as frequently used. A ghost is a hash in one of a few FIFO lists
//! threaded through a preallocated node table, found by hash through a table reserved for
//! twice its largest content (so hashbrown reclaims deleted slots in place and never grows).
//! No allocation after construction.

use std::collections::{HashMap, TryReserveError};

use super::linked::LinkedSlab;
use crate::hashing::SequenceHash;

type Map = HashMap<SequenceHash, u32, foldhash::fast::RandomState>;

/// Up to `capacity` ghost hashes in `lists` FIFO lists.
#[derive(Debug)]
pub(crate) struct Ghosts {
    lists: LinkedSlab,
    hashes: Box<[SequenceHash]>,
    free: Vec<u32>,
    map: Map,
}

impl Ghosts {
    pub(crate) fn try_new(capacity: usize, lists: usize) -> Result<Self, TryReserveError> {
        let capacity = capacity.min(u32::MAX as usize - 1);
        let mut hashes = Vec::new();
        hashes.try_reserve_exact(capacity)?;
        hashes.resize(capacity, SequenceHash::new(0));
        let mut free = Vec::new();
        free.try_reserve_exact(capacity)?;
        free.extend((0..capacity as u32).rev());
        let mut map = Map::default();
        map.try_reserve(capacity.saturating_mul(2))?;
        Ok(Self {
            lists: LinkedSlab::try_new(capacity, lists)?,
            hashes: hashes.into_boxed_slice(),
            free,
            map,
        })
    }

    /// Ghosts the table can hold.
    pub(crate) fn capacity(&self) -> usize {
        self.hashes.len()
    }

    /// Ghosts in `list`.
    pub(crate) fn len(&self, list: u8) -> usize {
        self.lists.len(list)
    }

    /// Ghosts in all lists.
    #[cfg(test)]
    pub(crate) fn total(&self) -> usize {
        self.map.len()
    }

    /// Removes the ghost of `hash`; returns the list it was in.
    pub(crate) fn remove(&mut self, hash: SequenceHash) -> Option<u8> {
        let node = self.map.remove(&hash)?;
        let list = self.lists.unlink(node);
        self.free.push(node);
        list
    }

    /// Forgets the oldest ghost of `list`; whether there was one.
    pub(crate) fn pop_front(&mut self, list: u8) -> bool {
        match self.lists.pop_front(list) {
            Some(node) => {
                self.map.remove(&self.hashes[node as usize]);
                self.free.push(node);
                true
            }
            None => false,
        }
    }

    /// Appends `hash` as the newest ghost of `list` (replacing any ghost of the same hash).
    /// When the table is full, the oldest ghost of `list` (or of the first non-empty list)
    /// makes room. With capacity 0, nothing is remembered.
    pub(crate) fn push_back(&mut self, list: u8, hash: SequenceHash) {
        self.remove(hash);
        if self.free.is_empty() {
            let lists = self.lists_count();
            if !self.pop_front(list) {
                for other in 0..lists {
                    if self.pop_front(other) {
                        break;
                    }
                }
            }
        }
        let Some(node) = self.free.pop() else {
            return; // capacity 0
        };
        self.hashes[node as usize] = hash;
        self.lists.push_back(list, node);
        self.map.insert(hash, node);
    }

    fn lists_count(&self) -> u8 {
        self.lists.lists() as u8
    }

    /// Checks lists, the map and the free stack agree (O(capacity)).
    pub(crate) fn check(&self) -> Result<(), String> {
        self.lists.check()?;
        let linked: usize = (0..self.lists_count()).map(|l| self.lists.len(l)).sum();
        if linked != self.map.len() || linked + self.free.len() != self.capacity() {
            return Err(format!(
                "ghosts: {linked} linked, {} mapped, {} free of {}",
                self.map.len(),
                self.free.len(),
                self.capacity()
            ));
        }
        for (hash, &node) in &self.map {
            if self.hashes[node as usize] != *hash || self.lists.list_of(node).is_none() {
                return Err(format!("ghosts: {hash} maps to a stale node {node}"));
            }
        }
        Ok(())
    }

    /// Hashes of `list`, oldest first (tests).
    #[cfg(test)]
    pub(crate) fn iter(&self, list: u8) -> impl Iterator<Item = SequenceHash> + '_ {
        self.lists.iter(list).map(|n| self.hashes[n as usize])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_per_list_bounded_by_capacity() {
        let h = SequenceHash::new;
        let mut g = Ghosts::try_new(3, 2).unwrap();
        g.push_back(0, h(1));
        g.push_back(1, h(2));
        g.push_back(0, h(3));
        g.check().unwrap();
        // Full: the oldest of list 0 (1) makes room.
        g.push_back(0, h(4));
        assert_eq!(g.iter(0).collect::<Vec<_>>(), vec![h(3), h(4)]);
        assert_eq!(g.remove(h(1)), None);
        // Re-pushing a hash moves it.
        g.push_back(1, h(3));
        assert_eq!(g.iter(0).collect::<Vec<_>>(), vec![h(4)]);
        assert_eq!(g.iter(1).collect::<Vec<_>>(), vec![h(2), h(3)]);
        // Full: pushing to list 1 drops list 1's oldest (2).
        g.push_back(1, h(5));
        assert_eq!(g.iter(0).collect::<Vec<_>>(), vec![h(4)]);
        assert_eq!(g.iter(1).collect::<Vec<_>>(), vec![h(3), h(5)]);
        // Full, and the target list is empty: another list's oldest goes.
        assert_eq!(g.remove(h(3)), Some(1));
        assert_eq!(g.remove(h(5)), Some(1));
        g.push_back(0, h(6));
        g.push_back(0, h(7));
        g.push_back(1, h(8));
        assert_eq!(g.iter(0).collect::<Vec<_>>(), vec![h(6), h(7)]);
        assert_eq!(g.iter(1).collect::<Vec<_>>(), vec![h(8)]);
        g.remove(h(8));
        g.push_back(0, h(9));
        g.push_back(1, h(10));
        assert_eq!(g.iter(0).collect::<Vec<_>>(), vec![h(7), h(9)]);
        assert_eq!(g.iter(1).collect::<Vec<_>>(), vec![h(10)]);
        g.check().unwrap();
        let mut none = Ghosts::try_new(0, 1).unwrap();
        none.push_back(0, h(1));
        assert_eq!(none.total(), 0);
        none.check().unwrap();
    }
}
