//! Block memory for kvbm: every `BlockId` of a [`kvbm_logical::BlockManager`] maps to bytes
//! in slabs allocated once — GPU memory, pinned host memory, or plain system memory (the
//! CPU fallback) — arranged in the [layouts](layout) inference engines use, and copied
//! between tiers by the [`TransferEngine`]. The [`TierStack`] (module [`stack`]) ties a
//! device tier (G1), a host tier (G2) and optional [store tiers](store_tier) together with
//! asynchronous offload and plan-then-commit onboarding: the scheduler thread never waits on
//! a copy.
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
//! use kvbm_physical::stack::{EngineSync, TierStack};
//! use kvbm_physical::{Layout, LayoutConfig, LayoutKind};
//! let config = |n| LayoutConfig { num_blocks: n, num_layers: 2, outer_dim: 2, page_size: 16, inner_dim: 64, dtype_bytes: 2 };
//! // No GPU here: both tiers in system memory. On a GPU: `Layout::device` (or the engine's own
//! // tensors, `Layout::from_engine`) for G1, `Layout::pinned` for G2, and
//! // `.engine(TransferEngine::with_cuda(gpu))`.
//! let stack = TierStack::builder()
//!     .g1(
//!         BlockManager::<Device>::builder().block_count(4).block_size(16).build()?,
//!         Layout::system(LayoutKind::LayerSeparate, config(4))?.into_shared(),
//!     )
//!     .g2(
//!         BlockManager::<Host>::builder().block_count(8).block_size(16).build()?,
//!         Layout::system(LayoutKind::FullyContiguous, config(8))?.into_shared(),
//!     )
//!     .build()?;
//!
//! // The engine computes KV into a fresh block and registers it: the copy to G2 is queued.
//! let block = stack.allocate(1)?.pop().unwrap();
//! let kv = vec![42u8; stack.g1().layout().block_bytes()];
//! stack.g1().layout().write_block(block.block_id(), &kv)?;
//! let registered = stack.register(vec![block.stage(SequenceHash::new(1), 16)?], EngineSync::Ready)?;
//! drop(registered);
//! stack.flush(); // tests only: wait for the offload
//! assert!(stack.g2().contains(SequenceHash::new(1)));
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
pub mod transfer;

pub use cuda::{CudaDevice, CudaEvent};
pub use disk::{DiskError, DiskTier};
pub use error::{LayoutError, PointerKind, Side, StorageError, TensorError, TransferError};
pub use faults::{FaultInjector, FaultPlan};
pub use layout::{
    BlockView, BlockViewMut, EngineFormat, Geometry, LayerMap, LayerTensor, Layout, LayoutConfig,
    LayoutKind, Region,
};
pub use nvml::{GpuInfo, discover_gpus};
pub use remote::{Namespace, RemoteConfig, RemoteStore};
pub use stack::{TierStack, TierStackBuilder};
pub use storage::{DeviceStorage, MemoryKind, PinnedStorage, Storage, SystemStorage};
pub use store_tier::{
    GetOutcome, PutOutcome, SkipReason, StoreBlock, StoreError, StoreStats, StoreTier,
};
pub use transfer::{CopyOptions, Strategy, TransferEngine, TransferHandle, TransferReport};
