//! Unit tests of the transfer engine's pure checks (the integration tests drive the rest).

use super::*;

const DEV0: MemoryKind = MemoryKind::Device { ordinal: 0 };
const DEV1: MemoryKind = MemoryKind::Device { ordinal: 1 };

#[test]
fn device_memory_of_another_gpu_is_refused_with_both_ordinals() {
    use MemoryKind::{Pinned, System};
    for strategy in [
        Strategy::AsyncCopies,
        Strategy::BatchedDriver,
        Strategy::Kernel,
    ] {
        // An engine on device 0 against device 1's memory, on either side.
        assert_eq!(
            check_reach(strategy, Some(0), DEV1, Pinned),
            Err(TransferError::DeviceMismatch {
                side: Side::Source,
                layout: 1,
                engine: 0
            })
        );
        assert_eq!(
            check_reach(strategy, Some(1), DEV1, DEV0),
            Err(TransferError::DeviceMismatch {
                side: Side::Destination,
                layout: 0,
                engine: 1
            })
        );
        assert_eq!(
            check_reach(strategy, Some(2), DEV0, DEV1),
            Err(TransferError::DeviceMismatch {
                side: Side::Source,
                layout: 0,
                engine: 2
            })
        );
        // Its own device's memory, and host memory, are reachable.
        assert_eq!(check_reach(strategy, Some(1), DEV1, Pinned), Ok(()));
        assert_eq!(check_reach(strategy, Some(0), Pinned, DEV0), Ok(()));
        assert_eq!(check_reach(strategy, Some(0), DEV0, DEV0), Ok(()));
        // No CUDA device at all: unsupported, whatever the memory.
        assert!(matches!(
            check_reach(strategy, None, DEV0, System),
            Err(TransferError::Unsupported { .. })
        ));
    }
    // Kernels still cannot reach pageable memory, on the right device too.
    assert!(matches!(
        check_reach(Strategy::Kernel, Some(0), DEV0, System),
        Err(TransferError::Unsupported {
            strategy: Strategy::Kernel,
            ..
        })
    ));
}

#[test]
fn memcpy_reaches_host_memory_only() {
    use MemoryKind::{Pinned, System};
    for engine in [None, Some(0)] {
        assert_eq!(
            check_reach(Strategy::Memcpy, engine, System, Pinned),
            Ok(())
        );
        assert!(matches!(
            check_reach(Strategy::Memcpy, engine, DEV0, Pinned),
            Err(TransferError::Unsupported {
                strategy: Strategy::Memcpy,
                ..
            })
        ));
    }
}

fn ids(p: &[(u32, u32)]) -> Vec<(BlockId, BlockId)> {
    p.iter()
        .map(|&(a, b)| (BlockId::new(a), BlockId::new(b)))
        .collect()
}

#[test]
fn an_enqueue_failure_fails_the_pairs_from_the_failed_run_on() {
    use crate::{LayoutConfig, LayoutKind};
    let c = LayoutConfig {
        num_blocks: 8,
        num_layers: 2,
        outer_dim: 2,
        page_size: 2,
        inner_dim: 4,
        dtype_bytes: 1,
    };
    let fc = || Layout::system(LayoutKind::FullyContiguous, c).unwrap();
    let (a, b) = (fc(), fc());
    // Pair-major (both fully contiguous): one run per pair unless blocks are adjacent.
    let pairs = ids(&[(0, 6), (2, 4), (4, 2), (6, 0)]);
    let runs = coalesce(&a, &b, &pairs, 0..2);
    assert_eq!(runs.len(), 4);
    assert_eq!(pairs_from_run(&runs, 0, &[], 4), vec![0, 1, 2, 3]);
    assert_eq!(pairs_from_run(&runs, 2, &[], 4), vec![2, 3]);
    // Pairs 0 and 1 (blocks 0,1 → 2,3) coalesce into run 0: it fails both.
    let adjacent = ids(&[(0, 2), (1, 3), (5, 7)]);
    let runs = coalesce(&a, &b, &adjacent, 0..2);
    assert_eq!(runs.len(), 2);
    assert_eq!(pairs_from_run(&runs, 1, &[], 3), vec![2]);
    assert_eq!(pairs_from_run(&runs, 0, &[], 3), vec![0, 1, 2]);
    // With pair 1 injected to fail, runs cover pairs 0, 2, 3 of the batch.
    let kept = [0, 2, 3];
    let copied: Vec<_> = kept.iter().map(|&i| pairs[i]).collect();
    let runs = coalesce(&a, &b, &copied, 0..2);
    assert_eq!(pairs_from_run(&runs, 1, &kept, 4), vec![2, 3]);
    // Every pair injected: no run, every pair failed.
    assert_eq!(pairs_from_run(&[], 0, &[], 4), vec![0, 1, 2, 3]);
    // Layer-major (a layer-separate side): every pair's last layer comes last, so any
    // failed run fails the whole batch.
    let ls = Layout::system(LayoutKind::LayerSeparate, c).unwrap();
    let runs = coalesce(&ls, &b, &pairs, 0..2);
    let last = runs.len() - 1;
    assert_eq!(pairs_from_run(&runs, last, &[], 4), vec![0, 1, 2, 3]);
}

#[test]
fn the_permutation_kernels_arguments_copy_what_memcpy_copies() {
    // What the GPU would be handed (maps of the copied layers, ids of the pairs not failed
    // by injection), run through the kernel's CPU reference, writes exactly the bytes the
    // host path writes for the same batch.
    use crate::{EngineFormat, LayerTensor, LayoutConfig, LayoutKind, SystemStorage};
    use kvbm_kernels::reference;
    let c = LayoutConfig {
        num_blocks: 6,
        num_layers: 4,
        outer_dim: 2,
        page_size: 2,
        inner_dim: 6,
        dtype_bytes: 2,
    };
    // An engine's outer-first tensors, padded, all layers in one allocation.
    let shape = EngineFormat::OuterFirst.dense_shape(&c, 2).unwrap();
    let page = c.page_size * c.inner_dim;
    let strides = vec![6 * (page + 4), page + 4, 6, 3, 1];
    let layer_elems = 2 * 6 * (page + 4) + 10;
    let arena = SystemStorage::new(c.num_layers * layer_elems * 2 + 64).unwrap();
    let bytes = |s: &SystemStorage| {
        // SAFETY: live storage, read while no transfer runs.
        unsafe { std::slice::from_raw_parts(s.addr() as *const u8, s.len()) }.to_vec()
    };
    // SAFETY: live storage, written before any layout exists.
    unsafe { std::slice::from_raw_parts_mut(arena.addr() as *mut u8, arena.len()) }
        .iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = (i * 7 + 3) as u8);
    let tensors: Vec<LayerTensor> = (0..c.num_layers)
        .map(|l| LayerTensor {
            addr: arena.addr() + (l * layer_elems * 2) as u64,
            shape: shape.clone(),
            strides: strides.clone(),
        })
        .collect();
    // SAFETY: the tensors lie inside `arena`, which outlives the layout.
    let src = Arc::new(
        unsafe {
            Layout::from_engine(
                EngineFormat::OuterFirst,
                c,
                MemoryKind::System,
                &tensors,
                None,
            )
        }
        .unwrap(),
    );
    let dst = Arc::new(Layout::system(LayoutKind::FullyContiguous, c).unwrap());
    let pairs = ids(&[(5, 0), (1, 3), (2, 2)]);
    let kept = [0usize, 2];
    let layers = 1..3;
    let Work::Regions {
        src: src_maps,
        dst: dst_maps,
        pairs: copied,
        shape,
    } = region_work(&src, &dst, &pairs, Some(&kept), layers.clone())
    else {
        panic!("a permutation")
    };
    assert_eq!(copied, vec![(5, 0), (2, 2)]);
    let slab = dst.slabs()[0].addr();
    let rel = |maps: &[LayerMap], base: u64| -> Vec<LayerMap> {
        maps.iter()
            .map(|m| LayerMap {
                base: m.base - base,
                ..*m
            })
            .collect()
    };
    let mut expect = vec![0u8; dst.slabs()[0].len()];
    reference::permute_regions(
        shape,
        &bytes(&arena),
        &rel(src_maps, arena.addr()),
        &mut expect,
        &rel(dst_maps, slab),
        &copied,
    )
    .unwrap();
    let kept_pairs: Vec<_> = kept.iter().map(|&i| pairs[i]).collect();
    TransferEngine::host()
        .copy_blocks_blocking(&src, &dst, &kept_pairs, &CopyOptions::layers(layers))
        .unwrap();
    let got = {
        let mut v = vec![0u8; dst.slabs()[0].len()];
        for b in 0..c.num_blocks {
            let at = b * dst.block_bytes();
            dst.read_block(BlockId::new(b as u32), &mut v[at..at + dst.block_bytes()])
                .unwrap();
        }
        v
    };
    assert_eq!(got, expect);
    assert!(got.iter().any(|&b| b != 0), "something was copied");
}

#[test]
fn a_run_never_spans_two_layers_tensors_adjacent_in_memory() {
    // Each layer may be its own allocation (an engine's per-layer tensor, a slab); two that
    // happen to lie back to back are still two, and one copy across both is not valid. With
    // one block, adjacent tensors even look like one block image: still three.
    for num_blocks in [6, 1] {
        layers_adjacent_in_memory(num_blocks);
    }
}

fn layers_adjacent_in_memory(num_blocks: usize) {
    use crate::{EngineFormat, LayerTensor, LayoutConfig, SystemStorage};
    let c = LayoutConfig {
        num_blocks,
        num_layers: 3,
        outer_dim: 2,
        page_size: 2,
        inner_dim: 4,
        dtype_bytes: 2,
    };
    let shape = EngineFormat::BlockFirst.dense_shape(&c, 2).unwrap();
    let layer_bytes = c.num_blocks * c.outer_dim * c.page_size * c.inner_dim * c.dtype_bytes;
    let engine = |arena: &SystemStorage| {
        let strides: Vec<usize> = {
            // Dense row-major strides of `shape`, in elements.
            let mut st = vec![1usize; shape.len()];
            for i in (0..shape.len() - 1).rev() {
                st[i] = st[i + 1] * shape[i + 1];
            }
            st
        };
        let tensors: Vec<LayerTensor> = (0..c.num_layers)
            .map(|l| LayerTensor {
                addr: arena.addr() + (l * layer_bytes) as u64,
                shape: shape.clone(),
                strides: strides.clone(),
            })
            .collect();
        // SAFETY: the tensors lie inside `arena`, which outlives the layout (this test).
        unsafe {
            Layout::from_engine(
                EngineFormat::BlockFirst,
                c,
                MemoryKind::System,
                &tensors,
                None,
            )
        }
        .unwrap()
    };
    let (a, b) = (
        SystemStorage::new(c.num_layers * layer_bytes).unwrap(),
        SystemStorage::new(c.num_layers * layer_bytes).unwrap(),
    );
    let (src, dst) = (engine(&a), engine(&b));
    // Every block, in order: within a layer one run; never one across layers.
    let pairs: Vec<(BlockId, BlockId)> = (0..num_blocks as u32)
        .map(|i| (BlockId::new(i), BlockId::new(i)))
        .collect();
    let runs = coalesce(&src, &dst, &pairs, 0..c.num_layers);
    assert_eq!(runs.len(), c.num_layers, "{runs:?}");
    for (l, run) in runs.iter().enumerate() {
        assert_eq!(run.src, a.addr() + (l * layer_bytes) as u64);
        assert_eq!(run.len, layer_bytes);
    }
    // One block's image: one run per layer too, and no single view across the tensors.
    let image: Vec<_> = src.image_runs(num_blocks - 1).collect();
    assert_eq!(image.len(), c.num_layers, "{image:?}");
    assert!(!src.has_block_views());
}
