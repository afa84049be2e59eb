//! Per-user rate limits (issue 11, finding 5; CONTRACT §10) with the
//! contract's defaults: `message:send` 10/s, burst 20, one bucket per user
//! across the cluster, checked inside the append script.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;
use switchboard_loadtest::client::Client;

fn limited() -> ClusterOptions {
    ClusterOptions {
        env: vec![
            ("RATE_MESSAGES_PER_S".into(), "10".into()),
            ("RATE_MESSAGES_BURST".into(), "20".into()),
        ],
        ..Default::default()
    }
}

/// Sends `n` messages pipelined; returns the first answer of each, by tempId:
/// `Ok(())` for SENT, `Err(payload)` for `message:failed`.
async fn burst(
    c: &mut Client,
    channel: &str,
    prefix: &str,
    n: usize,
) -> HashMap<String, Result<(), Value>> {
    for i in 0..n {
        c.emit(
            "message:send",
            &json!({"content": format!("{prefix} {i}"), "channelId": channel, "tempId": format!("{prefix}-{i}")}),
        )
        .await
        .expect("emit");
    }
    let mut out = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while out.len() < n && Instant::now() < deadline {
        if let Some(e) = c.next(Duration::from_millis(100)).await {
            let Some(temp) = e.data["tempId"].as_str().map(String::from) else {
                continue;
            };
            if !temp.starts_with(prefix) {
                continue;
            }
            if e.name == "message:delivered" && e.data["status"] == "SENT" {
                out.entry(temp).or_insert(Ok(()));
            } else if e.name == "message:failed" {
                out.entry(temp).or_insert(Err(e.data));
            }
        }
    }
    assert_eq!(out.len(), n, "every send answered");
    out
}

fn check_refusals(answers: &HashMap<String, Result<(), Value>>) -> usize {
    let mut accepted = 0;
    for a in answers.values() {
        match a {
            Ok(()) => accepted += 1,
            Err(f) => {
                assert_eq!(f["error"], "Rate limit exceeded", "{f}");
                assert_eq!(f["status"], "FAILED");
                let ms = f["retryAfterMs"].as_u64().expect("retryAfterMs");
                assert!((1..=2000).contains(&ms), "{f}");
            }
        }
    }
    accepted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_thirty_takes_twenty_then_refills() {
    let c = Cluster::start(limited()).await;
    let ch = c.channel("rl", &[]).await;
    let mut s = c.connect(0, "rl").await;
    let started = Instant::now();
    let answers = burst(&mut s, &ch, "b1", 30).await;
    let accepted = check_refusals(&answers);
    // 20, or more if tokens refilled while the burst was in flight.
    let most = 20 + refilled(started, 10.0);
    assert!((20..=most).contains(&accepted), "accepted {accepted} of 30");
    // Sends are taken in order: the first 20 are the accepted ones.
    for i in 0..20 {
        assert!(answers[&format!("b1-{i}")].is_ok(), "send {i} refused");
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let again = burst(&mut s, &ch, "b2", 5).await;
    assert_eq!(check_refusals(&again), 5, "accepted again after waiting");
    // Another user is not affected by this one's limit.
    let ch2 = c.channel("rl2", &[]).await;
    let mut other = c.connect(1, "rl2").await;
    let theirs = burst(&mut other, &ch2, "o", 20).await;
    assert_eq!(check_refusals(&theirs), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limit_holds_across_two_gateways() {
    let c = Cluster::start(limited()).await;
    let ch = c.channel("two", &[]).await;
    let mut s0 = c.connect(0, "two").await;
    let mut s1 = c.connect(1, "two").await;
    let started = Instant::now();
    let (a0, a1) = tokio::join!(burst(&mut s0, &ch, "g0", 15), burst(&mut s1, &ch, "g1", 15));
    let accepted = check_refusals(&a0) + check_refusals(&a1);
    let most = 20 + refilled(started, 10.0);
    assert!(
        (20..=most).contains(&accepted),
        "one bucket for the user across nodes: accepted {accepted} of 30"
    );
}

fn all_areas() -> ClusterOptions {
    let mut o = limited();
    for (k, v) in [
        ("RATE_REACTIONS_PER_S", "20"),
        ("RATE_REACTIONS_BURST", "40"),
        ("RATE_CHANNELS_PER_S", "5"),
        ("RATE_CHANNELS_BURST", "10"),
        ("RATE_REST_PER_S", "10"),
        ("RATE_REST_BURST", "20"),
    ] {
        o.env.push((k.into(), v.into()));
    }
    o
}

/// Tokens a bucket of `per_s` can have refilled since `started`, plus one
/// for a token that was almost there: the slack of a count taken on a
/// machine of unknown speed.
fn refilled(started: Instant, per_s: f64) -> usize {
    (started.elapsed().as_secs_f64() * per_s).ceil() as usize + 1
}

/// The other areas with the contract's defaults: `channel:*` 5/s burst 10,
/// `message:read`/`reaction:*` 20/s burst 40, REST writes 10/s burst 20.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_area_has_its_bucket() {
    let c = Cluster::start(all_areas()).await;
    let ch = c.channel("areas", &[]).await;
    let mut s = c.connect(0, "areas").await;

    // channel:sync, answered one by one, until the first refusal. Tokens
    // refill while the calls run (a loaded machine is slow), so the bound
    // is the burst plus what refilled meanwhile.
    let mut ok = 0;
    let mut limited = Vec::new();
    let started = Instant::now();
    for _ in 0..60 {
        let a = s
            .call("channel:sync", &json!({"channelId": ch, "afterSeq": 0}), T)
            .await
            .expect("ack");
        if a["ok"] == true {
            ok += 1;
        } else {
            assert_eq!(a["error"], "Rate limit exceeded", "{a}");
            assert!(a["retryAfterMs"].as_u64().unwrap_or(0) > 0, "{a}");
            limited.push(a);
            break;
        }
    }
    let most = 10 + refilled(started, 5.0);
    assert!(
        !limited.is_empty() && (10..=most).contains(&ok),
        "channel:sync accepted {ok} before a refusal (burst 10, at most {most} with the refill)"
    );
    let err = s
        .wait_for("channel:error", |d| d["error"] == "Rate limit exceeded", T)
        .await
        .expect("channel:error");
    assert_eq!(err["channelId"], ch.as_str());
    assert!(err["retryAfterMs"].as_u64().unwrap_or(0) > 0);

    // message:read, pipelined (for an unknown message: the limit comes first).
    let bogus = uuid::Uuid::now_v7().to_string();
    let started = Instant::now();
    for _ in 0..60 {
        s.emit("message:read", &json!({"messageId": bogus}))
            .await
            .expect("emit");
    }
    let mut errors = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while errors.len() < 60 && Instant::now() < deadline {
        if let Some(e) = s.next(Duration::from_millis(100)).await {
            if e.name == "message:error" {
                errors.push(e.data);
            }
        }
    }
    assert_eq!(errors.len(), 60, "every read answered");
    let most = 40 + refilled(started, 20.0);
    let rate_limited = errors
        .iter()
        .filter(|e| e["error"] == "Rate limit exceeded")
        .inspect(|e| {
            assert_eq!(e["messageId"], bogus.as_str());
            assert!(e["retryAfterMs"].as_u64().unwrap_or(0) > 0);
        })
        .count();
    let passed = 60 - rate_limited;
    assert!(
        rate_limited > 0 && (40..=most).contains(&passed),
        "message:read let {passed} of 60 through (burst 40, at most {most} with the refill)"
    );

    // REST writes: 429 with Retry-After, after the burst.
    let client = reqwest::Client::new();
    let mut created = 0;
    let mut refused = None;
    let started = Instant::now();
    for i in 0..60 {
        let r = client
            .post(format!("{}/api/channels", c.urls[1]))
            .bearer_auth(c.token("rester"))
            .json(&json!({"name": format!("c{i}")}))
            .send()
            .await
            .expect("post");
        match r.status().as_u16() {
            201 => created += 1,
            429 => {
                let retry = r
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .expect("Retry-After");
                assert!(retry >= 1);
                let body: Value = r.json().await.unwrap_or_default();
                assert_eq!(body["error"], "Rate limit exceeded");
                refused = Some(body);
                break;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    let most = 20 + refilled(started, 10.0);
    assert!(
        refused.is_some() && (20..=most).contains(&created),
        "REST created {created} before a 429 (burst 20, at most {most} with the refill)"
    );
    // Reads are not limited.
    for _ in 0..30 {
        let (st, _) = c.api(1, "rester", "GET", "/api/channels", None).await;
        assert_eq!(st, 200);
    }
}
