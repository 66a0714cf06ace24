//! Retention-priority eviction (TensorRT-LLM style).

use std::collections::TryReserveError;
use std::sync::Arc;

use super::heap::IndexedHeap;
use super::{InactiveEntry, InactivePool};
use crate::ids::BlockId;
use crate::retention::{Clock, NO_EXPIRY, Retention};

/// Bits of the heap key below the priority: the recency stamp.
const STAMP_BITS: u32 = 56;

fn key(priority: u8, stamp: u64) -> u64 {
    (u64::from(priority) << STAMP_BITS) | stamp
}

/// Priority eviction: the victim is the block of lowest [`Retention`] priority, least
/// recently used among equals. A priority registered with a duration holds for that long
/// after the block enters the pool, then falls back to [`Retention::DEFAULT_PRIORITY`] (time
/// read from the manager's [`Clock`]).
///
/// O(log n) per operation (two indexed heaps: by priority and recency, by expiry), no
/// allocation after construction.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use kvbm_logical::policy::{InactiveEntry, InactivePool, PriorityPool};
/// use kvbm_logical::{BlockId, ManualClock, Retention, SequenceHash};
/// let clock = Arc::new(ManualClock::default());
/// let mut pool = PriorityPool::new(4, clock.clone());
/// let entry = |id: u32, r: Retention| {
///     InactiveEntry::new(BlockId::new(id), SequenceHash::new(id.into()), None).with_retention(r)
/// };
/// pool.insert(entry(0, Retention::new(90)?.expiring_after(Duration::from_secs(60))));
/// pool.insert(entry(1, Retention::new(50)?));
/// pool.insert(entry(2, Retention::new(10)?));
/// assert_eq!(pool.pop_victim(), Some(BlockId::new(2))); // lowest priority
/// clock.advance(Duration::from_secs(60)); // block 0 falls back to 35 < 50
/// assert_eq!(pool.pop_victim(), Some(BlockId::new(0)));
/// # Ok::<(), kvbm_logical::InvalidPriority>(())
/// ```
#[derive(Debug)]
pub struct PriorityPool {
    by_priority: IndexedHeap,
    by_expiry: IndexedHeap,
    /// Current priority and recency stamp per id.
    nodes: Box<[(u8, u64)]>,
    clock: Arc<dyn Clock>,
    next_stamp: u64,
}

impl PriorityPool {
    /// A pool for block ids `0..capacity`, reading expiry time from `clock`.
    ///
    /// # Panics
    /// If the tables cannot be allocated; see [`try_new`](Self::try_new).
    pub fn new(capacity: usize, clock: Arc<dyn Clock>) -> Self {
        match Self::try_new(capacity, clock) {
            Ok(pool) => pool,
            Err(e) => panic!("cannot allocate a priority pool for {capacity} blocks: {e}"),
        }
    }

    /// [`new`](Self::new), reporting an allocation failure.
    pub fn try_new(capacity: usize, clock: Arc<dyn Clock>) -> Result<Self, TryReserveError> {
        let mut nodes = Vec::new();
        nodes.try_reserve_exact(capacity)?;
        nodes.resize(capacity, (0, 0));
        Ok(Self {
            by_priority: IndexedHeap::try_new(capacity)?,
            by_expiry: IndexedHeap::try_new(capacity)?,
            nodes: nodes.into_boxed_slice(),
            clock,
            next_stamp: 0,
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.clock.now().as_millis()).unwrap_or(u64::MAX)
    }

    /// Priorities whose time is up fall back to the default.
    fn expire(&mut self) {
        let Some((_, first)) = self.by_expiry.peek() else {
            return;
        };
        let now = self.now_ms();
        if first > now {
            return;
        }
        while let Some((id, deadline)) = self.by_expiry.peek() {
            if deadline > now {
                break;
            }
            self.by_expiry.pop();
            let node = &mut self.nodes[id as usize];
            node.0 = Retention::DEFAULT_PRIORITY;
            self.by_priority.update(id, key(node.0, node.1));
        }
    }
}

impl InactivePool for PriorityPool {
    fn name(&self) -> &'static str {
        "priority"
    }

    fn insert(&mut self, entry: InactiveEntry) {
        let id = entry.id.get();
        self.next_stamp += 1;
        let priority = entry.retention.priority();
        self.nodes[id as usize] = (priority, self.next_stamp);
        self.by_priority.push(id, key(priority, self.next_stamp));
        let duration = entry.retention.duration_ms();
        if duration != NO_EXPIRY && priority != Retention::DEFAULT_PRIORITY {
            let deadline = self.now_ms().saturating_add(duration.into());
            self.by_expiry.push(id, deadline);
        }
    }

    fn remove(&mut self, id: BlockId) -> bool {
        self.by_expiry.remove(id.get());
        self.by_priority.remove(id.get())
    }

    fn pop_victim(&mut self) -> Option<BlockId> {
        self.expire();
        let id = self.by_priority.pop()?;
        self.by_expiry.remove(id);
        Some(BlockId::new(id))
    }

    fn touch(&mut self, id: BlockId) -> bool {
        if !self.by_priority.contains(id.get()) {
            return false;
        }
        self.next_stamp += 1;
        let node = &mut self.nodes[id.index()];
        node.1 = self.next_stamp;
        self.by_priority.update(id.get(), key(node.0, node.1))
    }

    fn len(&self) -> usize {
        self.by_priority.len()
    }

    fn contains(&self, id: BlockId) -> bool {
        self.by_priority.contains(id.get())
    }

    fn check_invariants(&self) -> Result<(), String> {
        self.by_priority.check()?;
        self.by_expiry.check()?;
        for id in 0..self.nodes.len() as u32 {
            if self.by_expiry.contains(id) && !self.by_priority.contains(id) {
                return Err(format!(
                    "priority: {id} has an expiry but is not in the pool"
                ));
            }
        }
        Ok(())
    }
}
