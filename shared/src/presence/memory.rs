//! The in-process [`Presence`] of the embedded mode: the same sets, index
//! and grace as Redis, under one lock.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{Claim, Presence, WentOffline};
use crate::bus::BusResult;

#[derive(Default)]
struct State {
    /// Live sockets per user: member → expiry.
    sockets: HashMap<String, HashMap<String, Instant>>,
    /// Online users: when to look at them again.
    online: HashMap<String, Instant>,
}

#[derive(Default)]
pub struct MemoryPresence {
    state: Mutex<State>,
}

impl MemoryPresence {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[async_trait]
impl Presence for MemoryPresence {
    async fn claim(
        &self,
        user_id: &str,
        member: &str,
        limit: usize,
        ttl: Duration,
    ) -> BusResult<Claim> {
        let now = Instant::now();
        let mut state = self.lock();
        let set = state.sockets.entry(user_id.to_string()).or_default();
        set.retain(|_, exp| *exp > now);
        if limit > 0 && !set.contains_key(member) && set.len() >= limit {
            return Ok(Claim::Refused);
        }
        let expiry = now + ttl;
        set.insert(member.to_string(), expiry);
        let came_online = match state.online.get_mut(user_id) {
            Some(due) => {
                *due = (*due).max(expiry);
                None
            }
            None => {
                state.online.insert(user_id.to_string(), expiry);
                Some(now_ms())
            }
        };
        Ok(Claim::Accepted { came_online })
    }

    async fn refresh(&self, entries: &[(String, String)], ttl: Duration) -> BusResult<()> {
        let expiry = Instant::now() + ttl;
        let mut state = self.lock();
        for (user, member) in entries {
            state
                .sockets
                .entry(user.clone())
                .or_default()
                .insert(member.clone(), expiry);
            let due = state.online.entry(user.clone()).or_insert(expiry);
            *due = (*due).max(expiry);
        }
        Ok(())
    }

    async fn release(&self, user_id: &str, member: &str, grace: Duration) -> BusResult<()> {
        let now = Instant::now();
        let mut state = self.lock();
        let empty = match state.sockets.get_mut(user_id) {
            Some(set) => {
                set.remove(member);
                set.retain(|_, exp| *exp > now);
                set.is_empty()
            }
            None => true,
        };
        if empty {
            state.sockets.remove(user_id);
            if let Some(due) = state.online.get_mut(user_id) {
                *due = now + grace;
            }
        }
        Ok(())
    }

    async fn sweep(&self, max: usize) -> BusResult<Vec<WentOffline>> {
        let now = Instant::now();
        let mut state = self.lock();
        let due: Vec<String> = state
            .online
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(u, _)| u.clone())
            .take(max)
            .collect();
        let mut gone = Vec::new();
        for user in due {
            let latest = state.sockets.get_mut(&user).and_then(|set| {
                set.retain(|_, exp| *exp > now);
                set.values().max().copied()
            });
            match latest {
                Some(expiry) => {
                    state.online.insert(user, expiry);
                }
                None => {
                    state.sockets.remove(&user);
                    state.online.remove(&user);
                    gone.push(WentOffline {
                        user_id: user,
                        at_ms: now_ms(),
                    });
                }
            }
        }
        Ok(gone)
    }

    async fn online(&self, user_ids: &[String]) -> BusResult<Vec<bool>> {
        let state = self.lock();
        Ok(user_ids
            .iter()
            .map(|u| state.online.contains_key(u))
            .collect())
    }
}
