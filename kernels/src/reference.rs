//! CPU references of the kernels: the same arguments over host slices, with every range
//! checked. They define what the kernels must do; the GPU tests compare against them.

use crate::KernelError;

/// One region of a batched copy: `len` bytes from offset `src` to offset `dst` (on the GPU,
/// addresses).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CopyRegion {
    /// Source offset.
    pub src: usize,
    /// Destination offset.
    pub dst: usize,
    /// Length in bytes.
    pub len: usize,
}

/// Reference of `kvbm_batched_copy`: copies every region, in order.
///
/// ```
/// use kvbm_kernels::{KernelError, reference::{batched_copy, CopyRegion}};
/// let mut dst = [0u8; 4];
/// let err = batched_copy(&[1, 2], &mut dst, &[CopyRegion { src: 1, dst: 0, len: 2 }]);
/// assert!(matches!(err, Err(KernelError::InvalidArgument(_))));
/// ```
pub fn batched_copy(src: &[u8], dst: &mut [u8], regions: &[CopyRegion]) -> Result<(), KernelError> {
    for (i, r) in regions.iter().enumerate() {
        let s = range(r.src, r.len, src.len(), i, "source")?;
        let d = range(r.dst, r.len, dst.len(), i, "destination")?;
        dst[d].copy_from_slice(&src[s]);
    }
    Ok(())
}

fn range(
    at: usize,
    len: usize,
    size: usize,
    i: usize,
    what: &str,
) -> Result<std::ops::Range<usize>, KernelError> {
    match at.checked_add(len) {
        Some(end) if end <= size => Ok(at..end),
        _ => Err(KernelError::InvalidArgument(format!(
            "region {i}: {what} {at}+{len} beyond {size} bytes"
        ))),
    }
}

/// The shape the permutation needs: per block, `num_layers × outer_dim` regions of
/// `region_bytes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PermuteShape {
    /// Layers.
    pub num_layers: usize,
    /// 1 or 2 (K, V).
    pub outer_dim: usize,
    /// Bytes per region.
    pub region_bytes: usize,
}

impl PermuteShape {
    /// Bytes of one block's layer: its `outer_dim` regions, adjacent in both layouts.
    /// [`KernelError::Overflow`] when that does not fit in `usize`.
    ///
    /// ```
    /// use kvbm_kernels::{KernelError, reference::PermuteShape};
    /// let shape = PermuteShape { num_layers: 3, outer_dim: 2, region_bytes: 16 };
    /// assert_eq!(shape.span()?, 32);
    /// let huge = PermuteShape { region_bytes: usize::MAX, ..shape };
    /// assert!(matches!(huge.span(), Err(KernelError::Overflow { .. })));
    /// # Ok::<(), KernelError>(())
    /// ```
    pub fn span(&self) -> Result<usize, KernelError> {
        self.outer_dim
            .checked_mul(self.region_bytes)
            .ok_or(KernelError::Overflow { what: "span" })
    }

    /// Bytes of one block. [`KernelError::Overflow`] when that does not fit in `usize`.
    ///
    /// ```
    /// use kvbm_kernels::{KernelError, reference::PermuteShape};
    /// let shape = PermuteShape { num_layers: 3, outer_dim: 2, region_bytes: 16 };
    /// assert_eq!(shape.block_bytes()?, 96);
    /// let huge = PermuteShape { num_layers: usize::MAX / 16, ..shape };
    /// assert!(matches!(huge.block_bytes(), Err(KernelError::Overflow { .. })));
    /// # Ok::<(), KernelError>(())
    /// ```
    pub fn block_bytes(&self) -> Result<usize, KernelError> {
        self.span()?
            .checked_mul(self.num_layers)
            .ok_or(KernelError::Overflow {
                what: "block bytes",
            })
    }

    /// Checks the slabs and every pair; returns `(span, block_bytes)`. Once it passes, every
    /// offset the references compute lies inside its slab, so none can overflow.
    fn check(
        &self,
        layers: usize,
        pairs: &[(u32, u32)],
        ls_len: &[usize],
        fc_len: usize,
    ) -> Result<(usize, usize), KernelError> {
        if layers != self.num_layers {
            return Err(KernelError::InvalidArgument(format!(
                "{layers} layer slabs for {} layers",
                self.num_layers
            )));
        }
        let span = self.span()?;
        let block_bytes = self.block_bytes()?;
        for (i, &(ls, fc)) in pairs.iter().enumerate() {
            let ls_end = (ls as usize + 1).checked_mul(span);
            if ls_len.iter().any(|&len| ls_end.is_none_or(|end| end > len)) {
                return Err(KernelError::InvalidArgument(format!(
                    "pair {i}: layer-separate block {ls} beyond a layer slab"
                )));
            }
            let fc_end = (fc as usize + 1).checked_mul(block_bytes);
            if fc_end.is_none_or(|end| end > fc_len) {
                return Err(KernelError::InvalidArgument(format!(
                    "pair {i}: contiguous block {fc} beyond the slab"
                )));
            }
        }
        Ok((span, block_bytes))
    }
}

/// Reference of `kvbm_permute_blocks` with `to_block_major = 1`: for each `(ls, fc)` pair,
/// copies layer-separate block `ls` (one slab per layer) into fully contiguous block `fc`.
///
/// ```
/// use kvbm_kernels::reference::{permute_to_block_major, PermuteShape};
/// let shape = PermuteShape { num_layers: 2, outer_dim: 2, region_bytes: 1 };
/// let (l0, l1) = ([1u8, 2, 3, 4], [5u8, 6, 7, 8]); // two blocks per layer: K, V each
/// let mut fc = [0u8; 8];
/// permute_to_block_major(shape, &[&l0, &l1], &mut fc, &[(1, 0), (0, 1)])?;
/// assert_eq!(fc, [3, 4, 7, 8, 1, 2, 5, 6]);
/// # Ok::<(), kvbm_kernels::KernelError>(())
/// ```
pub fn permute_to_block_major(
    shape: PermuteShape,
    layers: &[&[u8]],
    blocks: &mut [u8],
    pairs: &[(u32, u32)],
) -> Result<(), KernelError> {
    let lens: Vec<usize> = layers.iter().map(|l| l.len()).collect();
    let (span, block_bytes) = shape.check(layers.len(), pairs, &lens, blocks.len())?;
    for &(ls, fc) in pairs {
        for (layer, slab) in layers.iter().enumerate() {
            let from = ls as usize * span;
            let to = fc as usize * block_bytes + layer * span;
            blocks[to..to + span].copy_from_slice(&slab[from..from + span]);
        }
    }
    Ok(())
}

/// Reference of `kvbm_permute_blocks` with `to_block_major = 0`: for each `(ls, fc)` pair,
/// copies fully contiguous block `fc` into layer-separate block `ls`.
pub fn permute_to_layer_major(
    shape: PermuteShape,
    blocks: &[u8],
    layers: &mut [&mut [u8]],
    pairs: &[(u32, u32)],
) -> Result<(), KernelError> {
    let lens: Vec<usize> = layers.iter().map(|l| l.len()).collect();
    let (span, block_bytes) = shape.check(layers.len(), pairs, &lens, blocks.len())?;
    for &(ls, fc) in pairs {
        for (layer, slab) in layers.iter_mut().enumerate() {
            let to = ls as usize * span;
            let from = fc as usize * block_bytes + layer * span;
            slab[to..to + span].copy_from_slice(&blocks[from..from + span]);
        }
    }
    Ok(())
}

/// Where one layer's regions lie on one side of [`permute_regions`]: region `(block, outer)`
/// at `base + block × block_stride + outer × outer_stride` — GPU addresses for the kernel,
/// offsets into the side's buffer for the reference. Every kvbm layout has this form.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LayerMap {
    /// Region `(0, 0)` of the layer.
    pub base: u64,
    /// Bytes from one block's region to the next block's.
    pub block_stride: u64,
    /// Bytes from a block's K region to its V region.
    pub outer_stride: u64,
}

impl LayerMap {
    /// The start of region `(block, outer)`, or `None` when it does not fit in `u64`.
    ///
    /// ```
    /// use kvbm_kernels::reference::LayerMap;
    /// let m = LayerMap { base: 100, block_stride: 64, outer_stride: 16 };
    /// assert_eq!(m.region(2, 1), Some(100 + 128 + 16));
    /// assert_eq!(LayerMap { block_stride: u64::MAX, ..m }.region(2, 0), None);
    /// ```
    pub fn region(&self, block: u32, outer: usize) -> Option<u64> {
        let b = u64::from(block).checked_mul(self.block_stride)?;
        let o = (outer as u64).checked_mul(self.outer_stride)?;
        self.base.checked_add(b)?.checked_add(o)
    }
}

/// The regions [`permute_regions`] copies: `outer_dim` regions of `region_bytes` per block
/// and layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RegionShape {
    /// Regions per block and layer (2: K and V; 1: MLA).
    pub outer_dim: usize,
    /// Bytes per region.
    pub region_bytes: usize,
}

/// Reference of `kvbm_permute_regions`: for each `(s, d)` pair, every layer `l` and outer
/// index `o`, copies region `(s, o)` of `src_maps[l]` in `src` to region `(d, o)` of
/// `dst_maps[l]` in `dst`. Refused before anything is written when the maps disagree on the
/// layer count, a region lies outside its buffer, or two destination regions overlap.
///
/// ```
/// use kvbm_kernels::reference::{permute_regions, LayerMap, RegionShape};
/// // One layer, K and V of 2 bytes. Source outer-first: all K, then all V (2 blocks).
/// let src = [1u8, 2, 3, 4, 5, 6, 7, 8]; // K0 K1 V0 V1
/// let of = LayerMap { base: 0, block_stride: 2, outer_stride: 4 };
/// // Destination block-first: K then V of each block.
/// let bf = LayerMap { base: 0, block_stride: 4, outer_stride: 2 };
/// let mut dst = [0u8; 8];
/// let shape = RegionShape { outer_dim: 2, region_bytes: 2 };
/// permute_regions(shape, &src, &[of], &mut dst, &[bf], &[(1, 0), (0, 1)])?;
/// assert_eq!(dst, [3, 4, 7, 8, 1, 2, 5, 6]);
/// # Ok::<(), kvbm_kernels::KernelError>(())
/// ```
pub fn permute_regions(
    shape: RegionShape,
    src: &[u8],
    src_maps: &[LayerMap],
    dst: &mut [u8],
    dst_maps: &[LayerMap],
    pairs: &[(u32, u32)],
) -> Result<(), KernelError> {
    if src_maps.len() != dst_maps.len() {
        return Err(KernelError::InvalidArgument(format!(
            "{} source layers, {} destination layers",
            src_maps.len(),
            dst_maps.len()
        )));
    }
    let len = shape.region_bytes;
    let locate = |map: &LayerMap, block: u32, outer: usize, size: usize, what: &str| {
        map.region(block, outer)
            .and_then(|at| usize::try_from(at).ok())
            .and_then(|at| at.checked_add(len).filter(|&end| end <= size).map(|_| at))
            .ok_or_else(|| {
                KernelError::InvalidArgument(format!(
                    "{what} region (block {block}, outer {outer}) of {map:?} beyond {size} bytes"
                ))
            })
    };
    let mut copies = Vec::new();
    for &(s, d) in pairs {
        for (sm, dm) in src_maps.iter().zip(dst_maps) {
            for o in 0..shape.outer_dim {
                let from = locate(sm, s, o, src.len(), "source")?;
                let to = locate(dm, d, o, dst.len(), "destination")?;
                copies.push((to, from));
            }
        }
    }
    if len > 0 {
        let mut starts: Vec<usize> = copies.iter().map(|&(to, _)| to).collect();
        starts.sort_unstable();
        if let Some(w) = starts.windows(2).find(|w| w[1] - w[0] < len) {
            return Err(KernelError::InvalidArgument(format!(
                "destination regions at {} and {} overlap ({len} bytes each)",
                w[0], w[1]
            )));
        }
    }
    for (to, from) in copies {
        dst[to..to + len].copy_from_slice(&src[from..from + len]);
    }
    Ok(())
}

/// The same copy as `(shape, src_maps, dst_maps)` in fewer, larger regions, which is what the
/// launcher hands the kernel: when both sides keep a block's K and V adjacent (outer stride =
/// region bytes), one region per layer; when, further, both keep a block's layers adjacent
/// and equally strided, one region per block. Returns the input unchanged otherwise (or if
/// a merged size would overflow).
///
/// ```
/// use kvbm_kernels::reference::{coarsen, LayerMap, RegionShape};
/// let shape = RegionShape { outer_dim: 2, region_bytes: 16 };
/// // Layer-separate (one slab per layer, K and V adjacent) against fully contiguous.
/// let ls = [LayerMap { base: 0, block_stride: 32, outer_stride: 16 },
///           LayerMap { base: 4096, block_stride: 32, outer_stride: 16 }];
/// let fc = [LayerMap { base: 0, block_stride: 64, outer_stride: 16 },
///           LayerMap { base: 32, block_stride: 64, outer_stride: 16 }];
/// let (s, src, dst) = coarsen(shape, &ls, &fc);
/// assert_eq!(s, RegionShape { outer_dim: 1, region_bytes: 32 });
/// assert_eq!((src.len(), dst.len()), (2, 2)); // the layers of `ls` are apart
/// ```
pub fn coarsen(
    shape: RegionShape,
    src_maps: &[LayerMap],
    dst_maps: &[LayerMap],
) -> (RegionShape, Vec<LayerMap>, Vec<LayerMap>) {
    let mut shape = shape;
    let (mut src, mut dst) = (src_maps.to_vec(), dst_maps.to_vec());
    let region = shape.region_bytes as u64;
    let outer_adjacent = |maps: &[LayerMap]| maps.iter().all(|m| m.outer_stride == region);
    if shape.outer_dim > 1
        && outer_adjacent(&src)
        && outer_adjacent(&dst)
        && let Some(span) = shape.outer_dim.checked_mul(shape.region_bytes)
    {
        shape = RegionShape {
            outer_dim: 1,
            region_bytes: span,
        };
    }
    if shape.outer_dim == 1 {
        let span = shape.region_bytes as u64;
        for m in src.iter_mut().chain(dst.iter_mut()) {
            m.outer_stride = span; // unused with one region per layer
        }
        let layers_adjacent = |maps: &[LayerMap]| {
            maps.iter().enumerate().all(|(l, m)| {
                m.block_stride == maps[0].block_stride
                    && (l as u64)
                        .checked_mul(span)
                        .and_then(|off| maps[0].base.checked_add(off))
                        == Some(m.base)
            })
        };
        if src.len() > 1
            && layers_adjacent(&src)
            && layers_adjacent(&dst)
            && let Some(block) = shape.region_bytes.checked_mul(src.len())
        {
            shape.region_bytes = block;
            src.truncate(1);
            dst.truncate(1);
            src[0].outer_stride = block as u64;
            dst[0].outer_stride = block as u64;
        }
    }
    (shape, src, dst)
}
