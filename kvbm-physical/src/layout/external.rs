//! Layouts over memory kvbm does not own: an inference engine's per-layer KV cache tensors,
//! described by address, shape and strides ([`Layout::from_engine`]).

use super::{Geometry, LayerMap, Layout, LayoutConfig, LayoutKind};
use crate::cuda::CudaDevice;
use crate::error::{LayoutError, PointerKind, TensorError};
use crate::storage::MemoryKind;

/// How an inference engine shapes one layer's KV cache tensor.
///
/// | format | shape | engines | kvbm kind |
/// |---|---|---|---|
/// | `OuterFirst` | `[2, num_blocks, block_size, kv_heads, head_dim]` | vLLM (FlashAttention backend) | [`LayoutKind::OuterFirst`] |
/// | `BlockFirst` | `[num_blocks, 2, block_size, kv_heads, head_dim]` | FlashInfer, vLLM's FlashInfer backend | [`LayoutKind::LayerSeparate`] |
/// | `Mla` | `[num_blocks, block_size, latent_dim]` | DeepSeek-style MLA (vLLM, SGLang) | [`LayoutKind::LayerSeparate`], `outer_dim` 1 |
///
/// The leading `2` is the config's `outer_dim` (K and V); `kv_heads × head_dim` is its
/// `inner_dim` (`latent_dim` for MLA), `block_size` its `page_size`.
///
/// ```
/// use kvbm_physical::{EngineFormat, LayoutConfig, LayoutKind};
/// let c = LayoutConfig { num_blocks: 100, num_layers: 32, outer_dim: 2, page_size: 16, inner_dim: 8 * 128, dtype_bytes: 2 };
/// assert_eq!(EngineFormat::OuterFirst.dense_shape(&c, 8)?, [2, 100, 16, 8, 128]);
/// assert_eq!(EngineFormat::BlockFirst.kind(), LayoutKind::LayerSeparate);
/// # Ok::<(), kvbm_physical::LayoutError>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EngineFormat {
    /// `[2, num_blocks, block_size, kv_heads, head_dim]`: every block's K, then every V.
    OuterFirst,
    /// `[num_blocks, 2, block_size, kv_heads, head_dim]`: each block's K then its V.
    BlockFirst,
    /// `[num_blocks, block_size, latent_dim]`: one latent vector per token.
    Mla,
}

impl EngineFormat {
    /// Every format.
    pub const ALL: [EngineFormat; 3] = [
        EngineFormat::OuterFirst,
        EngineFormat::BlockFirst,
        EngineFormat::Mla,
    ];

    /// The arrangement of a dense tensor of this format.
    pub fn kind(self) -> LayoutKind {
        match self {
            EngineFormat::OuterFirst => LayoutKind::OuterFirst,
            EngineFormat::BlockFirst | EngineFormat::Mla => LayoutKind::LayerSeparate,
        }
    }

    /// Dimensions of a tensor of this format.
    pub fn rank(self) -> usize {
        match self {
            EngineFormat::OuterFirst | EngineFormat::BlockFirst => 5,
            EngineFormat::Mla => 3,
        }
    }

    /// The shape of one layer's tensor for `config`, with `inner_dim` split into `kv_heads`
    /// heads (ignored for MLA). Refused when `config` is invalid, `kv_heads` does not divide
    /// `inner_dim`, or MLA is asked for with `outer_dim` other than 1.
    pub fn dense_shape(
        self,
        config: &LayoutConfig,
        kv_heads: usize,
    ) -> Result<Vec<usize>, LayoutError> {
        config.validate()?;
        let c = config;
        if self == EngineFormat::Mla {
            if c.outer_dim != 1 {
                return Err(LayoutError::MlaOuterDim(c.outer_dim));
            }
            return Ok(vec![c.num_blocks, c.page_size, c.inner_dim]);
        }
        if kv_heads == 0 || !c.inner_dim.is_multiple_of(kv_heads) {
            return Err(LayoutError::Tensor {
                layer: 0,
                error: TensorError::Dim {
                    dim: "kv_heads (a divisor of inner_dim)",
                    expected: c.inner_dim,
                    actual: kv_heads,
                },
            });
        }
        let head_dim = c.inner_dim / kv_heads;
        Ok(match self {
            EngineFormat::OuterFirst => {
                vec![c.outer_dim, c.num_blocks, c.page_size, kv_heads, head_dim]
            }
            _ => vec![c.num_blocks, c.outer_dim, c.page_size, kv_heads, head_dim],
        })
    }

    /// Indices of the block and outer dimensions, and of the page's dimensions.
    fn axes(self) -> (usize, Option<usize>, &'static [usize]) {
        match self {
            EngineFormat::OuterFirst => (1, Some(0), &[2, 3, 4]),
            EngineFormat::BlockFirst => (0, Some(1), &[2, 3, 4]),
            EngineFormat::Mla => (0, None, &[1, 2]),
        }
    }
}

/// One layer's KV tensor as the engine holds it: the address of element 0, the shape, and
/// the strides in elements — what `torch.Tensor.data_ptr()`, `.shape` and `.stride()` give.
///
/// ```
/// use kvbm_physical::LayerTensor;
/// let t = LayerTensor::contiguous(0x1000, &[2, 4, 16, 8, 128]);
/// assert_eq!(t.strides, [4 * 16 * 8 * 128, 16 * 8 * 128, 8 * 128, 128, 1]);
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LayerTensor {
    /// Address of element 0 (a device pointer, or a host pointer).
    pub addr: u64,
    /// Size of each dimension, in the [`EngineFormat`]'s order.
    pub shape: Vec<usize>,
    /// Elements between consecutive indices of each dimension.
    pub strides: Vec<usize>,
}

impl LayerTensor {
    /// A dense, row-major tensor of `shape` at `addr`.
    pub fn contiguous(addr: u64, shape: &[usize]) -> Self {
        let mut strides = vec![1usize; shape.len()];
        for i in (0..shape.len().saturating_sub(1)).rev() {
            strides[i] = strides[i + 1].saturating_mul(shape[i + 1]);
        }
        Self {
            addr,
            shape: shape.to_vec(),
            strides,
        }
    }
}

/// Whether regions of `inner` bytes at offsets `Σ iₖ × strideₖ` (`iₖ < countₖ`) are pairwise
/// disjoint, by the sufficient test of strided-tensor libraries: taken by increasing stride,
/// each stride is at least the extent of everything finer. Dimensions of one index never
/// move, so their stride does not matter.
fn disjoint(dims: &[(usize, u64)], inner: u64) -> bool {
    let mut dims: Vec<(usize, u64)> = dims.iter().copied().filter(|&(n, _)| n > 1).collect();
    dims.sort_by_key(|&(_, stride)| stride);
    let mut extent = inner;
    for (n, stride) in dims {
        if stride < extent {
            return false;
        }
        match stride
            .checked_mul(n as u64 - 1)
            .and_then(|s| s.checked_add(extent))
        {
            Some(e) => extent = e,
            None => return false,
        }
    }
    true
}

/// Checks one layer's tensor against the format and geometry; returns its map and the
/// length of its byte range (from `addr`).
fn layer_map(
    format: EngineFormat,
    geometry: &Geometry,
    t: &LayerTensor,
) -> Result<(LayerMap, u64), TensorError> {
    let c = geometry.config();
    let rank = format.rank();
    if t.shape.len() != rank || t.strides.len() != rank {
        return Err(TensorError::Rank {
            expected: rank,
            shape: t.shape.len(),
            strides: t.strides.len(),
        });
    }
    let (block_axis, outer_axis, page_axes) = format.axes();
    let dim = |dim, expected, actual| {
        if expected == actual {
            Ok(())
        } else {
            Err(TensorError::Dim {
                dim,
                expected,
                actual,
            })
        }
    };
    dim("num_blocks", c.num_blocks, t.shape[block_axis])?;
    if let Some(axis) = outer_axis {
        dim("outer (K, V)", c.outer_dim, t.shape[axis])?;
    }
    dim("block_size", c.page_size, t.shape[page_axes[0]])?;
    if let [_, heads, head_dim] = page_axes {
        let product = t.shape[*heads].saturating_mul(t.shape[*head_dim]);
        dim("kv_heads × head_dim", c.inner_dim, product)?;
    } else {
        dim("latent_dim", c.inner_dim, t.shape[page_axes[1]])?;
    }
    // The page: dense in some order of its dimensions.
    let mut page: Vec<(usize, usize)> = page_axes
        .iter()
        .map(|&a| (t.shape[a], t.strides[a]))
        .filter(|&(n, _)| n > 1)
        .collect();
    page.sort_by_key(|&(_, stride)| stride);
    let mut dense = 1usize;
    for &(n, stride) in &page {
        if stride != dense {
            return Err(TensorError::PageNotContiguous {
                strides: page_axes.iter().map(|&a| t.strides[a]).collect(),
            });
        }
        dense = dense.saturating_mul(n);
    }
    let addr = t.addr;
    if addr == 0 {
        return Err(TensorError::Null);
    }
    let dtype = c.dtype_bytes as u64;
    if !addr.is_multiple_of(dtype) {
        return Err(TensorError::Misaligned {
            addr,
            align: c.dtype_bytes,
        });
    }
    let overflow = TensorError::AddressOverflow { addr };
    let bytes = |elements: usize| (elements as u64).checked_mul(dtype).ok_or(overflow.clone());
    let region = geometry.region_bytes() as u64;
    let block_stride = bytes(t.strides[block_axis])?;
    let outer_stride = match outer_axis {
        Some(axis) => bytes(t.strides[axis])?,
        None => region,
    };
    if !disjoint(
        &[(c.num_blocks, block_stride), (c.outer_dim, outer_stride)],
        region,
    ) {
        return Err(TensorError::Overlap {
            block_stride,
            outer_stride,
            region_bytes: geometry.region_bytes(),
        });
    }
    let len = block_stride
        .checked_mul(c.num_blocks as u64 - 1)
        .and_then(|b| {
            outer_stride
                .checked_mul(c.outer_dim as u64 - 1)
                .and_then(|o| b.checked_add(o))
        })
        .and_then(|l| l.checked_add(region))
        .ok_or(overflow.clone())?;
    addr.checked_add(len).ok_or(overflow)?;
    Ok((
        LayerMap {
            base: addr,
            block_stride,
            outer_stride,
        },
        len,
    ))
}

/// Checks every layer's tensor and that no two layers share a byte: their byte ranges are
/// disjoint, or (layers interleaved in one allocation, block by block) they are equally
/// strided at a constant distance that keeps every region apart. Also says whether all the
/// layers are known to lie in one allocation (one layer, or layers interleaved): only then
/// may a block's image across layers be one range of memory, however the addresses fall
/// (separate tensors can be back to back without being one allocation).
pub(super) fn engine_maps(
    format: EngineFormat,
    geometry: &Geometry,
    layers: &[LayerTensor],
) -> Result<(Vec<LayerMap>, bool), LayoutError> {
    let c = geometry.config();
    if format == EngineFormat::Mla && c.outer_dim != 1 {
        return Err(LayoutError::MlaOuterDim(c.outer_dim));
    }
    if layers.len() != c.num_layers {
        return Err(LayoutError::TensorCount {
            expected: c.num_layers,
            actual: layers.len(),
        });
    }
    let checked: Vec<(LayerMap, u64)> = layers
        .iter()
        .enumerate()
        .map(|(layer, t)| {
            layer_map(format, geometry, t).map_err(|error| LayoutError::Tensor { layer, error })
        })
        .collect::<Result<_, _>>()?;
    let mut order: Vec<usize> = (0..checked.len()).collect();
    order.sort_by_key(|&l| checked[l].0.base);
    let clash = order.windows(2).find(|w| {
        let (a, len) = checked[w[0]];
        a.base + len > checked[w[1]].0.base
    });
    if let Some(w) = clash {
        let first = checked[order[0]].0;
        let step = checked[order[1]].0.base - first.base;
        let uniform = order.iter().enumerate().all(|(i, &l)| {
            let m = checked[l].0;
            m.block_stride == first.block_stride
                && m.outer_stride == first.outer_stride
                && (i as u64)
                    .checked_mul(step)
                    .and_then(|o| first.base.checked_add(o))
                    == Some(m.base)
        });
        let dims = [
            (c.num_blocks, first.block_stride),
            (c.outer_dim, first.outer_stride),
            (c.num_layers, step),
        ];
        if !(uniform && disjoint(&dims, geometry.region_bytes() as u64)) {
            let (a, b) = (w[0].min(w[1]), w[0].max(w[1]));
            return Err(LayoutError::Tensor {
                layer: b,
                error: TensorError::LayerOverlap { other: a },
            });
        }
        // The layers' extents overlap, interleaved: one allocation.
        return Ok((checked.into_iter().map(|(m, _)| m).collect(), true));
    }
    let one_allocation = checked.len() == 1;
    Ok((
        checked.into_iter().map(|(m, _)| m).collect(),
        one_allocation,
    ))
}

/// What CUDA must report for a byte of `memory` (`None`: anything but device memory).
fn expected_pointer(memory: MemoryKind) -> Option<PointerKind> {
    match memory {
        MemoryKind::Device { ordinal } => Some(PointerKind::Device { ordinal }),
        MemoryKind::Pinned => Some(PointerKind::Host),
        MemoryKind::System => None,
    }
}

impl Layout {
    /// A layout over KV memory the engine owns: one tensor per layer, in one of the engines'
    /// [formats](EngineFormat), with any strides that keep every region (one block's K or V
    /// page of one layer) contiguous and apart. Every region maps to exactly the address its
    /// indices give in the engine's tensor, so the [`TransferEngine`](crate::TransferEngine)
    /// copies between this and any other layout of the same shape, unchanged; the block
    /// image order is kvbm's (layer, then outer), each page's bytes as the engine stores
    /// them.
    ///
    /// Checked, with nothing built on failure: the config; one tensor per layer; each
    /// tensor's rank and dimensions against the config (`LayoutError::Tensor` names the
    /// layer and the [`TensorError`]); each page fills one contiguous range; no two regions
    /// share a byte, within a layer or across layers (layers may interleave in one
    /// allocation if equally strided); addresses non-null, aligned to `dtype_bytes`, and
    /// their ranges inside the address space. Device and pinned memory need `cuda` (of the
    /// memory's device), through which CUDA is asked whether each tensor's first and last
    /// byte are such memory; `System` memory is taken on trust.
    ///
    /// # Safety
    /// The caller guarantees, for the life of the returned layout and of every transfer
    /// handle that uses it (transfers keep the layout alive; [`with_owner`](Self::with_owner)
    /// can tie the memory's owner to it):
    /// - each tensor's byte range is live memory of kind `memory`: device memory of `cuda`'s
    ///   device; page-locked host memory allocated or registered through CUDA (so the GPU
    ///   reaches it at the same address); or, for `System`, host memory this process may
    ///   read and write;
    /// - nobody else writes a block while a transfer or a block read holds it, or reads or
    ///   writes a block while a transfer or block write fills it — except the engine's own
    ///   GPU work ordered against the transfer by CUDA events: [`CopyOptions::wait_for`]
    ///   before the copy reads or writes, the handle's
    ///   [`completion_event`](crate::TransferHandle::completion_event) after.
    ///
    /// [`CopyOptions::wait_for`]: crate::CopyOptions::wait_for
    ///
    /// ```
    /// use std::sync::Arc;
    /// use kvbm_logical::BlockId;
    /// use kvbm_physical::{
    ///     CopyOptions, EngineFormat, LayerTensor, Layout, LayoutConfig, LayoutKind, MemoryKind,
    ///     SystemStorage, TransferEngine,
    /// };
    /// // vLLM's FlashAttention layout, [2, num_blocks, block_size, kv_heads, head_dim] per
    /// // layer, in host memory the "engine" owns.
    /// let c = LayoutConfig { num_blocks: 4, num_layers: 2, outer_dim: 2, page_size: 16, inner_dim: 2 * 64, dtype_bytes: 2 };
    /// let shape = EngineFormat::OuterFirst.dense_shape(&c, 2)?;
    /// let tensors: Vec<SystemStorage> = (0..2)
    ///     .map(|_| SystemStorage::new(c.num_blocks * c.block_bytes().unwrap() / 2))
    ///     .collect::<Result<_, _>>()?;
    /// let layers: Vec<LayerTensor> =
    ///     tensors.iter().map(|t| LayerTensor::contiguous(t.addr(), &shape)).collect();
    /// // SAFETY: the tensors are live host memory, owned by the layout from here on, and
    /// // nothing else touches them.
    /// let engine = unsafe {
    ///     Layout::from_engine(EngineFormat::OuterFirst, c, MemoryKind::System, &layers, None)?
    /// }
    /// .with_owner(tensors)
    /// .into_shared();
    /// assert_eq!(engine.kind(), LayoutKind::OuterFirst);
    ///
    /// let image: Vec<u8> = (0..engine.block_bytes()).map(|i| (i % 251) as u8).collect();
    /// engine.write_block(BlockId::new(3), &image)?;
    /// let host = Layout::system(LayoutKind::FullyContiguous, c)?.into_shared();
    /// TransferEngine::host().copy_blocks_blocking(
    ///     &engine, &host, &[(BlockId::new(3), BlockId::new(0))], &CopyOptions::default())?;
    /// let mut back = vec![0; host.block_bytes()];
    /// host.read_block(BlockId::new(0), &mut back)?;
    /// assert_eq!(back, image);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub unsafe fn from_engine(
        format: EngineFormat,
        config: LayoutConfig,
        memory: MemoryKind,
        layers: &[LayerTensor],
        cuda: Option<CudaDevice>,
    ) -> Result<Self, LayoutError> {
        let geometry = Geometry::new(format.kind(), config)?;
        let (maps, one_allocation) = engine_maps(format, &geometry, layers)?;
        match (memory, &cuda) {
            (MemoryKind::Device { ordinal }, Some(cuda)) if ordinal != cuda.ordinal() => {
                return Err(LayoutError::DeviceMismatch {
                    memory: ordinal,
                    cuda: cuda.ordinal(),
                });
            }
            (MemoryKind::Device { .. } | MemoryKind::Pinned, None) => {
                return Err(if cfg!(feature = "cuda") {
                    crate::StorageError::NoCudaDevice(format!(
                        "a layout over {memory} memory needs its CudaDevice"
                    ))
                } else {
                    crate::StorageError::CudaDisabled
                }
                .into());
            }
            _ => {}
        }
        if let Some(cuda) = &cuda {
            let region = geometry.region_bytes() as u64;
            for (layer, m) in maps.iter().enumerate() {
                let last = m
                    .region(config.num_blocks as u32 - 1, config.outer_dim - 1)
                    .map_or(m.base, |r| r + region - 1);
                for addr in [m.base, last] {
                    let found = cuda.pointer_kind(addr)?;
                    let fits = match expected_pointer(memory) {
                        Some(expected) => found == expected,
                        None => !matches!(found, PointerKind::Device { .. }),
                    };
                    if !fits {
                        return Err(LayoutError::Tensor {
                            layer,
                            error: TensorError::WrongMemory {
                                addr,
                                expected: memory,
                                found,
                            },
                        });
                    }
                }
            }
        }
        Ok(Self::assemble(
            geometry,
            Vec::new(),
            (maps, one_allocation),
            memory,
            cuda,
            Some(format),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_disjointness_test_on_known_arrangements() {
        // Outer-first and block-first over 4 blocks of 16-byte regions.
        assert!(disjoint(&[(4, 16), (2, 64)], 16));
        assert!(disjoint(&[(4, 32), (2, 16)], 16));
        // Padded strides are fine; a stride below the region is not.
        assert!(disjoint(&[(4, 48), (2, 20)], 16));
        assert!(!disjoint(&[(4, 16), (2, 8)], 16));
        // K and V interleaved with blocks: the V of block b on the K of block b + 1.
        assert!(!disjoint(&[(4, 16), (2, 16)], 16));
        // A dimension of one index never moves: any stride.
        assert!(disjoint(&[(1, 0), (4, 16)], 16));
        assert!(!disjoint(&[(2, 0)], 1));
        // Extents past u64 are refused, not wrapped.
        assert!(!disjoint(&[(4, u64::MAX / 2)], 1));
    }
}
