//! A cached JWKS (Clerk's `/.well-known/jwks.json`), stale-while-revalidate.
//!
//! Authentication must not depend on the identity provider answering
//! quickly, or at all, once we hold its keys:
//!
//! - A known `kid` is always served from the cache at once, however old the
//!   set is. A set older than `AUTH_JWKS_CACHE_MS` starts one refresh in the
//!   background; nobody waits for it.
//! - An unknown `kid` (a rotated signing key, or a forged one) may start a
//!   refetch at most once per `AUTH_JWKS_COOLDOWN_MS`, failed attempts
//!   included, so a flood of forged kids cannot turn the gateway into a load
//!   generator against the provider. Outside that allowance it is simply
//!   unknown.
//! - One fetch is in flight at most (single flight). A caller with an unknown
//!   kid that finds a fetch in flight waits for it rather than failing: that
//!   is the request that most likely carries the newly rotated key. The wait
//!   is bounded by the fetch's own timeout ([`FETCH_TIMEOUT`]). Callers with
//!   a known kid never wait.
//! - A failed fetch keeps the last good set and backs off exponentially
//!   ([`RETRY_BASE`] doubling up to [`RETRY_MAX`]) before the next attempt of
//!   any kind. So a failing or hanging provider costs at most one request
//!   per back-off period, never one per verification.
//!
//! Fetches are counted in `gateway_jwks_fetches_total{result="ok"|"error"}`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt, Shared};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::DecodingKey;

/// Longest a fetch may take (connect, headers and body).
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Delay before retrying after the first failure; doubles per failure.
pub const RETRY_BASE: Duration = Duration::from_secs(1);
/// Longest delay between retries after failures.
pub const RETRY_MAX: Duration = Duration::from_secs(60);

/// Outcome of one fetch, shared by everyone waiting on it: the number of
/// usable keys, or the error text.
type FetchOutcome = Result<usize, Arc<str>>;
type InFlight = Shared<BoxFuture<'static, FetchOutcome>>;

struct State {
    keys: Arc<HashMap<String, DecodingKey>>,
    /// When the current set was fetched (last success).
    fetched_at: Option<Instant>,
    /// When the last fetch of any kind started, or the last failure ended.
    last_attempt: Option<Instant>,
    /// When the last fetch caused by an unknown kid started.
    last_miss: Option<Instant>,
    /// Consecutive failed fetches (0 after a success).
    failures: u32,
    inflight: Option<InFlight>,
}

struct Inner {
    url: String,
    http: reqwest::Client,
    cooldown: Duration,
    max_age: Duration,
    state: Mutex<State>,
}

/// Why a fetch is started (logs only).
#[derive(Debug, Clone, Copy)]
enum Cause {
    Start,
    Stale,
    UnknownKid,
}

#[derive(Clone)]
pub struct JwksCache {
    inner: Arc<Inner>,
}

impl JwksCache {
    pub fn new(url: String, cooldown: Duration, max_age: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                url,
                http: reqwest::Client::builder()
                    .timeout(FETCH_TIMEOUT)
                    .connect_timeout(FETCH_TIMEOUT)
                    .build()
                    .unwrap_or_default(),
                cooldown,
                max_age,
                state: Mutex::new(State {
                    keys: Arc::new(HashMap::new()),
                    fetched_at: None,
                    last_attempt: None,
                    last_miss: None,
                    failures: 0,
                    inflight: None,
                }),
            }),
        }
    }

    /// Fetches the key set now (or joins the fetch in flight) and waits for
    /// it: the start-up warm-up. Returns the number of usable keys.
    pub async fn refresh(&self) -> anyhow::Result<usize> {
        let fetch = {
            let mut st = self.inner.lock();
            self.inner.start_fetch(&mut st, Cause::Start)
        };
        fetch.await.map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// The key of `kid` if the cache holds it, without ever waiting; a stale
    /// set starts a background refresh.
    pub fn cached(&self, kid: &str) -> Option<DecodingKey> {
        let mut st = self.inner.lock();
        let key = st.keys.get(kid).cloned();
        self.inner.refresh_if_stale(&mut st);
        key
    }

    /// The key of `kid`: from the cache, or after a refetch when the kid is
    /// unknown and a refetch is allowed (or already in flight).
    pub async fn key(&self, kid: &str) -> Option<DecodingKey> {
        let fetch = {
            let mut st = self.inner.lock();
            if let Some(k) = st.keys.get(kid).cloned() {
                self.inner.refresh_if_stale(&mut st);
                return Some(k);
            }
            match st.inflight.clone() {
                Some(f) => f,
                None if self.inner.miss_fetch_allowed(&st) => {
                    self.inner.start_fetch(&mut st, Cause::UnknownKid)
                }
                None => {
                    metrics::counter!("gateway_jwks_refetches_skipped_total").increment(1);
                    return None;
                }
            }
        };
        // The fetch ends within its own timeout; the margin only guards
        // against a task that never reports.
        let _ = tokio::time::timeout(FETCH_TIMEOUT + Duration::from_secs(1), fetch).await;
        self.inner.lock().keys.get(kid).cloned()
    }
}

impl Inner {
    /// The state, also after a panic elsewhere (the data stays consistent:
    /// every update is a plain assignment).
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the back-off after failures allows another attempt now.
    fn retry_allowed(&self, st: &State) -> bool {
        if st.failures == 0 {
            return true;
        }
        let exp = st.failures.saturating_sub(1).min(16);
        let delay = RETRY_BASE.saturating_mul(1 << exp).min(RETRY_MAX);
        st.last_attempt.is_none_or(|t| t.elapsed() >= delay)
    }

    /// Whether an unknown kid may trigger a refetch now. The cooldown guards
    /// the identity provider against forged kids while a key set is held;
    /// with no key set yet (the provider was down at start) every token
    /// fails anyway, so only the failure back-off (1 s, 2 s, 4 s …) applies:
    /// authentication comes back seconds after the provider, not a cooldown
    /// later.
    fn miss_fetch_allowed(&self, st: &State) -> bool {
        let cooled =
            st.keys.is_empty() || st.last_miss.is_none_or(|t| t.elapsed() >= self.cooldown);
        cooled && self.retry_allowed(st)
    }

    fn refresh_if_stale(self: &Arc<Self>, st: &mut State) {
        let stale = st.fetched_at.is_none_or(|t| t.elapsed() >= self.max_age);
        if stale && st.inflight.is_none() && self.retry_allowed(st) {
            // Nobody awaits it: the spawned task completes on its own.
            drop(self.start_fetch(st, Cause::Stale));
        }
    }

    /// Starts a fetch unless one is in flight; either way returns it. Runs
    /// under the state lock, which is what makes the flight single.
    fn start_fetch(self: &Arc<Self>, st: &mut State, cause: Cause) -> InFlight {
        if let Some(f) = &st.inflight {
            return f.clone();
        }
        let now = Instant::now();
        st.last_attempt = Some(now);
        if matches!(cause, Cause::UnknownKid) {
            st.last_miss = Some(now);
        }
        let (tx, rx) = tokio::sync::oneshot::channel::<FetchOutcome>();
        let inner = self.clone();
        tokio::spawn(async move {
            let outcome = inner.fetch().await;
            let summary: FetchOutcome = {
                let mut st = inner.lock();
                st.inflight = None;
                match outcome {
                    Ok(keys) => {
                        let n = keys.len();
                        st.keys = Arc::new(keys);
                        st.fetched_at = Some(Instant::now());
                        st.failures = 0;
                        Ok(n)
                    }
                    Err(e) => {
                        st.failures = st.failures.saturating_add(1);
                        // The back-off counts from the failure, not from the
                        // start of an attempt that may have hung until its
                        // timeout.
                        st.last_attempt = Some(Instant::now());
                        Err(Arc::from(e.to_string()))
                    }
                }
            };
            match &summary {
                Ok(n) => {
                    metrics::counter!("gateway_jwks_fetches_total", "result" => "ok").increment(1);
                    tracing::debug!(keys = n, ?cause, "JWKS refreshed");
                }
                Err(e) => {
                    metrics::counter!("gateway_jwks_fetches_total", "result" => "error")
                        .increment(1);
                    tracing::warn!(url = %inner.url, error = %e, ?cause, "JWKS fetch failed; keeping the last good key set");
                }
            }
            let _ = tx.send(summary);
        });
        let fetch: InFlight = async move {
            rx.await
                .unwrap_or_else(|_| Err(Arc::from("JWKS fetch task ended without an answer")))
        }
        .boxed()
        .shared();
        st.inflight = Some(fetch.clone());
        fetch
    }

    async fn fetch(&self) -> anyhow::Result<HashMap<String, DecodingKey>> {
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
        anyhow::ensure!(!by_kid.is_empty(), "the JWKS holds no usable key");
        Ok(by_kid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    const OK: u8 = 0;
    const FAIL: u8 = 1;
    const HANG: u8 = 2;

    /// A JWKS endpoint that answers, fails (500) or never answers, and
    /// counts the requests it got.
    struct Provider {
        url: String,
        mode: Arc<AtomicU8>,
        hits: Arc<AtomicUsize>,
        kids: Arc<Mutex<Vec<String>>>,
    }

    impl Provider {
        async fn start(kids: &[&str]) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let url = format!(
                "http://{}/.well-known/jwks.json",
                listener.local_addr().expect("addr")
            );
            let mode = Arc::new(AtomicU8::new(OK));
            let hits = Arc::new(AtomicUsize::new(0));
            let kids: Arc<Mutex<Vec<String>>> =
                Arc::new(Mutex::new(kids.iter().map(|k| k.to_string()).collect()));
            let (m, h, k) = (mode.clone(), hits.clone(), kids.clone());
            tokio::spawn(async move {
                while let Ok((mut sock, _)) = listener.accept().await {
                    let (m, h, k) = (m.clone(), h.clone(), k.clone());
                    tokio::spawn(async move {
                        let mut buf = [0u8; 4096];
                        let _ = sock.read(&mut buf).await;
                        h.fetch_add(1, Ordering::SeqCst);
                        let (status, body) = match m.load(Ordering::SeqCst) {
                            HANG => {
                                tokio::time::sleep(Duration::from_secs(3600)).await;
                                return;
                            }
                            FAIL => ("500 Internal Server Error", "{}".to_string()),
                            _ => {
                                let keys: Vec<String> = k
                                    .lock()
                                    .map(|k| k.clone())
                                    .unwrap_or_default()
                                    .iter()
                                    .map(|kid| {
                                        format!(
                                            r#"{{"kty":"RSA","kid":"{kid}","alg":"RS256","use":"sig","n":"sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw","e":"AQAB"}}"#
                                        )
                                    })
                                    .collect();
                                ("200 OK", format!(r#"{{"keys":[{}]}}"#, keys.join(",")))
                            }
                        };
                        let reply = format!(
                            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        );
                        let _ = sock.write_all(reply.as_bytes()).await;
                    });
                }
            });
            Self {
                url,
                mode,
                hits,
                kids,
            }
        }

        fn set(&self, mode: u8) {
            self.mode.store(mode, Ordering::SeqCst);
        }

        fn hits(&self) -> usize {
            self.hits.load(Ordering::SeqCst)
        }
    }

    fn cache(p: &Provider, cooldown_ms: u64, max_age_ms: u64) -> JwksCache {
        JwksCache::new(
            p.url.clone(),
            Duration::from_millis(cooldown_ms),
            Duration::from_millis(max_age_ms),
        )
    }

    #[tokio::test]
    async fn a_known_kid_is_served_at_once_from_a_stale_set_while_the_provider_hangs() {
        let p = Provider::start(&["k1"]).await;
        let c = cache(&p, 10, 50);
        assert_eq!(c.refresh().await.expect("warm"), 1);
        tokio::time::sleep(Duration::from_millis(80)).await; // stale now
        p.set(HANG);
        let started = Instant::now();
        for _ in 0..50 {
            assert!(c.key("k1").await.is_some());
        }
        assert!(started.elapsed() < Duration::from_millis(500));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(p.hits(), 2, "one background refresh, not one per lookup");
    }

    #[tokio::test]
    async fn a_failing_provider_is_not_asked_once_per_lookup() {
        let p = Provider::start(&["k1"]).await;
        let c = cache(&p, 10, 20);
        c.refresh().await.expect("warm");
        p.set(FAIL);
        let deadline = Instant::now() + Duration::from_millis(1500);
        while Instant::now() < deadline {
            assert!(c.key("k1").await.is_some(), "the last good set is kept");
            let _ = c.key("forged").await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Warm-up, then failures at ~0 s and ~1 s (back-off 1 s, then 2 s).
        let hits = p.hits();
        assert!((2..=4).contains(&hits), "{hits} requests");
    }

    #[tokio::test]
    async fn a_provider_down_at_start_is_retried_after_the_back_off_not_the_cooldown() {
        let p = Provider::start(&["k1"]).await;
        p.set(FAIL);
        let c = cache(&p, 60_000, 600_000);
        assert!(c.refresh().await.is_err(), "down at start");
        assert!(c.key("k1").await.is_none(), "still down");
        p.set(OK);
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert!(
            c.key("k1").await.is_some(),
            "with no key set, the 60 s cooldown does not hold authentication back"
        );
    }

    #[tokio::test]
    async fn unknown_kids_refetch_once_per_cooldown_and_in_a_single_flight() {
        let p = Provider::start(&["k1"]).await;
        let c = cache(&p, 300, 600_000);
        c.refresh().await.expect("warm");
        // Many concurrent forged kids: one fetch, everyone waits on it.
        let lookups: Vec<_> = (0..20)
            .map(|i| {
                let c = c.clone();
                tokio::spawn(async move { c.key(&format!("forged-{i}")).await.is_some() })
            })
            .collect();
        for l in lookups {
            assert!(!l.await.expect("join"));
        }
        assert_eq!(p.hits(), 2);
        // Within the cooldown an unknown kid is just unknown: no fetch.
        assert!(c.key("forged-again").await.is_none());
        assert_eq!(p.hits(), 2);
        // A rotated key after the cooldown is fetched and found.
        if let Ok(mut k) = p.kids.lock() {
            k.push("k2".into());
        }
        tokio::time::sleep(Duration::from_millis(320)).await;
        assert!(c.key("k2").await.is_some());
        assert_eq!(p.hits(), 3);
    }

    #[tokio::test]
    async fn an_unknown_kid_waits_for_the_fetch_in_flight_at_most_its_timeout() {
        let p = Provider::start(&["k1"]).await;
        let c = cache(&p, 0, 600_000);
        p.set(HANG);
        let started = Instant::now();
        assert!(c.key("k1").await.is_none());
        let waited = started.elapsed();
        assert!(
            waited >= FETCH_TIMEOUT - Duration::from_millis(100),
            "{waited:?}"
        );
        assert!(
            waited < FETCH_TIMEOUT + Duration::from_secs(2),
            "{waited:?}"
        );
        // The failure backs off: the next unknown kid does not wait again.
        let started = Instant::now();
        assert!(c.key("k1").await.is_none());
        assert!(started.elapsed() < Duration::from_millis(100));
    }
}
