//! The publisher's counters.

use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters, written by the publisher thread.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) batches_published: AtomicU64,
    pub(crate) events_published: AtomicU64,
    pub(crate) block_events_published: AtomicU64,
    pub(crate) batches_dropped: AtomicU64,
    pub(crate) events_dropped: AtomicU64,
    pub(crate) resyncs: AtomicU64,
    pub(crate) send_errors: AtomicU64,
    pub(crate) encode_errors: AtomicU64,
    pub(crate) replay_requests: AtomicU64,
    pub(crate) replay_malformed: AtomicU64,
    pub(crate) replay_refused: AtomicU64,
    pub(crate) replay_batches_sent: AtomicU64,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> PublisherStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        PublisherStats {
            batches_published: get(&self.batches_published),
            events_published: get(&self.events_published),
            block_events_published: get(&self.block_events_published),
            batches_dropped: get(&self.batches_dropped),
            events_dropped: get(&self.events_dropped),
            resyncs: get(&self.resyncs),
            send_errors: get(&self.send_errors),
            encode_errors: get(&self.encode_errors),
            replay_requests: get(&self.replay_requests),
            replay_malformed: get(&self.replay_malformed),
            replay_refused: get(&self.replay_refused),
            replay_batches_sent: get(&self.replay_batches_sent),
        }
    }
}

/// What a publisher has done so far ([`EventPublisher::stats`](crate::EventPublisher::stats)).
///
/// Batch `n` (counting from 0) was published with `seq = n`, so the next one gets
/// `seq = batches_published`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PublisherStats {
    /// Batches published (each got the next `seq` and entered the replay buffer).
    pub batches_published: u64,
    /// vLLM events in them.
    pub events_published: u64,
    /// Block hashes in their `BlockStored` and `BlockRemoved` events ("block events").
    pub block_events_published: u64,
    /// kvbm batches the managers dropped because a source's queue was full.
    pub batches_dropped: u64,
    /// kvbm events in those batches.
    pub events_dropped: u64,
    /// `AllBlocksCleared` events published because events were lost before the publisher
    /// saw them (a full queue), so that no subscriber keeps a block the cache may have lost.
    pub resyncs: u64,
    /// Batches the PUB socket refused (still in the replay buffer).
    pub send_errors: u64,
    /// Batches that could not be encoded (a list over 2^32 − 1 elements; never seen).
    pub encode_errors: u64,
    /// Messages received on the replay socket.
    pub replay_requests: u64,
    /// Of those, ignored as malformed (not `[empty, 8-byte start seq]`).
    pub replay_malformed: u64,
    /// Of those, ignored because too many replays were in progress.
    pub replay_refused: u64,
    /// Batches sent in answer to replay requests.
    pub replay_batches_sent: u64,
}
