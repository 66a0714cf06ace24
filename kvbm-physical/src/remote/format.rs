//! The key and value format of the remote tier.
//!
//! **Key:** `{prefix}:{model}:{layout fingerprint, 16 hex}[:dt={dtype}][:tp={rank}of{world}]:v{hash
//! spec}:{sequence hash, 16 hex}`, e.g. `kvbm:llama-3-8b:9f3c0a1b2c3d4e5f:dt=bf16:tp=1of2:v1:00000000000004d2`.
//! The part before the sequence hash is the [`Namespace`]: deployments with different models,
//! layouts, element types, tensor-parallel shards or hashing specifications never read each
//! other's keys. Keys contain no `{` or `}`, so Redis Cluster spreads them over
//! every slot (no hash tag).
//!
//! **Value:** a 48-byte header, then the block image (`block_bytes` long):
//!
//! | offset | bytes | field |
//! |---|---|---|
//! | 0 | 4 | magic `KVB4` |
//! | 4 | 2 | format version (1), little-endian |
//! | 6 | 2 | flags: bit 0 = has a parent |
//! | 8 | 8 | sequence hash |
//! | 16 | 8 | parent hash (0 when none) |
//! | 24 | 8 | namespace fingerprint (xxh3 of the key prefix) |
//! | 32 | 8 | block length in bytes |
//! | 40 | 8 | checksum: xxh3-64 of the block, seeded with xxh3-64 of bytes 0..40 |
//!
//! All integers are little-endian. A value is served only when every field matches what the
//! reader expects and the checksum verifies; see [`verify`].

use std::fmt;

use kvbm_logical::{HASH_SPEC_VERSION, SequenceHash};
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use crate::LayoutConfig;

/// Bytes of the value header in front of every block image.
pub const HEADER_BYTES: usize = 48;

/// The first four bytes of every value.
pub const MAGIC: [u8; 4] = *b"KVB4";

/// The value format's version. From version 2 on it is part of every key (`:f{N}`), so
/// releases of two formats never share keys; a value of another version found under a key
/// anyway is a miss that stays where it is, never removed.
pub const FORMAT_VERSION: u16 = 1;

const FLAG_HAS_PARENT: u16 = 1;

/// Longest model id or key prefix accepted, in bytes.
pub const MAX_NAME_BYTES: usize = 200;

/// The isolation unit of the remote tier: a key prefix, a model id, a layout fingerprint and the
/// hashing specification's version. Servers that share a namespace share blocks; servers in
/// different namespaces never see each other's blocks, even on the same Redis.
///
/// ```
/// use kvbm_physical::LayoutConfig;
/// use kvbm_physical::remote::Namespace;
/// use kvbm_logical::SequenceHash;
///
/// let layout = LayoutConfig { num_blocks: 1024, num_layers: 32, outer_dim: 2, page_size: 16, inner_dim: 1024, dtype_bytes: 2 };
/// let ns = Namespace::for_layout("llama-3-8b", &layout);
/// let key = ns.key(SequenceHash::new(0x4d2));
/// assert!(key.starts_with(b"kvbm:llama-3-8b:"));
/// assert!(key.ends_with(b":v1:00000000000004d2"));
/// // Another model never shares keys.
/// assert_ne!(Namespace::for_layout("mistral-7b", &layout).key(SequenceHash::new(0x4d2)), key);
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Namespace {
    prefix: String,
    model: String,
    layout: u64,
    dtype: Option<String>,
    shard: Option<(u32, u32)>,
    hash_spec: u32,
    /// `{prefix}:{model}:{layout:016x}[:dt={dtype}][:tp={rank}of{world}]:v{hash_spec}:`
    key_prefix: String,
}

impl Namespace {
    /// A namespace for `model` (any id without whitespace, `:`, `{` or `}`; checked when the
    /// [`RemoteConfig`](super::RemoteConfig) is built) and a layout fingerprint (see
    /// [`layout_fingerprint`]), with the key prefix `kvbm` and this crate's
    /// [`HASH_SPEC_VERSION`].
    ///
    /// The layout fingerprint covers the block's shape and element *size*, nothing more: the
    /// model id must tell apart everything else that changes what a block's bytes mean for
    /// the same tokens (the weights and their revision, a fine-tune), and
    /// [`with_dtype`](Self::with_dtype) and [`with_shard`](Self::with_shard) the element type
    /// and the tensor-parallel rank. Two servers that differ in any of these and share a
    /// namespace would serve each other's KV, which verifies (the checksum covers the bytes,
    /// not their meaning).
    ///
    /// ```
    /// use kvbm_physical::remote::Namespace;
    /// assert_eq!(Namespace::new("m", 0xab).key_prefix(), "kvbm:m:00000000000000ab:v1:");
    /// ```
    pub fn new(model: impl Into<String>, layout_fingerprint: u64) -> Self {
        Self {
            prefix: "kvbm".to_owned(),
            model: model.into(),
            layout: layout_fingerprint,
            dtype: None,
            shard: None,
            hash_spec: HASH_SPEC_VERSION,
            key_prefix: String::new(),
        }
        .keyed()
    }

    /// [`Namespace::new`] with the fingerprint of `layout` ([`layout_fingerprint`]).
    ///
    /// ```
    /// use kvbm_physical::LayoutConfig;
    /// use kvbm_physical::remote::{Namespace, layout_fingerprint};
    /// let layout = LayoutConfig { num_blocks: 8, num_layers: 2, outer_dim: 2, page_size: 16, inner_dim: 64, dtype_bytes: 2 };
    /// assert_eq!(Namespace::for_layout("m", &layout), Namespace::new("m", layout_fingerprint(&layout)));
    /// ```
    pub fn for_layout(model: impl Into<String>, layout: &LayoutConfig) -> Self {
        Self::new(model, layout_fingerprint(layout))
    }

    /// The same namespace under another hashing-specification version (for a deployment whose
    /// engines hash blocks with another scheme).
    ///
    /// ```
    /// use kvbm_physical::remote::Namespace;
    /// assert_eq!(Namespace::new("m", 1).with_hash_spec(7).key_prefix(), "kvbm:m:0000000000000001:v7:");
    /// ```
    pub fn with_hash_spec(mut self, version: u32) -> Self {
        self.hash_spec = version;
        self.keyed()
    }

    /// The same namespace under another key prefix (default `kvbm`), e.g. one per tenant or
    /// environment sharing a Redis.
    ///
    /// ```
    /// use kvbm_physical::remote::Namespace;
    /// assert_eq!(Namespace::new("m", 1).with_prefix("staging").key_prefix(), "staging:m:0000000000000001:v1:");
    /// ```
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self.keyed()
    }

    /// The same namespace for KV of element type `dtype` (a name such as `bf16`, `fp16` or
    /// `fp8_e4m3`; the same rules as the model id). The layout fingerprint has only the
    /// element's size, which bf16 and fp16 (or the two fp8 kinds) share.
    ///
    /// ```
    /// use kvbm_physical::remote::Namespace;
    /// let bf16 = Namespace::new("m", 1).with_dtype("bf16");
    /// assert_eq!(bf16.key_prefix(), "kvbm:m:0000000000000001:dt=bf16:v1:");
    /// assert_ne!(bf16, Namespace::new("m", 1).with_dtype("fp16"));
    /// ```
    pub fn with_dtype(mut self, dtype: impl Into<String>) -> Self {
        self.dtype = Some(dtype.into());
        self.keyed()
    }

    /// The same namespace for one tensor-parallel shard: rank `rank` of `world` (checked when
    /// the [`RemoteConfig`](super::RemoteConfig) is built: `rank < world`). Each rank holds
    /// other heads of the same tokens, in blocks of the same layout: without this, ranks that
    /// share a Redis would read each other's blocks.
    ///
    /// ```
    /// use kvbm_physical::remote::Namespace;
    /// let rank1 = Namespace::new("m", 1).with_shard(1, 2);
    /// assert_eq!(rank1.key_prefix(), "kvbm:m:0000000000000001:tp=1of2:v1:");
    /// assert_ne!(rank1, Namespace::new("m", 1).with_shard(0, 2));
    /// ```
    pub fn with_shard(mut self, rank: u32, world: u32) -> Self {
        self.shard = Some((rank, world));
        self.keyed()
    }

    fn keyed(mut self) -> Self {
        use std::fmt::Write as _;
        let mut key = format!("{}:{}:{:016x}", self.prefix, self.model, self.layout);
        if let Some(dtype) = &self.dtype {
            let _ = write!(key, ":dt={dtype}");
        }
        if let Some((rank, world)) = self.shard {
            let _ = write!(key, ":tp={rank}of{world}");
        }
        // Format version 1 has no segment (its keys predate the rule); every later version
        // puts its own in the key, so that servers of two releases sharing a namespace during
        // a rolling upgrade neither read nor block (`SET NX`) each other's values.
        if FORMAT_VERSION > 1 {
            let _ = write!(key, ":f{FORMAT_VERSION}");
        }
        let _ = write!(key, ":v{}:", self.hash_spec);
        self.key_prefix = key;
        self
    }

    /// The element type, if set ([`with_dtype`](Self::with_dtype)).
    pub fn dtype(&self) -> Option<&str> {
        self.dtype.as_deref()
    }

    /// The tensor-parallel shard `(rank, world)`, if set ([`with_shard`](Self::with_shard)).
    pub fn shard(&self) -> Option<(u32, u32)> {
        self.shard
    }

    /// The model id.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// The layout fingerprint.
    pub fn layout_fingerprint(&self) -> u64 {
        self.layout
    }

    /// The hashing specification's version.
    pub fn hash_spec(&self) -> u32 {
        self.hash_spec
    }

    /// Every key of this namespace starts with this.
    pub fn key_prefix(&self) -> &str {
        &self.key_prefix
    }

    /// The Redis key of `hash` in this namespace.
    pub fn key(&self, hash: SequenceHash) -> Vec<u8> {
        let mut key = Vec::with_capacity(self.key_prefix.len() + 16);
        self.write_key(hash, &mut key);
        key
    }

    /// Appends the key of `hash` to `out`.
    pub(crate) fn write_key(&self, hash: SequenceHash, out: &mut Vec<u8>) {
        out.extend_from_slice(self.key_prefix.as_bytes());
        push_hex(out, hash.as_u64());
    }

    /// Bytes of every key of this namespace.
    pub(crate) fn key_len(&self) -> usize {
        self.key_prefix.len() + 16
    }

    /// The fingerprint written into every value's header: xxh3 of the key prefix, so a value
    /// copied from another namespace never verifies.
    pub fn fingerprint(&self) -> u64 {
        xxh3_64(self.key_prefix.as_bytes())
    }

    /// Why this namespace cannot be used, if it cannot.
    pub(crate) fn problem(&self) -> Option<&'static str> {
        if let Some((rank, world)) = self.shard
            && rank >= world
        {
            return Some("the tensor-parallel rank is not below the world size");
        }
        if let Some(dtype) = &self.dtype
            && let Some(p) = check_name(
                dtype,
                [
                    "the dtype name is empty",
                    "the dtype name is longer than 200 bytes",
                    "the dtype name contains whitespace, a control character, ':', '{' or '}'",
                ],
            )
        {
            return Some(p);
        }
        check_name(
            &self.model,
            [
                "the model id is empty",
                "the model id is longer than 200 bytes",
                "the model id contains whitespace, a control character, ':', '{' or '}'",
            ],
        )
        .or_else(|| {
            check_name(
                &self.prefix,
                [
                    "the key prefix is empty",
                    "the key prefix is longer than 200 bytes",
                    "the key prefix contains whitespace, a control character, ':', '{' or '}'",
                ],
            )
        })
    }
}

/// `[empty, too long, bad character]` for `name`, or `None` when it is usable in a key.
fn check_name(name: &str, problems: [&'static str; 3]) -> Option<&'static str> {
    if name.is_empty() {
        Some(problems[0])
    } else if name.len() > MAX_NAME_BYTES {
        Some(problems[1])
    } else if name
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || matches!(c, ':' | '{' | '}'))
    {
        Some(problems[2])
    } else {
        None
    }
}

impl fmt::Debug for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Namespace({:?})", self.key_prefix)
    }
}

impl fmt::Display for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key_prefix)
    }
}

/// A fingerprint of what a block image's bytes mean: layers, K/V, tokens per block, elements
/// and bytes per element, in the fully contiguous (block-major) image format. The pool size
/// (`num_blocks`) does not enter: servers with different pool sizes share blocks.
///
/// ```
/// use kvbm_physical::LayoutConfig;
/// use kvbm_physical::remote::layout_fingerprint;
/// let a = LayoutConfig { num_blocks: 8, num_layers: 2, outer_dim: 2, page_size: 16, inner_dim: 64, dtype_bytes: 2 };
/// assert_eq!(layout_fingerprint(&a), layout_fingerprint(&LayoutConfig { num_blocks: 4096, ..a }));
/// assert_ne!(layout_fingerprint(&a), layout_fingerprint(&LayoutConfig { dtype_bytes: 1, ..a }));
/// ```
pub fn layout_fingerprint(layout: &LayoutConfig) -> u64 {
    let mut bytes = Vec::with_capacity(48);
    bytes.extend_from_slice(b"kvbm-block-image/fully-contiguous/1");
    for v in [
        layout.num_layers,
        layout.outer_dim,
        layout.page_size,
        layout.inner_dim,
        layout.dtype_bytes,
    ] {
        bytes.extend_from_slice(&(v as u64).to_le_bytes());
    }
    xxh3_64(&bytes)
}

fn push_hex(out: &mut Vec<u8>, v: u64) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for shift in (0..16).rev() {
        out.push(HEX[((v >> (shift * 4)) & 0xf) as usize]);
    }
}

/// The header of a value for `hash` with `parent`, in namespace `fingerprint`, over `block`.
pub(crate) fn header(
    hash: SequenceHash,
    parent: Option<SequenceHash>,
    fingerprint: u64,
    block: &[u8],
) -> [u8; HEADER_BYTES] {
    let mut h = [0u8; HEADER_BYTES];
    h[0..4].copy_from_slice(&MAGIC);
    h[4..6].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    let flags = if parent.is_some() { FLAG_HAS_PARENT } else { 0 };
    h[6..8].copy_from_slice(&flags.to_le_bytes());
    h[8..16].copy_from_slice(&hash.as_u64().to_le_bytes());
    h[16..24].copy_from_slice(&parent.map_or(0, SequenceHash::as_u64).to_le_bytes());
    h[24..32].copy_from_slice(&fingerprint.to_le_bytes());
    h[32..40].copy_from_slice(&(block.len() as u64).to_le_bytes());
    let checksum = xxh3_64_with_seed(block, xxh3_64(&h[0..40]));
    h[40..48].copy_from_slice(&checksum.to_le_bytes());
    h
}

/// A whole value (header and block), as [`RemoteStore`](super::RemoteStore) writes it; for
/// tests and tools that write values behind the store's back.
///
/// ```
/// use kvbm_logical::SequenceHash;
/// use kvbm_physical::remote::{HEADER_BYTES, Namespace, encode_value, verify};
/// let ns = Namespace::new("m", 1);
/// let block = vec![7u8; 64];
/// let value = encode_value(&ns, SequenceHash::new(5), None, &block);
/// assert_eq!(value.len(), HEADER_BYTES + 64);
/// assert_eq!(verify(&value, SequenceHash::new(5), ns.fingerprint(), 64), Ok(None));
/// ```
pub fn encode_value(
    namespace: &Namespace,
    hash: SequenceHash,
    parent: Option<SequenceHash>,
    block: &[u8],
) -> Vec<u8> {
    let mut value = Vec::with_capacity(HEADER_BYTES + block.len());
    value.extend_from_slice(&header(hash, parent, namespace.fingerprint(), block));
    value.extend_from_slice(block);
    value
}

/// Why a stored value was not served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Corruption {
    /// Shorter than a header, or not header + `block_bytes` long.
    #[error("value of {actual} bytes, expected {expected}")]
    Length {
        /// Header plus the tier's block size.
        expected: usize,
        /// The value's length.
        actual: usize,
    },
    /// Not a kvbm value (magic).
    #[error("not a kvbm block value (magic)")]
    Format,
    /// A kvbm value of another format version (a server of another kvbm release sharing the
    /// namespace): not this reader's to judge, so a miss that leaves the value in place.
    #[error("a kvbm block value of format version {found}")]
    Version {
        /// The version in the header.
        found: u16,
    },
    /// The header names another sequence hash.
    #[error("header names hash {found:016x}")]
    Hash {
        /// The hash in the header.
        found: u64,
    },
    /// The header names another namespace.
    #[error("header names namespace fingerprint {found:016x}")]
    Fingerprint {
        /// The fingerprint in the header.
        found: u64,
    },
    /// The header's length field disagrees with the value.
    #[error("header says {found} block bytes")]
    HeaderLength {
        /// The length in the header.
        found: u64,
    },
    /// The header's flags are not a known combination.
    #[error("unknown header flags {found:#x}")]
    Flags {
        /// The flags in the header.
        found: u16,
    },
    /// The checksum over header and block does not match.
    #[error("checksum mismatch")]
    Checksum,
}

/// Checks a value read for `hash` in a namespace of `fingerprint` with blocks of
/// `block_bytes`; on success returns the stored parent hash. See the [module docs](self).
///
/// ```
/// use kvbm_logical::SequenceHash;
/// use kvbm_physical::remote::{Corruption, Namespace, encode_value, verify};
/// let ns = Namespace::new("m", 1);
/// let mut value = encode_value(&ns, SequenceHash::new(5), Some(SequenceHash::new(4)), &[1, 2, 3, 4]);
/// assert_eq!(verify(&value, SequenceHash::new(5), ns.fingerprint(), 4), Ok(Some(SequenceHash::new(4))));
/// *value.last_mut().unwrap() ^= 1;
/// assert_eq!(verify(&value, SequenceHash::new(5), ns.fingerprint(), 4), Err(Corruption::Checksum));
/// ```
pub fn verify(
    value: &[u8],
    hash: SequenceHash,
    fingerprint: u64,
    block_bytes: usize,
) -> Result<Option<SequenceHash>, Corruption> {
    let parent = check_header(value, hash, fingerprint, block_bytes)?;
    let block = &value[HEADER_BYTES..];
    if xxh3_64_with_seed(block, checksum_seed(value)) != stored_checksum(value) {
        return Err(Corruption::Checksum);
    }
    Ok(parent)
}

/// The checksum's seed: xxh3-64 of the header's first 40 bytes (`head` is a whole header).
pub(crate) fn checksum_seed(head: &[u8]) -> u64 {
    xxh3_64(&head[0..40])
}

/// The checksum stored in a header.
pub(crate) fn stored_checksum(head: &[u8]) -> u64 {
    u64_at(head, 40)
}

fn u64_at(value: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&value[at..at + 8]);
    u64::from_le_bytes(b)
}

/// Everything but the checksum; the stored parent.
fn check_header(
    value: &[u8],
    hash: SequenceHash,
    fingerprint: u64,
    block_bytes: usize,
) -> Result<Option<SequenceHash>, Corruption> {
    let expected = HEADER_BYTES + block_bytes;
    if value.len() != expected {
        return Err(Corruption::Length {
            expected,
            actual: value.len(),
        });
    }
    check_head(&value[..HEADER_BYTES], hash, fingerprint, block_bytes)
}

/// Every header field of `value` (a whole header, [`HEADER_BYTES`] long) but the checksum,
/// for a value of `block_bytes`; the stored parent.
pub(crate) fn check_head(
    value: &[u8],
    hash: SequenceHash,
    fingerprint: u64,
    block_bytes: usize,
) -> Result<Option<SequenceHash>, Corruption> {
    if value[0..4] != MAGIC {
        return Err(Corruption::Format);
    }
    let version = u16::from_le_bytes([value[4], value[5]]);
    if version != FORMAT_VERSION {
        return Err(Corruption::Version { found: version });
    }
    let flags = u16::from_le_bytes([value[6], value[7]]);
    if flags & !FLAG_HAS_PARENT != 0 {
        return Err(Corruption::Flags { found: flags });
    }
    let found = u64_at(value, 8);
    if found != hash.as_u64() {
        return Err(Corruption::Hash { found });
    }
    let parent = u64_at(value, 16);
    let found = u64_at(value, 24);
    if found != fingerprint {
        return Err(Corruption::Fingerprint { found });
    }
    let found = u64_at(value, 32);
    if found != block_bytes as u64 {
        return Err(Corruption::HeaderLength { found });
    }
    if flags & FLAG_HAS_PARENT != 0 {
        Ok(Some(SequenceHash::new(parent)))
    } else if parent == 0 {
        Ok(None)
    } else {
        // No parent flag but a parent hash: not something this format writes.
        Err(Corruption::Flags { found: flags })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns() -> Namespace {
        Namespace::new("model", 0x1234)
    }

    #[test]
    fn round_trip_with_and_without_parent() {
        let block: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        for parent in [
            None,
            Some(SequenceHash::new(99)),
            Some(SequenceHash::new(0)),
        ] {
            let v = encode_value(&ns(), SequenceHash::new(3), parent, &block);
            assert_eq!(
                verify(&v, SequenceHash::new(3), ns().fingerprint(), 1000),
                Ok(parent)
            );
            assert_eq!(&v[HEADER_BYTES..], &block[..]);
        }
    }

    #[test]
    fn every_single_bit_flip_is_caught() {
        let block: Vec<u8> = (0..64u32).map(|i| (i * 13 + 1) as u8).collect();
        let v = encode_value(
            &ns(),
            SequenceHash::new(3),
            Some(SequenceHash::new(2)),
            &block,
        );
        for byte in 0..v.len() {
            for bit in 0..8 {
                let mut w = v.clone();
                w[byte] ^= 1 << bit;
                assert!(
                    verify(&w, SequenceHash::new(3), ns().fingerprint(), 64).is_err(),
                    "flip of bit {bit} in byte {byte} verified"
                );
            }
        }
    }

    #[test]
    fn wrong_hash_namespace_length_and_garbage() {
        let block = vec![5u8; 32];
        let v = encode_value(&ns(), SequenceHash::new(3), None, &block);
        let fp = ns().fingerprint();
        assert_eq!(
            verify(&v, SequenceHash::new(4), fp, 32),
            Err(Corruption::Hash { found: 3 })
        );
        let other = Namespace::new("model", 0x1235);
        assert!(matches!(
            verify(&v, SequenceHash::new(3), other.fingerprint(), 32),
            Err(Corruption::Fingerprint { .. })
        ));
        assert_eq!(
            verify(&v, SequenceHash::new(3), fp, 31),
            Err(Corruption::Length {
                expected: HEADER_BYTES + 31,
                actual: HEADER_BYTES + 32
            })
        );
        assert!(verify(b"garbage", SequenceHash::new(3), fp, 32).is_err());
        assert!(verify(&[], SequenceHash::new(3), fp, 0).is_err());
        let mut zeros = vec![0u8; HEADER_BYTES + 32];
        assert_eq!(
            verify(&zeros, SequenceHash::new(3), fp, 32),
            Err(Corruption::Format)
        );
        zeros[..v.len()].copy_from_slice(&v);
        assert!(verify(&zeros, SequenceHash::new(3), fp, 32).is_ok());
    }

    #[test]
    fn namespaces_differ_in_every_part() {
        let base = Namespace::new("m", 1);
        let variants = [
            Namespace::new("n", 1),
            Namespace::new("m", 2),
            Namespace::new("m", 1).with_hash_spec(2),
            Namespace::new("m", 1).with_prefix("other"),
        ];
        for v in &variants {
            assert_ne!(v.key(SequenceHash::new(1)), base.key(SequenceHash::new(1)));
            assert_ne!(v.fingerprint(), base.fingerprint());
        }
        assert_eq!(base.key(SequenceHash::new(1)).len(), base.key_len());
    }

    #[test]
    fn bad_names_are_reported() {
        assert!(Namespace::new("", 1).problem().is_some());
        assert!(Namespace::new("a b", 1).problem().is_some());
        assert!(Namespace::new("a:b", 1).problem().is_some());
        assert!(Namespace::new("{a}", 1).problem().is_some());
        assert!(Namespace::new("x".repeat(201), 1).problem().is_some());
        assert!(Namespace::new("m", 1).with_prefix("").problem().is_some());
        assert!(
            Namespace::new("meta-llama/Llama-3.1-8B", 1)
                .problem()
                .is_none()
        );
    }
}
