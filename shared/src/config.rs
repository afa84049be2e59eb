//! Configuration from environment variables (12-factor).
//!
//! Every limit of the product is a named setting here, with its default, and
//! every setting is listed in the README. Gateway and worker read the same
//! struct so that both sides of the bus agree on partition counts, prefixes
//! and TTLs.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// Which backends the process runs on, derived from `REDIS_URL`/`DATABASE_URL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Redis Streams/pub-sub and PostgreSQL: a node of a cluster.
    Cluster {
        redis_url: String,
        database_url: String,
    },
    /// In-process bus and a SQLite file: the whole product in one process.
    Embedded { data_dir: PathBuf },
}

fn default_port() -> u16 {
    3002
}
fn default_host() -> String {
    "0.0.0.0".into()
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("./data")
}
fn default_prefix() -> String {
    "switchboard".into()
}
fn default_leeway() -> u64 {
    5
}
fn default_name_claim() -> String {
    "name".into()
}
fn default_image_claim() -> String {
    "image_url".into()
}
fn default_jwks_cooldown() -> u64 {
    30_000
}
fn default_jwks_cache() -> u64 {
    600_000
}
fn default_fail_threshold() -> u64 {
    20
}
fn default_fail_window() -> u64 {
    60
}
fn default_refusal_linger() -> u64 {
    1000
}
fn default_ping_interval() -> u64 {
    25_000
}
fn default_ping_timeout() -> u64 {
    60_000
}
fn default_connect_timeout() -> u64 {
    10_000
}
fn default_ws_read_buffer() -> usize {
    // A chat frame (a message of a few hundred characters and its JSON)
    // fits; tungstenite's own default through engineioxide is 4 KB.
    2048
}
fn default_max_payload() -> u64 {
    1_000_000
}
fn default_max_content() -> usize {
    4000
}
fn default_max_temp_id() -> usize {
    128
}
fn default_max_reaction_type() -> usize {
    64
}
fn default_rest_body_limit() -> usize {
    1_048_576
}
fn default_max_connections_per_user() -> usize {
    20
}
fn default_connection_heartbeat_ms() -> u64 {
    10_000
}
fn default_connection_ttl_ms() -> u64 {
    25_000
}
fn default_presence_max_members() -> usize {
    1000
}
fn default_presence_offline_grace_ms() -> u64 {
    5_000
}
fn default_presence_sweep_ms() -> u64 {
    1_000
}
fn default_typing_interval_ms() -> u64 {
    1_000
}
fn default_typing_timeout_ms() -> u64 {
    6_000
}
fn default_rate_messages_per_s() -> f64 {
    10.0
}
fn default_rate_messages_burst() -> f64 {
    20.0
}
fn default_rate_reactions_per_s() -> f64 {
    20.0
}
fn default_rate_reactions_burst() -> f64 {
    40.0
}
fn default_rate_channels_per_s() -> f64 {
    5.0
}
fn default_rate_channels_burst() -> f64 {
    10.0
}
fn default_rate_rest_per_s() -> f64 {
    10.0
}
fn default_rate_rest_burst() -> f64 {
    20.0
}

/// The rate-limited areas of CONTRACT §10, each with its own bucket per user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateArea {
    /// `message:send`.
    Messages,
    /// `reaction:add`, `reaction:remove`, `message:read`.
    Reactions,
    /// `channel:join`, `channel:leave`, `channel:sync`.
    Channels,
    /// REST writes.
    Rest,
}

impl RateArea {
    pub fn name(self) -> &'static str {
        match self {
            RateArea::Messages => "messages",
            RateArea::Reactions => "reactions",
            RateArea::Channels => "channels",
            RateArea::Rest => "rest",
        }
    }
}
fn default_dedupe_ttl() -> u64 {
    86_400
}
fn default_processing_ttl() -> u64 {
    60
}
fn default_partitions() -> u32 {
    16
}
fn default_stream_max_len() -> u64 {
    100_000
}
fn default_batch_size() -> usize {
    512
}
fn default_gateway_threads() -> usize {
    1
}

fn default_linger_ms() -> u64 {
    5
}

fn default_block_ms() -> u64 {
    // Also bounds how long an idle worker takes to notice released partitions.
    250
}
fn default_lease_ttl() -> u64 {
    // A killed worker's partitions are taken over within about this plus a
    // tenth of a second; a worker stalled for two thirds of it stops processing
    // (README: lease settings and their trade-off).
    2_000
}
fn default_attempts() -> u64 {
    5
}
fn default_history_limit() -> u64 {
    50
}
fn default_db_pool() -> u32 {
    10
}
fn default_max_channels() -> usize {
    10_000
}
fn default_inbox() -> usize {
    1024
}
fn default_drain_ms() -> u64 {
    10_000
}
fn default_outcome_timeout() -> u64 {
    30_000
}
fn default_recovery_max() -> u64 {
    1000
}

/// All settings. Field `foo_bar` is read from the variable `FOO_BAR`.
#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    /// HTTP port for Socket.IO, REST, health and metrics.
    #[serde(default = "default_port")]
    pub port: u16,
    /// Address to bind.
    #[serde(default = "default_host")]
    pub host: String,
    /// Redis for streams, dedupe keys and pub/sub. Unset (with `DATABASE_URL`
    /// unset too) means embedded mode.
    #[serde(default)]
    pub redis_url: Option<String>,
    /// PostgreSQL URL. Unset (with `REDIS_URL` unset too) means embedded mode.
    #[serde(default)]
    pub database_url: Option<String>,
    /// Where embedded mode keeps its SQLite file.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Prefix of every Redis key, stream and pub/sub channel.
    #[serde(default = "default_prefix")]
    pub redis_prefix: String,
    /// Name of this node in logs and in its pub/sub topic; defaults to a random id.
    #[serde(default)]
    pub node_id: Option<String>,

    /// JWKS URL of the Clerk instance (RS256).
    #[serde(default)]
    pub auth_jwks_url: Option<String>,
    /// PEM public key (networkless verification).
    #[serde(default)]
    pub auth_public_key: Option<String>,
    /// File holding the PEM public key.
    #[serde(default)]
    pub auth_public_key_file: Option<PathBuf>,
    /// Required `iss`, when set.
    #[serde(default)]
    pub auth_issuer: Option<String>,
    /// Comma list of accepted `azp` values, when set.
    #[serde(default)]
    pub auth_authorized_parties: Option<String>,
    /// HS256 secret for development tokens. Never set it in production.
    #[serde(default)]
    pub auth_dev_secret: Option<String>,
    /// Seconds of clock skew accepted on `exp` and `nbf`.
    #[serde(default = "default_leeway")]
    pub auth_leeway_s: u64,
    /// Claim holding the display name.
    #[serde(default = "default_name_claim")]
    pub auth_name_claim: String,
    /// Claim holding the avatar URL.
    #[serde(default = "default_image_claim")]
    pub auth_image_claim: String,
    /// Least time between two JWKS refetches caused by unknown `kid`s.
    #[serde(default = "default_jwks_cooldown")]
    pub auth_jwks_cooldown_ms: u64,
    /// Age after which the JWKS is refetched anyway.
    #[serde(default = "default_jwks_cache")]
    pub auth_jwks_cache_ms: u64,
    /// Failed handshakes per client address within the window before
    /// further attempts fail fast.
    #[serde(default = "default_fail_threshold")]
    pub auth_fail_threshold: u64,
    /// The window of `AUTH_FAIL_THRESHOLD`, in seconds.
    #[serde(default = "default_fail_window")]
    pub auth_fail_window_s: u64,
    /// How long a refused socket stays connected (with no handlers) after
    /// its `connection:error` before the server disconnects it. socketioxide
    /// tears the whole transport down, dropping unsent packets, when a
    /// packet arrives for a socket already removed from its namespace; a
    /// stock client that emits on `connect` would then never see its
    /// refusal. Lingering lets the refusal reach it first.
    #[serde(default = "default_refusal_linger")]
    pub refusal_linger_ms: u64,
    /// Comma list of IPs and CIDRs of the reverse proxies in front of the
    /// gateways (nginx, ingress). Only a peer in this list is believed about
    /// `X-Forwarded-For`; empty trusts no proxy, so a client cannot pick the
    /// address its failed handshakes are counted against.
    #[serde(default)]
    pub trusted_proxies: Option<String>,

    /// Threads of a gateway's async runtime. 1 (the default) runs the node
    /// on one thread: a gateway's work is many small socket events, and with
    /// two threads a quarter of its CPU went to waking the other one (issue
    /// 9: 16 % less gateway CPU per message, 17 % per handshake). Scale a
    /// gateway out with processes (pods); 0 means one thread per core.
    #[serde(default = "default_gateway_threads")]
    pub gateway_threads: usize,

    /// Engine.IO ping interval.
    #[serde(default = "default_ping_interval")]
    pub ping_interval_ms: u64,
    /// Engine.IO ping timeout.
    #[serde(default = "default_ping_timeout")]
    pub ping_timeout_ms: u64,
    /// Time a client has to connect to a namespace after the handshake.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: u64,
    /// Largest Socket.IO frame (socket.io's `maxHttpBufferSize`).
    #[serde(default = "default_max_payload")]
    pub max_payload_bytes: u64,
    /// Bytes a websocket connection reads from its socket at a time. Every
    /// connection holds this buffer for its whole life, idle or not; a
    /// larger frame is read in several steps (one more `read` per step),
    /// not refused.
    #[serde(default = "default_ws_read_buffer")]
    pub ws_read_buffer_bytes: usize,
    /// Longest message content, in characters (code points).
    #[serde(default = "default_max_content")]
    pub max_content_chars: usize,
    /// Longest `tempId`, in characters.
    #[serde(default = "default_max_temp_id")]
    pub max_temp_id_chars: usize,
    /// Longest reaction `type`, in bytes.
    #[serde(default = "default_max_reaction_type")]
    pub max_reaction_type_bytes: usize,
    /// Largest REST request body, in bytes (413 above).
    #[serde(default = "default_rest_body_limit")]
    pub rest_body_limit: usize,
    /// Comma list of allowed browser origins; empty means same-origin only.
    #[serde(default)]
    pub cors_origins: Option<String>,
    /// Most channels one user may be a member of (bounds `connection:success`).
    #[serde(default = "default_max_channels")]
    pub max_channels_per_user: usize,

    /// Events one connection may have queued and not yet handled; beyond
    /// it an event is refused at once with an error (back-pressure).
    #[serde(default = "default_inbox")]
    pub socket_inbox_capacity: usize,
    /// Sockets one user may hold across the cluster (CONTRACT §2); 0 = no cap.
    #[serde(default = "default_max_connections_per_user")]
    pub max_connections_per_user: usize,
    /// How often a gateway re-asserts its sockets in the per-user counts.
    #[serde(default = "default_connection_heartbeat_ms")]
    pub connection_heartbeat_ms: u64,
    /// How long a socket counts without a heartbeat: a dead node's sockets
    /// stop counting, and its users go offline, after this plus at most
    /// `PRESENCE_SWEEP_MS` (CONTRACT §2 and §11: within 30 s).
    #[serde(default = "default_connection_ttl_ms")]
    pub connection_ttl_ms: u64,
    /// `message:send` per user and second, cluster-wide (token bucket
    /// refill rate, CONTRACT §10); 0 turns the limit off.
    #[serde(default = "default_rate_messages_per_s")]
    pub rate_messages_per_s: f64,
    /// Sends a user may make at once before `RATE_MESSAGES_PER_S` applies.
    #[serde(default = "default_rate_messages_burst")]
    pub rate_messages_burst: f64,
    /// `reaction:*` and `message:read` per user and second; 0 = off.
    #[serde(default = "default_rate_reactions_per_s")]
    pub rate_reactions_per_s: f64,
    #[serde(default = "default_rate_reactions_burst")]
    pub rate_reactions_burst: f64,
    /// `channel:join`/`leave`/`sync` per user and second; 0 = off.
    #[serde(default = "default_rate_channels_per_s")]
    pub rate_channels_per_s: f64,
    #[serde(default = "default_rate_channels_burst")]
    pub rate_channels_burst: f64,
    /// REST writes per user and second; 0 = off.
    #[serde(default = "default_rate_rest_per_s")]
    pub rate_rest_per_s: f64,
    #[serde(default = "default_rate_rest_burst")]
    pub rate_rest_burst: f64,

    /// Seconds a delivered `tempId` is remembered.
    #[serde(default = "default_dedupe_ttl")]
    pub dedupe_ttl: u64,
    /// Seconds an in-flight dedupe claim lives if its worker dies.
    #[serde(default = "default_processing_ttl")]
    pub dedupe_processing_ttl: u64,
    /// Number of stream partitions; a channel always maps to the same one.
    /// Every node of a deployment must use the same value.
    #[serde(default = "default_partitions")]
    pub stream_partitions: u32,
    /// Unacknowledged entries one partition may hold before senders get
    /// `message:failed` (back-pressure instead of unbounded memory).
    #[serde(default = "default_stream_max_len")]
    pub stream_max_len: u64,
    /// Most entries a worker reads in one batch.
    #[serde(default = "default_batch_size")]
    pub worker_batch_size: usize,
    /// How long a worker's read blocks waiting for entries.
    #[serde(default = "default_block_ms")]
    pub worker_block_ms: u64,
    /// After a batch smaller than `worker_batch_size`, how long a worker
    /// waits before its next read, so that entries arriving meanwhile are
    /// read, stored and published together. Every batch pays a read, a
    /// dedupe call, one insert and one publish whatever its size: at
    /// moderate rates batches of one make those per-message costs. The
    /// first entry after an idle period is not delayed (the blocking read
    /// returns it at once); an entry arriving during the wait is delayed by
    /// at most this long. 0 reads again at once.
    #[serde(default = "default_linger_ms")]
    pub worker_linger_ms: u64,
    /// Lease time of a partition; renewed at a third of it.
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl_ms: u64,
    /// Deliveries of an entry before it goes to the dead-letter stream.
    #[serde(default = "default_attempts")]
    pub max_delivery_attempts: u64,
    /// History page size without `limit`.
    #[serde(default = "default_history_limit")]
    pub history_default_limit: u64,
    /// Database connections per process.
    #[serde(default = "default_db_pool")]
    pub db_pool_size: u32,
    /// Port of the worker's `/metrics` listener; unset means none. (The
    /// gateway serves `/metrics` on `PORT`.)
    #[serde(default)]
    pub metrics_port: Option<u16>,
    /// How long SIGTERM waits for in-flight work.
    #[serde(default = "default_drain_ms")]
    pub drain_timeout_ms: u64,
    /// Bound on the time between `SENT` and the final outcome of a write.
    /// A gateway that heard nothing by then looks the message up in the
    /// database (DELIVERED if stored) or answers FAILED with "safe to resend
    /// with the same tempId"; a worker refuses to persist an entry older than
    /// [`Settings::worker_expiry`], so such a FAILED is never contradicted.
    #[serde(default = "default_outcome_timeout")]
    pub outcome_timeout_ms: u64,
    /// Most messages one catch-up or gap repair replays for one channel.
    #[serde(default = "default_recovery_max")]
    pub recovery_max_messages: u64,

    /// Channels with more members get no `presence:changed` events and no
    /// `online` list in `connection:success` (REST only); 0 turns presence
    /// events off (CONTRACT §11).
    #[serde(default = "default_presence_max_members")]
    pub presence_max_members: usize,
    /// A user whose last socket closed stays online this long: a reconnect
    /// meanwhile is no change at all (debounces flapping connections).
    #[serde(default = "default_presence_offline_grace_ms")]
    pub presence_offline_grace_ms: u64,
    /// How often each gateway looks for users gone offline.
    #[serde(default = "default_presence_sweep_ms")]
    pub presence_sweep_ms: u64,
    /// Least time between two `typing` events forwarded per user and
    /// channel (CONTRACT §11: one per second).
    #[serde(default = "default_typing_interval_ms")]
    pub typing_interval_ms: u64,
    /// A `typing: true` not renewed within this is followed by `typing:
    /// false` from the server.
    #[serde(default = "default_typing_timeout_ms")]
    pub typing_timeout_ms: u64,
}

impl Settings {
    /// Reads the settings from the process environment.
    pub fn from_env() -> anyhow::Result<Self> {
        Self::from_vars(std::env::vars())
    }

    /// Reads the settings from `(NAME, value)` pairs; unknown names are ignored
    /// and empty values count as unset.
    pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> anyhow::Result<Self> {
        let vars = vars.into_iter().filter(|(_, v)| !v.trim().is_empty());
        let settings: Settings =
            envy::from_iter(vars).map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.stream_partitions > 0,
            "STREAM_PARTITIONS must be at least 1"
        );
        anyhow::ensure!(
            self.worker_batch_size > 0,
            "WORKER_BATCH_SIZE must be at least 1"
        );
        // Without a connection every query would wait for one in vain.
        anyhow::ensure!(self.db_pool_size > 0, "DB_POOL_SIZE must be at least 1");
        anyhow::ensure!(
            self.lease_ttl_ms >= 300,
            "LEASE_TTL_MS must be at least 300"
        );
        // Smaller reads would cost a system call per few bytes of a frame.
        anyhow::ensure!(
            self.ws_read_buffer_bytes >= 256,
            "WS_READ_BUFFER_BYTES must be at least 256"
        );
        // A linger near the outcome deadline would answer sends FAILED.
        anyhow::ensure!(
            self.worker_linger_ms <= 1000,
            "WORKER_LINGER_MS must be at most 1000"
        );
        // A shorter JWKS lifetime would refresh the key set continuously.
        anyhow::ensure!(
            self.auth_jwks_cache_ms >= 1000,
            "AUTH_JWKS_CACHE_MS must be at least 1000"
        );
        anyhow::ensure!(
            self.max_delivery_attempts > 0,
            "MAX_DELIVERY_ATTEMPTS must be at least 1"
        );
        anyhow::ensure!(
            self.outcome_timeout_ms >= 1000,
            "OUTCOME_TIMEOUT_MS must be at least 1000"
        );
        anyhow::ensure!(
            self.connection_heartbeat_ms >= 100
                && self.connection_ttl_ms > self.connection_heartbeat_ms,
            "CONNECTION_HEARTBEAT_MS must be at least 100 and below CONNECTION_TTL_MS"
        );
        for area in [
            RateArea::Messages,
            RateArea::Reactions,
            RateArea::Channels,
            RateArea::Rest,
        ] {
            let (per_s, burst) = self.rate(area);
            let env = area.name().to_uppercase();
            anyhow::ensure!(
                per_s >= 0.0 && per_s.is_finite(),
                "RATE_{env}_PER_S must be a number >= 0"
            );
            anyhow::ensure!(
                per_s == 0.0 || (burst >= 1.0 && burst.is_finite()),
                "RATE_{env}_BURST must be at least 1"
            );
        }
        self.trusted_proxies()?;
        self.mode()?;
        Ok(())
    }

    /// `(per second, burst)` of an area.
    pub fn rate(&self, area: RateArea) -> (f64, f64) {
        match area {
            RateArea::Messages => (self.rate_messages_per_s, self.rate_messages_burst),
            RateArea::Reactions => (self.rate_reactions_per_s, self.rate_reactions_burst),
            RateArea::Channels => (self.rate_channels_per_s, self.rate_channels_burst),
            RateArea::Rest => (self.rate_rest_per_s, self.rate_rest_burst),
        }
    }

    /// The bucket of `user_id` in `area`, `None` when that limit is off.
    pub fn rate_limit(
        &self,
        area: RateArea,
        topics: &crate::bus::Topics,
        user_id: &str,
    ) -> Option<crate::bus::RateLimit> {
        let (per_s, burst) = self.rate(area);
        (per_s > 0.0).then(|| crate::bus::RateLimit {
            key: topics.rate(area.name(), user_id),
            per_s,
            burst: burst.max(1.0),
        })
    }

    /// The `message:send` bucket of `user_id`, `None` when the limit is off.
    pub fn message_rate_limit(
        &self,
        topics: &crate::bus::Topics,
        user_id: &str,
    ) -> Option<crate::bus::RateLimit> {
        self.rate_limit(RateArea::Messages, topics, user_id)
    }

    /// The backend mode; only one of the two URLs set is a configuration error.
    pub fn mode(&self) -> anyhow::Result<Mode> {
        match (&self.redis_url, &self.database_url) {
            (Some(r), Some(d)) => Ok(Mode::Cluster {
                redis_url: r.clone(),
                database_url: d.clone(),
            }),
            (None, None) => Ok(Mode::Embedded {
                data_dir: self.data_dir.clone(),
            }),
            (Some(_), None) => anyhow::bail!(
                "REDIS_URL is set but DATABASE_URL is not: set both for a cluster node, or neither for the embedded mode"
            ),
            (None, Some(_)) => anyhow::bail!(
                "DATABASE_URL is set but REDIS_URL is not: set both for a cluster node, or neither for the embedded mode"
            ),
        }
    }

    pub fn ping_interval(&self) -> Duration {
        Duration::from_millis(self.ping_interval_ms)
    }
    pub fn ping_timeout(&self) -> Duration {
        Duration::from_millis(self.ping_timeout_ms)
    }
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
    pub fn outcome_timeout(&self) -> Duration {
        Duration::from_millis(self.outcome_timeout_ms)
    }

    /// Age (since the gateway accepted it) past which a worker answers an
    /// entry FAILED instead of persisting it: the outcome timeout less a
    /// margin of a third of it, at most 5 s, which covers one batch's
    /// processing time and clock skew between nodes. So the gateway, which
    /// gives up only at the full timeout, never answers FAILED for a
    /// message a worker stores afterwards.
    pub fn worker_expiry(&self) -> Duration {
        let margin = (self.outcome_timeout_ms / 3).min(5_000);
        Duration::from_millis(self.outcome_timeout_ms - margin)
    }

    pub fn lease_ttl(&self) -> Duration {
        Duration::from_millis(self.lease_ttl_ms)
    }

    /// `AUTH_AUTHORIZED_PARTIES` split on commas.
    pub fn authorized_parties(&self) -> Vec<String> {
        split_list(self.auth_authorized_parties.as_deref())
    }

    /// `CORS_ORIGINS` split on commas.
    pub fn cors_origin_list(&self) -> Vec<String> {
        split_list(self.cors_origins.as_deref())
    }

    /// `TRUSTED_PROXIES` parsed: each entry an IP (a network of one
    /// address) or a CIDR. A malformed entry is a start-up error rather than
    /// a silently untrusted proxy.
    pub fn trusted_proxies(&self) -> anyhow::Result<Vec<ipnet::IpNet>> {
        split_list(self.trusted_proxies.as_deref())
            .iter()
            .map(|entry| {
                entry
                    .parse::<ipnet::IpNet>()
                    .or_else(|_| entry.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map(|net| net.trunc())
                    .map_err(|_| {
                        anyhow::anyhow!("TRUSTED_PROXIES: {entry:?} is not an IP address or CIDR")
                    })
            })
            .collect()
    }
}

fn split_list(s: Option<&str>) -> Vec<String> {
    s.unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_the_contract_values() {
        let s = Settings::from_vars(vars(&[])).expect("defaults");
        assert_eq!(s.port, 3002);
        assert_eq!(s.ping_interval_ms, 25_000);
        assert_eq!(s.ping_timeout_ms, 60_000);
        assert_eq!(s.connect_timeout_ms, 10_000);
        assert_eq!(s.max_content_chars, 4000);
        assert_eq!(s.max_payload_bytes, 1_000_000);
        assert_eq!(s.dedupe_ttl, 86_400);
        assert_eq!(
            s.mode().expect("mode"),
            Mode::Embedded {
                data_dir: "./data".into()
            }
        );
    }

    #[test]
    fn trusted_proxies_parse_ips_and_cidrs() {
        let s = Settings::from_vars(vars(&[(
            "TRUSTED_PROXIES",
            " 10.0.0.0/8, 127.0.0.1 ,::1,fd00::/8,192.168.1.7/16",
        )]))
        .expect("parse");
        let nets: Vec<String> = s
            .trusted_proxies()
            .expect("nets")
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            nets,
            [
                "10.0.0.0/8",
                "127.0.0.1/32",
                "::1/128",
                "fd00::/8",
                "192.168.0.0/16"
            ]
        );
        let none = Settings::from_vars(vars(&[])).expect("defaults");
        assert!(none.trusted_proxies().expect("empty").is_empty());
        for bad in ["10.0.0.0/33", "nginx", "10.0.0.0/8,x"] {
            assert!(
                Settings::from_vars(vars(&[("TRUSTED_PROXIES", bad)])).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn one_url_alone_is_an_error() {
        let err = Settings::from_vars(vars(&[("REDIS_URL", "redis://x")])).unwrap_err();
        assert!(err.to_string().contains("DATABASE_URL"), "{err}");
    }

    #[test]
    fn numeric_values_parse_and_garbage_is_rejected() {
        let s = Settings::from_vars(vars(&[("PORT", "4000"), ("AUTH_DEV_SECRET", "1234")]));
        // A numeric-looking secret is still a string setting.
        let s = s.expect("parse");
        assert_eq!(s.port, 4000);
        assert_eq!(s.auth_dev_secret.as_deref(), Some("1234"));
        assert!(Settings::from_vars(vars(&[("PORT", "abc")])).is_err());
    }

    #[test]
    fn read_buffer_and_linger_are_bounded() {
        let s = Settings::from_vars(vars(&[])).expect("defaults");
        assert_eq!((s.ws_read_buffer_bytes, s.worker_linger_ms), (2048, 5));
        assert!(Settings::from_vars(vars(&[("WS_READ_BUFFER_BYTES", "255")])).is_err());
        assert!(Settings::from_vars(vars(&[("WORKER_LINGER_MS", "1001")])).is_err());
        assert!(Settings::from_vars(vars(&[("DB_POOL_SIZE", "0")])).is_err());
        let s = Settings::from_vars(vars(&[("WORKER_LINGER_MS", "0")])).expect("0 is off");
        assert_eq!(s.worker_linger_ms, 0);
    }
}
