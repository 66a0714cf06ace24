//! Lock-free metrics: counters added in bulk (once per call, not once per block) and gauges
//! stored when the store lock is released. Reading them never takes the store lock.
//!
//! Exposition goes through the official `prometheus-client` crate: a [`MetricsCollector`]
//! renders any number of managers into one scrape (one `HELP`/`TYPE` per family, one series
//! per manager told apart by its `tier` label and any labels of yours), and a server
//! registers it into its own `prometheus_client::registry::Registry`.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

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
/// assert!(m.metrics().render_prometheus().contains("kvbm_pool_blocks{tier=\"device\",state=\"active\"} 1"));
/// # drop(block);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// Cloning gives another handle to the same counters (for a [`MetricsCollector`] that
/// outlives the borrow).
#[derive(Debug, Clone)]
pub struct BlockMetrics {
    inner: Arc<Counters>,
}

#[derive(Debug)]
struct Counters {
    tier: &'static str,
    allocations_from_reset: AtomicU64,
    allocations_from_eviction: AtomicU64,
    removed_evicted: AtomicU64,
    removed_reset: AtomicU64,
    removed_demoted: AtomicU64,
    removed_invalidated: AtomicU64,
    removed_released: AtomicU64,
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
    /// The gauges' sequence lock: odd while `set_gauges` writes them (its one writer holds
    /// the store lock), so a reader sees the five of one release, never a mix of two.
    gauge_seq: AtomicU64,
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
    /// Registered blocks removed by `invalidate_blocks` or `purge_blocks`.
    pub removed_invalidated: u64,
    /// "Do not cache" blocks reset when their last owner released them.
    pub removed_released: u64,
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
        self.removed_evicted
            + self.removed_reset
            + self.removed_demoted
            + self.removed_invalidated
            + self.removed_released
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
        let inner = Counters {
            tier,
            allocations_from_reset: z(),
            allocations_from_eviction: z(),
            removed_evicted: z(),
            removed_reset: z(),
            removed_demoted: z(),
            removed_invalidated: z(),
            removed_released: z(),
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
            gauge_seq: z(),
        };
        Self {
            inner: Arc::new(inner),
        }
    }

    pub(crate) fn add_allocations(&self, from_reset: usize, from_eviction: usize) {
        add(&self.inner.allocations_from_reset, from_reset);
        add(&self.inner.allocations_from_eviction, from_eviction);
    }

    pub(crate) fn add_removals(&self, reason: RemovalReason, n: usize) {
        let counter = match reason {
            RemovalReason::Evicted => &self.inner.removed_evicted,
            RemovalReason::Reset => &self.inner.removed_reset,
            RemovalReason::Demoted => &self.inner.removed_demoted,
            RemovalReason::Invalidated => &self.inner.removed_invalidated,
            RemovalReason::Released => &self.inner.removed_released,
        };
        add(counter, n);
    }

    pub(crate) fn add_registrations(&self, total: usize, dedups: usize, duplicates: usize) {
        add(&self.inner.registrations, total);
        add(&self.inner.dedups, dedups);
        add(&self.inner.duplicates, duplicates);
    }

    pub(crate) fn add_stagings(&self, n: usize) {
        add(&self.inner.stagings, n);
    }

    pub(crate) fn add_match(&self, requested: usize, returned: usize) {
        add(&self.inner.match_requested, requested);
        add(&self.inner.match_returned, returned);
    }

    pub(crate) fn add_scan(&self, requested: usize, returned: usize) {
        add(&self.inner.scan_requested, requested);
        add(&self.inner.scan_returned, returned);
    }

    pub(crate) fn add_events_dropped(&self, n: u64) {
        self.inner.events_dropped.fetch_add(n, Ordering::Relaxed);
    }

    /// Called with the store lock held (one writer at a time).
    pub(crate) fn set_gauges(&self, g: Gauges) {
        let seq = self.inner.gauge_seq.load(Ordering::Relaxed);
        self.inner
            .gauge_seq
            .store(seq.wrapping_add(1), Ordering::Relaxed);
        std::sync::atomic::fence(Ordering::Release);
        let set = |a: &AtomicU64, v: usize| a.store(v as u64, Ordering::Relaxed);
        set(&self.inner.reset_blocks, g.reset);
        set(&self.inner.inactive_blocks, g.inactive);
        set(&self.inner.mutable_blocks, g.mutable);
        set(&self.inner.active_blocks, g.active);
        set(&self.inner.pinned_blocks, g.pinned);
        self.inner
            .gauge_seq
            .store(seq.wrapping_add(2), Ordering::Release);
    }

    /// The five gauges of one release of the store lock: reset, inactive, mutable, active,
    /// pinned (retried while a writer is between them).
    fn gauges(&self) -> [u64; 5] {
        let i = &self.inner;
        loop {
            let before = i.gauge_seq.load(Ordering::Acquire);
            if before % 2 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
            let g = [
                r(&i.reset_blocks),
                r(&i.inactive_blocks),
                r(&i.mutable_blocks),
                r(&i.active_blocks),
                r(&i.pinned_blocks),
            ];
            std::sync::atomic::fence(Ordering::Acquire);
            if i.gauge_seq.load(Ordering::Relaxed) == before {
                return g;
            }
        }
    }

    /// The manager's tier name (the default `tier` label).
    pub fn pool(&self) -> &'static str {
        self.inner.tier
    }

    /// Blocks in the reset pool and in the inactive pool, as of the last released store
    /// lock: what an allocation could take right now without waiting for a release. Two
    /// loads (a [`snapshot`](Self::snapshot) reads every metric), for a scheduler's
    /// per-request "is there room?" check.
    ///
    /// ```
    /// use kvbm_logical::{BlockManager, Device};
    /// let m = BlockManager::<Device>::builder().block_count(4).block_size(16).build()?;
    /// let held = m.allocate_blocks(1)?;
    /// assert_eq!(m.metrics().free_blocks(), (3, 0));
    /// # drop(held);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn free_blocks(&self) -> (u64, u64) {
        let [reset, inactive, ..] = self.gauges();
        (reset, inactive)
    }

    /// Every metric, read without the store lock (each value is exact; the gauges are those
    /// of the last released lock, so they add up to the total).
    pub fn snapshot(&self) -> MetricsSnapshot {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let [reset, inactive, mutable, active, pinned] = self.gauges();
        MetricsSnapshot {
            allocations_from_reset: r(&self.inner.allocations_from_reset),
            allocations_from_eviction: r(&self.inner.allocations_from_eviction),
            removed_evicted: r(&self.inner.removed_evicted),
            removed_reset: r(&self.inner.removed_reset),
            removed_demoted: r(&self.inner.removed_demoted),
            removed_invalidated: r(&self.inner.removed_invalidated),
            removed_released: r(&self.inner.removed_released),
            registrations: r(&self.inner.registrations),
            dedups: r(&self.inner.dedups),
            duplicates: r(&self.inner.duplicates),
            stagings: r(&self.inner.stagings),
            match_requested: r(&self.inner.match_requested),
            match_returned: r(&self.inner.match_returned),
            scan_requested: r(&self.inner.scan_requested),
            scan_returned: r(&self.inner.scan_returned),
            events_dropped: r(&self.inner.events_dropped),
            reset_blocks: reset,
            inactive_blocks: inactive,
            mutable_blocks: mutable,
            active_blocks: active,
            pinned_blocks: pinned,
        }
    }

    /// The metrics in Prometheus text exposition format (OpenMetrics, as `prometheus-client`
    /// writes it), every series labelled `tier="<tier>"`: a convenience for a single manager.
    /// A server with several managers or its own labels registers a [`MetricsCollector`]
    /// into its registry instead, so that each family appears once.
    pub fn render_prometheus(&self) -> String {
        MetricsCollector::new().with(self).render()
    }
}

/// `(label name, label value)` of one series, and how to read it.
type Series = (&'static str, &'static str, fn(&MetricsSnapshot) -> u64);

/// Counters of one manager, as the collector reads them.
struct Family {
    name: &'static str,
    help: &'static str,
    gauge: bool,
    /// `(label name, label value)` of each series, and how to read it.
    series: &'static [Series],
}

/// Every family, in exposition order. Counter names omit the `_total` suffix, which the
/// encoder appends.
const FAMILIES: &[Family] = &[
    Family {
        name: "kvbm_block_allocations",
        help: "Blocks allocated, by source.",
        gauge: false,
        series: &[
            ("source", "reset", |s| s.allocations_from_reset),
            ("source", "eviction", |s| s.allocations_from_eviction),
        ],
    },
    Family {
        name: "kvbm_block_removals",
        help: "Registered blocks removed from the cache, by reason.",
        gauge: false,
        series: &[
            ("reason", "evicted", |s| s.removed_evicted),
            ("reason", "reset", |s| s.removed_reset),
            ("reason", "demoted", |s| s.removed_demoted),
            ("reason", "invalidated", |s| s.removed_invalidated),
            ("reason", "released", |s| s.removed_released),
        ],
    },
    Family {
        name: "kvbm_block_registrations",
        help: "Blocks passed to registration.",
        gauge: false,
        series: &[("", "", |s| s.registrations)],
    },
    Family {
        name: "kvbm_block_dedups",
        help: "Registrations answered with the already registered block (policy Reject).",
        gauge: false,
        series: &[("", "", |s| s.dedups)],
    },
    Family {
        name: "kvbm_block_duplicates",
        help: "Registrations kept as duplicates (policy Allow).",
        gauge: false,
        series: &[("", "", |s| s.duplicates)],
    },
    Family {
        name: "kvbm_block_stagings",
        help: "Blocks staged with a sequence hash.",
        gauge: false,
        series: &[("", "", |s| s.stagings)],
    },
    Family {
        name: "kvbm_lookup_hashes",
        help: "Hashes looked up, by operation.",
        gauge: false,
        series: &[
            ("op", "match", |s| s.match_requested),
            ("op", "scan", |s| s.scan_requested),
        ],
    },
    Family {
        name: "kvbm_lookup_hits",
        help: "Blocks returned by lookups, by operation.",
        gauge: false,
        series: &[
            ("op", "match", |s| s.match_returned),
            ("op", "scan", |s| s.scan_returned),
        ],
    },
    Family {
        name: "kvbm_events_dropped",
        help: "Events not delivered because a subscriber's channel was full.",
        gauge: false,
        series: &[("", "", |s| s.events_dropped)],
    },
    Family {
        name: "kvbm_pool_blocks",
        help: "Blocks by state (pinned blocks are also counted as active).",
        gauge: true,
        series: &[
            ("state", "reset", |s| s.reset_blocks),
            ("state", "inactive", |s| s.inactive_blocks),
            ("state", "mutable", |s| s.mutable_blocks),
            ("state", "active", |s| s.active_blocks),
            ("state", "pinned", |s| s.pinned_blocks),
        ],
    },
];

/// One manager's metrics and the labels of its series.
#[derive(Clone, Debug)]
struct Source {
    metrics: BlockMetrics,
    labels: Vec<(String, String)>,
}

/// A `prometheus-client` [`Collector`] over the metrics of any number of managers: each family
/// is written once (one `HELP` and `TYPE`), with one series per manager and label value.
/// Every series has a `tier` label (the manager's tier name unless you give one, e.g. the
/// tier stack's `"G1"`) plus the labels you add; a server's own labels (model, instance)
/// come from the registry it registers the collector in.
///
/// Families (counters get the `_total` suffix in the text): `kvbm_block_allocations`
/// (`source`), `kvbm_block_removals` (`reason`), `kvbm_block_registrations`,
/// `kvbm_block_dedups`, `kvbm_block_duplicates`, `kvbm_block_stagings`,
/// `kvbm_lookup_hashes` and `kvbm_lookup_hits` (`op`), `kvbm_events_dropped`, and the gauge
/// `kvbm_pool_blocks` (`state`). The tier stack's collector uses the same `tier` label.
///
/// ```
/// use kvbm_logical::{BlockManager, Device, Host, MetricsCollector};
/// use prometheus_client::registry::Registry;
///
/// let g1 = BlockManager::<Device>::builder().block_count(8).block_size(16).build()?;
/// let g2 = BlockManager::<Host>::builder().block_count(32).block_size(16).build()?;
/// let collector = MetricsCollector::new()
///     .with_labels(g1.metrics(), [("tier", "G1")])
///     .with_labels(g2.metrics(), [("tier", "G2")]);
///
/// // The server's registry, with its own labels.
/// let mut registry = Registry::default();
/// registry
///     .sub_registry_with_label(("model".into(), "llama".into()))
///     .register_collector(Box::new(collector));
/// let mut text = String::new();
/// prometheus_client::encoding::text::encode(&mut text, &registry)?;
/// assert_eq!(text.matches("# TYPE kvbm_pool_blocks gauge").count(), 1);
/// assert!(text.contains(r#"kvbm_pool_blocks{model="llama",tier="G2",state="reset"} 32"#));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct MetricsCollector {
    sources: Vec<Source>,
}

impl MetricsCollector {
    /// A collector over no manager yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a manager's metrics, labelled `tier="<its tier name>"`.
    pub fn with(self, metrics: &BlockMetrics) -> Self {
        self.with_labels(metrics, std::iter::empty::<(String, String)>())
    }

    /// Adds a manager's metrics with these labels on each of its series. Without a `tier`
    /// label among them, `tier="<its tier name>"` comes first. Two managers with identical
    /// labels would produce duplicate series: give them distinct ones.
    pub fn with_labels<K: Into<String>, V: Into<String>>(
        mut self,
        metrics: &BlockMetrics,
        labels: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        let mut labels: Vec<(String, String)> = labels
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        if !labels.iter().any(|(k, _)| k == "tier") {
            labels.insert(0, ("tier".to_owned(), metrics.pool().to_owned()));
        }
        self.sources.push(Source {
            metrics: metrics.clone(),
            labels,
        });
        self
    }

    /// Managers added.
    pub fn len(&self) -> usize {
        self.sources.len()
    }

    /// Whether no manager was added.
    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }

    /// The exposition of this collector alone, through a registry of its own (OpenMetrics
    /// text, ending in `# EOF`).
    pub fn render(&self) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(self.clone()));
        let mut out = String::with_capacity(4096);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

impl Collector for MetricsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let snapshots: Vec<MetricsSnapshot> =
            self.sources.iter().map(|s| s.metrics.snapshot()).collect();
        for family in FAMILIES {
            let kind = if family.gauge {
                ConstGauge::new(0i64).metric_type()
            } else {
                ConstCounter::new(0u64).metric_type()
            };
            let mut metric = encoder.encode_descriptor(family.name, family.help, None, kind)?;
            for (source, snapshot) in self.sources.iter().zip(&snapshots) {
                for &(key, value, read) in family.series {
                    let mut labels: Vec<(&str, &str)> = source
                        .labels
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect();
                    if !key.is_empty() {
                        labels.push((key, value));
                    }
                    let reading = read(snapshot);
                    let series = metric.encode_family(&labels)?;
                    if family.gauge {
                        ConstGauge::new(i64::try_from(reading).unwrap_or(i64::MAX))
                            .encode(series)?;
                    } else {
                        ConstCounter::new(reading).encode(series)?;
                    }
                }
            }
        }
        Ok(())
    }
}
