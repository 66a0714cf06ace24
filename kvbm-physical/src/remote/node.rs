//! One Redis node: its client (address, credentials, TLS), a pool of idle connections, and its
//! circuit breaker; and the wire helpers to send a pipeline and read its replies with
//! deadlines.

use std::time::{Duration, Instant};

use parking_lot::Mutex;
use redis::{
    ClientTlsConfig, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisConnectionInfo,
    TlsCertificates, Value,
};

use super::breaker::{Admit, Breaker, BreakerState};
use super::config::{ConfigError, Endpoint, RemoteConfig};
use super::stats::Counters;
use crate::StoreError;

/// Payloads at least this long are written straight from the caller's buffer instead of being
/// copied into the send buffer.
const DIRECT_WRITE_BYTES: usize = 64 << 10;
/// A pooled connection keeps a send buffer up to this capacity.
const MAX_RETAINED_BUFFER: usize = 1 << 20;

/// Why a node did not answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The breaker is open: no I/O was attempted.
    Open,
    /// A read or write made no progress within the deadline.
    Timeout(Duration),
    /// Connection refused, reset or closed, authentication refused, a protocol error, or the
    /// node reports that it cannot serve (`LOADING`, `CLUSTERDOWN`, ...). The text names the
    /// node and the cause, never a credential.
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

/// A connection and its reusable send buffer.
pub(crate) struct Conn {
    con: redis::Connection,
    buf: Vec<u8>,
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
    client: redis::Client,
    idle: Mutex<Vec<Conn>>,
    max_idle: usize,
    pub(crate) breaker: Breaker,
    connect_timeout: Duration,
    response_timeout: Duration,
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
    /// A node at `host:port` with the configuration's credentials, TLS and deadlines. Makes no
    /// connection.
    pub(crate) fn new(config: &RemoteConfig, host: &str, port: u16) -> Result<Self, ConfigError> {
        let tls = config.endpoints.first().is_some_and(|e: &Endpoint| e.tls);
        let addr = if tls {
            ConnectionAddr::TcpTls {
                host: host.to_owned(),
                port,
                insecure: false,
                tls_params: None,
            }
        } else {
            ConnectionAddr::Tcp(host.to_owned(), port)
        };
        let tls_err = |e: redis::RedisError| ConfigError::Tls {
            reason: format!("{:?}", e.kind()),
        };
        let mut redis_info = RedisConnectionInfo::default().set_db(config.db);
        if let Some(user) = &config.username {
            redis_info = redis_info.set_username(user);
        }
        if let Some(password) = &config.password {
            redis_info = redis_info.set_password(password.expose());
        }
        let info: ConnectionInfo = addr
            .into_connection_info()
            .map_err(tls_err)?
            .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true))
            .set_redis_settings(redis_info);
        let client =
            if tls && (config.tls.ca_pem.is_some() || config.tls.client_pem.is_some()) {
                redis::Client::build_with_tls(
                    info,
                    TlsCertificates {
                        client_tls: config.tls.client_pem.as_ref().map(|(cert, key)| {
                            ClientTlsConfig {
                                client_cert: cert.clone(),
                                client_key: key.clone(),
                            }
                        }),
                        root_cert: config.tls.ca_pem.clone(),
                    },
                )
                .map_err(tls_err)?
            } else {
                redis::Client::open(info).map_err(tls_err)?
            };
        Ok(Self {
            name: node_name(host, port),
            client,
            idle: Mutex::new(Vec::new()),
            max_idle: config.max_idle_connections,
            breaker: Breaker::new(config.breaker_threshold, config.breaker_cool_down),
            connect_timeout: config.connect_timeout,
            response_timeout: config.response_timeout,
        })
    }

    pub(crate) fn admit(&self) -> Admit {
        self.breaker.admit(Instant::now())
    }

    pub(crate) fn breaker_state(&self) -> BreakerState {
        self.breaker.state()
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

    /// An idle connection, or a new one (within the connect deadline).
    pub(crate) fn checkout(&self, counters: &Counters) -> Result<Conn, Failure> {
        if let Some(conn) = self.idle.lock().pop() {
            return Ok(conn);
        }
        let con = self
            .client
            .get_connection_with_timeout(self.connect_timeout)
            .map_err(|e| self.classify(&e, counters, self.connect_timeout))?;
        let timeouts = con
            .set_read_timeout(Some(self.response_timeout))
            .and_then(|()| con.set_write_timeout(Some(self.response_timeout)));
        if let Err(e) = timeouts {
            return Err(self.classify(&e, counters, self.response_timeout));
        }
        let mut conn = Conn {
            con,
            buf: Vec::new(),
        };
        // A server that requires a password we do not have answers NOAUTH only to commands
        // (and drops clients that send large unauthenticated ones): ask once, here.
        match conn.query(&[b"PING"]) {
            Ok(Value::SimpleString(_) | Value::Okay) => {}
            Ok(Value::ServerError(e)) => {
                counters.connection_errors.add(1);
                return Err(Failure::Unavailable(format!(
                    "{}: server refused: {}",
                    self.name,
                    e.code()
                )));
            }
            Ok(_) => {
                counters.connection_errors.add(1);
                return Err(Failure::Unavailable(format!(
                    "{}: unexpected reply to PING",
                    self.name
                )));
            }
            Err(e) => return Err(self.classify(&e, counters, self.response_timeout)),
        }
        counters.connections.add(1);
        Ok(conn)
    }

    /// Returns a healthy connection to the pool.
    pub(crate) fn checkin(&self, mut conn: Conn) {
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
        e: &redis::RedisError,
        counters: &Counters,
        deadline: Duration,
    ) -> Failure {
        if e.is_timeout() {
            counters.timeouts.add(1);
            return Failure::Timeout(deadline);
        }
        counters.connection_errors.add(1);
        let cause = if e.is_connection_refusal() {
            "connection refused".to_owned()
        } else if e.is_connection_dropped() {
            "connection closed".to_owned()
        } else if e.is_io_error() {
            // The operating system's text (e.g. "Connection reset by peer"): no credentials.
            format!("I/O error: {e}")
        } else if let Some(code) = e.code() {
            format!("server refused: {code}")
        } else {
            format!("{:?}", e.kind())
        };
        Failure::Unavailable(format!("{}: {cause}", self.name))
    }

    pub(crate) fn response_timeout(&self) -> Duration {
        self.response_timeout
    }
}

/// Writes one pipeline: small pieces are gathered in the connection's buffer, block payloads
/// go to the socket straight from the caller's memory.
pub(crate) struct Packer<'c> {
    conn: &'c mut Conn,
}

impl<'c> Packer<'c> {
    pub(crate) fn new(conn: &'c mut Conn) -> Self {
        conn.buf.clear();
        Self { conn }
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
    pub(crate) fn arg2(&mut self, head: &[u8], body: &[u8]) -> redis::RedisResult<()> {
        self.bulk_len(head.len() + body.len());
        self.conn.buf.extend_from_slice(head);
        if body.len() >= DIRECT_WRITE_BYTES {
            self.flush()?;
            self.conn.con.send_packed_command(body)?;
        } else {
            self.conn.buf.extend_from_slice(body);
        }
        self.conn.buf.extend_from_slice(b"\r\n");
        Ok(())
    }

    fn bulk_len(&mut self, n: usize) {
        self.conn.buf.push(b'$');
        push_decimal(&mut self.conn.buf, n);
        self.conn.buf.extend_from_slice(b"\r\n");
    }

    /// Sends what is gathered.
    pub(crate) fn flush(&mut self) -> redis::RedisResult<()> {
        if !self.conn.buf.is_empty() {
            self.conn.con.send_packed_command(&self.conn.buf)?;
            self.conn.buf.clear();
        }
        Ok(())
    }
}

impl Conn {
    /// The next reply.
    pub(crate) fn recv(&mut self) -> redis::RedisResult<Value> {
        self.con.recv_response()
    }

    /// One command, one reply (for control commands such as `CLUSTER SLOTS`).
    pub(crate) fn query(&mut self, args: &[&[u8]]) -> redis::RedisResult<Value> {
        let mut p = Packer::new(self);
        p.array(args.len());
        for a in args {
            p.arg(a);
        }
        p.flush()?;
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

    #[test]
    fn node_names() {
        assert_eq!(node_name("127.0.0.1", 7000), "127.0.0.1:7000");
        assert_eq!(node_name("::1", 7000), "[::1]:7000");
    }
}
