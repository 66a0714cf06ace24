//! The disk tier (G3): round trips, eviction by the tier's block manager, warm restart,
//! hostile input (wrong sizes, files of another layout, truncated or foreign files), the
//! buffered fallback and both I/O back ends.

mod disk_util;

use std::sync::Arc;

use disk_util::*;
use kvbm_logical::{EvictionBackend, KvEventKind, RemovalReason};
use kvbm_physical::disk::{
    BufferedReason, Capacity, DirectIo, DiskError, DiskFaultPlan, DiskTier, IoBackend, IoMode,
    OnIncompatible, RecoveryMode,
};
use kvbm_physical::{GetOutcome, PutOutcome, SkipReason, StoreBlock, StoreError, StoreTier};

#[test]
fn the_tier_and_its_reports_cross_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<DiskTier>();
    send_sync::<kvbm_physical::disk::DiskStats>();
    send_sync::<kvbm_physical::disk::RecoveryReport>();
    send_sync::<DiskError>();
    send_sync::<DiskFaultPlan>();
}

#[test]
fn blocks_round_trip_with_their_parents() {
    let dir = tempfile::tempdir().unwrap();
    let tier = open(dir.path(), 8);
    assert_eq!(tier.medium(), "DISK");
    assert_eq!(tier.block_bytes(), BB);
    assert_eq!(put(&tier, &[10, 11, 12]), vec![PutOutcome::Stored; 3]);
    // Again: already there, not written twice.
    assert_eq!(put(&tier, &[11]), vec![PutOutcome::Present]);
    assert_eq!(
        tier.contains(&[h(10), h(13), h(11)]),
        vec![true, false, true]
    );
    assert_eq!(
        get(&tier, 11),
        GetOutcome::Hit {
            parent: Some(h(10))
        }
    );
    assert_eq!(get(&tier, 10), GetOutcome::Hit { parent: None });
    assert_eq!(get(&tier, 13), GetOutcome::Miss);
    let s = tier.stats();
    assert_eq!((s.stored, s.hits, s.misses, s.corrupt), (3, 2, 1, 0));
    assert_eq!(s.bytes_written, 3 * BB as u64);
    assert_eq!(s.bytes_read, 2 * BB as u64);
    assert_eq!(s.resident, Some(3));
    tier.check_invariants().unwrap();
}

#[test]
fn a_batch_reads_many_blocks_at_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let tier = builder(dir.path(), 64).queue_depth(4).open().unwrap();
    let hashes: Vec<u64> = (100..140).collect();
    assert!(put(&tier, &hashes).iter().all(|o| *o == PutOutcome::Stored));
    // Asked in another order, with misses and a repeat in between.
    let ask: Vec<u64> = vec![139, 5, 100, 120, 120, 6, 101];
    let mut bufs = vec![vec![0u8; BB]; ask.len()];
    let mut outs: Vec<&mut [u8]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
    let hs: Vec<_> = ask.iter().map(|&n| h(n)).collect();
    let got = tier.get(&hs, &mut outs);
    for ((&n, o), buf) in ask.iter().zip(&got).zip(&bufs) {
        if n < 100 {
            assert_eq!(*o, GetOutcome::Miss);
        } else {
            assert_eq!(
                *o,
                GetOutcome::Hit {
                    parent: parent_of(h(n))
                }
            );
            assert!(*buf == image(h(n), BB), "bytes of {n}");
        }
    }
}

#[test]
fn wrong_buffer_sizes_fail_alone_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let tier = open(dir.path(), 4);
    let good = image(h(1), BB);
    let short = vec![0u8; BB - 1];
    let long = vec![0u8; BB + 4096];
    let out = tier.put(&[
        StoreBlock {
            hash: h(1),
            parent: None,
            bytes: &good,
        },
        StoreBlock {
            hash: h(2),
            parent: None,
            bytes: &short,
        },
        StoreBlock {
            hash: h(3),
            parent: None,
            bytes: &long,
        },
        StoreBlock {
            hash: h(4),
            parent: None,
            bytes: &[],
        },
    ]);
    let size = |actual| {
        PutOutcome::Failed(StoreError::BufferSize {
            expected: BB,
            actual,
        })
    };
    assert_eq!(
        out,
        vec![PutOutcome::Stored, size(BB - 1), size(BB + 4096), size(0)]
    );
    assert_eq!(
        tier.contains(&[h(1), h(2), h(3), h(4)]),
        vec![true, false, false, false]
    );
    assert_eq!(tier.counts().registered_hashes, 1);
    assert!(
        tier.degraded().is_none(),
        "a caller's mistake does not degrade the tier"
    );

    // Reads: a wrong output buffer fails that hash only; fewer buffers than hashes too.
    let mut ok = vec![0u8; BB];
    let mut small = vec![0u8; 10];
    let got = tier.get(&[h(1), h(1), h(9)], &mut [&mut ok, &mut small]);
    assert_eq!(got[0], GetOutcome::Hit { parent: None });
    assert_eq!(
        got[1],
        GetOutcome::Failed(StoreError::BufferSize {
            expected: BB,
            actual: 10
        })
    );
    assert_eq!(
        got[2],
        GetOutcome::Failed(StoreError::BufferSize {
            expected: BB,
            actual: 0
        })
    );
    assert_eq!(ok, good);
    assert!(tier.contains(&[h(1)])[0], "a refused read removes nothing");
    tier.check_invariants().unwrap();
}

#[test]
fn repeats_within_a_batch_are_written_once() {
    let dir = tempfile::tempdir().unwrap();
    let tier = open(dir.path(), 4);
    assert_eq!(put(&tier, &[7, 7, 8, 7]), vec![PutOutcome::Stored; 4]);
    assert_eq!(tier.stats().bytes_written, 2 * BB as u64);
    assert_eq!(tier.counts().registered_hashes, 2);
}

#[test]
fn eviction_follows_the_managers_lru_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let tier = open(dir.path(), 4);
    let events = tier.subscribe(64);
    put(&tier, &[1, 2, 3, 4]);
    assert!(get(&tier, 1).is_hit()); // 1 is now the most recently used
    assert_eq!(put(&tier, &[5]), vec![PutOutcome::Stored]);
    assert_eq!(tier.contains(&[h(1), h(2), h(5)]), vec![true, false, true]);
    assert_eq!(get(&tier, 2), GetOutcome::Miss);
    assert!(get(&tier, 1).is_hit());
    assert_eq!(tier.disk_stats().evicted, 1);

    let kinds: Vec<KvEventKind> = events
        .drain()
        .flat_map(|b| b.iter().map(|e| e.kind.clone()).collect::<Vec<_>>())
        .collect();
    let evicted = KvEventKind::Removed {
        block_hashes: vec![h(2)],
        reason: RemovalReason::Evicted,
    };
    assert!(kinds.contains(&evicted), "{kinds:?}");
    assert!(kinds.iter().any(
        |k| matches!(k, KvEventKind::Stored { block_hashes, parent: Some(p), tier: "disk", .. } if block_hashes[0] == h(1) && *p == h(0))
    ), "{kinds:?}");
}

#[test]
fn the_eviction_policy_is_the_managers_choice() {
    // Lineage evicts leaves first: the oldest block, 2, is the parent of 3, so it stays.
    let dir = tempfile::tempdir().unwrap();
    let tier = builder(dir.path(), 3)
        .eviction(EvictionBackend::Lineage)
        .open()
        .unwrap();
    put(&tier, &[2]);
    put(&tier, &[3]); // parent 2
    put(&tier, &[4]);
    put(&tier, &[6]);
    assert!(
        tier.contains(&[h(2)])[0],
        "a prefix outlives its tail under lineage"
    );
    assert_eq!(
        tier.contains(&[h(3), h(4)]).iter().filter(|&&c| c).count(),
        1
    );
    // Under LRU the oldest goes.
    let lru = open(&dir.path().join("lru"), 3);
    for n in [2, 3, 4, 6] {
        put(&lru, &[n]);
    }
    assert!(!lru.contains(&[h(2)])[0]);
}

#[test]
fn slots_in_use_are_never_evicted_so_a_put_can_find_no_room() {
    // A slot being written (or read) is held by a handle: the second block of this batch
    // finds the only slot taken by the first.
    let dir = tempfile::tempdir().unwrap();
    let tier = open(dir.path(), 1);
    let out = put(&tier, &[10, 12]);
    assert_eq!(
        out,
        vec![PutOutcome::Stored, PutOutcome::Skipped(SkipReason::NoRoom)]
    );
    assert_eq!(tier.stats().skipped, 1);
    assert!(tier.degraded().is_none(), "back-pressure is not an error");
    tier.check_invariants().unwrap();
}

#[test]
fn a_restart_recovers_every_block_with_its_parent_in_write_order() {
    let dir = tempfile::tempdir().unwrap();
    {
        let tier = open(dir.path(), 8);
        put(&tier, &[20, 21, 22, 23]);
        put(&tier, &[24, 25]);
        assert!(get(&tier, 20).is_hit()); // reads do not change the write order
    }
    let tier = open(dir.path(), 8);
    let r = tier.recovery();
    assert!(!r.created);
    assert_eq!(r.recovered(), 6);
    assert_eq!((r.torn, r.stale, r.unreadable), (0, 0, 0));
    assert_eq!(r.empty, 2);
    let order: Vec<u64> = r.blocks.iter().map(|b| b.hash.as_u64()).collect();
    assert_eq!(order, vec![20, 21, 22, 23, 24, 25], "oldest first");
    for b in &r.blocks {
        assert_eq!(b.parent, parent_of(b.hash));
    }
    assert!(
        r.blocks
            .windows(2)
            .all(|w| w[0].generation < w[1].generation)
    );
    for n in 20..26 {
        assert_eq!(
            get(&tier, n),
            GetOutcome::Hit {
                parent: parent_of(h(n))
            }
        );
    }
    // New writes continue the generations and evict in the recovered order.
    drop(tier);
    let tier = open(dir.path(), 8);
    put(&tier, &[26, 27, 28]);
    assert_eq!(
        tier.contains(&[h(20), h(21), h(22)]),
        vec![false, true, true]
    );
    tier.check_invariants().unwrap();
}

#[test]
fn headers_mode_opens_without_reading_images_and_still_serves_nothing_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let slot_offset = {
        let tier = open(dir.path(), 4);
        put(&tier, &[1, 2, 3]);
        drop(tier);
        let tier = open(dir.path(), 4);
        tier.geometry().slot_offset(slot_of(&tier, 2))
    };
    flip_in_file(&tier_path(dir.path()), slot_offset + 100, 3);
    let tier = builder(dir.path(), 4)
        .recovery(RecoveryMode::Headers)
        .open()
        .unwrap();
    assert_eq!(
        tier.recovery().recovered(),
        3,
        "headers verify; images are not read"
    );
    assert_eq!(get(&tier, 2), GetOutcome::Corrupt);
    assert_eq!(get(&tier, 2), GetOutcome::Miss, "never retried");
    assert!(get(&tier, 1).is_hit() && get(&tier, 3).is_hit());
    drop(tier);
    // Its header was zeroed when it was found corrupt: it does not come back.
    let tier = open(dir.path(), 4);
    assert_eq!(tier.recovery().recovered(), 2);
    assert_eq!(tier.recovery().torn, 0);
}

#[test]
fn verify_mode_drops_a_slot_damaged_in_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (image_at, header_at) = {
        let tier = open(dir.path(), 4);
        put(&tier, &[1, 2, 3]);
        drop(tier);
        let tier = open(dir.path(), 4);
        let g = tier.geometry();
        (
            g.slot_offset(slot_of(&tier, 1)) + 7,
            g.header_offset(slot_of(&tier, 3)) + 20,
        )
    };
    flip_in_file(&tier_path(dir.path()), image_at, 0);
    flip_in_file(&tier_path(dir.path()), header_at, 5);
    let tier = open(dir.path(), 4);
    let r = tier.recovery();
    assert_eq!(r.recovered(), 1);
    assert_eq!(r.torn, 2);
    assert_eq!(tier.contains(&[h(1), h(2), h(3)]), vec![false, true, false]);
    assert!(get(&tier, 2).is_hit());
}

#[test]
fn a_bit_flipped_in_the_file_while_open_is_never_served() {
    let dir = tempfile::tempdir().unwrap();
    {
        let tier = open(dir.path(), 4);
        put(&tier, &[1, 2]);
    }
    let tier = open(dir.path(), 4);
    let at = tier.geometry().slot_offset(slot_of(&tier, 2)) + BB as u64 - 1;
    flip_in_file(&tier_path(dir.path()), at, 7);
    assert_eq!(get(&tier, 2), GetOutcome::Corrupt);
    assert!(!tier.contains(&[h(2)])[0], "invalidated in the tier");
    assert_eq!(get(&tier, 2), GetOutcome::Miss);
    let s = tier.stats();
    assert_eq!((s.corrupt, s.hits), (1, 0));
    assert_eq!(tier.disk_stats().removed, 1);
    assert!(get(&tier, 1).is_hit());
    tier.check_invariants().unwrap();
}

#[test]
fn a_file_of_another_fingerprint_is_never_read() {
    let dir = tempfile::tempdir().unwrap();
    {
        let tier = open(dir.path(), 4);
        put(&tier, &[1, 2]);
    }
    let before = std::fs::read(tier_path(dir.path())).unwrap();
    let err = builder(dir.path(), 4)
        .fingerprint(FP + 1)
        .on_incompatible(OnIncompatible::Fail)
        .open()
        .unwrap_err();
    assert!(
        matches!(
            err,
            DiskError::Incompatible {
                what: "fingerprint",
                found: FP,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        std::fs::read(tier_path(dir.path())).unwrap(),
        before,
        "a refused open changes nothing"
    );
    // The right fingerprint still recovers everything.
    assert_eq!(open(dir.path(), 4).recovery().recovered(), 2);

    // Reinitialised: nothing of the old layout is readable, now or after another restart.
    let other = builder(dir.path(), 4).fingerprint(FP + 1).open().unwrap();
    assert_eq!(other.recovery().recovered(), 0);
    assert!(
        other
            .recovery()
            .reinitialized
            .as_deref()
            .unwrap()
            .contains("fingerprint")
    );
    assert_eq!(get(&other, 1), GetOutcome::Miss);
    drop(other);
    assert_eq!(open(dir.path(), 4).recovery().recovered(), 0);
}

#[test]
fn a_file_of_another_block_size_is_never_read() {
    let dir = tempfile::tempdir().unwrap();
    drop(put(&open(dir.path(), 4), &[1]));
    let err = builder(dir.path(), 4)
        .block_bytes(BB * 2)
        .on_incompatible(OnIncompatible::Fail)
        .open()
        .unwrap_err();
    assert!(
        matches!(
            err,
            DiskError::Incompatible {
                what: "block_bytes",
                ..
            }
        ),
        "{err}"
    );
    let tier = builder(dir.path(), 4).block_bytes(BB * 2).open().unwrap();
    assert_eq!(tier.recovery().recovered(), 0);
}

#[test]
fn a_truncated_file_recovers_the_slots_it_still_has() {
    let dir = tempfile::tempdir().unwrap();
    let path = tier_path(dir.path());
    {
        let tier = open(dir.path(), 4);
        put(&tier, &[1, 2, 3, 4]);
    }
    let g = open(dir.path(), 4).geometry();
    // Cut in the middle of the third slot.
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(g.slot_offset(2) + 100).unwrap();
    drop(f);
    let err = builder(dir.path(), 4)
        .on_incompatible(OnIncompatible::Fail)
        .open()
        .unwrap_err();
    assert!(
        matches!(err, DiskError::Truncated { expected, .. } if expected == g.file_len()),
        "{err}"
    );
    let tier = open(dir.path(), 4);
    assert_eq!(tier.recovery().recovered(), 2);
    assert_eq!(tier.recovery().truncated, 2);
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        g.file_len(),
        "preallocated again"
    );
    let slots: Vec<u32> = tier.recovery().blocks.iter().map(|b| b.slot).collect();
    assert!(slots.iter().all(|&s| s < 2), "{slots:?}");
    for b in tier.recovery().blocks.clone() {
        assert!(get(&tier, b.hash.as_u64()).is_hit());
    }
    assert_eq!(put(&tier, &[5, 6]), vec![PutOutcome::Stored; 2]);
}

#[test]
fn a_file_that_is_not_a_tier_file_is_never_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let path = tier_path(dir.path());
    std::fs::write(&path, b"#!/bin/sh\necho precious\n").unwrap();
    let err = builder(dir.path(), 4).open().unwrap_err();
    assert!(matches!(err, DiskError::NotATierFile { .. }), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"#!/bin/sh\necho precious\n");
    // Nor one that starts with zeros (disk images, sparse files).
    let mut image = vec![0u8; 64 << 10];
    image[40_000] = 1;
    std::fs::write(&path, &image).unwrap();
    let err = builder(dir.path(), 4).open().unwrap_err();
    assert!(matches!(err, DiskError::NotATierFile { .. }), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), image);
    // A directory at the path: a typed I/O error.
    let err = DiskTier::builder()
        .path(dir.path())
        .block_bytes(BB)
        .capacity(Capacity::Blocks(1))
        .fingerprint(1)
        .open()
        .unwrap_err();
    assert!(matches!(err, DiskError::Io { .. }), "{err}");
}

#[test]
fn a_creation_interrupted_before_the_superblock_starts_afresh() {
    // Creating (or starting afresh) allocates the first page, then writes the superblock
    // there: a crash between the two leaves exactly one page of zeros, which must not make
    // the path unusable until someone deletes the file by hand.
    let dir = tempfile::tempdir().unwrap();
    let path = tier_path(dir.path());
    std::fs::write(&path, vec![0u8; kvbm_physical::disk::PAGE]).unwrap();
    let tier = open(dir.path(), 4);
    assert_eq!(tier.recovery().recovered(), 0);
    assert_eq!(put(&tier, &[1, 2]), vec![PutOutcome::Stored; 2]);
    assert!(get(&tier, 1).is_hit());
    drop(tier);
    // Two pages of zeros are not what a creation leaves: not ours.
    std::fs::write(&path, vec![0u8; 2 * kvbm_physical::disk::PAGE]).unwrap();
    let err = builder(dir.path(), 4).open().unwrap_err();
    assert!(matches!(err, DiskError::NotATierFile { .. }), "{err}");
}

#[test]
fn a_tier_file_has_one_user_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let first = open(dir.path(), 4);
    let err = builder(dir.path(), 4).open().unwrap_err();
    assert!(matches!(err, DiskError::Locked { .. }), "{err}");
    drop(first);
    open(dir.path(), 4);
}

#[test]
fn discard_starts_empty_and_the_old_blocks_never_come_back() {
    let dir = tempfile::tempdir().unwrap();
    drop(put(&open(dir.path(), 4), &[1, 2]));
    let tier = builder(dir.path(), 4)
        .recovery(RecoveryMode::Discard)
        .open()
        .unwrap();
    assert_eq!(tier.recovery().recovered(), 0);
    assert_eq!(get(&tier, 1), GetOutcome::Miss);
    put(&tier, &[3]);
    drop(tier);
    let tier = open(dir.path(), 4);
    let got: Vec<u64> = tier
        .recovery()
        .blocks
        .iter()
        .map(|b| b.hash.as_u64())
        .collect();
    assert_eq!(got, vec![3]);
}

#[test]
fn a_capacity_change_keeps_the_blocks_that_still_fit() {
    let dir = tempfile::tempdir().unwrap();
    drop(put(&open(dir.path(), 4), &[1, 2, 3, 4]));
    let bigger = open(dir.path(), 16);
    assert_eq!(bigger.recovery().recovered(), 4);
    assert_eq!(bigger.recovery().resized_from, Some(4));
    drop(bigger);
    let smaller = open(dir.path(), 2);
    assert_eq!(smaller.recovery().recovered(), 2);
    assert_eq!(smaller.geometry().slots(), 2);
    for b in smaller.recovery().blocks.clone() {
        assert!(get(&smaller, b.hash.as_u64()).is_hit());
    }
}

#[test]
fn removed_blocks_are_gone_also_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let tier = open(dir.path(), 4);
        put(&tier, &[1, 2, 3]);
        tier.remove(&[h(2), h(99)]);
        assert_eq!(tier.contains(&[h(1), h(2), h(3)]), vec![true, false, true]);
        assert_eq!(get(&tier, 2), GetOutcome::Miss);
        assert_eq!(tier.disk_stats().removed, 1);
    }
    let tier = open(dir.path(), 4);
    assert_eq!(tier.recovery().recovered(), 2);
    assert_eq!(tier.contains(&[h(2)]), vec![false]);
}

#[test]
fn options_are_checked_once_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let p = tier_path(dir.path());
    let missing = |b: kvbm_physical::disk::DiskTierBuilder| match b.open() {
        Err(DiskError::Missing(what)) => what,
        other => panic!("{other:?}"),
    };
    assert_eq!(missing(DiskTier::builder()), "path");
    assert_eq!(missing(DiskTier::builder().path(&p)), "block_bytes");
    assert_eq!(
        missing(DiskTier::builder().path(&p).block_bytes(BB)),
        "capacity"
    );
    assert_eq!(
        missing(
            DiskTier::builder()
                .path(&p)
                .block_bytes(BB)
                .capacity(Capacity::Blocks(1))
        ),
        "fingerprint"
    );
    let invalid = |b: kvbm_physical::disk::DiskTierBuilder| match b.open() {
        Err(DiskError::InvalidOption { field, .. }) => field,
        other => panic!("{other:?}"),
    };
    assert_eq!(invalid(builder(dir.path(), 0)), "capacity");
    assert_eq!(
        invalid(builder(dir.path(), 1).capacity(Capacity::Bytes(8192))),
        "capacity"
    );
    assert_eq!(
        invalid(builder(dir.path(), 1).block_bytes(0)),
        "block_bytes"
    );
    assert_eq!(
        invalid(builder(dir.path(), 1).block_bytes(usize::MAX)),
        "block_bytes"
    );
    assert_eq!(
        invalid(builder(dir.path(), 1).queue_depth(0)),
        "queue_depth"
    );
    assert_eq!(
        invalid(builder(dir.path(), 1).queue_depth(5000)),
        "queue_depth"
    );
    assert_eq!(invalid(builder(dir.path(), u32::MAX)), "capacity");
    assert!(!p.exists(), "a refused open creates no file");
}

#[test]
fn where_o_direct_is_refused_the_tier_falls_back_to_buffered_io_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let refuse = || Arc::new(DiskFaultPlan::new().refuse_direct_io());
    {
        let tier = builder(dir.path(), 4).faults(refuse()).open().unwrap();
        assert!(matches!(
            tier.io_mode(),
            IoMode::Buffered {
                reason: BufferedReason::Refused(_)
            }
        ));
        assert!(!tier.disk_stats().io_mode.is_direct());
        put(&tier, &[1, 2]);
        assert!(get(&tier, 2).is_hit());
    }
    let tier = builder(dir.path(), 4).faults(refuse()).open().unwrap();
    assert_eq!(tier.recovery().recovered(), 2);
    drop(tier);

    let err = builder(dir.path(), 4)
        .faults(refuse())
        .direct_io(DirectIo::Require)
        .open()
        .unwrap_err();
    assert!(matches!(err, DiskError::DirectIoRefused { .. }), "{err}");

    let tier = builder(dir.path(), 4)
        .direct_io(DirectIo::Off)
        .open()
        .unwrap();
    assert_eq!(
        tier.io_mode(),
        &IoMode::Buffered {
            reason: BufferedReason::Requested
        }
    );
    assert_eq!(
        tier.recovery().recovered(),
        2,
        "the same file, read buffered"
    );
}

#[test]
fn a_tier_on_tmpfs_works_whichever_way_it_does_io() {
    let shm = std::path::Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("no /dev/shm here");
        return;
    }
    let dir = tempfile::tempdir_in(shm).unwrap();
    let tier = open(dir.path(), 4);
    // tmpfs accepts O_DIRECT since Linux 6.6; before, this tier runs buffered.
    eprintln!("tmpfs: {:?}", tier.io_mode());
    put(&tier, &[1, 2, 3]);
    drop(tier);
    let tier = open(dir.path(), 4);
    assert_eq!(tier.recovery().recovered(), 3);
    assert!(get(&tier, 3).is_hit());
}

#[test]
fn both_io_back_ends_read_what_the_other_wrote() {
    let dir = tempfile::tempdir().unwrap();
    for (round, backend) in [
        IoBackend::IoUring,
        IoBackend::ThreadPool,
        IoBackend::IoUring,
    ]
    .into_iter()
    .enumerate()
    {
        let tier = match builder(dir.path(), 32)
            .io_backend(backend)
            .queue_depth(4)
            .open()
        {
            Ok(t) => t,
            Err(DiskError::Backend { source, .. }) if backend == IoBackend::IoUring => {
                // Some sandboxes forbid io_uring_setup; the thread pool is then the only one.
                eprintln!("io_uring unavailable here: {source}");
                continue;
            }
            Err(e) => panic!("{e}"),
        };
        assert_eq!(tier.disk_stats().backend, backend);
        let base = 100 * round as u64;
        let fresh: Vec<u64> = (base..base + 10).collect();
        assert!(put(&tier, &fresh).iter().all(|o| *o == PutOutcome::Stored));
        for n in tier
            .recovery()
            .blocks
            .iter()
            .map(|b| b.hash.as_u64())
            .chain(fresh)
        {
            assert!(get(&tier, n).is_hit(), "{n} with {backend:?}");
        }
    }
}

#[test]
fn the_stats_say_how_the_tier_runs() {
    let dir = tempfile::tempdir().unwrap();
    let tier = builder(dir.path(), 3).queue_depth(3).open().unwrap();
    put(&tier, &[1, 2, 3]);
    put(&tier, &[4]);
    let s = tier.disk_stats();
    assert_eq!(s.slots, 3);
    assert_eq!(s.queue_depth, 3);
    assert_eq!(s.backend, IoBackend::ThreadPool);
    assert_eq!(s.evicted, 1);
    assert_eq!(s.store.stored, 4);
    assert_eq!(s.store.resident, Some(3));
    assert_eq!((s.io_errors, s.removed), (0, 0));
    assert!(s.degraded.is_none());
    let m = tier.manager_metrics();
    assert_eq!(m.removed_evicted, 1);
}

#[test]
fn two_copies_of_a_hash_recover_as_one_and_the_older_is_dropped_for_good() {
    // As if two puts of one hash had raced in an older version: copy a slot over another.
    let dir = tempfile::tempdir().unwrap();
    drop(put(&open(dir.path(), 4), &[1, 2]));
    let (from, to, len) = {
        let tier = open(dir.path(), 4);
        let g = tier.geometry();
        (
            g.slot_offset(slot_of(&tier, 1)),
            g.slot_offset(slot_of(&tier, 2)),
            g.slot_bytes(),
        )
    };
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(tier_path(dir.path()))
            .unwrap();
        let mut slot = vec![0u8; len];
        f.read_exact_at(&mut slot, from).unwrap();
        f.write_all_at(&slot, to).unwrap();
        f.sync_all().unwrap();
    }
    let tier = open(dir.path(), 4);
    assert_eq!(tier.recovery().recovered(), 1);
    assert_eq!(tier.recovery().duplicates, 1);
    assert!(get(&tier, 1).is_hit());
    tier.remove(&[h(1)]);
    drop(tier);
    let tier = open(dir.path(), 4);
    assert_eq!(
        tier.recovery().recovered(),
        0,
        "the other copy does not come back"
    );
    assert_eq!(tier.recovery().duplicates, 0);
}
