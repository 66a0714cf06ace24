//! `kvbm-bench`: kvbm's benchmark and demonstration tool. Run with no arguments for a short
//! demonstration of everything on the built-in workload; `--help` for the commands.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use kvbm_bench::report::{Series, line_chart, line_chart_with_reference, table};
use kvbm_bench::{cycle, remote, replay, soak, tiered, trace, transfer, workload};
use kvbm_logical::{EvictionBackend, FrequencyTracking};
use serde_json::json;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// How fast is kvbm, and how much cache hit would this much memory and this eviction policy
/// give? Measures on the GPU when one is present, else on the CPU fallback, and says which.
#[derive(Parser)]
#[command(name = "kvbm-bench", version, after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Print JSON on stdout instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// Also write a chart to this SVG file: hit rate against capacity per policy (replay, and
    /// the demonstration), bandwidth against region size per strategy (transfer).
    #[arg(long, global = true, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// No progress bars.
    #[arg(long, short, global = true)]
    quiet: bool,
}

const AFTER_HELP: &str = "With no command: a demonstration (under a minute) of logical \
throughput, a replay of the built-in synthetic workload, and transfer bandwidth.";

#[derive(Subcommand)]
enum Command {
    /// Logical throughput of the request cycle (match prefix, allocate, register, release)
    /// across batch sizes and thread counts, on one shared block manager.
    Cycle {
        /// Thread counts.
        #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
        threads: Vec<usize>,
        /// Blocks per request (half a shared prefix that hits, half new).
        #[arg(long, value_delimiter = ',', default_value = "1,16,64,256", value_parser = kvbm_bench::args::blocks)]
        batch: Vec<usize>,
        /// Milliseconds per configuration.
        #[arg(long, default_value_t = 500)]
        millis: u64,
    },
    /// Replays requests one at a time in order (match the prefix, allocate the rest, register
    /// all, release all) for each capacity and policy: prefix hit rate, evictions, speed.
    Replay {
        /// A Mooncake-format JSONL trace (timestamp, input_length, output_length, hash_ids;
        /// 512-token blocks). Without it: the built-in synthetic multi-turn workload.
        #[arg(long, value_name = "FILE")]
        trace: Option<PathBuf>,
        /// Pool sizes in blocks.
        #[arg(long, value_delimiter = ',', default_value = "1024,4096,16384,65536")]
        capacity: Vec<usize>,
        /// Eviction policies: lru, fifo, lineage, multi-lru, priority, arc, s3fifo, adaptive,
        /// and opt (Belady's offline optimum, the yardstick of the `of OPT` column).
        #[arg(long, value_delimiter = ',',
              default_value = "lru,fifo,lineage,multi-lru,priority,arc,s3fifo,adaptive,opt",
              value_parser = replay::parse_policy)]
        policy: Vec<replay::Policy>,
        /// Frequency sketch for the backends that use one (multi-lru, adaptive): small,
        /// medium or large. Default: the builder's (medium).
        #[arg(long, value_parser = replay::parse_frequency)]
        frequency: Option<FrequencyTracking>,
        /// The share of requests (0 to 1, spread evenly) preempted right after allocating
        /// their blocks and resumed after the next request; the `resume_rematch` column is
        /// the share of their still-cached blocks that resumption matched again.
        #[arg(long, value_name = "FRACTION", default_value_t = 0.0)]
        preempt: f64,
        /// Synthetic workload: conversations.
        #[arg(long, default_value_t = 2000)]
        sessions: usize,
        /// Synthetic workload: seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Publish the manager's KV events in vLLM's format on this ZeroMQ endpoint while
        /// replaying (bound when it has `*`, as vLLM does, e.g. `tcp://*:5557`); needs one
        /// capacity and one policy other than opt.
        #[arg(long, value_name = "ENDPOINT")]
        publish: Option<String>,
        /// With --publish: the ROUTER endpoint that answers replay requests (`tcp://*:5558`).
        #[arg(long, value_name = "ENDPOINT", requires = "publish")]
        replay_endpoint: Option<String>,
        /// With --publish: seconds to keep publishing and serving replays after the run, for
        /// a subscriber that joined late.
        #[arg(
            long,
            value_name = "SECONDS",
            default_value_t = 0.0,
            requires = "publish"
        )]
        linger: f64,
    },
    /// Offload / onboard bandwidth by region size and block count, per strategy, against one
    /// large copy of the same bytes (the ceiling) measured in the same run.
    Transfer {
        /// Use system memory even if a GPU is present.
        #[arg(long)]
        cpu: bool,
        /// Region sizes in KiB (one layer's K or V page of a block).
        #[arg(long, value_delimiter = ',', default_value = "8,32,128", value_parser = kvbm_bench::args::kib)]
        region_kib: Vec<usize>,
        /// Blocks per transfer.
        #[arg(long, value_delimiter = ',', default_value = "64,256,1024,4096", value_parser = kvbm_bench::args::blocks)]
        blocks: Vec<usize>,
        /// Layers per block (each with K and V).
        #[arg(long, default_value_t = 4, value_parser = kvbm_bench::args::layers)]
        layers: usize,
        /// Timed repetitions per point (median reported).
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// Largest layout to allocate, MiB; larger points are skipped.
        #[arg(long, default_value_t = 2048, value_parser = kvbm_bench::args::mib)]
        max_layout_mib: usize,
        /// Engine-side layouts: layer-separate (ls), outer-first (of), block-first (bf), mla;
        /// the last three over engine tensors (`Layout::from_engine`).
        #[arg(long, value_delimiter = ',', default_value = "layer-separate",
              value_parser = transfer::EngineSide::parse)]
        layouts: Vec<transfer::EngineSide>,
    },
    /// Requests through the tier stack (G1 over G2, optionally a disk tier and Redis below)
    /// as a scheduler drives it: plan, commit, wait, allocate, compute, register. Every
    /// computed block holds a pattern of its hash and every onboarded byte is checked (exits
    /// non-zero on a mismatch). Reports hits per tier, offload/onboard/skip/loss counts, the
    /// offload and onboard copy bandwidth against one large copy each way (measured in the
    /// same run), and the scheduler's time inside kvbm per request, against one LRU pool of
    /// G2's size replayed in the same run. On a GPU (unless --cpu), G1 is device memory and
    /// G2 pinned.
    Tiered {
        /// A Mooncake-format JSONL trace; without it, the built-in synthetic workload.
        #[arg(long, value_name = "FILE")]
        trace: Option<PathBuf>,
        /// G1 blocks.
        #[arg(long, default_value_t = 1024, value_parser = kvbm_bench::args::blocks)]
        g1: usize,
        /// G2 blocks.
        #[arg(long, default_value_t = 4096, value_parser = kvbm_bench::args::blocks)]
        g2: usize,
        /// Synthetic workload: blocks per request (0: as generated).
        #[arg(long, default_value_t = 64, value_parser = kvbm_bench::args::blocks_per_request)]
        blocks_per_request: usize,
        /// Synthetic workload: conversations.
        #[arg(long, default_value_t = 500)]
        sessions: usize,
        /// Synthetic workload: seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Offload on eviction (a reclaimer with watermarks) instead of on registration.
        #[arg(long)]
        write_back: bool,
        /// Write-through without the free reserve (by default a worker keeps 1/16 to 1/8 of
        /// G1 free by evicting ahead, so that the scheduler's allocations need not evict).
        #[arg(long, conflicts_with = "write_back")]
        no_reserve: bool,
        /// Worker threads of the stack.
        #[arg(long, default_value_t = 2, value_parser = kvbm_bench::args::threads)]
        workers: usize,
        /// G1's and G2's eviction policy (lru, lineage, adaptive, ...; default: the
        /// managers' default, lineage without frequency tracking).
        #[arg(long, value_parser = parse_backend)]
        policy: Option<EvictionBackend>,
        /// Requests held at once.
        #[arg(long, default_value_t = 1)]
        window: usize,
        /// G1's layout: layer-separate (ls, kvbm's), or an engine's tensors through
        /// `Layout::from_engine`: outer-first (of), block-first (bf), mla.
        #[arg(long, default_value = "ls", value_parser = transfer::EngineSide::parse)]
        g1_layout: transfer::EngineSide,
        /// Region size in KiB (one layer's K or V page of a block; blocks have 2 layers).
        /// Default: 32 on a GPU, 2 on the CPU.
        #[arg(long, value_parser = kvbm_bench::args::kib)]
        region_kib: Option<usize>,
        /// Use system memory even if a GPU is present.
        #[arg(long)]
        cpu: bool,
        #[command(flatten)]
        stores: StoreArgs,
    },
    /// Soak: random requests from many threads through a tier stack (G1 over G2, optionally
    /// a disk tier and Redis below) for a while, checking every served block's bytes;
    /// reports requests, per-tier counts, pool accounting and resident memory at intervals.
    /// Fails on any wrong byte or broken count. Several processes may share one Redis
    /// namespace (give each its own --seed): each counts the blocks it onboarded that
    /// another wrote.
    Soak {
        /// How long, seconds.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Request threads.
        #[arg(long, default_value_t = 4, value_parser = kvbm_bench::args::threads)]
        threads: usize,
        /// G1 (device) blocks.
        #[arg(long, default_value_t = 2048, value_parser = kvbm_bench::args::blocks)]
        g1_blocks: usize,
        /// G2 (host) blocks.
        #[arg(long, default_value_t = 8192, value_parser = kvbm_bench::args::blocks)]
        g2_blocks: usize,
        /// Offload on registration (with a free reserve of 1/16 to 1/8 of G1, kept by
        /// evicting ahead) instead of on eviction.
        #[arg(long)]
        write_through: bool,
        /// Worker threads of the stack.
        #[arg(long, default_value_t = 2, value_parser = kvbm_bench::args::threads)]
        workers: usize,
        /// Seconds between reports.
        #[arg(long, default_value_t = 30)]
        every: u64,
        /// This process's request stream (and the tag of its conversation tails).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Use system memory even if a GPU is present.
        #[arg(long)]
        cpu: bool,
        #[command(flatten)]
        stores: StoreArgs,
    },
    /// Remote tier (G4): put and get throughput of a RemoteStore against redis-benchmark with
    /// the same value size, pipeline depth and clients on the same server, interleaved; every
    /// block read back is checked. Without --redis, starts a throw-away local redis-server.
    Remote {
        /// The server: redis://[user:password@]host:port, rediss://... (a seed for --cluster).
        #[arg(long, value_name = "URL")]
        redis: Option<String>,
        /// Speak Redis Cluster.
        #[arg(long)]
        cluster: bool,
        /// CA certificate (PEM) for rediss://.
        #[arg(long, value_name = "FILE")]
        tls_ca: Option<PathBuf>,
        /// Block sizes, KiB.
        #[arg(long, value_delimiter = ',', default_value = "256,2048", value_parser = kvbm_bench::args::kib)]
        block_kib: Vec<usize>,
        /// Commands per round trip (redis-benchmark -P).
        #[arg(long, default_value_t = 16)]
        depth: usize,
        /// Connections (redis-benchmark -c).
        #[arg(long, default_value_t = 1)]
        clients: usize,
        /// MiB moved per measurement and direction.
        #[arg(long, default_value_t = 256, value_parser = kvbm_bench::args::mib)]
        total_mib: usize,
        /// Repetitions (medians reported).
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Do not run redis-benchmark.
        #[arg(long)]
        no_redis_benchmark: bool,
        /// redis-benchmark over distinct keys (-r), like kvbm's, instead of one key; leaves its
        /// key:* keys behind (a scratch server only).
        #[arg(long)]
        distinct_keys: bool,
    },
    /// The G3 disk tier: block writes and reads by block size, queue depth and I/O back end
    /// against one sequential O_DIRECT write and read of the same bytes; `--crash-cycles N`:
    /// SIGKILL a writer N times and check every block recovered.
    Disk(kvbm_bench::disk::DiskArgs),
}

/// Store tiers below G2, and the admission filter of each boundary.
#[derive(clap::Args, Clone, Debug)]
struct StoreArgs {
    /// A disk tier (G3) in this file, created if missing (what an earlier run of the same
    /// layout left there is recovered).
    #[arg(long, value_name = "PATH")]
    disk: Option<PathBuf>,
    /// The disk tier's capacity in blocks (default: four times G2).
    #[arg(long, default_value_t = 0)]
    disk_blocks: usize,
    /// A remote tier on Redis (redis://host:port, rediss://...), below the disk tier if both.
    #[arg(long, value_name = "URL")]
    redis: Option<String>,
    /// Redis Cluster (--redis is a seed).
    #[arg(long)]
    cluster: bool,
    /// The model id of the Redis namespace: processes with the same one share blocks.
    #[arg(long, default_value = "kvbm-bench")]
    namespace: String,
    /// G1 → G2 admission: presence, or freq:K (seen at least K times).
    #[arg(long, default_value = "presence", value_parser = tiered::parse_admission)]
    g2_admission: kvbm_physical::stack::Admission,
    /// G2 → disk admission.
    #[arg(long, default_value = "presence", value_parser = tiered::parse_admission)]
    disk_admission: kvbm_physical::stack::Admission,
    /// G2 → Redis admission.
    #[arg(long, default_value = "presence", value_parser = tiered::parse_admission)]
    redis_admission: kvbm_physical::stack::Admission,
}

impl StoreArgs {
    fn options(&self) -> tiered::StoreOptions {
        tiered::StoreOptions {
            disk: self.disk.clone(),
            disk_blocks: self.disk_blocks,
            redis: self.redis.clone(),
            cluster: self.cluster,
            namespace: self.namespace.clone(),
            g2_admission: self.g2_admission,
            disk_admission: self.disk_admission,
            redis_admission: self.redis_admission,
        }
    }

    /// `, G3 disk PATH, G4 redis URL` for the headline.
    fn describe(&self) -> String {
        let mut out = String::new();
        if let Some(p) = &self.disk {
            out.push_str(&format!(", disk tier {}", p.display()));
        }
        if let Some(url) = &self.redis {
            out.push_str(&format!(
                ", Redis tier {} (namespace {})",
                remote::redact(url),
                self.namespace
            ));
        }
        out
    }
}

/// One fixed-width report line (printed as it comes, under [`SOAK_HEADER`]).
fn soak_line(s: &soak::SoakSample) -> String {
    format!(
        "{:>8.0} {:>10} {:>10.0} {:>14} {:>11} {:>11} {:>10} {:>10} {:>8.1}",
        s.seconds,
        s.requests,
        s.requests_per_s,
        s.blocks_checked,
        format!("{}/{}", s.g1_accounted.0, s.g1_accounted.1),
        format!("{}/{}", s.g2_accounted.0, s.g2_accounted.1),
        s.offloaded,
        s.onboarded,
        s.rss_mib
    )
}

/// The per-tier counts of the last sample.
fn soak_tiers(s: &soak::SoakSample) -> String {
    let rows: Vec<Vec<String>> = s
        .tiers
        .iter()
        .map(|t| {
            vec![
                t.tier.clone(),
                t.medium.clone(),
                t.offloaded.to_string(),
                t.onboarded.to_string(),
                t.skipped.to_string(),
                t.lost.to_string(),
            ]
        })
        .collect();
    let mut out = table(
        &[
            "tier",
            "medium",
            "offloaded",
            "onboarded",
            "skipped",
            "lost",
        ],
        &rows,
    );
    out.push_str(&format!(
        "{} blocks onboarded that another process wrote; {} requests deferred (G1 full)\n",
        s.foreign_onboarded, s.deferred
    ));
    out
}

const SOAK_HEADER: &str = " seconds   requests requests/s blocks checked  G1 counted  G2 counted  offloaded  onboarded  RSS MiB";

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kvbm-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> Result<(), Error> {
    match &cli.command {
        None => demo(cli),
        Some(Command::Disk(args)) => {
            let pb = bar(cli, 0, "disk");
            let result = kvbm_bench::disk::main(args, cli.json, |m| pb.set_message(m.to_owned()));
            pb.finish_and_clear();
            result
        }
        Some(Command::Cycle {
            threads,
            batch,
            millis,
        }) => {
            let results = cycles(cli, threads, batch, Duration::from_millis(*millis));
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&results)?);
            } else {
                print!("{}", cycle_table(&results));
            }
            Ok(())
        }
        Some(Command::Replay {
            trace,
            capacity,
            policy,
            sessions,
            seed,
            frequency,
            preempt,
            publish,
            replay_endpoint,
            linger,
        }) => {
            if capacity.contains(&0) {
                return Err("--capacity: a pool needs at least one block".into());
            }
            if !(0.0..=1.0).contains(preempt) {
                return Err(format!("--preempt {preempt}: a fraction in [0, 1]").into());
            }
            let options = replay::ReplayOptions {
                frequency: *frequency,
                preempt: *preempt,
            };
            let publish = match publish {
                None => None,
                Some(endpoint) => {
                    let backend = match policy.as_slice() {
                        [replay::Policy::Backend(b)] if capacity.len() == 1 => *b,
                        _ => {
                            return Err(
                                "--publish needs one --capacity and one --policy other than opt"
                                    .into(),
                            );
                        }
                    };
                    if !linger.is_finite() || *linger < 0.0 {
                        return Err("--linger: a number of seconds, 0 or more".into());
                    }
                    Some((endpoint.as_str(), replay_endpoint.as_deref(), backend))
                }
            };
            let (requests, source, malformed) = match trace {
                Some(path) => {
                    let t = trace::read(path)?;
                    for m in t.malformed.iter().take(10) {
                        eprintln!("{}:{}: skipped: {}", path.display(), m.line, m.error);
                    }
                    if t.malformed_count > 10 {
                        eprintln!("... and {} more malformed line(s)", t.malformed_count - 10);
                    }
                    let name = path.file_name().map_or_else(
                        || path.display().to_string(),
                        |n| n.to_string_lossy().into_owned(),
                    );
                    (
                        t.requests,
                        format!("trace {name}"),
                        (t.malformed, t.malformed_count),
                    )
                }
                None => {
                    let w = workload::Synthetic {
                        sessions: *sessions,
                        seed: *seed,
                        ..Default::default()
                    };
                    (
                        w.generate(),
                        format!("synthetic ({sessions} conversations, seed {seed})"),
                        (Vec::new(), 0),
                    )
                }
            };
            if let Some((endpoint, replay_endpoint, backend)) = publish {
                return replay_published(
                    &requests,
                    capacity[0],
                    backend,
                    &options,
                    (endpoint, replay_endpoint, Duration::from_secs_f64(*linger)),
                );
            }
            let results = replays(cli, &requests, capacity, policy, &options)?;
            if let Some(path) = &cli.plot {
                replay_chart(path, &source, &results)?;
            }
            if cli.json {
                let out = json!({
                    "workload": source,
                    "requests": requests.len(),
                    "malformed_lines": malformed.1,
                    "malformed": malformed.0.iter().take(100).collect::<Vec<_>>(),
                    "results": results,
                });
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                println!(
                    "workload: {source}: {} requests, {} malformed line(s) skipped",
                    requests.len(),
                    malformed.1
                );
                print!("{}", replay_table(&results));
            }
            Ok(())
        }
        Some(Command::Soak {
            seconds,
            threads,
            g1_blocks,
            g2_blocks,
            write_through,
            workers,
            every,
            seed,
            cpu,
            stores,
        }) => {
            if *g1_blocks == 0 || *g2_blocks == 0 || *threads == 0 || *workers == 0 {
                return Err(
                    "--g1-blocks, --g2-blocks, --threads and --workers must be positive".into(),
                );
            }
            let (target, device) = transfer::detect(*cpu);
            let config = soak::SoakConfig {
                duration: Duration::from_secs(*seconds),
                threads: *threads,
                g1_blocks: *g1_blocks,
                g2_blocks: *g2_blocks,
                write_through: *write_through,
                workers: *workers,
                every: Duration::from_secs((*every).max(1)),
                seed: *seed,
                stores: stores.options(),
            };
            let json = cli.json;
            let mode = if *write_through {
                "write-through"
            } else {
                "write-back"
            };
            if !json {
                println!(
                    "soak on {device}: {threads} threads, G1 {g1_blocks} blocks, G2 {g2_blocks} blocks{}, {mode}, seed {seed}, {seconds} s",
                    stores.describe()
                );
                println!("{SOAK_HEADER}");
            }
            let samples = soak::run(&target, &config, |s| {
                if !json {
                    println!("{}", soak_line(s));
                }
            })?;
            if json {
                let out =
                    json!({ "device": device, "mode": mode, "seed": seed, "samples": samples });
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                if let Some(last) = samples.last() {
                    print!("{}", soak_tiers(last));
                }
                println!(
                    "every block served was checked byte for byte; counts conserved in both slot tiers; all handles returned"
                );
            }
            Ok(())
        }
        Some(Command::Tiered {
            trace,
            g1,
            g2,
            blocks_per_request,
            sessions,
            seed,
            write_back,
            no_reserve,
            workers,
            policy,
            window,
            g1_layout,
            region_kib,
            cpu,
            stores,
        }) => {
            if *g1 == 0 || *g2 == 0 || *workers == 0 || *region_kib == Some(0) {
                return Err("--g1, --g2, --workers and --region-kib must be positive".into());
            }
            let (requests, source) = match trace {
                Some(path) => {
                    let t = trace::read(path)?;
                    if t.malformed_count > 0 {
                        eprintln!(
                            "{}: {} malformed line(s) skipped",
                            path.display(),
                            t.malformed_count
                        );
                    }
                    (t.requests, format!("trace {}", path.display()))
                }
                None => {
                    let w = workload::Synthetic {
                        sessions: *sessions,
                        seed: *seed,
                        ..Default::default()
                    };
                    let r = w.generate();
                    if *blocks_per_request == 0 {
                        (r, format!("synthetic ({sessions} conversations)"))
                    } else {
                        (
                            tiered::fixed_length(&r, *blocks_per_request),
                            format!(
                                "synthetic ({sessions} conversations, {blocks_per_request} blocks per request)"
                            ),
                        )
                    }
                }
            };
            let (target, device) = transfer::detect(*cpu);
            let config = tiered::TieredConfig {
                g1: *g1,
                g2: *g2,
                write_back: *write_back,
                no_reserve: *no_reserve,
                workers: *workers,
                eviction: *policy,
                window: *window,
                g1_layout: *g1_layout,
                region_kib: region_kib.unwrap_or(match target {
                    transfer::Target::Gpu(_) => tiered::GPU_REGION_KIB,
                    transfer::Target::Cpu => tiered::CPU_REGION_KIB,
                }),
                stores: stores.options(),
            };
            let r = tiered::run(&target, &requests, &config)?;
            if cli.json {
                let out = json!({ "device": device, "workload": source, "result": r });
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                println!(
                    "tier stack on {device}: {source}; G1 {g1} blocks ({}, {} KiB regions), G2 {g2} blocks{}, {}, {} eviction",
                    r.g1_layout,
                    r.region_kib,
                    stores.describe(),
                    match r.reserve {
                        Some((low, high)) => format!("{} (free reserve {low}–{high})", r.mode),
                        None => r.mode.to_owned(),
                    },
                    r.eviction
                );
                print!("{}", tiered_table(&r));
            }
            if r.mismatches > 0 {
                return Err(format!("{} onboarded block(s) held wrong bytes", r.mismatches).into());
            }
            Ok(())
        }
        Some(Command::Remote {
            redis,
            cluster,
            tls_ca,
            block_kib,
            depth,
            clients,
            total_mib,
            reps,
            no_redis_benchmark,
            distinct_keys,
        }) => {
            let local = match redis {
                Some(_) => None,
                None => Some(remote::LocalRedis::start()?),
            };
            let plan = remote::RemotePlan {
                url: redis
                    .clone()
                    .or_else(|| local.as_ref().map(remote::LocalRedis::url))
                    .unwrap_or_default(),
                cluster: *cluster,
                tls_ca: tls_ca.clone(),
                block_kib: block_kib.clone(),
                depth: *depth,
                clients: *clients,
                total_mib: *total_mib,
                reps: *reps,
                redis_benchmark: if *no_redis_benchmark {
                    None
                } else {
                    remote::find_redis_benchmark()
                },
                distinct_keys: *distinct_keys,
            };
            let pb = bar(cli, block_kib.len() * (reps * 2 + 1), "remote");
            let report = remote::run(&plan, |what| {
                pb.set_message(what.to_owned());
                pb.inc(1);
            })?;
            pb.finish_and_clear();
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                let local = if local.is_some() {
                    " (a local redis-server started for this run)"
                } else {
                    ""
                };
                println!(
                    "remote tier on {}{local}: depth {depth}, {clients} client(s)",
                    report.server
                );
                print!("{}", remote::table(&report));
                if let Some(note) = &report.redis_benchmark_note {
                    println!("{note}");
                }
                println!(
                    "{} blocks read back, every byte checked",
                    report.verified_blocks
                );
            }
            Ok(())
        }
        Some(Command::Transfer {
            cpu,
            region_kib,
            blocks,
            layers,
            reps,
            max_layout_mib,
            layouts,
        }) => {
            if region_kib.contains(&0) || blocks.contains(&0) || *layers == 0 {
                return Err("--region-kib, --blocks and --layers must be positive".into());
            }
            let (target, device) = transfer::detect(*cpu);
            let plan = transfer::Plan {
                regions_kib: region_kib.clone(),
                blocks: blocks.clone(),
                layers: *layers,
                reps: *reps,
                max_layout_bytes: max_layout_mib << 20,
                layouts: layouts.clone(),
            };
            let results = transfers(cli, &target, &plan)?;
            if let Some(path) = &cli.plot {
                transfer_chart(path, &device, &results)?;
            }
            if cli.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({ "device": device, "results": results }))?
                );
            } else {
                println!("device: {device}");
                print!("{}", transfer_table(&results));
            }
            Ok(())
        }
    }
}

/// The no-argument demonstration: a little of everything, well under a minute.
fn demo(cli: &Cli) -> Result<(), Error> {
    let (target, device) = transfer::detect(false);
    if !cli.json {
        println!("kvbm-bench demonstration on {device}\n");
    }
    let cycle = cycles(cli, &[1, 2], &[16, 256], Duration::from_millis(250));
    let w = workload::Synthetic::default();
    let requests = w.generate();
    let replay = replays(
        cli,
        &requests,
        &[512, 2048, 8192],
        &replay::Policy::all(),
        &replay::ReplayOptions::default(),
    )?;
    let plan = transfer::Plan {
        regions_kib: vec![32],
        blocks: vec![64, 256],
        layers: 4,
        reps: 3,
        max_layout_bytes: 1 << 30,
        layouts: vec![transfer::EngineSide::LayerSeparate],
    };
    let transfer = transfers(cli, &target, &plan)?;
    if let Some(path) = &cli.plot {
        replay_chart(path, "synthetic workload", &replay)?;
    }
    if cli.json {
        let out = json!({
            "device": device,
            "cycle": cycle,
            "replay": { "workload": "synthetic", "requests": requests.len(), "results": replay },
            "transfer": transfer,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "Logical throughput (request cycle on one shared manager; `kvbm-bench cycle` for more):"
        );
        print!("{}", cycle_table(&cycle));
        println!(
            "\nReplay of the built-in synthetic workload ({} requests; `kvbm-bench replay --trace FILE` for a real trace):",
            requests.len()
        );
        print!("{}", replay_table(&replay));
        println!("\nTransfer bandwidth on {device} (`kvbm-bench transfer` for more):");
        print!("{}", transfer_table(&transfer));
    }
    Ok(())
}

fn bar(cli: &Cli, len: usize, what: &str) -> ProgressBar {
    if cli.quiet {
        return ProgressBar::hidden();
    }
    // Drawn on stderr, and only when it is a terminal.
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed})")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(what.to_owned());
    bar
}

fn cycles(cli: &Cli, threads: &[usize], batch: &[usize], d: Duration) -> Vec<cycle::CycleResult> {
    let pb = bar(cli, threads.len() * batch.len(), "cycle");
    let mut out = Vec::new();
    for &t in threads {
        for &b in batch {
            pb.set_message(format!("{t} thread(s), {b} blocks"));
            out.push(cycle::run(t, b, d));
            pb.inc(1);
        }
    }
    pb.finish_and_clear();
    out
}

fn replays(
    cli: &Cli,
    requests: &[trace::Request],
    capacities: &[usize],
    policies: &[replay::Policy],
    options: &replay::ReplayOptions,
) -> Result<Vec<replay::ReplayResult>, Error> {
    let pb = bar(cli, capacities.len() * policies.len(), "replay");
    let mut out = Vec::new();
    for &p in policies {
        for &c in capacities {
            pb.set_message(format!("{} at {c} blocks", p.name()));
            out.push(replay::replay_opts(requests, c, p, options)?);
            pb.inc(1);
        }
    }
    pb.set_message("the optimum, for of_opt");
    replay::add_of_opt(requests, &mut out)?;
    pb.finish_and_clear();
    Ok(out)
}

fn transfers(
    cli: &Cli,
    target: &transfer::Target,
    plan: &transfer::Plan,
) -> Result<Vec<transfer::TransferResult>, Error> {
    let pb = bar(cli, transfer::points(target, plan), "transfer");
    let out = transfer::run(target, plan, |what| {
        pb.set_message(what.to_owned());
        pb.inc(1);
    })?;
    pb.finish_and_clear();
    Ok(out)
}

fn cycle_table(results: &[cycle::CycleResult]) -> String {
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            vec![
                r.threads.to_string(),
                r.batch.to_string(),
                format!("{:.0}", r.cycles_per_s),
                format!("{:.2}", r.blocks as f64 / r.seconds / 1e6),
                format!("{:.1}", r.ns_per_block),
                format!("{:.1}%", r.hit_rate * 100.0),
            ]
        })
        .collect();
    table(
        &[
            "threads",
            "blocks/request",
            "requests/s",
            "Mblocks/s",
            "ns/block",
            "prefix hits",
        ],
        &rows,
    )
}

/// `replay --publish`: one replay with a KV-event publisher on the manager, its counts, then
/// the publisher kept serving for `linger`.
fn replay_published(
    requests: &[trace::Request],
    capacity: usize,
    backend: kvbm_logical::EvictionBackend,
    options: &replay::ReplayOptions,
    (endpoint, replay_endpoint, linger): (&str, Option<&str>, Duration),
) -> Result<(), Error> {
    let (result, publisher) = replay::replay_attached(requests, capacity, backend, options, |m| {
        let mut builder = kvbm_events::EventPublisher::builder()
            .endpoint(endpoint)
            .source(kvbm_events::Source::manager(m, 1 << 20));
        if let Some(e) = replay_endpoint {
            builder = builder.replay_endpoint(e);
        }
        builder.build().map_err(|e| Error::from(e.to_string()))
    })?;
    let stats = publisher.flush(Duration::from_secs(600))?;
    print!("{}", replay_table(std::slice::from_ref(&result)));
    println!(
        "published {} batches, {} events ({} block events) on {}{}; dropped {} batches",
        stats.batches_published,
        stats.events_published,
        stats.block_events_published,
        publisher.endpoint(),
        publisher
            .replay_endpoint()
            .map_or(String::new(), |e| format!(", replay on {e}")),
        stats.batches_dropped,
    );
    if !linger.is_zero() {
        println!("serving replays for {} s", linger.as_secs_f64());
        std::thread::sleep(linger);
    }
    publisher.shutdown();
    Ok(())
}

fn replay_table(results: &[replay::ReplayResult]) -> String {
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            vec![
                r.policy.to_owned(),
                r.capacity.to_string(),
                r.requests.to_string(),
                r.unservable.to_string(),
                r.requested_blocks.to_string(),
                r.hit_blocks.to_string(),
                format!("{:.2}%", r.hit_rate * 100.0),
                r.of_opt
                    .map_or_else(|| "-".to_owned(), |x| format!("{x:.2}")),
                r.evictions.to_string(),
                r.resume_rematch
                    .map_or_else(|| "-".to_owned(), |x| format!("{x:.3}")),
                format!("{:.0}", r.requests_per_s),
            ]
        })
        .collect();
    table(
        &[
            "policy",
            "capacity",
            "requests",
            "unservable",
            "requested",
            "hits",
            "hit rate",
            "of OPT",
            "evictions",
            "resume_rematch",
            "requests/s",
        ],
        &rows,
    )
}

/// An eviction backend by name (`opt` is a replay-only oracle).
fn parse_backend(name: &str) -> Result<EvictionBackend, String> {
    match replay::parse_policy(name)? {
        replay::Policy::Backend(b) => Ok(b),
        replay::Policy::Opt => Err("opt is an offline oracle, not an eviction policy".into()),
    }
}

fn tiered_table(r: &tiered::TieredResult) -> String {
    let rows: Vec<Vec<String>> = r
        .tiers
        .iter()
        .map(|t| {
            vec![
                t.tier.clone(),
                t.medium.clone(),
                t.hits.to_string(),
                t.offloaded.to_string(),
                t.onboarded.to_string(),
                t.skipped.to_string(),
                t.lost.to_string(),
            ]
        })
        .collect();
    let mut out = table(
        &[
            "tier",
            "medium",
            "hits",
            "offloaded",
            "onboarded",
            "skipped",
            "lost",
        ],
        &rows,
    );
    out.push_str(&format!(
        "requests {} (unservable {}, deferred {}), {:.1} blocks/request; hit rate {:.2}% (one LRU pool of G2's size: {:.2}%: goal {})\n\
         verified {} bytes, {} mismatches; not now {}\n\
         scheduler time in kvbm per request: p50 {:.1} us, p99 {:.1} us, max {:.1} us (its CPU time: p50 {:.1} us, p99 {:.1} us)\n\
         onboard wait p50 {:.1} us, p99 {:.1} us; {:.2} s\n\
         copy bandwidth: offload {:.2} GB/s ({:.0}% of one large copy, {:.2} GB/s), onboard {:.2} GB/s ({:.0}% of {:.2} GB/s)\n",
        r.requests,
        r.unservable,
        r.deferred,
        r.blocks_per_request,
        r.hit_rate * 100.0,
        r.lru_hit_rate_at_g2 * 100.0,
        if r.hit_goal_met { "met" } else { "NOT met" },
        r.verified_bytes,
        r.mismatches,
        r.not_now,
        r.sched_us_p50,
        r.sched_us_p99,
        r.sched_us_max,
        r.sched_cpu_us_p50,
        r.sched_cpu_us_p99,
        r.onboard_wait_us_p50,
        r.onboard_wait_us_p99,
        r.seconds,
        r.offload_gb_s,
        r.offload_of_ceiling * 100.0,
        r.ceiling_offload_gb_s,
        r.onboard_gb_s,
        r.onboard_of_ceiling * 100.0,
        r.ceiling_onboard_gb_s,
    ));
    let phases: Vec<String> = r
        .sched_cpu_phases
        .iter()
        .map(|p| format!("{} {:.1}/{:.1}", p.phase, p.p50, p.p99))
        .collect();
    out.push_str(&format!(
        "scheduler CPU time by phase, p50/p99 us: {}\n",
        phases.join(", ")
    ));
    out.push_str(&format!(
        "machine baseline (a fixed {:.0} us CPU job after each request, timed the same way): p50 {:.1} us, p99 {:.1} us, p99/p50 {:.2} (CPU time: p50 {:.1} us, p99 {:.1} us)\n",
        tiered::BASELINE_JOB_US,
        r.baseline_us_p50,
        r.baseline_us_p99,
        r.baseline_us_p99 / r.baseline_us_p50.max(f64::MIN_POSITIVE),
        r.baseline_cpu_us_p50,
        r.baseline_cpu_us_p99,
    ));
    out
}

fn transfer_table(results: &[transfer::TransferResult]) -> String {
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            vec![
                r.direction.to_owned(),
                r.layout.to_owned(),
                r.region_kib.to_string(),
                r.blocks.to_string(),
                r.strategy.to_owned(),
                r.copies.to_string(),
                format!("{:.2}", r.gb_per_s),
                format!("{:.0}%", r.fraction_of_ceiling * 100.0),
            ]
        })
        .collect();
    table(
        &[
            "direction",
            "layout",
            "region KiB",
            "blocks",
            "strategy",
            "copies",
            "GB/s",
            "of ceiling",
        ],
        &rows,
    )
}

fn replay_chart(
    path: &std::path::Path,
    source: &str,
    results: &[replay::ReplayResult],
) -> Result<(), Error> {
    let mut series: Vec<Series> = Vec::new();
    for r in results {
        let label = r.policy.to_owned();
        let point = (r.capacity as f64, r.hit_rate * 100.0);
        match series.iter_mut().find(|s| s.label == label) {
            Some(s) => s.points.push(point),
            None => series.push(Series {
                label,
                points: vec![point],
            }),
        }
    }
    for s in &mut series {
        s.points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    // The optimum, if replayed, is the dashed reference line.
    let opt = series
        .iter()
        .position(|s| s.label == replay::Policy::Opt.name())
        .map(|i| series.remove(i));
    line_chart_with_reference(
        path,
        &format!("Prefix hit rate: {source}"),
        "capacity (blocks)",
        "hit rate (%)",
        &series,
        opt.as_ref(),
    )
}

fn transfer_chart(
    path: &std::path::Path,
    device: &str,
    results: &[transfer::TransferResult],
) -> Result<(), Error> {
    // At the largest block count measured, per direction and strategy.
    let most = results.iter().map(|r| r.blocks).max().unwrap_or(0);
    let several_layouts = results.iter().any(|r| r.layout != results[0].layout);
    let mut series: Vec<Series> = Vec::new();
    for r in results.iter().filter(|r| r.blocks == most) {
        let label = if several_layouts {
            format!("{} {} {}", r.direction, r.layout, r.strategy)
        } else {
            format!("{} {}", r.direction, r.strategy)
        };
        let point = (r.region_kib as f64, r.gb_per_s);
        match series.iter_mut().find(|s| s.label == label) {
            Some(s) => s.points.push(point),
            None => series.push(Series {
                label,
                points: vec![point],
            }),
        }
    }
    line_chart(
        path,
        &format!("Bandwidth, {most} blocks, {device}"),
        "region (KiB)",
        "GB/s",
        &series,
    )
}
