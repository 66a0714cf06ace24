//! Retention-priority eviction (TensorRT-LLM style).

use std::collections::TryReserveError;
use std::sync::Arc;

use super::heap::IndexedHeap;
use super::linked::LinkedSlab;
use super::{InactiveEntry, InactivePool};
use crate::ids::BlockId;
use crate::retention::{Clock, NO_EXPIRY, Retention};

const LEVELS: usize = Retention::MAX_PRIORITY as usize + 1;
const DEFAULT: u8 = Retention::DEFAULT_PRIORITY;

/// Priority eviction: the victim is the block of lowest [`Retention`] priority, least
/// recently used among equals. A priority registered with a duration holds for that long
/// after the block enters the pool, then falls back to [`Retention::DEFAULT_PRIORITY`] (time
/// read from the manager's [`Clock`]).
///
/// O(1) per operation for blocks without an expiry: one recency list per priority level
/// (101 of them) and a bitmap of the non-empty levels, so the victim is the front of the
/// lowest non-empty list. Blocks registered with a duration also sit in a heap by deadline
/// (O(log n)); an expired block moves to a heap by recency at the default level, so it keeps
/// its place among the default-priority blocks. No allocation after construction.
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
    /// Unexpired members, one list per priority, each in recency order.
    levels: LinkedSlab,
    /// Bit `p` set when level `p` is non-empty.
    nonempty: u128,
    /// Members whose retention expired (effective priority: the default), by recency stamp.
    expired: IndexedHeap,
    /// Members in `levels` with a pending expiry, by deadline (ms).
    by_expiry: IndexedHeap,
    /// Recency stamp per id.
    stamps: Box<[u64]>,
    clock: Arc<dyn Clock>,
    next_stamp: u64,
    len: usize,
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

    /// A pool for block ids `0..capacity`, reporting an allocation failure.
    pub fn try_new(capacity: usize, clock: Arc<dyn Clock>) -> Result<Self, TryReserveError> {
        let mut stamps = Vec::new();
        stamps.try_reserve_exact(capacity)?;
        stamps.resize(capacity, 0);
        Ok(Self {
            levels: LinkedSlab::try_new(capacity, LEVELS)?,
            nonempty: 0,
            expired: IndexedHeap::try_new(capacity)?,
            by_expiry: IndexedHeap::try_new(capacity)?,
            stamps: stamps.into_boxed_slice(),
            clock,
            next_stamp: 0,
            len: 0,
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.clock.now().as_millis()).unwrap_or(u64::MAX)
    }

    fn stamp(&mut self, id: u32) -> u64 {
        self.next_stamp += 1;
        self.stamps[id as usize] = self.next_stamp;
        self.next_stamp
    }

    fn push_level(&mut self, level: u8, id: u32) {
        self.levels.push_back(level, id);
        self.nonempty |= 1 << level;
    }

    /// Out of its level list, if in one; returns the level.
    fn unlink_level(&mut self, id: u32) -> Option<u8> {
        let level = self.levels.unlink(id)?;
        if self.levels.len(level) == 0 {
            self.nonempty &= !(1 << level);
        }
        Some(level)
    }

    /// Moves every member whose deadline has passed to `expired` (the default level).
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
            self.unlink_level(id);
            self.expired.push(id, self.stamps[id as usize]);
        }
    }

    /// The victim without removing it: the lowest non-empty level's oldest member, or the
    /// oldest expired member when the default level is the lowest in play and it is older.
    fn victim(&self) -> Option<u32> {
        let level = (self.nonempty != 0).then(|| self.nonempty.trailing_zeros() as u8);
        let expired = self.expired.peek();
        match (level, expired) {
            (None, None) => None,
            (None, Some((id, _))) => Some(id),
            (Some(level), None) => self.levels.front(level),
            (Some(level), Some((id, stamp))) => {
                let front = self.levels.front(level)?;
                let use_expired =
                    level > DEFAULT || (level == DEFAULT && stamp < self.stamps[front as usize]);
                Some(if use_expired { id } else { front })
            }
        }
    }
}

impl InactivePool for PriorityPool {
    fn name(&self) -> &'static str {
        "priority"
    }

    fn insert(&mut self, entry: InactiveEntry) {
        let id = entry.id.get();
        self.stamp(id);
        let priority = entry.retention.priority();
        self.push_level(priority, id);
        self.len += 1;
        let duration = entry.retention.duration_ms();
        if duration != NO_EXPIRY && priority != DEFAULT {
            let deadline = self.now_ms().saturating_add(duration.into());
            self.by_expiry.push(id, deadline);
        }
    }

    fn remove(&mut self, id: BlockId) -> bool {
        let id = id.get();
        let found = self.unlink_level(id).is_some() || self.expired.remove(id);
        if found {
            self.by_expiry.remove(id);
            self.len -= 1;
        }
        found
    }

    fn pop_victim(&mut self) -> Option<BlockId> {
        self.expire();
        let id = self.victim()?;
        self.remove(BlockId::new(id));
        Some(BlockId::new(id))
    }

    fn touch(&mut self, id: BlockId) -> bool {
        let id = id.get();
        if self.levels.list_of(id).is_some() {
            self.stamp(id);
            self.levels.move_to_back(id);
            true
        } else if self.expired.remove(id) {
            // Expired: its priority is the default now; newest there.
            self.stamp(id);
            self.push_level(DEFAULT, id);
            true
        } else {
            false
        }
    }

    fn len(&self) -> usize {
        self.len
    }

    fn contains(&self, id: BlockId) -> bool {
        self.levels.list_of(id.get()).is_some() || self.expired.contains(id.get())
    }

    fn check_invariants(&self) -> Result<(), String> {
        self.levels.check()?;
        self.expired.check()?;
        self.by_expiry.check()?;
        let mut members = self.expired.len();
        for level in 0..LEVELS as u8 {
            let n = self.levels.len(level);
            members += n;
            if (self.nonempty >> level) & 1 != u128::from(n > 0) {
                return Err(format!("priority: bitmap disagrees on level {level}"));
            }
            let stamps: Vec<u64> = self
                .levels
                .iter(level)
                .map(|id| self.stamps[id as usize])
                .collect();
            if stamps.windows(2).any(|w| w[0] >= w[1]) {
                return Err(format!("priority: level {level} out of recency order"));
            }
        }
        if members != self.len {
            return Err(format!("priority: {members} members, len {}", self.len));
        }
        for id in 0..self.stamps.len() as u32 {
            let listed = self.levels.list_of(id).is_some();
            if listed && self.expired.contains(id) {
                return Err(format!("priority: {id} both listed and expired"));
            }
            if self.by_expiry.contains(id) && !listed {
                return Err(format!("priority: {id} has a deadline but no level"));
            }
        }
        Ok(())
    }
}
