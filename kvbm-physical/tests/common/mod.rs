//! Helpers shared by the kvbm-physical tests.
#![allow(dead_code, unreachable_pub)]

use kvbm_logical::{BlockId, Device, ImmutableBlock, SequenceHash};
use kvbm_physical::{Allocation, Layout, LayoutConfig, Registration, TieredManager};

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

/// The KV bytes a block with this hash holds in the tiered tests.
pub fn kv(t: &TieredManager, hash: SequenceHash) -> Vec<u8> {
    pattern(hash.as_u64(), t.g1().layout().block_bytes())
}

/// What an engine does for a new request: allocate G1 blocks for `hashes[first..]`,
/// compute (write) their KV, register them as a chain. Returns the outcome.
pub fn compute_and_register(
    t: &TieredManager,
    hashes: &[SequenceHash],
    first: usize,
) -> Registration {
    let page = t.g1().manager().block_size();
    let alloc = t.allocate_blocks(hashes.len() - first).unwrap();
    let staged = alloc
        .blocks
        .into_iter()
        .zip(first..)
        .map(|(block, i)| {
            t.g1()
                .layout()
                .write_block(block.block_id(), &kv(t, hashes[i]))
                .unwrap();
            let parent = i.checked_sub(1).map(|p| hashes[p]);
            block.stage(hashes[i], page).unwrap().with_parent(parent)
        })
        .collect();
    t.register_blocks(staged).unwrap()
}

/// Every block of `blocks` holds its hash's KV.
pub fn assert_kv(t: &TieredManager, blocks: &[ImmutableBlock<Device>]) {
    for b in blocks {
        assert_eq!(
            read(t.g1().layout(), b.block_id().index()),
            kv(t, b.sequence_hash()),
            "block {:?} of hash {:?}",
            b.block_id(),
            b.sequence_hash()
        );
    }
}

/// Evicts everything inactive from G1 by allocating every available block and scribbling
/// on it; returns the allocation (drop it to give the blocks back).
pub fn flush_g1(t: &TieredManager) -> Allocation {
    let n = t.g1().manager().available_blocks();
    let alloc = t.allocate_blocks(n).unwrap();
    for b in &alloc.blocks {
        t.g1()
            .layout()
            .write_block(b.block_id(), &vec![0xEE; t.g1().layout().block_bytes()])
            .unwrap();
    }
    alloc
}

/// `reset + inactive + mutable + active == total` in both tiers, and every invariant holds.
pub fn assert_conserved(t: &TieredManager) {
    for c in [
        t.g1().manager().check_invariants().unwrap(),
        t.g2().manager().check_invariants().unwrap(),
    ] {
        assert_eq!(
            c.reset + c.inactive + c.mutable + c.active,
            c.total,
            "{c:?}"
        );
    }
}
