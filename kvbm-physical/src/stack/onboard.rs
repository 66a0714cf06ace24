//! Commit: [`TierStack::onboard`] turns a [`Plan`] into a [`Pending`] onboard, whose job
//! (on a worker) fetches store blocks into G2, copies G2 blocks into the G1 blocks allocated
//! for them and registers those as one prefix.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

use kvbm_logical::{Device, Host, ImmutableBlock, MutableBlock, SequenceHash};
use parking_lot::{Condvar, Mutex};
use thiserror::Error;

use crate::cuda::CudaEvent;
use crate::store_tier::StoreError;

use super::core::{EngineSync, Inner, TierStack};
use super::plan::{Plan, Source};
use super::stats::TierId;

/// An onboard was not started; the plan is inside, unchanged except where said.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum OnboardError {
    /// Back-pressure, not a failure: G1 has too few free or evictable blocks for the plan
    /// right now. Nothing was allocated, copied or counted as lost; retry later, or commit a
    /// shorter prefix (`limit`). The plan comes back shortened to `limit`, if it was
    /// longer, with its hits still held.
    #[error("not now: {needed} free G1 blocks needed, {available} available")]
    NoRoom {
        /// Free G1 blocks the plan needs.
        needed: usize,
        /// Free or evictable G1 blocks there were.
        available: usize,
        /// The plan, handed back.
        plan: Plan,
    },
    /// The plan was made by another tier stack.
    #[error("the plan was made by another tier stack")]
    ForeignPlan {
        /// The plan, handed back.
        plan: Plan,
    },
}

impl OnboardError {
    /// The plan, handed back.
    pub fn into_plan(self) -> Plan {
        match self {
            OnboardError::NoRoom { plan, .. } | OnboardError::ForeignPlan { plan } => plan,
        }
    }
}

/// Why an onboarded prefix is shorter than the plan committed.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum EndReason {
    /// The tier no longer had the block (evicted meanwhile, or an unverified store
    /// candidate that was not there), or a store tier could not be read for a
    /// [transient](crate::store_tier::StoreError::is_transient) reason. Not a loss.
    Miss {
        /// The tier asked.
        tier: TierId,
    },
    /// No room to stage a store block in G2. Back-pressure, not a loss.
    NoRoom {
        /// The full tier.
        tier: TierId,
    },
    /// The block was lost: see [`Onboarded::lost`].
    Lost {
        /// The tier that held it.
        tier: TierId,
    },
    /// The onboard was cancelled, the stack shut down, or its job failed on the worker (a
    /// panic, in a store tier say), before it finished.
    Aborted,
}

/// Where a prefix ended early, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PrefixEnd {
    /// Position in the plan of the first block not onboarded.
    pub at: usize,
    /// Its hash.
    pub hash: SequenceHash,
    /// Why.
    pub reason: EndReason,
}

/// How a block was lost.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LostCause {
    /// The copy into G1 (or G2) failed.
    CopyFailed,
    /// The block's checksum or header no longer verified.
    Corrupt,
    /// The store tier's read failed.
    StoreFailed(StoreError),
}

/// A block an onboard lost: it was invalidated in the tier that held it, so it is never
/// retried.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LostBlock {
    /// The block's hash.
    pub hash: SequenceHash,
    /// The tier that held it.
    pub tier: TierId,
    /// What went wrong.
    pub cause: LostCause,
}

/// A completed onboard: one G1 prefix.
#[derive(Debug)]
#[non_exhaustive]
pub struct Onboarded {
    /// The prefix, in chain order: the plan's G1 hits and the onboarded blocks, registered
    /// in G1 with their parents.
    pub blocks: Vec<ImmutableBlock<Device>>,
    /// How many of `blocks` were G1 hits.
    pub g1_hits: usize,
    /// How many came through the onboard's copies (not G1 hits). Under G1's `Reject`
    /// duplication policy, a hash the engine registered in G1 while the copy ran comes back
    /// as the engine's block and counts here too (the stack's `onboarded` statistic counts
    /// only blocks that landed in their own slot).
    pub onboarded: usize,
    /// Why the prefix is shorter than the plan committed, if it is.
    pub end: Option<PrefixEnd>,
    /// Blocks found lost on the way, each invalidated in the tier that held it. The first
    /// one ends the prefix; an onboard that had already read past that point (the rest of
    /// one batched read of a tier, or a reader one chunk ahead) also reports what it found
    /// there (those blocks are not in `blocks` either).
    pub lost: Vec<LostBlock>,
    /// What the engine's stream waits for before its kernels read `blocks`: on a GPU, the
    /// completion event of the copies into G1 ([`EngineSync::Event`]; see [`EngineSync`] for
    /// why it is complete by now); [`EngineSync::Ready`] on the CPU or when every block was a
    /// G1 hit.
    pub sync: EngineSync,
    /// Fresh G1 blocks the commit allocated for blocks past the prefix's end (a miss in a
    /// tier probed [`Probe::Deferred`](super::Probe::Deferred), a failed copy, no room in
    /// G2): the caller computes those blocks next, so it gets the slots instead of
    /// allocating again (another request could take them meanwhile). Dropping them returns
    /// them to the reset pool.
    pub spare: Vec<MutableBlock<Device>>,
}

/// What a job hands its [`Pending`].
#[derive(Default)]
pub(crate) struct Output {
    pub(crate) landed: Vec<(usize, ImmutableBlock<Device>)>,
    pub(crate) end: Option<PrefixEnd>,
    pub(crate) lost: Vec<LostBlock>,
    /// The completion event of the copies into G1 (GPU copies).
    pub(crate) event: Option<CudaEvent>,
    /// Destinations not registered (past the end): the caller's to use.
    pub(crate) spare: Vec<MutableBlock<Device>>,
}

/// The rendezvous of a job and its `Pending`.
#[derive(Default)]
pub(crate) struct Completion {
    output: Mutex<Option<Output>>,
    ready: Condvar,
    pub(crate) cancelled: AtomicBool,
}

impl Completion {
    pub(crate) fn complete(&self, output: Output) {
        *self.output.lock() = Some(output);
        self.ready.notify_all();
    }
}

/// One non-G1 block of a committed plan.
pub(crate) struct Item {
    pub(crate) pos: usize,
    pub(crate) source: ItemSource,
    pub(crate) dst: MutableBlock<Device>,
}

pub(crate) enum ItemSource {
    G2(ImmutableBlock<Host>),
    /// Store tier `tier`; `verified` is false for a deferred probe's candidate.
    Store {
        tier: usize,
        verified: bool,
    },
}

/// The worker's half of an onboard.
pub(crate) struct OnboardJob {
    pub(crate) hashes: Vec<SequenceHash>,
    pub(crate) items: Vec<Item>,
    pub(crate) completion: Arc<Completion>,
    pub(crate) done: bool,
}

impl Drop for OnboardJob {
    /// A job dropped unrun (shutdown) completes its `Pending` with what it had: the G1
    /// hits before its first block. Its G1 blocks go back to the reset pool.
    fn drop(&mut self) {
        let items = std::mem::take(&mut self.items);
        let end = items.first().map(|i| PrefixEnd {
            at: i.pos,
            hash: self.hashes[i.pos],
            reason: EndReason::Aborted,
        });
        release(items);
        if !self.done {
            self.completion.complete(Output {
                end,
                ..Output::default()
            });
        }
    }
}

/// Gives back a job's G1 destinations and G2 sources, in steps (a cancelled or failed job is
/// dropped on a worker; see [`super::stepped`]).
fn release(items: Vec<Item>) {
    let mut dsts = Vec::with_capacity(items.len());
    let mut srcs = Vec::new();
    for item in items {
        dsts.push(item.dst);
        if let ItemSource::G2(b) = item.source {
            srcs.push(b);
        }
    }
    super::stepped::release_mutable(dsts);
    super::stepped::release_immutable(srcs);
}

/// An onboard in flight: poll it ([`try_complete`](Self::try_complete)), wait for it
/// ([`wait`](Self::wait)), or drop it to cancel (its G1 blocks go back to the reset pool; a
/// copy in flight finishes on the worker first; nothing leaks).
#[must_use = "dropping a Pending cancels the onboard"]
pub struct Pending {
    hashes: Vec<SequenceHash>,
    /// The plan's G1 hits, by position.
    hits: Vec<Option<ImmutableBlock<Device>>>,
    completion: Option<Arc<Completion>>,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("blocks", &self.hashes.len())
            .field("ready", &self.is_ready())
            .finish()
    }
}

/// Cancels an onboard from anywhere, also while its [`Pending`] is being waited on (on
/// another thread): what dropping the `Pending` does, without it. The wait then returns what
/// the job had when it saw the cancel (nothing it copied is registered). Cancelling a finished
/// onboard does nothing. A `Canceller` holds nothing of the onboard's: kept after its `Pending`
/// is gone (with a request that was aborted), it keeps no block.
#[derive(Clone)]
pub struct Canceller(Option<Weak<Completion>>);

impl std::fmt::Debug for Canceller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Canceller").finish_non_exhaustive()
    }
}

impl Canceller {
    /// Cancels the onboard.
    pub fn cancel(&self) {
        if let Some(c) = self.0.as_ref().and_then(Weak::upgrade) {
            c.cancelled.store(true, Ordering::Release);
        }
    }
}

impl Pending {
    /// Blocks committed (the prefix is at most this long).
    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    /// A handle that cancels this onboard from another thread (see [`Canceller`]).
    pub fn canceller(&self) -> Canceller {
        Canceller(self.completion.as_ref().map(Arc::downgrade))
    }

    /// Whether nothing was committed.
    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// Whether the onboard has finished (never blocks).
    pub fn is_ready(&self) -> bool {
        self.completion
            .as_ref()
            .is_none_or(|c| c.output.lock().is_some())
    }

    /// The result if the onboard has finished, else the `Pending` back. Never blocks.
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
    /// let hashes = [7].map(SequenceHash::new);
    /// # let staged = stack.allocate(1)?.into_iter().zip(hashes).map(|(b, h)| b.stage(h, 16)).collect::<Result<Vec<_>, _>>()?;
    /// # ImmutableBlock::release_all(stack.register(staged, EngineSync::Ready)?);
    /// # stack.flush();
    /// # drop(stack.allocate(4)?);
    /// let mut pending = stack.onboard(stack.lookup(&hashes), usize::MAX)?;
    /// let done = loop {
    ///     match pending.try_complete() {
    ///         Ok(done) => break done,
    ///         Err(back) => pending = back, // the scheduler runs other requests meanwhile
    ///     }
    /// };
    /// assert_eq!(done.blocks[0].sequence_hash(), hashes[0]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn try_complete(mut self) -> Result<Onboarded, Pending> {
        let taken = match &self.completion {
            None => Some(Output::default()),
            Some(c) => c.output.lock().take(),
        };
        let Some(output) = taken else {
            return Err(self);
        };
        self.completion = None;
        Ok(self.assemble(output))
    }

    /// Waits for the onboard to finish.
    pub fn wait(mut self) -> Onboarded {
        let output = match self.completion.take() {
            None => Output::default(),
            Some(c) => {
                let mut slot = c.output.lock();
                while slot.is_none() {
                    c.ready.wait(&mut slot);
                }
                slot.take().unwrap_or_default()
            }
        };
        self.assemble(output)
    }

    fn assemble(&mut self, mut output: Output) -> Onboarded {
        let mut end = output.end.take();
        let stop = end.as_ref().map_or(self.hashes.len(), |e| e.at);
        let mut landed = output.landed.into_iter().peekable();
        let mut blocks = Vec::with_capacity(stop);
        let (mut g1_hits, mut onboarded) = (0, 0);
        for pos in 0..stop {
            if let Some(hit) = self.hits[pos].take() {
                blocks.push(hit);
                g1_hits += 1;
            } else if let Some((_, b)) = landed.next_if(|(p, _)| *p == pos) {
                blocks.push(b);
                onboarded += 1;
            } else {
                // A gap the job did not report: it unwound (a panic in a store tier, say)
                // before it could say where the prefix ended. The prefix ends here.
                end = Some(PrefixEnd {
                    at: pos,
                    hash: self.hashes[pos],
                    reason: EndReason::Aborted,
                });
                break;
            }
        }
        ImmutableBlock::release_all(landed.map(|(_, b)| b));
        ImmutableBlock::release_all(self.hits.drain(..).flatten());
        Onboarded {
            blocks,
            g1_hits,
            onboarded,
            end,
            lost: output.lost,
            // Only copied blocks need the event (G1 hits have landed long ago).
            sync: match output.event {
                Some(event) if onboarded > 0 => EngineSync::Event(event),
                _ => EngineSync::Ready,
            },
            spare: output.spare,
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(c) = self.completion.take() {
            c.cancelled.store(true, Ordering::Release);
            // A finished onboard's blocks (registered, or spare) go back now, whoever else
            // still holds the completion.
            let output = c.output.lock().take();
            drop(output);
        }
        ImmutableBlock::release_all(self.hits.drain(..).flatten());
    }
}

impl TierStack {
    /// Commits the first `limit` blocks of `plan` (all of it with `usize::MAX`): allocates
    /// the G1 blocks it needs (never evicting the plan's own G1 hits, which it holds, as it
    /// holds its G2 blocks), queues the copies (store → G2 → G1 where needed) and returns at
    /// once. The [`Pending`] completes with one G1 prefix.
    ///
    /// `Err(NoRoom)` is back-pressure: nothing was taken, the plan is handed back.
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
    /// # use kvbm_physical::stack::OnboardError;
    /// let hashes = [1, 2].map(SequenceHash::new);
    /// # let staged = stack.allocate(2)?.into_iter().zip(hashes).map(|(b, h)| b.stage(h, 16)).collect::<Result<Vec<_>, _>>()?;
    /// # ImmutableBlock::release_all(stack.register(staged, EngineSync::Ready)?);
    /// # stack.flush();
    /// # drop(stack.allocate(4)?); // evicts both from G1; G2 has them
    /// let plan = stack.lookup(&hashes);
    /// assert_eq!(plan.blocks_needed(), 2); // both in G2
    /// let busy = stack.allocate(3)?; // G1 has one free block left
    /// let plan = match stack.onboard(plan, usize::MAX) {
    ///     Err(OnboardError::NoRoom { needed: 2, available: 1, plan }) => plan, // not now
    ///     other => panic!("{other:?}"),
    /// };
    /// drop(busy);
    /// let done = stack.onboard(plan, usize::MAX)?.wait();
    /// assert_eq!((done.blocks.len(), done.onboarded), (2, 2));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn onboard(&self, plan: Plan, limit: usize) -> Result<Pending, OnboardError> {
        self.inner().onboard(plan, limit)
    }
}

impl Inner {
    fn onboard(&self, mut plan: Plan, limit: usize) -> Result<Pending, OnboardError> {
        if plan.stack != self.id {
            return Err(OnboardError::ForeignPlan { plan });
        }
        plan.truncate(limit);
        let needed = plan.blocks_needed();
        if needed > 0 {
            // Lock-free early answer for the common "no room" case.
            let (reset, inactive) = self.g1.manager.metrics().free_blocks();
            let available = (reset + inactive) as usize;
            if available < needed {
                self.counters.not_now();
                return Err(OnboardError::NoRoom {
                    needed,
                    available,
                    plan,
                });
            }
        }
        // The plan holds its G2 sources (taken in place by the lookup), so the allocation
        // below cannot evict them. Committing is a use, which the job records when it starts
        // (`touch_held` on the worker), so that the sources re-enter G2's eviction order as
        // the most recently used when the job releases them, as one LRU pool of G2's size
        // would have it.
        let dsts = if needed == 0 {
            Vec::new()
        } else {
            match self.allocate_g1(needed) {
                Ok(d) => d,
                Err(kvbm_logical::AllocationError::Exhausted { available, .. }) => {
                    self.counters.not_now();
                    return Err(OnboardError::NoRoom {
                        needed,
                        available,
                        plan,
                    });
                }
                Err(_) => {
                    // Not an exhaustion (a future variant): treat as no room.
                    self.counters.not_now();
                    return Err(OnboardError::NoRoom {
                        needed,
                        available: 0,
                        plan,
                    });
                }
            }
        };
        self.counters.onboard_started();
        // Committing is a use: the G1 hits' accesses are counted below.
        let mut hits: Vec<Option<ImmutableBlock<Device>>> = Vec::with_capacity(plan.len());
        let mut items = Vec::with_capacity(needed);
        let mut dsts = dsts.into_iter();
        let hashes = std::mem::take(&mut plan.hashes);
        let mut sources = std::mem::take(&mut plan.sources).into_iter().enumerate();
        for (pos, source) in sources.by_ref() {
            let item_source = match source {
                Source::G1(b) => {
                    hits.push(Some(b));
                    continue;
                }
                Source::G2(b) => ItemSource::G2(b),
                Source::Store { tier, verified } => ItemSource::Store { tier, verified },
            };
            hits.push(None);
            // Cannot run out (one destination per block that is not a G1 hit).
            let Some(dst) = dsts.next() else { break };
            items.push(Item {
                pos,
                source: item_source,
                dst,
            });
        }
        // Past an early end (none), the plan's other hits go back at once.
        super::plan::release(sources.map(|(_, s)| s).collect());
        hits.resize_with(hashes.len(), || None);
        let g1_hits = hits.iter().flatten();
        if g1_hits.clone().next().is_some() {
            // The G1 hits were just used. The plan holds them through a non-touching scan
            // (lookup changes nothing), so they would go back to their old places in G1's
            // eviction order when released: `touch_held` marks the very slots held as used
            // (most recently used when released, accesses counted), by id, under one lock.
            self.g1.manager.touch_held(g1_hits.clone());
            // G2's copies of the G1 hits were just used too: keep G2's eviction order
            // following use, so that G2 keeps what a single LRU of its size would (a hot block
            // living in G1 must not age out of G2 meanwhile). Deferred to the workers: G2
            // evicts only inside jobs, and each job applies the touches logged before it.
            self.g2_touches
                .log(g1_hits.map(ImmutableBlock::sequence_hash), &self.g2.manager);
        }
        if items.is_empty() {
            // Every block a G1 hit: no job, and the hashes need no copy.
            return Ok(Pending {
                hashes,
                hits,
                completion: None,
            });
        }
        let completion = Arc::new(Completion::default());
        let pending = Pending {
            hashes: hashes.clone(),
            hits,
            completion: Some(Arc::clone(&completion)),
        };
        let job = OnboardJob {
            hashes,
            items,
            completion,
            done: false,
        };
        // Refused only while shutting down: the job's drop completes the Pending.
        let _ = self.queue.push_onboard(job);
        Ok(pending)
    }
}
