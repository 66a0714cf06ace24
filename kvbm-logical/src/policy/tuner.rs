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

use std::collections::TryReserveError;

use super::heap::table;
use super::linked::LinkedSlab;
use crate::hashing::SequenceHash;
use crate::index::Index;

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

/// Where a sampled hash sits in each miniature: its node there, or [`NO_NODE`].
type Slots = [u16; WEIGHTS.len()];
/// Not in this miniature.
const NO_NODE: u16 = u16::MAX;
const NOWHERE: Slots = [NO_NODE; WEIGHTS.len()];
// A miniature holds fewer than `2 × MIN_MINI` entries (see `Tuner::try_new`), so its node
// ids fit a `u16` below `NO_NODE`.
const _: () = assert!(2 * MIN_MINI <= NO_NODE as usize);

/// A hash some miniature holds, with its node in each. The miniatures all see the same
/// sampled accesses, so one probe finds a hash in all of them (instead of one probe per
/// miniature).
#[derive(Clone, Copy, Debug)]
struct Held {
    hash: SequenceHash,
    slots: Slots,
}

/// The key of record `r` of `held`.
fn key_in(held: &[Held]) -> impl Fn(u32) -> u64 + '_ {
    move |r| held[r as usize].hash.as_u64()
}

/// One miniature cache: `CLASSES` recency lists; the victim minimises `stamp + bonus(class)`.
#[derive(Debug)]
struct Mini {
    lists: LinkedSlab,
    hashes: Box<[SequenceHash]>,
    stamps: Box<[u64]>,
    free: Vec<u32>,
    bonus: [u64; CLASSES],
    hits: u64,
}

impl Mini {
    fn try_new(entries: usize, weight: u64) -> Result<Self, TryReserveError> {
        let mut free = Vec::new();
        free.try_reserve_exact(entries)?;
        free.extend((0..entries as u32).rev());
        Ok(Self {
            lists: LinkedSlab::try_new(entries, CLASSES)?,
            hashes: table(entries, SequenceHash::new(0))?,
            stamps: table(entries, 0)?,
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

    /// One access to `hash`, at `node` if this miniature holds it. Returns its node now
    /// (`NO_NODE` for a miniature of zero entries) and the hash it evicted, if any.
    fn access(
        &mut self,
        hash: SequenceHash,
        node: u16,
        class: u8,
        now: u64,
    ) -> (u16, Option<SequenceHash>) {
        let mut evicted = None;
        let node = if node != NO_NODE {
            self.hits += 1;
            let node = u32::from(node);
            self.lists.unlink(node);
            node
        } else {
            let node = match self.free.pop() {
                Some(node) => node,
                None => {
                    let Some(victim) = self.victim() else {
                        return (NO_NODE, None); // zero entries
                    };
                    self.lists.unlink(victim);
                    evicted = Some(self.hashes[victim as usize]);
                    victim
                }
            };
            self.hashes[node as usize] = hash;
            node
        };
        self.stamps[node as usize] = now;
        self.lists.push_back(class, node);
        (node as u16, evicted)
    }
}

/// Chooses one of [`WEIGHTS`] by miniature simulation.
#[derive(Debug)]
pub(crate) struct Tuner {
    minis: Box<[Mini]>,
    /// Every hash some miniature holds, with its node in each: records found through
    /// `index` (no rehash, no allocation after construction), free ones in `free_held`.
    held: Box<[Held]>,
    free_held: Vec<u32>,
    index: Index,
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
        debug_assert!(entries < 2 * MIN_MINI, "node ids must fit below NO_NODE");
        let mut minis = Vec::new();
        minis.try_reserve_exact(WEIGHTS.len())?;
        for weight in WEIGHTS {
            minis.push(Mini::try_new(entries, weight)?);
        }
        // At most `entries` hashes per miniature, plus the one being added.
        let records = entries.saturating_mul(WEIGHTS.len()).saturating_add(1);
        let mut free_held = Vec::new();
        free_held.try_reserve_exact(records)?;
        free_held.extend((0..records as u32).rev());
        Ok(Self {
            minis: minis.into_boxed_slice(),
            held: table(
                records,
                Held {
                    hash: SequenceHash::new(0),
                    slots: NOWHERE,
                },
            )?,
            free_held,
            index: Index::try_new(records)?,
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
        let r = match self.index.find(hash.as_u64(), key_in(&self.held)) {
            Ok(r) => r,
            Err(vacant) => {
                // Never empty: the records outnumber what the miniatures can hold.
                let Some(r) = self.free_held.pop() else {
                    debug_assert!(false, "tuner records exhausted");
                    return false;
                };
                self.held[r as usize] = Held {
                    hash,
                    slots: NOWHERE,
                };
                let inserted = self.index.insert(vacant, r);
                debug_assert!(inserted, "the tuner's index has room for every record");
                r
            }
        };
        let mut slots = self.held[r as usize].slots;
        // The hashes the miniatures evicted, each with the miniatures it left; under
        // similar orders they mostly evict the same one, so this is usually one entry.
        let mut evicted: [(SequenceHash, u8); WEIGHTS.len()] =
            [(SequenceHash::new(0), 0); WEIGHTS.len()];
        let mut n = 0;
        for (i, mini) in self.minis.iter_mut().enumerate() {
            let (node, victim) = mini.access(hash, slots[i], class, self.now);
            slots[i] = node;
            if let Some(victim) = victim {
                match evicted[..n].iter_mut().find(|(h, _)| *h == victim) {
                    Some((_, mask)) => *mask |= 1 << i,
                    None => {
                        evicted[n] = (victim, 1 << i);
                        n += 1;
                    }
                }
            }
        }
        self.held[r as usize].slots = slots;
        for &(victim, mask) in &evicted[..n] {
            if let Some(v) = self.index.get(victim.as_u64(), key_in(&self.held)) {
                let held = &mut self.held[v as usize].slots;
                for (i, node) in held.iter_mut().enumerate() {
                    if mask & (1 << i) != 0 {
                        *node = NO_NODE;
                    }
                }
                if *held == NOWHERE {
                    self.drop_record(v);
                }
            }
        }
        if slots == NOWHERE {
            // Only when every miniature has zero entries.
            self.drop_record(r);
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

    /// Forgets record `r`: out of the index, free again.
    fn drop_record(&mut self, r: u32) {
        let hash = self.held[r as usize].hash.as_u64();
        if self.index.remove(hash, r, key_in(&self.held)) {
            self.free_held.push(r);
        }
    }

    /// Checks every miniature's lists and tables (O(entries)).
    pub(crate) fn check(&self) -> Result<(), String> {
        for (i, mini) in self.minis.iter().enumerate() {
            mini.lists.check()?;
            let linked: usize = (0..CLASSES as u8).map(|c| mini.lists.len(c)).sum();
            let mapped = self
                .index
                .records()
                .filter(|&r| self.held[r as usize].slots[i] != NO_NODE)
                .count();
            if linked != mapped || linked + mini.free.len() != mini.hashes.len() {
                return Err(format!(
                    "tuner: miniature {i}: {linked} linked, {mapped} mapped, {} free",
                    mini.free.len()
                ));
            }
        }
        self.index.check(key_in(&self.held))?;
        if self.index.len() + self.free_held.len() != self.held.len() {
            return Err(format!(
                "tuner: {} records indexed, {} free, of {}",
                self.index.len(),
                self.free_held.len(),
                self.held.len()
            ));
        }
        for r in self.index.records() {
            let Held { hash, slots } = &self.held[r as usize];
            if *slots == NOWHERE {
                return Err(format!("tuner: {hash} kept in no miniature"));
            }
            for (i, &node) in slots.iter().enumerate() {
                let mini = &self.minis[i];
                if node != NO_NODE
                    && (mini.lists.list_of(u32::from(node)).is_none()
                        || mini.hashes[node as usize] != *hash)
                {
                    return Err(format!("tuner: miniature {i} node {node} is not {hash}"));
                }
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

    /// The miniatures share one set of records (hash → node in each) behind one index:
    /// under churn, with hashes that come back and hashes that never do, the records stay
    /// consistent with every miniature (`check`), none leaks (the accounting of indexed and
    /// free records), and the full miniatures are all represented.
    #[test]
    fn the_shared_records_stay_consistent_under_churn() {
        for capacity in [1, 100, 512, 1500, 4096] {
            let mut t = Tuner::try_new(capacity).unwrap();
            let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ capacity as u64;
            for i in 0..60_000u64 {
                // xorshift: a hot set of 300 hashes half the time, one-off hashes otherwise.
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let hash = if x.is_multiple_of(2) {
                    x % 300
                } else {
                    1_000_000 + i
                };
                t.observe(SequenceHash::new(hash), 0, (x >> 8) as u8 % CLASSES as u8);
                if i % 10_000 == 0 {
                    t.check().unwrap();
                }
            }
            t.check().unwrap();
            // Every miniature is full by now; the records hold at least one's worth.
            assert!(
                t.index.len() >= t.minis[0].hashes.len(),
                "records lost (capacity {capacity})"
            );
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
