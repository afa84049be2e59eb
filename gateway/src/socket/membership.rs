//! Channel membership on a gateway: `channel:join`, and membership changes
//! made anywhere in the cluster reaching this node's sockets.

use bytes::Bytes;
use chrono::Utc;
use serde_json::Value;
use socketioxide::extract::SocketRef;
use switchboard_shared::protocol::{
    self, events, iso, ChannelError, ChannelEvent, MembershipChange, UserJoined,
};
use switchboard_shared::store::AddMember;
use uuid::Uuid;

use super::inbox::Inbound;
use super::Session;
use crate::state::{local_sockets_of, App};

/// Applies a membership change published by any node (REST invitation or a
/// join from another device): the user's sockets here enter the room.
pub async fn apply(app: &App, change: MembershipChange) {
    for s in local_sockets_of(app, &change.user_id) {
        if let Some(session) = s.extensions.get::<std::sync::Arc<Session>>() {
            session.enter(app, &s, change.channel_id).await;
        }
    }
}

/// Tells every node that `user_id` is now a member of `channel_id`.
pub async fn announce(app: &App, user_id: &str, channel_id: Uuid) {
    let change = MembershipChange {
        user_id: user_id.to_string(),
        channel_id,
    };
    match protocol::encode(&change) {
        Ok(bytes) => {
            if let Err(e) = app
                .bus
                .publish(vec![(app.topics.membership(), Bytes::from(bytes))])
                .await
            {
                tracing::warn!(error = %e, "membership change not published");
            }
        }
        Err(e) => tracing::warn!(error = %e, "membership change not encoded"),
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

pub async fn join(app: &App, s: &SocketRef, session: &Session, inbound: Inbound) {
    let raw = inbound
        .data
        .as_ref()
        .and_then(|d| d.get("channelId"))
        .cloned();
    let Some(Value::String(raw)) = raw else {
        return refuse(s, inbound, None, "channelId is required");
    };
    let Ok(channel_id) = Uuid::parse_str(&raw) else {
        return refuse(s, inbound, Some(raw), "Channel not found");
    };
    let channel = match app.store.channel(channel_id).await {
        Ok(Some(c)) => c,
        Ok(None) => return refuse(s, inbound, Some(raw), "Channel not found"),
        Err(e) => {
            tracing::warn!(error = %e, "channel lookup failed");
            return refuse(s, inbound, Some(raw), "Service temporarily unavailable");
        }
    };
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
    if !session.enter(app, s, channel_id).await {
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
