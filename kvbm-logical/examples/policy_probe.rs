//! A deterministic driver of the `backend_churn` and `backend_request_cycle` bench
//! scenarios, for when wall-clock benchmarks are too noisy (shared machines):
//!
//! ```text
//! cargo build --release -p kvbm-logical --example policy_probe
//! # instructions (callgrind): run twice with different counts, divide the difference
//! valgrind --tool=callgrind target/release/examples/policy_probe count <backend> <churn|request> <iterations>
//! # paired timing: alternates the two backends in short rounds, prints the median ratio
//! target/release/examples/policy_probe pair <backend> <baseline> <churn|request> <rounds>
//! ```
//!
//! `<backend>` is any [`EvictionBackend::name`]: lru, fifo, lineage, multi_lru, priority,
//! arc, s3fifo, adaptive.

use std::time::Instant;

use kvbm_logical::{
    BlockManager, CompleteBlock, Device, EvictionBackend, ImmutableBlock, MutableBlock,
    SequenceHash,
};

const BLOCK_SIZE: usize = 16;

fn stage_chain(
    blocks: Vec<MutableBlock<Device>>,
    hashes: &[SequenceHash],
    mut parent: Option<SequenceHash>,
) -> Vec<CompleteBlock<Device>> {
    blocks
        .into_iter()
        .zip(hashes)
        .map(|(b, &h)| {
            let staged = b
                .stage(h, BLOCK_SIZE)
                .expect("right size")
                .with_parent(parent);
            parent = Some(h);
            staged
        })
        .collect()
}

/// One scenario on one manager.
struct Probe {
    m: BlockManager<Device>,
    churn: bool,
    next: u64,
    prefix: Vec<SequenceHash>,
}

impl Probe {
    /// As `backend_churn` (a full pool of inactive blocks, 256 fresh chained blocks per
    /// iteration, each an eviction) or `backend_request_cycle` (match a 512-block chained
    /// prefix, allocate 64, register them as its continuation, release all).
    fn new(backend: EvictionBackend, churn: bool) -> Self {
        let blocks = if churn { 16 * 1024 } else { 4 * 1024 };
        let m = BlockManager::<Device>::builder()
            .block_count(blocks)
            .block_size(BLOCK_SIZE)
            .eviction(backend)
            .build()
            .expect("valid configuration");
        let mut probe = Probe {
            m,
            churn,
            next: 1 << 32,
            prefix: (1..=512).map(SequenceHash::new).collect(),
        };
        if churn {
            while probe.m.counts().reset > 0 {
                probe.round();
            }
        } else {
            let blocks = probe.m.allocate_blocks(512).expect("enough blocks");
            let staged = stage_chain(blocks, &probe.prefix, None);
            ImmutableBlock::release_all(probe.m.register_blocks(staged).expect("own"));
        }
        probe
    }

    fn blocks_per_round(&self) -> u64 {
        if self.churn { 256 } else { 576 }
    }

    fn round(&mut self) {
        let n = if self.churn { 256 } else { 64 };
        let fresh: Vec<SequenceHash> = (self.next..self.next + n).map(SequenceHash::new).collect();
        self.next += n;
        let hits = if self.churn {
            Vec::new()
        } else {
            self.m.match_blocks(&self.prefix)
        };
        let blocks = self.m.allocate_blocks(n as usize).expect("enough blocks");
        let parent = (!self.churn).then(|| self.prefix[511]);
        let new = self
            .m
            .register_blocks(stage_chain(blocks, &fresh, parent))
            .expect("own");
        ImmutableBlock::release_all(new);
        ImmutableBlock::release_all(hits);
    }
}

fn backend(name: &str) -> EvictionBackend {
    EvictionBackend::ALL
        .into_iter()
        .find(|b| b.name() == name)
        .unwrap_or_else(|| panic!("unknown backend {name}"))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["count", b, scenario, iterations] => {
            let mut p = Probe::new(backend(b), *scenario == "churn");
            for _ in 0..iterations.parse::<u64>().expect("a number") {
                p.round();
            }
        }
        ["pair", a, base, scenario, rounds] => {
            let churn = *scenario == "churn";
            let (mut pa, mut pb) = (
                Probe::new(backend(a), churn),
                Probe::new(backend(base), churn),
            );
            let per = 20;
            let mut ratios = Vec::new();
            let (mut ta, mut tb) = (Vec::new(), Vec::new());
            for _ in 0..rounds.parse::<usize>().expect("a number") {
                let start = Instant::now();
                (0..per).for_each(|_| pa.round());
                let a_ns = start.elapsed().as_nanos() as f64 / (per * pa.blocks_per_round()) as f64;
                let start = Instant::now();
                (0..per).for_each(|_| pb.round());
                let b_ns = start.elapsed().as_nanos() as f64 / (per * pb.blocks_per_round()) as f64;
                ratios.push(a_ns / b_ns);
                ta.push(a_ns);
                tb.push(b_ns);
            }
            let median = |v: &mut Vec<f64>| {
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            println!(
                "{scenario}: {a} {:.1} ns/block, {base} {:.1} ns/block, median paired ratio {:.2}",
                median(&mut ta),
                median(&mut tb),
                median(&mut ratios)
            );
        }
        _ => {
            eprintln!(
                "usage: policy_probe count <backend> <churn|request> <iterations>\n       policy_probe pair <backend> <baseline> <churn|request> <rounds>"
            );
            std::process::exit(2);
        }
    }
}
