//! Containment of panics in user code that runs under the store lock.
//!
//! The only user code the store calls while it holds its lock is the [`Clock`] of the
//! retention-priority backend (read when a block with an expiring retention enters the
//! inactive pool, and when eviction checks for expired retentions). A panic there must not
//! leave the store half-updated, and the policy is not written to be unwound through. So the
//! store hands the policy a [`GuardedClock`]: it catches a panic of the user's clock, answers
//! with the last time it read successfully (time stands still for that one reading), and
//! parks the panic in a [`ParkedPanic`]. The store finishes the call as if nothing had
//! happened, and when the call lets go of the lock the panic resumes, with its original
//! payload, in the caller's thread. If that thread is already unwinding (a handle dropped
//! during unwinding), the parked panic is discarded instead of aborting the process.

use std::any::Any;
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::retention::Clock;

/// A panic caught under the store lock, waiting for the lock to be released.
#[derive(Default)]
pub(crate) struct ParkedPanic {
    /// Whether `payload` holds something: one relaxed load per lock release when clear.
    parked: AtomicBool,
    payload: parking_lot::Mutex<Option<Box<dyn Any + Send>>>,
}

impl ParkedPanic {
    fn park(&self, payload: Box<dyn Any + Send>) {
        let mut slot = self.payload.lock();
        // A second panic in the same call: the first one is the one reported.
        if slot.is_none() {
            *slot = Some(payload);
        }
        self.parked.store(true, Ordering::Relaxed);
    }

    /// Resumes the parked panic, if any; called as the store lock is released, by the
    /// thread that held it (the clock is only called under the lock, so a parked panic is
    /// always that thread's).
    #[inline]
    pub(crate) fn resume(&self) {
        if self.parked.load(Ordering::Relaxed) {
            self.resume_parked();
        }
    }

    #[cold]
    #[inline(never)]
    fn resume_parked(&self) {
        let payload = self.payload.lock().take();
        self.parked.store(false, Ordering::Relaxed);
        if let Some(payload) = payload
            && !std::thread::panicking()
        {
            resume_unwind(payload);
        }
    }
}

impl fmt::Debug for ParkedPanic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ParkedPanic")
            .field("parked", &self.parked.load(Ordering::Relaxed))
            .finish()
    }
}

/// The user's clock, with its panics caught and parked (see the module docs).
#[derive(Debug)]
pub(crate) struct GuardedClock {
    inner: Arc<dyn Clock>,
    /// The last successful reading, in nanoseconds.
    last: AtomicU64,
    parked: Arc<ParkedPanic>,
}

impl GuardedClock {
    pub(crate) fn new(inner: Arc<dyn Clock>, parked: Arc<ParkedPanic>) -> Self {
        Self {
            inner,
            last: AtomicU64::new(0),
            parked,
        }
    }
}

impl Clock for GuardedClock {
    fn now(&self) -> Duration {
        match catch_unwind(AssertUnwindSafe(|| self.inner.now())) {
            Ok(now) => {
                // Never backwards: a clock that steps back (an NTP correction of a wall clock)
                // would delay every expiry.
                let nanos = u64::try_from(now.as_nanos()).unwrap_or(u64::MAX);
                let last = self.last.fetch_max(nanos, Ordering::Relaxed);
                Duration::from_nanos(last.max(nanos))
            }
            Err(payload) => {
                self.parked.park(payload);
                Duration::from_nanos(self.last.load(Ordering::Relaxed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Ticking(AtomicU64);

    impl Clock for Ticking {
        fn now(&self) -> Duration {
            let t = self.0.fetch_add(1, Ordering::Relaxed);
            assert!(t != 2, "clock broke");
            Duration::from_secs(t)
        }
    }

    #[test]
    fn a_panicking_reading_repeats_the_last_one_and_is_parked() {
        let parked = Arc::new(ParkedPanic::default());
        let clock = GuardedClock::new(Arc::new(Ticking(AtomicU64::new(0))), parked.clone());
        assert_eq!(clock.now(), Duration::from_secs(0));
        assert_eq!(clock.now(), Duration::from_secs(1));
        assert_eq!(clock.now(), Duration::from_secs(1)); // the third reading panicked
        assert_eq!(clock.now(), Duration::from_secs(3));
        let resumed = catch_unwind(AssertUnwindSafe(|| parked.resume())).unwrap_err();
        assert_eq!(resumed.downcast_ref::<&str>(), Some(&"clock broke"));
        parked.resume(); // nothing parked any more
    }

    #[derive(Debug)]
    struct Stepping(std::sync::Mutex<Vec<u64>>);

    impl Clock for Stepping {
        fn now(&self) -> Duration {
            Duration::from_secs(self.0.lock().unwrap().remove(0))
        }
    }

    #[test]
    fn a_clock_that_steps_back_reads_as_standing_still() {
        // An NTP step back of a wall clock must not delay every expiry.
        let parked = Arc::new(ParkedPanic::default());
        let clock = GuardedClock::new(
            Arc::new(Stepping(std::sync::Mutex::new(vec![5, 9, 7, 12]))),
            parked,
        );
        let read: Vec<u64> = (0..4).map(|_| clock.now().as_secs()).collect();
        assert_eq!(read, vec![5, 9, 9, 12]);
    }

    #[test]
    fn a_manual_clock_saturates_instead_of_wrapping_back() {
        let clock = crate::ManualClock::default();
        clock.advance(Duration::from_secs(1));
        clock.advance(Duration::MAX);
        assert_eq!(clock.now(), Duration::from_nanos(u64::MAX));
    }
}
