//! The tier stack on two system-memory tiers: the tiered manager's tests ported to
//! plan/commit and asynchronous offload, and the stack's own behaviour (lookup across tiers,
//! back-pressure, cancellation, queue bounds, the scheduler never waiting, write-back
//! reclaim, metrics, shutdown).

mod common;

use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use common::{
    GateCopies, OpenOnDrop, STACK_PAGE, StackOpts, assert_stack_conserved, assert_stack_idle,
    assert_stack_kv, chain, stack_compute, stack_flush_g1,
};
use kvbm_logical::{BlockManager, Device, Host, ImmutableBlock, SequenceHash};
use kvbm_physical::stack::{
    EndReason, EngineSync, LostCause, OnboardError, Skip, StackError, TierId, TierStack,
    Watermarks, WriteMode,
};
use kvbm_physical::{Layout, LayoutConfig, LayoutKind};

/// Plans and onboards `hashes`, waiting for the result.
fn fetch(s: &TierStack, hashes: &[SequenceHash]) -> kvbm_physical::stack::Onboarded {
    s.onboard(s.lookup(hashes), usize::MAX).unwrap().wait()
}

/// The hashes of the `Removed` events with `reason` the subscriber has received.
fn removed(
    events: &kvbm_logical::EventSubscriber,
    reason: kvbm_logical::RemovalReason,
) -> Vec<SequenceHash> {
    events
        .drain()
        .flat_map(|batch| batch.to_vec())
        .filter_map(|e| match e.kind {
            kvbm_logical::KvEventKind::Removed {
                block_hashes,
                reason: r,
            } if r == reason => Some(block_hashes),
            _ => None,
        })
        .flatten()
        .collect()
}

fn skipped(s: &TierStack, tier: TierId, why: Skip) -> u64 {
    s.stats().tier(tier).unwrap().skipped(why)
}

#[test]
fn write_through_offloads_on_register_and_onboards_on_commit() {
    let (t, _, _) = StackOpts::new(4, 8).build();
    let hashes = chain(1, 4);
    let reg = stack_compute(&t, &hashes, 0);
    t.flush();
    assert!(hashes.iter().all(|&h| t.g2().contains(h)));
    assert_eq!(t.stats().tier(TierId::G2).unwrap().offloaded, 4);
    ImmutableBlock::release_all(reg);

    stack_flush_g1(&t);
    assert!(hashes.iter().all(|&h| !t.g1().contains(h)));
    assert_eq!(
        skipped(&t, TierId::G2, Skip::ReclaimBehind),
        0,
        "write-through loses nothing at eviction"
    );

    let plan = t.lookup(&hashes);
    assert_eq!(
        (plan.len(), plan.g1_hits(), plan.from_tier(TierId::G2)),
        (4, 0, 4)
    );
    assert_eq!(plan.blocks_needed(), 4);
    let m = t.onboard(plan, usize::MAX).unwrap().wait();
    assert!(m.end.is_none() && m.lost.is_empty(), "{m:?}");
    assert_eq!((m.g1_hits, m.onboarded, m.blocks.len()), (0, 4, 4));
    assert_eq!(
        m.sync,
        EngineSync::Ready,
        "host copies complete inside the call"
    );
    let got: Vec<_> = m.blocks.iter().map(|b| b.sequence_hash()).collect();
    assert_eq!(got, hashes);
    assert_stack_kv(&t, &m.blocks);
    drop(m);

    // Now in G1 again: a second lookup is all G1 hits, and commits without a job.
    let again = fetch(&t, &hashes);
    assert_eq!((again.g1_hits, again.onboarded), (4, 0));
    assert_stack_kv(&t, &again.blocks);
    drop(again);
    let st = t.stats();
    assert_eq!(st.tier(TierId::G2).unwrap().onboarded, 4);
    assert_eq!(
        st.tier(TierId::G2).unwrap().onboarded_bytes,
        4 * t.g2().layout().block_bytes() as u64
    );
    assert_eq!(st.tier(TierId::G1).unwrap().lookup_hits, 4);
    // Copy bandwidth: every byte of both directions, over the time a batch was in flight.
    let block = t.g2().layout().block_bytes() as u64;
    for c in [st.offload_copies, st.onboard_copies] {
        assert_eq!(c.bytes, 4 * block, "{c:?}");
        assert!(c.batches >= 1 && c.busy_nanos > 0, "{c:?}");
        assert!(c.gb_per_s().is_some_and(|g| g > 0.0), "{c:?}");
    }
    let text = t.render_prometheus();
    assert!(
        text.contains(&format!(
            "kvbm_stack_copy_bytes_total{{direction=\"onboard\"}} {}",
            4 * block
        )),
        "{text}"
    );
    assert_stack_idle(&t);
}

#[test]
fn write_back_reclaim_offloads_the_coldest_blocks_before_they_are_needed() {
    let opts = StackOpts {
        mode: WriteMode::WriteBack(Watermarks::new(4, 6)),
        ..StackOpts::new(8, 16)
    };
    let (t, g1, _) = opts.build();
    let g1_events = g1.subscribe(64);
    let old = chain(2, 4);
    ImmutableBlock::release_all(stack_compute(&t, &old, 0));
    t.flush();
    assert!(old.iter().all(|&h| !t.g2().contains(h)), "nothing yet");
    // Two more blocks leave 2 free (< low 4): the reclaimer evicts the 4 cold ones into G2.
    let new = chain(3, 2);
    let held = stack_compute(&t, &new, 0);
    t.flush();
    assert!(old.iter().all(|&h| t.g2().contains(h)));
    assert!(old.iter().all(|&h| !t.g1().contains(h)));
    assert!(t.g1().counts().reset >= 4);
    let st = t.stats();
    assert_eq!(st.tier(TierId::G2).unwrap().offloaded, 4);
    assert_eq!(st.tier(TierId::G2).unwrap().skipped(Skip::ReclaimBehind), 0);
    assert!(st.reclaim_runs >= 1);
    // The reclaimer's evictions are announced and counted as demotions.
    let mut demoted = removed(&g1_events, kvbm_logical::RemovalReason::Demoted);
    demoted.sort();
    let mut expected = old.clone();
    expected.sort();
    assert_eq!(demoted, expected);
    let g1_metrics = g1.metrics().snapshot();
    assert_eq!(
        (g1_metrics.removed_demoted, g1_metrics.removed_evicted),
        (4, 0)
    );

    let m = fetch(&t, &old);
    assert!(m.end.is_none(), "{m:?}");
    assert_eq!((m.g1_hits, m.onboarded), (0, 4));
    assert_stack_kv(&t, &m.blocks);
    drop((m, held));
    assert_stack_idle(&t);
}

#[test]
fn a_write_through_reserve_evicts_the_coldest_blocks_ahead_of_allocations() {
    for reserve in [None, Some(Watermarks::new(2, 4))] {
        let opts = StackOpts {
            reserve,
            ..StackOpts::new(8, 16)
        };
        let (t, g1, _) = opts.build();
        let g1_events = g1.subscribe(64);
        let old = chain(2, 4);
        ImmutableBlock::release_all(stack_compute(&t, &old, 0));
        t.flush();
        // Three more blocks leave one free (< low 2).
        let held = stack_compute(&t, &chain(3, 3), 0);
        t.flush();
        let evicted = g1.metrics().snapshot().removed_evicted;
        let announced = removed(&g1_events, kvbm_logical::RemovalReason::Evicted).len();
        assert_eq!(
            announced as u64, evicted,
            "every eviction announced as Evicted"
        );
        let in_g1 = old.iter().filter(|&&h| t.g1().contains(h)).count() as u64;
        if reserve.is_none() {
            // Without a reserve nothing is evicted before an allocation needs it.
            assert_eq!((t.g1().counts().reset, evicted, in_g1), (1, 0, 4));
        } else {
            // The reclaimer evicted old blocks until 4 were free, nothing else.
            assert_eq!((t.g1().counts().reset, evicted, in_g1), (4, 3, 1));
            assert!(t.stats().reclaim_runs >= 1);
            // The next allocations take free blocks: no eviction on the scheduler's side
            // (two, which leave `low` free: no reclaim starts meanwhile).
            let more = t.allocate(2).unwrap();
            assert_eq!(g1.metrics().snapshot().removed_evicted, 3);
            drop(more);
        }
        // Every old block is still served, from G1 or G2, with its bytes.
        assert!(old.iter().all(|&h| t.g2().contains(h)));
        let m = fetch(&t, &old);
        assert!(m.end.is_none(), "{m:?}");
        assert_eq!(m.g1_hits as u64 + m.onboarded as u64, 4);
        assert_eq!(m.onboarded as u64, 4 - in_g1);
        assert_stack_kv(&t, &m.blocks);
        assert_eq!(t.stats().tier(TierId::G2).unwrap().lost, 0);
        drop((m, held));
        t.flush();
        assert_stack_idle(&t);
    }
}

#[test]
fn a_low_watermark_of_zero_reclaims_once_no_free_block_is_left() {
    // "Below 0 free blocks" never happens: a low watermark of 0 starts the reclaimer when
    // the reset pool is empty instead of never.
    let opts = StackOpts {
        mode: WriteMode::WriteBack(Watermarks::new(0, 3)),
        ..StackOpts::new(8, 16)
    };
    let (t, _, _) = opts.build();
    let old = chain(5, 6);
    ImmutableBlock::release_all(stack_compute(&t, &old, 0));
    t.flush();
    assert_eq!(t.g1().counts().reset, 2, "above 0 free: no reclaim yet");
    let held = stack_compute(&t, &chain(6, 2), 0);
    t.flush();
    assert!(t.stats().reclaim_runs >= 1);
    assert_eq!(t.g1().counts().reset, 3, "reclaimed up to high");
    assert_eq!(t.stats().tier(TierId::G2).unwrap().offloaded, 3);
    assert_eq!(skipped(&t, TierId::G2, Skip::ReclaimBehind), 0);
    drop(held);
    assert_stack_idle(&t);
}

#[test]
fn a_scheduler_outrunning_the_reclaimer_skips_as_reclaim_behind() {
    let opts = StackOpts {
        mode: WriteMode::WriteBack(Watermarks::new(1, 2)),
        ..StackOpts::new(4, 8)
    };
    let (t, _, _) = opts.build();
    let hashes = chain(4, 4);
    ImmutableBlock::release_all(stack_compute(&t, &hashes, 0));
    // The pool is all inactive; allocating everything evicts directly.
    stack_flush_g1(&t);
    t.flush();
    let behind = skipped(&t, TierId::G2, Skip::ReclaimBehind);
    let offloaded = t.stats().tier(TierId::G2).unwrap().offloaded;
    assert_eq!(behind + offloaded, 4, "each evicted block counted once");
    assert!(behind >= 2, "{behind}");
    assert_eq!(t.stats().tier(TierId::G2).unwrap().lost, 0, "not a loss");
    assert_stack_idle(&t);
}

#[test]
fn write_back_reclaim_keeps_the_reset_pool_above_the_low_watermark_under_steady_load() {
    // Each request allocates at most high - low blocks; the engine's compute time (here: a
    // flush) lets the reclaimer catch up, so no allocation ever evicts directly and every
    // evicted block reaches G2.
    let opts = StackOpts {
        mode: WriteMode::WriteBack(Watermarks::new(8, 16)),
        ..StackOpts::new(32, 512)
    };
    let (t, _, _) = opts.build();
    let mut all = Vec::new();
    for r in 0..60u64 {
        let hashes = chain(100 + r, 1 + (r as usize * 7) % 8);
        ImmutableBlock::release_all(stack_compute(&t, &hashes, 0));
        all.extend(hashes);
        t.flush();
        let reset = t.g1().counts().reset;
        assert!(
            reset >= 8,
            "request {r}: reset pool {reset} below the low watermark"
        );
    }
    assert_eq!(skipped(&t, TierId::G2, Skip::ReclaimBehind), 0);
    for h in all {
        assert!(t.g1().contains(h) || t.g2().contains(h), "{h:?} lost");
    }
    assert_stack_idle(&t);
}

#[test]
fn onboarding_joins_g1_hits_and_onboarded_blocks_into_one_prefix() {
    for opts in [
        StackOpts::new(6, 8),
        StackOpts::new(6, 8).eager_write_back(),
    ] {
        let mode = opts.mode;
        let (t, _, _) = opts.build();
        let hashes = chain(5, 5);
        ImmutableBlock::release_all(stack_compute(&t, &hashes, 0));
        t.flush();
        // Hold the first two; push the last three out of G1.
        let keep = fetch(&t, &hashes[..2]);
        match mode {
            WriteMode::WriteThrough => stack_flush_g1(&t),
            _ => drop(t.allocate(1).unwrap()), // wakes the reclaimer: everything inactive goes
        }
        t.flush();
        assert!(hashes[2..].iter().all(|&h| !t.g1().contains(h)), "{mode:?}");
        // Write-through stored all five at registration; write-back stores a block when it
        // is evicted (the two held ones only if a reclaim ran before `keep` took them).
        assert!(hashes[2..].iter().all(|&h| t.g2().contains(h)), "{mode:?}");
        if mode == WriteMode::WriteThrough {
            assert!(hashes.iter().all(|&h| t.g2().contains(h)));
        }
        let plan = t.lookup(&hashes);
        assert_eq!((plan.g1_hits(), plan.from_tier(TierId::G2)), (2, 3));
        let m = t.onboard(plan, usize::MAX).unwrap().wait();
        assert!(m.end.is_none(), "{m:?}");
        assert_eq!(
            (m.g1_hits, m.onboarded, m.blocks.len()),
            (2, 3, 5),
            "{mode:?}"
        );
        assert_stack_kv(&t, &m.blocks);
        drop((keep, m));
        // Parents were restored from the chain: a later lookup walks all of it in G1.
        assert_eq!(t.lookup(&hashes).g1_hits(), 5);
        assert_stack_idle(&t);
    }
}

#[test]
fn a_committed_g1_hit_is_the_most_recently_used_block_of_g1() {
    // G1 holds a, b, c, d (released in that order: a is the LRU victim). A request commits
    // a plan whose only block is the G1 hit `a` and releases it: `a` was just used, so the
    // next eviction takes `b`. (Lookup takes G1 hits without touching them; the commit must
    // record the use, or G1's eviction order stops following use and hits are lost.)
    // Write-through (an eager write-back reclaimer would empty G1 of inactive blocks).
    {
        let opts = StackOpts::new(4, 8);
        let mode = opts.mode;
        let (t, _, _) = opts.build();
        let hs: Vec<SequenceHash> = (0..4).map(|i| SequenceHash::new(700 + i)).collect();
        // Flush after each release: a write-through offload holds the block until its copy
        // lands, so the block turns inactive when the last of the test and the worker lets
        // go; with two workers, unflushed releases would turn inactive in completion order.
        for &h in &hs {
            ImmutableBlock::release_all(stack_compute(&t, &[h], 0));
            t.flush();
        }
        let m = fetch(&t, &hs[..1]);
        assert_eq!((m.g1_hits, m.blocks.len()), (1, 1), "{mode:?}");
        drop(m);
        t.flush();
        let fresh = t.allocate(1).unwrap();
        assert!(
            t.g1().contains(hs[0]),
            "{mode:?}: the block just used was evicted"
        );
        assert!(!t.g1().contains(hs[1]), "{mode:?}: the LRU block stayed");
        drop(fresh);
        t.flush();
        assert_stack_idle(&t);
    }
}

#[test]
fn a_block_hit_in_g1_stays_in_g2_while_colder_ones_age_out() {
    // G2 holds 4 blocks. `hot` is hit in G1 before every new block is offloaded: a commit
    // counts as a use of G2's copy too, so G2 keeps `hot` (as one LRU pool of G2's size
    // would) and ages out the blocks computed once. Without it G2 would evict `hot` first.
    let (t, _, _) = StackOpts::new(16, 4).build();
    let hot = SequenceHash::new(900);
    ImmutableBlock::release_all(stack_compute(&t, &[hot], 0));
    t.flush();
    let cold: Vec<SequenceHash> = (0..8).map(|i| SequenceHash::new(910 + i)).collect();
    for (i, &c) in cold.iter().enumerate() {
        let m = fetch(&t, &[hot]);
        assert_eq!((m.g1_hits, m.onboarded), (1, 0));
        drop(m);
        ImmutableBlock::release_all(stack_compute(&t, &[c], 0));
        t.flush();
        assert!(
            t.g2().contains(hot),
            "hot aged out of G2 after {} cold blocks",
            i + 1
        );
    }
    // G2 holds hot and the three newest cold blocks.
    let in_g2: Vec<bool> = cold.iter().map(|&c| t.g2().contains(c)).collect();
    assert_eq!(in_g2, [false, false, false, false, false, true, true, true]);
    assert_stack_idle(&t);
}

#[test]
fn an_onboarded_g2_block_is_the_most_recently_used_block_of_g2() {
    // G2 holds a, b, c, d (offloaded in that order: a is G2's LRU victim) and G1 none of
    // them. A request onboards `a` from G2: that is a use of G2's copy, so the next block
    // offloaded into the full G2 evicts `b`, not `a`.
    let (t, _, _) = StackOpts::new(4, 4).build();
    let hs: Vec<SequenceHash> = (0..5).map(|i| SequenceHash::new(800 + i)).collect();
    for &h in &hs[..4] {
        ImmutableBlock::release_all(stack_compute(&t, &[h], 0));
        t.flush();
    }
    stack_flush_g1(&t);
    t.flush();
    assert!(
        hs[..4]
            .iter()
            .all(|&h| t.g2().contains(h) && !t.g1().contains(h))
    );
    let m = fetch(&t, &hs[..1]);
    assert_eq!((m.onboarded, m.blocks.len()), (1, 1));
    drop(m);
    ImmutableBlock::release_all(stack_compute(&t, &hs[4..], 0));
    t.flush();
    assert!(t.g2().contains(hs[4]));
    assert!(
        t.g2().contains(hs[0]),
        "the block just onboarded was evicted from G2"
    );
    assert!(!t.g2().contains(hs[1]), "G2's LRU block stayed");
    assert_stack_idle(&t);
}

#[test]
fn a_g1_hit_after_a_g2_hit_is_still_a_g1_hit() {
    let (t, m1, _) = StackOpts::new(8, 8).build();
    let hashes = chain(6, 4);
    ImmutableBlock::release_all(stack_compute(&t, &hashes, 0));
    t.flush();
    // Evict hashes 0 and 2 from G1 only (a back door: invalidate in the G1 manager).
    assert_eq!(m1.invalidate_blocks(&[hashes[0], hashes[2]]), 2);
    let plan = t.lookup(&hashes);
    let tiers: Vec<_> = (0..plan.len()).map(|i| plan.tier(i).unwrap()).collect();
    assert_eq!(tiers, [TierId::G2, TierId::G1, TierId::G2, TierId::G1]);
    assert_eq!(plan.blocks_needed(), 2);
    assert_eq!(plan.blocks_needed_within(1), 1);
    let m = t.onboard(plan, usize::MAX).unwrap().wait();
    let got: Vec<_> = m.blocks.iter().map(|b| b.sequence_hash()).collect();
    assert_eq!(got, hashes);
    assert_eq!((m.g1_hits, m.onboarded), (2, 2));
    assert_stack_kv(&t, &m.blocks);
    drop(m);
    assert_stack_idle(&t);
}

#[test]
fn a_miss_in_every_tier_ends_the_prefix() {
    let (t, _, _) = StackOpts::new(4, 4).build();
    let hashes = chain(7, 3);
    ImmutableBlock::release_all(stack_compute(&t, &hashes[..1], 0));
    let plan = t.lookup(&hashes);
    assert_eq!(plan.len(), 1);
    let m = t.onboard(plan, usize::MAX).unwrap().wait();
    assert_eq!(m.blocks.len(), 1);
    assert!(m.end.is_none() && m.lost.is_empty());
    drop(m);
    let empty = t.lookup(&chain(8, 2));
    assert!(empty.is_empty());
    let m = t.onboard(empty, usize::MAX).unwrap().wait();
    assert!(m.blocks.is_empty());
    assert_stack_idle(&t);
}

#[test]
fn lookup_changes_nothing() {
    let (t, _, _) = StackOpts::new(8, 8).build();
    let hashes = chain(9, 6);
    ImmutableBlock::release_all(stack_compute(&t, &hashes, 0));
    t.flush();
    stack_flush_g1(&t);
    ImmutableBlock::release_all(stack_compute(&t, &hashes[..2], 0));
    t.flush();
    let (c1, c2) = (t.g1().counts(), t.g2().counts());
    let (s1, s2) = (t.g1().metrics().snapshot(), t.g2().metrics().snapshot());
    let plan = t.lookup(&hashes);
    assert_eq!((plan.g1_hits(), plan.from_tier(TierId::G2)), (2, 4));
    // The hits are held, G1's two and G2's four, in place; nothing allocated, registered
    // or evicted in either tier.
    let held = t.g1().counts();
    assert_eq!((held.active, held.reset), (2, c1.reset));
    let held = t.g2().counts();
    assert_eq!(
        (held.active, held.inactive, held.reset),
        (c2.active + 4, c2.inactive - 4, c2.reset)
    );
    for (a, s) in [
        (t.g1().metrics().snapshot(), s1),
        (t.g2().metrics().snapshot(), s2),
    ] {
        assert_eq!(a.allocations(), s.allocations());
        assert_eq!(a.registrations, s.registrations);
        assert_eq!(
            (a.removed_evicted, a.removed_demoted, a.removed_invalidated),
            (s.removed_evicted, s.removed_demoted, s.removed_invalidated)
        );
        assert_eq!(a.match_requested, s.match_requested, "no access recorded");
    }
    drop(plan);
    assert_eq!((t.g1().counts(), t.g2().counts()), (c1, c2));
    assert_stack_idle(&t);
}

#[test]
fn a_plan_ending_before_a_g1_hit_neither_holds_nor_moves_it() {
    // G1 holds a and b (a released first: the LRU victim). A lookup of [x, a], x in no
    // tier, ends at x: `a` is a G1 hit past the end of the plan. The lookup takes every G1
    // hit in one scan and lets go of those past the end: `a` must be neither held by the
    // plan nor moved in G1's eviction order.
    let (t, _, _) = StackOpts::new(4, 8).build();
    let (a, b, x) = (
        SequenceHash::new(900),
        SequenceHash::new(901),
        SequenceHash::new(999),
    );
    for h in [a, b] {
        ImmutableBlock::release_all(stack_compute(&t, &[h], 0));
        t.flush();
    }
    let before = t.g1().counts();
    let plan = t.lookup(&[x, a]);
    assert!(plan.is_empty());
    assert_eq!(t.g1().counts(), before, "the plan holds nothing");
    drop(plan);
    // Two free blocks and one eviction: the victim is still `a`.
    let fresh = t.allocate(3).unwrap();
    assert!(!t.g1().contains(a), "the LRU block stayed");
    assert!(t.g1().contains(b), "the lookup moved the LRU block");
    drop(fresh);
    t.flush();
    assert_stack_idle(&t);
}

#[test]
fn a_plan_holds_its_g2_blocks_until_the_commit_copies_them() {
    // Four blocks in G2 only. A plan of them holds them: G2 running dry meanwhile (another
    // user of G2 takes every block it can) evicts none of them, and the commit onboards all
    // four. (A plan dropped uncommitted lets them go in place: `lookup_changes_nothing`.)
    let (t, _, m2) = StackOpts::new(8, 8).build();
    let hashes = chain(21, 4);
    ImmutableBlock::release_all(stack_compute(&t, &hashes, 0));
    t.flush();
    stack_flush_g1(&t);
    assert!(
        hashes
            .iter()
            .all(|&h| t.g2().contains(h) && !t.g1().contains(h))
    );
    let plan = t.lookup(&hashes);
    assert_eq!(plan.from_tier(TierId::G2), 4);
    let others = m2.allocate_blocks(m2.available_blocks()).unwrap();
    assert!(
        hashes.iter().all(|&h| t.g2().contains(h)),
        "evicted under a plan"
    );
    let done = t.onboard(plan, usize::MAX).unwrap().wait();
    assert!(done.end.is_none(), "{done:?}");
    assert_eq!((done.g1_hits, done.onboarded), (0, 4));
    assert_stack_kv(&t, &done.blocks);
    drop((done, others));
    t.flush();
    assert_stack_idle(&t);
}

#[test]
fn no_room_in_g1_is_back_pressure_with_the_plan_handed_back() {
    let (t, _, _) = StackOpts::new(4, 8).build();
    let hashes = chain(10, 3);
    ImmutableBlock::release_all(stack_compute(&t, &hashes, 0));
    t.flush();
    stack_flush_g1(&t);
    let hold = t.allocate(3).unwrap(); // only one G1 block left
    let plan = t.lookup(&hashes);
    assert_eq!(plan.blocks_needed(), 3);
    let err = t.onboard(plan, usize::MAX).unwrap_err();
    match &err {
        OnboardError::NoRoom {
            needed, available, ..
        } => assert_eq!((*needed, *available), (3, 1)),
        other => panic!("{other:?}"),
    }
    let plan = err.into_plan();
    assert_eq!(plan.len(), 3);
    let st = t.stats();
    assert_eq!(st.not_now, 1);
    assert!(st.tiers.iter().all(|x| x.lost == 0), "nothing lost: {st:?}");
    // A shorter commit fits.
    let m = t.onboard(plan, 1).unwrap().wait();
    assert_eq!(m.blocks.len(), 1);
    assert_stack_kv(&t, &m.blocks);
    drop((m, hold));
    assert_stack_idle(&t);
}

#[test]
fn onboarding_never_evicts_the_plans_own_g1_hits() {
    let (t, _, _) = StackOpts::new(4, 8).build();
    let hashes = chain(11, 4);
    ImmutableBlock::release_all(stack_compute(&t, &hashes, 0));
    t.flush();
    // G1 holds all four, inactive. Evict the last two only.
    let keep = fetch(&t, &hashes[..2]);
    stack_flush_g1(&t);
    drop(keep); // the first two are now the only inactive G1 blocks: the LRU victims
    let plan = t.lookup(&hashes);
    assert_eq!((plan.g1_hits(), plan.blocks_needed()), (2, 2));
    // Committing allocates two blocks: the reset pool has exactly two, and the plan holds
    // the hits, so nothing it needs can be evicted.
    let m = t.onboard(plan, usize::MAX).unwrap().wait();
    assert_eq!(m.blocks.len(), 4, "{m:?}");
    assert_stack_kv(&t, &m.blocks);
    drop(m);
    assert_stack_idle(&t);
}

#[test]
fn a_full_g2_skips_the_blocks_it_cannot_take() {
    let (t, _, m2) = StackOpts::new(8, 2).build();
    let hashes = chain(12, 4);
    let first = stack_compute(&t, &hashes[..2], 0);
    t.flush();
    // Hold both G2 blocks behind the stack's back so they cannot be evicted.
    let held = m2.match_blocks(&hashes[..2]);
    assert_eq!(held.len(), 2);
    let second = stack_compute(&t, &hashes, 2);
    t.flush();
    assert_eq!(skipped(&t, TierId::G2, Skip::NoRoom), 2);
    assert!(!t.g2().contains(hashes[2]) && !t.g2().contains(hashes[3]));
    // G1 is unaffected: all four are registered and hold their bytes.
    assert_stack_kv(&t, &first);
    assert_stack_kv(&t, &second);
    assert_eq!(t.stats().tier(TierId::G2).unwrap().lost, 0);
    drop((held, first, second));
    assert_stack_idle(&t);
}

#[test]
fn a_corrupt_g2_block_is_invalidated_and_the_prefix_before_it_onboarded() {
    let (t, _, m2) = StackOpts::new(4, 8).build();
    let hashes = chain(13, 4);
    ImmutableBlock::release_all(stack_compute(&t, &hashes, 0));
    t.flush();
    stack_flush_g1(&t);
    // Corrupt the G2 copy of the third block.
    let victim = m2.match_blocks(&hashes[2..3]);
    let r = t.g2().layout().region(victim[0].block_id(), 1, 0).unwrap();
    // SAFETY: inside G2's live system slab; nothing copies it now.
    unsafe { *(r.addr as *mut u8) ^= 1 };
    drop(victim);

    let m = fetch(&t, &hashes);
    assert_eq!((m.onboarded, m.blocks.len()), (2, 2));
    assert_stack_kv(&t, &m.blocks);
    assert_eq!(m.lost.len(), 1);
    assert_eq!(
        (m.lost[0].hash, m.lost[0].tier, m.lost[0].cause.clone()),
        (hashes[2], TierId::G2, LostCause::Corrupt)
    );
    let end = m.end.clone().unwrap();
    assert_eq!(
        (end.at, end.reason),
        (2, EndReason::Lost { tier: TierId::G2 })
    );
    assert!(!t.g2().contains(hashes[2]), "the corrupt copy left G2");
    assert!(t.g2().contains(hashes[3]));
    assert_eq!(t.stats().tier(TierId::G2).unwrap().lost, 1);
    drop(m);
    // Never retried: the next lookup stops before it.
    assert_eq!(t.lookup(&hashes).len(), 2);
    assert_stack_idle(&t);
}

#[test]
fn a_corrupt_g2_block_held_by_another_request_stops_being_served() {
    let (t, _, m2) = StackOpts::new(4, 8).build();
    let hashes = chain(14, 4);
    ImmutableBlock::release_all(stack_compute(&t, &hashes, 0));
    t.flush();
    stack_flush_g1(&t);
    // Another user of G2 holds the third block while its bytes go bad.
    let holder = m2.match_blocks(&hashes[2..3]);
    let r = t.g2().layout().region(holder[0].block_id(), 1, 0).unwrap();
    // SAFETY: inside G2's live system slab; nothing copies it now.
    unsafe { *(r.addr as *mut u8) ^= 1 };

    let m = fetch(&t, &hashes);
    assert_eq!((m.onboarded, m.blocks.len()), (2, 2));
    assert_eq!(m.lost.len(), 1);
    assert!(
        !t.g2().contains(hashes[2]),
        "held, but no longer served from G2"
    );
    assert!(m2.match_blocks(&hashes[2..3]).is_empty());
    drop(m);
    // Its last holder's release sends it to the reset pool, not the inactive pool.
    let inactive = m2.counts().inactive;
    drop(holder);
    assert_eq!(m2.counts().inactive, inactive);
    assert_eq!(t.lookup(&hashes).len(), 2);
    assert_stack_idle(&t);
}

#[test]
fn mismatched_tiers_are_refused() {
    let m = |n| {
        BlockManager::<Device>::builder()
            .block_count(n)
            .block_size(STACK_PAGE)
            .build()
            .unwrap()
    };
    let h = |n| {
        BlockManager::<Host>::builder()
            .block_count(n)
            .block_size(STACK_PAGE)
            .build()
            .unwrap()
    };
    let l = |c| {
        Layout::system(LayoutKind::FullyContiguous, c)
            .unwrap()
            .into_shared()
    };
    let c = common::stack_config;
    let err = |b: kvbm_physical::stack::TierStackBuilder| b.build().unwrap_err();
    assert!(matches!(
        err(TierStack::builder().g2(h(4), l(c(4)))),
        StackError::MissingTier { tier: "G1" }
    ));
    assert!(matches!(
        err(TierStack::builder().g1(m(4), l(c(5))).g2(h(4), l(c(4)))),
        StackError::BlockCount {
            tier: "G1",
            manager: 4,
            layout: 5
        }
    ));
    let wrong_page = LayoutConfig {
        page_size: STACK_PAGE * 2,
        ..c(4)
    };
    assert!(matches!(
        err(TierStack::builder()
            .g1(m(4), l(wrong_page))
            .g2(h(4), l(c(4)))),
        StackError::BlockSize { tier: "G1", .. }
    ));
    let two_layers = LayoutConfig {
        num_layers: 2,
        ..c(4)
    };
    assert!(matches!(
        err(TierStack::builder()
            .g1(m(4), l(c(4)))
            .g2(h(4), l(two_layers))),
        StackError::Shape {
            what: "num_layers",
            ..
        }
    ));
    assert!(matches!(
        err(TierStack::builder()
            .g1(m(4), l(c(4)))
            .g2(h(4), l(c(4)))
            .write_mode(WriteMode::WriteBack(Watermarks::new(3, 2)))),
        StackError::Watermarks { .. }
    ));
    assert!(matches!(
        err(TierStack::builder()
            .g1(m(4), l(c(4)))
            .g2(h(4), l(c(4)))
            .write_mode(WriteMode::WriteBack(Watermarks::new(1, 5)))),
        StackError::Watermarks { .. }
    ));
    assert!(matches!(
        err(TierStack::builder()
            .g1(m(4), l(c(4)))
            .g2(h(4), l(c(4)))
            .free_reserve(Watermarks::new(1, 5))),
        StackError::Watermarks { .. }
    ));
    assert!(matches!(
        err(TierStack::builder()
            .g1(m(4), l(c(4)))
            .g2(h(4), l(c(4)))
            .write_mode(WriteMode::WriteBack(Watermarks::new(1, 2)))
            .free_reserve(Watermarks::new(1, 2))),
        StackError::ReserveWithWriteBack
    ));
    assert!(matches!(
        err(TierStack::builder()
            .g1(m(4), l(c(4)))
            .g2(h(4), l(c(4)))
            .workers(0)),
        StackError::Zero { what: "workers" }
    ));
    let untracked = BlockManager::<Device>::builder()
        .block_count(4)
        .block_size(STACK_PAGE)
        .frequency_tracking(kvbm_logical::FrequencyTracking::Disabled)
        .build()
        .unwrap();
    assert!(matches!(
        err(TierStack::builder()
            .g1(untracked, l(c(4)))
            .g2(h(4), l(c(4)))
            .g2_admission(kvbm_physical::stack::Admission::MinFrequency(2))),
        StackError::FrequencyTracking { .. }
    ));
    let store = Arc::new(common::MemStore::new(7, 8));
    assert!(matches!(
        err(TierStack::builder()
            .g1(m(4), l(c(4)))
            .g2(h(4), l(c(4)))
            .store(kvbm_physical::stack::StoreTierConfig::new(store))),
        StackError::StoreBlockBytes {
            index: 0,
            found: 7,
            ..
        }
    ));
    // Two remote tiers, both deferred: the second would never be read.
    let bytes = StackOpts::new(1, 1).block_bytes();
    let deferred = || {
        kvbm_physical::stack::StoreTierConfig::new(Arc::new(common::MemStore::new(bytes, 8)))
            .probe(kvbm_physical::stack::Probe::Deferred)
    };
    let e = err(TierStack::builder()
        .g1(m(4), l(c(4)))
        .g2(h(4), l(c(4)))
        .store(deferred())
        .store(deferred()));
    assert!(
        matches!(&e, StackError::SeveralDeferred { first, second } if first == "G3" && second == "G4"),
        "{e}"
    );
}

#[test]
fn a_plan_of_another_stack_is_handed_back() {
    let (a, _, _) = StackOpts::new(4, 4).build();
    let (b, _, _) = StackOpts::new(4, 4).build();
    let hashes = chain(14, 2);
    ImmutableBlock::release_all(stack_compute(&a, &hashes, 0));
    let plan = a.lookup(&hashes);
    let err = b.onboard(plan, usize::MAX).unwrap_err();
    assert!(matches!(err, OnboardError::ForeignPlan { .. }));
    let m = a.onboard(err.into_plan(), usize::MAX).unwrap().wait();
    assert_eq!(m.g1_hits, 2);
}

/// A stack whose single worker is held at a gate inside its first copy.
fn gated(opts: StackOpts, batch: u64) -> (TierStack, Arc<GateCopies>, BlockManager<Host>) {
    let gate = Arc::new(GateCopies::at_batch(batch));
    let (t, _, m2) = StackOpts {
        faults: Some(gate.clone()),
        workers: 1,
        ..opts
    }
    .build();
    (t, gate, m2)
}

#[test]
fn two_offloads_of_one_hash_at_once_count_one_offloaded() {
    // Two workers. The first offload of `h` is held inside its copy; the engine registers
    // `h` again meanwhile (G1 hands back the same block), and the second offload copies and
    // registers it in G2. The first then registers a duplicate: G2 keeps one block, counted
    // once as offloaded and once as present.
    let gate = Arc::new(GateCopies::at_batch(0));
    let (t, _, _) = StackOpts {
        faults: Some(gate.clone()),
        workers: 2,
        ..StackOpts::new(8, 8)
    }
    .build();
    let _open = OpenOnDrop(&gate.gate);
    let h = chain(77, 1);
    let sub = t.g2().subscribe(64);
    let first = stack_compute(&t, &h, 0);
    gate.gate.wait_arrivals(1);
    let second = stack_compute(&t, &h, 0);
    assert_eq!(first[0].block_id(), second[0].block_id(), "one block in G1");
    // The second offload lands: G2 announces `h`.
    let stored = sub
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("the second offload registered h in G2");
    assert!(
        stored.iter().any(|e| matches!(
            &e.kind,
            kvbm_logical::KvEventKind::Stored { block_hashes, .. } if block_hashes == &h
        )),
        "{stored:?}"
    );
    gate.gate.open();
    t.flush();
    let offloaded = t.stats().tier(TierId::G2).unwrap().offloaded;
    assert_eq!(
        (offloaded, skipped(&t, TierId::G2, Skip::Present)),
        (1, 1),
        "{:?}",
        t.stats()
    );
    assert_eq!(t.g2().counts().inactive + t.g2().counts().active, 1);
    drop((first, second));
    t.flush();
    assert_stack_idle(&t);
}

#[test]
fn an_allocation_outrunning_the_reserve_is_counted_as_reserve_behind() {
    for reserve in [None, Some(Watermarks::new(1, 2))] {
        let (t, _, _) = StackOpts {
            reserve,
            ..StackOpts::new(4, 16)
        }
        .build();
        ImmutableBlock::release_all(stack_compute(&t, &chain(30, 4), 0));
        t.flush();
        // Whatever the reserve freed meanwhile, taking all four evicts the rest here.
        let free = t.g1().counts().reset as u64;
        let all = t.allocate(4).unwrap();
        let behind = t.stats().reserve_behind;
        match reserve {
            Some(_) => assert_eq!(behind, 4 - free),
            None => assert_eq!(behind, 0, "counted only under a reserve"),
        }
        drop(all);
        t.flush();
        assert_stack_idle(&t);
    }
}

#[test]
fn a_write_through_reserve_never_evicts_a_block_whose_copy_is_in_flight() {
    // Two workers: one held inside the copy of block `x`, the other free to reclaim.
    let gate = Arc::new(GateCopies::at_batch(0));
    let (t, g1, _) = StackOpts {
        faults: Some(gate.clone()),
        reserve: Some(Watermarks::new(2, 4)),
        ..StackOpts::new(8, 16)
    }
    .build();
    let x = chain(20, 1);
    ImmutableBlock::release_all(stack_compute(&t, &x, 0));
    gate.gate.wait_arrivals(1);
    let cold = chain(21, 3);
    ImmutableBlock::release_all(stack_compute(&t, &cold, 0));
    let until = |what: &dyn Fn() -> bool| {
        let start = std::time::Instant::now();
        while !what() {
            assert!(start.elapsed() < Duration::from_secs(30), "timed out");
            std::thread::yield_now();
        }
    };
    until(&|| t.stats().tier(TierId::G2).unwrap().offloaded == 3);
    // 8 blocks: x (held by its job), 3 inactive, 4 free; taking 3 leaves 1 (< low 2).
    let taken = t.allocate(3).unwrap();
    until(&|| t.g1().counts().reset == 4);
    assert_eq!(g1.metrics().snapshot().removed_evicted, 3);
    assert!(
        t.g1().contains(x[0]),
        "x was evicted while its copy was in flight"
    );
    assert!(!t.g2().contains(x[0]));
    gate.gate.open();
    t.flush();
    assert!(t.g2().contains(x[0]));
    drop(taken);
    assert_stack_idle(&t);
}

#[test]
fn the_scheduler_never_waits_on_a_copy() {
    let (t, gate, _) = gated(StackOpts::new(16, 16), 0);
    let t = Arc::new(t);
    // Hold the only worker inside a copy.
    let first = stack_compute(&t, &chain(15, 2), 0);
    gate.gate.wait_arrivals(1);
    // Every scheduler-facing call returns while it is held.
    let (tx, rx) = mpsc::channel();
    let worker = {
        let t = Arc::clone(&t);
        std::thread::spawn(move || {
            let hashes = chain(16, 4);
            let blocks = t.allocate(4).unwrap();
            let reg = common::stack_write_register(&t, blocks, &hashes, 0);
            let plan = t.lookup(&chain(15, 2));
            let p = t.onboard(plan, usize::MAX).unwrap();
            let lookups = t.stats().lookups;
            tx.send((reg.len(), p.is_ready(), lookups)).unwrap();
            drop((reg, p));
        })
    };
    let (n, _, lookups) = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("scheduler calls returned while the worker was held");
    assert_eq!((n, lookups), (4, 1));
    gate.gate.open();
    worker.join().unwrap();
    drop(first);
    let t = Arc::into_inner(t).unwrap();
    assert_stack_idle(&t);
}

#[test]
fn a_full_queue_skips_the_offload_and_counts_it() {
    let opts = StackOpts {
        max_queued_blocks: 4,
        ..StackOpts::new(16, 16)
    };
    let (t, gate, _) = gated(opts, 0);
    let a = stack_compute(&t, &chain(17, 1), 0); // running: held at the gate
    gate.gate.wait_arrivals(1);
    let b = stack_compute(&t, &chain(18, 4), 0); // queued: 4 blocks fill the lane
    let c = stack_compute(&t, &chain(19, 1), 0); // does not fit: skipped
    assert_eq!(skipped(&t, TierId::G2, Skip::QueueFull), 1);
    assert_eq!(t.stats().queued_blocks, 4);
    gate.gate.open();
    t.flush();
    assert!(t.g2().contains(chain(17, 1)[0]));
    assert!(chain(18, 4).iter().all(|&h| t.g2().contains(h)));
    assert!(!t.g2().contains(chain(19, 1)[0]));
    drop((a, b, c));
    assert_stack_idle(&t);
}

/// Sets up four blocks in G2 only, then returns the stack and its gate (at batch `batch`).
fn in_g2_only(batch: u64) -> (TierStack, Arc<GateCopies>, Vec<SequenceHash>) {
    let (t, gate, _) = gated(StackOpts::new(8, 8), batch);
    let hashes = chain(20, 4);
    ImmutableBlock::release_all(stack_compute(&t, &hashes, 0));
    (t, gate, hashes)
}

#[test]
fn cancel_before_the_job_starts_returns_every_block() {
    // Batch 0 (the first offload) passes; batch 1 (a later offload) holds the only worker,
    // and the onboard queues behind it.
    let (t, gate, _) = gated(StackOpts::new(8, 8), 1);
    let hs = chain(21, 3);
    ImmutableBlock::release_all(stack_compute(&t, &hs, 0));
    t.flush();
    stack_flush_g1(&t);
    let hold = stack_compute(&t, &chain(22, 1), 0); // batch 1: held
    gate.gate.wait_arrivals(1);
    let before = t.g1().counts();
    let p = t.onboard(t.lookup(&hs), usize::MAX).unwrap();
    assert_eq!(t.g1().counts().mutable, before.mutable + 3);
    assert!(!p.is_ready());
    drop(p); // cancelled before the worker saw it
    gate.gate.open();
    t.flush();
    assert_eq!(t.stats().cancelled, 1);
    assert!(
        hs.iter().all(|&h| !t.g1().contains(h)),
        "nothing registered"
    );
    assert!(hs.iter().all(|&h| t.g2().contains(h)), "sources intact");
    drop(hold);
    assert_stack_idle(&t);
}

#[test]
fn cancel_while_the_copy_is_in_flight_registers_nothing_and_leaks_nothing() {
    // Batch 0: the write-through offload; batch 1: the onboard's G2 → G1 copy, held.
    let (t, gate, hashes) = in_g2_only(1);
    t.flush();
    stack_flush_g1(&t);
    let p = t.onboard(t.lookup(&hashes), usize::MAX).unwrap();
    gate.gate.wait_arrivals(1); // the copy is in flight
    assert!(!p.is_ready());
    drop(p);
    gate.gate.open();
    t.flush();
    assert_eq!(t.stats().cancelled, 1);
    assert!(hashes.iter().all(|&h| !t.g1().contains(h)));
    assert!(hashes.iter().all(|&h| t.g2().contains(h)), "sources intact");
    assert_eq!(t.stats().tier(TierId::G2).unwrap().lost, 0);
    assert_stack_idle(&t);
}

#[test]
fn a_pending_polls_until_ready_and_a_finished_one_dropped_unread_leaks_nothing() {
    let (t, gate, hashes) = in_g2_only(1);
    t.flush();
    stack_flush_g1(&t);
    let mut p = t.onboard(t.lookup(&hashes), usize::MAX).unwrap();
    gate.gate.wait_arrivals(1);
    for _ in 0..3 {
        p = p.try_complete().expect_err("held at the gate");
    }
    gate.gate.open();
    t.flush();
    let m = p.try_complete().expect("finished after the flush");
    assert_eq!(m.blocks.len(), 4);
    assert_stack_kv(&t, &m.blocks);
    drop(m);
    // Finished but never read: the registered blocks simply become inactive.
    stack_flush_g1(&t);
    let p = t.onboard(t.lookup(&hashes), usize::MAX).unwrap();
    t.flush();
    assert!(p.is_ready());
    drop(p);
    assert!(hashes.iter().all(|&h| t.g1().contains(h)));
    assert_eq!(t.stats().cancelled, 0);
    assert_stack_idle(&t);
}

#[test]
fn dropping_the_stack_joins_its_workers_and_completes_queued_onboards() {
    let (t, gate, hashes) = in_g2_only(1);
    t.flush();
    stack_flush_g1(&t);
    let hold = stack_compute(&t, &chain(23, 1), 0); // batch 1: held
    gate.gate.wait_arrivals(1);
    let p = t.onboard(t.lookup(&hashes), usize::MAX).unwrap(); // queued behind it
    let collector = t.collector();
    let queued = || {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(collector.clone()));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        !out.contains("kvbm_stack_queued_jobs 0")
    };
    assert!(queued());
    let dropper = std::thread::spawn(move || drop(t));
    // The drop stops the queue first (dropping the queued onboard), then joins the worker,
    // which is still held at the gate.
    while queued() {
        std::thread::yield_now();
    }
    gate.gate.open();
    dropper.join().unwrap();
    let m = p.wait();
    assert!(m.blocks.is_empty());
    assert_eq!(m.end.unwrap().reason, EndReason::Aborted);
    drop(hold);
}

#[test]
fn the_prometheus_exposition_has_one_family_per_metric_and_a_tier_label() {
    let store = Arc::new(common::MemStore::new(
        StackOpts::new(1, 1).block_bytes(),
        64,
    ));
    let (t, _, _) = StackOpts {
        stores: vec![kvbm_physical::stack::StoreTierConfig::new(store)],
        ..StackOpts::new(4, 8)
    }
    .build();
    ImmutableBlock::release_all(stack_compute(&t, &chain(24, 3), 0));
    t.flush();
    let text = t.render_prometheus();
    for family in [
        "kvbm_tier_offloaded_blocks",
        "kvbm_tier_skipped_blocks",
        "kvbm_tier_lost_blocks",
        "kvbm_stack_queued_jobs",
    ] {
        let types = text
            .lines()
            .filter(|l| l.starts_with(&format!("# TYPE {family} ")))
            .count();
        assert_eq!(types, 1, "{family}:\n{text}");
    }
    for tier in ["G1", "G2", "G3"] {
        assert!(text.contains(&format!("tier=\"{tier}\"")), "{text}");
    }
    assert!(
        text.contains("kvbm_tier_offloaded_blocks_total{tier=\"G3\"} 3"),
        "{text}"
    );
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid exposition");
    let g2 = scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == "kvbm_tier_offloaded_blocks_total" && s.labels.get("tier") == Some("G2")
        })
        .expect("G2 offloaded");
    // OpenMetrics names a counter's family without `_total`: the parser sees it untyped.
    assert!(
        matches!(
            g2.value,
            prometheus_parse::Value::Counter(3.0) | prometheus_parse::Value::Untyped(3.0)
        ),
        "{:?}",
        g2.value
    );
    // A server registers the collector in its own registry.
    let mut registry = prometheus_client::registry::Registry::with_prefix("server");
    registry.register_collector(Box::new(t.collector()));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
    assert!(
        out.contains("server_kvbm_tier_offloaded_blocks_total"),
        "{out}"
    );
}

#[test]
fn one_scrape_has_the_stack_counters_and_both_pools_every_family_once() {
    let (t, _, _) = StackOpts::new(4, 8).build();
    let hashes = chain(31, 3);
    ImmutableBlock::release_all(stack_compute(&t, &hashes, 0));
    t.flush();
    let text = t.render_prometheus();
    // Every family is announced once (a repeated TYPE line makes Prometheus reject the scrape).
    let mut types: Vec<&str> = text.lines().filter(|l| l.starts_with("# TYPE ")).collect();
    let n = types.len();
    types.sort_unstable();
    types.dedup();
    assert_eq!(types.len(), n, "{text}");
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid exposition");
    let gauge = |tier: &str, state: &str| {
        scrape
            .samples
            .iter()
            .find(|s| {
                s.metric == "kvbm_pool_blocks"
                    && s.labels.get("tier") == Some(tier)
                    && s.labels.get("state") == Some(state)
            })
            .map(|s| match s.value {
                prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => v,
                ref v => panic!("{v:?}"),
            })
    };
    let (g1, g2) = (t.g1().counts(), t.g2().counts());
    assert_eq!(gauge("G1", "inactive"), Some(g1.inactive as f64));
    assert_eq!(gauge("G1", "reset"), Some(g1.reset as f64));
    assert_eq!(gauge("G2", "inactive"), Some(g2.inactive as f64));
    assert_eq!(gauge("G2", "inactive"), Some(3.0));
    assert!(
        scrape
            .samples
            .iter()
            .any(|s| s.metric.starts_with("kvbm_tier_offloaded_blocks")
                && s.labels.get("tier") == Some("G2")),
        "{text}"
    );
}

#[test]
fn frequency_admission_offloads_only_blocks_seen_often_enough() {
    let (t, _, _) = StackOpts {
        frequency: true,
        g2_admission: kvbm_physical::stack::Admission::MinFrequency(3),
        ..StackOpts::new(8, 8)
    }
    .build();
    let hot = chain(25, 1);
    // Registered three times (recomputed after eviction): frequency reaches 3.
    for _ in 0..3 {
        ImmutableBlock::release_all(stack_compute(&t, &hot, 0));
        t.flush();
        if !t.g2().contains(hot[0]) {
            stack_flush_g1(&t);
        }
    }
    let cold = chain(26, 1);
    ImmutableBlock::release_all(stack_compute(&t, &cold, 0));
    t.flush();
    assert!(t.g2().contains(hot[0]));
    assert!(!t.g2().contains(cold[0]));
    assert!(skipped(&t, TierId::G2, Skip::Admission) >= 2);
    assert_stack_idle(&t);
}

#[test]
fn every_offload_candidate_is_counted_exactly_once() {
    let (t, _, _) = StackOpts::new(4, 64).build();
    let mut registered = 0u64;
    for r in 0..20u64 {
        let hashes = chain(200 + r % 5, 1 + (r as usize % 4));
        ImmutableBlock::release_all(stack_compute(&t, &hashes, 0));
        registered += hashes.len() as u64;
        t.flush(); // the offload job holds its G1 blocks until it lands
        stack_flush_g1(&t);
    }
    t.flush();
    let g2 = t.stats().tier(TierId::G2).unwrap().clone();
    assert_eq!(
        g2.offloaded + g2.skipped_total() + g2.lost,
        registered,
        "{g2:?}"
    );
    assert!(g2.skipped(Skip::Present) > 0);
    assert_stack_conserved(&t);
    assert_stack_idle(&t);
}

#[test]
fn the_public_handles_are_send_and_sync() {
    fn both<T: Send + Sync>() {}
    both::<TierStack>();
    both::<kvbm_physical::stack::Plan>();
    both::<kvbm_physical::stack::Pending>();
    both::<kvbm_physical::stack::Onboarded>();
    both::<kvbm_physical::stack::StackCollector>();
    both::<OnboardError>();
}
