//! `kvbm-bench disk`, run as a user would: the throughput table and its JSON, and the crash
//! loop (a writer child killed with SIGKILL, the tier reopened and every recovered block
//! checked) with a small number of cycles.

use std::path::PathBuf;
use std::process::{Command, Output};

/// The binary: `$KVBM_BENCH_BIN`, else cargo's build of it, else the one beside this test.
fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("KVBM_BENCH_BIN") {
        return path.into();
    }
    let cargo = PathBuf::from(env!("CARGO_BIN_EXE_kvbm-bench"));
    if cargo.exists() {
        return cargo;
    }
    std::env::current_exe()
        .expect("the test's own path")
        .with_file_name("kvbm-bench")
}

fn bench(args: &[&str]) -> Output {
    Command::new(binary())
        .args(args)
        .output()
        .expect("the binary runs")
}

/// A fresh directory under the system's temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "kvbm-bench-disk-test-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }

    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn json(o: &Output) -> serde_json::Value {
    assert!(
        o.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&o.stdout)))
}

#[test]
fn the_throughput_run_reports_every_point_against_its_ceiling() {
    let dir = TempDir::new("throughput");
    let path = dir.path().to_str().unwrap();
    let j = json(&bench(&[
        "disk",
        "--json",
        "--quiet",
        "--path",
        path,
        "--mib",
        "2",
        "--reps",
        "1",
        "--depth",
        "1,4",
        "--block-kib",
        "64,256",
    ]));
    assert_eq!(j["path"], path);
    assert!(j["filesystem"].as_str().is_some_and(|f| !f.is_empty()));
    assert!(j["io_mode"].as_str().is_some_and(|m| !m.is_empty()));
    let ceiling = &j["ceilings"][0];
    for k in ["fill_mb_s", "write_mb_s", "read_mb_s"] {
        assert!(
            ceiling[k].as_f64().is_some_and(|v| v > 0.0),
            "{k}: {ceiling}"
        );
    }
    let points = j["points"].as_array().unwrap();
    let unavailable = j["unavailable"].as_array().unwrap();
    // Both back ends, unless io_uring is refused here (then it says so).
    assert_eq!(points.len() + 4 * unavailable.len(), 8, "{j}");
    for p in points {
        for k in [
            "fill_mb_s",
            "write_mb_s",
            "read_mb_s",
            "fill_of_ceiling",
            "write_of_ceiling",
            "read_of_ceiling",
        ] {
            assert!(p[k].as_f64().is_some_and(|v| v > 0.0), "{k}: {p}");
        }
        let goal = p["goal"].as_f64().unwrap();
        assert_eq!(goal, 0.70, "{p}");
    }
    // The directory given is kept; the bench's files in it are gone.
    assert!(dir.path().is_dir());

    let table = bench(&[
        "disk",
        "--quiet",
        "--path",
        path,
        "--mib",
        "1",
        "--reps",
        "1",
        "--depth",
        "2",
        "--block-kib",
        "64",
        "--backend",
        "threads",
    ]);
    assert!(table.status.success());
    let out = String::from_utf8_lossy(&table.stdout);
    assert!(
        out.contains("ceiling") && out.contains("fill MB/s") && out.contains("threads"),
        "{out}"
    );
}

#[test]
fn bad_arguments_are_refused() {
    let o = bench(&["disk", "--backend", "floppy"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("floppy"));
    let o = bench(&["disk", "--quiet", "--block-kib", "0"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("out of range"));
}

fn crash_loop(extra: &[&str]) -> serde_json::Value {
    let dir = TempDir::new(if extra.is_empty() {
        "crash"
    } else {
        "crash-buffered"
    });
    let path = dir.path().to_str().unwrap();
    let mut args = vec![
        "disk",
        "--json",
        "--quiet",
        "--path",
        path,
        "--crash-cycles",
        "4",
        "--crash-capacity",
        "32",
        "--crash-block-kib",
        "16",
        "--seed",
        "7",
    ];
    args.extend_from_slice(extra);
    let j = json(&bench(&args));
    let cycles = j["cycles"].as_array().unwrap();
    assert_eq!(cycles.len(), 4);
    assert_eq!(j["served_corrupt"], 0);
    let recovered = j["recovered"].as_u64().unwrap();
    assert!(recovered > 0, "{j}");
    for c in cycles {
        assert_eq!(c["served_corrupt"], 0);
        // Every recovered block was read back and verified (or refused, never served).
        assert_eq!(
            c["verified"].as_u64().unwrap() + c["refused_corrupt"].as_u64().unwrap(),
            c["recovered"].as_u64().unwrap(),
            "{c}"
        );
        assert!(c["batches_before_kill"].as_u64().unwrap() >= 1);
        assert!(c["recovered"].as_u64().unwrap() <= 32);
    }
    j
}

#[test]
fn the_crash_loop_recovers_only_blocks_that_verify() {
    let j = crash_loop(&[]);
    assert!(j["io_mode"].as_str().is_some());
}

#[test]
fn the_crash_loop_with_buffered_io_too() {
    let j = crash_loop(&["--crash-buffered"]);
    assert_eq!(j["io_mode"], "buffered (requested)");
}
