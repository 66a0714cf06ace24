//! Inactive pools: the eviction policies.
//!
//! A registered block that no handle holds is **inactive**: it still answers prefix matches,
//! but allocation may evict it when the reset pool is empty. The [`InactivePool`] decides the
//! order. Pick a backend with [`EvictionBackend`] in the
//! [`BlockManagerBuilder`](crate::BlockManagerBuilder).
//!
//! | backend | victim |
//! |---|---|
//! | [`EvictionBackend::Lru`] | the block released longest ago (touches refresh it) |

mod linked;
mod lru;

pub use lru::LruPool;

use std::collections::TryReserveError;

use crate::hashing::SequenceHash;
use crate::ids::BlockId;

pub(crate) use linked::NIL;

/// What the store tells a policy about a block entering the inactive pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct InactiveEntry {
    /// The slot.
    pub id: BlockId,
    /// The block's sequence hash.
    pub hash: SequenceHash,
    /// Its parent's sequence hash, if it was staged with one.
    pub parent: Option<SequenceHash>,
}

impl InactiveEntry {
    /// An entry.
    pub fn new(id: BlockId, hash: SequenceHash, parent: Option<SequenceHash>) -> Self {
        Self { id, hash, parent }
    }
}

/// An eviction policy over the inactive pool.
///
/// # Contract
///
/// The store owns the policy and calls it **only while holding its lock**, so an
/// implementation needs no synchronisation of its own. It works on [`BlockId`]s and
/// [`SequenceHash`]es only, never on handles or tiers.
///
/// The caller (the store) guarantees:
/// * every id is below the `capacity` the policy was built with;
/// * [`insert`](Self::insert) is called only for an id **not** in the pool;
/// * [`remove`](Self::remove) and [`touch`](Self::touch) may be called for any id; for one not
///   in the pool they must do nothing and return `false`;
/// * under duplication policy `Allow` several ids may carry the same hash, so the store
///   removes by id, after looking the hash up in its registry.
///
/// An implementation guarantees:
/// * [`len`](Self::len) is the number of ids inserted and not yet removed or popped;
/// * [`pop_victim`](Self::pop_victim) returns `Some` exactly when `len() > 0`, and the id it
///   returns has left the pool;
/// * [`contains`](Self::contains) answers membership exactly;
/// * `insert`, `remove`, `pop_victim` and `touch` run in O(1) or O(log n) and make no heap
///   allocation (preallocate to `capacity` when constructed).
///
/// ```
/// use kvbm_logical::policy::{InactiveEntry, InactivePool, LruPool};
/// use kvbm_logical::{BlockId, SequenceHash};
///
/// let mut lru = LruPool::new(8);
/// for i in 0..3 {
///     lru.insert(InactiveEntry::new(BlockId::new(i), SequenceHash::new(100 + u64::from(i)), None));
/// }
/// assert!(lru.touch(BlockId::new(0))); // 0 becomes the most recently used
/// assert_eq!(lru.pop_victim(), Some(BlockId::new(1)));
/// assert!(lru.remove(BlockId::new(2)));
/// assert_eq!(lru.pop_victim(), Some(BlockId::new(0)));
/// assert_eq!(lru.pop_victim(), None);
/// assert!(lru.check_invariants().is_ok());
/// ```
pub trait InactivePool: Send + 'static {
    /// Short name, for logs, metrics and errors.
    fn name(&self) -> &'static str;

    /// Adds a block that just became inactive.
    fn insert(&mut self, entry: InactiveEntry);

    /// Takes a block out of the pool (it was matched, upgraded or reset). Returns whether it
    /// was there.
    fn remove(&mut self, id: BlockId) -> bool;

    /// Chooses, removes and returns the next block to evict.
    fn pop_victim(&mut self) -> Option<BlockId>;

    /// Records an access to a block in the pool. Returns whether it was there.
    fn touch(&mut self, id: BlockId) -> bool;

    /// Blocks in the pool.
    fn len(&self) -> usize;

    /// Whether the pool is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `id` is in the pool.
    fn contains(&self, id: BlockId) -> bool;

    /// Checks the implementation's internal structure (O(n); for tests and debugging).
    fn check_invariants(&self) -> Result<(), String>;
}

/// The eviction policy of a manager's inactive pool, chosen in the builder.
///
/// ```
/// use kvbm_logical::{BlockManager, Device, EvictionBackend};
/// let m = BlockManager::<Device>::builder()
///     .block_count(64)
///     .block_size(16)
///     .eviction(EvictionBackend::Lru)
///     .build()?;
/// assert_eq!(m.eviction_backend(), EvictionBackend::Lru);
/// # Ok::<(), kvbm_logical::BuildError>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EvictionBackend {
    /// Least recently released (or touched) first.
    #[default]
    Lru,
}

impl EvictionBackend {
    /// Builds the pool for `capacity` blocks.
    pub(crate) fn build(self, capacity: usize) -> Result<Box<dyn InactivePool>, TryReserveError> {
        Ok(match self {
            Self::Lru => Box::new(LruPool::try_new(capacity)?),
        })
    }

    /// The backend's name, as [`InactivePool::name`] reports it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Lru => "lru",
        }
    }
}
