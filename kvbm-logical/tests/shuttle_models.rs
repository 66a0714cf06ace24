//! Concurrency models of the store's transitions, explored with shuttle.
//!
//! Why shuttle rather than loom: loom needs every atomic and lock replaced by its own and
//! explores exhaustively, which does not scale past toy code; neither instruments
//! `parking_lot`. Shuttle schedules threads at its own synchronisation points and offers both
//! exhaustive depth-first search for small models and randomized PCT search. The `shuttle`
//! feature swaps in shuttle's mutex for the store's one lock **and** shuttle's atomics for the
//! per-slot owner counts, which handles update without the lock (a clone, and the drop of an
//! owner that is not the last). The store's correctness argument rests on that lock plus the
//! owner-count protocol (`src/store/refs.rs`): a count changes between 0 and 1 only under the
//! lock. So the interleavings that matter are exactly those at lock acquisitions and at the
//! counts' atomic operations, and shuttle explores both.
//!
//! Run: `cargo test -p kvbm-logical --features shuttle --test shuttle_models` (CI does).
//! Each model ends by checking conservation (`reset + inactive + mutable + active ==
//! total`, through `check_invariants`) and that no two live handles own one slot with
//! different hashes, nor a mutable handle a slot another handle holds.
#![cfg(feature = "shuttle")]

use std::sync::Arc;

use kvbm_logical::{
    BlockDuplicationPolicy, BlockId, BlockManager, Device, ImmutableBlock, MutableBlock,
    SequenceHash,
};
use shuttle::thread;

fn manager(blocks: usize, policy: BlockDuplicationPolicy) -> Arc<BlockManager<Device>> {
    Arc::new(
        BlockManager::builder()
            .block_count(blocks)
            .block_size(4)
            .duplication_policy(policy)
            .build()
            .expect("valid"),
    )
}

fn register(m: &BlockManager<Device>, hash: u64) -> ImmutableBlock<Device> {
    let block = m
        .allocate_blocks(1)
        .expect("a free block")
        .pop()
        .expect("one");
    m.register_block(block.stage(SequenceHash::new(hash), 4).expect("size"))
        .expect("own block")
}

/// Schedules tried by the randomized (PCT) searches, and the bug depth they target: the
/// models whose threads make many atomic operations have too many interleavings for
/// exhaustive search (each owner-count load or swap is a scheduling point).
const PCT_ITERATIONS: usize = 20_000;
const PCT_DEPTH: usize = 3;

fn hash(raw: u64) -> SequenceHash {
    SequenceHash::new(raw)
}

/// Conservation, and exclusive ownership of slots by live handles.
fn assert_sound(
    m: &BlockManager<Device>,
    live: &[&ImmutableBlock<Device>],
    mutable: &[&MutableBlock<Device>],
) {
    let c = m.check_invariants().expect("invariants hold");
    assert_eq!(c.reset + c.inactive + c.mutable + c.active, c.total);
    for a in live {
        for b in live {
            if a.block_id() == b.block_id() {
                assert_eq!(a.sequence_hash(), b.sequence_hash(), "one slot, two hashes");
            }
        }
    }
    let mut slots: Vec<BlockId> = mutable.iter().map(|b| b.block_id()).collect();
    for id in &slots {
        assert!(
            !live.iter().any(|l| l.block_id() == *id),
            "a mutable slot is also held"
        );
    }
    slots.sort();
    slots.dedup();
    assert_eq!(
        slots.len(),
        mutable.len(),
        "two mutable handles on one slot"
    );
    assert_eq!(c.mutable, mutable.len());
}

/// (1) The last handle of a hash is dropped on one thread while another thread's
/// `match_blocks` resurrects it: the match always finds it (active or inactive), and the
/// block ends inactive once both are done.
#[test]
fn last_drop_races_a_resurrecting_match() {
    shuttle::check_dfs(
        || {
            let m = manager(2, BlockDuplicationPolicy::Reject);
            let last = register(&m, 1);
            let dropper = thread::spawn(move || drop(last));
            let m2 = Arc::clone(&m);
            let matcher = thread::spawn(move || m2.match_blocks(&[SequenceHash::new(1)]));
            dropper.join().unwrap();
            let hits = matcher.join().unwrap();
            assert_eq!(hits.len(), 1);
            assert_eq!(hits[0].sequence_hash(), SequenceHash::new(1));
            assert_sound(&m, &hits.iter().collect::<Vec<_>>(), &[]);
            assert_eq!(m.counts().active, 1);
            drop(hits);
            let c = m.counts();
            assert_eq!((c.inactive, c.reset, c.active), (1, 1, 0));
        },
        None,
    );
}

/// (2) An allocation evicting a block while another thread upgrades a `WeakBlock` to it:
/// exactly one of them wins — the upgrade (and the allocation finds no block), or the
/// eviction (and the upgrade finds the hash gone). Never both on one slot.
#[test]
fn eviction_races_a_weak_upgrade() {
    shuttle::check_dfs(
        || {
            let m = manager(1, BlockDuplicationPolicy::Reject);
            let handle = register(&m, 7);
            let weak = handle.downgrade();
            drop(handle); // inactive: evictable and upgradable
            let m2 = Arc::clone(&m);
            let allocator = thread::spawn(move || m2.allocate_blocks(1).ok());
            let upgrader = thread::spawn(move || weak.upgrade());
            let allocated = allocator.join().unwrap();
            let upgraded = upgrader.join().unwrap();
            match (&allocated, &upgraded) {
                (Some(blocks), None) => {
                    assert_eq!(blocks.len(), 1);
                    assert!(m.match_blocks(&[SequenceHash::new(7)]).is_empty());
                }
                (None, Some(block)) => assert_eq!(block.sequence_hash(), SequenceHash::new(7)),
                (a, u) => panic!("allocation {a:?} and upgrade {u:?} both or neither succeeded"),
            }
            let live: Vec<&ImmutableBlock<Device>> = upgraded.iter().collect();
            let mutable: Vec<&MutableBlock<Device>> = allocated.iter().flatten().collect();
            assert_sound(&m, &live, &mutable);
            drop((allocated, upgraded));
            let c = m.counts();
            assert_eq!(c.reset + c.inactive, c.total);
        },
        None,
    );
}

/// (3) Two threads register the same hash. `Reject`: both end up holding the one block
/// registered first, the other slot back in the reset pool. `Allow`: two slots, both under
/// the hash, one counted as a duplicate.
#[test]
fn concurrent_registration_of_one_hash_under_each_policy() {
    for policy in [
        BlockDuplicationPolicy::Reject,
        BlockDuplicationPolicy::Allow,
    ] {
        shuttle::check_pct(
            move || {
                let m = manager(4, policy);
                let spawn = |m: &Arc<BlockManager<Device>>| {
                    let m = Arc::clone(m);
                    thread::spawn(move || register(&m, 42))
                };
                let (a, b) = (spawn(&m), spawn(&m));
                let (a, b) = (a.join().unwrap(), b.join().unwrap());
                assert_eq!(a.sequence_hash(), b.sequence_hash());
                let c = m.counts();
                match policy {
                    BlockDuplicationPolicy::Reject => {
                        assert_eq!(a.block_id(), b.block_id());
                        assert_eq!((c.active, c.duplicates, c.reset), (1, 0, 3));
                    }
                    _ => {
                        assert_ne!(a.block_id(), b.block_id());
                        assert_eq!((c.active, c.duplicates, c.reset), (2, 1, 2));
                    }
                }
                assert_eq!(c.registered_hashes, 1);
                assert_sound(&m, &[&a, &b], &[]);
                drop((a, b));
                let c = m.counts();
                assert_eq!(c.reset + c.inactive, c.total);
                assert_eq!(m.match_blocks(&[SequenceHash::new(42)]).len(), 1);
            },
            PCT_ITERATIONS,
            PCT_DEPTH,
        );
    }
}

/// A larger mix, searched randomly (PCT): three threads allocate, register, match, scan
/// without touching, clone, release in batches and reset the inactive pool, on a pool too
/// small for all of them.
#[test]
fn mixed_operations_under_pct() {
    shuttle::check_pct(
        || {
            let m = manager(6, BlockDuplicationPolicy::Allow);
            let workers: Vec<_> = (0..3u64)
                .map(|t| {
                    let m = Arc::clone(&m);
                    thread::spawn(move || {
                        let mut held = Vec::new();
                        for round in 0..3u64 {
                            let hash = SequenceHash::new((t + round) % 4);
                            held.extend(m.match_blocks(&[hash]));
                            // A side-effect-free scan, and a lock-free clone of what it found.
                            let scanned = m.scan_matches(&[SequenceHash::new(round % 4)], false);
                            held.extend(scanned.iter().cloned());
                            drop(scanned);
                            if let Ok(mut blocks) = m.allocate_blocks(1) {
                                let b = blocks.pop().unwrap();
                                held.push(m.register_block(b.stage(hash, 4).unwrap()).unwrap());
                            }
                            if round == 1 {
                                let _ = m.reset_inactive_pool();
                            }
                            if held.len() > 2 {
                                ImmutableBlock::release_all(held.drain(..2));
                            }
                        }
                        held
                    })
                })
                .collect();
            let held: Vec<ImmutableBlock<Device>> = workers
                .into_iter()
                .flat_map(|w| w.join().unwrap())
                .collect();
            assert_sound(&m, &held.iter().collect::<Vec<_>>(), &[]);
            drop(held);
            let c = m.counts();
            assert_eq!(c.reset + c.inactive, c.total);
        },
        2000,
        3,
    );
}

/// (5) Two owners of one block drop at once (each may take the lock-free path or find itself
/// the last owner) while a third thread's `match_blocks` resurrects or shares the block. The
/// block must end held by the match alone, whatever the order: no owner lost, none counted
/// twice, no release applied to the match's owner.
#[test]
fn two_drops_race_a_resurrecting_match() {
    shuttle::check_random(
        || {
            let m = manager(2, BlockDuplicationPolicy::Reject);
            let a = register(&m, 1);
            let b = a.clone();
            let t1 = thread::spawn(move || drop(a));
            let t2 = thread::spawn(move || drop(b));
            let m2 = Arc::clone(&m);
            let matcher = thread::spawn(move || m2.match_blocks(&[hash(1)]));
            t1.join().unwrap();
            t2.join().unwrap();
            let hits = matcher.join().unwrap();
            assert_eq!(hits.len(), 1);
            assert_sound(&m, &hits.iter().collect::<Vec<_>>(), &[]);
            assert_eq!(m.counts().active, 1);
            drop(hits);
            let c = m.check_invariants().expect("invariants");
            assert_eq!((c.inactive, c.active), (1, 0));
        },
        3000,
    );
}

/// (6) Lock-free clones racing the last drop: one thread clones its handle and drops the
/// original, the other drops its own; exactly the clone remains an owner.
#[test]
fn clones_race_the_last_drop() {
    shuttle::check_pct(
        || {
            let m = manager(2, BlockDuplicationPolicy::Reject);
            let a = register(&m, 1);
            let b = a.clone();
            let cloner = thread::spawn(move || {
                let c = a.clone();
                drop(a);
                c
            });
            let dropper = thread::spawn(move || drop(b));
            dropper.join().unwrap();
            let c = cloner.join().unwrap();
            assert_sound(&m, &[&c], &[]);
            assert_eq!(m.counts().active, 1);
            drop(c);
            assert_eq!(m.check_invariants().expect("invariants").inactive, 1);
        },
        PCT_ITERATIONS,
        PCT_DEPTH,
    );
}

/// (7) The last handle is dropped while another thread unpins the block (the pin holds an
/// owner too) and a third upgrades a weak handle to it: whichever release comes last makes the
/// block inactive, and the upgrade always succeeds (the block stays registered), leaving the
/// block held by the upgraded handle alone.
#[test]
fn last_drop_races_unpin_and_upgrade() {
    shuttle::check_random(
        || {
            let m = Arc::new(
                BlockManager::<Device>::builder()
                    .block_count(2)
                    .block_size(4)
                    .max_pinned_fraction(1.0)
                    .build()
                    .expect("valid"),
            );
            let h = register(&m, 3);
            let weak = h.downgrade();
            assert_eq!(m.pin(&[hash(3)]), Ok(1));
            let dropper = thread::spawn(move || drop(h));
            let m2 = Arc::clone(&m);
            let unpinner = thread::spawn(move || m2.unpin(&[hash(3)]));
            let upgrader = thread::spawn(move || weak.upgrade());
            dropper.join().unwrap();
            assert_eq!(unpinner.join().unwrap(), 1);
            let up = upgrader.join().unwrap().expect("still registered");
            assert_eq!(up.sequence_hash(), hash(3));
            assert_sound(&m, &[&up], &[]);
            let c = m.counts();
            assert_eq!((c.active, c.pinned), (1, 0));
            drop(up);
            assert_eq!(m.check_invariants().expect("invariants").inactive, 1);
        },
        3000,
    );
}

/// (8) Eviction and re-registration of the same slot around a last drop: in a one-block pool,
/// one thread drops the only handle to hash 1, another allocates (which can only evict hash 1)
/// and registers hash 2 in the same slot, a third upgrades a weak handle to hash 1. The
/// upgrade may win only if the re-registration has not happened, never both; no handle ever
/// sees the slot under the wrong hash.
#[test]
fn eviction_and_reregistration_race_a_drop_and_an_upgrade() {
    shuttle::check_random(
        || {
            let m = manager(1, BlockDuplicationPolicy::Reject);
            let h = register(&m, 1);
            let weak = h.downgrade();
            let dropper = thread::spawn(move || drop(h));
            let m2 = Arc::clone(&m);
            let reuser = thread::spawn(move || {
                let block = m2.allocate_blocks(1).ok()?.pop()?;
                let staged = block.stage(hash(2), 4).expect("size");
                Some(m2.register_block(staged).expect("own block"))
            });
            let upgrader = thread::spawn(move || weak.upgrade());
            dropper.join().unwrap();
            let reused = reuser.join().unwrap();
            let upgraded = upgrader.join().unwrap();
            if let Some(b) = &reused {
                assert_eq!(b.sequence_hash(), hash(2));
            }
            if let Some(b) = &upgraded {
                assert_eq!(b.sequence_hash(), hash(1));
            }
            assert!(
                reused.is_none() || upgraded.is_none(),
                "one block, two registrations held"
            );
            let live: Vec<&ImmutableBlock<Device>> = reused.iter().chain(&upgraded).collect();
            assert_sound(&m, &live, &[]);
            drop((reused, upgraded));
            let c = m.check_invariants().expect("invariants");
            assert_eq!(c.reset + c.inactive, c.total);
        },
        3000,
    );
}

/// (9) A side-effect-free scan (`scan_matches(.., false)`) holds the eviction victim in place
/// while another thread allocates: the allocation must pass the held block over and evict the
/// other one; if the allocation came first, the scan finds nothing. Either way the counts stay
/// exact, and the held block, once released, is inactive and matchable.
#[test]
fn in_place_scan_races_an_evicting_allocation() {
    shuttle::check_dfs(
        || {
            let m = manager(2, BlockDuplicationPolicy::Reject);
            let (x, y) = (register(&m, 10), register(&m, 11));
            drop(x); // the LRU victim
            drop(y);
            let m2 = Arc::clone(&m);
            let scanner = thread::spawn(move || m2.scan_matches(&[hash(10)], false));
            let m3 = Arc::clone(&m);
            let allocator = thread::spawn(move || m3.allocate_blocks_with_evictions(1).ok());
            let scanned = scanner.join().unwrap();
            let (blocks, evicted) = allocator.join().unwrap().expect("one block is evictable");
            if scanned.is_empty() {
                assert_eq!(evicted, vec![hash(10)]);
            } else {
                assert_eq!(evicted, vec![hash(11)], "evicted a held block");
            }
            let mutable: Vec<&MutableBlock<Device>> = blocks.iter().collect();
            assert_sound(&m, &scanned.iter().collect::<Vec<_>>(), &mutable);
            let found = !scanned.is_empty();
            drop(scanned);
            drop(blocks);
            let c = m.check_invariants().expect("invariants");
            assert_eq!((c.reset, c.inactive, c.active), (1, 1, 0));
            assert_eq!(m.contains(hash(10)), found);
        },
        None,
    );
}

/// (10) An unpin (a release under the lock) races the drop of the only other owner (a
/// lock-free release while two owners exist): exactly one of them is the last and makes the
/// block inactive, whatever the interleaving of the lock-free read, the unpin and the
/// compare-and-swap.
#[test]
fn unpin_races_the_last_drop() {
    shuttle::check_pct(
        || {
            let m = Arc::new(
                BlockManager::<Device>::builder()
                    .block_count(2)
                    .block_size(4)
                    .max_pinned_fraction(1.0)
                    .build()
                    .expect("valid"),
            );
            let h = register(&m, 5);
            assert_eq!(m.pin(&[hash(5)]), Ok(1));
            let dropper = thread::spawn(move || drop(h));
            let m2 = Arc::clone(&m);
            let unpinner = thread::spawn(move || m2.unpin(&[hash(5)]));
            dropper.join().unwrap();
            assert_eq!(unpinner.join().unwrap(), 1);
            let c = m.check_invariants().expect("invariants");
            assert_eq!((c.active, c.inactive, c.pinned), (0, 1, 0));
        },
        PCT_ITERATIONS,
        PCT_DEPTH,
    );
}
