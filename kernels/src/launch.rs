//! Loading the compiled kernels into a CUDA context (once per process and device) and
//! launching them on a stream.
//!
//! A launch needs its argument arrays (region addresses and sizes, or block ids) in device
//! memory. They are packed into one pinned host buffer, uploaded with one stream-ordered
//! copy into one device buffer, and the pair is reused: each device keeps at most
//! [`MAX_ARG_BUFFERS`] of them, each with an event recorded after the last launch that read
//! it, so a steady stream of launches makes no allocation and no pageable upload.
//!
//! Driver calls here are raw (`cudarc::driver::sys`), after binding the stream's context
//! with `cuCtxSetCurrent`: cudarc's safe wrappers first return any error that one of its
//! destructors stored earlier, which would make an unrelated launch fail.

use std::ffi::c_void;
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use cudarc::driver::{CudaContext, CudaFunction, CudaStream, DriverError, LaunchConfig, sys};
use cudarc::nvrtc::Ptx;

use crate::reference::PermuteShape;
use crate::{BATCHED_COPY, CHUNK_BYTES, KernelError, PERMUTE};

/// Loaded kernels by device ordinal.
type Cache = Vec<(usize, Arc<Kernels>)>;

/// Threads per CTA.
const THREADS: u32 = 256;
/// Grid limits: x chunks per region (grid-strided beyond), y regions (likewise).
const MAX_GRID_X: usize = 1024;
const MAX_GRID_Y: usize = 65535;

/// Most argument buffers (pinned host + device pairs) one device keeps; a launch that finds
/// all of them in use waits for one.
pub const MAX_ARG_BUFFERS: usize = 8;
/// Smallest argument buffer allocated (bytes); larger ones are rounded to a power of two.
const MIN_ARG_BYTES: usize = 4096;

fn cuda(call: &'static str) -> impl FnOnce(DriverError) -> KernelError {
    move |e| KernelError::Cuda {
        call,
        error: e.to_string(),
    }
}

fn check(call: &'static str, result: sys::CUresult) -> Result<(), KernelError> {
    result.result().map_err(cuda(call))
}

/// Makes `ctx` current on this thread with the raw driver call (see the module docs).
fn bind(ctx: &CudaContext) -> Result<(), KernelError> {
    let mut current: sys::CUcontext = std::ptr::null_mut();
    // SAFETY: the out-pointer is a live local.
    check("cuCtxGetCurrent", unsafe {
        sys::cuCtxGetCurrent(&mut current)
    })?;
    if current != ctx.cu_ctx() {
        // SAFETY: `ctx` is a live context (held by the caller's `Arc`).
        check("cuCtxSetCurrent", unsafe {
            sys::cuCtxSetCurrent(ctx.cu_ctx())
        })?;
    }
    Ok(())
}

/// One reusable argument buffer: pinned host memory, device memory of the same size, and an
/// event recorded after the last launch that read them.
struct ArgBuffer {
    host: *mut u8,
    device: sys::CUdeviceptr,
    capacity: usize,
    done: sys::CUevent,
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
                sys::cuMemHostAlloc(&mut host, capacity, 0),
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
struct ArgPool {
    /// Buffers not taken by a launch right now (their last launch may still run).
    idle: Vec<ArgBuffer>,
    /// Buffers in existence: idle or taken.
    created: usize,
}

/// The kernels, loaded into one device's context.
pub struct Kernels {
    copy: CudaFunction,
    permute: CudaFunction,
    arch: String,
    ctx: Arc<CudaContext>,
    args: Mutex<ArgPool>,
    returned: Condvar,
}

impl std::fmt::Debug for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernels")
            .field("arch", &self.arch)
            .field("ordinal", &self.ctx.ordinal())
            .field("arg_buffers", &self.arg_buffers())
            .finish()
    }
}

impl Kernels {
    /// The kernels for `ctx`'s device: compiled (NVRTC, for its compute capability) and
    /// loaded on first use, then cached for the life of the process.
    pub fn get(ctx: &Arc<CudaContext>) -> Result<Arc<Kernels>, KernelError> {
        static CACHE: OnceLock<Mutex<Cache>> = OnceLock::new();
        let cache = CACHE.get_or_init(Default::default);
        let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, k)) = cache.iter().find(|(o, _)| *o == ctx.ordinal()) {
            return Ok(Arc::clone(k));
        }
        let (major, minor) = ctx
            .compute_capability()
            .map_err(cuda("cuDeviceGetAttribute"))?;
        let arch = format!("compute_{major}{minor}");
        let load = |source: &crate::KernelSource| -> Result<CudaFunction, KernelError> {
            let compiled = crate::nvrtc::compile(source, &arch)?;
            let module = ctx
                .load_module(Ptx::from_src(compiled.ptx))
                .map_err(cuda("cuModuleLoadData"))?;
            module
                .load_function(source.functions[0])
                .map_err(cuda("cuModuleGetFunction"))
        };
        let kernels = Arc::new(Kernels {
            copy: load(&BATCHED_COPY)?,
            permute: load(&PERMUTE)?,
            arch,
            ctx: Arc::clone(ctx),
            args: Mutex::default(),
            returned: Condvar::new(),
        });
        cache.push((ctx.ordinal(), Arc::clone(&kernels)));
        Ok(kernels)
    }

    /// The architecture the kernels were compiled for.
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// Argument buffers this device holds (at most [`MAX_ARG_BUFFERS`], however many
    /// launches ran).
    pub fn arg_buffers(&self) -> usize {
        self.args.lock().unwrap_or_else(|e| e.into_inner()).created
    }

    /// Enqueues `kvbm_batched_copy` on `stream`: region `i` copies `sizes[i]` bytes from
    /// `srcs[i]` to `dsts[i]`. The argument arrays are uploaded first (stream-ordered, from
    /// a reused pinned buffer).
    ///
    /// # Safety
    /// Every region must be valid device-accessible memory (device, or mapped pinned host)
    /// of the stream's context, must not overlap another region's destination, and must
    /// stay valid and untouched by others until the stream passes this launch.
    pub unsafe fn batched_copy(
        &self,
        stream: &Arc<CudaStream>,
        srcs: &[u64],
        dsts: &[u64],
        sizes: &[u64],
    ) -> Result<(), KernelError> {
        if srcs.len() != dsts.len() || srcs.len() != sizes.len() {
            return Err(KernelError::InvalidArgument(format!(
                "{} sources, {} destinations, {} sizes",
                srcs.len(),
                dsts.len(),
                sizes.len()
            )));
        }
        if srcs.is_empty() {
            return Ok(());
        }
        let n = u32::try_from(srcs.len())
            .map_err(|_| KernelError::InvalidArgument("more than u32::MAX regions".into()))?;
        let longest = sizes.iter().copied().max().unwrap_or(0) as usize;
        let cfg = grid(longest, srcs.len());
        let bytes = copy_args_bytes(srcs.len())?;
        self.launch_with_args(
            stream,
            bytes,
            |buf| pack_copy_args(buf, srcs, dsts, sizes),
            |base, [s, d, z]| {
                let (mut s, mut d, mut z, mut n) = (base + s, base + d, base + z, n);
                let mut params: [*mut c_void; 4] = [
                    (&mut s as *mut u64).cast(),
                    (&mut d as *mut u64).cast(),
                    (&mut z as *mut u64).cast(),
                    (&mut n as *mut u32).cast(),
                ];
                // SAFETY: the parameters match the kernel's signature (three pointers to u64
                // arrays and a u32) and point into the argument buffer, uploaded on this
                // stream before the launch; the regions are the caller's contract.
                unsafe { launch(&self.copy, stream, cfg, &mut params) }
            },
        )
    }

    /// Enqueues `kvbm_permute_blocks` on `stream`: for each `(ls, fc)` pair, layer-separate
    /// block `ls` (layer slabs at `layer_bases`) ⇄ fully contiguous block `fc` (slab at
    /// `block_base`), towards the contiguous side when `to_block_major`.
    ///
    /// # Safety
    /// As for [`batched_copy`](Self::batched_copy): every addressed block must lie inside
    /// its slab, destinations must not repeat, and the memory must stay valid until the
    /// stream passes this launch.
    pub unsafe fn permute(
        &self,
        stream: &Arc<CudaStream>,
        layer_bases: &[u64],
        block_base: u64,
        pairs: &[(u32, u32)],
        shape: PermuteShape,
        to_block_major: bool,
    ) -> Result<(), KernelError> {
        if layer_bases.len() != shape.num_layers {
            return Err(KernelError::InvalidArgument(format!(
                "{} layer bases for {} layers",
                layer_bases.len(),
                shape.num_layers
            )));
        }
        if pairs.is_empty() {
            return Ok(());
        }
        let too_big = |what| KernelError::InvalidArgument(format!("{what} exceeds u32"));
        let num_pairs = u32::try_from(pairs.len()).map_err(|_| too_big("pair count"))?;
        let num_layers = u32::try_from(shape.num_layers).map_err(|_| too_big("layer count"))?;
        let outer = u32::try_from(shape.outer_dim).map_err(|_| too_big("outer_dim"))?;
        let region = shape.region_bytes as u64;
        let span = shape.span()?;
        shape.block_bytes()?; // the kernel computes it in 64 bits: it must fit
        let items = pairs
            .len()
            .checked_mul(shape.num_layers)
            .ok_or(KernelError::Overflow {
                what: "pairs × layers",
            })?;
        let cfg = grid(span, items);
        let bytes = permute_args_bytes(layer_bases.len(), pairs.len())?;
        self.launch_with_args(
            stream,
            bytes,
            |buf| pack_permute_args(buf, layer_bases, pairs),
            |base, [b, l, f]| {
                let (mut b, mut block_base, mut l, mut f) =
                    (base + b, block_base, base + l, base + f);
                let (mut num_pairs, mut num_layers, mut outer, mut region) =
                    (num_pairs, num_layers, outer, region);
                let mut direction = i32::from(to_block_major);
                let mut params: [*mut c_void; 9] = [
                    (&mut b as *mut u64).cast(),
                    (&mut block_base as *mut u64).cast(),
                    (&mut l as *mut u64).cast(),
                    (&mut f as *mut u64).cast(),
                    (&mut num_pairs as *mut u32).cast(),
                    (&mut num_layers as *mut u32).cast(),
                    (&mut outer as *mut u32).cast(),
                    (&mut region as *mut u64).cast(),
                    (&mut direction as *mut i32).cast(),
                ];
                // SAFETY: the parameters match the kernel's signature; the arrays lie in the
                // argument buffer, uploaded on this stream before the launch; the addressed
                // memory is the caller's contract.
                unsafe { launch(&self.permute, stream, cfg, &mut params) }
            },
        )
    }

    /// Takes an argument buffer of at least `bytes`, fills its host side with `fill`,
    /// uploads it on `stream`, calls `enqueue` with its device address, records the buffer's
    /// event after the launch and returns the buffer to the pool.
    fn launch_with_args(
        &self,
        stream: &CudaStream,
        bytes: usize,
        fill: impl FnOnce(&mut [u8]) -> [usize; 3],
        enqueue: impl FnOnce(u64, [u64; 3]) -> Result<(), KernelError>,
    ) -> Result<(), KernelError> {
        bind(&self.ctx)?;
        let buffer = self.take(bytes)?;
        // SAFETY: the buffer is ours alone (taken out of the pool) and no launch reads it any
        // more (`take` checked or waited for its event); it holds `capacity >= bytes` bytes.
        let host = unsafe { std::slice::from_raw_parts_mut(buffer.host, bytes) };
        let offsets = fill(host);
        // SAFETY: both ranges hold `bytes` bytes; the host side is pinned, so the copy is
        // truly asynchronous and the buffer stays untouched until its event passes.
        let uploaded = check("cuMemcpyHtoDAsync", unsafe {
            sys::cuMemcpyHtoDAsync_v2(
                buffer.device,
                buffer.host.cast_const().cast(),
                bytes,
                stream.cu_stream(),
            )
        });
        let launched = uploaded.and_then(|()| enqueue(buffer.device, offsets.map(|o| o as u64)));
        // Whatever was enqueued (the upload, the launch) must pass before the buffer is
        // reused: record its event even after a failure.
        // SAFETY: a live event and stream of the current context.
        let recorded = check("cuEventRecord", unsafe {
            sys::cuEventRecord(buffer.done, stream.cu_stream())
        });
        if recorded.is_ok() {
            self.give_back(Some(buffer));
        } else {
            // SAFETY: a live stream; once it has drained, the buffer is unused.
            let synced = unsafe { sys::cuStreamSynchronize(stream.cu_stream()) };
            if synced == sys::CUresult::CUDA_SUCCESS {
                self.give_back(Some(buffer));
            } else {
                // Unknown whether the GPU still reads it: leak it rather than reuse it.
                std::mem::forget(buffer);
                self.give_back(None);
            }
        }
        launched?;
        recorded
    }

    /// An argument buffer of at least `bytes` that no launch reads any more, taken out of the
    /// pool (creating one while fewer than [`MAX_ARG_BUFFERS`] exist, else waiting).
    fn take(&self, bytes: usize) -> Result<ArgBuffer, KernelError> {
        let mut pool = self.args.lock().unwrap_or_else(|e| e.into_inner());
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
            if let Some(old) = pool.idle.pop() {
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
    fn give_back(&self, buffer: Option<ArgBuffer>) {
        let mut pool = self.args.lock().unwrap_or_else(|e| e.into_inner());
        match buffer {
            Some(b) => pool.idle.push(b),
            None => pool.created -= 1,
        }
        drop(pool);
        self.returned.notify_one();
    }
}

impl Drop for Kernels {
    fn drop(&mut self) {
        let pool = std::mem::take(self.args.get_mut().unwrap_or_else(|e| e.into_inner()));
        if pool.idle.is_empty() || bind(&self.ctx).is_err() {
            // Unbound, the frees could not run: leave the memory to the context's teardown.
            pool.idle.into_iter().for_each(std::mem::forget);
            return;
        }
        for buffer in pool.idle {
            // SAFETY: a live event; after it no launch reads the buffer.
            if unsafe { sys::cuEventSynchronize(buffer.done) } == sys::CUresult::CUDA_SUCCESS {
                drop(buffer);
            } else {
                std::mem::forget(buffer);
            }
        }
    }
}

/// Launches `func` with raw parameters on `stream`.
///
/// # Safety
/// `params` must match the kernel's signature and everything it addresses must be valid
/// for the launch.
unsafe fn launch(
    func: &CudaFunction,
    stream: &CudaStream,
    cfg: LaunchConfig,
    params: &mut [*mut c_void],
) -> Result<(), KernelError> {
    // SAFETY: forwarded from the caller; the function and stream are live.
    unsafe {
        cudarc::driver::result::launch_kernel(
            func.cu_function(),
            cfg.grid_dim,
            cfg.block_dim,
            cfg.shared_mem_bytes,
            stream.cu_stream(),
            params,
        )
    }
    .map_err(cuda("cuLaunchKernel"))
}

/// Bytes of the batched copy's arguments for `n` regions: three `u64` arrays.
fn copy_args_bytes(n: usize) -> Result<usize, KernelError> {
    n.checked_mul(24).ok_or(KernelError::Overflow {
        what: "argument bytes",
    })
}

/// Bytes of the permutation's arguments: `layers` `u64` bases, then two `u32` arrays of
/// `pairs` entries.
fn permute_args_bytes(layers: usize, pairs: usize) -> Result<usize, KernelError> {
    layers
        .checked_mul(8)
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
fn pack_copy_args(out: &mut [u8], srcs: &[u64], dsts: &[u64], sizes: &[u64]) -> [usize; 3] {
    let n = srcs.len();
    let offsets = [0, 8 * n, 16 * n];
    put(out, offsets[0], srcs, u64::to_le_bytes);
    put(out, offsets[1], dsts, u64::to_le_bytes);
    put(out, offsets[2], sizes, u64::to_le_bytes);
    offsets
}

/// Packs the permutation's arguments into `out` (exactly [`permute_args_bytes`] long): the
/// layer bases, the layer-separate ids, the contiguous ids; returns the byte offsets.
fn pack_permute_args(out: &mut [u8], layer_bases: &[u64], pairs: &[(u32, u32)]) -> [usize; 3] {
    let (ls, fc): (Vec<u32>, Vec<u32>) = pairs.iter().copied().unzip();
    let offsets = [
        0,
        8 * layer_bases.len(),
        8 * layer_bases.len() + 4 * pairs.len(),
    ];
    put(out, offsets[0], layer_bases, u64::to_le_bytes);
    put(out, offsets[1], &ls, u32::to_le_bytes);
    put(out, offsets[2], &fc, u32::to_le_bytes);
    offsets
}

fn grid(longest: usize, items: usize) -> LaunchConfig {
    let x = longest.div_ceil(CHUNK_BYTES).clamp(1, MAX_GRID_X) as u32;
    let y = items.clamp(1, MAX_GRID_Y) as u32;
    LaunchConfig {
        grid_dim: (x, y, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
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
    fn argument_sizes_that_overflow_are_typed_errors() {
        assert!(matches!(
            copy_args_bytes(usize::MAX / 2),
            Err(KernelError::Overflow { .. })
        ));
        assert!(matches!(
            permute_args_bytes(usize::MAX / 4, usize::MAX / 4),
            Err(KernelError::Overflow { .. })
        ));
    }
}
