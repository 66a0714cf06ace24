//! Configuration of the remote tier: where Redis is, how to authenticate, deadlines, batching,
//! the circuit breaker, and the namespace. Setters never fail; [`RemoteConfigBuilder::build`]
//! checks everything once.

use std::fmt;
use std::time::Duration;

use redis::{ConnectionAddr, IntoConnectionInfo};
use thiserror::Error;

use super::format::{HEADER_BYTES, Namespace};

/// How long a connection attempt (TCP connect, TLS handshake, `AUTH`/`HELLO`) may take.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_millis(250);
/// How long one read or write on a connection may wait without progress; a whole round trip
/// gets this plus its payload's time at 10 MB/s.
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_millis(500);
/// Commands per round trip for `SET`/`GET` (block-sized) commands.
pub const DEFAULT_PIPELINE_DEPTH: usize = 16;
/// Commands per round trip for `EXISTS`/`UNLINK` (small) commands.
pub const SMALL_PIPELINE_DEPTH: usize = 1024;
/// Upper bound on the bytes of one round trip's values (a batch is split beyond it).
pub const DEFAULT_MAX_PIPELINE_BYTES: usize = 64 << 20;
/// Idle connections kept per node.
pub const DEFAULT_MAX_IDLE_CONNECTIONS: usize = 8;
/// Consecutive failures that open a node's circuit breaker.
pub const DEFAULT_BREAKER_THRESHOLD: u32 = 3;
/// How long an open breaker skips its node before letting one probe through.
pub const DEFAULT_BREAKER_COOL_DOWN: Duration = Duration::from_secs(1);
/// Largest block image: Redis's default `proto-max-bulk-len` (512 MiB) less the header.
pub const MAX_BLOCK_BYTES: usize = (512 << 20) - HEADER_BYTES;

/// A credential that never appears in `Debug` or `Display` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a password.
    ///
    /// ```
    /// use kvbm_physical::remote::Secret;
    /// let s = Secret::new("hunter2");
    /// assert_eq!(format!("{s:?}"), "Secret(***)");
    /// assert_eq!(s.expose(), "hunter2");
    /// ```
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    /// The secret itself (to hand to the client; never log it).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// One Redis node's address (no credentials).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// Host name or IP address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Whether the connection uses TLS (`rediss://`).
    pub tls: bool,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "rediss" } else { "redis" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// TLS material beyond the system's trust store, all PEM. The client key never appears in
/// `Debug` output.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// CA certificate(s) to trust instead of the system's roots.
    pub ca_pem: Option<Vec<u8>>,
    /// Client certificate and key, for servers that require mutual TLS.
    pub client_pem: Option<(Vec<u8>, Vec<u8>)>,
}

impl fmt::Debug for TlsOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsOptions")
            .field("ca_pem", &self.ca_pem.as_ref().map(|c| c.len()))
            .field(
                "client_pem",
                &self.client_pem.as_ref().map(|_| "(certificate, ***)"),
            )
            .finish()
    }
}

/// Everything [`RemoteStore`](super::RemoteStore) needs; made by [`RemoteConfig::builder`].
#[derive(Clone, PartialEq, Eq)]
pub struct RemoteConfig {
    pub(crate) endpoints: Vec<Endpoint>,
    pub(crate) cluster: bool,
    pub(crate) namespace: Namespace,
    pub(crate) block_bytes: usize,
    pub(crate) username: Option<String>,
    pub(crate) password: Option<Secret>,
    pub(crate) db: i64,
    pub(crate) tls: TlsOptions,
    pub(crate) connect_timeout: Duration,
    pub(crate) response_timeout: Duration,
    pub(crate) pipeline_depth: usize,
    pub(crate) max_pipeline_bytes: usize,
    pub(crate) max_idle_connections: usize,
    pub(crate) breaker_threshold: u32,
    pub(crate) breaker_cool_down: Duration,
    pub(crate) ttl: Option<Duration>,
}

impl fmt::Debug for RemoteConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let endpoints: Vec<String> = self.endpoints.iter().map(ToString::to_string).collect();
        f.debug_struct("RemoteConfig")
            .field("endpoints", &endpoints)
            .field("cluster", &self.cluster)
            .field("namespace", &self.namespace)
            .field("block_bytes", &self.block_bytes)
            .field("username", &self.username)
            .field("password", &self.password)
            .field("db", &self.db)
            .field("tls", &self.tls)
            .field("connect_timeout", &self.connect_timeout)
            .field("response_timeout", &self.response_timeout)
            .field("pipeline_depth", &self.pipeline_depth)
            .field("max_pipeline_bytes", &self.max_pipeline_bytes)
            .field("max_idle_connections", &self.max_idle_connections)
            .field("breaker_threshold", &self.breaker_threshold)
            .field("breaker_cool_down", &self.breaker_cool_down)
            .field("ttl", &self.ttl)
            .finish()
    }
}

impl RemoteConfig {
    /// A builder for blocks of `block_bytes` in `namespace`; add at least one
    /// [`url`](RemoteConfigBuilder::url).
    ///
    /// ```
    /// use std::time::Duration;
    /// use kvbm_physical::remote::{Namespace, RemoteConfig};
    /// let config = RemoteConfig::builder(Namespace::new("llama-3-8b", 0x1234), 256 << 10)
    ///     .url("redis://default:s3cret@10.0.0.5:6379/0")
    ///     .response_timeout(Duration::from_millis(200))
    ///     .build()?;
    /// assert_eq!(config.endpoints()[0].to_string(), "redis://10.0.0.5:6379");
    /// // The password is kept, and never printed.
    /// assert!(!format!("{config:?}").contains("s3cret"));
    /// # Ok::<(), kvbm_physical::remote::ConfigError>(())
    /// ```
    pub fn builder(namespace: Namespace, block_bytes: usize) -> RemoteConfigBuilder {
        RemoteConfigBuilder {
            urls: Vec::new(),
            cluster: false,
            namespace,
            block_bytes,
            username: None,
            password: None,
            tls: TlsOptions::default(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            response_timeout: DEFAULT_RESPONSE_TIMEOUT,
            pipeline_depth: DEFAULT_PIPELINE_DEPTH,
            max_pipeline_bytes: DEFAULT_MAX_PIPELINE_BYTES,
            max_idle_connections: DEFAULT_MAX_IDLE_CONNECTIONS,
            breaker_threshold: DEFAULT_BREAKER_THRESHOLD,
            breaker_cool_down: DEFAULT_BREAKER_COOL_DOWN,
            ttl: None,
        }
    }

    /// The nodes given (for a cluster: the seeds).
    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    /// Whether the store speaks to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.cluster
    }

    /// The namespace.
    pub fn namespace(&self) -> &Namespace {
        &self.namespace
    }

    /// Bytes of one block image.
    pub fn block_bytes(&self) -> usize {
        self.block_bytes
    }

    /// The connect deadline.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// The per-operation response deadline.
    pub fn response_timeout(&self) -> Duration {
        self.response_timeout
    }
}

/// Builds a [`RemoteConfig`]; see [`RemoteConfig::builder`].
#[derive(Clone)]
pub struct RemoteConfigBuilder {
    urls: Vec<String>,
    cluster: bool,
    namespace: Namespace,
    block_bytes: usize,
    username: Option<String>,
    password: Option<Secret>,
    tls: TlsOptions,
    connect_timeout: Duration,
    response_timeout: Duration,
    pipeline_depth: usize,
    max_pipeline_bytes: usize,
    max_idle_connections: usize,
    breaker_threshold: u32,
    breaker_cool_down: Duration,
    ttl: Option<Duration>,
}

impl fmt::Debug for RemoteConfigBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let urls: Vec<String> = self.urls.iter().map(|u| redact_url(u)).collect();
        f.debug_struct("RemoteConfigBuilder")
            .field("urls", &urls)
            .field("cluster", &self.cluster)
            .field("namespace", &self.namespace)
            .field("block_bytes", &self.block_bytes)
            .field("username", &self.username)
            .field("password", &self.password)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

impl RemoteConfigBuilder {
    /// A node's URL: `redis://[user:password@]host[:port][/db]`, or `rediss://...` for TLS.
    /// For a cluster, give one or more seed nodes (any of its masters); the rest is
    /// discovered. Credentials in the URL are used unless [`password`](Self::password) /
    /// [`username`](Self::username) are set.
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.urls.push(url.into());
        self
    }

    /// Speak the Redis Cluster protocol: discover the slot map (`CLUSTER SLOTS`), send each
    /// key to its slot's master, group a batch per node, follow `MOVED`.
    pub fn cluster(mut self, cluster: bool) -> Self {
        self.cluster = cluster;
        self
    }

    /// The ACL user (Redis 6+); without it, `default`.
    pub fn username(mut self, username: impl Into<String>) -> Self {
        self.username = Some(username.into());
        self
    }

    /// The password (`requirepass`, or the ACL user's).
    pub fn password(mut self, password: impl Into<String>) -> Self {
        self.password = Some(Secret::new(password));
        self
    }

    /// Trust this CA (PEM) for `rediss://` instead of the system's roots.
    pub fn tls_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls.ca_pem = Some(pem.into());
        self
    }

    /// Present this client certificate and key (PEM) for mutual TLS.
    pub fn tls_client_pem(mut self, cert: impl Into<Vec<u8>>, key: impl Into<Vec<u8>>) -> Self {
        self.tls.client_pem = Some((cert.into(), key.into()));
        self
    }

    /// Deadline of a connection attempt (connect, TLS handshake, authentication).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Longest wait for progress on one read or write. A node that does not answer costs a
    /// batch at most this (plus `connect_timeout` if a connection had to be made), and once its
    /// breaker is open, nothing. A whole round trip (one pipeline of commands and all their
    /// replies) must end within this plus its payload's time at 10 MB/s, so a node that
    /// trickles its replies is cut off too.
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// `SET`/`GET` commands per round trip on one connection.
    pub fn pipeline_depth(mut self, depth: usize) -> Self {
        self.pipeline_depth = depth;
        self
    }

    /// Upper bound on the value bytes of one round trip.
    pub fn max_pipeline_bytes(mut self, bytes: usize) -> Self {
        self.max_pipeline_bytes = bytes;
        self
    }

    /// Idle connections kept per node (a caller that finds none opens one).
    pub fn max_idle_connections(mut self, n: usize) -> Self {
        self.max_idle_connections = n;
        self
    }

    /// The circuit breaker: `threshold` consecutive failures open it; after `cool_down` one
    /// call probes the node.
    pub fn breaker(mut self, threshold: u32, cool_down: Duration) -> Self {
        self.breaker_threshold = threshold;
        self.breaker_cool_down = cool_down;
        self
    }

    /// Expire blocks this long after they are written (`SET ... PX`); `None` (the default)
    /// leaves eviction to Redis's `maxmemory-policy`.
    pub fn ttl(mut self, ttl: Option<Duration>) -> Self {
        self.ttl = ttl;
        self
    }

    /// Checks everything; see [`ConfigError`].
    ///
    /// ```
    /// use kvbm_physical::remote::{ConfigError, Namespace, RemoteConfig};
    /// let err = RemoteConfig::builder(Namespace::new("m", 1), 4096)
    ///     .url("redis://user:hunter2@[::1")
    ///     .build()
    ///     .unwrap_err();
    /// assert!(matches!(err, ConfigError::BadUrl { .. }));
    /// assert!(!err.to_string().contains("hunter2"));
    /// ```
    pub fn build(self) -> Result<RemoteConfig, ConfigError> {
        if let Some(reason) = self.namespace.problem() {
            return Err(ConfigError::Namespace { reason });
        }
        if self.block_bytes == 0 || self.block_bytes > MAX_BLOCK_BYTES {
            return Err(ConfigError::BlockBytes {
                bytes: self.block_bytes,
                max: MAX_BLOCK_BYTES,
            });
        }
        for (what, d) in [
            ("connect_timeout", self.connect_timeout),
            ("response_timeout", self.response_timeout),
        ] {
            if d.is_zero() {
                return Err(ConfigError::ZeroTimeout { which: what });
            }
        }
        if self.ttl.is_some_and(|t| t.as_millis() == 0) {
            return Err(ConfigError::ZeroTimeout { which: "ttl" });
        }
        if self.pipeline_depth == 0 || self.max_pipeline_bytes == 0 {
            return Err(ConfigError::ZeroPipeline);
        }
        if self.urls.is_empty() {
            return Err(ConfigError::NoEndpoint);
        }
        if !self.cluster && self.urls.len() > 1 {
            return Err(ConfigError::SeveralEndpoints {
                count: self.urls.len(),
            });
        }
        let mut endpoints = Vec::with_capacity(self.urls.len());
        let (mut username, mut password, mut db) = (None, None, 0i64);
        for url in &self.urls {
            let parsed = parse_url(url)?;
            if let Some(first) = endpoints.first() {
                let first: &Endpoint = first;
                if first.tls != parsed.endpoint.tls {
                    return Err(ConfigError::MixedTls);
                }
            }
            endpoints.push(parsed.endpoint);
            username = username.or(parsed.username);
            password = password.or(parsed.password);
            if parsed.db != 0 {
                db = parsed.db;
            }
        }
        if self.cluster && db != 0 {
            return Err(ConfigError::DatabaseInCluster { db });
        }
        let tls_material = self.tls.ca_pem.is_some() || self.tls.client_pem.is_some();
        if tls_material && !endpoints[0].tls {
            return Err(ConfigError::TlsWithoutRediss);
        }
        Ok(RemoteConfig {
            endpoints,
            cluster: self.cluster,
            namespace: self.namespace,
            block_bytes: self.block_bytes,
            username: self.username.or(username),
            password: self.password.or(password),
            db,
            tls: self.tls,
            connect_timeout: self.connect_timeout,
            response_timeout: self.response_timeout,
            pipeline_depth: self.pipeline_depth,
            max_pipeline_bytes: self.max_pipeline_bytes,
            max_idle_connections: self.max_idle_connections,
            breaker_threshold: self.breaker_threshold.max(1),
            breaker_cool_down: self.breaker_cool_down,
            ttl: self.ttl,
        })
    }
}

struct ParsedUrl {
    endpoint: Endpoint,
    username: Option<String>,
    password: Option<Secret>,
    db: i64,
}

fn parse_url(url: &str) -> Result<ParsedUrl, ConfigError> {
    let bad = |reason: &'static str| ConfigError::BadUrl {
        url: redact_url(url),
        reason,
    };
    let scheme = url.split("://").next().unwrap_or_default();
    if !matches!(scheme, "redis" | "rediss") || !url.contains("://") {
        return Err(bad("the scheme must be redis:// or rediss://"));
    }
    if url.contains('#') {
        // `#insecure` would turn certificate checks off; not supported.
        return Err(bad("URL fragments (such as #insecure) are not supported"));
    }
    let info = url
        .into_connection_info()
        .map_err(|_| bad("not a valid Redis URL"))?;
    let endpoint = match info.addr() {
        ConnectionAddr::Tcp(host, port) => Endpoint {
            host: host.clone(),
            port: *port,
            tls: false,
        },
        ConnectionAddr::TcpTls { host, port, .. } => Endpoint {
            host: host.clone(),
            port: *port,
            tls: true,
        },
        _ => return Err(bad("only TCP endpoints are supported")),
    };
    if endpoint.host.is_empty() {
        return Err(bad("no host"));
    }
    let redis = info.redis_settings();
    Ok(ParsedUrl {
        endpoint,
        username: redis.username().map(str::to_owned),
        password: redis.password().map(Secret::new),
        db: redis.db(),
    })
}

/// `url` with any `user:password@` part replaced by `***@`, for logs and errors.
///
/// Everything between `://` and the *last* `@` goes: a password may hold `/`, `?` or `#`
/// (generated and base64 ones often do), so the authority cannot be cut at those first.
///
/// ```
/// use kvbm_physical::remote::redact_url;
/// assert_eq!(redact_url("redis://alice:hun/ter2@h:6379/0"), "redis://***@h:6379/0");
/// assert_eq!(redact_url("redis://h:6379"), "redis://h:6379");
/// ```
pub fn redact_url(url: &str) -> String {
    // Without a scheme (a mistyped URL), everything before the last `@` goes.
    let start = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[start..];
    match rest.rfind('@') {
        Some(at) => format!("{}***@{}", &url[..start], &rest[at + 1..]),
        None => url.to_owned(),
    }
}

/// A configuration that [`RemoteConfigBuilder::build`] or
/// [`RemoteStore::open`](super::RemoteStore::open) refuses. Never contains a password.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// No URL was given.
    #[error("no Redis URL given")]
    NoEndpoint,
    /// Several URLs without `cluster(true)`.
    #[error("{count} URLs given for a single (non-cluster) Redis; use cluster(true) for seeds")]
    SeveralEndpoints {
        /// URLs given.
        count: usize,
    },
    /// A URL that is not `redis://` or `rediss://` with a host. `url` has its credentials
    /// replaced by `***`.
    #[error("bad Redis URL {url}: {reason}")]
    BadUrl {
        /// The URL, credentials redacted.
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Some URLs are `rediss://` and others `redis://`.
    #[error("mixed redis:// and rediss:// URLs")]
    MixedTls,
    /// TLS material given for `redis://` URLs.
    #[error("TLS certificates given but the URLs are redis://, not rediss://")]
    TlsWithoutRediss,
    /// The TLS certificates or key could not be read (bad PEM).
    #[error("TLS material not usable: {reason}")]
    Tls {
        /// The TLS library's reason (never key material).
        reason: String,
    },
    /// A database other than 0 with a cluster (clusters have only database 0).
    #[error("database {db} requested, but Redis Cluster has only database 0")]
    DatabaseInCluster {
        /// The database in the URL.
        db: i64,
    },
    /// The namespace cannot be used in keys.
    #[error("bad namespace: {reason}")]
    Namespace {
        /// What is wrong.
        reason: &'static str,
    },
    /// A block size of zero or beyond what Redis accepts in one value.
    #[error("block size {bytes} outside 1..={max} bytes")]
    BlockBytes {
        /// The block size given.
        bytes: usize,
        /// [`MAX_BLOCK_BYTES`].
        max: usize,
    },
    /// A zero timeout (it would mean "wait forever" to the socket layer) or a zero TTL.
    #[error("{which} must be positive")]
    ZeroTimeout {
        /// Which setting.
        which: &'static str,
    },
    /// A zero pipeline depth or byte bound.
    #[error("pipeline depth and bytes must be positive")]
    ZeroPipeline,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn builder() -> RemoteConfigBuilder {
        RemoteConfig::builder(Namespace::new("m", 1), 1024)
    }

    #[test]
    fn urls_give_endpoints_and_credentials() {
        let c = builder()
            .url("redis://alice:pw@example.com:7000/3")
            .build()
            .unwrap();
        assert_eq!(
            c.endpoints,
            vec![Endpoint {
                host: "example.com".into(),
                port: 7000,
                tls: false
            }]
        );
        assert_eq!(c.username.as_deref(), Some("alice"));
        assert_eq!(c.password, Some(Secret::new("pw")));
        assert_eq!(c.db, 3);
        // Explicit settings win over the URL's.
        let c = builder()
            .url("rediss://alice:pw@h")
            .username("bob")
            .password("other")
            .build()
            .unwrap();
        assert_eq!(c.username.as_deref(), Some("bob"));
        assert_eq!(c.password, Some(Secret::new("other")));
        assert!(c.endpoints[0].tls);
        assert_eq!(c.endpoints[0].port, 6379);
    }

    #[test]
    fn refusals() {
        let e = |b: RemoteConfigBuilder| b.build().unwrap_err();
        assert_eq!(e(builder()), ConfigError::NoEndpoint);
        assert!(matches!(
            e(builder().url("http://h")),
            ConfigError::BadUrl { .. }
        ));
        assert!(matches!(
            e(builder().url("rediss://h/#insecure")),
            ConfigError::BadUrl { .. }
        ));
        assert!(matches!(
            e(builder().url("redis://a").url("redis://b")),
            ConfigError::SeveralEndpoints { count: 2 }
        ));
        assert_eq!(
            e(builder().cluster(true).url("redis://a").url("rediss://b")),
            ConfigError::MixedTls
        );
        assert_eq!(
            e(builder().cluster(true).url("redis://a/2")),
            ConfigError::DatabaseInCluster { db: 2 }
        );
        assert_eq!(
            e(builder().url("redis://a").tls_ca_pem(b"x".to_vec())),
            ConfigError::TlsWithoutRediss
        );
        assert!(matches!(
            e(RemoteConfig::builder(Namespace::new("m", 1), 0).url("redis://a")),
            ConfigError::BlockBytes { bytes: 0, .. }
        ));
        assert!(matches!(
            e(RemoteConfig::builder(Namespace::new("a b", 1), 8).url("redis://a")),
            ConfigError::Namespace { .. }
        ));
        assert_eq!(
            e(builder().url("redis://a").response_timeout(Duration::ZERO)),
            ConfigError::ZeroTimeout {
                which: "response_timeout"
            }
        );
        assert_eq!(
            e(builder()
                .url("redis://a")
                .ttl(Some(Duration::from_micros(10)))),
            ConfigError::ZeroTimeout { which: "ttl" }
        );
        assert_eq!(
            e(builder().url("redis://a").pipeline_depth(0)),
            ConfigError::ZeroPipeline
        );
    }

    #[test]
    fn credentials_never_printed() {
        let b = builder()
            .url("redis://alice:hunter2@h:1")
            .tls_client_pem(b"CERT".to_vec(), b"PRIVATE-KEY-hunter2".to_vec());
        assert!(!format!("{b:?}").contains("hunter2"));
        let b = builder()
            .url("rediss://alice:hunter2@h:1")
            .password("hunter3")
            .tls_client_pem(b"CERT".to_vec(), b"PRIVATE-KEY".to_vec());
        let c = b.build().unwrap();
        let shown = format!("{c:?} {:#?}", c);
        assert!(
            !shown.contains("hunter2") && !shown.contains("hunter3"),
            "{shown}"
        );
        assert!(!shown.contains("PRIVATE-KEY"), "{shown}");
        for bad in [
            "redis://alice:hunter2@",
            "redis://alice:hunter2@h:notaport",
            "redis://:hunter2@h/x",
            "redis://alice:hunter2@h/#insecure",
        ] {
            let err = builder().url(bad).build().unwrap_err();
            assert!(!err.to_string().contains("hunter2"), "{err}");
            assert!(!format!("{err:?}").contains("hunter2"), "{err:?}");
        }
    }

    #[test]
    fn redaction() {
        assert_eq!(redact_url("redis://u:p@h:1/0"), "redis://***@h:1/0");
        assert_eq!(redact_url("redis://h:1"), "redis://h:1");
        assert_eq!(redact_url("rediss://:p@w@h"), "rediss://***@h");
        assert_eq!(redact_url("nonsense"), "nonsense");
        // Passwords with the characters that end an authority.
        for (url, secret) in [
            ("redis://alice:hun/ter2@h:1", "ter2"),
            ("redis://alice:hunter2#x@h", "hunter2"),
            ("redis://:a?b=c@h:1/0", "b=c"),
            ("rediss://u:p%40ss@h", "p%40ss"),
            ("default:s3cret@h", "s3cret"),
        ] {
            let shown = redact_url(url);
            assert!(!shown.contains(secret), "{url} -> {shown}");
            assert!(shown.ends_with('h') || shown.contains("@h"), "{shown}");
            // And a URL the parser refuses says so without the password.
            if let Err(e) = parse_url(url) {
                assert!(!e.to_string().contains(secret), "{e}");
            }
        }
    }
}
