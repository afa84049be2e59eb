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
    let answers = burst(&mut s, &ch, "b1", 30).await;
    let accepted = check_refusals(&answers);
    // 20, or 21 if a token refilled while the burst was in flight.
    assert!((20..=21).contains(&accepted), "accepted {accepted} of 30");
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
    let (a0, a1) = tokio::join!(burst(&mut s0, &ch, "g0", 15), burst(&mut s1, &ch, "g1", 15));
    let accepted = check_refusals(&a0) + check_refusals(&a1);
    assert!(
        (20..=21).contains(&accepted),
        "one bucket for the user across nodes: accepted {accepted} of 30"
    );
}
