//! Replaying requests through a `BlockManager`, one at a time in order: match the prefix,
//! allocate the rest, register all, release all. A request longer than the pool is
//! unservable and skipped.

use std::time::Instant;

use kvbm_logical::{BlockManager, Device, EvictionBackend, ImmutableBlock, SequenceHash};
use serde::Serialize;

use crate::trace::{Request, TRACE_BLOCK_TOKENS};

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
    /// Blocks evicted.
    pub evictions: u64,
    /// Replay time, seconds.
    pub seconds: f64,
    /// Requests per second.
    pub requests_per_s: f64,
}

/// Replays `requests` through a fresh pool of `capacity` blocks evicting by `policy`.
pub fn replay(
    requests: &[Request],
    capacity: usize,
    policy: EvictionBackend,
) -> Result<ReplayResult, Box<dyn std::error::Error + Send + Sync>> {
    let m = BlockManager::<Device>::builder()
        .block_count(capacity)
        .block_size(TRACE_BLOCK_TOKENS)
        .eviction(policy)
        .build()?;
    let (mut served, mut unservable, mut requested, mut hits) = (0, 0, 0u64, 0u64);
    let mut hashes: Vec<SequenceHash> = Vec::new();
    let start = Instant::now();
    for request in requests {
        if request.hash_ids.len() > capacity {
            unservable += 1;
            continue;
        }
        hashes.clear();
        hashes.extend(request.hash_ids.iter().map(|&id| SequenceHash::new(id)));
        let matched = m.match_blocks(&hashes);
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
        served += 1;
        requested += hashes.len() as u64;
        hits += have as u64;
    }
    let seconds = start.elapsed().as_secs_f64();
    let evictions = m.metrics().snapshot().removed_evicted;
    Ok(ReplayResult {
        policy: policy.name(),
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
        evictions,
        seconds,
        requests_per_s: served as f64 / seconds.max(1e-9),
    })
}

/// Parses a policy name (`lru`, `fifo`, `lineage`, `multi-lru`/`multi_lru`, `priority`).
pub fn parse_policy(name: &str) -> Result<EvictionBackend, String> {
    let wanted = name.trim().replace('-', "_").to_lowercase();
    EvictionBackend::ALL
        .into_iter()
        .find(|b| b.name() == wanted)
        .ok_or_else(|| {
            let known: Vec<&str> = EvictionBackend::ALL.iter().map(|b| b.name()).collect();
            format!("unknown policy `{name}` (known: {})", known.join(", "))
        })
}
