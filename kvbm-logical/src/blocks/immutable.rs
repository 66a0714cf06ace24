//! Registered blocks: shared owners and weak references.

use std::fmt;
use std::marker::PhantomData;
use std::sync::{Arc, Weak};

use super::{Releasable, release_batch};
use crate::hashing::SequenceHash;
use crate::ids::{BlockId, ManagerId};
use crate::store::{BlockStore, StoreState};
use crate::tier::BlockTier;

/// A registered block: matchable by its hash, read-only, shared. Cloning adds an owner. A
/// block with at least one owner is never evicted; when the last owner goes it enters the
/// inactive pool, still matchable, until allocation evicts it.
///
/// ```
/// use kvbm_logical::{BlockManager, Device, SequenceHash};
/// let m = BlockManager::<Device>::builder().block_count(4).block_size(16).build()?;
/// let hash = SequenceHash::new(5);
/// let block = m.register_block(m.allocate_blocks(1)?.pop().unwrap().stage(hash, 16)?)?;
/// let twin = block.clone();
/// drop(block);
/// assert_eq!(m.counts().active, 1); // `twin` still holds it
/// drop(twin);
/// assert_eq!(m.counts().inactive, 1); // unowned but still matchable
/// let found = m.match_blocks(&[hash]);
/// assert_eq!(found[0].sequence_hash(), hash);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct ImmutableBlock<T: BlockTier> {
    /// `None` only once batch-released.
    store: Option<Arc<BlockStore>>,
    id: BlockId,
    hash: SequenceHash,
    _tier: PhantomData<T>,
}

impl<T: BlockTier> ImmutableBlock<T> {
    /// A handle for a slot on which the caller has just added one owner.
    pub(crate) fn new(store: Arc<BlockStore>, id: BlockId, hash: SequenceHash) -> Self {
        Self {
            store: Some(store),
            id,
            hash,
            _tier: PhantomData,
        }
    }

    fn store(&self) -> &Arc<BlockStore> {
        self.store
            .as_ref()
            .expect("a live ImmutableBlock always holds its store")
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

    /// A non-owning reference, upgradable while the block stays registered (active or
    /// inactive).
    pub fn downgrade(&self) -> WeakBlock<T> {
        WeakBlock {
            store: Arc::downgrade(self.store()),
            manager: self.store().id,
            id: self.id,
            hash: self.hash,
            _tier: PhantomData,
        }
    }

    /// Drops every handle: those that are not their block's last owner without the lock (as a
    /// plain drop does), the last owners with one lock acquisition per 256 blocks (of one
    /// manager) instead of one per block. The iterator runs outside the lock, so any iterator
    /// is fine.
    ///
    /// ```
    /// use kvbm_logical::{BlockManager, Device, ImmutableBlock, SequenceHash};
    /// let m = BlockManager::<Device>::builder().block_count(4).block_size(16).build()?;
    /// let hashes = [1, 2, 3].map(SequenceHash::new);
    /// let staged = m
    ///     .allocate_blocks(3)?
    ///     .into_iter()
    ///     .zip(hashes)
    ///     .map(|(b, h)| b.stage(h, 16))
    ///     .collect::<Result<Vec<_>, _>>()?;
    /// let registered = m.register_blocks(staged)?;
    /// ImmutableBlock::release_all(registered);
    /// assert_eq!(m.counts().inactive, 3);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn release_all(blocks: impl IntoIterator<Item = Self>) {
        release_batch(blocks);
    }
}

impl<T: BlockTier> Clone for ImmutableBlock<T> {
    /// Another owner of the same block: a lock-free atomic increment.
    fn clone(&self) -> Self {
        let store = self.store();
        store.add_ref(self.id);
        Self::new(Arc::clone(store), self.id, self.hash)
    }
}

impl<T: BlockTier> Releasable for ImmutableBlock<T> {
    fn disarm(&mut self) -> Option<Arc<BlockStore>> {
        self.store.take()
    }

    fn slot(&self) -> BlockId {
        self.id
    }

    fn release_lock_free(store: &BlockStore, id: BlockId) -> bool {
        store.refs.release_shared(id)
    }

    fn release_locked(state: &mut StoreState, id: BlockId) {
        state.release_ref(id);
    }
}

impl<T: BlockTier> Drop for ImmutableBlock<T> {
    /// Lock-free unless this is the block's last owner, whose release takes the store lock
    /// and moves the block to the inactive pool.
    fn drop(&mut self) {
        if let Some(store) = self.store.take() {
            store.release_ref(self.id);
        }
    }
}

impl<T: BlockTier> fmt::Debug for ImmutableBlock<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImmutableBlock")
            .field("tier", &T::NAME)
            .field("block_id", &self.id)
            .field("manager", &self.store.as_ref().map(|s| s.id))
            .field("sequence_hash", &self.hash)
            .finish()
    }
}

/// A non-owning reference to a registered block. [`upgrade`](Self::upgrade) succeeds while
/// the slot still holds the same sequence hash, whether active or inactive (resurrecting an
/// inactive block); after eviction or reset it returns `None`. It does not keep the manager
/// alive.
///
/// ```
/// use kvbm_logical::{BlockManager, Device, SequenceHash};
/// let m = BlockManager::<Device>::builder().block_count(1).block_size(16).build()?;
/// let block = m.register_block(m.allocate_blocks(1)?.pop().unwrap().stage(SequenceHash::new(9), 16)?)?;
/// let weak = block.downgrade();
/// drop(block); // inactive now
/// let again = weak.upgrade().expect("still registered");
/// drop(again);
/// let _evictor = m.allocate_blocks(1)?; // the only block is evicted
/// assert!(weak.upgrade().is_none());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct WeakBlock<T: BlockTier> {
    store: Weak<BlockStore>,
    manager: ManagerId,
    id: BlockId,
    hash: SequenceHash,
    _tier: PhantomData<T>,
}

impl<T: BlockTier> WeakBlock<T> {
    /// An owning handle, if the block is still registered in this slot.
    pub fn upgrade(&self) -> Option<ImmutableBlock<T>> {
        let store = self.store.upgrade()?;
        store
            .upgrade(self.id, self.hash)
            .then(|| ImmutableBlock::new(store, self.id, self.hash))
    }

    /// The slot the block occupied.
    pub fn block_id(&self) -> BlockId {
        self.id
    }

    /// The manager the block belongs to (known even after the manager is gone).
    pub fn manager_id(&self) -> ManagerId {
        self.manager
    }

    /// The block's sequence hash.
    pub fn sequence_hash(&self) -> SequenceHash {
        self.hash
    }
}

impl<T: BlockTier> Clone for WeakBlock<T> {
    fn clone(&self) -> Self {
        Self {
            store: Weak::clone(&self.store),
            manager: self.manager,
            id: self.id,
            hash: self.hash,
            _tier: PhantomData,
        }
    }
}

impl<T: BlockTier> fmt::Debug for WeakBlock<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WeakBlock")
            .field("tier", &T::NAME)
            .field("block_id", &self.id)
            .field("manager", &self.manager)
            .field("sequence_hash", &self.hash)
            .finish()
    }
}
