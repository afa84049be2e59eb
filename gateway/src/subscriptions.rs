//! Which channel topics this node listens to, and how far each channel's
//! messages have been emitted here.
//!
//! A node subscribes to a channel's topic when its first local socket enters
//! the channel and unsubscribes after the last one leaves, so its fan-out
//! traffic grows with its own sockets' channels, not with the cluster's.
//!
//! Alongside each subscription lives the channel's **cursor**: the `seq` of
//! the last `message:created` this node emitted for it. The dispatcher
//! ([`crate::fanout`]) uses it to drop redelivered duplicates and to notice a
//! jump (a message it never received), which it repairs from the database
//! (CONTRACT §9).

use std::collections::HashMap;
use std::sync::{Arc, Mutex as SyncMutex};

use switchboard_shared::bus::{Bus, BusResult, Topics};
use tokio::sync::Mutex;
use uuid::Uuid;

/// Reference counts of local sockets per channel, and the subscriptions
/// they imply. One async lock orders every subscribe and unsubscribe, so an
/// unsubscribe can never overtake the subscribe of a socket that arrived
/// just after the last one left. Cursors sit behind their own short,
/// synchronous lock: the dispatcher reads them per event and must never
/// wait behind a Redis round trip.
pub struct Subscriptions {
    bus: Arc<dyn Bus>,
    topics: Topics,
    refs: Mutex<HashMap<Uuid, usize>>,
    cursors: SyncMutex<HashMap<Uuid, i64>>,
}

/// What the dispatcher should do with a `message:created` of seq `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The next one (or the channel is not tracked): emit it.
    Emit,
    /// Already emitted (a redelivery after a worker crash): drop it.
    Duplicate,
    /// Messages `after + 1 .. seq` never arrived: repair them first.
    Gap { after: i64 },
}

impl Subscriptions {
    pub fn new(bus: Arc<dyn Bus>, topics: Topics) -> Self {
        Self {
            bus,
            topics,
            refs: Mutex::new(HashMap::new()),
            cursors: SyncMutex::new(HashMap::new()),
        }
    }

    fn cursors(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, i64>> {
        self.cursors.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one more local socket in each channel, subscribing where it is
    /// the first. `positions` are the channels with the seq of their latest
    /// message as read *before* this call: a new subscription's cursor
    /// starts there; anything published between that read and Redis'
    /// confirmation is found by the probe the caller sends once its socket
    /// is in the room ([`crate::state::AppState::probe`]). Returns, once Redis
    /// confirmed the subscriptions, the channels this node newly listens to.
    pub async fn retain(&self, positions: &[(Uuid, i64)]) -> BusResult<Vec<Uuid>> {
        let mut refs = self.refs.lock().await;
        let mut new = Vec::new();
        for (c, _) in positions {
            let n = refs.entry(*c).or_insert(0);
            if *n == 0 {
                new.push(*c);
            }
            *n += 1;
        }
        let topics = new.iter().map(|c| self.topics.channel(c)).collect();
        if let Err(e) = self.bus.subscribe(topics).await {
            // Undo the counts so a later retain subscribes again.
            for (c, _) in positions {
                if let Some(n) = refs.get_mut(c) {
                    *n -= 1;
                    if *n == 0 {
                        refs.remove(c);
                    }
                }
            }
            return Err(e);
        }
        {
            let mut cursors = self.cursors();
            for (c, position) in positions {
                cursors.entry(*c).or_insert(*position);
            }
        }
        metrics::gauge!("gateway_channel_subscriptions").set(refs.len() as f64);
        Ok(new)
    }

    /// Counts one local socket less in each channel, unsubscribing after the last.
    pub async fn release(&self, channels: &[Uuid]) {
        let mut refs = self.refs.lock().await;
        let mut gone = Vec::new();
        for c in channels {
            if let Some(n) = refs.get_mut(c) {
                *n -= 1;
                if *n == 0 {
                    refs.remove(c);
                    gone.push(*c);
                }
            }
        }
        {
            let mut cursors = self.cursors();
            for c in &gone {
                cursors.remove(c);
            }
        }
        let topics = gone.iter().map(|c| self.topics.channel(c)).collect();
        if let Err(e) = self.bus.unsubscribe(topics).await {
            tracing::warn!(error = %e, "unsubscribe failed");
        }
        metrics::gauge!("gateway_channel_subscriptions").set(refs.len() as f64);
    }

    /// Decides about a live `message:created` of `channel` with `seq`, and
    /// moves the cursor to `seq` unless it is a duplicate.
    pub fn step(&self, channel: &Uuid, seq: i64) -> Step {
        let mut cursors = self.cursors();
        let Some(cursor) = cursors.get_mut(channel) else {
            return Step::Emit;
        };
        let last = *cursor;
        if seq <= last {
            return Step::Duplicate;
        }
        *cursor = seq;
        if seq == last + 1 {
            Step::Emit
        } else {
            Step::Gap { after: last }
        }
    }

    /// Moves a cursor forward after a repair (never backwards).
    pub fn advance(&self, channel: &Uuid, seq: i64) {
        if let Some(c) = self.cursors().get_mut(channel) {
            *c = (*c).max(seq);
        }
    }

    /// Every tracked channel with its cursor.
    pub fn tracked(&self) -> Vec<(Uuid, i64)> {
        self.cursors().iter().map(|(c, s)| (*c, *s)).collect()
    }

    /// The cursor of one channel.
    pub fn cursor(&self, channel: &Uuid) -> Option<i64> {
        self.cursors().get(channel).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_shared::bus::memory::MemoryBus;

    #[tokio::test]
    async fn cursors_drop_duplicates_and_report_gaps() {
        let subs = Subscriptions::new(Arc::new(MemoryBus::new(10)), Topics::new("t"));
        let c = Uuid::now_v7();
        subs.retain(&[(c, 4)]).await.expect("retain");
        assert_eq!(subs.step(&c, 5), Step::Emit);
        assert_eq!(subs.step(&c, 5), Step::Duplicate);
        assert_eq!(subs.step(&c, 3), Step::Duplicate);
        assert_eq!(subs.step(&c, 8), Step::Gap { after: 5 });
        assert_eq!(subs.cursor(&c), Some(8));
        // A second socket does not move the cursor back.
        subs.retain(&[(c, 2)]).await.expect("retain");
        assert_eq!(subs.cursor(&c), Some(8));
        subs.release(&[c]).await;
        assert_eq!(subs.cursor(&c), Some(8));
        subs.release(&[c]).await;
        assert_eq!(
            subs.cursor(&c),
            None,
            "the last socket gone, the cursor goes"
        );
        assert_eq!(
            subs.step(&c, 1),
            Step::Emit,
            "untracked channels are emitted"
        );
    }
}
