//! Decoding vLLM KV-event batches (what a router does with a payload): for Rust subscribers,
//! and for checking the encoder.

use rmpv::Value;

use crate::wire::{BlockHashes, BlockRemoved, BlockStored, WireEvent};

/// One decoded batch.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// Seconds since the Unix epoch when the batch was published.
    pub ts: f64,
    /// The events, in order.
    pub events: Vec<Event>,
    /// The publisher's data-parallel rank, if it set one.
    pub data_parallel_rank: Option<i64>,
}

/// One decoded event.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// `BlockStored`.
    BlockStored(StoredEvent),
    /// `BlockRemoved`.
    BlockRemoved(RemovedEvent),
    /// `AllBlocksCleared`.
    AllBlocksCleared,
}

impl Event {
    /// The same event, borrowed for [`encode_batch`](crate::encode_batch).
    pub fn as_wire(&self) -> WireEvent<'_> {
        match self {
            Self::BlockStored(e) => WireEvent::BlockStored(BlockStored {
                block_hashes: BlockHashes::Raw(&e.block_hashes),
                parent_block_hash: e.parent_block_hash,
                token_ids: &e.token_ids,
                block_size: e.block_size,
                lora_id: e.lora_id,
                medium: e.medium.as_deref(),
                lora_name: e.lora_name.as_deref(),
                group_idx: e.group_idx,
                kv_cache_spec_kind: e.kv_cache_spec_kind.as_deref(),
                kv_cache_spec_sliding_window: e.kv_cache_spec_sliding_window,
            }),
            Self::BlockRemoved(e) => WireEvent::BlockRemoved(BlockRemoved {
                block_hashes: BlockHashes::Raw(&e.block_hashes),
                medium: e.medium.as_deref(),
                group_idx: e.group_idx,
            }),
            Self::AllBlocksCleared => WireEvent::AllBlocksCleared,
        }
    }
}

/// A decoded `BlockStored` (fields as in [`wire::BlockStored`](crate::wire::BlockStored)).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoredEvent {
    /// The stored hashes, in chain order.
    pub block_hashes: Vec<u64>,
    /// The first block's parent.
    pub parent_block_hash: Option<u64>,
    /// The blocks' tokens.
    pub token_ids: Vec<u32>,
    /// Tokens per block.
    pub block_size: u64,
    /// vLLM's deprecated LoRA id.
    pub lora_id: Option<u64>,
    /// The tier.
    pub medium: Option<String>,
    /// The LoRA adapter.
    pub lora_name: Option<String>,
    /// The KV-cache group.
    pub group_idx: Option<u32>,
    /// The group's attention kind.
    pub kv_cache_spec_kind: Option<String>,
    /// The group's sliding window.
    pub kv_cache_spec_sliding_window: Option<u32>,
}

/// A decoded `BlockRemoved`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RemovedEvent {
    /// The removed hashes.
    pub block_hashes: Vec<u64>,
    /// The tier.
    pub medium: Option<String>,
    /// The KV-cache group.
    pub group_idx: Option<u32>,
}

/// Why a payload is not a KV-event batch.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Not msgpack (or truncated).
    #[error("not a msgpack value: {0}")]
    Msgpack(#[from] rmpv::decode::Error),
    /// Bytes left after the batch.
    #[error("{extra} bytes after the batch")]
    TrailingBytes {
        /// How many.
        extra: usize,
    },
    /// The value does not have the schema's shape.
    #[error("{what}")]
    Shape {
        /// What was wrong.
        what: &'static str,
    },
    /// An event whose `"type"` this schema does not have.
    #[error("unknown event type {name:?}")]
    UnknownEventType {
        /// The tag.
        name: String,
    },
    /// A field the event type requires is missing.
    #[error("{event} without {field}")]
    MissingField {
        /// The event type.
        event: &'static str,
        /// The field.
        field: &'static str,
    },
    /// A field of the wrong type or out of range.
    #[error("field {field} has the wrong type or range")]
    BadField {
        /// The field.
        field: &'static str,
    },
}

/// Decodes one payload (the last frame of a published message), in either [`BatchLayout`](crate::BatchLayout).
/// Unknown keys are ignored, as vLLM's own decoder does.
///
/// ```
/// use kvbm_events::wire::{encode_batch, WireEvent};
/// use kvbm_events::{decode_batch, Event};
/// let mut payload = Vec::new();
/// encode_batch(&mut payload, 2.0, &[WireEvent::AllBlocksCleared], None)?;
/// let batch = decode_batch(&payload)?;
/// assert_eq!(batch.events, [Event::AllBlocksCleared]);
/// assert_eq!(batch.data_parallel_rank, None);
/// assert!(decode_batch(b"\x90").is_err());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn decode_batch(payload: &[u8]) -> Result<Batch, DecodeError> {
    let mut rd = payload;
    let value = rmpv::decode::read_value(&mut rd)?;
    if !rd.is_empty() {
        return Err(DecodeError::TrailingBytes { extra: rd.len() });
    }
    let (ts, events, rank) = match value {
        Value::Array(items) => {
            if !(2..=3).contains(&items.len()) {
                return Err(DecodeError::Shape {
                    what: "a batch has 2 or 3 elements",
                });
            }
            let mut items = items.into_iter();
            (items.next(), items.next(), items.next())
        }
        Value::Map(entries) => {
            let (mut ts, mut events, mut rank) = (None, None, None);
            for (key, value) in entries {
                match key.as_str() {
                    Some("ts") => ts = Some(value),
                    Some("events") => events = Some(value),
                    Some("data_parallel_rank") => rank = Some(value),
                    _ => {}
                }
            }
            (ts, events, rank)
        }
        _ => {
            return Err(DecodeError::Shape {
                what: "a batch is an array or a map",
            });
        }
    };
    let ts = match ts {
        Some(Value::F64(ts)) => ts,
        Some(Value::F32(ts)) => f64::from(ts),
        _ => return Err(DecodeError::BadField { field: "ts" }),
    };
    let Some(Value::Array(raw_events)) = events else {
        return Err(DecodeError::BadField { field: "events" });
    };
    let data_parallel_rank = match rank {
        None | Some(Value::Nil) => None,
        Some(Value::Integer(i)) => Some(i.as_i64().ok_or(DecodeError::BadField {
            field: "data_parallel_rank",
        })?),
        Some(_) => {
            return Err(DecodeError::BadField {
                field: "data_parallel_rank",
            });
        }
    };
    let events = raw_events
        .into_iter()
        .map(decode_event)
        .collect::<Result<_, _>>()?;
    Ok(Batch {
        ts,
        events,
        data_parallel_rank,
    })
}

fn decode_event(value: Value) -> Result<Event, DecodeError> {
    let Value::Map(entries) = value else {
        return Err(DecodeError::Shape {
            what: "an event is a map",
        });
    };
    let mut tag = None;
    let mut stored = StoredEvent::default();
    let mut seen_hashes = false;
    let mut seen_tokens = false;
    let mut seen_size = false;
    for (key, value) in entries {
        let Value::String(key) = key else {
            return Err(DecodeError::Shape {
                what: "event keys are strings",
            });
        };
        match key.as_str().unwrap_or("") {
            "type" => tag = Some(string(value, "type")?),
            "block_hashes" => {
                stored.block_hashes = list(value, "block_hashes", |v| uint(v, "block_hashes"))?;
                seen_hashes = true;
            }
            "parent_block_hash" => {
                stored.parent_block_hash = opt(value, |v| uint(v, "parent_block_hash"))?
            }
            "token_ids" => {
                stored.token_ids = list(value, "token_ids", |v| {
                    u32::try_from(uint(v, "token_ids")?)
                        .map_err(|_| DecodeError::BadField { field: "token_ids" })
                })?;
                seen_tokens = true;
            }
            "block_size" => {
                stored.block_size = uint(value, "block_size")?;
                seen_size = true;
            }
            "lora_id" => stored.lora_id = opt(value, |v| uint(v, "lora_id"))?,
            "medium" => stored.medium = opt(value, |v| string(v, "medium"))?,
            "lora_name" => stored.lora_name = opt(value, |v| string(v, "lora_name"))?,
            "group_idx" => stored.group_idx = opt(value, |v| small(v, "group_idx"))?,
            "kv_cache_spec_kind" => {
                stored.kv_cache_spec_kind = opt(value, |v| string(v, "kv_cache_spec_kind"))?
            }
            "kv_cache_spec_sliding_window" => {
                stored.kv_cache_spec_sliding_window =
                    opt(value, |v| small(v, "kv_cache_spec_sliding_window"))?;
            }
            _ => {}
        }
    }
    let Some(tag) = tag else {
        return Err(DecodeError::Shape {
            what: "an event has a \"type\"",
        });
    };
    let missing = |event, field| Err(DecodeError::MissingField { event, field });
    match tag.as_str() {
        "BlockStored" => {
            if !seen_hashes {
                return missing("BlockStored", "block_hashes");
            }
            if !seen_tokens {
                return missing("BlockStored", "token_ids");
            }
            if !seen_size {
                return missing("BlockStored", "block_size");
            }
            Ok(Event::BlockStored(stored))
        }
        "BlockRemoved" => {
            if !seen_hashes {
                return missing("BlockRemoved", "block_hashes");
            }
            Ok(Event::BlockRemoved(RemovedEvent {
                block_hashes: stored.block_hashes,
                medium: stored.medium,
                group_idx: stored.group_idx,
            }))
        }
        "AllBlocksCleared" => Ok(Event::AllBlocksCleared),
        _ => Err(DecodeError::UnknownEventType { name: tag }),
    }
}

fn uint(value: Value, field: &'static str) -> Result<u64, DecodeError> {
    match value {
        Value::Integer(i) => i.as_u64().ok_or(DecodeError::BadField { field }),
        _ => Err(DecodeError::BadField { field }),
    }
}

fn small(value: Value, field: &'static str) -> Result<u32, DecodeError> {
    u32::try_from(uint(value, field)?).map_err(|_| DecodeError::BadField { field })
}

fn string(value: Value, field: &'static str) -> Result<String, DecodeError> {
    match value {
        Value::String(s) => s.into_str().ok_or(DecodeError::BadField { field }),
        _ => Err(DecodeError::BadField { field }),
    }
}

fn opt<T>(
    value: Value,
    f: impl FnOnce(Value) -> Result<T, DecodeError>,
) -> Result<Option<T>, DecodeError> {
    match value {
        Value::Nil => Ok(None),
        v => f(v).map(Some),
    }
}

fn list<T>(
    value: Value,
    field: &'static str,
    f: impl FnMut(Value) -> Result<T, DecodeError>,
) -> Result<Vec<T>, DecodeError> {
    match value {
        Value::Array(items) => items.into_iter().map(f).collect(),
        _ => Err(DecodeError::BadField { field }),
    }
}
