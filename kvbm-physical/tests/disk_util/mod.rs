//! Helpers shared by the disk tier's tests.
#![allow(dead_code, unreachable_pub)]

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use kvbm_logical::SequenceHash;
use kvbm_physical::disk::{Capacity, DiskTier, DiskTierBuilder};
use kvbm_physical::{GetOutcome, PutOutcome, StoreBlock, StoreTier};

/// The block size of most tests: one page plus a bit, so the image does not fill its pages.
pub const BB: usize = 5000;
pub const FP: u64 = 0xF1F1;

pub fn h(n: u64) -> SequenceHash {
    SequenceHash::new(n)
}

/// The bytes a block of `hash` holds in every test: non-repeating, a function of the hash.
pub fn image(hash: SequenceHash, len: usize) -> Vec<u8> {
    let mut x = hash.as_u64() ^ 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The parent every test gives a hash: `n - 1` for odd `n`, none for even ones.
pub fn parent_of(hash: SequenceHash) -> Option<SequenceHash> {
    let n = hash.as_u64();
    (n % 2 == 1).then(|| SequenceHash::new(n - 1))
}

pub fn tier_path(dir: &Path) -> PathBuf {
    dir.join("g3.kvbm")
}

pub fn builder(dir: &Path, slots: u32) -> DiskTierBuilder {
    DiskTier::builder()
        .path(tier_path(dir))
        .block_bytes(BB)
        .capacity(Capacity::Blocks(slots))
        .fingerprint(FP)
}

pub fn open(dir: &Path, slots: u32) -> DiskTier {
    builder(dir, slots).open().expect("the tier opens")
}

/// Puts `hashes` (with [`image`] and [`parent_of`]) in one call.
pub fn put(tier: &DiskTier, hashes: &[u64]) -> Vec<PutOutcome> {
    let images: Vec<Vec<u8>> = hashes
        .iter()
        .map(|&n| image(h(n), tier.block_bytes()))
        .collect();
    let blocks: Vec<StoreBlock<'_>> = hashes
        .iter()
        .zip(&images)
        .map(|(&n, bytes)| StoreBlock {
            hash: h(n),
            parent: parent_of(h(n)),
            bytes,
        })
        .collect();
    tier.put(&blocks)
}

/// Gets one hash; on a hit, asserts the bytes and the parent are the ones put.
pub fn get(tier: &DiskTier, n: u64) -> GetOutcome {
    let mut out = vec![0u8; tier.block_bytes()];
    let outcome = tier.get(&[h(n)], &mut [&mut out]).remove(0);
    if let GetOutcome::Hit { parent } = &outcome {
        assert_eq!(*parent, parent_of(h(n)), "parent of {n}");
        assert!(
            out == image(h(n), tier.block_bytes()),
            "bytes of {n} served wrong"
        );
    }
    outcome
}

/// Flips bit `bit` of the file at `offset` (the tier may be open: the lock is advisory).
pub fn flip_in_file(path: &Path, offset: u64, bit: u8) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 1 << bit;
    f.write_all_at(&b, offset).unwrap();
    f.sync_all().unwrap();
}

/// The slot each recovered hash is in, after a reopen.
pub fn slot_of(tier: &DiskTier, n: u64) -> u32 {
    tier.recovery()
        .blocks
        .iter()
        .find(|b| b.hash == h(n))
        .map(|b| b.slot)
        .unwrap_or_else(|| panic!("{n} was not recovered"))
}
