//! The tier stack on a GPU: device G1 over pinned G2 — G1 allocated by kvbm, and G1 over an
//! engine-owned outer-first tensor (`Layout::from_engine`) — with the engine's writes on its
//! own stream ordered only by CUDA events. Run on a GPU machine: `../shared/gpu/bundle`, then
//! `bash .gpu/run-all.sh` (runs ignored tests), or
//! `cargo test -p kvbm-physical --test stack_gpu -- --ignored`.
//!
//! The engine's stream is gated with a host function that blocks until the test opens the
//! gate, so "the engine's write has not happened yet" is a fact, not a race. Each ordering
//! check runs its negative control first (no event: the offload copies the stale block), so
//! the test can tell. Bytes are fresh random data per run, compared against the CPU
//! reference: the image written, and for the engine's tensor its own index formula.

#![cfg(feature = "cuda")]

mod common;
mod cuda_util;
mod engine_spec;

use cuda_util::{Gate, dtoh, gpu, htod, ok};
use cudarc::driver::{CudaStream, sys};
use engine_spec::Spec;
use kvbm_logical::{BlockId, BlockManager, Device, Host, ImmutableBlock, SequenceHash};
use kvbm_physical::stack::{EngineSync, TierId, TierStack, Watermarks, WriteMode};
use kvbm_physical::{
    CudaDevice, CudaEvent, DeviceStorage, EngineFormat, Layout, LayoutConfig, LayoutKind,
    MemoryKind, TransferEngine,
};

const DEV: MemoryKind = MemoryKind::Device { ordinal: 0 };

/// A seed that differs from run to run: fresh random data, never a fixed pattern.
fn fresh_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    t.as_nanos() as u64 ^ u64::from(std::process::id()) << 32
}

/// Where G1 lives.
#[derive(Clone, Copy, Debug, PartialEq)]
enum G1 {
    /// Device memory kvbm allocated (layer-separate).
    Kvbm,
    /// The engine's own outer-first tensors (vLLM FlashAttention), one per layer.
    EngineOuterFirst,
}

/// The engine's KV shape: 4 G1 blocks, 3 layers, K and V, 16 tokens × 2 heads × 64 × 2 bytes
/// (4 KiB pages).
fn spec() -> Spec {
    Spec {
        format: EngineFormat::OuterFirst,
        num_blocks: 4,
        num_layers: 3,
        outer_dim: 2,
        page: 16,
        heads: 2,
        head_dim: 64,
        dtype: 2,
        hnd: false,
        pad: 0,
        gap: 0,
        interleaved: false,
    }
}

struct Rig {
    cuda: CudaDevice,
    kind: G1,
    stack: TierStack,
    /// A back door to G2 (tests only): to find a hash's G2 block and read it.
    m2: BlockManager<Host>,
    /// The engine's allocation, for [`G1::EngineOuterFirst`] (outlives the stack: declared
    /// after it).
    arena: Option<DeviceStorage>,
}

impl Rig {
    fn new(kind: G1, mode: WriteMode) -> Self {
        let cuda = gpu();
        let s = spec();
        let c = s.config();
        let (g1, arena) = match kind {
            G1::Kvbm => (
                Layout::allocate(LayoutKind::LayerSeparate, c, DEV, Some(&cuda)).unwrap(),
                None,
            ),
            G1::EngineOuterFirst => {
                let arena = DeviceStorage::new(&cuda, s.arena_bytes()).unwrap();
                // SAFETY: the tensors lie in `arena`, which the rig keeps until after the
                // stack (and with it the layout and every transfer) is gone; only the stack's
                // copies and the test's engine stream write it, ordered by events.
                let layout = unsafe {
                    Layout::from_engine(
                        s.format,
                        c,
                        DEV,
                        &s.tensors(arena.addr()),
                        Some(cuda.clone()),
                    )
                }
                .unwrap();
                (layout, Some(arena))
            }
        };
        let m2 = BlockManager::<Host>::builder()
            .block_count(8)
            .block_size(s.page)
            .build()
            .unwrap();
        let stack = TierStack::builder()
            .g1(
                BlockManager::<Device>::builder()
                    .block_count(c.num_blocks)
                    .block_size(s.page)
                    .build()
                    .unwrap(),
                g1.into_shared(),
            )
            .g2(
                m2.clone(),
                Layout::pinned(
                    LayoutKind::FullyContiguous,
                    LayoutConfig { num_blocks: 8, ..c },
                    &cuda,
                )
                .unwrap()
                .with_checksums()
                .unwrap()
                .into_shared(),
            )
            .engine(TransferEngine::with_cuda(cuda.clone()))
            .write_mode(mode)
            .workers(1)
            .build()
            .unwrap();
        Self {
            cuda,
            kind,
            stack,
            m2,
            arena,
        }
    }

    fn block_bytes(&self) -> usize {
        spec().config().block_bytes().unwrap()
    }

    /// The device address of page `(layer, outer)` of G1 block `b`: for the engine's tensor,
    /// from the spec's own index formula (not kvbm's mapping); else kvbm's region.
    fn page(&self, b: BlockId, layer: usize, outer: usize) -> u64 {
        match (&self.arena, self.kind) {
            (Some(arena), G1::EngineOuterFirst) => {
                arena.addr() + spec().engine_byte(b.index(), layer, outer, [0, 0, 0], 0) as u64
            }
            _ => {
                self.stack
                    .g1()
                    .layout()
                    .region(b, layer, outer)
                    .unwrap()
                    .addr
            }
        }
    }

    /// Pages of a block in image order, with their offsets in the image.
    fn pages(&self, b: BlockId) -> Vec<(u64, usize)> {
        let c = spec().config();
        let region = c.region_bytes().unwrap();
        let mut out = Vec::new();
        for l in 0..c.num_layers {
            for o in 0..c.outer_dim {
                out.push((self.page(b, l, o), (l * c.outer_dim + o) * region));
            }
        }
        out
    }

    /// The engine writes `src` (a device copy of a block image) into G1 block `b` on
    /// `stream` — asynchronously, behind whatever the stream holds.
    fn engine_write(&self, stream: &CudaStream, src: &DeviceStorage, b: BlockId) {
        let region = spec().config().region_bytes().unwrap();
        for (page, at) in self.pages(b) {
            // SAFETY: both ranges are live device memory (the scratch image, a G1 page); the
            // stream is live.
            ok("cuMemcpyDtoDAsync", unsafe {
                sys::cuMemcpyDtoDAsync_v2(page, src.addr() + at as u64, region, stream.cu_stream())
            });
        }
    }

    /// The engine reads G1 block `b` into `dst` on `stream`.
    fn engine_read(&self, stream: &CudaStream, b: BlockId, dst: &DeviceStorage) {
        let region = spec().config().region_bytes().unwrap();
        for (page, at) in self.pages(b) {
            // SAFETY: as in `engine_write`.
            ok("cuMemcpyDtoDAsync", unsafe {
                sys::cuMemcpyDtoDAsync_v2(dst.addr() + at as u64, page, region, stream.cu_stream())
            });
        }
    }

    /// G2's copy of `hash`.
    fn g2_image(&self, hash: SequenceHash) -> Vec<u8> {
        let held = self.m2.match_blocks(&[hash]);
        assert_eq!(held.len(), 1, "{hash:?} is not in G2");
        common::read(self.stack.g2().layout(), held[0].block_id().index())
    }

    /// Registers `block` as `hash` with `sync`; under write-back also releases it and wakes
    /// the reclaimer, whose copy then reads the slot. Returns the handle under write-through.
    fn offload(
        &self,
        block: kvbm_logical::MutableBlock<Device>,
        hash: SequenceHash,
        sync: EngineSync,
    ) -> Vec<ImmutableBlock<Device>> {
        let staged = vec![block.stage(hash, spec().page).unwrap()];
        let registered = self.stack.register(staged, sync).unwrap();
        match self.stack.write_mode() {
            WriteMode::WriteThrough => registered,
            _ => {
                ImmutableBlock::release_all(registered);
                drop(self.stack.allocate(0).unwrap()); // below the low watermark: reclaim
                Vec::new()
            }
        }
    }
}

const MODES: [WriteMode; 2] = [
    WriteMode::WriteThrough,
    WriteMode::WriteBack(Watermarks { low: 4, high: 4 }),
];

/// The engine writes a block on its own stream behind a closed gate and registers it with
/// the event it recorded after the write; the offload cannot land before the gate opens, and
/// then G2 holds exactly the engine's bytes. The block is then evicted and onboarded again;
/// the engine's stream waits for the onboard's completion event and reads the block: the
/// engine's bytes again (and, for the engine's tensor, at the places its own index formula
/// says).
fn engine_writes_are_offloaded_after_their_event_and_read_back_after_the_onboards(kind: G1) {
    for mode in MODES {
        let rig = Rig::new(kind, mode);
        let t = &rig.stack;
        let cuda = &rig.cuda;
        let bytes = rig.block_bytes();
        let seed = fresh_seed();
        let stream = cuda.context().new_stream().unwrap();
        let scratch = DeviceStorage::new(cuda, bytes).unwrap();

        // Control: registered without the event, the offload copies the stale block.
        let control = SequenceHash::new((seed & !3) | 1); // never equal to `hash` below
        let stale = common::pattern(seed ^ 0x57a1e, bytes);
        let fresh = common::pattern(seed, bytes);
        assert_ne!(stale, fresh);
        htod(cuda, scratch.addr(), &fresh);
        let block = t.allocate(1).unwrap().pop().unwrap();
        t.g1()
            .layout()
            .write_block(block.block_id(), &stale)
            .unwrap();
        let gate = Gate::close(&stream);
        rig.engine_write(&stream, &scratch, block.block_id());
        let held = rig.offload(block, control, EngineSync::Ready);
        t.flush(); // returns with the engine's stream still gated: nothing waited for it
        assert!(
            rig.g2_image(control) == stale,
            "{kind:?} {mode:?}: without the event the offload read the stale block (the test can tell)"
        );
        gate.open();
        stream.synchronize().unwrap();
        drop(held);
        common::stack_flush_g1(t);
        t.flush();

        // With the engine's event.
        let hash = SequenceHash::new((seed & !3) | 2);
        let fresh = common::pattern(seed.rotate_left(17), bytes);
        htod(cuda, scratch.addr(), &fresh);
        let block = t.allocate(1).unwrap().pop().unwrap();
        let id = block.block_id();
        t.g1().layout().write_block(id, &stale).unwrap();
        let gate = Gate::close(&stream);
        rig.engine_write(&stream, &scratch, id);
        let written = CudaEvent::record(cuda, &stream).unwrap();
        assert!(!written.is_complete());
        let held = rig.offload(block, hash, EngineSync::Event(written));
        // The scheduler's calls returned; the offload job cannot finish before the gate opens.
        let st = t.stats();
        assert!(
            st.queued_jobs + st.running_jobs >= 1,
            "{kind:?} {mode:?}: the offload must wait for the engine's event: {st:?}"
        );
        assert!(!t.g2().contains(hash));
        gate.open();
        t.flush();
        assert!(
            rig.g2_image(hash) == fresh,
            "{kind:?} {mode:?}: G2 must hold the bytes the engine wrote before its event"
        );
        assert_eq!(
            t.stats().tier(TierId::G2).unwrap().lost,
            0,
            "{kind:?} {mode:?}"
        );
        drop(held);

        // Evict it from G1 (scribbling on every free slot), onboard it, and let the engine
        // read it after the onboard's event.
        common::stack_flush_g1(t);
        t.flush();
        assert!(!t.g1().contains(hash));
        let done = t.onboard(t.lookup(&[hash]), usize::MAX).unwrap().wait();
        assert_eq!((done.onboarded, done.blocks.len()), (1, 1), "{done:?}");
        let event = done
            .sync
            .event()
            .expect("a GPU onboard hands the engine an event")
            .clone();
        event.wait_on(&stream).unwrap();
        let readback = DeviceStorage::new(cuda, bytes).unwrap();
        rig.engine_read(&stream, done.blocks[0].block_id(), &readback);
        stream.synchronize().unwrap();
        assert!(
            dtoh(cuda, readback.addr(), bytes) == fresh,
            "{kind:?} {mode:?}: the engine must read the onboarded bytes"
        );
        if let Some(arena) = &rig.arena {
            // The CPU reference: every element of the block where the engine's tensor keeps
            // it, against where the fully contiguous image has it.
            let s = spec();
            let all = dtoh(cuda, arena.addr(), s.arena_bytes());
            let b = done.blocks[0].block_id().index();
            for l in 0..s.num_layers {
                for o in 0..s.outer_dim {
                    for idx in s.page_indices() {
                        for e in 0..s.dtype {
                            assert_eq!(
                                all[s.engine_byte(b, l, o, idx, e)],
                                fresh[s.fc_byte(0, l, o, idx, e)],
                                "{mode:?}: layer {l} outer {o} element {idx:?}"
                            );
                        }
                    }
                }
            }
        }
        assert!(
            common::read(t.g1().layout(), done.blocks[0].block_id().index()) == fresh,
            "{kind:?} {mode:?}: G1 holds the engine's bytes"
        );
        drop(done);
        common::assert_stack_idle(t);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn kvbm_device_g1_orders_offload_and_onboard_by_events() {
    engine_writes_are_offloaded_after_their_event_and_read_back_after_the_onboards(G1::Kvbm);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn engine_outer_first_g1_orders_offload_and_onboard_by_events() {
    engine_writes_are_offloaded_after_their_event_and_read_back_after_the_onboards(
        G1::EngineOuterFirst,
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn stack_device_over_pinned() {
    // Host-written blocks (the engine synchronised), both write modes, both G1 kinds.
    for kind in [G1::Kvbm, G1::EngineOuterFirst] {
        for mode in MODES {
            let rig = Rig::new(kind, mode);
            let t = &rig.stack;
            // Fresh random bytes per hash (never zeros), written to device memory.
            let base = fresh_seed() & !0xff;
            let hashes: Vec<SequenceHash> = (1..=4).map(|i| SequenceHash::new(base + i)).collect();
            ImmutableBlock::release_all(common::stack_compute(t, &hashes, 0));
            t.flush();
            // Evict: write-through by a direct allocation, write-back through the reclaimer.
            match mode {
                WriteMode::WriteThrough => common::stack_flush_g1(t),
                // Asks for a reclaim (below the low watermark) without taking a block: a
                // direct eviction here would be a reclaim-behind, never copied to G2.
                _ => drop(t.allocate(0).unwrap()),
            }
            t.flush();
            assert!(
                hashes.iter().all(|&h| t.g2().contains(h)),
                "{kind:?} {mode:?}"
            );
            let m = t.onboard(t.lookup(&hashes), usize::MAX).unwrap().wait();
            assert!(
                m.end.is_none() && m.lost.is_empty(),
                "{kind:?} {mode:?}: {m:?}"
            );
            assert_eq!(m.blocks.len(), 4, "{kind:?} {mode:?}");
            assert!(m.sync.event().is_some(), "a GPU onboard carries its event");
            common::assert_stack_kv(t, &m.blocks);
            assert_eq!(t.stats().tier(TierId::G2).unwrap().onboarded, 4);
            drop(m);
            common::assert_stack_idle(t);
        }
    }
}
