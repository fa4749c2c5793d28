//! DPoP (RFC 9449): the gateway's proof-of-possession key, and the proofs
//! that make the authorization server bind tokens to it and show the API
//! that the token comes from the gateway. Every replica is configured with
//! the same key, so a token one replica polled can be forwarded by another.

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::DecodePrivateKey;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// The gateway's DPoP key (EC P-256, ES256), and the last nonce the
/// authorization server asked proofs to carry.
pub struct DpopKey {
    signing: SigningKey,
    /// The public key as a JWK, in every proof's header.
    jwk: Value,
    /// RFC 7638 thumbprint: the `cnf.jkt` of tokens bound to this key.
    thumbprint: String,
    nonce: Mutex<Option<String>>,
}

impl std::fmt::Debug for DpopKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DpopKey")
            .field("thumbprint", &self.thumbprint)
            .finish_non_exhaustive()
    }
}

impl DpopKey {
    /// A key from PEM: PKCS#8 (`BEGIN PRIVATE KEY`) or SEC1 (`BEGIN EC
    /// PRIVATE KEY`), on curve P-256.
    pub fn from_pem(pem: &str) -> Result<Self, String> {
        let secret = p256::SecretKey::from_pkcs8_pem(pem)
            .or_else(|_| p256::SecretKey::from_sec1_pem(pem))
            .map_err(|_| {
                "not an EC P-256 private key in PEM (PKCS#8 or SEC1); make one with `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256`".to_owned()
            })?;
        Ok(Self::from_secret(secret))
    }

    /// A fresh key (tests).
    pub fn generate() -> Self {
        Self::from_secret(fresh_secret())
    }

    /// A fresh key in PKCS#8 PEM, as `dpop_key` takes it (development mode).
    pub fn generate_pem() -> String {
        use p256::pkcs8::{EncodePrivateKey, LineEnding};
        fresh_secret()
            .to_pkcs8_pem(LineEnding::LF)
            .map(|pem| pem.to_string())
            .expect("a P-256 key encodes")
    }

    fn from_secret(secret: p256::SecretKey) -> Self {
        let point = p256::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(
            &secret.public_key(),
            false,
        );
        let coordinate =
            |c: Option<&p256::FieldBytes>| URL_SAFE_NO_PAD.encode(c.expect("uncompressed point"));
        let (x, y) = (coordinate(point.x()), coordinate(point.y()));
        let jwk = json!({ "kty": "EC", "crv": "P-256", "x": x, "y": y });
        Self {
            signing: SigningKey::from(secret),
            thumbprint: thumbprint_of(&jwk).expect("an EC JWK has a thumbprint"),
            jwk,
            nonce: Mutex::new(None),
        }
    }

    /// The `cnf.jkt` of the tokens bound to this key.
    pub fn thumbprint(&self) -> &str {
        &self.thumbprint
    }

    /// Keeps the nonce a server sent in `DPoP-Nonce` for the next proofs.
    pub fn remember_nonce(&self, nonce: &str) {
        if let Ok(mut kept) = self.nonce.lock() {
            *kept = Some(nonce.to_owned());
        }
    }

    /// A proof for one request: `method` to `url` (its query and fragment
    /// are left out of `htu`), for `access_token` when one is presented
    /// (`ath`), with the authorization server's nonce when `with_nonce`.
    pub fn proof(
        &self,
        method: &str,
        url: &str,
        access_token: Option<&str>,
        with_nonce: bool,
    ) -> String {
        let htu = url.split(['?', '#']).next().unwrap_or(url);
        let iat = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let mut claims = json!({
            "jti": uuid::Uuid::new_v4().to_string(),
            "htm": method,
            "htu": htu,
            "iat": iat,
        });
        if let Some(token) = access_token {
            claims["ath"] = json!(URL_SAFE_NO_PAD.encode(Sha256::digest(token.as_bytes())));
        }
        if with_nonce {
            if let Some(nonce) = self.nonce.lock().ok().and_then(|n| n.clone()) {
                claims["nonce"] = json!(nonce);
            }
        }
        let header = json!({ "typ": "dpop+jwt", "alg": "ES256", "jwk": self.jwk });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature: Signature = self.signing.sign(signing_input.as_bytes());
        format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature.to_bytes())
        )
    }
}

fn fresh_secret() -> p256::SecretKey {
    loop {
        let bytes: [u8; 32] = rand::random();
        if let Ok(secret) = p256::SecretKey::from_slice(&bytes) {
            return secret;
        }
    }
}

/// The RFC 7638 thumbprint (SHA-256, base64url) of a public EC or OKP JWK:
/// its required members, in lexicographic order, without spaces.
pub fn thumbprint_of(jwk: &Value) -> Option<String> {
    // Each member as a JSON string (escaped as serde_json does).
    let member = |name: &str| {
        jwk.get(name)
            .and_then(Value::as_str)
            .map(|v| Value::String(v.to_owned()).to_string())
    };
    let canonical = match jwk.get("kty").and_then(Value::as_str)? {
        "EC" => format!(
            r#"{{"crv":{},"kty":"EC","x":{},"y":{}}}"#,
            member("crv")?,
            member("x")?,
            member("y")?
        ),
        "OKP" => format!(
            r#"{{"crv":{},"kty":"OKP","x":{}}}"#,
            member("crv")?,
            member("x")?
        ),
        _ => return None,
    };
    Some(URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes())))
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::jwk::Jwk;
    use jsonwebtoken::{Algorithm, DecodingKey, Validation};

    use super::*;

    #[test]
    fn a_proof_verifies_with_the_key_in_its_header_and_names_the_request() {
        let key = DpopKey::generate();
        key.remember_nonce("n-1");
        let proof = key.proof(
            "POST",
            "https://api.example/shop?x=1#f",
            Some("token"),
            true,
        );
        let header = jsonwebtoken::decode_header(&proof).unwrap();
        assert_eq!(header.typ.as_deref(), Some("dpop+jwt"));
        let jwk: Jwk = serde_json::from_value(key.jwk.clone()).unwrap();
        let mut validation = Validation::new(Algorithm::ES256);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        let claims = jsonwebtoken::decode::<Value>(
            &proof,
            &DecodingKey::from_jwk(&jwk).unwrap(),
            &validation,
        )
        .unwrap()
        .claims;
        assert_eq!(claims["htm"], "POST");
        assert_eq!(claims["htu"], "https://api.example/shop");
        assert_eq!(claims["nonce"], "n-1");
        assert_eq!(
            claims["ath"],
            URL_SAFE_NO_PAD.encode(Sha256::digest(b"token"))
        );
        assert_ne!(key.proof("GET", "https://a", None, false), proof);
    }

    #[test]
    fn the_thumbprint_is_rfc_7638s() {
        // A key made with `openssl genpkey -algorithm EC -pkeyopt
        // ec_paramgen_curve:P-256`; its thumbprint computed by jose (Node):
        // `calculateJwkThumbprint(exportJWK(key), 'sha256')`.
        let pem = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgNiwY0W6W28FXjFXA\nCEotB9ixQKezSDaZmUsMIZGXT7ChRANCAAQSEq8b6pD8D8CQnKQwAKeI462LlI2X\nDtdzFQwHPGBHqKa/cHwagI7/d1Ct/9+ciNI5ynnJ4pUq141kWFX+i7gq\n-----END PRIVATE KEY-----\n";
        let key = DpopKey::from_pem(pem).unwrap();
        assert_eq!(
            key.thumbprint(),
            "5pn8oNX5hgrRJfX05PzlAkbmfuoPqdUwdc723Yoj__I"
        );
        assert!(DpopKey::from_pem("not a key").is_err());
        let generated = DpopKey::generate_pem();
        assert!(DpopKey::from_pem(&generated).is_ok(), "{generated}");
    }
}
