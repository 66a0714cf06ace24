//! The soak run: random requests from many threads through a tier stack (G1 over G2, and
//! optionally a disk tier and a Redis tier below) for a given time, as a scheduler drives it
//! — plan, commit, wait, allocate the rest, compute, register — checking every served
//! block's bytes and reporting requests, per-tier counts, pool accounting and resident
//! memory at intervals.
//!
//! Every block's bytes are a function of its hash, so two soak processes sharing one Redis
//! namespace check each other's blocks too. Conversation prefixes (one of 512 families)
//! are the same in every process; conversation tails are tagged with the process's
//! `--seed`, so a prefix block that a process onboards without ever having written it can
//! only have come from the other process through Redis: those are counted
//! (`foreign_onboarded`).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use kvbm_logical::{ImmutableBlock, SequenceHash};
use kvbm_physical::LayoutError;
use kvbm_physical::stack::{EngineSync, OnboardError, TierId, TierStack, Watermarks, WriteMode};
use serde::Serialize;

use crate::tiered::{StackSpec, StoreOptions, build_stack, medium};
use crate::transfer::{EngineSide, Target};
use crate::workload::Rng;

/// Region size of the soak's blocks, KiB (8 KiB blocks: 2 layers × K,V × 2 KiB).
const REGION_KIB: usize = 2;
const PAGE: usize = 16;
/// Conversation families: each has a shared prefix of 1–4 blocks.
const FAMILIES: u64 = 512;

/// What to run.
#[derive(Clone, Debug)]
pub struct SoakConfig {
    /// How long.
    pub duration: Duration,
    /// Request threads.
    pub threads: usize,
    /// G1 blocks.
    pub g1_blocks: usize,
    /// G2 blocks.
    pub g2_blocks: usize,
    /// Offload on registration (with a free reserve of 1/16 to 1/8 of G1) instead of on
    /// eviction (write-back, watermarks at 1/16 and 1/8 of G1).
    pub write_through: bool,
    /// The stack's worker threads.
    pub workers: usize,
    /// Report interval.
    pub every: Duration,
    /// This process's seed: its request stream, and the tag of its conversation tails.
    pub seed: u64,
    /// Store tiers below G2 and admission filters.
    pub stores: StoreOptions,
}

/// One tier's counts at a sample.
#[derive(Clone, Debug, Serialize)]
pub struct SoakTier {
    /// `G1`, `G2`, `G3`, ...
    pub tier: String,
    /// `system`, `device`, `pinned`, `disk`, `redis`.
    pub medium: String,
    /// Blocks offloaded into it.
    pub offloaded: u64,
    /// Blocks onboarded from it into G1.
    pub onboarded: u64,
    /// Offloads into it skipped (back-pressure, admission, already there).
    pub skipped: u64,
    /// Blocks lost there (failed copies, corrupt blocks).
    pub lost: u64,
}

/// One report line.
#[derive(Clone, Debug, Serialize)]
pub struct SoakSample {
    /// Seconds since the start.
    pub seconds: f64,
    /// Requests completed so far (every block served or computed and registered; not the
    /// deferred ones).
    pub requests: u64,
    /// Completed requests per second over the last interval.
    pub requests_per_s: f64,
    /// Blocks served (G1 hits or onboarded) so far, each checked byte for byte.
    pub blocks_checked: u64,
    /// Requests that found G1 too full to compute their new blocks (back-pressure).
    pub deferred: u64,
    /// G1 `reset + inactive + mutable + active` and total.
    pub g1_accounted: (usize, usize),
    /// G2 likewise.
    pub g2_accounted: (usize, usize),
    /// Blocks offloaded into G2 so far.
    pub offloaded: u64,
    /// Blocks onboarded into G1 (from any tier) so far.
    pub onboarded: u64,
    /// Prefix blocks onboarded that this process never wrote (another process's, through the
    /// shared Redis namespace).
    pub foreign_onboarded: u64,
    /// Per tier.
    pub tiers: Vec<SoakTier>,
    /// Resident set size, MiB (Linux; 0 elsewhere).
    pub rss_mib: f64,
}

/// The bytes a block with `hash` must hold.
fn kv(hash: SequenceHash, out: &mut [u8]) {
    let mut rng = Rng(hash.as_u64());
    for chunk in out.chunks_mut(8) {
        let v = rng.next_u64().to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| vm_rss_kib(&s))
        .map_or(0.0, |kib| kib / 1024.0)
}

/// `VmRSS` of a `/proc/<pid>/status` text, in KiB (the kernel's unit whatever its page size:
/// `statm` counts pages, 64 KiB each on some aarch64 kernels, Grace Hopper's among them).
fn vm_rss_kib(status: &str) -> Option<f64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Counters the request threads share.
#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    requests: AtomicU64,
    checked: AtomicU64,
    deferred: AtomicU64,
    foreign: AtomicU64,
    /// The prefix blocks this process wrote (at most `FAMILIES × 4`).
    written_prefixes: Mutex<HashSet<SequenceHash>>,
}

impl Shared {
    fn wrote(&self, hash: SequenceHash) -> bool {
        self.written_prefixes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&hash)
    }
}

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Runs the soak; `report` receives each sample. Errors on the first wrong byte or broken
/// count.
pub fn run(
    target: &Target,
    config: &SoakConfig,
    mut report: impl FnMut(&SoakSample),
) -> Result<Vec<SoakSample>, Error> {
    let g1 = config.g1_blocks;
    let watermarks = Watermarks::new((g1 / 16).max(1), (g1 / 8).max(1));
    let mode = if config.write_through {
        WriteMode::WriteThrough
    } else {
        WriteMode::WriteBack(watermarks)
    };
    let built = Arc::new(build_stack(
        target,
        &StackSpec {
            g1,
            g2: config.g2_blocks,
            g1_layout: EngineSide::LayerSeparate,
            region_kib: REGION_KIB,
            mode,
            // Write-through with a free reserve at the same watermarks, as `tiered` runs it.
            reserve: config.write_through.then_some(watermarks),
            workers: config.workers,
            eviction: None,
            stores: config.stores.clone(),
        },
    )?);
    let shared = Arc::new(Shared::default());
    let start = Instant::now();
    let workers: Vec<_> = (0..config.threads.max(1))
        .map(|t| {
            let (built, shared) = (Arc::clone(&built), Arc::clone(&shared));
            let seed = config.seed;
            std::thread::spawn(move || worker(&built.stack, &shared, seed, t as u64))
        })
        .collect();
    let mut samples = Vec::new();
    let mut last = (Instant::now(), 0u64);
    let sample = |last: &mut (Instant, u64)| -> Result<SoakSample, String> {
        let stack = &built.stack;
        let c1 = stack.g1().check_invariants().map_err(|e| e.to_string())?;
        let c2 = stack.g2().check_invariants().map_err(|e| e.to_string())?;
        let n = shared.requests.load(Ordering::Relaxed);
        let rate = (n - last.1) as f64 / last.0.elapsed().as_secs_f64().max(1e-9);
        *last = (Instant::now(), n);
        let st = stack.stats();
        Ok(SoakSample {
            seconds: start.elapsed().as_secs_f64(),
            requests: n,
            requests_per_s: rate,
            blocks_checked: shared.checked.load(Ordering::Relaxed),
            deferred: shared.deferred.load(Ordering::Relaxed),
            g1_accounted: (c1.reset + c1.inactive + c1.mutable + c1.active, c1.total),
            g2_accounted: (c2.reset + c2.inactive + c2.mutable + c2.active, c2.total),
            offloaded: st.tier(TierId::G2).map_or(0, |t| t.offloaded),
            onboarded: st.tiers.iter().map(|t| t.onboarded).sum(),
            foreign_onboarded: shared.foreign.load(Ordering::Relaxed),
            tiers: st
                .tiers
                .iter()
                .map(|t| SoakTier {
                    tier: t.tier.to_string(),
                    medium: medium(target, &built, t.tier),
                    offloaded: t.offloaded,
                    onboarded: t.onboarded,
                    skipped: t.skipped_total(),
                    lost: t.lost,
                })
                .collect(),
            rss_mib: rss_mib(),
        })
    };
    let mut failure = None;
    while start.elapsed() < config.duration {
        let wake = config
            .every
            .min(config.duration.saturating_sub(start.elapsed()));
        std::thread::sleep(wake.max(Duration::from_millis(1)));
        if workers.iter().any(|w| w.is_finished()) {
            break; // a worker failed: collect its error below
        }
        match sample(&mut last) {
            Ok(s) => {
                report(&s);
                samples.push(s);
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    shared.stop.store(true, Ordering::Relaxed);
    for w in workers {
        if let Err(e) = w
            .join()
            .map_err(|_| "a worker panicked".to_string())
            .and_then(|r| r)
        {
            failure.get_or_insert(e);
        }
    }
    if let Some(e) = failure {
        return Err(e.into());
    }
    // Every handle is back and every job done: each slot tier's blocks are all reset or
    // inactive.
    built.stack.flush();
    let s = sample(&mut last)?;
    for (name, c) in [
        ("G1", built.stack.g1().counts()),
        ("G2", built.stack.g2().counts()),
    ] {
        if (c.mutable, c.active) != (0, 0) {
            return Err(format!("{name} still holds slots after the run: {c:?}").into());
        }
    }
    report(&s);
    samples.push(s);
    Ok(samples)
}

/// A random conversation: a family prefix of 1–4 blocks shared by every process, then a
/// tail of this process's own. A tail hash names its prefix length too, so that every hash
/// has one parent, as chained hashing guarantees (a store tier refuses a block asked for
/// under another parent, and counts it as lost).
fn conversation(rng: &mut Rng, tag: u64) -> (Vec<SequenceHash>, usize) {
    let family = rng.next_u64() % FAMILIES;
    let len = 2 + (rng.next_u64() % 14) as usize;
    let prefix = (1 + (rng.next_u64() % 4) as usize).min(len);
    let conversation = rng.next_u64() % 4096;
    let hashes = (0..len)
        .map(|i| {
            SequenceHash::new(if i < prefix {
                family << 32 | i as u64
            } else {
                1 << 63
                    | (tag & 0x7f) << 56
                    | family << 40
                    | conversation << 16
                    | (prefix as u64) << 8
                    | i as u64
            })
        })
        .collect();
    (hashes, prefix)
}

/// Reads (or writes) a block, retrying while a copy holds it.
fn retry(mut f: impl FnMut() -> Result<(), LayoutError>) -> Result<(), String> {
    loop {
        match f() {
            Ok(()) => return Ok(()),
            Err(LayoutError::BlockBusy(_)) => std::thread::yield_now(),
            Err(e) => return Err(e.to_string()),
        }
    }
}

fn worker(stack: &TierStack, shared: &Shared, seed: u64, thread: u64) -> Result<(), String> {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (thread * 7919 + 1));
    let bytes = stack.g1().layout().block_bytes();
    let (mut got, mut expect) = (vec![0u8; bytes], vec![0u8; bytes]);
    while !shared.stop.load(Ordering::Relaxed) {
        let (hashes, prefix) = conversation(&mut rng, seed);
        // 1. Plan and commit (back-pressure: serve nothing from the cache this time).
        let plan = stack.lookup(&hashes);
        let from: Vec<TierId> = (0..plan.len()).filter_map(|i| plan.tier(i)).collect();
        let (mut held, spare) = match stack.onboard(plan, usize::MAX) {
            Ok(pending) => {
                let done = pending.wait();
                (done.blocks, done.spare)
            }
            Err(OnboardError::NoRoom { .. }) => (Vec::new(), Vec::new()),
            Err(e) => return Err(e.to_string()),
        };
        // 2. Check every served byte.
        for (i, b) in held.iter().enumerate() {
            if b.sequence_hash() != hashes[i] {
                return Err(format!("position {i} served {:?}", b.sequence_hash()));
            }
            retry(|| stack.g1().layout().read_block(b.block_id(), &mut got))?;
            kv(b.sequence_hash(), &mut expect);
            if got != expect {
                return Err(format!(
                    "block {:?} of {:?} holds wrong bytes",
                    b.block_id(),
                    b.sequence_hash()
                ));
            }
            if i < prefix
                && from.get(i).is_some_and(|t| *t != TierId::G1)
                && !shared.wrote(hashes[i])
            {
                shared.foreign.fetch_add(1, Ordering::Relaxed);
            }
        }
        shared
            .checked
            .fetch_add(held.len() as u64, Ordering::Relaxed);
        // 3. Allocate the rest, compute, register.
        let have = held.len();
        if have < hashes.len() {
            // The onboard's spare slots (past its prefix's end) first, then fresh ones.
            let rest = hashes.len() - have - spare.len();
            match stack
                .allocate(rest)
                .map(|f| spare.into_iter().chain(f).collect::<Vec<_>>())
            {
                Ok(fresh) => {
                    let mut staged = Vec::with_capacity(fresh.len());
                    for (b, i) in fresh.into_iter().zip(have..) {
                        kv(hashes[i], &mut expect);
                        retry(|| stack.g1().layout().write_block(b.block_id(), &expect))?;
                        let parent = i.checked_sub(1).map(|p| hashes[p]);
                        staged.push(
                            b.stage(hashes[i], PAGE)
                                .map_err(|e| e.to_string())?
                                .with_parent(parent),
                        );
                    }
                    if have < prefix {
                        shared
                            .written_prefixes
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .extend(hashes[have..prefix].iter().copied());
                    }
                    let registered = stack
                        .register(staged, EngineSync::Ready)
                        .map_err(|e| e.to_string())?;
                    held.extend(registered);
                }
                Err(_) => {
                    // Not completed: counted as deferred only.
                    shared.deferred.fetch_add(1, Ordering::Relaxed);
                    ImmutableBlock::release_all(held);
                    continue;
                }
            }
        }
        ImmutableBlock::release_all(held);
        shared.requests.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn resident_memory_is_read_in_kib_whatever_the_page_size() {
        let status = "Name:\tkvbm-bench\nVmRSS:\t  204800 kB\nThreads:\t4\n";
        assert_eq!(super::vm_rss_kib(status), Some(204800.0));
        assert_eq!(super::vm_rss_kib("Name:\tx\n"), None);
        // This process: a resident size, in MiB, that a Vec of 512 MiB touched moves up (by
        // far more than other tests running meanwhile can free).
        let before = super::rss_mib();
        let big = std::hint::black_box(vec![1u8; 512 << 20]);
        let after = super::rss_mib();
        assert!(
            before > 0.0 && after - before > 384.0,
            "{before} -> {after}"
        );
        drop(big);
    }
}
