//! The transfer and tiered tests against pinned and device memory. Run on a GPU machine:
//! `../shared/gpu/bundle`, then `bash .gpu/run-all.sh` (runs ignored tests).

mod common;

use std::sync::Arc;

use kvbm_logical::{BlockId, BlockManager, Device, Host, ImmutableBlock, SequenceHash};
use kvbm_physical::{
    CopyOptions, CudaDevice, Layout, LayoutKind, MemoryKind, OffloadMode, Strategy, Tier,
    TieredManager, TransferEngine,
};

fn gpu() -> CudaDevice {
    CudaDevice::open(0).expect("this test needs a CUDA GPU")
}

fn layout(
    kind: LayoutKind,
    memory: MemoryKind,
    cuda: &CudaDevice,
    c: kvbm_physical::LayoutConfig,
) -> Arc<Layout> {
    Layout::allocate(kind, c, memory, Some(cuda))
        .unwrap()
        .into_shared()
}

const MEMORIES: [MemoryKind; 3] = [
    MemoryKind::System,
    MemoryKind::Pinned,
    MemoryKind::Device { ordinal: 0 },
];

#[test]
#[ignore = "needs a CUDA GPU"]
fn device_blocks_round_trip() {
    let cuda = gpu();
    for c in common::shapes() {
        for kind in LayoutKind::ALL {
            let l = layout(kind, MemoryKind::Device { ordinal: 0 }, &cuda, c);
            let images = common::fill(&l, 11);
            for (b, image) in images.iter().enumerate() {
                assert_eq!(&common::read(&l, b), image);
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn every_memory_pair_layout_pair_and_strategy() {
    let cuda = gpu();
    assert!(
        cuda.has_kernels(),
        "the copy kernels must compile (NVRTC) and load"
    );
    let engine = TransferEngine::with_cuda(cuda.clone());
    let pairs: Vec<(BlockId, BlockId)> = [(0, 8), (3, 1), (4, 2), (5, 3), (6, 4), (8, 0), (2, 7)]
        .iter()
        .map(|&(a, b)| (BlockId::new(a), BlockId::new(b)))
        .collect();
    let mut checked = 0;
    for c in common::shapes() {
        for src_mem in MEMORIES {
            for dst_mem in MEMORIES {
                if src_mem.is_host()
                    && dst_mem.is_host()
                    && (src_mem, dst_mem) != (MemoryKind::Pinned, MemoryKind::Pinned)
                {
                    continue; // plain host copies are covered by the CPU tests
                }
                for src_kind in LayoutKind::ALL {
                    for dst_kind in LayoutKind::ALL {
                        for strategy in [Strategy::AsyncCopies, Strategy::BatchedDriver] {
                            if strategy == Strategy::BatchedDriver
                                && (!cuda.has_batched_copy()
                                    || src_mem == MemoryKind::System
                                    || dst_mem == MemoryKind::System)
                            {
                                continue;
                            }
                            let src = layout(src_kind, src_mem, &cuda, c);
                            let dst = layout(dst_kind, dst_mem, &cuda, c);
                            let src_images = common::fill(&src, checked as u64 * 31 + 5);
                            let mut expected = common::fill(&dst, checked as u64 * 31 + 6); // poison
                            let report = engine
                                .copy_blocks(&src, &dst, &pairs, &CopyOptions::strategy(strategy))
                                .unwrap()
                                .wait()
                                .unwrap();
                            assert_eq!(report.strategy, strategy);
                            for &(s, d) in &pairs {
                                expected[d.index()] = src_images[s.index()].clone();
                            }
                            for (b, image) in expected.iter().enumerate() {
                                assert_eq!(
                                    &common::read(&dst, b),
                                    image,
                                    "{src_mem}->{dst_mem} {src_kind:?}->{dst_kind:?} {strategy:?} {c:?} block {b}"
                                );
                            }
                            checked += 1;
                        }
                    }
                }
            }
        }
    }
    eprintln!("{checked} GPU transfer combinations checked byte for byte");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn layer_range_and_unwaited_handles() {
    let cuda = gpu();
    let engine = TransferEngine::with_cuda(cuda.clone());
    let c = common::shapes()[4];
    let src = layout(
        LayoutKind::LayerSeparate,
        MemoryKind::Device { ordinal: 0 },
        &cuda,
        c,
    );
    let dst = layout(LayoutKind::FullyContiguous, MemoryKind::Pinned, &cuda, c);
    let src_images = common::fill(&src, 1);
    let mut expected = common::fill(&dst, 2);
    let pairs = [(BlockId::new(1), BlockId::new(2))];
    // Dropped without waiting: the drop waits, so the bytes are there afterwards.
    drop(
        engine
            .copy_blocks(&src, &dst, &pairs, &CopyOptions::layers(2..5))
            .unwrap(),
    );
    let per_layer = c.outer_dim * c.page_size * c.inner_dim * c.dtype_bytes;
    expected[2][2 * per_layer..5 * per_layer]
        .copy_from_slice(&src_images[1][2 * per_layer..5 * per_layer]);
    assert_eq!(common::read(&dst, 2), expected[2]);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn tiered_device_over_pinned() {
    let cuda = gpu();
    for mode in [OffloadMode::WriteThrough, OffloadMode::WriteBack] {
        let c = |n| kvbm_physical::LayoutConfig {
            num_blocks: n,
            ..common::shapes()[3]
        };
        let page = c(1).page_size;
        let g1 = Tier::new(
            BlockManager::<Device>::builder()
                .block_count(4)
                .block_size(page)
                .build()
                .unwrap(),
            layout(
                LayoutKind::LayerSeparate,
                MemoryKind::Device { ordinal: 0 },
                &cuda,
                c(4),
            ),
        )
        .unwrap();
        let g2 = Tier::new(
            BlockManager::<Host>::builder()
                .block_count(8)
                .block_size(page)
                .build()
                .unwrap(),
            Layout::pinned(LayoutKind::FullyContiguous, c(8), &cuda)
                .unwrap()
                .with_checksums()
                .unwrap()
                .into_shared(),
        )
        .unwrap();
        let t = TieredManager::new(g1, g2, TransferEngine::with_cuda(cuda.clone()), mode).unwrap();
        let hashes: Vec<SequenceHash> = (1..=4).map(SequenceHash::new).collect();
        ImmutableBlock::release_all(common::compute_and_register(&t, &hashes, 0).blocks);
        drop(common::flush_g1(&t));
        let m = t.match_blocks(&hashes);
        assert!(m.error.is_none(), "{mode:?}: {:?}", m.error);
        assert_eq!(m.onboarded, 4, "{mode:?}");
        common::assert_kv(&t, &m.blocks);
        drop(m);
        common::assert_conserved(&t);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn the_engine_picks_the_kernel_for_many_small_regions() {
    let cuda = gpu();
    let engine = TransferEngine::with_cuda(cuda.clone());
    let dev = MemoryKind::Device { ordinal: 0 };
    assert_eq!(
        engine.pick_strategy(dev, MemoryKind::Pinned, 4096, 4096 * 8192),
        Strategy::Kernel
    );
    assert_ne!(
        engine.pick_strategy(dev, MemoryKind::Pinned, 4, 4 << 21),
        Strategy::Kernel
    );
    assert_ne!(
        engine.pick_strategy(dev, MemoryKind::System, 4096, 4096 * 8192),
        Strategy::Kernel
    );
    // End to end: 64 layer-separate blocks of 8 layers offloaded into a contiguous pinned pool.
    let c = kvbm_physical::LayoutConfig {
        num_blocks: 64,
        num_layers: 8,
        outer_dim: 2,
        page_size: 16,
        inner_dim: 128,
        dtype_bytes: 2,
    };
    let src = layout(LayoutKind::LayerSeparate, dev, &cuda, c);
    let dst = layout(LayoutKind::FullyContiguous, MemoryKind::Pinned, &cuda, c);
    let images = common::fill(&src, 3);
    common::fill(&dst, 4);
    let pairs: Vec<(BlockId, BlockId)> = (0..64)
        .map(|i| (BlockId::new(i), BlockId::new(63 - i)))
        .collect();
    let report = engine
        .copy_blocks(&src, &dst, &pairs, &CopyOptions::default())
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(report.strategy, Strategy::Kernel);
    for (i, image) in images.iter().enumerate() {
        assert_eq!(&common::read(&dst, 63 - i), image);
    }
}
