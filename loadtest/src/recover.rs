//! `recover`: what catch-up after a reconnect costs (CONTRACT §9).
//!
//! 1. For each M of `--missed`: a member goes away, M messages are sent to its
//!    channel, it reconnects to another gateway with `auth.since`; the time
//!    from opening the connection to `channel:recovered` (M replayed).
//! 2. With `--storm N`: N members of `--storm-channels` channels reconnect at
//!    once with `since` (a gateway restart) after `--storm-missed` messages
//!    per channel; time to `channel:recovered` per socket, wall time, and the
//!    gateways' CPU per reconnect (`--gateway-pids`).

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde_json::{json, Value};
use switchboard_loadtest::client::{Client, Target};
use switchboard_loadtest::tokens::Minter;

use super::{hist, minter, pct, row, run_id, source_ip, Common};

#[derive(Args)]
pub struct RecoverArgs {
    #[command(flatten)]
    common: Common,
    /// Missed messages per measured reconnect, comma separated.
    #[arg(long, default_value = "10,100,1000", value_delimiter = ',')]
    missed: Vec<usize>,
    /// Sockets reconnecting at once with `since` (0: no storm).
    #[arg(long, default_value_t = 0)]
    storm: usize,
    /// Channels the storm's sockets are spread over.
    #[arg(long, default_value_t = 100)]
    storm_channels: usize,
    /// Messages sent to each storm channel while its members are away.
    #[arg(long, default_value_t = 5)]
    storm_missed: usize,
    /// PIDs of local gateways whose CPU time to report.
    #[arg(long, value_delimiter = ',')]
    gateway_pids: Vec<u32>,
}

/// User + system CPU seconds of local processes (from /proc).
fn cpu_seconds(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|stat| {
            // Fields after the command name, which may contain spaces.
            let rest = stat.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
            Some(ticks / 100.0)
        })
        .sum()
}

/// Creates a channel owned by `owner` with `members`; returns its id.
async fn channel(
    http: &reqwest::Client,
    base: &str,
    minter: &Minter,
    owner: &str,
    members: &[String],
) -> anyhow::Result<String> {
    let token = minter.token(owner, Duration::from_secs(3600))?;
    let ch: Value = http
        .post(format!("{base}/api/channels"))
        .bearer_auth(&token)
        .json(&json!({"name": owner}))
        .send()
        .await?
        .error_for_status()
        .context("create channel")?
        .json()
        .await?;
    let id = ch["id"].as_str().unwrap_or_default().to_string();
    for m in members {
        http.post(format!("{base}/api/channels/{id}/members"))
            .bearer_auth(&token)
            .json(&json!({"userId": m}))
            .send()
            .await?
            .error_for_status()
            .context("add member")?;
    }
    Ok(id)
}

/// Sends `n` messages from `c` to each channel and waits for every DELIVERED.
async fn send_all(c: &mut Client, channels: &[String], n: usize) -> anyhow::Result<()> {
    let mut want = 0;
    for ch in channels {
        for i in 0..n {
            c.emit(
                "message:send",
                &json!({"content": format!("missed {i}"), "channelId": ch, "tempId": format!("{ch}-{i}")}),
            )
            .await?;
            want += 1;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut delivered = 0;
    while delivered < want {
        anyhow::ensure!(Instant::now() < deadline, "{delivered} of {want} delivered");
        if let Some(e) = c.next(Duration::from_millis(200)).await {
            if e.name == "message:delivered" && e.data["status"] == "DELIVERED" {
                delivered += 1;
            }
        }
    }
    Ok(())
}

/// Connects with `since` and waits for `channel:recovered`; returns the
/// number of replayed messages and the time taken.
async fn reconnect(
    target: &Target,
    mut auth: Value,
    since: Value,
    ip: Option<std::net::IpAddr>,
) -> anyhow::Result<(usize, Duration, Client)> {
    auth["since"] = since;
    let t0 = Instant::now();
    let mut c = Client::connect_from(target, auth, ip).await?;
    let mut replayed = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        anyhow::ensure!(Instant::now() < deadline, "no channel:recovered");
        let Some(e) = c.next(Duration::from_millis(200)).await else {
            continue;
        };
        match e.name.as_str() {
            "message:created" if e.data["recovered"] == true => replayed += 1,
            "channel:recovered" => {
                anyhow::ensure!(e.data["recovered"] == true, "not recovered: {}", e.data);
                return Ok((replayed, t0.elapsed(), c));
            }
            _ => {}
        }
    }
}

pub async fn run(args: RecoverArgs) -> anyhow::Result<Value> {
    let minter = minter(&args.common)?;
    let run = run_id(&args.common);
    let http = reqwest::Client::new();
    let targets = &args.common.targets;
    let first = Target::seed_path(&targets[0]);
    let last = Target::seed_path(&targets[targets.len() - 1]);
    let mut single = Vec::new();

    for &m in &args.missed {
        let (sender, reader) = (format!("{run}-s{m}"), format!("{run}-r{m}"));
        let ch = channel(
            &http,
            &targets[0],
            &minter,
            &sender,
            std::slice::from_ref(&reader),
        )
        .await?;
        let mut s = Client::connect(&first, minter.auth(&sender)?).await?;
        s.wait_for("connection:success", |_| true, Duration::from_secs(30))
            .await?;
        send_all(&mut s, std::slice::from_ref(&ch), m).await?;
        let (replayed, took, c) =
            reconnect(&last, minter.auth(&reader)?, json!({ch: 0}), None).await?;
        anyhow::ensure!(replayed == m, "replayed {replayed} of {m}");
        println!(
            "recover: {m:>5} missed → channel:recovered in {:.1} ms",
            took.as_secs_f64() * 1000.0
        );
        single.push(json!({"missed": m, "ms": took.as_secs_f64() * 1000.0}));
        c.close().await;
        s.close().await;
    }

    let mut storm = Value::Null;
    if args.storm > 0 {
        let k = args.storm_channels.max(1);
        let per = (args.storm / k).max(1);
        let users: Vec<String> = (0..args.storm).map(|i| format!("{run}-m{i}")).collect();
        let sender = format!("{run}-storm");
        eprintln!("setting up {k} channels of {per} members…");
        let mut channels = Vec::with_capacity(k);
        let mut channel_of = Vec::with_capacity(args.storm);
        for c in 0..k {
            let members: Vec<String> = users.iter().skip(c * per).take(per).cloned().collect();
            let owner = members.first().cloned().unwrap_or_else(|| sender.clone());
            let mut all = members.clone();
            all.retain(|u| *u != owner);
            all.push(sender.clone());
            let id = channel(&http, &targets[0], &minter, &owner, &all).await?;
            channel_of.extend(members.iter().map(|_| id.clone()));
            channels.push(id);
        }
        let mut s = Client::connect(&first, minter.auth(&sender)?).await?;
        s.wait_for("connection:success", |_| true, Duration::from_secs(30))
            .await?;
        send_all(&mut s, &channels, args.storm_missed).await?;
        s.close().await;
        drop(http);

        // Tokens first: signing is the generator's cost, not the server's.
        let auths: Vec<Value> = users
            .iter()
            .map(|u| minter.auth(u))
            .collect::<anyhow::Result<_>>()?;
        eprintln!("{} sockets reconnecting with since…", users.len());
        let cpu0 = cpu_seconds(&args.gateway_pids);
        let started = Instant::now();
        let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(args.common.connect_concurrency));
        let mut tasks = Vec::with_capacity(users.len());
        for (i, auth) in auths.into_iter().enumerate() {
            let permit = sem.clone().acquire_owned().await?;
            let target = Target::seed_path(&targets[i % targets.len()]);
            let since = json!({channel_of.get(i).cloned().unwrap_or_default(): 0});
            let ip = source_ip(&args.common, i);
            tasks.push(tokio::spawn(async move {
                let r = reconnect(&target, auth, since, ip).await;
                drop(permit);
                r
            }));
        }
        let mut h = hist();
        let mut failed = 0;
        let mut clients = Vec::new();
        for t in tasks {
            match t.await {
                Ok(Ok((n, took, c))) if n == args.storm_missed => {
                    let _ = h.record(took.as_micros().max(1) as u64);
                    clients.push(c);
                }
                Ok(Ok((n, _, c))) => {
                    eprintln!("  replayed {n} of {}", args.storm_missed);
                    failed += 1;
                    clients.push(c);
                }
                Ok(Err(e)) => {
                    if failed < 3 {
                        eprintln!("  reconnect failed: {e}");
                    }
                    failed += 1;
                }
                Err(e) => {
                    eprintln!("  task failed: {e}");
                    failed += 1;
                }
            }
        }
        let wall = started.elapsed();
        let cpu = cpu_seconds(&args.gateway_pids) - cpu0;
        println!(
            "storm: {} sockets, {} failed, all recovered in {:.2} s; gateways {:.2} CPU-s = {:.2} ms per reconnect",
            users.len(),
            failed,
            wall.as_secs_f64(),
            cpu,
            cpu * 1000.0 / users.len().max(1) as f64
        );
        row("reconnect→recovered", &h);
        for c in &clients {
            c.close().await;
        }
        storm = json!({
            "sockets": users.len(),
            "failed": failed,
            "wall_s": wall.as_secs_f64(),
            "gateway_cpu_s": cpu,
            "reconnect_to_recovered": pct(&h),
        });
    }
    Ok(json!({"scenario": "recover", "single": single, "storm": storm}))
}
