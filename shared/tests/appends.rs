//! Appends of many concurrent senders, on both backends. On Redis they are
//! grouped into few script calls while one is in flight (`bus::redis::
//! appends`): each sender must still see its own results, its own token
//! bucket, and its entries in the stream in the order it sent them. The
//! Redis half runs against `TEST_REDIS_URL` (default local).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use switchboard_shared::bus::memory::MemoryBus;
use switchboard_shared::bus::redis::RedisBus;
use switchboard_shared::bus::{Bus, BusError, RateLimit, Topics};

const SENDERS: u32 = 40;
const PARTITIONS: u32 = 4;

/// Each sender, like a socket's inbox, sends three batches of two one after
/// the other with a bucket of 4 (refilling far slower than the test runs):
/// 4 accepted, then 2 refused; the stream holds each sender's accepted
/// entries once, in order.
async fn many_senders(bus: Arc<dyn Bus>, topics: Topics) {
    let mut tasks = Vec::new();
    for s in 0..SENDERS {
        let bus = bus.clone();
        let limit = RateLimit {
            key: topics.rate("messages", &format!("sender{s}")),
            per_s: 0.01,
            burst: 4.0,
        };
        tasks.push(tokio::spawn(async move {
            let mut results = Vec::new();
            for batch in 0..3 {
                let entries = (0..2)
                    .map(|k| {
                        let seq = batch * 2 + k;
                        (s % PARTITIONS, Bytes::from(format!("{s}:{seq}")))
                    })
                    .collect();
                results.extend(bus.append_many_limited(entries, Some(limit.clone())).await);
            }
            results
        }));
    }
    for (s, task) in tasks.into_iter().enumerate() {
        let results = task.await.expect("sender");
        assert_eq!(results.len(), 6);
        assert!(
            results[..4].iter().all(Result::is_ok),
            "sender {s}: {results:?}"
        );
        assert!(
            results[4..]
                .iter()
                .all(|r| matches!(r, Err(BusError::RateLimited { .. }))),
            "sender {s}: {results:?}"
        );
    }

    let partitions: Vec<u32> = (0..PARTITIONS).collect();
    let mut seen: HashMap<u32, Vec<u32>> = HashMap::new();
    let mut total = 0;
    loop {
        let batches = bus
            .read(&partitions, "reader", 1000, Duration::from_millis(50))
            .await
            .expect("read");
        if batches.iter().all(|b| b.entries.is_empty()) {
            break;
        }
        for b in batches {
            for e in b.entries {
                let text = String::from_utf8(e.payload.to_vec()).expect("utf8");
                let (s, seq) = text.split_once(':').expect("s:seq");
                let (s, seq): (u32, u32) = (s.parse().expect("s"), seq.parse().expect("seq"));
                assert_eq!(b.partition, s % PARTITIONS, "{text} in its partition");
                seen.entry(s).or_default().push(seq);
                total += 1;
            }
        }
    }
    assert_eq!(total, SENDERS * 4, "each accepted entry once");
    for s in 0..SENDERS {
        assert_eq!(seen.get(&s), Some(&vec![0, 1, 2, 3]), "sender {s} in order");
    }
}

/// A full stream refuses an entry (and takes no token) while the other
/// entries of the same call go on.
async fn full_stream_among_others(bus: Arc<dyn Bus>, topics: Topics) {
    let limit = RateLimit {
        key: topics.rate("messages", "full-user"),
        per_s: 0.01,
        burst: 3.0,
    };
    // max_len is 10 in these buses: partition 9 fills up.
    let fill: Vec<(u32, Bytes)> = (0..10).map(|_| (9, Bytes::from_static(b"f"))).collect();
    assert!(bus.append_many(fill).await.iter().all(Result::is_ok));
    let r = bus
        .append_many_limited(
            vec![
                (9, Bytes::from_static(b"x")),
                (8, Bytes::from_static(b"y")),
                (9, Bytes::from_static(b"z")),
                (8, Bytes::from_static(b"w")),
                (8, Bytes::from_static(b"v")),
                (8, Bytes::from_static(b"u")),
            ],
            Some(limit),
        )
        .await;
    assert!(matches!(r[0], Err(BusError::Full)), "{r:?}");
    assert!(r[1].is_ok(), "{r:?}");
    assert!(matches!(r[2], Err(BusError::Full)), "{r:?}");
    // Three tokens, none taken by the refused entries.
    assert!(r[3].is_ok() && r[4].is_ok(), "{r:?}");
    assert!(matches!(r[5], Err(BusError::RateLimited { .. })), "{r:?}");
}

#[tokio::test]
async fn memory_appends() {
    let bus: Arc<dyn Bus> = Arc::new(MemoryBus::new(10));
    full_stream_among_others(bus.clone(), Topics::new("mem")).await;
    let bus: Arc<dyn Bus> = Arc::new(MemoryBus::new(100_000));
    many_senders(bus, Topics::new("mem")).await;
}

#[tokio::test]
async fn redis_appends() {
    let url = std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let prefix = format!("sbappends:{}", uuid::Uuid::now_v7().simple());
    let small: Arc<dyn Bus> = Arc::new(RedisBus::connect(&url, &prefix, 10).await.expect("redis"));
    full_stream_among_others(small, Topics::new(&prefix)).await;
    let prefix2 = format!("{prefix}:many");
    let bus: Arc<dyn Bus> = Arc::new(
        RedisBus::connect(&url, &prefix2, 100_000)
            .await
            .expect("redis"),
    );
    many_senders(bus, Topics::new(&prefix2)).await;
    let _ = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "redis-cli --scan --pattern '{prefix}:*' | xargs -r redis-cli del > /dev/null"
        ))
        .status();
}
