//! Block views under contention: threads taking read views, write views (committed or
//! dropped) and transfers into and out of the same few blocks never see a torn block, and a
//! block's recorded checksum always matches its bytes whenever one is recorded.

use kvbm_logical::BlockId;
use kvbm_physical::{CopyOptions, Layout, LayoutConfig, LayoutError, LayoutKind, TransferEngine};

fn config(num_blocks: usize) -> LayoutConfig {
    LayoutConfig {
        num_blocks,
        num_layers: 2,
        outer_dim: 2,
        page_size: 16,
        inner_dim: 64,
        dtype_bytes: 2,
    }
}

/// xorshift64*: reproducible per thread.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn uniform(bytes: &[u8]) -> bool {
    bytes.iter().all(|&b| b == bytes[0])
}

#[test]
fn views_and_transfers_on_shared_blocks_never_tear_and_keep_checksums_right() {
    const BLOCKS: usize = 3;
    let layout = Layout::system(LayoutKind::FullyContiguous, config(BLOCKS))
        .unwrap()
        .with_checksums()
        .unwrap()
        .into_shared();
    // Another layout, uniform per block, to copy from and into.
    let other = Layout::system(LayoutKind::LayerSeparate, config(BLOCKS))
        .unwrap()
        .into_shared();
    let bb = layout.block_bytes();
    for b in 0..BLOCKS as u32 {
        layout
            .write_block(BlockId::new(b), &vec![b as u8; bb])
            .unwrap();
        other
            .write_block(BlockId::new(b), &vec![0x80 | b as u8; bb])
            .unwrap();
    }
    let engine = TransferEngine::host();
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let (layout, other, engine) = (layout.clone(), other.clone(), engine.clone());
            std::thread::spawn(move || {
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (t + 1));
                let (mut reads, mut writes, mut busy) = (0u64, 0u64, 0u64);
                for _ in 0..3000 {
                    let block = BlockId::new((rng.next() % BLOCKS as u64) as u32);
                    match rng.next() % 5 {
                        0 | 1 => match layout.block_view(block) {
                            Ok(view) => {
                                assert!(uniform(&view), "torn block under a read view");
                                assert!(view.verify(), "a recorded checksum that is wrong");
                                reads += 1;
                            }
                            Err(LayoutError::BlockBusy(_)) => busy += 1,
                            Err(e) => panic!("{e}"),
                        },
                        2 => match layout.block_view_mut(block) {
                            Ok(mut view) => {
                                let v = (rng.next() % 256) as u8;
                                // Written in two halves: a reader seeing one half would tear.
                                let half = view.len() / 2;
                                view[..half].fill(v);
                                view[half..].fill(v);
                                if rng.next().is_multiple_of(2) {
                                    view.commit();
                                } else {
                                    // Forgets the block's checksum. Not asserted here: another
                                    // thread may write the block (and record a checksum) as
                                    // soon as the view is gone, which made this test flaky;
                                    // `block_view_mut`'s doc example checks the forgetting.
                                    drop(view);
                                }
                                writes += 1;
                            }
                            Err(LayoutError::BlockBusy(_)) => busy += 1,
                            Err(e) => panic!("{e}"),
                        },
                        3 => {
                            // Into the block: a transfer is a writer too.
                            let src = BlockId::new((rng.next() % BLOCKS as u64) as u32);
                            match engine
                                .copy_blocks(
                                    &other,
                                    &layout,
                                    &[(src, block)],
                                    &CopyOptions::default(),
                                )
                                .and_then(|h| h.wait())
                            {
                                Ok(_) => writes += 1,
                                Err(kvbm_physical::TransferError::BlockBusy { .. }) => busy += 1,
                                Err(e) => panic!("{e}"),
                            }
                        }
                        _ => {
                            // Out of the block: a reader, verifying the checksum first.
                            let dst = BlockId::new(t as u32 % BLOCKS as u32);
                            match engine
                                .copy_blocks(
                                    &layout,
                                    &other,
                                    &[(block, dst)],
                                    &CopyOptions::default(),
                                )
                                .and_then(|h| h.wait())
                            {
                                Ok(_) => reads += 1,
                                Err(kvbm_physical::TransferError::BlockBusy { .. }) => busy += 1,
                                Err(e) => panic!("{e}"),
                            }
                        }
                    }
                }
                (reads, writes, busy)
            })
        })
        .collect();
    let (mut reads, mut writes) = (0, 0);
    for t in threads {
        let (r, w, _busy) = t.join().unwrap();
        reads += r;
        writes += w;
    }
    assert!(reads > 0 && writes > 0, "{reads} reads, {writes} writes");
    for b in 0..BLOCKS as u32 {
        let view = layout.block_view(BlockId::new(b)).unwrap();
        assert!(uniform(&view));
        assert!(view.verify());
    }
}

#[test]
fn views_are_refused_where_images_are_not_one_range_of_host_memory() {
    for kind in [LayoutKind::LayerSeparate, LayoutKind::OuterFirst] {
        let layout = Layout::system(kind, config(2)).unwrap();
        assert!(!layout.has_block_views());
        assert!(matches!(
            layout.block_view(BlockId::new(0)),
            Err(LayoutError::NoBlockView {
                contiguous: false,
                ..
            })
        ));
        assert!(matches!(
            layout.block_view_mut(BlockId::new(0)),
            Err(LayoutError::NoBlockView { .. })
        ));
    }
    let layout = Layout::system(LayoutKind::FullyContiguous, config(2)).unwrap();
    assert!(matches!(
        layout.block_view(BlockId::new(2)),
        Err(LayoutError::BlockOutOfRange { block: 2, .. })
    ));
    // A refused view changes nothing: the block is free afterwards.
    let w = layout.block_view_mut(BlockId::new(1)).unwrap();
    assert_eq!(
        layout.block_view(BlockId::new(1)).unwrap_err(),
        LayoutError::BlockBusy(1)
    );
    drop(w);
    assert!(layout.block_view_mut(BlockId::new(1)).is_ok());
}
