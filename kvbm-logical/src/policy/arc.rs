//! Adaptive replacement (ARC, Megiddo & Modha, FAST'03).

use std::collections::TryReserveError;

use super::ghost::Ghosts;
use super::heap::table;
use super::linked::LinkedSlab;
use super::{InactiveEntry, InactivePool};
use crate::hashing::SequenceHash;
use crate::ids::BlockId;

/// Blocks used once since they entered the cache (ARC's T1), and their ghosts (B1).
const RECENT: u8 = 0;
/// Blocks used at least twice (T2), and their ghosts (B2).
const FREQUENT: u8 = 1;

/// Adaptive replacement cache order: the pool is split into blocks used once (`T1`) and
/// blocks used again since they were cached (`T2`), each in recency order, and the hashes of
/// blocks recently evicted from either (ghost lists `B1` and `B2`, up to `capacity` hashes in
/// all). A block whose hash is found in a ghost list comes back into `T2` and moves the target
/// size `p` of `T1`: up (by `max(1, |B2| / |B1|)`) for a `B1` ghost, down (by
/// `max(1, |B1| / |B2|)`) for a `B2` ghost. The victim is the least recently used block of
/// `T1` when `T1` holds more than `p` blocks (or `T2` is empty), else of `T2`.
///
/// Mapped onto an inactive pool: a block that leaves the pool without being evicted (matched,
/// upgraded) is still cached, so when it comes back with the same hash that is a hit and it
/// enters `T2`; [`touch`](InactivePool::touch) is a hit too. Ghosts are trimmed when a victim
/// is added: `|T1| + |B1|` stays at most `capacity`, and all ghosts together fit in
/// `capacity` hashes. vLLM's CPU offload tier evicts by ARC.
///
/// O(1) per operation; no allocation after construction (the ghost table is reserved for
/// twice its content).
///
/// ```
/// use kvbm_logical::policy::{ArcPool, InactiveEntry, InactivePool};
/// use kvbm_logical::{BlockId, SequenceHash};
/// let entry = |id: u32, h: u64| InactiveEntry::new(BlockId::new(id), SequenceHash::new(h), None);
/// let mut arc = ArcPool::new(4);
/// arc.insert(entry(0, 10));
/// arc.insert(entry(1, 11));
/// assert!(arc.touch(BlockId::new(0))); // used again: block 0 moves to T2
/// assert_eq!(arc.pop_victim(), Some(BlockId::new(1))); // T1's oldest; its hash becomes a ghost
/// arc.insert(entry(1, 11)); // back soon: a ghost hit, straight into T2
/// assert_eq!(arc.target_recent(), 1);
/// assert_eq!(arc.pop_victim(), Some(BlockId::new(0))); // T1 is empty: T2's oldest
/// ```
#[derive(Debug)]
pub struct ArcPool {
    /// `T1` and `T2`, oldest first.
    lists: LinkedSlab,
    ghosts: Ghosts,
    /// The hash each slot had when it last entered the pool.
    hashes: Box<[SequenceHash]>,
    /// Set when a slot left the pool without being evicted: it is still cached, so its return
    /// under the same hash is a hit.
    resident: Box<[bool]>,
    /// Target size of `T1`.
    p: usize,
    capacity: usize,
}

impl ArcPool {
    /// A pool for block ids `0..capacity`.
    ///
    /// # Panics
    /// If the tables cannot be allocated; see [`try_new`](Self::try_new).
    pub fn new(capacity: usize) -> Self {
        match Self::try_new(capacity) {
            Ok(pool) => pool,
            Err(e) => panic!("cannot allocate an ARC pool for {capacity} blocks: {e}"),
        }
    }

    /// A pool for block ids `0..capacity`, reporting an allocation failure.
    pub fn try_new(capacity: usize) -> Result<Self, TryReserveError> {
        Ok(Self {
            lists: LinkedSlab::try_new(capacity, 2)?,
            ghosts: Ghosts::try_new(capacity, 2)?,
            hashes: table(capacity, SequenceHash::new(0))?,
            resident: table(capacity, false)?,
            p: 0,
            capacity,
        })
    }

    /// ARC's adaptive target `p` for the once-used list `T1`, in blocks (0 to capacity).
    pub fn target_recent(&self) -> usize {
        self.p
    }
}

impl InactivePool for ArcPool {
    fn name(&self) -> &'static str {
        "arc"
    }

    fn insert(&mut self, entry: InactiveEntry) {
        let (id, hash) = (entry.id.get(), entry.hash);
        let i = entry.id.index();
        let hit = std::mem::replace(&mut self.resident[i], false) && self.hashes[i] == hash;
        self.hashes[i] = hash;
        let list = if hit {
            FREQUENT
        } else {
            match self.ghosts.remove(hash) {
                Some(RECENT) => {
                    let (b1, b2) = (self.ghosts.len(RECENT) + 1, self.ghosts.len(FREQUENT));
                    self.p = (self.p + (b2 / b1).max(1)).min(self.capacity);
                    FREQUENT
                }
                Some(_) => {
                    let (b1, b2) = (self.ghosts.len(RECENT), self.ghosts.len(FREQUENT) + 1);
                    self.p = self.p.saturating_sub((b1 / b2).max(1));
                    FREQUENT
                }
                None => RECENT,
            }
        };
        self.lists.push_back(list, id);
    }

    fn remove(&mut self, id: BlockId) -> bool {
        let found = self.lists.unlink(id.get()).is_some();
        if found {
            self.resident[id.index()] = true;
        }
        found
    }

    fn pop_victim(&mut self) -> Option<BlockId> {
        let (t1, t2) = (self.lists.len(RECENT), self.lists.len(FREQUENT));
        let list = if t1 > 0 && (t1 > self.p || t2 == 0) {
            RECENT
        } else {
            FREQUENT
        };
        let id = self.lists.pop_front(list)?;
        // Keep |T1| + |B1| within the capacity; the ghost table bounds the rest.
        if list == RECENT && self.lists.len(RECENT) + self.ghosts.len(RECENT) >= self.capacity {
            self.ghosts.pop_front(RECENT);
        }
        self.ghosts.push_back(list, self.hashes[id as usize]);
        Some(BlockId::new(id))
    }

    fn touch(&mut self, id: BlockId) -> bool {
        if self.lists.unlink(id.get()).is_none() {
            return false;
        }
        self.lists.push_back(FREQUENT, id.get());
        true
    }

    fn len(&self) -> usize {
        self.lists.len(RECENT) + self.lists.len(FREQUENT)
    }

    fn contains(&self, id: BlockId) -> bool {
        self.lists.list_of(id.get()).is_some()
    }

    fn check_invariants(&self) -> Result<(), String> {
        self.lists.check()?;
        self.ghosts.check()?;
        if self.p > self.capacity {
            return Err(format!(
                "arc: p {} above capacity {}",
                self.p, self.capacity
            ));
        }
        if let Some(id) = (0..self.capacity as u32)
            .find(|&id| self.resident[id as usize] && self.lists.list_of(id).is_some())
        {
            return Err(format!("arc: {id} is both in the pool and out of it"));
        }
        Ok(())
    }
}
