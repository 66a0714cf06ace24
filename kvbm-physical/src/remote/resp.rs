//! A RESP2 reply reader over any byte stream, with a fast path for block values.
//!
//! redis-rs's synchronous `Connection` reads the socket 8 KiB per call into a zero-filled,
//! growing buffer and then copies every bulk string into a new `Vec` (47 % of the client's CPU
//! on 2 MiB gets, BENCHMARKS.md). This reader owns one fixed buffer, allocated once per
//! connection, and reads the block part of a `GET` reply straight into the caller's output
//! buffer, one [`PIECE`] at a time, so that each piece can be hashed while it is still in
//! cache. Every other reply (status, integer, nil, arrays, small bulk strings) becomes a
//! [`redis::Value`]; error replies are handed to redis-rs's own parser, so error codes
//! (`MOVED`, `WRONGTYPE`, `OOM`, ...) are classified as redis-rs classifies them.
//!
//! Only RESP2 is spoken (the connection never sends `HELLO 3`). A reply that is not RESP2 is
//! an [`io::ErrorKind::InvalidData`] error: the connection is out of step and must be dropped.

use std::io::{self, Read};

use redis::Value;

/// The read buffer's size: small replies and the head of each value land here.
pub(crate) const READ_BUFFER: usize = 64 << 10;

/// Block bytes are read into the caller's buffer at most this many at a time, and each piece
/// is handed to the caller's `piece` callback (to be hashed while still in cache).
pub(crate) const PIECE: usize = 64 << 10;

/// Longest header line (`$<len>\r\n`, `:<int>\r\n`, `+<status>\r\n`, `-<error>\r\n`) accepted.
const MAX_LINE: usize = 16 << 10;

/// Deepest array nesting accepted (`CLUSTER SLOTS` needs 3).
const MAX_DEPTH: usize = 8;

/// Longest bulk string read into a [`Value`] (block values take the fast path).
const MAX_BULK: i64 = 512 << 20;

/// What [`RespReader::read_block`] found.
#[derive(Debug, PartialEq)]
pub(crate) enum BlockReply {
    /// A bulk string of exactly the expected length: its first `head.len()` bytes are in
    /// `head`, the rest in `out`.
    Filled,
    /// A null bulk string (the key does not exist).
    Nil,
    /// A bulk string of another length (its bytes were consumed and dropped).
    Length(usize),
    /// Any other reply (an error, a redirection, another type).
    Other(Value),
}

fn protocol(why: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

/// A RESP2 reader over `R` with one fixed buffer.
pub(crate) struct RespReader<R> {
    inner: R,
    buf: Box<[u8]>,
    /// Unread bytes are `buf[start..end]`.
    start: usize,
    end: usize,
}

impl<R: Read> RespReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        Self::with_capacity(inner, READ_BUFFER)
    }

    pub(crate) fn with_capacity(inner: R, capacity: usize) -> Self {
        Self {
            inner,
            buf: vec![0u8; capacity.max(64)].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    pub(crate) fn get_ref(&self) -> &R {
        &self.inner
    }

    pub(crate) fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// Whether bytes were received that no reply has consumed yet.
    pub(crate) fn has_buffered(&self) -> bool {
        self.start < self.end
    }

    /// Reads more bytes into the buffer (at least one); the end of the stream is an error.
    fn fill(&mut self) -> io::Result<()> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        debug_assert!(self.end < self.buf.len(), "fill with a full buffer");
        loop {
            match self.inner.read(&mut self.buf[self.end..]) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the server closed the connection",
                    ));
                }
                Ok(n) => {
                    self.end += n;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// The next line without its `\r\n`, as a range of the buffer (consumed).
    fn line(&mut self) -> io::Result<(usize, usize)> {
        let mut scanned = self.start;
        loop {
            if let Some(p) = self.buf[scanned..self.end].iter().position(|&b| b == b'\n') {
                let nl = scanned + p;
                if nl == self.start || self.buf[nl - 1] != b'\r' {
                    return Err(protocol("a reply line that does not end in CRLF"));
                }
                let range = (self.start, nl - 1);
                self.start = nl + 1;
                return Ok(range);
            }
            if self.end - self.start >= MAX_LINE.min(self.buf.len() / 2) {
                return Err(protocol("a reply line longer than 16 KiB"));
            }
            let seen = self.end - self.start;
            self.fill()?;
            // `fill` may have moved the unread bytes to the front.
            scanned = self.start + seen;
        }
    }

    fn int_line(&mut self) -> io::Result<i64> {
        let (a, b) = self.line()?;
        parse_int(&self.buf[a..b]).ok_or_else(|| protocol("a malformed integer in a reply"))
    }

    /// Copies the next `out.len()` bytes into `out`: what is buffered first, then straight from
    /// the stream, at most [`PIECE`] bytes per read; `piece` hears every piece as it lands.
    fn read_exact_into(&mut self, out: &mut [u8], piece: &mut impl FnMut(&[u8])) -> io::Result<()> {
        let mut done = 0;
        let buffered = (self.end - self.start).min(out.len());
        if buffered > 0 {
            out[..buffered].copy_from_slice(&self.buf[self.start..self.start + buffered]);
            self.start += buffered;
            piece(&out[..buffered]);
            done = buffered;
        }
        while done < out.len() {
            let want = (out.len() - done).min(PIECE);
            if want < self.buf.len() / 4 {
                // A short tail: read it through the buffer with whatever follows it, so that
                // the next reply's head costs no extra read.
                while self.end - self.start < want {
                    self.fill()?;
                }
                out[done..done + want].copy_from_slice(&self.buf[self.start..self.start + want]);
                self.start += want;
            } else {
                let dst = &mut out[done..done + want];
                let n = loop {
                    match self.inner.read(dst) {
                        Ok(0) => {
                            return Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "the server closed the connection",
                            ));
                        }
                        Ok(n) => break n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                };
                piece(&out[done..done + n]);
                done += n;
                continue;
            }
            piece(&out[done..done + want]);
            done += want;
        }
        Ok(())
    }

    /// Drops the next `n` bytes.
    fn skip(&mut self, mut n: usize) -> io::Result<()> {
        loop {
            let take = (self.end - self.start).min(n);
            self.start += take;
            n -= take;
            if n == 0 {
                return Ok(());
            }
            self.fill()?;
        }
    }

    fn crlf(&mut self) -> io::Result<()> {
        while self.end - self.start < 2 {
            self.fill()?;
        }
        if &self.buf[self.start..self.start + 2] != b"\r\n" {
            return Err(protocol("a bulk string not followed by CRLF"));
        }
        self.start += 2;
        Ok(())
    }

    fn first_byte(&mut self) -> io::Result<u8> {
        if self.start == self.end {
            self.fill()?;
        }
        let b = self.buf[self.start];
        self.start += 1;
        Ok(b)
    }

    /// Reads one reply expected to be a bulk string of `head.len() + out.len()` bytes: the first
    /// `head.len()` bytes go to `head`, the rest to `out`, and `piece(head, p)` hears each piece
    /// `p` of `out` as it lands (in order, covering `out` exactly once; `head` is complete). On anything other than
    /// [`BlockReply::Filled`], `out` holds unspecified bytes. A reply of any kind is consumed
    /// whole, so the stream stays in step.
    pub(crate) fn read_block(
        &mut self,
        head: &mut [u8],
        out: &mut [u8],
        mut piece: impl FnMut(&[u8], &[u8]),
    ) -> io::Result<BlockReply> {
        let kind = self.first_byte()?;
        if kind != b'$' {
            return self.value_after(kind, 0).map(BlockReply::Other);
        }
        let len = self.int_line()?;
        if len < 0 {
            return Ok(BlockReply::Nil);
        }
        let len = usize::try_from(len).map_err(|_| protocol("a bulk length too large"))?;
        if len != head.len() + out.len() {
            self.skip(len)?;
            self.crlf()?;
            return Ok(BlockReply::Length(len));
        }
        self.read_exact_into(head, &mut |_| {})?;
        let head: &[u8] = head;
        self.read_exact_into(out, &mut |p| piece(head, p))?;
        self.crlf()?;
        Ok(BlockReply::Filled)
    }

    /// Reads one reply as a [`Value`].
    pub(crate) fn read_value(&mut self) -> io::Result<Value> {
        let kind = self.first_byte()?;
        self.value_after(kind, 0)
    }

    fn value_after(&mut self, kind: u8, depth: usize) -> io::Result<Value> {
        match kind {
            b'+' => {
                let (a, b) = self.line()?;
                let s = &self.buf[a..b];
                Ok(if s == b"OK" {
                    Value::Okay
                } else {
                    Value::SimpleString(String::from_utf8_lossy(s).into_owned())
                })
            }
            b'-' => {
                // Hand the whole error line to redis-rs, which knows the error codes.
                let (a, b) = self.line()?;
                let mut line = Vec::with_capacity(b - a + 3);
                line.push(b'-');
                line.extend_from_slice(&self.buf[a..b]);
                line.extend_from_slice(b"\r\n");
                redis::parse_redis_value(&line).map_err(|_| protocol("a malformed error reply"))
            }
            b':' => self.int_line().map(Value::Int),
            b'$' => {
                let len = self.int_line()?;
                if len < 0 {
                    return Ok(Value::Nil);
                }
                if len > MAX_BULK {
                    return Err(protocol("a bulk string longer than 512 MiB"));
                }
                // Never trust a length for an allocation: grow (by doubling, from 64 KiB) as
                // the bytes arrive, so a broken or hostile server's `$536870000` followed by
                // a close costs nothing.
                let len = len as usize;
                let mut v = Vec::new();
                while v.len() < len {
                    let at = v.len();
                    let to = len.min((at * 2).max(64 << 10));
                    v.resize(to, 0);
                    self.read_exact_into(&mut v[at..], &mut |_| {})?;
                }
                self.crlf()?;
                Ok(Value::BulkString(v))
            }
            b'*' => {
                let n = self.int_line()?;
                if n < 0 {
                    return Ok(Value::Nil);
                }
                if depth >= MAX_DEPTH {
                    return Err(protocol("arrays nested too deeply"));
                }
                let n = usize::try_from(n).map_err(|_| protocol("an array too long"))?;
                // Never trust a length for an allocation: grow as elements arrive.
                let mut items = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    let kind = self.first_byte()?;
                    items.push(self.value_after(kind, depth + 1)?);
                }
                Ok(Value::Array(items))
            }
            _ => Err(protocol("not a RESP2 reply")),
        }
    }
}

/// A RESP integer: optional `-`, then decimal digits; `None` if malformed or out of range.
fn parse_int(s: &[u8]) -> Option<i64> {
    let (neg, digits) = match s.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, s),
    };
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    let mut v: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(i64::from(d - b'0'))?;
    }
    Some(if neg { -v } else { v })
}

#[cfg(test)]
mod tests;
