//! Cache events for routers and offload tiers.
//!
//! A manager emits a [`KvEvent`] whenever the set of cached hashes changes: `Stored` when a
//! registration makes a hash matchable, `Removed` when its last copy leaves the cache, and
//! `Cleared` when a reset leaves nothing cached. Events of one public call arrive together,
//! as one batch, and every event has a sequence number one higher than the previous one.
//! Every event names its tier ([`KvEvent::tier`], and [`KvEvent::medium`] in the words of
//! vLLM's KV events: `"GPU"`, `"CPU"`, `"DISK"`); a `Stored` event also carries the block
//! size and, for blocks staged from tokens (by a
//! [`RequestSequence`](crate::RequestSequence) or
//! [`MutableBlock::stage_from_sequence`](crate::MutableBlock::stage_from_sequence)), their
//! token ids, which is what routers that re-hash tokens need. Token ids are copied only while
//! someone subscribes.
//!
//! Subscribers ([`BlockManager::subscribe`](crate::BlockManager::subscribe)) receive batches
//! through a bounded queue. The store never waits for a subscriber: a batch that does not
//! fit is dropped and counted ([`EventSubscriber::dropped_events`], and the manager's
//! `events_dropped` metric), and the subscriber sees the gap in sequence numbers. A
//! subscriber that is dropped is forgotten at the next event.
//!
//! What an event costs the manager: under the store lock, a call appends compact records
//! (hashes, parents, token ids) to buffers that are reused from call to call, and hands the
//! batch to each subscriber's queue (a short copy under that queue's own lock). No event
//! object is allocated there: the subscriber builds the [`KvEvent`]s on its own thread when
//! it reads them, and frees them there. The one remaining cost is a wake-up: a subscriber
//! asleep in [`EventSubscriber::recv_timeout`] is woken by the next batch (a futex call in the
//! manager's thread). A consumer that polls ([`EventSubscriber::try_recv`] on a timer, as
//! `kvbm-events`' publisher does) costs none.
//!
//! A router that starts late bootstraps with
//! [`BlockManager::subscribe_with_snapshot`](crate::BlockManager::subscribe_with_snapshot):
//! the registered set and a subscription taken atomically, so the stream continues from the
//! snapshot with no gap and no duplicate.
//!
//! Guarantee (checked by a property test): for each hash, `Stored` and `Removed` alternate,
//! starting with `Stored`; after `Cleared` no hash is stored.
//!
//! Events cost nothing while nobody subscribes.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::hashing::SequenceHash;
use crate::ids::ManagerId;
use crate::metrics::BlockMetrics;

/// Why hashes left the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RemovalReason {
    /// Evicted by an allocation that needed the slot.
    Evicted,
    /// Removed by [`reset_inactive_pool`](crate::BlockManager::reset_inactive_pool).
    Reset,
    /// Moved to a lower tier (emitted by an offload engine; the logical manager itself never
    /// demotes).
    Demoted,
    /// Removed on request by [`invalidate_blocks`](crate::BlockManager::invalidate_blocks)
    /// or [`purge_blocks`](crate::BlockManager::purge_blocks).
    Invalidated,
    /// A block registered "do not cache"
    /// ([`CompleteBlock::reset_on_release`](crate::CompleteBlock::reset_on_release), or a
    /// [`RequestSequence`](crate::RequestSequence) built with `cache(false)`) went straight
    /// back to the reset pool when its last owner released it.
    Released,
}

impl RemovalReason {
    /// Lower-case name, as in metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Evicted => "evicted",
            Self::Reset => "reset",
            Self::Demoted => "demoted",
            Self::Invalidated => "invalidated",
            Self::Released => "released",
        }
    }
}

/// What happened.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum KvEventKind {
    /// These hashes became matchable. Consecutive blocks of one chain share an event:
    /// `parent` is the parent of the first, and each later hash's parent is the one before it.
    Stored {
        /// The stored hashes, in chain order.
        block_hashes: Vec<SequenceHash>,
        /// The first block's parent, if known.
        parent: Option<SequenceHash>,
        /// The tier's name (`"device"`, `"host"`, ...), as in [`KvEvent::tier`].
        tier: &'static str,
        /// Tokens per block (the manager's block size).
        block_size: usize,
        /// The blocks' token ids, `block_size` per block in chain order, when they were
        /// staged from tokens while someone subscribed; `None` for blocks staged from a hash
        /// alone. Consecutive blocks share an event only if all or none of them have tokens.
        token_ids: Option<Vec<u32>>,
    },
    /// These hashes left the cache (their last copy in this manager).
    Removed {
        /// The removed hashes.
        block_hashes: Vec<SequenceHash>,
        /// Why.
        reason: RemovalReason,
    },
    /// Nothing is cached any more (after a reset of an otherwise idle manager).
    Cleared,
}

/// One event and its sequence number (per manager, starting at 0, +1 per event).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct KvEvent {
    /// Sequence number.
    pub seq: u64,
    /// The manager that emitted it.
    pub manager: ManagerId,
    /// The manager's tier ([`BlockTier::NAME`](crate::BlockTier::NAME): `"device"`, `"host"`,
    /// `"disk"`, ...).
    pub tier: &'static str,
    /// The tier's storage medium as vLLM's KV events name it
    /// ([`BlockTier::MEDIUM`](crate::BlockTier::MEDIUM): `"GPU"`, `"CPU"`, `"DISK"`, ...).
    pub medium: &'static str,
    /// What happened.
    pub kind: KvEventKind,
}

/// The events of one public call, in order.
pub type EventBatch = Arc<[KvEvent]>;

#[derive(Debug, Default)]
struct Loss {
    batches: AtomicU64,
    events: AtomicU64,
}

/// One event as the store records it: plain data, its hashes and token ids in the log's
/// arenas, so that emitting an event allocates nothing once the buffers have grown. The
/// subscriber builds the public [`KvEvent`]s from these, on its own thread.
#[derive(Clone, Copy, Debug)]
enum Raw {
    Stored {
        /// Range in [`Log::hashes`].
        hashes: (usize, usize),
        parent: Option<SequenceHash>,
        /// Range in [`Log::tokens`], if the blocks had token ids.
        tokens: Option<(usize, usize)>,
    },
    Removed {
        hashes: (usize, usize),
        reason: RemovalReason,
    },
    Cleared,
}

/// Recorded events and where each call's batch ends.
#[derive(Debug, Default)]
struct Log {
    events: Vec<Raw>,
    hashes: Vec<SequenceHash>,
    tokens: Vec<u32>,
    /// Per batch: the first event's sequence number and how many events it has.
    batches: VecDeque<(u64, usize)>,
}

impl Log {
    fn clear(&mut self) {
        self.events.clear();
        self.hashes.clear();
        self.tokens.clear();
        self.batches.clear();
    }

    /// Appends `batch` (one call's events, not yet in `batches`) as one batch numbered
    /// from `seq`.
    fn append(&mut self, batch: &Log, seq: u64) {
        let (h, t) = (self.hashes.len(), self.tokens.len());
        self.hashes.extend_from_slice(&batch.hashes);
        self.tokens.extend_from_slice(&batch.tokens);
        let shift = |(a, b): (usize, usize), by: usize| (a + by, b + by);
        self.events.extend(batch.events.iter().map(|e| match *e {
            Raw::Stored {
                hashes,
                parent,
                tokens,
            } => Raw::Stored {
                hashes: shift(hashes, h),
                parent,
                tokens: tokens.map(|r| shift(r, t)),
            },
            Raw::Removed { hashes, reason } => Raw::Removed {
                hashes: shift(hashes, h),
                reason,
            },
            Raw::Cleared => Raw::Cleared,
        }));
        self.batches.push_back((seq, batch.events.len()));
    }
}

/// What the store and one subscriber share.
#[derive(Debug)]
struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
    loss: Loss,
    /// Set when the [`EventSubscriber`] is dropped: the hub forgets it at the next event.
    receiver_gone: AtomicBool,
    capacity: usize,
    manager: ManagerId,
    tier: &'static str,
    medium: &'static str,
    block_size: usize,
}

#[derive(Debug, Default)]
struct Queue {
    log: Log,
    /// Readers of this subscriber asleep in [`EventSubscriber::recv_timeout`], to be woken.
    waiting: usize,
    /// The manager is gone: no event will come.
    closed: bool,
}

/// The receiving end of a subscription; see the [module docs](self).
///
/// ```
/// use kvbm_logical::{BlockManager, Device, ImmutableBlock, KvEventKind, SequenceHash};
/// let m = BlockManager::<Device>::builder().block_count(1).block_size(16).build()?;
/// let events = m.subscribe(16);
/// let block = m.allocate_blocks(1)?.pop().unwrap().stage(SequenceHash::new(7), 16)?;
/// drop(m.register_block(block)?);
/// drop(m.allocate_blocks(1)?); // evicts hash 7
/// let stored = events.try_recv().expect("a batch");
/// assert!(matches!(&stored[0].kind, KvEventKind::Stored { block_hashes, .. } if block_hashes[0] == SequenceHash::new(7)));
/// let removed = events.try_recv().expect("a batch");
/// assert_eq!(removed[0].seq, stored[0].seq + 1);
/// assert!(matches!(removed[0].kind, KvEventKind::Removed { .. }));
/// assert_eq!(events.dropped_events(), 0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct EventSubscriber {
    shared: Arc<Shared>,
    /// Batches taken from the shared queue in one swap, not yet handed out, and the index of
    /// the first event of the front batch. Only readers of this subscriber lock it (the store
    /// never does); a reader holding it may then take the queue's lock, never the reverse.
    local: Mutex<(Log, usize)>,
}

impl EventSubscriber {
    /// The next batch, if one is waiting.
    pub fn try_recv(&self) -> Option<EventBatch> {
        let mut local = self.local.lock();
        if local.0.batches.is_empty() {
            Self::take_shared(&mut local, &mut self.shared.queue.lock());
        }
        self.next_local(&mut local)
    }

    /// The next batch, waiting up to `timeout`; `None` on timeout or once the manager and
    /// all its handles are gone.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<EventBatch> {
        let deadline = Instant::now().checked_add(timeout);
        loop {
            // Locks in the order local, queue; the local lock is let go before sleeping, so
            // another thread's `try_recv` on this subscriber is never held up by the wait.
            let mut local = self.local.lock();
            if let Some(batch) = self.next_local(&mut local) {
                return Some(batch);
            }
            let mut queue = self.shared.queue.lock();
            if Self::take_shared(&mut local, &mut queue) {
                drop(queue);
                return self.next_local(&mut local);
            }
            if queue.closed {
                return None;
            }
            drop(local);
            queue.waiting += 1;
            let timed_out = match deadline {
                Some(deadline) => self
                    .shared
                    .ready
                    .wait_until(&mut queue, deadline)
                    .timed_out(),
                None => {
                    self.shared.ready.wait(&mut queue);
                    false
                }
            };
            queue.waiting -= 1;
            drop(queue);
            if timed_out {
                return self.try_recv();
            }
        }
    }

    /// Every batch waiting now.
    pub fn drain(&self) -> impl Iterator<Item = EventBatch> + '_ {
        std::iter::from_fn(|| self.try_recv())
    }

    /// Batches dropped because this subscriber's queue was full.
    pub fn dropped_batches(&self) -> u64 {
        self.shared.loss.batches.load(Ordering::Relaxed)
    }

    /// Events in those batches (the size of the gaps in sequence numbers).
    pub fn dropped_events(&self) -> u64 {
        self.shared.loss.events.load(Ordering::Relaxed)
    }

    /// Swaps the shared queue's batches into the consumed local log, if there are any; the
    /// emptied local buffers go back to the store for reuse.
    fn take_shared(local: &mut (Log, usize), queue: &mut Queue) -> bool {
        if queue.log.batches.is_empty() {
            return false;
        }
        let (log, next) = local;
        debug_assert!(log.batches.is_empty());
        log.clear();
        std::mem::swap(log, &mut queue.log);
        *next = 0;
        true
    }

    /// Builds the front batch of the local log.
    fn next_local(&self, local: &mut (Log, usize)) -> Option<EventBatch> {
        let (log, next) = local;
        let (seq, n) = log.batches.pop_front()?;
        let s = &*self.shared;
        let raw = &log.events[*next..*next + n];
        *next += n;
        let batch: EventBatch = raw
            .iter()
            .zip(seq..)
            .map(|(e, seq)| KvEvent {
                seq,
                manager: s.manager,
                tier: s.tier,
                medium: s.medium,
                kind: match *e {
                    Raw::Stored {
                        hashes,
                        parent,
                        tokens,
                    } => KvEventKind::Stored {
                        block_hashes: log.hashes[hashes.0..hashes.1].to_vec(),
                        parent,
                        tier: s.tier,
                        block_size: s.block_size,
                        token_ids: tokens.map(|(a, b)| log.tokens[a..b].to_vec()),
                    },
                    Raw::Removed { hashes, reason } => KvEventKind::Removed {
                        block_hashes: log.hashes[hashes.0..hashes.1].to_vec(),
                        reason,
                    },
                    Raw::Cleared => KvEventKind::Cleared,
                },
            })
            .collect();
        Some(batch)
    }
}

impl Drop for EventSubscriber {
    fn drop(&mut self) {
        self.shared.receiver_gone.store(true, Ordering::Relaxed);
    }
}

/// The sending side, inside the store lock (so sequence numbers and delivery order agree).
///
/// A public call records its events with [`stored`](Self::stored),
/// [`removed`](Self::removed) and [`cleared`](Self::cleared) (cheap appends to reused
/// buffers, only while [`enabled`](Self::enabled)), then [`commit`](Self::commit)s them as
/// one batch: numbered, and appended to each subscriber's queue under that queue's own small
/// lock. The subscriber swaps the whole queue out in one step and builds the public events
/// on its own thread, so the store never allocates for an event once its buffers have grown,
/// never frees another thread's memory, and wakes a subscriber only when it sleeps.
pub(crate) struct EventHub {
    next_seq: u64,
    manager: ManagerId,
    tier: &'static str,
    medium: &'static str,
    block_size: usize,
    subscribers: Vec<Arc<Shared>>,
    /// The call being recorded (no `batches` entry).
    batch: Log,
    /// `!subscribers.is_empty()`, readable without the lock (set under it): whether staging a
    /// block from tokens should copy them for a `Stored` event. It may lag by one event after
    /// the last subscriber is dropped (dropped subscribers are noticed when publishing).
    enabled: Arc<AtomicBool>,
}

impl EventHub {
    pub(crate) fn new(
        manager: ManagerId,
        tier: &'static str,
        medium: &'static str,
        block_size: usize,
    ) -> Self {
        Self {
            next_seq: 0,
            manager,
            tier,
            medium,
            block_size,
            subscribers: Vec::new(),
            batch: Log::default(),
            enabled: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The flag behind [`enabled`](Self::enabled), for lock-free readers.
    pub(crate) fn enabled_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.enabled)
    }

    pub(crate) fn subscribe(&mut self, capacity: usize) -> EventSubscriber {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
            loss: Loss::default(),
            receiver_gone: AtomicBool::new(false),
            capacity: capacity.max(1),
            manager: self.manager,
            tier: self.tier,
            medium: self.medium,
            block_size: self.block_size,
        });
        self.subscribers.push(Arc::clone(&shared));
        self.enabled.store(true, Ordering::Relaxed);
        EventSubscriber {
            shared,
            local: Mutex::new((Log::default(), 0)),
        }
    }

    /// The sequence number the next event will get.
    pub(crate) fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Whether anyone listens (events are not even recorded otherwise).
    pub(crate) fn enabled(&self) -> bool {
        !self.subscribers.is_empty()
    }

    /// Records that `hash` became matchable. Consecutive blocks that chain (each one's
    /// parent is the previous hash) and that all have token ids or all lack them share an
    /// event, as [`stored_events`] groups them. No-op while nobody subscribes.
    pub(crate) fn stored(
        &mut self,
        hash: SequenceHash,
        parent: Option<SequenceHash>,
        tokens: Option<&[u32]>,
    ) {
        if !self.enabled() {
            return;
        }
        let b = &mut self.batch;
        if let Some(Raw::Stored {
            hashes,
            tokens: ids,
            ..
        }) = b.events.last_mut()
            && parent.is_some()
            && hashes.1 == b.hashes.len()
            && b.hashes.last().copied() == parent
            && ids.is_some() == tokens.is_some()
        {
            b.hashes.push(hash);
            hashes.1 += 1;
            if let (Some(ids), Some(tokens)) = (ids.as_mut(), tokens) {
                b.tokens.extend_from_slice(tokens);
                ids.1 = b.tokens.len();
            }
            return;
        }
        let at = b.hashes.len();
        b.hashes.push(hash);
        let tokens = tokens.map(|t| {
            let at = b.tokens.len();
            b.tokens.extend_from_slice(t);
            (at, b.tokens.len())
        });
        b.events.push(Raw::Stored {
            hashes: (at, at + 1),
            parent,
            tokens,
        });
    }

    /// Records that `hash` left the cache; consecutive removals with one reason share an
    /// event. No-op while nobody subscribes.
    pub(crate) fn removed(&mut self, hash: SequenceHash, reason: RemovalReason) {
        if !self.enabled() {
            return;
        }
        let b = &mut self.batch;
        if let Some(Raw::Removed { hashes, reason: r }) = b.events.last_mut()
            && *r == reason
            && hashes.1 == b.hashes.len()
        {
            b.hashes.push(hash);
            hashes.1 += 1;
            return;
        }
        let at = b.hashes.len();
        b.hashes.push(hash);
        b.events.push(Raw::Removed {
            hashes: (at, at + 1),
            reason,
        });
    }

    /// Records that nothing is cached any more. No-op while nobody subscribes.
    pub(crate) fn cleared(&mut self) {
        if self.enabled() {
            self.batch.events.push(Raw::Cleared);
        }
    }

    /// Numbers the recorded events and hands them to every subscriber as one batch. Never
    /// blocks on a subscriber: a full queue drops the batch and counts it.
    pub(crate) fn commit(&mut self, metrics: &BlockMetrics) {
        if self.batch.events.is_empty() {
            return;
        }
        let n = self.batch.events.len();
        let seq = self.next_seq;
        self.next_seq += n as u64;
        let batch = &self.batch;
        self.subscribers.retain(|s| {
            if s.receiver_gone.load(Ordering::Relaxed) {
                return false;
            }
            let mut queue = s.queue.lock();
            if queue.log.batches.len() >= s.capacity {
                drop(queue);
                s.loss.batches.fetch_add(1, Ordering::Relaxed);
                s.loss.events.fetch_add(n as u64, Ordering::Relaxed);
                metrics.add_events_dropped(n as u64);
                return true;
            }
            queue.log.append(batch, seq);
            if queue.waiting > 0 {
                s.ready.notify_one();
            }
            true
        });
        self.batch.events.clear();
        self.batch.hashes.clear();
        self.batch.tokens.clear();
        if self.subscribers.is_empty() {
            self.enabled.store(false, Ordering::Relaxed);
        }
    }
}

impl Drop for EventHub {
    fn drop(&mut self) {
        for s in &self.subscribers {
            s.queue.lock().closed = true;
            s.ready.notify_all();
        }
    }
}

/// One block of a registration that made its hash matchable, for `Stored` events.
pub(crate) struct StoredBlock<'a> {
    pub(crate) hash: SequenceHash,
    pub(crate) parent: Option<SequenceHash>,
    pub(crate) tokens: Option<&'a [u32]>,
}

/// Builds `Stored` events for a registration batch: consecutive new hashes that chain
/// (each one's parent is the previous hash), and that all have token ids or all lack them,
/// share an event.
pub(crate) fn stored_events<'a>(
    tier: &'static str,
    block_size: usize,
    stored: impl IntoIterator<Item = StoredBlock<'a>>,
) -> Vec<KvEventKind> {
    let mut events: Vec<KvEventKind> = Vec::new();
    for StoredBlock {
        hash,
        parent,
        tokens,
    } in stored
    {
        if let Some(KvEventKind::Stored {
            block_hashes,
            token_ids,
            ..
        }) = events.last_mut()
            && parent.is_some()
            && block_hashes.last().copied() == parent
            && token_ids.is_some() == tokens.is_some()
        {
            block_hashes.push(hash);
            if let (Some(ids), Some(tokens)) = (token_ids.as_mut(), tokens) {
                ids.extend_from_slice(tokens);
            }
            continue;
        }
        events.push(KvEventKind::Stored {
            block_hashes: vec![hash],
            parent,
            tier,
            block_size,
            token_ids: tokens.map(<[u32]>::to_vec),
        });
    }
    events
}

/// One registered block in a [`CacheSnapshot`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct SnapshotBlock {
    /// The block's sequence hash.
    pub hash: SequenceHash,
    /// Its parent's hash, as registered.
    pub parent: Option<SequenceHash>,
}

/// The registered set of a manager at the instant a subscription was taken; see
/// [`BlockManager::subscribe_with_snapshot`](crate::BlockManager::subscribe_with_snapshot).
///
/// `blocks` lists every matchable hash once (active or inactive), **parents first**: a block
/// whose parent is also in the snapshot comes after it, so a router can rebuild each chain in
/// one pass. Token ids are not kept by the cache, so the snapshot has none.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheSnapshot {
    /// The manager.
    pub manager: ManagerId,
    /// Its tier, as in [`KvEvent::tier`].
    pub tier: &'static str,
    /// Its medium, as in [`KvEvent::medium`].
    pub medium: &'static str,
    /// Tokens per block.
    pub block_size: usize,
    /// The sequence number of the first event the subscription will deliver: every event
    /// before it is reflected in `blocks`, none after it.
    pub next_seq: u64,
    /// The registered hashes, parents first.
    pub blocks: Vec<SnapshotBlock>,
}

impl CacheSnapshot {
    /// The snapshot's hashes, parents first.
    pub fn hashes(&self) -> impl ExactSizeIterator<Item = SequenceHash> + '_ {
        self.blocks.iter().map(|b| b.hash)
    }

    /// The snapshot as `Stored` events (without sequence numbers), chains grouped as a
    /// registration would group them: what a publisher sends a router before the stream.
    pub fn stored_events(&self) -> Vec<KvEventKind> {
        stored_events(
            self.tier,
            self.block_size,
            self.blocks.iter().map(|b| StoredBlock {
                hash: b.hash,
                parent: b.parent,
                tokens: None,
            }),
        )
    }
}

/// Orders `blocks` parents first, keeping chains together: depth-first from each root (a
/// block whose parent is not in the set), in the input order of the roots and children.
pub(crate) fn parents_first(blocks: Vec<SnapshotBlock>) -> Vec<SnapshotBlock> {
    let index: HashMap<SequenceHash, usize> = blocks
        .iter()
        .enumerate()
        .map(|(i, b)| (b.hash, i))
        .collect();
    // Children lists as index chains: first child, next sibling.
    const NONE: usize = usize::MAX;
    let mut first_child = vec![NONE; blocks.len()];
    let mut next_sibling = vec![NONE; blocks.len()];
    let mut roots = Vec::new();
    for (i, b) in blocks.iter().enumerate().rev() {
        match b.parent.and_then(|p| index.get(&p)).copied() {
            Some(p) if p != i => {
                next_sibling[i] = first_child[p];
                first_child[p] = i;
            }
            _ => roots.push(i),
        }
    }
    roots.reverse();
    let mut out = Vec::with_capacity(blocks.len());
    let mut placed = vec![false; blocks.len()];
    let mut stack = Vec::new();
    let mut visit = |start: usize, out: &mut Vec<SnapshotBlock>, placed: &mut Vec<bool>| {
        stack.push(start);
        while let Some(i) = stack.pop() {
            if std::mem::replace(&mut placed[i], true) {
                continue;
            }
            out.push(blocks[i]);
            // Push children in reverse so that the first child is visited first.
            let mut kids = Vec::new();
            let mut c = first_child[i];
            while c != NONE {
                kids.push(c);
                c = next_sibling[c];
            }
            stack.extend(kids.into_iter().rev());
        }
    };
    for &r in &roots {
        visit(r, &mut out, &mut placed);
    }
    // Blocks on a cycle of parent hashes (never produced by chained hashing) have no root:
    // append them in input order.
    for i in 0..blocks.len() {
        if !placed[i] {
            visit(i, &mut out, &mut placed);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_threads_reading_one_subscriber_are_each_woken() {
        // Two threads sleep in `recv_timeout` on one subscriber; two batches published once
        // both sleep wake both (one each). With a single "someone sleeps" flag, the second
        // sleeper missed the second batch until its timeout.
        use crate::{BlockManager, Device};
        let patience = Duration::from_secs(120);
        let m = BlockManager::<Device>::builder()
            .block_count(8)
            .block_size(4)
            .build()
            .unwrap();
        let sub = m.subscribe(16);
        let register = |h: u64| {
            let block = m.allocate_blocks(1).unwrap().pop().unwrap();
            drop(
                m.register_block(block.stage(SequenceHash::new(h), 4).unwrap())
                    .unwrap(),
            );
        };
        let got = std::thread::scope(|s| {
            let readers: Vec<_> = (0..2)
                .map(|_| {
                    let sub = &sub;
                    s.spawn(move || {
                        let start = Instant::now();
                        (sub.recv_timeout(patience), start.elapsed())
                    })
                })
                .collect();
            while sub.shared.queue.lock().waiting < 2 {
                std::thread::yield_now();
            }
            register(1);
            register(2);
            readers
                .into_iter()
                .map(|r| r.join().unwrap())
                .collect::<Vec<_>>()
        });
        for (batch, waited) in &got {
            assert!(batch.is_some(), "a reader timed out");
            assert!(*waited < patience);
        }
    }

    fn b(hash: u64, parent: Option<u64>) -> SnapshotBlock {
        SnapshotBlock {
            hash: SequenceHash::new(hash),
            parent: parent.map(SequenceHash::new),
        }
    }

    #[test]
    fn parents_come_first_and_chains_stay_together() {
        // 3 -> 2 -> 1 (root), 5 -> 1, 7 -> 9 (9 not in the set), and a cycle 10 <-> 11.
        let blocks = vec![
            b(3, Some(2)),
            b(5, Some(1)),
            b(7, Some(9)),
            b(1, None),
            b(2, Some(1)),
            b(10, Some(11)),
            b(11, Some(10)),
        ];
        let out = parents_first(blocks.clone());
        assert_eq!(out.len(), blocks.len());
        let pos = |h: u64| out.iter().position(|x| x.hash.as_u64() == h).unwrap();
        assert!(pos(1) < pos(2) && pos(2) < pos(3) && pos(1) < pos(5));
        // Depth first: 3 right after 2.
        assert_eq!(pos(3), pos(2) + 1);
        let mut hashes: Vec<u64> = out.iter().map(|x| x.hash.as_u64()).collect();
        hashes.sort_unstable();
        assert_eq!(hashes, vec![1, 2, 3, 5, 7, 10, 11]);
    }

    #[test]
    fn stored_events_group_chains_with_the_same_token_presence() {
        let t = [1u32, 2];
        let items = [
            StoredBlock {
                hash: SequenceHash::new(1),
                parent: None,
                tokens: Some(&t),
            },
            StoredBlock {
                hash: SequenceHash::new(2),
                parent: Some(SequenceHash::new(1)),
                tokens: Some(&t),
            },
            StoredBlock {
                hash: SequenceHash::new(3),
                parent: Some(SequenceHash::new(2)),
                tokens: None,
            },
        ];
        let events = stored_events("device", 2, items);
        assert_eq!(events.len(), 2);
        assert_eq!(
            events[0],
            KvEventKind::Stored {
                block_hashes: vec![SequenceHash::new(1), SequenceHash::new(2)],
                parent: None,
                tier: "device",
                block_size: 2,
                token_ids: Some(vec![1, 2, 1, 2]),
            }
        );
        assert!(
            matches!(&events[1], KvEventKind::Stored { token_ids: None, parent: Some(p), .. } if p.as_u64() == 2)
        );
    }
}
