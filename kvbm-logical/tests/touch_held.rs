//! `touch_held` records a use of blocks the caller holds exactly as a touching scan of their
//! hashes whose extra handles are dropped at once would — the same eviction order and the same
//! frequency counts, for every eviction backend — and ignores blocks of another manager.

use kvbm_logical::{
    BlockManager, Device, EvictionBackend, FrequencyTracking, ImmutableBlock, SequenceHash,
};
use proptest::prelude::*;

const BS: usize = 16;
const TOTAL: usize = 8;

fn manager(backend: EvictionBackend) -> BlockManager<Device> {
    BlockManager::builder()
        .block_count(TOTAL)
        .block_size(BS)
        .eviction(backend)
        .frequency_tracking(FrequencyTracking::Small)
        .build()
        .unwrap()
}

fn h(x: u64) -> SequenceHash {
    SequenceHash::new(x)
}

/// Registers `TOTAL` blocks (hash `i + 1`, a chain when `chained`) and releases them in
/// `order` (a permutation of `0..TOTAL`), so that they enter the inactive pool in that order.
fn fill(m: &BlockManager<Device>, order: &[usize], chained: bool) {
    let staged = m
        .allocate_blocks(TOTAL)
        .unwrap()
        .into_iter()
        .zip(1..)
        .map(|(b, x)| {
            let parent = (chained && x > 1).then(|| h(x - 1));
            b.stage(h(x), BS).unwrap().with_parent(parent)
        })
        .collect();
    let mut blocks: Vec<Option<ImmutableBlock<Device>>> = m
        .register_blocks(staged)
        .unwrap()
        .into_iter()
        .map(Some)
        .collect();
    for &i in order {
        drop(blocks[i].take());
    }
}

/// The order in which allocation evicts every block.
fn eviction_order(m: &BlockManager<Device>) -> Vec<SequenceHash> {
    let (_blocks, evicted) = m.allocate_blocks_with_evictions(TOTAL).unwrap();
    evicted
}

fn frequencies(m: &BlockManager<Device>) -> Vec<Option<u32>> {
    (1..=TOTAL as u64).map(|x| m.frequency(h(x))).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn touch_held_orders_and_counts_as_a_touching_scan_does(
        backend in prop::sample::select(EvictionBackend::ALL.to_vec()),
        order in Just((0..TOTAL).collect::<Vec<_>>()).prop_shuffle(),
        picked in prop::collection::vec(1..=TOTAL as u64 + 2, 0..6),
        chained in any::<bool>(),
    ) {
        let hashes: Vec<SequenceHash> = picked.into_iter().map(h).collect();
        let (touched, scanned) = (manager(backend), manager(backend));
        fill(&touched, &order, chained);
        fill(&scanned, &order, chained);
        // Both take the blocks without a trace (as the tier stack's lookup does), then
        // record the use in their own way, then let go.
        let held_t = touched.scan_matches(&hashes, false);
        let held_s = scanned.scan_matches(&hashes, false);
        touched.touch_held(&held_t);
        drop(scanned.scan_matches(&hashes, true));
        touched.check_invariants().unwrap();
        prop_assert_eq!(touched.counts(), scanned.counts());
        ImmutableBlock::release_all(held_t);
        ImmutableBlock::release_all(held_s);
        touched.check_invariants().unwrap();
        prop_assert_eq!(frequencies(&touched), frequencies(&scanned), "{:?}", backend);
        prop_assert_eq!(eviction_order(&touched), eviction_order(&scanned), "{:?}", backend);
    }
}

#[test]
fn a_held_block_touched_is_filed_as_just_used_and_the_count_says_which_moved() {
    let m = manager(EvictionBackend::Lru);
    fill(&m, &(0..TOTAL).collect::<Vec<_>>(), false);
    // h(1) is the LRU victim. Take it without a trace, and h(2) with a touch (out of the pool).
    let quiet = m.scan_matches(&[h(1)], false);
    let used = m.scan_matches(&[h(2)], true);
    assert_eq!(m.touch_held(quiet.iter().chain(&used)), 1); // only h(1) was still in the pool
    assert_eq!(m.touch_held(&quiet), 0); // already out: nothing more to do
    ImmutableBlock::release_all(quiet);
    ImmutableBlock::release_all(used);
    let order = eviction_order(&m);
    assert_eq!(&order[TOTAL - 2..], &[h(1), h(2)]);
    m.check_invariants().unwrap();
}

#[test]
fn blocks_of_another_manager_are_ignored() {
    let (m, other) = (manager(EvictionBackend::Lru), manager(EvictionBackend::Lru));
    let ascending: Vec<usize> = (0..TOTAL).collect();
    fill(&m, &ascending, false);
    fill(&other, &ascending, false);
    let theirs = other.scan_matches(&[h(1)], false);
    let before = m.frequency(h(1));
    assert_eq!(m.touch_held(&theirs), 0);
    assert_eq!(
        m.frequency(h(1)),
        before,
        "no access counted for a foreign block"
    );
    ImmutableBlock::release_all(theirs);
    assert_eq!(eviction_order(&m)[0], h(1));
    assert_eq!(eviction_order(&other)[0], h(1));
}

#[test]
fn touch_held_under_concurrent_scans_releases_and_evictions_keeps_every_invariant() {
    // Four threads take blocks in place, touch them and let go, while a fifth allocates
    // (evicting) and registers new blocks over the same hashes; the invariants are checked
    // between rounds and at the end, when every block must be back in a pool.
    const ROUNDS: u64 = 2000;
    let m = manager(EvictionBackend::Lineage);
    fill(&m, &(0..TOTAL).collect::<Vec<_>>(), true);
    let start = std::sync::Barrier::new(5);
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (m, start) = (&m, &start);
            s.spawn(move || {
                start.wait();
                for r in 0..ROUNDS {
                    let hashes: Vec<SequenceHash> = (0..3)
                        .map(|k| h(1 + (t + r + k * 3) % TOTAL as u64))
                        .collect();
                    let held = m.scan_matches(&hashes, false);
                    let moved = m.touch_held(&held);
                    assert!(moved <= held.len());
                    assert_eq!(m.touch_held(&held), 0, "a second use finds nothing to move");
                    ImmutableBlock::release_all(held);
                }
            });
        }
        let (m, start) = (&m, &start);
        s.spawn(move || {
            start.wait();
            for r in 0..ROUNDS {
                if let Ok(blocks) = m.allocate_blocks(2) {
                    let staged = blocks
                        .into_iter()
                        .zip(0..)
                        .map(|(b, k)| b.stage(h(1 + (r * 2 + k) % TOTAL as u64), BS).unwrap())
                        .collect();
                    ImmutableBlock::release_all(m.register_blocks(staged).unwrap());
                }
                m.check_invariants().unwrap();
            }
        });
    });
    let counts = m.check_invariants().unwrap();
    assert_eq!((counts.mutable, counts.active), (0, 0), "{counts:?}");
    assert_eq!(counts.reset + counts.inactive, TOTAL);
}
