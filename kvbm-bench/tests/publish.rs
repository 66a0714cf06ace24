//! `replay --publish`: a vLLM-style Python subscriber (kvbm-events' `tests/python/subscriber.py`,
//! pyzmq + msgspec) that joins after a replay run rebuilds, by replay from `seq` 0, exactly the
//! set the manager caches at the end. Skips without the Python environment `.ci/run` creates
//! (`target/pyenv`, or `KVBM_EVENTS_PYTHON`) unless `KVBM_REQUIRE_EVENTS_PYTHON=1`.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use kvbm_bench::replay::replay_attached;
use kvbm_bench::workload::Synthetic;
use kvbm_events::{EventPublisher, Source};
use kvbm_logical::EvictionBackend;

#[test]
fn a_late_python_subscriber_rebuilds_the_set_of_a_replay_run() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = std::env::var_os("KVBM_EVENTS_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/pyenv/bin/python"));
    if !python.exists() {
        assert!(
            std::env::var("KVBM_REQUIRE_EVENTS_PYTHON").map_or(true, |v| v != "1"),
            "KVBM_REQUIRE_EVENTS_PYTHON=1 but there is no {}",
            python.display()
        );
        eprintln!(
            "SKIPPED: no Python environment at {} (run .ci/run)",
            python.display()
        );
        return;
    }
    let requests = Synthetic {
        sessions: 60,
        seed: 5,
        ..Default::default()
    }
    .generate();
    let (result, (publisher, m)) = replay_attached(
        &requests,
        256,
        EvictionBackend::Lru,
        &Default::default(),
        |m| {
            let publisher = EventPublisher::builder()
                .endpoint("tcp://127.0.0.1:*")
                .replay_endpoint("tcp://127.0.0.1:*")
                .source(Source::manager(m, 1 << 20))
                .build()
                .map_err(|e| e.to_string())?;
            Ok((publisher, m.clone()))
        },
    )
    .expect("replays");
    assert!(result.evictions > 0, "the pool is small enough to evict");
    let stats = publisher.flush(Duration::from_secs(60)).expect("flushed");
    // The manager's registered set at the end (its chained hashes of the replay's tokens,
    // not the trace's ids): what the late router must rebuild.
    let (snapshot, _events) = m.subscribe_with_snapshot(1);
    let cached: BTreeSet<u64> = snapshot.hashes().map(|h| h.as_u64()).collect();
    assert!(!cached.is_empty());

    let script = root.join("kvbm-events/tests/python/subscriber.py");
    let mut child = Command::new(&python)
        .arg(script)
        .args(["--endpoint", publisher.endpoint()])
        .args(["--replay", publisher.replay_endpoint().expect("replay")])
        .args(["--mode", "late", "--rank", "0"])
        .args(["--block-size", &m.block_size().to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python starts");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    assert_eq!(lines.next().expect("a line").expect("read"), "READY");
    writeln!(stdin, "END {}", stats.batches_published - 1).expect("write");
    stdin.flush().expect("flush");
    let mut rebuilt = BTreeSet::new();
    let mut stat = std::collections::BTreeMap::new();
    for line in lines {
        let line = line.expect("read");
        let words: Vec<&str> = line.split(' ').collect();
        match words[..] {
            ["SET", "GPU", h] => {
                rebuilt.insert(h.parse::<u64>().expect("u64"));
            }
            ["STAT", name, value] => {
                stat.insert(name.to_owned(), value.parse::<u64>().expect("int"));
            }
            ["DONE"] => break,
            _ => panic!("unexpected line {line:?}"),
        }
    }
    assert!(child.wait().expect("exit").success());
    assert_eq!(stat["batches"], stats.batches_published);
    assert_eq!(stat["mismatches"], 0);
    assert_eq!(stat["lost"], 0);
    assert_eq!(rebuilt, cached);
}
