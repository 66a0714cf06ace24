//! Criterion benchmarks for the `BlockManager` hot paths.
//!
//! Run with `cargo bench -p kvbm-logical --bench manager`. Every benchmark reports
//! throughput in blocks, so criterion's "elem/s" reads as blocks per second and the time
//! per iteration divided by the batch size is the cost per block.
//!
//! - `lifecycle/{1,16,256}`: allocate → stage → register → drop (batch release).
//! - `match_1024/{inactive,active}`: `match_blocks` of a 1024-block prefix whose blocks are
//!   all in the inactive pool (every hit is resurrected and, on release, re-inserted), or all
//!   held by another handle (every hit only bumps a reference count).
//! - `request_cycle`: match a 512-block prefix, allocate 64 blocks, register them, drop all.
//! - `baseline/registry_churn_256`: the floor under `lifecycle/256` — 256 inserts and 256
//!   removals in a foldhash `HashMap` of the same size as the manager's registry, which is the
//!   work no implementation of a hash-keyed cache can skip. Quote `lifecycle` as a ratio to it.

use std::collections::HashMap;
use std::hint::black_box;

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kvbm_logical::{BlockManager, Device, ImmutableBlock, SequenceHash};

const BLOCK_SIZE: usize = 16;

fn manager(blocks: usize) -> BlockManager<Device> {
    BlockManager::builder()
        .block_count(blocks)
        .block_size(BLOCK_SIZE)
        .build()
        .expect("valid configuration")
}

/// Registers `hashes` (one block each) and returns the handles.
fn fill(m: &BlockManager<Device>, hashes: &[SequenceHash]) -> Vec<ImmutableBlock<Device>> {
    let staged = m
        .allocate_blocks(hashes.len())
        .expect("enough blocks")
        .into_iter()
        .zip(hashes)
        .map(|(b, &h)| b.stage(h, BLOCK_SIZE).expect("right size"))
        .collect();
    m.register_blocks(staged).expect("own blocks")
}

/// Blocks in the `lifecycle` manager (and entries in the baseline map).
const LIFECYCLE_BLOCKS: usize = 16 * 1024;

fn baseline(c: &mut Criterion) {
    const BATCH: u64 = 256;
    let mut map: HashMap<u64, u32, foldhash::fast::RandomState> = HashMap::default();
    map.reserve(2 * LIFECYCLE_BLOCKS);
    let mut next = 0u64;
    for _ in 0..LIFECYCLE_BLOCKS {
        map.insert(next, next as u32);
        next += 1;
    }
    let mut group = c.benchmark_group("baseline");
    group.throughput(Throughput::Elements(BATCH));
    group.bench_function("registry_churn_256", |b| {
        b.iter(|| {
            let oldest = next - LIFECYCLE_BLOCKS as u64;
            for k in 0..BATCH {
                black_box(map.remove(&(oldest + k)));
                map.insert(next + k, (next + k) as u32);
            }
            next += BATCH;
        });
    });
    group.finish();
}

fn lifecycle(c: &mut Criterion) {
    let mut group = c.benchmark_group("lifecycle");
    for batch in [1usize, 16, 256] {
        // Plenty of blocks so that the reset pool never runs dry; every hash is fresh, so the
        // inactive pool fills and, after the first lap, allocation evicts one block per block.
        let m = manager(LIFECYCLE_BLOCKS);
        let mut next = 0u64;
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_with_input(BenchmarkId::from_parameter(batch), &batch, |b, &n| {
            b.iter(|| {
                let staged = m
                    .allocate_blocks(n)
                    .expect("enough blocks")
                    .into_iter()
                    .map(|blk| {
                        next += 1;
                        blk.stage(SequenceHash::new(next), BLOCK_SIZE)
                            .expect("right size")
                    })
                    .collect();
                let registered = m.register_blocks(staged).expect("own blocks");
                ImmutableBlock::release_all(black_box(registered));
            });
        });
    }
    group.finish();
}

fn match_prefix(c: &mut Criterion) {
    const N: usize = 1024;
    let hashes: Vec<SequenceHash> = (1..=N as u64).map(SequenceHash::new).collect();
    let mut group = c.benchmark_group("match_1024");
    group.throughput(Throughput::Elements(N as u64));

    let m = manager(2 * N);
    ImmutableBlock::release_all(fill(&m, &hashes));
    group.bench_function("inactive", |b| {
        b.iter(|| {
            let hits = m.match_blocks(black_box(&hashes));
            assert_eq!(hits.len(), N);
            ImmutableBlock::release_all(hits);
        });
    });

    let m = manager(2 * N);
    let held = fill(&m, &hashes);
    group.bench_function("active", |b| {
        b.iter(|| {
            let hits = m.match_blocks(black_box(&hashes));
            assert_eq!(hits.len(), N);
            ImmutableBlock::release_all(hits);
        });
    });
    drop(held);
    group.finish();
}

fn request_cycle(c: &mut Criterion) {
    const PREFIX: usize = 512;
    const NEW: usize = 64;
    let m = manager(4 * 1024);
    let prefix: Vec<SequenceHash> = (1..=PREFIX as u64).map(SequenceHash::new).collect();
    ImmutableBlock::release_all(fill(&m, &prefix));
    let mut next = 1u64 << 32;

    let mut group = c.benchmark_group("request_cycle");
    group.throughput(Throughput::Elements((PREFIX + NEW) as u64));
    group.bench_function("match512_alloc64", |b| {
        b.iter_batched(
            || {
                next += NEW as u64;
                (next..next + NEW as u64)
                    .map(SequenceHash::new)
                    .collect::<Vec<_>>()
            },
            |fresh| {
                let hits = m.match_blocks(&prefix);
                assert_eq!(hits.len(), PREFIX);
                let staged = m
                    .allocate_blocks(NEW)
                    .expect("enough blocks")
                    .into_iter()
                    .zip(&fresh)
                    .map(|(blk, &h)| blk.stage(h, BLOCK_SIZE).expect("right size"))
                    .collect();
                let new = m.register_blocks(staged).expect("own blocks");
                ImmutableBlock::release_all(new);
                ImmutableBlock::release_all(hits);
            },
            BatchSize::SmallInput,
        );
    });
    group.finish();
}

criterion_group!(benches, baseline, lifecycle, match_prefix, request_cycle);
criterion_main!(benches);
