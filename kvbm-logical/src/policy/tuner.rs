//! Miniature simulations that choose the adaptive policy's frequency weight.
//!
//! The idea is Waldspurger et al.'s (USENIX ATC'17, "Cache Modeling and Optimization using
//! Miniature Simulations"): run scaled-down caches on a spatially sampled fraction of the
//! keys, one per candidate setting, and adopt the setting whose miniature hits most. Here
//! each candidate is a weight `w` of the victim order `stamp + w × class` (recency plus a
//! bonus per frequency class); one of them is plain recency (`w = 0`), which the tuner keeps
//! unless another candidate hits clearly more (by [`MARGIN_PERCENT`]), so that the adaptive
//! policy does not stray from least-recently-used order on workloads that do not reward
//! frequency.

use std::collections::{HashMap, TryReserveError};

use super::heap::table;
use super::linked::LinkedSlab;
use crate::hashing::SequenceHash;

/// Frequency classes (see `adaptive::class_of`).
pub(crate) const CLASSES: usize = 4;
/// A weight that makes a higher class outrank any recency.
pub(crate) const STRICT: u64 = u64::MAX;
/// Candidate weights, in quarters of the capacity per class: a block used once more is
/// ranked as if it had been released `w / 4 × capacity` insertions later.
pub(crate) const WEIGHTS: [u64; 5] = [0, 1, 4, 16, STRICT];
/// A miniature cache holds at least this many entries (fewer only when the pool is smaller).
const MIN_MINI: usize = 512;
/// The choice is revised after this many sampled accesses per miniature entry.
const WINDOW: u64 = 2;
/// A candidate replaces recency order only if its miniature hits this much more (percent).
pub(crate) const MARGIN_PERCENT: u64 = 5;

/// The victim-order bonus of `class` under `weight` in a cache of `capacity` entries.
pub(crate) fn bonus(weight: u64, capacity: usize, class: u8) -> u64 {
    if weight == STRICT {
        u64::from(class) << 48
    } else {
        weight * (capacity as u64) / 4 * u64::from(class)
    }
}

type Map = HashMap<SequenceHash, u32, foldhash::fast::RandomState>;

/// One miniature cache: `CLASSES` recency lists; the victim minimises `stamp + bonus(class)`.
#[derive(Debug)]
struct Mini {
    lists: LinkedSlab,
    hashes: Box<[SequenceHash]>,
    stamps: Box<[u64]>,
    map: Map,
    free: Vec<u32>,
    bonus: [u64; CLASSES],
    hits: u64,
}

impl Mini {
    fn try_new(entries: usize, weight: u64) -> Result<Self, TryReserveError> {
        let mut free = Vec::new();
        free.try_reserve_exact(entries)?;
        free.extend((0..entries as u32).rev());
        let mut map = Map::default();
        map.try_reserve(entries.saturating_mul(2))?;
        Ok(Self {
            lists: LinkedSlab::try_new(entries, CLASSES)?,
            hashes: table(entries, SequenceHash::new(0))?,
            stamps: table(entries, 0)?,
            map,
            free,
            bonus: std::array::from_fn(|c| bonus(weight, entries, c as u8)),
            hits: 0,
        })
    }

    fn victim(&self) -> Option<u32> {
        (0..CLASSES as u8)
            .filter_map(|c| {
                let node = self.lists.front(c)?;
                Some((self.stamps[node as usize] + self.bonus[c as usize], node))
            })
            .min()
            .map(|(_, node)| node)
    }

    fn access(&mut self, hash: SequenceHash, class: u8, now: u64) {
        let node = if let Some(&node) = self.map.get(&hash) {
            self.hits += 1;
            self.lists.unlink(node);
            node
        } else {
            let node = match self.free.pop() {
                Some(node) => node,
                None => {
                    let Some(victim) = self.victim() else {
                        return; // zero entries
                    };
                    self.lists.unlink(victim);
                    self.map.remove(&self.hashes[victim as usize]);
                    victim
                }
            };
            self.hashes[node as usize] = hash;
            self.map.insert(hash, node);
            node
        };
        self.stamps[node as usize] = now;
        self.lists.push_back(class, node);
    }
}

/// Chooses one of [`WEIGHTS`] by miniature simulation.
#[derive(Debug)]
pub(crate) struct Tuner {
    minis: Box<[Mini]>,
    /// A hash is sampled when the top `sample_bits` bits of its mix are zero.
    sample_bits: u32,
    /// Sampled accesses so far.
    now: u64,
    window: u64,
    choice: usize,
}

impl Tuner {
    /// Miniatures for a pool of `capacity` blocks: a sampling rate of 1/2^k so that each
    /// miniature holds `capacity / 2^k` entries, at least [`MIN_MINI`] when possible.
    pub(crate) fn try_new(capacity: usize) -> Result<Self, TryReserveError> {
        let ratio = (capacity / MIN_MINI).max(1);
        let sample_bits = usize::BITS - 1 - ratio.leading_zeros(); // log2, rounded down
        let entries = capacity >> sample_bits;
        let mut minis = Vec::new();
        minis.try_reserve_exact(WEIGHTS.len())?;
        for weight in WEIGHTS {
            minis.push(Mini::try_new(entries, weight)?);
        }
        Ok(Self {
            minis: minis.into_boxed_slice(),
            sample_bits,
            now: 0,
            window: (WINDOW * entries as u64).max(1),
            choice: 0,
        })
    }

    /// The weight in force.
    pub(crate) fn weight(&self) -> u64 {
        WEIGHTS[self.choice]
    }

    /// Sampled fraction of hashes, as a power of two (for tests and docs).
    #[cfg(test)]
    pub(crate) fn sample_bits(&self) -> u32 {
        self.sample_bits
    }

    /// Records one use of `hash`, whose frequency class is `class` and whose mix (a
    /// well-spread 64-bit function of it, see `FrequencySketch::estimate_and_mix`) is `mixed`:
    /// the hash is sampled when the top bits of `mixed` are zero. Returns whether the weight
    /// changed.
    #[inline]
    pub(crate) fn observe(&mut self, hash: SequenceHash, mixed: u64, class: u8) -> bool {
        if self.sample_bits > 0 && mixed >> (64 - self.sample_bits) != 0 {
            return false;
        }
        self.sampled(hash, class)
    }

    fn sampled(&mut self, hash: SequenceHash, class: u8) -> bool {
        self.now += 1;
        for mini in self.minis.iter_mut() {
            mini.access(hash, class, self.now);
        }
        if !self.now.is_multiple_of(self.window) {
            return false;
        }
        let lru = self.minis[0].hits;
        let (best, hits) = self
            .minis
            .iter()
            .enumerate()
            .map(|(i, m)| (i, m.hits))
            .fold((0, lru), |acc, x| if x.1 > acc.1 { x } else { acc });
        let choice = if hits * 100 > lru * (100 + MARGIN_PERCENT) {
            best
        } else {
            0
        };
        for mini in self.minis.iter_mut() {
            mini.hits /= 2;
        }
        let changed = choice != self.choice;
        self.choice = choice;
        changed
    }

    /// Checks every miniature's lists and tables (O(entries)).
    pub(crate) fn check(&self) -> Result<(), String> {
        for mini in self.minis.iter() {
            mini.lists.check()?;
            let linked: usize = (0..CLASSES as u8).map(|c| mini.lists.len(c)).sum();
            if linked != mini.map.len() || linked + mini.free.len() != mini.hashes.len() {
                return Err(format!(
                    "tuner: {linked} linked, {} mapped, {} free",
                    mini.map.len(),
                    mini.free.len()
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_keeps_miniatures_at_least_min_size() {
        for (capacity, bits, entries) in [
            (1, 0, 1),
            (200, 0, 200),
            (512, 0, 512),
            (1023, 0, 1023),
            (1024, 1, 512),
            (4096, 3, 512),
            (5000, 3, 625),
        ] {
            let t = Tuner::try_new(capacity).unwrap();
            assert_eq!(t.sample_bits(), bits, "capacity {capacity}");
            assert_eq!(t.minis[0].hashes.len(), entries, "capacity {capacity}");
        }
    }

    /// A workload where frequency pays: a hot set of 64 hashes used over and over, mixed with
    /// a scan of one-off hashes four times the cache. Recency loses the hot set at every scan;
    /// a frequency weight keeps it.
    #[test]
    fn a_scan_with_a_hot_set_moves_the_weight_off_recency() {
        let mut t = Tuner::try_new(128).unwrap();
        let mut uses = std::collections::HashMap::<u64, u8>::new();
        let mut observe = |t: &mut Tuner, h: u64| {
            let n = uses.entry(h).or_insert(0);
            let class = (*n).min(CLASSES as u8 - 1);
            *n = n.saturating_add(1);
            t.observe(SequenceHash::new(h), 0, class);
        };
        let mut scan = 1_000_000u64;
        for _ in 0..40 {
            for h in 0..64 {
                observe(&mut t, h);
            }
            for _ in 0..512 {
                observe(&mut t, scan);
                scan += 1;
            }
        }
        assert_ne!(t.weight(), 0);
        t.check().unwrap();
    }

    /// A workload where frequency does not pay: a cyclic working set that fits, plus
    /// formerly popular hashes that are never used again. Recency stays.
    #[test]
    fn a_shifting_working_set_keeps_recency() {
        let mut t = Tuner::try_new(128).unwrap();
        let mut uses = std::collections::HashMap::<u64, u8>::new();
        for phase in 0..60u64 {
            // Each phase's working set of 100 hashes is used 4 times, then never again.
            for _ in 0..4 {
                for h in 0..100 {
                    let h = phase * 1000 + h;
                    let n = uses.entry(h).or_insert(0);
                    let class = (*n).min(CLASSES as u8 - 1);
                    *n += 1;
                    t.observe(SequenceHash::new(h), 0, class);
                }
            }
        }
        assert_eq!(t.weight(), 0);
        t.check().unwrap();
    }
}
