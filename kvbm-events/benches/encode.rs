//! The CPU cost of turning kvbm events into a vLLM batch payload (msgpack), per block event:
//! what the publisher thread does for every event before ZeroMQ takes the bytes.
//!
//! Shapes (1,024 block events per batch):
//! - `singles`: every `BlockStored` carries one hash (blocks registered without a parent, as in
//!   `kvbm-bench cycle`), and one `BlockRemoved` per 64 evictions: the per-event cost.
//! - `chains16`: `BlockStored` events of 16-block chains (a prompt's blocks registered together)
//!   and `BlockRemoved` events of 16: the per-hash cost.
//!
//! Run: `cargo bench -p kvbm-events --bench encode`. Throughput is in block events (hashes).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kvbm_events::wire::{BlockHashes, BlockRemoved, BlockStored, WireEvent, encode_batch};
use kvbm_logical::SequenceHash;

const BLOCKS: usize = 1_024;

fn hashes() -> Vec<SequenceHash> {
    // Spread over the full 64-bit range, as real hashes are (most need 9 bytes).
    (0..BLOCKS as u64)
        .map(|i| SequenceHash::new(i.wrapping_mul(0x9E37_79B9_7F4A_7C15)))
        .collect()
}

fn events(hashes: &[SequenceHash], chain: usize, removed_per: usize) -> Vec<WireEvent<'_>> {
    let half = hashes.len() / 2;
    let (stored, removed) = hashes.split_at(half);
    let mut events: Vec<WireEvent<'_>> = stored
        .chunks(chain)
        .map(|c| {
            let mut e = BlockStored::new(BlockHashes::Sequence(c), Some(7), 16);
            e.medium = Some("GPU");
            WireEvent::BlockStored(e)
        })
        .collect();
    events.extend(removed.chunks(removed_per).map(|c| {
        WireEvent::BlockRemoved(BlockRemoved::new(BlockHashes::Sequence(c), Some("GPU")))
    }));
    events
}

fn bench(c: &mut Criterion) {
    let hashes = hashes();
    let mut group = c.benchmark_group("encode");
    group.throughput(Throughput::Elements(BLOCKS as u64));
    for (name, chain, removed_per) in [("singles", 1, 64), ("chains16", 16, 16)] {
        let events = events(&hashes, chain, removed_per);
        let mut out = Vec::with_capacity(64 << 10);
        group.bench_function(name, |b| {
            b.iter(|| {
                out.clear();
                encode_batch(&mut out, 1.0, &events, Some(0)).expect("encodes");
                out.len()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
