//! Pub/sub plumbing of the Redis bus: the forwarder from fred's channel to
//! ours, and re-subscription after reconnects and cluster topology changes.

use std::time::Duration;

use fred::clients::SubscriberClient;
use fred::prelude::*;
use tokio::sync::broadcast;

use super::slots;
use crate::bus::TopicMessage;

/// Moves pub/sub messages from fred's channel to ours, so readers depend on
/// the trait's type only.
pub(super) fn spawn_forwarder(
    subscriber: &SubscriberClient,
    out: broadcast::Sender<TopicMessage>,
    gaps: tokio::sync::watch::Sender<u64>,
) {
    let mut rx = subscriber.message_rx();
    tokio::spawn(async move {
        loop {
            match rx.recv().await {
                Ok(msg) => {
                    let payload = msg.value.into_bytes().unwrap_or_default();
                    let _ = out.send(TopicMessage {
                        topic: msg.channel.to_string(),
                        payload,
                    });
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    metrics::counter!("bus_pubsub_lagged_total").increment(n);
                    tracing::error!(lost = n, "pub/sub forwarder lagged");
                    gaps.send_modify(|g| *g += 1);
                }
                Err(broadcast::error::RecvError::Closed) => break,
            }
        }
    });
}

/// After every reconnect, subscribes again to every tracked topic, retrying
/// until it succeeds. (A reconnect without this silently stops fan-out: the
/// known failure of adapters that subscribe once at start.)
///
/// On a cluster also after every topology change fred sees (a failover, a
/// slot moved): a shard that loses a slot drops its subscribers with an
/// unsolicited `SUNSUBSCRIBE`, which fred does not re-subscribe by itself.
/// Subscribing again to a channel still subscribed is harmless.
pub(super) fn spawn_resubscriber(
    subscriber: &SubscriberClient,
    gaps: tokio::sync::watch::Sender<u64>,
    clustered: bool,
) {
    let subscriber = subscriber.clone();
    let mut reconnects = subscriber.reconnect_rx();
    let mut changes = subscriber.cluster_change_rx();
    tokio::spawn(async move {
        loop {
            let event = tokio::select! {
                r = reconnects.recv() => r.map(|_| ()),
                r = changes.recv(), if clustered => r.map(|_| ()),
            };
            match event {
                // Several events collapsed into one: one re-subscribe serves them all.
                Ok(()) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => break,
            }
            let mut delay = Duration::from_millis(50);
            loop {
                match resubscribe(&subscriber).await {
                    Ok(()) => {
                        // Whatever was published while the connection was
                        // down is gone: readers repair from the database.
                        gaps.send_modify(|g| *g += 1);
                        metrics::counter!("bus_resubscribes_total").increment(1);
                        tracing::info!(
                            topics = subscriber.tracked_channels().len()
                                + subscriber.tracked_shard_channels().len(),
                            "re-subscribed after Redis reconnect"
                        );
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "re-subscribe failed, retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(2));
                    }
                }
            }
        }
    });
}

/// Subscribes again to every tracked channel: plain ones with one
/// `SUBSCRIBE`, sharded ones with one `SSUBSCRIBE` per slot. Not fred's
/// `resubscribe_all`, which sends a `SUBSCRIBE` even when no plain channel
/// is tracked — always the case on a cluster, where fan-out is sharded —
/// and Redis refuses that ("wrong number of arguments"): seen failing every
/// retry after a failover, leaving a gateway deaf to the failed-over
/// shard's channels for good.
async fn resubscribe(subscriber: &SubscriberClient) -> FredResult<()> {
    let channels: Vec<String> = subscriber
        .tracked_channels()
        .into_iter()
        .map(|c| c.to_string())
        .collect();
    if !channels.is_empty() {
        subscriber.subscribe(channels).await?;
    }
    let sharded: Vec<String> = subscriber
        .tracked_shard_channels()
        .into_iter()
        .map(|c| c.to_string())
        .collect();
    for group in slots::split_by_slot(&sharded) {
        subscriber.ssubscribe(group).await?;
    }
    Ok(())
}
