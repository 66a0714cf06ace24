//! Pinned host and device memory, with the `cuda` feature.

use std::fmt;

use cudarc::driver::sys;

use super::CudaDevice;
use crate::error::StorageError;
use crate::storage::MemoryKind;

/// Page-locked host memory (`cuMemHostAlloc`, portable and device-mapped), zeroed at
/// allocation.
pub struct PinnedStorage {
    ptr: *mut u8,
    len: usize,
    device: CudaDevice,
}

// SAFETY: the allocation is owned by this value and reached only through raw copies
// under the layout's block locks.
unsafe impl Send for PinnedStorage {}
// SAFETY: as above.
unsafe impl Sync for PinnedStorage {}

impl PinnedStorage {
    /// Allocates `bytes` of pinned host memory.
    pub fn new(device: &CudaDevice, bytes: usize) -> Result<Self, StorageError> {
        if bytes == 0 {
            return Err(StorageError::ZeroSize);
        }
        device.bind()?;
        let flags = sys::CU_MEMHOSTALLOC_PORTABLE | sys::CU_MEMHOSTALLOC_DEVICEMAP;
        // SAFETY: a plain allocation call with a non-zero size.
        let ptr = unsafe { cudarc::driver::result::malloc_host(bytes, flags) }.map_err(|e| {
            StorageError::AllocationFailed {
                kind: MemoryKind::Pinned,
                bytes,
                reason: e.to_string(),
            }
        })? as *mut u8;
        // SAFETY: `ptr` points to `bytes` writable bytes just allocated.
        unsafe { std::ptr::write_bytes(ptr, 0, bytes) };
        Ok(Self {
            ptr,
            len: bytes,
            device: device.clone(),
        })
    }

    /// The first byte's address.
    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl Drop for PinnedStorage {
    fn drop(&mut self) {
        if let Err(e) = self.device.bind() {
            tracing::error!(error = %e, "binding the context to free pinned memory failed");
        }
        // SAFETY: allocated by `malloc_host`; no copy holds it (layouts drop slabs last,
        // after every transfer handle that kept them alive).
        if let Err(e) = unsafe { cudarc::driver::result::free_host(self.ptr.cast()) } {
            tracing::error!(error = %e, "cuMemFreeHost failed");
        }
    }
}

impl fmt::Debug for PinnedStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedStorage")
            .field("addr", &format_args!("{:#x}", self.addr()))
            .field("len", &self.len)
            .finish()
    }
}

/// GPU memory (`cuMemAlloc`).
pub struct DeviceStorage {
    ptr: sys::CUdeviceptr,
    len: usize,
    device: CudaDevice,
}

impl DeviceStorage {
    /// Allocates `bytes` of device memory.
    pub fn new(device: &CudaDevice, bytes: usize) -> Result<Self, StorageError> {
        if bytes == 0 {
            return Err(StorageError::ZeroSize);
        }
        device.bind()?;
        // SAFETY: a plain allocation call with a non-zero size.
        let ptr = unsafe { cudarc::driver::result::malloc_sync(bytes) }.map_err(|e| {
            StorageError::AllocationFailed {
                kind: MemoryKind::Device {
                    ordinal: device.ordinal(),
                },
                bytes,
                reason: e.to_string(),
            }
        })?;
        Ok(Self {
            ptr,
            len: bytes,
            device: device.clone(),
        })
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.device.ordinal()
    }

    /// The device pointer.
    pub fn addr(&self) -> u64 {
        self.ptr
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl Drop for DeviceStorage {
    fn drop(&mut self) {
        if let Err(e) = self.device.bind() {
            tracing::error!(error = %e, "binding the context to free device memory failed");
        }
        // SAFETY: allocated by `malloc_sync`; no copy holds it (see PinnedStorage).
        if let Err(e) = unsafe { cudarc::driver::result::free_sync(self.ptr) } {
            tracing::error!(error = %e, "cuMemFree failed");
        }
    }
}

impl fmt::Debug for DeviceStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceStorage")
            .field("ordinal", &self.ordinal())
            .field("addr", &format_args!("{:#x}", self.ptr))
            .field("len", &self.len)
            .finish()
    }
}
