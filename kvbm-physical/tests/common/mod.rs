//! Helpers shared by the kvbm-physical tests.
#![allow(dead_code, unreachable_pub)]

use kvbm_logical::BlockId;
use kvbm_physical::{Layout, LayoutConfig};

/// A small deterministic generator (splitmix64): fresh, non-zero-heavy data per seed.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes a distinct pattern (seeded by `salt` and the block id) into every block.
pub fn fill(layout: &Layout, salt: u64) -> Vec<Vec<u8>> {
    (0..layout.num_blocks())
        .map(|b| {
            let image = pattern(salt ^ (b as u64) << 20, layout.block_bytes());
            layout.write_block(BlockId::new(b as u32), &image).unwrap();
            image
        })
        .collect()
}

/// Reads block `b`'s image.
pub fn read(layout: &Layout, b: usize) -> Vec<u8> {
    let mut out = vec![0; layout.block_bytes()];
    layout.read_block(BlockId::new(b as u32), &mut out).unwrap();
    out
}

/// Shapes covering both outer dims, odd sizes and several layer counts.
pub fn shapes() -> Vec<LayoutConfig> {
    let mut out = Vec::new();
    for (num_layers, outer_dim, page_size, inner_dim, dtype_bytes) in [
        (1, 1, 1, 1, 1),
        (2, 2, 4, 8, 2),
        (3, 1, 5, 7, 1),
        (4, 2, 16, 64, 2),
        (7, 2, 3, 33, 4),
    ] {
        out.push(LayoutConfig {
            num_blocks: 9,
            num_layers,
            outer_dim,
            page_size,
            inner_dim,
            dtype_bytes,
        });
    }
    out
}
