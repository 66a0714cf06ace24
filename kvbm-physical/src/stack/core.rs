//! The [`TierStack`] itself: the scheduler-facing calls (allocate, register, lookup,
//! onboard), the workers' loop, flush and shutdown.

use parking_lot::Mutex;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use kvbm_logical::{
    AllocationError, CompleteBlock, Device, Host, ImmutableBlock, MutableBlock, RegisterError,
    SequenceHash,
};

use crate::cuda::CudaEvent;
use crate::transfer::TransferEngine;

use super::config::{Admission, StackError, TierStackBuilder, Watermarks, WriteMode};
use super::offload::{Held, OffloadItem, OffloadJob};
use super::queue::{Job, JobQueue};
use super::slot::{SlotEvents, SlotTier, SlotView, StoreSlot, StoreView};
use super::stats::{Counters, Skip, StackCollector, StackStats, TierId};

/// Ordering against the engine's CUDA stream.
///
/// - **Registration** ([`TierStack::register`]) takes one: the offload copies of the blocks
///   may read them only after it. [`EngineSync::Event`] is an event the engine recorded on
///   its stream after the kernels that wrote the blocks ([`CudaEvent::record`] /
///   [`record_raw`](CudaEvent::record_raw), or an engine event adopted with
///   [`CudaEvent::from_raw`]); the worker makes kvbm's copy stream wait for it
///   (`cuStreamWaitEvent`, [`CopyOptions::wait_for`](crate::CopyOptions::wait_for)) — no
///   host synchronisation anywhere, and the scheduler thread does not wait at all. Under
///   write-back the event is kept with the blocks' G1 slots until the reclaimer copies them.
/// - **A completed onboard** ([`Onboarded::sync`](super::Onboarded::sync)) carries the
///   completion event of its copies into G1, which the engine's stream waits for before its
///   kernels read the blocks ([`CudaEvent::wait_on`] / [`wait_on_raw`](CudaEvent::wait_on_raw)).
///   The stack registers onboarded blocks in G1 only once their copies have landed (a failed
///   copy must never register a block, and a registered block is every request's G1 hit),
///   so by then the event is complete and waiting on it costs the GPU nothing; it is the
///   contract that keeps the engine correct whatever the copy strategy.
///
/// [`EngineSync::Ready`] means there is nothing to wait for: the bytes are complete now. It is
/// what a CPU caller passes and what an onboard on the CPU (host copies, which complete
/// inside the call) or one with only G1 hits hands back.
///
/// ```
/// use kvbm_physical::stack::EngineSync;
/// assert_eq!(EngineSync::default(), EngineSync::Ready);
/// assert!(EngineSync::Ready.event().is_none() && EngineSync::Ready.is_complete());
/// if let Ok(gpu) = kvbm_physical::CudaDevice::open(0) {
///     // The engine's stream (here the legacy default one) after the kernels that wrote KV.
///     // SAFETY: null names the legacy default stream, which always exists.
///     let written = unsafe { kvbm_physical::CudaEvent::record_raw(&gpu, std::ptr::null_mut()) }?;
///     let sync = EngineSync::Event(written);
///     assert!(sync.event().is_some());
/// }
/// # Ok::<(), kvbm_physical::StorageError>(())
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum EngineSync {
    /// Nothing to wait on.
    #[default]
    Ready,
    /// A CUDA event: at registration, recorded on the engine's stream after the writes;
    /// from an onboard, the completion of its copies.
    Event(CudaEvent),
}

impl EngineSync {
    /// The event, if there is one.
    pub fn event(&self) -> Option<&CudaEvent> {
        match self {
            EngineSync::Ready => None,
            EngineSync::Event(e) => Some(e),
        }
    }

    /// Whether the work it stands for is done (never blocks): `Ready`, or a complete event.
    pub fn is_complete(&self) -> bool {
        self.event().is_none_or(CudaEvent::is_complete)
    }
}

static NEXT_STACK: AtomicU64 = AtomicU64::new(1);

/// What the workers and the scheduler-facing calls share.
pub(crate) struct Inner {
    pub(crate) id: u64,
    pub(crate) g1: SlotTier<Device>,
    pub(crate) g2: SlotTier<Host>,
    /// Write-back: the engine's event per G1 slot, until the reclaimer copies it.
    pub(crate) g1_events: SlotEvents,
    pub(crate) stores: Vec<StoreSlot>,
    pub(crate) engine: TransferEngine,
    pub(crate) mode: WriteMode,
    /// The free G1 blocks the reclaimer keeps: write-back's watermarks, or write-through's
    /// reserve; `None`: no reclaimer.
    pub(crate) watermarks: Option<Watermarks>,
    pub(crate) g2_admission: Admission,
    pub(crate) reclaim_batch: usize,
    pub(crate) queue: JobQueue,
    pub(crate) counters: Counters,
    /// Uses of G2 blocks not yet applied to G2's eviction order (see [`TouchLog`]).
    pub(crate) g2_touches: TouchLog,
    /// One reclaim run at a time, and none requested meanwhile lost.
    pub(crate) reclaiming: super::rerun::Rerun,
}

/// Uses of G2 blocks (the G2 copies of committed G1 hits) logged on the scheduler's thread
/// and applied to G2's eviction order by the next job, before it can evict anything from G2
/// (G2 allocates only inside jobs), or by `flush`. Keeps G2's order following use, as a
/// synchronous touch would, without a pass over G2's structures per request on the
/// scheduler's thread.
///
/// Two locks: the log itself, which the scheduler's [`log`](Self::log) holds only to append,
/// and `applying`, which serializes the appliers. An applier swaps the log out and touches G2
/// outside the log's lock, so the scheduler never waits behind a pass over G2; a job that
/// starts meanwhile waits on `applying` for the touches logged before it.
#[derive(Default)]
pub(crate) struct TouchLog {
    hashes: Mutex<Vec<SequenceHash>>,
    /// Held while touches are applied; the swapped-out log (kept for its capacity).
    applying: Mutex<Vec<SequenceHash>>,
}

/// Logged touches above which the logging thread applies them itself (a bound on memory
/// when no job runs for a long time).
const TOUCH_LOG_MAX: usize = 1 << 14;

impl TouchLog {
    /// Logs uses of `hashes` in G2.
    pub(crate) fn log(
        &self,
        hashes: impl Iterator<Item = SequenceHash>,
        g2: &kvbm_logical::BlockManager<Host>,
    ) {
        let full = {
            let mut log = self.hashes.lock();
            log.extend(hashes);
            log.len() >= TOUCH_LOG_MAX
        };
        if full {
            self.apply(g2);
        }
    }

    /// Applies the logged touches, in order. Returns once every touch logged before the call
    /// is applied (by this call, or by one in progress on another thread).
    pub(crate) fn apply(&self, g2: &kvbm_logical::BlockManager<Host>) {
        let mut batch = self.applying.lock();
        std::mem::swap(&mut *self.hashes.lock(), &mut *batch);
        if !batch.is_empty() {
            super::stepped::touch_in_steps(g2, &batch);
            batch.clear();
        }
    }
}

/// The tier stack: G1 and G2 slot tiers, then zero or more store tiers, with asynchronous
/// offload and plan-then-commit onboarding. See the [module docs](super) for the design
/// and an example.
pub struct TierStack {
    inner: Arc<Inner>,
    workers: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for TierStack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TierStack")
            .field("g1", &self.inner.g1.manager)
            .field("g2", &self.inner.g2.manager)
            .field("stores", &self.inner.stores.len())
            .field("mode", &self.inner.mode)
            .field("workers", &self.workers.len())
            .finish()
    }
}

impl TierStack {
    /// A builder; see [`TierStackBuilder`].
    pub fn builder() -> TierStackBuilder {
        TierStackBuilder::default()
    }

    pub(crate) fn start(b: TierStackBuilder) -> Result<Self, StackError> {
        let watermarks = b.watermarks();
        let (Some((m1, l1)), Some((m2, l2))) = (b.g1, b.g2) else {
            return Err(StackError::MissingTier { tier: "G1" });
        };
        let block_bytes = l2.block_bytes();
        let inner = Arc::new(Inner {
            id: NEXT_STACK.fetch_add(1, Ordering::Relaxed),
            g1_events: SlotEvents::new(m1.total_blocks()),
            g1: SlotTier {
                manager: m1,
                layout: l1,
            },
            g2: SlotTier {
                manager: m2,
                layout: l2,
            },
            counters: Counters::new(2 + b.stores.len(), block_bytes),
            stores: b
                .stores
                .into_iter()
                .map(|s| StoreSlot {
                    tier: s.tier,
                    admission: s.admission,
                    probe: s.probe,
                })
                .collect(),
            engine: b.engine,
            mode: b.mode,
            watermarks,
            g2_admission: b.g2_admission,
            reclaim_batch: b.reclaim_batch,
            queue: JobQueue::new(b.max_queued_blocks, b.worker_linger),
            g2_touches: TouchLog::default(),
            reclaiming: super::rerun::Rerun::default(),
        });
        let mut stack = TierStack {
            inner,
            workers: Vec::with_capacity(b.workers),
        };
        for i in 0..b.workers {
            let inner = Arc::clone(&stack.inner);
            let worker = std::thread::Builder::new()
                .name(format!("kvbm-stack-{i}"))
                .spawn(move || inner.work())
                .map_err(StackError::Spawn)?; // `stack` drops: started workers are joined
            stack.workers.push(worker);
        }
        Ok(stack)
    }

    /// G1, read-only.
    pub fn g1(&self) -> SlotView<'_, Device> {
        self.inner.g1.view()
    }

    /// G2, read-only.
    pub fn g2(&self) -> SlotView<'_, Host> {
        self.inner.g2.view()
    }

    /// Store tier `index` (0 = G3), read-only.
    pub fn store(&self, index: usize) -> Option<StoreView<'_>> {
        self.inner.stores.get(index).map(|slot| StoreView { slot })
    }

    /// How many store tiers the stack has.
    pub fn store_count(&self) -> usize {
        self.inner.stores.len()
    }

    /// The write mode.
    pub fn write_mode(&self) -> WriteMode {
        self.inner.mode
    }

    /// Allocates `count` G1 blocks for the engine to compute into, all or nothing, without
    /// waiting on any copy. Under write-back the free blocks come from the reset pool the
    /// reclaimer keeps filled; should the caller outrun it, the allocation evicts directly
    /// and the evicted blocks that G2 lacks are counted as skipped (`reclaim_behind`).
    /// `Err` is back-pressure (too few free or evictable blocks); nothing was taken.
    ///
    /// ```
    /// # use kvbm_logical::{BlockManager, Device, Host, ImmutableBlock, SequenceHash};
    /// # use kvbm_physical::stack::{EngineSync, TierStack};
    /// # use kvbm_physical::{Layout, LayoutConfig, LayoutKind};
    /// # let config = |n| LayoutConfig { num_blocks: n, num_layers: 1, outer_dim: 2, page_size: 16, inner_dim: 8, dtype_bytes: 2 };
    /// # let stack = TierStack::builder()
    /// #     .g1(BlockManager::<Device>::builder().block_count(4).block_size(16).build()?,
    /// #         Layout::system(LayoutKind::LayerSeparate, config(4))?.into_shared())
    /// #     .g2(BlockManager::<Host>::builder().block_count(8).block_size(16).build()?,
    /// #         Layout::system(LayoutKind::FullyContiguous, config(8))?.into_shared())
    /// #     .build()?;
    /// let blocks = stack.allocate(3)?;
    /// assert!(stack.allocate(2).is_err()); // one left: all or nothing
    /// assert_eq!(stack.g1().counts().mutable, 3);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn allocate(&self, count: usize) -> Result<Vec<MutableBlock<Device>>, AllocationError> {
        self.inner.allocate_g1(count)
    }

    /// Registers computed G1 blocks (see `BlockManager::register_blocks`) and, under
    /// write-through, enqueues their copy to G2 without waiting (a full queue skips it and
    /// counts it). `sync` orders the copy after the engine's writes: with
    /// [`EngineSync::Event`] the copy stream waits for the engine's event on the GPU (under
    /// write-back the event stays with the slots until the reclaimer copies them); neither
    /// this thread nor the engine's stream waits. A foreign block refuses the batch and hands
    /// every block back.
    ///
    /// ```
    /// # use kvbm_logical::{BlockManager, Device, Host, ImmutableBlock, SequenceHash};
    /// # use kvbm_physical::stack::{EngineSync, TierStack};
    /// # use kvbm_physical::{Layout, LayoutConfig, LayoutKind};
    /// # let config = |n| LayoutConfig { num_blocks: n, num_layers: 1, outer_dim: 2, page_size: 16, inner_dim: 8, dtype_bytes: 2 };
    /// # let stack = TierStack::builder()
    /// #     .g1(BlockManager::<Device>::builder().block_count(4).block_size(16).build()?,
    /// #         Layout::system(LayoutKind::LayerSeparate, config(4))?.into_shared())
    /// #     .g2(BlockManager::<Host>::builder().block_count(8).block_size(16).build()?,
    /// #         Layout::system(LayoutKind::FullyContiguous, config(8))?.into_shared())
    /// #     .build()?;
    /// let hashes = [1, 2].map(SequenceHash::new);
    /// let staged = stack
    ///     .allocate(2)?
    ///     .into_iter()
    ///     .zip(hashes)
    ///     .map(|(b, h)| b.stage(h, 16))
    ///     .collect::<Result<Vec<_>, _>>()?;
    /// // ... after the engine wrote the blocks' KV:
    /// let registered = stack.register(staged, EngineSync::Ready)?;
    /// ImmutableBlock::release_all(registered);
    /// stack.flush();
    /// assert!(hashes.iter().all(|&h| stack.g2().contains(h)));
    /// assert_eq!(stack.stats().tier(kvbm_physical::stack::TierId::G2).unwrap().offloaded, 2);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn register(
        &self,
        blocks: Vec<CompleteBlock<Device>>,
        sync: EngineSync,
    ) -> Result<Vec<ImmutableBlock<Device>>, RegisterError<Vec<CompleteBlock<Device>>>> {
        let inner = &self.inner;
        let through = inner.mode == WriteMode::WriteThrough;
        let parents: Vec<Option<SequenceHash>> = if through {
            blocks.iter().map(CompleteBlock::parent).collect()
        } else {
            Vec::new()
        };
        let handles = inner.g1.manager.register_blocks(blocks)?;
        if through && !handles.is_empty() {
            // The job's owners are clones of the handles: lock-free (an atomic add each), no
            // registry probe. Under `Reject` a duplicate's handle is the block already
            // registered under its hash, which holds the same bytes.
            let items = handles
                .iter()
                .zip(parents)
                .map(|(h, parent)| OffloadItem {
                    hash: h.sequence_hash(),
                    parent,
                    held: Held::Registered(h.clone()),
                })
                .collect();
            inner.enqueue_offload(OffloadJob { items, sync });
        } else if !through {
            // Write-back: the reclaimer's copy of these slots waits for this event.
            inner
                .g1_events
                .record(handles.iter().map(ImmutableBlock::block_id), sync.event());
        }
        Ok(handles)
    }

    /// Waits until no job is queued or running: every offload enqueued so far has landed or
    /// been counted. For tests and orderly shutdown; never call it on the scheduler's hot
    /// path.
    pub fn flush(&self) {
        self.inner.queue.wait_idle();
        self.inner.g2_touches.apply(&self.inner.g2.manager);
    }

    /// The counters and the queue depth.
    pub fn stats(&self) -> StackStats {
        self.inner.stats()
    }

    /// A collector to register into a server's `prometheus_client` registry.
    pub fn collector(&self) -> StackCollector {
        let inner = Arc::downgrade(&self.inner);
        let tiers = 2 + self.inner.stores.len();
        StackCollector {
            inner: Arc::new(move || match inner.upgrade() {
                Some(inner) => inner.stats(),
                // The stack is gone: zeros, same families.
                None => Counters::new(tiers, 0).snapshot(Default::default()),
            }),
        }
    }

    /// A collector over the G1 and G2 managers' own metrics (pool gauges, allocations,
    /// evictions, registrations, ...), labelled `tier="G1"` and `tier="G2"` like the
    /// [`collector`](Self::collector)'s series, so that one scrape of a registry holding both
    /// shows each tier's pool next to its offload counters, every family once.
    ///
    /// ```
    /// # use kvbm_logical::{BlockManager, Device, Host};
    /// # use kvbm_physical::stack::TierStack;
    /// # use kvbm_physical::{Layout, LayoutConfig, LayoutKind};
    /// # let config = |n| LayoutConfig { num_blocks: n, num_layers: 1, outer_dim: 2, page_size: 16, inner_dim: 8, dtype_bytes: 2 };
    /// # let stack = TierStack::builder()
    /// #     .g1(BlockManager::<Device>::builder().block_count(4).block_size(16).build()?,
    /// #         Layout::system(LayoutKind::LayerSeparate, config(4))?.into_shared())
    /// #     .g2(BlockManager::<Host>::builder().block_count(8).block_size(16).build()?,
    /// #         Layout::system(LayoutKind::FullyContiguous, config(8))?.into_shared())
    /// #     .build()?;
    /// let mut registry = prometheus_client::registry::Registry::with_prefix("server");
    /// registry.register_collector(Box::new(stack.collector()));
    /// registry.register_collector(Box::new(stack.pool_collector()));
    /// let mut text = String::new();
    /// prometheus_client::encoding::text::encode(&mut text, &registry)?;
    /// assert!(text.contains(r#"server_kvbm_pool_blocks{tier="G2",state="reset"} 8"#));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn pool_collector(&self) -> kvbm_logical::MetricsCollector {
        kvbm_logical::MetricsCollector::new()
            .with_labels(self.g1().metrics(), [("tier", "G1")])
            .with_labels(self.g2().metrics(), [("tier", "G2")])
    }

    /// The counters in Prometheus (OpenMetrics) text, through a registry holding
    /// [`collector`](Self::collector) and [`pool_collector`](Self::pool_collector).
    ///
    /// ```
    /// # use kvbm_logical::{BlockManager, Device, Host, ImmutableBlock, SequenceHash};
    /// # use kvbm_physical::stack::{EngineSync, TierStack};
    /// # use kvbm_physical::{Layout, LayoutConfig, LayoutKind};
    /// # let config = |n| LayoutConfig { num_blocks: n, num_layers: 1, outer_dim: 2, page_size: 16, inner_dim: 8, dtype_bytes: 2 };
    /// # let stack = TierStack::builder()
    /// #     .g1(BlockManager::<Device>::builder().block_count(4).block_size(16).build()?,
    /// #         Layout::system(LayoutKind::LayerSeparate, config(4))?.into_shared())
    /// #     .g2(BlockManager::<Host>::builder().block_count(8).block_size(16).build()?,
    /// #         Layout::system(LayoutKind::FullyContiguous, config(8))?.into_shared())
    /// #     .build()?;
    /// let text = stack.render_prometheus();
    /// assert!(text.contains("# TYPE kvbm_tier_offloaded_blocks counter"));
    /// assert!(text.contains("kvbm_tier_offloaded_blocks_total{tier=\"G2\"} 0"));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn render_prometheus(&self) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(self.collector()));
        registry.register_collector(Box::new(self.pool_collector()));
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }

    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }
}

impl Drop for TierStack {
    /// Stops the workers (each finishes the job in hand), drops the jobs still queued
    /// (offloads counted as skipped `shutdown`; pending onboards complete with what they
    /// had) and joins the workers.
    fn drop(&mut self) {
        for job in self.inner.queue.shutdown() {
            self.inner.count_dropped(job);
        }
        for w in self.workers.drain(..) {
            if w.join().is_err() {
                tracing::error!("a tier stack worker panicked");
            }
        }
    }
}

impl Inner {
    fn work(self: Arc<Self>) {
        while let Some(job) = self.queue.pop() {
            let run = std::panic::AssertUnwindSafe(|| self.run(job));
            if std::panic::catch_unwind(run).is_err() {
                self.counters.job_panicked();
                tracing::error!("a tier stack job panicked; its blocks were released");
            }
            self.queue.done();
        }
    }

    fn run(&self, job: Job) {
        // Before anything that could evict from G2.
        self.g2_touches.apply(&self.g2.manager);
        match job {
            Job::Offload(j) => self.run_offload(j),
            Job::Reclaim => self.run_reclaim(),
            Job::Store(j) => self.run_store(j),
            Job::Onboard(j) => self.run_onboard(j),
        }
    }

    pub(crate) fn stats(&self) -> StackStats {
        self.counters.snapshot(self.queue.depth())
    }

    /// Counts a job that will never run.
    fn count_dropped(&self, job: Job) {
        match job {
            Job::Offload(j) => self.counters.skipped(TierId::G2, Skip::Shutdown, j.len()),
            Job::Store(j) => {
                for t in j.targets(self.stores.len()) {
                    self.counters
                        .skipped(TierId::Store(t), Skip::Shutdown, j.len());
                }
            }
            Job::Reclaim | Job::Onboard(_) => {} // an onboard's drop completes its Pending
        }
    }

    /// Queues an offload (G1 → G2) job, counting it as skipped if it does not fit.
    pub(crate) fn enqueue_offload(&self, job: OffloadJob) {
        if job.len() == 0 {
            return;
        }
        if let Err((job, shutdown)) = self.queue.push_offload(Job::Offload(job)) {
            let why = if shutdown {
                Skip::Shutdown
            } else {
                Skip::QueueFull
            };
            let n = match &job {
                Job::Offload(j) => j.len(),
                _ => 0,
            };
            self.counters.skipped(TierId::G2, why, n);
            // `job` drops here: its G1 owners are released (batched).
            drop(job);
        }
    }

    /// Allocates G1 blocks; under write-back, counts the direct evictions G2 lacks; wakes
    /// the reclaimer below the low watermark (write-back's, or write-through's reserve).
    pub(crate) fn allocate_g1(
        &self,
        count: usize,
    ) -> Result<Vec<MutableBlock<Device>>, AllocationError> {
        let Some(w) = self.watermarks else {
            return self.g1.manager.allocate_blocks(count);
        };
        let blocks = if self.mode == WriteMode::WriteThrough {
            let (blocks, evicted) = self.g1.manager.allocate_blocks_evicting(count)?;
            if !evicted.is_empty() {
                self.counters.reserve_behind(evicted.len());
            }
            blocks
        } else {
            self.allocate_g1_behind(count)?
        };
        if (self.g1.manager.metrics().free_blocks().0 as usize) < w.starts_below() {
            self.queue.request_reclaim();
        }
        Ok(blocks)
    }

    /// Write-back: allocates, counting the evicted blocks G2 lacks (the allocation outran
    /// the reclaimer).
    fn allocate_g1_behind(
        &self,
        count: usize,
    ) -> Result<Vec<MutableBlock<Device>>, AllocationError> {
        let (blocks, evicted) = self.g1.manager.allocate_blocks_evicting(count)?;
        if !evicted.is_empty() {
            let hashes: Vec<SequenceHash> = evicted.iter().map(|e| e.hash).collect();
            let behind = self
                .g2
                .manager
                .contains_each(&hashes)
                .into_iter()
                .filter(|&present| !present)
                .count();
            self.counters
                .skipped(TierId::G2, Skip::ReclaimBehind, behind);
        }
        Ok(blocks)
    }
}

#[cfg(test)]
mod tests {
    use kvbm_logical::{
        BlockManager, EvictionBackend, Host, ImmutableBlock, RemovalReason, SequenceHash,
    };

    use super::TouchLog;

    #[test]
    fn logged_touches_reorder_g2_in_their_order_when_applied() {
        let g2 = BlockManager::<Host>::builder()
            .block_count(4)
            .block_size(4)
            .eviction(EvictionBackend::Lru)
            .build()
            .unwrap();
        let hs: Vec<SequenceHash> = (1..=4).map(SequenceHash::new).collect();
        let staged = g2
            .allocate_blocks(4)
            .unwrap()
            .into_iter()
            .zip(&hs)
            .map(|(b, &h)| b.stage(h, 4).unwrap())
            .collect();
        ImmutableBlock::release_all(g2.register_blocks(staged).unwrap());
        let victims = |n| -> Vec<u64> {
            let taken = g2.evict_inactive(n, RemovalReason::Evicted);
            taken.iter().map(|(_, e)| e.hash.as_u64()).collect()
        };
        let log = TouchLog::default();
        // 1 and 2 (the LRU end) are used; logged only, G2's order is as it was.
        log.log(hs[..2].iter().copied(), &g2);
        log.log(std::iter::once(hs[0]), &g2);
        log.apply(&g2);
        // Applied in order: 3, 4 are now the coldest, then 2, then 1 (used last).
        assert_eq!(victims(4), vec![3, 4, 2, 1]);
        // The log is empty after an apply; another apply changes nothing.
        log.apply(&g2);
    }
}
