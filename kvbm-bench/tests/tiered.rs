//! `kvbm-bench tiered`, run as a user would: requests through the tier stack with every
//! onboarded byte checked.

use std::path::PathBuf;
use std::process::{Command, Output};

/// The binary: `$KVBM_BENCH_BIN`, else cargo's build of it, else the one beside this test
/// executable (a GPU bundle's layout).
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

fn json(o: &Output) -> serde_json::Value {
    assert!(
        o.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("JSON on stdout")
}

fn check(j: &serde_json::Value, mode: &str, eviction: &str, reserve: bool) {
    let r = &j["result"];
    assert_eq!(r["mode"], mode);
    assert_eq!(r["eviction"], eviction);
    // Write-through keeps 1/16 to 1/8 of G1 free unless told not to.
    assert_eq!(r["reserve"].is_array(), reserve, "{}", r["reserve"]);
    if reserve {
        assert_eq!(r["reserve"], serde_json::json!([16, 32]));
    }
    assert_eq!(r["mismatches"], 0, "{r}");
    assert!(r["requests"].as_u64().unwrap() > 0);
    assert!(r["verified_bytes"].as_u64().unwrap() > 0, "{r}");
    let tiers = r["tiers"].as_array().unwrap();
    assert_eq!(tiers.len(), 2);
    assert_eq!(tiers[1]["tier"], "G2");
    assert!(tiers[1]["offloaded"].as_u64().unwrap() > 0, "{r}");
    assert!(tiers[1]["onboarded"].as_u64().unwrap() > 0, "{r}");
    // Hits add up: G1 hits plus onboarded blocks are the prefix hits.
    let hits: u64 = tiers.iter().map(|t| t["hits"].as_u64().unwrap()).sum();
    assert_eq!(hits, r["hit_blocks"].as_u64().unwrap());
    assert!(r["hit_goal_met"].is_boolean());
    let rate = r["hit_rate"].as_f64().unwrap();
    let lru = r["lru_hit_rate_at_g2"].as_f64().unwrap();
    assert!(rate > 0.0 && lru > 0.0);
    assert!(r["sched_us_p99"].as_f64().unwrap() >= r["sched_us_p50"].as_f64().unwrap());
    // The machine baseline was calibrated to about 20 µs of CPU time (within 4x either
    // way: a loaded machine stretches it, not by that much).
    let p50 = r["baseline_cpu_us_p50"].as_f64().unwrap();
    assert!((5.0..=80.0).contains(&p50), "{r}");
    assert!(r["baseline_us_p99"].as_f64().unwrap() >= r["baseline_us_p50"].as_f64().unwrap());
    assert_eq!(r["blocks_per_request"].as_f64(), Some(64.0));
}

#[test]
fn tiered_replays_the_synthetic_workload_and_checks_every_byte() {
    for (extra, mode, eviction, reserve) in [
        (&[][..], "write-through", "lineage", true),
        (&["--no-reserve"][..], "write-through", "lineage", false),
        (&["--write-back"][..], "write-back", "lineage", false),
        (&["--policy", "lru"][..], "write-through", "lru", true),
        (
            &["--policy", "adaptive"][..],
            "write-through",
            "adaptive",
            true,
        ),
    ] {
        let mut args = vec![
            "tiered",
            "--cpu",
            "--json",
            "--quiet",
            "--sessions",
            "40",
            "--g1",
            "256",
            "--g2",
            "1024",
        ];
        args.extend(extra);
        check(&json(&bench(&args)), mode, eviction, reserve);
    }
}

#[test]
fn tiered_prints_a_table_and_refuses_empty_tiers() {
    let o = bench(&["tiered", "--cpu", "--quiet", "--sessions", "10"]);
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    for needle in [
        "tier stack on CPU",
        "offloaded",
        "0 mismatches",
        "scheduler time",
    ] {
        assert!(out.contains(needle), "missing {needle}: {out}");
    }
    let o = bench(&["tiered", "--cpu", "--g1", "0"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--g1"));
    // The offline oracle is no eviction policy a tier can run.
    let o = bench(&["tiered", "--cpu", "--policy", "opt"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("oracle"));
    // A G1 too small for any request: nothing measured is an error, not "goal met" at 0 %.
    let o = bench(&["tiered", "--cpu", "--sessions", "10", "--g1", "100"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no request was served"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn tiered_reads_a_mooncake_trace() {
    let dir = std::env::temp_dir().join(format!("kvbm-bench-tiered-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("t.jsonl");
    let mut lines = String::new();
    for r in 0..60u64 {
        // Three shared prefixes, each request with a tail of its own.
        let ids: Vec<u64> = (0..8)
            .map(|i| (r % 3) * 100 + i)
            .chain([1000 + r])
            .collect();
        lines.push_str(&format!(
            "{{\"timestamp\": {r}, \"input_length\": 4608, \"output_length\": 10, \"hash_ids\": {ids:?}}}\n"
        ));
    }
    std::fs::write(&path, lines).unwrap();
    let j = json(&bench(&[
        "tiered",
        "--cpu",
        "--json",
        "--quiet",
        "--trace",
        path.to_str().unwrap(),
        "--g1",
        "32",
        "--g2",
        "128",
    ]));
    let r = &j["result"];
    assert_eq!(r["requests"], 60);
    assert_eq!(r["mismatches"], 0);
    assert!(r["hit_rate"].as_f64().unwrap() > 0.5, "{r}");
    assert_eq!(r["hit_goal_met"], true, "{r}");
}

/// Whether redis-server is on PATH; without it a Redis test skips, unless
/// KVBM_REQUIRE_REDIS=1.
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

/// A fresh temporary directory of this test.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kvbm-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Three tiers, the third `medium`: no wrong byte, hits add up, the store took blocks, and
/// the copy bandwidth of both directions and its ceiling were measured.
fn check_store(r: &serde_json::Value, medium: &str) {
    assert_eq!(r["mismatches"], 0, "{r}");
    assert!(r["verified_bytes"].as_u64().unwrap() > 0, "{r}");
    let tiers = r["tiers"].as_array().unwrap();
    assert_eq!(tiers.len(), 3, "{r}");
    assert_eq!(tiers[2]["medium"], medium, "{r}");
    assert!(tiers[2]["offloaded"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(tiers[2]["lost"], 0, "{r}");
    assert_eq!(tiers[2]["corrupt"], 0, "{r}");
    let hits: u64 = tiers.iter().map(|t| t["hits"].as_u64().unwrap()).sum();
    assert_eq!(hits, r["hit_blocks"].as_u64().unwrap(), "{r}");
    for key in [
        "offload_gb_s",
        "onboard_gb_s",
        "ceiling_offload_gb_s",
        "ceiling_onboard_gb_s",
    ] {
        assert!(r[key].as_f64().unwrap() > 0.0, "{key}: {r}");
    }
}

#[test]
fn tiered_with_a_disk_tier_and_an_engine_layout_checks_every_byte() {
    let dir = temp_dir("tiered-disk");
    let path = dir.join("g3.kvbm");
    let j = json(&bench(&[
        "tiered",
        "--cpu",
        "--json",
        "--quiet",
        "--sessions",
        "40",
        "--g1",
        "128",
        "--g2",
        "256",
        "--disk",
        path.to_str().unwrap(),
        "--disk-blocks",
        "2048",
        "--g1-layout",
        "of",
        "--region-kib",
        "1",
    ]));
    let r = &j["result"];
    check_store(r, "disk");
    assert_eq!(r["g1_layout"], "outer-first");
    assert_eq!(r["region_kib"], 1);
    // G2 holds a quarter of what the workload touches: blocks come back from the disk.
    assert!(r["tiers"][2]["onboarded"].as_u64().unwrap() > 0, "{r}");
    assert!(path.metadata().unwrap().len() > 0, "the tier file exists");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tiered_with_a_redis_tier_checks_every_byte() {
    if !have_redis() {
        return;
    }
    let redis = kvbm_bench::remote::LocalRedis::start().unwrap();
    let url = redis.url();
    let j = json(&bench(&[
        "tiered",
        "--cpu",
        "--json",
        "--quiet",
        "--sessions",
        "40",
        "--g1",
        "128",
        "--g2",
        "256",
        "--redis",
        &url,
        "--namespace",
        "tiered-cli-test",
        "--redis-admission",
        "presence",
    ]));
    let r = &j["result"];
    check_store(r, "redis");
    assert!(r["tiers"][2]["onboarded"].as_u64().unwrap() > 0, "{r}");
}

#[test]
fn tiered_refuses_bad_store_and_region_flags() {
    for (args, needle) in [
        (&["--region-kib", "0"][..], "--region-kib"),
        (&["--g2-admission", "often"][..], "admission"),
        (&["--disk-admission", "freq:x"][..], "admission"),
        (&["--g1-layout", "sideways"][..], "sideways"),
    ] {
        let mut all = vec!["tiered", "--cpu", "--quiet", "--sessions", "4"];
        all.extend(args);
        let o = bench(&all);
        assert!(!o.status.success(), "{args:?} accepted");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}
