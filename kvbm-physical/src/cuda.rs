//! CUDA through cudarc, loaded at run time: the [`CudaDevice`] handle (context and copy
//! stream), [`PinnedStorage`], [`DeviceStorage`], the [`CudaEvent`]s that order kvbm's copies
//! against the engine's kernels, and the copy calls the transfer engine uses. Without the `cuda` feature the same types exist but cannot be constructed:
//! [`CudaDevice::open`] returns [`StorageError::CudaDisabled`](crate::StorageError::CudaDisabled).
//!
//! Driver calls on the copy paths are raw (`cudarc::driver::sys`) after binding the context
//! with `cuCtxSetCurrent`. cudarc's safe wrappers first return any error that one of its
//! destructors stored earlier (a failed event or stream destroy), which would make an
//! unrelated call fail and be reported as the wrong call; kvbm clears such a stored error
//! when it binds and logs it (`tracing`, warn level) as what it is.

#[cfg(feature = "cuda")]
mod device;
#[cfg(feature = "cuda")]
mod event;
#[cfg(feature = "cuda")]
mod memory;
#[cfg(feature = "cuda")]
pub use device::*;
#[cfg(feature = "cuda")]
pub use event::*;
#[cfg(feature = "cuda")]
pub use memory::*;

#[cfg(not(feature = "cuda"))]
mod disabled;
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

/// Which entry point of the driver's batched copy to call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) enum BatchedApi {
    /// `cuMemcpyBatchAsync_v2` (CUDA 13.0+ drivers).
    V2,
    /// `cuMemcpyBatchAsync` with its `failIdx` argument (CUDA 12.8 and 12.9 drivers).
    V1,
}

/// The batched copy entry point to use, given which symbols the driver exports: the 13.0
/// one where present, else the 12.8 one, else none (older drivers).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn choose_batched_api(has_v2: bool, has_v1: bool) -> Option<BatchedApi> {
    match (has_v2, has_v1) {
        (true, _) => Some(BatchedApi::V2),
        (false, true) => Some(BatchedApi::V1),
        (false, false) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_batched_copy_entry_point_follows_the_driver() {
        // A 13.0+ driver exports both names: the 13.0 one is used.
        assert_eq!(choose_batched_api(true, true), Some(BatchedApi::V2));
        assert_eq!(choose_batched_api(true, false), Some(BatchedApi::V2));
        // 12.8 and 12.9 export only the first version (with `failIdx`).
        assert_eq!(choose_batched_api(false, true), Some(BatchedApi::V1));
        // Older drivers have neither: no batched strategy.
        assert_eq!(choose_batched_api(false, false), None);
    }
}
