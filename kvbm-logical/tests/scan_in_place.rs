//! Taking blocks in place and recording their use later:
//! - `scan_matches(.., touch: false)` leaves no trace: the eviction order, the frequency
//!   statistics and the counts after the returned handles are released are exactly what they
//!   would have been without the scan, for every eviction backend;
//! - `touch_held` records a use of blocks the caller holds exactly as a touching scan of their
//!   hashes whose extra handles are dropped at once would (the same eviction order and the
//!   same frequency counts, for every eviction backend), and ignores blocks of another
//!   manager.

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

/// Registers a chain of `TOTAL` blocks (hash `i + 1`, parent `i`) and releases them one by
/// one, so that they enter the inactive pool in order.
fn fill_chain(m: &BlockManager<Device>) {
    fill(m, &(0..TOTAL).collect::<Vec<_>>(), true);
}

/// The order in which allocation evicts every block.
fn eviction_order(m: &BlockManager<Device>) -> Vec<SequenceHash> {
    let (_blocks, evicted) = m.allocate_blocks_with_evictions(TOTAL).unwrap();
    evicted
}

#[test]
fn a_scan_without_touch_changes_no_eviction_order() {
    for backend in EvictionBackend::ALL {
        let (plain, scanned) = (manager(backend), manager(backend));
        fill_chain(&plain);
        fill_chain(&scanned);
        // Scan the first victim, a middle block and a miss; release in two ways.
        let hits = scanned.scan_matches(&[h(1), h(5), h(99), h(1)], false);
        assert_eq!(hits.len(), 3, "{backend:?}");
        assert_eq!(
            scanned.counts().inactive,
            TOTAL - 2,
            "{backend:?}: held, not inactive"
        );
        assert_eq!(scanned.counts().active, 2, "{backend:?}");
        let copy = hits[1].clone();
        ImmutableBlock::release_all(hits);
        drop(copy);
        assert_eq!(scanned.counts(), plain.counts(), "{backend:?}");
        assert_eq!(
            scanned.frequency(h(1)),
            plain.frequency(h(1)),
            "{backend:?}"
        );
        scanned.check_invariants().unwrap();
        assert_eq!(
            eviction_order(&scanned),
            eviction_order(&plain),
            "{backend:?}: a scan without touch moved blocks in the eviction order"
        );
    }
}

#[test]
fn a_scan_with_touch_is_a_use() {
    let m = manager(EvictionBackend::Lru);
    fill_chain(&m);
    drop(m.scan_matches(&[h(1)], true));
    let order = eviction_order(&m);
    assert_eq!(
        order.last(),
        Some(&h(1)),
        "touched: the most recently used now"
    );
    assert_eq!(order[0], h(2));
}

#[test]
fn a_held_scanned_block_is_never_evicted_and_returns_as_the_newest_if_passed_over() {
    let m = manager(EvictionBackend::Lru);
    fill_chain(&m);
    let held = m.scan_matches(&[h(1)], false);
    assert_eq!(m.available_blocks(), TOTAL - 1);
    // The allocation reaches the held victim, passes it over and evicts the next one.
    let (blocks, evicted) = m.allocate_blocks_with_evictions(2).unwrap();
    assert_eq!(evicted, vec![h(2), h(3)]);
    assert!(
        m.allocate_blocks(TOTAL - 2).is_err(),
        "only the unheld blocks are available"
    );
    drop(held);
    m.check_invariants().unwrap();
    drop(blocks);
    // Passed over while held, it re-entered the order as the most recently used.
    let order = eviction_order(&m);
    assert_eq!(order.last(), Some(&h(1)));
    assert_eq!(order.len(), TOTAL - 2);
}

#[test]
fn another_acquisition_of_a_scanned_block_is_a_use() {
    for acquire in ["match", "upgrade", "pin"] {
        let m = BlockManager::<Device>::builder()
            .block_count(TOTAL)
            .block_size(BS)
            .max_pinned_fraction(1.0)
            .build()
            .unwrap();
        fill_chain(&m);
        let held = m.scan_matches(&[h(1)], false);
        let other = match acquire {
            "match" => m.match_blocks(&[h(1)]),
            "upgrade" => vec![held[0].downgrade().upgrade().unwrap()],
            _ => {
                assert_eq!(m.pin(&[h(1)]), Ok(1));
                Vec::new()
            }
        };
        drop(held);
        drop(other);
        m.unpin_all();
        m.check_invariants().unwrap();
        let order = eviction_order(&m);
        assert_eq!(order.last(), Some(&h(1)), "{acquire}: used, so the newest");
    }
}

#[test]
fn touching_or_invalidating_a_held_scanned_block_does_nothing() {
    let m = manager(EvictionBackend::Lru);
    fill_chain(&m);
    let held = m.scan_matches(&[h(1)], false);
    assert_eq!(m.touch_blocks(&[h(1)]), 0, "held blocks are not inactive");
    assert_eq!(m.invalidate_blocks(&[h(1)]), 0);
    assert!(matches!(
        m.reset_inactive_pool(),
        Err(kvbm_logical::ResetError::BlocksInUse { moved, in_use: 1, .. }) if moved == TOTAL - 1
    ));
    m.check_invariants().unwrap();
    drop(held);
    let c = m.check_invariants().unwrap();
    assert_eq!(
        (c.inactive, c.reset, c.registered_hashes),
        (1, TOTAL - 1, 1)
    );
    assert_eq!(m.match_blocks(&[h(1)]).len(), 1);
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
        evict in 0..4usize,
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
        // Allocations while the blocks are held evict the same blocks from both (an eviction
        // passing over a held block must not file it differently), except under lineage with
        // chains: lineage keeps a used block in its tree until its release or until an
        // eviction reaches it, so its ancestors are not exposed as leaves meanwhile, where a
        // touching scan takes it out of the tree at once (see `touch_held`). There only the
        // counts and the invariants must agree.
        let mut same = true;
        if let (Ok((a, ea)), Ok((b, eb))) = (
            touched.allocate_blocks_with_evictions(evict),
            scanned.allocate_blocks_with_evictions(evict),
        ) {
            if backend == EvictionBackend::Lineage && chained {
                prop_assert_eq!(ea.len(), eb.len());
                same = ea == eb;
            } else {
                prop_assert_eq!(&ea, &eb, "{:?}", backend);
            }
            drop((a, b));
        }
        touched.check_invariants().unwrap();
        ImmutableBlock::release_all(held_t);
        ImmutableBlock::release_all(held_s);
        touched.check_invariants().unwrap();
        prop_assert_eq!(frequencies(&touched), frequencies(&scanned), "{:?}", backend);
        if same {
            prop_assert_eq!(eviction_order(&touched), eviction_order(&scanned), "{:?}", backend);
        }
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
    fill_chain(&m);
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
