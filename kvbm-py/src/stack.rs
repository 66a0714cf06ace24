//! `kvbm.TierStack`: G1 (system memory, or CUDA device memory when a GPU is present) over G2
//! (host memory), with asynchronous offload and plan-then-commit onboarding
//! (`kvbm_physical::stack`).

use std::sync::Arc;

use kvbm_logical::{Device, Host};
use kvbm_physical::stack::{EngineSync, OnboardError, Watermarks, WriteMode};
use kvbm_physical::{CudaDevice, Layout, LayoutConfig, LayoutKind, TransferEngine};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::batch::{self, run};
use crate::block_batch::{self, BlockBatch};
use crate::blocks::Memory;
use crate::errors::{self, ConfigError, ReleasedError};
use crate::manager;

fn layout_kind(name: &str) -> PyResult<LayoutKind> {
    match name {
        "fully_contiguous" => Ok(LayoutKind::FullyContiguous),
        "layer_separate" => Ok(LayoutKind::LayerSeparate),
        "outer_first" => Ok(LayoutKind::OuterFirst),
        _ => Err(ConfigError::new_err(format!(
            "unknown layout {name:?}: expected fully_contiguous, layer_separate or outer_first"
        ))),
    }
}

/// "cpu" → None; "cuda" / "cuda:N" → Some(N).
fn cuda_ordinal(device: &str) -> PyResult<Option<usize>> {
    match device {
        "cpu" => Ok(None),
        "cuda" => Ok(Some(0)),
        d => d
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(Some)
            .ok_or_else(|| {
                ConfigError::new_err(format!(
                    "unknown device {d:?}: expected \"cpu\", \"cuda\" or \"cuda:N\""
                ))
            }),
    }
}

/// The tier stack: the scheduler allocates and registers G1 blocks through it; offloads to
/// G2 and onboarding copies run on worker threads, and no call waits on a copy except
/// `Pending.wait()` and `flush()` (both release the GIL). `stores=[DiskStore(...),
/// RedisStore(...)]` adds store tiers below G2 (the first is G3): every block registered in
/// G2 is copied down to each, and `lookup` plans blocks from them (a disk tier is asked on
/// lookup, a Redis tier fetched by the onboard job). `write_mode="write_back"` offloads on
/// eviction, keeping `low_watermark..high_watermark` G1 blocks free; under write-through,
/// watermarks (if given) are a free reserve: a worker evicts the coldest G1 blocks ahead of
/// allocations (their copies are in G2), so that allocating seldom evicts on the caller's
/// thread. `worker_linger` (seconds, default 0.002) is how long an idle worker polls the
/// queue before it parks, so that a push seldom pays a thread wake-up.
#[pyclass(module = "kvbm", name = "TierStack", frozen)]
pub(crate) struct TierStack {
    inner: kvbm_physical::TierStack,
    memory: Memory,
    block_size: usize,
    g1_id: u64,
}

#[pymethods]
impl TierStack {
    #[new]
    #[pyo3(signature = (
        g1_blocks, g2_blocks, block_size, *, num_layers = 2, outer_dim = 2, inner_dim = 64,
        dtype_bytes = 2, device = "cpu", g1_layout = "layer_separate",
        g2_layout = "fully_contiguous", eviction = None, g2_eviction = None,
        write_mode = "write_through", low_watermark = None, high_watermark = None,
        workers = None, max_queued_blocks = None, stores = None, worker_linger = None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        g1_blocks: usize,
        g2_blocks: usize,
        block_size: usize,
        num_layers: usize,
        outer_dim: usize,
        inner_dim: usize,
        dtype_bytes: usize,
        device: &str,
        g1_layout: &str,
        g2_layout: &str,
        eviction: Option<&str>,
        g2_eviction: Option<&str>,
        write_mode: &str,
        low_watermark: Option<usize>,
        high_watermark: Option<usize>,
        workers: Option<usize>,
        max_queued_blocks: Option<usize>,
        stores: Option<&Bound<'_, PyAny>>,
        worker_linger: Option<f64>,
    ) -> PyResult<Self> {
        let config = |n| LayoutConfig {
            num_blocks: n,
            num_layers,
            outer_dim,
            page_size: block_size,
            inner_dim,
            dtype_bytes,
        };
        let (k1, k2) = (layout_kind(g1_layout)?, layout_kind(g2_layout)?);
        // Under write-through the watermarks, if given, are a free reserve.
        let mut reserve = None;
        let mode = match write_mode {
            "write_through" => {
                if low_watermark.is_some() || high_watermark.is_some() {
                    let low = low_watermark.unwrap_or(g1_blocks / 16);
                    let high = high_watermark.unwrap_or(g1_blocks / 8);
                    reserve = Some(Watermarks::new(low, high));
                }
                WriteMode::WriteThrough
            }
            "write_back" => {
                let low = low_watermark.unwrap_or(g1_blocks / 8);
                let high = high_watermark.unwrap_or(g1_blocks / 4);
                WriteMode::WriteBack(Watermarks::new(low, high))
            }
            other => {
                return Err(ConfigError::new_err(format!(
                    "unknown write_mode {other:?}: expected write_through or write_back"
                )));
            }
        };
        let g1m = manager::build::<Device>(g1_blocks, block_size, eviction, "reject", None, 0.0)?;
        let g2m = manager::build::<Host>(g2_blocks, block_size, g2_eviction, "reject", None, 0.0)?;
        let ordinal = cuda_ordinal(device)?;
        // Allocating and touching the slabs can take a while: without the GIL.
        let (l1, l2, engine) = py.detach(|| -> PyResult<_> {
            match ordinal {
                None => Ok((
                    Layout::system(k1, config(g1_blocks)).map_err(errors::layout)?,
                    Layout::system(k2, config(g2_blocks)).map_err(errors::layout)?,
                    TransferEngine::host(),
                )),
                Some(n) => {
                    let cuda = CudaDevice::open(n).map_err(errors::storage)?;
                    Ok((
                        Layout::device(k1, config(g1_blocks), &cuda).map_err(errors::layout)?,
                        Layout::pinned(k2, config(g2_blocks), &cuda).map_err(errors::layout)?,
                        TransferEngine::with_cuda(cuda),
                    ))
                }
            }
        })?;
        let store_tiers =
            crate::stores::open_all(py, stores, &config(g2_blocks), l2.block_bytes())?;
        let l1 = l1.into_shared();
        let g1_id = g1m.id().get();
        let mut builder = kvbm_physical::TierStack::builder()
            .g1(g1m, Arc::clone(&l1))
            .g2(g2m, l2.into_shared())
            .engine(engine)
            .write_mode(mode);
        if let Some(w) = workers {
            builder = builder.workers(w);
        }
        if let Some(q) = max_queued_blocks {
            builder = builder.max_queued_blocks(q);
        }
        if let Some(r) = reserve {
            builder = builder.free_reserve(r);
        }
        if let Some(seconds) = worker_linger {
            let linger = std::time::Duration::try_from_secs_f64(seconds).map_err(|_| {
                ConfigError::new_err(format!(
                    "worker_linger must be a non-negative number of seconds, got {seconds}"
                ))
            })?;
            builder = builder.worker_linger(linger);
        }
        for store in store_tiers {
            builder = builder.store(store);
        }
        let inner = builder.build().map_err(errors::config)?;
        Ok(Self {
            inner,
            memory: Some(l1),
            block_size,
            g1_id,
        })
    }

    /// Fresh G1 blocks (all or nothing); their `view()`/`write()` reach the G1 memory.
    fn allocate<'py>(&self, py: Python<'py>, count: usize) -> PyResult<Bound<'py, PyList>> {
        let s = &self.inner;
        let blocks = run(py, count, || s.allocate(count)).map_err(|e| errors::allocation(py, e))?;
        batch::mutable_list(py, blocks, &self.memory, self.block_size)
    }

    /// Registers G1 blocks (as `BlockManager.register`); in write-through mode their copy to
    /// G2 is queued. A `BlockBatch` from `allocate_batch` (with `hashes`) gives one
    /// registered `BlockBatch`.
    #[pyo3(signature = (blocks, hashes = None, parent = None))]
    fn register<'py>(
        &self,
        py: Python<'py>,
        blocks: &Bound<'py, PyAny>,
        hashes: Option<&Bound<'py, PyAny>>,
        parent: Option<u64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let s = &self.inner;
        if let Some(b) = block_batch::as_batch(blocks) {
            let out = block_batch::register(
                py,
                b,
                hashes,
                parent,
                self.g1_id,
                self.block_size,
                |staged| {
                    s.register(staged, EngineSync::Ready)
                        .map_err(|e| (e.to_string(), e.into_blocks()))
                },
            )?;
            return Ok(Bound::new(py, out)?.into_any());
        }
        let (staged, mut guard) =
            batch::stage_for_register(blocks, hashes, parent, self.g1_id, self.block_size)?;
        match run(py, staged.len(), || s.register(staged, EngineSync::Ready)) {
            Ok(handles) => Ok(batch::immutable_list(py, handles, &self.memory)?.into_any()),
            Err(e) => {
                let msg = e.to_string();
                guard.restore(e.into_blocks());
                Err(errors::ForeignBlockError::new_err(msg))
            }
        }
    }

    /// Releases G1 handles of this stack (or one `BlockBatch`), in one batch; returns how
    /// many.
    fn release(&self, py: Python<'_>, blocks: &Bound<'_, PyAny>) -> PyResult<usize> {
        if let Some(b) = block_batch::as_batch(blocks) {
            return block_batch::release(py, b, self.g1_id);
        }
        batch::release(py, blocks, self.g1_id)
    }

    /// Fresh G1 blocks as one `BlockBatch` (all or nothing); `batch.view(i)`/`write(i, ..)`
    /// reach the G1 memory.
    fn allocate_batch(&self, py: Python<'_>, count: usize) -> PyResult<BlockBatch> {
        let s = &self.inner;
        let blocks = run(py, count, || s.allocate(count)).map_err(|e| errors::allocation(py, e))?;
        Ok(BlockBatch::mutable(
            blocks,
            self.g1_id,
            &self.memory,
            self.block_size,
        ))
    }

    /// Where each block of the prefix `hashes` is, across tiers (G1 and G2 hits are held by
    /// the plan, in place, until it is committed or released). Copies and allocates nothing.
    fn lookup(&self, py: Python<'_>, hashes: &Bound<'_, PyAny>) -> PyResult<Plan> {
        let hashes = batch::hashes(hashes)?;
        let s = &self.inner;
        let plan = run(py, hashes.len(), || s.lookup(&hashes));
        Ok(Plan { inner: Some(plan) })
    }

    /// Commits the first `limit` blocks of `plan` (default: all): allocates G1 destinations
    /// and queues the copies; returns a `Pending` at once. Consumes the plan, except when
    /// refused: `NoRoomError` (too few free G1 blocks now; `needed`, `available`) leaves the
    /// plan usable for a retry.
    #[pyo3(signature = (plan, limit = None))]
    fn onboard(&self, py: Python<'_>, plan: &mut Plan, limit: Option<usize>) -> PyResult<Pending> {
        let p = plan
            .inner
            .take()
            .ok_or_else(|| ReleasedError::new_err("this Plan was already committed or released"))?;
        let s = &self.inner;
        match py.detach(|| s.onboard(p, limit.unwrap_or(usize::MAX))) {
            Ok(pending) => Ok(Pending {
                canceller: pending.canceller(),
                inner: parking_lot::Mutex::new(Some(pending)),
                memory: self.memory.clone(),
                block_size: self.block_size,
            }),
            Err(e) => {
                let (msg, needed, available) = match &e {
                    OnboardError::NoRoom {
                        needed, available, ..
                    } => (e.to_string(), *needed, *available),
                    other => (other.to_string(), 0, 0),
                };
                let foreign = matches!(e, OnboardError::ForeignPlan { .. });
                plan.inner = Some(e.into_plan());
                if foreign {
                    return Err(errors::ForeignBlockError::new_err(msg));
                }
                Err(errors::with_attrs::<errors::NoRoomError>(
                    py,
                    msg,
                    &[("needed", needed), ("available", available)],
                ))
            }
        }
    }

    /// Waits (GIL released) until no copy is queued or running.
    fn flush(&self, py: Python<'_>) {
        let s = &self.inner;
        py.detach(|| s.flush());
    }

    /// Whether G2 holds each hash.
    fn g2_contains(&self, hashes: &Bound<'_, PyAny>) -> PyResult<Vec<bool>> {
        Ok(self.inner.g2().contains_each(&batch::hashes(hashes)?))
    }

    /// Whether store tier `index` (0 = G3, the first of `stores`) holds each hash (a disk
    /// tier answers from its index; a Redis tier asks the server).
    fn store_contains(
        &self,
        py: Python<'_>,
        index: usize,
        hashes: &Bound<'_, PyAny>,
    ) -> PyResult<Vec<bool>> {
        let hashes = batch::hashes(hashes)?;
        let store = self.inner.store(index).ok_or_else(|| {
            pyo3::exceptions::PyIndexError::new_err(format!(
                "no store tier {index}: the stack has {}",
                self.inner.store_count()
            ))
        })?;
        Ok(py.detach(|| store.contains(&hashes)))
    }

    /// How many store tiers the stack has (below G2).
    #[getter]
    fn store_count(&self) -> usize {
        self.inner.store_count()
    }

    /// Pool counts of G1 and G2: `{"g1": {...}, "g2": {...}}`.
    fn counts<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("g1", manager::counts_dict(py, self.inner.g1().counts())?)?;
        d.set_item("g2", manager::counts_dict(py, self.inner.g2().counts())?)?;
        Ok(d)
    }

    /// Checks both slot tiers' invariants; returns their counts or raises `InvariantError`.
    fn check_invariants<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        let g1 = self
            .inner
            .g1()
            .check_invariants()
            .map_err(errors::invariant)?;
        let g2 = self
            .inner
            .g2()
            .check_invariants()
            .map_err(errors::invariant)?;
        d.set_item("g1", manager::counts_dict(py, g1)?)?;
        d.set_item("g2", manager::counts_dict(py, g2)?)?;
        Ok(d)
    }

    /// Per-tier counters: `{"lookups", "onboards", ..., "tiers": [{"tier": "G1", ...}]}`.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.stats();
        let d = PyDict::new(py);
        d.set_item("lookups", s.lookups)?;
        d.set_item("onboards", s.onboards)?;
        d.set_item("cancelled", s.cancelled)?;
        d.set_item("not_now", s.not_now)?;
        d.set_item("reclaim_runs", s.reclaim_runs)?;
        d.set_item("reserve_behind", s.reserve_behind)?;
        d.set_item("panicked_jobs", s.panicked_jobs)?;
        d.set_item("queued_jobs", s.queued_jobs)?;
        d.set_item("running_jobs", s.running_jobs)?;
        let tiers = PyList::empty(py);
        for t in &s.tiers {
            let td = PyDict::new(py);
            td.set_item("tier", t.tier.to_string())?;
            td.set_item("offloaded", t.offloaded)?;
            td.set_item("offloaded_bytes", t.offloaded_bytes)?;
            td.set_item("onboarded", t.onboarded)?;
            td.set_item("onboarded_bytes", t.onboarded_bytes)?;
            td.set_item("lost", t.lost)?;
            td.set_item("lookup_hits", t.lookup_hits)?;
            td.set_item("skipped", t.skipped_total())?;
            tiers.append(td)?;
        }
        d.set_item("tiers", tiers)?;
        Ok(d)
    }

    /// The stack's counters in Prometheus text exposition format.
    fn prometheus(&self) -> String {
        self.inner.render_prometheus()
    }

    /// Bytes per block (one block image, fully contiguous order).
    #[getter]
    fn block_bytes(&self) -> usize {
        self.inner.g1().layout().block_bytes()
    }

    /// Tokens per block.
    #[getter]
    fn block_size(&self) -> usize {
        self.block_size
    }

    /// The memory G1 lives in: "system", "pinned" or "device".
    #[getter]
    fn g1_memory(&self) -> String {
        format!("{:?}", self.inner.g1().layout().memory())
    }
}

/// Where each block of a prefix is (see `TierStack.lookup`). Holds the plan's G1 and G2 hits
/// until committed by `TierStack.onboard` or released.
#[pyclass(module = "kvbm", name = "Plan")]
pub(crate) struct Plan {
    inner: Option<kvbm_physical::stack::Plan>,
}

impl Plan {
    fn live(&self) -> PyResult<&kvbm_physical::stack::Plan> {
        self.inner
            .as_ref()
            .ok_or_else(|| ReleasedError::new_err("this Plan was already committed or released"))
    }
}

#[pymethods]
impl Plan {
    fn __len__(&self) -> PyResult<usize> {
        self.live().map(|p| p.len())
    }

    /// How many blocks of the prefix are in G1 already.
    #[getter]
    fn g1_hits(&self) -> PyResult<usize> {
        self.live().map(|p| p.g1_hits())
    }

    /// Free G1 blocks committing the whole plan needs.
    #[getter]
    fn blocks_needed(&self) -> PyResult<usize> {
        self.live().map(|p| p.blocks_needed())
    }

    /// The planned hashes, in order.
    #[getter]
    fn hashes(&self) -> PyResult<Vec<u64>> {
        self.live()
            .map(|p| p.hashes().iter().map(|h| h.as_u64()).collect())
    }

    /// The tier of each planned block ("G1", "G2", "G3", ...).
    #[getter]
    fn tiers(&self) -> PyResult<Vec<String>> {
        let p = self.live()?;
        Ok((0..p.len())
            .filter_map(|i| p.tier(i).map(|t| t.to_string()))
            .collect())
    }

    /// Drops the plan (and its hold on its G1 and G2 hits). Releasing twice does nothing.
    fn release(&mut self) {
        self.inner = None;
    }
}

/// An onboard in flight: `ready`, `try_complete()` (never blocks), `wait()` (GIL released),
/// `cancel()` (or drop).
/// Frozen, with its state behind a lock: one thread may wait on it while another asks
/// whether it is ready (a borrow held across the wait would raise `RuntimeError` there).
#[pyclass(module = "kvbm", name = "Pending", frozen)]
pub(crate) struct Pending {
    /// `None` once completed or cancelled, and while `wait` waits (it holds the handle then).
    inner: parking_lot::Mutex<Option<kvbm_physical::stack::Pending>>,
    /// Cancels it while another thread waits on it.
    canceller: kvbm_physical::stack::Canceller,
    memory: Memory,
    /// G1's tokens per block (for the spare blocks' staging).
    block_size: usize,
}

fn onboarded(
    py: Python<'_>,
    done: kvbm_physical::stack::Onboarded,
    memory: &Memory,
    block_size: usize,
) -> PyResult<Onboarded> {
    let lost = done
        .lost
        .iter()
        .map(|l| {
            (
                l.hash.as_u64(),
                l.tier.to_string(),
                format!("{:?}", l.cause),
            )
        })
        .collect();
    let end = done
        .end
        .as_ref()
        .map(|e| (e.at, e.hash.as_u64(), format!("{:?}", e.reason)));
    let (g1_hits, n) = (done.g1_hits, done.onboarded);
    let blocks = batch::immutable_list(py, done.blocks, memory)?.unbind();
    let spare = batch::mutable_list(py, done.spare, memory, block_size)?.unbind();
    Ok(Onboarded {
        blocks,
        g1_hits,
        onboarded: n,
        lost,
        end,
        spare,
    })
}

#[pymethods]
impl Pending {
    /// Blocks committed (the prefix is at most this long; 0 once completed, cancelled, or
    /// while another thread waits on it).
    fn __len__(&self) -> usize {
        self.inner.lock().as_ref().map_or(0, |p| p.len())
    }

    /// Whether the onboard has finished (never blocks; false while another thread waits on
    /// it, which returns the result).
    #[getter]
    fn ready(&self) -> bool {
        self.inner.lock().as_ref().is_some_and(|p| p.is_ready())
    }

    /// The result if finished, else None. Never blocks.
    fn try_complete(&self, py: Python<'_>) -> PyResult<Option<Onboarded>> {
        let mut inner = self.inner.lock();
        let p = inner.take().ok_or_else(gone)?;
        match p.try_complete() {
            Ok(done) => {
                drop(inner);
                onboarded(py, done, &self.memory, self.block_size).map(Some)
            }
            Err(back) => {
                *inner = Some(back);
                Ok(None)
            }
        }
    }

    /// Waits for the onboard (GIL released) and returns its result.
    fn wait(&self, py: Python<'_>) -> PyResult<Onboarded> {
        let p = self.inner.lock().take().ok_or_else(gone)?;
        let done = py.detach(|| p.wait());
        onboarded(py, done, &self.memory, self.block_size)
    }

    /// Cancels: the G1 destinations go back to the free pool. Cancelling twice does nothing.
    /// While another thread waits on it, that wait returns early (with what the onboard had).
    fn cancel(&self, py: Python<'_>) {
        let p = self.inner.lock().take();
        match p {
            Some(p) => py.detach(|| drop(p)),
            None => self.canceller.cancel(),
        }
    }
}

fn gone() -> PyErr {
    ReleasedError::new_err(
        "this Pending already completed, was cancelled, or is being waited on by another thread",
    )
}

/// A completed onboard: `blocks` (the G1 prefix, registered), `g1_hits`, `onboarded`,
/// `lost` (`(hash, tier, cause)`), `end` (`(position, hash, reason)` if the prefix is
/// shorter than the plan), `spare` (fresh G1 `MutableBlock`s the commit allocated for
/// blocks past the prefix's end: compute those blocks into them instead of allocating
/// again; they go back to the free pool once released or dropped, so do not keep an
/// `Onboarded` alive with unused spares: `stack.release(done.spare)` returns them).
#[pyclass(module = "kvbm", name = "Onboarded", frozen, get_all)]
pub(crate) struct Onboarded {
    blocks: Py<PyList>,
    g1_hits: usize,
    onboarded: usize,
    lost: Vec<(u64, String, String)>,
    end: Option<(usize, u64, String)>,
    spare: Py<PyList>,
}
