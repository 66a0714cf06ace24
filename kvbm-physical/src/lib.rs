//! Block memory for kvbm: every `BlockId` of a [`kvbm_logical::BlockManager`] maps to bytes
//! in slabs allocated once — GPU memory, pinned host memory, or plain system memory (the
//! CPU fallback) — arranged in the [layouts](layout) inference engines use, and copied
//! between tiers by the [`TransferEngine`]. The [`TierStack`] (module [`stack`]) ties a
//! device tier (G1), a host tier (G2) and optional [store tiers](store_tier) together with
//! asynchronous offload and plan-then-commit onboarding; the older, synchronous
//! [`TieredManager`] glues G1 and G2 with copies inside its calls.
//!
//! An inference engine's own KV tensors (vLLM's outer-first, FlashInfer's block-first, MLA;
//! any strides) become layouts with [`Layout::from_engine`], and copies are ordered against
//! the engine's CUDA stream with [`CudaEvent`]s ([`CopyOptions::wait_for`],
//! [`TransferHandle::completion_event`]), never a host synchronisation.
//!
//! CUDA (the `cuda` feature, on by default) is loaded at run time: a binary built with it
//! runs on a machine without a driver, where GPU storage returns
//! [`StorageError::NoCudaDevice`].
//!
//! ```
//! use kvbm_logical::{BlockManager, Device, Host, SequenceHash};
//! use kvbm_physical::{
//!     Layout, LayoutConfig, LayoutKind, OffloadMode, Tier, TieredManager, TransferEngine,
//! };
//! let config = LayoutConfig { num_blocks: 4, num_layers: 2, outer_dim: 2, page_size: 16, inner_dim: 64, dtype_bytes: 2 };
//! // No GPU here: both tiers in system memory. On a GPU, use Layout::device and Layout::pinned.
//! let g1 = Tier::new(
//!     BlockManager::<Device>::builder().block_count(4).block_size(16).build()?,
//!     Layout::system(LayoutKind::LayerSeparate, config)?.into_shared(),
//! )?;
//! let g2 = Tier::new(
//!     BlockManager::<Host>::builder().block_count(4).block_size(16).build()?,
//!     Layout::system(LayoutKind::FullyContiguous, config)?.into_shared(),
//! )?;
//! let tiers = TieredManager::new(g1, g2, TransferEngine::host(), OffloadMode::WriteThrough)?;
//!
//! // The engine computes KV into a fresh block, which is then registered: it reaches G2 too.
//! let block = tiers.allocate_blocks(1)?.blocks.pop().unwrap();
//! let kv = vec![42u8; tiers.g1().layout().block_bytes()];
//! tiers.g1().layout().write_block(block.block_id(), &kv)?;
//! let registered = tiers.register_blocks(vec![block.stage(SequenceHash::new(1), 16)?])?;
//! assert_eq!(registered.offloaded, 1);
//! assert!(tiers.g2().manager().contains(SequenceHash::new(1)));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod cuda;
pub mod disk;
pub mod error;
pub mod faults;
pub mod layout;
mod memcpy;
pub mod nvml;
pub mod remote;
pub mod stack;
pub mod storage;
pub mod store_tier;
pub mod tiered;
pub mod transfer;

pub use cuda::{CudaDevice, CudaEvent};
pub use disk::{DiskError, DiskTier};
pub use error::{
    LayoutError, PointerKind, Side, StorageError, TensorError, TieredError, TransferError,
};
pub use faults::{FaultInjector, FaultPlan};
pub use layout::{
    EngineFormat, Geometry, LayerMap, LayerTensor, Layout, LayoutConfig, LayoutKind, Region,
};
pub use nvml::{GpuInfo, discover_gpus};
pub use remote::{Namespace, RemoteConfig, RemoteStore};
pub use stack::{TierStack, TierStackBuilder};
pub use storage::{DeviceStorage, MemoryKind, PinnedStorage, Storage, SystemStorage};
pub use store_tier::{
    GetOutcome, PutOutcome, SkipReason, StoreBlock, StoreError, StoreStats, StoreTier,
};
pub use tiered::{
    Allocation, MatchOutcome, OffloadMode, Registration, Tier, TieredManager, TieredStats,
};
pub use transfer::{CopyOptions, Strategy, TransferEngine, TransferHandle, TransferReport};
