//! Offload jobs, run on workers: G1 → G2 (write-through registrations and write-back
//! reclaim) and G2 → store tiers. A job owns its source slots until the copy has landed.

use kvbm_logical::{
    BlockId, Device, Host, ImmutableBlock, MutableBlock, RemovalReason, SequenceHash,
};

use crate::cuda::CudaEvent;
use crate::error::TransferError;
use crate::store_tier::{PutOutcome, SkipReason, StoreBlock};
use crate::transfer::{CopyOptions, Strategy};

use super::config::Admission;
use super::core::{EngineSync, Inner};
use super::stats::{Direction, Skip, TierId};
use super::stepped::{
    allocate_up_to, contains_in_steps, evict_up_to, register_in_steps, release_immutable,
    release_mutable,
};

/// How a job holds a G1 source slot until its copy lands.
pub(crate) enum Held {
    /// A registered block (write-through): it cannot be evicted while held.
    Registered(ImmutableBlock<Device>),
    /// A slot the reclaimer evicted: it cannot be allocated while held; dropping it returns
    /// it to the reset pool.
    Evicted(MutableBlock<Device>),
}

impl Held {
    fn block_id(&self) -> BlockId {
        match self {
            Held::Registered(b) => b.block_id(),
            Held::Evicted(b) => b.block_id(),
        }
    }
}

/// One G1 block to offload.
pub(crate) struct OffloadItem {
    pub(crate) held: Held,
    pub(crate) hash: SequenceHash,
    pub(crate) parent: Option<SequenceHash>,
}

/// G1 blocks to copy to G2.
pub(crate) struct OffloadJob {
    pub(crate) items: Vec<OffloadItem>,
    /// The copy waits for the engine's event before reading (write-through).
    pub(crate) sync: EngineSync,
}

impl OffloadJob {
    pub(crate) fn len(&self) -> usize {
        self.items.len()
    }
}

impl Drop for OffloadJob {
    fn drop(&mut self) {
        release_items(std::mem::take(&mut self.items));
    }
}

/// Releases the job's G1 slots, in steps (see [`super::stepped`]).
fn release_items(items: Vec<OffloadItem>) {
    let mut registered = Vec::new();
    let mut evicted = Vec::new();
    for item in items {
        match item.held {
            Held::Registered(b) => registered.push(b),
            Held::Evicted(b) => evicted.push(b),
        }
    }
    release_immutable(registered);
    release_mutable(evicted);
}

/// G2 blocks to put into the store tiers.
pub(crate) struct StoreJob {
    pub(crate) blocks: Vec<(ImmutableBlock<Host>, Option<SequenceHash>)>,
    /// A store tier the blocks just came from (not written back there).
    pub(crate) exclude: Option<usize>,
}

impl StoreJob {
    pub(crate) fn len(&self) -> usize {
        self.blocks.len()
    }

    /// The store tiers this job writes to.
    pub(crate) fn targets(&self, stores: usize) -> impl Iterator<Item = usize> + '_ {
        (0..stores).filter(move |&t| Some(t) != self.exclude)
    }
}

impl Drop for StoreJob {
    fn drop(&mut self) {
        release_immutable(std::mem::take(&mut self.blocks).into_iter().map(|b| b.0));
    }
}

/// What happened to one pair of a copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PairOutcome {
    /// The destination holds the source's bytes.
    Landed,
    /// The copy failed: the destination holds nothing valid.
    Failed,
    /// The source's checksum no longer matches its bytes: nothing was copied for it.
    SourceCorrupt,
    /// Not attempted (after a cut in prefix mode).
    Skipped,
}

/// What a copy of a batch of pairs did: one outcome per pair, and the event recorded on the
/// copy stream after the copies (GPU copies; `None` for host copies).
pub(crate) struct Copied {
    pub(crate) outcomes: Vec<PairOutcome>,
    pub(crate) event: Option<CudaEvent>,
}

impl Inner {
    /// Copies `pairs` from `src` to `dst`, the copy stream first waiting for `wait` (the
    /// engine's events; no host synchronisation), and waits on this worker until the copies
    /// have landed. A corrupt source is taken out and the rest retried; with `prefix`,
    /// everything after the first corrupt source is dropped instead (an onboard ends its
    /// prefix there anyway). A host copy (`memcpy`) cannot make a GPU stream wait: given
    /// events, it waits for them here, on the worker, first.
    pub(crate) fn copy_pairs(
        &self,
        direction: Direction,
        pairs: &[(BlockId, BlockId)],
        prefix: bool,
        wait: &[CudaEvent],
    ) -> Copied {
        let (src, dst) = match direction {
            Direction::Offload => (&self.g1.layout, &self.g2.layout),
            Direction::Onboard => (&self.g2.layout, &self.g1.layout),
        };
        let clock = self.counters.clock(direction);
        let mut out = vec![PairOutcome::Landed; pairs.len()];
        let mut active: Vec<usize> = (0..pairs.len()).collect();
        let mut options = CopyOptions {
            wait_for: wait.to_vec(),
            ..CopyOptions::default()
        };
        let mut event = None;
        let mut batch: Vec<(BlockId, BlockId)> = Vec::with_capacity(pairs.len());
        while !active.is_empty() {
            batch.clear();
            batch.extend(active.iter().map(|&i| pairs[i]));
            clock.start();
            let copied = self
                .engine
                .copy_blocks(src, dst, &batch, &options)
                .and_then(|handle| {
                    event = handle.completion_event();
                    handle.wait()
                });
            clock.stop(match &copied {
                Ok(report) => report.bytes as u64,
                Err(TransferError::CopyFailed { .. }) => (batch.len() * src.block_bytes()) as u64,
                Err(_) => 0, // refused: nothing was copied
            });
            match copied {
                Ok(_) => break,
                Err(TransferError::Unsupported {
                    strategy: Strategy::Memcpy,
                    ..
                }) if !options.wait_for.is_empty() => {
                    // Host memory on both sides: wait for the engine here, then copy.
                    let waited = options.wait_for.drain(..).try_for_each(|e| e.synchronize());
                    if let Err(error) = waited {
                        tracing::warn!(%error, "waiting for the engine's event failed");
                        active.iter().for_each(|&i| out[i] = PairOutcome::Failed);
                        break;
                    }
                }
                Err(TransferError::CopyFailed { failed, error }) => {
                    tracing::warn!(%error, failed = failed.len(), "tier copy failed");
                    for f in failed {
                        if let Some(&i) = active.get(f) {
                            out[i] = PairOutcome::Failed;
                        }
                    }
                    break;
                }
                Err(TransferError::ChecksumMismatch { block, .. }) => {
                    let Some(k) = active.iter().position(|&i| pairs[i].0 == block) else {
                        active.iter().for_each(|&i| out[i] = PairOutcome::Failed);
                        break;
                    };
                    out[active[k]] = PairOutcome::SourceCorrupt;
                    if prefix {
                        for &i in &active[k + 1..] {
                            out[i] = PairOutcome::Skipped;
                        }
                        active.truncate(k);
                    } else {
                        active.remove(k);
                    }
                }
                Err(error) => {
                    tracing::error!(%error, "tier copy refused");
                    active.iter().for_each(|&i| out[i] = PairOutcome::Failed);
                    break;
                }
            }
        }
        Copied {
            outcomes: out,
            event,
        }
    }

    pub(crate) fn run_offload(&self, mut job: OffloadJob) {
        let items = std::mem::take(&mut job.items);
        let wait: Vec<CudaEvent> = job.sync.event().cloned().into_iter().collect();
        let landed = self.offload_to_g2(items, &wait);
        self.enqueue_store(landed, None);
    }

    /// The G1 → G2 pipeline: presence, admission, allocation, copy, registration. Returns
    /// the registered G2 blocks (with parents) for the store tiers.
    fn offload_to_g2(
        &self,
        items: Vec<OffloadItem>,
        wait: &[CudaEvent],
    ) -> Vec<(ImmutableBlock<Host>, Option<SequenceHash>)> {
        let g2 = &self.g2.manager;
        let hashes: Vec<SequenceHash> = items.iter().map(|i| i.hash).collect();
        let present = contains_in_steps(g2, &hashes);
        let mut todo = Vec::with_capacity(items.len());
        let mut gone = Vec::new();
        let (mut n_present, mut refused) = (0, 0);
        for (item, present) in items.into_iter().zip(present) {
            if present {
                n_present += 1;
                gone.push(item);
            } else if !self.admit_g2(item.hash) {
                refused += 1;
                gone.push(item);
            } else {
                todo.push(item);
            }
        }
        release_items(gone);
        self.counters.skipped(TierId::G2, Skip::Present, n_present);
        self.counters.skipped(TierId::G2, Skip::Admission, refused);
        if todo.is_empty() {
            return Vec::new();
        }
        let dst = allocate_up_to(g2, todo.len());
        if dst.len() < todo.len() {
            self.counters
                .skipped(TierId::G2, Skip::NoRoom, todo.len() - dst.len());
            release_items(todo.split_off(dst.len()));
        }
        if dst.is_empty() {
            return Vec::new();
        }
        let pairs: Vec<(BlockId, BlockId)> = todo
            .iter()
            .zip(&dst)
            .map(|(i, d)| (i.held.block_id(), d.block_id()))
            .collect();
        let outcomes = self
            .copy_pairs(Direction::Offload, &pairs, false, wait)
            .outcomes;
        let mut staged = Vec::with_capacity(dst.len());
        let mut parents = Vec::with_capacity(dst.len());
        let mut lost = 0;
        let mut failed_dst = Vec::new();
        for ((item, block), outcome) in todo.iter().zip(dst).zip(outcomes) {
            if outcome != PairOutcome::Landed {
                lost += 1;
                failed_dst.push(block);
                continue;
            }
            match block.stage(item.hash, g2.block_size()) {
                Ok(b) => {
                    staged.push(b.with_parent(item.parent));
                    parents.push(item.parent);
                }
                Err(e) => {
                    lost += 1; // sizes were checked at build
                    failed_dst.push(e.into_block());
                }
            }
        }
        release_mutable(failed_dst);
        self.counters.lost(TierId::G2, lost);
        // G2's copies are registered before the G1 sources are let go: a block is never in
        // neither tier (a free reserve's reclaimer may evict a released source at once).
        let registered = register_in_steps(g2, staged);
        release_items(todo);
        // Refused: cannot happen (the blocks are G2's own); counted, given back.
        self.counters.lost(TierId::G2, registered.refused);
        // Under G2's `Reject` duplication policy, a hash another job registered in G2 since
        // the presence check comes back as that job's block: present, not offloaded, and
        // that job puts it into the store tiers. (Under `Allow` the copy is a block of its
        // own, counted as offloaded.)
        let mut landed = Vec::with_capacity(registered.handles.len());
        let mut present = Vec::new();
        for ((handle, own), parent) in registered
            .handles
            .into_iter()
            .zip(registered.own)
            .zip(parents)
        {
            if own {
                landed.push((handle, parent));
            } else {
                present.push(handle);
            }
        }
        self.counters
            .skipped(TierId::G2, Skip::Present, present.len());
        release_immutable(present);
        self.counters.offloaded(TierId::G2, landed.len());
        landed
    }

    fn admit_g2(&self, hash: SequenceHash) -> bool {
        match self.g2_admission {
            Admission::Presence => true,
            Admission::MinFrequency(k) => self.g1.manager.frequency(hash).is_some_and(|f| f >= k),
        }
    }

    /// Queues the G2 → store copies of freshly registered G2 blocks (or releases them when
    /// there is no store tier).
    pub(crate) fn enqueue_store(
        &self,
        blocks: Vec<(ImmutableBlock<Host>, Option<SequenceHash>)>,
        exclude: Option<usize>,
    ) {
        let job = StoreJob { blocks, exclude };
        if job.blocks.is_empty() || job.targets(self.stores.len()).next().is_none() {
            return; // drops: released in steps
        }
        if let Err((job, shutdown)) = self.queue.push_offload(super::queue::Job::Store(job)) {
            let why = if shutdown {
                Skip::Shutdown
            } else {
                Skip::QueueFull
            };
            if let super::queue::Job::Store(j) = &job {
                for t in j.targets(self.stores.len()) {
                    self.counters.skipped(TierId::Store(t), why, j.len());
                }
            }
        }
    }

    /// Evicts the coldest inactive G1 blocks (in the policy's order) while the reset pool is
    /// below the high watermark. Write-back offloads them to G2 holding their slots, then
    /// returns the slots to the reset pool; write-through (its free reserve) returns them at
    /// once: their copies are in G2 already.
    pub(crate) fn run_reclaim(&self) {
        let Some(w) = self.watermarks else {
            return;
        };
        // One reclaimer at a time: two would both size their batches from the same counts
        // and evict past `high`. A run requested meanwhile (an allocation left G1 below
        // `low`) makes the running one go round again before it ends (`Rerun`).
        let Some(mut run) = self.reclaiming.begin() else {
            return;
        };
        loop {
            self.counters.reclaim_run();
            self.reclaim_rounds(w);
            match run.finish() {
                Some(again) => run = again,
                None => return,
            }
        }
    }

    /// One reclaim run's rounds: evicts while G1's reset pool is below `w.high`, re-reading
    /// the counts each round.
    fn reclaim_rounds(&self, w: super::config::Watermarks) {
        let g1 = &self.g1.manager;
        let through = self.mode == super::config::WriteMode::WriteThrough;
        loop {
            let c = g1.counts();
            if c.reset >= w.high || c.inactive == 0 {
                break;
            }
            let k = (w.high - c.reset).min(c.inactive).min(self.reclaim_batch);
            if through {
                let taken = evict_up_to(g1, k, RemovalReason::Evicted);
                if taken.is_empty() {
                    break;
                }
                release_mutable(taken.into_iter().map(|(slot, _)| slot));
                continue;
            }
            // Only inactive blocks: never takes free blocks from a concurrent allocation.
            // The evictions are announced as `Demoted` (their bytes are offloaded to G2).
            let taken = evict_up_to(g1, k, RemovalReason::Demoted);
            if taken.is_empty() {
                break; // someone took them meanwhile; a later allocation asks again
            }
            let items: Vec<OffloadItem> = taken
                .into_iter()
                .map(|(slot, e)| OffloadItem {
                    held: Held::Evicted(slot),
                    hash: e.hash,
                    parent: e.parent,
                })
                .collect();
            // The engine's events of the evicted blocks' registrations, if any.
            let ids: Vec<BlockId> = items.iter().map(|i| i.held.block_id()).collect();
            let wait = self.g1_events.take(&ids);
            let landed = self.offload_to_g2(items, &wait);
            self.enqueue_store(landed, None);
        }
    }

    /// Writes a store job's G2 blocks to the store tiers, verifying G2's checksum of each
    /// first (never spread a corrupt block). Where G2's blocks are one range of host memory
    /// each, the tiers write straight from G2's memory through read-locked views (held, with
    /// the blocks, until the writes are done); elsewhere the images are read into one
    /// buffer that the worker thread reuses from job to job. No image is copied per block
    /// onto the heap.
    pub(crate) fn run_store(&self, mut job: StoreJob) {
        let blocks = std::mem::take(&mut job.blocks);
        let exclude = job.exclude;
        let layout = &self.g2.layout;
        let mut corrupt = Vec::new();
        if layout.has_block_views() {
            let mut views = Vec::with_capacity(blocks.len());
            let mut ids = Vec::with_capacity(blocks.len());
            for (b, parent) in &blocks {
                match layout.block_view(b.block_id()) {
                    Ok(view) if view.verify() => {
                        views.push(view);
                        ids.push((b.sequence_hash(), *parent));
                    }
                    _ => corrupt.push(b.sequence_hash()),
                }
            }
            let images: Vec<Image<'_>> = ids
                .iter()
                .zip(&views)
                .map(|(&(hash, parent), view)| (hash, parent, &view[..]))
                .collect();
            self.purge_corrupt(&corrupt);
            self.put_images(&images, exclude);
            drop(images);
            drop(views);
            release_immutable(blocks.into_iter().map(|b| b.0));
            return;
        }
        let bytes = layout.block_bytes();
        STORE_IMAGES.with_borrow_mut(|buf| {
            if buf.len() < bytes * blocks.len() {
                buf.resize(bytes * blocks.len(), 0);
            }
            let mut ids = Vec::with_capacity(blocks.len());
            for ((b, parent), image) in blocks.iter().zip(buf.chunks_mut(bytes)) {
                let ok = layout.read_block(b.block_id(), image).is_ok()
                    && layout
                        .checksum(b.block_id())
                        .is_none_or(|sum| sum == xxhash_rust::xxh3::xxh3_64(image));
                if ok {
                    ids.push(Some((b.sequence_hash(), *parent)));
                } else {
                    ids.push(None);
                    corrupt.push(b.sequence_hash());
                }
            }
            release_immutable(blocks.into_iter().map(|b| b.0));
            let images: Vec<Image<'_>> = ids
                .iter()
                .zip(buf.chunks(bytes))
                .filter_map(|(id, image)| id.map(|(hash, parent)| (hash, parent, image)))
                .collect();
            self.purge_corrupt(&corrupt);
            self.put_images(&images, exclude);
        });
    }

    fn purge_corrupt(&self, corrupt: &[SequenceHash]) {
        if !corrupt.is_empty() {
            // Held by another job or request or not: a corrupt block must stop being served.
            self.g2.manager.purge_blocks(corrupt);
            self.counters.lost(TierId::G2, corrupt.len());
        }
    }

    /// Puts verified G2 block images into every store tier but `exclude`, through each
    /// tier's admission filter and presence check.
    fn put_images(&self, images: &[Image<'_>], exclude: Option<usize>) {
        for t in (0..self.stores.len()).filter(|&t| Some(t) != exclude) {
            let store = &self.stores[t];
            let tier = TierId::Store(t);
            let candidates: Vec<usize> = match store.admission {
                Admission::Presence => (0..images.len()).collect(),
                Admission::MinFrequency(k) => {
                    let admitted: Vec<usize> = (0..images.len())
                        .filter(|&i| {
                            self.g2
                                .manager
                                .frequency(images[i].0)
                                .is_some_and(|f| f >= k)
                        })
                        .collect();
                    self.counters
                        .skipped(tier, Skip::Admission, images.len() - admitted.len());
                    admitted
                }
            };
            if candidates.is_empty() {
                continue;
            }
            let hashes: Vec<SequenceHash> = candidates.iter().map(|&i| images[i].0).collect();
            let present = store.tier.contains(&hashes);
            let todo: Vec<usize> = candidates
                .iter()
                .zip(present.iter().chain(std::iter::repeat(&false)))
                .filter(|(_, p)| !**p)
                .map(|(&i, _)| i)
                .collect();
            self.counters
                .skipped(tier, Skip::Present, candidates.len() - todo.len());
            if todo.is_empty() {
                continue;
            }
            let puts: Vec<StoreBlock<'_>> = todo
                .iter()
                .map(|&i| StoreBlock {
                    hash: images[i].0,
                    parent: images[i].1,
                    bytes: images[i].2,
                })
                .collect();
            let outcomes = store.tier.put(&puts);
            let (mut stored, mut lost) = (0, 0);
            let mut first_error = None;
            for (k, _) in puts.iter().enumerate() {
                match outcomes.get(k) {
                    Some(PutOutcome::Stored) => stored += 1,
                    Some(PutOutcome::Present) => self.counters.skipped(tier, Skip::Present, 1),
                    Some(PutOutcome::Skipped(why)) => {
                        let why = match why {
                            SkipReason::NoRoom => Skip::NoRoom,
                            SkipReason::Degraded => Skip::Degraded,
                            _ => Skip::Unavailable,
                        };
                        self.counters.skipped(tier, why, 1);
                    }
                    Some(PutOutcome::Failed(error)) => {
                        first_error.get_or_insert(error);
                        lost += 1;
                    }
                    // A short answer from the store: treat the rest as failed.
                    _ => lost += 1,
                }
            }
            if let Some(error) = first_error {
                // Once per call, not per block (a failing store would log at full rate).
                tracing::warn!(%error, %tier, failed = lost, "store tier puts failed");
            }
            self.counters.offloaded(tier, stored);
            self.counters.lost(tier, lost);
        }
    }
}

/// A verified G2 block image on its way to the store tiers: hash, parent, bytes.
type Image<'a> = (SequenceHash, Option<SequenceHash>, &'a [u8]);

thread_local! {
    /// Block images passing through a worker on their way between G2 and a store tier,
    /// reused from job to job: a store job's images of a G2 without block views, an onboard's
    /// candidates of a deferred tier (read before they have a G2 slot). Never borrowed twice:
    /// neither use calls the other.
    pub(super) static STORE_IMAGES: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}
