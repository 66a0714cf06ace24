//! `kvbm-bench remote`, run as a user would: against a throw-away local redis-server (started
//! by the command itself), and against a server that is not there.

use std::path::PathBuf;
use std::process::{Command, Output};

fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("KVBM_BENCH_BIN") {
        return path.into();
    }
    PathBuf::from(env!("CARGO_BIN_EXE_kvbm-bench"))
}

fn bench(args: &[&str]) -> Output {
    Command::new(binary())
        .args(args)
        .output()
        .expect("the binary runs")
}

/// Whether redis-server is on PATH; without it the test skips, unless KVBM_REQUIRE_REDIS=1.
fn have_redis() -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("redis-server").is_file()));
    if !found {
        assert_ne!(
            std::env::var("KVBM_REQUIRE_REDIS").as_deref(),
            Ok("1"),
            "redis-server not found and KVBM_REQUIRE_REDIS=1"
        );
        eprintln!("SKIPPED: redis-server not found (install the redis-server package)");
    }
    found
}

#[test]
fn remote_measures_put_and_get_and_checks_every_block() {
    if !have_redis() {
        return;
    }
    let o = bench(&[
        "remote",
        "--block-kib",
        "64,256",
        "--total-mib",
        "2",
        "--depth",
        "4",
        "--reps",
        "2",
        "--json",
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    let results = v["results"].as_array().expect("results");
    assert_eq!(results.len(), 4);
    for (r, (kib, op)) in results
        .iter()
        .zip([(64, "put"), (64, "get"), (256, "put"), (256, "get")])
    {
        assert_eq!(r["block_kib"], kib);
        assert_eq!(r["op"], op);
        assert_eq!(r["kvbm_runs"].as_array().unwrap().len(), 2);
        assert!(r["kvbm_gb_per_s"].as_f64().unwrap() > 0.0);
        if !r["redis_benchmark_gb_per_s"].is_null() {
            assert!(r["fraction"].as_f64().unwrap() > 0.0);
        }
    }
    // Warm-up and two runs at each size: 32 blocks of 64 KiB, 8 of 256 KiB.
    assert_eq!(v["verified_blocks"], 3 * 32 + 3 * 8);
    assert_eq!(v["depth"], 4);

    // The table says the same.
    let o = bench(&[
        "remote",
        "--block-kib",
        "64",
        "--total-mib",
        "1",
        "--reps",
        "1",
        "--quiet",
        "--no-redis-benchmark",
    ]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("kvbm GB/s") && text.contains("every byte checked"),
        "{text}"
    );
}

#[test]
fn remote_against_nothing_fails_cleanly_and_hides_the_password() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("redis://user:pw-secret-9@127.0.0.1:{port}");
    let o = bench(&[
        "remote",
        "--redis",
        &url,
        "--block-kib",
        "64",
        "--total-mib",
        "1",
        "--reps",
        "1",
        "--quiet",
        "--no-redis-benchmark",
    ]);
    assert!(!o.status.success());
    let stderr = String::from_utf8_lossy(&o.stderr);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stderr.contains("Unavailable"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!stderr.contains("pw-secret-9") && !stdout.contains("pw-secret-9"));
}
