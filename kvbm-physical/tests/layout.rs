//! Layout arithmetic, validation and block access.

mod common;

use kvbm_logical::BlockId;
use kvbm_physical::{
    Geometry, Layout, LayoutConfig, LayoutError, LayoutKind, MemoryKind, Storage, StorageError,
    SystemStorage,
};
use proptest::prelude::*;

fn config(
    num_blocks: usize,
    layers: usize,
    outer: usize,
    page: usize,
    inner: usize,
    dtype: usize,
) -> LayoutConfig {
    LayoutConfig {
        num_blocks,
        num_layers: layers,
        outer_dim: outer,
        page_size: page,
        inner_dim: inner,
        dtype_bytes: dtype,
    }
}

/// Every region, as (slab, offset, len), must tile the slabs exactly: no overlap, no gap.
fn assert_tiles(g: &Geometry) {
    let c = *g.config();
    let mut regions = Vec::new();
    for b in 0..c.num_blocks {
        for l in 0..c.num_layers {
            for o in 0..c.outer_dim {
                let (slab, off) = g.offset(b, l, o);
                assert!(slab < g.slab_count());
                regions.push((slab, off, g.region_bytes()));
            }
        }
    }
    regions.sort();
    for slab in 0..g.slab_count() {
        let mut at = 0;
        for &(_, off, len) in regions.iter().filter(|r| r.0 == slab) {
            assert_eq!(off, at, "gap or overlap in slab {slab} of {g:?}");
            at += len;
        }
        assert_eq!(at, g.slab_bytes(), "slab {slab} not covered");
    }
}

#[test]
fn fully_contiguous_strides() {
    let c = config(5, 3, 2, 4, 8, 2); // region 64 B, block 384 B
    let g = Geometry::new(LayoutKind::FullyContiguous, c).unwrap();
    assert_eq!(
        (g.region_bytes(), g.block_bytes(), g.slab_count()),
        (64, 384, 1)
    );
    assert_eq!(g.slab_bytes(), 5 * 384);
    // block stride, layer stride (outer_dim regions), outer stride (one region)
    assert_eq!(g.offset(1, 0, 0).1 - g.offset(0, 0, 0).1, 384);
    assert_eq!(g.offset(0, 1, 0).1 - g.offset(0, 0, 0).1, 128);
    assert_eq!(g.offset(0, 0, 1).1 - g.offset(0, 0, 0).1, 64);
    assert_eq!(g.offset(4, 2, 1), (0, 4 * 384 + 2 * 128 + 64));
    assert_tiles(&g);
}

#[test]
fn layer_separate_strides() {
    let c = config(5, 3, 2, 4, 8, 2);
    let g = Geometry::new(LayoutKind::LayerSeparate, c).unwrap();
    assert_eq!((g.slab_count(), g.slab_bytes()), (3, 5 * 128));
    // inside a layer's slab: block stride outer_dim regions, outer stride one region
    assert_eq!(g.offset(1, 0, 0), (0, 128));
    assert_eq!(g.offset(0, 0, 1), (0, 64));
    assert_eq!(g.offset(4, 2, 1), (2, 4 * 128 + 64));
    assert_tiles(&g);
}

#[test]
fn outer_first_strides() {
    // vLLM FlashAttention's [2, num_blocks, ...] per layer: every block's K, then every V.
    let c = config(5, 3, 2, 4, 8, 2);
    let g = Geometry::new(LayoutKind::OuterFirst, c).unwrap();
    assert_eq!((g.slab_count(), g.slab_bytes()), (3, 5 * 128));
    assert_eq!(g.offset(1, 0, 0), (0, 64));
    assert_eq!(g.offset(0, 0, 1), (0, 5 * 64));
    assert_eq!(g.offset(4, 2, 1), (2, (5 + 4) * 64));
    assert_tiles(&g);
    // A block image is still layer, then outer: reads and writes cross the K/V halves.
    let layout = Layout::system(LayoutKind::OuterFirst, c).unwrap();
    let image = common::pattern(5, layout.block_bytes());
    layout.write_block(BlockId::new(3), &image).unwrap();
    let v = layout.region(BlockId::new(3), 1, 1).unwrap();
    assert_eq!(v.addr, layout.slabs()[1].addr() + (5 + 3) * 64);
    // SAFETY: a region of the layout's live system slab; nothing writes it now.
    let bytes = unsafe { std::slice::from_raw_parts(v.addr as *const u8, v.len) };
    assert_eq!(bytes, &image[3 * 64..4 * 64]);
}

#[test]
fn mla_single_outer() {
    for kind in LayoutKind::ALL {
        let g = Geometry::new(kind, config(3, 2, 1, 2, 3, 1)).unwrap();
        assert_eq!(g.block_bytes(), 2 * 6);
        assert_tiles(&g);
    }
}

proptest! {
    #[test]
    fn regions_tile_the_slabs(
        blocks in 1usize..12, layers in 1usize..6, outer in 1usize..3,
        page in 1usize..9, inner in 1usize..17, dtype in 1usize..5,
    ) {
        for kind in LayoutKind::ALL {
            let g = Geometry::new(kind, config(blocks, layers, outer, page, inner, dtype)).unwrap();
            assert_tiles(&g);
        }
    }
}

#[test]
fn memory_regions_match_geometry_and_stay_inside_slabs() {
    for kind in LayoutKind::ALL {
        let layout = Layout::system(kind, config(4, 3, 2, 2, 4, 2)).unwrap();
        for b in 0..4u32 {
            for l in 0..3 {
                for o in 0..2 {
                    let r = layout.region(BlockId::new(b), l, o).unwrap();
                    let (slab, off) = layout.geometry().offset(b as usize, l, o);
                    let base = layout.slabs()[slab].addr();
                    assert_eq!(r.addr, base + off as u64);
                    assert!(off + r.len <= layout.slabs()[slab].len());
                }
            }
        }
    }
}

#[test]
fn validation_errors() {
    let good = config(4, 2, 2, 16, 128, 2);
    assert!(good.validate().is_ok());
    for (field, mutate) in [
        (
            "num_blocks",
            (|c: &mut LayoutConfig| c.num_blocks = 0) as fn(&mut LayoutConfig),
        ),
        ("num_layers", |c| c.num_layers = 0),
        ("outer_dim", |c| c.outer_dim = 0),
        ("page_size", |c| c.page_size = 0),
        ("inner_dim", |c| c.inner_dim = 0),
        ("dtype_bytes", |c| c.dtype_bytes = 0),
    ] {
        let mut c = good;
        mutate(&mut c);
        assert_eq!(c.validate(), Err(LayoutError::ZeroDimension(field)));
        assert!(Layout::system(LayoutKind::LayerSeparate, c).is_err());
    }
    let mut c = good;
    c.num_blocks = kvbm_logical::MAX_BLOCKS + 1;
    assert!(matches!(
        c.validate(),
        Err(LayoutError::TooManyBlocks { .. })
    ));
    let mut c = good;
    c.outer_dim = 3;
    assert_eq!(c.validate(), Err(LayoutError::InvalidOuterDim(3)));
    // Overflow at each level: region, block, pool, and beyond isize::MAX.
    for c in [
        config(1, 1, 1, usize::MAX, 2, 1),
        config(1, usize::MAX / 2, 2, 2, 1, 1),
        config(1 << 24, 1 << 20, 2, 1 << 10, 1 << 10, 2),
        config(2, 1, 1, 1, 1, (isize::MAX as usize / 2) + 1),
    ] {
        assert!(
            matches!(c.validate(), Err(LayoutError::Overflow { .. })),
            "{c:?}"
        );
    }
}

#[test]
fn out_of_range_regions_and_buffers() {
    let layout = Layout::system(LayoutKind::FullyContiguous, config(2, 2, 2, 2, 2, 1)).unwrap();
    assert_eq!(
        layout.region(BlockId::new(2), 0, 0),
        Err(LayoutError::BlockOutOfRange {
            block: 2,
            num_blocks: 2
        })
    );
    assert_eq!(
        layout.region(BlockId::new(0), 2, 0),
        Err(LayoutError::LayerOutOfRange {
            layer: 2,
            num_layers: 2
        })
    );
    assert_eq!(
        layout.region(BlockId::new(0), 0, 2),
        Err(LayoutError::OuterOutOfRange {
            outer: 2,
            outer_dim: 2
        })
    );
    let mut small = vec![0; layout.block_bytes() - 1];
    assert_eq!(
        layout.read_block(BlockId::new(0), &mut small),
        Err(LayoutError::BufferSize {
            expected: 16,
            actual: 15
        })
    );
    assert!(layout.write_block(BlockId::new(5), &[1; 16]).is_err());
}

#[test]
fn block_images_round_trip_in_both_kinds() {
    for c in common::shapes() {
        for kind in LayoutKind::ALL {
            let layout = Layout::system(kind, c).unwrap();
            let images = common::fill(&layout, 7);
            for (b, image) in images.iter().enumerate() {
                assert_eq!(&common::read(&layout, b), image, "{kind:?} {c:?} block {b}");
            }
        }
    }
}

#[test]
fn block_image_order_is_layer_then_outer() {
    // The image of a layer-separate block is the fully contiguous order: region (l, o) at
    // offset (l * outer_dim + o) * region_bytes.
    let c = config(3, 2, 2, 1, 4, 1);
    let layout = Layout::system(LayoutKind::LayerSeparate, c).unwrap();
    let image: Vec<u8> = (0..layout.block_bytes() as u8).collect();
    layout.write_block(BlockId::new(1), &image).unwrap();
    for l in 0..2 {
        for o in 0..2 {
            let r = layout.region(BlockId::new(1), l, o).unwrap();
            // SAFETY: the region lies in the layout's live system slab; nothing writes it now.
            let bytes = unsafe { std::slice::from_raw_parts(r.addr as *const u8, r.len) };
            let at = (l * 2 + o) * 4;
            assert_eq!(bytes, &image[at..at + 4]);
        }
    }
}

#[test]
fn from_slabs_checks_count_size_and_kind() {
    let c = config(2, 3, 2, 2, 2, 1); // region 4, per layer slab 16 B
    let slab = |n| Storage::System(SystemStorage::new(n).unwrap());
    let err = Layout::from_slabs(LayoutKind::LayerSeparate, c, vec![slab(16)], None).unwrap_err();
    assert!(matches!(err, LayoutError::Slabs(_)));
    let err = Layout::from_slabs(
        LayoutKind::LayerSeparate,
        c,
        vec![slab(16), slab(16), slab(15)],
        None,
    )
    .unwrap_err();
    assert!(matches!(err, LayoutError::Slabs(_)));
    let layout = Layout::from_slabs(
        LayoutKind::LayerSeparate,
        c,
        vec![slab(16), slab(16), slab(64)],
        None,
    )
    .unwrap();
    assert_eq!(layout.memory(), MemoryKind::System);
}

#[test]
fn gpu_memory_without_a_device_is_a_typed_error() {
    let c = config(2, 1, 1, 1, 1, 1);
    for memory in [MemoryKind::Pinned, MemoryKind::Device { ordinal: 0 }] {
        let err = Layout::allocate(LayoutKind::FullyContiguous, c, memory, None).unwrap_err();
        assert!(
            matches!(
                err,
                LayoutError::Storage(StorageError::NoCudaDevice(_) | StorageError::CudaDisabled)
            ),
            "{err:?}"
        );
    }
    // With the `cuda` feature on this machine has no driver; without it, CUDA is disabled.
    match kvbm_physical::CudaDevice::open(0) {
        Ok(gpu) => eprintln!("a GPU is present: {gpu:?}"),
        Err(e) => assert!(matches!(
            e,
            StorageError::NoCudaDevice(_) | StorageError::CudaDisabled
        )),
    }
    match kvbm_physical::discover_gpus() {
        Ok(gpus) => eprintln!("NVML sees {} GPU(s)", gpus.len()),
        Err(e) => assert!(
            matches!(e, StorageError::Nvml(_) | StorageError::CudaDisabled),
            "{e:?}"
        ),
    }
}

#[test]
fn system_storage_errors_and_alignment() {
    assert_eq!(SystemStorage::new(0).unwrap_err(), StorageError::ZeroSize);
    assert!(matches!(
        SystemStorage::with_alignment(8, 12),
        Err(StorageError::BadAlignment {
            align: 12,
            bytes: 8
        })
    ));
    let s = SystemStorage::with_alignment(100, 256).unwrap();
    assert_eq!(s.addr() % 256, 0);
    assert!(matches!(
        SystemStorage::new(isize::MAX as usize),
        Err(StorageError::AllocationFailed { .. }) | Err(StorageError::BadAlignment { .. })
    ));
}

#[test]
fn checksums_follow_writes_and_need_host_memory() {
    let layout = Layout::system(LayoutKind::LayerSeparate, config(2, 2, 2, 2, 2, 1))
        .unwrap()
        .with_checksums()
        .unwrap();
    let image = common::pattern(3, layout.block_bytes());
    layout.write_block(BlockId::new(1), &image).unwrap();
    assert_eq!(
        layout.checksum(BlockId::new(1)),
        Some(xxhash_rust::xxh3::xxh3_64(&image))
    );
    assert_eq!(layout.checksum(BlockId::new(0)), None);
}

#[test]
fn sized_for_fills_the_fraction() {
    let c = config(1, 32, 2, 16, 1024, 2); // 2 MiB blocks
    let sized = c.sized_for(80 << 30, 0.5).unwrap();
    assert_eq!(sized.num_blocks, 20 * 1024);
    assert!(sized.total_bytes().unwrap() <= 40 << 30);
    assert!(matches!(
        c.sized_for(1 << 20, 0.5),
        Err(LayoutError::Storage(StorageError::AllocationFailed { .. }))
    ));
    for bad in [0.0, -0.1, 1.01, f64::NAN] {
        assert!(matches!(
            c.sized_for(1 << 30, bad),
            Err(LayoutError::Storage(StorageError::InvalidFraction(_)))
        ));
    }
    // A bad shape is refused, not divided by zero.
    for shape in [
        config(1, 0, 2, 16, 1024, 2),
        config(1, 32, 3, 16, 1024, 2),
        config(1, 32, 2, 16, 0, 2),
    ] {
        assert!(shape.sized_for(1 << 30, 0.5).is_err(), "{shape:?}");
    }
    // Huge free memory is capped at the most blocks a manager can hold.
    let tiny = config(1, 1, 1, 1, 1, 1);
    assert_eq!(
        tiny.sized_for(usize::MAX, 1.0).unwrap().num_blocks,
        kvbm_logical::MAX_BLOCKS
    );
}
