//! One run of a worker job at a time, without losing a request made while it runs (the
//! reclaimer's).

use parking_lot::Mutex;

/// Lets one run of a job go at a time without losing a request made while it runs: a
/// request that finds a run in progress marks it, and the run goes round once more before it
/// ends (it re-reads everything it depends on). Checking for a mark and ending happen under
/// one lock, so no request falls between them, which is what a `try_lock` around the run
/// could not promise: a request arriving just as the run finished found it still running and
/// was dropped. A run that unwinds (a panic) ends without serving its marks: the next request
/// starts a new run.
#[derive(Default)]
pub(crate) struct Rerun {
    state: Mutex<RerunState>,
}

#[derive(Default)]
struct RerunState {
    running: bool,
    again: bool,
}

impl Rerun {
    /// Starts a run, or marks the one in progress to go round again (`None`).
    pub(crate) fn begin(&self) -> Option<RunGuard<'_>> {
        let mut s = self.state.lock();
        if s.running {
            s.again = true;
            return None;
        }
        s.running = true;
        s.again = false;
        Some(RunGuard {
            rerun: self,
            ended: false,
        })
    }
}

/// A run in progress (see [`Rerun`]); dropping it ends the run, even on a panic.
pub(crate) struct RunGuard<'a> {
    rerun: &'a Rerun,
    ended: bool,
}

impl<'a> RunGuard<'a> {
    /// Ends the run, unless a request came while it went round: then the run goes round
    /// again (`Some`). The check and the end happen under one lock.
    pub(crate) fn finish(mut self) -> Option<RunGuard<'a>> {
        let mut s = self.rerun.state.lock();
        if std::mem::take(&mut s.again) {
            drop(s);
            return Some(self);
        }
        s.running = false;
        drop(s);
        self.ended = true;
        None
    }
}

impl Drop for RunGuard<'_> {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        let mut s = self.rerun.state.lock();
        s.running = false;
        s.again = false;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::Rerun;

    #[test]
    fn a_request_during_a_run_makes_it_go_round_again() {
        let r = Rerun::default();
        let run = r.begin().expect("nothing runs yet");
        // Requested while the run goes round (or just as it is about to end): refused, but
        // the running one must serve it.
        assert!(r.begin().is_none());
        assert!(r.begin().is_none());
        let run = run.finish().expect("one more round for the requests");
        let None = run.finish() else {
            panic!("the marks were served by that round");
        };
        let run = r.begin().expect("ended: a new run starts");
        drop(run);
    }

    #[test]
    fn a_run_that_unwinds_ends() {
        let r = Rerun::default();
        let run = r.begin().unwrap();
        assert!(r.begin().is_none());
        drop(run); // as a panic inside the run would
        assert!(r.begin().is_some());
    }

    #[test]
    fn no_request_is_lost_under_contention() {
        // Threads ask at once, again and again; once all of them are through, every request
        // (counted before it asks) must have been seen by a round that started after it.
        const THREADS: usize = 4;
        const STEPS: u64 = 3_000;
        let r = Rerun::default();
        let requests = AtomicU64::new(0);
        let seen = AtomicU64::new(0);
        let barrier = std::sync::Barrier::new(THREADS);
        let lost = AtomicU64::new(0);
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let (r, requests, seen, barrier, lost) = (&r, &requests, &seen, &barrier, &lost);
                s.spawn(move || {
                    for step in 1..=STEPS {
                        barrier.wait();
                        requests.fetch_add(1, Ordering::SeqCst);
                        if let Some(mut run) = r.begin() {
                            loop {
                                seen.fetch_max(requests.load(Ordering::SeqCst), Ordering::SeqCst);
                                match run.finish() {
                                    Some(again) => run = again,
                                    None => break,
                                }
                            }
                        }
                        barrier.wait();
                        if t == 0 && seen.load(Ordering::SeqCst) != step * THREADS as u64 {
                            lost.fetch_add(1, Ordering::SeqCst);
                            // Catch up, so that later steps are checked on their own.
                            seen.store(step * THREADS as u64, Ordering::SeqCst);
                        }
                        barrier.wait();
                    }
                });
            }
        });
        assert_eq!(lost.load(Ordering::SeqCst), 0, "steps with a request lost");
    }
}
