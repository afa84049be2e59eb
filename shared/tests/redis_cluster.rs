//! The Redis bus and presence on a Redis Cluster (3 masters, 3 replicas):
//! every operation that touches several keys or streams works across slots,
//! and fan-out goes through sharded pub/sub.
//!
//! Runs on `TEST_REDIS_CLUSTER_URL` when set (`scripts/test` sets it), else on
//! the local cluster of `scripts/redis-cluster start` (ports 7000–7005,
//! started when it is not running; it needs `redis-server` and `redis-cli`).

use std::time::Duration;

use bytes::Bytes;
use switchboard_shared::bus::redis::RedisBus;
use switchboard_shared::bus::{BatchEnd, Bus, DedupeClaim, RateLimit, Topics};
use switchboard_shared::presence::redis::RedisPresence;
use switchboard_shared::presence::Presence;

fn cluster_url() -> String {
    if let Ok(url) = std::env::var("TEST_REDIS_CLUSTER_URL") {
        if !url.is_empty() {
            return url;
        }
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/redis-cluster");
    let out = std::process::Command::new(script)
        .arg("start")
        .output()
        .expect("run scripts/redis-cluster start");
    assert!(
        out.status.success(),
        "scripts/redis-cluster start failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

const PARTITIONS: u32 = 8;

#[tokio::test]
async fn the_whole_bus_works_across_the_slots_of_a_cluster() {
    let url = cluster_url();
    let prefix = format!("sbcluster:{}", uuid::Uuid::now_v7().simple());
    let gateway = RedisBus::connect(&url, &prefix, 1000)
        .await
        .expect("gateway bus");
    let worker = RedisBus::connect(&url, &prefix, 1000)
        .await
        .expect("worker bus");
    let topics = Topics::new(&prefix);

    // Fan-out: a gateway subscribes to channels that live on different shards.
    let channels: Vec<String> = (0..12).map(|i| format!("{prefix}:ch:{i}")).collect();
    gateway
        .subscribe(channels.clone())
        .await
        .expect("ssubscribe");
    let mut incoming = gateway.incoming();

    // Appends to every partition (their streams spread over the shards),
    // rate-limited in the same script.
    let limit = RateLimit {
        key: topics.rate("messages", "user_a"),
        per_s: 1000.0,
        burst: 1000.0,
    };
    let entries: Vec<(u32, Bytes)> = (0..PARTITIONS * 3)
        .map(|i| (i % PARTITIONS, Bytes::from(format!("m{i}"))))
        .collect();
    let appended = gateway
        .append_many_limited(entries.clone(), Some(limit))
        .await;
    assert!(appended.iter().all(Result::is_ok), "{appended:?}");

    // The worker reads every partition (one connection each) until it has
    // every entry, each partition's in append order.
    let all: Vec<u32> = (0..PARTITIONS).collect();
    let mut read: Vec<(u32, String, Bytes)> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while read.len() < entries.len() && tokio::time::Instant::now() < deadline {
        for batch in worker
            .read(&all, "w1", 100, Duration::from_millis(200))
            .await
            .expect("read")
        {
            for e in batch.entries {
                read.push((batch.partition, e.id, e.payload));
            }
        }
    }
    assert_eq!(read.len(), entries.len());
    for p in 0..PARTITIONS {
        let got: Vec<&Bytes> = read.iter().filter(|r| r.0 == p).map(|r| &r.2).collect();
        let sent: Vec<&Bytes> = entries.iter().filter(|e| e.0 == p).map(|e| &e.1).collect();
        assert_eq!(got, sent, "partition {p} in order");
    }

    // Dedupe keys of many users (many slots) claimed in one call.
    let claims: Vec<(String, String)> = (0..20)
        .map(|i| (format!("user_{i}:temp"), format!("p:{i}")))
        .collect();
    let first = worker
        .claim_dedupe(&claims, Duration::from_secs(30))
        .await
        .expect("claim");
    assert!(
        first.iter().all(|c| *c == DedupeClaim::Claimed),
        "{first:?}"
    );
    let again = worker
        .claim_dedupe(&claims, Duration::from_secs(30))
        .await
        .expect("claim again");
    for (i, c) in again.iter().enumerate() {
        assert_eq!(*c, DedupeClaim::Existing(format!("p:{i}")));
    }

    // The end of the batch: publish to every channel, settle the keys,
    // acknowledge every partition.
    let mut acks: Vec<(u32, Vec<String>)> = Vec::new();
    for (p, id, _) in &read {
        match acks.iter_mut().find(|(q, _)| q == p) {
            Some((_, ids)) => ids.push(id.clone()),
            None => acks.push((*p, vec![id.clone()])),
        }
    }
    let publish: Vec<(String, Bytes)> = channels
        .iter()
        .map(|c| (c.clone(), Bytes::from(format!("event of {c}"))))
        .collect();
    worker
        .complete_batch(BatchEnd {
            publish: publish.clone(),
            settle_set: claims[..10]
                .iter()
                .map(|(k, _)| (k.clone(), "d:done".to_string()))
                .collect(),
            settle_ttl: Duration::from_secs(60),
            settle_delete: claims[10..].iter().map(|(k, _)| k.clone()).collect(),
            acks,
        })
        .await
        .expect("complete");
    for p in 0..PARTITIONS {
        assert_eq!(
            worker.backlog(p).await.expect("backlog"),
            0,
            "partition {p}"
        );
    }
    let mut heard = Vec::new();
    while heard.len() < channels.len() {
        let msg = tokio::time::timeout(Duration::from_secs(5), incoming.recv())
            .await
            .expect("every channel's event arrives")
            .expect("recv");
        heard.push(msg.topic);
    }
    heard.sort();
    let mut expected = channels.clone();
    expected.sort();
    assert_eq!(heard, expected);

    let settled = worker
        .claim_dedupe(&claims, Duration::from_secs(30))
        .await
        .expect("claim after settle");
    for (i, c) in settled.iter().enumerate() {
        if i < 10 {
            assert_eq!(*c, DedupeClaim::Existing("d:done".into()), "key {i} kept");
        } else {
            assert_eq!(*c, DedupeClaim::Claimed, "key {i} was deleted");
        }
    }
    worker.release_dedupe(&claims[10..]).await.expect("release");
    let released = worker
        .claim_dedupe(&claims[10..], Duration::from_secs(30))
        .await
        .expect("claim after release");
    assert!(released.iter().all(|c| *c == DedupeClaim::Claimed));

    // Leases, the live set and counters are single keys.
    assert!(worker
        .acquire_lease(3, "w1", Duration::from_secs(5))
        .await
        .expect("lease"));
    assert!(!gateway
        .acquire_lease(3, "w2", Duration::from_secs(5))
        .await
        .expect("lease"));
    assert_eq!(
        worker
            .heartbeat("w1", Duration::from_secs(5))
            .await
            .expect("hb"),
        1
    );
    assert_eq!(
        gateway
            .count_in_window("k", Duration::from_secs(5))
            .await
            .expect("count"),
        1
    );

    // Unsubscribed channels go quiet.
    gateway
        .unsubscribe(channels.clone())
        .await
        .expect("sunsubscribe");
    worker.publish(publish).await.expect("publish");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), incoming.recv())
            .await
            .is_err(),
        "nothing arrives after unsubscribing"
    );
}

#[tokio::test]
async fn presence_works_across_the_slots_of_a_cluster() {
    let url = cluster_url();
    let prefix = format!("sbclusterpr:{}", uuid::Uuid::now_v7().simple());
    let bus = RedisBus::connect(&url, &prefix, 1000).await.expect("bus");
    let presence = RedisPresence::new(bus.command_client(), &prefix);
    let users: Vec<String> = (0..40).map(|i| format!("user_{i}")).collect();
    let ttl = Duration::from_secs(30);
    for u in &users {
        presence.claim(u, "s1", 5, ttl).await.expect("claim");
    }
    let entries: Vec<(String, String)> = users.iter().map(|u| (u.clone(), "s1".into())).collect();
    presence.refresh(&entries, ttl).await.expect("refresh");
    let online = presence.online(&users).await.expect("online");
    assert!(online.iter().all(|o| *o), "{online:?}");
    for u in &users[..20] {
        presence
            .release(u, "s1", Duration::ZERO)
            .await
            .expect("release");
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut offline = Vec::new();
    while offline.len() < 20 && tokio::time::Instant::now() < deadline {
        offline.extend(presence.sweep(100).await.expect("sweep"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(offline.len(), 20, "{offline:?}");
    let online = presence.online(&users).await.expect("online");
    assert_eq!(online.iter().filter(|o| **o).count(), 20);
}
