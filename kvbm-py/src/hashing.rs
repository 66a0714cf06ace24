//! `kvbm.hash_tokens` and `kvbm.salt_hash`: the sequence hashing specification
//! (kvbm-logical's `docs/hashing.md`).

use std::collections::HashMap;

use kvbm_logical::{Salt, SaltHash, SequenceHash, hash_block};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};

use crate::errors::ConfigError;

pub(crate) fn make_salt(salt: Option<&Bound<'_, PyAny>>, lora_id: Option<u64>) -> PyResult<Salt> {
    let mut s = Salt::none();
    if let Some(id) = lora_id {
        s = s.with_lora_id(id);
    }
    match salt {
        None => {}
        Some(v) if v.is_none() => {}
        Some(v) => {
            if let Ok(text) = v.cast::<PyString>() {
                s = s.with_cache_salt(text.extract::<String>()?.into_bytes());
            } else if let Ok(bytes) = v.cast::<PyBytes>() {
                s = s.with_cache_salt(bytes.as_bytes().to_vec());
            } else {
                return Err(PyTypeError::new_err(
                    "salt must be None, str (UTF-8 encoded) or bytes",
                ));
            }
        }
    }
    Ok(s)
}

/// The salt hash (`H(encoding)`) of a cache salt and/or LoRA adapter id.
#[pyfunction]
#[pyo3(signature = (salt = None, *, lora_id = None))]
pub(crate) fn salt_hash(salt: Option<&Bound<'_, PyAny>>, lora_id: Option<u64>) -> PyResult<u64> {
    Ok(make_salt(salt, lora_id)?.hash().as_u64())
}

/// The sequence hashes of the complete blocks of `tokens` (a partial tail has none), chained
/// from the salt: `salt` is a cache salt (str or bytes), `lora_id` a LoRA adapter id, and
/// `extra_keys` maps a block index to its extra 64-bit keys (multimodal content hashes).
/// `parent`: continue a chain (the hash of the block before `tokens[0]`), so that a decoder
/// hashes each new block once instead of the whole sequence again.
#[pyfunction]
#[pyo3(signature = (tokens, block_size, salt = None, *, lora_id = None, extra_keys = None, parent = None))]
pub(crate) fn hash_tokens(
    py: Python<'_>,
    tokens: Vec<u32>,
    block_size: usize,
    salt: Option<&Bound<'_, PyAny>>,
    lora_id: Option<u64>,
    extra_keys: Option<HashMap<usize, Vec<u64>>>,
    parent: Option<u64>,
) -> PyResult<Vec<u64>> {
    if block_size == 0 {
        return Err(ConfigError::new_err("block_size must be at least 1"));
    }
    let salt: SaltHash = make_salt(salt, lora_id)?.hash();
    let extra = extra_keys.unwrap_or_default();
    let n = tokens.len() / block_size;
    let work = move || {
        let mut out = Vec::with_capacity(n);
        let mut parent: Option<SequenceHash> = parent.map(SequenceHash::new);
        for (i, block) in tokens.chunks_exact(block_size).enumerate() {
            let keys = extra.get(&i).map_or(&[][..], Vec::as_slice);
            let h = hash_block(parent, salt, block, keys);
            out.push(h.as_u64());
            parent = Some(h);
        }
        out
    };
    Ok(crate::batch::run(py, n * block_size / 16, work))
}
