//! Gap-free delivery across reconnects (CONTRACT §9; issue 10): catch-up
//! with `auth.since` on another gateway, the bound, the seam under traffic,
//! and `channel:sync` on demand.

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;
use switchboard_loadtest::client::{Client, Target};

/// Connects `user` to gateway `node` with `auth.since`.
async fn connect_since(cluster: &Cluster, node: usize, user: &str, since: Value) -> Client {
    let mut auth = cluster.minter.auth(user).expect("auth");
    auth["since"] = since;
    let mut c = Client::connect(&Target::seed_path(&cluster.urls[node]), auth)
        .await
        .expect("connect");
    c.wait_for("connection:success", |_| true, T)
        .await
        .expect("connection:success");
    c
}

/// Sends `n` messages and waits until each is DELIVERED.
async fn send_delivered(c: &mut Client, ch: &str, prefix: &str, n: usize) {
    for i in 0..n {
        c.emit(
            "message:send",
            &json!({"content": format!("{prefix} {i}"), "channelId": ch, "tempId": format!("{prefix}-{i}")}),
        )
        .await
        .expect("emit");
    }
    let mut delivered = std::collections::HashSet::new();
    let deadline = Instant::now() + T;
    while delivered.len() < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} delivered",
            delivered.len()
        );
        if let Some(e) = c.next(Duration::from_millis(200)).await {
            if e.name == "message:delivered" && e.data["status"] == "DELIVERED" {
                delivered.insert(e.data["tempId"].as_str().unwrap_or_default().to_string());
            }
        }
    }
}

/// Reads events until `channel:recovered` for `ch`; returns the
/// `message:created` events of `ch` before it, and the `channel:recovered`.
async fn until_recovered(c: &mut Client, ch: &str) -> (Vec<Value>, Value) {
    let deadline = Instant::now() + T;
    let mut created = Vec::new();
    while Instant::now() < deadline {
        let Some(e) = c.next(Duration::from_millis(200)).await else {
            continue;
        };
        if e.name == "message:created" && e.data["message"]["channelId"] == ch {
            created.push(e.data);
        } else if e.name == "channel:recovered" && e.data["channelId"] == ch {
            return (created, e.data);
        }
    }
    panic!("no channel:recovered for {ch}");
}

fn seqs(events: &[Value]) -> Vec<i64> {
    events
        .iter()
        .filter_map(|e| e["message"]["seq"].as_i64())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_reconnecting_elsewhere_gets_exactly_what_it_missed() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let ch = cluster.channel("sam", &["rae"]).await;
    let mut sam = cluster.connect(0, "sam").await;
    let mut rae = cluster.connect(0, "rae").await;
    send_delivered(&mut sam, &ch, "a", 10).await;
    let before = collect_created(&mut rae, 10, T).await;
    let held = seqs(&before).into_iter().max().expect("seq");
    assert_eq!(held, 10);
    rae.close().await;

    send_delivered(&mut sam, &ch, "b", 50).await;

    // Back on the other gateway, with where it stopped.
    let mut rae = connect_since(&cluster, 1, "rae", json!({ch.clone(): held})).await;
    let (replayed, recovered) = until_recovered(&mut rae, &ch).await;
    assert_eq!(
        seqs(&replayed),
        (11..=60).collect::<Vec<_>>(),
        "exactly the 50 missed, in order"
    );
    assert!(replayed.iter().all(|e| e["recovered"] == true));
    assert!(replayed
        .iter()
        .all(|e| e["message"]["reactions"].is_array()));
    assert_eq!(
        recovered,
        json!({"channelId": ch, "recovered": true, "fromSeq": 11, "toSeq": 60})
    );
    // Then live.
    send_delivered(&mut sam, &ch, "c", 1).await;
    let live = collect_created(&mut rae, 1, T).await;
    assert_eq!(seqs(&live), vec![61]);
    assert!(live[0].get("recovered").is_none());
    assert!(
        rae.next(Duration::from_millis(300)).await.is_none(),
        "nothing twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_missed_than_the_bound_replays_nothing() {
    let cluster = Cluster::start(ClusterOptions {
        env: vec![("RECOVERY_MAX_MESSAGES".into(), "10".into())],
        ..Default::default()
    })
    .await;
    let ch = cluster.channel("sue", &["ray"]).await;
    let mut sue = cluster.connect(0, "sue").await;
    send_delivered(&mut sue, &ch, "m", 20).await;
    let mut ray = connect_since(&cluster, 1, "ray", json!({ch.clone(): 5})).await;
    let (replayed, recovered) = until_recovered(&mut ray, &ch).await;
    assert!(replayed.is_empty(), "{replayed:?}");
    assert_eq!(
        recovered,
        json!({"channelId": ch, "recovered": false, "lastSeq": 20})
    );
    // Exactly the bound is still replayed.
    let mut ray2 = connect_since(&cluster, 0, "ray", json!({ch.clone(): 10})).await;
    let (replayed, recovered) = until_recovered(&mut ray2, &ch).await;
    assert_eq!(seqs(&replayed), (11..=20).collect::<Vec<_>>());
    assert_eq!(recovered["recovered"], true);
    // Bad `since` entries are ignored: live only, no error.
    let mut ray3 = connect_since(
        &cluster,
        1,
        "ray",
        json!({ch.clone(): -3, "not-a-channel": 1}),
    )
    .await;
    assert!(ray3.next(Duration::from_millis(500)).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seam_has_no_hole_and_no_duplicate_under_traffic() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let ch = cluster.channel("tia", &["tom"]).await;
    let tia = cluster.connect(0, "tia").await;
    let (emitter, _rx) = tia.split();
    let total = 300;
    let ch2 = ch.clone();
    let sender = tokio::spawn(async move {
        for i in 0..total {
            emitter
                .emit(
                    "message:send",
                    &json!({"content": format!("s {i}"), "channelId": ch2, "tempId": format!("s-{i}")}),
                )
                .await
                .expect("emit");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    // Join in the middle of the stream, twice: at the handshake and on demand.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut tom = connect_since(&cluster, 1, "tom", json!({ch.clone(): 0})).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let mut tom2 = cluster.connect(0, "tom").await;
    let sync = tom2
        .call("channel:sync", &json!({"channelId": ch, "afterSeq": 0}), T)
        .await
        .expect("sync ack");
    assert_eq!(sync["ok"], true, "{sync}");
    assert_eq!(sync["recovered"], true, "{sync}");
    sender.await.expect("sender");

    for (name, c) in [("since", &mut tom), ("sync", &mut tom2)] {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut got = Vec::new();
        while Instant::now() < deadline && got.last() != Some(&(total as i64)) {
            if let Some(e) = c.next(Duration::from_millis(200)).await {
                if e.name == "message:created" {
                    got.push(e.data["message"]["seq"].as_i64().unwrap_or(-1));
                }
            }
        }
        // tom2 also got live messages of its room before the sync: from the
        // sync's replay on, the sequence starts again at 1.
        let from = got.iter().rposition(|s| *s == 1).unwrap_or(0);
        assert_eq!(
            got[from..].to_vec(),
            (1..=total as i64).collect::<Vec<_>>(),
            "{name}: every message once, in order, across the seam\n{}",
            cluster.logs()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_sync_refuses_bad_input() {
    let cluster = Cluster::start(ClusterOptions {
        gateways: 1,
        workers: 1,
        ..Default::default()
    })
    .await;
    let ch = cluster.channel("uma", &[]).await;
    let other = cluster.channel("vic", &[]).await;
    let uma = cluster.connect(0, "uma").await;
    for (payload, error) in [
        (json!({"afterSeq": 0}), "channelId is required"),
        (
            json!({"channelId": ch, "afterSeq": -1}),
            "afterSeq must be a non-negative integer",
        ),
        (
            json!({"channelId": ch, "afterSeq": "3"}),
            "afterSeq must be a non-negative integer",
        ),
        (
            json!({"channelId": ch}),
            "afterSeq must be a non-negative integer",
        ),
        (
            json!({"channelId": other, "afterSeq": 0}),
            "Not a member of this channel",
        ),
        (
            json!({"channelId": "x", "afterSeq": 0}),
            "Not a member of this channel",
        ),
    ] {
        let ack = uma.call("channel:sync", &payload, T).await.expect("ack");
        assert_eq!(ack, json!({"ok": false, "error": error}), "{payload}");
    }
    let ack = uma
        .call("channel:sync", &json!({"channelId": ch, "afterSeq": 7}), T)
        .await
        .expect("ack");
    assert_eq!(
        ack,
        json!({"ok": true, "channelId": ch, "recovered": true, "fromSeq": 8, "toSeq": 7}),
        "afterSeq beyond the latest: nothing to replay"
    );
}
