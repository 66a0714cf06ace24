//! Helpers shared by the kvbm-physical tests.
#![allow(dead_code, unreachable_pub)]

use kvbm_logical::{BlockId, Device, ImmutableBlock, SequenceHash};
use kvbm_physical::{Layout, LayoutConfig};

/// A small deterministic generator (splitmix64): fresh, non-zero-heavy data per seed.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes a distinct pattern (seeded by `salt` and the block id) into every block.
pub fn fill(layout: &Layout, salt: u64) -> Vec<Vec<u8>> {
    (0..layout.num_blocks())
        .map(|b| {
            let image = pattern(salt ^ (b as u64) << 20, layout.block_bytes());
            layout.write_block(BlockId::new(b as u32), &image).unwrap();
            image
        })
        .collect()
}

/// Reads block `b`'s image.
pub fn read(layout: &Layout, b: usize) -> Vec<u8> {
    let mut out = vec![0; layout.block_bytes()];
    layout.read_block(BlockId::new(b as u32), &mut out).unwrap();
    out
}

/// Shapes covering both outer dims, odd sizes and several layer counts.
pub fn shapes() -> Vec<LayoutConfig> {
    let mut out = Vec::new();
    for (num_layers, outer_dim, page_size, inner_dim, dtype_bytes) in [
        (1, 1, 1, 1, 1),
        (2, 2, 4, 8, 2),
        (3, 1, 5, 7, 1),
        (4, 2, 16, 64, 2),
        (7, 2, 3, 33, 4),
    ] {
        out.push(LayoutConfig {
            num_blocks: 9,
            num_layers,
            outer_dim,
            page_size,
            inner_dim,
            dtype_bytes,
        });
    }
    out
}

// ---- Tier stack helpers ----------------------------------------------------------------

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use kvbm_logical::MutableBlock;
use kvbm_physical::stack::{EngineSync, TierStack};
use kvbm_physical::{
    FaultInjector, GetOutcome, MemoryKind, PutOutcome, SkipReason, StoreBlock, StoreError,
    StoreStats, StoreTier,
};
use parking_lot::{Condvar, Mutex};

/// The KV bytes a block with this hash holds in the stack tests.
pub fn stack_kv(s: &TierStack, hash: SequenceHash) -> Vec<u8> {
    pattern(hash.as_u64(), s.g1().layout().block_bytes())
}

/// Allocates G1 blocks for `hashes[first..]` through the stack, writes their KV, registers
/// them as a chain; returns the handles.
pub fn stack_compute(
    s: &TierStack,
    hashes: &[SequenceHash],
    first: usize,
) -> Vec<ImmutableBlock<Device>> {
    let blocks = s.allocate(hashes.len() - first).unwrap();
    stack_write_register(s, blocks, hashes, first)
}

/// Writes and registers freshly allocated `blocks` for `hashes[first..]`.
pub fn stack_write_register(
    s: &TierStack,
    blocks: Vec<MutableBlock<Device>>,
    hashes: &[SequenceHash],
    first: usize,
) -> Vec<ImmutableBlock<Device>> {
    let page = s.g1().block_size();
    let staged = blocks
        .into_iter()
        .zip(first..)
        .map(|(block, i)| {
            s.g1()
                .layout()
                .write_block(block.block_id(), &stack_kv(s, hashes[i]))
                .unwrap();
            let parent = i.checked_sub(1).map(|p| hashes[p]);
            block.stage(hashes[i], page).unwrap().with_parent(parent)
        })
        .collect();
    s.register(staged, EngineSync::Ready).unwrap()
}

/// Every block holds its hash's KV.
pub fn assert_stack_kv(s: &TierStack, blocks: &[ImmutableBlock<Device>]) {
    for b in blocks {
        assert_eq!(
            read(s.g1().layout(), b.block_id().index()),
            stack_kv(s, b.sequence_hash()),
            "block {:?} of hash {:?}",
            b.block_id(),
            b.sequence_hash()
        );
    }
}

/// Both slot tiers' invariants hold and their counts add up.
pub fn assert_stack_conserved(s: &TierStack) {
    for c in [
        s.g1().check_invariants().unwrap(),
        s.g2().check_invariants().unwrap(),
    ] {
        assert_eq!(
            c.reset + c.inactive + c.mutable + c.active,
            c.total,
            "{c:?}"
        );
    }
}

/// After a flush, with every handle of the test dropped: no slot is held by anyone.
pub fn assert_stack_idle(s: &TierStack) {
    s.flush();
    assert_stack_conserved(s);
    for (tier, c) in [("G1", s.g1().counts()), ("G2", s.g2().counts())] {
        assert_eq!(
            (c.mutable, c.active),
            (0, 0),
            "{tier} still holds slots: {c:?}"
        );
    }
    let st = s.stats();
    assert_eq!((st.queued_jobs, st.running_jobs), (0, 0), "{st:?}");
}

/// Evicts every inactive G1 block by allocating all available blocks through the stack,
/// scribbling on them and dropping them (direct eviction: under write-back, the blocks G2
/// lacks are skipped as `reclaim_behind`).
pub fn stack_flush_g1(s: &TierStack) {
    // The write-back reclaimer may evict (and hold) some of the available blocks between
    // the count and the allocation: ask again with the new count.
    let blocks = loop {
        let n = s.g1().available_blocks();
        match s.allocate(n) {
            Ok(blocks) => break blocks,
            Err(kvbm_logical::AllocationError::Exhausted { .. }) => continue,
            Err(e) => panic!("flushing G1: {e}"),
        }
    };
    for b in &blocks {
        s.g1()
            .layout()
            .write_block(b.block_id(), &vec![0xEE; s.g1().layout().block_bytes()])
            .unwrap();
    }
    drop(blocks);
}

/// A gate: closed until opened; counts the threads that reached it.
#[derive(Debug, Default)]
pub struct Gate {
    open: Mutex<bool>,
    opened: Condvar,
    arrived: Mutex<usize>,
    arrival: Condvar,
}

impl Gate {
    /// Blocks until the gate is open.
    pub fn pass(&self) {
        {
            let mut a = self.arrived.lock();
            *a += 1;
            self.arrival.notify_all();
        }
        let mut open = self.open.lock();
        while !*open {
            self.opened.wait(&mut open);
        }
    }

    /// Waits until `n` threads have reached the gate.
    pub fn wait_arrivals(&self, n: usize) {
        let mut a = self.arrived.lock();
        while *a < n {
            self.arrival.wait(&mut a);
        }
    }

    /// Opens the gate for good.
    pub fn open(&self) {
        *self.open.lock() = true;
        self.opened.notify_all();
    }
}

/// Opens its gate when dropped: a test that fails while a worker waits at the gate then
/// fails instead of hanging (dropping the stack joins its workers).
pub struct OpenOnDrop<'a>(pub &'a Gate);

impl Drop for OpenOnDrop<'_> {
    fn drop(&mut self) {
        self.0.open();
    }
}

/// A fault injector that holds copy batch number `batch` (0-based) at a gate before it
/// copies anything.
#[derive(Debug)]
pub struct GateCopies {
    pub gate: Gate,
    batch: u64,
    seen: AtomicU64,
}

impl GateCopies {
    pub fn at_batch(batch: u64) -> Self {
        Self {
            gate: Gate::default(),
            batch,
            seen: AtomicU64::new(0),
        }
    }
}

impl FaultInjector for GateCopies {
    fn failed_pairs(
        &self,
        _src: MemoryKind,
        _dst: MemoryKind,
        _pairs: &[(BlockId, BlockId)],
    ) -> Vec<usize> {
        if self.seen.fetch_add(1, Ordering::SeqCst) == self.batch {
            self.gate.pass();
        }
        Vec::new()
    }
}

/// Random faults: each pair fails with probability `fail`, each checksum record is stored
/// wrong with probability `corrupt` (per mille), reproducibly from `seed`.
#[derive(Debug)]
pub struct RandomFaults {
    state: Mutex<u64>,
    fail: u64,
    corrupt: u64,
    pub injected: AtomicUsize,
}

impl RandomFaults {
    pub fn new(seed: u64, fail_per_mille: u64, corrupt_per_mille: u64) -> Self {
        Self {
            state: Mutex::new(seed),
            fail: fail_per_mille,
            corrupt: corrupt_per_mille,
            injected: AtomicUsize::new(0),
        }
    }

    fn roll(&self) -> u64 {
        let mut s = self.state.lock();
        *s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % 1000
    }
}

impl FaultInjector for RandomFaults {
    fn failed_pairs(
        &self,
        _src: MemoryKind,
        _dst: MemoryKind,
        pairs: &[(BlockId, BlockId)],
    ) -> Vec<usize> {
        let failed: Vec<usize> = (0..pairs.len())
            .filter(|_| self.roll() < self.fail)
            .collect();
        self.injected.fetch_add(failed.len(), Ordering::Relaxed);
        failed
    }

    fn corrupt_checksum(&self, _block: BlockId) -> bool {
        let bad = self.roll() < self.corrupt;
        if bad {
            self.injected.fetch_add(1, Ordering::Relaxed);
        }
        bad
    }
}

/// A stored value: parent, bytes, checksum.
type Value = (Option<SequenceHash>, Vec<u8>, u64);

/// A tiny in-memory store tier for tests: a map behind a mutex, with a checksum per value
/// (checked on every get, as a real store must) and fault switches.
#[derive(Debug)]
pub struct MemStore {
    block_bytes: usize,
    map: Mutex<HashMap<SequenceHash, Value>>,
    capacity: usize,
    /// Every get fails with an I/O error.
    pub fail_gets: AtomicBool,
    /// Every put fails with an I/O error.
    pub fail_puts: AtomicBool,
    /// The store is unreachable: contains says false, puts are skipped, gets fail.
    pub unavailable: AtomicBool,
    /// When set, every put and get waits at this gate first.
    pub gate: Mutex<Option<std::sync::Arc<Gate>>>,
    /// Hashes removed through `remove`.
    pub removed: Mutex<HashSet<SequenceHash>>,
    stats: Mutex<StoreStats>,
}

impl MemStore {
    pub fn new(block_bytes: usize, capacity: usize) -> Self {
        Self {
            block_bytes,
            map: Mutex::new(HashMap::new()),
            capacity,
            fail_gets: AtomicBool::new(false),
            fail_puts: AtomicBool::new(false),
            unavailable: AtomicBool::new(false),
            gate: Mutex::new(None),
            removed: Mutex::new(HashSet::new()),
            stats: Mutex::new(StoreStats::default()),
        }
    }

    /// Whether the store holds `hash` (no fault switch consulted).
    pub fn holds(&self, hash: SequenceHash) -> bool {
        self.map.lock().contains_key(&hash)
    }

    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    /// Flips a byte of the stored value, behind the store's back.
    pub fn corrupt(&self, hash: SequenceHash) {
        if let Some(v) = self.map.lock().get_mut(&hash) {
            v.1[0] ^= 1;
        }
    }

    /// Drops a value, as the store's own eviction would.
    pub fn evict(&self, hash: SequenceHash) {
        self.map.lock().remove(&hash);
    }

    fn wait_gate(&self) {
        let gate = self.gate.lock().clone();
        if let Some(g) = gate {
            g.pass();
        }
    }
}

impl StoreTier for MemStore {
    fn medium(&self) -> &'static str {
        "MEMORY"
    }

    fn block_bytes(&self) -> usize {
        self.block_bytes
    }

    fn contains(&self, hashes: &[SequenceHash]) -> Vec<bool> {
        if self.unavailable.load(Ordering::SeqCst) {
            return vec![false; hashes.len()];
        }
        let map = self.map.lock();
        hashes.iter().map(|h| map.contains_key(h)).collect()
    }

    fn put(&self, blocks: &[StoreBlock<'_>]) -> Vec<PutOutcome> {
        self.wait_gate();
        let mut st = self.stats.lock();
        blocks
            .iter()
            .map(|b| {
                if self.unavailable.load(Ordering::SeqCst) {
                    st.skipped += 1;
                    return PutOutcome::Skipped(SkipReason::Unavailable);
                }
                if self.fail_puts.load(Ordering::SeqCst) {
                    st.failed += 1;
                    return PutOutcome::Failed(StoreError::Io("injected".into()));
                }
                if b.bytes.len() != self.block_bytes {
                    st.failed += 1;
                    return PutOutcome::Failed(StoreError::BufferSize {
                        expected: self.block_bytes,
                        actual: b.bytes.len(),
                    });
                }
                let mut map = self.map.lock();
                if map.contains_key(&b.hash) {
                    return PutOutcome::Present;
                }
                if map.len() >= self.capacity {
                    st.skipped += 1;
                    return PutOutcome::Skipped(SkipReason::NoRoom);
                }
                let sum = xxhash_rust::xxh3::xxh3_64(b.bytes);
                map.insert(b.hash, (b.parent, b.bytes.to_vec(), sum));
                st.stored += 1;
                st.bytes_written += b.bytes.len() as u64;
                PutOutcome::Stored
            })
            .collect()
    }

    fn get(&self, hashes: &[SequenceHash], out: &mut [&mut [u8]]) -> Vec<GetOutcome> {
        self.wait_gate();
        let mut st = self.stats.lock();
        hashes
            .iter()
            .zip(out.iter_mut())
            .map(|(h, buf)| {
                if self.unavailable.load(Ordering::SeqCst) {
                    st.failed += 1;
                    return GetOutcome::Failed(StoreError::Unavailable("down".into()));
                }
                if self.fail_gets.load(Ordering::SeqCst) {
                    st.failed += 1;
                    return GetOutcome::Failed(StoreError::Io("injected".into()));
                }
                let mut map = self.map.lock();
                let Some((parent, bytes, sum)) = map.get(h) else {
                    st.misses += 1;
                    return GetOutcome::Miss;
                };
                if xxhash_rust::xxh3::xxh3_64(bytes) != *sum || buf.len() != bytes.len() {
                    map.remove(h);
                    st.corrupt += 1;
                    return GetOutcome::Corrupt;
                }
                buf.copy_from_slice(bytes);
                st.hits += 1;
                st.bytes_read += bytes.len() as u64;
                GetOutcome::Hit { parent: *parent }
            })
            .collect()
    }

    fn remove(&self, hashes: &[SequenceHash]) {
        let mut map = self.map.lock();
        let mut removed = self.removed.lock();
        for h in hashes {
            map.remove(h);
            removed.insert(*h);
        }
    }

    fn stats(&self) -> StoreStats {
        let mut s = *self.stats.lock();
        s.resident = Some(self.map.lock().len() as u64);
        s
    }
}

/// How to build a test stack; `build` returns it and clones of its managers (test-only
/// back doors: holding or evicting blocks behind the stack's back).
pub struct StackOpts {
    pub g1: usize,
    pub g2: usize,
    pub mode: kvbm_physical::stack::WriteMode,
    pub checksums: bool,
    pub faults: Option<std::sync::Arc<dyn FaultInjector>>,
    pub stores: Vec<kvbm_physical::stack::StoreTierConfig>,
    pub workers: usize,
    pub max_queued_blocks: usize,
    pub g2_admission: kvbm_physical::stack::Admission,
    pub frequency: bool,
    /// Write-through's free reserve.
    pub reserve: Option<kvbm_physical::stack::Watermarks>,
}

pub const STACK_PAGE: usize = 4;

pub fn stack_config(num_blocks: usize) -> LayoutConfig {
    LayoutConfig {
        num_blocks,
        num_layers: 3,
        outer_dim: 2,
        page_size: STACK_PAGE,
        inner_dim: 16,
        dtype_bytes: 2,
    }
}

impl StackOpts {
    pub fn new(g1: usize, g2: usize) -> Self {
        Self {
            g1,
            g2,
            mode: kvbm_physical::stack::WriteMode::WriteThrough,
            checksums: true,
            faults: None,
            stores: Vec::new(),
            workers: 2,
            max_queued_blocks: 1 << 16,
            g2_admission: kvbm_physical::stack::Admission::Presence,
            frequency: false,
            reserve: None,
        }
    }

    /// Write-back that offloads every inactive block at the next allocation.
    pub fn eager_write_back(mut self) -> Self {
        self.mode = kvbm_physical::stack::WriteMode::WriteBack(
            kvbm_physical::stack::Watermarks::new(self.g1, self.g1),
        );
        self
    }

    pub fn block_bytes(&self) -> usize {
        stack_config(1).block_bytes().unwrap()
    }

    pub fn build(
        self,
    ) -> (
        TierStack,
        kvbm_logical::BlockManager<Device>,
        kvbm_logical::BlockManager<kvbm_logical::Host>,
    ) {
        use kvbm_logical::{BlockManager, FrequencyTracking, Host};
        use kvbm_physical::LayoutKind;
        let tracking = if self.frequency {
            FrequencyTracking::Small
        } else {
            FrequencyTracking::Disabled
        };
        let m1 = BlockManager::<Device>::builder()
            .block_count(self.g1)
            .block_size(STACK_PAGE)
            .frequency_tracking(tracking)
            .build()
            .unwrap();
        let m2 = BlockManager::<Host>::builder()
            .block_count(self.g2)
            .block_size(STACK_PAGE)
            .frequency_tracking(tracking)
            .build()
            .unwrap();
        let mut g2_layout =
            Layout::system(LayoutKind::FullyContiguous, stack_config(self.g2)).unwrap();
        if self.checksums {
            g2_layout = g2_layout.with_checksums().unwrap();
        }
        let mut engine = kvbm_physical::TransferEngine::host();
        if let Some(f) = self.faults {
            engine = engine.with_faults(f);
        }
        let mut b = TierStack::builder()
            .g1(
                m1.clone(),
                Layout::system(LayoutKind::LayerSeparate, stack_config(self.g1))
                    .unwrap()
                    .into_shared(),
            )
            .g2(m2.clone(), g2_layout.into_shared())
            .engine(engine)
            .write_mode(self.mode)
            .g2_admission(self.g2_admission)
            .workers(self.workers)
            .max_queued_blocks(self.max_queued_blocks);
        for s in self.stores {
            b = b.store(s);
        }
        if let Some(r) = self.reserve {
            b = b.free_reserve(r);
        }
        (b.build().unwrap(), m1, m2)
    }
}

/// A chain of `n` hashes, distinct per `base`.
pub fn chain(base: u64, n: usize) -> Vec<SequenceHash> {
    (0..n as u64)
        .map(|i| SequenceHash::new(base * 1000 + i + 1))
        .collect()
}
