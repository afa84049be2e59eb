//! `channel:sync {channelId, afterSeq}`: catch-up on demand (CONTRACT §9),
//! answered like a reconnect's catch-up, plus the acknowledgement
//! `{ok: true, recovered, fromSeq, toSeq}` (or `lastSeq` when more than
//! `RECOVERY_MAX_MESSAGES` were missed).

use serde_json::{json, Value};
use socketioxide::extract::SocketRef;
use uuid::Uuid;

use super::inbox::Inbound;
use super::membership::refuse;
use super::Session;
use crate::state::{channel_room, App};

pub async fn sync(app: &App, s: &SocketRef, session: &Session, inbound: Inbound) {
    let data = inbound.data.as_ref();
    let Some(Value::String(raw)) = data.and_then(|d| d.get("channelId")).cloned() else {
        return refuse(s, inbound, None, "channelId is required");
    };
    let Some(after) = data
        .and_then(|d| d.get("afterSeq"))
        .and_then(Value::as_i64)
        .filter(|a| *a >= 0)
    else {
        return refuse(
            s,
            inbound,
            Some(raw),
            "afterSeq must be a non-negative integer",
        );
    };
    let Some(channel) = Uuid::parse_str(&raw).ok().filter(|c| session.is_member(c)) else {
        return refuse(s, inbound, Some(raw), "Not a member of this channel");
    };
    // Out of the room while the replay runs; the dispatcher puts the socket
    // back after sending what the room got meanwhile.
    s.leave(channel_room(&channel));
    match super::recover(app, s, channel, after).await {
        Ok(r) => {
            let mut answer = json!({"ok": true, "channelId": raw, "recovered": r.recovered});
            for (k, v) in [
                ("fromSeq", r.from_seq),
                ("toSeq", r.to_seq),
                ("lastSeq", r.last_seq),
            ] {
                if let Some(v) = v {
                    answer[k] = json!(v);
                }
            }
            let _ = inbound.ack.send(&answer);
        }
        Err(error) => {
            let _ = inbound.ack.send(&json!({"ok": false, "error": error}));
        }
    }
}
