//! What publishing costs, measured two ways (the figures in BENCHMARKS.md):
//!
//! 1. **Manager side**: `kvbm-bench cycle`'s request cycle (match a shared prefix, allocate,
//!    stage, register, release; half of each request's blocks hit) on one thread, without and
//!    with an [`EventPublisher`] subscribed to the manager, in alternating rounds so that both
//!    see the same machine load. Reports the median wall ns per block of each, and the
//!    manager thread's own CPU time per block (the publisher thread excluded: on a loaded
//!    machine it takes the manager's core, which is not a cost the manager pays).
//! 2. **Publisher side**: the publisher thread alone (one core): the manager's queue is filled
//!    first, then a publisher is started and flushed; reports block events per second, with no
//!    subscriber and with one SUB socket reading on loopback.
//!
//! Run: `cargo run --release -p kvbm-events --example publish_cost [-- ROUNDS]`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kvbm_events::{EventPublisher, Source};
use kvbm_logical::{BlockManager, Device, ImmutableBlock, SequenceHash};

const BLOCK_SIZE: usize = 16;
const BATCH: usize = 32;
const CYCLES_PER_ROUND: u64 = 20_000;

/// xorshift64*.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// This thread's CPU time (user + system) in ns, from `/proc/thread-self/stat` (clock ticks
/// of 10 ms: `CLK_TCK` = 100 on Linux), so that the publisher thread's work, on another core
/// or not, is not counted as the manager's.
fn thread_cpu_ns() -> u64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // After the command name come fields 3 (state), 4, ...: utime and stime are fields 14
    // and 15, indices 11 and 12 here.
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (field(11) + field(12)) * 10_000_000
}

/// `kvbm-bench cycle`'s loop, one thread: returns (wall ns per block, CPU ns of the loop).
fn cycles(m: &BlockManager<Device>, rng: &mut Rng, unique: &mut u64, n: u64) -> (f64, u64) {
    let prefix = BATCH / 2;
    let mut hashes = Vec::with_capacity(BATCH);
    let start = Instant::now();
    let cpu = thread_cpu_ns();
    for _ in 0..n {
        let family = rng.next() % 64;
        hashes.clear();
        hashes.extend((0..prefix as u64).map(|i| SequenceHash::new(family << 20 | i)));
        hashes.extend((prefix..BATCH).map(|_| {
            *unique += 1;
            SequenceHash::new(*unique)
        }));
        let matched = m.match_blocks(&hashes);
        let have = matched.len();
        if let Ok(fresh) = m.allocate_blocks(BATCH - have) {
            let staged: Vec<_> = fresh
                .into_iter()
                .zip(&hashes[have..])
                .filter_map(|(b, &h)| b.stage(h, BLOCK_SIZE).ok())
                .collect();
            if let Ok(registered) = m.register_blocks(staged) {
                ImmutableBlock::release_all(registered);
            }
        }
        ImmutableBlock::release_all(matched);
    }
    let cpu = thread_cpu_ns() - cpu;
    (
        start.elapsed().as_nanos() as f64 / (n * BATCH as u64) as f64,
        cpu,
    )
}

fn manager() -> BlockManager<Device> {
    BlockManager::<Device>::builder()
        .block_count(1024)
        .block_size(BLOCK_SIZE)
        .build()
        .expect("manager")
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn manager_side(rounds: usize) {
    let plain = manager();
    let published = manager();
    let subscribed = manager();
    let publisher = EventPublisher::builder()
        .bind("tcp://127.0.0.1:*")
        .replay_endpoint("tcp://127.0.0.1:*")
        .source(Source::manager(&published, 1 << 16))
        .build()
        .expect("publisher");
    // kvbm-logical's own share: a bare subscription, drained by a thread that drops the batches.
    let bare = subscribed.subscribe(1 << 16);
    let stop = AtomicBool::new(false);
    let names = [
        "without a publisher",
        "bare subscription",
        "with a publisher",
    ];
    let managers = [&plain, &subscribed, &published];
    let (wall, cpu) = std::thread::scope(|s| {
        let stop = &stop;
        s.spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                drop(bare.recv_timeout(Duration::from_millis(1)));
            }
        });
        let mut rngs = [Rng(1), Rng(1), Rng(1)];
        let mut uniques = [1u64 << 40; 3];
        for i in 0..3 {
            // Warm-up: fill the cache.
            let _ = cycles(managers[i], &mut rngs[i], &mut uniques[i], CYCLES_PER_ROUND);
        }
        let mut wall = [Vec::new(), Vec::new(), Vec::new()];
        let mut cpu = [0u64; 3];
        for _ in 0..rounds {
            for i in 0..3 {
                let (w, c) = cycles(managers[i], &mut rngs[i], &mut uniques[i], CYCLES_PER_ROUND);
                wall[i].push(w);
                cpu[i] += c;
            }
        }
        stop.store(true, Ordering::Relaxed);
        (wall, cpu)
    });
    let stats = publisher.flush(Duration::from_secs(60)).expect("flushed");
    let blocks = (rounds as u64 * CYCLES_PER_ROUND * BATCH as u64) as f64;
    println!(
        "cycle, 1 thread, batch {BATCH}, {rounds} alternating rounds of {CYCLES_PER_ROUND} cycles:"
    );
    for i in 0..3 {
        let mut w = wall[i].clone();
        let (w, c) = (median(&mut w), cpu[i] as f64 / blocks);
        let (w0, c0) = (median(&mut wall[0].clone()), cpu[0] as f64 / blocks);
        println!(
            "  {:<20} wall {w:7.1} ns/block ({:+6.1}%), manager thread CPU {c:7.1} ns/block ({:+6.1}%)",
            names[i],
            (w / w0 - 1.0) * 100.0,
            (c / c0 - 1.0) * 100.0
        );
    }
    println!(
        "  published {} block events in {} batches; manager-side drops {}",
        stats.block_events_published, stats.batches_published, stats.batches_dropped
    );
}

fn publisher_side(with_subscriber: bool) -> f64 {
    let m = manager();
    let source = Source::manager(&m, 1 << 20);
    let (mut rng, mut unique) = (Rng(7), 1 << 40);
    let _ = cycles(&m, &mut rng, &mut unique, 50_000);
    let queued = m.metrics().snapshot();
    let publisher = EventPublisher::builder()
        .bind("tcp://127.0.0.1:*")
        .source(source)
        .build()
        .expect("publisher");
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let reader = with_subscriber.then(|| {
            let context = zmq::Context::new();
            let sub = context.socket(zmq::SUB).expect("socket");
            sub.set_subscribe(b"").expect("subscribe");
            sub.set_rcvtimeo(100).expect("option");
            sub.set_rcvhwm(0).expect("option");
            sub.connect(publisher.endpoint()).expect("connect");
            let stop = &stop;
            s.spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    if sub.recv_multipart(0).is_ok() {
                        n += 1;
                    }
                }
                n
            })
        });
        // The publisher thread is already draining; time from build to flush is an upper
        // bound of its work.
        let start = Instant::now();
        let stats = publisher.flush(Duration::from_secs(120)).expect("flushed");
        let seconds = start.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        let received = reader.map(|r| r.join().expect("reader"));
        let rate = stats.block_events_published as f64 / seconds;
        println!(
            "publisher thread, {}: {} block events ({} registrations queued) in {} batches, {:.3} s: {:.2} M block events/s{}",
            if with_subscriber {
                "one SUB reading"
            } else {
                "no subscriber"
            },
            stats.block_events_published,
            queued.registrations,
            stats.batches_published,
            seconds,
            rate / 1e6,
            received.map_or(String::new(), |n| format!(", {n} messages received"))
        );
        rate
    })
}

fn main() {
    let rounds = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(15);
    manager_side(rounds);
    for _ in 0..3 {
        publisher_side(false);
        publisher_side(true);
    }
}
