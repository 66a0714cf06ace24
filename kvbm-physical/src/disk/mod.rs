//! G3: a local-disk [`StoreTier`](crate::StoreTier) that never serves a wrong block and
//! survives a crash.
//!
//! (Docs are completed below.)

mod buf;
mod ceiling;
mod config;
mod engine;
mod error;
mod faults;
mod file;
mod format;
mod io;
mod recovery;
mod stats;

pub use ceiling::{Sequential, sequential_ceiling};
pub use config::{
    Capacity, DEFAULT_QUEUE_DEPTH, DirectIo, DiskTierBuilder, IoBackend, MAX_QUEUE_DEPTH,
    OnIncompatible, RecoveryMode,
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
