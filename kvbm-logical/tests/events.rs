//! KV events: sequence numbers, the Stored/Removed alternation per hash, Cleared, and
//! overflow reported as counted gaps.

use std::collections::{HashMap, HashSet};

use kvbm_logical::{
    BlockDuplicationPolicy, BlockManager, Device, EventSubscriber, EvictionBackend, ImmutableBlock,
    KvEvent, KvEventKind, RemovalReason, SequenceHash,
};
use proptest::prelude::*;

const TOTAL: usize = 6;
const BS: usize = 4;

#[derive(Clone, Debug)]
enum Op {
    /// Allocate, stage with these hashes (chained), register as one batch.
    Register(Vec<u64>),
    DropSome(usize),
    Match(Vec<u64>),
    Evict(usize),
    Reset,
    Invalidate(Vec<u64>),
    Pin(u64),
    UnpinAll,
}

fn op() -> impl Strategy<Value = Op> {
    let hashes = prop::collection::vec(0u64..10, 1..4);
    prop_oneof![
        4 => hashes.clone().prop_map(Op::Register),
        3 => (0usize..4).prop_map(Op::DropSome),
        2 => hashes.clone().prop_map(Op::Match),
        2 => (1usize..4).prop_map(Op::Evict),
        1 => Just(Op::Reset),
        1 => hashes.prop_map(Op::Invalidate),
        1 => (0u64..10).prop_map(Op::Pin),
        1 => Just(Op::UnpinAll),
    ]
}

/// Checks the event stream as a router would consume it; returns the hashes it believes
/// stored.
#[derive(Default)]
struct Router {
    next_seq: u64,
    stored: HashSet<u64>,
}

impl Router {
    fn consume(&mut self, events: &EventSubscriber) -> Result<(), TestCaseError> {
        for batch in events.drain() {
            prop_assert!(!batch.is_empty(), "empty batch");
            for KvEvent { seq, kind, .. } in batch.iter() {
                prop_assert_eq!(*seq, self.next_seq, "sequence numbers are consecutive");
                self.next_seq += 1;
                match kind {
                    KvEventKind::Stored {
                        block_hashes, tier, ..
                    } => {
                        prop_assert_eq!(*tier, "device");
                        for h in block_hashes {
                            prop_assert!(self.stored.insert(h.as_u64()), "{h} stored twice");
                        }
                    }
                    KvEventKind::Removed { block_hashes, .. } => {
                        for h in block_hashes {
                            prop_assert!(self.stored.remove(&h.as_u64()), "{h} removed unstored");
                        }
                    }
                    KvEventKind::Cleared => {
                        prop_assert!(self.stored.is_empty(), "Cleared with hashes stored");
                    }
                    other => prop_assert!(false, "unexpected {other:?}"),
                }
            }
        }
        Ok(())
    }
}

fn run(
    policy: BlockDuplicationPolicy,
    backend: EvictionBackend,
    ops: Vec<Op>,
) -> Result<(), TestCaseError> {
    let m = BlockManager::<Device>::builder()
        .block_count(TOTAL)
        .block_size(BS)
        .duplication_policy(policy)
        .eviction(backend)
        .max_pinned_fraction(0.5)
        .build()
        .unwrap();
    let events = m.subscribe(1 << 16);
    let mut router = Router::default();
    let mut held: Vec<ImmutableBlock<Device>> = Vec::new();
    let h = SequenceHash::new;
    for op in ops {
        match op {
            Op::Register(hashes) => {
                if let Ok(blocks) = m.allocate_blocks(hashes.len()) {
                    let mut parent = None;
                    let staged = blocks
                        .into_iter()
                        .zip(&hashes)
                        .map(|(b, &x)| {
                            let s = b.stage(h(x), BS).unwrap().with_parent(parent);
                            parent = Some(h(x));
                            s
                        })
                        .collect();
                    held.extend(m.register_blocks(staged).unwrap());
                }
            }
            Op::DropSome(n) => {
                let n = n.min(held.len());
                ImmutableBlock::release_all(held.drain(..n));
            }
            Op::Match(hashes) => {
                let q: Vec<_> = hashes.iter().map(|&x| h(x)).collect();
                held.extend(m.match_blocks(&q));
            }
            Op::Evict(n) => drop(m.allocate_blocks(n)),
            Op::Reset => drop(m.reset_inactive_pool()),
            Op::Invalidate(hashes) => {
                let q: Vec<_> = hashes.iter().map(|&x| h(x)).collect();
                m.invalidate_blocks(&q);
            }
            Op::Pin(x) => drop(m.pin(&[h(x)])),
            Op::UnpinAll => drop(m.unpin_all()),
        }
        router.consume(&events)?;
        // The router's view equals the cache: every hash it holds is registered and the
        // counts agree.
        let c = m
            .check_invariants()
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(router.stored.len(), c.registered_hashes);
        let q: Vec<_> = router.stored.iter().map(|&x| h(x)).collect();
        let found = m.scan_matches(&q, false);
        prop_assert_eq!(found.len(), q.len());
        ImmutableBlock::release_all(found);
        router.consume(&events)?; // a scan emits nothing, but check anyway
    }
    prop_assert_eq!(events.dropped_events(), 0);
    prop_assert_eq!(m.metrics().snapshot().events_dropped, 0);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn events_track_the_cache_reject(ops in prop::collection::vec(op(), 1..80)) {
        run(BlockDuplicationPolicy::Reject, EvictionBackend::Lru, ops)?;
    }

    #[test]
    fn events_track_the_cache_allow(ops in prop::collection::vec(op(), 1..80)) {
        run(BlockDuplicationPolicy::Allow, EvictionBackend::Lineage, ops)?;
    }
}

fn register_chain(m: &BlockManager<Device>, hashes: &[u64]) -> Vec<ImmutableBlock<Device>> {
    let mut parent = None;
    let staged = m
        .allocate_blocks(hashes.len())
        .unwrap()
        .into_iter()
        .zip(hashes)
        .map(|(b, &x)| {
            let s = b
                .stage(SequenceHash::new(x), BS)
                .unwrap()
                .with_parent(parent);
            parent = Some(SequenceHash::new(x));
            s
        })
        .collect();
    m.register_blocks(staged).unwrap()
}

#[test]
fn a_chain_is_one_stored_event_and_reasons_are_reported() {
    let m = BlockManager::<Device>::builder()
        .block_count(4)
        .block_size(BS)
        .build()
        .unwrap();
    let events = m.subscribe(8);
    ImmutableBlock::release_all(register_chain(&m, &[1, 2, 3]));
    let batch = events.try_recv().unwrap();
    assert_eq!(batch.len(), 1);
    assert_eq!(
        batch[0].kind,
        KvEventKind::Stored {
            block_hashes: [1, 2, 3].map(SequenceHash::new).to_vec(),
            parent: None,
            tier: "device",
            block_size: BS,
            token_ids: None,
        }
    );
    // 1 free + 1 evicted: the chain's tail, hash 3 (the default policy evicts leaves first,
    // so the prefix 1, 2 stays matchable).
    drop(m.allocate_blocks(2).unwrap());
    let batch = events.try_recv().unwrap();
    assert_eq!(
        batch[0].kind,
        KvEventKind::Removed {
            block_hashes: vec![SequenceHash::new(3)],
            reason: RemovalReason::Evicted
        }
    );
    assert_eq!(m.match_blocks(&[1, 2].map(SequenceHash::new)).len(), 2);
    assert_eq!(m.invalidate_blocks(&[SequenceHash::new(2)]), 1);
    let batch = events.try_recv().unwrap();
    assert!(matches!(
        &batch[0].kind,
        KvEventKind::Removed {
            reason: RemovalReason::Invalidated,
            ..
        }
    ));
    assert_eq!(m.reset_inactive_pool(), Ok(1));
    let batch = events.try_recv().unwrap();
    let kinds: Vec<_> = batch.iter().map(|e| e.kind.clone()).collect();
    assert_eq!(
        kinds,
        vec![
            KvEventKind::Removed {
                block_hashes: vec![SequenceHash::new(1)],
                reason: RemovalReason::Reset
            },
            KvEventKind::Cleared
        ]
    );
    let seqs: Vec<u64> = batch.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, vec![3, 4]);
    assert!(batch.iter().all(|e| e.manager == m.id()));
    assert!(
        batch
            .iter()
            .all(|e| (e.tier, e.medium) == ("device", "GPU"))
    );
    assert!(events.try_recv().is_none());
}

#[test]
fn a_full_subscriber_loses_counted_batches_and_never_blocks() {
    let m = BlockManager::<Device>::builder()
        .block_count(64)
        .block_size(BS)
        .build()
        .unwrap();
    let slow = m.subscribe(2);
    let fast = m.subscribe(1024);
    // 10 registrations of unrelated hashes, one event each; nobody reads `slow`.
    let mut held = Vec::new();
    for x in 0..10 {
        held.extend(register_chain(&m, &[100 + x]));
    }
    // The slow subscriber got the first 2 batches; 8 were dropped and counted.
    let got: Vec<u64> = slow
        .drain()
        .flat_map(|b| b.iter().map(|e| e.seq).collect::<Vec<_>>())
        .collect();
    assert_eq!(got, vec![0, 1]);
    assert_eq!((slow.dropped_batches(), slow.dropped_events()), (8, 8));
    assert_eq!(m.metrics().snapshot().events_dropped, 8);
    // After draining, it receives again; the gap in sequence numbers equals the loss.
    held.extend(register_chain(&m, &[200]));
    let next = slow.try_recv().unwrap();
    assert_eq!(next[0].seq, 10);
    assert_eq!(next[0].seq - 1 - 1, slow.dropped_events());
    // The fast subscriber saw everything.
    let all: Vec<u64> = fast
        .drain()
        .flat_map(|b| b.iter().map(|e| e.seq).collect::<Vec<_>>())
        .collect();
    assert_eq!(all, (0..11).collect::<Vec<_>>());
}

#[test]
fn dropped_subscribers_are_forgotten_and_events_cost_nothing_without_them() {
    let m = BlockManager::<Device>::builder()
        .block_count(8)
        .block_size(BS)
        .build()
        .unwrap();
    let sub = m.subscribe(1);
    drop(sub);
    // Publishing to a dropped subscriber removes it; no loss is counted for it.
    let held = register_chain(&m, &[1]);
    drop(held);
    drop(m.allocate_blocks(8).unwrap());
    assert_eq!(m.metrics().snapshot().events_dropped, 0);
    // A late subscriber starts after the numbers already used.
    let late = m.subscribe(4);
    drop(register_chain(&m, &[2]));
    let seqs: HashMap<u64, ()> = late
        .drain()
        .flat_map(|b| b.iter().map(|e| (e.seq, ())).collect::<Vec<_>>())
        .collect();
    assert_eq!(seqs.len(), 1);
}

#[test]
fn a_sleeping_subscriber_is_woken_by_each_batch_and_by_the_managers_end() {
    // The subscriber sleeps in `recv_timeout` before anything is published; the store wakes
    // it for the batch (a missed wake-up returns `None` after the timeout and fails), and
    // dropping the manager and its handles ends the wait at once (checked against a deadline
    // far beyond any scheduling delay, which a missed wake-up would reach).
    let patience = std::time::Duration::from_secs(120);
    let m = BlockManager::<Device>::builder()
        .block_count(8)
        .block_size(BS)
        .build()
        .unwrap();
    let sub = m.subscribe(4);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        ready_tx.send(()).unwrap();
        let first = sub.recv_timeout(patience);
        let start = std::time::Instant::now();
        let end = sub.recv_timeout(patience);
        (first, end, start.elapsed())
    });
    ready_rx.recv().unwrap();
    drop(register_chain(&m, &[1, 2]));
    drop(m);
    let (first, end, waited) = waiter.join().unwrap();
    let first = first.expect("the batch woke the subscriber");
    assert!(
        matches!(&first[0].kind, KvEventKind::Stored { block_hashes, .. } if block_hashes.len() == 2)
    );
    assert!(end.is_none(), "no event after the chain");
    assert!(waited < patience, "the manager's end woke the subscriber");
}

#[test]
fn every_subscriber_gets_every_batch_in_order_under_concurrent_calls() {
    // Four threads register, match, evict and invalidate on one manager while two
    // subscribers (one sleeping in recv_timeout, one polling) read: each sees sequence
    // numbers 0.. with no gap and no repeat, batches in order.
    let m = BlockManager::<Device>::builder()
        .block_count(64)
        .block_size(BS)
        .build()
        .unwrap();
    let a = m.subscribe(1 << 20);
    let b = m.subscribe(1 << 20);
    let done = std::sync::atomic::AtomicBool::new(false);
    let read = |s: &EventSubscriber, sleep: bool| {
        let mut seqs = Vec::new();
        loop {
            let finished = done.load(std::sync::atomic::Ordering::Acquire);
            let batch = if sleep {
                s.recv_timeout(std::time::Duration::from_millis(1))
            } else {
                s.try_recv()
            };
            match batch {
                Some(batch) => seqs.extend(batch.iter().map(|e| e.seq)),
                None if finished => break,
                None => std::thread::yield_now(),
            }
        }
        seqs
    };
    let (sa, sb) = std::thread::scope(|s| {
        let ra = s.spawn(|| read(&a, true));
        let rb = s.spawn(|| read(&b, false));
        let workers: Vec<_> = (0..4u64)
            .map(|t| {
                let m = &m;
                s.spawn(move || {
                    for i in 0..300u64 {
                        let base = 1 + t * 1_000_000 + i * 10;
                        let held = register_chain(m, &[base, base + 1, base + 2]);
                        let hit = m.match_blocks(&[SequenceHash::new(base)]);
                        drop(held);
                        drop(hit);
                        if i % 7 == 0 {
                            m.invalidate_blocks(&[SequenceHash::new(base + 2)]);
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::Release);
        (ra.join().unwrap(), rb.join().unwrap())
    });
    assert!(!sa.is_empty());
    assert_eq!(sa, (0..sa.len() as u64).collect::<Vec<_>>());
    assert_eq!(sa, sb);
    assert_eq!((a.dropped_events(), b.dropped_events()), (0, 0));
}
