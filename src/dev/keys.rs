//! The development authorization server's signing key: RSA, made at start and
//! never written anywhere, so every `countersign dev` run has its own issuer
//! key and no token outlives the process that signed it.

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::traits::PublicKeyParts;
use rsa::RsaPrivateKey;
use serde::Serialize;
use serde_json::{json, Value};

/// 2048 bits: what Auth0 and most providers use for RS256.
const KEY_BITS: usize = 2048;

/// An RS256 signing key and its public JWK.
pub struct SigningKey {
    encoding: EncodingKey,
    kid: String,
    jwk: Value,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Generates a fresh key from the operating system's randomness.
    pub fn generate() -> Result<Self, String> {
        let private = RsaPrivateKey::new(&mut rsa::rand_core::OsRng, KEY_BITS)
            .map_err(|e| format!("cannot generate an RSA key: {e}"))?;
        let der = private
            .to_pkcs1_der()
            .map_err(|e| format!("cannot encode the RSA key: {e}"))?;
        let b64 = |bytes: Vec<u8>| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let n = b64(private.n().to_bytes_be());
        let e = b64(private.e().to_bytes_be());
        let kid = format!("dev-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let jwk = json!({
            "kty": "RSA",
            "use": "sig",
            "alg": "RS256",
            "kid": kid,
            "n": n,
            "e": e,
        });
        Ok(Self {
            encoding: EncodingKey::from_rsa_der(der.as_bytes()),
            kid,
            jwk,
        })
    }

    /// The public key set served at `jwks_uri`.
    pub fn jwks(&self) -> Value {
        json!({ "keys": [self.jwk] })
    }

    /// Signs `claims` as an RS256 JWT of type `typ` (e.g. `at+jwt`, RFC 9068).
    pub fn sign(&self, typ: &str, claims: &impl Serialize) -> Result<String, String> {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(self.kid.clone());
        header.typ = Some(typ.to_owned());
        jsonwebtoken::encode(&header, claims, &self.encoding)
            .map_err(|e| format!("cannot sign a token: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::jwk::JwkSet;
    use jsonwebtoken::{DecodingKey, Validation};

    #[test]
    fn tokens_verify_against_the_published_jwks() {
        let key = SigningKey::generate().unwrap();
        let token = key
            .sign(
                "at+jwt",
                &json!({"sub": "alice", "aud": "api", "exp": 4_000_000_000u64}),
            )
            .unwrap();
        let set: JwkSet = serde_json::from_value(key.jwks()).unwrap();
        let jwk = set.find(&key.kid).unwrap();
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_audience(&["api"]);
        let data = jsonwebtoken::decode::<Value>(
            &token,
            &DecodingKey::from_jwk(jwk).unwrap(),
            &validation,
        )
        .unwrap();
        assert_eq!(data.claims["sub"], "alice");
        assert!(!format!("{key:?}").contains("encoding"));
    }
}
