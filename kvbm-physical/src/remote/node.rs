//! One Redis node: its address, credentials and TLS settings, a pool of idle connections, and
//! its circuit breaker; and the connection itself: a socket kvbm owns (plain TCP or rustls),
//! commands written with one vectored write per pipeline (block payloads straight from the
//! caller's memory), replies read with [`RespReader`] (block values straight into the
//! caller's buffer). Every read and write has the node's deadline.

use std::io::{self, IoSlice, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use redis::Value;
use rustls::pki_types::ServerName;

use super::breaker::{Admit, Breaker, BreakerState};
use super::config::RemoteConfig;
use super::resp::{BlockReply, RespReader};
use super::stats::Counters;
use crate::StoreError;

/// Payloads at least this long are written straight from the caller's buffer instead of being
/// copied into the send buffer.
const DIRECT_WRITE_BYTES: usize = 64 << 10;
/// A pooled connection keeps a send buffer up to this capacity.
const MAX_RETAINED_BUFFER: usize = 1 << 20;
/// Slices per `writev` call (Linux refuses more than 1024).
const MAX_IOVECS: usize = 512;

/// Why a node did not answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The breaker is open: no I/O was attempted.
    Open,
    /// A read or write made no progress within the deadline.
    Timeout(Duration),
    /// Connection refused, reset or closed, authentication refused, a protocol or TLS error,
    /// or the node reports that it cannot serve (`LOADING`, `CLUSTERDOWN`, ...). The text
    /// names the node and the cause, never a credential.
    Unavailable(String),
}

impl Failure {
    pub(crate) fn to_store_error(&self) -> StoreError {
        match self {
            Self::Open => StoreError::Unavailable("circuit breaker open".to_owned()),
            Self::Timeout(d) => StoreError::Timeout(*d),
            Self::Unavailable(why) => StoreError::Unavailable(why.clone()),
        }
    }
}

/// A TCP socket with an optional absolute deadline: while one is set, every socket read and
/// write gets the time left before it (`SO_RCVTIMEO`/`SO_SNDTIMEO` set to that), and fails
/// with `TimedOut` once it has passed. A per-call socket timeout alone bounds each call, not
/// the round trip: a node that trickles a byte just within it would hold a worker for
/// minutes. It sits *under* TLS, so that each of the socket reads rustls makes for one
/// record is bounded too.
pub(crate) struct TimedTcp {
    tcp: TcpStream,
    deadline: Option<Instant>,
}

impl TimedTcp {
    fn new(tcp: TcpStream) -> Self {
        Self {
            tcp,
            deadline: None,
        }
    }

    /// The time left before the deadline, set on the socket for the next read (or write).
    fn arm(&self, read: bool) -> io::Result<()> {
        let Some(deadline) = self.deadline else {
            return Ok(());
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the round trip's deadline passed",
            ));
        }
        if read {
            self.tcp.set_read_timeout(Some(left))
        } else {
            self.tcp.set_write_timeout(Some(left))
        }
    }
}

impl Read for TimedTcp {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.arm(true)?;
        self.tcp.read(buf)
    }
}

impl Write for TimedTcp {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.arm(false)?;
        self.tcp.write(buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.arm(false)?;
        self.tcp.write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.tcp.flush()
    }
}

/// The socket: plain TCP, or TLS over TCP (the deadline under it, see [`TimedTcp`]).
pub(crate) enum Stream {
    Tcp(TimedTcp),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TimedTcp>>),
}

impl Stream {
    fn timed(&self) -> &TimedTcp {
        match self {
            Self::Tcp(s) => s,
            Self::Tls(s) => s.get_ref(),
        }
    }

    fn timed_mut(&mut self) -> &mut TimedTcp {
        match self {
            Self::Tcp(s) => s,
            Self::Tls(s) => s.get_mut(),
        }
    }

    fn tcp(&self) -> &TcpStream {
        &self.timed().tcp
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.read(buf),
            Self::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write(buf),
            Self::Tls(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write_vectored(bufs),
            Self::Tls(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.flush(),
            Self::Tls(s) => s.flush(),
        }
    }
}

/// A connection: the socket with its reply reader, and a reusable send buffer.
pub(crate) struct Conn {
    io: RespReader<Stream>,
    buf: Vec<u8>,
}

impl Conn {
    /// Bounds every read and write from now on by `deadline` (one round trip's); `None`
    /// goes back to the per-call `timeout` (the node's response timeout).
    pub(crate) fn set_deadline(
        &mut self,
        deadline: Option<Instant>,
        timeout: Duration,
    ) -> io::Result<()> {
        let timed = self.io.get_mut().timed_mut();
        timed.deadline = deadline;
        if deadline.is_none() {
            timed.tcp.set_read_timeout(Some(timeout))?;
            timed.tcp.set_write_timeout(Some(timeout))?;
        }
        Ok(())
    }

    /// Whether the server closed this idle connection (or sent bytes nobody asked for): a
    /// non-blocking peek sees the end of the stream, an error, or data, where a live idle
    /// connection has nothing to read. No round trip.
    fn closed_by_peer(&self) -> bool {
        if self.io.has_buffered() {
            return true;
        }
        let tcp = self.io.get_ref().tcp();
        if tcp.set_nonblocking(true).is_err() {
            return true;
        }
        let peeked = tcp.peek(&mut [0u8; 1]);
        let blocking = tcp.set_nonblocking(false);
        match peeked {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => blocking.is_err(),
            _ => true, // Ok(0): closed; Ok(_): out of step; Err: reset
        }
    }
}

/// TCP keepalive on a node's connection (30 s idle, then every 10 s, 3 probes): a peer or a
/// middlebox that vanished without a reset is found within about a minute, not at the next
/// batch's deadline. Best effort: a refused option changes nothing else.
fn keepalive(tcp: &TcpStream) {
    use rustix::net::sockopt;
    let set = sockopt::set_socket_keepalive(tcp, true)
        .and_then(|()| sockopt::set_tcp_keepidle(tcp, std::time::Duration::from_secs(30)))
        .and_then(|()| sockopt::set_tcp_keepintvl(tcp, std::time::Duration::from_secs(10)))
        .and_then(|()| sockopt::set_tcp_keepcnt(tcp, 3));
    if let Err(e) = set {
        tracing::debug!(error = %e, "remote tier: TCP keepalive not set");
    }
}

/// The node's address as `host:port` (what `CLUSTER SLOTS` and `MOVED` say).
pub(crate) fn node_name(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

pub(crate) struct Node {
    /// `host:port`.
    pub(crate) name: String,
    host: String,
    port: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
    username: Option<String>,
    password: Option<super::config::Secret>,
    db: i64,
    idle: Mutex<Vec<Conn>>,
    max_idle: usize,
    pub(crate) breaker: Breaker,
    connect_timeout: Duration,
    response_timeout: Duration,
    /// Resolves the host name (the system resolver; tests put in a slow one).
    resolver: Resolver,
    /// The host-name lookup running or last finished: every attempt meanwhile waits on it
    /// (a running one is never started twice), and a successful one answers for
    /// [`DNS_REUSE`].
    lookup: Mutex<Option<Arc<Lookup>>>,
}

/// How long a host name's addresses are reused before a connection looks them up again.
pub(crate) const DNS_REUSE: Duration = Duration::from_secs(30);

/// A finished lookup's answer; the error as kind and text (an `io::Error` is not `Clone`).
type Answer = Result<Vec<SocketAddr>, (io::ErrorKind, String)>;

/// One host-name lookup, shared by the connection attempts that wait on it.
#[derive(Default)]
struct Lookup {
    /// `None` while it runs.
    result: Mutex<Option<Answer>>,
    done: Condvar,
    started: Option<Instant>,
}

impl Lookup {
    /// Whether an attempt may wait on it (running) or use it (succeeded recently).
    fn reusable(&self) -> bool {
        match &*self.result.lock() {
            None => true,
            Some(Ok(_)) => self.started.is_some_and(|t| t.elapsed() < DNS_REUSE),
            Some(Err(_)) => false,
        }
    }
}

/// A host-name resolver: blocking, so it runs on a thread of its own (see [`Node::resolve`]).
type Resolver = fn(&str, u16) -> io::Result<Vec<SocketAddr>>;

fn system_resolver(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    Ok((host, port).to_socket_addrs()?.collect())
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.name)
            .field("breaker", &self.breaker.state())
            .finish_non_exhaustive()
    }
}

impl Node {
    /// A node at `host:port` with the configuration's credentials and deadlines, and `tls` for
    /// `rediss://`. Makes no connection.
    pub(crate) fn new(
        config: &RemoteConfig,
        tls: Option<Arc<rustls::ClientConfig>>,
        host: &str,
        port: u16,
    ) -> Self {
        Self {
            name: node_name(host, port),
            host: host.to_owned(),
            port,
            tls,
            username: config.username.clone(),
            password: config.password.clone(),
            db: config.db,
            idle: Mutex::new(Vec::new()),
            max_idle: config.max_idle_connections,
            breaker: Breaker::new(config.breaker_threshold, config.breaker_cool_down),
            connect_timeout: config.connect_timeout,
            response_timeout: config.response_timeout,
            resolver: system_resolver,
            lookup: Mutex::new(None),
        }
    }

    /// The addresses of the host, by `deadline`. An IP address needs no lookup. A host name
    /// is resolved on a thread of its own (the system resolver blocks, for as long as its own
    /// timeouts and retries take: seconds when a name server does not answer), so that the
    /// connection attempt keeps its deadline. Every attempt while a lookup runs waits on that
    /// one (one lookup thread per node at most, however many attempts time out), and a
    /// successful lookup answers for [`DNS_REUSE`].
    fn resolve(&self, deadline: Instant) -> io::Result<Vec<SocketAddr>> {
        if let Ok(ip) = self.host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, self.port)]);
        }
        let lookup = {
            let mut slot = self.lookup.lock();
            match slot.as_ref().filter(|l| l.reusable()) {
                Some(l) => Arc::clone(l),
                None => {
                    let l = Arc::new(Lookup {
                        started: Some(Instant::now()),
                        ..Lookup::default()
                    });
                    let (host, port, resolve) = (self.host.clone(), self.port, self.resolver);
                    let running = Arc::clone(&l);
                    std::thread::Builder::new()
                        .name("kvbm-remote-dns".into())
                        .spawn(move || {
                            let answer =
                                resolve(&host, port).map_err(|e| (e.kind(), e.to_string()));
                            *running.result.lock() = Some(answer);
                            running.done.notify_all();
                        })?;
                    *slot = Some(Arc::clone(&l));
                    l
                }
            }
        };
        let mut result = lookup.result.lock();
        while result.is_none() {
            if lookup.done.wait_until(&mut result, deadline).timed_out() {
                break;
            }
        }
        match &*result {
            Some(Ok(addrs)) => Ok(addrs.clone()),
            Some(Err((kind, text))) => Err(io::Error::new(*kind, text.clone())),
            None => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "resolving the host name outlasted the connect deadline",
            )),
        }
    }

    pub(crate) fn admit(&self) -> Admit {
        self.breaker.admit(Instant::now())
    }

    pub(crate) fn breaker_state(&self) -> BreakerState {
        self.breaker.state()
    }

    /// The host it connects to (as configured or as `CLUSTER SLOTS` named it).
    pub(crate) fn host(&self) -> &str {
        &self.host
    }

    /// Records a failure on the breaker (counting a trip).
    pub(crate) fn failed(&self, counters: &Counters) {
        if self.breaker.failure(Instant::now()) {
            counters.breaker_opens.add(1);
            tracing::warn!(node = %self.name, "remote tier: circuit breaker opened");
        }
    }

    pub(crate) fn succeeded(&self, was_probe: bool) {
        self.breaker.success();
        if was_probe {
            tracing::info!(node = %self.name, "remote tier: node answers again, breaker closed");
        }
    }

    /// An idle connection, or a new one (within the connect deadline). An idle connection
    /// the server closed meanwhile (its `timeout`, a restart, a proxy's idle limit) is
    /// dropped here, before any command is sent on it: it would fail the batch, and count
    /// against a healthy node's breaker.
    pub(crate) fn checkout(&self, counters: &Counters) -> Result<Conn, Failure> {
        loop {
            let Some(conn) = self.idle.lock().pop() else {
                break;
            };
            if conn.closed_by_peer() {
                counters.stale_connections.add(1);
                continue;
            }
            return Ok(conn);
        }
        let conn = self.connect(counters)?;
        counters.connections.add(1);
        Ok(conn)
    }

    /// Connects (TCP within the connect deadline, each later step within it too), shakes
    /// hands (TLS), authenticates, selects the database and asks for a `PING`: a server that
    /// requires a password we do not have answers `NOAUTH` only to commands (and drops
    /// clients that send large unauthenticated ones), so it is refused here.
    fn connect(&self, counters: &Counters) -> Result<Conn, Failure> {
        let ct = self.connect_timeout;
        let io_fail = |e: io::Error| self.classify(&e, counters, ct);
        // The lookup and every address tried share one deadline.
        let deadline = Instant::now() + ct;
        let addrs = self.resolve(deadline).map_err(io_fail)?;
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no address for the host");
        let mut tcp = None;
        for addr in addrs {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                last = io::Error::new(io::ErrorKind::TimedOut, "connect deadline passed");
                break;
            }
            match TcpStream::connect_timeout(&addr, left) {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) => last = e,
            }
        }
        let tcp = tcp.ok_or(last).map_err(io_fail)?;
        keepalive(&tcp);
        tcp.set_nodelay(true)
            .and_then(|()| tcp.set_read_timeout(Some(ct)))
            .and_then(|()| tcp.set_write_timeout(Some(ct)))
            .map_err(io_fail)?;
        let stream = match &self.tls {
            None => Stream::Tcp(TimedTcp::new(tcp)),
            Some(config) => {
                let name = ServerName::try_from(self.host.clone()).map_err(|_| {
                    counters.connection_errors.add(1);
                    Failure::Unavailable(format!("{}: not a TLS server name", self.name))
                })?;
                let tls = rustls::ClientConnection::new(Arc::clone(config), name).map_err(|e| {
                    counters.connection_errors.add(1);
                    Failure::Unavailable(format!("{}: TLS: {e}", self.name))
                })?;
                let mut s = rustls::StreamOwned::new(tls, TimedTcp::new(tcp));
                while s.conn.is_handshaking() {
                    s.conn.complete_io(&mut s.sock).map_err(io_fail)?;
                }
                Stream::Tls(Box::new(s))
            }
        };
        let mut conn = Conn {
            io: RespReader::new(stream),
            buf: Vec::new(),
        };
        let refused = |code: &str| {
            counters.connection_errors.add(1);
            Failure::Unavailable(format!("{}: server refused: {code}", self.name))
        };
        if let Some(password) = &self.password {
            let mut auth = redis::cmd("AUTH");
            if let Some(user) = &self.username {
                auth.arg(user);
            }
            auth.arg(password.expose());
            match conn.query_packed(&auth.get_packed_command()) {
                Ok(Value::Okay) => {}
                Ok(Value::ServerError(e)) => return Err(refused(e.code())),
                Ok(_) => return Err(refused("unexpected reply to AUTH")),
                Err(e) => return Err(io_fail(e)),
            }
        }
        if self.db != 0 {
            match conn.query_packed(&redis::cmd("SELECT").arg(self.db).get_packed_command()) {
                Ok(Value::Okay) => {}
                Ok(Value::ServerError(e)) => return Err(refused(e.code())),
                Ok(_) => return Err(refused("unexpected reply to SELECT")),
                Err(e) => return Err(io_fail(e)),
            }
        }
        let rt = self.response_timeout;
        let tcp = conn.io.get_ref().tcp();
        tcp.set_read_timeout(Some(rt))
            .and_then(|()| tcp.set_write_timeout(Some(rt)))
            .map_err(io_fail)?;
        match conn.query(&[b"PING"]) {
            Ok(Value::SimpleString(_) | Value::Okay) => Ok(conn),
            Ok(Value::ServerError(e)) => Err(refused(e.code())),
            Ok(_) => Err(refused("unexpected reply to PING")),
            Err(e) => Err(self.classify(&e, counters, rt)),
        }
    }

    /// Returns a healthy connection to the pool. A connection with unread reply bytes is out
    /// of step and is dropped instead.
    pub(crate) fn checkin(&self, mut conn: Conn) {
        if conn.io.has_buffered() {
            return;
        }
        conn.buf.clear();
        if conn.buf.capacity() > MAX_RETAINED_BUFFER {
            conn.buf = Vec::new();
        }
        let mut idle = self.idle.lock();
        if idle.len() < self.max_idle {
            idle.push(conn);
        }
    }

    /// Drops every idle connection (after a failure, they are probably dead too).
    pub(crate) fn drain_idle(&self) {
        let idle = std::mem::take(&mut *self.idle.lock());
        drop(idle);
    }

    /// A failure of this node, described without credentials; counts it.
    pub(crate) fn classify(
        &self,
        e: &io::Error,
        counters: &Counters,
        deadline: Duration,
    ) -> Failure {
        use io::ErrorKind as K;
        if matches!(e.kind(), K::WouldBlock | K::TimedOut) {
            counters.timeouts.add(1);
            return Failure::Timeout(deadline);
        }
        counters.connection_errors.add(1);
        let cause = match e.kind() {
            K::ConnectionRefused => "connection refused".to_owned(),
            K::UnexpectedEof
            | K::ConnectionReset
            | K::ConnectionAborted
            | K::BrokenPipe
            | K::NotConnected => "connection closed".to_owned(),
            // A reply that is not RESP2, or a TLS failure (rustls' text: no credentials).
            K::InvalidData => format!("protocol or TLS error: {e}"),
            // The operating system's text (e.g. "Network is unreachable"): no credentials.
            _ => format!("I/O error: {e}"),
        };
        Failure::Unavailable(format!("{}: {cause}", self.name))
    }

    pub(crate) fn response_timeout(&self) -> Duration {
        self.response_timeout
    }
}

/// Writes one pipeline: small pieces are gathered in the connection's buffer, block payloads
/// stay where they are; [`flush`](Packer::flush) sends it all with vectored writes.
pub(crate) struct Packer<'c, 'b> {
    conn: &'c mut Conn,
    /// Payloads sent from the caller's memory: (offset in the buffer where each goes, bytes).
    bodies: Vec<(usize, &'b [u8])>,
}

impl<'c, 'b> Packer<'c, 'b> {
    pub(crate) fn new(conn: &'c mut Conn) -> Self {
        conn.buf.clear();
        Self {
            conn,
            bodies: Vec::new(),
        }
    }

    /// `*n\r\n`: an array of `n` arguments.
    pub(crate) fn array(&mut self, n: usize) {
        self.conn.buf.push(b'*');
        push_decimal(&mut self.conn.buf, n);
        self.conn.buf.extend_from_slice(b"\r\n");
    }

    /// One bulk-string argument, copied.
    pub(crate) fn arg(&mut self, bytes: &[u8]) {
        self.bulk_len(bytes.len());
        self.conn.buf.extend_from_slice(bytes);
        self.conn.buf.extend_from_slice(b"\r\n");
    }

    /// One bulk-string argument made of `head` then `body`; `body` is sent from where it is
    /// when it is large.
    pub(crate) fn arg2(&mut self, head: &[u8], body: &'b [u8]) {
        self.bulk_len(head.len() + body.len());
        self.conn.buf.extend_from_slice(head);
        if body.len() >= DIRECT_WRITE_BYTES {
            self.bodies.push((self.conn.buf.len(), body));
        } else {
            self.conn.buf.extend_from_slice(body);
        }
        self.conn.buf.extend_from_slice(b"\r\n");
    }

    fn bulk_len(&mut self, n: usize) {
        self.conn.buf.push(b'$');
        push_decimal(&mut self.conn.buf, n);
        self.conn.buf.extend_from_slice(b"\r\n");
    }

    /// Sends what is gathered, in order.
    pub(crate) fn flush(self) -> io::Result<()> {
        let buf = &self.conn.buf;
        let mut slices = Vec::with_capacity(2 * self.bodies.len() + 1);
        let mut at = 0;
        for &(offset, body) in &self.bodies {
            if offset > at {
                slices.push(IoSlice::new(&buf[at..offset]));
            }
            slices.push(IoSlice::new(body));
            at = offset;
        }
        if buf.len() > at {
            slices.push(IoSlice::new(&buf[at..]));
        }
        write_all_vectored(self.conn.io.get_mut(), &mut slices)?;
        self.conn.buf.clear();
        Ok(())
    }
}

/// Writes every byte of `slices`, at most [`MAX_IOVECS`] slices per call.
pub(crate) fn write_all_vectored(
    w: &mut impl Write,
    mut slices: &mut [IoSlice<'_>],
) -> io::Result<()> {
    while !slices.is_empty() {
        let n = slices.len().min(MAX_IOVECS);
        match w.write_vectored(&slices[..n]) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the connection accepted no bytes",
                ));
            }
            Ok(k) => IoSlice::advance_slices(&mut slices, k),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Conn {
    /// The next reply.
    pub(crate) fn recv(&mut self) -> io::Result<Value> {
        self.io.read_value()
    }

    /// The next reply, expected to be a value of `head.len() + out.len()` bytes (see
    /// [`RespReader::read_block`]).
    pub(crate) fn recv_block(
        &mut self,
        head: &mut [u8],
        out: &mut [u8],
        piece: impl FnMut(&[u8], &[u8]),
    ) -> io::Result<BlockReply> {
        self.io.read_block(head, out, piece)
    }

    /// One command, one reply (for control commands such as `CLUSTER SLOTS`).
    pub(crate) fn query(&mut self, args: &[&[u8]]) -> io::Result<Value> {
        let mut p = Packer::new(self);
        p.array(args.len());
        for a in args {
            p.arg(a);
        }
        p.flush()?;
        self.recv()
    }

    /// One command packed by redis-rs, one reply.
    fn query_packed(&mut self, packed: &[u8]) -> io::Result<Value> {
        self.io.get_mut().write_all(packed)?;
        self.recv()
    }
}

fn push_decimal(out: &mut Vec<u8>, n: usize) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals() {
        for n in [0usize, 7, 10, 99, 12345, usize::MAX] {
            let mut v = Vec::new();
            push_decimal(&mut v, n);
            assert_eq!(String::from_utf8(v).unwrap(), n.to_string());
        }
    }

    fn slow_resolver(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        assert_eq!(host, "redis.invalid");
        let calls = CALLS.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        // A name server that does not answer: the system resolver's own timeouts.
        std::thread::sleep(Duration::from_millis(1500));
        // The call count, as the port: which lookup the answer came from.
        Ok(vec![SocketAddr::from((
            [127, 0, 0, 1],
            port + calls as u16,
        ))])
    }

    #[test]
    fn a_slow_host_name_lookup_keeps_the_connect_deadline_and_runs_once() {
        let config = RemoteConfig::builder(super::super::Namespace::new("dns", 1), 64)
            .url("redis://redis.invalid:7000")
            .connect_timeout(Duration::from_millis(100))
            .build()
            .unwrap();
        let mut node = Node::new(&config, None, "redis.invalid", 7000);
        node.resolver = slow_resolver;
        let counters = Counters::default();
        // Each attempt gives up at its deadline, long before the lookup answers (1.5 s).
        for _ in 0..3 {
            let started = Instant::now();
            let e = node
                .resolve(started + Duration::from_millis(100))
                .unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::TimedOut);
            assert!(started.elapsed() < Duration::from_millis(1000));
        }
        assert!(matches!(node.connect(&counters), Err(Failure::Timeout(_))));
        assert_eq!(counters.remote_stats().timeouts, 1);
        // Attempts from several threads at once wait on that same lookup too.
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    let e = node.resolve(Instant::now() + Duration::from_millis(50));
                    assert_eq!(e.unwrap_err().kind(), io::ErrorKind::TimedOut);
                });
            }
        });
        // The one lookup started by the first attempt answers the later ones.
        let addrs = node
            .resolve(Instant::now() + Duration::from_secs(10))
            .unwrap();
        assert_eq!(addrs, vec![SocketAddr::from(([127, 0, 0, 1], 7001))]);
        // And keeps answering, without a lookup, for DNS_REUSE.
        assert_eq!(node.resolve(Instant::now()).unwrap(), addrs);
        // An IP address needs no lookup.
        let ip = Node::new(&config, None, "::1", 7000);
        assert_eq!(
            ip.resolve(Instant::now()).unwrap(),
            vec![SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 7000))]
        );
    }

    #[test]
    fn node_names() {
        assert_eq!(node_name("127.0.0.1", 7000), "127.0.0.1:7000");
        assert_eq!(node_name("::1", 7000), "[::1]:7000");
    }
}
