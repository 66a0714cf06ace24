//! Python bindings for kvbm (the `kvbm._kvbm` extension module of the `kvbm` package).
//!
//! A thin translation layer: no cache logic lives here. Every class wraps a
//! `kvbm-logical`/`kvbm-physical` type, every Rust error becomes a `kvbm.Error` subclass with
//! the Rust message, batch calls take and return lists (one call per batch), and the GIL is
//! released during copies, waits and large batches. The Python-facing documentation is in the
//! package's docstrings and `.pyi` stubs (`python/kvbm/`).

// PyO3's generated glue for `#[pymethods]` trips these lints on items it expands.
#![allow(unreachable_pub)]

mod batch;
mod block_batch;
mod blocks;
mod errors;
mod events;
mod hashing;
mod manager;
mod request;
mod stack;
mod stores;

use pyo3::prelude::*;

/// The native module.
#[pymodule]
fn _kvbm(m: &Bound<'_, PyModule>) -> PyResult<()> {
    errors::register(m)?;
    m.add_class::<manager::BlockManager>()?;
    m.add_class::<blocks::MutableBlock>()?;
    m.add_class::<blocks::CompleteBlock>()?;
    m.add_class::<blocks::ImmutableBlock>()?;
    m.add_class::<blocks::ViewOwner>()?;
    m.add_class::<block_batch::BlockBatch>()?;
    m.add_class::<request::RequestSequence>()?;
    m.add_class::<request::Committed>()?;
    m.add_class::<request::Truncated>()?;
    m.add_class::<events::Event>()?;
    m.add_class::<events::EventStream>()?;
    m.add_class::<stack::TierStack>()?;
    m.add_class::<stores::DiskStore>()?;
    m.add_class::<stores::RedisStore>()?;
    m.add_class::<stack::Plan>()?;
    m.add_class::<stack::Pending>()?;
    m.add_class::<stack::Onboarded>()?;
    m.add_function(wrap_pyfunction!(hashing::hash_tokens, m)?)?;
    m.add_function(wrap_pyfunction!(hashing::salt_hash, m)?)?;
    m.add("HASH_SEED", kvbm_logical::HASH_SEED)?;
    m.add("HASH_SPEC_VERSION", kvbm_logical::HASH_SPEC_VERSION)?;
    let backends: Vec<&str> = kvbm_logical::EvictionBackend::ALL
        .iter()
        .map(|b| b.name())
        .collect();
    m.add("EVICTION_BACKENDS", backends)?;
    m.add("MAX_BLOCK_SIZE", kvbm_logical::MAX_BLOCK_SIZE)?;
    m.add("MAX_BLOCKS", kvbm_logical::MAX_BLOCKS)?;
    m.add("MAX_RESERVE_TOKENS", request::MAX_RESERVE_TOKENS)?;
    Ok(())
}
