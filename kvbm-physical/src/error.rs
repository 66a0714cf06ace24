//! Typed errors of kvbm-physical. Every refusal says what was wrong and leaves nothing
//! half-done: a refused transfer copied nothing, a failed allocation holds no memory.

use kvbm_logical::BlockId;
use thiserror::Error;

/// A layout's shape is invalid, or a block, layer or buffer does not fit it.
#[derive(Debug, Error, Clone, PartialEq)]
#[non_exhaustive]
pub enum LayoutError {
    /// A dimension of the [`LayoutConfig`](crate::LayoutConfig) is zero.
    #[error("layout dimension `{0}` is zero")]
    ZeroDimension(&'static str),
    /// `outer_dim` is neither 1 (MLA) nor 2 (K and V).
    #[error("outer_dim must be 1 (MLA) or 2 (K and V), got {0}")]
    InvalidOuterDim(usize),
    /// The byte size of a region, block or slab does not fit in `usize` (or exceeds the
    /// `isize::MAX` an allocation may span).
    #[error("layout size overflows: {what}")]
    Overflow {
        /// Which size overflowed.
        what: &'static str,
    },
    /// More blocks than a block manager can index.
    #[error("{num_blocks} blocks asked for, at most {max} supported")]
    TooManyBlocks {
        /// The count asked for.
        num_blocks: usize,
        /// `kvbm_logical::MAX_BLOCKS`.
        max: usize,
    },
    /// A block index beyond the layout.
    #[error("block {block} out of range: the layout has {num_blocks} blocks")]
    BlockOutOfRange {
        /// The index asked for.
        block: usize,
        /// The layout's block count.
        num_blocks: usize,
    },
    /// A layer index beyond the layout.
    #[error("layer {layer} out of range: the layout has {num_layers} layers")]
    LayerOutOfRange {
        /// The index asked for.
        layer: usize,
        /// The layout's layer count.
        num_layers: usize,
    },
    /// An outer index (K/V) beyond the layout.
    #[error("outer index {outer} out of range: outer_dim is {outer_dim}")]
    OuterOutOfRange {
        /// The index asked for.
        outer: usize,
        /// The layout's outer dimension.
        outer_dim: usize,
    },
    /// A caller's buffer is not exactly one block long.
    #[error("buffer of {actual} bytes for a block of {expected} bytes")]
    BufferSize {
        /// The layout's block size in bytes.
        expected: usize,
        /// The buffer's length.
        actual: usize,
    },
    /// Slabs handed to [`Layout::from_slabs`](crate::Layout::from_slabs) do not match the
    /// layout: wrong count, too small, or of mixed memory kinds.
    #[error("slabs do not fit the layout: {0}")]
    Slabs(String),
    /// Checksums were asked for on memory the host cannot read (device memory).
    #[error("checksums need host-readable memory, not {0}")]
    ChecksumsNeedHostMemory(crate::MemoryKind),
    /// The block is being copied or written by someone else right now.
    #[error("block {0} is busy (a transfer or write holds it)")]
    BlockBusy(usize),
    /// A block view ([`Layout::block_view`](crate::Layout::block_view),
    /// [`Layout::block_view_mut`](crate::Layout::block_view_mut)) was asked of a layout whose
    /// block images are not one range of host memory each (device memory, or a layer-separate
    /// or outer-first arrangement): use [`Layout::read_block`](crate::Layout::read_block) and
    /// [`Layout::write_block`](crate::Layout::write_block) there.
    #[error(
        "blocks of this layout are not one range of host memory each ({memory} memory, contiguous images: {contiguous})"
    )]
    NoBlockView {
        /// Where the layout's bytes live.
        memory: crate::MemoryKind,
        /// Whether each block's image is one contiguous range.
        contiguous: bool,
    },
    /// Allocating or accessing the memory failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// [`Layout::from_engine`](crate::Layout::from_engine) got another number of layer
    /// tensors than the config has layers.
    #[error("{actual} layer tensors for {expected} layers")]
    TensorCount {
        /// `num_layers` of the config.
        expected: usize,
        /// Tensors given.
        actual: usize,
    },
    /// A layer's tensor does not describe the layout: see [`TensorError`].
    #[error("layer {layer}'s tensor: {error}")]
    Tensor {
        /// The layer (index into the tensors given).
        layer: usize,
        /// What is wrong with it.
        #[source]
        error: TensorError,
    },
    /// MLA tensors hold one latent vector per token: the config's `outer_dim` must be 1.
    #[error("MLA tensors need outer_dim 1, the config has {0}")]
    MlaOuterDim(usize),
    /// Device memory given with a handle to another CUDA device.
    #[error("memory on device {memory} with a handle to device {cuda}")]
    DeviceMismatch {
        /// The memory's device ordinal.
        memory: usize,
        /// The ordinal of the `CudaDevice` given.
        cuda: usize,
    },
}

/// What CUDA says a pointer is (see [`TensorError::WrongMemory`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PointerKind {
    /// Not memory CUDA knows: plain host memory, or no memory at all.
    Unregistered,
    /// Page-locked host memory (allocated or registered through CUDA).
    Host,
    /// Device memory of this ordinal.
    Device {
        /// The device ordinal.
        ordinal: usize,
    },
}

impl std::fmt::Display for PointerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PointerKind::Unregistered => f.write_str("not CUDA memory"),
            PointerKind::Host => f.write_str("page-locked host memory"),
            PointerKind::Device { ordinal } => write!(f, "memory of device {ordinal}"),
        }
    }
}

/// An engine's layer tensor (a [`LayerTensor`](crate::LayerTensor)) does not describe the
/// layout it was given for. Nothing was built.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TensorError {
    /// The shape or the strides have the wrong number of dimensions for the format.
    #[error("{shape} dimensions and {strides} strides, the format has {expected}")]
    Rank {
        /// The format's dimension count.
        expected: usize,
        /// Dimensions in the shape.
        shape: usize,
        /// Entries in the strides.
        strides: usize,
    },
    /// A dimension disagrees with the [`LayoutConfig`](crate::LayoutConfig).
    #[error("dimension `{dim}` is {actual}, the layout needs {expected}")]
    Dim {
        /// Which dimension (`heads × head_dim` for their product).
        dim: &'static str,
        /// What the config implies.
        expected: usize,
        /// The tensor's.
        actual: usize,
    },
    /// A block's page (its tokens × heads × head_dim, or tokens × latent) does not fill one
    /// contiguous range of memory, in whatever order: the strides of those dimensions (in
    /// elements) are not a dense arrangement.
    #[error("a page does not fill one contiguous range: page strides {strides:?} (elements)")]
    PageNotContiguous {
        /// The strides of the page's dimensions.
        strides: Vec<usize>,
    },
    /// Two regions of the tensor overlap: the block and outer strides leave less room
    /// than a region needs.
    #[error(
        "regions overlap: block stride {block_stride} B, outer stride {outer_stride} B, \
         region {region_bytes} B"
    )]
    Overlap {
        /// Bytes between consecutive blocks.
        block_stride: u64,
        /// Bytes between a block's K and V.
        outer_stride: u64,
        /// Bytes of one region.
        region_bytes: usize,
    },
    /// The tensor's byte range overlaps another layer's. Layers may interleave in one
    /// allocation only when equally strided at a constant distance that keeps every region
    /// apart (vLLM's cross-layer blocks); two layers may never share bytes.
    #[error("its byte range overlaps layer {other}'s (and they are not interleaved evenly)")]
    LayerOverlap {
        /// The other layer.
        other: usize,
    },
    /// The address is not a multiple of the element size.
    #[error("address {addr:#x} is not aligned to the element size ({align} bytes)")]
    Misaligned {
        /// The tensor's address.
        addr: u64,
        /// `dtype_bytes`.
        align: usize,
    },
    /// The address is zero.
    #[error("null address")]
    Null,
    /// The tensor's byte range runs past the end of the address space.
    #[error("its byte range from {addr:#x} does not fit in the address space")]
    AddressOverflow {
        /// The tensor's address.
        addr: u64,
    },
    /// CUDA reports a byte of the tensor to be another kind of memory than the layout was
    /// given as (checked at the tensor's first and last byte).
    #[error("byte {addr:#x} is {found}, not {expected} memory")]
    WrongMemory {
        /// The byte checked.
        addr: u64,
        /// The memory kind the layout was given.
        expected: crate::MemoryKind,
        /// What CUDA says it is.
        found: PointerKind,
    },
}

/// Allocating or reaching memory failed.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum StorageError {
    /// A zero-byte allocation was asked for.
    #[error("zero-byte allocation")]
    ZeroSize,
    /// The alignment is not a power of two, or too large for the size.
    #[error("invalid alignment {align} for {bytes} bytes")]
    BadAlignment {
        /// The alignment asked for.
        align: usize,
        /// The size asked for.
        bytes: usize,
    },
    /// The allocator refused.
    #[error("allocating {bytes} bytes of {kind} memory failed: {reason}")]
    AllocationFailed {
        /// Which memory.
        kind: crate::MemoryKind,
        /// How much was asked for.
        bytes: usize,
        /// The allocator's answer.
        reason: String,
    },
    /// No usable CUDA driver or device: the library is missing, initialisation failed or
    /// the ordinal does not exist. Fall back to [`SystemStorage`](crate::SystemStorage).
    #[error("no CUDA device: {0}")]
    NoCudaDevice(String),
    /// kvbm-physical was built without its `cuda` feature.
    #[error("kvbm-physical was built without the `cuda` feature")]
    CudaDisabled,
    /// A CUDA driver call failed.
    #[error("CUDA driver call {call} failed: {error}")]
    Cuda {
        /// The driver function.
        call: &'static str,
        /// The driver's error code.
        error: String,
    },
    /// NVML (device discovery) is unavailable or failed.
    #[error("NVML: {0}")]
    Nvml(String),
    /// The requested fraction of device memory is not in (0, 1].
    #[error("memory fraction {0} is not in (0, 1]")]
    InvalidFraction(f64),
}

/// Which side of a transfer an error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The layout copied from.
    Source,
    /// The layout copied into.
    Destination,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Source => "source",
            Side::Destination => "destination",
        })
    }
}

/// A transfer was refused (nothing copied, no byte or checksum changed) or failed (the
/// listed pairs hold no valid data).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TransferError {
    /// No pairs were given.
    #[error("empty transfer: no block pairs")]
    EmptyBatch,
    /// The two layouts disagree on a dimension a copy needs to be equal.
    #[error("layouts do not match: {what} is {src} in the source and {dst} in the destination")]
    LayoutMismatch {
        /// The dimension.
        what: &'static str,
        /// Its value in the source layout.
        src: usize,
        /// Its value in the destination layout.
        dst: usize,
    },
    /// A block id beyond one of the layouts.
    #[error("pair {index}: {side} block {block} out of range ({num_blocks} blocks)")]
    BlockOutOfRange {
        /// The pair's position in the batch.
        index: usize,
        /// Which layout.
        side: Side,
        /// The id.
        block: BlockId,
        /// That layout's block count.
        num_blocks: usize,
    },
    /// The layer range is empty or beyond the layouts.
    #[error("layer range {start}..{end} invalid for {num_layers} layers")]
    LayerRange {
        /// Range start.
        start: usize,
        /// Range end.
        end: usize,
        /// The layouts' layer count.
        num_layers: usize,
    },
    /// A destination block appears twice in the batch.
    #[error("destination block {block} listed twice (pairs {first} and {second})")]
    DuplicateDestination {
        /// The block.
        block: BlockId,
        /// Its first pair.
        first: usize,
        /// Its second pair.
        second: usize,
    },
    /// Within one layout, a block is both read and written by the batch.
    #[error("block {0} is both a source and a destination of the batch")]
    SourceIsDestination(BlockId),
    /// Another transfer or write holds the block right now.
    #[error("{side} block {block} is busy (another transfer or write holds it)")]
    BlockBusy {
        /// Which layout.
        side: Side,
        /// The block.
        block: BlockId,
    },
    /// The strategy cannot copy between these memories (e.g. `Memcpy` with device memory,
    /// or a GPU strategy on an engine without a CUDA device).
    #[error("strategy {strategy:?} cannot copy {src} to {dst}: {reason}")]
    Unsupported {
        /// The strategy asked for or chosen.
        strategy: crate::Strategy,
        /// Source memory.
        src: crate::MemoryKind,
        /// Destination memory.
        dst: crate::MemoryKind,
        /// Why.
        reason: &'static str,
    },
    /// A layout's device memory belongs to another GPU than the engine's: its stream and
    /// kernels cannot reach it. Use an engine opened on that device.
    #[error("the {side} layout's memory is on device {layout}, the engine's device is {engine}")]
    DeviceMismatch {
        /// Which layout.
        side: Side,
        /// The device ordinal of that layout's memory.
        layout: usize,
        /// The engine's device ordinal.
        engine: usize,
    },
    /// A source block's bytes do not match the checksum computed when it was stored: the
    /// copy was corrupted. Nothing of the batch was copied.
    #[error(
        "checksum mismatch on source block {block}: stored {expected:#018x}, found {actual:#018x}"
    )]
    ChecksumMismatch {
        /// The corrupt block.
        block: BlockId,
        /// The checksum recorded when it was written.
        expected: u64,
        /// The checksum of its bytes now.
        actual: u64,
    },
    /// The copy failed part-way: the destination blocks of `failed` (indices into the
    /// batch) hold no valid data; the others were written.
    #[error("copy failed for {} of the batch's pairs: {error}", failed.len())]
    CopyFailed {
        /// Indices of the pairs whose destination is not valid.
        failed: Vec<usize>,
        /// The underlying error.
        error: String,
    },
}
