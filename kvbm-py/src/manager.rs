//! `kvbm.BlockManager`: one `kvbm_logical::BlockManager<Device>`, translated.

use kvbm_logical::{
    BlockDuplicationPolicy, Device, EvictionBackend, FrequencyTracking, PoolCounts, SequenceHash,
};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::batch::{self, run};
use crate::block_batch::{self, BlockBatch};
use crate::errors::{self, ConfigError};
use crate::events::EventStream;

/// Parses an eviction backend name (`EvictionBackend::name`).
pub(crate) fn eviction(name: &str) -> PyResult<EvictionBackend> {
    EvictionBackend::ALL
        .into_iter()
        .find(|b| b.name() == name)
        .ok_or_else(|| {
            let names: Vec<&str> = EvictionBackend::ALL.iter().map(|b| b.name()).collect();
            ConfigError::new_err(format!(
                "unknown eviction backend {name:?}: expected one of {}",
                names.join(", ")
            ))
        })
}

fn duplication(name: &str) -> PyResult<BlockDuplicationPolicy> {
    match name {
        "reject" => Ok(BlockDuplicationPolicy::Reject),
        "allow" => Ok(BlockDuplicationPolicy::Allow),
        _ => Err(ConfigError::new_err(format!(
            "unknown duplication policy {name:?}: expected \"reject\" or \"allow\""
        ))),
    }
}

pub(crate) fn frequency(name: &str) -> PyResult<FrequencyTracking> {
    match name {
        "disabled" => Ok(FrequencyTracking::Disabled),
        "small" => Ok(FrequencyTracking::Small),
        "medium" => Ok(FrequencyTracking::Medium),
        "large" => Ok(FrequencyTracking::Large),
        _ => Err(ConfigError::new_err(format!(
            "unknown frequency tracking {name:?}: expected disabled, small, medium or large"
        ))),
    }
}

/// Builds a manager from the Python keyword arguments.
#[allow(clippy::too_many_arguments)]
pub(crate) fn build<T: kvbm_logical::BlockTier>(
    block_count: usize,
    block_size: usize,
    eviction_name: Option<&str>,
    duplication_name: &str,
    frequency_name: Option<&str>,
    max_pinned_fraction: f64,
) -> PyResult<kvbm_logical::BlockManager<T>> {
    let mut builder = kvbm_logical::BlockManager::<T>::builder()
        .block_count(block_count)
        .block_size(block_size)
        .duplication_policy(duplication(duplication_name)?)
        .max_pinned_fraction(max_pinned_fraction);
    if let Some(name) = eviction_name {
        builder = builder.eviction(eviction(name)?);
    }
    if let Some(name) = frequency_name {
        builder = builder.frequency_tracking(frequency(name)?);
    }
    builder.build().map_err(errors::config)
}

pub(crate) fn counts_dict<'py>(py: Python<'py>, c: PoolCounts) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("total", c.total)?;
    d.set_item("reset", c.reset)?;
    d.set_item("inactive", c.inactive)?;
    d.set_item("mutable", c.mutable)?;
    d.set_item("active", c.active)?;
    d.set_item("registered_hashes", c.registered_hashes)?;
    d.set_item("duplicates", c.duplicates)?;
    d.set_item("pinned", c.pinned)?;
    Ok(d)
}

/// A pool of fixed-size KV cache blocks: allocation, registration by sequence hash, prefix
/// matching, eviction, pins, events and metrics.
#[pyclass(module = "kvbm", name = "BlockManager", frozen)]
pub(crate) struct BlockManager {
    pub(crate) inner: kvbm_logical::BlockManager<Device>,
}

impl BlockManager {
    fn mid(&self) -> u64 {
        self.inner.id().get()
    }
}

#[pymethods]
impl BlockManager {
    #[new]
    #[pyo3(signature = (block_count, block_size, eviction = None, duplication = "reject", frequency_tracking = None, max_pinned_fraction = 0.0))]
    fn new(
        block_count: usize,
        block_size: usize,
        eviction: Option<&str>,
        duplication: &str,
        frequency_tracking: Option<&str>,
        max_pinned_fraction: f64,
    ) -> PyResult<Self> {
        Ok(Self {
            inner: build(
                block_count,
                block_size,
                eviction,
                duplication,
                frequency_tracking,
                max_pinned_fraction,
            )?,
        })
    }

    /// Allocates `count` blocks, all or nothing (evicting inactive blocks when the free pool
    /// is short). Raises `AllocationError` (with `available`) and takes nothing if it cannot.
    fn allocate<'py>(&self, py: Python<'py>, count: usize) -> PyResult<Bound<'py, PyList>> {
        let m = &self.inner;
        let blocks =
            run(py, count, || m.allocate_blocks(count)).map_err(|e| errors::allocation(py, e))?;
        batch::mutable_list(py, blocks, &None, m.block_size())
    }

    /// Like `allocate`, and also returns the hashes eviction removed, in eviction order.
    fn allocate_with_evictions<'py>(
        &self,
        py: Python<'py>,
        count: usize,
    ) -> PyResult<(Bound<'py, PyList>, Vec<u64>)> {
        let m = &self.inner;
        let (blocks, evicted) = run(py, count, || m.allocate_blocks_with_evictions(count))
            .map_err(|e| errors::allocation(py, e))?;
        let list = batch::mutable_list(py, blocks, &None, m.block_size())?;
        Ok((
            list,
            evicted.into_iter().map(SequenceHash::as_u64).collect(),
        ))
    }

    /// Registers blocks, making them matchable, and returns one `ImmutableBlock` per input,
    /// in order. Either `blocks` are `CompleteBlock`s (staged), or `hashes` is given and
    /// `blocks` are `MutableBlock`s staged here: block `i` gets `hashes[i]` and the parent
    /// `hashes[i-1]` (the first one `parent`). Every input handle is consumed. A duplicate
    /// hash returns the block already registered (policy "reject"). Refused (wrong type,
    /// another manager's block, a released one, a block listed twice): nothing changes.
    /// `blocks` may also be a `BlockBatch` from `allocate_batch` (with `hashes`): the
    /// result is then one registered `BlockBatch` and the input batch is consumed.
    #[pyo3(signature = (blocks, hashes = None, parent = None))]
    fn register<'py>(
        &self,
        py: Python<'py>,
        blocks: &Bound<'py, PyAny>,
        hashes: Option<&Bound<'py, PyAny>>,
        parent: Option<u64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let m = &self.inner;
        if let Some(b) = block_batch::as_batch(blocks) {
            let out = block_batch::register(
                py,
                b,
                hashes,
                parent,
                self.mid(),
                m.block_size(),
                |staged| {
                    m.register_blocks(staged)
                        .map_err(|e| (e.to_string(), e.into_blocks()))
                },
            )?;
            return Ok(Bound::new(py, out)?.into_any());
        }
        let (staged, mut guard) =
            batch::stage_for_register(blocks, hashes, parent, self.mid(), m.block_size())?;
        let n = staged.len();
        match run(py, n, || m.register_blocks(staged)) {
            Ok(handles) => Ok(batch::immutable_list(py, handles, &None)?.into_any()),
            Err(e) => {
                let msg = e.to_string();
                guard.restore(e.into_blocks());
                Err(crate::errors::ForeignBlockError::new_err(msg))
            }
        }
    }

    /// Allocates `count` blocks, all or nothing, as one `BlockBatch` (one Python object for
    /// the whole batch: the fast path; see `allocate` for the errors).
    fn allocate_batch(&self, py: Python<'_>, count: usize) -> PyResult<BlockBatch> {
        let m = &self.inner;
        let blocks =
            run(py, count, || m.allocate_blocks(count)).map_err(|e| errors::allocation(py, e))?;
        Ok(BlockBatch::mutable(
            blocks,
            self.mid(),
            &None,
            m.block_size(),
        ))
    }

    /// `match` returning one registered `BlockBatch` (possibly empty) instead of a list.
    fn match_batch(&self, py: Python<'_>, hashes: &Bound<'_, PyAny>) -> PyResult<BlockBatch> {
        let hashes = batch::hashes(hashes)?;
        let m = &self.inner;
        let found = run(py, hashes.len(), || m.match_blocks(&hashes));
        Ok(BlockBatch::immutable(
            found,
            self.mid(),
            &None,
            m.block_size(),
        ))
    }

    /// Prefix match: a handle for each registered hash of `hashes`, in order, stopping at the
    /// first miss. Inactive hits become active (held by the returned handles).
    #[pyo3(name = "match")]
    fn match_<'py>(
        &self,
        py: Python<'py>,
        hashes: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyList>> {
        let hashes = batch::hashes(hashes)?;
        let m = &self.inner;
        let found = run(py, hashes.len(), || m.match_blocks(&hashes));
        batch::immutable_list(py, found, &None)
    }

    /// Every registered hash among `hashes` (skipping misses). Without `touch` the scan
    /// leaves no trace in the eviction order.
    #[pyo3(signature = (hashes, touch = false))]
    fn scan<'py>(
        &self,
        py: Python<'py>,
        hashes: &Bound<'py, PyAny>,
        touch: bool,
    ) -> PyResult<Bound<'py, PyList>> {
        let hashes = batch::hashes(hashes)?;
        let m = &self.inner;
        let found = run(py, hashes.len(), || m.scan_matches(&hashes, touch));
        batch::immutable_list(py, found, &None)
    }

    /// Whether a block is registered under `hash` (no side effect).
    fn contains(&self, hash: u64) -> bool {
        self.inner.contains(SequenceHash::new(hash))
    }

    /// Marks the inactive blocks among `hashes` as just used; returns how many.
    fn touch(&self, hashes: &Bound<'_, PyAny>) -> PyResult<usize> {
        Ok(self.inner.touch_blocks(&batch::hashes(hashes)?))
    }

    /// Releases handles of this manager (any mix of the three classes), in one batch, or one
    /// `BlockBatch`. Already-released handles are skipped; returns how many were released.
    fn release(&self, py: Python<'_>, blocks: &Bound<'_, PyAny>) -> PyResult<usize> {
        if let Some(b) = block_batch::as_batch(blocks) {
            return block_batch::release(py, b, self.mid());
        }
        batch::release(py, blocks, self.mid())
    }

    /// Keeps the blocks of `hashes` out of eviction (all or nothing, within the pin budget);
    /// returns how many were newly pinned.
    fn pin(&self, hashes: &Bound<'_, PyAny>) -> PyResult<usize> {
        self.inner.pin(&batch::hashes(hashes)?).map_err(errors::pin)
    }

    /// Unpins; returns how many were pinned.
    fn unpin(&self, hashes: &Bound<'_, PyAny>) -> PyResult<usize> {
        Ok(self.inner.unpin(&batch::hashes(hashes)?))
    }

    /// Removes the inactive blocks of `hashes` from the cache; returns how many moved.
    fn invalidate(&self, hashes: &Bound<'_, PyAny>) -> PyResult<usize> {
        Ok(self.inner.invalidate_blocks(&batch::hashes(hashes)?))
    }

    /// Empties the inactive pool; returns how many blocks moved to the free pool. Blocks
    /// still held by handles stay where they are, and registered (matchable again once
    /// released): after a weight update use `purge_all`. Broken accounting raises
    /// `InvariantError`.
    fn reset_inactive_pool(&self) -> PyResult<usize> {
        match self.inner.reset_inactive_pool() {
            Ok(moved) => Ok(moved),
            Err(kvbm_logical::ResetError::BlocksInUse { moved, .. }) => Ok(moved),
            Err(e) => Err(crate::errors::InvariantError::new_err(e.to_string())),
        }
    }

    /// Removes every registered block from the cache, held ones too (after loading other
    /// weights, say): inactive blocks go to the free pool now, held ones are no longer
    /// matchable and go to the free pool when released. Returns `(reset, detached)`.
    fn purge_all(&self, py: Python<'_>) -> (usize, usize) {
        let m = &self.inner;
        let p = py.detach(|| m.purge_all());
        (p.reset, p.detached)
    }

    /// Subscribes to this manager's cache events (`capacity` batches may wait before more
    /// are dropped and counted).
    #[pyo3(signature = (capacity = 1024))]
    fn subscribe(&self, capacity: usize) -> EventStream {
        EventStream::new(self.inner.subscribe(capacity))
    }

    /// Where every block is: a dict with total, reset, inactive, mutable, active,
    /// registered_hashes, duplicates, pinned.
    fn counts<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        counts_dict(py, self.inner.counts())
    }

    /// Recounts every slot and checks the pool's invariants; returns the counts, or raises
    /// `InvariantError`.
    fn check_invariants<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let m = &self.inner;
        let counts = py
            .detach(|| m.check_invariants())
            .map_err(errors::invariant)?;
        counts_dict(py, counts)
    }

    /// The manager's counters and gauges, as a dict.
    fn metrics<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        crate::events::metrics_dict(py, self.inner.metrics().snapshot())
    }

    /// The metrics in Prometheus text exposition format.
    fn prometheus(&self) -> String {
        self.inner.metrics().render_prometheus()
    }

    /// Blocks an allocation could take now (free + inactive).
    #[getter]
    fn available_blocks(&self) -> usize {
        self.inner.available_blocks()
    }

    /// Blocks managed.
    #[getter]
    fn total_blocks(&self) -> usize {
        self.inner.total_blocks()
    }

    /// Tokens per block.
    #[getter]
    fn block_size(&self) -> usize {
        self.inner.block_size()
    }

    /// The eviction backend's name.
    #[getter]
    fn eviction(&self) -> &'static str {
        self.inner.eviction_backend().name()
    }

    /// The process-unique manager id (handles carry it as `manager_id`).
    #[getter]
    fn id(&self) -> u64 {
        self.inner.id().get()
    }

    /// The most blocks that may be pinned at once.
    #[getter]
    fn pin_budget(&self) -> usize {
        self.inner.pin_budget()
    }

    fn __repr__(&self) -> String {
        format!(
            "BlockManager(block_count={}, block_size={}, eviction={:?})",
            self.inner.total_blocks(),
            self.inner.block_size(),
            self.inner.eviction_backend().name()
        )
    }
}
