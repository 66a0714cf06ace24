//! The tier stack (tiering v2): G1 and G2 slot tiers, then zero or more store tiers, with
//! asynchronous offload and plan-then-commit onboarding. The scheduler thread never waits
//! on a copy.
//!
//! # Tiers
//!
//! | tier | kind | what it is |
//! |---|---|---|
//! | G1 | slot tier | `BlockManager<Device>` + `Arc<Layout>`: where the engine computes (device memory; system memory on CPU) |
//! | G2 | slot tier | `BlockManager<Host>` + `Arc<Layout>`: pinned host memory (system memory on CPU) |
//! | G3, G4, ... | store tiers | [`StoreTier`](crate::StoreTier)s in order (a disk engine, a remote store): key-value stores keyed by sequence hash that evict by themselves |
//!
//! G1 and G2 are required. The stack owns their managers and hands out only read-only
//! [`SlotView`]s: the scheduler allocates and registers G1 blocks through the stack, so it
//! cannot allocate around write-back.
//!
//! # Jobs and workers
//!
//! Every copy is a job on one queue served by a fixed pool of worker threads
//! ([`TierStackBuilder::workers`]). Lanes, in priority order: onboard (a request waits),
//! reclaim (an allocation will need it), offload G1 → G2 (it holds G1 slots), store G2 →
//! store tiers (it holds only G2 slots), the last two each bounded by
//! [`max_queued_blocks`](TierStackBuilder::max_queued_blocks). Enqueueing never blocks: an
//! offload that does not fit is skipped and counted (`skipped{reason="queue_full"}`).
//! A worker that runs out of jobs lingers, polling the queue every [`POLL`], for
//! [`worker_linger`](TierStackBuilder::worker_linger) before it parks, so that a job
//! pushed meanwhile costs the scheduler no wake-up system call.
//!
//! **Ownership while a copy is in flight.** A job owns the slots it reads: an offload holds
//! the source's `ImmutableBlock<Device>` (so it cannot be evicted) or, for a block the
//! reclaimer evicted, its `MutableBlock<Device>` (so the slot cannot be handed out); an
//! onboard holds its G2 sources as `ImmutableBlock<Host>` and its G1 destinations as
//! `MutableBlock<Device>`. A slot is released only after its copy has landed (or failed),
//! and a failed copy never registers its destination.
//!
//! # Offload
//!
//! - **Write-through** ([`WriteMode::WriteThrough`]): [`TierStack::register`] enqueues the
//!   G1 → G2 copy of the blocks it registers.
//! - **Write-back** ([`WriteMode::WriteBack`]) never makes an allocation wait: when an
//!   allocation leaves fewer than `low` free (reset) G1 blocks, a reclaim job evicts the
//!   coldest inactive G1 blocks itself (`evict_inactive`, in the eviction policy's order,
//!   never taking a free block, announced as `Removed { reason: Demoted }`), copies them to G2 while holding their slots, and returns the slots to
//!   the reset pool, until `high` are free. The cold end of the cache is thus already in G2
//!   and the scheduler allocates from the reset pool. If it outruns the reclaimer, its
//!   allocation evicts directly: those blocks are not offloaded and are counted as skipped
//!   (`reclaim_behind`) — never an error, never a wait.
//! - **Write-through's free reserve** ([`TierStackBuilder::free_reserve`], off by default):
//!   the same reclaimer keeps `low..=high` G1 blocks free under write-through, evicting
//!   without a copy (an inactive block's write-through copy has landed; one in flight is
//!   held by its job), so that allocations on the scheduler's thread take free blocks.
//! - **G2 → store tiers**: every G2 registration (an offload, or a store block staged by an
//!   onboard) enqueues the copy to each store tier (except the one it came from), each
//!   through its own admission filter. G2 images are verified against G2's checksums first,
//!   so a corrupt block never spreads down.
//! - **Admission** per boundary ([`Admission`]): `Presence` offloads any block the lower
//!   tier lacks; `MinFrequency(k)` also needs the upper tier's frequency sketch to count at
//!   least `k` accesses (build fails without frequency tracking on that manager). Refused
//!   and already-present blocks are counted as skipped (`admission`, `present`).
//!
//! # Onboarding: plan, then commit
//!
//! [`TierStack::lookup`] walks the request's chain hash by hash across all tiers (a G1 hit
//! after a G2 hit is still a G1 hit) and stops at the first hash no tier has. It takes the
//! G1 hits as handles at once (nothing can evict them), then G2's hits among the hashes G1
//! lacks, in place as well (nothing can evict them before the onboard copies them, and the
//! commit need not look them up again), and asks each store tier probed
//! [`Probe::OnLookup`] with one `contains`. A store tier behind a
//! network round trip is probed [`Probe::Deferred`]: the lookup does not ask it, plans the
//! blocks no other tier has from it as *unverified*, and the onboard job fetches them on a
//! worker (a miss ends the prefix there). The [`Plan`] says how many blocks come from each
//! tier and how many free G1 blocks committing needs; nothing is copied or allocated.
//!
//! [`TierStack::onboard`] commits the first `limit` blocks: it allocates the G1
//! destinations (never evicting the plan's own G1 hits, which it holds), hands the plan's
//! G2 sources to one job, enqueues it and returns a [`Pending`] at once. Committing is a use:
//! the G1 hits count as used (the most recently used of G1 once released, their accesses
//! recorded: lookup took them without a trace) and G2's copies of them are touched, so
//! that G2's eviction order follows use and G2 keeps what one LRU pool of its size would (a
//! hot block living in G1 does not age out of G2 meanwhile; `kvbm-bench tiered` measures
//! that tiering loses no hits). The job fetches
//! store blocks into G2 (registering them there: multi-hop store → G2 → G1), copies G2 → G1
//! and registers the landed blocks in G1 with their parents. `Pending` can be polled
//! ([`try_complete`](Pending::try_complete)), waited on ([`wait`](Pending::wait)) or
//! dropped to cancel (the G1 destinations go back to the reset pool; a copy in flight
//! finishes on the worker first). It completes with one G1 prefix ([`Onboarded`]).
//!
//! **Failures.** A block whose copy failed, or whose checksum or header no longer verifies,
//! ends the prefix there, is invalidated in the tier that held it (so it is never retried
//! forever) and is reported in [`Onboarded::lost`] and counted as `lost`. Back-pressure is
//! never an error: too few free G1 blocks for a plan is [`OnboardError::NoRoom`], with the
//! plan handed back and nothing counted as lost.
//!
//! # Ordering against the engine: CUDA events, never a host synchronisation
//!
//! On a GPU the engine's kernels and kvbm's copies run on different streams. An offload may
//! read a block only after the kernels that wrote it, and the engine may read an onboarded
//! block only after its copy. [`TierStack::register`] takes an [`EngineSync`]: with
//! [`EngineSync::Event`] (an event the engine recorded on its stream after writing the
//! blocks) the worker's copy makes kvbm's copy stream wait for it (`cuStreamWaitEvent`
//! through [`CopyOptions::wait_for`](crate::CopyOptions::wait_for)); neither the scheduler
//! thread nor the engine's stream waits. Under write-back the event is kept per G1 slot
//! until the reclaimer copies the slot. A completed onboard ([`Onboarded::sync`]) carries the
//! completion event of its copies into G1, which the engine's stream waits for
//! ([`CudaEvent::wait_on`](crate::CudaEvent::wait_on)) before reading the blocks. The worker
//! registers onboarded blocks in G1 only once their copies have landed (it waits on that
//! event, off the scheduler thread), because a failed copy must never register a block and a
//! registered block is at once every request's G1 hit. On the CPU everything is
//! [`EngineSync::Ready`]: host copies complete inside the call.
//!
//! # Accounting
//!
//! [`TierStack::stats`] gives per-tier counters (offloaded, onboarded, skipped by reason,
//! lost, bytes, lookup hits) and the queue depth; [`TierStack::collector`] is a
//! `prometheus-client` collector (one HELP/TYPE per family, a `tier` label) for a
//! server's registry. [`TierStack::flush`] waits until no job is queued or running; dropping
//! the stack stops and joins its workers (queued offloads are counted as skipped
//! `shutdown`).
//!
//! **Workers and the scheduler's locks.** A worker takes G1's or G2's store lock for at most
//! 16 blocks at a time (allocations with their evictions, reclaim evictions, registrations,
//! releases), so the scheduler thread never waits behind a whole batch. The managers' event
//! subscribers therefore see a worker's batch of *n* blocks as up to ⌈*n* / 16⌉ event
//! batches, in order (a subscriber's capacity counts batches).
//!
//! # Example
//!
//! ```
//! use kvbm_logical::{BlockManager, Device, Host, SequenceHash};
//! use kvbm_physical::stack::{EngineSync, TierStack};
//! use kvbm_physical::{Layout, LayoutConfig, LayoutKind};
//! let config = |n| LayoutConfig { num_blocks: n, num_layers: 2, outer_dim: 2, page_size: 16, inner_dim: 64, dtype_bytes: 2 };
//! let stack = TierStack::builder()
//!     .g1(
//!         BlockManager::<Device>::builder().block_count(4).block_size(16).build()?,
//!         Layout::system(LayoutKind::LayerSeparate, config(4))?.into_shared(),
//!     )
//!     .g2(
//!         BlockManager::<Host>::builder().block_count(8).block_size(16).build()?,
//!         Layout::system(LayoutKind::FullyContiguous, config(8))?.into_shared(),
//!     )
//!     .build()?;
//!
//! // The engine computes a block's KV into G1 and registers it: the copy to G2 is queued.
//! let hash = SequenceHash::new(1);
//! let block = stack.allocate(1)?.pop().unwrap();
//! let kv = vec![42u8; stack.g1().layout().block_bytes()];
//! stack.g1().layout().write_block(block.block_id(), &kv)?;
//! let registered = stack.register(vec![block.stage(hash, 16)?], EngineSync::Ready)?;
//! drop(registered);
//! stack.flush(); // tests only: wait for the offload
//! assert!(stack.g2().contains(hash));
//!
//! // A later request: plan, then commit.
//! let plan = stack.lookup(&[hash, SequenceHash::new(2)]);
//! assert_eq!((plan.len(), plan.g1_hits()), (1, 1));
//! let done = stack.onboard(plan, usize::MAX)?.wait();
//! assert_eq!(done.blocks[0].sequence_hash(), hash);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod config;
mod core;
mod job;
mod offload;
mod onboard;
mod plan;
mod queue;
mod rerun;
mod slot;
mod stats;
mod stepped;

pub use config::{
    Admission, DEFAULT_MAX_QUEUED_BLOCKS, DEFAULT_RECLAIM_BATCH, DEFAULT_WORKER_LINGER,
    DEFAULT_WORKERS, Probe, StackError, StoreTierConfig, TierStackBuilder, Watermarks, WriteMode,
};
pub use core::{EngineSync, TierStack};
pub use onboard::{
    Canceller, EndReason, LostBlock, LostCause, OnboardError, Onboarded, Pending, PrefixEnd,
};
pub use plan::Plan;
pub use queue::POLL;
pub use slot::{SlotView, StoreView};
pub use stats::{CopyStats, Skip, StackCollector, StackStats, TierId, TierStats};
