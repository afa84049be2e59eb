//! Multi-process behaviour of a cluster: several gateways and workers, real
//! Redis and PostgreSQL, the Rust Socket.IO client. Each test asserts what a
//! chat user would observe.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{json, Value};
use support::*;
use switchboard_loadtest::client::{Client, Target};

fn temp_ids(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["tempId"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn ids(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["message"]["id"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// First occurrences only, in order (a receiver may see a redelivered event twice).
fn first_occurrences(v: Vec<String>) -> Vec<String> {
    let mut seen = HashSet::new();
    v.into_iter().filter(|x| seen.insert(x.clone())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_url_readings_share_rooms_across_nodes() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let ch = cluster.channel("ann", &["bob"]).await;
    let auth_bob = cluster.minter.auth("bob").expect("auth");
    // Bob on node 1 through the namespace reading, Ann on node 0 through the path reading.
    let mut bob = Client::connect(&Target::seed_namespace(&cluster.urls[1]), auth_bob)
        .await
        .expect("connect");
    let ok = bob
        .wait_for("connection:success", |_| true, T)
        .await
        .expect("success");
    assert_eq!(ok["userId"], "bob");
    assert_eq!(ok["channels"], json!([ch]));
    let ann = cluster.connect(0, "ann").await;
    let ack = ann
        .call(
            "message:send",
            &json!({"content": "hi", "channelId": ch, "tempId": "a1"}),
            T,
        )
        .await
        .expect("ack");
    assert_eq!(ack["status"], "DELIVERED", "{ack}");
    let created = bob
        .wait_for("message:created", |_| true, T)
        .await
        .expect("created on the other node");
    assert_eq!(created["message"]["content"], "hi");
    assert_eq!(created["message"]["id"], ack["messageId"]);
    assert_eq!(ok["positions"], json!({ch.clone(): 0}), "no message yet");
    // A later connection learns where the channel stands (CONTRACT §9).
    let mut again = Client::connect(
        &Target::seed_namespace(&cluster.urls[0]),
        cluster.minter.auth("bob").expect("auth"),
    )
    .await
    .expect("connect");
    let ok = again
        .wait_for("connection:success", |_| true, T)
        .await
        .expect("success");
    assert_eq!(ok["positions"], json!({ch: created["message"]["seq"]}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_messages_reach_every_node_in_one_order() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let ch = cluster.channel("sam", &["r0", "r1", "r2", "r3"]).await;
    let mut sender = cluster.connect(0, "sam").await;
    let mut receivers = Vec::new();
    for (i, user) in ["r0", "r1", "r2", "r3"].iter().enumerate() {
        receivers.push(cluster.connect(i % 2, user).await);
    }
    let mut outsider = cluster.connect(1, "outsider").await;

    let n = 500;
    let sent = send_burst(&mut sender, &ch, "m", n).await;
    assert_eq!(
        sent.len(),
        n,
        "every message is accepted\n{}",
        cluster.logs()
    );

    let expected: Vec<String> = (0..n).map(|i| format!("m-{i}")).collect();
    for r in receivers.iter_mut() {
        let got = collect_created(r, n, Duration::from_secs(30)).await;
        assert_eq!(
            temp_ids(&got),
            expected,
            "in order, none lost, none duplicated"
        );
    }
    assert!(
        outsider.next(Duration::from_millis(300)).await.is_none(),
        "a non-member receives nothing"
    );
    let history = cluster.history("sam", &ch).await;
    let seqs: Vec<i64> = history
        .iter()
        .map(|m| m["seq"].as_i64().unwrap_or(-1))
        .collect();
    assert_eq!(
        seqs,
        (1..=n as i64).collect::<Vec<_>>(),
        "numbered 1..n in history"
    );
    let contents: Vec<String> = history
        .iter()
        .map(|m| m["content"].as_str().unwrap_or_default().to_string())
        .collect();
    let expected_contents: Vec<String> = (0..n).map(|i| format!("m {i}")).collect();
    assert_eq!(
        contents, expected_contents,
        "history order is delivery order"
    );

    // Catch-up (CONTRACT §6): afterSeq, oldest first, bounded.
    let path = format!("/api/channels/{ch}/messages");
    let (s, page) = cluster
        .api(
            1,
            "r0",
            "GET",
            &format!("{path}?afterSeq=490&limit=5"),
            None,
        )
        .await;
    assert_eq!(s, 200, "{page}");
    let seqs: Vec<i64> = page
        .as_array()
        .map(|a| a.iter().filter_map(|m| m["seq"].as_i64()).collect())
        .unwrap_or_default();
    assert_eq!(seqs, vec![491, 492, 493, 494, 495]);
    let (s, page) = cluster
        .api(1, "r0", "GET", &format!("{path}?afterSeq=500"), None)
        .await;
    assert_eq!((s, page), (200, json!([])), "nothing after the latest");
    for bad in ["-1", "x", "1.5"] {
        let (s, body) = cluster
            .api(1, "r0", "GET", &format!("{path}?afterSeq={bad}"), None)
            .await;
        assert_eq!(s, 400, "afterSeq={bad}: {body}");
    }
    let (s, _) = cluster
        .api(1, "outsider", "GET", &format!("{path}?afterSeq=0"), None)
        .await;
    assert_eq!(s, 403, "members only");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_worker_mid_burst_loses_nothing() {
    let mut cluster = Cluster::start(ClusterOptions::default()).await;
    let ch = cluster.channel("kim", &["kai"]).await;
    let mut sender = cluster.connect(0, "kim").await;
    let mut receiver = cluster.connect(1, "kai").await;

    let n = 400;
    let burst = async { send_burst(&mut sender, &ch, "k", n).await };
    let killer = async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        // Kill whichever worker; the channel's partition is on one of them.
        cluster.workers[0].kill9();
        cluster.workers[1].kill9();
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let (sent, _) = tokio::join!(burst, killer);
    // Fresh workers take over what the dead ones left pending.
    cluster.add_worker();
    cluster.add_worker();
    assert_eq!(sent.len(), n, "every message is accepted");

    let got = collect_created(&mut receiver, n, Duration::from_secs(40)).await;
    let delivered: HashSet<String> = ids(&got).into_iter().collect();
    let accepted: HashSet<String> = sent.values().cloned().collect();
    // At-least-once fan-out: a redelivered batch may announce a message
    // twice, so wait for the stragglers beyond `n` events too.
    let mut got = got;
    if delivered.len() < n {
        got.extend(collect_created(&mut receiver, n, Duration::from_secs(20)).await);
    }
    let delivered: HashSet<String> = ids(&got).into_iter().collect();
    assert_eq!(
        delivered,
        accepted,
        "every accepted message is delivered\n{}",
        cluster.logs()
    );

    let history = cluster.history("kim", &ch).await;
    let stored: Vec<String> = history
        .iter()
        .map(|m| m["id"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(stored.len(), n, "persisted exactly once");
    assert_eq!(stored.iter().cloned().collect::<HashSet<_>>(), accepted);
    // One sender's messages are stored in the order sent.
    let order: Vec<String> = history
        .iter()
        .map(|m| m["content"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(order, (0..n).map(|i| format!("k {i}")).collect::<Vec<_>>());
    assert_eq!(
        first_occurrences(ids(&got)),
        stored,
        "delivery order is history order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_resumes_after_a_redis_restart() {
    let mut redis = PrivateRedis::start();
    let cluster = Cluster::start(ClusterOptions {
        gateways: 2,
        workers: 1,
        redis_url: Some(redis.url()),
        env: vec![("OUTCOME_TIMEOUT_MS".into(), "5000".into())],
        ..Default::default()
    })
    .await;
    let ch = cluster.channel("rita", &["ravi"]).await;
    let sender = cluster.connect(0, "rita").await;
    let mut receiver = cluster.connect(1, "ravi").await;
    let before = sender
        .call(
            "message:send",
            &json!({"content": "before", "channelId": ch, "tempId": "b"}),
            T,
        )
        .await
        .expect("ack");
    assert_eq!(before["status"], "DELIVERED");
    receiver
        .wait_for("message:created", |_| true, T)
        .await
        .expect("before");

    // Redis restarts empty; the sockets stay connected to their gateways.
    redis.restart();

    // Messages flow again once everyone reconnected (retry while the
    // gateway's append still fails).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let ack = sender
            .call(
                "message:send",
                &json!({"content": "after", "channelId": ch, "tempId": format!("a{attempt}")}),
                T,
            )
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
        if ack["status"] == "DELIVERED" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no delivery after restart: {ack}\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let after = receiver
        .wait_for("message:created", |e| e["message"]["content"] == "after", T)
        .await;
    assert!(
        after.is_ok(),
        "the receiver's gateway re-subscribed after the restart\n{}",
        cluster.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_delays_messages_but_loses_none() {
    let proxy = FaultProxy::start("127.0.0.1:5432").await;
    let cluster = Cluster::start(ClusterOptions {
        gateways: 2,
        workers: 1,
        pg_hostport: Some(proxy.hostport()),
        ..Default::default()
    })
    .await;
    let ch = cluster.channel("dora", &["dan"]).await;
    let mut sender = cluster.connect(0, "dora").await;
    let mut receiver = cluster.connect(1, "dan").await;

    proxy.cut();
    let n = 20;
    let sent = send_burst(&mut sender, &ch, "d", n).await;
    assert_eq!(sent.len(), n, "accepted while the database is down");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        collect_created(&mut receiver, 1, Duration::from_millis(100))
            .await
            .is_empty(),
        "nothing is announced before it is stored"
    );
    proxy.restore();

    let got = collect_created(&mut receiver, n, Duration::from_secs(30)).await;
    assert_eq!(
        temp_ids(&got),
        (0..n).map(|i| format!("d-{i}")).collect::<Vec<_>>(),
        "all arrive, in order, once the database is back\n{}",
        cluster.logs()
    );
    assert_eq!(cluster.history("dora", &ch).await.len(), n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrations_are_safe() {
    // The cluster migrated once already; three more nodes migrating at the
    // same moment must all succeed and leave a working schema.
    let cluster = Cluster::start(ClusterOptions {
        gateways: 1,
        workers: 1,
        ..Default::default()
    })
    .await;
    let fresh = format!("{}_m", cluster.db);
    let admin = pg_admin_url();
    let status = std::process::Command::new("psql")
        .args([&admin, "-qAtc", &format!("CREATE DATABASE {fresh}")])
        .status()
        .expect("psql");
    assert!(status.success());
    let url = format!("postgres://postgres@127.0.0.1:5432/{fresh}");
    let children: Vec<_> = (0..3)
        .map(|_| {
            std::process::Command::new(bin("switchboard-worker"))
                .arg("migrate")
                .env("DATABASE_URL", &url)
                .env("REDIS_URL", redis_url())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn migrate")
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().expect("wait");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let tables = std::process::Command::new("psql")
        .args([
            &format!("postgres://postgres@127.0.0.1:5432/{fresh}"),
            "-qAtc",
            "SELECT count(*) || ' ' || count(DISTINCT version) FROM seaql_migrations",
        ])
        .output()
        .expect("psql");
    let counts = String::from_utf8_lossy(&tables.stdout).trim().to_string();
    let (rows, versions) = counts.split_once(' ').unwrap_or(("0", "?"));
    assert!(rows != "0", "migrations were applied");
    assert_eq!(rows, versions, "each migration applied once");
    let _ = std::process::Command::new("psql")
        .args([
            &admin,
            "-qAtc",
            &format!("DROP DATABASE {fresh} WITH (FORCE)"),
        ])
        .status();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_stream_refuses_at_once_and_keeps_what_it_accepted() {
    // No worker: entries pile up in the stream until STREAM_MAX_LEN.
    let mut cluster = Cluster::start(ClusterOptions {
        gateways: 1,
        workers: 0,
        env: vec![
            ("STREAM_MAX_LEN".into(), "3".into()),
            ("STREAM_PARTITIONS".into(), "1".into()),
        ],
        ..Default::default()
    })
    .await;
    let ch = cluster.channel("fay", &[]).await;
    let mut fay = cluster.connect(0, "fay").await;
    for i in 0..5 {
        fay.emit(
            "message:send",
            &json!({"content": format!("f {i}"), "channelId": ch, "tempId": format!("f{i}")}),
        )
        .await
        .expect("emit");
    }
    let mut sent = Vec::new();
    let mut failed = Vec::new();
    while sent.len() + failed.len() < 5 {
        let e = fay.next(T).await.expect("an answer for every message");
        match e.name.as_str() {
            "message:delivered" => {
                sent.push(e.data["tempId"].as_str().unwrap_or_default().to_string())
            }
            "message:failed" => {
                assert_eq!(e.data["error"], "Server is busy, please retry later");
                failed.push(e.data["tempId"].as_str().unwrap_or_default().to_string());
            }
            _ => {}
        }
    }
    assert_eq!(sent, ["f0", "f1", "f2"]);
    assert_eq!(failed, ["f3", "f4"]);
    // A worker arrives: what was accepted is delivered.
    cluster.add_worker();
    for t in ["f0", "f1", "f2"] {
        fay.wait_for(
            "message:delivered",
            |d| d["tempId"] == t && d["status"] == "DELIVERED",
            T,
        )
        .await
        .expect("delivered once a worker runs");
    }
    assert_eq!(cluster.history("fay", &ch).await.len(), 3);
}

/// The worker's `THP_enabled` flag (`/proc/<pid>/status`) once it runs.
async fn worker_thp(cluster: &mut Cluster) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let w = &mut cluster.workers[0];
    while !w.log_tail().contains("worker started") {
        assert!(!w.exited(), "the worker exited: {}", w.log_tail());
        assert!(
            std::time::Instant::now() < deadline,
            "the worker never started"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = std::fs::read_to_string(format!("/proc/{}/status", w.pid())).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .map(|v| v.trim().to_string())
        .expect("THP_enabled line")
}

/// An operator's worker does not hold mimalloc's arenas in transparent huge
/// pages (they doubled its memory on a THP `always` host, worker/src/main.rs),
/// unless `MIMALLOC_ALLOW_THP` says otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_runs_without_transparent_huge_pages_unless_told() {
    // The workers inherit this environment: the first one must not get the option.
    assert!(
        std::env::var_os("MIMALLOC_ALLOW_THP").is_none(),
        "run the tests without MIMALLOC_ALLOW_THP"
    );
    let one_worker = |env: Vec<(String, String)>| ClusterOptions {
        gateways: 0,
        workers: 1,
        env,
        ..Default::default()
    };
    let mut default = Cluster::start(one_worker(Vec::new())).await;
    assert_eq!(worker_thp(&mut default).await, "0");
    let mut kept =
        Cluster::start(one_worker(vec![("MIMALLOC_ALLOW_THP".into(), "1".into())])).await;
    assert_eq!(worker_thp(&mut kept).await, "1");
}
