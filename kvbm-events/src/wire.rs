//! vLLM's KV-event schema and its msgpack encoding, byte for byte as vLLM's `msgspec`
//! encoder writes it.
//!
//! A **batch** is a msgpack array `[ts, events, data_parallel_rank]` (vLLM's `EventBatch` is an
//! `array_like` struct, and msgspec writes every field of an `array_like` struct, so an unset
//! rank is `nil`, never left out). Each **event** is a msgpack map whose first key is `"type"`
//! (msgspec's `tag=True`) followed by the fields in declaration order; a field that has a default
//! in vLLM's struct is left out while it holds that default (`omit_defaults=True`), and a field
//! without a default is always written, `nil` when `None`:
//!
//! | event | always written | written only when set |
//! |---|---|---|
//! | `BlockStored` | `block_hashes`, `parent_block_hash`, `token_ids`, `block_size`, `lora_id`, `medium`, `lora_name` | `group_idx`, `kv_cache_spec_kind`, `kv_cache_spec_sliding_window` (`extra_keys` is never written) |
//! | `BlockRemoved` | `block_hashes`, `medium` | `group_idx` |
//! | `AllBlocksCleared` | — | — |
//!
//! Integers take msgpack's shortest form (as msgspec does), block hashes are unsigned
//! integers, `ts` is a float64.
//!
//! ```
//! use kvbm_events::wire::{encode_batch, BlockHashes, BlockRemoved, WireEvent};
//! use kvbm_logical::SequenceHash;
//!
//! let hashes = [SequenceHash::new(7)];
//! let removed = BlockRemoved::new(BlockHashes::Sequence(&hashes), Some("GPU"));
//! let mut payload = Vec::new();
//! encode_batch(&mut payload, 1.5, &[WireEvent::BlockRemoved(removed)], Some(0))?;
//! // [1.5, [{"type": "BlockRemoved", "block_hashes": [7], "medium": "GPU"}], 0]
//! assert_eq!(payload[0], 0x93); // a 3-element array
//! let batch = kvbm_events::decode_batch(&payload)?;
//! assert_eq!(batch.data_parallel_rank, Some(0));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::convert::Infallible;

use kvbm_logical::{BlockTier, SequenceHash};
use rmp::encode::{self, ByteBuf, ValueWriteError};

/// The memory tier a block lives in: vLLM's `medium` field.
///
/// vLLM names `"GPU"` (its KV cache) and `"CPU"` (its offload connector's host memory). kvbm's
/// lower tiers use `"DISK"` (G3, a local file) and `"REMOTE"` (G4, a store shared by many
/// servers), the names its store tiers already report. A router that does not know a medium
/// can filter on it.
///
/// ```
/// use kvbm_events::Medium;
/// use kvbm_logical::{Device, Host};
/// assert_eq!(Medium::for_tier::<Device>(), Medium::GPU);
/// assert_eq!(Medium::for_tier::<Host>().as_str(), "CPU");
/// assert_eq!(Medium::for_tier_name("disk"), Some(Medium::DISK));
/// assert_eq!(Medium::for_tier_name("tape"), None);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Medium(&'static str);

impl Medium {
    /// GPU memory (kvbm's G1, `Device`).
    pub const GPU: Medium = Medium("GPU");
    /// Host memory (kvbm's G2, `Host`).
    pub const CPU: Medium = Medium("CPU");
    /// A local disk tier (kvbm's G3, `Disk`).
    pub const DISK: Medium = Medium("DISK");
    /// A remote store shared by many servers (kvbm's G4).
    pub const REMOTE: Medium = Medium("REMOTE");

    /// A medium of another name (written as given).
    pub const fn custom(name: &'static str) -> Self {
        Medium(name)
    }

    /// The name on the wire.
    pub const fn as_str(self) -> &'static str {
        self.0
    }

    /// The medium of a kvbm tier name (`BlockTier::NAME`: `"device"`, `"host"`, `"disk"`,
    /// `"remote"`), if it is one of those.
    pub fn for_tier_name(name: &str) -> Option<Medium> {
        match name {
            "device" => Some(Self::GPU),
            "host" => Some(Self::CPU),
            "disk" => Some(Self::DISK),
            "remote" => Some(Self::REMOTE),
            _ => None,
        }
    }

    /// The medium of tier `T`; a tier of another name is published under its own name.
    pub fn for_tier<T: BlockTier>() -> Medium {
        Self::for_tier_name(T::NAME).unwrap_or(Medium(T::NAME))
    }
}

/// The block hashes of an event: kvbm's own, or plain integers (a decoded event).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockHashes<'a> {
    /// Hashes as a kvbm manager reports them.
    Sequence(&'a [SequenceHash]),
    /// Hashes as integers.
    Raw(&'a [u64]),
}

impl BlockHashes<'_> {
    /// How many.
    pub fn len(&self) -> usize {
        match self {
            Self::Sequence(h) => h.len(),
            Self::Raw(h) => h.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// vLLM's `BlockStored`: these blocks became matchable, in chain order.
///
/// ```
/// use kvbm_events::wire::{BlockHashes, BlockStored};
/// let stored = BlockStored::new(BlockHashes::Raw(&[1, 2]), None, 16);
/// assert_eq!(stored.token_ids, &[] as &[u32]);
/// assert_eq!(stored.medium, None);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockStored<'a> {
    /// The stored hashes; each one's parent is the one before it.
    pub block_hashes: BlockHashes<'a>,
    /// The first block's parent, if any.
    pub parent_block_hash: Option<u64>,
    /// The tokens of all blocks, `block_size` per block (empty when not known).
    pub token_ids: &'a [u32],
    /// Tokens per block.
    pub block_size: u64,
    /// vLLM's deprecated LoRA id (`lora_name` replaces it); always written.
    pub lora_id: Option<u64>,
    /// The tier (see [`Medium`]); always written.
    pub medium: Option<&'a str>,
    /// The LoRA adapter whose KV this is; always written.
    pub lora_name: Option<&'a str>,
    /// The KV-cache group (hybrid models); written only when set.
    pub group_idx: Option<u32>,
    /// The group's attention kind (`"full_attention"`, ...); written only when set.
    pub kv_cache_spec_kind: Option<&'a str>,
    /// The group's sliding window; written only when set.
    pub kv_cache_spec_sliding_window: Option<u32>,
}

impl<'a> BlockStored<'a> {
    /// An event with no tokens, no LoRA, no medium and no group metadata.
    pub fn new(
        block_hashes: BlockHashes<'a>,
        parent_block_hash: Option<u64>,
        block_size: u64,
    ) -> Self {
        Self {
            block_hashes,
            parent_block_hash,
            token_ids: &[],
            block_size,
            lora_id: None,
            medium: None,
            lora_name: None,
            group_idx: None,
            kv_cache_spec_kind: None,
            kv_cache_spec_sliding_window: None,
        }
    }
}

/// vLLM's `BlockRemoved`: these blocks left the cache (of this medium).
///
/// ```
/// use kvbm_events::wire::{BlockHashes, BlockRemoved};
/// let removed = BlockRemoved::new(BlockHashes::Raw(&[3]), Some("CPU"));
/// assert_eq!(removed.group_idx, None);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockRemoved<'a> {
    /// The removed hashes.
    pub block_hashes: BlockHashes<'a>,
    /// The tier; always written.
    pub medium: Option<&'a str>,
    /// The KV-cache group; written only when set.
    pub group_idx: Option<u32>,
}

impl<'a> BlockRemoved<'a> {
    /// An event without group metadata.
    pub fn new(block_hashes: BlockHashes<'a>, medium: Option<&'a str>) -> Self {
        Self {
            block_hashes,
            medium,
            group_idx: None,
        }
    }
}

/// One event of vLLM's `KVEventBatch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireEvent<'a> {
    /// `BlockStored`.
    BlockStored(BlockStored<'a>),
    /// `BlockRemoved`.
    BlockRemoved(BlockRemoved<'a>),
    /// `AllBlocksCleared`: the server caches nothing any more.
    AllBlocksCleared,
}

impl WireEvent<'_> {
    /// How many block hashes it carries (0 for `AllBlocksCleared`).
    pub fn block_count(&self) -> usize {
        match self {
            Self::BlockStored(e) => e.block_hashes.len(),
            Self::BlockRemoved(e) => e.block_hashes.len(),
            Self::AllBlocksCleared => 0,
        }
    }
}

/// How a batch is framed. vLLM 0.26 declares its `EventBatch` `array_like`
/// (`[ts, events, data_parallel_rank]`, the default here); a later revision of
/// `kv_events.py` declares it without `array_like`, a map
/// `{"ts", "events", "data_parallel_rank"}` with the rank left out when unset
/// (`omit_defaults`). msgspec decoders accept only the layout their structs declare, so
/// publish the one the routers' vLLM version reads. The events are the same maps in both.
///
/// ```
/// use kvbm_events::wire::{encode_batch_as, BatchLayout, WireEvent};
/// let mut out = Vec::new();
/// encode_batch_as(&mut out, BatchLayout::Map, 0.5, &[WireEvent::AllBlocksCleared], None)?;
/// assert_eq!(out[0], 0x82); // {"ts": 0.5, "events": [...]}: no rank
/// let batch = kvbm_events::decode_batch(&out)?;
/// assert_eq!(batch.data_parallel_rank, None);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BatchLayout {
    /// `[ts, events, data_parallel_rank]`, the rank `nil` when unset (vLLM 0.26).
    #[default]
    Array,
    /// `{"ts": .., "events": .., "data_parallel_rank": ..}`, the rank left out when unset.
    Map,
}

/// Why a batch could not be encoded (the output was left as it was).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// A list or string longer than msgpack can frame (2^32 − 1 elements or bytes).
    #[error("{field} has {len} elements or bytes; msgpack frames at most 4294967295")]
    TooLong {
        /// The field.
        field: &'static str,
        /// Its length.
        len: usize,
    },
}

/// Appends one batch, `[ts, events, data_parallel_rank]`, to `out`.
///
/// `ts` is seconds since the Unix epoch. On error `out` is left as it was.
///
/// ```
/// use kvbm_events::wire::{encode_batch, WireEvent};
/// let mut out = Vec::new();
/// encode_batch(&mut out, 0.5, &[WireEvent::AllBlocksCleared], None)?;
/// // [0.5, [{"type": "AllBlocksCleared"}], nil]
/// assert_eq!(out[..2], [0x93, 0xcb]);
/// assert_eq!(*out.last().unwrap(), 0xc0);
/// # Ok::<(), kvbm_events::EncodeError>(())
/// ```
pub fn encode_batch(
    out: &mut Vec<u8>,
    ts: f64,
    events: &[WireEvent<'_>],
    data_parallel_rank: Option<u32>,
) -> Result<(), EncodeError> {
    encode_batch_as(out, BatchLayout::Array, ts, events, data_parallel_rank)
}

/// [`encode_batch`] in a given [`BatchLayout`].
pub fn encode_batch_as(
    out: &mut Vec<u8>,
    layout: BatchLayout,
    ts: f64,
    events: &[WireEvent<'_>],
    data_parallel_rank: Option<u32>,
) -> Result<(), EncodeError> {
    let begun = BatchWriter::begin(
        std::mem::take(out),
        layout,
        ts,
        events.len(),
        data_parallel_rank,
    );
    let mut writer = match begun {
        Ok(w) => w,
        Err((buf, e)) => {
            *out = buf;
            return Err(e);
        }
    };
    match events.iter().try_for_each(|e| writer.event(e)) {
        Ok(()) => {
            *out = writer.finish();
            Ok(())
        }
        Err(e) => {
            *out = writer.abandon();
            Err(e)
        }
    }
}

/// Writes one batch into a reused buffer, event by event (the publisher's path).
pub(crate) struct BatchWriter {
    buf: ByteBuf,
    start: usize,
    layout: BatchLayout,
    rank: Option<u32>,
}

impl BatchWriter {
    /// Starts a batch of `events` events at the end of `buf`; gives `buf` back on error.
    pub(crate) fn begin(
        buf: Vec<u8>,
        layout: BatchLayout,
        ts: f64,
        events: usize,
        rank: Option<u32>,
    ) -> Result<Self, (Vec<u8>, EncodeError)> {
        let start = buf.len();
        let mut w = BatchWriter {
            buf: ByteBuf::from_vec(buf),
            start,
            layout,
            rank,
        };
        match layout {
            BatchLayout::Array => {
                ok(encode::write_array_len(&mut w.buf, 3));
            }
            BatchLayout::Map => {
                ok(encode::write_map_len(
                    &mut w.buf,
                    2 + u32::from(rank.is_some()),
                ));
                w.key("ts");
            }
        }
        ok(encode::write_f64(&mut w.buf, ts));
        if layout == BatchLayout::Map {
            w.key("events");
        }
        match w.array_len("events", events) {
            Ok(()) => Ok(w),
            Err(e) => Err((w.abandon(), e)),
        }
    }

    /// Writes one event. On error nothing of it stays in the buffer, but the batch is now
    /// one event short: the caller must [`abandon`](Self::abandon) it.
    pub(crate) fn event(&mut self, event: &WireEvent<'_>) -> Result<(), EncodeError> {
        match event {
            WireEvent::BlockStored(e) => self.stored(e),
            WireEvent::BlockRemoved(e) => self.removed(e),
            WireEvent::AllBlocksCleared => {
                ok(encode::write_map_len(&mut self.buf, 1));
                self.key("type");
                self.key("AllBlocksCleared");
                Ok(())
            }
        }
    }

    /// Ends the batch and returns the buffer.
    pub(crate) fn finish(mut self) -> Vec<u8> {
        match (self.layout, self.rank) {
            (BatchLayout::Array, Some(rank)) => self.uint(u64::from(rank)),
            (BatchLayout::Array, None) => self.nil(),
            (BatchLayout::Map, Some(rank)) => {
                self.key("data_parallel_rank");
                self.uint(u64::from(rank));
            }
            (BatchLayout::Map, None) => {}
        }
        self.buf.into_vec()
    }

    /// Drops what this batch wrote and returns the buffer as it was before.
    pub(crate) fn abandon(self) -> Vec<u8> {
        let mut v = self.buf.into_vec();
        v.truncate(self.start);
        v
    }

    fn stored(&mut self, e: &BlockStored<'_>) -> Result<(), EncodeError> {
        let mark = self.buf.as_slice().len();
        let optional = u32::from(e.group_idx.is_some())
            + u32::from(e.kv_cache_spec_kind.is_some())
            + u32::from(e.kv_cache_spec_sliding_window.is_some());
        ok(encode::write_map_len(&mut self.buf, 8 + optional));
        self.key("type");
        self.key("BlockStored");
        let result = (|| {
            self.key("block_hashes");
            self.hashes(&e.block_hashes)?;
            self.key("parent_block_hash");
            self.opt_uint(e.parent_block_hash);
            self.key("token_ids");
            self.array_len("token_ids", e.token_ids.len())?;
            for &t in e.token_ids {
                self.uint(u64::from(t));
            }
            self.key("block_size");
            self.uint(e.block_size);
            self.key("lora_id");
            self.opt_uint(e.lora_id);
            self.key("medium");
            self.opt_str("medium", e.medium)?;
            self.key("lora_name");
            self.opt_str("lora_name", e.lora_name)?;
            if let Some(g) = e.group_idx {
                self.key("group_idx");
                self.uint(u64::from(g));
            }
            if let Some(kind) = e.kv_cache_spec_kind {
                self.key("kv_cache_spec_kind");
                self.str("kv_cache_spec_kind", kind)?;
            }
            if let Some(w) = e.kv_cache_spec_sliding_window {
                self.key("kv_cache_spec_sliding_window");
                self.uint(u64::from(w));
            }
            Ok(())
        })();
        if result.is_err() {
            self.buf.as_mut_vec().truncate(mark);
        }
        result
    }

    fn removed(&mut self, e: &BlockRemoved<'_>) -> Result<(), EncodeError> {
        let mark = self.buf.as_slice().len();
        ok(encode::write_map_len(
            &mut self.buf,
            3 + u32::from(e.group_idx.is_some()),
        ));
        self.key("type");
        self.key("BlockRemoved");
        let result = (|| {
            self.key("block_hashes");
            self.hashes(&e.block_hashes)?;
            self.key("medium");
            self.opt_str("medium", e.medium)?;
            if let Some(g) = e.group_idx {
                self.key("group_idx");
                self.uint(u64::from(g));
            }
            Ok(())
        })();
        if result.is_err() {
            self.buf.as_mut_vec().truncate(mark);
        }
        result
    }

    fn hashes(&mut self, hashes: &BlockHashes<'_>) -> Result<(), EncodeError> {
        self.array_len("block_hashes", hashes.len())?;
        match hashes {
            BlockHashes::Sequence(h) => h.iter().for_each(|&h| self.uint(h.as_u64())),
            BlockHashes::Raw(h) => h.iter().for_each(|&h| self.uint(h)),
        }
        Ok(())
    }

    /// A short constant string (a key or a tag): always fits a fixstr.
    fn key(&mut self, s: &'static str) {
        debug_assert!(s.len() < 32);
        ok(encode::write_str(&mut self.buf, s));
    }

    fn str(&mut self, field: &'static str, s: &str) -> Result<(), EncodeError> {
        if u32::try_from(s.len()).is_err() {
            return Err(EncodeError::TooLong {
                field,
                len: s.len(),
            });
        }
        ok(encode::write_str(&mut self.buf, s));
        Ok(())
    }

    fn opt_str(&mut self, field: &'static str, s: Option<&str>) -> Result<(), EncodeError> {
        match s {
            Some(s) => self.str(field, s),
            None => {
                self.nil();
                Ok(())
            }
        }
    }

    fn array_len(&mut self, field: &'static str, len: usize) -> Result<(), EncodeError> {
        let n = u32::try_from(len).map_err(|_| EncodeError::TooLong { field, len })?;
        ok(encode::write_array_len(&mut self.buf, n));
        Ok(())
    }

    fn uint(&mut self, v: u64) {
        ok(encode::write_uint(&mut self.buf, v));
    }

    fn opt_uint(&mut self, v: Option<u64>) {
        match v {
            Some(v) => self.uint(v),
            None => self.nil(),
        }
    }

    fn nil(&mut self) {
        if let Err(never) = encode::write_nil(&mut self.buf) {
            match never {}
        }
    }
}

/// Unwraps a write into a `ByteBuf`, which cannot fail.
fn ok<T>(result: Result<T, ValueWriteError<Infallible>>) -> T {
    match result {
        Ok(v) => v,
        Err(
            ValueWriteError::InvalidMarkerWrite(never) | ValueWriteError::InvalidDataWrite(never),
        ) => match never {},
    }
}
