//! Batch plumbing shared by `BlockManager` and `TierStack`: borrowing every handle of a
//! Python iterable, validating all of them before taking any (so a refused call changes
//! nothing), and turning Rust handles into Python objects.

use kvbm_logical::{Device, SequenceHash};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyList;
use pyo3::{PyClass, PyTypeInfo};

use crate::blocks::{CompleteBlock, Gone, ImmutableBlock, Memory, MutableBlock, gone_error};
use crate::errors::{ForeignBlockError, InvalidBlockError, InvariantError};

/// Batches at least this long release the GIL while the Rust side runs (below it, saving and
/// restoring the thread state costs more than the call).
pub(crate) const DETACH_AT: usize = 64;

/// Runs `f` with the GIL released when the batch is large enough to be worth it.
pub(crate) fn run<T: Send>(py: Python<'_>, n: usize, f: impl FnOnce() -> T + Send) -> T {
    if n >= DETACH_AT { py.detach(f) } else { f() }
}

/// A handle class: its live Rust handle (if any), why it is gone, and its manager.
pub(crate) trait Handle:
    PyClass<Frozen = pyo3::pyclass::boolean_struct::False> + PyTypeInfo
{
    type Inner;
    const CLASS: &'static str;
    fn slot(&mut self) -> (&mut Option<Self::Inner>, &mut Gone);
    fn manager(&self) -> u64;
    /// Whether the block may leave the handle now (see `Views::check`).
    fn may_go(&self) -> PyResult<()>;
}

macro_rules! handle {
    ($class:ident, $inner:ty) => {
        impl Handle for $class {
            type Inner = $inner;
            const CLASS: &'static str = stringify!($class);
            fn slot(&mut self) -> (&mut Option<Self::Inner>, &mut Gone) {
                (&mut self.inner, &mut self.gone)
            }
            fn manager(&self) -> u64 {
                self.manager
            }
            fn may_go(&self) -> PyResult<()> {
                $class::may_go(self)
            }
        }
    };
}
handle!(MutableBlock, kvbm_logical::MutableBlock<Device>);
handle!(CompleteBlock, kvbm_logical::CompleteBlock<Device>);
handle!(ImmutableBlock, kvbm_logical::ImmutableBlock<Device>);

fn foreign(class: &str, found: u64, expected: u64) -> PyErr {
    ForeignBlockError::new_err(format!(
        "this {class} belongs to manager {found}, not to manager {expected}; nothing was changed"
    ))
}

fn twice(class: &str) -> PyErr {
    InvalidBlockError::new_err(format!(
        "a {class} appears twice in the batch (or is in use by another thread); nothing was changed"
    ))
}

/// Borrows every handle of `blocks` mutably, checking that each is a live `H` of `manager`.
/// Nothing is taken yet.
pub(crate) fn borrow_live<'py, H: Handle>(
    blocks: &Bound<'py, PyAny>,
    manager: u64,
) -> PyResult<Vec<PyRefMut<'py, H>>> {
    let mut out = Vec::with_capacity(blocks.len().unwrap_or(0));
    for item in blocks.try_iter()? {
        let item = item?;
        let cell = item.cast::<H>().map_err(|_| {
            PyTypeError::new_err(format!(
                "expected {}, got {}",
                H::CLASS,
                item.get_type()
                    .name()
                    .map_or_else(|_| "?".to_string(), |n| n.to_string())
            ))
        })?;
        let mut handle = cell.try_borrow_mut().map_err(|_| twice(H::CLASS))?;
        if handle.manager() != manager {
            return Err(foreign(H::CLASS, handle.manager(), manager));
        }
        let (inner, gone) = handle.slot();
        if inner.is_none() {
            return Err(gone_error(H::CLASS, *gone));
        }
        handle.may_go()?;
        out.push(handle);
    }
    Ok(out)
}

/// Takes the Rust handle out of every borrowed Python handle (all are live: see
/// [`borrow_live`]), marking each as consumed by `why`.
pub(crate) fn take_all<H: Handle>(handles: &mut [PyRefMut<'_, H>], why: Gone) -> Vec<H::Inner> {
    handles
        .iter_mut()
        .filter_map(|h| {
            let (inner, gone) = h.slot();
            let taken = inner.take()?;
            *gone = why;
            Some(taken)
        })
        .collect()
}

/// Puts Rust handles back into the Python handles they were taken from (a refused call).
pub(crate) fn put_back<H: Handle>(handles: &mut [PyRefMut<'_, H>], blocks: Vec<H::Inner>) {
    for (h, block) in handles.iter_mut().zip(blocks) {
        let (inner, gone) = h.slot();
        *inner = Some(block);
        *gone = Gone::Held;
    }
}

/// Extracts a list of hashes (unsigned 64-bit integers).
pub(crate) fn hashes(values: &Bound<'_, PyAny>) -> PyResult<Vec<SequenceHash>> {
    let raw: Vec<u64> = values.extract()?;
    Ok(raw.into_iter().map(SequenceHash::new).collect())
}

/// Stages or takes the blocks of a `register` call: with `hashes`, `blocks` are
/// `MutableBlock`s staged here with chained parents (the first one's is `parent`); without,
/// they are `CompleteBlock`s. Returns the staged Rust handles and a guard that can put them
/// back if the registration is refused.
pub(crate) enum Staged<'py> {
    FromMutable(Vec<PyRefMut<'py, MutableBlock>>),
    FromComplete(Vec<PyRefMut<'py, CompleteBlock>>),
}

pub(crate) fn stage_for_register<'py>(
    blocks: &Bound<'py, PyAny>,
    hashes_arg: Option<&Bound<'py, PyAny>>,
    parent: Option<u64>,
    manager: u64,
    block_size: usize,
) -> PyResult<(Vec<kvbm_logical::CompleteBlock<Device>>, Staged<'py>)> {
    match hashes_arg {
        None => {
            let mut handles = borrow_live::<CompleteBlock>(blocks, manager)?;
            let taken = take_all(&mut handles, Gone::Registered);
            Ok((taken, Staged::FromComplete(handles)))
        }
        Some(h) => {
            let hashes = hashes(h)?;
            let mut handles = borrow_live::<MutableBlock>(blocks, manager)?;
            if hashes.len() != handles.len() {
                return Err(PyValueError::new_err(format!(
                    "{} blocks but {} hashes",
                    handles.len(),
                    hashes.len()
                )));
            }
            let taken = take_all(&mut handles, Gone::Registered);
            let mut staged = Vec::with_capacity(taken.len());
            let mut prev = parent.map(SequenceHash::new);
            for (block, hash) in taken.into_iter().zip(hashes) {
                match block.stage(hash, block_size) {
                    Ok(s) => staged.push(s.with_parent(prev)),
                    Err(e) => {
                        // Cannot happen (the size is the manager's own); return every block
                        // to its handle rather than lose any.
                        drop(e.into_block());
                        put_back(
                            &mut handles,
                            staged
                                .into_iter()
                                .map(|s: kvbm_logical::CompleteBlock<Device>| s.reset())
                                .collect(),
                        );
                        return Err(InvariantError::new_err(
                            "staging refused the manager's own block size",
                        ));
                    }
                }
                prev = Some(hash);
            }
            Ok((staged, Staged::FromMutable(handles)))
        }
    }
}

impl Staged<'_> {
    /// A refused registration handed the blocks back: return them to their Python handles,
    /// in the state they were given in.
    pub(crate) fn restore(&mut self, blocks: Vec<kvbm_logical::CompleteBlock<Device>>) {
        match self {
            Staged::FromComplete(h) => put_back(h, blocks),
            Staged::FromMutable(h) => put_back(h, blocks.into_iter().map(|b| b.reset()).collect()),
        }
    }
}

/// Python objects for registered handles.
pub(crate) fn immutable_list<'py>(
    py: Python<'py>,
    blocks: Vec<kvbm_logical::ImmutableBlock<Device>>,
    memory: &Memory,
) -> PyResult<Bound<'py, PyList>> {
    let objects = blocks
        .into_iter()
        .map(|b| Bound::new(py, ImmutableBlock::new(b, memory)))
        .collect::<PyResult<Vec<_>>>()?;
    PyList::new(py, objects)
}

/// Python objects for allocated handles.
pub(crate) fn mutable_list<'py>(
    py: Python<'py>,
    blocks: Vec<kvbm_logical::MutableBlock<Device>>,
    memory: &Memory,
    block_size: usize,
) -> PyResult<Bound<'py, PyList>> {
    let objects = blocks
        .into_iter()
        .map(|b| Bound::new(py, MutableBlock::new(b, memory, block_size)))
        .collect::<PyResult<Vec<_>>>()?;
    PyList::new(py, objects)
}

/// Releases every handle in `blocks` (any of the three classes, mixed), all of `manager`:
/// validated first (a foreign or duplicated handle refuses the whole call), then one batch
/// release per kind. Already-released handles are skipped. Returns how many were released.
pub(crate) fn release(py: Python<'_>, blocks: &Bound<'_, PyAny>, manager: u64) -> PyResult<usize> {
    let mut muts = Vec::new();
    let mut completes = Vec::new();
    let mut imms = Vec::new();
    for item in blocks.try_iter()? {
        let item = item?;
        if let Ok(c) = item.cast::<ImmutableBlock>() {
            imms.push(c.try_borrow_mut().map_err(|_| twice("ImmutableBlock"))?);
        } else if let Ok(c) = item.cast::<MutableBlock>() {
            muts.push(c.try_borrow_mut().map_err(|_| twice("MutableBlock"))?);
        } else if let Ok(c) = item.cast::<CompleteBlock>() {
            completes.push(c.try_borrow_mut().map_err(|_| twice("CompleteBlock"))?);
        } else {
            return Err(PyTypeError::new_err(format!(
                "expected a block handle, got {}",
                item.get_type()
                    .name()
                    .map_or_else(|_| "?".to_string(), |n| n.to_string())
            )));
        }
    }
    fn check<H: Handle>(handles: &[PyRefMut<'_, H>], manager: u64) -> PyResult<()> {
        match handles.iter().find(|h| h.manager() != manager) {
            Some(h) => Err(foreign(H::CLASS, h.manager(), manager)),
            None => Ok(()),
        }
    }
    check(&muts, manager)?;
    check(&completes, manager)?;
    check(&imms, manager)?;
    // Allocated blocks with live writable views are parked until the views go (see
    // `Views::release`); the rest go in one batch call per kind.
    let mut m = Vec::with_capacity(muts.len());
    let mut released = 0;
    for h in &mut muts {
        if let Some(block) = h.inner.take() {
            released += 1;
            h.gone = Gone::Released;
            if h.views.check("MutableBlock").is_err() {
                h.views.release([block]);
            } else {
                m.push(block);
            }
        }
    }
    let c = take_all(&mut completes, Gone::Released);
    let i = take_all(&mut imms, Gone::Released);
    let n = released + c.len() + i.len();
    run(py, n, move || {
        kvbm_logical::MutableBlock::release_all(m);
        kvbm_logical::CompleteBlock::release_all(c);
        kvbm_logical::ImmutableBlock::release_all(i);
    });
    Ok(n)
}
