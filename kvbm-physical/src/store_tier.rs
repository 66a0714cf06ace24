//! Store tiers: the interface of the tiers below G2 (a local disk file, G3; a remote store
//! shared by many servers, G4).
//!
//! A *slot tier* (G1, G2) is a [`BlockManager`](kvbm_logical::BlockManager) plus memory
//! addressed by block id. A *store tier* is a key-value store keyed by
//! [`SequenceHash`] that manages its own capacity and eviction (a disk engine, Redis). The
//! tier stack moves block images between G2's host memory and a store tier through this
//! trait.
//!
//! ## Contract
//!
//! - **Blocking, batched, called off the scheduler thread.** Every method may block for I/O;
//!   the tier stack calls them from its own worker threads, never from the thread that
//!   schedules requests. Each call takes a batch so that an implementation can overlap its
//!   I/O (queue depth > 1, pipelining) and pay one round trip per batch.
//! - **Never serve a wrong block.** [`get`](StoreTier::get) returns
//!   [`GetOutcome::Hit`] only for a value whose header (hash, layout fingerprint) and checksum
//!   verify; anything else is [`GetOutcome::Corrupt`] (and the implementation removes it, so
//!   it is never retried) or [`GetOutcome::Miss`]. On a hit the whole output buffer was
//!   written; on any other outcome its content is unspecified and must not be used.
//! - **Failure is a miss, not an error on the serving path.** An unreachable store answers
//!   `contains` with `false`, `get` with `Miss`/`Failed` and `put` with `Skipped`/`Failed`,
//!   within its configured deadline. Stats say what happened.
//! - **Presence may be stale.** `contains` is a hint (another server or the store's own
//!   eviction may remove a key in between); only `get` decides.
//! - **Every block is exactly [`block_bytes`](StoreTier::block_bytes) long.**

use std::fmt;

use kvbm_logical::SequenceHash;
use thiserror::Error;

/// One block to write: its identity and its bytes (a block image, `block_bytes` long).
#[derive(Clone, Copy)]
pub struct StoreBlock<'a> {
    /// The block's sequence hash: the key.
    pub hash: SequenceHash,
    /// Its parent's hash, kept so that a reader (or a recovery) can rebuild the chain.
    pub parent: Option<SequenceHash>,
    /// The block image.
    pub bytes: &'a [u8],
}

impl fmt::Debug for StoreBlock<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreBlock")
            .field("hash", &self.hash)
            .field("parent", &self.parent)
            .field("bytes", &self.bytes.len())
            .finish()
    }
}

/// What [`StoreTier::put`] did with one block.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PutOutcome {
    /// Written; a later `get` may find it (unless the store evicts it).
    Stored,
    /// Already present (not written again).
    Present,
    /// Not written, and nothing is wrong with the block: no room, the tier is degraded or
    /// unreachable, admission refused. Back-pressure, counted as skipped.
    Skipped(SkipReason),
    /// The write failed; nothing of this block is readable.
    Failed(StoreError),
}

/// Why a put was skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SkipReason {
    /// The store is full and could not evict.
    NoRoom,
    /// The tier stopped admitting after an error (a full disk, an I/O error).
    Degraded,
    /// The store is unreachable (a circuit breaker is open).
    Unavailable,
}

/// What [`StoreTier::get`] found for one hash.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum GetOutcome {
    /// Verified and written into the output buffer; `parent` as stored.
    Hit {
        /// The block's parent hash, as it was stored.
        parent: Option<SequenceHash>,
    },
    /// Not in the store.
    Miss,
    /// Present but did not verify (header, fingerprint, length or checksum): removed from the
    /// store, never served.
    Corrupt,
    /// The read failed (I/O error, timeout). The tier stack ends the prefix there; it removes
    /// the block from the store unless the error [is transient](StoreError::is_transient).
    Failed(StoreError),
}

impl GetOutcome {
    /// Whether the output buffer holds the verified block.
    pub fn is_hit(&self) -> bool {
        matches!(self, Self::Hit { .. })
    }
}

/// A store tier's I/O failure, as data (the outcome enums carry it per block).
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreError {
    /// The device or file system is full (`ENOSPC`).
    #[error("no space left on the store's device")]
    NoSpace,
    /// An I/O error (`EIO`, a short read or write, ...).
    #[error("I/O error: {0}")]
    Io(String),
    /// The store did not answer within its deadline.
    #[error("the store did not answer within {0:?}")]
    Timeout(std::time::Duration),
    /// The store is unreachable, refused the connection, or refused this one command for a
    /// reason that says nothing about the block (a Redis server error such as `NOPERM`).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A buffer that is not exactly one block long.
    #[error("buffer of {actual} bytes for a block of {expected} bytes")]
    BufferSize {
        /// The tier's block size in bytes.
        expected: usize,
        /// The buffer's length.
        actual: usize,
    },
}

impl StoreError {
    /// Whether the failure says nothing about the stored block itself: the store did not answer
    /// in time, could not be reached, or refused the command. The tier stack treats a transient read failure as a miss
    /// (the prefix ends there, the block stays where it is and a later lookup may read it), and
    /// any other failure as a lost block that it removes from the store, so that a block a
    /// medium cannot read back is never retried.
    ///
    /// ```
    /// use kvbm_physical::store_tier::StoreError;
    /// use std::time::Duration;
    ///
    /// assert!(StoreError::Timeout(Duration::from_millis(50)).is_transient());
    /// assert!(StoreError::Unavailable("connection refused".into()).is_transient());
    /// assert!(!StoreError::Io("EIO".into()).is_transient());
    /// ```
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Timeout(_) | Self::Unavailable(_))
    }
}

/// A store tier's counters since it was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreStats {
    /// Blocks written.
    pub stored: u64,
    /// Puts skipped (no room, degraded, unavailable).
    pub skipped: u64,
    /// Puts or gets that failed with an error.
    pub failed: u64,
    /// Gets that returned a verified block.
    pub hits: u64,
    /// Gets that found nothing.
    pub misses: u64,
    /// Values that did not verify (removed, never served).
    pub corrupt: u64,
    /// Bytes written (block images).
    pub bytes_written: u64,
    /// Bytes read and verified.
    pub bytes_read: u64,
    /// Blocks the store holds now, when it knows (a remote store may not).
    pub resident: Option<u64>,
}

/// A tier below G2: a key-value store of block images keyed by sequence hash. See the
/// [module docs](self) for the contract.
pub trait StoreTier: Send + Sync + fmt::Debug {
    /// The medium's name, used in events, metrics and logs (`"DISK"`, `"REMOTE"`).
    fn medium(&self) -> &'static str;

    /// Bytes of one block image.
    fn block_bytes(&self) -> usize;

    /// For each hash, whether the store (probably) holds it; one round trip per call.
    fn contains(&self, hashes: &[SequenceHash]) -> Vec<bool>;

    /// Whether `contains` costs a network round trip (a remote store), so that a tier stack
    /// must not ask it on the scheduler's thread: [`StoreTierConfig::new`] then plans from it
    /// without asking ([`Probe::Deferred`]). `false` by default.
    ///
    /// [`StoreTierConfig::new`]: crate::stack::StoreTierConfig::new
    /// [`Probe::Deferred`]: crate::stack::Probe::Deferred
    fn is_remote(&self) -> bool {
        false
    }

    /// Writes `blocks`; one outcome per block, in order.
    fn put(&self, blocks: &[StoreBlock<'_>]) -> Vec<PutOutcome>;

    /// Reads `hashes[i]` into `out[i]` (each `block_bytes` long); one outcome per hash, in
    /// order.
    fn get(&self, hashes: &[SequenceHash], out: &mut [&mut [u8]]) -> Vec<GetOutcome>;

    /// Removes `hashes` from the store (missing ones are ignored).
    fn remove(&self, hashes: &[SequenceHash]);

    /// Counters since the store was opened.
    fn stats(&self) -> StoreStats;
}
