//! The thread-pool back end: `depth` threads doing blocking `pread`/`pwrite`, shared by all
//! callers; each call keeps up to `depth` of its operations queued or in flight.

use std::fs::File;
use std::io;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;

use parking_lot::Mutex;

use super::{IoReq, Pipeline, Prepared, blocking_io};
use crate::disk::buf::AlignedBuf;

/// What a worker sends back: the operation, its buffer (`None` if the worker failed) and the
/// result.
type Reply = (usize, Option<AlignedBuf>, io::Result<usize>, Option<u64>);

struct Job {
    i: usize,
    buf: Option<AlignedBuf>,
    req: IoReq,
    file: Arc<File>,
    reply: Option<Sender<Reply>>,
}

impl Job {
    fn finish(mut self, buf: AlignedBuf, result: io::Result<usize>) {
        let sum = self.req.digest(&buf, &result);
        if let Some(reply) = self.reply.take() {
            // The caller waits for every reply, so it is there to receive.
            let _ = reply.send((self.i, Some(buf), result, sum));
        }
    }
}

impl Drop for Job {
    /// A job dropped without an answer (a worker that died) still answers, so the caller
    /// never waits forever.
    fn drop(&mut self) {
        if let Some(reply) = self.reply.take() {
            let err = io::Error::other("the I/O worker failed");
            let _ = reply.send((self.i, self.buf.take(), Err(err), None));
        }
    }
}

/// The thread pool.
pub(crate) struct PsyncPool {
    tx: Option<Sender<Job>>,
    workers: Vec<JoinHandle<()>>,
    depth: usize,
}

impl std::fmt::Debug for PsyncPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PsyncPool")
            .field("depth", &self.depth)
            .finish()
    }
}

impl PsyncPool {
    pub(crate) fn new(depth: usize) -> io::Result<Self> {
        let depth = depth.max(1);
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let mut pool = Self {
            tx: Some(tx),
            workers: Vec::with_capacity(depth),
            depth,
        };
        for n in 0..depth {
            let rx = Arc::clone(&rx);
            let worker = std::thread::Builder::new()
                .name(format!("kvbm-disk-io-{n}"))
                .spawn(move || work(&rx))?;
            pool.workers.push(worker);
        }
        Ok(pool)
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
        let (reply_tx, reply_rx) = mpsc::channel::<Reply>();
        let mut next = 0;
        let mut in_flight = 0usize;
        loop {
            while next < n {
                let Some(mut buf) = free.pop() else { break };
                let i = next;
                next += 1;
                match p.prepare(i, &mut buf) {
                    Prepared::Done(result) => {
                        p.complete(i, buf.as_slice(), result, None);
                        free.push(buf);
                    }
                    Prepared::Submit(req) => {
                        let job = Job {
                            i,
                            buf: Some(buf),
                            req,
                            file: Arc::clone(file),
                            reply: Some(reply_tx.clone()),
                        };
                        match self.tx.as_ref().map(|tx| tx.send(job)) {
                            Some(Ok(())) => in_flight += 1,
                            // No workers: do it on this thread.
                            Some(Err(mpsc::SendError(mut job))) => {
                                job.reply = None;
                                if let Some(mut buf) = job.buf.take() {
                                    let result = blocking_io(file, &mut buf, req);
                                    let sum = req.digest(&buf, &result);
                                    p.complete(i, buf.as_slice(), result, sum);
                                    free.push(buf);
                                }
                            }
                            None => {}
                        }
                    }
                }
            }
            if in_flight == 0 {
                break;
            }
            // Every job answers (see `Job::drop`), so this returns.
            let Ok((i, buf, result, sum)) = reply_rx.recv() else {
                break;
            };
            in_flight -= 1;
            match buf {
                Some(buf) => {
                    p.complete(i, buf.as_slice(), result, sum);
                    free.push(buf);
                }
                None => p.complete(i, &[], result, None),
            }
        }
        // Only if buffers were lost to failed workers: the rest fail.
        for i in next..n {
            p.complete(i, &[], Err(io::Error::other("no I/O buffer left")), None);
        }
    }
}

fn work(rx: &Mutex<Receiver<Job>>) {
    loop {
        let job = rx.lock().recv();
        let Ok(mut job) = job else { return };
        if let Some(mut buf) = job.buf.take() {
            let result = blocking_io(&job.file, &mut buf, job.req);
            job.finish(buf, result);
        }
    }
}

impl Drop for PsyncPool {
    fn drop(&mut self) {
        // Closing the channel ends every worker once the queue is empty.
        self.tx = None;
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}
