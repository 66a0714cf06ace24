//! The soak run: random requests from many threads against a tiered manager (G1 over G2,
//! with offload and onboarding) for a given time, checking every served block's bytes and
//! reporting operations, pool counts and resident memory at intervals.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kvbm_logical::{BlockManager, Device, Host, ImmutableBlock, SequenceHash};
use kvbm_physical::{
    Layout, LayoutConfig, LayoutKind, MemoryKind, OffloadMode, Tier, TieredManager, TransferEngine,
};
use serde::Serialize;

use crate::transfer::Target;
use crate::workload::Rng;

/// What to run.
#[derive(Clone, Debug)]
pub struct SoakConfig {
    /// How long.
    pub duration: Duration,
    /// Worker threads.
    pub threads: usize,
    /// G1 blocks.
    pub g1_blocks: usize,
    /// G2 blocks.
    pub g2_blocks: usize,
    /// When G1 copies to G2.
    pub mode: OffloadMode,
    /// Report interval.
    pub every: Duration,
}

/// One report line.
#[derive(Clone, Debug, Serialize)]
pub struct SoakSample {
    /// Seconds since the start.
    pub seconds: f64,
    /// Requests completed so far.
    pub requests: u64,
    /// Requests per second over the last interval.
    pub requests_per_s: f64,
    /// Blocks served (matched or onboarded) so far, each checked byte for byte.
    pub blocks_checked: u64,
    /// G1 `reset + inactive + mutable + active` and total.
    pub g1_accounted: (usize, usize),
    /// G2 likewise.
    pub g2_accounted: (usize, usize),
    /// Blocks onboarded G2 → G1 so far.
    pub onboarded: u64,
    /// Blocks offloaded G1 → G2 so far.
    pub offloaded: u64,
    /// Resident set size, MiB (Linux; 0 elsewhere).
    pub rss_mib: f64,
}

const PAGE: usize = 16;
const FAMILIES: u64 = 512;

fn layout_config(blocks: usize) -> LayoutConfig {
    // 2 layers × K,V × 16 tokens × 64 × 2 bytes: 8 KiB blocks.
    LayoutConfig {
        num_blocks: blocks,
        num_layers: 2,
        outer_dim: 2,
        page_size: PAGE,
        inner_dim: 64,
        dtype_bytes: 2,
    }
}

/// The bytes a block with `hash` must hold.
fn kv(hash: SequenceHash, len: usize) -> Vec<u8> {
    let mut rng = Rng(hash.as_u64());
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    out.truncate(len);
    out
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(0.0, |pages| pages * 4096.0 / (1 << 20) as f64)
}

/// Runs the soak; `report` receives each sample. Errors on the first wrong byte or broken
/// count.
pub fn run(
    target: &Target,
    config: &SoakConfig,
    mut report: impl FnMut(&SoakSample),
) -> Result<Vec<SoakSample>, Box<dyn std::error::Error + Send + Sync>> {
    let (engine, g1_mem, cuda) = match target {
        Target::Cpu => (TransferEngine::host(), MemoryKind::System, None),
        Target::Gpu(gpu) => (
            TransferEngine::with_cuda(gpu.clone()),
            MemoryKind::Device {
                ordinal: gpu.ordinal(),
            },
            Some(gpu.clone()),
        ),
    };
    let g2_mem = if cuda.is_some() {
        MemoryKind::Pinned
    } else {
        MemoryKind::System
    };
    let g1 = Tier::new(
        BlockManager::<Device>::builder()
            .block_count(config.g1_blocks)
            .block_size(PAGE)
            .build()?,
        Layout::allocate(
            LayoutKind::LayerSeparate,
            layout_config(config.g1_blocks),
            g1_mem,
            cuda.as_ref(),
        )?
        .into_shared(),
    )?;
    let g2 = Tier::new(
        BlockManager::<Host>::builder()
            .block_count(config.g2_blocks)
            .block_size(PAGE)
            .build()?,
        Layout::allocate(
            LayoutKind::FullyContiguous,
            layout_config(config.g2_blocks),
            g2_mem,
            cuda.as_ref(),
        )?
        .with_checksums()?
        .into_shared(),
    )?;
    let tiers = Arc::new(TieredManager::new(g1, g2, engine, config.mode)?);
    let stop = Arc::new(AtomicBool::new(false));
    let requests = Arc::new(AtomicU64::new(0));
    let checked = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..config.threads.max(1))
        .map(|t| {
            let (tiers, stop, requests, checked) = (
                Arc::clone(&tiers),
                Arc::clone(&stop),
                Arc::clone(&requests),
                Arc::clone(&checked),
            );
            std::thread::spawn(move || worker(&tiers, &stop, &requests, &checked, t as u64))
        })
        .collect();
    let mut samples = Vec::new();
    let mut last = (Instant::now(), 0u64);
    let sample = |tiers: &TieredManager, last: &mut (Instant, u64)| -> Result<SoakSample, String> {
        let c1 = tiers
            .g1()
            .manager()
            .check_invariants()
            .map_err(|e| e.to_string())?;
        let c2 = tiers
            .g2()
            .manager()
            .check_invariants()
            .map_err(|e| e.to_string())?;
        let n = requests.load(Ordering::Relaxed);
        let rate = (n - last.1) as f64 / last.0.elapsed().as_secs_f64().max(1e-9);
        *last = (Instant::now(), n);
        let stats = tiers.stats();
        Ok(SoakSample {
            seconds: start.elapsed().as_secs_f64(),
            requests: n,
            requests_per_s: rate,
            blocks_checked: checked.load(Ordering::Relaxed),
            g1_accounted: (c1.reset + c1.inactive + c1.mutable + c1.active, c1.total),
            g2_accounted: (c2.reset + c2.inactive + c2.mutable + c2.active, c2.total),
            onboarded: stats.onboarded,
            offloaded: stats.offloaded,
            rss_mib: rss_mib(),
        })
    };
    let mut failure = None;
    while start.elapsed() < config.duration {
        let wake = (config.every).min(config.duration.saturating_sub(start.elapsed()));
        std::thread::sleep(wake.max(Duration::from_millis(1)));
        if workers.iter().any(|w| w.is_finished()) {
            break; // a worker failed: collect its error below
        }
        match sample(&tiers, &mut last) {
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
    stop.store(true, Ordering::Relaxed);
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
    // Every handle is back: each tier's blocks are all reset or inactive.
    let s = sample(&tiers, &mut last)?;
    for (name, m) in [
        ("G1", tiers.g1().manager().counts()),
        ("G2", tiers.g2().manager().counts()),
    ]
    .map(|(n, c)| (n, (c.mutable, c.active)))
    {
        if m != (0, 0) {
            return Err(
                format!("{name} still has {m:?} (mutable, active) blocks after the run").into(),
            );
        }
    }
    report(&s);
    samples.push(s);
    Ok(samples)
}

fn worker(
    tiers: &TieredManager,
    stop: &AtomicBool,
    requests: &AtomicU64,
    checked: &AtomicU64,
    thread: u64,
) -> Result<(), String> {
    let mut rng = Rng(thread * 7919 + 1);
    let bytes = tiers.g1().layout().block_bytes();
    let mut buf = vec![0u8; bytes];
    while !stop.load(Ordering::Relaxed) {
        // A conversation: a shared family prefix, then a per-conversation tail.
        let family = rng.next_u64() % FAMILIES;
        let len = 2 + (rng.next_u64() % 14) as usize;
        let tail_start = 1 + (rng.next_u64() % 4) as usize;
        let conversation = rng.next_u64() % 4096;
        let hashes: Vec<SequenceHash> = (0..len)
            .map(|i| {
                let id = if i < tail_start {
                    family << 32 | i as u64
                } else {
                    1 << 63 | family << 40 | conversation << 16 | i as u64
                };
                SequenceHash::new(id)
            })
            .collect();
        let m = tiers.match_blocks(&hashes);
        for b in &m.blocks {
            loop {
                match tiers.g1().layout().read_block(b.block_id(), &mut buf) {
                    Ok(()) => break,
                    // Another thread's offload may be reading it: retry.
                    Err(kvbm_physical::LayoutError::BlockBusy(_)) => std::thread::yield_now(),
                    Err(e) => return Err(e.to_string()),
                }
            }
            if buf != kv(b.sequence_hash(), bytes) {
                return Err(format!(
                    "block {:?} of {:?} holds wrong bytes",
                    b.block_id(),
                    b.sequence_hash()
                ));
            }
            checked.fetch_add(1, Ordering::Relaxed);
        }
        let have = m.blocks.len();
        let mut held = m.blocks;
        if have < len
            && let Ok(alloc) = tiers.allocate_blocks(len - have)
        {
            let mut staged = Vec::with_capacity(alloc.blocks.len());
            for (b, i) in alloc.blocks.into_iter().zip(have..) {
                tiers
                    .g1()
                    .layout()
                    .write_block(b.block_id(), &kv(hashes[i], bytes))
                    .map_err(|e| e.to_string())?;
                let parent = i.checked_sub(1).map(|p| hashes[p]);
                staged.push(
                    b.stage(hashes[i], PAGE)
                        .map_err(|e| e.to_string())?
                        .with_parent(parent),
                );
            }
            let reg = tiers.register_blocks(staged).map_err(|e| e.to_string())?;
            held.extend(reg.blocks);
        }
        ImmutableBlock::release_all(held);
        requests.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}
