//! The I/O back ends: threads that each run whole operations ([`threads`]) and `io_uring`
//! ([`uring`]), behind one interface. The engine describes a batch as [`Ops`]: per
//! operation, [`Ops::prepare`] says which I/O to do on which memory (the caller's block
//! buffer itself where `O_DIRECT` allows it, else a bounce buffer, plus a header page), and
//! [`Ops::finish`] checks the result. The thread back end runs prepare, I/O and finish of
//! one operation on one thread, so copies and checksums run in parallel and no operation
//! is handed from thread to thread; the `io_uring` back end prepares and finishes on the
//! caller's thread while the kernel keeps up to `depth` I/Os in flight.

mod threads;
mod uring;

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut};

use super::buf::{AlignedBuf, BufPool};
use super::config::IoBackend;
use super::faults::IoFault;
use super::format::PAGE;

pub(crate) use threads::ThreadRunner;
pub(crate) use uring::UringPool;

/// One I/O: read into or write from up to a few memory segments, at `offset` in the file.
/// A segment is the caller's buffer, a bounce buffer or a header page.
#[derive(Debug)]
pub(crate) enum Step<'t> {
    /// `preadv` into the segments, in order.
    Read {
        offset: u64,
        segs: Vec<&'t mut [u8]>,
    },
    /// `pwritev` of the segments, in order.
    Write { offset: u64, segs: Vec<&'t [u8]> },
    /// No I/O: this is the result (a fault-injected or impossible operation).
    Done(io::Result<usize>),
}

impl<'t> Step<'t> {
    /// Bytes the I/O moves when it completes.
    #[cfg(test)]
    fn len(&self) -> usize {
        match self {
            Step::Read { segs, .. } => segs.iter().map(|s| s.len()).sum(),
            Step::Write { segs, .. } => segs.iter().map(|s| s.len()).sum(),
            Step::Done(_) => 0,
        }
    }

    /// Applies an injected fault: an error replaces the I/O, a short one moves only the
    /// first `bytes` (rounded down to a page).
    pub(crate) fn with_fault(self, fault: Option<IoFault>) -> Self {
        let errno =
            |e: rustix::io::Errno| Step::Done(Err(io::Error::from_raw_os_error(e.raw_os_error())));
        match fault {
            None => self,
            Some(IoFault::NoSpace) => errno(rustix::io::Errno::NOSPC),
            Some(IoFault::Io) => errno(rustix::io::Errno::IO),
            Some(IoFault::NoMemory) => errno(rustix::io::Errno::NOMEM),
            Some(IoFault::Short { bytes }) => self.truncate(bytes / PAGE * PAGE),
        }
    }

    /// Keeps the first `len` bytes of the I/O.
    fn truncate(self, len: usize) -> Self {
        match self {
            Step::Read { offset, segs } => {
                let mut left = len;
                let segs = segs
                    .into_iter()
                    .filter_map(|s| {
                        let take = s.len().min(left);
                        left -= take;
                        (take > 0).then(|| &mut s[..take])
                    })
                    .collect();
                Step::Read { offset, segs }
            }
            Step::Write { offset, segs } => {
                let mut left = len;
                let segs = segs
                    .into_iter()
                    .filter_map(|s| {
                        let take = s.len().min(left);
                        left -= take;
                        (take > 0).then(|| &s[..take])
                    })
                    .collect();
                Step::Write { offset, segs }
            }
            done => done,
        }
    }
}

/// The memory one operation in flight may use besides the caller's: a header page and,
/// where the caller's buffer cannot be used directly, a bounce buffer of a whole slot. Both
/// come from the tier's [`BufPool`] on first use and go back to it when the batch is done.
pub(crate) struct Scratch<'p> {
    pool: &'p BufPool,
    page: Option<AlignedBuf>,
    bounce: Option<AlignedBuf>,
}

impl<'p> Scratch<'p> {
    pub(crate) fn new(pool: &'p BufPool) -> Self {
        Self {
            pool,
            page: None,
            bounce: None,
        }
    }

    /// A page-aligned page (contents unspecified); `None` if memory is short.
    pub(crate) fn page(&mut self) -> Option<&mut [u8]> {
        if self.page.is_none() {
            self.page = self.pool.take_page();
        }
        self.page.as_mut().map(AlignedBuf::as_mut_slice)
    }

    /// The page as last filled (empty if there is none).
    pub(crate) fn page_bytes(&self) -> &[u8] {
        self.page.as_ref().map_or(&[], AlignedBuf::as_slice)
    }

    /// A page-aligned buffer of one slot (contents unspecified); `None` if memory is short.
    pub(crate) fn bounce(&mut self) -> Option<&mut [u8]> {
        if self.bounce.is_none() {
            self.bounce = self.pool.take();
        }
        self.bounce.as_mut().map(AlignedBuf::as_mut_slice)
    }

    /// The bounce buffer as last filled (empty if there is none).
    pub(crate) fn bounce_bytes(&self) -> &[u8] {
        self.bounce.as_ref().map_or(&[], AlignedBuf::as_slice)
    }
}

impl Drop for Scratch<'_> {
    fn drop(&mut self) {
        if let Some(page) = self.page.take() {
            self.pool.give_page(page);
        }
        if let Some(buf) = self.bounce.take() {
            self.pool.give(buf);
        }
    }
}

/// A batch of operations: each is prepared, does its I/O and is finished, in any order and
/// on any thread (the thread back end runs several at once, so `Ops` is `Sync` and tasks
/// and results move between threads).
pub(crate) trait Ops: Sync {
    /// One operation's own state (which slot, the caller's buffer).
    type Task: Send;
    /// One operation's result.
    type Out: Send;

    /// Fills `scratch` as needed and says which I/O to do. Called once per task.
    fn prepare<'t>(&self, task: &'t mut Self::Task, scratch: &'t mut Scratch<'_>) -> Step<'t>;

    /// The I/O of `task` moved `result` bytes (or failed): its result. `scratch` holds what
    /// `prepare` put there and what the I/O read.
    fn finish(
        &self,
        task: Self::Task,
        scratch: &Scratch<'_>,
        result: io::Result<usize>,
    ) -> Self::Out;

    /// The result of an operation that never finished: its thread died (a bug) or the
    /// ring failed before it started. Must read as a failure.
    fn abandoned(&self) -> Self::Out;

    /// Whether the batch must run one operation at a time, in order, on the caller's
    /// thread: set when a fault plan numbers the operations it sees (`DiskFaultPlan`), so
    /// that "the n-th write fails" names the same block on every run.
    fn sequential(&self) -> bool {
        false
    }
}

/// Runs one operation start to end on this thread.
pub(crate) fn run_one<O: Ops>(
    file: &File,
    ops: &O,
    mut task: O::Task,
    scratch: &mut Scratch<'_>,
) -> O::Out {
    let result = match ops.prepare(&mut task, scratch) {
        Step::Done(result) => result,
        step => blocking_io(file, step),
    };
    ops.finish(task, scratch, result)
}

/// The back end in use.
#[derive(Debug)]
pub(crate) enum IoQueue {
    Threads(ThreadRunner),
    Uring(UringPool),
}

impl IoQueue {
    /// Starts the back end: `IoUring` fails if the kernel refuses it; `Auto` takes the
    /// thread back end (the faster one measured, see BENCHMARKS.md).
    pub(crate) fn start(backend: IoBackend, depth: usize) -> io::Result<Self> {
        match backend {
            IoBackend::IoUring => UringPool::new(depth).map(IoQueue::Uring),
            IoBackend::ThreadPool | IoBackend::Auto => {
                Ok(IoQueue::Threads(ThreadRunner::new(depth)))
            }
        }
    }

    /// Which back end this is.
    pub(crate) fn backend(&self) -> IoBackend {
        match self {
            IoQueue::Threads(_) => IoBackend::ThreadPool,
            IoQueue::Uring(_) => IoBackend::IoUring,
        }
    }

    /// I/Os kept in flight per call.
    pub(crate) fn depth(&self) -> usize {
        match self {
            IoQueue::Threads(t) => t.depth(),
            IoQueue::Uring(u) => u.depth(),
        }
    }

    /// Runs every task of `ops` against `file`, up to `depth` at once, with scratch memory
    /// from `bufs`; returns once all have finished, their results in task order.
    pub(crate) fn run<O: Ops>(
        &self,
        file: &File,
        bufs: &BufPool,
        ops: &O,
        tasks: Vec<O::Task>,
    ) -> Vec<O::Out> {
        match tasks.len() {
            0 => Vec::new(),
            // One operation: no thread, no ring.
            1 => tasks
                .into_iter()
                .map(|t| run_one(file, ops, t, &mut Scratch::new(bufs)))
                .collect(),
            _ if ops.sequential() => {
                let mut scratch = Scratch::new(bufs);
                tasks
                    .into_iter()
                    .map(|t| run_one(file, ops, t, &mut scratch))
                    .collect()
            }
            _ => match self {
                IoQueue::Threads(t) => t.run(file, bufs, ops, tasks),
                IoQueue::Uring(u) => u.run(file, bufs, ops, tasks),
            },
        }
    }
}

/// Does the I/O of `step` with `preadv`/`pwritev` until done, the file ends or an error: the
/// count is short only at the end of the file (or when the device says so).
pub(crate) fn blocking_io(file: &File, step: Step<'_>) -> io::Result<usize> {
    match step {
        Step::Done(result) => result,
        Step::Read { offset, mut segs } => {
            let mut done = 0usize;
            loop {
                let mut slices: Vec<IoSliceMut<'_>> = Vec::with_capacity(segs.len());
                let mut skip = done;
                for s in segs.iter_mut() {
                    if skip >= s.len() {
                        skip -= s.len();
                        continue;
                    }
                    slices.push(IoSliceMut::new(&mut s[skip..]));
                    skip = 0;
                }
                if slices.is_empty() {
                    return Ok(done);
                }
                match rustix::io::preadv(file, &mut slices, offset + done as u64) {
                    Ok(0) => return Ok(done),
                    Ok(k) => done += k,
                    Err(rustix::io::Errno::INTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Step::Write { offset, segs } => {
            let mut done = 0usize;
            loop {
                let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(segs.len());
                let mut skip = done;
                for s in &segs {
                    if skip >= s.len() {
                        skip -= s.len();
                        continue;
                    }
                    slices.push(IoSlice::new(&s[skip..]));
                    skip = 0;
                }
                if slices.is_empty() {
                    return Ok(done);
                }
                match rustix::io::pwritev(file, &slices, offset + done as u64) {
                    Ok(0) => return Ok(done),
                    Ok(k) => done += k,
                    Err(rustix::io::Errno::INTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
}

/// Whether `bytes` can be the memory of an I/O on a file opened `direct`ly (`O_DIRECT`):
/// page-aligned address and length. Any memory can, on a buffered file.
pub(crate) fn direct_ok(direct: bool, bytes: &[u8]) -> bool {
    !direct || ((bytes.as_ptr() as usize).is_multiple_of(PAGE) && bytes.len().is_multiple_of(PAGE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_fault_keeps_the_first_pages_across_segments() {
        let (mut a, mut b) = (vec![0u8; 2 * PAGE], vec![0u8; PAGE]);
        let step = Step::Read {
            offset: 0,
            segs: vec![&mut a[..], &mut b[..]],
        };
        let short = step.with_fault(Some(IoFault::Short { bytes: PAGE + 100 }));
        assert_eq!(short.len(), PAGE);
        let step = Step::Write {
            offset: 0,
            segs: vec![&a[..PAGE], &b[..]],
        };
        assert_eq!(
            step.with_fault(Some(IoFault::Short { bytes: 3 * PAGE }))
                .len(),
            2 * PAGE
        );
        let failed = Step::Write {
            offset: 0,
            segs: vec![&b[..]],
        }
        .with_fault(Some(IoFault::NoSpace));
        assert!(
            matches!(failed, Step::Done(Err(e)) if e.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error()))
        );
    }

    #[test]
    fn direct_io_needs_page_aligned_memory() {
        let mut buf = AlignedBuf::new(2 * PAGE).unwrap();
        let s = buf.as_mut_slice();
        assert!(direct_ok(true, s));
        assert!(!direct_ok(true, &s[1..PAGE + 1]));
        assert!(!direct_ok(true, &s[..PAGE - 1]));
        assert!(direct_ok(false, &s[1..7]));
    }

    #[test]
    fn vectored_io_round_trips_through_several_segments() {
        let path = std::env::temp_dir().join(format!("kvbm-io-unit-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let a: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        let b = vec![7u8; 300];
        let wrote = blocking_io(
            &file,
            Step::Write {
                offset: 10,
                segs: vec![&a, &b],
            },
        )
        .unwrap();
        assert_eq!(wrote, 5300);
        let (mut x, mut y) = (vec![0u8; 5000], vec![0u8; 400]);
        let read = blocking_io(
            &file,
            Step::Read {
                offset: 10,
                segs: vec![&mut x, &mut y],
            },
        )
        .unwrap();
        assert_eq!(read, 5300, "short only at the end of the file");
        assert_eq!((x, &y[..300]), (a, &b[..]));
        drop(file);
        let _ = std::fs::remove_file(path);
    }
}
