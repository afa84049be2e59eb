//! `Bus::backlog_stats` on Redis: the length of a partition and the age of
//! its oldest unacknowledged entry (`worker_stream_oldest_pending_age_seconds`).

use std::time::Duration;

use bytes::Bytes;
use switchboard_shared::bus::redis::RedisBus;
use switchboard_shared::bus::Bus;

#[tokio::test]
async fn oldest_pending_age_grows_until_the_entry_is_acked() {
    let url = std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let prefix = format!("sbbacklog:{}", uuid::Uuid::now_v7().simple());
    let bus = RedisBus::connect(&url, &prefix, 100).await.expect("redis");
    let empty = bus.backlog_stats(0).await.expect("stats");
    assert_eq!((empty.entries, empty.oldest_age), (0, None));

    let first = bus
        .append(0, Bytes::from_static(b"a"))
        .await
        .expect("append");
    tokio::time::sleep(Duration::from_millis(120)).await;
    let second = bus
        .append(0, Bytes::from_static(b"b"))
        .await
        .expect("append");
    let stats = bus.backlog_stats(0).await.expect("stats");
    assert_eq!(stats.entries, 2);
    let age = stats.oldest_age.expect("an oldest entry");
    assert!(age >= Duration::from_millis(100), "{age:?}");

    bus.ack(0, &[first]).await.expect("ack");
    let after = bus.backlog_stats(0).await.expect("stats");
    assert_eq!(after.entries, 1);
    assert!(
        after.oldest_age.expect("oldest") < age,
        "the next entry is younger"
    );
    bus.ack(0, &[second]).await.expect("ack");
    assert_eq!(bus.backlog_stats(0).await.expect("stats").oldest_age, None);
    let _ = std::process::Command::new("sh")
        .args([
            "-c",
            &format!("redis-cli --scan --pattern '{prefix}:*' | xargs -r redis-cli del"),
        ])
        .status();
}
