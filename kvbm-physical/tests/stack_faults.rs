//! Injected faults in the tier stack: the fault tests of the tiered manager ported (failed
//! copies and corrupt checksums lose nothing's accounting and serve nothing wrong), and a
//! store tier below G2 (an in-memory `StoreTier` with fault switches): offload through
//! admission, the multi-hop onboard store → G2 → G1, corrupt values, misses of deferred
//! probes, failed reads and an unreachable store.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use common::{
    MemStore, StackOpts, assert_stack_idle, assert_stack_kv, chain, stack_compute, stack_flush_g1,
};
use kvbm_logical::{BlockManager, Host, ImmutableBlock, KvEventKind, SequenceHash};
use kvbm_physical::FaultPlan;
use kvbm_physical::stack::{
    Admission, EndReason, EngineSync, LostCause, Onboarded, Probe, Skip, StoreTierConfig, TierId,
    TierStack,
};
use kvbm_physical::store_tier::{PutOutcome, StoreBlock, StoreTier};

fn hashes() -> Vec<SequenceHash> {
    (1..=4).map(|i| SequenceHash::new(100 + i)).collect()
}

fn faulty(plan: FaultPlan, write_back: bool) -> TierStack {
    let mut opts = StackOpts {
        faults: Some(Arc::new(plan)),
        ..StackOpts::new(4, 8)
    };
    if write_back {
        opts = opts.eager_write_back();
    }
    opts.build().0
}

fn fetch(s: &TierStack, hashes: &[SequenceHash]) -> Onboarded {
    s.onboard(s.lookup(hashes), usize::MAX).unwrap().wait()
}

fn stat(s: &TierStack, tier: TierId) -> kvbm_physical::stack::TierStats {
    s.stats().tier(tier).unwrap().clone()
}

#[test]
fn a_failed_write_through_copy_leaves_g1_whole_and_g2_without_the_block() {
    let t = faulty(FaultPlan::new().fail_pairs(0, [2]), false);
    let events = t.g2().subscribe(64);
    let hs = hashes();
    let reg = stack_compute(&t, &hs, 0);
    t.flush();
    assert_stack_kv(&t, &reg);
    assert!(!t.g2().contains(hs[2]));
    assert!([0, 1, 3].iter().all(|&i| t.g2().contains(hs[i])));
    // G2 announced exactly the three blocks it stored.
    let mut stored: Vec<SequenceHash> = Vec::new();
    for batch in events.drain() {
        for e in batch.iter() {
            if let KvEventKind::Stored { block_hashes, .. } = &e.kind {
                stored.extend(block_hashes.iter().copied());
            }
        }
    }
    assert_eq!(stored, vec![hs[0], hs[1], hs[3]]);
    let g2 = stat(&t, TierId::G2);
    assert_eq!((g2.offloaded, g2.lost), (3, 1));
    drop(reg);
    assert_stack_idle(&t);
}

#[test]
fn a_failed_onboard_returns_the_prefix_that_landed_and_never_retries_the_block() {
    // Batch 0: the write-through offload; batch 1: the onboard, whose third pair fails.
    let t = faulty(FaultPlan::new().fail_pairs(1, [2]), false);
    let hs = hashes();
    ImmutableBlock::release_all(stack_compute(&t, &hs, 0));
    t.flush();
    stack_flush_g1(&t);
    let m = fetch(&t, &hs);
    assert_eq!((m.g1_hits, m.onboarded, m.blocks.len()), (0, 2, 2));
    assert_stack_kv(&t, &m.blocks);
    assert_eq!(m.lost.len(), 1);
    assert_eq!(
        (m.lost[0].hash, m.lost[0].tier, m.lost[0].cause.clone()),
        (hs[2], TierId::G2, LostCause::CopyFailed)
    );
    assert_eq!(m.end.as_ref().unwrap().at, 2);
    // Nothing half-copied was registered; the two slots past the end are the caller's, as
    // fresh blocks, and go back when dropped.
    assert!(!t.g1().contains(hs[2]) && !t.g1().contains(hs[3]));
    assert_eq!(m.spare.len(), 2);
    let c = t.g1().counts();
    assert_eq!((c.active, c.mutable), (2, 2));
    // The block whose copy failed is invalidated where it was (the rule: a failed
    // block is never retried forever); the rest of G2 is intact.
    assert!(!t.g2().contains(hs[2]));
    assert!(t.g2().contains(hs[3]));
    assert_eq!(stat(&t, TierId::G2).lost, 1);
    drop(m);
    // A retry stops before the failed block, without copying anything.
    let again = fetch(&t, &hs);
    assert!(again.lost.is_empty());
    assert_eq!((again.g1_hits, again.blocks.len()), (2, 2));
    drop(again);
    assert_stack_idle(&t);
}

#[test]
fn a_failed_write_back_copy_loses_only_that_block() {
    // Write-back: the first copy is the reclaimer's (batch 0).
    let t = faulty(FaultPlan::new().fail_pairs(0, [0]), true);
    let hs = hashes();
    ImmutableBlock::release_all(stack_compute(&t, &hs, 0));
    drop(t.allocate(0).unwrap());
    // One more allocation wakes the reclaimer (the pool is all inactive: it evicts one
    // directly, the reclaimer the other three). If the reclaimer's copies already hold all
    // four (a slot being read is never handed out), that is back-pressure: wait for them.
    let fresh = match t.allocate(1) {
        Ok(fresh) => fresh,
        Err(_) => {
            t.flush();
            t.allocate(1).unwrap()
        }
    };
    drop(fresh);
    t.flush();
    let g2 = stat(&t, TierId::G2);
    let in_g2 = hs.iter().filter(|&&h| t.g2().contains(h)).count() as u64;
    assert_eq!(g2.offloaded, in_g2);
    assert_eq!(g2.lost, 1, "{g2:?}");
    assert_eq!(
        g2.offloaded + g2.lost + g2.skipped(Skip::ReclaimBehind),
        4,
        "{g2:?}"
    );
    assert_stack_idle(&t);
}

#[test]
fn a_corrupt_checksum_in_g2_drops_the_block_from_g2() {
    // Records 0..3 are the four G2 blocks of the write-through; the third is recorded wrong.
    let t = faulty(FaultPlan::new().corrupt_checksum_record(2), false);
    let hs = hashes();
    ImmutableBlock::release_all(stack_compute(&t, &hs, 0));
    t.flush();
    stack_flush_g1(&t);
    let m = fetch(&t, &hs);
    assert_eq!(m.blocks.len(), 2);
    assert_stack_kv(&t, &m.blocks);
    assert_eq!(m.lost[0].cause, LostCause::Corrupt);
    assert!(!t.g2().contains(hs[2]), "the corrupt copy is gone from G2");
    drop(m);
    assert_stack_idle(&t);
}

/// A stack over a [`MemStore`] G3; returns it, the store and a back door to G2.
fn with_store(
    probe: Probe,
    admission: Admission,
    frequency: bool,
) -> (TierStack, Arc<MemStore>, BlockManager<Host>) {
    let bytes = StackOpts::new(1, 1).block_bytes();
    let store = Arc::new(MemStore::new(bytes, 64));
    let cfg = StoreTierConfig::new(store.clone())
        .probe(probe)
        .admission(admission);
    let (t, _, m2) = StackOpts {
        stores: vec![cfg],
        frequency,
        ..StackOpts::new(4, 4)
    }
    .build();
    (t, store, m2)
}

/// Evicts every inactive block from G1 and G2 (G2 through the back door).
fn evict_g1_g2(t: &TierStack, m2: &BlockManager<Host>) {
    t.flush();
    stack_flush_g1(t);
    drop(m2.allocate_blocks(m2.available_blocks()).unwrap());
}

#[test]
fn store_blocks_onboard_through_g2_into_g1() {
    let (t, store, m2) = with_store(Probe::OnLookup, Admission::Presence, false);
    let hs = chain(30, 4);
    ImmutableBlock::release_all(stack_compute(&t, &hs, 0));
    t.flush();
    assert!(hs.iter().all(|&h| store.holds(h)));
    assert_eq!(stat(&t, TierId::Store(0)).offloaded, 4);
    evict_g1_g2(&t, &m2);
    assert!(
        hs.iter()
            .all(|&h| !t.g1().contains(h) && !t.g2().contains(h))
    );

    let plan = t.lookup(&hs);
    assert_eq!(
        (plan.from_tier(TierId::Store(0)), plan.unverified()),
        (4, 0)
    );
    let m = t.onboard(plan, usize::MAX).unwrap().wait();
    assert!(m.end.is_none() && m.lost.is_empty(), "{m:?}");
    assert_eq!(m.blocks.len(), 4);
    assert_stack_kv(&t, &m.blocks);
    // Staged in G2 on the way (a cache fill), and not written back to the store.
    assert!(hs.iter().all(|&h| t.g2().contains(h)));
    let g3 = stat(&t, TierId::Store(0));
    assert_eq!((g3.onboarded, g3.offloaded), (4, 4));
    drop(m);
    // Parents were kept: the chain matches in G1 now.
    assert_eq!(t.lookup(&hs).g1_hits(), 4);
    assert_stack_idle(&t);
}

#[test]
fn a_corrupt_store_value_ends_the_prefix_and_leaves_the_store() {
    let (t, store, m2) = with_store(Probe::OnLookup, Admission::Presence, false);
    let hs = chain(31, 4);
    ImmutableBlock::release_all(stack_compute(&t, &hs, 0));
    evict_g1_g2(&t, &m2);
    store.corrupt(hs[2]);
    let m = fetch(&t, &hs);
    assert_eq!(m.blocks.len(), 2);
    assert_stack_kv(&t, &m.blocks);
    assert_eq!(
        (m.lost[0].hash, m.lost[0].tier, m.lost[0].cause.clone()),
        (hs[2], TierId::Store(0), LostCause::Corrupt)
    );
    assert!(!store.holds(hs[2]), "removed, never served again");
    assert!(!t.g2().contains(hs[2]) && !t.g1().contains(hs[2]));
    assert_eq!(stat(&t, TierId::Store(0)).lost, 1);
    drop(m);
    assert_stack_idle(&t);
}

#[test]
fn a_deferred_probe_fetches_on_demand_and_a_miss_just_ends_the_prefix() {
    let (t, store, m2) = with_store(Probe::Deferred, Admission::Presence, false);
    let hs = chain(32, 4);
    ImmutableBlock::release_all(stack_compute(&t, &hs, 0));
    evict_g1_g2(&t, &m2);
    store.evict(hs[2]); // the store's own eviction
    let plan = t.lookup(&hs);
    assert_eq!((plan.len(), plan.unverified()), (4, 4), "no round trip");
    let reset = t.g1().counts().reset;
    let m = t.onboard(plan, usize::MAX).unwrap().wait();
    assert_eq!(m.blocks.len(), 2);
    assert_stack_kv(&t, &m.blocks);
    assert!(m.lost.is_empty(), "a miss is not a loss");
    assert_eq!(
        m.end.as_ref().map(|e| (e.at, e.reason.clone())),
        Some((
            2,
            EndReason::Miss {
                tier: TierId::Store(0)
            }
        ))
    );
    // The two slots allocated for the blocks past the end are handed over, fresh, for
    // the caller to compute them into; they go back when dropped.
    assert_eq!(m.spare.len(), 2);
    assert_eq!(t.g1().counts().reset, reset - 4);
    assert_eq!(stat(&t, TierId::Store(0)).lost, 0);
    let Onboarded { blocks, spare, .. } = m;
    let computed = common::stack_write_register(&t, spare, &hs, 2);
    assert_eq!(t.lookup(&hs).g1_hits(), 4, "the spare slots took the rest");
    drop((blocks, computed));
    t.flush();
    assert_stack_idle(&t);
}

#[test]
fn a_deferred_probes_misses_take_no_g2_slot() {
    // A deferred tier plans every block G1 and G2 lack from the store, unverified, so a
    // request's new blocks are planned from it too. Their reads must not take G2 slots
    // before the store has answered: a slot taken for a miss evicts a cached block for
    // nothing.
    let (t, store, _m2) = with_store(Probe::Deferred, Admission::Presence, false);
    let cached = chain(37, 4);
    ImmutableBlock::release_all(stack_compute(&t, &cached, 0));
    t.flush();
    stack_flush_g1(&t);
    assert!(cached.iter().all(|&h| t.g2().contains(h)));
    assert_eq!(
        t.g2().counts().reset,
        0,
        "G2 is full: each slot taken evicts"
    );
    // A new chain: its first two blocks are in the store only (another server put them),
    // the other two nowhere.
    let new = chain(38, 4);
    for i in 0..2 {
        assert_eq!(put_block(&t, &*store, &new, i), vec![PutOutcome::Stored]);
    }
    let plan = t.lookup(&new);
    assert_eq!((plan.len(), plan.unverified()), (4, 4));
    let m = t.onboard(plan, usize::MAX).unwrap().wait();
    assert_eq!(m.blocks.len(), 2);
    assert_stack_kv(&t, &m.blocks);
    assert_eq!(
        m.end.as_ref().map(|e| (e.at, e.reason.clone())),
        Some((
            2,
            EndReason::Miss {
                tier: TierId::Store(0)
            }
        ))
    );
    assert!(m.lost.is_empty());
    // The two store blocks were staged in G2, evicting two cached blocks; the two misses
    // took no slot, so the other two cached blocks are still there.
    assert!(new[..2].iter().all(|&h| t.g2().contains(h)));
    let still = cached.iter().filter(|&&h| t.g2().contains(h)).count();
    assert_eq!(
        still,
        2,
        "G2 lost {} cached blocks to two misses",
        2 - still
    );
    drop(m);
    t.flush();
    assert_stack_idle(&t);
}

#[test]
fn a_failed_store_read_is_lost_and_invalidated() {
    let (t, store, m2) = with_store(Probe::OnLookup, Admission::Presence, false);
    let hs = chain(33, 2);
    ImmutableBlock::release_all(stack_compute(&t, &hs, 0));
    evict_g1_g2(&t, &m2);
    store.fail_gets.store(true, Ordering::SeqCst);
    let m = fetch(&t, &hs);
    assert!(m.blocks.is_empty());
    assert_eq!(m.lost.len(), 2);
    assert!(matches!(m.lost[0].cause, LostCause::StoreFailed(_)));
    assert!(store.removed.lock().contains(&hs[0]));
    drop(m);
    assert_stack_idle(&t);
}

#[test]
fn a_transient_store_read_failure_is_a_miss_that_keeps_the_block() {
    // A remote store shared by many servers must not lose a good block because one
    // connection timed out: the prefix ends, nothing is invalidated, and the next lookup
    // serves the block once the store answers again.
    let (t, store, m2) = with_store(Probe::Deferred, Admission::Presence, false);
    let hs = chain(36, 3);
    ImmutableBlock::release_all(stack_compute(&t, &hs, 0));
    evict_g1_g2(&t, &m2);
    store.unavailable.store(true, Ordering::SeqCst);
    let m = fetch(&t, &hs);
    assert!(m.blocks.is_empty());
    assert!(m.lost.is_empty(), "a transient failure is not a loss");
    assert_eq!(
        m.end.as_ref().map(|e| (e.at, e.reason.clone())),
        Some((
            0,
            EndReason::Miss {
                tier: TierId::Store(0)
            }
        ))
    );
    assert!(
        store.removed.lock().is_empty(),
        "nothing removed from the store"
    );
    assert!(hs.iter().all(|&h| store.holds(h)));
    assert_eq!(stat(&t, TierId::Store(0)).lost, 0);
    drop(m);
    store.unavailable.store(false, Ordering::SeqCst);
    let m = fetch(&t, &hs);
    assert_eq!(m.blocks.len(), 3, "served once the store answers again");
    assert_stack_kv(&t, &m.blocks);
    drop(m);
    assert_stack_idle(&t);
}

#[test]
fn an_unreachable_store_turns_into_skips_and_misses() {
    let (t, store, m2) = with_store(Probe::OnLookup, Admission::Presence, false);
    store.unavailable.store(true, Ordering::SeqCst);
    let hs = chain(34, 3);
    ImmutableBlock::release_all(stack_compute(&t, &hs, 0));
    t.flush();
    assert_eq!(stat(&t, TierId::Store(0)).skipped(Skip::Unavailable), 3);
    evict_g1_g2(&t, &m2);
    let plan = t.lookup(&hs);
    assert!(plan.is_empty(), "nothing to plan from a store that is down");
    drop(plan);
    assert_stack_idle(&t);
}

#[test]
fn failed_store_writes_are_lost_there_and_nowhere_else() {
    let (t, store, _) = with_store(Probe::OnLookup, Admission::Presence, false);
    store.fail_puts.store(true, Ordering::SeqCst);
    let hs = chain(35, 3);
    let reg = stack_compute(&t, &hs, 0);
    t.flush();
    assert_eq!(stat(&t, TierId::Store(0)).lost, 3);
    assert_eq!(stat(&t, TierId::G2).offloaded, 3);
    assert!(hs.iter().all(|&h| t.g2().contains(h)));
    drop(reg);
    assert_stack_idle(&t);
}

#[test]
fn a_corrupt_g2_block_is_never_written_to_the_store() {
    // Record 1 (the second G2 block of the offload) is stored wrong: the store job finds it.
    let bytes = StackOpts::new(1, 1).block_bytes();
    let store = Arc::new(MemStore::new(bytes, 64));
    let (t, _, _) = StackOpts {
        stores: vec![StoreTierConfig::new(store.clone())],
        faults: Some(Arc::new(FaultPlan::new().corrupt_checksum_record(1))),
        ..StackOpts::new(4, 4)
    }
    .build();
    let hs = chain(36, 3);
    ImmutableBlock::release_all(stack_compute(&t, &hs, 0));
    t.flush();
    assert!(store.holds(hs[0]) && store.holds(hs[2]));
    assert!(!store.holds(hs[1]));
    assert!(!t.g2().contains(hs[1]), "invalidated in G2 too");
    assert_eq!(stat(&t, TierId::G2).lost, 1);
    assert_stack_idle(&t);
}

#[test]
fn store_admission_by_frequency_refuses_cold_blocks() {
    let (t, store, _) = with_store(Probe::OnLookup, Admission::MinFrequency(2), true);
    let hs = chain(37, 2);
    ImmutableBlock::release_all(stack_compute(&t, &hs, 0));
    t.flush();
    assert_eq!(store.len(), 0);
    assert_eq!(stat(&t, TierId::Store(0)).skipped(Skip::Admission), 2);
    assert_stack_idle(&t);
}

#[test]
fn an_offload_that_both_spills_and_fails_counts_every_block_once() {
    // G2 has room for 2 of the 4 blocks, and the copy of the first of those 2 fails.
    let (t, _, _) = StackOpts {
        faults: Some(Arc::new(FaultPlan::new().fail_pairs(0, [0]))),
        ..StackOpts::new(4, 2)
    }
    .build();
    let events = t.g2().subscribe(64);
    let hs = hashes();
    let reg = stack_compute(&t, &hs, 0);
    t.flush();
    // G2 announced exactly the one block that reached it; the other three (the failed copy
    // and the two that found no room) are each counted once, by cause.
    let mut stored: Vec<SequenceHash> = Vec::new();
    for batch in events.drain() {
        for e in batch.iter() {
            if let KvEventKind::Stored { block_hashes, .. } = &e.kind {
                stored.extend(block_hashes.iter().copied());
            }
        }
    }
    assert_eq!(stored, vec![hs[1]]);
    let g2 = stat(&t, TierId::G2);
    assert_eq!(
        (g2.offloaded, g2.lost, g2.skipped(Skip::NoRoom)),
        (1, 1, 2),
        "{g2:?}"
    );
    assert_eq!(g2.offloaded + g2.lost + g2.skipped_total(), 4, "each once");
    assert!(t.g2().contains(hs[1]));
    assert!([0, 2, 3].iter().all(|&i| !t.g2().contains(hs[i])));
    // G1 is whole: every block registered with its bytes.
    assert_stack_kv(&t, &reg);
    drop(reg);
    assert_stack_idle(&t);
}

#[test]
fn an_onboards_evictions_are_counted_once_and_the_onboard_lands_whole() {
    // Write-back: chain A is reclaimed into G2; chain B is computed into the freed G1 and
    // released. Onboarding A needs all of G1: B leaves it, each block either through the
    // reclaimer (offloaded) or through the onboard's own allocation (skipped as
    // `reclaim_behind`), whichever gets there first — never lost, never counted twice.
    let (t, _, _) = StackOpts::new(4, 8).eager_write_back().build();
    let a = chain(40, 4);
    let b = chain(41, 4);
    ImmutableBlock::release_all(stack_compute(&t, &a, 0));
    t.flush();
    drop(t.allocate(0).unwrap()); // below the low watermark: the reclaimer takes the rest
    t.flush();
    assert!(a.iter().all(|&h| t.g2().contains(h) && !t.g1().contains(h)));
    ImmutableBlock::release_all(stack_compute(&t, &b, 0));
    let m = match t.onboard(t.lookup(&a), usize::MAX) {
        Ok(p) => p.wait(),
        Err(e) => {
            // The reclaimer held B's slots while copying them: back-pressure, retry.
            t.flush();
            t.onboard(e.into_plan(), usize::MAX).unwrap().wait()
        }
    };
    assert_eq!((m.onboarded, m.blocks.len()), (4, 4), "{m:?}");
    assert!(m.lost.is_empty() && m.end.is_none(), "{m:?}");
    assert_eq!(m.sync, EngineSync::Ready, "host copies need no event");
    assert_stack_kv(&t, &m.blocks);
    t.flush();
    let g2 = stat(&t, TierId::G2);
    let b_in_g2 = b.iter().filter(|&&h| t.g2().contains(h)).count() as u64;
    assert!(b.iter().all(|&h| !t.g1().contains(h)));
    assert_eq!(g2.offloaded, 4 + b_in_g2, "{g2:?}");
    assert_eq!(g2.skipped(Skip::ReclaimBehind), 4 - b_in_g2, "{g2:?}");
    assert_eq!(g2.lost, 0);
    drop(m);
    assert_stack_idle(&t);
}

/// A store that counts the blocks it is asked to read.
#[derive(Debug)]
struct CountingStore {
    inner: Arc<MemStore>,
    reads: std::sync::atomic::AtomicUsize,
}

impl StoreTier for CountingStore {
    fn medium(&self) -> &'static str {
        self.inner.medium()
    }
    fn block_bytes(&self) -> usize {
        self.inner.block_bytes()
    }
    fn contains(&self, hashes: &[SequenceHash]) -> Vec<bool> {
        self.inner.contains(hashes)
    }
    fn put(&self, blocks: &[StoreBlock<'_>]) -> Vec<PutOutcome> {
        self.inner.put(blocks)
    }
    fn get(
        &self,
        hashes: &[SequenceHash],
        out: &mut [&mut [u8]],
    ) -> Vec<kvbm_physical::store_tier::GetOutcome> {
        self.reads.fetch_add(hashes.len(), Ordering::SeqCst);
        self.inner.get(hashes, out)
    }
    fn remove(&self, hashes: &[SequenceHash]) {
        self.inner.remove(hashes)
    }
    fn stats(&self) -> kvbm_physical::store_tier::StoreStats {
        self.inner.stats()
    }
}

impl CountingStore {
    fn new(bytes: usize) -> Arc<Self> {
        Arc::new(Self {
            inner: Arc::new(MemStore::new(bytes, 64)),
            reads: Default::default(),
        })
    }
}

/// G1 and G2 of 8 blocks over `g3` (probed on lookup) and `g4` (deferred, as a remote one).
fn local_and_remote(g3: Arc<dyn StoreTier>, g4: Arc<dyn StoreTier>) -> TierStack {
    StackOpts {
        stores: vec![
            StoreTierConfig::new(g3).probe(Probe::OnLookup),
            StoreTierConfig::new(g4).probe(Probe::Deferred),
        ],
        ..StackOpts::new(8, 8)
    }
    .build()
    .0
}

/// Puts block `i` of chain `hs`, with the bytes the stack computes for it, into `store` (as
/// another server would have).
fn put_block(
    t: &TierStack,
    store: &dyn StoreTier,
    hs: &[SequenceHash],
    i: usize,
) -> Vec<PutOutcome> {
    let image = common::stack_kv(t, hs[i]);
    store.put(&[StoreBlock {
        hash: hs[i],
        parent: i.checked_sub(1).map(|p| hs[p]),
        bytes: &image,
    }])
}

#[test]
fn a_deferred_tier_is_not_read_past_where_a_verified_tier_ended_the_prefix() {
    // G3 (asked at lookup) has blocks 0..4, a remote G4 (deferred) is planned for 4..8. G3
    // evicts block 0 between lookup and onboard: the prefix ends at 0, and G4, behind a
    // round trip, is not asked at all (a corrupt block 5 there is neither reported lost nor
    // removed from the store every server shares).
    let bytes = StackOpts::new(1, 1).block_bytes();
    let g3 = Arc::new(MemStore::new(bytes, 64));
    let g4 = CountingStore::new(bytes);
    let t = local_and_remote(g3.clone(), g4.clone());
    let hs = chain(41, 8);
    for i in 0..hs.len() {
        let store: &dyn StoreTier = if i < 4 { &*g3 } else { &*g4 };
        assert_eq!(put_block(&t, store, &hs, i), vec![PutOutcome::Stored]);
    }
    g4.inner.corrupt(hs[5]);
    let plan = t.lookup(&hs);
    assert_eq!((plan.len(), plan.unverified()), (8, 4));
    g3.evict(hs[0]);
    let m = t.onboard(plan, usize::MAX).unwrap().wait();
    assert!(m.blocks.is_empty());
    assert_eq!(
        m.end.as_ref().map(|e| (e.at, e.reason.clone())),
        Some((
            0,
            EndReason::Miss {
                tier: TierId::Store(0)
            }
        ))
    );
    assert_eq!(g4.reads.load(Ordering::SeqCst), 0, "G4 was read");
    assert!(m.lost.is_empty(), "{:?}", m.lost);
    assert_eq!(stat(&t, TierId::Store(1)).lost, 0);
    assert!(g4.inner.removed.lock().is_empty());
    drop(m);
    assert_stack_idle(&t);
    // With G3's block back, the whole chain comes up: G3's four, then G4's until the
    // corrupt one (reported, and removed by the store itself).
    put_block(&t, &*g3, &hs, 0);
    let m = fetch(&t, &hs);
    assert_eq!(m.blocks.len(), 5);
    assert_stack_kv(&t, &m.blocks);
    assert_eq!(m.lost.len(), 1);
    assert_eq!(m.lost[0].hash, hs[5]);
    drop(m);
    assert_stack_idle(&t);
}

#[test]
fn a_verified_block_after_a_remote_miss_is_not_read() {
    // G3 has blocks 0, 1 and 3; block 2 is planned from the deferred G4, which misses it. The
    // prefix ends at 2: G3's block 3 is neither read nor given a G2 slot, and, corrupt, is
    // not reported lost past the end.
    let bytes = StackOpts::new(1, 1).block_bytes();
    let g3 = CountingStore::new(bytes);
    let t = local_and_remote(g3.clone(), Arc::new(MemStore::new(bytes, 64)));
    let hs = chain(42, 4);
    for i in [0, 1, 3] {
        assert_eq!(put_block(&t, &*g3, &hs, i), vec![PutOutcome::Stored]);
    }
    g3.inner.corrupt(hs[3]);
    let plan = t.lookup(&hs);
    assert_eq!((plan.len(), plan.unverified()), (4, 1));
    let m = t.onboard(plan, usize::MAX).unwrap().wait();
    assert_eq!(m.blocks.len(), 2);
    assert_stack_kv(&t, &m.blocks);
    assert_eq!(
        m.end.as_ref().map(|e| (e.at, e.reason.clone())),
        Some((
            2,
            EndReason::Miss {
                tier: TierId::Store(1)
            }
        ))
    );
    assert_eq!(g3.reads.load(Ordering::SeqCst), 2, "G3 read past the miss");
    assert!(m.lost.is_empty(), "{:?}", m.lost);
    assert_eq!(stat(&t, TierId::Store(0)).lost, 0);
    drop(m);
    assert_stack_idle(&t);
}
