//! Per-user connection sets (`MAX_CONNECTIONS_PER_USER`) on both backends:
//! the cap, idempotent re-claims, release, refresh, and expiry.

use std::time::Duration;

use switchboard_shared::bus::memory::MemoryBus;
use switchboard_shared::bus::redis::RedisBus;
use switchboard_shared::bus::Bus;

async fn cap_release_expire(bus: &dyn Bus, key: &str) {
    let ttl = Duration::from_millis(400);
    for i in 0..3 {
        assert!(bus
            .claim_connection(key, &format!("n:{i}"), 3, ttl)
            .await
            .expect("claim"));
    }
    assert!(
        !bus.claim_connection(key, "n:3", 3, ttl)
            .await
            .expect("claim"),
        "cap"
    );
    assert!(
        bus.claim_connection(key, "n:0", 3, ttl)
            .await
            .expect("claim"),
        "re-claim"
    );
    bus.release_connection(key, "n:1").await.expect("release");
    assert!(
        bus.claim_connection(key, "n:3", 3, ttl)
            .await
            .expect("claim"),
        "freed"
    );
    // Refreshed entries outlive the TTL; the others expire.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        bus.refresh_connections(&[(key.to_string(), "n:0".to_string())], ttl)
            .await
            .expect("refresh");
    }
    assert!(bus.claim_connection(key, "a", 3, ttl).await.expect("claim"));
    assert!(bus.claim_connection(key, "b", 3, ttl).await.expect("claim"));
    assert!(
        !bus.claim_connection(key, "c", 3, ttl).await.expect("claim"),
        "n:0 still counts"
    );
    // A released entry is not brought back by a refresh.
    bus.release_connection(key, "a").await.expect("release");
    bus.refresh_connections(&[(key.to_string(), "a".to_string())], ttl)
        .await
        .expect("refresh");
    assert!(bus.claim_connection(key, "c", 3, ttl).await.expect("claim"));
}

#[tokio::test]
async fn memory_connections() {
    cap_release_expire(&MemoryBus::new(10), "mem:conns:u").await;
}

#[tokio::test]
async fn redis_connections() {
    let url = std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let prefix = format!("sbconn:{}", uuid::Uuid::now_v7().simple());
    let bus = RedisBus::connect(&url, &prefix, 10).await.expect("redis");
    let key = format!("{prefix}:conns:u");
    cap_release_expire(&bus, &key).await;
    let _ = std::process::Command::new("redis-cli")
        .args(["del", &key])
        .status();
}
