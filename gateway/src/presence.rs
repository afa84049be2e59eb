//! Presence on a gateway (CONTRACT §11): this node's sockets in the
//! cluster-wide counts ([`switchboard_shared::presence`]), and the
//! `presence:changed` events and `online` lists that follow from them.
//!
//! - A handshake claims its socket's entry (`socket/mod.rs`); the claim
//!   says whether the user just came online, and then this node announces
//!   it.
//! - A closing socket releases its entry ([`release`]); going offline is
//!   never announced there but by a sweep after the offline grace, so a
//!   reconnect within it announces nothing either way.
//! - [`spawn_heartbeat`] keeps this node's entries alive; [`spawn_sweeper`]
//!   finds users whose last socket is gone (closed, or on a node that
//!   died) and announces them offline. Every node sweeps; each user is
//!   reported to one.
//!
//! Announcements go to the user's channels with at most
//! `PRESENCE_MAX_MEMBERS` members, as a volatile event on each channel's
//! topic (never through the streams): one database query and one
//! pipelined publish per transition, nothing per message.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use switchboard_shared::protocol::{self, iso, ChannelEvent, PresenceChanged};
use switchboard_shared::store::SessionChannels;
use uuid::Uuid;

use crate::state::App;

/// Most users one sweep takes offline (the rest wait for the next sweep).
const SWEEP_BATCH: usize = 1000;

/// Tells the user's small channels that they came online or went offline.
/// `known`: those channels when the caller has them (a handshake's `online`
/// lists are keyed by them), which spares a query. In a task of its own:
/// the caller never waits on the database for it.
pub fn announce(app: &App, user_id: String, online: bool, at_ms: i64, known: Option<Vec<Uuid>>) {
    if app.settings.presence_max_members == 0 || known.as_ref().is_some_and(|k| k.is_empty()) {
        metrics::counter!("gateway_presence_changes_total", "online" => online.to_string())
            .increment(1);
        return;
    }
    let app = app.clone();
    tokio::spawn(async move {
        let channels = match known {
            Some(c) => c,
            None => match app
                .store
                .small_channels_of(&user_id, app.settings.presence_max_members)
                .await
            {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(user = %user_id, error = %e, "presence change not announced");
                    return;
                }
            },
        };
        let timestamp = chrono::DateTime::from_timestamp_millis(at_ms)
            .map(iso)
            .unwrap_or_else(|| iso(chrono::Utc::now()));
        let mut batch = Vec::with_capacity(channels.len());
        for channel in channels {
            let event = ChannelEvent::PresenceChanged(PresenceChanged {
                channel_id: channel.to_string(),
                user_id: user_id.clone(),
                online,
                timestamp: timestamp.clone(),
            });
            if let Ok(bytes) = protocol::encode(&[event]) {
                batch.push((app.topics.channel(&channel), bytes.into()));
            }
        }
        metrics::counter!("gateway_presence_changes_total", "online" => online.to_string())
            .increment(1);
        if batch.is_empty() {
            return;
        }
        if let Err(e) = app.bus.publish(batch).await {
            tracing::warn!(user = %user_id, error = %e, "presence change not published");
        }
    });
}

/// What a handshake learns about presence in one Redis round trip, from the
/// members its database read brought ([`SessionChannels::small_members`]):
/// who is online in each of the user's small channels (the `online` lists
/// of `connection:success`), and which channels those are (where an arrival
/// is announced; none when presence is off).
pub struct OnlineLists {
    pub lists: BTreeMap<String, Vec<String>>,
    pub small_channels: Vec<Uuid>,
}

/// See [`OnlineLists`]. Presence is advisory: a Redis failure gives empty
/// lists, never a failed handshake.
pub async fn online_lists(app: &App, read: &SessionChannels) -> OnlineLists {
    let mut out = OnlineLists {
        lists: BTreeMap::new(),
        small_channels: read.small_channels(),
    };
    if app.settings.presence_max_members == 0 || read.small_members.is_empty() {
        return out;
    }
    let users: Vec<String> = read
        .small_members
        .iter()
        .map(|(_, u)| u.clone())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let online: HashSet<&String> = match app.presence.online(&users).await {
        Ok(flags) => users
            .iter()
            .zip(flags)
            .filter(|(_, on)| *on)
            .map(|(u, _)| u)
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "online lists unavailable");
            return out;
        }
    };
    for (channel, user) in &read.small_members {
        let list: &mut Vec<String> = out.lists.entry(channel.to_string()).or_default();
        if online.contains(user) {
            list.push(user.clone());
        }
    }
    out.lists.values_mut().for_each(|l| l.sort());
    out
}

/// The members of a channel online now (`GET /api/channels/{id}/presence`).
pub async fn channel_online(app: &App, channel: Uuid) -> anyhow::Result<Vec<String>> {
    let members = app.store.member_ids(channel).await?;
    let flags = app.presence.online(&members).await?;
    let mut online: Vec<String> = members
        .into_iter()
        .zip(flags)
        .filter(|(_, on)| *on)
        .map(|(u, _)| u)
        .collect();
    online.sort();
    Ok(online)
}

/// Stops counting this node's entry `member` (see `AppState::connections`).
/// If Redis cannot be reached the entry simply expires
/// (`CONNECTION_TTL_MS`): the heartbeat no longer refreshes it.
pub async fn release(app: &App, member: &str) {
    if let Some((_, user)) = app.connections.remove(member) {
        let grace = Duration::from_millis(app.settings.presence_offline_grace_ms);
        if let Err(e) = app.presence.release(&user, member, grace).await {
            tracing::debug!(error = %e, "connection entry left to expire");
        }
    }
}

/// Refreshes this node's entries every `CONNECTION_HEARTBEAT_MS`, so they
/// outlive `CONNECTION_TTL_MS` only while the node lives.
pub fn spawn_heartbeat(app: &App) {
    let app = app.clone();
    tokio::spawn(async move {
        let ttl = Duration::from_millis(app.settings.connection_ttl_ms);
        let mut tick =
            tokio::time::interval(Duration::from_millis(app.settings.connection_heartbeat_ms));
        loop {
            tick.tick().await;
            let entries: Vec<(String, String)> = app
                .connections
                .iter()
                .map(|e| (e.value().clone(), e.key().clone()))
                .collect();
            if entries.is_empty() {
                continue;
            }
            if let Err(e) = app.presence.refresh(&entries, ttl).await {
                tracing::warn!(error = %e, "connection heartbeat failed");
                continue;
            }
            // A socket released while the refresh was on its way may have
            // been added back: release those again.
            let grace = Duration::from_millis(app.settings.presence_offline_grace_ms);
            for (user, member) in &entries {
                if !app.connections.contains_key(member) {
                    let _ = app.presence.release(user, member, grace).await;
                }
            }
        }
    });
}

/// Every `PRESENCE_SWEEP_MS`, takes offline the users whose last socket
/// is gone and announces it.
pub fn spawn_sweeper(app: &App) {
    let app = app.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(app.settings.presence_sweep_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match app.presence.sweep(SWEEP_BATCH).await {
                Ok(gone) => {
                    for g in gone {
                        announce(&app, g.user_id, false, g.at_ms, None);
                    }
                }
                Err(e) => tracing::debug!(error = %e, "presence sweep failed"),
            }
        }
    });
}
