//! The remote tier (G4) against real `redis-server` processes (single node): every byte read
//! back checked, namespaces, values corrupted behind kvbm's back, hostile input, a server that
//! is down, unresponsive, killed mid-run or restarted, authentication and TLS.
//!
//! Each test starts its own server on a free loopback port (see `redis_support`); without
//! `redis-server` they skip, unless `KVBM_REQUIRE_REDIS=1`.

mod redis_support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use kvbm_logical::SequenceHash;
use kvbm_physical::remote::{
    BreakerState, HEADER_BYTES, Namespace, RemoteConfig, RemoteConfigBuilder, RemoteStore,
    encode_value,
};
use kvbm_physical::{GetOutcome, PutOutcome, SkipReason, StoreBlock, StoreError, StoreTier};
use redis_support::{Options, RedisServer, pattern};

/// 64 KiB: large enough that block payloads are written straight from the caller's buffer.
const BB: usize = 64 << 10;

fn builder(url: &str, ns: Namespace, block_bytes: usize) -> RemoteConfigBuilder {
    RemoteConfig::builder(ns, block_bytes)
        .url(url)
        .connect_timeout(Duration::from_millis(500))
        .response_timeout(Duration::from_secs(2))
}

fn open(url: &str, ns: Namespace, block_bytes: usize) -> RemoteStore {
    RemoteStore::open(builder(url, ns, block_bytes).build().unwrap()).unwrap()
}

/// [`open`] as ACL user `user` with password `password`.
fn open_as(url: &str, ns: Namespace, user: &str, password: &str) -> RemoteStore {
    RemoteStore::open(
        builder(url, ns, BB)
            .username(user)
            .password(password)
            .build()
            .unwrap(),
    )
    .unwrap()
}

/// A chain of `n` blocks: (hash, parent, bytes), hashes and bytes derived from `seed`.
fn chain(
    seed: u64,
    n: usize,
    block_bytes: usize,
) -> Vec<(SequenceHash, Option<SequenceHash>, Vec<u8>)> {
    let mut parent = None;
    (0..n)
        .map(|i| {
            let h = SequenceHash::new(seed.wrapping_mul(1_000_003) ^ (i as u64 + 1) << 8);
            let b = (h, parent, pattern(h.as_u64() ^ seed, block_bytes));
            parent = Some(h);
            b
        })
        .collect()
}

fn put(
    store: &RemoteStore,
    blocks: &[(SequenceHash, Option<SequenceHash>, Vec<u8>)],
) -> Vec<PutOutcome> {
    let b: Vec<StoreBlock<'_>> = blocks
        .iter()
        .map(|(hash, parent, bytes)| StoreBlock {
            hash: *hash,
            parent: *parent,
            bytes,
        })
        .collect();
    store.put(&b)
}

/// Gets every hash; returns outcomes and buffers.
fn get(store: &RemoteStore, hashes: &[SequenceHash]) -> (Vec<GetOutcome>, Vec<Vec<u8>>) {
    let mut bufs = vec![vec![0u8; store.block_bytes()]; hashes.len()];
    let mut out: Vec<&mut [u8]> = bufs.iter_mut().map(Vec::as_mut_slice).collect();
    let outcomes = store.get(hashes, &mut out);
    (outcomes, bufs)
}

/// Every block is a hit with its parent and exactly its bytes.
fn assert_all_served(
    store: &RemoteStore,
    blocks: &[(SequenceHash, Option<SequenceHash>, Vec<u8>)],
) {
    let hashes: Vec<_> = blocks.iter().map(|b| b.0).collect();
    let (outcomes, bufs) = get(store, &hashes);
    for (i, (h, parent, bytes)) in blocks.iter().enumerate() {
        assert_eq!(
            outcomes[i],
            GetOutcome::Hit { parent: *parent },
            "block {i} ({h})"
        );
        assert!(bufs[i] == *bytes, "block {i} ({h}): wrong bytes");
    }
}

fn hashes(blocks: &[(SequenceHash, Option<SequenceHash>, Vec<u8>)]) -> Vec<SequenceHash> {
    blocks.iter().map(|b| b.0).collect()
}

#[test]
fn round_trip_every_byte_parent_present_remove() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    // 64 KiB blocks (direct writes) and an odd small size (copied into the send buffer).
    for (bb, n) in [(BB, 40), (1000, 300)] {
        let store = open(&server.url(), Namespace::new("round-trip", bb as u64), bb);
        let blocks = chain(7, n, bb);
        assert!(
            put(&store, &blocks)
                .iter()
                .all(|o| *o == PutOutcome::Stored)
        );
        let mut probe = hashes(&blocks);
        probe.push(SequenceHash::new(0xdead_beef));
        let mut expected = vec![true; n];
        expected.push(false);
        assert_eq!(store.contains(&probe), expected);
        assert_all_served(&store, &blocks);

        // Written once: a second put of the same hashes is `Present`, not rewritten.
        assert!(
            put(&store, &blocks)
                .iter()
                .all(|o| *o == PutOutcome::Present)
        );

        // Remove every other block.
        let removed: Vec<_> = blocks.iter().step_by(2).map(|b| b.0).collect();
        store.remove(&removed);
        let present = store.contains(&hashes(&blocks));
        for (i, p) in present.iter().enumerate() {
            assert_eq!(*p, i % 2 == 1, "block {i}");
        }
        let (outcomes, _) = get(&store, &removed);
        assert!(outcomes.iter().all(|o| *o == GetOutcome::Miss));

        let s = store.remote_stats();
        assert_eq!(s.store.stored, n as u64);
        assert_eq!(s.present, n as u64);
        assert_eq!(s.store.hits, n as u64);
        assert_eq!(s.store.misses, removed.len() as u64);
        assert_eq!(s.store.bytes_written, (n * bb) as u64);
        assert_eq!(s.store.bytes_read, (n * bb) as u64);
        assert_eq!(
            (s.store.failed, s.store.skipped, s.store.corrupt),
            (0, 0, 0)
        );
        assert_eq!(
            s.connections, 1,
            "one pooled connection serves sequential calls"
        );
    }
}

#[test]
fn namespaces_are_isolated_on_one_server() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let base = Namespace::new("model-a", 1);
    let variants = [
        Namespace::new("model-b", 1),
        Namespace::new("model-a", 2),
        Namespace::new("model-a", 1).with_hash_spec(9),
        Namespace::new("model-a", 1).with_prefix("tenant2"),
        // Same shape, another element type (bf16 and fp16 are both 2 bytes).
        Namespace::new("model-a", 1).with_dtype("fp16"),
        // Tensor-parallel ranks: the same layout, other heads.
        Namespace::new("model-a", 1).with_shard(1, 2),
        Namespace::new("model-a", 1).with_shard(0, 2),
    ];
    let a = open(&server.url(), base, BB);
    let blocks_a = chain(1, 8, BB);
    assert!(put(&a, &blocks_a).iter().all(|o| *o == PutOutcome::Stored));
    for (k, ns) in variants.into_iter().enumerate() {
        let other = open(&server.url(), ns, BB);
        // The same hashes are unknown there...
        assert_eq!(other.contains(&hashes(&blocks_a)), vec![false; 8]);
        let (outcomes, _) = get(&other, &hashes(&blocks_a));
        assert!(
            outcomes.iter().all(|o| *o == GetOutcome::Miss),
            "{outcomes:?}"
        );
        // ...and writing them there (other bytes) changes nothing for `a`.
        let blocks_b = chain(1, 8, BB)
            .into_iter()
            .map(|(h, p, _)| (h, p, pattern(h.as_u64() ^ 0xbbbb ^ k as u64, BB)))
            .collect::<Vec<_>>();
        assert!(
            put(&other, &blocks_b)
                .iter()
                .all(|o| *o == PutOutcome::Stored)
        );
        assert_all_served(&other, &blocks_b);
        assert_all_served(&a, &blocks_a);
        other.remove(&hashes(&blocks_b));
        assert_all_served(&a, &blocks_a);
    }
}

#[test]
fn idle_connections_the_server_closed_are_dropped_not_failed() {
    // Redis's `timeout` (or a proxy's idle limit, or a restart while idle) closes pooled
    // connections behind the client's back. The next batch must not fail on them, nor count
    // them against the node's breaker: 4 threads at once, each on a pooled connection.
    let Some(server) = RedisServer::start() else {
        return;
    };
    let store = Arc::new(open(&server.url(), Namespace::new("idle", 1), BB));
    let blocks = Arc::new(chain(21, 16, BB));
    let barrier = Arc::new(Barrier::new(4));
    let round = |store: &Arc<RemoteStore>| {
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let (store, blocks, barrier) =
                    (Arc::clone(store), Arc::clone(&blocks), Arc::clone(&barrier));
                std::thread::spawn(move || {
                    barrier.wait();
                    let mine = &blocks[t * 4..t * 4 + 4];
                    let _ = put(&store, mine);
                    assert_all_served(&store, mine);
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    };
    round(&store); // the pool now holds several connections
    let opened = store.remote_stats().connections;
    assert!(opened >= 2, "{opened}");
    let ok = server.cli(&["CONFIG", "SET", "timeout", "1"]);
    assert!(ok.status.success());
    std::thread::sleep(Duration::from_millis(2500)); // the server closes them
    round(&store);
    let s = store.remote_stats();
    assert_eq!(
        (s.connection_errors, s.breaker_opens, s.store.failed),
        (0, 0, 0),
        "{s:?}"
    );
    assert!(s.stale_connections >= 1, "{s:?}");
    assert!(
        s.connections > opened,
        "fresh connections replaced them: {s:?}"
    );
}

#[test]
fn a_shard_or_dtype_that_cannot_be_in_a_key_is_a_config_error() {
    for ns in [
        Namespace::new("m", 1).with_shard(2, 2),
        Namespace::new("m", 1).with_shard(0, 0),
        Namespace::new("m", 1).with_dtype(""),
        Namespace::new("m", 1).with_dtype("bf:16"),
    ] {
        let err = builder("redis://127.0.0.1:1", ns.clone(), BB)
            .build()
            .unwrap_err();
        assert!(
            matches!(err, kvbm_physical::remote::ConfigError::Namespace { .. }),
            "{ns:?}: {err}"
        );
    }
    assert!(
        builder(
            "redis://127.0.0.1:1",
            Namespace::new("m", 1).with_shard(1, 2).with_dtype("bf16"),
            BB
        )
        .build()
        .is_ok()
    );
}

#[test]
fn values_corrupted_behind_kvbms_back_are_misses_and_removed() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let ns = Namespace::new("corrupt", 3);
    let store = open(&server.url(), ns.clone(), BB);
    let blocks = chain(3, 9, BB);
    assert!(
        put(&store, &blocks)
            .iter()
            .all(|o| *o == PutOutcome::Stored)
    );
    let key = |i: usize| store.key(blocks[i].0);
    let key_str = |i: usize| String::from_utf8(key(i)).unwrap();
    let mut raw = server.raw();
    let raw_get = |raw: &mut redis::Connection, k: &[u8]| -> Vec<u8> {
        redis::cmd("GET").arg(k).query(raw).unwrap()
    };
    let raw_set = |raw: &mut redis::Connection, k: &[u8], v: &[u8]| {
        let () = redis::cmd("SET").arg(k).arg(v).query(raw).unwrap();
    };

    // 0: garbage, with redis-cli.
    let out = server.cli(&["SET", &key_str(0), "garbage"]);
    assert!(out.status.success());
    // 1: one flipped bit in the block.
    let mut v = raw_get(&mut raw, &key(1));
    v[HEADER_BYTES + BB / 2] ^= 0x10;
    raw_set(&mut raw, &key(1), &v);
    // 2: one flipped bit in the header's parent field.
    let mut v = raw_get(&mut raw, &key(2));
    v[17] ^= 1;
    raw_set(&mut raw, &key(2), &v);
    // 3: a valid value of another namespace (fingerprint) under this key.
    let other = encode_value(
        &Namespace::new("corrupt", 4),
        blocks[3].0,
        blocks[3].1,
        &blocks[3].2,
    );
    raw_set(&mut raw, &key(3), &other);
    // 4: block 5's value (another hash) under block 4's key, with redis-cli -x (binary-safe).
    let v5 = raw_get(&mut raw, &key(5));
    let out = server.cli_stdin(&["SET", &key_str(4)], &v5);
    assert!(out.status.success());
    // 6: a value of another type.
    let () = redis::cmd("DEL").arg(key(6)).query(&mut raw).unwrap();
    let _: i64 = redis::cmd("LPUSH")
        .arg(key(6))
        .arg("x")
        .query(&mut raw)
        .unwrap();
    // 7: truncated by one byte; 8: one byte longer.
    let v = raw_get(&mut raw, &key(7));
    raw_set(&mut raw, &key(7), &v[..v.len() - 1]);
    let mut v = raw_get(&mut raw, &key(8));
    v.push(0);
    raw_set(&mut raw, &key(8), &v);

    let (outcomes, _) = get(&store, &hashes(&blocks));
    for (i, o) in outcomes.iter().enumerate() {
        if i == 5 {
            assert_eq!(
                *o,
                GetOutcome::Hit {
                    parent: blocks[5].1
                }
            );
        } else {
            assert_eq!(*o, GetOutcome::Corrupt, "block {i}");
        }
    }
    assert_eq!(store.stats().corrupt, 8);
    // Removed: never retried, and a fresh put stores it again.
    let present = store.contains(&hashes(&blocks));
    assert_eq!(present, (0..9).map(|i| i == 5).collect::<Vec<_>>());
    let (again, _) = get(&store, &hashes(&blocks));
    assert_eq!(again.iter().filter(|o| **o == GetOutcome::Miss).count(), 8);
    let fresh: Vec<_> = blocks
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 5)
        .map(|(_, b)| b.clone())
        .collect();
    assert!(put(&store, &fresh).iter().all(|o| *o == PutOutcome::Stored));
    assert_all_served(&store, &blocks);
}

#[test]
fn a_value_of_another_format_version_is_a_miss_left_in_place() {
    // During a rolling upgrade, servers of two kvbm releases may share a namespace: neither
    // may remove the other's values (they would wipe each other's blocks for the fleet).
    let Some(server) = RedisServer::start() else {
        return;
    };
    let store = open(&server.url(), Namespace::new("version", 1), BB);
    let blocks = chain(4, 2, BB);
    assert!(
        put(&store, &blocks)
            .iter()
            .all(|o| *o == PutOutcome::Stored)
    );
    let mut raw = server.raw();
    let key = store.key(blocks[0].0);
    let mut v: Vec<u8> = redis::cmd("GET").arg(&key).query(&mut raw).unwrap();
    v[4..6].copy_from_slice(&2u16.to_le_bytes()); // the next release's format
    let () = redis::cmd("SET").arg(&key).arg(&v).query(&mut raw).unwrap();
    let (outcomes, _) = get(&store, &hashes(&blocks));
    assert_eq!(outcomes[0], GetOutcome::Miss);
    assert!(outcomes[1].is_hit());
    assert_eq!(store.stats().corrupt, 0);
    let still: Vec<u8> = redis::cmd("GET").arg(&key).query(&mut raw).unwrap();
    assert_eq!(still, v, "left where it was");
}

#[test]
fn hostile_input_wrong_sizes_and_huge_batches() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let store = open(&server.url(), Namespace::new("hostile", 5), BB);
    let good = pattern(1, BB);
    let short = vec![1u8; BB - 1];
    let long = vec![2u8; BB + 1];
    let h = SequenceHash::new;
    let outcomes = store.put(&[
        StoreBlock {
            hash: h(1),
            parent: None,
            bytes: &short,
        },
        StoreBlock {
            hash: h(2),
            parent: None,
            bytes: &good,
        },
        StoreBlock {
            hash: h(3),
            parent: None,
            bytes: &long,
        },
        StoreBlock {
            hash: h(4),
            parent: None,
            bytes: &[],
        },
        StoreBlock {
            hash: h(2),
            parent: None,
            bytes: &good,
        },
    ]);
    assert_eq!(
        outcomes,
        vec![
            PutOutcome::Failed(StoreError::BufferSize {
                expected: BB,
                actual: BB - 1
            }),
            PutOutcome::Stored,
            PutOutcome::Failed(StoreError::BufferSize {
                expected: BB,
                actual: BB + 1
            }),
            PutOutcome::Failed(StoreError::BufferSize {
                expected: BB,
                actual: 0
            }),
            PutOutcome::Present,
        ]
    );
    // Refused blocks left nothing behind.
    assert_eq!(
        store.contains(&[h(1), h(2), h(3), h(4)]),
        vec![false, true, false, false]
    );

    // Wrong output buffers: refused per hash; the others are served.
    let mut small = vec![0u8; 10];
    let mut ok1 = vec![0u8; BB];
    let mut ok2 = vec![0u8; BB];
    let outcomes = store.get(
        &[h(2), h(2), h(2), h(9)],
        &mut [&mut ok1, &mut small, &mut ok2],
    );
    assert_eq!(outcomes[0], GetOutcome::Hit { parent: None });
    assert_eq!(
        outcomes[1],
        GetOutcome::Failed(StoreError::BufferSize {
            expected: BB,
            actual: 10
        })
    );
    assert_eq!(outcomes[2], GetOutcome::Hit { parent: None });
    // No buffer at all for the last hash.
    assert_eq!(
        outcomes[3],
        GetOutcome::Failed(StoreError::BufferSize {
            expected: BB,
            actual: 0
        })
    );
    assert!(ok1 == good && ok2 == good);
    // More buffers than hashes: the extra ones are untouched.
    let mut spare = vec![7u8; BB];
    let outcomes = store.get(&[h(2)], &mut [&mut ok1, &mut spare]);
    assert_eq!(outcomes, vec![GetOutcome::Hit { parent: None }]);
    assert!(spare.iter().all(|&b| b == 7));

    // Empty batches.
    assert!(store.contains(&[]).is_empty());
    assert!(store.put(&[]).is_empty());
    assert!(store.get(&[], &mut []).is_empty());
    store.remove(&[]);

    // Huge batches: 100 000 presence checks in one call; 5000 small blocks through put, get
    // and remove (many round trips each, all verified).
    let many: Vec<SequenceHash> = (0..100_000u64).map(|i| h(i << 20 | 0xabc)).collect();
    assert!(store.contains(&many).iter().all(|p| !p));
    let tiny = open(&server.url(), Namespace::new("hostile-tiny", 6), 64);
    let blocks = chain(11, 5000, 64);
    assert!(put(&tiny, &blocks).iter().all(|o| *o == PutOutcome::Stored));
    assert_all_served(&tiny, &blocks);
    tiny.remove(&hashes(&blocks));
    assert!(tiny.contains(&hashes(&blocks)).iter().all(|p| !p));
    assert!(tiny.remote_stats().round_trips > 5000 / 16);
}

#[test]
fn a_server_that_is_down_gives_quick_misses_and_skips() {
    let Some(_server) = RedisServer::start() else {
        return;
    };
    // A port nothing listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let store = RemoteStore::open(
        builder(
            &format!("redis://127.0.0.1:{port}"),
            Namespace::new("down", 1),
            BB,
        )
        .breaker(2, Duration::from_secs(3600))
        .build()
        .unwrap(),
    )
    .unwrap();
    let blocks = chain(1, 4, BB);
    for round in 0..5 {
        let outcomes = put(&store, &blocks);
        assert!(
            outcomes
                .iter()
                .all(|o| *o == PutOutcome::Skipped(SkipReason::Unavailable)),
            "{outcomes:?}"
        );
        assert_eq!(store.contains(&hashes(&blocks)), vec![false; 4]);
        let (outcomes, _) = get(&store, &hashes(&blocks));
        assert!(
            outcomes.iter().all(|o| !o.is_hit()),
            "round {round}: {outcomes:?}"
        );
    }
    let s = store.remote_stats();
    // Two refused connections opened the breaker; everything after was answered without I/O.
    assert_eq!(s.connection_errors, 2);
    assert_eq!(s.breaker_opens, 1);
    assert_eq!(s.connections, 0);
    assert_eq!(s.store.skipped, 20);
    assert_eq!(s.unavailable, 5 * 12 - 2 * 4);
    assert_eq!(store.node_states()[0].1, BreakerState::Open);
}

#[test]
fn a_server_that_trickles_its_reply_is_cut_off_at_the_deadline() {
    // A node that sends a byte just within each read's timeout (swapping, a fork for a save,
    // a lossy link) must not hold a worker for minutes: the deadline bounds the round trip.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut c, _) = listener.accept().unwrap();
        let mut buf = [0u8; 4096];
        let _ = c.read(&mut buf).unwrap(); // PING
        c.write_all(b"+PONG\r\n").unwrap();
        let _ = c.read(&mut buf).unwrap(); // the GET
        // A value of header + 4 KiB, 16 bytes every 100 ms: 26 s in all.
        let _ = c.write_all(format!("${}\r\n", HEADER_BYTES + 4096).as_bytes());
        for _ in 0..(HEADER_BYTES + 4096) / 16 {
            if c.write_all(&[0u8; 16]).is_err() {
                return; // the client gave up
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let timeout = Duration::from_millis(400);
    let store = RemoteStore::open(
        RemoteConfig::builder(Namespace::new("trickle", 1), 4096)
            .url(format!("redis://127.0.0.1:{port}"))
            .connect_timeout(timeout)
            .response_timeout(timeout)
            .build()
            .unwrap(),
    )
    .unwrap();
    let t = Instant::now();
    let mut out = vec![0u8; 4096];
    let got = store.get(&[SequenceHash::new(1)], &mut [&mut out[..]]);
    let took = t.elapsed();
    assert!(
        matches!(&got[0], GetOutcome::Failed(StoreError::Timeout(_))),
        "{got:?}"
    );
    assert!(took < Duration::from_secs(5), "the get took {took:?}");
    assert_eq!(store.remote_stats().timeouts, 1);
    server.join().unwrap();
}

#[test]
fn an_unresponsive_server_costs_at_most_the_deadline() {
    let Some(_server) = RedisServer::start() else {
        return;
    };
    // Accepts connections and never answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let stop = Arc::new(AtomicBool::new(false));
    let held = std::thread::spawn({
        let stop = Arc::clone(&stop);
        move || {
            let mut conns = Vec::new();
            listener.set_nonblocking(false).unwrap();
            for c in listener.incoming() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                conns.push(c);
            }
        }
    });
    let deadline = Duration::from_millis(200);
    let store = RemoteStore::open(
        RemoteConfig::builder(Namespace::new("black-hole", 1), BB)
            .url(format!("redis://127.0.0.1:{port}"))
            .connect_timeout(deadline)
            .response_timeout(deadline)
            .breaker(2, Duration::from_secs(3600))
            .build()
            .unwrap(),
    )
    .unwrap();
    let blocks = chain(2, 8, BB);
    let mut worst = Duration::ZERO;
    for _ in 0..4 {
        let t = Instant::now();
        let (outcomes, _) = get(&store, &hashes(&blocks));
        worst = worst.max(t.elapsed());
        assert!(outcomes.iter().all(|o| !o.is_hit()));
        let t = Instant::now();
        assert!(
            put(&store, &blocks)
                .iter()
                .all(|o| *o == PutOutcome::Skipped(SkipReason::Unavailable))
        );
        worst = worst.max(t.elapsed());
    }
    let s = store.remote_stats();
    assert_eq!(s.timeouts, 2, "{s:?}");
    assert_eq!(s.breaker_opens, 1);
    // A deadline, not a speed: without one this would wait forever. Generous for a loaded
    // machine, far below "stalled".
    assert!(
        worst < deadline * 10,
        "a call took {worst:?} with a {deadline:?} deadline"
    );
    stop.store(true, Ordering::Relaxed);
    // Wake the acceptor so that it sees `stop`.
    let _ = std::net::TcpStream::connect(("127.0.0.1", port));
    held.join().unwrap();
}

#[test]
fn killed_mid_run_no_wrong_byte_then_restart_resumes() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    const THREADS: usize = 4;
    let store = Arc::new(
        RemoteStore::open(
            builder(&server.url(), Namespace::new("kill", 1), BB)
                .connect_timeout(Duration::from_millis(300))
                .response_timeout(Duration::from_millis(300))
                .breaker(2, Duration::from_millis(20))
                .build()
                .unwrap(),
        )
        .unwrap(),
    );
    let phase = Arc::new(Barrier::new(THREADS + 1));
    let served = Arc::new(AtomicU64::new(0));
    let worst_ms = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (store, phase, served, worst_ms) = (
                Arc::clone(&store),
                Arc::clone(&phase),
                Arc::clone(&served),
                Arc::clone(&worst_ms),
            );
            std::thread::spawn(move || {
                // Each step writes a fresh 4-block chain and reads back everything written so
                // far; every hit is checked byte for byte.
                type Chain = Vec<(SequenceHash, Option<SequenceHash>, Vec<u8>)>;
                let mut written: Chain = Vec::new();
                let step = |written: &mut Chain, seed: u64| -> (usize, usize) {
                    let blocks = chain(seed, 4, BB);
                    let t0 = Instant::now();
                    let stored = put(&store, &blocks)
                        .iter()
                        .filter(|o| **o == PutOutcome::Stored)
                        .count();
                    written.extend(blocks);
                    let (outcomes, bufs) = get(&store, &hashes(written));
                    let ms = t0.elapsed().as_millis() as u64;
                    worst_ms.fetch_max(ms, Ordering::Relaxed);
                    let mut hits = 0;
                    for (i, o) in outcomes.iter().enumerate() {
                        if let GetOutcome::Hit { parent } = o {
                            assert_eq!(*parent, written[i].1);
                            assert!(bufs[i] == written[i].2, "wrong bytes served");
                            hits += 1;
                        }
                    }
                    served.fetch_add(hits as u64, Ordering::Relaxed);
                    (stored, hits)
                };
                let seed = |k: u64| (t as u64) << 32 | k;
                // Phase 1: the server is up; everything is stored and served.
                for k in 0..5 {
                    let (stored, hits) = step(&mut written, seed(k));
                    assert_eq!(stored, 4);
                    assert_eq!(hits, 4 * (k as usize + 1));
                }
                phase.wait(); // the main thread kills the server
                phase.wait();
                // Phase 2: down. Nothing stored or served, nothing wrong, no error.
                for k in 5..10 {
                    let (stored, hits) = step(&mut written, seed(k));
                    assert_eq!((stored, hits), (0, 0));
                }
                phase.wait(); // the main thread restarts it (empty)
                phase.wait();
                // Phase 3: service resumes (after the breaker's cool-down, within a deadline).
                written.clear();
                let until = Instant::now() + Duration::from_secs(20);
                let mut k = 10;
                loop {
                    let (stored, hits) = step(&mut written, seed(k));
                    k += 1;
                    if stored == 4 && hits >= 4 {
                        break;
                    }
                    assert!(Instant::now() < until, "service did not resume");
                }
            })
        })
        .collect();
    phase.wait();
    server.kill();
    phase.wait();
    phase.wait();
    server.restart();
    phase.wait();
    for w in workers {
        w.join().unwrap();
    }
    let s = store.remote_stats();
    assert!(s.store.skipped >= (THREADS * 5 * 4) as u64, "{s:?}");
    assert!(s.breaker_opens >= 1 && s.unavailable > 0, "{s:?}");
    assert!(s.connection_errors + s.timeouts > 0, "{s:?}");
    assert!(served.load(Ordering::Relaxed) >= (THREADS * (1 + 2 + 3 + 4 + 5) * 4) as u64);
    assert_eq!(store.node_states()[0].1, BreakerState::Closed);
    // Each call's wait is bounded by the deadlines (connect 300 ms + response 300 ms per
    // call); generous for a loaded machine.
    let worst = worst_ms.load(Ordering::Relaxed);
    assert!(worst < 5_000, "a step took {worst} ms");
}

#[test]
fn restart_of_redis_resumes_service_and_lost_keys_are_misses() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let store = RemoteStore::open(
        builder(&server.url(), Namespace::new("restart", 1), BB)
            .breaker(1, Duration::from_millis(10))
            .build()
            .unwrap(),
    )
    .unwrap();
    let before = chain(1, 6, BB);
    assert!(
        put(&store, &before)
            .iter()
            .all(|o| *o == PutOutcome::Stored)
    );
    server.kill();
    assert!(
        put(&store, &chain(2, 3, BB))
            .iter()
            .all(|o| *o == PutOutcome::Skipped(SkipReason::Unavailable))
    );
    let (outcomes, _) = get(&store, &hashes(&before));
    assert!(outcomes.iter().all(|o| !o.is_hit()));
    server.restart();
    // The breaker lets a probe through once its cool-down has passed; retry until then.
    let after = chain(3, 6, BB);
    let until = Instant::now() + Duration::from_secs(20);
    while put(&store, &after[..1]) != vec![PutOutcome::Stored] {
        assert!(Instant::now() < until, "service did not resume");
    }
    assert!(
        put(&store, &after[1..])
            .iter()
            .all(|o| *o == PutOutcome::Stored)
    );
    assert_all_served(&store, &after);
    // The restarted server is empty: the old blocks are plain misses.
    let (outcomes, _) = get(&store, &hashes(&before));
    assert!(outcomes.iter().all(|o| *o == GetOutcome::Miss));
    assert!(store.remote_stats().breaker_opens >= 1);
}

#[test]
fn password_and_acl_user_and_secrets_never_printed() {
    const PW: &str = "pw-secret-1";
    const ALICE_PW: &str = "pw-secret-2";
    let Some(server) = RedisServer::start_with(Options {
        password: Some(PW.to_owned()),
        acl_user: Some(("alice".to_owned(), ALICE_PW.to_owned())),
        ..Options::default()
    }) else {
        return;
    };
    let port = server.port;
    let blocks = chain(4, 3, BB);
    let ns = || Namespace::new("auth", 1);
    // Password in the URL; ACL user by setters.
    let by_url = open(&format!("redis://:{PW}@127.0.0.1:{port}"), ns(), BB);
    assert!(
        put(&by_url, &blocks)
            .iter()
            .all(|o| *o == PutOutcome::Stored)
    );
    let alice = open_as(&server.url(), ns(), "alice", ALICE_PW);
    assert_all_served(&alice, &blocks);

    // Without a password, or with a wrong one: misses and skips, never an error or a panic.
    for bad in [
        builder(&server.url(), ns(), BB),
        builder(&server.url(), ns(), BB).password("wrong-pw-3"),
        builder(
            &format!("redis://alice:wrong-pw-3@127.0.0.1:{port}"),
            ns(),
            BB,
        ),
    ] {
        let store =
            RemoteStore::open(bad.breaker(100, Duration::from_secs(1)).build().unwrap()).unwrap();
        assert_eq!(store.contains(&hashes(&blocks)), vec![false; 3]);
        let outcomes = put(&store, &chain(5, 2, BB));
        assert!(
            outcomes
                .iter()
                .all(|o| *o == PutOutcome::Skipped(SkipReason::Unavailable)),
            "{outcomes:?}"
        );
        let (outcomes, _) = get(&store, &hashes(&blocks));
        assert!(outcomes.iter().all(|o| !o.is_hit()));
        let shown = format!("{store:?} {outcomes:?} {:?}", store.config());
        for o in &outcomes {
            if let GetOutcome::Failed(e) = o {
                assert!(!e.to_string().contains("wrong-pw-3"));
            }
        }
        assert!(!shown.contains("wrong-pw-3"), "{shown}");
        assert!(store.remote_stats().connection_errors > 0);
    }
    let shown = format!(
        "{by_url:?} {alice:?} {:?} {:?}",
        by_url.config(),
        alice.config()
    );
    assert!(!shown.contains(PW) && !shown.contains(ALICE_PW), "{shown}");
}

#[test]
fn a_server_that_refuses_a_read_keeps_the_block() {
    // A GET refused for a reason that says nothing about the value (an ACL without GET
    // here): a transient failure, so the tier stack does not remove the shared key for
    // every server; the block is served again once the read is allowed.
    let Some(server) = RedisServer::start() else {
        return;
    };
    let out = server.cli(&[
        "ACL",
        "SETUSER",
        "noget",
        "on",
        ">pw-noget",
        "~*",
        "+@all",
        "-get",
    ]);
    assert!(out.status.success(), "{out:?}");
    let blocks = chain(11, 3, BB);
    let ns = || Namespace::new("refused", 1);
    let owner = open(&server.url(), ns(), BB);
    assert!(
        put(&owner, &blocks)
            .iter()
            .all(|o| *o == PutOutcome::Stored)
    );
    let refused = open_as(&server.url(), ns(), "noget", "pw-noget");
    let (outcomes, _) = get(&refused, &hashes(&blocks));
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, GetOutcome::Failed(e) if e.is_transient())),
        "{outcomes:?}"
    );
    assert_all_served(&owner, &blocks);
}

#[test]
fn a_server_that_refuses_a_write_skips_it() {
    // A SET refused for a reason that says nothing about the block (an ACL without SET
    // here; MISCONF or READONLY alike): skipped as unavailable, not a failure (the block was
    // not lost: the stack still holds it in G2).
    let Some(server) = RedisServer::start() else {
        return;
    };
    let out = server.cli(&[
        "ACL",
        "SETUSER",
        "noset",
        "on",
        ">pw-noset",
        "~*",
        "+@all",
        "-set",
    ]);
    assert!(out.status.success(), "{out:?}");
    let blocks = chain(12, 3, BB);
    let refused = open_as(
        &server.url(),
        Namespace::new("refused-set", 1),
        "noset",
        "pw-noset",
    );
    assert_eq!(
        put(&refused, &blocks),
        vec![PutOutcome::Skipped(SkipReason::Unavailable); 3]
    );
    let s = refused.remote_stats();
    assert_eq!(
        (s.store.failed, s.store.skipped, s.breaker_opens),
        (0, 3, 0)
    );
    assert_eq!((s.refused_writes, s.refusal_warnings), (3, 1));
    assert_eq!(refused.contains(&hashes(&blocks)), vec![false; 3]);
    // A refusing server refuses every put: counted, but warned about once per interval.
    for _ in 0..5 {
        put(&refused, &blocks);
    }
    let s = refused.remote_stats();
    assert_eq!((s.refused_writes, s.refusal_warnings), (18, 1));
}

#[test]
fn tls_with_a_private_ca() {
    let Some(server) = RedisServer::start_with(Options {
        tls: true,
        ..Options::default()
    }) else {
        return;
    };
    let blocks = chain(6, 5, BB);
    let store = RemoteStore::open(
        builder(&server.url(), Namespace::new("tls", 1), BB)
            .tls_ca_pem(server.ca_pem())
            .build()
            .unwrap(),
    )
    .unwrap();
    assert!(
        put(&store, &blocks)
            .iter()
            .all(|o| *o == PutOutcome::Stored)
    );
    assert_all_served(&store, &blocks);
    // The server's certificate is not signed by a system root: refused, quietly.
    let untrusted = open(&server.url(), Namespace::new("tls", 1), BB);
    let (outcomes, _) = get(&untrusted, &hashes(&blocks));
    assert!(outcomes.iter().all(|o| !o.is_hit()));
    assert!(untrusted.remote_stats().connection_errors > 0);
    // Plain TCP to a TLS port: no answer that verifies.
    let plain = RemoteStore::open(
        builder(
            &format!("redis://127.0.0.1:{}", server.port),
            Namespace::new("tls", 1),
            BB,
        )
        .response_timeout(Duration::from_millis(300))
        .connect_timeout(Duration::from_millis(300))
        .build()
        .unwrap(),
    )
    .unwrap();
    let (outcomes, _) = get(&plain, &hashes(&blocks));
    assert!(outcomes.iter().all(|o| !o.is_hit()));
}

#[test]
fn ttl_is_set_when_configured() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let store = RemoteStore::open(
        builder(&server.url(), Namespace::new("ttl", 1), BB)
            .ttl(Some(Duration::from_secs(60)))
            .build()
            .unwrap(),
    )
    .unwrap();
    let blocks = chain(8, 2, BB);
    assert!(
        put(&store, &blocks)
            .iter()
            .all(|o| *o == PutOutcome::Stored)
    );
    let mut raw = server.raw();
    for b in &blocks {
        let pttl: i64 = redis::cmd("PTTL")
            .arg(store.key(b.0))
            .query(&mut raw)
            .unwrap();
        assert!(pttl > 0 && pttl <= 60_000, "{pttl}");
    }
    // Without a TTL, keys do not expire.
    let plain = open(&server.url(), Namespace::new("ttl", 2), BB);
    assert!(
        put(&plain, &blocks)
            .iter()
            .all(|o| *o == PutOutcome::Stored)
    );
    let pttl: i64 = redis::cmd("PTTL")
        .arg(plain.key(blocks[0].0))
        .query(&mut raw)
        .unwrap();
    assert_eq!(pttl, -1);
}

#[test]
fn a_full_redis_skips_with_no_room() {
    let Some(server) = RedisServer::start_with(Options {
        maxmemory_noeviction: Some(4 << 20),
        ..Options::default()
    }) else {
        return;
    };
    let store = open(&server.url(), Namespace::new("full", 1), BB);
    let blocks = chain(9, 200, BB); // 12.5 MiB into 4 MiB
    let outcomes = put(&store, &blocks);
    let stored = outcomes
        .iter()
        .filter(|o| **o == PutOutcome::Stored)
        .count();
    let no_room = outcomes
        .iter()
        .filter(|o| **o == PutOutcome::Skipped(SkipReason::NoRoom))
        .count();
    assert!(
        stored > 0 && no_room > 0,
        "{stored} stored, {no_room} skipped"
    );
    assert_eq!(stored + no_room, blocks.len());
    assert_eq!(store.stats().skipped, no_room as u64);
    // What was stored is served, intact.
    let kept: Vec<_> = blocks
        .iter()
        .zip(&outcomes)
        .filter(|(_, o)| **o == PutOutcome::Stored)
        .map(|(b, _)| b.clone())
        .collect();
    assert_all_served(&store, &kept);
}

#[test]
fn a_read_only_replica_refuses_writes_counted_and_warned_about() {
    // A URL that names a replica: every SET is refused with READONLY. Skipped (the blocks
    // stay in G2), counted as refused writes, warned about once; reads still answer.
    let Some(server) = RedisServer::start() else {
        return;
    };
    // A replica of a master that is not there (port 1): read-only all the same.
    let out = server.cli(&["REPLICAOF", "127.0.0.1", "1"]);
    assert!(out.status.success(), "{out:?}");
    let blocks = chain(13, 3, BB);
    let replica = open(&server.url(), Namespace::new("replica", 1), BB);
    assert_eq!(
        put(&replica, &blocks),
        vec![PutOutcome::Skipped(SkipReason::Unavailable); 3]
    );
    put(&replica, &blocks);
    let s = replica.remote_stats();
    assert_eq!((s.refused_writes, s.refusal_warnings), (6, 1), "{s:?}");
    assert_eq!((s.store.failed, s.breaker_opens), (0, 0));
    let (outcomes, _) = get(&replica, &hashes(&blocks));
    assert!(
        outcomes.iter().all(|o| *o == GetOutcome::Miss),
        "{outcomes:?}"
    );
}
