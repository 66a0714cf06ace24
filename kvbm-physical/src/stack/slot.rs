//! Slot tiers (a block manager plus the memory its block ids index) and the read-only views
//! the stack hands out, so that no caller can allocate or register around the stack.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use kvbm_logical::{
    BlockId, BlockManager, BlockMetrics, BlockTier, EventSubscriber, EvictionBackend,
    InvariantError, PoolCounts, SequenceHash,
};
use parking_lot::Mutex;

use crate::cuda::CudaEvent;
use crate::layout::Layout;
use crate::store_tier::{StoreStats, StoreTier};

use super::config::{Admission, Probe};

/// A block manager and the memory its block ids index.
#[derive(Debug)]
pub(crate) struct SlotTier<T: BlockTier> {
    pub(crate) manager: BlockManager<T>,
    pub(crate) layout: Arc<Layout>,
}

impl<T: BlockTier> SlotTier<T> {
    pub(crate) fn view(&self) -> SlotView<'_, T> {
        SlotView { tier: self }
    }
}

/// A read-only view of a slot tier (G1 or G2): counts, presence, metrics, events and the
/// memory. It cannot allocate, register, match or evict: those go through the
/// [`TierStack`](super::TierStack), which keeps offload and write-back consistent.
///
/// The layout is exposed because the engine computes into G1's memory (and tests read it);
/// writing a block the caller does not hold as a `MutableBlock` is a logic error.
#[derive(Clone, Copy, Debug)]
pub struct SlotView<'a, T: BlockTier> {
    tier: &'a SlotTier<T>,
}

impl<'a, T: BlockTier> SlotView<'a, T> {
    /// The memory the block ids index.
    pub fn layout(&self) -> &'a Arc<Layout> {
        &self.tier.layout
    }

    /// Blocks managed.
    pub fn total_blocks(&self) -> usize {
        self.tier.manager.total_blocks()
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.tier.manager.block_size()
    }

    /// Blocks an allocation could take now (reset + inactive).
    pub fn available_blocks(&self) -> usize {
        self.tier.manager.available_blocks()
    }

    /// Where every block is, as one snapshot.
    pub fn counts(&self) -> PoolCounts {
        self.tier.manager.counts()
    }

    /// Recounts and checks the manager's invariants (tests, health checks).
    pub fn check_invariants(&self) -> Result<PoolCounts, InvariantError> {
        self.tier.manager.check_invariants()
    }

    /// Whether `hash` is registered; takes no handle, changes no eviction order.
    pub fn contains(&self, hash: SequenceHash) -> bool {
        self.tier.manager.contains(hash)
    }

    /// [`contains`](Self::contains) for each hash, under one lock.
    pub fn contains_each(&self, hashes: &[SequenceHash]) -> Vec<bool> {
        self.tier.manager.contains_each(hashes)
    }

    /// Estimated recent accesses to `hash`; `None` without frequency tracking.
    pub fn frequency(&self, hash: SequenceHash) -> Option<u32> {
        self.tier.manager.frequency(hash)
    }

    /// The eviction policy of the tier's inactive pool.
    pub fn eviction_backend(&self) -> EvictionBackend {
        self.tier.manager.eviction_backend()
    }

    /// The manager's own metrics (pool gauges, allocations, evictions, ...).
    pub fn metrics(&self) -> &'a BlockMetrics {
        self.tier.manager.metrics()
    }

    /// Subscribes to the manager's KV events.
    pub fn subscribe(&self, capacity: usize) -> EventSubscriber {
        self.tier.manager.subscribe(capacity)
    }
}

/// A store tier inside the stack, with its boundary policies.
#[derive(Debug)]
pub(crate) struct StoreSlot {
    pub(crate) tier: Arc<dyn StoreTier>,
    pub(crate) admission: Admission,
    pub(crate) probe: Probe,
}

/// A read-only view of a store tier: its medium, presence hints and counters.
#[derive(Clone, Copy, Debug)]
pub struct StoreView<'a> {
    pub(crate) slot: &'a StoreSlot,
}

impl StoreView<'_> {
    /// The medium's name (`"DISK"`, `"REMOTE"`, ...).
    pub fn medium(&self) -> &'static str {
        self.slot.tier.medium()
    }

    /// Whether the store (probably) holds each hash; may cost a round trip.
    pub fn contains(&self, hashes: &[SequenceHash]) -> Vec<bool> {
        self.slot.tier.contains(hashes)
    }

    /// The store's own counters.
    pub fn stats(&self) -> StoreStats {
        self.slot.tier.stats()
    }

    /// How lookups probe it.
    pub fn probe(&self) -> Probe {
        self.slot.probe
    }

    /// Its admission filter.
    pub fn admission(&self) -> Admission {
        self.slot.admission
    }
}

/// Write-back: the engine's event of each G1 slot's registration, kept until the reclaimer
/// copies the slot (the copy must wait for the kernels that wrote it). Untouched — no lock,
/// no allocation — until the first registration that carries an event, so the CPU path
/// pays one relaxed load per registration.
#[derive(Debug)]
pub(crate) struct SlotEvents {
    any: AtomicBool,
    events: Mutex<Vec<Option<CudaEvent>>>,
}

impl SlotEvents {
    pub(crate) fn new(slots: usize) -> Self {
        Self {
            any: AtomicBool::new(false),
            events: Mutex::new(vec![None; slots]),
        }
    }

    /// Remembers `event` as the last writer of `ids` (`None`: nothing to wait for).
    pub(crate) fn record(&self, ids: impl IntoIterator<Item = BlockId>, event: Option<&CudaEvent>) {
        match event {
            Some(e) => {
                self.any.store(true, Ordering::Relaxed);
                let mut events = self.events.lock();
                for id in ids {
                    if let Some(slot) = events.get_mut(id.index()) {
                        *slot = Some(e.clone());
                    }
                }
            }
            None => self.clear(ids),
        }
    }

    /// Forgets the events of `ids` (their slots were written by kvbm's own copies).
    pub(crate) fn clear(&self, ids: impl IntoIterator<Item = BlockId>) {
        if !self.any.load(Ordering::Relaxed) {
            return;
        }
        let mut events = self.events.lock();
        for id in ids {
            if let Some(slot) = events.get_mut(id.index()) {
                *slot = None;
            }
        }
    }

    /// Takes the distinct events of `ids` (for a copy that reads those slots).
    pub(crate) fn take(&self, ids: &[BlockId]) -> Vec<CudaEvent> {
        if !self.any.load(Ordering::Relaxed) {
            return Vec::new();
        }
        let mut out: Vec<CudaEvent> = Vec::new();
        let mut events = self.events.lock();
        for id in ids {
            if let Some(e) = events.get_mut(id.index()).and_then(Option::take)
                && !out.contains(&e)
            {
                out.push(e);
            }
        }
        out
    }
}
