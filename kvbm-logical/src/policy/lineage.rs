//! Lineage (leaf-first) eviction.

use std::collections::TryReserveError;

use super::forest::Forest;
use super::heap::IndexedHeap;
use super::linked::NIL;
use super::{InactiveEntry, InactivePool};
use crate::ids::BlockId;

/// Leaf-first eviction: a block is evictable only when no block in the pool names it as
/// its parent, so a cached prefix is never evicted before its tail and prefix chains stay
/// matchable as long as possible. Among leaves, the least recently used goes first.
///
/// Parents are known by hash (from [`CompleteBlock::with_parent`] or
/// [`MutableBlock::stage_token_block`]); a block staged without a parent is a root. If the
/// pool holds blocks but no leaf (only possible with a cycle of parent hashes, which real
/// chained hashes never form), the least recently used block overall is the victim, found
/// by a scan, so `pop_victim` never fails on a non-empty pool.
///
/// O(log n) per operation (an indexed heap of leaves; O(1) for a chain released head first
/// and for eviction walking a chain from its tail, which bypass the heap), expected O(1)
/// hash-index upkeep (one lookup to add a block, one to drop a hash no block has used for a
/// while; a chain's next block finds its parent without one), and no allocation after
/// construction (a fixed index at most 5/8 full, which never grows or rehashes).
///
/// [`CompleteBlock::with_parent`]: crate::CompleteBlock::with_parent
/// [`MutableBlock::stage_token_block`]: crate::MutableBlock::stage_token_block
///
/// ```
/// use kvbm_logical::policy::{InactiveEntry, InactivePool, LineagePool};
/// use kvbm_logical::{BlockId, SequenceHash};
/// let (a, b) = (SequenceHash::new(1), SequenceHash::new(2));
/// let mut pool = LineagePool::new(4);
/// pool.insert(InactiveEntry::new(BlockId::new(0), b, Some(a))); // the tail, released first
/// pool.insert(InactiveEntry::new(BlockId::new(1), a, None)); // its prefix
/// assert_eq!(pool.pop_victim(), Some(BlockId::new(0))); // the tail goes first anyway
/// assert_eq!(pool.pop_victim(), Some(BlockId::new(1)));
/// ```
#[derive(Debug)]
pub struct LineagePool {
    /// Members and leaves (every class 0, no bonus: plain recency among leaves).
    forest: Forest<IndexedHeap>,
}

impl LineagePool {
    /// A pool for block ids `0..capacity`.
    ///
    /// # Panics
    /// If the tables cannot be allocated; see [`try_new`](Self::try_new).
    pub fn new(capacity: usize) -> Self {
        match Self::try_new(capacity) {
            Ok(pool) => pool,
            Err(e) => panic!("cannot allocate a lineage pool for {capacity} blocks: {e}"),
        }
    }

    /// A pool for block ids `0..capacity`, reporting an allocation failure.
    pub fn try_new(capacity: usize) -> Result<Self, TryReserveError> {
        Ok(Self {
            forest: Forest::try_new(capacity, IndexedHeap::try_new(capacity)?)?,
        })
    }

    /// The least recently used leaf: the older of the heap's top and the two slots.
    fn oldest_leaf(&self) -> Option<u32> {
        let f = &self.forest;
        // Stamps start at 1 and count up, so none is `u64::MAX`.
        let (mut id, mut stamp) = f.leaves.peek().unwrap_or((NIL, u64::MAX));
        for slot in [f.next, f.fresh] {
            if slot != NIL {
                let s = f.nodes[slot as usize].stamp;
                if s < stamp {
                    (id, stamp) = (slot, s);
                }
            }
        }
        (id != NIL).then_some(id)
    }
}

impl InactivePool for LineagePool {
    fn name(&self) -> &'static str {
        "lineage"
    }

    fn insert(&mut self, entry: InactiveEntry) {
        self.forest.insert(entry, 0);
    }

    fn remove(&mut self, id: BlockId) -> bool {
        if !self.contains(id) {
            return false;
        }
        self.forest.detach(id.get());
        true
    }

    fn pop_victim(&mut self) -> Option<BlockId> {
        let id = match self.oldest_leaf() {
            Some(id) => id,
            None => self.forest.oldest_member()?,
        };
        self.forest.detach(id);
        Some(BlockId::new(id))
    }

    fn requeues_in_place(&self) -> bool {
        true
    }

    fn requeue(&mut self, entry: InactiveEntry) {
        // The same member, parent and children again: only its stamp changes, as a touch
        // does, unless it shares its hash with other members (its place among them would
        // change) or it was not in the pool.
        if self.forest.is_single(entry.id.get()) {
            self.touch(entry.id);
        } else {
            self.remove(entry.id);
            self.insert(entry);
        }
    }

    fn touch(&mut self, id: BlockId) -> bool {
        if !self.contains(id) {
            return false;
        }
        let stamp = self.forest.stamp();
        let id = id.get();
        self.forest.nodes[id as usize].stamp = stamp;
        if self.forest.in_heap(id) {
            self.forest.leaves.update(id, stamp);
        }
        true
    }

    fn len(&self) -> usize {
        self.forest.len
    }

    fn contains(&self, id: BlockId) -> bool {
        self.forest.contains(id.get())
    }

    fn check_invariants(&self) -> Result<(), String> {
        self.forest.check("lineage")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_index_stays_at_most_five_eighths_full() {
        // Chains cut often, so that parents are absent: the index's worst case, two keys per
        // member, and the emptied ones kept. Its array is fixed; `check_invariants` checks
        // that at most 5/8 is in use.
        for seed in 0..32u64 {
            let mut pool = LineagePool::new(64);
            let (slots, _) = pool.forest.map_size();
            let mut most = 0;
            let mut next = seed << 32 | 1;
            for round in 0..100u64 {
                for i in 0..64u32 {
                    let id = BlockId::new(i);
                    if pool.contains(id) {
                        continue;
                    }
                    let parent =
                        ((next + round) % 3 != 0).then(|| crate::SequenceHash::new(next + 7919));
                    pool.insert(InactiveEntry::new(
                        id,
                        crate::SequenceHash::new(next),
                        parent,
                    ));
                    most = most.max(pool.forest.map_size().1);
                    next += 1;
                }
                for _ in 0..(16 + round % 48) {
                    pool.pop_victim();
                }
                pool.check_invariants().unwrap();
            }
            assert_eq!(pool.forest.map_size().0, slots);
            // The bound is reached: every member's hash and an absent parent's.
            assert!(most > 64 + 32, "only {most} keys at once (seed {seed})");
            assert!(most * 8 <= slots * 5, "{most} keys in {slots} slots");
        }
    }
}
