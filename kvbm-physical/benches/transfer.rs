//! Host ↔ host transfer bandwidth against one `copy_nonoverlapping` of the same bytes,
//! measured in the same run (the ceiling). Shape: 32 layers × K,V × 16 tokens × 8 heads ×
//! 128 dims × 2 bytes = 32 KiB regions, 2 MiB blocks. Destination ids are a scattered
//! permutation, so blocks do not coalesce into one run (the realistic case). `of` is the
//! outer-first layout (vLLM FlashAttention's `[2, num_blocks, ...]` per layer): a block is
//! 64 separate regions there, against 32 runs (K and V adjacent) in layer-separate.
//!
//! `cargo bench -p kvbm-physical --bench transfer`

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kvbm_logical::BlockId;
use kvbm_physical::{CopyOptions, Layout, LayoutConfig, LayoutKind, TransferEngine};

const MAX_BLOCKS: usize = 1024;

fn config() -> LayoutConfig {
    LayoutConfig {
        num_blocks: MAX_BLOCKS,
        num_layers: 32,
        outer_dim: 2,
        page_size: 16,
        inner_dim: 8 * 128,
        dtype_bytes: 2,
    }
}

fn filled(kind: LayoutKind) -> Arc<Layout> {
    let layout = Layout::system(kind, config()).unwrap().into_shared();
    // Touch every page, with non-zero data.
    let image: Vec<u8> = (0..layout.block_bytes())
        .map(|i| (i % 251) as u8 + 1)
        .collect();
    for b in 0..MAX_BLOCKS {
        layout.write_block(BlockId::new(b as u32), &image).unwrap();
    }
    layout
}

fn transfers(c: &mut Criterion) {
    let fc_src = filled(LayoutKind::FullyContiguous);
    let fc_dst = filled(LayoutKind::FullyContiguous);
    let ls_src = filled(LayoutKind::LayerSeparate);
    let ls_dst = filled(LayoutKind::LayerSeparate);
    let of = filled(LayoutKind::OuterFirst); // source of one bench, destination of the other
    let engine = TransferEngine::host();
    let block_bytes = fc_src.block_bytes();

    let mut group = c.benchmark_group("transfer");
    group.sample_size(10);
    for n in [1usize, 64, 1024] {
        let pairs: Vec<(BlockId, BlockId)> = (0..n)
            .map(|i| {
                (
                    BlockId::new(i as u32),
                    BlockId::new(((i * 7919 + 13) % MAX_BLOCKS) as u32),
                )
            })
            .collect();
        let bytes = n * block_bytes;
        group.throughput(Throughput::Bytes(bytes as u64));
        let (src, dst) = (fc_src.slabs()[0].addr(), fc_dst.slabs()[0].addr());
        group.bench_function(BenchmarkId::new("ceiling_one_copy", n), |b| {
            b.iter(|| {
                // SAFETY: both slabs are live, at least `bytes` long and distinct; no transfer
                // runs concurrently.
                unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, bytes) };
                black_box(dst);
            })
        });
        for (name, s, d) in [
            ("fc_to_fc", &fc_src, &fc_dst),
            ("ls_to_ls", &ls_src, &ls_dst),
            ("ls_to_fc", &ls_src, &fc_dst),
            ("fc_to_ls", &fc_src, &ls_dst),
            ("of_to_fc", &of, &fc_dst),
            ("fc_to_of", &fc_src, &of),
        ] {
            group.bench_function(BenchmarkId::new(name, n), |b| {
                b.iter(|| {
                    engine
                        .copy_blocks_blocking(s, d, black_box(&pairs), &CopyOptions::default())
                        .unwrap()
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, transfers);
criterion_main!(benches);
