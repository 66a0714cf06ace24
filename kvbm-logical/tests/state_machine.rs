//! Model-based property test of the whole block lifecycle.
//!
//! Random sequences of allocate / stage / unstage / register / clone / drop / batch release
//! (on another thread) / downgrade / upgrade / match / scan / touch / reset run against a
//! `BlockManager` and against a plain model written for clarity, not speed. After every step
//! the test checks that the manager agrees with the model exactly: which block ids an
//! allocation hands out and which hashes it evicts (so the LRU order), which blocks a match or
//! a scan returns and that they carry the hashes asked for, every count in `PoolCounts`, the
//! reference count of every held block, and the store's own `check_invariants` (every block
//! in exactly one place, `reset + inactive + in-flight == total`).
//!
//! Also covered: "do not cache" registrations (`reset_on_release`: the block leaves the cache
//! when its last owner drops it, unless a cacheable registration was deduplicated onto it), `purge_blocks` (held blocks are detached from the registry
//! and reset on their last release) and `evict_inactive` (the LRU victims, never a free block).
//!
//! Both duplication policies are covered. Hashes come from a small space so that duplicates,
//! re-registrations and stale weak handles are common. A scan without `touch` is modelled as
//! side-effect free: an inactive hit stays in the eviction order where it was (held, so
//! skipped by eviction) and is inactive there again once released.

use std::collections::{HashMap, HashSet};

use kvbm_logical::{
    AllocationError, BlockDuplicationPolicy, BlockManager, CompleteBlock, Device, EvictionBackend,
    ImmutableBlock, MutableBlock, RemovalReason, ResetError, SequenceHash, WeakBlock,
};
use proptest::prelude::*;

const TOTAL: usize = 8;
const BLOCK_SIZE: usize = 4;
const HASHES: u64 = 10;

#[derive(Clone, Debug)]
enum Op {
    Allocate(usize),
    Stage {
        i: usize,
        hash: u64,
        wrong_size: bool,
    },
    DropMutable(usize),
    DropComplete(usize),
    Unstage(usize),
    Register {
        count: usize,
        one_by_one: bool,
        no_cache: bool,
    },
    Clone(usize),
    DropImmutable(usize),
    ReleaseOnThread(usize),
    Downgrade(usize),
    Upgrade(usize),
    DropWeak(usize),
    Match(Vec<u64>),
    Scan(Vec<u64>, bool),
    Touch(Vec<u64>),
    Reset,
    Purge(Vec<u64>),
    EvictInactive(usize),
}

fn hashes() -> impl Strategy<Value = Vec<u64>> {
    prop::collection::vec(0..HASHES, 0..6)
}

fn op() -> impl Strategy<Value = Op> {
    let i = any::<usize>();
    prop_oneof![
        4 => (0..=TOTAL / 2 + 1).prop_map(Op::Allocate),
        4 => (i, 0..HASHES, prop::bool::weighted(0.1))
            .prop_map(|(i, hash, wrong_size)| Op::Stage { i, hash, wrong_size }),
        1 => i.prop_map(Op::DropMutable),
        1 => i.prop_map(Op::DropComplete),
        1 => i.prop_map(Op::Unstage),
        4 => (1..4usize, any::<bool>(), prop::bool::weighted(0.2))
            .prop_map(|(count, one_by_one, no_cache)| Op::Register { count, one_by_one, no_cache }),
        2 => i.prop_map(Op::Clone),
        3 => i.prop_map(Op::DropImmutable),
        1 => (0..5usize).prop_map(Op::ReleaseOnThread),
        2 => i.prop_map(Op::Downgrade),
        2 => i.prop_map(Op::Upgrade),
        1 => i.prop_map(Op::DropWeak),
        3 => hashes().prop_map(Op::Match),
        2 => (hashes(), any::<bool>()).prop_map(|(h, t)| Op::Scan(h, t)),
        1 => hashes().prop_map(Op::Touch),
        1 => Just(Op::Reset),
        1 => hashes().prop_map(Op::Purge),
        1 => (0..4usize).prop_map(Op::EvictInactive),
    ]
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    Reset,
    Mutable,
    Staged(u64),
    /// `in_pool`: found by a scan without `touch`, still in `inactive` at its old place.
    Active {
        hash: u64,
        refs: u32,
        in_pool: bool,
    },
    Inactive(u64),
}

/// The specification, executable.
struct Model {
    policy: BlockDuplicationPolicy,
    slots: Vec<Slot>,
    /// Free ids; the last one is handed out first.
    reset: Vec<u32>,
    /// Inactive ids, least recently used first; also the held ones a scan left in place.
    inactive: Vec<u32>,
    /// Hash → registered ids, the one `match_blocks` returns first, then the newest duplicate
    /// to the oldest.
    registry: HashMap<u64, Vec<u32>>,
    /// Registered "do not cache": reset on the last release.
    no_cache: HashSet<u32>,
    /// Held blocks purged from the registry: reset on the last release.
    detached: HashSet<u32>,
}

impl Model {
    fn new(policy: BlockDuplicationPolicy) -> Self {
        Self {
            policy,
            slots: vec![Slot::Reset; TOTAL],
            reset: (0..TOTAL as u32).rev().collect(),
            inactive: Vec::new(),
            registry: HashMap::new(),
            no_cache: HashSet::new(),
            detached: HashSet::new(),
        }
    }

    /// Truly inactive blocks (not the held ones left in place).
    fn inactive_count(&self) -> usize {
        self.inactive
            .iter()
            .filter(|&&id| matches!(self.slots[id as usize], Slot::Inactive(_)))
            .count()
    }

    fn available(&self) -> usize {
        self.reset.len() + self.inactive_count()
    }

    /// The LRU victim; held blocks left in place are passed over (they leave the order).
    fn pop_victim(&mut self) -> u32 {
        loop {
            let id = self.inactive.remove(0);
            match &mut self.slots[id as usize] {
                Slot::Active { in_pool, .. } => *in_pool = false,
                _ => return id,
            }
        }
    }

    /// Ids handed out and hashes evicted, or the available count.
    fn allocate(&mut self, n: usize) -> Result<(Vec<u32>, Vec<u64>), usize> {
        if n > self.available() {
            return Err(self.available());
        }
        let mut ids = Vec::new();
        let mut evicted = Vec::new();
        for _ in 0..n {
            let id = match self.reset.pop() {
                Some(id) => id,
                None => {
                    let id = self.pop_victim();
                    if let Some(gone) = self.unregister(id) {
                        evicted.push(gone);
                    }
                    id
                }
            };
            self.slots[id as usize] = Slot::Mutable;
            ids.push(id);
        }
        Ok((ids, evicted))
    }

    /// Removes `id` from its hash's list; the hash if that was its last copy.
    fn unregister(&mut self, id: u32) -> Option<u64> {
        let hash = match self.slots[id as usize] {
            Slot::Active { hash, .. } | Slot::Inactive(hash) => hash,
            other => panic!("unregister of {other:?}"),
        };
        let list = self.registry.get_mut(&hash).expect("registered");
        list.retain(|&x| x != id);
        if list.is_empty() {
            self.registry.remove(&hash);
            Some(hash)
        } else {
            None
        }
    }

    /// An acquisition that counts as a use: the block leaves the eviction order.
    fn acquire(&mut self, id: u32) {
        let slot = &mut self.slots[id as usize];
        match *slot {
            Slot::Active { hash, refs, .. } => {
                *slot = Slot::Active {
                    hash,
                    refs: refs + 1,
                    in_pool: false,
                };
            }
            Slot::Inactive(hash) => {
                *slot = Slot::Active {
                    hash,
                    refs: 1,
                    in_pool: false,
                };
            }
            other => panic!("acquire of {other:?}"),
        }
        self.inactive.retain(|&x| x != id);
    }

    /// A scan without `touch`: the block keeps its place in the eviction order.
    fn acquire_in_place(&mut self, id: u32) {
        let slot = &mut self.slots[id as usize];
        match *slot {
            Slot::Active { ref mut refs, .. } => *refs += 1,
            Slot::Inactive(hash) => {
                *slot = Slot::Active {
                    hash,
                    refs: 1,
                    in_pool: true,
                };
            }
            other => panic!("acquire of {other:?}"),
        }
    }

    fn release(&mut self, id: u32) {
        let slot = &mut self.slots[id as usize];
        let Slot::Active {
            hash,
            refs,
            in_pool,
        } = *slot
        else {
            panic!("release of {slot:?}");
        };
        if refs == 1 && (self.no_cache.contains(&id) || self.detached.contains(&id)) {
            if in_pool {
                self.inactive.retain(|&x| x != id);
            }
            if !self.detached.remove(&id) {
                self.unregister(id);
            }
            self.no_cache.remove(&id);
            self.slots[id as usize] = Slot::Reset;
            self.reset.push(id);
        } else if refs == 1 {
            *slot = Slot::Inactive(hash);
            if !in_pool {
                self.inactive.push(id);
            }
        } else {
            *slot = Slot::Active {
                hash,
                refs: refs - 1,
                in_pool,
            };
        }
    }

    fn release_mutable(&mut self, id: u32) {
        assert!(matches!(
            self.slots[id as usize],
            Slot::Mutable | Slot::Staged(_)
        ));
        self.slots[id as usize] = Slot::Reset;
        self.reset.push(id);
    }

    /// The id the caller holds afterwards.
    fn register(&mut self, id: u32, no_cache: bool) -> u32 {
        let held = self.register_plain(id);
        if no_cache && held == id {
            self.no_cache.insert(id);
        } else if !no_cache {
            // A cacheable registration deduplicated onto a do-not-cache block makes it
            // cacheable (the block keeps what the later caller asked of the cache too).
            self.no_cache.remove(&held);
        }
        held
    }

    fn register_plain(&mut self, id: u32) -> u32 {
        let Slot::Staged(hash) = self.slots[id as usize] else {
            panic!("register of unstaged {id}");
        };
        match self.registry.get_mut(&hash) {
            None => {
                self.registry.insert(hash, vec![id]);
                self.slots[id as usize] = Slot::Active {
                    hash,
                    refs: 1,
                    in_pool: false,
                };
                id
            }
            Some(list) => match self.policy {
                BlockDuplicationPolicy::Reject => {
                    let head = list[0];
                    self.acquire(head);
                    self.release_mutable(id);
                    head
                }
                _ => {
                    list.insert(1, id);
                    self.slots[id as usize] = Slot::Active {
                        hash,
                        refs: 1,
                        in_pool: false,
                    };
                    id
                }
            },
        }
    }

    fn lookup(&mut self, hash: u64) -> Option<u32> {
        let head = *self.registry.get(&hash)?.first()?;
        self.acquire(head);
        Some(head)
    }

    fn lookup_in_place(&mut self, hash: u64) -> Option<u32> {
        let head = *self.registry.get(&hash)?.first()?;
        self.acquire_in_place(head);
        Some(head)
    }

    fn touch(&mut self, hash: u64) -> bool {
        let Some(&head) = self.registry.get(&hash).and_then(|l| l.first()) else {
            return false;
        };
        if !matches!(self.slots[head as usize], Slot::Inactive(_)) {
            return false;
        }
        match self.inactive.iter().position(|&x| x == head) {
            Some(pos) => {
                self.inactive.remove(pos);
                self.inactive.push(head);
                true
            }
            None => false,
        }
    }

    fn reset_inactive(&mut self) -> usize {
        let mut moved = 0;
        for id in std::mem::take(&mut self.inactive) {
            if let Slot::Active { in_pool, .. } = &mut self.slots[id as usize] {
                *in_pool = false; // held: stays, out of the eviction order
                continue;
            }
            moved += 1;
            self.unregister(id);
            self.slots[id as usize] = Slot::Reset;
            self.reset.push(id);
        }
        moved
    }

    /// `purge_blocks` of one hash: (reset now, detached).
    fn purge(&mut self, hash: u64) -> (usize, usize) {
        let Some(list) = self.registry.get(&hash).cloned() else {
            return (0, 0);
        };
        let (mut reset, mut detached) = (0, 0);
        for id in list {
            self.unregister(id);
            self.inactive.retain(|&x| x != id);
            match &mut self.slots[id as usize] {
                Slot::Inactive(_) => {
                    self.slots[id as usize] = Slot::Reset;
                    self.no_cache.remove(&id);
                    self.reset.push(id);
                    reset += 1;
                }
                Slot::Active { in_pool, .. } => {
                    *in_pool = false;
                    self.detached.insert(id);
                    detached += 1;
                }
                other => panic!("purge of {other:?}"),
            }
        }
        (reset, detached)
    }

    /// `evict_inactive(n)`: the victims' ids and hashes, in eviction order.
    fn evict_inactive(&mut self, n: usize) -> Vec<(u32, u64)> {
        let n = n.min(self.inactive_count());
        (0..n)
            .map(|_| {
                let id = self.pop_victim();
                let Slot::Inactive(hash) = self.slots[id as usize] else {
                    unreachable!()
                };
                self.unregister(id);
                self.slots[id as usize] = Slot::Mutable;
                (id, hash)
            })
            .collect()
    }

    fn upgrade(&mut self, id: u32, hash: u64) -> bool {
        if self.detached.contains(&id) {
            return false;
        }
        match self.slots[id as usize] {
            Slot::Active { hash: h, .. } | Slot::Inactive(h) if h == hash => {
                self.acquire(id);
                true
            }
            _ => false,
        }
    }
}

/// The handles a server would be holding.
#[derive(Default)]
struct Handles {
    mutable: Vec<MutableBlock<Device>>,
    complete: Vec<CompleteBlock<Device>>,
    immutable: Vec<ImmutableBlock<Device>>,
    weak: Vec<WeakBlock<Device>>,
}

fn pick<T>(v: &mut Vec<T>, i: usize) -> Option<T> {
    if v.is_empty() {
        None
    } else {
        Some(v.swap_remove(i % v.len()))
    }
}

fn id_of(b: &ImmutableBlock<Device>) -> u32 {
    b.block_id().get()
}

fn check_hits(
    hits: &[ImmutableBlock<Device>],
    expected: &[(u32, u64)],
) -> Result<(), TestCaseError> {
    let got: Vec<(u32, u64)> = hits
        .iter()
        .map(|b| (id_of(b), b.sequence_hash().as_u64()))
        .collect();
    prop_assert_eq!(got, expected.to_vec());
    Ok(())
}

fn step(
    m: &BlockManager<Device>,
    model: &mut Model,
    h: &mut Handles,
    op: Op,
) -> Result<(), TestCaseError> {
    match op {
        Op::Allocate(n) => match (m.allocate_blocks_with_evictions(n), model.allocate(n)) {
            (Ok((blocks, evicted)), Ok((ids, gone))) => {
                let got: Vec<u32> = blocks.iter().map(|b| b.block_id().get()).collect();
                prop_assert_eq!(got, ids);
                let evicted: Vec<u64> = evicted.iter().map(|h| h.as_u64()).collect();
                prop_assert_eq!(evicted, gone);
                h.mutable.extend(blocks);
            }
            (
                Err(AllocationError::Exhausted {
                    requested,
                    available,
                    total,
                }),
                Err(expected),
            ) => {
                prop_assert_eq!((requested, available, total), (n, expected, TOTAL));
            }
            (real, model) => {
                return Err(TestCaseError::fail(format!(
                    "allocate({n}): manager {:?} vs model {:?}",
                    real.map(|(b, e)| (b.len(), e)),
                    model
                )));
            }
        },
        Op::Stage {
            i,
            hash,
            wrong_size,
        } => {
            let Some(block) = pick(&mut h.mutable, i) else {
                return Ok(());
            };
            let id = block.block_id().get();
            let size = if wrong_size {
                BLOCK_SIZE * 2
            } else {
                BLOCK_SIZE
            };
            match block.stage(SequenceHash::new(hash), size) {
                Ok(staged) => {
                    prop_assert!(!wrong_size);
                    prop_assert_eq!(staged.block_id().get(), id);
                    model.slots[id as usize] = Slot::Staged(hash);
                    h.complete.push(staged);
                }
                Err(err) => {
                    prop_assert!(wrong_size);
                    let block = err.into_block();
                    prop_assert_eq!(block.block_id().get(), id);
                    h.mutable.push(block);
                }
            }
        }
        Op::DropMutable(i) => {
            if let Some(block) = pick(&mut h.mutable, i) {
                model.release_mutable(block.block_id().get());
            }
        }
        Op::DropComplete(i) => {
            if let Some(block) = pick(&mut h.complete, i) {
                model.release_mutable(block.block_id().get());
            }
        }
        Op::Unstage(i) => {
            if let Some(block) = pick(&mut h.complete, i) {
                let id = block.block_id().get();
                let block = block.reset();
                prop_assert_eq!(block.block_id().get(), id);
                model.slots[id as usize] = Slot::Mutable;
                h.mutable.push(block);
            }
        }
        Op::Register {
            count,
            one_by_one,
            no_cache,
        } => {
            let n = count.min(h.complete.len());
            let batch: Vec<CompleteBlock<Device>> = h
                .complete
                .drain(..n)
                .map(|b| b.reset_on_release(no_cache))
                .collect();
            let expected: Vec<u32> = batch
                .iter()
                .map(|b| model.register(b.block_id().get(), no_cache))
                .collect();
            let registered = if one_by_one {
                batch
                    .into_iter()
                    .map(|b| m.register_block(b).map_err(|e| e.to_string()))
                    .collect::<Result<Vec<_>, _>>()
            } else {
                m.register_blocks(batch).map_err(|e| e.to_string())
            };
            let registered = registered.map_err(TestCaseError::fail)?;
            let got: Vec<u32> = registered.iter().map(id_of).collect();
            prop_assert_eq!(got, expected);
            h.immutable.extend(registered);
        }
        Op::Clone(i) => {
            if !h.immutable.is_empty() {
                let b = h.immutable[i % h.immutable.len()].clone();
                // Another owner only: a held block a scan left in place stays there.
                model.acquire_in_place(id_of(&b));
                h.immutable.push(b);
            }
        }
        Op::DropImmutable(i) => {
            if let Some(b) = pick(&mut h.immutable, i) {
                model.release(id_of(&b));
            }
        }
        Op::ReleaseOnThread(n) => {
            let n = n.min(h.immutable.len());
            let batch: Vec<ImmutableBlock<Device>> = h.immutable.drain(..n).collect();
            for b in &batch {
                model.release(id_of(b));
            }
            std::thread::spawn(move || ImmutableBlock::release_all(batch))
                .join()
                .expect("release thread");
        }
        Op::Downgrade(i) => {
            if !h.immutable.is_empty() {
                let b = &h.immutable[i % h.immutable.len()];
                let weak = b.downgrade();
                prop_assert_eq!(weak.block_id(), b.block_id());
                h.weak.push(weak);
            }
        }
        Op::Upgrade(i) => {
            if !h.weak.is_empty() {
                let weak = &h.weak[i % h.weak.len()];
                let (id, hash) = (weak.block_id().get(), weak.sequence_hash().as_u64());
                let expected = model.upgrade(id, hash);
                match weak.upgrade() {
                    Some(b) => {
                        prop_assert!(expected, "upgrade of stale weak {id}/{hash}");
                        prop_assert_eq!((id_of(&b), b.sequence_hash().as_u64()), (id, hash));
                        h.immutable.push(b);
                    }
                    None => prop_assert!(!expected, "upgrade of live weak {id}/{hash} failed"),
                }
            }
        }
        Op::DropWeak(i) => {
            pick(&mut h.weak, i);
        }
        Op::Match(hashes) => {
            let query: Vec<SequenceHash> = hashes.iter().copied().map(SequenceHash::new).collect();
            let mut expected = Vec::new();
            for &hash in &hashes {
                match model.lookup(hash) {
                    Some(id) => expected.push((id, hash)),
                    None => break,
                }
            }
            let hits = m.match_blocks(&query);
            check_hits(&hits, &expected)?;
            h.immutable.extend(hits);
        }
        Op::Scan(hashes, touch) => {
            let query: Vec<SequenceHash> = hashes.iter().copied().map(SequenceHash::new).collect();
            let expected: Vec<(u32, u64)> = hashes
                .iter()
                .filter_map(|&hash| {
                    let id = if touch {
                        model.lookup(hash)
                    } else {
                        model.lookup_in_place(hash)
                    };
                    id.map(|id| (id, hash))
                })
                .collect();
            let hits = m.scan_matches(&query, touch);
            check_hits(&hits, &expected)?;
            h.immutable.extend(hits);
        }
        Op::Touch(hashes) => {
            let query: Vec<SequenceHash> = hashes.iter().copied().map(SequenceHash::new).collect();
            let expected = hashes.iter().filter(|&&x| model.touch(x)).count();
            prop_assert_eq!(m.touch_blocks(&query), expected);
        }
        Op::Reset => {
            // Held blocks cannot be reset: the pool is still emptied, and the error says how
            // many blocks are held.
            let moved = model.reset_inactive();
            let in_use = TOTAL - model.available();
            let expected = if in_use == 0 {
                Ok(moved)
            } else {
                Err(ResetError::BlocksInUse {
                    moved,
                    in_use,
                    total: TOTAL,
                })
            };
            prop_assert_eq!(m.reset_inactive_pool(), expected);
        }
        Op::Purge(hashes) => {
            let query: Vec<SequenceHash> = hashes.iter().copied().map(SequenceHash::new).collect();
            let (mut reset, mut detached) = (0, 0);
            for &hash in &hashes {
                let (r, d) = model.purge(hash);
                reset += r;
                detached += d;
            }
            let got = m.purge_blocks(&query);
            prop_assert_eq!((got.reset, got.detached), (reset, detached));
        }
        Op::EvictInactive(n) => {
            let expected = model.evict_inactive(n);
            let taken = m.evict_inactive(n, RemovalReason::Evicted);
            let got: Vec<(u32, u64)> = taken
                .iter()
                .map(|(b, e)| (b.block_id().get(), e.hash.as_u64()))
                .collect();
            prop_assert_eq!(got, expected);
            for (block, record) in &taken {
                prop_assert_eq!(block.block_id(), record.block_id);
            }
            h.mutable.extend(taken.into_iter().map(|(b, _)| b));
        }
    }
    Ok(())
}

/// Everything observable agrees with the model.
fn agree(m: &BlockManager<Device>, model: &Model, h: &Handles) -> Result<(), TestCaseError> {
    let c = m
        .check_invariants()
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let count = |f: fn(&Slot) -> bool| model.slots.iter().filter(|s| f(s)).count();
    prop_assert_eq!(c.total, TOTAL);
    prop_assert_eq!(c.reset, model.reset.len());
    prop_assert_eq!(c.inactive, model.inactive_count());
    prop_assert_eq!(
        c.mutable,
        count(|s| matches!(s, Slot::Mutable | Slot::Staged(_)))
    );
    prop_assert_eq!(c.active, count(|s| matches!(s, Slot::Active { .. })));
    prop_assert_eq!(c.registered_hashes, model.registry.len());
    let dups: usize = model.registry.values().map(|l| l.len() - 1).sum();
    prop_assert_eq!(c.duplicates, dups);
    prop_assert_eq!(c.reset + c.inactive + c.in_flight(), TOTAL);
    prop_assert_eq!(m.available_blocks(), model.available());

    // Every handle matches the model; reference counts equal the number of handles.
    prop_assert_eq!(c.mutable, h.mutable.len() + h.complete.len());
    let mut refs: HashMap<u32, u32> = HashMap::new();
    for b in &h.immutable {
        *refs.entry(id_of(b)).or_default() += 1;
        let slot = model.slots[id_of(b) as usize];
        prop_assert!(
            matches!(slot, Slot::Active { hash, .. } if hash == b.sequence_hash().as_u64()),
            "handle {}/{:?} vs model {:?}",
            id_of(b),
            b.sequence_hash(),
            slot
        );
    }
    for (id, slot) in model.slots.iter().enumerate() {
        if let Slot::Active { refs: n, .. } = slot {
            prop_assert_eq!(refs.get(&(id as u32)).copied(), Some(*n), "refs of {}", id);
        }
    }
    for b in &h.complete {
        prop_assert!(matches!(
            model.slots[b.block_id().index()],
            Slot::Staged(x) if x == b.sequence_hash().as_u64()
        ));
    }
    Ok(())
}

fn run(policy: BlockDuplicationPolicy, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let m = BlockManager::<Device>::builder()
        .block_count(TOTAL)
        .block_size(BLOCK_SIZE)
        .duplication_policy(policy)
        .eviction(EvictionBackend::Lru) // the model's order
        .build()
        .expect("valid configuration");
    let mut model = Model::new(policy);
    let mut h = Handles::default();
    for op in ops {
        step(&m, &mut model, &mut h, op)?;
        agree(&m, &model, &h)?;
    }
    // Dropping every handle returns every block to reset or inactive.
    drop(h);
    let c = m
        .check_invariants()
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!((c.mutable, c.active), (0, 0));
    prop_assert_eq!(c.reset + c.inactive, TOTAL);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn reject_policy_matches_model(ops in prop::collection::vec(op(), 1..120)) {
        run(BlockDuplicationPolicy::Reject, ops)?;
    }

    #[test]
    fn allow_policy_matches_model(ops in prop::collection::vec(op(), 1..120)) {
        run(BlockDuplicationPolicy::Allow, ops)?;
    }
}
