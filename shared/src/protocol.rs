//! The wire protocol: Socket.IO event names and payloads as the seed document
//! and CONTRACT.md name them (JSON, camelCase), plus the entries that travel
//! over the bus between gateways and workers (MessagePack, see [`crate::bus`]).

use std::collections::HashMap;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Socket.IO event names, in one place so a typo cannot split an event in two.
pub mod events {
    pub const CONNECTION_SUCCESS: &str = "connection:success";
    pub const CONNECTION_ERROR: &str = "connection:error";
    pub const MESSAGE_SEND: &str = "message:send";
    pub const MESSAGE_DELIVERED: &str = "message:delivered";
    pub const MESSAGE_CREATED: &str = "message:created";
    pub const MESSAGE_FAILED: &str = "message:failed";
    pub const MESSAGE_READ: &str = "message:read";
    pub const MESSAGE_ERROR: &str = "message:error";
    pub const REACTION_ADD: &str = "reaction:add";
    pub const REACTION_REMOVE: &str = "reaction:remove";
    pub const REACTION_ADDED: &str = "reaction:added";
    pub const REACTION_REMOVED: &str = "reaction:removed";
    pub const REACTION_ERROR: &str = "reaction:error";
    pub const CHANNEL_JOIN: &str = "channel:join";
    pub const CHANNEL_USER_JOINED: &str = "channel:user_joined";
    pub const CHANNEL_LEAVE: &str = "channel:leave";
    pub const CHANNEL_USER_LEFT: &str = "channel:user_left";
    pub const CHANNEL_ERROR: &str = "channel:error";
    pub const SERVER_SHUTDOWN: &str = "server:shutdown";
    pub const CHANNEL_SYNC: &str = "channel:sync";
    pub const CHANNEL_RECOVERED: &str = "channel:recovered";
    pub const PRESENCE_CHANGED: &str = "presence:changed";
    pub const TYPING_START: &str = "typing:start";
    pub const TYPING_STOP: &str = "typing:stop";
    pub const TYPING: &str = "typing";
}

/// Error strings a client may match on.
pub mod errors {
    pub const NOT_AUTHENTICATED: &str = "User not authenticated";
    pub const ALREADY_PROCESSING: &str = "Message already being processed";
    /// The outcome of an accepted write could not be established within
    /// `OUTCOME_TIMEOUT_MS` (for example Redis restarted empty and lost it).
    /// Deduplication makes a resend with the same `tempId` safe: it is either
    /// persisted once or answered with the original message id.
    pub const OUTCOME_UNKNOWN: &str =
        "Delivery could not be confirmed in time; it was not stored. Resending with the same tempId is safe";
    /// The same for a reaction or read, which are idempotent: retrying is safe.
    pub const NOT_CONFIRMED: &str = "The request could not be confirmed in time; retrying is safe";
}

/// ISO-8601 UTC with milliseconds, the format of every timestamp on the wire.
pub fn iso(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Delivery statuses of the seed's status flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum DeliveryStatus {
    Sending,
    Sent,
    Delivered,
    Read,
    Failed,
}

impl DeliveryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sending => "SENDING",
            Self::Sent => "SENT",
            Self::Delivered => "DELIVERED",
            Self::Read => "READ",
            Self::Failed => "FAILED",
        }
    }
}

// ---------------------------------------------------------------------------
// Server → client payloads
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionSuccess {
    pub user_id: String,
    pub channels: Vec<String>,
    /// Per listed channel, the seq of its latest message (0 if none) at
    /// the handshake (CONTRACT §9): where a client's catch-up starts.
    pub positions: std::collections::BTreeMap<String, i64>,
    /// Per listed channel with at most `PRESENCE_MAX_MEMBERS` members, its
    /// members online now (CONTRACT §11).
    pub online: std::collections::BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionError {
    pub error: String,
    pub reason: String,
    pub reconnect_attempt: u64,
}

/// `message:delivered`, both the `SENT` (gateway) and `DELIVERED` (worker) steps.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MessageDelivered {
    pub message_id: String,
    pub temp_id: Option<String>,
    pub status: DeliveryStatus,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub processed: Option<bool>,
    pub timestamp: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MessageFailed {
    pub error: String,
    pub temp_id: Option<String>,
    pub status: DeliveryStatus,
    pub processed: bool,
    pub timestamp: String,
    /// Set when the send was refused by the rate limit (CONTRACT §10).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub retry_after_ms: Option<u64>,
}

impl MessageFailed {
    pub fn new(error: impl Into<String>, temp_id: Option<String>) -> Self {
        Self {
            error: error.into(),
            temp_id,
            status: DeliveryStatus::Failed,
            processed: true,
            timestamp: iso(Utc::now()),
            retry_after_ms: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UserView {
    pub id: String,
    pub name: String,
    pub image_url: Option<String>,
}

/// A message as `message:created` and the history API show it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MessageView {
    pub id: String,
    pub content: String,
    pub channel_id: String,
    pub user_id: String,
    pub reply_to_id: Option<String>,
    pub delivery_status: DeliveryStatus,
    /// Position of the message in its channel: 1, 2, 3, … in persisted order.
    pub seq: i64,
    pub created_at: String,
    pub updated_at: String,
    pub user: UserView,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MessageCreated {
    pub message: MessageView,
    pub temp_id: Option<String>,
    pub processed: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReactionView {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub user_id: String,
    pub message_id: String,
    pub created_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReactionAdded {
    pub message_id: String,
    pub reaction: ReactionView,
    pub processed: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReactionRemoved {
    pub message_id: String,
    pub user_id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub processed: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MessageReadEvent {
    pub message_id: String,
    pub user_id: String,
    pub status: DeliveryStatus,
    pub timestamp: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UserJoined {
    pub user_id: String,
    pub channel_id: String,
    pub timestamp: String,
}

/// `presence:changed` (CONTRACT §11): a user came online or went offline.
/// `timestamp` is when it was decided (one clock per backend): of two
/// changes of one user, the later timestamp is the current state.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PresenceChanged {
    pub channel_id: String,
    pub user_id: String,
    pub online: bool,
    pub timestamp: String,
}

/// `typing` (CONTRACT §11), to the channel's members but the typist.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Typing {
    pub channel_id: String,
    pub user_id: String,
    pub typing: bool,
}

/// `channel:user_left` (CONTRACT §3): `removed_by` is `None` for a
/// `channel:leave`, the remover's id for a REST removal.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UserLeft {
    pub user_id: String,
    pub channel_id: String,
    pub removed_by: Option<String>,
    pub timestamp: String,
}

/// `channel:recovered` (CONTRACT §9): the end of a catch-up. With
/// `recovered: true`, every message `from_seq..=to_seq` was sent; with
/// `false`, more than `RECOVERY_MAX_MESSAGES` were missed, nothing was
/// replayed and `last_seq` says where the channel stands.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ChannelRecovered {
    pub channel_id: String,
    pub recovered: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_seq: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_seq: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_seq: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ChannelError {
    pub channel_id: Option<String>,
    pub error: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReactionError {
    pub message_id: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub error: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MessageError {
    pub message_id: Option<String>,
    pub error: String,
}

// ---------------------------------------------------------------------------
// Bus entries (MessagePack)
// ---------------------------------------------------------------------------

/// Where a command came from, so its per-socket answers find their way back.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Origin {
    /// Node id of the gateway holding the socket: its pub/sub topic.
    pub node: String,
    /// Namespace of the socket.
    pub ns: String,
    /// Socket id.
    pub sid: String,
}

/// The author as the gateway saw them at connect, so a worker needs no user
/// lookup per message.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Author {
    pub id: String,
    pub name: String,
    pub image_url: Option<String>,
}

/// One write, appended by a gateway to the stream partition of its channel.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CommandEnvelope {
    pub origin: Origin,
    /// W3C trace context (`traceparent`, `tracestate`) of the request.
    pub trace: HashMap<String, String>,
    pub command: Command,
    /// When the gateway accepted the write (Unix ms, gateway clock); a
    /// worker refuses to persist it past `Settings::worker_expiry`. 0 (an
    /// entry written before this field existed) means no deadline.
    #[serde(default)]
    pub accepted_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum Command {
    SendMessage(SendMessage),
    AddReaction(ReactionCommand),
    RemoveReaction(ReactionCommand),
    ReadMessage(ReadCommand),
}

impl Command {
    /// The channel whose partition (and order) the command belongs to.
    pub fn channel_id(&self) -> Uuid {
        match self {
            Command::SendMessage(m) => m.channel_id,
            Command::AddReaction(r) | Command::RemoveReaction(r) => r.channel_id,
            Command::ReadMessage(r) => r.channel_id,
        }
    }

    /// The id the gateway gave the command (key of its pending answer).
    pub fn request_id(&self) -> Uuid {
        match self {
            Command::SendMessage(m) => m.id,
            Command::AddReaction(r) | Command::RemoveReaction(r) => r.request_id,
            Command::ReadMessage(r) => r.request_id,
        }
    }

    pub fn temp_id(&self) -> Option<String> {
        match self {
            Command::SendMessage(m) => m.temp_id.clone(),
            _ => None,
        }
    }
}

/// `reaction:add` / `reaction:remove`, routed to the partition of the
/// message's channel so a reaction never overtakes its message.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReactionCommand {
    pub request_id: Uuid,
    pub channel_id: Uuid,
    pub message_id: Uuid,
    pub user_id: String,
    pub kind: String,
}

/// `message:read`: the read position of `user_id` moves to `message_id`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReadCommand {
    pub request_id: Uuid,
    pub channel_id: Uuid,
    pub message_id: Uuid,
    pub user_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SendMessage {
    /// The id the gateway assigned and announced with `SENT` (UUID v7).
    pub id: Uuid,
    pub channel_id: Uuid,
    pub author: Author,
    pub content: String,
    pub temp_id: Option<String>,
    pub reply_to_id: Option<Uuid>,
}

/// Fanned out on a channel's topic (a batch of them per message, in order);
/// every gateway holding a member socket emits them into its local room.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum ChannelEvent {
    MessageCreated(MessageCreated),
    ReactionAdded(ReactionAdded),
    ReactionRemoved(ReactionRemoved),
    MessageRead(MessageReadEvent),
    UserJoined(UserJoined),
    UserLeft(UserLeft),
    /// Volatile: published by gateways, never through the streams.
    PresenceChanged(PresenceChanged),
    /// Volatile, and not for the typist's own sockets.
    Typing(Typing),
}

impl ChannelEvent {
    pub fn name(&self) -> &'static str {
        match self {
            ChannelEvent::MessageCreated(_) => events::MESSAGE_CREATED,
            ChannelEvent::ReactionAdded(_) => events::REACTION_ADDED,
            ChannelEvent::ReactionRemoved(_) => events::REACTION_REMOVED,
            ChannelEvent::MessageRead(_) => events::MESSAGE_READ,
            ChannelEvent::UserJoined(_) => events::CHANNEL_USER_JOINED,
            ChannelEvent::UserLeft(_) => events::CHANNEL_USER_LEFT,
            ChannelEvent::PresenceChanged(_) => events::PRESENCE_CHANGED,
            ChannelEvent::Typing(_) => events::TYPING,
        }
    }
}

/// Published on a gateway node's own topic (a batch of them per message):
/// the final outcome of one command for the socket that sent it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Outcome {
    pub origin: Origin,
    /// The id the gateway assigned to the command (key of its pending answer).
    pub request_id: Uuid,
    pub temp_id: Option<String>,
    pub result: OutcomeResult,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum OutcomeResult {
    /// Persisted; `message_id` is the original id for a resent `tempId`.
    Delivered {
        message_id: Uuid,
    },
    /// A reaction or read command was applied (or was a no-op).
    Done,
    Failed {
        error: String,
    },
}

/// Published cluster-wide when someone becomes or stops being a member of a
/// channel, so that every gateway holding that user's sockets puts them in
/// the room, or takes them out of it, at once.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MembershipChange {
    pub user_id: String,
    pub channel_id: Uuid,
    /// Absent in changes of older nodes, which only announced joins.
    #[serde(default)]
    pub kind: MembershipKind,
    /// For a join: the seq of the channel's latest message when the
    /// membership was stored. A node that starts listening to the channel
    /// for this user starts there, so a message sent after the invitation
    /// was acknowledged reaches them even if it is stored before the node
    /// gets the change. `None` from older nodes: the node reads it itself.
    #[serde(default)]
    pub position: Option<i64>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub enum MembershipKind {
    #[default]
    Joined,
    Left,
}

/// Encodes a bus value as MessagePack (named fields, so that entries stay
/// readable by a newer node with added optional fields).
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, rmp_serde::encode::Error> {
    rmp_serde::to_vec_named(value)
}

/// Decodes a MessagePack bus value.
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, rmp_serde::decode::Error> {
    rmp_serde::from_slice(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_round_trips_through_messagepack() {
        let env = CommandEnvelope {
            origin: Origin {
                node: "n1".into(),
                ns: "/".into(),
                sid: "abc".into(),
            },
            trace: HashMap::from([("traceparent".into(), "00-x-y-01".into())]),
            accepted_ms: 1,
            command: Command::SendMessage(SendMessage {
                id: Uuid::now_v7(),
                channel_id: Uuid::now_v7(),
                author: Author {
                    id: "u".into(),
                    name: "U".into(),
                    image_url: None,
                },
                content: "hé".into(),
                temp_id: Some("t1".into()),
                reply_to_id: None,
            }),
        };
        let bytes = encode(&env).expect("encode");
        let back: CommandEnvelope = decode(&bytes).expect("decode");
        assert_eq!(back, env);
    }

    #[test]
    fn wire_names_are_camel_case() {
        let d = MessageDelivered {
            message_id: "m".into(),
            temp_id: None,
            status: DeliveryStatus::Sent,
            processed: None,
            timestamp: "t".into(),
        };
        let v = serde_json::to_value(&d).expect("json");
        assert_eq!(
            v,
            serde_json::json!({"messageId": "m", "tempId": null, "status": "SENT", "timestamp": "t"})
        );
    }
}
