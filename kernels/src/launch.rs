//! Loading the compiled kernels into a CUDA context (once per process and device) and
//! launching them on a stream.

use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaStream, DriverError, LaunchConfig, PushKernelArg,
};
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

fn cuda(call: &'static str) -> impl FnOnce(DriverError) -> KernelError {
    move |e| KernelError::Cuda {
        call,
        error: e.to_string(),
    }
}

/// The kernels, loaded into one device's context.
#[derive(Debug)]
pub struct Kernels {
    copy: CudaFunction,
    permute: CudaFunction,
    arch: String,
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
        });
        cache.push((ctx.ordinal(), Arc::clone(&kernels)));
        Ok(kernels)
    }

    /// The architecture the kernels were compiled for.
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// Enqueues `kvbm_batched_copy` on `stream`: region `i` copies `sizes[i]` bytes from
    /// `srcs[i]` to `dsts[i]`. The argument arrays are uploaded first (stream-ordered).
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
        let d_srcs = stream.clone_htod(srcs).map_err(cuda("cuMemcpyHtoDAsync"))?;
        let d_dsts = stream.clone_htod(dsts).map_err(cuda("cuMemcpyHtoDAsync"))?;
        let d_sizes = stream
            .clone_htod(sizes)
            .map_err(cuda("cuMemcpyHtoDAsync"))?;
        let cfg = grid(longest, srcs.len());
        let mut launch = stream.launch_builder(&self.copy);
        launch.arg(&d_srcs).arg(&d_dsts).arg(&d_sizes).arg(&n);
        // SAFETY: the argument list matches the kernel's signature (three u64 arrays and a
        // u32); the regions' validity is the caller's contract. The uploaded arrays are
        // freed stream-ordered, after the kernel.
        unsafe { launch.launch(cfg) }.map_err(cuda("cuLaunchKernel"))?;
        Ok(())
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
        let (ls, fc): (Vec<u32>, Vec<u32>) = pairs.iter().copied().unzip();
        let d_bases = stream
            .clone_htod(layer_bases)
            .map_err(cuda("cuMemcpyHtoDAsync"))?;
        let d_ls = stream.clone_htod(&ls).map_err(cuda("cuMemcpyHtoDAsync"))?;
        let d_fc = stream.clone_htod(&fc).map_err(cuda("cuMemcpyHtoDAsync"))?;
        let direction = i32::from(to_block_major);
        let cfg = grid(shape.span(), pairs.len() * shape.num_layers);
        let mut launch = stream.launch_builder(&self.permute);
        launch
            .arg(&d_bases)
            .arg(&block_base)
            .arg(&d_ls)
            .arg(&d_fc)
            .arg(&num_pairs)
            .arg(&num_layers)
            .arg(&outer)
            .arg(&region)
            .arg(&direction);
        // SAFETY: the arguments match the kernel's signature; validity of the addressed
        // memory is the caller's contract.
        unsafe { launch.launch(cfg) }.map_err(cuda("cuLaunchKernel"))?;
        Ok(())
    }
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
