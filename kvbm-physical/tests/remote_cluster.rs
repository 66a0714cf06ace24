//! The remote tier against a real 3-master Redis Cluster (`redis-cli --cluster create`): keys
//! spread over every master and routed without redirection, a master killed (the others keep
//! serving) and restarted, and a slot moved under the store's feet (`MOVED` followed).

mod redis_support;

use std::time::{Duration, Instant};

use kvbm_logical::SequenceHash;
use kvbm_physical::remote::{BreakerState, Namespace, RemoteConfig, RemoteStore};
use kvbm_physical::{GetOutcome, PutOutcome, SkipReason, StoreBlock, StoreTier};
use redis_support::{RedisCluster, pattern};

const BB: usize = 16 << 10;

fn open(cluster: &RedisCluster, ns: &str) -> RemoteStore {
    RemoteStore::open(
        RemoteConfig::builder(Namespace::new(ns, 1), BB)
            // One seed is enough: the rest is discovered.
            .url(cluster.url())
            .cluster(true)
            .connect_timeout(Duration::from_millis(300))
            .response_timeout(Duration::from_secs(2))
            .breaker(1, Duration::from_millis(20))
            .build()
            .unwrap(),
    )
    .unwrap()
}

type Block = (SequenceHash, Option<SequenceHash>, Vec<u8>);

fn blocks(seed: u64, n: usize) -> Vec<Block> {
    let mut parent = None;
    (0..n)
        .map(|i| {
            let h = SequenceHash::new((seed << 40) | ((i as u64 + 1) * 0x9e37));
            let b = (h, parent, pattern(h.as_u64(), BB));
            parent = Some(h);
            b
        })
        .collect()
}

fn put(store: &RemoteStore, blocks: &[Block]) -> Vec<PutOutcome> {
    let b: Vec<_> = blocks
        .iter()
        .map(|(hash, parent, bytes)| StoreBlock {
            hash: *hash,
            parent: *parent,
            bytes,
        })
        .collect();
    store.put(&b)
}

/// Gets every block; asserts that each hit is exactly right; returns which were hits.
fn get_checked(store: &RemoteStore, blocks: &[Block]) -> Vec<bool> {
    let hashes: Vec<_> = blocks.iter().map(|b| b.0).collect();
    let mut bufs = vec![vec![0u8; BB]; blocks.len()];
    let mut out: Vec<&mut [u8]> = bufs.iter_mut().map(Vec::as_mut_slice).collect();
    let outcomes = store.get(&hashes, &mut out);
    outcomes
        .iter()
        .enumerate()
        .map(|(i, o)| match o {
            GetOutcome::Hit { parent } => {
                assert_eq!(*parent, blocks[i].1);
                assert!(bufs[i] == blocks[i].2, "block {i}: wrong bytes");
                true
            }
            GetOutcome::Corrupt => panic!("block {i}: corrupt"),
            _ => false,
        })
        .collect()
}

#[test]
fn cluster_put_get_exists_across_slots_without_redirection() {
    let Some(cluster) = RedisCluster::start() else {
        return;
    };
    let store = open(&cluster, "cluster");
    let blocks = blocks(1, 300);
    assert!(
        put(&store, &blocks)
            .iter()
            .all(|o| *o == PutOutcome::Stored)
    );
    // Spread over the three masters.
    let counts = cluster.key_counts();
    assert_eq!(counts.iter().sum::<u64>(), 300, "{counts:?}");
    assert!(counts.iter().all(|&c| c > 50), "{counts:?}");
    // Each key lives where the cluster itself says its slot is.
    let mut raws: Vec<_> = cluster.nodes.iter().map(|n| n.raw()).collect();
    for (h, _, _) in blocks.iter().step_by(15) {
        let key = store.key(*h);
        let owner = cluster.node_of(&key);
        let exists: i64 = redis::cmd("EXISTS")
            .arg(&key)
            .query(&mut raws[owner])
            .unwrap();
        assert_eq!(exists, 1);
    }
    let hashes: Vec<_> = blocks.iter().map(|b| b.0).collect();
    assert_eq!(store.contains(&hashes), vec![true; 300]);
    assert!(get_checked(&store, &blocks).iter().all(|&h| h));
    store.remove(&hashes[..100]);
    assert_eq!(cluster.key_counts().iter().sum::<u64>(), 200);
    let s = store.remote_stats();
    // Routed by our own slot map: the cluster never had to redirect.
    assert_eq!(s.redirects, 0, "{s:?}");
    assert!(s.topology_refreshes >= 1);
    assert_eq!(store.node_states().len(), 3);
    assert!(
        store
            .node_states()
            .iter()
            .all(|(_, st)| *st == BreakerState::Closed)
    );
}

#[test]
fn a_killed_master_turns_into_misses_the_others_keep_serving() {
    let Some(mut cluster) = RedisCluster::start() else {
        return;
    };
    let store = open(&cluster, "cluster-kill");
    let before = blocks(2, 150);
    assert!(
        put(&store, &before)
            .iter()
            .all(|o| *o == PutOutcome::Stored)
    );
    let owner: Vec<usize> = before
        .iter()
        .map(|b| cluster.node_of(&store.key(b.0)))
        .collect();
    cluster.nodes[2].kill();

    // Blocks on the live masters are served, byte for byte; those on the dead one miss.
    let hits = get_checked(&store, &before);
    for (i, hit) in hits.iter().enumerate() {
        assert_eq!(*hit, owner[i] != 2, "block {i} on node {}", owner[i]);
    }
    // New blocks: stored on the live masters, skipped for the dead one.
    let during = blocks(3, 150);
    let outcomes = put(&store, &during);
    for (i, o) in outcomes.iter().enumerate() {
        if cluster.node_of(&store.key(during[i].0)) == 2 {
            assert_eq!(
                *o,
                PutOutcome::Skipped(SkipReason::Unavailable),
                "block {i}"
            );
        } else {
            assert_eq!(*o, PutOutcome::Stored, "block {i}");
        }
    }
    let s = store.remote_stats();
    assert!(s.breaker_opens >= 1 && s.store.skipped > 0, "{s:?}");

    // The master comes back (empty, with its slots): service resumes for its keys.
    cluster.nodes[2].restart();
    cluster.wait_ok();
    let after = blocks(4, 60);
    let on_2: Vec<Block> = after
        .into_iter()
        .filter(|b| cluster.node_of(&store.key(b.0)) == 2)
        .collect();
    assert!(!on_2.is_empty());
    let until = Instant::now() + Duration::from_secs(20);
    while put(&store, &on_2[..1]) != vec![PutOutcome::Stored] {
        assert!(
            Instant::now() < until,
            "the restarted master was not used again"
        );
    }
    assert!(
        put(&store, &on_2[1..])
            .iter()
            .all(|o| *o == PutOutcome::Stored)
    );
    assert!(get_checked(&store, &on_2).iter().all(|&h| h));
}

#[test]
fn a_moved_slot_is_followed() {
    let Some(cluster) = RedisCluster::start() else {
        return;
    };
    let store = open(&cluster, "cluster-moved");
    // Learn the slot map.
    let warm = blocks(5, 30);
    assert!(put(&store, &warm).iter().all(|o| *o == PutOutcome::Stored));
    // A block whose (empty) slot is on node 0; move that slot to node 1 behind the store's
    // back.
    let block = blocks(6, 200)
        .into_iter()
        .find(|b| {
            let key = store.key(b.0);
            cluster.node_of(&key) == 0 && {
                let slot = slot_of(&cluster, &key);
                count_in_slot(&cluster, slot) == 0
            }
        })
        .expect("a block on node 0 in an empty slot");
    let key = store.key(block.0);
    let slot = slot_of(&cluster, &key).to_string();
    let target = String::from_utf8_lossy(&cluster.nodes[1].cli(&["CLUSTER", "MYID"]).stdout)
        .trim()
        .to_owned();
    for n in &cluster.nodes {
        let out = n.cli(&["CLUSTER", "SETSLOT", &slot, "NODE", &target]);
        assert!(out.status.success());
    }
    cluster.wait_ok();
    assert_eq!(cluster.node_of(&key), 1);

    assert_eq!(
        put(&store, std::slice::from_ref(&block)),
        vec![PutOutcome::Stored]
    );
    assert!(get_checked(&store, std::slice::from_ref(&block))[0]);
    let s = store.remote_stats();
    assert!(s.redirects >= 1, "{s:?}");
    // The MOVED marked the map stale: a later call refreshes it (at most one refresh per
    // 100 ms), and from then on the block is routed directly, without a redirection.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let before = store.remote_stats().redirects;
        assert!(get_checked(&store, std::slice::from_ref(&block))[0]);
        if store.remote_stats().redirects == before {
            break;
        }
        assert!(Instant::now() < deadline, "{:?}", store.remote_stats());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(store.remote_stats().topology_refreshes >= 2);
}

#[test]
fn a_slot_being_migrated_is_followed_with_asking() {
    // During resharding the source answers `ASK` for keys it does not have (every new key,
    // and those already moved); the client must send `ASKING` and the command to the target,
    // without refreshing the slot map (it still names the source).
    let Some(cluster) = RedisCluster::start() else {
        return;
    };
    let store = open(&cluster, "cluster-ask");
    let warm = blocks(7, 30);
    assert!(put(&store, &warm).iter().all(|o| *o == PutOutcome::Stored));
    let block = blocks(8, 200)
        .into_iter()
        .find(|b| {
            let key = store.key(b.0);
            cluster.node_of(&key) == 0 && count_in_slot(&cluster, slot_of(&cluster, &key)) == 0
        })
        .expect("a block on node 0 in an empty slot");
    let key = store.key(block.0);
    let slot = slot_of(&cluster, &key).to_string();
    let id = |n: usize| {
        String::from_utf8_lossy(&cluster.nodes[n].cli(&["CLUSTER", "MYID"]).stdout)
            .trim()
            .to_owned()
    };
    let (source, target) = (id(0), id(1));
    let ok = |out: std::process::Output| assert!(out.status.success(), "{out:?}");
    ok(cluster.nodes[1].cli(&["CLUSTER", "SETSLOT", &slot, "IMPORTING", &source]));
    ok(cluster.nodes[0].cli(&["CLUSTER", "SETSLOT", &slot, "MIGRATING", &target]));
    let before = store.remote_stats();

    assert_eq!(
        put(&store, std::slice::from_ref(&block)),
        vec![PutOutcome::Stored]
    );
    assert!(get_checked(&store, std::slice::from_ref(&block))[0]);
    assert_eq!(store.contains(&[block.0]), vec![true]);
    let s = store.remote_stats();
    assert!(s.redirects >= before.redirects + 3, "{s:?}");
    assert_eq!(
        s.topology_refreshes, before.topology_refreshes,
        "an ASK is not a stale map"
    );
    // The key landed on the target, not on the source.
    let on = |n: usize| -> i64 {
        let mut raw = cluster.nodes[n].raw();
        redis::cmd("CLUSTER")
            .arg("COUNTKEYSINSLOT")
            .arg(&slot)
            .query(&mut raw)
            .unwrap()
    };
    assert_eq!((on(0), on(1)), (0, 1));

    // The migration ends: the slot is the target's; `MOVED` is followed to it.
    for n in &cluster.nodes {
        ok(n.cli(&["CLUSTER", "SETSLOT", &slot, "NODE", &target]));
    }
    cluster.wait_ok();
    assert!(get_checked(&store, std::slice::from_ref(&block))[0]);
}

#[test]
fn a_node_that_leaves_the_cluster_is_forgotten() {
    // Pods restarting under new addresses would otherwise pile up dead nodes (each with its
    // pool of sockets) in the store for the life of the process.
    let Some(cluster) = RedisCluster::start() else {
        return;
    };
    let store = open(&cluster, "cluster-leave");
    let probe = blocks(9, 40);
    let hashes: Vec<_> = probe.iter().map(|b| b.0).collect();
    store.contains(&hashes); // learns the map (EXISTS writes no key)
    let name = |n: usize| format!("127.0.0.1:{}", cluster.nodes[n].port);
    let names = || -> Vec<String> { store.node_states().into_iter().map(|(n, _)| n).collect() };
    assert!(names().contains(&name(2)), "{:?}", names());
    // Every slot of node 2 goes to node 0 (all empty), then the others forget node 2.
    let id = |n: usize| {
        String::from_utf8_lossy(&cluster.nodes[n].cli(&["CLUSTER", "MYID"]).stdout)
            .trim()
            .to_owned()
    };
    let (id0, id2) = (id(0), id(2));
    let moved = {
        let mut raw = cluster.nodes[2].raw();
        let info: Vec<redis::Value> = redis::cmd("CLUSTER").arg("SLOTS").query(&mut raw).unwrap();
        let mut mine = Vec::new();
        for range in info {
            let redis::Value::Array(r) = range else {
                continue;
            };
            let (
                Some(redis::Value::Int(a)),
                Some(redis::Value::Int(b)),
                Some(redis::Value::Array(node)),
            ) = (r.first(), r.get(1), r.get(2))
            else {
                continue;
            };
            if node.get(1) == Some(&redis::Value::Int(i64::from(cluster.nodes[2].port))) {
                mine.extend(*a..=*b);
            }
        }
        // Node 2 first (it stops claiming them), node 0 last, then node 0 takes a new epoch
        // so that its claim wins any gossip still in flight.
        for n in [2, 1, 0] {
            let mut raw = cluster.nodes[n].raw();
            let mut pipe = redis::pipe();
            for s in &mine {
                pipe.cmd("CLUSTER")
                    .arg("SETSLOT")
                    .arg(*s)
                    .arg("NODE")
                    .arg(&id0)
                    .ignore();
            }
            let () = pipe.query(&mut raw).unwrap();
        }
        let out = cluster.nodes[0].cli(&["CLUSTER", "BUMPEPOCH"]);
        assert!(out.status.success(), "{out:?}");
        mine.len()
    };
    assert!(moved > 1000, "{moved}");
    for n in [0, 1] {
        let out = cluster.nodes[n].cli(&["CLUSTER", "FORGET", &id2]);
        assert!(out.status.success(), "{out:?}");
    }
    // Traffic follows MOVED to node 0 and refreshes the map, which no longer has node 2. The
    // cluster settles meanwhile (gossip): a put may be skipped until it has, so the loop
    // waits for every block stored and node 2 forgotten.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stored = put(&store, &probe)
            .iter()
            .all(|o| *o == PutOutcome::Stored || *o == PutOutcome::Present);
        if stored && !names().contains(&name(2)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "stored {stored}, nodes {:?}",
            names()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(get_checked(&store, &probe).iter().all(|&hit| hit));
    assert!(names().contains(&name(0)) && names().contains(&name(1)));
}

fn slot_of(cluster: &RedisCluster, key: &[u8]) -> u16 {
    let key = std::str::from_utf8(key).unwrap();
    String::from_utf8_lossy(&cluster.nodes[0].cli(&["CLUSTER", "KEYSLOT", key]).stdout)
        .trim()
        .parse()
        .unwrap()
}

fn count_in_slot(cluster: &RedisCluster, slot: u16) -> u64 {
    let node = &cluster.nodes[0];
    String::from_utf8_lossy(
        &node
            .cli(&["CLUSTER", "COUNTKEYSINSLOT", &slot.to_string()])
            .stdout,
    )
    .trim()
    .parse()
    .unwrap()
}
