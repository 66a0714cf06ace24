//! What a disk tier reports: its I/O mode, its counters and what it recovered at open.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kvbm_logical::SequenceHash;

use super::config::{IoBackend, RecoveryMode};
use super::error::SlotIoError;
use crate::store_tier::StoreStats;

/// How the tier file is read and written.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum IoMode {
    /// `O_DIRECT`: no page cache, aligned buffers.
    Direct,
    /// Through the page cache.
    Buffered {
        /// Why.
        reason: BufferedReason,
    },
}

impl IoMode {
    /// Whether the page cache is bypassed.
    pub fn is_direct(&self) -> bool {
        matches!(self, IoMode::Direct)
    }
}

/// Why a tier runs buffered.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BufferedReason {
    /// Asked for ([`DirectIo::Off`](super::DirectIo::Off)).
    Requested,
    /// The file system refused `O_DIRECT` (the system's message).
    Refused(String),
}

/// Why the tier stopped admitting blocks.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Degraded {
    /// A write or read failed; the first failure.
    Io(SlotIoError),
}

/// One block re-registered at open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecoveredBlock {
    /// Its slot in the file (= its `BlockId` in the tier's manager).
    pub slot: u32,
    /// Its sequence hash.
    pub hash: SequenceHash,
    /// Its parent, as written.
    pub parent: Option<SequenceHash>,
    /// Its write generation (higher = written later).
    pub generation: u64,
}

/// What [`DiskTier::open`](super::DiskTier::open) found in the file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecoveryReport {
    /// The mode used.
    pub mode: RecoveryMode,
    /// The file was created (nothing to recover).
    pub created: bool,
    /// The file was started afresh, and why (another fingerprint, block size, version, a
    /// damaged superblock, [`RecoveryMode::Discard`]).
    pub reinitialized: Option<String>,
    /// The file had this many slots before (the capacity changed; slots that still fit were
    /// recovered).
    pub resized_from: Option<u64>,
    /// Blocks re-registered, in generation order (oldest first: the eviction order).
    pub blocks: Vec<RecoveredBlock>,
    /// Slots dropped because their header or checksum did not verify (torn by a crash,
    /// damaged).
    pub torn: u64,
    /// Slots written under an older epoch (before a reinitialisation): ignored.
    pub stale: u64,
    /// Empty (never written, or removed) slots.
    pub empty: u64,
    /// Slots whose read failed (the tier is then degraded).
    pub unreadable: u64,
    /// Older copies of a hash found twice (the newest is kept).
    pub duplicates: u64,
    /// Slots beyond the end of a truncated file.
    pub truncated: u64,
    /// Time spent scanning.
    pub elapsed: Duration,
}

impl RecoveryReport {
    /// Blocks re-registered.
    pub fn recovered(&self) -> usize {
        self.blocks.len()
    }
}

/// A disk tier's state and counters: [`StoreStats`] plus what only a disk has.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct DiskStats {
    /// The store-tier counters.
    pub store: StoreStats,
    /// `O_DIRECT` or buffered, and why.
    pub io_mode: IoMode,
    /// The I/O back end in use.
    pub backend: IoBackend,
    /// I/Os kept in flight per call.
    pub queue_depth: usize,
    /// Set once an I/O error stopped admissions; see [`DiskTier::resume`](super::DiskTier::resume).
    pub degraded: Option<Degraded>,
    /// Slots in the file.
    pub slots: u32,
    /// Blocks evicted by the tier's manager to make room.
    pub evicted: u64,
    /// Blocks removed on request or because they failed verification.
    pub removed: u64,
    /// Slot reads and writes that failed (an error or a short count).
    pub io_errors: u64,
    /// Slot reads issued straight into the caller's buffer (no bounce copy).
    pub in_place_reads: u64,
    /// Slot reads issued into a bounce buffer, then copied to the caller's.
    pub bounce_reads: u64,
    /// Slot writes issued straight from the caller's bytes (no bounce copy).
    pub in_place_writes: u64,
    /// Slot writes issued from a bounce buffer the caller's bytes were copied into.
    pub bounce_writes: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub stored: AtomicU64,
    pub skipped: AtomicU64,
    pub failed: AtomicU64,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub corrupt: AtomicU64,
    pub bytes_written: AtomicU64,
    pub bytes_read: AtomicU64,
    pub removed: AtomicU64,
    pub io_errors: AtomicU64,
    pub in_place_reads: AtomicU64,
    pub bounce_reads: AtomicU64,
    pub in_place_writes: AtomicU64,
    pub bounce_writes: AtomicU64,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        if n > 0 {
            counter.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub(crate) fn store_stats(&self, resident: u64) -> StoreStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StoreStats {
            stored: get(&self.stored),
            skipped: get(&self.skipped),
            failed: get(&self.failed),
            hits: get(&self.hits),
            misses: get(&self.misses),
            corrupt: get(&self.corrupt),
            bytes_written: get(&self.bytes_written),
            bytes_read: get(&self.bytes_read),
            resident: Some(resident),
        }
    }
}
