//! Many threads on one disk tier: puts (evicting), batched gets, removes and presence
//! checks at once, on both I/O back ends. Every block served is checked byte for byte with
//! its parent; the slot accounting must balance afterwards, and a restart must bring back
//! only blocks that verify.

mod disk_util;

use std::sync::{Arc, Barrier};

use disk_util::*;
use kvbm_physical::disk::{DiskError, DiskFaults, IoBackend, IoFault};
use kvbm_physical::{GetOutcome, PutOutcome, StoreTier};
use parking_lot::{Condvar, Mutex};

const THREADS: usize = 4;
const KEYS: u64 = 48;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn stress(backend: IoBackend, rounds: usize) {
    let dir = tempfile::tempdir().unwrap();
    let tier = match builder(dir.path(), 16)
        .io_backend(backend)
        .queue_depth(4)
        .open()
    {
        Ok(t) => Arc::new(t),
        Err(DiskError::Backend { source, .. }) => {
            eprintln!("{backend:?} unavailable here: {source}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let start = Arc::new(Barrier::new(THREADS));
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let tier = Arc::clone(&tier);
            let start = Arc::clone(&start);
            std::thread::spawn(move || {
                let mut rng = Rng(0x9E37_79B9 ^ ((t as u64 + 1) * 0x1234_5678_9ABC));
                let mut gets = 0u64;
                start.wait();
                for _ in 0..rounds {
                    let n = 1 + (rng.next() % 4) as usize;
                    let keys: Vec<u64> = (0..n).map(|_| rng.next() % KEYS).collect();
                    match rng.next() % 10 {
                        0..=3 => {
                            for o in put(&tier, &keys) {
                                assert!(
                                    matches!(
                                        o,
                                        PutOutcome::Stored
                                            | PutOutcome::Present
                                            | PutOutcome::Skipped(_)
                                    ),
                                    "{o:?}"
                                );
                            }
                        }
                        4..=7 => {
                            let hs: Vec<_> = keys.iter().map(|&k| h(k)).collect();
                            let mut bufs = vec![vec![0u8; BB]; n];
                            let mut outs: Vec<&mut [u8]> =
                                bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
                            let got = tier.get(&hs, &mut outs);
                            gets += n as u64;
                            for ((&k, o), buf) in keys.iter().zip(&got).zip(&bufs) {
                                match o {
                                    GetOutcome::Hit { parent } => {
                                        assert_eq!(*parent, parent_of(h(k)));
                                        assert!(
                                            *buf == image(h(k), BB),
                                            "bytes of {k} served wrong"
                                        );
                                    }
                                    GetOutcome::Miss => {}
                                    other => panic!("{k}: {other:?}"),
                                }
                            }
                        }
                        8 => tier.remove(&[h(keys[0])]),
                        _ => {
                            let _ = tier.contains(&keys.iter().map(|&k| h(k)).collect::<Vec<_>>());
                        }
                    }
                }
                gets
            })
        })
        .collect();
    let gets: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    let counts = tier.check_invariants().unwrap();
    assert_eq!(
        counts.reset + counts.inactive,
        counts.total,
        "every slot returned"
    );
    let s = tier.stats();
    assert_eq!(s.hits + s.misses, gets, "every get answered once");
    assert_eq!((s.corrupt, s.failed), (0, 0));
    assert!(tier.degraded().is_none());
    let resident = counts.registered_hashes;
    drop(tier);

    let tier = open(dir.path(), 16);
    assert_eq!(tier.recovery().recovered(), resident);
    assert_eq!(tier.recovery().torn, 0);
    for b in tier.recovery().blocks.clone() {
        assert_eq!(
            get(&tier, b.hash.as_u64()),
            GetOutcome::Hit {
                parent: parent_of(b.hash)
            }
        );
    }
}

#[test]
fn threads_share_a_tier_on_the_thread_pool() {
    stress(IoBackend::ThreadPool, 300);
}

#[test]
fn threads_share_a_tier_on_io_uring() {
    stress(IoBackend::IoUring, 300);
}

/// Holds the first slot write until opened; later writes pass.
#[derive(Debug, Default)]
struct Gate {
    state: Mutex<(u32, bool)>,
    cv: Condvar,
}

impl DiskFaults for Gate {
    fn before_write(&self, _slot: u32, _image: &mut [u8]) -> Option<IoFault> {
        let mut s = self.state.lock();
        s.0 += 1;
        if s.0 == 1 {
            self.cv.notify_all();
            while !s.1 {
                self.cv.wait(&mut s);
            }
        }
        None
    }
}

#[test]
fn a_hash_being_written_by_one_thread_is_not_written_again_by_another() {
    // Two puts of one hash racing would leave a second, unregistered copy in a free slot,
    // which a restart would bring back after the first was evicted or removed.
    let dir = tempfile::tempdir().unwrap();
    let gate = Arc::new(Gate::default());
    let tier = Arc::new(builder(dir.path(), 4).faults(gate.clone()).open().unwrap());
    let writer = {
        let tier = Arc::clone(&tier);
        std::thread::spawn(move || put(&tier, &[7]))
    };
    {
        // Until the writer is inside its write.
        let mut s = gate.state.lock();
        while s.0 == 0 {
            gate.cv.wait(&mut s);
        }
    }
    assert_eq!(
        put(&tier, &[7]),
        vec![PutOutcome::Present],
        "claimed by the other put"
    );
    {
        let mut s = gate.state.lock();
        s.1 = true;
        gate.cv.notify_all();
    }
    assert_eq!(writer.join().unwrap(), vec![PutOutcome::Stored]);
    assert_eq!(tier.stats().bytes_written, BB as u64, "one copy written");
    drop(tier);
    let tier = open(dir.path(), 4);
    assert_eq!(tier.recovery().duplicates, 0);
    assert_eq!(tier.recovery().recovered(), 1);
}

/// Holds reads of slot `.0` (once armed) until opened.
#[derive(Debug, Default)]
struct ReadGate {
    state: Mutex<(Option<u32>, u32, bool)>, // (slot, arrivals, open)
    cv: Condvar,
}

impl DiskFaults for ReadGate {
    fn before_read(&self, slot: u32) -> Option<IoFault> {
        let mut s = self.state.lock();
        if s.0 == Some(slot) {
            s.1 += 1;
            self.cv.notify_all();
            while !s.2 {
                self.cv.wait(&mut s);
            }
        }
        None
    }
}

#[test]
fn a_block_removed_while_a_get_holds_it_leaves_the_tier() {
    // A get holds its blocks' slots while it reads them; a remove of one it has read already
    // must still take it out of the tier. Left registered with its header zeroed, it was
    // `contains` true and a put of it `Present` until some later get missed.
    let dir = tempfile::tempdir().unwrap();
    drop(put(&open(dir.path(), 4), &[1, 2]));
    let gate = Arc::new(ReadGate::default());
    let tier = Arc::new(builder(dir.path(), 4).faults(gate.clone()).open().unwrap());
    // Block 1 is read at once, block 2's read waits at the gate.
    gate.state.lock().0 = Some(slot_of(&tier, 2));
    let reader = {
        let tier = Arc::clone(&tier);
        std::thread::spawn(move || {
            let mut a = vec![0u8; tier.block_bytes()];
            let mut b = vec![0u8; tier.block_bytes()];
            tier.get(&[h(1), h(2)], &mut [&mut a, &mut b])
        })
    };
    {
        let mut s = gate.state.lock();
        while s.1 == 0 {
            gate.cv.wait(&mut s);
        }
    }
    tier.remove(&[h(1)]);
    {
        let mut s = gate.state.lock();
        s.2 = true;
        gate.cv.notify_all();
    }
    let outcomes = reader.join().unwrap();
    assert!(outcomes[1].is_hit(), "{outcomes:?}");
    assert_eq!(tier.contains(&[h(1), h(2)]), vec![false, true]);
    assert_eq!(put(&tier, &[1]), vec![PutOutcome::Stored], "stored again");
    assert!(get(&tier, 1).is_hit());
    assert_eq!(tier.stats().resident, Some(2));
}

/// Panics in the first slot write's fault hook (a panicking component under the put).
#[derive(Debug, Default)]
struct PanicOnce {
    fired: std::sync::atomic::AtomicBool,
}

impl DiskFaults for PanicOnce {
    fn before_write(&self, _slot: u32, image: &mut [u8]) -> Option<IoFault> {
        if image.len() > kvbm_physical::disk::PAGE
            && !self.fired.swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            panic!("injected panic inside a put");
        }
        None
    }
}

#[test]
fn a_put_that_unwinds_leaves_no_claim_behind() {
    // A put claims its hashes while it writes them; a claim left by a put that unwound
    // would make every later put of the hash `Present` (never stored) for the tier's life.
    let dir = tempfile::tempdir().unwrap();
    let tier = builder(dir.path(), 4)
        .faults(Arc::new(PanicOnce::default()))
        .open()
        .unwrap();
    let first = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| put(&tier, &[9])));
    if let Ok(outcome) = &first {
        // The panic was contained below the put: a failed write, claims released normally.
        assert!(matches!(outcome[0], PutOutcome::Failed(_)), "{outcome:?}");
        tier.resume();
    }
    assert_eq!(put(&tier, &[9]), vec![PutOutcome::Stored]);
    assert!(get(&tier, 9).is_hit());
}
