//! The thread back end: a call with `n` operations runs them on `min(depth, n)` threads
//! (its own and scoped helpers), each taking the next operation and running it start to
//! end (prepare: copy and checksum; `pwritev`/`preadv`; finish: verify and copy out), so
//! checksums and copies run in parallel and nothing is handed between threads per
//! operation. The helpers borrow the caller's buffers safely (`std::thread::scope`) and end
//! with the call; no `unsafe`.

use std::fs::File;

use parking_lot::Mutex;

use super::{Ops, Scratch, run_one};
use crate::disk::buf::BufPool;

/// The thread back end: up to `depth` operations of a call at once.
#[derive(Debug)]
pub(crate) struct ThreadRunner {
    depth: usize,
}

impl ThreadRunner {
    pub(crate) fn new(depth: usize) -> Self {
        Self {
            depth: depth.max(1),
        }
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
        let n = tasks.len();
        let threads = self.depth.min(n);
        let queue = Mutex::new(tasks.into_iter().enumerate());
        let work = || {
            let mut scratch = Scratch::new(bufs);
            let mut done = Vec::new();
            loop {
                let next = queue.lock().next();
                let Some((i, task)) = next else { break };
                done.push((i, run_one(file, ops, task, &mut scratch)));
            }
            done
        };
        let mut results: Vec<Option<O::Out>> = std::iter::repeat_with(|| None).take(n).collect();
        std::thread::scope(|s| {
            // A helper that cannot start leaves its share to the others (the caller's thread
            // always works).
            let helpers: Vec<_> = (1..threads)
                .filter_map(|k| {
                    std::thread::Builder::new()
                        .name(format!("kvbm-disk-io-{k}"))
                        .spawn_scoped(s, work)
                        .ok()
                })
                .collect();
            for (i, out) in work() {
                results[i] = Some(out);
            }
            for helper in helpers {
                // A helper that panicked (a bug) lost the operation it held: it is reported
                // below as failed, never as done.
                if let Ok(done) = helper.join() {
                    for (i, out) in done {
                        results[i] = Some(out);
                    }
                }
            }
        });
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| ops.abandoned()))
            .collect()
    }
}
