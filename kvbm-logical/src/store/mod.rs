//! The block store: every slot's state, the reset pool, the inactive pool and the registry,
//! under **one** mutex.
//!
//! Each public manager operation takes the lock once per call. Transitions are methods on
//! [`StoreState`], which the caller holds locked; they never allocate (all tables are sized at
//! construction) and never drop a handle (a handle's drop takes the lock, which would
//! deadlock).

mod invariants;

use std::collections::HashMap;
use std::collections::TryReserveError;
use std::collections::hash_map::Entry;

use parking_lot::Mutex;

use crate::frequency::FrequencySketch;
use crate::hashing::SequenceHash;
use crate::ids::{BlockId, ManagerId};
use crate::policy::{EvictionBackend, InactiveEntry, InactivePool, NIL};

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
    pub(crate) state: Mutex<StoreState>,
    pub(crate) frequency: Option<FrequencySketch>,
}

impl BlockStore {
    /// Returns a mutable or complete block's slot to the reset pool.
    pub(crate) fn release_mutable(&self, id: BlockId) {
        self.state.lock().release_mutable(id);
    }

    /// Drops one owner of a registered block.
    pub(crate) fn release_ref(&self, id: BlockId) {
        self.state.lock().release_ref(id);
    }

    /// Adds one owner to an active block (an `ImmutableBlock` clone).
    pub(crate) fn add_ref(&self, id: BlockId) {
        self.state.lock().acquire(id);
    }

    /// Adds an owner to slot `id` if it still holds `hash` (active or inactive).
    pub(crate) fn upgrade(&self, id: BlockId, hash: SequenceHash) -> bool {
        self.state.lock().upgrade(id, hash)
    }

    /// Records accesses in the frequency sketch, if tracking is on. Called after the lock.
    pub(crate) fn record_accesses(&self, hashes: impl Iterator<Item = SequenceHash>) {
        if let Some(sketch) = &self.frequency {
            for hash in hashes {
                sketch.increment(hash);
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotState {
    /// In the reset pool.
    Reset,
    /// Held by a `MutableBlock` or `CompleteBlock`.
    Mutable,
    /// Registered, held by `refs >= 1` `ImmutableBlock`s.
    Active,
    /// Registered, in the inactive pool.
    Inactive,
}

/// One slot. `hash`, `parent` and the duplicate links are meaningful only while registered.
#[derive(Clone, Copy, Debug)]
struct Slot {
    hash: SequenceHash,
    /// The parent's hash, meaningful when `has_parent` (an `Option` would make the slot 40
    /// bytes instead of 32: two slots per cache line matter on the allocation path).
    parent: SequenceHash,
    refs: u32,
    /// Other registered slots with the same hash (policy `Allow`): an index-linked list whose
    /// head is the registry's entry.
    dup_prev: u32,
    dup_next: u32,
    state: SlotState,
    has_parent: bool,
}

const _: () = assert!(std::mem::size_of::<Slot>() == 32);

impl Slot {
    fn parent(&self) -> Option<SequenceHash> {
        self.has_parent.then_some(self.parent)
    }
}

const RESET_SLOT: Slot = Slot {
    hash: SequenceHash::new(0),
    parent: SequenceHash::new(0),
    has_parent: false,
    refs: 0,
    dup_prev: NIL,
    dup_next: NIL,
    state: SlotState::Reset,
};

/// The registry: sequence hash → the first registered slot with that hash. The keys are
/// already hashes; foldhash mixes them cheaply so that structured ids (0, 1, 2, ... from a
/// trace) spread as well as random ones.
type Registry = HashMap<SequenceHash, BlockId, foldhash::fast::RandomState>;

/// Everything the store lock protects.
pub(crate) struct StoreState {
    slots: Vec<Slot>,
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
}

impl StoreState {
    /// `total` blocks, all in the reset pool, ids handed out in ascending order.
    pub(crate) fn new(total: usize, backend: EvictionBackend) -> Result<Self, TryReserveError> {
        let mut slots = Vec::new();
        slots.try_reserve_exact(total)?;
        slots.resize(total, RESET_SLOT);
        let mut reset = Vec::new();
        reset.try_reserve_exact(total)?;
        // Ids fit: the builder caps `total` below u32::MAX.
        reset.extend((0..total as u32).rev().map(BlockId::new));
        let mut registry = Registry::default();
        // Twice the most entries there can be: removals leave tombstones, and with the table
        // at most half full hashbrown always cleans them up in place instead of growing.
        registry.try_reserve(total.saturating_mul(2))?;
        Ok(Self {
            slots,
            reset,
            inactive: backend.build(total)?,
            registry,
            mutable: 0,
            active: 0,
            duplicates: 0,
        })
    }

    /// Blocks an allocation can take now.
    pub(crate) fn available(&self) -> usize {
        self.reset.len() + self.inactive.len()
    }

    /// Takes `n` slots, from the reset pool first and then by evicting inactive blocks in the
    /// policy's order, passing each to `out`. All or nothing: `Err(available)` when fewer
    /// than `n` can be had, and nothing changes.
    ///
    /// Hashes that leave the cache (no other registered copy remains) are appended to
    /// `evicted`.
    pub(crate) fn allocate(
        &mut self,
        n: usize,
        mut evicted: Option<&mut Vec<SequenceHash>>,
        mut out: impl FnMut(BlockId),
    ) -> Result<(), usize> {
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
            let Some(id) = self.inactive.pop_victim() else {
                // The policy broke its contract (len() > 0 but no victim). Everything handed
                // out so far is in the caller's handles, whose drop returns it.
                tracing::error!(
                    policy = self.inactive.name(),
                    "inactive pool reported blocks but gave no victim"
                );
                return Err(available);
            };
            debug_assert_eq!(self.slots[id.index()].state, SlotState::Inactive);
            if let (Some(gone), Some(evicted)) = (self.unregister(id), evicted.as_deref_mut()) {
                evicted.push(gone);
            }
            self.slots[id.index()].state = SlotState::Mutable;
            self.mutable += 1;
            out(id);
        }
        Ok(())
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
    /// reference to (`id`, or the existing block's under policy `Reject`).
    pub(crate) fn register(
        &mut self,
        id: BlockId,
        hash: SequenceHash,
        parent: Option<SequenceHash>,
        policy: BlockDuplicationPolicy,
    ) -> BlockId {
        debug_assert_eq!(self.slots[id.index()].state, SlotState::Mutable);
        // One probe of the registry: the hash is either claimed for `id` here or found.
        let existing = match self.registry.entry(hash) {
            Entry::Vacant(vacant) => {
                vacant.insert(id);
                self.activate(id, hash, parent);
                return id;
            }
            Entry::Occupied(occupied) => *occupied.get(),
        };
        match policy {
            BlockDuplicationPolicy::Reject => {
                self.acquire(existing);
                self.release_mutable(id);
                existing
            }
            BlockDuplicationPolicy::Allow => {
                // Link `id` right after the head.
                let head = existing.get();
                let after = self.slots[existing.index()].dup_next;
                self.slots[existing.index()].dup_next = id.get();
                if after != NIL {
                    self.slots[after as usize].dup_prev = id.get();
                }
                let slot = &mut self.slots[id.index()];
                slot.dup_prev = head;
                slot.dup_next = after;
                self.duplicates += 1;
                self.activate(id, hash, parent);
                id
            }
        }
    }

    fn activate(&mut self, id: BlockId, hash: SequenceHash, parent: Option<SequenceHash>) {
        let slot = &mut self.slots[id.index()];
        slot.hash = hash;
        slot.parent = parent.unwrap_or(SequenceHash::new(0));
        slot.has_parent = parent.is_some();
        slot.refs = 1;
        slot.state = SlotState::Active;
        self.mutable -= 1;
        self.active += 1;
    }

    /// Adds an owner to registered slot `id`, resurrecting it from the inactive pool.
    pub(crate) fn acquire(&mut self, id: BlockId) {
        let slot = &mut self.slots[id.index()];
        match slot.state {
            SlotState::Active => slot.refs += 1,
            SlotState::Inactive => {
                slot.state = SlotState::Active;
                slot.refs = 1;
                self.active += 1;
                let removed = self.inactive.remove(id);
                debug_assert!(removed, "inactive block {id:?} missing from its pool");
            }
            SlotState::Reset | SlotState::Mutable => {
                debug_assert!(false, "acquire of unregistered block {id:?}");
            }
        }
    }

    /// Drops one owner of active slot `id`; the last one sends it to the inactive pool.
    pub(crate) fn release_ref(&mut self, id: BlockId) {
        let slot = &mut self.slots[id.index()];
        debug_assert_eq!(slot.state, SlotState::Active);
        slot.refs -= 1;
        if slot.refs == 0 {
            slot.state = SlotState::Inactive;
            self.active -= 1;
            let entry = InactiveEntry::new(id, slot.hash, slot.parent());
            self.inactive.insert(entry);
        }
    }

    /// The registered block for `hash`, with one more owner.
    pub(crate) fn lookup_acquire(&mut self, hash: SequenceHash) -> Option<BlockId> {
        let id = *self.registry.get(&hash)?;
        self.acquire(id);
        Some(id)
    }

    /// Adds an owner to slot `id` if it is registered under `hash`.
    pub(crate) fn upgrade(&mut self, id: BlockId, hash: SequenceHash) -> bool {
        let slot = &self.slots[id.index()];
        let registered = matches!(slot.state, SlotState::Active | SlotState::Inactive);
        if registered && slot.hash == hash {
            self.acquire(id);
            true
        } else {
            false
        }
    }

    /// Records an access to the inactive block registered under `hash`; returns whether
    /// there was one.
    pub(crate) fn touch(&mut self, hash: SequenceHash) -> bool {
        match self.registry.get(&hash) {
            Some(&id) => self.inactive.touch(id),
            None => false,
        }
    }

    /// Moves every inactive block to the reset pool; returns how many.
    pub(crate) fn reset_inactive(&mut self) -> usize {
        let mut moved = 0;
        while let Some(id) = self.inactive.pop_victim() {
            self.unregister(id);
            self.slots[id.index()].state = SlotState::Reset;
            self.reset.push(id);
            moved += 1;
        }
        moved
    }

    /// Removes registered slot `id` from the registry; returns its hash if no other slot
    /// holds it any more. The caller sets the slot's new state.
    fn unregister(&mut self, id: BlockId) -> Option<SequenceHash> {
        let Slot {
            hash,
            dup_prev,
            dup_next,
            ..
        } = self.slots[id.index()];
        let slot = &mut self.slots[id.index()];
        slot.dup_prev = NIL;
        slot.dup_next = NIL;
        slot.refs = 0;
        if dup_next != NIL {
            self.slots[dup_next as usize].dup_prev = dup_prev;
        }
        if dup_prev != NIL {
            self.slots[dup_prev as usize].dup_next = dup_next;
            self.duplicates -= 1;
            return None;
        }
        // `id` was the head.
        if dup_next == NIL {
            self.registry.remove(&hash);
            Some(hash)
        } else {
            self.registry.insert(hash, BlockId::new(dup_next));
            self.duplicates -= 1;
            None
        }
    }

    /// A coherent snapshot of the counts.
    pub(crate) fn counts(&self) -> PoolCounts {
        PoolCounts {
            total: self.slots.len(),
            reset: self.reset.len(),
            inactive: self.inactive.len(),
            mutable: self.mutable,
            active: self.active,
            registered_hashes: self.registry.len(),
            duplicates: self.duplicates,
        }
    }
}
