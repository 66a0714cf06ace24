//! `kvbm-bench tiered`: requests replayed through a tier stack (G1 over G2) as a scheduler
//! drives it — plan, commit, wait, allocate the rest, compute, register — with every
//! computed block written with a pattern of its hash and every onboarded byte checked.
//! Reports hits per tier, offload/onboard/skip/loss counts, verified bytes and mismatches,
//! and the time the scheduler thread spends inside kvbm per request. The same requests
//! replayed through one LRU pool of G2's size give the hit rate tiering must not lose.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvbm_logical::{
    BlockId, BlockManager, BlockManagerBuilder, BlockTier, Device, EvictionBackend,
    FrequencyTracking, Host, ImmutableBlock, SequenceHash,
};
use kvbm_physical::disk::{Capacity, DiskTier, layout_fingerprint};
use kvbm_physical::remote::{Namespace, RemoteConfig, RemoteStore};
use kvbm_physical::stack::{
    Admission, CopyStats, EngineSync, OnboardError, Probe, Skip, StoreTierConfig, TierId,
    TierStack, Watermarks, WriteMode,
};
use kvbm_physical::{
    CopyOptions, Layout, LayoutConfig, LayoutKind, MemoryKind, Strategy, TransferEngine,
};
use serde::Serialize;

use crate::trace::Request;
use crate::transfer::{EngineSide, Target, engine_layout};
use crate::workload::Rng;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Tokens per block in the stack (the trace's own block size does not matter here).
const PAGE: usize = 16;
/// Layers per block (each with K and V, or one MLA latent).
const LAYERS: usize = 2;
/// Default region size (one layer's K or V page of a block) on a GPU, KiB: the size the
/// bandwidth goal is stated at.
pub const GPU_REGION_KIB: usize = 32;
/// Default region size on the CPU fallback, KiB (8 KiB blocks: fast to write and check).
pub const CPU_REGION_KIB: usize = 2;
/// Blocks in the one large copy that gives the bandwidth ceiling (a 64-block request).
pub const CEILING_BLOCKS: usize = 64;

/// The store tiers below G2 and the admission filters of every boundary, as
/// `kvbm-bench tiered` and `kvbm-bench soak` take them.
#[derive(Clone, Debug, Default)]
pub struct StoreOptions {
    /// A disk tier file (G3), created if missing (a file of another layout is started
    /// afresh; what it holds from an earlier run of the same layout is recovered).
    pub disk: Option<PathBuf>,
    /// The disk tier's capacity in blocks (0: four times G2).
    pub disk_blocks: usize,
    /// A Redis URL for the remote tier (below the disk tier when both are given).
    pub redis: Option<String>,
    /// Speak Redis Cluster (`redis` is a seed).
    pub cluster: bool,
    /// The model id of the remote namespace: processes with the same one (and the same
    /// layout) share blocks.
    pub namespace: String,
    /// G1 → G2 admission.
    pub g2_admission: Admission,
    /// G2 → disk admission.
    pub disk_admission: Admission,
    /// G2 → Redis admission.
    pub redis_admission: Admission,
}

/// Parses an admission filter: `presence`, or `freq:K` / `min-frequency:K` (at least `K`
/// recent accesses in the upper tier's frequency sketch).
///
/// ```
/// use kvbm_bench::tiered::parse_admission;
/// use kvbm_physical::stack::Admission;
/// assert_eq!(parse_admission("presence"), Ok(Admission::Presence));
/// assert_eq!(parse_admission("freq:2"), Ok(Admission::MinFrequency(2)));
/// assert!(parse_admission("often").is_err());
/// ```
pub fn parse_admission(s: &str) -> Result<Admission, String> {
    let s = s.trim();
    if s == "presence" {
        return Ok(Admission::Presence);
    }
    let k = s
        .strip_prefix("freq:")
        .or_else(|| s.strip_prefix("min-frequency:"))
        .ok_or_else(|| format!("unknown admission {s:?}: presence, or freq:K"))?;
    k.parse::<u32>()
        .map(Admission::MinFrequency)
        .map_err(|e| format!("admission {s:?}: {e}"))
}

/// One block's shape: `LAYERS` layers, K and V (one latent for MLA), 16 tokens, a region of
/// `region_kib` KiB.
pub fn layout_config(blocks: usize, region_kib: usize, outer_dim: usize) -> LayoutConfig {
    LayoutConfig {
        num_blocks: blocks,
        num_layers: LAYERS,
        outer_dim,
        page_size: PAGE,
        inner_dim: region_kib * 1024 / (PAGE * 2),
        dtype_bytes: 2,
    }
}

/// What a stack for a benchmark is made of.
#[derive(Clone, Debug)]
pub struct StackSpec {
    /// G1 blocks.
    pub g1: usize,
    /// G2 blocks.
    pub g2: usize,
    /// G1's layout.
    pub g1_layout: EngineSide,
    /// Region size, KiB.
    pub region_kib: usize,
    /// When G1 offloads.
    pub mode: WriteMode,
    /// Write-through: the free G1 blocks a worker keeps by evicting ahead of allocations.
    pub reserve: Option<Watermarks>,
    /// Worker threads.
    pub workers: usize,
    /// G1's and G2's eviction policy (`None`: the managers' default for their settings).
    pub eviction: Option<EvictionBackend>,
    /// Store tiers and admission.
    pub stores: StoreOptions,
}

/// A built stack and its store tiers, in stack order (G3, G4).
pub struct BuiltStack {
    /// The stack.
    pub stack: TierStack,
    /// The store tiers' names, in order (`"disk"`, `"redis"`).
    pub store_names: Vec<&'static str>,
    /// The disk tier, if any (for its own stats).
    pub disk: Option<Arc<DiskTier>>,
    /// The remote tier, if any.
    pub remote: Option<Arc<RemoteStore>>,
}

fn tracking(needed: bool) -> FrequencyTracking {
    if needed {
        FrequencyTracking::Medium
    } else {
        FrequencyTracking::Disabled
    }
}

fn with_policy<T: BlockTier>(
    b: BlockManagerBuilder<T>,
    eviction: Option<EvictionBackend>,
) -> BlockManagerBuilder<T> {
    match eviction {
        Some(e) => b.eviction(e),
        None => b,
    }
}

/// Builds a stack on `target`: G1 in device memory (in `spec.g1_layout`, an engine's tensors
/// where asked) or system memory, G2 pinned (or system memory) with checksums, then the disk
/// and Redis tiers asked for.
pub fn build_stack(target: &Target, spec: &StackSpec) -> Result<BuiltStack, Error> {
    let (engine, g1_mem, g2_mem, cuda) = match target {
        Target::Cpu => (
            TransferEngine::host(),
            MemoryKind::System,
            MemoryKind::System,
            None,
        ),
        Target::Gpu(gpu) => (
            TransferEngine::with_cuda(gpu.clone()),
            MemoryKind::Device {
                ordinal: gpu.ordinal(),
            },
            MemoryKind::Pinned,
            Some(gpu.clone()),
        ),
    };
    let outer = spec.g1_layout.outer_dim();
    let config = |n| layout_config(n, spec.region_kib, outer);
    let min_freq = |a: Admission| matches!(a, Admission::MinFrequency(_));
    // A frequency-aware eviction policy (adaptive, multi-lru) needs the sketch too.
    let sketch = spec.eviction.is_some_and(EvictionBackend::needs_frequency);
    let o = &spec.stores;
    let g2_layout = Layout::allocate(
        LayoutKind::FullyContiguous,
        config(spec.g2),
        g2_mem,
        cuda.as_ref(),
    )?
    .with_checksums()?
    .into_shared();
    let block_bytes = g2_layout.block_bytes();
    let mut builder = TierStack::builder()
        .g1(
            with_policy(
                BlockManager::<Device>::builder()
                    .block_count(spec.g1)
                    .block_size(PAGE)
                    .frequency_tracking(tracking(min_freq(o.g2_admission) || sketch)),
                spec.eviction,
            )
            .build()?,
            engine_layout(spec.g1_layout, config(spec.g1), g1_mem, cuda.as_ref())?,
        )
        .g2(
            with_policy(
                BlockManager::<Host>::builder()
                    .block_count(spec.g2)
                    .block_size(PAGE)
                    .frequency_tracking(tracking(
                        sketch
                            || (o.disk.is_some() && min_freq(o.disk_admission))
                            || (o.redis.is_some() && min_freq(o.redis_admission)),
                    )),
                spec.eviction,
            )
            .build()?,
            g2_layout,
        )
        .engine(engine)
        .write_mode(spec.mode)
        .g2_admission(o.g2_admission)
        .workers(spec.workers);
    if let Some(r) = spec.reserve {
        builder = builder.free_reserve(r);
    }
    let mut store_names = Vec::new();
    let mut disk = None;
    let mut remote = None;
    let shape = config(1);
    if let Some(path) = &o.disk {
        let slots = if o.disk_blocks == 0 {
            4 * spec.g2
        } else {
            o.disk_blocks
        };
        let tier = Arc::new(
            DiskTier::builder()
                .path(path)
                .block_bytes(block_bytes)
                .capacity(Capacity::Blocks(u32::try_from(slots)?))
                .fingerprint(layout_fingerprint(&shape, 0x6b76_626d))
                .open()?,
        );
        builder = builder.store(
            StoreTierConfig::new(tier.clone())
                .admission(o.disk_admission)
                .probe(Probe::OnLookup),
        );
        store_names.push("disk");
        disk = Some(tier);
    }
    if let Some(url) = &o.redis {
        let namespace = if o.namespace.is_empty() {
            "kvbm-bench"
        } else {
            &o.namespace
        };
        let config = RemoteConfig::builder(Namespace::for_layout(namespace, &shape), block_bytes)
            .url(url.as_str())
            .cluster(o.cluster)
            .connect_timeout(Duration::from_millis(500))
            .response_timeout(Duration::from_secs(2))
            .build()?;
        let tier = Arc::new(RemoteStore::open(config)?);
        builder = builder.store(
            StoreTierConfig::new(tier.clone())
                .admission(o.redis_admission)
                .probe(Probe::Deferred),
        );
        store_names.push("redis");
        remote = Some(tier);
    }
    Ok(BuiltStack {
        stack: builder.build()?,
        store_names,
        disk,
        remote,
    })
}

/// The bandwidth of one large copy of `CEILING_BLOCKS` blocks' bytes between G1's and G2's
/// memories (device and pinned; system memory on the CPU), each way: (offload D2H, onboard
/// H2D) in GB/s, medians of five after a warm-up.
pub fn ceiling(target: &Target, region_kib: usize, outer_dim: usize) -> Result<(f64, f64), Error> {
    let (engine, g1_mem, g2_mem, cuda, strategy) = match target {
        Target::Cpu => (
            TransferEngine::host(),
            MemoryKind::System,
            MemoryKind::System,
            None,
            Strategy::Memcpy,
        ),
        Target::Gpu(gpu) => (
            TransferEngine::with_cuda(gpu.clone()),
            MemoryKind::Device {
                ordinal: gpu.ordinal(),
            },
            MemoryKind::Pinned,
            Some(gpu.clone()),
            Strategy::AsyncCopies,
        ),
    };
    let c = layout_config(CEILING_BLOCKS, region_kib, outer_dim);
    let alloc = |m| -> Result<Arc<Layout>, Error> {
        Ok(Layout::allocate(LayoutKind::FullyContiguous, c, m, cuda.as_ref())?.into_shared())
    };
    let (dev, host) = (alloc(g1_mem)?, alloc(g2_mem)?);
    let image: Vec<u8> = (0..dev.block_bytes())
        .map(|i| (i % 251) as u8 + 1)
        .collect();
    for l in [&dev, &host] {
        for b in 0..CEILING_BLOCKS {
            l.write_block(BlockId::new(b as u32), &image)?;
        }
    }
    // Consecutive contiguous blocks: one copy.
    let pairs: Vec<(BlockId, BlockId)> = (0..CEILING_BLOCKS as u32)
        .map(|i| (BlockId::new(i), BlockId::new(i)))
        .collect();
    let bytes = (CEILING_BLOCKS * dev.block_bytes()) as f64;
    let time = |src: &Arc<Layout>, dst: &Arc<Layout>| -> Result<f64, Error> {
        let options = CopyOptions::strategy(strategy);
        engine.copy_blocks_blocking(src, dst, &pairs, &options)?;
        let mut secs = Vec::with_capacity(5);
        for _ in 0..5 {
            let t = Instant::now();
            engine.copy_blocks_blocking(src, dst, &pairs, &options)?;
            secs.push(t.elapsed().as_secs_f64());
        }
        secs.sort_by(f64::total_cmp);
        Ok(bytes / secs[secs.len() / 2] / 1e9)
    };
    let d2h = time(&dev, &host)?;
    let h2d = time(&host, &dev)?;
    Ok((d2h, h2d))
}
/// What to run.
#[derive(Clone, Debug)]
pub struct TieredConfig {
    /// G1 blocks.
    pub g1: usize,
    /// G2 blocks.
    pub g2: usize,
    /// Offload on eviction (watermarks at 1/16 and 1/8 of G1) instead of on registration.
    pub write_back: bool,
    /// Write-through without a free reserve (by default a worker keeps 1/16 to 1/8 of G1
    /// free, so that allocations need not evict).
    pub no_reserve: bool,
    /// Worker threads.
    pub workers: usize,
    /// G1's and G2's eviction policy (`None`: the managers' default).
    pub eviction: Option<EvictionBackend>,
    /// Requests held at once (a request's blocks are released `window` requests later).
    pub window: usize,
    /// G1's layout: kvbm's layer-separate one, or an engine's tensors.
    pub g1_layout: EngineSide,
    /// Region size in KiB ([`GPU_REGION_KIB`] / [`CPU_REGION_KIB`] are the defaults).
    pub region_kib: usize,
    /// Store tiers below G2 and admission filters.
    pub stores: StoreOptions,
}

/// Per tier: what happened there.
#[derive(Clone, Debug, Serialize)]
pub struct TierLine {
    /// `G1`, `G2`, `G3`, ...
    pub tier: String,
    /// What it is: `device`/`host` memory (or `system` on the CPU), `disk`, `redis`.
    pub medium: String,
    /// Prefix blocks served from this tier (G1 hits, or onboarded from it).
    pub hits: u64,
    /// Blocks offloaded into it.
    pub offloaded: u64,
    /// Blocks onboarded from it into G1.
    pub onboarded: u64,
    /// Offloads into it skipped, all reasons.
    pub skipped: u64,
    /// Of those, because the queue was full.
    pub skipped_queue_full: u64,
    /// Of those, write-back evictions the reclaimer had not reached.
    pub skipped_reclaim_behind: u64,
    /// Blocks lost there (failed copies, corrupt blocks).
    pub lost: u64,
    /// Store tiers: values that did not verify (removed there, never served).
    pub corrupt: u64,
}

/// One phase of the scheduler's time per request: thread CPU time, microseconds.
#[derive(Clone, Debug, Serialize)]
pub struct PhaseLine {
    /// `plan+commit`, `allocate`, `register`, `release`.
    pub phase: &'static str,
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
}

/// The phases of [`PhaseLine`], in request order.
const PHASES: [&str; 4] = ["plan+commit", "allocate", "register", "release"];

/// The outcome of one run.
#[derive(Clone, Debug, Serialize)]
pub struct TieredResult {
    /// `write-through` or `write-back`.
    pub mode: &'static str,
    /// Write-through's free reserve (low, high), if any.
    pub reserve: Option<(usize, usize)>,
    /// G1's and G2's eviction policy.
    pub eviction: &'static str,
    /// G1 and G2 blocks.
    pub g1: usize,
    /// G2 blocks.
    pub g2: usize,
    /// Requests served.
    pub requests: usize,
    /// Requests skipped: longer than half of G1, or G1 full of held blocks even after the
    /// queue drained.
    pub unservable: usize,
    /// Requests whose allocation had to wait for the offload queue to drain (queued offloads
    /// hold their G1 blocks until the copies land); not counted in the scheduler time.
    pub deferred: u64,
    /// Mean blocks per served request.
    pub blocks_per_request: f64,
    /// Blocks the served requests asked for.
    pub requested_blocks: u64,
    /// Of those, served from some tier (the prefix hit).
    pub hit_blocks: u64,
    /// `hit_blocks / requested_blocks`.
    pub hit_rate: f64,
    /// The same requests through one LRU pool of G2's size: the rate tiering must reach.
    pub lru_hit_rate_at_g2: f64,
    /// `hit_rate >= lru_hit_rate_at_g2 - 0.01`.
    pub hit_goal_met: bool,
    /// Per tier.
    pub tiers: Vec<TierLine>,
    /// Onboards refused for want of room in G1 (back-pressure).
    pub not_now: u64,
    /// Bytes of every served block (G1 hits and onboarded blocks) read back and compared.
    pub verified_bytes: u64,
    /// Blocks whose bytes were wrong (must be 0).
    pub mismatches: u64,
    /// Scheduler time inside kvbm per request, microseconds: median.
    pub sched_us_p50: f64,
    /// 99th percentile.
    pub sched_us_p99: f64,
    /// Maximum.
    pub sched_us_max: f64,
    /// The scheduler thread's CPU time inside kvbm per request, microseconds: the wall time
    /// without the time a loaded machine kept the thread off the CPU (and without the time
    /// it slept waiting for a lock). Median.
    pub sched_cpu_us_p50: f64,
    /// 99th percentile.
    pub sched_cpu_us_p99: f64,
    /// The scheduler thread's CPU time per request by phase (the parts of
    /// `sched_cpu_us_*`): plan and commit (`lookup` + `onboard`), allocate, register (with
    /// staging), and releasing the request's blocks when it leaves the window.
    pub sched_cpu_phases: Vec<PhaseLine>,
    /// The machine's own spread: a fixed job of [`BASELINE_JOB_US`] of integer arithmetic
    /// (no memory traffic), run on the scheduler thread after each request and timed the same
    /// way. Its p99 over its p50 is what this machine adds to any tail by itself (another
    /// tenant on the core's sibling thread, the hypervisor, frequency changes) under the
    /// run's conditions (the stack's workers copying meanwhile): compare `sched_*_p99` with
    /// it, not with the p50 alone. It adds ~20 µs between requests, a few per cent of a
    /// request's cycle on the CPU (its workers get that much more time), so figures from
    /// before it (BENCHMARKS.md, up to 2026-11-29) compare with a little slack. Wall time,
    /// median.
    pub baseline_us_p50: f64,
    /// 99th percentile.
    pub baseline_us_p99: f64,
    /// The fixed job's CPU time, median.
    pub baseline_cpu_us_p50: f64,
    /// 99th percentile.
    pub baseline_cpu_us_p99: f64,
    /// Time from commit to a completed onboard, microseconds (requests that onboarded).
    pub onboard_wait_us_p50: f64,
    /// 99th percentile.
    pub onboard_wait_us_p99: f64,
    /// G1's layout.
    pub g1_layout: &'static str,
    /// Region size, KiB.
    pub region_kib: usize,
    /// Offload copies (G1 → G2): bytes over the time a batch was in flight, GB/s.
    pub offload_gb_s: f64,
    /// Onboard copies (G2 → G1), GB/s.
    pub onboard_gb_s: f64,
    /// One large copy of 64 blocks' bytes from G1's memory to G2's (D2H on a GPU), GB/s,
    /// measured in the same run.
    pub ceiling_offload_gb_s: f64,
    /// The same, G2's memory to G1's (H2D).
    pub ceiling_onboard_gb_s: f64,
    /// `offload_gb_s / ceiling_offload_gb_s` (goal on a GPU at 32 KiB regions: ≥ 0.9).
    pub offload_of_ceiling: f64,
    /// `onboard_gb_s / ceiling_onboard_gb_s`.
    pub onboard_of_ceiling: f64,
    /// Wall time, seconds.
    pub seconds: f64,
}

/// The bytes a block with `hash` holds.
fn kv(hash: SequenceHash, out: &mut [u8]) {
    let mut rng = Rng(hash.as_u64());
    for chunk in out.chunks_mut(8) {
        let v = rng.next_u64().to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// Turns requests into requests of exactly `n` blocks (`n` ≥ 2): each block id becomes 8
/// consecutive blocks (so shared prefixes stay shared), then
/// - a chain shorter than `n` is extended with blocks of its own (the request's new tokens);
/// - a longer one that continues earlier requests keeps its new message (the trailing ids
///   no earlier request had, at most `n / 2` blocks of them) after as much of its prefix as
///   fits: the context in the middle is dropped, as a server with a context limit does. Cut
///   at `n` instead, every later turn of a long conversation would repeat an earlier
///   request exactly. A longer one that shares nothing with earlier requests is cut at `n`.
///
/// The ids are then chained (each block's hash mixes its parent's), as an engine's block
/// hashes are: the same hash always follows the same prefix, and a block after a dropped
/// middle is a new block.
///
/// ```
/// use kvbm_bench::trace::Request;
/// let turn1 = Request { hash_ids: vec![1, 2, 3, 4, 5, 6, 7, 8, 9] }; // 72 blocks
/// let turn2 = Request { hash_ids: vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11] };
/// let out = kvbm_bench::tiered::fixed_length(&[turn1, turn2], 64);
/// assert!(out.iter().all(|r| r.hash_ids.len() == 64));
/// // The shared prefix is shared; each turn's new message is its own.
/// assert_eq!(out[0].hash_ids[..48], out[1].hash_ids[..48]);
/// assert_ne!(out[0].hash_ids[63], out[1].hash_ids[63]);
/// ```
pub fn fixed_length(requests: &[Request], n: usize) -> Vec<Request> {
    let n = n.max(2);
    let mut fresh = 1u64 << 62;
    let mut seen = std::collections::HashSet::new();
    requests
        .iter()
        .map(|r| {
            let new = r
                .hash_ids
                .iter()
                .rev()
                .take_while(|id| !seen.contains(*id))
                .count();
            seen.extend(r.hash_ids.iter().copied());
            let blocks = |ids: &[u64]| -> Vec<u64> {
                ids.iter()
                    .flat_map(|&id| (0..8).map(move |j| id * 8 + j))
                    .collect()
            };
            let (old, new) = r.hash_ids.split_at(r.hash_ids.len() - new);
            let (mut ids, mut tail) = (blocks(old), blocks(new));
            if ids.is_empty() {
                std::mem::swap(&mut ids, &mut tail);
            } else if ids.len() + tail.len() > n {
                tail.truncate(n / 2);
                ids.truncate(n - tail.len());
            }
            ids.extend(tail);
            while ids.len() < n {
                ids.push(fresh);
                fresh += 1;
            }
            ids.truncate(n);
            let mut parent = 0u64;
            for id in &mut ids {
                parent = chain(parent, *id);
                *id = parent;
            }
            Request { hash_ids: ids }
        })
        .collect()
}

/// A block's hash from its parent's and its own id (splitmix64's finalizer over both).
fn chain(parent: u64, id: u64) -> u64 {
    let mut z = parent.rotate_left(29) ^ id.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The calling thread's CPU time in nanoseconds (`CLOCK_THREAD_CPUTIME_ID`): what the
/// scheduler thread spends running, without the time a loaded machine keeps it off the CPU.
struct ThreadClock;

impl ThreadClock {
    fn open() -> Self {
        Self
    }

    fn now(&self) -> Option<u64> {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        (rc == 0).then(|| ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
    }
}

/// CPU nanoseconds since `start` (0 without a clock).
fn span(clock: &ThreadClock, start: Option<u64>) -> u64 {
    match (start, clock.now()) {
        (Some(a), Some(b)) => b.saturating_sub(a),
        _ => 0,
    }
}

/// The CPU time the machine baseline's fixed job is calibrated to take, microseconds (the
/// issue's p99 goal for the scheduler's time per request).
pub const BASELINE_JOB_US: f64 = 20.0;

/// A fixed amount of integer arithmetic: one chain of dependent multiply-adds, no memory
/// traffic, so that its time varies only with the machine (see
/// [`TieredResult::baseline_us_p50`]).
struct FixedJob {
    iterations: u64,
}

impl FixedJob {
    /// Runs `iterations` steps of the chain.
    fn spin(iterations: u64) -> u64 {
        let mut x = std::hint::black_box(1u64);
        for i in 0..iterations {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            if i % 64 == 0 {
                x = std::hint::black_box(x);
            }
        }
        x
    }

    /// A job of about `us` microseconds of CPU time here: the fastest of a few timed trials
    /// sets the rate (the least disturbed one). Without a thread clock, wall time. Clamped
    /// to a sane range (a clock too coarse to time a trial gives the upper bound's rate).
    fn calibrate(clock: &ThreadClock, us: f64) -> Self {
        const TRIAL: u64 = 200_000;
        let best = (0..7)
            .map(|_| {
                let t0 = clock.now();
                let w0 = Instant::now();
                std::hint::black_box(Self::spin(TRIAL));
                match t0 {
                    Some(_) => span(clock, t0),
                    None => w0.elapsed().as_nanos() as u64,
                }
            })
            .min()
            .unwrap_or(0)
            .max(1);
        let iterations = (TRIAL as f64 * us * 1e3 / best as f64).round() as u64;
        Self {
            iterations: iterations.clamp(1_000, 100_000_000),
        }
    }

    fn run(&self) {
        std::hint::black_box(Self::spin(self.iterations));
    }
}

/// Replays `requests` through a stack on `target`; see the module docs.
pub fn run(
    target: &Target,
    requests: &[Request],
    config: &TieredConfig,
) -> Result<TieredResult, Error> {
    let watermarks = Watermarks::new((config.g1 / 16).max(1), (config.g1 / 8).max(1));
    let mode = if config.write_back {
        WriteMode::WriteBack(watermarks)
    } else {
        WriteMode::WriteThrough
    };
    let reserve = (!config.write_back && !config.no_reserve).then_some(watermarks);
    let (ceiling_offload, ceiling_onboard) =
        ceiling(target, config.region_kib, config.g1_layout.outer_dim())?;
    let built = build_stack(
        target,
        &StackSpec {
            g1: config.g1,
            g2: config.g2,
            g1_layout: config.g1_layout,
            region_kib: config.region_kib,
            mode,
            reserve,
            workers: config.workers,
            eviction: config.eviction,
            stores: config.stores.clone(),
        },
    )?;
    let stack = &built.stack;
    let bytes = stack.g1().layout().block_bytes();
    let mut expect = vec![0u8; bytes];
    let mut got = vec![0u8; bytes];
    let mut sched: Vec<f64> = Vec::with_capacity(requests.len());
    let mut sched_cpu: Vec<f64> = Vec::with_capacity(requests.len());
    let mut phases: [Vec<f64>; 4] = Default::default();
    let clock = ThreadClock::open();
    // What reading the clock itself costs (subtracted from each of the four spans).
    let mut empty: Vec<u64> = (0..999).map(|_| span(&clock, clock.now())).collect();
    empty.sort_unstable();
    let clock_cost = empty[empty.len() / 2];
    let job = FixedJob::calibrate(&clock, BASELINE_JOB_US);
    let mut baseline: Vec<f64> = Vec::with_capacity(requests.len());
    let mut baseline_cpu: Vec<f64> = Vec::with_capacity(requests.len());
    let mut waits: Vec<f64> = Vec::new();
    let mut held: std::collections::VecDeque<Vec<ImmutableBlock<Device>>> = Default::default();
    let (mut served, mut unservable, mut requested, mut hit) = (0usize, 0usize, 0u64, 0u64);
    // The requests served, for the single-pool baseline (the same requests, no others).
    let mut served_requests: Vec<Request> = Vec::with_capacity(requests.len());
    let mut deferred = 0u64;
    let mut tier_hits = vec![0u64; 2];
    let (mut verified, mut mismatches) = (0u64, 0u64);
    let start = Instant::now();
    for request in requests {
        let hashes: Vec<SequenceHash> = request
            .hash_ids
            .iter()
            .map(|&id| SequenceHash::new(id))
            .collect();
        if hashes.len() > config.g1 / 2 {
            unservable += 1;
            continue;
        }
        // 1. Plan and commit.
        let mut cpu_ns = 0u64;
        let c0 = clock.now();
        let t0 = Instant::now();
        let plan = stack.lookup(&hashes);
        let tiers: Vec<TierId> = (0..plan.len()).filter_map(|i| plan.tier(i)).collect();
        let pending = match stack.onboard(plan, usize::MAX) {
            Ok(p) => Some(p),
            Err(OnboardError::NoRoom { .. }) => None,
            Err(e) => return Err(e.into()),
        };
        let mut in_kvbm = t0.elapsed();
        let plan_ns = span(&clock, c0);
        cpu_ns += plan_ns;
        // 2. Wait for the copies (the engine would run other requests meanwhile).
        let w0 = Instant::now();
        let (mut blocks, spare) = match pending {
            Some(p) => {
                let needs_copy = !p.is_ready();
                let done = p.wait();
                if needs_copy {
                    waits.push(w0.elapsed().as_secs_f64() * 1e6);
                }
                (done.blocks, done.spare)
            }
            None => (Vec::new(), Vec::new()),
        };
        // 3. Check every served byte.
        for b in &blocks {
            kv(b.sequence_hash(), &mut expect);
            stack.g1().layout().read_block(b.block_id(), &mut got)?;
            verified += bytes as u64;
            if got != expect {
                mismatches += 1;
            }
        }
        let have = blocks.len();
        // 4. Allocate the rest, compute, register.
        let c1 = clock.now();
        let t1 = Instant::now();
        // The onboard's spare slots (past its prefix's end) first, then fresh ones.
        let rest = hashes.len() - have - spare.len();
        let mut fresh = stack.allocate(rest);
        in_kvbm += t1.elapsed();
        let allocate_ns = span(&clock, c1);
        cpu_ns += allocate_ns;
        if fresh.is_err() {
            // Back-pressure: queued offloads hold G1 blocks until their copies land. A
            // scheduler defers the request; here, wait for the queue and retry once.
            deferred += 1;
            stack.flush();
            fresh = stack.allocate(rest);
        }
        let fresh = fresh.map(|f| spare.into_iter().chain(f).collect::<Vec<_>>());
        let Ok(fresh) = fresh else {
            unservable += 1;
            ImmutableBlock::release_all(blocks);
            continue;
        };
        for (i, _) in blocks.iter().enumerate() {
            let t = tiers.get(i).map_or(0, |t| t.index());
            if tier_hits.len() <= t {
                tier_hits.resize(t + 1, 0);
            }
            tier_hits[t] += 1;
        }

        for (b, i) in fresh.iter().zip(have..) {
            kv(hashes[i], &mut expect);
            stack.g1().layout().write_block(b.block_id(), &expect)?;
        }
        let c2 = clock.now();
        let t2 = Instant::now();
        let staged = fresh
            .into_iter()
            .zip(have..)
            .map(|(b, i)| {
                let parent = i.checked_sub(1).map(|p| hashes[p]);
                b.stage(hashes[i], PAGE).map(|c| c.with_parent(parent))
            })
            .collect::<Result<Vec<_>, _>>()?;
        blocks.extend(stack.register(staged, EngineSync::Ready)?);
        let register_ns = span(&clock, c2);
        let c3 = clock.now();
        held.push_back(blocks);
        if held.len() >= config.window.max(1)
            && let Some(old) = held.pop_front()
        {
            ImmutableBlock::release_all(old);
        }
        in_kvbm += t2.elapsed();
        let release_ns = span(&clock, c3);
        cpu_ns += register_ns + release_ns;
        sched.push(in_kvbm.as_secs_f64() * 1e6);
        sched_cpu.push((cpu_ns.saturating_sub(4 * clock_cost)) as f64 / 1e3);
        for (phase, ns) in phases
            .iter_mut()
            .zip([plan_ns, allocate_ns, register_ns, release_ns])
        {
            phase.push(ns.saturating_sub(clock_cost) as f64 / 1e3);
        }
        served += 1;
        served_requests.push(request.clone());
        requested += hashes.len() as u64;
        hit += have as u64;
        // The machine's own spread, timed the same way (see `baseline_us_p50`).
        let c4 = clock.now();
        let t4 = Instant::now();
        job.run();
        baseline.push(t4.elapsed().as_secs_f64() * 1e6);
        baseline_cpu.push(span(&clock, c4).saturating_sub(clock_cost) as f64 / 1e3);
    }
    for old in held.drain(..) {
        ImmutableBlock::release_all(old);
    }
    stack.flush();
    let seconds = start.elapsed().as_secs_f64();
    let st = stack.stats();
    for c in [
        stack.g1().check_invariants()?,
        stack.g2().check_invariants()?,
    ] {
        if c.reset + c.inactive + c.mutable + c.active != c.total || c.mutable + c.active != 0 {
            return Err(format!("slots not conserved after the run: {c:?}").into());
        }
    }
    if served == 0 {
        return Err(format!(
            "no request was served ({unservable} unservable: longer than half of G1, {} \
             blocks here, or no room in G1 even after waiting for the offloads); nothing was \
             measured",
            config.g1 / 2
        )
        .into());
    }
    let lru = crate::replay::replay(
        &served_requests,
        config.g2,
        crate::replay::Policy::Backend(EvictionBackend::Lru),
    )?;
    sched.sort_by(f64::total_cmp);
    baseline.sort_by(f64::total_cmp);
    baseline_cpu.sort_by(f64::total_cmp);
    sched_cpu.sort_by(f64::total_cmp);
    let sched_cpu_phases = PHASES
        .iter()
        .zip(&mut phases)
        .map(|(&phase, v)| {
            v.sort_by(f64::total_cmp);
            PhaseLine {
                phase,
                p50: percentile(v, 0.5),
                p99: percentile(v, 0.99),
            }
        })
        .collect();
    waits.sort_by(f64::total_cmp);
    let hit_rate = if requested == 0 {
        0.0
    } else {
        hit as f64 / requested as f64
    };
    let tiers = st
        .tiers
        .iter()
        .map(|t| TierLine {
            tier: t.tier.to_string(),
            medium: medium(target, &built, t.tier),
            corrupt: match t.tier {
                TierId::Store(i) => stack.store(i).map_or(0, |s| s.stats().corrupt),
                _ => 0,
            },
            hits: tier_hits.get(t.tier.index()).copied().unwrap_or(0),
            offloaded: t.offloaded,
            onboarded: t.onboarded,
            skipped: t.skipped_total(),
            skipped_queue_full: t.skipped(Skip::QueueFull),
            skipped_reclaim_behind: t.skipped(Skip::ReclaimBehind),
            lost: t.lost,
        })
        .collect();
    Ok(TieredResult {
        eviction: stack.g1().eviction_backend().name(),
        reserve: reserve.map(|w| (w.low, w.high)),
        mode: if config.write_back {
            "write-back"
        } else {
            "write-through"
        },
        g1: config.g1,
        g2: config.g2,
        requests: served,
        unservable,
        deferred,
        blocks_per_request: requested as f64 / served.max(1) as f64,
        requested_blocks: requested,
        hit_blocks: hit,
        hit_rate,
        lru_hit_rate_at_g2: lru.hit_rate,
        hit_goal_met: hit_rate >= lru.hit_rate - 0.01,
        tiers,
        not_now: st.not_now,
        verified_bytes: verified,
        mismatches,
        sched_us_p50: percentile(&sched, 0.5),
        sched_us_p99: percentile(&sched, 0.99),
        sched_us_max: sched.last().copied().unwrap_or(0.0),
        sched_cpu_us_p50: percentile(&sched_cpu, 0.5),
        sched_cpu_us_p99: percentile(&sched_cpu, 0.99),
        sched_cpu_phases,
        baseline_us_p50: percentile(&baseline, 0.5),
        baseline_us_p99: percentile(&baseline, 0.99),
        baseline_cpu_us_p50: percentile(&baseline_cpu, 0.5),
        baseline_cpu_us_p99: percentile(&baseline_cpu, 0.99),
        onboard_wait_us_p50: percentile(&waits, 0.5),
        onboard_wait_us_p99: percentile(&waits, 0.99),
        g1_layout: config.g1_layout.name(),
        region_kib: config.region_kib,
        offload_gb_s: gb(st.offload_copies),
        onboard_gb_s: gb(st.onboard_copies),
        ceiling_offload_gb_s: ceiling_offload,
        ceiling_onboard_gb_s: ceiling_onboard,
        offload_of_ceiling: gb(st.offload_copies) / ceiling_offload,
        onboard_of_ceiling: gb(st.onboard_copies) / ceiling_onboard,
        seconds,
    })
}

fn gb(c: CopyStats) -> f64 {
    c.gb_per_s().unwrap_or(0.0)
}

/// What tier `t` of a built stack is.
pub fn medium(target: &Target, built: &BuiltStack, t: TierId) -> String {
    let gpu = matches!(target, Target::Gpu(_));
    match t {
        TierId::G1 if gpu => "device".into(),
        TierId::G2 if gpu => "pinned".into(),
        TierId::G1 | TierId::G2 => "system".into(),
        TierId::Store(i) => built.store_names.get(i).copied().unwrap_or("store").into(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use super::*;

    #[test]
    fn fixed_length_requests_are_chains_that_each_bring_new_blocks() {
        let requests = fixed_length(&crate::workload::Synthetic::default().generate(), 64);
        let mut seen = HashSet::new();
        let mut parents: HashMap<u64, Option<u64>> = HashMap::new();
        let mut hits = 0usize;
        for (k, r) in requests.iter().enumerate() {
            assert_eq!(r.hash_ids.len(), 64);
            let new = r.hash_ids.iter().filter(|h| !seen.contains(*h)).count();
            assert!(new > 0, "request {k} repeats earlier blocks only");
            hits += 64 - new;
            for (i, &h) in r.hash_ids.iter().enumerate() {
                let parent = i.checked_sub(1).map(|p| r.hash_ids[p]);
                assert_eq!(
                    *parents.entry(h).or_insert(parent),
                    parent,
                    "a hash after two different prefixes"
                );
            }
            seen.extend(r.hash_ids.iter().copied());
        }
        // Conversations and system prompts still share prefixes.
        let share = hits as f64 / (64 * requests.len()) as f64;
        assert!(share > 0.3 && share < 0.9, "{share}");
    }
}
