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
//! Multi-key work runs in Lua scripts so that it is one round trip and
//! atomic. This expects a single Redis (or a primary with replicas), not a
//! Redis Cluster.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use fred::clients::SubscriberClient;
use fred::prelude::*;
use fred::types::scripts::Script;
use fred::types::CustomCommand;
use tokio::sync::broadcast;

use super::{
    Backlog, BatchEnd, Bus, BusError, BusResult, DedupeClaim, PartitionBatch, RateLimit,
    StreamEntry, TopicMessage, Topics,
};

/// Consumer group of the workers on every partition stream.
const GROUP: &str = "workers";

/// The token bucket both rate-limit scripts share (a macro, so that it can
/// be `concat!`ed into their source): `bucket_peek` refills a bucket by the
/// elapsed Redis time and returns its tokens, the time, and the retry-after
/// ms when fewer than one token is left; `bucket_store` takes the token.
macro_rules! bucket_lua {
    () => {
        r#"
if redis.replicate_commands then redis.replicate_commands() end
local function bucket_peek(key, rate, burst)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local b = redis.call('HMGET', key, 't', 'ts')
  local tokens = tonumber(b[1]) or burst
  local last = tonumber(b[2]) or now
  local elapsed = now - last
  if elapsed < 0 then elapsed = 0 end
  tokens = math.min(burst, tokens + elapsed * rate / 1000)
  if tokens < 1 then
    return tokens, now, math.max(1, math.ceil((1 - tokens) * 1000 / rate))
  end
  return tokens, now, nil
end
local function bucket_store(key, tokens, now, ttl)
  redis.call('HSET', key, 't', tostring(tokens), 'ts', now)
  redis.call('PEXPIRE', key, ttl)
end
"#
    };
}

/// Appends unless the partition already holds `ARGV[1]` entries. Entries are
/// deleted once acknowledged, so the length is the unacknowledged backlog.
///
/// With a second key, that key is the sender's token bucket (CONTRACT §10,
/// `RateLimit::take` is the same formula): ARGV[3] tokens per second,
/// ARGV[4] burst, ARGV[5] idle TTL in ms. An empty bucket answers
/// `rl:<retry after ms>` (a stream id never starts with `r`), and a full
/// stream takes no token: the check costs no extra round trip.
const APPEND_LUA: &str = concat!(
    bucket_lua!(),
    r#"
local bucket
if #KEYS > 1 then
  local tokens, now, retry = bucket_peek(KEYS[2], tonumber(ARGV[3]), tonumber(ARGV[4]))
  if retry then return 'rl:' .. retry end
  bucket = {tokens - 1, now}
end
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return false end
if bucket then bucket_store(KEYS[2], bucket[1], bucket[2], ARGV[5]) end
return redis.call('XADD', KEYS[1], '*', 'p', ARGV[2])
"#
);

/// A token bucket on its own (`Bus::take_token`): the bucket half of
/// `APPEND_LUA`. Returns 0 when a token was taken, else the retry-after ms.
const TOKEN_LUA: &str = concat!(
    bucket_lua!(),
    r#"
local tokens, now, retry = bucket_peek(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]))
if retry then return retry end
bucket_store(KEYS[1], tokens - 1, now, ARGV[3])
return 0
"#
);

/// Acknowledges and deletes entries.
const ACK_LUA: &str = r#"
redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 2))
return redis.call('XDEL', KEYS[1], unpack(ARGV, 2))
"#;

/// Takes or extends a lease held by nobody or by us.
const ACQUIRE_LUA: &str = r#"
local v = redis.call('GET', KEYS[1])
if not v then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
if v == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
return 0
"#;

/// Extends a lease only if it is still ours (an expired lease is lost).
const RENEW_LUA: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1
end
return 0
"#;

const RELEASE_LUA: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"#;

/// Marks a worker alive, forgets the silent ones, counts the rest.
const HEARTBEAT_LUA: &str = r#"
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZADD', KEYS[1], ms, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ms - tonumber(ARGV[2]))
return redis.call('ZCARD', KEYS[1])
"#;

/// `SET NX GET PX` per key: returns 0 for a claimed key, else the old value.
const CLAIM_LUA: &str = r#"
local out = {}
for i = 1, #KEYS do
  local old = redis.call('SET', KEYS[i], ARGV[i + 1], 'NX', 'GET', 'PX', ARGV[1])
  if old then out[i] = old else out[i] = 0 end
end
return out
"#;

/// Sets the first `ARGV[2]` keys to their values with a TTL, deletes the rest.
const SETTLE_LUA: &str = r#"
local n = tonumber(ARGV[2])
for i = 1, #KEYS do
  if i <= n then redis.call('SET', KEYS[i], ARGV[i + 2], 'PX', ARGV[1])
  else redis.call('DEL', KEYS[i]) end
end
return 1
"#;

/// Deletes `KEYS[i]` only if it still holds `ARGV[i]` (our own claim).
const RELEASE_DEDUPE_LUA: &str = r#"
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[i] then redis.call('DEL', KEYS[i]) end
end
return 1
"#;

/// The end of a batch in one round trip: publish, settle dedupe keys,
/// acknowledge. KEYS: the keys to set, the keys to delete, the streams to
/// acknowledge on. ARGV: ttl, #set, #delete, #publish, #streams, then the
/// (topic, payload) pairs, the values of the keys to set, and per stream its
/// entry count followed by its entry ids.
const COMPLETE_LUA: &str = r#"
local ttl = ARGV[1]
local nset, ndel = tonumber(ARGV[2]), tonumber(ARGV[3])
local npub, nstreams = tonumber(ARGV[4]), tonumber(ARGV[5])
local a = 6
for i = 1, npub do
  redis.call('PUBLISH', ARGV[a], ARGV[a + 1])
  a = a + 2
end
for i = 1, nset do
  redis.call('SET', KEYS[i], ARGV[a], 'PX', ttl)
  a = a + 1
end
for i = nset + 1, nset + ndel do
  redis.call('DEL', KEYS[i])
end
for s = 1, nstreams do
  local key = KEYS[nset + ndel + s]
  local n = tonumber(ARGV[a])
  local ids = {}
  for j = 1, n do ids[j] = ARGV[a + j] end
  a = a + n + 1
  if n > 0 then
    redis.call('XACK', key, 'workers', unpack(ids))
    redis.call('XDEL', key, unpack(ids))
  end
end
return 1
"#;

const COUNT_LUA: &str = r#"
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return n
"#;

/// Capacity (in pub/sub messages, each a batch of events) of the channel
/// between the subscriber and its readers. A reader that falls this far
/// behind loses messages, which is counted and logged. A broadcast channel
/// keeps its last `capacity` payloads alive, so this also bounds memory.
const INCOMING_CAPACITY: usize = 4096;

struct Scripts {
    append: Script,
    token: Script,
    ack: Script,
    acquire: Script,
    renew: Script,
    release: Script,
    heartbeat: Script,
    claim: Script,
    settle: Script,
    release_dedupe: Script,
    complete: Script,
    count: Script,
}

pub struct RedisBus {
    topics: Topics,
    max_len: u64,
    /// On a Redis Cluster a script's keys must share a slot: a token bucket
    /// then lives next to the stream it guards (one bucket per user and
    /// partition, see [`RedisBus::bucket_key`]).
    clustered: bool,
    cmd: Client,
    reader: Client,
    subscriber: SubscriberClient,
    incoming: broadcast::Sender<TopicMessage>,
    gaps: tokio::sync::watch::Sender<u64>,
    scripts: Scripts,
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
                p.broadcast_channel_capacity = INCOMING_CAPACITY;
                p.default_command_timeout = Duration::from_secs(10);
            });
        let cmd = builder.build()?;
        let reader = builder.build()?;
        let subscriber = builder.build_subscriber_client()?;
        cmd.init().await?;
        reader.init().await?;
        subscriber.init().await?;

        let (incoming, _) = broadcast::channel(INCOMING_CAPACITY);
        let gaps = tokio::sync::watch::Sender::new(0u64);
        spawn_forwarder(&subscriber, incoming.clone(), gaps.clone());
        spawn_resubscriber(&subscriber, gaps.clone());

        Ok(Self {
            topics: Topics::new(prefix),
            max_len,
            clustered,
            cmd,
            reader,
            subscriber,
            incoming,
            gaps,
            scripts: Scripts {
                append: Script::from_lua(APPEND_LUA),
                token: Script::from_lua(TOKEN_LUA),
                ack: Script::from_lua(ACK_LUA),
                acquire: Script::from_lua(ACQUIRE_LUA),
                renew: Script::from_lua(RENEW_LUA),
                release: Script::from_lua(RELEASE_LUA),
                heartbeat: Script::from_lua(HEARTBEAT_LUA),
                claim: Script::from_lua(CLAIM_LUA),
                settle: Script::from_lua(SETTLE_LUA),
                release_dedupe: Script::from_lua(RELEASE_DEDUPE_LUA),
                complete: Script::from_lua(COMPLETE_LUA),
                count: Script::from_lua(COUNT_LUA),
            },
            fail_fast: fail_fast_options(),
        })
    }

    /// The command connection, for [`crate::presence::redis::RedisPresence`]
    /// (a clone shares the connection).
    pub fn command_client(&self) -> Client {
        self.cmd.clone()
    }

    /// The key of a bucket checked with an append to `stream`: on a Redis
    /// Cluster, hash-tagged with the stream's name so both share a slot.
    fn bucket_key(&self, limit: &RateLimit, stream: &str) -> String {
        if self.clustered {
            format!("{}:{{{}}}", limit.key, stream)
        } else {
            limit.key.clone()
        }
    }

    /// Appends `entries` in one pipeline of `APPEND_LUA` calls, each with the
    /// bucket of `limit` when given; reloads the script once on `NOSCRIPT`.
    async fn append_pipelined(
        &self,
        entries: Vec<(u32, Bytes)>,
        limit: Option<&RateLimit>,
    ) -> Vec<BusResult<String>> {
        let run = |entries: Vec<(u32, Bytes)>| async move {
            let pipeline = self.cmd.pipeline();
            let evalsha = CustomCommand::new_static("EVALSHA", None, false);
            for (partition, payload) in entries {
                let stream = self.topics.stream(partition);
                let mut args = vec![Value::from(self.scripts.append.sha1().clone())];
                match limit {
                    Some(l) => {
                        let bucket = self.bucket_key(l, &stream);
                        args.extend([Value::from(2i64), Value::from(stream), Value::from(bucket)]);
                    }
                    None => args.extend([Value::from(1i64), Value::from(stream)]),
                }
                args.extend([Value::from(self.max_len as i64), Value::Bytes(payload)]);
                if let Some(l) = limit {
                    args.extend([
                        Value::from(l.per_s.to_string()),
                        Value::from(l.burst.to_string()),
                        Value::from(l.idle_ttl_ms() as i64),
                    ]);
                }
                let _: Result<(), _> = pipeline.custom(evalsha.clone(), args).await;
            }
            pipeline.try_all::<Option<String>>().await
        };
        let mut results = run(entries.clone()).await;
        if results
            .iter()
            .any(|r| matches!(r, Err(e) if e.details().contains("NOSCRIPT")))
        {
            // Redis restarted and forgot the script: load it and run again
            // (the entries were refused, not appended).
            if let Err(e) = self.scripts.append.load(&self.cmd).await {
                return entries.iter().map(|_| Err(unavailable(&e))).collect();
            }
            results = run(entries).await;
        }
        results
            .into_iter()
            .map(|r| match r {
                Ok(Some(reply)) => match reply.strip_prefix("rl:") {
                    Some(ms) => Err(BusError::RateLimited {
                        retry_after_ms: ms.parse().unwrap_or(1000),
                    }),
                    None => Ok(reply),
                },
                Ok(None) => Err(BusError::Full),
                Err(e) => Err(unavailable(e)),
            })
            .collect()
    }

    async fn ensure_group(&self, partition: u32) -> BusResult<()> {
        let key = self.topics.stream(partition);
        let res: Result<Value, _> = self
            .cmd
            .custom(
                CustomCommand::new_static("XGROUP", None, false),
                vec![
                    Value::from("CREATE"),
                    Value::from(key),
                    Value::from(GROUP),
                    Value::from("0"),
                    Value::from("MKSTREAM"),
                ],
            )
            .await;
        match res {
            Ok(_) => Ok(()),
            Err(e) if e.details().contains("BUSYGROUP") => Ok(()),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn xreadgroup(
        &self,
        partitions: &[u32],
        consumer: &str,
        max: usize,
        block: Duration,
    ) -> Result<Value, fred::error::Error> {
        let mut args: Vec<Value> = vec![
            "GROUP".into(),
            GROUP.into(),
            consumer.into(),
            "COUNT".into(),
            (max as i64).into(),
            "BLOCK".into(),
            (block.as_millis() as i64).into(),
            "STREAMS".into(),
        ];
        for p in partitions {
            args.push(self.topics.stream(*p).into());
        }
        for _ in partitions {
            args.push(">".into());
        }
        // A read in flight when Redis goes away must fail soon, not wait for
        // the reconnect: the worker's loop has leases to re-take meanwhile.
        let opts = Options {
            timeout: Some(block + Duration::from_secs(1)),
            max_attempts: Some(1),
            fail_fast: true,
            ..Default::default()
        };
        self.reader
            .with_options(&opts)
            .custom(CustomCommand::new_static("XREADGROUP", None, true), args)
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
    argv.extend(keys.into_iter().map(Value::from));
    argv.extend(args);
    let command = CustomCommand::new_static("EVALSHA", None, false);
    match with.custom(command.clone(), argv.clone()).await {
        Err(e) if e.details().contains("NOSCRIPT") => {
            script.load(client).await?;
            with.custom(command, argv).await
        }
        other => other,
    }
}

/// Moves pub/sub messages from fred's channel to ours, so readers depend on
/// the trait's type only.
fn spawn_forwarder(
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
fn spawn_resubscriber(subscriber: &SubscriberClient, gaps: tokio::sync::watch::Sender<u64>) {
    let subscriber = subscriber.clone();
    let mut reconnects = subscriber.reconnect_rx();
    tokio::spawn(async move {
        loop {
            match reconnects.recv().await {
                // Several reconnects collapsed into one: one re-subscribe serves them all.
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => break,
            }
            let mut delay = Duration::from_millis(50);
            loop {
                match subscriber.resubscribe_all().await {
                    Ok(()) => {
                        // Whatever was published while the connection was
                        // down is gone: readers repair from the database.
                        gaps.send_modify(|g| *g += 1);
                        metrics::counter!("bus_resubscribes_total").increment(1);
                        tracing::info!(
                            topics = subscriber.tracked_channels().len(),
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
        let key = self.topics.stream(partition);
        let res: Result<Option<String>, _> = self
            .run(
                &self.scripts.append,
                true,
                vec![key.clone()],
                vec![Value::from(self.max_len as i64), Value::Bytes(payload)],
            )
            .await;
        match res {
            Ok(Some(id)) => Ok(id),
            Ok(None) => Err(BusError::Full),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn append_many(&self, entries: Vec<(u32, Bytes)>) -> Vec<BusResult<String>> {
        if entries.len() <= 1 {
            let mut out = Vec::new();
            for (p, payload) in entries {
                out.push(self.append(p, payload).await);
            }
            return out;
        }
        self.append_pipelined(entries, None).await
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
        match limit {
            None => self.append_many(entries).await,
            Some(l) => self.append_pipelined(entries, Some(&l)).await,
        }
    }

    async fn read(
        &self,
        partitions: &[u32],
        consumer: &str,
        max: usize,
        block: Duration,
    ) -> BusResult<Vec<PartitionBatch>> {
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
        let mut args: Vec<Value> = vec![Value::from(ttl.as_millis() as i64)];
        args.extend(claims.iter().map(|(_, v)| Value::from(v.as_str())));
        let reply: Value = self
            .run(&self.scripts.claim, false, keys, args)
            .await
            .map_err(unavailable)?;
        Ok(reply
            .into_array()
            .into_iter()
            .map(|v| match v {
                Value::Integer(_) => DedupeClaim::Claimed,
                other => DedupeClaim::Existing(other.as_string().unwrap_or_default()),
            })
            .collect())
    }

    async fn complete_batch(&self, batch: BatchEnd) -> BusResult<()> {
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
            let _: () = pipeline
                .publish(topic, Value::Bytes(payload))
                .await
                .map_err(unavailable)?;
        }
        let _: Vec<Value> = pipeline.all().await.map_err(unavailable)?;
        Ok(())
    }

    async fn subscribe(&self, topics: Vec<String>) -> BusResult<()> {
        if topics.is_empty() {
            return Ok(());
        }
        self.subscriber.subscribe(topics).await.map_err(unavailable)
    }

    async fn unsubscribe(&self, topics: Vec<String>) -> BusResult<()> {
        if topics.is_empty() {
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
