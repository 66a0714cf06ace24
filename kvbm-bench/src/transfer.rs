//! Offload / onboard bandwidth by region size and block count, per strategy, against one
//! large copy of the same bytes between the same memories measured in the same run (the
//! ceiling). On a GPU: D2H (device layer-separate → pinned contiguous, offload), H2D
//! (pinned contiguous → device layer-separate, onboard) and D2D. On the CPU fallback: the
//! same offload and onboard shapes between system-memory layouts.

use std::sync::Arc;
use std::time::Instant;

use kvbm_logical::BlockId;
use kvbm_physical::{
    CopyOptions, CudaDevice, Layout, LayoutConfig, LayoutKind, MemoryKind, Strategy, TransferEngine,
};
use serde::Serialize;

/// Where transfers run.
#[derive(Clone, Debug)]
pub enum Target {
    /// System memory, memcpy.
    Cpu,
    /// A CUDA device.
    Gpu(CudaDevice),
}

/// Opens GPU 0 unless `force_cpu`; returns the target and a line saying which and why.
pub fn detect(force_cpu: bool) -> (Target, String) {
    if force_cpu {
        return (Target::Cpu, "CPU (asked for with --cpu)".into());
    }
    match CudaDevice::open(0) {
        Ok(gpu) => {
            let line = format!("GPU 0: {}", gpu.name());
            (Target::Gpu(gpu), line)
        }
        Err(e) => (Target::Cpu, format!("CPU fallback ({e})")),
    }
}

/// What to measure.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Region sizes in KiB (one layer's K or V page of a block).
    pub regions_kib: Vec<usize>,
    /// Block counts per transfer.
    pub blocks: Vec<usize>,
    /// Layers per block (each with K and V).
    pub layers: usize,
    /// Timed repetitions per point (the median is reported), after one warm-up.
    pub reps: usize,
    /// Largest layout to allocate; bigger points are skipped.
    pub max_layout_bytes: usize,
}

/// One measured point.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TransferResult {
    /// `d2h`, `h2d`, `d2d`, or `offload` / `onboard` on the CPU.
    pub direction: &'static str,
    /// Region size, KiB.
    pub region_kib: usize,
    /// Blocks per transfer.
    pub blocks: usize,
    /// Strategy (`ceiling` for the one large copy).
    pub strategy: &'static str,
    /// Bytes per transfer.
    pub bytes: u64,
    /// Coalesced copies the strategy issued.
    pub copies: usize,
    /// Median bandwidth, GB/s (10^9 bytes).
    pub gb_per_s: f64,
    /// `gb_per_s` over the ceiling's.
    pub fraction_of_ceiling: f64,
}

struct Direction {
    name: &'static str,
    src: (MemoryKind, LayoutKind),
    dst: (MemoryKind, LayoutKind),
}

fn directions(target: &Target) -> Vec<Direction> {
    use LayoutKind::{FullyContiguous as Fc, LayerSeparate as Ls};
    match target {
        Target::Cpu => vec![
            Direction {
                name: "offload",
                src: (MemoryKind::System, Ls),
                dst: (MemoryKind::System, Fc),
            },
            Direction {
                name: "onboard",
                src: (MemoryKind::System, Fc),
                dst: (MemoryKind::System, Ls),
            },
        ],
        Target::Gpu(gpu) => {
            let dev = MemoryKind::Device {
                ordinal: gpu.ordinal(),
            };
            vec![
                Direction {
                    name: "d2h",
                    src: (dev, Ls),
                    dst: (MemoryKind::Pinned, Fc),
                },
                Direction {
                    name: "h2d",
                    src: (MemoryKind::Pinned, Fc),
                    dst: (dev, Ls),
                },
                Direction {
                    name: "d2d",
                    src: (dev, Ls),
                    dst: (dev, Ls),
                },
            ]
        }
    }
}

fn strategies(target: &Target) -> Vec<Strategy> {
    match target {
        Target::Cpu => vec![Strategy::Memcpy],
        Target::Gpu(gpu) => {
            let mut s = Vec::new();
            if gpu.has_kernels() {
                s.push(Strategy::Kernel);
            }
            if gpu.has_batched_copy() {
                s.push(Strategy::BatchedDriver);
            }
            s.push(Strategy::AsyncCopies);
            s
        }
    }
}

/// The number of points [`run`] measures (for a progress bar).
pub fn points(target: &Target, plan: &Plan) -> usize {
    directions(target).len()
        * plan.regions_kib.len()
        * plan.blocks.len()
        * (strategies(target).len() + 1)
}

fn config(region_kib: usize, layers: usize, blocks: usize) -> LayoutConfig {
    // 16 tokens × inner × 2 bytes = region.
    LayoutConfig {
        num_blocks: blocks,
        num_layers: layers,
        outer_dim: 2,
        page_size: 16,
        inner_dim: region_kib * 1024 / 32,
        dtype_bytes: 2,
    }
}

/// Measures every point of `plan` on `target`; `tick` is called once per point.
pub fn run(
    target: &Target,
    plan: &Plan,
    mut tick: impl FnMut(&str),
) -> Result<Vec<TransferResult>, Box<dyn std::error::Error + Send + Sync>> {
    let (engine, cuda) = match target {
        Target::Cpu => (TransferEngine::host(), None),
        Target::Gpu(gpu) => (TransferEngine::with_cuda(gpu.clone()), Some(gpu.clone())),
    };
    let strategies = strategies(target);
    let mut out = Vec::new();
    for dir in directions(target) {
        for &region_kib in &plan.regions_kib {
            let block_bytes = region_kib * 1024 * 2 * plan.layers;
            let fits: Vec<usize> = plan
                .blocks
                .iter()
                .copied()
                .filter(|&n| n * block_bytes <= plan.max_layout_bytes)
                .collect();
            let Some(&most) = fits.iter().max() else {
                for _ in 0..plan.blocks.len() * (strategies.len() + 1) {
                    tick("skipped");
                }
                continue;
            };
            let c = config(region_kib, plan.layers, most);
            let alloc = |(mem, kind): (MemoryKind, LayoutKind)| -> Result<Arc<Layout>, kvbm_physical::LayoutError> {
                Ok(Layout::allocate(kind, c, mem, cuda.as_ref())?.into_shared())
            };
            let src = alloc(dir.src)?;
            let dst = alloc(dir.dst)?;
            let ceil_src = alloc((dir.src.0, LayoutKind::FullyContiguous))?;
            let ceil_dst = alloc((dir.dst.0, LayoutKind::FullyContiguous))?;
            // Non-zero data everywhere (and every page touched before timing).
            let image: Vec<u8> = (0..block_bytes).map(|i| (i % 251) as u8 + 1).collect();
            for layout in [&src, &ceil_src] {
                for b in 0..most {
                    layout.write_block(BlockId::new(b as u32), &image)?;
                }
            }
            for &n in &plan.blocks {
                if !fits.contains(&n) {
                    for _ in 0..=strategies.len() {
                        tick("skipped");
                    }
                    continue;
                }
                let bytes = (n * block_bytes) as u64;
                // The ceiling: consecutive contiguous blocks coalesce into one copy.
                let straight: Vec<(BlockId, BlockId)> = (0..n as u32)
                    .map(|i| (BlockId::new(i), BlockId::new(i)))
                    .collect();
                let ceiling_strategy = match target {
                    Target::Cpu => Strategy::Memcpy,
                    Target::Gpu(_) => Strategy::AsyncCopies,
                };
                let (ceiling, copies) = time(plan.reps, || {
                    engine.copy_blocks_blocking(
                        &ceil_src,
                        &ceil_dst,
                        &straight,
                        &CopyOptions::strategy(ceiling_strategy),
                    )
                })?;
                let ceiling_gbs = bytes as f64 / ceiling / 1e9;
                out.push(TransferResult {
                    direction: dir.name,
                    region_kib,
                    blocks: n,
                    strategy: "ceiling",
                    bytes,
                    copies,
                    gb_per_s: ceiling_gbs,
                    fraction_of_ceiling: 1.0,
                });
                tick(dir.name);
                // A scattered mapping, as a real pool gives: no two blocks coalesce.
                let pairs: Vec<(BlockId, BlockId)> = (0..n)
                    .map(|i| {
                        (
                            BlockId::new(i as u32),
                            BlockId::new(((i * 7919 + 13) % n) as u32),
                        )
                    })
                    .collect();
                for &strategy in &strategies {
                    let (secs, copies) = time(plan.reps, || {
                        engine.copy_blocks_blocking(
                            &src,
                            &dst,
                            &pairs,
                            &CopyOptions::strategy(strategy),
                        )
                    })?;
                    let gbs = bytes as f64 / secs / 1e9;
                    out.push(TransferResult {
                        direction: dir.name,
                        region_kib,
                        blocks: n,
                        strategy: strategy.name(),
                        bytes,
                        copies,
                        gb_per_s: gbs,
                        fraction_of_ceiling: gbs / ceiling_gbs,
                    });
                    tick(dir.name);
                }
            }
        }
    }
    Ok(out)
}

/// Median seconds of `reps` timed calls after one warm-up, and the copies issued.
fn time(
    reps: usize,
    mut f: impl FnMut() -> Result<kvbm_physical::TransferReport, kvbm_physical::TransferError>,
) -> Result<(f64, usize), kvbm_physical::TransferError> {
    let copies = f()?.copies;
    let mut secs: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let start = Instant::now();
            f().map(|_| start.elapsed().as_secs_f64())
        })
        .collect::<Result<_, _>>()?;
    secs.sort_by(f64::total_cmp);
    Ok((secs[secs.len() / 2], copies))
}
