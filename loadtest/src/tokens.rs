//! Tokens for load and tests: HS256 with the server's `AUTH_DEV_SECRET`, or
//! RS256 with a PEM private key whose public half the server trusts.

use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    name: &'a str,
    iat: i64,
    nbf: i64,
    exp: i64,
}

/// Mints tokens for any user id.
#[derive(Clone)]
pub struct Minter {
    key: EncodingKey,
    alg: Algorithm,
    kid: Option<String>,
}

impl Minter {
    pub fn hs256(secret: &str) -> Self {
        Self {
            key: EncodingKey::from_secret(secret.as_bytes()),
            alg: Algorithm::HS256,
            kid: None,
        }
    }

    pub fn rs256_pem(pem: &[u8], kid: Option<String>) -> anyhow::Result<Self> {
        Ok(Self {
            key: EncodingKey::from_rsa_pem(pem)?,
            alg: Algorithm::RS256,
            kid,
        })
    }

    /// A `Bearer`-less token for `user`, valid for `ttl`.
    pub fn token(&self, user: &str, ttl: Duration) -> anyhow::Result<String> {
        let now = chrono::Utc::now().timestamp();
        let mut header = Header::new(self.alg);
        header.kid = self.kid.clone();
        Ok(jsonwebtoken::encode(
            &header,
            &Claims {
                sub: user,
                name: user,
                iat: now,
                nbf: now - 1,
                exp: now + ttl.as_secs() as i64,
            },
            &self.key,
        )?)
    }

    /// The handshake `auth` object of the seed.
    pub fn auth(&self, user: &str) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::json!({
            "token": format!("Bearer {}", self.token(user, Duration::from_secs(3600))?),
            "userId": user,
        }))
    }
}
