//! Block layouts: where each `(block, layer, outer)` region of a KV cache lives.
//!
//! A *region* is one page of one layer's K (or V): `page_size × inner_dim × dtype_bytes`
//! bytes. A block holds `num_layers × outer_dim` regions.
//!
//! - [`LayoutKind::FullyContiguous`]: one slab, block-major — block *b*'s bytes are one
//!   contiguous range `[b × block_bytes, (b + 1) × block_bytes)`, ordered layer, then outer.
//!   Ideal for offload: a block moves in one copy.
//! - [`LayoutKind::LayerSeparate`]: one slab per layer, block-first inside it — the layout
//!   attention kernels compute on. A block is `num_layers` ranges of `outer_dim` regions.
//!   FlashInfer's `[num_blocks, 2, block_size, kv_heads, head_dim]` and MLA's
//!   `[num_blocks, block_size, latent_dim]` tensors are this arrangement.
//! - [`LayoutKind::OuterFirst`]: one slab per layer, outer-first inside it: every block's K,
//!   then every block's V — vLLM FlashAttention's `[2, num_blocks, block_size, kv_heads,
//!   head_dim]`. A block is `num_layers × outer_dim` separate regions.
//!
//! The *block image* — what [`Layout::read_block`] returns and [`Layout::write_block`] takes
//! — is the fully contiguous order for every kind, so blocks compare across layouts.
//!
//! Every layout, whatever its kind, addresses its regions per layer as `base + block ×
//! block_stride + outer × outer_stride` ([`Layout::layer_map`]): that is all the transfer
//! engine needs, so layouts over an engine's own tensors ([`Layout::from_engine`], any
//! strides) copy exactly like kvbm's own.

use std::any::Any;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

pub use kvbm_kernels::reference::LayerMap;
use kvbm_logical::BlockId;
use parking_lot::Mutex;

use crate::cuda::CudaDevice;
use crate::error::LayoutError;
use crate::storage::{MemoryKind, Storage};

/// The shape of a KV cache pool.
///
/// ```
/// use kvbm_physical::LayoutConfig;
/// // 32 layers × K,V × 16 tokens × 8 heads × 128 dims × bf16
/// let config = LayoutConfig {
///     num_blocks: 1024,
///     num_layers: 32,
///     outer_dim: 2,
///     page_size: 16,
///     inner_dim: 8 * 128,
///     dtype_bytes: 2,
/// };
/// assert_eq!(config.region_bytes()?, 32 << 10);
/// assert_eq!(config.block_bytes()?, 2 << 20);
/// # Ok::<(), kvbm_physical::LayoutError>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LayoutConfig {
    /// Blocks in the pool (the `BlockManager`'s block count).
    pub num_blocks: usize,
    /// Transformer layers.
    pub num_layers: usize,
    /// 2 for separate K and V, 1 for MLA's joint latent.
    pub outer_dim: usize,
    /// Tokens per block.
    pub page_size: usize,
    /// Elements per token per layer and outer index (heads × head_dim).
    pub inner_dim: usize,
    /// Bytes per element (2 for fp16/bf16, 1 for fp8).
    pub dtype_bytes: usize,
}

impl LayoutConfig {
    /// Checks every dimension; see [`LayoutError`].
    ///
    /// ```
    /// use kvbm_physical::{LayoutConfig, LayoutError};
    /// let mut c = LayoutConfig { num_blocks: 4, num_layers: 2, outer_dim: 2, page_size: 16, inner_dim: 64, dtype_bytes: 2 };
    /// assert!(c.validate().is_ok());
    /// c.page_size = 0;
    /// assert_eq!(c.validate(), Err(LayoutError::ZeroDimension("page_size")));
    /// c.page_size = usize::MAX;
    /// assert!(matches!(c.validate(), Err(LayoutError::Overflow { .. })));
    /// ```
    pub fn validate(&self) -> Result<(), LayoutError> {
        for (name, value) in [
            ("num_blocks", self.num_blocks),
            ("num_layers", self.num_layers),
            ("outer_dim", self.outer_dim),
            ("page_size", self.page_size),
            ("inner_dim", self.inner_dim),
            ("dtype_bytes", self.dtype_bytes),
        ] {
            if value == 0 {
                return Err(LayoutError::ZeroDimension(name));
            }
        }
        if self.outer_dim > 2 {
            return Err(LayoutError::InvalidOuterDim(self.outer_dim));
        }
        if self.num_blocks > kvbm_logical::MAX_BLOCKS {
            return Err(LayoutError::TooManyBlocks {
                num_blocks: self.num_blocks,
                max: kvbm_logical::MAX_BLOCKS,
            });
        }
        self.total_bytes().map(|_| ())
    }

    /// Bytes of one region (one layer's K or V page of one block).
    pub fn region_bytes(&self) -> Result<usize, LayoutError> {
        mul(
            &[self.page_size, self.inner_dim, self.dtype_bytes],
            "region bytes",
        )
    }

    /// Bytes of one block across all layers.
    pub fn block_bytes(&self) -> Result<usize, LayoutError> {
        mul(
            &[self.region_bytes()?, self.num_layers, self.outer_dim],
            "block bytes",
        )
    }

    /// Bytes of the whole pool. At most `isize::MAX`, the most one allocation may hold.
    pub fn total_bytes(&self) -> Result<usize, LayoutError> {
        let total = mul(&[self.block_bytes()?, self.num_blocks], "pool bytes")?;
        if total > isize::MAX as usize {
            return Err(LayoutError::Overflow { what: "pool bytes" });
        }
        Ok(total)
    }

    /// The block count whose pool fits in `fraction` of `free_bytes`: how a device pool is
    /// sized from the free memory NVML or the driver reports. Returns the config with
    /// `num_blocks` set. Refused when the per-block shape is invalid, the fraction is not in
    /// (0, 1], or not one block fits.
    ///
    /// ```
    /// use kvbm_physical::{LayoutConfig, LayoutError};
    /// let c = LayoutConfig { num_blocks: 1, num_layers: 1, outer_dim: 2, page_size: 16, inner_dim: 128, dtype_bytes: 2 };
    /// // 8 KiB blocks, 90% of 1 MiB free → 115 blocks
    /// assert_eq!(c.sized_for(1 << 20, 0.9)?.num_blocks, 115);
    /// assert!(c.sized_for(1 << 20, 1.5).is_err());
    /// let zero = LayoutConfig { inner_dim: 0, ..c };
    /// assert_eq!(zero.sized_for(1 << 20, 0.5), Err(LayoutError::ZeroDimension("inner_dim")));
    /// # Ok::<(), LayoutError>(())
    /// ```
    pub fn sized_for(&self, free_bytes: usize, fraction: f64) -> Result<Self, LayoutError> {
        if !(fraction > 0.0 && fraction <= 1.0) {
            return Err(crate::StorageError::InvalidFraction(fraction).into());
        }
        let mut probe = *self;
        probe.num_blocks = 1;
        probe.validate()?;
        let block = probe.block_bytes()?; // non-zero once validated
        let budget = (free_bytes as f64 * fraction) as usize;
        let blocks = (budget / block).min(kvbm_logical::MAX_BLOCKS);
        if blocks == 0 {
            return Err(crate::StorageError::AllocationFailed {
                kind: MemoryKind::Device { ordinal: 0 },
                bytes: block,
                reason: format!("{budget} bytes allowed, one block needs {block}"),
            }
            .into());
        }
        probe.num_blocks = blocks;
        probe.validate()?;
        Ok(probe)
    }
}

fn mul(factors: &[usize], what: &'static str) -> Result<usize, LayoutError> {
    factors
        .iter()
        .try_fold(1usize, |acc, &f| acc.checked_mul(f))
        .ok_or(LayoutError::Overflow { what })
}

mod external;
mod view;
pub use external::{EngineFormat, LayerTensor};
pub use view::{BlockView, BlockViewMut};

/// How blocks are arranged in memory; see the [module docs](self).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LayoutKind {
    /// One slab, each block one contiguous range.
    FullyContiguous,
    /// One slab per layer, block-first inside each (K and V of a block adjacent).
    LayerSeparate,
    /// One slab per layer, outer-first inside each: all blocks' K, then all blocks' V.
    OuterFirst,
}

impl LayoutKind {
    /// Every kind.
    pub const ALL: [LayoutKind; 3] = [
        LayoutKind::FullyContiguous,
        LayoutKind::LayerSeparate,
        LayoutKind::OuterFirst,
    ];
}

/// A range of memory: address and length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Region {
    /// The first byte (a host pointer or a CUDA device pointer).
    pub addr: u64,
    /// Length in bytes.
    pub len: usize,
}

/// The pure arithmetic of a layout: offsets, no memory. Exposed for engines that bring
/// their own memory, and for testing the strides.
///
/// ```
/// use kvbm_physical::{Geometry, LayoutConfig, LayoutKind};
/// let c = LayoutConfig { num_blocks: 4, num_layers: 3, outer_dim: 2, page_size: 2, inner_dim: 4, dtype_bytes: 2 };
/// let g = Geometry::new(LayoutKind::LayerSeparate, c)?;
/// assert_eq!(g.slab_count(), 3); // one per layer
/// // block 1, layer 2, V: slab 2, after block 0's K and V and block 1's K
/// assert_eq!(g.offset(1, 2, 1), (2, 3 * 16));
/// # Ok::<(), kvbm_physical::LayoutError>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    kind: LayoutKind,
    config: LayoutConfig,
    region_bytes: usize,
    block_bytes: usize,
}

impl Geometry {
    /// Validates `config` and derives the strides.
    pub fn new(kind: LayoutKind, config: LayoutConfig) -> Result<Self, LayoutError> {
        config.validate()?;
        Ok(Self {
            kind,
            config,
            region_bytes: config.region_bytes()?,
            block_bytes: config.block_bytes()?,
        })
    }

    /// The arrangement.
    pub fn kind(&self) -> LayoutKind {
        self.kind
    }

    /// The shape.
    pub fn config(&self) -> &LayoutConfig {
        &self.config
    }

    /// Bytes of one region.
    pub fn region_bytes(&self) -> usize {
        self.region_bytes
    }

    /// Bytes of one block (all its regions).
    pub fn block_bytes(&self) -> usize {
        self.block_bytes
    }

    /// How many slabs: 1, or one per layer.
    pub fn slab_count(&self) -> usize {
        match self.kind {
            LayoutKind::FullyContiguous => 1,
            LayoutKind::LayerSeparate | LayoutKind::OuterFirst => self.config.num_layers,
        }
    }

    /// Bytes of each slab.
    pub fn slab_bytes(&self) -> usize {
        // Cannot overflow: bounded by the validated total.
        self.config.num_blocks * self.block_bytes / self.slab_count()
    }

    /// `(slab, byte offset)` of a region; indices must be in range (checked by
    /// [`check`](Self::check)); unchecked arithmetic cannot overflow once validated.
    pub fn offset(&self, block: usize, layer: usize, outer: usize) -> (usize, usize) {
        let c = &self.config;
        match self.kind {
            LayoutKind::FullyContiguous => (
                0,
                block * self.block_bytes + (layer * c.outer_dim + outer) * self.region_bytes,
            ),
            LayoutKind::LayerSeparate => (layer, (block * c.outer_dim + outer) * self.region_bytes),
            LayoutKind::OuterFirst => (layer, (outer * c.num_blocks + block) * self.region_bytes),
        }
    }

    /// The per-layer maps of this arrangement over slabs starting at `bases` (one per slab):
    /// region `(block, layer, outer)` at `maps[layer].region(block, outer)`.
    fn layer_maps(&self, bases: &[u64]) -> Vec<LayerMap> {
        let c = &self.config;
        let region = self.region_bytes as u64;
        (0..c.num_layers)
            .map(|layer| {
                let (slab, offset) = self.offset(0, layer, 0);
                let (block_stride, outer_stride) = match self.kind {
                    LayoutKind::FullyContiguous => (self.block_bytes as u64, region),
                    LayoutKind::LayerSeparate => (c.outer_dim as u64 * region, region),
                    LayoutKind::OuterFirst => (region, c.num_blocks as u64 * region),
                };
                LayerMap {
                    base: bases[slab] + offset as u64,
                    block_stride,
                    outer_stride,
                }
            })
            .collect()
    }

    /// Checks that `(block, layer, outer)` lies inside the layout.
    pub fn check(&self, block: usize, layer: usize, outer: usize) -> Result<(), LayoutError> {
        let c = &self.config;
        if block >= c.num_blocks {
            return Err(LayoutError::BlockOutOfRange {
                block,
                num_blocks: c.num_blocks,
            });
        }
        if layer >= c.num_layers {
            return Err(LayoutError::LayerOutOfRange {
                layer,
                num_layers: c.num_layers,
            });
        }
        if outer >= c.outer_dim {
            return Err(LayoutError::OuterOutOfRange {
                outer,
                outer_dim: c.outer_dim,
            });
        }
        Ok(())
    }
}

/// Per-block locks: a reader count, or `WRITER`.
pub(crate) struct BlockLocks(Box<[AtomicU32]>);

const WRITER: u32 = u32::MAX;

impl BlockLocks {
    fn new(n: usize) -> Self {
        Self((0..n).map(|_| AtomicU32::new(0)).collect())
    }

    pub(crate) fn try_read(&self, block: usize) -> bool {
        self.0[block]
            .fetch_update(Ordering::Acquire, Ordering::Relaxed, |v| {
                (v < WRITER - 1).then(|| v + 1)
            })
            .is_ok()
    }

    pub(crate) fn try_write(&self, block: usize) -> bool {
        self.0[block]
            .compare_exchange(0, WRITER, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    pub(crate) fn unlock_read(&self, block: usize) {
        let prev = self.0[block].fetch_sub(1, Ordering::Release);
        debug_assert!(prev != 0 && prev != WRITER);
    }

    pub(crate) fn unlock_write(&self, block: usize) {
        let prev = self.0[block].swap(0, Ordering::Release);
        debug_assert_eq!(prev, WRITER);
    }
}

/// A layout backed by memory: a [`Geometry`] and its slabs, allocated once.
///
/// ```
/// use kvbm_logical::BlockId;
/// use kvbm_physical::{Layout, LayoutConfig, LayoutKind};
/// let c = LayoutConfig { num_blocks: 8, num_layers: 2, outer_dim: 2, page_size: 4, inner_dim: 8, dtype_bytes: 2 };
/// let layout = Layout::system(LayoutKind::LayerSeparate, c)?;
/// let image: Vec<u8> = (0..layout.block_bytes()).map(|i| i as u8).collect();
/// layout.write_block(BlockId::new(3), &image)?;
/// let mut back = vec![0; layout.block_bytes()];
/// layout.read_block(BlockId::new(3), &mut back)?;
/// assert_eq!(back, image);
/// # Ok::<(), kvbm_physical::LayoutError>(())
/// ```
pub struct Layout {
    geometry: Geometry,
    /// The memory kvbm owns (empty for a layout over an engine's tensors).
    slabs: Vec<Storage>,
    /// Where each layer's regions lie.
    maps: Vec<LayerMap>,
    /// Whether every block's image is one contiguous range (regions in image order, equal
    /// block strides): then copies between two such layouts coalesce block by block.
    contiguous_images: bool,
    memory: MemoryKind,
    cuda: Option<CudaDevice>,
    locks: BlockLocks,
    checksums: Option<Mutex<Vec<Option<u64>>>>,
    /// For a layout over an engine's tensors: their format.
    engine: Option<EngineFormat>,
    /// Kept alive as long as the layout (see [`Layout::with_owner`]).
    owner: Option<Box<dyn Any + Send + Sync>>,
}

impl Layout {
    /// Allocates system (pageable host) memory for the layout: the CPU fallback.
    pub fn system(kind: LayoutKind, config: LayoutConfig) -> Result<Self, LayoutError> {
        Self::allocate(kind, config, MemoryKind::System, None)
    }

    /// Allocates pinned host memory on `cuda`'s context.
    pub fn pinned(
        kind: LayoutKind,
        config: LayoutConfig,
        cuda: &CudaDevice,
    ) -> Result<Self, LayoutError> {
        Self::allocate(kind, config, MemoryKind::Pinned, Some(cuda))
    }

    /// Allocates device memory on `cuda`.
    pub fn device(
        kind: LayoutKind,
        config: LayoutConfig,
        cuda: &CudaDevice,
    ) -> Result<Self, LayoutError> {
        let ordinal = cuda.ordinal();
        Self::allocate(kind, config, MemoryKind::Device { ordinal }, Some(cuda))
    }

    /// Allocates `memory` for the layout (one slab, or one per layer). `cuda` is needed for
    /// pinned and device memory.
    pub fn allocate(
        kind: LayoutKind,
        config: LayoutConfig,
        memory: MemoryKind,
        cuda: Option<&CudaDevice>,
    ) -> Result<Self, LayoutError> {
        Self::allocate_with_faults(kind, config, memory, cuda, None)
    }

    /// [`allocate`](Self::allocate), consulting `faults` before each slab (tests and failure
    /// drills). A failure frees the slabs already allocated and returns
    /// [`StorageError::AllocationFailed`](crate::StorageError::AllocationFailed).
    pub fn allocate_with_faults(
        kind: LayoutKind,
        config: LayoutConfig,
        memory: MemoryKind,
        cuda: Option<&CudaDevice>,
        faults: Option<&dyn crate::FaultInjector>,
    ) -> Result<Self, LayoutError> {
        let geometry = Geometry::new(kind, config)?;
        let bytes = geometry.slab_bytes();
        let slabs = (0..geometry.slab_count())
            .map(|_| {
                if faults.is_some_and(|f| f.fail_allocation(memory, bytes)) {
                    return Err(crate::StorageError::AllocationFailed {
                        kind: memory,
                        bytes,
                        reason: "injected fault".into(),
                    });
                }
                Storage::allocate(memory, bytes, cuda)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Self::build(geometry, slabs, cuda.cloned())
    }

    /// Wraps slabs the caller allocated as [`Storage`] (memory kvbm then owns; for tensors an
    /// engine owns, see [`from_engine`](Self::from_engine)): one slab for
    /// `FullyContiguous`, one per layer for `LayerSeparate` and `OuterFirst`, each at
    /// least [`Geometry::slab_bytes`] long and all of one memory kind. `cuda` is needed to
    /// read or write blocks of device memory, and must then be the slabs' device.
    pub fn from_slabs(
        kind: LayoutKind,
        config: LayoutConfig,
        slabs: Vec<Storage>,
        cuda: Option<CudaDevice>,
    ) -> Result<Self, LayoutError> {
        let geometry = Geometry::new(kind, config)?;
        if slabs.len() != geometry.slab_count() {
            return Err(LayoutError::Slabs(format!(
                "{kind:?} needs {} slab(s), got {}",
                geometry.slab_count(),
                slabs.len()
            )));
        }
        if let Some(small) = slabs.iter().position(|s| s.len() < geometry.slab_bytes()) {
            return Err(LayoutError::Slabs(format!(
                "slab {small} has {} bytes, needs {}",
                slabs[small].len(),
                geometry.slab_bytes()
            )));
        }
        if slabs.iter().any(|s| s.kind() != slabs[0].kind()) {
            return Err(LayoutError::Slabs("slabs of different memory kinds".into()));
        }
        if let (MemoryKind::Device { ordinal }, Some(cuda)) = (slabs[0].kind(), &cuda)
            && ordinal != cuda.ordinal()
        {
            return Err(LayoutError::Slabs(format!(
                "slabs on device {ordinal} with a handle to device {}",
                cuda.ordinal()
            )));
        }
        Self::build(geometry, slabs, cuda)
    }

    fn build(
        geometry: Geometry,
        slabs: Vec<Storage>,
        cuda: Option<CudaDevice>,
    ) -> Result<Self, LayoutError> {
        let memory = slabs[0].kind();
        let bases: Vec<u64> = slabs.iter().map(Storage::addr).collect();
        let maps = geometry.layer_maps(&bases);
        let one_allocation = slabs.len() == 1;
        Ok(Self::assemble(
            geometry,
            slabs,
            (maps, one_allocation),
            memory,
            cuda,
            None,
        ))
    }

    /// `maps` with whether all layers are known to lie in one allocation: a block's image is
    /// one range of memory only then, and only if the addresses line up (two allocations that
    /// happen to be back to back, as one-block slabs can be, are never one range).
    fn assemble(
        geometry: Geometry,
        slabs: Vec<Storage>,
        (maps, one_allocation): (Vec<LayerMap>, bool),
        memory: MemoryKind,
        cuda: Option<CudaDevice>,
        engine: Option<EngineFormat>,
    ) -> Self {
        let region = geometry.region_bytes as u64;
        let outer = geometry.config.outer_dim as u64;
        let contiguous_images = one_allocation
            && maps.iter().enumerate().all(|(l, m)| {
                m.block_stride == maps[0].block_stride
                    && (0..outer).all(|o| {
                        m.region(0, o as usize)
                            == Some(maps[0].base + (l as u64 * outer + o) * region)
                    })
            });
        Self {
            locks: BlockLocks::new(geometry.config.num_blocks),
            geometry,
            slabs,
            maps,
            contiguous_images,
            memory,
            cuda,
            checksums: None,
            engine,
            owner: None,
        }
    }

    /// Keeps `owner` alive as long as the layout — and so as long as every transfer that
    /// uses it, since transfers hold the layout. For [`from_engine`](Self::from_engine):
    /// hand over whatever owns the engine's tensors (an `Arc` of them) to meet its lifetime
    /// contract by construction. A previous owner is dropped.
    pub fn with_owner(mut self, owner: impl Any + Send + Sync) -> Self {
        self.owner = Some(Box::new(owner));
        self
    }

    /// The engine tensor format, for a layout made by [`from_engine`](Self::from_engine).
    pub fn engine_format(&self) -> Option<EngineFormat> {
        self.engine
    }

    /// Where `layer`'s regions lie: region `(block, outer)` at
    /// `base + block × block_stride + outer × outer_stride`. What the GPU permutation kernel
    /// is given, and what an RDMA engine needs to register one layer.
    ///
    /// ```
    /// use kvbm_physical::{Layout, LayoutConfig, LayoutKind};
    /// let c = LayoutConfig { num_blocks: 4, num_layers: 2, outer_dim: 2, page_size: 2, inner_dim: 4, dtype_bytes: 2 };
    /// let layout = Layout::system(LayoutKind::OuterFirst, c)?;
    /// let m = layout.layer_map(1)?;
    /// assert_eq!((m.block_stride, m.outer_stride), (16, 4 * 16)); // K of every block, then V
    /// assert_eq!(m.base, layout.slabs()[1].addr());
    /// # Ok::<(), kvbm_physical::LayoutError>(())
    /// ```
    pub fn layer_map(&self, layer: usize) -> Result<LayerMap, LayoutError> {
        self.geometry.check(0, layer, 0)?;
        Ok(self.maps[layer])
    }

    /// Every layer's map (see [`layer_map`](Self::layer_map)).
    pub(crate) fn layer_maps(&self) -> &[LayerMap] {
        &self.maps
    }

    /// Whether every block's image is one contiguous range of memory.
    pub(crate) fn contiguous_images(&self) -> bool {
        self.contiguous_images
    }

    /// Turns on per-block checksums (xxh3-64 of the block image): computed whenever a block
    /// is written (by [`write_block`](Self::write_block) or as a transfer destination) and
    /// verified whenever a transfer reads it. Host memory only.
    ///
    /// ```
    /// use kvbm_logical::BlockId;
    /// use kvbm_physical::{Layout, LayoutConfig, LayoutKind};
    /// let c = LayoutConfig { num_blocks: 2, num_layers: 1, outer_dim: 1, page_size: 4, inner_dim: 4, dtype_bytes: 1 };
    /// let layout = Layout::system(LayoutKind::FullyContiguous, c)?.with_checksums()?;
    /// assert_eq!(layout.checksum(BlockId::new(0)), None); // never written
    /// layout.write_block(BlockId::new(0), &[7; 16])?;
    /// assert!(layout.checksum(BlockId::new(0)).is_some());
    /// # Ok::<(), kvbm_physical::LayoutError>(())
    /// ```
    pub fn with_checksums(mut self) -> Result<Self, LayoutError> {
        if !self.memory.is_host() {
            return Err(LayoutError::ChecksumsNeedHostMemory(self.memory));
        }
        self.checksums = Some(Mutex::new(vec![None; self.num_blocks()]));
        Ok(self)
    }

    /// Shorthand for `Arc::new(self)`: transfers take layouts by `Arc`.
    pub fn into_shared(self) -> Arc<Self> {
        Arc::new(self)
    }

    /// The arithmetic. For a layout over an engine's tensors
    /// ([`from_engine`](Self::from_engine)) it gives the shape and the arrangement, but its
    /// slab offsets describe a dense layout, not the engine's strides: addresses come from
    /// [`region`](Self::region) and [`layer_map`](Self::layer_map).
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// The arrangement.
    pub fn kind(&self) -> LayoutKind {
        self.geometry.kind
    }

    /// The shape.
    pub fn config(&self) -> &LayoutConfig {
        &self.geometry.config
    }

    /// Where the bytes live.
    pub fn memory(&self) -> MemoryKind {
        self.memory
    }

    /// Blocks in the layout.
    pub fn num_blocks(&self) -> usize {
        self.geometry.config.num_blocks
    }

    /// Bytes of one block.
    pub fn block_bytes(&self) -> usize {
        self.geometry.block_bytes
    }

    /// Bytes of one region.
    pub fn region_bytes(&self) -> usize {
        self.geometry.region_bytes
    }

    /// The slabs kvbm owns (none for a layout over an engine's tensors).
    pub fn slabs(&self) -> &[Storage] {
        &self.slabs
    }

    /// Whether checksums are on.
    pub fn has_checksums(&self) -> bool {
        self.checksums.is_some()
    }

    /// The CUDA device the layout's memory belongs to, if any.
    pub fn cuda(&self) -> Option<&CudaDevice> {
        self.cuda.as_ref()
    }

    /// Address and length of one region: what an attention kernel or an RDMA engine needs.
    ///
    /// ```
    /// use kvbm_logical::BlockId;
    /// use kvbm_physical::{Layout, LayoutConfig, LayoutError, LayoutKind};
    /// let c = LayoutConfig { num_blocks: 2, num_layers: 2, outer_dim: 2, page_size: 4, inner_dim: 8, dtype_bytes: 2 };
    /// let layout = Layout::system(LayoutKind::FullyContiguous, c)?;
    /// let k = layout.region(BlockId::new(1), 0, 0)?;
    /// let v = layout.region(BlockId::new(1), 0, 1)?;
    /// assert_eq!(v.addr - k.addr, k.len as u64);
    /// assert!(matches!(layout.region(BlockId::new(1), 2, 0), Err(LayoutError::LayerOutOfRange { .. })));
    /// # Ok::<(), LayoutError>(())
    /// ```
    pub fn region(
        &self,
        block: BlockId,
        layer: usize,
        outer: usize,
    ) -> Result<Region, LayoutError> {
        self.geometry.check(block.index(), layer, outer)?;
        Ok(Region {
            addr: self.addr(block.index(), layer, outer),
            len: self.geometry.region_bytes,
        })
    }

    /// Address of a region whose indices are in range (then it cannot overflow: every
    /// constructor checked the layout's last byte).
    pub(crate) fn addr(&self, block: usize, layer: usize, outer: usize) -> u64 {
        let m = &self.maps[layer];
        m.base + block as u64 * m.block_stride + outer as u64 * m.outer_stride
    }

    pub(crate) fn locks(&self) -> &BlockLocks {
        &self.locks
    }

    fn check_block(&self, block: BlockId, buf: usize) -> Result<(), LayoutError> {
        self.geometry.check(block.index(), 0, 0)?;
        if buf != self.block_bytes() {
            return Err(LayoutError::BufferSize {
                expected: self.block_bytes(),
                actual: buf,
            });
        }
        Ok(())
    }

    /// The contiguous runs of a block image: `(address, image offset, len)`, adjacent
    /// regions of one layer merged. One run for `FullyContiguous`; one per layer (its K and V
    /// are adjacent) for `LayerSeparate`; one per region for `OuterFirst`. Never one across
    /// two layers: each may be its own allocation.
    pub(crate) fn image_runs(&self, block: usize) -> ImageRuns<'_> {
        ImageRuns {
            layout: self,
            block,
            next: 0,
        }
    }

    /// Copies the block image (fully contiguous order) of `block` into `out`, which must be
    /// exactly [`block_bytes`](Self::block_bytes) long. Device memory is read through the
    /// layout's CUDA device; the bytes are in `out` when this returns.
    pub fn read_block(&self, block: BlockId, out: &mut [u8]) -> Result<(), LayoutError> {
        self.check_block(block, out.len())?;
        let i = block.index();
        if !self.locks.try_read(i) {
            return Err(LayoutError::BlockBusy(i));
        }
        let result = self.image_runs(i).try_for_each(|(addr, at, len)| {
            let dst = &mut out[at..at + len];
            self.copy_out(addr, dst)
        });
        self.locks.unlock_read(i);
        result
    }

    /// Copies `image` (fully contiguous order, exactly one block long) into `block`, and
    /// records its checksum when checksums are on. Device memory is written through the
    /// layout's CUDA device, and the block stays locked until the bytes have landed on the
    /// GPU, so a transfer issued right after reads them.
    pub fn write_block(&self, block: BlockId, image: &[u8]) -> Result<(), LayoutError> {
        self.check_block(block, image.len())?;
        let i = block.index();
        if !self.locks.try_write(i) {
            return Err(LayoutError::BlockBusy(i));
        }
        let result = self
            .image_runs(i)
            .try_for_each(|(addr, at, len)| self.copy_in(addr, &image[at..at + len]));
        if let Some(sums) = &self.checksums {
            sums.lock()[i] = result.is_ok().then(|| xxhash_rust::xxh3::xxh3_64(image));
        }
        self.locks.unlock_write(i);
        result
    }

    fn copy_out(&self, addr: u64, dst: &mut [u8]) -> Result<(), LayoutError> {
        if self.memory.is_host() {
            // SAFETY: `addr..addr+len` lies in a live host slab (checked indices); the block's
            // read lock keeps writers out; `dst` is a distinct Rust buffer.
            unsafe {
                std::ptr::copy_nonoverlapping(addr as *const u8, dst.as_mut_ptr(), dst.len())
            };
            Ok(())
        } else {
            let cuda = self.cuda.as_ref().ok_or_else(no_cuda)?;
            Ok(cuda.copy_sync(dst.as_mut_ptr() as u64, addr, dst.len())?)
        }
    }

    fn copy_in(&self, addr: u64, src: &[u8]) -> Result<(), LayoutError> {
        if self.memory.is_host() {
            // SAFETY: as in `copy_out`, under the block's write lock.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), addr as *mut u8, src.len()) };
            Ok(())
        } else {
            let cuda = self.cuda.as_ref().ok_or_else(no_cuda)?;
            Ok(cuda.copy_sync(addr, src.as_ptr() as u64, src.len())?)
        }
    }

    /// The checksum recorded for `block`, if checksums are on and it was written.
    pub fn checksum(&self, block: BlockId) -> Option<u64> {
        self.checksums
            .as_ref()?
            .lock()
            .get(block.index())
            .copied()
            .flatten()
    }

    /// xxh3-64 of a host block's image, computed from memory. The caller holds the block.
    pub(crate) fn hash_block(&self, block: usize) -> u64 {
        debug_assert!(self.memory.is_host());
        let mut h = xxhash_rust::xxh3::Xxh3Default::new();
        for (addr, _, len) in self.image_runs(block) {
            // SAFETY: a host slab range (checked indices), held by the caller's lock; the
            // slice lives only for this update.
            h.update(unsafe { std::slice::from_raw_parts(addr as *const u8, len) });
        }
        h.digest()
    }

    pub(crate) fn checksums(&self) -> Option<&Mutex<Vec<Option<u64>>>> {
        self.checksums.as_ref()
    }
}

/// The runs of one block's image (see [`Layout::image_runs`]).
pub(crate) struct ImageRuns<'a> {
    layout: &'a Layout,
    block: usize,
    /// The next region in image order (`layer × outer_dim + outer`).
    next: usize,
}

impl Iterator for ImageRuns<'_> {
    type Item = (u64, usize, usize);

    fn next(&mut self) -> Option<Self::Item> {
        let l = self.layout;
        let outer = l.config().outer_dim;
        let regions = l.config().num_layers * outer;
        let region = l.region_bytes();
        if self.next >= regions {
            return None;
        }
        let first = self.next;
        let start = l.addr(self.block, first / outer, first % outer);
        if first == 0 && l.contiguous_images {
            self.next = regions;
            return Some((start, 0, l.block_bytes()));
        }
        let mut len = region;
        self.next += 1;
        // Within one layer only: layers may be separate allocations, adjacent or not.
        while self.next < regions
            && self.next / outer == first / outer
            && l.addr(self.block, self.next / outer, self.next % outer) == start + len as u64
        {
            len += region;
            self.next += 1;
        }
        Some((start, first * region, len))
    }
}

fn no_cuda() -> LayoutError {
    LayoutError::Storage(crate::StorageError::NoCudaDevice(
        "device memory read or written without a CudaDevice".into(),
    ))
}

impl std::fmt::Debug for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Layout")
            .field("kind", &self.kind())
            .field("config", self.config())
            .field("memory", &self.memory)
            .field("engine", &self.engine)
            .field("checksums", &self.has_checksums())
            .finish()
    }
}
