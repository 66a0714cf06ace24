//! The Python exception hierarchy and the mapping of every Rust error onto it. Each exception
//! carries the Rust error's `Display` text; structured fields become attributes where a
//! caller can act on them (`AllocationError.available`, `NoRoomError.needed`, ...).

use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::{PyErr, create_exception};

create_exception!(
    kvbm,
    Error,
    PyException,
    "Base class of every error kvbm raises."
);
create_exception!(
    kvbm,
    ConfigError,
    Error,
    "A configuration or argument kvbm refuses (block size, block count, layout, tier stack)."
);
create_exception!(
    kvbm,
    AllocationError,
    Error,
    "Too few free or evictable blocks; nothing was taken (`requested`, `available`, `total`)."
);
create_exception!(
    kvbm,
    InvalidBlockError,
    Error,
    "A block handle that cannot be used here (wrong state, listed twice, another manager's)."
);
create_exception!(
    kvbm,
    ReleasedError,
    InvalidBlockError,
    "The handle was released, or consumed by a state transition (stage, register, reset)."
);
create_exception!(
    kvbm,
    ForeignBlockError,
    InvalidBlockError,
    "The handle belongs to another manager or tier stack; nothing was changed."
);
create_exception!(
    kvbm,
    PinError,
    Error,
    "Pinning refused: a hash not registered, or the pin budget exceeded; nothing pinned."
);
create_exception!(
    kvbm,
    InvariantError,
    Error,
    "The pool's accounting is broken (a bug: report it with the message)."
);
create_exception!(
    kvbm,
    NoRoomError,
    Error,
    "Onboarding back-pressure: G1 has too few free blocks for the plan now (`needed`, `available`)."
);
create_exception!(
    kvbm,
    CudaUnavailableError,
    Error,
    "CUDA memory was asked for, but there is no driver or GPU (or the build has no CUDA)."
);
create_exception!(
    kvbm,
    TransferError,
    Error,
    "A block read, write or copy was refused or failed."
);

create_exception!(
    kvbm,
    RequestError,
    Error,
    "A RequestSequence call refused; nothing was changed (`blocks`; `requested`, `uncomputed`; or `needed`, `allocated`)."
);

create_exception!(
    kvbm,
    StoreError,
    Error,
    "A store tier (disk, Redis) could not be opened or reached."
);
create_exception!(
    kvbm,
    DiskTierError,
    StoreError,
    "The disk tier's file could not be opened or created (unwritable or missing directory, no space, locked, not a kvbm tier file); `path`."
);
create_exception!(
    kvbm,
    RedisUnavailableError,
    StoreError,
    "Redis did not answer (refused, unreachable, timed out, authentication refused); `url`."
);

/// Builds an exception of type `E` with `message` and the given attributes.
pub(crate) fn with_attrs<E: pyo3::PyTypeInfo>(
    py: Python<'_>,
    message: String,
    attrs: &[(&str, usize)],
) -> PyErr {
    let err = PyErr::new::<E, _>(message);
    let value = err.value(py);
    for (name, v) in attrs {
        // Setting an attribute on a fresh exception instance cannot fail in practice; if it
        // did, the exception still carries the message.
        let _ = value.setattr(*name, *v);
    }
    err
}

pub(crate) fn allocation(py: Python<'_>, e: kvbm_logical::AllocationError) -> PyErr {
    match e {
        kvbm_logical::AllocationError::Exhausted {
            requested,
            available,
            total,
        } => with_attrs::<AllocationError>(
            py,
            e.to_string(),
            &[
                ("requested", requested),
                ("available", available),
                ("total", total),
            ],
        ),
        _ => AllocationError::new_err(e.to_string()),
    }
}

pub(crate) fn request(py: Python<'_>, e: kvbm_logical::RequestError) -> PyErr {
    use kvbm_logical::RequestError as E;
    let msg = e.to_string();
    match e {
        E::HoldsBlocks { blocks } => with_attrs::<RequestError>(py, msg, &[("blocks", blocks)]),
        E::NotEnoughTokens {
            requested,
            uncomputed,
        } => with_attrs::<RequestError>(
            py,
            msg,
            &[("requested", requested), ("uncomputed", uncomputed)],
        ),
        E::NotAllocated { needed, allocated } => {
            with_attrs::<RequestError>(py, msg, &[("needed", needed), ("allocated", allocated)])
        }
        _ => RequestError::new_err(msg),
    }
}

pub(crate) fn config(e: impl std::fmt::Display) -> PyErr {
    ConfigError::new_err(e.to_string())
}

pub(crate) fn invariant(e: kvbm_logical::InvariantError) -> PyErr {
    InvariantError::new_err(e.to_string())
}

pub(crate) fn pin(e: kvbm_logical::PinError) -> PyErr {
    PinError::new_err(e.to_string())
}

pub(crate) fn layout(e: kvbm_physical::LayoutError) -> PyErr {
    use kvbm_physical::{LayoutError, StorageError};
    match &e {
        LayoutError::Storage(StorageError::NoCudaDevice(_) | StorageError::CudaDisabled) => {
            CudaUnavailableError::new_err(e.to_string())
        }
        LayoutError::BlockOutOfRange { .. }
        | LayoutError::LayerOutOfRange { .. }
        | LayoutError::OuterOutOfRange { .. }
        | LayoutError::BufferSize { .. }
        | LayoutError::BlockBusy(_)
        // A CUDA call that failed (a copy of a read or write, say): not the configuration.
        | LayoutError::Storage(StorageError::Cuda { .. }) => TransferError::new_err(e.to_string()),
        _ => ConfigError::new_err(e.to_string()),
    }
}

pub(crate) fn storage(e: kvbm_physical::StorageError) -> PyErr {
    use kvbm_physical::StorageError;
    match &e {
        StorageError::NoCudaDevice(_) | StorageError::CudaDisabled => {
            CudaUnavailableError::new_err(e.to_string())
        }
        _ => ConfigError::new_err(e.to_string()),
    }
}

/// Registers every exception class on the module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("Error", py.get_type::<Error>())?;
    m.add("ConfigError", py.get_type::<ConfigError>())?;
    m.add("AllocationError", py.get_type::<AllocationError>())?;
    m.add("InvalidBlockError", py.get_type::<InvalidBlockError>())?;
    m.add("ReleasedError", py.get_type::<ReleasedError>())?;
    m.add("ForeignBlockError", py.get_type::<ForeignBlockError>())?;
    m.add("PinError", py.get_type::<PinError>())?;
    m.add("InvariantError", py.get_type::<InvariantError>())?;
    m.add("NoRoomError", py.get_type::<NoRoomError>())?;
    m.add(
        "CudaUnavailableError",
        py.get_type::<CudaUnavailableError>(),
    )?;
    m.add("TransferError", py.get_type::<TransferError>())?;
    m.add("RequestError", py.get_type::<RequestError>())?;
    m.add("StoreError", py.get_type::<StoreError>())?;
    m.add("DiskTierError", py.get_type::<DiskTierError>())?;
    m.add(
        "RedisUnavailableError",
        py.get_type::<RedisUnavailableError>(),
    )?;
    Ok(())
}
