//! Authentication of handshakes and REST calls (CONTRACT §2).
//!
//! A token is a Clerk session JWT: RS256 against a JWKS ([`jwks`]) or a PEM
//! public key. HS256 is accepted only when `AUTH_DEV_SECRET` is set (local
//! development). Failures are reported to the client as one generic error;
//! the precise reason only goes to the logs and metrics, so a prober learns
//! nothing from it.

pub mod crypto;
pub mod jwks;

use std::collections::HashMap;
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use switchboard_shared::config::Settings;

use jwks::JwksCache;

/// Who a valid token says the caller is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub id: String,
    pub name: String,
    pub image_url: Option<String>,
}

/// Why a token was refused (logs and metrics only).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no token")]
    Missing,
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("algorithm {0:?} is not accepted")]
    Algorithm(Algorithm),
    #[error("unknown signing key")]
    UnknownKey,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("bad signature")]
    BadSignature,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("userId does not match the token's subject")]
    UserMismatch,
    #[error("authorized party not allowed")]
    Azp,
    /// Refused by the cheap checks alone, without verifying a signature,
    /// because this address is over the failure threshold.
    #[error("too many failed attempts from this address ({0})")]
    Throttled(Box<AuthError>),
}

impl AuthError {
    /// A short label for the `gateway_auth_failures_total{reason}` metric.
    pub fn label(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed(_) => "malformed",
            AuthError::Algorithm(_) => "algorithm",
            AuthError::UnknownKey => "unknown_kid",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::BadSignature => "bad_signature",
            AuthError::Invalid(_) => "invalid",
            AuthError::UserMismatch => "user_mismatch",
            AuthError::Azp => "azp",
            AuthError::Throttled(_) => "throttled",
        }
    }

    /// Whether this failure counts towards the brute-force threshold of its
    /// client address: forged or invalid tokens do; a genuine token that is
    /// merely out of its validity window does not. Clerk session tokens live
    /// about 60 s, so a client reconnecting with a stale token is routine,
    /// not an attack, and must not lock out its address (or, behind a proxy,
    /// everyone).
    pub fn counts_as_abuse(&self) -> bool {
        match self {
            AuthError::Expired | AuthError::NotYetValid => false,
            AuthError::Throttled(inner) => inner.counts_as_abuse(),
            _ => true,
        }
    }

    fn from_jwt(e: jsonwebtoken::errors::Error) -> Self {
        use jsonwebtoken::errors::ErrorKind;
        match e.kind() {
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::ImmatureSignature => AuthError::NotYetValid,
            ErrorKind::InvalidSignature => AuthError::BadSignature,
            ErrorKind::InvalidToken
            | ErrorKind::Base64(_)
            | ErrorKind::Json(_)
            | ErrorKind::Utf8(_) => AuthError::Malformed(e.to_string()),
            _ => AuthError::Invalid(e.to_string()),
        }
    }
}

/// The time claims, read without verification for the cheap checks.
#[derive(Debug, Deserialize)]
struct UnverifiedTimes {
    #[serde(default)]
    exp: Option<f64>,
}

fn strip_bearer(token: &str) -> &str {
    let token = token.trim();
    token
        .strip_prefix("Bearer ")
        .or_else(|| token.strip_prefix("bearer "))
        .unwrap_or(token)
        .trim()
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    azp: Option<String>,
    #[serde(flatten)]
    rest: HashMap<String, serde_json::Value>,
}

pub struct Verifier {
    jwks: Option<JwksCache>,
    pem: Option<DecodingKey>,
    dev: Option<DecodingKey>,
    issuer: Option<String>,
    parties: Vec<String>,
    leeway: u64,
    name_claim: String,
    image_claim: String,
}

impl Verifier {
    pub fn from_settings(s: &Settings) -> anyhow::Result<Self> {
        if !crypto::install() {
            tracing::warn!(
                "a JWT was handled before the RSA backend was chosen: RSA stays on RustCrypto"
            );
        }
        let pem_text = match (&s.auth_public_key, &s.auth_public_key_file) {
            (Some(k), _) => Some(k.replace("\\n", "\n")),
            (None, Some(path)) => Some(std::fs::read_to_string(path).map_err(|e| {
                anyhow::anyhow!("cannot read AUTH_PUBLIC_KEY_FILE {}: {e}", path.display())
            })?),
            (None, None) => None,
        };
        let pem = pem_text
            .map(|p| DecodingKey::from_rsa_pem(p.as_bytes()))
            .transpose()
            .map_err(|e| anyhow::anyhow!("AUTH_PUBLIC_KEY is not an RSA public key in PEM: {e}"))?;
        let jwks = s.auth_jwks_url.clone().map(|url| {
            JwksCache::new(
                url,
                Duration::from_millis(s.auth_jwks_cooldown_ms),
                Duration::from_millis(s.auth_jwks_cache_ms),
            )
        });
        let dev = s.auth_dev_secret.as_ref().map(|secret| {
            tracing::warn!(
                "AUTH_DEV_SECRET is set: HS256 development tokens are accepted. Never do this in production."
            );
            DecodingKey::from_secret(secret.as_bytes())
        });
        if jwks.is_none() && pem.is_none() && dev.is_none() {
            tracing::warn!(
                "no AUTH_JWKS_URL, AUTH_PUBLIC_KEY or AUTH_DEV_SECRET: every connection will be refused"
            );
        }
        Ok(Self {
            jwks,
            pem,
            dev,
            issuer: s.auth_issuer.clone(),
            parties: s.authorized_parties(),
            leeway: s.auth_leeway_s,
            name_claim: s.auth_name_claim.clone(),
            image_claim: s.auth_image_claim.clone(),
        })
    }

    /// Fetches the JWKS once at start (a failure is logged, not fatal: the
    /// first token will try again).
    pub async fn warm_up(&self) {
        if let Some(j) = &self.jwks {
            if let Err(e) = j.refresh().await {
                tracing::warn!(error = %e, "initial JWKS fetch failed");
            }
        }
    }

    /// Verifies `token` (with or without the `Bearer ` prefix) and, when
    /// given, that `user_id` is its subject.
    pub async fn verify(&self, token: &str, user_id: Option<&str>) -> Result<Identity, AuthError> {
        self.verify_guarded(token, user_id, false).await
    }

    /// [`Verifier::verify`] for a client over the failure threshold
    /// (`suspect`): a token failing the cheap checks ([`Verifier::precheck`])
    /// is refused as [`AuthError::Throttled`] without a signature check or a
    /// JWKS refetch, so a flood costs next to nothing; a plausible token is
    /// verified as usual, so a valid one is never refused.
    pub async fn verify_guarded(
        &self,
        token: &str,
        user_id: Option<&str>,
        suspect: bool,
    ) -> Result<Identity, AuthError> {
        let token = strip_bearer(token);
        if suspect {
            self.precheck(token)
                .map_err(|e| AuthError::Throttled(Box::new(e)))?;
        }
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| AuthError::Malformed(e.to_string()))?;
        let key = match header.alg {
            Algorithm::HS256 => self.dev.clone().ok_or(AuthError::Algorithm(header.alg))?,
            Algorithm::RS256 => self.rsa_key(header.kid.as_deref()).await?,
            other => return Err(AuthError::Algorithm(other)),
        };
        let mut validation = Validation::new(header.alg);
        validation.leeway = self.leeway;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp", "sub"]);
        if let Some(iss) = &self.issuer {
            validation.set_issuer(&[iss]);
        }
        let data = jsonwebtoken::decode::<Claims>(token, &key, &validation)
            .map_err(AuthError::from_jwt)?;
        let claims = data.claims;
        if !self.parties.is_empty() {
            match &claims.azp {
                Some(azp) if self.parties.iter().any(|p| p == azp) => {}
                _ => return Err(AuthError::Azp),
            }
        }
        if let Some(uid) = user_id {
            if uid != claims.sub {
                return Err(AuthError::UserMismatch);
            }
        }
        let text = |k: &str| {
            claims
                .rest
                .get(k)
                .and_then(|v| v.as_str())
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
        };
        Ok(Identity {
            name: text(&self.name_claim).unwrap_or_else(|| claims.sub.clone()),
            image_url: text(&self.image_claim),
            id: claims.sub,
        })
    }

    /// Whether `token` passes [`Verifier::precheck`]: for such a token
    /// `verify_guarded` does the same whatever `suspect` is, so the caller
    /// need not look the failure counter up.
    pub fn is_plausible(&self, token: &str) -> bool {
        self.precheck(strip_bearer(token)).is_ok()
    }

    /// What can be checked without a signature verification or a network
    /// call: the header decodes, its algorithm is accepted, its key is one
    /// we hold (no refetch), and the unverified `exp` has not passed.
    fn precheck(&self, token: &str) -> Result<(), AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| AuthError::Malformed(e.to_string()))?;
        match header.alg {
            Algorithm::HS256 if self.dev.is_some() => {}
            Algorithm::RS256 if self.pem.is_some() => {}
            Algorithm::RS256 if self.jwks.is_some() => {
                let known = match (&self.jwks, header.kid.as_deref()) {
                    (Some(jwks), Some(kid)) => jwks.cached(kid).is_some(),
                    _ => false,
                };
                if !known {
                    return Err(AuthError::UnknownKey);
                }
            }
            other => return Err(AuthError::Algorithm(other)),
        }
        let times = jsonwebtoken::dangerous::insecure_decode::<UnverifiedTimes>(token)
            .map_err(|e| AuthError::Malformed(e.to_string()))?
            .claims;
        if let Some(exp) = times.exp {
            let now = chrono::Utc::now().timestamp() as f64;
            if exp + (self.leeway as f64) < now {
                return Err(AuthError::Expired);
            }
        }
        Ok(())
    }

    async fn rsa_key(&self, kid: Option<&str>) -> Result<DecodingKey, AuthError> {
        if let (Some(jwks), Some(kid)) = (&self.jwks, kid) {
            if let Some(k) = jwks.key(kid).await {
                return Ok(k);
            }
            if self.pem.is_none() {
                return Err(AuthError::UnknownKey);
            }
        }
        self.pem.clone().ok_or(if self.jwks.is_some() {
            AuthError::UnknownKey
        } else {
            AuthError::Algorithm(Algorithm::RS256)
        })
    }
}

#[derive(Serialize)]
struct DevClaims<'a> {
    sub: &'a str,
    name: &'a str,
    iat: i64,
    nbf: i64,
    exp: i64,
}

/// Mints an HS256 development token (the `dev-token` command and the
/// embedded mode's start-up hint).
pub fn dev_token(
    secret: &str,
    user: &str,
    name: Option<&str>,
    ttl: Duration,
) -> anyhow::Result<String> {
    let now = chrono::Utc::now().timestamp();
    let claims = DevClaims {
        sub: user,
        name: name.unwrap_or(user),
        iat: now,
        nbf: now - 1,
        exp: now + ttl.as_secs() as i64,
    };
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(vars: &[(&str, &str)]) -> Settings {
        Settings::from_vars(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .expect("settings")
    }

    #[tokio::test]
    async fn dev_tokens_round_trip_and_check_the_user() {
        let v = Verifier::from_settings(&settings(&[("AUTH_DEV_SECRET", "s3cret")])).expect("v");
        let t = dev_token("s3cret", "alice", Some("Alice"), Duration::from_secs(60)).expect("t");
        let id = v
            .verify(&format!("Bearer {t}"), Some("alice"))
            .await
            .expect("valid");
        assert_eq!(id.name, "Alice");
        assert!(matches!(
            v.verify(&t, Some("bob")).await,
            Err(AuthError::UserMismatch)
        ));
        let forged = dev_token("other", "alice", None, Duration::from_secs(60)).expect("t");
        assert!(matches!(
            v.verify(&forged, None).await,
            Err(AuthError::BadSignature)
        ));
    }

    /// A dev token with explicit times.
    fn timed_token(secret: &str, exp: i64, nbf: i64) -> String {
        let now = chrono::Utc::now().timestamp();
        let claims = DevClaims {
            sub: "alice",
            name: "Alice",
            iat: now,
            nbf: now + nbf,
            exp: now + exp,
        };
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .expect("encode")
    }

    #[tokio::test]
    async fn stale_tokens_are_not_abuse_forged_ones_are() {
        let v = Verifier::from_settings(&settings(&[("AUTH_DEV_SECRET", "s3cret")])).expect("v");
        let expired = v
            .verify(&timed_token("s3cret", -60, -120), Some("alice"))
            .await;
        assert!(matches!(expired, Err(AuthError::Expired)), "{expired:?}");
        assert!(!expired.unwrap_err().counts_as_abuse());
        let early = v
            .verify(&timed_token("s3cret", 120, 60), Some("alice"))
            .await;
        assert!(matches!(early, Err(AuthError::NotYetValid)), "{early:?}");
        assert!(!early.unwrap_err().counts_as_abuse());
        // An expired forgery is a forgery: the signature is checked first.
        let forged = v.verify(&timed_token("other", -60, -120), None).await;
        assert!(matches!(forged, Err(AuthError::BadSignature)), "{forged:?}");
        for e in [
            AuthError::Missing,
            AuthError::Malformed("x".into()),
            AuthError::Algorithm(Algorithm::HS512),
            AuthError::UnknownKey,
            AuthError::BadSignature,
            AuthError::UserMismatch,
            AuthError::Azp,
        ] {
            assert!(e.counts_as_abuse(), "{e}");
        }
    }

    #[tokio::test]
    async fn over_the_threshold_cheap_failures_fail_fast_and_valid_tokens_pass() {
        let v = Verifier::from_settings(&settings(&[("AUTH_DEV_SECRET", "s3cret")])).expect("v");
        let valid = dev_token("s3cret", "alice", None, Duration::from_secs(60)).expect("t");
        assert!(v.verify_guarded(&valid, Some("alice"), true).await.is_ok());
        let cheap = |r: Result<Identity, AuthError>| match r {
            Err(AuthError::Throttled(inner)) => Some(*inner),
            _ => None,
        };
        assert!(matches!(
            cheap(v.verify_guarded("abc", Some("alice"), true).await),
            Some(AuthError::Malformed(_))
        ));
        let expired = cheap(
            v.verify_guarded(&timed_token("s3cret", -60, -120), Some("alice"), true)
                .await,
        );
        assert!(matches!(expired, Some(AuthError::Expired)), "{expired:?}");
        let rs = "eyJhbGciOiJSUzI1NiIsImtpZCI6Im5vcGUifQ.e30.c2ln";
        assert!(matches!(
            cheap(v.verify_guarded(rs, None, true).await),
            Some(AuthError::Algorithm(Algorithm::RS256))
        ));
        // A plausible forgery is verified (and counted), not fast-failed.
        let forged = dev_token("other", "alice", None, Duration::from_secs(60)).expect("t");
        assert!(matches!(
            v.verify_guarded(&forged, Some("alice"), true).await,
            Err(AuthError::BadSignature)
        ));
    }

    #[tokio::test]
    async fn hs256_is_refused_without_a_dev_secret() {
        let v = Verifier::from_settings(&settings(&[])).expect("v");
        let t = dev_token("x", "alice", None, Duration::from_secs(60)).expect("t");
        assert!(matches!(
            v.verify(&t, None).await,
            Err(AuthError::Algorithm(_))
        ));
    }
}

/// Property tests of the token-shape checks: whatever a client sends as a
/// token it never panics and is never accepted unless it is a token we
/// signed; the `Bearer ` prefix is optional; a dev token round-trips its
/// subject and name, and any change to it is refused or changes nothing.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    const SECRET: &str = "prop-secret";

    fn verifier() -> Verifier {
        let s = Settings::from_vars([("AUTH_DEV_SECRET".to_string(), SECRET.to_string())])
            .expect("settings");
        Verifier::from_settings(&s).expect("verifier")
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    /// Token-shaped junk: three base64url-ish segments, or anything.
    fn token_like() -> impl Strategy<Value = String> {
        prop_oneof![
            ".{0,200}",
            "[A-Za-z0-9_=-]{0,40}\\.[A-Za-z0-9_=-]{0,80}\\.[A-Za-z0-9_=-]{0,60}",
            "(Bearer |bearer |BEARER )?[A-Za-z0-9_.-]{0,120}",
            // A real header over an arbitrary payload and signature.
            ("[A-Za-z0-9_-]{0,120}", "[A-Za-z0-9_-]{0,60}")
                .prop_map(|(p, s)| format!("eyJhbGciOiJIUzI1NiJ9.{p}.{s}")),
            prop::collection::vec(any::<u8>(), 0..200)
                .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        ]
    }

    proptest! {
        #![proptest_config(crate::testing::prop_config(256))]

        #[test]
        fn junk_tokens_never_panic_and_never_pass(
            token in token_like(),
            user in proptest::option::of(".{0,20}"),
            suspect in any::<bool>(),
        ) {
            let v = verifier();
            let r = block_on(v.verify_guarded(&token, user.as_deref(), suspect));
            prop_assert!(r.is_err(), "{:?} accepted: {:?}", token, r);
            let _ = v.precheck(strip_bearer(&token));
        }

        #[test]
        fn bearer_prefix_is_optional(t in "[A-Za-z0-9_.-]{1,60}") {
            prop_assert_eq!(strip_bearer(&t), t.as_str());
            let (upper, lower) = (format!("Bearer {t}"), format!("  bearer {t} "));
            prop_assert_eq!(strip_bearer(&upper), t.as_str());
            prop_assert_eq!(strip_bearer(&lower), t.as_str());
        }

        /// Any subject and name survive the round trip; the wrong `userId`
        /// is refused.
        #[test]
        fn dev_tokens_round_trip(
            sub in ".{1,64}",
            name in ".{0,64}",
            other in ".{0,64}",
            bearer in any::<bool>(),
        ) {
            let v = verifier();
            let t = dev_token(SECRET, &sub, Some(&name), Duration::from_secs(60))
                .expect("token");
            let t = if bearer { format!("Bearer {t}") } else { t };
            let id = block_on(v.verify(&t, Some(&sub))).expect("valid");
            prop_assert_eq!(&id.id, &sub);
            let expected_name = if name.trim().is_empty() { sub.clone() } else { name.trim().to_string() };
            prop_assert_eq!(id.name, expected_name);
            prop_assert_eq!(id.image_url, None);
            if other != sub {
                let r = block_on(v.verify(&t, Some(&other)));
                prop_assert!(matches!(r, Err(AuthError::UserMismatch)), "{:?}", r);
            }
        }

        /// One character of a valid token changed: refused, or (base64's
        /// unused low bits of a segment's last character) the same identity.
        #[test]
        fn tampered_tokens_are_refused(
            sub in "[a-z0-9]{1,16}",
            at in any::<prop::sample::Index>(),
            with in prop::sample::select(
                "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=".chars().collect::<Vec<_>>()
            ),
        ) {
            let v = verifier();
            let t = dev_token(SECRET, &sub, None, Duration::from_secs(60)).expect("token");
            let mut chars: Vec<char> = t.chars().collect();
            let i = at.index(chars.len());
            prop_assume!(chars[i] != with);
            chars[i] = with;
            let tampered: String = chars.into_iter().collect();
            match block_on(v.verify(&tampered, None)) {
                Err(_) => {}
                Ok(id) => prop_assert_eq!(id.id, sub),
            }
        }
    }
}
