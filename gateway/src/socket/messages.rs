//! `message:send`: validate, assign the id, append to the channel's stream
//! partition, answer `SENT`. The worker's outcome comes back through
//! [`crate::pending`].

use bytes::Bytes;
use chrono::Utc;
use serde_json::Value;
use socketioxide::extract::{AckSender, SocketRef};
use switchboard_shared::bus::{partition_of, BusError};
use switchboard_shared::protocol::{
    self, events, iso, Author, Command, DeliveryStatus, MessageDelivered, MessageFailed,
    SendMessage,
};
use tracing::Instrument as _;
use uuid::Uuid;

use super::inbox::Inbound;
use super::Session;
use crate::pending::Kind;
use crate::state::App;

/// A validated `message:send`.
struct Draft {
    channel_id: Uuid,
    content: String,
    temp_id: Option<String>,
    reply_to_id: Option<Uuid>,
}

/// Refuses text the database cannot store. PostgreSQL rejects a NUL
/// character in any text value; accepted, such a write would only fail in
/// the worker, so every text field a client sends (socket events and REST)
/// is checked at the gateway and answered with the area's error at once.
pub fn storable(field: &str, value: &str) -> Result<(), String> {
    if value.contains('\0') {
        return Err(format!("{field} must not contain NUL characters"));
    }
    Ok(())
}

/// Checks a `message:send` payload (CONTRACT §4); the error is the client's
/// `message:failed.error`.
fn validate(app: &App, data: Option<&Value>) -> Result<Draft, String> {
    let Some(Value::Object(obj)) = data else {
        return Err("Invalid payload: expected an object {content, channelId, tempId?}".into());
    };
    let temp_id = match obj.get("tempId") {
        None | Some(Value::Null) => None,
        Some(Value::String(t)) if t.chars().count() <= app.settings.max_temp_id_chars => {
            storable("tempId", t)?;
            Some(t.clone())
        }
        Some(Value::String(_)) => {
            return Err(format!(
                "tempId is too long (at most {} characters)",
                app.settings.max_temp_id_chars
            ))
        }
        Some(_) => return Err("tempId must be a string".into()),
    };
    let content = match obj.get("content") {
        Some(Value::String(c)) => c,
        Some(_) => return Err("content must be a string".into()),
        None => return Err("content is required".into()),
    };
    if content.trim().is_empty() {
        return Err("Message content cannot be empty".into());
    }
    storable("content", content)?;
    let max = app.settings.max_content_chars;
    if content.chars().count() > max {
        return Err(format!(
            "Message content is too long (at most {max} characters)"
        ));
    }
    let channel_id = match obj.get("channelId") {
        Some(Value::String(c)) => {
            Uuid::parse_str(c).map_err(|_| "Channel not found".to_string())?
        }
        Some(_) => return Err("channelId must be a string".into()),
        None => return Err("channelId is required".into()),
    };
    let reply_to_id = match obj.get("replyToId") {
        None | Some(Value::Null) => None,
        Some(Value::String(r)) => {
            storable("replyToId", r)?;
            Some(Uuid::parse_str(r).map_err(|_| "replyToId is not a message id".to_string())?)
        }
        Some(_) => return Err("replyToId must be a string".into()),
    };
    Ok(Draft {
        channel_id,
        content: content.clone(),
        temp_id,
        reply_to_id,
    })
}

fn temp_id_of(data: Option<&Value>) -> Option<String> {
    data.and_then(|d| d.get("tempId"))
        .and_then(|t| t.as_str())
        .map(String::from)
}

fn fail(s: &SocketRef, ack: AckSender, error: &str, temp_id: Option<String>) {
    metrics::counter!("gateway_messages_failed_total").increment(1);
    let _ = s.emit(events::MESSAGE_FAILED, &MessageFailed::new(error, temp_id));
    let _ = ack.send(&serde_json::json!({"status": "FAILED", "error": error}));
}

/// `message:failed {error: "Rate limit exceeded", retryAfterMs, …}` and the
/// same to the acknowledgement (CONTRACT §10).
fn rate_limited(s: &SocketRef, ack: AckSender, retry_after_ms: u64, temp_id: Option<String>) {
    metrics::counter!("gateway_messages_failed_total").increment(1);
    let mut failed = MessageFailed::new(RATE_LIMITED, temp_id);
    failed.retry_after_ms = Some(retry_after_ms);
    let _ = s.emit(events::MESSAGE_FAILED, &failed);
    let _ = ack.send(&serde_json::json!({
        "status": "FAILED",
        "error": RATE_LIMITED,
        "retryAfterMs": retry_after_ms,
    }));
}

/// The error of a write refused by a rate limit.
pub const RATE_LIMITED: &str = "Rate limit exceeded";

/// A `message:send` that passed validation, registered as pending, ready
/// to be appended.
struct Prepared {
    id: Uuid,
    temp_id: Option<String>,
    partition: u32,
    bytes: Bytes,
    /// The message's trace root (its context travels in the stream entry).
    span: tracing::Span,
}

/// Validates one `message:send` and builds its stream entry; answers the
/// sender itself when it is refused.
async fn prepare(
    app: &App,
    s: &SocketRef,
    session: &Session,
    inbound: Inbound,
) -> Option<Prepared> {
    let Inbound { data, ack, .. } = inbound;
    let draft = match validate(app, data.as_ref()) {
        Ok(d) => d,
        Err(error) => {
            fail(s, ack, &error, temp_id_of(data.as_ref()));
            return None;
        }
    };
    if !session.is_member(&draft.channel_id) {
        let error = match app.store.channel(draft.channel_id).await {
            Ok(None) => "Channel not found",
            _ => "You are not a member of this channel",
        };
        fail(s, ack, error, draft.temp_id);
        return None;
    }
    if app.is_draining() {
        fail(
            s,
            ack,
            "Server is shutting down, please resend",
            draft.temp_id,
        );
        return None;
    }

    let id = Uuid::now_v7();
    let span =
        tracing::debug_span!("message:send", message_id = %id, channel_id = %draft.channel_id);
    let envelope = span.in_scope(|| {
        super::envelope(
            app,
            s,
            Command::SendMessage(SendMessage {
                id,
                channel_id: draft.channel_id,
                author: Author {
                    id: session.user.id.clone(),
                    name: session.user.name.clone(),
                    image_url: session.user.image_url.clone(),
                },
                content: draft.content,
                temp_id: draft.temp_id.clone(),
                reply_to_id: draft.reply_to_id,
            }),
        )
    });
    let bytes = match protocol::encode(&envelope) {
        Ok(b) => Bytes::from(b),
        Err(e) => {
            fail(
                s,
                ack,
                &format!("Could not encode the message: {e}"),
                draft.temp_id,
            );
            return None;
        }
    };
    app.pending.insert(
        id,
        Kind::Message {
            temp_id: draft.temp_id.clone(),
        },
        s.clone(),
        Some(ack),
    );
    app.pending.set_span(&id, span.clone());
    Some(Prepared {
        id,
        temp_id: draft.temp_id,
        partition: partition_of(&draft.channel_id, app.settings.stream_partitions),
        bytes,
        span,
    })
}

/// Handles consecutive `message:send` events of one socket: validated one by
/// one, appended in one round trip (in order), answered `SENT` in order.
pub async fn send_batch(app: &App, s: &SocketRef, session: &Session, batch: Vec<Inbound>) {
    let mut prepared = Vec::with_capacity(batch.len());
    for inbound in batch {
        if let Some(p) = prepare(app, s, session, inbound).await {
            prepared.push(p);
        }
    }
    if prepared.is_empty() {
        return;
    }
    // One round trip for the batch: traced under the first message.
    let append =
        tracing::debug_span!(parent: &prepared[0].span, "stream.append", entries = prepared.len());
    // The sender's token bucket is checked inside the same append script
    // (CONTRACT §10): rate limiting costs no extra round trip.
    let limit = app
        .settings
        .message_rate_limit(&app.topics, &session.user.id);
    let results = app
        .bus
        .append_many_limited(
            prepared
                .iter()
                .map(|p| (p.partition, p.bytes.clone()))
                .collect(),
            limit,
        )
        .instrument(append)
        .await;
    for (p, result) in prepared.into_iter().zip(results) {
        match result {
            Ok(_) => {
                metrics::counter!("gateway_messages_accepted_total").increment(1);
                let _ = s.emit(
                    events::MESSAGE_DELIVERED,
                    &MessageDelivered {
                        message_id: p.id.to_string(),
                        temp_id: p.temp_id,
                        status: DeliveryStatus::Sent,
                        processed: None,
                        timestamp: iso(Utc::now()),
                    },
                );
                app.pending.mark_sent(&p.id);
            }
            Err(BusError::RateLimited { retry_after_ms }) => {
                metrics::counter!("gateway_rate_limited_total", "area" => "messages").increment(1);
                if let Some(ack) = app.pending.abort(&p.id) {
                    rate_limited(s, ack, retry_after_ms, p.temp_id);
                }
            }
            Err(e) => {
                let error = match e {
                    BusError::Full => "Server is busy, please retry later".to_string(),
                    other => {
                        tracing::warn!(error = %other, "stream append failed");
                        "Message queue unavailable, please retry".to_string()
                    }
                };
                if let Some(ack) = app.pending.abort(&p.id) {
                    fail(s, ack, &error, p.temp_id);
                }
            }
        }
    }
}
