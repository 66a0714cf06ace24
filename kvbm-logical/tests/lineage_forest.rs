//! The lineage pool against a plain reference model on long traces that exercise its fast
//! paths: a chain continued by the next insertion (its parent found without a table lookup),
//! the hash index's deletions (hashes dropped and re-added, several keys per home slot),
//! duplicates, self-cycles and cycles of parent hashes, removal of the member just inserted.

use kvbm_logical::policy::{InactiveEntry, InactivePool, LineagePool};
use kvbm_logical::{BlockId, SequenceHash};
use proptest::prelude::*;

const CAPACITY: u32 = 24;

/// Leaf-first LRU, by brute force: a leaf is a member whose hash no member names as its
/// parent; the victim is the least recently inserted or touched leaf, or, with no leaf (a
/// cycle), the least recent member.
#[derive(Default)]
struct Model {
    /// (id, hash, parent, stamp)
    members: Vec<(u32, u64, Option<u64>, u64)>,
    clock: u64,
}

impl Model {
    fn insert(&mut self, id: u32, hash: u64, parent: Option<u64>) {
        self.clock += 1;
        self.members.push((id, hash, parent, self.clock));
    }

    fn remove(&mut self, id: u32) -> bool {
        let before = self.members.len();
        self.members.retain(|m| m.0 != id);
        before != self.members.len()
    }

    fn touch(&mut self, id: u32) -> bool {
        self.clock += 1;
        let clock = self.clock;
        self.members
            .iter_mut()
            .find(|m| m.0 == id)
            .map(|m| m.3 = clock)
            .is_some()
    }

    fn pop(&mut self) -> Option<u32> {
        let is_leaf = |hash: u64| !self.members.iter().any(|m| m.2 == Some(hash));
        let victim = self
            .members
            .iter()
            .filter(|m| is_leaf(m.1))
            .min_by_key(|m| m.3)
            .or_else(|| self.members.iter().min_by_key(|m| m.3))
            .map(|m| m.0)?;
        self.remove(victim);
        Some(victim)
    }
}

#[derive(Clone, Debug)]
enum Op {
    /// A block with hash `hash` and the parent picked by `parent`: 0 none, 1 the previous
    /// insertion's hash (a chain continued), 2 its own hash (a self-cycle), else `parent`.
    Insert {
        id: u32,
        hash: u64,
        parent: u64,
    },
    /// `len` blocks of a fresh or reused chain released head first, continuing the previous
    /// insertion's hash when `cont`.
    Chain {
        id: u32,
        len: u32,
        base: u64,
        cont: bool,
    },
    Remove(u32),
    Pop(u8),
    Touch(u32),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..CAPACITY, 0u64..16, 0u64..20).prop_map(|(id, hash, parent)| Op::Insert { id, hash, parent }),
        3 => (0..CAPACITY, 1u32..10, 0u64..40, any::<bool>())
            .prop_map(|(id, len, base, cont)| Op::Chain { id, len, base: base * 8, cont }),
        2 => (0..CAPACITY).prop_map(Op::Remove),
        3 => (1u8..6).prop_map(Op::Pop),
        1 => (0..CAPACITY).prop_map(Op::Touch),
    ]
}

struct Run {
    pool: LineagePool,
    model: Model,
    last: Option<u64>,
}

impl Run {
    /// An empty pool of `CAPACITY` blocks and its model.
    fn new() -> Self {
        Self {
            pool: LineagePool::new(CAPACITY as usize),
            model: Model::default(),
            last: None,
        }
    }

    fn insert(&mut self, id: u32, hash: u64, parent: Option<u64>) -> Result<(), TestCaseError> {
        let block = BlockId::new(id);
        if self.pool.contains(block) {
            return Ok(());
        }
        let entry = InactiveEntry::new(
            block,
            SequenceHash::new(hash),
            parent.map(SequenceHash::new),
        );
        self.pool.insert(entry);
        self.model.insert(id, hash, parent);
        self.last = Some(hash);
        self.check()
    }

    fn check(&self) -> Result<(), TestCaseError> {
        self.pool.check_invariants().map_err(TestCaseError::fail)?;
        prop_assert_eq!(self.pool.len(), self.model.members.len());
        Ok(())
    }

    fn apply(&mut self, op: Op) -> Result<(), TestCaseError> {
        match op {
            Op::Insert { id, hash, parent } => {
                let parent = match parent {
                    0 => None,
                    1 => self.last,
                    2 => Some(hash),
                    p => Some(p),
                };
                self.insert(id, hash, parent)?;
            }
            Op::Chain {
                id,
                len,
                base,
                cont,
            } => {
                let mut parent = if cont { self.last } else { None };
                for i in 0..len {
                    let hash = 1000 + base + u64::from(i);
                    self.insert((id + i) % CAPACITY, hash, parent)?;
                    parent = Some(hash);
                }
            }
            Op::Remove(id) => {
                prop_assert_eq!(self.pool.remove(BlockId::new(id)), self.model.remove(id));
                self.check()?;
            }
            Op::Pop(n) => {
                for _ in 0..n {
                    let got = self.pool.pop_victim().map(BlockId::get);
                    prop_assert_eq!(got, self.model.pop());
                    self.check()?;
                }
            }
            Op::Touch(id) => {
                prop_assert_eq!(self.pool.touch(BlockId::new(id)), self.model.touch(id));
                self.check()?;
            }
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn lineage_matches_the_model_on_long_traces(ops in prop::collection::vec(op(), 200..600)) {
        let mut run = Run::new();
        for op in ops {
            run.apply(op)?;
        }
        // Drain: every member leaves in the model's order.
        while let Some(id) = run.model.pop() {
            prop_assert_eq!(run.pool.pop_victim(), Some(BlockId::new(id)));
        }
        prop_assert_eq!(run.pool.pop_victim(), None);
        run.check()?;
    }
}

/// A chain released head first, evicted from its tail, many times over in a full pool: each
/// hash is added to and dropped from the index once per pass, in the pattern the fast paths
/// serve, and the victims are the model's.
#[test]
fn chains_through_a_full_pool_match_the_model() {
    let mut run = Run::new();
    let mut next = 1u64;
    for pass in 0..200u32 {
        let len = 1 + pass % 7;
        let mut parent = (pass % 3 == 0).then_some(next.wrapping_sub(1));
        for _ in 0..len {
            if run.pool.len() == CAPACITY as usize {
                let victim = run.pool.pop_victim().map(BlockId::get);
                assert_eq!(victim, run.model.pop());
            }
            let id = (0..CAPACITY)
                .find(|&i| !run.pool.contains(BlockId::new(i)))
                .expect("a free id");
            run.insert(id, next, parent).unwrap();
            parent = Some(next);
            next += 1;
        }
    }
}

/// A prefix taken out of the pool head first and put back (as a match and a release do),
/// while fresh blocks continue it and evictions make room: the hashes whose last child
/// leaves while they are out wait in the pool's ring of emptied records, wrap it, and come
/// back; the victims are the model's.
#[test]
fn prefixes_taken_out_and_put_back_match_the_model() {
    let mut run = Run::new();
    let mut next = 10_000u64;
    for round in 0..300u32 {
        // A prefix of 4–11 blocks, one of three, on ids 0..12 (out of the pool meanwhile).
        let base = 100 * u64::from(round % 3);
        let len = 4 + round % 8;
        for i in 0..len {
            run.pool.remove(BlockId::new(i));
            run.model.remove(i);
        }
        run.check().unwrap();
        let mut parent = None;
        for i in 0..len {
            run.insert(i, base + u64::from(i), parent).unwrap();
            parent = Some(base + u64::from(i));
        }
        // Two fresh blocks continuing it, on ids 12.., evicting until one is free.
        for _ in 0..2 {
            let free = |run: &Run| (12..CAPACITY).find(|&i| !run.pool.contains(BlockId::new(i)));
            while free(&run).is_none() {
                assert_eq!(run.pool.pop_victim().map(BlockId::get), run.model.pop());
            }
            let id = free(&run).expect("one is free");
            run.insert(id, next, parent).unwrap();
            parent = Some(next);
            next += 1;
        }
    }
}
