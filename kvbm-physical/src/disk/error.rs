//! Errors of the disk tier: opening refused ([`DiskError`]), and the per-block I/O failures
//! that degrade it ([`SlotIoError`]).

use std::io;
use std::path::PathBuf;

use thiserror::Error;

use crate::store_tier::StoreError;

/// Opening a disk tier failed; nothing was written to the file unless it is ours and the
/// options allow reinitialising it.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum DiskError {
    /// A required option was not given.
    #[error("disk tier option `{0}` is required")]
    Missing(&'static str),
    /// An option is out of range.
    #[error("disk tier option `{field}` = {value}: {reason}")]
    InvalidOption {
        /// The option.
        field: &'static str,
        /// Its value.
        value: u64,
        /// What is allowed.
        reason: &'static str,
    },
    /// A system call on the tier file failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done (`open`, `fallocate`, `read superblock`, ...).
        op: &'static str,
        /// The tier file.
        path: PathBuf,
        /// The system's error.
        #[source]
        source: io::Error,
    },
    /// The file system has no room for the tier file (`ENOSPC` while preallocating).
    #[error("no space for the tier file {path}: {bytes} bytes needed")]
    NoSpace {
        /// The tier file.
        path: PathBuf,
        /// Its size.
        bytes: u64,
    },
    /// Another process (or another tier in this one) holds the file.
    #[error("tier file {path} is in use by another process or tier")]
    Locked {
        /// The tier file.
        path: PathBuf,
    },
    /// The path holds a file that is not a kvbm tier file; it is never overwritten.
    #[error("{path} is not a kvbm disk tier file (refusing to overwrite it)")]
    NotATierFile {
        /// The file.
        path: PathBuf,
    },
    /// The tier file was written for another layout, block size or format version
    /// ([`OnIncompatible::Fail`](super::OnIncompatible::Fail)).
    #[error("tier file {path} has {what} {found:#x}, expected {expected:#x}")]
    Incompatible {
        /// The tier file.
        path: PathBuf,
        /// Which property differs (`fingerprint`, `block_bytes`, `format version`, ...).
        what: &'static str,
        /// The file's value.
        found: u64,
        /// This tier's value.
        expected: u64,
    },
    /// The tier file is shorter than its superblock says
    /// ([`OnIncompatible::Fail`](super::OnIncompatible::Fail)).
    #[error("tier file {path} is truncated: {len} bytes, {expected} expected")]
    Truncated {
        /// The tier file.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// The length its superblock implies.
        expected: u64,
    },
    /// `O_DIRECT` was required ([`DirectIo::Require`](super::DirectIo::Require)) and the file
    /// system refused it.
    #[error("the file system of {path} refuses O_DIRECT: {source}")]
    DirectIoRefused {
        /// The tier file.
        path: PathBuf,
        /// The refusal.
        #[source]
        source: io::Error,
    },
    /// The I/O back end could not start (`io_uring` refused by the kernel, no threads).
    #[error("I/O back end {backend:?} unavailable: {source}")]
    Backend {
        /// The back end asked for.
        backend: super::IoBackend,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The block manager that evicts the tier's slots could not be built.
    #[error(transparent)]
    Manager(#[from] kvbm_logical::BuildError),
}

/// One slot's read or write failed. Degrades the tier (no more admissions) and is reported
/// per block as [`StoreError`].
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum SlotIoError {
    /// `ENOSPC` (a thin-provisioned or sparse file, or a file system that lied).
    #[error("no space left on device")]
    NoSpace,
    /// No memory for the operation's buffer (or the kernel's `ENOMEM`): says nothing about
    /// the slot, so a read failing so is transient (the block stays).
    #[error("out of memory for the I/O")]
    NoMemory,
    /// Any other error of the system call (`EIO`, ...), by errno.
    #[error("I/O error (errno {errno:?}): {message}")]
    Io {
        /// The errno, when there is one.
        errno: Option<i32>,
        /// The system's message.
        message: String,
    },
    /// Fewer bytes than the slot were read or written.
    #[error("short {op}: {done} of {expected} bytes")]
    Short {
        /// `read` or `write`.
        op: &'static str,
        /// Bytes transferred.
        done: usize,
        /// The slot's size.
        expected: usize,
    },
}

impl SlotIoError {
    pub(crate) fn from_io(e: &io::Error) -> Self {
        if e.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error()) {
            SlotIoError::NoSpace
        } else if e.kind() == io::ErrorKind::OutOfMemory
            || e.raw_os_error() == Some(rustix::io::Errno::NOMEM.raw_os_error())
        {
            SlotIoError::NoMemory
        } else {
            SlotIoError::Io {
                errno: e.raw_os_error(),
                message: e.to_string(),
            }
        }
    }
}

impl From<SlotIoError> for StoreError {
    fn from(e: SlotIoError) -> Self {
        match e {
            SlotIoError::NoSpace => StoreError::NoSpace,
            SlotIoError::NoMemory => StoreError::Unavailable(SlotIoError::NoMemory.to_string()),
            other => StoreError::Io(other.to_string()),
        }
    }
}
