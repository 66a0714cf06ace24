//! The publisher over real sockets on loopback, read back by a Rust subscriber.

mod common;

use std::time::Duration;

use common::{View, Workload, replay};
use kvbm_events::{BuildErrorKind, EventPublisher, Medium, Source};
use kvbm_logical::{BlockManager, Device, Host};

const FLUSH: Duration = Duration::from_secs(30);

fn managers() -> (BlockManager<Device>, BlockManager<Host>) {
    let g1 = BlockManager::<Device>::builder()
        .block_count(48)
        .block_size(4)
        .build()
        .expect("g1");
    let g2 = BlockManager::<Host>::builder()
        .block_count(96)
        .block_size(4)
        .build()
        .expect("g2");
    (g1, g2)
}

#[test]
fn replay_from_zero_rebuilds_the_cached_set_of_each_tier() {
    let (g1, g2) = managers();
    let publisher = EventPublisher::builder()
        .bind("tcp://127.0.0.1:*")
        .replay_endpoint("tcp://127.0.0.1:*")
        .topic("kv-events")
        .data_parallel_rank(Some(3))
        .max_batch_events(8)
        .source(Source::manager(&g1, 1 << 16))
        .source(Source::manager(&g2, 1 << 16))
        .build()
        .expect("publisher");
    let (mut w1, mut w2) = (Workload::new(1, 4), Workload::new(2, 4));
    for _ in 0..20 {
        w1.run(&g1, 25);
        w2.run(&g2, 25);
    }
    let stats = publisher.flush(FLUSH).expect("flushed");
    assert!(stats.batches_published > 10, "{stats:?}");
    assert_eq!(stats.batches_dropped, 0);
    assert_eq!(stats.resyncs, 0);

    let context = zmq::Context::new();
    let batches = replay(&context, publisher.replay_endpoint().expect("replay"), 0);
    let seqs: Vec<u64> = batches.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (0..stats.batches_published).collect::<Vec<_>>());
    let mut view = View::default();
    for (_, payload) in &batches {
        let batch = view.apply(payload);
        assert_eq!(batch.data_parallel_rank, Some(3));
    }
    assert_eq!(view.events as u64, stats.events_published);
    // Both tiers were reset while idle (kvbm's `Cleared`), yet neither reset emptied the
    // router's view of the other tier.
    assert!(g1.metrics().snapshot().removed_reset > 0 && g2.metrics().snapshot().removed_reset > 0);
    assert_eq!(view.clears, 0);
    assert!(!w1.cached(&g1).is_empty() && !w2.cached(&g2).is_empty());
    assert_eq!(view.medium("GPU"), w1.cached(&g1));
    assert_eq!(view.medium("CPU"), w2.cached(&g2));
    // Blocks staged from tokens are published with them, `block_size` per block.
    assert!(!view.tokens.is_empty());
    for (hash, tokens) in &view.tokens {
        let expected = w1
            .tokens
            .get(hash)
            .or_else(|| w2.tokens.get(hash))
            .expect("a registered hash");
        assert_eq!(tokens, expected);
    }
}

#[test]
fn blocks_registered_before_the_publisher_are_published_first_from_the_snapshot() {
    let (g1, g2) = managers();
    let (mut w1, mut w2) = (Workload::new(8, 4), Workload::new(9, 4));
    w1.run(&g1, 60);
    w2.run(&g2, 60);
    let already = (w1.cached(&g1), w2.cached(&g2));
    assert!(!already.0.is_empty() && !already.1.is_empty());
    let g1_source = Source::manager(&g1, 1 << 16);
    assert_eq!(g1_source.snapshot_blocks(), already.0.len());
    let publisher = EventPublisher::builder()
        .bind("tcp://127.0.0.1:*")
        .replay_endpoint("tcp://127.0.0.1:*")
        .max_batch_events(5)
        .source(g1_source)
        .source(Source::manager(&g2, 1 << 16))
        .build()
        .expect("publisher");
    w1.run(&g1, 60);
    w2.run(&g2, 60);
    let stats = publisher.flush(FLUSH).expect("flushed");
    let context = zmq::Context::new();
    let batches = replay(&context, publisher.replay_endpoint().expect("replay"), 0);
    let mut view = View::default();
    let first = view.apply(&batches[0].1);
    assert!(
        matches!(&first.events[0], kvbm_events::Event::BlockStored(e) if e.token_ids.is_empty())
    );
    assert!(first.events.len() <= 5);
    for (_, p) in &batches[1..] {
        view.apply(p);
    }
    assert_eq!(view.events as u64, stats.events_published);
    assert_eq!(view.medium("GPU"), w1.cached(&g1));
    assert_eq!(view.medium("CPU"), w2.cached(&g2));
}

#[test]
fn without_a_snapshot_a_late_router_misses_the_earlier_blocks() {
    // What the snapshot repairs: the same run with a plain subscription.
    let (g1, _) = managers();
    let mut w = Workload::new(8, 4);
    w.run(&g1, 60);
    let publisher = EventPublisher::builder()
        .bind("tcp://127.0.0.1:*")
        .replay_endpoint("tcp://127.0.0.1:*")
        .source(Source::new(g1.subscribe(1 << 16), Medium::GPU, 4))
        .build()
        .expect("publisher");
    w.run(&g1, 5);
    publisher.flush(FLUSH).expect("flushed");
    let context = zmq::Context::new();
    let mut view = View::default();
    for (_, p) in replay(&context, publisher.replay_endpoint().expect("replay"), 0) {
        view.apply(&p);
    }
    assert!(view.medium("GPU").is_subset(&w.cached(&g1)));
    assert_ne!(view.medium("GPU"), w.cached(&g1));
}

#[test]
fn replay_serves_from_any_start_and_forgets_beyond_its_buffer() {
    let (g1, _) = managers();
    let publisher = EventPublisher::builder()
        .bind("tcp://127.0.0.1:*")
        .replay_endpoint("tcp://127.0.0.1:*")
        .buffer_steps(5)
        .max_batch_events(1)
        .source(Source::manager(&g1, 1 << 12))
        .build()
        .expect("publisher");
    Workload::new(3, 4).run(&g1, 40);
    let stats = publisher.flush(FLUSH).expect("flushed");
    let last = stats.batches_published - 1;
    assert!(last > 10);
    let context = zmq::Context::new();
    let endpoint = publisher.replay_endpoint().expect("replay");
    let seqs = |start| {
        replay(&context, endpoint, start)
            .into_iter()
            .map(|(s, _)| s)
            .collect::<Vec<_>>()
    };
    // Older batches have left the buffer: the client gets the oldest kept, and sees the gap.
    assert_eq!(seqs(0), (last - 4..=last).collect::<Vec<_>>());
    assert_eq!(seqs(last - 1), vec![last - 1, last]);
    assert_eq!(seqs(last + 1), Vec::<u64>::new());
    assert_eq!(seqs(u64::MAX), Vec::<u64>::new());
}

#[test]
fn a_snapshot_larger_than_the_replay_buffer_stays_replayable() {
    // 48 cached blocks in unchained single-block events, one event per batch asked for, and
    // a replay buffer of 6 batches: published as asked, the snapshot would push its own head
    // out. It is packed into at most half of the buffer instead, so a late router replaying
    // from 0 gets all of it.
    let (g1, _) = managers();
    let m = &g1;
    for i in 0..48u64 {
        let block = m.allocate_blocks(1).expect("room").pop().expect("one");
        let staged = block
            .stage(kvbm_logical::SequenceHash::new(1_000 + i), 4)
            .expect("staged");
        drop(m.register_block(staged).expect("registered"));
    }
    let publisher = EventPublisher::builder()
        .bind("tcp://127.0.0.1:*")
        .replay_endpoint("tcp://127.0.0.1:*")
        .buffer_steps(6)
        .max_batch_events(1)
        .source(Source::manager(&g1, 1 << 12))
        .build()
        .expect("publisher");
    let stats = publisher.flush(FLUSH).expect("flushed");
    assert!(stats.batches_published <= 3, "{stats:?}");
    let context = zmq::Context::new();
    let batches = replay(&context, publisher.replay_endpoint().expect("replay"), 0);
    assert_eq!(batches[0].0, 0, "the snapshot's head is still replayable");
    let mut view = View::default();
    batches.iter().for_each(|(_, p)| {
        view.apply(p);
    });
    assert_eq!(view.medium("GPU").len(), 48);
}

#[test]
fn the_snapshots_of_several_sources_share_the_replay_buffer() {
    // Three managers of 48 unchained blocks each, a replay buffer of 12 batches, one event
    // per batch asked for: each snapshot gets a sixth of the buffer (half of it shared by
    // three), so all three fit and a late router replaying from 0 rebuilds every one.
    let managers: Vec<BlockManager<Device>> = (0..3)
        .map(|_| {
            BlockManager::<Device>::builder()
                .block_count(48)
                .block_size(4)
                .build()
                .expect("manager")
        })
        .collect();
    for (k, m) in managers.iter().enumerate() {
        for i in 0..48u64 {
            let block = m.allocate_blocks(1).expect("room").pop().expect("one");
            let hash = kvbm_logical::SequenceHash::new(1_000 * (k as u64 + 1) + i);
            drop(
                m.register_block(block.stage(hash, 4).expect("staged"))
                    .expect("registered"),
            );
        }
    }
    let mut builder = EventPublisher::builder()
        .bind("tcp://127.0.0.1:*")
        .replay_endpoint("tcp://127.0.0.1:*")
        .buffer_steps(12)
        .max_batch_events(1);
    for m in &managers {
        builder = builder.source(Source::manager(m, 1 << 12));
    }
    let publisher = builder.build().expect("publisher");
    let stats = publisher.flush(FLUSH).expect("flushed");
    assert!(stats.batches_published <= 6, "{stats:?}");
    let context = zmq::Context::new();
    let batches = replay(&context, publisher.replay_endpoint().expect("replay"), 0);
    assert_eq!(
        batches[0].0, 0,
        "the first snapshot's head is still replayable"
    );
    let mut view = View::default();
    batches.iter().for_each(|(_, p)| {
        view.apply(p);
    });
    // Three GPU managers: one medium, 144 distinct hashes.
    assert_eq!(view.medium("GPU").len(), 144);
}

#[test]
fn malformed_replay_requests_are_ignored_and_publishing_goes_on() {
    let (g1, _) = managers();
    let publisher = EventPublisher::builder()
        .bind("tcp://127.0.0.1:*")
        .replay_endpoint("tcp://127.0.0.1:*")
        .source(Source::manager(&g1, 1 << 12))
        .build()
        .expect("publisher");
    let mut w = Workload::new(4, 4);
    w.run(&g1, 10);
    publisher.flush(FLUSH).expect("flushed");

    let context = zmq::Context::new();
    let endpoint = publisher.replay_endpoint().expect("replay");
    let bad = context.socket(zmq::DEALER).expect("socket");
    bad.set_linger(0).expect("option");
    bad.connect(endpoint).expect("connect");
    let malformed: [&[&[u8]]; 5] = [
        &[b"\x00\x00\x00\x00\x00\x00\x00\x00"],       // no delimiter
        &[b"x", b"\x00\x00\x00\x00\x00\x00\x00\x00"], // a non-empty delimiter
        &[b"", b"\x00\x01"],                          // a short seq
        &[b"", b"\x00\x00\x00\x00\x00\x00\x00\x00\x00"], // a long seq
        &[b"", b"\x00\x00\x00\x00\x00\x00\x00\x00", b"extra"],
    ];
    for frames in malformed {
        bad.send_multipart(frames.iter().copied(), 0).expect("send");
    }
    // A well-formed request sent after them is answered once they have all been read (one
    // socket, in order), and the publisher still publishes.
    w.run(&g1, 10);
    let stats = publisher.flush(FLUSH).expect("flushed");
    let batches = replay(&context, endpoint, 0);
    assert_eq!(batches.len() as u64, stats.batches_published);
    let stats = publisher.flush(FLUSH).expect("still running");
    assert_eq!(stats.replay_malformed, 5, "{stats:?}");
    assert_eq!(stats.replay_requests, 6);
    assert_eq!(
        bad.recv_multipart(zmq::DONTWAIT),
        Err(zmq::Error::EAGAIN),
        "no answer to garbage"
    );
    let mut view = View::default();
    batches.iter().for_each(|(_, p)| {
        view.apply(p);
    });
    assert_eq!(view.medium("GPU"), w.cached(&g1));
}

#[test]
fn events_lost_before_the_publisher_saw_them_are_announced_as_a_clear() {
    let (g1, _) = managers();
    // A queue of 2 batches, filled before the publisher starts: the manager drops the rest.
    let source = Source::manager(&g1, 2);
    let mut w = Workload::new(5, 4);
    w.run(&g1, 30);
    let publisher = EventPublisher::builder()
        .bind("tcp://127.0.0.1:*")
        .replay_endpoint("tcp://127.0.0.1:*")
        .source(source)
        .build()
        .expect("publisher");
    let stats = publisher.flush(FLUSH).expect("flushed");
    assert!(
        stats.batches_dropped > 0 && stats.events_dropped >= stats.batches_dropped,
        "{stats:?}"
    );
    assert_eq!(stats.resyncs, 1);
    let context = zmq::Context::new();
    let batches = replay(&context, publisher.replay_endpoint().expect("replay"), 0);
    let mut view = View::default();
    batches.iter().for_each(|(_, p)| {
        view.apply(p);
    });
    assert_eq!(view.clears, 1);
    // The resync is followed by a fresh snapshot: the router's view is the cache again.
    assert!(!w.cached(&g1).is_empty());
    assert_eq!(view.medium("GPU"), w.cached(&g1));
}

#[test]
fn a_resync_restores_every_tier_from_fresh_snapshots() {
    // G1's queue (2 batches) overflows before the publisher starts, G2's does not. The
    // resync's `AllBlocksCleared` empties the router's view of both tiers (vLLM's event is
    // server-wide); the fresh snapshots that follow it restore both exactly, and the stream
    // goes on from them with no gap: after more work the view still equals both caches.
    let (g1, g2) = managers();
    let s1 = Source::manager(&g1, 2);
    let s2 = Source::manager(&g2, 1 << 16);
    let (mut w1, mut w2) = (Workload::new(7, 4), Workload::new(8, 4));
    w1.run(&g1, 30);
    w2.run(&g2, 30);
    let publisher = EventPublisher::builder()
        .bind("tcp://127.0.0.1:*")
        .replay_endpoint("tcp://127.0.0.1:*")
        .max_batch_events(16)
        .source(s1)
        .source(s2)
        .build()
        .expect("publisher");
    let stats = publisher.flush(FLUSH).expect("flushed");
    assert_eq!(stats.resyncs, 1, "{stats:?}");
    assert!(stats.batches_dropped > 0, "{stats:?}");
    for _ in 0..5 {
        w1.run(&g1, 1);
        w2.run(&g2, 10);
        publisher.flush(FLUSH).expect("flushed");
    }
    let stats = publisher.flush(FLUSH).expect("flushed");
    let context = zmq::Context::new();
    let batches = replay(&context, publisher.replay_endpoint().expect("replay"), 0);
    let mut view = View::default();
    batches.iter().for_each(|(_, p)| {
        view.apply(p);
    });
    assert_eq!(view.clears as u64, stats.resyncs);
    assert!(!w1.cached(&g1).is_empty() && !w2.cached(&g2).is_empty());
    assert_eq!(view.medium("GPU"), w1.cached(&g1));
    assert_eq!(view.medium("CPU"), w2.cached(&g2));
}

#[test]
fn refused_builds_give_the_sources_back_and_open_nothing() {
    let (g1, g2) = managers();
    let err = EventPublisher::builder()
        .bind("tcp://127.0.0.1:*")
        .hwm(0)
        .source(Source::manager(&g1, 8))
        .build()
        .unwrap_err();
    assert!(matches!(
        err.kind(),
        BuildErrorKind::OutOfRange {
            field: "hwm",
            value: 0,
            ..
        }
    ));
    let mut sources = err.into_sources();
    assert_eq!(sources.len(), 1);
    assert_eq!(sources[0].medium(), Medium::GPU);

    let err = EventPublisher::builder()
        .bind("tcp://127.0.0.1:*")
        .buffer_steps(0)
        .source(sources.pop().expect("one"))
        .build()
        .unwrap_err();
    assert!(matches!(
        err.kind(),
        BuildErrorKind::OutOfRange {
            field: "buffer_steps",
            ..
        }
    ));
    assert_eq!(err.into_sources().len(), 1);

    // A busy port is reported by build().
    let first = EventPublisher::builder()
        .bind("tcp://127.0.0.1:*")
        .source(Source::manager(&g2, 8))
        .build()
        .expect("publisher");
    let err = EventPublisher::builder()
        .bind(first.endpoint())
        .source(Source::manager(&g2, 8))
        .build()
        .unwrap_err();
    assert!(
        matches!(err.kind(), BuildErrorKind::Socket { what: "bind", .. }),
        "{err}"
    );
    assert_eq!(err.into_sources().len(), 1);

    let err = EventPublisher::builder()
        .source(Source::manager(&g2, 8))
        .build()
        .unwrap_err();
    assert!(matches!(err.kind(), BuildErrorKind::MissingEndpoint));
    let err = EventPublisher::builder()
        .bind("tcp://127.0.0.1:*")
        .build()
        .unwrap_err();
    assert!(matches!(err.kind(), BuildErrorKind::NoSources));
}

#[test]
fn shutdown_publishes_what_is_queued() {
    let (g1, _) = managers();
    let witness = g1.subscribe(1 << 12);
    let publisher = EventPublisher::builder()
        .bind("tcp://127.0.0.1:*")
        .source(Source::manager(&g1, 1 << 12))
        .build()
        .expect("publisher");
    Workload::new(6, 4).run(&g1, 50);
    let stats = publisher.shutdown();
    let emitted: usize = witness.drain().map(|b| b.len()).sum();
    assert!(emitted > 0);
    assert_eq!(stats.events_published, emitted as u64);
    assert_eq!(stats.batches_dropped, 0);
}
