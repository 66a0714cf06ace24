//! S3-FIFO (Yang et al., SOSP'23): a small FIFO, a main FIFO and a ghost FIFO.

use std::collections::TryReserveError;

use super::ghost::Ghosts;
use super::heap::table;
use super::linked::LinkedSlab;
use super::{InactiveEntry, InactivePool};
use crate::hashing::SequenceHash;
use crate::ids::BlockId;

/// The small (probationary) queue.
const SMALL: u8 = 0;
/// The main queue.
const MAIN: u8 = 1;
/// Access counts saturate here (two bits, as in the paper).
const MAX_FREQ: u8 = 3;

/// Where a slot was when it left the pool without being evicted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Away {
    No,
    Small,
    Main,
}

/// S3-FIFO order: new blocks enter a small FIFO `S`; a block whose hash is a recent ghost
/// enters the main FIFO `M` instead. Each block counts its accesses (0 to 3). Eviction takes
/// from `S` while `S` holds at least a tenth of the pool (or `M` is empty): `S`'s oldest
/// block moves to `M` (count reset) if it was accessed while in `S`, else it is evicted and
/// its hash joins the ghost FIFO `G` (up to `capacity` hashes). From `M`, the oldest block
/// goes back to `M`'s tail with its count lowered by one if the count is positive, else it is
/// evicted. Most one-off blocks thus leave after a short probation, without disturbing `M`.
///
/// Mapped onto an inactive pool: [`touch`](InactivePool::touch) counts an access; a block
/// that leaves the pool without being evicted (matched) and comes back with the same hash
/// counts an access and rejoins the tail of the queue it was in (a pool cannot keep a place
/// in a FIFO for a block that is out of it).
///
/// Amortised O(1) per operation (a block is re-queued at most once per counted access, or
/// once from `S` to `M`); no allocation after construction.
///
/// ```
/// use kvbm_logical::policy::{InactiveEntry, InactivePool, S3FifoPool};
/// use kvbm_logical::{BlockId, SequenceHash};
/// let entry = |id: u32, h: u64| InactiveEntry::new(BlockId::new(id), SequenceHash::new(h), None);
/// let mut pool = S3FifoPool::new(4);
/// pool.insert(entry(0, 10));
/// pool.insert(entry(1, 11));
/// assert!(pool.touch(BlockId::new(0))); // accessed while in S
/// assert_eq!(pool.pop_victim(), Some(BlockId::new(1))); // 0 moved to M; 1 was never used
/// pool.insert(entry(1, 11)); // a ghost: straight into M
/// assert_eq!(pool.pop_victim(), Some(BlockId::new(0))); // M's oldest, count 0
/// ```
#[derive(Debug)]
pub struct S3FifoPool {
    /// `S` and `M`, oldest first.
    queues: LinkedSlab,
    ghosts: Ghosts,
    hashes: Box<[SequenceHash]>,
    freq: Box<[u8]>,
    away: Box<[Away]>,
}

impl S3FifoPool {
    /// A pool for block ids `0..capacity`.
    ///
    /// # Panics
    /// If the tables cannot be allocated; see [`try_new`](Self::try_new).
    pub fn new(capacity: usize) -> Self {
        match Self::try_new(capacity) {
            Ok(pool) => pool,
            Err(e) => panic!("cannot allocate an S3-FIFO pool for {capacity} blocks: {e}"),
        }
    }

    /// A pool for block ids `0..capacity`, reporting an allocation failure.
    pub fn try_new(capacity: usize) -> Result<Self, TryReserveError> {
        Ok(Self {
            queues: LinkedSlab::try_new(capacity, 2)?,
            ghosts: Ghosts::try_new(capacity, 1)?,
            hashes: table(capacity, SequenceHash::new(0))?,
            freq: table(capacity, 0)?,
            away: table(capacity, Away::No)?,
        })
    }

    fn count_access(&mut self, i: usize) {
        self.freq[i] = (self.freq[i] + 1).min(MAX_FREQ);
    }
}

impl InactivePool for S3FifoPool {
    fn name(&self) -> &'static str {
        "s3fifo"
    }

    fn insert(&mut self, entry: InactiveEntry) {
        let i = entry.id.index();
        let away = std::mem::replace(&mut self.away[i], Away::No);
        let queue = match away {
            _ if self.hashes[i] != entry.hash => None,
            Away::Small => Some(SMALL),
            Away::Main => Some(MAIN),
            Away::No => None,
        };
        let queue = match queue {
            Some(q) => {
                self.count_access(i);
                q
            }
            None => {
                self.hashes[i] = entry.hash;
                self.freq[i] = 0;
                if self.ghosts.remove(entry.hash).is_some() {
                    MAIN
                } else {
                    SMALL
                }
            }
        };
        self.queues.push_back(queue, entry.id.get());
    }

    fn remove(&mut self, id: BlockId) -> bool {
        match self.queues.unlink(id.get()) {
            Some(queue) => {
                self.away[id.index()] = if queue == SMALL {
                    Away::Small
                } else {
                    Away::Main
                };
                true
            }
            None => false,
        }
    }

    fn pop_victim(&mut self) -> Option<BlockId> {
        loop {
            let (small, main) = (self.queues.len(SMALL), self.queues.len(MAIN));
            if small > 0 && (small * 10 >= small + main || main == 0) {
                let id = self.queues.pop_front(SMALL)?;
                let i = id as usize;
                if self.freq[i] > 0 {
                    self.freq[i] = 0;
                    self.queues.push_back(MAIN, id);
                    continue;
                }
                self.ghosts.push_back(0, self.hashes[i]);
                return Some(BlockId::new(id));
            }
            let id = self.queues.pop_front(MAIN)?;
            let i = id as usize;
            if self.freq[i] > 0 {
                self.freq[i] -= 1;
                self.queues.push_back(MAIN, id);
                continue;
            }
            return Some(BlockId::new(id));
        }
    }

    fn touch(&mut self, id: BlockId) -> bool {
        if !self.contains(id) {
            return false;
        }
        self.count_access(id.index());
        true
    }

    fn len(&self) -> usize {
        self.queues.len(SMALL) + self.queues.len(MAIN)
    }

    fn contains(&self, id: BlockId) -> bool {
        self.queues.list_of(id.get()).is_some()
    }

    fn check_invariants(&self) -> Result<(), String> {
        self.queues.check()?;
        self.ghosts.check()?;
        for (i, (&away, &freq)) in self.away.iter().zip(self.freq.iter()).enumerate() {
            if freq > MAX_FREQ {
                return Err(format!("s3fifo: {i} counts {freq}"));
            }
            if away != Away::No && self.queues.list_of(i as u32).is_some() {
                return Err(format!("s3fifo: {i} is both in the pool and out of it"));
            }
        }
        Ok(())
    }
}
