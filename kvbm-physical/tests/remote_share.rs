//! Two servers share one namespace: two independent `RemoteStore`s in two processes (this
//! test binary runs itself again as the second server). What one puts, the other gets, every
//! byte checked; both writing the same blocks at once store each exactly once.

mod redis_support;

use std::process::Command;
use std::time::Duration;

use kvbm_logical::SequenceHash;
use kvbm_physical::remote::{Namespace, RemoteConfig, RemoteStore};
use kvbm_physical::{GetOutcome, LayoutConfig, PutOutcome, StoreBlock, StoreTier};
use redis_support::{RedisServer, pattern};

/// The layout both servers run: its fingerprint is part of the namespace.
const LAYOUT: LayoutConfig = LayoutConfig {
    num_blocks: 64,
    num_layers: 4,
    outer_dim: 2,
    page_size: 16,
    inner_dim: 512,
    dtype_bytes: 2,
};
const BLOCK_BYTES: usize = 4 * 2 * 16 * 512 * 2; // 128 KiB
const CHAIN: usize = 24;

/// Each process builds its store from the same parameters, independently.
fn open(url: &str) -> RemoteStore {
    let config = RemoteConfig::builder(Namespace::for_layout("share-test", &LAYOUT), BLOCK_BYTES)
        .url(url)
        .connect_timeout(Duration::from_millis(500))
        .response_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    RemoteStore::open(config).unwrap()
}

/// Chain `which` (0, 1, 2...); chain 1 continues chain 0. Bytes are a function of the hash.
fn chain(which: u64) -> Vec<(SequenceHash, Option<SequenceHash>, Vec<u8>)> {
    let mut parent = (which > 0).then(|| hash(which - 1, CHAIN - 1));
    (0..CHAIN)
        .map(|i| {
            let h = hash(which, i);
            let b = (h, parent, pattern(h.as_u64(), BLOCK_BYTES));
            parent = Some(h);
            b
        })
        .collect()
}

fn hash(which: u64, i: usize) -> SequenceHash {
    SequenceHash::new(0x5eed_0000_0000 | which << 16 | i as u64)
}

fn put(store: &RemoteStore, which: u64) -> Vec<PutOutcome> {
    let blocks = chain(which);
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

/// Every block of chain `which` is served, with its parent and exactly its bytes.
fn check(store: &RemoteStore, which: u64) {
    let blocks = chain(which);
    let hashes: Vec<_> = blocks.iter().map(|b| b.0).collect();
    assert_eq!(store.contains(&hashes), vec![true; CHAIN]);
    let mut bufs = vec![vec![0u8; BLOCK_BYTES]; CHAIN];
    let mut out: Vec<&mut [u8]> = bufs.iter_mut().map(Vec::as_mut_slice).collect();
    let outcomes = store.get(&hashes, &mut out);
    for (i, (h, parent, bytes)) in blocks.iter().enumerate() {
        assert_eq!(outcomes[i], GetOutcome::Hit { parent: *parent }, "{h}");
        assert!(bufs[i] == *bytes, "{h}: wrong bytes");
    }
}

fn count(outcomes: &[PutOutcome], what: &PutOutcome) -> usize {
    outcomes.iter().filter(|o| *o == what).count()
}

/// The second server (run by `two_processes_share_one_namespace`; does nothing when run
/// directly).
#[test]
#[ignore = "the second process of two_processes_share_one_namespace, which runs it"]
fn second_server() {
    let Ok(url) = std::env::var("KVBM_SHARE_URL") else {
        return;
    };
    let store = open(&url);
    // What the first server put is here, every byte.
    check(&store, 0);
    // Continue the chain.
    assert_eq!(count(&put(&store, 1), &PutOutcome::Stored), CHAIN);
    // Both servers write chain 2 at about the same time.
    let outcomes = put(&store, 2);
    check(&store, 2);
    println!(
        "second-server stored={} present={}",
        count(&outcomes, &PutOutcome::Stored),
        count(&outcomes, &PutOutcome::Present)
    );
}

#[test]
fn two_processes_share_one_namespace() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let store = open(&server.url());
    assert_eq!(count(&put(&store, 0), &PutOutcome::Stored), CHAIN);

    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "second_server",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("KVBM_SHARE_URL", server.url())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Meanwhile, write chain 2 here too.
    let mine = put(&store, 2);
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "second server failed:\n{stdout}");
    assert!(
        stdout.contains("1 passed"),
        "the second server did not run:\n{stdout}"
    );

    // What the second server put is here, every byte; and chain 2 is intact.
    check(&store, 1);
    check(&store, 2);
    // `SET NX`: each block of chain 2 was stored by exactly one of the two servers.
    // (The harness may print "test second_server ... " on the same line.)
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("second-server ").map(|(_, rest)| rest))
        .expect("the second server's counts");
    let field = |name: &str| -> usize {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(count(&mine, &PutOutcome::Stored) + field("stored"), CHAIN);
    assert_eq!(count(&mine, &PutOutcome::Present) + field("present"), CHAIN);
}
