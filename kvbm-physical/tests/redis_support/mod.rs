//! Real Redis servers for the remote-tier tests: a single node, a node with a password, ACL
//! user or TLS, and a 3-master cluster, each on free loopback ports in its own temporary
//! directory, killed and removed on drop.
//!
//! When `redis-server` cannot be found the tests print why and return early (skip) — unless
//! `KVBM_REQUIRE_REDIS=1` (CI sets it), which turns the skip into a failure.
#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long a server may take to say it is ready.
const START_DEADLINE: Duration = Duration::from_secs(20);

/// A program on `PATH` (or named by the environment variable `env`, e.g. `REDIS_SERVER`).
fn find(program: &str, env: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// `redis-server` and `redis-cli`, or `None` after printing why the test is skipped.
/// Panics instead when `KVBM_REQUIRE_REDIS=1`.
pub fn binaries() -> Option<(PathBuf, PathBuf)> {
    let server = find("redis-server", "REDIS_SERVER");
    let cli = find("redis-cli", "REDIS_CLI");
    match (server, cli) {
        (Some(s), Some(c)) => Some((s, c)),
        _ => {
            let msg = "redis-server / redis-cli not found (install the redis-server and \
                       redis-tools packages, or set REDIS_SERVER / REDIS_CLI)";
            if std::env::var("KVBM_REQUIRE_REDIS").as_deref() == Ok("1") {
                panic!("{msg}, and KVBM_REQUIRE_REDIS=1 forbids skipping");
            }
            eprintln!("SKIPPED: {msg}");
            None
        }
    }
}

/// A free loopback port whose `+ 10000` (a cluster node's bus port) is free too.
fn free_port() -> u16 {
    loop {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
        let port = l.local_addr().expect("local address").port();
        if port < 55000 && TcpListener::bind(("127.0.0.1", port + 10000)).is_ok() {
            return port;
        }
    }
}

/// Extra settings of a server.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// `requirepass`.
    pub password: Option<String>,
    /// An ACL user `(name, password)` with every right.
    pub acl_user: Option<(String, String)>,
    /// Serve TLS only (certificates made with `openssl` in the server's directory).
    pub tls: bool,
    /// A cluster node.
    pub cluster: bool,
    /// `maxmemory` in bytes (with `noeviction`, so that writes beyond it are refused).
    pub maxmemory_noeviction: Option<u64>,
}

/// A `redis-server` child process.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    server: PathBuf,
    cli: PathBuf,
    options: Options,
    dir: TempDir,
}

impl RedisServer {
    /// A plain single node, or `None` (skipped) without redis.
    pub fn start() -> Option<Self> {
        Self::start_with(Options::default())
    }

    pub fn start_with(options: Options) -> Option<Self> {
        let (server, cli) = binaries()?;
        let dir = tempfile::Builder::new()
            .prefix("kvbm-redis-")
            .tempdir()
            .expect("temp dir");
        if options.tls {
            make_certificates(dir.path());
        }
        let mut s = Self {
            child: None,
            port: 0,
            server,
            cli,
            options,
            dir,
        };
        // Another process may take the port between our probe and the server's bind: retry.
        for _ in 0..5 {
            s.port = free_port();
            if s.spawn() {
                return Some(s);
            }
        }
        panic!("redis-server would not start; see the output above");
    }

    fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "--bind".into(),
            "127.0.0.1".into(),
            "--save".into(),
            String::new(),
            "--appendonly".into(),
            "no".into(),
            "--protected-mode".into(),
            "no".into(),
            "--dir".into(),
            self.dir.path().display().to_string(),
            "--logfile".into(),
            String::new(),
            "--daemonize".into(),
            "no".into(),
        ];
        if self.options.tls {
            let d = self.dir.path();
            for (k, v) in [
                ("--port", "0".to_owned()),
                ("--tls-port", self.port.to_string()),
                (
                    "--tls-cert-file",
                    d.join("server.crt").display().to_string(),
                ),
                ("--tls-key-file", d.join("server.key").display().to_string()),
                ("--tls-ca-cert-file", d.join("ca.crt").display().to_string()),
                ("--tls-auth-clients", "no".to_owned()),
            ] {
                a.push(k.into());
                a.push(v);
            }
        } else {
            a.push("--port".into());
            a.push(self.port.to_string());
        }
        if let Some(p) = &self.options.password {
            a.push("--requirepass".into());
            a.push(p.clone());
        }
        if let Some((user, pass)) = &self.options.acl_user {
            // One config line, one word per argument.
            a.extend([
                "--user".into(),
                user.clone(),
                "on".into(),
                format!(">{pass}"),
                "~*".into(),
                "&*".into(),
                "+@all".into(),
            ]);
        }
        if let Some(bytes) = self.options.maxmemory_noeviction {
            a.extend([
                "--maxmemory".into(),
                bytes.to_string(),
                "--maxmemory-policy".into(),
                "noeviction".into(),
            ]);
        }
        if self.options.cluster {
            a.extend([
                "--cluster-enabled".into(),
                "yes".into(),
                "--cluster-config-file".into(),
                format!("nodes-{}.conf", self.port),
                "--cluster-node-timeout".into(),
                "2000".into(),
                // Masters that still answer keep serving their slots while another is down.
                "--cluster-require-full-coverage".into(),
                "no".into(),
            ]);
        }
        a
    }

    /// Starts the process and waits for "Ready to accept connections" on its log (stdout).
    /// `false` when it exited first (e.g. its port was taken).
    fn spawn(&mut self) -> bool {
        let mut child = Command::new(&self.server)
            .args(self.args())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn redis-server");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        // Reads the log to its end (so the pipe never fills); the first "Ready" line, or the
        // end of the log, is reported once.
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            let mut log = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.contains("Ready to accept connections") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(Ok(()));
                    }
                } else if tx.is_some() {
                    log.push(line);
                }
            }
            if let Some(tx) = tx.take() {
                let _ = tx.send(Err(log.join("\n")));
            }
        });
        match rx.recv_timeout(START_DEADLINE) {
            Ok(Ok(())) => {
                self.child = Some(child);
                true
            }
            Ok(Err(log)) => {
                let _ = child.kill();
                let _ = child.wait();
                eprintln!("redis-server on port {} did not start:\n{log}", self.port);
                false
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "redis-server on port {} not ready within {START_DEADLINE:?}",
                    self.port
                );
            }
        }
    }

    /// `redis://127.0.0.1:PORT` (or `rediss://localhost:PORT` with TLS).
    pub fn url(&self) -> String {
        if self.options.tls {
            format!("rediss://localhost:{}", self.port)
        } else {
            format!("redis://127.0.0.1:{}", self.port)
        }
    }

    /// The CA certificate (PEM) of a TLS server.
    pub fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(self.dir.path().join("ca.crt")).expect("CA certificate")
    }

    /// Kills the server (SIGKILL: no goodbye to clients).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port (empty: nothing is persisted; a cluster node keeps
    /// its `nodes.conf`, so it rejoins with its slots).
    pub fn restart(&mut self) {
        self.kill();
        for _ in 0..50 {
            if self.spawn() {
                return;
            }
        }
        panic!("redis-server could not restart on port {}", self.port);
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// `redis-cli -p PORT [auth] ARGS...`
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(&self.cli);
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string()]);
        if self.options.tls {
            cmd.arg("--tls")
                .arg("--cacert")
                .arg(self.dir.path().join("ca.crt"));
        }
        if let Some(p) = &self.options.password {
            cmd.args(["--no-auth-warning", "-a", p]);
        }
        cmd.args(args).output().expect("run redis-cli")
    }

    /// `redis-cli` with `stdin` as the last argument (`-x`: binary-safe values).
    pub fn cli_stdin(&self, args: &[&str], stdin: &[u8]) -> Output {
        use std::io::Write;
        let mut cmd = Command::new(&self.cli);
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string()]);
        if let Some(p) = &self.options.password {
            cmd.args(["--no-auth-warning", "-a", p]);
        }
        let mut child = cmd
            .arg("-x")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run redis-cli");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin)
            .expect("write stdin");
        child.wait_with_output().expect("redis-cli output")
    }

    /// A raw connection (behind the store's back).
    pub fn raw(&self) -> redis::Connection {
        let mut url = self.url();
        if let Some(p) = &self.options.password {
            url = url.replacen("://", &format!("://:{p}@"), 1);
        }
        redis::Client::open(url)
            .expect("client")
            .get_connection()
            .expect("raw connection")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A CA, and a server certificate for `localhost` / 127.0.0.1 signed by it, with `openssl`.
fn make_certificates(dir: &Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("run openssl (install the openssl package)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .expect("write san.ext");
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=kvbm-test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.crt",
    ]);
}

/// Three masters joined by `redis-cli --cluster create`, each serving a third of the slots.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> Option<Self> {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                RedisServer::start_with(Options {
                    cluster: true,
                    ..Options::default()
                })
            })
            .collect::<Option<_>>()?;
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let mut args = vec!["--cluster", "create"];
        args.extend(addrs.iter().map(String::as_str));
        args.extend(["--cluster-replicas", "0", "--cluster-yes"]);
        let out = nodes[0].cli(&args);
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = Self { nodes };
        cluster.wait_ok();
        Some(cluster)
    }

    /// Waits until every running node reports `cluster_state:ok` and knows all three
    /// masters. This polls an external process's state (there is no event to wait on); it
    /// orders nothing between the test's own threads.
    pub fn wait_ok(&self) {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            let ok = self.nodes.iter().filter(|n| n.is_running()).all(|n| {
                let info =
                    String::from_utf8_lossy(&n.cli(&["CLUSTER", "INFO"]).stdout).into_owned();
                info.contains("cluster_state:ok") && info.contains("cluster_known_nodes:3")
            });
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "cluster not ok within {START_DEADLINE:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Seed URL (the first node).
    pub fn url(&self) -> String {
        self.nodes[0].url()
    }

    /// Keys each node holds (`DBSIZE`).
    pub fn key_counts(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .map(|n| {
                String::from_utf8_lossy(&n.cli(&["DBSIZE"]).stdout)
                    .trim()
                    .parse()
                    .unwrap_or(0)
            })
            .collect()
    }

    /// The node (index) that serves `key`, asked of the cluster itself (`CLUSTER KEYSLOT`,
    /// `CLUSTER NODES`).
    pub fn node_of(&self, key: &[u8]) -> usize {
        let mut raw = self.nodes[0].raw();
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut raw)
            .expect("CLUSTER KEYSLOT");
        let table: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query(&mut raw)
            .expect("CLUSTER NODES");
        let line = table
            .lines()
            .find(|l| owns(l, slot))
            .expect("some node owns the slot");
        // Field 1 is `ip:port@bus-port`.
        let addr = line.split_whitespace().nth(1).expect("address field");
        let port: u16 = addr
            .split('@')
            .next()
            .and_then(|a| a.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .expect("a port");
        self.nodes
            .iter()
            .position(|n| n.port == port)
            .expect("one of our nodes")
    }
}

/// Whether a `CLUSTER NODES` line lists `slot` among its ranges.
fn owns(line: &str, slot: u16) -> bool {
    line.split_whitespace().skip(8).any(|r| match r.split_once('-') {
        Some((a, b)) => matches!((a.parse::<u16>(), b.parse::<u16>()), (Ok(a), Ok(b)) if a <= slot && slot <= b),
        None => r.parse::<u16>() == Ok(slot),
    })
}

/// A distinct, non-zero-heavy block per seed (splitmix64).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}
