//! The public face of one tier's pool: [`BlockManager`].

mod builder;

pub use builder::{BlockManagerBuilder, MAX_BLOCK_SIZE, MAX_BLOCKS};

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use crate::blocks::{CompleteBlock, ImmutableBlock, MutableBlock};
use crate::error::{AllocationError, InvariantError, PinError, RegisterError, ResetError};
use crate::events::{self, CacheSnapshot, EventSubscriber, RemovalReason};
use crate::hashing::SequenceHash;
use crate::ids::ManagerId;
use crate::metrics::{BlockMetrics, MetricsCollector};
use crate::policy::EvictionBackend;
use crate::store::{
    BlockDuplicationPolicy, BlockStore, Evicted, PinRefusal, PoolCounts, Registered,
};
use crate::tier::BlockTier;

/// How many blocks ahead of its work a batch registration prefetches.
const PREFETCH_AHEAD: usize = 8;

/// Blocks to register, with a look at those still to come (for prefetching).
trait Upcoming<T: BlockTier>: Iterator<Item = CompleteBlock<T>> {
    /// The block `next` will return after `k` more calls (`k = 0`: the next one), if known.
    fn upcoming(&self, k: usize) -> Option<&CompleteBlock<T>>;
}

impl<T: BlockTier> Upcoming<T> for std::vec::IntoIter<CompleteBlock<T>> {
    fn upcoming(&self, k: usize) -> Option<&CompleteBlock<T>> {
        self.as_slice().get(k)
    }
}

impl<T: BlockTier> Upcoming<T> for std::iter::Once<CompleteBlock<T>> {
    fn upcoming(&self, _: usize) -> Option<&CompleteBlock<T>> {
        None
    }
}

/// What [`BlockManager::probe_prefix`] found: the leading hashes a
/// [`match_blocks`](BlockManager::match_blocks) of the same hashes would return now, split by
/// whether another handle already holds them.
///
/// ```
/// use kvbm_logical::PrefixProbe;
/// let p = PrefixProbe::default();
/// assert_eq!((p.hits(), p.active, p.inactive), (0, 0, 0));
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct PrefixProbe {
    /// Hits held by some handle or pin (matching them takes no free block).
    pub active: usize,
    /// Hits in the inactive pool: matching them takes them out of it, so this is how many
    /// free (allocatable) blocks the match would consume.
    pub inactive: usize,
}

impl PrefixProbe {
    /// Length of the cached prefix: `active + inactive`.
    pub fn hits(&self) -> usize {
        self.active + self.inactive
    }
}

/// What [`BlockManager::purge_blocks`] did.
///
/// ```
/// use kvbm_logical::Purge;
/// assert_eq!(Purge::default().total(), 0);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Purge {
    /// Inactive blocks moved to the reset pool now.
    pub reset: usize,
    /// Held blocks detached from the cache: no longer matchable, they go to the reset pool
    /// when their last owner releases them.
    pub detached: usize,
}

impl Purge {
    /// Blocks that left the cache: `reset + detached`.
    pub fn total(&self) -> usize {
        self.reset + self.detached
    }
}

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
        let mut blocks = Vec::with_capacity(count.min(self.store.total));
        self.allocate_into(count, None, RemovalReason::Evicted, |b| blocks.push(b))
            .map(|()| blocks)
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
        self.allocate_blocks_evicting_as(count, RemovalReason::Evicted)
    }

    /// [`allocate_blocks_evicting`](Self::allocate_blocks_evicting), reporting the evictions
    /// with `reason` (in the `Removed` event and the `kvbm_block_removals` counter) instead of
    /// [`RemovalReason::Evicted`]: an offload engine that copies the evicted blocks to a lower
    /// tier reports them [`Demoted`](RemovalReason::Demoted).
    ///
    /// ```
    /// use kvbm_logical::{BlockManager, Host, KvEventKind, RemovalReason, SequenceHash};
    /// let m = BlockManager::<Host>::builder().block_count(1).block_size(16).build()?;
    /// drop(m.register_block(m.allocate_blocks(1)?.pop().unwrap().stage(SequenceHash::new(7), 16)?)?);
    /// let events = m.subscribe(4);
    /// let (_blocks, evicted) = m.allocate_blocks_evicting_as(1, RemovalReason::Demoted)?;
    /// assert_eq!(evicted.len(), 1);
    /// assert!(matches!(events.try_recv().unwrap()[0].kind,
    ///     KvEventKind::Removed { reason: RemovalReason::Demoted, .. }));
    /// assert_eq!(m.metrics().snapshot().removed_demoted, 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn allocate_blocks_evicting_as(
        &self,
        count: usize,
        reason: RemovalReason,
    ) -> Result<(Vec<MutableBlock<T>>, Vec<Evicted>), AllocationError> {
        let mut evicted = Vec::new();
        let mut blocks = Vec::with_capacity(count.min(self.store.total));
        self.allocate_into(count, Some(&mut evicted), reason, |b| blocks.push(b))?;
        Ok((blocks, evicted))
    }

    /// Evicts up to `max` **inactive** blocks, in the eviction policy's order, and hands each
    /// slot back as a mutable block with its record (aligned: `out[i].0.block_id() ==
    /// out[i].1.block_id`). Unlike an allocation it never takes a free block from the reset
    /// pool, so a background reclaimer cannot starve a concurrent allocation of free blocks.
    /// Each slot still holds the evicted bytes until written. Returns fewer than `max` when
    /// fewer are inactive (none: an empty `Vec`).
    ///
    /// The evictions are reported with `reason` (a `Removed` event for the hashes that left the
    /// cache, and the removal counter of that reason): [`RemovalReason::Demoted`] for a
    /// write-back offload, [`RemovalReason::Evicted`] otherwise. Every evicted slot is
    /// listed, including a duplicate whose hash stays cached under policy `Allow`.
    ///
    /// ```
    /// use kvbm_logical::{BlockManager, Device, ImmutableBlock, RemovalReason, SequenceHash};
    /// let m = BlockManager::<Device>::builder().block_count(4).block_size(16).build()?;
    /// let staged = m
    ///     .allocate_blocks(2)?
    ///     .into_iter()
    ///     .zip([1, 2])
    ///     .map(|(b, h)| b.stage(SequenceHash::new(h), 16))
    ///     .collect::<Result<Vec<_>, _>>()?;
    /// ImmutableBlock::release_all(m.register_blocks(staged)?);
    /// let taken = m.evict_inactive(8, RemovalReason::Demoted);
    /// assert_eq!(taken.len(), 2); // only the inactive ones; the 2 free blocks stay free
    /// assert_eq!(taken[0].0.block_id(), taken[0].1.block_id);
    /// assert_eq!(m.counts().reset, 2);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn evict_inactive(
        &self,
        max: usize,
        reason: RemovalReason,
    ) -> Vec<(MutableBlock<T>, Evicted)> {
        let mut out = Vec::new();
        if max == 0 {
            return out;
        }
        let mut state = self.store.lock();
        let emit = state.events.enabled();
        let mut gone = std::mem::take(&mut state.scratch_hashes);
        out.reserve(max.min(state.counts().inactive));
        let n = state.evict_inactive(max, |e, left| {
            if left && emit {
                gone.push(e.hash);
            }
            out.push((MutableBlock::new(Arc::clone(&self.store), e.block_id), e));
        });
        let metrics = &self.store.metrics;
        metrics.add_allocations(0, n);
        metrics.add_removals(reason, n);
        state.announce_removed(&mut gone, reason, metrics);
        state.scratch_hashes = gone;
        drop(state);
        out
    }

    /// Allocates `count` blocks into `out`, all or nothing; evictions are reported with
    /// `reason`, and their records appended to `evicted` if given. On `Err` nothing was
    /// taken (`out` was not called), except with an eviction policy that breaks its contract
    /// (a bug): then the blocks already passed to `out` are the caller's to drop.
    pub(crate) fn allocate_into(
        &self,
        count: usize,
        evicted: Option<&mut Vec<Evicted>>,
        reason: RemovalReason,
        mut out: impl FnMut(MutableBlock<T>),
    ) -> Result<(), AllocationError> {
        let total = self.store.total;
        if count > total {
            return Err(AllocationError::Exhausted {
                requested: count,
                available: self.available_blocks(),
                total,
            });
        }
        if count == 0 {
            return Ok(());
        }
        let result = {
            let mut state = self.store.lock();
            let emit = state.events.enabled();
            // Evicted hashes are collected only when someone wants them; for events alone,
            // into a reused buffer.
            let mut gone = match evicted {
                Some(_) => Vec::new(),
                None => std::mem::take(&mut state.scratch_evicted),
            };
            let want = evicted.is_some() || emit;
            let result = state.allocate(count, want.then_some(&mut gone), |id| {
                out(MutableBlock::new(Arc::clone(&self.store), id));
            });
            if let Ok(from_eviction) = result {
                let metrics = &self.store.metrics;
                metrics.add_allocations(count - from_eviction, from_eviction);
                metrics.add_removals(reason, from_eviction);
                if emit && !gone.is_empty() {
                    for e in &gone {
                        state.events.removed(e.hash, reason);
                    }
                    state.events.commit(metrics);
                }
            }
            match evicted {
                Some(evicted) if result.is_ok() => *evicted = gone,
                Some(_) => {}
                None => {
                    gone.clear();
                    state.scratch_evicted = gone;
                }
            }
            result
        };
        result
            .map(|_| ())
            .map_err(|available| AllocationError::Exhausted {
                requested: count,
                available,
                total,
            })
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
        self.register_own(blocks.into_iter(), |handle| registered.push(handle));
        self.store
            .record_accesses(registered.iter().map(ImmutableBlock::sequence_hash));
        Ok(registered)
    }

    /// Registers blocks of this manager under one lock acquisition, passing each handle to
    /// `out` in order; counts the registrations and publishes the `Stored` events. `out` runs
    /// under the lock, so it must not drop handles.
    fn register_own(&self, mut blocks: impl Upcoming<T>, mut out: impl FnMut(ImmutableBlock<T>)) {
        let policy = self.store.duplication;
        let metrics = &self.store.metrics;
        let mut state = self.store.lock();
        let emit = state.events.enabled();
        let (mut n, mut dedups, mut duplicates) = (0, 0, 0);
        for k in 0..PREFETCH_AHEAD {
            if let Some(b) = blocks.upcoming(k) {
                state.prefetch_register(b.block_id(), b.sequence_hash());
            }
        }
        while let Some(block) = blocks.next() {
            // The block `PREFETCH_AHEAD` on: its cache misses overlap this one's work.
            if let Some(b) = blocks.upcoming(PREFETCH_AHEAD - 1) {
                state.prefetch_register(b.block_id(), b.sequence_hash());
            }
            let staged = block.into_parts();
            let (id, outcome) = state.register(
                staged.id,
                staged.hash,
                staged.parent,
                staged.retention,
                policy,
                staged.reset_on_release,
            );
            n += 1;
            match outcome {
                Registered::New if emit => {
                    state
                        .events
                        .stored(staged.hash, staged.parent, staged.tokens.as_deref());
                }
                Registered::New => {}
                Registered::Deduplicated => dedups += 1,
                Registered::Duplicate => duplicates += 1,
            }
            out(ImmutableBlock::new(staged.store, id, staged.hash));
        }
        metrics.add_registrations(n, dedups, duplicates);
        metrics.add_stagings(n);
        if emit {
            state.events.commit(metrics);
        }
    }

    /// Registers blocks of this manager under one lock acquisition, each with its token ids
    /// (they go into the `Stored` events, copied only if someone subscribes);
    /// `reset_on_release` as [`CompleteBlock::reset_on_release`]. Passes each handle to `out`
    /// in order, with whether it is another slot than the block's (policy `Reject` handed
    /// back an existing block). `out` runs under the lock, so it must not drop handles.
    pub(crate) fn register_token_blocks<'a>(
        &self,
        blocks: impl IntoIterator<Item = (CompleteBlock<T>, &'a [u32])>,
        reset_on_release: bool,
        mut out: impl FnMut(ImmutableBlock<T>, bool),
    ) {
        let policy = self.store.duplication;
        let metrics = &self.store.metrics;
        let mut state = self.store.lock();
        let emit = state.events.enabled();
        let (mut n, mut dedups, mut duplicates) = (0, 0, 0);
        for (block, tokens) in blocks {
            let staged = block.into_parts();
            let (id, outcome) = state.register(
                staged.id,
                staged.hash,
                staged.parent,
                staged.retention,
                policy,
                reset_on_release,
            );
            n += 1;
            match outcome {
                Registered::New if emit => {
                    state
                        .events
                        .stored(staged.hash, staged.parent, Some(tokens));
                }
                Registered::New => {}
                Registered::Deduplicated => dedups += 1,
                Registered::Duplicate => duplicates += 1,
            }
            if let Some(sketch) = &self.store.frequency {
                sketch.increment_all(std::iter::once(staged.hash));
            }
            out(
                ImmutableBlock::new(staged.store, id, staged.hash),
                id != staged.id,
            );
        }
        metrics.add_registrations(n, dedups, duplicates);
        metrics.add_stagings(n);
        if emit {
            state.events.commit(metrics);
        }
    }

    /// The store, for the request type.
    pub(crate) fn store(&self) -> &Arc<BlockStore> {
        &self.store
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
        let found = self.take(hashes, true, true);
        self.store.metrics.add_match(hashes.len(), found.len());
        self.store
            .record_accesses(found.iter().map(ImmutableBlock::sequence_hash));
        found
    }

    /// A read-only probe of the prefix `hashes`: how many leading hashes a
    /// [`match_blocks`](Self::match_blocks) would return now, how many of those are already
    /// held (active) and how many are inactive (matching them would consume that many free
    /// blocks). It changes nothing: no handle, no eviction order, no frequency access, no
    /// metric. One lock acquisition.
    ///
    /// ```
    /// use kvbm_logical::{BlockManager, Device, ImmutableBlock, SequenceHash};
    /// let m = BlockManager::<Device>::builder().block_count(4).block_size(16).build()?;
    /// let [a, b, c] = [1, 2, 3].map(SequenceHash::new);
    /// let mut blocks = m
    ///     .register_blocks(
    ///         m.allocate_blocks(2)?
    ///             .into_iter()
    ///             .zip([a, b])
    ///             .map(|(blk, h)| blk.stage(h, 16))
    ///             .collect::<Result<Vec<_>, _>>()?,
    ///     )?;
    /// drop(blocks.pop()); // `b` is inactive, `a` still held
    /// let probe = m.probe_prefix(&[a, b, c]);
    /// assert_eq!((probe.hits(), probe.active, probe.inactive), (2, 1, 1));
    /// assert_eq!(m.counts().inactive, 1); // unchanged
    /// assert_eq!(m.metrics().snapshot().match_requested, 0);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn probe_prefix(&self, hashes: &[SequenceHash]) -> PrefixProbe {
        if hashes.is_empty() {
            return PrefixProbe::default();
        }
        let probed = self.store.lock().probe_prefix(hashes);
        PrefixProbe {
            active: probed.active,
            inactive: probed.inactive,
        }
    }

    /// Scattered match: one entry per input hash, aligned with `hashes`, `Some(handle)` where
    /// the hash is registered (Dynamo's `match_blocks_scattered`). Unlike
    /// [`match_blocks`](Self::match_blocks) it does not stop at the first miss. Each hit is an
    /// access, as with `match_blocks`: inactive hits are taken out of the inactive pool and
    /// counted for frequency tracking; the hashes count as match lookups. One lock
    /// acquisition. (For a lookup without any side effect see
    /// [`scan_matches`](Self::scan_matches) without `touch`, or
    /// [`probe_prefix`](Self::probe_prefix).)
    ///
    /// ```
    /// use kvbm_logical::{BlockManager, Device, SequenceHash};
    /// let m = BlockManager::<Device>::builder().block_count(4).block_size(16).build()?;
    /// let [a, b, c] = [1, 2, 3].map(SequenceHash::new);
    /// let held = m.register_blocks(
    ///     m.allocate_blocks(2)?
    ///         .into_iter()
    ///         .zip([a, c])
    ///         .map(|(blk, h)| blk.stage(h, 16))
    ///         .collect::<Result<Vec<_>, _>>()?,
    /// )?;
    /// let found = m.match_blocks_scattered(&[a, b, c]);
    /// let hit: Vec<bool> = found.iter().map(Option::is_some).collect();
    /// assert_eq!(hit, vec![true, false, true]);
    /// assert_eq!(found[2].as_ref().map(|h| h.sequence_hash()), Some(c));
    /// # drop(held);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn match_blocks_scattered(
        &self,
        hashes: &[SequenceHash],
    ) -> Vec<Option<ImmutableBlock<T>>> {
        let mut found = Vec::with_capacity(hashes.len());
        if hashes.is_empty() {
            return found;
        }
        let mut hits = 0;
        {
            let mut state = self.store.lock();
            let mut walk = state.walk::<true>(hashes);
            for (i, &hash) in hashes.iter().enumerate() {
                let probe = walk.step(&state, i);
                let hit = state
                    .lookup_acquire(probe)
                    .map(|id| ImmutableBlock::new(Arc::clone(&self.store), id, hash));
                hits += usize::from(hit.is_some());
                found.push(hit);
            }
        }
        self.store.metrics.add_match(hashes.len(), hits);
        self.store
            .record_accesses(found.iter().flatten().map(ImmutableBlock::sequence_hash));
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
        self.scan(hashes, touch, false)
    }

    /// [`scan_matches`](Self::scan_matches) without `touch` that stops at the first hash not
    /// registered, as [`match_blocks`](Self::match_blocks) does, but without its side
    /// effects: the registered prefix of `hashes`, held in place (no access recorded, no
    /// eviction order changed). For a tier stack's lookup, which holds a lower tier's
    /// prefix until the onboard copies it.
    ///
    /// ```
    /// use kvbm_logical::{BlockManager, Device, ImmutableBlock, SequenceHash};
    /// let m = BlockManager::<Device>::builder().block_count(4).block_size(16).build()?;
    /// let [a, b, c] = [1, 2, 3].map(SequenceHash::new);
    /// let staged = m
    ///     .allocate_blocks(2)?
    ///     .into_iter()
    ///     .zip([a, c])
    ///     .map(|(blk, h)| blk.stage(h, 16))
    ///     .collect::<Result<Vec<_>, _>>()?;
    /// ImmutableBlock::release_all(m.register_blocks(staged)?);
    /// let prefix = m.scan_prefix(&[a, b, c]);
    /// assert_eq!(prefix.len(), 1); // `b` is missing: `c` is not taken
    /// assert_eq!(m.counts().inactive, 1); // `a` is held, in its place
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn scan_prefix(&self, hashes: &[SequenceHash]) -> Vec<ImmutableBlock<T>> {
        self.scan(hashes, false, true)
    }

    fn scan(&self, hashes: &[SequenceHash], touch: bool, prefix: bool) -> Vec<ImmutableBlock<T>> {
        let found = self.take(hashes, touch, prefix);
        self.store.metrics.add_scan(hashes.len(), found.len());
        if touch {
            self.store
                .record_accesses(found.iter().map(ImmutableBlock::sequence_hash));
        }
        found
    }

    /// The handles of the blocks registered under `hashes`, in order, under one lock: each
    /// hit acquired (`touch`: out of the inactive pool, as a use) or held in place; a miss
    /// ends the walk with `prefix`, else is skipped. Counts nothing (the callers count a
    /// match or a scan).
    fn take(&self, hashes: &[SequenceHash], touch: bool, prefix: bool) -> Vec<ImmutableBlock<T>> {
        let mut found = Vec::with_capacity(hashes.len());
        if hashes.is_empty() {
            return found;
        }
        let mut state = self.store.lock();
        let mut walk = state.walk::<true>(hashes);
        for (i, &hash) in hashes.iter().enumerate() {
            let probe = walk.step(&state, i);
            let hit = if touch {
                state.lookup_acquire(probe)
            } else {
                state.lookup_acquire_in_place(probe)
            };
            match hit {
                Some(id) => found.push(ImmutableBlock::new(Arc::clone(&self.store), id, hash)),
                None if prefix => break,
                None => {}
            }
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
        let mut walk = state.walk::<true>(hashes);
        (0..hashes.len())
            .filter(|&i| {
                let probe = walk.step(&state, i);
                state.touch(probe)
            })
            .count()
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
        let state = self.store.lock();
        state.is_registered(state.probe(hash))
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
        let mut walk = state.walk::<false>(hashes);
        (0..hashes.len())
            .map(|i| state.is_registered(walk.step(&state, i)))
            .collect()
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
        let mut gone = std::mem::take(&mut state.scratch_hashes);
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
        state.announce_removed(&mut gone, RemovalReason::Invalidated, &self.store.metrics);
        state.scratch_hashes = gone;
        moved
    }

    /// Removes the blocks registered under `hashes` from the cache **whether or not they are
    /// held**: for a block whose data is known to be bad (a corrupt copy) and must stop being
    /// served. Inactive blocks go to the reset pool now, as with
    /// [`invalidate_blocks`](Self::invalidate_blocks). A held block is detached now: it is no
    /// longer matchable, scannable, upgradable or pinnable (a pin on it is dropped), its
    /// holders keep their handles (and the slot) as long as they like, and when the last one
    /// releases it the block goes to the reset pool instead of the inactive pool. Emits
    /// `Removed` with reason `Invalidated` now, for each hash that left the cache; the
    /// `invalidated` removal counter counts every block. One lock acquisition.
    ///
    /// ```
    /// use kvbm_logical::{BlockManager, Device, SequenceHash};
    /// let m = BlockManager::<Device>::builder().block_count(2).block_size(16).build()?;
    /// let hash = SequenceHash::new(5);
    /// let held = m.register_block(m.allocate_blocks(1)?.pop().unwrap().stage(hash, 16)?)?;
    /// assert_eq!(m.invalidate_blocks(&[hash]), 0); // held: invalidate leaves it alone
    /// let purge = m.purge_blocks(&[hash]);
    /// assert_eq!((purge.reset, purge.detached), (0, 1));
    /// assert!(m.match_blocks(&[hash]).is_empty()); // no longer served
    /// drop(held); // its last holder: to the reset pool, not the inactive pool
    /// assert_eq!((m.counts().reset, m.counts().inactive), (2, 0));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn purge_blocks(&self, hashes: &[SequenceHash]) -> Purge {
        let mut state = self.store.lock();
        self.purge_locked(&mut state, hashes)
    }

    /// Removes **every** registered block from the cache, held or not, as
    /// [`purge_blocks`](Self::purge_blocks) over all of them, under one lock acquisition: for
    /// a cache whose contents all went stale at once (the engine loaded other weights).
    /// [`reset_inactive_pool`](Self::reset_inactive_pool) leaves held blocks registered, and
    /// they become matchable again when their holders release them; here they are detached
    /// now and go to the reset pool at their last release.
    ///
    /// ```
    /// use kvbm_logical::{BlockManager, Device, SequenceHash};
    /// let m = BlockManager::<Device>::builder().block_count(4).block_size(16).build()?;
    /// let [a, b] = [1, 2].map(SequenceHash::new);
    /// let held = m.register_block(m.allocate_blocks(1)?.pop().unwrap().stage(a, 16)?)?;
    /// drop(m.register_block(m.allocate_blocks(1)?.pop().unwrap().stage(b, 16)?)?);
    /// let purge = m.purge_all();
    /// assert_eq!((purge.reset, purge.detached), (1, 1));
    /// drop(held); // its last holder: to the reset pool, never matchable again
    /// assert!(m.match_blocks(&[a]).is_empty() && m.match_blocks(&[b]).is_empty());
    /// assert_eq!(m.counts().reset, 4);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn purge_all(&self) -> Purge {
        let mut state = self.store.lock();
        let hashes: Vec<SequenceHash> = state.registered_blocks().iter().map(|b| b.hash).collect();
        self.purge_locked(&mut state, &hashes)
    }

    fn purge_locked(&self, state: &mut crate::store::Locked<'_>, hashes: &[SequenceHash]) -> Purge {
        let emit = state.events.enabled();
        let mut gone = std::mem::take(&mut state.scratch_hashes);
        let mut out = Purge::default();
        for &hash in hashes {
            let purged = state.purge(hash);
            out.reset += purged.reset;
            out.detached += purged.detached;
            if purged.left && emit {
                gone.push(hash);
            }
        }
        self.store
            .metrics
            .add_removals(RemovalReason::Invalidated, out.total());
        state.announce_removed(&mut gone, RemovalReason::Invalidated, &self.store.metrics);
        state.scratch_hashes = gone;
        out
    }

    /// Subscribes to this manager's [`KvEvent`](crate::KvEvent)s; `capacity` is how many
    /// batches (one per public call) may wait before further ones are dropped and counted.
    /// See [`events`](crate::events).
    pub fn subscribe(&self, capacity: usize) -> EventSubscriber {
        self.store.lock().events.subscribe(capacity)
    }

    /// Subscribes and takes a snapshot of the registered set **atomically** (under one lock
    /// acquisition): the snapshot reflects every event numbered below
    /// [`CacheSnapshot::next_seq`] and the subscription delivers every event from that number
    /// on, so a router that applies the snapshot and then the stream sees no gap and no
    /// duplicate. The snapshot lists each registered hash once with its parent, parents
    /// first. O(registered hashes) under the lock for the copy; the ordering is done after.
    ///
    /// ```
    /// use kvbm_logical::{BlockManager, Device, ImmutableBlock, KvEventKind, SequenceHash};
    /// let m = BlockManager::<Device>::builder().block_count(4).block_size(16).build()?;
    /// let a = SequenceHash::new(1);
    /// drop(m.register_block(m.allocate_blocks(1)?.pop().unwrap().stage(a, 16)?)?);
    /// let (snapshot, events) = m.subscribe_with_snapshot(16);
    /// assert_eq!(snapshot.hashes().collect::<Vec<_>>(), vec![a]);
    /// assert_eq!((snapshot.tier, snapshot.medium, snapshot.block_size), ("device", "GPU", 16));
    /// let b = SequenceHash::new(2);
    /// drop(m.register_block(m.allocate_blocks(1)?.pop().unwrap().stage(b, 16)?)?);
    /// let next = events.try_recv().unwrap();
    /// assert_eq!(next[0].seq, snapshot.next_seq); // continues right after the snapshot
    /// assert!(matches!(&next[0].kind, KvEventKind::Stored { block_hashes, .. } if block_hashes == &[b]));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn subscribe_with_snapshot(&self, capacity: usize) -> (CacheSnapshot, EventSubscriber) {
        let (blocks, next_seq, subscriber) = {
            let mut state = self.store.lock();
            let blocks = state.registered_blocks();
            let subscriber = state.events.subscribe(capacity);
            (blocks, state.events.next_seq(), subscriber)
        };
        let snapshot = CacheSnapshot {
            manager: self.store.id,
            tier: T::NAME,
            medium: T::MEDIUM,
            block_size: self.store.block_size,
            next_seq,
            blocks: events::parents_first(blocks),
        };
        (snapshot, subscriber)
    }

    /// This manager's counters and gauges.
    pub fn metrics(&self) -> &BlockMetrics {
        &self.store.metrics
    }

    /// A `prometheus-client` collector over this manager's metrics alone (label
    /// `tier="<tier name>"`). For several managers in one registry build one
    /// [`MetricsCollector`] over all of them, so that each family is written once.
    ///
    /// ```
    /// use kvbm_logical::{BlockManager, Host};
    /// let m = BlockManager::<Host>::builder().block_count(8).block_size(16).build()?;
    /// let mut registry = prometheus_client::registry::Registry::with_prefix("server");
    /// registry.register_collector(Box::new(m.collector()));
    /// let mut text = String::new();
    /// prometheus_client::encoding::text::encode(&mut text, &registry)?;
    /// assert!(text.contains(r#"server_kvbm_pool_blocks{tier="host",state="reset"} 8"#));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn collector(&self) -> MetricsCollector {
        MetricsCollector::new().with(&self.store.metrics)
    }

    /// Moves every inactive block to the reset pool, forgetting its hash. Returns how many
    /// blocks moved.
    ///
    /// Blocks held by handles cannot be reset: if any remain, the inactive pool is still
    /// emptied and [`ResetError::BlocksInUse`] says how many are held. Those stay registered
    /// and become matchable again when released: after a weight update (every cached block
    /// stale at once) use [`purge_all`](Self::purge_all), which detaches held blocks too.
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
            let mut gone = std::mem::take(&mut state.scratch_hashes);
            let moved = state.reset_inactive(emit.then_some(&mut gone));
            self.store.metrics.add_removals(RemovalReason::Reset, moved);
            if emit {
                for &hash in &gone {
                    state.events.removed(hash, RemovalReason::Reset);
                }
                if state.registry_is_empty() {
                    state.events.cleared();
                }
                state.events.commit(&self.store.metrics);
            }
            gone.clear();
            state.scratch_hashes = gone;
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

    /// Records a use of blocks the caller already holds, under one lock acquisition and
    /// without a registry probe or a handle per block: each counts as just used — when its
    /// last owner releases it, it enters the inactive pool at the most recently used end
    /// (even if a [`scan_matches`](Self::scan_matches) without `touch` took it) — and
    /// frequency tracking counts an access to it. The same as
    /// `drop(self.scan_matches(&their_hashes, true))`, but exact under
    /// [`BlockDuplicationPolicy::Allow`] (the very slots given, not the first slot of each
    /// hash) and far cheaper. One difference, under lineage eviction: the block stays in the
    /// lineage tree until its release (or until an eviction reaches it), where a touching
    /// scan takes it out at once, so while it is held its ancestors are not exposed as
    /// leaves and evicted first; when released it is filed as just used either way. Blocks of another manager are ignored. Returns how many blocks
    /// a non-touching scan had left in the inactive pool and this marked as used (once
    /// each: they are filed as just used when released).
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
    /// let held = m.scan_matches(&[old], false); // taken without a trace
    /// assert_eq!(m.touch_held(&held), 1); // ... and now used
    /// drop(held);
    /// let (_block, evicted) = m.allocate_blocks_with_evictions(1)?;
    /// assert_eq!(evicted, vec![new]); // `old` was used last
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn touch_held<'a, I>(&self, blocks: I) -> usize
    where
        I: IntoIterator<Item = &'a ImmutableBlock<T>>,
        I::IntoIter: Clone,
        T: 'a,
    {
        let me = self.id();
        let mine = blocks.into_iter().filter(move |b| b.manager_id() == me);
        // Accesses first, so that a frequency-aware policy sees them when it files the
        // blocks on release (as `touch_blocks`).
        self.store
            .record_accesses(mine.clone().map(ImmutableBlock::sequence_hash));
        // The ids before the lock: the caller's iterator (and whatever its adapters do) never
        // runs under it. Gathered on the stack, one lock per `STEP` blocks (one for a
        // request's hits): no allocation on the scheduler's commit path.
        const STEP: usize = 128;
        let mut ids = mine.map(ImmutableBlock::block_id);
        let mut buf = [crate::BlockId::new(0); STEP];
        let mut used = 0;
        loop {
            let mut n = 0;
            for (slot, id) in buf.iter_mut().zip(ids.by_ref()) {
                *slot = id;
                n += 1;
            }
            if n > 0 {
                let mut state = self.store.lock();
                used += buf[..n].iter().filter(|&&id| state.use_held(id)).count();
            }
            if n < STEP {
                return used;
            }
        }
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
