//! Injected faults in the transfer engine: failed copies and corrupted checksums never lose a
//! block's accounting and never serve wrong bytes. (The tier stack's fault tests are in
//! `stack_faults.rs`.)

mod common;

use std::sync::Arc;

use kvbm_logical::BlockId;
use kvbm_physical::{
    CopyOptions, FaultPlan, Layout, LayoutConfig, LayoutKind, TransferEngine, TransferError,
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

/// A custom injector that answers out of order, twice, and past the batch.
#[derive(Debug)]
struct Sloppy;

impl kvbm_physical::FaultInjector for Sloppy {
    fn failed_pairs(
        &self,
        _: kvbm_physical::MemoryKind,
        _: kvbm_physical::MemoryKind,
        pairs: &[(BlockId, BlockId)],
    ) -> Vec<usize> {
        vec![pairs.len() + 3, 1, 0, 1]
    }
}

#[test]
fn any_injectors_answer_is_taken_in_range_and_once() {
    let src = Layout::system(LayoutKind::FullyContiguous, config(4))
        .unwrap()
        .into_shared();
    let dst = Layout::system(LayoutKind::FullyContiguous, config(4))
        .unwrap()
        .into_shared();
    let images = common::fill(&src, 7);
    let engine = TransferEngine::host().with_faults(Arc::new(Sloppy));
    let err = engine
        .copy_blocks_blocking(
            &src,
            &dst,
            &pairs(&[(0, 0), (1, 1), (2, 2)]),
            &CopyOptions::default(),
        )
        .unwrap_err();
    assert_eq!(
        err,
        TransferError::CopyFailed {
            failed: vec![0, 1],
            error: "injected fault".into()
        }
    );
    assert_eq!(common::read(&dst, 2), images[2]);
}
