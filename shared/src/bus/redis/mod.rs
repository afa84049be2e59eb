//! The Redis implementation of [`Bus`]: Streams with one consumer group,
//! `SET NX GET` dedupe keys, lease keys, and pub/sub.
//!
//! Connections, and why there are several:
//! - `cmd`: every short command, auto-pipelined. Publishes go here too, as
//!   one pipeline per call, so one worker's events leave in order.
//! - `reader`: the blocking `XREADGROUP` of a worker; a blocked connection
//!   must not hold up anything else.
//! - `subscriber`: the pub/sub connection, which re-subscribes to every
//!   tracked topic after a reconnect (see [`RedisBus::connect`]).
//!
//! Multi-key work runs in Lua scripts (`scripts`) so that it is one round
//! trip and atomic.
//!
//! On a Redis Cluster (`redis-cluster://` URL) the same keys are used, and
//! what a single script or command cannot do across slots is split
//! (`slots`): dedupe keys are claimed and settled with one script per slot,
//! all in one pipeline; the end of a batch publishes first, then settles and
//! acknowledges (two round trips instead of one); a worker reads each
//! partition on its own connection (`reads`); and fan-out uses sharded
//! pub/sub (`SPUBLISH`/`SSUBSCRIBE`), so a message goes to one shard and
//! reaches only the gateways subscribed to its channel. A stream and the
//! token buckets checked with its appends share a slot (`appends`).

mod appends;
mod pubsub;
mod reads;
mod scripts;
mod slots;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use fred::clients::{Pipeline, SubscriberClient};
use fred::prelude::*;
use fred::types::scripts::Script;
use fred::types::CustomCommand;
use tokio::sync::broadcast;

use appends::{Appends, Request};
use pubsub::{spawn_forwarder, spawn_resubscriber};
use reads::ClusterReads;
use scripts::Scripts;

use super::{
    Backlog, BatchEnd, Bus, BusError, BusResult, DedupeClaim, PartitionBatch, RateLimit,
    StreamEntry, TopicMessage, Topics,
};

/// Consumer group of the workers on every partition stream.
const GROUP: &str = "workers";

/// Capacity (in pub/sub messages, each a batch of events) of the channel
/// between the subscriber and its readers. A reader that falls this far
/// behind loses messages, which is counted and logged. A broadcast channel
/// keeps its last `capacity` payloads alive, so this also bounds memory.
const INCOMING_CAPACITY: usize = 4096;

pub struct RedisBus {
    topics: Topics,
    /// On a Redis Cluster a script's keys must share a slot: calls are split
    /// per slot.
    clustered: bool,
    cmd: Client,
    reader: Client,
    /// On a cluster: a connection per partition read (see `reads`).
    cluster_reads: Option<ClusterReads>,
    /// On a single Redis: the last read's arguments, for the next read.
    read_args: reads::ReadArgs,
    subscriber: SubscriberClient,
    incoming: broadcast::Sender<TopicMessage>,
    gaps: tokio::sync::watch::Sender<u64>,
    scripts: Scripts,
    /// Appends of all callers, grouped into few script calls (`appends`).
    appends: Arc<Appends>,
    /// Options of writes a client waits on: fail at once when Redis is down.
    fail_fast: Options,
}

fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(e.to_string())
}

impl RedisBus {
    /// Connects the three clients and starts the subscriber's forwarding and
    /// re-subscription tasks.
    pub async fn connect(url: &str, prefix: &str, max_len: u64) -> anyhow::Result<Self> {
        let config = Config::from_url(url)?;
        let clustered = config.server.is_clustered();
        let mut builder = Builder::from_config(config);
        builder
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2))
            .with_connection_config(|c| {
                c.connection_timeout = Duration::from_secs(5);
                c.internal_command_timeout = Duration::from_secs(5);
            })
            .with_performance_config(|p| {
                p.default_command_timeout = Duration::from_secs(10);
            });
        // fred gives every client eight notification channels of
        // `broadcast_channel_capacity` slots each, allocated up front. Only
        // the subscriber's pub/sub channel needs room for a burst; the
        // command and read clients (and each per-partition read connection
        // cloned from the reader on a cluster) keep fred's default.
        let cmd = builder.build()?;
        let reader = builder.build()?;
        builder.with_performance_config(|p| {
            p.broadcast_channel_capacity = INCOMING_CAPACITY;
        });
        let subscriber = builder.build_subscriber_client()?;
        cmd.init().await?;
        reader.init().await?;
        subscriber.init().await?;

        let (incoming, _) = broadcast::channel(INCOMING_CAPACITY);
        let gaps = tokio::sync::watch::Sender::new(0u64);
        spawn_forwarder(&subscriber, incoming.clone(), gaps.clone());
        spawn_resubscriber(&subscriber, gaps.clone(), clustered);
        let cluster_reads = clustered.then(|| ClusterReads::new(reader.clone()));

        let scripts = Scripts::new();
        // Loaded on every primary now rather than on first use: otherwise the
        // first burst of traffic (a thousand sockets' first sends) meets
        // `NOSCRIPT` everywhere at once and every call loads the script again.
        // Best effort: a script unknown later is still loaded on demand.
        if let Err(e) = scripts.load_all(&cmd).await {
            tracing::warn!(error = %e, "could not preload the Lua scripts");
        }
        let appends = Arc::new(Appends::new(
            cmd.clone(),
            scripts.append.clone(),
            max_len,
            clustered,
        ));
        Ok(Self {
            topics: Topics::new(prefix),
            clustered,
            cmd,
            reader,
            cluster_reads,
            read_args: reads::ReadArgs::default(),
            subscriber,
            incoming,
            gaps,
            scripts,
            appends,
            fail_fast: fail_fast_options(),
        })
    }

    /// The command connection, for [`crate::presence::redis::RedisPresence`]
    /// (a clone shares the connection).
    pub fn command_client(&self) -> Client {
        self.cmd.clone()
    }

    /// Appends `entries` (each checked against `limit` when given) through
    /// the shared [`Appends`]: with the appends of other callers in one call.
    async fn append_entries(
        &self,
        entries: Vec<(u32, Bytes)>,
        limit: Option<RateLimit>,
    ) -> Vec<BusResult<String>> {
        let entries = entries
            .into_iter()
            .map(|(partition, payload)| (self.topics.stream(partition), payload))
            .collect();
        self.appends.append(Request { entries, limit }).await
    }

    async fn ensure_group(&self, partition: u32) -> BusResult<()> {
        reads::ensure_group(&self.cmd, &self.topics.stream(partition), GROUP).await
    }

    async fn xreadgroup(
        &self,
        partitions: &[u32],
        consumer: &str,
        max: usize,
        block: Duration,
    ) -> Result<Value, fred::error::Error> {
        let (args, slot) =
            self.read_args
                .get(&self.topics, GROUP, partitions, consumer, max, block);
        self.reader
            .with_options(&reads::read_options(block))
            .custom(CustomCommand::new_static("XREADGROUP", slot, true), args)
            .await
    }

    /// Runs a script by its hash, loading it first when Redis does not know
    /// it (after a restart). `fail_fast` commands fail at once while Redis is
    /// unreachable instead of waiting for the reconnect.
    async fn run<R: FromValue>(
        &self,
        script: &Script,
        fail_fast: bool,
        keys: Vec<String>,
        args: Vec<Value>,
    ) -> Result<R, fred::error::Error> {
        evalsha(&self.cmd, fail_fast, script, keys, args).await
    }

    /// Parses an `XREADGROUP` reply into batches, per partition.
    fn parse_read(&self, value: Value) -> BusResult<Vec<PartitionBatch>> {
        let mut out = Vec::new();
        let streams: Vec<(Value, Value)> = match value {
            Value::Null => Vec::new(),
            Value::Map(map) => map
                .inner()
                .into_iter()
                .map(|(k, v)| (Value::from(k), v))
                .collect(),
            Value::Array(items) => items
                .into_iter()
                .filter_map(|s| {
                    let mut it = s.into_array().into_iter();
                    Some((it.next()?, it.next()?))
                })
                .collect(),
            other => return Err(BusError::Protocol(format!("XREADGROUP: {other:?}"))),
        };
        for (key, entries) in streams {
            let Some(key) = key.as_string() else { continue };
            let Some(partition) = self.partition_of_key(&key) else {
                continue;
            };
            let entries = parse_entries(entries, 1);
            if !entries.is_empty() {
                out.push(PartitionBatch { partition, entries });
            }
        }
        Ok(out)
    }

    /// On a cluster: the dedupe keys' settle (as `SETTLE_LUA`), one call
    /// per slot. `set` keys get their value with `ttl`, the others are
    /// deleted.
    fn settle_calls(
        &self,
        set: &[(String, String)],
        ttl: Duration,
        delete: &[String],
    ) -> Vec<(&Script, Vec<String>, Vec<Value>)> {
        let keys: Vec<String> = set
            .iter()
            .map(|(k, _)| self.topics.dedupe(k))
            .chain(delete.iter().map(|k| self.topics.dedupe(k)))
            .collect();
        slots::group_by_slot(keys.iter().map(String::as_str))
            .into_iter()
            .map(|group| {
                // Set keys come first in `keys`, so a group keeps that order.
                let nset = group.iter().filter(|i| **i < set.len()).count();
                let mut args = vec![
                    Value::from(ttl.as_millis() as i64),
                    Value::from(nset as i64),
                ];
                args.extend(
                    group[..nset]
                        .iter()
                        .map(|i| Value::from(set[*i].1.as_str())),
                );
                let keys = group.iter().map(|i| keys[*i].clone()).collect();
                (&self.scripts.settle, keys, args)
            })
            .collect()
    }

    /// [`Bus::claim_dedupe`] on a cluster: one `CLAIM_LUA` per slot, in one
    /// pipeline.
    async fn claim_dedupe_per_slot(
        &self,
        keys: Vec<String>,
        claims: &[(String, String)],
        ttl: Duration,
    ) -> BusResult<Vec<DedupeClaim>> {
        let groups = slots::group_by_slot(keys.iter().map(String::as_str));
        let calls = groups
            .iter()
            .map(|group| {
                let mut args = vec![Value::from(ttl.as_millis() as i64)];
                args.extend(group.iter().map(|i| Value::from(claims[*i].1.as_str())));
                let keys = group.iter().map(|i| keys[*i].clone()).collect();
                (&self.scripts.claim, keys, args)
            })
            .collect();
        let mut out = vec![DedupeClaim::Claimed; claims.len()];
        for (group, reply) in groups.iter().zip(eval_pipelined(&self.cmd, calls).await) {
            let reply = reply.map_err(unavailable)?;
            for (i, v) in group.iter().zip(reply.into_array()) {
                out[*i] = dedupe_claim(v);
            }
        }
        Ok(out)
    }

    /// [`Bus::complete_batch`] on a cluster: publish first, then settle and
    /// acknowledge in one pipeline (one script per slot). Two round trips
    /// where a single Redis needs one; the order that matters (an event is
    /// out before its entry is acknowledged) is kept.
    async fn complete_batch_per_slot(&self, batch: BatchEnd) -> BusResult<()> {
        self.publish(batch.publish).await?;
        let mut calls =
            self.settle_calls(&batch.settle_set, batch.settle_ttl, &batch.settle_delete);
        for (partition, ids) in &batch.acks {
            if ids.is_empty() {
                continue;
            }
            let mut args: Vec<Value> = Vec::with_capacity(ids.len() + 1);
            args.push(GROUP.into());
            args.extend(ids.iter().map(|i| Value::from(i.as_str())));
            calls.push((
                &self.scripts.ack,
                vec![self.topics.stream(*partition)],
                args,
            ));
        }
        for reply in eval_pipelined(&self.cmd, calls).await {
            reply.map_err(unavailable)?;
        }
        Ok(())
    }

    fn partition_of_key(&self, key: &str) -> Option<u32> {
        key.rsplit(':').next().and_then(|p| p.parse().ok())
    }
}

/// Options of a command a client waits on: fail at once while Redis is
/// unreachable instead of waiting for the reconnect.
pub(crate) fn fail_fast_options() -> Options {
    Options {
        fail_fast: true,
        max_attempts: Some(1),
        timeout: Some(Duration::from_secs(3)),
        ..Default::default()
    }
}

/// One pipeline of `EVALSHA` calls, each routed to its first key's slot.
async fn eval_send(
    client: &Client,
    calls: Vec<(&Script, Vec<String>, Vec<Value>)>,
) -> Vec<Result<Value, fred::error::Error>> {
    let pipeline: Pipeline<Client> = client.pipeline();
    for (script, keys, args) in calls {
        let route = keys.first().map(|k| slots::slot(k));
        let mut argv: Vec<Value> = Vec::with_capacity(2 + keys.len() + args.len());
        argv.push(Value::from(script.sha1().clone()));
        argv.push(Value::from(keys.len() as i64));
        argv.extend(keys.into_iter().map(Value::from));
        argv.extend(args);
        let command = CustomCommand::new_static("EVALSHA", route, false);
        let _: Result<(), _> = pipeline.custom(command, argv).await;
    }
    pipeline.try_all::<Value>().await
}

/// Runs several scripts in one pipeline (on a cluster, each call on the
/// node of its keys' slot), one result per call in order. Calls refused
/// with `NOSCRIPT` (a node that restarted or was just promoted does not
/// know the script) are run again once after loading their script.
pub(crate) async fn eval_pipelined(
    client: &Client,
    calls: Vec<(&Script, Vec<String>, Vec<Value>)>,
) -> Vec<Result<Value, fred::error::Error>> {
    let mut results = eval_send(client, calls.clone()).await;
    let again: Vec<usize> = results
        .iter()
        .enumerate()
        .filter(|(_, r)| matches!(r, Err(e) if e.details().contains("NOSCRIPT")))
        .map(|(i, _)| i)
        .collect();
    if again.is_empty() {
        return results;
    }
    for i in &again {
        if let Err(e) = calls[*i].0.load(client).await {
            results[*i] = Err(e);
            return results;
        }
    }
    let retried = eval_send(client, again.iter().map(|i| calls[*i].clone()).collect()).await;
    for (i, r) in again.into_iter().zip(retried) {
        results[i] = r;
    }
    results
}

/// `EVALSHA` of `script` on `client` (with [`fail_fast_options`] when
/// `fail_fast`), loading the script first when Redis does not know it
/// (after a restart). The one way every Redis seam of this crate runs a
/// single script.
pub(crate) async fn evalsha<R: FromValue>(
    client: &Client,
    fail_fast: bool,
    script: &Script,
    keys: Vec<String>,
    args: Vec<Value>,
) -> Result<R, fred::error::Error> {
    let opts = if fail_fast {
        fail_fast_options()
    } else {
        Options::default()
    };
    let with = client.with_options(&opts);
    let mut argv: Vec<Value> = Vec::with_capacity(2 + keys.len() + args.len());
    argv.push(Value::from(script.sha1().clone()));
    argv.push(Value::from(keys.len() as i64));
    let route = keys.first().map(|k| slots::slot(k));
    argv.extend(keys.into_iter().map(Value::from));
    argv.extend(args);
    let command = CustomCommand::new_static("EVALSHA", route, false);
    match with.custom(command.clone(), argv.clone()).await {
        Err(e) if e.details().contains("NOSCRIPT") => {
            script.load(client).await?;
            with.custom(command, argv).await
        }
        other => other,
    }
}

/// A `CLAIM_LUA` reply item: 0 for a claimed key, else the key's value.
fn dedupe_claim(v: Value) -> DedupeClaim {
    match v {
        Value::Integer(_) => DedupeClaim::Claimed,
        other => DedupeClaim::Existing(other.as_string().unwrap_or_default()),
    }
}

fn parse_fields_payload(fields: Value) -> Bytes {
    // [field, value, field, value…] or a map; we only write the field "p".
    match fields {
        Value::Array(items) => {
            let mut it = items.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                if k.as_str().as_deref() == Some("p") {
                    return v.into_bytes().unwrap_or_default();
                }
            }
            Bytes::new()
        }
        Value::Map(map) => {
            for (k, v) in map.inner() {
                if k.as_str() == Some("p") {
                    return v.into_bytes().unwrap_or_default();
                }
            }
            Bytes::new()
        }
        _ => Bytes::new(),
    }
}

/// Parses `[[id, fields], …]`.
fn parse_entries(value: Value, deliveries: u64) -> Vec<StreamEntry> {
    let mut out = Vec::new();
    for entry in value.into_array() {
        let mut parts = entry.into_array().into_iter();
        let (Some(id), fields) = (parts.next(), parts.next()) else {
            continue;
        };
        let Some(id) = id.as_string() else { continue };
        // A deleted entry still pending shows up with nil fields.
        let payload = fields.map(parse_fields_payload).unwrap_or_default();
        out.push(StreamEntry {
            id,
            payload,
            deliveries,
        });
    }
    out
}

#[async_trait]
impl Bus for RedisBus {
    async fn append(&self, partition: u32, payload: Bytes) -> BusResult<String> {
        self.append_entries(vec![(partition, payload)], None)
            .await
            .pop()
            .unwrap_or_else(|| Err(unavailable("append: no result")))
    }

    async fn append_many(&self, entries: Vec<(u32, Bytes)>) -> Vec<BusResult<String>> {
        self.append_entries(entries, None).await
    }

    async fn take_token(&self, limit: &RateLimit) -> BusResult<Result<(), u64>> {
        let wait: i64 = self
            .run(
                &self.scripts.token,
                true,
                vec![limit.key.clone()],
                vec![
                    Value::from(limit.per_s.to_string()),
                    Value::from(limit.burst.to_string()),
                    Value::from(limit.idle_ttl_ms() as i64),
                ],
            )
            .await
            .map_err(unavailable)?;
        Ok(if wait > 0 { Err(wait as u64) } else { Ok(()) })
    }

    async fn append_many_limited(
        &self,
        entries: Vec<(u32, Bytes)>,
        limit: Option<RateLimit>,
    ) -> Vec<BusResult<String>> {
        self.append_entries(entries, limit).await
    }

    async fn read(
        &self,
        partitions: &[u32],
        consumer: &str,
        max: usize,
        block: Duration,
    ) -> BusResult<Vec<PartitionBatch>> {
        if let Some(reads) = &self.cluster_reads {
            return reads
                .read(&self.topics, GROUP, partitions, consumer, max, block, |v| {
                    self.parse_read(v)
                })
                .await;
        }
        if partitions.is_empty() {
            tokio::time::sleep(block).await;
            return Ok(Vec::new());
        }
        let value = match self.xreadgroup(partitions, consumer, max, block).await {
            Ok(v) => v,
            Err(e) if e.details().contains("NOGROUP") => {
                for p in partitions {
                    self.ensure_group(*p).await?;
                }
                self.xreadgroup(partitions, consumer, max, block)
                    .await
                    .map_err(unavailable)?
            }
            Err(e) => return Err(unavailable(e)),
        };
        self.parse_read(value)
    }

    async fn claim_pending(
        &self,
        partition: u32,
        consumer: &str,
        max: usize,
    ) -> BusResult<Vec<StreamEntry>> {
        self.ensure_group(partition).await?;
        let key = self.topics.stream(partition);
        let reply: Value = self
            .cmd
            .custom(
                CustomCommand::new_static("XAUTOCLAIM", None, false),
                vec![
                    Value::from(key.clone()),
                    GROUP.into(),
                    consumer.into(),
                    0i64.into(),
                    "0-0".into(),
                    "COUNT".into(),
                    (max as i64).into(),
                ],
            )
            .await
            .map_err(unavailable)?;
        let mut parts = reply.into_array().into_iter();
        let _cursor = parts.next();
        let mut entries = parts
            .next()
            .map(|v| parse_entries(v, 1))
            .unwrap_or_default();
        // Ids that were deleted while pending: nothing to process, just ack.
        let deleted: Vec<String> = parts
            .next()
            .map(|v| {
                v.into_array()
                    .into_iter()
                    .filter_map(|v| v.as_string())
                    .collect()
            })
            .unwrap_or_default();
        if !deleted.is_empty() {
            self.ack(partition, &deleted).await?;
        }
        entries.retain(|e| !e.payload.is_empty());
        if entries.is_empty() {
            return Ok(entries);
        }
        // Delivery counts, this claim included.
        let first = entries.first().map(|e| e.id.clone()).unwrap_or_default();
        let last = entries.last().map(|e| e.id.clone()).unwrap_or_default();
        let pending: Value = self
            .cmd
            .custom(
                CustomCommand::new_static("XPENDING", None, false),
                vec![
                    Value::from(key),
                    GROUP.into(),
                    first.into(),
                    last.into(),
                    (entries.len() as i64).into(),
                ],
            )
            .await
            .map_err(unavailable)?;
        let counts: std::collections::HashMap<String, u64> = pending
            .into_array()
            .into_iter()
            .filter_map(|row| {
                let row = row.into_array();
                let id = row.first()?.as_string()?;
                let n = row.get(3)?.as_u64()?;
                Some((id, n))
            })
            .collect();
        for e in &mut entries {
            e.deliveries = counts.get(&e.id).copied().unwrap_or(1);
        }
        Ok(entries)
    }

    async fn ack(&self, partition: u32, ids: &[String]) -> BusResult<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut args: Vec<Value> = Vec::with_capacity(ids.len() + 1);
        args.push(GROUP.into());
        args.extend(ids.iter().map(|i| Value::from(i.as_str())));
        let _: Value = self
            .run(
                &self.scripts.ack,
                false,
                vec![self.topics.stream(partition)],
                args,
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn dead_letter(&self, partition: u32, entry: &StreamEntry, error: &str) -> BusResult<()> {
        let _: Value = self
            .cmd
            .custom(
                CustomCommand::new_static("XADD", None, false),
                vec![
                    Value::from(self.topics.dead_letter()),
                    "*".into(),
                    "partition".into(),
                    (partition as i64).into(),
                    "id".into(),
                    entry.id.as_str().into(),
                    "error".into(),
                    error.into(),
                    "deliveries".into(),
                    (entry.deliveries as i64).into(),
                    "p".into(),
                    Value::Bytes(entry.payload.clone()),
                ],
            )
            .await
            .map_err(unavailable)?;
        self.ack(partition, std::slice::from_ref(&entry.id)).await
    }

    async fn backlog(&self, partition: u32) -> BusResult<u64> {
        let n: Option<u64> = self
            .cmd
            .custom(
                CustomCommand::new_static("XLEN", None, false),
                vec![Value::from(self.topics.stream(partition))],
            )
            .await
            .map_err(unavailable)?;
        Ok(n.unwrap_or(0))
    }

    async fn backlog_stats(&self, partition: u32) -> BusResult<Backlog> {
        // One round trip: the length and the first (oldest) entry's id,
        // whose first half is its append time on Redis' clock.
        let stream = self.topics.stream(partition);
        let pipeline = self.cmd.pipeline();
        let _: Result<(), _> = pipeline
            .custom(
                CustomCommand::new_static("XLEN", None, false),
                vec![Value::from(stream.as_str())],
            )
            .await;
        let _: Result<(), _> = pipeline
            .custom(
                CustomCommand::new_static("XRANGE", None, false),
                vec![
                    Value::from(stream.as_str()),
                    Value::from("-"),
                    Value::from("+"),
                    Value::from("COUNT"),
                    Value::from(1i64),
                ],
            )
            .await;
        let mut replies = pipeline.try_all::<Value>().await.into_iter();
        let entries = match replies.next() {
            Some(Ok(v)) => v.as_u64().unwrap_or(0),
            Some(Err(e)) => return Err(unavailable(e)),
            None => 0,
        };
        let first_ms = match replies.next() {
            Some(Ok(v)) => v
                .into_array()
                .into_iter()
                .next()
                .and_then(|entry| entry.into_array().into_iter().next())
                .and_then(|id| id.into_string())
                .and_then(|id| id.split('-').next().and_then(|ms| ms.parse::<i64>().ok())),
            Some(Err(e)) => return Err(unavailable(e)),
            None => None,
        };
        let now = chrono::Utc::now().timestamp_millis();
        Ok(Backlog {
            entries,
            oldest_age: first_ms.map(|ms| Duration::from_millis((now - ms).max(0) as u64)),
        })
    }

    async fn acquire_lease(&self, partition: u32, owner: &str, ttl: Duration) -> BusResult<bool> {
        let n: i64 = self
            .run(
                &self.scripts.acquire,
                false,
                vec![self.topics.lease(partition)],
                vec![Value::from(owner), Value::from(ttl.as_millis() as i64)],
            )
            .await
            .map_err(unavailable)?;
        Ok(n == 1)
    }

    async fn renew_lease(&self, partition: u32, owner: &str, ttl: Duration) -> BusResult<bool> {
        let n: i64 = self
            .run(
                &self.scripts.renew,
                false,
                vec![self.topics.lease(partition)],
                vec![Value::from(owner), Value::from(ttl.as_millis() as i64)],
            )
            .await
            .map_err(unavailable)?;
        Ok(n == 1)
    }

    async fn release_lease(&self, partition: u32, owner: &str) -> BusResult<()> {
        let _: i64 = self
            .run(
                &self.scripts.release,
                false,
                vec![self.topics.lease(partition)],
                vec![Value::from(owner)],
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn heartbeat(&self, worker: &str, ttl: Duration) -> BusResult<usize> {
        let n: i64 = self
            .run(
                &self.scripts.heartbeat,
                false,
                vec![self.topics.workers()],
                vec![Value::from(worker), Value::from(ttl.as_millis() as i64)],
            )
            .await
            .map_err(unavailable)?;
        Ok(n.max(1) as usize)
    }

    async fn leave(&self, worker: &str) -> BusResult<()> {
        let _: Value = self
            .cmd
            .custom(
                CustomCommand::new_static("ZREM", None, false),
                vec![Value::from(self.topics.workers()), Value::from(worker)],
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn claim_dedupe(
        &self,
        claims: &[(String, String)],
        ttl: Duration,
    ) -> BusResult<Vec<DedupeClaim>> {
        if claims.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = claims.iter().map(|(k, _)| self.topics.dedupe(k)).collect();
        if self.clustered {
            return self.claim_dedupe_per_slot(keys, claims, ttl).await;
        }
        let mut args: Vec<Value> = vec![Value::from(ttl.as_millis() as i64)];
        args.extend(claims.iter().map(|(_, v)| Value::from(v.as_str())));
        let reply: Value = self
            .run(&self.scripts.claim, false, keys, args)
            .await
            .map_err(unavailable)?;
        Ok(reply.into_array().into_iter().map(dedupe_claim).collect())
    }

    async fn complete_batch(&self, batch: BatchEnd) -> BusResult<()> {
        if self.clustered {
            return self.complete_batch_per_slot(batch).await;
        }
        let BatchEnd {
            publish,
            settle_set,
            settle_ttl,
            settle_delete,
            acks,
        } = batch;
        let mut keys: Vec<String> = settle_set
            .iter()
            .map(|(k, _)| self.topics.dedupe(k))
            .collect();
        keys.extend(settle_delete.iter().map(|k| self.topics.dedupe(k)));
        keys.extend(acks.iter().map(|(p, _)| self.topics.stream(*p)));
        let mut args: Vec<Value> = Vec::with_capacity(
            5 + 2 * publish.len()
                + settle_set.len()
                + acks.iter().map(|(_, ids)| ids.len() + 1).sum::<usize>(),
        );
        args.push(Value::from(settle_ttl.as_millis() as i64));
        args.push(Value::from(settle_set.len() as i64));
        args.push(Value::from(settle_delete.len() as i64));
        args.push(Value::from(publish.len() as i64));
        args.push(Value::from(acks.len() as i64));
        for (topic, payload) in publish {
            args.push(Value::from(topic));
            args.push(Value::Bytes(payload));
        }
        args.extend(settle_set.into_iter().map(|(_, v)| Value::from(v)));
        for (_, ids) in acks {
            args.push(Value::from(ids.len() as i64));
            args.extend(ids.into_iter().map(Value::from));
        }
        let _: Value = self
            .run(&self.scripts.complete, false, keys, args)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn settle_dedupe(
        &self,
        set: &[(String, String)],
        ttl: Duration,
        delete: &[String],
    ) -> BusResult<()> {
        if set.is_empty() && delete.is_empty() {
            return Ok(());
        }
        if self.clustered {
            for reply in eval_pipelined(&self.cmd, self.settle_calls(set, ttl, delete)).await {
                reply.map_err(unavailable)?;
            }
            return Ok(());
        }
        let mut keys: Vec<String> = set.iter().map(|(k, _)| self.topics.dedupe(k)).collect();
        keys.extend(delete.iter().map(|k| self.topics.dedupe(k)));
        let mut args: Vec<Value> = vec![
            Value::from(ttl.as_millis() as i64),
            Value::from(set.len() as i64),
        ];
        args.extend(set.iter().map(|(_, v)| Value::from(v.as_str())));
        let _: Value = self
            .run(&self.scripts.settle, false, keys, args)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn release_dedupe(&self, claims: &[(String, String)]) -> BusResult<()> {
        if claims.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = claims.iter().map(|(k, _)| self.topics.dedupe(k)).collect();
        if self.clustered {
            let calls = slots::group_by_slot(keys.iter().map(String::as_str))
                .into_iter()
                .map(|group| {
                    let args = group
                        .iter()
                        .map(|i| Value::from(claims[*i].1.as_str()))
                        .collect();
                    let keys = group.iter().map(|i| keys[*i].clone()).collect();
                    (&self.scripts.release_dedupe, keys, args)
                })
                .collect();
            for reply in eval_pipelined(&self.cmd, calls).await {
                reply.map_err(unavailable)?;
            }
            return Ok(());
        }
        let args: Vec<Value> = claims
            .iter()
            .map(|(_, v)| Value::from(v.as_str()))
            .collect();
        let _: Value = self
            .run(&self.scripts.release_dedupe, false, keys, args)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn count_in_window(&self, key: &str, window: Duration) -> BusResult<u64> {
        let n: i64 = self
            .run(
                &self.scripts.count,
                false,
                vec![self.topics.counter(key)],
                vec![Value::from(window.as_millis() as i64)],
            )
            .await
            .map_err(unavailable)?;
        Ok(n.max(0) as u64)
    }

    async fn read_counter(&self, key: &str) -> BusResult<u64> {
        let v: Option<u64> = self
            .cmd
            .with_options(&self.fail_fast)
            .get(self.topics.counter(key))
            .await
            .map_err(unavailable)?;
        Ok(v.unwrap_or(0))
    }

    async fn publish(&self, messages: Vec<(String, Bytes)>) -> BusResult<()> {
        if messages.is_empty() {
            return Ok(());
        }
        let pipeline = self.cmd.pipeline();
        for (topic, payload) in messages {
            // Sharded on a cluster: the message goes to the shard of its
            // topic's slot only, not to every node.
            let queued: Result<(), _> = if self.clustered {
                pipeline.spublish(topic, Value::Bytes(payload)).await
            } else {
                pipeline.publish(topic, Value::Bytes(payload)).await
            };
            queued.map_err(unavailable)?;
        }
        let _: Vec<Value> = pipeline.all().await.map_err(unavailable)?;
        Ok(())
    }

    async fn subscribe(&self, topics: Vec<String>) -> BusResult<()> {
        if topics.is_empty() {
            return Ok(());
        }
        if self.clustered {
            // One `SSUBSCRIBE` may only name channels of one slot.
            for group in slots::split_by_slot(&topics) {
                self.subscriber
                    .ssubscribe(group)
                    .await
                    .map_err(unavailable)?;
            }
            return Ok(());
        }
        self.subscriber.subscribe(topics).await.map_err(unavailable)
    }

    async fn unsubscribe(&self, topics: Vec<String>) -> BusResult<()> {
        if topics.is_empty() {
            return Ok(());
        }
        if self.clustered {
            for group in slots::split_by_slot(&topics) {
                self.subscriber
                    .sunsubscribe(group)
                    .await
                    .map_err(unavailable)?;
            }
            return Ok(());
        }
        self.subscriber
            .unsubscribe(topics)
            .await
            .map_err(unavailable)
    }

    fn incoming(&self) -> broadcast::Receiver<TopicMessage> {
        self.incoming.subscribe()
    }

    fn pubsub_gaps(&self) -> tokio::sync::watch::Receiver<u64> {
        self.gaps.subscribe()
    }

    async fn ping(&self) -> BusResult<()> {
        let _: String = self
            .cmd
            .with_options(&self.fail_fast)
            .ping(None)
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}
