//! Fan-out on a gateway: which pub/sub topics this node listens to, and how
//! what arrives there reaches the local sockets.
//!
//! A node subscribes to a channel's topic when its first local socket enters
//! the channel and unsubscribes after the last one leaves, so its fan-out
//! traffic grows with its own sockets' channels, not with the cluster's. It
//! also listens to its own node topic (answers for its sockets) and to the
//! membership topic (someone joined a channel somewhere).

use std::collections::HashMap;
use std::sync::Arc;

use switchboard_shared::bus::{Bus, BusResult, TopicMessage, Topics};
use switchboard_shared::protocol::{self, ChannelEvent, MembershipChange, Outcome};
use tokio::sync::{broadcast, Mutex};
use uuid::Uuid;

use crate::state::{channel_room, user_room, App, NAMESPACES};

/// Reference counts of local sockets per channel, and the subscriptions
/// they imply. One async lock orders every subscribe and unsubscribe, so an
/// unsubscribe can never overtake the subscribe of a socket that arrived
/// just after the last one left.
pub struct Subscriptions {
    bus: Arc<dyn Bus>,
    topics: Topics,
    refs: Mutex<HashMap<Uuid, usize>>,
}

impl Subscriptions {
    pub fn new(bus: Arc<dyn Bus>, topics: Topics) -> Self {
        Self {
            bus,
            topics,
            refs: Mutex::new(HashMap::new()),
        }
    }

    /// Counts one more local socket in each channel, subscribing where it is
    /// the first. Returns once Redis confirmed the subscriptions, so events
    /// published afterwards are received.
    pub async fn retain(&self, channels: &[Uuid]) -> BusResult<()> {
        let mut refs = self.refs.lock().await;
        let mut new = Vec::new();
        for c in channels {
            let n = refs.entry(*c).or_insert(0);
            if *n == 0 {
                new.push(self.topics.channel(c));
            }
            *n += 1;
        }
        if let Err(e) = self.bus.subscribe(new).await {
            // Undo the counts so a later retain subscribes again.
            for c in channels {
                if let Some(n) = refs.get_mut(c) {
                    *n -= 1;
                    if *n == 0 {
                        refs.remove(c);
                    }
                }
            }
            return Err(e);
        }
        metrics::gauge!("gateway_channel_subscriptions").set(refs.len() as f64);
        Ok(())
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
                    gone.push(self.topics.channel(c));
                }
            }
        }
        if let Err(e) = self.bus.unsubscribe(gone).await {
            tracing::warn!(error = %e, "unsubscribe failed");
        }
        metrics::gauge!("gateway_channel_subscriptions").set(refs.len() as f64);
    }
}

/// Subscribes the node's own topics and dispatches everything that arrives,
/// in arrival order (one task: per-channel order is preserved end to end).
pub async fn start(app: App) -> BusResult<tokio::task::JoinHandle<()>> {
    let mut rx = app.bus.incoming();
    app.bus
        .subscribe(vec![app.topics.node(&app.node_id), app.topics.membership()])
        .await?;
    Ok(tokio::spawn(async move {
        let channel_prefix = format!("{}:ch:", app.topics.prefix());
        let node_topic = app.topics.node(&app.node_id);
        let membership_topic = app.topics.membership();
        loop {
            let msg: TopicMessage = match rx.recv().await {
                Ok(m) => m,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    metrics::counter!("gateway_fanout_lagged_total").increment(n);
                    tracing::error!(lost = n, "fan-out dispatcher lagged");
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => break,
            };
            if let Some(id) = msg.topic.strip_prefix(&channel_prefix) {
                let Ok(channel) = Uuid::parse_str(id) else {
                    continue;
                };
                match protocol::decode::<Vec<ChannelEvent>>(&msg.payload) {
                    Ok(events) => {
                        for event in &events {
                            emit_to_channel(&app, &channel, event).await;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "undecodable channel event"),
                }
            } else if msg.topic == node_topic {
                match protocol::decode::<Vec<Outcome>>(&msg.payload) {
                    Ok(outcomes) => outcomes.into_iter().for_each(|o| app.pending.resolve(o)),
                    Err(e) => tracing::warn!(error = %e, "undecodable outcome"),
                }
            } else if msg.topic == membership_topic {
                match protocol::decode::<MembershipChange>(&msg.payload) {
                    Ok(change) => crate::socket::membership::apply(&app, change).await,
                    Err(e) => tracing::warn!(error = %e, "undecodable membership change"),
                }
            }
        }
    }))
}

async fn emit_to_channel(app: &App, channel: &Uuid, event: &ChannelEvent) {
    let room = channel_room(channel);
    for ns in NAMESPACES {
        if !app.namespace_in_use(ns) {
            continue;
        }
        let Some(op) = app.io.of(ns) else { continue };
        let res = match event {
            ChannelEvent::MessageCreated(p) => op.to(room.clone()).emit(event.name(), p).await,
            ChannelEvent::ReactionAdded(p) => op.to(room.clone()).emit(event.name(), p).await,
            ChannelEvent::ReactionRemoved(p) => op.to(room.clone()).emit(event.name(), p).await,
            ChannelEvent::MessageRead(p) => op.to(room.clone()).emit(event.name(), p).await,
            ChannelEvent::UserJoined(p) => op.to(room.clone()).emit(event.name(), p).await,
        };
        if let Err(e) = res {
            tracing::debug!(error = %e, "room emit failed");
        }
    }
    metrics::counter!("gateway_channel_events_total").increment(1);
}

/// Sockets of `user_id` on this node, in every namespace.
pub fn local_sockets_of(app: &App, user_id: &str) -> Vec<socketioxide::extract::SocketRef> {
    let room = user_room(user_id);
    NAMESPACES
        .iter()
        .filter_map(|ns| app.io.of(*ns))
        .flat_map(|op| op.to(room.clone()).sockets())
        .collect()
}
