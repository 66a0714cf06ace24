//! The `io_uring` back end: each call prepares and finishes its operations on its own
//! thread, on a ring taken from a pool, keeping up to `depth` vectored reads or writes in
//! flight (`IORING_OP_READV`/`WRITEV`) and reaping completions as they come. No extra
//! threads; the kernel does the I/O.
//!
//! The kernel may be reading or writing the caller's block buffers, so a call never returns
//! (nor unwinds) while one of its I/Os is in flight: [`Flight`]'s drop waits for every
//! submitted I/O, by `io_uring_enter` or, should that fail, by polling the completion queue.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use io_uring::{IoUring, opcode, squeue, types};
use parking_lot::Mutex;

use super::{Ops, Scratch, Step, run_one};
use crate::disk::buf::BufPool;

/// At most this many segments per I/O (the engine uses up to two).
const MAX_SEGS: usize = 4;

/// Rings kept between calls (one per concurrent caller).
pub(crate) struct UringPool {
    depth: usize,
    rings: Mutex<Vec<IoUring>>,
}

impl std::fmt::Debug for UringPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringPool")
            .field("depth", &self.depth)
            .finish()
    }
}

fn ring(depth: usize) -> io::Result<IoUring> {
    let entries = u32::try_from(depth.next_power_of_two()).unwrap_or(1 << 12);
    IoUring::new(entries)
}

/// One segment as the kernel sees it: `struct iovec` (a pointer and a length).
#[derive(Clone, Copy)]
#[repr(C)]
struct RawIovec {
    base: *mut u8,
    len: usize,
}

impl RawIovec {
    const EMPTY: Self = Self {
        base: std::ptr::null_mut(),
        len: 0,
    };
}

/// An I/O as the kernel sees it.
struct RawIo {
    iov: [RawIovec; MAX_SEGS],
    segs: usize,
    write: bool,
    offset: u64,
    want: usize,
}

impl RawIo {
    /// The I/O of `step` as raw segments. The borrows of `step` end here; the memory they
    /// point to stays untouched until the I/O completes: the caller's buffers are borrowed
    /// for the whole call, and the scratch buffers belong to the operation's slot.
    fn of(step: Step<'_>) -> Self {
        let mut raw = RawIo {
            iov: [RawIovec::EMPTY; MAX_SEGS],
            segs: 0,
            write: false,
            offset: 0,
            want: 0,
        };
        let push = |raw: &mut RawIo, base: *mut u8, len: usize| {
            if len > 0 && raw.segs < MAX_SEGS {
                raw.iov[raw.segs] = RawIovec { base, len };
                raw.segs += 1;
                raw.want += len;
            }
        };
        match step {
            Step::Read { offset, segs } => {
                raw.offset = offset;
                for s in segs {
                    push(&mut raw, s.as_mut_ptr(), s.len());
                }
            }
            Step::Write { offset, segs } => {
                raw.write = true;
                raw.offset = offset;
                for s in segs {
                    push(&mut raw, s.as_ptr().cast_mut(), s.len());
                }
            }
            Step::Done(_) => {}
        }
        raw
    }
}

/// An operation slot of a call: the task in flight on it, its scratch memory, and the
/// segments and progress of its I/O.
struct Slot<'p, T> {
    task: Option<(usize, T)>,
    scratch: Scratch<'p>,
    /// The I/O's segments.
    iov: [RawIovec; MAX_SEGS],
    segs: usize,
    /// What is left of them (after a short completion): what the entry in flight points at.
    left: [RawIovec; MAX_SEGS],
    write: bool,
    offset: u64,
    want: usize,
    done: usize,
}

impl<T> Slot<'_, T> {
    fn new(scratch: Scratch<'_>) -> Slot<'_, T> {
        Slot {
            task: None,
            scratch,
            iov: [RawIovec::EMPTY; MAX_SEGS],
            segs: 0,
            left: [RawIovec::EMPTY; MAX_SEGS],
            write: false,
            offset: 0,
            want: 0,
            done: 0,
        }
    }

    /// Takes the I/O `raw` (see [`RawIo::of`]).
    fn load(&mut self, raw: RawIo) {
        self.iov = raw.iov;
        self.segs = raw.segs;
        self.write = raw.write;
        self.offset = raw.offset;
        self.want = raw.want;
        self.done = 0;
    }

    /// The entry for what is left of the I/O (`done < want`).
    fn entry(&mut self, fd: types::Fd, k: usize) -> squeue::Entry {
        let mut skip = self.done;
        let mut n = 0;
        for v in &self.iov[..self.segs] {
            if skip >= v.len {
                skip -= v.len;
                continue;
            }
            self.left[n] = RawIovec {
                base: v.base.wrapping_add(skip),
                len: v.len - skip,
            };
            skip = 0;
            n += 1;
        }
        let iov = self.left.as_ptr();
        let offset = self.offset + self.done as u64;
        let entry = if self.write {
            opcode::Writev::new(fd, iov.cast(), n as u32)
                .offset(offset)
                .build()
        } else {
            opcode::Readv::new(fd, iov.cast(), n as u32)
                .offset(offset)
                .build()
        };
        entry.user_data(k as u64)
    }
}

impl UringPool {
    /// Fails if the kernel (or a sandbox) refuses `io_uring_setup`.
    pub(crate) fn new(depth: usize) -> io::Result<Self> {
        let depth = depth.clamp(1, 4096);
        let first = ring(depth)?;
        Ok(Self {
            depth,
            rings: Mutex::new(vec![first]),
        })
    }

    pub(crate) fn depth(&self) -> usize {
        self.depth
    }

    /// Runs every task; results in task order.
    pub(crate) fn run<O: Ops>(
        &self,
        file: &File,
        bufs: &BufPool,
        ops: &O,
        tasks: Vec<O::Task>,
    ) -> Vec<O::Out> {
        let taken = self.rings.lock().pop();
        let Ok(ring) = taken.map_or_else(|| ring(self.depth), Ok) else {
            // No ring to be had: one operation at a time on this thread.
            let mut scratch = Scratch::new(bufs);
            return tasks
                .into_iter()
                .map(|t| run_one(file, ops, t, &mut scratch))
                .collect();
        };
        let n = tasks.len();
        let mut results: Vec<Option<O::Out>> = std::iter::repeat_with(|| None).take(n).collect();
        let mut flight = Flight {
            ring: Some(ring),
            slots: (0..self.depth.min(n))
                .map(|_| Slot::new(Scratch::new(bufs)))
                .collect(),
            pushed: 0,
            completed: 0,
            broken: false,
        };
        let fd = types::Fd(file.as_raw_fd());
        let mut tasks = tasks.into_iter().enumerate();
        let mut idle: Vec<usize> = (0..flight.slots.len()).rev().collect();
        let mut more = true;
        // Finishes slot `k`'s operation and frees the slot.
        let mut finish = |flight: &mut Flight<'_, O::Task>, k: usize, result: io::Result<usize>| {
            let slot = &mut flight.slots[k];
            if let Some((i, task)) = slot.task.take() {
                results[i] = Some(ops.finish(task, &slot.scratch, result));
            }
        };
        while !flight.broken {
            // Start an operation on every idle slot.
            while more && let Some(k) = idle.pop() {
                let Some((i, task)) = tasks.next() else {
                    idle.push(k);
                    more = false;
                    break;
                };
                let slot = &mut flight.slots[k];
                let (_, task) = slot.task.insert((i, task));
                match ops.prepare(task, &mut slot.scratch) {
                    Step::Done(result) => {
                        finish(&mut flight, k, result);
                        idle.push(k);
                    }
                    step => {
                        let raw = RawIo::of(step);
                        slot.load(raw);
                        if slot.want == 0 {
                            finish(&mut flight, k, Ok(0));
                            idle.push(k);
                        } else if !flight.push(fd, k) {
                            // The queue holds as many entries as there are slots, so this does
                            // not happen; fail the operation if it does.
                            let e = io::Error::other("io_uring submission queue full");
                            finish(&mut flight, k, Err(e));
                            idle.push(k);
                        }
                    }
                }
            }
            if flight.pushed == flight.completed {
                break; // nothing in flight and nothing left to start
            }
            flight.wait();
            for (k, res) in flight.reap() {
                if k >= flight.slots.len() {
                    continue;
                }
                let result = match usize::try_from(res) {
                    Err(_) => Err(io::Error::from_raw_os_error(-res)),
                    // The end of the file: short.
                    Ok(0) => Ok(flight.slots[k].done),
                    Ok(got) => {
                        let slot = &mut flight.slots[k];
                        slot.done += got;
                        // Short: submit the rest (a short count then means the file ends).
                        if slot.done < slot.want && !flight.broken && flight.push(fd, k) {
                            continue;
                        }
                        Ok(flight.slots[k].done)
                    }
                };
                finish(&mut flight, k, result);
                idle.push(k);
            }
        }
        if flight.broken {
            // The ring failed: what was submitted has completed (`wait` made sure); the
            // operations still holding a slot, and those never started, fail.
            for k in 0..flight.slots.len() {
                finish(&mut flight, k, Err(io::Error::other("io_uring failed")));
            }
        } else if let Some(ring) = flight.take_ring() {
            self.rings.lock().push(ring);
        }
        drop(flight);
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| ops.abandoned()))
            .collect()
    }
}

/// A call's ring and operation slots while I/O is in flight.
struct Flight<'p, T> {
    ring: Option<IoUring>,
    slots: Vec<Slot<'p, T>>,
    /// Entries pushed, and completions reaped, so far.
    pushed: usize,
    completed: usize,
    /// `io_uring_enter` failed: nothing more is submitted, and what was has completed.
    broken: bool,
}

impl<T> Flight<'_, T> {
    /// Pushes what is left of slot `k`'s I/O; false if the queue is full.
    fn push(&mut self, fd: types::Fd, k: usize) -> bool {
        let entry = self.slots[k].entry(fd, k);
        let Some(ring) = self.ring.as_mut() else {
            return false;
        };
        // SAFETY: the entry points at `self.slots[k].left` (the `slots` vector is never
        // resized while the call runs, and a slot has one entry in flight at a time) and
        // through it at memory that stays allocated and untouched until the completion is
        // reaped: the caller's block buffers, borrowed for the whole call, and the slot's
        // scratch buffers, dropped only with `self`, whose drop first waits for every
        // submitted entry. The file descriptor outlives the call (the caller holds the file).
        let pushed = unsafe { ring.submission().push(&entry) };
        if pushed.is_ok() {
            self.pushed += 1;
        }
        pushed.is_ok()
    }

    /// The completions posted so far: (slot, result).
    fn reap(&mut self) -> Vec<(usize, i32)> {
        let Some(ring) = self.ring.as_mut() else {
            return Vec::new();
        };
        let done: Vec<(usize, i32)> = ring
            .completion()
            .map(|cqe| (cqe.user_data() as usize, cqe.result()))
            .collect();
        self.completed += done.len();
        done
    }

    /// Submits what was pushed and waits for at least one completion. If the ring fails,
    /// marks it broken and waits for every submitted I/O by polling.
    fn wait(&mut self) {
        let Some(ring) = self.ring.as_mut() else {
            return;
        };
        loop {
            match ring.submit_and_wait(1) {
                Ok(_) => return,
                Err(e)
                    if e.kind() == io::ErrorKind::Interrupted
                        || e.raw_os_error() == Some(rustix::io::Errno::BUSY.raw_os_error())
                        || e.raw_os_error() == Some(rustix::io::Errno::AGAIN.raw_os_error()) => {}
                Err(e) => {
                    tracing::error!(error = %e, "io_uring_enter failed; the disk tier drains its ring and drops it");
                    self.broken = true;
                    self.drain_by_polling();
                    return;
                }
            }
        }
    }

    /// Waits, without `io_uring_enter`, for every submitted entry to complete (the kernel
    /// posts completions by itself). Entries still in the submission queue never reach the
    /// kernel: the ring is dropped, not reused.
    fn drain_by_polling(&mut self) {
        let Some(ring) = self.ring.as_mut() else {
            return;
        };
        let unsubmitted = ring.submission().len();
        let submitted = self.pushed.saturating_sub(unsubmitted);
        let mut reaped = 0;
        // Completions of this call already reaped are in `completed`; the broken call reaps
        // no more results from them (its operations fail).
        while self.completed + reaped < submitted {
            let now = ring.completion().count();
            reaped += now;
            if now == 0 {
                std::thread::yield_now();
            }
        }
        self.completed = self.pushed;
    }

    /// The ring, if it is clean (nothing in flight, not broken), for reuse.
    fn take_ring(&mut self) -> Option<IoUring> {
        if self.broken || self.pushed != self.completed {
            return None;
        }
        self.ring.take()
    }
}

impl<T> Drop for Flight<'_, T> {
    /// Unwinding (a bug) with I/O in flight: wait for it before the memory it uses goes.
    fn drop(&mut self) {
        while self.completed < self.pushed && !self.broken && self.ring.is_some() {
            self.wait();
            let _ = self.reap();
        }
    }
}
