//! Mooncake-format request traces: one JSON object per line with `timestamp`,
//! `input_length`, `output_length` and `hash_ids` (one id per 512-token block; equal ids
//! mean the same prefix block). Malformed lines are reported with their line number and
//! skipped (the first [`MAX_REPORTED`] kept, all counted); a line longer than
//! [`MAX_LINE_BYTES`] is skipped without being held in memory. A request must name at least
//! one block, and no block twice.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Tokens per trace block (Mooncake's block size).
pub const TRACE_BLOCK_TOKENS: usize = 512;
/// Longest line read into memory; longer ones are reported and skipped.
pub const MAX_LINE_BYTES: usize = 16 << 20;
/// Malformed lines kept (with their line number and error); the rest are only counted.
pub const MAX_REPORTED: usize = 100;

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
    /// The first [`MAX_REPORTED`] skipped lines.
    pub malformed: Vec<Malformed>,
    /// Every skipped line.
    pub malformed_count: usize,
}

impl Trace {
    fn skip(&mut self, line: usize, error: impl FnOnce() -> String) {
        self.malformed_count += 1;
        if self.malformed.len() < MAX_REPORTED {
            self.malformed.push(Malformed {
                line,
                error: error(),
            });
        }
    }
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
            malformed: trace.malformed_count,
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
            trace.skip(number, || {
                format!("line of {skipped} bytes exceeds the {MAX_LINE_BYTES}-byte limit")
            });
            continue;
        }
        let text = buf.trim_ascii();
        if text.is_empty() {
            continue;
        }
        match serde_json::from_slice::<Line>(text) {
            Ok(line) => match check_chain(&line.hash_ids) {
                Ok(()) => trace.requests.push(Request {
                    hash_ids: line.hash_ids,
                }),
                Err(e) => trace.skip(number, || e),
            },
            Err(e) => trace.skip(number, || e.to_string()),
        }
    }
    Ok(trace)
}

/// Whether `ids` is a chain: not empty, no id twice.
fn check_chain(ids: &[u64]) -> Result<(), String> {
    if ids.is_empty() {
        return Err("hash_ids is empty: a request names at least one block".into());
    }
    let mut seen = std::collections::HashSet::with_capacity(ids.len());
    match ids.iter().find(|&&id| !seen.insert(id)) {
        Some(id) => Err(format!("block {id} appears twice in one request")),
        None => Ok(()),
    }
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

    #[test]
    fn empty_and_repeating_chains_are_malformed() {
        let line = |ids: &str| {
            format!(
                "{{\"timestamp\": 0, \"input_length\": 1, \"output_length\": 1, \"hash_ids\": {ids}}}\n"
            )
        };
        let text: String = [
            "[1, 2, 3]",    // fine
            "[]",           // no block
            "[5, 5]",       // a block twice
            "[1, 2, 4, 2]", // a block twice
            "[1, 2, 4]",    // fine: shares 1, 2
        ]
        .iter()
        .map(|ids| line(ids))
        .collect();
        let t = parse(text.as_bytes()).unwrap();
        let ids: Vec<Vec<u64>> = t.requests.iter().map(|r| r.hash_ids.clone()).collect();
        assert_eq!(ids, vec![vec![1, 2, 3], vec![1, 2, 4]]);
        let lines: Vec<usize> = t.malformed.iter().map(|m| m.line).collect();
        assert_eq!(lines, vec![2, 3, 4]);
        assert_eq!(t.malformed_count, 3);
    }

    #[test]
    fn only_the_first_malformed_lines_are_kept_all_are_counted() {
        let text = "garbage\n".repeat(MAX_REPORTED * 50);
        let t = parse(text.as_bytes()).unwrap();
        assert!(t.requests.is_empty());
        assert_eq!(t.malformed.len(), MAX_REPORTED);
        assert_eq!(t.malformed_count, MAX_REPORTED * 50);
        assert_eq!(t.malformed.last().unwrap().line, MAX_REPORTED);
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
