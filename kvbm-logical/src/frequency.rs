//! Access-frequency tracking: a TinyLFU count-min sketch with periodic aging.
//!
//! The sketch estimates how often each sequence hash was requested recently, in bounded
//! memory and without the store lock: counters are atomics, updated after the lock is
//! released. Frequency-aware eviction (and callers, through
//! [`BlockManager::frequency`](crate::BlockManager::frequency)) read the estimate.

use std::sync::atomic::{AtomicU64, Ordering};

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
/// requested within one aging window (`10 × capacity` accesses), at 2 bytes per key (four
/// 4-bit counters).
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
    /// About 4 Ki distinct hashes (8 KiB).
    Small,
    /// About 64 Ki distinct hashes (128 KiB).
    Medium,
    /// About 1 Mi distinct hashes (2 MiB).
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

/// A count-min sketch of `DEPTH` rows of 4-bit saturating counters, packed 16 to a 64-bit
/// word and blocked: a key's `DEPTH` counters are one nibble of each of `DEPTH` adjacent
/// words (one word per row, 32 bytes per block, within one cache line), so an access costs
/// one cache miss instead of `DEPTH`, and `DEPTH` loads.
pub(crate) struct FrequencySketch {
    /// `DEPTH` words per block, one per row, each holding 16 counters.
    words: Box<[AtomicU64]>,
    /// Blocks minus one (the count is a power of two).
    block_mask: u64,
    additions: AtomicU64,
    sample_size: u64,
}

/// Counters per word (and per row of a block).
const PER_WORD: usize = 16;
/// Every nibble's top bit cleared: halving a word's 16 counters at once.
const HALF_MASK: u64 = 0x7777_7777_7777_7777;

impl FrequencySketch {
    /// A sketch for about `capacity` distinct keys.
    pub(crate) fn new(capacity: usize) -> Self {
        let width = capacity.max(PER_WORD).next_power_of_two();
        // `width` counters per row, 16 of each row per block.
        let blocks = width / PER_WORD;
        Self {
            words: (0..blocks * DEPTH).map(|_| AtomicU64::new(0)).collect(),
            block_mask: blocks as u64 - 1,
            additions: AtomicU64::new(0),
            sample_size: SAMPLE_FACTOR * width as u64,
        }
    }

    /// Where the counters of a hash whose mix is `h` are: its block's words (a block from
    /// the low bits of the mix) and, per row, the bit offset of its nibble (from higher
    /// bits), so sequential or structured hashes spread like random ones.
    #[inline]
    fn locate(&self, h: u64) -> (&[AtomicU64; DEPTH], [u32; DEPTH]) {
        let base = (h & self.block_mask) as usize * DEPTH;
        let words = self.words[base..base + DEPTH]
            .try_into()
            .expect("a block is DEPTH words");
        let shifts = std::array::from_fn(|row| ((h >> (32 + 4 * row)) as u32 & 15) * 4);
        (words, shifts)
    }

    /// The smallest of the counters of a hash whose mix is `h`.
    #[inline]
    fn estimate_of_mix(&self, h: u64) -> u8 {
        let (words, shifts) = self.locate(h);
        let mut min = u64::from(MAX_FREQUENCY);
        for (word, shift) in words.iter().zip(shifts) {
            min = min.min((word.load(Ordering::Relaxed) >> shift) & 15);
        }
        min as u8
    }

    /// Estimated recent accesses to `hash` (0..=15).
    pub(crate) fn estimate(&self, hash: SequenceHash) -> u8 {
        self.estimate_of_mix(mix(hash.as_u64()))
    }

    /// [`estimate`](Self::estimate), and the hash's mix (the splitmix64 finalizer of its
    /// value; its top 16 bits are independent of the counters it selects), for callers that
    /// also need a well-spread function of the hash.
    pub(crate) fn estimate_and_mix(&self, hash: SequenceHash) -> (u8, u64) {
        let h = mix(hash.as_u64());
        (self.estimate_of_mix(h), h)
    }

    /// Records one access; see [`increment_all`](Self::increment_all).
    #[cfg(test)]
    pub(crate) fn increment(&self, hash: SequenceHash) {
        self.increment_all(std::iter::once(hash));
    }

    /// Records one access per hash (conservative update: only the smallest counters grow),
    /// then counts them towards aging with one atomic addition for the whole batch.
    ///
    /// Concurrent increments may occasionally be lost (a word is read, then written back
    /// whole); a sketch tolerates that. A counter never carries into its neighbour: only
    /// counters below the maximum grow.
    pub(crate) fn increment_all(&self, hashes: impl Iterator<Item = SequenceHash>) {
        let mut n = 0;
        for hash in hashes {
            n += 1;
            let (words, shifts) = self.locate(mix(hash.as_u64()));
            let values: [u64; DEPTH] = std::array::from_fn(|r| words[r].load(Ordering::Relaxed));
            let counts: [u64; DEPTH] = std::array::from_fn(|r| (values[r] >> shifts[r]) & 15);
            let min = counts.iter().copied().min().unwrap_or(0);
            if min < u64::from(MAX_FREQUENCY) {
                for r in 0..DEPTH {
                    if counts[r] == min {
                        words[r].store(values[r] + (1 << shifts[r]), Ordering::Relaxed);
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

    /// Halves every counter so that old popularity fades (16 at a time: each nibble shifted
    /// right, the bit shifted in from its neighbour cleared).
    fn halve(&self) {
        for w in self.words.iter() {
            let v = w.load(Ordering::Relaxed);
            w.store((v >> 1) & HALF_MASK, Ordering::Relaxed);
        }
    }

    /// The sum of every counter (for tests).
    #[cfg(test)]
    fn total(&self) -> u32 {
        self.words
            .iter()
            .map(|w| {
                let v = w.load(Ordering::Relaxed);
                (0..PER_WORD)
                    .map(|i| ((v >> (4 * i)) & 15) as u32)
                    .sum::<u32>()
            })
            .sum()
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
        let before = s.total();
        s.increment(SequenceHash::new(10_000));
        assert_eq!(s.additions.load(Ordering::Relaxed), 80);
        let after = s.total();
        assert!(after <= before / 2 + 4, "{before} -> {after}");
    }
}
