//! The publisher: its handle and the thread that maps, batches, sends and replays.

use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender, TryRecvError};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kvbm_logical::{EventBatch, KvEventKind};

use crate::config::{BuildError, BuildErrorKind, PubEndpoint, PublisherBuilder, Source};
use crate::mapping::{wire_event, wire_kind};
use crate::replay::{MAX_REQUEST_FRAME, ReplayBuffer, ReplayServer};
use crate::stats::{Counters, PublisherStats};
use crate::wire::{BatchLayout, BatchWriter, WireEvent};

/// Publishes kvbm's events in vLLM's KV-event format on a ZeroMQ PUB socket, from its own
/// thread; see the [crate docs](crate).
///
/// Dropping it (or [`shutdown`](Self::shutdown)) publishes what its sources have queued, stops
/// the thread and waits for it, and for queued messages to leave, at most the
/// [linger](PublisherBuilder::linger) time.
#[derive(Debug)]
pub struct EventPublisher {
    control: Sender<Control>,
    thread: Option<JoinHandle<()>>,
    counters: Arc<Counters>,
    endpoint: String,
    replay_endpoint: Option<String>,
}

/// Why [`EventPublisher::flush`] did not confirm.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FlushError {
    /// The thread did not answer in time (it may still be publishing).
    #[error("the publisher did not flush within {timeout:?}")]
    Timeout {
        /// The time waited.
        timeout: Duration,
    },
    /// The publisher thread is gone.
    #[error("the publisher thread has stopped")]
    Stopped,
}

enum Control {
    Flush(SyncSender<()>),
    Stop,
}

impl EventPublisher {
    /// A builder with vLLM's defaults.
    pub fn builder() -> PublisherBuilder {
        PublisherBuilder::default()
    }

    /// The PUB endpoint: for a bound socket the resolved address (a `*` port becomes the
    /// port chosen), for a connected one the address given.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The replay endpoint, resolved like [`endpoint`](Self::endpoint), if configured.
    pub fn replay_endpoint(&self) -> Option<&str> {
        self.replay_endpoint.as_deref()
    }

    /// The counters now.
    pub fn stats(&self) -> PublisherStats {
        self.counters.snapshot()
    }

    /// Waits until every event its sources had queued when called is published, up to
    /// `timeout`; returns the counters then.
    pub fn flush(&self, timeout: Duration) -> Result<PublisherStats, FlushError> {
        let (ack, done) = mpsc::sync_channel(1);
        self.control
            .send(Control::Flush(ack))
            .map_err(|_| FlushError::Stopped)?;
        match done.recv_timeout(timeout) {
            Ok(()) => Ok(self.stats()),
            Err(RecvTimeoutError::Timeout) => Err(FlushError::Timeout { timeout }),
            Err(RecvTimeoutError::Disconnected) => Err(FlushError::Stopped),
        }
    }

    /// Publishes what is queued, stops, and returns the final counters.
    pub fn shutdown(mut self) -> PublisherStats {
        self.stop();
        self.stats()
    }

    fn stop(&mut self) {
        if let Some(thread) = self.thread.take() {
            // The thread may already be gone; then there is nothing to tell it.
            let _ = self.control.send(Control::Stop);
            if thread.join().is_err() {
                tracing::error!("the KV-event publisher thread panicked");
            }
        }
    }
}

impl Drop for EventPublisher {
    fn drop(&mut self) {
        self.stop();
    }
}

impl PublisherBuilder {
    /// Opens the sockets (binding or connecting now, so that a busy port is reported here) and
    /// starts the publisher thread. On error nothing is left open and the sources come back in
    /// the error.
    ///
    /// ```
    /// use kvbm_events::{BuildErrorKind, EventPublisher, Source};
    /// use kvbm_logical::{BlockManager, Device};
    /// let m = BlockManager::<Device>::builder().block_count(4).block_size(16).build()?;
    /// let refused = EventPublisher::builder().source(Source::manager(&m, 64)).build();
    /// let error = refused.unwrap_err();
    /// assert!(matches!(error.kind(), BuildErrorKind::MissingEndpoint));
    /// assert_eq!(error.into_sources().len(), 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn build(mut self) -> Result<EventPublisher, BuildError> {
        let opened = self.validate().and_then(|()| self.open());
        match opened {
            Ok(sockets) => self.start(sockets),
            Err(kind) => Err(BuildError {
                kind,
                sources: std::mem::take(&mut self.sources),
            }),
        }
    }

    fn open(&self) -> Result<Sockets, BuildErrorKind> {
        let socket_error = |what, endpoint: &str| {
            let endpoint = endpoint.to_owned();
            move |source| BuildErrorKind::Socket {
                what,
                endpoint,
                source,
            }
        };
        let hwm = i32::try_from(self.hwm).unwrap_or(i32::MAX);
        let linger = i32::try_from(self.linger.as_millis()).unwrap_or(i32::MAX);
        let context = zmq::Context::new();
        let publisher = context
            .socket(zmq::PUB)
            .map_err(socket_error("create PUB socket", ""))?;
        publisher
            .set_sndhwm(hwm)
            .and_then(|()| publisher.set_linger(linger))
            .map_err(socket_error("configure PUB socket", ""))?;
        let endpoint = match self.endpoint.as_ref() {
            Some(PubEndpoint::Bind(e)) => {
                publisher.bind(e).map_err(socket_error("bind", e))?;
                last_endpoint(&publisher).unwrap_or_else(|| e.clone())
            }
            Some(PubEndpoint::Connect(e)) => {
                publisher.connect(e).map_err(socket_error("connect", e))?;
                e.clone()
            }
            None => return Err(BuildErrorKind::MissingEndpoint),
        };
        let replay = match &self.replay_endpoint {
            None => None,
            Some(e) => {
                let router = context
                    .socket(zmq::ROUTER)
                    .map_err(socket_error("create ROUTER socket", ""))?;
                router
                    .set_sndhwm(hwm)
                    .and_then(|()| router.set_linger(linger))
                    .and_then(|()| router.set_router_mandatory(true))
                    .and_then(|()| router.set_maxmsgsize(MAX_REQUEST_FRAME))
                    .map_err(socket_error("configure ROUTER socket", ""))?;
                router.bind(e).map_err(socket_error("bind replay", e))?;
                let resolved = last_endpoint(&router).unwrap_or_else(|| e.clone());
                Some((router, resolved))
            }
        };
        Ok(Sockets {
            context,
            publisher,
            endpoint,
            replay,
        })
    }

    fn start(mut self, sockets: Sockets) -> Result<EventPublisher, BuildError> {
        let Sockets {
            context,
            publisher,
            endpoint,
            replay,
        } = sockets;
        let (replay, replay_endpoint) = match replay {
            Some((socket, resolved)) => (Some(ReplayServer::new(socket)), Some(resolved)),
            None => (None, None),
        };
        let counters = Arc::new(Counters::default());
        let (control, control_rx) = mpsc::channel();
        let mut sources = std::mem::take(&mut self.sources);
        // One source's `Cleared` must not empty a router's view of the others (see `mapping`).
        let clears_all = sources.len() == 1;
        sources
            .iter_mut()
            .for_each(|s| s.meta.clears_all = clears_all);
        // The sources travel to the thread through a channel so that they can come back if
        // the thread cannot be started.
        let (hand_over, handed) = mpsc::sync_channel::<Vec<Source>>(1);
        let worker_counters = Arc::clone(&counters);
        let builder = self;
        let spawned = std::thread::Builder::new()
            .name("kvbm-events".into())
            .spawn(move || {
                let Ok(sources) = handed.recv() else { return };
                Worker {
                    publisher,
                    replay,
                    sources: sources.into_iter().map(SourceState::new).collect(),
                    topic: builder.topic.into_bytes(),
                    rank: builder.data_parallel_rank,
                    layout: builder.layout,
                    buffer: ReplayBuffer::new(builder.buffer_steps),
                    next_seq: 0,
                    pending: Vec::new(),
                    scratch: Vec::new(),
                    counters: worker_counters,
                    control: control_rx,
                    max_batch_events: builder.max_batch_events,
                    poll_interval: builder.poll_interval,
                    force_clear: false,
                    _context: context,
                }
                .run();
            });
        match spawned {
            Ok(thread) => {
                if let Err(mpsc::SendError(sources)) = hand_over.send(sources) {
                    // The thread ended before taking them (cannot happen: it waits for them).
                    let _ = thread.join();
                    return Err(BuildError {
                        kind: BuildErrorKind::Thread(std::io::Error::other(
                            "the publisher thread ended before it started",
                        )),
                        sources,
                    });
                }
                Ok(EventPublisher {
                    control,
                    thread: Some(thread),
                    counters,
                    endpoint,
                    replay_endpoint,
                })
            }
            Err(e) => Err(BuildError {
                kind: BuildErrorKind::Thread(e),
                sources,
            }),
        }
    }
}

fn last_endpoint(socket: &zmq::Socket) -> Option<String> {
    socket.get_last_endpoint().ok()?.ok()
}

struct Sockets {
    context: zmq::Context,
    publisher: zmq::Socket,
    endpoint: String,
    replay: Option<(zmq::Socket, String)>,
}

/// One source and what the thread tracks about it.
struct SourceState {
    source: Source,
    /// The kvbm `seq` the next event must have (a different one means events were lost).
    expected: Option<u64>,
    /// Events the manager dropped from this queue that a resync already covers.
    accounted: u64,
    /// A batch taken while waiting, not yet published.
    carry: Option<EventBatch>,
    /// Drops counted by subscriptions this source replaced at a resync (batches, events).
    replaced_losses: (u64, u64),
}

impl SourceState {
    /// Drops counted before the publisher started are losses too (the subscription existed).
    /// With a snapshot, the stream must continue right after it.
    fn new(source: Source) -> Self {
        Self {
            expected: source.snapshot.as_ref().map(|s| s.next_seq),
            source,
            accounted: 0,
            carry: None,
            replaced_losses: (0, 0),
        }
    }

    /// Replaces the subscription with a fresh snapshot and subscription of the same manager,
    /// if the source can; the snapshot is published next.
    fn resubscribe(&mut self) -> bool {
        let Some(resubscribe) = self.source.resubscribe.as_mut() else {
            return false;
        };
        let (snapshot, subscriber) = resubscribe();
        let old = std::mem::replace(&mut self.source.subscriber, subscriber);
        self.replaced_losses.0 += old.dropped_batches();
        self.replaced_losses.1 += old.dropped_events();
        self.expected = Some(snapshot.next_seq);
        self.accounted = 0;
        self.carry = None;
        self.source.snapshot = Some(snapshot);
        true
    }
}

/// What goes into the next wire batch, in order.
enum Item {
    /// Events of `sources[source]`'s snapshot.
    Snapshot {
        source: usize,
        kinds: Vec<KvEventKind>,
    },
    /// `AllBlocksCleared`, because events were lost.
    Clear,
    /// A kvbm batch of `sources[source]`.
    Batch { source: usize, batch: EventBatch },
}

struct Worker {
    publisher: zmq::Socket,
    replay: Option<ReplayServer>,
    sources: Vec<SourceState>,
    topic: Vec<u8>,
    rank: Option<u32>,
    layout: BatchLayout,
    buffer: ReplayBuffer,
    /// The `seq` of the next published batch.
    next_seq: u64,
    pending: Vec<Item>,
    scratch: Vec<u8>,
    counters: Arc<Counters>,
    control: Receiver<Control>,
    max_batch_events: usize,
    poll_interval: Duration,
    /// An encoding failure lost events: the next batch starts with `AllBlocksCleared`.
    force_clear: bool,
    /// Dropped last: terminating the context waits (up to the linger) for queued messages.
    _context: zmq::Context,
}

impl Worker {
    fn run(mut self) {
        self.publish_snapshots();
        loop {
            let mut stop = false;
            loop {
                match self.control.try_recv() {
                    Ok(Control::Flush(ack)) => {
                        self.drain();
                        // The caller may have stopped waiting.
                        let _ = ack.send(());
                    }
                    Ok(Control::Stop) | Err(TryRecvError::Disconnected) => {
                        stop = true;
                        break;
                    }
                    Err(TryRecvError::Empty) => break,
                }
            }
            if stop {
                self.drain();
                return;
            }
            let replayed = self.replay_step();
            let published = self.publish_step();
            if !replayed && !published {
                self.wait();
            }
        }
    }

    /// Publishes each source's snapshot, in batches of at most `max_batch_events` events,
    /// or larger ones if that many batches would fill more than half of the replay buffer
    /// (the snapshots, and the resync batch before them, must not push their own head out of
    /// the buffer before a late router could replay it): the half is shared among the
    /// sources that have a snapshot to publish.
    fn publish_snapshots(&mut self) {
        let snapshots = self
            .sources
            .iter()
            .filter(|s| s.source.snapshot.is_some())
            .count();
        for i in 0..self.sources.len() {
            let Some(snapshot) = self.sources[i].source.snapshot.take() else {
                continue;
            };
            let kinds = snapshot.stored_events();
            let most_batches = (self.buffer.capacity() / 2 / snapshots).max(1);
            let per_batch = self
                .max_batch_events
                .max(kinds.len().div_ceil(most_batches));
            let mut kinds = kinds.into_iter().peekable();
            while kinds.peek().is_some() {
                let chunk: Vec<KvEventKind> = kinds.by_ref().take(per_batch).collect();
                let events = chunk.len();
                let items = [Item::Snapshot {
                    source: i,
                    kinds: chunk,
                }];
                self.publish(&items, events);
            }
        }
    }

    /// Publishes until every source's queue is empty.
    fn drain(&mut self) {
        while self.publish_step() {}
    }

    fn replay_step(&mut self) -> bool {
        match &mut self.replay {
            Some(server) => server.step(&self.buffer, &self.counters),
            None => false,
        }
    }

    /// Sleeps until a replay request or an event may be waiting, at most `poll_interval`.
    fn wait(&mut self) {
        if let Some(server) = &self.replay {
            let ms = i64::try_from(self.poll_interval.as_millis()).unwrap_or(i64::MAX);
            let mut items = [server.socket.as_poll_item(zmq::POLLIN)];
            if let Err(e) = zmq::poll(&mut items, ms) {
                tracing::debug!(error = %e, "poll interrupted");
            }
        } else if let Some(first) = self.sources.first_mut() {
            first.carry = first.source.subscriber.recv_timeout(self.poll_interval);
        }
    }

    /// Gathers queued kvbm batches into one wire batch and publishes it. Returns whether a
    /// batch was published.
    fn publish_step(&mut self) -> bool {
        let events = self.gather();
        if self.pending.is_empty() {
            return false;
        }
        let mut pending = std::mem::take(&mut self.pending);
        self.publish(&pending, events);
        pending.clear();
        self.pending = pending;
        // Snapshots taken by a resync follow its `AllBlocksCleared`.
        self.publish_snapshots();
        true
    }

    /// Fills `pending`, round-robin over the sources, until `max_batch_events` events or
    /// nothing is left; returns the number of wire events.
    ///
    /// Events a manager dropped (its queue was full) are announced by an `AllBlocksCleared` at
    /// the point of the loss: before the first batch after the gap in kvbm's `seq`, or, when
    /// the queue is empty and the drop counter has moved, after everything taken so far (the
    /// counter is read before the queue, so the lost events are older than any batch still to
    /// come, and the next batch's `seq` is known).
    fn gather(&mut self) -> usize {
        let mut events = 0;
        let clear = |pending: &mut Vec<Item>, events: &mut usize, counters: &Counters| {
            if !matches!(pending.last(), Some(Item::Clear)) {
                pending.push(Item::Clear);
                Counters::add(&counters.resyncs, 1);
                *events += 1;
            }
        };
        let mut resync = std::mem::take(&mut self.force_clear);
        if resync {
            clear(&mut self.pending, &mut events, &self.counters);
        }
        'rounds: loop {
            let mut took = false;
            for (i, s) in self.sources.iter_mut().enumerate() {
                if events >= self.max_batch_events {
                    break 'rounds;
                }
                let lost = s.source.subscriber.dropped_events();
                let Some(batch) = s.carry.take().or_else(|| s.source.subscriber.try_recv()) else {
                    if lost > s.accounted {
                        // Lost after the last batch taken, before any batch still to come.
                        s.expected = s.expected.map(|e| e + (lost - s.accounted));
                        s.accounted = lost;
                        clear(&mut self.pending, &mut events, &self.counters);
                        resync = true;
                    }
                    continue;
                };
                took = true;
                if let (Some(first), Some(last)) = (batch.first(), batch.last()) {
                    if let Some(expected) = s.expected.filter(|&e| e != first.seq) {
                        s.accounted += first.seq.wrapping_sub(expected);
                        clear(&mut self.pending, &mut events, &self.counters);
                        resync = true;
                    }
                    s.expected = Some(last.seq + 1);
                }
                let meta = s.source.meta;
                events += batch
                    .iter()
                    .filter(|e| wire_event(e, &meta).is_some())
                    .count();
                self.pending.push(Item::Batch { source: i, batch });
            }
            if !took {
                break;
            }
        }
        if resync {
            events = self.resnapshot(events);
        }
        let (batches, dropped) = self.sources.iter().fold((0, 0), |(b, e), s| {
            (
                b + s.replaced_losses.0 + s.source.subscriber.dropped_batches(),
                e + s.replaced_losses.1 + s.source.subscriber.dropped_events(),
            )
        });
        let c = &self.counters;
        c.batches_dropped
            .store(batches, std::sync::atomic::Ordering::Relaxed);
        c.events_dropped
            .store(dropped, std::sync::atomic::Ordering::Relaxed);
        events
    }

    /// After an `AllBlocksCleared` in `pending`: every source that can takes a fresh snapshot
    /// and subscription (published right after this batch), and its batches gathered after
    /// the clear are dropped (older than its snapshot, which covers them). Sources that
    /// cannot stay as they are: the router's view of them refills with their next events.
    /// Returns the wire events left in `pending`.
    fn resnapshot(&mut self, events: usize) -> usize {
        let Some(clear) = self.pending.iter().rposition(|i| matches!(i, Item::Clear)) else {
            return events;
        };
        let renewed: Vec<bool> = self
            .sources
            .iter_mut()
            .map(SourceState::resubscribe)
            .collect();
        if !renewed.contains(&true) {
            return events;
        }
        let mut index = 0;
        self.pending.retain(|item| {
            let keep = index <= clear
                || !matches!(item, Item::Batch { source, .. } | Item::Snapshot { source, .. } if renewed[*source]);
            index += 1;
            keep
        });
        self.pending.iter().map(|item| self.wire_events(item)).sum()
    }

    /// How many wire events `item` becomes.
    fn wire_events(&self, item: &Item) -> usize {
        match item {
            Item::Clear => 1,
            Item::Snapshot { source, kinds } => {
                let source = &self.sources[*source].source;
                let medium = source.meta.medium.as_str();
                kinds
                    .iter()
                    .filter(|k| wire_kind(k, medium, &source.meta).is_some())
                    .count()
            }
            Item::Batch { source, batch } => {
                let meta = self.sources[*source].source.meta;
                batch
                    .iter()
                    .filter(|e| wire_event(e, &meta).is_some())
                    .count()
            }
        }
    }

    fn publish(&mut self, pending: &[Item], events: usize) {
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        let mut writer = match BatchWriter::begin(scratch, self.layout, ts, events, self.rank) {
            Ok(w) => w,
            Err((buf, e)) => return self.encode_failed(buf, &e),
        };
        let mut blocks = 0;
        for item in pending {
            let result = match item {
                Item::Clear => writer.event(&WireEvent::AllBlocksCleared),
                Item::Snapshot { source, kinds } => {
                    let source = &self.sources[*source].source;
                    let meta = source.meta;
                    let medium = source.meta.medium.as_str();
                    kinds
                        .iter()
                        .filter_map(|k| wire_kind(k, medium, &meta))
                        .try_for_each(|e| {
                            blocks += e.block_count();
                            writer.event(&e)
                        })
                }
                Item::Batch { source, batch } => {
                    let meta = self.sources[*source].source.meta;
                    batch
                        .iter()
                        .filter_map(|e| wire_event(e, &meta))
                        .try_for_each(|e| {
                            blocks += e.block_count();
                            writer.event(&e)
                        })
                }
            };
            if let Err(e) = result {
                return self.encode_failed(writer.abandon(), &e);
            }
        }
        let payload = writer.finish();
        let seq = self.next_seq;
        let sent = self
            .publisher
            .send(&self.topic[..], zmq::SNDMORE)
            .and_then(|()| self.publisher.send(&seq.to_be_bytes()[..], zmq::SNDMORE))
            .and_then(|()| self.publisher.send(&payload[..], 0));
        if let Err(e) = sent {
            Counters::add(&self.counters.send_errors, 1);
            tracing::warn!(error = %e, seq, "publishing a KV-event batch failed; it stays in the replay buffer");
        }
        self.buffer.push(payload.as_slice().into());
        self.next_seq += 1;
        self.scratch = payload;
        let c = &self.counters;
        Counters::add(&c.events_published, events as u64);
        Counters::add(&c.block_events_published, blocks as u64);
        Counters::add(&c.batches_published, 1);
    }

    fn encode_failed(&mut self, buf: Vec<u8>, error: &crate::wire::EncodeError) {
        tracing::error!(%error, "a KV-event batch could not be encoded; subscribers will be told to resync");
        Counters::add(&self.counters.encode_errors, 1);
        self.scratch = buf;
        self.force_clear = true;
    }
}
