//! Type-state block handles. Ownership is the state:
//!
//! | handle | meaning | on drop |
//! |---|---|---|
//! | [`MutableBlock`] | allocated, writable, no identity | back to the reset pool |
//! | [`CompleteBlock`] | staged with a [`SequenceHash`](crate::SequenceHash) | back to the reset pool |
//! | [`ImmutableBlock`] | registered, shareable; never evicted while held | last owner: into the inactive pool |
//! | [`WeakBlock`] | non-owning | nothing |
//!
//! Every handle holds its manager's store, so it may outlive the `BlockManager` value and
//! be dropped on any thread. Cloning an [`ImmutableBlock`], and dropping one that is not its
//! block's last owner, is a lock-free atomic operation on the block's owner count. Dropping
//! any other handle (the last owner of a registered block, a mutable or staged block) takes
//! the store lock once; to release a batch with one acquisition per 256 such handles use
//! `release_all` ([`ImmutableBlock::release_all`], [`MutableBlock::release_all`],
//! [`CompleteBlock::release_all`]).
//!
//! The transitions that make no sense do not compile. A mutable block cannot be registered:
//!
//! ```compile_fail,E0308
//! # use kvbm_logical::{BlockManager, Device};
//! let m = BlockManager::<Device>::builder().block_count(2).block_size(4).build().unwrap();
//! let block = m.allocate_blocks(1).unwrap().pop().unwrap();
//! m.register_block(block); // error: expected CompleteBlock, found MutableBlock
//! ```
//!
//! A block cannot be staged twice:
//!
//! ```compile_fail,E0599
//! # use kvbm_logical::{BlockManager, Device};
//! let m = BlockManager::<Device>::builder().block_count(2).block_size(4).build().unwrap();
//! let block = m.allocate_blocks(1).unwrap().pop().unwrap();
//! let complete = block.stage(1.into(), 4).unwrap();
//! complete.stage(2.into(), 4); // error: no method `stage` on CompleteBlock
//! ```
//!
//! A mutable block has one owner; it cannot be cloned:
//!
//! ```compile_fail,E0599
//! # use kvbm_logical::{BlockManager, Device};
//! let m = BlockManager::<Device>::builder().block_count(2).block_size(4).build().unwrap();
//! let block = m.allocate_blocks(1).unwrap().pop().unwrap();
//! let twin = block.clone(); // error: MutableBlock is not Clone
//! ```
//!
//! A weak handle gives no access until upgraded:
//!
//! ```compile_fail,E0308
//! # use kvbm_logical::{BlockManager, Device, ImmutableBlock};
//! # fn take(_: ImmutableBlock<Device>) {}
//! let m = BlockManager::<Device>::builder().block_count(2).block_size(4).build().unwrap();
//! let block = m.allocate_blocks(1).unwrap().pop().unwrap();
//! let block = m.register_block(block.stage(1.into(), 4).unwrap()).unwrap();
//! take(block.downgrade()); // error: expected ImmutableBlock, found WeakBlock
//! ```

mod complete;
mod immutable;
mod mutable;

pub use complete::CompleteBlock;
pub use immutable::{ImmutableBlock, WeakBlock};
pub use mutable::MutableBlock;

use std::marker::PhantomData;
use std::sync::Arc;

use crate::ids::BlockId;
use crate::store::{BlockStore, StoreState};

/// A handle whose drop can be replaced by a batched release.
pub(crate) trait Releasable {
    /// Takes the store out, so that the handle's drop does nothing.
    fn disarm(&mut self) -> Option<Arc<BlockStore>>;
    /// The slot.
    fn slot(&self) -> BlockId;
    /// Releases the slot without the store lock if that is possible (an owner that is not
    /// the last one); returns whether it did.
    fn release_lock_free(_store: &BlockStore, _id: BlockId) -> bool {
        false
    }
    /// Releases the slot; the caller holds the store lock.
    fn release_locked(state: &mut StoreState, id: BlockId);
}

/// Implements [`Releasable`] for a handle with fields `store: Option<Arc<BlockStore>>` and
/// `id: BlockId` whose release is `StoreState::$release` under the lock.
macro_rules! releasable {
    ($handle:ident, $release:ident) => {
        impl<T: $crate::tier::BlockTier> $crate::blocks::Releasable for $handle<T> {
            fn disarm(&mut self) -> Option<std::sync::Arc<$crate::store::BlockStore>> {
                self.store.take()
            }

            fn slot(&self) -> $crate::ids::BlockId {
                self.id
            }

            fn release_locked(state: &mut $crate::store::StoreState, id: $crate::ids::BlockId) {
                state.$release(id);
            }
        }
    };
}
pub(crate) use releasable;

/// Slots released per lock acquisition by [`release_batch`].
const CHUNK: usize = 256;

/// Slots of one store waiting to be released; flushed under one lock acquisition when full,
/// when a handle of another store comes, and on drop (so that a panicking iterator loses no
/// slot).
///
/// Panic safety: a flush can unwind (a panic of user code under the lock is resumed when the
/// lock is released). The ids being flushed leave the buffer before the first is released,
/// and a handle that arrives while the buffer must be flushed waits in `incoming` until the
/// flush is done; so when the buffer is dropped during the unwinding it releases exactly the
/// slots not yet released, each once.
struct Pending<H: Releasable> {
    store: Option<Arc<BlockStore>>,
    ids: [BlockId; CHUNK],
    len: usize,
    incoming: Option<(Arc<BlockStore>, BlockId)>,
    _handle: PhantomData<fn(H)>,
}

impl<H: Releasable> Pending<H> {
    fn new() -> Self {
        Self {
            store: None,
            ids: [BlockId::new(0); CHUNK],
            len: 0,
            incoming: None,
            _handle: PhantomData,
        }
    }

    fn flush(&mut self) {
        let len = std::mem::take(&mut self.len);
        if let Some(store) = &self.store
            && len > 0
        {
            let mut state = store.lock();
            for &id in &self.ids[..len] {
                H::release_locked(&mut state, id);
            }
        }
    }

    fn push(&mut self, store: Arc<BlockStore>, id: BlockId) {
        let same = matches!(&self.store, Some(current) if Arc::ptr_eq(current, &store));
        if same && self.len < CHUNK {
            // The handle's reference to the store goes; `self.store` keeps it alive.
            drop(store);
            self.ids[self.len] = id;
            self.len += 1;
            return;
        }
        self.incoming = Some((store, id));
        self.flush();
        if let Some((store, id)) = self.incoming.take() {
            if !same {
                self.store = Some(store);
            }
            self.ids[0] = id;
            self.len = 1;
        }
    }
}

impl<H: Releasable> Drop for Pending<H> {
    fn drop(&mut self) {
        self.flush();
        if let Some((store, id)) = self.incoming.take() {
            H::release_locked(&mut store.lock(), id);
        }
    }
}

/// Releases every handle, in iteration order: those that can be released without the lock
/// (owners that are not the last) at once, the others with one store-lock acquisition per
/// run of up to 256 handles of the same store.
///
/// The iterator runs **outside** the lock: it may own handles it never yields (`take`,
/// `filter`, ...) or run code that drops handles, and nothing deadlocks. If it panics, the
/// handles taken so far are still released, once each. No heap allocation.
pub(crate) fn release_batch<H: Releasable>(handles: impl IntoIterator<Item = H>) {
    let mut pending = Pending::<H>::new();
    for mut handle in handles {
        if let Some(store) = handle.disarm() {
            let id = handle.slot();
            if !H::release_lock_free(&store, id) {
                pending.push(store, id);
            }
        }
        // `handle` is disarmed: its drop does nothing.
    }
}
