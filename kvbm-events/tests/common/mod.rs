//! A deterministic workload for the publisher tests: prompts that share prefixes, registered
//! as token-block chains into managers too small to hold them all (so eviction removes
//! blocks), with occasional invalidations and resets.

#![allow(dead_code, unreachable_pub)] // each test binary uses part of it

use std::collections::BTreeSet;

use kvbm_logical::{
    BlockManager, BlockTier, ImmutableBlock, Salt, SequenceHash, TokenBlockSequence,
};

/// xorshift64*: deterministic, no dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Drives one manager and remembers every hash it ever registered.
pub struct Workload {
    rng: Rng,
    prefixes: Vec<Vec<u32>>,
    round: usize,
    pub seen: BTreeSet<u64>,
    /// Each registered hash's block tokens.
    pub tokens: std::collections::HashMap<u64, Vec<u32>>,
}

impl Workload {
    pub fn new(seed: u64, block_size: usize) -> Self {
        let mut rng = Rng::new(seed);
        // A few shared system prompts, two blocks each.
        let prefixes = (0..4)
            .map(|_| {
                (0..2 * block_size)
                    .map(|_| rng.below(32_000) as u32)
                    .collect()
            })
            .collect();
        Self {
            rng,
            prefixes,
            round: 0,
            seen: BTreeSet::new(),
            tokens: std::collections::HashMap::new(),
        }
    }

    /// `rounds` requests: each registers a prompt of 1..=6 blocks (a shared prefix and a
    /// random tail) and releases it; every 31st request invalidates a block, every 97th resets
    /// the inactive pool.
    pub fn run<T: BlockTier>(&mut self, m: &BlockManager<T>, rounds: usize) {
        let bs = m.block_size();
        for _ in 0..rounds {
            self.round += 1;
            let round = self.round;
            let mut tokens = self.prefixes[self.rng.below(4) as usize].clone();
            let tail_blocks = self.rng.below(5) as usize;
            tokens.extend((0..tail_blocks * bs).map(|_| self.rng.below(64) as u32));
            let seq = TokenBlockSequence::from_tokens(&tokens, bs, &Salt::none())
                .expect("valid block size");
            let n = seq.blocks().len();
            for (i, h) in seq.sequence_hashes().enumerate() {
                self.tokens.insert(h.as_u64(), seq.block_tokens(i).to_vec());
            }
            let blocks = m.allocate_blocks(n).expect("the manager holds a prompt");
            let staged = blocks
                .into_iter()
                .enumerate()
                .map(|(i, b)| b.stage_from_sequence(&seq, i))
                .collect::<Result<Vec<_>, _>>()
                .expect("stages");
            let registered = m.register_blocks(staged).expect("registers");
            self.seen
                .extend(registered.iter().map(|b| b.sequence_hash().as_u64()));
            ImmutableBlock::release_all(registered);
            if round % 31 == 30 {
                let victim = *self
                    .seen
                    .iter()
                    .nth(self.rng.below(self.seen.len() as u64) as usize)
                    .expect("seen");
                m.invalidate_blocks(&[SequenceHash::new(victim)]);
            }
            if round % 97 == 96 {
                m.reset_inactive_pool().expect("nothing held");
            }
        }
    }

    /// The hashes `m` has registered now (of those this workload ever registered).
    pub fn cached<T: BlockTier>(&self, m: &BlockManager<T>) -> BTreeSet<u64> {
        let hashes: Vec<SequenceHash> = self.seen.iter().map(|&h| SequenceHash::new(h)).collect();
        hashes
            .iter()
            .zip(m.contains_each(&hashes))
            .filter(|(_, c)| *c)
            .map(|(h, _)| h.as_u64())
            .collect()
    }
}

/// A router's view: the hashes of each medium, rebuilt from decoded batches.
#[derive(Debug, Default)]
pub struct View {
    pub sets: std::collections::BTreeMap<String, BTreeSet<u64>>,
    /// Each stored hash's tokens, as published (hashes published without tokens are absent).
    pub tokens: std::collections::HashMap<u64, Vec<u32>>,
    pub clears: usize,
    pub events: usize,
}

impl View {
    pub fn apply(&mut self, payload: &[u8]) -> kvbm_events::Batch {
        let batch = kvbm_events::decode_batch(payload).expect("a valid batch");
        for event in &batch.events {
            self.events += 1;
            match event {
                kvbm_events::Event::BlockStored(e) => {
                    let medium = e.medium.clone().expect("kvbm always names the medium");
                    self.sets.entry(medium).or_default().extend(&e.block_hashes);
                    if !e.token_ids.is_empty() {
                        let size = usize::try_from(e.block_size).expect("small");
                        assert_eq!(e.token_ids.len(), size * e.block_hashes.len());
                        for (h, t) in e.block_hashes.iter().zip(e.token_ids.chunks(size)) {
                            self.tokens.insert(*h, t.to_vec());
                        }
                    }
                }
                kvbm_events::Event::BlockRemoved(e) => {
                    let medium = e.medium.clone().expect("kvbm always names the medium");
                    let set = self.sets.entry(medium).or_default();
                    for h in &e.block_hashes {
                        set.remove(h);
                    }
                }
                kvbm_events::Event::AllBlocksCleared => {
                    self.clears += 1;
                    self.sets.clear();
                }
                _ => panic!("an event kind this test does not know"),
            }
        }
        batch
    }

    pub fn medium(&self, name: &str) -> BTreeSet<u64> {
        self.sets.get(name).cloned().unwrap_or_default()
    }
}

/// Asks the replay socket for every batch from `start`: `(seq, payload)` in order, up to the
/// end marker.
pub fn replay(context: &zmq::Context, endpoint: &str, start: u64) -> Vec<(u64, Vec<u8>)> {
    let socket = context.socket(zmq::DEALER).expect("socket");
    socket.set_rcvtimeo(20_000).expect("option");
    socket.set_linger(0).expect("option");
    socket.connect(endpoint).expect("connect");
    socket
        .send_multipart([&b""[..], &start.to_be_bytes()[..]], 0)
        .expect("send");
    let mut out = Vec::new();
    loop {
        let frames = socket
            .recv_multipart(0)
            .expect("a replay answer within 20 s");
        assert_eq!(frames.len(), 3, "replay frames are [empty, seq, payload]");
        assert!(frames[0].is_empty());
        let seq: [u8; 8] = frames[1].as_slice().try_into().expect("8-byte seq");
        if seq == kvbm_events::END_SEQ {
            assert!(frames[2].is_empty());
            return out;
        }
        out.push((u64::from_be_bytes(seq), frames[2].clone()));
    }
}
