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
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaContext, CudaFunction, CudaStream, DriverError, LaunchConfig, sys};
use cudarc::nvrtc::Ptx;

use crate::args::{
    ArgPool, copy_args_bytes, pack_copy_args, pack_permute_args, pack_region_args,
    permute_args_bytes, region_args_bytes,
};
use crate::reference::{LayerMap, PermuteShape, RegionShape, coarsen};
use crate::{BATCHED_COPY, CHUNK_BYTES, KernelError, PERMUTE};

/// Loaded kernels by CUDA context (its handle's address): a module belongs to the context it
/// was loaded in, and one device may have several (the primary one, and any an engine made).
type Cache = Vec<(usize, Arc<Kernels>)>;

/// Threads per CTA.
const THREADS: u32 = 256;
/// Grid limits: x chunks per region (grid-strided beyond), y regions (likewise).
const MAX_GRID_X: usize = 1024;
const MAX_GRID_Y: usize = 65535;

pub use crate::args::MAX_ARG_BUFFERS;

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

/// The kernels, loaded into one device's context.
pub struct Kernels {
    copy: CudaFunction,
    permute: CudaFunction,
    regions: CudaFunction,
    arch: String,
    ctx: Arc<CudaContext>,
    args: ArgPool,
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
    /// The kernels for `ctx` (compiled with NVRTC for its device's compute capability) and
    /// loaded into that context on first use, then cached for the life of the process (the
    /// cache holds the context).
    pub fn get(ctx: &Arc<CudaContext>) -> Result<Arc<Kernels>, KernelError> {
        static CACHE: OnceLock<Mutex<Cache>> = OnceLock::new();
        let cache = CACHE.get_or_init(Default::default);
        let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
        let key = ctx.cu_ctx() as usize;
        if let Some((_, k)) = cache.iter().find(|(c, _)| *c == key) {
            return Ok(Arc::clone(k));
        }
        // cudarc's safe calls below fail on an error a cudarc destructor stored earlier (on
        // any thread): it belongs to that release, and a failure here would be cached.
        if let Err(stored) = ctx.check_err() {
            tracing::warn!(error = %stored, "a CUDA error stored by an earlier cudarc release was cleared");
        }
        let (major, minor) = ctx
            .compute_capability()
            .map_err(cuda("cuDeviceGetAttribute"))?;
        // A CUBIN for the device's own architecture (the driver would refuse PTX newer than
        // itself); PTX for the virtual architecture only where NVRTC cannot build that
        // CUBIN (an architecture newer than NVRTC), or the driver will not load it.
        let sm = format!("sm_{major}{minor}");
        let compute = format!("compute_{major}{minor}");
        let mut arch = sm.clone();
        let mut load = |source: &crate::KernelSource| -> Result<Vec<CudaFunction>, KernelError> {
            let module = match crate::nvrtc::compile_cubin(source, &sm).and_then(|c| {
                ctx.load_module(Ptx::from_binary(c.cubin))
                    .map_err(cuda("cuModuleLoadData"))
            }) {
                Ok(module) => module,
                Err(cubin_error) => {
                    let compiled = crate::nvrtc::compile(source, &compute)?;
                    let module = ctx
                        .load_module(Ptx::from_src(compiled.ptx))
                        .map_err(cuda("cuModuleLoadData"))?;
                    tracing::warn!(
                        kernel = source.name,
                        error = %cubin_error,
                        "no CUBIN for {sm}: loaded PTX for {compute} instead"
                    );
                    arch = compute.clone();
                    module
                }
            };
            source
                .functions
                .iter()
                .map(|f| module.load_function(f).map_err(cuda("cuModuleGetFunction")))
                .collect()
        };
        let [copy]: [CudaFunction; 1] = load(&BATCHED_COPY)?
            .try_into()
            .map_err(|_| KernelError::InvalidArgument("batched_copy.cu: one kernel".into()))?;
        let [permute, regions]: [CudaFunction; 2] = load(&PERMUTE)?
            .try_into()
            .map_err(|_| KernelError::InvalidArgument("permute.cu: two kernels".into()))?;
        let kernels = Arc::new(Kernels {
            copy,
            permute,
            regions,
            arch,
            ctx: Arc::clone(ctx),
            args: ArgPool::default(),
        });
        cache.push((key, Arc::clone(&kernels)));
        Ok(kernels)
    }

    /// The architecture the kernels were compiled for.
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// Argument buffers this device holds (at most [`MAX_ARG_BUFFERS`], however many
    /// launches ran).
    pub fn arg_buffers(&self) -> usize {
        self.args.created()
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

    /// Enqueues `kvbm_permute_regions` on `stream`: for each `(s, d)` pair, every layer `l`
    /// and outer index `o`, region `(s, o)` of `src_maps[l]` to region `(d, o)` of
    /// `dst_maps[l]` (see [`reference::permute_regions`](crate::reference::permute_regions),
    /// which defines the result). The regions are first merged where both sides allow
    /// ([`coarsen`]); the argument arrays (maps and block ids, not one entry per region) are
    /// uploaded stream-ordered from a reused pinned buffer.
    ///
    /// # Safety
    /// Every addressed region must be valid device-accessible memory (device, or mapped
    /// pinned host) of the stream's context, no two destination regions may overlap, and the
    /// memory must stay valid and untouched by others until the stream passes this launch.
    pub unsafe fn permute_regions(
        &self,
        stream: &Arc<CudaStream>,
        src_maps: &[LayerMap],
        dst_maps: &[LayerMap],
        pairs: &[(u32, u32)],
        shape: RegionShape,
    ) -> Result<(), KernelError> {
        if src_maps.len() != dst_maps.len() {
            return Err(KernelError::InvalidArgument(format!(
                "{} source layers, {} destination layers",
                src_maps.len(),
                dst_maps.len()
            )));
        }
        if pairs.is_empty() || src_maps.is_empty() || shape.outer_dim == 0 {
            return Ok(());
        }
        let (shape, src_maps, dst_maps) = coarsen(shape, src_maps, dst_maps);
        let too_big = |what| KernelError::InvalidArgument(format!("{what} exceeds u32"));
        let mut num_pairs = u32::try_from(pairs.len()).map_err(|_| too_big("pair count"))?;
        let mut num_layers = u32::try_from(src_maps.len()).map_err(|_| too_big("layer count"))?;
        let mut outer = u32::try_from(shape.outer_dim).map_err(|_| too_big("outer_dim"))?;
        let mut region = shape.region_bytes as u64;
        let items = pairs
            .len()
            .checked_mul(src_maps.len())
            .and_then(|n| n.checked_mul(shape.outer_dim))
            .ok_or(KernelError::Overflow {
                what: "pairs × layers × outer_dim",
            })?;
        let cfg = grid(shape.region_bytes, items);
        let bytes = region_args_bytes(src_maps.len(), pairs.len())?;
        self.launch_with_args(
            stream,
            bytes,
            |buf| pack_region_args(buf, &src_maps, &dst_maps, pairs),
            |base, [m, s, d]| {
                let (mut m, mut s, mut d) = (base + m, base + s, base + d);
                let mut params: [*mut c_void; 7] = [
                    (&mut m as *mut u64).cast(),
                    (&mut s as *mut u64).cast(),
                    (&mut d as *mut u64).cast(),
                    (&mut num_pairs as *mut u32).cast(),
                    (&mut num_layers as *mut u32).cast(),
                    (&mut outer as *mut u32).cast(),
                    (&mut region as *mut u64).cast(),
                ];
                // SAFETY: the parameters match the kernel's signature (a u64 array, two u32
                // arrays, three u32 and a u64); the arrays lie in the argument buffer, uploaded
                // on this stream before the launch; the addressed memory is the caller's
                // contract.
                unsafe { launch(&self.regions, stream, cfg, &mut params) }
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
        let buffer = self.args.take(bytes)?;
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
            self.args.give_back(Some(buffer));
        } else {
            // SAFETY: a live stream; once it has drained, the buffer is unused.
            let synced = unsafe { sys::cuStreamSynchronize(stream.cu_stream()) };
            if synced == sys::CUresult::CUDA_SUCCESS {
                self.args.give_back(Some(buffer));
            } else {
                // Unknown whether the GPU still reads it: leak it rather than reuse it.
                std::mem::forget(buffer);
                self.args.give_back(None);
            }
        }
        launched?;
        recorded
    }
}

impl Drop for Kernels {
    fn drop(&mut self) {
        if bind(&self.ctx).is_ok() {
            self.args.free_idle();
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

fn grid(longest: usize, items: usize) -> LaunchConfig {
    let x = longest.div_ceil(CHUNK_BYTES).clamp(1, MAX_GRID_X) as u32;
    let y = items.clamp(1, MAX_GRID_Y) as u32;
    LaunchConfig {
        grid_dim: (x, y, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}
