//! Access-frequency tracking: a TinyLFU count-min sketch with periodic aging.
//!
//! The sketch estimates how often each sequence hash was requested recently, in bounded
//! memory and without the store lock: counters are atomics, updated after the lock is
//! released. Frequency-aware eviction (and callers, through
//! [`BlockManager::frequency`](crate::BlockManager::frequency)) read the estimate.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use crate::hashing::SequenceHash;

/// Rows of the count-min sketch.
const DEPTH: usize = 4;
/// Counters saturate here (4-bit counters, as in TinyLFU).
pub(crate) const MAX_FREQUENCY: u8 = 15;
/// The sketch ages (halves every counter) after this many increments per tracked key.
const SAMPLE_FACTOR: u64 = 10;

/// Whether and how precisely a manager tracks access frequency.
///
/// The presets size a count-min sketch for roughly that many distinct hashes being
/// requested within one aging window (`10 × capacity` accesses), at 4 bytes per key.
///
/// ```
/// use kvbm_logical::{BlockManager, Device, FrequencyTracking, SequenceHash};
/// let m = BlockManager::<Device>::builder()
///     .block_count(16)
///     .block_size(16)
///     .frequency_tracking(FrequencyTracking::Small)
///     .build()?;
/// let hash = SequenceHash::new(7);
/// assert_eq!(m.frequency(hash), Some(0));
/// let block = m.allocate_blocks(1)?.pop().unwrap();
/// let block = m.register_block(block.stage(hash, 16)?)?; // registering counts as an access
/// drop(m.match_blocks(&[hash]));                         // and so does a match
/// assert_eq!(m.frequency(hash), Some(2));
/// # drop(block);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FrequencyTracking {
    /// No tracking; [`BlockManager::frequency`](crate::BlockManager::frequency) returns `None`.
    #[default]
    Disabled,
    /// About 4 Ki distinct hashes (16 KiB).
    Small,
    /// About 64 Ki distinct hashes (256 KiB).
    Medium,
    /// About 1 Mi distinct hashes (4 MiB).
    Large,
}

impl FrequencyTracking {
    /// Distinct keys the sketch is sized for; `None` when disabled.
    pub fn capacity(self) -> Option<usize> {
        match self {
            Self::Disabled => None,
            Self::Small => Some(1 << 12),
            Self::Medium => Some(1 << 16),
            Self::Large => Some(1 << 20),
        }
    }
}

/// A count-min sketch of `DEPTH` rows of 4-bit (saturating `u8`) counters, blocked: a key's
/// `DEPTH` counters lie in one 64-byte cache line (one 16-counter segment per row), so an
/// access costs one cache miss instead of `DEPTH`.
pub(crate) struct FrequencySketch {
    counters: Box<[AtomicU8]>,
    /// Cache-line blocks minus one (the count is a power of two).
    block_mask: u64,
    additions: AtomicU64,
    sample_size: u64,
}

/// Counters per block (one cache line) and per row segment within it.
const BLOCK: usize = 64;
const SEGMENT: usize = BLOCK / DEPTH;

impl FrequencySketch {
    /// A sketch for about `capacity` distinct keys.
    pub(crate) fn new(capacity: usize) -> Self {
        let width = capacity.max(16).next_power_of_two();
        let len = width * DEPTH;
        Self {
            counters: (0..len).map(|_| AtomicU8::new(0)).collect(),
            block_mask: (len / BLOCK) as u64 - 1,
            additions: AtomicU64::new(0),
            sample_size: SAMPLE_FACTOR * width as u64,
        }
    }

    /// The counter index of `hash` in each row: a block from the low bits of a mix of the
    /// hash, and within it a counter per row segment from higher bits, so sequential or
    /// structured hashes spread like random ones.
    fn indices(&self, hash: SequenceHash) -> [usize; DEPTH] {
        self.indices_of_mix(mix(hash.as_u64()))
    }

    fn indices_of_mix(&self, h: u64) -> [usize; DEPTH] {
        let block = ((h & self.block_mask) as usize) * BLOCK;
        std::array::from_fn(|row| {
            block + row * SEGMENT + ((h >> (32 + 4 * row)) as usize & (SEGMENT - 1))
        })
    }

    /// Estimated recent accesses to `hash` (0..=15).
    pub(crate) fn estimate(&self, hash: SequenceHash) -> u8 {
        self.indices(hash)
            .iter()
            .map(|&i| self.counters[i].load(Ordering::Relaxed))
            .min()
            .unwrap_or(0)
    }

    /// [`estimate`](Self::estimate), and the hash's mix (the splitmix64 finalizer of its
    /// value; its top 16 bits are independent of the counters it selects), for callers that
    /// also need a well-spread function of the hash.
    pub(crate) fn estimate_and_mix(&self, hash: SequenceHash) -> (u8, u64) {
        let h = mix(hash.as_u64());
        let estimate = self
            .indices_of_mix(h)
            .iter()
            .map(|&i| self.counters[i].load(Ordering::Relaxed))
            .min()
            .unwrap_or(0);
        (estimate, h)
    }

    /// Records one access; see [`increment_all`](Self::increment_all).
    #[cfg(test)]
    pub(crate) fn increment(&self, hash: SequenceHash) {
        self.increment_all(std::iter::once(hash));
    }

    /// Records one access per hash (conservative update: only the smallest counters grow),
    /// then counts them towards aging with one atomic addition for the whole batch.
    ///
    /// Concurrent increments may occasionally be lost; a sketch tolerates that.
    pub(crate) fn increment_all(&self, hashes: impl Iterator<Item = SequenceHash>) {
        let mut n = 0;
        for hash in hashes {
            n += 1;
            let idx = self.indices(hash);
            let values = idx.map(|i| self.counters[i].load(Ordering::Relaxed));
            let min = values.iter().copied().min().unwrap_or(0);
            if min < MAX_FREQUENCY {
                for (i, v) in idx.iter().zip(values) {
                    if v == min {
                        self.counters[*i].store(min + 1, Ordering::Relaxed);
                    }
                }
            }
        }
        if n == 0 {
            return;
        }
        let total = self.additions.fetch_add(n, Ordering::Relaxed) + n;
        if total >= self.sample_size {
            self.maybe_age();
        }
    }

    /// Ages once if the sample is full; of racing callers, the one whose subtraction lands
    /// does the halving.
    fn maybe_age(&self) {
        let half = self.sample_size / 2;
        let mut cur = self.additions.load(Ordering::Relaxed);
        while cur >= self.sample_size {
            match self.additions.compare_exchange_weak(
                cur,
                cur - half,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    self.halve();
                    return;
                }
                Err(now) => cur = now,
            }
        }
    }

    /// Halves every counter so that old popularity fades.
    fn halve(&self) {
        for c in self.counters.iter() {
            let v = c.load(Ordering::Relaxed);
            c.store(v / 2, Ordering::Relaxed);
        }
    }

    #[cfg(test)]
    fn age(&self) {
        self.halve();
        self.additions
            .fetch_sub(self.sample_size / 2, Ordering::Relaxed);
    }
}

/// The splitmix64 finalizer.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_grow() {
        assert_eq!(FrequencyTracking::Disabled.capacity(), None);
        assert!(FrequencyTracking::Small.capacity() < FrequencyTracking::Medium.capacity());
        assert!(FrequencyTracking::Medium.capacity() < FrequencyTracking::Large.capacity());
    }

    #[test]
    fn counts_and_saturates() {
        let s = FrequencySketch::new(1024);
        let h = SequenceHash::new(99);
        for expect in 1..=20u8 {
            s.increment(h);
            assert_eq!(s.estimate(h), expect.min(MAX_FREQUENCY));
        }
        assert_eq!(s.estimate(SequenceHash::new(100)), 0);
    }

    #[test]
    fn sequential_keys_are_estimated_accurately() {
        // 256 keys in a sketch for 1024: conservative update keeps the estimates exact or
        // nearly so even for structured (sequential) hashes.
        let s = FrequencySketch::new(1024);
        for k in 0..256u64 {
            for _ in 0..(k % 5) {
                s.increment(SequenceHash::new(k));
            }
        }
        let exact = (0..256u64)
            .filter(|&k| u64::from(s.estimate(SequenceHash::new(k))) == k % 5)
            .count();
        assert!(exact >= 250, "only {exact}/256 estimates exact");
    }

    #[test]
    fn aging_halves_counts() {
        let s = FrequencySketch::new(1024);
        let hot = SequenceHash::new(1);
        for _ in 0..9 {
            s.increment(hot);
        }
        assert_eq!(s.estimate(hot), 9);
        s.age();
        assert_eq!(s.estimate(hot), 4);
    }

    #[test]
    fn the_sample_size_triggers_aging() {
        let s = FrequencySketch::new(16); // width 16, sample size 160
        for k in 0..159u64 {
            s.increment(SequenceHash::new(k));
        }
        assert_eq!(s.additions.load(Ordering::Relaxed), 159);
        let before: u32 = s
            .counters
            .iter()
            .map(|c| u32::from(c.load(Ordering::Relaxed)))
            .sum();
        s.increment(SequenceHash::new(10_000));
        assert_eq!(s.additions.load(Ordering::Relaxed), 80);
        let after: u32 = s
            .counters
            .iter()
            .map(|c| u32::from(c.load(Ordering::Relaxed)))
            .sum();
        assert!(after <= before / 2 + 4, "{before} -> {after}");
    }
}
