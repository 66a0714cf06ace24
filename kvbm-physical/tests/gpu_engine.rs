//! Layouts over an engine's device tensors, and ordering against the engine's stream through
//! CUDA events, on a GPU. Run on a GPU machine: `../shared/gpu/bundle`, then
//! `bash .gpu/run-all.sh` (runs ignored tests), or
//! `cargo test -p kvbm-physical --test gpu_engine -- --ignored`.
//!
//! The ordering tests gate the engine's stream with a host function that blocks until the
//! test opens the gate, so "the copy has not run yet" is a fact, not a race: each test also
//! runs its negative control (no event), which must see the stale bytes.

#![cfg(feature = "cuda")]

mod common;
mod cuda_util;
mod engine_spec;

use std::sync::{Arc, Mutex};

use cuda_util::{Gate, OpenOnDrop, dtoh, gpu, htod, ok};
use cudarc::driver::sys;
use engine_spec::Spec;
use kvbm_kernels::reference::{self, LayerMap, RegionShape};
use kvbm_logical::BlockId;
use kvbm_physical::{
    CopyOptions, CudaDevice, CudaEvent, DeviceStorage, EngineFormat, Layout, LayoutError,
    LayoutKind, MemoryKind, PinnedStorage, PointerKind, Strategy, SystemStorage, TensorError,
    TransferEngine, TransferError,
};

const DEV: MemoryKind = MemoryKind::Device { ordinal: 0 };

/// Device memory standing in for the engine's KV allocation.
struct DeviceArena {
    storage: DeviceStorage,
    len: usize,
}

impl DeviceArena {
    fn new(cuda: &CudaDevice, len: usize, seed: u64) -> Self {
        let storage = DeviceStorage::new(cuda, len).unwrap();
        htod(cuda, storage.addr(), &common::pattern(seed, len));
        Self { storage, len }
    }

    fn bytes(&self, cuda: &CudaDevice) -> Vec<u8> {
        dtoh(cuda, self.storage.addr(), self.len)
    }
}

fn device_layout(cuda: &CudaDevice, spec: &Spec, arena: &DeviceArena) -> Arc<Layout> {
    let tensors = spec.tensors(arena.storage.addr());
    // SAFETY: the tensors lie in the arena (sized by `arena_bytes`), which outlives the
    // layout and every transfer of the test; only the test's transfers write it.
    unsafe {
        Layout::from_engine(
            spec.format,
            spec.config(),
            DEV,
            &tensors,
            Some(cuda.clone()),
        )
    }
    .unwrap()
    .into_shared()
}

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

fn specs() -> Vec<Spec> {
    let base = Spec {
        format: EngineFormat::OuterFirst,
        num_blocks: 13,
        num_layers: 4,
        outer_dim: 2,
        page: 16,
        heads: 8,
        head_dim: 128,
        dtype: 2,
        hnd: false,
        pad: 0,
        gap: 0,
        interleaved: false,
    };
    vec![
        base, // vLLM FlashAttention, 32 KiB regions
        Spec {
            pad: 64,
            gap: 1000,
            hnd: true,
            heads: 2,
            head_dim: 64,
            num_layers: 3,
            ..base
        },
        Spec {
            format: EngineFormat::BlockFirst,
            ..base
        }, // FlashInfer
        Spec {
            format: EngineFormat::BlockFirst,
            pad: 8,
            gap: 24,
            heads: 1,
            head_dim: 72,
            dtype: 4,
            ..base
        },
        Spec {
            format: EngineFormat::BlockFirst,
            interleaved: true,
            ..base
        }, // cross-layer blocks
        Spec {
            format: EngineFormat::Mla,
            outer_dim: 1,
            heads: 1,
            head_dim: 576,
            ..base
        }, // DeepSeek MLA, 18 KiB regions
        Spec {
            format: EngineFormat::Mla,
            outer_dim: 1,
            heads: 1,
            head_dim: 576,
            pad: 32,
            gap: 8,
            num_layers: 61,
            ..base
        },
    ]
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn engine_layouts_on_the_device_match_the_cpu_reference_both_ways() {
    // Offload (device engine tensors → pinned fully contiguous) and onboard (back into a
    // poisoned engine allocation) with every GPU strategy; every byte of the destination
    // (padding and gaps included) against the kernels' CPU reference over host copies.
    let cuda = gpu();
    assert!(cuda.has_kernels(), "the kernels must compile and load");
    let engine = TransferEngine::with_cuda(cuda.clone());
    let mut strategies = vec![Strategy::Permute, Strategy::AsyncCopies, Strategy::Kernel];
    if cuda.has_batched_copy() {
        strategies.push(Strategy::BatchedDriver);
    }
    let mut checked = 0;
    for (case, spec) in specs().into_iter().enumerate() {
        let c = spec.config();
        let shape = RegionShape {
            outer_dim: c.outer_dim,
            region_bytes: c.region_bytes().unwrap(),
        };
        let n = c.num_blocks as u32;
        let pairs: Vec<(u32, u32)> = (0..n).map(|i| (i, (i * 5 + 3) % n)).collect();
        let onboard: Vec<(u32, u32)> = pairs.iter().map(|&(e, f)| (f, e)).collect();
        let ids = |p: &[(u32, u32)]| -> Vec<(BlockId, BlockId)> {
            p.iter()
                .map(|&(a, b)| (BlockId::new(a), BlockId::new(b)))
                .collect()
        };
        for &strategy in &strategies {
            let seed = (case * 10 + checked) as u64;
            let arena = DeviceArena::new(&cuda, spec.arena_bytes(), seed + 1);
            let src = device_layout(&cuda, &spec, &arena);
            let fc = Layout::pinned(LayoutKind::FullyContiguous, c, &cuda)
                .unwrap()
                .into_shared();
            let poison = common::fill(&fc, seed + 2);
            let report = engine
                .copy_blocks_blocking(&src, &fc, &ids(&pairs), &CopyOptions::strategy(strategy))
                .unwrap();
            assert_eq!(report.strategy, strategy);
            let mut expect = poison.concat();
            reference::permute_regions(
                shape,
                &arena.bytes(&cuda),
                &offsets(&src, arena.storage.addr()),
                &mut expect,
                &offsets(&fc, fc.slabs()[0].addr()),
                &pairs,
            )
            .unwrap();
            let got: Vec<u8> = (0..c.num_blocks)
                .flat_map(|b| common::read(&fc, b))
                .collect();
            assert!(got == expect, "offload {strategy:?} {spec:?}");

            let back_arena = DeviceArena::new(&cuda, spec.arena_bytes(), seed + 3);
            let back = device_layout(&cuda, &spec, &back_arena);
            let mut expect_back = back_arena.bytes(&cuda);
            engine
                .copy_blocks_blocking(&fc, &back, &ids(&onboard), &CopyOptions::strategy(strategy))
                .unwrap();
            reference::permute_regions(
                shape,
                &expect,
                &offsets(&fc, fc.slabs()[0].addr()),
                &mut expect_back,
                &offsets(&back, back_arena.storage.addr()),
                &onboard,
            )
            .unwrap();
            assert!(
                back_arena.bytes(&cuda) == expect_back,
                "onboard {strategy:?} {spec:?}"
            );
            checked += 1;
        }
    }
    eprintln!("{checked} engine-layout transfers checked byte for byte");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn the_engine_picks_the_permutation_for_many_engine_regions() {
    let cuda = gpu();
    let engine = TransferEngine::with_cuda(cuda.clone());
    let spec = specs()[0]; // 13 blocks × 4 layers × K,V of 32 KiB
    let arena = DeviceArena::new(&cuda, spec.arena_bytes(), 21);
    let src = device_layout(&cuda, &spec, &arena);
    let fc = Layout::pinned(LayoutKind::FullyContiguous, spec.config(), &cuda)
        .unwrap()
        .into_shared();
    let pairs: Vec<(BlockId, BlockId)> = (0..13)
        .map(|i| (BlockId::new(i), BlockId::new(12 - i)))
        .collect();
    assert!(engine.prefers_permute(&src, &fc, pairs.len(), 4));
    let report = engine
        .copy_blocks_blocking(&src, &fc, &pairs, &CopyOptions::default())
        .unwrap();
    assert_eq!(report.strategy, Strategy::Permute);
    assert_eq!(report.copies, 13 * 4 * 2);
    // Fewer regions than the threshold: not the permutation.
    assert!(!engine.prefers_permute(&src, &fc, 1, 4));
    // Two fully contiguous layouts coalesce block by block: not the permutation.
    let fc2 = Layout::device(LayoutKind::FullyContiguous, spec.config(), &cuda)
        .unwrap()
        .into_shared();
    assert!(!engine.prefers_permute(&fc2, &fc, 13, 4));
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn a_transfer_waits_for_the_engines_event_before_reading() {
    // The engine's stream writes block 1 (a memset) behind a closed gate and records an
    // event; the offload waits for that event on the copy stream. It cannot complete before
    // the gate opens, and then it carries the new bytes. Control: the same without the
    // event completes at once with the stale bytes.
    let cuda = gpu();
    let engine = TransferEngine::with_cuda(cuda.clone());
    let spec = specs()[0];
    let arena = DeviceArena::new(&cuda, spec.arena_bytes(), 31);
    let dev = device_layout(&cuda, &spec, &arena);
    let host = Layout::pinned(LayoutKind::FullyContiguous, spec.config(), &cuda)
        .unwrap()
        .into_shared();
    let stale = common::fill(&dev, 32)[1].clone();
    let engine_stream = cuda.context().new_stream().unwrap();
    let pair = [(BlockId::new(1), BlockId::new(0))];
    let c = spec.config();
    let memset_block = |value: u8| {
        for l in 0..c.num_layers {
            for o in 0..c.outer_dim {
                let r = dev.region(BlockId::new(1), l, o).unwrap();
                // SAFETY: a region of the arena (live); the engine stream is live.
                ok("cuMemsetD8Async", unsafe {
                    sys::cuMemsetD8Async(r.addr, value, r.len, engine_stream.cu_stream())
                });
            }
        }
    };

    // Control first: no event, so the copy does not wait for the gated memset.
    let gate = Gate::close(&engine_stream);
    memset_block(0x11);
    let handle = engine
        .copy_blocks(&dev, &host, &pair, &CopyOptions::default())
        .unwrap();
    handle.wait().unwrap(); // returns with the engine stream still gated
    assert!(
        common::read(&host, 0) == stale,
        "without the event, the copy read the stale block (the test can tell)"
    );
    gate.open();
    engine_stream.synchronize().unwrap();

    // Now with the engine's event.
    let gate = Gate::close(&engine_stream);
    memset_block(0x5A);
    let written = CudaEvent::record(&cuda, &engine_stream).unwrap();
    assert!(!written.is_complete());
    let handle = engine
        .copy_blocks(
            &dev,
            &host,
            &pair,
            &CopyOptions::default().waiting_for(written),
        )
        .unwrap();
    assert!(
        !handle.is_complete(),
        "the copy must wait for the engine's kernels (no host sync happened)"
    );
    gate.open();
    handle.wait().unwrap();
    assert!(
        common::read(&host, 0).iter().all(|&b| b == 0x5A),
        "the copy must carry the bytes the engine wrote before its event"
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn the_engine_stream_waits_for_the_onboarding_completion_event() {
    // An onboard (pinned → device block 2) is held back behind a gated producer event; the
    // engine's stream waits for the transfer's completion event, then copies the block into a
    // read-back buffer. Nothing of it can run before the gate opens; then the read-back holds
    // the onboarded bytes. Control: without the wait, the engine reads the stale block.
    let cuda = gpu();
    let engine = TransferEngine::with_cuda(cuda.clone());
    let spec = specs()[2]; // block-first
    let c = spec.config();
    let arena = DeviceArena::new(&cuda, spec.arena_bytes(), 41);
    let dev = device_layout(&cuda, &spec, &arena);
    let host = Layout::pinned(LayoutKind::FullyContiguous, c, &cuda)
        .unwrap()
        .into_shared();
    let fresh = common::fill(&host, 42)[0].clone();
    let stale = common::fill(&dev, 43)[2].clone();
    let producer = cuda.context().new_stream().unwrap();
    let engine_stream = cuda.context().new_stream().unwrap();
    let readback = DeviceStorage::new(&cuda, c.block_bytes().unwrap()).unwrap();
    let read_block_on_engine_stream = || {
        let mut at = 0u64;
        for l in 0..c.num_layers {
            for o in 0..c.outer_dim {
                let r = dev.region(BlockId::new(2), l, o).unwrap();
                // SAFETY: both ranges are live device memory; the stream is live.
                ok("cuMemcpyDtoDAsync", unsafe {
                    sys::cuMemcpyDtoDAsync_v2(
                        readback.addr() + at,
                        r.addr,
                        r.len,
                        engine_stream.cu_stream(),
                    )
                });
                at += r.len as u64;
            }
        }
        CudaEvent::record(&cuda, &engine_stream).unwrap()
    };
    let pair = [(BlockId::new(0), BlockId::new(2))];

    // Control: the engine does not wait; it reads before the gated onboard runs.
    let gate = Gate::close(&producer);
    let held = CudaEvent::record(&cuda, &producer).unwrap();
    let handle = engine
        .copy_blocks(
            &host,
            &dev,
            &pair,
            &CopyOptions::default().waiting_for(held),
        )
        .unwrap();
    // Dropped before `handle` (whose drop waits for the gated copy) if an assertion fails.
    let _open = OpenOnDrop(&gate);
    let read = read_block_on_engine_stream();
    read.synchronize().unwrap(); // completes with the gate still closed
    assert!(!handle.is_complete());
    // The engine's read has landed in `readback`; the gate opens before the readback
    // (`dtoh` synchronizes the whole context, which waits for the gated stream too).
    gate.open();
    assert!(
        dtoh(&cuda, readback.addr(), stale.len()) == stale,
        "without the wait, the engine read the stale block (the test can tell)"
    );
    handle.wait().unwrap();
    common::fill(&dev, 43); // stale again

    // With the wait on the completion event.
    let gate = Gate::close(&producer);
    let held = CudaEvent::record(&cuda, &producer).unwrap();
    let handle = engine
        .copy_blocks(
            &host,
            &dev,
            &pair,
            &CopyOptions::default().waiting_for(held),
        )
        .unwrap();
    let _open = OpenOnDrop(&gate);
    let done = handle.completion_event().expect("a GPU copy has an event");
    done.wait_on(&engine_stream).unwrap();
    let read = read_block_on_engine_stream();
    assert!(
        !read.is_complete(),
        "the engine's read must wait for the onboard"
    );
    assert!(!handle.is_complete());
    gate.open();
    read.synchronize().unwrap();
    assert!(
        dtoh(&cuda, readback.addr(), fresh.len()) == fresh,
        "the engine must read the onboarded bytes"
    );
    handle.wait().unwrap();
    // The event outlives the handle, and the engine may still wait on it.
    assert!(done.is_complete());
    done.wait_on(&engine_stream).unwrap();
    engine_stream.synchronize().unwrap();
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn completion_events_are_not_reused_while_held() {
    let cuda = gpu();
    let engine = TransferEngine::with_cuda(cuda.clone());
    let c = common::shapes()[1];
    let src = Layout::device(LayoutKind::LayerSeparate, c, &cuda)
        .unwrap()
        .into_shared();
    let dst = Layout::pinned(LayoutKind::FullyContiguous, c, &cuda)
        .unwrap()
        .into_shared();
    common::fill(&src, 51);
    let copy = |s: u32, d: u32| {
        engine
            .copy_blocks(
                &src,
                &dst,
                &[(BlockId::new(s), BlockId::new(d))],
                &CopyOptions::default(),
            )
            .unwrap()
    };
    let first = copy(0, 0);
    let held = first.completion_event().unwrap();
    first.wait().unwrap();
    let second = copy(1, 1);
    let other = second.completion_event().unwrap();
    assert_ne!(held, other, "a held event was handed to another transfer");
    second.wait().unwrap();
    let raws = [held.as_raw(), other.as_raw()];
    drop((held, other));
    // Both back in the pool: the next transfer reuses one of them.
    let third = copy(2, 2);
    let reused = third.completion_event().unwrap().as_raw();
    third.wait().unwrap();
    assert!(raws.contains(&reused));
    assert!(cuda.events_created() <= 2, "{}", cuda.events_created());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn host_copies_refuse_events_and_change_nothing() {
    let cuda = gpu();
    let c = common::shapes()[1];
    let src = Layout::system(LayoutKind::LayerSeparate, c)
        .unwrap()
        .into_shared();
    let dst = Layout::system(LayoutKind::FullyContiguous, c)
        .unwrap()
        .into_shared();
    common::fill(&src, 61);
    let before = common::fill(&dst, 62);
    let stream = cuda.context().new_stream().unwrap();
    let event = CudaEvent::record(&cuda, &stream).unwrap();
    for engine in [
        TransferEngine::host(),
        TransferEngine::with_cuda(cuda.clone()),
    ] {
        let err = engine
            .copy_blocks(
                &src,
                &dst,
                &[(BlockId::new(0), BlockId::new(1))],
                &CopyOptions::default().waiting_for(event.clone()),
            )
            .unwrap_err();
        assert!(
            matches!(
                err,
                TransferError::Unsupported {
                    strategy: Strategy::Memcpy,
                    ..
                }
            ),
            "{err:?}"
        );
    }
    for (b, image) in before.iter().enumerate() {
        assert_eq!(&common::read(&dst, b), image);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn engine_tensors_must_be_the_memory_they_claim() {
    let cuda = gpu();
    let spec = specs()[0];
    let c = spec.config();
    let make = |memory: MemoryKind, base: u64| {
        let tensors = spec.tensors(base);
        // SAFETY: every accepted case describes live memory of the test that outlives the
        // layout (dropped at once); refused ones build nothing.
        unsafe { Layout::from_engine(spec.format, c, memory, &tensors, Some(cuda.clone())) }
    };
    let device = DeviceStorage::new(&cuda, spec.arena_bytes()).unwrap();
    let pinned = PinnedStorage::new(&cuda, spec.arena_bytes()).unwrap();
    let system = SystemStorage::new(spec.arena_bytes()).unwrap();
    assert!(make(DEV, device.addr()).is_ok());
    assert!(make(MemoryKind::Pinned, pinned.addr()).is_ok());
    assert!(make(MemoryKind::System, pinned.addr()).is_ok());
    assert!(make(MemoryKind::System, system.addr()).is_ok());
    let wrong = |r: Result<Layout, LayoutError>| match r {
        Err(LayoutError::Tensor {
            error: TensorError::WrongMemory { found, .. },
            ..
        }) => found,
        other => panic!("expected WrongMemory, got {other:?}"),
    };
    assert_eq!(
        wrong(make(MemoryKind::Pinned, device.addr())),
        PointerKind::Device { ordinal: 0 }
    );
    // Plain host memory: unknown to CUDA (or, on a driver with HMM, host memory).
    assert!(matches!(
        wrong(make(DEV, system.addr())),
        PointerKind::Unregistered | PointerKind::Host
    ));
    assert_eq!(wrong(make(DEV, pinned.addr())), PointerKind::Host);
    assert!(matches!(
        wrong(make(MemoryKind::System, device.addr())),
        PointerKind::Device { .. }
    ));
    // Device memory with a handle to another device is refused before any driver query.
    assert!(matches!(
        // SAFETY: refused before anything is built.
        unsafe {
            Layout::from_engine(
                spec.format,
                c,
                MemoryKind::Device { ordinal: 7 },
                &spec.tensors(device.addr()),
                Some(cuda.clone()),
            )
        },
        Err(LayoutError::DeviceMismatch { memory: 7, cuda: 0 })
    ));
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn held_completion_events_are_never_handed_out_again_across_threads() {
    // Eight threads copy their own blocks, each keeping its last few completion events
    // alive and dropping them in turn. A set of every held event, shared by all threads,
    // must never already contain a transfer's new event: the pool hands out an event only
    // once every clone is gone. (An event leaves the set before its last clone drops.)
    use std::collections::{HashSet, VecDeque};
    let cuda = gpu();
    let engine = TransferEngine::with_cuda(cuda.clone());
    let c = kvbm_physical::LayoutConfig {
        num_blocks: 16,
        ..common::shapes()[1]
    };
    let src = Layout::device(LayoutKind::LayerSeparate, c, &cuda)
        .unwrap()
        .into_shared();
    let dst = Layout::pinned(LayoutKind::FullyContiguous, c, &cuda)
        .unwrap()
        .into_shared();
    let images = common::fill(&src, 71);
    let held: Mutex<HashSet<usize>> = Mutex::new(HashSet::new());
    std::thread::scope(|s| {
        for t in 0..8u32 {
            let (engine, src, dst, held) = (&engine, &src, &dst, &held);
            s.spawn(move || {
                let mut mine: VecDeque<CudaEvent> = VecDeque::new();
                for i in 0..200u32 {
                    let (from, to) = (t * 2 + i % 2, t * 2 + (i + 1) % 2);
                    let handle = engine
                        .copy_blocks(
                            src,
                            dst,
                            &[(BlockId::new(from), BlockId::new(to))],
                            &CopyOptions::default(),
                        )
                        .unwrap();
                    let event = handle.completion_event().unwrap();
                    assert!(
                        held.lock().unwrap().insert(event.as_raw() as usize),
                        "thread {t}: an event still held was handed to another transfer"
                    );
                    mine.push_back(event);
                    handle.wait().unwrap();
                    if mine.len() > 3 {
                        let old = mine.pop_front().unwrap();
                        held.lock().unwrap().remove(&(old.as_raw() as usize));
                        drop(old);
                    }
                }
                for old in mine {
                    held.lock().unwrap().remove(&(old.as_raw() as usize));
                }
            });
        }
    });
    for t in 0..16 {
        assert!(common::read(&dst, t) == images[t ^ 1], "block {t}");
    }
}
