//! Offload / onboard bandwidth by region size and block count, per strategy, against one
//! large copy of the same bytes between the same memories measured in the same run (the
//! ceiling). On a GPU: D2H (device engine-side layout → pinned contiguous, offload), H2D
//! (pinned contiguous → device engine-side layout, onboard) and D2D. On the CPU fallback: the
//! same offload and onboard shapes between system-memory layouts.
//!
//! The engine-side layout is kvbm's layer-separate one by default, or (`--layouts`) an
//! engine's own tensors wrapped with `Layout::from_engine`: outer-first (vLLM
//! FlashAttention), block-first (FlashInfer) or MLA (one latent per token: half the bytes
//! of a K,V block at the same region size).

use std::sync::Arc;
use std::time::Instant;

use kvbm_logical::BlockId;
use kvbm_physical::{
    CopyOptions, CudaDevice, EngineFormat, LayerTensor, Layout, LayoutConfig, LayoutKind,
    MemoryKind, Storage, Strategy, TransferEngine,
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

/// The engine-side layout of a measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineSide {
    /// kvbm's own layer-separate layout.
    LayerSeparate,
    /// An engine's tensors in this format, one allocation per layer, wrapped with
    /// `Layout::from_engine`.
    Engine(EngineFormat),
}

impl EngineSide {
    /// Every choice, in `--layouts` order.
    pub const ALL: [EngineSide; 4] = [
        EngineSide::LayerSeparate,
        EngineSide::Engine(EngineFormat::OuterFirst),
        EngineSide::Engine(EngineFormat::BlockFirst),
        EngineSide::Engine(EngineFormat::Mla),
    ];

    /// The name in tables, JSON and `--layouts`.
    pub fn name(self) -> &'static str {
        match self {
            EngineSide::LayerSeparate => "layer-separate",
            EngineSide::Engine(EngineFormat::OuterFirst) => "outer-first",
            EngineSide::Engine(EngineFormat::BlockFirst) => "block-first",
            EngineSide::Engine(EngineFormat::Mla) => "mla",
            EngineSide::Engine(_) => "engine",
        }
    }

    /// Parses a `--layouts` entry (the name, or `ls`, `of`, `bf`).
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let short = match s {
            "ls" => "layer-separate",
            "of" => "outer-first",
            "bf" => "block-first",
            other => other,
        };
        Self::ALL
            .into_iter()
            .find(|l| l.name() == short)
            .ok_or_else(|| {
                format!("unknown layout {s:?}: layer-separate (ls), outer-first (of), block-first (bf) or mla")
            })
    }

    /// K and V, or one latent (MLA).
    pub fn outer_dim(self) -> usize {
        match self {
            EngineSide::Engine(EngineFormat::Mla) => 1,
            _ => 2,
        }
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
    /// Engine-side layouts to measure, each in turn.
    pub layouts: Vec<EngineSide>,
}

/// One measured point.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TransferResult {
    /// `d2h`, `h2d`, `d2d`, or `offload` / `onboard` on the CPU.
    pub direction: &'static str,
    /// The engine-side layout (see [`EngineSide::name`]).
    pub layout: &'static str,
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

/// Which side of a direction a layout is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// The engine-side layout being measured.
    Engine,
    /// kvbm's fully contiguous offload pool.
    Contiguous,
}

struct Direction {
    name: &'static str,
    src: (MemoryKind, Role),
    dst: (MemoryKind, Role),
}

fn directions(target: &Target) -> Vec<Direction> {
    use Role::{Contiguous as Fc, Engine as Ls};
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
                s.push(Strategy::Permute);
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
        * plan.layouts.len()
        * plan.regions_kib.len()
        * plan.blocks.len()
        * (strategies(target).len() + 1)
}

fn config(region_kib: usize, layers: usize, blocks: usize, outer_dim: usize) -> LayoutConfig {
    // 16 tokens × inner × 2 bytes = region.
    LayoutConfig {
        num_blocks: blocks,
        num_layers: layers,
        outer_dim,
        page_size: 16,
        inner_dim: region_kib * 1024 / 32,
        dtype_bytes: 2,
    }
}

/// `side`'s layout for `c` in `memory`: kvbm's, or dense engine tensors (one allocation per
/// layer) wrapped with `Layout::from_engine`, which then owns them.
pub fn engine_layout(
    side: EngineSide,
    c: LayoutConfig,
    memory: MemoryKind,
    cuda: Option<&CudaDevice>,
) -> Result<Arc<Layout>, Box<dyn std::error::Error + Send + Sync>> {
    let format = match side {
        EngineSide::LayerSeparate => {
            return Ok(Layout::allocate(LayoutKind::LayerSeparate, c, memory, cuda)?.into_shared());
        }
        EngineSide::Engine(format) => format,
    };
    let heads = if c.inner_dim.is_multiple_of(8) { 8 } else { 1 };
    let shape = format.dense_shape(&c, heads)?;
    let per_layer = c.num_blocks * c.outer_dim * c.region_bytes()?;
    let slabs: Vec<Storage> = (0..c.num_layers)
        .map(|_| Storage::allocate(memory, per_layer, cuda))
        .collect::<Result<_, _>>()?;
    let tensors: Vec<LayerTensor> = slabs
        .iter()
        .map(|s| LayerTensor::contiguous(s.addr(), &shape))
        .collect();
    // SAFETY: each tensor is a whole slab just allocated in `memory` (sized for the dense
    // shape), owned by the layout from here on (`with_owner`), and only this benchmark's
    // transfers touch it.
    let layout = unsafe { Layout::from_engine(format, c, memory, &tensors, cuda.cloned()) }?;
    Ok(layout.with_owner(slabs).into_shared())
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
    for (&side, dir) in plan
        .layouts
        .iter()
        .flat_map(|side| directions(target).into_iter().map(move |d| (side, d)))
    {
        for &region_kib in &plan.regions_kib {
            let block_bytes = region_kib * 1024 * side.outer_dim() * plan.layers;
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
            let c = config(region_kib, plan.layers, most, side.outer_dim());
            let alloc = |(mem, role): (MemoryKind, Role)| match role {
                Role::Engine => engine_layout(side, c, mem, cuda.as_ref()),
                Role::Contiguous => {
                    Ok(
                        Layout::allocate(LayoutKind::FullyContiguous, c, mem, cuda.as_ref())?
                            .into_shared(),
                    )
                }
            };
            let src = alloc(dir.src)?;
            let dst = alloc(dir.dst)?;
            let ceil_src = alloc((dir.src.0, Role::Contiguous))?;
            let ceil_dst = alloc((dir.dst.0, Role::Contiguous))?;
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
                    layout: side.name(),
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
                let pairs: Vec<(BlockId, BlockId)> = scattered(n)
                    .into_iter()
                    .enumerate()
                    .map(|(i, j)| (BlockId::new(i as u32), BlockId::new(j as u32)))
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
                        layout: side.name(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_parse_by_name_and_short_name() {
        for side in EngineSide::ALL {
            assert_eq!(EngineSide::parse(side.name()), Ok(side));
        }
        assert_eq!(
            EngineSide::parse("of"),
            Ok(EngineSide::Engine(EngineFormat::OuterFirst))
        );
        assert_eq!(EngineSide::parse(" ls "), Ok(EngineSide::LayerSeparate));
        assert!(EngineSide::parse("nhd").is_err());
    }

    #[test]
    fn every_layout_is_measured_on_the_cpu() {
        let plan = Plan {
            regions_kib: vec![1],
            blocks: vec![8],
            layers: 2,
            reps: 1,
            max_layout_bytes: 1 << 20,
            layouts: EngineSide::ALL.to_vec(),
        };
        let mut ticks = 0;
        let results = run(&Target::Cpu, &plan, |_| ticks += 1).unwrap();
        assert_eq!(ticks, points(&Target::Cpu, &plan));
        // 4 layouts × 2 directions × (ceiling + memcpy)
        assert_eq!(results.len(), 16);
        for side in EngineSide::ALL {
            let rows: Vec<_> = results.iter().filter(|r| r.layout == side.name()).collect();
            assert_eq!(rows.len(), 4, "{side:?}");
            assert!(rows.iter().all(|r| r.gb_per_s > 0.0));
            // MLA blocks hold one latent per token: half the bytes of K and V.
            let expected = 8 * 2 * 1024 * side.outer_dim() as u64;
            assert!(rows.iter().all(|r| r.bytes == expected), "{side:?}");
        }
        // Outer-first keeps K and V apart: twice the copies of layer-separate.
        let copies = |layout: &str| {
            results
                .iter()
                .find(|r| r.layout == layout && r.strategy == "memcpy")
                .unwrap()
                .copies
        };
        assert_eq!(copies("outer-first"), 2 * copies("layer-separate"));
    }
}

/// A permutation of `0..n` in which no two consecutive sources go to neighbouring
/// destinations (for `n` ≥ 4), so that no copies coalesce: `i ↦ (i·s + 13) mod n` with a
/// stride `s` coprime to `n` and neither 1 nor −1 modulo `n`, or, where `n` has no such
/// stride (4, 6, ...), the odd destinations then the even ones.
fn scattered(n: usize) -> Vec<usize> {
    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 { a } else { gcd(b, a % b) }
    }
    let stride = (0..n)
        .map(|k| (7919 + k) % n)
        .find(|&s| s > 1 && s + 1 < n && gcd(s, n) == 1);
    match stride {
        Some(s) => (0..n).map(|i| (i * s + 13) % n).collect(),
        None => (1..n).step_by(2).chain((0..n).step_by(2)).collect(),
    }
}

#[cfg(test)]
mod scatter_tests {
    #[test]
    fn the_scattered_mapping_is_a_permutation_without_neighbours() {
        // 7919 ≡ 1 (mod 74) made the old stride map 74 blocks onto consecutive ones.
        for n in 4..600 {
            let p = super::scattered(n);
            let mut seen = vec![false; n];
            for &j in &p {
                assert!(!std::mem::replace(&mut seen[j], true), "n = {n}: {j} twice");
            }
            for w in p.windows(2) {
                assert!(w[0].abs_diff(w[1]) != 1, "n = {n}: {} then {}", w[0], w[1]);
            }
        }
    }
}
