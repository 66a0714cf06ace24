//! The tier stack over device G1 and pinned G2 (the tiered manager's GPU test, ported). Run
//! on a GPU machine: `../shared/gpu/bundle`, then `bash .gpu/run-all.sh` (runs ignored
//! tests). Event ordering against an engine stream is phase 2.

mod common;

use kvbm_logical::{BlockManager, Device, Host, ImmutableBlock, SequenceHash};
use kvbm_physical::stack::{TierId, TierStack, Watermarks, WriteMode};
use kvbm_physical::{CudaDevice, Layout, LayoutKind, MemoryKind, TransferEngine};

#[test]
#[ignore = "needs a CUDA GPU"]
fn stack_device_over_pinned() {
    let cuda = CudaDevice::open(0).expect("this test needs a CUDA GPU");
    for mode in [
        WriteMode::WriteThrough,
        WriteMode::WriteBack(Watermarks::new(4, 4)),
    ] {
        let c = |n| kvbm_physical::LayoutConfig {
            num_blocks: n,
            ..common::shapes()[3]
        };
        let page = c(1).page_size;
        let t = TierStack::builder()
            .g1(
                BlockManager::<Device>::builder()
                    .block_count(4)
                    .block_size(page)
                    .build()
                    .unwrap(),
                Layout::allocate(
                    LayoutKind::LayerSeparate,
                    c(4),
                    MemoryKind::Device { ordinal: 0 },
                    Some(&cuda),
                )
                .unwrap()
                .into_shared(),
            )
            .g2(
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
            .engine(TransferEngine::with_cuda(cuda.clone()))
            .write_mode(mode)
            .build()
            .unwrap();
        // Fresh random bytes per hash (never zeros), written to device memory.
        let hashes: Vec<SequenceHash> = (1..=4).map(|i| SequenceHash::new(0x5eed + i)).collect();
        ImmutableBlock::release_all(common::stack_compute(&t, &hashes, 0));
        t.flush();
        // Evict: write-through by a direct allocation, write-back through the reclaimer.
        match mode {
            WriteMode::WriteThrough => common::stack_flush_g1(&t),
            _ => drop(t.allocate(1).unwrap()),
        }
        t.flush();
        assert!(hashes.iter().all(|&h| t.g2().contains(h)), "{mode:?}");
        let m = t.onboard(t.lookup(&hashes), usize::MAX).unwrap().wait();
        assert!(m.end.is_none() && m.lost.is_empty(), "{mode:?}: {m:?}");
        assert_eq!(m.blocks.len(), 4, "{mode:?}");
        common::assert_stack_kv(&t, &m.blocks);
        assert_eq!(t.stats().tier(TierId::G2).unwrap().onboarded, 4);
        drop(m);
        common::assert_stack_idle(&t);
    }
}
