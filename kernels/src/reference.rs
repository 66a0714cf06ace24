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
