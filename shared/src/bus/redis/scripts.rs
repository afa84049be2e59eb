//! The Lua scripts of the Redis bus. Multi-key work runs in a script so that
//! it is one round trip and atomic; on a Redis Cluster every call's keys share
//! one hash slot (the callers split calls per slot, see `super::slots`).

use fred::types::scripts::Script;

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

/// Appends entries, each unless its partition already holds `ARGV[1]`
/// entries (entries are deleted once acknowledged, so a stream's length is
/// its unacknowledged backlog). One call carries the appends of many
/// sockets (see `super::appends`).
///
/// KEYS: per entry, its stream, then its sender's token bucket — or the
/// stream again when the entry is not rate limited (a cluster call's keys
/// must share one slot). ARGV: the maximum length, then per entry five
/// values: payload, `1` when limited (else `0`), tokens per second, burst,
/// idle TTL in ms (CONTRACT §10, `RateLimit::take` is the same formula).
///
/// Returns one reply per entry: the stream id; `rl:<retry after ms>` when
/// the bucket is empty; `full` when the stream is (a stream id starts with
/// a digit). A full stream takes no token: the check costs no extra round
/// trip.
const APPEND_LUA: &str = concat!(
    bucket_lua!(),
    r#"
local max = tonumber(ARGV[1])
local out = {}
for i = 1, #KEYS / 2 do
  local stream, key = KEYS[2 * i - 1], KEYS[2 * i]
  local a = 2 + (i - 1) * 5
  local bucket, reply
  if ARGV[a + 1] == '1' then
    local tokens, now, retry = bucket_peek(key, tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]))
    if retry then reply = 'rl:' .. retry else bucket = {tokens - 1, now} end
  end
  if not reply then
    if redis.call('XLEN', stream) >= max then
      reply = 'full'
    else
      if bucket then bucket_store(key, bucket[1], bucket[2], ARGV[a + 4]) end
      reply = redis.call('XADD', stream, '*', 'p', ARGV[a])
    end
  end
  out[i] = reply
end
return out
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

/// Every script, by its hash (loaded on first use, see `super::evalsha`).
pub(super) struct Scripts {
    pub append: Script,
    pub token: Script,
    pub ack: Script,
    pub acquire: Script,
    pub renew: Script,
    pub release: Script,
    pub heartbeat: Script,
    pub claim: Script,
    pub settle: Script,
    pub release_dedupe: Script,
    pub complete: Script,
    pub count: Script,
}

impl Scripts {
    pub fn new() -> Self {
        Self {
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
        }
    }

    /// `SCRIPT LOAD`s every script (on every primary of a cluster).
    pub async fn load_all(&self, client: &fred::clients::Client) -> fred::prelude::FredResult<()> {
        for script in [
            &self.append,
            &self.token,
            &self.ack,
            &self.acquire,
            &self.renew,
            &self.release,
            &self.heartbeat,
            &self.claim,
            &self.settle,
            &self.release_dedupe,
            &self.complete,
            &self.count,
        ] {
            script.load(client).await?;
        }
        Ok(())
    }
}
