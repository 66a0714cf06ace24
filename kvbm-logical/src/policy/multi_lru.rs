//! Multi-level LRU with TinyLFU frequency tracking.

use std::collections::TryReserveError;
use std::sync::Arc;

use super::linked::LinkedSlab;
use super::{InactiveEntry, InactivePool};
use crate::frequency::FrequencySketch;
use crate::hashing::SequenceHash;
use crate::ids::BlockId;

/// Frequency levels (LRU lists).
pub(crate) const LEVELS: usize = 4;

/// The level of a block requested about `frequency` times recently: 0–1 → 0, 2–3 → 1,
/// 4–7 → 2, 8 and more → 3.
pub(crate) fn level(frequency: u8) -> u8 {
    match frequency {
        0..=1 => 0,
        2..=3 => 1,
        4..=7 => 2,
        _ => 3,
    }
}

/// Frequency-aware eviction: blocks live in [`LEVELS`] LRU lists by how often their hash was
/// requested recently (the manager's count-min sketch, which counts registrations, matches
/// and touching scans, and ages by halving); the victim is the least recently used block of
/// the lowest non-empty level. A block's level is re-read from the sketch when it enters the
/// pool and when it is touched. One-off prompts thus go before a shared system prompt even if
/// they were used more recently.
///
/// O(1) per operation, allocation-free.
pub(crate) struct MultiLruPool {
    lists: LinkedSlab,
    hashes: Box<[SequenceHash]>,
    sketch: Arc<FrequencySketch>,
}

impl std::fmt::Debug for MultiLruPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MultiLruPool")
            .field("lists", &self.lists)
            .finish_non_exhaustive()
    }
}

impl MultiLruPool {
    pub(crate) fn try_new(
        capacity: usize,
        sketch: Arc<FrequencySketch>,
    ) -> Result<Self, TryReserveError> {
        let mut hashes = Vec::new();
        hashes.try_reserve_exact(capacity)?;
        hashes.resize(capacity, SequenceHash::new(0));
        Ok(Self {
            lists: LinkedSlab::try_new(capacity, LEVELS)?,
            hashes: hashes.into_boxed_slice(),
            sketch,
        })
    }

    fn level_of(&self, hash: SequenceHash) -> u8 {
        level(self.sketch.estimate(hash))
    }
}

impl InactivePool for MultiLruPool {
    fn name(&self) -> &'static str {
        "multi_lru"
    }

    fn insert(&mut self, entry: InactiveEntry) {
        self.hashes[entry.id.index()] = entry.hash;
        let level = self.level_of(entry.hash);
        self.lists.push_back(level, entry.id.get());
    }

    fn remove(&mut self, id: BlockId) -> bool {
        self.lists.unlink(id.get()).is_some()
    }

    fn pop_victim(&mut self) -> Option<BlockId> {
        (0..LEVELS as u8)
            .find_map(|level| self.lists.pop_front(level))
            .map(BlockId::new)
    }

    fn touch(&mut self, id: BlockId) -> bool {
        if self.lists.unlink(id.get()).is_none() {
            return false;
        }
        let level = self.level_of(self.hashes[id.index()]);
        self.lists.push_back(level, id.get());
        true
    }

    fn len(&self) -> usize {
        (0..LEVELS as u8).map(|l| self.lists.len(l)).sum()
    }

    fn contains(&self, id: BlockId) -> bool {
        self.lists.list_of(id.get()).is_some()
    }

    fn check_invariants(&self) -> Result<(), String> {
        self.lists.check()
    }
}
