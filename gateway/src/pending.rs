//! Writes accepted by this node and not yet answered by a worker, and the
//! guarantee that each of them gets exactly one final answer within
//! `OUTCOME_TIMEOUT_MS`.
//!
//! The `SENT` event is emitted by the socket's inbox task after the stream
//! append returns, while the final outcome arrives on the node topic from a
//! worker, on another task. A fast worker can answer before `SENT` went out;
//! the entry then keeps the outcome until `SENT` is emitted, so the sender
//! always sees SENT → DELIVERED/FAILED in that order. The acknowledgement
//! callback, when the client gave one, is answered once, with the final
//! outcome.
//!
//! Outcomes travel over pub/sub, which loses what is published while a
//! gateway's subscriber reconnects, and Redis restarted empty loses the
//! stream entries themselves. Neither may leave a sender without an answer:
//! - after every pub/sub gap, [`Pending::confirm_stored`] looks the waiting
//!   messages up in the database (a stored row means DELIVERED: workers
//!   publish only after the insert);
//! - [`supervise`] answers every write still waiting at the timeout: its
//!   row if stored, else FAILED with [`errors::OUTCOME_UNKNOWN`]. Workers
//!   refuse to store an entry that old (`Settings::worker_expiry`), so that
//!   FAILED is never contradicted later.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use serde_json::json;
use socketioxide::extract::{AckSender, SocketRef};
use switchboard_shared::protocol::{
    errors, events, iso, DeliveryStatus, MessageDelivered, MessageError, MessageFailed, Outcome,
    OutcomeResult, ReactionError,
};
use switchboard_shared::store::Store;
use uuid::Uuid;

/// What kind of write an entry is, for the shape of its answer.
pub enum Kind {
    /// `message:send`: SENT, then DELIVERED or FAILED.
    Message { temp_id: Option<String> },
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
    early: Option<OutcomeResult>,
    accepted_at: Instant,
    /// The write's trace (`message:send`): the answer is traced under it.
    span: tracing::Span,
}

#[derive(Default)]
pub struct Pending {
    entries: DashMap<Uuid, Entry>,
}

fn error_of(result: OutcomeResult) -> String {
    match result {
        OutcomeResult::Failed { error } => error,
        _ => "Unexpected answer".to_string(),
    }
}

impl Pending {
    /// Registers a write before it is appended to the stream.
    pub fn insert(&self, id: Uuid, kind: Kind, socket: SocketRef, ack: Option<AckSender>) {
        // Only messages have a SENT step to wait for.
        let sent = !matches!(kind, Kind::Message { .. });
        self.entries.insert(
            id,
            Entry {
                kind,
                socket,
                ack,
                sent,
                early: None,
                accepted_at: Instant::now(),
                span: tracing::Span::none(),
            },
        );
    }

    /// Attaches the write's trace span, so that its answer continues it.
    pub fn set_span(&self, id: &Uuid, span: tracing::Span) {
        if let Some(mut e) = self.entries.get_mut(id) {
            e.span = span;
        }
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
        if let Some(result) = early {
            self.finish(*id, result);
        }
    }

    /// A worker's outcome for a write of this node.
    pub fn resolve(&self, outcome: Outcome) {
        self.finish(outcome.request_id, outcome.result);
    }

    /// Answers write `id` with `result`, once: a second answer for the same
    /// write (a redelivery, or a worker answering after the timeout) finds
    /// no entry and is dropped.
    fn finish(&self, id: Uuid, result: OutcomeResult) {
        if let Some(mut e) = self.entries.get_mut(&id) {
            if !e.sent {
                e.early = Some(result);
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
            kind,
            socket,
            ack,
            span,
            ..
        } = entry;
        let _deliver = tracing::debug_span!(parent: &span, "deliver").entered();
        // The acknowledgement's body is built only for a client that asked
        // for one (load generators and most UIs listen to the events).
        let reply = |body: &dyn Fn() -> serde_json::Value| {
            if let Some(ack) = ack {
                let _ = ack.send(&body());
            }
        };
        match (kind, result) {
            (Kind::Message { temp_id }, OutcomeResult::Delivered { message_id }) => {
                let _ = socket.emit(
                    events::MESSAGE_DELIVERED,
                    &MessageDelivered {
                        message_id: message_id.to_string(),
                        temp_id,
                        status: DeliveryStatus::Delivered,
                        processed: Some(true),
                        timestamp: now,
                    },
                );
                reply(&|| json!({"status": "DELIVERED", "messageId": message_id.to_string()}));
            }
            (Kind::Message { temp_id }, result) => {
                let error = error_of(result);
                metrics::counter!("gateway_messages_failed_total").increment(1);
                let _ = socket.emit(
                    events::MESSAGE_FAILED,
                    &MessageFailed::new(error.clone(), temp_id),
                );
                reply(&|| json!({"status": "FAILED", "error": error}));
            }
            (Kind::Reaction { message_id, kind }, OutcomeResult::Done) => {
                reply(&|| json!({"ok": true, "messageId": message_id, "type": kind}));
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
                reply(&|| json!({"ok": false, "error": error}));
            }
            (Kind::Read { message_id }, OutcomeResult::Done) => {
                reply(&|| json!({"ok": true, "messageId": message_id}));
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
                reply(&|| json!({"ok": false, "error": error}));
            }
        }
    }

    /// Messages that went out as `SENT` and wait for their outcome,
    /// accepted at least `min_age` ago.
    fn waiting_messages(&self, min_age: Duration) -> Vec<Uuid> {
        self.entries
            .iter()
            .filter(|e| e.sent && matches!(e.kind, Kind::Message { .. }))
            .filter(|e| e.accepted_at.elapsed() >= min_age)
            .map(|e| *e.key())
            .collect()
    }

    /// After a pub/sub gap: every waiting message already stored is
    /// answered DELIVERED (its outcome may have been published while this
    /// node was not listening). Returns how many were answered.
    pub async fn confirm_stored(&self, store: &Store) -> usize {
        let waiting = self.waiting_messages(Duration::ZERO);
        if waiting.is_empty() {
            return 0;
        }
        match stored_among(store, &waiting).await {
            Ok(stored) => {
                let n = stored.len();
                for id in stored {
                    self.finish(id, OutcomeResult::Delivered { message_id: id });
                }
                metrics::counter!("gateway_outcomes_recovered_total").increment(n as u64);
                n
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not look up waiting messages after a pub/sub gap");
                0
            }
        }
    }

    /// Answers every write still waiting after `timeout`: DELIVERED when its
    /// row is stored, else FAILED "safe to resend". If the database cannot
    /// be asked, the answer waits for the next round (the worker will not
    /// store it anyway past its expiry).
    pub async fn expire(&self, store: &Store, timeout: Duration) {
        let overdue: Vec<Uuid> = self
            .entries
            .iter()
            .filter(|e| e.sent && e.accepted_at.elapsed() >= timeout)
            .map(|e| *e.key())
            .collect();
        if overdue.is_empty() {
            return;
        }
        let messages: Vec<Uuid> = overdue
            .iter()
            .filter(|id| {
                self.entries
                    .get(id)
                    .is_some_and(|e| matches!(e.kind, Kind::Message { .. }))
            })
            .copied()
            .collect();
        let stored = match stored_among(store, &messages).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "could not look up overdue messages; retrying");
                return;
            }
        };
        for id in overdue {
            if stored.contains(&id) {
                self.finish(id, OutcomeResult::Delivered { message_id: id });
                continue;
            }
            metrics::counter!("gateway_outcomes_timed_out_total").increment(1);
            // Reactions and reads are idempotent, so retrying is safe too,
            // but they may have been applied: say only what is known.
            let error = if messages.contains(&id) {
                errors::OUTCOME_UNKNOWN
            } else {
                errors::NOT_CONFIRMED
            };
            self.finish(
                id,
                OutcomeResult::Failed {
                    error: error.into(),
                },
            );
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

async fn stored_among(store: &Store, ids: &[Uuid]) -> Result<HashSet<Uuid>, sea_orm::DbErr> {
    Ok(store
        .existing_messages(ids)
        .await?
        .into_iter()
        .map(|m| m.id)
        .collect())
}

/// How often overdue writes are looked for. Costs nothing while none is
/// overdue (no query is made).
const SUPERVISE_EVERY: Duration = Duration::from_millis(500);

/// Runs forever: answers writes that outlived the outcome timeout.
pub async fn supervise(pending: &Pending, store: &Store, timeout: Duration) {
    let mut tick = tokio::time::interval(SUPERVISE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        pending.expire(store, timeout).await;
    }
}
