//! Building a manager: infallible setters, one validation in [`build`](BlockManagerBuilder::build).

use std::marker::PhantomData;
use std::sync::Arc;

use crate::sync::Mutex;

use super::BlockManager;
use crate::error::BuildError;
use crate::events::EventHub;
use crate::frequency::{FrequencySketch, FrequencyTracking};
use crate::ids::ManagerId;
use crate::metrics::BlockMetrics;
use crate::policy::{EvictionBackend, PolicyContext};
use crate::retention::{Clock, SystemClock};
use crate::store::{
    BlockDuplicationPolicy, BlockStore, GuardedClock, ParkedPanic, RefCounts, StoreState,
};
use crate::tier::BlockTier;

/// The most blocks one manager can hold (`u32::MAX` is reserved as the null link).
pub const MAX_BLOCKS: usize = u32::MAX as usize - 1;
/// The largest block size accepted, in tokens.
pub const MAX_BLOCK_SIZE: usize = 1 << 16;

/// Configures a [`BlockManager`]. `block_count` and `block_size` are required; the rest
/// default to the prefix-preserving [`EvictionBackend::Adaptive`] eviction (with its
/// frequency tracking, [`FrequencyTracking::Medium`]; with frequency tracking explicitly
/// disabled, the prefix-preserving [`EvictionBackend::Lineage`]),
/// [`BlockDuplicationPolicy::Reject`], no pinning budget and the system clock.
///
/// The default eviction keeps every cached prefix reachable however its blocks are released:
/// a block is never evicted while a registered block that extends it is evictable instead
/// (see the crate docs, "Prefixes stay reachable").
///
/// ```
/// use kvbm_logical::{
///     BlockDuplicationPolicy, BlockManager, BuildError, Device, EvictionBackend, FrequencyTracking,
/// };
/// let m = BlockManager::<Device>::builder()
///     .block_count(1024)
///     .block_size(16)
///     .eviction(EvictionBackend::Lru)
///     .duplication_policy(BlockDuplicationPolicy::Allow)
///     .frequency_tracking(FrequencyTracking::Medium)
///     .build()?;
/// assert_eq!((m.total_blocks(), m.block_size()), (1024, 16));
///
/// // The defaults: prefix-preserving eviction either way.
/// let m = BlockManager::<Device>::builder().block_count(8).block_size(16).build()?;
/// assert_eq!(m.eviction_backend(), EvictionBackend::Adaptive);
/// let m = BlockManager::<Device>::builder()
///     .block_count(8)
///     .block_size(16)
///     .frequency_tracking(FrequencyTracking::Disabled)
///     .build()?;
/// assert_eq!(m.eviction_backend(), EvictionBackend::Lineage);
///
/// let err = BlockManager::<Device>::builder().block_size(16).build().unwrap_err();
/// assert_eq!(err, BuildError::MissingBlockCount);
/// # Ok::<(), BuildError>(())
/// ```
#[derive(Debug, Clone)]
pub struct BlockManagerBuilder<T: BlockTier> {
    block_count: Option<usize>,
    block_size: Option<usize>,
    /// `None`: not set (the prefix-preserving default).
    eviction: Option<EvictionBackend>,
    duplication: BlockDuplicationPolicy,
    /// `None`: not set (the backend decides).
    frequency: Option<FrequencyTracking>,
    pinned_fraction: f64,
    clock: Option<Arc<dyn Clock>>,
    _tier: PhantomData<T>,
}

impl<T: BlockTier> Default for BlockManagerBuilder<T> {
    fn default() -> Self {
        Self {
            block_count: None,
            block_size: None,
            eviction: None,
            duplication: BlockDuplicationPolicy::default(),
            frequency: None,
            pinned_fraction: 0.0,
            clock: None,
            _tier: PhantomData,
        }
    }
}

impl<T: BlockTier> BlockManagerBuilder<T> {
    /// Number of blocks (slots) to manage: `1..=MAX_BLOCKS`.
    pub fn block_count(mut self, count: usize) -> Self {
        self.block_count = Some(count);
        self
    }

    /// Tokens per block: a power of two up to [`MAX_BLOCK_SIZE`]. Must equal the engine's
    /// page size and the size hashes are computed over.
    pub fn block_size(mut self, tokens: usize) -> Self {
        self.block_size = Some(tokens);
        self
    }

    /// The inactive pool's eviction policy (default [`EvictionBackend::Adaptive`], or
    /// [`EvictionBackend::Lineage`] when frequency tracking is explicitly
    /// [`Disabled`](FrequencyTracking::Disabled): both are prefix-preserving).
    pub fn eviction(mut self, backend: EvictionBackend) -> Self {
        self.eviction = Some(backend);
        self
    }

    /// What registering an already-present hash does.
    pub fn duplication_policy(mut self, policy: BlockDuplicationPolicy) -> Self {
        self.duplication = policy;
        self
    }

    /// Whether to track access frequency, and how many distinct hashes to size for. Unset,
    /// it is off, except for the backends that need it ([`EvictionBackend::Adaptive`], the
    /// default, and [`EvictionBackend::MultiLru`]), which get [`FrequencyTracking::Medium`].
    pub fn frequency_tracking(mut self, tracking: FrequencyTracking) -> Self {
        self.frequency = Some(tracking);
        self
    }

    /// The largest fraction of the blocks that [`BlockManager::pin`] may keep pinned at once
    /// (`0.0..=1.0`, rounded down to whole blocks; default 0: pinning refused).
    pub fn max_pinned_fraction(mut self, fraction: f64) -> Self {
        self.pinned_fraction = fraction;
        self
    }

    /// The clock retention expiry is measured on (default: [`SystemClock`]). A
    /// [`ManualClock`](crate::ManualClock) makes expiry deterministic in tests and replays.
    ///
    /// The clock is read under the store lock (by [`EvictionBackend::Priority`] only). If it
    /// panics, the manager finishes the call with the clock's last good reading, keeps its
    /// pool consistent, and resumes the panic when it releases the lock (see the crate docs,
    /// "User code under the lock").
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Validates the configuration and allocates every table (nothing is allocated later on
    /// the hot paths).
    pub fn build(self) -> Result<BlockManager<T>, BuildError> {
        let total = self.block_count.ok_or(BuildError::MissingBlockCount)?;
        let block_size = self.block_size.ok_or(BuildError::MissingBlockSize)?;
        if total == 0 {
            return Err(BuildError::ZeroBlocks);
        }
        if total > MAX_BLOCKS {
            return Err(BuildError::TooManyBlocks {
                requested: total,
                max: MAX_BLOCKS,
            });
        }
        if block_size == 0 {
            return Err(BuildError::ZeroBlockSize);
        }
        if !block_size.is_power_of_two() {
            return Err(BuildError::BlockSizeNotPowerOfTwo { block_size });
        }
        if block_size > MAX_BLOCK_SIZE {
            return Err(BuildError::BlockSizeTooLarge {
                block_size,
                max: MAX_BLOCK_SIZE,
            });
        }
        if !(0.0..=1.0).contains(&self.pinned_fraction) {
            return Err(BuildError::InvalidPinFraction {
                fraction: self.pinned_fraction,
            });
        }
        // The default is prefix-preserving either way: adaptive needs the frequency sketch,
        // lineage (leaf-first LRU) does not.
        let eviction = match (self.eviction, self.frequency) {
            (Some(backend), _) => backend,
            (None, Some(FrequencyTracking::Disabled)) => EvictionBackend::Lineage,
            (None, _) => EvictionBackend::default(),
        };
        let frequency = match (self.frequency, eviction.needs_frequency()) {
            (Some(FrequencyTracking::Disabled), true) => {
                return Err(BuildError::FrequencyTrackingRequired {
                    backend: eviction.name(),
                });
            }
            (Some(tracking), _) => tracking,
            (None, true) => FrequencyTracking::Medium,
            (None, false) => FrequencyTracking::Disabled,
        };
        let sketch = frequency
            .capacity()
            .map(|capacity| Arc::new(FrequencySketch::new(capacity)));
        let parked = Arc::new(ParkedPanic::default());
        let clock = self
            .clock
            .unwrap_or_else(|| Arc::new(SystemClock::default()));
        let ctx = PolicyContext {
            sketch: sketch.clone(),
            clock: Arc::new(GuardedClock::new(clock, Arc::clone(&parked))),
        };
        let out_of_memory = |_| BuildError::OutOfMemory { block_count: total };
        let refs = RefCounts::new(total).map_err(out_of_memory)?;
        let id = ManagerId::next();
        let events = EventHub::new(id, T::NAME, T::MEDIUM, block_size);
        let events_on = events.enabled_flag();
        let state =
            StoreState::new(total, refs.clone(), eviction, &ctx, events).map_err(out_of_memory)?;
        let store = BlockStore {
            id,
            block_size,
            total,
            duplication: self.duplication,
            backend: eviction,
            pin_budget: (self.pinned_fraction * total as f64) as usize,
            state: Mutex::new(state),
            refs,
            parked,
            frequency: sketch,
            metrics: BlockMetrics::new(T::NAME, total),
            events_on,
        };
        tracing::debug!(
            manager = %store.id,
            tier = T::NAME,
            total,
            block_size,
            eviction = eviction.name(),
            duplication = ?self.duplication,
            "block manager built"
        );
        Ok(BlockManager {
            store: Arc::new(store),
            _tier: PhantomData,
        })
    }
}
