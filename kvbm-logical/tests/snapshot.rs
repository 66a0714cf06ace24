//! `subscribe_with_snapshot` under concurrent registrations: the snapshot followed by the
//! stream reproduces the cache exactly, with no gap and no duplicate.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Barrier};
use std::thread;

use kvbm_logical::{
    BlockManager, Device, ImmutableBlock, KvEventKind, Salt, SequenceHash, TokenBlockSequence,
};

const THREADS: usize = 8;
const ROUNDS: usize = 300;
const BS: usize = 4;

#[test]
fn snapshot_then_stream_equals_the_cache_under_8_registering_threads() {
    // Small enough that registrations evict all the time.
    let m = BlockManager::<Device>::builder()
        .block_count(64)
        .block_size(BS)
        .build()
        .unwrap();
    let start = Arc::new(Barrier::new(THREADS + 1));
    let (warm_tx, warm_rx) = mpsc::channel();
    // Set once the snapshot is taken: every worker goes on for at least 10 more rounds, so
    // registrations are under way on both sides of the snapshot however the threads are
    // scheduled (on a loaded machine they could otherwise all finish before it).
    let taken = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let m = m.clone();
            let start = Arc::clone(&start);
            let warm_tx = warm_tx.clone();
            let taken = Arc::clone(&taken);
            thread::spawn(move || {
                start.wait();
                let mut after = 0;
                for round in 0.. {
                    if taken.load(Ordering::Acquire) {
                        after += 1;
                    }
                    if round >= ROUNDS && after > 10 {
                        break;
                    }
                    if round == ROUNDS / 4 {
                        warm_tx.send(()).unwrap();
                    }
                    // Chains of 1-4 blocks; a shared first block across threads.
                    let len = 1 + (round % 4);
                    let mut tokens = vec![7u32; BS];
                    tokens
                        .extend((0..(len - 1) * BS).map(|i| (t * 100_000 + round * 10 + i) as u32));
                    let seq = TokenBlockSequence::from_tokens(&tokens, BS, &Salt::none()).unwrap();
                    let hashes: Vec<SequenceHash> = seq.sequence_hashes().collect();
                    let cached = m.match_blocks(&hashes);
                    let Ok(fresh) = m.allocate_blocks(hashes.len() - cached.len()) else {
                        continue;
                    };
                    let staged: Vec<_> = fresh
                        .into_iter()
                        .enumerate()
                        .map(|(i, b)| b.stage_from_sequence(&seq, cached.len() + i).unwrap())
                        .collect();
                    let registered = m.register_blocks(staged).unwrap();
                    if round % 7 == 0 {
                        m.invalidate_blocks(&hashes[hashes.len() - 1..]);
                    }
                    ImmutableBlock::release_all(registered);
                    ImmutableBlock::release_all(cached);
                }
            })
        })
        .collect();
    drop(warm_tx);
    start.wait();
    // Take the snapshot once every thread is well under way.
    for _ in 0..THREADS {
        warm_rx.recv().unwrap();
    }
    let (snapshot, events) = m.subscribe_with_snapshot(1 << 20);
    taken.store(true, Ordering::Release);
    for w in workers {
        w.join().unwrap();
    }

    let mut known: HashSet<SequenceHash> = HashSet::new();
    for block in &snapshot.blocks {
        assert!(
            known.insert(block.hash),
            "{} twice in the snapshot",
            block.hash
        );
        if let Some(p) = block.parent
            && snapshot.blocks.iter().any(|b| b.hash == p)
        {
            assert!(known.contains(&p), "child before its parent");
        }
    }
    assert!(!known.is_empty());
    let mut next = snapshot.next_seq;
    for batch in events.drain() {
        for e in batch.iter() {
            assert_eq!(e.seq, next, "a gap or a duplicate in the stream");
            next += 1;
            match &e.kind {
                KvEventKind::Stored {
                    block_hashes,
                    token_ids,
                    ..
                } => {
                    // Blocks staged before the subscription existed carry no tokens.
                    if let Some(ids) = token_ids {
                        assert_eq!(ids.len(), block_hashes.len() * BS);
                    }
                    for h in block_hashes {
                        assert!(known.insert(*h), "{h} stored while already known");
                    }
                }
                KvEventKind::Removed { block_hashes, .. } => {
                    for h in block_hashes {
                        assert!(known.remove(h), "{h} removed while not known");
                    }
                }
                KvEventKind::Cleared => known.clear(),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    assert_eq!(events.dropped_events(), 0);
    assert!(
        next > snapshot.next_seq,
        "the stream continued after the snapshot"
    );
    let (now, _) = m.subscribe_with_snapshot(1);
    let now: HashSet<SequenceHash> = now.hashes().collect();
    assert_eq!(known, now);
    m.check_invariants().unwrap();
}
