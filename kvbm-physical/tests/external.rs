//! Layouts over memory the test owns, as an engine's KV tensors (`Layout::from_engine`), on
//! the CPU: every byte of transfers to and from the fully contiguous host layout checked
//! against index formulas written from the tensors' own strides (and against the kernels'
//! CPU reference), and every validation refusal.

mod common;
mod engine_spec;

use engine_spec::Spec;

use std::sync::Arc;

use kvbm_kernels::reference::{self, LayerMap, RegionShape};
use kvbm_logical::BlockId;
use kvbm_physical::{
    CopyOptions, EngineFormat, LayerTensor, Layout, LayoutConfig, LayoutError, LayoutKind,
    MemoryKind, StorageError, Strategy as CopyStrategy, SystemStorage, TensorError, TransferEngine,
    TransferError,
};
use proptest::prelude::*;

/// Host memory standing in for the engine's allocation, with random bytes.
struct Arena {
    storage: SystemStorage,
    len: usize,
}

impl Arena {
    /// The tensors start `lead` bytes in (so the address is not page-aligned).
    fn new(len: usize, lead: usize, seed: u64) -> Self {
        let storage = SystemStorage::new(len + lead + 64).unwrap();
        let arena = Self {
            storage,
            len: len + lead + 64,
        };
        // SAFETY: the storage is live and no layout copies into it yet.
        unsafe { std::slice::from_raw_parts_mut(arena.storage.addr() as *mut u8, arena.len) }
            .copy_from_slice(&common::pattern(seed, arena.len));
        arena
    }

    /// A snapshot of the bytes. Only while no transfer is in flight.
    fn bytes(&self) -> Vec<u8> {
        // SAFETY: live storage; the callers take snapshots only between transfers.
        unsafe { std::slice::from_raw_parts(self.storage.addr() as *const u8, self.len) }.to_vec()
    }
}

const LEAD: usize = 64;

fn engine_layout(spec: &Spec, arena: &Arena) -> Result<Arc<Layout>, LayoutError> {
    let tensors = spec.tensors(arena.storage.addr() + LEAD as u64);
    // SAFETY: the tensors lie inside the arena (sized by `arena_bytes`), which the test
    // keeps alive until after the layout and every transfer; nothing else writes it while
    // transfers run.
    unsafe {
        Layout::from_engine(
            spec.format,
            spec.config(),
            MemoryKind::System,
            &tensors,
            None,
        )
    }
    .map(Layout::into_shared)
}

/// The layout's maps as offsets into a buffer starting at `base` (for the reference).
fn offsets(layout: &Layout, base: u64) -> Vec<LayerMap> {
    (0..layout.config().num_layers)
        .map(|l| {
            let m = layout.layer_map(l).unwrap();
            LayerMap {
                base: m.base - base,
                ..m
            }
        })
        .collect()
}

fn spec_strategy() -> impl Strategy<Value = Spec> {
    (
        prop::sample::select(EngineFormat::ALL.to_vec()),
        (1usize..7, 1usize..4, 1usize..3),
        (1usize..4, 1usize..3, 1usize..4),
        prop::sample::select(vec![1usize, 2, 4]),
        (any::<bool>(), 0usize..3, 0usize..5, any::<bool>()),
    )
        .prop_map(
            |(
                format,
                (num_blocks, num_layers, outer),
                (page, heads, head_dim),
                dtype,
                (hnd, pad, gap, interleave),
            )| {
                let mla = format == EngineFormat::Mla;
                let interleaved = interleave && format != EngineFormat::OuterFirst;
                Spec {
                    format,
                    num_blocks,
                    num_layers,
                    outer_dim: if mla { 1 } else { outer },
                    page,
                    heads,
                    head_dim,
                    dtype,
                    hnd: hnd && !mla,
                    pad: if interleaved { 0 } else { pad },
                    gap: if interleaved { 0 } else { gap },
                    interleaved,
                }
            },
        )
}

/// Random pairs over `n` blocks, sources distinct and destinations distinct (so that the
/// reversed pairs are a valid batch too).
fn pairs_from(picks: &[(usize, usize)], n: usize) -> Vec<(u32, u32)> {
    let mut pairs: Vec<(u32, u32)> = Vec::new();
    for &(s, d) in picks {
        let (s, d) = ((s % n) as u32, (d % n) as u32);
        if pairs.iter().all(|&(a, b)| a != s && b != d) {
            pairs.push((s, d));
        }
    }
    pairs
}

fn ids(pairs: &[(u32, u32)]) -> Vec<(BlockId, BlockId)> {
    pairs
        .iter()
        .map(|&(a, b)| (BlockId::new(a), BlockId::new(b)))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(192))]

    /// Offload (engine → fully contiguous) and onboard (fully contiguous → engine): every
    /// byte of both sides, against the tensors' index formulas.
    #[test]
    fn transfers_to_and_from_contiguous_host_memory_follow_the_tensor_strides(
        spec in spec_strategy(),
        picks in prop::collection::vec((0usize..64, 0usize..64), 1..7),
        layer_cut in (0usize..3, 0usize..3),
    ) {
        let c = spec.config();
        let arena = Arena::new(spec.arena_bytes(), LEAD, 1);
        let engine = engine_layout(&spec, &arena).unwrap();
        prop_assert_eq!(engine.kind(), spec.format.kind());
        let fc = Layout::system(LayoutKind::FullyContiguous, c).unwrap().into_shared();
        let fc_poison = common::fill(&fc, 2);
        let pairs = pairs_from(&picks, c.num_blocks);
        let host = TransferEngine::host();

        // Offload.
        let src = arena.bytes();
        host.copy_blocks_blocking(&engine, &fc, &ids(&pairs), &CopyOptions::default()).unwrap();
        let mut expect: Vec<Vec<u8>> = fc_poison.clone();
        for &(s, d) in &pairs {
            for l in 0..c.num_layers {
                for o in 0..c.outer_dim {
                    for idx in spec.page_indices() {
                        for e in 0..spec.dtype {
                            let at = spec.fc_byte(0, l, o, idx, e);
                            expect[d as usize][at] = src[LEAD + spec.engine_byte(s as usize, l, o, idx, e)];
                        }
                    }
                }
            }
        }
        for (b, image) in expect.iter().enumerate() {
            prop_assert_eq!(&common::read(&fc, b), image, "offload, block {}", b);
        }
        // The kernels' CPU reference over the layouts' maps writes the same bytes.
        let mut reference_fc: Vec<u8> = fc_poison.concat();
        let shape = RegionShape { outer_dim: c.outer_dim, region_bytes: c.region_bytes().unwrap() };
        reference::permute_regions(
            shape,
            &src,
            &offsets(&engine, arena.storage.addr()),
            &mut reference_fc,
            &offsets(&fc, fc.slabs()[0].addr()),
            &pairs,
        ).unwrap();
        prop_assert_eq!(reference_fc, expect.concat());

        // Onboard into a second engine allocation, for a range of layers; every other byte
        // of the allocation (padding, gaps, other blocks and layers) must be untouched.
        let start = layer_cut.0 % c.num_layers;
        let layers = start..c.num_layers - layer_cut.1 % (c.num_layers - start);
        let back_arena = Arena::new(spec.arena_bytes(), LEAD, 3);
        let back = engine_layout(&spec, &back_arena).unwrap();
        let before = back_arena.bytes();
        let onboard: Vec<(u32, u32)> = pairs.iter().map(|&(s, d)| (d, s)).collect();
        let options = CopyOptions::layers(layers.clone());
        host.copy_blocks_blocking(&fc, &back, &ids(&onboard), &options).unwrap();
        let mut expect_back = before;
        for &(f, e_block) in &onboard {
            for l in layers.clone() {
                for o in 0..c.outer_dim {
                    for idx in spec.page_indices() {
                        for e in 0..spec.dtype {
                            let to = LEAD + spec.engine_byte(e_block as usize, l, o, idx, e);
                            expect_back[to] = expect[f as usize][spec.fc_byte(0, l, o, idx, e)];
                        }
                    }
                }
            }
        }
        prop_assert!(back_arena.bytes() == expect_back, "onboard of layers {:?} ({:?})", layers, spec);
        drop((engine, back));
    }

    /// Block images of an engine layout round trip, and are the fully contiguous order.
    #[test]
    fn block_images_of_engine_layouts_round_trip(spec in spec_strategy(), block in 0usize..8) {
        let arena = Arena::new(spec.arena_bytes(), LEAD, 5);
        let layout = engine_layout(&spec, &arena).unwrap();
        let b = block % spec.num_blocks;
        let image = common::pattern(b as u64 + 9, layout.block_bytes());
        layout.write_block(BlockId::new(b as u32), &image).unwrap();
        prop_assert_eq!(common::read(&layout, b), image.clone());
        let bytes = arena.bytes();
        for l in 0..spec.num_layers {
            for o in 0..spec.outer_dim {
                for idx in spec.page_indices() {
                    for e in 0..spec.dtype {
                        prop_assert_eq!(
                            bytes[LEAD + spec.engine_byte(b, l, o, idx, e)],
                            image[spec.fc_byte(0, l, o, idx, e)]
                        );
                    }
                }
            }
        }
    }
}

fn vllm() -> Spec {
    Spec {
        format: EngineFormat::OuterFirst,
        num_blocks: 4,
        num_layers: 3,
        outer_dim: 2,
        page: 2,
        heads: 2,
        head_dim: 4,
        dtype: 2,
        hnd: false,
        pad: 0,
        gap: 0,
        interleaved: false,
    }
}

fn try_build(spec: &Spec, tensors: &[LayerTensor]) -> Result<Layout, LayoutError> {
    // SAFETY: every call here is refused before the layout exists, or (the accepted ones)
    // describes the live arena of the caller, which outlives the layout.
    unsafe {
        Layout::from_engine(
            spec.format,
            spec.config(),
            MemoryKind::System,
            tensors,
            None,
        )
    }
}

fn tensor_error(r: Result<Layout, LayoutError>) -> (usize, TensorError) {
    match r {
        Err(LayoutError::Tensor { layer, error }) => (layer, error),
        other => panic!("expected a tensor error, got {other:?}"),
    }
}

#[test]
fn bad_tensors_are_refused_with_the_layer_and_what_is_wrong() {
    let spec = vllm();
    let arena = Arena::new(spec.arena_bytes(), LEAD, 7);
    let base = arena.storage.addr() + LEAD as u64;
    let good = spec.tensors(base);
    assert!(try_build(&spec, &good).is_ok());
    let with = |layer: usize, f: &dyn Fn(&mut LayerTensor)| {
        let mut t = good.clone();
        f(&mut t[layer]);
        try_build(&spec, &t)
    };

    // One tensor short; one too many.
    assert_eq!(
        try_build(&spec, &good[..2]).unwrap_err(),
        LayoutError::TensorCount {
            expected: 3,
            actual: 2
        }
    );
    // Rank.
    assert_eq!(
        tensor_error(with(1, &|t| {
            t.shape.pop();
        })),
        (
            1,
            TensorError::Rank {
                expected: 5,
                shape: 4,
                strides: 5
            }
        )
    );
    // Each dimension against the config.
    for (axis, dim, expected, actual) in [
        (0, "outer (K, V)", 2, 3),
        (1, "num_blocks", 4, 5),
        (2, "block_size", 2, 3),
        (3, "kv_heads × head_dim", 8, 12),
    ] {
        assert_eq!(
            tensor_error(with(2, &|t| t.shape[axis] =
                actual / (if axis == 3 { 4 } else { 1 }))),
            (
                2,
                TensorError::Dim {
                    dim,
                    expected,
                    actual
                }
            ),
            "{dim}"
        );
    }
    // A page whose rows are padded is not one contiguous range.
    let (p, h) = tensor_error(with(0, &|t| t.strides[2] += 1));
    assert_eq!(p, 0);
    assert!(matches!(h, TensorError::PageNotContiguous { .. }), "{h:?}");
    // Block stride below a page: K pages overlap.
    assert!(matches!(
        tensor_error(with(0, &|t| t.strides[1] = 8)).1,
        TensorError::Overlap { .. }
    ));
    // Null, misaligned, past the address space.
    assert_eq!(
        tensor_error(with(1, &|t| t.addr = 0)),
        (1, TensorError::Null)
    );
    assert_eq!(
        tensor_error(with(1, &|t| t.addr += 1)).1,
        TensorError::Misaligned {
            addr: good[1].addr + 1,
            align: 2
        }
    );
    assert!(matches!(
        tensor_error(with(1, &|t| t.addr = u64::MAX - 1)).1,
        TensorError::AddressOverflow { .. }
    ));
    assert!(matches!(
        tensor_error(with(1, &|t| t.strides[0] = usize::MAX / 2)).1,
        TensorError::AddressOverflow { .. } | TensorError::Overlap { .. }
    ));
    // Two layers on one tensor (KV sharing between layers): refused.
    let (layer, error) = tensor_error(with(2, &|t| t.addr = good[0].addr));
    assert_eq!((layer, error), (2, TensorError::LayerOverlap { other: 0 }));
    // Layers overlapping by part of a block.
    let (_, error) = tensor_error(with(1, &|t| t.addr = good[0].addr + 64));
    assert_eq!(error, TensorError::LayerOverlap { other: 0 });
    // MLA needs outer_dim 1.
    let mla = Spec {
        format: EngineFormat::Mla,
        ..spec
    };
    assert_eq!(
        try_build(&mla, &mla.tensors(base)).unwrap_err(),
        LayoutError::MlaOuterDim(2)
    );
    // Nothing that failed changed the arena.
    assert!(arena.bytes()[LEAD..] == Arena::new(spec.arena_bytes(), LEAD, 7).bytes()[LEAD..]);
}

#[test]
fn gpu_memory_needs_its_cuda_device() {
    let spec = vllm();
    let arena = Arena::new(spec.arena_bytes(), LEAD, 8);
    let tensors = spec.tensors(arena.storage.addr() + LEAD as u64);
    for memory in [MemoryKind::Pinned, MemoryKind::Device { ordinal: 0 }] {
        // SAFETY: refused before anything is built (no CUDA device given).
        let err =
            unsafe { Layout::from_engine(spec.format, spec.config(), memory, &tensors, None) }
                .unwrap_err();
        assert!(
            matches!(
                err,
                LayoutError::Storage(StorageError::NoCudaDevice(_) | StorageError::CudaDisabled)
            ),
            "{err:?}"
        );
    }
}

#[test]
fn interleaved_layers_are_accepted_only_when_evenly_strided() {
    // vLLM's cross-layer blocks: [num_blocks, layers, 2, block_size, heads, head_dim], each
    // layer a strided view. Accepted; every block's image is then one contiguous range, so
    // a copy of consecutive blocks to the fully contiguous layout is one run.
    let spec = Spec {
        format: EngineFormat::BlockFirst,
        interleaved: true,
        ..vllm()
    };
    let arena = Arena::new(spec.arena_bytes(), LEAD, 11);
    let engine = engine_layout(&spec, &arena).unwrap();
    let fc = Layout::system(LayoutKind::FullyContiguous, spec.config())
        .unwrap()
        .into_shared();
    let report = TransferEngine::host()
        .copy_blocks_blocking(
            &engine,
            &fc,
            &ids(&[(0, 0), (1, 1), (2, 2), (3, 3)]),
            &CopyOptions::default(),
        )
        .unwrap();
    assert_eq!(report.copies, 1, "four whole blocks, one run");
    let bytes = arena.bytes();
    assert_eq!(
        common::read(&fc, 0)[..],
        bytes[LEAD..LEAD + fc.block_bytes()],
        "the cross-layer block is the fully contiguous image"
    );
    // Unevenly spaced interleaving (layer 2 moved by one page) is refused.
    let mut tensors = spec.tensors(arena.storage.addr() + LEAD as u64);
    tensors[2].addr += (spec.page_elems() * spec.dtype) as u64;
    let (layer, error) = tensor_error(try_build(&spec, &tensors));
    assert!(
        matches!(error, TensorError::LayerOverlap { .. }),
        "{error:?}"
    );
    assert!(layer > 0);
}

#[test]
fn a_host_engine_refuses_the_permutation_kernel_and_copies_nothing() {
    let spec = vllm();
    let arena = Arena::new(spec.arena_bytes(), LEAD, 12);
    let engine = engine_layout(&spec, &arena).unwrap();
    let fc = Layout::system(LayoutKind::FullyContiguous, spec.config())
        .unwrap()
        .into_shared();
    let before = common::fill(&fc, 13);
    let err = TransferEngine::host()
        .copy_blocks_blocking(
            &engine,
            &fc,
            &ids(&[(0, 1)]),
            &CopyOptions::strategy(CopyStrategy::Permute),
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            TransferError::Unsupported {
                strategy: CopyStrategy::Permute,
                ..
            }
        ),
        "{err:?}"
    );
    for (b, image) in before.iter().enumerate() {
        assert_eq!(&common::read(&fc, b), image);
    }
}

#[test]
fn engine_layouts_report_their_format_and_maps() {
    let spec = vllm();
    let arena = Arena::new(spec.arena_bytes(), LEAD, 14);
    let layout = engine_layout(&spec, &arena).unwrap();
    assert_eq!(layout.engine_format(), Some(EngineFormat::OuterFirst));
    assert!(layout.slabs().is_empty(), "kvbm owns none of this memory");
    let m = layout.layer_map(1).unwrap();
    let (block, outer, layer) = spec.strides();
    assert_eq!(
        (m.base, m.block_stride, m.outer_stride),
        (
            arena.storage.addr() + (LEAD + layer * spec.dtype) as u64,
            (block * spec.dtype) as u64,
            (outer * spec.dtype) as u64
        )
    );
    assert!(matches!(
        layout.layer_map(3),
        Err(LayoutError::LayerOutOfRange { .. })
    ));
    // A region's address is the tensor's element (0, block, 0, 0, 0) for V of block 2.
    let r = layout.region(BlockId::new(2), 1, 1).unwrap();
    assert_eq!(
        r.addr,
        arena.storage.addr() + (LEAD + spec.engine_byte(2, 1, 1, [0, 0, 0], 0)) as u64
    );
}

#[test]
fn dense_shapes_follow_the_formats() {
    let c = vllm().config();
    assert_eq!(
        EngineFormat::BlockFirst.dense_shape(&c, 2).unwrap(),
        [4, 2, 2, 2, 4]
    );
    assert!(matches!(
        EngineFormat::OuterFirst.dense_shape(&c, 3),
        Err(LayoutError::Tensor { .. })
    ));
    assert_eq!(
        EngineFormat::Mla.dense_shape(&c, 1),
        Err(LayoutError::MlaOuterDim(2))
    );
    let mla = LayoutConfig {
        outer_dim: 1,
        inner_dim: 576,
        ..c
    };
    assert_eq!(EngineFormat::Mla.dense_shape(&mla, 1).unwrap(), [4, 2, 576]);
}
