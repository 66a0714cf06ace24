//! Multi-threaded stress: 8 threads × 100 000 mixed operations on one manager, for every
//! eviction backend and both duplication policies, with pins and an event subscriber that
//! never reads.
//!
//! Threads share a small hash space, so they race to register the same hashes (duplicates,
//! `Reject` hand-backs), match each other's blocks, evict them, and upgrade weak handles that
//! other threads' evictions have made stale. Every thread checks what it can see on its own
//! (matched blocks carry the hashes asked for, upgrades return the block and hash of the weak
//! handle, counts always add up to the total); at the end every handle is gone and every block
//! must be back in the reset or the inactive pool.

use std::sync::Arc;
use std::thread;

use kvbm_logical::{
    BlockDuplicationPolicy, BlockManager, CompleteBlock, Device, EvictionBackend,
    FrequencyTracking, ImmutableBlock, MutableBlock, ResetError, SequenceHash, WeakBlock,
};

const THREADS: usize = 8;
const OPS: usize = 100_000;
const TOTAL: usize = 256;
const BLOCK_SIZE: usize = 16;
/// Hashes drawn from 0..HASHES: twice the capacity, so eviction and re-registration are common.
const HASHES: u64 = 2 * TOTAL as u64;
/// Most immutable handles one thread keeps, so that the threads together cannot hold every
/// block (an allocation can fail, which is fine, but should not fail most of the time).
const MAX_HELD: usize = 20;

/// splitmix64: a tiny deterministic generator, one per thread.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn hashes(&mut self, len: usize) -> Vec<SequenceHash> {
        // A run of consecutive hashes, like a prompt prefix.
        let start = self.next() % HASHES;
        (0..len as u64)
            .map(|i| SequenceHash::new((start + i) % HASHES))
            .collect()
    }
}

/// What a worker saw: cache hits, evictions, successful upgrades.
#[derive(Default, Debug)]
struct Seen {
    hits: usize,
    evicted: usize,
    upgrades: usize,
}

fn worker(m: &BlockManager<Device>, seed: u64) -> Seen {
    let mut rng = Rng(seed);
    let mut mutable: Vec<MutableBlock<Device>> = Vec::new();
    let mut complete: Vec<CompleteBlock<Device>> = Vec::new();
    let mut held: Vec<ImmutableBlock<Device>> = Vec::new();
    let mut weak: Vec<WeakBlock<Device>> = Vec::new();
    let mut seen = Seen::default();

    for _ in 0..OPS {
        match rng.below(17) {
            0 | 1 => {
                if mutable.len() + complete.len() < 8 {
                    let n = 1 + rng.below(4);
                    if let Ok((blocks, evicted)) = m.allocate_blocks_with_evictions(n) {
                        assert_eq!(blocks.len(), n);
                        assert!(evicted.len() <= n);
                        seen.evicted += evicted.len();
                        mutable.extend(blocks);
                    }
                }
            }
            2 | 3 => {
                if let Some(b) = mutable.pop() {
                    let hash = SequenceHash::new(rng.next() % HASHES);
                    complete.push(b.stage(hash, BLOCK_SIZE).expect("right size"));
                }
            }
            4 | 5 => {
                let n = complete.len().min(1 + rng.below(4));
                let batch: Vec<_> = complete.drain(..n).collect();
                let want: Vec<_> = batch.iter().map(CompleteBlock::sequence_hash).collect();
                let got = m.register_blocks(batch).expect("own blocks");
                let got_hashes: Vec<_> = got.iter().map(ImmutableBlock::sequence_hash).collect();
                assert_eq!(got_hashes, want);
                held.extend(got);
            }
            6 | 7 => {
                let len = 1 + rng.below(8);
                let query = rng.hashes(len);
                let found = m.match_blocks(&query);
                assert!(found.len() <= query.len());
                for (b, h) in found.iter().zip(&query) {
                    assert_eq!(b.sequence_hash(), *h, "match returned a foreign hash");
                }
                seen.hits += found.len();
                held.extend(found);
            }
            8 => {
                let len = 1 + rng.below(8);
                let query = rng.hashes(len);
                let found = m.scan_matches(&query, rng.next().is_multiple_of(2));
                for b in &found {
                    assert!(query.contains(&b.sequence_hash()));
                }
                held.extend(found);
            }
            9 => {
                if !held.is_empty() {
                    let b = held[rng.below(held.len())].clone();
                    held.push(b);
                }
            }
            10 => {
                if !held.is_empty() {
                    weak.push(held[rng.below(held.len())].downgrade());
                }
            }
            11 => {
                if !weak.is_empty() {
                    let w = weak.swap_remove(rng.below(weak.len()));
                    if let Some(b) = w.upgrade() {
                        assert_eq!(
                            (b.block_id(), b.sequence_hash()),
                            (w.block_id(), w.sequence_hash())
                        );
                        seen.upgrades += 1;
                        held.push(b);
                    }
                }
            }
            12 => {
                m.touch_blocks(&rng.hashes(4));
            }
            13 => {
                // Drop some of everything, one by one and in a batch.
                if !held.is_empty() {
                    held.swap_remove(rng.below(held.len()));
                }
                let n = rng.below(held.len() + 1);
                ImmutableBlock::release_all(held.drain(..n));
                if rng.next().is_multiple_of(4) {
                    MutableBlock::release_all(mutable.drain(..));
                    complete.clear();
                }
            }
            14 => {
                let c = m.counts();
                assert_eq!(c.reset + c.inactive + c.in_flight(), c.total);
                assert!(m.available_blocks() <= TOTAL);
            }
            15 => {
                // Pins compete for a small budget; refusals are expected.
                let hashes = rng.hashes(2);
                if rng.next().is_multiple_of(2) {
                    let _ = m.pin(&hashes);
                } else {
                    m.unpin(&hashes);
                }
            }
            _ => {
                if rng.below(64) == 0 {
                    match m.reset_inactive_pool() {
                        Ok(_) | Err(ResetError::BlocksInUse { .. }) => {}
                        Err(e) => panic!("{e}"),
                    }
                }
            }
        }
        if held.len() > MAX_HELD {
            ImmutableBlock::release_all(held.drain(..held.len() - MAX_HELD / 2));
        }
        weak.truncate(64);
    }
    seen
}

fn stress(policy: BlockDuplicationPolicy, backend: EvictionBackend) {
    let m = Arc::new(
        BlockManager::<Device>::builder()
            .block_count(TOTAL)
            .block_size(BLOCK_SIZE)
            .duplication_policy(policy)
            .eviction(backend)
            .frequency_tracking(FrequencyTracking::Small)
            .max_pinned_fraction(0.05)
            .build()
            .unwrap(),
    );
    // A subscriber nobody reads: its channel fills and the rest is counted, never waited on.
    let events = m.subscribe(4);
    let seen: Vec<Seen> = (0..THREADS)
        .map(|t| {
            let m = Arc::clone(&m);
            thread::spawn(move || worker(&m, 0x5eed_0000 + t as u64))
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().expect("worker panicked"))
        .collect();
    // The workload exercised what it is meant to.
    for s in &seen {
        assert!(s.hits > 0 && s.evicted > 0 && s.upgrades > 0, "{s:?}");
    }

    assert!(events.dropped_events() > 0);
    assert_eq!(
        m.metrics().snapshot().events_dropped,
        events.dropped_events()
    );
    m.unpin_all();
    let c = m.check_invariants().expect("invariants");
    assert_eq!((c.mutable, c.active), (0, 0), "{c:?}");
    assert_eq!(c.reset + c.inactive, m.total_blocks(), "{c:?}");
    assert_eq!(m.available_blocks(), m.total_blocks());
    if policy == BlockDuplicationPolicy::Reject {
        assert_eq!(c.duplicates, 0);
    }
    // The cache still works after the storm: everything is allocatable again.
    let all = m
        .allocate_blocks(TOTAL)
        .expect("every block is free or evictable");
    drop(all);
    assert_eq!(m.reset_inactive_pool(), Ok(0));
    assert_eq!(m.counts().reset, TOTAL);
}

#[test]
fn eight_threads_reject_policy() {
    stress(BlockDuplicationPolicy::Reject, EvictionBackend::Lru);
}

#[test]
fn eight_threads_allow_policy() {
    stress(BlockDuplicationPolicy::Allow, EvictionBackend::Lru);
}

#[test]
fn eight_threads_every_other_backend() {
    for backend in EvictionBackend::ALL.into_iter().skip(1) {
        stress(BlockDuplicationPolicy::Reject, backend);
        stress(BlockDuplicationPolicy::Allow, backend);
    }
}
