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
