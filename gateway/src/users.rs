//! Users are created or refreshed from their token's claims (CONTRACT §2,
//! §6), but a write per REST request and per handshake is wasted work: the
//! claims of one user rarely change. This node remembers, per user, a hash
//! of the claims it last wrote and skips the upsert while they are the same.
//!
//! The memory is bounded (`CAPACITY` users, evicting the least recently
//! written) and entries expire after `MAX_AGE`, so a row changed by another
//! node (a newer token seen there first) is brought back in line within that
//! time at most; between nodes the last writer wins, as it did before.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sea_orm::DbErr;
use switchboard_shared::store::Store;

use crate::auth::Identity;

/// Users remembered per node.
const CAPACITY: usize = 50_000;
/// How long a remembered write is trusted.
const MAX_AGE: Duration = Duration::from_secs(600);

struct Entry {
    claims: u64,
    written: Instant,
}

/// Remembers which users' rows are up to date with their claims.
pub struct Users {
    seen: Mutex<HashMap<String, Entry>>,
    capacity: usize,
    max_age: Duration,
}

impl Default for Users {
    fn default() -> Self {
        Self::with_limits(CAPACITY, MAX_AGE)
    }
}

fn claims_hash(user: &Identity) -> u64 {
    let mut h = DefaultHasher::new();
    (&user.name, &user.image_url).hash(&mut h);
    h.finish()
}

impl Users {
    pub fn with_limits(capacity: usize, max_age: Duration) -> Self {
        Self {
            seen: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
            max_age,
        }
    }

    /// Whether the row of `user` is known to hold these claims.
    fn is_current(&self, user: &Identity) -> bool {
        let hash = claims_hash(user);
        self.seen.lock().is_ok_and(|seen| {
            seen.get(&user.id)
                .is_some_and(|e| e.claims == hash && e.written.elapsed() < self.max_age)
        })
    }

    fn remember(&self, user: &Identity) {
        let Ok(mut seen) = self.seen.lock() else {
            return;
        };
        if seen.len() >= self.capacity && !seen.contains_key(&user.id) {
            // Full: drop the expired entries, and if that is not enough the
            // oldest tenth, so the linear pass runs once per many inserts.
            let max_age = self.max_age;
            seen.retain(|_, e| e.written.elapsed() < max_age);
            if seen.len() >= self.capacity {
                let mut ages: Vec<Instant> = seen.values().map(|e| e.written).collect();
                let k = (ages.len() / 10).max(1) - 1;
                let (_, cutoff, _) = ages.select_nth_unstable(k);
                let cutoff = *cutoff;
                seen.retain(|_, e| e.written > cutoff);
            }
        }
        seen.insert(
            user.id.clone(),
            Entry {
                claims: claims_hash(user),
                written: Instant::now(),
            },
        );
    }

    /// Makes sure the user's row exists and holds the token's claims,
    /// writing only when this node has not written these claims recently.
    pub async fn ensure(&self, store: &Store, user: &Identity) -> Result<(), DbErr> {
        if self.is_current(user) {
            metrics::counter!("gateway_user_upserts_total", "result" => "skipped").increment(1);
            return Ok(());
        }
        store
            .upsert_user(&user.id, &user.name, user.image_url.as_deref())
            .await?;
        metrics::counter!("gateway_user_upserts_total", "result" => "written").increment(1);
        self.remember(user);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(id: &str, name: &str) -> Identity {
        Identity {
            id: id.into(),
            name: name.into(),
            image_url: None,
        }
    }

    #[test]
    fn unchanged_claims_are_current_changed_ones_are_not() {
        let u = Users::default();
        assert!(!u.is_current(&who("a", "Alice")));
        u.remember(&who("a", "Alice"));
        assert!(u.is_current(&who("a", "Alice")));
        assert!(!u.is_current(&who("a", "Alicia")));
        let mut with_image = who("a", "Alice");
        with_image.image_url = Some("https://img".into());
        assert!(!u.is_current(&with_image));
    }

    #[test]
    fn the_memory_is_bounded_and_entries_expire() {
        let u = Users::with_limits(2, Duration::from_secs(600));
        u.remember(&who("a", "A"));
        std::thread::sleep(Duration::from_millis(2));
        u.remember(&who("b", "B"));
        u.remember(&who("c", "C"));
        assert_eq!(u.seen.lock().map(|s| s.len()).unwrap_or(0), 2);
        assert!(!u.is_current(&who("a", "A")), "the oldest was evicted");
        assert!(u.is_current(&who("c", "C")));

        let short = Users::with_limits(10, Duration::from_millis(1));
        short.remember(&who("a", "A"));
        std::thread::sleep(Duration::from_millis(5));
        assert!(!short.is_current(&who("a", "A")));
    }
}
