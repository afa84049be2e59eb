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
//!   `typing: false` from the server (the typist's own node times it out),
//!   and a closing socket stops its user's typing at once (a closed tab).
//!
//! The throttle is per node: a user typing into one channel from two nodes
//! at once may reach twice the rate.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use std::sync::Arc;

use switchboard_shared::bus::{Bus, Topics};
use switchboard_shared::protocol::{self, ChannelEvent};
use uuid::Uuid;

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

/// The typing state of this node's users, and where it is published.
pub struct Typing {
    entries: Mutex<HashMap<(String, Uuid), Entry>>,
    bus: Arc<dyn Bus>,
    topics: Topics,
    /// `TYPING_INTERVAL_MS`.
    interval: Duration,
    /// `TYPING_TIMEOUT_MS`.
    timeout: Duration,
}

impl Typing {
    pub fn new(bus: Arc<dyn Bus>, topics: Topics, interval: Duration, timeout: Duration) -> Self {
        Self {
            entries: Mutex::default(),
            bus,
            topics,
            interval,
            timeout,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, Uuid), Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A `typing:start` (`typing`) or `typing:stop` of a member of
    /// `channel` (the caller checked it): forwarded now, later, or not at
    /// all, as the throttle says.
    pub async fn request(&self, user: &str, channel: Uuid, typing: bool) {
        if let Some(state) = self.update(user, channel, typing, Instant::now()) {
            self.publish(user, channel, state).await;
        }
    }

    /// A socket of `user` closed: whatever they were typing stops now
    /// rather than at the timeout (a closed tab). Another open tab still
    /// typing starts again with its next renewal.
    pub async fn stop_user(&self, user: &str) {
        let now = Instant::now();
        let forward: Vec<(Uuid, bool)> = {
            let mut entries = self.lock();
            entries
                .iter_mut()
                .filter(|((u, _), e)| u == user && e.want)
                .filter_map(|((_, channel), entry)| {
                    entry.want = false;
                    entry
                        .step(now, self.interval)
                        .map(|state| (*channel, state))
                })
                .collect()
        };
        for (channel, state) in forward {
            self.publish(user, channel, state).await;
        }
    }

    /// The state change to forward now, if any.
    fn update(&self, user: &str, channel: Uuid, typing: bool, now: Instant) -> Option<bool> {
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
            entry.deadline = now + self.timeout;
        }
        entry.step(now, self.interval)
    }

    /// Changes due now (timeouts, and changes the throttle held back).
    fn due(&self, now: Instant) -> Vec<(String, Uuid, bool)> {
        let interval = self.interval;
        let mut out = Vec::new();
        self.lock().retain(|(user, channel), entry| {
            if let Some(typing) = entry.step(now, interval) {
                out.push((user.clone(), *channel, typing));
            }
            !entry.settled(now, interval)
        });
        out
    }

    async fn publish(&self, user: &str, channel: Uuid, typing: bool) {
        let event = ChannelEvent::Typing(protocol::Typing {
            channel_id: channel.to_string(),
            user_id: user.to_string(),
            typing,
        });
        let Ok(bytes) = protocol::encode(&[event]) else {
            return;
        };
        metrics::counter!("gateway_typing_forwarded_total").increment(1);
        if let Err(e) = self
            .bus
            .publish(vec![(self.topics.channel(&channel), bytes.into())])
            .await
        {
            tracing::debug!(error = %e, "typing event not published");
        }
    }

    /// Sends what the throttle held back, and the automatic stops.
    pub fn spawn_ticker(self: &Arc<Self>) {
        let typing = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                for (user, channel, state) in typing.due(Instant::now()) {
                    typing.publish(&user, channel, state).await;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_shared::bus::memory::MemoryBus;

    const I: Duration = Duration::from_millis(1000);
    const T: Duration = Duration::from_millis(6000);

    fn typing() -> Typing {
        Typing::new(Arc::new(MemoryBus::new(10)), Topics::new("t"), I, T)
    }

    #[test]
    fn start_is_forwarded_then_throttled_and_the_last_state_follows() {
        let t = typing();
        let c = Uuid::now_v7();
        let t0 = Instant::now();
        assert_eq!(t.update("a", c, true, t0), Some(true));
        // Renewals are not forwarded.
        assert_eq!(t.update("a", c, true, t0 + I / 2), None);
        // A stop inside the interval waits for its end...
        assert_eq!(t.update("a", c, false, t0 + I / 2), None);
        assert!(t.due(t0 + I / 2).is_empty());
        // ...and is sent then.
        assert_eq!(t.due(t0 + I), vec![("a".to_string(), c, false)]);
        // Then the entry is forgotten.
        assert!(t.due(t0 + 3 * I).is_empty());
        assert!(t.lock().is_empty());
    }

    #[test]
    fn an_unrenewed_start_times_out() {
        let t = typing();
        let c = Uuid::now_v7();
        let t0 = Instant::now();
        assert_eq!(t.update("a", c, true, t0), Some(true));
        assert_eq!(t.update("a", c, true, t0 + 3 * I), None);
        assert!(t.due(t0 + 8 * I).is_empty(), "renewed at 3 s: lasts to 9 s");
        assert_eq!(t.due(t0 + 9 * I), vec![("a".to_string(), c, false)]);
    }

    #[tokio::test]
    async fn a_closed_socket_stops_its_users_typing() {
        let t = typing();
        let (c1, c2) = (Uuid::now_v7(), Uuid::now_v7());
        let t0 = Instant::now() - 2 * I;
        assert_eq!(t.update("a", c1, true, t0), Some(true));
        assert_eq!(t.update("a", c2, true, Instant::now()), Some(true));
        assert_eq!(t.update("b", c1, true, t0), Some(true));
        t.stop_user("a").await;
        // c1 was sent long enough ago: stopped at once; c2 waits for its
        // interval and goes out from the ticker; b is untouched.
        let entries = t.lock();
        assert!(!entries[&("a".to_string(), c1)].sent);
        assert!(entries[&("a".to_string(), c2)].sent && !entries[&("a".to_string(), c2)].want);
        assert!(entries[&("b".to_string(), c1)].want);
    }

    #[test]
    fn a_stop_without_a_start_sends_nothing() {
        let t = typing();
        let c = Uuid::now_v7();
        assert_eq!(t.update("a", c, false, Instant::now()), None);
        assert!(t.lock().is_empty());
    }

    #[test]
    fn users_and_channels_are_independent() {
        let t = typing();
        let (c1, c2) = (Uuid::now_v7(), Uuid::now_v7());
        let t0 = Instant::now();
        assert_eq!(t.update("a", c1, true, t0), Some(true));
        assert_eq!(t.update("a", c2, true, t0), Some(true));
        assert_eq!(t.update("b", c1, true, t0), Some(true));
    }
}
