//! The signature backend of `jsonwebtoken`: RSA through `ring`, the rest
//! through RustCrypto.
//!
//! Every handshake verifies one RS256 signature (Clerk's tokens). The
//! RustCrypto backend does it with `num-bigint-dig`, which showed as 13 % of
//! a gateway's CPU samples under everyday load (issue 9); `ring` (already in
//! the build, through rustls) verifies in assembly. Signing (only the
//! development tokens, HS256) and every other algorithm stay with RustCrypto.
//! `jsonwebtoken` 10 lets a process pick its provider once, which
//! [`install`] does before the first token is checked.

use jsonwebtoken::crypto::{rust_crypto, CryptoProvider, JwkUtils, JwtVerifier};
use jsonwebtoken::errors::{Error, ErrorKind};
use jsonwebtoken::signature::{self, Verifier};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, DecodingKeyKind};
use ring::signature as ring_sig;

static PROVIDER: CryptoProvider = CryptoProvider {
    signer_factory: rust_crypto::DEFAULT_PROVIDER.signer_factory,
    verifier_factory,
    jwk_utils: JwkUtils {
        extract_rsa_public_key_components: rust_crypto::DEFAULT_PROVIDER
            .jwk_utils
            .extract_rsa_public_key_components,
        extract_ec_public_key_coordinates: rust_crypto::DEFAULT_PROVIDER
            .jwk_utils
            .extract_ec_public_key_coordinates,
        compute_digest: rust_crypto::DEFAULT_PROVIDER.jwk_utils.compute_digest,
    },
};

/// Makes [`PROVIDER`] the process' provider, unless a token was handled
/// before (`jsonwebtoken` then fixed its default for good). Idempotent.
/// Returns whether RSA goes through `ring` in this process.
pub fn install() -> bool {
    match PROVIDER.install_default() {
        Ok(()) => true,
        Err(installed) => std::ptr::eq(installed, &PROVIDER),
    }
}

fn verifier_factory(
    algorithm: &Algorithm,
    key: &DecodingKey,
) -> jsonwebtoken::errors::Result<Box<dyn JwtVerifier>> {
    let params: &'static ring_sig::RsaParameters = match algorithm {
        Algorithm::RS256 => &ring_sig::RSA_PKCS1_2048_8192_SHA256,
        Algorithm::RS384 => &ring_sig::RSA_PKCS1_2048_8192_SHA384,
        Algorithm::RS512 => &ring_sig::RSA_PKCS1_2048_8192_SHA512,
        Algorithm::PS256 => &ring_sig::RSA_PSS_2048_8192_SHA256,
        Algorithm::PS384 => &ring_sig::RSA_PSS_2048_8192_SHA384,
        Algorithm::PS512 => &ring_sig::RSA_PSS_2048_8192_SHA512,
        _ => return (rust_crypto::DEFAULT_PROVIDER.verifier_factory)(algorithm, key),
    };
    if key.family() != AlgorithmFamily::Rsa {
        return Err(Error::from(ErrorKind::InvalidKeyFormat));
    }
    Ok(Box::new(RingRsa {
        algorithm: *algorithm,
        params,
        key: key.clone(),
    }))
}

struct RingRsa {
    algorithm: Algorithm,
    params: &'static ring_sig::RsaParameters,
    key: DecodingKey,
}

impl Verifier<Vec<u8>> for RingRsa {
    fn verify(&self, msg: &[u8], sig: &Vec<u8>) -> Result<(), signature::Error> {
        let checked = match self.key.kind() {
            // A PEM or DER key: ring reads the PKCS#1 `RSAPublicKey` DER.
            DecodingKeyKind::SecretOrDer(der) => {
                ring_sig::UnparsedPublicKey::new(self.params, der).verify(msg, sig)
            }
            // A JWK's modulus and exponent.
            DecodingKeyKind::RsaModulusExponent { n, e } => {
                ring_sig::RsaPublicKeyComponents { n, e }.verify(self.params, msg, sig)
            }
        };
        checked.map_err(|_| signature::Error::new())
    }
}

impl JwtVerifier for RingRsa {
    fn algorithm(&self) -> Algorithm {
        self.algorithm
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use jsonwebtoken::{encode, EncodingKey, Header};

    const PRIVATE: &str = include_str!("../../tests/fixtures/test-rsa-private.pem");
    const PUBLIC: &str = include_str!("../../tests/fixtures/test-rsa-public.pem");
    /// The key's modulus as a JWK carries it (base64url); its exponent is 65537.
    const MODULUS: &str = include_str!("../../tests/fixtures/test-rsa-modulus.b64url");

    /// `(signed part, signature)` of a compact JWS.
    fn split(token: &str) -> (String, Vec<u8>) {
        let (signed, sig) = token.rsplit_once('.').expect("a JWS");
        let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(sig)
            .expect("base64url");
        (signed.to_string(), sig)
    }

    /// Our provider's verifiers (not the process default, which other tests
    /// of this binary may have fixed first) accept what RustCrypto signed,
    /// with the key from a PEM file and from a JWK, and refuse a signature
    /// moved onto other claims.
    #[test]
    fn ring_verifies_rsa_signatures_from_pem_and_jwk_keys_and_refuses_moved_ones() {
        let signer = EncodingKey::from_rsa_pem(PRIVATE.as_bytes()).expect("private key");
        let pem = DecodingKey::from_rsa_pem(PUBLIC.as_bytes()).expect("public key");
        let jwk = DecodingKey::from_rsa_components(MODULUS.trim(), "AQAB").expect("components");
        for alg in [Algorithm::RS256, Algorithm::RS512, Algorithm::PS256] {
            let a =
                encode(&Header::new(alg), &serde_json::json!({"sub": "a"}), &signer).expect("sign");
            let b =
                encode(&Header::new(alg), &serde_json::json!({"sub": "b"}), &signer).expect("sign");
            let (signed_a, sig_a) = split(&a);
            let (signed_b, _) = split(&b);
            for key in [&pem, &jwk] {
                let verifier = (PROVIDER.verifier_factory)(&alg, key).expect("a verifier");
                assert_eq!(verifier.algorithm(), alg);
                verifier
                    .verify(signed_a.as_bytes(), &sig_a)
                    .expect("a valid signature");
                assert!(
                    verifier.verify(signed_b.as_bytes(), &sig_a).is_err(),
                    "{alg:?}: a signature of other claims"
                );
            }
        }
    }
}
