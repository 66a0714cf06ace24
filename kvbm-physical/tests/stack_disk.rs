//! The disk tier (G3) in the tier stack, on CPU, in temp dirs, through the stack's public
//! API only: G2 → G3 offload through the admission filters, onboarding G3 → G2 → G1 with
//! every byte checked, a warm restart (drop the stack, reopen the tier file, build a new
//! stack), a block corrupted in the file behind kvbm's back, injected `ENOSPC`/`EIO`, and a
//! full tier evicting by its policy.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use common::{
    STACK_PAGE, assert_stack_idle, assert_stack_kv, chain, stack_compute, stack_flush_g1, stack_kv,
};
use kvbm_logical::{
    BlockManager, Device, EvictionBackend, FrequencyTracking, Host, ImmutableBlock, KvEventKind,
    RemovalReason, SequenceHash,
};
use kvbm_physical::disk::{Capacity, DiskFaultPlan, DiskTier, DiskTierBuilder, IoFault};
use kvbm_physical::stack::{
    Admission, EndReason, LostCause, Onboarded, Skip, StoreTierConfig, TierId, TierStack, TierStats,
};
use kvbm_physical::{Layout, LayoutConfig, LayoutKind, StoreError, StoreTier};

const G3: TierId = TierId::Store(0);
const FINGERPRINT: u64 = 0x5eed;

/// A block shape of `inner` elements per token: `48 × inner` bytes (768 for 16, so the
/// image does not fill its pages and goes through the tier's bounce buffers; 12 KiB for
/// 256, three whole pages, read and written in place where the buffer allows).
fn shape(num_blocks: usize, inner: usize) -> LayoutConfig {
    LayoutConfig {
        num_blocks,
        num_layers: 3,
        outer_dim: 2,
        page_size: STACK_PAGE,
        inner_dim: inner,
        dtype_bytes: 2,
    }
}

/// How to build a stack over a disk tier.
struct Setup {
    g1: usize,
    g2: usize,
    inner: usize,
    slots: u32,
    admission: Admission,
    frequency: bool,
}

impl Setup {
    fn new(g1: usize, g2: usize, slots: u32) -> Self {
        Self {
            g1,
            g2,
            inner: 16,
            slots,
            admission: Admission::Presence,
            frequency: false,
        }
    }

    fn block_bytes(&self) -> usize {
        shape(1, self.inner).block_bytes().unwrap()
    }

    /// The tier's builder: its file in `dir`, G2's block size.
    fn tier(&self, dir: &Path) -> DiskTierBuilder {
        DiskTier::builder()
            .path(dir.join("g3.kvbm"))
            .block_bytes(self.block_bytes())
            .capacity(Capacity::Blocks(self.slots))
            .fingerprint(FINGERPRINT)
    }

    /// A stack of G1, G2 (checksummed, fully contiguous) and `tier` as G3; returns it and a
    /// back door to G2's manager (to evict G2 behind the stack's back).
    fn stack(&self, tier: Arc<DiskTier>) -> (TierStack, BlockManager<Host>) {
        let tracking = if self.frequency {
            FrequencyTracking::Small
        } else {
            FrequencyTracking::Disabled
        };
        let m1 = BlockManager::<Device>::builder()
            .block_count(self.g1)
            .block_size(STACK_PAGE)
            .frequency_tracking(tracking)
            .build()
            .unwrap();
        let m2 = BlockManager::<Host>::builder()
            .block_count(self.g2)
            .block_size(STACK_PAGE)
            .frequency_tracking(tracking)
            .build()
            .unwrap();
        let g1 = Layout::system(LayoutKind::LayerSeparate, shape(self.g1, self.inner)).unwrap();
        let g2 = Layout::system(LayoutKind::FullyContiguous, shape(self.g2, self.inner))
            .unwrap()
            .with_checksums()
            .unwrap();
        let stack = TierStack::builder()
            .g1(m1, g1.into_shared())
            .g2(m2.clone(), g2.into_shared())
            .store(StoreTierConfig::new(tier).admission(self.admission))
            .workers(2)
            .build()
            .unwrap();
        (stack, m2)
    }
}

fn fetch(s: &TierStack, hashes: &[SequenceHash]) -> Onboarded {
    s.onboard(s.lookup(hashes), usize::MAX).unwrap().wait()
}

fn stat(s: &TierStack, tier: TierId) -> TierStats {
    s.stats().tier(tier).unwrap().clone()
}

/// Evicts every inactive block from G1 and G2 (G2 through the back door), after the
/// offloads in flight have landed.
fn evict_g1_g2(s: &TierStack, m2: &BlockManager<Host>) {
    s.flush();
    stack_flush_g1(s);
    drop(m2.allocate_blocks(m2.available_blocks()).unwrap());
    assert_eq!(s.g2().counts().inactive, 0);
}

/// The slot holding `image` in the tier file (read behind the tier's back).
fn slot_of(tier: &DiskTier, image: &[u8]) -> u32 {
    let g = tier.geometry();
    let file = std::fs::File::open(tier.path()).unwrap();
    let mut buf = vec![0u8; image.len()];
    (0..g.slots())
        .find(|&k| {
            file.read_exact_at(&mut buf, g.slot_offset(k)).unwrap();
            buf == image
        })
        .expect("the image is in the file")
}

/// Flips one byte of the image in slot `slot` of the file, behind kvbm's back.
fn flip_byte(tier: &DiskTier, slot: u32, at: usize) {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(tier.path())
        .unwrap();
    let offset = tier.geometry().slot_offset(slot) + at as u64;
    let mut b = [0u8; 1];
    file.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0x40;
    file.write_all_at(&b, offset).unwrap();
    file.sync_all().unwrap();
}

#[test]
fn g2_offloads_to_disk_and_blocks_onboard_through_g2_into_g1_byte_exact() {
    for inner in [16, 256] {
        let dir = tempfile::tempdir().unwrap();
        let setup = Setup {
            inner,
            ..Setup::new(4, 4, 16)
        };
        let tier = Arc::new(setup.tier(dir.path()).open().unwrap());
        let (t, m2) = setup.stack(tier.clone());
        let hs = chain(40, 4);
        ImmutableBlock::release_all(stack_compute(&t, &hs, 0));
        t.flush();
        assert_eq!(tier.contains(&hs), vec![true; 4]);
        assert_eq!(stat(&t, G3).offloaded, 4);
        assert_eq!(tier.stats().stored, 4);
        // The tier holds each block's exact bytes with its parent.
        for (i, &h) in hs.iter().enumerate() {
            let mut out = vec![0u8; setup.block_bytes()];
            let got = tier.get(&[h], &mut [&mut out[..]]);
            let parent = i.checked_sub(1).map(|p| hs[p]);
            assert_eq!(got, vec![kvbm_physical::GetOutcome::Hit { parent }]);
            assert_eq!(out, stack_kv(&t, h), "inner {inner}, block {i}");
        }

        evict_g1_g2(&t, &m2);
        assert!(
            hs.iter()
                .all(|&h| !t.g1().contains(h) && !t.g2().contains(h))
        );
        let plan = t.lookup(&hs);
        assert_eq!((plan.len(), plan.from_tier(G3)), (4, 4));
        let m = t.onboard(plan, usize::MAX).unwrap().wait();
        assert!(m.end.is_none() && m.lost.is_empty(), "{m:?}");
        assert_eq!((m.g1_hits, m.onboarded, m.blocks.len()), (0, 4, 4));
        assert_stack_kv(&t, &m.blocks);
        // Staged in G2 on the way, and not written back to the disk.
        assert!(hs.iter().all(|&h| t.g2().contains(h)));
        let g3 = stat(&t, G3);
        assert_eq!((g3.onboarded, g3.offloaded, g3.lost), (4, 4, 0));
        assert_eq!(tier.stats().stored, 4);
        drop(m);
        // The parents came back from the disk: the chain matches in G1 now.
        assert_eq!(t.lookup(&hs).g1_hits(), 4);
        // Computed again: the disk already has every block.
        evict_g1_g2(&t, &m2);
        ImmutableBlock::release_all(stack_compute(&t, &hs, 0));
        t.flush();
        assert_eq!(stat(&t, G3).skipped(Skip::Present), 4);
        assert_eq!(tier.stats().stored, 4);
        assert_stack_idle(&t);
        tier.check_invariants().unwrap();
    }
}

#[test]
fn frequency_admission_keeps_cold_blocks_off_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup {
        admission: Admission::MinFrequency(2),
        frequency: true,
        ..Setup::new(4, 4, 16)
    };
    let tier = Arc::new(setup.tier(dir.path()).open().unwrap());
    let (t, m2) = setup.stack(tier.clone());
    let hot = chain(41, 2);
    let cold = chain(42, 2);
    ImmutableBlock::release_all(stack_compute(&t, &hot, 0));
    ImmutableBlock::release_all(stack_compute(&t, &cold, 0));
    t.flush();
    assert_eq!(
        stat(&t, G3).skipped(Skip::Admission),
        4,
        "seen once: refused"
    );
    assert_eq!(tier.stats().stored, 0);
    // The hot chain comes back (recomputed after eviction): G2 sees it a second time.
    evict_g1_g2(&t, &m2);
    ImmutableBlock::release_all(stack_compute(&t, &hot, 0));
    t.flush();
    assert_eq!(tier.contains(&hot), vec![true; 2]);
    assert_eq!(tier.contains(&cold), vec![false; 2]);
    assert_eq!(stat(&t, G3).offloaded, 2);
    // And onboards from the disk once G1 and G2 forgot it.
    evict_g1_g2(&t, &m2);
    let m = fetch(&t, &hot);
    assert_eq!(m.blocks.len(), 2);
    assert_stack_kv(&t, &m.blocks);
    drop(m);
    assert!(fetch(&t, &cold).blocks.is_empty());
    assert_stack_idle(&t);
}

#[test]
fn a_warm_restart_onboards_prefixes_from_the_reopened_file() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::new(4, 4, 16);
    let (a, b) = (chain(43, 4), chain(44, 3));
    let expected: Vec<(SequenceHash, Vec<u8>)> = {
        let tier = Arc::new(setup.tier(dir.path()).open().unwrap());
        let (t, _) = setup.stack(tier.clone());
        ImmutableBlock::release_all(stack_compute(&t, &a, 0));
        t.flush();
        ImmutableBlock::release_all(stack_compute(&t, &b, 0));
        t.flush();
        assert_eq!(stat(&t, G3).offloaded, 7);
        a.iter().chain(&b).map(|&h| (h, stack_kv(&t, h))).collect()
        // The stack and the tier are dropped here: a restart.
    };

    let tier = Arc::new(setup.tier(dir.path()).open().unwrap());
    let report = tier.recovery();
    assert_eq!(report.recovered(), 7, "{report:?}");
    assert_eq!((report.torn, report.unreadable), (0, 0));
    for (i, &h) in a.iter().enumerate() {
        let r = report.blocks.iter().find(|r| r.hash == h).unwrap();
        assert_eq!(
            r.parent,
            i.checked_sub(1).map(|p| a[p]),
            "parents recovered"
        );
    }
    let (t, _) = setup.stack(tier.clone());
    // The new stack has nothing in G1 or G2: both prefixes come from the disk, whole.
    for hs in [&a, &b] {
        let plan = t.lookup(hs);
        assert_eq!((plan.len(), plan.from_tier(G3)), (hs.len(), hs.len()));
        let m = t.onboard(plan, usize::MAX).unwrap().wait();
        assert!(m.end.is_none() && m.lost.is_empty(), "{m:?}");
        assert_eq!(m.blocks.len(), hs.len());
        assert_stack_kv(&t, &m.blocks);
        for blk in &m.blocks {
            let want = &expected
                .iter()
                .find(|e| e.0 == blk.sequence_hash())
                .unwrap()
                .1;
            assert_eq!(&common::read(t.g1().layout(), blk.block_id().index()), want);
        }
        drop(m);
        assert_eq!(t.lookup(hs).g1_hits(), hs.len());
    }
    assert_eq!(stat(&t, G3).onboarded, 7);
    assert_eq!(tier.stats().corrupt, 0);
    assert_stack_idle(&t);
}

#[test]
fn a_block_corrupted_in_the_file_ends_the_prefix_and_is_never_served_nor_retried() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::new(4, 4, 16);
    let tier = Arc::new(setup.tier(dir.path()).open().unwrap());
    let (t, m2) = setup.stack(tier.clone());
    let hs = chain(45, 4);
    ImmutableBlock::release_all(stack_compute(&t, &hs, 0));
    evict_g1_g2(&t, &m2);
    let slot = slot_of(&tier, &stack_kv(&t, hs[2]));
    flip_byte(&tier, slot, 100);

    let m = fetch(&t, &hs);
    assert_eq!((m.onboarded, m.blocks.len()), (2, 2));
    assert_stack_kv(&t, &m.blocks);
    assert_eq!(m.lost.len(), 1, "{m:?}");
    assert_eq!(
        (m.lost[0].hash, m.lost[0].tier, m.lost[0].cause.clone()),
        (hs[2], G3, LostCause::Corrupt)
    );
    assert_eq!(
        m.end.as_ref().map(|e| (e.at, e.reason.clone())),
        Some((2, EndReason::Lost { tier: G3 }))
    );
    // Never served: not in G1 nor G2; invalidated in G3 and reported there.
    assert!(!t.g1().contains(hs[2]) && !t.g2().contains(hs[2]));
    assert_eq!(tier.contains(&hs[2..]), vec![false, true]);
    assert_eq!(tier.stats().corrupt, 1);
    assert_eq!(stat(&t, G3).lost, 1);
    drop(m);

    // Never retried: the next lookup stops before it without reading the disk.
    let reads = tier.stats().hits + tier.stats().corrupt;
    let again = fetch(&t, &hs);
    assert!(again.lost.is_empty());
    assert_eq!((again.g1_hits, again.blocks.len()), (2, 2));
    drop(again);
    assert_eq!(tier.stats().hits + tier.stats().corrupt, reads);
    assert_stack_idle(&t);
    drop(t);
    // Not after a restart either: its header was zeroed; the block after it is intact.
    drop(tier);
    let tier = setup.tier(dir.path()).open().unwrap();
    assert_eq!(tier.contains(&hs), vec![true, true, false, true]);
    assert_eq!(tier.recovery().torn, 0, "tombstoned, not torn");
}

#[test]
fn enospc_on_the_disk_degrades_g3_and_leaves_g1_and_g2_whole() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::new(4, 8, 16);
    // Depth 1: the tier's writes are issued in order, so write 1 is the second block.
    let faults = Arc::new(DiskFaultPlan::new().fail_write(1, IoFault::NoSpace));
    let tier = Arc::new(
        setup
            .tier(dir.path())
            .queue_depth(1)
            .faults(faults)
            .open()
            .unwrap(),
    );
    let (t, m2) = setup.stack(tier.clone());
    let hs = chain(46, 3);
    let reg = stack_compute(&t, &hs, 0);
    t.flush();
    // G1 and G2 hold every block, byte exact; G3 lost the one whose write failed.
    assert_stack_kv(&t, &reg);
    assert!(hs.iter().all(|&h| t.g2().contains(h)));
    assert_eq!(stat(&t, TierId::G2).offloaded, 3);
    assert_eq!(tier.contains(&hs), vec![true, false, true]);
    let g3 = stat(&t, G3);
    assert_eq!((g3.offloaded, g3.lost), (2, 1), "{g3:?}");
    assert!(tier.degraded().is_some());
    drop(reg);

    // Degraded: no more admissions, counted as such; G2 takes the blocks as before.
    let more = chain(47, 2);
    let reg = stack_compute(&t, &more, 0);
    t.flush();
    assert_stack_kv(&t, &reg);
    assert!(more.iter().all(|&h| t.g2().contains(h)));
    assert_eq!(stat(&t, G3).skipped(Skip::Degraded), 2);
    assert_eq!(tier.contains(&more), vec![false; 2]);
    drop(reg);
    // It still serves what verifies: the first block onboards from the disk.
    evict_g1_g2(&t, &m2);
    let plan = t.lookup(&hs);
    assert_eq!((plan.len(), plan.from_tier(G3)), (1, 1));
    let m = t.onboard(plan, usize::MAX).unwrap().wait();
    assert_eq!(m.blocks.len(), 1);
    assert_stack_kv(&t, &m.blocks);
    // The plan itself stopped at the block no tier has: no loss, no cut.
    assert!(m.end.is_none() && m.lost.is_empty(), "{m:?}");
    drop(m);
    // After the cause is fixed, it admits again.
    assert!(tier.resume().is_some());
    let late = chain(48, 2);
    ImmutableBlock::release_all(stack_compute(&t, &late, 0));
    t.flush();
    assert_eq!(tier.contains(&late), vec![true; 2]);
    assert_stack_idle(&t);
    tier.check_invariants().unwrap();
}

#[test]
fn eio_on_a_disk_read_loses_that_block_only_and_degrades_g3() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::new(4, 4, 16);
    // Depth 1: the onboard's reads are issued in chain order, so read 1 is the second block.
    let faults = Arc::new(DiskFaultPlan::new().fail_read(1, IoFault::Io));
    let tier = Arc::new(
        setup
            .tier(dir.path())
            .queue_depth(1)
            .faults(faults)
            .open()
            .unwrap(),
    );
    let (t, m2) = setup.stack(tier.clone());
    let hs = chain(49, 3);
    ImmutableBlock::release_all(stack_compute(&t, &hs, 0));
    evict_g1_g2(&t, &m2);
    let m = fetch(&t, &hs);
    assert_eq!(m.blocks.len(), 1);
    assert_stack_kv(&t, &m.blocks);
    assert_eq!(m.lost.len(), 1, "{m:?}");
    assert_eq!((m.lost[0].hash, m.lost[0].tier), (hs[1], G3));
    assert!(
        matches!(m.lost[0].cause, LostCause::StoreFailed(StoreError::Io(_))),
        "{:?}",
        m.lost[0].cause
    );
    // Invalidated in G3 (never retried), the block after it still there.
    assert_eq!(tier.contains(&hs), vec![true, false, true]);
    assert!(tier.degraded().is_some());
    drop(m);
    // G1 and G2 are unharmed: new blocks go through them as before, G3 skips them.
    let more = chain(50, 2);
    let reg = stack_compute(&t, &more, 0);
    t.flush();
    assert_stack_kv(&t, &reg);
    assert!(more.iter().all(|&h| t.g2().contains(h)));
    assert_eq!(stat(&t, G3).skipped(Skip::Degraded), 2);
    drop(reg);
    assert_stack_idle(&t);
}

#[test]
fn a_full_disk_tier_evicts_by_its_policy() {
    // The tier's LRU manager: reading `a` back from the disk is a use of it, so `b` (used
    // longer ago) goes; without that read, `a` (written first) goes.
    for read_a in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let setup = Setup::new(4, 4, 4);
        let tier = Arc::new(
            setup
                .tier(dir.path())
                .eviction(EvictionBackend::Lru)
                .open()
                .unwrap(),
        );
        let events = tier.subscribe(64);
        let (t, m2) = setup.stack(tier.clone());
        let (a, b, c) = (chain(51, 2), chain(52, 2), chain(53, 2));
        ImmutableBlock::release_all(stack_compute(&t, &a, 0));
        t.flush();
        ImmutableBlock::release_all(stack_compute(&t, &b, 0));
        evict_g1_g2(&t, &m2);
        if read_a {
            let m = fetch(&t, &a);
            assert_eq!((m.onboarded, m.blocks.len()), (2, 2));
            drop(m);
            evict_g1_g2(&t, &m2);
        }
        // The tier is full: `c` needs two slots.
        ImmutableBlock::release_all(stack_compute(&t, &c, 0));
        t.flush();
        assert_eq!(stat(&t, G3).offloaded, 6, "read a: {read_a}");
        assert_eq!(tier.contains(&c), vec![true; 2]);
        let (kept, gone) = if read_a { (&a, &b) } else { (&b, &a) };
        assert_eq!(tier.contains(kept), vec![true; 2], "read a: {read_a}");
        assert_eq!(tier.contains(gone), vec![false; 2], "read a: {read_a}");
        assert_eq!(tier.disk_stats().evicted, 2);
        // The tier announced the evictions, by reason.
        let mut removed = Vec::new();
        for batch in events.drain() {
            for e in batch.iter() {
                if let KvEventKind::Removed {
                    block_hashes,
                    reason: RemovalReason::Evicted,
                } = &e.kind
                {
                    removed.extend(block_hashes.iter().copied());
                }
            }
        }
        removed.sort();
        let mut want = gone.clone();
        want.sort();
        assert_eq!(removed, want, "read a: {read_a}");
        // What it kept still onboards byte exact.
        evict_g1_g2(&t, &m2);
        for hs in [kept, &c] {
            let m = fetch(&t, hs);
            assert_eq!(m.blocks.len(), 2, "read a: {read_a}");
            assert_stack_kv(&t, &m.blocks);
        }
        assert_stack_idle(&t);
        tier.check_invariants().unwrap();
    }
}
