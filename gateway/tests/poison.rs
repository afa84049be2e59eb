//! Hostile and unlucky input (issue 16, findings 3 and 6, replyToId): a NUL
//! character is refused at the gateway; a data error that reaches a worker
//! anyway isolates its one entry at once instead of stalling every partition
//! of the worker; a reaction whose batch is retried is still announced once;
//! `replyToId` must name a message of the same channel.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{json, Value};
use support::*;
use switchboard_loadtest::client::Client;
use switchboard_shared::bus::redis::RedisBus;
use switchboard_shared::bus::{partition_of, Bus};
use switchboard_shared::protocol::{decode, encode, Command, CommandEnvelope};
use uuid::Uuid;

/// The harness's partition count (`STREAM_PARTITIONS`).
const PARTITIONS: u32 = 4;
/// What a sender is told when the database refused its entry.
const UNSTORABLE: &str = "The request contains data that cannot be stored";

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    let i = ((v.len() as f64) * 0.99).ceil() as usize;
    v[i.saturating_sub(1).min(v.len() - 1)]
}

fn uuid(s: &str) -> Uuid {
    Uuid::parse_str(s).expect("uuid")
}

/// Sends one message every 100 ms and returns each one's time from send to
/// its final acknowledgement (which must be DELIVERED).
async fn steady_sends(c: &Client, channel: &str, prefix: &str, n: usize) -> Vec<Duration> {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        tick.tick().await;
        let t = Instant::now();
        let ack = c
            .call(
                "message:send",
                &json!({"content": format!("{prefix} {i}"), "channelId": channel, "tempId": format!("{prefix}{i}")}),
                T,
            )
            .await
            .expect("ack");
        assert_eq!(ack["status"], "DELIVERED", "{ack}");
        out.push(t.elapsed());
    }
    out
}

/// Waits for the `SENT` of each tempId.
async fn wait_sent(c: &mut Client, temp_ids: &[&str]) {
    for t in temp_ids {
        c.wait_for(
            "message:delivered",
            |d| d["tempId"] == *t && d["status"] == "SENT",
            T,
        )
        .await
        .unwrap_or_else(|e| panic!("SENT {t}: {e}"));
    }
}

fn redis_cli(args: &[&str]) -> String {
    let out = std::process::Command::new("redis-cli")
        .args(["-u", &redis_url()])
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn dead_letters(cluster: &Cluster) -> u64 {
    redis_cli(&["XLEN", &format!("{}:dead-letter", cluster.prefix)])
        .parse()
        .unwrap_or(0)
}

fn psql_value(sql: &str) -> String {
    let out = std::process::Command::new("psql")
        .args([&pg_admin_url(), "-qAtc", sql])
        .output()
        .expect("psql");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_input_is_refused_at_the_gateway_and_other_channels_keep_their_latency() {
    // One worker holds every partition: a stall would hit everyone.
    let cluster = Cluster::start(ClusterOptions {
        gateways: 1,
        workers: 1,
        ..Default::default()
    })
    .await;
    let bad = cluster.channel("mal", &[]).await;
    let good = cluster.channel("oli", &[]).await;
    let mut mal = cluster.connect(0, "mal").await;
    let oli = cluster.connect(0, "oli").await;

    // 10 NUL messages a second for 3 s, beside another user's steady sends.
    let n = 30;
    let poison = async {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        for i in 0..n {
            tick.tick().await;
            mal.emit(
                "message:send",
                &json!({"content": format!("bad\u{0}{i}"), "channelId": bad, "tempId": format!("n{i}")}),
            )
            .await
            .expect("emit");
        }
    };
    let (_, latencies) = tokio::join!(poison, steady_sends(&oli, &good, "o", n));

    let mut failed = Vec::new();
    while failed.len() < n {
        let e = mal.next(T).await.expect("an answer for every message");
        match e.name.as_str() {
            "message:failed" => {
                assert_eq!(e.data["error"], "content must not contain NUL characters");
                failed.push(e.data["tempId"].as_str().unwrap_or_default().to_string());
            }
            "message:delivered" => panic!("a NUL message was accepted: {}", e.data),
            _ => {}
        }
    }
    assert_eq!(
        failed,
        (0..n).map(|i| format!("n{i}")).collect::<Vec<_>>(),
        "each refused, in order"
    );
    let p = p99(latencies);
    assert!(
        p < Duration::from_millis(500),
        "another channel's p99 is {p:?}\n{}",
        cluster.logs()
    );
    assert_eq!(dead_letters(&cluster), 0, "nothing reached a worker");

    // Every other text field a client sends, with the area's error.
    let ack = mal
        .call(
            "message:send",
            &json!({"content": "ok", "channelId": bad, "tempId": "t\u{0}"}),
            T,
        )
        .await
        .expect("ack");
    assert_eq!(ack["status"], "FAILED", "{ack}");
    assert_eq!(ack["error"], "tempId must not contain NUL characters");
    let ack = mal
        .call(
            "message:send",
            &json!({"content": "ok", "channelId": bad, "replyToId": "\u{0}"}),
            T,
        )
        .await
        .expect("ack");
    assert_eq!(ack["error"], "replyToId must not contain NUL characters");
    let stored = mal
        .call(
            "message:send",
            &json!({"content": "fine", "channelId": bad, "tempId": "fine"}),
            T,
        )
        .await
        .expect("ack");
    assert_eq!(stored["status"], "DELIVERED", "{stored}");
    let mid = stored["messageId"].as_str().expect("id").to_string();
    let ack = mal
        .call(
            "reaction:add",
            &json!({"messageId": mid, "type": "x\u{0}"}),
            T,
        )
        .await
        .expect("ack");
    assert_eq!(ack["ok"], false, "{ack}");
    assert_eq!(ack["error"], "type must not contain NUL characters");
    mal.wait_for("reaction:error", |d| d["messageId"] == mid.as_str(), T)
        .await
        .expect("reaction:error");
    let ack = mal
        .call(
            "message:read",
            &json!({"messageId": format!("{mid}\u{0}")}),
            T,
        )
        .await
        .expect("ack");
    assert_eq!(ack["error"], "messageId must not contain NUL characters");
    mal.wait_for("message:error", |_| true, T)
        .await
        .expect("message:error");
    let (s, body) = cluster
        .api(
            0,
            "mal",
            "POST",
            "/api/channels",
            Some(json!({"name": "a\u{0}b"})),
        )
        .await;
    assert_eq!(s, 400, "{body}");
    let (s, body) = cluster
        .api(
            0,
            "mal",
            "POST",
            &format!("/api/channels/{bad}/members"),
            Some(json!({"userId": "u\u{0}"})),
        )
        .await;
    assert_eq!(s, 400, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_entry_is_dead_lettered_at_once_and_everything_else_flows() {
    // No worker yet: the entries wait in the stream, where the test swaps
    // one message's content for one the database refuses (as if the gateway
    // had not checked it).
    let mut cluster = Cluster::start(ClusterOptions {
        gateways: 1,
        workers: 0,
        ..Default::default()
    })
    .await;
    let ch_a = cluster.channel("pat", &["quinn"]).await;
    let pa = partition_of(&uuid(&ch_a), PARTITIONS);
    let mut ch_b = cluster.channel("oli", &[]).await;
    while partition_of(&uuid(&ch_b), PARTITIONS) == pa {
        ch_b = cluster.channel("oli", &[]).await;
    }
    let mut pat = cluster.connect(0, "pat").await;
    let mut quinn = cluster.connect(0, "quinn").await;
    let mut oli = cluster.connect(0, "oli").await;
    for (content, t) in [("first", "t0"), ("poison", "tp"), ("third", "t2")] {
        pat.emit(
            "message:send",
            &json!({"content": content, "channelId": ch_a, "tempId": t}),
        )
        .await
        .expect("emit");
    }
    wait_sent(&mut pat, &["t0", "tp", "t2"]).await;
    oli.emit(
        "message:send",
        &json!({"content": "other partition", "channelId": ch_b, "tempId": "o0"}),
    )
    .await
    .expect("emit");
    wait_sent(&mut oli, &["o0"]).await;

    let bus = RedisBus::connect(&redis_url(), &cluster.prefix, 100_000)
        .await
        .expect("redis");
    let entries: Vec<_> = bus
        .read(&[pa], "surgeon", 10, Duration::from_secs(1))
        .await
        .expect("read")
        .into_iter()
        .flat_map(|b| b.entries)
        .collect();
    assert_eq!(entries.len(), 3);
    let mut poison_env = None;
    let mut swapped = Vec::new();
    for e in &entries {
        let mut env: CommandEnvelope = decode(&e.payload).expect("decode");
        if let Command::SendMessage(m) = &mut env.command {
            if m.temp_id.as_deref() == Some("tp") {
                m.content = "poison\u{0}".into();
                poison_env = Some(env.clone());
            }
        }
        swapped.push((pa, Bytes::from(encode(&env).expect("encode"))));
    }
    let poison_env = poison_env.expect("the poison entry");
    let ids: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
    bus.ack(pa, &ids).await.expect("ack");
    for r in bus.append_many(swapped).await {
        r.expect("append");
    }

    cluster.add_worker();
    let failed = pat
        .wait_for("message:failed", |d| d["tempId"] == "tp", T)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    assert_eq!(failed["error"], UNSTORABLE);
    for t in ["t0", "t2"] {
        pat.wait_for(
            "message:delivered",
            |d| d["tempId"] == t && d["status"] == "DELIVERED",
            T,
        )
        .await
        .unwrap_or_else(|e| panic!("{t}: {e}"));
    }
    let created = collect_created(&mut quinn, 2, T).await;
    let order: Vec<&str> = created
        .iter()
        .map(|c| c["tempId"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(order, ["t0", "t2"], "the rest of the batch, in order");
    oli.wait_for(
        "message:delivered",
        |d| d["tempId"] == "o0" && d["status"] == "DELIVERED",
        T,
    )
    .await
    .expect("the other partition flows");
    assert_eq!(
        dead_letters(&cluster),
        1,
        "only the poison is dead-lettered"
    );

    // Its claim was settled: a corrected resend with the same tempId is
    // stored, not refused as "already being processed".
    let ack = pat
        .call(
            "message:send",
            &json!({"content": "poison, fixed", "channelId": ch_a, "tempId": "tp"}),
            T,
        )
        .await
        .expect("ack");
    assert_eq!(ack["status"], "DELIVERED", "{ack}");
    let history: Vec<String> = cluster
        .history("pat", &ch_a)
        .await
        .iter()
        .map(|m| m["content"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(history, ["first", "third", "poison, fixed"]);

    // Poison entries keep arriving at 10/s on that partition while others
    // write to it and to another partition: nobody waits for a backoff.
    let n = 20;
    let inject = async {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        for i in 0..n {
            tick.tick().await;
            let mut env = poison_env.clone();
            if let Command::SendMessage(m) = &mut env.command {
                m.id = Uuid::now_v7();
                m.temp_id = Some(format!("x{i}"));
            }
            bus.append(pa, Bytes::from(encode(&env).expect("encode")))
                .await
                .expect("append");
        }
    };
    let (_, same, other) = tokio::join!(
        inject,
        steady_sends(&pat, &ch_a, "a", n),
        steady_sends(&oli, &ch_b, "b", n)
    );
    let (same, other) = (p99(same), p99(other));
    assert!(
        same < Duration::from_millis(500) && other < Duration::from_millis(500),
        "p99 same partition {same:?}, other partition {other:?}\n{}",
        cluster.logs()
    );
    let deadline = Instant::now() + T;
    while dead_letters(&cluster) < 1 + n as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(dead_letters(&cluster), 1 + n as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reaction_whose_batch_is_retried_is_still_announced_once() {
    // The processes reach PostgreSQL through a proxy the test can cut.
    let proxy = FaultProxy::start("127.0.0.1:5432").await;
    let mut cluster = Cluster::start(ClusterOptions {
        gateways: 1,
        workers: 1,
        pg_hostport: Some(proxy.hostport()),
        ..Default::default()
    })
    .await;
    let ch = cluster.channel("ann", &["bob"]).await;
    let p = partition_of(&uuid(&ch), PARTITIONS);
    let ann = cluster.connect(0, "ann").await;
    let mut bob = cluster.connect(0, "bob").await;
    let sent = ann
        .call(
            "message:send",
            &json!({"content": "react to me", "channelId": ch, "tempId": "m"}),
            T,
        )
        .await
        .expect("ack");
    assert_eq!(sent["status"], "DELIVERED", "{sent}");
    let mid = sent["messageId"].as_str().expect("id").to_string();
    bob.wait_for("message:created", |_| true, T)
        .await
        .expect("created");

    // Stop the worker, so the reaction and the read queue up and are read
    // in one batch by the next one.
    cluster.workers[0].terminate();
    assert!(cluster.workers[0].wait_exit(T), "worker stops");
    let bus = RedisBus::connect(&redis_url(), &cluster.prefix, 100_000)
        .await
        .expect("redis");

    // The read will wait on this lock after the reaction is committed.
    let db =
        sea_orm::Database::connect(format!("postgres://postgres@127.0.0.1:5432/{}", cluster.db))
            .await
            .expect("db");
    use sea_orm::{ConnectionTrait, TransactionTrait};
    let txn = db.begin().await.expect("begin");
    txn.execute_unprepared("LOCK TABLE channel_members IN EXCLUSIVE MODE")
        .await
        .expect("lock");

    let reacted = ann
        .emit_ack("reaction:add", &json!({"messageId": mid, "type": "👍"}))
        .await
        .expect("emit");
    let read = ann
        .emit_ack("message:read", &json!({"messageId": mid}))
        .await
        .expect("emit");
    let deadline = Instant::now() + T;
    while bus.backlog(p).await.expect("backlog") < 2 {
        assert!(Instant::now() < deadline, "both queued");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    cluster.add_worker();
    let waiting = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' AND wait_event_type = 'Lock'",
        cluster.db
    );
    let deadline = Instant::now() + T;
    while psql_value(&waiting).parse::<u32>().unwrap_or(0) == 0 {
        assert!(
            Instant::now() < deadline,
            "the read never waited on the lock\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The reaction is committed; the batch now fails before its publish.
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(300)).await;
    txn.commit().await.expect("unlock");
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.restore();

    let ack = tokio::time::timeout(T, reacted)
        .await
        .expect("reaction answered")
        .expect("ack");
    assert_eq!(ack["ok"], true, "{ack}");
    let ack = tokio::time::timeout(T, read)
        .await
        .expect("read answered")
        .expect("ack");
    assert_eq!(ack["ok"], true, "{ack}");

    // Count what bob sees until things are quiet.
    let mut added = Vec::new();
    let mut reads = 0;
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if let Some(e) = bob.next(Duration::from_millis(200)).await {
            match e.name.as_str() {
                "reaction:added" => added.push(e.data),
                "message:read" => reads += 1,
                _ => {}
            }
        }
    }
    assert_eq!(
        added.len(),
        1,
        "reaction:added exactly once: {added:?}\n{}",
        cluster.logs()
    );
    assert_eq!(added[0]["reaction"]["type"], "👍");
    assert_eq!(added[0]["messageId"], mid.as_str());
    assert_eq!(reads, 1, "the read is announced too");
    let history = cluster.history("ann", &ch).await;
    let reactions = history[0]["reactions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(reactions.len(), 1, "stored once: {reactions:?}");
    assert_eq!(
        reactions[0]["id"], added[0]["reaction"]["id"],
        "the announced row is the stored one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_to_must_be_a_message_of_the_same_channel() {
    let cluster = Cluster::start(ClusterOptions {
        gateways: 1,
        workers: 1,
        ..Default::default()
    })
    .await;
    let a = cluster.channel("rae", &[]).await;
    let b = cluster.channel("rae", &[]).await;
    let mut rae = cluster.connect(0, "rae").await;
    let send = |content: &str, channel: &str, temp: &str, reply: Option<&str>| json!({"content": content, "channelId": channel, "tempId": temp, "replyToId": reply});
    let in_a = rae
        .call("message:send", &send("in a", &a, "a1", None), T)
        .await
        .expect("ack");
    let in_a = in_a["messageId"].as_str().expect("id").to_string();
    let in_b = rae
        .call("message:send", &send("in b", &b, "b1", None), T)
        .await
        .expect("ack");
    let in_b = in_b["messageId"].as_str().expect("id").to_string();

    let other_channel = rae
        .call("message:send", &send("reply", &b, "r1", Some(&in_a)), T)
        .await
        .expect("ack");
    assert_eq!(other_channel["status"], "FAILED", "{other_channel}");
    assert_eq!(
        other_channel["error"],
        "replyToId is not a message of this channel"
    );
    rae.wait_for("message:failed", |d| d["tempId"] == "r1", T)
        .await
        .expect("message:failed");
    let unknown = Uuid::now_v7().to_string();
    let missing = rae
        .call("message:send", &send("reply", &b, "r2", Some(&unknown)), T)
        .await
        .expect("ack");
    assert_eq!(
        missing["error"], "replyToId is not a message of this channel",
        "{missing}"
    );

    // Corrected, with the same tempId: the refusal released the claim.
    let ok = rae
        .call("message:send", &send("reply", &b, "r1", Some(&in_b)), T)
        .await
        .expect("ack");
    assert_eq!(ok["status"], "DELIVERED", "{ok}");
    let created: Value = rae
        .wait_for("message:created", |d| d["tempId"] == "r1", T)
        .await
        .expect("created");
    assert_eq!(created["message"]["replyToId"], in_b.as_str());
    let history = cluster.history("rae", &b).await;
    assert_eq!(history.len(), 2, "the refused replies are not stored");
}
