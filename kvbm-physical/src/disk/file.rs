//! The tier file itself: opening it with `O_DIRECT` (or falling back), locking it against a
//! second user, preallocating it, and reading and writing its superblock.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rustix::fs::{FallocateFlags, FlockOperation};
use rustix::io::Errno;

use super::buf::AlignedBuf;
use super::config::DirectIo;
use super::error::DiskError;
use super::faults::DiskFaults;
use super::format::PAGE;
use super::io::{Step, blocking_io};
use super::stats::{BufferedReason, IoMode};

/// The open, locked tier file.
#[derive(Debug)]
pub(crate) struct TierFile {
    pub file: File,
    pub mode: IoMode,
    pub path: PathBuf,
}

fn io_err(op: &'static str, path: &Path, source: io::Error) -> DiskError {
    DiskError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

fn is_einval(e: &io::Error) -> bool {
    e.raw_os_error() == Some(Errno::INVAL.raw_os_error())
}

impl TierFile {
    /// Opens (creating) `path` for reading and writing, `O_DIRECT` if asked and accepted, and
    /// takes an exclusive lock on it.
    pub(crate) fn open(
        path: &Path,
        direct: DirectIo,
        faults: Option<&dyn DiskFaults>,
    ) -> Result<Self, DiskError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| io_err("create directory", dir, e))?;
        }
        let (file, mode) = match direct {
            DirectIo::Off => (
                open_plain(path)?,
                IoMode::Buffered {
                    reason: BufferedReason::Requested,
                },
            ),
            DirectIo::Auto | DirectIo::Require => {
                let refused = faults.is_some_and(|f| f.refuse_direct_io());
                let attempt = if refused {
                    Err(io::Error::from_raw_os_error(Errno::INVAL.raw_os_error()))
                } else {
                    open_direct(path)
                };
                match attempt {
                    Ok(file) => (file, IoMode::Direct),
                    Err(e) if is_einval(&e) => Self::refused(path, direct, e)?,
                    Err(e) => return Err(io_err("open", path, e)),
                }
            }
        };
        lock(&file, path)?;
        Ok(Self {
            file,
            mode,
            path: path.to_owned(),
        })
    }

    /// `O_DIRECT` refused (at open or at the first I/O): a buffered file, or an error.
    fn refused(path: &Path, direct: DirectIo, e: io::Error) -> Result<(File, IoMode), DiskError> {
        if direct == DirectIo::Require {
            return Err(DiskError::DirectIoRefused {
                path: path.to_owned(),
                source: e,
            });
        }
        tracing::warn!(
            path = %path.display(),
            error = %e,
            "the file system refuses O_DIRECT; the disk tier uses buffered I/O (page cache)"
        );
        let file = open_plain(path)?;
        Ok((
            file,
            IoMode::Buffered {
                reason: BufferedReason::Refused(e.to_string()),
            },
        ))
    }

    /// The first I/O with `O_DIRECT` was refused: reopen buffered (or fail if required).
    pub(crate) fn fall_back(self, direct: DirectIo, e: io::Error) -> Result<Self, DiskError> {
        let Self { file, path, .. } = self;
        // Close first: the lock belongs to the open file, and is taken again below.
        drop(file);
        let (file, mode) = Self::refused(&path, direct, e)?;
        lock(&file, &path)?;
        Ok(Self { file, mode, path })
    }

    pub(crate) fn len(&self) -> Result<u64, DiskError> {
        self.file
            .metadata()
            .map(|m| m.len())
            .map_err(|e| io_err("stat", &self.path, e))
    }

    /// Reads the first page (fewer bytes if the file is shorter). `Err(Ok(e))` is an
    /// `O_DIRECT` refusal, for [`fall_back`](Self::fall_back).
    pub(crate) fn read_page0(&self) -> Result<(AlignedBuf, usize), Result<io::Error, DiskError>> {
        let mut buf = AlignedBuf::new(PAGE).ok_or_else(|| {
            Err(io_err(
                "allocate",
                &self.path,
                io::ErrorKind::OutOfMemory.into(),
            ))
        })?;
        let step = Step::Read {
            offset: 0,
            segs: vec![buf.as_mut_slice()],
        };
        match blocking_io(&self.file, step) {
            Ok(n) => Ok((buf, n)),
            Err(e) if is_einval(&e) && self.mode.is_direct() => Err(Ok(e)),
            Err(e) => Err(Err(io_err("read superblock", &self.path, e))),
        }
    }

    /// Writes the first page. `Err(Ok(e))` is an `O_DIRECT` refusal.
    pub(crate) fn write_page0(
        &self,
        page: &mut AlignedBuf,
    ) -> Result<(), Result<io::Error, DiskError>> {
        let step = Step::Write {
            offset: 0,
            segs: vec![&page.as_slice()[..PAGE]],
        };
        match blocking_io(&self.file, step) {
            Ok(PAGE) => Ok(()),
            Ok(n) => Err(Err(io_err(
                "write superblock",
                &self.path,
                io::Error::new(io::ErrorKind::WriteZero, format!("short write: {n} bytes")),
            ))),
            Err(e) if is_einval(&e) && self.mode.is_direct() => Err(Ok(e)),
            Err(e) if e.raw_os_error() == Some(Errno::NOSPC.raw_os_error()) => {
                Err(Err(DiskError::NoSpace {
                    path: self.path.clone(),
                    bytes: PAGE as u64,
                }))
            }
            Err(e) => Err(Err(io_err("write superblock", &self.path, e))),
        }
    }

    /// Makes the file exactly `len` bytes, its blocks allocated (`fallocate`) where the file
    /// system can; a sparse file (with a warning) where it cannot.
    pub(crate) fn preallocate(&self, len: u64, discard_old: bool) -> Result<(), DiskError> {
        let current = self.len()?;
        if discard_old || current > len {
            // Dropping the old extents leaves unwritten (zero-reading) space behind.
            let keep = if discard_old { 0 } else { len };
            self.file
                .set_len(keep)
                .map_err(|e| io_err("truncate", &self.path, e))?;
        }
        match rustix::fs::fallocate(&self.file, FallocateFlags::empty(), 0, len) {
            Ok(()) => Ok(()),
            Err(Errno::NOSPC) => Err(DiskError::NoSpace {
                path: self.path.clone(),
                bytes: len,
            }),
            Err(e) if e == Errno::OPNOTSUPP || e == Errno::NOSYS => {
                tracing::warn!(
                    path = %self.path.display(),
                    "fallocate unsupported here: the tier file is sparse, a full disk shows up as ENOSPC on writes"
                );
                self.file
                    .set_len(len)
                    .map_err(|e| io_err("extend", &self.path, e))
            }
            Err(e) => Err(io_err("fallocate", &self.path, e.into())),
        }
    }

    pub(crate) fn sync(&self) -> Result<(), DiskError> {
        self.file
            .sync_all()
            .map_err(|e| io_err("fsync", &self.path, e))
    }
}

fn open_direct(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
        .open(path)
}

fn open_plain(path: &Path) -> Result<File, DiskError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| io_err("open", path, e))
}

fn lock(file: &File, path: &Path) -> Result<(), DiskError> {
    match rustix::fs::flock(file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(()),
        Err(Errno::WOULDBLOCK) => Err(DiskError::Locked {
            path: path.to_owned(),
        }),
        Err(e) => Err(io_err("lock", path, e.into())),
    }
}
