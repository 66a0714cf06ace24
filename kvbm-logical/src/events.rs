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
//! through a bounded channel. The store never waits for a subscriber: a batch that does not
//! fit is dropped and counted ([`EventSubscriber::dropped_events`], and the manager's
//! `events_dropped` metric), and the subscriber sees the gap in sequence numbers. A
//! subscriber that is dropped is forgotten at the next event.
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

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::Duration;

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
    rx: Receiver<EventBatch>,
    loss: Arc<Loss>,
}

impl EventSubscriber {
    /// The next batch, if one is waiting.
    pub fn try_recv(&self) -> Option<EventBatch> {
        self.rx.try_recv().ok()
    }

    /// The next batch, waiting up to `timeout`; `None` on timeout or once the manager and
    /// all its handles are gone.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<EventBatch> {
        self.rx.recv_timeout(timeout).ok()
    }

    /// Every batch waiting now.
    pub fn drain(&self) -> impl Iterator<Item = EventBatch> + '_ {
        self.rx.try_iter()
    }

    /// Batches dropped because this subscriber's channel was full.
    pub fn dropped_batches(&self) -> u64 {
        self.loss.batches.load(Ordering::Relaxed)
    }

    /// Events in those batches (the size of the gaps in sequence numbers).
    pub fn dropped_events(&self) -> u64 {
        self.loss.events.load(Ordering::Relaxed)
    }
}

struct Subscriber {
    tx: SyncSender<EventBatch>,
    loss: Arc<Loss>,
}

/// The sending side, inside the store lock (so sequence numbers and delivery order agree).
pub(crate) struct EventHub {
    next_seq: u64,
    tier: &'static str,
    medium: &'static str,
    subscribers: Vec<Subscriber>,
    /// `!subscribers.is_empty()`, readable without the lock (set under it): whether staging a
    /// block from tokens should copy them for a `Stored` event. It may lag by one event after
    /// the last subscriber is dropped (dropped subscribers are noticed when publishing).
    enabled: Arc<AtomicBool>,
}

impl EventHub {
    pub(crate) fn new(tier: &'static str, medium: &'static str) -> Self {
        Self {
            next_seq: 0,
            tier,
            medium,
            subscribers: Vec::new(),
            enabled: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The flag behind [`enabled`](Self::enabled), for lock-free readers.
    pub(crate) fn enabled_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.enabled)
    }

    pub(crate) fn subscribe(&mut self, capacity: usize) -> EventSubscriber {
        let (tx, rx) = std::sync::mpsc::sync_channel(capacity.max(1));
        let loss = Arc::new(Loss::default());
        self.subscribers.push(Subscriber {
            tx,
            loss: Arc::clone(&loss),
        });
        self.enabled.store(true, Ordering::Relaxed);
        EventSubscriber { rx, loss }
    }

    /// The sequence number the next event will get.
    pub(crate) fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Whether anyone listens (events are not even built otherwise).
    pub(crate) fn enabled(&self) -> bool {
        !self.subscribers.is_empty()
    }

    /// Numbers and sends one call's events. Never blocks.
    pub(crate) fn publish(
        &mut self,
        manager: ManagerId,
        kinds: impl IntoIterator<Item = KvEventKind>,
        metrics: &BlockMetrics,
    ) {
        if self.subscribers.is_empty() {
            return;
        }
        let (tier, medium) = (self.tier, self.medium);
        let batch: EventBatch = kinds
            .into_iter()
            .map(|kind| {
                let seq = self.next_seq;
                self.next_seq += 1;
                KvEvent {
                    seq,
                    manager,
                    tier,
                    medium,
                    kind,
                }
            })
            .collect();
        if batch.is_empty() {
            return;
        }
        let n = batch.len() as u64;
        self.subscribers
            .retain(|s| match s.tx.try_send(Arc::clone(&batch)) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    s.loss.batches.fetch_add(1, Ordering::Relaxed);
                    s.loss.events.fetch_add(n, Ordering::Relaxed);
                    metrics.add_events_dropped(n);
                    true
                }
                Err(TrySendError::Disconnected(_)) => false,
            });
        if self.subscribers.is_empty() {
            self.enabled.store(false, Ordering::Relaxed);
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

/// A `Removed` event, if any hash left.
pub(crate) fn removed_event(
    hashes: Vec<SequenceHash>,
    reason: RemovalReason,
) -> Option<KvEventKind> {
    (!hashes.is_empty()).then_some(KvEventKind::Removed {
        block_hashes: hashes,
        reason,
    })
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
