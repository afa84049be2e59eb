//! Channel membership on a gateway: `channel:join`, `channel:leave` and
//! REST removals, and membership changes made anywhere in the cluster
//! reaching this node's sockets.
//!
//! A removal is ordered so that it holds from the moment it is
//! acknowledged: the row is deleted; the leaver's sockets on this node get
//! `channel:user_left` and are revoked (out of the room and the session's
//! membership) at once; then one pipeline publishes `channel:user_left` on
//! the channel topic followed by the `Left` change on the membership topic.
//! Every other node reads both on its one subscriber connection, in that
//! order and before anything published after the acknowledgement, and its
//! dispatcher revokes the user's sockets synchronously ([`revoke_local`]),
//! so they get the `channel:user_left` and nothing after it.

use bytes::Bytes;
use chrono::Utc;
use serde_json::Value;
use socketioxide::extract::SocketRef;
use switchboard_shared::protocol::{
    self, events, iso, ChannelError, ChannelEvent, MembershipChange, MembershipKind, UserJoined,
    UserLeft,
};
use switchboard_shared::store::entities::channel;
use switchboard_shared::store::{AddMember, RemoveMember};
use uuid::Uuid;

use super::inbox::Inbound;
use super::Session;
use crate::state::{local_sockets_of, App};

/// Applies a membership change published by any node (REST invitation or a
/// join from another device): the user's sockets here enter the room; or,
/// for a removal, give back the subscriptions [`revoke_local`] left held.
pub async fn apply(app: &App, change: MembershipChange) {
    for s in local_sockets_of(app, &change.user_id) {
        if let Some(session) = s.extensions.get::<std::sync::Arc<Session>>() {
            match change.kind {
                MembershipKind::Joined => {
                    session
                        .enter(app, &s, change.channel_id, change.position)
                        .await;
                }
                MembershipKind::Left => session.leave(app, &s, change.channel_id).await,
            }
        }
    }
}

/// Takes the user's sockets on this node out of the channel without
/// waiting (called by the dispatcher, in order with the channel's events).
pub fn revoke_local(app: &App, user_id: &str, channel_id: Uuid) {
    for s in local_sockets_of(app, user_id) {
        if let Some(session) = s.extensions.get::<std::sync::Arc<Session>>() {
            session.revoke(&s, channel_id);
        }
    }
}

fn membership_change(
    user_id: &str,
    channel_id: Uuid,
    kind: MembershipKind,
    position: Option<i64>,
) -> Option<Bytes> {
    let change = MembershipChange {
        user_id: user_id.to_string(),
        channel_id,
        kind,
        position,
    };
    match protocol::encode(&change) {
        Ok(bytes) => Some(Bytes::from(bytes)),
        Err(e) => {
            tracing::warn!(error = %e, "membership change not encoded");
            None
        }
    }
}

/// Why a leave or removal was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoveError {
    NotMember,
    OwnerWithMembers,
    Unavailable,
}

impl RemoveError {
    pub fn message(self) -> &'static str {
        match self {
            RemoveError::NotMember => "Not a member of this channel",
            RemoveError::OwnerWithMembers => {
                "The owner cannot leave a channel that has other members"
            }
            RemoveError::Unavailable => "Service temporarily unavailable",
        }
    }
}

/// Removes `user_id` from `channel` (persisted) with the ordering described
/// in the module documentation; `removed_by` is `None` for a leave. When
/// this returns `Ok`, the user's sockets on this node are out, and every
/// other node has been sent the change.
pub async fn remove(
    app: &App,
    channel: &channel::Model,
    user_id: &str,
    removed_by: Option<&str>,
) -> Result<(), RemoveError> {
    match app
        .store
        .remove_member(channel.id, &channel.owner_id, user_id)
        .await
    {
        Ok(RemoveMember::Removed) => {}
        Ok(RemoveMember::NotMember) => return Err(RemoveError::NotMember),
        Ok(RemoveMember::OwnerWithMembers) => return Err(RemoveError::OwnerWithMembers),
        Err(e) => {
            tracing::warn!(error = %e, "remove member failed");
            return Err(RemoveError::Unavailable);
        }
    }
    let left = UserLeft {
        user_id: user_id.to_string(),
        channel_id: channel.id.to_string(),
        removed_by: removed_by.map(str::to_string),
        timestamp: iso(Utc::now()),
    };
    // This node's sockets of the user: told directly, then revoked, before
    // the event reaches this node's dispatcher (which would otherwise race
    // the revocation and could emit it twice or not at all).
    let local = local_sockets_of(app, user_id);
    for s in &local {
        let _ = s.emit(events::CHANNEL_USER_LEFT, &left);
        if let Some(session) = s.extensions.get::<std::sync::Arc<Session>>() {
            session.revoke(s, channel.id);
        }
    }
    let mut batch = Vec::with_capacity(2);
    if let Ok(bytes) = protocol::encode(&[ChannelEvent::UserLeft(left)]) {
        batch.push((app.topics.channel(&channel.id), Bytes::from(bytes)));
    }
    if let Some(change) = membership_change(user_id, channel.id, MembershipKind::Left, None) {
        batch.push((app.topics.membership(), change));
    }
    // One pipeline on one connection: every node reads the event before the
    // change. The removal is persisted either way; a failed publish leaves
    // other nodes' sockets in the room until they reconnect.
    if let Err(e) = app.bus.publish(batch).await {
        tracing::warn!(error = %e, "channel removal not published");
    }
    // Subscriptions are given back off the caller's path.
    let app = app.clone();
    let channel_id = channel.id;
    tokio::spawn(async move {
        for s in local {
            if let Some(session) = s.extensions.get::<std::sync::Arc<Session>>() {
                session.leave(&app, &s, channel_id).await;
            }
        }
    });
    Ok(())
}

/// Tells every node that `user_id` is now a member of `channel_id`.
pub async fn announce(app: &App, user_id: &str, channel_id: Uuid) {
    // Read after the membership was stored and before anyone is told.
    let position = match app.store.max_seqs(&[channel_id]).await {
        Ok(m) => m.get(&channel_id).copied(),
        Err(e) => {
            tracing::warn!(error = %e, "channel position unavailable; nodes read it themselves");
            None
        }
    };
    let Some(change) = membership_change(user_id, channel_id, MembershipKind::Joined, position)
    else {
        return;
    };
    if let Err(e) = app
        .bus
        .publish(vec![(app.topics.membership(), change)])
        .await
    {
        tracing::warn!(error = %e, "membership change not published");
    }
}

/// Refuses a channel event: `channel:error` and `{ok: false}` to its ack.
pub(super) fn refuse(s: &SocketRef, inbound: Inbound, channel_id: Option<String>, error: &str) {
    let payload = ChannelError {
        channel_id,
        error: error.to_string(),
    };
    super::refuse(s, inbound.ack, events::CHANNEL_ERROR, &payload, error);
}

/// The channel a `channel:join` / `channel:leave` names, or `None` after
/// refusing the event (missing id, unknown channel, database down).
async fn named_channel(
    app: &App,
    s: &SocketRef,
    inbound: Inbound,
) -> Option<(
    Inbound,
    String,
    switchboard_shared::store::entities::channel::Model,
)> {
    let raw = inbound
        .data
        .as_ref()
        .and_then(|d| d.get("channelId"))
        .cloned();
    let Some(Value::String(raw)) = raw else {
        refuse(s, inbound, None, "channelId is required");
        return None;
    };
    let Ok(channel_id) = Uuid::parse_str(&raw) else {
        refuse(s, inbound, Some(raw), "Channel not found");
        return None;
    };
    match app.store.channel(channel_id).await {
        Ok(Some(c)) => Some((inbound, raw, c)),
        Ok(None) => {
            refuse(s, inbound, Some(raw), "Channel not found");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "channel lookup failed");
            refuse(s, inbound, Some(raw), "Service temporarily unavailable");
            None
        }
    }
}

/// `channel:leave {channelId}` (CONTRACT §3).
pub async fn leave(app: &App, s: &SocketRef, session: &Session, inbound: Inbound) {
    let Some((inbound, raw, channel)) = named_channel(app, s, inbound).await else {
        return;
    };
    let user = session.user.id.clone();
    if let Err(e) = remove(app, &channel, &user, None).await {
        return refuse(s, inbound, Some(raw), e.message());
    }
    let _ = inbound.ack.send(&serde_json::json!({
        "ok": true,
        "channelId": raw,
        "userId": user,
    }));
}

pub async fn join(app: &App, s: &SocketRef, session: &Session, inbound: Inbound) {
    let Some((inbound, raw, channel)) = named_channel(app, s, inbound).await else {
        return;
    };
    let channel_id = channel.id;
    let user = session.user.id.clone();
    if channel.is_private {
        match app.store.is_member(channel_id, &user).await {
            Ok(true) => {}
            Ok(false) => return refuse(s, inbound, Some(raw), "This channel is private"),
            Err(_) => return refuse(s, inbound, Some(raw), "Service temporarily unavailable"),
        }
    }
    let added = match app.store.add_member(channel_id, &user, None).await {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, "add member failed");
            return refuse(s, inbound, Some(raw), "Service temporarily unavailable");
        }
    };
    if !session.enter(app, s, channel_id, None).await {
        return refuse(s, inbound, Some(raw), "Service temporarily unavailable");
    }
    let joined = UserJoined {
        user_id: user.clone(),
        channel_id: raw.clone(),
        timestamp: iso(Utc::now()),
    };
    if added == AddMember::Added {
        announce(app, &user, channel_id).await;
        let event = ChannelEvent::UserJoined(joined.clone());
        if let Ok(bytes) = protocol::encode(&[event]) {
            let _ = app
                .bus
                .publish(vec![(app.topics.channel(&channel_id), Bytes::from(bytes))])
                .await;
        }
    } else {
        // Already a member: nothing to persist or broadcast; confirm to the caller.
        let _ = s.emit(events::CHANNEL_USER_JOINED, &joined);
    }
    let _ = inbound.ack.send(&serde_json::json!({
        "ok": true,
        "channelId": raw,
        "userId": user,
    }));
}
