//! `scan_matches(.., touch: false)` leaves no trace: the eviction order, the frequency
//! statistics and the counts after the returned handles are released are exactly what they
//! would have been without the scan, for every eviction backend.

use kvbm_logical::{
    BlockManager, Device, EvictionBackend, FrequencyTracking, ImmutableBlock, SequenceHash,
};

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

/// Registers a chain of `TOTAL` blocks (hash `i + 1`, parent `i`) and releases them one by
/// one, so that they enter the inactive pool in order.
fn fill(m: &BlockManager<Device>) {
    let staged = m
        .allocate_blocks(TOTAL)
        .unwrap()
        .into_iter()
        .zip(1..)
        .map(|(b, x)| {
            let parent = (x > 1).then(|| h(x - 1));
            b.stage(h(x), BS).unwrap().with_parent(parent)
        })
        .collect();
    for block in m.register_blocks(staged).unwrap() {
        drop(block);
    }
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
        fill(&plain);
        fill(&scanned);
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
    fill(&m);
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
    fill(&m);
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
        fill(&m);
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
    fill(&m);
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
