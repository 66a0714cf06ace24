//! Accounting: per-tier counters (plain atomics, added in bulk), a snapshot struct, and a
//! `prometheus-client` collector that a server registers into its own registry.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use parking_lot::Mutex;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// A tier of the stack: `G1` (device), `G2` (host), then the store tiers in the order they
/// were added (`Store(0)` is G3, `Store(1)` G4, ...).
///
/// ```
/// use kvbm_physical::stack::TierId;
/// assert_eq!(TierId::G1.to_string(), "G1");
/// assert_eq!(TierId::Store(1).to_string(), "G4");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TierId {
    /// The device tier, where the engine computes.
    G1,
    /// The host tier.
    G2,
    /// The store tier at this index (0 = G3).
    Store(usize),
}

impl TierId {
    /// Index into [`StackStats::tiers`]: 0 for G1, 1 for G2, 2 + i for store tier i.
    pub fn index(self) -> usize {
        match self {
            TierId::G1 => 0,
            TierId::G2 => 1,
            TierId::Store(i) => 2 + i,
        }
    }

    fn label(self) -> String {
        self.to_string()
    }
}

impl fmt::Display for TierId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "G{}", self.index() + 1)
    }
}

/// Why an offload into a tier did not happen. Back-pressure and policy, never a failure:
/// the block is still correct where it was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Skip {
    /// The offload queue was full when the job was offered.
    QueueFull,
    /// The tier's admission filter refused it (`MinFrequency`).
    Admission,
    /// The tier already holds it.
    Present,
    /// The tier had no room (every slot held, or the store said so).
    NoRoom,
    /// Write-back: the scheduler's allocation evicted it from G1 before the reclaimer had
    /// offloaded it.
    ReclaimBehind,
    /// The stack was shutting down.
    Shutdown,
    /// A store tier was degraded (stopped admitting after an error).
    Degraded,
    /// A store tier was unreachable.
    Unavailable,
}

impl Skip {
    /// Every reason, in label order.
    pub const ALL: [Skip; 8] = [
        Skip::QueueFull,
        Skip::Admission,
        Skip::Present,
        Skip::NoRoom,
        Skip::ReclaimBehind,
        Skip::Shutdown,
        Skip::Degraded,
        Skip::Unavailable,
    ];

    /// The `reason` label.
    pub fn name(self) -> &'static str {
        match self {
            Skip::QueueFull => "queue_full",
            Skip::Admission => "admission",
            Skip::Present => "present",
            Skip::NoRoom => "no_room",
            Skip::ReclaimBehind => "reclaim_behind",
            Skip::Shutdown => "shutdown",
            Skip::Degraded => "degraded",
            Skip::Unavailable => "unavailable",
        }
    }

    fn slot(self) -> usize {
        Skip::ALL.iter().position(|&s| s == self).unwrap_or(0)
    }
}

const SKIPS: usize = Skip::ALL.len();

/// Counters of one tier.
#[derive(Default)]
pub(crate) struct TierCounters {
    offloaded: AtomicU64,
    offloaded_bytes: AtomicU64,
    onboarded: AtomicU64,
    onboarded_bytes: AtomicU64,
    lost: AtomicU64,
    lookup_hits: AtomicU64,
    skipped: [AtomicU64; SKIPS],
}

/// Which copies a [`CopyClock`] times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Direction {
    /// G1 → G2 (write-through offloads and write-back reclaim).
    Offload,
    /// G2 → G1 (onboards).
    Onboard,
}

/// The busy time of one copy direction: the union of the intervals during which at least
/// one batch of that direction was in flight (issued and not yet landed, on any worker), so
/// that bytes over busy time is the bandwidth the copies reached, not diluted by idle time
/// nor double-counted when two workers copy at once. One short lock per batch.
#[derive(Default)]
pub(crate) struct CopyClock {
    state: Mutex<ClockState>,
}

#[derive(Default)]
struct ClockState {
    in_flight: u32,
    since: Option<Instant>,
    busy_ns: u64,
    bytes: u64,
    batches: u64,
}

impl CopyClock {
    /// A batch is issued.
    pub(crate) fn start(&self) {
        let mut s = self.state.lock();
        if s.in_flight == 0 {
            s.since = Some(Instant::now());
        }
        s.in_flight += 1;
    }

    /// A batch of `bytes` has landed (or failed); 0: it was refused, nothing was copied.
    pub(crate) fn stop(&self, bytes: u64) {
        let mut s = self.state.lock();
        s.in_flight = s.in_flight.saturating_sub(1);
        if s.in_flight == 0
            && let Some(since) = s.since.take()
        {
            s.busy_ns += since.elapsed().as_nanos() as u64;
        }
        if bytes > 0 {
            s.bytes += bytes;
            s.batches += 1;
        }
    }

    fn snapshot(&self) -> CopyStats {
        let s = self.state.lock();
        let running = s.since.map_or(0, |t| t.elapsed().as_nanos() as u64);
        CopyStats {
            bytes: s.bytes,
            batches: s.batches,
            busy_nanos: s.busy_ns + running,
        }
    }
}

/// The copies of one direction since the stack was built: bytes copied (every pair of every
/// batch, failed ones included) and the time at least one batch was in flight.
///
/// ```
/// use kvbm_physical::stack::CopyStats;
/// let s = CopyStats::default();
/// assert_eq!(s.gb_per_s(), None); // nothing copied yet
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CopyStats {
    /// Bytes of the batches issued.
    pub bytes: u64,
    /// Batches issued.
    pub batches: u64,
    /// Nanoseconds during which at least one batch was in flight (issue to landed, on the
    /// workers; waits on engine events included).
    pub busy_nanos: u64,
}

impl CopyStats {
    /// Bytes per busy second, in GB/s (10^9 bytes); `None` before the first copy.
    pub fn gb_per_s(&self) -> Option<f64> {
        (self.busy_nanos > 0).then(|| self.bytes as f64 / self.busy_nanos as f64)
    }
}

/// A Prometheus family over both copy directions: name, help, the field it reports.
type CopyFamily = (&'static str, &'static str, fn(&CopyStats) -> u64);

/// Every counter of the stack.
pub(crate) struct Counters {
    tiers: Vec<TierCounters>,
    /// G1 → G2 and G2 → G1 copy time.
    pub(crate) offload_clock: CopyClock,
    pub(crate) onboard_clock: CopyClock,
    pub(crate) block_bytes: u64,
    lookups: AtomicU64,
    onboards: AtomicU64,
    cancelled: AtomicU64,
    not_now: AtomicU64,
    reclaim_runs: AtomicU64,
    reserve_behind: AtomicU64,
    panicked_jobs: AtomicU64,
}

impl Counters {
    pub(crate) fn new(tiers: usize, block_bytes: usize) -> Self {
        Self {
            tiers: (0..tiers).map(|_| TierCounters::default()).collect(),
            offload_clock: CopyClock::default(),
            onboard_clock: CopyClock::default(),
            block_bytes: block_bytes as u64,
            lookups: AtomicU64::new(0),
            onboards: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            not_now: AtomicU64::new(0),
            reclaim_runs: AtomicU64::new(0),
            reserve_behind: AtomicU64::new(0),
            panicked_jobs: AtomicU64::new(0),
        }
    }

    fn tier(&self, tier: TierId) -> &TierCounters {
        &self.tiers[tier.index()]
    }

    /// The clock of `direction`.
    pub(crate) fn clock(&self, direction: Direction) -> &CopyClock {
        match direction {
            Direction::Offload => &self.offload_clock,
            Direction::Onboard => &self.onboard_clock,
        }
    }

    /// `n` blocks offloaded into `tier`.
    pub(crate) fn offloaded(&self, tier: TierId, n: usize) {
        if n > 0 {
            let t = self.tier(tier);
            t.offloaded.fetch_add(n as u64, Ordering::Relaxed);
            t.offloaded_bytes
                .fetch_add(n as u64 * self.block_bytes, Ordering::Relaxed);
        }
    }

    /// `n` blocks onboarded into G1 from `tier`.
    pub(crate) fn onboarded(&self, tier: TierId, n: usize) {
        if n > 0 {
            let t = self.tier(tier);
            t.onboarded.fetch_add(n as u64, Ordering::Relaxed);
            t.onboarded_bytes
                .fetch_add(n as u64 * self.block_bytes, Ordering::Relaxed);
        }
    }

    /// `n` offloads into `tier` skipped for `why`.
    pub(crate) fn skipped(&self, tier: TierId, why: Skip, n: usize) {
        if n > 0 {
            self.tier(tier).skipped[why.slot()].fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// `n` blocks lost at `tier` (a failed copy or a corrupt block).
    pub(crate) fn lost(&self, tier: TierId, n: usize) {
        if n > 0 {
            self.tier(tier).lost.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    pub(crate) fn lookup(&self, hits: &[usize]) {
        self.lookups.fetch_add(1, Ordering::Relaxed);
        for (t, &n) in self.tiers.iter().zip(hits) {
            if n > 0 {
                t.lookup_hits.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    }

    pub(crate) fn onboard_started(&self) {
        self.onboards.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn cancelled(&self) {
        self.cancelled.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn not_now(&self) {
        self.not_now.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn reclaim_run(&self) {
        self.reclaim_runs.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn job_panicked(&self) {
        self.panicked_jobs.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn reserve_behind(&self, blocks: usize) {
        self.reserve_behind
            .fetch_add(blocks as u64, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self, queue: QueueDepth) -> StackStats {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StackStats {
            tiers: self
                .tiers
                .iter()
                .enumerate()
                .map(|(i, t)| TierStats {
                    tier: match i {
                        0 => TierId::G1,
                        1 => TierId::G2,
                        i => TierId::Store(i - 2),
                    },
                    offloaded: r(&t.offloaded),
                    offloaded_bytes: r(&t.offloaded_bytes),
                    onboarded: r(&t.onboarded),
                    onboarded_bytes: r(&t.onboarded_bytes),
                    lost: r(&t.lost),
                    lookup_hits: r(&t.lookup_hits),
                    skipped: std::array::from_fn(|k| r(&t.skipped[k])),
                })
                .collect(),
            lookups: r(&self.lookups),
            onboards: r(&self.onboards),
            cancelled: r(&self.cancelled),
            not_now: r(&self.not_now),
            reclaim_runs: r(&self.reclaim_runs),
            reserve_behind: r(&self.reserve_behind),
            panicked_jobs: r(&self.panicked_jobs),
            offload_copies: self.offload_clock.snapshot(),
            onboard_copies: self.onboard_clock.snapshot(),
            queued_jobs: queue.jobs as u64,
            queued_blocks: queue.blocks as u64,
            running_jobs: queue.running as u64,
        }
    }
}

/// The job queue's depth at one moment.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct QueueDepth {
    pub(crate) jobs: usize,
    pub(crate) blocks: usize,
    pub(crate) running: usize,
}

/// One tier's counters since the stack was built.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct TierStats {
    /// Which tier.
    pub tier: TierId,
    /// Blocks offloaded into this tier (copied and registered, or stored).
    pub offloaded: u64,
    /// Their bytes.
    pub offloaded_bytes: u64,
    /// Blocks onboarded from this tier into G1 (for G1: none; G1 hits are `lookup_hits`).
    pub onboarded: u64,
    /// Their bytes.
    pub onboarded_bytes: u64,
    /// Blocks lost at this tier: an offload copy into it failed, or a copy out of it failed
    /// or found the block corrupt (then invalidated here).
    pub lost: u64,
    /// Blocks that lookups planned to take from this tier.
    pub lookup_hits: u64,
    /// Offloads into this tier skipped, indexed like [`Skip::ALL`]; see
    /// [`skipped`](Self::skipped).
    pub skipped: [u64; SKIPS],
}

impl TierStats {
    /// Offloads into this tier skipped for `why`.
    pub fn skipped(&self, why: Skip) -> u64 {
        self.skipped[why.slot()]
    }

    /// Offloads skipped for any reason.
    pub fn skipped_total(&self) -> u64 {
        self.skipped.iter().sum()
    }
}

/// A snapshot of the stack's counters and queue.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StackStats {
    /// G1, G2, then the store tiers; index with [`TierId::index`] or [`tier`](Self::tier).
    pub tiers: Vec<TierStats>,
    /// Lookups.
    pub lookups: u64,
    /// Onboards committed (including ones needing no copy).
    pub onboards: u64,
    /// Onboards cancelled by dropping their `Pending` before completion.
    pub cancelled: u64,
    /// Onboards refused for want of free G1 blocks (back-pressure).
    pub not_now: u64,
    /// Reclaim runs (write-back, or write-through's free reserve). A run that goes round
    /// again, for an allocation that asked while it ran, counts again.
    pub reclaim_runs: u64,
    /// Write-through with a free reserve: G1 blocks that allocations evicted themselves
    /// because the reserve had not kept up (the reclaimer was behind, or an allocation took
    /// more than the free blocks). Rising steadily: raise the watermarks. (Write-back counts
    /// the same event per tier as `skipped{reason="reclaim_behind"}`.)
    pub reserve_behind: u64,
    /// Jobs that panicked on a worker (a store tier that panicked, say). The worker carries
    /// on and the job's blocks go back; an onboard's prefix ends `Aborted` there. Any rise
    /// is a bug to report, with the worker's log line.
    pub panicked_jobs: u64,
    /// G1 → G2 copies (offloads): bytes and busy time, whose ratio is the offload bandwidth.
    pub offload_copies: CopyStats,
    /// G2 → G1 copies (onboards).
    pub onboard_copies: CopyStats,
    /// Jobs waiting in the queue.
    pub queued_jobs: u64,
    /// Blocks held by offload jobs waiting in the queue.
    pub queued_blocks: u64,
    /// Jobs running on workers.
    pub running_jobs: u64,
}

impl StackStats {
    /// The counters of `tier`; `None` for a store index beyond the stack's store tiers.
    pub fn tier(&self, tier: TierId) -> Option<&TierStats> {
        self.tiers.get(tier.index())
    }
}

/// Renders the stack's counters for Prometheus. Register it into a server's registry with
/// [`Registry::register_collector`](prometheus_client::registry::Registry::register_collector);
/// every family has one `HELP`/`TYPE` and a `tier` label. It holds the stack weakly: once
/// the stack is dropped it reports zeros.
#[derive(Clone)]
pub struct StackCollector {
    pub(crate) inner: Arc<dyn Fn() -> StackStats + Send + Sync>,
}

impl fmt::Debug for StackCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StackCollector").finish_non_exhaustive()
    }
}

impl Collector for StackCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let s = (self.inner)();
        let tiers: Vec<(String, &TierStats)> =
            s.tiers.iter().map(|t| (t.tier.label(), t)).collect();
        type Field = fn(&TierStats) -> u64;
        let families: [(&str, &str, Field); 6] = [
            (
                "kvbm_tier_offloaded_blocks",
                "Blocks offloaded into the tier.",
                |t| t.offloaded,
            ),
            (
                "kvbm_tier_offloaded_bytes",
                "Bytes offloaded into the tier.",
                |t| t.offloaded_bytes,
            ),
            (
                "kvbm_tier_onboarded_blocks",
                "Blocks onboarded from the tier into G1.",
                |t| t.onboarded,
            ),
            (
                "kvbm_tier_onboarded_bytes",
                "Bytes onboarded from the tier into G1.",
                |t| t.onboarded_bytes,
            ),
            (
                "kvbm_tier_lost_blocks",
                "Blocks lost at the tier: a failed copy or a corrupt block.",
                |t| t.lost,
            ),
            (
                "kvbm_tier_lookup_hit_blocks",
                "Blocks that lookups planned to take from the tier.",
                |t| t.lookup_hits,
            ),
        ];
        for (name, help, field) in families {
            let counter = ConstCounter::new(0u64);
            let mut family = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
            for (label, t) in &tiers {
                let labels = [("tier", label.as_str())];
                ConstCounter::new(field(t)).encode(family.encode_family(&labels)?)?;
            }
        }
        let counter = ConstCounter::new(0u64);
        let mut family = encoder.encode_descriptor(
            "kvbm_tier_skipped_blocks",
            "Offloads into the tier skipped (back-pressure or policy), by reason.",
            None,
            counter.metric_type(),
        )?;
        for (label, t) in &tiers {
            for why in Skip::ALL {
                let labels = [("tier", label.as_str()), ("reason", why.name())];
                ConstCounter::new(t.skipped(why)).encode(family.encode_family(&labels)?)?;
            }
        }
        let stack_counters: [(&str, &str, u64); 7] = [
            ("kvbm_stack_lookups", "Lookups.", s.lookups),
            ("kvbm_stack_onboards", "Onboards committed.", s.onboards),
            (
                "kvbm_stack_onboards_cancelled",
                "Onboards cancelled before completion.",
                s.cancelled,
            ),
            (
                "kvbm_stack_onboards_not_now",
                "Onboards refused for want of free G1 blocks.",
                s.not_now,
            ),
            (
                "kvbm_stack_reclaim_runs",
                "Reclaim runs (write-back, or write-through's free reserve); a run that goes round again for a request made meanwhile counts again.",
                s.reclaim_runs,
            ),
            (
                "kvbm_stack_reserve_behind_blocks",
                "G1 blocks allocations evicted themselves, the free reserve being behind.",
                s.reserve_behind,
            ),
            (
                "kvbm_stack_panicked_jobs",
                "Jobs that panicked on a worker (their blocks went back).",
                s.panicked_jobs,
            ),
        ];
        for (name, help, value) in stack_counters {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(
                name,
                help,
                None,
                counter.metric_type(),
            )?)?;
        }
        let directions = [("offload", s.offload_copies), ("onboard", s.onboard_copies)];
        let copy_families: [CopyFamily; 2] = [
            (
                "kvbm_stack_copy_bytes",
                "Bytes copied between G1 and G2, by direction (offload: G1 to G2).",
                |c| c.bytes,
            ),
            (
                "kvbm_stack_copy_busy_nanoseconds",
                "Time at least one copy batch of the direction was in flight.",
                |c| c.busy_nanos,
            ),
        ];
        for (name, help, field) in copy_families {
            let counter = ConstCounter::new(0u64);
            let mut family = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
            for (direction, c) in &directions {
                let labels = [("direction", *direction)];
                ConstCounter::new(field(c)).encode(family.encode_family(&labels)?)?;
            }
        }
        let gauges: [(&str, &str, u64); 3] = [
            (
                "kvbm_stack_queued_jobs",
                "Jobs waiting in the queue.",
                s.queued_jobs,
            ),
            (
                "kvbm_stack_queued_blocks",
                "Blocks held by offload jobs waiting in the queue.",
                s.queued_blocks,
            ),
            (
                "kvbm_stack_running_jobs",
                "Jobs running on workers.",
                s.running_jobs,
            ),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(value as i64);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        Ok(())
    }
}
