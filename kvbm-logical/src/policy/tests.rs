//! Every backend against a reference model: a `Vec` of entries scanned linearly for the
//! victim, with the policy's rule written as plainly as possible.

use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::frequency::FrequencySketch;
use crate::retention::ManualClock;

const CAP: u32 = 12;
const HASHES: u64 = 8;

#[derive(Clone, Debug)]
enum Op {
    Insert {
        id: u32,
        hash: u64,
        parent: Option<u64>,
        priority: u8,
        expiry_ms: Option<u64>,
    },
    Remove(u32),
    Pop,
    Touch(u32),
    /// Advance the clock (priority expiry).
    Advance(u64),
    /// Record an access to a hash in the sketch (frequency levels).
    Access(u64, u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (
            0..CAP,
            0..HASHES,
            prop::option::weighted(0.7, 0..HASHES),
            prop::sample::select(vec![0u8, 10, 35, 50, 90, 100]),
            prop::option::weighted(0.3, 0u64..50),
        )
            .prop_map(|(id, hash, parent, priority, expiry_ms)| Op::Insert {
                id,
                hash,
                parent,
                priority,
                expiry_ms
            }),
        1 => (0..CAP).prop_map(Op::Remove),
        3 => Just(Op::Pop),
        2 => (0..CAP).prop_map(Op::Touch),
        1 => (0u64..30).prop_map(Op::Advance),
        1 => (0..HASHES, 1u8..6).prop_map(|(h, n)| Op::Access(h, n)),
    ]
}

/// Mostly chains (each insert's parent is the hash before it, as a request releases its
/// blocks head first), which exercise lineage's out-of-heap leaf slots.
fn chain_op() -> impl Strategy<Value = Op> {
    let insert = |id, hash: u64, root: bool| Op::Insert {
        id,
        hash,
        parent: (!root && hash > 0).then(|| hash - 1),
        priority: 50,
        expiry_ms: None,
    };
    prop_oneof![
        6 => (0..CAP, 0..HASHES).prop_map(move |(id, hash)| insert(id, hash, false)),
        1 => (0..CAP, 0..HASHES).prop_map(move |(id, hash)| insert(id, hash, true)),
        1 => (0..CAP).prop_map(Op::Remove),
        3 => Just(Op::Pop),
        2 => (0..CAP).prop_map(Op::Touch),
    ]
}

#[derive(Clone, Debug)]
struct Entry {
    id: u32,
    hash: u64,
    parent: Option<u64>,
    priority: u8,
    /// Absolute deadline in ms, if the priority expires.
    deadline: Option<u64>,
    /// Order of insertion.
    inserted: u64,
    /// Order of last insertion or touch.
    used: u64,
    /// Frequency level at the last insertion or touch.
    level: u8,
}

struct Model {
    backend: EvictionBackend,
    entries: Vec<Entry>,
    clock_ms: u64,
    tick: u64,
}

impl Model {
    fn victim(&self) -> Option<u32> {
        let e = &self.entries;
        let pick = match self.backend {
            EvictionBackend::Lru => e.iter().min_by_key(|x| x.used),
            EvictionBackend::Fifo => e.iter().min_by_key(|x| x.inserted),
            EvictionBackend::Lineage => {
                let is_leaf = |x: &Entry| !e.iter().any(|y| y.parent == Some(x.hash));
                e.iter()
                    .filter(|x| is_leaf(x))
                    .min_by_key(|x| x.used)
                    .or_else(|| e.iter().min_by_key(|x| x.used))
            }
            EvictionBackend::MultiLru => e.iter().min_by_key(|x| (x.level, x.used)),
            EvictionBackend::Priority => e.iter().min_by_key(|x| {
                let expired = x.deadline.is_some_and(|d| d <= self.clock_ms);
                let p = if expired {
                    Retention::DEFAULT_PRIORITY
                } else {
                    x.priority
                };
                (p, x.used)
            }),
        };
        pick.map(|x| x.id)
    }
}

fn run(backend: EvictionBackend, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let sketch = Arc::new(FrequencySketch::new(64));
    let clock = Arc::new(ManualClock::default());
    let ctx = PolicyContext {
        sketch: Some(Arc::clone(&sketch)),
        clock: clock.clone(),
    };
    let mut pool = backend.build(CAP as usize, &ctx).unwrap();
    prop_assert_eq!(pool.name(), backend.name());
    let mut model = Model {
        backend,
        entries: Vec::new(),
        clock_ms: 0,
        tick: 0,
    };
    let level_of = |h: u64| multi_lru::level(sketch.estimate(SequenceHash::new(h)));
    for op in ops {
        match op {
            Op::Insert {
                id,
                hash,
                parent,
                priority,
                expiry_ms,
            } => {
                if model.entries.iter().any(|x| x.id == id) {
                    continue;
                }
                let mut retention = Retention::new(priority).unwrap();
                if let Some(ms) = expiry_ms {
                    retention = retention.expiring_after(Duration::from_millis(ms));
                }
                pool.insert(
                    InactiveEntry::new(
                        BlockId::new(id),
                        SequenceHash::new(hash),
                        parent.map(SequenceHash::new),
                    )
                    .with_retention(retention),
                );
                model.tick += 1;
                let expires = expiry_ms.is_some() && priority != Retention::DEFAULT_PRIORITY;
                model.entries.push(Entry {
                    id,
                    hash,
                    parent,
                    priority,
                    deadline: expires.then(|| model.clock_ms + expiry_ms.unwrap_or(0)),
                    inserted: model.tick,
                    used: model.tick,
                    level: level_of(hash),
                });
            }
            Op::Remove(id) => {
                let pos = model.entries.iter().position(|x| x.id == id);
                prop_assert_eq!(pool.remove(BlockId::new(id)), pos.is_some());
                if let Some(p) = pos {
                    model.entries.remove(p);
                }
            }
            Op::Pop => {
                let expected = model.victim();
                prop_assert_eq!(pool.pop_victim().map(BlockId::get), expected);
                model.entries.retain(|x| Some(x.id) != expected);
            }
            Op::Touch(id) => {
                let pos = model.entries.iter().position(|x| x.id == id);
                prop_assert_eq!(pool.touch(BlockId::new(id)), pos.is_some());
                if let Some(p) = pos {
                    model.tick += 1;
                    let x = &mut model.entries[p];
                    x.used = model.tick;
                    x.level = level_of(x.hash);
                }
            }
            Op::Advance(ms) => {
                clock.advance(Duration::from_millis(ms));
                model.clock_ms += ms;
            }
            Op::Access(hash, n) => {
                for _ in 0..n {
                    sketch.increment(SequenceHash::new(hash));
                }
            }
        }
        prop_assert_eq!(pool.len(), model.entries.len());
        prop_assert_eq!(pool.is_empty(), model.entries.is_empty());
        for id in 0..CAP + 2 {
            let present = model.entries.iter().any(|x| x.id == id);
            prop_assert_eq!(pool.contains(BlockId::new(id)), present);
        }
        pool.check_invariants().map_err(TestCaseError::fail)?;
    }
    // Draining returns every member exactly once, in the model's order.
    while let Some(expected) = model.victim() {
        prop_assert_eq!(pool.pop_victim().map(BlockId::get), Some(expected));
        model.entries.retain(|x| x.id != expected);
    }
    prop_assert_eq!(pool.pop_victim(), None);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(384))]

    #[test]
    fn lru_matches_model(ops in prop::collection::vec(op(), 0..150)) {
        run(EvictionBackend::Lru, ops)?;
    }

    #[test]
    fn fifo_matches_model(ops in prop::collection::vec(op(), 0..150)) {
        run(EvictionBackend::Fifo, ops)?;
    }

    #[test]
    fn lineage_matches_model(ops in prop::collection::vec(op(), 0..150)) {
        run(EvictionBackend::Lineage, ops)?;
    }

    #[test]
    fn lineage_matches_model_on_chains(ops in prop::collection::vec(chain_op(), 0..150)) {
        run(EvictionBackend::Lineage, ops)?;
    }

    #[test]
    fn multi_lru_matches_model(ops in prop::collection::vec(op(), 0..150)) {
        run(EvictionBackend::MultiLru, ops)?;
    }

    #[test]
    fn priority_matches_model(ops in prop::collection::vec(op(), 0..150)) {
        run(EvictionBackend::Priority, ops)?;
    }
}

#[test]
fn lineage_keeps_a_chain_until_its_tail_is_gone() {
    // a ← b ← c, released root first (so LRU would evict the root first).
    let mut pool = LineagePool::new(4);
    let h = SequenceHash::new;
    pool.insert(InactiveEntry::new(BlockId::new(0), h(1), None));
    pool.insert(InactiveEntry::new(BlockId::new(1), h(2), Some(h(1))));
    pool.insert(InactiveEntry::new(BlockId::new(2), h(3), Some(h(2))));
    let order: Vec<u32> = std::iter::from_fn(|| pool.pop_victim().map(BlockId::get)).collect();
    assert_eq!(order, vec![2, 1, 0]);
}

#[test]
fn lineage_survives_a_hash_cycle() {
    let mut pool = LineagePool::new(4);
    let h = SequenceHash::new;
    pool.insert(InactiveEntry::new(BlockId::new(0), h(1), Some(h(2))));
    pool.insert(InactiveEntry::new(BlockId::new(1), h(2), Some(h(1))));
    assert_eq!(pool.pop_victim(), Some(BlockId::new(0)));
    assert_eq!(pool.pop_victim(), Some(BlockId::new(1)));
    assert!(pool.check_invariants().is_ok());
}
