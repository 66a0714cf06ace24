//! Decode cost per token, as minimum and median over many alternating rounds: a noise-robust
//! companion to `cargo bench -p kvbm-logical --bench request` for a shared machine (the
//! minimum of many short rounds is what the code costs when nothing else runs).
//!
//! Three variants of one 4096-token decode, 16-token blocks, on one 2048-block manager (so
//! that after the first rounds every allocation evicts): `push` (`TokenBlockSequence::push`
//! alone, the hashing floor), `manual_decode` (push, and per filled block
//! `allocate_blocks(1)` + `stage_token_block` + `register_block`: the manager's share) and
//! `request_decode` (`RequestSequence::push` + `allocate(1)` + `commit(1)` per token).
//!
//! Run: `cargo run --release -p kvbm-logical --example decode_cost [-- ROUNDS [BLOCKS]]`
//! (BLOCKS: the manager's size, default 2048).

use kvbm_logical::{BlockManager, Device, RequestSequence, SaltHash, TokenBlockSequence};
use std::hint::black_box;
use std::time::Instant;
fn main() {
    let rounds: u64 = std::env::args()
        .nth(1)
        .map(|s| s.parse().unwrap())
        .unwrap_or(2000);
    let blocks: usize = std::env::args()
        .nth(2)
        .map(|s| s.parse().expect("BLOCKS"))
        .unwrap_or(2048);
    let m = BlockManager::<Device>::builder()
        .block_count(blocks)
        .block_size(16)
        .build()
        .unwrap();
    let mut salt = 0u64;
    let mut t = [Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..rounds {
        for (w, times) in t.iter_mut().enumerate() {
            salt += 1;
            match w {
                0 => {
                    let mut s =
                        TokenBlockSequence::with_salt_hash(16, SaltHash::from_raw(salt)).unwrap();
                    s.reserve(4096);
                    let s0 = Instant::now();
                    for t in 0..4096u32 {
                        black_box(s.push(black_box(t)));
                    }
                    times.push(s0.elapsed().as_nanos() as f64 / 4096.0);
                }
                1 => {
                    let mut s =
                        TokenBlockSequence::with_salt_hash(16, SaltHash::from_raw(salt)).unwrap();
                    s.reserve(4096);
                    let mut held = Vec::with_capacity(300);
                    let s0 = Instant::now();
                    for t in 0..4096u32 {
                        if let Some(full) = s.push(black_box(t)) {
                            let block = m.allocate_blocks(1).unwrap().pop().unwrap();
                            held.push(
                                m.register_block(block.stage_token_block(&full).unwrap())
                                    .unwrap(),
                            );
                        }
                    }
                    times.push(s0.elapsed().as_nanos() as f64 / 4096.0);
                    drop(held);
                }
                _ => {
                    let mut req = RequestSequence::builder(&m)
                        .salt_hash(SaltHash::from_raw(salt))
                        .prompt(&[1])
                        .reserve_tokens(4096)
                        .build();
                    let s0 = Instant::now();
                    for t in 0..4096u32 {
                        req.push(black_box(t));
                        req.allocate(1).unwrap();
                        req.commit(1).unwrap();
                    }
                    times.push(s0.elapsed().as_nanos() as f64 / 4096.0);
                    drop(req);
                }
            }
        }
    }
    for (name, v) in ["push", "manual_decode", "request_decode"]
        .iter()
        .zip(t.iter_mut())
    {
        v.sort_by(f64::total_cmp);
        println!(
            "{name:>15}: min {:.1} p10 {:.1} median {:.1} ns/token",
            v[0],
            v[v.len() / 10],
            v[v.len() / 2]
        );
    }
}
