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
use socketioxide::extract::{AckSender, SocketRef};
use switchboard_shared::protocol::{
    events, iso, DeliveryStatus, MessageDelivered, MessageFailed, Outcome, OutcomeResult,
};
use uuid::Uuid;

struct Entry {
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
    pub fn insert(&self, id: Uuid, socket: SocketRef, ack: Option<AckSender>) {
        self.entries.insert(
            id,
            Entry {
                socket,
                ack,
                sent: false,
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
        match outcome.result {
            OutcomeResult::Delivered { message_id } => {
                let _ = entry.socket.emit(
                    events::MESSAGE_DELIVERED,
                    &MessageDelivered {
                        message_id: message_id.to_string(),
                        temp_id: outcome.temp_id,
                        status: DeliveryStatus::Delivered,
                        processed: Some(true),
                        timestamp: now,
                    },
                );
                if let Some(ack) = entry.ack {
                    let _ = ack.send(&serde_json::json!({
                        "status": "DELIVERED",
                        "messageId": message_id.to_string(),
                    }));
                }
            }
            OutcomeResult::Failed { error } => {
                metrics::counter!("gateway_messages_failed_total").increment(1);
                let _ = entry.socket.emit(
                    events::MESSAGE_FAILED,
                    &MessageFailed::new(error.clone(), outcome.temp_id),
                );
                if let Some(ack) = entry.ack {
                    let _ = ack.send(&serde_json::json!({"status": "FAILED", "error": error}));
                }
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
