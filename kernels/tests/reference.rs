//! The CPU references, checked exhaustively on small shapes against index formulas written
//! out independently.

use kvbm_kernels::KernelError;
use kvbm_kernels::reference::{
    CopyRegion, PermuteShape, batched_copy, permute_to_block_major, permute_to_layer_major,
};
use proptest::prelude::*;

fn bytes(seed: u8, n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

proptest! {
    #[test]
    fn batched_copy_matches_a_byte_loop(
        regions in prop::collection::vec((0usize..64, 0usize..64, 0usize..40), 0..12),
    ) {
        let src = bytes(3, 128);
        // Destinations must not overlap (as in the kernel): lay them out one after another.
        let mut at = 0;
        let regions: Vec<CopyRegion> = regions
            .into_iter()
            .map(|(s, skip, len)| {
                let r = CopyRegion { src: s, dst: at + skip % 3, len };
                at = r.dst + len;
                r
            })
            .collect();
        let mut dst = vec![0xAA; at + 5];
        let mut expect = dst.clone();
        for r in &regions {
            for k in 0..r.len {
                expect[r.dst + k] = src[r.src + k];
            }
        }
        batched_copy(&src, &mut dst, &regions).unwrap();
        prop_assert_eq!(dst, expect);
    }
}

#[test]
fn batched_copy_refuses_out_of_range_regions() {
    let mut dst = [0u8; 8];
    for r in [
        CopyRegion {
            src: 7,
            dst: 0,
            len: 2,
        },
        CopyRegion {
            src: 0,
            dst: 7,
            len: 2,
        },
        CopyRegion {
            src: usize::MAX,
            dst: 0,
            len: 2,
        },
    ] {
        assert!(matches!(
            batched_copy(&[0; 8], &mut dst, &[r]),
            Err(KernelError::InvalidArgument(_))
        ));
    }
    assert_eq!(dst, [0; 8]);
}

/// Byte `k` of region (layer, outer) of a block: where it lives in each layout.
fn ls_index(s: PermuteShape, block: usize, outer: usize, k: usize) -> usize {
    (block * s.outer_dim + outer) * s.region_bytes + k
}
fn fc_index(s: PermuteShape, block: usize, layer: usize, outer: usize, k: usize) -> usize {
    block * s.num_layers * s.outer_dim * s.region_bytes
        + (layer * s.outer_dim + outer) * s.region_bytes
        + k
}

#[test]
fn permutation_both_ways_on_every_small_shape() {
    let blocks = 5;
    for num_layers in 1..=4 {
        for outer_dim in 1..=2 {
            for region_bytes in [1, 3, 16, 17] {
                let s = PermuteShape {
                    num_layers,
                    outer_dim,
                    region_bytes,
                };
                let layers: Vec<Vec<u8>> = (0..num_layers)
                    .map(|l| bytes(l as u8 * 17 + 1, blocks * s.span().unwrap()))
                    .collect();
                let pairs = [(0u32, 3u32), (4, 0), (2, 2), (1, 4)];
                // layer-separate → contiguous
                let mut fc = vec![0xEE; blocks * s.block_bytes().unwrap()];
                let mut expect = fc.clone();
                for &(ls, f) in &pairs {
                    for l in 0..num_layers {
                        for o in 0..outer_dim {
                            for k in 0..region_bytes {
                                expect[fc_index(s, f as usize, l, o, k)] =
                                    layers[l][ls_index(s, ls as usize, o, k)];
                            }
                        }
                    }
                }
                let views: Vec<&[u8]> = layers.iter().map(Vec::as_slice).collect();
                permute_to_block_major(s, &views, &mut fc, &pairs).unwrap();
                assert_eq!(fc, expect, "{s:?}");

                // contiguous → layer-separate, into poisoned slabs
                let mut back: Vec<Vec<u8>> = (0..num_layers)
                    .map(|_| vec![0x55; blocks * s.span().unwrap()])
                    .collect();
                let mut expect_back = back.clone();
                for &(ls, f) in &pairs {
                    for (l, slab) in expect_back.iter_mut().enumerate() {
                        for o in 0..outer_dim {
                            for k in 0..region_bytes {
                                slab[ls_index(s, ls as usize, o, k)] =
                                    fc[fc_index(s, f as usize, l, o, k)];
                            }
                        }
                    }
                }
                let mut views: Vec<&mut [u8]> = back.iter_mut().map(Vec::as_mut_slice).collect();
                permute_to_layer_major(s, &fc, &mut views, &pairs).unwrap();
                assert_eq!(back, expect_back, "{s:?}");
                // The round trip restores the original blocks.
                for &(ls, _) in &pairs {
                    for l in 0..num_layers {
                        let r =
                            ls as usize * s.span().unwrap()..(ls as usize + 1) * s.span().unwrap();
                        assert_eq!(back[l][r.clone()], layers[l][r]);
                    }
                }
            }
        }
    }
}

#[test]
fn permutation_refuses_bad_arguments() {
    let s = PermuteShape {
        num_layers: 2,
        outer_dim: 2,
        region_bytes: 4,
    };
    let slab = vec![0u8; 3 * s.span().unwrap()];
    let mut fc = vec![0u8; 3 * s.block_bytes().unwrap()];
    let err =
        |r: Result<(), KernelError>| assert!(matches!(r, Err(KernelError::InvalidArgument(_))));
    err(permute_to_block_major(s, &[&slab], &mut fc, &[(0, 0)])); // one slab for two layers
    err(permute_to_block_major(
        s,
        &[&slab, &slab],
        &mut fc,
        &[(3, 0)],
    )); // ls block beyond
    err(permute_to_block_major(
        s,
        &[&slab, &slab],
        &mut fc,
        &[(0, 3)],
    )); // fc block beyond
    err(permute_to_block_major(
        s,
        &[&slab, &slab],
        &mut fc,
        &[(u32::MAX, 0)],
    ));
    assert!(fc.iter().all(|&b| b == 0), "nothing written");
}

#[test]
fn overflowing_shapes_are_typed_errors_and_write_nothing() {
    // Spans and block sizes past usize: before, the multiplication panicked (debug) or
    // wrapped to a small size that passed the range checks (release).
    let slab = vec![1u8; 64];
    let mut fc = vec![0u8; 64];
    let span_overflows = PermuteShape {
        num_layers: 1,
        outer_dim: 2,
        region_bytes: usize::MAX / 2 + 1,
    };
    assert!(matches!(
        span_overflows.span(),
        Err(KernelError::Overflow { what: "span" })
    ));
    let r = permute_to_block_major(span_overflows, &[&slab], &mut fc, &[(0, 0)]);
    assert!(matches!(r, Err(KernelError::Overflow { .. })), "{r:?}");
    let mut back = slab.clone();
    let r = permute_to_layer_major(span_overflows, &fc, &mut [&mut back], &[(0, 0)]);
    assert!(matches!(r, Err(KernelError::Overflow { .. })), "{r:?}");
    assert_eq!(back, slab, "nothing written");

    // The span fits but no block does: a range error, as before.
    let huge_region = PermuteShape {
        num_layers: 1,
        outer_dim: 1,
        region_bytes: usize::MAX,
    };
    let r = permute_to_block_major(huge_region, &[&slab], &mut fc, &[(0, 0)]);
    assert!(matches!(r, Err(KernelError::InvalidArgument(_))), "{r:?}");

    // Only the block size overflows.
    let many_layers = PermuteShape {
        num_layers: usize::MAX / 8 + 1,
        outer_dim: 2,
        region_bytes: 4,
    };
    assert_eq!(many_layers.span(), Ok(8));
    assert!(matches!(
        many_layers.block_bytes(),
        Err(KernelError::Overflow {
            what: "block bytes"
        })
    ));
    assert!(fc.iter().all(|&b| b == 0), "nothing written");
}

mod regions {
    use super::bytes;
    use kvbm_kernels::KernelError;
    use kvbm_kernels::reference::{LayerMap, RegionShape, coarsen, permute_regions};
    use proptest::prelude::*;

    /// A side's arrangement, as the tests build it.
    #[derive(Clone, Copy, Debug)]
    enum Arrangement {
        /// One block-major slab: block, layer, outer.
        FullyContiguous,
        /// One slab per layer, block then outer (FlashInfer's block-first; MLA with one outer).
        BlockFirst,
        /// One slab per layer, outer then block (vLLM FlashAttention's `[2, num_blocks, ...]`).
        OuterFirst,
    }

    /// Maps of `layers` layers of `blocks` blocks, with `pad` bytes after each region (a
    /// padded block stride, as a strided tensor view gives) and `gap` bytes between layer
    /// slabs; returns the maps and the buffer length they need.
    fn maps(
        a: Arrangement,
        layers: usize,
        blocks: usize,
        shape: RegionShape,
        pad: usize,
        gap: usize,
    ) -> (Vec<LayerMap>, usize) {
        let (o, r) = (shape.outer_dim, shape.region_bytes);
        match a {
            Arrangement::FullyContiguous => {
                let block = layers * o * r + pad;
                let maps = (0..layers)
                    .map(|l| LayerMap {
                        base: (l * o * r) as u64,
                        block_stride: block as u64,
                        outer_stride: r as u64,
                    })
                    .collect();
                (maps, blocks * block)
            }
            Arrangement::BlockFirst | Arrangement::OuterFirst => {
                let slab = blocks * o * (r + pad) + gap;
                let (block_stride, outer_stride) = match a {
                    Arrangement::BlockFirst => (o * (r + pad), r + pad),
                    _ => (r + pad, blocks * (r + pad)),
                };
                let maps = (0..layers)
                    .map(|l| LayerMap {
                        base: (l * slab) as u64,
                        block_stride: block_stride as u64,
                        outer_stride: outer_stride as u64,
                    })
                    .collect();
                (maps, layers * slab)
            }
        }
    }

    fn arrangement() -> impl Strategy<Value = Arrangement> {
        prop_oneof![
            Just(Arrangement::FullyContiguous),
            Just(Arrangement::BlockFirst),
            Just(Arrangement::OuterFirst),
        ]
    }

    proptest! {
        /// The reference against a byte loop written from the arrangements' own index
        /// formulas; and the coarsened copy (what the launcher hands the GPU) writes exactly
        /// the same bytes.
        #[test]
        fn every_arrangement_pair_matches_the_index_formulas(
            (sa, da) in (arrangement(), arrangement()),
            layers in 1usize..5, blocks in 1usize..7, outer_dim in 1usize..3,
            region_bytes in 1usize..20, (spad, dpad) in (0usize..3, 0usize..3),
            gap in 0usize..9, picks in prop::collection::vec((0usize..64, 0usize..64), 1..6),
        ) {
            let shape = RegionShape { outer_dim, region_bytes };
            let (src_maps, src_len) = maps(sa, layers, blocks, shape, spad, gap);
            let (dst_maps, dst_len) = maps(da, layers, blocks, shape, dpad, 0);
            let src = bytes(9, src_len);
            // Distinct destinations (the kernel's contract).
            let mut pairs: Vec<(u32, u32)> = Vec::new();
            for (s, d) in picks {
                let d = (d % blocks) as u32;
                if pairs.iter().all(|&(_, x)| x != d) {
                    pairs.push(((s % blocks) as u32, d));
                }
            }
            let poison = vec![0xC3u8; dst_len];
            let mut expect = poison.clone();
            let r = region_bytes;
            for &(s, d) in &pairs {
                let (s, d) = (s as usize, d as usize);
                for l in 0..layers {
                    for o in 0..outer_dim {
                        let at = |a: Arrangement, b: usize, p: usize, g: usize| match a {
                            Arrangement::FullyContiguous =>
                                b * (layers * outer_dim * r + p) + (l * outer_dim + o) * r,
                            Arrangement::BlockFirst =>
                                l * (blocks * outer_dim * (r + p) + g) + (b * outer_dim + o) * (r + p),
                            Arrangement::OuterFirst =>
                                l * (blocks * outer_dim * (r + p) + g) + (o * blocks + b) * (r + p),
                        };
                        let from = at(sa, s, spad, gap);
                        let to = at(da, d, dpad, 0);
                        expect[to..to + r].copy_from_slice(&src[from..from + r]);
                    }
                }
            }
            let mut got = poison.clone();
            permute_regions(shape, &src, &src_maps, &mut got, &dst_maps, &pairs).unwrap();
            prop_assert_eq!(&got, &expect);

            let (cs, cm, dm) = coarsen(shape, &src_maps, &dst_maps);
            prop_assert!(cs.region_bytes * cm.len() * cs.outer_dim == r * layers * outer_dim);
            let mut coarse = poison;
            permute_regions(cs, &src, &cm, &mut coarse, &dm, &pairs).unwrap();
            prop_assert_eq!(coarse, expect);
        }
    }

    #[test]
    fn coarsening_merges_only_what_both_sides_keep_adjacent() {
        let shape = RegionShape {
            outer_dim: 2,
            region_bytes: 8,
        };
        let (fc, _) = maps(Arrangement::FullyContiguous, 3, 4, shape, 0, 0);
        let (bf, _) = maps(Arrangement::BlockFirst, 3, 4, shape, 0, 0);
        let (of, _) = maps(Arrangement::OuterFirst, 3, 4, shape, 0, 0);
        // Fully contiguous both sides: one region per block.
        let (s, m, _) = coarsen(shape, &fc, &fc);
        assert_eq!((s.outer_dim, s.region_bytes, m.len()), (1, 48, 1));
        // Block-first against fully contiguous: K and V merge, layers do not.
        let (s, m, _) = coarsen(shape, &bf, &fc);
        assert_eq!((s.outer_dim, s.region_bytes, m.len()), (1, 16, 3));
        // Outer-first keeps K and V apart: nothing merges.
        let (s, m, d) = coarsen(shape, &of, &fc);
        assert_eq!((s, m.as_slice(), d.as_slice()), (shape, &of[..], &fc[..]));
    }

    #[test]
    fn bad_arguments_are_refused_and_write_nothing() {
        let shape = RegionShape {
            outer_dim: 2,
            region_bytes: 4,
        };
        let (fc, len) = maps(Arrangement::FullyContiguous, 2, 3, shape, 0, 0);
        let src = bytes(1, len);
        let mut dst = vec![0u8; len];
        let err = |r: Result<(), KernelError>| {
            assert!(matches!(r, Err(KernelError::InvalidArgument(_))), "{r:?}")
        };
        // Layer counts differ.
        err(permute_regions(
            shape,
            &src,
            &fc,
            &mut dst,
            &fc[..1],
            &[(0, 0)],
        ));
        // A block beyond the buffer, on either side; an address past u64.
        err(permute_regions(shape, &src, &fc, &mut dst, &fc, &[(3, 0)]));
        err(permute_regions(shape, &src, &fc, &mut dst, &fc, &[(0, 3)]));
        let far = [LayerMap {
            base: u64::MAX,
            ..fc[0]
        }; 2];
        err(permute_regions(shape, &src, &far, &mut dst, &fc, &[(1, 0)]));
        // Two pairs writing one block: overlapping destinations.
        err(permute_regions(
            shape,
            &src,
            &fc,
            &mut dst,
            &fc,
            &[(0, 1), (2, 1)],
        ));
        // Regions of one block overlapping each other (outer stride below the region).
        let squeezed = [LayerMap {
            outer_stride: 2,
            ..fc[0]
        }; 2];
        err(permute_regions(
            shape,
            &src,
            &fc,
            &mut dst,
            &squeezed,
            &[(0, 0)],
        ));
        assert!(dst.iter().all(|&b| b == 0), "nothing written");
    }
}
