//! CUDA kernels for kvbm block copies, compiled at run time with NVRTC.
//!
//! Copying many small regions one driver call at a time costs microseconds each; these
//! kernels move a whole batch in one launch:
//!
//! - **`kvbm_batched_copy`** ([`BATCHED_COPY`]): a list of `(src, dst, len)` regions,
//!   16-byte accesses where both sides are aligned, narrower otherwise; device ↔ device and
//!   device ↔ mapped pinned host memory.
//! - **`kvbm_permute_blocks`** ([`PERMUTE`]): `LayerSeparate` ⇄ `FullyContiguous` for a
//!   list of block pairs, so a block is offloaded into one contiguous host range in one pass.
//! - **`kvbm_permute_regions`** ([`PERMUTE`]): block pairs between any two layouts whose
//!   regions are addressed per layer by a base, a block stride and an outer (K/V) stride
//!   ([`reference::LayerMap`]): fully contiguous, layer-separate, and the engines' own
//!   outer-first (vLLM FlashAttention), block-first (FlashInfer) and MLA tensors, with any
//!   strides. The GPU computes every address from block ids: the host uploads 8 bytes per
//!   pair and 48 per layer, whatever the region count.
//!
//! The sources are embedded (`include_str!`); with the `cuda` feature (default) they are
//! compiled once per process and device by NVRTC, loaded through cudarc at run time (no
//! CUDA toolkit is needed to build). Each kernel has a CPU reference in [`reference`](mod@reference) with
//! the same arguments over host slices; the GPU tests compare the two on random data.
//!
//! ```
//! use kvbm_kernels::{SOURCES, reference::{self, CopyRegion}};
//! assert!(SOURCES.iter().any(|s| s.functions.contains(&"kvbm_batched_copy")));
//! let src = [1u8, 2, 3, 4, 5, 6];
//! let mut dst = [0u8; 6];
//! reference::batched_copy(&src, &mut dst, &[CopyRegion { src: 1, dst: 3, len: 3 }])?;
//! assert_eq!(dst, [0, 0, 0, 2, 3, 4]);
//! # Ok::<(), kvbm_kernels::KernelError>(())
//! ```

pub mod reference;

#[cfg(feature = "cuda")]
pub mod nvrtc;

#[cfg(feature = "cuda")]
mod args;

#[cfg(feature = "cuda")]
pub mod launch;

use thiserror::Error;

/// One embedded CUDA source file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelSource {
    /// The file name under `kernels/`.
    pub name: &'static str,
    /// The source text, with the shared header inlined by [`KernelSource::full_source`].
    pub code: &'static str,
    /// The `extern "C"` kernels it defines.
    pub functions: &'static [&'static str],
}

/// The copy loop shared by the kernels.
pub const COPY_HEADER: &str = include_str!("../kvbm_copy.cuh");

/// The batched copy kernel.
pub const BATCHED_COPY: KernelSource = KernelSource {
    name: "batched_copy.cu",
    code: include_str!("../batched_copy.cu"),
    functions: &["kvbm_batched_copy"],
};

/// The layout permutation kernels.
pub const PERMUTE: KernelSource = KernelSource {
    name: "permute.cu",
    code: include_str!("../permute.cu"),
    functions: &["kvbm_permute_blocks", "kvbm_permute_regions"],
};

/// Every kernel source.
pub const SOURCES: [KernelSource; 2] = [BATCHED_COPY, PERMUTE];

/// Bytes one CTA copies per chunk (`KVBM_CHUNK` in the header).
pub const CHUNK_BYTES: usize = 64 << 10;

impl KernelSource {
    /// The source with `#include "kvbm_copy.cuh"` replaced by the header's text (NVRTC has
    /// no file system to include from).
    ///
    /// ```
    /// let src = kvbm_kernels::BATCHED_COPY.full_source();
    /// assert!(!src.contains("#include"));
    /// assert!(src.contains("kvbm_copy_span"));
    /// ```
    pub fn full_source(&self) -> String {
        self.code.replace("#include \"kvbm_copy.cuh\"", COPY_HEADER)
    }
}

/// What failed in compiling, loading or launching a kernel, or in a reference call.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KernelError {
    /// The NVRTC library (`libnvrtc.so.13`) could not be loaded.
    #[error("NVRTC is not available: {0}")]
    NvrtcMissing(String),
    /// NVRTC refused the source.
    #[error("compiling {name} for {arch} failed:\n{log}")]
    Compile {
        /// The source file.
        name: &'static str,
        /// The target architecture.
        arch: String,
        /// NVRTC's log.
        log: String,
    },
    /// A CUDA driver call failed.
    #[error("CUDA: {call}: {error}")]
    Cuda {
        /// The call.
        call: &'static str,
        /// The driver's error.
        error: String,
    },
    /// A region or block lies outside its buffer, or the arguments disagree.
    #[error("invalid kernel arguments: {0}")]
    InvalidArgument(String),
    /// A size computed from the arguments (a block's span, its bytes, the argument arrays)
    /// does not fit in `usize`.
    #[error("kernel argument sizes overflow: {what}")]
    Overflow {
        /// Which size overflowed.
        what: &'static str,
    },
}
