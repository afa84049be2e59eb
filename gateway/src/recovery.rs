//! Catch-up after a reconnect (`auth.since`) and on demand
//! (`channel:sync`): CONTRACT §9.
//!
//! A recovering socket is kept out of the channel's room while the missed
//! messages are read from the database and sent to it; then the dispatcher
//! (the only task that emits into rooms) sends it whatever it emitted to the
//! room meanwhile and joins it to the room, in one step ordered with the
//! live events (see [`RoomEntry`]). So the seam has no hole and no
//! duplicate, and the dispatcher's work per recovering socket is usually
//! just the join: the database read happens outside it.

use serde::Serialize;
use socketioxide::extract::SocketRef;
use switchboard_shared::protocol::{events, ChannelRecovered};
use switchboard_shared::store::HistoryMessage;
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::state::{channel_room, App, RoomEntry};

// The dispatcher's half of the hand-off is `fanout::complete_entry`.

/// A replayed `message:created`: the message as the history API shows it
/// (with its current reactions), flagged `recovered`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Replayed<'a> {
    message: &'a HistoryMessage,
    temp_id: Option<&'a str>,
    processed: bool,
    recovered: bool,
}

/// Sends one stored message to one socket, in the replay shape.
pub fn emit_replayed(s: &SocketRef, m: &HistoryMessage) {
    let _ = s.emit(
        events::MESSAGE_CREATED,
        &Replayed {
            message: m,
            temp_id: m.temp_id.as_deref(),
            processed: true,
            recovered: true,
        },
    );
}

/// Sends socket `s` the messages of `channel` after `after` and puts it in
/// the channel's room (the caller made sure it is not in it). Answers with
/// what `channel:recovered` says. A database failure still joins the room
/// (live events flow) and is reported as an error.
pub async fn catch_up(
    app: &App,
    s: &SocketRef,
    channel: Uuid,
    after: i64,
) -> Result<ChannelRecovered, String> {
    let max = app.settings.recovery_max_messages;
    let missed = match app.store.messages_after(channel, after, max + 1).await {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(%channel, error = %e, "catch-up read failed");
            enter_room(app, s, channel, None).await;
            return Err("Service temporarily unavailable".into());
        }
    };
    if missed.len() as u64 > max {
        metrics::counter!("gateway_recoveries_total", "result" => "too_many").increment(1);
        let held = enter_room(app, s, channel, None).await;
        let latest = match app.store.max_seqs(&[channel]).await {
            Ok(l) => l.get(&channel).copied().unwrap_or(0).max(held),
            Err(_) => held,
        };
        return Ok(ChannelRecovered {
            channel_id: channel.to_string(),
            recovered: false,
            from_seq: None,
            to_seq: None,
            last_seq: Some(latest),
        });
    }
    let mut replayed_to = after;
    for m in &missed {
        emit_replayed(s, m);
        replayed_to = m.message.seq;
    }
    let to_seq = enter_room(app, s, channel, Some(replayed_to)).await;
    metrics::counter!("gateway_recoveries_total", "result" => "recovered").increment(1);
    metrics::counter!("gateway_recovered_messages_total")
        .increment((missed.len() as i64 + (to_seq - replayed_to).max(0)) as u64);
    Ok(ChannelRecovered {
        channel_id: channel.to_string(),
        recovered: true,
        from_seq: Some(after + 1),
        to_seq: Some(to_seq.max(after)),
        last_seq: None,
    })
}

/// Hands the socket to the dispatcher, which completes the replay from
/// `replayed_to` (none: no replay, just join) and joins it to the room.
/// Returns the seq the socket now holds.
async fn enter_room(app: &App, s: &SocketRef, channel: Uuid, replayed_to: Option<i64>) -> i64 {
    let (done, answer) = oneshot::channel();
    let entry = RoomEntry {
        socket: s.clone(),
        channel,
        replayed_to,
        done,
    };
    if app.room_entries.send(entry).is_err() {
        // No dispatcher (shutting down): join directly.
        s.join(channel_room(&channel));
        return replayed_to.unwrap_or(0);
    }
    answer.await.unwrap_or(replayed_to.unwrap_or(0))
}

/// The channels of `auth.since` (`{channelId: seq}`) that are among the
/// user's `channels`, with their seq. Anything else — not an object, a key
/// that is not a channel of the user, a seq that is not a non-negative
/// integer — is ignored (CONTRACT §9): the channel is then joined live only.
pub fn parse_since(auth: Option<&serde_json::Value>, channels: &[Uuid]) -> Vec<(Uuid, i64)> {
    let Some(serde_json::Value::Object(since)) = auth.and_then(|a| a.get("since")) else {
        return Vec::new();
    };
    let member: std::collections::HashSet<&Uuid> = channels.iter().collect();
    // Keyed by the parsed id: one channel spelled twice (case, braces, URN)
    // is caught up once, from the lower of its seqs (the client drops what
    // it already holds by id).
    let mut wanted: std::collections::BTreeMap<Uuid, i64> = std::collections::BTreeMap::new();
    for (k, v) in since {
        let (Ok(channel), Some(seq)) = (Uuid::parse_str(k), v.as_i64().filter(|s| *s >= 0)) else {
            continue;
        };
        if member.contains(&channel) {
            let held = wanted.entry(channel).or_insert(seq);
            *held = (*held).min(seq);
        }
    }
    wanted.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn since_keeps_only_valid_entries_of_member_channels() {
        let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let auth = json!({"since": {
            a.to_string(): 5, b.to_string(): -1, c.to_string(): 3,
            "not-a-uuid": 1, Uuid::now_v7().to_string(): 2
        }});
        let mut got = parse_since(Some(&auth), &[a, b]);
        got.sort();
        assert_eq!(got, vec![(a, 5)]);
        for bad in [json!({"since": [1, 2]}), json!({"since": "x"}), json!({})] {
            assert!(parse_since(Some(&bad), &[a]).is_empty());
        }
        let float = json!({"since": {a.to_string(): 1.5}});
        assert!(parse_since(Some(&float), &[a]).is_empty());
    }
}

/// Property tests of [`parse_since`], the parser of the handshake's
/// `auth.since` (CONTRACT §9): whatever a client sends, it never panics,
/// keeps exactly the entries naming one of the user's channels with a
/// non-negative integer seq, and names each channel at most once.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{json, Map, Value};

    /// Any JSON value, nested a few levels.
    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
                .map(Value::Number)),
            ".{0,40}".prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                prop::collection::btree_map(".{0,40}", inner, 0..8)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// A seq value and whether the contract accepts it (a non-negative integer).
    fn arb_seq() -> impl Strategy<Value = (Value, Option<i64>)> {
        prop_oneof![
            (0..=i64::MAX).prop_map(|s| (json!(s), Some(s))),
            Just((json!(0), Some(0))),
            (i64::MIN..0).prop_map(|s| (json!(s), None)),
            ((i64::MAX as u64 + 1)..=u64::MAX).prop_map(|s| (json!(s), None)),
            any::<f64>()
                .prop_filter("a float that is not an integer", |f| f.is_finite()
                    && f.fract() != 0.0)
                .prop_map(|f| (json!(f), None)),
            (0..1000i64).prop_map(|s| (json!(s.to_string()), None)),
            Just((Value::Null, None)),
            Just((json!(true), None)),
            Just((json!([1]), None)),
            Just((json!({"seq": 1}), None)),
        ]
    }

    proptest! {
        #![proptest_config(crate::testing::prop_config(512))]

        /// Arbitrary `auth` payloads: no panic, and only the user's channels
        /// with non-negative seqs come out.
        #[test]
        fn never_panics_and_only_yields_member_channels(
            auth in arb_json(),
            since in arb_json(),
            n in 0..4usize,
        ) {
            let channels: Vec<Uuid> = (0..n).map(|_| Uuid::now_v7()).collect();
            let mut with_since = auth.clone();
            if let Value::Object(m) = &mut with_since {
                m.insert("since".into(), since);
            }
            for a in [auth, with_since] {
                for (c, s) in parse_since(Some(&a), &channels) {
                    prop_assert!(channels.contains(&c));
                    prop_assert!(s >= 0);
                }
            }
            prop_assert!(parse_since(None, &channels).is_empty());
        }

        /// `since` keyed by canonical ids of member channels, non-member
        /// channels and junk keys: exactly the member entries with a
        /// non-negative integer seq are kept, with their seq.
        #[test]
        fn keeps_exactly_the_valid_member_entries(
            members in prop::collection::vec((arb_seq(), any::<bool>()), 0..6),
            others in prop::collection::vec(arb_seq(), 0..4),
            junk in prop::collection::btree_map("[^0-9a-fA-F-]{0,12}", arb_seq(), 0..4),
        ) {
            let channels: Vec<Uuid> = members.iter().map(|_| Uuid::now_v7()).collect();
            let mut since = Map::new();
            let mut expected = Vec::new();
            for (c, ((v, ok), listed)) in channels.iter().zip(&members) {
                if *listed {
                    since.insert(c.to_string(), v.clone());
                    if let Some(s) = ok {
                        expected.push((*c, *s));
                    }
                }
            }
            for (v, _) in others {
                since.insert(Uuid::now_v7().to_string(), v);
            }
            for (k, (v, _)) in junk {
                since.insert(k, v);
            }
            let mut got = parse_since(Some(&json!({"since": since})), &channels);
            got.sort();
            expected.sort();
            prop_assert_eq!(got, expected);
        }
    }

    /// The ways `Uuid::parse_str` accepts to spell one id.
    fn spellings(c: &Uuid) -> Vec<String> {
        vec![
            c.to_string(),
            c.to_string().to_uppercase(),
            c.simple().to_string(),
            c.braced().to_string(),
            c.urn().to_string(),
        ]
    }

    proptest! {
        #![proptest_config(crate::testing::prop_config(512))]

        /// Each channel is caught up at most once per handshake, however
        /// its id is spelled in `since`.
        #[test]
        fn names_each_channel_at_most_once(
            pick in prop::collection::vec((0..5usize, 0..1000i64), 2..5),
        ) {
            let c = Uuid::now_v7();
            let names = spellings(&c);
            let mut since = Map::new();
            for (i, s) in &pick {
                since.insert(names[*i].clone(), json!(s));
            }
            let got = parse_since(Some(&json!({"since": since})), &[c]);
            prop_assert!(got.len() <= 1, "{} entries for one channel: {:?}", got.len(), since);
        }
    }
}
