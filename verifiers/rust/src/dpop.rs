//! DPoP (RFC 9449) proofs: the token is bound to the gateway's key, and each
//! forwarded call carries a fresh proof, signed by that key, for exactly
//! that method and URL. A stolen token is then useless without the key.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::refusal::{Refusal, DPOP_INVALID_PROOF};

pub(crate) fn invalid(field: &'static str, detail: impl Into<String>) -> Refusal {
    Refusal::unauthorized(
        "dpop_proof_invalid",
        Some(field),
        detail,
        DPOP_INVALID_PROOF,
    )
}

pub(crate) fn missing(detail: impl Into<String>) -> Refusal {
    Refusal::unauthorized("dpop_proof_missing", None, detail, DPOP_INVALID_PROOF)
}

pub(crate) fn b64_sha256(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(bytes))
}

/// A proof whose signature verified with the public key in its header.
pub(crate) struct Proof {
    pub(crate) claims: Value,
    /// RFC 7638 thumbprint of the header's `jwk`.
    pub(crate) thumbprint: String,
}

/// The members of each key type that make its RFC 7638 thumbprint, in order.
fn thumbprint_members(kty: &str) -> Option<&'static [&'static str]> {
    match kty {
        "EC" => Some(&["crv", "kty", "x", "y"]),
        "RSA" => Some(&["e", "kty", "n"]),
        "OKP" => Some(&["crv", "kty", "x"]),
        _ => None,
    }
}

/// RFC 7638 thumbprint, from the JWK as sent (computed here rather than by
/// `jsonwebtoken`, whose version panics on some malformed keys).
pub(crate) fn thumbprint(jwk: &Map<String, Value>) -> Option<String> {
    let members = thumbprint_members(jwk.get("kty")?.as_str()?)?;
    let mut canonical = Map::new();
    for member in members {
        canonical.insert(
            (*member).to_owned(),
            Value::String(jwk.get(*member)?.as_str()?.to_owned()),
        );
    }
    // serde_json's map is ordered by key and prints without whitespace:
    // exactly RFC 7638's form for these members.
    let json = serde_json::to_string(&Value::Object(canonical)).ok()?;
    Some(b64_sha256(json.as_bytes()))
}

/// Private members of JWKs (RFC 7518 §6): a proof's key must be public.
const PRIVATE_MEMBERS: [&str; 8] = ["d", "p", "q", "dp", "dq", "qi", "oth", "k"];

/// Checks the proof's form and signature: `typ` `dpop+jwt`, an asymmetric
/// `alg` matching a public `jwk` in the header, and a signature by that key.
pub(crate) fn verify_signature(proof: &str) -> Result<Proof, Refusal> {
    let bad = |detail: &str| invalid("proof", detail.to_owned());
    let mut segments = proof.split('.');
    let (Some(header), Some(_), Some(_), None) = (
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
    ) else {
        return Err(bad("the DPoP proof is not a signed JWT"));
    };
    let header: Map<String, Value> = URL_SAFE_NO_PAD
        .decode(header)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .ok_or_else(|| bad("the DPoP proof's header is not base64url JSON"))?;
    if !header
        .get("typ")
        .and_then(Value::as_str)
        .is_some_and(|typ| typ.eq_ignore_ascii_case("dpop+jwt"))
    {
        return Err(bad("the DPoP proof's typ is not dpop+jwt"));
    }
    let alg = match header.get("alg").and_then(Value::as_str) {
        Some("ES256") => Algorithm::ES256,
        Some("ES384") => Algorithm::ES384,
        Some("EdDSA") => Algorithm::EdDSA,
        Some("RS256") => Algorithm::RS256,
        Some("RS384") => Algorithm::RS384,
        Some("RS512") => Algorithm::RS512,
        Some("PS256") => Algorithm::PS256,
        Some("PS384") => Algorithm::PS384,
        Some("PS512") => Algorithm::PS512,
        _ => {
            return Err(bad(
                "the DPoP proof's alg is not an accepted asymmetric algorithm",
            ))
        }
    };
    let jwk = header
        .get("jwk")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("the DPoP proof has no jwk header"))?;
    if PRIVATE_MEMBERS.iter().any(|m| jwk.contains_key(*m)) {
        return Err(bad("the DPoP proof's jwk holds private key material"));
    }
    let (kty, crv) = (
        jwk.get("kty").and_then(Value::as_str),
        jwk.get("crv").and_then(Value::as_str),
    );
    let fits = match alg {
        Algorithm::ES256 => kty == Some("EC") && crv == Some("P-256"),
        Algorithm::ES384 => kty == Some("EC") && crv == Some("P-384"),
        Algorithm::EdDSA => kty == Some("OKP") && crv == Some("Ed25519"),
        _ => kty == Some("RSA"),
    };
    if !fits {
        return Err(bad("the DPoP proof's jwk does not fit its alg"));
    }
    let thumbprint = thumbprint(jwk).ok_or_else(|| bad("the DPoP proof's jwk is malformed"))?;
    let key = serde_json::from_value::<Jwk>(Value::Object(jwk.clone()))
        .ok()
        .and_then(|jwk| DecodingKey::from_jwk(&jwk).ok())
        .ok_or_else(|| bad("the DPoP proof's jwk is malformed"))?;
    let mut validation = Validation::new(alg);
    // A proof has no exp/aud: its freshness is iat and jti, checked after.
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_aud = false;
    let claims = jsonwebtoken::decode::<Value>(proof, &key, &validation)
        .map_err(|_| bad("the DPoP proof's signature does not verify with its jwk"))?
        .claims;
    if !claims.is_object() {
        return Err(bad("the DPoP proof's claims are not an object"));
    }
    Ok(Proof { claims, thumbprint })
}

/// An absolute http(s) URL reduced to what RFC 9449 compares: scheme and
/// host lower-cased, the default port dropped, no query or fragment, an
/// empty path as `/`. `None` when it is not such a URL.
pub(crate) fn normalize_url(url: &str) -> Option<String> {
    let url = url.split('#').next()?;
    let url = url.split('?').next()?;
    let (scheme, rest) = url.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "http" => "80",
        "https" => "443",
        _ => return None,
    };
    let (authority, path) = match rest.find('/') {
        Some(slash) => rest.split_at(slash),
        None => (rest, "/"),
    };
    let authority = normalize_authority(authority, default_port)?;
    Some(format!("{scheme}://{authority}{path}"))
}

/// `Host:port` lower-cased, with the scheme's default port dropped.
fn normalize_authority(authority: &str, default_port: &str) -> Option<String> {
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    let authority = authority.to_ascii_lowercase();
    // The port follows the last ':' unless that ':' is inside an IPv6 literal.
    let (host, port) = match authority.rfind(':') {
        Some(colon) if !authority[colon..].contains(']') => {
            (&authority[..colon], Some(&authority[colon + 1..]))
        }
        _ => (authority.as_str(), None),
    };
    Some(match port {
        None | Some("") => host.to_owned(),
        Some(port) if port == default_port => host.to_owned(),
        Some(port) => format!("{host}:{port}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc7638_example_thumbprint() {
        // RFC 7638 §3.1.
        let jwk: Map<String, Value> = serde_json::from_str(
            r#"{"kty":"RSA","n":"0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw","e":"AQAB","alg":"RS256","kid":"2011-04-29"}"#,
        )
        .unwrap();
        assert_eq!(
            thumbprint(&jwk).unwrap(),
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
        );
    }

    #[test]
    fn urls_compare_as_rfc9449_says() {
        let cases = [
            (
                "https://API.example:443/a/B?q=1#f",
                Some("https://api.example/a/B"),
            ),
            ("HTTP://127.0.0.1:8080", Some("http://127.0.0.1:8080/")),
            ("http://[::1]:80/x", Some("http://[::1]/x")),
            ("http://[::1]/x", Some("http://[::1]/x")),
            ("https://host:8443/x", Some("https://host:8443/x")),
            ("ftp://host/x", None),
            ("/relative", None),
            ("https://user@host/x", None),
        ];
        for (url, want) in cases {
            assert_eq!(normalize_url(url).as_deref(), want, "{url}");
        }
    }
}
