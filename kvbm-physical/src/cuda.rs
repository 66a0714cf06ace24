//! CUDA through cudarc, loaded at run time: the [`CudaDevice`] handle (context and copy
//! stream), [`PinnedStorage`], [`DeviceStorage`], and the copy calls the transfer engine
//! uses. Without the `cuda` feature the same types exist but cannot be constructed:
//! [`CudaDevice::open`] returns [`StorageError::CudaDisabled`](crate::StorageError::CudaDisabled).

#[cfg(feature = "cuda")]
pub use enabled::*;

#[cfg(not(feature = "cuda"))]
pub use disabled::*;

/// One coalesced copy: `len` bytes from `src` to `dst`; `first_pair` is the index of the
/// first batch pair whose bytes it carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Run {
    pub(crate) src: u64,
    pub(crate) dst: u64,
    pub(crate) len: usize,
    pub(crate) first_pair: usize,
}

#[cfg(feature = "cuda")]
mod enabled {
    use std::fmt;
    use std::sync::{Arc, OnceLock};

    use cudarc::driver::{CudaContext, CudaEvent, CudaStream, DriverError, sys};
    use kvbm_kernels::launch::Kernels;

    use super::Run;
    use crate::error::StorageError;
    use crate::storage::MemoryKind;

    fn cuda_err(call: &'static str) -> impl FnOnce(DriverError) -> StorageError {
        move |e| StorageError::Cuda {
            call,
            error: e.to_string(),
        }
    }

    /// An open CUDA device: its primary context and a non-blocking stream that carries
    /// kvbm's copies. Cheap to clone.
    ///
    /// ```
    /// use kvbm_physical::{CudaDevice, StorageError};
    /// match CudaDevice::open(0) {
    ///     Ok(gpu) => println!("using {}", gpu.name()),
    ///     // No driver or no GPU: a typed error, never a panic.
    ///     Err(StorageError::NoCudaDevice(why)) => println!("CPU fallback: {why}"),
    ///     Err(e) => return Err(e),
    /// }
    /// # Ok::<(), StorageError>(())
    /// ```
    #[derive(Clone)]
    pub struct CudaDevice {
        inner: Arc<Inner>,
    }

    struct Inner {
        ctx: Arc<CudaContext>,
        stream: Arc<CudaStream>,
        name: String,
        batched: bool,
        /// The copy kernels, compiled (NVRTC) on first use; the error, if that failed.
        kernels: OnceLock<Result<Arc<Kernels>, String>>,
    }

    impl CudaDevice {
        /// Opens device `ordinal`. Returns [`StorageError::NoCudaDevice`] when the driver
        /// library is absent, fails to initialise, or has no such device.
        pub fn open(ordinal: usize) -> Result<Self, StorageError> {
            // SAFETY: only tries to load the library; cudarc panics on first use of a
            // driver function when it is missing, so this probe must come first.
            if !unsafe { sys::is_culib_present() } {
                return Err(StorageError::NoCudaDevice(
                    "the CUDA driver library (libcuda.so) was not found".into(),
                ));
            }
            let count = CudaContext::device_count().map_err(|e| {
                StorageError::NoCudaDevice(format!("driver initialisation failed: {e}"))
            })?;
            if ordinal >= count.max(0) as usize {
                return Err(StorageError::NoCudaDevice(format!(
                    "device {ordinal} asked for, {count} present"
                )));
            }
            let ctx = CudaContext::new(ordinal).map_err(cuda_err("cuDevicePrimaryCtxRetain"))?;
            let stream = ctx.new_stream().map_err(cuda_err("cuStreamCreate"))?;
            let name = ctx
                .name()
                .unwrap_or_else(|_| format!("CUDA device {ordinal}"));
            // SAFETY: the library is present (checked above); `get` only looks a symbol up.
            let batched =
                unsafe { sys::culib().get::<unsafe extern "C" fn()>(b"cuMemcpyBatchAsync_v2") }
                    .is_ok();
            Ok(Self {
                inner: Arc::new(Inner {
                    ctx,
                    stream,
                    name,
                    batched,
                    kernels: OnceLock::new(),
                }),
            })
        }

        /// The device ordinal.
        pub fn ordinal(&self) -> usize {
            self.inner.ctx.ordinal()
        }

        /// The device's name.
        pub fn name(&self) -> &str {
            &self.inner.name
        }

        /// `(free, total)` device memory in bytes, as the driver reports it now.
        pub fn mem_info(&self) -> Result<(usize, usize), StorageError> {
            self.bind()?;
            self.inner
                .ctx
                .mem_get_info()
                .map_err(cuda_err("cuMemGetInfo"))
        }

        /// Whether the driver has the batched copy call (`cuMemcpyBatchAsync`, CUDA 12.8+).
        pub fn has_batched_copy(&self) -> bool {
            self.inner.batched
        }

        fn bind(&self) -> Result<(), StorageError> {
            self.inner
                .ctx
                .bind_to_thread()
                .map_err(cuda_err("cuCtxSetCurrent"))
        }

        /// Enqueues one `cuMemcpyAsync` per run on the copy stream. On failure returns the
        /// index of the run that failed (earlier runs were enqueued).
        pub(crate) fn copy_async(&self, runs: &[Run]) -> Result<(), (usize, StorageError)> {
            self.bind().map_err(|e| (0, e))?;
            let stream = self.inner.stream.cu_stream();
            for (i, run) in runs.iter().enumerate() {
                // SAFETY: both ranges lie inside live slabs (the layouts checked them and
                // the caller holds the blocks' locks and the layouts until the event
                // completes); with unified addressing the driver infers each side's memory.
                unsafe { sys::cuMemcpyAsync(run.dst, run.src, run.len, stream) }
                    .result()
                    .map_err(|e| (i, cuda_err("cuMemcpyAsync")(e)))?;
            }
            Ok(())
        }

        /// Enqueues all runs with one `cuMemcpyBatchAsync` call.
        pub(crate) fn copy_batched(
            &self,
            runs: &[Run],
            src: MemoryKind,
            dst: MemoryKind,
        ) -> Result<(), StorageError> {
            if !self.inner.batched {
                return Err(StorageError::Cuda {
                    call: "cuMemcpyBatchAsync",
                    error: "not provided by this driver".into(),
                });
            }
            if runs.is_empty() {
                return Ok(());
            }
            self.bind()?;
            let mut dsts: Vec<sys::CUdeviceptr> = runs.iter().map(|r| r.dst).collect();
            let mut srcs: Vec<sys::CUdeviceptr> = runs.iter().map(|r| r.src).collect();
            let mut sizes: Vec<usize> = runs.iter().map(|r| r.len).collect();
            let location = |kind: MemoryKind| sys::CUmemLocation {
                type_: match kind {
                    MemoryKind::Device { .. } => {
                        sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE
                    }
                    _ => sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_HOST,
                },
                id: match kind {
                    MemoryKind::Device { ordinal } => ordinal as i32,
                    _ => 0,
                },
            };
            let mut attrs = sys::CUmemcpyAttributes {
                srcAccessOrder: sys::CUmemcpySrcAccessOrder::CU_MEMCPY_SRC_ACCESS_ORDER_STREAM,
                srcLocHint: location(src),
                dstLocHint: location(dst),
                flags: 0,
            };
            let mut attr_index = 0usize;
            // SAFETY: the arrays hold `runs.len()` entries each and outlive the call (the
            // driver copies them during the call); the ranges are valid as in `copy_async`.
            unsafe {
                sys::cuMemcpyBatchAsync_v2(
                    dsts.as_mut_ptr(),
                    srcs.as_mut_ptr(),
                    sizes.as_mut_ptr(),
                    runs.len(),
                    &mut attrs,
                    &mut attr_index,
                    1,
                    self.inner.stream.cu_stream(),
                )
            }
            .result()
            .map_err(cuda_err("cuMemcpyBatchAsync"))
        }

        /// The copy kernels, compiled and loaded on first call (NVRTC must be loadable).
        fn kernels(&self) -> Result<&Arc<Kernels>, StorageError> {
            self.inner
                .kernels
                .get_or_init(|| {
                    self.bind().map_err(|e| e.to_string())?;
                    Kernels::get(&self.inner.ctx).map_err(|e| e.to_string())
                })
                .as_ref()
                .map_err(|e| StorageError::Cuda {
                    call: "kernel load",
                    error: e.clone(),
                })
        }

        /// Whether the copy kernels are usable (compiles and loads them on first call).
        pub fn has_kernels(&self) -> bool {
            self.kernels().is_ok()
        }

        /// Enqueues all runs as one `kvbm_batched_copy` launch. Both sides must be
        /// device-accessible (device memory, or pinned host memory, mapped).
        pub(crate) fn copy_kernel(&self, runs: &[Run]) -> Result<(), StorageError> {
            let kernels = self.kernels()?;
            self.bind()?;
            let srcs: Vec<u64> = runs.iter().map(|r| r.src).collect();
            let dsts: Vec<u64> = runs.iter().map(|r| r.dst).collect();
            let sizes: Vec<u64> = runs.iter().map(|r| r.len as u64).collect();
            // SAFETY: the runs lie in live device or mapped pinned slabs of this context
            // (validated by the transfer, which holds their locks and layouts until the
            // stream passes the event recorded after this launch); destinations are distinct.
            unsafe { kernels.batched_copy(&self.inner.stream, &srcs, &dsts, &sizes) }.map_err(|e| {
                StorageError::Cuda {
                    call: "kvbm_batched_copy",
                    error: e.to_string(),
                }
            })
        }

        /// Records an event after everything enqueued so far on the copy stream.
        pub(crate) fn record(&self) -> Result<Event, StorageError> {
            self.bind()?;
            self.inner
                .stream
                .record_event(None)
                .map(Event)
                .map_err(cuda_err("cuEventRecord"))
        }

        /// Synchronous copy through unified addressing (for single-block reads and writes).
        pub(crate) fn copy_sync(&self, dst: u64, src: u64, len: usize) -> Result<(), StorageError> {
            self.bind()?;
            // SAFETY: as in `copy_async`; the call returns when the copy is done.
            unsafe { sys::cuMemcpy(dst, src, len) }
                .result()
                .map_err(cuda_err("cuMemcpy"))
        }
    }

    impl fmt::Debug for CudaDevice {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("CudaDevice")
                .field("ordinal", &self.ordinal())
                .field("name", &self.inner.name)
                .field("batched_copy", &self.inner.batched)
                .finish()
        }
    }

    /// Completion of enqueued copies.
    pub(crate) struct Event(CudaEvent);

    impl Event {
        pub(crate) fn wait(&self) -> Result<(), StorageError> {
            self.0.synchronize().map_err(cuda_err("cuEventSynchronize"))
        }

        pub(crate) fn is_complete(&self) -> bool {
            self.0.is_complete()
        }
    }

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
            let _ = self.device.bind();
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
            let _ = self.device.bind();
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
}

#[cfg(not(feature = "cuda"))]
mod disabled {
    use std::convert::Infallible;

    use super::Run;
    use crate::error::StorageError;
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
        /// Whether the driver has the batched copy call.
        pub fn has_batched_copy(&self) -> bool {
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
        pub(crate) fn record(&self) -> Result<Event, StorageError> {
            match self.never {}
        }
        pub(crate) fn copy_sync(&self, _: u64, _: u64, _: usize) -> Result<(), StorageError> {
            match self.never {}
        }
    }

    pub(crate) struct Event {
        never: Infallible,
    }

    impl Event {
        pub(crate) fn wait(&self) -> Result<(), StorageError> {
            match self.never {}
        }
        pub(crate) fn is_complete(&self) -> bool {
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
}
