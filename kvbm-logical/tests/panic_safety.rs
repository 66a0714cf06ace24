//! A panic inside a public call leaves the pool consistent: `check_invariants` passes, counts
//! are conserved, no block is released twice and none is lost.
//!
//! The user code that runs under the store lock is the `Clock` of the retention-priority
//! backend (read when a block with an expiring retention becomes inactive, and when eviction
//! looks for expired retentions). These tests make it panic on command, in every call that
//! reads it, with batches below and above the 256 handles that `release_all` releases per
//! lock acquisition; and they make the iterator given to `release_all` panic, or drop
//! something that panics.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kvbm_logical::{
    BlockManager, Clock, Device, EvictionBackend, ImmutableBlock, ManualClock, Retention,
    SequenceHash,
};

const BS: usize = 16;
const MESSAGE: &str = "the clock broke";

/// A manual clock that panics while armed.
#[derive(Debug, Default)]
struct Breakable {
    time: ManualClock,
    armed: AtomicBool,
}

impl Breakable {
    fn arm(&self, on: bool) {
        self.armed.store(on, Ordering::Relaxed);
    }
}

impl Clock for Breakable {
    fn now(&self) -> Duration {
        assert!(!self.armed.load(Ordering::Relaxed), "{MESSAGE}");
        self.time.now()
    }
}

fn manager(total: usize, clock: &Arc<Breakable>) -> BlockManager<Device> {
    BlockManager::builder()
        .block_count(total)
        .block_size(BS)
        .eviction(EvictionBackend::Priority)
        .clock(Arc::clone(clock) as Arc<dyn Clock>)
        .build()
        .unwrap()
}

/// Registers `n` blocks (hashes `first..first + n`) whose retention expires, so that the
/// priority backend reads the clock when each becomes inactive.
fn register(m: &BlockManager<Device>, first: u64, n: usize) -> Vec<ImmutableBlock<Device>> {
    let retention = Retention::new(80)
        .unwrap()
        .expiring_after(Duration::from_secs(60));
    let staged = m
        .allocate_blocks(n)
        .unwrap()
        .into_iter()
        .zip(first..)
        .map(|(b, x)| {
            b.stage(SequenceHash::new(x), BS)
                .unwrap()
                .with_retention(retention)
        })
        .collect();
    m.register_blocks(staged).unwrap()
}

fn hashes(first: u64, n: usize) -> Vec<SequenceHash> {
    (first..first + n as u64).map(SequenceHash::new).collect()
}

/// Runs `f` with the clock armed; returns whether it panicked with the clock's message.
fn with_broken_clock(clock: &Breakable, f: impl FnOnce()) -> bool {
    clock.arm(true);
    let result = catch_unwind(AssertUnwindSafe(f));
    clock.arm(false);
    match result {
        Ok(()) => false,
        Err(payload) => {
            let text = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied());
            assert_eq!(text, Some(MESSAGE), "an unexpected panic");
            true
        }
    }
}

/// Every registered block is inactive and matchable again; nothing is held or lost.
fn assert_all_inactive(m: &BlockManager<Device>, first: u64, n: usize) {
    let c = m.check_invariants().expect("invariants after the panic");
    assert_eq!((c.active, c.mutable, c.inactive), (0, 0, n), "{c:?}");
    assert_eq!(c.reset + c.inactive, c.total);
    let found = m.match_blocks(&hashes(first, n));
    assert_eq!(found.len(), n, "every block is still matchable");
    drop(found);
    let c = m.check_invariants().unwrap();
    assert_eq!((c.active, c.inactive), (0, n));
}

#[test]
fn a_clock_panic_in_release_all_releases_every_block_once() {
    // Below, at and above one lock acquisition's worth (256), and several of them.
    for n in [1, 10, 256, 257, 300, 700] {
        let clock = Arc::new(Breakable::default());
        let m = manager(1024, &clock);
        let blocks = register(&m, 0, n);
        let panicked = with_broken_clock(&clock, || ImmutableBlock::release_all(blocks));
        assert!(panicked, "{n}: the clock's panic reaches the caller");
        assert_all_inactive(&m, 0, n);
    }
}

#[test]
fn a_clock_panic_in_plain_drops_releases_every_block_once() {
    for n in [1, 10, 300] {
        let clock = Arc::new(Breakable::default());
        let m = manager(512, &clock);
        let blocks = register(&m, 0, n);
        let panicked = with_broken_clock(&clock, || drop(blocks));
        assert!(panicked, "{n}");
        assert_all_inactive(&m, 0, n);
    }
}

#[test]
fn a_clock_panic_while_releasing_shared_and_last_owners_keeps_the_counts() {
    let clock = Arc::new(Breakable::default());
    let m = manager(1024, &clock);
    let blocks = register(&m, 0, 600);
    // Every other block has a second owner: its first release is lock-free.
    let extra: Vec<_> = blocks.iter().step_by(2).cloned().collect();
    let mixed: Vec<_> = blocks.into_iter().chain(extra).collect();
    assert!(with_broken_clock(&clock, || ImmutableBlock::release_all(
        mixed
    )));
    assert_all_inactive(&m, 0, 600);
}

#[test]
fn a_clock_panic_during_an_evicting_allocation_keeps_the_pool_whole() {
    let clock = Arc::new(Breakable::default());
    let m = manager(64, &clock);
    ImmutableBlock::release_all(register(&m, 0, 64));
    // Eviction checks for expired retentions, reading the clock.
    let panicked = with_broken_clock(&clock, || {
        let _blocks = m.allocate_blocks(10).unwrap();
    });
    assert!(panicked);
    let c = m.check_invariants().unwrap();
    // The allocation evicted ten blocks; their slots went back to the reset pool as the
    // unwinding dropped the blocks.
    assert_eq!(
        (c.reset, c.inactive, c.mutable, c.active),
        (10, 54, 0, 0),
        "{c:?}"
    );
    // The pool still works.
    clock.time.advance(Duration::from_secs(120));
    let all = m.allocate_blocks(64).unwrap();
    assert_eq!(all.len(), 64);
}

#[test]
fn a_clock_panic_does_not_leak_into_the_next_call() {
    let clock = Arc::new(Breakable::default());
    let m = manager(8, &clock);
    let blocks = register(&m, 0, 4);
    assert!(with_broken_clock(&clock, || drop(blocks)));
    // Nothing is left over to be raised by an unrelated call.
    let blocks = register(&m, 100, 2);
    ImmutableBlock::release_all(blocks);
    assert_eq!(m.check_invariants().unwrap().inactive, 6);
}

#[test]
fn a_panicking_iterator_in_release_all_releases_what_it_yielded_once() {
    for (n, fail_at) in [(10, 5), (256, 200), (300, 280), (700, 600)] {
        let clock = Arc::new(Breakable::default());
        let m = manager(1024, &clock);
        let blocks = register(&m, 0, n);
        let result = catch_unwind(AssertUnwindSafe(|| {
            ImmutableBlock::release_all(blocks.into_iter().enumerate().map(|(i, b)| {
                assert!(i != fail_at, "iterator broke");
                b
            }));
        }));
        assert!(result.is_err());
        // Those yielded were released by `release_all`, the rest by the iterator's drop.
        assert_all_inactive(&m, 0, n);
    }
}

/// Panics when dropped.
struct Bomb;

impl Drop for Bomb {
    fn drop(&mut self) {
        panic!("bomb");
    }
}

#[test]
fn a_panicking_drop_inside_release_all_loses_no_block() {
    for n in [10, 300] {
        let clock = Arc::new(Breakable::default());
        let m = manager(512, &clock);
        let blocks = register(&m, 0, n);
        let bomb = Bomb;
        let result = catch_unwind(AssertUnwindSafe(|| {
            // The iterator owns the bomb: it goes off when the iterator is dropped, after
            // the last handle was taken and before the batch's final flush.
            ImmutableBlock::release_all(blocks.into_iter().inspect(move |_| {
                let _armed = &bomb;
            }));
        }));
        assert!(result.is_err());
        assert_all_inactive(&m, 0, n);
    }
}

#[test]
fn a_clock_panic_while_a_request_lets_go_leaves_its_table_consistent() {
    // Preempt and truncate release blocks; a release can unwind (the clock's panic, resumed
    // at the lock's release). The request's own bookkeeping must already say they are gone:
    // a table still naming released slots would hand an attention kernel another request's
    // blocks.
    let clock = Arc::new(Breakable::default());
    let m = manager(8, &clock);
    let prompt: Vec<u32> = (0..3 * BS as u32 + 1).collect(); // 3 full blocks and a token
    let probe = kvbm_logical::RequestSequence::builder(&m)
        .prompt(&prompt)
        .build();
    let hs: Vec<SequenceHash> = probe.sequence_hashes().collect();
    drop(probe);
    // The prompt's blocks, registered with an expiring retention (the release reads the
    // clock), then inactive.
    let retention = Retention::new(80)
        .unwrap()
        .expiring_after(Duration::from_secs(60));
    let staged = m
        .allocate_blocks(hs.len())
        .unwrap()
        .into_iter()
        .zip(&hs)
        .map(|(b, &h)| b.stage(h, BS).unwrap().with_retention(retention))
        .collect();
    drop(m.register_blocks(staged).unwrap());

    for cut in [false, true] {
        let mut r = kvbm_logical::RequestSequence::builder(&m)
            .prompt(&prompt)
            .build();
        assert_eq!(r.match_prefix().unwrap(), 3);
        assert_eq!(r.block_table().len(), 3);
        let panicked = with_broken_clock(&clock, || {
            if cut {
                r.truncate(BS + 1); // cuts into block 1: blocks 1 and 2 go
            } else {
                r.preempt();
            }
        });
        assert!(panicked, "the release read the broken clock");
        let (table, computed) = (r.block_table().len(), r.num_computed_tokens());
        if cut {
            assert_eq!((table, computed), (1, BS));
        } else {
            assert_eq!((table, computed), (0, 0));
        }
        drop(r);
        let c = m.check_invariants().unwrap();
        assert_eq!((c.active, c.mutable), (0, 0), "{c:?}");
    }
}
