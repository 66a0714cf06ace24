//! Worker-side batch operations on a tier's manager that take its store lock for a bounded
//! number of blocks at a time.
//!
//! The scheduler thread takes G1's and G2's store locks for every request (lookup, commit,
//! allocate, register, release). A worker that held one for a whole batch (a reclaim round,
//! an offload's allocation in G2 with its evictions, a job's release, an onboard's
//! registration, all as large as a request, thousands of blocks for a long prompt) made the
//! scheduler wait for all of it. Here each lock acquisition covers at most [`WORKER_STEP`]
//! blocks, so the scheduler waits for one step at most.
//!
//! One consequence for event subscribers: kvbm-logical announces one event batch per lock
//! acquisition, so a worker's evictions or registrations of *n* blocks arrive as up to
//! ⌈*n* / 16⌉ batches (`Stored`/`Removed`, in order). A subscriber's capacity counts batches.

use kvbm_logical::{
    BlockId, BlockManager, BlockTier, CompleteBlock, Evicted, ImmutableBlock, MutableBlock,
    RemovalReason, SequenceHash,
};

/// Blocks a worker handles per store-lock acquisition. A step of 16 holds the lock for a few
/// microseconds (whole batches of a 64-block request held it for 8–19 µs at the mean of the
/// holds over 4 µs; see BENCHMARKS.md, 2026-11-29).
pub(crate) const WORKER_STEP: usize = 16;

/// Allocates up to `n` blocks of `m` (fewer when fewer are available); never waits. Takes
/// the lock once per [`WORKER_STEP`] blocks.
pub(crate) fn allocate_up_to<T: BlockTier>(m: &BlockManager<T>, n: usize) -> Vec<MutableBlock<T>> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let want = (n - out.len()).min(WORKER_STEP);
        match m.allocate_blocks(want) {
            Ok(b) => out.extend(b),
            Err(kvbm_logical::AllocationError::Exhausted { available, .. }) if available > 0 => {
                out.extend(m.allocate_blocks(available.min(want)).unwrap_or_default());
                break;
            }
            Err(_) => break,
        }
    }
    out
}

/// [`ImmutableBlock::release_all`], one lock acquisition per [`WORKER_STEP`] blocks.
pub(crate) fn release_immutable<T: BlockTier>(blocks: impl IntoIterator<Item = ImmutableBlock<T>>) {
    let mut blocks = blocks.into_iter().peekable();
    while blocks.peek().is_some() {
        ImmutableBlock::release_all(blocks.by_ref().take(WORKER_STEP));
    }
}

/// [`MutableBlock::release_all`], one lock acquisition per [`WORKER_STEP`] blocks.
pub(crate) fn release_mutable<T: BlockTier>(blocks: impl IntoIterator<Item = MutableBlock<T>>) {
    let mut blocks = blocks.into_iter().peekable();
    while blocks.peek().is_some() {
        MutableBlock::release_all(blocks.by_ref().take(WORKER_STEP));
    }
}

/// What [`register_in_steps`] registered.
pub(crate) struct Registered<T: BlockTier> {
    /// The handles, in order: a prefix of the blocks passed in.
    pub(crate) handles: Vec<ImmutableBlock<T>>,
    /// Per handle, whether it is the slot passed in. Not, under the `Reject` duplication
    /// policy, when the hash was registered meanwhile (by the engine, or another job): the
    /// handle is that block, and the slot passed in went back to the reset pool.
    pub(crate) own: Vec<bool>,
    /// Blocks not registered: a refused step (it cannot be, for blocks `m` allocated itself)
    /// ends the registration, and its blocks and the rest go back to the reset pool.
    pub(crate) refused: usize,
}

/// Registers `blocks` in `m`, in order, one lock acquisition per [`WORKER_STEP`] blocks.
pub(crate) fn register_in_steps<T: BlockTier>(
    m: &BlockManager<T>,
    blocks: Vec<CompleteBlock<T>>,
) -> Registered<T> {
    let ids: Vec<BlockId> = blocks.iter().map(CompleteBlock::block_id).collect();
    let mut handles = Vec::with_capacity(blocks.len());
    let mut blocks = blocks.into_iter();
    let mut refused = 0;
    loop {
        let step: Vec<CompleteBlock<T>> = blocks.by_ref().take(WORKER_STEP).collect();
        if step.is_empty() {
            break;
        }
        match m.register_blocks(step) {
            Ok(h) => handles.extend(h),
            Err(e) => {
                refused = e.into_blocks().len() + blocks.len();
                break;
            }
        }
    }
    let own = handles
        .iter()
        .zip(&ids)
        .map(|(h, &id)| h.block_id() == id)
        .collect();
    Registered {
        handles,
        own,
        refused,
    }
}

/// [`BlockManager::contains_each`], one lock acquisition per [`WORKER_STEP`] hashes.
pub(crate) fn contains_in_steps<T: BlockTier>(
    m: &BlockManager<T>,
    hashes: &[SequenceHash],
) -> Vec<bool> {
    let mut out = Vec::with_capacity(hashes.len());
    for step in hashes.chunks(WORKER_STEP) {
        out.extend(m.contains_each(step));
    }
    out
}

/// [`BlockManager::touch_blocks`], in order, one lock acquisition per [`WORKER_STEP`]
/// hashes; returns how many were touched.
pub(crate) fn touch_in_steps<T: BlockTier>(m: &BlockManager<T>, hashes: &[SequenceHash]) -> usize {
    hashes
        .chunks(WORKER_STEP)
        .map(|step| m.touch_blocks(step))
        .sum()
}

/// [`BlockManager::touch_held`], in order, one lock acquisition per [`WORKER_STEP`] blocks.
pub(crate) fn touch_held_in_steps<'a, T: BlockTier>(
    m: &BlockManager<T>,
    blocks: impl IntoIterator<Item = &'a ImmutableBlock<T>>,
) {
    let blocks: Vec<&ImmutableBlock<T>> = blocks.into_iter().collect();
    for step in blocks.chunks(WORKER_STEP) {
        m.touch_held(step.iter().copied());
    }
}

/// Evicts up to `n` inactive blocks of `m` (see [`kvbm_logical::BlockManager::evict_inactive`]),
/// one lock acquisition per [`WORKER_STEP`] blocks.
pub(crate) fn evict_up_to<T: BlockTier>(
    m: &BlockManager<T>,
    n: usize,
    reason: RemovalReason,
) -> Vec<(MutableBlock<T>, Evicted)> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let want = (n - out.len()).min(WORKER_STEP);
        let taken = m.evict_inactive(want, reason);
        let short = taken.len() < want;
        out.extend(taken);
        if short {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use kvbm_logical::{EvictionBackend, Host, KvEventKind, SequenceHash};

    use super::*;

    fn manager(blocks: usize) -> BlockManager<Host> {
        BlockManager::<Host>::builder()
            .block_count(blocks)
            .block_size(4)
            .build()
            .unwrap()
    }

    /// `n` blocks of `m` staged with hashes `from..from + n`.
    fn staged(m: &BlockManager<Host>, from: u64, n: usize) -> Vec<CompleteBlock<Host>> {
        m.allocate_blocks(n)
            .unwrap()
            .into_iter()
            .zip(from..)
            .map(|(b, h)| b.stage(SequenceHash::new(h), 4).unwrap())
            .collect()
    }

    /// Registers `n` blocks (hashes `1..=n`) and releases them: `n` inactive blocks.
    fn fill_inactive(m: &BlockManager<Host>, n: usize) {
        ImmutableBlock::release_all(m.register_blocks(staged(m, 1, n)).unwrap());
    }

    #[test]
    fn stepped_allocation_takes_what_there_is_across_steps() {
        let total = 3 * WORKER_STEP + 5;
        let m = manager(total);
        // More than one step, all available.
        let a = allocate_up_to(&m, 2 * WORKER_STEP + 3);
        assert_eq!(a.len(), 2 * WORKER_STEP + 3);
        // Asks for more than is left: gets the rest, across a step boundary.
        let b = allocate_up_to(&m, 2 * WORKER_STEP);
        assert_eq!(b.len(), total - a.len());
        assert!(allocate_up_to(&m, 1).is_empty());
        let mut ids: Vec<_> = a.iter().chain(&b).map(|x| x.block_id()).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), total, "no slot handed out twice");
        release_mutable(a);
        release_mutable(b);
        assert_eq!(m.counts().reset, total);
        assert!(allocate_up_to(&m, 0).is_empty());
    }

    #[test]
    fn stepped_allocation_evicts_inactive_blocks_when_the_free_ones_run_out() {
        let m = manager(2 * WORKER_STEP + 7);
        fill_inactive(&m, 2 * WORKER_STEP);
        let got = allocate_up_to(&m, 2 * WORKER_STEP + 7);
        assert_eq!(got.len(), 2 * WORKER_STEP + 7);
        assert_eq!(m.counts().inactive, 0);
        release_mutable(got);
        let c = m.check_invariants().unwrap();
        assert_eq!(c.reset, c.total);
    }

    #[test]
    fn stepped_eviction_takes_only_inactive_blocks_and_stops_when_none_are_left() {
        let m = manager(4 * WORKER_STEP);
        fill_inactive(&m, 2 * WORKER_STEP + 3);
        let free = m.counts().reset;
        let first = evict_up_to(&m, WORKER_STEP + 1, RemovalReason::Evicted);
        assert_eq!(first.len(), WORKER_STEP + 1);
        let rest = evict_up_to(&m, 10 * WORKER_STEP, RemovalReason::Evicted);
        assert_eq!(rest.len(), WORKER_STEP + 2, "only what was inactive");
        assert_eq!(m.counts().reset, free, "free blocks are not taken");
        let mut hashes: Vec<u64> = first
            .iter()
            .chain(&rest)
            .map(|(_, e)| e.hash.as_u64())
            .collect();
        hashes.sort_unstable();
        assert_eq!(hashes, (1..=2 * WORKER_STEP as u64 + 3).collect::<Vec<_>>());
        release_mutable(first.into_iter().chain(rest).map(|(b, _)| b));
        assert_eq!(m.counts().reset, 4 * WORKER_STEP);
        assert!(evict_up_to(&m, 5, RemovalReason::Evicted).is_empty());
    }

    #[test]
    fn stepped_release_returns_every_block() {
        let m = manager(3 * WORKER_STEP + 1);
        fill_inactive(&m, 3 * WORKER_STEP + 1);
        let held = m.scan_matches(
            &(1..=3 * WORKER_STEP as u64 + 1)
                .map(SequenceHash::new)
                .collect::<Vec<_>>(),
            false,
        );
        assert_eq!(held.len(), 3 * WORKER_STEP + 1);
        assert_eq!(m.counts().active, 3 * WORKER_STEP + 1);
        release_immutable(held);
        let c = m.check_invariants().unwrap();
        assert_eq!((c.active, c.inactive), (0, 3 * WORKER_STEP + 1));
    }
    // The helpers really take the lock once per step: event batches (one per lock
    // acquisition) and counts seen between steps.

    /// (batches, hashes) of the `Stored` and `Removed` events received.
    fn batches(sub: &kvbm_logical::EventSubscriber) -> ((usize, usize), (usize, usize)) {
        let (mut stored, mut removed) = ((0, 0), (0, 0));
        for batch in sub.drain() {
            let (mut s, mut r) = (0, 0);
            for e in batch.iter() {
                match &e.kind {
                    KvEventKind::Stored { block_hashes, .. } => s += block_hashes.len(),
                    KvEventKind::Removed { block_hashes, .. } => r += block_hashes.len(),
                    _ => {}
                }
            }
            if s > 0 {
                stored = (stored.0 + 1, stored.1 + s);
            }
            if r > 0 {
                removed = (removed.0 + 1, removed.1 + r);
            }
        }
        (stored, removed)
    }

    #[test]
    fn registration_and_eviction_take_one_lock_per_step() {
        let n = 3 * WORKER_STEP + 1;
        let m = manager(n);
        let sub = m.subscribe(1024);
        let Registered {
            handles, refused, ..
        } = register_in_steps(&m, staged(&m, 1, n));
        assert_eq!((handles.len(), refused), (n, 0));
        assert!(
            handles
                .iter()
                .zip(1u64..)
                .all(|(h, k)| h.sequence_hash() == SequenceHash::new(k)),
            "in order"
        );
        assert_eq!(batches(&sub).0, (4, n), "one Stored batch per step");
        ImmutableBlock::release_all(handles);
        let evicted = evict_up_to(&m, n, RemovalReason::Evicted);
        assert_eq!(evicted.len(), n);
        assert_eq!(batches(&sub).1, (4, n), "one Removed batch per step");
        release_mutable(evicted.into_iter().map(|(b, _)| b));
    }

    #[test]
    fn own_tells_a_slot_registered_from_a_hash_registered_already() {
        // Under `Reject` (the default), a hash registered meanwhile comes back as that block.
        let m = manager(3 * WORKER_STEP);
        let first = register_in_steps(&m, staged(&m, 1, WORKER_STEP + 2));
        assert!(first.own.iter().all(|&o| o));
        // Half new hashes, half the ones just registered, across a step boundary.
        let second = register_in_steps(&m, staged(&m, 3, WORKER_STEP));
        assert_eq!(second.handles.len(), WORKER_STEP);
        let expect: Vec<bool> = (3..3 + WORKER_STEP as u64)
            .map(|h| h > WORKER_STEP as u64 + 2)
            .collect();
        assert_eq!(second.own, expect);
        for (h, own) in second.handles.iter().zip(&second.own) {
            let k = h.sequence_hash().as_u64();
            if !own {
                assert_eq!(h.block_id(), first.handles[k as usize - 1].block_id());
            }
        }
        ImmutableBlock::release_all(first.handles);
        ImmutableBlock::release_all(second.handles);
        let c = m.check_invariants().unwrap();
        assert_eq!(c.active, 0);
    }

    #[test]
    fn a_release_lets_the_lock_go_between_steps() {
        let n = 2 * WORKER_STEP + 3;
        let m = manager(n);
        let held = m.register_blocks(staged(&m, 1, n)).unwrap();
        // The iterator runs outside the lock: the inactive count it sees grows by a step
        // after each step's release.
        let mut seen = Vec::new();
        release_immutable(held.into_iter().inspect(|_| seen.push(m.counts().inactive)));
        let expect: Vec<usize> = (0..n).map(|k| k / WORKER_STEP * WORKER_STEP).collect();
        assert_eq!(seen, expect);
        assert_eq!(m.counts().inactive, n);
    }

    #[test]
    fn a_refused_step_ends_the_registration_and_gives_its_blocks_back() {
        let m = manager(2 * WORKER_STEP);
        let other = manager(WORKER_STEP);
        // One step of m's own blocks, then a step that mixes in another manager's.
        let mut blocks = staged(&m, 1, WORKER_STEP + 4);
        blocks.extend(staged(&other, 100, WORKER_STEP - 4));
        let Registered {
            handles, refused, ..
        } = register_in_steps(&m, blocks);
        assert_eq!((handles.len(), refused), (WORKER_STEP, WORKER_STEP));
        let c = m.check_invariants().unwrap();
        assert_eq!(
            (c.active, c.reset),
            (WORKER_STEP, WORKER_STEP),
            "4 back to m's reset pool"
        );
        assert_eq!(
            other.counts().reset,
            WORKER_STEP,
            "the foreign blocks went home"
        );
        ImmutableBlock::release_all(handles);
    }

    // The stepped probes and touches give what one call would: two identical managers, one
    // driven in steps, one in a single call, end in the same state.
    const N: usize = 3 * WORKER_STEP + 5;

    fn twin() -> BlockManager<Host> {
        let m = BlockManager::<Host>::builder()
            .block_count(N)
            .block_size(4)
            .eviction(EvictionBackend::Lru)
            .build()
            .unwrap();
        fill_inactive(&m, N);
        m
    }

    fn victims(m: &BlockManager<Host>) -> Vec<u64> {
        let taken = m.evict_inactive(N, RemovalReason::Evicted);
        taken.iter().map(|(_, e)| e.hash.as_u64()).collect()
    }

    #[test]
    fn stepped_probes_and_touches_match_one_call() {
        // Every third hash, backwards (a touch order unlike the pool's), plus absent ones.
        let hashes: Vec<SequenceHash> = (1..=N as u64 + 9)
            .rev()
            .filter(|h| h % 3 != 0)
            .map(SequenceHash::new)
            .collect();
        let (a, b) = (twin(), twin());
        assert_eq!(contains_in_steps(&a, &hashes), b.contains_each(&hashes));
        assert_eq!(touch_in_steps(&a, &hashes), b.touch_blocks(&hashes));
        let order = victims(&a);
        assert_eq!(order.len(), N);
        assert_eq!(order, victims(&b), "touches applied in order");
        // Held blocks marked used, in steps and at once.
        let (a, b) = (twin(), twin());
        let held_a = a.scan_matches(&hashes[5..], false);
        let held_b = b.scan_matches(&hashes[5..], false);
        assert!(held_a.len() > WORKER_STEP);
        touch_held_in_steps(&a, held_a.iter());
        b.touch_held(held_b.iter());
        ImmutableBlock::release_all(held_a);
        ImmutableBlock::release_all(held_b);
        assert_eq!(victims(&a), victims(&b), "the same order once released");
    }
}
