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
            EvictionBackend::Arc | EvictionBackend::S3Fifo | EvictionBackend::Adaptive => {
                unreachable!("stateful backends have their own models below")
            }
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

// ---------------------------------------------------------------------------------------
// Stateful backends (ARC, S3-FIFO, adaptive): a reference model per backend, written with
// plain vectors and linear scans, driven by the same operations.

/// A backend's rule, restated plainly.
trait Reference {
    fn insert(&mut self, id: u32, hash: u64, parent: Option<u64>, class: u8);
    fn remove(&mut self, id: u32) -> bool;
    fn pop(&mut self) -> Option<u32>;
    fn touch(&mut self, id: u32, class: u8) -> bool;
    fn members(&self) -> Vec<u32>;
}

fn vec_remove<T: PartialEq>(v: &mut Vec<T>, x: &T) -> bool {
    match v.iter().position(|y| y == x) {
        Some(p) => {
            v.remove(p);
            true
        }
        None => false,
    }
}

/// Ghost lists as vectors: drop `hash` anywhere, then append it to `list`; when all lists
/// together hold `cap` hashes, `list`'s oldest (else the first non-empty list's) goes first.
fn ghost_push(lists: &mut [&mut Vec<u64>], list: usize, hash: u64, cap: usize) {
    for l in lists.iter_mut() {
        vec_remove(l, &hash);
    }
    if lists.iter().map(|l| l.len()).sum::<usize>() >= cap {
        if !lists[list].is_empty() {
            lists[list].remove(0);
        } else if let Some(l) = lists.iter_mut().find(|l| !l.is_empty()) {
            l.remove(0);
        }
    }
    lists[list].push(hash);
}

#[derive(Default)]
struct ArcModel {
    cap: usize,
    t1: Vec<u32>,
    t2: Vec<u32>,
    b1: Vec<u64>,
    b2: Vec<u64>,
    p: usize,
    hashes: std::collections::HashMap<u32, u64>,
    resident: std::collections::HashSet<u32>,
}

impl Reference for ArcModel {
    fn insert(&mut self, id: u32, hash: u64, _: Option<u64>, _: u8) {
        let hit = self.resident.remove(&id) && self.hashes.get(&id) == Some(&hash);
        self.hashes.insert(id, hash);
        if hit {
            self.t2.push(id);
        } else if self.b1.contains(&hash) {
            let delta = (self.b2.len() / self.b1.len()).max(1);
            self.p = (self.p + delta).min(self.cap);
            vec_remove(&mut self.b1, &hash);
            self.t2.push(id);
        } else if self.b2.contains(&hash) {
            let delta = (self.b1.len() / self.b2.len()).max(1);
            self.p = self.p.saturating_sub(delta);
            vec_remove(&mut self.b2, &hash);
            self.t2.push(id);
        } else {
            self.t1.push(id);
        }
    }
    fn remove(&mut self, id: u32) -> bool {
        let found = vec_remove(&mut self.t1, &id) || vec_remove(&mut self.t2, &id);
        if found {
            self.resident.insert(id);
        }
        found
    }
    fn pop(&mut self) -> Option<u32> {
        let from_t1 = !self.t1.is_empty() && (self.t1.len() > self.p || self.t2.is_empty());
        let victim = if from_t1 {
            let v = self.t1.remove(0);
            if self.t1.len() + self.b1.len() >= self.cap && !self.b1.is_empty() {
                self.b1.remove(0);
            }
            v
        } else if !self.t2.is_empty() {
            self.t2.remove(0)
        } else {
            return None;
        };
        let hash = self.hashes[&victim];
        let list = usize::from(!from_t1);
        ghost_push(&mut [&mut self.b1, &mut self.b2], list, hash, self.cap);
        Some(victim)
    }
    fn touch(&mut self, id: u32, _: u8) -> bool {
        let found = vec_remove(&mut self.t1, &id) || vec_remove(&mut self.t2, &id);
        if found {
            self.t2.push(id);
        }
        found
    }
    fn members(&self) -> Vec<u32> {
        self.t1.iter().chain(&self.t2).copied().collect()
    }
}

#[derive(Default)]
struct S3Model {
    cap: usize,
    small: Vec<u32>,
    main: Vec<u32>,
    ghost: Vec<u64>,
    freq: std::collections::HashMap<u32, u8>,
    hashes: std::collections::HashMap<u32, u64>,
    /// Ids out of the pool but still cached, and the queue they were in (0 small, 1 main).
    away: std::collections::HashMap<u32, u8>,
}

impl Reference for S3Model {
    fn insert(&mut self, id: u32, hash: u64, _: Option<u64>, _: u8) {
        let back = self
            .away
            .remove(&id)
            .filter(|_| self.hashes.get(&id) == Some(&hash));
        match back {
            Some(queue) => {
                let f = self.freq.entry(id).or_default();
                *f = (*f + 1).min(3);
                if queue == 0 {
                    self.small.push(id);
                } else {
                    self.main.push(id);
                }
            }
            None => {
                self.hashes.insert(id, hash);
                self.freq.insert(id, 0);
                if vec_remove(&mut self.ghost, &hash) {
                    self.main.push(id);
                } else {
                    self.small.push(id);
                }
            }
        }
    }
    fn remove(&mut self, id: u32) -> bool {
        if vec_remove(&mut self.small, &id) {
            self.away.insert(id, 0);
            true
        } else if vec_remove(&mut self.main, &id) {
            self.away.insert(id, 1);
            true
        } else {
            false
        }
    }
    fn pop(&mut self) -> Option<u32> {
        loop {
            let (s, m) = (self.small.len(), self.main.len());
            if s + m == 0 {
                return None;
            }
            if s > 0 && (s * 10 >= s + m || m == 0) {
                let id = self.small.remove(0);
                if self.freq[&id] > 0 {
                    self.freq.insert(id, 0);
                    self.main.push(id);
                    continue;
                }
                let hash = self.hashes[&id];
                ghost_push(&mut [&mut self.ghost], 0, hash, self.cap);
                return Some(id);
            }
            let id = self.main.remove(0);
            if self.freq[&id] > 0 {
                *self.freq.get_mut(&id).unwrap() -= 1;
                self.main.push(id);
                continue;
            }
            return Some(id);
        }
    }
    fn touch(&mut self, id: u32, _: u8) -> bool {
        let found = self.small.contains(&id) || self.main.contains(&id);
        if found {
            let f = self.freq.get_mut(&id).unwrap();
            *f = (*f + 1).min(3);
        }
        found
    }
    fn members(&self) -> Vec<u32> {
        self.small.iter().chain(&self.main).copied().collect()
    }
}

/// The tuner, restated: one vector cache per candidate weight (victim: the smallest
/// `stamp + bonus(class)`), every sampled use accessed in each; every `2 × entries` uses the
/// candidate with the most hits wins if it beats the first (recency) by the margin; hits
/// halve.
struct TunerModel {
    entries: usize,
    caches: Vec<Vec<(u64, u8, u64)>>,
    hits: Vec<u64>,
    now: u64,
    choice: usize,
}

impl TunerModel {
    fn new(entries: usize) -> Self {
        Self {
            entries,
            caches: vec![Vec::new(); tuner::WEIGHTS.len()],
            hits: vec![0; tuner::WEIGHTS.len()],
            now: 0,
            choice: 0,
        }
    }
    fn observe(&mut self, hash: u64, class: u8) {
        self.now += 1;
        for (k, cache) in self.caches.iter_mut().enumerate() {
            let w = tuner::WEIGHTS[k];
            if let Some(p) = cache.iter().position(|e| e.0 == hash) {
                self.hits[k] += 1;
                cache.remove(p);
            } else if cache.len() >= self.entries {
                let victim = (0..cache.len())
                    .min_by_key(|&i| cache[i].2 + tuner::bonus(w, self.entries, cache[i].1))
                    .unwrap();
                cache.remove(victim);
            }
            cache.push((hash, class, self.now));
        }
        if self.now.is_multiple_of(2 * self.entries as u64) {
            let (mut best, mut most) = (0, self.hits[0]);
            for (k, &h) in self.hits.iter().enumerate() {
                if h > most {
                    (best, most) = (k, h);
                }
            }
            let margin = 100 + tuner::MARGIN_PERCENT;
            self.choice = if most * 100 > self.hits[0] * margin {
                best
            } else {
                0
            };
            self.hits.iter_mut().for_each(|h| *h /= 2);
        }
    }
    fn weight(&self) -> u64 {
        tuner::WEIGHTS[self.choice]
    }
}

/// Adaptive: among leaves (no member names the block's hash as parent), the smallest
/// `stamp + bonus(class)`, stamps breaking ties; with no leaf, the oldest member.
struct AdaptiveModel {
    cap: usize,
    entries: Vec<Entry>,
    tick: u64,
    tuner: TunerModel,
}

impl Reference for AdaptiveModel {
    fn insert(&mut self, id: u32, hash: u64, parent: Option<u64>, class: u8) {
        self.tuner.observe(hash, class);
        self.tick += 1;
        self.entries.push(Entry {
            id,
            hash,
            parent,
            priority: 0,
            deadline: None,
            inserted: self.tick,
            used: self.tick,
            level: class,
        });
    }
    fn remove(&mut self, id: u32) -> bool {
        let pos = self.entries.iter().position(|x| x.id == id);
        if let Some(p) = pos {
            self.entries.remove(p);
        }
        pos.is_some()
    }
    fn pop(&mut self) -> Option<u32> {
        let e = &self.entries;
        let w = self.tuner.weight();
        let is_leaf = |x: &Entry| !e.iter().any(|y| y.parent == Some(x.hash));
        let victim = e
            .iter()
            .filter(|x| is_leaf(x))
            .min_by_key(|x| (x.used + tuner::bonus(w, self.cap, x.level), x.used))
            .or_else(|| e.iter().min_by_key(|x| x.used))
            .map(|x| x.id)?;
        self.remove(victim);
        Some(victim)
    }
    fn touch(&mut self, id: u32, class: u8) -> bool {
        let Some(p) = self.entries.iter().position(|x| x.id == id) else {
            return false;
        };
        let hash = self.entries[p].hash;
        self.tuner.observe(hash, class);
        self.tick += 1;
        let x = &mut self.entries[p];
        x.used = self.tick;
        x.level = class;
        true
    }
    fn members(&self) -> Vec<u32> {
        self.entries.iter().map(|x| x.id).collect()
    }
}

fn run_reference(
    backend: EvictionBackend,
    mut model: impl Reference,
    ops: Vec<Op>,
) -> Result<(), TestCaseError> {
    let sketch = Arc::new(FrequencySketch::new(64));
    let ctx = PolicyContext {
        sketch: Some(Arc::clone(&sketch)),
        clock: Arc::new(ManualClock::default()),
    };
    let mut pool = backend.build(CAP as usize, &ctx).unwrap();
    prop_assert_eq!(pool.name(), backend.name());
    let class = |h: u64| adaptive::class_of(sketch.estimate(SequenceHash::new(h)));
    let mut hashes = std::collections::HashMap::new();
    for op in ops {
        match op {
            Op::Insert {
                id, hash, parent, ..
            } => {
                if model.members().contains(&id) {
                    continue;
                }
                // As the manager does: a use is counted before the block enters the pool.
                sketch.increment(SequenceHash::new(hash));
                hashes.insert(id, hash);
                model.insert(id, hash, parent, class(hash));
                pool.insert(InactiveEntry::new(
                    BlockId::new(id),
                    SequenceHash::new(hash),
                    parent.map(SequenceHash::new),
                ));
            }
            Op::Remove(id) => {
                prop_assert_eq!(pool.remove(BlockId::new(id)), model.remove(id));
            }
            Op::Pop => {
                prop_assert_eq!(pool.pop_victim().map(BlockId::get), model.pop());
            }
            Op::Touch(id) => {
                let c = hashes.get(&id).map_or(0, |&h| class(h));
                prop_assert_eq!(pool.touch(BlockId::new(id)), model.touch(id, c));
            }
            Op::Advance(_) => {}
            Op::Access(hash, n) => {
                for _ in 0..n {
                    sketch.increment(SequenceHash::new(hash));
                }
            }
        }
        let members = model.members();
        prop_assert_eq!(pool.len(), members.len());
        for id in 0..CAP + 2 {
            prop_assert_eq!(pool.contains(BlockId::new(id)), members.contains(&id));
        }
        pool.check_invariants().map_err(TestCaseError::fail)?;
    }
    loop {
        let expected = model.pop();
        prop_assert_eq!(pool.pop_victim().map(BlockId::get), expected);
        if expected.is_none() {
            break;
        }
    }
    Ok(())
}

fn arc_model() -> ArcModel {
    ArcModel {
        cap: CAP as usize,
        ..Default::default()
    }
}

fn s3_model() -> S3Model {
    S3Model {
        cap: CAP as usize,
        ..Default::default()
    }
}

fn adaptive_model() -> AdaptiveModel {
    AdaptiveModel {
        cap: CAP as usize,
        entries: Vec::new(),
        tick: 0,
        tuner: TunerModel::new(CAP as usize),
    }
}

/// Reuse-heavy operations: few hashes, blocks coming back after leaving (the ghost and
/// resident paths), chains.
fn reuse_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0..CAP, 0..4u64, prop::option::weighted(0.5, 0..4u64)).prop_map(|(id, hash, parent)| Op::Insert {
            id,
            hash,
            parent,
            priority: 35,
            expiry_ms: None,
        }),
        2 => (0..CAP).prop_map(Op::Remove),
        3 => Just(Op::Pop),
        2 => (0..CAP).prop_map(Op::Touch),
        1 => (0..4u64, 1u8..4).prop_map(|(h, n)| Op::Access(h, n)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(384))]

    #[test]
    fn arc_matches_model(ops in prop::collection::vec(op(), 0..200)) {
        run_reference(EvictionBackend::Arc, arc_model(), ops)?;
    }

    #[test]
    fn arc_matches_model_on_reuse(ops in prop::collection::vec(reuse_op(), 0..200)) {
        run_reference(EvictionBackend::Arc, arc_model(), ops)?;
    }

    #[test]
    fn s3fifo_matches_model(ops in prop::collection::vec(op(), 0..200)) {
        run_reference(EvictionBackend::S3Fifo, s3_model(), ops)?;
    }

    #[test]
    fn s3fifo_matches_model_on_reuse(ops in prop::collection::vec(reuse_op(), 0..200)) {
        run_reference(EvictionBackend::S3Fifo, s3_model(), ops)?;
    }

    #[test]
    fn adaptive_matches_model(ops in prop::collection::vec(op(), 0..300)) {
        run_reference(EvictionBackend::Adaptive, adaptive_model(), ops)?;
    }

    #[test]
    fn adaptive_matches_model_on_chains(ops in prop::collection::vec(chain_op(), 0..300)) {
        run_reference(EvictionBackend::Adaptive, adaptive_model(), ops)?;
    }

    #[test]
    fn adaptive_matches_model_on_reuse(ops in prop::collection::vec(reuse_op(), 0..300)) {
        run_reference(EvictionBackend::Adaptive, adaptive_model(), ops)?;
    }
}

/// The miniatures do move the weight in these model runs (else the model tests above would
/// only ever check weight 0): a scan of one-off hashes through a pool while a few hashes are
/// reused and counted often.
#[test]
fn adaptive_weight_moves_and_the_model_follows() {
    let mut ops = Vec::new();
    let mut fresh = 100u64;
    for _ in 0..60u32 {
        for hot in 0..3u64 {
            ops.push(Op::Access(hot, 3));
            ops.push(Op::Insert {
                id: hot as u32,
                hash: hot,
                parent: None,
                priority: 35,
                expiry_ms: None,
            });
        }
        // A scan of 20 one-off hashes: more than the 12-entry miniatures hold, so recency
        // loses the hot hashes every round.
        for k in 0..20u32 {
            let id = 3 + k % 9;
            ops.push(Op::Remove(id));
            ops.push(Op::Insert {
                id,
                hash: fresh,
                parent: None,
                priority: 35,
                expiry_ms: None,
            });
            fresh += 1;
        }
        ops.push(Op::Pop);
        for hot in 0..3u32 {
            ops.push(Op::Remove(hot));
        }
    }
    run_reference(EvictionBackend::Adaptive, adaptive_model(), ops.clone()).unwrap();
    let mut model = adaptive_model();
    let sketch = FrequencySketch::new(64);
    for op in ops {
        match op {
            Op::Access(h, n) => (0..n).for_each(|_| sketch.increment(SequenceHash::new(h))),
            Op::Insert { id, hash, .. } => {
                if !model.members().contains(&id) {
                    sketch.increment(SequenceHash::new(hash));
                    let c = adaptive::class_of(sketch.estimate(SequenceHash::new(hash)));
                    model.insert(id, hash, None, c);
                }
            }
            Op::Pop => {
                model.pop();
            }
            Op::Remove(id) => {
                model.remove(id);
            }
            Op::Touch(_) | Op::Advance(_) => {}
        }
    }
    assert_ne!(
        model.tuner.weight(),
        0,
        "the scenario should reward frequency"
    );
}

/// `requeue` against what it stands for, `remove` then `insert` of the same entry: two pools
/// of one backend take the same operations, one of them requeueing where the other removes
/// and inserts; every victim, and the final order of all members, must agree. Checks the
/// in-place overrides (LRU, FIFO, lineage) and that the default is what it says.
fn requeue_is_remove_and_insert(
    backend: EvictionBackend,
    ops: Vec<(Op, bool)>,
) -> Result<(), TestCaseError> {
    let ctx = PolicyContext {
        sketch: Some(Arc::new(FrequencySketch::new(64))),
        clock: Arc::new(ManualClock::default()),
    };
    let mut a = backend.build(CAP as usize, &ctx).unwrap();
    let mut b = backend.build(CAP as usize, &ctx).unwrap();
    let mut members: std::collections::HashMap<u32, InactiveEntry> = Default::default();
    for (op, requeue) in ops {
        match op {
            Op::Insert {
                id, hash, parent, ..
            } => {
                if members.contains_key(&id) {
                    continue;
                }
                let e = InactiveEntry::new(
                    BlockId::new(id),
                    SequenceHash::new(hash),
                    parent.map(SequenceHash::new),
                );
                a.insert(e);
                b.insert(e);
                members.insert(id, e);
            }
            Op::Remove(id) => {
                prop_assert_eq!(a.remove(BlockId::new(id)), b.remove(BlockId::new(id)));
                members.remove(&id);
            }
            Op::Pop => {
                let v = a.pop_victim();
                prop_assert_eq!(v, b.pop_victim());
                if let Some(v) = v {
                    members.remove(&v.get());
                }
            }
            Op::Touch(id) => match members.get(&id) {
                // A member used: requeued in `a`, removed and inserted in `b`.
                Some(&e) if requeue => {
                    a.requeue(e);
                    b.remove(e.id);
                    b.insert(e);
                }
                _ => prop_assert_eq!(a.touch(BlockId::new(id)), b.touch(BlockId::new(id))),
            },
            Op::Advance(_) | Op::Access(..) => {}
        }
        prop_assert_eq!(a.len(), b.len());
        a.check_invariants().map_err(TestCaseError::fail)?;
    }
    let (mut va, mut vb) = (Vec::new(), Vec::new());
    while let Some(v) = a.pop_victim() {
        va.push(v);
    }
    while let Some(v) = b.pop_victim() {
        vb.push(v);
    }
    prop_assert_eq!(va, vb);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn requeue_is_a_removal_and_an_insertion(
        ops in prop::collection::vec((op(), any::<bool>()), 0..120),
        chains in prop::collection::vec((chain_op(), any::<bool>()), 0..120),
    ) {
        for backend in EvictionBackend::ALL {
            requeue_is_remove_and_insert(backend, ops.clone())?;
            requeue_is_remove_and_insert(backend, chains.clone())?;
        }
    }
}
