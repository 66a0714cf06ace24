//! A circuit breaker per Redis node: after `threshold` consecutive failures the node is
//! *open* (every call skips it at once, no I/O); after `cool_down` one caller is let through
//! as a probe (*half-open*); the probe's success closes the breaker, its failure opens it for
//! another cool-down.
//!
//! Time is passed in (`now`), so the state machine is tested without waiting.

use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// What a caller may do with a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Closed: go ahead.
    Yes,
    /// Half-open: go ahead as the one probe; report the result.
    Probe,
    /// Open (or half-open with a probe in flight): skip the node.
    No,
}

/// A breaker's state, for stats and health reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BreakerState {
    /// Calls go through.
    Closed,
    /// Calls skip the node until the cool-down has passed.
    Open,
    /// A probe is in flight; other calls skip the node until it reports.
    HalfOpen,
}

#[derive(Debug)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen,
}

#[derive(Debug)]
pub(crate) struct Breaker {
    state: Mutex<State>,
    threshold: u32,
    cool_down: Duration,
}

impl Breaker {
    /// `threshold` consecutive failures open it (at least 1).
    pub(crate) fn new(threshold: u32, cool_down: Duration) -> Self {
        Self {
            state: Mutex::new(State::Closed { failures: 0 }),
            threshold: threshold.max(1),
            cool_down,
        }
    }

    pub(crate) fn admit(&self, now: Instant) -> Admit {
        let mut state = self.state.lock();
        match *state {
            State::Closed { .. } => Admit::Yes,
            State::Open { until } if now >= until => {
                *state = State::HalfOpen;
                Admit::Probe
            }
            State::Open { .. } | State::HalfOpen => Admit::No,
        }
    }

    /// A call (or probe) succeeded.
    pub(crate) fn success(&self) {
        *self.state.lock() = State::Closed { failures: 0 };
    }

    /// A call (or probe) failed; returns whether this failure opened the breaker.
    pub(crate) fn failure(&self, now: Instant) -> bool {
        let mut state = self.state.lock();
        match *state {
            State::Closed { failures } if failures + 1 < self.threshold => {
                *state = State::Closed {
                    failures: failures + 1,
                };
                false
            }
            State::Closed { .. } | State::HalfOpen => {
                *state = State::Open {
                    until: now + self.cool_down,
                };
                true
            }
            // A call admitted before the breaker opened failed late: keep the later deadline.
            State::Open { until } => {
                *state = State::Open {
                    until: until.max(now + self.cool_down),
                };
                false
            }
        }
    }

    pub(crate) fn state(&self) -> BreakerState {
        match *self.state.lock() {
            State::Closed { .. } => BreakerState::Closed,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen => BreakerState::HalfOpen,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn opens_after_threshold_and_half_opens_after_cool_down() {
        let t0 = Instant::now();
        let b = Breaker::new(3, Duration::from_secs(1));
        assert_eq!(b.admit(t0), Admit::Yes);
        assert!(!b.failure(t0));
        assert!(!b.failure(t0));
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.failure(t0));
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.admit(t0 + Duration::from_millis(999)), Admit::No);
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(b.admit(t1), Admit::Probe);
        // Only one probe at a time.
        assert_eq!(b.admit(t1), Admit::No);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        // The probe fails: open for another cool-down.
        assert!(b.failure(t1));
        assert_eq!(b.admit(t1 + Duration::from_millis(500)), Admit::No);
        assert_eq!(b.admit(t1 + Duration::from_secs(1)), Admit::Probe);
        b.success();
        assert_eq!(b.admit(t1 + Duration::from_secs(1)), Admit::Yes);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let t0 = Instant::now();
        let b = Breaker::new(2, Duration::from_secs(1));
        assert!(!b.failure(t0));
        b.success();
        assert!(!b.failure(t0));
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.failure(t0));
    }

    #[derive(Clone, Debug)]
    enum Op {
        Admit,
        Success,
        Failure,
        Advance(u16),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            Just(Op::Admit),
            Just(Op::Success),
            Just(Op::Failure),
            (0u16..2000).prop_map(Op::Advance),
        ]
    }

    proptest! {
        /// Against a model: an open breaker admits nothing before its cool-down has passed
        /// since the last failure, exactly one probe after it, and closes only on success.
        #[test]
        fn matches_a_model(threshold in 1u32..5, ops in proptest::collection::vec(op(), 1..200)) {
            let cool = Duration::from_millis(1000);
            let b = Breaker::new(threshold, cool);
            let t0 = Instant::now();
            let mut now = t0;
            // Model: consecutive failures while closed, or Some(open until), probing flag.
            let mut failures = 0u32;
            let mut open_until: Option<Instant> = None;
            let mut probing = false;
            for op in ops {
                match op {
                    Op::Advance(ms) => now += Duration::from_millis(u64::from(ms)),
                    Op::Admit => {
                        let expected = match open_until {
                            None => Admit::Yes,
                            Some(_) if probing => Admit::No,
                            Some(until) if now >= until => { probing = true; Admit::Probe }
                            Some(_) => Admit::No,
                        };
                        prop_assert_eq!(b.admit(now), expected);
                    }
                    Op::Success => {
                        b.success();
                        failures = 0;
                        open_until = None;
                        probing = false;
                    }
                    Op::Failure => {
                        let opened = b.failure(now);
                        match open_until {
                            None => {
                                failures += 1;
                                prop_assert_eq!(opened, failures >= threshold);
                                if failures >= threshold {
                                    open_until = Some(now + cool);
                                }
                            }
                            Some(until) => {
                                prop_assert_eq!(opened, probing);
                                open_until = Some(if probing { now + cool } else { until.max(now + cool) });
                                probing = false;
                            }
                        }
                    }
                }
                let state = match (open_until, probing) {
                    (None, _) => BreakerState::Closed,
                    (Some(_), true) => BreakerState::HalfOpen,
                    (Some(_), false) => BreakerState::Open,
                };
                prop_assert_eq!(b.state(), state);
            }
        }
    }
}
