//! Identities: block slots and managers.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// A dense index (`0..total_blocks`) into one manager's slots.
///
/// A `BlockId` alone is meaningful only inside its manager; `(ManagerId, BlockId)` names a
/// physical slot process-wide. The physical layer maps it to bytes.
///
/// ```
/// use kvbm_logical::BlockId;
/// let id = BlockId::new(3);
/// assert_eq!(id.get(), 3);
/// assert_eq!(id.index(), 3usize);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(u32);

impl BlockId {
    /// Wraps a slot index.
    pub const fn new(index: u32) -> Self {
        Self(index)
    }

    /// The slot index as `u32`.
    pub const fn get(self) -> u32 {
        self.0
    }

    /// The slot index as `usize`, for indexing slabs and tables.
    pub const fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Debug for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockId({})", self.0)
    }
}

impl fmt::Display for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// A process-unique manager identity; no two managers built in one process share one.
///
/// ```
/// use kvbm_logical::{BlockManager, Device};
/// let a = BlockManager::<Device>::builder().block_count(4).block_size(16).build()?;
/// let b = BlockManager::<Device>::builder().block_count(4).block_size(16).build()?;
/// assert_ne!(a.id(), b.id());
/// # Ok::<(), kvbm_logical::BuildError>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ManagerId(u64);

impl ManagerId {
    /// A fresh identity.
    pub(crate) fn next() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Self(NEXT.fetch_add(1, Ordering::Relaxed))
    }

    /// The raw value.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Debug for ManagerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ManagerId({})", self.0)
    }
}

impl fmt::Display for ManagerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "manager#{}", self.0)
    }
}
