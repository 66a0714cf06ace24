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
//! - `backend_request_cycle/<backend>`: the request cycle (match 512, allocate 64, register,
//!   drop) on every eviction backend; the prefix's blocks carry parents (a chain), as an
//!   engine's would.
//! - `backend_churn/<backend>`: high churn — the pool is full of inactive blocks, so every
//!   allocated block is an eviction; 256 fresh chained blocks per iteration.
//! - `baseline/registry_churn_256`: the floor under `lifecycle/256` — 256 inserts and 256
//!   removals in a foldhash `HashMap` of the same size as the manager's registry, which is the
//!   work no implementation of a hash-keyed cache can skip. Quote `lifecycle` as a ratio to it.
//! - `handles/*`: the five scenarios of issue 13, each handle release measured both as a plain
//!   `drop` of the `Vec` (one release per handle) and as `ImmutableBlock::release_all`:
//!   - `match_active_1024/{drop,release_all}`: match a 1024-block prefix whose blocks another
//!     handle holds, then release the result (no handle is the last owner);
//!   - `match_inactive_1024/{drop,release_all}`: match 1024 inactive blocks (each resurrected)
//!     and release them (each the last owner: back into the inactive pool);
//!   - `drop_registered_1024/{drop,release_all}`: release 1024 freshly registered blocks, each
//!     the last owner (the registration is set-up, not timed);
//!   - `cycle_evicting_128/{drop,release_all}`: LRU pool full of inactive blocks; allocate 128
//!     (every one an eviction), stage, register, release;
//!   - `hash_block_16`: hash one 16-token block chained to its parent (per call).

use std::collections::HashMap;
use std::hint::black_box;

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kvbm_logical::{
    BlockManager, CompleteBlock, Device, EvictionBackend, ImmutableBlock, SaltHash, SequenceHash,
    hash_block,
};

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

fn backend_manager(blocks: usize, backend: EvictionBackend) -> BlockManager<Device> {
    BlockManager::builder()
        .block_count(blocks)
        .block_size(BLOCK_SIZE)
        .eviction(backend)
        .build()
        .expect("valid configuration")
}

/// Stages `fresh` blocks with `hashes`, each the child of the previous one.
fn stage_chain(
    blocks: Vec<kvbm_logical::MutableBlock<Device>>,
    hashes: &[SequenceHash],
    mut parent: Option<SequenceHash>,
) -> Vec<CompleteBlock<Device>> {
    blocks
        .into_iter()
        .zip(hashes)
        .map(|(blk, &h)| {
            let staged = blk
                .stage(h, BLOCK_SIZE)
                .expect("right size")
                .with_parent(parent);
            parent = Some(h);
            staged
        })
        .collect()
}

fn backend_request_cycle(c: &mut Criterion) {
    const PREFIX: usize = 512;
    const NEW: usize = 64;
    let mut group = c.benchmark_group("backend_request_cycle");
    group.throughput(Throughput::Elements((PREFIX + NEW) as u64));
    for backend in EvictionBackend::ALL {
        let m = backend_manager(4 * 1024, backend);
        let prefix: Vec<SequenceHash> = (1..=PREFIX as u64).map(SequenceHash::new).collect();
        let blocks = m.allocate_blocks(PREFIX).expect("enough blocks");
        ImmutableBlock::release_all(
            m.register_blocks(stage_chain(blocks, &prefix, None))
                .expect("own blocks"),
        );
        let mut next = 1u64 << 32;
        let mut fresh = Vec::with_capacity(NEW);
        group.bench_function(backend.name(), |b| {
            b.iter(|| {
                fresh.clear();
                fresh.extend((next..next + NEW as u64).map(SequenceHash::new));
                next += NEW as u64;
                let hits = m.match_blocks(&prefix);
                let blocks = m.allocate_blocks(NEW).expect("enough blocks");
                let staged = stage_chain(blocks, &fresh, prefix.last().copied());
                let new = m.register_blocks(staged).expect("own blocks");
                ImmutableBlock::release_all(new);
                ImmutableBlock::release_all(hits);
            });
        });
    }
    group.finish();
}

fn backend_churn(c: &mut Criterion) {
    const BATCH: usize = 256;
    let mut group = c.benchmark_group("backend_churn");
    group.throughput(Throughput::Elements(BATCH as u64));
    for backend in EvictionBackend::ALL {
        let m = backend_manager(LIFECYCLE_BLOCKS, backend);
        let mut next = 0u64;
        let mut hashes = Vec::with_capacity(BATCH);
        // Fill the pool so that every allocation evicts.
        while m.counts().reset > 0 {
            hashes.clear();
            hashes.extend((next..next + BATCH as u64).map(SequenceHash::new));
            next += BATCH as u64;
            let blocks = m.allocate_blocks(BATCH).expect("enough blocks");
            ImmutableBlock::release_all(
                m.register_blocks(stage_chain(blocks, &hashes, None))
                    .expect("own blocks"),
            );
        }
        group.bench_function(backend.name(), |b| {
            b.iter(|| {
                hashes.clear();
                hashes.extend((next..next + BATCH as u64).map(SequenceHash::new));
                next += BATCH as u64;
                let blocks = m.allocate_blocks(BATCH).expect("enough blocks");
                let new = m
                    .register_blocks(stage_chain(blocks, &hashes, None))
                    .expect("own blocks");
                ImmutableBlock::release_all(black_box(new));
            });
        });
    }
    group.finish();
}

/// How a benchmark releases a `Vec` of handles.
#[derive(Clone, Copy)]
enum Release {
    /// `drop(vec)`: one release per handle.
    Drop,
    /// `ImmutableBlock::release_all(vec)`.
    All,
}

impl Release {
    const BOTH: [Release; 2] = [Release::Drop, Release::All];

    fn name(self) -> &'static str {
        match self {
            Release::Drop => "drop",
            Release::All => "release_all",
        }
    }

    fn run(self, handles: Vec<ImmutableBlock<Device>>) {
        match self {
            Release::Drop => drop(handles),
            Release::All => ImmutableBlock::release_all(handles),
        }
    }
}

/// The scenarios of issue 13 (see the module docs).
fn handles(c: &mut Criterion) {
    const N: usize = 1024;
    let mut group = c.benchmark_group("handles");
    let hashes: Vec<SequenceHash> = (1..=N as u64).map(SequenceHash::new).collect();

    group.throughput(Throughput::Elements(N as u64));
    for release in Release::BOTH {
        let m = manager(2 * N);
        let held = fill(&m, &hashes);
        group.bench_function(format!("match_active_1024/{}", release.name()), |b| {
            b.iter(|| {
                let hits = m.match_blocks(black_box(&hashes));
                assert_eq!(hits.len(), N);
                release.run(hits);
            });
        });
        drop(held);
    }
    for release in Release::BOTH {
        let m = manager(2 * N);
        ImmutableBlock::release_all(fill(&m, &hashes));
        group.bench_function(format!("match_inactive_1024/{}", release.name()), |b| {
            b.iter(|| {
                let hits = m.match_blocks(black_box(&hashes));
                assert_eq!(hits.len(), N);
                release.run(hits);
            });
        });
    }
    for release in Release::BOTH {
        let m = manager(4 * N);
        let mut next = 1u64 << 32;
        group.bench_function(format!("drop_registered_1024/{}", release.name()), |b| {
            b.iter_batched(
                || {
                    let fresh: Vec<SequenceHash> =
                        (next..next + N as u64).map(SequenceHash::new).collect();
                    next += N as u64;
                    fill(&m, &fresh)
                },
                |registered| release.run(registered),
                BatchSize::PerIteration,
            );
        });
    }

    const CYCLE: usize = 128;
    group.throughput(Throughput::Elements(CYCLE as u64));
    for release in Release::BOTH {
        let m = manager(32 * CYCLE);
        let mut next = 0u64;
        let mut fresh = Vec::with_capacity(CYCLE);
        let mut round = |m: &BlockManager<Device>, fresh: &mut Vec<SequenceHash>| {
            fresh.clear();
            fresh.extend((next..next + CYCLE as u64).map(SequenceHash::new));
            next += CYCLE as u64;
            fill(m, fresh)
        };
        while m.counts().reset > 0 {
            ImmutableBlock::release_all(round(&m, &mut fresh));
        }
        group.bench_function(format!("cycle_evicting_128/{}", release.name()), |b| {
            b.iter(|| release.run(round(&m, &mut fresh)));
        });
    }

    group.throughput(Throughput::Elements(1));
    let salt = SaltHash::default();
    let parent = hash_block(None, salt, &[7; BLOCK_SIZE], &[]);
    let tokens: Vec<u32> = (1000..1000 + BLOCK_SIZE as u32).collect();
    group.bench_function("hash_block_16", |b| {
        b.iter(|| {
            hash_block(
                black_box(Some(parent)),
                salt,
                black_box(&tokens[..]),
                black_box(&[]),
            )
        });
    });
    group.finish();
}

criterion_group!(backends, backend_request_cycle, backend_churn);
criterion_group!(benches, baseline, lifecycle, match_prefix, request_cycle);
criterion_group!(issue13, handles);
criterion_main!(benches, backends, issue13);
