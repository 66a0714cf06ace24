//! The transfer tests against pinned and device memory (the tier stack's are in
//! `stack_gpu.rs`). Run on a GPU machine: `../shared/gpu/bundle`, then `bash .gpu/run-all.sh`
//! (runs ignored tests).

#![cfg(feature = "cuda")]

mod common;

use std::sync::Arc;

use kvbm_logical::BlockId;
use kvbm_physical::{
    CopyOptions, CudaDevice, FaultPlan, Layout, LayoutKind, MemoryKind, Strategy, TransferEngine,
    TransferError,
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
                        for strategy in [
                            Strategy::AsyncCopies,
                            Strategy::BatchedDriver,
                            Strategy::Permute,
                        ] {
                            let pageable =
                                src_mem == MemoryKind::System || dst_mem == MemoryKind::System;
                            if (strategy == Strategy::BatchedDriver
                                && (!cuda.has_batched_copy() || pageable))
                                || (strategy == Strategy::Permute && pageable)
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
    // End to end: 64 layer-separate blocks of 8 layers offloaded into a contiguous pinned pool:
    // many small regions, so the permutation kernel (which needs no region list at all).
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
    assert_eq!(report.strategy, Strategy::Permute);
    for (i, image) in images.iter().enumerate() {
        assert_eq!(&common::read(&dst, 63 - i), image);
    }
}

/// A layout of `num_blocks` blocks of 8 MiB (32 layers × K,V × 128 KiB regions): large
/// enough that a copy takes a while, so ordering mistakes show.
fn big(kind: LayoutKind, memory: MemoryKind, cuda: &CudaDevice, num_blocks: usize) -> Arc<Layout> {
    let c = kvbm_physical::LayoutConfig {
        num_blocks,
        num_layers: 32,
        outer_dim: 2,
        page_size: 16,
        inner_dim: 32 * 128,
        dtype_bytes: 2,
    };
    let layout = layout(kind, memory, cuda, c);
    assert_eq!(layout.block_bytes(), 8 << 20);
    layout
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn a_block_written_to_the_device_is_what_the_next_transfer_reads() {
    // Issue 12 item 5: `write_block` from pageable memory must not unlock before the bytes
    // have landed, or a transfer on the (non-blocking) copy stream reads stale ones.
    let cuda = gpu();
    let engine = TransferEngine::with_cuda(cuda.clone());
    let dev = big(
        LayoutKind::FullyContiguous,
        MemoryKind::Device { ordinal: 0 },
        &cuda,
        2,
    );
    let host = big(LayoutKind::FullyContiguous, MemoryKind::Pinned, &cuda, 2);
    for round in 0..16u64 {
        let image = common::pattern(round * 7 + 1, dev.block_bytes());
        dev.write_block(BlockId::new(1), &image).unwrap();
        engine
            .copy_blocks(
                &dev,
                &host,
                &[(BlockId::new(1), BlockId::new(0))],
                &CopyOptions::strategy(Strategy::AsyncCopies),
            )
            .unwrap()
            .wait()
            .unwrap();
        assert!(
            common::read(&host, 0) == image,
            "round {round}: the transfer read stale bytes"
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn a_failed_event_record_waits_for_the_enqueued_copies() {
    // Issue 12 item 6. Batch 0: the completion event fails to record; the engine must drain
    // the stream (proving the copies landed) before it releases anything.
    // Batch 1: the enqueue fails at run 2 and the event fails too: the first two pairs
    // landed, the rest are reported, and nothing runs any more when the call returns.
    let cuda = gpu();
    let plan = Arc::new(
        FaultPlan::new()
            .fail_event_record(0)
            .fail_enqueue(1, 2)
            .fail_event_record(1),
    );
    let engine = TransferEngine::with_cuda(cuda.clone()).with_faults(plan);
    let src = big(
        LayoutKind::FullyContiguous,
        MemoryKind::Device { ordinal: 0 },
        &cuda,
        8,
    );
    let dst = big(LayoutKind::FullyContiguous, MemoryKind::Pinned, &cuda, 8);
    let images = common::fill(&src, 21);
    common::fill(&dst, 22);
    // Every other block: no two pairs coalesce, one run per pair.
    let pairs: Vec<(BlockId, BlockId)> = [(0, 6), (2, 4), (4, 2), (6, 0)]
        .iter()
        .map(|&(a, b)| (BlockId::new(a), BlockId::new(b)))
        .collect();
    let handle = engine
        .copy_blocks(
            &src,
            &dst,
            &pairs,
            &CopyOptions::strategy(Strategy::AsyncCopies),
        )
        .expect("the drained stream proved every copy landed");
    assert!(handle.is_complete());
    // Read at once, before waiting: the bytes are there already.
    for &(s, d) in &pairs {
        assert!(
            common::read(&dst, d.index()) == images[s.index()],
            "pair ({s:?}, {d:?})"
        );
    }
    handle.wait().unwrap();

    let poison = common::fill(&dst, 23);
    let err = engine
        .copy_blocks(
            &src,
            &dst,
            &pairs,
            &CopyOptions::strategy(Strategy::AsyncCopies),
        )
        .unwrap_err();
    match err {
        TransferError::CopyFailed { failed, .. } => assert_eq!(failed, vec![2, 3]),
        other => panic!("{other:?}"),
    }
    for &(s, d) in &pairs[..2] {
        assert!(common::read(&dst, d.index()) == images[s.index()]);
    }
    for &(_, d) in &pairs[2..] {
        assert!(
            common::read(&dst, d.index()) == poison[d.index()],
            "never enqueued"
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn landed_pairs_of_a_failed_gpu_batch_get_valid_checksums() {
    // Issue 12 item 7: the enqueue fails at run 2; pairs 0 and 1 landed and must carry the
    // checksum of their new bytes, or the next load reports a false mismatch.
    let cuda = gpu();
    let engine = TransferEngine::with_cuda(cuda.clone())
        .with_faults(Arc::new(FaultPlan::new().fail_enqueue(0, 2)));
    let c = kvbm_physical::LayoutConfig {
        num_blocks: 8,
        ..common::shapes()[3]
    };
    let src = layout(
        LayoutKind::FullyContiguous,
        MemoryKind::Device { ordinal: 0 },
        &cuda,
        c,
    );
    let dst = Layout::pinned(LayoutKind::FullyContiguous, c, &cuda)
        .unwrap()
        .with_checksums()
        .unwrap()
        .into_shared();
    let images = common::fill(&src, 31);
    common::fill(&dst, 32); // stale checksums everywhere
    let pairs: Vec<(BlockId, BlockId)> = [(0, 6), (2, 4), (4, 2), (6, 0)]
        .iter()
        .map(|&(a, b)| (BlockId::new(a), BlockId::new(b)))
        .collect();
    let err = engine
        .copy_blocks_blocking(
            &src,
            &dst,
            &pairs,
            &CopyOptions::strategy(Strategy::AsyncCopies),
        )
        .unwrap_err();
    assert!(
        matches!(err, TransferError::CopyFailed { ref failed, .. } if failed == &[2, 3]),
        "{err:?}"
    );
    for &(s, d) in &pairs[..2] {
        assert_eq!(
            dst.checksum(d),
            Some(xxhash_rust::xxh3::xxh3_64(&images[s.index()]))
        );
    }
    for &(_, d) in &pairs[2..] {
        assert_eq!(dst.checksum(d), None);
    }
    // The landed blocks load back to the device without a (false) checksum mismatch.
    let back = layout(
        LayoutKind::LayerSeparate,
        MemoryKind::Device { ordinal: 0 },
        &cuda,
        c,
    );
    engine
        .copy_blocks_blocking(
            &dst,
            &back,
            &[
                (BlockId::new(6), BlockId::new(1)),
                (BlockId::new(4), BlockId::new(2)),
            ],
            &CopyOptions::default(),
        )
        .unwrap();
    assert_eq!(common::read(&back, 1), images[0]);
    assert_eq!(common::read(&back, 2), images[2]);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn an_engine_refuses_device_memory_of_another_gpu() {
    // Issue 12 item 8 (the CPU unit test covers the check itself; this needs two GPUs).
    let count = cudarc::driver::CudaContext::device_count().unwrap_or(0);
    if count < 2 {
        eprintln!("skipped: {count} GPU(s); two are needed to place memory on another device");
        return;
    }
    let (gpu0, gpu1) = (CudaDevice::open(0).unwrap(), CudaDevice::open(1).unwrap());
    let c = common::shapes()[1];
    let on1 = layout(
        LayoutKind::FullyContiguous,
        MemoryKind::Device { ordinal: 1 },
        &gpu1,
        c,
    );
    let on0 = layout(
        LayoutKind::FullyContiguous,
        MemoryKind::Device { ordinal: 0 },
        &gpu0,
        c,
    );
    let before = common::fill(&on0, 5);
    common::fill(&on1, 6);
    for strategy in [
        Strategy::AsyncCopies,
        Strategy::BatchedDriver,
        Strategy::Kernel,
    ] {
        let err = TransferEngine::with_cuda(gpu0.clone())
            .copy_blocks_blocking(
                &on1,
                &on0,
                &[(BlockId::new(0), BlockId::new(1))],
                &CopyOptions::strategy(strategy),
            )
            .unwrap_err();
        assert_eq!(
            err,
            TransferError::DeviceMismatch {
                side: kvbm_physical::Side::Source,
                layout: 1,
                engine: 0
            }
        );
    }
    assert_eq!(common::read(&on0, 1), before[1]);
    // A layout over device 1's slabs with a handle to device 0 is refused at construction.
    let slab =
        kvbm_physical::Storage::allocate(MemoryKind::Device { ordinal: 1 }, 1 << 20, Some(&gpu1))
            .unwrap();
    let one = kvbm_physical::LayoutConfig {
        num_blocks: 1,
        num_layers: 1,
        outer_dim: 1,
        page_size: 1,
        inner_dim: 1024,
        dtype_bytes: 1,
    };
    assert!(matches!(
        Layout::from_slabs(LayoutKind::FullyContiguous, one, vec![slab], Some(gpu0)),
        Err(kvbm_physical::LayoutError::Slabs(_))
    ));
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn a_deferred_cudarc_error_neither_fails_a_bind_nor_leaks_a_free() {
    // Issue 12 item 9: cudarc returns an error its destructors stored from the next safe
    // call. kvbm binds with the raw driver call and clears (logs) such an error.
    use cudarc::driver::{DriverError, sys::CUresult};
    let cuda = gpu();
    let plant = |cuda: &CudaDevice| {
        cuda.context()
            .record_err::<()>(Err(DriverError(CUresult::CUDA_ERROR_INVALID_VALUE)))
    };
    plant(&cuda);
    let c = common::shapes()[3];
    let dev = Layout::device(LayoutKind::LayerSeparate, c, &cuda)
        .unwrap()
        .into_shared();
    plant(&cuda);
    let images = common::fill(&dev, 41);
    let host = layout(LayoutKind::FullyContiguous, MemoryKind::Pinned, &cuda, c);
    plant(&cuda);
    TransferEngine::with_cuda(cuda.clone())
        .copy_blocks_blocking(
            &dev,
            &host,
            &[(BlockId::new(3), BlockId::new(0))],
            &CopyOptions::default(),
        )
        .unwrap();
    assert_eq!(common::read(&host, 0), images[3]);

    // A free on a thread where no context is current, with an error stored: before, the
    // bind failed, the free ran unbound and the memory leaked.
    const BYTES: usize = 1 << 30;
    let storage = kvbm_physical::DeviceStorage::new(&cuda, BYTES).unwrap();
    let (allocated, _) = cuda.mem_info().unwrap();
    std::thread::spawn({
        let cuda = cuda.clone();
        move || {
            plant(&cuda);
            drop(storage);
        }
    })
    .join()
    .unwrap();
    let (freed, _) = cuda.mem_info().unwrap();
    assert!(
        freed >= allocated + BYTES / 2,
        "1 GiB dropped on another thread was not freed: {allocated} then {freed} bytes free"
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn transfers_reuse_their_completion_events() {
    // Issue 12 item 10: a transfer takes its event from a pool instead of creating and
    // destroying one.
    let cuda = gpu();
    let engine = TransferEngine::with_cuda(cuda.clone());
    let c = common::shapes()[1];
    let src = layout(
        LayoutKind::LayerSeparate,
        MemoryKind::Device { ordinal: 0 },
        &cuda,
        c,
    );
    let dst = layout(LayoutKind::FullyContiguous, MemoryKind::Pinned, &cuda, c);
    let images = common::fill(&src, 51);
    for i in 0..500u32 {
        let (s, d) = (i % 9, (i * 5 + 1) % 9);
        engine
            .copy_blocks_blocking(
                &src,
                &dst,
                &[(BlockId::new(s), BlockId::new(d))],
                &CopyOptions::default(),
            )
            .unwrap();
        assert_eq!(common::read(&dst, d as usize), images[s as usize]);
    }
    assert!(
        cuda.events_created() <= 2,
        "{} events for 500 transfers",
        cuda.events_created()
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn the_kernels_are_loaded_before_any_block_is_locked() {
    // Issue 12 item 10: choosing the kernel compiles it (first use); that must happen before
    // the batch takes its locks. A batch refused as busy has therefore loaded them already.
    let holder = gpu();
    let fresh = gpu(); // a handle of its own, kernels not loaded yet
    assert!(!fresh.kernels_loaded());
    let c = common::shapes()[1];
    let src = layout(
        LayoutKind::FullyContiguous,
        MemoryKind::Device { ordinal: 0 },
        &holder,
        c,
    );
    let dst = layout(LayoutKind::FullyContiguous, MemoryKind::Pinned, &holder, c);
    let pair = [(BlockId::new(0), BlockId::new(0))];
    let held = TransferEngine::with_cuda(holder)
        .copy_blocks(
            &src,
            &dst,
            &pair,
            &CopyOptions::strategy(Strategy::AsyncCopies),
        )
        .unwrap(); // holds the blocks until waited for
    let err = TransferEngine::with_cuda(fresh.clone())
        .copy_blocks(&src, &dst, &pair, &CopyOptions::strategy(Strategy::Kernel))
        .unwrap_err();
    assert!(matches!(err, TransferError::BlockBusy { .. }), "{err:?}");
    assert!(
        fresh.kernels_loaded(),
        "the kernels were to be loaded before locking"
    );
    held.wait().unwrap();
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn the_batched_copy_probe_matches_the_documented_driver_versions() {
    // Issue 12 item 10: docs say CUDA 12.8+; the probe must find the call on those drivers.
    let cuda = gpu();
    let mut version = 0;
    // SAFETY: the driver is loaded (the device opened); the out-pointer is a live local.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) }
        .result()
        .unwrap();
    assert_eq!(
        cuda.has_batched_copy(),
        version >= 12080,
        "driver {version}"
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn nvml_and_cuda_agree_on_which_gpu_is_ordinal_0() {
    // Issue 12 item 10: NVML indices are not CUDA ordinals; the PCI bus id ties them.
    let cuda = gpu();
    let gpus = kvbm_physical::discover_gpus().unwrap();
    let g = gpus
        .iter()
        .find(|g| g.cuda_ordinal == Some(0))
        .expect("NVML sees CUDA's device 0");
    let normalise = |id: &str| {
        let (domain, rest) = id.split_once(':').unwrap();
        (
            u32::from_str_radix(domain, 16).unwrap(),
            rest.to_ascii_lowercase(),
        )
    };
    assert_eq!(
        normalise(&g.pci_bus_id),
        normalise(&cuda.pci_bus_id().unwrap())
    );
    let sized = kvbm_physical::nvml::device_pool_config(common::shapes()[3], 0, 0.01).unwrap();
    assert!(sized.num_blocks > 0);
}
