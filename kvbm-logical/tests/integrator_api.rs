//! The lookups without side effects, the scattered match, and what an offload tier needs:
//! eviction reported as `Demoted`, eviction of inactive blocks only, and purging held blocks.

use kvbm_logical::{
    BlockManager, Device, EvictionBackend, Host, ImmutableBlock, KvEventKind, RemovalReason,
    SequenceHash,
};

const BS: usize = 4;

fn h(x: u64) -> SequenceHash {
    SequenceHash::new(x)
}

/// Registers unrelated (root) blocks with these hashes and returns the handles.
fn register(m: &BlockManager<Device>, hashes: &[u64]) -> Vec<ImmutableBlock<Device>> {
    let staged: Vec<_> = m
        .allocate_blocks(hashes.len())
        .unwrap()
        .into_iter()
        .zip(hashes)
        .map(|(b, &x)| b.stage(h(x), BS).unwrap())
        .collect();
    m.register_blocks(staged).unwrap()
}

#[test]
fn a_probe_changes_neither_the_eviction_order_nor_the_stats() {
    for backend in [EvictionBackend::default(), EvictionBackend::Lru] {
        let m = BlockManager::<Device>::builder()
            .block_count(2)
            .block_size(BS)
            .eviction(backend)
            .build()
            .unwrap();
        // 1 released before 2: 1 is the first victim.
        for x in [1, 2] {
            drop(register(&m, &[x]));
        }
        let before = m.metrics().snapshot();
        let freq = m.frequency(h(1));
        for _ in 0..5 {
            let p = m.probe_prefix(&[h(1)]);
            assert_eq!((p.hits(), p.active, p.inactive), (1, 0, 1));
        }
        assert_eq!(m.metrics().snapshot(), before, "{backend:?}");
        assert_eq!(m.frequency(h(1)), freq);
        let (_b, evicted) = m.allocate_blocks_evicting(1).unwrap();
        assert_eq!(
            evicted[0].hash,
            h(1),
            "{backend:?}: the probe reordered the pool"
        );
        m.check_invariants().unwrap();
    }
}

#[test]
fn a_probe_splits_held_and_inactive_hits_and_stops_at_a_miss() {
    let m = BlockManager::<Device>::builder()
        .block_count(4)
        .block_size(BS)
        .build()
        .unwrap();
    let mut held = register(&m, &[1, 2, 3]);
    drop(held.remove(1)); // 2 inactive
    let p = m.probe_prefix(&[h(1), h(2), h(3), h(4), h(1)]);
    assert_eq!((p.active, p.inactive), (2, 1));
    // Matching consumes exactly `inactive` allocatable blocks.
    let available = m.available_blocks();
    let matched = m.match_blocks(&[h(1), h(2), h(3)]);
    assert_eq!(matched.len(), p.hits());
    assert_eq!(available - m.available_blocks(), p.inactive);
    assert_eq!(m.probe_prefix(&[h(9), h(1)]).hits(), 0);
    assert_eq!(m.probe_prefix(&[]).hits(), 0);
}

#[test]
fn the_scattered_match_is_aligned_with_its_input() {
    let m = BlockManager::<Device>::builder()
        .block_count(4)
        .block_size(BS)
        .build()
        .unwrap();
    let held = register(&m, &[1, 3]);
    drop(register(&m, &[5])); // inactive: a hit, resurrected
    let found = m.match_blocks_scattered(&[h(1), h(2), h(3), h(5), h(1)]);
    let got: Vec<Option<SequenceHash>> = found
        .iter()
        .map(|b| b.as_ref().map(ImmutableBlock::sequence_hash))
        .collect();
    assert_eq!(
        got,
        vec![Some(h(1)), None, Some(h(3)), Some(h(5)), Some(h(1))]
    );
    assert_eq!(m.counts().inactive, 0);
    let s = m.metrics().snapshot();
    assert_eq!((s.match_requested, s.match_returned), (5, 4));
    drop(found);
    drop(held);
    assert_eq!(m.counts().inactive, 3);
    m.check_invariants().unwrap();
}

#[test]
fn evicting_as_demoted_is_reported_as_demoted() {
    let m = BlockManager::<Host>::builder()
        .block_count(2)
        .block_size(BS)
        .build()
        .unwrap();
    let staged: Vec<_> = m
        .allocate_blocks(2)
        .unwrap()
        .into_iter()
        .zip([1, 2])
        .map(|(b, x)| b.stage(h(x), BS).unwrap())
        .collect();
    ImmutableBlock::release_all(m.register_blocks(staged).unwrap());
    let events = m.subscribe(8);
    let (blocks, evicted) = m
        .allocate_blocks_evicting_as(2, RemovalReason::Demoted)
        .unwrap();
    assert_eq!((blocks.len(), evicted.len()), (2, 2));
    let batch = events.try_recv().unwrap();
    assert_eq!((batch[0].tier, batch[0].medium), ("host", "CPU"));
    let KvEventKind::Removed {
        block_hashes,
        reason,
    } = &batch[0].kind
    else {
        panic!("{batch:?}")
    };
    assert_eq!(*reason, RemovalReason::Demoted);
    assert_eq!(block_hashes.len(), 2);
    let s = m.metrics().snapshot();
    assert_eq!(
        (
            s.removed_demoted,
            s.removed_evicted,
            s.allocations_from_eviction
        ),
        (2, 0, 2)
    );
}

#[test]
fn evict_inactive_never_takes_a_free_block() {
    let m = BlockManager::<Device>::builder()
        .block_count(6)
        .block_size(BS)
        .build()
        .unwrap();
    let held = register(&m, &[1]);
    drop(register(&m, &[2, 3]));
    let events = m.subscribe(8);
    assert_eq!(m.counts().reset, 3);
    let taken = m.evict_inactive(10, RemovalReason::Demoted);
    assert_eq!(taken.len(), 2, "only the inactive blocks");
    assert_eq!(m.counts().reset, 3, "the free blocks stayed free");
    let mut hashes: Vec<u64> = taken.iter().map(|(_, e)| e.hash.as_u64()).collect();
    hashes.sort_unstable();
    assert_eq!(hashes, vec![2, 3]);
    for (block, record) in &taken {
        assert_eq!(block.block_id(), record.block_id);
    }
    assert!(matches!(
        &events.try_recv().unwrap()[0].kind,
        KvEventKind::Removed { reason: RemovalReason::Demoted, block_hashes } if block_hashes.len() == 2
    ));
    assert!(m.evict_inactive(4, RemovalReason::Evicted).is_empty());
    assert!(m.evict_inactive(0, RemovalReason::Evicted).is_empty());
    drop(taken);
    assert_eq!(m.counts().reset, 5);
    assert!(m.contains(h(1)));
    drop(held);
    m.check_invariants().unwrap();
}

#[test]
fn purging_a_held_block_stops_serving_it_and_frees_it_on_release() {
    let m = BlockManager::<Device>::builder()
        .block_count(4)
        .block_size(BS)
        .max_pinned_fraction(1.0)
        .build()
        .unwrap();
    let mut held = register(&m, &[1, 2, 3]);
    let weak = held[0].downgrade();
    // 2: released but a no-touch scan holds it in place in the pool.
    drop(held.remove(1));
    let scanned = m.scan_matches(&[h(2)], false);
    assert_eq!(scanned.len(), 1);
    // 3: pinned as well as held.
    m.pin(&[h(3)]).unwrap();
    let events = m.subscribe(8);
    let purge = m.purge_blocks(&[h(1), h(2), h(3), h(9)]);
    assert_eq!((purge.reset, purge.detached), (0, 3));
    for x in [1, 2, 3] {
        assert!(!m.contains(h(x)));
    }
    assert!(m.match_blocks(&[h(1)]).is_empty());
    assert!(m.scan_matches(&[h(2), h(3)], true).is_empty());
    assert!(
        weak.upgrade().is_none(),
        "a purged block cannot be upgraded"
    );
    assert!(m.pin(&[h(3)]).is_err());
    let batch = events.try_recv().unwrap();
    let KvEventKind::Removed {
        block_hashes,
        reason,
    } = &batch[0].kind
    else {
        panic!("{batch:?}")
    };
    assert_eq!(*reason, RemovalReason::Invalidated);
    assert_eq!(block_hashes, &vec![h(1), h(2), h(3)]);
    m.check_invariants().unwrap();
    // Holders keep their slots; the last release sends each to the reset pool.
    drop(held);
    drop(scanned);
    let counts = m.check_invariants().unwrap();
    assert_eq!((counts.reset, counts.inactive, counts.pinned), (4, 0, 0));
    assert!(
        events.try_recv().is_none(),
        "the purge already announced the removal"
    );
    assert_eq!(m.metrics().snapshot().removed_invalidated, 3);
    // A purged hash can be registered again.
    drop(register(&m, &[1]));
    assert!(m.contains(h(1)));
}

#[test]
fn purging_an_inactive_block_resets_it_now() {
    let m = BlockManager::<Device>::builder()
        .block_count(2)
        .block_size(BS)
        .build()
        .unwrap();
    drop(register(&m, &[1]));
    let purge = m.purge_blocks(&[h(1)]);
    assert_eq!((purge.reset, purge.detached, purge.total()), (1, 0, 1));
    assert_eq!(m.counts().reset, 2);
    assert_eq!(m.purge_blocks(&[h(1)]).total(), 0);
    m.check_invariants().unwrap();
}

#[test]
fn touch_held_runs_none_of_the_callers_iterator_under_its_lock() {
    // The crate runs no closure or iterator of the caller's while it holds its lock: one
    // that calls back into the manager (here `counts`, which takes the lock) would deadlock.
    use std::sync::mpsc;
    let m = kvbm_logical::BlockManager::<kvbm_logical::Device>::builder()
        .block_count(4)
        .block_size(4)
        .build()
        .unwrap();
    let held: Vec<_> = m
        .allocate_blocks(2)
        .unwrap()
        .into_iter()
        .zip([1, 2])
        .map(|(b, h)| {
            m.register_block(b.stage(kvbm_logical::SequenceHash::new(h), 4).unwrap())
                .unwrap()
        })
        .collect();
    let (tx, rx) = mpsc::channel();
    let worker = std::thread::spawn({
        let m = m.clone();
        move || {
            let peek = |_: &&kvbm_logical::ImmutableBlock<kvbm_logical::Device>| {
                let _ = m.counts(); // calls back into the manager
            };
            let n = m.touch_held(held.iter().inspect(peek));
            tx.send(n).unwrap();
            drop(held);
        }
    });
    let n = rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("touch_held deadlocked on the caller's iterator");
    assert!(n <= 2);
    worker.join().unwrap();
}

#[test]
fn purge_all_leaves_nothing_matchable_even_blocks_held_meanwhile() {
    // After a weight update every cached block is stale, held ones too: none may be matched
    // again, whenever its holder lets go.
    use kvbm_logical::{BlockManager, Device, SequenceHash};
    let m = BlockManager::<Device>::builder()
        .block_count(6)
        .block_size(4)
        .build()
        .unwrap();
    let hashes: Vec<SequenceHash> = (1..=4).map(SequenceHash::new).collect();
    let mut held: Vec<_> = m
        .allocate_blocks(4)
        .unwrap()
        .into_iter()
        .zip(&hashes)
        .map(|(b, &h)| m.register_block(b.stage(h, 4).unwrap()).unwrap())
        .collect();
    let events = m.subscribe(16);
    let kept = held.split_off(2); // two stay held, two go inactive
    drop(held);
    let purge = m.purge_all();
    assert_eq!((purge.reset, purge.detached), (2, 2));
    assert!(m.match_blocks(&hashes).is_empty());
    drop(kept);
    assert!(
        m.match_blocks(&hashes).is_empty(),
        "released, not matchable"
    );
    let c = m.counts();
    assert_eq!((c.reset, c.inactive, c.registered_hashes), (6, 0, 0));
    let removed: usize = events
        .drain()
        .flat_map(|b| b.to_vec())
        .map(|e| match &e.kind {
            kvbm_logical::KvEventKind::Removed { block_hashes, .. } => block_hashes.len(),
            _ => 0,
        })
        .sum();
    assert_eq!(removed, 4, "each hash announced gone once");
    m.check_invariants().unwrap();
}

#[test]
fn a_deduplicated_registration_keeps_what_it_asked_of_the_cache() {
    // Under Reject the second registration of a hash gets the first one's block back. A
    // do-not-cache request that registered a shared prefix first must not take it out of the
    // cache for a cacheable one, and the stronger retention must hold.
    use kvbm_logical::{BlockManager, Device, Retention, SequenceHash};
    let m = BlockManager::<Device>::builder()
        .block_count(4)
        .block_size(4)
        .build()
        .unwrap();
    let h = SequenceHash::new(7);
    let stage = |reset: bool| {
        m.allocate_blocks(1)
            .unwrap()
            .pop()
            .unwrap()
            .stage(h, 4)
            .unwrap()
            .reset_on_release(reset)
    };
    let uncached = m.register_block(stage(true)).unwrap();
    let cached = m.register_block(stage(false)).unwrap();
    assert_eq!(uncached.block_id(), cached.block_id(), "deduplicated");
    drop(uncached);
    drop(cached);
    assert!(m.contains(h), "the cacheable registration kept it cached");

    // Retention: the stronger of the two. Under the priority backend the weaker block
    // (priority 50) goes first, then the deduplicated one (90, not its first 35).
    let p = BlockManager::<Device>::builder()
        .block_count(2)
        .block_size(4)
        .eviction(kvbm_logical::EvictionBackend::Priority)
        .build()
        .unwrap();
    let stage_r = |hash: u64, r: Retention| {
        p.allocate_blocks(1)
            .unwrap()
            .pop()
            .unwrap()
            .stage(SequenceHash::new(hash), 4)
            .unwrap()
            .with_retention(r)
    };
    let weak = p.register_block(stage_r(8, Retention::default())).unwrap();
    // The second registration of 8 (priority 90) stages in the other slot and gets the first
    // block back; its own slot returns to the free pool.
    let strong = p
        .register_block(stage_r(8, Retention::new(90).unwrap()))
        .unwrap();
    assert_eq!(weak.block_id(), strong.block_id(), "deduplicated");
    drop((weak, strong));
    // Hash 9 at priority 50 in the other slot; then one eviction: the lower priority goes.
    let again = p
        .register_block(stage_r(9, Retention::new(50).unwrap()))
        .unwrap();
    drop(again);
    let (_slot, evicted) = p.allocate_blocks_with_evictions(1).unwrap();
    assert_eq!(
        evicted,
        vec![SequenceHash::new(9)],
        "priority 90 outlasts 50"
    );
}
