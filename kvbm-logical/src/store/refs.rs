//! Per-slot owner counts, kept **outside** the store lock so that a handle that is not the
//! last owner of its block can be cloned and dropped without taking the lock.
//!
//! # Protocol
//!
//! The owners of registered slot `id` are its `ImmutableBlock`s plus one for a pin. Their
//! number is split in two atomics, `owners = locked + shared`:
//!
//! * `locked` (`u64`) is written **only under the store lock**, with plain loads and stores
//!   (no read-modify-write): `+1` when a match, an upgrade or a pin adds an owner, `0 -> 1`
//!   when a block is registered or resurrected, and back to 0 when its last owner goes. So a
//!   match does not pay for an atomic read-modify-write per block, just as when the count was
//!   a plain field under the lock. Lock-free code only reads it.
//! * `shared` (`i64`, may go negative) takes every other change, each by an atomic
//!   read-modify-write: `+1` for a lock-free clone of a handle, `-1` for the release of an
//!   owner that is not the last.
//!
//! A release that is not sure to leave another owner goes to the lock, and the change to 0
//! happens only there:
//!
//! * [`release_shared`](RefCounts::release_shared) (no lock) reads `locked` and `shared` and
//!   decrements `shared` by compare-and-swap **only if their sum is at least 2**; otherwise the
//!   caller is, or may be, the last owner and releases under the lock instead.
//! * [`release_locked`](RefCounts::release_locked) (under the lock) reads the sum: if it is 1
//!   the caller is the only owner — nobody else can add or remove one — and both parts go to 0;
//!   otherwise it decrements `shared` by compare-and-swap, like a lock-free release.
//!
//! Why a lock-free release never takes the sum to 0: its compare-and-swap succeeds only if
//! `shared` is still what it read, and `locked` never decreases while the releasing handle
//! exists (`locked` drops only to 0, and only when the sum is 1 under the lock, which cannot be
//! while two owners exist; a non-last release under the lock decrements `shared`). So when the
//! swap succeeds, `locked_now + shared - 1 >= locked_read + shared - 1 >= 1`. A stale read of
//! `locked` (a concurrent match just raised it) only makes the release take the lock.
//!
//! Hence, **under the lock, the sum is 0 exactly when the slot is not active**, at every
//! instant: there is no window in which an active block has no owner or an inactive one has
//! an owner, and `check_invariants` can check this exactly while other threads clone and drop
//! handles. The races this settles (each modelled in `tests/shuttle_models.rs`):
//! * last drop vs a resurrecting `match_blocks`: the last owner sees 1 and takes the lock; the
//!   match (under the lock) either comes first — the sum goes to 2, and the locked release
//!   decrements it and leaves the block active — or comes after, and finds the block inactive
//!   and resurrects it.
//! * two owners releasing at once: both compare-and-swap `shared`; the loser re-reads and, if
//!   it is now the last owner, takes the lock.
//! * `WeakBlock::upgrade`, pin and unpin run under the lock and are ordered the same way.
//! * eviction and re-registration of a slot: only an inactive slot (no owner) can be evicted,
//!   and a handle's release always happens while the handle still owns the slot, so a release
//!   can never apply to a later registration of the same slot (no ABA).
//!
//! Memory ordering follows `Arc`: a lock-free release decrements with `Release`; the last
//! owner's locked release reads with `Acquire`, so everything every owner did with the block
//! happens-before the block becomes evictable (and before a new owner writes it).

use std::collections::TryReserveError;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::ids::BlockId;
use crate::sync::{AtomicI64, AtomicU64};

/// One slot's owners: `locked + shared` (see the module docs). 16 bytes, one cache line for
/// both halves.
struct Count {
    locked: AtomicU64,
    shared: AtomicI64,
}

impl Count {
    /// `locked + shared`. Exact under the lock whenever it is 0 or 1 (see the module docs).
    #[inline]
    fn sum(&self, shared: i64) -> i64 {
        // `locked` counts live handles (plus a pin), far below `i64::MAX`.
        self.locked.load(Ordering::Acquire) as i64 + shared
    }
}

/// The owner count of every slot. 64-bit parts, so that neither can overflow (2^63 owners do
/// not fit in memory, nor in centuries of `mem::forget(block.clone())`). Cloning a
/// `RefCounts` shares the counts (the store keeps one clone outside its lock and one inside).
#[derive(Clone)]
pub(crate) struct RefCounts {
    counts: Arc<[Count]>,
}

impl RefCounts {
    /// `total` zero counts.
    pub(crate) fn new(total: usize) -> Result<Self, TryReserveError> {
        let mut counts = Vec::new();
        counts.try_reserve_exact(total)?;
        counts.extend((0..total).map(|_| Count {
            locked: AtomicU64::new(0),
            shared: AtomicI64::new(0),
        }));
        Ok(Self {
            counts: counts.into(),
        })
    }

    #[inline]
    fn at(&self, id: BlockId) -> &Count {
        &self.counts[id.index()]
    }

    /// Starts loading `id`'s count (see [`crate::prefetch`]); out of range, nothing.
    #[inline]
    pub(crate) fn prefetch(&self, id: BlockId) {
        if let Some(count) = self.counts.get(id.index()) {
            crate::prefetch::prefetch(count);
        }
    }

    /// Lock-free: one more owner of a slot the caller owns (an `ImmutableBlock` clone).
    #[inline]
    pub(crate) fn clone_ref(&self, id: BlockId) {
        // Like `Arc::clone`: the caller's own reference keeps the sum above 0, so no
        // ordering with other owners is needed.
        self.at(id).shared.fetch_add(1, Ordering::Relaxed);
    }

    /// Lock-free: drops one of the caller's owners **unless it is the last**; returns
    /// whether it did. When it returns `false` the caller is (or was, an instant ago) the
    /// last owner and must release under the lock with [`release_locked`](Self::release_locked).
    #[inline]
    pub(crate) fn release_shared(&self, id: BlockId) -> bool {
        let count = self.at(id);
        let mut shared = count.shared.load(Ordering::Relaxed);
        while count.sum(shared) > 1 {
            match count.shared.compare_exchange_weak(
                shared,
                shared - 1,
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(now) => shared = now,
            }
        }
        false
    }

    /// Under the store lock: the owners of `id` (0 exactly when the slot is not active).
    #[inline]
    pub(crate) fn get(&self, id: BlockId) -> u64 {
        let count = self.at(id);
        // Never negative: the caller holds the lock, so the sum is exact at 0 and 1 and
        // at least 1 while owners come and go.
        count
            .sum(count.shared.load(Ordering::Acquire))
            .try_into()
            .unwrap_or(0)
    }

    /// Under the store lock: whether both parts of the count are 0, as they are for every
    /// slot that is not active (the last release clears both).
    pub(crate) fn is_clear(&self, id: BlockId) -> bool {
        let count = self.at(id);
        count.locked.load(Ordering::Acquire) == 0 && count.shared.load(Ordering::Acquire) == 0
    }

    /// Under the store lock: the first owner of a slot that had none (registration,
    /// resurrection). Nobody else can touch a count of 0.
    #[inline]
    pub(crate) fn set_first(&self, id: BlockId) {
        debug_assert_eq!(self.get(id), 0, "{id:?} already has owners");
        self.at(id).locked.store(1, Ordering::Relaxed);
    }

    /// Under the store lock: one more owner of an active slot. A plain load and store: only
    /// lock holders write `locked`.
    #[inline]
    pub(crate) fn add(&self, id: BlockId) {
        let locked = &self.at(id).locked;
        locked.store(locked.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }

    /// Under the store lock: drops one of the caller's owners; returns whether it was the
    /// last (the caller then makes the slot inactive, still under the lock).
    #[inline]
    pub(crate) fn release_locked(&self, id: BlockId) -> bool {
        let count = self.at(id);
        let mut shared = count.shared.load(Ordering::Acquire);
        loop {
            let sum = count.sum(shared);
            debug_assert!(sum >= 1, "release of {id:?} without an owner");
            if sum <= 1 {
                // The caller's is the only owner: nobody else can add or remove one.
                count.locked.store(0, Ordering::Relaxed);
                count.shared.store(0, Ordering::Relaxed);
                return true;
            }
            // Other owners exist and may release concurrently: decrement like they do.
            match count.shared.compare_exchange_weak(
                shared,
                shared - 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return false,
                Err(now) => shared = now,
            }
        }
    }
}
