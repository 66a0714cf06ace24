//! Retention priorities (TensorRT-LLM style) and the clock their expiry is measured on.
//!
//! A registered block may carry a [`Retention`]: a priority from 0 (evict first) to 100
//! (evict last) and an optional duration after which the priority falls back to
//! [`Retention::DEFAULT_PRIORITY`]. Only [`EvictionBackend::Priority`] reads it; the other
//! backends ignore it. The duration runs from the moment the block becomes inactive (its
//! last handle is dropped), and starts again each time it does.
//!
//! A request sets priorities per block range with [`RequestRetention`]: for example the
//! system prompt high, the user turn low.
//!
//! [`EvictionBackend::Priority`]: crate::EvictionBackend::Priority

use std::fmt::Debug;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A priority outside `0..=100`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("retention priority {0} is outside 0..=100")]
pub struct InvalidPriority(pub u8);

/// How strongly to keep a registered block when it is inactive.
///
/// ```
/// use std::time::Duration;
/// use kvbm_logical::Retention;
/// let system_prompt = Retention::new(90)?.expiring_after(Duration::from_secs(600));
/// assert_eq!(system_prompt.priority(), 90);
/// assert_eq!(system_prompt.duration(), Some(Duration::from_secs(600)));
/// assert!(Retention::new(101).is_err());
/// assert_eq!(Retention::default().priority(), Retention::DEFAULT_PRIORITY);
/// # Ok::<(), kvbm_logical::InvalidPriority>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Retention {
    priority: u8,
    /// Milliseconds, `NO_EXPIRY` for none (fits in the slot table's 32 bytes).
    duration_ms: u32,
}

/// `duration_ms` of a retention that never expires.
pub(crate) const NO_EXPIRY: u32 = u32::MAX;

impl Default for Retention {
    fn default() -> Self {
        Self {
            priority: Self::DEFAULT_PRIORITY,
            duration_ms: NO_EXPIRY,
        }
    }
}

impl Retention {
    /// The priority of blocks registered without one (TensorRT-LLM's default).
    pub const DEFAULT_PRIORITY: u8 = 35;
    /// The highest priority.
    pub const MAX_PRIORITY: u8 = 100;

    /// A retention of `priority` (`0..=100`) that never expires.
    pub fn new(priority: u8) -> Result<Self, InvalidPriority> {
        if priority > Self::MAX_PRIORITY {
            return Err(InvalidPriority(priority));
        }
        Ok(Self {
            priority,
            duration_ms: NO_EXPIRY,
        })
    }

    /// The priority falls back to the default `duration` after the block becomes inactive
    /// (millisecond resolution, at most about 49 days; longer durations are capped there).
    pub fn expiring_after(mut self, duration: Duration) -> Self {
        self.duration_ms = duration.as_millis().min(u128::from(NO_EXPIRY - 1)) as u32;
        self
    }

    /// The priority, `0..=100`.
    pub fn priority(&self) -> u8 {
        self.priority
    }

    /// How long the priority holds once the block is inactive; `None`: for ever.
    pub fn duration(&self) -> Option<Duration> {
        (self.duration_ms != NO_EXPIRY).then(|| Duration::from_millis(self.duration_ms.into()))
    }

    pub(crate) fn duration_ms(&self) -> u32 {
        self.duration_ms
    }

    pub(crate) fn from_raw(priority: u8, duration_ms: u32) -> Self {
        Self {
            priority,
            duration_ms,
        }
    }
}

/// Retention per block range of one request: block indices (positions in the request's
/// [`TokenBlockSequence`](crate::TokenBlockSequence)) map to a [`Retention`]; a later range
/// overrides an earlier one where they overlap, and blocks outside every range get the
/// default.
///
/// ```
/// use kvbm_logical::{BlockManager, Device, RequestRetention, Retention, SequenceHash};
/// let retention = RequestRetention::new(Retention::new(10)?) // the user turn: evict first
///     .with_range(0..4, Retention::new(90)?); // the system prompt: keep
/// assert_eq!(retention.for_block(2).priority(), 90);
/// assert_eq!(retention.for_block(7).priority(), 10);
///
/// let m = BlockManager::<Device>::builder().block_count(8).block_size(16).build()?;
/// let mut staged = m
///     .allocate_blocks(6)?
///     .into_iter()
///     .zip(0..)
///     .map(|(b, h)| b.stage(SequenceHash::new(h), 16))
///     .collect::<Result<Vec<_>, _>>()?;
/// retention.apply(0, &mut staged); // these are the request's blocks 0..6
/// assert_eq!(staged[3].retention().priority(), 90);
/// assert_eq!(staged[4].retention().priority(), 10);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestRetention {
    default: Retention,
    ranges: Vec<(Range<usize>, Retention)>,
}

impl RequestRetention {
    /// Every block gets `default` unless a range says otherwise.
    pub fn new(default: Retention) -> Self {
        Self {
            default,
            ranges: Vec::new(),
        }
    }

    /// Blocks `range` (indices in the request's block sequence) get `retention`.
    pub fn with_range(mut self, range: Range<usize>, retention: Retention) -> Self {
        self.ranges.push((range, retention));
        self
    }

    /// The retention of the request's block `index`.
    pub fn for_block(&self, index: usize) -> Retention {
        self.ranges
            .iter()
            .rev()
            .find(|(r, _)| r.contains(&index))
            .map_or(self.default, |&(_, ret)| ret)
    }

    /// Sets the retention of `blocks`, which are the request's blocks `first..`.
    pub fn apply<T: crate::BlockTier>(&self, first: usize, blocks: &mut [crate::CompleteBlock<T>]) {
        for (i, block) in blocks.iter_mut().enumerate() {
            block.set_retention(self.for_block(first + i));
        }
    }
}

/// The time source for retention expiry: a monotonic duration since an arbitrary epoch.
///
/// [`SystemClock`] is the default; [`ManualClock`] makes expiry testable.
pub trait Clock: Debug + Send + Sync + 'static {
    /// Time since the clock's epoch; never decreases.
    fn now(&self) -> Duration;
}

/// `Instant`-based: the epoch is the clock's creation.
#[derive(Debug, Clone, Copy)]
pub struct SystemClock {
    epoch: Instant,
}

impl Default for SystemClock {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
        }
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }
}

/// A clock that moves only when told to, for tests and simulations (trace replay).
///
/// ```
/// use std::time::Duration;
/// use kvbm_logical::{Clock, ManualClock};
/// let clock = ManualClock::default();
/// clock.advance(Duration::from_millis(1500));
/// assert_eq!(clock.now(), Duration::from_millis(1500));
/// ```
#[derive(Debug, Default)]
pub struct ManualClock {
    nanos: AtomicU64,
}

impl ManualClock {
    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        let by = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        // Saturating: a wrapping add of a huge step would move the clock back.
        let _ = self
            .nanos
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_add(by))
            });
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.nanos.load(Ordering::Relaxed))
    }
}
