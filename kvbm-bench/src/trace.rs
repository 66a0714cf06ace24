//! Mooncake-format request traces: one JSON object per line with `timestamp`,
//! `input_length`, `output_length` and `hash_ids` (one id per 512-token block; equal ids
//! mean the same prefix block). Malformed lines are reported with their line number and
//! skipped; a line longer than [`MAX_LINE_BYTES`] is skipped without being held in memory.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Tokens per trace block (Mooncake's block size).
pub const TRACE_BLOCK_TOKENS: usize = 512;
/// Longest line read into memory; longer ones are reported and skipped.
pub const MAX_LINE_BYTES: usize = 16 << 20;

/// One request: the ids of its prompt's blocks, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Prefix block ids.
    pub hash_ids: Vec<u64>,
}

#[derive(Deserialize)]
struct Line {
    #[allow(dead_code)]
    timestamp: u64,
    #[allow(dead_code)]
    input_length: u64,
    #[allow(dead_code)]
    output_length: u64,
    hash_ids: Vec<u64>,
}

/// A skipped line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Malformed {
    /// 1-based line number.
    pub line: usize,
    /// What was wrong.
    pub error: String,
}

/// A parsed trace.
#[derive(Clone, Debug, Default)]
pub struct Trace {
    /// The valid requests, in file order.
    pub requests: Vec<Request>,
    /// The skipped lines.
    pub malformed: Vec<Malformed>,
}

/// The trace could not be read at all.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// Opening or reading failed.
    #[error("cannot read trace {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// Not one valid request.
    #[error("trace {path} has no valid request ({malformed} malformed line(s))")]
    Empty {
        /// The file.
        path: PathBuf,
        /// How many lines were malformed.
        malformed: usize,
    },
}

/// Reads a trace file.
pub fn read(path: &Path) -> Result<Trace, TraceError> {
    let io = |source| TraceError::Io {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let trace = parse(BufReader::with_capacity(1 << 20, file)).map_err(io)?;
    if trace.requests.is_empty() {
        return Err(TraceError::Empty {
            path: path.to_owned(),
            malformed: trace.malformed.len(),
        });
    }
    Ok(trace)
}

/// Parses trace lines; only an I/O error fails the whole parse.
pub fn parse(mut reader: impl BufRead) -> io::Result<Trace> {
    let mut trace = Trace::default();
    let mut buf = Vec::new();
    let mut number = 0;
    loop {
        buf.clear();
        number += 1;
        let n = (&mut reader)
            .take(MAX_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut buf)?;
        if n == 0 {
            break;
        }
        if buf.len() > MAX_LINE_BYTES && buf.last() != Some(&b'\n') {
            // Too long: skip the rest of the line without keeping it.
            let mut skipped = buf.len();
            loop {
                let chunk = reader.fill_buf()?;
                if chunk.is_empty() {
                    break;
                }
                match chunk.iter().position(|&b| b == b'\n') {
                    Some(i) => {
                        reader.consume(i + 1);
                        skipped += i;
                        break;
                    }
                    None => {
                        let len = chunk.len();
                        reader.consume(len);
                        skipped += len;
                    }
                }
            }
            trace.malformed.push(Malformed {
                line: number,
                error: format!("line of {skipped} bytes exceeds the {MAX_LINE_BYTES}-byte limit"),
            });
            continue;
        }
        let text = buf.trim_ascii();
        if text.is_empty() {
            continue;
        }
        match serde_json::from_slice::<Line>(text) {
            Ok(line) => trace.requests.push(Request {
                hash_ids: line.hash_ids,
            }),
            Err(e) => trace.malformed.push(Malformed {
                line: number,
                error: e.to_string(),
            }),
        }
    }
    Ok(trace)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_bad_and_blank_lines() {
        let text = b"{\"timestamp\": 0, \"input_length\": 10, \"output_length\": 2, \"hash_ids\": [1, 2]}\n\
            \n\
            {\"timestamp\": 1, \"input_length\": -3, \"output_length\": 2, \"hash_ids\": [1]}\n\
            {\"timestamp\": 2, \"input_length\": 10, \"output_length\": 2, \"hash_ids\": [1, 3, 4]}\n\
            {\"timestamp\": 3, \"input_len";
        let t = parse(&text[..]).unwrap();
        assert_eq!(
            t.requests,
            vec![
                Request {
                    hash_ids: vec![1, 2]
                },
                Request {
                    hash_ids: vec![1, 3, 4]
                }
            ]
        );
        let lines: Vec<usize> = t.malformed.iter().map(|m| m.line).collect();
        assert_eq!(lines, vec![3, 5]);
    }

    #[test]
    fn wrong_types_and_huge_numbers_are_reported_by_line() {
        let text = b"{\"timestamp\": 0, \"input_length\": 1, \"output_length\": 1, \"hash_ids\": [1]}\n\
            {\"timestamp\": 0, \"input_length\": 1, \"output_length\": 1, \"hash_ids\": [18446744073709551616]}\n\
            {\"timestamp\": 1e30, \"input_length\": 1, \"output_length\": 1, \"hash_ids\": [2]}\n\
            {\"timestamp\": 0, \"input_length\": \"ten\", \"output_length\": 1, \"hash_ids\": [3]}\n\
            {\"timestamp\": 0, \"input_length\": 1, \"output_length\": 1, \"hash_ids\": 5}\n\
            {\"timestamp\": 0, \"input_length\": 1, \"output_length\": 1}\n\
            [1, 2, 3]\n";
        let t = parse(&text[..]).unwrap();
        assert_eq!(t.requests, vec![Request { hash_ids: vec![1] }]);
        let lines: Vec<usize> = t.malformed.iter().map(|m| m.line).collect();
        assert_eq!(lines, vec![2, 3, 4, 5, 6, 7]);
    }

    /// A reader that yields a 100 MB line without ever holding it, then a valid line.
    struct HugeLine {
        left: usize,
        tail: &'static [u8],
    }

    impl Read for HugeLine {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.left > 0 {
                let n = buf.len().min(self.left);
                buf[..n].fill(b'7');
                self.left -= n;
                return Ok(n);
            }
            let n = buf.len().min(self.tail.len());
            buf[..n].copy_from_slice(&self.tail[..n]);
            self.tail = &self.tail[n..];
            Ok(n)
        }
    }

    #[test]
    fn a_100_mb_line_is_skipped_without_holding_it() {
        let reader = HugeLine {
            left: 100 << 20,
            tail: b"\n{\"timestamp\": 0, \"input_length\": 1, \"output_length\": 1, \"hash_ids\": [4]}\n",
        };
        // The parser keeps at most MAX_LINE_BYTES + 1 bytes of a line (its `take` bound).
        let t = parse(BufReader::with_capacity(1 << 16, reader)).unwrap();
        assert_eq!(t.requests, vec![Request { hash_ids: vec![4] }]);
        assert_eq!(t.malformed.len(), 1);
        assert_eq!(t.malformed[0].line, 1);
        assert!(
            t.malformed[0].error.contains(&format!("{}", 100 << 20)),
            "{}",
            t.malformed[0].error
        );
    }

    #[test]
    fn an_overlong_line_is_skipped_in_bounded_memory() {
        let mut text = Vec::new();
        text.extend_from_slice(
            b"{\"timestamp\": 0, \"input_length\": 1, \"output_length\": 1, \"hash_ids\": [",
        );
        while text.len() <= MAX_LINE_BYTES + 1000 {
            text.extend_from_slice(b"1234567, ");
        }
        text.extend_from_slice(b"1]}\n{\"timestamp\": 0, \"input_length\": 1, \"output_length\": 1, \"hash_ids\": [9]}\n");
        let t = parse(&text[..]).unwrap();
        assert_eq!(t.requests, vec![Request { hash_ids: vec![9] }]);
        assert_eq!(t.malformed.len(), 1);
        assert_eq!(t.malformed[0].line, 1);
        assert!(t.malformed[0].error.contains("exceeds"));
    }
}
