//! # kvbm-logical
//!
//! The logical half of a KV cache block manager: which blocks exist, who holds them, what
//! they contain (by sequence hash), which can be reused for a prompt prefix and which to
//! evict. No GPU, no memory: [`BlockId`]s index the slabs that `kvbm-physical` owns.
//!
//! ## Lifecycle
//!
//! ```text
//!   allocate_blocks          stage(hash)            register_block
//! reset pool ──▶ MutableBlock ──▶ CompleteBlock ──▶ ImmutableBlock ⇄ WeakBlock
//!      ▲              │ drop          │ drop         │ last drop     ▲ upgrade
//!      └──────────────┴───────────────┘              ▼               │
//!      └──────── evicted by allocate ◀──────── inactive pool ────────┘
//!                                      (matchable by match_blocks)
//! ```
//!
//! Ownership is the state ([`blocks`] has the table). A registered block that nobody holds
//! stays matchable in the **inactive pool** until an allocation finds the reset pool empty
//! and evicts it, in the order of the chosen [`EvictionBackend`].
//!
//! A server usually drives the lifecycle through [`RequestSequence`], which owns one
//! request's tokens and block table: it matches the cached prefix, allocates what each step
//! needs, registers every block the moment it fills, handles speculative rollback,
//! preemption and resumption, and releases tail first ([`request`] has the rules).
//!
//! ## Prefixes stay reachable
//!
//! A cached block is only useful while its whole prefix is cached: matching walks a chain
//! from its first block. The default eviction backend, [`EvictionBackend::Adaptive`], is
//! **prefix-preserving**: it evicts only *leaves* (inactive blocks that no inactive block
//! extends), so **a block is never evicted while a registered descendant of it remains
//! matchable and evictable instead**, whatever the order in which the caller released the
//! blocks: a `Vec` dropped front to back, [`ImmutableBlock::release_all`], a
//! [`RequestSequence`] (which releases tail first). A chain is always cut from its tail.
//! `tests/prefix_reachability.rs` checks this on random workloads against a model.
//!
//! The rule relies on what holders hold: the blocks a request holds are a whole prefix
//! (matches, [`RequestSequence`], chained registration all take prefixes), and one call
//! releases them (`release_all`, a request's drop or preemption), or one thread drops them
//! while no allocation runs in between. A block held without its parent (pinned alone,
//! upgraded from a `WeakBlock`, or a prefix dropped head first one handle at a time while
//! another thread allocates) does not keep its parent from being evicted meanwhile.
//!
//! With a backend that does not preserve prefixes, such as [`EvictionBackend::Lru`],
//! releasing a prefix head first makes its head the least recently used block, evicted
//! first, which orphans the rest of the chain: release tail first there.
//!
//! ## Concurrency model
//!
//! One [`BlockManager`] owns one store: the slot table, the reset pool, the inactive pool and
//! the hash registry behind **one** `parking_lot` mutex. Every operation takes it once per
//! call, never once per block (`allocate_blocks(n)`, `match_blocks`, `register_blocks`,
//! `release_all`). Handles hold a reference to the store and may be sent to and dropped on
//! any thread. Tables are sized at construction; the hot paths make a constant number of
//! heap allocations (the returned `Vec`), whatever the number of blocks.
//!
//! The one thing outside the lock is each registered block's **owner count**. Cloning an
//! [`ImmutableBlock`], and dropping one that is not its block's last owner, is a lock-free
//! atomic operation, as for an `Arc`; only the last owner's release takes the lock (to put
//! the block in the inactive pool). A count goes from 0 to 1 or from 1 to 0 only under the
//! lock, so a block is active exactly while it has an owner, at every instant; the races
//! this settles (a last drop against a resurrecting match, an upgrade, a pin, an eviction and
//! re-registration of the slot) are explored by the shuttle models in
//! `tests/shuttle_models.rs`.
//!
//! ## User code under the lock
//!
//! The store runs no closure, iterator or `Drop` of yours while it holds its lock, with two
//! exceptions:
//!
//! * the [`Clock`] given to [`BlockManagerBuilder::clock`], read by
//!   [`EvictionBackend::Priority`] when a block with an expiring [`Retention`] enters the
//!   inactive pool and when eviction checks for expired retentions. If it panics, the store
//!   catches the panic, finishes the call with the clock's last good reading (so the pool
//!   stays consistent: `check_invariants` passes, counts are conserved, no block is released
//!   twice or lost), releases the lock, and then resumes the panic in the calling thread;
//!   handles the call would have returned are dropped by the unwinding, which returns their
//!   blocks. A panic while the thread is already unwinding (a handle dropped during
//!   unwinding) is discarded rather than aborting the process.
//! * `tracing` subscribers, for the error event of an eviction policy that breaks its
//!   contract (a bug, never seen in tests).
//!
//! The iterator given to a `release_all` runs outside the lock: it may panic, or drop
//! things that panic, and every handle it yielded is still released exactly once.
//!
//! ## Features at a glance
//!
//! | concern | where |
//! |---|---|
//! | block identity, hashing spec, token sequences | [`hashing`], [`TokenBlockSequence`] |
//! | type-state handles | [`MutableBlock`], [`CompleteBlock`], [`ImmutableBlock`], [`WeakBlock`] |
//! | one request's tokens and block table | [`RequestSequence`], [`request`] |
//! | lookups without side effects | [`BlockManager::probe_prefix`], [`BlockManager::scan_matches`] (no `touch`), [`BlockManager::contains_each`]; scattered match: [`BlockManager::match_blocks_scattered`] |
//! | configuration and errors | [`BlockManagerBuilder`], [`BuildError`] |
//! | eviction policies | [`policy`], [`EvictionBackend`] |
//! | retention priorities and pins | [`Retention`], [`RequestRetention`], [`BlockManager::pin`] |
//! | cache events for routers, bootstrap snapshot | [`events`], [`BlockManager::subscribe`], [`BlockManager::subscribe_with_snapshot`] |
//! | "do not cache", purging held blocks, offload eviction | [`CompleteBlock::reset_on_release`], [`BlockManager::purge_blocks`], [`BlockManager::evict_inactive`], [`BlockManager::allocate_blocks_evicting_as`] |
//! | metrics, `prometheus-client` collector | [`BlockMetrics`], [`MetricsCollector`], [`BlockManager::collector`] |
//! | duplicates | [`BlockDuplicationPolicy`] |
//! | frequency tracking (TinyLFU sketch) | [`FrequencyTracking`] |
//! | counts and self-checks | [`PoolCounts`], [`BlockManager::check_invariants`] |
//!
//! ## Example
//!
//! ```
//! use kvbm_logical::{BlockManager, Device, ImmutableBlock, Salt, TokenBlockSequence};
//!
//! let manager = BlockManager::<Device>::builder().block_count(1024).block_size(16).build()?;
//!
//! let tokens: Vec<u32> = (0..100).collect();
//! let seq = TokenBlockSequence::from_tokens(&tokens, 16, &Salt::none())?;
//! let hashes: Vec<_> = seq.sequence_hashes().collect(); // 6 complete blocks
//!
//! let cached = manager.match_blocks(&hashes); // nothing cached yet
//! let new = manager.allocate_blocks(hashes.len() - cached.len())?;
//! let staged = new
//!     .into_iter()
//!     .zip(&seq.blocks()[cached.len()..])
//!     .map(|(block, tb)| block.stage_token_block(tb))
//!     .collect::<Result<Vec<_>, _>>()?;
//! let registered = manager.register_blocks(staged)?;
//! ImmutableBlock::release_all(registered);
//!
//! assert_eq!(manager.match_blocks(&hashes).len(), 6);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

// Only `prefetch` (one CPU hint, documented there) opts out.
#![deny(unsafe_code)]

pub mod blocks;
mod error;
pub mod events;
mod frequency;
pub mod hashing;
mod ids;
mod index;
mod manager;
mod metrics;
pub mod policy;
mod prefetch;
pub mod request;
mod retention;
mod sequence;
mod store;
mod sync;
mod tier;

pub use blocks::{CompleteBlock, ImmutableBlock, MutableBlock, WeakBlock};
pub use error::{
    AllocationError, BuildError, InvariantError, PinError, RegisterError, RequestError, ResetError,
    SequenceError, StageError,
};
pub use events::{
    CacheSnapshot, EventBatch, EventSubscriber, KvEvent, KvEventKind, RemovalReason, SnapshotBlock,
};
pub use frequency::FrequencyTracking;
pub use hashing::{HASH_SEED, HASH_SPEC_VERSION, Salt, SaltHash, SequenceHash, hash_block};
pub use ids::{BlockId, ManagerId};
pub use manager::{
    BlockManager, BlockManagerBuilder, MAX_BLOCK_SIZE, MAX_BLOCKS, PrefixProbe, Purge,
};
pub use metrics::{BlockMetrics, MetricsCollector, MetricsSnapshot};
pub use policy::EvictionBackend;
pub use request::{Committed, RequestBuilder, RequestSequence, TableChange, Truncated};
pub use retention::{
    Clock, InvalidPriority, ManualClock, RequestRetention, Retention, SystemClock,
};
pub use sequence::{TokenBlock, TokenBlockSequence};
pub use store::{BlockDuplicationPolicy, Evicted, PoolCounts};
pub use tier::{BlockTier, Device, Disk, Host};
