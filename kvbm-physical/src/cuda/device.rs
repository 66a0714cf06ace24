//! The CUDA device handle and the copy calls, with the `cuda` feature.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use cudarc::driver::{CudaContext, CudaStream, DriverError, sys};
use kvbm_kernels::launch::Kernels;
use kvbm_kernels::reference::{LayerMap, RegionShape};
use parking_lot::Mutex;

use super::{BatchedApi, CudaEvent, Run, choose_batched_api};
use crate::error::{PointerKind, StorageError};
use crate::storage::MemoryKind;

/// Idle completion events one device keeps for reuse; beyond this they are destroyed.
const EVENT_POOL: usize = 64;

/// The CUDA 12.8 signature of `cuMemcpyBatchAsync` (13.0 renamed it `_v2` without
/// `failIdx`; cudarc binds one or the other by build feature, so the other is loaded
/// here by hand).
type BatchV1 = unsafe extern "C" fn(
    *mut sys::CUdeviceptr,
    *mut sys::CUdeviceptr,
    *mut usize,
    usize,
    *mut sys::CUmemcpyAttributes,
    *mut usize,
    usize,
    *mut usize,
    sys::CUstream,
) -> sys::CUresult;

fn cuda_err(call: &'static str) -> impl FnOnce(DriverError) -> StorageError {
    move |e| StorageError::Cuda {
        call,
        error: e.to_string(),
    }
}

pub(super) fn check(call: &'static str, result: sys::CUresult) -> Result<(), StorageError> {
    result.result().map_err(cuda_err(call))
}

/// An event handle; CUDA events may be used from any thread.
struct RawEvent(sys::CUevent);
// SAFETY: a CUDA event handle is an opaque, thread-safe driver object.
unsafe impl Send for RawEvent {}

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
    /// Transfers.
    stream: Arc<CudaStream>,
    /// Single-block reads and writes (`Layout::read_block` / `write_block`), which wait
    /// for their copy: a stream of their own, so they never wait behind a transfer.
    io: Arc<CudaStream>,
    name: String,
    batched: Option<BatchedApi>,
    batched_v1: Option<BatchV1>,
    /// The copy kernels, compiled (NVRTC) on first use; the error, if that failed.
    kernels: OnceLock<Result<Arc<Kernels>, String>>,
    /// Completion events not in use (at most `EVENT_POOL`).
    events: Mutex<Vec<RawEvent>>,
    events_created: AtomicUsize,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let events = std::mem::take(self.events.get_mut());
        if events.is_empty() {
            return;
        }
        if let Err(e) = bind_ctx(&self.ctx) {
            tracing::error!(error = %e, "cannot bind the context to destroy pooled events");
            return;
        }
        for event in events {
            // SAFETY: an event created by `record`, idle (in the pool), destroyed once.
            if let Err(e) = check("cuEventDestroy", unsafe { sys::cuEventDestroy_v2(event.0) }) {
                tracing::error!(error = %e, "destroying a pooled CUDA event failed");
            }
        }
    }
}

/// Makes `ctx` current on this thread with the raw driver calls. An error that cudarc
/// stored earlier (in a destructor, which could not return it) is cleared and logged
/// here: it belongs to that earlier release, not to this bind or what follows.
fn bind_ctx(ctx: &CudaContext) -> Result<(), StorageError> {
    let target = ctx.cu_ctx();
    let stored = bind_steps(
        ctx.check_err(),
        target,
        || {
            let mut current: sys::CUcontext = std::ptr::null_mut();
            // SAFETY: the out-pointer is a live local.
            unsafe { sys::cuCtxGetCurrent(&mut current) }
                .result()
                .map(|()| current)
        },
        // SAFETY: `ctx` is a live context (the caller holds it).
        || unsafe { sys::cuCtxSetCurrent(target) }.result(),
    )
    .map_err(|(call, e)| cuda_err(call)(e))?;
    if let Some(stored) = stored {
        tracing::warn!(
            error = %stored,
            "a CUDA error stored by an earlier cudarc release (event, stream or context \
             destroy) was cleared"
        );
    }
    Ok(())
}

/// The steps of [`bind_ctx`] over the driver calls it makes: `stored` is cudarc's deferred
/// error (cleared, never a reason to fail: it is handed back for logging), then the current
/// context is read and set to `target` when it differs. A failure comes back with the call
/// that failed.
fn bind_steps(
    stored: Result<(), DriverError>,
    target: sys::CUcontext,
    current: impl FnOnce() -> Result<sys::CUcontext, DriverError>,
    set_current: impl FnOnce() -> Result<(), DriverError>,
) -> Result<Option<DriverError>, (&'static str, DriverError)> {
    if current().map_err(|e| ("cuCtxGetCurrent", e))? != target {
        set_current().map_err(|e| ("cuCtxSetCurrent", e))?;
    }
    Ok(stored.err())
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
        // cudarc's first `new_stream` on a context object that tracks events synchronizes
        // the whole context, which is the engine's too (the primary context): opening kvbm's
        // device inside a running server would wait for all of the engine's queued work, and
        // forever if one of its streams waits on the host. kvbm allocates no `CudaSlice`
        // (its memory and copies are raw driver calls ordered by its own events), so it
        // needs no tracking.
        // SAFETY: nothing on this context object uses cudarc's per-slice event tracking
        // (see [`CudaDevice::context`]).
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(cuda_err("cuStreamCreate"))?;
        let io = ctx.new_stream().map_err(cuda_err("cuStreamCreate"))?;
        let name = ctx
            .name()
            .unwrap_or_else(|_| format!("CUDA device {ordinal}"));
        // SAFETY: the library is present (checked above); `get` only looks symbols up,
        // and the V1 pointer is used only with the signature its 12.8 header declares.
        let (has_v2, batched_v1) = unsafe {
            let lib = sys::culib();
            (
                lib.get::<unsafe extern "C" fn()>(b"cuMemcpyBatchAsync_v2")
                    .is_ok(),
                lib.get::<BatchV1>(b"cuMemcpyBatchAsync").ok().map(|f| *f),
            )
        };
        Ok(Self {
            inner: Arc::new(Inner {
                ctx,
                stream,
                io,
                name,
                batched: choose_batched_api(has_v2, batched_v1.is_some()),
                batched_v1,
                kernels: OnceLock::new(),
                events: Mutex::new(Vec::new()),
                events_created: AtomicUsize::new(0),
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

    /// The cudarc context (the device's primary context), for engines that launch their
    /// own work next to kvbm's copies. Its cudarc event tracking is off (so that opening
    /// the device never synchronizes the engine's work): a `CudaSlice` allocated through
    /// this object does not order itself across streams. An engine that relies on that
    /// tracking uses its own `CudaContext::new(ordinal)` (the same primary context).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.inner.ctx
    }

    /// The device's PCI bus id as the driver reports it (`cuDeviceGetPCIBusId`, e.g.
    /// `0000:3b:00.0`): what ties a CUDA ordinal to an NVML index
    /// ([`discover_gpus`](crate::discover_gpus)).
    pub fn pci_bus_id(&self) -> Result<String, StorageError> {
        crate::nvml::cuda_pci_bus_id(self.ordinal())
    }

    /// `(free, total)` device memory in bytes, as the driver reports it now.
    pub fn mem_info(&self) -> Result<(usize, usize), StorageError> {
        self.bind()?;
        let (mut free, mut total) = (0, 0);
        // SAFETY: the context is current; the out-pointers are live locals.
        check("cuMemGetInfo", unsafe {
            sys::cuMemGetInfo_v2(&mut free, &mut total)
        })?;
        Ok((free, total))
    }

    /// Whether the driver has the batched copy call: `cuMemcpyBatchAsync` (CUDA 12.8 and
    /// 12.9 drivers) or `cuMemcpyBatchAsync_v2` (13.0 and later).
    pub fn has_batched_copy(&self) -> bool {
        self.inner.batched.is_some()
    }

    /// CUDA events this handle has created so far. Transfers take their completion event
    /// from a pool and give it back, so this stays at the number of transfers that were
    /// in flight at once, however many ran.
    pub fn events_created(&self) -> usize {
        self.inner.events_created.load(Ordering::Relaxed)
    }

    pub(crate) fn bind(&self) -> Result<(), StorageError> {
        bind_ctx(&self.inner.ctx)
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

    /// Enqueues all runs with one batched driver call.
    pub(crate) fn copy_batched(
        &self,
        runs: &[Run],
        src: MemoryKind,
        dst: MemoryKind,
    ) -> Result<(), StorageError> {
        let Some(api) = self.inner.batched else {
            return Err(StorageError::Cuda {
                call: "cuMemcpyBatchAsync",
                error: "not provided by this driver (CUDA 12.8 or later needed)".into(),
            });
        };
        if runs.is_empty() {
            return Ok(());
        }
        self.bind()?;
        let mut dsts: Vec<sys::CUdeviceptr> = runs.iter().map(|r| r.dst).collect();
        let mut srcs: Vec<sys::CUdeviceptr> = runs.iter().map(|r| r.src).collect();
        let mut sizes: Vec<usize> = runs.iter().map(|r| r.len).collect();
        let location = |kind: MemoryKind| sys::CUmemLocation {
            type_: match kind {
                MemoryKind::Device { .. } => sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
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
        let stream = self.inner.stream.cu_stream();
        let result = match (api, self.inner.batched_v1) {
            // SAFETY: the arrays hold `runs.len()` entries each and outlive the call (the
            // driver reads them during the call); the ranges are valid as in
            // `copy_async`; `_v2` is present (probed at open).
            (BatchedApi::V2, _) => unsafe {
                sys::cuMemcpyBatchAsync_v2(
                    dsts.as_mut_ptr(),
                    srcs.as_mut_ptr(),
                    sizes.as_mut_ptr(),
                    runs.len(),
                    &mut attrs,
                    &mut attr_index,
                    1,
                    stream,
                )
            },
            (BatchedApi::V1, Some(v1)) => {
                let mut fail_index = usize::MAX;
                // SAFETY: as above, through the 12.8 entry point with its signature;
                // `fail_index` is a live local.
                unsafe {
                    v1(
                        dsts.as_mut_ptr(),
                        srcs.as_mut_ptr(),
                        sizes.as_mut_ptr(),
                        runs.len(),
                        &mut attrs,
                        &mut attr_index,
                        1,
                        &mut fail_index,
                        stream,
                    )
                }
            }
            (BatchedApi::V1, None) => sys::CUresult::CUDA_ERROR_NOT_FOUND,
        };
        check("cuMemcpyBatchAsync", result)
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

    /// Whether the copy kernels are already loaded for this handle (never compiles).
    pub fn kernels_loaded(&self) -> bool {
        self.inner.kernels.get().is_some_and(Result::is_ok)
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

    /// An event from the device's pool (created when the pool is empty), not recorded yet;
    /// the context is current when this returns.
    pub(crate) fn take_event(&self) -> Result<CudaEvent, StorageError> {
        self.bind()?;
        let pooled = self.inner.events.lock().pop();
        let raw = match pooled {
            Some(event) => event.0,
            None => {
                let mut raw: sys::CUevent = std::ptr::null_mut();
                // SAFETY: the context is current; the out-pointer is a live local.
                check("cuEventCreate", unsafe {
                    sys::cuEventCreate(&mut raw, sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32)
                })?;
                self.inner.events_created.fetch_add(1, Ordering::Relaxed);
                raw
            }
        };
        Ok(CudaEvent::pooled(self, raw))
    }

    /// Records an event after everything enqueued so far on the copy stream. The event
    /// comes from the device's pool and returns there when its last clone drops.
    pub(crate) fn record(&self) -> Result<CudaEvent, StorageError> {
        let event = self.take_event()?;
        // SAFETY: a live event and stream of the current context; re-recording a pooled
        // event is allowed (its previous work completed before it was pooled).
        check("cuEventRecord", unsafe {
            sys::cuEventRecord(event.raw(), self.inner.stream.cu_stream())
        })
        .inspect_err(|_| event.poison())?;
        Ok(event)
    }

    /// Makes the copy stream wait (`cuStreamWaitEvent`, no host wait) for each event before
    /// whatever is enqueued next.
    pub(crate) fn wait_events(&self, events: &[CudaEvent]) -> Result<(), StorageError> {
        if events.is_empty() {
            return Ok(());
        }
        self.bind()?;
        let stream = self.inner.stream.cu_stream();
        for event in events {
            // SAFETY: a live stream of the current context; the event is live while
            // `events` holds it (an engine event by its `from_raw` contract).
            check("cuStreamWaitEvent", unsafe {
                sys::cuStreamWaitEvent(stream, event.raw(), 0)
            })?;
        }
        Ok(())
    }

    /// Enqueues one `kvbm_permute_regions` launch: for each pair, every layer's regions from
    /// `src_maps` to `dst_maps`. Both sides must be device-accessible.
    pub(crate) fn copy_regions(
        &self,
        src_maps: &[LayerMap],
        dst_maps: &[LayerMap],
        pairs: &[(u32, u32)],
        shape: RegionShape,
    ) -> Result<(), StorageError> {
        let kernels = self.kernels()?;
        self.bind()?;
        // SAFETY: the maps come from validated layouts of device or pinned memory of this
        // context (the transfer checked every id and holds the blocks' locks and the layouts
        // until the stream passes the event recorded after this launch); destinations are
        // distinct blocks, whose regions do not overlap (checked when the layouts were made).
        unsafe { kernels.permute_regions(&self.inner.stream, src_maps, dst_maps, pairs, shape) }
            .map_err(|e| StorageError::Cuda {
                call: "kvbm_permute_regions",
                error: e.to_string(),
            })
    }

    /// What CUDA says the byte at `addr` is: device memory (of which device), page-locked
    /// host memory, or memory it does not know.
    pub(crate) fn pointer_kind(&self, addr: u64) -> Result<PointerKind, StorageError> {
        self.bind()?;
        let mut memory_type: u32 = 0;
        // SAFETY: the attribute is an unsigned int, written into a live local.
        let result = unsafe {
            sys::cuPointerGetAttribute(
                (&mut memory_type as *mut u32).cast(),
                sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
                addr,
            )
        };
        if result == sys::CUresult::CUDA_ERROR_INVALID_VALUE {
            return Ok(PointerKind::Unregistered);
        }
        check("cuPointerGetAttribute", result)?;
        if memory_type == sys::CUmemorytype::CU_MEMORYTYPE_HOST as u32 {
            return Ok(PointerKind::Host);
        }
        if memory_type != sys::CUmemorytype::CU_MEMORYTYPE_DEVICE as u32 {
            return Ok(PointerKind::Unregistered);
        }
        let mut ordinal: i32 = -1;
        // SAFETY: the attribute is an int, written into a live local.
        check("cuPointerGetAttribute", unsafe {
            sys::cuPointerGetAttribute(
                (&mut ordinal as *mut i32).cast(),
                sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
                addr,
            )
        })?;
        Ok(PointerKind::Device {
            ordinal: usize::try_from(ordinal).unwrap_or(usize::MAX),
        })
    }

    /// Blocks until everything enqueued on the copy stream has finished.
    pub(crate) fn synchronize(&self) -> Result<(), StorageError> {
        self.bind()?;
        // SAFETY: a live stream of the current context.
        check("cuStreamSynchronize", unsafe {
            sys::cuStreamSynchronize(self.inner.stream.cu_stream())
        })
    }

    /// A copy through unified addressing that has landed when it returns (single-block
    /// reads and writes). Enqueued on the device's I/O stream, which is then
    /// synchronised: a plain `cuMemcpy` from pageable memory may return once the bytes
    /// are staged, before they reach the device, and a transfer on the (non-blocking)
    /// copy stream issued next could then read stale bytes.
    pub(crate) fn copy_sync(&self, dst: u64, src: u64, len: usize) -> Result<(), StorageError> {
        self.bind()?;
        let io = self.inner.io.cu_stream();
        // SAFETY: as in `copy_async`; the caller holds the block's lock and both
        // buffers until this returns, after the stream has drained.
        check("cuMemcpyAsync", unsafe {
            sys::cuMemcpyAsync(dst, src, len, io)
        })?;
        // SAFETY: a live stream of the current context.
        check("cuStreamSynchronize", unsafe {
            sys::cuStreamSynchronize(io)
        })
    }

    /// Gives a pooled event back to the pool, or destroys it.
    pub(super) fn release_event(&self, raw: sys::CUevent, healthy: bool) {
        if healthy {
            let mut pool = self.inner.events.lock();
            if pool.len() < EVENT_POOL {
                pool.push(RawEvent(raw));
                return;
            }
        }
        if let Err(e) = self.bind() {
            tracing::error!(error = %e, "cannot bind the context to destroy a CUDA event");
            return;
        }
        // SAFETY: an event created by `take_event`, no longer used by anyone.
        if let Err(e) = check("cuEventDestroy", unsafe { sys::cuEventDestroy_v2(raw) }) {
            tracing::error!(error = %e, "destroying a CUDA event failed");
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use cudarc::driver::sys::CUresult;

    /// A context handle for the fakes (never dereferenced).
    fn ctx(id: usize) -> sys::CUcontext {
        id as sys::CUcontext
    }

    #[test]
    fn a_stored_error_is_handed_back_and_never_fails_the_bind() {
        let stored = Err(DriverError(CUresult::CUDA_ERROR_INVALID_VALUE));
        let mut set = 0;
        let result = bind_steps(
            stored,
            ctx(8),
            || Ok(ctx(16)),
            || {
                set += 1;
                Ok(())
            },
        );
        assert_eq!(
            result,
            Ok(Some(DriverError(CUresult::CUDA_ERROR_INVALID_VALUE)))
        );
        assert_eq!(set, 1, "the context was still bound");
    }

    #[test]
    fn a_bound_context_is_not_set_again() {
        let result = bind_steps(
            Ok(()),
            ctx(8),
            || Ok(ctx(8)),
            || panic!("cuCtxSetCurrent called for the current context"),
        );
        assert_eq!(result, Ok(None));
    }

    #[test]
    fn a_failed_bind_names_the_call_that_failed() {
        let get_failed = bind_steps(
            Ok(()),
            ctx(8),
            || Err(DriverError(CUresult::CUDA_ERROR_DEINITIALIZED)),
            || Ok(()),
        );
        assert_eq!(
            get_failed,
            Err((
                "cuCtxGetCurrent",
                DriverError(CUresult::CUDA_ERROR_DEINITIALIZED)
            ))
        );
        // With a stored error too: the bind's own error is reported, not the stored one.
        let set_failed = bind_steps(
            Err(DriverError(CUresult::CUDA_ERROR_INVALID_VALUE)),
            ctx(8),
            || Ok(std::ptr::null_mut()),
            || Err(DriverError(CUresult::CUDA_ERROR_INVALID_CONTEXT)),
        );
        assert_eq!(
            set_failed,
            Err((
                "cuCtxSetCurrent",
                DriverError(CUresult::CUDA_ERROR_INVALID_CONTEXT)
            ))
        );
    }
}
