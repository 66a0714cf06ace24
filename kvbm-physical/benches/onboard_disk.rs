//! Onboarding from the disk tier (G3) through the tier stack: the time from `onboard` to
//! the completed G1 prefix for 64 blocks of 256 KiB that only G3 holds (G1 and G2 emptied
//! before each onboard, outside the timed part). And the way down (`offload_64x256KiB`): from
//! registering 64 blocks in G1 until they are in G3 (G1 → G2 copies, G2 → G3 writes). What it measures: the G3 reads (`O_DIRECT`
//! where the file system allows), staging in G2 and the G2 → G1 copy, and how well they
//! overlap. Shape: 8 layers × K,V × 16 tokens × 512 elements × 2 bytes = 256 KiB blocks;
//! G1 layer-separate, G2 fully contiguous with checksums (as a server runs them). The tier
//! file lives in a temp dir (`KVBM_BENCH_DIR` to put it elsewhere).
//!
//! `cargo bench -p kvbm-physical --bench onboard_disk`

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kvbm_logical::{BlockManager, Device, Host, ImmutableBlock, SequenceHash};
use kvbm_physical::disk::{Capacity, DiskTier};
use kvbm_physical::stack::{EngineSync, StoreTierConfig, TierStack};
use kvbm_physical::{Layout, LayoutConfig, LayoutKind, StoreTier};

const BLOCKS: usize = 64;
const PAGE_SIZE: usize = 16;

fn shape(num_blocks: usize) -> LayoutConfig {
    LayoutConfig {
        num_blocks,
        num_layers: 8,
        outer_dim: 2,
        page_size: PAGE_SIZE,
        inner_dim: 512,
        dtype_bytes: 2,
    }
}

fn onboard_from_disk(c: &mut Criterion) {
    let dir = match std::env::var_os("KVBM_BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d),
        None => tempfile::tempdir(),
    }
    .unwrap();
    let block_bytes = shape(1).block_bytes().unwrap();
    let tier = Arc::new(
        DiskTier::builder()
            .path(dir.path().join("g3.kvbm"))
            .block_bytes(block_bytes)
            .capacity(Capacity::Blocks(2 * BLOCKS as u32))
            .fingerprint(1)
            .open()
            .unwrap(),
    );
    let m2 = BlockManager::<Host>::builder()
        .block_count(2 * BLOCKS)
        .block_size(PAGE_SIZE)
        .build()
        .unwrap();
    let stack = TierStack::builder()
        .g1(
            BlockManager::<Device>::builder()
                .block_count(BLOCKS)
                .block_size(PAGE_SIZE)
                .build()
                .unwrap(),
            Layout::system(LayoutKind::LayerSeparate, shape(BLOCKS))
                .unwrap()
                .into_shared(),
        )
        .g2(
            m2.clone(),
            Layout::system(LayoutKind::FullyContiguous, shape(2 * BLOCKS))
                .unwrap()
                .with_checksums()
                .unwrap()
                .into_shared(),
        )
        .store(StoreTierConfig::new(tier.clone()))
        .build()
        .unwrap();
    let hashes: Vec<SequenceHash> = (1..=BLOCKS as u64).map(SequenceHash::new).collect();
    // Compute the chain once: G1 → G2 → G3.
    let blocks = stack.allocate(BLOCKS).unwrap();
    let staged = blocks
        .into_iter()
        .zip(&hashes)
        .enumerate()
        .map(|(i, (b, &h))| {
            let image: Vec<u8> = (0..block_bytes)
                .map(|k| (k as u64 ^ h.as_u64().wrapping_mul(0x9e37)) as u8)
                .collect();
            stack
                .g1()
                .layout()
                .write_block(b.block_id(), &image)
                .unwrap();
            let parent = i.checked_sub(1).map(|p| hashes[p]);
            b.stage(h, PAGE_SIZE).unwrap().with_parent(parent)
        })
        .collect();
    ImmutableBlock::release_all(stack.register(staged, EngineSync::Ready).unwrap());
    stack.flush();
    assert_eq!(
        tier.disk_stats().store.stored,
        BLOCKS as u64,
        "G3 holds the chain"
    );

    let empty_g1_g2 = || {
        stack.flush();
        drop(stack.allocate(stack.g1().available_blocks()).unwrap());
        drop(m2.allocate_blocks(m2.available_blocks()).unwrap());
    };
    let mut group = c.benchmark_group("onboard_disk");
    group.sample_size(20);
    group.throughput(Throughput::Bytes((BLOCKS * block_bytes) as u64));
    group.bench_function("64x256KiB", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                empty_g1_g2();
                let plan = stack.lookup(&hashes);
                let start = Instant::now();
                let done = stack.onboard(plan, usize::MAX).unwrap().wait();
                total += start.elapsed();
                assert_eq!(done.onboarded, BLOCKS, "{:?}", done.end);
            }
            total
        })
    });
    // Offload: register the chain in G1 and wait until it has reached G3 (G1 → G2 copies,
    // then G2 → G3 puts), G3 emptied of it before each round.
    group.bench_function("offload_64x256KiB", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                empty_g1_g2();
                tier.remove(&hashes);
                let blocks = stack.allocate(BLOCKS).unwrap();
                let staged: Vec<_> = blocks
                    .into_iter()
                    .zip(&hashes)
                    .enumerate()
                    .map(|(i, (b, &h))| {
                        let parent = i.checked_sub(1).map(|p| hashes[p]);
                        b.stage(h, PAGE_SIZE).unwrap().with_parent(parent)
                    })
                    .collect();
                let stored = tier.disk_stats().store.stored;
                let start = Instant::now();
                ImmutableBlock::release_all(stack.register(staged, EngineSync::Ready).unwrap());
                stack.flush();
                total += start.elapsed();
                assert_eq!(tier.disk_stats().store.stored, stored + BLOCKS as u64);
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, onboard_from_disk);
criterion_main!(benches);
