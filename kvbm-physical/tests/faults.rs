//! Injected faults: failed copies and corrupted checksums never lose a block's accounting
//! and never serve wrong bytes, in the transfer engine and in the tiered manager.

mod common;

use std::sync::Arc;

use kvbm_logical::{
    BlockId, BlockManager, Device, Host, ImmutableBlock, KvEventKind, SequenceHash,
};
use kvbm_physical::{
    CopyOptions, FaultPlan, Layout, LayoutConfig, LayoutKind, OffloadMode, Tier, TieredError,
    TieredManager, TransferEngine, TransferError,
};

const PAGE: usize = 4;

fn config(num_blocks: usize) -> LayoutConfig {
    LayoutConfig {
        num_blocks,
        num_layers: 2,
        outer_dim: 2,
        page_size: PAGE,
        inner_dim: 8,
        dtype_bytes: 2,
    }
}

fn pairs(p: &[(u32, u32)]) -> Vec<(BlockId, BlockId)> {
    p.iter()
        .map(|&(a, b)| (BlockId::new(a), BlockId::new(b)))
        .collect()
}

#[test]
fn failed_pairs_are_reported_and_the_rest_land() {
    let src = Layout::system(LayoutKind::LayerSeparate, config(6))
        .unwrap()
        .into_shared();
    let dst = Layout::system(LayoutKind::FullyContiguous, config(6))
        .unwrap()
        .with_checksums()
        .unwrap()
        .into_shared();
    let images = common::fill(&src, 5);
    common::fill(&dst, 6);
    let plan = Arc::new(FaultPlan::new().fail_pairs(0, [1, 3]));
    let engine = TransferEngine::host().with_faults(plan.clone());
    let batch = pairs(&[(0, 5), (1, 4), (2, 3), (3, 2)]);
    let err = engine
        .copy_blocks_blocking(&src, &dst, &batch, &CopyOptions::default())
        .unwrap_err();
    assert_eq!(
        err,
        TransferError::CopyFailed {
            failed: vec![1, 3],
            error: "injected fault".into()
        }
    );
    // Landed pairs hold their source; failed ones hold neither their source nor a checksum.
    assert_eq!(common::read(&dst, 5), images[0]);
    assert_eq!(common::read(&dst, 3), images[2]);
    for (s, d) in [(1, 4), (3, 2)] {
        assert_ne!(common::read(&dst, d), images[s]);
        assert_eq!(dst.checksum(BlockId::new(d as u32)), None);
    }
    assert!(dst.checksum(BlockId::new(5)).is_some());
    // Locks were released: the same blocks copy fine in the next batch.
    engine
        .copy_blocks_blocking(&src, &dst, &batch, &CopyOptions::default())
        .unwrap();
    assert_eq!(common::read(&dst, 4), images[1]);
    assert_eq!(plan.batches_seen(), 2);
}

#[test]
fn a_corrupted_checksum_is_caught_at_the_next_load() {
    let a = Layout::system(LayoutKind::FullyContiguous, config(3))
        .unwrap()
        .into_shared();
    let b = Layout::system(LayoutKind::FullyContiguous, config(3))
        .unwrap()
        .with_checksums()
        .unwrap()
        .into_shared();
    common::fill(&a, 1);
    let engine =
        TransferEngine::host().with_faults(Arc::new(FaultPlan::new().corrupt_checksum_record(1)));
    engine
        .copy_blocks_blocking(
            &a,
            &b,
            &pairs(&[(0, 0), (1, 1), (2, 2)]),
            &CopyOptions::default(),
        )
        .unwrap();
    let err = engine
        .copy_blocks_blocking(&b, &a, &pairs(&[(0, 0), (1, 1)]), &CopyOptions::default())
        .unwrap_err();
    assert!(
        matches!(err, TransferError::ChecksumMismatch { block, .. } if block == BlockId::new(1)),
        "{err:?}"
    );
}

fn tiers(mode: OffloadMode, plan: Arc<FaultPlan>) -> TieredManager {
    let g1 = Tier::new(
        BlockManager::<Device>::builder()
            .block_count(4)
            .block_size(PAGE)
            .build()
            .unwrap(),
        Layout::system(LayoutKind::LayerSeparate, config(4))
            .unwrap()
            .into_shared(),
    )
    .unwrap();
    let g2 = Tier::new(
        BlockManager::<Host>::builder()
            .block_count(8)
            .block_size(PAGE)
            .build()
            .unwrap(),
        Layout::system(LayoutKind::FullyContiguous, config(8))
            .unwrap()
            .with_checksums()
            .unwrap()
            .into_shared(),
    )
    .unwrap();
    TieredManager::new(g1, g2, TransferEngine::host().with_faults(plan), mode).unwrap()
}

fn hashes() -> Vec<SequenceHash> {
    (1..=4).map(|i| SequenceHash::new(100 + i)).collect()
}

use common::{assert_conserved, compute_and_register, flush_g1, kv};

/// Allocates, writes and registers the four blocks; returns the registration.
fn compute(t: &TieredManager) -> kvbm_physical::Registration {
    compute_and_register(t, &hashes(), 0)
}

#[test]
fn a_failed_write_through_copy_leaves_g1_whole_and_g2_without_the_block() {
    let t = tiers(
        OffloadMode::WriteThrough,
        Arc::new(FaultPlan::new().fail_pairs(0, [2])),
    );
    let events = t.g2().manager().subscribe(64);
    let hs = hashes();
    let reg = compute(&t);
    assert_eq!(reg.offloaded, 3);
    match &reg.error {
        Some(TieredError::Copy {
            tier: "host",
            lost,
            source: TransferError::CopyFailed { failed, .. },
        }) => {
            assert_eq!(lost, &vec![hs[2]]);
            assert_eq!(failed, &vec![2]);
        }
        other => panic!("{other:?}"),
    }
    for b in &reg.blocks {
        assert_eq!(
            common::read(t.g1().layout(), b.block_id().index()),
            kv(&t, b.sequence_hash())
        );
    }
    assert!(!t.g2().manager().contains(hs[2]));
    assert!([0, 1, 3].iter().all(|&i| t.g2().manager().contains(hs[i])));
    // G2 announced exactly the three blocks it stored.
    let mut stored: Vec<SequenceHash> = Vec::new();
    for batch in events.drain() {
        for e in batch.iter() {
            if let KvEventKind::Stored { block_hashes, .. } = &e.kind {
                stored.extend(block_hashes.iter().copied());
            }
        }
    }
    assert_eq!(stored, vec![hs[0], hs[1], hs[3]]);
    assert_eq!(t.stats().lost, 1);
    drop(reg);
    assert_conserved(&t);
}

#[test]
fn a_failed_onboard_returns_the_prefix_that_landed() {
    // Batch 0: the write-through offload; batch 1: the onboard, whose third pair fails.
    let t = tiers(
        OffloadMode::WriteThrough,
        Arc::new(FaultPlan::new().fail_pairs(1, [2])),
    );
    let hs = hashes();
    ImmutableBlock::release_all(compute(&t).blocks);
    drop(flush_g1(&t));
    let m = t.match_blocks(&hs);
    assert_eq!((m.g1_hits, m.onboarded, m.blocks.len()), (0, 2, 2));
    for b in &m.blocks {
        assert_eq!(
            common::read(t.g1().layout(), b.block_id().index()),
            kv(&t, b.sequence_hash())
        );
    }
    match &m.error {
        Some(TieredError::Copy {
            tier: "device",
            lost,
            ..
        }) => assert_eq!(lost, &hs[2..].to_vec()),
        other => panic!("{other:?}"),
    }
    // Nothing half-copied was registered; the slots went back; G2 still has everything.
    assert!(!t.g1().manager().contains(hs[2]) && !t.g1().manager().contains(hs[3]));
    assert!(hs.iter().all(|&h| t.g2().manager().contains(h)));
    let c = t.g1().manager().counts();
    assert_eq!((c.active, c.mutable), (2, 0));
    drop(m);
    assert_conserved(&t);
    // With the fault gone, a retry onboards the rest.
    let again = t.match_blocks(&hs);
    assert!(again.error.is_none());
    assert_eq!(again.blocks.len(), 4);
}

#[test]
fn a_failed_write_back_copy_is_reported_by_the_evicting_allocation() {
    // Write-back: the first copy is the eviction's (batch 0).
    let t = tiers(
        OffloadMode::WriteBack,
        Arc::new(FaultPlan::new().fail_pairs(0, [0])),
    );
    let hs = hashes();
    ImmutableBlock::release_all(compute(&t).blocks);
    let a = flush_g1(&t);
    assert_eq!(a.offloaded, 3);
    let lost = match &a.error {
        Some(TieredError::Copy {
            tier: "host", lost, ..
        }) => lost.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(lost.len(), 1);
    assert!(!t.g2().manager().contains(lost[0]));
    assert_eq!(
        hs.iter().filter(|&&h| t.g2().manager().contains(h)).count(),
        3
    );
    drop(a);
    assert_conserved(&t);
}

#[test]
fn a_corrupt_checksum_in_g2_drops_the_block_from_g2() {
    // Records 0..3 are the four G2 blocks of the write-through; the third is recorded wrong.
    let t = tiers(
        OffloadMode::WriteThrough,
        Arc::new(FaultPlan::new().corrupt_checksum_record(2)),
    );
    let hs = hashes();
    ImmutableBlock::release_all(compute(&t).blocks);
    drop(flush_g1(&t));
    let m = t.match_blocks(&hs);
    assert_eq!(m.blocks.len(), 2);
    assert!(matches!(
        &m.error,
        Some(TieredError::Copy {
            source: TransferError::ChecksumMismatch { .. },
            ..
        })
    ));
    assert!(
        !t.g2().manager().contains(hs[2]),
        "the corrupt copy is gone from G2"
    );
    drop(m);
    assert_conserved(&t);
}

#[test]
fn a_failed_slab_allocation_is_a_typed_error_and_frees_the_rest() {
    use kvbm_physical::{LayoutError, MemoryKind, StorageError};
    let plan = FaultPlan::new().fail_allocation(2);
    // Four layer slabs: the third fails; the two allocated are dropped with the error.
    let err = Layout::allocate_with_faults(
        LayoutKind::LayerSeparate,
        LayoutConfig {
            num_layers: 4,
            ..config(8)
        },
        MemoryKind::System,
        None,
        Some(&plan),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            LayoutError::Storage(StorageError::AllocationFailed {
                kind: MemoryKind::System,
                ..
            })
        ),
        "{err:?}"
    );
    // The next allocation (number 3 onward) succeeds.
    let layout = Layout::allocate_with_faults(
        LayoutKind::FullyContiguous,
        config(8),
        MemoryKind::System,
        None,
        Some(&plan),
    )
    .unwrap();
    assert_eq!(layout.num_blocks(), 8);
}

#[test]
fn a_refused_transfer_scribbles_nothing_even_with_injected_faults() {
    let src = Layout::system(LayoutKind::LayerSeparate, config(4))
        .unwrap()
        .into_shared();
    let dst = Layout::system(LayoutKind::FullyContiguous, config(4))
        .unwrap()
        .with_checksums()
        .unwrap()
        .into_shared();
    common::fill(&src, 1);
    let images = common::fill(&dst, 2);
    let sums: Vec<Option<u64>> = (0..4).map(|b| dst.checksum(BlockId::new(b))).collect();
    // Every pair of the first batch would fail; the batch is refused before copying.
    let plan = Arc::new(FaultPlan::new().fail_pairs(0, [0, 1]));
    let engine = TransferEngine::host().with_faults(plan.clone());
    let err = engine
        .copy_blocks_blocking(
            &src,
            &dst,
            &pairs(&[(0, 1), (2, 3)]),
            &CopyOptions::strategy(kvbm_physical::Strategy::AsyncCopies),
        )
        .unwrap_err();
    assert!(matches!(err, TransferError::Unsupported { .. }), "{err:?}");
    for (b, image) in images.iter().enumerate() {
        assert_eq!(&common::read(&dst, b), image, "block {b} scribbled");
        assert_eq!(dst.checksum(BlockId::new(b as u32)), sums[b]);
    }
    // The refused batch was not handed to the injector: batch 0 is still to come.
    assert_eq!(plan.batches_seen(), 0);
}

#[test]
fn landed_pairs_of_a_partly_failed_batch_get_their_new_checksums() {
    let src = Layout::system(LayoutKind::LayerSeparate, config(6))
        .unwrap()
        .into_shared();
    let dst = Layout::system(LayoutKind::FullyContiguous, config(6))
        .unwrap()
        .with_checksums()
        .unwrap()
        .into_shared();
    let images = common::fill(&src, 5);
    common::fill(&dst, 6); // old checksums everywhere
    let engine = TransferEngine::host().with_faults(Arc::new(FaultPlan::new().fail_pairs(0, [1])));
    let batch = pairs(&[(0, 5), (1, 4), (2, 3)]);
    assert!(
        engine
            .copy_blocks_blocking(&src, &dst, &batch, &CopyOptions::default())
            .is_err()
    );
    for (s, d) in [(0, 5), (2, 3)] {
        assert_eq!(
            dst.checksum(BlockId::new(d)),
            Some(xxhash_rust::xxh3::xxh3_64(&images[s])),
            "pair ({s}, {d}) landed: its checksum is the new bytes'"
        );
    }
    assert_eq!(dst.checksum(BlockId::new(4)), None);
    // And they load back without a false mismatch.
    let back = Layout::system(LayoutKind::LayerSeparate, config(6))
        .unwrap()
        .into_shared();
    engine
        .copy_blocks_blocking(
            &dst,
            &back,
            &pairs(&[(5, 0), (3, 2)]),
            &CopyOptions::default(),
        )
        .unwrap();
    assert_eq!(common::read(&back, 0), images[0]);
}

/// G1 of 4 and G2 of `g2_blocks` system-memory blocks, G2 with checksums.
fn tiers_with_g2(mode: OffloadMode, g2_blocks: usize, plan: Arc<FaultPlan>) -> TieredManager {
    let g1 = Tier::new(
        BlockManager::<Device>::builder()
            .block_count(4)
            .block_size(PAGE)
            .build()
            .unwrap(),
        Layout::system(LayoutKind::LayerSeparate, config(4))
            .unwrap()
            .into_shared(),
    )
    .unwrap();
    let g2 = Tier::new(
        BlockManager::<Host>::builder()
            .block_count(g2_blocks)
            .block_size(PAGE)
            .build()
            .unwrap(),
        Layout::system(LayoutKind::FullyContiguous, config(g2_blocks))
            .unwrap()
            .with_checksums()
            .unwrap()
            .into_shared(),
    )
    .unwrap();
    TieredManager::new(g1, g2, TransferEngine::host().with_faults(plan), mode).unwrap()
}

#[test]
fn an_offload_that_both_spills_and_fails_lists_every_lost_hash() {
    // The scenario: G2 has room for 2 of the 4 blocks and the copy of pair 0 fails.
    let t = tiers_with_g2(
        OffloadMode::WriteThrough,
        2,
        Arc::new(FaultPlan::new().fail_pairs(0, [0])),
    );
    let hs = hashes();
    let reg = compute(&t);
    assert_eq!(reg.offloaded, 1);
    assert_eq!(t.stats().lost, 3);
    match &reg.error {
        Some(TieredError::Copy {
            tier: "host",
            lost,
            source: TransferError::CopyFailed { failed, .. },
        }) => {
            assert_eq!(failed, &vec![0]);
            assert_eq!(
                lost,
                &vec![hs[0], hs[2], hs[3]],
                "the failed copy and the spill"
            );
            assert_eq!(lost.len() as u64, t.stats().lost);
        }
        other => panic!("{other:?}"),
    }
    assert!(t.g2().manager().contains(hs[1]));
    assert!([0, 2, 3].iter().all(|&i| !t.g2().manager().contains(hs[i])));
    drop(reg);
    assert_conserved(&t);
}

#[test]
fn blocks_lost_while_onboarding_evicts_are_reported_by_the_match() {
    // Write-back. Batch 0: chain A evicted to G2. Batch 1: chain B evicted by A's
    // onboarding, whose first pair fails. Batch 2: A's onboarding copy.
    let t = tiers_with_g2(
        OffloadMode::WriteBack,
        8,
        Arc::new(FaultPlan::new().fail_pairs(1, [0])),
    );
    let a = hashes();
    let b: Vec<SequenceHash> = (1..=4).map(|i| SequenceHash::new(200 + i)).collect();
    ImmutableBlock::release_all(compute_and_register(&t, &a, 0).blocks);
    let flushed = flush_g1(&t);
    assert_eq!((flushed.offloaded, flushed.error.is_none()), (4, true));
    drop(flushed);
    ImmutableBlock::release_all(compute_and_register(&t, &b, 0).blocks);

    let m = t.match_blocks(&a);
    assert!(m.error.is_none(), "{:?}", m.error);
    assert_eq!((m.onboarded, m.offloaded), (4, 3));
    let lost = match &m.offload_error {
        Some(TieredError::Copy {
            tier: "host", lost, ..
        }) => lost.clone(),
        other => panic!("the eviction's loss was dropped: {other:?}"),
    };
    assert_eq!(lost.len(), 1);
    assert!(b.contains(&lost[0]));
    assert!(!t.g1().manager().contains(lost[0]) && !t.g2().manager().contains(lost[0]));
    common::assert_kv(&t, &m.blocks);
    drop(m);
    assert_conserved(&t);
}
