//! `MAX_CONNECTIONS_PER_USER` (issue 11, finding 5; CONTRACT §2): counted
//! across the cluster, released on disconnect, and the sockets of a node
//! that died stop counting once their entries expire.

mod support;

use std::time::{Duration, Instant};

use support::*;
use switchboard_loadtest::client::{Client, Target};

fn capped(extra: &[(&str, &str)]) -> ClusterOptions {
    let mut env: Vec<(String, String)> = vec![("MAX_CONNECTIONS_PER_USER".into(), "20".into())];
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    ClusterOptions {
        env,
        ..Default::default()
    }
}

/// Connects `user` on `node`: `Ok` past `connection:success`, `Err` with
/// the `connection:error` payload.
async fn try_connect(c: &Cluster, node: usize, user: &str) -> Result<Client, serde_json::Value> {
    let target = Target::seed_path(&c.urls[node]);
    let mut client = Client::connect(&target, c.minter.auth(user).expect("auth"))
        .await
        .expect("connect");
    let deadline = Instant::now() + T;
    while Instant::now() < deadline {
        match client.next(Duration::from_millis(200)).await {
            Some(e) if e.name == "connection:success" => return Ok(client),
            Some(e) if e.name == "connection:error" => return Err(e.data),
            _ => {}
        }
    }
    panic!("no answer to the handshake");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_sockets_across_two_gateways_then_refused_then_released() {
    let c = Cluster::start(capped(&[])).await;
    let mut held = Vec::new();
    for i in 0..20 {
        held.push(
            try_connect(&c, i % 2, "many")
                .await
                .expect("within the cap"),
        );
    }
    for node in 0..2 {
        let err = try_connect(&c, node, "many").await.err().expect("refused");
        assert_eq!(err["error"], "Too many connections");
        assert_eq!(err["reason"], "too_many_connections");
        assert!(err.get("reconnectAttempt").is_some(), "{err}");
    }
    // Another user is not affected.
    try_connect(&c, 1, "someone-else")
        .await
        .expect("other user");
    // A disconnect frees a slot (on the other node).
    let one = held.pop().expect("one");
    one.close().await;
    drop(one);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match try_connect(&c, 0, "many").await {
            Ok(s) => {
                held.push(s);
                break;
            }
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("slot not released: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gateways_sockets_stop_counting() {
    let c = capped(&[
        ("CONNECTION_HEARTBEAT_MS", "300"),
        ("CONNECTION_TTL_MS", "1500"),
    ]);
    let mut c = Cluster::start(c).await;
    let mut on_gw1 = Vec::new();
    for _ in 0..15 {
        on_gw1.push(try_connect(&c, 1, "dying").await.expect("gw1"));
    }
    let mut on_gw0 = Vec::new();
    for _ in 0..5 {
        on_gw0.push(try_connect(&c, 0, "dying").await.expect("gw0"));
    }
    // The heartbeat keeps them counting well past the TTL.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(try_connect(&c, 0, "dying").await.is_err(), "still 20 live");
    c.gateways[1].kill9();
    let killed = Instant::now();
    let deadline = killed + Duration::from_secs(30);
    let mut admitted = 0;
    while admitted < 15 {
        match try_connect(&c, 0, "dying").await {
            Ok(s) => {
                on_gw0.push(s);
                admitted += 1;
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "dead node still counts: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    eprintln!(
        "dead node's 15 sockets stopped counting after {} ms (TTL 1500 ms)",
        killed.elapsed().as_millis()
    );
    assert!(
        try_connect(&c, 0, "dying").await.is_err(),
        "cap holds again"
    );
}
