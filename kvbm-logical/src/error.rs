//! Error types. Every fallible transition that consumes a block hands it back inside the
//! error, so a refusal never leaks a slot.

use crate::blocks::MutableBlock;
use crate::hashing::SequenceHash;
use crate::ids::{BlockId, ManagerId};
use crate::store::PoolCounts;
use crate::tier::BlockTier;

/// A [`BlockManagerBuilder`](crate::BlockManagerBuilder) configuration that cannot work.
///
/// ```
/// use kvbm_logical::{BlockManager, BuildError, Device};
/// let err = BlockManager::<Device>::builder().block_count(8).block_size(12).build().unwrap_err();
/// assert_eq!(err, BuildError::BlockSizeNotPowerOfTwo { block_size: 12 });
/// ```
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// `block_count` was never set.
    #[error("block_count is required")]
    MissingBlockCount,
    /// `block_size` was never set.
    #[error("block_size is required")]
    MissingBlockSize,
    /// A pool of zero blocks.
    #[error("block_count must be at least 1")]
    ZeroBlocks,
    /// More blocks than a `BlockId` can address.
    #[error("block_count {requested} exceeds the maximum of {max}")]
    TooManyBlocks {
        /// The requested count.
        requested: usize,
        /// The largest supported count.
        max: usize,
    },
    /// A block of zero tokens.
    #[error("block_size must be at least 1")]
    ZeroBlockSize,
    /// Engines address tokens inside a block with shifts and masks; other sizes are refused.
    #[error("block_size {block_size} is not a power of two")]
    BlockSizeNotPowerOfTwo {
        /// The requested size.
        block_size: usize,
    },
    /// Larger than any engine uses; almost certainly a unit mistake (bytes for tokens).
    #[error("block_size {block_size} exceeds the maximum of {max} tokens")]
    BlockSizeTooLarge {
        /// The requested size.
        block_size: usize,
        /// The largest supported size.
        max: usize,
    },
    /// The slot, registry or eviction tables could not be allocated.
    #[error("not enough memory for the tables of {block_count} blocks")]
    OutOfMemory {
        /// The requested count.
        block_count: usize,
    },
    /// `max_pinned_fraction` outside `0.0..=1.0` (or NaN).
    #[error("max_pinned_fraction must be within 0.0..=1.0, got {fraction}")]
    InvalidPinFraction {
        /// The value given.
        fraction: f64,
    },
    /// The eviction backend needs frequency tracking, which was explicitly disabled.
    #[error("eviction backend {backend} needs frequency tracking, but it was disabled")]
    FrequencyTrackingRequired {
        /// The backend's name.
        backend: &'static str,
    },
}

/// Allocation refused; nothing was allocated or evicted.
///
/// ```
/// use kvbm_logical::{AllocationError, BlockManager, Device};
/// let m = BlockManager::<Device>::builder().block_count(2).block_size(16).build()?;
/// let err = m.allocate_blocks(3).unwrap_err();
/// assert_eq!(err, AllocationError::Exhausted { requested: 3, available: 2, total: 2 });
/// # Ok::<(), kvbm_logical::BuildError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AllocationError {
    /// Fewer blocks are free or evictable than requested. Blocks held by handles are never
    /// evicted; release some, or allocate fewer.
    #[error(
        "cannot allocate {requested} blocks: only {available} of {total} are free or evictable"
    )]
    Exhausted {
        /// Blocks asked for.
        requested: usize,
        /// Blocks in the reset and inactive pools at the time of the call.
        available: usize,
        /// The manager's total.
        total: usize,
    },
}

/// Staging refused; the block is inside, unchanged ([`StageError::into_block`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StageError<T: BlockTier> {
    /// The hash was computed over a block of a different size than the manager's.
    #[error(
        "block size mismatch: the manager's blocks hold {expected} tokens, the hash covers {actual}"
    )]
    BlockSizeMismatch {
        /// The manager's block size.
        expected: usize,
        /// The size the caller staged with.
        actual: usize,
        /// The block, given back.
        block: MutableBlock<T>,
    },
    /// Staging from a token sequence a block that is not complete in it.
    #[error("block {index} of the sequence is not complete (it has {complete} complete blocks)")]
    IncompleteBlock {
        /// The block index asked for.
        index: usize,
        /// Complete blocks in the sequence.
        complete: usize,
        /// The block, given back.
        block: MutableBlock<T>,
    },
}

impl<T: BlockTier> StageError<T> {
    /// The block that could not be staged.
    pub fn into_block(self) -> MutableBlock<T> {
        match self {
            Self::BlockSizeMismatch { block, .. } | Self::IncompleteBlock { block, .. } => block,
        }
    }
}

/// Registration refused; nothing was registered and the blocks are inside
/// ([`RegisterError::into_blocks`]). `B` is one `CompleteBlock` or a `Vec` of them.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegisterError<B: std::fmt::Debug> {
    /// A block allocated by another manager (of the same tier).
    #[error("block {index} of the batch belongs to {found}, not to {expected}")]
    ForeignBlock {
        /// This manager.
        expected: ManagerId,
        /// The block's manager.
        found: ManagerId,
        /// Position of the first foreign block in the batch (0 for a single block).
        index: usize,
        /// Everything that was passed in, given back.
        blocks: B,
    },
}

impl<B: std::fmt::Debug> RegisterError<B> {
    /// The blocks that were not registered.
    pub fn into_blocks(self) -> B {
        match self {
            Self::ForeignBlock { blocks, .. } => blocks,
        }
    }
}

/// [`reset_inactive_pool`](crate::BlockManager::reset_inactive_pool) emptied the inactive
/// pool, but some blocks are still held by handles, so the cache is not entirely clean.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ResetError {
    /// Blocks held by live handles cannot be reset; retry once they are released.
    #[error(
        "moved {moved} inactive blocks to the reset pool, but {in_use} of {total} blocks are still held"
    )]
    BlocksInUse {
        /// Blocks this call moved from the inactive to the reset pool.
        moved: usize,
        /// Blocks held by handles (allocated, staged or registered).
        in_use: usize,
        /// The manager's total.
        total: usize,
    },
    /// The store's counts do not add up to its total: a kvbm bug. Please report it.
    #[error("block counts do not add up: {counts:?}")]
    CountMismatch {
        /// The counts found after the reset.
        counts: PoolCounts,
    },
}

/// A [`pin`](crate::BlockManager::pin) call was refused; nothing was pinned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PinError {
    /// The hash is not registered (never was, or was evicted).
    #[error("cannot pin {hash}: not registered")]
    NotRegistered {
        /// The first such hash.
        hash: SequenceHash,
    },
    /// The new pins would exceed the pin budget.
    #[error("cannot pin {requested} more blocks: {pinned} of at most {budget} already pinned")]
    BudgetExceeded {
        /// Blocks the call would have newly pinned.
        requested: usize,
        /// Blocks pinned before the call.
        pinned: usize,
        /// The budget (`max_pinned_fraction` × total blocks).
        budget: usize,
    },
}

/// A [`RequestSequence`](crate::RequestSequence) call refused; nothing changed.
///
/// ```
/// use kvbm_logical::{BlockManager, Device, RequestError, RequestSequence};
/// let m = BlockManager::<Device>::builder().block_count(8).block_size(4).build()?;
/// let mut req = RequestSequence::builder(&m).prompt(&[1, 2, 3, 4, 5]).build();
/// assert_eq!(req.commit(2), Err(RequestError::NotAllocated { needed: 1, allocated: 0 }));
/// req.allocate(5)?;
/// assert_eq!(req.commit(6), Err(RequestError::NotEnoughTokens { requested: 6, uncomputed: 5 }));
/// assert_eq!(req.match_prefix(), Err(RequestError::HoldsBlocks { blocks: 2 }));
/// assert_eq!(req.num_computed_tokens(), 0); // unchanged
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// `match_prefix` on a request that holds blocks: matching is for a new or preempted
    /// request.
    #[error(
        "the request holds {blocks} blocks; match a prefix only before allocating or after preempting"
    )]
    HoldsBlocks {
        /// Blocks in its table.
        blocks: usize,
    },
    /// `commit` of more tokens than are known and not yet computed.
    #[error("cannot commit {requested} tokens: only {uncomputed} known tokens are not computed")]
    NotEnoughTokens {
        /// Tokens asked to commit.
        requested: usize,
        /// Known tokens not yet computed.
        uncomputed: usize,
    },
    /// `commit` of tokens for which the table has no block: allocate first.
    #[error("the committed tokens need {needed} blocks, the table has {allocated}")]
    NotAllocated {
        /// Blocks the computed tokens would occupy.
        needed: usize,
        /// Blocks in the table.
        allocated: usize,
    },
}

/// Invalid [`TokenBlockSequence`](crate::TokenBlockSequence) parameters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SequenceError {
    /// A block of zero tokens.
    #[error("block_size must be at least 1")]
    ZeroBlockSize,
}

/// A broken internal invariant found by
/// [`BlockManager::check_invariants`](crate::BlockManager::check_invariants). It always means a
/// bug in kvbm (or in a custom eviction policy); please report it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvariantError {
    /// `reset + inactive + in-flight != total`.
    #[error(
        "conservation broken: reset {reset} + inactive {inactive} + mutable {mutable} + active {active} != total {total}"
    )]
    Conservation {
        /// Blocks found in the reset state.
        reset: usize,
        /// Blocks found in the inactive state.
        inactive: usize,
        /// Blocks held by mutable or complete handles.
        mutable: usize,
        /// Registered blocks held by immutable handles.
        active: usize,
        /// The manager's total.
        total: usize,
    },
    /// A recorded count disagrees with a recount of the slots.
    #[error("{what}: recorded {recorded}, counted {counted}")]
    CountMismatch {
        /// Which count.
        what: &'static str,
        /// The value the store keeps.
        recorded: usize,
        /// The value found by scanning.
        counted: usize,
    },
    /// A slot is not where its state says it is.
    #[error("block {block}: {detail}")]
    Slot {
        /// The slot.
        block: BlockId,
        /// What is wrong.
        detail: &'static str,
    },
    /// The eviction policy's own structure is broken.
    #[error("eviction policy {policy}: {detail}")]
    Policy {
        /// The policy's name.
        policy: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// The registry's hash index is broken (a hash not found under its own key, a count
    /// off).
    #[error("registry index: {detail}")]
    Registry {
        /// What is wrong.
        detail: String,
    },
}
