//! Cache events for routers and offload tiers.
//!
//! A manager emits a [`KvEvent`] whenever the set of cached hashes changes: `Stored` when a
//! registration makes a hash matchable, `Removed` when its last copy leaves the cache, and
//! `Cleared` when a reset leaves nothing cached. Events of one public call arrive together,
//! as one batch, and every event has a sequence number one higher than the previous one.
//!
//! Subscribers ([`BlockManager::subscribe`](crate::BlockManager::subscribe)) receive batches
//! through a bounded channel. The store never waits for a subscriber: a batch that does not
//! fit is dropped and counted ([`EventSubscriber::dropped_events`], and the manager's
//! `events_dropped` metric), and the subscriber sees the gap in sequence numbers. A
//! subscriber that is dropped is forgotten at the next event.
//!
//! Guarantee (checked by a property test): for each hash, `Stored` and `Removed` alternate,
//! starting with `Stored`; after `Cleared` no hash is stored.
//!
//! Events cost nothing while nobody subscribes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// Removed on request by [`invalidate_blocks`](crate::BlockManager::invalidate_blocks).
    Invalidated,
}

impl RemovalReason {
    /// Lower-case name, as in metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Evicted => "evicted",
            Self::Reset => "reset",
            Self::Demoted => "demoted",
            Self::Invalidated => "invalidated",
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
        /// The tier's name (`"device"`, `"host"`, ...).
        tier: &'static str,
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
pub struct KvEvent {
    /// Sequence number.
    pub seq: u64,
    /// The manager that emitted it.
    pub manager: ManagerId,
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
#[derive(Default)]
pub(crate) struct EventHub {
    next_seq: u64,
    subscribers: Vec<Subscriber>,
}

impl EventHub {
    pub(crate) fn subscribe(&mut self, capacity: usize) -> EventSubscriber {
        let (tx, rx) = std::sync::mpsc::sync_channel(capacity.max(1));
        let loss = Arc::new(Loss::default());
        self.subscribers.push(Subscriber {
            tx,
            loss: Arc::clone(&loss),
        });
        EventSubscriber { rx, loss }
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
        let batch: EventBatch = kinds
            .into_iter()
            .map(|kind| {
                let seq = self.next_seq;
                self.next_seq += 1;
                KvEvent { seq, manager, kind }
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
    }
}

/// Builds `Stored` events for a registration batch: consecutive new hashes that chain
/// (each one's parent is the previous hash) share an event.
pub(crate) fn stored_events(
    tier: &'static str,
    stored: impl IntoIterator<Item = (SequenceHash, Option<SequenceHash>)>,
) -> Vec<KvEventKind> {
    let mut events: Vec<KvEventKind> = Vec::new();
    for (hash, parent) in stored {
        if let Some(KvEventKind::Stored { block_hashes, .. }) = events.last_mut()
            && parent.is_some()
            && block_hashes.last().copied() == parent
        {
            block_hashes.push(hash);
            continue;
        }
        events.push(KvEventKind::Stored {
            block_hashes: vec![hash],
            parent,
            tier,
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
