//! Memory slabs: [`SystemStorage`] (always available, the CPU fallback), and the CUDA ones,
//! [`PinnedStorage`] and [`DeviceStorage`], which need the `cuda` feature and a driver.
//!
//! A slab is raw memory addressed by number (`u64`, as CUDA does): kvbm never hands out a
//! Rust reference into it. Bytes move in and out by copies ([`Layout::read_block`],
//! [`Layout::write_block`], the [`TransferEngine`]), each of which holds the block's lock for
//! its duration, so two copies never touch the same block at once.
//!
//! [`Layout::read_block`]: crate::Layout::read_block
//! [`Layout::write_block`]: crate::Layout::write_block
//! [`TransferEngine`]: crate::TransferEngine

use std::alloc::{self, Layout as AllocLayout};
use std::fmt;
use std::ptr::NonNull;

use crate::error::StorageError;

pub use crate::cuda::{DeviceStorage, PinnedStorage};

/// Where a slab's bytes live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MemoryKind {
    /// Pageable host memory from the Rust allocator.
    System,
    /// Page-locked host memory (`cuMemHostAlloc`), DMA-able by the GPU.
    Pinned,
    /// GPU memory (`cuMemAlloc`) of the device with this ordinal.
    Device {
        /// The CUDA device ordinal.
        ordinal: usize,
    },
}

impl MemoryKind {
    /// Whether the host can read and write these bytes directly.
    pub fn is_host(self) -> bool {
        !matches!(self, MemoryKind::Device { .. })
    }
}

impl fmt::Display for MemoryKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemoryKind::System => f.write_str("system"),
            MemoryKind::Pinned => f.write_str("pinned"),
            MemoryKind::Device { ordinal } => write!(f, "device {ordinal}"),
        }
    }
}

/// Zeroed, aligned host memory from the Rust allocator: the CPU fallback for every tier.
///
/// ```
/// use kvbm_physical::SystemStorage;
/// let slab = SystemStorage::new(1 << 20)?;
/// assert_eq!(slab.len(), 1 << 20);
/// assert_eq!(slab.addr() % SystemStorage::DEFAULT_ALIGN as u64, 0);
/// # Ok::<(), kvbm_physical::StorageError>(())
/// ```
pub struct SystemStorage {
    ptr: NonNull<u8>,
    layout: AllocLayout,
}

// SAFETY: the slab is plain memory owned by this value; kvbm only reaches it through raw
// copies that hold the per-block locks of the layout using it.
unsafe impl Send for SystemStorage {}
// SAFETY: as above; `&SystemStorage` exposes only the address and length.
unsafe impl Sync for SystemStorage {}

impl SystemStorage {
    /// The default alignment: a page, which also suits 16-byte vector copies and O_DIRECT.
    pub const DEFAULT_ALIGN: usize = 4096;

    /// Allocates `bytes` zeroed bytes aligned to [`DEFAULT_ALIGN`](Self::DEFAULT_ALIGN).
    pub fn new(bytes: usize) -> Result<Self, StorageError> {
        Self::with_alignment(bytes, Self::DEFAULT_ALIGN)
    }

    /// Allocates `bytes` zeroed bytes aligned to `align` (a power of two).
    ///
    /// ```
    /// use kvbm_physical::{StorageError, SystemStorage};
    /// assert_eq!(SystemStorage::new(0).err(), Some(StorageError::ZeroSize));
    /// assert!(matches!(SystemStorage::with_alignment(64, 3), Err(StorageError::BadAlignment { .. })));
    /// ```
    pub fn with_alignment(bytes: usize, align: usize) -> Result<Self, StorageError> {
        if bytes == 0 {
            return Err(StorageError::ZeroSize);
        }
        let layout = AllocLayout::from_size_align(bytes, align)
            .map_err(|_| StorageError::BadAlignment { align, bytes })?;
        // SAFETY: `layout` has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).ok_or_else(|| StorageError::AllocationFailed {
            kind: MemoryKind::System,
            bytes,
            reason: "the allocator returned null".into(),
        })?;
        Ok(Self { ptr, layout })
    }

    /// The first byte's address.
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// The slab's size in bytes (never zero).
    pub fn len(&self) -> usize {
        self.layout.size()
    }

    /// Always false: a slab is never empty. Present for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl Drop for SystemStorage {
    fn drop(&mut self) {
        // SAFETY: allocated in `with_alignment` with exactly this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

impl fmt::Debug for SystemStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SystemStorage")
            .field("addr", &format_args!("{:#x}", self.addr()))
            .field("len", &self.len())
            .finish()
    }
}

/// One slab of any kind; a [`Layout`](crate::Layout) owns one (fully contiguous) or one per
/// layer (layer-separate).
#[derive(Debug)]
pub enum Storage {
    /// Host memory from the Rust allocator.
    System(SystemStorage),
    /// Page-locked host memory.
    Pinned(PinnedStorage),
    /// GPU memory.
    Device(DeviceStorage),
}

impl Storage {
    /// Allocates `bytes` of `kind` memory; pinned and device memory need `cuda`'s device.
    ///
    /// ```
    /// use kvbm_physical::{MemoryKind, Storage, StorageError};
    /// let slab = Storage::allocate(MemoryKind::System, 4096, None)?;
    /// assert_eq!(slab.kind(), MemoryKind::System);
    /// // Device memory without a CUDA device is a typed error, never a panic.
    /// assert!(Storage::allocate(MemoryKind::Device { ordinal: 0 }, 4096, None).is_err());
    /// # Ok::<(), StorageError>(())
    /// ```
    pub fn allocate(
        kind: MemoryKind,
        bytes: usize,
        cuda: Option<&crate::CudaDevice>,
    ) -> Result<Self, StorageError> {
        match (kind, cuda) {
            (MemoryKind::System, _) => SystemStorage::new(bytes).map(Storage::System),
            (MemoryKind::Pinned, Some(cuda)) => {
                PinnedStorage::new(cuda, bytes).map(Storage::Pinned)
            }
            (MemoryKind::Device { ordinal }, Some(cuda)) if ordinal == cuda.ordinal() => {
                DeviceStorage::new(cuda, bytes).map(Storage::Device)
            }
            (MemoryKind::Device { ordinal }, Some(cuda)) => {
                Err(StorageError::NoCudaDevice(format!(
                    "device {ordinal} asked for with a handle to device {}",
                    cuda.ordinal()
                )))
            }
            (_, None) => Err(if cfg!(feature = "cuda") {
                StorageError::NoCudaDevice(format!("{kind} memory needs a CudaDevice"))
            } else {
                StorageError::CudaDisabled
            }),
        }
    }

    /// Where the bytes live.
    pub fn kind(&self) -> MemoryKind {
        match self {
            Storage::System(_) => MemoryKind::System,
            Storage::Pinned(_) => MemoryKind::Pinned,
            Storage::Device(s) => MemoryKind::Device {
                ordinal: s.ordinal(),
            },
        }
    }

    /// The first byte's address (a host pointer, or a CUDA device pointer).
    pub fn addr(&self) -> u64 {
        match self {
            Storage::System(s) => s.addr(),
            Storage::Pinned(s) => s.addr(),
            Storage::Device(s) => s.addr(),
        }
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        match self {
            Storage::System(s) => s.len(),
            Storage::Pinned(s) => s.len(),
            Storage::Device(s) => s.len(),
        }
    }

    /// Always false: a slab is never empty.
    pub fn is_empty(&self) -> bool {
        false
    }
}
