//! `RequestSequence` against a reference model: random appends, chunked steps, speculative
//! rollbacks, preemptions, resumptions and concurrent requests registering the same blocks
//! (policy `Reject` swapping table entries, which must always be reported).

use std::collections::HashSet;

use kvbm_logical::{
    BlockDuplicationPolicy, BlockId, BlockManager, Device, KvEventKind, RemovalReason,
    RequestError, RequestSequence, Salt, SequenceHash, TokenBlockSequence,
};
use proptest::prelude::*;

const BS: usize = 4;
const TOTAL: usize = 12;

#[derive(Clone, Debug)]
enum Op {
    Push(u32),
    Extend(Vec<u32>),
    /// Allocate for `n` pending tokens (clamped) and commit them: one engine step.
    Step(usize),
    /// Commit without allocating first (may be refused).
    CommitRaw(usize),
    Truncate(usize),
    Preempt,
    Resume,
    /// Another request with the first `blocks` blocks of our tokens, fully computed and held.
    Other(usize),
    DropOther,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u32..3).prop_map(Op::Push),
        2 => prop::collection::vec(0u32..3, 1..9).prop_map(Op::Extend),
        5 => (1usize..10).prop_map(Op::Step),
        1 => (0usize..10).prop_map(Op::CommitRaw),
        2 => (0usize..40).prop_map(Op::Truncate),
        1 => Just(Op::Preempt),
        2 => Just(Op::Resume),
        2 => (1usize..6).prop_map(Op::Other),
        1 => Just(Op::DropOther),
    ]
}

struct Model {
    tokens: Vec<u32>,
    computed: usize,
}

fn reference_hashes(tokens: &[u32]) -> Vec<SequenceHash> {
    TokenBlockSequence::from_tokens(tokens, BS, &Salt::none())
        .unwrap()
        .sequence_hashes()
        .collect()
}

/// Checks the request against the model, and that no table entry below `allowed_from`
/// changed except those listed in `changed`.
fn check(
    req: &RequestSequence<Device>,
    m: &Model,
    before: &[BlockId],
    changed: &HashSet<usize>,
    allowed_from: usize,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(req.sequence().tokens(), &m.tokens[..]);
    let hashes = reference_hashes(&m.tokens);
    prop_assert_eq!(req.sequence_hashes().collect::<Vec<_>>(), hashes.clone());
    prop_assert_eq!(req.num_computed_tokens(), m.computed);
    prop_assert_eq!(req.num_pending_tokens(), m.tokens.len() - m.computed);
    let full = m.computed / BS;
    let registered = req.registered_blocks();
    prop_assert_eq!(registered.len(), full);
    let table = req.block_table();
    prop_assert!(table.len() >= m.computed.div_ceil(BS));
    for (i, block) in registered.iter().enumerate() {
        prop_assert_eq!(block.sequence_hash(), hashes[i]);
        prop_assert_eq!(block.block_id(), table[i]);
    }
    let ids: HashSet<BlockId> = table.iter().copied().collect();
    prop_assert_eq!(ids.len(), table.len(), "a slot twice in one table");
    for i in 0..before.len().min(table.len()).min(allowed_from) {
        prop_assert!(
            before[i] == table[i] || changed.contains(&i),
            "entry {} changed silently: {:?} -> {:?}",
            i,
            before[i],
            table[i]
        );
    }
    Ok(())
}

fn run(ops: Vec<Op>, prompt: Vec<u32>) -> Result<(), TestCaseError> {
    let manager = BlockManager::<Device>::builder()
        .block_count(TOTAL)
        .block_size(BS)
        .duplication_policy(BlockDuplicationPolicy::Reject)
        .build()
        .unwrap();
    let mut req = RequestSequence::builder(&manager).prompt(&prompt).build();
    let mut m = Model {
        tokens: prompt,
        computed: 0,
    };
    let mut others: Vec<RequestSequence<Device>> = Vec::new();
    let none = HashSet::new();
    for op in ops {
        let before = req.block_table().to_vec();
        let mut changed = HashSet::new();
        let mut allowed_from = usize::MAX;
        match op {
            Op::Push(t) => {
                req.push(t);
                m.tokens.push(t);
            }
            Op::Extend(v) => {
                req.extend(&v);
                m.tokens.extend_from_slice(&v);
            }
            Op::Step(n) => {
                let n = n.min(m.tokens.len() - m.computed);
                let need = req.blocks_needed(n);
                prop_assert_eq!(
                    need,
                    (m.computed + n).div_ceil(BS).saturating_sub(before.len())
                );
                match req.allocate(n) {
                    Ok(got) => {
                        prop_assert_eq!(got, need);
                        prop_assert_eq!(req.block_table().len(), before.len() + need);
                        let done = req.commit(n).unwrap();
                        prop_assert_eq!(
                            done.registered.clone(),
                            m.computed / BS..(m.computed + n) / BS
                        );
                        for c in &done.changed {
                            prop_assert!(done.registered.contains(&c.index));
                            prop_assert_eq!(c.old, before.get(c.index).copied().unwrap_or(c.old));
                            prop_assert_eq!(req.block_table()[c.index], c.new);
                            changed.insert(c.index);
                        }
                        m.computed += n;
                    }
                    Err(e) => {
                        prop_assert!(e.to_string().contains("blocks"), "{e}");
                        prop_assert_eq!(req.block_table(), &before[..]);
                    }
                }
            }
            Op::CommitRaw(n) => {
                let pending = m.tokens.len() - m.computed;
                let needed = (m.computed + n).div_ceil(BS);
                match req.commit(n) {
                    Ok(done) => {
                        prop_assert!(n <= pending && needed <= before.len());
                        for c in &done.changed {
                            changed.insert(c.index);
                        }
                        m.computed += n;
                    }
                    Err(RequestError::NotEnoughTokens {
                        requested,
                        uncomputed,
                    }) => {
                        prop_assert!(n > pending);
                        prop_assert_eq!((requested, uncomputed), (n, pending));
                    }
                    Err(RequestError::NotAllocated {
                        needed: nd,
                        allocated,
                    }) => {
                        prop_assert!(n <= pending && needed > before.len());
                        prop_assert_eq!((nd, allocated), (needed, before.len()));
                    }
                    Err(e) => prop_assert!(false, "unexpected {e}"),
                }
            }
            Op::Truncate(len) => {
                let out = req.truncate(len);
                if len < m.tokens.len() {
                    m.tokens.truncate(len);
                    if m.computed > len {
                        let keep = len / BS;
                        if m.computed / BS > keep {
                            m.computed = keep * BS;
                            prop_assert_eq!(out.changed_from, Some(keep));
                            allowed_from = keep;
                        } else {
                            m.computed = len;
                            prop_assert_eq!(out.changed_from, None);
                        }
                    }
                } else {
                    prop_assert_eq!(out.changed_from, None);
                }
                prop_assert_eq!(out.computed, m.computed);
            }
            Op::Preempt => {
                prop_assert_eq!(req.preempt(), before.len());
                prop_assert!(req.block_table().is_empty());
                m.computed = 0;
            }
            Op::Resume => {
                if before.is_empty() {
                    let hashes = reference_hashes(&m.tokens);
                    // Never the block of the last token.
                    let limit = m.tokens.len().saturating_sub(1) / BS;
                    let probe = manager.probe_prefix(&hashes[..limit]);
                    let matched = req.match_prefix().unwrap();
                    prop_assert_eq!(matched, probe.hits());
                    m.computed = matched * BS;
                } else {
                    prop_assert_eq!(
                        req.match_prefix(),
                        Err(RequestError::HoldsBlocks {
                            blocks: before.len()
                        })
                    );
                }
            }
            Op::Other(blocks) => {
                let len = (blocks * BS).min(m.tokens.len() / BS * BS);
                if len > 0 && others.len() < 2 {
                    let mut other = RequestSequence::builder(&manager)
                        .prompt(&m.tokens[..len])
                        .match_whole_prompt(true)
                        .build();
                    other.match_prefix().unwrap();
                    let pending = other.num_pending_tokens();
                    if other.allocate(pending).is_ok() {
                        other.commit(pending).unwrap();
                        prop_assert_eq!(other.registered_blocks().len(), len / BS);
                        others.push(other);
                    }
                }
            }
            Op::DropOther => {
                others.pop();
            }
        }
        check(
            &req,
            &m,
            &before,
            if changed.is_empty() { &none } else { &changed },
            allowed_from,
        )?;
        manager.check_invariants().unwrap();
    }
    drop(others);
    drop(req);
    let counts = manager.check_invariants().unwrap();
    prop_assert_eq!(counts.reset + counts.inactive, TOTAL, "a block leaked");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn request_sequence_matches_its_model(
        prompt in prop::collection::vec(0u32..3, 0..20),
        ops in prop::collection::vec(op(), 1..60),
    ) {
        run(ops, prompt)?;
    }
}

#[test]
fn a_duplicate_registration_under_reject_is_reported() {
    let m = BlockManager::<Device>::builder()
        .block_count(8)
        .block_size(BS)
        .build()
        .unwrap();
    let prompt: Vec<u32> = (0..9).collect();
    let mut a = RequestSequence::builder(&m).prompt(&prompt).build();
    let mut b = RequestSequence::builder(&m).prompt(&prompt).build();
    assert_eq!(a.match_prefix().unwrap(), 0);
    assert_eq!(b.match_prefix().unwrap(), 0);
    a.allocate(9).unwrap();
    b.allocate(9).unwrap();
    let b_table = b.block_table().to_vec();
    a.commit(9).unwrap();
    let done = b.commit(9).unwrap();
    // Both full blocks were registered by `a` first: `b`'s entries 0 and 1 now name `a`'s.
    assert_eq!(done.registered, 0..2);
    let changed: Vec<(usize, BlockId, BlockId)> = done
        .changed
        .iter()
        .map(|c| (c.index, c.old, c.new))
        .collect();
    assert_eq!(
        changed,
        vec![
            (0, b_table[0], a.block_table()[0]),
            (1, b_table[1], a.block_table()[1])
        ]
    );
    assert_eq!(b.block_table()[..2], a.block_table()[..2]);
    assert_eq!(b.block_table()[2], b_table[2]); // the partial block is b's own
    // b's two swapped slots went back to the reset pool.
    assert_eq!(m.counts().reset, 8 - 3 - 1);
}

#[test]
fn do_not_cache_blocks_leave_on_release_and_say_so() {
    let m = BlockManager::<Device>::builder()
        .block_count(8)
        .block_size(BS)
        .build()
        .unwrap();
    let events = m.subscribe(16);
    let prompt: Vec<u32> = (0..8).collect();
    let mut req = RequestSequence::builder(&m)
        .prompt(&prompt)
        .cache(false)
        .build();
    req.allocate(8).unwrap();
    req.commit(8).unwrap();
    let hashes: Vec<SequenceHash> = req.sequence_hashes().collect();
    // Shareable while held.
    let shared = m.match_blocks(&hashes);
    assert_eq!(shared.len(), 2);
    drop(req);
    assert!(
        hashes.iter().all(|h| m.contains(*h)),
        "still held by `shared`"
    );
    drop(shared);
    assert!(hashes.iter().all(|h| !m.contains(*h)));
    let counts = m.check_invariants().unwrap();
    assert_eq!((counts.reset, counts.inactive), (8, 0));
    let kinds: Vec<KvEventKind> = events
        .drain()
        .flat_map(|b| b.iter().map(|e| e.kind.clone()).collect::<Vec<_>>())
        .collect();
    let KvEventKind::Stored {
        block_hashes,
        token_ids,
        block_size,
        ..
    } = &kinds[0]
    else {
        panic!("{kinds:?}")
    };
    assert_eq!(block_hashes, &hashes);
    assert_eq!(token_ids.as_deref(), Some(&prompt[..]));
    assert_eq!(*block_size, BS);
    let removed: Vec<SequenceHash> = kinds[1..]
        .iter()
        .flat_map(|k| match k {
            KvEventKind::Removed {
                block_hashes,
                reason: RemovalReason::Released,
            } => block_hashes.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    let mut removed_sorted = removed.clone();
    removed_sorted.sort();
    let mut hashes_sorted = hashes.clone();
    hashes_sorted.sort();
    assert_eq!(removed_sorted, hashes_sorted);
    assert_eq!(m.metrics().snapshot().removed_released, 2);
}

#[test]
fn preemption_keeps_the_whole_prefix_matchable_under_the_default_policy() {
    // Four requests fill the pool; each is preempted while the others allocate, and must
    // re-match every block of it that is still cached.
    let m = BlockManager::<Device>::builder()
        .block_count(16)
        .block_size(BS)
        .build()
        .unwrap();
    let prompts: Vec<Vec<u32>> = (0..4u32)
        .map(|r| (0..17).map(|t| r * 100 + t).collect())
        .collect();
    let mut reqs: Vec<_> = prompts
        .iter()
        .map(|p| RequestSequence::builder(&m).prompt(p).build())
        .collect();
    for r in &mut reqs {
        r.match_prefix().unwrap();
        r.allocate(17).unwrap_or_else(|_| {
            r.preempt();
            0
        });
        if r.block_table().len() == 5 {
            r.commit(17).unwrap();
        }
    }
    for (i, req) in reqs.iter_mut().enumerate() {
        req.preempt();
        let hashes: Vec<SequenceHash> = req.sequence_hashes().collect();
        let cached_by_prefix = m.probe_prefix(&hashes[..4]).hits();
        let cached_anywhere = hashes[..4].iter().filter(|h| m.contains(**h)).count();
        assert_eq!(
            cached_by_prefix, cached_anywhere,
            "request {i}: a cached block is orphaned"
        );
        assert_eq!(req.match_prefix().unwrap(), cached_by_prefix);
        let pending = req.num_pending_tokens();
        if req.allocate(pending).is_ok() {
            req.commit(pending).unwrap();
        } else {
            req.preempt();
        }
        m.check_invariants().unwrap();
    }
}

#[test]
fn an_absurd_token_reservation_is_only_a_hint() {
    // `reserve_tokens` is a capacity hint: a huge one must neither panic ("capacity
    // overflow") nor abort the process (an allocation of terabytes).
    let m = BlockManager::<Device>::builder()
        .block_count(TOTAL)
        .block_size(BS)
        .build()
        .unwrap();
    for reserve in [usize::MAX, 1 << 40] {
        let mut r = RequestSequence::builder(&m)
            .prompt(&[1, 2, 3, 4, 5])
            .reserve_tokens(reserve)
            .build();
        assert_eq!(r.allocate(5).unwrap(), 2);
        r.commit(5).unwrap();
        drop(r);
    }
    assert_eq!(m.counts().mutable, 0);
}
