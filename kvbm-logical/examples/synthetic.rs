//! A synthetic multi-turn chat workload driven through a `BlockManager`.
//!
//! ```text
//! cargo run --release -p kvbm-logical --example synthetic [-- --blocks N --sessions N --turns N --seed N]
//! ```
//!
//! Every session starts with one of a few shared system prompts, then alternates user turns
//! and model answers. Each request does what a serving engine's scheduler does with kvbm:
//! hash the prompt into blocks, `match_blocks` the cached prefix, allocate the rest (evicting
//! least recently used blocks when the pool is full), stage and register the new blocks, then
//! decode the answer into further blocks and release everything when the request ends, so
//! that the next turn can find it. It prints the prefix hit rate and the throughput of the
//! block manager (the only work done besides hashing the tokens).

use std::error::Error;
use std::time::Instant;

use kvbm_logical::{BlockManager, Device, ImmutableBlock, MutableBlock, Salt, TokenBlockSequence};

const BLOCK_SIZE: usize = 16;

struct Config {
    blocks: usize,
    sessions: usize,
    turns: usize,
    seed: u64,
}

impl Config {
    fn from_args() -> Result<Self, Box<dyn Error>> {
        let mut config = Config {
            blocks: 8192,
            sessions: 512,
            turns: 8,
            seed: 1,
        };
        let mut args = std::env::args().skip(1);
        while let Some(flag) = args.next() {
            let value: u64 = args
                .next()
                .ok_or_else(|| format!("{flag} needs a value"))?
                .parse()
                .map_err(|e| format!("{flag}: {e}"))?;
            match flag.as_str() {
                "--blocks" => config.blocks = value as usize,
                "--sessions" => config.sessions = value as usize,
                "--turns" => config.turns = value as usize,
                "--seed" => config.seed = value,
                _ => return Err(format!("unknown option {flag}").into()),
            }
        }
        if config.sessions == 0 || config.turns == 0 {
            return Err("--sessions and --turns must be at least 1".into());
        }
        Ok(config)
    }
}

/// splitmix64, so that runs are reproducible without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo) as u64) as usize
    }

    /// Between `lo` and `hi` random token ids.
    fn tokens(&mut self, lo: usize, hi: usize) -> Vec<u32> {
        let n = self.range(lo, hi);
        (0..n).map(|_| (self.next() % 128_000) as u32).collect()
    }
}

#[derive(Default)]
struct Stats {
    requests: usize,
    prompt_blocks: usize,
    hit_blocks: usize,
    allocated: usize,
    evicted: usize,
}

/// Registers blocks `first..` of `seq` in fresh slots; returns the handles.
fn fill(
    m: &BlockManager<Device>,
    seq: &TokenBlockSequence,
    first: usize,
    stats: &mut Stats,
) -> Result<Vec<ImmutableBlock<Device>>, Box<dyn Error>> {
    let todo = &seq.blocks()[first..];
    let (fresh, evicted) = m.allocate_blocks_with_evictions(todo.len())?;
    stats.allocated += fresh.len();
    stats.evicted += evicted.len();
    let staged = fresh
        .into_iter()
        .zip(todo)
        .map(|(block, tb)| block.stage_token_block(tb))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(m.register_blocks(staged)?)
}

fn main() -> Result<(), Box<dyn Error>> {
    let config = Config::from_args()?;
    let m = BlockManager::<Device>::builder()
        .block_count(config.blocks)
        .block_size(BLOCK_SIZE)
        .build()?;
    let mut rng = Rng(config.seed);

    // A handful of system prompts shared by all sessions.
    let system_prompts: Vec<Vec<u32>> = (0..4).map(|_| rng.tokens(200, 800)).collect();
    let mut sessions: Vec<(TokenBlockSequence, usize)> = (0..config.sessions)
        .map(|i| {
            let mut seq = TokenBlockSequence::with_salt_hash(BLOCK_SIZE, Salt::none().hash())?;
            seq.extend(&system_prompts[i % system_prompts.len()]);
            Ok((seq, 0))
        })
        .collect::<Result<_, kvbm_logical::SequenceError>>()?;

    let mut stats = Stats::default();
    let mut hashes = Vec::new();
    let start = Instant::now();
    let mut live: Vec<usize> = (0..sessions.len()).collect();
    while !live.is_empty() {
        // Advance a random live session by one turn.
        let pick = rng.range(0, live.len());
        let (seq, turn) = &mut sessions[live[pick]];

        // The prompt: the whole history plus the new user message.
        let user = rng.tokens(32, 400);
        seq.extend(&user);
        hashes.clear();
        hashes.extend(seq.sequence_hashes());
        let hits = m.match_blocks(&hashes);
        stats.requests += 1;
        stats.prompt_blocks += hashes.len();
        stats.hit_blocks += hits.len();
        let prefill = fill(&m, seq, hits.len(), &mut stats)?;

        // Decode the answer: the tail block fills up, and every completed block is
        // registered as it completes, as an engine would.
        let answer = rng.tokens(16, 300);
        let before = seq.blocks().len();
        seq.extend(&answer);
        let decoded = fill(&m, seq, before, &mut stats)?;
        // The partial tail occupies one more (unregistered) block until the request ends.
        let tail = m.allocate_blocks(usize::from(!seq.partial_tokens().is_empty()))?;

        // The request ends: everything goes back, registered blocks stay matchable.
        for batch in [hits, prefill, decoded] {
            ImmutableBlock::release_all(batch);
        }
        MutableBlock::release_all(tail);

        *turn += 1;
        if *turn == config.turns {
            live.swap_remove(pick);
        }
    }
    let elapsed = start.elapsed();

    let counts = m.check_invariants()?;
    let secs = elapsed.as_secs_f64();
    let touched = stats.prompt_blocks + stats.allocated;
    println!(
        "kvbm-logical synthetic workload: {} sessions x {} turns, {} blocks of {} tokens (LRU)",
        config.sessions, config.turns, config.blocks, BLOCK_SIZE
    );
    println!("requests             {:>12}", stats.requests);
    println!("prompt blocks        {:>12}", stats.prompt_blocks);
    println!(
        "prefix hit rate      {:>11.1}%",
        100.0 * stats.hit_blocks as f64 / stats.prompt_blocks.max(1) as f64
    );
    println!("blocks allocated     {:>12}", stats.allocated);
    println!("hashes evicted       {:>12}", stats.evicted);
    println!("elapsed              {:>10.3} s", secs);
    println!(
        "requests/s           {:>12.0}",
        stats.requests as f64 / secs
    );
    println!(
        "block ops/s          {:>12.0}   (matched + allocated blocks)",
        touched as f64 / secs
    );
    println!(
        "final pools          reset {} inactive {} in flight {} of {}",
        counts.reset,
        counts.inactive,
        counts.in_flight(),
        counts.total
    );
    Ok(())
}
