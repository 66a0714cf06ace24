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
