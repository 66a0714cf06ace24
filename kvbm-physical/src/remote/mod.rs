//! The remote tier (G4): block images in Redis or Redis Cluster, shared by every inference
//! server of a [`Namespace`], as a [`StoreTier`](crate::StoreTier).
//!
//! - **Keys and values** ([`format`](mod@format)): key = namespace (key prefix, model id, layout
//!   fingerprint, hashing-spec version) + sequence hash; value = a 48-byte header (magic, hash,
//!   parent, namespace fingerprint, length, xxh3 checksum) + the block image. A value that does
//!   not verify is [`GetOutcome::Corrupt`](crate::GetOutcome::Corrupt): removed, never served.
//! - **Batches.** `contains` is one pipeline of `EXISTS`, `put` of `SET key value NX [PX ttl]`
//!   (an existing key is [`PutOutcome::Present`](crate::PutOutcome::Present), not rewritten),
//!   `get` of `GET`, `remove` of `UNLINK`; `pipeline_depth` block commands per round trip.
//!   Block payloads go to the socket straight from the caller's buffer. In cluster mode the
//!   batch is grouped by the slot's master (`CLUSTER SLOTS`, refreshed on `MOVED`) and the
//!   nodes are served in parallel.
//! - **Failure is a miss.** Every connection has a connect deadline and a per-operation
//!   response deadline; each node has a connection pool and a circuit breaker
//!   ([`BreakerState`]). A node that fails `threshold` times in a row is skipped without I/O
//!   (gets miss, puts are [`Skipped(Unavailable)`](crate::SkipReason::Unavailable)) until its
//!   cool-down has passed, when one call probes it; the node recovers as soon as it answers.
//!   No call panics or returns an error for an unreachable Redis. A node that does not answer
//!   costs at most `connect_timeout + response_timeout` (nothing at all while the breaker is
//!   open), and one that answers too slowly (a byte at a time) is cut off when its round trip
//!   passes `response_timeout` plus the payload's time at 10 MB/s. Idle pooled connections
//!   the server closed are dropped before use, and TCP keepalive finds vanished peers. A
//!   server that refuses writes (`NOPERM`, `MISCONF`, `READONLY`) has its puts skipped,
//!   counted ([`RemoteStats::refused_writes`]) and warned about at most once per
//!   [`REFUSAL_WARNING_INTERVAL`].
//!   A host name is resolved within the connect deadline (the lookup runs on a thread of
//!   its own; one still running is waited on by the next attempt, never started twice).
//! - **The wire.** kvbm owns each connection (TCP with `TCP_NODELAY`, or rustls for
//!   `rediss://`) and speaks RESP2 itself: a pipeline goes out in vectored writes, and a
//!   `GET`'s value is read from the socket straight into the caller's buffer and hashed piece
//!   by piece as it lands (one kernel copy, one checksum pass); small replies go through one
//!   fixed buffer per connection. The `redis` crate packs `AUTH`/`SELECT` and classifies error
//!   replies (`MOVED`, `WRONGTYPE`, ...).
//! - **Security.** Password and ACL user (`AUTH`), TLS (`rediss://`) with the system's roots, a
//!   custom CA or mutual TLS; credentials never appear in `Debug`/`Display` output or in
//!   errors ([`Secret`]).
//!
//! ```
//! use std::time::Duration;
//! use kvbm_physical::LayoutConfig;
//! use kvbm_physical::remote::{Namespace, RemoteConfig, RemoteStore};
//! let layout = LayoutConfig { num_blocks: 1024, num_layers: 32, outer_dim: 2, page_size: 16, inner_dim: 1024, dtype_bytes: 2 };
//! let block_bytes = 32 * 2 * 16 * 1024 * 2;
//! let config = RemoteConfig::builder(Namespace::for_layout("llama-3-8b", &layout), block_bytes)
//!     .url("redis://10.0.0.5:7000")
//!     .url("redis://10.0.0.6:7000")
//!     .cluster(true)
//!     .password("from-a-secret-store")
//!     .response_timeout(Duration::from_millis(200))
//!     .build()?;
//! let g4 = RemoteStore::open(config)?; // no connection yet: the first batch discovers the slots
//! # Ok::<(), kvbm_physical::remote::ConfigError>(())
//! ```

mod breaker;
mod config;
pub mod format;
mod node;
mod resp;
mod stats;
mod store;
mod tls;
mod topology;

pub use breaker::BreakerState;
pub use config::{
    ConfigError, DEFAULT_BREAKER_COOL_DOWN, DEFAULT_BREAKER_THRESHOLD, DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_MAX_IDLE_CONNECTIONS, DEFAULT_MAX_PIPELINE_BYTES, DEFAULT_PIPELINE_DEPTH,
    DEFAULT_RESPONSE_TIMEOUT, Endpoint, MAX_BLOCK_BYTES, RemoteConfig, RemoteConfigBuilder,
    SMALL_PIPELINE_DEPTH, Secret, TlsOptions, redact_url,
};
pub use format::{Corruption, HEADER_BYTES, Namespace, encode_value, layout_fingerprint, verify};
pub use stats::RemoteStats;
pub use store::{REFUSAL_WARNING_INTERVAL, RemoteStore};
