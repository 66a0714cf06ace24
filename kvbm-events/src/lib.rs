//! kvbm's KV-cache events on the wire, in vLLM's format, so that the KV-aware routers that
//! already consume vLLM's events (Dynamo's KV router, llm-d's KV-cache indexer, SGLang's
//! router) can route to a kvbm-backed server with no code of ours on their side.
//!
//! An [`EventPublisher`] subscribes to one or more block managers (or a tier stack's G1/G2
//! views), maps each kvbm event to a vLLM event, batches them and publishes the batches on a
//! ZeroMQ PUB socket from its own thread, keeping the last batches for replay on an optional
//! ROUTER socket.
//!
//! ```
//! use std::time::Duration;
//! use kvbm_events::{decode_batch, Event, EventPublisher, Source};
//! use kvbm_logical::{BlockManager, Device, Host, SequenceHash};
//!
//! let g1 = BlockManager::<Device>::builder().block_count(64).block_size(16).build()?;
//! let g2 = BlockManager::<Host>::builder().block_count(256).block_size(16).build()?;
//! let publisher = EventPublisher::builder()
//!     .bind("tcp://127.0.0.1:*") // vLLM's default: tcp://*:5557
//!     .replay_endpoint("tcp://127.0.0.1:*") // vLLM's examples: tcp://*:5558
//!     .topic("kv-events")
//!     .source(Source::manager(&g1, 4096)) // published as medium "GPU"
//!     .source(Source::manager(&g2, 4096)) // "CPU"
//!     .build()?;
//!
//! let block = g1.allocate_blocks(1)?.pop().ok_or("no block")?.stage(SequenceHash::new(42), 16)?;
//! let _held = g1.register_block(block)?;
//! publisher.flush(Duration::from_secs(10))?;
//!
//! // A router that joins late asks for everything from seq 0.
//! let context = zmq::Context::new();
//! let replay = context.socket(zmq::DEALER)?;
//! replay.set_rcvtimeo(10_000)?;
//! replay.connect(publisher.replay_endpoint().ok_or("no replay socket")?)?;
//! replay.send_multipart([&b""[..], &0u64.to_be_bytes()], 0)?;
//! let frames = replay.recv_multipart(0)?; // [empty, seq, payload]
//! assert_eq!(frames[1], 0u64.to_be_bytes());
//! let batch = decode_batch(&frames[2])?;
//! assert!(matches!(&batch.events[0],
//!     Event::BlockStored(e) if e.block_hashes == [42] && e.medium.as_deref() == Some("GPU")));
//! let end = replay.recv_multipart(0)?; // [empty, seq = -1, empty]
//! assert_eq!(end[1], (-1i64).to_be_bytes());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # The schema
//!
//! The [`wire`] module matches `vllm/distributed/kv_events.py` as vLLM 0.26.0 ships it (events
//! as tagged maps since vLLM PR #42892; the byte layout checked against a batch captured from
//! a v0.26.0 server, and the fields against the source, `group_idx` / `kv_cache_spec_*`
//! included): a batch is the `array_like` struct `[ts, events, data_parallel_rank]`, each event
//! a map tagged by `"type"` (`BlockStored`, `BlockRemoved`, `AllBlocksCleared`) with vLLM's
//! field order and its `omit_defaults` rule. A test (`tests/python.rs`) decodes every payload
//! of a run with msgspec structs written from that schema, through
//! `msgspec.msgpack.Decoder(type=KVEventBatch)` as vLLM's subscribers configure it, and checks
//! that msgspec re-encodes each one to the same
//! bytes. Three facts a reader of the schema might not expect, all as vLLM does it:
//! - an unset `data_parallel_rank` is written as `nil` (msgspec writes every field of an
//!   `array_like` struct), and the publisher writes rank 0 unless told otherwise
//!   ([`DEFAULT_DATA_PARALLEL_RANK`]); Dynamo's decoder requires the third element;
//! - `lora_id`, `medium` and `lora_name` have no default, so they are always written (`nil`
//!   when unset); `extra_keys`, `group_idx` and `kv_cache_spec_*` have one and are left out;
//! - block hashes are kvbm's own 64-bit sequence hashes, as unsigned integers.
//!
//! **Mapping** (the [`mapping`](crate#mapping) table): `Stored` → `BlockStored`, `Removed` of
//! any reason → `BlockRemoved`, `Cleared` → `AllBlocksCleared` (for a publisher of one source;
//! with several, vLLM's server-wide clear would wipe the other tiers from a router's view, and
//! the `Removed` that precedes kvbm's `Cleared` has already removed that tier's blocks).
//! `medium` is the event's own tier ([`Medium`]: `"GPU"`, `"CPU"`, `"DISK"`, `"REMOTE"`),
//! `block_size` the event's, and `token_ids` the event's when the blocks were staged from
//! tokens (`stage_from_sequence`, `RequestSequence`), empty otherwise. A [`Source::manager`]
//! subscribes with a snapshot: its blocks are published first, as `BlockStored` batches
//! (parents first, without tokens, which the cache does not keep), so a router that joins
//! late and replays from `seq` 0 sees every block the manager had.

//! # Transport
//!
//! - PUB socket, bound or connected, sending `[topic, seq, payload]`: `seq` is an 8-byte
//!   big-endian counter per publisher, starting at 0, one per batch.
//! - Optional ROUTER socket for replay: a client sends `[empty, start_seq]` (8 bytes
//!   big-endian; what a REQ socket sends for a one-frame request) and receives
//!   `[empty, seq, payload]` for every buffered batch from `start_seq` on, then
//!   `[empty, seq = -1, empty]`. These are vLLM's frames (its publisher sends no topic in a
//!   replay reply). Malformed requests are counted and ignored; the publisher never stops for
//!   them. The buffer keeps the last [`DEFAULT_BUFFER_STEPS`] batches.
//! - High-water mark [`DEFAULT_HWM`] messages on both sockets: a subscriber that falls behind
//!   loses messages, sees the gap in `seq`, and replays.
//!
//! **Why `zmq` (libzmq) rather than the pure-Rust `zeromq` crate.** `zeromq` (zmq.rs 0.7) is
//! async-only (a tokio runtime inside the publisher), and has no high-water-mark or linger
//! option (its PUB queue is a fixed 100,000 messages), both of which this publisher must set.
//! `zmq` (rust-zmq 0.10) binds libzmq, the reference implementation that vLLM, pyzmq and the
//! routers use, so HWM drops, ROUTER identities, `ROUTER_MANDATORY` and linger behave exactly
//! as on a vLLM server, and its blocking API fits a dedicated thread. The binding is thin and
//! stable, so its slow release cadence matters little. It builds libzmq 4.3.4 from the source
//! bundled in `zeromq-src` and links it statically (LGPL-3.0 with the static-linking exception),
//! so no system package is needed; the first build compiles libzmq (about two CPU-minutes).
//!
//! # Never blocking the managers
//!
//! Each [`Source`] is a bounded subscription: a manager never waits for the publisher, and a
//! batch that does not fit is dropped and counted by the manager. Such a loss happens before
//! the publisher sees the events, so replay cannot repair it; the publisher detects it (the
//! manager's drop counter, and the gap in kvbm's own sequence numbers) and publishes
//! `AllBlocksCleared` before the next events, counted in [`PublisherStats::resyncs`], so that
//! a subscriber never keeps a block that may be gone. Right after it, every source built by
//! [`Source::manager`] takes a fresh snapshot and subscription of its manager and publishes
//! the snapshot, so the router's view of every tier is whole again at once (its batches
//! gathered after the loss are dropped: the snapshot is newer). A source built from a bare
//! subscription ([`Source::new`]) cannot do that: the view of it refills with its next
//! `BlockStored` events. Losses on the socket (a slow subscriber) are repaired by replay.
//!
//! # Limits of this version
//!
//! - A router that re-hashes tokens (Dynamo, llm-d) gets `token_ids` for blocks staged from
//!   tokens while the publisher listens; blocks staged from a hash alone, and the snapshot's
//!   blocks, have none (the cache does not keep tokens).
//! - A resync after lost events is vLLM's server-wide `AllBlocksCleared`: between it and the
//!   fresh snapshots that follow it, a router's view is empty (one batch later it is whole);
//!   sources built from bare subscriptions stay empty until their blocks are stored again.
//!
//! # Mapping
//!
//! | kvbm ([`kvbm_logical::KvEventKind`]) | vLLM |
//! |---|---|
//! | `Stored { block_hashes, parent, block_size, token_ids, .. }` | `BlockStored { block_hashes, parent_block_hash, token_ids (or []), block_size, lora_id: nil, medium, lora_name: nil }` |
//! | a [`CacheSnapshot`](kvbm_logical::CacheSnapshot)'s blocks | `BlockStored` batches, before the stream |
//! | `Removed { block_hashes, reason }` | `BlockRemoved { block_hashes, medium }` |
//! | `Cleared` | `AllBlocksCleared {}` (one source only) |

mod config;
mod decode;
mod mapping;
mod publisher;
mod replay;
mod stats;
pub mod wire;

pub use config::{
    BuildError, BuildErrorKind, DEFAULT_BUFFER_STEPS, DEFAULT_DATA_PARALLEL_RANK, DEFAULT_HWM,
    DEFAULT_LINGER, DEFAULT_MAX_BATCH_EVENTS, DEFAULT_POLL_INTERVAL, DEFAULT_QUEUE_BATCHES,
    PubEndpoint, PublisherBuilder, Source,
};
pub use decode::{Batch, DecodeError, Event, RemovedEvent, StoredEvent, decode_batch};
pub use publisher::{EventPublisher, FlushError};
pub use replay::END_SEQ;
pub use stats::PublisherStats;
pub use wire::{BatchLayout, EncodeError, Medium, WireEvent, encode_batch, encode_batch_as};
