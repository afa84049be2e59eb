//! Per-user connection sets and online presence on both backends
//! (CONTRACT §2 `MAX_CONNECTIONS_PER_USER`, §11): the cap, idempotent
//! re-claims, release, refresh, expiry, the online transitions, the offline
//! grace, and a sweep reporting each offline user once.

use std::time::Duration;

use switchboard_shared::bus::redis::RedisBus;
use switchboard_shared::presence::memory::MemoryPresence;
use switchboard_shared::presence::redis::RedisPresence;
use switchboard_shared::presence::{Claim, Presence};

fn accepted(c: Claim) -> bool {
    matches!(c, Claim::Accepted { .. })
}

async fn cap_release_expire(p: &dyn Presence, user: &str) {
    let ttl = Duration::from_millis(400);
    let grace = Duration::ZERO;
    for i in 0..3 {
        assert!(accepted(
            p.claim(user, &format!("n:{i}"), 3, ttl)
                .await
                .expect("claim")
        ));
    }
    assert_eq!(
        p.claim(user, "n:3", 3, ttl).await.expect("claim"),
        Claim::Refused,
        "cap"
    );
    assert!(
        accepted(p.claim(user, "n:0", 3, ttl).await.expect("claim")),
        "re-claim"
    );
    p.release(user, "n:1", grace).await.expect("release");
    assert!(
        accepted(p.claim(user, "n:3", 3, ttl).await.expect("claim")),
        "freed"
    );
    // Refreshed entries outlive the TTL; the others expire.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        p.refresh(&[(user.to_string(), "n:0".to_string())], ttl)
            .await
            .expect("refresh");
    }
    assert!(accepted(p.claim(user, "a", 3, ttl).await.expect("claim")));
    assert!(accepted(p.claim(user, "b", 3, ttl).await.expect("claim")));
    assert_eq!(
        p.claim(user, "c", 3, ttl).await.expect("claim"),
        Claim::Refused,
        "n:0 still counts"
    );
    // No cap: limit 0.
    assert!(accepted(p.claim(user, "d", 0, ttl).await.expect("claim")));
}

async fn online_offline(p: &dyn Presence, tag: &str) {
    let ttl = Duration::from_secs(5);
    let grace = Duration::from_millis(300);
    let alice = format!("{tag}-alice");
    let bob = format!("{tag}-bob");
    let users = [alice.clone(), bob.clone()];
    assert_eq!(p.online(&users).await.expect("online"), [false, false]);

    // The first socket is a transition, the second is not.
    let first = p.claim(&alice, "n1:a", 0, ttl).await.expect("claim");
    assert!(
        matches!(first, Claim::Accepted { came_online: Some(t) } if t > 0),
        "{first:?}"
    );
    let second = p.claim(&alice, "n2:b", 0, ttl).await.expect("claim");
    assert_eq!(second, Claim::Accepted { came_online: None });
    assert_eq!(p.online(&users).await.expect("online"), [true, false]);

    // One socket closes: still online, nothing to sweep.
    p.release(&alice, "n1:a", grace).await.expect("release");
    tokio::time::sleep(grace * 2).await;
    assert!(p
        .sweep(100)
        .await
        .expect("sweep")
        .iter()
        .all(|g| g.user_id != alice));
    assert_eq!(p.online(&users).await.expect("online"), [true, false]);

    // The last closes and the user comes back within the grace: no
    // transition either way.
    p.release(&alice, "n2:b", grace).await.expect("release");
    assert_eq!(
        p.claim(&alice, "n3:c", 0, ttl).await.expect("claim"),
        Claim::Accepted { came_online: None }
    );
    tokio::time::sleep(grace * 2).await;
    assert!(p
        .sweep(100)
        .await
        .expect("sweep")
        .iter()
        .all(|g| g.user_id != alice));

    // The last closes for good: online during the grace, then swept once.
    p.release(&alice, "n3:c", grace).await.expect("release");
    assert_eq!(p.online(&users).await.expect("online"), [true, false]);
    assert!(p
        .sweep(100)
        .await
        .expect("sweep")
        .iter()
        .all(|g| g.user_id != alice));
    tokio::time::sleep(grace * 2).await;
    let gone = p.sweep(100).await.expect("sweep");
    assert_eq!(
        gone.iter().filter(|g| g.user_id == alice).count(),
        1,
        "{gone:?}"
    );
    assert!(p
        .sweep(100)
        .await
        .expect("sweep")
        .iter()
        .all(|g| g.user_id != alice));
    assert_eq!(p.online(&users).await.expect("online"), [false, false]);

    // A node that dies never releases: its entry expires and the sweep
    // takes the user offline.
    let short = Duration::from_millis(300);
    let claim = p.claim(&bob, "dead:x", 0, short).await.expect("claim");
    assert!(matches!(
        claim,
        Claim::Accepted {
            came_online: Some(_)
        }
    ));
    tokio::time::sleep(short * 2).await;
    let gone = p.sweep(100).await.expect("sweep");
    assert_eq!(
        gone.iter().filter(|g| g.user_id == bob).count(),
        1,
        "{gone:?}"
    );

    // A heartbeat adds back an entry the backend lost.
    p.refresh(&[(bob.clone(), "n1:y".to_string())], ttl)
        .await
        .expect("refresh");
    assert_eq!(p.online(&users).await.expect("online"), [false, true]);
}

/// One sweep covers every bucket: users of all buckets whose sockets
/// expired are each reported once, and not again.
async fn sweep_of_many(p: &dyn Presence, tag: &str) {
    let short = Duration::from_millis(300);
    let users: Vec<String> = (0..60).map(|i| format!("{tag}-sw{i}")).collect();
    for u in &users {
        assert!(accepted(
            p.claim(u, "dead:s", 0, short).await.expect("claim")
        ));
    }
    tokio::time::sleep(short * 2).await;
    let gone = p.sweep(1000).await.expect("sweep");
    for u in &users {
        assert_eq!(
            gone.iter().filter(|g| &g.user_id == u).count(),
            1,
            "{u} swept once: {gone:?}"
        );
    }
    let again = p.sweep(1000).await.expect("sweep");
    assert!(
        again.iter().all(|g| !users.contains(&g.user_id)),
        "{again:?}"
    );
    assert!(p.online(&users).await.expect("online").iter().all(|o| !o));
}

/// A node's heartbeat refreshes all its entries at once (several users per
/// bucket, several sockets per user, every bucket): each outlives its TTL
/// while refreshed; an entry left out expires.
async fn heartbeat_of_many(p: &dyn Presence, tag: &str) {
    let ttl = Duration::from_secs(2);
    let users: Vec<String> = (0..40).map(|i| format!("{tag}-hb{i}")).collect();
    let mut entries = Vec::new();
    for u in &users {
        for s in ["a", "b"] {
            let member = format!("n:{u}:{s}");
            assert!(accepted(p.claim(u, &member, 0, ttl).await.expect("claim")));
            entries.push((u.clone(), member));
        }
    }
    let left_out = format!("{tag}-hb-left-out");
    assert!(accepted(
        p.claim(&left_out, "n:x", 0, ttl).await.expect("claim")
    ));
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        p.refresh(&entries, ttl).await.expect("refresh");
    }
    // 2.5 s after the claims: the refreshed entries still count, the
    // other one is gone.
    for u in &users {
        assert_eq!(
            p.claim(u, "n:third", 2, ttl).await.expect("claim"),
            Claim::Refused,
            "{u}'s two sockets still count"
        );
    }
    assert!(
        accepted(p.claim(&left_out, "n:y", 1, ttl).await.expect("claim")),
        "an entry left out of the heartbeat expired"
    );
    assert!(p.online(&users).await.expect("online").iter().all(|o| *o));
}

/// Who is online among more users than one read takes (several calls, every
/// bucket), in the order asked.
async fn online_of_many(p: &dyn Presence, tag: &str) {
    let ttl = Duration::from_secs(30);
    let users: Vec<String> = (0..2200).map(|i| format!("{tag}-many{i}")).collect();
    for u in users.iter().step_by(2) {
        assert!(accepted(p.claim(u, "n:s", 0, ttl).await.expect("claim")));
    }
    let online = p.online(&users).await.expect("online");
    let expected: Vec<bool> = (0..users.len()).map(|i| i % 2 == 0).collect();
    assert_eq!(online, expected);
}

#[tokio::test]
async fn memory_connections() {
    let p = MemoryPresence::new();
    cap_release_expire(&p, "u").await;
    online_offline(&p, "mem").await;
    heartbeat_of_many(&p, "mem").await;
    sweep_of_many(&p, "mem").await;
    online_of_many(&p, "mem").await;
}

#[tokio::test]
async fn redis_connections() {
    let url = std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let prefix = format!("sbconn:{}", uuid::Uuid::now_v7().simple());
    let bus = RedisBus::connect(&url, &prefix, 10).await.expect("redis");
    let p = RedisPresence::new(bus.command_client(), &prefix);
    cap_release_expire(&p, "u").await;
    online_offline(&p, "redis").await;
    heartbeat_of_many(&p, "redis").await;
    sweep_of_many(&p, "redis").await;
    online_of_many(&p, "redis").await;
    let _ = std::process::Command::new("sh")
        .args([
            "-c",
            &format!("redis-cli --scan --pattern '{prefix}:*' | xargs -r redis-cli del"),
        ])
        .status();
}
