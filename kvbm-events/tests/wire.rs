//! Encoding and decoding agree on any batch, in both layouts, and a refused encoding leaves
//! the output as it was.

use kvbm_events::wire::{BatchLayout, encode_batch_as};
use kvbm_events::{Event, RemovedEvent, StoredEvent, decode_batch};
use proptest::prelude::*;

fn opt_str() -> impl Strategy<Value = Option<String>> {
    prop::option::of("[A-Za-z0-9_]{0,40}")
}

fn event() -> impl Strategy<Value = Event> {
    let stored = (
        prop::collection::vec(any::<u64>(), 0..20),
        any::<Option<u64>>(),
        prop::collection::vec(any::<u32>(), 0..40),
        any::<u64>(),
        any::<Option<u64>>(),
        opt_str(),
        opt_str(),
        any::<Option<u32>>(),
        opt_str(),
        any::<Option<u32>>(),
    )
        .prop_map(|(h, p, t, bs, lora, medium, name, g, kind, w)| {
            Event::BlockStored(StoredEvent {
                block_hashes: h,
                parent_block_hash: p,
                token_ids: t,
                block_size: bs,
                lora_id: lora,
                medium,
                lora_name: name,
                group_idx: g,
                kv_cache_spec_kind: kind,
                kv_cache_spec_sliding_window: w,
            })
        });
    let removed = (
        prop::collection::vec(any::<u64>(), 0..20),
        opt_str(),
        any::<Option<u32>>(),
    )
        .prop_map(|(h, medium, g)| {
            Event::BlockRemoved(RemovedEvent {
                block_hashes: h,
                medium,
                group_idx: g,
            })
        });
    prop_oneof![stored, removed, Just(Event::AllBlocksCleared)]
}

proptest! {
    #[test]
    fn decode_inverts_encode(
        events in prop::collection::vec(event(), 0..12),
        ts in 0.0f64..4e9,
        rank in any::<Option<u32>>(),
        map in any::<bool>(),
        prefix in prop::collection::vec(any::<u8>(), 0..8),
    ) {
        let layout = if map { BatchLayout::Map } else { BatchLayout::Array };
        let wire: Vec<_> = events.iter().map(Event::as_wire).collect();
        let mut out = prefix.clone();
        encode_batch_as(&mut out, layout, ts, &wire, rank).expect("encodes");
        prop_assert_eq!(&out[..prefix.len()], &prefix[..], "appends, never rewrites");
        let batch = decode_batch(&out[prefix.len()..]).expect("decodes");
        prop_assert_eq!(batch.ts, ts);
        prop_assert_eq!(batch.data_parallel_rank, rank.map(i64::from));
        prop_assert_eq!(batch.events, events);
    }
}

#[test]
fn garbage_is_a_typed_error() {
    for payload in [
        &b""[..],
        b"\x90",
        b"\x93\xcb",
        b"\xc0",
        b"\x92\xcb\0\0\0\0\0\0\0\0\x91\x80",
        b"\x81\xa2ts\x01",
    ] {
        assert!(decode_batch(payload).is_err(), "{payload:?}");
    }
}
