//! Slot tiers (a block manager plus the memory its block ids index) and the read-only views
//! the stack hands out, so that no caller can allocate or register around the stack.

use std::sync::Arc;

use kvbm_logical::{
    BlockManager, BlockMetrics, BlockTier, EventSubscriber, InvariantError, PoolCounts,
    SequenceHash,
};

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
