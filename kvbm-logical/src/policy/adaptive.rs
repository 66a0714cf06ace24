//! Adaptive, prefix-preserving eviction: leaves first, recency weighted by frequency, the
//! weight tuned online by miniature simulations.

use std::collections::TryReserveError;
use std::sync::Arc;

use super::forest::Forest;
use super::heap::ClassedHeap;
use super::linked::NIL;
use super::tuner::{CLASSES, Tuner, bonus};
use super::{InactiveEntry, InactivePool};
use crate::frequency::FrequencySketch;
use crate::hashing::SequenceHash;
use crate::ids::BlockId;

/// The frequency class of a hash whose sketch estimate (uses so far, this one included) is
/// `estimate`: on a log scale, as the multi-level LRU's levels (1 use → 0, 2–3 → 1, 4–7 → 2,
/// 8 and more → 3), so that a system prompt shared by hundreds of requests outranks one
/// conversation's history.
pub(crate) fn class_of(estimate: u8) -> u8 {
    super::multi_lru::level(estimate)
}

/// Adaptive prefix-preserving eviction.
///
/// * **Prefix-preserving.** Only a *leaf* can be evicted: a block no other pool member names
///   as its parent. A cached prefix is never evicted while an evictable block that extends
///   it remains, so every chain is truncated from its tail and stays matchable up to where it
///   was cut, however the caller released it.
/// * **Frequency-weighted recency.** Each block has a frequency class (0 to 3: used once,
///   2–3 times, 4–7 times, more, by the manager's TinyLFU sketch) and a recency stamp. The victim is the leaf with
///   the smallest `stamp + w × class`: with `w = 0` this is leaf-first LRU (the lineage
///   backend); with a large `w` a block used before outlives any number of one-off blocks.
/// * **Self-tuned.** `w` is picked among 0, ¼, 1 and 4 times the capacity per class, and
///   strict class order, by *miniature simulations*: for each candidate, a scaled-down cache
///   of at least 512 entries replays the uses of a sampled 1/2^k of the hashes, and every
///   `2 × entries` sampled uses the candidate with the most hits is adopted, recency order
///   unless another hits at least 2% more. Workloads that reward frequency (popular shared
///   prefixes, scans of one-off prompts through a small pool) get it; those that do not
///   (working sets that shift) keep LRU order.
///
/// O(log n) per operation (a heap of leaves per class; as in lineage, the newest leaf and the
/// last leaf uncovered by a removal wait outside the heaps, so a chain released head first
/// and evicted tail first never enters them), amortised O(1) hash-table upkeep, and the
/// miniatures cost a sampled fraction of insertions. No allocation after construction.
/// Needs frequency tracking.
pub(crate) struct AdaptivePool {
    /// Members and leaves; its `bonus` is the tuner's weight per class.
    forest: Forest<ClassedHeap>,
    sketch: Arc<FrequencySketch>,
    tuner: Tuner,
    capacity: usize,
}

impl std::fmt::Debug for AdaptivePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdaptivePool")
            .field("len", &self.forest.len)
            .field("bonus", &self.forest.bonus)
            .finish_non_exhaustive()
    }
}

impl AdaptivePool {
    /// A pool for block ids `0..capacity` that reads frequencies from `sketch`.
    pub(crate) fn try_new(
        capacity: usize,
        sketch: Arc<FrequencySketch>,
    ) -> Result<Self, TryReserveError> {
        let tuner = Tuner::try_new(capacity)?;
        let weight = tuner.weight();
        let mut forest = Forest::try_new(capacity, ClassedHeap::try_new(capacity, CLASSES)?)?;
        forest.bonus = std::array::from_fn(|c| bonus(weight, capacity, c as u8));
        Ok(Self {
            forest,
            sketch,
            tuner,
            capacity,
        })
    }

    /// Reads the class of `hash` and shows the use to the tuner.
    fn observe(&mut self, hash: SequenceHash) -> u8 {
        let (estimate, mixed) = self.sketch.estimate_and_mix(hash);
        let class = class_of(estimate);
        if self.tuner.observe(hash, mixed, class) {
            let weight = self.tuner.weight();
            self.forest.bonus = std::array::from_fn(|c| bonus(weight, self.capacity, c as u8));
        }
        class
    }

    /// The leaf to evict: the smallest `stamp + bonus(class)` among the heads of the class
    /// heaps and the two slots.
    fn victim(&self) -> Option<u32> {
        let f = &self.forest;
        let mut best: Option<(u64, u64, u32)> = None;
        let mut consider = |id: u32, stamp: u64, class: u8| {
            let key = (stamp.saturating_add(f.bonus[class as usize]), stamp);
            if best.is_none_or(|(k, s, _)| key < (k, s)) {
                best = Some((key.0, key.1, id));
            }
        };
        for class in 0..CLASSES as u8 {
            if let Some((id, stamp)) = f.leaves.peek(class) {
                consider(id, stamp, class);
            }
        }
        for slot in [f.fresh, f.next] {
            if slot != NIL {
                let node = &f.nodes[slot as usize];
                consider(slot, node.stamp, node.class);
            }
        }
        best.map(|(_, _, id)| id)
    }
}

impl InactivePool for AdaptivePool {
    fn name(&self) -> &'static str {
        "adaptive"
    }

    fn insert(&mut self, entry: InactiveEntry) {
        let class = self.observe(entry.hash);
        self.forest.insert(entry, class);
    }

    fn remove(&mut self, id: BlockId) -> bool {
        if !self.contains(id) {
            return false;
        }
        self.forest.detach(id.get());
        true
    }

    fn pop_victim(&mut self) -> Option<BlockId> {
        let id = match self.victim() {
            Some(id) => id,
            None => self.forest.oldest_member()?,
        };
        self.forest.detach(id);
        Some(BlockId::new(id))
    }

    fn touch(&mut self, id: BlockId) -> bool {
        if !self.contains(id) {
            return false;
        }
        let hash = self.forest.nodes[id.index()].hash;
        let class = self.observe(hash);
        let stamp = self.forest.stamp();
        let id = id.get();
        let node = &mut self.forest.nodes[id as usize];
        node.stamp = stamp;
        node.class = class;
        if self.forest.in_heap(id) {
            self.forest.leaves.remove(id);
            self.forest.leaves.push(class, id, stamp);
        }
        true
    }

    fn len(&self) -> usize {
        self.forest.len
    }

    fn contains(&self, id: BlockId) -> bool {
        self.forest.contains(id.get())
    }

    fn check_invariants(&self) -> Result<(), String> {
        self.tuner.check()?;
        self.forest.check("adaptive")
    }
}
