//! `reaction:add`, `reaction:remove` and `message:read`: checked here, then
//! appended to the stream partition of the message's channel, so they are
//! applied in order with that channel's messages (a reaction never overtakes
//! its message). Errors go to the caller as `reaction:error` /
//! `message:error` and as the acknowledgement `{ok: false, error}`.

use bytes::Bytes;
use serde_json::Value;
use socketioxide::extract::SocketRef;
use switchboard_shared::bus::{partition_of, BusError};
use switchboard_shared::protocol::{
    self, events, Command, MessageError, ReactionCommand, ReactionError, ReadCommand,
};
use uuid::Uuid;

use super::inbox::Inbound;
use super::messages::storable;
use super::Session;
use crate::pending::Kind;
use crate::state::App;

fn text(data: Option<&Value>, key: &str) -> Option<String> {
    data.and_then(|d| d.get(key))
        .and_then(|v| v.as_str())
        .map(String::from)
}

/// Finds the message's channel and checks the caller is a member of it.
async fn channel_of(
    app: &App,
    session: &Session,
    message_id: &str,
) -> Result<(Uuid, Uuid), String> {
    let id = Uuid::parse_str(message_id).map_err(|_| "Message not found".to_string())?;
    let channel = match app.store.message_channel(id).await {
        Ok(Some(c)) => c,
        Ok(None) => return Err("Message not found".into()),
        Err(e) => {
            tracing::warn!(error = %e, "message lookup failed");
            return Err("Service temporarily unavailable".into());
        }
    };
    if !session.is_member(&channel) {
        return Err("You are not a member of this channel".into());
    }
    Ok((id, channel))
}

/// Appends a command; the answer comes back through [`crate::pending`].
async fn submit(
    app: &App,
    s: &SocketRef,
    inbound: Inbound,
    kind: Kind,
    command: Command,
) -> Result<(), (Inbound, String)> {
    let envelope = super::envelope(app, s, command);
    let bytes = match protocol::encode(&envelope) {
        Ok(b) => Bytes::from(b),
        Err(e) => return Err((inbound, format!("Could not encode the request: {e}"))),
    };
    let id = envelope.command.request_id();
    let partition = partition_of(
        &envelope.command.channel_id(),
        app.settings.stream_partitions,
    );
    let Inbound { event, data, ack } = inbound;
    app.pending.insert(id, kind, s.clone(), Some(ack));
    match app.bus.append(partition, bytes).await {
        Ok(_) => Ok(()),
        Err(e) => {
            let error = match e {
                BusError::Full => "Server is busy, please retry later".to_string(),
                _ => "Message queue unavailable, please retry".to_string(),
            };
            match app.pending.abort(&id) {
                Some(ack) => Err((Inbound { event, data, ack }, error)),
                None => Ok(()),
            }
        }
    }
}

fn reaction_error(
    s: &SocketRef,
    inbound: Inbound,
    message_id: Option<String>,
    kind: Option<String>,
    error: &str,
) {
    let payload = ReactionError {
        message_id,
        kind,
        error: error.to_string(),
    };
    super::refuse(s, inbound.ack, events::REACTION_ERROR, &payload, error);
}

pub async fn react(app: &App, s: &SocketRef, session: &Session, inbound: Inbound, add: bool) {
    let message_id = text(inbound.data.as_ref(), "messageId");
    let kind = text(inbound.data.as_ref(), "type");
    let (Some(message_id), Some(kind)) = (message_id.clone(), kind.clone()) else {
        return reaction_error(
            s,
            inbound,
            message_id,
            kind,
            "messageId and type must be strings",
        );
    };
    if let Err(error) = storable("messageId", &message_id).and(storable("type", &kind)) {
        return reaction_error(s, inbound, Some(message_id), Some(kind), &error);
    }
    let max = app.settings.max_reaction_type_bytes;
    if kind.trim().is_empty() || kind.len() > max {
        let error = format!("type must be a non-empty string of at most {max} bytes");
        return reaction_error(s, inbound, Some(message_id), Some(kind), &error);
    }
    let (mid, channel_id) = match channel_of(app, session, &message_id).await {
        Ok(ids) => ids,
        Err(error) => return reaction_error(s, inbound, Some(message_id), Some(kind), &error),
    };
    let cmd = ReactionCommand {
        request_id: Uuid::now_v7(),
        channel_id,
        message_id: mid,
        user_id: session.user.id.clone(),
        kind: kind.clone(),
    };
    let command = if add {
        Command::AddReaction(cmd)
    } else {
        Command::RemoveReaction(cmd)
    };
    let pending = Kind::Reaction {
        message_id: message_id.clone(),
        kind: kind.clone(),
    };
    if let Err((inbound, error)) = submit(app, s, inbound, pending, command).await {
        reaction_error(s, inbound, Some(message_id), Some(kind), &error);
    }
}

fn read_error(s: &SocketRef, inbound: Inbound, message_id: Option<String>, error: &str) {
    let payload = MessageError {
        message_id,
        error: error.to_string(),
    };
    super::refuse(s, inbound.ack, events::MESSAGE_ERROR, &payload, error);
}

pub async fn read(app: &App, s: &SocketRef, session: &Session, inbound: Inbound) {
    let Some(message_id) = text(inbound.data.as_ref(), "messageId") else {
        return read_error(s, inbound, None, "messageId must be a string");
    };
    if let Err(error) = storable("messageId", &message_id) {
        return read_error(s, inbound, Some(message_id), &error);
    }
    let (mid, channel_id) = match channel_of(app, session, &message_id).await {
        Ok(ids) => ids,
        Err(error) => return read_error(s, inbound, Some(message_id), &error),
    };
    let command = Command::ReadMessage(ReadCommand {
        request_id: Uuid::now_v7(),
        channel_id,
        message_id: mid,
        user_id: session.user.id.clone(),
    });
    let pending = Kind::Read {
        message_id: message_id.clone(),
    };
    if let Err((inbound, error)) = submit(app, s, inbound, pending, command).await {
        read_error(s, inbound, Some(message_id), &error);
    }
}
