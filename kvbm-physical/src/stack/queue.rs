//! The job queue: three lanes served by a fixed pool of worker threads, in priority order
//! onboard (a request waits for it) > reclaim (an allocation will need it) > offload. The
//! offload lane is bounded in blocks: a job that does not fit is handed back to be counted
//! as skipped, never waited for.

use std::collections::VecDeque;

use parking_lot::{Condvar, Mutex};

use super::offload::{OffloadJob, StoreJob};
use super::onboard::OnboardJob;
use super::stats::QueueDepth;

/// One unit of work for a worker.
pub(crate) enum Job {
    /// Copy G1 blocks to G2 (write-through, or blocks a reclaim evicted).
    Offload(OffloadJob),
    /// Write-back: evict the coldest G1 blocks into G2 until the high watermark.
    Reclaim,
    /// Put G2 blocks into the store tiers.
    Store(StoreJob),
    /// Bring a plan's blocks into G1.
    Onboard(OnboardJob),
}

impl Job {
    /// Blocks the job holds while queued (the offload lane's unit).
    fn blocks(&self) -> usize {
        match self {
            Job::Offload(j) => j.len(),
            Job::Store(j) => j.len(),
            Job::Reclaim | Job::Onboard(_) => 0,
        }
    }
}

#[derive(Default)]
struct Lanes {
    onboard: VecDeque<OnboardJob>,
    reclaim: bool,
    offload: VecDeque<Job>,
    queued_blocks: usize,
    running: usize,
    /// Workers waiting for a job: a push wakes one only if some are (a futex wake on the
    /// scheduler's thread costs microseconds, more when it preempts the scheduler).
    sleeping: usize,
    shutdown: bool,
}

impl Lanes {
    fn idle(&self) -> bool {
        self.onboard.is_empty() && !self.reclaim && self.offload.is_empty() && self.running == 0
    }
}

/// The queue; see the module docs.
pub(crate) struct JobQueue {
    lanes: Mutex<Lanes>,
    work: Condvar,
    idle: Condvar,
    max_blocks: usize,
}

impl JobQueue {
    pub(crate) fn new(max_blocks: usize) -> Self {
        Self {
            lanes: Mutex::new(Lanes::default()),
            work: Condvar::new(),
            idle: Condvar::new(),
            max_blocks,
        }
    }

    /// Queues an offload or store job; hands it back when the lane is full (counted by
    /// `blocks`) or the stack is shutting down (`Err(true)` then).
    pub(crate) fn push_offload(&self, job: Job) -> Result<(), (Job, bool)> {
        let n = job.blocks();
        let mut lanes = self.lanes.lock();
        if lanes.shutdown {
            return Err((job, true));
        }
        if lanes.queued_blocks + n > self.max_blocks {
            return Err((job, false));
        }
        lanes.queued_blocks += n;
        lanes.offload.push_back(job);
        self.wake(lanes);
        Ok(())
    }

    /// Queues an onboard job (unbounded: each holds the G1 blocks it fills, so G1 bounds
    /// them); hands it back when shutting down.
    pub(crate) fn push_onboard(&self, job: OnboardJob) -> Result<(), OnboardJob> {
        let mut lanes = self.lanes.lock();
        if lanes.shutdown {
            return Err(job);
        }
        lanes.onboard.push_back(job);
        self.wake(lanes);
        Ok(())
    }

    /// Asks for a reclaim run unless one is queued already; returns whether it queued one.
    pub(crate) fn request_reclaim(&self) -> bool {
        let mut lanes = self.lanes.lock();
        if lanes.reclaim || lanes.shutdown {
            return false;
        }
        lanes.reclaim = true;
        self.wake(lanes);
        true
    }

    /// Wakes one sleeping worker, if any, after releasing the lock.
    fn wake(&self, lanes: parking_lot::MutexGuard<'_, Lanes>) {
        let sleeping = lanes.sleeping > 0;
        drop(lanes);
        if sleeping {
            self.work.notify_one();
        }
    }

    /// The next job, waiting for one; `None` once shutting down.
    pub(crate) fn pop(&self) -> Option<Job> {
        let mut lanes = self.lanes.lock();
        loop {
            if lanes.shutdown {
                return None;
            }
            let job = if let Some(j) = lanes.onboard.pop_front() {
                Some(Job::Onboard(j))
            } else if lanes.reclaim {
                lanes.reclaim = false;
                Some(Job::Reclaim)
            } else if let Some(j) = lanes.offload.pop_front() {
                lanes.queued_blocks -= j.blocks();
                Some(j)
            } else {
                None
            };
            if let Some(job) = job {
                lanes.running += 1;
                return Some(job);
            }
            lanes.sleeping += 1;
            self.work.wait(&mut lanes);
            lanes.sleeping -= 1;
        }
    }

    /// A popped job has finished.
    pub(crate) fn done(&self) {
        let mut lanes = self.lanes.lock();
        lanes.running -= 1;
        if lanes.idle() {
            self.idle.notify_all();
        }
    }

    /// Waits until nothing is queued or running.
    pub(crate) fn wait_idle(&self) {
        let mut lanes = self.lanes.lock();
        while !lanes.idle() && !lanes.shutdown {
            self.idle.wait(&mut lanes);
        }
    }

    /// Stops the workers (each finishes its current job) and returns the jobs still queued.
    pub(crate) fn shutdown(&self) -> Vec<Job> {
        let mut lanes = self.lanes.lock();
        lanes.shutdown = true;
        let mut left: Vec<Job> = lanes.onboard.drain(..).map(Job::Onboard).collect();
        left.extend(lanes.offload.drain(..));
        lanes.queued_blocks = 0;
        lanes.reclaim = false;
        drop(lanes);
        self.work.notify_all();
        self.idle.notify_all();
        left
    }

    pub(crate) fn depth(&self) -> QueueDepth {
        let lanes = self.lanes.lock();
        QueueDepth {
            jobs: lanes.onboard.len() + lanes.offload.len() + usize::from(lanes.reclaim),
            blocks: lanes.queued_blocks,
            running: lanes.running,
        }
    }
}
