//! Per-slot owner counts, kept **outside** the store lock so that a handle that is not the
//! last owner of its block can be cloned and dropped without taking the lock.
//!
//! # Protocol
//!
//! `count[id]` is the number of owners of registered slot `id`: its `ImmutableBlock`s plus
//! one for a pin. Two kinds of change happen without the lock, both by an owner, so both
//! happen while the count is at least 1:
//!
//! * [`clone_ref`](RefCounts::clone_ref): `n -> n + 1` (an owner makes another owner);
//! * [`release_shared`](RefCounts::release_shared): `n -> n - 1` **only from `n >= 2`** (a
//!   compare-and-swap loop), so a lock-free release never brings a count to 0.
//!
//! Every other change happens under the store lock: `0 -> 1` (registration, resurrection by
//! a match, upgrade or pin), `n -> n + 1` (another owner by a match, upgrade or pin) and the
//! last owner's `1 -> 0` ([`release_locked`](RefCounts::release_locked)), which also moves the
//! block to the inactive pool. Hence, **under the lock, a count is 0 exactly when the slot is
//! not active**, at every instant: there is no window in which an active block has no owner
//! or an inactive one has an owner, and `check_invariants` can check this exactly while other
//! threads clone and drop handles.
//!
//! The races this settles (each modelled in `tests/shuttle_models.rs`):
//! * last drop vs a resurrecting `match_blocks`: the last owner sees 1 and takes the lock; the
//!   match (under the lock) either comes first — the count goes to 2 and the last owner's
//!   locked release finds 2, decrements, and leaves the block active — or comes after, and
//!   finds the block inactive and resurrects it. A lock-free `2 -> 1` racing the last owner's
//!   locked release is an ordinary atomic decrement: whichever comes second sees 1.
//! * `WeakBlock::upgrade`, pin and unpin run under the lock and are ordered the same way.
//! * eviction and re-registration of a slot: only an inactive slot (count 0, no owner) can be
//!   evicted, and a handle's release always happens while the handle still owns the slot, so
//!   a release can never apply to a later registration of the same slot (no ABA).
//!
//! Memory ordering follows `Arc`: a release decrements with `Release`; the last owner's
//! locked release reads with `Acquire`, so everything every owner did with the block
//! happens-before the block becomes evictable (and before a new owner writes it).

use std::collections::TryReserveError;
use std::sync::atomic::Ordering;

use crate::ids::BlockId;
use crate::sync::AtomicU64;

/// The owner count of every slot. 64-bit, so that it cannot overflow (2^63 owners do not
/// fit in memory, nor in centuries of `mem::forget(block.clone())`).
pub(crate) struct RefCounts {
    counts: Box<[AtomicU64]>,
}

impl RefCounts {
    /// `total` zero counts.
    pub(crate) fn new(total: usize) -> Result<Self, TryReserveError> {
        let mut counts = Vec::new();
        counts.try_reserve_exact(total)?;
        counts.extend((0..total).map(|_| AtomicU64::new(0)));
        Ok(Self {
            counts: counts.into_boxed_slice(),
        })
    }

    fn at(&self, id: BlockId) -> &AtomicU64 {
        &self.counts[id.index()]
    }

    /// Lock-free: one more owner of a slot the caller owns (an `ImmutableBlock` clone).
    pub(crate) fn clone_ref(&self, id: BlockId) {
        // Like `Arc::clone`: the caller's own reference keeps the count above 0, so no
        // ordering with other owners is needed.
        self.at(id).fetch_add(1, Ordering::Relaxed);
    }

    /// Lock-free: drops one of the caller's owners **unless it is the last**; returns
    /// whether it did. When it returns `false` the caller is (or was, an instant ago) the
    /// last owner and must release under the lock with [`release_locked`](Self::release_locked).
    pub(crate) fn release_shared(&self, id: BlockId) -> bool {
        let count = self.at(id);
        let mut current = count.load(Ordering::Relaxed);
        while current > 1 {
            match count.compare_exchange_weak(
                current,
                current - 1,
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(now) => current = now,
            }
        }
        false
    }

    /// Under the store lock: the owners of `id` (0 exactly when the slot is not active).
    pub(crate) fn get(&self, id: BlockId) -> u64 {
        self.at(id).load(Ordering::Acquire)
    }

    /// Under the store lock: the first owner of a slot that had none (registration,
    /// resurrection). Nobody else can touch a count of 0.
    pub(crate) fn set_first(&self, id: BlockId) {
        debug_assert_eq!(self.get(id), 0, "{id:?} already has owners");
        self.at(id).store(1, Ordering::Relaxed);
    }

    /// Under the store lock: one more owner of an active slot (its count is at least 1;
    /// owners may be cloning and dropping concurrently, hence the atomic addition).
    pub(crate) fn add(&self, id: BlockId) {
        self.at(id).fetch_add(1, Ordering::Relaxed);
    }

    /// Under the store lock: drops one of the caller's owners; returns whether it was the
    /// last (the caller then makes the slot inactive, still under the lock).
    pub(crate) fn release_locked(&self, id: BlockId) -> bool {
        let count = self.at(id);
        // With the count at 1 the caller's is the only owner, and under the lock nobody else
        // can add one (a lock-free clone needs another owner), so a plain store suffices.
        if count.load(Ordering::Acquire) == 1 {
            count.store(0, Ordering::Relaxed);
            return true;
        }
        // Other owners exist; they may release concurrently, so whoever goes second sees 1.
        let before = count.fetch_sub(1, Ordering::AcqRel);
        debug_assert!(before >= 1, "release of {id:?} without an owner");
        before == 1
    }
}
