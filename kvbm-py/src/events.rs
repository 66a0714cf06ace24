//! Cache events as a Python iterator, and the metrics snapshot as a dict.

use std::collections::VecDeque;
use std::time::Duration;

use kvbm_logical::{EventBatch, EventSubscriber, KvEventKind, MetricsSnapshot, SequenceHash};
use parking_lot::Mutex;
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// One cache event. `kind` is "stored", "removed" or "cleared"; `seq` increases by one per
/// event of a manager (a gap means events were dropped for a slow subscriber).
#[pyclass(module = "kvbm", name = "Event", frozen, get_all)]
pub(crate) struct Event {
    /// Sequence number (per manager).
    seq: u64,
    /// The manager that emitted it.
    manager: u64,
    /// "stored", "removed" or "cleared".
    kind: &'static str,
    /// The hashes stored or removed, in chain order for "stored".
    block_hashes: Vec<u64>,
    /// For "stored": the first block's parent, if known.
    parent: Option<u64>,
    /// For "stored": the tier's name ("device", "host", ...).
    tier: Option<&'static str>,
    /// For "removed": "evicted", "reset", "demoted", "invalidated" or "released" (a
    /// request that does not cache released its blocks).
    reason: Option<&'static str>,
}

#[pymethods]
impl Event {
    fn __repr__(&self) -> String {
        format!(
            "Event(seq={}, kind={:?}, block_hashes=[{} hashes], parent={:?}, tier={:?}, reason={:?})",
            self.seq,
            self.kind,
            self.block_hashes.len(),
            self.parent,
            self.tier,
            self.reason
        )
    }
}

fn hashes(h: &[SequenceHash]) -> Vec<u64> {
    h.iter().map(|h| h.as_u64()).collect()
}

fn convert(batch: &EventBatch, out: &mut VecDeque<Event>) {
    for e in batch.iter() {
        let (kind, block_hashes, parent, tier, reason) = match &e.kind {
            // `..`: newer kvbm-logical adds fields (block size, token ids) not exposed here.
            KvEventKind::Stored {
                block_hashes,
                parent,
                tier,
                ..
            } => (
                "stored",
                hashes(block_hashes),
                parent.map(SequenceHash::as_u64),
                Some(*tier),
                None,
            ),
            KvEventKind::Removed {
                block_hashes,
                reason,
                ..
            } => (
                "removed",
                hashes(block_hashes),
                None,
                None,
                Some(reason.as_str()),
            ),
            KvEventKind::Cleared => ("cleared", Vec::new(), None, None, None),
            _ => ("unknown", Vec::new(), None, None, None),
        };
        out.push_back(Event {
            seq: e.seq,
            manager: e.manager.get(),
            kind,
            block_hashes,
            parent,
            tier,
            reason,
        });
    }
}

/// A subscription to a manager's events. Iterating yields the events waiting now and stops
/// when none is left (iterate again later); `poll(timeout)` waits for the next batch with the
/// GIL released.
#[pyclass(module = "kvbm", name = "EventStream", frozen)]
pub(crate) struct EventStream {
    /// `None` only while `poll` waits with the GIL released (it holds the subscriber then).
    rx: Mutex<Option<EventSubscriber>>,
    ready: Mutex<VecDeque<Event>>,
    /// The subscriber's dropped count as last seen (readable while `poll` holds it).
    dropped: std::sync::atomic::AtomicU64,
}

impl EventStream {
    pub(crate) fn new(rx: EventSubscriber) -> Self {
        Self {
            rx: Mutex::new(Some(rx)),
            ready: Mutex::new(VecDeque::new()),
            dropped: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Notes the subscriber's dropped count.
    fn seen(&self, rx: &EventSubscriber) {
        self.dropped
            .store(rx.dropped_events(), std::sync::atomic::Ordering::Relaxed);
    }
}

#[pymethods]
impl EventStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self) -> Option<Event> {
        let mut ready = self.ready.lock();
        if ready.is_empty()
            && let Some(rx) = self.rx.lock().as_ref()
        {
            for batch in rx.drain() {
                convert(&batch, &mut ready);
            }
            self.seen(rx);
        }
        ready.pop_front()
    }

    /// Every event waiting now, waiting up to `timeout` seconds (GIL released) for the first
    /// batch if none is. `None`: do not wait. Another thread may use the stream meanwhile
    /// (it sees no new events until the wait ends).
    #[pyo3(signature = (timeout = None))]
    fn poll(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Vec<Event>> {
        let mut out: Vec<Event> = self.ready.lock().drain(..).collect();
        let mut more = VecDeque::new();
        let Some(rx) = self.rx.lock().take() else {
            return Ok(out);
        };
        for batch in rx.drain() {
            convert(&batch, &mut more);
        }
        let mut result = Ok(());
        let rx = match timeout {
            Some(secs) if out.is_empty() && more.is_empty() => {
                match Duration::try_from_secs_f64(secs.max(0.0)) {
                    Ok(wait) => {
                        let (rx, batch) = py.detach(move || {
                            let batch = rx.recv_timeout(wait);
                            (rx, batch)
                        });
                        if let Some(batch) = batch {
                            convert(&batch, &mut more);
                        }
                        rx
                    }
                    Err(e) => {
                        result = Err(pyo3::exceptions::PyValueError::new_err(format!(
                            "timeout: {e}"
                        )));
                        rx
                    }
                }
            }
            _ => rx,
        };
        self.seen(&rx);
        *self.rx.lock() = Some(rx);
        result?;
        out.extend(more);
        Ok(out)
    }

    /// Events dropped because this subscriber fell behind.
    #[getter]
    fn dropped_events(&self) -> u64 {
        match self.rx.lock().as_ref() {
            Some(rx) => {
                self.seen(rx);
                rx.dropped_events()
            }
            None => self.dropped.load(std::sync::atomic::Ordering::Relaxed),
        }
    }
}

pub(crate) fn metrics_dict<'py>(
    py: Python<'py>,
    s: MetricsSnapshot,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("allocations_from_reset", s.allocations_from_reset)?;
    d.set_item("allocations_from_eviction", s.allocations_from_eviction)?;
    d.set_item("removed_evicted", s.removed_evicted)?;
    d.set_item("removed_reset", s.removed_reset)?;
    d.set_item("removed_demoted", s.removed_demoted)?;
    d.set_item("removed_invalidated", s.removed_invalidated)?;
    d.set_item("removed_released", s.removed_released)?;
    d.set_item("registrations", s.registrations)?;
    d.set_item("dedups", s.dedups)?;
    d.set_item("duplicates", s.duplicates)?;
    d.set_item("stagings", s.stagings)?;
    d.set_item("match_requested", s.match_requested)?;
    d.set_item("match_returned", s.match_returned)?;
    d.set_item("scan_requested", s.scan_requested)?;
    d.set_item("scan_returned", s.scan_returned)?;
    d.set_item("events_dropped", s.events_dropped)?;
    d.set_item("reset_blocks", s.reset_blocks)?;
    d.set_item("inactive_blocks", s.inactive_blocks)?;
    d.set_item("mutable_blocks", s.mutable_blocks)?;
    d.set_item("active_blocks", s.active_blocks)?;
    d.set_item("pinned_blocks", s.pinned_blocks)?;
    Ok(d)
}
