//! Concurrency models of the store's transitions, explored with shuttle.
//!
//! Why shuttle rather than loom: loom needs every atomic and lock replaced by its own and
//! explores exhaustively, which does not scale past toy code; neither instruments
//! `parking_lot`. Shuttle schedules threads at its own synchronisation points (here, every
//! acquisition of the store's one mutex, which the `shuttle` feature swaps in) and offers
//! both exhaustive depth-first search for small models and randomized PCT search. The
//! store's correctness argument rests entirely on that one lock, so interleavings at lock
//! acquisitions are exactly the ones that matter.
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
        shuttle::check_dfs(
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
            None,
        );
    }
}

/// A larger mix, searched randomly (PCT): three threads allocate, register, match, release
/// in batches and reset the inactive pool, on a pool too small for all of them.
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
