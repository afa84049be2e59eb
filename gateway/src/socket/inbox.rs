//! Per-socket inbox: the events of one socket are handled one at a time, in
//! the order they arrived.
//!
//! socketioxide spawns a task per incoming event, and tasks spawned in a row
//! may run in any order (tokio's LIFO slot even favours the newest). A chat
//! needs one sender's messages persisted in the order sent, so the
//! [`Enqueue`] extractor — which socketioxide runs synchronously, in arrival
//! order, before spawning the handler — moves the event into a bounded
//! channel read by one task per socket. A full inbox answers the event at
//! once with an error instead of buffering without bound.

use std::convert::Infallible;
use std::sync::{Arc, OnceLock};

use socketioxide::adapter::LocalAdapter;
use socketioxide::extract::{AckSender, Event, TryData};
use socketioxide::handler::{FromMessageParts, Value};
use socketioxide::socket::Socket;
use switchboard_shared::protocol::events;
use tokio::sync::mpsc;

/// One event waiting to be handled.
pub struct Inbound {
    pub event: String,
    /// The payload, or `None` when it was not valid JSON.
    pub data: Option<serde_json::Value>,
    pub ack: AckSender,
}

/// A socket's inbox, kept in its extensions (as an `Arc`) once the socket
/// is authenticated. The channel and the task reading it are created by the
/// socket's first event: most connections of a chat sit idle most of the
/// time, and an idle one then holds neither (~1.2 KB: the channel's shared
/// state and first block, the task). Removing it from the extensions drops
/// the sender, which ends the task once it has drained.
pub struct Inbox {
    capacity: usize,
    tx: OnceLock<mpsc::Sender<Box<Inbound>>>,
    /// Spawns the task that reads the channel.
    start: Box<dyn Fn(mpsc::Receiver<Box<Inbound>>) + Send + Sync>,
}

impl Inbox {
    /// An inbox of `capacity` events whose reader `start` spawns.
    pub fn new(
        capacity: usize,
        start: impl Fn(mpsc::Receiver<Box<Inbound>>) + Send + Sync + 'static,
    ) -> Self {
        Self {
            capacity,
            tx: OnceLock::new(),
            start: Box::new(start),
        }
    }

    fn sender(&self) -> &mpsc::Sender<Box<Inbound>> {
        self.tx.get_or_init(|| {
            // Boxed events: a channel allocates its slots 32 at a time, 32
            // boxes are 256 bytes, 32 events 2.6 KB.
            let (tx, rx) = mpsc::channel(self.capacity);
            (self.start)(rx);
            tx
        })
    }
}

/// Extractor whose only job is to enqueue the event, synchronously.
pub struct Enqueue;

impl FromMessageParts<LocalAdapter> for Enqueue {
    type Error = Infallible;

    fn from_message_parts(
        s: &Arc<Socket<LocalAdapter>>,
        v: &mut Value,
        ack_id: &Option<i64>,
    ) -> Result<Self, Infallible> {
        let event = Event::from_message_parts(s, v, ack_id)
            .map(|e| e.0)
            .unwrap_or_default();
        let Some(label) = client_event(&event) else {
            // Not a client event of the protocol: dropped unread, unanswered.
            return Ok(Enqueue);
        };
        let Some(inbox) = s.extensions.get::<Arc<Inbox>>() else {
            // Not authenticated: no inbox, the event is dropped (CONTRACT §2).
            return Ok(Enqueue);
        };
        let Ok(TryData(data)) = TryData::<serde_json::Value>::from_message_parts(s, v, ack_id);
        let Ok(ack) = AckSender::from_message_parts(s, v, ack_id);
        metrics::counter!("gateway_events_received_total", "event" => label).increment(1);
        let inbound = Box::new(Inbound {
            event,
            data: data.ok(),
            ack,
        });
        if let Err(mpsc::error::TrySendError::Full(inbound)) = inbox.sender().try_send(inbound) {
            metrics::counter!("gateway_inbox_full_total").increment(1);
            refuse_full(s, *inbound);
        }
        Ok(Enqueue)
    }
}

/// The events a client may send (CONTRACT); they are also the `event`
/// label of `gateway_events_received_total` (client-chosen names would make
/// the label set unbounded).
const CLIENT_EVENTS: [&str; 9] = [
    events::MESSAGE_SEND,
    events::MESSAGE_READ,
    events::REACTION_ADD,
    events::REACTION_REMOVE,
    events::CHANNEL_JOIN,
    events::CHANNEL_LEAVE,
    events::CHANNEL_SYNC,
    events::TYPING_START,
    events::TYPING_STOP,
];

/// `event` as one of [`CLIENT_EVENTS`], or `None`.
fn client_event(event: &str) -> Option<&'static str> {
    CLIENT_EVENTS.iter().find(|k| **k == event).copied()
}

/// Answers an event refused because the inbox is full, in the shape of its
/// area's errors, echoing what identifies it (`tempId`, `messageId`, …).
fn refuse_full(s: &Arc<Socket<LocalAdapter>>, inbound: Inbound) {
    use switchboard_shared::protocol::{ChannelError, MessageError, MessageFailed, ReactionError};
    const ERROR: &str = "Too many events in flight on this connection, slow down";
    let field = |k: &str| {
        inbound
            .data
            .as_ref()
            .and_then(|d| d.get(k))
            .and_then(|v| v.as_str())
            .map(String::from)
    };
    let _ = match inbound.event.as_str() {
        // Volatile: dropped without an answer.
        events::TYPING_START | events::TYPING_STOP => return,
        events::MESSAGE_SEND => s.emit(
            events::MESSAGE_FAILED,
            &MessageFailed::new(ERROR, field("tempId")),
        ),
        events::MESSAGE_READ => s.emit(
            events::MESSAGE_ERROR,
            &MessageError {
                message_id: field("messageId"),
                error: ERROR.into(),
            },
        ),
        events::CHANNEL_JOIN | events::CHANNEL_LEAVE | events::CHANNEL_SYNC => s.emit(
            events::CHANNEL_ERROR,
            &ChannelError {
                channel_id: field("channelId"),
                error: ERROR.into(),
            },
        ),
        _ => s.emit(
            events::REACTION_ERROR,
            &ReactionError {
                message_id: field("messageId"),
                kind: field("type"),
                error: ERROR.into(),
            },
        ),
    };
    let _ = inbound
        .ack
        .send(&serde_json::json!({"ok": false, "status": "FAILED", "error": ERROR}));
}
