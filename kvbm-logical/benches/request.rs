//! Criterion benchmarks for `RequestSequence`: the cost per token of driving one request.
//!
//! Run with `cargo bench -p kvbm-logical --bench request`. Throughput is in tokens, so the
//! time per element is the cost per token (the target: ≤ 10 ns per appended token on
//! average, hashing included; no allocation per token, checked by `tests/alloc_count.rs`).
//!
//! - `request/decode_4096`: decode 4096 tokens one at a time: `push`, `allocate(1)` (a block
//!   every 16th token), `commit(1)` (which hashes, stages and registers every 16th token).
//!   Building the request and releasing it are set-up, not timed.
//! - `request/prefill_8192_chunk_512`: chunked prefill of an 8192-token prompt already in the
//!   request (hashed when built, not timed): 16 × (`allocate(512)`, `commit(512)`).
//! - `request/append_8192_chunk_512`: `extend` 8192 tokens in 512-token chunks, each then
//!   allocated and committed: appending (hashing included) plus the prefill.
//! - `baseline/sequence_push_4096`: `TokenBlockSequence::push` alone for 4096 tokens (the
//!   hashing floor the request builds on); quote the request figures against it.
//! - `baseline/manual_decode_4096`: the same decode written by hand against the block API
//!   (push; per filled block `allocate_blocks(1)`, `stage_token_block`, `register_block`):
//!   the manager's share, so that `request/decode_4096` minus it is the request type's own.

use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use kvbm_logical::{BlockManager, Device, RequestSequence, Salt, SaltHash, TokenBlockSequence};

const BLOCK_SIZE: usize = 16;

fn manager() -> BlockManager<Device> {
    BlockManager::builder()
        .block_count(2048)
        .block_size(BLOCK_SIZE)
        .build()
        .expect("valid configuration")
}

fn request(c: &mut Criterion) {
    let m = manager();
    // A fresh salt per iteration: every block is new (no deduplication against the last run).
    let mut salt = 0u64;
    let mut next_salt = move || {
        salt += 1;
        SaltHash::from_raw(salt)
    };
    let mut g = c.benchmark_group("request");

    g.throughput(Throughput::Elements(4096));
    g.bench_function("decode_4096", |b| {
        b.iter_batched(
            || {
                RequestSequence::builder(&m)
                    .salt_hash(next_salt())
                    .prompt(&[1])
                    .reserve_tokens(4096)
                    .build()
            },
            |mut req| {
                for t in 0..4096u32 {
                    req.push(black_box(t));
                    req.allocate(1).expect("room");
                    req.commit(1).expect("allocated");
                }
                req
            },
            BatchSize::PerIteration,
        );
    });

    let prompt: Vec<u32> = (0..8192).collect();
    g.throughput(Throughput::Elements(8192));
    g.bench_function("prefill_8192_chunk_512", |b| {
        b.iter_batched(
            || {
                RequestSequence::builder(&m)
                    .salt_hash(next_salt())
                    .prompt(&prompt)
                    .build()
            },
            |mut req| {
                for _ in 0..16 {
                    req.allocate(512).expect("room");
                    req.commit(512).expect("allocated");
                }
                req
            },
            BatchSize::PerIteration,
        );
    });

    g.bench_function("append_8192_chunk_512", |b| {
        b.iter_batched(
            || {
                RequestSequence::builder(&m)
                    .salt_hash(next_salt())
                    .reserve_tokens(8192)
                    .build()
            },
            |mut req| {
                for chunk in prompt.chunks(512) {
                    req.extend(black_box(chunk));
                    req.allocate(512).expect("room");
                    req.commit(512).expect("allocated");
                }
                req
            },
            BatchSize::PerIteration,
        );
    });
    g.finish();

    let mut g = c.benchmark_group("baseline");
    g.throughput(Throughput::Elements(4096));
    g.bench_function("sequence_push_4096", |b| {
        b.iter_batched(
            || {
                let mut s = TokenBlockSequence::new(BLOCK_SIZE, &Salt::none()).expect("size");
                s.reserve(4096);
                s
            },
            |mut s| {
                for t in 0..4096u32 {
                    black_box(s.push(black_box(t)));
                }
                s
            },
            BatchSize::PerIteration,
        );
    });
    // The manager work a decode loop needs when written by hand against the block API: the
    // same pushes, and for every 16th token one `allocate_blocks(1)`, `stage_token_block`
    // and `register_block`, holding the handles in a `Vec`. The request type's own cost is
    // `request/decode_4096` minus this.
    g.bench_function("manual_decode_4096", |b| {
        b.iter_batched(
            || {
                let mut s =
                    TokenBlockSequence::with_salt_hash(BLOCK_SIZE, next_salt()).expect("size");
                s.reserve(4096);
                (s, Vec::with_capacity(4096 / BLOCK_SIZE + 1))
            },
            |(mut s, mut held)| {
                for t in 0..4096u32 {
                    if let Some(full) = s.push(black_box(t)) {
                        let block = m.allocate_blocks(1).expect("room").pop().expect("one");
                        let staged = block.stage_token_block(&full).expect("size");
                        held.push(m.register_block(staged).expect("registered"));
                    }
                }
                (s, held)
            },
            BatchSize::PerIteration,
        );
    });
    g.finish();
}

criterion_group!(benches, request);
criterion_main!(benches);
