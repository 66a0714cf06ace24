//! The public face of one tier's pool: [`BlockManager`].

mod builder;

pub use builder::{BlockManagerBuilder, MAX_BLOCK_SIZE, MAX_BLOCKS};

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use crate::blocks::{CompleteBlock, ImmutableBlock, MutableBlock};
use crate::error::{AllocationError, InvariantError, PinError, RegisterError, ResetError};
use crate::events::{self, EventSubscriber, KvEventKind, RemovalReason};
use crate::hashing::SequenceHash;
use crate::ids::ManagerId;
use crate::metrics::BlockMetrics;
use crate::policy::EvictionBackend;
use crate::store::{
    BlockDuplicationPolicy, BlockStore, Evicted, PinRefusal, PoolCounts, Registered,
};
use crate::tier::BlockTier;

/// Manages the blocks of one tier: allocation, registration, prefix matching, eviction.
///
/// All state lives in one store behind one mutex; every method below takes it at most once
/// per call, whatever the number of blocks. `BlockManager` is cheap to clone (clones share
/// the store) and is `Send + Sync`.
///
/// ```
/// use kvbm_logical::{BlockManager, Device, ImmutableBlock, Salt, TokenBlockSequence};
///
/// let manager = BlockManager::<Device>::builder().block_count(64).block_size(4).build()?;
/// let prompt: Vec<u32> = (0..10).collect();
/// let seq = TokenBlockSequence::from_tokens(&prompt, 4, &Salt::none())?;
/// let hashes: Vec<_> = seq.sequence_hashes().collect();
///
/// // A request: reuse the cached prefix, allocate the rest, register once computed.
/// let cached = manager.match_blocks(&hashes);
/// assert!(cached.is_empty());
/// let fresh = manager.allocate_blocks(hashes.len() - cached.len())?;
/// // ... the engine computes the KV data into `fresh` ...
/// let staged = fresh
///     .into_iter()
///     .zip(&seq.blocks()[cached.len()..])
///     .map(|(block, tb)| block.stage_token_block(tb))
///     .collect::<Result<Vec<_>, _>>()?;
/// let registered = manager.register_blocks(staged)?;
/// ImmutableBlock::release_all(registered); // request done: blocks become inactive
///
/// // The next request with the same prompt hits both complete blocks.
/// assert_eq!(manager.match_blocks(&hashes).len(), 2);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct BlockManager<T: BlockTier> {
    store: Arc<BlockStore>,
    _tier: PhantomData<T>,
}

impl<T: BlockTier> BlockManager<T> {
    /// A builder; see [`BlockManagerBuilder`].
    pub fn builder() -> BlockManagerBuilder<T> {
        BlockManagerBuilder::default()
    }

    /// Allocates `count` blocks, all or nothing: from the reset pool first, then by evicting
    /// inactive blocks in the eviction policy's order. Blocks held by any handle are never
    /// evicted.
    ///
    /// ```
    /// use kvbm_logical::{AllocationError, BlockManager, Device};
    /// let m = BlockManager::<Device>::builder().block_count(4).block_size(16).build()?;
    /// let a = m.allocate_blocks(3)?;
    /// assert!(matches!(m.allocate_blocks(2), Err(AllocationError::Exhausted { available: 1, .. })));
    /// assert_eq!(m.available_blocks(), 1); // the refused call took nothing
    /// # drop(a);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn allocate_blocks(&self, count: usize) -> Result<Vec<MutableBlock<T>>, AllocationError> {
        self.allocate(count, None)
    }

    /// Like [`allocate_blocks`](Self::allocate_blocks), and also returns the hashes that
    /// eviction removed from the cache, in eviction order (under policy `Allow`, a hash
    /// is listed only when its last copy goes).
    ///
    /// ```
    /// use kvbm_logical::{BlockManager, Device, ImmutableBlock, SequenceHash};
    /// let m = BlockManager::<Device>::builder().block_count(2).block_size(16).build()?;
    /// let staged = m
    ///     .allocate_blocks(2)?
    ///     .into_iter()
    ///     .zip([10, 11])
    ///     .map(|(b, h)| b.stage(SequenceHash::new(h), 16))
    ///     .collect::<Result<Vec<_>, _>>()?;
    /// ImmutableBlock::release_all(m.register_blocks(staged)?); // 10 released first
    /// let (blocks, evicted) = m.allocate_blocks_with_evictions(1)?;
    /// assert_eq!(evicted, vec![SequenceHash::new(10)]); // least recently used
    /// # drop(blocks);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn allocate_blocks_with_evictions(
        &self,
        count: usize,
    ) -> Result<(Vec<MutableBlock<T>>, Vec<SequenceHash>), AllocationError> {
        let (blocks, evicted) = self.allocate_blocks_evicting(count)?;
        Ok((blocks, evicted.into_iter().map(|e| e.hash).collect()))
    }

    /// Like [`allocate_blocks_with_evictions`](Self::allocate_blocks_with_evictions), with
    /// each evicted block's slot and parent: the slot is now one of the returned blocks and
    /// still holds the evicted bytes, so a caller can copy them to a lower tier before it
    /// writes the block (write-back offload).
    ///
    /// ```
    /// use kvbm_logical::{BlockManager, Device, ImmutableBlock, SequenceHash};
    /// let m = BlockManager::<Device>::builder().block_count(1).block_size(16).build()?;
    /// let staged = m.allocate_blocks(1)?.pop().unwrap().stage(SequenceHash::new(7), 16)?;
    /// let slot = staged.block_id();
    /// drop(m.register_block(staged.with_parent(Some(SequenceHash::new(6))))?);
    /// let (blocks, evicted) = m.allocate_blocks_evicting(1)?;
    /// assert_eq!(evicted[0].hash, SequenceHash::new(7));
    /// assert_eq!(evicted[0].parent, Some(SequenceHash::new(6)));
    /// assert_eq!(evicted[0].block_id, slot);
    /// assert_eq!(blocks[0].block_id(), slot);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn allocate_blocks_evicting(
        &self,
        count: usize,
    ) -> Result<(Vec<MutableBlock<T>>, Vec<Evicted>), AllocationError> {
        let mut evicted = Vec::new();
        let blocks = self.allocate(count, Some(&mut evicted))?;
        Ok((blocks, evicted))
    }

    fn allocate(
        &self,
        count: usize,
        evicted: Option<&mut Vec<Evicted>>,
    ) -> Result<Vec<MutableBlock<T>>, AllocationError> {
        let total = self.store.total;
        if count > total {
            return Err(AllocationError::Exhausted {
                requested: count,
                available: self.available_blocks(),
                total,
            });
        }
        let mut blocks = Vec::with_capacity(count);
        if count == 0 {
            return Ok(blocks);
        }
        let result = {
            let mut state = self.store.lock();
            let emit = state.events.enabled();
            // Evicted hashes are collected only when someone wants them.
            let mut gone = Vec::new();
            let want = evicted.is_some() || emit;
            let result = state.allocate(count, want.then_some(&mut gone), |id| {
                blocks.push(MutableBlock::new(Arc::clone(&self.store), id));
            });
            if let Ok(from_eviction) = result {
                let metrics = &self.store.metrics;
                metrics.add_allocations(count - from_eviction, from_eviction);
                metrics.add_removals(RemovalReason::Evicted, from_eviction);
                if emit && !gone.is_empty() {
                    let block_hashes = if evicted.is_some() {
                        gone.iter().map(|e| e.hash).collect()
                    } else {
                        // Nobody else wants the records: reuse their allocation in place.
                        std::mem::take(&mut gone)
                            .into_iter()
                            .map(|e| e.hash)
                            .collect()
                    };
                    let event = KvEventKind::Removed {
                        block_hashes,
                        reason: RemovalReason::Evicted,
                    };
                    state.events.publish(self.store.id, [event], metrics);
                }
                if let Some(evicted) = evicted {
                    *evicted = gone;
                }
            }
            result
        };
        match result {
            Ok(_) => Ok(blocks),
            Err(available) => {
                // Only a broken eviction policy gets here with blocks in hand; give them back.
                MutableBlock::release_all(blocks);
                Err(AllocationError::Exhausted {
                    requested: count,
                    available,
                    total,
                })
            }
        }
    }

    /// Registers one staged block; see [`register_blocks`](Self::register_blocks).
    pub fn register_block(
        &self,
        block: CompleteBlock<T>,
    ) -> Result<ImmutableBlock<T>, RegisterError<CompleteBlock<T>>> {
        let found = block.manager_id();
        if found != self.id() {
            return Err(RegisterError::ForeignBlock {
                expected: self.id(),
                found,
                index: 0,
                blocks: block,
            });
        }
        let mut registered = None;
        self.register_own(std::iter::once(block), |handle| registered = Some(handle));
        let handle = registered.expect("one block in, one handle out");
        self.store
            .record_accesses(std::iter::once(handle.sequence_hash()));
        Ok(handle)
    }

    /// Registers staged blocks under one lock acquisition, making them matchable; returns
    /// one handle per input, in order.
    ///
    /// If a hash is already registered, the [`BlockDuplicationPolicy`] decides: `Reject`
    /// returns the existing block (the new slot goes back to the reset pool), `Allow` keeps
    /// both. A block from another manager refuses the whole batch, registering nothing and
    /// giving every block back.
    ///
    /// ```
    /// use kvbm_logical::{BlockManager, Device, RegisterError, SequenceHash};
    /// let m = BlockManager::<Device>::builder().block_count(4).block_size(16).build()?;
    /// let other = BlockManager::<Device>::builder().block_count(4).block_size(16).build()?;
    /// let mine = m.allocate_blocks(1)?.pop().unwrap().stage(SequenceHash::new(1), 16)?;
    /// let theirs = other.allocate_blocks(1)?.pop().unwrap().stage(SequenceHash::new(2), 16)?;
    /// let err = m.register_blocks(vec![mine, theirs]).unwrap_err();
    /// assert!(matches!(err, RegisterError::ForeignBlock { index: 1, .. }));
    /// let mut blocks = err.into_blocks();
    /// assert_eq!(blocks.len(), 2);
    /// blocks.pop(); // theirs: its drop returns it to `other`
    /// let registered = m.register_blocks(blocks)?;
    /// assert_eq!(registered[0].sequence_hash(), SequenceHash::new(1));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn register_blocks(
        &self,
        blocks: Vec<CompleteBlock<T>>,
    ) -> Result<Vec<ImmutableBlock<T>>, RegisterError<Vec<CompleteBlock<T>>>> {
        let me = self.id();
        if let Some((index, found)) = blocks
            .iter()
            .map(CompleteBlock::manager_id)
            .enumerate()
            .find(|&(_, id)| id != me)
        {
            return Err(RegisterError::ForeignBlock {
                expected: me,
                found,
                index,
                blocks,
            });
        }
        let mut registered = Vec::with_capacity(blocks.len());
        self.register_own(blocks, |handle| registered.push(handle));
        self.store
            .record_accesses(registered.iter().map(ImmutableBlock::sequence_hash));
        Ok(registered)
    }

    /// Registers blocks of this manager under one lock acquisition, passing each handle to
    /// `out` in order; counts the registrations and publishes the `Stored` events. `out` runs
    /// under the lock, so it must not drop handles.
    fn register_own(
        &self,
        blocks: impl IntoIterator<Item = CompleteBlock<T>>,
        mut out: impl FnMut(ImmutableBlock<T>),
    ) {
        let policy = self.store.duplication;
        let metrics = &self.store.metrics;
        let mut state = self.store.lock();
        let emit = state.events.enabled();
        let (mut n, mut dedups, mut duplicates) = (0, 0, 0);
        // (hash, parent) of the hashes this call made matchable, for events.
        let mut stored = Vec::new();
        for block in blocks {
            let staged = block.into_parts();
            let (id, outcome) = state.register(
                staged.id,
                staged.hash,
                staged.parent,
                staged.retention,
                policy,
            );
            n += 1;
            match outcome {
                Registered::New if emit => stored.push((staged.hash, staged.parent)),
                Registered::New => {}
                Registered::Deduplicated => dedups += 1,
                Registered::Duplicate => duplicates += 1,
            }
            out(ImmutableBlock::new(staged.store, id, staged.hash));
        }
        metrics.add_registrations(n, dedups, duplicates);
        metrics.add_stagings(n);
        if emit {
            let events = events::stored_events(T::NAME, stored);
            state.events.publish(self.store.id, events, metrics);
        }
    }

    /// Prefix match: walks `hashes` in order and returns a handle for each registered one,
    /// stopping at the first miss. Inactive blocks are resurrected (taken out of the inactive
    /// pool). One lock acquisition for the whole walk; each hit counts as an access for
    /// frequency tracking.
    ///
    /// ```
    /// use kvbm_logical::{BlockManager, Device, ImmutableBlock, SequenceHash};
    /// let m = BlockManager::<Device>::builder().block_count(8).block_size(16).build()?;
    /// let [a, b, c] = [1, 2, 3].map(SequenceHash::new);
    /// let staged = m
    ///     .allocate_blocks(2)?
    ///     .into_iter()
    ///     .zip([a, c])
    ///     .map(|(blk, h)| blk.stage(h, 16))
    ///     .collect::<Result<Vec<_>, _>>()?;
    /// let held = m.register_blocks(staged)?;
    /// let hits = m.match_blocks(&[a, b, c]);
    /// assert_eq!(hits.len(), 1); // stops at `b`, although `c` is present
    /// assert_eq!(hits[0].sequence_hash(), a);
    /// # drop(held);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn match_blocks(&self, hashes: &[SequenceHash]) -> Vec<ImmutableBlock<T>> {
        let mut found = Vec::with_capacity(hashes.len());
        if hashes.is_empty() {
            return found;
        }
        {
            let mut state = self.store.lock();
            for &hash in hashes {
                match state.lookup_acquire(hash) {
                    Some(id) => found.push(ImmutableBlock::new(Arc::clone(&self.store), id, hash)),
                    None => break,
                }
            }
        }
        self.store.metrics.add_match(hashes.len(), found.len());
        self.store
            .record_accesses(found.iter().map(ImmutableBlock::sequence_hash));
        found
    }

    /// Scatter scan: a handle for every registered hash among `hashes`, in input order,
    /// skipping misses (a repeated hash yields one handle per occurrence). One lock
    /// acquisition.
    ///
    /// With `touch`, the scan is an access like [`match_blocks`](Self::match_blocks): inactive
    /// hits are taken out of the inactive pool, re-enter it as the most recently used when
    /// released, and count as accesses for frequency tracking.
    ///
    /// Without `touch` the scan leaves no trace (for an offload engine looking for blocks to
    /// copy, for example): no access is recorded, and an inactive hit keeps its place in the
    /// eviction order. While a returned handle (or a clone of it) holds such a block it is
    /// active, so it cannot be evicted, and it is not counted as inactive; once released it is
    /// inactive again, **in the place it had**, as if the scan had not happened. Only two
    /// things can move it meanwhile: another acquisition of the same block (a match, a touching
    /// scan, an upgrade, a pin, a `Reject` duplicate registration) treats it as used, as usual;
    /// and an allocation whose eviction order reaches it while it is held passes it over and
    /// takes it out of the pool, so it returns as the most recently used (it would have been
    /// evicted otherwise).
    ///
    /// ```
    /// use kvbm_logical::{BlockManager, Device, SequenceHash};
    /// let m = BlockManager::<Device>::builder().block_count(8).block_size(16).build()?;
    /// let [a, b, c] = [1, 2, 3].map(SequenceHash::new);
    /// let staged = m
    ///     .allocate_blocks(2)?
    ///     .into_iter()
    ///     .zip([a, c])
    ///     .map(|(blk, h)| blk.stage(h, 16))
    ///     .collect::<Result<Vec<_>, _>>()?;
    /// let held = m.register_blocks(staged)?;
    /// let hits = m.scan_matches(&[a, b, c], false);
    /// let found: Vec<_> = hits.iter().map(|h| h.sequence_hash()).collect();
    /// assert_eq!(found, vec![a, c]);
    /// # drop(held);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// A scan without `touch` does not change which block is evicted next:
    ///
    /// ```
    /// use kvbm_logical::{BlockManager, Device, ImmutableBlock, SequenceHash};
    /// let m = BlockManager::<Device>::builder().block_count(2).block_size(16).build()?;
    /// let [old, new] = [1, 2].map(SequenceHash::new);
    /// let staged = m
    ///     .allocate_blocks(2)?
    ///     .into_iter()
    ///     .zip([old, new])
    ///     .map(|(b, h)| b.stage(h, 16))
    ///     .collect::<Result<Vec<_>, _>>()?;
    /// ImmutableBlock::release_all(m.register_blocks(staged)?); // `old` is the LRU victim
    /// let copy = m.scan_matches(&[old], false);
    /// assert_eq!(m.counts().inactive, 1); // `old` is held, so not inactive
    /// drop(copy);
    /// let (_block, evicted) = m.allocate_blocks_with_evictions(1)?;
    /// assert_eq!(evicted, vec![old]); // still the victim
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn scan_matches(&self, hashes: &[SequenceHash], touch: bool) -> Vec<ImmutableBlock<T>> {
        let mut found = Vec::with_capacity(hashes.len());
        if hashes.is_empty() {
            return found;
        }
        {
            let mut state = self.store.lock();
            for &hash in hashes {
                let hit = if touch {
                    state.lookup_acquire(hash)
                } else {
                    state.lookup_acquire_in_place(hash)
                };
                if let Some(id) = hit {
                    found.push(ImmutableBlock::new(Arc::clone(&self.store), id, hash));
                }
            }
        }
        self.store.metrics.add_scan(hashes.len(), found.len());
        if touch {
            self.store
                .record_accesses(found.iter().map(ImmutableBlock::sequence_hash));
        }
        found
    }

    /// Records an access to each inactive block among `hashes` without taking ownership: the
    /// eviction policy treats them as just used (LRU moves them to the most recently used
    /// end), and frequency tracking counts every registered hash. For a scheduler that knows
    /// which prefixes queued requests will need. Returns how many inactive blocks were
    /// touched. One lock acquisition.
    ///
    /// ```
    /// use kvbm_logical::{BlockManager, Device, ImmutableBlock, SequenceHash};
    /// let m = BlockManager::<Device>::builder().block_count(2).block_size(16).build()?;
    /// let [old, new] = [1, 2].map(SequenceHash::new);
    /// let staged = m
    ///     .allocate_blocks(2)?
    ///     .into_iter()
    ///     .zip([old, new])
    ///     .map(|(b, h)| b.stage(h, 16))
    ///     .collect::<Result<Vec<_>, _>>()?;
    /// ImmutableBlock::release_all(m.register_blocks(staged)?);
    /// assert_eq!(m.touch_blocks(&[old]), 1); // `old` is now the most recently used
    /// let (_block, evicted) = m.allocate_blocks_with_evictions(1)?;
    /// assert_eq!(evicted, vec![new]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn touch_blocks(&self, hashes: &[SequenceHash]) -> usize {
        // Count the accesses first, so that a frequency-aware policy sees them when it
        // re-files the touched blocks.
        self.store.record_accesses(hashes.iter().copied());
        let mut state = self.store.lock();
        hashes.iter().filter(|&&h| state.touch(h)).count()
    }

    /// Whether a block is registered under `hash`, active or inactive. Unlike
    /// [`match_blocks`](Self::match_blocks) it takes no handle, changes no eviction order and
    /// records no access: for a tiered manager asking "is this already stored here?".
    ///
    /// ```
    /// use kvbm_logical::{BlockManager, Host, SequenceHash};
    /// let m = BlockManager::<Host>::builder().block_count(2).block_size(16).build()?;
    /// let staged = m.allocate_blocks(1)?.pop().unwrap().stage(SequenceHash::new(5), 16)?;
    /// drop(m.register_block(staged)?); // inactive now, still registered
    /// assert!(m.contains(SequenceHash::new(5)));
    /// assert!(!m.contains(SequenceHash::new(6)));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn contains(&self, hash: SequenceHash) -> bool {
        self.store.lock().is_registered(hash)
    }

    /// [`contains`](Self::contains) for each hash, under one lock acquisition.
    ///
    /// ```
    /// use kvbm_logical::{BlockManager, Host, SequenceHash};
    /// let m = BlockManager::<Host>::builder().block_count(2).block_size(16).build()?;
    /// let staged = m.allocate_blocks(1)?.pop().unwrap().stage(SequenceHash::new(5), 16)?;
    /// drop(m.register_block(staged)?);
    /// let found = m.contains_each(&[SequenceHash::new(6), SequenceHash::new(5)]);
    /// assert_eq!(found, vec![false, true]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn contains_each(&self, hashes: &[SequenceHash]) -> Vec<bool> {
        let state = self.store.lock();
        hashes.iter().map(|&h| state.is_registered(h)).collect()
    }

    /// Keeps the blocks registered under `hashes` out of eviction until
    /// [`unpin`](Self::unpin)ned: a pin holds a reference, so a pinned block stays active
    /// (and matchable) even when no request holds it. For system prompts and other prefixes
    /// that must stay resident.
    ///
    /// All or nothing, under one lock acquisition: every hash must be registered, and the
    /// pinned total may not exceed the budget set with
    /// [`BlockManagerBuilder::max_pinned_fraction`] (none by default). Pinning a pinned
    /// block again does nothing. Returns how many blocks were newly pinned. Under policy
    /// `Allow`, the block pinned is the one `match_blocks` returns.
    ///
    /// ```
    /// use kvbm_logical::{BlockManager, Device, ImmutableBlock, PinError, SequenceHash};
    /// let m = BlockManager::<Device>::builder()
    ///     .block_count(4)
    ///     .block_size(16)
    ///     .max_pinned_fraction(0.5) // at most 2 pinned blocks
    ///     .build()?;
    /// let hashes = [1, 2, 3].map(SequenceHash::new);
    /// let staged = m
    ///     .allocate_blocks(3)?
    ///     .into_iter()
    ///     .zip(hashes)
    ///     .map(|(b, h)| b.stage(h, 16))
    ///     .collect::<Result<Vec<_>, _>>()?;
    /// ImmutableBlock::release_all(m.register_blocks(staged)?);
    /// assert_eq!(m.pin(&hashes[..2])?, 2);
    /// assert!(matches!(m.pin(&hashes[2..]), Err(PinError::BudgetExceeded { budget: 2, .. })));
    /// // Only the unpinned block and the free one can be allocated now.
    /// assert_eq!(m.available_blocks(), 2);
    /// assert_eq!(m.unpin(&hashes), 2);
    /// assert_eq!(m.available_blocks(), 4);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// [`BlockManagerBuilder::max_pinned_fraction`]: crate::BlockManagerBuilder::max_pinned_fraction
    pub fn pin(&self, hashes: &[SequenceHash]) -> Result<usize, PinError> {
        let budget = self.store.pin_budget;
        let result = self.store.lock().pin(hashes, budget);
        result.map_err(|refusal| match refusal {
            PinRefusal::NotRegistered(hash) => PinError::NotRegistered { hash },
            PinRefusal::OverBudget { requested, pinned } => PinError::BudgetExceeded {
                requested,
                pinned,
                budget,
            },
        })
    }

    /// Releases the pins on the blocks registered under `hashes` (they become inactive, or
    /// stay active if requests hold them); returns how many were pinned. Hashes that are not
    /// pinned are ignored.
    pub fn unpin(&self, hashes: &[SequenceHash]) -> usize {
        self.store.lock().unpin(hashes)
    }

    /// Releases every pin; returns how many. O(total blocks).
    pub fn unpin_all(&self) -> usize {
        self.store.lock().unpin_all()
    }

    /// The most blocks that may be pinned at once.
    pub fn pin_budget(&self) -> usize {
        self.store.pin_budget
    }

    /// Removes the **inactive** blocks registered under `hashes` from the cache (to the reset
    /// pool), for example when the adapter or the data they were computed from is gone.
    /// Blocks held by handles or pins are left alone. Emits `Removed` with reason
    /// `Invalidated` for each hash that left the cache. Returns how many blocks moved.
    ///
    /// ```
    /// use kvbm_logical::{BlockManager, Device, ImmutableBlock, SequenceHash};
    /// let m = BlockManager::<Device>::builder().block_count(2).block_size(16).build()?;
    /// let hash = SequenceHash::new(5);
    /// let block = m.allocate_blocks(1)?.pop().unwrap().stage(hash, 16)?;
    /// drop(m.register_block(block)?);
    /// assert_eq!(m.invalidate_blocks(&[hash]), 1);
    /// assert!(m.match_blocks(&[hash]).is_empty());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn invalidate_blocks(&self, hashes: &[SequenceHash]) -> usize {
        let mut state = self.store.lock();
        let emit = state.events.enabled();
        let mut gone = Vec::new();
        let mut moved = 0;
        for &hash in hashes {
            let (n, left) = state.invalidate(hash);
            moved += n;
            if left && emit {
                gone.push(hash);
            }
        }
        self.store
            .metrics
            .add_removals(RemovalReason::Invalidated, moved);
        if let Some(event) = events::removed_event(gone, RemovalReason::Invalidated) {
            state
                .events
                .publish(self.store.id, [event], &self.store.metrics);
        }
        moved
    }

    /// Subscribes to this manager's [`KvEvent`](crate::KvEvent)s; `capacity` is how many
    /// batches (one per public call) may wait before further ones are dropped and counted.
    /// See [`events`](crate::events).
    pub fn subscribe(&self, capacity: usize) -> EventSubscriber {
        self.store.lock().events.subscribe(capacity)
    }

    /// This manager's counters and gauges.
    pub fn metrics(&self) -> &BlockMetrics {
        &self.store.metrics
    }

    /// Moves every inactive block to the reset pool, forgetting its hash (for example after a
    /// weight update makes the cache stale). Returns how many blocks moved.
    ///
    /// Blocks held by handles cannot be reset: if any remain, the inactive pool is still
    /// emptied and [`ResetError::BlocksInUse`] says how many are held, so the caller can
    /// retry once they are released.
    ///
    /// ```
    /// use kvbm_logical::{BlockManager, Device, ImmutableBlock, ResetError, SequenceHash};
    /// let m = BlockManager::<Device>::builder().block_count(4).block_size(16).build()?;
    /// let staged = m
    ///     .allocate_blocks(2)?
    ///     .into_iter()
    ///     .zip([1, 2])
    ///     .map(|(b, h)| b.stage(SequenceHash::new(h), 16))
    ///     .collect::<Result<Vec<_>, _>>()?;
    /// let mut blocks = m.register_blocks(staged)?;
    /// let held = blocks.pop().unwrap();
    /// ImmutableBlock::release_all(blocks);
    /// assert_eq!(
    ///     m.reset_inactive_pool(),
    ///     Err(ResetError::BlocksInUse { moved: 1, in_use: 1, total: 4 })
    /// );
    /// drop(held);
    /// assert_eq!(m.reset_inactive_pool(), Ok(1));
    /// assert!(m.match_blocks(&[SequenceHash::new(2)]).is_empty());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn reset_inactive_pool(&self) -> Result<usize, ResetError> {
        let (moved, counts) = {
            let mut state = self.store.lock();
            let emit = state.events.enabled();
            let mut gone = Vec::new();
            let moved = state.reset_inactive(emit.then_some(&mut gone));
            self.store.metrics.add_removals(RemovalReason::Reset, moved);
            if emit {
                let removed = events::removed_event(gone, RemovalReason::Reset);
                let cleared = state.registry_is_empty().then_some(KvEventKind::Cleared);
                let events = removed.into_iter().chain(cleared);
                state
                    .events
                    .publish(self.store.id, events, &self.store.metrics);
            }
            (moved, state.counts())
        };
        let total = self.store.total;
        if counts.reset + counts.inactive + counts.in_flight() != total {
            tracing::error!(?counts, "block counts do not add up");
            return Err(ResetError::CountMismatch { counts });
        }
        match counts.in_flight() {
            0 => Ok(moved),
            in_use => Err(ResetError::BlocksInUse {
                moved,
                in_use,
                total,
            }),
        }
    }

    /// Blocks an allocation could take now (reset + inactive), read under one lock.
    pub fn available_blocks(&self) -> usize {
        self.store.lock().available()
    }

    /// Where every block is, as one coherent snapshot.
    pub fn counts(&self) -> PoolCounts {
        self.store.lock().counts()
    }

    /// Recounts every slot and checks the store's invariants (each block in exactly one
    /// place, counts conserved, registry and eviction lists well linked). O(total blocks),
    /// under the lock: meant for tests, debugging and health checks, not the hot path.
    ///
    /// ```
    /// use kvbm_logical::{BlockManager, Device};
    /// let m = BlockManager::<Device>::builder().block_count(16).block_size(16).build()?;
    /// let _held = m.allocate_blocks(5)?;
    /// let counts = m.check_invariants()?;
    /// assert_eq!(counts.mutable, 5);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn check_invariants(&self) -> Result<PoolCounts, InvariantError> {
        self.store.lock().check_invariants()
    }

    /// Estimated recent accesses (0..=15) to `hash`; `None` without frequency tracking.
    pub fn frequency(&self, hash: SequenceHash) -> Option<u32> {
        self.store
            .frequency
            .as_ref()
            .map(|sketch| u32::from(sketch.estimate(hash)))
    }

    /// Blocks managed.
    pub fn total_blocks(&self) -> usize {
        self.store.total
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.store.block_size
    }

    /// This manager's process-unique id.
    pub fn id(&self) -> ManagerId {
        self.store.id
    }

    /// The duplication policy.
    pub fn duplication_policy(&self) -> BlockDuplicationPolicy {
        self.store.duplication
    }

    /// The eviction backend.
    pub fn eviction_backend(&self) -> EvictionBackend {
        self.store.backend
    }
}

impl<T: BlockTier> Clone for BlockManager<T> {
    /// Another handle to the same manager (same id, same blocks).
    fn clone(&self) -> Self {
        Self {
            store: Arc::clone(&self.store),
            _tier: PhantomData,
        }
    }
}

impl<T: BlockTier> fmt::Debug for BlockManager<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockManager")
            .field("id", &self.store.id)
            .field("tier", &T::NAME)
            .field("total_blocks", &self.store.total)
            .field("block_size", &self.store.block_size)
            .field("eviction", &self.store.backend)
            .field("duplication", &self.store.duplication)
            .finish()
    }
}
