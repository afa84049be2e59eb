//! Property tests of the gateway's parsers of client input, end to end on
//! a live gateway (the parsers live inside handlers of the binary, so this
//! is how a client reaches them):
//! - `message:send` validation (CONTRACT §4): content a string, not blank,
//!   at most `MAX_CONTENT_CHARS` (4000) characters — 4000 accepted, 4001
//!   refused, whatever the characters' UTF-8 width —, no NUL; `tempId`
//!   absent, null, or a string of at most 128 characters without NUL;
//! - `reaction:add` / `reaction:remove` (§5): `type` a non-blank string
//!   of at most 64 bytes (64 accepted, 65 refused), no NUL;
//! - `channel:sync {afterSeq}` (§9): accepted exactly for non-negative
//!   integers;
//! - the history query (§6): `afterSeq` a non-negative integer, `limit`
//!   1..=100 (1..=1000 with `afterSeq`), `before` a message of the channel,
//!   not combined with `afterSeq`; 400 for anything else, never a 500.
//!
//! The inputs come from proptest (random seeds; a failure prints the
//! minimal input); every case's answer must match the contract's model.

mod support;

use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestRunner};
use serde_json::{json, Value};
use support::*;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

async fn cluster() -> Cluster {
    Cluster::start(ClusterOptions {
        gateways: 1,
        workers: 1,
        ..Default::default()
    })
    .await
}

/// Characters of every UTF-8 width, and whitespace both JavaScript's and
/// Rust's `trim` agree on.
fn piece() -> impl Strategy<Value = char> {
    prop_oneof![
        Just('a'),
        Just('é'),
        Just('€'),
        Just('😀'),
        Just(' '),
        Just('\n'),
        Just('\t'),
        Just('\u{a0}'),
        Just('\u{3000}'),
    ]
}

/// A string of `len` characters drawn from `piece()`.
fn text_of(len: std::ops::RangeInclusive<usize>) -> impl Strategy<Value = String> {
    prop::collection::vec(piece(), len).prop_map(|v| v.into_iter().collect())
}

/// A string value, maybe with a NUL at some position, or another JSON type.
fn field(len: std::ops::RangeInclusive<usize>) -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        6 => text_of(len.clone()).prop_map(|s| Some(json!(s))),
        1 => (text_of(len), any::<prop::sample::Index>()).prop_map(|(s, at)| {
            let mut chars: Vec<char> = s.chars().collect();
            let i = at.index(chars.len() + 1);
            chars.insert(i, '\0');
            Some(json!(chars.into_iter().collect::<String>()))
        }),
        1 => Just(None),
        1 => Just(Some(Value::Null)),
        1 => prop_oneof![Just(json!(5)), Just(json!([])), Just(json!({})), Just(json!(true))]
            .prop_map(Some),
    ]
}

/// CONTRACT §4, as a model: `Ok` when the send must be accepted.
fn model_send(content: &Option<Value>, temp_id: &Option<Value>) -> bool {
    let content_ok = match content {
        Some(Value::String(c)) => {
            !c.trim().is_empty() && c.chars().count() <= 4000 && !c.contains('\0')
        }
        _ => false,
    };
    let temp_ok = match temp_id {
        None | Some(Value::Null) => true,
        Some(Value::String(t)) => t.chars().count() <= 128 && !t.contains('\0'),
        _ => false,
    };
    content_ok && temp_ok
}

#[test]
fn message_send_accepts_exactly_what_the_contract_allows() {
    let rt = runtime();
    let (c, client, channel) = rt.block_on(async {
        let c = cluster().await;
        let channel = c.channel("prop", &[]).await;
        let client = c.connect(0, "prop").await;
        (c, client, channel)
    });
    let counter = std::cell::Cell::new(0u64);
    let strategy = (
        prop_oneof![
            field(0..=8),
            field(3990..=4010),
            // Blank: whitespace only.
            prop::collection::vec(
                prop_oneof![
                    Just(' '),
                    Just('\n'),
                    Just('\t'),
                    Just('\u{a0}'),
                    Just('\u{3000}')
                ],
                0..10
            )
            .prop_map(|v| Some(json!(v.into_iter().collect::<String>()))),
        ],
        prop_oneof![field(0..=8), field(120..=136)],
    );
    let mut runner = TestRunner::new(config(160));
    let result = runner.run(&strategy, |(content, temp_id)| {
        let n = counter.get() + 1;
        counter.set(n);
        let mut payload = json!({"channelId": channel});
        if let Some(c) = &content {
            payload["content"] = c.clone();
        }
        // Distinct tempIds (a repeated one is answered from the dedupe).
        let temp_id = match temp_id {
            Some(Value::String(t)) => {
                let keep: String = t
                    .chars()
                    .take(t.chars().count().saturating_sub(6))
                    .collect();
                Some(json!(format!("{keep}{:06}", n % 1_000_000)))
            }
            other => other,
        };
        if let Some(t) = &temp_id {
            payload["tempId"] = t.clone();
        }
        let expected = model_send(&content, &temp_id);
        let ack = rt.block_on(client.call("message:send", &payload, T));
        let ack = ack.map_err(|e| TestCaseError::fail(format!("no answer: {e}")))?;
        let accepted = ack["status"] == "DELIVERED";
        prop_assert!(
            ack["status"] == "DELIVERED" || ack["status"] == "FAILED",
            "odd answer {}",
            ack
        );
        prop_assert_eq!(
            accepted,
            expected,
            "content {} chars, tempId {:?}: answer {}",
            content
                .as_ref()
                .and_then(|c| c.as_str())
                .map(|c| c.chars().count() as i64)
                .unwrap_or(-1),
            temp_id,
            ack
        );
        if !accepted {
            prop_assert!(ack["error"].as_str().is_some_and(|e| !e.is_empty()));
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}\n{}", c.logs());
    }
    // The socket survived every refusal.
    rt.block_on(async {
        let mut client = client;
        let sent = send_burst(&mut client, &channel, "still-open", 1).await;
        assert_eq!(sent.len(), 1);
    });
}

/// Any JSON value as `afterSeq`, with whether the contract accepts it:
/// `Some(true)` for a non-negative integer, `Some(false)` for anything
/// else, `None` when either answer is fine (integers above `i64::MAX`,
/// which no channel reaches).
fn after_seq_value() -> impl Strategy<Value = (Value, Option<bool>)> {
    prop_oneof![
        (0..=i64::MAX).prop_map(|n| (json!(n), Some(true))),
        (0..100i64).prop_map(|n| (json!(n), Some(true))),
        (i64::MIN..0).prop_map(|n| (json!(n), Some(false))),
        ((i64::MAX as u64 + 1)..=u64::MAX).prop_map(|n| (json!(n), None)),
        any::<f64>()
            .prop_filter("not an integer", |f| f.is_finite() && f.fract() != 0.0)
            .prop_map(|f| (json!(f), Some(false))),
        (0..100i64).prop_map(|n| (json!(n.to_string()), Some(false))),
        Just((Value::Null, Some(false))),
        Just((json!(true), Some(false))),
        Just((json!([0]), Some(false))),
        Just((json!({}), Some(false))),
    ]
}

#[test]
fn channel_sync_accepts_exactly_non_negative_integers() {
    let rt = runtime();
    let (c, client, channel) = rt.block_on(async {
        let c = cluster().await;
        let channel = c.channel("sync", &[]).await;
        let mut client = c.connect(0, "sync").await;
        send_burst(&mut client, &channel, "m", 3).await;
        (c, client, channel)
    });
    let mut runner = TestRunner::new(config(128));
    let result = runner.run(
        &(after_seq_value(), any::<bool>()),
        |((after, expected), absent)| {
            let payload = if absent {
                json!({"channelId": channel})
            } else {
                json!({"channelId": channel, "afterSeq": after})
            };
            let expected = if absent { Some(false) } else { expected };
            let ack = rt
                .block_on(client.call("channel:sync", &payload, T))
                .map_err(|e| TestCaseError::fail(format!("no answer: {e}")))?;
            let ok = ack["ok"] == true;
            if let Some(expected) = expected {
                prop_assert_eq!(ok, expected, "afterSeq {}: {}", payload["afterSeq"], ack);
            }
            if !ok {
                prop_assert!(ack["error"].is_string(), "{}", ack);
            } else {
                prop_assert_eq!(&ack["channelId"], &json!(channel));
            }
            Ok(())
        },
    );
    if let Err(e) = result {
        panic!("{e}\n{}", c.logs());
    }
}

/// A query value: absent, or a string near the integer grammar, or junk.
fn query_value() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        Just(None),
        Just(Some(String::new())),
        "[+-]?[0-9]{1,3}".prop_map(Some),
        "[+-]?[0-9]{18,21}".prop_map(Some),
        (0u64..1100).prop_map(|n| Some(n.to_string())),
        "[ +\\-0-9eE.x]{1,6}".prop_map(Some),
        ".{1,8}".prop_map(Some),
    ]
}

/// Rust's integer grammar as the contract reads it: an optional sign and
/// decimal digits; `Some(value)` when it fits an `i128`.
fn integer(raw: &str) -> Option<i128> {
    let (neg, digits) = match raw.as_bytes().first() {
        Some(b'+') => (false, &raw[1..]),
        Some(b'-') => (true, &raw[1..]),
        _ => (false, raw),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || digits.len() > 30 {
        return None;
    }
    let v: i128 = digits.parse().ok()?;
    Some(if neg { -v } else { v })
}

#[test]
fn history_query_parameters_are_checked_not_crashed_on() {
    let rt = runtime();
    let (c, channel, first) = rt.block_on(async {
        let c = cluster().await;
        let channel = c.channel("hist", &[]).await;
        let mut client = c.connect(0, "hist").await;
        send_burst(&mut client, &channel, "m", 3).await;
        collect_created(&mut client, 3, T).await;
        let history = c.history("hist", &channel).await;
        let first = history[0]["id"].as_str().expect("id").to_string();
        (c, channel, first)
    });
    let token = c.token("hist");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let url = format!("{}/api/channels/{channel}/messages", c.urls[0]);
    let before = prop_oneof![
        Just(None),
        Just(Some(String::new())),
        Just(Some(first.clone())),
        any::<u128>().prop_map(|v| Some(uuid::Uuid::from_u128(v).to_string())),
        ".{1,12}".prop_map(Some),
    ];
    let mut runner = TestRunner::new(config(256));
    let result = runner.run(
        &(query_value(), query_value(), before),
        |(after_seq, limit, before)| {
            let mut query = Vec::new();
            for (k, v) in [
                ("afterSeq", &after_seq),
                ("limit", &limit),
                ("before", &before),
            ] {
                if let Some(v) = v {
                    query.push((k, v.clone()));
                }
            }
            let status = rt
                .block_on(async {
                    http.get(&url)
                        .bearer_auth(&token)
                        .query(&query)
                        .send()
                        .await
                        .map(|r| r.status().as_u16())
                })
                .map_err(|e| TestCaseError::fail(format!("request failed: {e}")))?;
            // The model.
            let after = after_seq.as_deref().filter(|a| !a.is_empty());
            let after_ok = after
                .is_none_or(|a| integer(a).is_some_and(|n| (0..=i64::MAX as i128).contains(&n)));
            let max = if after.is_some() { 1000 } else { 100 };
            let limit_ok = match limit.as_deref() {
                None | Some("") => true,
                Some(l) => {
                    !l.starts_with('-') && integer(l).is_some_and(|n| (1..=max).contains(&n))
                }
            };
            let before = before.as_deref().filter(|b| !b.is_empty());
            let before_ok = match before {
                None => true,
                Some(b) => after.is_none() && b == first,
            };
            let expected = if after_ok && limit_ok && before_ok {
                200
            } else {
                400
            };
            prop_assert_eq!(status, expected, "query {:?}", query);
            Ok(())
        },
    );
    if let Err(e) = result {
        panic!("{e}\n{}", c.logs());
    }
}

/// CONTRACT §5: a reaction `type` is a non-empty string of at most 64
/// bytes (64 accepted, 65 refused, whatever the characters' width), and
/// like every text field it must not contain NUL.
fn model_reaction(kind: &Option<Value>) -> bool {
    match kind {
        Some(Value::String(k)) => !k.trim().is_empty() && k.len() <= 64 && !k.contains('\0'),
        _ => false,
    }
}

#[test]
fn reaction_types_accept_exactly_what_the_contract_allows() {
    let rt = runtime();
    let (c, client, message) = rt.block_on(async {
        let c = cluster().await;
        let channel = c.channel("react", &[]).await;
        let mut client = c.connect(0, "react").await;
        let sent = send_burst(&mut client, &channel, "m", 1).await;
        collect_created(&mut client, 1, T).await;
        let message = sent.values().next().cloned().expect("message id");
        (c, client, message)
    });
    let strategy = (
        prop_oneof![field(0..=4), field(14..=18), field(60..=66)],
        any::<bool>(),
    );
    let mut runner = TestRunner::new(config(128));
    let result = runner.run(&strategy, |(kind, add)| {
        let mut payload = json!({"messageId": message});
        if let Some(k) = &kind {
            payload["type"] = k.clone();
        }
        let event = if add {
            "reaction:add"
        } else {
            "reaction:remove"
        };
        let ack = rt
            .block_on(client.call(event, &payload, T))
            .map_err(|e| TestCaseError::fail(format!("no answer: {e}")))?;
        let bytes = kind
            .as_ref()
            .and_then(|k| k.as_str())
            .map(|k| k.len() as i64)
            .unwrap_or(-1);
        prop_assert_eq!(
            ack["ok"] == true,
            model_reaction(&kind),
            "{} type of {} bytes {:?}: {}",
            event,
            bytes,
            kind,
            ack
        );
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}\n{}", c.logs());
    }
}

/// The `parse_since` finding seen by a client: `auth.since` naming one
/// channel twice (its id in lower and upper case) replays the channel
/// twice. Expected: each missed message once, one `channel:recovered`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_naming_a_channel_twice_replays_it_once() {
    let c = cluster().await;
    let channel = c.channel("twice", &[]).await;
    let mut first = c.connect(0, "twice").await;
    send_burst(&mut first, &channel, "m", 3).await;
    collect_created(&mut first, 3, T).await;
    let mut auth = c.minter.auth("twice").expect("auth");
    auth["since"] = json!({ channel.clone(): 0, channel.to_uppercase(): 0 });
    let target = switchboard_loadtest::client::Target::seed_path(&c.urls[0]);
    let mut again = switchboard_loadtest::client::Client::connect(&target, auth)
        .await
        .expect("connect");
    let (mut replayed, mut recovered) = (0, 0);
    while let Some(e) = again.next(Duration::from_millis(1500)).await {
        match e.name.as_str() {
            "message:created" => replayed += 1,
            "channel:recovered" => recovered += 1,
            _ => {}
        }
    }
    assert_eq!(
        (replayed, recovered),
        (3, 1),
        "message:created and channel:recovered received"
    );
}
