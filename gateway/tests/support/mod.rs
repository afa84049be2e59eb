//! Test harness: real `switchboard-gateway` and `switchboard-worker`
//! processes on free ports, against the machine's PostgreSQL and Redis, each
//! test with its own database and Redis key prefix (so tests run in
//! parallel), driven by the Rust Socket.IO client of `switchboard-loadtest`.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use switchboard_loadtest::client::{Client, Target};
use switchboard_loadtest::tokens::Minter;
use tokio::net::{TcpListener, TcpStream};

pub const SECRET: &str = "integration-test-secret";
pub const T: Duration = Duration::from_secs(15);

pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// Admin URL of the PostgreSQL server (databases are created on it).
pub fn pg_admin_url() -> String {
    std::env::var("TEST_PG_ADMIN_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub fn bin(name: &str) -> PathBuf {
    // Integration tests run from target/<profile>/deps; the binaries are one up.
    let gw = PathBuf::from(env!("CARGO_BIN_EXE_switchboard-gateway"));
    gw.with_file_name(name)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn unique(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::now_v7().simple())
}

fn psql(sql: &str) {
    let out = Command::new("psql")
        .args([&pg_admin_url(), "-qAtc", sql])
        .output()
        .expect("psql runs");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A process we started, killed on drop.
pub struct Proc {
    pub name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
    /// Whether the process has exited.
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
    pub fn terminate(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct ClusterOptions {
    pub gateways: usize,
    pub workers: usize,
    pub env: Vec<(String, String)>,
    /// Use this Redis instead of the machine's.
    pub redis_url: Option<String>,
    /// Use this PostgreSQL host:port for the processes (e.g. a fault proxy).
    pub pg_hostport: Option<String>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            gateways: 2,
            workers: 2,
            env: Vec::new(),
            redis_url: None,
            pg_hostport: None,
        }
    }
}

pub struct Cluster {
    pub db: String,
    pub prefix: String,
    pub gateways: Vec<Proc>,
    pub workers: Vec<Proc>,
    pub urls: Vec<String>,
    pub minter: Minter,
    env: Vec<(String, String)>,
    dir: PathBuf,
}

impl Cluster {
    pub async fn start(opts: ClusterOptions) -> Cluster {
        let db = unique("sbrs_");
        psql(&format!("CREATE DATABASE {db}"));
        let prefix = unique("sbrs:");
        let pg = opts
            .pg_hostport
            .clone()
            .unwrap_or_else(|| "127.0.0.1:5432".into());
        let mut env: Vec<(String, String)> = vec![
            (
                "DATABASE_URL".into(),
                format!("postgres://postgres@{pg}/{db}"),
            ),
            (
                "REDIS_URL".into(),
                opts.redis_url.clone().unwrap_or_else(redis_url),
            ),
            ("REDIS_PREFIX".into(), prefix.clone()),
            ("AUTH_DEV_SECRET".into(), SECRET.into()),
            ("STREAM_PARTITIONS".into(), "4".into()),
            ("LEASE_TTL_MS".into(), "1500".into()),
            // Tests send bursts far above the contract's per-user rate; the
            // rate-limit tests turn it back on through `opts.env`.
            ("RATE_MESSAGES_PER_S".into(), "0".into()),
            ("RATE_REACTIONS_PER_S".into(), "0".into()),
            ("RATE_CHANNELS_PER_S".into(), "0".into()),
            ("RATE_REST_PER_S".into(), "0".into()),
            // Likewise tests that open many sockets of one user.
            ("MAX_CONNECTIONS_PER_USER".into(), "0".into()),
            (
                "RUST_LOG".into(),
                "warn,switchboard_worker=info,switchboard_gateway=info".into(),
            ),
        ];
        env.extend(opts.env.iter().cloned());
        let dir = std::env::temp_dir().join(&db);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let status = Command::new(bin("switchboard-worker"))
            .arg("migrate")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("migrate runs");
        assert!(status.success(), "migrate failed");
        let mut c = Cluster {
            db,
            prefix,
            gateways: Vec::new(),
            workers: Vec::new(),
            urls: Vec::new(),
            minter: Minter::hs256(SECRET),
            env,
            dir,
        };
        for _ in 0..opts.workers {
            c.add_worker();
        }
        for _ in 0..opts.gateways {
            c.add_gateway().await;
        }
        c
    }

    fn spawn(&self, name: &str, binary: &str, extra: &[(String, String)]) -> Proc {
        let log = self.dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(bin(binary))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .envs(extra.iter().map(|(k, v)| (k, v)))
            .env("NODE_ID", name)
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn");
        Proc {
            name: name.to_string(),
            child,
            log,
        }
    }

    pub fn add_worker(&mut self) {
        let name = format!("{}-wk{}", self.db, self.workers.len());
        let p = self.spawn(&name, "switchboard-worker", &[]);
        self.workers.push(p);
    }

    /// Starts a gateway on a free port and waits until it is ready. The
    /// port is chosen before the gateway binds it, so another test's
    /// process may take it in between: then either this gateway exits
    /// ("address in use") or `/readyz` on that port answers with another
    /// node's name; both are retried on a new port.
    pub async fn add_gateway(&mut self) -> String {
        let name = format!("{}-gw{}", self.db, self.gateways.len());
        for _attempt in 0..5 {
            let port = free_port();
            let mut p = self.spawn(
                &name,
                "switchboard-gateway",
                &[("PORT".into(), port.to_string())],
            );
            let url = format!("http://127.0.0.1:{port}");
            let deadline = Instant::now() + Duration::from_secs(30);
            let ours = loop {
                if p.exited() {
                    assert!(
                        p.log_tail().contains("in use"),
                        "gateway exited before it was ready: {}",
                        p.log_tail()
                    );
                    break false;
                }
                if let Ok(r) = reqwest::get(format!("{url}/readyz")).await {
                    if r.status().is_success() {
                        let body: serde_json::Value = r.json().await.unwrap_or_default();
                        break body["node"] == name.as_str();
                    }
                }
                assert!(
                    Instant::now() < deadline,
                    "gateway not ready: {}",
                    p.log_tail()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            if ours {
                self.gateways.push(p);
                self.urls.push(url.clone());
                return url;
            }
            p.kill9();
        }
        panic!("no free port for {name} after 5 attempts");
    }

    /// The environment every process of this cluster gets.
    pub fn env(&self) -> &[(String, String)] {
        &self.env
    }

    pub fn token(&self, user: &str) -> String {
        self.minter
            .token(user, Duration::from_secs(3600))
            .expect("token")
    }

    /// A connected client of `user` on gateway `node`, past `connection:success`.
    pub async fn connect(&self, node: usize, user: &str) -> Client {
        let target = Target::seed_path(&self.urls[node]);
        let mut c = Client::connect(&target, self.minter.auth(user).expect("auth"))
            .await
            .expect("connect");
        c.wait_for("connection:success", |_| true, T)
            .await
            .expect("connection:success");
        c
    }

    pub async fn api(
        &self,
        node: usize,
        user: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let client = reqwest::Client::new();
        let url = format!("{}{}", self.urls[node], path);
        let mut req = match method {
            "POST" => client.post(url),
            _ => client.get(url),
        }
        .bearer_auth(self.token(user));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// Creates a public channel owned by `owner` with `members` added.
    pub async fn channel(&self, owner: &str, members: &[&str]) -> String {
        let (s, ch) = self
            .api(
                0,
                owner,
                "POST",
                "/api/channels",
                Some(json!({"name": "t"})),
            )
            .await;
        assert_eq!(s, 201, "{ch}");
        let id = ch["id"].as_str().expect("id").to_string();
        for m in members {
            let (s, b) = self
                .api(
                    0,
                    owner,
                    "POST",
                    &format!("/api/channels/{id}/members"),
                    Some(json!({"userId": m})),
                )
                .await;
            assert_eq!(s, 201, "{b}");
        }
        id
    }

    /// The whole history of a channel, oldest first.
    pub async fn history(&self, user: &str, channel: &str) -> Vec<Value> {
        let mut all = Vec::new();
        let mut before: Option<String> = None;
        loop {
            let q = match &before {
                Some(b) => format!("/api/channels/{channel}/messages?limit=100&before={b}"),
                None => format!("/api/channels/{channel}/messages?limit=100"),
            };
            let (s, page) = self.api(0, user, "GET", &q, None).await;
            assert_eq!(s, 200, "{page}");
            let page = page.as_array().cloned().unwrap_or_default();
            if page.is_empty() {
                break;
            }
            before = page.last().and_then(|m| m["id"].as_str()).map(String::from);
            all.extend(page);
        }
        all.reverse();
        all
    }

    pub fn logs(&self) -> String {
        self.gateways
            .iter()
            .chain(self.workers.iter())
            .map(|p| format!("--- {} ---\n{}", p.name, p.log_tail()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for p in self.gateways.iter_mut().chain(self.workers.iter_mut()) {
            p.kill9();
        }
        let _ = Command::new("psql")
            .args([
                &pg_admin_url(),
                "-qAtc",
                &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.db),
            ])
            .output();
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "redis-cli --scan --pattern '{}:*' | xargs -r redis-cli del > /dev/null",
                self.prefix
            ))
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Collects `message:created` events of a client until `n` distinct ones
/// (by message id) arrived or the timeout passed; returns them in arrival order.
pub async fn collect_created(c: &mut Client, n: usize, timeout: Duration) -> Vec<Value> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < n && Instant::now() < deadline {
        if let Some(e) = c.next(Duration::from_millis(200)).await {
            if e.name == "message:created" {
                out.push(e.data);
            }
        }
    }
    out
}

/// A private `redis-server` on a free port, to restart in a test.
pub struct PrivateRedis {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl PrivateRedis {
    pub fn start() -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(unique("sbredis"));
        std::fs::create_dir_all(&dir).expect("dir");
        let mut r = Self {
            port,
            dir,
            child: None,
        };
        r.restart();
        r
    }
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    pub fn restart(&mut self) {
        self.stop();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir.to_str().unwrap_or("/tmp"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (apt-get install redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "private redis did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TCP proxy in front of a server that a test can cut: while down, every
/// open connection is closed and new ones are refused — a database outage
/// as the processes see it, without stopping the machine's shared server.
pub struct FaultProxy {
    pub port: u16,
    down: Arc<AtomicBool>,
    epoch: Arc<tokio::sync::watch::Sender<u64>>,
}

impl FaultProxy {
    pub async fn start(upstream: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let down = Arc::new(AtomicBool::new(false));
        let (epoch, _) = tokio::sync::watch::channel(0u64);
        let epoch = Arc::new(epoch);
        let (d, e) = (down.clone(), epoch.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if d.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let mut cut = e.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Self { port, down, epoch }
    }

    pub fn hostport(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
        self.epoch.send_modify(|e| *e += 1);
    }

    pub fn restore(&self) {
        self.down.store(false, Ordering::SeqCst);
    }
}

/// Sends `n` messages from `c` with tempIds `prefix-0..n`, pipelined, and
/// returns the message ids of the `SENT` answers by tempId.
pub async fn send_burst(
    c: &mut Client,
    channel: &str,
    prefix: &str,
    n: usize,
) -> HashMap<String, String> {
    for i in 0..n {
        c.emit(
            "message:send",
            &json!({"content": format!("{prefix} {i}"), "channelId": channel, "tempId": format!("{prefix}-{i}")}),
        )
        .await
        .expect("emit");
    }
    let mut sent = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while sent.len() < n && Instant::now() < deadline {
        if let Some(e) = c.next(Duration::from_millis(200)).await {
            if e.name == "message:delivered" && e.data["status"] == "SENT" {
                sent.insert(
                    e.data["tempId"].as_str().unwrap_or_default().to_string(),
                    e.data["messageId"].as_str().unwrap_or_default().to_string(),
                );
            }
        }
    }
    sent
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A gauge's value in a gateway's `/metrics` (0 when absent or unreachable).
pub async fn gauge(base: &str, name: &str) -> f64 {
    let text = match reqwest::get(format!("{base}/metrics")).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Channel topics under `prefix` that Redis has subscribers for.
pub fn subscribed_channels(prefix: &str) -> usize {
    let out = Command::new("redis-cli")
        .args(["PUBSUB", "CHANNELS", &format!("{prefix}:ch:*")])
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}
