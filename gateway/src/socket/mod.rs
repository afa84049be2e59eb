//! The Socket.IO side of a gateway: handshake authentication, the
//! per-socket session, and the event handlers.
//!
//! Life of a socket:
//! 1. [`authenticate`] runs as namespace middleware, *before* socketioxide
//!    sends the client its `connect` packet: it verifies the token, upserts
//!    the user, loads their channels, subscribes this node to those channels
//!    (awaiting Redis' confirmation), joins the rooms, opens the inbox and
//!    registers the event handlers. So an event the client emits right after
//!    `connect` is queued, never lost, and no channel event published after
//!    `connect` is missed. A failure is remembered, not returned, because the
//!    contract wants a `connection:error` event, which middleware cannot emit.
//! 2. [`on_connect`] then emits `connection:success`, or `connection:error`
//!    and disconnects; a rejected socket has no handlers and no inbox.
//! 3. The inbox task ([`inbox`]) handles its events one by one.
//! 4. On disconnect the channel subscriptions are released.

pub mod inbox;
pub mod membership;
pub mod messages;
pub mod reactions;
pub mod session;
pub mod sync;

use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use axum::extract::ConnectInfo;
use socketioxide::adapter::LocalAdapter;
use socketioxide::extract::{SocketRef, TryData};
use socketioxide::handler::{ConnectHandler, FromConnectParts};
use socketioxide::socket::Socket;
use switchboard_shared::protocol::{
    errors, events, ChannelError, ChannelRecovered, Command, CommandEnvelope, ConnectionError,
    ConnectionSuccess, Origin,
};
use tokio::sync::mpsc;
use uuid::Uuid;

use switchboard_shared::presence::Claim;

use crate::auth::{AuthError, Identity};
use crate::state::{channel_room, user_room, App, NAMESPACES};
use inbox::{Enqueue, Inbound, Inbox};
pub use session::Session;
use session::SessionGuard;

/// The stream entry of a command from socket `s`: where its answer goes,
/// and the trace it continues.
pub fn envelope(app: &App, s: &SocketRef, command: Command) -> CommandEnvelope {
    CommandEnvelope {
        origin: Origin {
            node: app.node_id.clone(),
            ns: s.ns().to_string(),
            sid: s.id.to_string(),
        },
        trace: switchboard_shared::telemetry::current_trace_context(),
        command,
        accepted_ms: chrono::Utc::now().timestamp_millis(),
    }
}

/// What the middleware decided, for the connect handler.
#[derive(Clone)]
enum Handshake {
    Accepted {
        success: Arc<ConnectionSuccess>,
        /// Channels to replay after `connection:success`, from these seqs.
        since: Arc<Vec<(Uuid, i64)>>,
        /// The user came online with this socket (when, ms; their small
        /// channels if known): announced after `connection:success`.
        came_online: Option<(i64, Option<Vec<Uuid>>)>,
    },
    Refused {
        attempt: u64,
        reason: &'static str,
        error: &'static str,
    },
}

/// Registers both namespaces with the same handlers.
pub fn register(app: &App) {
    for ns in NAMESPACES {
        let on_connect_app = app.clone();
        let auth_app = app.clone();
        app.io.ns(
            ns,
            (move |s: SocketRef| on_connect(on_connect_app.clone(), s)).with(
                move |s: SocketRef, handle: WeakSocket, auth: TryData<serde_json::Value>| {
                    authenticate(auth_app.clone(), s, handle, auth.0.ok())
                },
            ),
        );
    }
}

/// The client address failed attempts are counted by.
/// Behind a trusted proxy it comes from `X-Forwarded-For` (see
/// [`crate::client_addr`]), else it is the TCP peer.
fn client_address(app: &App, s: &SocketRef) -> String {
    let parts = s.req_parts();
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| app.proxies.client_ip(c.0.ip(), &parts.headers).to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// A weak reference to the socket being connected: what the inbox task
/// keeps, so that the socket can be freed (and its [`SessionGuard`] run)
/// even when socketioxide drops it without a disconnect.
#[derive(Clone)]
pub struct WeakSocket(Weak<Socket<LocalAdapter>>);

impl FromConnectParts<LocalAdapter> for WeakSocket {
    type Error = std::convert::Infallible;

    fn from_connect_parts(
        s: &Arc<Socket<LocalAdapter>>,
        _: &Option<socketioxide::handler::Value>,
    ) -> Result<Self, Self::Error> {
        Ok(Self(Arc::downgrade(s)))
    }
}

async fn authenticate(
    app: App,
    s: SocketRef,
    handle: WeakSocket,
    auth: Option<serde_json::Value>,
) -> Result<(), std::convert::Infallible> {
    let outcome = match handshake(&app, &s, handle, auth).await {
        Ok(h) => h,
        Err(refused) => refused,
    };
    s.extensions.insert(outcome);
    Ok(())
}

async fn handshake(
    app: &App,
    s: &SocketRef,
    handle: WeakSocket,
    auth: Option<serde_json::Value>,
) -> Result<Handshake, Handshake> {
    let addr = client_address(app, s);
    let fail_key = format!("authfail:{addr}");
    let window = Duration::from_secs(app.settings.auth_fail_window_s);
    let refuse = |attempt: u64| Handshake::Refused {
        attempt,
        reason: "auth_error",
        error: errors::NOT_AUTHENTICATED,
    };

    // Brute-force protection (CONTRACT §2). `authabuse:` counts forged or
    // invalid tokens from this client address (not expired ones: see
    // `AuthError::counts_as_abuse`). Past the threshold a token failing the
    // cheap checks is refused without a signature check or JWKS refetch,
    // while a plausible one is still verified: a valid token always gets
    // in. `authfail:` counts every failure, for `reconnectAttempt`.
    let abuse_key = format!("authabuse:{addr}");
    let token = auth
        .as_ref()
        .and_then(|a| a.get("token"))
        .and_then(|t| t.as_str())
        .unwrap_or_default();
    // The counter only changes what happens to a token failing the cheap
    // checks (a plausible one is verified whatever it says), so it is read
    // only for those: an honest handshake costs no Redis round trip here.
    let suspect = !app.verifier.is_plausible(token)
        && app.bus.read_counter(&abuse_key).await.unwrap_or(0) >= app.settings.auth_fail_threshold;
    let user_id = auth
        .as_ref()
        .and_then(|a| a.get("userId"))
        .and_then(|u| u.as_str());
    let verdict: Result<Identity, AuthError> = match user_id {
        None => Err(AuthError::Missing),
        Some(uid) => app.verifier.verify_guarded(token, Some(uid), suspect).await,
    };
    let user = match verdict {
        Ok(user) => user,
        Err(e) => {
            metrics::counter!("gateway_auth_failures_total", "reason" => e.label()).increment(1);
            let abuse = e.counts_as_abuse();
            tracing::info!(%addr, reason = %e, abuse, "handshake refused");
            let (attempt, _) = tokio::join!(app.bus.count_in_window(&fail_key, window), async {
                if abuse {
                    let _ = app.bus.count_in_window(&abuse_key, window).await;
                }
            });
            return Err(refuse(attempt.unwrap_or(1)));
        }
    };

    let unavailable = |e: &dyn std::fmt::Display| {
        tracing::warn!(error = %e, "handshake failed on a backend");
        Handshake::Refused {
            attempt: 0,
            reason: "server_error",
            error: "Service temporarily unavailable",
        }
    };
    app.users
        .ensure(&app.store, &user)
        .await
        .map_err(|e| unavailable(&e))?;
    // The channels, their positions and the small ones' members: one query.
    let read = app
        .store
        .session_channels(
            &user.id,
            app.settings.max_channels_per_user,
            app.settings.presence_max_members,
        )
        .await
        .map_err(|e| unavailable(&e))?;
    let channels = &read.channels;
    let subscribed = app
        .subscriptions
        .retain(channels)
        .await
        .map_err(|e| unavailable(&e))?;
    let ids: Vec<Uuid> = channels.iter().map(|(c, _)| *c).collect();
    // MAX_CONNECTIONS_PER_USER, cluster-wide (CONTRACT §2), and presence
    // (§11): one entry per socket in the user's set, refreshed by this
    // node's heartbeat. Claimed last, so that nothing awaits between the
    // claim and the session that gives it back (an entry claimed by a
    // vanished handshake just expires).
    let member = format!("{}:{}", app.node_id, s.id);
    let claimed = app
        .presence
        .claim(
            &user.id,
            &member,
            app.settings.max_connections_per_user,
            Duration::from_millis(app.settings.connection_ttl_ms),
        )
        .await;
    let came_online = match claimed {
        Ok(Claim::Accepted { came_online }) => came_online,
        Ok(Claim::Refused) => {
            app.subscriptions.release(&ids).await;
            metrics::counter!("gateway_connections_refused_total", "reason" => "too_many")
                .increment(1);
            return Err(Handshake::Refused {
                attempt: 0,
                reason: "too_many_connections",
                error: "Too many connections",
            });
        }
        Err(e) => {
            app.subscriptions.release(&ids).await;
            return Err(unavailable(&e));
        }
    };
    // From here on the session owns the subscriptions just retained, and
    // the connection entry.
    let session = Session::open(app, user, s.ns(), &ids);
    app.connections
        .insert(member.clone(), session.user.id.clone());
    session.hold_connection(member);
    s.extensions.insert(Arc::new(SessionGuard {
        app: app.clone(),
        session: session.clone(),
    }));
    // Channels to catch up on (`auth.since`) enter their rooms only after
    // their replay (see `recovery`); the others at once.
    let since = crate::recovery::parse_since(auth.as_ref(), &ids);
    let mut rooms: Vec<String> = ids
        .iter()
        .filter(|c| !since.iter().any(|(r, _)| r == *c))
        .map(channel_room)
        .collect();
    rooms.push(user_room(&session.user.id));
    s.join(rooms);
    app.probe(&subscribed);
    open_inbox(app, s, handle, session.clone());
    let online = crate::presence::online_lists(app, &read).await;
    let success = ConnectionSuccess {
        user_id: session.user.id.clone(),
        channels: ids.iter().map(Uuid::to_string).collect(),
        positions: channels.iter().map(|(c, p)| (c.to_string(), *p)).collect(),
        online: online.lists,
    };
    Ok(Handshake::Accepted {
        success: Arc::new(success),
        since: Arc::new(since),
        came_online: came_online.map(|at| (at, Some(online.small_channels))),
    })
}

/// Gives the socket its inbox (opened by its first event, see [`Inbox`]),
/// and routes client events to it.
fn open_inbox(app: &App, s: &SocketRef, handle: WeakSocket, session: Arc<Session>) {
    let (start_app, start_session) = (app.clone(), session.clone());
    s.extensions.insert(Arc::new(Inbox::new(
        app.settings.socket_inbox_capacity,
        move |rx| {
            tokio::spawn(run_inbox(
                start_app.clone(),
                handle.clone(),
                start_session.clone(),
                rx,
            ));
        },
    )));
    s.extensions.insert(session.clone());
    // One fallback handler rather than one per client event: socketioxide
    // keeps a socket's handlers in a map of its own (~0.7 KB on every
    // connection for nine entries). `Enqueue` drops what is not a client
    // event, as a missing handler did.
    s.on_fallback(async |_: Enqueue| {});
    let disconnect_app = app.clone();
    let disconnect_session = session.clone();
    s.on_disconnect(move |s: SocketRef| async move {
        // Dropping the sender ends the inbox task once it drained.
        s.extensions.remove::<Arc<Inbox>>();
        disconnect_session.close(&disconnect_app).await;
    });
}

/// Most events the inbox takes in one go (consecutive sends share one
/// round trip to the stream).
const INBOX_BATCH: usize = 128;

async fn run_inbox(
    app: App,
    socket: WeakSocket,
    session: Arc<Session>,
    mut rx: mpsc::Receiver<Box<Inbound>>,
) {
    // Grows with the largest batch this socket sends: an idle socket holds
    // no buffer (INBOX_BATCH events would be ~14 KB on every connection).
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, INBOX_BATCH).await > 0 {
        // Strong only while a batch is handled: the socket must stay
        // freeable (see `session`).
        let Some(s) = socket.0.upgrade().map(SocketRef::from) else {
            break;
        };
        // Boxed: the handlers' state is ~5 KB; inline it would be part of
        // this task's future, allocated for every idle connection.
        Box::pin(handle_batch(&app, &s, &session, batch.drain(..))).await;
    }
}

/// Handles a batch of a socket's events in order; consecutive sends share
/// one round trip to the stream.
async fn handle_batch(
    app: &App,
    s: &SocketRef,
    session: &Arc<Session>,
    batch: impl Iterator<Item = Box<Inbound>>,
) {
    let mut sends = Vec::new();
    for inbound in batch {
        let inbound = *inbound;
        if inbound.event == events::MESSAGE_SEND {
            sends.push(inbound);
            continue;
        }
        if !sends.is_empty() {
            messages::send_batch(app, s, session, std::mem::take(&mut sends)).await;
        }
        handle_event(app, s, session, inbound).await;
    }
    if !sends.is_empty() {
        messages::send_batch(app, s, session, sends).await;
    }
}

/// Takes a token of the event's area (CONTRACT §10) before it is handled;
/// `None` when the user is over the limit and the event was refused with
/// its area's error and `retryAfterMs`. A bucket that cannot be read (Redis
/// down) lets the event through: the write itself then fails or succeeds
/// on its own terms.
async fn within_rate(
    app: &App,
    s: &SocketRef,
    session: &Session,
    inbound: Inbound,
) -> Option<Inbound> {
    use switchboard_shared::config::RateArea;
    let area = match inbound.event.as_str() {
        events::CHANNEL_JOIN | events::CHANNEL_LEAVE | events::CHANNEL_SYNC => RateArea::Channels,
        events::MESSAGE_READ | events::REACTION_ADD | events::REACTION_REMOVE => {
            RateArea::Reactions
        }
        _ => return Some(inbound),
    };
    let Some(limit) = app.settings.rate_limit(area, &app.topics, &session.user.id) else {
        return Some(inbound);
    };
    let retry_after_ms = match app.bus.take_token(&limit).await {
        Ok(Ok(())) => return Some(inbound),
        Ok(Err(ms)) => ms,
        Err(e) => {
            tracing::warn!(error = %e, "rate limit unavailable; event let through");
            return Some(inbound);
        }
    };
    metrics::counter!("gateway_rate_limited_total", "area" => area.name()).increment(1);
    let field = |k: &str| {
        inbound
            .data
            .as_ref()
            .and_then(|d| d.get(k))
            .cloned()
            .unwrap_or(serde_json::Value::Null)
    };
    let error = messages::RATE_LIMITED;
    let (event, payload) = match area {
        RateArea::Channels => (
            events::CHANNEL_ERROR,
            serde_json::json!({"channelId": field("channelId"), "error": error, "retryAfterMs": retry_after_ms}),
        ),
        _ if inbound.event == events::MESSAGE_READ => (
            events::MESSAGE_ERROR,
            serde_json::json!({"messageId": field("messageId"), "error": error, "retryAfterMs": retry_after_ms}),
        ),
        _ => (
            events::REACTION_ERROR,
            serde_json::json!({"messageId": field("messageId"), "type": field("type"), "error": error, "retryAfterMs": retry_after_ms}),
        ),
    };
    let _ = s.emit(event, &payload);
    let _ = inbound.ack.send(&serde_json::json!({
        "ok": false,
        "error": error,
        "retryAfterMs": retry_after_ms,
    }));
    None
}

async fn handle_event(app: &App, s: &SocketRef, session: &Session, inbound: Inbound) {
    let Some(inbound) = within_rate(app, s, session, inbound).await else {
        return;
    };
    match inbound.event.as_str() {
        events::CHANNEL_JOIN => membership::join(app, s, session, inbound).await,
        events::CHANNEL_LEAVE => membership::leave(app, s, session, inbound).await,
        events::CHANNEL_SYNC => sync::sync(app, s, session, inbound).await,
        events::MESSAGE_READ => reactions::read(app, s, session, inbound).await,
        events::REACTION_ADD => reactions::react(app, s, session, inbound, true).await,
        events::REACTION_REMOVE => reactions::react(app, s, session, inbound, false).await,
        events::TYPING_START => typing(app, session, inbound, true).await,
        events::TYPING_STOP => typing(app, session, inbound, false).await,
        _ => {}
    }
}

/// `typing:start` / `typing:stop` (CONTRACT §11). Volatile: a malformed one,
/// or one for a channel the user is not in, is dropped without an answer
/// (and counted).
async fn typing(app: &App, session: &Session, inbound: Inbound, typing: bool) {
    let channel = inbound
        .data
        .as_ref()
        .and_then(|d| d.get("channelId"))
        .and_then(|c| c.as_str())
        .and_then(|c| Uuid::parse_str(c).ok());
    let Some(channel) = channel else {
        metrics::counter!("gateway_typing_dropped_total", "reason" => "invalid").increment(1);
        return;
    };
    if !session.is_member(&channel) {
        metrics::counter!("gateway_typing_dropped_total", "reason" => "not_member").increment(1);
        return;
    }
    app.typing.request(&session.user.id, channel, typing).await;
}

/// Refuses an event: its area's error event to the caller (`channel:error`,
/// `reaction:error`, `message:error`) and `{ok: false, error}` to its
/// acknowledgement callback (CONTRACT §3).
pub fn refuse<T: serde::Serialize>(
    s: &SocketRef,
    ack: socketioxide::extract::AckSender,
    event: &str,
    payload: &T,
    error: &str,
) {
    let _ = s.emit(event, payload);
    let _ = ack.send(&serde_json::json!({"ok": false, "error": error}));
}

/// Catches `s` up on `channel` after `after` and tells it how that went
/// (`channel:recovered`, or `channel:error` when the database failed).
pub async fn recover(
    app: &App,
    s: &SocketRef,
    channel: Uuid,
    after: i64,
) -> Result<ChannelRecovered, String> {
    let result = crate::recovery::catch_up(app, s, channel, after).await;
    match &result {
        Ok(recovered) => {
            let _ = s.emit(events::CHANNEL_RECOVERED, recovered);
        }
        Err(error) => {
            let _ = s.emit(
                events::CHANNEL_ERROR,
                &ChannelError {
                    channel_id: Some(channel.to_string()),
                    error: error.clone(),
                },
            );
        }
    }
    result
}

async fn on_connect(app: App, s: SocketRef) {
    match s.extensions.get::<Handshake>() {
        Some(Handshake::Accepted {
            success,
            since,
            came_online,
        }) => {
            metrics::counter!("gateway_handshakes_total", "result" => "accepted").increment(1);
            let sent = s.emit(events::CONNECTION_SUCCESS, &*success);
            if let Some((at, small_channels)) = came_online {
                crate::presence::announce(&app, success.user_id.clone(), true, at, small_channels);
            }
            // A client that left during the handshake: disconnecting runs
            // the disconnect handler, which gives its resources back.
            if sent.is_err() || app.is_draining() {
                let _ = s.disconnect();
                return;
            }
            for (channel, after) in since.iter() {
                // The outcome went to the client as an event.
                let _ = recover(&app, &s, *channel, *after).await;
            }
        }
        Some(Handshake::Refused {
            attempt,
            reason,
            error,
        }) => {
            metrics::counter!("gateway_handshakes_total", "result" => "refused").increment(1);
            let _ = s.emit(
                events::CONNECTION_ERROR,
                &ConnectionError {
                    error: error.to_string(),
                    reason: reason.to_string(),
                    reconnect_attempt: attempt,
                },
            );
            // Not at once: a packet the client sends (an emit on `connect`
            // is common) for a socket already gone from the namespace makes
            // socketioxide close the whole transport, dropping the refusal
            // still queued. Meanwhile the socket has no handlers, so what it
            // sends is ignored. See `Settings::refusal_linger_ms`.
            tokio::time::sleep(Duration::from_millis(app.settings.refusal_linger_ms)).await;
            let _ = s.disconnect();
        }
        None => {
            let _ = s.disconnect();
        }
    }
}
