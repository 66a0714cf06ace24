//! The tiered manager end to end on two system-memory tiers: offload (write-through and
//! write-back), eviction, onboarding, exhaustion, corruption and concurrency.

mod common;

use std::sync::Arc;

use kvbm_logical::{BlockManager, Device, Host, ImmutableBlock, SequenceHash};
use kvbm_physical::{
    Layout, LayoutConfig, LayoutKind, OffloadMode, Tier, TieredError, TieredManager,
    TransferEngine, TransferError,
};

const PAGE: usize = 4;

fn config(num_blocks: usize) -> LayoutConfig {
    LayoutConfig {
        num_blocks,
        num_layers: 3,
        outer_dim: 2,
        page_size: PAGE,
        inner_dim: 16,
        dtype_bytes: 2,
    }
}

fn tiers(g1_blocks: usize, g2_blocks: usize, mode: OffloadMode, checksums: bool) -> TieredManager {
    let g1 = Tier::new(
        BlockManager::<Device>::builder()
            .block_count(g1_blocks)
            .block_size(PAGE)
            .build()
            .unwrap(),
        Layout::system(LayoutKind::LayerSeparate, config(g1_blocks))
            .unwrap()
            .into_shared(),
    )
    .unwrap();
    let mut g2_layout = Layout::system(LayoutKind::FullyContiguous, config(g2_blocks)).unwrap();
    if checksums {
        g2_layout = g2_layout.with_checksums().unwrap();
    }
    let g2 = Tier::new(
        BlockManager::<Host>::builder()
            .block_count(g2_blocks)
            .block_size(PAGE)
            .build()
            .unwrap(),
        g2_layout.into_shared(),
    )
    .unwrap();
    TieredManager::new(g1, g2, TransferEngine::host(), mode).unwrap()
}

fn chain(base: u64, n: usize) -> Vec<SequenceHash> {
    (0..n as u64)
        .map(|i| SequenceHash::new(base * 1000 + i + 1))
        .collect()
}

use common::{assert_conserved, assert_kv, compute_and_register, kv};

/// `common::flush_g1`, returning how many evicted blocks reached G2.
fn flush_g1(t: &TieredManager) -> usize {
    common::flush_g1(t).offloaded
}

#[test]
fn write_through_offloads_on_register_and_onboards_on_match() {
    let t = tiers(4, 8, OffloadMode::WriteThrough, false);
    let hashes = chain(1, 4);
    let reg = compute_and_register(&t, &hashes, 0);
    assert_eq!((reg.offloaded, reg.error.is_none()), (4, true));
    assert!(hashes.iter().all(|&h| t.g2().manager().contains(h)));
    ImmutableBlock::release_all(reg.blocks);

    assert_eq!(flush_g1(&t), 0, "write-through copies nothing at eviction");
    assert!(hashes.iter().all(|&h| !t.g1().manager().contains(h)));

    let m = t.match_blocks(&hashes);
    assert!(m.error.is_none(), "{:?}", m.error);
    assert_eq!((m.g1_hits, m.onboarded, m.blocks.len()), (0, 4, 4));
    let got: Vec<_> = m.blocks.iter().map(|b| b.sequence_hash()).collect();
    assert_eq!(got, hashes);
    assert_kv(&t, &m.blocks);
    drop(m);

    // Now in G1 again: a second match is all G1 hits.
    let again = t.match_blocks(&hashes);
    assert_eq!((again.g1_hits, again.onboarded), (4, 0));
    assert_kv(&t, &again.blocks);
    drop(again);
    assert_eq!(t.stats().offloaded, 4);
    assert_eq!(t.stats().onboarded, 4);
    assert_conserved(&t);
}

#[test]
fn write_back_offloads_when_g1_evicts() {
    let t = tiers(4, 8, OffloadMode::WriteBack, true);
    let hashes = chain(2, 4);
    let reg = compute_and_register(&t, &hashes, 0);
    assert_eq!(reg.offloaded, 0);
    assert!(hashes.iter().all(|&h| !t.g2().manager().contains(h)));
    ImmutableBlock::release_all(reg.blocks);

    // The evicted bytes reach G2 before the allocation returns (flush then overwrites).
    assert_eq!(flush_g1(&t), 4);
    assert!(hashes.iter().all(|&h| t.g2().manager().contains(h)));

    let m = t.match_blocks(&hashes);
    assert!(m.error.is_none(), "{:?}", m.error);
    assert_eq!((m.g1_hits, m.onboarded), (0, 4));
    assert_kv(&t, &m.blocks);
    assert_conserved(&t);
}

#[test]
fn match_joins_g1_hits_and_onboarded_blocks_into_one_prefix() {
    for mode in [OffloadMode::WriteThrough, OffloadMode::WriteBack] {
        let t = tiers(6, 8, mode, false);
        let hashes = chain(3, 5);
        ImmutableBlock::release_all(compute_and_register(&t, &hashes, 0).blocks);
        // Push the last three out of G1 (least recently used first: touch the first two).
        let keep = t.match_blocks(&hashes[..2]);
        flush_g1(&t);
        if mode == OffloadMode::WriteThrough {
            // Nothing was lost: G2 had everything since registration.
            assert!(hashes.iter().all(|&h| t.g2().manager().contains(h)));
        }
        let m = t.match_blocks(&hashes);
        assert!(m.error.is_none(), "{:?}", m.error);
        assert_eq!(
            (m.g1_hits, m.onboarded, m.blocks.len()),
            (2, 3, 5),
            "{mode:?}"
        );
        assert_kv(&t, &m.blocks);
        // Parents were restored from the chain: a later prefix match walks the same hashes.
        drop(keep);
        drop(m);
        assert_eq!(t.g1().manager().match_blocks(&hashes).len(), 5);
        assert_conserved(&t);
    }
}

#[test]
fn a_miss_in_both_tiers_ends_the_prefix() {
    let t = tiers(4, 4, OffloadMode::WriteThrough, false);
    let hashes = chain(4, 3);
    ImmutableBlock::release_all(compute_and_register(&t, &hashes[..1], 0).blocks);
    let m = t.match_blocks(&hashes);
    assert_eq!(m.blocks.len(), 1);
    assert!(m.error.is_none());
    let empty = t.match_blocks(&chain(5, 2));
    assert!(empty.blocks.is_empty() && empty.error.is_none());
}

#[test]
fn a_full_g2_reports_the_hashes_it_could_not_take() {
    let t = tiers(8, 2, OffloadMode::WriteThrough, false);
    let hashes = chain(6, 4);
    let first = compute_and_register(&t, &hashes[..2], 0);
    assert_eq!(first.offloaded, 2);
    // Hold both G2 blocks so they cannot be evicted.
    let held = t.g2().manager().match_blocks(&hashes[..2]);
    assert_eq!(held.len(), 2);
    let second = compute_and_register(&t, &hashes, 2);
    assert_eq!(second.offloaded, 0);
    match &second.error {
        Some(TieredError::Exhausted { tier: "host", lost }) => assert_eq!(lost, &hashes[2..]),
        other => panic!("{other:?}"),
    }
    // G1 is unaffected: all four are registered and hold their bytes.
    assert_kv(&t, &first.blocks);
    assert_kv(&t, &second.blocks);
    assert_eq!(t.stats().lost, 2);
    drop(held);
    assert_conserved(&t);
}

#[test]
fn a_corrupt_g2_block_is_dropped_and_the_prefix_before_it_onboarded() {
    let t = tiers(4, 8, OffloadMode::WriteThrough, true);
    let hashes = chain(7, 4);
    ImmutableBlock::release_all(compute_and_register(&t, &hashes, 0).blocks);
    flush_g1(&t);
    // Corrupt the G2 copy of the third block.
    let victim = t.g2().manager().match_blocks(&hashes[2..3]);
    let r = t.g2().layout().region(victim[0].block_id(), 1, 0).unwrap();
    // SAFETY: inside G2's live system slab; nothing copies it now.
    unsafe { *(r.addr as *mut u8) ^= 1 };
    drop(victim);

    let m = t.match_blocks(&hashes);
    assert_eq!((m.onboarded, m.blocks.len()), (2, 2));
    assert_kv(&t, &m.blocks);
    match &m.error {
        Some(TieredError::Copy {
            tier: "device",
            lost,
            source: TransferError::ChecksumMismatch { .. },
        }) => {
            assert_eq!(lost, &hashes[2..]);
        }
        other => panic!("{other:?}"),
    }
    assert!(
        !t.g2().manager().contains(hashes[2]),
        "the corrupt copy left G2"
    );
    assert!(t.g2().manager().contains(hashes[3]));
    drop(m);
    assert_conserved(&t);
}

#[test]
fn mismatched_tiers_are_refused() {
    let m = |n| {
        BlockManager::<Device>::builder()
            .block_count(n)
            .block_size(PAGE)
            .build()
            .unwrap()
    };
    let l = |c| {
        Layout::system(LayoutKind::FullyContiguous, c)
            .unwrap()
            .into_shared()
    };
    assert!(matches!(
        Tier::new(m(4), l(config(5))),
        Err(TieredError::Config(_))
    ));
    let wrong_page = LayoutConfig {
        page_size: PAGE * 2,
        ..config(4)
    };
    assert!(matches!(
        Tier::new(m(4), l(wrong_page)),
        Err(TieredError::Config(_))
    ));

    let g1 = Tier::new(m(4), l(config(4))).unwrap();
    let g2 = Tier::new(
        BlockManager::<Host>::builder()
            .block_count(4)
            .block_size(PAGE)
            .build()
            .unwrap(),
        l(LayoutConfig {
            num_layers: 2,
            ..config(4)
        }),
    )
    .unwrap();
    let err =
        TieredManager::new(g1, g2, TransferEngine::host(), OffloadMode::WriteBack).unwrap_err();
    assert!(matches!(err, TieredError::Config(_)));
}

#[test]
fn concurrent_requests_always_see_their_own_bytes() {
    // Threads replay overlapping conversations through small tiers (constant eviction and
    // onboarding); every block a match returns must hold its hash's bytes.
    for mode in [OffloadMode::WriteThrough, OffloadMode::WriteBack] {
        let t = Arc::new(tiers(24, 48, mode, true));
        std::thread::scope(|s| {
            for thread in 0..4u64 {
                let t = Arc::clone(&t);
                s.spawn(move || {
                    let mut x = thread * 7919 + 3;
                    for _ in 0..300 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let hashes = chain(x % 12, 1 + (x >> 8) as usize % 6);
                        let m = t.match_blocks(&hashes);
                        assert_kv(&t, &m.blocks);
                        let have = m.blocks.len();
                        if have < hashes.len() {
                            match t.allocate_blocks(hashes.len() - have) {
                                Ok(alloc) => {
                                    let staged = alloc
                                        .blocks
                                        .into_iter()
                                        .zip(have..)
                                        .map(|(b, i)| {
                                            t.g1()
                                                .layout()
                                                .write_block(b.block_id(), &kv(&t, hashes[i]))
                                                .unwrap();
                                            let parent = i.checked_sub(1).map(|p| hashes[p]);
                                            b.stage(hashes[i], PAGE).unwrap().with_parent(parent)
                                        })
                                        .collect();
                                    let reg = t.register_blocks(staged).unwrap();
                                    assert_kv(&t, &reg.blocks);
                                }
                                Err(TieredError::Allocation(_)) => {} // other threads hold G1
                                Err(e) => panic!("{e}"),
                            }
                        }
                    }
                });
            }
        });
        assert_conserved(&t);
        let c = t.g1().manager().counts();
        assert_eq!(
            c.reset + c.inactive,
            c.total,
            "{mode:?}: every handle returned"
        );
        assert!(
            t.stats().onboarded > 0 && t.stats().offloaded > 0,
            "{mode:?}: {:?}",
            t.stats()
        );
    }
}
