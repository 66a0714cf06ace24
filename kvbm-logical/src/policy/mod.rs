//! Inactive pools: the eviction policies.
//!
//! A registered block that no handle holds is **inactive**: it still answers prefix matches,
//! but allocation may evict it when the reset pool is empty. The [`InactivePool`] decides the
//! order. Pick a backend with [`EvictionBackend`] in the
//! [`BlockManagerBuilder`](crate::BlockManagerBuilder).
//!
//! | backend | victim | cost per operation |
//! |---|---|---|
//! | [`EvictionBackend::Lru`] | the block released (or touched) longest ago | O(1) |
//! | [`EvictionBackend::Fifo`] | the block that entered the pool longest ago | O(1) |
//! | [`EvictionBackend::Lineage`] | the least recently used *leaf*: no pool member is its child | O(log n); O(1) for chains released head first and evicted tail first |
//! | [`EvictionBackend::MultiLru`] | the least recently used block of the lowest frequency level | O(1) |
//! | [`EvictionBackend::Priority`] | the lowest [`Retention`] priority, then least recently used | O(1); O(log n) for blocks with an expiry |
//! | [`EvictionBackend::Arc`] | ARC: the least recently used block of the once-used or the reused list, by an adaptive target | O(1) |
//! | [`EvictionBackend::S3Fifo`] | S3-FIFO: one-off blocks from a small FIFO, the rest from a main FIFO with second chances | amortised O(1) |
//! | [`EvictionBackend::Adaptive`] | the *leaf* with the smallest recency + weight × frequency class, the weight tuned online | O(log n); O(1) for chains released head first |
//!
//! Only lineage and adaptive are *prefix-preserving*: they never evict a block while a block
//! that extends it is evictable instead, so a cached chain is always cut from its tail.
//! Adaptive is the one that raises the hit rate; `kvbm-bench replay` compares them all with
//! the offline optimum (BENCHMARKS.md has the figures).
//!
//! Independently of the backend, [`BlockManager::pin`](crate::BlockManager::pin) keeps chosen
//! blocks out of eviction altogether, within a budget.
//!
//! Policies work on [`BlockId`]s, not hashes: under
//! [`BlockDuplicationPolicy::Allow`](crate::BlockDuplicationPolicy::Allow) several blocks carry
//! the same hash, and the store, which owns the registry, knows which one it means.

mod adaptive;
mod arc;
mod forest;
mod ghost;
mod heap;
mod lineage;
mod linked;
mod list;
mod multi_lru;
mod priority;
mod s3fifo;
#[cfg(test)]
mod tests;
mod tuner;

pub use arc::ArcPool;
pub use lineage::LineagePool;
pub use list::{FifoPool, ListPool, LruPool};
pub use priority::PriorityPool;
pub use s3fifo::S3FifoPool;

use std::collections::TryReserveError;
use std::sync::Arc;

use crate::frequency::FrequencySketch;
use crate::hashing::SequenceHash;
use crate::ids::BlockId;
use crate::retention::{Clock, Retention};

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
    /// Its retention priority and expiry (the default unless registered with one).
    pub retention: Retention,
}

impl InactiveEntry {
    /// An entry with the default retention.
    pub fn new(id: BlockId, hash: SequenceHash, parent: Option<SequenceHash>) -> Self {
        Self {
            id,
            hash,
            parent,
            retention: Retention::default(),
        }
    }

    /// The same entry with `retention`.
    pub fn with_retention(mut self, retention: Retention) -> Self {
        self.retention = retention;
        self
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

    /// Files `entry.id`, which is in the pool, as if it had been [removed](Self::remove)
    /// and [inserted](Self::insert) again with `entry`: a held block left in the pool (a
    /// side-effect-free scan) that its holder used, at its release. The default does exactly
    /// that; a policy may do it more cheaply when the result is the same (LRU and FIFO move
    /// it to the back of their list; lineage restamps it).
    fn requeue(&mut self, entry: InactiveEntry) {
        self.remove(entry.id);
        self.insert(entry);
    }

    /// Whether a used held block may stay in the pool until its release and be
    /// [requeued](Self::requeue) then, with the same result as taking it out at the use and
    /// inserting it at the release: `requeue` works in place, and
    /// [`pop_victim`](Self::pop_victim) reaching the block meanwhile (the manager passes
    /// over a held block) has no effect beyond its removal. False (the default) takes the
    /// block out at the use; LRU, FIFO and lineage say true. (Lineage then keeps the held
    /// block's ancestors internal until the release, a difference it accepts: they are
    /// the prefix of a block in use.)
    fn requeues_in_place(&self) -> bool {
        false
    }

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

/// The eviction policy of a manager's inactive pool, chosen in the builder; the default is
/// [`Adaptive`](Self::Adaptive).
///
/// ```
/// use kvbm_logical::{BlockManager, Device, EvictionBackend};
/// for backend in EvictionBackend::ALL {
///     let m = BlockManager::<Device>::builder()
///         .block_count(64)
///         .block_size(16)
///         .eviction(backend)
///         .build()?;
///     assert_eq!(m.eviction_backend(), backend);
/// }
/// # Ok::<(), kvbm_logical::BuildError>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EvictionBackend {
    /// Least recently released (or touched) first. See [`LruPool`].
    Lru,
    /// First in, first out. See [`FifoPool`].
    Fifo,
    /// Leaves first, so that a prefix outlives its tail. See [`LineagePool`].
    Lineage,
    /// Multi-level LRU by TinyLFU access frequency. Needs frequency tracking: when the builder
    /// was given none, [`FrequencyTracking::Medium`](crate::FrequencyTracking::Medium) is used.
    MultiLru,
    /// Lowest retention priority first, with expiry. See [`PriorityPool`].
    Priority,
    /// Adaptive replacement (ARC): a once-used and a reused list with ghost lists that
    /// adapt their balance. See [`ArcPool`].
    Arc,
    /// S3-FIFO: a small probationary FIFO, a main FIFO and a ghost FIFO. See [`S3FifoPool`].
    S3Fifo,
    /// Prefix-preserving (leaves first) and frequency-aware, self-tuned: the victim is the
    /// leaf with the smallest recency stamp plus a weight times its frequency class, the
    /// weight picked online by miniature simulations of the candidates on sampled hashes
    /// (least-recently-used order unless frequency clearly pays). Needs frequency tracking:
    /// when the builder was given none,
    /// [`FrequencyTracking::Medium`](crate::FrequencyTracking::Medium) is used; a larger
    /// sketch remembers more of a long trace.
    ///
    /// **The default**: prefix-preserving, and at least LRU's hit rate at every capacity
    /// measured (BENCHMARKS.md).
    #[default]
    Adaptive,
}

/// What a backend may need besides its capacity.
pub(crate) struct PolicyContext {
    pub(crate) sketch: Option<Arc<FrequencySketch>>,
    pub(crate) clock: Arc<dyn Clock>,
}

impl PolicyContext {
    /// The manager's sketch. The builder always provides one to a backend that
    /// [needs it](EvictionBackend::needs_frequency); without one (only if constructed some
    /// other way) a small private sketch stands in, which no access ever increments: every
    /// block is then in the lowest frequency class.
    fn sketch(&self) -> Arc<FrequencySketch> {
        debug_assert!(
            self.sketch.is_some(),
            "a frequency backend without a sketch"
        );
        self.sketch.clone().unwrap_or_else(|| {
            Arc::new(FrequencySketch::new(
                crate::FrequencyTracking::Small.capacity().unwrap_or(16),
            ))
        })
    }
}

impl EvictionBackend {
    /// Every backend, for tests and benchmarks that sweep them.
    pub const ALL: [EvictionBackend; 8] = [
        Self::Lru,
        Self::Fifo,
        Self::Lineage,
        Self::MultiLru,
        Self::Priority,
        Self::Arc,
        Self::S3Fifo,
        Self::Adaptive,
    ];

    /// Builds the pool for `capacity` blocks.
    pub(crate) fn build(
        self,
        capacity: usize,
        ctx: &PolicyContext,
    ) -> Result<Box<dyn InactivePool>, TryReserveError> {
        Ok(match self {
            Self::Lru => Box::new(LruPool::try_new(capacity)?),
            Self::Fifo => Box::new(FifoPool::try_new(capacity)?),
            Self::Lineage => Box::new(LineagePool::try_new(capacity)?),
            Self::MultiLru => Box::new(multi_lru::MultiLruPool::try_new(capacity, ctx.sketch())?),
            Self::Priority => Box::new(PriorityPool::try_new(capacity, Arc::clone(&ctx.clock))?),
            Self::Arc => Box::new(ArcPool::try_new(capacity)?),
            Self::S3Fifo => Box::new(S3FifoPool::try_new(capacity)?),
            Self::Adaptive => Box::new(adaptive::AdaptivePool::try_new(capacity, ctx.sketch())?),
        })
    }

    /// The backend's name, as [`InactivePool::name`] reports it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Lru => "lru",
            Self::Fifo => "fifo",
            Self::Lineage => "lineage",
            Self::MultiLru => "multi_lru",
            Self::Priority => "priority",
            Self::Arc => "arc",
            Self::S3Fifo => "s3fifo",
            Self::Adaptive => "adaptive",
        }
    }

    /// Whether the backend needs frequency tracking.
    pub fn needs_frequency(self) -> bool {
        matches!(self, Self::MultiLru | Self::Adaptive)
    }
}
