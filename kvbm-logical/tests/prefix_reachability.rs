//! The default configuration keeps prefixes reachable: no default-configured pool ever evicts
//! a block while a registered descendant of it remains matchable by prefix and evictable
//! instead, however the caller releases its blocks (tail first through `RequestSequence`,
//! head first by dropping a `Vec`, or in batches with `release_all`).
//!
//! Every allocation below takes at most one block, so each eviction is checked against the
//! state right before it: the checker computes, with the side-effect-free `probe_prefix`,
//! which blocks have an inactive, matchable descendant, and no victim may be among them.

use std::collections::HashSet;

use kvbm_logical::{
    BlockManager, Device, EventSubscriber, EvictionBackend, KvEventKind, RemovalReason,
    RequestSequence, Salt, SequenceHash, TokenBlockSequence,
};
use proptest::prelude::*;

const BS: usize = 2;
const TOTAL: usize = 20;
const CONVERSATIONS: usize = 4;
/// Shared by every conversation: its first blocks are a common prefix (a tree of chains).
const SYSTEM: [u32; 4] = [9000, 9001, 9002, 9003];

#[derive(Clone, Debug)]
enum Op {
    /// A turn of conversation `conv` through a `RequestSequence` (chunked prefill, one block
    /// per step), adding `new` tokens; kept (held) or dropped (tail first).
    Turn { conv: usize, new: usize, keep: bool },
    /// A turn done by hand: match, allocate, register, then drop the `Vec`s head first.
    RawTurn { conv: usize, new: usize },
    /// Release a held request.
    Release(usize),
    /// Preempt a held request and resume it (re-match, allocate the rest).
    PreemptResume(usize),
    /// Allocate `n` blocks one at a time and drop them.
    Pressure(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..CONVERSATIONS, 1usize..7, any::<bool>())
            .prop_map(|(conv, new, keep)| Op::Turn { conv, new, keep }),
        2 => (0..CONVERSATIONS, 1usize..7).prop_map(|(conv, new)| Op::RawTurn { conv, new }),
        2 => (0usize..4).prop_map(Op::Release),
        1 => (0usize..4).prop_map(Op::PreemptResume),
        2 => (1usize..6).prop_map(Op::Pressure),
    ]
}

struct World {
    m: BlockManager<Device>,
    events: EventSubscriber,
    /// Each conversation's whole history (every request of it is a prefix of it).
    history: Vec<Vec<u32>>,
    next_token: u32,
    held: Vec<RequestSequence<Device>>,
}

impl World {
    fn new(backend: Option<EvictionBackend>) -> Self {
        let mut builder = BlockManager::<Device>::builder()
            .block_count(TOTAL)
            .block_size(BS);
        if let Some(backend) = backend {
            builder = builder.eviction(backend);
        }
        let m = builder.build().unwrap();
        let events = m.subscribe(1 << 16);
        Self {
            m,
            events,
            history: vec![SYSTEM.to_vec(); CONVERSATIONS],
            next_token: 0,
            held: Vec::new(),
        }
    }

    fn chains(&self) -> Vec<Vec<SequenceHash>> {
        self.history
            .iter()
            .map(|t| {
                TokenBlockSequence::from_tokens(t, BS, &Salt::none())
                    .unwrap()
                    .sequence_hashes()
                    .collect()
            })
            .collect()
    }

    /// Blocks that must not be evicted now: every proper ancestor of an inactive block whose
    /// whole prefix is registered.
    fn protected(&self) -> HashSet<SequenceHash> {
        let mut out = HashSet::new();
        for chain in self.chains() {
            let mut inactive_before = 0;
            for j in 0..chain.len() {
                let probe = self.m.probe_prefix(&chain[..=j]);
                if probe.hits() < j + 1 {
                    break; // not matchable from here on
                }
                if probe.inactive > inactive_before {
                    out.extend(chain[..j].iter().copied());
                }
                inactive_before = probe.inactive;
            }
        }
        out
    }

    /// The hashes evicted since the last call.
    fn evicted(&self) -> Vec<SequenceHash> {
        self.events
            .drain()
            .flat_map(|b| {
                b.iter()
                    .filter_map(|e| match &e.kind {
                        KvEventKind::Removed {
                            block_hashes,
                            reason: RemovalReason::Evicted,
                        } => Some(block_hashes.clone()),
                        _ => None,
                    })
                    .flatten()
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Runs `step` (which allocates at most one block) and checks its eviction.
    fn checked<R>(&mut self, step: impl FnOnce(&mut Self) -> R) -> Result<R, String> {
        let _ = self.evicted();
        let protected = self.protected();
        let r = step(self);
        for victim in self.evicted() {
            if protected.contains(&victim) {
                return Err(format!(
                    "evicted {victim} while a matchable descendant of it was evictable"
                ));
            }
        }
        Ok(r)
    }

    fn grow(&mut self, conv: usize, new: usize) -> Vec<u32> {
        for _ in 0..new {
            self.history[conv].push(self.next_token);
            self.next_token += 1;
        }
        self.history[conv].clone()
    }

    /// Prefill `req` one block per step; false if the pool ran out (the request is then
    /// preempted).
    fn prefill(&mut self, req: &mut RequestSequence<Device>) -> Result<bool, String> {
        while req.num_pending_tokens() > 0 {
            let chunk = (BS - req.num_computed_tokens() % BS).min(req.num_pending_tokens());
            let ok = self.checked(|_| req.allocate(chunk).is_ok())?;
            if !ok {
                req.preempt();
                return Ok(false);
            }
            req.commit(chunk).unwrap();
        }
        Ok(true)
    }

    fn apply(&mut self, op: Op) -> Result<(), String> {
        match op {
            Op::Turn { conv, new, keep } => {
                let prompt = self.grow(conv, new);
                let mut req = RequestSequence::builder(&self.m).prompt(&prompt).build();
                req.match_prefix().unwrap();
                let done = self.prefill(&mut req)?;
                if done && keep && self.held.len() < 4 {
                    self.held.push(req);
                }
            }
            Op::RawTurn { conv, new } => {
                let prompt = self.grow(conv, new);
                let seq = TokenBlockSequence::from_tokens(&prompt, BS, &Salt::none()).unwrap();
                let hashes: Vec<SequenceHash> = seq.sequence_hashes().collect();
                let cached = self.m.match_blocks(&hashes);
                let mut registered = Vec::new();
                for i in cached.len()..hashes.len() {
                    let got = self.checked(|w| w.m.allocate_blocks(1))?;
                    let Ok(mut fresh) = got else { break };
                    let staged = fresh
                        .pop()
                        .unwrap()
                        .stage_token_block(&seq.blocks()[i])
                        .unwrap();
                    registered.push(self.m.register_block(staged).unwrap());
                }
                // Head first: the prefix's first block is released first.
                drop(cached);
                drop(registered);
            }
            Op::Release(i) => {
                if i < self.held.len() {
                    self.held.remove(i);
                }
            }
            Op::PreemptResume(i) => {
                if i < self.held.len() {
                    let mut req = self.held.remove(i);
                    req.preempt();
                    req.match_prefix().unwrap();
                    if self.prefill(&mut req)? {
                        self.held.push(req);
                    }
                }
            }
            Op::Pressure(n) => {
                let mut taken = Vec::new();
                for _ in 0..n {
                    match self.checked(|w| w.m.allocate_blocks(1))? {
                        Ok(b) => taken.extend(b),
                        Err(_) => break,
                    }
                }
                // Head-first release of unregistered blocks: to the reset pool.
                drop(taken);
            }
        }
        self.m.check_invariants().map_err(|e| e.to_string())?;
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn the_default_pool_never_orphans_a_cached_prefix(ops in prop::collection::vec(op(), 1..80)) {
        let mut world = World::new(None);
        for op in ops {
            world.apply(op).map_err(TestCaseError::fail)?;
        }
        // A batch release (`release_all`) is covered too.
        let held = std::mem::take(&mut world.held);
        drop(held);
        let r = world.checked(|w| w.m.allocate_blocks(1).map(drop));
        prop_assert!(r.is_ok(), "{:?}", r.err());
    }
}

/// The checker is live: LRU, with a chain released head first, evicts the head while the
/// rest of the chain is cached and evictable.
#[test]
fn lru_with_a_head_first_release_orphans_the_chain() {
    let mut world = World::new(Some(EvictionBackend::Lru));
    let mut failure = None;
    for op in [Op::RawTurn { conv: 0, new: 6 }, Op::Pressure(TOTAL)] {
        if let Err(e) = world.apply(op) {
            failure = Some(e);
            break;
        }
    }
    assert!(failure.is_some(), "LRU evicted leaves first?");
    // Same workload, default policy: no violation.
    let mut world = World::new(None);
    world.apply(Op::RawTurn { conv: 0, new: 6 }).unwrap();
    world.apply(Op::Pressure(TOTAL)).unwrap();
}
