//! `kvbm-bench disk`: the G3 disk tier's block write and read throughput by block size,
//! queue depth and I/O back end, against one large sequential `O_DIRECT` write and read of
//! the same bytes measured in the same run (the ceiling); and, with `--crash-cycles N`, a
//! crash loop: a writer child process killed with SIGKILL at a random moment, N times, the
//! tier reopened after each kill and every recovered block checked byte for byte.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kvbm_logical::SequenceHash;
use kvbm_physical::disk::{
    BufferedReason, Capacity, DirectIo, DiskTier, IoBackend, IoMode, PAGE, RecoveryMode,
    sequential_ceiling,
};
use kvbm_physical::{GetOutcome, PutOutcome, StoreBlock, StoreTier};
use serde::Serialize;

use crate::report::table;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// The layout fingerprint the bench's tiers use.
const FINGERPRINT: u64 = 0x6b76_626d_6265_6e63;

/// Arguments of `kvbm-bench disk`.
#[derive(clap::Args, Clone, Debug)]
pub struct DiskArgs {
    /// Directory for the tier files (default: a new directory under the system's temp dir,
    /// removed afterwards). Its file system is what is measured.
    #[arg(long, value_name = "DIR")]
    pub path: Option<PathBuf>,
    /// Block sizes in KiB.
    #[arg(long, value_delimiter = ',', default_value = "256,2048", value_parser = crate::args::kib)]
    pub block_kib: Vec<usize>,
    /// Queue depths (I/Os in flight per call; threads of the thread pool).
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub depth: Vec<usize>,
    /// I/O back ends: threads, io_uring.
    #[arg(long, value_delimiter = ',', default_value = "threads,io_uring", value_parser = parse_backend)]
    pub backend: Vec<IoBackend>,
    /// MiB written and read per point (and by the ceiling).
    #[arg(long, default_value_t = 256, value_parser = crate::args::mib)]
    pub mib: usize,
    /// Blocks per put / get call.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Put from and get into heap buffers that are not page-aligned, so that the tier goes
    /// through its bounce buffers. By default the buffers are page-aligned, as G2's
    /// (system or pinned memory of a fully contiguous layout) are, and blocks of whole pages
    /// are read and written in place.
    #[arg(long)]
    pub unaligned: bool,
    /// Repetitions (medians reported); each repetition measures the ceiling again.
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Instead of throughput: kill a writer child with SIGKILL this many times, reopening the
    /// tier after each kill; fails unless every recovered block verifies.
    #[arg(long, value_name = "N")]
    pub crash_cycles: Option<usize>,
    /// Crash loop: block size in KiB.
    #[arg(long, default_value_t = 64)]
    pub crash_block_kib: usize,
    /// Crash loop: tier capacity in blocks (smaller than what the writers write, so that
    /// eviction happens too).
    #[arg(long, default_value_t = 256)]
    pub crash_capacity: u32,
    /// Crash loop: buffered I/O (page cache) instead of O_DIRECT. A buffered write killed
    /// part-way can leave a torn slot; an O_DIRECT one rarely does.
    #[arg(long)]
    pub crash_buffered: bool,
    /// Seed of the crash loop.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Internal: run as the crash loop's writer child.
    #[arg(long, hide = true)]
    pub crash_writer: bool,
}

fn parse_backend(s: &str) -> Result<IoBackend, String> {
    match s {
        "threads" | "thread-pool" | "psync" => Ok(IoBackend::ThreadPool),
        "io_uring" | "io-uring" | "uring" => Ok(IoBackend::IoUring),
        other => Err(format!("unknown back end `{other}` (threads, io_uring)")),
    }
}

/// The ceiling of one repetition.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Ceiling {
    /// MB/s of one sequential write of all the bytes into freshly preallocated space.
    pub fill_mb_s: f64,
    /// MB/s of one sequential write over the same bytes again.
    pub write_mb_s: f64,
    /// MB/s of one sequential read of all the bytes.
    pub read_mb_s: f64,
}

/// One measured point (medians over the repetitions).
#[derive(Clone, Debug, Serialize)]
pub struct DiskPoint {
    /// `threads` or `io_uring`.
    pub backend: &'static str,
    /// Block size, KiB.
    pub block_kib: usize,
    /// Queue depth.
    pub depth: usize,
    /// Block writes (put) into a fresh tier (freshly preallocated slots), MB/s of block
    /// bytes.
    pub fill_mb_s: f64,
    /// Block writes (put) into a full tier (each evicts a block and rewrites its slot), MB/s
    /// of block bytes: the steady state.
    pub write_mb_s: f64,
    /// Block reads (get, verified), MB/s of block bytes.
    pub read_mb_s: f64,
    /// The medians of this point's own ceilings (one measured next to each repetition).
    pub ceiling: Ceiling,
    /// Median over repetitions of fill / the ceiling's fill measured next to it.
    pub fill_of_ceiling: f64,
    /// Median over repetitions of write / the ceiling's (over)write measured next to it.
    pub write_of_ceiling: f64,
    /// Median over repetitions of read / the ceiling's read measured next to it.
    pub read_of_ceiling: f64,
    /// The goal for this block size (0.85 at 2 MiB and above, 0.70 below).
    pub goal: f64,
}

/// The whole throughput run.
#[derive(Clone, Debug, Serialize)]
pub struct DiskReport {
    /// The directory measured.
    pub path: String,
    /// Its file system, from /proc/mounts.
    pub filesystem: String,
    /// `direct` or `buffered (why)`.
    pub io_mode: String,
    /// MiB per point.
    pub mib: usize,
    /// Whether the caller's block buffers were page-aligned (see `--unaligned`).
    pub aligned_buffers: bool,
    /// Every ceiling measured, in order (one per point and repetition).
    pub ceilings: Vec<Ceiling>,
    /// Points.
    pub points: Vec<DiskPoint>,
    /// Back ends that could not start here, with the reason.
    pub unavailable: Vec<String>,
}

fn mode_name(mode: &IoMode) -> String {
    match mode {
        IoMode::Direct => "direct".into(),
        IoMode::Buffered {
            reason: BufferedReason::Requested,
        } => "buffered (requested)".into(),
        IoMode::Buffered {
            reason: BufferedReason::Refused(why),
        } => format!("buffered (O_DIRECT refused: {why})"),
        other => format!("{other:?}"),
    }
}

/// The file system type of the mount holding `path` (longest matching mount point).
pub fn filesystem_of(path: &Path) -> String {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_owned());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mut best = ("unknown".to_owned(), 0);
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() >= 3 && path.starts_with(f[1]) && f[1].len() >= best.1 {
            best = (format!("{} ({})", f[2], f[0]), f[1].len());
        }
    }
    best.0
}

/// A temporary directory removed on drop, unless the user gave one.
struct WorkDir {
    path: PathBuf,
    remove: bool,
}

impl WorkDir {
    fn new(given: Option<&Path>) -> Result<Self, Error> {
        let (path, remove) = match given {
            Some(p) => (p.to_owned(), false),
            None => (
                std::env::temp_dir().join(format!("kvbm-bench-disk-{}", std::process::id())),
                true,
            ),
        };
        std::fs::create_dir_all(&path)?;
        Ok(Self { path, remove })
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.remove {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Non-repeating bytes of a block: a function of its hash and parent, so that a reader can
/// check both.
pub fn pattern(hash: SequenceHash, parent: Option<SequenceHash>, out: &mut [u8]) {
    let mut x = hash.as_u64() ^ parent.map_or(0x5555, |p| p.as_u64().rotate_left(17));
    for chunk in out.chunks_mut(8) {
        // splitmix64
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// `MemAvailable` of `/proc/meminfo`, MiB (`None` where there is none).
fn available_mib() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// Runs the throughput measurement; `progress` is told each point. Every point of every
/// repetition is paired with its own ceiling, measured right before it (odd repetitions:
/// right after), so that a disk whose speed drifts (bursts, other tenants) is compared with
/// itself; the medians of the pairs' ratios are reported.
pub fn run(args: &DiskArgs, mut progress: impl FnMut(&str)) -> Result<DiskReport, Error> {
    if args.block_kib.contains(&0) || args.depth.contains(&0) || args.mib == 0 {
        return Err("--block-kib, --depth and --mib must be positive".into());
    }
    if let Some(&kib) = args.block_kib.iter().find(|&&k| k > args.mib * 1024) {
        return Err(format!("a {kib} KiB block is larger than --mib {} MiB", args.mib).into());
    }
    // Each point's block images are held in memory (written, then read back and compared).
    if let Some(available) = available_mib()
        && args.mib > available / 2
    {
        return Err(format!(
            "--mib {} MiB is held in memory, and only {available} MiB is available (at most half of it may be used)",
            args.mib
        )
        .into());
    }
    let dir = WorkDir::new(args.path.as_deref())?;
    let total = (args.mib as u64) << 20;
    let reps = args.reps.max(1);
    let mut ceilings = Vec::new();
    let mut unavailable = Vec::new();
    // Per (backend, block, depth), per repetition: the point and its ceiling.
    type Pair = ([f64; 3], Ceiling);
    type Pairs = Vec<Pair>;
    let mut samples: Vec<((IoBackend, usize, usize), Pairs)> = Vec::new();
    let mut io_mode = String::new();
    let ceiling_path = dir.path.join("ceiling.bin");
    let mut ceiling = || -> Result<Ceiling, Error> {
        let c = sequential_ceiling(&ceiling_path, total)?;
        io_mode = mode_name(&c.io_mode);
        Ok(Ceiling {
            fill_mb_s: c.fill_bytes_per_s() / 1e6,
            write_mb_s: c.write_bytes_per_s() / 1e6,
            read_mb_s: c.read_bytes_per_s() / 1e6,
        })
    };
    for rep in 0..reps {
        for &backend in &args.backend {
            for &kib in &args.block_kib {
                for &depth in &args.depth {
                    progress(&format!(
                        "rep {}/{reps}: {} {kib} KiB depth {depth}",
                        rep + 1,
                        backend.name()
                    ));
                    let before = if rep % 2 == 0 { Some(ceiling()?) } else { None };
                    let point = match measure(&dir.path, backend, kib << 10, depth, total, args) {
                        Ok(p) => p,
                        Err(Measure::Unavailable(why)) => {
                            let line = format!("{}: {why}", backend.name());
                            if !unavailable.contains(&line) {
                                unavailable.push(line);
                            }
                            continue;
                        }
                        Err(Measure::Failed(e)) => return Err(e),
                    };
                    let c = match before {
                        Some(c) => c,
                        None => ceiling()?,
                    };
                    ceilings.push(c.clone());
                    let key = (backend, kib, depth);
                    match samples.iter_mut().find(|(k, _)| *k == key) {
                        Some((_, pairs)) => pairs.push((point, c)),
                        None => samples.push((key, vec![(point, c)])),
                    }
                }
            }
        }
    }
    let points = samples
        .into_iter()
        .map(|((backend, kib, depth), pairs)| {
            let m = |f: &dyn Fn(&Pair) -> f64| median(pairs.iter().map(f).collect());
            DiskPoint {
                backend: backend.name(),
                block_kib: kib,
                depth,
                fill_mb_s: m(&|(p, _)| p[0]),
                write_mb_s: m(&|(p, _)| p[1]),
                read_mb_s: m(&|(p, _)| p[2]),
                ceiling: Ceiling {
                    fill_mb_s: m(&|(_, c)| c.fill_mb_s),
                    write_mb_s: m(&|(_, c)| c.write_mb_s),
                    read_mb_s: m(&|(_, c)| c.read_mb_s),
                },
                fill_of_ceiling: m(&|(p, c)| p[0] / c.fill_mb_s),
                write_of_ceiling: m(&|(p, c)| p[1] / c.write_mb_s),
                read_of_ceiling: m(&|(p, c)| p[2] / c.read_mb_s),
                goal: if kib >= 2048 { 0.85 } else { 0.70 },
            }
        })
        .collect();
    Ok(DiskReport {
        path: dir.path.display().to_string(),
        filesystem: filesystem_of(&dir.path),
        io_mode,
        mib: args.mib,
        aligned_buffers: !args.unaligned,
        ceilings,
        points,
        unavailable,
    })
}

enum Measure {
    Unavailable(String),
    Failed(Error),
}

/// Through a fresh tier of `total` bytes of `block_bytes` blocks: fills it, writes as many
/// blocks again (each evicting one), reads the second set back and checks it; returns MB/s
/// of block bytes for the fill, the steady-state write and the read.
fn measure(
    dir: &Path,
    backend: IoBackend,
    block_bytes: usize,
    depth: usize,
    total: u64,
    args: &DiskArgs,
) -> Result<[f64; 3], Measure> {
    let n = (total / block_bytes as u64).max(1) as usize;
    let tier = DiskTier::builder()
        .path(dir.join("tier.kvbm"))
        .block_bytes(block_bytes)
        .capacity(Capacity::Blocks(n as u32))
        .fingerprint(FINGERPRINT)
        .queue_depth(depth)
        .io_backend(backend)
        .recovery(RecoveryMode::Discard)
        .open()
        .map_err(|e| match e {
            kvbm_physical::DiskError::Backend { source, .. } => {
                Measure::Unavailable(source.to_string())
            }
            other => Measure::Failed(other.into()),
        })?;
    let batch = args.batch.max(1);
    let mut images_mem = vec![0u8; n * block_bytes + 2 * PAGE];
    let images = buffer(&mut images_mem, n * block_bytes, args.unaligned);
    let mut timings = [0.0; 3];
    let mut hashes = Vec::new();
    for (pass, timing) in timings.iter_mut().take(2).enumerate() {
        hashes = (0..n as u64)
            .map(|i| {
                SequenceHash::new((i + (pass * n) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
            })
            .collect();
        for (h, image) in hashes.iter().zip(images.chunks_mut(block_bytes)) {
            pattern(*h, None, image);
        }
        let mut write = Duration::ZERO;
        for (hs, imgs) in hashes.chunks(batch).zip(images.chunks(batch * block_bytes)) {
            let blocks: Vec<StoreBlock<'_>> = hs
                .iter()
                .zip(imgs.chunks(block_bytes))
                .map(|(&hash, bytes)| StoreBlock {
                    hash,
                    parent: None,
                    bytes,
                })
                .collect();
            let start = Instant::now();
            let out = tier.put(&blocks);
            write += start.elapsed();
            if let Some(bad) = out.iter().find(|o| **o != PutOutcome::Stored) {
                return Err(Measure::Failed(
                    format!("a block was not stored: {bad:?}").into(),
                ));
            }
        }
        *timing = write.as_secs_f64();
    }
    let mut read = Duration::ZERO;
    let mut out_mem = vec![0u8; batch * block_bytes + 2 * PAGE];
    let out = buffer(&mut out_mem, batch * block_bytes, args.unaligned);
    for (hs, imgs) in hashes.chunks(batch).zip(images.chunks(batch * block_bytes)) {
        let mut bufs: Vec<&mut [u8]> = out.chunks_mut(block_bytes).take(hs.len()).collect();
        let start = Instant::now();
        let got = tier.get(hs, &mut bufs);
        read += start.elapsed();
        if let Some(bad) = got.iter().find(|o| !o.is_hit()) {
            return Err(Measure::Failed(
                format!("a block was not read back: {bad:?}").into(),
            ));
        }
        if out[..imgs.len()] != *imgs {
            return Err(Measure::Failed("a block read back other bytes".into()));
        }
    }
    timings[2] = read.as_secs_f64();
    let bytes = (n * block_bytes) as f64;
    Ok(timings.map(|t| bytes / t.max(1e-9) / 1e6))
}

/// `len` bytes of `mem` starting at a page boundary, or one byte past it if `unaligned`.
fn buffer(mem: &mut [u8], len: usize, unaligned: bool) -> &mut [u8] {
    let start = mem.as_ptr().align_offset(PAGE) + usize::from(unaligned);
    &mut mem[start..start + len]
}

/// The throughput table.
pub fn report_table(r: &DiskReport) -> String {
    let rows: Vec<Vec<String>> = r
        .points
        .iter()
        .map(|p| {
            vec![
                p.backend.to_owned(),
                p.block_kib.to_string(),
                p.depth.to_string(),
                format!(
                    "{:.0}/{:.0}/{:.0}",
                    p.ceiling.fill_mb_s, p.ceiling.write_mb_s, p.ceiling.read_mb_s
                ),
                format!("{:.0} ({:.0}%)", p.fill_mb_s, p.fill_of_ceiling * 100.0),
                format!("{:.0} ({:.0}%)", p.write_mb_s, p.write_of_ceiling * 100.0),
                format!("{:.0} ({:.0}%)", p.read_mb_s, p.read_of_ceiling * 100.0),
                format!("{:.0}%", p.goal * 100.0),
            ]
        })
        .collect();
    table(
        &[
            "back end",
            "block KiB",
            "depth",
            "ceiling f/w/r",
            "fill MB/s",
            "write MB/s",
            "read MB/s",
            "goal",
        ],
        &rows,
    )
}

/// One crash cycle's findings.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CrashCycle {
    /// Batches the writer reported done before it was killed.
    pub batches_before_kill: usize,
    /// Blocks re-registered when the tier was reopened.
    pub recovered: usize,
    /// Slots dropped as torn at reopen.
    pub torn: u64,
    /// Recovered blocks read back and verified.
    pub verified: usize,
    /// Recovered blocks whose read was refused as corrupt (never served).
    pub refused_corrupt: usize,
    /// Recovered blocks served with bytes or a parent other than the writer's: must be 0.
    pub served_corrupt: usize,
}

/// The crash loop's totals.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CrashReport {
    /// The directory.
    pub path: String,
    /// Its file system.
    pub filesystem: String,
    /// `direct` or `buffered (why)`.
    pub io_mode: String,
    /// Cycles run.
    pub cycles: Vec<CrashCycle>,
    /// Sum of recovered blocks.
    pub recovered: usize,
    /// Sum of torn slots dropped.
    pub torn: u64,
    /// Sum of blocks served wrong: must be 0.
    pub served_corrupt: usize,
}

fn crash_tier(dir: &Path, args: &DiskArgs, recovery: RecoveryMode) -> Result<DiskTier, Error> {
    let direct = if args.crash_buffered {
        DirectIo::Off
    } else {
        DirectIo::Auto
    };
    Ok(DiskTier::builder()
        .direct_io(direct)
        .path(dir.join("crash.kvbm"))
        .block_bytes(args.crash_block_kib.max(1) << 10)
        .capacity(Capacity::Blocks(args.crash_capacity.max(1)))
        .fingerprint(FINGERPRINT)
        .recovery(recovery)
        .open()?)
}

/// A small xorshift generator (no external randomness needed).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The writer child: opens the tier and writes chains of blocks (each block's bytes are
/// [`pattern`] of its hash and parent), printing `ready` once open and one line per batch
/// written, until it is killed (or has written 100 000 batches).
pub fn crash_writer(args: &DiskArgs) -> Result<(), Error> {
    let dir = args.path.clone().ok_or("--crash-writer needs --path")?;
    let tier = crash_tier(&dir, args, RecoveryMode::Verify)?;
    let bb = tier.block_bytes();
    println!("ready");
    let mut rng = Rng(args.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut images = vec![0u8; 8 * bb];
    let mut parent: Option<SequenceHash> = None;
    for batch in 0..100_000u64 {
        let mut blocks = Vec::with_capacity(8);
        let mut ids = Vec::with_capacity(8);
        for _ in 0..8 {
            // Chains of 1..=16 blocks.
            if rng.next().is_multiple_of(16) {
                parent = None;
            }
            let hash = SequenceHash::new(rng.next() | 1);
            ids.push((hash, parent));
            parent = Some(hash);
        }
        for ((hash, parent), image) in ids.iter().zip(images.chunks_mut(bb)) {
            pattern(*hash, *parent, image);
        }
        for ((hash, parent), image) in ids.iter().zip(images.chunks(bb)) {
            blocks.push(StoreBlock {
                hash: *hash,
                parent: *parent,
                bytes: image,
            });
        }
        tier.put(&blocks);
        println!("batch {batch}");
    }
    Ok(())
}

/// The crash loop: `cycles` times, start a writer, let it write a random number of batches,
/// kill it with SIGKILL at a random moment, reopen the tier and check every recovered block.
pub fn crash_loop(
    args: &DiskArgs,
    cycles: usize,
    mut progress: impl FnMut(&str),
) -> Result<CrashReport, Error> {
    let dir = WorkDir::new(args.path.as_deref())?;
    // Start from an empty tier.
    let first = crash_tier(&dir.path, args, RecoveryMode::Discard)?;
    let io_mode = mode_name(first.io_mode());
    drop(first);
    let exe = std::env::current_exe()?;
    let mut rng = Rng(args.seed.wrapping_mul(0xD1B5_4A32_D192_ED03) | 1);
    let mut report = CrashReport {
        path: dir.path.display().to_string(),
        filesystem: filesystem_of(&dir.path),
        io_mode,
        ..Default::default()
    };
    for cycle in 0..cycles {
        progress(&format!("cycle {}/{cycles}", cycle + 1));
        let mut child = Command::new(&exe);
        child.args([
            "disk",
            "--quiet",
            "--crash-writer",
            "--path",
            &dir.path.display().to_string(),
            "--seed",
            &(args.seed ^ (cycle as u64 + 1).wrapping_mul(0x9E37)).to_string(),
            "--crash-block-kib",
            &args.crash_block_kib.to_string(),
            "--crash-capacity",
            &args.crash_capacity.to_string(),
        ]);
        if args.crash_buffered {
            child.arg("--crash-buffered");
        }
        let mut child = child
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no pipe from the writer")?;
        let mut lines = BufReader::new(stdout).lines();
        let ready = lines.next().transpose()?;
        if ready.as_deref() != Some("ready") {
            let _ = child.kill();
            let status = child.wait()?;
            return Err(format!("the writer did not start ({status})").into());
        }
        // A random moment: after a random number of batches, then a random fraction of a
        // batch's time.
        let batches = 1 + (rng.next() % 24) as usize;
        let mut seen = 0;
        while seen < batches {
            match lines.next() {
                Some(Ok(_)) => seen += 1,
                _ => break,
            }
        }
        std::thread::sleep(Duration::from_micros(rng.next() % 3000));
        child.kill()?; // SIGKILL
        child.wait()?;
        drop(lines);

        let tier = crash_tier(&dir.path, args, RecoveryMode::Verify)?;
        let rec = tier.recovery();
        let mut c = CrashCycle {
            batches_before_kill: seen,
            recovered: rec.recovered(),
            torn: rec.torn,
            ..Default::default()
        };
        let bb = tier.block_bytes();
        let mut out = vec![0u8; bb];
        let mut expect = vec![0u8; bb];
        let recovered: Vec<_> = rec.blocks.clone();
        for b in &recovered {
            let got = tier.get(&[b.hash], &mut [&mut out]);
            match &got[0] {
                GetOutcome::Hit { parent } => {
                    pattern(b.hash, *parent, &mut expect);
                    if out == expect && *parent == b.parent {
                        c.verified += 1;
                    } else {
                        c.served_corrupt += 1;
                    }
                }
                GetOutcome::Corrupt => c.refused_corrupt += 1,
                _ => {}
            }
        }
        drop(tier);
        report.recovered += c.recovered;
        report.torn += c.torn;
        report.served_corrupt += c.served_corrupt;
        report.cycles.push(c);
    }
    Ok(report)
}

/// The crash loop's table.
pub fn crash_table(r: &CrashReport) -> String {
    let rows: Vec<Vec<String>> = r
        .cycles
        .iter()
        .enumerate()
        .map(|(i, c)| {
            vec![
                (i + 1).to_string(),
                c.batches_before_kill.to_string(),
                c.recovered.to_string(),
                c.torn.to_string(),
                c.verified.to_string(),
                c.refused_corrupt.to_string(),
                c.served_corrupt.to_string(),
            ]
        })
        .collect();
    table(
        &[
            "cycle",
            "batches",
            "recovered",
            "torn",
            "verified",
            "refused corrupt",
            "served corrupt",
        ],
        &rows,
    )
}

/// `kvbm-bench disk`: the throughput run, the crash loop or the writer child. Returns
/// `Err` (a non-zero exit) when a recovered block was served wrong.
pub fn main(args: &DiskArgs, json: bool, mut progress: impl FnMut(&str)) -> Result<(), Error> {
    if args.crash_writer {
        return crash_writer(args);
    }
    if let Some(cycles) = args.crash_cycles {
        let r = crash_loop(args, cycles, &mut progress)?;
        if json {
            println!("{}", serde_json::to_string_pretty(&r)?);
        } else {
            println!(
                "crash loop in {} on {}, {} I/O",
                r.path, r.filesystem, r.io_mode
            );
            print!("{}", crash_table(&r));
            println!(
                "recovered {} blocks, dropped {} torn slots, served_corrupt {}",
                r.recovered, r.torn, r.served_corrupt
            );
        }
        if r.served_corrupt > 0 {
            return Err(format!("served_corrupt = {} (must be 0)", r.served_corrupt).into());
        }
        return Ok(());
    }
    let r = run(args, progress)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "disk tier in {} on {}, {} I/O, {} MiB per point, {} caller buffers",
            r.path,
            r.filesystem,
            r.io_mode,
            r.mib,
            if r.aligned_buffers {
                "page-aligned"
            } else {
                "unaligned"
            }
        );
        println!(
            "ceiling: one sequential write into fresh space (f), over it (w), one read (r), MB/s, \
             measured next to each point; percentages: medians of point / its own ceiling"
        );
        print!("{}", report_table(&r));
        for u in &r.unavailable {
            println!("unavailable: {u}");
        }
    }
    Ok(())
}
