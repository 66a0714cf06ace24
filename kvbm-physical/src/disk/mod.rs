//! G3: a local-disk [`StoreTier`](crate::StoreTier) that never serves a wrong block and
//! survives a crash.
//!
//! A [`DiskTier`] keeps block images (the fully contiguous image G2 holds, `block_bytes`
//! long) in **one preallocated file** of fixed-size slots, keyed by sequence hash. Which
//! slot holds what, and which block to evict for a new one, is decided by a
//! [`BlockManager<Disk>`](kvbm_logical::BlockManager) whose block ids *are* the file's
//! slots: any of kvbm's eviction policies, with its events (`Stored`, `Removed { Evicted }`,
//! tier `disk`) and metrics.
//!
//! ```
//! use kvbm_logical::SequenceHash;
//! use kvbm_physical::disk::{Capacity, DiskTier, RecoveryMode};
//! use kvbm_physical::{GetOutcome, StoreBlock, StoreTier};
//! let dir = std::env::temp_dir().join(format!("kvbm-doc-disk-{}", std::process::id()));
//! let tier = DiskTier::builder()
//!     .path(dir.join("g3.kvbm"))
//!     .block_bytes(16 << 10)             // G2's block_bytes
//!     .capacity(Capacity::Bytes(1 << 20)) // or Capacity::Blocks(n)
//!     .fingerprint(42)                    // disk::layout_fingerprint(&layout, model_id)
//!     .recovery(RecoveryMode::Verify)     // the default
//!     .open()?;
//! let image = vec![9u8; 16 << 10];
//! tier.put(&[StoreBlock { hash: SequenceHash::new(1), parent: None, bytes: &image }]);
//! let mut out = vec![0u8; 16 << 10];
//! assert!(tier.get(&[SequenceHash::new(1)], &mut [&mut out])[0].is_hit());
//! # drop(tier); std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ## File format
//!
//! Page 0 is a superblock (magic, format version, layout fingerprint, epoch, block and slot
//! size, slot count, checksum). Slot *k* starts at `4096 + k × slot_bytes`, where
//! `slot_bytes = round_up(block_bytes, 4096) + 4096`: the image, padding, then a header page
//! holding the block's sequence hash, its parent, the layout fingerprint, the file's epoch,
//! a generation (a per-file write counter), the length, the xxh3-64 of the image and the
//! header's own xxh3. A slot is written and read whole, in one I/O, at a 4 KiB-aligned
//! offset from a 4 KiB-aligned buffer ([`DiskGeometry`] has the arithmetic).
//!
//! ## I/O
//!
//! - **`O_DIRECT`** ([`DirectIo::Auto`]): no page cache, no double buffering with G2. Where
//!   the file system refuses it (overlayfs, FUSE, tmpfs before Linux 6.6) at open or at the
//!   first I/O, the tier reopens the file buffered, says so once (`tracing::warn!`) and in
//!   [`DiskStats::io_mode`]; it never retries forever and never hangs. [`DirectIo::Require`]
//!   turns the refusal into an error, [`DirectIo::Off`] asks for buffered I/O.
//! - **Queue depth.** Each `put` / `get` keeps up to `queue_depth` slot I/Os in flight:
//!   [`IoBackend::ThreadPool`] (the default) runs them on `min(depth, blocks)` threads
//!   (the caller's and helpers kept for the tier's lifetime), each taking the next block
//!   and doing all of it (copy and checksum, `pwritev`/`preadv`, verification), so copies and
//!   checksums run in parallel and no block is handed between threads; [`IoBackend::IoUring`]
//!   prepares and verifies on the caller's thread while the kernel keeps the I/Os in flight
//!   (one ring per concurrent caller, no threads). Both were measured on the reference
//!   machine (BENCHMARKS.md, "disk tier (G3)", 2026-11-29): the thread back end reached the
//!   goals at more points, so it is the default.
//! - **In place.** When `block_bytes` is a multiple of 4 KiB and the caller's buffer is
//!   page-aligned (G2's system or pinned memory of a fully contiguous layout is), a slot is
//!   one vectored I/O of the caller's bytes and a header page: no bounce copy. Other buffers
//!   (and writes under fault injection) go through page-aligned bounce buffers.
//! - The file is preallocated with `fallocate` (a sparse file, with a warning, where that is
//!   unsupported) and locked with `flock` against a second user.
//!
//! ## Integrity: never serve a wrong block
//!
//! Every read checks the header (magic, version, its own checksum), the epoch, the layout
//! fingerprint, the hash asked for, the length, and the image's xxh3. Anything else is
//! [`GetOutcome::Corrupt`](crate::GetOutcome::Corrupt): the block is invalidated in the
//! tier's manager and its header zeroed, so it is never served and never retried, not even
//! after a restart. A failed or short read is
//! [`GetOutcome::Failed`](crate::GetOutcome::Failed) and treated the same way. A failed
//! write (`ENOSPC`, `EIO`, short) is [`PutOutcome::Failed`](crate::PutOutcome::Failed) for
//! that block only, and zeroes the slot's header (its evicted block must not come back).
//! Only a `Hit` says anything about the caller's buffer: after any other outcome its
//! contents are unspecified (an in-place read may have left the unverified bytes there).
//! Any I/O error **degrades** the tier: puts answer
//! [`SkipReason::Degraded`](crate::SkipReason::Degraded) (writing nothing) until
//! [`DiskTier::resume`]; gets go on serving what verifies. Two puts of one hash at once
//! write one copy. Faults can be injected ([`DiskFaults`], [`DiskFaultPlan`]).
//!
//! ## Warm restart
//!
//! Opening an existing file recovers per [`RecoveryMode`]: `Verify` (default) reads every
//! slot and re-registers those whose header and checksum verify, with their parents (so
//! prefixes match again), oldest generation first (so the eviction order continues the
//! write order); `Headers` reads only header pages (4 KiB per slot) and leaves the image
//! check to the first read; `Discard` starts empty. Torn slots (a write cut by a crash) and
//! older duplicates are dropped and zeroed; a slot of an older epoch (the file was
//! reinitialised) is never read. The [`RecoveryReport`] lists what came back. A file of
//! another fingerprint, block size or format version, or a truncated one, is reinitialised
//! (new epoch) or refused ([`OnIncompatible`]); a file that is not a tier file is never
//! touched ([`DiskError::NotATierFile`]). Recovery survives a process crash (`SIGKILL`:
//! `kvbm-bench disk --crash-cycles N`); the tier does not `fsync` block writes, so after a
//! power loss, blocks still in the drive's cache are lost (and torn ones dropped), never
//! served wrong.
//!
//! ## For the tier stack
//!
//! The tier stack holds a `DiskTier` as an `Arc<dyn StoreTier>`: offload is
//! `put(&[StoreBlock { hash, parent, bytes: g2_image }])` from its worker threads, onboarding
//! `get(hashes, g2_images)`; the `RecoveryReport`'s blocks (hash, parent) tell it what G3
//! holds after a restart, and [`DiskTier::subscribe`] gives G3's events. Where G2's blocks
//! are one range of host memory each (a fully contiguous G2), both directions use G2's memory
//! itself through locked block views ([`Layout::block_view`](crate::Layout::block_view),
//! [`Layout::block_view_mut`](crate::Layout::block_view_mut)), so with page-multiple blocks
//! every slot I/O is in place ([`DiskStats::in_place_reads`] and the other counters say so);
//! onboarding reads in chunks of about 4 MiB, the next chunk's reads overlapping the copy of
//! the previous one up to G1.
//!
//! ## Why not foyer
//!
//! foyer 0.22.6 (a hybrid memory/disk cache with psync and io_uring engines, checksums and
//! recovery) was evaluated first as G3's engine (key = sequence hash, value = block bytes),
//! on this machine (ext4 on a virtio disk, 2 shared cores), with its block engine
//! (16 MiB regions, 4 flushers) and `O_DIRECT`. Measured, 512 MiB per run: writes
//! 157–318 MB/s (its psync and io_uring engines alike) where one sequential `O_DIRECT` write
//! of the same bytes ran at 640–720 MB/s; reads 71–571 MB/s; and inserts are dropped
//! silently under load (in 8 of 24 runs, up to 230 of 2048 values never reached the disk).
//! Against kvbm's requirements: its insert returns nothing, so `ENOSPC`/`EIO` cannot be
//! reported per block nor degrade the tier; a value that fails its checksum is logged and
//! returned as a plain miss, not reported; it evicts whole 16 MiB regions by its own FIFO /
//! invalid-ratio pickers, not by a kvbm `BlockManager` (no kvbm policy, events or metrics);
//! recovery checks headers only and its strict mode panics on an error; with `O_DIRECT`
//! asked for, a refusing file system is an error (no buffered fallback); the layout
//! fingerprint and parent would have to be packed into keys and values. Hence this engine.
//! (Numbers and setup: BENCHMARKS.md.)

mod buf;
mod ceiling;
mod config;
mod engine;
mod error;
mod faults;
mod file;
mod format;
mod io;
mod ops;
mod recovery;
mod stats;
mod store;

pub use ceiling::{Sequential, sequential_ceiling};
pub use config::{
    Capacity, DEFAULT_QUEUE_DEPTH, DEGRADED_RETRY, DEGRADED_RETRY_MAX, DirectIo, DiskTierBuilder,
    IoBackend, MAX_QUEUE_DEPTH, OnIncompatible, RecoveryMode,
};
pub use engine::DiskTier;
pub use error::{DiskError, SlotIoError};
pub use faults::{DiskFaultPlan, DiskFaults, IoFault};
pub use format::{DiskGeometry, PAGE};
pub use stats::{BufferedReason, Degraded, DiskStats, IoMode, RecoveredBlock, RecoveryReport};

/// A layout fingerprint for [`DiskTierBuilder::fingerprint`]: the xxh3-64 of the layout's
/// shape and of `model`, a caller's identifier of whatever else makes the bytes of a block
/// differ for the same hash (model weights, dtype conversion, a kvbm-physical upgrade).
///
/// The shape has the element's size only: `model` must also tell apart the weights and their
/// revision, the element type (bf16 and fp16, or the two fp8 kinds, have the same size) and
/// the tensor-parallel rank (ranks hold other heads in blocks of the same shape). A file
/// reopened under another fingerprint is started afresh; under the same one, its blocks are
/// served (their checksums verify: they cover the bytes, not what the bytes mean). kvbm-py
/// hashes its `DiskStore`'s `model`, `dtype` and `tp_rank`/`tp_size` into this id.
///
/// ```
/// use kvbm_physical::LayoutConfig;
/// use kvbm_physical::disk::layout_fingerprint;
/// let c = LayoutConfig { num_blocks: 8, num_layers: 32, outer_dim: 2, page_size: 16, inner_dim: 1024, dtype_bytes: 2 };
/// let other_model = layout_fingerprint(&c, 2);
/// assert_ne!(layout_fingerprint(&c, 1), other_model);
/// // The number of blocks in G2 is not part of the layout of one block.
/// assert_eq!(layout_fingerprint(&LayoutConfig { num_blocks: 99, ..c }, 2), other_model);
/// ```
pub fn layout_fingerprint(layout: &crate::LayoutConfig, model: u64) -> u64 {
    let fields = [
        layout.num_layers as u64,
        layout.outer_dim as u64,
        layout.page_size as u64,
        layout.inner_dim as u64,
        layout.dtype_bytes as u64,
        model,
    ];
    let mut bytes = [0u8; 48];
    for (chunk, v) in bytes.chunks_exact_mut(8).zip(fields) {
        chunk.copy_from_slice(&v.to_le_bytes());
    }
    xxhash_rust::xxh3::xxh3_64(&bytes)
}
