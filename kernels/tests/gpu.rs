//! Each kernel against its CPU reference on the GPU: fresh random data, several shapes,
//! misaligned sizes and odd counts, destinations poisoned first, every byte checked. Run on
//! a GPU machine (`../shared/gpu/bundle`, then `bash .gpu/run-all.sh`).
#![cfg(feature = "cuda")]

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr};
use kvbm_kernels::launch::Kernels;
use kvbm_kernels::reference::{self, CopyRegion, PermuteShape};

fn random(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn setup() -> (Arc<CudaContext>, Arc<CudaStream>, Arc<Kernels>) {
    // SAFETY: only probes for the library.
    let driver = unsafe { cudarc::driver::sys::is_culib_present() };
    assert!(driver, "needs a CUDA driver");
    let ctx = CudaContext::new(0).expect("a CUDA GPU");
    let stream = ctx.new_stream().unwrap();
    let kernels = Kernels::get(&ctx).expect("kernels compile and load");
    eprintln!("kernels compiled for {}", kernels.arch());
    (ctx, stream, kernels)
}

fn addr(stream: &Arc<CudaStream>, s: &CudaSlice<u8>) -> u64 {
    let (ptr, _sync) = s.device_ptr(stream);
    ptr
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn batched_copy_matches_reference() {
    let (_ctx, stream, kernels) = setup();
    let mut case = 0u64;
    // (regions, max region bytes, misalign)
    for (n, max_len, misalign) in [
        (1, 64, 0),
        (7, 4096, 0),
        (64, 32 << 10, 0),
        (333, 8 << 10, 1),
        (1000, 999, 3),
        (5, 300 << 10, 8),
    ] {
        case += 1;
        let lens: Vec<usize> = random(case, n)
            .iter()
            .zip(random(case + 99, n))
            .map(|(&a, b)| ((a as usize) << 8 | b as usize) % max_len + 1)
            .collect();
        let total: usize = lens.iter().sum::<usize>() + n * 16 + 64;
        let src_host = random(case * 7, total);
        let mut regions = Vec::new();
        let (mut s_at, mut d_at) = (misalign, (misalign * 3) % 16);
        for (i, &len) in lens.iter().enumerate() {
            regions.push(CopyRegion {
                src: s_at,
                dst: d_at,
                len,
            });
            s_at += len + (i % 5);
            d_at += len + (i % 3);
        }
        let src = stream.clone_htod(&src_host).unwrap();
        let poison = vec![0xA5u8; total + n * 16];
        let dst = stream.clone_htod(&poison).unwrap();
        let (sb, db) = (addr(&stream, &src), addr(&stream, &dst));
        let srcs: Vec<u64> = regions.iter().map(|r| sb + r.src as u64).collect();
        let dsts: Vec<u64> = regions.iter().map(|r| db + r.dst as u64).collect();
        let sizes: Vec<u64> = regions.iter().map(|r| r.len as u64).collect();
        // SAFETY: every region lies inside `src`/`dst` (built above), destinations do not
        // overlap, and both buffers live until the synchronisation below.
        unsafe { kernels.batched_copy(&stream, &srcs, &dsts, &sizes) }.unwrap();
        let got = stream.clone_dtoh(&dst).unwrap();
        stream.synchronize().unwrap();
        let mut expect = poison.clone();
        reference::batched_copy(&src_host, &mut expect, &regions).unwrap();
        assert_eq!(
            got, expect,
            "case {case}: {n} regions up to {max_len} B, misalign {misalign}"
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn permutation_matches_reference_both_ways() {
    let (_ctx, stream, kernels) = setup();
    for (num_layers, outer_dim, region_bytes, blocks) in [
        (1, 1, 16, 3),
        (2, 2, 4096, 9),
        (32, 2, 32 << 10, 17),
        (3, 1, 1000, 7),
        (5, 2, 12, 31),
    ] {
        let s = PermuteShape {
            num_layers,
            outer_dim,
            region_bytes,
        };
        let layers_host: Vec<Vec<u8>> = (0..num_layers)
            .map(|l| random(l as u64 + 5, blocks * s.span().unwrap()))
            .collect();
        let layers: Vec<CudaSlice<u8>> = layers_host
            .iter()
            .map(|l| stream.clone_htod(l).unwrap())
            .collect();
        let bases: Vec<u64> = layers.iter().map(|l| addr(&stream, l)).collect();
        let fc_poison = random(77, blocks * s.block_bytes().unwrap());
        let fc = stream.clone_htod(&fc_poison).unwrap();
        let pairs: Vec<(u32, u32)> = (0..blocks as u32)
            .rev()
            .step_by(2)
            .zip((0..blocks as u32).step_by(3))
            .collect();
        // SAFETY: every pair lies inside its slabs; destinations are distinct; buffers live
        // until the synchronisation.
        unsafe { kernels.permute(&stream, &bases, addr(&stream, &fc), &pairs, s, true) }.unwrap();
        let got = stream.clone_dtoh(&fc).unwrap();
        stream.synchronize().unwrap();
        let mut expect = fc_poison.clone();
        let views: Vec<&[u8]> = layers_host.iter().map(Vec::as_slice).collect();
        reference::permute_to_block_major(s, &views, &mut expect, &pairs).unwrap();
        assert_eq!(got, expect, "to block-major {s:?}");

        // And back, into poisoned layer slabs.
        let poison: Vec<Vec<u8>> = (0..num_layers)
            .map(|l| random(l as u64 + 900, blocks * s.span().unwrap()))
            .collect();
        let back: Vec<CudaSlice<u8>> = poison
            .iter()
            .map(|p| stream.clone_htod(p).unwrap())
            .collect();
        let back_bases: Vec<u64> = back.iter().map(|l| addr(&stream, l)).collect();
        // SAFETY: as above.
        unsafe { kernels.permute(&stream, &back_bases, addr(&stream, &fc), &pairs, s, false) }
            .unwrap();
        let mut expect_back = poison.clone();
        let mut views: Vec<&mut [u8]> = expect_back.iter_mut().map(Vec::as_mut_slice).collect();
        reference::permute_to_layer_major(s, &expect, &mut views, &pairs).unwrap();
        let got: Vec<Vec<u8>> = back
            .iter()
            .map(|slab| stream.clone_dtoh(slab).unwrap())
            .collect();
        stream.synchronize().unwrap();
        for (l, slab) in got.iter().enumerate() {
            assert_eq!(slab, &expect_back[l], "to layer-major {s:?} layer {l}");
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn back_to_back_launches_reuse_a_bounded_set_of_argument_buffers() {
    let (ctx, _stream, kernels) = setup();
    // Four threads, each with its own stream, queue 48 launches apiece without waiting in
    // between, each launch with its own regions and destination buffer. An argument buffer
    // reused before the launch that read it finished would copy the wrong regions.
    let src_host = random(4242, 1 << 20);
    let results: Vec<(Vec<u8>, Vec<u8>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4u64)
            .map(|t| {
                let (ctx, kernels, src_host) = (&ctx, &kernels, &src_host);
                s.spawn(move || {
                    let stream = ctx.new_stream().unwrap();
                    let src = stream.clone_htod(src_host).unwrap();
                    let sb = addr(&stream, &src);
                    let mut rounds = Vec::new();
                    for round in 0..48u64 {
                        let seed = t * 1000 + round + 1;
                        let n = 1 + (seed as usize * 37) % 700; // argument sizes vary too
                        let starts = random(seed, n);
                        let regions: Vec<CopyRegion> = (0..n)
                            .map(|i| CopyRegion {
                                src: (starts[i] as usize * 4001 + i * 13) % ((1 << 20) - 512),
                                dst: i * 512,
                                len: 1 + (starts[i] as usize * 7 + i) % 511,
                            })
                            .collect();
                        let poison = random(seed + 77, n * 512);
                        let dst = stream.clone_htod(&poison).unwrap();
                        let db = addr(&stream, &dst);
                        let srcs: Vec<u64> = regions.iter().map(|r| sb + r.src as u64).collect();
                        let dsts: Vec<u64> = regions.iter().map(|r| db + r.dst as u64).collect();
                        let sizes: Vec<u64> = regions.iter().map(|r| r.len as u64).collect();
                        // SAFETY: every region lies inside `src`/`dst`; destinations do not
                        // overlap; both buffers live until the synchronisation below.
                        unsafe { kernels.batched_copy(&stream, &srcs, &dsts, &sizes) }.unwrap();
                        let mut expect = poison;
                        reference::batched_copy(src_host, &mut expect, &regions).unwrap();
                        rounds.push((dst, expect));
                    }
                    let out: Vec<(Vec<u8>, Vec<u8>)> = rounds
                        .into_iter()
                        .map(|(dst, expect)| (stream.clone_dtoh(&dst).unwrap(), expect))
                        .collect();
                    stream.synchronize().unwrap();
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    for (i, (got, expect)) in results.iter().enumerate() {
        assert!(got == expect, "launch {i} copied the wrong bytes");
    }
    assert!(
        kernels.arg_buffers() <= kvbm_kernels::launch::MAX_ARG_BUFFERS,
        "{} argument buffers for {} launches",
        kernels.arg_buffers(),
        results.len()
    );
}

/// The engines' per-layer arrangements, as maps over one buffer holding every layer (with a
/// gap between layer slabs and `pad` bytes after each region, as strided views give).
fn engine_maps(
    format: &str,
    layers: usize,
    blocks: usize,
    outer: usize,
    region: usize,
    pad: usize,
) -> (Vec<reference::LayerMap>, usize) {
    let stride = region + pad;
    let slab = blocks * outer * stride + 4096 + 16 * pad;
    let (block_stride, outer_stride) = match format {
        "outer-first" => (stride, blocks * stride),
        _ => (outer * stride, stride), // block-first, and MLA (one outer)
    };
    let maps = (0..layers)
        .map(|l| reference::LayerMap {
            base: (l * slab) as u64,
            block_stride: block_stride as u64,
            outer_stride: outer_stride as u64,
        })
        .collect();
    (maps, layers * slab)
}

fn fc_maps(layers: usize, outer: usize, region: usize) -> Vec<reference::LayerMap> {
    (0..layers)
        .map(|l| reference::LayerMap {
            base: (l * outer * region) as u64,
            block_stride: (layers * outer * region) as u64,
            outer_stride: region as u64,
        })
        .collect()
}

fn shifted(maps: &[reference::LayerMap], by: u64) -> Vec<reference::LayerMap> {
    maps.iter()
        .map(|m| reference::LayerMap {
            base: m.base + by,
            ..*m
        })
        .collect()
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn region_permutation_matches_reference_for_the_engine_layouts_both_ways() {
    let (_ctx, stream, kernels) = setup();
    let mut case = 0u64;
    // (format, layers, blocks, outer, region bytes, pad)
    for (format, layers, blocks, outer, region, pad) in [
        ("outer-first", 4, 9, 2, 32 << 10, 0),
        ("outer-first", 3, 7, 2, 1000, 24),
        ("outer-first", 32, 17, 2, 4096, 0),
        ("block-first", 4, 9, 2, 32 << 10, 0),
        ("block-first", 5, 31, 2, 12, 4),
        ("block-first", 2, 5, 2, 300 << 10, 16),
        ("mla", 6, 11, 1, 36 << 10, 0),
        ("mla", 3, 8, 1, 576 * 2 * 16 + 3, 8),
    ] {
        case += 1;
        let shape = reference::RegionShape {
            outer_dim: outer,
            region_bytes: region,
        };
        let (eng, eng_len) = engine_maps(format, layers, blocks, outer, region, pad);
        let fc = fc_maps(layers, outer, region);
        let fc_len = blocks * layers * outer * region;
        let eng_host = random(case * 13 + 1, eng_len);
        let fc_poison = random(case * 13 + 2, fc_len);
        let eng_dev = stream.clone_htod(&eng_host).unwrap();
        let fc_dev = stream.clone_htod(&fc_poison).unwrap();
        let (eb, fb) = (addr(&stream, &eng_dev), addr(&stream, &fc_dev));
        let pairs: Vec<(u32, u32)> = (0..blocks as u32)
            .rev()
            .step_by(2)
            .zip((0..blocks as u32).step_by(3))
            .collect();
        // Engine → fully contiguous (offload).
        // SAFETY: every region lies inside its buffer (the maps were built for them), the
        // destinations are distinct blocks, and both buffers live until the synchronisation.
        unsafe {
            kernels.permute_regions(
                &stream,
                &shifted(&eng, eb),
                &shifted(&fc, fb),
                &pairs,
                shape,
            )
        }
        .unwrap();
        let got = stream.clone_dtoh(&fc_dev).unwrap();
        stream.synchronize().unwrap();
        let mut expect = fc_poison.clone();
        reference::permute_regions(shape, &eng_host, &eng, &mut expect, &fc, &pairs).unwrap();
        assert!(got == expect, "{format} → contiguous, case {case}");

        // Fully contiguous → engine (onboard), into a poisoned engine buffer.
        let swapped: Vec<(u32, u32)> = pairs.iter().map(|&(e, f)| (f, e)).collect();
        let eng_poison = random(case * 13 + 3, eng_len);
        let back = stream.clone_htod(&eng_poison).unwrap();
        let bb = addr(&stream, &back);
        // SAFETY: as above.
        unsafe {
            kernels.permute_regions(
                &stream,
                &shifted(&fc, fb),
                &shifted(&eng, bb),
                &swapped,
                shape,
            )
        }
        .unwrap();
        let got = stream.clone_dtoh(&back).unwrap();
        stream.synchronize().unwrap();
        let mut expect_back = eng_poison.clone();
        reference::permute_regions(shape, &expect, &fc, &mut expect_back, &eng, &swapped).unwrap();
        assert!(got == expect_back, "contiguous → {format}, case {case}");
    }
}
