//! CUDA events shared between kvbm and the inference engine, with the `cuda` feature.

use std::ffi::c_void;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use cudarc::driver::{CudaStream, sys};

use super::CudaDevice;
use super::device::check;
use crate::error::StorageError;

/// Who destroys the event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    /// kvbm's: back to the device's pool (or destroyed) when the last clone drops.
    Pooled,
    /// The engine's: never destroyed by kvbm.
    Engine,
}

struct Inner {
    raw: sys::CUevent,
    device: CudaDevice,
    origin: Origin,
    /// False once a driver call on it failed: then it is destroyed, not pooled.
    healthy: AtomicBool,
}

// SAFETY: a CUDA event handle is an opaque driver object that may be recorded, queried,
// waited on and destroyed from any thread; the device handle is Send + Sync.
unsafe impl Send for Inner {}
// SAFETY: as above; `&Inner` only reads the handle and the atomic flag.
unsafe impl Sync for Inner {}

impl Drop for Inner {
    fn drop(&mut self) {
        if self.origin == Origin::Pooled {
            self.device
                .release_event(self.raw, self.healthy.load(Ordering::Relaxed));
        }
    }
}

/// A CUDA event: a point in a stream's work that another stream, or the host, can wait for.
/// It is how kvbm's copies are ordered against the inference engine's kernels without a
/// host synchronisation:
/// - the engine records an event after the kernels that wrote some blocks (or lets kvbm
///   record one on its stream, [`record`](Self::record)), and a transfer that reads those
///   blocks waits for it on kvbm's copy stream ([`CopyOptions::wait_for`]);
/// - a transfer's [`completion_event`](crate::TransferHandle::completion_event) is what the
///   engine's stream waits for ([`wait_on`](Self::wait_on)) before its kernels read
///   onboarded blocks.
///
/// Cheap to clone (reference counted), `Send + Sync`. kvbm's own events return to the
/// device's pool when the last clone drops, so a clone stays valid as long as it is held;
/// an event adopted with [`from_raw`](Self::from_raw) is never destroyed by kvbm.
///
/// [`CopyOptions::wait_for`]: crate::CopyOptions::wait_for
///
/// ```
/// use kvbm_physical::{CudaDevice, CudaEvent, StorageError};
/// match CudaDevice::open(0) {
///     Ok(gpu) => {
///         // The engine's stream would be handed over; here, one of cudarc's.
///         let stream = gpu.context().new_stream().expect("a stream");
///         let event = CudaEvent::record(&gpu, &stream)?;
///         event.synchronize()?;
///         assert!(event.is_complete());
///     }
///     Err(e) => println!("no GPU: {e}"), // CPU-only machines: no events to make
/// }
/// # Ok::<(), StorageError>(())
/// ```
#[derive(Clone)]
pub struct CudaEvent {
    inner: Arc<Inner>,
}

impl CudaEvent {
    /// An event of kvbm's pool on `device`, already recorded by the caller (or to be).
    pub(crate) fn pooled(device: &CudaDevice, raw: sys::CUevent) -> Self {
        Self {
            inner: Arc::new(Inner {
                raw,
                device: device.clone(),
                origin: Origin::Pooled,
                healthy: AtomicBool::new(true),
            }),
        }
    }

    /// Marks the event broken: it is destroyed, not pooled, when the last clone drops.
    pub(crate) fn poison(&self) {
        self.inner.healthy.store(false, Ordering::Relaxed);
    }

    /// Adopts an event the engine created (a `CUevent`, or a CUDA runtime `cudaEvent_t`,
    /// which is the same handle; PyTorch's `torch.cuda.Event.cuda_event`). kvbm never
    /// destroys it. A transfer that waits for it waits for the work recorded in it when the
    /// transfer is issued (`cuStreamWaitEvent` semantics); an event never recorded is
    /// complete.
    ///
    /// # Safety
    /// `event` is a valid CUDA event, and stays valid (not destroyed) until every clone of
    /// the returned value has dropped — clones live in [`CopyOptions`](crate::CopyOptions)
    /// and are held during the call of the transfer that waits on them.
    pub unsafe fn from_raw(device: &CudaDevice, event: *mut c_void) -> Self {
        Self {
            inner: Arc::new(Inner {
                raw: event.cast(),
                device: device.clone(),
                origin: Origin::Engine,
                healthy: AtomicBool::new(true),
            }),
        }
    }

    /// Records a new event (from the device's pool) after the work enqueued so far on the
    /// engine's `stream`: what a transfer that must follow that work waits for.
    pub fn record(device: &CudaDevice, stream: &CudaStream) -> Result<Self, StorageError> {
        // SAFETY: a live cudarc stream (borrowed for the call) of the device's context.
        unsafe { Self::record_raw(device, stream.cu_stream().cast()) }
    }

    /// [`record`](Self::record) on a raw stream handle (`CUstream`, or a runtime
    /// `cudaStream_t`; PyTorch's `torch.cuda.Stream.cuda_stream`). Null is the legacy
    /// default stream.
    ///
    /// # Safety
    /// `stream` is null or a live stream of `device`'s primary context (the one the CUDA
    /// runtime and PyTorch use), for the duration of the call.
    pub unsafe fn record_raw(
        device: &CudaDevice,
        stream: *mut c_void,
    ) -> Result<Self, StorageError> {
        let event = device.take_event()?;
        // SAFETY: a live event of the device's context (current after `take_event`); the
        // stream is the caller's contract.
        check("cuEventRecord", unsafe {
            sys::cuEventRecord(event.inner.raw, stream.cast())
        })
        .inspect_err(|_| event.poison())?;
        Ok(event)
    }

    /// Makes the work enqueued on `stream` after this call wait until the event's work is
    /// done (`cuStreamWaitEvent`); the host does not wait.
    pub fn wait_on(&self, stream: &CudaStream) -> Result<(), StorageError> {
        // SAFETY: a live cudarc stream, borrowed for the call.
        unsafe { self.wait_on_raw(stream.cu_stream().cast()) }
    }

    /// [`wait_on`](Self::wait_on) for a raw stream handle (null: the legacy default stream).
    ///
    /// # Safety
    /// `stream` is null or a live stream of `device`'s primary context, for the call.
    pub unsafe fn wait_on_raw(&self, stream: *mut c_void) -> Result<(), StorageError> {
        self.inner.device.bind()?;
        // SAFETY: a live event (this value holds it); the stream is the caller's contract.
        check("cuStreamWaitEvent", unsafe {
            sys::cuStreamWaitEvent(stream.cast(), self.inner.raw, 0)
        })
    }

    /// Whether the event's work is done (never blocks). An error from the driver counts as
    /// not done; [`synchronize`](Self::synchronize) reports it.
    pub fn is_complete(&self) -> bool {
        // SAFETY: a live event (a query needs no current context).
        let status = unsafe { sys::cuEventQuery(self.inner.raw) };
        status == sys::CUresult::CUDA_SUCCESS
    }

    /// Blocks the calling thread until the event's work is done.
    pub fn synchronize(&self) -> Result<(), StorageError> {
        self.inner.device.bind()?;
        // SAFETY: a live event.
        check("cuEventSynchronize", unsafe {
            sys::cuEventSynchronize(self.inner.raw)
        })
        .inspect_err(|_| self.poison())
    }

    /// The raw handle (a `CUevent`, usable as a runtime `cudaEvent_t`), for an engine that
    /// waits on it itself. Valid while this value or a clone lives.
    pub fn as_raw(&self) -> *mut c_void {
        self.inner.raw.cast()
    }

    /// The device the event was made or adopted with.
    pub fn device(&self) -> &CudaDevice {
        &self.inner.device
    }

    /// The handle, for kvbm's own driver calls.
    pub(crate) fn raw(&self) -> sys::CUevent {
        self.inner.raw
    }

    /// Waits for a transfer's completion. Should that fail, the copy stream is drained too
    /// before returning, so no copy of the batch still runs when the caller releases its
    /// memory.
    pub(crate) fn wait(&self) -> Result<(), StorageError> {
        let waited = self.synchronize();
        if waited.is_err() {
            let _ = self.inner.device.synchronize();
        }
        waited
    }
}

impl PartialEq for CudaEvent {
    /// The same driver event.
    fn eq(&self, other: &Self) -> bool {
        self.inner.raw == other.inner.raw
    }
}

impl Eq for CudaEvent {}

impl fmt::Debug for CudaEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CudaEvent")
            .field("raw", &self.inner.raw)
            .field("origin", &self.inner.origin)
            .field("device", &self.inner.device.ordinal())
            .finish()
    }
}
