//! The `io_uring` back end: each call submits from its own thread on a ring taken from a
//! pool, keeping up to `depth` reads or writes in flight, and reaps completions as they
//! come. No extra threads; the kernel does the I/O.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use io_uring::{IoUring, opcode, types};
use parking_lot::Mutex;

use super::{IoKind, IoReq, Pipeline, Prepared, blocking_io};
use crate::disk::buf::AlignedBuf;

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

    pub(crate) fn drive(
        &self,
        file: &Arc<File>,
        free: &mut Vec<AlignedBuf>,
        n: usize,
        p: &mut dyn Pipeline,
    ) {
        let taken = self.rings.lock().pop();
        let ring = match taken.map_or_else(|| ring(self.depth), Ok) {
            Ok(ring) => ring,
            Err(_) => return sequential(file, free, n, p),
        };
        let count = free.len();
        let mut flight = Flight {
            ring: Some(ring),
            bufs: std::mem::take(free),
            busy: (0..count).map(|_| None).collect(),
            in_flight: 0,
        };
        let mut idle: Vec<usize> = (0..count).collect();
        let fd = types::Fd(file.as_raw_fd());
        let mut next = 0;
        let failed = loop {
            while next < n {
                let Some(k) = idle.pop() else { break };
                let i = next;
                next += 1;
                match p.prepare(i, &mut flight.bufs[k]) {
                    Prepared::Done(result) => {
                        p.complete(i, flight.bufs[k].as_slice(), result, None);
                        idle.push(k);
                    }
                    Prepared::Submit(req) => {
                        let len = req.len.min(flight.bufs[k].len());
                        let Ok(len32) = u32::try_from(len) else {
                            let result = blocking_io(file, &mut flight.bufs[k], req);
                            let sum = req.digest(&flight.bufs[k], &result);
                            p.complete(i, flight.bufs[k].as_slice(), result, sum);
                            idle.push(k);
                            continue;
                        };
                        let ptr = flight.bufs[k].as_mut_slice().as_mut_ptr();
                        let entry = match req.kind {
                            IoKind::Read => {
                                opcode::Read::new(fd, ptr, len32).offset(req.offset).build()
                            }
                            IoKind::Write => opcode::Write::new(fd, ptr.cast_const(), len32)
                                .offset(req.offset)
                                .build(),
                        }
                        .user_data(k as u64);
                        let Some(ring) = flight.ring.as_mut() else {
                            break;
                        };
                        // SAFETY: the entry points into `flight.bufs[k]`, whose heap block
                        // stays allocated and untouched by us until its completion is reaped:
                        // `flight` waits for every in-flight entry before it frees the
                        // buffers, and leaks them if it cannot (see `Flight::drop`). The file
                        // descriptor outlives the call (the caller holds `file`).
                        let pushed = unsafe { ring.submission().push(&entry) };
                        if pushed.is_err() {
                            // The queue holds `depth` entries and at most `depth` are ever
                            // queued, so this does not happen; do it here if it does.
                            let result = blocking_io(file, &mut flight.bufs[k], req);
                            let sum = req.digest(&flight.bufs[k], &result);
                            p.complete(i, flight.bufs[k].as_slice(), result, sum);
                            idle.push(k);
                            continue;
                        }
                        flight.busy[k] = Some((i, req));
                        flight.in_flight += 1;
                    }
                }
            }
            if flight.in_flight == 0 {
                break None;
            }
            if let Err(e) = flight.wait_one() {
                break Some(e);
            }
            let Some(ring) = flight.ring.as_mut() else {
                break None;
            };
            let done: Vec<(usize, i32)> = ring
                .completion()
                .map(|cqe| (cqe.user_data() as usize, cqe.result()))
                .collect();
            for (k, res) in done {
                let Some((i, req)) = flight.busy.get_mut(k).and_then(Option::take) else {
                    continue;
                };
                flight.in_flight -= 1;
                let result = match usize::try_from(res) {
                    Ok(got) if got >= req.len || got == 0 => Ok(got),
                    // Short: finish it the plain way (a short count then means the file
                    // really ends there).
                    Ok(_) => blocking_io(file, &mut flight.bufs[k], req),
                    Err(_) => Err(io::Error::from_raw_os_error(-res)),
                };
                let sum = req.digest(&flight.bufs[k], &result);
                p.complete(i, flight.bufs[k].as_slice(), result, sum);
                idle.push(k);
            }
        };
        if let Some(e) = failed {
            // The ring is unusable: fail what is in flight (its buffers are leaked by
            // `flight`'s drop, as the kernel may still write them) and what is left.
            for (i, _) in flight.busy.iter().flatten() {
                p.complete(*i, &[], Err(io::Error::new(e.kind(), e.to_string())), None);
            }
            for i in next..n {
                p.complete(i, &[], Err(io::Error::new(e.kind(), e.to_string())), None);
            }
            return;
        }
        // Nothing in flight: the ring and the buffers go back.
        if let Some(ring) = flight.ring.take() {
            self.rings.lock().push(ring);
        }
        *free = std::mem::take(&mut flight.bufs);
    }
}

/// Without a ring: one operation at a time on this thread.
fn sequential(file: &File, free: &mut [AlignedBuf], n: usize, p: &mut dyn Pipeline) {
    let Some(buf) = free.first_mut() else {
        return;
    };
    for i in 0..n {
        let (result, sum) = match p.prepare(i, buf) {
            Prepared::Done(result) => (result, None),
            Prepared::Submit(req) => {
                let result = blocking_io(file, buf, req);
                let sum = req.digest(buf, &result);
                (result, sum)
            }
        };
        p.complete(i, buf.as_slice(), result, sum);
    }
}

/// A call's ring and buffers while I/O is in flight.
struct Flight {
    ring: Option<IoUring>,
    bufs: Vec<AlignedBuf>,
    /// Per buffer: the operation in flight on it.
    busy: Vec<Option<(usize, IoReq)>>,
    in_flight: usize,
}

impl Flight {
    fn wait_one(&mut self) -> io::Result<()> {
        let Some(ring) = self.ring.as_mut() else {
            return Err(io::Error::other("no ring"));
        };
        loop {
            match ring.submit_and_wait(1) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::BUSY.raw_os_error()) => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        if self.in_flight == 0 {
            return;
        }
        // Unwinding or a broken ring with I/O in flight: wait for it, and if that fails,
        // leak the ring and the buffers rather than free memory the kernel may still write.
        while self.in_flight > 0 {
            if self.wait_one().is_err() {
                break;
            }
            if let Some(ring) = self.ring.as_mut() {
                let reaped = ring.completion().count();
                self.in_flight = self.in_flight.saturating_sub(reaped);
            }
        }
        if self.in_flight > 0 {
            std::mem::forget(self.ring.take());
            std::mem::forget(std::mem::take(&mut self.bufs));
        }
    }
}
