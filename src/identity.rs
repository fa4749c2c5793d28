//! Who must approve a call: from a verified bearer JWT, a trusted header, or
//! one configured subject.

use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use pingora::http::RequestHeader;
use serde_json::Value;
use thiserror::Error;
use tokio::sync::{Mutex, RwLock};
use url::Url;

use crate::ciba::{read_limited, MAX_METADATA_BYTES};
use crate::config::{IdentityConfig, JwtIdentityConfig};

/// The person a call is made for.
#[derive(Debug, Clone)]
pub struct Identity {
    pub subject: String,
    /// Claims available to templates as `user`; at least `sub`.
    pub claims: Value,
}

#[derive(Debug, Error)]
pub enum IdentityError {
    #[error("no credential identifies the user")]
    Missing,
    #[error("the bearer token is not valid: {0}")]
    Invalid(String),
    #[error("the signing keys could not be fetched: {0}")]
    KeysUnavailable(String),
}

/// Identifies the approving person for a call.
#[derive(Debug)]
pub enum IdentitySource {
    Jwt(Box<JwtVerifier>),
    Header(http::HeaderName),
    Static(String),
}

impl IdentitySource {
    pub fn new(
        config: &IdentityConfig,
        issuer: &str,
        jwks: Option<&Url>,
        http: reqwest::Client,
    ) -> Result<Self, String> {
        Ok(match config {
            IdentityConfig::Jwt(jwt) => {
                Self::Jwt(Box::new(JwtVerifier::new(jwt, issuer, jwks, http)?))
            }
            IdentityConfig::Header(header) => Self::Header(
                http::HeaderName::from_bytes(header.name.as_bytes())
                    .map_err(|e| format!("identity.header.name: {e}"))?,
            ),
            IdentityConfig::Static(fixed) => Self::Static(fixed.subject.0.clone()),
        })
    }

    /// The header that carried the identity, to strip before forwarding.
    pub fn credential_header(&self) -> Option<&http::HeaderName> {
        match self {
            Self::Jwt(_) => Some(&http::header::AUTHORIZATION),
            Self::Header(name) => Some(name),
            Self::Static(_) => None,
        }
    }

    /// Who approves this call. A credential given more than once is refused:
    /// which copy a later hop would read is anybody's guess.
    pub async fn identify(&self, request: &RequestHeader) -> Result<Identity, IdentityError> {
        match self {
            Self::Static(subject) => Ok(Identity::from_subject(subject)),
            Self::Header(name) => {
                let subject = single_header(request, name)?
                    .and_then(|v| v.to_str().ok())
                    .map(str::trim)
                    .filter(|v| !v.is_empty())
                    .ok_or(IdentityError::Missing)?;
                Ok(Identity::from_subject(subject))
            }
            Self::Jwt(verifier) => {
                let token = single_header(request, &http::header::AUTHORIZATION)?
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| {
                        let (scheme, token) = v.trim().split_once(' ')?;
                        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
                    })
                    .filter(|t| !t.is_empty())
                    .ok_or(IdentityError::Missing)?;
                verifier.verify(token).await
            }
        }
    }
}

/// The one value of header `name`, `None` when absent, an error when repeated.
fn single_header<'a>(
    request: &'a RequestHeader,
    name: &http::HeaderName,
) -> Result<Option<&'a http::HeaderValue>, IdentityError> {
    let mut values = request.headers.get_all(name).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(IdentityError::Invalid(format!(
            "the {name} header is given more than once"
        )));
    }
    Ok(first)
}

impl Identity {
    /// An identity known only by its subject (`user.sub`).
    pub fn from_subject(subject: &str) -> Self {
        Self {
            subject: subject.to_owned(),
            claims: serde_json::json!({ "sub": subject }),
        }
    }
}

/// Verifies bearer JWTs against a JWKS, refetching it on an unknown `kid`
/// (key rotation). Refetches are single-flight (concurrent verifications
/// share one fetch) and negatively cached: after a fetch, an unknown `kid`
/// triggers no other for [`JwtVerifier::REFRESH_COOLDOWN`], and after a failed
/// one nothing is fetched for [`JwtVerifier::FAILURE_COOLDOWN`].
#[derive(Debug)]
pub struct JwtVerifier {
    http: reqwest::Client,
    jwks_uri: Url,
    issuer: String,
    audience: String,
    subject_claim: String,
    keys: RwLock<KeyCache>,
    /// Held while fetching: the single flight.
    refresh: Mutex<()>,
}

#[derive(Debug, Default)]
struct KeyCache {
    set: Option<JwkSet>,
    /// The last fetch attempt: when, and why it failed if it did.
    attempt: Option<(Instant, Option<String>)>,
    /// Counts fetch attempts, so a waiter knows whether one happened while it waited.
    generation: u64,
}

impl KeyCache {
    /// Whether a fetch may be made now; otherwise the error to answer.
    fn may_fetch(&self) -> Result<(), IdentityError> {
        match &self.attempt {
            None => Ok(()),
            Some((at, Some(error))) if at.elapsed() < JwtVerifier::FAILURE_COOLDOWN => {
                Err(IdentityError::KeysUnavailable(error.clone()))
            }
            Some((at, None)) if at.elapsed() < JwtVerifier::REFRESH_COOLDOWN => Err(unknown_key()),
            Some(_) => Ok(()),
        }
    }

    /// The answer of the latest fetch for a key it did not have.
    fn after_fetch(&self) -> IdentityError {
        match &self.attempt {
            Some((_, Some(error))) => IdentityError::KeysUnavailable(error.clone()),
            _ => unknown_key(),
        }
    }
}

fn unknown_key() -> IdentityError {
    IdentityError::Invalid("unknown signing key".into())
}

impl JwtVerifier {
    const REFRESH_COOLDOWN: Duration = Duration::from_secs(30);
    const FAILURE_COOLDOWN: Duration = Duration::from_secs(5);

    fn new(
        config: &JwtIdentityConfig,
        default_issuer: &str,
        default_jwks: Option<&Url>,
        http: reqwest::Client,
    ) -> Result<Self, String> {
        let jwks_uri = config
            .jwks_uri
            .clone()
            .or_else(|| default_jwks.cloned())
            .ok_or(
                "identity.jwt.jwks_uri is needed: the authorization server advertises no jwks_uri",
            )?;
        let issuer = config
            .issuer
            .as_ref()
            .map_or_else(|| default_issuer.to_owned(), |i| i.0.clone());
        Ok(Self::with_keys(
            http,
            jwks_uri,
            &issuer,
            &config.audience.0,
            &config.subject_claim,
        ))
    }

    /// A verifier for tokens of `issuer` meant for `audience`, signed by a key in `jwks_uri`.
    pub fn with_keys(
        http: reqwest::Client,
        jwks_uri: Url,
        issuer: &str,
        audience: &str,
        subject_claim: &str,
    ) -> Self {
        Self {
            http,
            jwks_uri,
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            subject_claim: subject_claim.to_owned(),
            keys: RwLock::new(KeyCache::default()),
            refresh: Mutex::new(()),
        }
    }

    /// Fetches the JWKS (at most [`MAX_METADATA_BYTES`], no redirects).
    async fn fetch(&self) -> Result<JwkSet, String> {
        let response = self
            .http
            .get(self.jwks_uri.clone())
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        if status.is_redirection() {
            return Err(format!("HTTP {status}; redirects are not followed"));
        }
        if !status.is_success() {
            return Err(format!("HTTP {status}"));
        }
        let body = read_limited(response, MAX_METADATA_BYTES)
            .await
            .map_err(|e| e.to_string())?;
        serde_json::from_slice(&body).map_err(|e| format!("not a JWKS: {e}"))
    }

    async fn key_for(&self, kid: Option<&str>) -> Result<DecodingKey, IdentityError> {
        let find = |set: &JwkSet| match kid {
            Some(kid) => set.find(kid).cloned(),
            None if set.keys.len() == 1 => set.keys.first().cloned(),
            None => None,
        };
        let decode = |jwk: Jwk| {
            DecodingKey::from_jwk(&jwk).map_err(|e| IdentityError::Invalid(e.to_string()))
        };
        let seen = {
            let cache = self.keys.read().await;
            if let Some(jwk) = cache.set.as_ref().and_then(find) {
                return decode(jwk);
            }
            cache.may_fetch()?;
            cache.generation
        };
        let _flight = self.refresh.lock().await;
        {
            // Whoever held the lock before may have fetched what we need.
            let cache = self.keys.read().await;
            if let Some(jwk) = cache.set.as_ref().and_then(find) {
                return decode(jwk);
            }
            if cache.generation != seen {
                return Err(cache.after_fetch());
            }
            cache.may_fetch()?;
        }
        let fetched = self.fetch().await;
        let mut cache = self.keys.write().await;
        cache.generation += 1;
        match fetched {
            Ok(set) => {
                let jwk = find(&set);
                cache.set = Some(set);
                cache.attempt = Some((Instant::now(), None));
                jwk.map_or_else(|| Err(unknown_key()), decode)
            }
            Err(error) => {
                // Keys fetched before stay usable.
                cache.attempt = Some((Instant::now(), Some(error.clone())));
                Err(IdentityError::KeysUnavailable(error))
            }
        }
    }

    /// The claims of `token`, once its signature, issuer, audience and
    /// lifetime are checked.
    pub async fn claims(&self, token: &str, audience: &str) -> Result<Value, IdentityError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| IdentityError::Invalid(e.to_string()))?;
        if !matches!(
            header.alg,
            Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::PS384
                | Algorithm::PS512
                | Algorithm::ES256
                | Algorithm::ES384
                | Algorithm::EdDSA
        ) {
            return Err(IdentityError::Invalid(format!(
                "algorithm {:?} is not accepted",
                header.alg
            )));
        }
        let key = self.key_for(header.kid.as_deref()).await?;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[self.issuer.as_str(), self.issuer.trim_end_matches('/')]);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.leeway = 30;
        jsonwebtoken::decode::<Value>(token, &key, &validation)
            .map(|data| data.claims)
            .map_err(|e| IdentityError::Invalid(e.to_string()))
    }

    pub async fn verify(&self, token: &str) -> Result<Identity, IdentityError> {
        let claims = self.claims(token, &self.audience).await?;
        let subject = claims
            .get(&self.subject_claim)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                IdentityError::Invalid(format!("the token has no {} claim", self.subject_claim))
            })?
            .to_owned();
        Ok(Identity { subject, claims })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{SystemTime, UNIX_EPOCH};

    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    use super::*;
    use crate::ciba::test_server::{self, TestServer};

    const ISSUER: &str = "https://agents.example";
    const JWKS: &str = include_str!("../tests/fixtures/agent-jwks.json");

    fn token(kid: &str) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(kid.into());
        let key =
            EncodingKey::from_rsa_pem(include_bytes!("../tests/fixtures/agent-key.pem")).unwrap();
        let claims = json!({"iss": ISSUER, "aud": "countersign", "sub": "alice", "exp": now + 300});
        jsonwebtoken::encode(&header, &claims, &key).unwrap()
    }

    fn verifier(server: &TestServer) -> Arc<JwtVerifier> {
        Arc::new(JwtVerifier::with_keys(
            reqwest::Client::new(),
            server.url("/jwks"),
            ISSUER,
            "countersign",
            "sub",
        ))
    }

    fn request(headers: &[(&str, &str)]) -> RequestHeader {
        let mut request = RequestHeader::build("POST", b"/shop", None).unwrap();
        for (name, value) in headers {
            request.append_header(name.to_string(), *value).unwrap();
        }
        request
    }

    #[tokio::test]
    async fn a_repeated_identity_header_is_refused() {
        let source = IdentitySource::Header(http::HeaderName::from_static("x-user"));
        let one = source.identify(&request(&[("x-user", "alice")])).await;
        assert_eq!(one.unwrap().subject, "alice");
        let two = source
            .identify(&request(&[("x-user", "alice"), ("x-user", "bob")]))
            .await;
        assert!(
            matches!(&two, Err(IdentityError::Invalid(r)) if r.contains("more than once")),
            "{two:?}"
        );
    }

    #[tokio::test]
    async fn a_repeated_authorization_header_is_refused() {
        let jwks = JWKS.as_bytes().to_vec();
        let server = TestServer::start(move |_| test_server::response(200, &[], &jwks)).await;
        let source = IdentitySource::Jwt(Box::new(JwtVerifier::with_keys(
            reqwest::Client::new(),
            server.url("/jwks"),
            ISSUER,
            "countersign",
            "sub",
        )));
        let bearer = format!("Bearer {}", token("agent-key-1"));
        let one = source
            .identify(&request(&[("authorization", &bearer)]))
            .await;
        assert_eq!(one.unwrap().subject, "alice");
        let two = source
            .identify(&request(&[
                ("authorization", &bearer),
                ("authorization", "Bearer other"),
            ]))
            .await;
        assert!(
            matches!(&two, Err(IdentityError::Invalid(r)) if r.contains("more than once")),
            "{two:?}"
        );
    }

    #[tokio::test]
    async fn concurrent_unknown_kids_share_one_jwks_fetch_and_are_not_refetched() {
        let jwks = JWKS.as_bytes().to_vec();
        let server = TestServer::start(move |_| test_server::response(200, &[], &jwks)).await;
        let verifier = verifier(&server);
        let unknown = token("rotated-key");
        let calls: Vec<_> = (0..20)
            .map(|_| {
                let verifier = verifier.clone();
                let unknown = unknown.clone();
                tokio::spawn(async move { verifier.verify(&unknown).await })
            })
            .collect();
        for call in calls {
            let result = call.await.unwrap();
            assert!(
                matches!(result, Err(IdentityError::Invalid(_))),
                "{result:?}"
            );
        }
        assert_eq!(server.hits("/jwks"), 1, "one fetch for all of them");
        // Negative cache: the same unknown kid right after is not fetched again,
        // and a known one is served from the keys already fetched.
        assert!(verifier.verify(&unknown).await.is_err());
        verifier.verify(&token("agent-key-1")).await.unwrap();
        assert_eq!(server.hits("/jwks"), 1);
    }

    #[tokio::test]
    async fn a_failed_jwks_fetch_is_not_retried_by_every_call() {
        let server = TestServer::start(|_| test_server::response(500, &[], b"")).await;
        let verifier = verifier(&server);
        let calls: Vec<_> = (0..10)
            .map(|_| {
                let verifier = verifier.clone();
                tokio::spawn(async move { verifier.verify(&token("agent-key-1")).await })
            })
            .collect();
        for call in calls {
            let result = call.await.unwrap();
            assert!(
                matches!(result, Err(IdentityError::KeysUnavailable(_))),
                "{result:?}"
            );
        }
        let again = verifier.verify(&token("agent-key-1")).await;
        assert!(matches!(again, Err(IdentityError::KeysUnavailable(_))));
        assert_eq!(server.hits("/jwks"), 1);
    }

    #[tokio::test]
    async fn a_jwks_past_one_mebibyte_is_refused() {
        let mut jwks: Value = serde_json::from_str(JWKS).unwrap();
        jwks["padding"] = Value::String("x".repeat(MAX_METADATA_BYTES));
        let body = jwks.to_string().into_bytes();
        let server = TestServer::start(move |_| test_server::response(200, &[], &body)).await;
        let result = verifier(&server).verify(&token("agent-key-1")).await;
        assert!(
            matches!(&result, Err(IdentityError::KeysUnavailable(r)) if r.contains("larger")),
            "{result:?}"
        );
    }
}
