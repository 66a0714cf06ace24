//! Single-list policies: least recently used and first in, first out.
//!
//! Both keep the pool in one index-linked list, oldest first, and evict from its front; they
//! differ only in whether a touch moves a block to the back.

use std::collections::TryReserveError;

use super::linked::LinkedSlab;
use super::{InactiveEntry, InactivePool};
use crate::ids::BlockId;

const LIST: u8 = 0;

/// An inactive pool kept as one list in entry order; `RECENCY` says whether a touch moves the
/// block to the most recent end. Use it through [`LruPool`] and [`FifoPool`].
/// Every operation is O(1) and allocation-free.
#[derive(Debug)]
pub struct ListPool<const RECENCY: bool> {
    list: LinkedSlab,
}

/// Least-recently-used eviction: the victim is the block that entered the pool (or was
/// touched) longest ago.
///
/// See [`InactivePool`] for an example.
pub type LruPool = ListPool<true>;

/// First-in-first-out eviction: the victim is the block that entered the pool longest ago;
/// touches do not reorder.
///
/// ```
/// use kvbm_logical::policy::{FifoPool, InactiveEntry, InactivePool};
/// use kvbm_logical::{BlockId, SequenceHash};
/// let mut fifo = FifoPool::new(4);
/// for i in 0..3 {
///     fifo.insert(InactiveEntry::new(BlockId::new(i), SequenceHash::new(i.into()), None));
/// }
/// assert!(fifo.touch(BlockId::new(0))); // recorded, but FIFO ignores recency
/// assert_eq!(fifo.pop_victim(), Some(BlockId::new(0)));
/// ```
pub type FifoPool = ListPool<false>;

impl<const RECENCY: bool> ListPool<RECENCY> {
    /// A pool for block ids `0..capacity`.
    ///
    /// # Panics
    /// If the table cannot be allocated, like `Vec::with_capacity`; see
    /// [`try_new`](Self::try_new).
    pub fn new(capacity: usize) -> Self {
        Self {
            list: LinkedSlab::new(capacity, 1),
        }
    }

    /// A pool for block ids `0..capacity`, reporting an allocation failure.
    pub fn try_new(capacity: usize) -> Result<Self, TryReserveError> {
        Ok(Self {
            list: LinkedSlab::try_new(capacity, 1)?,
        })
    }
}

impl<const RECENCY: bool> InactivePool for ListPool<RECENCY> {
    fn name(&self) -> &'static str {
        if RECENCY { "lru" } else { "fifo" }
    }

    fn insert(&mut self, entry: InactiveEntry) {
        self.list.push_back(LIST, entry.id.get());
    }

    fn remove(&mut self, id: BlockId) -> bool {
        self.list.unlink(id.get()).is_some()
    }

    fn pop_victim(&mut self) -> Option<BlockId> {
        self.list.pop_front(LIST).map(BlockId::new)
    }

    fn requeues_in_place(&self) -> bool {
        true
    }

    fn requeue(&mut self, entry: InactiveEntry) {
        // Removal and insertion at the back, in one move.
        if !self.list.move_to_back(entry.id.get()) {
            self.insert(entry);
        }
    }

    fn touch(&mut self, id: BlockId) -> bool {
        if RECENCY {
            self.list.move_to_back(id.get())
        } else {
            self.contains(id)
        }
    }

    fn len(&self) -> usize {
        self.list.len(LIST)
    }

    fn contains(&self, id: BlockId) -> bool {
        self.list.list_of(id.get()).is_some()
    }

    fn check_invariants(&self) -> Result<(), String> {
        self.list.check()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SequenceHash;
    use proptest::prelude::*;

    fn entry(id: u32) -> InactiveEntry {
        InactiveEntry::new(BlockId::new(id), SequenceHash::new(u64::from(id)), None)
    }

    #[derive(Clone, Debug)]
    enum Op {
        Insert(u32),
        Remove(u32),
        Pop,
        Touch(u32),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0..16u32).prop_map(Op::Insert),
            1 => (0..16u32).prop_map(Op::Remove),
            2 => Just(Op::Pop),
            2 => (0..16u32).prop_map(Op::Touch),
        ]
    }

    proptest! {
        /// The victim order equals that of a plain Vec kept in recency order.
        #[test]
        fn matches_a_vec_reference(ops in proptest::collection::vec(op(), 0..200)) {
            let mut lru = LruPool::new(16);
            let mut model: Vec<u32> = Vec::new(); // front = least recent
            for op in ops {
                match op {
                    Op::Insert(id) => {
                        if !model.contains(&id) {
                            lru.insert(entry(id));
                            model.push(id);
                        }
                    }
                    Op::Remove(id) => {
                        let pos = model.iter().position(|&m| m == id);
                        prop_assert_eq!(lru.remove(BlockId::new(id)), pos.is_some());
                        if let Some(p) = pos { model.remove(p); }
                    }
                    Op::Pop => {
                        let expect = (!model.is_empty()).then(|| model.remove(0));
                        prop_assert_eq!(lru.pop_victim().map(BlockId::get), expect);
                    }
                    Op::Touch(id) => {
                        let pos = model.iter().position(|&m| m == id);
                        prop_assert_eq!(lru.touch(BlockId::new(id)), pos.is_some());
                        if let Some(p) = pos { let m = model.remove(p); model.push(m); }
                    }
                }
                prop_assert_eq!(lru.len(), model.len());
                for id in 0..16 {
                    prop_assert_eq!(lru.contains(BlockId::new(id)), model.contains(&id));
                }
                prop_assert!(lru.check_invariants().is_ok());
            }
        }
    }
}
