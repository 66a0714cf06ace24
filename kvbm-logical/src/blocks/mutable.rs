//! Allocated, writable blocks.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use super::{CompleteBlock, release_batch};
use crate::error::StageError;
use crate::hashing::SequenceHash;
use crate::ids::{BlockId, ManagerId};
use crate::sequence::{TokenBlock, TokenBlockSequence};
use crate::store::BlockStore;
use crate::tier::BlockTier;

/// An allocated block: the caller owns the slot and may write its memory. It has no identity
/// yet; [`stage`](Self::stage) gives it one. Dropping it returns the slot to the reset pool.
///
/// ```
/// use kvbm_logical::{BlockManager, Device, SequenceHash};
/// let m = BlockManager::<Device>::builder().block_count(4).block_size(16).build()?;
/// let block = m.allocate_blocks(1)?.pop().unwrap();
/// assert_eq!(block.manager_id(), m.id());
/// // ... the engine writes the KV data for 16 tokens into slot `block.block_id()` ...
/// let complete = block.stage(SequenceHash::new(0xabc), 16)?;
/// let registered = m.register_block(complete)?;
/// assert_eq!(registered.sequence_hash(), SequenceHash::new(0xabc));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct MutableBlock<T: BlockTier> {
    /// `None` only once consumed (staged or batch-released).
    store: Option<Arc<BlockStore>>,
    id: BlockId,
    _tier: PhantomData<T>,
}

impl<T: BlockTier> MutableBlock<T> {
    pub(crate) fn new(store: Arc<BlockStore>, id: BlockId) -> Self {
        Self {
            store: Some(store),
            id,
            _tier: PhantomData,
        }
    }

    fn store(&self) -> &Arc<BlockStore> {
        self.store
            .as_ref()
            .expect("a live MutableBlock always holds its store")
    }

    /// The slot this block occupies.
    pub fn block_id(&self) -> BlockId {
        self.id
    }

    /// The manager the block belongs to.
    pub fn manager_id(&self) -> ManagerId {
        self.store().id
    }

    /// Gives the block its identity: `hash` covers `block_size` tokens. Errors, giving the
    /// block back, if `block_size` differs from the manager's.
    ///
    /// ```
    /// use kvbm_logical::{BlockManager, Device, StageError, SequenceHash};
    /// let m = BlockManager::<Device>::builder().block_count(4).block_size(16).build()?;
    /// let block = m.allocate_blocks(1)?.pop().unwrap();
    /// let err = block.stage(SequenceHash::new(1), 32).unwrap_err();
    /// assert!(matches!(err, StageError::BlockSizeMismatch { expected: 16, actual: 32, .. }));
    /// let block = err.into_block(); // nothing lost
    /// assert!(block.stage(SequenceHash::new(1), 16).is_ok());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn stage(
        mut self,
        hash: SequenceHash,
        block_size: usize,
    ) -> Result<CompleteBlock<T>, StageError<T>> {
        let expected = self.store().block_size;
        if block_size != expected {
            return Err(StageError::BlockSizeMismatch {
                expected,
                actual: block_size,
                block: self,
            });
        }
        let store = self.store.take().expect("live handle");
        Ok(CompleteBlock::new(store, self.id, hash, None))
    }

    /// Stages with the manager's block size (the caller hashed a block of that size).
    pub(crate) fn stage_own_size(
        mut self,
        hash: SequenceHash,
        parent: Option<SequenceHash>,
    ) -> CompleteBlock<T> {
        let store = self.store.take().expect("live handle");
        CompleteBlock::new(store, self.id, hash, parent)
    }

    /// Stages with the hash, parent and size of a [`TokenBlock`].
    ///
    /// ```
    /// use kvbm_logical::{BlockManager, Device, Salt, TokenBlockSequence};
    /// let m = BlockManager::<Device>::builder().block_count(4).block_size(4).build()?;
    /// let seq = TokenBlockSequence::from_tokens(&[1, 2, 3, 4, 5, 6, 7, 8], 4, &Salt::none())?;
    /// let mut blocks = m.allocate_blocks(2)?;
    /// let second = blocks.pop().unwrap().stage_token_block(&seq.blocks()[1])?;
    /// assert_eq!(second.parent(), Some(seq.blocks()[0].sequence_hash()));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn stage_token_block(self, block: &TokenBlock) -> Result<CompleteBlock<T>, StageError<T>> {
        let staged = self.stage(block.sequence_hash(), block.block_size())?;
        Ok(staged.with_parent(block.parent()))
    }

    /// Stages complete block `index` of `seq`: its hash, parent and size, and its token ids
    /// for the `Stored` event that registration emits (copied only while someone subscribes
    /// to the manager's events). Errors, giving the block back, if the block is not complete
    /// or its size differs from the manager's.
    ///
    /// ```
    /// use kvbm_logical::{BlockManager, Device, KvEventKind, Salt, StageError, TokenBlockSequence};
    /// let m = BlockManager::<Device>::builder().block_count(4).block_size(4).build()?;
    /// let events = m.subscribe(8);
    /// let seq = TokenBlockSequence::from_tokens(&[1, 2, 3, 4, 5], 4, &Salt::none())?;
    /// let block = m.allocate_blocks(1)?.pop().unwrap();
    /// let err = block.stage_from_sequence(&seq, 1).unwrap_err(); // only 1 token of block 1
    /// assert!(matches!(err, StageError::IncompleteBlock { index: 1, complete: 1, .. }));
    /// let staged = err.into_block().stage_from_sequence(&seq, 0)?;
    /// let _held = m.register_block(staged)?;
    /// let batch = events.try_recv().unwrap();
    /// assert!(matches!(&batch[0].kind,
    ///     KvEventKind::Stored { token_ids: Some(t), block_size: 4, .. } if t == &[1, 2, 3, 4]));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn stage_from_sequence(
        self,
        seq: &TokenBlockSequence,
        index: usize,
    ) -> Result<CompleteBlock<T>, StageError<T>> {
        let Some(block) = seq.blocks().get(index) else {
            return Err(StageError::IncompleteBlock {
                index,
                complete: seq.blocks().len(),
                block: self,
            });
        };
        let tokens = self
            .store()
            .events_enabled()
            .then(|| Box::<[u32]>::from(seq.block_tokens(index)));
        let staged = self.stage_token_block(block)?;
        Ok(staged.with_tokens(tokens))
    }

    /// Returns every block to the reset pool with one lock acquisition per 256 blocks (of one
    /// manager) instead of one per block.
    ///
    /// ```
    /// use kvbm_logical::{BlockManager, Device, MutableBlock};
    /// let m = BlockManager::<Device>::builder().block_count(8).block_size(16).build()?;
    /// let blocks = m.allocate_blocks(8)?;
    /// MutableBlock::release_all(blocks);
    /// assert_eq!(m.available_blocks(), 8);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn release_all(blocks: impl IntoIterator<Item = Self>) {
        release_batch(blocks);
    }
}

super::releasable!(MutableBlock, release_mutable);

impl<T: BlockTier> Drop for MutableBlock<T> {
    fn drop(&mut self) {
        if let Some(store) = self.store.take() {
            store.release_mutable(self.id);
        }
    }
}

impl<T: BlockTier> fmt::Debug for MutableBlock<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MutableBlock")
            .field("tier", &T::NAME)
            .field("block_id", &self.id)
            .field("manager", &self.store.as_ref().map(|s| s.id))
            .finish()
    }
}
