//! Fan-out on a gateway: the one task that takes everything arriving on
//! this node's pub/sub topics and hands it to the local sockets.
//!
//! - channel topics: events emitted into the channel's room (both
//!   namespaces), `message:created` in `seq` order with no hole and no
//!   duplicate: a redelivered message is dropped, a jump in `seq` is
//!   repaired from the database before the later message is emitted
//!   (CONTRACT §9); the volatile `presence:changed` and `typing` that
//!   gateways publish there are emitted as they come;
//! - the node topic: outcomes of this node's writes, to [`crate::pending`];
//! - the membership topic: someone became a member somewhere; their
//!   sockets here enter the room (in a task of its own: the dispatcher never
//!   waits on Redis). Someone left or was removed: their sockets here are
//!   revoked at once, in order with the channel's events
//!   (`socket/membership.rs`), and give back their subscriptions later.
//!
//! It also completes the catch-up of recovering sockets
//! ([`crate::recovery`]), in order with the live events.
//!
//! After a pub/sub gap (reconnect + re-subscribe, or this task falling
//! behind) whatever was published meanwhile is gone: every tracked channel
//! is compared with the database and repaired, and waiting writes whose rows
//! are stored are answered.

use switchboard_shared::bus::{BusResult, TopicMessage};
use switchboard_shared::protocol::{
    self, ChannelEvent, MembershipChange, MembershipKind, MessageCreated, Outcome,
};
use tokio::sync::broadcast::error::RecvError;
use uuid::Uuid;

use crate::state::{channel_room, user_room, App, RoomEntry, NAMESPACES};
use crate::subscriptions::Step;

/// Subscribes the node's own topics and starts the dispatcher.
pub async fn start(app: App) -> BusResult<tokio::task::JoinHandle<()>> {
    let rx = app.bus.incoming();
    let gaps = app.bus.pubsub_gaps();
    let once = || switchboard_shared::bus::BusError::Protocol("the dispatcher runs once".into());
    let entries = app.take_room_entries().ok_or_else(once)?;
    let probes = app.take_probes().ok_or_else(once)?;
    app.bus
        .subscribe(vec![app.topics.node(&app.node_id), app.topics.membership()])
        .await?;
    Ok(tokio::spawn(dispatch(app, rx, gaps, entries, probes)))
}

async fn dispatch(
    app: App,
    mut rx: tokio::sync::broadcast::Receiver<TopicMessage>,
    mut gaps: tokio::sync::watch::Receiver<u64>,
    mut entries: tokio::sync::mpsc::UnboundedReceiver<RoomEntry>,
    mut probes: tokio::sync::mpsc::UnboundedReceiver<Uuid>,
) {
    let channel_prefix = format!("{}:ch:", app.topics.prefix());
    let node_topic = app.topics.node(&app.node_id);
    let membership_topic = app.topics.membership();
    loop {
        let msg = tokio::select! {
            // Live messages first: a repair reads the database, which is
            // behind everything already received.
            biased;
            m = rx.recv() => m,
            changed = gaps.changed() => {
                if changed.is_err() {
                    break;
                }
                repair_after_gap(&app).await;
                continue;
            }
            Some(entry) = entries.recv() => {
                complete_entry(&app, entry).await;
                continue;
            }
            Some(channel) = probes.recv() => {
                probe(&app, &channel).await;
                continue;
            }
        };
        let msg = match msg {
            Ok(m) => m,
            Err(RecvError::Lagged(n)) => {
                metrics::counter!("gateway_fanout_lagged_total").increment(n);
                tracing::error!(lost = n, "fan-out dispatcher lagged; repairing");
                repair_after_gap(&app).await;
                continue;
            }
            Err(RecvError::Closed) => break,
        };
        if let Some(id) = msg.topic.strip_prefix(&channel_prefix) {
            let Ok(channel) = Uuid::parse_str(id) else {
                continue;
            };
            match protocol::decode::<Vec<ChannelEvent>>(&msg.payload) {
                Ok(events) => {
                    for event in &events {
                        deliver(&app, &channel, event).await;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "undecodable channel event"),
            }
        } else if msg.topic == node_topic {
            match protocol::decode::<Vec<Outcome>>(&msg.payload) {
                Ok(outcomes) => outcomes.into_iter().for_each(|o| app.pending.resolve(o)),
                Err(e) => tracing::warn!(error = %e, "undecodable outcome"),
            }
        } else if msg.topic == membership_topic {
            match protocol::decode::<MembershipChange>(&msg.payload) {
                Ok(change) => {
                    // A removal takes the sockets out here, before the next
                    // event is emitted (socket/membership.rs explains why).
                    if change.kind == MembershipKind::Left {
                        crate::socket::membership::revoke_local(
                            &app,
                            &change.user_id,
                            change.channel_id,
                        );
                    }
                    // Entering a room may subscribe, leaving may unsubscribe
                    // (Redis round trips).
                    let app = app.clone();
                    tokio::spawn(async move {
                        crate::socket::membership::apply(&app, change).await;
                    });
                }
                Err(e) => tracing::warn!(error = %e, "undecodable membership change"),
            }
        }
    }
}

/// One live channel event: `message:created` goes through the channel's
/// cursor (duplicates dropped, gaps repaired first), the rest is emitted.
async fn deliver(app: &App, channel: &Uuid, event: &ChannelEvent) {
    if let ChannelEvent::MessageCreated(created) = event {
        match app.subscriptions.step(channel, created.message.seq) {
            Step::Emit => {}
            Step::Duplicate => {
                metrics::counter!("gateway_fanout_duplicates_dropped_total").increment(1);
                return;
            }
            Step::Gap { after } => {
                repair(app, channel, after, created.message.seq - 1).await;
            }
        }
    }
    emit_to_channel(app, channel, event).await;
}

/// Emits the stored messages of `channel` with `after < seq <= upto`, in
/// order, as `message:created` (at most `RECOVERY_MAX_MESSAGES`).
async fn repair(app: &App, channel: &Uuid, after: i64, upto: i64) {
    let want = (upto - after).max(0) as u64;
    if want == 0 {
        return;
    }
    metrics::counter!("gateway_gap_repairs_total").increment(1);
    let limit = want.min(app.settings.recovery_max_messages);
    match app.store.messages_after(*channel, after, limit).await {
        Ok(messages) => {
            tracing::info!(%channel, after, upto, found = messages.len(), "repairing a gap");
            metrics::counter!("gateway_gap_repaired_messages_total")
                .increment(messages.len() as u64);
            for m in messages {
                if m.message.seq > upto {
                    break;
                }
                let seq = m.message.seq;
                let event = ChannelEvent::MessageCreated(MessageCreated {
                    message: m.message,
                    temp_id: m.temp_id,
                    processed: true,
                });
                emit_to_channel(app, channel, &event).await;
                app.subscriptions.advance(channel, seq);
            }
        }
        Err(e) => {
            metrics::counter!("gateway_gap_repair_failures_total").increment(1);
            tracing::warn!(%channel, error = %e, "gap repair failed; the hole stays until the client syncs");
        }
    }
}

/// Completes a recovering socket's catch-up (see [`crate::recovery`]),
/// between two live events. The socket holds the channel's messages up to
/// `replayed_to`; this node's room has had them up to its cursor:
/// - cursor ahead: the socket is sent what the room got meanwhile;
/// - cursor behind (the database read saw messages whose live copies have
///   not reached this node yet): the room is repaired up to `replayed_to`
///   first, so their live copies are dropped as duplicates later instead of
///   reaching the socket a second time.
///
/// Then the socket joins the room.
async fn complete_entry(app: &App, entry: RoomEntry) {
    let RoomEntry {
        socket,
        channel,
        replayed_to,
        done,
    } = entry;
    let cursor = app.subscriptions.cursor(&channel);
    let mut held = replayed_to.or(cursor).unwrap_or(0);
    if let (Some(from), Some(cursor)) = (replayed_to, cursor) {
        if cursor > from {
            match app
                .store
                .messages_after(channel, from, (cursor - from) as u64)
                .await
            {
                Ok(messages) => {
                    for m in messages.iter().filter(|m| m.message.seq <= cursor) {
                        crate::recovery::emit_replayed(&socket, m);
                        held = m.message.seq;
                    }
                }
                Err(e) => tracing::warn!(%channel, error = %e, "catch-up seam read failed"),
            }
        } else if from > cursor {
            repair(app, &channel, cursor, from).await;
        }
    }
    socket.join(channel_room(&channel));
    let _ = done.send(held);
}

/// Brings a newly subscribed channel's room up to its latest stored
/// message (see [`crate::state::AppState::probe`]).
async fn probe(app: &App, channel: &Uuid) {
    let Some(cursor) = app.subscriptions.cursor(channel) else {
        return;
    };
    match app.store.max_seqs(&[*channel]).await {
        Ok(latest) => {
            if let Some(max) = latest.get(channel).filter(|m| **m > cursor) {
                repair(app, channel, cursor, *max).await;
            }
        }
        Err(e) => tracing::warn!(%channel, error = %e, "subscription probe failed"),
    }
}

/// After a pub/sub gap: answers waiting writes already stored, and brings
/// every tracked channel up to its latest stored message.
async fn repair_after_gap(app: &App) {
    let answered = app.pending.confirm_stored(&app.store).await;
    let tracked = app.subscriptions.tracked();
    tracing::info!(
        channels = tracked.len(),
        answered,
        "pub/sub gap: repairing from the database"
    );
    for chunk in tracked.chunks(1000) {
        let ids: Vec<Uuid> = chunk.iter().map(|(c, _)| *c).collect();
        let latest = match app.store.max_seqs(&ids).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "gap repair: latest positions unavailable");
                metrics::counter!("gateway_gap_repair_failures_total").increment(1);
                return;
            }
        };
        for (channel, _) in chunk {
            // Re-read the cursor: live events may have moved it meanwhile.
            let (Some(cursor), Some(max)) =
                (app.subscriptions.cursor(channel), latest.get(channel))
            else {
                continue;
            };
            if *max > cursor {
                repair(app, channel, cursor, *max).await;
            }
        }
    }
}

async fn emit_to_channel(app: &App, channel: &Uuid, event: &ChannelEvent) {
    let room = channel_room(channel);
    for ns in NAMESPACES {
        if !app.namespace_in_use(ns) {
            continue;
        }
        let Some(op) = app.io.of(ns) else { continue };
        let res = match event {
            ChannelEvent::MessageCreated(p) => op.to(room.clone()).emit(event.name(), p).await,
            ChannelEvent::ReactionAdded(p) => op.to(room.clone()).emit(event.name(), p).await,
            ChannelEvent::ReactionRemoved(p) => op.to(room.clone()).emit(event.name(), p).await,
            ChannelEvent::MessageRead(p) => op.to(room.clone()).emit(event.name(), p).await,
            ChannelEvent::UserJoined(p) => op.to(room.clone()).emit(event.name(), p).await,
            ChannelEvent::UserLeft(p) => op.to(room.clone()).emit(event.name(), p).await,
            ChannelEvent::PresenceChanged(p) => op.to(room.clone()).emit(event.name(), p).await,
            // Not to the typist's own sockets (CONTRACT §11).
            ChannelEvent::Typing(p) => {
                op.to(room.clone())
                    .except(user_room(&p.user_id))
                    .emit(event.name(), p)
                    .await
            }
        };
        if let Err(e) = res {
            tracing::debug!(error = %e, "room emit failed");
        }
    }
    metrics::counter!("gateway_channel_events_total").increment(1);
}
