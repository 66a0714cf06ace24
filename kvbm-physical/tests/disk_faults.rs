//! Injected disk faults: ENOSPC, EIO, short writes and reads, bit flips. Each is a typed
//! outcome that degrades the tier (no more admissions) while it keeps serving what verifies;
//! nothing that fails verification is ever served, and a failed block is never retried.

mod disk_util;

use std::sync::Arc;

use disk_util::*;
use kvbm_physical::disk::{
    Degraded, DiskFaultPlan, DiskGeometry, IoFault, PAGE, RecoveryMode, SlotIoError,
};
use kvbm_physical::{GetOutcome, PutOutcome, SkipReason, StoreError, StoreTier};

fn with_plan(dir: &std::path::Path, slots: u32, plan: DiskFaultPlan) -> kvbm_physical::DiskTier {
    builder(dir, slots).faults(Arc::new(plan)).open().unwrap()
}

#[test]
fn enospc_is_typed_degrades_the_tier_and_reads_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let tier = with_plan(
        dir.path(),
        8,
        DiskFaultPlan::new().fail_write(1, IoFault::NoSpace),
    );
    assert_eq!(put(&tier, &[1]), vec![PutOutcome::Stored]);
    assert_eq!(
        put(&tier, &[2]),
        vec![PutOutcome::Failed(StoreError::NoSpace)]
    );
    assert_eq!(tier.degraded(), Some(Degraded::Io(SlotIoError::NoSpace)));
    // No more admissions, and nothing is written while degraded.
    let written = tier.stats().bytes_written;
    assert_eq!(
        put(&tier, &[3, 4]),
        vec![PutOutcome::Skipped(SkipReason::Degraded); 2]
    );
    assert_eq!(tier.stats().bytes_written, written);
    // What verifies is still served.
    assert!(get(&tier, 1).is_hit());
    assert_eq!(tier.contains(&[h(2), h(3)]), vec![false, false]);
    let s = tier.disk_stats();
    assert_eq!((s.store.failed, s.store.skipped, s.io_errors), (1, 2, 1));
    // Once the cause is fixed, the operator resumes admissions.
    assert!(tier.resume().is_some());
    assert_eq!(put(&tier, &[3]), vec![PutOutcome::Stored]);
    assert!(get(&tier, 3).is_hit());
    tier.check_invariants().unwrap();
}

#[test]
fn eio_on_a_write_stores_nothing_of_that_block() {
    let dir = tempfile::tempdir().unwrap();
    {
        let tier = with_plan(
            dir.path(),
            8,
            DiskFaultPlan::new().fail_write(1, IoFault::Io),
        );
        let out = put(&tier, &[1, 2, 3]);
        assert_eq!(out[0], PutOutcome::Stored);
        assert!(
            matches!(&out[1], PutOutcome::Failed(StoreError::Io(m)) if m.contains("errno")),
            "{out:?}"
        );
        assert_eq!(out[2], PutOutcome::Stored, "the rest of the batch lands");
        assert!(matches!(
            tier.degraded(),
            Some(Degraded::Io(SlotIoError::Io { errno: Some(5), .. }))
        ));
        assert_eq!(tier.contains(&[h(1), h(2), h(3)]), vec![true, false, true]);
        assert_eq!(tier.counts().registered_hashes, 2);
        tier.check_invariants().unwrap();
    }
    let tier = open(dir.path(), 8);
    assert_eq!(tier.recovery().recovered(), 2);
    assert!(tier.degraded().is_none(), "a reopened tier admits again");
}

/// One slot: the second write reuses the slot of the first and stops half-way, so the slot
/// holds the first block's header over a mix of both images; and the clean-up (zeroing the
/// slot's header) fails too, as when the process dies right there.
fn leave_a_torn_slot(dir: &std::path::Path) {
    let plan = DiskFaultPlan::new()
        .fail_write(1, IoFault::Short { bytes: PAGE })
        .fail_write(2, IoFault::Io);
    let tier = with_plan(dir, 1, plan);
    put(&tier, &[1]);
    let out = put(&tier, &[2]);
    assert!(
        matches!(&out[0], PutOutcome::Failed(StoreError::Io(m)) if m.contains("short write")),
        "{out:?}"
    );
    assert!(matches!(
        tier.degraded(),
        Some(Degraded::Io(SlotIoError::Short {
            op: "write",
            done: PAGE,
            ..
        }))
    ));
    assert_eq!(tier.contains(&[h(1), h(2)]), vec![false, false]);
}

#[test]
fn a_short_write_leaves_a_torn_slot_that_a_verifying_restart_drops() {
    let dir = tempfile::tempdir().unwrap();
    leave_a_torn_slot(dir.path());
    let tier = open(dir.path(), 1);
    assert_eq!((tier.recovery().recovered(), tier.recovery().torn), (0, 1));
    drop(tier);
    // Dropped for good: zeroed, so not even a header-only open takes it back.
    let tier = builder(dir.path(), 1)
        .recovery(RecoveryMode::Headers)
        .open()
        .unwrap();
    assert_eq!((tier.recovery().recovered(), tier.recovery().empty), (0, 1));
}

#[test]
fn a_short_write_leaves_a_torn_slot_that_a_header_only_restart_catches_at_its_read() {
    let dir = tempfile::tempdir().unwrap();
    leave_a_torn_slot(dir.path());
    // The first block's header is intact and taken at its word; the read checks the image.
    let tier = builder(dir.path(), 1)
        .recovery(RecoveryMode::Headers)
        .open()
        .unwrap();
    assert_eq!(tier.recovery().recovered(), 1);
    assert_eq!(get(&tier, 1), GetOutcome::Corrupt);
    assert_eq!(get(&tier, 1), GetOutcome::Miss);
}

#[test]
fn a_failed_write_never_lets_the_block_it_evicted_come_back() {
    // The slot's old block was evicted to make room; the write then failed before touching
    // the file, so the old block's bytes and header are still there. The tier zeroes the
    // header: a restart must not resurrect a block the tier let go of (it may have been
    // removed meanwhile elsewhere).
    let dir = tempfile::tempdir().unwrap();
    {
        let tier = with_plan(
            dir.path(),
            1,
            DiskFaultPlan::new().fail_write(1, IoFault::Io),
        );
        put(&tier, &[1]);
        assert!(matches!(put(&tier, &[2])[0], PutOutcome::Failed(_)));
        assert_eq!(tier.contains(&[h(1), h(2)]), vec![false, false]);
    }
    let tier = open(dir.path(), 1);
    assert_eq!(tier.recovery().recovered(), 0);
    assert_eq!(tier.recovery().empty, 1);
}

#[test]
fn eio_on_a_read_is_a_failure_that_is_never_retried() {
    let dir = tempfile::tempdir().unwrap();
    let tier = with_plan(
        dir.path(),
        8,
        DiskFaultPlan::new().fail_read(0, IoFault::Io),
    );
    put(&tier, &[1, 2]);
    let got = get(&tier, 1);
    assert!(
        matches!(&got, GetOutcome::Failed(StoreError::Io(_))),
        "{got:?}"
    );
    assert!(!tier.contains(&[h(1)])[0], "invalidated: not read again");
    assert_eq!(get(&tier, 1), GetOutcome::Miss);
    assert!(get(&tier, 2).is_hit(), "the others are still served");
    assert!(tier.degraded().is_some());
    assert_eq!(
        put(&tier, &[3]),
        vec![PutOutcome::Skipped(SkipReason::Degraded)]
    );
    let s = tier.disk_stats();
    assert_eq!((s.store.failed, s.io_errors, s.removed), (1, 1, 1));
    tier.check_invariants().unwrap();
}

#[test]
fn a_short_read_is_a_failure_too() {
    let dir = tempfile::tempdir().unwrap();
    let tier = with_plan(
        dir.path(),
        8,
        DiskFaultPlan::new().fail_read(0, IoFault::Short { bytes: PAGE + 10 }),
    );
    put(&tier, &[1]);
    let got = get(&tier, 1);
    assert!(
        matches!(&got, GetOutcome::Failed(StoreError::Io(m)) if m.contains("short read")),
        "{got:?}"
    );
    assert!(matches!(
        tier.degraded(),
        Some(Degraded::Io(SlotIoError::Short {
            op: "read",
            done: PAGE,
            ..
        }))
    ));
    assert_eq!(get(&tier, 1), GetOutcome::Miss);
}

#[test]
fn a_bit_flipped_on_its_way_to_disk_is_caught_wherever_it_lands() {
    let dir = tempfile::tempdir().unwrap();
    // Writes 0, 1, 2: a bit of the image, of the header, of the padding (not covered by
    // the checksum, and harmless: never served).
    let header_bit = 8 * (DiskGeometry::new(BB, 1).unwrap().slot_bytes() - PAGE);
    let plan = DiskFaultPlan::new()
        .flip_bit_on_write(0, 12_345)
        .flip_bit_on_write(1, header_bit + 8 * 20)
        .flip_bit_on_write(2, 8 * (BB + 3));
    let tier = with_plan(dir.path(), 8, plan);
    assert_eq!(
        put(&tier, &[1, 2, 3]),
        vec![PutOutcome::Stored; 3],
        "the write itself succeeds"
    );
    assert_eq!(get(&tier, 1), GetOutcome::Corrupt);
    assert_eq!(get(&tier, 2), GetOutcome::Corrupt);
    assert!(get(&tier, 3).is_hit());
    assert_eq!(tier.stats().corrupt, 2);
    assert_eq!(tier.contains(&[h(1), h(2)]), vec![false, false]);
    assert!(tier.degraded().is_none(), "corruption is not an I/O error");
    drop(tier);
    let tier = open(dir.path(), 8);
    assert_eq!(tier.recovery().recovered(), 1);
}

#[test]
fn a_failed_read_during_recovery_drops_that_slot_and_degrades() {
    let dir = tempfile::tempdir().unwrap();
    // Every slot full: recovery reads the slots on several I/O threads, so which slot the
    // second read is for varies, and an empty slot failing would drop no block.
    let stored = put(&open(dir.path(), 4), &[1, 2, 3, 4]);
    assert_eq!(stored, vec![PutOutcome::Stored; 4]);
    let tier = with_plan(
        dir.path(),
        4,
        DiskFaultPlan::new().fail_read(1, IoFault::Io),
    );
    let r = tier.recovery();
    assert_eq!((r.recovered(), r.unreadable), (3, 1));
    assert!(tier.degraded().is_some());
    for b in r.blocks.clone() {
        assert!(get(&tier, b.hash.as_u64()).is_hit());
    }
}

/// Every slot write (not the header-only ones) fails with `ENOSPC` while `full` is set.
#[derive(Debug, Default)]
struct FullDisk {
    full: std::sync::atomic::AtomicBool,
}

impl kvbm_physical::disk::DiskFaults for FullDisk {
    fn before_write(&self, _slot: u32, image: &mut [u8]) -> Option<IoFault> {
        (image.len() > PAGE && self.full.load(std::sync::atomic::Ordering::SeqCst))
            .then_some(IoFault::NoSpace)
    }
}

#[test]
fn a_degraded_tier_tries_the_disk_again_after_a_growing_wait() {
    use std::sync::atomic::Ordering::SeqCst;
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let disk = Arc::new(FullDisk::default());
    let wait = Duration::from_millis(60);
    let tier = builder(dir.path(), 8)
        .faults(disk.clone())
        .degraded_retry(wait)
        .open()
        .unwrap();
    assert_eq!(put(&tier, &[1]), vec![PutOutcome::Stored]);
    disk.full.store(true, SeqCst);
    assert_eq!(
        put(&tier, &[2]),
        vec![PutOutcome::Failed(StoreError::NoSpace)]
    );
    assert_eq!(
        put(&tier, &[3]),
        vec![PutOutcome::Skipped(SkipReason::Degraded)]
    );
    // After the wait one put tries, and fails: the wait doubles.
    std::thread::sleep(wait + Duration::from_millis(20));
    assert_eq!(
        put(&tier, &[3]),
        vec![PutOutcome::Failed(StoreError::NoSpace)]
    );
    std::thread::sleep(wait + Duration::from_millis(20));
    assert_eq!(
        put(&tier, &[4]),
        vec![PutOutcome::Skipped(SkipReason::Degraded)],
        "twice the wait now"
    );
    // Space is freed; the next try writes, and admissions resume without resume().
    disk.full.store(false, SeqCst);
    std::thread::sleep(wait * 2);
    assert_eq!(put(&tier, &[4]), vec![PutOutcome::Stored]);
    assert_eq!(tier.degraded(), None);
    assert_eq!(put(&tier, &[5]), vec![PutOutcome::Stored]);
    for n in [1, 4, 5] {
        assert!(get(&tier, n).is_hit(), "{n}");
    }
    assert_eq!(tier.contains(&[h(2), h(3)]), vec![false, false]);
    tier.check_invariants().unwrap();
}

#[test]
fn a_read_without_memory_for_its_buffer_keeps_the_block() {
    // ENOMEM says nothing about the slot: a transient failure (a miss to the tier stack),
    // the block stays, and the tier keeps admitting.
    let dir = tempfile::tempdir().unwrap();
    let tier = with_plan(
        dir.path(),
        8,
        DiskFaultPlan::new().fail_read(0, IoFault::NoMemory),
    );
    assert_eq!(put(&tier, &[1]), vec![PutOutcome::Stored]);
    match get(&tier, 1) {
        GetOutcome::Failed(e) => assert!(e.is_transient(), "{e}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(tier.degraded(), None);
    assert_eq!(tier.contains(&[h(1)]), vec![true]);
    assert!(get(&tier, 1).is_hit());
    assert_eq!(put(&tier, &[2]), vec![PutOutcome::Stored]);
}

/// Holds the first full-slot write until opened; `full` fails later ones with `ENOSPC`.
#[derive(Debug, Default)]
struct SlowThenFull {
    full: std::sync::atomic::AtomicBool,
    gate: parking_lot::Mutex<(bool, bool)>, // (arrived, open)
    cv: parking_lot::Condvar,
}

impl kvbm_physical::disk::DiskFaults for SlowThenFull {
    fn before_write(&self, _slot: u32, image: &mut [u8]) -> Option<IoFault> {
        if image.len() <= PAGE {
            return None;
        }
        let mut g = self.gate.lock();
        if !g.0 {
            g.0 = true;
            self.cv.notify_all();
            while !g.1 {
                self.cv.wait(&mut g);
            }
            return None;
        }
        drop(g);
        self.full
            .load(std::sync::atomic::Ordering::SeqCst)
            .then_some(IoFault::NoSpace)
    }
}

#[test]
fn a_put_admitted_before_a_degradation_does_not_clear_it() {
    // Put A is admitted and writes slowly; put B fails with ENOSPC and degrades the tier;
    // A then lands. A proves nothing about the disk now: only a put handed a try after the
    // wait may clear the degradation.
    use std::sync::atomic::Ordering::SeqCst;
    let dir = tempfile::tempdir().unwrap();
    let disk = Arc::new(SlowThenFull::default());
    let tier = Arc::new(
        builder(dir.path(), 8)
            .faults(disk.clone())
            .degraded_retry(std::time::Duration::from_secs(3600))
            .open()
            .unwrap(),
    );
    let a = std::thread::spawn({
        let tier = Arc::clone(&tier);
        move || put(&tier, &[1])
    });
    {
        let mut g = disk.gate.lock();
        while !g.0 {
            disk.cv.wait(&mut g);
        }
    }
    disk.full.store(true, SeqCst);
    assert_eq!(
        put(&tier, &[2]),
        vec![PutOutcome::Failed(StoreError::NoSpace)]
    );
    {
        let mut g = disk.gate.lock();
        g.1 = true;
        disk.cv.notify_all();
    }
    assert_eq!(a.join().unwrap(), vec![PutOutcome::Stored]);
    assert_eq!(tier.degraded(), Some(Degraded::Io(SlotIoError::NoSpace)));
    assert_eq!(
        put(&tier, &[3]),
        vec![PutOutcome::Skipped(SkipReason::Degraded)]
    );
}
