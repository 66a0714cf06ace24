//! Lock-free metrics: counters added in bulk (once per call, not once per block) and gauges
//! stored when the store lock is released. Reading them never takes the store lock.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::events::RemovalReason;

/// A manager's counters and gauges; see [`BlockManager::metrics`](crate::BlockManager::metrics).
///
/// ```
/// use kvbm_logical::{BlockManager, Device, SequenceHash};
/// let m = BlockManager::<Device>::builder().block_count(8).block_size(16).build()?;
/// let block = m.allocate_blocks(1)?.pop().unwrap().stage(SequenceHash::new(1), 16)?;
/// let block = m.register_block(block)?;
/// let s = m.metrics().snapshot();
/// assert_eq!((s.allocations(), s.stagings, s.registrations), (1, 1, 1));
/// assert_eq!((s.reset_blocks, s.active_blocks), (7, 1));
/// assert!(m.metrics().render_prometheus().contains("kvbm_pool_blocks{pool=\"device\",state=\"active\"} 1"));
/// # drop(block);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct BlockMetrics {
    tier: &'static str,
    allocations_from_reset: AtomicU64,
    allocations_from_eviction: AtomicU64,
    removed_evicted: AtomicU64,
    removed_reset: AtomicU64,
    removed_demoted: AtomicU64,
    removed_invalidated: AtomicU64,
    registrations: AtomicU64,
    dedups: AtomicU64,
    duplicates: AtomicU64,
    stagings: AtomicU64,
    match_requested: AtomicU64,
    match_returned: AtomicU64,
    scan_requested: AtomicU64,
    scan_returned: AtomicU64,
    events_dropped: AtomicU64,
    reset_blocks: AtomicU64,
    inactive_blocks: AtomicU64,
    mutable_blocks: AtomicU64,
    active_blocks: AtomicU64,
    pinned_blocks: AtomicU64,
}

/// A plain copy of every metric.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct MetricsSnapshot {
    /// Blocks allocated from the reset pool.
    pub allocations_from_reset: u64,
    /// Blocks allocated by evicting an inactive block.
    pub allocations_from_eviction: u64,
    /// Registered blocks removed by eviction.
    pub removed_evicted: u64,
    /// Registered blocks removed by `reset_inactive_pool`.
    pub removed_reset: u64,
    /// Registered blocks demoted to a lower tier.
    pub removed_demoted: u64,
    /// Registered blocks removed by `invalidate_blocks`.
    pub removed_invalidated: u64,
    /// Blocks passed to registration.
    pub registrations: u64,
    /// Registrations answered with the existing block (policy `Reject`).
    pub dedups: u64,
    /// Registrations kept as duplicates (policy `Allow`).
    pub duplicates: u64,
    /// Blocks staged (counted when the staged block is registered, reset or dropped).
    pub stagings: u64,
    /// Hashes asked of `match_blocks`.
    pub match_requested: u64,
    /// Blocks `match_blocks` returned.
    pub match_returned: u64,
    /// Hashes asked of `scan_matches`.
    pub scan_requested: u64,
    /// Blocks `scan_matches` returned.
    pub scan_returned: u64,
    /// Events not delivered because a subscriber's channel was full.
    pub events_dropped: u64,
    /// Gauge: blocks in the reset pool.
    pub reset_blocks: u64,
    /// Gauge: blocks in the inactive pool.
    pub inactive_blocks: u64,
    /// Gauge: blocks held by `MutableBlock`/`CompleteBlock` handles.
    pub mutable_blocks: u64,
    /// Gauge: registered blocks held by `ImmutableBlock` handles or pins.
    pub active_blocks: u64,
    /// Gauge: pinned blocks.
    pub pinned_blocks: u64,
}

impl MetricsSnapshot {
    /// Blocks allocated, from either source.
    pub fn allocations(&self) -> u64 {
        self.allocations_from_reset + self.allocations_from_eviction
    }

    /// Registered blocks removed, for any reason.
    pub fn removals(&self) -> u64 {
        self.removed_evicted + self.removed_reset + self.removed_demoted + self.removed_invalidated
    }
}

fn add(counter: &AtomicU64, n: usize) {
    if n > 0 {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// The gauges, as the store counts them.
pub(crate) struct Gauges {
    pub(crate) reset: usize,
    pub(crate) inactive: usize,
    pub(crate) mutable: usize,
    pub(crate) active: usize,
    pub(crate) pinned: usize,
}

impl BlockMetrics {
    pub(crate) fn new(tier: &'static str, total: usize) -> Self {
        let z = || AtomicU64::new(0);
        Self {
            tier,
            allocations_from_reset: z(),
            allocations_from_eviction: z(),
            removed_evicted: z(),
            removed_reset: z(),
            removed_demoted: z(),
            removed_invalidated: z(),
            registrations: z(),
            dedups: z(),
            duplicates: z(),
            stagings: z(),
            match_requested: z(),
            match_returned: z(),
            scan_requested: z(),
            scan_returned: z(),
            events_dropped: z(),
            reset_blocks: AtomicU64::new(total as u64),
            inactive_blocks: z(),
            mutable_blocks: z(),
            active_blocks: z(),
            pinned_blocks: z(),
        }
    }

    pub(crate) fn add_allocations(&self, from_reset: usize, from_eviction: usize) {
        add(&self.allocations_from_reset, from_reset);
        add(&self.allocations_from_eviction, from_eviction);
    }

    pub(crate) fn add_removals(&self, reason: RemovalReason, n: usize) {
        let counter = match reason {
            RemovalReason::Evicted => &self.removed_evicted,
            RemovalReason::Reset => &self.removed_reset,
            RemovalReason::Demoted => &self.removed_demoted,
            RemovalReason::Invalidated => &self.removed_invalidated,
        };
        add(counter, n);
    }

    pub(crate) fn add_registrations(&self, total: usize, dedups: usize, duplicates: usize) {
        add(&self.registrations, total);
        add(&self.dedups, dedups);
        add(&self.duplicates, duplicates);
    }

    pub(crate) fn add_stagings(&self, n: usize) {
        add(&self.stagings, n);
    }

    pub(crate) fn add_match(&self, requested: usize, returned: usize) {
        add(&self.match_requested, requested);
        add(&self.match_returned, returned);
    }

    pub(crate) fn add_scan(&self, requested: usize, returned: usize) {
        add(&self.scan_requested, requested);
        add(&self.scan_returned, returned);
    }

    pub(crate) fn add_events_dropped(&self, n: u64) {
        self.events_dropped.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn set_gauges(&self, g: Gauges) {
        let set = |a: &AtomicU64, v: usize| a.store(v as u64, Ordering::Relaxed);
        set(&self.reset_blocks, g.reset);
        set(&self.inactive_blocks, g.inactive);
        set(&self.mutable_blocks, g.mutable);
        set(&self.active_blocks, g.active);
        set(&self.pinned_blocks, g.pinned);
    }

    /// The tier name used as the `pool` label.
    pub fn pool(&self) -> &'static str {
        self.tier
    }

    /// Every metric, read without the store lock (each value is exact; the gauges are those
    /// of the last released lock, so they add up to the total).
    pub fn snapshot(&self) -> MetricsSnapshot {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        MetricsSnapshot {
            allocations_from_reset: r(&self.allocations_from_reset),
            allocations_from_eviction: r(&self.allocations_from_eviction),
            removed_evicted: r(&self.removed_evicted),
            removed_reset: r(&self.removed_reset),
            removed_demoted: r(&self.removed_demoted),
            removed_invalidated: r(&self.removed_invalidated),
            registrations: r(&self.registrations),
            dedups: r(&self.dedups),
            duplicates: r(&self.duplicates),
            stagings: r(&self.stagings),
            match_requested: r(&self.match_requested),
            match_returned: r(&self.match_returned),
            scan_requested: r(&self.scan_requested),
            scan_returned: r(&self.scan_returned),
            events_dropped: r(&self.events_dropped),
            reset_blocks: r(&self.reset_blocks),
            inactive_blocks: r(&self.inactive_blocks),
            mutable_blocks: r(&self.mutable_blocks),
            active_blocks: r(&self.active_blocks),
            pinned_blocks: r(&self.pinned_blocks),
        }
    }

    /// The metrics in Prometheus text exposition format (version 0.0.4), every series
    /// labelled `pool="<tier>"`.
    pub fn render_prometheus(&self) -> String {
        let s = self.snapshot();
        let pool = self.tier;
        let mut out = String::with_capacity(2048);
        let mut family = |name: &str, kind: &str, help: &str, series: &[(&str, u64)]| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, value) in series {
                let sep = if labels.is_empty() { "" } else { "," };
                let _ = writeln!(out, "{name}{{pool=\"{pool}\"{sep}{labels}}} {value}");
            }
        };
        family(
            "kvbm_block_allocations_total",
            "counter",
            "Blocks allocated, by source.",
            &[
                ("source=\"reset\"", s.allocations_from_reset),
                ("source=\"eviction\"", s.allocations_from_eviction),
            ],
        );
        family(
            "kvbm_block_removals_total",
            "counter",
            "Registered blocks removed from the cache, by reason.",
            &[
                ("reason=\"evicted\"", s.removed_evicted),
                ("reason=\"reset\"", s.removed_reset),
                ("reason=\"demoted\"", s.removed_demoted),
                ("reason=\"invalidated\"", s.removed_invalidated),
            ],
        );
        family(
            "kvbm_block_registrations_total",
            "counter",
            "Blocks passed to registration.",
            &[("", s.registrations)],
        );
        family(
            "kvbm_block_dedups_total",
            "counter",
            "Registrations answered with the already registered block (policy Reject).",
            &[("", s.dedups)],
        );
        family(
            "kvbm_block_duplicates_total",
            "counter",
            "Registrations kept as duplicates (policy Allow).",
            &[("", s.duplicates)],
        );
        family(
            "kvbm_block_stagings_total",
            "counter",
            "Blocks staged with a sequence hash.",
            &[("", s.stagings)],
        );
        family(
            "kvbm_lookup_hashes_total",
            "counter",
            "Hashes looked up, by operation.",
            &[
                ("op=\"match\"", s.match_requested),
                ("op=\"scan\"", s.scan_requested),
            ],
        );
        family(
            "kvbm_lookup_hits_total",
            "counter",
            "Blocks returned by lookups, by operation.",
            &[
                ("op=\"match\"", s.match_returned),
                ("op=\"scan\"", s.scan_returned),
            ],
        );
        family(
            "kvbm_events_dropped_total",
            "counter",
            "Events not delivered because a subscriber's channel was full.",
            &[("", s.events_dropped)],
        );
        family(
            "kvbm_pool_blocks",
            "gauge",
            "Blocks by state (pinned blocks are also counted as active).",
            &[
                ("state=\"reset\"", s.reset_blocks),
                ("state=\"inactive\"", s.inactive_blocks),
                ("state=\"mutable\"", s.mutable_blocks),
                ("state=\"active\"", s.active_blocks),
                ("state=\"pinned\"", s.pinned_blocks),
            ],
        );
        out
    }
}
