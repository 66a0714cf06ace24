//! CUDA helpers shared by the GPU tests (`gpu_engine.rs`, `stack_gpu.rs`): the device, landed
//! host<->device copies through the raw driver, and a gate that holds a stream back until the
//! test opens it (so "the engine's work has not run yet" is a fact, not a race).
#![allow(dead_code, unreachable_pub)]

use std::ffi::c_void;
use std::sync::{Arc, Condvar, Mutex};

use cudarc::driver::{CudaStream, sys};
use kvbm_physical::CudaDevice;

pub fn gpu() -> CudaDevice {
    CudaDevice::open(0).expect("this test needs a CUDA GPU")
}

pub fn ok(call: &str, r: sys::CUresult) {
    assert_eq!(r, sys::CUresult::CUDA_SUCCESS, "{call}");
}

/// Copies `bytes` to device address `dst`; landed when this returns.
pub fn htod(cuda: &CudaDevice, dst: u64, bytes: &[u8]) {
    cuda.context().bind_to_thread().unwrap();
    // SAFETY: `dst` is device memory of at least `bytes.len()` bytes (the caller's
    // allocation); the context is current; the synchronisation makes the copy land.
    unsafe {
        ok(
            "cuMemcpyHtoD",
            sys::cuMemcpyHtoD_v2(dst, bytes.as_ptr().cast(), bytes.len()),
        );
        ok("cuCtxSynchronize", sys::cuCtxSynchronize());
    }
}

/// `len` bytes from device address `src`, after everything the context has enqueued.
/// It synchronizes the context: never call it while a [`Gate`] holds a stream back (it
/// would wait for the gate forever).
pub fn dtoh(cuda: &CudaDevice, src: u64, len: usize) -> Vec<u8> {
    cuda.context().bind_to_thread().unwrap();
    let mut out = vec![0u8; len];
    // SAFETY: `src` is device memory of at least `len` bytes; `out` is a live buffer.
    unsafe {
        ok("cuCtxSynchronize", sys::cuCtxSynchronize());
        ok(
            "cuMemcpyDtoH",
            sys::cuMemcpyDtoH_v2(out.as_mut_ptr().cast(), src, len),
        );
    }
    out
}

/// A gate on a stream: work enqueued after [`Gate::close`] waits until [`Gate::open`].
pub struct Gate {
    state: Arc<(Mutex<bool>, Condvar)>,
}

unsafe extern "C" fn wait_for_gate(user: *mut c_void) {
    // SAFETY: `user` is the `Arc` leaked by `Gate::close`, reclaimed exactly once here.
    let state = unsafe { Arc::from_raw(user as *const (Mutex<bool>, Condvar)) };
    let (open, changed) = &*state;
    let mut open = open.lock().unwrap();
    while !*open {
        open = changed.wait(open).unwrap();
    }
}

impl Gate {
    /// Blocks `stream` (a host function waits on the gate) until `open`.
    pub fn close(stream: &CudaStream) -> Self {
        let state = Arc::new((Mutex::new(false), Condvar::new()));
        let user = Arc::into_raw(Arc::clone(&state)) as *mut c_void;
        // SAFETY: a live stream; the callback makes no CUDA call and frees `user` once.
        ok("cuLaunchHostFunc", unsafe {
            sys::cuLaunchHostFunc(stream.cu_stream(), Some(wait_for_gate), user)
        });
        Self { state }
    }

    /// Lets the gated stream go on.
    pub fn open(&self) {
        *self.state.0.lock().unwrap() = true;
        self.state.1.notify_all();
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.open(); // never leave a stream blocked behind a failed assertion
    }
}

/// Opens its gate when dropped: declared after a value whose drop waits for the gated work
/// (a transfer handle), it opens the gate first during an unwind.
pub struct OpenOnDrop<'a>(pub &'a Gate);

impl Drop for OpenOnDrop<'_> {
    fn drop(&mut self) {
        self.0.open();
    }
}
