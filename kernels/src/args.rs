//! Reusable argument buffers for kernel launches: the region or block lists a launch reads,
//! packed into one pinned host buffer and uploaded into one device buffer of the same size.
//! A device keeps at most [`MAX_ARG_BUFFERS`] of them, each guarded by an event recorded
//! after the last launch that read it, so steady launching allocates nothing.
//!
//! Every function that calls the driver expects the owning context to be current.

use std::ffi::c_void;
use std::sync::{Condvar, Mutex};

use cudarc::driver::sys;

use crate::KernelError;
use crate::reference::LayerMap;

/// Most argument buffers (pinned host + device pairs) one device keeps; a launch that finds
/// all of them in use waits for one.
pub const MAX_ARG_BUFFERS: usize = 8;
/// Smallest argument buffer allocated (bytes); larger ones are rounded to a power of two.
/// Large enough for the regions of a usual batch (about 9,000 regions of a batched copy), so
/// that a buffer is seldom replaced: freeing one (`cuMemFree`) synchronizes the whole
/// context, the engine's streams too.
const MIN_ARG_BYTES: usize = 256 << 10;

fn check(call: &'static str, result: sys::CUresult) -> Result<(), KernelError> {
    result.result().map_err(|e| KernelError::Cuda {
        call,
        error: e.to_string(),
    })
}

/// One reusable argument buffer: pinned host memory, device memory of the same size, and an
/// event recorded after the last launch that read them.
pub(crate) struct ArgBuffer {
    pub(crate) host: *mut u8,
    pub(crate) device: sys::CUdeviceptr,
    capacity: usize,
    pub(crate) done: sys::CUevent,
}

// SAFETY: the buffer is plain memory and an event handle, owned by the pool and used by one
// launch at a time (taken out of the pool while in use).
unsafe impl Send for ArgBuffer {}

impl ArgBuffer {
    /// Allocates a buffer of at least `bytes`. The context must be current.
    fn new(bytes: usize) -> Result<Self, KernelError> {
        let capacity =
            bytes
                .max(MIN_ARG_BYTES)
                .checked_next_power_of_two()
                .ok_or(KernelError::Overflow {
                    what: "argument buffer bytes",
                })?;
        let mut buffer = ArgBuffer {
            host: std::ptr::null_mut(),
            device: 0,
            capacity,
            done: std::ptr::null_mut(),
        };
        // Each step fills one field; on failure `buffer`'s drop frees what was allocated.
        let mut host: *mut c_void = std::ptr::null_mut();
        // SAFETY: plain allocation calls with live out-pointers and a non-zero size.
        unsafe {
            check(
                "cuMemHostAlloc",
                sys::cuMemHostAlloc(&mut host, capacity, sys::CU_MEMHOSTALLOC_PORTABLE),
            )?;
            buffer.host = host.cast();
            check(
                "cuMemAlloc",
                sys::cuMemAlloc_v2(&mut buffer.device, capacity),
            )?;
            check(
                "cuEventCreate",
                sys::cuEventCreate(
                    &mut buffer.done,
                    sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32,
                ),
            )?;
        }
        Ok(buffer)
    }

    /// Whether every launch that read the buffer has finished (an event never recorded
    /// counts as finished).
    fn is_idle(&self) -> bool {
        // SAFETY: a live event.
        let status = unsafe { sys::cuEventQuery(self.done) };
        status == sys::CUresult::CUDA_SUCCESS
    }
}

impl Drop for ArgBuffer {
    /// Frees the memory. The caller has made the owning context current and no launch
    /// reads the buffer any more.
    fn drop(&mut self) {
        // SAFETY: each handle was allocated by `new` (null/zero where that step failed) and
        // is released only here.
        unsafe {
            if !self.done.is_null() {
                let _ = sys::cuEventDestroy_v2(self.done);
            }
            if self.device != 0 {
                let _ = sys::cuMemFree_v2(self.device);
            }
            if !self.host.is_null() {
                let _ = sys::cuMemFreeHost(self.host.cast());
            }
        }
    }
}

#[derive(Default)]
struct PoolState {
    /// Buffers not taken by a launch right now (their last launch may still run).
    idle: Vec<ArgBuffer>,
    /// Buffers in existence: idle or taken.
    created: usize,
}

/// One device's argument buffers: at most [`MAX_ARG_BUFFERS`], each used by one launch at a
/// time and reused once its event has passed.
#[derive(Default)]
pub(crate) struct ArgPool {
    state: Mutex<PoolState>,
    returned: Condvar,
}

impl ArgPool {
    /// Buffers in existence (idle or taken).
    pub(crate) fn created(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).created
    }

    /// An argument buffer of at least `bytes` that no launch reads any more, taken out of the
    /// pool (creating one while fewer than [`MAX_ARG_BUFFERS`] exist, else waiting).
    pub(crate) fn take(&self, bytes: usize) -> Result<ArgBuffer, KernelError> {
        let mut pool = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            // An idle buffer that is large enough and finished.
            if let Some(i) = pool
                .idle
                .iter()
                .position(|b| b.capacity >= bytes && b.is_idle())
            {
                return Ok(pool.idle.swap_remove(i));
            }
            if pool.created < MAX_ARG_BUFFERS {
                pool.created += 1;
                drop(pool);
                return ArgBuffer::new(bytes).inspect_err(|_| self.give_back(None));
            }
            if !pool.idle.is_empty() {
                let old = pool.idle.remove(0); // the oldest: the likeliest to be finished
                drop(pool);
                // SAFETY: a live event; waiting on it blocks only this thread.
                let waited = check("cuEventSynchronize", unsafe {
                    sys::cuEventSynchronize(old.done)
                });
                if old.capacity >= bytes && waited.is_ok() {
                    return Ok(old);
                }
                // Too small (or in an unknown state): replace it with a large enough one.
                if waited.is_ok() {
                    drop(old);
                } else {
                    std::mem::forget(old);
                }
                return ArgBuffer::new(bytes).inspect_err(|_| self.give_back(None));
            }
            // Every buffer is taken by a launch on another thread: wait for one.
            pool = self.returned.wait(pool).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Returns a buffer to the pool (`None`: it is gone, so one fewer exists).
    pub(crate) fn give_back(&self, buffer: Option<ArgBuffer>) {
        let mut pool = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match buffer {
            Some(b) => pool.idle.push(b),
            None => pool.created -= 1,
        }
        drop(pool);
        self.returned.notify_one();
    }

    /// Frees every idle buffer whose last launch has finished (leaks the others); for the
    /// owner's drop, with the context current.
    pub(crate) fn free_idle(&mut self) {
        let idle =
            std::mem::take(&mut self.state.get_mut().unwrap_or_else(|e| e.into_inner()).idle);
        for buffer in idle {
            // SAFETY: a live event; after it no launch reads the buffer.
            if unsafe { sys::cuEventSynchronize(buffer.done) } == sys::CUresult::CUDA_SUCCESS {
                drop(buffer);
            } else {
                std::mem::forget(buffer);
            }
        }
    }
}

/// Bytes of the batched copy's arguments for `n` regions: three `u64` arrays.
pub(crate) fn copy_args_bytes(n: usize) -> Result<usize, KernelError> {
    n.checked_mul(24).ok_or(KernelError::Overflow {
        what: "argument bytes",
    })
}

/// Bytes of the permutation's arguments: `layers` `u64` bases, then two `u32` arrays of
/// `pairs` entries.
pub(crate) fn permute_args_bytes(layers: usize, pairs: usize) -> Result<usize, KernelError> {
    layers
        .checked_mul(8)
        .zip(pairs.checked_mul(8))
        .and_then(|(a, b)| a.checked_add(b))
        .ok_or(KernelError::Overflow {
            what: "argument bytes",
        })
}

/// Bytes of the region permutation's arguments: both sides' layer maps (`2 × layers` maps of
/// three `u64`), then two `u32` arrays of `pairs` entries.
pub(crate) fn region_args_bytes(layers: usize, pairs: usize) -> Result<usize, KernelError> {
    layers
        .checked_mul(48)
        .zip(pairs.checked_mul(8))
        .and_then(|(a, b)| a.checked_add(b))
        .ok_or(KernelError::Overflow {
            what: "argument bytes",
        })
}

/// Writes `values` little-endian (the GPU's byte order) into `out` from `at`.
fn put<const N: usize, T: Copy>(out: &mut [u8], at: usize, values: &[T], bytes: fn(T) -> [u8; N]) {
    for (chunk, &v) in out[at..at + N * values.len()]
        .chunks_exact_mut(N)
        .zip(values)
    {
        chunk.copy_from_slice(&bytes(v));
    }
}

/// Packs the batched copy's arguments into `out` (exactly [`copy_args_bytes`] long):
/// sources, destinations, sizes; returns the three arrays' byte offsets (8-byte aligned).
pub(crate) fn pack_copy_args(
    out: &mut [u8],
    srcs: &[u64],
    dsts: &[u64],
    sizes: &[u64],
) -> [usize; 3] {
    let n = srcs.len();
    let offsets = [0, 8 * n, 16 * n];
    put(out, offsets[0], srcs, u64::to_le_bytes);
    put(out, offsets[1], dsts, u64::to_le_bytes);
    put(out, offsets[2], sizes, u64::to_le_bytes);
    offsets
}

/// Packs the permutation's arguments into `out` (exactly [`permute_args_bytes`] long): the
/// layer bases, the layer-separate ids, the contiguous ids; returns the byte offsets.
pub(crate) fn pack_permute_args(
    out: &mut [u8],
    layer_bases: &[u64],
    pairs: &[(u32, u32)],
) -> [usize; 3] {
    let offsets = [
        0,
        8 * layer_bases.len(),
        8 * layer_bases.len() + 4 * pairs.len(),
    ];
    put(out, offsets[0], layer_bases, u64::to_le_bytes);
    for (i, &(ls, fc)) in pairs.iter().enumerate() {
        out[offsets[1] + 4 * i..][..4].copy_from_slice(&ls.to_le_bytes());
        out[offsets[2] + 4 * i..][..4].copy_from_slice(&fc.to_le_bytes());
    }
    offsets
}

/// Packs the region permutation's arguments into `out` (exactly [`region_args_bytes`] long):
/// the source maps then the destination maps (base, block stride, outer stride each), the
/// source ids, the destination ids; returns the three arrays' byte offsets.
pub(crate) fn pack_region_args(
    out: &mut [u8],
    src_maps: &[LayerMap],
    dst_maps: &[LayerMap],
    pairs: &[(u32, u32)],
) -> [usize; 3] {
    let words: Vec<u64> = src_maps
        .iter()
        .chain(dst_maps)
        .flat_map(|m| [m.base, m.block_stride, m.outer_stride])
        .collect();
    let offsets = [0, 8 * words.len(), 8 * words.len() + 4 * pairs.len()];
    put(out, offsets[0], &words, u64::to_le_bytes);
    for (i, &(s, d)) in pairs.iter().enumerate() {
        out[offsets[1] + 4 * i..][..4].copy_from_slice(&s.to_le_bytes());
        out[offsets[2] + 4 * i..][..4].copy_from_slice(&d.to_le_bytes());
    }
    offsets
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u64_at(buf: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(buf[at..at + 8].try_into().unwrap())
    }

    fn u32_at(buf: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(buf[at..at + 4].try_into().unwrap())
    }

    #[test]
    fn copy_arguments_pack_into_one_buffer() {
        let srcs = [0x1000_0000_0001, 7, u64::MAX];
        let dsts = [3, 0xdead_beef, 0];
        let sizes = [65536, 1, 12345];
        let mut buf = vec![0xAA; copy_args_bytes(3).unwrap()];
        let [s, d, z] = pack_copy_args(&mut buf, &srcs, &dsts, &sizes);
        assert!([s, d, z].iter().all(|o| o % 8 == 0));
        for i in 0..3 {
            assert_eq!(u64_at(&buf, s + 8 * i), srcs[i]);
            assert_eq!(u64_at(&buf, d + 8 * i), dsts[i]);
            assert_eq!(u64_at(&buf, z + 8 * i), sizes[i]);
        }
        assert_eq!(z + 24, buf.len(), "no byte left unwritten");
    }

    #[test]
    fn permute_arguments_pack_into_one_buffer() {
        let bases = [0x7000_0000_0000, 0x7100_0000_0000, 0x7200_0000_0000];
        let pairs = [(5, 0), (u32::MAX, 9)];
        let mut buf = vec![0xAA; permute_args_bytes(3, 2).unwrap()];
        let [b, l, f] = pack_permute_args(&mut buf, &bases, &pairs);
        assert_eq!((b % 8, l % 4, f % 4), (0, 0, 0));
        for (i, &base) in bases.iter().enumerate() {
            assert_eq!(u64_at(&buf, b + 8 * i), base);
        }
        for (i, &(ls, fc)) in pairs.iter().enumerate() {
            assert_eq!(u32_at(&buf, l + 4 * i), ls);
            assert_eq!(u32_at(&buf, f + 4 * i), fc);
        }
        assert_eq!(f + 8, buf.len());
    }

    #[test]
    fn region_arguments_pack_into_one_buffer() {
        let m = |b: u64| LayerMap {
            base: b,
            block_stride: b + 1,
            outer_stride: b + 2,
        };
        let (src, dst) = ([m(0x7000_0000_0000), m(10)], [m(0x7100_0000_0000), m(20)]);
        let pairs = [(5, 0), (u32::MAX, 9), (1, 2)];
        let mut buf = vec![0xAA; region_args_bytes(2, 3).unwrap()];
        let [w, s, d] = pack_region_args(&mut buf, &src, &dst, &pairs);
        assert_eq!((w % 8, s % 4, d % 4), (0, 0, 0));
        for (i, map) in src.iter().chain(&dst).enumerate() {
            assert_eq!(u64_at(&buf, w + 24 * i), map.base);
            assert_eq!(u64_at(&buf, w + 24 * i + 8), map.block_stride);
            assert_eq!(u64_at(&buf, w + 24 * i + 16), map.outer_stride);
        }
        for (i, &(a, b)) in pairs.iter().enumerate() {
            assert_eq!(u32_at(&buf, s + 4 * i), a);
            assert_eq!(u32_at(&buf, d + 4 * i), b);
        }
        assert_eq!(d + 12, buf.len(), "no byte left unwritten");
    }

    #[test]
    fn argument_sizes_that_overflow_are_typed_errors() {
        assert!(matches!(
            copy_args_bytes(usize::MAX / 2),
            Err(KernelError::Overflow { .. })
        ));
        assert!(matches!(
            permute_args_bytes(usize::MAX / 4, usize::MAX / 4),
            Err(KernelError::Overflow { .. })
        ));
        assert!(matches!(
            region_args_bytes(usize::MAX / 40, 1),
            Err(KernelError::Overflow { .. })
        ));
    }
}
