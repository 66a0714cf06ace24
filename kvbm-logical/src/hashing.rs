#![doc = include_str!("../docs/hashing.md")]

use std::fmt;

use xxhash_rust::xxh3::{Xxh3, xxh3_64_with_seed};

/// Version of the hashing specification implemented by this crate.
///
/// It is also the low 32 bits of [`HASH_SEED`], so two implementations of different
/// versions can never produce matching hashes by accident.
pub const HASH_SPEC_VERSION: u32 = 1;

/// The xxh3-64 seed of every hash in the specification: ASCII `kvbm` in the high 32 bits,
/// [`HASH_SPEC_VERSION`] in the low 32 bits.
pub const HASH_SEED: u64 = (u64::from_be_bytes(*b"kvbm\0\0\0\0")) | HASH_SPEC_VERSION as u64;

/// Field tag of a LoRA adapter id in the salt encoding.
const SALT_TAG_LORA: u8 = 0x01;
/// Field tag of an opaque cache salt in the salt encoding.
const SALT_TAG_CACHE_SALT: u8 = 0x02;

/// Names the content of one block **and of its whole prefix**.
///
/// Two blocks have the same `SequenceHash` exactly when they hold the same tokens, under the
/// same salt, after the same prefix (up to 64-bit hash collisions). It is the key of the block
/// registry, of prefix matching and of every event.
///
/// ```
/// use kvbm_logical::SequenceHash;
/// let h = SequenceHash::new(0x1234);
/// assert_eq!(h.as_u64(), 0x1234);
/// assert_eq!(h.to_string(), "0000000000001234");
/// assert_eq!(SequenceHash::from(7u64), SequenceHash::new(7));
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
#[repr(transparent)]
pub struct SequenceHash(u64);

impl SequenceHash {
    /// Wraps a raw 64-bit hash, e.g. one computed by an engine with its own scheme or read
    /// from a trace.
    pub const fn new(raw: u64) -> Self {
        Self(raw)
    }

    /// The raw 64-bit value.
    pub const fn as_u64(self) -> u64 {
        self.0
    }
}

impl From<u64> for SequenceHash {
    fn from(raw: u64) -> Self {
        Self(raw)
    }
}

impl From<SequenceHash> for u64 {
    fn from(hash: SequenceHash) -> Self {
        hash.0
    }
}

impl fmt::Display for SequenceHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for SequenceHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SequenceHash({:016x})", self.0)
    }
}

/// What isolates one cache namespace from another: a LoRA adapter and/or an opaque salt
/// (tenant, model revision, vLLM's `cache_salt`).
///
/// Requests with different salts never share blocks, even with identical tokens.
///
/// ```
/// use kvbm_logical::Salt;
/// let base = Salt::none();
/// let tenant = Salt::none().with_cache_salt(b"tenant-a");
/// let adapter = Salt::none().with_lora_id(7);
/// assert_ne!(base.hash(), tenant.hash());
/// assert_ne!(base.hash(), adapter.hash());
/// assert_eq!(tenant.hash(), Salt::none().with_cache_salt(b"tenant-a").hash());
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Salt {
    lora_id: Option<u64>,
    cache_salt: Option<Vec<u8>>,
}

impl Salt {
    /// No adapter and no salt: the default namespace.
    pub fn none() -> Self {
        Self::default()
    }

    /// Sets the LoRA adapter id (use the id your engine assigns to the adapter).
    pub fn with_lora_id(mut self, lora_id: u64) -> Self {
        self.lora_id = Some(lora_id);
        self
    }

    /// Sets an opaque salt (a tenant id, a model revision, a per-request `cache_salt`).
    pub fn with_cache_salt(mut self, salt: impl Into<Vec<u8>>) -> Self {
        self.cache_salt = Some(salt.into());
        self
    }

    /// The canonical byte encoding of the salt (see the specification above).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Some(lora) = self.lora_id {
            out.push(SALT_TAG_LORA);
            out.extend_from_slice(&lora.to_le_bytes());
        }
        if let Some(salt) = &self.cache_salt {
            out.push(SALT_TAG_CACHE_SALT);
            // A salt longer than u32::MAX bytes is not representable; saturate the length so
            // that the encoding stays total (such salts are absurd but must not panic).
            let len = u32::try_from(salt.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(salt);
        }
        out
    }

    /// The salt hash: the chaining value of the first block of every sequence in this
    /// namespace.
    pub fn hash(&self) -> SaltHash {
        SaltHash(xxh3_64_with_seed(&self.encode(), HASH_SEED))
    }
}

/// A hashed [`Salt`]: the value that the first block of a sequence chains from.
///
/// ```
/// use kvbm_logical::{Salt, SaltHash};
/// assert_eq!(SaltHash::default(), Salt::none().hash());
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct SaltHash(u64);

impl SaltHash {
    /// The raw 64-bit value.
    pub const fn as_u64(self) -> u64 {
        self.0
    }

    /// Wraps a raw salt hash computed elsewhere (for example by another process that shares
    /// this specification).
    pub const fn from_raw(raw: u64) -> Self {
        Self(raw)
    }
}

impl Default for SaltHash {
    /// The hash of [`Salt::none()`].
    fn default() -> Self {
        Salt::none().hash()
    }
}

/// Computes the sequence hash of one complete block: the primitive of the specification.
///
/// `parent` is the previous block's sequence hash, or `None` for the first block of a
/// sequence, which chains from `salt` instead. `extra_keys` are per-block keys such as the
/// content hashes of multimodal inputs whose placeholder tokens fall in this block; pass `&[]`
/// when there are none.
///
/// It makes no heap allocation: the encoded input is built in a stack buffer, and inputs
/// larger than that buffer (blocks of more than 124 tokens) are streamed through it in pieces.
/// Blocks of 8, 16, 32 or 64 tokens without extra keys take a path specialised for their size
/// (a 16-token block costs little more than XXH3 of its 80 bytes).
///
/// ```
/// use kvbm_logical::{hash_block, SaltHash};
/// let salt = SaltHash::default();
/// let first = hash_block(None, salt, &[1, 2, 3, 4], &[]);
/// let second = hash_block(Some(first), salt, &[5, 6, 7, 8], &[]);
/// // The same tokens after a different prefix give a different hash.
/// assert_ne!(second, hash_block(None, salt, &[5, 6, 7, 8], &[]));
/// ```
pub fn hash_block(
    parent: Option<SequenceHash>,
    salt: SaltHash,
    tokens: &[u32],
    extra_keys: &[u64],
) -> SequenceHash {
    let chain = parent.map_or(salt.0, SequenceHash::as_u64);
    // The usual block sizes, with their sizes known at compile time.
    if extra_keys.is_empty() {
        let fixed = match tokens.len() {
            8 => <&[u32; 8]>::try_from(tokens)
                .ok()
                .map(|t| hash_fixed::<8, 48>(chain, t)),
            16 => <&[u32; 16]>::try_from(tokens)
                .ok()
                .map(|t| hash_fixed::<16, 80>(chain, t)),
            32 => <&[u32; 32]>::try_from(tokens)
                .ok()
                .map(|t| hash_fixed::<32, 144>(chain, t)),
            64 => <&[u32; 64]>::try_from(tokens)
                .ok()
                .map(|t| hash_fixed::<64, 272>(chain, t)),
            _ => None,
        };
        if let Some(hash) = fixed {
            return SequenceHash(hash);
        }
    }
    let len = encoded_len(tokens.len(), extra_keys.len());
    // Two buffer sizes, so that the common small block (16 tokens: 80 bytes) does not pay for
    // initialising a large one.
    let hash = if len <= SMALL_INPUT {
        hash_in_buffer::<SMALL_INPUT>(chain, tokens, extra_keys, len)
    } else if len <= LARGE_INPUT {
        hash_in_buffer::<LARGE_INPUT>(chain, tokens, extra_keys, len)
    } else {
        hash_streamed(chain, tokens, extra_keys)
    };
    SequenceHash(hash)
}

/// Inputs up to this many bytes are encoded in a buffer of this size (blocks of up to 28
/// tokens without extra keys).
const SMALL_INPUT: usize = 128;
/// Inputs up to this many bytes are encoded in a buffer of this size (blocks of up to 124
/// tokens without extra keys); longer ones are streamed through a buffer of this size.
const LARGE_INPUT: usize = 512;

/// Bytes of the hash input of a block with `tokens` tokens and `extras` extra keys (saturating:
/// slices that large cannot exist).
fn encoded_len(tokens: usize, extras: usize) -> usize {
    (8 + 4 + 4_usize)
        .saturating_add(tokens.saturating_mul(4))
        .saturating_add(extras.saturating_mul(8))
}

/// Writes each token's little-endian bytes into `out` (4 bytes per token).
fn put_tokens(out: &mut [u8], tokens: &[u32]) {
    for (dst, token) in out.chunks_exact_mut(4).zip(tokens) {
        dst.copy_from_slice(&token.to_le_bytes());
    }
}

/// Writes each key's little-endian bytes into `out` (8 bytes per key).
fn put_keys(out: &mut [u8], keys: &[u64]) {
    for (dst, key) in out.chunks_exact_mut(8).zip(keys) {
        dst.copy_from_slice(&key.to_le_bytes());
    }
}

/// The encoding of a block of exactly `T` tokens and no extra key (`N` bytes), with its size
/// known at compile time: the copies unroll into whole-word stores instead of a `memcpy`
/// call, which halves the cost of a 16-token block.
fn hash_fixed<const T: usize, const N: usize>(chain: u64, tokens: &[u32; T]) -> u64 {
    const { assert!(N == 16 + 4 * T && T >= 2 && T.is_multiple_of(2)) };
    let mut buf = [0u8; N];
    put_words(&mut buf, chain, tokens, &[]);
    xxh3_64_with_seed(&buf, HASH_SEED)
}

/// The specification's encoding in an `N`-byte stack buffer (`len <= N`), hashed in one call.
fn hash_in_buffer<const N: usize>(
    chain: u64,
    tokens: &[u32],
    extra_keys: &[u64],
    len: usize,
) -> u64 {
    let mut buf = [0u8; N];
    if tokens.len() >= 2 && tokens.len().is_multiple_of(2) {
        put_words(&mut buf, chain, tokens, extra_keys);
    } else {
        buf[..8].copy_from_slice(&chain.to_le_bytes());
        buf[8..12].copy_from_slice(&len_u32(tokens.len()).to_le_bytes());
        let tokens_end = 12 + 4 * tokens.len();
        put_tokens(&mut buf[12..tokens_end], tokens);
        buf[tokens_end..tokens_end + 4].copy_from_slice(&len_u32(extra_keys.len()).to_le_bytes());
        put_keys(&mut buf[tokens_end + 4..len], extra_keys);
    }
    xxh3_64_with_seed(&buf[..len], HASH_SEED)
}

/// The encoding of a block with an even, non-zero number of tokens, written as whole aligned
/// 8-byte words: `[chain] [len, t0] [t1, t2] ... [t(n-1), extras_len] [extra0] ...`. XXH3
/// reads its input in aligned 8-byte words, and each one then comes from exactly one store
/// (a word assembled from two separate 4-byte stores cannot be forwarded to the load and
/// stalls it; that stall cost more than the hash itself).
fn put_words(buf: &mut [u8], chain: u64, tokens: &[u32], extra_keys: &[u64]) {
    let pair = |lo: u32, hi: u32| (u64::from(lo) | (u64::from(hi) << 32)).to_le_bytes();
    let n = tokens.len();
    buf[..8].copy_from_slice(&chain.to_le_bytes());
    buf[8..16].copy_from_slice(&pair(len_u32(n), tokens[0]));
    let middle = &tokens[1..n - 1];
    for (dst, two) in buf[16..16 + 4 * middle.len()]
        .chunks_exact_mut(8)
        .zip(middle.chunks_exact(2))
    {
        dst.copy_from_slice(&pair(two[0], two[1]));
    }
    let at = 8 + 4 * n;
    buf[at..at + 8].copy_from_slice(&pair(tokens[n - 1], len_u32(extra_keys.len())));
    put_keys(&mut buf[at + 8..], extra_keys);
}

/// The same encoding fed to the streaming hasher in pieces, for blocks too large for
/// [`hash_in_buffer`]. XXH3's streaming and one-shot forms give the same hash.
fn hash_streamed(chain: u64, tokens: &[u32], extra_keys: &[u64]) -> u64 {
    let mut hasher = Xxh3::with_seed(HASH_SEED);
    hasher.update(&chain.to_le_bytes());
    hasher.update(&len_u32(tokens.len()).to_le_bytes());
    let mut buf = [0u8; LARGE_INPUT];
    for part in tokens.chunks(LARGE_INPUT / 4) {
        let bytes = &mut buf[..4 * part.len()];
        put_tokens(bytes, part);
        hasher.update(bytes);
    }
    hasher.update(&len_u32(extra_keys.len()).to_le_bytes());
    for part in extra_keys.chunks(LARGE_INPUT / 8) {
        let bytes = &mut buf[..8 * part.len()];
        put_keys(bytes, part);
        hasher.update(bytes);
    }
    hasher.digest()
}

/// A length as the spec's `u32` field. Blocks of more than `u32::MAX` tokens cannot exist
/// (block sizes are bounded far below that), so saturating keeps this total without a panic.
fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_spells_kvbm_and_version() {
        assert_eq!(HASH_SEED, 0x6b76_626d_0000_0001);
        assert_eq!(&HASH_SEED.to_be_bytes()[..4], b"kvbm");
    }

    #[test]
    fn salt_encoding_is_tagged_and_ordered() {
        assert!(Salt::none().encode().is_empty());
        let s = Salt::none().with_cache_salt(*b"ab").with_lora_id(0x0102);
        assert_eq!(
            s.encode(),
            vec![1, 2, 1, 0, 0, 0, 0, 0, 0, 2, 2, 0, 0, 0, b'a', b'b']
        );
    }

    #[test]
    fn every_input_changes_the_hash() {
        let salt = SaltHash::default();
        let base = hash_block(None, salt, &[1, 2, 3, 4], &[]);
        assert_ne!(base, hash_block(None, salt, &[1, 2, 3, 5], &[]));
        assert_ne!(base, hash_block(None, salt, &[1, 2, 3, 4], &[9]));
        assert_ne!(base, hash_block(Some(base), salt, &[1, 2, 3, 4], &[]));
        assert_ne!(
            base,
            hash_block(
                None,
                Salt::none().with_lora_id(1).hash(),
                &[1, 2, 3, 4],
                &[]
            )
        );
        // Token/extra-key boundaries are framed by lengths: moving a value across the
        // boundary changes the hash.
        assert_ne!(
            hash_block(None, salt, &[1, 2], &[3]),
            hash_block(None, salt, &[1, 2, 3], &[])
        );
    }

    #[test]
    fn a_first_block_chains_from_the_salt() {
        let salt = Salt::none().with_cache_salt(*b"x").hash();
        assert_eq!(
            hash_block(None, salt, &[7; 4], &[]),
            hash_block(Some(SequenceHash::new(salt.as_u64())), salt, &[7; 4], &[])
        );
    }
}
