//! Configuring a disk tier: [`DiskTierBuilder`] and its named options.

use std::path::PathBuf;
use std::sync::Arc;

use kvbm_logical::EvictionBackend;

use super::engine::DiskTier;
use super::error::DiskError;
use super::faults::DiskFaults;

/// How big the tier is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Capacity {
    /// This many block slots.
    Blocks(u32),
    /// As many slots as fit in this many bytes of file (each slot is the block rounded up to
    /// 4 KiB, plus a 4 KiB header page).
    Bytes(u64),
}

/// Which I/O back end keeps several reads and writes in flight.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum IoBackend {
    /// The thread back end: on the reference machine it met the throughput goals at more
    /// points than `io_uring` (BENCHMARKS.md, 2026-11-29), and it copies and verifies
    /// checksums on its threads, in parallel.
    #[default]
    Auto,
    /// Up to `queue_depth` threads per call (the caller's and `queue_depth − 1` helpers the
    /// tier keeps for its lifetime), each running
    /// whole block operations: copy and checksum, `pwritev`/`preadv`, verification.
    ThreadPool,
    /// `io_uring` (one ring per concurrent caller, `queue_depth` entries each). Opening fails
    /// with [`DiskError::Backend`] where the kernel or a sandbox refuses it.
    IoUring,
}

/// Whether to bypass the page cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DirectIo {
    /// `O_DIRECT` where the file system accepts it; elsewhere (some overlayfs, FUSE, older
    /// tmpfs) buffered I/O, said once with `tracing::warn!` and in
    /// [`DiskStats::io_mode`](super::DiskStats::io_mode).
    #[default]
    Auto,
    /// `O_DIRECT` or fail to open ([`DiskError::DirectIoRefused`]).
    Require,
    /// Buffered I/O through the page cache.
    Off,
}

/// What opening an existing tier file reads back (foyer's "recover mode", with kvbm's
/// checks).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RecoveryMode {
    /// Start empty: the file gets a new epoch, so nothing written before is ever read back.
    Discard,
    /// Read every slot's header page only and re-register the slots whose header verifies
    /// (fast: 4 KiB per slot). An image torn by a crash is found at its first read
    /// ([`GetOutcome::Corrupt`](crate::GetOutcome::Corrupt): invalidated, never served).
    Headers,
    /// Read every slot whole and re-register only those whose header and checksum verify;
    /// torn slots are dropped at open and counted.
    #[default]
    Verify,
}

/// What to do with a kvbm tier file written for another layout fingerprint, block size or
/// format version, or shorter than its superblock says. (A file that is not a kvbm tier
/// file is never touched: [`DiskError::NotATierFile`].)
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum OnIncompatible {
    /// Start it afresh (new epoch: none of its old slots can be read), with a warning.
    #[default]
    Reinitialize,
    /// Refuse to open ([`DiskError::Incompatible`], [`DiskError::Truncated`]) and leave it.
    Fail,
}

/// The default I/O depth: the best depth measured for 2 MiB blocks on the reference machine
/// (BENCHMARKS.md).
pub const DEFAULT_QUEUE_DEPTH: usize = 8;
/// The largest queue depth accepted.
pub const MAX_QUEUE_DEPTH: usize = 1024;

/// Options of [`DiskTier::open`]; build with [`DiskTier::builder`]. Setters never fail;
/// [`open`](Self::open) checks everything once.
///
/// ```
/// use kvbm_physical::disk::{Capacity, DiskTier, RecoveryMode};
/// let dir = std::env::temp_dir().join(format!("kvbm-doc-builder-{}", std::process::id()));
/// let tier = DiskTier::builder()
///     .path(dir.join("g3.kvbm"))
///     .block_bytes(64 << 10)
///     .capacity(Capacity::Bytes(4 << 20))
///     .fingerprint(0x1234)
///     .recovery(RecoveryMode::Verify)
///     .open()?;
/// assert_eq!(tier.geometry().slots(), 60); // 4 MiB / (64 KiB + 4 KiB)
/// # drop(tier); std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct DiskTierBuilder {
    pub(crate) path: Option<PathBuf>,
    pub(crate) block_bytes: Option<usize>,
    pub(crate) capacity: Option<Capacity>,
    pub(crate) fingerprint: Option<u64>,
    pub(crate) queue_depth: Option<usize>,
    pub(crate) backend: IoBackend,
    pub(crate) direct_io: DirectIo,
    pub(crate) recovery: RecoveryMode,
    pub(crate) on_incompatible: OnIncompatible,
    /// `None`: LRU (the tier's documented default, not the logical crate's).
    pub(crate) eviction: Option<EvictionBackend>,
    pub(crate) faults: Option<Arc<dyn DiskFaults>>,
    /// `None`: [`DEGRADED_RETRY`].
    pub(crate) degraded_retry: Option<std::time::Duration>,
}

/// How long a degraded tier refuses puts before one put tries the disk again (by default;
/// [`DiskTierBuilder::degraded_retry`]). Each failed try doubles the wait, up to
/// [`DEGRADED_RETRY_MAX`]; a try that writes clears the degradation.
pub const DEGRADED_RETRY: std::time::Duration = std::time::Duration::from_secs(30);

/// The longest wait between two tries of a degraded tier.
pub const DEGRADED_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(600);

impl DiskTierBuilder {
    /// The tier file (required); its directory is created if missing.
    pub fn path(mut self, path: impl Into<PathBuf>) -> Self {
        self.path = Some(path.into());
        self
    }

    /// Bytes of one block image (required): the G2 layout's `block_bytes`.
    pub fn block_bytes(mut self, bytes: usize) -> Self {
        self.block_bytes = Some(bytes);
        self
    }

    /// How many blocks the tier holds (required).
    pub fn capacity(mut self, capacity: Capacity) -> Self {
        self.capacity = Some(capacity);
        self
    }

    /// The layout fingerprint (required): any u64 that differs between layouts, models or
    /// anything else that makes two block images with the same hash differ (see
    /// [`layout_fingerprint`](super::layout_fingerprint)). Slots written under another
    /// fingerprint are never read.
    pub fn fingerprint(mut self, fingerprint: u64) -> Self {
        self.fingerprint = Some(fingerprint);
        self
    }

    /// Reads or writes kept in flight per call, `1..=MAX_QUEUE_DEPTH` (default
    /// [`DEFAULT_QUEUE_DEPTH`]). With the thread pool, also the number of I/O threads.
    pub fn queue_depth(mut self, depth: usize) -> Self {
        self.queue_depth = Some(depth);
        self
    }

    /// The I/O back end (default [`IoBackend::Auto`]).
    pub fn io_backend(mut self, backend: IoBackend) -> Self {
        self.backend = backend;
        self
    }

    /// `O_DIRECT` or buffered (default [`DirectIo::Auto`]).
    pub fn direct_io(mut self, direct: DirectIo) -> Self {
        self.direct_io = direct;
        self
    }

    /// What to read back from an existing file (default [`RecoveryMode::Verify`]).
    pub fn recovery(mut self, mode: RecoveryMode) -> Self {
        self.recovery = mode;
        self
    }

    /// What to do with a tier file of another layout (default
    /// [`OnIncompatible::Reinitialize`]).
    pub fn on_incompatible(mut self, on: OnIncompatible) -> Self {
        self.on_incompatible = on;
        self
    }

    /// The eviction policy of the tier's block manager (default LRU).
    pub fn eviction(mut self, backend: EvictionBackend) -> Self {
        self.eviction = Some(backend);
        self
    }

    /// Fault injection for tests and drills (none by default).
    pub fn faults(mut self, faults: Arc<dyn DiskFaults>) -> Self {
        self.faults = Some(faults);
        self
    }

    /// How long after a failed write or read the tier refuses puts before one put tries the
    /// disk again ([`DEGRADED_RETRY`] by default, doubling after each failed try up to
    /// [`DEGRADED_RETRY_MAX`]). A full disk or a bad sector stops admissions at once, and a
    /// freed disk is found again without anyone calling [`DiskTier::resume`].
    pub fn degraded_retry(mut self, wait: std::time::Duration) -> Self {
        self.degraded_retry = Some(wait);
        self
    }

    /// Checks the options, opens (or creates) the file and recovers what it holds; see
    /// [`DiskTier::open`].
    pub fn open(self) -> Result<DiskTier, DiskError> {
        DiskTier::open(self)
    }

    pub(crate) fn depth(&self) -> Result<usize, DiskError> {
        let depth = self.queue_depth.unwrap_or(DEFAULT_QUEUE_DEPTH);
        if depth == 0 || depth > MAX_QUEUE_DEPTH {
            return Err(DiskError::InvalidOption {
                field: "queue_depth",
                value: depth as u64,
                reason: "must be 1..=1024",
            });
        }
        Ok(depth)
    }
}
