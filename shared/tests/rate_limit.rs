//! The token bucket folded into the append (CONTRACT §10) on both backends:
//! a burst of 30 appends with burst 20 at 10/s takes 20, then refuses with a
//! retry-after; after waiting, appends are taken again; a full stream takes
//! no token. The Redis half runs against `TEST_REDIS_URL` (default local).

use std::time::Duration;

use bytes::Bytes;
use switchboard_shared::bus::memory::MemoryBus;
use switchboard_shared::bus::redis::RedisBus;
use switchboard_shared::bus::{Bus, BusError, RateLimit, Topics};

fn limit(topics: &Topics, user: &str) -> RateLimit {
    RateLimit {
        key: topics.rate("messages", user),
        per_s: 10.0,
        burst: 20.0,
    }
}

async fn burst_then_refill(bus: &dyn Bus, topics: &Topics) {
    let l = limit(topics, "u1");
    let entries: Vec<(u32, Bytes)> = (0..30).map(|i| (i % 3, Bytes::from_static(b"x"))).collect();
    let results = bus.append_many_limited(entries, Some(l.clone())).await;
    let accepted = results.iter().filter(|r| r.is_ok()).count();
    // 20, or 21 if the pipeline itself took over 100 ms (one token refilled).
    assert!(
        (20..=21).contains(&accepted),
        "burst of 20 (one bucket over all partitions): {accepted}"
    );
    for r in &results[accepted..] {
        match r {
            Err(BusError::RateLimited { retry_after_ms }) => {
                assert!(
                    *retry_after_ms > 0 && *retry_after_ms <= 100,
                    "{retry_after_ms}"
                )
            }
            other => panic!("expected RateLimited, got {other:?}"),
        }
    }
    // Another user has their own bucket.
    let other = bus
        .append_many_limited(
            vec![(0, Bytes::from_static(b"y"))],
            Some(limit(topics, "u2")),
        )
        .await;
    assert!(other[0].is_ok());
    // 10/s: after 250 ms, two tokens are back.
    tokio::time::sleep(Duration::from_millis(250)).await;
    let again = bus
        .append_many_limited(
            (0..3).map(|_| (0, Bytes::from_static(b"z"))).collect(),
            Some(l),
        )
        .await;
    let refilled = again.iter().filter(|r| r.is_ok()).count();
    assert!((2..=3).contains(&refilled), "{again:?}");
}

#[tokio::test]
async fn memory_bucket() {
    let bus = MemoryBus::new(100_000);
    burst_then_refill(&bus, &Topics::new("mem")).await;
}

#[tokio::test]
async fn memory_full_stream_takes_no_token() {
    let bus = MemoryBus::new(1);
    let topics = Topics::new("mem");
    let l = limit(&topics, "u");
    let r = bus
        .append_many_limited(
            (0..3).map(|_| (0, Bytes::from_static(b"x"))).collect(),
            Some(l.clone()),
        )
        .await;
    assert!(r[0].is_ok());
    assert!(matches!(r[1], Err(BusError::Full)));
    assert!(matches!(r[2], Err(BusError::Full)));
    // 19 tokens are left for another partition.
    let r = bus
        .append_many_limited(
            (0..19).map(|i| (1 + i, Bytes::from_static(b"x"))).collect(),
            Some(l),
        )
        .await;
    assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
}

#[tokio::test]
async fn redis_bucket() {
    let url = std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let prefix = format!("sbrl:{}", uuid::Uuid::now_v7().simple());
    let bus = RedisBus::connect(&url, &prefix, 100_000)
        .await
        .expect("redis");
    let topics = Topics::new(&prefix);
    burst_then_refill(&bus, &topics).await;
    // Unlimited appends are unaffected.
    let r = bus
        .append_many_limited(
            (0..30).map(|_| (0, Bytes::from_static(b"x"))).collect(),
            None,
        )
        .await;
    assert!(r.iter().all(|r| r.is_ok()));
    let _ = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "redis-cli --scan --pattern '{prefix}:*' | xargs -r redis-cli del > /dev/null"
        ))
        .status();
}

/// The standalone bucket of the non-hot-path areas, on both backends.
async fn token_bucket(bus: &dyn Bus, topics: &Topics) {
    let l = RateLimit {
        key: topics.rate("channels", "u"),
        per_s: 5.0,
        burst: 10.0,
    };
    let mut ok = 0;
    let mut waits = Vec::new();
    for _ in 0..15 {
        match bus.take_token(&l).await.expect("bucket") {
            Ok(()) => ok += 1,
            Err(ms) => waits.push(ms),
        }
    }
    assert!((10..=11).contains(&ok), "{ok}");
    assert!(waits.iter().all(|ms| (1..=200).contains(ms)), "{waits:?}");
}

#[tokio::test]
async fn memory_token_bucket() {
    token_bucket(&MemoryBus::new(10), &Topics::new("mem")).await;
}

#[tokio::test]
async fn redis_token_bucket() {
    let url = std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let prefix = format!("sbrl:{}", uuid::Uuid::now_v7().simple());
    let bus = RedisBus::connect(&url, &prefix, 10).await.expect("redis");
    token_bucket(&bus, &Topics::new(&prefix)).await;
    let _ = std::process::Command::new("redis-cli")
        .args(["del", &format!("{prefix}:rate:channels:u")])
        .status();
}
