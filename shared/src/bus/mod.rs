//! The bus: the one seam between gateways and workers.
//!
//! Everything that crosses processes goes through [`Bus`]: partitioned command
//! streams (gateway → worker), partition leases (worker ↔ worker), dedupe
//! keys and counters, and pub/sub topics (worker → gateways). There are two
//! implementations with the same semantics: [`redis::RedisBus`] for a cluster
//! and [`memory::MemoryBus`] for the embedded single process. Processing code
//! is written once against the trait (as centrifuge's `Broker` does).

pub mod memory;
pub mod redis;

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{broadcast, watch};
use uuid::Uuid;

/// Errors of the bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The partition holds `STREAM_MAX_LEN` unacknowledged entries.
    #[error("the message queue is full, try again later")]
    Full,
    /// The backend cannot be reached.
    #[error("the message queue is unavailable: {0}")]
    Unavailable(String),
    /// The backend answered something we do not understand.
    #[error("unexpected reply from the message queue: {0}")]
    Protocol(String),
    /// The sender's token bucket is empty (CONTRACT §10); nothing appended.
    #[error("rate limit exceeded, retry after {retry_after_ms} ms")]
    RateLimited { retry_after_ms: u64 },
}

/// A token bucket checked in the same atomic step as an append, so that
/// rate limiting `message:send` costs no extra round trip (CONTRACT §10).
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimit {
    /// The bucket's key ([`Topics::rate`]).
    pub key: String,
    /// Tokens added per second (> 0).
    pub per_s: f64,
    /// Capacity of the bucket (at least 1).
    pub burst: f64,
}

impl RateLimit {
    /// Takes one token from a bucket holding `tokens` at `last_ms`, refilled
    /// up to `now_ms`: the new level, or the milliseconds until a token is
    /// there. The one formula of both backends (the Lua script mirrors it).
    pub fn take(&self, tokens: f64, last_ms: f64, now_ms: f64) -> Result<f64, u64> {
        let level = (tokens + (now_ms - last_ms).max(0.0) * self.per_s / 1000.0).min(self.burst);
        if level < 1.0 {
            Err(((1.0 - level) * 1000.0 / self.per_s).ceil().max(1.0) as u64)
        } else {
            Ok(level - 1.0)
        }
    }

    /// How long an idle bucket is kept: until it is full again.
    pub fn idle_ttl_ms(&self) -> u64 {
        (self.burst * 1000.0 / self.per_s).ceil() as u64 + 1000
    }
}

pub type BusResult<T> = Result<T, BusError>;

/// One entry of a command stream.
#[derive(Debug, Clone)]
pub struct StreamEntry {
    /// The stream's entry id (Redis `ms-seq`), used to acknowledge it.
    pub id: String,
    /// The MessagePack [`crate::protocol::CommandEnvelope`].
    pub payload: Bytes,
    /// How many times the entry has been handed to a worker, this time included.
    pub deliveries: u64,
}

/// Entries read from one partition, in stream order.
#[derive(Debug, Clone)]
pub struct PartitionBatch {
    pub partition: u32,
    pub entries: Vec<StreamEntry>,
}

/// A message received on a subscribed topic.
#[derive(Debug, Clone)]
pub struct TopicMessage {
    pub topic: String,
    pub payload: Bytes,
}

/// Outcome of claiming a dedupe key with `SET NX GET`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DedupeClaim {
    /// The key was free and is now ours.
    Claimed,
    /// The key held this value.
    Existing(String),
}

/// See [`Bus::backlog_stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backlog {
    pub entries: u64,
    /// Age of the oldest unacknowledged entry (`None`: the partition is empty).
    pub oldest_age: Option<Duration>,
}

/// What [`Bus::complete_batch`] does at the end of a worker's batch.
#[derive(Debug, Default)]
pub struct BatchEnd {
    /// Pub/sub messages, published in this order.
    pub publish: Vec<(String, Bytes)>,
    /// Dedupe keys to overwrite (with `settle_ttl`) …
    pub settle_set: Vec<(String, String)>,
    pub settle_ttl: Duration,
    /// … and to delete.
    pub settle_delete: Vec<String>,
    /// Entries to acknowledge and delete, per partition.
    pub acks: Vec<(u32, Vec<String>)>,
}

/// The names every backend uses under `REDIS_PREFIX`.
#[derive(Debug, Clone)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
        }
    }
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    /// Pub/sub topic of one channel's events.
    pub fn channel(&self, channel_id: &Uuid) -> String {
        format!("{}:ch:{}", self.prefix, channel_id)
    }
    /// Pub/sub topic of one gateway node's per-socket events.
    pub fn node(&self, node_id: &str) -> String {
        format!("{}:node:{}", self.prefix, node_id)
    }
    /// Pub/sub topic of membership changes, cluster-wide.
    pub fn membership(&self) -> String {
        format!("{}:membership", self.prefix)
    }
    /// Stream key of one partition.
    pub fn stream(&self, partition: u32) -> String {
        format!("{}:stream:{}", self.prefix, partition)
    }
    /// Dead-letter stream.
    pub fn dead_letter(&self) -> String {
        format!("{}:dead-letter", self.prefix)
    }
    /// Lease key of one partition.
    pub fn lease(&self, partition: u32) -> String {
        format!("{}:lease:{}", self.prefix, partition)
    }
    /// Sorted set of live workers (score: heartbeat time).
    pub fn workers(&self) -> String {
        format!("{}:workers", self.prefix)
    }
    /// A dedupe key.
    pub fn dedupe(&self, key: &str) -> String {
        format!("{}:dedupe:{}", self.prefix, key)
    }
    /// A windowed counter.
    pub fn counter(&self, key: &str) -> String {
        format!("{}:count:{}", self.prefix, key)
    }
    /// A user's token bucket of one rate-limited area (`messages`, …).
    pub fn rate(&self, area: &str, user_id: &str) -> String {
        format!("{}:rate:{}:{}", self.prefix, area, user_id)
    }
}

/// The partition of a channel: stable for a given partition count, so one
/// channel's writes are always processed by one worker, in order.
pub fn partition_of(channel_id: &Uuid, partitions: u32) -> u32 {
    // FNV-1a over the UUID bytes: cheap, stable across versions and nodes.
    let mut h: u32 = 0x811c_9dc5;
    for b in channel_id.as_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h % partitions.max(1)
}

#[async_trait]
pub trait Bus: Send + Sync + 'static {
    // ---- command streams -------------------------------------------------

    /// Appends an entry to a partition; fails with [`BusError::Full`] when the
    /// partition holds `STREAM_MAX_LEN` unacknowledged entries.
    async fn append(&self, partition: u32, payload: Bytes) -> BusResult<String>;

    /// Appends several entries in order, in one round trip where the backend
    /// allows; one result per entry.
    async fn append_many(&self, entries: Vec<(u32, Bytes)>) -> Vec<BusResult<String>> {
        let mut out = Vec::with_capacity(entries.len());
        for (partition, payload) in entries {
            out.push(self.append(partition, payload).await);
        }
        out
    }

    /// Like [`Bus::append_many`], each entry first taking a token from
    /// `limit` in the same atomic step (and round trip) as its append: an
    /// entry whose bucket is empty fails with [`BusError::RateLimited`], one
    /// refused as [`BusError::Full`] takes no token. Both backends implement
    /// it; there is deliberately no default that would skip the limit.
    async fn append_many_limited(
        &self,
        entries: Vec<(u32, Bytes)>,
        limit: Option<RateLimit>,
    ) -> Vec<BusResult<String>>;

    /// Takes one token from a bucket on its own (the areas that are not on
    /// the `message:send` hot path): `Ok(Err(ms))` when it is empty, with
    /// the milliseconds until a token is there.
    async fn take_token(&self, limit: &RateLimit) -> BusResult<Result<(), u64>>;

    /// Reads new entries of the given partitions for `consumer`, waiting up
    /// to `block` when there are none.
    async fn read(
        &self,
        partitions: &[u32],
        consumer: &str,
        max: usize,
        block: Duration,
    ) -> BusResult<Vec<PartitionBatch>>;

    /// Takes over every entry of a partition that was delivered but never
    /// acknowledged (a dead or replaced consumer's work), in stream order,
    /// counting this delivery.
    async fn claim_pending(
        &self,
        partition: u32,
        consumer: &str,
        max: usize,
    ) -> BusResult<Vec<StreamEntry>>;

    /// Acknowledges and removes processed entries. Entries are only ever
    /// removed here, so an unacknowledged entry is never trimmed.
    async fn ack(&self, partition: u32, ids: &[String]) -> BusResult<()>;

    /// Moves an entry to the dead-letter stream with its error, and acks it.
    async fn dead_letter(&self, partition: u32, entry: &StreamEntry, error: &str) -> BusResult<()>;

    /// Unacknowledged entries of a partition (for metrics and back-pressure).
    async fn backlog(&self, partition: u32) -> BusResult<u64>;
    /// The backlog and how long its oldest entry has waited (entries are
    /// deleted when acknowledged, so the oldest entry is the oldest pending
    /// one): what an operator watches to see a partition stuck.
    async fn backlog_stats(&self, partition: u32) -> BusResult<Backlog>;

    // ---- leases ----------------------------------------------------------

    /// Takes the lease of a partition if it is free (or already ours).
    async fn acquire_lease(&self, partition: u32, owner: &str, ttl: Duration) -> BusResult<bool>;
    /// Extends our lease; `false` when it is no longer ours.
    async fn renew_lease(&self, partition: u32, owner: &str, ttl: Duration) -> BusResult<bool>;
    /// Gives the lease up if it is ours.
    async fn release_lease(&self, partition: u32, owner: &str) -> BusResult<()>;
    /// Records that `worker` is alive and returns how many workers are.
    async fn heartbeat(&self, worker: &str, ttl: Duration) -> BusResult<usize>;
    /// Removes `worker` from the live set (clean shutdown).
    async fn leave(&self, worker: &str) -> BusResult<()>;

    // ---- keys --------------------------------------------------------------

    /// `SET key value NX GET PX ttl` for each pair, in one round trip.
    async fn claim_dedupe(
        &self,
        claims: &[(String, String)],
        ttl: Duration,
    ) -> BusResult<Vec<DedupeClaim>>;
    /// The end of a worker's batch, in this order: publish the messages,
    /// settle the dedupe keys (as [`Bus::settle_dedupe`]), acknowledge the
    /// entries (as [`Bus::ack`], per partition). The Redis bus does it all in
    /// one script, one round trip instead of three; this default does the
    /// steps one after the other.
    async fn complete_batch(&self, batch: BatchEnd) -> BusResult<()> {
        self.publish(batch.publish).await?;
        self.settle_dedupe(&batch.settle_set, batch.settle_ttl, &batch.settle_delete)
            .await?;
        for (partition, ids) in &batch.acks {
            self.ack(*partition, ids).await?;
        }
        Ok(())
    }

    /// Overwrites keys (with a TTL) and deletes others, in one round trip.
    async fn settle_dedupe(
        &self,
        set: &[(String, String)],
        ttl: Duration,
        delete: &[String],
    ) -> BusResult<()>;
    /// Deletes each key that still holds the given value (compare-and-delete),
    /// in one round trip. The dead-letter path settles an entry's own claim
    /// (`p:<id>`) with it, so a resend with the same `tempId` is not refused
    /// as "already being processed" for the claim's TTL, while a key that
    /// meanwhile belongs to another entry (or a delivered `d:<id>`) is kept.
    async fn release_dedupe(&self, claims: &[(String, String)]) -> BusResult<()>;
    /// Increments a counter that expires `window` after its first increment.
    async fn count_in_window(&self, key: &str, window: Duration) -> BusResult<u64>;
    /// Reads such a counter without incrementing it.
    async fn read_counter(&self, key: &str) -> BusResult<u64>;

    // ---- pub/sub -----------------------------------------------------------

    /// Publishes messages in order (one connection, so a subscriber sees them
    /// in this order).
    async fn publish(&self, messages: Vec<(String, Bytes)>) -> BusResult<()>;
    /// Starts receiving a topic on [`Bus::incoming`]. Subscriptions survive
    /// reconnects.
    async fn subscribe(&self, topics: Vec<String>) -> BusResult<()>;
    async fn unsubscribe(&self, topics: Vec<String>) -> BusResult<()>;
    /// Messages of subscribed topics.
    fn incoming(&self) -> broadcast::Receiver<TopicMessage>;
    /// A counter bumped whenever messages of subscribed topics may have been
    /// missed: the pub/sub connection was re-established and re-subscribed
    /// (what was published meanwhile is gone), or a reader fell behind. A
    /// gateway then repairs from the database what its sockets may lack.
    fn pubsub_gaps(&self) -> watch::Receiver<u64>;

    /// Whether the backend answers (for `/readyz`).
    async fn ping(&self) -> BusResult<()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_channel_always_maps_to_the_same_partition() {
        let id = Uuid::now_v7();
        let p = partition_of(&id, 16);
        assert!(p < 16);
        for _ in 0..10 {
            assert_eq!(partition_of(&id, 16), p);
        }
        assert_eq!(partition_of(&id, 1), 0);
    }
}
