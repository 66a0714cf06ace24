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
//! be dropped on any thread. Dropping a handle takes the store lock once; to release a batch
//! with one acquisition per 256 handles use `release_all` ([`ImmutableBlock::release_all`],
//! [`MutableBlock::release_all`], [`CompleteBlock::release_all`]).
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

use std::sync::Arc;

use crate::ids::BlockId;
use crate::store::{BlockStore, StoreState};

/// A handle whose drop can be replaced by a batched release.
pub(crate) trait Releasable {
    /// Takes the store out, so that the handle's drop does nothing.
    fn disarm(&mut self) -> Option<Arc<BlockStore>>;
    /// The slot.
    fn slot(&self) -> BlockId;
}

/// Implements [`Releasable`] for a handle with fields `store: Option<Arc<BlockStore>>` and
/// `id: BlockId`.
macro_rules! releasable {
    ($handle:ident) => {
        impl<T: $crate::tier::BlockTier> $crate::blocks::Releasable for $handle<T> {
            fn disarm(&mut self) -> Option<std::sync::Arc<$crate::store::BlockStore>> {
                self.store.take()
            }

            fn slot(&self) -> $crate::ids::BlockId {
                self.id
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
struct Pending {
    store: Option<Arc<BlockStore>>,
    ids: [BlockId; CHUNK],
    len: usize,
    release: fn(&mut StoreState, BlockId),
}

impl Pending {
    fn flush(&mut self) {
        if let Some(store) = &self.store
            && self.len > 0
        {
            let mut state = store.lock();
            for &id in &self.ids[..self.len] {
                (self.release)(&mut state, id);
            }
        }
        self.len = 0;
    }

    fn push(&mut self, store: Arc<BlockStore>, id: BlockId) {
        match &self.store {
            // The handle's reference to the store goes; `self.store` keeps it alive.
            Some(current) if Arc::ptr_eq(current, &store) => drop(store),
            _ => {
                self.flush();
                self.store = Some(store);
            }
        }
        if self.len == CHUNK {
            self.flush();
        }
        self.ids[self.len] = id;
        self.len += 1;
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Releases every handle, calling `release` on each slot in iteration order, with one
/// store-lock acquisition per run of up to 256 handles of the same store.
///
/// The iterator runs **outside** the lock: it may own handles it never yields (`take`,
/// `filter`, ...) or run code that drops handles, and nothing deadlocks. No heap allocation.
pub(crate) fn release_batch<H: Releasable>(
    handles: impl IntoIterator<Item = H>,
    release: fn(&mut StoreState, BlockId),
) {
    let mut pending = Pending {
        store: None,
        ids: [BlockId::new(0); CHUNK],
        len: 0,
        release,
    };
    for mut handle in handles {
        if let Some(store) = handle.disarm() {
            pending.push(store, handle.slot());
        }
        // `handle` is disarmed: its drop does nothing.
    }
}
