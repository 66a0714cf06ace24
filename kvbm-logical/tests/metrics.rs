//! Metrics: counters after a scripted workload, gauges that add up, and Prometheus text that
//! a Prometheus parser accepts.

use kvbm_logical::{
    BlockDuplicationPolicy, BlockManager, Device, Host, ImmutableBlock, SequenceHash,
};
use prometheus_parse::{Scrape, Value};

const BS: usize = 4;

fn h(x: u64) -> SequenceHash {
    SequenceHash::new(x)
}

#[test]
fn counters_follow_a_workload() {
    let m = BlockManager::<Device>::builder()
        .block_count(4)
        .block_size(BS)
        .max_pinned_fraction(0.5)
        .build()
        .unwrap();
    // Register 1, 2, 3; a second registration of 3 is deduplicated (policy Reject).
    let staged: Vec<_> = m
        .allocate_blocks(4)
        .unwrap()
        .into_iter()
        .zip([1, 2, 3, 3])
        .map(|(b, x)| b.stage(h(x), BS).unwrap())
        .collect();
    let held = m.register_blocks(staged).unwrap();
    ImmutableBlock::release_all(held);
    let hits = m.match_blocks(&[h(1), h(2), h(9), h(3)]); // stops at 9
    let scanned = m.scan_matches(&[h(9), h(3)], false);
    m.pin(&[h(3)]).unwrap();
    ImmutableBlock::release_all(hits);
    ImmutableBlock::release_all(scanned);
    drop(m.allocate_blocks(3).unwrap()); // 1 from reset, 2 evicted (1 and 2; 3 is pinned)
    assert_eq!(m.invalidate_blocks(&[h(3)]), 0); // pinned: left alone
    m.unpin_all();
    assert_eq!(m.reset_inactive_pool(), Ok(1));

    let s = m.metrics().snapshot();
    assert_eq!(s.allocations_from_reset, 5);
    assert_eq!(s.allocations_from_eviction, 2);
    assert_eq!(s.allocations(), 7);
    assert_eq!(s.stagings, 4);
    assert_eq!((s.registrations, s.dedups, s.duplicates), (4, 1, 0));
    assert_eq!((s.match_requested, s.match_returned), (4, 2));
    assert_eq!((s.scan_requested, s.scan_returned), (2, 1));
    assert_eq!(
        (s.removed_evicted, s.removed_reset, s.removed_invalidated),
        (2, 1, 0)
    );
    assert_eq!(s.removals(), 3);
    assert_eq!(
        (
            s.reset_blocks,
            s.inactive_blocks,
            s.mutable_blocks,
            s.active_blocks,
            s.pinned_blocks
        ),
        (4, 0, 0, 0, 0)
    );
}

#[test]
fn duplicates_are_counted_under_allow() {
    let m = BlockManager::<Host>::builder()
        .block_count(4)
        .block_size(BS)
        .duplication_policy(BlockDuplicationPolicy::Allow)
        .build()
        .unwrap();
    let staged: Vec<_> = m
        .allocate_blocks(2)
        .unwrap()
        .into_iter()
        .map(|b| b.stage(h(1), BS).unwrap())
        .collect();
    let held = m.register_blocks(staged).unwrap();
    let s = m.metrics().snapshot();
    assert_eq!((s.registrations, s.dedups, s.duplicates), (2, 0, 1));
    assert_eq!(s.active_blocks, 2);
    drop(held);
}

#[test]
fn gauges_always_add_up_to_the_total() {
    let m = BlockManager::<Device>::builder()
        .block_count(16)
        .block_size(BS)
        .build()
        .unwrap();
    let mut held = Vec::new();
    for round in 0..20u64 {
        let staged: Vec<_> = m
            .allocate_blocks(2)
            .unwrap()
            .into_iter()
            .zip([round, round + 100])
            .map(|(b, x)| b.stage(h(x), BS).unwrap())
            .collect();
        held.extend(m.register_blocks(staged).unwrap());
        let spare = m.allocate_blocks(1).unwrap();
        let s = m.metrics().snapshot();
        let sum = s.reset_blocks + s.inactive_blocks + s.mutable_blocks + s.active_blocks;
        assert_eq!(sum, 16);
        assert_eq!(s.mutable_blocks, 1);
        drop(spare);
        if held.len() > 6 {
            held.drain(..3);
        }
    }
}

#[test]
fn prometheus_text_parses_with_the_tier_label() {
    let m = BlockManager::<Host>::builder()
        .block_count(8)
        .block_size(BS)
        .build()
        .unwrap();
    let b = m.allocate_blocks(3).unwrap();
    let text = m.metrics().render_prometheus();
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("valid exposition");
    assert!(!scrape.samples.is_empty());
    let (mut seen_gauge, mut seen_counter) = (false, false);
    for sample in &scrape.samples {
        assert!(sample.metric.starts_with("kvbm_"), "{}", sample.metric);
        assert_eq!(sample.labels.get("tier"), Some("host"), "{}", sample.metric);
        // OpenMetrics names a counter's family without its `_total` suffix.
        assert!(
            scrape
                .docs
                .contains_key(sample.metric.trim_end_matches("_total")),
            "HELP for {}",
            sample.metric
        );
        if sample.metric == "kvbm_pool_blocks" && sample.labels.get("state") == Some("mutable") {
            assert!(matches!(sample.value, Value::Gauge(v) if v == 3.0));
            seen_gauge = true;
        }
        if sample.metric == "kvbm_block_allocations_total"
            && sample.labels.get("source") == Some("reset")
        {
            assert!(
                matches!(sample.value, Value::Counter(v) | Value::Untyped(v) if v == 3.0),
                "{:?}",
                sample.value
            );
            seen_counter = true;
        }
    }
    assert!(seen_gauge && seen_counter);
    drop(b);
}

#[test]
fn a_multi_manager_scrape_has_one_help_and_type_per_family_and_parses() {
    use prometheus_client::registry::Registry;
    let g1 = BlockManager::<Device>::builder()
        .block_count(8)
        .block_size(BS)
        .build()
        .unwrap();
    let g2 = BlockManager::<Host>::builder()
        .block_count(16)
        .block_size(BS)
        .build()
        .unwrap();
    let g2b = BlockManager::<Host>::builder()
        .block_count(4)
        .block_size(BS)
        .build()
        .unwrap();
    let held = g1.allocate_blocks(2).unwrap();
    let collector = kvbm_logical::MetricsCollector::new()
        .with(g1.metrics())
        .with_labels(g2.metrics(), [("tier", "host"), ("pool", "a")])
        .with_labels(g2b.metrics(), [("tier", "host"), ("pool", "b")]);
    assert_eq!(collector.len(), 3);
    // The server's own registry, with its own prefix-free label.
    let mut registry = Registry::default();
    registry
        .sub_registry_with_label(("instance".into(), "srv-1".into()))
        .register_collector(Box::new(collector));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();

    // One HELP and one TYPE line per family.
    let mut helps = std::collections::HashMap::<&str, usize>::new();
    let mut types = std::collections::HashMap::<&str, usize>::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some("#"), Some("HELP"), Some(name)) => *helps.entry(name).or_default() += 1,
            (Some("#"), Some("TYPE"), Some(name)) => *types.entry(name).or_default() += 1,
            _ => {}
        }
    }
    assert!(helps.len() >= 10, "{text}");
    assert!(
        helps.values().chain(types.values()).all(|&n| n == 1),
        "{text}"
    );
    assert_eq!(helps.len(), types.len());

    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("valid exposition");
    let reset = |tier: &str, pool: Option<&str>| {
        scrape
            .samples
            .iter()
            .find(|s| {
                s.metric == "kvbm_pool_blocks"
                    && s.labels.get("state") == Some("reset")
                    && s.labels.get("tier") == Some(tier)
                    && s.labels.get("pool") == pool
            })
            .map(|s| match s.value {
                Value::Gauge(v) => v,
                ref other => panic!("{other:?}"),
            })
    };
    assert_eq!(reset("device", None), Some(6.0));
    assert_eq!(reset("host", Some("a")), Some(16.0));
    assert_eq!(reset("host", Some("b")), Some(4.0));
    assert!(
        scrape
            .samples
            .iter()
            .all(|s| s.labels.get("instance") == Some("srv-1"))
    );
    // Series are unique.
    let mut seen = std::collections::HashSet::new();
    for s in &scrape.samples {
        let mut labels: Vec<_> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        labels.sort();
        assert!(
            seen.insert((s.metric.clone(), labels)),
            "duplicate series {}",
            s.metric
        );
    }
    drop(held);
}

#[test]
fn the_gauges_of_a_snapshot_always_add_up() {
    // The gauges are written together at each release of the store lock and read without
    // it: a reader must see the five of one release, never a mix of two (a scheduler's
    // `free_blocks` check, a Prometheus scrape).
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let m = kvbm_logical::BlockManager::<kvbm_logical::Device>::builder()
        .block_count(64)
        .block_size(4)
        .build()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let churn = std::thread::spawn({
        let (m, stop, rounds) = (m.clone(), Arc::clone(&stop), Arc::clone(&rounds));
        move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                rounds.store(n, Ordering::Relaxed);
                let k = 1 + (n % 7) as usize;
                let blocks = m.allocate_blocks(k).unwrap();
                let staged: Vec<_> = blocks
                    .into_iter()
                    .enumerate()
                    .map(|(i, b)| {
                        b.stage(kvbm_logical::SequenceHash::new(n * 8 + i as u64), 4)
                            .unwrap()
                    })
                    .collect();
                drop(m.register_blocks(staged).unwrap());
                n += 1;
            }
        }
    });
    // While the other thread churns: at least 200,000 reads and 5,000 of its rounds.
    let mut reads = 0u64;
    while reads < 200_000 || rounds.load(Ordering::Relaxed) < 5_000 {
        let s = m.metrics().snapshot();
        let sum = s.reset_blocks + s.inactive_blocks + s.mutable_blocks + s.active_blocks;
        assert_eq!(sum, 64, "{s:?}");
        let (reset, inactive) = m.metrics().free_blocks();
        assert!(reset + inactive <= 64);
        reads += 1;
    }
    stop.store(true, Ordering::Relaxed);
    churn.join().unwrap();
}
