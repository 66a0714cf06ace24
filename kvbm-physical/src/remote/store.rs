//! [`RemoteStore`]: the G4 store tier on Redis or Redis Cluster.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kvbm_logical::SequenceHash;
use parking_lot::{Mutex, RwLock};
use redis::Value;
use xxhash_rust::xxh3::Xxh3;

use super::breaker::{Admit, BreakerState};
use super::config::{ConfigError, RemoteConfig, SMALL_PIPELINE_DEPTH};
use super::format::{Corruption, HEADER_BYTES, check_head, checksum_seed, header, stored_checksum};
use super::node::{Conn, Failure, Node, Packer};
use super::resp::BlockReply;
use super::stats::{Counters, RemoteStats};
use super::topology::Topology;
use crate::{GetOutcome, PutOutcome, SkipReason, StoreBlock, StoreError, StoreStats, StoreTier};

/// The slowest transfer (bytes per second) a round trip's deadline allows for its payload,
/// on top of the response timeout: a node slower than this is stalled. Low (10 MB/s), so that
/// a healthy link shared by several workers (1 GbE, another zone) never trips it; a node
/// that trickles bytes is far slower.
const MIN_TRANSFER_RATE: f64 = 10e6;

/// Slot-map refreshes happen at most this often (unless a `MOVED` forces one).
const REFRESH_INTERVAL: Duration = Duration::from_millis(100);

/// The remote tier (G4): block images in Redis or a Redis Cluster, shared by every server of a
/// [`Namespace`](super::Namespace). See the [module docs](super) for the format and the
/// failure behaviour.
///
/// Opening makes no connection: a server starts even when Redis is down, and the tier simply
/// misses until Redis answers.
///
/// ```
/// use kvbm_logical::SequenceHash;
/// use kvbm_physical::remote::{Namespace, RemoteConfig, RemoteStore};
/// use kvbm_physical::{GetOutcome, PutOutcome, SkipReason, StoreBlock, StoreTier};
/// use std::time::Duration;
///
/// // Nothing listens on port 1: every call is a quick miss or skip, never an error or a panic.
/// let config = RemoteConfig::builder(Namespace::new("demo", 1), 4096)
///     .url("redis://127.0.0.1:1")
///     .connect_timeout(Duration::from_millis(50))
///     .build()?;
/// let store = RemoteStore::open(config)?;
/// let block = vec![1u8; 4096];
/// let put = store.put(&[StoreBlock { hash: SequenceHash::new(1), parent: None, bytes: &block }]);
/// assert_eq!(put, vec![PutOutcome::Skipped(SkipReason::Unavailable)]);
/// assert_eq!(store.contains(&[SequenceHash::new(1)]), vec![false]);
/// let mut out = vec![0u8; 4096];
/// let got = store.get(&[SequenceHash::new(1)], &mut [&mut out[..]]);
/// assert!(!got[0].is_hit());
/// # Ok::<(), kvbm_physical::remote::ConfigError>(())
/// ```
pub struct RemoteStore {
    config: RemoteConfig,
    fingerprint: u64,
    topology: RwLock<Arc<Topology>>,
    /// Every node seen, by `host:port`, so that breakers and pools survive slot-map refreshes.
    known: Mutex<HashMap<String, Arc<Node>>>,
    stale: AtomicBool,
    refresh: Mutex<Option<Instant>>,
    counters: Counters,
    /// When refused writes were last warned about, and the refused puts since.
    refusals: Mutex<RefusalLog>,
    /// The rustls configuration of `rediss://` nodes.
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for RemoteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteStore")
            .field("config", &self.config)
            .field("nodes", &self.node_states())
            .finish_non_exhaustive()
    }
}

/// One command kind of a batch, with what to do with its replies.
trait Batch: Sync {
    /// Per-command result, written by whoever handles the command's node.
    type Slot: Send;
    /// Bytes the command carries (to bound a round trip).
    fn payload_bytes(&self, i: usize) -> usize;
    /// Writes command `i` for `key`.
    fn encode<'b>(&'b self, i: usize, key: &[u8], p: &mut Packer<'_, 'b>);
    /// Reads command `i`'s reply: `None` when this handled it, or the reply for
    /// [`reply`](Batch::reply) (after redirections and node-level errors are taken out).
    fn read(
        &self,
        _i: usize,
        _slot: &mut Self::Slot,
        conn: &mut Conn,
    ) -> std::io::Result<Option<Value>> {
        conn.recv().map(Some)
    }
    /// Command `i`'s reply (not a redirection, not a node-level error).
    fn reply(&self, i: usize, slot: &mut Self::Slot, value: Value);
    /// Command `i` got no reply.
    fn fail(&self, i: usize, slot: &mut Self::Slot, why: &Failure);
}

/// Commands of a batch to run: (index, result slot).
type Items<'s, B> = Vec<(usize, &'s mut <B as Batch>::Slot)>;

/// Commands of a batch with where a redirection sent them (`None`: by the slot map).
type Routed<'s, B> = Vec<(usize, &'s mut <B as Batch>::Slot, Option<Redirect>)>;

/// Where a `MOVED` or `ASK` sent a command.
struct Redirect {
    /// An `ASK`: once, behind an `ASKING` (the slot is being migrated there).
    ask: bool,
    node: Arc<Node>,
}

/// The most redirections one command follows in a call (a `MOVED`, then an `ASK` during a
/// migration, then one more).
const MAX_REDIRECTS: usize = 3;

/// The keys of a batch, in one allocation.
struct Keys {
    flat: Vec<u8>,
    len: usize,
}

impl Keys {
    fn get(&self, i: usize) -> &[u8] {
        &self.flat[i * self.len..(i + 1) * self.len]
    }
}

/// Server error codes that mean "this node cannot serve now" rather than "this command is
/// wrong".
fn node_level(code: &str) -> bool {
    matches!(
        code,
        "LOADING"
            | "MASTERDOWN"
            | "CLUSTERDOWN"
            | "TRYAGAIN"
            | "READONLY"
            | "BUSY"
            | "NOAUTH"
            | "WRONGPASS"
            | "NOREPLICAS"
    )
}

impl RemoteStore {
    /// Opens the store. Makes no connection (see the type's docs); fails only on TLS material
    /// that cannot be used.
    pub fn open(config: RemoteConfig) -> Result<Self, ConfigError> {
        let tls = super::tls::client_config(&config)?;
        let mut known = HashMap::new();
        let mut first = None;
        for e in &config.endpoints {
            let node = Arc::new(Node::new(&config, tls.clone(), &e.host, e.port));
            first.get_or_insert_with(|| Arc::clone(&node));
            known.insert(node.name.clone(), node);
        }
        let topology = match (config.cluster, first) {
            (false, Some(node)) => Topology::single(node),
            _ => Topology::empty(),
        };
        Ok(Self {
            fingerprint: config.namespace.fingerprint(),
            stale: AtomicBool::new(config.cluster),
            config,
            topology: RwLock::new(Arc::new(topology)),
            known: Mutex::new(known),
            refresh: Mutex::new(None),
            refusals: Mutex::new(RefusalLog::default()),
            counters: Counters::default(),
            tls,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &RemoteConfig {
        &self.config
    }

    /// Counters, including the network's (timeouts, breaker trips, redirections).
    pub fn remote_stats(&self) -> RemoteStats {
        self.counters.remote_stats()
    }

    /// Every node known (a cluster's masters once discovered) and its breaker's state.
    pub fn node_states(&self) -> Vec<(String, BreakerState)> {
        let mut v: Vec<_> = self
            .known
            .lock()
            .values()
            .map(|n| (n.name.clone(), n.breaker_state()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// The Redis key of `hash` (for tools and tests that look behind the store's back).
    pub fn key(&self, hash: SequenceHash) -> Vec<u8> {
        self.config.namespace.key(hash)
    }

    fn keys(&self, hashes: impl ExactSizeIterator<Item = SequenceHash>) -> Keys {
        let ns = &self.config.namespace;
        let mut flat = Vec::with_capacity(hashes.len() * ns.key_len());
        for h in hashes {
            ns.write_key(h, &mut flat);
        }
        Keys {
            flat,
            len: ns.key_len(),
        }
    }

    /// The current topology, refreshed first if it is known to be stale.
    fn topology(&self, force_refresh: bool) -> Arc<Topology> {
        if self.config.cluster && (force_refresh || self.stale.load(Ordering::Relaxed)) {
            self.refresh_topology(force_refresh);
        }
        Arc::clone(&self.topology.read())
    }

    fn node(&self, host: &str, port: u16) -> Option<Arc<Node>> {
        let name = super::node::node_name(host, port);
        let mut known = self.known.lock();
        if let Some(n) = known.get(&name) {
            return Some(Arc::clone(n));
        }
        let node = Arc::new(Node::new(&self.config, self.tls.clone(), host, port));
        known.insert(name, Arc::clone(&node));
        Some(node)
    }

    /// Asks the known nodes (current masters first, then the seeds) for the slot map.
    fn refresh_topology(&self, force: bool) {
        // One refresh at a time; the others go on with the current map.
        let Some(mut last) = self.refresh.try_lock() else {
            return;
        };
        let now = Instant::now();
        if !force && last.is_some_and(|t| now.duration_since(t) < REFRESH_INTERVAL) {
            return;
        }
        *last = Some(now);
        let mut candidates: Vec<Arc<Node>> = self.topology.read().nodes.clone();
        for e in &self.config.endpoints {
            if let Some(n) = self.node(&e.host, e.port)
                && !candidates.iter().any(|c| c.name == n.name)
            {
                candidates.push(n);
            }
        }
        for node in candidates {
            let admit = node.admit();
            if admit == Admit::No {
                continue;
            }
            let mut conn = match node.checkout(&self.counters) {
                Ok(c) => c,
                Err(_) => {
                    node.failed(&self.counters);
                    continue;
                }
            };
            let reply = match conn.query(&[b"CLUSTER", b"SLOTS"]) {
                Ok(v) => v,
                Err(e) => {
                    node.classify(&e, &self.counters, node.response_timeout());
                    node.failed(&self.counters);
                    continue;
                }
            };
            node.succeeded(admit == Admit::Probe);
            node.checkin(conn);
            let Some(topology) =
                Topology::from_cluster_slots(&reply, node.host(), |h, p| self.node(h, p))
            else {
                tracing::warn!(node = %node.name, "remote tier: unusable CLUSTER SLOTS reply");
                continue;
            };
            self.counters.topology_refreshes.add(1);
            self.stale.store(topology.has_gaps(), Ordering::Relaxed);
            // Nodes that left the cluster (neither in the map nor a seed) are forgotten: their
            // pools (idle connections) go with the last batch still using them.
            let seeds: Vec<String> = self
                .config
                .endpoints
                .iter()
                .map(|e| super::node::node_name(&e.host, e.port))
                .collect();
            self.known.lock().retain(|name, _| {
                seeds.contains(name) || topology.nodes.iter().any(|n| &n.name == name)
            });
            *self.topology.write() = Arc::new(topology);
            return;
        }
    }

    /// Runs the commands `items` (index, result slot) of `batch`: grouped by node, pipelined
    /// `depth` commands per round trip, nodes in parallel. A redirected command goes to the
    /// node its redirection names: after `MOVED` as it is (the slot map is refreshed for the
    /// next batch), after `ASK` (a slot being migrated) behind an `ASKING`; at most
    /// [`MAX_REDIRECTS`] times.
    fn run<'s, B: Batch>(
        &self,
        batch: &B,
        keys: &Keys,
        items: Vec<(usize, &'s mut B::Slot)>,
        depth: usize,
    ) {
        let mut pending: Routed<'s, B> = items.into_iter().map(|(i, s)| (i, s, None)).collect();
        for attempt in 0..=MAX_REDIRECTS {
            if pending.is_empty() {
                return;
            }
            // Work units: a node, whether each command goes behind an ASKING, the commands.
            let mut work: Vec<(Arc<Node>, bool, Items<'s, B>)> = Vec::new();
            let mut unit =
                |node: Arc<Node>, asking: bool, item: (usize, &'s mut B::Slot)| match work
                    .iter_mut()
                    .find(|(n, a, _)| Arc::ptr_eq(n, &node) && *a == asking)
                {
                    Some((_, _, g)) => g.push(item),
                    None => work.push((node, asking, vec![item])),
                };
            let mut unrouted = Vec::new();
            for (i, slot, to) in pending.drain(..) {
                match to {
                    Some(r) => unit(r.node, r.ask, (i, slot)),
                    None => unrouted.push((i, slot)),
                }
            }
            if !unrouted.is_empty() {
                // Redirected without a usable target: a fresh slot map.
                let topology = self.topology(attempt > 0);
                for (i, slot) in unrouted {
                    match topology.node_for(keys.get(i)) {
                        Some(n) => unit(Arc::clone(&topology.nodes[n]), false, (i, slot)),
                        None => {
                            self.counters.unavailable.add(1);
                            self.stale.store(true, Ordering::Relaxed);
                            batch.fail(i, slot, &Failure::Open);
                        }
                    }
                }
            }
            pending = if work.len() <= 1 {
                match work.pop() {
                    Some((node, asking, group)) => {
                        self.run_node(batch, keys, &node, asking, group, depth)
                    }
                    None => Vec::new(),
                }
            } else {
                std::thread::scope(|s| {
                    let mut handles = Vec::with_capacity(work.len());
                    let last = work.pop();
                    for (node, asking, group) in work {
                        handles.push(s.spawn(move || {
                            self.run_node(batch, keys, &node, asking, group, depth)
                        }));
                    }
                    let mut out = match last {
                        Some((node, asking, group)) => {
                            self.run_node(batch, keys, &node, asking, group, depth)
                        }
                        None => Vec::new(),
                    };
                    for h in handles {
                        match h.join() {
                            Ok(r) => out.extend(r),
                            Err(panic) => std::panic::resume_unwind(panic),
                        }
                    }
                    out
                })
            };
        }
        // Redirected again and again: the cluster is resharding; give up on these for now.
        let why = Failure::Unavailable("redirected too many times (cluster resharding)".to_owned());
        for (i, slot, _) in pending {
            batch.fail(i, slot, &why);
        }
    }

    /// Where a `MOVED` or `ASK` sends a command: the node its details (`slot host:port`)
    /// name; an empty host is the replying node's own.
    fn redirect_target(&self, from: &Node, details: Option<&str>) -> Option<Arc<Node>> {
        let addr = details?.split_whitespace().nth(1)?;
        let (host, port) = addr.rsplit_once(':')?;
        let port: u16 = port.parse().ok()?;
        let host = match host.trim_start_matches('[').trim_end_matches(']') {
            "" => from.host(),
            named => named,
        };
        if host.is_empty() {
            return None;
        }
        self.node(host, port)
    }

    /// One node's share of a batch (each command behind an `ASKING` when `asking`). Returns
    /// the commands redirected elsewhere (`MOVED`/`ASK`), with where to.
    fn run_node<'s, B: Batch>(
        &self,
        batch: &B,
        keys: &Keys,
        node: &Node,
        asking: bool,
        items: Vec<(usize, &'s mut B::Slot)>,
        depth: usize,
    ) -> Routed<'s, B> {
        let mut redirected = Vec::new();
        let admit = node.admit();
        if admit == Admit::No {
            self.counters.unavailable.add(items.len() as u64);
            for (i, slot) in items {
                batch.fail(i, slot, &Failure::Open);
            }
            return redirected;
        }
        let mut conn = match node.checkout(&self.counters) {
            Ok(c) => c,
            Err(f) => {
                self.node_failed(node);
                for (i, slot) in items {
                    batch.fail(i, slot, &f);
                }
                return redirected;
            }
        };
        let max_bytes = self.config.max_pipeline_bytes;
        let mut rest = items.into_iter().peekable();
        while rest.peek().is_some() {
            let mut chunk = Vec::with_capacity(depth.min(rest.len()));
            let mut bytes = 0usize;
            while let Some((i, _)) = rest.peek() {
                let b = batch.payload_bytes(*i);
                if !chunk.is_empty() && (chunk.len() >= depth || bytes + b > max_bytes) {
                    break;
                }
                bytes += b;
                if let Some(item) = rest.next() {
                    chunk.push(item);
                }
            }
            self.counters.round_trips.add(1);
            // One deadline for the whole round trip (writes and every read of the replies):
            // the response timeout, plus the payload's time at the slowest rate that still
            // counts as progress.
            let rt = node.response_timeout();
            let moving = Duration::from_secs_f64(bytes as f64 / MIN_TRANSFER_RATE);
            let sent = conn
                .set_deadline(Some(Instant::now() + rt + moving), rt)
                .and_then(|()| send(&mut conn, batch, keys, &chunk, asking));
            if let Err(e) = sent {
                let f = node.classify(&e, &self.counters, node.response_timeout());
                self.node_failed(node);
                for (i, slot) in chunk.into_iter().chain(rest) {
                    batch.fail(i, slot, &f);
                }
                return redirected;
            }
            let mut replies = chunk.into_iter();
            while let Some((i, slot)) = replies.next() {
                // ASKING's own reply (+OK) comes first; whatever it is, the command's follows.
                let reply = if asking {
                    conn.recv().and_then(|_| batch.read(i, slot, &mut conn))
                } else {
                    batch.read(i, slot, &mut conn)
                };
                match reply {
                    Ok(None) => {}
                    Ok(Some(Value::ServerError(e))) if matches!(e.code(), "MOVED" | "ASK") => {
                        self.counters.redirects.add(1);
                        let ask = e.code() == "ASK";
                        if !ask {
                            // The slot map is out of date (an ASK is a migration under way).
                            self.stale.store(true, Ordering::Relaxed);
                        }
                        if self.config.cluster {
                            let to = self
                                .redirect_target(node, e.details())
                                .map(|node| Redirect { ask, node });
                            redirected.push((i, slot, to));
                        } else {
                            let f = Failure::Unavailable(format!(
                                "{}: the server is a cluster node; configure cluster mode",
                                node.name
                            ));
                            batch.fail(i, slot, &f);
                        }
                    }
                    Ok(Some(Value::ServerError(e))) if node_level(e.code()) => {
                        if self.config.cluster {
                            self.stale.store(true, Ordering::Relaxed);
                        }
                        if e.code() == "READONLY" {
                            // A replica: refuses writes (a put counts and warns about it),
                            // serves reads.
                            batch.reply(i, slot, Value::ServerError(e));
                        } else {
                            let f = Failure::Unavailable(format!("{}: {}", node.name, e.code()));
                            batch.fail(i, slot, &f);
                        }
                    }
                    Ok(Some(v)) => batch.reply(i, slot, v),
                    Err(e) => {
                        let f = node.classify(&e, &self.counters, node.response_timeout());
                        self.node_failed(node);
                        batch.fail(i, slot, &f);
                        for (j, s) in replies.chain(rest) {
                            batch.fail(j, s, &f);
                        }
                        return redirected;
                    }
                }
            }
        }
        node.succeeded(admit == Admit::Probe);
        if conn.set_deadline(None, node.response_timeout()).is_ok() {
            node.checkin(conn);
        }
        redirected
    }

    fn node_failed(&self, node: &Node) {
        node.failed(&self.counters);
        node.drain_idle();
        if self.config.cluster {
            // A master that stops answering may have been replaced by a replica.
            self.stale.store(true, Ordering::Relaxed);
        }
    }

    fn block_size_error(&self, actual: usize) -> StoreError {
        StoreError::BufferSize {
            expected: self.config.block_bytes,
            actual,
        }
    }
}

/// Writes the commands of `chunk` (each behind an `ASKING` when `asking`) and flushes.
fn send<B: Batch, S>(
    conn: &mut Conn,
    batch: &B,
    keys: &Keys,
    chunk: &[(usize, S)],
    asking: bool,
) -> std::io::Result<()> {
    let mut p = Packer::new(conn);
    for (i, _) in chunk {
        if asking {
            p.array(1);
            p.arg(b"ASKING");
        }
        batch.encode(*i, keys.get(*i), &mut p);
    }
    p.flush()
}

struct Exists;

impl Batch for Exists {
    type Slot = bool;
    fn payload_bytes(&self, _: usize) -> usize {
        0
    }
    fn encode<'b>(&'b self, _: usize, key: &[u8], p: &mut Packer<'_, 'b>) {
        p.array(2);
        p.arg(b"EXISTS");
        p.arg(key);
    }
    fn reply(&self, _: usize, slot: &mut bool, value: Value) {
        *slot = matches!(value, Value::Int(n) if n > 0);
    }
    fn fail(&self, _: usize, slot: &mut bool, _: &Failure) {
        *slot = false;
    }
}

struct Unlink;

impl Batch for Unlink {
    type Slot = ();
    fn payload_bytes(&self, _: usize) -> usize {
        0
    }
    fn encode<'b>(&'b self, _: usize, key: &[u8], p: &mut Packer<'_, 'b>) {
        p.array(2);
        p.arg(b"UNLINK");
        p.arg(key);
    }
    fn reply(&self, _: usize, _: &mut (), _: Value) {}
    fn fail(&self, _: usize, _: &mut (), _: &Failure) {}
}

struct Get<'h, 'o> {
    hashes: &'h [SequenceHash],
    fingerprint: u64,
    block_bytes: usize,
    _out: PhantomData<fn(&'o mut [u8])>,
}

struct GetSlot<'o> {
    out: &'o mut [u8],
    outcome: GetOutcome,
}

impl<'o> Batch for Get<'_, 'o> {
    type Slot = GetSlot<'o>;
    fn payload_bytes(&self, _: usize) -> usize {
        HEADER_BYTES + self.block_bytes
    }
    fn encode<'b>(&'b self, _: usize, key: &[u8], p: &mut Packer<'_, 'b>) {
        p.array(2);
        p.arg(b"GET");
        p.arg(key);
    }
    /// The value's header lands in a small array and the block straight in the caller's
    /// buffer, hashed piece by piece as it arrives (each piece still in cache): one copy, by
    /// the kernel, and one pass of the checksum.
    fn read(
        &self,
        i: usize,
        slot: &mut GetSlot<'o>,
        conn: &mut Conn,
    ) -> std::io::Result<Option<Value>> {
        let (hash, fingerprint, bb) = (self.hashes[i], self.fingerprint, self.block_bytes);
        let mut head = [0u8; HEADER_BYTES];
        // The header's verdict and the running checksum, once the header has arrived.
        let mut state: Option<Result<(Xxh3, Option<SequenceHash>), Corruption>> = None;
        let start = |h: &[u8]| {
            check_head(h, hash, fingerprint, bb).map(|p| (Xxh3::with_seed(checksum_seed(h)), p))
        };
        let got = conn.recv_block(&mut head, slot.out, |h, piece| {
            if let Ok((x, _)) = state.get_or_insert_with(|| start(h)) {
                x.update(piece);
            }
        })?;
        let verdict = match got {
            BlockReply::Filled => match state.unwrap_or_else(|| start(&head)) {
                Ok((x, parent)) if x.digest() == stored_checksum(&head) => Ok(parent),
                Ok(_) => Err(Corruption::Checksum),
                Err(why) => Err(why),
            },
            BlockReply::Length(actual) => Err(Corruption::Length {
                expected: HEADER_BYTES + bb,
                actual,
            }),
            BlockReply::Nil => {
                slot.outcome = GetOutcome::Miss;
                return Ok(None);
            }
            BlockReply::Other(v) => return Ok(Some(v)),
        };
        slot.outcome = match verdict {
            Ok(parent) => GetOutcome::Hit { parent },
            // Another kvbm release's value: not ours to judge (nor to remove for everyone).
            Err(Corruption::Version { .. }) => GetOutcome::Miss,
            Err(why) => {
                tracing::warn!(%hash, %why, "remote tier: value does not verify; removing it");
                GetOutcome::Corrupt
            }
        };
        Ok(None)
    }
    fn reply(&self, _: usize, slot: &mut GetSlot<'o>, value: Value) {
        slot.outcome = match value {
            Value::Nil => GetOutcome::Miss,
            // A key of another type under our key: not ours, never served (and removed).
            Value::ServerError(e) if e.code() == "WRONGTYPE" => GetOutcome::Corrupt,
            // The server refused the read (an ACL without GET, say): that says nothing
            // about the value, so transient (the tier stack must not remove a shared key
            // for every server because one of them may not read it).
            Value::ServerError(e) => GetOutcome::Failed(StoreError::Unavailable(format!(
                "server error {}",
                e.code()
            ))),
            // Not a string (another client's key of another type): not ours, never served.
            _ => GetOutcome::Corrupt,
        };
    }
    fn fail(&self, _: usize, slot: &mut GetSlot<'o>, why: &Failure) {
        slot.outcome = match why {
            Failure::Open => GetOutcome::Miss,
            f => GetOutcome::Failed(f.to_store_error()),
        };
    }
}

/// A server that refuses writes (an ACL without `SET`, `MISCONF`, `READONLY`) refuses every
/// put, many a second under load: it is warned about at most once per this interval, and
/// the next warning counts the puts refused meanwhile ([`RemoteStats::refused_writes`]
/// counts every block).
pub const REFUSAL_WARNING_INTERVAL: Duration = Duration::from_secs(60);

/// The rate limit of the refused-writes warning.
#[derive(Debug, Default)]
struct RefusalLog {
    last: Option<Instant>,
    /// Puts refused since the last warning.
    quiet: u64,
}

impl RefusalLog {
    /// A put was refused at `now`: `Some(puts refused since the last warning)` when a
    /// warning is due (the first one, or `interval` after the last), else `None`.
    fn refused(&mut self, now: Instant, interval: Duration) -> Option<u64> {
        match self.last {
            Some(t) if now.saturating_duration_since(t) < interval => {
                self.quiet += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.quiet))
            }
        }
    }
}

struct Put<'b, 'a> {
    blocks: &'b [StoreBlock<'a>],
    fingerprint: u64,
    block_bytes: usize,
    ttl_ms: Option<Vec<u8>>,
    /// The first server error code that refused a `SET` of this call, and how many were.
    refused: parking_lot::Mutex<(Option<String>, u64)>,
}

impl Batch for Put<'_, '_> {
    type Slot = PutOutcome;
    fn payload_bytes(&self, _: usize) -> usize {
        HEADER_BYTES + self.block_bytes
    }
    fn encode<'b>(&'b self, i: usize, key: &[u8], p: &mut Packer<'_, 'b>) {
        let b = &self.blocks[i];
        let head = header(b.hash, b.parent, self.fingerprint, b.bytes);
        p.array(if self.ttl_ms.is_some() { 6 } else { 4 });
        p.arg(b"SET");
        p.arg(key);
        p.arg2(&head, b.bytes);
        p.arg(b"NX");
        if let Some(ms) = &self.ttl_ms {
            p.arg(b"PX");
            p.arg(ms);
        }
    }
    fn reply(&self, _: usize, slot: &mut PutOutcome, value: Value) {
        *slot = match value {
            Value::Okay => PutOutcome::Stored,
            Value::SimpleString(s) if s == "OK" => PutOutcome::Stored,
            Value::Nil => PutOutcome::Present,
            Value::ServerError(e) if e.code() == "OOM" => PutOutcome::Skipped(SkipReason::NoRoom),
            // Refused for a reason that says nothing about the block (NOPERM from an ACL,
            // MISCONF while the server cannot persist, READONLY on a replica): not stored,
            // not lost (it is still in G2); counted, and warned about at most once per
            // REFUSAL_WARNING_INTERVAL.
            Value::ServerError(e) => {
                let mut refused = self.refused.lock();
                if refused.0.is_none() {
                    refused.0 = Some(e.code().to_owned());
                }
                refused.1 += 1;
                PutOutcome::Skipped(SkipReason::Unavailable)
            }
            _ => PutOutcome::Failed(StoreError::Io("unexpected reply to SET".to_owned())),
        };
    }
    fn fail(&self, _: usize, slot: &mut PutOutcome, _: &Failure) {
        *slot = PutOutcome::Skipped(SkipReason::Unavailable);
    }
}

impl StoreTier for RemoteStore {
    fn medium(&self) -> &'static str {
        "REMOTE"
    }

    fn is_remote(&self) -> bool {
        true
    }

    fn block_bytes(&self) -> usize {
        self.config.block_bytes
    }

    fn contains(&self, hashes: &[SequenceHash]) -> Vec<bool> {
        let keys = self.keys(hashes.iter().copied());
        let mut found = vec![false; hashes.len()];
        let items = found.iter_mut().enumerate().collect();
        self.run(&Exists, &keys, items, SMALL_PIPELINE_DEPTH);
        found
    }

    fn put(&self, blocks: &[StoreBlock<'_>]) -> Vec<PutOutcome> {
        let bb = self.config.block_bytes;
        let keys = self.keys(blocks.iter().map(|b| b.hash));
        let mut outcomes: Vec<PutOutcome> = blocks
            .iter()
            .map(|b| {
                if b.bytes.len() == bb {
                    PutOutcome::Skipped(SkipReason::Unavailable)
                } else {
                    PutOutcome::Failed(self.block_size_error(b.bytes.len()))
                }
            })
            .collect();
        let items = outcomes
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| blocks[*i].bytes.len() == bb)
            .collect();
        let batch = Put {
            blocks,
            fingerprint: self.fingerprint,
            block_bytes: bb,
            ttl_ms: self
                .config
                .ttl
                .map(|t| t.as_millis().max(1).to_string().into_bytes()),
            refused: parking_lot::Mutex::new((None, 0)),
        };
        self.run(&batch, &keys, items, self.config.pipeline_depth);
        if let (Some(code), blocks) = batch.refused.into_inner() {
            self.counters.refused_writes.add(blocks);
            let due = self
                .refusals
                .lock()
                .refused(Instant::now(), REFUSAL_WARNING_INTERVAL);
            if let Some(since) = due {
                self.counters.refusal_warnings.add(1);
                tracing::warn!(
                    %code,
                    blocks,
                    refused_puts_since_last_warning = since,
                    "remote tier: the server refused writes (not stored; the blocks stay in G2)"
                );
            }
        }
        let c = &self.counters;
        for o in &outcomes {
            match o {
                PutOutcome::Stored => {
                    c.stored.add(1);
                    c.bytes_written.add(bb as u64);
                }
                PutOutcome::Present => c.present.add(1),
                PutOutcome::Skipped(_) => c.skipped.add(1),
                _ => c.failed.add(1),
            }
        }
        outcomes
    }

    fn get(&self, hashes: &[SequenceHash], out: &mut [&mut [u8]]) -> Vec<GetOutcome> {
        let bb = self.config.block_bytes;
        let keys = self.keys(hashes.iter().copied());
        let mut slots: Vec<GetSlot<'_>> = Vec::with_capacity(hashes.len());
        let mut missing = Vec::new();
        let mut bufs = out.iter_mut();
        for i in 0..hashes.len() {
            match bufs.next() {
                Some(buf) if buf.len() == bb => slots.push(GetSlot {
                    out: buf,
                    outcome: GetOutcome::Miss,
                }),
                Some(buf) => {
                    let outcome = GetOutcome::Failed(self.block_size_error(buf.len()));
                    slots.push(GetSlot {
                        out: &mut [],
                        outcome,
                    });
                }
                None => missing.push(i),
            }
        }
        let items = slots
            .iter_mut()
            .enumerate()
            .filter(|(_, s)| s.out.len() == bb)
            .collect();
        let batch = Get {
            hashes,
            fingerprint: self.fingerprint,
            block_bytes: bb,
            _out: PhantomData,
        };
        self.run(&batch, &keys, items, self.config.pipeline_depth);
        let mut outcomes: Vec<GetOutcome> = slots.into_iter().map(|s| s.outcome).collect();
        // Hashes without an output buffer: refused, nothing read.
        outcomes.extend(
            missing
                .iter()
                .map(|_| GetOutcome::Failed(self.block_size_error(0))),
        );
        let c = &self.counters;
        let mut corrupt = Vec::new();
        for (i, o) in outcomes.iter().enumerate() {
            match o {
                GetOutcome::Hit { .. } => {
                    c.hits.add(1);
                    c.bytes_read.add(bb as u64);
                }
                GetOutcome::Miss => c.misses.add(1),
                GetOutcome::Corrupt => {
                    c.corrupt.add(1);
                    corrupt.push(hashes[i]);
                }
                _ => c.failed.add(1),
            }
        }
        if !corrupt.is_empty() {
            self.remove(&corrupt);
        }
        outcomes
    }

    fn remove(&self, hashes: &[SequenceHash]) {
        let keys = self.keys(hashes.iter().copied());
        let mut slots = vec![(); hashes.len()];
        let items = slots.iter_mut().enumerate().collect();
        self.run(&Unlink, &keys, items, SMALL_PIPELINE_DEPTH);
    }

    fn stats(&self) -> StoreStats {
        self.counters.store_stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_writes_are_warned_about_once_per_interval_with_the_count_since() {
        let mut log = RefusalLog::default();
        let t0 = Instant::now();
        let second = Duration::from_secs(1);
        assert_eq!(log.refused(t0, 10 * second), Some(0), "the first one warns");
        assert_eq!(log.refused(t0 + second, 10 * second), None);
        assert_eq!(log.refused(t0 + 9 * second, 10 * second), None);
        assert_eq!(
            log.refused(t0 + 10 * second, 10 * second),
            Some(2),
            "an interval on, with the two refused meanwhile"
        );
        assert_eq!(log.refused(t0 + 11 * second, 10 * second), None);
        assert_eq!(log.refused(t0 + 30 * second, 10 * second), Some(1));
    }
}
