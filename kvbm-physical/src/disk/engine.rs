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
use super::io::IoQueue;
use super::ops::Tombstones;
use super::recovery::{Expect, Scan, Scanned};
use super::stats::{Counters, Degraded, DiskStats, IoMode, RecoveredBlock, RecoveryReport};

/// Tokens per block in the tier's manager: the disk tier does not count tokens, so 1.
pub(super) const MANAGER_BLOCK_SIZE: usize = 1;

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
    pub(super) file: File,
    path: std::path::PathBuf,
    pub(super) io_mode: IoMode,
    pub(super) geometry: DiskGeometry,
    pub(super) expect: Expect,
    pub(super) manager: BlockManager<Disk>,
    pub(super) queue: IoQueue,
    pub(super) bufs: BufPool,
    pub(super) faults: Option<Arc<dyn DiskFaults>>,
    pub(super) generation: AtomicU64,
    /// Hashes being written by a `put` right now: a second `put` of one of them (another
    /// thread) answers `Present` instead of writing a second copy.
    pub(super) writing: Mutex<std::collections::HashSet<SequenceHash>>,
    is_degraded: AtomicBool,
    degraded: Mutex<Option<Degradation>>,
    degraded_retry: std::time::Duration,
    pub(super) counters: Counters,
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
/// The highest write generation recovery accepts (see `recover`).
const MAX_GENERATION: u64 = 1 << 62;

/// A degradation and when a put may try the disk again.
#[derive(Debug)]
struct Degradation {
    what: Degraded,
    /// The current wait between tries (doubles after each failed one).
    wait: std::time::Duration,
    next_try: std::time::Instant,
    /// Tries handed out so far (the latest one's ticket).
    tries: u64,
    /// `tries` when the tier last degraded (a try with a ticket up to this one failed, or
    /// came before the failure).
    failed_tries: u64,
}

/// What a put may do ([`DiskTier::admission`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Admission {
    /// Not degraded.
    Open,
    /// Degraded, and the wait is not over.
    Refused,
    /// Degraded; this put tries the disk (the ticket).
    Try(u64),
}

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
            file,
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
            degraded_retry: options
                .degraded_retry
                .unwrap_or(super::config::DEGRADED_RETRY)
                .max(std::time::Duration::from_millis(1)),
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
        let pass = Scan {
            geometry: self.geometry,
            expect: self.expect,
            verify,
            faults: self.faults.as_deref(),
        };
        let scanned = self
            .queue
            .run(&self.file, &self.bufs, &pass, (0..scan).collect());
        let mut found = Vec::new();
        let mut torn = Vec::new();
        let (mut stale, mut empty, mut unreadable) = (0, 0, 0);
        let mut first_error = None;
        for (slot, s) in (0..scan).zip(scanned) {
            match s {
                // A generation no tier could have reached (2^62 writes) is a forged or
                // damaged header whose checksum happened to verify: dropped like a torn one,
                // so that the next generation (the highest found + 1) cannot overflow.
                Scanned::Found(h) if h.generation > MAX_GENERATION => torn.push(slot),
                Scanned::Found(h) => found.push((slot, h)),
                Scanned::Empty => empty += 1,
                Scanned::Stale => stale += 1,
                Scanned::Torn => torn.push(slot),
                Scanned::Unreadable(e) => {
                    unreadable += 1;
                    first_error.get_or_insert(e);
                }
            }
        }
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
            degraded: self.degraded(),
            slots: self.geometry.slots(),
            evicted: metrics.removed_evicted,
            removed: self.counters.removed.load(Ordering::Relaxed),
            io_errors: self.counters.io_errors.load(Ordering::Relaxed),
            in_place_reads: self.counters.in_place_reads.load(Ordering::Relaxed),
            bounce_reads: self.counters.bounce_reads.load(Ordering::Relaxed),
            in_place_writes: self.counters.in_place_writes.load(Ordering::Relaxed),
            bounce_writes: self.counters.bounce_writes.load(Ordering::Relaxed),
        }
    }

    /// Why the tier stopped admitting, if it did (and no try since has written).
    pub fn degraded(&self) -> Option<Degraded> {
        self.degraded.lock().as_ref().map(|d| d.what.clone())
    }

    /// Admits blocks again after the cause of a degradation was fixed (space freed, a
    /// device replaced); returns what it was. Without it, a put tries the disk again after
    /// [`DiskTierBuilder::degraded_retry`](super::DiskTierBuilder::degraded_retry).
    pub fn resume(&self) -> Option<Degraded> {
        let mut d = self.degraded.lock();
        self.is_degraded.store(false, Ordering::Release);
        d.take().map(|d| d.what)
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

    pub(super) fn degrade(&self, e: SlotIoError) {
        let mut d = self.degraded.lock();
        let now = std::time::Instant::now();
        match &mut *d {
            None => {
                tracing::warn!(path = %self.path.display(), error = %e, retry_in = ?self.degraded_retry, "disk tier degraded: no admissions until a try writes again (or resume())");
                *d = Some(Degradation {
                    what: Degraded::Io(e),
                    wait: self.degraded_retry,
                    next_try: now + self.degraded_retry,
                    tries: 0,
                    failed_tries: 0,
                });
            }
            Some(d) => {
                // A try failed (or another error meanwhile): wait longer before the next,
                // and no try handed out so far may clear the degradation.
                d.wait = (d.wait * 2).min(super::config::DEGRADED_RETRY_MAX);
                d.next_try = now + d.wait;
                d.failed_tries = d.tries;
                tracing::debug!(path = %self.path.display(), error = %e, retry_in = ?d.wait, "disk tier still degraded");
            }
        }
        self.is_degraded.store(true, Ordering::Release);
    }

    /// Whether a put may write now: `Refused` while degraded and waiting; once the wait is
    /// over, one caller gets a `Try` (the next is put off by another wait meanwhile).
    pub(super) fn admission(&self) -> Admission {
        if !self.is_degraded.load(Ordering::Acquire) {
            return Admission::Open;
        }
        let mut d = self.degraded.lock();
        let Some(d) = d.as_mut() else {
            return Admission::Open;
        };
        let now = std::time::Instant::now();
        if now < d.next_try {
            return Admission::Refused;
        }
        d.next_try = now + d.wait;
        d.tries += 1;
        Admission::Try(d.tries)
    }

    /// Put try `ticket` wrote: admissions resume, unless the tier degraded again since the
    /// ticket was handed out (a put admitted before that proves nothing, and an older try
    /// neither).
    pub(super) fn try_wrote(&self, ticket: u64) {
        let mut d = self.degraded.lock();
        if d.as_ref()
            .is_some_and(|d| d.tries == ticket && d.failed_tries < ticket)
        {
            if let Some(was) = d.take() {
                tracing::info!(path = %self.path.display(), was = ?was.what, "disk tier writes again: admissions resume");
            }
            self.is_degraded.store(false, Ordering::Release);
        }
    }

    /// Zeroes the header page of each slot (the caller holds them): removed for good, also
    /// after a restart. Failures are only counted: an unremoved header is still verified
    /// on every read.
    pub(super) fn tombstone(&self, slots: &[u32]) {
        let written = self.queue.run(
            &self.file,
            &self.bufs,
            &Tombstones { tier: self },
            slots.to_vec(),
        );
        let failed = written.iter().filter(|ok| !**ok).count();
        Counters::add(&self.counters.io_errors, failed as u64);
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
    if len == PAGE as u64 && page.iter().all(|&b| b == 0) {
        // What a creation (or a start afresh) interrupted between the one page's allocation
        // and the superblock's write leaves: exactly one page, all zeros. Nothing else makes
        // such a file ours, and nothing in it can be lost.
        return Ok(Plan::Fresh(Some(
            "an interrupted creation (one page of zeros)".to_owned(),
        )));
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

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use kvbm_logical::SequenceHash;

    use super::super::format::{HeaderRead, SlotHeader};
    use super::*;
    use crate::store_tier::{PutOutcome, StoreBlock, StoreTier};

    #[test]
    fn a_forged_generation_is_dropped_at_recovery_not_overflowed() {
        // A header whose checksum verifies but whose generation is u64::MAX (forged, or
        // damage that happened to verify) made `max + 1` overflow: a panic with overflow
        // checks, and new writes ranked older than recovered ones without.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g3.kvbm");
        let open = || {
            DiskTier::builder()
                .path(&path)
                .block_bytes(4096)
                .capacity(super::super::Capacity::Blocks(4))
                .fingerprint(7)
                .open()
                .unwrap()
        };
        let bytes = vec![3u8; 4096];
        let block = |h| StoreBlock {
            hash: SequenceHash::new(h),
            parent: None,
            bytes: &bytes,
        };
        let tier = open();
        assert_eq!(tier.put(&[block(1), block(2)]), vec![PutOutcome::Stored; 2]);
        let g = tier.geometry();
        drop(tier);
        // Rewrite slot 0's header with the largest generation, its checksum recomputed.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let at = g.slot_offset(0) + g.header_in_slot() as u64;
        let mut page = vec![0u8; PAGE];
        file.read_exact_at(&mut page, at).unwrap();
        let HeaderRead::Valid(mut h) = SlotHeader::decode(&page) else {
            panic!("slot 0 holds a block");
        };
        h.generation = u64::MAX;
        h.encode(&mut page);
        file.write_all_at(&page, at).unwrap();
        file.sync_all().unwrap();
        drop(file);

        let tier = open();
        assert_eq!(tier.recovery().recovered(), 1);
        assert_eq!(tier.recovery().torn, 1);
        assert_eq!(tier.put(&[block(3)]), vec![PutOutcome::Stored]);
        let newest = tier.generation.load(Ordering::Relaxed);
        assert!(newest < MAX_GENERATION, "{newest}");
    }
}
