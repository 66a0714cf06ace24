//! Fault injection for tests and failure drills: make chosen copies of a transfer batch fail,
//! or store a wrong checksum, to check that nothing is lost or served corrupt when the real
//! thing happens. Install with [`TransferEngine::with_faults`](crate::TransferEngine::with_faults);
//! an engine without one pays a single branch per batch.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use kvbm_logical::BlockId;
use parking_lot::Mutex;

use crate::storage::MemoryKind;

/// Decides which operations fail. Every method defaults to "no fault".
pub trait FaultInjector: Send + Sync + fmt::Debug {
    /// Called once per transfer batch that passed validation, before anything is copied;
    /// returns the indices (into `pairs`) of the pairs whose copy fails, in any order (an
    /// index past `pairs` is ignored). Their destination
    /// blocks are overwritten with garbage (host memory) and reported in
    /// [`TransferError::CopyFailed`](crate::TransferError::CopyFailed).
    fn failed_pairs(
        &self,
        src: MemoryKind,
        dst: MemoryKind,
        pairs: &[(BlockId, BlockId)],
    ) -> Vec<usize> {
        let _ = (src, dst, pairs);
        Vec::new()
    }

    /// Called before each slab allocation of [`Layout::allocate_with_faults`]; `true` makes it
    /// fail with [`StorageError::AllocationFailed`](crate::StorageError::AllocationFailed).
    ///
    /// [`Layout::allocate_with_faults`]: crate::Layout::allocate_with_faults
    fn fail_allocation(&self, kind: MemoryKind, bytes: usize) -> bool {
        let _ = (kind, bytes);
        false
    }

    /// Called when a transfer records a destination block's checksum; `true` records a wrong
    /// one, as if the bytes were corrupted in that tier afterwards.
    fn corrupt_checksum(&self, block: BlockId) -> bool {
        let _ = block;
        false
    }

    /// GPU strategies only: called once per batch before its `runs` coalesced copies are
    /// handed to the driver; `Some(k)` makes the enqueue fail at run `k`, as a driver error
    /// would: runs before `k` are really enqueued (and land), the rest are not (the batched
    /// driver call and the kernel enqueue in one call, so for them any `k` fails them all).
    fn failed_enqueue(&self, strategy: crate::Strategy, runs: usize) -> Option<usize> {
        let _ = (strategy, runs);
        None
    }

    /// GPU strategies only: called once per batch after its copies were enqueued; `true`
    /// makes recording the completion event fail (as `cuEventRecord` can), so the engine
    /// must find out by other means whether the enqueued copies landed.
    fn fail_event_record(&self) -> bool {
        false
    }
}

/// A scripted [`FaultInjector`]: fails chosen pairs of chosen batches (counted from 0 in the
/// order the engine sees them), corrupts chosen checksum records, and (GPU strategies)
/// fails chosen enqueues and event records (each counted likewise, separately).
///
/// ```
/// use std::sync::Arc;
/// use kvbm_logical::BlockId;
/// use kvbm_physical::{
///     CopyOptions, FaultPlan, Layout, LayoutConfig, LayoutKind, TransferEngine, TransferError,
/// };
/// let c = LayoutConfig { num_blocks: 4, num_layers: 1, outer_dim: 1, page_size: 4, inner_dim: 4, dtype_bytes: 1 };
/// let (a, b) = (Layout::system(LayoutKind::FullyContiguous, c)?.into_shared(),
///               Layout::system(LayoutKind::FullyContiguous, c)?.into_shared());
/// let engine = TransferEngine::host().with_faults(Arc::new(FaultPlan::new().fail_pairs(0, [1])));
/// let pairs = [(BlockId::new(0), BlockId::new(0)), (BlockId::new(1), BlockId::new(1))];
/// let err = engine.copy_blocks_blocking(&a, &b, &pairs, &CopyOptions::default()).unwrap_err();
/// assert!(matches!(err, TransferError::CopyFailed { ref failed, .. } if failed == &[1]));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Default)]
pub struct FaultPlan {
    copies: Mutex<HashMap<u64, Vec<usize>>>,
    checksums: Mutex<Vec<u64>>,
    allocations: Mutex<Vec<u64>>,
    enqueues: Mutex<HashMap<u64, usize>>,
    events: Mutex<Vec<u64>>,
    batches: AtomicU64,
    records: AtomicU64,
    allocated: AtomicU64,
    enqueued: AtomicU64,
    recorded: AtomicU64,
}

impl FaultPlan {
    /// No faults yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Batch number `batch` (0-based) fails the copies of pairs `pairs` (indices).
    pub fn fail_pairs(self, batch: u64, pairs: impl IntoIterator<Item = usize>) -> Self {
        self.copies.lock().entry(batch).or_default().extend(pairs);
        self
    }

    /// Checksum record number `record` (0-based, across all transfers) is stored wrong.
    pub fn corrupt_checksum_record(self, record: u64) -> Self {
        self.checksums.lock().push(record);
        self
    }

    /// Slab allocation number `allocation` (0-based) fails.
    pub fn fail_allocation(self, allocation: u64) -> Self {
        self.allocations.lock().push(allocation);
        self
    }

    /// GPU enqueue number `enqueue` (0-based, one per GPU batch) fails at run `run`.
    pub fn fail_enqueue(self, enqueue: u64, run: usize) -> Self {
        self.enqueues.lock().insert(enqueue, run);
        self
    }

    /// Recording the completion event of GPU batch number `batch` (0-based, counted over
    /// GPU batches) fails.
    pub fn fail_event_record(self, batch: u64) -> Self {
        self.events.lock().push(batch);
        self
    }

    /// Batches seen so far.
    pub fn batches_seen(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }
}

impl FaultInjector for FaultPlan {
    fn failed_pairs(
        &self,
        _src: MemoryKind,
        _dst: MemoryKind,
        pairs: &[(BlockId, BlockId)],
    ) -> Vec<usize> {
        let batch = self.batches.fetch_add(1, Ordering::Relaxed);
        let mut failed: Vec<usize> = self
            .copies
            .lock()
            .get(&batch)
            .map(|p| p.iter().copied().filter(|&i| i < pairs.len()).collect())
            .unwrap_or_default();
        failed.sort_unstable();
        failed.dedup();
        failed
    }

    fn fail_allocation(&self, _kind: MemoryKind, _bytes: usize) -> bool {
        let n = self.allocated.fetch_add(1, Ordering::Relaxed);
        self.allocations.lock().contains(&n)
    }

    fn corrupt_checksum(&self, _block: BlockId) -> bool {
        let record = self.records.fetch_add(1, Ordering::Relaxed);
        self.checksums.lock().contains(&record)
    }

    fn failed_enqueue(&self, _strategy: crate::Strategy, _runs: usize) -> Option<usize> {
        let n = self.enqueued.fetch_add(1, Ordering::Relaxed);
        self.enqueues.lock().get(&n).copied()
    }

    fn fail_event_record(&self) -> bool {
        let n = self.recorded.fetch_add(1, Ordering::Relaxed);
        self.events.lock().contains(&n)
    }
}
