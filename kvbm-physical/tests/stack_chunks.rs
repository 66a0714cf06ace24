//! Onboarding from a store tier in chunks, through the stack's public API: the reads of a
//! later chunk overlap the copy up of an earlier one; blocks read from the disk tier land in
//! place in G2's memory (no bounce, no heap copy) and offloads write from G2's memory in
//! place; G2 layouts without block views fall back to a buffer, byte-exact; and every
//! failure rule holds across chunks (a corrupt block in a later chunk ends the prefix there
//! and is reported; a miss stops the reads; a cancel returns every slot), also with onboards
//! running concurrently while G1 and G2 are emptied behind their backs.
//!
//! Blocks are 128 KiB, so an onboard reads 32 store blocks per chunk.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::{
    Gate, MemStore, OpenOnDrop, assert_stack_idle, assert_stack_kv, chain, stack_compute,
    stack_flush_g1,
};
use kvbm_logical::{BlockId, BlockManager, Device, Host, ImmutableBlock, SequenceHash};
use kvbm_physical::disk::{Capacity, DiskTier};
use kvbm_physical::stack::{EndReason, LostCause, Onboarded, StoreTierConfig, TierId, TierStack};
use kvbm_physical::{
    FaultInjector, GetOutcome, Layout, LayoutConfig, LayoutKind, MemoryKind, PutOutcome,
    StoreBlock, StoreStats, StoreTier, TransferEngine,
};
use parking_lot::{Condvar, Mutex};

const PAGE: usize = 16;
/// Blocks per onboard: two chunks of 32.
const N: usize = 64;

/// 4 layers × K,V × 16 tokens × 512 elements × 2 bytes = 128 KiB.
fn shape(num_blocks: usize) -> LayoutConfig {
    LayoutConfig {
        num_blocks,
        num_layers: 4,
        outer_dim: 2,
        page_size: PAGE,
        inner_dim: 512,
        dtype_bytes: 2,
    }
}

fn block_bytes() -> usize {
    shape(1).block_bytes().unwrap()
}

/// A stack of G1 (`N` blocks, layer-separate), G2 (`2N`, `g2_kind`, checksummed) and
/// `store`; returns it and a back door to G2's manager.
fn stack(
    store: Arc<dyn StoreTier>,
    g2_kind: LayoutKind,
    faults: Option<Arc<dyn FaultInjector>>,
) -> (TierStack, BlockManager<Host>) {
    let (stack, _, m2) = stack_sized(store, g2_kind, faults, N, 2 * N);
    (stack, m2)
}

fn stack_sized(
    store: Arc<dyn StoreTier>,
    g2_kind: LayoutKind,
    faults: Option<Arc<dyn FaultInjector>>,
    g1: usize,
    g2: usize,
) -> (TierStack, BlockManager<Device>, BlockManager<Host>) {
    let m1 = BlockManager::<Device>::builder()
        .block_count(g1)
        .block_size(PAGE)
        .build()
        .unwrap();
    let m2 = BlockManager::<Host>::builder()
        .block_count(g2)
        .block_size(PAGE)
        .build()
        .unwrap();
    let mut engine = TransferEngine::host();
    if let Some(f) = faults {
        engine = engine.with_faults(f);
    }
    let stack = TierStack::builder()
        .g1(
            m1.clone(),
            Layout::system(LayoutKind::LayerSeparate, shape(g1))
                .unwrap()
                .into_shared(),
        )
        .g2(
            m2.clone(),
            Layout::system(g2_kind, shape(g2))
                .unwrap()
                .with_checksums()
                .unwrap()
                .into_shared(),
        )
        .store(StoreTierConfig::new(store))
        .engine(engine)
        .workers(2)
        .build()
        .unwrap();
    (stack, m1, m2)
}

/// Computes `hashes` in G1, lets them reach the store, then empties G1 and G2.
fn only_in_store(s: &TierStack, m2: &BlockManager<Host>, hashes: &[SequenceHash]) {
    ImmutableBlock::release_all(stack_compute(s, hashes, 0));
    s.flush();
    stack_flush_g1(s);
    drop(m2.allocate_blocks(m2.available_blocks()).unwrap());
    assert_eq!(s.g2().counts().inactive, 0);
    assert_eq!(s.lookup(hashes).blocks_needed(), hashes.len());
}

/// A stack over a [`Watched`] store (G2 fully contiguous, no fault injection), and chain
/// `seed` of `N` blocks, only in the store.
fn watched_chain(seed: u64) -> (Arc<Watched>, TierStack, Vec<SequenceHash>) {
    watched_chain_of(seed, N)
}

/// [`watched_chain`] of `n` blocks.
fn watched_chain_of(seed: u64, n: usize) -> (Arc<Watched>, TierStack, Vec<SequenceHash>) {
    let store = Arc::new(Watched::new());
    let (t, m2) = stack(store.clone(), LayoutKind::FullyContiguous, None);
    let hashes = chain(seed, n);
    only_in_store(&t, &m2, &hashes);
    (store, t, hashes)
}

/// A gate that the store's read of `last` waits at (see [`Watched`]).
fn gate_read_of(store: &Watched, last: SequenceHash) -> Arc<Gate> {
    let gate = Arc::new(Gate::default());
    *store.last.lock() = Some(last);
    *store.gate.lock() = Some(gate.clone());
    gate
}

fn fetch(s: &TierStack, hashes: &[SequenceHash]) -> Onboarded {
    s.onboard(s.lookup(hashes), usize::MAX).unwrap().wait()
}

/// Counts copy batches and wakes whoever waits for one.
#[derive(Debug, Default)]
struct CopyProbe {
    batches: Mutex<u64>,
    copied: Condvar,
}

impl CopyProbe {
    fn batches(&self) -> u64 {
        *self.batches.lock()
    }

    /// Waits until more than `seen` batches were copied, or `limit` passed (a guard against
    /// a hang, not an ordering): whether they were.
    fn wait_beyond(&self, seen: u64, limit: Duration) -> bool {
        let mut n = self.batches.lock();
        let deadline = std::time::Instant::now() + limit;
        while *n <= seen {
            if self.copied.wait_until(&mut n, deadline).timed_out() {
                break;
            }
        }
        *n > seen
    }
}

impl FaultInjector for CopyProbe {
    fn failed_pairs(&self, _: MemoryKind, _: MemoryKind, _: &[(BlockId, BlockId)]) -> Vec<usize> {
        *self.batches.lock() += 1;
        self.copied.notify_all();
        Vec::new()
    }
}

/// A [`MemStore`] whose gets that ask for `last` first wait for a copy batch beyond
/// `baseline` (recording whether one came), or pass a gate.
#[derive(Debug)]
struct Watched {
    inner: MemStore,
    last: Mutex<Option<SequenceHash>>,
    probe: Mutex<Option<(Arc<CopyProbe>, u64)>>,
    gate: Mutex<Option<Arc<Gate>>>,
    overlapped: AtomicBool,
    gets: AtomicUsize,
    /// A get panics (a misbehaving store tier).
    panics: AtomicBool,
}

impl Watched {
    fn new() -> Self {
        Self {
            inner: MemStore::new(block_bytes(), 4 * N),
            last: Mutex::new(None),
            probe: Mutex::new(None),
            gate: Mutex::new(None),
            overlapped: AtomicBool::new(false),
            gets: AtomicUsize::new(0),
            panics: AtomicBool::new(false),
        }
    }
}

impl StoreTier for Watched {
    fn medium(&self) -> &'static str {
        "WATCHED"
    }

    fn block_bytes(&self) -> usize {
        self.inner.block_bytes()
    }

    fn contains(&self, hashes: &[SequenceHash]) -> Vec<bool> {
        self.inner.contains(hashes)
    }

    fn put(&self, blocks: &[StoreBlock<'_>]) -> Vec<PutOutcome> {
        self.inner.put(blocks)
    }

    fn get(&self, hashes: &[SequenceHash], out: &mut [&mut [u8]]) -> Vec<GetOutcome> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        assert!(
            !self.panics.load(Ordering::SeqCst),
            "a store tier that panics"
        );
        let last = *self.last.lock();
        if last.is_some_and(|l| hashes.contains(&l)) {
            let probe = self.probe.lock().clone();
            if let Some((probe, seen)) = probe
                && probe.wait_beyond(seen, Duration::from_secs(20))
            {
                self.overlapped.store(true, Ordering::SeqCst);
            }
            let gate = self.gate.lock().clone();
            if let Some(g) = gate {
                g.pass();
            }
        }
        self.inner.get(hashes, out)
    }

    fn remove(&self, hashes: &[SequenceHash]) {
        self.inner.remove(hashes)
    }

    fn stats(&self) -> StoreStats {
        self.inner.stats()
    }
}

#[test]
fn the_last_chunk_is_read_while_the_first_is_copied_up() {
    let probe = Arc::new(CopyProbe::default());
    let store = Arc::new(Watched::new());
    let (t, m2) = stack(
        store.clone(),
        LayoutKind::FullyContiguous,
        Some(probe.clone()),
    );
    let hashes = chain(1, N);
    only_in_store(&t, &m2, &hashes);
    // The read of the last block waits until a copy up to G1 has happened: with one read
    // for the whole onboard, none can have (the wait gives up after a while and says so).
    *store.last.lock() = Some(hashes[N - 1]);
    *store.probe.lock() = Some((probe.clone(), probe.batches()));
    let done = fetch(&t, &hashes);
    assert!(
        store.overlapped.load(Ordering::SeqCst),
        "no copy up before the last read"
    );
    assert_eq!(
        (done.onboarded, done.end.clone()),
        (N, None),
        "{:?}",
        done.end
    );
    assert_stack_kv(&t, &done.blocks);
    assert_eq!(store.gets.load(Ordering::SeqCst), 2, "one get per chunk");
    drop(done);
    assert_stack_idle(&t);
}

#[test]
fn a_corrupt_block_in_a_later_chunk_ends_the_prefix_there_and_is_reported() {
    let (store, t, hashes) = watched_chain(2);
    store.inner.corrupt(hashes[40]);
    let done = fetch(&t, &hashes);
    assert_eq!(done.onboarded, 40);
    let end = done.end.clone().unwrap();
    assert_eq!(
        (end.at, end.reason),
        (
            40,
            EndReason::Lost {
                tier: TierId::Store(0)
            }
        )
    );
    assert_eq!(done.lost.len(), 1, "{:?}", done.lost);
    assert_eq!(
        (done.lost[0].hash, &done.lost[0].cause),
        (hashes[40], &LostCause::Corrupt)
    );
    assert!(!store.inner.holds(hashes[40]), "removed from the store");
    assert_stack_kv(&t, &done.blocks);
    // G2 holds the staged prefix, and nothing past it.
    assert!(hashes[..40].iter().all(|&h| t.g2().contains(h)));
    assert!(hashes[40..].iter().all(|&h| !t.g2().contains(h)));
    drop(done);
    assert_stack_idle(&t);
    // Never retried: the next lookup stops before it.
    assert_eq!(t.lookup(&hashes).len(), 40);
}

#[test]
fn a_miss_in_the_first_chunk_stops_the_reads_there() {
    let (store, t, hashes) = watched_chain(3);
    let plan = t.lookup(&hashes);
    assert_eq!(plan.len(), N);
    store.inner.evict(hashes[5]); // gone from the store after the lookup saw it
    let done = t.onboard(plan, usize::MAX).unwrap().wait();
    let end = done.end.clone().unwrap();
    assert_eq!(
        (done.onboarded, end.at, end.reason),
        (
            5,
            5,
            EndReason::Miss {
                tier: TierId::Store(0)
            }
        )
    );
    assert_eq!(
        store.gets.load(Ordering::SeqCst),
        1,
        "the second chunk is never read"
    );
    assert_stack_kv(&t, &done.blocks);
    drop(done);
    assert_stack_idle(&t);
}

#[test]
fn cancelling_while_a_later_chunk_is_read_returns_every_slot() {
    let (store, t, hashes) = watched_chain(4);
    let gate = gate_read_of(&store, hashes[N - 1]);
    let pending = t.onboard(t.lookup(&hashes), usize::MAX).unwrap();
    gate.wait_arrivals(1); // the second chunk's read has started
    drop(pending); // cancel
    gate.open();
    assert_stack_idle(&t);
    assert_eq!(t.g1().counts().inactive, 0, "nothing registered in G1");
    assert_eq!(t.stats().cancelled, 1);
    // The chunk read after the cancel was handed back unused: neither staged in G2 nor
    // copied up.
    assert!(
        !t.g2().contains(hashes[N - 1]),
        "a chunk was staged after the cancel"
    );
}

#[test]
fn an_onboard_stages_store_blocks_in_g2_sixteen_at_a_time() {
    // The worker takes G2's lock for at most 16 blocks: one Stored batch per step.
    let (store, t, hashes) = watched_chain(10);
    let sub = t.g2().subscribe(1024);
    let done = fetch(&t, &hashes);
    assert_eq!((done.onboarded, done.end.clone()), (N, None));
    let mut stored = Vec::new();
    for batch in sub.drain() {
        let n: usize = batch
            .iter()
            .map(|e| match &e.kind {
                kvbm_logical::KvEventKind::Stored { block_hashes, .. } => block_hashes.len(),
                _ => 0,
            })
            .sum();
        if n > 0 {
            stored.push(n);
        }
    }
    assert_eq!(stored.iter().sum::<usize>(), N, "{stored:?}");
    assert!(stored.iter().all(|&n| n <= 16), "{stored:?}");
    assert!(store.gets.load(Ordering::SeqCst) >= 1);
    drop(done);
    assert_stack_idle(&t);
}

#[test]
fn a_block_the_engine_registers_during_the_onboard_is_served_but_not_counted_onboarded() {
    // One chunk from the store; while its read waits at a gate, the engine computes the
    // same blocks into G1 itself. The job's registration then returns the engine's blocks
    // (duplicates are rejected): the prefix is whole, but nothing was onboarded by a copy.
    let (store, t, hashes) = watched_chain_of(12, 4);
    let gate = gate_read_of(&store, hashes[3]);
    let _open = OpenOnDrop(&gate);
    let before = t.stats();
    let pending = t.onboard(t.lookup(&hashes), usize::MAX).unwrap();
    gate.wait_arrivals(1);
    let engine = stack_compute(&t, &hashes, 0);
    let engine_ids: Vec<BlockId> = engine.iter().map(ImmutableBlock::block_id).collect();
    gate.open();
    let done = pending.wait();
    assert_eq!((done.blocks.len(), done.end.clone()), (4, None));
    assert_eq!(
        done.blocks
            .iter()
            .map(ImmutableBlock::block_id)
            .collect::<Vec<_>>(),
        engine_ids,
        "the engine's blocks"
    );
    assert_stack_kv(&t, &done.blocks);
    let onboarded =
        |s: &kvbm_physical::stack::StackStats| s.tiers.iter().map(|t| t.onboarded).sum::<u64>();
    assert_eq!(
        onboarded(&t.stats()),
        onboarded(&before),
        "no copy was used"
    );
    ImmutableBlock::release_all(engine);
    drop(done);
    assert_stack_idle(&t);
}

#[test]
fn cancelling_during_a_single_chunk_read_stages_nothing() {
    // One chunk: the worker reads it itself (no reader thread).
    let (store, t, hashes) = watched_chain_of(6, 4);
    let gate = gate_read_of(&store, hashes[3]);
    let pending = t.onboard(t.lookup(&hashes), usize::MAX).unwrap();
    gate.wait_arrivals(1); // the read has started
    drop(pending); // cancel
    gate.open();
    assert_stack_idle(&t);
    assert_eq!(t.stats().cancelled, 1);
    assert_eq!(t.g1().counts().inactive, 0, "nothing registered in G1");
    assert!(
        hashes.iter().all(|&h| !t.g2().contains(h)),
        "the chunk read during the cancel was staged in G2"
    );
}

#[test]
fn a_store_tier_that_panics_ends_the_prefix_as_aborted_and_leaks_nothing() {
    // A single chunk (read on the worker) and two (the second read on a reader thread).
    for (seed, n) in [(8, 4), (9, N)] {
        let (store, t, hashes) = watched_chain_of(seed, n);
        store.panics.store(true, Ordering::SeqCst);
        let panicked = t.stats().panicked_jobs;
        let done = fetch(&t, &hashes);
        let end = done.end.clone().expect("the job unwound: the prefix ends");
        assert_eq!(
            (done.blocks.len(), end.at, end.reason),
            (0, 0, EndReason::Aborted),
            "{n} blocks: {:?}",
            done.end
        );
        drop(done);
        // The worker survived the panic (counted) and every slot went back.
        assert_stack_idle(&t);
        assert_eq!(t.stats().panicked_jobs, panicked + 1);
        store.panics.store(false, Ordering::SeqCst);
        let done = fetch(&t, &hashes);
        assert_eq!((done.onboarded, done.end.clone()), (n, None));
        assert_stack_kv(&t, &done.blocks);
        drop(done);
        assert_stack_idle(&t);
    }
}

/// A disk tier of `slots` slots in `dir`, for 128 KiB blocks.
fn disk(dir: &std::path::Path) -> Arc<DiskTier> {
    Arc::new(
        DiskTier::builder()
            .path(dir.join("g3.kvbm"))
            .block_bytes(block_bytes())
            .capacity(Capacity::Blocks(4 * N as u32))
            .fingerprint(7)
            .open()
            .unwrap(),
    )
}

#[test]
fn disk_reads_land_in_place_in_g2_and_offloads_write_from_g2_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let tier = disk(dir.path());
    let (t, m2) = stack(tier.clone(), LayoutKind::FullyContiguous, None);
    let hashes = chain(5, N);
    only_in_store(&t, &m2, &hashes);
    let st = tier.disk_stats();
    assert_eq!(st.store.stored, N as u64);
    assert_eq!(
        (st.in_place_writes, st.bounce_writes),
        (N as u64, 0),
        "offloads write from G2's memory ({:?})",
        st.io_mode
    );
    let done = fetch(&t, &hashes);
    assert_eq!(done.onboarded, N, "{:?}", done.end);
    assert_stack_kv(&t, &done.blocks);
    let st = tier.disk_stats();
    assert_eq!(
        (st.in_place_reads, st.bounce_reads),
        (N as u64, 0),
        "reads land in G2's memory ({:?})",
        st.io_mode
    );
    // G2's checksums of the staged blocks were recorded: G2 serves them again, verified.
    drop(done);
    t.flush();
    stack_flush_g1(&t);
    let again = fetch(&t, &hashes);
    assert_eq!(again.onboarded, N);
    assert!(again.lost.is_empty(), "{:?}", again.lost);
    assert_stack_kv(&t, &again.blocks);
    drop(again);
    assert_stack_idle(&t);
}

#[test]
fn a_g2_without_block_views_goes_through_a_buffer_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    let tier = disk(dir.path());
    let (t, m2) = stack(tier.clone(), LayoutKind::LayerSeparate, None);
    let hashes = chain(6, N);
    only_in_store(&t, &m2, &hashes);
    assert_eq!(tier.disk_stats().store.stored, N as u64);
    let done = fetch(&t, &hashes);
    assert_eq!(done.onboarded, N, "{:?}", done.end);
    assert_stack_kv(&t, &done.blocks);
    drop(done);
    t.flush();
    stack_flush_g1(&t);
    // The staged copies in G2 verify against the checksums written with them.
    let again = fetch(&t, &hashes);
    assert_eq!(again.onboarded, N);
    assert!(again.lost.is_empty(), "{:?}", again.lost);
    drop(again);
    assert_stack_idle(&t);
}

#[test]
fn concurrent_chunked_onboards_serve_exact_bytes_and_leak_nothing() {
    const CHAINS: usize = 3;
    let store = Arc::new(Watched::new());
    let (t, m1, m2) = stack_sized(
        store.clone(),
        LayoutKind::FullyContiguous,
        None,
        CHAINS * N,
        2 * N,
    );
    let chains: Vec<Vec<SequenceHash>> = (0..CHAINS).map(|c| chain(10 + c as u64, N)).collect();
    for c in &chains {
        ImmutableBlock::release_all(stack_compute(&t, c, 0));
        t.flush();
    }
    assert!(chains.iter().flatten().all(|&h| store.inner.holds(h)));
    stack_flush_g1(&t);
    drop(m2.allocate_blocks(m2.available_blocks()).unwrap());
    let served = AtomicUsize::new(0);
    let finished = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for c in &chains {
            let (t, m1, m2, served, finished) = (&t, &m1, &m2, &served, &finished);
            scope.spawn(move || {
                // Six onboards that served something each (back-pressure, G1 taken by the
                // evicting thread or the others, is an answer, not a failure: try again),
                // so that the test exercises the reads however the threads are scheduled.
                let (mut served_here, mut attempts) = (0, 0);
                while served_here < 6 && attempts < 100_000 {
                    attempts += 1;
                    let Ok(pending) = t.onboard(t.lookup(c), usize::MAX) else {
                        std::thread::yield_now();
                        continue;
                    };
                    let done = pending.wait();
                    if !done.blocks.is_empty() {
                        served_here += 1;
                    }
                    // A prefix of the chain, every byte right, whatever ended it.
                    assert!(
                        done.blocks
                            .iter()
                            .zip(c.iter())
                            .all(|(b, &h)| b.sequence_hash() == h)
                    );
                    assert_stack_kv(t, &done.blocks);
                    served.fetch_add(done.blocks.len(), Ordering::Relaxed);
                    drop(done);
                    // Gone from G1 and G2 (as soon as no one holds them): the next onboard
                    // reads the chain from the store again.
                    m1.purge_blocks(c);
                    m2.purge_blocks(c);
                }
                finished.fetch_add(1, Ordering::SeqCst);
            });
        }
        // Meanwhile: G1 and G2 emptied behind the onboards' backs, and two store blocks
        // corrupted, so that onboards keep reading from the store and some end early.
        let (t, m2, store, chains, finished) = (&t, &m2, &store, &chains, &finished);
        scope.spawn(move || {
            let mut round = 0;
            while finished.load(Ordering::SeqCst) < CHAINS {
                round += 1;
                if round == 2 {
                    store.inner.corrupt(chains[0][45]);
                    store.inner.corrupt(chains[1][10]);
                }
                // Evict G1 (scribbling on the freed slots), then G2; the counts race with
                // the onboards, so a refused allocation just means "next round".
                if let Ok(blocks) = t.allocate(t.g1().available_blocks()) {
                    let junk = vec![0xEE; t.g1().layout().block_bytes()];
                    for b in &blocks {
                        t.g1().layout().write_block(b.block_id(), &junk).unwrap();
                    }
                }
                drop(
                    m2.allocate_blocks(m2.available_blocks())
                        .unwrap_or_default(),
                );
            }
        });
    });
    assert!(served.load(Ordering::Relaxed) > 0);
    assert!(
        store.gets.load(Ordering::SeqCst) > 1,
        "onboards read chunks from the store"
    );
    assert_stack_idle(&t);
}

#[test]
fn a_canceller_cancels_an_onboard_another_thread_waits_on() {
    // A request aborted while a worker thread of the server waits on its onboard: the
    // canceller stops it, the wait returns, nothing copied is registered, nothing leaks.
    let (store, t, hashes) = watched_chain_of(11, 4);
    let gate = gate_read_of(&store, hashes[3]);
    let _open = OpenOnDrop(&gate);
    let pending = t.onboard(t.lookup(&hashes), usize::MAX).unwrap();
    let cancel = pending.canceller();
    let waiter = std::thread::spawn(move || pending.wait());
    gate.wait_arrivals(1); // the read has started
    cancel.cancel();
    gate.open();
    let done = waiter.join().unwrap();
    assert_eq!((done.blocks.len(), done.onboarded), (0, 0), "{done:?}");
    assert!(done.spare.is_empty());
    drop(done);
    cancel.cancel(); // after the end: nothing
    assert_stack_idle(&t);
    assert_eq!(t.stats().cancelled, 1);
    assert_eq!(t.g1().counts().inactive, 0, "nothing registered in G1");
}

#[test]
fn a_canceller_kept_after_its_finished_onboard_is_dropped_holds_no_block() {
    // A server keeps the canceller with the request; the request is aborted after its
    // onboard finished, and the Pending dropped unread: its G1 blocks go back at once.
    let (_store, t, hashes) = watched_chain_of(12, 4);
    let pending = t.onboard(t.lookup(&hashes), usize::MAX).unwrap();
    let cancel = pending.canceller();
    t.flush();
    assert!(pending.is_ready());
    drop(pending);
    assert_stack_idle(&t);
    cancel.cancel(); // after the end: nothing
    drop(cancel);
    assert_stack_idle(&t);
}
