//! The same types without the `cuda` feature: they exist but cannot be constructed.

use std::convert::Infallible;
use std::ffi::c_void;

use kvbm_kernels::reference::{LayerMap, RegionShape};

use super::Run;
use crate::error::{PointerKind, StorageError};
use crate::storage::MemoryKind;

/// A CUDA device; this build has no `cuda` feature, so [`open`](Self::open) always
/// fails with [`StorageError::CudaDisabled`].
#[derive(Clone, Debug)]
pub struct CudaDevice {
    never: Infallible,
}

impl CudaDevice {
    /// Always [`StorageError::CudaDisabled`] in this build.
    pub fn open(_ordinal: usize) -> Result<Self, StorageError> {
        Err(StorageError::CudaDisabled)
    }
    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        match self.never {}
    }
    /// The device's name.
    pub fn name(&self) -> &str {
        match self.never {}
    }
    /// `(free, total)` device memory in bytes.
    pub fn mem_info(&self) -> Result<(usize, usize), StorageError> {
        match self.never {}
    }
    /// The device's PCI bus id.
    pub fn pci_bus_id(&self) -> Result<String, StorageError> {
        match self.never {}
    }
    /// Whether the driver has the batched copy call.
    pub fn has_batched_copy(&self) -> bool {
        match self.never {}
    }
    /// CUDA events this handle has created so far.
    pub fn events_created(&self) -> usize {
        match self.never {}
    }
    /// Whether the copy kernels are already loaded for this handle.
    pub fn kernels_loaded(&self) -> bool {
        match self.never {}
    }
    pub(crate) fn synchronize(&self) -> Result<(), StorageError> {
        match self.never {}
    }
    pub(crate) fn copy_async(&self, _: &[Run]) -> Result<(), (usize, StorageError)> {
        match self.never {}
    }
    pub(crate) fn copy_batched(
        &self,
        _: &[Run],
        _: MemoryKind,
        _: MemoryKind,
    ) -> Result<(), StorageError> {
        match self.never {}
    }
    /// Whether the copy kernels are usable.
    pub fn has_kernels(&self) -> bool {
        match self.never {}
    }
    pub(crate) fn copy_kernel(&self, _: &[Run]) -> Result<(), StorageError> {
        match self.never {}
    }
    pub(crate) fn record(&self) -> Result<CudaEvent, StorageError> {
        match self.never {}
    }
    pub(crate) fn wait_events(&self, _: &[CudaEvent]) -> Result<(), StorageError> {
        match self.never {}
    }
    pub(crate) fn copy_regions(
        &self,
        _: &[LayerMap],
        _: &[LayerMap],
        _: &[(u32, u32)],
        _: RegionShape,
    ) -> Result<(), StorageError> {
        match self.never {}
    }
    pub(crate) fn pointer_kind(&self, _: u64) -> Result<PointerKind, StorageError> {
        match self.never {}
    }
    pub(crate) fn copy_sync(&self, _: u64, _: u64, _: usize) -> Result<(), StorageError> {
        match self.never {}
    }
}

/// A CUDA event; this build has no `cuda` feature, so none can be made (there is no
/// [`CudaDevice`] to make one with).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CudaEvent {
    never: Infallible,
}

impl CudaEvent {
    /// Adopts an engine's event; unreachable in this build (no [`CudaDevice`] exists).
    ///
    /// # Safety
    /// As with the `cuda` feature: `event` is a valid CUDA event that outlives every clone.
    pub unsafe fn from_raw(device: &CudaDevice, _event: *mut c_void) -> Self {
        match device.never {}
    }
    /// Records an event on a raw stream; unreachable in this build.
    ///
    /// # Safety
    /// As with the `cuda` feature: `stream` is null or a live stream of the device.
    pub unsafe fn record_raw(
        device: &CudaDevice,
        _stream: *mut c_void,
    ) -> Result<Self, StorageError> {
        match device.never {}
    }
    /// Makes a raw stream wait for the event; unreachable in this build.
    ///
    /// # Safety
    /// As with the `cuda` feature: `stream` is null or a live stream of the device.
    pub unsafe fn wait_on_raw(&self, _stream: *mut c_void) -> Result<(), StorageError> {
        match self.never {}
    }
    /// Whether the event's work is done.
    pub fn is_complete(&self) -> bool {
        match self.never {}
    }
    /// Blocks until the event's work is done.
    pub fn synchronize(&self) -> Result<(), StorageError> {
        match self.never {}
    }
    /// The raw handle.
    pub fn as_raw(&self) -> *mut c_void {
        match self.never {}
    }
    /// The device.
    pub fn device(&self) -> &CudaDevice {
        match self.never {}
    }
    pub(crate) fn wait(&self) -> Result<(), StorageError> {
        match self.never {}
    }
}

macro_rules! no_cuda_storage {
    ($name:ident, $what:literal) => {
        #[doc = concat!($what, "; this build has no `cuda` feature, so it cannot be constructed.")]
        #[derive(Debug)]
        pub struct $name {
            never: Infallible,
        }
        impl $name {
            /// Always [`StorageError::CudaDisabled`] in this build.
            pub fn new(device: &CudaDevice, _bytes: usize) -> Result<Self, StorageError> {
                match device.never {}
            }
            /// The first byte's address.
            pub fn addr(&self) -> u64 {
                match self.never {}
            }
            /// Size in bytes.
            pub fn len(&self) -> usize {
                match self.never {}
            }
            /// Always false.
            pub fn is_empty(&self) -> bool {
                match self.never {}
            }
            #[allow(dead_code)]
            pub(crate) fn ordinal(&self) -> usize {
                match self.never {}
            }
        }
    };
}

no_cuda_storage!(PinnedStorage, "Page-locked host memory");
no_cuda_storage!(DeviceStorage, "GPU memory");
