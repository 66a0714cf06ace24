//! The block store: every slot's state, the reset pool, the inactive pool and the registry,
//! under **one** mutex.
//!
//! Each public manager operation takes the lock once per call. Transitions are methods on
//! [`StoreState`], which the caller holds locked; they never allocate (all tables are sized at
//! construction) and never drop a handle (a handle's drop takes the lock, which would
//! deadlock).
//!
//! The one exception to "everything under the lock" is the owner count of each registered
//! slot ([`refs`]): a handle that is not its block's last owner is cloned and dropped with a
//! lock-free atomic operation, and only the last owner's release takes the lock.

mod guard;
mod invariants;
mod refs;

pub(crate) use guard::{GuardedClock, ParkedPanic};
pub(crate) use refs::RefCounts;

use std::collections::TryReserveError;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use crate::sync::{Mutex, MutexGuard};

use crate::events::{EventHub, RemovalReason, SnapshotBlock};
use crate::frequency::FrequencySketch;
use crate::hashing::SequenceHash;
use crate::ids::{BlockId, ManagerId};
use crate::index::Index;
use crate::metrics::{BlockMetrics, Gauges};
use crate::policy::{EvictionBackend, InactiveEntry, InactivePool, NIL, PolicyContext};
use crate::retention::Retention;

/// What registering a hash that is already present does.
///
/// ```
/// use kvbm_logical::{BlockDuplicationPolicy, BlockManager, Device, SequenceHash};
/// let m = BlockManager::<Device>::builder()
///     .block_count(4)
///     .block_size(16)
///     .duplication_policy(BlockDuplicationPolicy::Reject)
///     .build()?;
/// let hash = SequenceHash::new(42);
/// let mut blocks = m.allocate_blocks(2)?;
/// let a = m.register_block(blocks.pop().unwrap().stage(hash, 16)?)?;
/// let b = m.register_block(blocks.pop().unwrap().stage(hash, 16)?)?;
/// assert_eq!(a.block_id(), b.block_id()); // the second slot went back to the reset pool
/// assert_eq!(m.available_blocks(), 3);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BlockDuplicationPolicy {
    /// Hand back the block already registered under the hash; the new slot returns to the
    /// reset pool. One slot per hash: the most cache per byte.
    #[default]
    Reject,
    /// Keep both; the new block is registered as a duplicate (counted in
    /// [`PoolCounts::duplicates`]). For engines whose block tables cannot be rewritten after
    /// the fact.
    Allow,
}

/// A coherent snapshot of where every block is (taken under the store lock).
///
/// `reset + inactive + mutable + active == total` always holds.
///
/// ```
/// use kvbm_logical::{BlockManager, Device};
/// let m = BlockManager::<Device>::builder().block_count(8).block_size(16).build()?;
/// let held = m.allocate_blocks(3)?;
/// let c = m.counts();
/// assert_eq!((c.reset, c.mutable, c.in_flight(), c.available()), (5, 3, 3, 5));
/// assert_eq!(c.reset + c.inactive + c.mutable + c.active, c.total);
/// # drop(held);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct PoolCounts {
    /// Blocks managed.
    pub total: usize,
    /// Blocks in the reset pool (free, no identity).
    pub reset: usize,
    /// Registered blocks no handle holds (matchable, evictable).
    pub inactive: usize,
    /// Blocks held by a `MutableBlock` or `CompleteBlock`.
    pub mutable: usize,
    /// Registered blocks held by at least one `ImmutableBlock`.
    pub active: usize,
    /// Distinct sequence hashes registered (active or inactive).
    pub registered_hashes: usize,
    /// Registered blocks beyond the first for their hash (policy `Allow` only).
    pub duplicates: usize,
    /// Pinned blocks (a subset of `active`: a pin holds a reference).
    pub pinned: usize,
}

impl PoolCounts {
    /// Blocks held by handles: `mutable + active`.
    pub fn in_flight(&self) -> usize {
        self.mutable + self.active
    }

    /// Blocks an allocation can take: `reset + inactive`.
    pub fn available(&self) -> usize {
        self.reset + self.inactive
    }
}

/// The shared part of a manager: what every handle points to.
pub(crate) struct BlockStore {
    pub(crate) id: ManagerId,
    pub(crate) block_size: usize,
    pub(crate) total: usize,
    pub(crate) duplication: BlockDuplicationPolicy,
    pub(crate) backend: EvictionBackend,
    /// The most blocks that may be pinned at once.
    pub(crate) pin_budget: usize,
    pub(crate) state: Mutex<StoreState>,
    /// The owner count of every slot, shared with `state` (see [`refs`]).
    pub(crate) refs: RefCounts,
    /// A panic of user code caught under the lock, resumed when the lock is released.
    pub(crate) parked: Arc<ParkedPanic>,
    pub(crate) frequency: Option<Arc<FrequencySketch>>,
    pub(crate) metrics: BlockMetrics,
    /// Whether anyone subscribes to events, readable without the lock (see
    /// `EventHub::enabled_flag`): staging from tokens copies them only then.
    pub(crate) events_on: Arc<std::sync::atomic::AtomicBool>,
}

/// The locked store. Dropping it publishes the pool gauges (a few relaxed stores), so every
/// lock acquisition keeps the metrics current without anyone remembering to, and then
/// resumes a panic of user code caught while the lock was held ([`guard`]); the mutex is
/// released either way (the guard field is dropped even if `drop` unwinds).
pub(crate) struct Locked<'a> {
    guard: MutexGuard<'a, StoreState>,
    store: &'a BlockStore,
}

impl Deref for Locked<'_> {
    type Target = StoreState;
    fn deref(&self) -> &StoreState {
        &self.guard
    }
}

impl DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut StoreState {
        &mut self.guard
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        // Blocks that left the cache when their last owner released them ("do not cache"):
        // counted and announced here, still under the lock, so that event order is kept.
        if self.guard.deferred.released > 0 {
            let store = self.store;
            let released = std::mem::take(&mut self.guard.deferred.released);
            store
                .metrics
                .add_removals(RemovalReason::Released, released);
            let state = &mut *self.guard;
            for &hash in &state.deferred.gone {
                state.events.removed(hash, RemovalReason::Released);
            }
            state.deferred.gone.clear();
            state.events.commit(&store.metrics);
        }
        self.store.metrics.set_gauges(self.guard.gauges());
        self.store.parked.resume();
    }
}

impl BlockStore {
    /// Takes the store lock.
    pub(crate) fn lock(&self) -> Locked<'_> {
        Locked {
            guard: self.state.lock(),
            store: self,
        }
    }

    /// Returns a mutable or complete block's slot to the reset pool.
    pub(crate) fn release_mutable(&self, id: BlockId) {
        self.lock().release_mutable(id);
    }

    /// Drops one owner of a registered block: lock-free unless it is the last owner.
    pub(crate) fn release_ref(&self, id: BlockId) {
        if !self.refs.release_shared(id) {
            self.lock().release_ref(id);
        }
    }

    /// Adds one owner to a block the caller owns (an `ImmutableBlock` clone). Lock-free.
    pub(crate) fn add_ref(&self, id: BlockId) {
        self.refs.clone_ref(id);
    }

    /// Whether anyone subscribes to events (lock-free; may lag a dropped subscriber).
    pub(crate) fn events_enabled(&self) -> bool {
        self.events_on.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Adds an owner to slot `id` if it still holds `hash` (active or inactive).
    pub(crate) fn upgrade(&self, id: BlockId, hash: SequenceHash) -> bool {
        self.lock().upgrade(id, hash)
    }

    /// Records accesses in the frequency sketch, if tracking is on. Lock-free.
    pub(crate) fn record_accesses(&self, hashes: impl Iterator<Item = SequenceHash>) {
        if let Some(sketch) = &self.frequency {
            sketch.increment_all(hashes);
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotState {
    /// In the reset pool.
    Reset,
    /// Held by a `MutableBlock` or `CompleteBlock`.
    Mutable,
    /// Registered, held by at least one owner (`ImmutableBlock`s and a pin; the count is in
    /// [`RefCounts`]).
    Active,
    /// Registered, in the inactive pool.
    Inactive,
}

/// A block that an allocation evicted from the cache: its slot is now one of the
/// allocation's mutable blocks, and still holds the evicted bytes until the caller writes it.
/// That is what lets a tiered manager copy the block to a lower tier before reuse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Evicted {
    /// The slot, now held by one of the returned [`MutableBlock`](crate::MutableBlock)s.
    pub block_id: BlockId,
    /// The hash that left the cache.
    pub hash: SequenceHash,
    /// Its parent's hash, as registered.
    pub parent: Option<SequenceHash>,
}

/// `Slot::flags` bits.
const HAS_PARENT: u8 = 1;
/// The block is pinned (the pin holds one of its references).
const PINNED: u8 = 2;
/// Marked during a `pin` call's budget check; never set between calls.
const PIN_PENDING: u8 = 4;
/// An active block that is still in the inactive pool, at the place it had there: it was
/// found by a side-effect-free scan (`scan_matches(.., false)`), and when its last owner goes
/// it is simply inactive again, in its old place (unless its holder used it since: `USED`).
/// Eviction skips it while it is held; any other acquisition (a match, an upgrade, a pin)
/// takes it out of the pool as usual.
const IN_POOL: u8 = 8;
/// Registered "do not cache": when its last owner releases it, the block leaves the cache
/// (to the reset pool) instead of entering the inactive pool.
const RESET_ON_RELEASE: u8 = 16;
/// An active block purged from the cache while held (`purge`): no longer in the registry, so
/// nobody can match, upgrade or pin it; its last owner's release sends it to the reset pool.
const DETACHED: u8 = 32;
/// With `IN_POOL` only, in a pool that [requeues in place](InactivePool::requeues_in_place):
/// its holder has since used the block ([`StoreState::use_held`]), so when its last owner
/// releases it the policy files it as just used ([`InactivePool::requeue`]: as a removal and
/// an insertion, done in place) instead of leaving it where it was.
const USED: u8 = 64;

/// One slot: 32 bytes, two per cache line. `hash`, `parent`, the retention and the duplicate
/// link are meaningful only while registered. Its owner count lives outside the lock, in
/// [`RefCounts`].
#[derive(Clone, Copy, Debug)]
struct Slot {
    hash: SequenceHash,
    /// The parent's hash, meaningful with `HAS_PARENT`.
    parent: SequenceHash,
    /// The next registered slot with the same hash (policy `Allow`): a singly linked list
    /// whose head is the registry's entry. Unlinking a non-head walks from the head, which
    /// costs the number of duplicates of that hash (rare, and only under `Allow`).
    dup_next: u32,
    /// Retention expiry in ms (`NO_EXPIRY`: none).
    retention_ms: u32,
    state: SlotState,
    flags: u8,
    priority: u8,
}

const _: () = assert!(std::mem::size_of::<Slot>() == 32);

impl Slot {
    fn parent(&self) -> Option<SequenceHash> {
        (self.flags & HAS_PARENT != 0).then_some(self.parent)
    }

    fn retention(&self) -> Retention {
        Retention::from_raw(self.priority, self.retention_ms)
    }
}

const RESET_SLOT: Slot = Slot {
    hash: SequenceHash::new(0),
    parent: SequenceHash::new(0),
    dup_next: NIL,
    retention_ms: 0,
    state: SlotState::Reset,
    flags: 0,
    priority: 0,
};

/// How many hashes ahead of its probes a registry walk prefetches (see
/// [`StoreState::prefetch_walk`]): enough to overlap the misses of a request's blocks,
/// few enough not to flood the CPU's miss buffers.
const AHEAD: usize = 8;

/// A [`Walk`]'s ring of mixes: a power of two above [`AHEAD`].
const RING: usize = 16;

/// A hash ready for the registry: with its mix, computed once (a [`Walk`] computes it
/// [`AHEAD`] steps early, for its prefetches).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Probe {
    hash: SequenceHash,
    mixed: u64,
}

/// A batch walk of hashes through the registry (a match, a scan, a probe), prefetching:
/// at step `i` it starts loading the registry's home slot of the hash [`AHEAD`] steps on,
/// and the slot record (with its owner count, for a walk that takes handles: `HANDLES`) of
/// the one `AHEAD / 2` on, whose home slot has most likely arrived by then. The cache
/// misses of a request's blocks overlap instead of following one another; on a server
/// whose scheduler thread shares its caches with everything else, the registry is rarely
/// cached.
pub(crate) struct Walk<'h, const HANDLES: bool> {
    hashes: &'h [SequenceHash],
    /// The mixes of `hashes[i..i + AHEAD]` at step `i`, at `index % RING`.
    mixes: [u64; RING],
}

impl<const HANDLES: bool> Walk<'_, HANDLES> {
    /// Step `i` (0, 1, 2, ... in order, below `hashes.len()`): prefetches ahead and returns
    /// `hashes[i]`'s probe.
    #[inline]
    pub(crate) fn step(&mut self, state: &StoreState, i: usize) -> Probe {
        self.home(state, i + AHEAD);
        self.record(state, i + AHEAD / 2);
        Probe {
            hash: self.hashes[i],
            mixed: self.mixes[i % RING],
        }
    }

    /// Mixes `hashes[j]` (if any) into the ring and prefetches its registry home slot.
    #[inline]
    fn home(&mut self, state: &StoreState, j: usize) {
        if let Some(h) = self.hashes.get(j) {
            let mixed = state.registry.mixed(h.as_u64());
            self.mixes[j % RING] = mixed;
            state.registry.prefetch_mixed(mixed);
        }
    }

    /// Prefetches the likely record of `hashes[j]` (if any; mixed already).
    #[inline]
    fn record(&self, state: &StoreState, j: usize) {
        if j < self.hashes.len() {
            state.prefetch_record::<HANDLES>(self.mixes[j % RING]);
        }
    }
}

/// The registry: sequence hash → the first registered slot with that hash, a fixed index
/// over the slots' own hashes (see [`Index`]: no rehash, no allocation after construction,
/// 8 bytes per entry at most half full).
type Registry = Index;

/// The key of registry record `r`: its slot's hash.
#[inline]
fn key_in(slots: &[Slot]) -> impl Fn(u32) -> u64 + '_ {
    move |r| slots[r as usize].hash.as_u64()
}

/// What registering one block did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Registered {
    /// The hash is new: now matchable.
    New,
    /// Policy `Reject`: the existing block was handed back.
    Deduplicated,
    /// Policy `Allow`: kept as a duplicate.
    Duplicate,
}

/// What a `purge` did to the blocks of one hash.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Purged {
    /// Inactive blocks moved to the reset pool.
    pub(crate) reset: usize,
    /// Held blocks detached: they go to the reset pool when released.
    pub(crate) detached: usize,
    /// Whether the hash left the cache.
    pub(crate) left: bool,
}

/// What a prefix probe found; see `BlockManager::probe_prefix`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Probed {
    pub(crate) active: usize,
    pub(crate) inactive: usize,
}

/// Side effects of releases collected under the lock, published by `Locked::drop`.
#[derive(Default)]
pub(crate) struct Deferred {
    /// "Do not cache" blocks that went to the reset pool.
    released: usize,
    /// Their hashes that left the cache (only collected while events are enabled).
    gone: Vec<SequenceHash>,
}

/// Why a `pin` call was refused (the manager turns it into a `PinError`).
pub(crate) enum PinRefusal {
    NotRegistered(SequenceHash),
    OverBudget { requested: usize, pinned: usize },
}

/// Everything the store lock protects.
pub(crate) struct StoreState {
    slots: Vec<Slot>,
    /// The owner counts, shared with [`BlockStore::refs`].
    refs: RefCounts,
    /// Free slots, used as a stack (the most recently freed slot is reused first).
    reset: Vec<BlockId>,
    inactive: Box<dyn InactivePool>,
    registry: Registry,
    /// Slots in state `Mutable`.
    mutable: usize,
    /// Slots in state `Active`.
    active: usize,
    /// Registered slots that are not the head of their hash's list.
    duplicates: usize,
    /// Slots with the `PINNED` flag.
    pinned: usize,
    /// Active slots with the `IN_POOL` flag (counted in `inactive.len()` but not inactive).
    held_in_pool: usize,
    /// Active slots with the `DETACHED` flag (held, but no longer in the registry).
    detached: usize,
    pub(crate) events: EventHub,
    deferred: Deferred,
    /// Reused buffers for the hashes an eviction removes (only used while events are
    /// enabled), so that announcing them allocates nothing.
    pub(crate) scratch_evicted: Vec<Evicted>,
    pub(crate) scratch_hashes: Vec<SequenceHash>,
}

impl StoreState {
    /// `total` blocks, all in the reset pool, ids handed out in ascending order.
    pub(crate) fn new(
        total: usize,
        refs: RefCounts,
        backend: EvictionBackend,
        ctx: &PolicyContext,
        events: EventHub,
    ) -> Result<Self, TryReserveError> {
        let mut slots = Vec::new();
        slots.try_reserve_exact(total)?;
        slots.resize(total, RESET_SLOT);
        let mut reset = Vec::new();
        reset.try_reserve_exact(total)?;
        // Ids fit: the builder caps `total` below u32::MAX.
        reset.extend((0..total as u32).rev().map(BlockId::new));
        // One entry per registered hash at most, so never full.
        let registry = Registry::try_new(total)?;
        Ok(Self {
            slots,
            refs,
            reset,
            inactive: backend.build(total, ctx)?,
            registry,
            mutable: 0,
            active: 0,
            duplicates: 0,
            pinned: 0,
            held_in_pool: 0,
            detached: 0,
            events,
            deferred: Deferred::default(),
            scratch_evicted: Vec::new(),
            scratch_hashes: Vec::new(),
        })
    }

    /// Announces `gone` (hashes that left the cache, collected while events were enabled)
    /// as one `Removed` batch, and empties it (keeping its buffer for reuse).
    pub(crate) fn announce_removed(
        &mut self,
        gone: &mut Vec<SequenceHash>,
        reason: RemovalReason,
        metrics: &crate::metrics::BlockMetrics,
    ) {
        if gone.is_empty() {
            return;
        }
        for &hash in gone.iter() {
            self.events.removed(hash, reason);
        }
        self.events.commit(metrics);
        gone.clear();
    }

    /// Blocks an allocation can take now.
    pub(crate) fn available(&self) -> usize {
        self.reset.len() + self.inactive_len()
    }

    /// Inactive blocks: the pool's members except the held ones still in it (`IN_POOL`).
    fn inactive_len(&self) -> usize {
        self.inactive.len().saturating_sub(self.held_in_pool)
    }

    /// The next block to evict, skipping held blocks that a scan left in the pool (they
    /// leave the pool now and return to it, as the newest, when released). `None` only if
    /// the policy breaks its contract.
    #[inline]
    fn pop_evictable(&mut self) -> Option<BlockId> {
        loop {
            let id = self.inactive.pop_victim()?;
            let slot = &mut self.slots[id.index()];
            if slot.flags & IN_POOL == 0 {
                return Some(id);
            }
            debug_assert_eq!(slot.state, SlotState::Active);
            slot.flags &= !(IN_POOL | USED);
            self.held_in_pool -= 1;
        }
    }

    /// Takes `n` slots, from the reset pool first and then by evicting inactive blocks in the
    /// policy's order, passing each to `out`. All or nothing: `Err(available)` when fewer
    /// than `n` can be had, and nothing changes. Returns how many came from eviction.
    ///
    /// Hashes that leave the cache (no other registered copy remains) are appended to
    /// `evicted`.
    pub(crate) fn allocate(
        &mut self,
        n: usize,
        mut evicted: Option<&mut Vec<Evicted>>,
        mut out: impl FnMut(BlockId),
    ) -> Result<usize, usize> {
        let available = self.available();
        if n > available {
            return Err(available);
        }
        let from_reset = n.min(self.reset.len());
        let keep = self.reset.len() - from_reset;
        for id in self.reset.drain(keep..).rev() {
            self.slots[id.index()].state = SlotState::Mutable;
            out(id);
        }
        self.mutable += from_reset;
        if let Some(evicted) = evicted.as_deref_mut() {
            evicted.reserve(n - from_reset);
        }
        for _ in from_reset..n {
            let Some(id) = self.pop_evictable() else {
                // The policy broke its contract (len() > 0 but no victim). Everything handed
                // out so far is in the caller's handles, whose drop returns it.
                tracing::error!(
                    policy = self.inactive.name(),
                    "inactive pool reported blocks but gave no victim"
                );
                return Err(available);
            };
            debug_assert_eq!(self.slots[id.index()].state, SlotState::Inactive);
            let parent = self.slots[id.index()].parent();
            if let (Some(hash), Some(evicted)) = (self.unregister(id), evicted.as_deref_mut()) {
                evicted.push(Evicted {
                    block_id: id,
                    hash,
                    parent,
                });
            }
            self.slots[id.index()].state = SlotState::Mutable;
            self.mutable += 1;
            out(id);
        }
        Ok(n - from_reset)
    }

    /// A mutable (or staged) slot goes back to the reset pool.
    pub(crate) fn release_mutable(&mut self, id: BlockId) {
        let slot = &mut self.slots[id.index()];
        debug_assert_eq!(slot.state, SlotState::Mutable);
        slot.state = SlotState::Reset;
        self.mutable -= 1;
        self.reset.push(id);
    }

    /// Registers mutable slot `id` under `hash`; returns the slot the caller now holds one
    /// reference to (`id`, or the existing block's under policy `Reject`) and what happened.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn register(
        &mut self,
        id: BlockId,
        hash: SequenceHash,
        parent: Option<SequenceHash>,
        retention: Retention,
        policy: BlockDuplicationPolicy,
        reset_on_release: bool,
    ) -> (BlockId, Registered) {
        debug_assert_eq!(self.slots[id.index()].state, SlotState::Mutable);
        // One probe of the registry: the hash is either claimed for `id` here or found.
        let existing = match self.registry.find(hash.as_u64(), key_in(&self.slots)) {
            Err(vacant) => {
                // The slot's hash (the entry's key) is written before anyone probes again.
                let inserted = self.registry.insert(vacant, id.get());
                debug_assert!(inserted, "the registry has room for every slot");
                self.activate(id, hash, parent, retention, NIL, reset_on_release);
                return (id, Registered::New);
            }
            Ok(existing) => BlockId::new(existing),
        };
        match policy {
            BlockDuplicationPolicy::Reject => {
                self.acquire(existing);
                self.release_mutable(id);
                // The caller gets the existing block in place of its own: it keeps what the
                // caller asked of the cache too. A cacheable registration makes it cacheable
                // (a do-not-cache request that registered the prefix first must not take it
                // out of the cache for every later one), and the stronger retention wins.
                let slot = &mut self.slots[existing.index()];
                if !reset_on_release {
                    slot.flags &= !RESET_ON_RELEASE;
                }
                let mine = (slot.priority, slot.retention_ms);
                let theirs = (retention.priority(), retention.duration_ms());
                if theirs.0 > mine.0 || (theirs.0 == mine.0 && longer(theirs.1, mine.1)) {
                    slot.priority = theirs.0;
                    slot.retention_ms = theirs.1;
                }
                (existing, Registered::Deduplicated)
            }
            BlockDuplicationPolicy::Allow => {
                // Link `id` right after the head.
                let after = self.slots[existing.index()].dup_next;
                self.slots[existing.index()].dup_next = id.get();
                self.duplicates += 1;
                self.activate(id, hash, parent, retention, after, reset_on_release);
                (id, Registered::Duplicate)
            }
        }
    }

    fn activate(
        &mut self,
        id: BlockId,
        hash: SequenceHash,
        parent: Option<SequenceHash>,
        retention: Retention,
        dup_next: u32,
        reset_on_release: bool,
    ) {
        self.refs.set_first(id);
        let mut flags = if parent.is_some() { HAS_PARENT } else { 0 };
        if reset_on_release {
            flags |= RESET_ON_RELEASE;
        }
        self.slots[id.index()] = Slot {
            hash,
            parent: parent.unwrap_or(SequenceHash::new(0)),
            dup_next,
            retention_ms: retention.duration_ms(),
            state: SlotState::Active,
            flags,
            priority: retention.priority(),
        };
        self.mutable -= 1;
        self.active += 1;
    }

    /// Adds an owner to registered slot `id`, resurrecting it from the inactive pool (and
    /// taking a held block that a scan left in the pool out of it).
    #[inline]
    pub(crate) fn acquire(&mut self, id: BlockId) {
        let slot = &mut self.slots[id.index()];
        match slot.state {
            SlotState::Active => {
                if slot.flags & IN_POOL != 0 {
                    slot.flags &= !(IN_POOL | USED);
                    self.held_in_pool -= 1;
                    let removed = self.inactive.remove(id);
                    debug_assert!(removed, "held block {id:?} missing from its pool");
                }
                self.refs.add(id);
            }
            SlotState::Inactive => {
                slot.state = SlotState::Active;
                self.active += 1;
                self.refs.set_first(id);
                let removed = self.inactive.remove(id);
                debug_assert!(removed, "inactive block {id:?} missing from its pool");
            }
            SlotState::Reset | SlotState::Mutable => {
                debug_assert!(false, "acquire of unregistered block {id:?}");
            }
        }
    }

    /// Adds an owner to registered slot `id` without changing its place in the eviction
    /// order: an inactive block becomes active but stays in the pool where it was (`IN_POOL`),
    /// and goes back to being inactive there when its last owner is released.
    #[inline]
    fn acquire_in_place(&mut self, id: BlockId) {
        let slot = &mut self.slots[id.index()];
        match slot.state {
            SlotState::Active => self.refs.add(id),
            SlotState::Inactive => {
                slot.state = SlotState::Active;
                slot.flags |= IN_POOL;
                self.active += 1;
                self.held_in_pool += 1;
                self.refs.set_first(id);
            }
            SlotState::Reset | SlotState::Mutable => {
                debug_assert!(false, "acquire of unregistered block {id:?}");
            }
        }
    }

    /// Drops one owner of active slot `id` (its last owner, or one whose lock-free release
    /// found it the last an instant ago); the last one sends it to the inactive pool.
    #[inline]
    pub(crate) fn release_ref(&mut self, id: BlockId) {
        debug_assert_eq!(self.slots[id.index()].state, SlotState::Active);
        if self.refs.release_locked(id) {
            self.deactivate(id);
        }
    }

    /// Active slot `id` lost its last owner: into the inactive pool (or, if a scan left it
    /// there, simply inactive again in its old place, requeued if its holder used it); a
    /// "do not cache" or purged block leaves the cache instead.
    #[inline]
    fn deactivate(&mut self, id: BlockId) {
        let slot = &mut self.slots[id.index()];
        if slot.flags & (RESET_ON_RELEASE | DETACHED) != 0 {
            self.leave_on_release(id);
            return;
        }
        slot.state = SlotState::Inactive;
        self.active -= 1;
        if slot.flags & IN_POOL != 0 {
            let used = slot.flags & USED != 0;
            slot.flags &= !(IN_POOL | USED);
            self.held_in_pool -= 1;
            if used {
                let entry = InactiveEntry::new(id, slot.hash, slot.parent())
                    .with_retention(slot.retention());
                self.inactive.requeue(entry);
            }
        } else {
            let entry =
                InactiveEntry::new(id, slot.hash, slot.parent()).with_retention(slot.retention());
            self.inactive.insert(entry);
        }
    }

    /// The last owner of a "do not cache" or purged block released it: to the reset pool.
    #[cold]
    fn leave_on_release(&mut self, id: BlockId) {
        let flags = self.slots[id.index()].flags;
        if flags & IN_POOL != 0 {
            self.slots[id.index()].flags &= !(IN_POOL | USED);
            self.held_in_pool -= 1;
            let removed = self.inactive.remove(id);
            debug_assert!(removed, "held block {id:?} missing from its pool");
        }
        if flags & DETACHED != 0 {
            // Already out of the registry (its removal was announced by the purge).
            self.detached -= 1;
            self.slots[id.index()].flags = 0;
        } else {
            let gone = self.unregister(id);
            self.deferred.released += 1;
            if let Some(hash) = gone
                && self.events.enabled()
            {
                self.deferred.gone.push(hash);
            }
        }
        self.slots[id.index()].state = SlotState::Reset;
        self.active -= 1;
        self.reset.push(id);
    }

    /// The registered block for the probe's hash, with one more owner.
    #[inline]
    pub(crate) fn lookup_acquire(&mut self, probe: Probe) -> Option<BlockId> {
        let id = self.registered_at(probe)?;
        self.acquire(id);
        Some(id)
    }

    /// The registered block for the probe's hash, with one more owner, leaving the eviction
    /// order as it is (see [`acquire_in_place`](Self::acquire_in_place)).
    #[inline]
    pub(crate) fn lookup_acquire_in_place(&mut self, probe: Probe) -> Option<BlockId> {
        let id = self.registered_at(probe)?;
        self.acquire_in_place(id);
        Some(id)
    }

    /// Adds an owner to slot `id` if it is registered under `hash`.
    pub(crate) fn upgrade(&mut self, id: BlockId, hash: SequenceHash) -> bool {
        let slot = &self.slots[id.index()];
        let registered = matches!(slot.state, SlotState::Active | SlotState::Inactive)
            && slot.flags & DETACHED == 0;
        if registered && slot.hash == hash {
            self.acquire(id);
            true
        } else {
            false
        }
    }

    /// Whether a block is registered under the probe's hash (active or inactive).
    #[inline]
    pub(crate) fn is_registered(&self, probe: Probe) -> bool {
        self.registered_at(probe).is_some()
    }

    /// A walk of `hashes` through the registry (see [`Walk`]), its first steps prefetched.
    #[inline]
    pub(crate) fn walk<'h, const HANDLES: bool>(
        &self,
        hashes: &'h [SequenceHash],
    ) -> Walk<'h, HANDLES> {
        let mut walk = Walk {
            hashes,
            mixes: [0; RING],
        };
        for j in 0..AHEAD {
            walk.home(self, j);
        }
        for j in 0..AHEAD / 2 {
            walk.record(self, j);
        }
        walk
    }

    /// Starts loading what registering mutable block `id` under `hash` touches: the
    /// registry's home slot of `hash`, and `id`'s slot record and owner count.
    #[inline]
    pub(crate) fn prefetch_register(&self, id: BlockId, hash: SequenceHash) {
        self.registry
            .prefetch_mixed(self.registry.mixed(hash.as_u64()));
        if let Some(slot) = self.slots.get(id.index()) {
            crate::prefetch::prefetch(slot);
            self.refs.prefetch(id);
        }
    }

    /// `hash`'s probe, for a single lookup.
    #[inline]
    pub(crate) fn probe(&self, hash: SequenceHash) -> Probe {
        Probe {
            hash,
            mixed: self.registry.mixed(hash.as_u64()),
        }
    }

    /// Starts loading the slot record of the block most likely registered under the hash
    /// whose mix is `mixed` (see [`Index::home_record_mixed`]); for `HANDLES` (a walk that
    /// takes handles), with its owner count.
    #[inline]
    fn prefetch_record<const HANDLES: bool>(&self, mixed: u64) {
        if let Some(r) = self.registry.home_record_mixed(mixed)
            && let Some(slot) = self.slots.get(r as usize)
        {
            crate::prefetch::prefetch(slot);
            if HANDLES {
                self.refs.prefetch(BlockId::new(r));
            }
        }
    }

    /// The registry's head for `hash`: the block a match returns.
    #[inline]
    fn registered(&self, hash: SequenceHash) -> Option<BlockId> {
        self.registered_at(self.probe(hash))
    }

    /// [`registered`](Self::registered) for a probe.
    #[inline]
    fn registered_at(&self, probe: Probe) -> Option<BlockId> {
        self.registry
            .get_mixed(probe.mixed, probe.hash.as_u64(), key_in(&self.slots))
            .map(BlockId::new)
    }

    /// Records an access to the inactive block registered under `hash`; returns whether
    /// there was one.
    pub(crate) fn touch(&mut self, probe: Probe) -> bool {
        match self.registered_at(probe) {
            Some(id) if self.slots[id.index()].state == SlotState::Inactive => {
                self.inactive.touch(id)
            }
            _ => false,
        }
    }

    /// Moves every inactive block to the reset pool; returns how many, and appends the
    /// hashes that left the cache to `removed`.
    pub(crate) fn reset_inactive(&mut self, mut removed: Option<&mut Vec<SequenceHash>>) -> usize {
        let mut moved = 0;
        while let Some(id) = self.pop_evictable() {
            if let (Some(gone), Some(removed)) = (self.unregister(id), removed.as_deref_mut()) {
                removed.push(gone);
            }
            self.slots[id.index()].state = SlotState::Reset;
            self.reset.push(id);
            moved += 1;
        }
        moved
    }

    /// Moves the inactive blocks registered under `hash` (every copy, under `Allow`) to the
    /// reset pool; returns how many, and whether the hash left the cache.
    pub(crate) fn invalidate(&mut self, hash: SequenceHash) -> (usize, bool) {
        let mut moved = 0;
        let mut cur = self.registered(hash).map_or(NIL, |id| id.get());
        while cur != NIL {
            let id = BlockId::new(cur);
            cur = self.slots[id.index()].dup_next;
            if self.slots[id.index()].state == SlotState::Inactive {
                self.inactive.remove(id);
                self.unregister(id);
                self.slots[id.index()].state = SlotState::Reset;
                self.reset.push(id);
                moved += 1;
            }
        }
        (moved, moved > 0 && self.registered(hash).is_none())
    }

    /// Removes every block registered under `hash` from the cache: inactive ones to the reset
    /// pool now; held ones (and pinned ones: the pin is dropped) are detached from the
    /// registry now, so nobody can match them any more, and go to the reset pool when their
    /// last owner releases them.
    pub(crate) fn purge(&mut self, hash: SequenceHash) -> Purged {
        let mut out = Purged::default();
        let mut cur = self.registered(hash).map_or(NIL, |id| id.get());
        while cur != NIL {
            let id = BlockId::new(cur);
            cur = self.slots[id.index()].dup_next;
            if self.slots[id.index()].flags & PINNED != 0 {
                // The pin's reference goes; the block may become inactive.
                self.unpin_slot(id);
            }
            match self.slots[id.index()].state {
                SlotState::Inactive => {
                    self.inactive.remove(id);
                    self.unregister(id);
                    self.slots[id.index()].state = SlotState::Reset;
                    self.reset.push(id);
                    out.reset += 1;
                }
                SlotState::Active => {
                    if self.slots[id.index()].flags & IN_POOL != 0 {
                        self.held_in_pool -= 1;
                        let removed = self.inactive.remove(id);
                        debug_assert!(removed, "held block {id:?} missing from its pool");
                    }
                    self.unlink(id);
                    self.slots[id.index()].flags = DETACHED;
                    self.detached += 1;
                    out.detached += 1;
                }
                // Dropping the pin released a "do not cache" block: it left the cache on
                // its own (announced as `Released`).
                SlotState::Reset => {}
                SlotState::Mutable => {
                    debug_assert!(false, "registry reaches unregistered {id:?}");
                }
            }
        }
        out.left = out.reset + out.detached > 0 && self.registered(hash).is_none();
        out
    }

    /// Evicts up to `max` inactive blocks in the policy's order, never touching the reset
    /// pool; each evicted slot becomes a mutable block passed to `out` with its record and
    /// whether its hash left the cache. Returns how many were evicted.
    pub(crate) fn evict_inactive(
        &mut self,
        max: usize,
        mut out: impl FnMut(Evicted, bool),
    ) -> usize {
        let n = max.min(self.inactive_len());
        for done in 0..n {
            let Some(id) = self.pop_evictable() else {
                tracing::error!(
                    policy = self.inactive.name(),
                    "inactive pool reported blocks but gave no victim"
                );
                return done;
            };
            let Slot { hash, .. } = self.slots[id.index()];
            let parent = self.slots[id.index()].parent();
            let left = self.unregister(id).is_some();
            self.slots[id.index()].state = SlotState::Mutable;
            self.mutable += 1;
            out(
                Evicted {
                    block_id: id,
                    hash,
                    parent,
                },
                left,
            );
        }
        n
    }

    /// Walks `hashes` as a prefix match would, changing nothing: how many leading hashes are
    /// registered, split into held (active) and inactive blocks.
    pub(crate) fn probe_prefix(&self, hashes: &[SequenceHash]) -> Probed {
        let mut out = Probed::default();
        let mut walk = self.walk::<false>(hashes);
        for i in 0..hashes.len() {
            let probe = walk.step(self, i);
            let Some(id) = self.registered_at(probe) else {
                break;
            };
            match self.slots[id.index()].state {
                SlotState::Inactive => out.inactive += 1,
                _ => out.active += 1,
            }
        }
        out
    }

    /// Every registered hash (one per hash: the block a match would return) with its parent,
    /// in registry order.
    pub(crate) fn registered_blocks(&self) -> Vec<SnapshotBlock> {
        self.registry
            .records()
            .map(|r| {
                let slot = &self.slots[r as usize];
                SnapshotBlock {
                    hash: slot.hash,
                    parent: slot.parent(),
                }
            })
            .collect()
    }

    /// Removes registered slot `id` from the registry; returns its hash if no other slot
    /// holds it any more. The caller sets the slot's new state.
    fn unregister(&mut self, id: BlockId) -> Option<SequenceHash> {
        debug_assert_eq!(self.refs.get(id), 0, "unregistering held block {id:?}");
        self.unlink(id)
    }

    /// [`unregister`](Self::unregister) without requiring that nobody holds the block (a
    /// purge detaches held blocks).
    fn unlink(&mut self, id: BlockId) -> Option<SequenceHash> {
        let Slot { hash, dup_next, .. } = self.slots[id.index()];
        let slot = &mut self.slots[id.index()];
        slot.dup_next = NIL;
        slot.flags = 0;
        // One probe of the registry: the head is this block (the common case: removed, or
        // replaced by the next duplicate) or another (this one is a duplicate behind it).
        if dup_next == NIL {
            if self
                .registry
                .remove(hash.as_u64(), id.get(), key_in(&self.slots))
            {
                return Some(hash);
            }
        } else if self.registry.replace(hash.as_u64(), id.get(), dup_next) {
            self.duplicates -= 1;
            return None;
        }
        let Some(head) = self.registered(hash) else {
            debug_assert!(false, "registered block {id:?} missing from the registry");
            return None;
        };
        // A duplicate: unlink it from the list that starts at the head.
        let mut cur = head.get();
        while cur != NIL {
            let next = self.slots[cur as usize].dup_next;
            if next == id.get() {
                self.slots[cur as usize].dup_next = dup_next;
                break;
            }
            cur = next;
        }
        debug_assert_ne!(cur, NIL, "duplicate {id:?} not in its hash's list");
        self.duplicates -= 1;
        None
    }

    /// Pins the blocks registered under `hashes` (the one `match_blocks` would return), all
    /// or nothing: refused if a hash is not registered or if the new pins would exceed
    /// `budget`. Returns how many were newly pinned (already pinned ones count as done).
    pub(crate) fn pin(
        &mut self,
        hashes: &[SequenceHash],
        budget: usize,
    ) -> Result<usize, PinRefusal> {
        // Pass 1: mark what would be newly pinned (marks make repeated hashes count once).
        let mut new = 0;
        let mut refusal = None;
        for &hash in hashes {
            let Some(id) = self.registered(hash) else {
                refusal = Some(PinRefusal::NotRegistered(hash));
                break;
            };
            let slot = &mut self.slots[id.index()];
            if slot.flags & (PINNED | PIN_PENDING) == 0 {
                slot.flags |= PIN_PENDING;
                new += 1;
            }
        }
        if refusal.is_none() && self.pinned + new > budget {
            refusal = Some(PinRefusal::OverBudget {
                requested: new,
                pinned: self.pinned,
            });
        }
        // Pass 2: apply or undo the marks.
        for &hash in hashes {
            let Some(id) = self.registered(hash) else {
                continue;
            };
            let flags = self.slots[id.index()].flags;
            if flags & PIN_PENDING == 0 {
                continue;
            }
            self.slots[id.index()].flags = flags & !PIN_PENDING;
            if refusal.is_none() {
                self.slots[id.index()].flags |= PINNED;
                self.acquire(id);
            }
        }
        match refusal {
            Some(r) => Err(r),
            None => {
                self.pinned += new;
                Ok(new)
            }
        }
    }

    /// Unpins the blocks registered under `hashes`; returns how many were pinned.
    pub(crate) fn unpin(&mut self, hashes: &[SequenceHash]) -> usize {
        let mut n = 0;
        for &hash in hashes {
            if let Some(id) = self.registered(hash) {
                n += usize::from(self.unpin_slot(id));
            }
        }
        n
    }

    /// Unpins every pinned block; returns how many.
    pub(crate) fn unpin_all(&mut self) -> usize {
        let mut n = 0;
        for i in 0..self.slots.len() {
            if self.pinned == 0 {
                break;
            }
            n += usize::from(self.unpin_slot(BlockId::new(i as u32)));
        }
        n
    }

    fn unpin_slot(&mut self, id: BlockId) -> bool {
        let slot = &mut self.slots[id.index()];
        if slot.flags & PINNED == 0 {
            return false;
        }
        slot.flags &= !PINNED;
        self.pinned -= 1;
        self.release_ref(id);
        true
    }

    /// A coherent snapshot of the counts.
    pub(crate) fn counts(&self) -> PoolCounts {
        PoolCounts {
            total: self.slots.len(),
            reset: self.reset.len(),
            inactive: self.inactive_len(),
            mutable: self.mutable,
            active: self.active,
            registered_hashes: self.registry.len(),
            duplicates: self.duplicates,
            pinned: self.pinned,
        }
    }

    fn gauges(&self) -> Gauges {
        Gauges {
            reset: self.reset.len(),
            inactive: self.inactive_len(),
            mutable: self.mutable,
            active: self.active,
            pinned: self.pinned,
        }
    }

    /// Whether no hash is registered.
    pub(crate) fn registry_is_empty(&self) -> bool {
        self.registry.len() == 0
    }

    /// A use of active slot `id`, which the caller holds: if a non-touching scan left it in
    /// the inactive pool (`IN_POOL`), files it so that its last release files it as just
    /// used. A pool that [requeues in place](InactivePool::requeues_in_place) keeps it,
    /// marked `USED`, and requeues it at the release; any other takes it out now (as
    /// [`acquire`](Self::acquire) does) and the release inserts it. Returns whether it did
    /// (not for a slot marked already). Any other slot is left as it is.
    pub(crate) fn use_held(&mut self, id: BlockId) -> bool {
        let Some(slot) = self.slots.get_mut(id.index()) else {
            return false;
        };
        if slot.state != SlotState::Active || slot.flags & (IN_POOL | USED) != IN_POOL {
            return false;
        }
        if self.inactive.requeues_in_place() {
            slot.flags |= USED;
        } else {
            // Out of the pool now; the release inserts it as just used.
            slot.flags &= !IN_POOL;
            self.held_in_pool -= 1;
            let removed = self.inactive.remove(id);
            debug_assert!(removed, "held block {id:?} missing from its pool");
        }
        true
    }
}

/// Whether expiry `a` (ms, `NO_EXPIRY` for none) holds longer than `b`.
fn longer(a: u32, b: u32) -> bool {
    let never = crate::retention::NO_EXPIRY;
    b != never && (a == never || a > b)
}

#[cfg(test)]
mod walk_tests {
    use proptest::prelude::*;

    use crate::{BlockManager, Device, ImmutableBlock, SequenceHash};

    proptest! {
        /// A walk's ring of mixes hands every step the probe a single lookup computes, for
        /// walks shorter than its look-ahead, as long, and longer than its ring.
        #[test]
        fn a_walk_probes_each_hash_as_a_single_lookup_does(
            keys in prop::collection::vec(any::<u64>(), 0..40),
        ) {
            let m = BlockManager::<Device>::builder().block_count(4).block_size(16).build().unwrap();
            let state = m.store().lock();
            let hashes: Vec<SequenceHash> = keys.into_iter().map(SequenceHash::new).collect();
            let mut read = state.walk::<false>(&hashes);
            let mut write = state.walk::<true>(&hashes);
            for (i, &h) in hashes.iter().enumerate() {
                let one = state.probe(h);
                for p in [read.step(&state, i), write.step(&state, i)] {
                    prop_assert_eq!((p.hash, p.mixed), (one.hash, one.mixed));
                }
            }
        }
    }

    /// Walks longer than the ring find every registered block, and nothing else, whatever
    /// the pattern of hits and misses.
    #[test]
    fn long_walks_find_exactly_the_registered_blocks() {
        let m = BlockManager::<Device>::builder()
            .block_count(64)
            .block_size(16)
            .build()
            .unwrap();
        let staged = m
            .allocate_blocks(64)
            .unwrap()
            .into_iter()
            .zip((0..128).step_by(2))
            .map(|(b, h)| b.stage(SequenceHash::new(h), 16).unwrap())
            .collect();
        ImmutableBlock::release_all(m.register_blocks(staged).unwrap());
        let all: Vec<SequenceHash> = (0..128).map(SequenceHash::new).collect();
        let found = m.contains_each(&all);
        assert!(found.iter().enumerate().all(|(h, &f)| f == (h % 2 == 0)));
        let scanned = m.scan_matches(&all, false);
        assert_eq!(scanned.len(), 64);
        assert!(scanned.iter().all(|b| b.sequence_hash().as_u64() % 2 == 0));
        ImmutableBlock::release_all(scanned);
        let evens: Vec<SequenceHash> = (0..128).step_by(2).map(SequenceHash::new).collect();
        assert_eq!(m.match_blocks(&evens).len(), 64);
        assert_eq!(m.touch_blocks(&all), 64);
        assert_eq!(m.probe_prefix(&evens).hits(), 64);
        m.check_invariants().unwrap();
    }
}
