use std::io::{self, Read};

use proptest::prelude::*;
use redis::Value;

use super::*;

/// A reader that hands out `data` in the given fragment sizes (cycled), then reports the end
/// of the stream; optionally an `Interrupted` error before every other read.
struct Fragmented {
    data: Vec<u8>,
    at: usize,
    sizes: Vec<usize>,
    next: usize,
    interrupt: bool,
    interrupted: bool,
}

impl Fragmented {
    fn new(data: Vec<u8>, sizes: Vec<usize>, interrupt: bool) -> Self {
        Self {
            data,
            at: 0,
            sizes,
            next: 0,
            interrupt,
            interrupted: false,
        }
    }
}

impl Read for Fragmented {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.interrupt && !self.interrupted {
            self.interrupted = true;
            return Err(io::Error::from(io::ErrorKind::Interrupted));
        }
        self.interrupted = false;
        let size = self.sizes[self.next % self.sizes.len()].max(1);
        self.next += 1;
        let n = size.min(out.len()).min(self.data.len() - self.at);
        out[..n].copy_from_slice(&self.data[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// A reply as the model knows it.
#[derive(Clone, Debug)]
enum Model {
    Status(String),
    Error(String),
    Int(i64),
    Bulk(Vec<u8>),
    Nil,
    NilArray,
    Array(Vec<Model>),
    /// A value read with `read_block(head of h bytes, out of o bytes)`: the bulk string, and
    /// the head length the reader expects; the out length is `bytes.len() - h + delta`.
    Block {
        bytes: Vec<u8>,
        head: usize,
        delta: i8,
    },
    /// `read_block` on a null bulk string.
    BlockNil {
        len: usize,
    },
    /// `read_block` on a non-bulk reply.
    BlockOther(Box<Model>),
}

fn encode(m: &Model, out: &mut Vec<u8>) {
    match m {
        Model::Status(s) => out.extend_from_slice(format!("+{s}\r\n").as_bytes()),
        Model::Error(s) => out.extend_from_slice(format!("-{s}\r\n").as_bytes()),
        Model::Int(i) => out.extend_from_slice(format!(":{i}\r\n").as_bytes()),
        Model::Bulk(b) | Model::Block { bytes: b, .. } => {
            out.extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
            out.extend_from_slice(b);
            out.extend_from_slice(b"\r\n");
        }
        Model::Nil | Model::BlockNil { .. } => out.extend_from_slice(b"$-1\r\n"),
        Model::NilArray => out.extend_from_slice(b"*-1\r\n"),
        Model::Array(items) => {
            out.extend_from_slice(format!("*{}\r\n", items.len()).as_bytes());
            for i in items {
                encode(i, out);
            }
        }
        Model::BlockOther(inner) => encode(inner, out),
    }
}

fn expected_value(m: &Model) -> Value {
    match m {
        Model::Status(s) if s == "OK" => Value::Okay,
        Model::Status(s) => Value::SimpleString(s.clone()),
        Model::Error(s) => redis::parse_redis_value(format!("-{s}\r\n").as_bytes()).unwrap(),
        Model::Int(i) => Value::Int(*i),
        Model::Bulk(b) => Value::BulkString(b.clone()),
        Model::Nil | Model::NilArray => Value::Nil,
        Model::Array(items) => Value::Array(items.iter().map(expected_value).collect()),
        _ => unreachable!("block models are not values"),
    }
}

fn text() -> impl Strategy<Value = String> {
    "[A-Za-z0-9 ._:-]{0,40}"
}

fn leaf() -> impl Strategy<Value = Model> {
    prop_oneof![
        text().prop_map(Model::Status),
        Just(Model::Status("OK".to_owned())),
        // Error codes as Redis sends them, and free text.
        prop_oneof![
            Just("MOVED 3999 127.0.0.1:6381".to_owned()),
            Just("ASK 3999 127.0.0.1:6381".to_owned()),
            Just("WRONGTYPE Operation against a key holding the wrong kind of value".to_owned()),
            Just("OOM command not allowed when used memory > 'maxmemory'.".to_owned()),
            Just("LOADING Redis is loading the dataset in memory".to_owned()),
            "[A-Z]{1,10} [a-z ]{0,30}",
        ]
        .prop_map(Model::Error),
        any::<i64>().prop_map(Model::Int),
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(Model::Bulk),
        Just(Model::Nil),
        Just(Model::NilArray),
    ]
}

fn value_model() -> impl Strategy<Value = Model> {
    leaf().prop_recursive(3, 24, 6, |inner| {
        proptest::collection::vec(inner, 0..6).prop_map(Model::Array)
    })
}

fn model() -> impl Strategy<Value = Model> {
    prop_oneof![
        4 => value_model(),
        // Blocks of up to several pieces and read buffers, with heads of 0..=48 bytes, and
        // sometimes a length the reader does not expect.
        4 => (proptest::collection::vec(any::<u8>(), 0..3 * PIECE + 100), 0usize..=48, prop_oneof![8 => Just(0i8), 1 => -3i8..=3])
            .prop_map(|(bytes, head, delta)| {
                let head = head.min(bytes.len());
                Model::Block { bytes, head, delta }
            }),
        1 => (0usize..5000).prop_map(|len| Model::BlockNil { len }),
        1 => value_model().prop_filter("not a bulk string", |m| !matches!(m, Model::Bulk(_) | Model::Nil))
            .prop_map(|m| Model::BlockOther(Box::new(m))),
    ]
}

/// Reads `m` from `r` as the model says, checking the result.
fn check(r: &mut RespReader<Fragmented>, m: &Model) -> Result<(), TestCaseError> {
    match m {
        Model::Block { bytes, head, delta } => {
            let out_len = (bytes.len() - head) as isize + isize::from(*delta);
            if out_len < 0 {
                // No such reader call: read it as a value instead.
                prop_assert_eq!(r.read_value().unwrap(), Value::BulkString(bytes.clone()));
                return Ok(());
            }
            let mut h = vec![0xAAu8; *head];
            let mut out = vec![0x55u8; out_len as usize];
            let mut seen = Vec::new();
            let got = r
                .read_block(&mut h, &mut out, |hd, p| {
                    assert_eq!(hd, &bytes[..*head]);
                    seen.extend_from_slice(p)
                })
                .unwrap();
            if *delta == 0 {
                prop_assert_eq!(got, BlockReply::Filled);
                prop_assert_eq!(&h[..], &bytes[..*head]);
                prop_assert!(out[..] == bytes[*head..]);
                // The pieces cover `out` exactly once, in order.
                prop_assert!(seen[..] == bytes[*head..]);
            } else {
                prop_assert_eq!(got, BlockReply::Length(bytes.len()));
            }
        }
        Model::BlockNil { len } => {
            let mut h = [0u8; 48];
            let mut out = vec![0u8; *len];
            prop_assert_eq!(
                r.read_block(&mut h, &mut out, |_, _| panic!("no piece for a nil"))
                    .unwrap(),
                BlockReply::Nil
            );
        }
        Model::BlockOther(inner) => {
            let mut h = [0u8; 48];
            let mut out = vec![0u8; 100];
            prop_assert_eq!(
                r.read_block(&mut h, &mut out, |_, _| panic!(
                    "no piece for another reply"
                ))
                .unwrap(),
                BlockReply::Other(expected_value(inner))
            );
        }
        value => prop_assert_eq!(r.read_value().unwrap(), expected_value(value)),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Any sequence of replies, cut into any fragments (1 byte at a time included), with
    /// interrupted reads, through buffers smaller and larger than the values: every reply is
    /// read as sent, and the stream ends exactly after the last one.
    #[test]
    fn replies_read_back_through_any_fragmentation(
        replies in proptest::collection::vec(model(), 1..12),
        sizes in proptest::collection::vec(prop_oneof![1usize..4, 1usize..100, 1usize..200_000], 1..8),
        capacity in prop_oneof![Just(256usize), 256usize..5000, Just(READ_BUFFER)],
        interrupt in any::<bool>(),
    ) {
        let mut wire = Vec::new();
        for m in &replies {
            encode(m, &mut wire);
        }
        let mut r = RespReader::with_capacity(Fragmented::new(wire, sizes, interrupt), capacity);
        for m in &replies {
            check(&mut r, m)?;
        }
        prop_assert!(!r.has_buffered());
        let e = r.read_value().unwrap_err();
        prop_assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    /// A stream cut anywhere is an error (never a reply made up from a part), and garbage is
    /// an error or a reply, never a panic or a hang.
    #[test]
    fn truncated_or_garbage_streams_are_errors_not_panics(
        m in model(),
        cut in any::<prop::sample::Index>(),
        garbage in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        let mut wire = Vec::new();
        encode(&m, &mut wire);
        let cut = cut.index(wire.len());
        wire.truncate(cut);
        let mut r = RespReader::with_capacity(Fragmented::new(wire, vec![7], false), 256);
        prop_assert!(r.read_value().is_err());
        let mut r = RespReader::with_capacity(Fragmented::new(garbage, vec![3], false), 256);
        for _ in 0..300 {
            if r.read_value().is_err() {
                break;
            }
        }
    }
}

#[test]
fn a_cut_block_is_an_error() {
    let mut wire = Vec::new();
    encode(
        &Model::Block {
            bytes: vec![1u8; 1000],
            head: 10,
            delta: 0,
        },
        &mut wire,
    );
    for cut in [1, 5, 10, 500, wire.len() - 1] {
        let mut r =
            RespReader::with_capacity(Fragmented::new(wire[..cut].to_vec(), vec![50], false), 256);
        let mut h = [0u8; 10];
        let mut out = vec![0u8; 990];
        let e = r.read_block(&mut h, &mut out, |_, _| {}).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "cut at {cut}");
    }
}

#[test]
fn malformed_replies_are_protocol_errors() {
    for bad in [
        &b"$12x\r\n"[..],
        b"$5\r\nhelloXX",
        b":1\n",
        b"\r\n",
        b"?what\r\n",
        b":99999999999999999999\r\n",
        b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n",
        b"$600000000\r\n",
    ] {
        let mut r = RespReader::with_capacity(Fragmented::new(bad.to_vec(), vec![2], false), 256);
        let e = r.read_value().unwrap_err();
        assert_eq!(
            e.kind(),
            io::ErrorKind::InvalidData,
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    // A line longer than the limit, without a newline.
    let long = [b'+'; 1000].to_vec();
    let mut r = RespReader::with_capacity(Fragmented::new(long, vec![100], false), 256);
    assert_eq!(
        r.read_value().unwrap_err().kind(),
        io::ErrorKind::InvalidData
    );
}

#[test]
fn error_codes_are_classified_by_redis_rs() {
    let wire = b"-MOVED 3999 127.0.0.1:6381\r\n-WRONGTYPE bad\r\n".to_vec();
    let mut r = RespReader::new(Fragmented::new(wire, vec![4], false));
    let mut h = [0u8; 48];
    let mut out = [0u8; 8];
    match r.read_block(&mut h, &mut out, |_, _| {}).unwrap() {
        BlockReply::Other(Value::ServerError(e)) => assert_eq!(e.code(), "MOVED"),
        other => panic!("{other:?}"),
    }
    match r.read_value().unwrap() {
        Value::ServerError(e) => assert_eq!(e.code(), "WRONGTYPE"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn integers() {
    assert_eq!(parse_int(b"0"), Some(0));
    assert_eq!(parse_int(b"-1"), Some(-1));
    assert_eq!(parse_int(b"9223372036854775807"), Some(i64::MAX));
    assert_eq!(parse_int(b"9223372036854775808"), None);
    assert_eq!(parse_int(b""), None);
    assert_eq!(parse_int(b"-"), None);
    assert_eq!(parse_int(b"1a"), None);
}

/// The process's peak virtual memory (`VmPeak`), in KiB.
fn vm_peak_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmPeak:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn a_bulk_length_is_not_trusted_for_an_allocation() {
    // A broken or hostile server says a value is ~512 MiB long, then closes. The reader must
    // fail without having reserved that much (strict overcommit or a `ulimit -v` would abort
    // the process). Measured in a child process running only this test, so that no other
    // test's memory moves the peak.
    if std::env::var_os("KVBM_RESP_CHILD").is_some() {
        let before = vm_peak_kib();
        let mut wire = b"$536870000\r\n".to_vec();
        wire.extend_from_slice(&[7u8; 100_000]);
        let mut r = RespReader::with_capacity(Fragmented::new(wire, vec![4096], false), 256);
        let e = r.read_value().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        let grew = vm_peak_kib().saturating_sub(before);
        assert!(grew < 64 << 10, "the peak grew by {grew} KiB");
        return;
    }
    let name = "remote::resp::tests::a_bulk_length_is_not_trusted_for_an_allocation";
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env("KVBM_RESP_CHILD", "1")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&child.stdout),
        String::from_utf8_lossy(&child.stderr)
    );
    assert!(child.status.success(), "{text}");
    assert!(text.contains("1 passed"), "{text}");
}
