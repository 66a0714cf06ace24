//! [`DiskTier`]: the G3 engine. Opening (and recovering) a tier file, and the
//! [`StoreTier`] operations over it.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use kvbm_logical::{
    BlockDuplicationPolicy, BlockManager, Disk, EventSubscriber, EvictionBackend, ImmutableBlock,
    MAX_BLOCKS, MetricsSnapshot, MutableBlock, PoolCounts, SequenceHash,
};
use parking_lot::Mutex;
use xxhash_rust::xxh3::xxh3_64;

use super::buf::{AlignedBuf, BufPool};
use super::config::{Capacity, DiskTierBuilder, IoBackend, OnIncompatible, RecoveryMode};
use super::error::{DiskError, SlotIoError};
use super::faults::DiskFaults;
use super::file::TierFile;
use super::format::{DiskGeometry, PAGE, SlotHeader, SuperError, Superblock};
use super::io::{IoKind, IoQueue, IoReq, Pipeline, Prepared};
use super::recovery::{Expect, Scan, SlotCheck, apply_fault, check_slot, copy_and_hash};
use super::stats::{Counters, Degraded, DiskStats, IoMode, RecoveredBlock, RecoveryReport};
use crate::store_tier::{
    GetOutcome, PutOutcome, SkipReason, StoreBlock, StoreError, StoreStats, StoreTier,
};

/// Tokens per block in the tier's manager: the disk tier does not count tokens, so 1.
const MANAGER_BLOCK_SIZE: usize = 1;

/// G3: block images in one preallocated local file, keyed by sequence hash, evicted by a
/// [`BlockManager<Disk>`] whose block ids are the file's slots. See the
/// [module docs](super) for the format, the I/O paths and the guarantees.
///
/// ```
/// use kvbm_logical::SequenceHash;
/// use kvbm_physical::disk::{Capacity, DiskTier};
/// use kvbm_physical::{GetOutcome, PutOutcome, StoreBlock, StoreTier};
/// let dir = std::env::temp_dir().join(format!("kvbm-doc-tier-{}", std::process::id()));
/// let open = || {
///     DiskTier::builder()
///         .path(dir.join("g3.kvbm"))
///         .block_bytes(8192)
///         .capacity(Capacity::Blocks(16))
///         .fingerprint(0xfeed)
///         .open()
/// };
/// let tier = open()?;
/// let (a, b) = (SequenceHash::new(1), SequenceHash::new(2));
/// let (image_a, image_b) = (vec![1u8; 8192], vec![2u8; 8192]);
/// let put = tier.put(&[
///     StoreBlock { hash: a, parent: None, bytes: &image_a },
///     StoreBlock { hash: b, parent: Some(a), bytes: &image_b },
/// ]);
/// assert_eq!(put, vec![PutOutcome::Stored, PutOutcome::Stored]);
/// drop(tier); // a restart: both blocks come back, with their parents
///
/// let tier = open()?;
/// assert_eq!(tier.recovery().recovered(), 2);
/// let mut out = vec![0u8; 8192];
/// assert_eq!(tier.get(&[b], &mut [&mut out]), vec![GetOutcome::Hit { parent: Some(a) }]);
/// assert_eq!(out, image_b);
/// # drop(tier); std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct DiskTier {
    file: Arc<File>,
    path: std::path::PathBuf,
    io_mode: IoMode,
    geometry: DiskGeometry,
    expect: Expect,
    manager: BlockManager<Disk>,
    queue: IoQueue,
    bufs: BufPool,
    faults: Option<Arc<dyn DiskFaults>>,
    generation: AtomicU64,
    /// Hashes being written by a `put` right now: a second `put` of one of them (another
    /// thread) answers `Present` instead of writing a second copy.
    writing: Mutex<std::collections::HashSet<SequenceHash>>,
    is_degraded: AtomicBool,
    degraded: Mutex<Option<Degraded>>,
    counters: Counters,
    recovery: RecoveryReport,
}

impl std::fmt::Debug for DiskTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskTier")
            .field("path", &self.path)
            .field("io_mode", &self.io_mode)
            .field("geometry", &self.geometry)
            .field("backend", &self.queue.backend())
            .field("queue_depth", &self.queue.depth())
            .finish_non_exhaustive()
    }
}

/// What opening decided to do with the file.
enum Plan {
    /// Start empty with a new epoch; the reason when the file held something.
    Fresh(Option<String>),
    /// Recover slots `0..scan` of epoch `sb.epoch`.
    Recover {
        sb: Superblock,
        scan: u32,
        truncated: u64,
        resized_from: Option<u64>,
    },
}

impl DiskTier {
    /// A builder: [`DiskTierBuilder`].
    pub fn builder() -> DiskTierBuilder {
        DiskTierBuilder::default()
    }

    /// Opens the tier file at the builder's path, creating and preallocating it if needed,
    /// and recovers what it holds per the [`RecoveryMode`]. Fails with a typed
    /// [`DiskError`] (missing or invalid options, a file that is not a tier file, another
    /// process holding it, no space, `O_DIRECT` required and refused, ...); never panics.
    pub fn open(options: DiskTierBuilder) -> Result<Self, DiskError> {
        let path = options.path.clone().ok_or(DiskError::Missing("path"))?;
        let block_bytes = options
            .block_bytes
            .ok_or(DiskError::Missing("block_bytes"))?;
        let capacity = options.capacity.ok_or(DiskError::Missing("capacity"))?;
        let fingerprint = options
            .fingerprint
            .ok_or(DiskError::Missing("fingerprint"))?;
        let depth = options.depth()?;
        let geometry = geometry_for(block_bytes, capacity)?;

        let faults = options.faults.clone();
        let mut file = TierFile::open(&path, options.direct_io, faults.as_deref())?;
        // Read the superblock; the first O_DIRECT read may be where a file system refuses.
        let page0 = loop {
            match file.read_page0() {
                Ok(page) => break page,
                Err(Ok(refusal)) => file = file.fall_back(options.direct_io, refusal)?,
                Err(Err(e)) => return Err(e),
            }
        };
        let len = file.len()?;
        let plan = plan(&options, &file, &page0, len, geometry, fingerprint)?;

        // Preallocate, then write the superblock (a fresh epoch makes every old slot stale).
        let sb = match &plan {
            Plan::Fresh(_) => Superblock {
                fingerprint,
                epoch: new_epoch(),
                block_bytes: block_bytes as u64,
                slot_bytes: geometry.slot_bytes() as u64,
                slots: u64::from(geometry.slots()),
            },
            Plan::Recover { sb, .. } => Superblock {
                slots: u64::from(geometry.slots()),
                ..*sb
            },
        };
        // A fresh file gets its superblock before it grows: a non-empty file without one is
        // never taken for ours (and never overwritten).
        let fresh = matches!(plan, Plan::Fresh(_));
        file.preallocate(
            if fresh {
                PAGE as u64
            } else {
                geometry.file_len()
            },
            fresh,
        )?;
        let mut page = AlignedBuf::new(PAGE).ok_or_else(|| DiskError::Io {
            op: "allocate",
            path: path.clone(),
            source: io::ErrorKind::OutOfMemory.into(),
        })?;
        sb.encode(page.as_mut_slice());
        loop {
            match file.write_page0(&mut page) {
                Ok(()) => break,
                Err(Ok(refusal)) => file = file.fall_back(options.direct_io, refusal)?,
                Err(Err(e)) => return Err(e),
            }
        }
        file.sync()?;
        if fresh {
            file.preallocate(geometry.file_len(), false)?;
            file.sync()?;
        }

        let manager = BlockManager::<Disk>::builder()
            .block_count(geometry.slots() as usize)
            .block_size(MANAGER_BLOCK_SIZE)
            .eviction(options.eviction.unwrap_or(EvictionBackend::Lru))
            .duplication_policy(BlockDuplicationPolicy::Reject)
            .build()?;
        let queue =
            IoQueue::start(options.backend, depth).map_err(|source| DiskError::Backend {
                backend: options.backend,
                source,
            })?;
        let TierFile {
            file,
            mode: io_mode,
            ..
        } = file;
        let mut tier = Self {
            file: Arc::new(file),
            path,
            io_mode,
            geometry,
            expect: Expect {
                fingerprint,
                epoch: sb.epoch,
                block_bytes,
            },
            manager,
            bufs: BufPool::new(geometry.slot_bytes(), depth.saturating_mul(2)),
            queue,
            faults,
            generation: AtomicU64::new(1),
            writing: Mutex::new(std::collections::HashSet::new()),
            is_degraded: AtomicBool::new(false),
            degraded: Mutex::new(None),
            counters: Counters::default(),
            recovery: RecoveryReport {
                mode: options.recovery,
                ..RecoveryReport::default()
            },
        };
        match plan {
            Plan::Fresh(reason) => {
                tier.recovery.created = len == 0;
                if let Some(reason) = &reason {
                    tracing::warn!(path = %tier.path.display(), %reason, "disk tier file reinitialised");
                }
                tier.recovery.reinitialized = reason;
            }
            Plan::Recover {
                scan,
                truncated,
                resized_from,
                ..
            } => {
                tier.recovery.truncated = truncated;
                tier.recovery.resized_from = resized_from;
                tier.recover(scan, options.recovery == RecoveryMode::Verify);
            }
        }
        Ok(tier)
    }

    /// Scans slots `0..scan` and re-registers every verified block, oldest first.
    fn recover(&mut self, scan: u32, verify: bool) {
        let start = Instant::now();
        let mut pass = Scan {
            geometry: self.geometry,
            expect: self.expect,
            verify,
            faults: self.faults.as_deref(),
            found: Vec::new(),
            torn: Vec::new(),
            stale: 0,
            empty: 0,
            unreadable: 0,
            first_error: None,
        };
        self.queue
            .drive(&self.file, &self.bufs, scan as usize, &mut pass);
        let Scan {
            mut found,
            torn,
            stale,
            empty,
            unreadable,
            first_error,
            ..
        } = pass;
        if let Some(e) = first_error {
            self.degrade(SlotIoError::from_io(&e));
        }
        // Dropped for good: zero the torn slots' headers, so that no later open (say, a
        // header-only one) takes them back.
        if !torn.is_empty() {
            self.tombstone(&torn);
        }
        let torn = torn.len() as u64;
        // Newest copy of each hash; then oldest first, so the eviction order follows the
        // write order.
        found.sort_unstable_by_key(|(_, h)| std::cmp::Reverse(h.generation));
        let mut seen = HashMap::with_capacity(found.len());
        let mut older = Vec::new();
        found.retain(|&(slot, h)| {
            let first = seen.insert(h.hash, ()).is_none();
            if !first {
                older.push(slot);
            }
            first
        });
        // An older copy (left by two puts of one hash racing) must not outlive the newer one.
        if !older.is_empty() {
            self.tombstone(&older);
        }
        let duplicates = older.len() as u64;
        found.reverse();
        let max_generation = found.iter().map(|(_, h)| h.generation).max().unwrap_or(0);
        self.generation.store(max_generation + 1, Ordering::Relaxed);

        let blocks = self.register_recovered(&found);
        let report = &mut self.recovery;
        report.blocks = blocks;
        report.torn = torn;
        report.stale = stale;
        report.empty = empty;
        report.unreadable = unreadable;
        report.duplicates = duplicates;
        report.elapsed = start.elapsed();
        tracing::info!(
            path = %self.path.display(),
            recovered = report.blocks.len(),
            torn, stale, empty, unreadable, duplicates,
            elapsed_ms = report.elapsed.as_millis() as u64,
            "disk tier recovered"
        );
    }

    /// Registers recovered slots (in the given order) under their own block ids.
    fn register_recovered(&self, found: &[(u32, SlotHeader)]) -> Vec<RecoveredBlock> {
        if found.is_empty() {
            return Vec::new();
        }
        // A fresh manager hands out every slot: pick the recovered ones by id.
        let Ok(all) = self.manager.allocate_blocks(self.geometry.slots() as usize) else {
            return Vec::new();
        };
        let mut by_slot: Vec<Option<MutableBlock<Disk>>> = all.into_iter().map(Some).collect();
        by_slot.sort_by_key(|b| b.as_ref().map(|b| b.block_id().get()));
        let mut staged = Vec::with_capacity(found.len());
        let mut blocks = Vec::with_capacity(found.len());
        for &(slot, h) in found {
            let Some(block) = by_slot.get_mut(slot as usize).and_then(Option::take) else {
                continue;
            };
            if let Ok(complete) = block.stage(h.hash, MANAGER_BLOCK_SIZE) {
                staged.push(complete.with_parent(h.parent));
                blocks.push(RecoveredBlock {
                    slot,
                    hash: h.hash,
                    parent: h.parent,
                    generation: h.generation,
                });
            }
        }
        MutableBlock::release_all(by_slot.into_iter().flatten());
        match self.manager.register_blocks(staged) {
            Ok(handles) => ImmutableBlock::release_all(handles),
            Err(e) => {
                drop(e.into_blocks());
                return Vec::new();
            }
        }
        blocks
    }

    /// What [`open`](Self::open) recovered.
    pub fn recovery(&self) -> &RecoveryReport {
        &self.recovery
    }

    /// Where the slots lie in the file.
    pub fn geometry(&self) -> DiskGeometry {
        self.geometry
    }

    /// The tier file.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// `O_DIRECT` or buffered, and why.
    pub fn io_mode(&self) -> &IoMode {
        &self.io_mode
    }

    /// Counters, I/O mode, degradation.
    pub fn disk_stats(&self) -> DiskStats {
        let metrics = self.manager.metrics().snapshot();
        let resident = self.manager.counts().registered_hashes as u64;
        DiskStats {
            store: self.counters.store_stats(resident),
            io_mode: self.io_mode.clone(),
            backend: self.queue.backend(),
            queue_depth: self.queue.depth(),
            degraded: self.degraded.lock().clone(),
            slots: self.geometry.slots(),
            evicted: metrics.removed_evicted,
            removed: self.counters.removed.load(Ordering::Relaxed),
            io_errors: self.counters.io_errors.load(Ordering::Relaxed),
        }
    }

    /// Why the tier stopped admitting, if it did.
    pub fn degraded(&self) -> Option<Degraded> {
        self.degraded.lock().clone()
    }

    /// Admits blocks again after the cause of a degradation was fixed (space freed, a
    /// device replaced); returns what it was.
    pub fn resume(&self) -> Option<Degraded> {
        let mut d = self.degraded.lock();
        self.is_degraded.store(false, Ordering::Release);
        d.take()
    }

    /// The eviction manager's pool counts (slots free, resident, being written or read).
    pub fn counts(&self) -> PoolCounts {
        self.manager.counts()
    }

    /// The eviction manager's metrics (evictions, registrations, ...).
    pub fn manager_metrics(&self) -> MetricsSnapshot {
        self.manager.metrics().snapshot()
    }

    /// Checks the eviction manager's invariants; for tests and health checks.
    pub fn check_invariants(&self) -> Result<PoolCounts, kvbm_logical::InvariantError> {
        self.manager.check_invariants()
    }

    /// Subscribes to the tier's KV events (`Stored` on put, `Removed` on eviction,
    /// invalidation and removal), tier name `disk`.
    pub fn subscribe(&self, capacity: usize) -> EventSubscriber {
        self.manager.subscribe(capacity)
    }

    fn degrade(&self, e: SlotIoError) {
        let mut d = self.degraded.lock();
        if d.is_none() {
            tracing::warn!(path = %self.path.display(), error = %e, "disk tier degraded: no more admissions until resume()");
            *d = Some(Degraded::Io(e));
        }
        self.is_degraded.store(true, Ordering::Release);
    }

    fn is_degraded(&self) -> bool {
        self.is_degraded.load(Ordering::Acquire)
    }

    /// Zeroes the header page of each slot (the caller holds them): removed for good, also
    /// after a restart. Failures are only counted: an unremoved header is still verified
    /// on every read.
    fn tombstone(&self, slots: &[u32]) {
        struct Tombstones<'a> {
            slots: &'a [u32],
            geometry: DiskGeometry,
            faults: Option<&'a dyn DiskFaults>,
            failed: u64,
        }
        impl Pipeline for Tombstones<'_> {
            fn prepare(&mut self, i: usize, buf: &mut AlignedBuf) -> Prepared {
                let page = &mut buf.as_mut_slice()[..PAGE];
                page.fill(0);
                let slot = self.slots[i];
                let req = IoReq::new(IoKind::Write, self.geometry.header_offset(slot), PAGE);
                apply_fault(self.faults.and_then(|f| f.before_write(slot, page)), req)
            }
            fn complete(
                &mut self,
                _i: usize,
                _buf: &[u8],
                result: io::Result<usize>,
                _sum: Option<u64>,
            ) {
                if !matches!(result, Ok(PAGE)) {
                    self.failed += 1;
                }
            }
        }
        let mut t = Tombstones {
            slots,
            geometry: self.geometry,
            faults: self.faults.as_deref(),
            failed: 0,
        };
        self.queue
            .drive(&self.file, &self.bufs, slots.len(), &mut t);
        Counters::add(&self.counters.io_errors, t.failed);
    }
}

/// Slots for a capacity.
fn geometry_for(block_bytes: usize, capacity: Capacity) -> Result<DiskGeometry, DiskError> {
    let invalid = |field, value: u64, reason| DiskError::InvalidOption {
        field,
        value,
        reason,
    };
    if block_bytes == 0 {
        return Err(invalid("block_bytes", 0, "must be positive"));
    }
    let probe = DiskGeometry::new(block_bytes, 1)
        .ok_or_else(|| invalid("block_bytes", block_bytes as u64, "too large"))?;
    let slots = match capacity {
        Capacity::Blocks(n) => u64::from(n),
        Capacity::Bytes(bytes) => bytes.saturating_sub(PAGE as u64) / probe.slot_bytes() as u64,
    };
    let value = match capacity {
        Capacity::Blocks(n) => u64::from(n),
        Capacity::Bytes(b) => b,
    };
    if slots == 0 {
        return Err(invalid("capacity", value, "holds no block slot"));
    }
    if slots > MAX_BLOCKS as u64 {
        return Err(invalid(
            "capacity",
            value,
            "more slots than a block manager indexes",
        ));
    }
    DiskGeometry::new(block_bytes, slots as u32)
        .ok_or_else(|| invalid("capacity", value, "the file would not be addressable"))
}

/// Decides, from the first page and the length, whether to recover or start afresh.
fn plan(
    options: &DiskTierBuilder,
    file: &TierFile,
    page0: &(AlignedBuf, usize),
    len: u64,
    geometry: DiskGeometry,
    fingerprint: u64,
) -> Result<Plan, DiskError> {
    let (page, got) = page0;
    let page = &page.as_slice()[..*got];
    if len == 0 {
        // New (a tier file gets its superblock before it grows past it).
        return Ok(Plan::Fresh(None));
    }
    let incompatible = |what: &'static str, found: u64, expected: u64| {
        if options.on_incompatible == OnIncompatible::Fail {
            Err(DiskError::Incompatible {
                path: file.path.clone(),
                what,
                found,
                expected,
            })
        } else {
            Ok(Plan::Fresh(Some(format!(
                "{what} is {found:#x}, expected {expected:#x}"
            ))))
        }
    };
    let sb = match Superblock::decode(page) {
        Ok(sb) => sb,
        Err(SuperError::NotOurs) => {
            return Err(DiskError::NotATierFile {
                path: file.path.clone(),
            });
        }
        Err(SuperError::Version(v)) => {
            return incompatible(
                "format version",
                u64::from(v),
                u64::from(super::format::FORMAT_VERSION),
            );
        }
        Err(SuperError::Damaged) => return incompatible("superblock checksum", 1, 0),
    };
    if sb.fingerprint != fingerprint {
        return incompatible("fingerprint", sb.fingerprint, fingerprint);
    }
    if sb.block_bytes != geometry.block_bytes() as u64 {
        return incompatible("block_bytes", sb.block_bytes, geometry.block_bytes() as u64);
    }
    if sb.slot_bytes != geometry.slot_bytes() as u64 {
        return incompatible("slot_bytes", sb.slot_bytes, geometry.slot_bytes() as u64);
    }
    if options.recovery == RecoveryMode::Discard {
        return Ok(Plan::Fresh(Some("recovery mode Discard".into())));
    }
    // Slots that exist both in the file and in the new geometry.
    let old_slots = sb.slots;
    let expected_len = (PAGE as u64).saturating_add(old_slots.saturating_mul(sb.slot_bytes));
    let whole = len.saturating_sub(PAGE as u64) / sb.slot_bytes;
    let in_file = old_slots.min(whole);
    let truncated = old_slots - in_file;
    if truncated > 0 && options.on_incompatible == OnIncompatible::Fail {
        return Err(DiskError::Truncated {
            path: file.path.clone(),
            len,
            expected: expected_len,
        });
    }
    let scan = in_file.min(u64::from(geometry.slots())) as u32;
    Ok(Plan::Recover {
        sb,
        scan,
        truncated,
        resized_from: (old_slots != u64::from(geometry.slots())).then_some(old_slots),
    })
}

/// A random epoch: distinct per (re)initialisation of a file.
fn new_epoch() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut seed = [0u8; 24];
    seed[..8].copy_from_slice(&nanos.to_le_bytes());
    seed[8..12].copy_from_slice(&std::process::id().to_le_bytes());
    seed[16..].copy_from_slice(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    // Never zero (an all-zero header page is "empty").
    xxh3_64(&seed) | 1
}

/// The slot writes of one `put`.
struct Writes<'a> {
    tier: &'a DiskTier,
    blocks: &'a [StoreBlock<'a>],
    /// (index into `blocks`, slot)
    jobs: &'a [(usize, u32)],
    results: Vec<Result<(), SlotIoError>>,
}

impl Pipeline for Writes<'_> {
    fn prepare(&mut self, i: usize, buf: &mut AlignedBuf) -> Prepared {
        let (bi, slot) = self.jobs[i];
        let block = &self.blocks[bi];
        let g = self.tier.geometry;
        let image = buf.as_mut_slice();
        let (data, rest) = image.split_at_mut(g.block_bytes());
        let checksum = copy_and_hash(block.bytes, data);
        let pad = g.header_in_slot() - g.block_bytes();
        rest[..pad].fill(0);
        SlotHeader {
            hash: block.hash,
            parent: block.parent,
            fingerprint: self.tier.expect.fingerprint,
            epoch: self.tier.expect.epoch,
            generation: self.tier.generation.fetch_add(1, Ordering::Relaxed),
            len: g.block_bytes() as u64,
            checksum,
        }
        .encode(&mut rest[pad..]);
        let req = IoReq::new(IoKind::Write, g.slot_offset(slot), g.slot_bytes());
        let fault = self
            .tier
            .faults
            .as_deref()
            .and_then(|f| f.before_write(slot, buf.as_mut_slice()));
        apply_fault(fault, req)
    }

    fn complete(&mut self, i: usize, _buf: &[u8], result: io::Result<usize>, _sum: Option<u64>) {
        let expected = self.tier.geometry.slot_bytes();
        self.results[i] = match result {
            Ok(n) if n == expected => Ok(()),
            Ok(done) => Err(SlotIoError::Short {
                op: "write",
                done,
                expected,
            }),
            Err(e) => Err(SlotIoError::from_io(&e)),
        };
    }
}

/// The slot reads of one `get`.
struct Reads<'a, 'o> {
    tier: &'a DiskTier,
    /// (index into `hashes`/`out`, slot)
    jobs: &'a [(usize, u32)],
    hashes: &'a [SequenceHash],
    out: &'a mut [&'o mut [u8]],
    results: Vec<GetOutcome>,
    first_error: Option<SlotIoError>,
}

impl Reads<'_, '_> {
    fn fail(&mut self, e: SlotIoError) -> GetOutcome {
        self.first_error.get_or_insert_with(|| e.clone());
        GetOutcome::Failed(e.into())
    }
}

impl Pipeline for Reads<'_, '_> {
    fn prepare(&mut self, i: usize, _buf: &mut AlignedBuf) -> Prepared {
        let slot = self.jobs[i].1;
        let g = self.tier.geometry;
        let req = IoReq {
            sum: Some(g.block_bytes()),
            ..IoReq::new(IoKind::Read, g.slot_offset(slot), g.slot_bytes())
        };
        apply_fault(
            self.tier
                .faults
                .as_deref()
                .and_then(|f| f.before_read(slot)),
            req,
        )
    }

    fn complete(&mut self, i: usize, buf: &[u8], result: io::Result<usize>, sum: Option<u64>) {
        let (at, _) = self.jobs[i];
        let g = self.tier.geometry;
        let expected = g.slot_bytes();
        self.results[i] = match result {
            Ok(n) if n == expected && buf.len() >= expected => {
                let h = g.header_in_slot();
                let image = &buf[..g.block_bytes()];
                let sum = sum.unwrap_or_else(|| xxh3_64(image));
                match check_slot(&self.tier.expect, &buf[h..h + PAGE], Some(sum)) {
                    SlotCheck::Valid(header) if header.hash == self.hashes[at] => {
                        self.out[at].copy_from_slice(image);
                        GetOutcome::Hit {
                            parent: header.parent,
                        }
                    }
                    // Removed while registered (a racing remove): gone, not corrupt.
                    SlotCheck::Empty => GetOutcome::Miss,
                    _ => GetOutcome::Corrupt,
                }
            }
            Ok(done) => self.fail(SlotIoError::Short {
                op: "read",
                done,
                expected,
            }),
            Err(e) => self.fail(SlotIoError::from_io(&e)),
        };
    }
}

impl StoreTier for DiskTier {
    fn medium(&self) -> &'static str {
        "DISK"
    }

    fn block_bytes(&self) -> usize {
        self.geometry.block_bytes()
    }

    fn contains(&self, hashes: &[SequenceHash]) -> Vec<bool> {
        self.manager.contains_each(hashes)
    }

    fn put(&self, blocks: &[StoreBlock<'_>]) -> Vec<PutOutcome> {
        let bb = self.geometry.block_bytes();
        let mut outcomes: Vec<Option<PutOutcome>> = vec![None; blocks.len()];
        // Wrong sizes fail alone; repeats within the batch follow their first occurrence.
        let mut first: HashMap<SequenceHash, usize> = HashMap::with_capacity(blocks.len());
        let mut repeats = Vec::new();
        let mut candidates = Vec::with_capacity(blocks.len());
        for (i, b) in blocks.iter().enumerate() {
            if b.bytes.len() != bb {
                outcomes[i] = Some(PutOutcome::Failed(StoreError::BufferSize {
                    expected: bb,
                    actual: b.bytes.len(),
                }));
            } else if let Some(&j) = first.get(&b.hash) {
                repeats.push((i, j));
            } else {
                first.insert(b.hash, i);
                candidates.push(i);
            }
        }
        if self.is_degraded() {
            for &i in &candidates {
                outcomes[i] = Some(PutOutcome::Skipped(SkipReason::Degraded));
            }
            candidates.clear();
        }
        let hashes: Vec<SequenceHash> = candidates.iter().map(|&i| blocks[i].hash).collect();
        {
            // Claim the rest; what another put is writing now is as good as present. Asking
            // the manager under the claim lock closes the gap between another put's
            // registration and the release of its claim.
            let mut writing = self.writing.lock();
            let present = self.manager.contains_each(&hashes);
            candidates = candidates
                .into_iter()
                .zip(present)
                .filter_map(|(i, p)| {
                    if p || !writing.insert(blocks[i].hash) {
                        outcomes[i] = Some(PutOutcome::Present);
                        None
                    } else {
                        Some(i)
                    }
                })
                .collect();
        }
        let claimed: Vec<SequenceHash> = candidates.iter().map(|&i| blocks[i].hash).collect();

        // Slots: free ones first, then by evicting in the manager's policy order. Blocks
        // held by readers are never evicted, so fewer may be had: the rest is no room.
        let mut slots = match self.manager.allocate_blocks(candidates.len()) {
            Ok(s) => s,
            Err(kvbm_logical::AllocationError::Exhausted { available, .. }) => self
                .manager
                .allocate_blocks(available.min(candidates.len()))
                .unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        for &i in &candidates[slots.len()..] {
            outcomes[i] = Some(PutOutcome::Skipped(SkipReason::NoRoom));
        }
        candidates.truncate(slots.len());
        let jobs: Vec<(usize, u32)> = candidates
            .iter()
            .zip(&slots)
            .map(|(&i, s)| (i, s.block_id().get()))
            .collect();
        let mut writes = Writes {
            tier: self,
            blocks,
            jobs: &jobs,
            results: vec![Ok(()); jobs.len()],
        };
        self.queue
            .drive(&self.file, &self.bufs, jobs.len(), &mut writes);
        let results = writes.results;

        // Register what landed; what did not goes back to the free slots.
        let mut staged = Vec::with_capacity(jobs.len());
        let mut staged_at = Vec::with_capacity(jobs.len());
        let mut written = 0u64;
        let mut first_error = None;
        // A failed write may have left the slot's previous (evicted) block intact, or torn:
        // zero its header while the slot is still ours, so that no restart brings back a
        // block this tier has let go of.
        let failed_slots: Vec<u32> = jobs
            .iter()
            .zip(&results)
            .filter(|(_, r)| r.is_err())
            .map(|(&(_, slot), _)| slot)
            .collect();
        if !failed_slots.is_empty() {
            self.tombstone(&failed_slots);
        }
        for ((&(i, _), slot), result) in jobs.iter().zip(slots.drain(..)).zip(results) {
            match result {
                Ok(()) => {
                    written += 1;
                    match slot.stage(blocks[i].hash, MANAGER_BLOCK_SIZE) {
                        Ok(c) => {
                            staged.push(c.with_parent(blocks[i].parent));
                            staged_at.push(i);
                        }
                        Err(e) => {
                            drop(e.into_block());
                            outcomes[i] = Some(PutOutcome::Failed(StoreError::Io(
                                "the tier's block manager refused the block".into(),
                            )));
                        }
                    }
                }
                Err(e) => {
                    drop(slot);
                    first_error.get_or_insert_with(|| e.clone());
                    outcomes[i] = Some(PutOutcome::Failed(e.into()));
                }
            }
        }
        let ids: Vec<_> = staged.iter().map(|c| c.block_id()).collect();
        match self.manager.register_blocks(staged) {
            Ok(handles) => {
                for ((h, id), i) in handles.iter().zip(ids).zip(staged_at) {
                    // A racing put of the same hash registered first: ours went back free.
                    outcomes[i] = Some(if h.block_id() == id {
                        PutOutcome::Stored
                    } else {
                        PutOutcome::Present
                    });
                }
                ImmutableBlock::release_all(handles);
            }
            Err(e) => {
                drop(e.into_blocks());
                for i in staged_at {
                    outcomes[i] = Some(PutOutcome::Failed(StoreError::Io(
                        "the tier's block manager refused the blocks".into(),
                    )));
                }
            }
        }
        {
            let mut writing = self.writing.lock();
            for hash in &claimed {
                writing.remove(hash);
            }
        }
        if let Some(e) = first_error {
            self.degrade(e);
        }
        for (i, j) in repeats {
            outcomes[i] = outcomes[j].clone();
        }
        let outcomes: Vec<PutOutcome> = outcomes
            .into_iter()
            .map(|o| o.unwrap_or(PutOutcome::Skipped(SkipReason::NoRoom)))
            .collect();
        let c = &self.counters;
        let count = |f: fn(&PutOutcome) -> bool| outcomes.iter().filter(|o| f(o)).count() as u64;
        Counters::add(&c.stored, count(|o| matches!(o, PutOutcome::Stored)));
        Counters::add(&c.skipped, count(|o| matches!(o, PutOutcome::Skipped(_))));
        Counters::add(&c.failed, count(|o| matches!(o, PutOutcome::Failed(_))));
        Counters::add(&c.bytes_written, written * bb as u64);
        Counters::add(&c.io_errors, jobs.len() as u64 - written);
        outcomes
    }

    fn get(&self, hashes: &[SequenceHash], out: &mut [&mut [u8]]) -> Vec<GetOutcome> {
        let bb = self.geometry.block_bytes();
        let mut outcomes = vec![GetOutcome::Miss; hashes.len()];
        let mut wanted = Vec::with_capacity(hashes.len());
        for (i, outcome) in outcomes.iter_mut().enumerate() {
            let actual = out.get(i).map_or(0, |b| b.len());
            if actual == bb {
                wanted.push(i);
            } else {
                *outcome = GetOutcome::Failed(StoreError::BufferSize {
                    expected: bb,
                    actual,
                });
            }
        }
        // Handles keep the slots from being evicted and rewritten while they are read.
        let want_hashes: Vec<SequenceHash> = wanted.iter().map(|&i| hashes[i]).collect();
        let handles = self.manager.scan_matches(&want_hashes, true);
        let mut jobs = Vec::with_capacity(handles.len());
        let mut found = handles.iter().peekable();
        for &i in &wanted {
            if let Some(h) = found.next_if(|h| h.sequence_hash() == hashes[i]) {
                jobs.push((i, h.block_id().get()));
            }
        }
        let mut reads = Reads {
            tier: self,
            jobs: &jobs,
            hashes,
            out,
            results: vec![GetOutcome::Miss; jobs.len()],
            first_error: None,
        };
        self.queue
            .drive(&self.file, &self.bufs, jobs.len(), &mut reads);
        let Reads {
            results,
            first_error,
            ..
        } = reads;

        // Corrupt or unreadable: removed from the tier, and its header zeroed (best effort)
        // while the handle still holds the slot, so it is never served and never retried,
        // not even after a restart.
        let mut bad_slots = Vec::new();
        let mut bad_hashes = Vec::new();
        for (&(i, slot), result) in jobs.iter().zip(results) {
            match &result {
                GetOutcome::Corrupt => {
                    tracing::warn!(hash = %hashes[i], slot, "disk tier block failed verification: removed");
                    bad_slots.push(slot);
                    bad_hashes.push(hashes[i]);
                }
                GetOutcome::Failed(_) => {
                    bad_slots.push(slot);
                    bad_hashes.push(hashes[i]);
                }
                GetOutcome::Miss => bad_hashes.push(hashes[i]),
                _ => {}
            }
            outcomes[i] = result;
        }
        if !bad_slots.is_empty() {
            self.tombstone(&bad_slots);
        }
        ImmutableBlock::release_all(handles);
        if !bad_hashes.is_empty() {
            let n = self.manager.invalidate_blocks(&bad_hashes);
            Counters::add(&self.counters.removed, n as u64);
        }
        if let Some(e) = first_error {
            self.degrade(e);
        }
        let c = &self.counters;
        let count = |f: fn(&GetOutcome) -> bool| outcomes.iter().filter(|o| f(o)).count() as u64;
        let hits = count(GetOutcome::is_hit);
        let failed = count(|o| matches!(o, GetOutcome::Failed(_)));
        Counters::add(&c.hits, hits);
        Counters::add(&c.misses, count(|o| matches!(o, GetOutcome::Miss)));
        Counters::add(&c.corrupt, count(|o| matches!(o, GetOutcome::Corrupt)));
        Counters::add(&c.failed, failed);
        Counters::add(&c.bytes_read, hits * bb as u64);
        Counters::add(
            &c.io_errors,
            count(
                |o| matches!(o, GetOutcome::Failed(e) if !matches!(e, StoreError::BufferSize { .. })),
            ),
        );
        outcomes
    }

    fn remove(&self, hashes: &[SequenceHash]) {
        let handles = self.manager.scan_matches(hashes, false);
        if handles.is_empty() {
            return;
        }
        let slots: Vec<u32> = handles.iter().map(|h| h.block_id().get()).collect();
        let found: Vec<SequenceHash> = handles.iter().map(|h| h.sequence_hash()).collect();
        self.tombstone(&slots);
        ImmutableBlock::release_all(handles);
        let n = self.manager.invalidate_blocks(&found);
        Counters::add(&self.counters.removed, n as u64);
    }

    fn stats(&self) -> StoreStats {
        self.counters
            .store_stats(self.manager.counts().registered_hashes as u64)
    }
}

impl IoBackend {
    /// A short lowercase name (`auto`, `threads`, `io_uring`).
    pub fn name(self) -> &'static str {
        match self {
            IoBackend::Auto => "auto",
            IoBackend::ThreadPool => "threads",
            IoBackend::IoUring => "io_uring",
        }
    }
}
