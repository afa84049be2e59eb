//! Typing indicators (CONTRACT §11): `typing:start` / `typing:stop` from a
//! member become `typing {channelId, userId, typing}` for the channel's
//! other members on every node.
//!
//! Volatile by design: never through the streams, never stored, not
//! ordered with messages; published straight on the channel's topic. This
//! node keeps, per user and channel typing here, what it last forwarded and
//! what the user wants now, so that
//! - at most one event per `TYPING_INTERVAL_MS` is forwarded per user and
//!   channel (a change inside the interval is sent when it ends, so the last
//!   state always arrives);
//! - a `typing: true` not renewed within `TYPING_TIMEOUT_MS` is followed by
//!   `typing: false` from the server (a closed tab, a node that lost the
//!   client: the typist's own node times it out).
//!
//! The throttle is per node: a user typing into one channel from two nodes
//! at once may reach twice the rate.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use switchboard_shared::protocol::{self, ChannelEvent};
use uuid::Uuid;

use crate::state::App;

/// How often pending changes and timeouts are looked at.
const TICK: Duration = Duration::from_millis(200);

struct Entry {
    /// What the others were last told.
    sent: bool,
    /// What the user wants them to see.
    want: bool,
    /// When a `want: true` lapses without renewal.
    deadline: Instant,
    /// When something was last forwarded.
    last_sent: Option<Instant>,
}

impl Entry {
    /// Applies the timeout and, if the throttle allows, returns the state to
    /// forward now.
    fn step(&mut self, now: Instant, interval: Duration) -> Option<bool> {
        if self.want && now >= self.deadline {
            self.want = false;
        }
        let open = self.last_sent.is_none_or(|t| now >= t + interval);
        if self.want != self.sent && open {
            self.sent = self.want;
            self.last_sent = Some(now);
            return Some(self.sent);
        }
        None
    }

    /// Nothing to send and the throttle window is over: forget it.
    fn settled(&self, now: Instant, interval: Duration) -> bool {
        !self.want && !self.sent && self.last_sent.is_none_or(|t| now >= t + interval)
    }
}

/// The typing state of this node's users.
#[derive(Default)]
pub struct Typing {
    entries: Mutex<HashMap<(String, Uuid), Entry>>,
}

impl Typing {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, Uuid), Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A `typing:start` (`typing`) or `typing:stop` of a member; the state
    /// to forward now, if any.
    pub fn update(
        &self,
        user: &str,
        channel: Uuid,
        typing: bool,
        now: Instant,
        interval: Duration,
        timeout: Duration,
    ) -> Option<bool> {
        let mut entries = self.lock();
        let key = (user.to_string(), channel);
        if !typing && !entries.contains_key(&key) {
            return None;
        }
        let entry = entries.entry(key).or_insert(Entry {
            sent: false,
            want: false,
            deadline: now,
            last_sent: None,
        });
        entry.want = typing;
        if typing {
            entry.deadline = now + timeout;
        }
        entry.step(now, interval)
    }

    /// Changes due now (timeouts, and changes the throttle held back).
    pub fn due(&self, now: Instant, interval: Duration) -> Vec<(String, Uuid, bool)> {
        let mut out = Vec::new();
        self.lock().retain(|(user, channel), entry| {
            if let Some(typing) = entry.step(now, interval) {
                out.push((user.clone(), *channel, typing));
            }
            !entry.settled(now, interval)
        });
        out
    }
}

/// Handles a `typing:start` / `typing:stop` payload of a socket of `user`.
/// Dropped (counted, not answered: the event is volatile) when malformed or
/// when the user is not a member.
pub async fn on_event(
    app: &App,
    session: &crate::socket::Session,
    data: Option<&serde_json::Value>,
    typing: bool,
) {
    let channel = data
        .and_then(|d| d.get("channelId"))
        .and_then(|c| c.as_str())
        .and_then(|c| Uuid::parse_str(c).ok());
    let Some(channel) = channel else {
        metrics::counter!("gateway_typing_dropped_total", "reason" => "invalid").increment(1);
        return;
    };
    if !session.is_member(&channel) {
        metrics::counter!("gateway_typing_dropped_total", "reason" => "not_member").increment(1);
        return;
    }
    let forward = app.typing.update(
        &session.user.id,
        channel,
        typing,
        Instant::now(),
        Duration::from_millis(app.settings.typing_interval_ms),
        Duration::from_millis(app.settings.typing_timeout_ms),
    );
    if let Some(state) = forward {
        publish(app, &session.user.id, channel, state).await;
    }
}

async fn publish(app: &App, user: &str, channel: Uuid, typing: bool) {
    let event = ChannelEvent::Typing(protocol::Typing {
        channel_id: channel.to_string(),
        user_id: user.to_string(),
        typing,
    });
    let Ok(bytes) = protocol::encode(&[event]) else {
        return;
    };
    metrics::counter!("gateway_typing_forwarded_total").increment(1);
    if let Err(e) = app
        .bus
        .publish(vec![(app.topics.channel(&channel), bytes.into())])
        .await
    {
        tracing::debug!(error = %e, "typing event not published");
    }
}

/// Sends what the throttle held back and the automatic stops.
pub fn spawn_ticker(app: &App) {
    let app = app.clone();
    tokio::spawn(async move {
        let interval = Duration::from_millis(app.settings.typing_interval_ms);
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            for (user, channel, typing) in app.typing.due(Instant::now(), interval) {
                publish(&app, &user, channel, typing).await;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const I: Duration = Duration::from_millis(1000);
    const T: Duration = Duration::from_millis(6000);

    #[test]
    fn start_is_forwarded_then_throttled_and_the_last_state_follows() {
        let t = Typing::default();
        let c = Uuid::now_v7();
        let t0 = Instant::now();
        assert_eq!(t.update("a", c, true, t0, I, T), Some(true));
        // Renewals are not forwarded.
        assert_eq!(t.update("a", c, true, t0 + I / 2, I, T), None);
        // A stop inside the interval waits for its end...
        assert_eq!(t.update("a", c, false, t0 + I / 2, I, T), None);
        assert!(t.due(t0 + I / 2, I).is_empty());
        // ...and is sent then.
        assert_eq!(t.due(t0 + I, I), vec![("a".to_string(), c, false)]);
        // Then the entry is forgotten.
        assert!(t.due(t0 + 3 * I, I).is_empty());
        assert!(t.lock().is_empty());
    }

    #[test]
    fn an_unrenewed_start_times_out() {
        let t = Typing::default();
        let c = Uuid::now_v7();
        let t0 = Instant::now();
        assert_eq!(t.update("a", c, true, t0, I, T), Some(true));
        assert_eq!(t.update("a", c, true, t0 + 3 * I, I, T), None);
        assert!(
            t.due(t0 + 8 * I, I).is_empty(),
            "renewed at 3 s: lasts to 9 s"
        );
        assert_eq!(t.due(t0 + 9 * I, I), vec![("a".to_string(), c, false)]);
    }

    #[test]
    fn a_stop_without_a_start_sends_nothing() {
        let t = Typing::default();
        let c = Uuid::now_v7();
        assert_eq!(t.update("a", c, false, Instant::now(), I, T), None);
        assert!(t.lock().is_empty());
    }

    #[test]
    fn users_and_channels_are_independent() {
        let t = Typing::default();
        let (c1, c2) = (Uuid::now_v7(), Uuid::now_v7());
        let t0 = Instant::now();
        assert_eq!(t.update("a", c1, true, t0, I, T), Some(true));
        assert_eq!(t.update("a", c2, true, t0, I, T), Some(true));
        assert_eq!(t.update("b", c1, true, t0, I, T), Some(true));
    }
}
