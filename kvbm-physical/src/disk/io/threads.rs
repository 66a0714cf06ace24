//! The thread back end: a call with `n` operations runs them on `min(depth, n)` threads
//! (its own and helpers from the tier's I/O pool), each taking the next operation and
//! running it start to end (prepare: copy and checksum; `pwritev`/`preadv`; finish: verify
//! and copy out), so checksums and copies run in parallel and nothing is handed between
//! threads per operation.
//!
//! The helpers are `depth − 1` threads kept for the tier's lifetime (a `rayon` pool): a call
//! borrows them through a scope, which lets them use the caller's buffers safely, without
//! `unsafe`, and creates no thread (thread creation per call cost the soak with a disk tier
//! about half of its CPU time, most of it in the kernel). A call takes only helpers that are
//! idle at that moment (reserved with one atomic operation, handed back when their job ends),
//! so it never waits behind another call's work: with every helper busy, a small read runs
//! on its caller's thread at once. If the pool cannot be built, calls run on the caller's
//! thread alone.

use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use parking_lot::Mutex;

use super::{Ops, Scratch, run_one};
use crate::disk::buf::BufPool;

/// The thread back end: up to `depth` operations of a call at once.
pub(crate) struct ThreadRunner {
    depth: usize,
    /// `depth − 1` helper threads; `None` for depth 1 or if they could not be started.
    pool: Option<rayon::ThreadPool>,
    /// Helper threads started over the runner's life (they are started once).
    started: Arc<AtomicU64>,
    /// Helpers not reserved by a call: a call spawns at most this many jobs, so every job it
    /// spawns finds a thread at once.
    idle: AtomicUsize,
}

impl std::fmt::Debug for ThreadRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadRunner")
            .field("depth", &self.depth)
            .field(
                "helpers",
                &self.pool.as_ref().map(|p| p.current_num_threads()),
            )
            .field("threads_started", &self.started.load(Ordering::Relaxed))
            .finish()
    }
}

impl ThreadRunner {
    pub(crate) fn new(depth: usize) -> Self {
        let depth = depth.max(1);
        let started = Arc::new(AtomicU64::new(0));
        let pool = (depth > 1)
            .then(|| {
                let counter = Arc::clone(&started);
                rayon::ThreadPoolBuilder::new()
                    .num_threads(depth - 1)
                    .thread_name(|k| format!("kvbm-disk-io-{}", k + 1))
                    .start_handler(move |_| {
                        counter.fetch_add(1, Ordering::Relaxed);
                    })
                    .build()
            })
            .and_then(|built| match built {
                Ok(pool) => Some(pool),
                Err(e) => {
                    tracing::warn!(error = %e, depth, "disk tier: no I/O helper threads; operations run one at a time");
                    None
                }
            });
        let idle = AtomicUsize::new(pool.as_ref().map_or(0, |_| depth - 1));
        Self {
            depth,
            pool,
            started,
            idle,
        }
    }

    pub(crate) fn depth(&self) -> usize {
        self.depth
    }

    /// Helper threads started so far (for the test that calls reuse them).
    #[cfg(test)]
    pub(crate) fn threads_started(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }

    /// Runs every task; results in task order.
    pub(crate) fn run<O: Ops>(
        &self,
        file: &File,
        bufs: &BufPool,
        ops: &O,
        tasks: Vec<O::Task>,
    ) -> Vec<O::Out> {
        let n = tasks.len();
        let queue = Mutex::new(tasks.into_iter().enumerate());
        // Each operation's result as soon as it is done: a helper that panics (a bug) loses
        // only the operation it held, which reads as failed below, never as done.
        let results: Mutex<Vec<Option<O::Out>>> =
            Mutex::new(std::iter::repeat_with(|| None).take(n).collect());
        let work = || {
            let mut scratch = Scratch::new(bufs);
            loop {
                let next = queue.lock().next();
                let Some((i, task)) = next else { break };
                let out = run_one(file, ops, task, &mut scratch);
                results.lock()[i] = Some(out);
            }
        };
        // Reserve idle helpers (at most what the call can use).
        let want = self.depth.min(n).saturating_sub(1);
        let helpers = self
            .idle
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |idle| {
                Some(idle - want.min(idle))
            })
            .map_or(0, |idle| want.min(idle));
        match &self.pool {
            Some(pool) if helpers > 0 => pool.in_place_scope(|s| {
                for _ in 0..helpers {
                    s.spawn(|_| {
                        // Contained here: the caller must get every other result.
                        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
                        self.idle.fetch_add(1, Ordering::AcqRel);
                    });
                }
                // The caller's thread always works.
                work();
            }),
            _ => work(),
        }
        results
            .into_inner()
            .into_iter()
            .map(|r| r.unwrap_or_else(|| ops.abandoned()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    /// Each task's result is its own number (no I/O): the order and the threads are tested.
    /// With a gate, each task first waits there until it opens (`waiting` counts them).
    #[derive(Default)]
    struct Stamp {
        gate: Option<(std::sync::Mutex<bool>, std::sync::Condvar)>,
        waiting: AtomicUsize,
    }

    impl Ops for Stamp {
        type Task = u64;
        type Out = io::Result<u64>;

        fn prepare<'t>(
            &self,
            _task: &'t mut Self::Task,
            _scratch: &'t mut Scratch<'_>,
        ) -> super::super::Step<'t> {
            if let Some((open, cv)) = &self.gate {
                self.waiting.fetch_add(1, Ordering::SeqCst);
                let mut open = open.lock().unwrap();
                while !*open {
                    open = cv.wait(open).unwrap();
                }
            }
            super::super::Step::Done(Ok(0))
        }

        fn finish(&self, task: u64, _: &Scratch<'_>, result: io::Result<usize>) -> Self::Out {
            result.map(|_| task)
        }

        fn abandoned(&self) -> Self::Out {
            Err(io::Error::other("abandoned"))
        }
    }

    #[test]
    fn calls_reuse_the_helper_threads_and_keep_task_order() {
        let runner = ThreadRunner::new(4);
        let file = tempfile::tempfile().unwrap();
        let bufs = BufPool::new(4096, 4);
        for call in 0..200u64 {
            let tasks: Vec<u64> = (0..16).map(|i| call * 100 + i).collect();
            let out = runner.run(&file, &bufs, &Stamp::default(), tasks.clone());
            let got: Vec<u64> = out.into_iter().map(|r| r.unwrap()).collect();
            assert_eq!(got, tasks);
        }
        // Three helpers, started once (per-call spawning started up to 600).
        assert!(
            runner.threads_started() <= 3,
            "{}",
            runner.threads_started()
        );
    }

    #[test]
    fn a_small_call_never_waits_behind_another_calls_work() {
        // A large call occupies its caller and every helper (all stuck at a gate); a small
        // call made meanwhile must finish on its own thread while the gate is still shut. A
        // call that queued helper jobs behind the large call's would wait for the gate: the
        // deadline below is far beyond any scheduling delay, and only that waits so long.
        let runner = ThreadRunner::new(4);
        let file = tempfile::tempfile().unwrap();
        let bufs = BufPool::new(4096, 4);
        let gated = Stamp {
            gate: Some((std::sync::Mutex::new(false), std::sync::Condvar::new())),
            ..Stamp::default()
        };
        std::thread::scope(|s| {
            let big = s.spawn(|| runner.run(&file, &bufs, &gated, (0..64).collect()));
            while gated.waiting.load(Ordering::SeqCst) < 4 {
                std::thread::yield_now();
            }
            let (tx, rx) = std::sync::mpsc::channel();
            let (runner, file, bufs) = (&runner, &file, &bufs);
            s.spawn(move || {
                let out = runner.run(file, bufs, &Stamp::default(), (0..4).collect());
                let _ = tx.send(out);
            });
            let small = rx.recv_timeout(std::time::Duration::from_secs(60));
            // Open the gate whatever happened, so that the scope can end.
            let (open, cv) = gated.gate.as_ref().expect("gated");
            *open.lock().unwrap() = true;
            cv.notify_all();
            let small = small.expect("the small call finished while the large one was stuck");
            let got: Vec<u64> = small.into_iter().map(|r| r.unwrap()).collect();
            assert_eq!(got, vec![0, 1, 2, 3]);
            assert_eq!(big.join().unwrap().len(), 64);
        });
    }
}
