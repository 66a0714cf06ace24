//! Every transition and error path of the block lifecycle, one behaviour per test.

use kvbm_logical::{
    AllocationError, BlockDuplicationPolicy, BlockId, BlockManager, BuildError, CompleteBlock,
    Device, FrequencyTracking, Host, ImmutableBlock, MAX_BLOCK_SIZE, MAX_BLOCKS, MutableBlock,
    RegisterError, ResetError, Salt, SequenceHash, StageError, TokenBlockSequence, WeakBlock,
};

const BS: usize = 16;

fn manager(blocks: usize) -> BlockManager<Device> {
    manager_with(blocks, BlockDuplicationPolicy::Reject)
}

fn manager_with(blocks: usize, dup: BlockDuplicationPolicy) -> BlockManager<Device> {
    BlockManager::builder()
        .block_count(blocks)
        .block_size(BS)
        .duplication_policy(dup)
        .build()
        .unwrap()
}

fn h(x: u64) -> SequenceHash {
    SequenceHash::new(x)
}

/// Allocates and registers one block per hash; returns the handles.
fn register(m: &BlockManager<Device>, hashes: &[u64]) -> Vec<ImmutableBlock<Device>> {
    let staged = m
        .allocate_blocks(hashes.len())
        .unwrap()
        .into_iter()
        .zip(hashes)
        .map(|(b, &x)| b.stage(h(x), BS).unwrap())
        .collect();
    m.register_blocks(staged).unwrap()
}

/// Registers `hashes` and drops them, in order, so they enter the inactive pool in order.
fn register_inactive(m: &BlockManager<Device>, hashes: &[u64]) {
    for b in register(m, hashes) {
        drop(b);
    }
}

fn hashes_of(blocks: &[ImmutableBlock<Device>]) -> Vec<u64> {
    blocks.iter().map(|b| b.sequence_hash().as_u64()).collect()
}

fn assert_send_sync<X: Send + Sync>() {}

#[test]
fn every_public_handle_is_send_and_sync() {
    assert_send_sync::<BlockManager<Device>>();
    assert_send_sync::<MutableBlock<Device>>();
    assert_send_sync::<CompleteBlock<Device>>();
    assert_send_sync::<ImmutableBlock<Device>>();
    assert_send_sync::<WeakBlock<Device>>();
    assert_send_sync::<TokenBlockSequence>();
}

// ---------------------------------------------------------------- builder

#[test]
fn builder_rejects_bad_configurations() {
    let b = || BlockManager::<Device>::builder();
    assert_eq!(
        b().block_size(16).build().unwrap_err(),
        BuildError::MissingBlockCount
    );
    assert_eq!(
        b().block_count(4).build().unwrap_err(),
        BuildError::MissingBlockSize
    );
    assert_eq!(
        b().block_count(0).block_size(16).build().unwrap_err(),
        BuildError::ZeroBlocks
    );
    assert_eq!(
        b().block_count(MAX_BLOCKS + 1)
            .block_size(16)
            .build()
            .unwrap_err(),
        BuildError::TooManyBlocks {
            requested: MAX_BLOCKS + 1,
            max: MAX_BLOCKS
        }
    );
    assert_eq!(
        b().block_count(4).block_size(0).build().unwrap_err(),
        BuildError::ZeroBlockSize
    );
    assert_eq!(
        b().block_count(4).block_size(24).build().unwrap_err(),
        BuildError::BlockSizeNotPowerOfTwo { block_size: 24 }
    );
    assert_eq!(
        b().block_count(4)
            .block_size(MAX_BLOCK_SIZE * 2)
            .build()
            .unwrap_err(),
        BuildError::BlockSizeTooLarge {
            block_size: MAX_BLOCK_SIZE * 2,
            max: MAX_BLOCK_SIZE
        }
    );
    // Errors read well.
    assert_eq!(
        BuildError::BlockSizeNotPowerOfTwo { block_size: 24 }.to_string(),
        "block_size 24 is not a power of two"
    );
}

#[test]
fn builder_accepts_the_extremes_of_block_size() {
    for size in [1, MAX_BLOCK_SIZE] {
        let m = BlockManager::<Host>::builder()
            .block_count(1)
            .block_size(size)
            .build()
            .unwrap();
        assert_eq!(m.block_size(), size);
        assert_eq!(m.total_blocks(), 1);
    }
}

#[test]
fn managers_report_their_configuration() {
    let m = manager_with(8, BlockDuplicationPolicy::Allow);
    assert_eq!(m.total_blocks(), 8);
    assert_eq!(m.block_size(), BS);
    assert_eq!(m.duplication_policy(), BlockDuplicationPolicy::Allow);
    assert_eq!(m.available_blocks(), 8);
    // The default eviction backend (adaptive) tracks access frequency.
    assert_eq!(m.frequency(h(1)), Some(0));
    let clone = m.clone();
    assert_eq!(clone.id(), m.id());
    assert!(format!("{m:?}").contains("device"));
}

// ---------------------------------------------------------------- allocation

#[test]
fn allocation_hands_out_distinct_ids_in_ascending_order() {
    let m = manager(8);
    let blocks = m.allocate_blocks(5).unwrap();
    let ids: Vec<u32> = blocks.iter().map(|b| b.block_id().get()).collect();
    assert_eq!(ids, vec![0, 1, 2, 3, 4]);
    assert!(blocks.iter().all(|b| b.manager_id() == m.id()));
    assert_eq!(m.available_blocks(), 3);
    assert_eq!(m.counts().mutable, 5);
}

#[test]
fn allocation_is_all_or_nothing() {
    let m = manager(4);
    register_inactive(&m, &[1]);
    let held = m.allocate_blocks(2).unwrap();
    assert_eq!(
        m.allocate_blocks(3).unwrap_err(),
        AllocationError::Exhausted {
            requested: 3,
            available: 2,
            total: 4
        }
    );
    // Nothing was taken and nothing was evicted.
    assert_eq!(m.available_blocks(), 2);
    assert_eq!(m.match_blocks(&[h(1)]).len(), 1);
    drop(held);
    m.check_invariants().unwrap();
}

#[test]
fn allocating_zero_or_absurdly_many_blocks_is_handled() {
    let m = manager(4);
    assert!(m.allocate_blocks(0).unwrap().is_empty());
    assert!(matches!(
        m.allocate_blocks(usize::MAX),
        Err(AllocationError::Exhausted {
            requested: usize::MAX,
            available: 4,
            total: 4
        })
    ));
    assert_eq!(m.available_blocks(), 4);
}

#[test]
fn dropping_a_mutable_block_returns_it_to_the_reset_pool() {
    let m = manager(2);
    let b = m.allocate_blocks(1).unwrap();
    assert_eq!(m.available_blocks(), 1);
    drop(b);
    let c = m.counts();
    assert_eq!((c.reset, c.mutable), (2, 0));
}

#[test]
fn the_most_recently_freed_slot_is_reused_first() {
    let m = manager(4);
    let mut blocks = m.allocate_blocks(3).unwrap();
    let freed = blocks.remove(1).block_id();
    let again = m.allocate_blocks(1).unwrap();
    assert_eq!(again[0].block_id(), freed);
}

// ---------------------------------------------------------------- staging

#[test]
fn staging_with_the_wrong_block_size_gives_the_block_back() {
    let m = manager(2);
    let b = m.allocate_blocks(1).unwrap().pop().unwrap();
    let id = b.block_id();
    let err = b.stage(h(1), BS / 2).unwrap_err();
    assert_eq!(
        err.to_string(),
        "block size mismatch: the manager's blocks hold 16 tokens, the hash covers 8"
    );
    let StageError::BlockSizeMismatch {
        expected, actual, ..
    } = &err
    else {
        panic!("unexpected error {err:?}")
    };
    assert_eq!((*expected, *actual), (BS, BS / 2));
    let b = err.into_block();
    assert_eq!(b.block_id(), id);
    assert_eq!(m.counts().mutable, 1); // still held, not leaked or freed
    drop(b);
    assert_eq!(m.available_blocks(), 2);
}

#[test]
fn staging_from_a_token_block_carries_hash_and_parent() {
    let m = manager(4);
    let seq = TokenBlockSequence::from_tokens(&[7; 2 * BS], BS, &Salt::none()).unwrap();
    let mut blocks = m.allocate_blocks(2).unwrap();
    let second = blocks
        .pop()
        .unwrap()
        .stage_token_block(&seq.blocks()[1])
        .unwrap();
    assert_eq!(second.sequence_hash(), seq.blocks()[1].sequence_hash());
    assert_eq!(second.parent(), Some(seq.blocks()[0].sequence_hash()));
    let first = blocks
        .pop()
        .unwrap()
        .stage_token_block(&seq.blocks()[0])
        .unwrap();
    assert_eq!(first.parent(), None);

    let wrong = TokenBlockSequence::from_tokens(&[7; 8], 8, &Salt::none()).unwrap();
    let b = first.reset();
    assert!(b.stage_token_block(&wrong.blocks()[0]).is_err());
}

#[test]
fn a_complete_block_can_be_reset_or_dropped() {
    let m = manager(2);
    let c = m
        .allocate_blocks(1)
        .unwrap()
        .pop()
        .unwrap()
        .stage(h(3), BS)
        .unwrap();
    let id = c.block_id();
    let b = c.reset();
    assert_eq!(b.block_id(), id);
    assert_eq!(m.counts().mutable, 1);
    let c = b.stage(h(4), BS).unwrap();
    drop(c);
    assert_eq!(m.counts().reset, 2);
    // Dropping a staged block registers nothing.
    assert!(m.match_blocks(&[h(3), h(4)]).is_empty());
}

// ---------------------------------------------------------------- registration

#[test]
fn registered_blocks_are_matchable_and_active() {
    let m = manager(4);
    let held = register(&m, &[10, 11]);
    assert_eq!(hashes_of(&held), vec![10, 11]);
    let c = m.counts();
    assert_eq!((c.active, c.registered_hashes, c.inactive), (2, 2, 0));
    let hits = m.match_blocks(&[h(10), h(11)]);
    assert_eq!(hits[0].block_id(), held[0].block_id());
    assert_eq!(hits[1].block_id(), held[1].block_id());
}

#[test]
fn reject_returns_the_active_original_and_recycles_the_slot() {
    let m = manager(4);
    let original = register(&m, &[5]).pop().unwrap();
    let dup = m.allocate_blocks(1).unwrap().pop().unwrap();
    let dup_slot = dup.block_id();
    let got = m.register_block(dup.stage(h(5), BS).unwrap()).unwrap();
    assert_eq!(got.block_id(), original.block_id());
    assert_ne!(got.block_id(), dup_slot);
    let c = m.counts();
    assert_eq!((c.active, c.reset, c.duplicates), (1, 3, 0));
    drop(original);
    assert_eq!(m.counts().active, 1); // `got` is a second owner
    drop(got);
    assert_eq!(m.counts().inactive, 1);
}

#[test]
fn reject_resurrects_an_inactive_original() {
    let m = manager(4);
    register_inactive(&m, &[5]);
    let original = m.counts();
    assert_eq!(original.inactive, 1);
    let got = register(&m, &[5]).pop().unwrap();
    assert_eq!(got.block_id(), BlockId::new(0));
    let c = m.counts();
    assert_eq!((c.active, c.inactive, c.reset), (1, 0, 3));
}

#[test]
fn allow_keeps_and_counts_duplicates() {
    let m = manager_with(4, BlockDuplicationPolicy::Allow);
    let a = register(&m, &[5]).pop().unwrap();
    let b = register(&m, &[5]).pop().unwrap();
    assert_ne!(a.block_id(), b.block_id());
    let c = m.counts();
    assert_eq!((c.active, c.registered_hashes, c.duplicates), (2, 1, 1));
    m.check_invariants().unwrap();
    // Matching finds one of them.
    let hit = m.match_blocks(&[h(5)]).pop().unwrap();
    assert!(hit.block_id() == a.block_id() || hit.block_id() == b.block_id());
}

#[test]
fn allow_reports_an_evicted_hash_only_when_its_last_copy_goes() {
    let m = manager_with(3, BlockDuplicationPolicy::Allow);
    let a = register(&m, &[5]).pop().unwrap();
    let b = register(&m, &[5]).pop().unwrap();
    drop(a);
    drop(b);
    register_inactive(&m, &[6]);
    // LRU order: a, b, 6. The first eviction removes one copy of 5: not reported.
    let (x, evicted) = m.allocate_blocks_with_evictions(1).unwrap();
    assert!(evicted.is_empty());
    assert_eq!(m.counts().duplicates, 0);
    assert_eq!(m.match_blocks(&[h(5)]).len(), 1);
    // The match resurrected and released the other copy: it is now the most recent.
    let (y, evicted) = m.allocate_blocks_with_evictions(2).unwrap();
    assert_eq!(evicted, vec![h(6), h(5)]);
    assert_eq!(m.counts().registered_hashes, 0);
    drop((x, y));
    m.check_invariants().unwrap();
}

#[test]
fn a_foreign_block_is_refused_and_given_back() {
    let m = manager(2);
    let other = manager(2);
    let theirs = other
        .allocate_blocks(1)
        .unwrap()
        .pop()
        .unwrap()
        .stage(h(1), BS)
        .unwrap();
    let err = m.register_block(theirs).unwrap_err();
    let RegisterError::ForeignBlock {
        expected,
        found,
        index,
        ..
    } = &err
    else {
        panic!("unexpected {err:?}")
    };
    assert_eq!((*expected, *found, *index), (m.id(), other.id(), 0));
    assert!(err.to_string().contains("belongs to"));
    let theirs = err.into_blocks();
    // Nothing registered anywhere; the block is intact and registers at home.
    assert_eq!(m.counts().registered_hashes, 0);
    assert_eq!(other.counts().mutable, 1);
    let home = other.register_block(theirs).unwrap();
    assert_eq!(home.manager_id(), other.id());
}

#[test]
fn a_batch_with_a_foreign_block_registers_nothing() {
    let m = manager(4);
    let other = manager(4);
    let mut batch: Vec<CompleteBlock<Device>> = m
        .allocate_blocks(2)
        .unwrap()
        .into_iter()
        .zip([1, 2])
        .map(|(b, x)| b.stage(h(x), BS).unwrap())
        .collect();
    batch.insert(
        1,
        other
            .allocate_blocks(1)
            .unwrap()
            .pop()
            .unwrap()
            .stage(h(9), BS)
            .unwrap(),
    );
    let err = m.register_blocks(batch).unwrap_err();
    assert!(matches!(err, RegisterError::ForeignBlock { index: 1, .. }));
    assert_eq!(m.counts().registered_hashes, 0);
    assert_eq!(m.counts().mutable, 2);
    let blocks = err.into_blocks();
    assert_eq!(blocks.len(), 3);
    drop(blocks);
    assert_eq!(m.available_blocks(), 4);
    assert_eq!(other.available_blocks(), 4);
}

#[test]
fn registering_an_empty_batch_is_a_no_op() {
    let m = manager(2);
    assert!(m.register_blocks(Vec::new()).unwrap().is_empty());
    assert!(m.match_blocks(&[]).is_empty());
    assert!(m.scan_matches(&[], true).is_empty());
}

// ---------------------------------------------------------------- immutable / weak

#[test]
fn the_last_owner_sends_a_block_to_the_inactive_pool() {
    let m = manager(2);
    let a = register(&m, &[1]).pop().unwrap();
    let b = a.clone();
    let c = b.clone();
    drop(a);
    drop(b);
    assert_eq!(m.counts().active, 1);
    drop(c);
    let counts = m.counts();
    assert_eq!((counts.active, counts.inactive), (0, 1));
}

#[test]
fn weak_blocks_upgrade_while_registered() {
    let m = manager(1);
    let strong = register(&m, &[1]).pop().unwrap();
    let weak = strong.downgrade();
    assert_eq!(weak.sequence_hash(), h(1));
    assert_eq!(weak.block_id(), strong.block_id());
    assert_eq!(weak.manager_id(), m.id());
    // Active: upgrade adds an owner.
    let again = weak.upgrade().unwrap();
    drop(strong);
    assert_eq!(m.counts().active, 1);
    drop(again);
    // Inactive: upgrade resurrects.
    let again = weak.clone().upgrade().unwrap();
    assert_eq!(m.counts().active, 1);
    drop(again);
    // Evicted: gone, even once the slot holds another hash.
    let slot = m.allocate_blocks(1).unwrap().pop().unwrap();
    assert!(weak.upgrade().is_none());
    let other = m.register_block(slot.stage(h(2), BS).unwrap()).unwrap();
    assert_eq!(other.block_id(), weak.block_id());
    assert!(weak.upgrade().is_none());
}

#[test]
fn weak_blocks_do_not_keep_a_manager_alive() {
    let m = manager(1);
    let weak = register(&m, &[1]).pop().unwrap().downgrade();
    assert!(weak.upgrade().is_some());
    drop(m);
    assert!(weak.upgrade().is_none());
}

#[test]
fn handles_outlive_their_manager_value() {
    let m = manager(2);
    let held = register(&m, &[1]);
    let mutable = m.allocate_blocks(1).unwrap();
    drop(m);
    // Drops after the manager value is gone are fine (the store lives on in the handles).
    drop(held);
    drop(mutable);
}

// ---------------------------------------------------------------- matching

#[test]
fn match_stops_at_the_first_miss_and_resurrects() {
    let m = manager(8);
    register_inactive(&m, &[1, 2, 4]);
    let hits = m.match_blocks(&[h(1), h(2), h(3), h(4)]);
    assert_eq!(hashes_of(&hits), vec![1, 2]);
    let c = m.counts();
    assert_eq!((c.active, c.inactive), (2, 1));
}

#[test]
fn match_of_a_repeated_hash_adds_one_owner_per_occurrence() {
    let m = manager(2);
    register_inactive(&m, &[1]);
    let hits = m.match_blocks(&[h(1), h(1)]);
    assert_eq!(hits.len(), 2);
    assert_eq!(hits[0].block_id(), hits[1].block_id());
    let mut hits = hits;
    hits.pop();
    assert_eq!(m.counts().active, 1);
    hits.pop();
    assert_eq!(m.counts().inactive, 1);
}

#[test]
fn scan_finds_any_subset_in_input_order() {
    let m = manager(8);
    register_inactive(&m, &[1, 3, 5]);
    let hits = m.scan_matches(&[h(5), h(2), h(1), h(9), h(3)], false);
    assert_eq!(hashes_of(&hits), vec![5, 1, 3]);
    assert_eq!(m.counts().active, 3);
}

#[test]
fn match_and_scan_feed_frequency_tracking_only_when_asked() {
    let m = BlockManager::<Device>::builder()
        .block_count(4)
        .block_size(BS)
        .frequency_tracking(FrequencyTracking::Small)
        .build()
        .unwrap();
    register_inactive(&m, &[1]);
    assert_eq!(m.frequency(h(1)), Some(1)); // registration
    drop(m.match_blocks(&[h(1)]));
    assert_eq!(m.frequency(h(1)), Some(2));
    drop(m.scan_matches(&[h(1)], false));
    assert_eq!(m.frequency(h(1)), Some(2));
    drop(m.scan_matches(&[h(1)], true));
    assert_eq!(m.frequency(h(1)), Some(3));
    m.touch_blocks(&[h(1)]);
    assert_eq!(m.frequency(h(1)), Some(4));
    assert_eq!(m.frequency(h(2)), Some(0));
}

// ---------------------------------------------------------------- eviction

#[test]
fn eviction_happens_only_when_the_reset_pool_is_empty() {
    let m = manager(4);
    register_inactive(&m, &[1, 2]);
    let (a, evicted) = m.allocate_blocks_with_evictions(2).unwrap();
    assert!(evicted.is_empty());
    assert_eq!(m.counts().inactive, 2);
    let (b, evicted) = m.allocate_blocks_with_evictions(1).unwrap();
    assert_eq!(evicted, vec![h(1)]);
    drop((a, b));
}

#[test]
fn eviction_is_least_recently_released_first() {
    let m = manager(4);
    let blocks = register(&m, &[1, 2, 3, 4]);
    // Release in the order 3, 1, 4, 2.
    let mut blocks: Vec<Option<ImmutableBlock<Device>>> = blocks.into_iter().map(Some).collect();
    for i in [2, 0, 3, 1] {
        blocks[i] = None;
    }
    let (_held, evicted) = m.allocate_blocks_with_evictions(4).unwrap();
    assert_eq!(evicted, vec![h(3), h(1), h(4), h(2)]);
}

#[test]
fn a_match_refreshes_recency() {
    let m = manager(2);
    register_inactive(&m, &[1, 2]);
    drop(m.match_blocks(&[h(1)]));
    let (_b, evicted) = m.allocate_blocks_with_evictions(1).unwrap();
    assert_eq!(evicted, vec![h(2)]);
}

#[test]
fn touching_refreshes_recency_without_taking_ownership() {
    let m = manager(3);
    register_inactive(&m, &[1, 2, 3]);
    assert_eq!(m.touch_blocks(&[h(1), h(9)]), 1);
    assert_eq!(m.counts().inactive, 3);
    let (_b, evicted) = m.allocate_blocks_with_evictions(3).unwrap();
    assert_eq!(evicted, vec![h(2), h(3), h(1)]);
}

#[test]
fn held_blocks_are_never_evicted() {
    let m = manager(3);
    let held = register(&m, &[1, 2]);
    register_inactive(&m, &[3]);
    let (x, evicted) = m.allocate_blocks_with_evictions(1).unwrap();
    assert_eq!(evicted, vec![h(3)]);
    assert!(matches!(
        m.allocate_blocks(1),
        Err(AllocationError::Exhausted { available: 0, .. })
    ));
    assert_eq!(hashes_of(&held), vec![1, 2]);
    assert_eq!(m.match_blocks(&[h(1), h(2)]).len(), 2);
    drop(x);
}

// ---------------------------------------------------------------- reset and batches

#[test]
fn reset_inactive_pool_forgets_every_unheld_block() {
    let m = manager(4);
    register_inactive(&m, &[1, 2, 3]);
    assert_eq!(m.reset_inactive_pool(), Ok(3));
    assert!(m.match_blocks(&[h(1)]).is_empty());
    assert_eq!(m.counts().reset, 4);
    assert_eq!(m.reset_inactive_pool(), Ok(0));
}

#[test]
fn reset_inactive_pool_reports_blocks_still_held() {
    let m = manager(4);
    register_inactive(&m, &[1]);
    let held = register(&m, &[2]);
    let mutable = m.allocate_blocks(1).unwrap();
    let err = m.reset_inactive_pool().unwrap_err();
    assert_eq!(
        err,
        ResetError::BlocksInUse {
            moved: 1,
            in_use: 2,
            total: 4
        }
    );
    assert!(err.to_string().contains("still held"));
    // Held blocks are untouched.
    assert_eq!(m.match_blocks(&[h(2)]).len(), 1);
    drop((held, mutable));
    assert_eq!(m.reset_inactive_pool(), Ok(1));
}

#[test]
fn release_all_handles_every_kind_and_foreign_blocks() {
    let m = manager(4);
    let other = manager(4);
    let mut mixed = register(&m, &[1, 2]);
    mixed.push(register(&other, &[3]).pop().unwrap());
    mixed.push(register(&m, &[4]).pop().unwrap());
    ImmutableBlock::release_all(mixed);
    assert_eq!(m.counts().inactive, 3);
    assert_eq!(other.counts().inactive, 1);

    let mut mutable = m.allocate_blocks(1).unwrap();
    mutable.extend(other.allocate_blocks(2).unwrap());
    MutableBlock::release_all(mutable);
    assert_eq!(m.available_blocks(), 4);
    assert_eq!(other.available_blocks(), 4);

    MutableBlock::<Device>::release_all(Vec::new());
    m.check_invariants().unwrap();
    other.check_invariants().unwrap();
}

#[test]
fn a_full_request_cycle_conserves_blocks() {
    let m = manager(32);
    let tokens: Vec<u32> = (0..(10 * BS as u32)).collect();
    let seq = TokenBlockSequence::from_tokens(&tokens, BS, &Salt::none()).unwrap();
    let hashes: Vec<SequenceHash> = seq.sequence_hashes().collect();
    for round in 0..3 {
        let cached = m.match_blocks(&hashes);
        assert_eq!(cached.len(), if round == 0 { 0 } else { 10 });
        let fresh = m.allocate_blocks(hashes.len() - cached.len()).unwrap();
        let staged: Vec<_> = fresh
            .into_iter()
            .zip(&seq.blocks()[cached.len()..])
            .map(|(b, tb)| b.stage_token_block(tb).unwrap())
            .collect();
        let registered = m.register_blocks(staged).unwrap();
        ImmutableBlock::release_all(cached.into_iter().chain(registered));
        let c = m.check_invariants().unwrap();
        assert_eq!((c.inactive, c.in_flight()), (10, 0));
    }
}

#[test]
fn release_all_accepts_iterators_that_own_unyielded_handles() {
    // `take` owns handles it never yields; they are dropped with the iterator. The batch
    // release must not hold the store lock then (it would deadlock).
    let m = manager(8);
    let blocks = register(&m, &[1, 2, 3, 4]);
    ImmutableBlock::release_all(blocks.into_iter().take(2));
    assert_eq!(m.counts().inactive, 4);
    let mutable = m.allocate_blocks(4).unwrap();
    MutableBlock::release_all(mutable.into_iter().filter(|b| b.block_id().get() % 2 == 0));
    assert_eq!(m.counts().mutable, 0);
    m.check_invariants().unwrap();
}

#[test]
fn release_all_of_more_than_one_chunk_and_mixed_managers() {
    let a = manager(600);
    let b = manager(600);
    let mut mixed = a.allocate_blocks(300).unwrap();
    mixed.extend(b.allocate_blocks(10).unwrap());
    mixed.extend(a.allocate_blocks(290).unwrap());
    MutableBlock::release_all(mixed);
    assert_eq!(a.counts().reset, 600);
    assert_eq!(b.counts().reset, 600);
}
