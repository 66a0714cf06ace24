//! A deterministic driver of the `handles/*` bench scenarios (issue 13), for instruction
//! counts and for timing two builds against each other on a noisy machine:
//!
//! ```text
//! cargo build --release -p kvbm-logical --example handle_probe
//! # instructions (callgrind): run twice with different counts, divide the difference
//! valgrind --tool=callgrind target/release/examples/handle_probe count <scenario> <drop|all> <rounds>
//! # timing: median over rounds of the time per block (per call for `hash`)
//! target/release/examples/handle_probe time <scenario> <drop|all> <rounds>
//! # instructions of the releases alone
//! valgrind --tool=callgrind --toggle-collect='*handle_probe::release' target/release/examples/handle_probe count ...
//! ```
//!
//! Scenarios: `active` (match 1024 held blocks, release the result), `inactive` (match 1024
//! inactive blocks, release them), `registered` (release 1024 freshly registered blocks; only
//! the release is timed), `cycle` (allocate 128 blocks, every one evicting, stage, register,
//! release; LRU), `active2` (`active` on two threads at once, sharing the manager and the held
//! blocks: what contention on the store costs), `hash` (hash one 16-token block chained to its
//! parent), `xxh3` (the floor
//! under `hash`: XXH3 of an 80-byte buffer, the specification's input for such a block, with
//! no encoding).

use std::hint::black_box;
use std::time::Instant;

use kvbm_logical::{
    BlockManager, Device, HASH_SEED, ImmutableBlock, SaltHash, SequenceHash, hash_block,
};

const BLOCK_SIZE: usize = 16;
const N: usize = 1024;
const CYCLE: usize = 128;

fn manager(blocks: usize) -> BlockManager<Device> {
    BlockManager::builder()
        .block_count(blocks)
        .block_size(BLOCK_SIZE)
        .build()
        .expect("valid configuration")
}

fn fill(m: &BlockManager<Device>, hashes: &[SequenceHash]) -> Vec<ImmutableBlock<Device>> {
    let staged = m
        .allocate_blocks(hashes.len())
        .expect("enough blocks")
        .into_iter()
        .zip(hashes)
        .map(|(b, &h)| b.stage(h, BLOCK_SIZE).expect("right size"))
        .collect();
    m.register_blocks(staged).expect("own blocks")
}

/// Not inlined, so that callgrind can count it alone (`--toggle-collect=*handle_probe::release`).
#[inline(never)]
fn release(all: bool, handles: Vec<ImmutableBlock<Device>>) {
    if all {
        ImmutableBlock::release_all(handles);
    } else {
        drop(handles);
    }
}

/// One scenario, ready to run rounds.
struct Probe {
    scenario: String,
    all: bool,
    m: BlockManager<Device>,
    hashes: Vec<SequenceHash>,
    _held: Vec<ImmutableBlock<Device>>,
    next: u64,
    tokens: Vec<u32>,
    parent: SequenceHash,
}

impl Probe {
    fn new(scenario: &str, all: bool) -> Self {
        let hashes: Vec<SequenceHash> = (1..=N as u64).map(SequenceHash::new).collect();
        let (m, held) = match scenario {
            "active" => {
                let m = manager(2 * N);
                let held = fill(&m, &hashes);
                (m, held)
            }
            "inactive" => {
                let m = manager(2 * N);
                ImmutableBlock::release_all(fill(&m, &hashes));
                (m, Vec::new())
            }
            "registered" => (manager(4 * N), Vec::new()),
            "cycle" => (manager(32 * CYCLE), Vec::new()),
            "hash" | "xxh3" => (manager(1), Vec::new()),
            other => panic!("unknown scenario {other}"),
        };
        let mut probe = Probe {
            scenario: scenario.to_owned(),
            all,
            m,
            hashes,
            _held: held,
            next: 1 << 32,
            tokens: (1000..1000 + BLOCK_SIZE as u32).collect(),
            parent: hash_block(None, SaltHash::default(), &[7; BLOCK_SIZE], &[]),
        };
        if scenario == "cycle" {
            while probe.m.counts().reset > 0 {
                probe.round();
            }
        }
        probe
    }

    /// Blocks (or hashes) per round.
    fn per_round(&self) -> usize {
        match self.scenario.as_str() {
            "cycle" => CYCLE,
            "hash" | "xxh3" => 1000,
            _ => N,
        }
    }

    fn fresh(&mut self, n: usize) -> Vec<SequenceHash> {
        let fresh = (self.next..self.next + n as u64)
            .map(SequenceHash::new)
            .collect();
        self.next += n as u64;
        fresh
    }

    /// Runs one round; returns the nanoseconds of its timed part.
    fn round(&mut self) -> u128 {
        match self.scenario.as_str() {
            "active" | "inactive" => {
                let start = Instant::now();
                let hits = self.m.match_blocks(black_box(&self.hashes));
                assert_eq!(hits.len(), N);
                release(self.all, hits);
                start.elapsed().as_nanos()
            }
            "registered" => {
                let fresh = self.fresh(N);
                let registered = fill(&self.m, &fresh);
                let start = Instant::now();
                release(self.all, registered);
                start.elapsed().as_nanos()
            }
            "cycle" => {
                let fresh = self.fresh(CYCLE);
                let start = Instant::now();
                release(self.all, fill(&self.m, &fresh));
                start.elapsed().as_nanos()
            }
            "xxh3" => {
                let input = [0x5au8; 80];
                let start = Instant::now();
                for _ in 0..1000 {
                    black_box(xxhash_rust::xxh3::xxh3_64_with_seed(
                        black_box(&input[..]),
                        HASH_SEED,
                    ));
                }
                start.elapsed().as_nanos()
            }
            _ => {
                let salt = SaltHash::default();
                let start = Instant::now();
                for _ in 0..1000 {
                    black_box(hash_block(
                        black_box(Some(self.parent)),
                        salt,
                        black_box(&self.tokens[..]),
                        black_box(&[]),
                    ));
                }
                start.elapsed().as_nanos()
            }
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["time", "active2", how @ ("drop" | "all"), rounds] => {
            let rounds: usize = rounds.parse().expect("a number");
            let all = *how == "all";
            let m = manager(2 * N);
            let hashes: Vec<SequenceHash> = (1..=N as u64).map(SequenceHash::new).collect();
            let _held = fill(&m, &hashes);
            let barrier = std::sync::Barrier::new(2);
            let mut per_block: Vec<f64> = std::thread::scope(|s| {
                let workers: Vec<_> = (0..2)
                    .map(|_| {
                        s.spawn(|| {
                            barrier.wait();
                            (0..rounds)
                                .map(|_| {
                                    let start = Instant::now();
                                    let hits = m.match_blocks(black_box(&hashes));
                                    assert_eq!(hits.len(), N);
                                    release(all, hits);
                                    start.elapsed().as_nanos() as f64 / N as f64
                                })
                                .collect::<Vec<f64>>()
                        })
                    })
                    .collect();
                workers
                    .into_iter()
                    .flat_map(|w| w.join().expect("worker"))
                    .collect()
            });
            per_block.sort_by(f64::total_cmp);
            println!(
                "active2/{how}: median {:.2} ns per block, min {:.2}",
                per_block[per_block.len() / 2],
                per_block[0]
            );
        }
        [
            mode @ ("count" | "time"),
            scenario,
            how @ ("drop" | "all"),
            rounds,
        ] => {
            let rounds: usize = rounds.parse().expect("a number");
            let mut p = Probe::new(scenario, *how == "all");
            let mut per_block = Vec::with_capacity(rounds);
            for _ in 0..rounds {
                let ns = p.round();
                per_block.push(ns as f64 / p.per_round() as f64);
            }
            if *mode == "time" {
                per_block.sort_by(f64::total_cmp);
                println!(
                    "{scenario}/{how}: median {:.2} ns per block, min {:.2}",
                    per_block[per_block.len() / 2],
                    per_block[0]
                );
            }
        }
        _ => {
            eprintln!(
                "usage: handle_probe <count|time> <active|inactive|registered|cycle|hash|xxh3> <drop|all> <rounds>\n       handle_probe time active2 <drop|all> <rounds>"
            );
            std::process::exit(2);
        }
    }
}
