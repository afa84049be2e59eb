//! Authentication of handshakes and REST calls (CONTRACT §2).
//!
//! A token is a Clerk session JWT: RS256 against a JWKS ([`jwks`]) or a PEM
//! public key. HS256 is accepted only when `AUTH_DEV_SECRET` is set (local
//! development). Failures are reported to the client as one generic error;
//! the precise reason only goes to the logs and metrics, so a prober learns
//! nothing from it.

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
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("userId does not match the token's subject")]
    UserMismatch,
    #[error("authorized party not allowed")]
    Azp,
    #[error("too many failed attempts from this address")]
    Throttled,
}

impl AuthError {
    /// A short label for the `gateway_auth_failures_total{reason}` metric.
    pub fn label(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed(_) => "malformed",
            AuthError::Algorithm(_) => "algorithm",
            AuthError::UnknownKey => "unknown_kid",
            AuthError::Invalid(_) => "invalid",
            AuthError::UserMismatch => "user_mismatch",
            AuthError::Azp => "azp",
            AuthError::Throttled => "throttled",
        }
    }
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
        let token = token.trim();
        let token = token
            .strip_prefix("Bearer ")
            .or_else(|| token.strip_prefix("bearer "))
            .unwrap_or(token)
            .trim();
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
            .map_err(|e| AuthError::Invalid(e.to_string()))?;
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
            Err(AuthError::Invalid(_))
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
