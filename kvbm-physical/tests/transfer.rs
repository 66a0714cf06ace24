//! Transfers between every pair of layout kinds on host memory: every byte checked.

mod common;

use std::sync::Arc;

use kvbm_logical::BlockId;
use kvbm_physical::{
    CopyOptions, Layout, LayoutConfig, LayoutKind, Side, Strategy, TransferEngine, TransferError,
};
use proptest::prelude::*;
use proptest::strategy::Strategy as _;

fn ids(pairs: &[(u32, u32)]) -> Vec<(BlockId, BlockId)> {
    pairs
        .iter()
        .map(|&(a, b)| (BlockId::new(a), BlockId::new(b)))
        .collect()
}

fn layouts(src: LayoutKind, dst: LayoutKind, c: LayoutConfig) -> (Arc<Layout>, Arc<Layout>) {
    (
        Layout::system(src, c).unwrap().into_shared(),
        Layout::system(dst, c).unwrap().into_shared(),
    )
}

/// Copies `pairs` and checks every byte of every destination block: the copied ones hold
/// their source's image (for the copied layers), the others are untouched.
fn check_transfer(
    src_kind: LayoutKind,
    dst_kind: LayoutKind,
    c: LayoutConfig,
    pairs: &[(u32, u32)],
    layers: Option<std::ops::Range<usize>>,
) {
    let (src, dst) = layouts(src_kind, dst_kind, c);
    let src_images = common::fill(&src, 0x51);
    let mut expected = common::fill(&dst, 0xd5);
    let options = CopyOptions {
        layers: layers.clone(),
        ..CopyOptions::default()
    };
    let report = TransferEngine::host()
        .copy_blocks_blocking(&src, &dst, &ids(pairs), &options)
        .unwrap();
    let layers = layers.unwrap_or(0..c.num_layers);
    let per_layer = c.outer_dim * dst.region_bytes();
    assert_eq!(report.strategy, Strategy::Memcpy);
    assert_eq!(report.bytes, pairs.len() * layers.len() * per_layer);
    for &(s, d) in pairs {
        let range = layers.start * per_layer..layers.end * per_layer;
        expected[d as usize][range.clone()].copy_from_slice(&src_images[s as usize][range]);
    }
    for (b, image) in expected.iter().enumerate() {
        assert_eq!(
            &common::read(&dst, b),
            image,
            "{src_kind:?}->{dst_kind:?} {c:?} block {b}"
        );
    }
    // The sources are unchanged.
    for (b, image) in src_images.iter().enumerate() {
        assert_eq!(&common::read(&src, b), image);
    }
}

#[test]
fn every_layout_pair_and_shape() {
    let pairs = [(0, 8), (3, 1), (4, 2), (5, 3), (8, 0), (2, 7)];
    for c in common::shapes() {
        for src in LayoutKind::ALL {
            for dst in LayoutKind::ALL {
                check_transfer(src, dst, c, &pairs, None);
                check_transfer(src, dst, c, &pairs[..1], None);
                if c.num_layers > 1 {
                    check_transfer(src, dst, c, &pairs, Some(1..c.num_layers));
                    check_transfer(src, dst, c, &pairs, Some(0..1));
                }
            }
        }
    }
}

#[test]
fn within_one_layout() {
    let c = common::shapes()[3];
    for kind in LayoutKind::ALL {
        let layout = Layout::system(kind, c).unwrap().into_shared();
        let images = common::fill(&layout, 9);
        TransferEngine::host()
            .copy_blocks_blocking(
                &layout,
                &layout,
                &ids(&[(0, 5), (1, 6)]),
                &CopyOptions::default(),
            )
            .unwrap();
        assert_eq!(common::read(&layout, 5), images[0]);
        assert_eq!(common::read(&layout, 6), images[1]);
    }
}

#[test]
fn adjacent_blocks_coalesce() {
    let c = common::shapes()[3]; // 4 layers
    let pairs = ids(&[(2, 4), (3, 5), (4, 6)]);
    let engine = TransferEngine::host();
    let copies = |s, d| {
        let (src, dst) = layouts(s, d, c);
        engine
            .copy_blocks_blocking(&src, &dst, &pairs, &CopyOptions::default())
            .unwrap()
            .copies
    };
    use LayoutKind::*;
    assert_eq!(copies(FullyContiguous, FullyContiguous), 1);
    assert_eq!(copies(LayerSeparate, LayerSeparate), 4); // one run per layer slab
    assert_eq!(copies(FullyContiguous, LayerSeparate), 3 * 4); // K and V adjacent on both sides
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn random_batches(
        shape in 0usize..5,
        src_kind in prop::sample::select(LayoutKind::ALL.to_vec()),
        dst_kind in prop::sample::select(LayoutKind::ALL.to_vec()),
        dsts in Just((0u32..9).collect::<Vec<_>>()).prop_shuffle(),
        srcs in prop::collection::vec(0u32..9, 9),
        n in 1usize..10,
    ) {
        let pairs: Vec<(u32, u32)> = srcs.into_iter().zip(dsts).take(n).collect();
        check_transfer(src_kind, dst_kind, common::shapes()[shape], &pairs, None);
    }
}

#[test]
fn bad_requests_are_refused_and_copy_nothing() {
    let c = common::shapes()[1];
    let (src, dst) = layouts(LayoutKind::LayerSeparate, LayoutKind::FullyContiguous, c);
    let before = common::fill(&dst, 1);
    common::fill(&src, 2);
    let engine = TransferEngine::host();
    let run = |pairs: &[(u32, u32)], options: CopyOptions| {
        engine
            .copy_blocks_blocking(&src, &dst, &ids(pairs), &options)
            .unwrap_err()
    };
    assert_eq!(run(&[], CopyOptions::default()), TransferError::EmptyBatch);
    assert!(matches!(
        run(&[(0, 1), (9, 2)], CopyOptions::default()),
        TransferError::BlockOutOfRange {
            index: 1,
            side: Side::Source,
            num_blocks: 9,
            ..
        }
    ));
    assert!(matches!(
        run(&[(0, 100)], CopyOptions::default()),
        TransferError::BlockOutOfRange {
            index: 0,
            side: Side::Destination,
            ..
        }
    ));
    assert_eq!(
        run(&[(0, 3), (1, 4), (2, 3)], CopyOptions::default()),
        TransferError::DuplicateDestination {
            block: BlockId::new(3),
            first: 0,
            second: 2
        }
    );
    assert!(matches!(
        run(&[(0, 1)], CopyOptions::layers(1..1)),
        TransferError::LayerRange { .. }
    ));
    assert!(matches!(
        run(&[(0, 1)], CopyOptions::layers(0..3)),
        TransferError::LayerRange { .. }
    ));
    assert!(matches!(
        run(&[(0, 1)], CopyOptions::strategy(Strategy::AsyncCopies)),
        TransferError::Unsupported {
            strategy: Strategy::AsyncCopies,
            ..
        }
    ));
    // A failed request left every destination byte as it was, and released every lock.
    for (b, image) in before.iter().enumerate() {
        assert_eq!(&common::read(&dst, b), image);
    }
    engine
        .copy_blocks_blocking(&src, &dst, &ids(&[(0, 3), (1, 4)]), &CopyOptions::default())
        .unwrap();

    let same = Layout::system(LayoutKind::LayerSeparate, c)
        .unwrap()
        .into_shared();
    assert_eq!(
        engine.copy_blocks_blocking(
            &same,
            &same,
            &ids(&[(1, 2), (2, 3)]),
            &CopyOptions::default()
        ),
        Err(TransferError::SourceIsDestination(BlockId::new(2)))
    );
}

#[test]
fn mismatched_layouts_are_refused() {
    let c = common::shapes()[1];
    let engine = TransferEngine::host();
    for (what, other) in [
        (
            "num_layers",
            LayoutConfig {
                num_layers: c.num_layers + 1,
                ..c
            },
        ),
        ("outer_dim", LayoutConfig { outer_dim: 1, ..c }),
        (
            "region bytes",
            LayoutConfig {
                inner_dim: c.inner_dim * 2,
                ..c
            },
        ),
    ] {
        let src = Layout::system(LayoutKind::FullyContiguous, c)
            .unwrap()
            .into_shared();
        let dst = Layout::system(LayoutKind::FullyContiguous, other)
            .unwrap()
            .into_shared();
        let err = engine
            .copy_blocks_blocking(&src, &dst, &ids(&[(0, 0)]), &CopyOptions::default())
            .unwrap_err();
        assert!(
            matches!(err, TransferError::LayoutMismatch { what: w, .. } if w == what),
            "{err:?}"
        );
    }
    // Different block counts are fine: only the per-block shape must agree.
    let src = Layout::system(LayoutKind::FullyContiguous, c)
        .unwrap()
        .into_shared();
    let dst = Layout::system(
        LayoutKind::FullyContiguous,
        LayoutConfig { num_blocks: 2, ..c },
    )
    .unwrap()
    .into_shared();
    engine
        .copy_blocks_blocking(&src, &dst, &ids(&[(8, 1)]), &CopyOptions::default())
        .unwrap();
}

#[test]
fn checksums_catch_corruption_between_tiers() {
    let c = common::shapes()[3];
    let g1 = Layout::system(LayoutKind::LayerSeparate, c)
        .unwrap()
        .into_shared();
    let g2 = Layout::system(LayoutKind::FullyContiguous, c)
        .unwrap()
        .with_checksums()
        .unwrap()
        .into_shared();
    let back = Layout::system(LayoutKind::LayerSeparate, c)
        .unwrap()
        .into_shared();
    let images = common::fill(&g1, 4);
    let engine = TransferEngine::host();
    let opts = CopyOptions::default();
    engine
        .copy_blocks_blocking(&g1, &g2, &ids(&[(0, 0), (1, 1), (2, 2)]), &opts)
        .unwrap();
    for b in 0..3 {
        assert_eq!(
            g2.checksum(BlockId::new(b)),
            Some(xxhash_rust::xxh3::xxh3_64(&images[b as usize]))
        );
    }
    // Flip one byte of block 1 behind the layout's back.
    let r = g2.region(BlockId::new(1), 2, 1).unwrap();
    // SAFETY: the address lies in g2's live system slab and no transfer runs now.
    unsafe { *(r.addr as *mut u8).add(5) ^= 0x40 };
    let before = common::read(&back, 1);
    let err = engine
        .copy_blocks_blocking(&g2, &back, &ids(&[(0, 0), (1, 1), (2, 2)]), &opts)
        .unwrap_err();
    assert!(
        matches!(err, TransferError::ChecksumMismatch { block, .. } if block == BlockId::new(1))
    );
    assert_eq!(common::read(&back, 1), before, "nothing copied");
    // The intact blocks still load.
    engine
        .copy_blocks_blocking(&g2, &back, &ids(&[(0, 0), (2, 2)]), &opts)
        .unwrap();
    assert_eq!(common::read(&back, 2), images[2]);
}

#[test]
fn concurrent_transfers_never_tear_a_block() {
    // Threads copy random blocks among one layout's 16 blocks; each block's image must
    // always be one whole source image, never a mix. Busy refusals are expected and fine.
    let c = common::shapes()[3];
    let layout = Layout::system(LayoutKind::LayerSeparate, c)
        .unwrap()
        .into_shared();
    let originals = common::fill(&layout, 77);
    let engine = TransferEngine::host();
    let busy = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (layout, engine, busy) = (&layout, &engine, &busy);
            s.spawn(move || {
                let mut x = t * 0x9e37 + 1;
                for _ in 0..2000 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let a = (x % 9) as u32;
                    let b = ((x >> 8) % 9) as u32;
                    if a == b {
                        continue;
                    }
                    match engine.copy_blocks_blocking(
                        layout,
                        layout,
                        &ids(&[(a, b)]),
                        &CopyOptions::default(),
                    ) {
                        Ok(_) => {}
                        Err(TransferError::BlockBusy { .. }) => {
                            busy.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
            });
        }
    });
    for b in 0..9 {
        let image = common::read(&layout, b);
        assert!(originals.contains(&image), "block {b} is torn");
    }
    eprintln!("busy refusals: {}", busy.into_inner());
}

#[test]
fn host_engines_pick_memcpy_and_refuse_gpu_strategies() {
    use kvbm_physical::MemoryKind;
    let engine = TransferEngine::host();
    for src in [MemoryKind::System, MemoryKind::Pinned] {
        for dst in [MemoryKind::System, MemoryKind::Pinned] {
            assert_eq!(
                engine.pick_strategy(src, dst, 1000, 1 << 20),
                Strategy::Memcpy
            );
        }
    }
    let dev = MemoryKind::Device { ordinal: 0 };
    // Without a CUDA device nothing better than per-run copies can be promised (and the
    // transfer itself is then refused as Unsupported).
    assert_eq!(
        engine.pick_strategy(dev, MemoryKind::Pinned, 1000, 1 << 20),
        Strategy::AsyncCopies
    );
    let c = common::shapes()[1];
    let (src, dst) = layouts(LayoutKind::LayerSeparate, LayoutKind::FullyContiguous, c);
    for strategy in [
        Strategy::AsyncCopies,
        Strategy::BatchedDriver,
        Strategy::Kernel,
    ] {
        let err = engine
            .copy_blocks_blocking(
                &src,
                &dst,
                &ids(&[(0, 0)]),
                &CopyOptions::strategy(strategy),
            )
            .unwrap_err();
        assert!(matches!(err, TransferError::Unsupported { strategy: s, .. } if s == strategy));
    }
}

/// Flips one byte of `block` in a host layout behind its back (as memory corruption would).
fn corrupt(layout: &Layout, block: u32) {
    let r = layout.region(BlockId::new(block), 0, 0).unwrap();
    // SAFETY: the address lies in the layout's live system slab and no transfer runs now.
    unsafe { *(r.addr as *mut u8).add(3) ^= 0x10 };
}

#[test]
fn a_refused_transfer_changes_no_destination_byte_or_checksum() {
    let c = common::shapes()[3];
    let src = Layout::system(LayoutKind::LayerSeparate, c)
        .unwrap()
        .into_shared();
    let dst = Layout::system(LayoutKind::FullyContiguous, c)
        .unwrap()
        .with_checksums()
        .unwrap()
        .into_shared();
    let back = Layout::system(LayoutKind::FullyContiguous, c)
        .unwrap()
        .into_shared();
    common::fill(&src, 3);
    // Destination block 1 was written, then corrupted; block 2 was never written.
    dst.write_block(BlockId::new(1), &common::pattern(9, dst.block_bytes()))
        .unwrap();
    let recorded = dst.checksum(BlockId::new(1));
    corrupt(&dst, 1);
    let bytes_before: Vec<Vec<u8>> = (0..c.num_blocks).map(|b| common::read(&dst, b)).collect();

    let engine = TransferEngine::host();
    let pairs = ids(&[(0, 1), (3, 2)]);
    for strategy in [
        Strategy::AsyncCopies,
        Strategy::BatchedDriver,
        Strategy::Kernel,
    ] {
        let err = engine
            .copy_blocks_blocking(&src, &dst, &pairs, &CopyOptions::strategy(strategy))
            .unwrap_err();
        assert!(matches!(err, TransferError::Unsupported { .. }), "{err:?}");
    }
    // A source whose checksum no longer matches refuses too (after the locks were taken).
    let checked_src = Layout::system(LayoutKind::LayerSeparate, c)
        .unwrap()
        .with_checksums()
        .unwrap()
        .into_shared();
    common::fill(&checked_src, 4);
    corrupt(&checked_src, 3);
    assert!(matches!(
        engine.copy_blocks_blocking(&checked_src, &dst, &pairs, &CopyOptions::default()),
        Err(TransferError::ChecksumMismatch { block, .. }) if block == BlockId::new(3)
    ));

    assert_eq!(
        dst.checksum(BlockId::new(1)),
        recorded,
        "the corrupt block was blessed"
    );
    assert_eq!(
        dst.checksum(BlockId::new(2)),
        None,
        "a never-written block got a checksum"
    );
    for (b, before) in bytes_before.iter().enumerate() {
        assert_eq!(&common::read(&dst, b), before, "block {b} changed");
    }
    // So the corruption is still caught when the block is loaded.
    let err = engine
        .copy_blocks_blocking(&dst, &back, &ids(&[(1, 0)]), &CopyOptions::default())
        .unwrap_err();
    assert!(
        matches!(err, TransferError::ChecksumMismatch { block, .. } if block == BlockId::new(1)),
        "{err:?}"
    );
}
