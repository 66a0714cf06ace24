//! Staged blocks: complete, with an identity, not yet registered.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use super::{MutableBlock, release_batch};
use crate::hashing::SequenceHash;
use crate::ids::{BlockId, ManagerId};
use crate::retention::Retention;
use crate::store::BlockStore;
use crate::tier::BlockTier;

/// A block whose data is complete and whose [`SequenceHash`] is known, ready for
/// [`BlockManager::register_block`](crate::BlockManager::register_block). It is not matchable
/// yet; dropping it returns the slot to the reset pool.
///
/// ```
/// use kvbm_logical::{BlockManager, Device, SequenceHash};
/// let m = BlockManager::<Device>::builder().block_count(4).block_size(16).build()?;
/// let parent = SequenceHash::new(1);
/// let block = m.allocate_blocks(1)?.pop().unwrap();
/// let complete = block.stage(SequenceHash::new(2), 16)?.with_parent(Some(parent));
/// assert_eq!(complete.sequence_hash(), SequenceHash::new(2));
/// assert_eq!(complete.parent(), Some(parent));
/// // Changed our mind: back to a writable block in the same slot.
/// let id = complete.block_id();
/// let block = complete.reset();
/// assert_eq!(block.block_id(), id);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct CompleteBlock<T: BlockTier> {
    /// `None` only once consumed (registered, reset or batch-released).
    store: Option<Arc<BlockStore>>,
    id: BlockId,
    hash: SequenceHash,
    parent: Option<SequenceHash>,
    retention: Retention,
    /// The block's token ids, for the `Stored` event: kept only when staged from tokens while
    /// someone subscribed to events.
    tokens: Option<Box<[u32]>>,
    reset_on_release: bool,
    _tier: PhantomData<T>,
}

/// What registration needs from a staged block.
pub(crate) struct Staged {
    pub(crate) store: Arc<BlockStore>,
    pub(crate) id: BlockId,
    pub(crate) hash: SequenceHash,
    pub(crate) parent: Option<SequenceHash>,
    pub(crate) retention: Retention,
    pub(crate) tokens: Option<Box<[u32]>>,
    pub(crate) reset_on_release: bool,
}

impl<T: BlockTier> CompleteBlock<T> {
    pub(crate) fn new(
        store: Arc<BlockStore>,
        id: BlockId,
        hash: SequenceHash,
        parent: Option<SequenceHash>,
    ) -> Self {
        Self {
            store: Some(store),
            id,
            hash,
            parent,
            retention: Retention::default(),
            tokens: None,
            reset_on_release: false,
            _tier: PhantomData,
        }
    }

    /// Keeps the token ids for the `Stored` event (staging from tokens, while someone
    /// subscribes).
    pub(crate) fn with_tokens(mut self, tokens: Option<Box<[u32]>>) -> Self {
        self.tokens = tokens;
        self
    }

    fn store(&self) -> &Arc<BlockStore> {
        self.store
            .as_ref()
            .expect("a live CompleteBlock always holds its store")
    }

    /// The slot this block occupies.
    pub fn block_id(&self) -> BlockId {
        self.id
    }

    /// The manager the block belongs to.
    pub fn manager_id(&self) -> ManagerId {
        self.store().id
    }

    /// The block's sequence hash.
    pub fn sequence_hash(&self) -> SequenceHash {
        self.hash
    }

    /// The parent block's sequence hash, if known.
    pub fn parent(&self) -> Option<SequenceHash> {
        self.parent
    }

    /// Sets the parent block's sequence hash (`None` for a first block). Eviction policies
    /// that follow lineage and the events sent to routers use it.
    pub fn with_parent(mut self, parent: Option<SequenceHash>) -> Self {
        self.parent = parent;
        self
    }

    /// Sets how strongly the block is kept once inactive (read by
    /// [`EvictionBackend::Priority`](crate::EvictionBackend::Priority)); see [`Retention`].
    ///
    /// ```
    /// use kvbm_logical::{BlockManager, Device, Retention, SequenceHash};
    /// let m = BlockManager::<Device>::builder().block_count(4).block_size(16).build()?;
    /// let staged = m.allocate_blocks(1)?.pop().unwrap().stage(SequenceHash::new(1), 16)?;
    /// let staged = staged.with_retention(Retention::new(80)?);
    /// assert_eq!(staged.retention().priority(), 80);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn with_retention(mut self, retention: Retention) -> Self {
        self.retention = retention;
        self
    }

    /// [`with_retention`](Self::with_retention) in place.
    pub fn set_retention(&mut self, retention: Retention) {
        self.retention = retention;
    }

    /// The retention the block will be registered with (the default unless set).
    pub fn retention(&self) -> Retention {
        self.retention
    }

    /// "Do not cache" (Dynamo's reset-on-release): registered as usual (matchable and
    /// shareable while anyone holds it), but when its last owner releases it the block goes
    /// straight back to the reset pool instead of the inactive pool, and a `Removed` event
    /// with reason [`Released`](crate::RemovalReason::Released) says so. Under
    /// [`BlockDuplicationPolicy::Reject`](crate::BlockDuplicationPolicy::Reject), if the hash
    /// is already cached the existing block is handed back unchanged (it stays cached).
    ///
    /// ```
    /// use kvbm_logical::{BlockManager, Device, SequenceHash};
    /// let m = BlockManager::<Device>::builder().block_count(4).block_size(16).build()?;
    /// let hash = SequenceHash::new(9);
    /// let staged = m.allocate_blocks(1)?.pop().unwrap().stage(hash, 16)?;
    /// let block = m.register_block(staged.reset_on_release(true))?;
    /// assert_eq!(m.match_blocks(&[hash]).len(), 1); // shareable while held
    /// drop(block);
    /// assert!(!m.contains(hash)); // gone: back in the reset pool
    /// assert_eq!(m.counts().reset, 4);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn reset_on_release(mut self, yes: bool) -> Self {
        self.reset_on_release = yes;
        self
    }

    /// Whether the block is registered "do not cache" ([`reset_on_release`](Self::reset_on_release)).
    pub fn is_reset_on_release(&self) -> bool {
        self.reset_on_release
    }

    /// Drops the identity: back to a writable block in the same slot.
    pub fn reset(mut self) -> MutableBlock<T> {
        let store = self.store.take().expect("live handle");
        store.metrics.add_stagings(1);
        MutableBlock::new(store, self.id)
    }

    /// Takes the store out for registration; the handle's drop then does nothing.
    pub(crate) fn into_parts(mut self) -> Staged {
        let store = self.store.take().expect("live handle");
        Staged {
            store,
            id: self.id,
            hash: self.hash,
            parent: self.parent,
            retention: self.retention,
            tokens: self.tokens.take(),
            reset_on_release: self.reset_on_release,
        }
    }

    /// Returns every block to the reset pool with one lock acquisition per 256 blocks (of one
    /// manager) instead of one per block.
    ///
    /// ```
    /// use kvbm_logical::{BlockManager, CompleteBlock, Device, SequenceHash};
    /// let m = BlockManager::<Device>::builder().block_count(4).block_size(16).build()?;
    /// let staged: Vec<_> = m
    ///     .allocate_blocks(4)?
    ///     .into_iter()
    ///     .map(|b| {
    ///         let hash = SequenceHash::new(b.block_id().get().into());
    ///         b.stage(hash, 16)
    ///     })
    ///     .collect::<Result<_, _>>()?;
    /// CompleteBlock::release_all(staged);
    /// assert_eq!(m.available_blocks(), 4);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn release_all(blocks: impl IntoIterator<Item = Self>) {
        // Stagings are counted when a staged block ends (registered, reset or released), in
        // bulk where possible: not on `stage`, which is per block.
        let counted = blocks
            .into_iter()
            .inspect(|b| b.store().metrics.add_stagings(1));
        release_batch(counted);
    }
}

super::releasable!(CompleteBlock, release_mutable);

impl<T: BlockTier> Drop for CompleteBlock<T> {
    fn drop(&mut self) {
        if let Some(store) = self.store.take() {
            store.metrics.add_stagings(1);
            store.release_mutable(self.id);
        }
    }
}

impl<T: BlockTier> fmt::Debug for CompleteBlock<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompleteBlock")
            .field("tier", &T::NAME)
            .field("block_id", &self.id)
            .field("manager", &self.store.as_ref().map(|s| s.id))
            .field("sequence_hash", &self.hash)
            .field("parent", &self.parent)
            .finish()
    }
}
