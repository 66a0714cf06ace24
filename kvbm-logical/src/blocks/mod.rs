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
//! under a single acquisition use `release_all` ([`ImmutableBlock::release_all`],
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
    /// The store the handle returns to (`None` only once disarmed).
    fn store_ref(&self) -> Option<&Arc<BlockStore>>;
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
            fn store_ref(&self) -> Option<&std::sync::Arc<$crate::store::BlockStore>> {
                self.store.as_ref()
            }

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

/// Releases every handle with one store-lock acquisition per distinct store, calling
/// `release` on each slot. Handles of another store than the first are released after the
/// lock is dropped (never two store locks at once).
pub(crate) fn release_batch<H: Releasable>(
    handles: impl IntoIterator<Item = H>,
    release: fn(&mut StoreState, BlockId),
) {
    let mut iter = handles.into_iter();
    let Some(mut first) = iter.next() else {
        return;
    };
    let Some(store) = first.disarm() else {
        return;
    };
    let mut others: Vec<H> = Vec::new();
    {
        let mut state = store.lock();
        release(&mut state, first.slot());
        for mut handle in iter {
            let same = handle.store_ref().is_some_and(|s| Arc::ptr_eq(s, &store));
            if same {
                release(&mut state, handle.slot());
                // Disarmed: its drop (here, under the lock) does nothing.
                drop(handle.disarm());
            } else {
                others.push(handle);
            }
        }
    }
    release_batch(others, release);
}
