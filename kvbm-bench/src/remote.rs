//! `kvbm-bench remote`: put and get throughput of the remote tier (G4, `RemoteStore`) against
//! `redis-benchmark` with the same value size, pipeline depth and client count on the same
//! server, interleaved in the same run.
//!
//! kvbm's side: `clients` threads share one `RemoteStore`; each puts (then gets) its share of
//! `blocks` distinct blocks, `depth` per call, so that each call is one pipelined round trip of
//! `depth` commands, as `redis-benchmark -P depth` sends them. Every get is checked: each
//! outcome must be a hit and every byte must match (the comparison is outside the timed
//! calls). Throughput counts value bytes (the 48-byte header + the block), as
//! `redis-benchmark -d` counts its values.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use kvbm_logical::SequenceHash;
use kvbm_physical::remote::{HEADER_BYTES, Namespace, RemoteConfig, RemoteStore};
use kvbm_physical::{GetOutcome, PutOutcome, StoreBlock, StoreTier};
use serde::Serialize;
use thiserror::Error;

/// What to measure.
#[derive(Clone, Debug)]
pub struct RemotePlan {
    /// The server (`redis://` or `rediss://`; for a cluster, a seed).
    pub url: String,
    /// Speak Redis Cluster.
    pub cluster: bool,
    /// A CA certificate (PEM file) for `rediss://`.
    pub tls_ca: Option<PathBuf>,
    /// Block sizes, KiB.
    pub block_kib: Vec<usize>,
    /// Commands per round trip (both sides).
    pub depth: usize,
    /// Concurrent connections (both sides).
    pub clients: usize,
    /// Bytes moved per measurement and direction, MiB (at least `depth` blocks).
    pub total_mib: usize,
    /// Repetitions (medians reported), kvbm and redis-benchmark interleaved.
    pub reps: usize,
    /// The `redis-benchmark` program; `None`: not measured.
    pub redis_benchmark: Option<PathBuf>,
    /// redis-benchmark over as many distinct keys as kvbm writes (`-r BLOCKS`, after an
    /// untimed fill) instead of one key overwritten and read again (its default, which keeps
    /// the value hot in the server's caches). Leaves those `key:*` keys behind: for a scratch
    /// server only.
    pub distinct_keys: bool,
}

/// One direction at one block size.
#[derive(Clone, Debug, Serialize)]
pub struct RemoteResult {
    /// Block size, KiB.
    pub block_kib: usize,
    /// `put` (kvbm) / `SET` (redis-benchmark), or `get` / `GET`.
    pub op: &'static str,
    /// Bytes of one value (header + block).
    pub value_bytes: usize,
    /// Blocks (requests) per measurement.
    pub blocks: usize,
    /// kvbm, median GB/s (10^9 bytes of values per second).
    pub kvbm_gb_per_s: f64,
    /// redis-benchmark, median GB/s, when measured.
    pub redis_benchmark_gb_per_s: Option<f64>,
    /// kvbm over redis-benchmark.
    pub fraction: Option<f64>,
    /// Every kvbm run, GB/s.
    pub kvbm_runs: Vec<f64>,
    /// Every redis-benchmark run, GB/s.
    pub redis_benchmark_runs: Vec<f64>,
}

/// The whole measurement.
#[derive(Clone, Debug, Serialize)]
pub struct RemoteReport {
    /// The server, credentials removed.
    pub server: String,
    /// Cluster mode.
    pub cluster: bool,
    /// Pipeline depth.
    pub depth: usize,
    /// Connections.
    pub clients: usize,
    /// Results per block size and direction.
    pub results: Vec<RemoteResult>,
    /// Blocks read back and compared byte for byte.
    pub verified_blocks: u64,
    /// Why redis-benchmark was not run, if it was not.
    pub redis_benchmark_note: Option<String>,
    /// redis-benchmark used distinct keys (`-r`).
    pub distinct_keys: bool,
}

/// Why the measurement could not be made.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum RemoteBenchError {
    /// The store could not be configured.
    #[error("remote store: {0}")]
    Config(#[from] kvbm_physical::remote::ConfigError),
    /// A put was not stored, or a get not served (the server is down, full, or wrong).
    #[error("{op} of block {index}: {outcome}")]
    Outcome {
        /// `put` or `get`.
        op: &'static str,
        /// Which block.
        index: usize,
        /// What happened instead.
        outcome: String,
    },
    /// A served block's bytes differ from what was put.
    #[error("block {index}: the bytes served differ from the bytes put")]
    Mismatch {
        /// Which block.
        index: usize,
    },
    /// redis-benchmark failed or printed nothing usable.
    #[error("redis-benchmark: {0}")]
    RedisBenchmark(String),
    /// A file (CA certificate) could not be read, or a process not started.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// A bad argument.
    #[error("{0}")]
    Argument(&'static str),
}

/// `url` with any `user:password@` replaced by `***@`.
pub fn redact(url: &str) -> String {
    let Some(start) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[start..];
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..end].rfind('@') {
        Some(at) => format!("{}***@{}", &url[..start], &rest[at + 1..]),
        None => url.to_owned(),
    }
}

/// A throw-away `redis-server` on a free loopback port, killed on drop (for `kvbm-bench remote`
/// without `--redis`, and for tests).
pub struct LocalRedis {
    child: Child,
    /// Its port.
    pub port: u16,
}

impl LocalRedis {
    /// Starts `redis-server` (from `PATH`) with no persistence; waits until it is ready.
    pub fn start() -> Result<Self, RemoteBenchError> {
        let io = |what: &str| {
            let what = what.to_owned();
            move |source| RemoteBenchError::Io { what, source }
        };
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(io("find a free port"))?
            .port();
        let mut child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args([
                "--appendonly",
                "no",
                "--logfile",
                "",
                "--protected-mode",
                "no",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(io("start redis-server (install the redis-server package)"))?;
        let stdout = child
            .stdout
            .take()
            .ok_or(RemoteBenchError::Argument("no stdout"))?;
        let mut lines = BufReader::new(stdout).lines();
        let ready = lines.any(|l| l.is_ok_and(|l| l.contains("Ready to accept connections")));
        if !ready {
            let _ = child.kill();
            let _ = child.wait();
            return Err(RemoteBenchError::Argument(
                "redis-server exited before it was ready",
            ));
        }
        // Keep reading its log so that the pipe never fills.
        std::thread::spawn(move || lines.for_each(drop));
        Ok(Self { child, port })
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for LocalRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `redis-benchmark` on `PATH`, if any.
pub fn find_redis_benchmark() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("redis-benchmark"))
        .find(|p| p.is_file())
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return 0.0;
    }
    if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    }
}

/// Runs the plan; `progress` hears what is being measured.
pub fn run(
    plan: &RemotePlan,
    mut progress: impl FnMut(&str),
) -> Result<RemoteReport, RemoteBenchError> {
    if plan.block_kib.is_empty() || plan.block_kib.contains(&0) {
        return Err(RemoteBenchError::Argument(
            "--block-kib must list positive sizes",
        ));
    }
    if plan.depth == 0 || plan.clients == 0 || plan.reps == 0 || plan.total_mib == 0 {
        return Err(RemoteBenchError::Argument(
            "--depth, --clients, --reps and --total-mib must be positive",
        ));
    }
    let ca = match &plan.tls_ca {
        Some(p) => Some(std::fs::read(p).map_err(|source| RemoteBenchError::Io {
            what: format!("read {}", p.display()),
            source,
        })?),
        None => None,
    };
    let mut results = Vec::new();
    let mut verified = 0u64;
    let mut note = plan
        .redis_benchmark
        .is_none()
        .then(|| "redis-benchmark not found; only kvbm was measured".to_owned());
    for &kib in &plan.block_kib {
        let block_bytes = kib << 10;
        let value_bytes = block_bytes + HEADER_BYTES;
        let blocks = ((plan.total_mib << 20) / block_bytes).max(plan.depth);
        let (mut put_runs, mut get_runs, mut set_runs, mut rget_runs) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        // One untimed warm-up of each side: connections, and the server's allocator warmed to
        // this value size.
        progress(&format!("{kib} KiB blocks: warm-up"));
        kvbm_once(plan, ca.as_deref(), block_bytes, blocks, usize::MAX)?;
        verified += blocks as u64;
        if let Some(rb) = &plan.redis_benchmark
            && let Err(e) = redis_benchmark_once(plan, rb, value_bytes, blocks, true)
        {
            note = Some(e.to_string());
        }
        for rep in 0..plan.reps {
            progress(&format!(
                "{kib} KiB blocks, run {}/{}: kvbm",
                rep + 1,
                plan.reps
            ));
            let (put_s, get_s) = kvbm_once(plan, ca.as_deref(), block_bytes, blocks, rep)?;
            verified += blocks as u64;
            let gb = (blocks * value_bytes) as f64 / 1e9;
            put_runs.push(gb / put_s);
            get_runs.push(gb / get_s);
            if let Some(rb) = &plan.redis_benchmark {
                progress(&format!(
                    "{kib} KiB blocks, run {}/{}: redis-benchmark",
                    rep + 1,
                    plan.reps
                ));
                match redis_benchmark_once(plan, rb, value_bytes, blocks, false) {
                    Ok((set_rps, get_rps)) => {
                        set_runs.push(set_rps * value_bytes as f64 / 1e9);
                        rget_runs.push(get_rps * value_bytes as f64 / 1e9);
                    }
                    Err(e) => note = Some(e.to_string()),
                }
            }
        }
        for (op, kvbm, reference) in [("put", put_runs, set_runs), ("get", get_runs, rget_runs)] {
            let k = median(&kvbm);
            let r = (!reference.is_empty()).then(|| median(&reference));
            results.push(RemoteResult {
                block_kib: kib,
                op,
                value_bytes,
                blocks,
                kvbm_gb_per_s: k,
                redis_benchmark_gb_per_s: r,
                fraction: r.map(|r| k / r),
                kvbm_runs: kvbm,
                redis_benchmark_runs: reference,
            });
        }
    }
    if plan.redis_benchmark.is_some() {
        cleanup_redis_benchmark_key(plan);
    }
    Ok(RemoteReport {
        server: redact(&plan.url),
        cluster: plan.cluster,
        depth: plan.depth,
        clients: plan.clients,
        results,
        verified_blocks: verified,
        redis_benchmark_note: note,
        distinct_keys: plan.distinct_keys,
    })
}

/// One put pass and one get pass of `blocks` fresh blocks (a namespace of their own); the
/// seconds each took. Removes the blocks afterwards.
fn kvbm_once(
    plan: &RemotePlan,
    ca: Option<&[u8]>,
    block_bytes: usize,
    blocks: usize,
    rep: usize,
) -> Result<(f64, f64), RemoteBenchError> {
    let run_id = format!(
        "kvbm-bench-{}-{}-{rep}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    let mut builder =
        RemoteConfig::builder(Namespace::new(run_id, block_bytes as u64), block_bytes)
            .url(plan.url.clone())
            .cluster(plan.cluster)
            .pipeline_depth(plan.depth)
            .max_pipeline_bytes((plan.depth * (block_bytes + HEADER_BYTES)).max(64 << 20))
            .connect_timeout(Duration::from_secs(2))
            .response_timeout(Duration::from_secs(10));
    if let Some(ca) = ca {
        builder = builder.tls_ca_pem(ca.to_vec());
    }
    let store = RemoteStore::open(builder.build()?)?;
    // 16 distinct images, cycled; every value differs anyway (its header names its hash).
    let images: Vec<Vec<u8>> = (0..16u64).map(|i| pattern(i, block_bytes)).collect();
    let hash = |i: usize| SequenceHash::new(0x6b76_626d_0000_0000 | i as u64);
    let clients = plan.clients.min(blocks);
    // Client c handles blocks c, c + clients, ...; in calls of `depth`.
    let shares: Vec<Vec<usize>> = (0..clients)
        .map(|c| (c..blocks).step_by(clients).collect())
        .collect();

    let start = Barrier::new(clients);
    let put_times: Vec<Result<f64, RemoteBenchError>> = std::thread::scope(|s| {
        let handles: Vec<_> = shares
            .iter()
            .map(|share| {
                let (store, images, start) = (&store, &images, &start);
                s.spawn(move || {
                    start.wait();
                    let mut busy = Duration::ZERO;
                    for call in share.chunks(plan.depth) {
                        let batch: Vec<StoreBlock<'_>> = call
                            .iter()
                            .map(|&i| StoreBlock {
                                hash: hash(i),
                                parent: i.checked_sub(1).map(hash),
                                bytes: &images[i % images.len()],
                            })
                            .collect();
                        let t = Instant::now();
                        let outcomes = store.put(&batch);
                        busy += t.elapsed();
                        if let Some((k, o)) = outcomes
                            .iter()
                            .enumerate()
                            .find(|(_, o)| **o != PutOutcome::Stored)
                        {
                            return Err(RemoteBenchError::Outcome {
                                op: "put",
                                index: call[k],
                                outcome: format!("{o:?}"),
                            });
                        }
                    }
                    Ok(busy.as_secs_f64())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    let get_times: Vec<Result<f64, RemoteBenchError>> = std::thread::scope(|s| {
        let handles: Vec<_> = shares
            .iter()
            .map(|share| {
                let (store, images, start) = (&store, &images, &start);
                s.spawn(move || {
                    start.wait();
                    let mut bufs = vec![vec![0u8; block_bytes]; plan.depth];
                    let mut busy = Duration::ZERO;
                    for call in share.chunks(plan.depth) {
                        let hashes: Vec<SequenceHash> = call.iter().map(|&i| hash(i)).collect();
                        let mut out: Vec<&mut [u8]> = bufs
                            .iter_mut()
                            .take(call.len())
                            .map(Vec::as_mut_slice)
                            .collect();
                        let t = Instant::now();
                        let outcomes = store.get(&hashes, &mut out);
                        busy += t.elapsed();
                        for (k, &i) in call.iter().enumerate() {
                            let parent = i.checked_sub(1).map(hash);
                            if outcomes[k] != (GetOutcome::Hit { parent }) {
                                return Err(RemoteBenchError::Outcome {
                                    op: "get",
                                    index: i,
                                    outcome: format!("{:?}", outcomes[k]),
                                });
                            }
                            if bufs[k] != images[i % images.len()] {
                                return Err(RemoteBenchError::Mismatch { index: i });
                            }
                        }
                    }
                    Ok(busy.as_secs_f64())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    let all: Vec<SequenceHash> = (0..blocks).map(hash).collect();
    store.remove(&all);
    // The slowest client's time inside the calls.
    let longest = |v: Vec<Result<f64, RemoteBenchError>>| -> Result<f64, RemoteBenchError> {
        v.into_iter()
            .try_fold(0f64, |m, t| Ok(m.max(t?)))
            .map(|m| m.max(1e-9))
    };
    Ok((longest(put_times)?, longest(get_times)?))
}

/// `redis-benchmark -t set,get -d VALUE -P DEPTH -c CLIENTS -n BLOCKS --csv` (with
/// `-r BLOCKS` for distinct keys): requests per second of SET and GET. A `warm_up` with
/// distinct keys writes every key first (`-t set -n 4×BLOCKS`), so that the GETs find values.
fn redis_benchmark_once(
    plan: &RemotePlan,
    program: &Path,
    value_bytes: usize,
    blocks: usize,
    warm_up: bool,
) -> Result<(f64, f64), RemoteBenchError> {
    let mut cmd = Command::new(program);
    cmd.args(["-u", &plan.url.replacen("rediss://", "redis://", 1)]);
    if plan.distinct_keys {
        cmd.args(["-r", &blocks.to_string()]);
    }
    let (tests, requests) = if warm_up && plan.distinct_keys {
        ("set", 4 * blocks)
    } else {
        ("set,get", blocks)
    };
    cmd.args(["-t", tests, "--csv"])
        .args(["-d", &value_bytes.to_string()])
        .args(["-P", &plan.depth.to_string()])
        .args(["-c", &plan.clients.to_string()])
        .args(["-n", &requests.to_string()]);
    if plan.cluster {
        cmd.arg("--cluster");
    }
    if plan.url.starts_with("rediss://") {
        cmd.arg("--tls");
        if let Some(ca) = &plan.tls_ca {
            cmd.arg("--cacert").arg(ca);
        }
    }
    let out = cmd.output().map_err(|source| RemoteBenchError::Io {
        what: format!("run {}", program.display()),
        source,
    })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(RemoteBenchError::RedisBenchmark(format!(
            "exit status {}",
            out.status
        )));
    }
    if warm_up && plan.distinct_keys {
        return Ok((0.0, 0.0));
    }
    parse_csv(&stdout).ok_or_else(|| {
        RemoteBenchError::RedisBenchmark("no SET and GET lines in its CSV output".to_owned())
    })
}

/// `(SET rps, GET rps)` from `redis-benchmark --csv` output.
pub fn parse_csv(csv: &str) -> Option<(f64, f64)> {
    let rps = |name: &str| {
        csv.lines().find_map(|l| {
            let mut fields = l.split(',').map(|f| f.trim().trim_matches('"'));
            (fields.next()? == name).then(|| fields.next()?.parse::<f64>().ok())?
        })
    };
    Some((rps("SET")?, rps("GET")?))
}

/// redis-benchmark without `-r` leaves one key, `key:__rand_int__`, behind; remove it.
fn cleanup_redis_benchmark_key(plan: &RemotePlan) {
    let mut cmd = Command::new("redis-cli");
    cmd.args(["-u", &plan.url.replacen("rediss://", "redis://", 1)]);
    if plan.url.starts_with("rediss://") {
        cmd.arg("--tls");
        if let Some(ca) = &plan.tls_ca {
            cmd.arg("--cacert").arg(ca);
        }
    }
    if plan.cluster {
        cmd.arg("-c");
    }
    let _ = cmd
        .args(["DEL", "key:__rand_int__"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// The human table of a report.
pub fn table(report: &RemoteReport) -> String {
    let rows: Vec<Vec<String>> = report
        .results
        .iter()
        .map(|r| {
            vec![
                r.block_kib.to_string(),
                r.op.to_owned(),
                r.blocks.to_string(),
                format!("{:.2}", r.kvbm_gb_per_s),
                r.redis_benchmark_gb_per_s
                    .map_or_else(|| "-".to_owned(), |g| format!("{g:.2}")),
                r.fraction
                    .map_or_else(|| "-".to_owned(), |f| format!("{:.0}%", f * 100.0)),
            ]
        })
        .collect();
    crate::report::table(
        &[
            "block KiB",
            "op",
            "blocks",
            "kvbm GB/s",
            "redis-benchmark GB/s",
            "kvbm / redis-benchmark",
        ],
        &rows,
    )
}

/// A deterministic, non-zero-heavy image (splitmix64).
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x2545_f491_4f6c_dd1d);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_of_redis_benchmark_7() {
        let csv = "\"test\",\"rps\",\"avg_latency_ms\"\n\"SET\",\"3322.26\",\"3.409\"\n\"GET\",\"2645.50\",\"2.353\"\n";
        assert_eq!(parse_csv(csv), Some((3322.26, 2645.50)));
        assert_eq!(parse_csv("\"SET\",\"1\"\n"), None);
        assert_eq!(parse_csv(""), None);
    }

    #[test]
    fn redaction_and_medians() {
        assert_eq!(redact("redis://u:pw@h:1"), "redis://***@h:1");
        assert_eq!(redact("redis://h:1"), "redis://h:1");
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
