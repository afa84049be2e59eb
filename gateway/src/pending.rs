//! Writes accepted by this node and not yet answered by a worker.
//!
//! The `SENT` event is emitted by the socket's inbox task after the stream
//! append returns, while the final outcome arrives on the node topic from a
//! worker, on another task. A fast worker can answer before `SENT` went out;
//! the entry then keeps the outcome until `SENT` is emitted, so the sender
//! always sees SENT → DELIVERED/FAILED in that order. The acknowledgement
//! callback, when the client gave one, is answered once, with the final
//! outcome.

use std::time::{Duration, Instant};

use dashmap::DashMap;
use serde_json::json;
use socketioxide::extract::{AckSender, SocketRef};
use switchboard_shared::protocol::{
    events, iso, DeliveryStatus, MessageDelivered, MessageError, MessageFailed, Outcome,
    OutcomeResult, ReactionError,
};

fn error_of(result: OutcomeResult) -> String {
    match result {
        OutcomeResult::Failed { error } => error,
        _ => "Unexpected answer".to_string(),
    }
}
use uuid::Uuid;

/// What kind of write an entry is, for the shape of its answer.
pub enum Kind {
    /// `message:send`: SENT, then DELIVERED or FAILED.
    Message,
    /// `reaction:add` / `reaction:remove`: errors as `reaction:error`.
    Reaction { message_id: String, kind: String },
    /// `message:read`: errors as `message:error`.
    Read { message_id: String },
}

struct Entry {
    kind: Kind,
    socket: SocketRef,
    ack: Option<AckSender>,
    sent: bool,
    early: Option<Outcome>,
    accepted_at: Instant,
}

#[derive(Default)]
pub struct Pending {
    entries: DashMap<Uuid, Entry>,
}

impl Pending {
    /// Registers a write before it is appended to the stream.
    pub fn insert(&self, id: Uuid, kind: Kind, socket: SocketRef, ack: Option<AckSender>) {
        // Only messages have a SENT step to wait for.
        let sent = !matches!(kind, Kind::Message);
        self.entries.insert(
            id,
            Entry {
                kind,
                socket,
                ack,
                sent,
                early: None,
                accepted_at: Instant::now(),
            },
        );
    }

    /// The append failed: forget the write and hand back its ack sender.
    pub fn abort(&self, id: &Uuid) -> Option<AckSender> {
        self.entries.remove(id).and_then(|(_, e)| e.ack)
    }

    /// `SENT` has been emitted; deliver an outcome that arrived early.
    pub fn mark_sent(&self, id: &Uuid) {
        let early = match self.entries.get_mut(id) {
            Some(mut e) => {
                e.sent = true;
                e.early.take()
            }
            None => None,
        };
        if let Some(outcome) = early {
            self.resolve(outcome);
        }
    }

    /// A worker's outcome for a write of this node.
    pub fn resolve(&self, outcome: Outcome) {
        let id = outcome.request_id;
        if let Some(mut e) = self.entries.get_mut(&id) {
            if !e.sent {
                e.early = Some(outcome);
                return;
            }
        }
        let Some((_, entry)) = self.entries.remove(&id) else {
            return;
        };
        metrics::histogram!("gateway_send_to_delivered_seconds")
            .record(entry.accepted_at.elapsed().as_secs_f64());
        let now = iso(chrono::Utc::now());
        let Entry {
            kind, socket, ack, ..
        } = entry;
        let reply = |body: serde_json::Value| {
            if let Some(ack) = ack {
                let _ = ack.send(&body);
            }
        };
        match (kind, outcome.result) {
            (Kind::Message, OutcomeResult::Delivered { message_id }) => {
                let _ = socket.emit(
                    events::MESSAGE_DELIVERED,
                    &MessageDelivered {
                        message_id: message_id.to_string(),
                        temp_id: outcome.temp_id,
                        status: DeliveryStatus::Delivered,
                        processed: Some(true),
                        timestamp: now,
                    },
                );
                reply(json!({"status": "DELIVERED", "messageId": message_id.to_string()}));
            }
            (Kind::Message, result) => {
                let error = error_of(result);
                metrics::counter!("gateway_messages_failed_total").increment(1);
                let _ = socket.emit(
                    events::MESSAGE_FAILED,
                    &MessageFailed::new(error.clone(), outcome.temp_id),
                );
                reply(json!({"status": "FAILED", "error": error}));
            }
            (Kind::Reaction { message_id, kind }, OutcomeResult::Done) => {
                reply(json!({"ok": true, "messageId": message_id, "type": kind}));
            }
            (Kind::Reaction { message_id, kind }, result) => {
                let error = error_of(result);
                let _ = socket.emit(
                    events::REACTION_ERROR,
                    &ReactionError {
                        message_id: Some(message_id),
                        kind: Some(kind),
                        error: error.clone(),
                    },
                );
                reply(json!({"ok": false, "error": error}));
            }
            (Kind::Read { message_id }, OutcomeResult::Done) => {
                reply(json!({"ok": true, "messageId": message_id}));
            }
            (Kind::Read { message_id }, result) => {
                let error = error_of(result);
                let _ = socket.emit(
                    events::MESSAGE_ERROR,
                    &MessageError {
                        message_id: Some(message_id),
                        error: error.clone(),
                    },
                );
                reply(json!({"ok": false, "error": error}));
            }
        }
    }

    /// Forgets writes older than `max_age` whose outcome never came (the
    /// worker answers every write it processes; this bounds memory if a node
    /// topic message was lost during a Redis outage).
    pub fn sweep(&self, max_age: Duration) {
        self.entries
            .retain(|_, e| e.accepted_at.elapsed() < max_age);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}
