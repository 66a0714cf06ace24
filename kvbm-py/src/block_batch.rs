//! `kvbm.BlockBatch`: many blocks of one manager in one Python object, so that a batch of
//! 256 blocks costs one Python allocation instead of 256 (the per-handle classes cost two
//! objects per block through allocate → register → release).
//!
//! A batch holds either allocated blocks (`kind == "mutable"`: what `allocate_batch` returns)
//! or registered ones (`"immutable"`: what `register` of a batch and `match_batch` return).
//! The rules are those of the single handles: release is explicit (`release()`, `with`,
//! `BlockManager.release(batch)`) and also happens when the batch is garbage collected; a
//! released or consumed batch raises `ReleasedError`; another manager's batch is refused
//! with `ForeignBlockError`; a refused call changes nothing.

use std::sync::Arc;

use kvbm_logical::{BlockId, Device, SequenceHash};
use pyo3::exceptions::{PyIndexError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};

use crate::batch::run;
use crate::blocks::{
    Gone, Holds, ImmutableBlock, Memory, Views, gone_error, make_view, no_memory, read_block,
};
use crate::errors::{ForeignBlockError, InvalidBlockError, InvariantError};

/// The blocks a batch owns.
pub(crate) enum Blocks {
    Mutable(Vec<kvbm_logical::MutableBlock<Device>>),
    Immutable(Vec<kvbm_logical::ImmutableBlock<Device>>),
}

impl Blocks {
    fn len(&self) -> usize {
        match self {
            Blocks::Mutable(v) => v.len(),
            Blocks::Immutable(v) => v.len(),
        }
    }

    fn id(&self, i: usize) -> BlockId {
        match self {
            Blocks::Mutable(v) => v[i].block_id(),
            Blocks::Immutable(v) => v[i].block_id(),
        }
    }

    /// Returns every block in one batch call per kind.
    fn release_all(self) {
        match self {
            Blocks::Mutable(v) => kvbm_logical::MutableBlock::release_all(v),
            Blocks::Immutable(v) => kvbm_logical::ImmutableBlock::release_all(v),
        }
    }
}

/// Many blocks of one manager (or tier stack G1) in one object; see the module docs.
#[pyclass(module = "kvbm", name = "BlockBatch")]
pub(crate) struct BlockBatch {
    pub(crate) blocks: Option<Blocks>,
    pub(crate) gone: Gone,
    /// Whether the batch holds (or held) registered blocks.
    immutable: bool,
    pub(crate) manager: u64,
    pub(crate) memory: Memory,
    pub(crate) block_size: usize,
    /// The writable views of an allocated batch's memory.
    views: Arc<Views>,
}

impl Drop for BlockBatch {
    /// Garbage collection releases what the batch still holds, in one batch call (an
    /// allocated batch whose views live keeps its blocks until the last view goes).
    fn drop(&mut self) {
        match self.blocks.take() {
            Some(Blocks::Mutable(v)) => self.views.release(v),
            Some(blocks) => blocks.release_all(),
            None => {}
        }
    }
}

impl BlockBatch {
    pub(crate) fn mutable(
        blocks: Vec<kvbm_logical::MutableBlock<Device>>,
        manager: u64,
        memory: &Memory,
        block_size: usize,
    ) -> Self {
        Self {
            blocks: Some(Blocks::Mutable(blocks)),
            gone: Gone::Held,
            immutable: false,
            manager,
            memory: memory.clone(),
            block_size,
            views: Arc::default(),
        }
    }

    pub(crate) fn immutable(
        blocks: Vec<kvbm_logical::ImmutableBlock<Device>>,
        manager: u64,
        memory: &Memory,
        block_size: usize,
    ) -> Self {
        Self {
            blocks: Some(Blocks::Immutable(blocks)),
            gone: Gone::Held,
            immutable: true,
            manager,
            memory: memory.clone(),
            block_size,
            views: Arc::default(),
        }
    }

    fn live(&self) -> PyResult<&Blocks> {
        self.blocks
            .as_ref()
            .ok_or_else(|| gone_error("BlockBatch", self.gone))
    }

    /// Whether the blocks may leave the batch now (no writable view of them lives).
    pub(crate) fn may_go(&self) -> PyResult<()> {
        self.views.check("BlockBatch")
    }

    /// `i` (negative counts from the end) as an index into `len` blocks.
    fn index(i: isize, len: usize) -> PyResult<usize> {
        let j = if i < 0 { i + len as isize } else { i };
        if j < 0 || j as usize >= len {
            return Err(PyIndexError::new_err(format!(
                "block index {i} out of range for a batch of {len}"
            )));
        }
        Ok(j as usize)
    }

    fn check_manager(&self, manager: u64) -> PyResult<()> {
        if self.manager != manager {
            return Err(ForeignBlockError::new_err(format!(
                "this BlockBatch belongs to manager {}, not to manager {manager}; nothing was changed",
                self.manager
            )));
        }
        Ok(())
    }
}

/// Borrows `obj` as a batch of `manager` for a call that may consume it.
fn borrow<'py>(obj: &Bound<'py, BlockBatch>, manager: u64) -> PyResult<PyRefMut<'py, BlockBatch>> {
    let b = obj.try_borrow_mut().map_err(|_| {
        InvalidBlockError::new_err(
            "this BlockBatch is in use by another call or thread; nothing was changed",
        )
    })?;
    b.check_manager(manager)?;
    b.live()?;
    Ok(b)
}

/// Registers a batch of allocated blocks under `hashes` (block `i` gets `hashes[i]`, its
/// parent `hashes[i-1]`, the first one `parent`) through `register`, and returns the
/// registered batch. The input batch is consumed; refused (wrong kind, another manager's,
/// released, a length mismatch, or refused by `register`), it is left as it was.
pub(crate) fn register<'py>(
    py: Python<'py>,
    obj: &Bound<'py, BlockBatch>,
    hashes: Option<&Bound<'py, PyAny>>,
    parent: Option<u64>,
    manager: u64,
    block_size: usize,
    register: impl FnOnce(
        Vec<kvbm_logical::CompleteBlock<Device>>,
    ) -> Result<
        Vec<kvbm_logical::ImmutableBlock<Device>>,
        (String, Vec<kvbm_logical::CompleteBlock<Device>>),
    > + Send,
) -> PyResult<BlockBatch> {
    let mut batch = borrow(obj, manager)?;
    if batch.immutable {
        return Err(PyTypeError::new_err(
            "this BlockBatch is already registered: register takes a batch from allocate_batch",
        ));
    }
    batch.may_go()?;
    let hashes = hashes.ok_or_else(|| {
        PyTypeError::new_err("registering a BlockBatch needs hashes= (one per block)")
    })?;
    let hashes: Vec<u64> = hashes.extract()?;
    let n = batch.live()?.len();
    if hashes.len() != n {
        return Err(PyValueError::new_err(format!(
            "{n} blocks but {} hashes",
            hashes.len()
        )));
    }
    let blocks = match batch.blocks.take() {
        Some(Blocks::Mutable(v)) => v,
        other => {
            // Checked above: a live batch of allocated blocks. Never lose a block regardless.
            batch.blocks = other;
            return Err(InvariantError::new_err(
                "a BlockBatch's kind disagrees with its blocks",
            ));
        }
    };
    let memory = batch.memory.clone();
    let outcome = run(py, n, move || {
        let mut staged = Vec::with_capacity(blocks.len());
        let mut prev = parent.map(SequenceHash::new);
        let mut rest = blocks.into_iter();
        for (block, hash) in rest.by_ref().zip(hashes) {
            let hash = SequenceHash::new(hash);
            match block.stage(hash, block_size) {
                Ok(s) => staged.push(s.with_parent(prev)),
                Err(e) => {
                    // Cannot happen (the size is the manager's own): hand every block back.
                    let mut back: Vec<_> = staged.into_iter().map(|s| s.reset()).collect();
                    back.push(e.into_block());
                    back.extend(rest);
                    return Err((None, back));
                }
            }
            prev = Some(hash);
        }
        register(staged).map_err(|(msg, blocks)| {
            (
                Some(msg),
                blocks.into_iter().map(|b| b.reset()).collect::<Vec<_>>(),
            )
        })
    });
    match outcome {
        Ok(handles) => {
            batch.gone = Gone::Registered;
            Ok(BlockBatch::immutable(handles, manager, &memory, block_size))
        }
        Err((msg, back)) => {
            batch.blocks = Some(Blocks::Mutable(back));
            Err(match msg {
                Some(msg) => ForeignBlockError::new_err(msg),
                None => InvariantError::new_err("staging refused the manager's own block size"),
            })
        }
    }
}

/// Releases a batch of `manager` (nothing if already released); returns how many blocks.
pub(crate) fn release(
    py: Python<'_>,
    obj: &Bound<'_, BlockBatch>,
    manager: u64,
) -> PyResult<usize> {
    let mut batch = obj.try_borrow_mut().map_err(|_| {
        InvalidBlockError::new_err(
            "this BlockBatch is in use by another call or thread; nothing was changed",
        )
    })?;
    batch.check_manager(manager)?;
    Ok(batch.release_now(py))
}

impl BlockBatch {
    /// Releases the blocks (an allocated batch's while views of them live: when the last
    /// one goes, so that no other request is given their slots meanwhile).
    fn release_now(&mut self, py: Python<'_>) -> usize {
        match self.blocks.take() {
            Some(blocks) => {
                self.gone = Gone::Released;
                let n = blocks.len();
                let views = Arc::clone(&self.views);
                run(py, n, move || match blocks {
                    Blocks::Mutable(v) => views.release(v),
                    other => other.release_all(),
                });
                n
            }
            None => 0,
        }
    }
}

#[pymethods]
impl BlockBatch {
    /// How many blocks the batch holds.
    fn __len__(&self) -> PyResult<usize> {
        self.live().map(Blocks::len)
    }

    /// `"mutable"` (allocated) or `"immutable"` (registered).
    #[getter]
    fn kind(&self) -> &'static str {
        if self.immutable {
            "immutable"
        } else {
            "mutable"
        }
    }

    /// The slot index of every block, in order (one list; what a block table holds).
    #[getter]
    fn block_ids<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let ids: Vec<u32> = match self.live()? {
            Blocks::Mutable(v) => v.iter().map(|b| b.block_id().get()).collect(),
            Blocks::Immutable(v) => v.iter().map(|b| b.block_id().get()).collect(),
        };
        PyList::new(py, ids)
    }

    /// The sequence hash of every block (registered batches only).
    #[getter]
    fn sequence_hashes(&self) -> PyResult<Vec<u64>> {
        match self.live()? {
            Blocks::Immutable(v) => Ok(v.iter().map(|b| b.sequence_hash().as_u64()).collect()),
            Blocks::Mutable(_) => Err(PyTypeError::new_err(
                "an allocated (mutable) batch has no hashes yet",
            )),
        }
    }

    /// The id of the manager the blocks belong to.
    #[getter]
    fn manager_id(&self) -> u64 {
        self.manager
    }

    /// Whether the batch no longer holds its blocks (released or consumed).
    #[getter]
    fn released(&self) -> bool {
        self.blocks.is_none()
    }

    /// Block `i` as a handle, created only now. For a registered batch, a new
    /// `ImmutableBlock` owner of that block (released independently of the batch). An
    /// allocated block has a single owner, the batch: use `handles()` to split the batch,
    /// or `view(i)`, `read(i)`, `write(i, data)` for its memory.
    fn __getitem__(&self, i: isize) -> PyResult<ImmutableBlock> {
        let blocks = self.live()?;
        let j = Self::index(i, blocks.len())?;
        match blocks {
            Blocks::Immutable(v) => Ok(ImmutableBlock::new(v[j].clone(), &self.memory)),
            Blocks::Mutable(_) => Err(PyTypeError::new_err(
                "an allocated block has one owner (this batch): use handles() to split the batch into MutableBlocks",
            )),
        }
    }

    /// Splits the batch into one handle per block (`MutableBlock`s or `ImmutableBlock`s, in
    /// order), consuming it.
    fn handles<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        if self.blocks.is_some() {
            self.may_go()?;
        }
        let Some(blocks) = self.blocks.take() else {
            return Err(gone_error("BlockBatch", self.gone));
        };
        self.gone = Gone::Split;
        match blocks {
            Blocks::Mutable(v) => crate::batch::mutable_list(py, v, &self.memory, self.block_size),
            Blocks::Immutable(v) => crate::batch::immutable_list(py, v, &self.memory),
        }
    }

    /// A zero-copy `memoryview` of block `i`'s host memory (tier-stack G1 batches only):
    /// writable for an allocated batch, read-only (holding its own owner of the block) for a
    /// registered one. Same arguments as `MutableBlock.view`.
    #[pyo3(signature = (i, layer = None, outer = 0))]
    fn view<'py>(
        &self,
        py: Python<'py>,
        i: isize,
        layer: Option<usize>,
        outer: usize,
    ) -> PyResult<Bound<'py, PyAny>> {
        let blocks = self.live()?;
        let j = Self::index(i, blocks.len())?;
        let layout = self.memory.as_ref().ok_or_else(no_memory)?;
        let holds = match blocks {
            Blocks::Immutable(v) => Holds::Block(v[j].clone()),
            Blocks::Mutable(_) => Holds::Views(Arc::clone(&self.views)),
        };
        make_view(py, layout, blocks.id(j), layer, outer, holds)
    }

    /// A copy of block `i`'s bytes, in fully contiguous order.
    fn read<'py>(&self, py: Python<'py>, i: isize) -> PyResult<Bound<'py, PyBytes>> {
        let blocks = self.live()?;
        let j = Self::index(i, blocks.len())?;
        let layout = self.memory.as_ref().ok_or_else(no_memory)?;
        read_block(py, layout, blocks.id(j))
    }

    /// Writes one block image into allocated block `i` (GIL released during the copy).
    fn write(&self, py: Python<'_>, i: isize, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let data = crate::blocks::bytes_of(data)?;
        let blocks = self.live()?;
        let j = Self::index(i, blocks.len())?;
        if self.immutable {
            return Err(PyTypeError::new_err(
                "a registered block is read-only: write into allocated blocks",
            ));
        }
        let layout = std::sync::Arc::clone(self.memory.as_ref().ok_or_else(no_memory)?);
        let id = blocks.id(j);
        py.detach(|| layout.write_block(id, &data))
            .map_err(crate::errors::layout)
    }

    /// Returns every block (allocated ones to the free pool, registered ones to the
    /// inactive pool once their last owner goes); returns how many. Releasing twice does
    /// nothing (returns 0).
    fn release(&mut self, py: Python<'_>) -> usize {
        self.release_now(py)
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&mut self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) -> bool {
        self.release_now(py);
        false
    }

    fn __repr__(&self) -> String {
        match &self.blocks {
            Some(b) => format!(
                "BlockBatch(kind={:?}, blocks={}, manager={})",
                self.kind(),
                b.len(),
                self.manager
            ),
            None => "BlockBatch(<released>)".to_string(),
        }
    }
}

/// Whether `obj` is a `BlockBatch` (the batch path of `register` and `release`).
pub(crate) fn as_batch<'a, 'py>(obj: &'a Bound<'py, PyAny>) -> Option<&'a Bound<'py, BlockBatch>> {
    obj.cast::<BlockBatch>().ok()
}
