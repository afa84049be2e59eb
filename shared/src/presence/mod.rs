//! Who is connected, cluster-wide: the per-user socket counts behind
//! `MAX_CONNECTIONS_PER_USER` (CONTRACT §2) and online presence (§11).
//!
//! Like centrifuge's `PresenceManager` beside its `Broker`, this is a seam
//! of its own, with a Redis implementation ([`redis::RedisPresence`]) and an
//! in-memory one ([`memory::MemoryPresence`]) of the same semantics:
//!
//! - every live socket is an entry `<node>:<sid>` in its user's set, scored
//!   by an expiry that its node's heartbeat pushes forward; a node that dies
//!   stops refreshing, so its entries expire after `CONNECTION_TTL_MS`;
//! - an index of online users holds, per user, when to look at them again:
//!   the latest expiry of their entries, or, once their last socket closed,
//!   the end of the offline grace (`PRESENCE_OFFLINE_GRACE_MS`). A user is
//!   online while they are in the index, so a reconnect within the grace is
//!   no transition at all (no `presence:changed` storm from flapping);
//! - [`Presence::sweep`], run by every gateway, takes the users whose time
//!   has come: with no live entry left they go offline, reported to exactly
//!   one sweeper (the step is atomic).
//!
//! Nothing here is on the message path: a claim per handshake, a release
//! per disconnect, a heartbeat per node and a sweep per node and second.
//!
//! Keys are spread over [`BUCKETS`] hash-tagged buckets, a user's set in
//! the same bucket as its index entry, so each atomic step touches one
//! Redis Cluster slot.

pub mod memory;
pub mod redis;

use std::time::Duration;

use async_trait::async_trait;

use crate::bus::BusResult;

/// Buckets of the online index (a fixed part of the key layout: changing it
/// orphans the entries of running nodes).
pub const BUCKETS: u32 = 16;

/// The bucket of a user: FNV-1a of the id, stable across nodes and versions.
pub fn bucket_of(user_id: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in user_id.as_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h % BUCKETS
}

/// What a handshake's claim decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The user already holds `MAX_CONNECTIONS_PER_USER` live sockets.
    Refused,
    /// The socket counts. `came_online`: the user was offline until now
    /// (the transition's time, ms since the epoch, on the backend's clock).
    Accepted { came_online: Option<i64> },
}

/// A user whose last socket is gone for good (see [`Presence::sweep`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WentOffline {
    pub user_id: String,
    /// When it was decided, ms since the epoch (the backend's clock).
    pub at_ms: i64,
}

#[async_trait]
pub trait Presence: Send + Sync + 'static {
    /// Counts socket `member` of `user_id` unless the user already holds
    /// `limit` live ones (0: no limit); the entry expires `ttl` from now
    /// unless refreshed.
    async fn claim(
        &self,
        user_id: &str,
        member: &str,
        limit: usize,
        ttl: Duration,
    ) -> BusResult<Claim>;

    /// Pushes the expiry of entries `(user_id, member)` to `ttl` from now,
    /// in one round trip (a node's heartbeat). An entry the backend lost
    /// (Redis restarted empty) is added back, so counts and presence heal
    /// within one heartbeat. The price: a release racing a heartbeat that
    /// read the entry just before may see it re-added, and it then lingers
    /// until it expires (`CONNECTION_TTL_MS`).
    async fn refresh(&self, entries: &[(String, String)], ttl: Duration) -> BusResult<()>;

    /// Stops counting a socket. If it was the user's last one, they stay
    /// online for `grace` (a reconnect meanwhile is no transition).
    async fn release(&self, user_id: &str, member: &str, grace: Duration) -> BusResult<()>;

    /// Takes up to `max` users whose time has come and returns those with
    /// no live socket left: they are offline now, and no other sweeper will
    /// report them.
    async fn sweep(&self, max: usize) -> BusResult<Vec<WentOffline>>;

    /// Whether each user is online, in order.
    async fn online(&self, user_ids: &[String]) -> BusResult<Vec<bool>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_always_maps_to_the_same_bucket() {
        let b = bucket_of("user_2abc");
        assert!(b < BUCKETS);
        assert_eq!(bucket_of("user_2abc"), b);
        let spread: std::collections::HashSet<u32> =
            (0..200).map(|i| bucket_of(&format!("user{i}"))).collect();
        assert!(spread.len() > BUCKETS as usize / 2, "{spread:?}");
    }
}
