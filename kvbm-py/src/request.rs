//! `kvbm.RequestSequence`: one request's tokens and block table
//! (`kvbm_logical::RequestSequence`), translated. The request owns its blocks: its block table
//! is a list of slot ids, and its blocks go back (tail first) on `preempt()`, `release()`,
//! leaving a `with` block, or garbage collection.

use kvbm_logical::Device;
use pyo3::prelude::*;
use pyo3::types::{PyList, PyRange};

use crate::batch::run;
use crate::block_batch::BlockBatch;
use crate::errors::{self, ConfigError, ReleasedError};
use crate::manager::BlockManager;

/// The most tokens `reserve_tokens` may reserve (64 MiB of token buffer): a larger
/// reservation is a `ConfigError`, never an out-of-memory abort.
pub(crate) const MAX_RESERVE_TOKENS: usize = 1 << 24;

/// Batches of at least this many tokens release the GIL while hashing/registering.
const DETACH_TOKENS: usize = 1024;

/// One request's token sequence and blocks.
#[pyclass(module = "kvbm", name = "RequestSequence")]
pub(crate) struct RequestSequence {
    inner: Option<kvbm_logical::RequestSequence<Device>>,
    manager: u64,
}

impl RequestSequence {
    fn live(&self) -> PyResult<&kvbm_logical::RequestSequence<Device>> {
        self.inner
            .as_ref()
            .ok_or_else(|| ReleasedError::new_err("this RequestSequence was released"))
    }

    fn live_mut(&mut self) -> PyResult<&mut kvbm_logical::RequestSequence<Device>> {
        self.inner
            .as_mut()
            .ok_or_else(|| ReleasedError::new_err("this RequestSequence was released"))
    }
}

/// What `RequestSequence.commit` did: `registered` (a `range` of block-table indices that
/// filled and were registered) and `changed` (`(index, old_block_id, new_block_id)` for each
/// entry that now names another slot because the hash was already cached).
#[pyclass(module = "kvbm", name = "Committed", frozen)]
pub(crate) struct Committed {
    start: usize,
    stop: usize,
    #[pyo3(get)]
    changed: Vec<(usize, u32, u32)>,
}

#[pymethods]
impl Committed {
    /// The block-table indices registered by the commit.
    #[getter]
    fn registered<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyRange>> {
        PyRange::new(py, self.start as isize, self.stop as isize)
    }

    fn __repr__(&self) -> String {
        format!(
            "Committed(registered=range({}, {}), changed={:?})",
            self.start, self.stop, self.changed
        )
    }
}

/// What `RequestSequence.truncate` did: `computed` (computed tokens now) and `changed_from`
/// (the first block-table entry that changed, or None).
#[pyclass(module = "kvbm", name = "Truncated", frozen, get_all)]
pub(crate) struct Truncated {
    computed: usize,
    changed_from: Option<usize>,
}

#[pymethods]
impl Truncated {
    fn __repr__(&self) -> String {
        format!(
            "Truncated(computed={}, changed_from={:?})",
            self.computed, self.changed_from
        )
    }
}

#[pymethods]
impl RequestSequence {
    /// A request served by `manager`, holding no block yet. `salt`/`lora_id`: the cache
    /// namespace (as for `hash_tokens`); `extra_keys`: `(token position, key)` pairs, e.g.
    /// multimodal content hashes; `cache=False`: its own blocks go back to the free pool when
    /// released instead of staying cached; `match_whole_prompt`: let `match_prefix` match the
    /// block of the last token too; `reserve_tokens`: room for that many generated tokens.
    /// `priority` (0..=100) and `priority_ranges` (`(first_block, end_block, priority)`,
    /// later ranges winning) set the eviction priority of the blocks it registers (read by
    /// the "priority" eviction backend), held for `priority_seconds` once they are inactive
    /// (for ever by default).
    #[new]
    #[pyo3(signature = (
        manager, prompt = Vec::new(), *, salt = None, lora_id = None, extra_keys = None,
        cache = true, match_whole_prompt = false, reserve_tokens = 0, priority = None,
        priority_ranges = None, priority_seconds = None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        manager: &BlockManager,
        prompt: Vec<u32>,
        salt: Option<&Bound<'_, PyAny>>,
        lora_id: Option<u64>,
        extra_keys: Option<Vec<(usize, u64)>>,
        cache: bool,
        match_whole_prompt: bool,
        reserve_tokens: usize,
        priority: Option<u8>,
        priority_ranges: Option<Vec<(usize, usize, u8)>>,
        priority_seconds: Option<f64>,
    ) -> PyResult<Self> {
        if reserve_tokens > MAX_RESERVE_TOKENS {
            return Err(ConfigError::new_err(format!(
                "reserve_tokens = {reserve_tokens}: at most {MAX_RESERVE_TOKENS}"
            )));
        }
        let salt = crate::hashing::make_salt(salt, lora_id)?;
        let mut b = kvbm_logical::RequestSequence::builder(&manager.inner)
            .prompt(&prompt)
            .salt(&salt)
            .cache(cache)
            .match_whole_prompt(match_whole_prompt)
            .reserve_tokens(reserve_tokens);
        if let Some(keys) = extra_keys {
            b = b.extra_keys(&keys);
        }
        if priority.is_some() || priority_ranges.is_some() {
            b = b.retention(retention(priority, priority_ranges, priority_seconds)?);
        }
        Ok(Self {
            inner: Some(b.build()),
            manager: manager.inner.id().get(),
        })
    }

    /// Takes the longest cached prefix of the known tokens' complete blocks (never the block
    /// of the last token unless `match_whole_prompt`); returns how many blocks matched. For a
    /// new or preempted request: raises `RequestError` (`blocks`) while it holds blocks.
    fn match_prefix(&mut self, py: Python<'_>) -> PyResult<usize> {
        self.live_mut()?
            .match_prefix()
            .map_err(|e| errors::request(py, e))
    }

    /// Blocks `allocate(new_tokens)` would take.
    fn blocks_needed(&self, new_tokens: usize) -> PyResult<usize> {
        Ok(self.live()?.blocks_needed(new_tokens))
    }

    /// Allocates the blocks for `new_tokens` more computed tokens, all or nothing; returns
    /// how many. `AllocationError` (nothing taken) when too few are free or evictable.
    fn allocate(&mut self, py: Python<'_>, new_tokens: usize) -> PyResult<usize> {
        let r = self.live_mut()?;
        let n = r.blocks_needed(new_tokens);
        run(py, n, || r.allocate(new_tokens)).map_err(|e| errors::allocation(py, e))
    }

    /// Appends one known token (sampled or speculative); computed later by `commit`.
    fn push(&mut self, token: u32) -> PyResult<()> {
        self.live_mut()?.push(token);
        Ok(())
    }

    /// Appends known tokens.
    fn extend(&mut self, tokens: Vec<u32>) -> PyResult<()> {
        self.live_mut()?.extend(&tokens);
        Ok(())
    }

    /// The engine wrote the KV of the next `tokens` known tokens: they count as computed, and
    /// every block they fill is registered (matchable by other requests). Returns a
    /// `Committed`. `RequestError` (`requested`/`uncomputed`, or `needed`/`allocated`), with
    /// nothing changed, if fewer tokens are pending or the table lacks the blocks.
    fn commit(&mut self, py: Python<'_>, tokens: usize) -> PyResult<Committed> {
        let r = self.live_mut()?;
        let done = if tokens >= DETACH_TOKENS {
            py.detach(|| r.commit(tokens))
        } else {
            r.commit(tokens)
        }
        .map_err(|e| errors::request(py, e))?;
        Ok(Committed {
            start: done.registered.start,
            stop: done.registered.end,
            changed: done
                .changed
                .iter()
                .map(|c| (c.index, c.old.get(), c.new.get()))
                .collect(),
        })
    }

    /// Shortens the known tokens to `length` (rejected speculative tokens, a stop string);
    /// a cut into registered blocks releases them (tail first) and their tokens must be
    /// computed again. Returns a `Truncated`. Does nothing if `length` is not shorter.
    fn truncate(&mut self, length: usize) -> PyResult<Truncated> {
        let t = self.live_mut()?.truncate(length);
        Ok(Truncated {
            computed: t.computed,
            changed_from: t.changed_from,
        })
    }

    /// Preemption: releases every block, tail first (registered ones stay cached), keeps the
    /// tokens; nothing is computed any more. Resume with `match_prefix` and `allocate`.
    /// Returns how many blocks were released.
    fn preempt(&mut self, py: Python<'_>) -> PyResult<usize> {
        let r = self.live_mut()?;
        let n = r.block_table().len();
        Ok(run(py, n, || r.preempt()))
    }

    /// The block table: one slot id per block of the request, in order.
    #[getter]
    fn block_table<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let ids: Vec<u32> = self.live()?.block_table().iter().map(|b| b.get()).collect();
        PyList::new(py, ids)
    }

    /// New owners of the registered blocks (the first `num_computed_tokens // block_size`
    /// entries), as one registered `BlockBatch` (e.g. to hold them past a preemption).
    fn registered_blocks(&self) -> PyResult<BlockBatch> {
        let r = self.live()?;
        let blocks = r.registered_blocks().to_vec();
        Ok(BlockBatch::immutable(
            blocks,
            self.manager,
            &None,
            r.manager().block_size(),
        ))
    }

    /// The sequence hashes of the complete blocks of the known tokens.
    #[getter]
    fn sequence_hashes(&self) -> PyResult<Vec<u64>> {
        Ok(self.live()?.sequence_hashes().map(|h| h.as_u64()).collect())
    }

    /// The known tokens.
    #[getter]
    fn tokens(&self) -> PyResult<Vec<u32>> {
        Ok(self.live()?.sequence().tokens().to_vec())
    }

    /// Known tokens (prompt and appended, minus truncations).
    #[getter]
    fn num_tokens(&self) -> PyResult<usize> {
        Ok(self.live()?.num_tokens())
    }

    /// Tokens whose KV is in the block table.
    #[getter]
    fn num_computed_tokens(&self) -> PyResult<usize> {
        Ok(self.live()?.num_computed_tokens())
    }

    /// Known tokens not yet computed.
    #[getter]
    fn num_pending_tokens(&self) -> PyResult<usize> {
        Ok(self.live()?.num_pending_tokens())
    }

    /// Blocks in the table.
    #[getter]
    fn num_blocks(&self) -> PyResult<usize> {
        Ok(self.live()?.block_table().len())
    }

    /// Registered blocks in the table.
    #[getter]
    fn num_registered_blocks(&self) -> PyResult<usize> {
        Ok(self.live()?.registered_blocks().len())
    }

    /// The prompt's length, as built.
    #[getter]
    fn prompt_len(&self) -> PyResult<usize> {
        Ok(self.live()?.prompt_len())
    }

    /// Whether the request's own blocks stay cached after it.
    #[getter]
    fn cached(&self) -> PyResult<bool> {
        Ok(self.live()?.is_cached())
    }

    /// The id of the manager serving the request.
    #[getter]
    fn manager_id(&self) -> u64 {
        self.manager
    }

    /// Whether the request was released.
    #[getter]
    fn released(&self) -> bool {
        self.inner.is_none()
    }

    /// Ends the request: releases its blocks (tail first); using it afterwards raises
    /// `ReleasedError`. Releasing twice does nothing. Returns how many blocks were released.
    fn release(&mut self, py: Python<'_>) -> usize {
        match self.inner.take() {
            Some(mut r) => {
                let n = r.block_table().len();
                run(py, n, move || r.preempt())
            }
            None => 0,
        }
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&mut self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) -> bool {
        self.release(py);
        false
    }

    fn __repr__(&self) -> String {
        match &self.inner {
            Some(r) => format!(
                "RequestSequence(tokens={}, computed={}, blocks={}, manager={})",
                r.num_tokens(),
                r.num_computed_tokens(),
                r.block_table().len(),
                self.manager
            ),
            None => "RequestSequence(<released>)".to_string(),
        }
    }
}

/// The retention a request's blocks get (see `RequestSequence.__init__`).
fn retention(
    priority: Option<u8>,
    ranges: Option<Vec<(usize, usize, u8)>>,
    seconds: Option<f64>,
) -> PyResult<kvbm_logical::RequestRetention> {
    let expiry = seconds
        .map(|s| {
            std::time::Duration::try_from_secs_f64(s)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| {
                    ConfigError::new_err(format!(
                        "priority_seconds = {s}: a positive number of seconds"
                    ))
                })
        })
        .transpose()?;
    let make = |p: u8| -> PyResult<kvbm_logical::Retention> {
        let r = kvbm_logical::Retention::new(p)
            .map_err(|e| ConfigError::new_err(format!("priority {p}: {e}")))?;
        Ok(match expiry {
            Some(d) => r.expiring_after(d),
            None => r,
        })
    };
    let default = match priority {
        Some(p) => make(p)?,
        None => kvbm_logical::Retention::default(),
    };
    let mut out = kvbm_logical::RequestRetention::new(default);
    for (first, end, p) in ranges.unwrap_or_default() {
        if first >= end {
            return Err(ConfigError::new_err(format!(
                "priority range {first}..{end} is empty"
            )));
        }
        out = out.with_range(first..end, make(p)?);
    }
    Ok(out)
}
