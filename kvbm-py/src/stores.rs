//! Store tiers below the `TierStack`'s G2: `kvbm.DiskStore` (a disk tier, G3 when first) and
//! `kvbm.RedisStore` (a remote tier on Redis). Each is a description; the stack opens it when
//! it is built, with G2's block image size and layout fingerprint
//! (`kvbm_physical::stack::StoreTierConfig` over `kvbm_physical::disk` / `remote`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kvbm_logical::SequenceHash;
use kvbm_physical::disk::{Capacity, DirectIo, DiskTier, RecoveryMode};
use kvbm_physical::remote::{Namespace, RemoteConfig, RemoteStore, redact_url};
use kvbm_physical::stack::{Probe, StoreTierConfig};
use kvbm_physical::{DiskError, GetOutcome, LayoutConfig, StoreTier};
use pyo3::prelude::*;

use crate::errors::{ConfigError, DiskTierError, RedisUnavailableError};

fn seconds(what: &str, s: f64) -> PyResult<Duration> {
    match Duration::try_from_secs_f64(s) {
        Ok(d) if !d.is_zero() => Ok(d),
        _ => Err(ConfigError::new_err(format!(
            "{what} = {s}: a positive number of seconds"
        ))),
    }
}

/// `(tp_rank, tp_size)`, checked.
fn shard(tp_rank: u32, tp_size: u32) -> PyResult<(u32, u32)> {
    if tp_size == 0 || tp_rank >= tp_size {
        return Err(ConfigError::new_err(format!(
            "tp_rank = {tp_rank}, tp_size = {tp_size}: the rank must be below the size"
        )));
    }
    Ok((tp_rank, tp_size))
}

/// A disk tier: a file at `path` holding `capacity` blocks (or `capacity_bytes` of file).
#[pyclass(module = "kvbm", name = "DiskStore", frozen)]
pub(crate) struct DiskStore {
    path: PathBuf,
    capacity: Capacity,
    recovery: RecoveryMode,
    direct_io: DirectIo,
    model: String,
    dtype: Option<String>,
    tp: (u32, u32),
}

#[pymethods]
impl DiskStore {
    /// `capacity`: block slots (or `capacity_bytes`: bytes of file); `recovery`: what opening
    /// an existing file reads back ("discard", "headers", "verify"); `direct_io`: "auto",
    /// "require" or "off". `model` (required), `dtype` and `tp_rank`/`tp_size` enter the
    /// file's fingerprint with G2's layout, so that a file written for other weights (a
    /// fine-tune, a new revision: put it in `model`), another element type of the same size
    /// (bf16 and fp16) or another tensor-parallel rank is never read back.
    #[new]
    #[pyo3(signature = (
        path, capacity = None, *, model, capacity_bytes = None, recovery = "verify",
        direct_io = "auto", dtype = None, tp_rank = 0, tp_size = 1
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        path: PathBuf,
        capacity: Option<u32>,
        model: &str,
        capacity_bytes: Option<u64>,
        recovery: &str,
        direct_io: &str,
        dtype: Option<&str>,
        tp_rank: u32,
        tp_size: u32,
    ) -> PyResult<Self> {
        let tp = shard(tp_rank, tp_size)?;
        if model.is_empty() {
            return Err(ConfigError::new_err(
                "model: an id of the weights, not empty",
            ));
        }
        let capacity = match (capacity, capacity_bytes) {
            (Some(n), None) => Capacity::Blocks(n),
            (None, Some(b)) => Capacity::Bytes(b),
            _ => {
                return Err(ConfigError::new_err(
                    "give exactly one of capacity (blocks) and capacity_bytes",
                ));
            }
        };
        let recovery = match recovery {
            "discard" => RecoveryMode::Discard,
            "headers" => RecoveryMode::Headers,
            "verify" => RecoveryMode::Verify,
            other => {
                return Err(ConfigError::new_err(format!(
                    "unknown recovery {other:?}: expected discard, headers or verify"
                )));
            }
        };
        let direct_io = match direct_io {
            "auto" => DirectIo::Auto,
            "require" => DirectIo::Require,
            "off" => DirectIo::Off,
            other => {
                return Err(ConfigError::new_err(format!(
                    "unknown direct_io {other:?}: expected auto, require or off"
                )));
            }
        };
        Ok(Self {
            path,
            capacity,
            recovery,
            direct_io,
            model: model.to_owned(),
            dtype: dtype.map(str::to_owned),
            tp,
        })
    }

    /// The tier file.
    #[getter]
    fn path(&self) -> PathBuf {
        self.path.clone()
    }

    fn __repr__(&self) -> String {
        format!(
            "DiskStore(path={:?}, capacity={:?}, model={:?})",
            self.path, self.capacity, self.model
        )
    }
}

impl DiskStore {
    fn open(&self, g2: &LayoutConfig, block_bytes: usize) -> PyResult<StoreTierConfig> {
        // The model id of the fingerprint: the weights, the element type and the shard.
        let identity = format!(
            "{}\0{}\0{}of{}",
            self.model,
            self.dtype.as_deref().unwrap_or(""),
            self.tp.0,
            self.tp.1
        );
        let model = xxhash_rust::xxh3::xxh3_64(identity.as_bytes());
        let fingerprint = kvbm_physical::disk::layout_fingerprint(g2, model);
        let tier = DiskTier::builder()
            .path(&self.path)
            .block_bytes(block_bytes)
            .capacity(self.capacity)
            .fingerprint(fingerprint)
            .recovery(self.recovery)
            .direct_io(self.direct_io)
            .open()
            .map_err(|e| disk_error(&self.path, e))?;
        Ok(StoreTierConfig::new(Arc::new(tier)).probe(Probe::OnLookup))
    }
}

/// Options out of range are a `ConfigError`; anything the file or file system refused
/// (unwritable or missing directory, no space, locked, not a kvbm file) a `DiskTierError`
/// with `path`.
fn disk_error(path: &std::path::Path, e: DiskError) -> PyErr {
    match e {
        DiskError::Missing(_) | DiskError::InvalidOption { .. } | DiskError::Manager(_) => {
            ConfigError::new_err(e.to_string())
        }
        _ => {
            let err = DiskTierError::new_err(e.to_string());
            Python::attach(|py| {
                // Setting an attribute on a fresh exception cannot fail in practice.
                let _ = err.value(py).setattr("path", path.to_path_buf());
            });
            err
        }
    }
}

/// A remote tier on Redis at `url` (`redis://` or `rediss://`), keys under `namespace`.
#[pyclass(module = "kvbm", name = "RedisStore", frozen)]
pub(crate) struct RedisStore {
    url: String,
    namespace: String,
    model: String,
    dtype: Option<String>,
    tp: (u32, u32),
    cluster: bool,
    connect_timeout: Option<Duration>,
    response_timeout: Option<Duration>,
    ttl: Option<Duration>,
    check: bool,
    probe: Probe,
}

#[pymethods]
impl RedisStore {
    /// `model` (required): the id of the weights in every key (with G2's layout fingerprint;
    /// a fine-tune or a new revision needs its own); `dtype`: the KV element type's name
    /// (bf16 and fp16 have the same size, so the layout cannot tell them apart);
    /// `tp_rank`/`tp_size`: the tensor-parallel shard (ranks hold other heads in blocks of the
    /// same layout). Servers share blocks only when all of these match. `namespace`: the key
    /// prefix (one per tenant or environment sharing a Redis); `cluster`: `url` is a seed of
    /// a Redis Cluster; timeouts and `ttl` in seconds. With `check` (default) building the
    /// stack makes one round trip and raises `RedisUnavailableError` if Redis does not answer.
    /// `probe`: `"deferred"` (default: a lookup does not ask Redis, the onboard fetches the
    /// blocks no nearer tier has, and a miss ends the prefix) or `"on_lookup"` (a lookup asks
    /// it, one round trip). At most one store tier of a stack may be deferred.
    #[new]
    #[pyo3(signature = (
        url, *, model, namespace = "kvbm", dtype = None, tp_rank = 0, tp_size = 1,
        cluster = false, connect_timeout = None, response_timeout = None, ttl = None,
        check = true, probe = "deferred"
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        url: String,
        model: &str,
        namespace: &str,
        dtype: Option<&str>,
        tp_rank: u32,
        tp_size: u32,
        cluster: bool,
        connect_timeout: Option<f64>,
        response_timeout: Option<f64>,
        ttl: Option<f64>,
        check: bool,
        probe: &str,
    ) -> PyResult<Self> {
        let probe = match probe {
            "deferred" => Probe::Deferred,
            "on_lookup" => Probe::OnLookup,
            other => {
                return Err(ConfigError::new_err(format!(
                    "probe must be \"deferred\" or \"on_lookup\", not {other:?}"
                )));
            }
        };
        Ok(Self {
            url,
            namespace: namespace.to_owned(),
            model: model.to_owned(),
            dtype: dtype.map(str::to_owned),
            tp: shard(tp_rank, tp_size)?,
            cluster,
            connect_timeout: connect_timeout
                .map(|s| seconds("connect_timeout", s))
                .transpose()?,
            response_timeout: response_timeout
                .map(|s| seconds("response_timeout", s))
                .transpose()?,
            ttl: ttl.map(|s| seconds("ttl", s)).transpose()?,
            check,
            probe,
        })
    }

    /// The Redis URL, without its password.
    #[getter]
    fn url(&self) -> String {
        redact_url(&self.url)
    }

    fn __repr__(&self) -> String {
        format!(
            "RedisStore(url={:?}, namespace={:?}, model={:?})",
            redact_url(&self.url),
            self.namespace,
            self.model
        )
    }
}

impl RedisStore {
    fn open(&self, g2: &LayoutConfig, block_bytes: usize) -> PyResult<StoreTierConfig> {
        let mut ns =
            Namespace::for_layout(self.model.clone(), g2).with_prefix(self.namespace.clone());
        if let Some(dtype) = &self.dtype {
            ns = ns.with_dtype(dtype.clone());
        }
        if self.tp.1 > 1 {
            ns = ns.with_shard(self.tp.0, self.tp.1);
        }
        let mut b = RemoteConfig::builder(ns, block_bytes)
            .url(self.url.clone())
            .cluster(self.cluster)
            .ttl(self.ttl);
        if let Some(t) = self.connect_timeout {
            b = b.connect_timeout(t);
        }
        if let Some(t) = self.response_timeout {
            b = b.response_timeout(t);
        }
        let config = b.build().map_err(|e| ConfigError::new_err(e.to_string()))?;
        let store = RemoteStore::open(config).map_err(|e| ConfigError::new_err(e.to_string()))?;
        if self.check {
            // One read of a key no block has: a miss if Redis answers.
            let mut buf = vec![0u8; block_bytes];
            let outcome = store.get(&[SequenceHash::new(0)], &mut [&mut buf[..]]);
            if let Some(GetOutcome::Failed(e)) = outcome.first() {
                let url = redact_url(&self.url);
                let err = RedisUnavailableError::new_err(format!("Redis at {url}: {e}"));
                Python::attach(|py| {
                    let _ = err.value(py).setattr("url", url);
                });
                return Err(err);
            }
        }
        Ok(StoreTierConfig::new(Arc::new(store)).probe(self.probe))
    }
}

/// Opens every store of `stores` (a sequence of `DiskStore` / `RedisStore`, G3 first) for a
/// stack whose G2 layout is `g2` with `block_bytes`-byte images. Runs without the GIL where
/// it waits on I/O.
pub(crate) fn open_all(
    py: Python<'_>,
    stores: Option<&Bound<'_, PyAny>>,
    g2: &LayoutConfig,
    block_bytes: usize,
) -> PyResult<Vec<StoreTierConfig>> {
    let Some(stores) = stores else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for item in stores.try_iter()? {
        let item = item?;
        if let Ok(d) = item.cast::<DiskStore>() {
            let d = d.get();
            out.push(py.detach(|| d.open(g2, block_bytes))?);
        } else if let Ok(r) = item.cast::<RedisStore>() {
            let r = r.get();
            out.push(py.detach(|| r.open(g2, block_bytes))?);
        } else {
            return Err(pyo3::exceptions::PyTypeError::new_err(format!(
                "stores: expected DiskStore or RedisStore, got {}",
                item.get_type()
                    .name()
                    .map_or_else(|_| "?".to_string(), |n| n.to_string())
            )));
        }
    }
    Ok(out)
}
