//! The hashing specification's test vectors (docs/hashing.md), checked three ways: the values
//! written in the document (produced by an independent Python implementation), a byte-level
//! reconstruction of the spec written here, and the crate's implementation.

use kvbm_logical::{HASH_SEED, Salt, SequenceHash, TokenBlockSequence, hash_block};
use xxhash_rust::xxh3::xxh3_64_with_seed;

const SPEC: &str = include_str!("../docs/hashing.md");
const BLOCK_SIZE: usize = 4;

struct Vector {
    name: String,
    salt: Salt,
    lora: Option<u64>,
    cache_salt: Option<Vec<u8>>,
    salt_hash: u64,
    tokens: Vec<u32>,
    extra: Vec<(usize, u64)>,
    hashes: Vec<u64>,
}

fn parse_hex(s: &str) -> u64 {
    u64::from_str_radix(s.trim(), 16).unwrap_or_else(|e| panic!("bad hex {s:?}: {e}"))
}

fn parse_vectors() -> Vec<Vector> {
    let table = SPEC
        .split("<!-- vectors:")
        .nth(1)
        .expect("the spec has a vectors table");
    table
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| name"))
        .map(|line| {
            let cols: Vec<&str> = line.trim_matches('|').split(" | ").map(str::trim).collect();
            assert_eq!(cols.len(), 6, "row {line:?}");
            let (mut salt, mut lora, mut cache_salt) = (Salt::none(), None, None);
            if cols[1] != "none" {
                for field in cols[1].split(',') {
                    let (key, value) = field.split_once('=').expect("key=value");
                    match key {
                        "lora" => {
                            let id: u64 = value.parse().unwrap();
                            salt = salt.with_lora_id(id);
                            lora = Some(id);
                        }
                        "salt" => {
                            let bytes = value.trim_matches('"').as_bytes().to_vec();
                            salt = salt.with_cache_salt(bytes.clone());
                            cache_salt = Some(bytes);
                        }
                        other => panic!("unknown salt field {other}"),
                    }
                }
            }
            let (a, b) = cols[3].split_once("..").expect("a..b");
            let (a, b): (u64, u64) = (a.parse().unwrap(), b.parse().unwrap());
            let tokens = (a..b).map(|t| u32::try_from(t).unwrap()).collect();
            let extra = if cols[4] == "-" {
                Vec::new()
            } else {
                cols[4]
                    .split(';')
                    .map(|p| {
                        let (blk, key) = p.split_once(':').unwrap();
                        (blk.parse().unwrap(), key.parse().unwrap())
                    })
                    .collect()
            };
            Vector {
                name: cols[0].to_string(),
                salt,
                lora,
                cache_salt,
                salt_hash: parse_hex(cols[2]),
                tokens,
                extra,
                hashes: cols[5].split(',').map(parse_hex).collect(),
            }
        })
        .collect()
}

/// The spec, transcribed byte by byte (independent of the crate's encoder).
fn reference(v: &Vector) -> (u64, Vec<u64>) {
    let mut salt_bytes = Vec::new();
    if let Some(lora) = v.lora {
        salt_bytes.push(0x01);
        salt_bytes.extend(lora.to_le_bytes());
    }
    if let Some(s) = &v.cache_salt {
        salt_bytes.push(0x02);
        salt_bytes.extend((s.len() as u32).to_le_bytes());
        salt_bytes.extend(s);
    }
    let salt_hash = xxh3_64_with_seed(&salt_bytes, 0x6b76_626d_0000_0001);
    let mut chain = salt_hash;
    let mut out = Vec::new();
    for (i, block) in v.tokens.chunks_exact(BLOCK_SIZE).enumerate() {
        let extras: Vec<u64> = v
            .extra
            .iter()
            .filter(|(b, _)| *b == i)
            .map(|&(_, k)| k)
            .collect();
        let mut bytes = chain.to_le_bytes().to_vec();
        bytes.extend((block.len() as u32).to_le_bytes());
        block.iter().for_each(|t| bytes.extend(t.to_le_bytes()));
        bytes.extend((extras.len() as u32).to_le_bytes());
        extras.iter().for_each(|k| bytes.extend(k.to_le_bytes()));
        chain = xxh3_64_with_seed(&bytes, 0x6b76_626d_0000_0001);
        out.push(chain);
    }
    (salt_hash, out)
}

/// The crate's implementation.
fn implementation(v: &Vector) -> (u64, Vec<u64>) {
    let salt = v.salt.hash();
    let hashes = if v.extra.is_empty() {
        TokenBlockSequence::from_tokens(&v.tokens, BLOCK_SIZE, &v.salt)
            .unwrap()
            .sequence_hashes()
            .map(SequenceHash::as_u64)
            .collect()
    } else {
        let mut parent = None;
        v.tokens
            .chunks_exact(BLOCK_SIZE)
            .enumerate()
            .map(|(i, block)| {
                let extras: Vec<u64> = v
                    .extra
                    .iter()
                    .filter(|(b, _)| *b == i)
                    .map(|&(_, k)| k)
                    .collect();
                let h = hash_block(parent, salt, block, &extras);
                parent = Some(h);
                h.as_u64()
            })
            .collect()
    };
    (salt.as_u64(), hashes)
}

#[test]
fn the_seed_is_the_documented_constant() {
    assert_eq!(HASH_SEED, 0x6b76_626d_0000_0001);
    assert!(SPEC.contains("0x6b76626d00000001"));
}

#[test]
fn spec_vectors_agree_three_ways() {
    let vectors = parse_vectors();
    assert!(vectors.len() >= 7, "only {} vectors parsed", vectors.len());
    for v in &vectors {
        let (ref_salt, ref_hashes) = reference(v);
        let (impl_salt, impl_hashes) = implementation(v);
        assert_eq!(
            ref_salt, v.salt_hash,
            "{}: reference salt hash vs document",
            v.name
        );
        assert_eq!(
            impl_salt, v.salt_hash,
            "{}: crate salt hash vs document",
            v.name
        );
        assert_eq!(ref_hashes, v.hashes, "{}: reference vs document", v.name);
        assert_eq!(impl_hashes, v.hashes, "{}: crate vs document", v.name);
        assert_eq!(v.hashes.len(), v.tokens.len() / BLOCK_SIZE, "{}", v.name);
    }
}

#[test]
fn vectors_cover_the_spec() {
    let vectors = parse_vectors();
    let has = |f: &dyn Fn(&Vector) -> bool| vectors.iter().any(f);
    assert!(has(&|v| v.lora.is_some() && v.cache_salt.is_none()));
    assert!(has(&|v| v.cache_salt.is_some() && v.lora.is_none()));
    assert!(has(&|v| v.lora.is_some() && v.cache_salt.is_some()));
    assert!(has(&|v| !v.extra.is_empty()));
    assert!(has(&|v| v.tokens.len() % BLOCK_SIZE != 0));
    assert!(has(&|v| v.tokens.contains(&u32::MAX)));
}

/// The specification's encoding of one block, built byte by byte in a `Vec`.
fn reference_block(chain: u64, tokens: &[u32], extras: &[u64]) -> u64 {
    let mut bytes = chain.to_le_bytes().to_vec();
    bytes.extend((tokens.len() as u32).to_le_bytes());
    tokens.iter().for_each(|t| bytes.extend(t.to_le_bytes()));
    bytes.extend((extras.len() as u32).to_le_bytes());
    extras.iter().for_each(|k| bytes.extend(k.to_le_bytes()));
    xxh3_64_with_seed(&bytes, 0x6b76_626d_0000_0001)
}

#[test]
fn every_encoding_path_agrees_with_the_reference() {
    // `hash_block` encodes small inputs in a 128-byte buffer, medium ones in a 512-byte one
    // and streams larger ones in 512-byte pieces: cover each side of every boundary.
    let salt = Salt::none().with_lora_id(9).hash();
    for n_tokens in (0..=140).chain([255, 256, 257, 1000, 4096, 65_536]) {
        for n_extras in [0, 1, 2, 5, 63, 64, 65, 200] {
            let tokens: Vec<u32> = (0..n_tokens as u32)
                .map(|t| t.wrapping_mul(0x9e37_79b9))
                .collect();
            let extras: Vec<u64> = (0..n_extras as u64)
                .map(|k| k.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ 0xff)
                .collect();
            let parent = SequenceHash::new(0x0123_4567_89ab_cdef ^ n_tokens as u64);
            assert_eq!(
                hash_block(Some(parent), salt, &tokens, &extras).as_u64(),
                reference_block(parent.as_u64(), &tokens, &extras),
                "{n_tokens} tokens, {n_extras} extra keys"
            );
            assert_eq!(
                hash_block(None, salt, &tokens, &extras).as_u64(),
                reference_block(salt.as_u64(), &tokens, &extras),
                "first block: {n_tokens} tokens, {n_extras} extra keys"
            );
        }
    }
}
