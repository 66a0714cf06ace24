//! The yardstick of the disk tier's throughput: one large sequential write and read of the
//! same number of bytes, in one system call each, on a preallocated file of the same file
//! system, `O_DIRECT` where it is accepted (as the tier would be).

use std::path::Path;
use std::time::{Duration, Instant};

use super::buf::AlignedBuf;
use super::config::DirectIo;
use super::error::DiskError;
use super::file::TierFile;
use super::format::page_round;
use super::io::{Step, blocking_io};
use super::stats::IoMode;

/// One sequential write and read of `bytes`.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Sequential {
    /// Bytes written, then read (rounded up to 4 KiB).
    pub bytes: u64,
    /// Time of the first write (one `pwrite` into freshly preallocated space: on ext4 and
    /// XFS its extents are "unwritten" and converted as they are written).
    pub fill: Duration,
    /// Time of a second write over the same bytes (one `pwrite`): the steady state of a
    /// tier whose slots are rewritten.
    pub write: Duration,
    /// Time of the read (one `pread`).
    pub read: Duration,
    /// `O_DIRECT` or buffered (where the file system refuses `O_DIRECT`).
    pub io_mode: IoMode,
}

impl Sequential {
    /// First-write throughput, bytes per second.
    pub fn fill_bytes_per_s(&self) -> f64 {
        self.bytes as f64 / self.fill.as_secs_f64().max(1e-9)
    }

    /// Overwrite throughput, bytes per second.
    pub fn write_bytes_per_s(&self) -> f64 {
        self.bytes as f64 / self.write.as_secs_f64().max(1e-9)
    }

    /// Read throughput, bytes per second.
    pub fn read_bytes_per_s(&self) -> f64 {
        self.bytes as f64 / self.read.as_secs_f64().max(1e-9)
    }
}

/// Writes `bytes` of non-repeating data to a fresh preallocated file at `path` in one
/// `pwrite`, writes them again, reads them back in one `pread` and checks them, then removes
/// the file.
///
/// ```
/// use kvbm_physical::disk::sequential_ceiling;
/// let path = std::env::temp_dir().join(format!("kvbm-doc-ceiling-{}", std::process::id()));
/// let s = sequential_ceiling(&path, 1 << 20)?;
/// assert_eq!(s.bytes, 1 << 20);
/// assert!(s.write_bytes_per_s() > 0.0 && s.read_bytes_per_s() > 0.0);
/// assert!(!path.exists());
/// # Ok::<(), kvbm_physical::DiskError>(())
/// ```
pub fn sequential_ceiling(path: &Path, bytes: u64) -> Result<Sequential, DiskError> {
    let len = usize::try_from(bytes)
        .ok()
        .and_then(page_round)
        .filter(|&l| l > 0 && l <= isize::MAX as usize)
        .ok_or(DiskError::InvalidOption {
            field: "bytes",
            value: bytes,
            reason: "must be positive and fit in memory",
        })?;
    let oom = || DiskError::Io {
        op: "allocate",
        path: path.to_owned(),
        source: std::io::ErrorKind::OutOfMemory.into(),
    };
    let mut buf = AlignedBuf::new(len).ok_or_else(oom)?;
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ bytes;
    for chunk in buf.as_mut_slice().chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let expected = xxhash_rust::xxh3::xxh3_64(buf.as_slice());
    let _ = std::fs::remove_file(path);
    let file = TierFile::open(path, DirectIo::Auto, None)?;
    let result = measure(file, path, &mut buf, len, expected);
    let _ = std::fs::remove_file(path);
    result
}

/// The write and read, on an open file (closed on return).
fn measure(
    mut file: TierFile,
    path: &Path,
    buf: &mut AlignedBuf,
    len: usize,
    expected: u64,
) -> Result<Sequential, DiskError> {
    {
        file.preallocate(len as u64, true)?;
        let io = |file: &TierFile, buf: &mut AlignedBuf, write: bool| {
            let bytes = &mut buf.as_mut_slice()[..len];
            let step = if write {
                Step::Write {
                    offset: 0,
                    segs: vec![bytes],
                }
            } else {
                Step::Read {
                    offset: 0,
                    segs: vec![bytes],
                }
            };
            let start = Instant::now();
            let r = blocking_io(&file.file, step);
            (r, start.elapsed())
        };
        let (mut w, mut fill) = io(&file, buf, true);
        if let Err(e) = &w
            && e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error())
            && file.mode.is_direct()
        {
            let refusal =
                std::io::Error::from_raw_os_error(rustix::io::Errno::INVAL.raw_os_error());
            file = file.fall_back(DirectIo::Auto, refusal)?;
            file.preallocate(len as u64, true)?;
            (w, fill) = io(&file, buf, true);
        }
        let failed = |op, e| DiskError::Io {
            op,
            path: path.to_owned(),
            source: e,
        };
        match w {
            Ok(n) if n == len => {}
            Ok(n) => return Err(failed("write", short(n, len))),
            Err(e) => return Err(failed("write", e)),
        }
        file.sync()?;
        let (w, write) = io(&file, buf, true);
        match w {
            Ok(n) if n == len => {}
            Ok(n) => return Err(failed("write", short(n, len))),
            Err(e) => return Err(failed("write", e)),
        }
        file.sync()?;
        buf.as_mut_slice().fill(0);
        let (r, read) = io(&file, buf, false);
        match r {
            Ok(n) if n == len => {}
            Ok(n) => return Err(failed("read", short(n, len))),
            Err(e) => return Err(failed("read", e)),
        }
        if xxhash_rust::xxh3::xxh3_64(buf.as_slice()) != expected {
            return Err(failed(
                "verify",
                std::io::Error::new(std::io::ErrorKind::InvalidData, "read back other bytes"),
            ));
        }
        Ok(Sequential {
            bytes: len as u64,
            fill,
            write,
            read,
            io_mode: file.mode.clone(),
        })
    }
}

fn short(n: usize, len: usize) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        format!("short: {n} of {len} bytes"),
    )
}
