//! The Redis [`Presence`]: per-user sorted sets of live sockets and a
//! per-bucket sorted set of online users, changed only by Lua scripts (one
//! atomic step, one round trip, keys of one hash-tagged bucket so it works
//! on a Redis Cluster as on a single Redis).
//!
//! Keys, with `b` = [`super::bucket_of`]`(user)`:
//! - `<prefix>:conns:{pr<b>}:<user>`: members `<node>:<sid>`, score = expiry
//!   (ms, Redis time); the key itself expires with its last entry;
//! - `<prefix>:online:{pr<b>}`: members = users, score = when to look at
//!   the user again (their latest expiry, or the end of the offline grace).

use std::time::Duration;

use async_trait::async_trait;
use fred::prelude::*;
use fred::types::scripts::Script;

use super::{bucket_of, Claim, Presence, WentOffline, BUCKETS};
use crate::bus::redis::{eval_pipelined, evalsha};
use crate::bus::{BusError, BusResult};

/// `now` in ms on Redis' clock, the first lines of every script.
macro_rules! now_lua {
    () => {
        "local t = redis.call('TIME')\n\
         local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
    };
}

/// KEYS: conns, online. ARGV: member, limit (0: none), ttl ms, user.
/// Returns -1 (over the limit), 0 (counted), or the time the user came
/// online.
const CLAIM_LUA: &str = concat!(
    now_lua!(),
    r#"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local limit = tonumber(ARGV[2])
if limit > 0 and not redis.call('ZSCORE', KEYS[1], ARGV[1]) and
   redis.call('ZCARD', KEYS[1]) >= limit then
  return -1
end
local expiry = now + tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], expiry, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if redis.call('ZADD', KEYS[2], 'GT', expiry, ARGV[4]) == 1 then
  return now
end
return 0
"#
);

/// A heartbeat of many entries of one bucket, in one call: a node's
/// heartbeat costs one script per bucket and chunk, not one per socket.
/// KEYS: the bucket's online index, then the conns key of each entry. ARGV:
/// ttl ms, then each entry's member and user. Re-adds an entry Redis lost
/// (an empty restart), so presence and the counts heal within one heartbeat.
const REFRESH_LUA: &str = concat!(
    now_lua!(),
    r#"
local ttl = tonumber(ARGV[1])
local expiry = now + ttl
local online = {'ZADD', KEYS[1], 'GT'}
for i = 2, #KEYS do
  redis.call('ZADD', KEYS[i], expiry, ARGV[2 * i - 2])
  redis.call('PEXPIRE', KEYS[i], ttl)
  online[#online + 1] = expiry
  online[#online + 1] = ARGV[2 * i - 1]
end
if #KEYS > 1 then redis.call(unpack(online)) end
return 0
"#
);

/// Entries per refresh call: bounds one script's run time (and Lua's
/// `unpack`, which takes a few thousand values at most).
const REFRESH_CHUNK: usize = 500;

/// KEYS: conns, online. ARGV: member, grace ms, user.
const RELEASE_LUA: &str = concat!(
    now_lua!(),
    r#"
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) == 0 then
  redis.call('ZADD', KEYS[2], 'XX', now + tonumber(ARGV[2]), ARGV[3])
end
return 0
"#
);

/// Who of some users is online, several buckets in one call. KEYS: online
/// indexes. ARGV: for each key the number of its users, then all the users
/// in key order. Returns a 1 or 0 per user, in that order. On a single Redis
/// one call covers every bucket; on a cluster each call holds one bucket
/// (one slot). One call instead of a `ZMSCORE` per bucket matters because
/// the client writes every pipelined command with a system call of its own.
const ONLINE_LUA: &str = r#"
local out = {}
local a = #KEYS + 1
for i = 1, #KEYS do
  local n = tonumber(ARGV[i])
  local users = {}
  for j = 1, n do users[j] = ARGV[a + j - 1] end
  a = a + n
  local scores = redis.call('ZMSCORE', KEYS[i], unpack(users))
  for j = 1, n do
    if scores[j] then out[#out + 1] = 1 else out[#out + 1] = 0 end
  end
end
return out
"#;

/// Users per `ONLINE_LUA` call (Lua's `unpack` takes a few thousand values
/// at most).
const ONLINE_CHUNK: usize = 1000;

/// Takes offline the users due in some buckets, in one call. KEYS: the
/// buckets' online indexes. ARGV: max users per bucket, then each bucket's
/// conns key prefix in key order. Returns {now, users gone offline...}. On a
/// single Redis one call covers every bucket (one `EVALSHA` per sweep
/// instead of one per bucket, each of which the client writes with a system
/// call of its own); on a cluster each call holds one bucket (one slot).
const SWEEP_LUA: &str = concat!(
    now_lua!(),
    r#"
local max = tonumber(ARGV[1])
local out = {now}
for i = 1, #KEYS do
  local prefix = ARGV[i + 1]
  local due = redis.call('ZRANGEBYSCORE', KEYS[i], '-inf', now, 'LIMIT', 0, max)
  for _, u in ipairs(due) do
    local k = prefix .. u
    redis.call('ZREMRANGEBYSCORE', k, '-inf', now)
    local top = redis.call('ZRANGE', k, -1, -1, 'WITHSCORES')
    if #top == 0 then
      redis.call('ZREM', KEYS[i], u)
      out[#out + 1] = u
    else
      redis.call('ZADD', KEYS[i], top[2], u)
    end
  end
end
return out
"#
);

/// Indices of `users`, grouped by their presence bucket (index = bucket).
fn by_bucket<'a>(users: impl Iterator<Item = &'a str>) -> Vec<Vec<usize>> {
    let mut out = vec![Vec::new(); BUCKETS as usize];
    for (i, u) in users.enumerate() {
        out[bucket_of(u) as usize].push(i);
    }
    out
}

pub struct RedisPresence {
    prefix: String,
    client: Client,
    claim: Script,
    refresh: Script,
    release: Script,
    sweep: Script,
    online: Script,
}

fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(e.to_string())
}

impl RedisPresence {
    /// Uses `client` (the bus' command connection) under `prefix`.
    pub fn new(client: Client, prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
            client,
            claim: Script::from_lua(CLAIM_LUA),
            refresh: Script::from_lua(REFRESH_LUA),
            release: Script::from_lua(RELEASE_LUA),
            sweep: Script::from_lua(SWEEP_LUA),
            online: Script::from_lua(ONLINE_LUA),
        }
    }

    /// `SCRIPT LOAD`s the scripts (on every primary of a cluster) before the
    /// first handshake: otherwise a burst of connections meets `NOSCRIPT`
    /// at once and each of them loads the script again.
    pub async fn preload(&self) -> Result<(), fred::error::Error> {
        for script in [
            &self.claim,
            &self.refresh,
            &self.release,
            &self.sweep,
            &self.online,
        ] {
            script.load(&self.client).await?;
        }
        Ok(())
    }

    fn tag(bucket: u32) -> String {
        format!("{{pr{bucket}}}")
    }

    fn conns_prefix(&self, bucket: u32) -> String {
        format!("{}:conns:{}:", self.prefix, Self::tag(bucket))
    }

    fn online_key(&self, bucket: u32) -> String {
        format!("{}:online:{}", self.prefix, Self::tag(bucket))
    }

    /// The two keys of a user: their socket set and their bucket's index.
    fn keys(&self, user_id: &str) -> Vec<String> {
        let b = bucket_of(user_id);
        vec![
            format!("{}{user_id}", self.conns_prefix(b)),
            self.online_key(b),
        ]
    }

    /// Runs one script many times in one pipeline (one round trip), each
    /// call on its bucket's node (see `bus::redis::eval_pipelined`).
    async fn eval_many(
        &self,
        script: &Script,
        calls: Vec<(Vec<String>, Vec<Value>)>,
    ) -> Result<Vec<Value>, fred::error::Error> {
        let calls = calls
            .into_iter()
            .map(|(keys, args)| (script, keys, args))
            .collect();
        eval_pipelined(&self.client, calls)
            .await
            .into_iter()
            .collect()
    }
}

#[async_trait]
impl Presence for RedisPresence {
    async fn claim(
        &self,
        user_id: &str,
        member: &str,
        limit: usize,
        ttl: Duration,
    ) -> BusResult<Claim> {
        // A handshake waits on its claim: fail at once while Redis is down.
        let reply: Value = evalsha(
            &self.client,
            true,
            &self.claim,
            self.keys(user_id),
            vec![
                Value::from(member),
                Value::from(limit as i64),
                Value::from(ttl.as_millis() as i64),
                Value::from(user_id),
            ],
        )
        .await
        .map_err(unavailable)?;
        match reply.as_i64() {
            Some(-1) => Ok(Claim::Refused),
            Some(0) => Ok(Claim::Accepted { came_online: None }),
            Some(at) => Ok(Claim::Accepted {
                came_online: Some(at),
            }),
            None => Err(BusError::Protocol(format!("presence claim: {reply:?}"))),
        }
    }

    async fn refresh(&self, entries: &[(String, String)], ttl: Duration) -> BusResult<()> {
        let ttl = ttl.as_millis() as i64;
        let by_bucket = by_bucket(entries.iter().map(|(user, _)| user.as_str()));
        // One call per bucket and chunk (a call's keys share the bucket's
        // hash tag), all of them in one pipeline.
        let mut calls = Vec::new();
        for (b, bucket) in by_bucket.iter().enumerate() {
            for chunk in bucket.chunks(REFRESH_CHUNK) {
                let mut keys = Vec::with_capacity(chunk.len() + 1);
                let mut args = Vec::with_capacity(chunk.len() * 2 + 1);
                keys.push(self.online_key(b as u32));
                args.push(Value::from(ttl));
                for (user, member) in chunk.iter().map(|i| &entries[*i]) {
                    keys.push(format!("{}{user}", self.conns_prefix(b as u32)));
                    args.push(Value::from(member.as_str()));
                    args.push(Value::from(user.as_str()));
                }
                calls.push((keys, args));
            }
        }
        if calls.is_empty() {
            return Ok(());
        }
        self.eval_many(&self.refresh, calls)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn release(&self, user_id: &str, member: &str, grace: Duration) -> BusResult<()> {
        let _: Value = evalsha(
            &self.client,
            false,
            &self.release,
            self.keys(user_id),
            vec![
                Value::from(member),
                Value::from(grace.as_millis() as i64),
                Value::from(user_id),
            ],
        )
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    async fn sweep(&self, max: usize) -> BusResult<Vec<WentOffline>> {
        let per_bucket = max.div_ceil(BUCKETS as usize).max(1) as i64;
        let call = |buckets: &[u32]| {
            let keys = buckets.iter().map(|b| self.online_key(*b)).collect();
            let mut args = vec![Value::from(per_bucket)];
            args.extend(buckets.iter().map(|b| Value::from(self.conns_prefix(*b))));
            (keys, args)
        };
        let all: Vec<u32> = (0..BUCKETS).collect();
        let calls = if self.client.is_clustered() {
            all.chunks(1).map(call).collect()
        } else {
            vec![call(&all)]
        };
        let replies = self
            .eval_many(&self.sweep, calls)
            .await
            .map_err(unavailable)?;
        let mut gone = Vec::new();
        for reply in replies {
            let mut items = reply.into_array().into_iter();
            let at_ms = items.next().and_then(|v| v.as_i64()).unwrap_or_default();
            gone.extend(
                items
                    .filter_map(|u| u.into_string())
                    .map(|user_id| WentOffline { user_id, at_ms }),
            );
        }
        Ok(gone)
    }

    async fn online(&self, user_ids: &[String]) -> BusResult<Vec<bool>> {
        if user_ids.is_empty() {
            return Ok(Vec::new());
        }
        let by_bucket = by_bucket(user_ids.iter().map(String::as_str));
        // Calls of (bucket, its users' indices) groups: one group per call on
        // a cluster (a script stays in one slot), as many groups as fit in
        // ONLINE_CHUNK users on a single Redis.
        let clustered = self.client.is_clustered();
        let mut calls: Vec<Vec<(u32, &[usize])>> = Vec::new();
        let mut in_last = 0;
        for (b, idx) in by_bucket.iter().enumerate() {
            for chunk in idx.chunks(ONLINE_CHUNK) {
                if clustered || calls.is_empty() || in_last + chunk.len() > ONLINE_CHUNK {
                    calls.push(Vec::new());
                    in_last = 0;
                }
                in_last += chunk.len();
                if let Some(call) = calls.last_mut() {
                    call.push((b as u32, chunk));
                }
            }
        }
        let requests = calls
            .iter()
            .map(|groups| {
                let keys = groups.iter().map(|(b, _)| self.online_key(*b)).collect();
                let mut args: Vec<Value> = groups
                    .iter()
                    .map(|(_, chunk)| Value::from(chunk.len() as i64))
                    .collect();
                args.extend(
                    groups
                        .iter()
                        .flat_map(|(_, chunk)| chunk.iter())
                        .map(|i| Value::from(user_ids[*i].as_str())),
                );
                (keys, args)
            })
            .collect();
        let replies = self
            .eval_many(&self.online, requests)
            .await
            .map_err(unavailable)?;
        let mut out = vec![false; user_ids.len()];
        for (groups, reply) in calls.iter().zip(replies) {
            let flags = reply.into_array();
            let asked = groups.iter().flat_map(|(_, chunk)| chunk.iter());
            for (i, flag) in asked.zip(flags) {
                out[*i] = flag.as_i64() == Some(1);
            }
        }
        Ok(out)
    }
}
