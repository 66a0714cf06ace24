//! vLLM-style subscribers in Python (pyzmq + msgspec, `tests/python/subscriber.py`) against the
//! publisher: every payload must decode with msgspec structs written from vLLM's schema, through
//! the decoder configuration vLLM's subscribers use, re-encode to the same bytes, and rebuild
//! the managers' cached sets; a late subscriber catches up by replay, a slow one loses
//! messages to the high-water mark and repairs them by replay.
//!
//! The interpreter is the virtual environment `.ci/run` creates (`target/pyenv`, or the one
//! `KVBM_EVENTS_PYTHON` names). Without it these tests skip with a message, unless
//! `KVBM_REQUIRE_EVENTS_PYTHON=1` (set by `.ci/run`) turns the skip into a failure.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use common::Workload;
use kvbm_events::{BatchLayout, EventPublisher, PublisherStats, Source};
use kvbm_logical::{BlockManager, Device, Host};

const FLUSH: Duration = Duration::from_secs(60);
const BLOCK_SIZE: usize = 4;

fn python() -> Option<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = std::env::var_os("KVBM_EVENTS_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/pyenv/bin/python"));
    if python.exists() {
        return Some(python);
    }
    if std::env::var("KVBM_REQUIRE_EVENTS_PYTHON").is_ok_and(|v| v == "1") {
        panic!(
            "KVBM_REQUIRE_EVENTS_PYTHON=1 but there is no {}",
            python.display()
        );
    }
    eprintln!(
        "SKIPPED: no Python environment at {} (run .ci/run, or set KVBM_EVENTS_PYTHON to a python with pyzmq and msgspec)",
        python.display()
    );
    None
}

struct Subscriber {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

/// What the subscriber reports at the end.
#[derive(Debug)]
struct Report {
    stats: BTreeMap<String, u64>,
    sets: BTreeMap<String, BTreeSet<u64>>,
}

impl Subscriber {
    /// Starts the subscriber and waits for its READY line.
    fn start(python: &PathBuf, publisher: &EventPublisher, mode: &str, rank: u32) -> Self {
        Self::start_as(python, publisher, mode, rank, "array")
    }

    fn start_as(
        python: &PathBuf,
        publisher: &EventPublisher,
        mode: &str,
        rank: u32,
        layout: &str,
    ) -> Self {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/subscriber.py");
        let mut child = Command::new(python)
            .arg(script)
            .args(["--endpoint", publisher.endpoint()])
            .args([
                "--replay",
                publisher.replay_endpoint().expect("a replay socket"),
            ])
            .args(["--topic", "kv-events", "--mode", mode])
            .args([
                "--rank",
                &rank.to_string(),
                "--block-size",
                &BLOCK_SIZE.to_string(),
            ])
            .args(["--layout", layout])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python starts");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut sub = Self {
            child,
            stdin,
            stdout,
        };
        assert_eq!(sub.line(), "READY");
        sub
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("read");
        assert!(
            !line.is_empty(),
            "the subscriber exited early (see its stderr)"
        );
        line.trim_end().to_owned()
    }

    /// Tells it the last published seq and collects its report.
    fn finish(mut self, stats: &PublisherStats) -> Report {
        writeln!(self.stdin, "END {}", stats.batches_published - 1).expect("write");
        self.stdin.flush().expect("flush");
        let mut report = Report {
            stats: BTreeMap::new(),
            sets: BTreeMap::new(),
        };
        loop {
            let line = self.line();
            let mut words = line.split(' ');
            match words.next() {
                Some("STAT") => {
                    let name = words.next().expect("name").to_owned();
                    report
                        .stats
                        .insert(name, words.next().expect("value").parse().expect("int"));
                }
                Some("SET") => {
                    let medium = words.next().expect("medium").to_owned();
                    let hash = words.next().expect("hash").parse().expect("u64");
                    report.sets.entry(medium).or_default().insert(hash);
                }
                Some("DONE") => break,
                _ => panic!("unexpected line {line:?}"),
            }
        }
        assert!(self.child.wait().expect("exit").success());
        report
    }
}

impl Report {
    fn stat(&self, name: &str) -> u64 {
        self.stats[name]
    }

    fn medium(&self, name: &str) -> BTreeSet<u64> {
        self.sets.get(name).cloned().unwrap_or_default()
    }

    /// Every payload decoded and re-encoded to the same bytes; none was lost for good.
    fn check_clean(&self, stats: &PublisherStats) {
        assert_eq!(self.stat("next_seq"), stats.batches_published, "{self:?}");
        assert_eq!(self.stat("batches"), stats.batches_published);
        assert_eq!(self.stat("lost"), 0);
        assert_eq!(
            self.stat("mismatches"),
            0,
            "msgspec re-encodes every payload to its bytes"
        );
        assert_eq!(self.stat("rank_errors"), 0);
        assert_eq!(
            self.stat("size_errors"),
            0,
            "token_ids hold block_size tokens per block"
        );
        assert!(
            self.stat("tokenized") > 0,
            "blocks staged from tokens carry them"
        );
    }
}

fn managers() -> (BlockManager<Device>, BlockManager<Host>) {
    let g1 = BlockManager::<Device>::builder()
        .block_count(40)
        .block_size(BLOCK_SIZE)
        .build()
        .expect("g1");
    let g2 = BlockManager::<Host>::builder()
        .block_count(80)
        .block_size(BLOCK_SIZE)
        .build()
        .expect("g2");
    (g1, g2)
}

fn publisher(g1: &BlockManager<Device>, g2: &BlockManager<Host>, rank: u32) -> EventPublisher {
    EventPublisher::builder()
        .bind("tcp://127.0.0.1:*")
        .replay_endpoint("tcp://127.0.0.1:*")
        .topic("kv-events")
        .data_parallel_rank(Some(rank))
        .buffer_steps(1 << 20)
        .max_batch_events(16)
        .source(Source::manager(g1, 1 << 16))
        .source(Source::manager(g2, 1 << 16))
        .build()
        .expect("publisher")
}

#[test]
fn a_live_subscriber_rebuilds_the_cached_set_of_each_medium() {
    let Some(python) = python() else { return };
    let (g1, g2) = managers();
    let publisher = publisher(&g1, &g2, 0);
    let sub = Subscriber::start(&python, &publisher, "live", 0);
    let (mut w1, mut w2) = (Workload::new(11, BLOCK_SIZE), Workload::new(12, BLOCK_SIZE));
    for _ in 0..40 {
        w1.run(&g1, 10);
        w2.run(&g2, 10);
    }
    let stats = publisher.flush(FLUSH).expect("flushed");
    assert_eq!(stats.resyncs, 0);
    let report = sub.finish(&stats);
    report.check_clean(&stats);
    assert!(report.stat("stored") > 0 && report.stat("removed") > 0);
    assert_eq!(report.medium("GPU"), w1.cached(&g1));
    assert_eq!(report.medium("CPU"), w2.cached(&g2));
    assert!(!report.medium("GPU").is_empty());
}

#[test]
fn a_late_subscriber_catches_up_by_replay() {
    let Some(python) = python() else { return };
    let (g1, g2) = managers();
    let publisher = publisher(&g1, &g2, 7);
    let (mut w1, mut w2) = (Workload::new(21, BLOCK_SIZE), Workload::new(22, BLOCK_SIZE));
    w1.run(&g1, 200);
    w2.run(&g2, 200);
    let before = publisher.flush(FLUSH).expect("flushed");
    assert!(before.batches_published > 20);
    // Joins now: replays from seq 0 before READY, then reads live.
    let sub = Subscriber::start(&python, &publisher, "late", 7);
    w1.run(&g1, 100);
    w2.run(&g2, 100);
    let stats = publisher.flush(FLUSH).expect("flushed");
    let report = sub.finish(&stats);
    report.check_clean(&stats);
    assert!(
        report.stat("replayed") >= before.batches_published,
        "{report:?}"
    );
    assert_eq!(report.medium("GPU"), w1.cached(&g1));
    assert_eq!(report.medium("CPU"), w2.cached(&g2));
}

#[test]
fn a_slow_subscriber_loses_messages_and_replay_repairs_them() {
    let Some(python) = python() else { return };
    let (g1, g2) = managers();
    let publisher = EventPublisher::builder()
        .bind("tcp://127.0.0.1:*")
        .replay_endpoint("tcp://127.0.0.1:*")
        .topic("kv-events")
        .hwm(8)
        .buffer_steps(1 << 20)
        .max_batch_events(16)
        .source(Source::manager(&g1, 1 << 16))
        .source(Source::manager(&g2, 1 << 16))
        .build()
        .expect("publisher");
    // Does not read the PUB socket until END: its queues overflow, the PUB socket drops.
    let sub = Subscriber::start(&python, &publisher, "slow", 0);
    let (mut w1, mut w2) = (Workload::new(31, BLOCK_SIZE), Workload::new(32, BLOCK_SIZE));
    for _ in 0..100 {
        w1.run(&g1, 100);
        w2.run(&g2, 100);
    }
    let stats = publisher.flush(FLUSH).expect("flushed");
    let report = sub.finish(&stats);
    report.check_clean(&stats);
    assert!(
        report.stat("gaps") >= 1,
        "the high-water mark dropped messages: {report:?}"
    );
    assert!(report.stat("replayed") > 0);
    assert_eq!(report.medium("GPU"), w1.cached(&g1));
    assert_eq!(report.medium("CPU"), w2.cached(&g2));
}

#[test]
fn the_map_layout_decodes_with_the_later_vllm_structs() {
    let Some(python) = python() else { return };
    let g1 = BlockManager::<Device>::builder()
        .block_count(40)
        .block_size(BLOCK_SIZE)
        .build()
        .expect("g1");
    let publisher = EventPublisher::builder()
        .bind("tcp://127.0.0.1:*")
        .replay_endpoint("tcp://127.0.0.1:*")
        .topic("kv-events")
        .batch_layout(BatchLayout::Map)
        .source(Source::manager(&g1, 1 << 16))
        .build()
        .expect("publisher");
    let sub = Subscriber::start_as(&python, &publisher, "live", 0, "map");
    let mut w = Workload::new(41, BLOCK_SIZE);
    w.run(&g1, 300);
    let stats = publisher.flush(FLUSH).expect("flushed");
    let report = sub.finish(&stats);
    report.check_clean(&stats);
    assert!(
        report.stat("clears") > 0,
        "one source: kvbm's Cleared is published"
    );
    assert_eq!(report.medium("GPU"), w.cached(&g1));
}
