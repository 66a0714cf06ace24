//! Hostile input: random arguments, valid and invalid, through the public APIs of
//! kvbm-logical and kvbm-physical. Nothing may panic; every refusal must be a typed error,
//! and after every refusal the pools must still account for every block.

use std::sync::Arc;

use kvbm_logical::{
    BlockId, BlockManager, Device, EvictionBackend, ImmutableBlock, MutableBlock, SequenceHash,
};
use kvbm_physical::{
    CopyOptions, Layout, LayoutConfig, LayoutKind, Strategy as CopyStrategy, TransferEngine,
    TransferError,
};
use proptest::prelude::*;

/// Sizes around the edges: zero, small, powers of two, huge, maximal.
fn size() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(0usize),
        1usize..64,
        Just(1 << 20),
        Just(u32::MAX as usize),
        Just(usize::MAX / 2),
        Just(usize::MAX),
    ]
}

#[derive(Clone, Debug)]
enum Op {
    Allocate(usize),
    StageAndRegister {
        n: usize,
        size: usize,
        foreign: bool,
    },
    Match(Vec<u64>),
    Scan(Vec<u64>, bool),
    Touch(Vec<u64>),
    Pin(Vec<u64>),
    Unpin(Vec<u64>),
    Invalidate(Vec<u64>),
    Reset,
    DropHeld(usize),
}

fn hashes() -> impl Strategy<Value = Vec<u64>> {
    prop::collection::vec(prop_oneof![0u64..16, Just(u64::MAX)], 0..12)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => size().prop_map(Op::Allocate),
        3 => (0usize..6, prop_oneof![Just(16usize), size()], any::<bool>())
            .prop_map(|(n, size, foreign)| Op::StageAndRegister { n, size, foreign }),
        2 => hashes().prop_map(Op::Match),
        1 => (hashes(), any::<bool>()).prop_map(|(h, t)| Op::Scan(h, t)),
        1 => hashes().prop_map(Op::Touch),
        1 => hashes().prop_map(Op::Pin),
        1 => hashes().prop_map(Op::Unpin),
        1 => hashes().prop_map(Op::Invalidate),
        1 => Just(Op::Reset),
        2 => (0usize..8).prop_map(Op::DropHeld),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn builders_refuse_bad_shapes_with_typed_errors(
        count in size(), block_size in size(), fraction in prop_oneof![Just(-1.0f64), 0.0f64..1.0, Just(1.5), Just(f64::NAN)],
        backend in prop::sample::select(EvictionBackend::ALL.to_vec()),
    ) {
        // Keep real allocations small: huge counts must be refused before allocating.
        let count = if (64..u32::MAX as usize).contains(&count) { 64 } else { count };
        let built = BlockManager::<Device>::builder()
            .block_count(count)
            .block_size(block_size)
            .max_pinned_fraction(fraction)
            .eviction(backend)
            .build();
        if let Ok(m) = built {
            prop_assert_eq!(m.total_blocks(), count);
            prop_assert!(m.check_invariants().is_ok());
        }
    }

    #[test]
    fn the_manager_survives_any_call_sequence(
        ops in prop::collection::vec(op(), 0..60),
        backend in prop::sample::select(EvictionBackend::ALL.to_vec()),
    ) {
        let m = BlockManager::<Device>::builder()
            .block_count(8).block_size(16).max_pinned_fraction(0.5).eviction(backend).build().unwrap();
        let other = BlockManager::<Device>::builder().block_count(4).block_size(16).build().unwrap();
        let mut held: Vec<ImmutableBlock<Device>> = Vec::new();
        let mut next = 0u64;
        for op in ops {
            match op {
                Op::Allocate(n) => {
                    // Refused wholesale or granted exactly; granted blocks go straight back.
                    if let Ok(blocks) = m.allocate_blocks(n) {
                        prop_assert_eq!(blocks.len(), n);
                        MutableBlock::release_all(blocks);
                    }
                }
                Op::StageAndRegister { n, size, foreign } => {
                    let source = if foreign { &other } else { &m };
                    let Ok(blocks) = source.allocate_blocks(n) else { continue };
                    let mut staged = Vec::new();
                    for b in blocks {
                        match b.stage(SequenceHash::new(next % 16), size) {
                            Ok(c) => staged.push(c),
                            Err(e) => drop(e.into_block()), // typed, block handed back
                        }
                        next += 1;
                    }
                    match m.register_blocks(staged) {
                        Ok(handles) => held.extend(handles),
                        Err(e) => drop(e.into_blocks()),
                    }
                }
                Op::Match(h) => held.extend(m.match_blocks(&h.into_iter().map(SequenceHash::new).collect::<Vec<_>>())),
                Op::Scan(h, touch) => held.extend(m.scan_matches(&h.into_iter().map(SequenceHash::new).collect::<Vec<_>>(), touch)),
                Op::Touch(h) => { m.touch_blocks(&h.into_iter().map(SequenceHash::new).collect::<Vec<_>>()); }
                Op::Pin(h) => { let _ = m.pin(&h.into_iter().map(SequenceHash::new).collect::<Vec<_>>()); }
                Op::Unpin(h) => { m.unpin(&h.into_iter().map(SequenceHash::new).collect::<Vec<_>>()); }
                Op::Invalidate(h) => { m.invalidate_blocks(&h.into_iter().map(SequenceHash::new).collect::<Vec<_>>()); }
                Op::Reset => { let _ = m.reset_inactive_pool(); }
                Op::DropHeld(k) => { let k = k.min(held.len()); ImmutableBlock::release_all(held.drain(..k)); }
            }
            let c = m.check_invariants().map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(c.reset + c.inactive + c.mutable + c.active, c.total);
            prop_assert!(other.check_invariants().is_ok());
        }
        drop(held);
        m.unpin_all();
        let c = m.counts();
        prop_assert_eq!(c.reset + c.inactive, c.total);
    }

    #[test]
    fn layouts_refuse_bad_shapes_and_indices(
        dims in prop::collection::vec(size(), 6),
        kind in prop::sample::select(LayoutKind::ALL.to_vec()),
        index in (size(), size(), size()),
        buffer in 0usize..4096,
    ) {
        let c = LayoutConfig {
            num_blocks: dims[0], num_layers: dims[1], outer_dim: dims[2],
            page_size: dims[3], inner_dim: dims[4], dtype_bytes: dims[5],
        };
        let valid = c.validate();
        // Sizing from free memory: any shape, any amount, any fraction; never a panic.
        for fraction in [0.0, 0.5, 1.0, f64::NAN, -1.0] {
            if let Ok(sized) = c.sized_for(index.0, fraction) {
                prop_assert!(sized.validate().is_ok());
                prop_assert!(sized.total_bytes().unwrap() as f64 <= index.0 as f64 * fraction);
            }
        }
        // Allocate only small valid layouts; the rest must be refused without allocating.
        if valid.is_ok() && c.total_bytes().unwrap() > 16 << 20 {
            return Ok(());
        }
        match Layout::system(kind, c) {
            Err(_) => prop_assert!(valid.is_err()),
            Ok(layout) => {
                prop_assert!(valid.is_ok());
                let (b, l, o) = index;
                let r = layout.region(BlockId::new(b.min(u32::MAX as usize) as u32), l, o);
                let in_range = b < c.num_blocks && l < c.num_layers && o < c.outer_dim;
                prop_assert_eq!(r.is_ok(), in_range);
                let mut buf = vec![0u8; buffer];
                let read = layout.read_block(BlockId::new(0), &mut buf);
                prop_assert_eq!(read.is_ok(), buffer == layout.block_bytes());
            }
        }
    }

    #[test]
    fn transfers_refuse_bad_batches_and_copy_nothing(
        pairs in prop::collection::vec((0u32..12, 0u32..12), 0..10),
        layers in (0usize..5, 0usize..5),
        strategy in prop::option::of(prop::sample::select(CopyStrategy::ALL.to_vec())),
        same in any::<bool>(),
    ) {
        let c = LayoutConfig { num_blocks: 8, num_layers: 3, outer_dim: 2, page_size: 2, inner_dim: 4, dtype_bytes: 2 };
        let src = Arc::new(Layout::system(LayoutKind::LayerSeparate, c).unwrap());
        let dst = if same { Arc::clone(&src) } else { Arc::new(Layout::system(LayoutKind::FullyContiguous, c).unwrap()) };
        let image = vec![7u8; src.block_bytes()];
        for b in 0..8 { src.write_block(BlockId::new(b), &image).unwrap(); }
        let pairs: Vec<(BlockId, BlockId)> = pairs.into_iter().map(|(a, b)| (BlockId::new(a), BlockId::new(b))).collect();
        let before: Vec<Vec<u8>> = (0..8).map(|b| { let mut v = vec![0; dst.block_bytes()]; dst.read_block(BlockId::new(b), &mut v).unwrap(); v }).collect();
        let options = CopyOptions { layers: Some(layers.0..layers.1), strategy, ..CopyOptions::default() };
        match TransferEngine::host().copy_blocks_blocking(&src, &dst, &pairs, &options) {
            Ok(report) => prop_assert_eq!(report.pairs, pairs.len()),
            Err(e) => {
                prop_assert!(!matches!(e, TransferError::CopyFailed { .. }), "host copies never fail: {e}");
                // A refusal copied nothing.
                for (b, old) in before.iter().enumerate() {
                    let mut v = vec![0; dst.block_bytes()];
                    dst.read_block(BlockId::new(b as u32), &mut v).unwrap();
                    prop_assert_eq!(&v, old);
                }
            }
        }
    }
}
