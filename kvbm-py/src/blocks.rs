//! The block handles: one Python class per Rust type-state (`MutableBlock` → `CompleteBlock`
//! → `ImmutableBlock`). A transition consumes the Python object it was called on (it then
//! raises `ReleasedError` saying which call consumed it); `release()`, leaving a `with` block
//! and garbage collection return the block, exactly once.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use kvbm_logical::{BlockId, Device, SequenceHash};
use kvbm_physical::{Layout, LayoutKind, Region};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::errors::{
    ConfigError, InvalidBlockError, ReleasedError, TransferError, layout as layout_err,
};

/// Why a handle no longer holds its block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Gone {
    Held,
    Released,
    Staged,
    Registered,
    Reset,
    Split,
}

pub(crate) fn gone_error(class: &str, gone: Gone) -> PyErr {
    let why = match gone {
        Gone::Held | Gone::Released => "was released",
        Gone::Staged => "was consumed by stage(): use the CompleteBlock it returned",
        Gone::Registered => "was consumed by register(): use the ImmutableBlock it returned",
        Gone::Reset => "was consumed by reset(): use the MutableBlock it returned",
        Gone::Split => "was consumed by handles(): use the handles it returned",
    };
    ReleasedError::new_err(format!("this {class} {why}"))
}

/// Optional slab memory behind a handle (tier-stack G1 blocks have it; a plain
/// `BlockManager`'s do not).
pub(crate) type Memory = Option<Arc<Layout>>;

/// Keeps a view's memory alive: the layout (its slabs), and for a read-only view of a
/// registered block, an owner of that block so that it is neither evicted nor rewritten while
/// the view exists. For a writable view of an allocated block, its share of the handle's
/// [`Views`] (counted while it lives).
#[pyclass(module = "kvbm", name = "_ViewOwner", frozen)]
pub(crate) struct ViewOwner {
    _layout: Arc<Layout>,
    holds: Holds,
}

/// What a view holds besides the memory: a read-only view, an owner of its registered block;
/// a writable one, its share of the allocated block's [`Views`].
pub(crate) enum Holds {
    /// Held for its ownership only (dropped with the view).
    #[allow(dead_code)]
    Block(kvbm_logical::ImmutableBlock<Device>),
    Views(Arc<Views>),
}

impl Drop for ViewOwner {
    fn drop(&mut self) {
        if let Holds::Views(v) = &self.holds {
            v.live.fetch_sub(1, Ordering::AcqRel);
        }
        // A block parked by its dropped handle goes back with the last `Arc` (this one, or
        // the handle's).
    }
}

/// What an allocated block's handle (or batch) shares with the writable views of its
/// memory: how many are alive, and the blocks parked here when the handle was garbage
/// collected while views lived (their slots go back only with the last view, so a view never
/// writes into a slot another request was given).
#[derive(Default)]
pub(crate) struct Views {
    live: AtomicUsize,
    parked: parking_lot::Mutex<Vec<kvbm_logical::MutableBlock<Device>>>,
}

impl Views {
    /// Refuses to let the block be staged, registered or split while a writable view of it
    /// lives: writes through it would land in a registered block, shared and offloaded as it
    /// is. (A release parks the block instead: see [`release`](Self::release).)
    pub(crate) fn check(&self, class: &str) -> PyResult<()> {
        match self.live.load(Ordering::Acquire) {
            0 => Ok(()),
            n => Err(InvalidBlockError::new_err(format!(
                "{n} writable view(s) of this {class}'s memory are alive: delete them (and the \
                 arrays made from them) before staging or registering it; nothing was changed"
            ))),
        }
    }

    /// The handle lets its blocks go (a release, garbage collection): to the free pool now,
    /// or, while views live, parked here until the last one goes.
    pub(crate) fn release(
        &self,
        blocks: impl IntoIterator<Item = kvbm_logical::MutableBlock<Device>>,
    ) {
        if self.live.load(Ordering::Acquire) > 0 {
            self.parked.lock().extend(blocks);
        } else {
            kvbm_logical::MutableBlock::release_all(blocks);
        }
    }
}

pub(crate) fn no_memory() -> PyErr {
    ConfigError::new_err(
        "this block has no memory: only blocks of a TierStack's G1 have bytes (a BlockManager is logical only)",
    )
}

fn region(layout: &Layout, id: BlockId, layer: Option<usize>, outer: usize) -> PyResult<Region> {
    match layer {
        None => {
            if layout.kind() != LayoutKind::FullyContiguous {
                return Err(ConfigError::new_err(
                    "the whole block is one range only in a fully_contiguous layout: pass layer= (and outer=) for one region, or use read()",
                ));
            }
            let first = layout.region(id, 0, 0).map_err(layout_err)?;
            Ok(Region {
                addr: first.addr,
                len: layout.block_bytes(),
            })
        }
        Some(layer) => layout.region(id, layer, outer).map_err(layout_err),
    }
}

/// A zero-copy `memoryview` of host memory (see `kvbm/_buffer.py`).
pub(crate) fn make_view<'py>(
    py: Python<'py>,
    layout: &Arc<Layout>,
    id: BlockId,
    layer: Option<usize>,
    outer: usize,
    holds: Holds,
) -> PyResult<Bound<'py, PyAny>> {
    if !layout.memory().is_host() {
        return Err(TransferError::new_err(
            "the block is in device memory: use read() and write() (copies) instead of a view",
        ));
    }
    let r = region(layout, id, layer, outer)?;
    let readonly = matches!(holds, Holds::Block(_));
    if let Holds::Views(v) = &holds {
        v.live.fetch_add(1, Ordering::AcqRel);
    }
    // From here the count is the owner's to give back (its drop), whatever happens.
    let owner = Py::new(
        py,
        ViewOwner {
            _layout: Arc::clone(layout),
            holds,
        },
    )?;
    py.import("kvbm._buffer")?
        .getattr("make_view")?
        .call1((r.addr, r.len, owner, readonly))
}

/// The bytes of `data` for a `write`: `bytes` and `bytearray` as they are; any other
/// C-contiguous buffer (a numpy array of any dtype and shape, a memoryview) through one C-level
/// copy (`memoryview(data).cast("B").tobytes()`), never element by element. A buffer that is
/// not contiguous is a `TransferError`.
pub(crate) fn bytes_of(data: &Bound<'_, PyAny>) -> PyResult<pyo3::pybacked::PyBackedBytes> {
    if let Ok(b) = data.extract::<pyo3::pybacked::PyBackedBytes>() {
        return Ok(b);
    }
    let py = data.py();
    let view = py
        .import("builtins")?
        .getattr("memoryview")?
        .call1((data,))
        .map_err(|_| {
            pyo3::exceptions::PyTypeError::new_err(format!(
                "write() takes bytes or a buffer (bytearray, memoryview, numpy array), not {}",
                data.get_type()
                    .name()
                    .map_or_else(|_| "?".to_string(), |n| n.to_string())
            ))
        })?;
    if !view.getattr("c_contiguous")?.extract::<bool>()? {
        return Err(TransferError::new_err(
            "write() needs a C-contiguous buffer (np.ascontiguousarray)",
        ));
    }
    // Any element format (complex, structured): `tobytes` copies the raw bytes in C order.
    Ok(view.call_method0("tobytes")?.extract()?)
}

pub(crate) fn read_block<'py>(
    py: Python<'py>,
    layout: &Arc<Layout>,
    id: BlockId,
) -> PyResult<Bound<'py, PyBytes>> {
    let mut out = vec![0u8; layout.block_bytes()];
    let layout = Arc::clone(layout);
    py.detach(|| layout.read_block(id, &mut out))
        .map_err(layout_err)?;
    Ok(PyBytes::new(py, &out))
}

/// The `#[pymethods]` of a block handle class: what every handle has (`block_id`,
/// `manager_id`, `released`, `release` with its doc, `read`, the context manager), then the
/// class's own methods. (PyO3 takes one `#[pymethods]` block per class, so the common part is
/// generated into it.)
macro_rules! handle_methods {
    ($class:ident, $release_doc:literal, { $($own:tt)* }) => {
        #[pymethods]
        impl $class {
            /// The block's slot index (what an attention kernel's block table holds).
            #[getter]
            fn block_id(&self) -> PyResult<u32> {
                self.live().map(|b| b.block_id().get())
            }

            /// The id of the manager the block belongs to.
            #[getter]
            fn manager_id(&self) -> u64 {
                self.manager
            }

            /// Whether the handle no longer holds its block (released or consumed).
            #[getter]
            fn released(&self) -> bool {
                self.inner.is_none()
            }

            #[doc = $release_doc]
            fn release(&mut self) {
                if let Some(block) = self.inner.take() {
                    self.gone = Gone::Released;
                    self.let_go(block);
                }
            }

            /// A copy of the block's bytes, in fully contiguous order (any memory, device
            /// included).
            fn read<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
                self.live()?;
                let layout = self.memory.as_ref().ok_or_else(no_memory)?;
                read_block(py, layout, BlockId::new(self.id))
            }

            fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
                slf
            }

            #[pyo3(signature = (*_args))]
            fn __exit__(&mut self, _args: &Bound<'_, pyo3::types::PyTuple>) -> bool {
                self.release();
                false
            }

            $($own)*
        }
    };
}

/// An allocated block with no identity yet: the engine writes its KV data, then stages it
/// with its sequence hash. Dropping or releasing it returns the block to the free pool.
#[pyclass(module = "kvbm", name = "MutableBlock")]
pub(crate) struct MutableBlock {
    pub(crate) inner: Option<kvbm_logical::MutableBlock<Device>>,
    pub(crate) gone: Gone,
    pub(crate) id: u32,
    pub(crate) manager: u64,
    pub(crate) memory: Memory,
    /// The manager's block size (what `stage` stages with).
    pub(crate) block_size: usize,
    /// The writable views of the block's memory.
    pub(crate) views: Arc<Views>,
}

impl Drop for MutableBlock {
    /// Garbage collected while views of its memory live: the block stays allocated until
    /// the last view goes (else it returns to the free pool now).
    fn drop(&mut self) {
        if let Some(block) = self.inner.take() {
            self.views.release([block]);
        }
    }
}

impl MutableBlock {
    pub(crate) fn new(
        block: kvbm_logical::MutableBlock<Device>,
        memory: &Memory,
        block_size: usize,
    ) -> Self {
        Self {
            id: block.block_id().get(),
            manager: block.manager_id().get(),
            inner: Some(block),
            gone: Gone::Held,
            memory: memory.clone(),
            block_size,
            views: Arc::default(),
        }
    }

    /// Whether the block may leave this handle now (no writable view of it lives).
    pub(crate) fn may_go(&self) -> PyResult<()> {
        self.views.check("MutableBlock")
    }

    /// Releases `block`: to the free pool now, or, while writable views of it live, when
    /// the last one goes.
    pub(crate) fn let_go(&self, block: kvbm_logical::MutableBlock<Device>) {
        self.views.release([block]);
    }

    pub(crate) fn live(&self) -> PyResult<&kvbm_logical::MutableBlock<Device>> {
        self.inner
            .as_ref()
            .ok_or_else(|| gone_error("MutableBlock", self.gone))
    }

    fn layout(&self) -> PyResult<&Arc<Layout>> {
        self.live()?;
        self.memory.as_ref().ok_or_else(no_memory)
    }
}

handle_methods!(
    MutableBlock,
    "Returns the block to the free pool. Releasing twice does nothing.",
    {
        /// Gives the block its identity: `hash` names its tokens and whole prefix, `parent` the
        /// block before it. Consumes this handle and returns a `CompleteBlock`.
        #[pyo3(signature = (hash, parent = None))]
        fn stage(&mut self, hash: u64, parent: Option<u64>) -> PyResult<CompleteBlock> {
            self.live()?;
            self.may_go()?;
            let block = self.inner.take().expect("checked live");
            match block.stage(SequenceHash::new(hash), self.block_size) {
                Ok(staged) => {
                    self.gone = Gone::Staged;
                    let staged = staged.with_parent(parent.map(SequenceHash::new));
                    Ok(CompleteBlock::new(staged, &self.memory, self.block_size))
                }
                Err(e) => {
                    // Unreachable (the size is the manager's own), but never lose the block.
                    self.inner = Some(e.into_block());
                    Err(ConfigError::new_err("block size mismatch"))
                }
            }
        }

        /// A zero-copy, writable `memoryview` of the block's host memory: the whole block
        /// (`fully_contiguous` layouts) or one region (`layer`, `outer`: 0 = K, 1 = V).
        ///
        /// While a view (or an array made from it) lives, the block cannot be staged or
        /// registered (`InvalidBlockError`): writes through it would land in a registered,
        /// shared block. Delete the views first. A block released (or garbage collected)
        /// while views live keeps its slot until they go, so no other request is given it.
        #[pyo3(signature = (layer = None, outer = 0))]
        fn view<'py>(
            &self,
            py: Python<'py>,
            layer: Option<usize>,
            outer: usize,
        ) -> PyResult<Bound<'py, PyAny>> {
            let layout = self.layout()?;
            make_view(
                py,
                layout,
                BlockId::new(self.id),
                layer,
                outer,
                Holds::Views(Arc::clone(&self.views)),
            )
        }

        /// Writes one block image (exactly `block_bytes` long, fully contiguous order) into the
        /// block; the GIL is released during the copy.
        fn write(&self, py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<()> {
            let data = bytes_of(data)?;
            let layout = Arc::clone(self.layout()?);
            let id = BlockId::new(self.id);
            py.detach(|| layout.write_block(id, &data))
                .map_err(layout_err)
        }

        fn __repr__(&self) -> String {
            match &self.inner {
                Some(_) => format!(
                    "MutableBlock(block_id={}, manager={})",
                    self.id, self.manager
                ),
                None => "MutableBlock(<released>)".to_string(),
            }
        }
    }
);

/// A staged block: it has its sequence hash but is not matchable until registered. Dropping
/// or releasing it returns the block to the free pool.
#[pyclass(module = "kvbm", name = "CompleteBlock")]
pub(crate) struct CompleteBlock {
    pub(crate) inner: Option<kvbm_logical::CompleteBlock<Device>>,
    pub(crate) gone: Gone,
    pub(crate) id: u32,
    pub(crate) manager: u64,
    pub(crate) memory: Memory,
    pub(crate) block_size: usize,
}

impl CompleteBlock {
    /// Its block may always leave it (it has no writable view).
    pub(crate) fn may_go(&self) -> PyResult<()> {
        Ok(())
    }

    fn let_go(&self, block: kvbm_logical::CompleteBlock<Device>) {
        drop(block);
    }

    pub(crate) fn new(
        block: kvbm_logical::CompleteBlock<Device>,
        memory: &Memory,
        block_size: usize,
    ) -> Self {
        Self {
            id: block.block_id().get(),
            manager: block.manager_id().get(),
            inner: Some(block),
            gone: Gone::Held,
            memory: memory.clone(),
            block_size,
        }
    }

    pub(crate) fn live(&self) -> PyResult<&kvbm_logical::CompleteBlock<Device>> {
        self.inner
            .as_ref()
            .ok_or_else(|| gone_error("CompleteBlock", self.gone))
    }
}

handle_methods!(
    CompleteBlock,
    "Returns the block to the free pool. Releasing twice does nothing.",
    {
        /// The sequence hash it was staged with.
        #[getter]
        fn sequence_hash(&self) -> PyResult<u64> {
            self.live().map(|b| b.sequence_hash().as_u64())
        }

        /// The parent hash it was staged with, if any.
        #[getter]
        fn parent(&self) -> PyResult<Option<u64>> {
            self.live().map(|b| b.parent().map(SequenceHash::as_u64))
        }

        /// Forgets the hash: consumes this handle and returns the block as a `MutableBlock`.
        fn reset(&mut self) -> PyResult<MutableBlock> {
            self.live()?;
            let block = self.inner.take().expect("checked live").reset();
            self.gone = Gone::Reset;
            Ok(MutableBlock::new(block, &self.memory, self.block_size))
        }

        fn __repr__(&self) -> String {
            match &self.inner {
                Some(b) => format!(
                    "CompleteBlock(block_id={}, sequence_hash={:#018x})",
                    self.id,
                    b.sequence_hash().as_u64()
                ),
                None => "CompleteBlock(<released>)".to_string(),
            }
        }
    }
);

/// A registered block: matchable by its hash, shareable (`clone()` adds an owner), never
/// evicted while any owner holds it. When the last owner releases it, it stays cached in the
/// inactive pool until an allocation evicts it.
#[pyclass(module = "kvbm", name = "ImmutableBlock")]
pub(crate) struct ImmutableBlock {
    pub(crate) inner: Option<kvbm_logical::ImmutableBlock<Device>>,
    pub(crate) gone: Gone,
    pub(crate) id: u32,
    pub(crate) manager: u64,
    pub(crate) memory: Memory,
}

impl ImmutableBlock {
    /// Its block may always leave it (it has no writable view).
    pub(crate) fn may_go(&self) -> PyResult<()> {
        Ok(())
    }

    fn let_go(&self, block: kvbm_logical::ImmutableBlock<Device>) {
        drop(block);
    }

    pub(crate) fn new(block: kvbm_logical::ImmutableBlock<Device>, memory: &Memory) -> Self {
        Self {
            id: block.block_id().get(),
            manager: block.manager_id().get(),
            inner: Some(block),
            gone: Gone::Held,
            memory: memory.clone(),
        }
    }

    pub(crate) fn live(&self) -> PyResult<&kvbm_logical::ImmutableBlock<Device>> {
        self.inner
            .as_ref()
            .ok_or_else(|| gone_error("ImmutableBlock", self.gone))
    }
}

handle_methods!(
    ImmutableBlock,
    "Gives up this owner's hold; the block becomes inactive (still matchable) when its last owner goes. Releasing twice does nothing.",
    {
        /// Its sequence hash.
        #[getter]
        fn sequence_hash(&self) -> PyResult<u64> {
            self.live().map(|b| b.sequence_hash().as_u64())
        }

        /// Another owner of the same block (released independently).
        fn clone(&self) -> PyResult<ImmutableBlock> {
            let block = self.live()?.clone();
            Ok(ImmutableBlock::new(block, &self.memory))
        }

        /// A zero-copy, read-only `memoryview` of the block's host memory (whole block or one
        /// region, as for `MutableBlock.view`). The view holds its own owner of the block, so the
        /// block stays registered and unchanged while the view exists.
        #[pyo3(signature = (layer = None, outer = 0))]
        fn view<'py>(
            &self,
            py: Python<'py>,
            layer: Option<usize>,
            outer: usize,
        ) -> PyResult<Bound<'py, PyAny>> {
            let block = self.live()?;
            let layout = self.memory.as_ref().ok_or_else(no_memory)?;
            make_view(
                py,
                layout,
                BlockId::new(self.id),
                layer,
                outer,
                Holds::Block(block.clone()),
            )
        }

        fn __repr__(&self) -> String {
            match &self.inner {
                Some(b) => format!(
                    "ImmutableBlock(block_id={}, sequence_hash={:#018x})",
                    self.id,
                    b.sequence_hash().as_u64()
                ),
                None => "ImmutableBlock(<released>)".to_string(),
            }
        }
    }
);
