//! Fault injection for the disk tier: make chosen slot writes fail with `ENOSPC` or `EIO`,
//! come out short (a torn slot in the file), or land with flipped bits; make reads fail or
//! come out short; make the file system refuse `O_DIRECT`. Install with
//! [`DiskTierBuilder::faults`](super::DiskTierBuilder::faults); a tier without one pays a
//! branch per I/O.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

/// How one I/O fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum IoFault {
    /// `ENOSPC`; nothing is transferred.
    NoSpace,
    /// `EIO`; nothing is transferred.
    Io,
    /// `ENOMEM` (as when no buffer could be had for the I/O); nothing is transferred.
    NoMemory,
    /// Only the first `bytes` (rounded down to 4 KiB) are transferred, and the call says so.
    Short {
        /// Bytes transferred.
        bytes: usize,
    },
}

/// Decides which I/Os of a disk tier fail. Every method defaults to "no fault".
pub trait DiskFaults: Send + Sync + fmt::Debug {
    /// Called before slot `slot` is written with `image`: the whole slot (block image,
    /// padding, header page), or only a zeroed header page when a block is removed or a
    /// failed write is cleaned up. Changing `image` changes what reaches the file (a bit
    /// flip on disk); a fault replaces or shortens the write.
    fn before_write(&self, slot: u32, image: &mut [u8]) -> Option<IoFault> {
        let _ = (slot, image);
        None
    }

    /// Called before slot `slot` is read (by a get, or by recovery).
    fn before_read(&self, slot: u32) -> Option<IoFault> {
        let _ = slot;
        None
    }

    /// Whether the file system refuses `O_DIRECT`, as overlayfs and (before Linux 6.6)
    /// tmpfs do.
    fn refuse_direct_io(&self) -> bool {
        false
    }
}

/// A scripted [`DiskFaults`]: faults for chosen slot writes and reads, counted from 0 in the
/// order the tier issues them (recovery's reads count too), and bit flips in chosen writes.
///
/// ```
/// use std::sync::Arc;
/// use kvbm_logical::SequenceHash;
/// use kvbm_physical::disk::{Capacity, DiskFaultPlan, DiskTier, IoFault};
/// use kvbm_physical::{PutOutcome, SkipReason, StoreBlock, StoreError, StoreTier};
/// let dir = std::env::temp_dir().join(format!("kvbm-doc-faults-{}", std::process::id()));
/// let plan = Arc::new(DiskFaultPlan::new().fail_write(0, IoFault::NoSpace));
/// let tier = DiskTier::builder()
///     .path(dir.join("g3.kvbm"))
///     .block_bytes(4096)
///     .capacity(Capacity::Blocks(4))
///     .fingerprint(1)
///     .faults(plan)
///     .open()?;
/// let bytes = vec![7u8; 4096];
/// let block = |h| StoreBlock { hash: SequenceHash::new(h), parent: None, bytes: &bytes };
/// // The first write hits ENOSPC: typed, and the tier stops admitting.
/// assert_eq!(tier.put(&[block(1)]), vec![PutOutcome::Failed(StoreError::NoSpace)]);
/// assert_eq!(tier.put(&[block(2)]), vec![PutOutcome::Skipped(SkipReason::Degraded)]);
/// # drop(tier); std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Default)]
pub struct DiskFaultPlan {
    writes: Mutex<HashMap<u64, IoFault>>,
    reads: Mutex<HashMap<u64, IoFault>>,
    flips: Mutex<HashMap<u64, Vec<usize>>>,
    refuse_direct: bool,
    writes_seen: AtomicU64,
    reads_seen: AtomicU64,
}

impl DiskFaultPlan {
    /// No faults yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Slot write number `write` (0-based; header-only writes count) fails with `fault`.
    pub fn fail_write(self, write: u64, fault: IoFault) -> Self {
        self.writes.lock().insert(write, fault);
        self
    }

    /// Slot read number `read` (0-based) fails with `fault`.
    pub fn fail_read(self, read: u64, fault: IoFault) -> Self {
        self.reads.lock().insert(read, fault);
        self
    }

    /// Slot write number `write` reaches the file with bit `bit` of the slot flipped (bit 0
    /// is the image's first bit; the header page starts at `8 × (slot_bytes − 4096)`).
    pub fn flip_bit_on_write(self, write: u64, bit: usize) -> Self {
        self.flips.lock().entry(write).or_default().push(bit);
        self
    }

    /// The file system refuses `O_DIRECT`.
    pub fn refuse_direct_io(mut self) -> Self {
        self.refuse_direct = true;
        self
    }

    /// Slot writes seen so far.
    pub fn writes_seen(&self) -> u64 {
        self.writes_seen.load(Ordering::Relaxed)
    }

    /// Slot reads seen so far.
    pub fn reads_seen(&self) -> u64 {
        self.reads_seen.load(Ordering::Relaxed)
    }
}

impl DiskFaults for DiskFaultPlan {
    fn before_write(&self, _slot: u32, image: &mut [u8]) -> Option<IoFault> {
        let n = self.writes_seen.fetch_add(1, Ordering::Relaxed);
        if let Some(bits) = self.flips.lock().get(&n) {
            for &bit in bits {
                if let Some(byte) = image.get_mut(bit / 8) {
                    *byte ^= 1 << (bit % 8);
                }
            }
        }
        self.writes.lock().get(&n).copied()
    }

    fn before_read(&self, _slot: u32) -> Option<IoFault> {
        let n = self.reads_seen.fetch_add(1, Ordering::Relaxed);
        self.reads.lock().get(&n).copied()
    }

    fn refuse_direct_io(&self) -> bool {
        self.refuse_direct
    }
}
