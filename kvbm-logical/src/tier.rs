//! Zero-sized tier markers: the `T` in `BlockManager<T>` and every handle.
//!
//! The marker makes a block of one tier unusable with a manager of another **at compile
//! time**: a host block cannot be registered in a device manager.
//!
//! ```compile_fail,E0308
//! use kvbm_logical::{BlockManager, Device, Host};
//! let device = BlockManager::<Device>::builder().block_count(2).block_size(4).build().unwrap();
//! let host = BlockManager::<Host>::builder().block_count(2).block_size(4).build().unwrap();
//! let block = host.allocate_blocks(1).unwrap().pop().unwrap();
//! let complete = block.stage(1.into(), 4).unwrap();
//! device.register_block(complete); // error: expected CompleteBlock<Device>
//! ```

use std::fmt::Debug;

/// A memory tier. Implemented by zero-sized marker types; implement it for your own marker to
/// add a tier.
///
/// ```
/// use kvbm_logical::BlockTier;
/// #[derive(Debug)]
/// struct RemoteStore;
/// impl BlockTier for RemoteStore {
///     const NAME: &'static str = "remote";
/// }
/// assert_eq!(RemoteStore::NAME, "remote");
/// assert_eq!(RemoteStore::MEDIUM, "remote"); // the default: the name
/// assert_eq!(kvbm_logical::Device::MEDIUM, "GPU");
/// ```
pub trait BlockTier: Debug + Send + Sync + 'static {
    /// Short lowercase name, used in logs and metric labels.
    const NAME: &'static str;

    /// The storage medium, as KV-event consumers name it (vLLM's `medium` field: `"GPU"`,
    /// `"CPU"`, `"DISK"`). Every [`KvEvent`](crate::KvEvent) carries it. Defaults to
    /// [`NAME`](Self::NAME).
    const MEDIUM: &'static str = Self::NAME;
}

/// GPU memory (G1): where the engine computes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Device;

/// Host memory, usually pinned (G2): the first offload tier.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Host;

/// Local disk (G3).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Disk;

impl BlockTier for Device {
    const NAME: &'static str = "device";
    const MEDIUM: &'static str = "GPU";
}

impl BlockTier for Host {
    const NAME: &'static str = "host";
    const MEDIUM: &'static str = "CPU";
}

impl BlockTier for Disk {
    const NAME: &'static str = "disk";
    const MEDIUM: &'static str = "DISK";
}
