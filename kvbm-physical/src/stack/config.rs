//! Configuration: the builder, its policies (write mode, watermarks, admission, store-tier
//! probing) and the build errors. Setters are infallible; `build` validates once.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use kvbm_logical::{BlockManager, BlockTier, Device, Host, SequenceHash};
use thiserror::Error;

use crate::layout::Layout;
use crate::store_tier::StoreTier;
use crate::transfer::TransferEngine;

use super::TierStack;

/// Default number of worker threads.
pub const DEFAULT_WORKERS: usize = 2;
/// Default bound of each offload lane (G1 → G2, G2 → stores), in blocks held by waiting
/// jobs.
pub const DEFAULT_MAX_QUEUED_BLOCKS: usize = 4096;
/// Default number of G1 blocks one reclaim round evicts and offloads.
pub const DEFAULT_RECLAIM_BATCH: usize = 64;
/// Default time an idle worker keeps polling the queue before it parks (see
/// [`TierStackBuilder::worker_linger`]).
pub const DEFAULT_WORKER_LINGER: Duration = Duration::from_millis(2);

/// When G1 blocks are offloaded to G2.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum WriteMode {
    /// On registration: every registration enqueues the G1 → G2 copy of its blocks.
    WriteThrough,
    /// Before eviction: a background reclaimer keeps G1's reset pool between the
    /// watermarks by evicting the coldest inactive blocks itself and offloading them.
    WriteBack(Watermarks),
}

/// Free-block watermarks, in free (reset) G1 blocks — write-back's, or write-through's free
/// reserve: when an allocation leaves fewer than `low`, the reclaimer evicts the coldest
/// inactive blocks (offloading them, under write-back) until `high` are free. With
/// `low = 0` it starts once no free block is left.
///
/// ```
/// use kvbm_physical::stack::Watermarks;
/// let w = Watermarks::new(16, 64);
/// assert_eq!((w.low, w.high), (16, 64));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Watermarks {
    /// Reclaim starts below this many free blocks; with 0, when no free block is left.
    pub low: usize,
    /// Reclaim stops at this many free blocks.
    pub high: usize,
}

impl Watermarks {
    /// `low..=high` free blocks; checked by [`TierStackBuilder::build`] (`low <= high`,
    /// `0 < high <= G1 blocks`).
    pub fn new(low: usize, high: usize) -> Self {
        Self { low, high }
    }

    /// Reclaim starts below this many free blocks: `low`, and 1 for a `low` of 0 (no free
    /// block left), which would otherwise never start it.
    pub(crate) fn starts_below(&self) -> usize {
        self.low.max(1)
    }
}

/// The admission filter of a tier boundary: which blocks are offloaded into the lower tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Admission {
    /// Every block the lower tier lacks.
    #[default]
    Presence,
    /// Blocks the lower tier lacks whose estimated access count in the upper tier's
    /// frequency sketch ([`BlockManager::frequency`]) is at least this. The upper tier's
    /// manager needs frequency tracking.
    MinFrequency(u32),
}

/// How a lookup learns whether a store tier holds a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Probe {
    /// `lookup` asks the tier (`contains`) on the caller's thread: for a tier whose index is
    /// local and cheap (a disk tier).
    #[default]
    OnLookup,
    /// `lookup` does not ask: the blocks no faster tier holds are planned from this tier as
    /// *unverified* candidates, and the onboard job fetches them on a worker; a miss ends the
    /// prefix there. For a tier behind a network round trip (a remote store). At most one
    /// store tier of a stack is probed this way (the candidates are planned from it alone).
    Deferred,
}

/// A store tier and its boundary policies.
///
/// ```
/// use std::sync::Arc;
/// use kvbm_physical::stack::{Admission, Probe, StoreTierConfig};
/// # use kvbm_physical::{StoreBlock, StoreStats, StoreTier, GetOutcome, PutOutcome};
/// # use kvbm_logical::SequenceHash;
/// # #[derive(Debug)] struct Null;
/// # impl StoreTier for Null {
/// #     fn medium(&self) -> &'static str { "NULL" }
/// #     fn block_bytes(&self) -> usize { 16 }
/// #     fn contains(&self, h: &[SequenceHash]) -> Vec<bool> { vec![false; h.len()] }
/// #     fn put(&self, b: &[StoreBlock<'_>]) -> Vec<PutOutcome> { b.iter().map(|_| PutOutcome::Stored).collect() }
/// #     fn get(&self, h: &[SequenceHash], _: &mut [&mut [u8]]) -> Vec<GetOutcome> { h.iter().map(|_| GetOutcome::Miss).collect() }
/// #     fn remove(&self, _: &[SequenceHash]) {}
/// #     fn stats(&self) -> StoreStats { StoreStats::default() }
/// # }
/// let remote = StoreTierConfig::new(Arc::new(Null))
///     .admission(Admission::MinFrequency(2))
///     .probe(Probe::Deferred);
/// assert_eq!(remote.probe_mode(), Probe::Deferred);
/// ```
#[derive(Clone)]
pub struct StoreTierConfig {
    pub(crate) tier: Arc<dyn StoreTier>,
    pub(crate) admission: Admission,
    pub(crate) probe: Probe,
}

impl StoreTierConfig {
    /// `tier` with [`Admission::Presence`], probed [`Probe::OnLookup`], or
    /// [`Probe::Deferred`] where the tier [is remote](StoreTier::is_remote) (a round trip
    /// on the scheduler's thread, and a connect timeout there when the store is down, is
    /// never the default).
    pub fn new(tier: Arc<dyn StoreTier>) -> Self {
        let probe = if tier.is_remote() {
            Probe::Deferred
        } else {
            Probe::OnLookup
        };
        Self {
            tier,
            admission: Admission::Presence,
            probe,
        }
    }

    /// The G2 → this tier admission filter (frequencies are G2's).
    pub fn admission(mut self, admission: Admission) -> Self {
        self.admission = admission;
        self
    }

    /// How lookups probe this tier.
    pub fn probe(mut self, probe: Probe) -> Self {
        self.probe = probe;
        self
    }

    /// The probe mode set.
    pub fn probe_mode(&self) -> Probe {
        self.probe
    }
}

impl fmt::Debug for StoreTierConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreTierConfig")
            .field("tier", &self.tier)
            .field("admission", &self.admission)
            .field("probe", &self.probe)
            .finish()
    }
}

/// The stack's configuration did not validate. Nothing was started.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StackError {
    /// `g1` or `g2` was not given.
    #[error("the {tier} tier is required")]
    MissingTier {
        /// `"G1"` or `"G2"`.
        tier: &'static str,
    },
    /// A manager and its layout disagree on the block count.
    #[error("{tier}: the manager has {manager} blocks, its layout {layout}")]
    BlockCount {
        /// `"G1"` or `"G2"`.
        tier: &'static str,
        /// The manager's blocks.
        manager: usize,
        /// The layout's blocks.
        layout: usize,
    },
    /// A manager's block size (tokens) differs from its layout's `page_size`, or G1's from
    /// G2's.
    #[error("{tier}: {manager} tokens per block, expected {expected}")]
    BlockSize {
        /// The tier at fault.
        tier: &'static str,
        /// Its tokens per block.
        manager: usize,
        /// What it must be.
        expected: usize,
    },
    /// G1's and G2's layouts have different block shapes.
    #[error("block shapes differ: {what} is {g1} in G1 and {g2} in G2")]
    Shape {
        /// `"num_layers"`, `"outer_dim"` or `"region bytes"`.
        what: &'static str,
        /// G1's value.
        g1: usize,
        /// G2's value.
        g2: usize,
    },
    /// A store tier's block size differs from G2's block image.
    #[error("store tier {index} ({medium}) holds {found}-byte blocks, G2's are {expected}")]
    StoreBlockBytes {
        /// Index among the store tiers (0 = G3).
        index: usize,
        /// Its medium.
        medium: &'static str,
        /// G2's block bytes.
        expected: usize,
        /// The store's.
        found: usize,
    },
    /// `MinFrequency` admission on a boundary whose upper tier tracks no frequencies.
    #[error("MinFrequency admission into {boundary} needs frequency tracking on the tier above")]
    FrequencyTracking {
        /// The lower tier of the boundary (`"G2"`, `"G3"`, ...).
        boundary: String,
    },
    /// Watermarks out of order or beyond G1.
    #[error("watermarks low {low} high {high} invalid for {total} G1 blocks")]
    Watermarks {
        /// Low watermark.
        low: usize,
        /// High watermark.
        high: usize,
        /// G1 blocks.
        total: usize,
    },
    /// A free reserve asked for under write-back, whose watermarks are the reserve.
    #[error("free_reserve is for write-through; write-back's watermarks are its reserve")]
    ReserveWithWriteBack,
    /// A count that must be positive is zero.
    #[error("{what} must be positive")]
    Zero {
        /// The setting.
        what: &'static str,
    },
    /// More than one store tier probed [`Probe::Deferred`] (remote tiers are, by default):
    /// the blocks no tier was asked about are planned from the first alone, so the second
    /// would be written to and never read. Probe the others [`Probe::OnLookup`].
    #[error(
        "store tiers {first} and {second} are both probed Deferred; at most one may be (probe the other OnLookup)"
    )]
    SeveralDeferred {
        /// The first deferred tier (`"G3"`, `"G4"`, ...).
        first: String,
        /// The second.
        second: String,
    },
    /// A worker thread could not be started.
    #[error("cannot start a worker thread: {0}")]
    Spawn(#[source] std::io::Error),
}

/// Builds a [`TierStack`]; see the [module docs](super).
///
/// ```
/// use kvbm_logical::{BlockManager, Device, FrequencyTracking, Host};
/// use kvbm_physical::stack::{Admission, StackError, TierStack, Watermarks, WriteMode};
/// use kvbm_physical::{Layout, LayoutConfig, LayoutKind};
/// let config = |n| LayoutConfig { num_blocks: n, num_layers: 1, outer_dim: 2, page_size: 16, inner_dim: 8, dtype_bytes: 2 };
/// let g1 = || BlockManager::<Device>::builder().block_count(64).block_size(16).build();
/// let g2 = || BlockManager::<Host>::builder().block_count(256).block_size(16).build();
/// let stack = TierStack::builder()
///     .g1(g1()?, Layout::system(LayoutKind::LayerSeparate, config(64))?.into_shared())
///     .g2(g2()?, Layout::system(LayoutKind::FullyContiguous, config(256))?.with_checksums()?.into_shared())
///     .write_mode(WriteMode::WriteBack(Watermarks::new(8, 16)))
///     .workers(2)
///     .build()?;
/// assert_eq!(stack.g1().total_blocks(), 64);
///
/// // MinFrequency admission needs frequency tracking on G1.
/// let untracked = BlockManager::<Device>::builder()
///     .block_count(64)
///     .block_size(16)
///     .frequency_tracking(FrequencyTracking::Disabled)
///     .build()?;
/// let err = TierStack::builder()
///     .g1(untracked, Layout::system(LayoutKind::LayerSeparate, config(64))?.into_shared())
///     .g2(g2()?, Layout::system(LayoutKind::FullyContiguous, config(256))?.into_shared())
///     .g2_admission(Admission::MinFrequency(2))
///     .build()
///     .unwrap_err();
/// assert!(matches!(err, StackError::FrequencyTracking { .. }));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct TierStackBuilder {
    pub(crate) g1: Option<(BlockManager<Device>, Arc<Layout>)>,
    pub(crate) g2: Option<(BlockManager<Host>, Arc<Layout>)>,
    pub(crate) stores: Vec<StoreTierConfig>,
    pub(crate) engine: TransferEngine,
    pub(crate) mode: WriteMode,
    pub(crate) g2_admission: Admission,
    pub(crate) workers: usize,
    pub(crate) max_queued_blocks: usize,
    pub(crate) reclaim_batch: usize,
    pub(crate) worker_linger: Duration,
    pub(crate) reserve: Option<Watermarks>,
}

impl Default for TierStackBuilder {
    fn default() -> Self {
        Self {
            g1: None,
            g2: None,
            stores: Vec::new(),
            engine: TransferEngine::host(),
            mode: WriteMode::WriteThrough,
            g2_admission: Admission::Presence,
            workers: DEFAULT_WORKERS,
            max_queued_blocks: DEFAULT_MAX_QUEUED_BLOCKS,
            reclaim_batch: DEFAULT_RECLAIM_BATCH,
            worker_linger: DEFAULT_WORKER_LINGER,
            reserve: None,
        }
    }
}

impl TierStackBuilder {
    /// The device tier: its manager and the memory its block ids index. The stack takes the
    /// manager; callers see it only through a read-only [`SlotView`](super::SlotView).
    pub fn g1(mut self, manager: BlockManager<Device>, layout: Arc<Layout>) -> Self {
        self.g1 = Some((manager, layout));
        self
    }

    /// The host tier.
    pub fn g2(mut self, manager: BlockManager<Host>, layout: Arc<Layout>) -> Self {
        self.g2 = Some((manager, layout));
        self
    }

    /// Adds a store tier below the ones already added (the first is G3).
    pub fn store(mut self, store: StoreTierConfig) -> Self {
        self.stores.push(store);
        self
    }

    /// The copy engine (default: host memcpy).
    pub fn engine(mut self, engine: TransferEngine) -> Self {
        self.engine = engine;
        self
    }

    /// When G1 offloads to G2 (default write-through).
    pub fn write_mode(mut self, mode: WriteMode) -> Self {
        self.mode = mode;
        self
    }

    /// The G1 → G2 admission filter (default [`Admission::Presence`]).
    pub fn g2_admission(mut self, admission: Admission) -> Self {
        self.g2_admission = admission;
        self
    }

    /// Worker threads (default [`DEFAULT_WORKERS`]).
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = workers;
        self
    }

    /// Bound, in blocks, of each of the two offload lanes — G1 → G2 offloads, and G2 →
    /// store-tier copies (default [`DEFAULT_MAX_QUEUED_BLOCKS`]); a job that does not fit
    /// is skipped and counted (`queue_full`, in the lower tier's counters). Separate bounds,
    /// and G1 → G2 offloads running first, keep a slow store tier from holding up the
    /// copies that give G1 slots back.
    pub fn max_queued_blocks(mut self, blocks: usize) -> Self {
        self.max_queued_blocks = blocks;
        self
    }

    /// G1 blocks one reclaim round evicts (default [`DEFAULT_RECLAIM_BATCH`]).
    pub fn reclaim_batch(mut self, blocks: usize) -> Self {
        self.reclaim_batch = blocks;
        self
    }

    /// How long a worker that ran out of jobs keeps polling the queue (every
    /// [`POLL`](super::POLL)) before it parks (default [`DEFAULT_WORKER_LINGER`]). A job
    /// pushed while a worker lingers costs the pushing thread (the scheduler) no wake-up
    /// call: waking a parked thread is a system call of several microseconds, more on a
    /// virtual machine, paid inside `register` and `onboard`. A busy server pushes every
    /// few hundred microseconds, so its workers mostly linger between jobs and its
    /// scheduler rarely pays a wake (it still does when every idle worker is parked, or
    /// when the one that would linger is busy with a job); the price is a timer wake-up of
    /// the lingering worker every poll (on its own core) and up to one poll's delay before
    /// a job starts.
    /// `Duration::ZERO` parks at once, and every push finding all workers parked wakes one.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use kvbm_physical::stack::TierStack;
    /// let builder = TierStack::builder().worker_linger(Duration::from_millis(5));
    /// # let _ = builder;
    /// ```
    pub fn worker_linger(mut self, linger: Duration) -> Self {
        self.worker_linger = linger;
        self
    }

    /// Write-through: keeps between `low` and `high` free (reset) G1 blocks by evicting the
    /// coldest inactive G1 blocks on a worker, in the eviction policy's order, whenever an
    /// allocation leaves fewer than `low` (default: none, G1 evicts inside allocations).
    /// The scheduler's allocations then take free blocks instead of evicting (an eviction is
    /// a pool removal and a registry removal per block, on the scheduler's thread). A block
    /// whose copy to G2 is in flight is held by its job, so it is never evicted; an
    /// inactive one normally has its copy in G2 already. The price is G1 capacity: up to
    /// `high` blocks stay free, so some hits come from G2 instead of G1, and blocks G2 does
    /// not hold (refused by `MinFrequency` admission, skipped for a full queue or G2, a
    /// failed copy, or evicted from G2 since) leave the cache up to `high` blocks earlier
    /// than without a reserve. With `Presence` admission and a G2 several times G1 the
    /// combined hit rate does not move (`kvbm-bench tiered`, see BENCHMARKS.md). The
    /// evictions are announced as `Removed { reason: Evicted }`; one reclaim runs at a time. Checked by
    /// [`build`](Self::build) like write-back's watermarks; write-back refuses it
    /// ([`StackError::ReserveWithWriteBack`]), its watermarks being its reserve.
    ///
    /// ```
    /// # use kvbm_logical::{BlockManager, Device, Host};
    /// # use kvbm_physical::stack::{TierStack, Watermarks};
    /// # use kvbm_physical::{Layout, LayoutConfig, LayoutKind};
    /// # let config = |n| LayoutConfig { num_blocks: n, num_layers: 1, outer_dim: 2, page_size: 16, inner_dim: 8, dtype_bytes: 2 };
    /// let stack = TierStack::builder()
    ///     .g1(BlockManager::<Device>::builder().block_count(64).block_size(16).build()?,
    ///         Layout::system(LayoutKind::LayerSeparate, config(64))?.into_shared())
    ///     .g2(BlockManager::<Host>::builder().block_count(256).block_size(16).build()?,
    ///         Layout::system(LayoutKind::FullyContiguous, config(256))?.into_shared())
    ///     .free_reserve(Watermarks::new(4, 8))
    ///     .build()?;
    /// # let _ = stack;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn free_reserve(mut self, reserve: Watermarks) -> Self {
        self.reserve = Some(reserve);
        self
    }

    /// Validates everything and starts the workers.
    pub fn build(self) -> Result<TierStack, StackError> {
        self.validate()?;
        TierStack::start(self)
    }

    fn validate(&self) -> Result<(), StackError> {
        let (m1, l1) = self
            .g1
            .as_ref()
            .ok_or(StackError::MissingTier { tier: "G1" })?;
        let (m2, l2) = self
            .g2
            .as_ref()
            .ok_or(StackError::MissingTier { tier: "G2" })?;
        check_slot("G1", m1, l1)?;
        check_slot("G2", m2, l2)?;
        if m2.block_size() != m1.block_size() {
            return Err(StackError::BlockSize {
                tier: "G2",
                manager: m2.block_size(),
                expected: m1.block_size(),
            });
        }
        let (a, b) = (l1.config(), l2.config());
        for (what, g1, g2) in [
            ("num_layers", a.num_layers, b.num_layers),
            ("outer_dim", a.outer_dim, b.outer_dim),
            ("region bytes", l1.region_bytes(), l2.region_bytes()),
        ] {
            if g1 != g2 {
                return Err(StackError::Shape { what, g1, g2 });
            }
        }
        for (index, s) in self.stores.iter().enumerate() {
            if s.tier.block_bytes() != l2.block_bytes() {
                return Err(StackError::StoreBlockBytes {
                    index,
                    medium: s.tier.medium(),
                    expected: l2.block_bytes(),
                    found: s.tier.block_bytes(),
                });
            }
            if matches!(s.admission, Admission::MinFrequency(_)) && !tracks(m2) {
                return Err(StackError::FrequencyTracking {
                    boundary: super::TierId::Store(index).to_string(),
                });
            }
        }
        let mut deferred = self
            .stores
            .iter()
            .enumerate()
            .filter(|(_, s)| s.probe == Probe::Deferred)
            .map(|(i, _)| super::TierId::Store(i).to_string());
        if let (Some(first), Some(second)) = (deferred.next(), deferred.next()) {
            return Err(StackError::SeveralDeferred { first, second });
        }
        if matches!(self.g2_admission, Admission::MinFrequency(_)) && !tracks(m1) {
            return Err(StackError::FrequencyTracking {
                boundary: "G2".into(),
            });
        }
        if matches!(self.mode, WriteMode::WriteBack(_)) && self.reserve.is_some() {
            return Err(StackError::ReserveWithWriteBack);
        }
        if let Some(w) = self.watermarks()
            && (w.low > w.high || w.high == 0 || w.high > m1.total_blocks())
        {
            return Err(StackError::Watermarks {
                low: w.low,
                high: w.high,
                total: m1.total_blocks(),
            });
        }
        for (what, n) in [
            ("workers", self.workers),
            ("max_queued_blocks", self.max_queued_blocks),
            ("reclaim_batch", self.reclaim_batch),
        ] {
            if n == 0 {
                return Err(StackError::Zero { what });
            }
        }
        Ok(())
    }
}

impl TierStackBuilder {
    /// The free-block watermarks the reclaimer keeps: write-back's, or write-through's
    /// reserve.
    pub(crate) fn watermarks(&self) -> Option<Watermarks> {
        match self.mode {
            WriteMode::WriteBack(w) => Some(w),
            _ => self.reserve,
        }
    }
}

fn tracks<T: BlockTier>(m: &BlockManager<T>) -> bool {
    m.frequency(SequenceHash::new(0)).is_some()
}

fn check_slot<T: BlockTier>(
    tier: &'static str,
    m: &BlockManager<T>,
    l: &Layout,
) -> Result<(), StackError> {
    if m.total_blocks() != l.num_blocks() {
        return Err(StackError::BlockCount {
            tier,
            manager: m.total_blocks(),
            layout: l.num_blocks(),
        });
    }
    if m.block_size() != l.config().page_size {
        return Err(StackError::BlockSize {
            tier,
            manager: m.block_size(),
            expected: l.config().page_size,
        });
    }
    Ok(())
}
