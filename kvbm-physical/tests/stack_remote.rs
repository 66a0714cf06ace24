//! The remote tier in the tier stack, against real `redis-server` processes: a
//! [`RemoteStore`] as a store tier below G2 (probed [`Probe::Deferred`]). Offload from G2
//! through admission; onboarding through plan/commit with every byte checked; two stacks in
//! two processes sharing one namespace; a corrupted value; a value Redis evicted; a Redis
//! killed mid-run and restarted; a 3-master cluster.
//!
//! Uses the stack's public API only (with the shared test helpers' back doors to G2's
//! manager, to evict G2 behind the stack's back).

mod common;
mod redis_support;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    StackOpts, assert_stack_idle, assert_stack_kv, chain, stack_compute, stack_config,
    stack_flush_g1,
};
use kvbm_logical::{BlockManager, Host, ImmutableBlock, SequenceHash};
use kvbm_physical::StoreTier;
use kvbm_physical::remote::{HEADER_BYTES, Namespace, RemoteConfig, RemoteStore};
use kvbm_physical::stack::{
    Admission, EndReason, LostCause, Onboarded, Probe, Skip, StoreTierConfig, TierId, TierStack,
    TierStats,
};
use redis_support::{RedisCluster, RedisServer};

const G1: usize = 8;
const G2: usize = 16;
const REMOTE: TierId = TierId::Store(0);

fn block_bytes() -> usize {
    StackOpts::new(1, 1).block_bytes()
}

/// The namespace every stack of these tests runs (the model name tells the tests apart).
fn namespace(model: &str) -> Namespace {
    Namespace::for_layout(model, &stack_config(1))
}

/// A remote store on `url` with short deadlines and a quick breaker.
fn remote(url: &str, model: &str, cluster: bool) -> Arc<RemoteStore> {
    let config = RemoteConfig::builder(namespace(model), block_bytes())
        .url(url)
        .cluster(cluster)
        .connect_timeout(Duration::from_millis(300))
        .response_timeout(Duration::from_millis(500))
        .breaker(2, Duration::from_millis(20))
        .build()
        .unwrap();
    Arc::new(RemoteStore::open(config).unwrap())
}

/// A G1 + G2 + remote stack; returns it and a back door to G2's manager.
fn stack(store: &Arc<RemoteStore>, admission: Admission) -> (TierStack, BlockManager<Host>) {
    // A remote tier is probed on demand by default (never on the scheduler's thread).
    let cfg = StoreTierConfig::new(Arc::clone(store) as Arc<dyn StoreTier>).admission(admission);
    assert_eq!(cfg.probe_mode(), Probe::Deferred);
    let frequency = matches!(admission, Admission::MinFrequency(_));
    let (t, _, m2) = StackOpts {
        stores: vec![cfg],
        frequency,
        ..StackOpts::new(G1, G2)
    }
    .build();
    (t, m2)
}

fn stat(t: &TierStack, tier: TierId) -> TierStats {
    t.stats().tier(tier).unwrap().clone()
}

/// Evicts every inactive block from G1 and G2 (G2 through the back door).
fn evict_g1_g2(t: &TierStack, m2: &BlockManager<Host>) {
    t.flush();
    stack_flush_g1(t);
    drop(m2.allocate_blocks(m2.available_blocks()).unwrap());
}

/// Computes `hashes` as a chain in G1, releases the handles and waits for the offloads.
fn compute(t: &TierStack, hashes: &[SequenceHash]) {
    ImmutableBlock::release_all(stack_compute(t, hashes, 0));
    t.flush();
}

/// Plans and commits `hashes`; every block served is checked against its hash's bytes.
fn fetch(t: &TierStack, hashes: &[SequenceHash]) -> Onboarded {
    let m = t.onboard(t.lookup(hashes), usize::MAX).unwrap().wait();
    assert_stack_kv(t, &m.blocks);
    for (b, h) in m.blocks.iter().zip(hashes) {
        assert_eq!(b.sequence_hash(), *h);
    }
    m
}

/// A whole chain onboarded from the remote tier through plan/commit (deferred probe): the
/// plan asks Redis nothing, the job fetches every block into G2 and then G1.
fn onboard_all_from_remote(t: &TierStack, hashes: &[SequenceHash]) {
    let before = stat(t, REMOTE).onboarded;
    let plan = t.lookup(hashes);
    assert_eq!(
        (
            plan.len(),
            plan.from_tier(REMOTE),
            plan.unverified(),
            plan.g1_hits()
        ),
        (hashes.len(), hashes.len(), hashes.len(), 0),
        "a deferred remote tier plans the whole chain unverified"
    );
    let m = t.onboard(plan, usize::MAX).unwrap().wait();
    assert!(
        m.end.is_none() && m.lost.is_empty(),
        "{:?} {:?}",
        m.end,
        m.lost
    );
    assert_eq!((m.blocks.len(), m.onboarded), (hashes.len(), hashes.len()));
    assert_stack_kv(t, &m.blocks);
    // Registered in G1 with their parents: the chain matches in G1 now.
    drop(m);
    assert_eq!(t.lookup(hashes).g1_hits(), hashes.len());
    assert_eq!(stat(t, REMOTE).onboarded, before + hashes.len() as u64);
}

#[test]
fn offload_from_g2_then_onboard_through_plan_and_commit() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let store = remote(&server.url(), "stack-remote-basic", false);
    let (t, m2) = stack(&store, Admission::Presence);
    let hs = chain(1, 6);
    compute(&t, &hs);
    // G1 → G2 → Redis: every block is in Redis.
    assert_eq!(store.contains(&hs), vec![true; 6]);
    let s = stat(&t, REMOTE);
    assert_eq!((s.offloaded, s.lost), (6, 0), "{s:?}");
    assert_eq!(s.offloaded_bytes, 6 * block_bytes() as u64);

    evict_g1_g2(&t, &m2);
    assert!(
        hs.iter()
            .all(|&h| !t.g1().contains(h) && !t.g2().contains(h))
    );
    onboard_all_from_remote(&t, &hs);
    // Staged in G2 on the way, and not written back to Redis (it came from there).
    assert!(hs.iter().all(|&h| t.g2().contains(h)));
    let s = stat(&t, REMOTE);
    assert_eq!((s.offloaded, s.skipped_total(), s.lost), (6, 0, 0), "{s:?}");
    assert_eq!(store.remote_stats().store.hits, 6);
    assert_stack_idle(&t);
}

#[test]
fn admission_by_frequency_keeps_cold_blocks_out_of_redis() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let store = remote(&server.url(), "stack-remote-admission", false);
    let (t, _) = stack(&store, Admission::MinFrequency(2));
    let hs = chain(2, 3);
    compute(&t, &hs);
    assert_eq!(store.contains(&hs), vec![false; 3]);
    let s = stat(&t, REMOTE);
    assert_eq!((s.offloaded, s.skipped(Skip::Admission)), (0, 3), "{s:?}");
    assert_eq!(store.remote_stats().store.stored, 0);
    assert_stack_idle(&t);
}

#[test]
fn a_value_redis_evicted_is_a_miss_that_ends_the_prefix() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let store = remote(&server.url(), "stack-remote-evicted", false);
    let (t, m2) = stack(&store, Admission::Presence);
    let hs = chain(3, 4);
    compute(&t, &hs);
    evict_g1_g2(&t, &m2);
    // Redis's own eviction, as far as kvbm can tell.
    let mut raw = server.raw();
    let gone: i64 = redis::cmd("DEL")
        .arg(store.key(hs[2]))
        .query(&mut raw)
        .unwrap();
    assert_eq!(gone, 1);
    let m = fetch(&t, &hs);
    assert_eq!(m.blocks.len(), 2);
    assert!(m.lost.is_empty(), "a miss is not a loss");
    assert_eq!(
        m.end.as_ref().map(|e| (e.at, e.reason.clone())),
        Some((2, EndReason::Miss { tier: REMOTE }))
    );
    assert_eq!(stat(&t, REMOTE).lost, 0);
    drop(m);
    assert_stack_idle(&t);
}

#[test]
fn a_corrupted_value_is_a_miss_invalidated_and_reported() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let store = remote(&server.url(), "stack-remote-corrupt", false);
    let (t, m2) = stack(&store, Admission::Presence);
    let hs = chain(4, 4);
    let other = chain(5, 2);
    compute(&t, &hs);
    compute(&t, &other);
    evict_g1_g2(&t, &m2);

    // Behind kvbm's back: one flipped bit in a block's bytes, and a value that is not ours.
    let mut raw = server.raw();
    let key = store.key(hs[2]);
    let mut value: Vec<u8> = redis::cmd("GET").arg(&key).query(&mut raw).unwrap();
    value[HEADER_BYTES + 100] ^= 0x08;
    let () = redis::cmd("SET")
        .arg(&key)
        .arg(&value)
        .query(&mut raw)
        .unwrap();
    let () = redis::cmd("SET")
        .arg(store.key(other[0]))
        .arg(b"not a kvbm value")
        .query(&mut raw)
        .unwrap();

    let m = fetch(&t, &hs);
    assert_eq!(m.blocks.len(), 2);
    assert_eq!(
        (m.lost[0].hash, m.lost[0].tier, m.lost[0].cause.clone()),
        (hs[2], REMOTE, LostCause::Corrupt)
    );
    assert_eq!(
        m.end.as_ref().map(|e| (e.at, e.reason.clone())),
        Some((2, EndReason::Lost { tier: REMOTE }))
    );
    assert!(!t.g1().contains(hs[2]) && !t.g2().contains(hs[2]));
    drop(m);
    let m = fetch(&t, &other);
    assert!(m.blocks.is_empty());
    assert_eq!(m.lost[0].cause, LostCause::Corrupt);
    drop(m);

    // Both removed from Redis, so never served (nor fetched) again; counted.
    let exists: i64 = redis::cmd("EXISTS")
        .arg(&key)
        .arg(store.key(other[0]))
        .query(&mut raw)
        .unwrap();
    assert_eq!(exists, 0);
    assert_eq!(stat(&t, REMOTE).lost, 2);
    assert_eq!(store.remote_stats().store.corrupt, 2);
    // The intact blocks after the corrupt one are still there for another prefix.
    assert_eq!(store.contains(&hs[3..]), vec![true]);
    assert_stack_idle(&t);
}

#[test]
fn a_killed_redis_turns_into_misses_serving_continues_and_a_restart_resumes() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let store = remote(&server.url(), "stack-remote-kill", false);
    let (t, m2) = stack(&store, Admission::Presence);

    // Up: offloaded and onboarded.
    let before = chain(10, 4);
    compute(&t, &before);
    evict_g1_g2(&t, &m2);
    onboard_all_from_remote(&t, &before);
    evict_g1_g2(&t, &m2);

    server.kill();
    // Down: computing and serving from G1 and G2 go on; offloads to Redis are skipped.
    let during = chain(11, 4);
    let t0 = Instant::now();
    compute(&t, &during);
    stack_flush_g1(&t);
    let m = fetch(&t, &during);
    assert_eq!((m.blocks.len(), m.onboarded), (4, 4), "served from G2");
    drop(m);
    let s = stat(&t, REMOTE);
    assert_eq!(s.offloaded, 4, "only the first chain reached Redis: {s:?}");
    assert_eq!(s.skipped(Skip::Unavailable), 4, "{s:?}");
    // What only Redis had: planned (deferred), then a miss or a loss, never a wrong byte
    // (`fetch` checks every block served).
    evict_g1_g2(&t, &m2);
    for _ in 0..3 {
        let m = fetch(&t, &before);
        assert!(m.blocks.is_empty());
        assert_eq!(m.end.as_ref().map(|e| e.at), Some(0));
        assert!(
            m.lost
                .iter()
                .all(|l| l.tier == REMOTE && matches!(l.cause, LostCause::StoreFailed(_)))
        );
    }
    // Each round trip cost at most its deadline (a refused connection, then an open breaker).
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    let r = store.remote_stats();
    assert!(r.connection_errors >= 1, "{r:?}");
    assert!(r.breaker_opens >= 1, "{r:?}");
    assert!(r.unavailable >= 1, "{r:?}");
    assert_stack_idle(&t);

    // Restarted (empty): service resumes once the breaker lets a probe through.
    server.restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut k = 0;
    let after = loop {
        let hs = chain(20 + k, 4);
        k += 1;
        compute(&t, &hs);
        if store.contains(&hs) == vec![true; 4] {
            break hs;
        }
        assert!(Instant::now() < deadline, "service did not resume");
        evict_g1_g2(&t, &m2);
    };
    evict_g1_g2(&t, &m2);
    onboard_all_from_remote(&t, &after);
    // What the old server held is gone: a miss, not a loss.
    evict_g1_g2(&t, &m2);
    let m = fetch(&t, &before);
    assert!(m.blocks.is_empty() && m.lost.is_empty());
    assert_eq!(
        m.end.as_ref().map(|e| e.reason.clone()),
        Some(EndReason::Miss { tier: REMOTE })
    );
    drop(m);
    assert_stack_idle(&t);
}

#[test]
fn a_cluster_serves_the_stack_across_its_masters() {
    let Some(cluster) = RedisCluster::start() else {
        return;
    };
    let store = remote(&cluster.url(), "stack-remote-cluster", true);
    let (t, m2) = stack(&store, Admission::Presence);
    let hs = chain(40, 12);
    for part in hs.chunks(4) {
        // Chains of 4 (G1 holds 8): each part continues nothing, hashes are distinct.
        compute(&t, part);
    }
    assert_eq!(store.contains(&hs), vec![true; 12]);
    let counts = cluster.key_counts();
    assert_eq!(counts.iter().sum::<u64>(), 12, "{counts:?}");
    assert!(
        counts.iter().filter(|&&c| c > 0).count() >= 2,
        "spread over the masters: {counts:?}"
    );
    for part in hs.chunks(4) {
        evict_g1_g2(&t, &m2);
        onboard_all_from_remote(&t, part);
    }
    assert_eq!(store.remote_stats().redirects, 0);
    assert_stack_idle(&t);
}

// ---- two stacks in two processes ----

const SHARE_MODEL: &str = "stack-remote-share";

/// The second server (run by `two_stacks_in_two_processes_share_one_namespace`; does
/// nothing when run directly).
#[test]
#[ignore = "the second process of two_stacks_in_two_processes_share_one_namespace, which runs it"]
fn second_stack() {
    let Ok(url) = std::env::var("KVBM_STACK_SHARE_URL") else {
        return;
    };
    let store = remote(&url, SHARE_MODEL, false);
    let (t, _) = stack(&store, Admission::Presence);
    // What the first process offloaded, onboarded into this G1, every byte checked.
    onboard_all_from_remote(&t, &chain(60, 6));
    // Offload a chain of its own for the first process.
    compute(&t, &chain(61, 6));
    assert_eq!(stat(&t, REMOTE).offloaded, 6);
    assert_stack_idle(&t);
    println!("second-stack done");
}

#[test]
fn two_stacks_in_two_processes_share_one_namespace() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let store = remote(&server.url(), SHARE_MODEL, false);
    let (t, m2) = stack(&store, Admission::Presence);
    compute(&t, &chain(60, 6));
    assert_eq!(stat(&t, REMOTE).offloaded, 6);

    let output = Command::new(std::env::current_exe().unwrap())
        .args([
            "second_stack",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("KVBM_STACK_SHARE_URL", server.url())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "second stack failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("second-stack done") && stdout.contains("1 passed"),
        "the second stack did not run:\n{stdout}"
    );

    // What the other process offloaded, onboarded here; every byte checked.
    evict_g1_g2(&t, &m2);
    onboard_all_from_remote(&t, &chain(61, 6));
    // Its stack staged chain 60 in its G2 but did not write it back (it came from Redis),
    // and ours has not written chain 61 back: each block is in Redis once.
    assert_eq!(stat(&t, REMOTE).offloaded, 6);
    let keys: i64 = redis::cmd("DBSIZE").query(&mut server.raw()).unwrap();
    assert_eq!(keys, 12);
    assert_stack_idle(&t);
}
