//! First in, first out.

use std::collections::TryReserveError;

use super::linked::LinkedSlab;
use super::{InactiveEntry, InactivePool};
use crate::ids::BlockId;

const LIST: u8 = 0;

/// First-in-first-out eviction: the victim is the block that entered the pool longest ago;
/// touches do not reorder. One index-linked list; O(1), allocation-free.
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
#[derive(Debug)]
pub struct FifoPool {
    list: LinkedSlab,
}

impl FifoPool {
    /// A pool for block ids `0..capacity`.
    ///
    /// # Panics
    /// If the table cannot be allocated; see [`try_new`](Self::try_new).
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

impl InactivePool for FifoPool {
    fn name(&self) -> &'static str {
        "fifo"
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

    fn touch(&mut self, id: BlockId) -> bool {
        self.list.list_of(id.get()).is_some()
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
