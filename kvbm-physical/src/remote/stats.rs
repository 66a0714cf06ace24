//! Counters of the remote tier: plain atomics, added in bulk per batch.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::StoreStats;

#[derive(Debug, Default)]
pub(crate) struct Counter(AtomicU64);

impl Counter {
    pub(crate) fn add(&self, n: u64) {
        if n != 0 {
            self.0.fetch_add(n, Ordering::Relaxed);
        }
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) stored: Counter,
    pub(crate) present: Counter,
    pub(crate) skipped: Counter,
    pub(crate) failed: Counter,
    pub(crate) hits: Counter,
    pub(crate) misses: Counter,
    pub(crate) corrupt: Counter,
    pub(crate) bytes_written: Counter,
    pub(crate) bytes_read: Counter,
    pub(crate) unavailable: Counter,
    pub(crate) timeouts: Counter,
    pub(crate) connection_errors: Counter,
    pub(crate) breaker_opens: Counter,
    pub(crate) connections: Counter,
    pub(crate) redirects: Counter,
    pub(crate) topology_refreshes: Counter,
    pub(crate) round_trips: Counter,
    pub(crate) stale_connections: Counter,
    pub(crate) refused_writes: Counter,
    pub(crate) refusal_warnings: Counter,
}

impl Counters {
    pub(crate) fn store_stats(&self) -> StoreStats {
        StoreStats {
            stored: self.stored.get(),
            skipped: self.skipped.get(),
            failed: self.failed.get(),
            hits: self.hits.get(),
            misses: self.misses.get(),
            corrupt: self.corrupt.get(),
            bytes_written: self.bytes_written.get(),
            bytes_read: self.bytes_read.get(),
            resident: None,
        }
    }

    pub(crate) fn remote_stats(&self) -> RemoteStats {
        RemoteStats {
            store: self.store_stats(),
            present: self.present.get(),
            unavailable: self.unavailable.get(),
            timeouts: self.timeouts.get(),
            connection_errors: self.connection_errors.get(),
            breaker_opens: self.breaker_opens.get(),
            connections: self.connections.get(),
            redirects: self.redirects.get(),
            topology_refreshes: self.topology_refreshes.get(),
            round_trips: self.round_trips.get(),
            stale_connections: self.stale_connections.get(),
            refused_writes: self.refused_writes.get(),
            refusal_warnings: self.refusal_warnings.get(),
        }
    }
}

/// Everything [`RemoteStore`](super::RemoteStore) counts: the [`StoreStats`] every store tier
/// has, and what is particular to a networked store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RemoteStats {
    /// The store-tier counters (stored, skipped, failed, hits, misses, corrupt, bytes).
    pub store: StoreStats,
    /// Puts that found the key already there (`SET NX` declined; not written again).
    pub present: u64,
    /// Commands answered without any I/O because their node's circuit breaker was open (or
    /// no node serves their slot): gets became misses, puts were skipped.
    pub unavailable: u64,
    /// Reads or writes (or connection attempts) that hit their deadline.
    pub timeouts: u64,
    /// Connection failures other than timeouts: refused, reset, closed, authentication.
    pub connection_errors: u64,
    /// Times a node's circuit breaker opened.
    pub breaker_opens: u64,
    /// Connections opened.
    pub connections: u64,
    /// `MOVED`/`ASK` redirections received (cluster).
    pub redirects: u64,
    /// Slot-map refreshes (cluster).
    pub topology_refreshes: u64,
    /// Pipelines sent (one round trip each).
    pub round_trips: u64,
    /// Idle pooled connections found closed by the server (its `timeout`, a restart, a
    /// proxy's idle limit) and dropped before use.
    pub stale_connections: u64,
    /// `SET`s the server refused for a reason that says nothing about the block (`NOPERM`
    /// from an ACL, `MISCONF` while it cannot persist, `READONLY` on a replica): skipped,
    /// the blocks stay in G2. Counted per block, also in `store.skipped`.
    pub refused_writes: u64,
    /// Warnings logged about refused writes: at most one per
    /// [`REFUSAL_WARNING_INTERVAL`](super::REFUSAL_WARNING_INTERVAL), however many puts a
    /// refusing server answers meanwhile (the next warning gives their count).
    pub refusal_warnings: u64,
}
