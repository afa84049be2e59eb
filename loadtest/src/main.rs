//! `switchboard-loadtest`: drives a Switchboard cluster (or any server of the
//! chat contract) over real websockets and reports throughput, latency
//! percentiles and correctness counts.
//!
//! Scenarios:
//! - `connect`: ramp N idle connections at R/s, spread over source addresses
//!   127.0.0.1–127.0.0.x; connect+auth time to `connection:success`, failures,
//!   and the gateway's RSS per connection (read from /proc for a local pid).
//! - `chat`: C connections in K channels of C/K members; senders at R msg/s
//!   in total (open loop: latency counts from the *intended* send time, so a
//!   stalled server cannot hide its queueing); SENT, DELIVERED, deliveries of
//!   `message:created`, send→created at every receiver and send→DELIVERED at
//!   the sender, and lost / duplicated-or-out-of-order deliveries.
//! - `fanout`: `chat` with one channel of M members and one sender.
//! - `recover`: catch-up after a reconnect (`auth.since`): time to
//!   `channel:recovered` by messages missed, and a reconnect storm.
//!
//! Output: a human table, then one JSON line (the last line of stdout).

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use switchboard_loadtest::client::{Client, Target};
use switchboard_loadtest::tokens::Minter;

mod recover;

#[derive(Parser)]
#[command(
    name = "switchboard-loadtest",
    version,
    about = "Load generator for the Switchboard chat gateway"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Ramp idle connections and measure connect+auth time and server memory.
    Connect(ConnectArgs),
    /// Channels of members chatting at a fixed rate.
    Chat(ChatArgs),
    /// One big channel, one sender.
    Fanout(FanoutArgs),
    /// Catch-up after reconnects, and a reconnect storm with `since`.
    Recover(recover::RecoverArgs),
}

#[derive(Args, Clone)]
struct Common {
    /// Gateway base URLs, comma separated; connections are spread over them.
    #[arg(long, default_value = "http://127.0.0.1:3002", value_delimiter = ',')]
    targets: Vec<String>,
    /// HS256 secret of the servers (`AUTH_DEV_SECRET`).
    #[arg(long, env = "AUTH_DEV_SECRET")]
    secret: Option<String>,
    /// RS256 private key (PEM) whose public key the servers trust.
    #[arg(long)]
    key: Option<std::path::PathBuf>,
    /// `kid` header for RS256 tokens.
    #[arg(long)]
    kid: Option<String>,
    /// Number of source addresses 127.0.0.1..=127.0.0.N to spread connections over.
    #[arg(long, default_value_t = 1)]
    source_ips: u8,
    /// Concurrent connection attempts.
    #[arg(long, default_value_t = 200)]
    connect_concurrency: usize,
    /// Prefix of the user ids of this run (unique per run by default).
    #[arg(long)]
    run_id: Option<String>,
    /// Handshakes with a browser's headers and cookies (see
    /// `client::BROWSER_HEADERS`), as in production.
    #[arg(long)]
    browser_headers: bool,
}

#[derive(Args)]
struct ConnectArgs {
    #[command(flatten)]
    common: Common,
    /// Connections to open.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// New connections per second.
    #[arg(long, default_value_t = 2000)]
    rate: u64,
    /// Seconds to hold the connections before closing.
    #[arg(long, default_value_t = 5)]
    hold: u64,
    /// PID of a local gateway whose RSS to read from /proc.
    #[arg(long)]
    gateway_pid: Option<u32>,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    #[arg(long, default_value_t = 100)]
    channels: usize,
    /// Messages per second, in total (open loop).
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Seconds of sending.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Connections that send (default: all).
    #[arg(long)]
    senders: Option<usize>,
    /// Seconds to wait for stragglers after the last send.
    #[arg(long, default_value_t = 5)]
    drain: u64,
    /// Seconds at the start whose latencies are not recorded (connection
    /// set-up, caches, lease balancing); counts include them.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
}

#[derive(Args)]
struct FanoutArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value_t = 1000)]
    members: usize,
    #[arg(long, default_value_t = 100)]
    rate: u64,
    #[arg(long, default_value_t = 10)]
    duration: u64,
    #[arg(long, default_value_t = 5)]
    drain: u64,
    #[arg(long, default_value_t = 2)]
    warmup: u64,
}

fn minter(c: &Common) -> anyhow::Result<Minter> {
    match (&c.secret, &c.key) {
        (_, Some(path)) => Minter::rs256_pem(&std::fs::read(path)?, c.kid.clone()),
        (Some(s), None) => Ok(Minter::hs256(s)),
        (None, None) => anyhow::bail!("give --secret (or AUTH_DEV_SECRET) or --key"),
    }
}

fn run_id(c: &Common) -> String {
    c.run_id
        .clone()
        .unwrap_or_else(|| format!("lt{}", chrono::Utc::now().format("%H%M%S")))
}

fn source_ip(c: &Common, i: usize) -> Option<IpAddr> {
    if c.source_ips <= 1 {
        return None;
    }
    let last = (i % c.source_ips as usize) as u8 + 1;
    Some(IpAddr::from([127, 0, 0, last]))
}

fn hist() -> Histogram<u64> {
    // Microseconds, 1 µs to 10 min, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("constant, valid histogram bounds")
}

fn pct(h: &Histogram<u64>) -> Value {
    let ms = |v: u64| (v as f64 / 1000.0 * 100.0).round() / 100.0;
    json!({
        "count": h.len(),
        "p50_ms": ms(h.value_at_quantile(0.50)),
        "p95_ms": ms(h.value_at_quantile(0.95)),
        "p99_ms": ms(h.value_at_quantile(0.99)),
        "max_ms": ms(h.max()),
    })
}

fn row(label: &str, h: &Histogram<u64>) {
    let ms = |v: u64| v as f64 / 1000.0;
    println!(
        "  {label:<28} n={:<9} p50={:>8.2}ms p95={:>8.2}ms p99={:>8.2}ms max={:>8.2}ms",
        h.len(),
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.95)),
        ms(h.value_at_quantile(0.99)),
        ms(h.max())
    );
}

fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Opens `n` connections (users `<run>-u<i>`), at most `rate` per second and
/// `concurrency` at a time; returns them with their connect+auth times.
async fn open_connections(
    common: &Common,
    minter: &Minter,
    users: Vec<String>,
    rate: u64,
) -> (Vec<Option<Client>>, Histogram<u64>, u64) {
    let sem = Arc::new(tokio::sync::Semaphore::new(common.connect_concurrency));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(users.len());
    for (i, user) in users.into_iter().enumerate() {
        // Pace the ramp.
        let due = start + Duration::from_secs_f64(i as f64 / rate.max(1) as f64);
        tokio::time::sleep_until(due.into()).await;
        let permit = sem.clone().acquire_owned().await;
        let mut target = Target::seed_path(&common.targets[i % common.targets.len()]);
        target.browser_headers = common.browser_headers;
        let auth = minter.auth(&user);
        let ip = source_ip(common, i);
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let t0 = Instant::now();
            let attempt = async {
                let mut c = Client::connect_from(&target, auth?, ip).await?;
                c.wait_for("connection:success", |_| true, Duration::from_secs(30))
                    .await?;
                anyhow::Ok(c)
            };
            match attempt.await {
                Ok(c) => Ok((c, t0.elapsed())),
                Err(e) => Err(e.to_string()),
            }
        }));
        if i % 5000 == 4999 {
            eprintln!("  … {} connections started", i + 1);
        }
    }
    let mut h = hist();
    let mut out = Vec::with_capacity(tasks.len());
    let mut failed = 0;
    for t in tasks {
        match t.await {
            Ok(Ok((c, d))) => {
                let _ = h.record(d.as_micros().max(1) as u64);
                out.push(Some(c));
            }
            Ok(Err(e)) => {
                if failed < 3 {
                    eprintln!("  connection failed: {e}");
                }
                failed += 1;
                out.push(None);
            }
            Err(e) => {
                eprintln!("  connection task failed: {e}");
                failed += 1;
                out.push(None);
            }
        }
    }
    (out, h, failed)
}

async fn connect(args: ConnectArgs) -> anyhow::Result<Value> {
    let minter = minter(&args.common)?;
    let run = run_id(&args.common);
    let rss_before = args.gateway_pid.and_then(rss_kb);
    let users: Vec<String> = (0..args.connections)
        .map(|i| format!("{run}-c{i}"))
        .collect();
    let t0 = Instant::now();
    let (clients, h, failed) = open_connections(&args.common, &minter, users, args.rate).await;
    let ramp = t0.elapsed();
    tokio::time::sleep(Duration::from_secs(args.hold)).await;
    let rss_after = args.gateway_pid.and_then(rss_kb);
    let open = clients.iter().filter(|c| c.is_some()).count();
    let per_conn = match (rss_before, rss_after) {
        (Some(b), Some(a)) if open > 0 => Some(a.saturating_sub(b) as f64 / open as f64),
        _ => None,
    };
    println!(
        "connect: {open} open, {failed} failed, ramp {:.1}s",
        ramp.as_secs_f64()
    );
    row("connect+auth", &h);
    if let (Some(b), Some(a)) = (rss_before, rss_after) {
        println!(
            "  gateway RSS {b} KB → {a} KB: {:.1} KB per connection",
            per_conn.unwrap_or(0.0)
        );
    }
    for c in clients.iter().flatten() {
        c.close().await;
    }
    Ok(json!({
        "scenario": "connect",
        "connections": args.connections,
        "open": open,
        "failed": failed,
        "ramp_s": ramp.as_secs_f64(),
        "connect_auth": pct(&h),
        "gateway_rss_kb_before": rss_before,
        "gateway_rss_kb_after": rss_after,
        "rss_kb_per_connection": per_conn,
    }))
}

/// What one connection's reader saw.
struct ReaderStats {
    created: u64,
    out_of_order_or_dup: u64,
    created_latency: Histogram<u64>,
    delivered: u64,
    sent: u64,
    failed: u64,
    delivered_latency: Histogram<u64>,
    failures: Vec<String>,
}

/// Chat plan: who is in which channel, who sends.
struct Plan {
    common: Common,
    connections: usize,
    channels: usize,
    rate: u64,
    duration: u64,
    senders: usize,
    drain: u64,
    warmup: u64,
}

async fn chat(plan: Plan) -> anyhow::Result<Value> {
    let minter = minter(&plan.common)?;
    let run = run_id(&plan.common);
    let members = (plan.connections / plan.channels).max(1);
    let users: Vec<String> = (0..plan.connections)
        .map(|i| format!("{run}-u{i}"))
        .collect();
    let http = reqwest::Client::new();
    let base = &plan.common.targets[0];

    // Set-up over REST: channel k is owned by its first member; the others are added.
    eprintln!(
        "setting up {} channels of {members} members…",
        plan.channels
    );
    let mut channel_ids = Vec::with_capacity(plan.channels);
    for k in 0..plan.channels {
        let owner = &users[k * members];
        let token = minter.token(owner, Duration::from_secs(3600))?;
        let ch: Value = http
            .post(format!("{base}/api/channels"))
            .bearer_auth(&token)
            .json(&json!({"name": format!("{run}-{k}")}))
            .send()
            .await?
            .error_for_status()
            .context("create channel")?
            .json()
            .await?;
        let id = ch["id"].as_str().unwrap_or_default().to_string();
        let adds = (1..members).map(|m| {
            let http = http.clone();
            let url = format!("{base}/api/channels/{id}/members");
            let token = token.clone();
            let user = users[k * members + m].clone();
            async move {
                http.post(url)
                    .bearer_auth(token)
                    .json(&json!({"userId": user}))
                    .send()
                    .await
            }
        });
        // Bounded concurrency: each call holds a socket, and the sockets
        // are needed for the chat connections (RLIMIT_NOFILE).
        use futures::StreamExt;
        let results: Vec<_> = futures::stream::iter(adds)
            .buffer_unordered(32)
            .collect()
            .await;
        for r in results {
            r?.error_for_status().context("add member")?;
        }
        channel_ids.push(id);
    }

    // Close the REST client's pooled connections before opening sockets.
    drop(http);
    eprintln!("connecting {} sockets…", plan.connections);
    let (clients, connect_h, connect_failed) =
        open_connections(&plan.common, &minter, users.clone(), 5000).await;
    anyhow::ensure!(connect_failed == 0, "{connect_failed} connections failed");

    let base_instant = Instant::now();
    let micros = move || base_instant.elapsed().as_micros() as u64;
    // Sending starts about now; latencies of messages due in the first
    // `warmup` seconds are not recorded.
    let warm_from = Duration::from_secs(plan.warmup).as_micros() as u64;
    let mut emitters = Vec::new();
    let mut readers = Vec::new();
    for c in clients.into_iter().flatten() {
        let (emitter, mut events) = c.split();
        emitters.push(emitter);
        readers.push(tokio::spawn(async move {
            let mut st = ReaderStats {
                created: 0,
                out_of_order_or_dup: 0,
                created_latency: hist(),
                delivered: 0,
                sent: 0,
                failed: 0,
                delivered_latency: hist(),
                failures: Vec::new(),
            };
            let mut last_seq: std::collections::HashMap<String, i64> = Default::default();
            while let Some(e) = events.recv().await {
                let now = micros();
                match e.name.as_str() {
                    "message:created" => {
                        let m = &e.data["message"];
                        let seq = m["seq"].as_i64().unwrap_or(0);
                        let ch = m["channelId"].as_str().unwrap_or_default().to_string();
                        let last = last_seq.entry(ch).or_insert(0);
                        if seq <= *last {
                            st.out_of_order_or_dup += 1;
                            continue;
                        }
                        *last = seq;
                        st.created += 1;
                        if let Some(t) = m["content"]
                            .as_str()
                            .and_then(|c| c.rsplit(' ').next())
                            .and_then(|t| t.parse::<u64>().ok())
                        {
                            if t >= warm_from {
                                let _ = st.created_latency.record(now.saturating_sub(t).max(1));
                            }
                        }
                    }
                    "message:delivered" => {
                        let t = e.data["tempId"]
                            .as_str()
                            .and_then(|c| c.rsplit('-').next())
                            .and_then(|t| t.parse::<u64>().ok());
                        if e.data["status"] == "SENT" {
                            st.sent += 1;
                        } else {
                            st.delivered += 1;
                            if let Some(t) = t.filter(|t| *t >= warm_from) {
                                let _ = st.delivered_latency.record(now.saturating_sub(t).max(1));
                            }
                        }
                    }
                    "message:failed" => {
                        st.failed += 1;
                        if st.failures.len() < 5 {
                            st.failures
                                .push(e.data["error"].as_str().unwrap_or_default().to_string());
                        }
                    }
                    _ => {}
                }
            }
            st
        }));
    }

    // Open-loop schedule: message j is due at j / rate seconds; senders take
    // turns, each sends to its own channel.
    let total = plan.rate * plan.duration;
    let senders = plan.senders.min(emitters.len()).max(1);
    let sent_count = Arc::new(AtomicU64::new(0));
    eprintln!(
        "sending {total} messages at {}/s from {senders} senders…",
        plan.rate
    );
    let start = Instant::now();
    let progress = {
        let sent_count = sent_count.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                eprintln!(
                    "  t={:>3}s sent={}",
                    start.elapsed().as_secs(),
                    sent_count.load(Ordering::Relaxed)
                );
            }
        })
    };
    // One task per sender keeps each sender's messages in order.
    let mut send_tasks = Vec::new();
    for s in 0..senders {
        let emitter = emitters[s].clone();
        // Sender s is user s: member of channel s / members.
        let channel = channel_ids[(s / members).min(channel_ids.len() - 1)].clone();
        let per_sender: Vec<u64> = (s as u64..total).step_by(senders).collect();
        let rate = plan.rate;
        let sent_count = sent_count.clone();
        send_tasks.push(tokio::spawn(async move {
            for j in per_sender {
                let due = start + Duration::from_secs_f64(j as f64 / rate as f64);
                tokio::time::sleep_until(due.into()).await;
                let intended = (due - base_instant).as_micros() as u64;
                let payload = json!({
                    "content": format!("load {j} {intended}"),
                    "channelId": channel,
                    "tempId": format!("{s}-{j}-{intended}"),
                });
                if emitter.emit("message:send", &payload).await.is_err() {
                    break;
                }
                sent_count.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in send_tasks {
        let _ = t.await;
    }
    let send_elapsed = start.elapsed();
    tokio::time::sleep(Duration::from_secs(plan.drain)).await;
    progress.abort();
    for e in &emitters {
        e.close().await;
    }
    let mut created = 0;
    let mut dup = 0;
    let mut delivered = 0;
    let mut sent_ok = 0;
    let mut failed = 0;
    let mut created_h = hist();
    let mut delivered_h = hist();
    let mut failures = Vec::new();
    for r in readers {
        if let Ok(st) = r.await {
            created += st.created;
            dup += st.out_of_order_or_dup;
            delivered += st.delivered;
            sent_ok += st.sent;
            failed += st.failed;
            let _ = created_h.add(&st.created_latency);
            let _ = delivered_h.add(&st.delivered_latency);
            if failures.len() < 5 {
                failures.extend(st.failures);
            }
        }
    }
    let sent = sent_count.load(Ordering::Relaxed);
    // Every persisted message is due at every member of its channel.
    let expected = delivered * members as u64;
    let lost = expected.saturating_sub(created);
    let secs = send_elapsed.as_secs_f64();
    println!(
        "chat: {} connections, {} channels × {members} members, {} senders, {}/s for {}s",
        plan.connections, plan.channels, senders, plan.rate, plan.duration
    );
    println!(
        "  sent {sent}  SENT {sent_ok}  DELIVERED {delivered}  FAILED {failed}  created deliveries {created}"
    );
    println!(
        "  throughput: {:.0} persisted msg/s, {:.0} deliveries/s",
        delivered as f64 / secs,
        created as f64 / secs
    );
    println!("  lost {lost}  duplicated or out of order {dup}");
    row("connect+auth", &connect_h);
    row("send → message:created", &created_h);
    row("send → DELIVERED", &delivered_h);
    if !failures.is_empty() {
        println!("  failures (first): {failures:?}");
    }
    Ok(json!({
        "scenario": if plan.channels == 1 { "fanout" } else { "chat" },
        "connections": plan.connections,
        "channels": plan.channels,
        "members": members,
        "senders": senders,
        "rate": plan.rate,
        "duration_s": plan.duration,
        "warmup_s": plan.warmup,
        "sent": sent,
        "accepted_sent": sent_ok,
        "persisted_delivered": delivered,
        "failed": failed,
        "created_deliveries": created,
        "persisted_per_s": delivered as f64 / secs,
        "deliveries_per_s": created as f64 / secs,
        "lost": lost,
        "duplicated_or_out_of_order": dup,
        "connect_auth": pct(&connect_h),
        "send_to_created": pct(&created_h),
        "send_to_delivered": pct(&delivered_h),
    }))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let report = match cli.scenario {
        Scenario::Connect(a) => connect(a).await?,
        Scenario::Chat(a) => {
            let senders = a.senders.unwrap_or(a.connections);
            chat(Plan {
                common: a.common,
                connections: a.connections,
                channels: a.channels.max(1),
                rate: a.rate,
                duration: a.duration,
                senders,
                drain: a.drain,
                warmup: a.warmup,
            })
            .await?
        }
        Scenario::Recover(a) => recover::run(a).await?,
        Scenario::Fanout(a) => {
            chat(Plan {
                common: a.common,
                connections: a.members,
                channels: 1,
                rate: a.rate,
                duration: a.duration,
                senders: 1,
                drain: a.drain,
                warmup: a.warmup,
            })
            .await?
        }
    };
    println!("{report}");
    Ok(())
}
