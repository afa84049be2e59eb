//! Every accepted write gets exactly one final outcome, and every connected
//! member gets every message exactly once, in order — across an empty Redis
//! restart and a killed pub/sub connection (CONTRACT §4, §9; issue 14).
//!
//! Each test runs its own `redis-server` so that restarting it or killing
//! its connections disturbs no other test.

mod support;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;
use switchboard_loadtest::client::{Emitter, Event};
use switchboard_shared::protocol::errors;
use tokio::sync::mpsc::UnboundedReceiver;

/// What one sender observed, by tempId.
#[derive(Default, Debug)]
struct Seen {
    /// Message id of the `SENT` answer.
    sent: HashMap<String, String>,
    /// Every final answer (DELIVERED or FAILED).
    finals: HashMap<String, Vec<Value>>,
}

impl Seen {
    fn take(&mut self, e: &Event) {
        let temp = e.data["tempId"].as_str().unwrap_or_default().to_string();
        match (e.name.as_str(), e.data["status"].as_str()) {
            ("message:delivered", Some("SENT")) => {
                let id = e.data["messageId"].as_str().unwrap_or_default();
                self.sent.insert(temp, id.to_string());
            }
            ("message:delivered", Some("DELIVERED")) | ("message:failed", _) => {
                self.finals.entry(temp).or_default().push(e.data.clone());
            }
            _ => {}
        }
    }
}

/// Reads `rx` until every tempId in `expected` has a final answer (or the
/// timeout), then half a second more to catch a second answer.
async fn settle(
    rx: &mut UnboundedReceiver<Event>,
    seen: &mut Seen,
    expected: &[String],
    timeout: Duration,
) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline && !expected.iter().all(|t| seen.finals.contains_key(t)) {
        if let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
            seen.take(&e);
        }
    }
    let grace = Instant::now() + Duration::from_millis(500);
    while Instant::now() < grace {
        if let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(100), rx.recv()).await {
            seen.take(&e);
        }
    }
}

/// Drains `message:created` events of a receiver until `want` distinct ids
/// arrived or the timeout passed; returns the ids in arrival order.
async fn received_ids(
    rx: &mut UnboundedReceiver<Event>,
    want: &HashSet<String>,
    timeout: Duration,
) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut distinct = HashSet::new();
    while Instant::now() < deadline && !want.iter().all(|w| distinct.contains(w)) {
        if let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
            if e.name == "message:created" {
                let id = e.data["message"]["id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                distinct.insert(id.clone());
                got.push(id);
            }
        }
    }
    // Anything more that arrives now would be a duplicate.
    let grace = Instant::now() + Duration::from_millis(500);
    while Instant::now() < grace {
        if let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(100), rx.recv()).await {
            if e.name == "message:created" {
                got.push(
                    e.data["message"]["id"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                );
            }
        }
    }
    got
}

/// Checks the outcome guarantee against the database: one final answer per
/// send; DELIVERED ⇔ stored (with the SENT id); a FAILED after SENT says
/// the resend is safe.
fn check_outcomes(seen: &Seen, expected: &[String], stored: &HashMap<String, String>, logs: &str) {
    for t in expected {
        let finals = seen.finals.get(t).cloned().unwrap_or_default();
        assert_eq!(
            finals.len(),
            1,
            "send {t}: exactly one final answer, got {finals:?}\n{logs}"
        );
        let answer = &finals[0];
        match answer["status"].as_str() {
            Some("DELIVERED") => {
                let id = answer["messageId"].as_str().unwrap_or_default();
                assert_eq!(
                    stored.get(t).map(String::as_str),
                    Some(id),
                    "send {t}: DELIVERED means stored with that id"
                );
                assert_eq!(seen.sent.get(t).map(String::as_str), Some(id));
            }
            _ => {
                assert!(
                    !stored.contains_key(t),
                    "send {t}: FAILED but stored: {answer}"
                );
                if seen.sent.contains_key(t) {
                    assert_eq!(
                        answer["error"],
                        errors::OUTCOME_UNKNOWN,
                        "send {t}: an accepted send that failed says resending is safe"
                    );
                }
            }
        }
    }
    for t in stored.keys() {
        assert!(expected.contains(t), "a stored message nobody sent: {t}");
    }
}

/// tempIds are not in the history shape; the content carries them.
fn stored_by_content(history: &[Value]) -> HashMap<String, String> {
    history
        .iter()
        .filter_map(|m| {
            Some((
                m["content"].as_str()?.to_string(),
                m["id"].as_str()?.to_string(),
            ))
        })
        .collect()
}

/// A 2-gateway, 1-worker cluster on `redis` with `sender` on node 0 and
/// `receiver` on node 1, both members of one channel.
struct Scene {
    cluster: Cluster,
    channel: String,
    sender: Emitter,
    sender_rx: UnboundedReceiver<Event>,
    /// Kept so the receiver's connection stays open.
    _receiver: Emitter,
    receiver_rx: UnboundedReceiver<Event>,
}

impl Scene {
    async fn start(redis: &PrivateRedis, outcome_timeout_ms: u64, users: [&str; 2]) -> Scene {
        let cluster = Cluster::start(ClusterOptions {
            gateways: 2,
            workers: 1,
            redis_url: Some(redis.url()),
            env: vec![("OUTCOME_TIMEOUT_MS".into(), outcome_timeout_ms.to_string())],
            ..Default::default()
        })
        .await;
        let channel = cluster.channel(users[0], &[users[1]]).await;
        let (sender, sender_rx) = cluster.connect(0, users[0]).await.split();
        let (receiver, receiver_rx) = cluster.connect(1, users[1]).await.split();
        Scene {
            cluster,
            channel,
            sender,
            sender_rx,
            _receiver: receiver,
            receiver_rx,
        }
    }

    /// Waits for every send's final answer and checks the answers against
    /// the database (as `owner`); returns the history and what is stored.
    async fn check(
        &mut self,
        seen: &mut Seen,
        expected: &[String],
        owner: &str,
    ) -> (Vec<Value>, HashMap<String, String>) {
        settle(&mut self.sender_rx, seen, expected, Duration::from_secs(20)).await;
        let history = self.cluster.history(owner, &self.channel).await;
        let stored = stored_by_content(&history);
        check_outcomes(seen, expected, &stored, &self.cluster.logs());
        (history, stored)
    }

    /// Sends `prefix-<i>` messages every `pause` while `go(i, elapsed)`
    /// says so (it may also inject a fault); returns the tempIds sent.
    async fn send_while(
        &mut self,
        seen: &mut Seen,
        prefix: &str,
        pause: Duration,
        mut go: impl FnMut(usize, Duration) -> bool,
    ) -> Vec<String> {
        let started = Instant::now();
        let mut sent = Vec::new();
        while go(sent.len(), started.elapsed()) {
            let temp = format!("{prefix}-{}", sent.len());
            self.sender
                .emit(
                    "message:send",
                    &json!({"content": temp, "channelId": self.channel, "tempId": temp}),
                )
                .await
                .expect("emit");
            sent.push(temp);
            while let Ok(e) = self.sender_rx.try_recv() {
                seen.take(&e);
            }
            tokio::time::sleep(pause).await;
        }
        sent
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_send_around_an_empty_redis_restart_gets_one_outcome() {
    let mut redis = PrivateRedis::start();
    let mut scene = Scene::start(&redis, 4000, ["rita", "ravi"]).await;
    // A steady stream of sends for 3 s; Redis restarts empty after 0.8 s.
    let mut seen = Seen::default();
    let mut restarted = false;
    let expected = scene
        .send_while(&mut seen, "r", Duration::from_millis(15), |_, elapsed| {
            if !restarted && elapsed > Duration::from_millis(800) {
                redis.restart();
                restarted = true;
            }
            elapsed < Duration::from_millis(3000)
        })
        .await;
    let (_, stored) = scene.check(&mut seen, &expected, "rita").await;
    let Scene {
        cluster,
        channel: ch,
        mut receiver_rx,
        ..
    } = scene;
    assert!(
        stored.len() * 2 > expected.len(),
        "most sends went through ({} of {})",
        stored.len(),
        expected.len()
    );

    // Whatever the receiver got is stored, at most once each; and after the
    // restart fan-out works again end to end.
    let after = cluster
        .connect(0, "rita")
        .await
        .call(
            "message:send",
            &json!({"content": "after", "channelId": ch, "tempId": "after"}),
            T,
        )
        .await
        .expect("ack");
    assert_eq!(after["status"], "DELIVERED", "{after}\n{}", cluster.logs());
    let want: HashSet<String> =
        [after["messageId"].as_str().unwrap_or_default().to_string()].into();
    let got = received_ids(&mut receiver_rx, &want, T).await;
    assert!(
        got.iter().any(|id| want.contains(id)),
        "the receiver's gateway listens again after the restart\n{}",
        cluster.logs()
    );
    let all_stored: HashSet<&String> = stored.values().collect();
    let mut once = HashSet::new();
    for id in got.iter().filter(|id| !want.contains(*id)) {
        assert!(
            all_stored.contains(id),
            "received {id}, which is not stored"
        );
        assert!(once.insert(id.clone()), "received {id} twice");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_pubsub_connection_loses_no_outcome_and_no_message() {
    let redis = PrivateRedis::start();
    let mut scene = Scene::start(&redis, 5000, ["kate", "kurt"]).await;
    // Every gateway's pub/sub connection is cut, three times, while the
    // worker publishes outcomes and messages.
    let n = 300;
    let mut seen = Seen::default();
    let expected = scene
        .send_while(&mut seen, "k", Duration::from_millis(5), |i, _| {
            if i % 80 == 40 {
                let out = std::process::Command::new("redis-cli")
                    .args([
                        "-p",
                        &redis.port.to_string(),
                        "CLIENT",
                        "KILL",
                        "TYPE",
                        "pubsub",
                    ])
                    .output()
                    .expect("redis-cli");
                assert!(out.status.success());
            }
            i < n
        })
        .await;
    let (history, stored) = scene.check(&mut seen, &expected, "kate").await;
    let Scene {
        cluster,
        mut receiver_rx,
        ..
    } = scene;
    assert_eq!(
        stored.len(),
        n,
        "Redis kept running: every send is stored\n{}",
        cluster.logs()
    );
    let delivered: Vec<String> = expected
        .iter()
        .map(|t| {
            seen.finals[t][0]["status"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert!(delivered.iter().all(|s| s == "DELIVERED"), "{delivered:?}");

    // The receiver, on the other gateway, never reconnected: it holds every
    // message exactly once, in history order.
    let order: Vec<String> = history
        .iter()
        .map(|m| m["id"].as_str().unwrap_or_default().to_string())
        .collect();
    let want: HashSet<String> = order.iter().cloned().collect();
    let got = received_ids(&mut receiver_rx, &want, Duration::from_secs(20)).await;
    assert_eq!(
        got,
        order,
        "every message once, in order\n{}",
        cluster.logs()
    );
}
