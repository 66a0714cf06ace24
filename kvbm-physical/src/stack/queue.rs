//! The job queue: four lanes served by a fixed pool of worker threads, in priority order
//! onboard (a request waits for it) > reclaim (an allocation will need it) > offload (G1 →
//! G2: it holds G1 slots until its copy lands) > store (G2 → store tiers: it holds only G2
//! slots, and a slow store must not keep G1 slots from coming back). The offload and store
//! lanes are each bounded in blocks: a job that does not fit is handed back to be counted
//! as skipped, never waited for.
//!
//! Waking a parked worker is a `futex` call that costs the waker several microseconds (on a
//! virtual machine an inter-processor interrupt: 4–5 µs of CPU time at the median, 10–17 at
//! the 99th percentile, measured on the 2-core CI machine), so the scheduler should not pay
//! it per request. A worker that runs out of jobs therefore *lingers* for a while (the
//! builder's `worker_linger`) before it parks: it polls the queue every [`POLL`]. A job
//! pushed while a worker lingers is left for it to find, with no wake; only a job pushed
//! while every idle worker is parked wakes one. A worker that takes a job while more wait
//! and nobody lingers wakes the next one itself. At most one worker lingers at a time.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

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
    /// G1 → G2 offloads (they hold G1 slots until their copies land).
    offload: VecDeque<Job>,
    /// G2 → store-tier copies (they hold only G2 slots).
    store: VecDeque<Job>,
    /// Blocks held by queued G1 → G2 offloads (G1 slots).
    offload_blocks: usize,
    /// Blocks held by queued store jobs (G2 slots).
    store_blocks: usize,
    running: usize,
    /// Workers parked until woken.
    sleeping: usize,
    /// Workers polling the queue (at most one).
    lingering: usize,
    /// Wakes paid by pushing threads (for tests).
    wakes: u64,
    shutdown: bool,
}

impl Lanes {
    fn queued(&self) -> bool {
        !self.onboard.is_empty()
            || self.reclaim
            || !self.offload.is_empty()
            || !self.store.is_empty()
    }

    fn idle(&self) -> bool {
        !self.queued() && self.running == 0
    }

    /// The next job in priority order.
    fn take(&mut self) -> Option<Job> {
        if let Some(j) = self.onboard.pop_front() {
            Some(Job::Onboard(j))
        } else if self.reclaim {
            self.reclaim = false;
            Some(Job::Reclaim)
        } else if let Some(j) = self.offload.pop_front() {
            self.offload_blocks -= j.blocks();
            Some(j)
        } else if let Some(j) = self.store.pop_front() {
            self.store_blocks -= j.blocks();
            Some(j)
        } else {
            None
        }
    }
}

/// How often a lingering worker looks at the queue (plus the kernel's timer slack, 50 µs by
/// default): about the most a job pushed without a wake waits before a worker takes it.
pub const POLL: Duration = Duration::from_micros(50);

/// The queue; see the module docs.
pub(crate) struct JobQueue {
    lanes: Mutex<Lanes>,
    work: Condvar,
    idle: Condvar,
    max_blocks: usize,
    linger: Duration,
}

impl JobQueue {
    /// A queue bounding the offload lane at `max_blocks`, whose idle workers linger for
    /// `linger` before they park (`Duration::ZERO`: park at once; every push then wakes).
    pub(crate) fn new(max_blocks: usize, linger: Duration) -> Self {
        Self {
            lanes: Mutex::new(Lanes::default()),
            work: Condvar::new(),
            idle: Condvar::new(),
            max_blocks,
            linger,
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
        {
            let l = &mut *lanes;
            let (queue, held) = match job {
                Job::Store(_) => (&mut l.store, &mut l.store_blocks),
                _ => (&mut l.offload, &mut l.offload_blocks),
            };
            if *held + n > self.max_blocks {
                return Err((job, false));
            }
            *held += n;
            queue.push_back(job);
        }
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

    /// After a push: wakes one parked worker, after releasing the lock, unless a worker
    /// lingers (it will find the job within [`POLL`]).
    fn wake(&self, mut lanes: parking_lot::MutexGuard<'_, Lanes>) {
        let wake = lanes.sleeping > 0 && lanes.lingering == 0;
        if wake {
            lanes.wakes += 1;
        }
        drop(lanes);
        if wake {
            self.work.notify_one();
        }
    }

    /// The next job, waiting for one; `None` once shutting down. With nothing queued the
    /// worker lingers (polls) for the queue's linger time, unless another worker already
    /// does, then parks until woken.
    pub(crate) fn pop(&self) -> Option<Job> {
        let mut lanes = self.lanes.lock();
        let mut idle_since: Option<Instant> = None;
        loop {
            if lanes.shutdown {
                return None;
            }
            if let Some(job) = lanes.take() {
                lanes.running += 1;
                // More waiting and nobody to find it: wake a parked worker (this worker
                // pays the wake, not the thread that pushed).
                let chain = lanes.queued() && lanes.lingering == 0 && lanes.sleeping > 0;
                drop(lanes);
                if chain {
                    self.work.notify_one();
                }
                return Some(job);
            }
            let linger_left = if lanes.lingering == 0 && !self.linger.is_zero() {
                let since = *idle_since.get_or_insert_with(Instant::now);
                since.elapsed() < self.linger
            } else {
                false
            };
            if linger_left {
                lanes.lingering += 1;
                self.work.wait_for(&mut lanes, POLL);
                lanes.lingering -= 1;
            } else {
                lanes.sleeping += 1;
                self.work.wait(&mut lanes);
                lanes.sleeping -= 1;
                // Woken for a job: a fresh linger once it is done.
                idle_since = None;
            }
        }
    }

    /// Wakes paid by pushing threads so far (for tests).
    #[cfg(test)]
    pub(crate) fn wakes(&self) -> u64 {
        self.lanes.lock().wakes
    }

    /// Workers lingering and parked now (for tests).
    #[cfg(test)]
    fn waiting(&self) -> (usize, usize) {
        let lanes = self.lanes.lock();
        (lanes.lingering, lanes.sleeping)
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
        left.extend(lanes.store.drain(..));
        lanes.offload_blocks = 0;
        lanes.store_blocks = 0;
        lanes.reclaim = false;
        drop(lanes);
        self.work.notify_all();
        self.idle.notify_all();
        left
    }

    pub(crate) fn depth(&self) -> QueueDepth {
        let lanes = self.lanes.lock();
        QueueDepth {
            jobs: lanes.onboard.len()
                + lanes.offload.len()
                + lanes.store.len()
                + usize::from(lanes.reclaim),
            blocks: lanes.offload_blocks + lanes.store_blocks,
            running: lanes.running,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A queue served by `workers` threads that count the jobs they ran.
    fn served(
        linger: Duration,
        workers: usize,
    ) -> (
        Arc<JobQueue>,
        Arc<AtomicUsize>,
        Vec<std::thread::JoinHandle<()>>,
    ) {
        let queue = Arc::new(JobQueue::new(16, linger));
        let ran = Arc::new(AtomicUsize::new(0));
        let threads = (0..workers)
            .map(|_| {
                let (q, r) = (Arc::clone(&queue), Arc::clone(&ran));
                std::thread::spawn(move || {
                    while let Some(job) = q.pop() {
                        drop(job);
                        r.fetch_add(1, Ordering::SeqCst);
                        q.done();
                    }
                })
            })
            .collect();
        (queue, ran, threads)
    }

    fn until(what: impl Fn() -> bool) {
        let start = Instant::now();
        while !what() {
            assert!(start.elapsed() < Duration::from_secs(20), "timed out");
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn stop(queue: &JobQueue, threads: Vec<std::thread::JoinHandle<()>>) {
        assert!(queue.shutdown().is_empty());
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn jobs_pushed_while_a_worker_lingers_cost_the_pusher_no_wake() {
        let (queue, ran, threads) = served(Duration::from_secs(60), 2);
        for n in 1..=20 {
            // One worker lingers, the other is parked.
            until(|| queue.waiting() == (1, 1));
            assert!(queue.request_reclaim());
            until(|| ran.load(Ordering::SeqCst) == n);
        }
        assert_eq!(queue.wakes(), 0);
        stop(&queue, threads); // shutdown reaches the lingering worker too
    }

    #[test]
    fn without_linger_every_push_to_parked_workers_wakes_one() {
        let (queue, ran, threads) = served(Duration::ZERO, 1);
        for n in 1..=5 {
            until(|| queue.waiting() == (0, 1));
            assert!(queue.request_reclaim());
            until(|| ran.load(Ordering::SeqCst) == n);
            assert_eq!(queue.wakes(), n as u64);
        }
        stop(&queue, threads);
    }

    #[test]
    fn a_worker_parks_once_its_linger_is_over_and_is_woken_again() {
        let (queue, ran, threads) = served(Duration::from_millis(5), 1);
        until(|| queue.waiting() == (0, 1));
        assert!(queue.request_reclaim());
        until(|| ran.load(Ordering::SeqCst) == 1);
        assert_eq!(queue.wakes(), 1);
        // After the job it lingers again, then parks.
        until(|| queue.waiting() == (0, 1));
        assert!(queue.request_reclaim());
        until(|| ran.load(Ordering::SeqCst) == 2);
        assert_eq!(queue.wakes(), 2);
        stop(&queue, threads);
    }

    #[test]
    fn store_jobs_have_their_own_bound_and_go_after_offloads() {
        use super::super::core::EngineSync;
        use super::super::offload::{Held, OffloadItem};
        use kvbm_logical::{BlockManager, Device, Host, SequenceHash};
        let g1 = BlockManager::<Device>::builder()
            .block_count(8)
            .block_size(4)
            .build()
            .unwrap();
        let g2 = BlockManager::<Host>::builder()
            .block_count(8)
            .block_size(4)
            .build()
            .unwrap();
        let offload = |n: usize| {
            let items = g1
                .allocate_blocks(n)
                .unwrap()
                .into_iter()
                .map(|b| OffloadItem {
                    hash: SequenceHash::new(u64::from(b.block_id().get()) + 1),
                    parent: None,
                    held: Held::Evicted(b),
                })
                .collect();
            Job::Offload(OffloadJob {
                items,
                sync: EngineSync::Ready,
            })
        };
        let store = |n: usize, base: u64| {
            let staged = g2
                .allocate_blocks(n)
                .unwrap()
                .into_iter()
                .zip(base..)
                .map(|(b, h)| b.stage(SequenceHash::new(h), 4).unwrap())
                .collect();
            let blocks = g2
                .register_blocks(staged)
                .unwrap()
                .into_iter()
                .map(|b| (b, None))
                .collect();
            Job::Store(StoreJob {
                blocks,
                exclude: None,
            })
        };
        let queue = JobQueue::new(4, Duration::ZERO);
        assert!(queue.push_offload(store(4, 100)).is_ok());
        // The store lane is full; the offload lane is not: a slow store tier never makes
        // G1 → G2 offloads (which hold G1 slots) be skipped.
        assert!(matches!(queue.push_offload(store(1, 200)), Err((_, false))));
        assert!(queue.push_offload(offload(4)).is_ok());
        assert!(matches!(queue.push_offload(offload(1)), Err((_, false))));
        assert_eq!(queue.depth().blocks, 8);
        // Offloads first: they give G1 slots back.
        let mut lanes = queue.lanes.lock();
        assert!(matches!(lanes.take(), Some(Job::Offload(_))));
        assert!(matches!(lanes.take(), Some(Job::Store(_))));
        assert!(lanes.take().is_none());
        assert_eq!((lanes.offload_blocks, lanes.store_blocks), (0, 0));
    }

    #[test]
    fn a_worker_taking_a_job_while_more_wait_wakes_the_next_itself() {
        let queue = Arc::new(JobQueue::new(16, Duration::ZERO));
        // Each worker holds its job until the other has one: only a worker woken by the
        // first one can get past the barrier.
        let both = Arc::new(std::sync::Barrier::new(2));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (q, b) = (Arc::clone(&queue), Arc::clone(&both));
                std::thread::spawn(move || {
                    while let Some(job) = q.pop() {
                        b.wait();
                        drop(job);
                        q.done();
                    }
                })
            })
            .collect();
        until(|| queue.waiting() == (0, 2));
        {
            // Two jobs pushed under one lock hold: the pusher wakes one worker.
            let mut lanes = queue.lanes.lock();
            lanes.reclaim = true;
            lanes.offload.push_back(Job::Reclaim);
            queue.wake(lanes);
        }
        until(|| queue.lanes.lock().idle());
        assert_eq!(queue.wakes(), 1);
        stop(&queue, threads);
    }
}
