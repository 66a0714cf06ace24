//! The publisher's configuration: sources, endpoints, limits, and the errors of `build()`.

use std::time::Duration;

use kvbm_logical::{BlockManager, BlockTier, CacheSnapshot, EventSubscriber};

use crate::mapping::SourceMeta;
use crate::wire::{BatchLayout, Medium};

/// Past batches kept for replay (vLLM's `buffer_steps`).
pub const DEFAULT_BUFFER_STEPS: usize = 10_000;
/// ZeroMQ high-water mark of the PUB socket and of each replay peer, in messages (vLLM's `hwm`).
pub const DEFAULT_HWM: usize = 100_000;
/// Batches (one per manager call) a [`Source::manager`] queue holds before the manager drops
/// and counts further ones.
pub const DEFAULT_QUEUE_BATCHES: usize = 16_384;
/// Most events in one published batch (kvbm batches are never split, so one batch can exceed
/// it by the events of one manager call).
pub const DEFAULT_MAX_BATCH_EVENTS: usize = 1_024;
/// How long dropping the publisher waits for queued messages to leave (ZeroMQ's linger).
pub const DEFAULT_LINGER: Duration = Duration::from_secs(1);
/// How long the publisher thread sleeps when it has nothing to do: the worst added latency
/// of an event when a replay socket is configured or there are several sources.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(1);
/// The rank written in every batch unless configured (vLLM's publisher writes its rank, 0 by
/// default; Dynamo's decoder requires the field).
pub const DEFAULT_DATA_PARALLEL_RANK: Option<u32> = Some(0);

/// Where the PUB socket goes.
///
/// ```
/// use kvbm_events::PubEndpoint;
/// // vLLM's rule: a wildcard, `::`, `ipc://` or `inproc://` binds; anything else connects.
/// assert_eq!(PubEndpoint::auto("tcp://*:5557"), PubEndpoint::Bind("tcp://*:5557".into()));
/// assert_eq!(PubEndpoint::auto("tcp://router:5557"), PubEndpoint::Connect("tcp://router:5557".into()));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PubEndpoint {
    /// Bind (subscribers connect to this server); the usual set-up.
    Bind(String),
    /// Connect (to a proxy or a subscriber that binds).
    Connect(String),
}

impl PubEndpoint {
    /// vLLM's heuristic: bind when the endpoint contains `*` or `::` or is `ipc://` or
    /// `inproc://`, connect otherwise.
    pub fn auto(endpoint: &str) -> Self {
        if endpoint.contains('*')
            || endpoint.contains("::")
            || endpoint.starts_with("ipc://")
            || endpoint.starts_with("inproc://")
        {
            Self::Bind(endpoint.to_owned())
        } else {
            Self::Connect(endpoint.to_owned())
        }
    }

    /// The endpoint string.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Bind(e) | Self::Connect(e) => e,
        }
    }
}

/// One stream of kvbm events to publish: a subscription to a manager, with what the events do
/// not carry themselves (the tier's medium and the block size).
///
/// A tier stack's G1 and G2 managers are reached through their read-only views:
/// `Source::new(stack.g1().subscribe(n), Medium::GPU, stack.g1().block_size())`.
///
/// ```
/// use kvbm_events::{Medium, Source};
/// use kvbm_logical::{BlockManager, Host};
/// let host = BlockManager::<Host>::builder().block_count(8).block_size(32).build()?;
/// let source = Source::manager(&host, 1024);
/// assert_eq!(source.medium(), Medium::CPU);
/// assert_eq!(source.block_size(), 32);
/// let same = Source::new(host.subscribe(1024), Medium::CPU, host.block_size());
/// assert_eq!(same.medium(), source.medium());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Source {
    pub(crate) subscriber: EventSubscriber,
    pub(crate) meta: SourceMeta,
    pub(crate) snapshot: Option<CacheSnapshot>,
    /// Takes a fresh snapshot and subscription of the same manager (sources built by
    /// [`manager`](Self::manager)), so that a resync after lost events restores the
    /// router's view instead of leaving it empty.
    pub(crate) resubscribe: Option<Resubscribe>,
}

/// A fresh `subscribe_with_snapshot` of a source's manager, with the queue size given.
pub(crate) type Resubscribe = Box<dyn FnMut() -> (CacheSnapshot, EventSubscriber) + Send>;

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("subscriber", &self.subscriber)
            .field("meta", &self.meta)
            .field("snapshot_blocks", &self.snapshot_blocks())
            .field("resubscribes", &self.resubscribe.is_some())
            .finish()
    }
}

impl Source {
    /// Events from `subscriber` of a manager of `medium` and `block_size` tokens per block
    /// (each event is published with its own medium and block size; these describe the
    /// source). Blocks registered before the subscription are not announced: see
    /// [`with_snapshot`](Self::with_snapshot).
    pub fn new(subscriber: EventSubscriber, medium: Medium, block_size: usize) -> Self {
        Self {
            subscriber,
            meta: SourceMeta {
                medium,
                block_size: u64::try_from(block_size).unwrap_or(u64::MAX),
                clears_all: true,
            },
            snapshot: None,
            resubscribe: None,
        }
    }

    /// A subscription taken with its snapshot
    /// ([`BlockManager::subscribe_with_snapshot`]): the publisher publishes the snapshot's
    /// blocks first, as `BlockStored` batches (parents first, no tokens), then the stream, so
    /// that a router that replays from `seq` 0 sees every block the manager had.
    pub fn with_snapshot(snapshot: CacheSnapshot, subscriber: EventSubscriber) -> Self {
        let medium =
            Medium::for_tier_name(snapshot.tier).unwrap_or(Medium::custom(snapshot.medium));
        let mut source = Self::new(subscriber, medium, snapshot.block_size);
        source.snapshot = Some(snapshot);
        source
    }

    /// Subscribes to `manager` with its snapshot ([`with_snapshot`](Self::with_snapshot)) and a
    /// queue of `queue_batches` batches; the medium follows the tier ([`Medium::for_tier`]).
    ///
    /// The source keeps a handle of the manager: if the manager drops events because this
    /// queue was full, the publisher's resync (`AllBlocksCleared`) is followed by a fresh
    /// snapshot of every such source, so a router's view is whole again at once (see
    /// [Never blocking the managers](crate#never-blocking-the-managers)).
    pub fn manager<T: BlockTier>(manager: &BlockManager<T>, queue_batches: usize) -> Self {
        let (snapshot, subscriber) = manager.subscribe_with_snapshot(queue_batches);
        let mut source = Self::with_snapshot(snapshot, subscriber);
        let manager = manager.clone();
        source.resubscribe = Some(Box::new(move || {
            manager.subscribe_with_snapshot(queue_batches)
        }));
        source
    }

    /// How many blocks its snapshot announces first (0 without one).
    pub fn snapshot_blocks(&self) -> usize {
        self.snapshot.as_ref().map_or(0, |s| s.blocks.len())
    }

    /// The medium its events are published with.
    pub fn medium(&self) -> Medium {
        self.meta.medium
    }

    /// The block size its `BlockStored` events carry.
    pub fn block_size(&self) -> u64 {
        self.meta.block_size
    }

    /// The subscription back.
    pub fn into_subscriber(self) -> EventSubscriber {
        self.subscriber
    }
}

/// Configures and starts an [`EventPublisher`](crate::EventPublisher); see the
/// [crate docs](crate) for an example. Setters never fail; [`build`](Self::build) checks.
#[derive(Debug)]
pub struct PublisherBuilder {
    pub(crate) endpoint: Option<PubEndpoint>,
    pub(crate) replay_endpoint: Option<String>,
    pub(crate) topic: String,
    pub(crate) buffer_steps: usize,
    pub(crate) hwm: usize,
    pub(crate) data_parallel_rank: Option<u32>,
    pub(crate) layout: BatchLayout,
    pub(crate) linger: Duration,
    pub(crate) max_batch_events: usize,
    pub(crate) poll_interval: Duration,
    pub(crate) sources: Vec<Source>,
}

impl Default for PublisherBuilder {
    fn default() -> Self {
        Self {
            endpoint: None,
            replay_endpoint: None,
            topic: String::new(),
            buffer_steps: DEFAULT_BUFFER_STEPS,
            hwm: DEFAULT_HWM,
            data_parallel_rank: DEFAULT_DATA_PARALLEL_RANK,
            layout: BatchLayout::Array,
            linger: DEFAULT_LINGER,
            max_batch_events: DEFAULT_MAX_BATCH_EVENTS,
            poll_interval: DEFAULT_POLL_INTERVAL,
            sources: Vec::new(),
        }
    }
}

impl PublisherBuilder {
    /// The PUB socket binds `endpoint` (e.g. `tcp://*:5557`; `tcp://127.0.0.1:*` picks a free
    /// port, see [`EventPublisher::endpoint`](crate::EventPublisher::endpoint)).
    pub fn bind(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = Some(PubEndpoint::Bind(endpoint.into()));
        self
    }

    /// The PUB socket connects to `endpoint`.
    pub fn connect(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = Some(PubEndpoint::Connect(endpoint.into()));
        self
    }

    /// The PUB endpoint, bound or connected by vLLM's rule ([`PubEndpoint::auto`]).
    pub fn endpoint(mut self, endpoint: &str) -> Self {
        self.endpoint = Some(PubEndpoint::auto(endpoint));
        self
    }

    /// A ROUTER socket bound to `endpoint` answers replay requests (default: none).
    pub fn replay_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.replay_endpoint = Some(endpoint.into());
        self
    }

    /// The first frame of every message (default empty: every subscriber gets everything).
    pub fn topic(mut self, topic: impl Into<String>) -> Self {
        self.topic = topic.into();
        self
    }

    /// Batches kept for replay ([`DEFAULT_BUFFER_STEPS`]).
    pub fn buffer_steps(mut self, batches: usize) -> Self {
        self.buffer_steps = batches;
        self
    }

    /// High-water mark in messages ([`DEFAULT_HWM`]): a subscriber that falls further behind
    /// loses messages (it sees the gap in `seq` and replays).
    pub fn hwm(mut self, messages: usize) -> Self {
        self.hwm = messages;
        self
    }

    /// The rank written in every batch; `None` writes `nil` ([`DEFAULT_DATA_PARALLEL_RANK`]).
    pub fn data_parallel_rank(mut self, rank: Option<u32>) -> Self {
        self.data_parallel_rank = rank;
        self
    }

    /// How batches are framed ([`BatchLayout::Array`], vLLM 0.26's, by default).
    pub fn batch_layout(mut self, layout: BatchLayout) -> Self {
        self.layout = layout;
        self
    }

    /// How long dropping the publisher may wait for messages still queued ([`DEFAULT_LINGER`]).
    pub fn linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    /// Most events per published batch ([`DEFAULT_MAX_BATCH_EVENTS`]).
    pub fn max_batch_events(mut self, events: usize) -> Self {
        self.max_batch_events = events;
        self
    }

    /// The idle sleep of the publisher thread, at least 1 ms ([`DEFAULT_POLL_INTERVAL`]).
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// Adds a stream of events.
    pub fn source(mut self, source: Source) -> Self {
        self.sources.push(source);
        self
    }

    /// Checks the configuration (no socket is touched when it is wrong).
    pub(crate) fn validate(&self) -> Result<(), BuildErrorKind> {
        if self.endpoint.is_none() {
            return Err(BuildErrorKind::MissingEndpoint);
        }
        if self.sources.is_empty() {
            return Err(BuildErrorKind::NoSources);
        }
        let int_max = i32::MAX as u128;
        let checks: [(&'static str, u128, u128, u128); 5] = [
            (
                "buffer_steps",
                self.buffer_steps as u128,
                1,
                usize::MAX as u128,
            ),
            ("hwm", self.hwm as u128, 1, int_max),
            (
                "max_batch_events",
                self.max_batch_events as u128,
                1,
                u32::MAX as u128,
            ),
            ("linger_ms", self.linger.as_millis(), 0, int_max),
            (
                "poll_interval_ms",
                self.poll_interval.as_millis(),
                1,
                int_max,
            ),
        ];
        for (field, value, min, max) in checks {
            if value < min || value > max {
                return Err(BuildErrorKind::OutOfRange {
                    field,
                    value,
                    min,
                    max,
                });
            }
        }
        Ok(())
    }
}

/// Why [`PublisherBuilder::build`] refused; [`into_sources`](Self::into_sources) gives the
/// sources back.
#[derive(Debug, thiserror::Error)]
#[error("{kind}")]
pub struct BuildError {
    pub(crate) kind: BuildErrorKind,
    pub(crate) sources: Vec<Source>,
}

impl BuildError {
    /// What was wrong.
    pub fn kind(&self) -> &BuildErrorKind {
        &self.kind
    }

    /// The sources the builder held, unchanged.
    pub fn into_sources(self) -> Vec<Source> {
        self.sources
    }
}

/// What [`BuildError`] reports.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildErrorKind {
    /// Neither `bind`, `connect` nor `endpoint` was called.
    #[error("no PUB endpoint: call bind, connect or endpoint")]
    MissingEndpoint,
    /// No source was added.
    #[error("no event source")]
    NoSources,
    /// A limit outside its range (durations in milliseconds).
    #[error("{field} = {value} is outside {min}..={max}")]
    OutOfRange {
        /// The setting.
        field: &'static str,
        /// Its value.
        value: u128,
        /// The smallest accepted.
        min: u128,
        /// The largest accepted.
        max: u128,
    },
    /// ZeroMQ refused a socket, an option, a bind or a connect.
    #[error("{what} {endpoint:?}: {source}")]
    Socket {
        /// What was being done.
        what: &'static str,
        /// The endpoint involved (empty for socket creation and options).
        endpoint: String,
        /// ZeroMQ's error.
        #[source]
        source: zmq::Error,
    },
    /// The publisher thread could not start.
    #[error("cannot start the publisher thread: {0}")]
    Thread(#[source] std::io::Error),
}
