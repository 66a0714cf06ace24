//! Replaying requests through a `BlockManager`, one at a time in order, each driven by a
//! [`RequestSequence`] as a server would: match the cached prefix (the whole prompt: a trace's
//! blocks are whole prompts), allocate the rest, compute and register it, release tail first.
//! A request longer than the pool is unservable and skipped.
//!
//! Each trace block id becomes two tokens (its id's low and high halves), and the manager's
//! block size is 2: equal ids mean equal prefixes in a Mooncake trace, so the request's
//! chained hashes match exactly where the trace's ids do, and hashing costs what two tokens
//! cost rather than 512 (the replay measures the cache, not the hash function).
//!
//! With [`ReplayOptions::preempt`], that share of the requests (spread evenly) is preempted
//! right after its blocks are allocated and resumed after the next request; `resume_rematch`
//! is the share of its blocks still cached at resumption that its prefix match took again (a
//! cached block the match cannot reach is orphaned: its prefix was evicted before it).
//!
//! Besides the library's eviction backends, [`Policy::Opt`] replays the same requests through
//! the same manager with Belady's offline oracle choosing the victims (it reads the whole
//! trace first), the yardstick for the `of_opt` ratio of every result.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::time::Instant;

use kvbm_logical::{
    BlockManager, Device, EvictionBackend, FrequencyTracking, ImmutableBlock, RequestSequence,
    SequenceHash,
};
use serde::Serialize;

use crate::trace::{Request, TRACE_BLOCK_TOKENS};

/// What chooses the victims in a replay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Policy {
    /// One of the library's inactive-pool backends.
    Backend(EvictionBackend),
    /// Belady's offline optimum: evict the cached block whose next request is furthest in
    /// the future. Not a backend (it needs the future); see [`replay_opt`].
    Opt,
}

impl Policy {
    /// Every backend, then the oracle.
    pub fn all() -> Vec<Policy> {
        EvictionBackend::ALL
            .into_iter()
            .map(Policy::Backend)
            .chain([Policy::Opt])
            .collect()
    }

    /// The name used on the command line and in results.
    pub fn name(self) -> &'static str {
        match self {
            Policy::Backend(b) => b.name(),
            Policy::Opt => "opt",
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The outcome of one replay.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReplayResult {
    /// Eviction policy.
    pub policy: &'static str,
    /// Pool size in blocks.
    pub capacity: usize,
    /// Requests replayed (servable).
    pub requests: usize,
    /// Requests longer than the pool, skipped.
    pub unservable: usize,
    /// Blocks the servable requests asked for.
    pub requested_blocks: u64,
    /// Of those, prefix hits.
    pub hit_blocks: u64,
    /// `hit_blocks / requested_blocks`.
    pub hit_rate: f64,
    /// `hit_rate` divided by the optimum's (Belady, [`Policy::Opt`]) at the same capacity on
    /// the same requests; `None` until [`add_of_opt`] fills it, or when the optimum hits
    /// nothing.
    pub of_opt: Option<f64>,
    /// Blocks evicted.
    pub evictions: u64,
    /// Requests preempted after allocating and resumed after the next request
    /// ([`ReplayOptions::preempt`]; the optimum's replay never preempts).
    pub preempted: usize,
    /// Of the preempted requests' blocks still cached when they resumed, the share their
    /// prefix match took again; `None` without preemptions (or when none was still cached).
    pub resume_rematch: Option<f64>,
    /// Replay time, seconds.
    pub seconds: f64,
    /// Requests per second.
    pub requests_per_s: f64,
}

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Replays `requests` through a fresh pool of `capacity` blocks evicting by `policy`, with
/// the builder's default frequency tracking.
pub fn replay(
    requests: &[Request],
    capacity: usize,
    policy: Policy,
) -> Result<ReplayResult, Error> {
    replay_with(requests, capacity, policy, None)
}

/// [`replay`] with a frequency sketch of the given size (`None`: the builder's default).
pub fn replay_with(
    requests: &[Request],
    capacity: usize,
    policy: Policy,
    frequency: Option<FrequencyTracking>,
) -> Result<ReplayResult, Error> {
    let options = ReplayOptions {
        frequency,
        ..ReplayOptions::default()
    };
    replay_opts(requests, capacity, policy, &options)
}

/// How to replay, beyond the policy and capacity.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ReplayOptions {
    /// The frequency sketch of the backends that use one (`None`: the builder's default).
    pub frequency: Option<FrequencyTracking>,
    /// The share of requests (0 to 1, spread evenly over the trace) preempted right after
    /// allocating their blocks, then resumed after the next request.
    pub preempt: f64,
}

/// [`replay`] with every option. The optimum ([`Policy::Opt`]) ignores `preempt`.
pub fn replay_opts(
    requests: &[Request],
    capacity: usize,
    policy: Policy,
    options: &ReplayOptions,
) -> Result<ReplayResult, Error> {
    if !(0.0..=1.0).contains(&options.preempt) {
        return Err(format!("preempt fraction {} is not in [0, 1]", options.preempt).into());
    }
    match policy {
        Policy::Backend(backend) => {
            replay_backend(requests, capacity, backend, options, |_| Ok(())).map(|(r, ())| r)
        }
        Policy::Opt => replay_opt(requests, capacity),
    }
}

/// Tokens per trace block in a [`RequestSequence`] replay: the block id's two halves.
pub const REPLAY_BLOCK_TOKENS: usize = 2;

/// Whether the `n`-th servable request (from 0) is preempted: exactly `floor(n × fraction)`
/// of the first `n`, evenly spread.
fn preempts(n: usize, fraction: f64) -> bool {
    ((n + 1) as f64 * fraction).floor() > (n as f64 * fraction).floor()
}

/// Preemption bookkeeping of a replay.
#[derive(Default)]
struct Resumes {
    preempted: usize,
    still_cached: u64,
    rematched: u64,
}

impl Resumes {
    /// Resumes a preempted request: counts which of its blocks are still cached, re-matches,
    /// allocates and computes the rest, releases it.
    fn resume(
        &mut self,
        m: &BlockManager<Device>,
        mut req: RequestSequence<Device>,
    ) -> Result<(), Error> {
        let hashes: Vec<SequenceHash> = req.sequence_hashes().collect();
        let cached = m.contains_each(&hashes).into_iter().filter(|&c| c).count();
        let matched = req.match_prefix()?;
        self.still_cached += cached as u64;
        self.rematched += matched as u64;
        compute(&mut req)
    }

    fn rate(&self) -> Option<f64> {
        (self.still_cached > 0).then(|| self.rematched as f64 / self.still_cached as f64)
    }
}

/// Allocates and computes every pending token of `req`, then releases it (tail first).
fn compute(req: &mut RequestSequence<Device>) -> Result<(), Error> {
    let pending = req.num_pending_tokens();
    req.allocate(pending)?;
    req.commit(pending)?;
    req.preempt();
    Ok(())
}

/// Parses a frequency sketch size: `small`, `medium`, `large` (or `disabled`).
///
/// ```
/// use kvbm_bench::replay::parse_frequency;
/// use kvbm_logical::FrequencyTracking;
/// assert_eq!(parse_frequency("Large"), Ok(FrequencyTracking::Large));
/// assert!(parse_frequency("huge").is_err());
/// ```
pub fn parse_frequency(name: &str) -> Result<FrequencyTracking, String> {
    match name.trim().to_lowercase().as_str() {
        "disabled" | "off" => Ok(FrequencyTracking::Disabled),
        "small" => Ok(FrequencyTracking::Small),
        "medium" => Ok(FrequencyTracking::Medium),
        "large" => Ok(FrequencyTracking::Large),
        _ => Err(format!(
            "unknown frequency tracking `{name}` (known: small, medium, large, disabled)"
        )),
    }
}

/// Matches the prefix, allocates and registers the rest as a chain, releases everything.
/// Returns the number of hits.
fn serve(m: &BlockManager<Device>, hashes: &[SequenceHash]) -> Result<usize, Error> {
    let matched = m.match_blocks(hashes);
    let have = matched.len();
    let fresh = m.allocate_blocks(hashes.len() - have)?;
    let staged = fresh
        .into_iter()
        .enumerate()
        .map(|(i, block)| {
            let at = have + i;
            let parent = at.checked_sub(1).map(|p| hashes[p]);
            block
                .stage(hashes[at], TRACE_BLOCK_TOKENS)
                .map(|b| b.with_parent(parent))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let registered = m.register_blocks(staged)?;
    ImmutableBlock::release_all(matched);
    ImmutableBlock::release_all(registered);
    Ok(have)
}

fn result(
    policy: &'static str,
    capacity: usize,
    (served, unservable, requested, hits, evictions): (usize, usize, u64, u64, u64),
    seconds: f64,
) -> ReplayResult {
    ReplayResult {
        policy,
        capacity,
        requests: served,
        unservable,
        requested_blocks: requested,
        hit_blocks: hits,
        hit_rate: if requested == 0 {
            0.0
        } else {
            hits as f64 / requested as f64
        },
        of_opt: None,
        evictions,
        preempted: 0,
        resume_rematch: None,
        seconds,
        requests_per_s: served as f64 / seconds.max(1e-9),
    }
}

/// [`replay_with`] for one eviction backend, with `attach` called on the fresh manager before
/// the first request (to subscribe an event publisher, say); returns what `attach` returned
/// alongside the result (`kvbm-bench replay --publish`).
///
/// ```
/// use kvbm_bench::replay::{replay_attached, ReplayOptions};
/// use kvbm_bench::workload::Synthetic;
/// use kvbm_logical::EvictionBackend;
/// let requests = Synthetic { sessions: 3, ..Default::default() }.generate();
/// let (result, events) =
///     replay_attached(&requests, 256, EvictionBackend::Lru, &ReplayOptions::default(), |m| {
///         Ok(m.subscribe(1 << 16))
///     })?;
/// assert!(result.requests > 0);
/// assert!(events.try_recv().is_some());
/// # Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
/// ```
pub fn replay_attached<G>(
    requests: &[Request],
    capacity: usize,
    policy: EvictionBackend,
    options: &ReplayOptions,
    attach: impl FnOnce(&BlockManager<Device>) -> Result<G, Error>,
) -> Result<(ReplayResult, G), Error> {
    replay_backend(requests, capacity, policy, options, attach)
}

fn replay_backend<G>(
    requests: &[Request],
    capacity: usize,
    policy: EvictionBackend,
    options: &ReplayOptions,
    attach: impl FnOnce(&BlockManager<Device>) -> Result<G, Error>,
) -> Result<(ReplayResult, G), Error> {
    let mut builder = BlockManager::<Device>::builder()
        .block_count(capacity)
        .block_size(REPLAY_BLOCK_TOKENS)
        .eviction(policy);
    if let Some(tracking) = options.frequency {
        builder = builder.frequency_tracking(tracking);
    }
    let m = builder.build()?;
    let attached = attach(&m)?;
    let (mut served, mut unservable, mut requested, mut hits) = (0, 0, 0u64, 0u64);
    let mut tokens: Vec<u32> = Vec::new();
    let mut resumes = Resumes::default();
    let mut preempted: Option<RequestSequence<Device>> = None;
    let start = Instant::now();
    for request in requests {
        if request.hash_ids.len() > capacity {
            unservable += 1;
            continue;
        }
        tokens.clear();
        for &id in &request.hash_ids {
            tokens.extend([id as u32, (id >> 32) as u32]);
        }
        let mut req = RequestSequence::builder(&m)
            .prompt(&tokens)
            .match_whole_prompt(true)
            .build();
        let have = req.match_prefix()?;
        let preempt = preempts(served, options.preempt);
        served += 1;
        requested += request.hash_ids.len() as u64;
        hits += have as u64;
        if preempt {
            // Allocated, then preempted before computing anything: resumed after the next one.
            req.allocate(req.num_pending_tokens())?;
            req.preempt();
            resumes.preempted += 1;
        } else {
            compute(&mut req)?;
        }
        if let Some(earlier) = preempted.take() {
            resumes.resume(&m, earlier)?;
        }
        if preempt {
            preempted = Some(req);
        }
    }
    if let Some(last) = preempted.take() {
        resumes.resume(&m, last)?;
    }
    let seconds = start.elapsed().as_secs_f64();
    let evictions = m.metrics().snapshot().removed_evicted;
    let mut out = result(
        policy.name(),
        capacity,
        (served, unservable, requested, hits, evictions),
        seconds,
    );
    out.preempted = resumes.preempted;
    out.resume_rematch = resumes.rate();
    Ok((out, attached))
}

/// For each servable request and each of its blocks, the index of the next servable request
/// that uses the same id (`usize::MAX` if none): Belady's lookahead.
fn next_uses(requests: &[Request], capacity: usize) -> Vec<Vec<usize>> {
    let mut next = vec![Vec::new(); requests.len()];
    let mut seen: HashMap<u64, usize> = HashMap::new();
    for (t, request) in requests.iter().enumerate().rev() {
        if request.hash_ids.len() > capacity {
            continue;
        }
        next[t] = request
            .hash_ids
            .iter()
            .map(|id| seen.get(id).copied().unwrap_or(usize::MAX))
            .collect();
        for &id in &request.hash_ids {
            seen.insert(id, t);
        }
    }
    next
}

/// Belady's optimum under the same replay model: the same manager, requests, matching,
/// allocation, registration and release as [`replay`] with a backend, but before each
/// allocation the oracle picks the victims itself and invalidates them, so the allocation
/// takes only free slots.
///
/// Victims, in order: first, cached blocks of the current request that its prefix match did
/// not reach (the chain is broken before them, so they are registered again by this very
/// request: evicting them costs nothing); then the block whose next use is furthest away
/// (never used again first), the deeper block first among equals: a block and its parent are
/// usually next used by the same request, and evicting the parent would lose both (on the
/// shared conversation trace this tie-break is worth about a point of hit rate at 1k blocks).
/// Blocks held by the current request (its matched prefix) are never candidates.
pub fn replay_opt(requests: &[Request], capacity: usize) -> Result<ReplayResult, Error> {
    let m = BlockManager::<Device>::builder()
        .block_count(capacity)
        .block_size(TRACE_BLOCK_TOKENS)
        .build()?;
    let next = next_uses(requests, capacity);
    type Key = (Reverse<usize>, Reverse<usize>, SequenceHash);
    // The inactive cached blocks, the first to evict first.
    let mut order: BTreeSet<Key> = BTreeSet::new();
    let mut key_of: HashMap<SequenceHash, Key> = HashMap::new();
    let (mut served, mut unservable, mut requested, mut hits, mut evictions) =
        (0, 0, 0u64, 0u64, 0u64);
    let mut hashes: Vec<SequenceHash> = Vec::new();
    let mut victims: Vec<SequenceHash> = Vec::new();
    let start = Instant::now();
    for (t, request) in requests.iter().enumerate() {
        if request.hash_ids.len() > capacity {
            unservable += 1;
            continue;
        }
        hashes.clear();
        hashes.extend(request.hash_ids.iter().map(|&id| SequenceHash::new(id)));
        let have = m
            .match_blocks(&hashes)
            .into_iter()
            .map(|held| {
                // Held by this request from here on: not a candidate.
                if let Some(key) = key_of.remove(&held.sequence_hash()) {
                    order.remove(&key);
                }
            })
            .count();
        // The handles were dropped above; the prefix is inactive again but still cached and
        // out of `order` until this request re-enters it below.
        let mut evict = (hashes.len() - have).saturating_sub(m.counts().reset);
        victims.clear();
        for hash in &hashes[have..] {
            if evict == 0 {
                break;
            }
            if let Some(key) = key_of.remove(hash) {
                order.remove(&key);
                victims.push(*hash);
                evict -= 1;
            }
        }
        while evict > 0 {
            let Some(key) = order.pop_first() else {
                break;
            };
            key_of.remove(&key.2);
            victims.push(key.2);
            evict -= 1;
        }
        let invalidated = m.invalidate_blocks(&victims);
        if invalidated != victims.len() {
            return Err(format!(
                "opt: invalidated {invalidated} of {} victims at request {t}",
                victims.len()
            )
            .into());
        }
        evictions += victims.len() as u64;
        let matched = serve(&m, &hashes)?;
        if matched != have {
            return Err(format!("opt: request {t} matched {matched} then {have}").into());
        }
        for (depth, (&hash, &next_use)) in hashes.iter().zip(&next[t]).enumerate() {
            let key = (Reverse(next_use), Reverse(depth), hash);
            if let Some(old) = key_of.insert(hash, key) {
                order.remove(&old);
            }
            order.insert(key);
        }
        served += 1;
        requested += hashes.len() as u64;
        hits += have as u64;
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(result(
        Policy::Opt.name(),
        capacity,
        (served, unservable, requested, hits, evictions),
        seconds,
    ))
}

/// Fills `of_opt` of every result: its hit rate over the optimum's at its capacity, taken
/// from an `opt` result among `results` or else computed on `requests`.
pub fn add_of_opt(requests: &[Request], results: &mut [ReplayResult]) -> Result<(), Error> {
    let mut opt: HashMap<usize, f64> = results
        .iter()
        .filter(|r| r.policy == Policy::Opt.name())
        .map(|r| (r.capacity, r.hit_rate))
        .collect();
    for r in results.iter_mut() {
        let best = match opt.get(&r.capacity) {
            Some(&best) => best,
            None => {
                let best = replay_opt(requests, r.capacity)?.hit_rate;
                opt.insert(r.capacity, best);
                best
            }
        };
        r.of_opt = (best > 0.0).then(|| r.hit_rate / best);
    }
    Ok(())
}

/// Parses a policy name: a backend's (`lru`, `fifo`, `lineage`, `multi-lru`/`multi_lru`,
/// `priority`, `arc`, `s3fifo`/`s3-fifo`, `adaptive`) or `opt`.
///
/// ```
/// use kvbm_bench::replay::{Policy, parse_policy};
/// assert_eq!(parse_policy("opt"), Ok(Policy::Opt));
/// assert_eq!(parse_policy("S3-FIFO").map(Policy::name), Ok("s3fifo"));
/// assert!(parse_policy("lfu").is_err());
/// ```
pub fn parse_policy(name: &str) -> Result<Policy, String> {
    let wanted = name.trim().to_lowercase().replace('-', "_");
    let all = Policy::all();
    all.iter()
        .copied()
        .find(|p| p.name() == wanted || p.name() == wanted.replace('_', ""))
        .ok_or_else(|| {
            let known: Vec<&str> = all.iter().map(|p| p.name()).collect();
            format!("unknown policy `{name}` (known: {})", known.join(", "))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preemptions_are_spread_evenly() {
        let count = |f: f64| (0..1000).filter(|&n| preempts(n, f)).count();
        assert_eq!((count(0.0), count(0.25), count(1.0)), (0, 250, 1000));
        assert!(preempts(3, 0.25) && !preempts(0, 0.25));
    }

    #[test]
    fn a_preempted_request_rematches_what_is_still_cached() {
        // Capacity 4. The second [1 2 3] is preempted (holding nothing) while [7 8 9]
        // evicts two of its blocks; at resumption 1 is still cached and re-matched.
        let r = requests(&[&[1, 2, 3], &[1, 2, 3], &[7, 8, 9], &[1, 2]]);
        let options = ReplayOptions {
            preempt: 0.5,
            ..ReplayOptions::default()
        };
        for backend in [EvictionBackend::default(), EvictionBackend::Lru] {
            let res = replay_opts(&r, 4, Policy::Backend(backend), &options).unwrap();
            assert_eq!(res.preempted, 2);
            assert_eq!(res.hit_blocks, 3 + 2, "{backend:?}");
            // Tail-first release keeps the prefix reachable under either policy.
            assert_eq!(res.resume_rematch, Some(1.0), "{backend:?}");
        }
        assert!(
            replay_opts(
                &r,
                4,
                Policy::Opt,
                &ReplayOptions {
                    preempt: 1.5,
                    ..options
                }
            )
            .is_err()
        );
    }

    fn requests(ids: &[&[u64]]) -> Vec<Request> {
        ids.iter()
            .map(|r| Request {
                hash_ids: r.to_vec(),
            })
            .collect()
    }

    #[test]
    fn the_optimum_breaks_ties_toward_the_deeper_block() {
        // Capacity 2. [5 9] fills the pool; [3] must evict 5 or 9, both next used by the third
        // request. Evicting 9 (the deeper) keeps the prefix: the third request hits 5. Evicting
        // 5 would leave 9 unreachable: no hit.
        let r = requests(&[&[5, 9], &[3], &[5, 9]]);
        let opt = replay_opt(&r, 2).unwrap();
        assert_eq!((opt.hit_blocks, opt.requested_blocks), (1, 5));
        assert_eq!(opt.evictions, 2);
    }

    #[test]
    fn of_opt_divides_by_the_optimum_at_the_same_capacity() {
        let r = requests(&[&[1, 2, 3], &[1, 2, 4], &[1, 5], &[1, 2, 3]]);
        let mut results = vec![
            replay(&r, 4, Policy::Backend(EvictionBackend::Lru)).unwrap(),
            replay(&r, 8, Policy::Backend(EvictionBackend::Lru)).unwrap(),
        ];
        add_of_opt(&r, &mut results).unwrap();
        for res in &results {
            let opt = replay_opt(&r, res.capacity).unwrap();
            assert_eq!(res.of_opt, Some(res.hit_rate / opt.hit_rate));
        }
        // Nothing to hit: no ratio.
        let once = requests(&[&[1, 2]]);
        let mut results = vec![replay(&once, 4, Policy::Opt).unwrap()];
        add_of_opt(&once, &mut results).unwrap();
        assert_eq!(results[0].of_opt, None);
    }
}
