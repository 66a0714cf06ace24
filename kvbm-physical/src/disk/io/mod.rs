//! The I/O back ends: a pool of threads doing `pread`/`pwrite` ([`psync`]) and `io_uring`
//! ([`uring`]), behind one pipelined interface. The engine describes a batch as a
//! [`Pipeline`]: `prepare` fills a buffer and says which I/O to do, `complete` takes the
//! result; the back end keeps up to `depth` I/Os in flight and reuses the buffers.

mod psync;
mod uring;

use std::fs::File;
use std::io;
use std::sync::Arc;

use super::buf::{AlignedBuf, BufPool};
use super::config::IoBackend;

pub(crate) use psync::PsyncPool;
pub(crate) use uring::UringPool;

/// Read or write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum IoKind {
    Read,
    Write,
}

/// One I/O on the first `len` bytes of a buffer, at `offset` in the file.
#[derive(Clone, Copy, Debug)]
pub(crate) struct IoReq {
    pub kind: IoKind,
    pub offset: u64,
    pub len: usize,
    /// After a read of at least this many bytes, the xxh3-64 of the buffer's first `sum`
    /// bytes is computed where the I/O ran (a worker thread of the pool), so that checksums
    /// are verified in parallel rather than one after another on the caller's thread.
    pub sum: Option<usize>,
}

impl IoReq {
    pub(crate) fn new(kind: IoKind, offset: u64, len: usize) -> Self {
        Self {
            kind,
            offset,
            len,
            sum: None,
        }
    }

    /// The checksum this request asked for, over `buf` after `result`.
    pub(crate) fn digest(&self, buf: &AlignedBuf, result: &io::Result<usize>) -> Option<u64> {
        let n = self.sum?;
        match result {
            Ok(got) if *got >= n && buf.len() >= n => {
                Some(xxhash_rust::xxh3::xxh3_64(&buf.as_slice()[..n]))
            }
            _ => None,
        }
    }
}

/// What `prepare` decided for one operation.
#[derive(Debug)]
pub(crate) enum Prepared {
    /// Do this I/O.
    Submit(IoReq),
    /// No I/O: this is the result (a skipped or fault-injected operation).
    Done(io::Result<usize>),
}

/// A batch of `n` operations, numbered `0..n`, prepared and completed in any order.
pub(crate) trait Pipeline {
    /// Fills `buf` for operation `i` (called at most once per `i`, in increasing order).
    fn prepare(&mut self, i: usize, buf: &mut AlignedBuf) -> Prepared;
    /// Operation `i` finished: `Ok(bytes)` (possibly fewer than asked: short) or the error.
    /// `buf` is its buffer (empty if no buffer could be had, and `prepare` was not called);
    /// `sum` the checksum the request asked for ([`IoReq::sum`]), if the read got that far.
    fn complete(&mut self, i: usize, buf: &[u8], result: io::Result<usize>, sum: Option<u64>);
}

/// The back end in use.
#[derive(Debug)]
pub(crate) enum IoQueue {
    Psync(PsyncPool),
    Uring(UringPool),
}

impl IoQueue {
    /// Starts the back end: `IoUring` fails if the kernel refuses it; `Auto` takes the
    /// thread pool (the faster one measured, see BENCHMARKS.md).
    pub(crate) fn start(backend: IoBackend, depth: usize) -> io::Result<Self> {
        match backend {
            IoBackend::IoUring => UringPool::new(depth).map(IoQueue::Uring),
            IoBackend::ThreadPool | IoBackend::Auto => PsyncPool::new(depth).map(IoQueue::Psync),
        }
    }

    /// Which back end this is.
    pub(crate) fn backend(&self) -> IoBackend {
        match self {
            IoQueue::Psync(_) => IoBackend::ThreadPool,
            IoQueue::Uring(_) => IoBackend::IoUring,
        }
    }

    /// I/Os kept in flight per call.
    pub(crate) fn depth(&self) -> usize {
        match self {
            IoQueue::Psync(p) => p.depth(),
            IoQueue::Uring(u) => u.depth(),
        }
    }

    /// Runs the `n` operations of `pipeline` against `file`, with buffers from `bufs`; returns
    /// once every operation has completed.
    pub(crate) fn drive(
        &self,
        file: &Arc<File>,
        bufs: &BufPool,
        n: usize,
        pipeline: &mut dyn Pipeline,
    ) {
        if n == 0 {
            return;
        }
        // The buffers for this call; fewer than the depth if memory is short.
        let want = n.min(self.depth());
        let mut free: Vec<AlignedBuf> = (0..want).map_while(|_| bufs.take()).collect();
        if free.is_empty() {
            for i in 0..n {
                pipeline.complete(i, &[], Err(io::ErrorKind::OutOfMemory.into()), None);
            }
            return;
        }
        match self {
            IoQueue::Psync(p) => p.drive(file, &mut free, n, pipeline),
            IoQueue::Uring(u) => u.drive(file, &mut free, n, pipeline),
        }
        for buf in free {
            bufs.give(buf);
        }
    }
}

/// Does `req` with `pread`/`pwrite` until done, the file ends or an error: the count is short
/// only at the end of the file (or when the device says so).
pub(crate) fn blocking_io(file: &File, buf: &mut AlignedBuf, req: IoReq) -> io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut done = 0;
    while done < req.len {
        let at = req.offset + done as u64;
        let r = match req.kind {
            IoKind::Read => file.read_at(&mut buf.as_mut_slice()[done..req.len], at),
            IoKind::Write => file.write_at(&buf.as_slice()[done..req.len], at),
        };
        match r {
            Ok(0) => break,
            Ok(k) => done += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}
