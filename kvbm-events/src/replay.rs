//! The replay buffer and the ROUTER socket that serves it.
//!
//! A client sends `[empty, start_seq]` (8 bytes, big-endian; a REQ socket adds the empty
//! delimiter itself) and receives, as vLLM's publisher sends them, `[empty, seq, payload]` for
//! every buffered batch from `start_seq` on, then the end marker `[empty, seq = -1, empty]`.
//! Anything else is counted as malformed and ignored. Replies never block the publisher: each
//! client is served from a cursor, at most [`REPLAY_BUDGET`] messages per loop, and a client
//! whose high-water mark is reached is resumed on a later loop. If a client falls so far behind
//! that its next batch has left the buffer, it continues with the oldest one (the gap in `seq`
//! tells it).

use std::collections::VecDeque;

use crate::stats::Counters;

/// The `seq` frame of the end-of-replay marker: −1 as an 8-byte big-endian signed integer.
pub const END_SEQ: [u8; 8] = (-1i64).to_be_bytes();

/// Replay messages sent per publisher loop, over all clients.
const REPLAY_BUDGET: usize = 256;
/// Requests read per publisher loop.
const REQUESTS_PER_STEP: usize = 64;
/// Replays in progress at once; further requests are refused (ignored and counted).
const MAX_JOBS: usize = 1_024;
/// Largest request frame accepted; a peer that sends a larger one is disconnected by ZeroMQ.
pub(crate) const MAX_REQUEST_FRAME: i64 = 1_024;

/// The last `capacity` published batches; their `seq`s are consecutive.
#[derive(Debug)]
pub(crate) struct ReplayBuffer {
    entries: VecDeque<Box<[u8]>>,
    /// `seq` of `entries[0]`.
    first: u64,
    capacity: usize,
}

impl ReplayBuffer {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            entries: VecDeque::with_capacity(capacity.min(1 << 16)),
            first: 0,
            capacity,
        }
    }

    /// Appends the batch with `seq` = the one after the newest.
    /// The most batches it keeps.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    pub(crate) fn push(&mut self, payload: Box<[u8]>) {
        if self.entries.len() == self.capacity {
            self.entries.pop_front();
            self.first += 1;
        }
        self.entries.push_back(payload);
    }

    /// The oldest `seq` still buffered (or the next one, when empty).
    fn first_seq(&self) -> u64 {
        self.first
    }

    fn get(&self, seq: u64) -> Option<&[u8]> {
        let i = usize::try_from(seq.checked_sub(self.first)?).ok()?;
        self.entries.get(i).map(|b| &b[..])
    }
}

#[derive(Debug)]
struct Job {
    peer: Vec<u8>,
    next: u64,
}

enum Progress {
    Done,
    Blocked,
    Gone,
    OutOfBudget,
}

/// The ROUTER socket and the replays in progress.
pub(crate) struct ReplayServer {
    pub(crate) socket: zmq::Socket,
    jobs: VecDeque<Job>,
}

impl ReplayServer {
    pub(crate) fn new(socket: zmq::Socket) -> Self {
        Self {
            socket,
            jobs: VecDeque::new(),
        }
    }

    /// Reads waiting requests and sends what the budget allows. Returns whether anything
    /// was read or sent.
    pub(crate) fn step(&mut self, buffer: &ReplayBuffer, counters: &Counters) -> bool {
        let mut busy = false;
        for _ in 0..REQUESTS_PER_STEP {
            match self.socket.recv_multipart(zmq::DONTWAIT) {
                Ok(frames) => {
                    busy = true;
                    Counters::add(&counters.replay_requests, 1);
                    self.request(frames, counters);
                }
                Err(zmq::Error::EAGAIN) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "replay socket receive failed");
                    break;
                }
            }
        }
        let mut budget = REPLAY_BUDGET;
        let mut i = 0;
        while i < self.jobs.len() && budget > 0 {
            match self.serve(i, buffer, &mut budget, counters) {
                Progress::Done | Progress::Gone => {
                    busy = true;
                    self.jobs.remove(i);
                }
                Progress::Blocked => i += 1,
                Progress::OutOfBudget => {
                    busy = true;
                    break;
                }
            }
        }
        busy
    }

    fn request(&mut self, frames: Vec<Vec<u8>>, counters: &Counters) {
        let [peer, delimiter, start] = <[Vec<u8>; 3]>::try_from(frames).unwrap_or_default();
        let start = <[u8; 8]>::try_from(start.as_slice());
        let (false, true, Ok(start)) = (peer.is_empty(), delimiter.is_empty(), start) else {
            Counters::add(&counters.replay_malformed, 1);
            return;
        };
        let next = u64::from_be_bytes(start);
        if let Some(job) = self.jobs.iter_mut().find(|j| j.peer == peer) {
            job.next = next;
        } else if self.jobs.len() < MAX_JOBS {
            self.jobs.push_back(Job { peer, next });
        } else {
            Counters::add(&counters.replay_refused, 1);
        }
    }

    fn serve(
        &mut self,
        i: usize,
        buffer: &ReplayBuffer,
        budget: &mut usize,
        counters: &Counters,
    ) -> Progress {
        let job = &mut self.jobs[i];
        loop {
            if *budget == 0 {
                return Progress::OutOfBudget;
            }
            let seq = job.next.max(buffer.first_seq());
            let (seq_frame, payload, end): ([u8; 8], &[u8], bool) = match buffer.get(seq) {
                Some(payload) => (seq.to_be_bytes(), payload, false),
                None => (END_SEQ, &[], true),
            };
            let frames: [&[u8]; 4] = [&job.peer, &[], &seq_frame, payload];
            match self.socket.send_multipart(frames, zmq::DONTWAIT) {
                Ok(()) => {
                    *budget -= 1;
                    if end {
                        return Progress::Done;
                    }
                    Counters::add(&counters.replay_batches_sent, 1);
                    job.next = seq + 1;
                }
                Err(zmq::Error::EAGAIN) => return Progress::Blocked,
                Err(zmq::Error::EHOSTUNREACH) => return Progress::Gone,
                Err(e) => {
                    tracing::warn!(error = %e, "replay send failed; replay abandoned");
                    return Progress::Gone;
                }
            }
        }
    }
}
