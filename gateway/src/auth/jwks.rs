//! A cached JWKS (Clerk's `/.well-known/jwks.json`).
//!
//! Keys are fetched at start and kept for `AUTH_JWKS_CACHE_MS`. A token whose
//! `kid` is unknown triggers a refetch, so a rotated signing key works at
//! once; refetches for unknown kids are rate-limited to one per
//! `AUTH_JWKS_COOLDOWN_MS`, so a flood of forged kids cannot turn the
//! gateway into a load generator against the identity provider.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::DecodingKey;
use tokio::sync::{Mutex, RwLock};

struct Keys {
    by_kid: HashMap<String, DecodingKey>,
    fetched_at: Option<Instant>,
}

pub struct JwksCache {
    url: String,
    http: reqwest::Client,
    keys: RwLock<Keys>,
    /// Serialises refetches and remembers when the last kid-miss refetch ran.
    last_miss_refetch: Mutex<Option<Instant>>,
    cooldown: Duration,
    max_age: Duration,
}

impl JwksCache {
    pub fn new(url: String, cooldown: Duration, max_age: Duration) -> Self {
        Self {
            url,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap_or_default(),
            keys: RwLock::new(Keys {
                by_kid: HashMap::new(),
                fetched_at: None,
            }),
            last_miss_refetch: Mutex::new(None),
            cooldown,
            max_age,
        }
    }

    /// Fetches the key set and replaces the cache.
    pub async fn refresh(&self) -> anyhow::Result<usize> {
        let set: JwkSet = self
            .http
            .get(&self.url)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let mut by_kid = HashMap::new();
        for jwk in &set.keys {
            let Some(kid) = jwk.common.key_id.clone() else {
                continue;
            };
            match DecodingKey::from_jwk(jwk) {
                Ok(key) => {
                    by_kid.insert(kid, key);
                }
                Err(e) => tracing::warn!(kid, error = %e, "unusable key in JWKS"),
            }
        }
        let n = by_kid.len();
        *self.keys.write().await = Keys {
            by_kid,
            fetched_at: Some(Instant::now()),
        };
        metrics::counter!("gateway_jwks_fetches_total").increment(1);
        tracing::debug!(keys = n, "JWKS refreshed");
        Ok(n)
    }

    /// The key of `kid`, refetching when it is unknown (rate-limited) or the
    /// cache is stale.
    pub async fn key(&self, kid: &str) -> Option<DecodingKey> {
        {
            let keys = self.keys.read().await;
            let fresh = keys.fetched_at.is_some_and(|t| t.elapsed() < self.max_age);
            if fresh {
                if let Some(k) = keys.by_kid.get(kid) {
                    return Some(k.clone());
                }
            }
        }
        let mut last = self.last_miss_refetch.lock().await;
        // Another task may have refreshed while we waited for the lock.
        if let Some(k) = self.keys.read().await.by_kid.get(kid) {
            if self
                .keys
                .read()
                .await
                .fetched_at
                .is_some_and(|t| t.elapsed() < self.max_age)
            {
                return Some(k.clone());
            }
        }
        let stale = self
            .keys
            .read()
            .await
            .fetched_at
            .is_none_or(|t| t.elapsed() >= self.max_age);
        let cooled = last.is_none_or(|t| t.elapsed() >= self.cooldown);
        if stale || cooled {
            *last = Some(Instant::now());
            if let Err(e) = self.refresh().await {
                tracing::warn!(url = %self.url, error = %e, "JWKS fetch failed");
            }
        }
        self.keys.read().await.by_kid.get(kid).cloned()
    }
}
