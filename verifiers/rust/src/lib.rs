//! Verifies that a call forwarded by Countersign carries a token approved
//! for exactly that call (docs/call-binding.md, version 1).
//!
//! Countersign asks a person to approve one call; the access token issued
//! for that approval names the call (method, target, host, body digest,
//! approval id) in a `countersign_call` entry of its `authorization_details`.
//! An API that checks the entry itself no longer has to trust the gateway,
//! or anything between, not to reuse the token for another call.
//!
//! [`Verifier::verify`] makes every check of the contract, in its order, and
//! answers an [`Approval`] or the [`Refusal`] the contract prescribes.
//! [`VerifyLayer`] puts it in front of a tower/axum service.
//!
//! ```no_run
//! use axum::{routing::post, Extension, Router};
//! use countersign_verify::{Approval, Config, Verifier, VerifyLayer};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let verifier = Verifier::new(Config {
//!     required_scopes: vec!["product:buy".into()],
//!     ..Config::new(
//!         "https://tenant.example.auth0.com/",
//!         "https://shop.example/api",
//!         "https://tenant.example.auth0.com/.well-known/jwks.json",
//!     )
//! })?;
//! let app = Router::new()
//!     .route("/shop", post(|Extension(approval): Extension<Approval>| async move {
//!         format!("approved by {} ({})", approval.subject, approval.approval_id)
//!     }))
//!     .layer(VerifyLayer::new(verifier));
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:8080").await?;
//! axum::serve(listener, app).await?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod countersign;
mod dpop;
mod keys;
mod layer;
mod refusal;
mod replay;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::request::Parts;
use http::{HeaderMap, HeaderName, StatusCode, Version};
use jsonwebtoken::{Algorithm, Validation};
use serde_json::Value;

pub use layer::{VerifyLayer, VerifyService};
pub use refusal::Refusal;

use refusal::{BEARER_INVALID_TOKEN, DPOP_INVALID_TOKEN};

/// The leeway on `exp` and `nbf`, as the contract says.
const LEEWAY_SECS: u64 = 30;
/// Bound of each replay cache (approval ids, DPoP `jti`s).
const REPLAY_CAPACITY: usize = 100_000;

/// What the verifier accepts. Build it with [`Config::new`] and change the
/// fields you need (`Config { required_scopes, ..Config::new(..) }`).
#[derive(Debug, Clone)]
pub struct Config {
    /// The authorization server's issuer; the token's `iss` must equal it exactly.
    pub issuer: String,
    /// This API's audience (resource indicator); the token's `aud` must hold it.
    pub audience: String,
    /// Where the authorization server publishes its signing keys (JWKS).
    pub jwks_uri: String,
    /// Scopes every call needs, all of them, in the `scope` claim.
    pub required_scopes: Vec<String>,
    /// The host the gateway addresses, when another proxy between it and this
    /// API rewrites `Host`: the bound `host` is compared with it, not with
    /// the `Host` received. Also the authority of the DPoP `htu` when
    /// `external_url` is not set.
    pub expected_host: Option<String>,
    /// The URL the gateway addresses this API at (`https://api.example`), for
    /// DPoP `htu` when the URL this server sees differs (TLS terminated or a
    /// path prefix stripped by another proxy). The request's path is
    /// appended to it. Without it the `htu` expected is `http://` (or the
    /// request's own scheme, HTTP/2) + host + path.
    pub external_url: Option<String>,
    /// Refuse tokens that are not DPoP-bound (no `cnf.jkt`). Bound tokens
    /// always need a proof, whatever this says.
    pub require_dpop: bool,
    /// How far a DPoP proof's `iat` may be from now, either way (60 s).
    pub dpop_window: Duration,
    /// The largest body [`VerifyLayer`] buffers to digest (1 MiB); larger
    /// bodies are refused with 413 `body_too_large`.
    pub max_body_bytes: usize,
    /// How many people besides the approver must have countersigned the call
    /// (four eyes): the `Countersign-Tokens` header must then carry tokens of
    /// at least this many distinct other subjects, each for the same call.
    /// 0 (the default) ignores that header entirely, so an API that does not
    /// ask for countersignatures behaves exactly as before they existed.
    pub required_countersigners: usize,
}

impl Config {
    /// A configuration for tokens of `issuer` for `audience`, signed by keys
    /// published at `jwks_uri`, with the defaults for everything else.
    pub fn new(
        issuer: impl Into<String>,
        audience: impl Into<String>,
        jwks_uri: impl Into<String>,
    ) -> Self {
        Self {
            issuer: issuer.into(),
            audience: audience.into(),
            jwks_uri: jwks_uri.into(),
            required_scopes: Vec::new(),
            expected_host: None,
            external_url: None,
            require_dpop: false,
            dpop_window: Duration::from_secs(60),
            max_body_bytes: 1 << 20,
            required_countersigners: 0,
        }
    }
}

/// A configuration the verifier cannot work with.
#[derive(Debug, thiserror::Error)]
#[error("countersign-verify configuration: {0}")]
pub struct ConfigError(String);

/// An accepted call: what the handler learns about it. [`VerifyLayer`] puts
/// it in the request's extensions (`Extension<Approval>` in axum).
#[derive(Debug, Clone)]
pub struct Approval {
    /// The person who approved the call (the token's `sub`).
    pub subject: String,
    /// The approval id (the entry's `approval`; also sent as `X-Countersign-Approval-Id`).
    pub approval_id: String,
    /// All the token's claims.
    pub claims: Value,
    /// Who countersigned the call: the distinct `sub`s of the accepted
    /// `Countersign-Tokens`, in header order, without the approver's own.
    /// Empty when [`Config::required_countersigners`] is 0.
    pub countersigners: Vec<String>,
}

/// Checks calls against the contract. Cheap to clone (shared state): the
/// key cache and the replay caches are the same for every clone, which is
/// what makes a replay visible whichever clone serves it.
#[derive(Clone)]
pub struct Verifier {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    keys: keys::KeySource,
    /// Normalised `external_url`, without a trailing `/`.
    external_url: Option<String>,
    approvals: replay::ReplayCache,
    proofs: replay::ReplayCache,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// How the token was presented.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Scheme {
    Bearer,
    DPoP,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The one value of header `name`, as text; `Err` when repeated.
fn single_header<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Result<Option<&'a str>, ()> {
    let mut values = headers.get_all(name).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(());
    }
    Ok(first.map(|v| v.to_str().unwrap_or("")))
}

/// The authority the client addressed: `Host` in HTTP/1, `:authority` in HTTP/2 and 3.
fn request_host(parts: &Parts) -> Option<&str> {
    if parts.version >= Version::HTTP_2 {
        if let Some(authority) = parts.uri.authority() {
            return Some(authority.as_str());
        }
    }
    single_header(&parts.headers, &http::header::HOST)
        .ok()
        .flatten()
}

impl Verifier {
    /// A verifier for `config`. Fetches nothing yet: the keys are fetched on
    /// the first call.
    pub fn new(config: Config) -> Result<Self, ConfigError> {
        let error = |what: &str| Err(ConfigError(what.to_owned()));
        if config.issuer.is_empty() {
            return error("issuer is empty");
        }
        if config.audience.is_empty() {
            return error("audience is empty");
        }
        let jwks_uri = reqwest::Url::parse(&config.jwks_uri)
            .map_err(|e| ConfigError(format!("jwks_uri: {e}")))?;
        if !matches!(jwks_uri.scheme(), "http" | "https") {
            return error("jwks_uri is not an http(s) URL");
        }
        if config.expected_host.as_deref() == Some("") {
            return error("expected_host is empty");
        }
        let external_url = match &config.external_url {
            None => None,
            Some(url) => Some(
                dpop::normalize_url(url)
                    .filter(|_| !url.contains(['?', '#']))
                    .ok_or_else(|| {
                        ConfigError("external_url is not an http(s) URL without query".into())
                    })?
                    .trim_end_matches('/')
                    .to_owned(),
            ),
        };
        if config.dpop_window.is_zero() {
            return error("dpop_window is zero");
        }
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| ConfigError(format!("HTTP client: {e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                keys: keys::KeySource::new(http, jwks_uri),
                external_url,
                approvals: replay::ReplayCache::new(REPLAY_CAPACITY),
                proofs: replay::ReplayCache::new(REPLAY_CAPACITY),
                config,
            }),
        })
    }

    /// The configuration it was made with.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Checks the call (`parts` as received, `body` the exact bytes received)
    /// in the contract's order; the first failure is the answer. An accepted
    /// call's approval id is remembered: the same approval is refused next time.
    pub async fn verify(&self, parts: &Parts, body: &[u8]) -> Result<Approval, Refusal> {
        let config = &self.inner.config;
        let now = unix_now();

        // 1. Exactly one Authorization header, Bearer or DPoP.
        let (scheme, token) = credential(parts).ok_or_else(|| {
            let challenge = if config.require_dpop {
                DPOP_INVALID_TOKEN
            } else {
                BEARER_INVALID_TOKEN
            };
            Refusal::unauthorized(
                "token_missing",
                None,
                "send the access token in exactly one Authorization header (Bearer or DPoP)",
                challenge,
            )
        })?;
        let challenge = if scheme == Scheme::DPoP || config.require_dpop {
            DPOP_INVALID_TOKEN
        } else {
            BEARER_INVALID_TOKEN
        };

        // 2. Signature, issuer, audience, expiry.
        let claims = self
            .token_claims(token)
            .await
            .map_err(|detail| Refusal::unauthorized("token_invalid", None, detail, challenge))?;

        // 3. Scopes.
        if let Some(lacking) = lacking_scope(&claims, &config.required_scopes) {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "insufficient_scope",
                None,
                format!("the token lacks the scope {lacking}"),
            ));
        }

        // 4. DPoP: for a bound token, when required, and for any token
        // presented with the DPoP scheme (RFC 9449 §7.1: checked as DPoP, so
        // an unbound one fails on `key`).
        let jkt = bound_key(&claims);
        if jkt.is_some() || config.require_dpop || scheme == Scheme::DPoP {
            self.check_proof(parts, scheme, token, jkt, now)?;
        }

        // 5. Exactly one countersign_call entry.
        let entries = call_entries(&claims);
        let [entry] = entries[..] else {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "binding_missing",
                None,
                format!(
                    "the token's authorization_details hold {} countersign_call entries, not one",
                    entries.len()
                ),
            ));
        };
        let approval_id = entry
            .get("approval")
            .and_then(Value::as_str)
            .filter(|a| !a.is_empty())
            .ok_or_else(|| {
                Refusal::new(
                    StatusCode::FORBIDDEN,
                    "binding_missing",
                    None,
                    "the countersign_call entry names no approval",
                )
            })?;
        let bound = |field: &str| entry.get(field).and_then(Value::as_str);

        // 6-10. The entry names this very call.
        if bound("version") != Some("1") {
            return Err(Refusal::mismatch(
                "version",
                "the binding's version is not \"1\"",
            ));
        }
        if bound("method") != Some(parts.method.as_str()) {
            return Err(Refusal::mismatch(
                "method",
                "the call was approved for another method",
            ));
        }
        let target = parts.uri.path_and_query().map(|pq| pq.as_str());
        if bound("target").is_none() || bound("target") != target {
            return Err(Refusal::mismatch(
                "target",
                "the call was approved for another request-target",
            ));
        }
        let host = config
            .expected_host
            .as_deref()
            .or_else(|| request_host(parts));
        if !matches!((bound("host"), host), (Some(b), Some(h)) if b.eq_ignore_ascii_case(h)) {
            return Err(Refusal::mismatch(
                "host",
                "the call was approved for another host",
            ));
        }
        if bound("body_sha256") != Some(dpop::b64_sha256(body).as_str()) {
            return Err(Refusal::mismatch(
                "body",
                "the call was approved with another body",
            ));
        }

        // C1-C5. Four eyes: enough others approved this very call. Before
        // the replay check, so that a call refused here does not use up
        // the approval; only the person's approval id is remembered.
        let countersigners = self.check_countersigners(parts, &claims, entry).await?;

        // 11. Once only: Countersign forwards an approved call once.
        let exp = claims.get("exp").and_then(Value::as_f64).unwrap_or(0.0) as u64;
        if !self
            .inner
            .approvals
            .first_use(approval_id, exp.saturating_add(LEEWAY_SECS), now)
        {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "approval_replayed",
                None,
                "this approval was already used for a call",
            ));
        }

        let subject = claims
            .get("sub")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        Ok(Approval {
            subject,
            approval_id: approval_id.to_owned(),
            claims,
            countersigners,
        })
    }

    /// Verifies the access token (check 2); `Err` is the refusal's detail.
    async fn token_claims(&self, token: &str) -> Result<Value, String> {
        let config = &self.inner.config;
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| "the access token is not a signed JWT".to_owned())?;
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
            return Err(format!(
                "the access token's algorithm {:?} is not accepted",
                header.alg
            ));
        }
        let key = self
            .inner
            .keys
            .key_for(header.kid.as_deref())
            .await
            .map_err(|e| e.0)?;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[config.issuer.as_str()]);
        validation.set_audience(&[config.audience.as_str()]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = LEEWAY_SECS;
        let data = jsonwebtoken::decode::<Value>(token, &key, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::InvalidSignature => "the access token's signature does not verify",
                ErrorKind::ExpiredSignature => "the access token has expired",
                ErrorKind::ImmatureSignature => "the access token is not valid yet (nbf)",
                ErrorKind::InvalidIssuer => "the access token is from another issuer",
                ErrorKind::InvalidAudience => "the access token is for another audience",
                ErrorKind::MissingRequiredClaim(_) => {
                    "the access token lacks one of exp, iss, aud, sub"
                }
                _ => "the access token is not valid",
            }
            .to_owned()
        })?;
        if !data.claims.get("sub").is_some_and(Value::is_string) {
            return Err("the access token's sub is not a string".into());
        }
        Ok(data.claims)
    }

    /// Check 4: the proof of possession of the key the token is bound to.
    fn check_proof(
        &self,
        parts: &Parts,
        scheme: Scheme,
        token: &str,
        jkt: Option<&Value>,
        now: u64,
    ) -> Result<(), Refusal> {
        let config = &self.inner.config;
        if jkt.is_none() && config.require_dpop {
            return Err(dpop::missing(
                "this API accepts DPoP-bound tokens only, and the token is not bound to a key",
            ));
        }
        if scheme != Scheme::DPoP {
            return Err(dpop::missing(
                "the token is bound to a key: send it with the DPoP scheme and a DPoP proof",
            ));
        }
        let proof = match single_header(&parts.headers, &HeaderName::from_static("dpop")) {
            Ok(Some(proof)) if !proof.is_empty() => proof,
            _ => return Err(dpop::missing("send exactly one DPoP header")),
        };
        let proof = dpop::verify_signature(proof)?;
        let claim = |name: &str| proof.claims.get(name);

        if claim("htm").and_then(Value::as_str) != Some(parts.method.as_str()) {
            return Err(dpop::invalid("htm", "the DPoP proof is for another method"));
        }
        let expected_htu = self.expected_htu(parts);
        let htu = claim("htu")
            .and_then(Value::as_str)
            .and_then(dpop::normalize_url);
        if expected_htu.is_none() || htu != expected_htu {
            return Err(dpop::invalid("htu", "the DPoP proof is for another URL"));
        }
        let window = config.dpop_window.as_secs_f64();
        let iat = claim("iat").and_then(Value::as_f64);
        if !iat.is_some_and(|iat| (iat - now as f64).abs() <= window) {
            return Err(dpop::invalid(
                "iat",
                "the DPoP proof's iat is not within the accepted window",
            ));
        }
        if claim("ath").and_then(Value::as_str) != Some(dpop::b64_sha256(token.as_bytes()).as_str())
        {
            return Err(dpop::invalid(
                "ath",
                "the DPoP proof is for another access token",
            ));
        }
        // An unbound token presented as DPoP has no key to match.
        if jkt.and_then(Value::as_str) != Some(proof.thumbprint.as_str()) {
            return Err(dpop::invalid(
                "key",
                "the DPoP proof is signed by a key the token is not bound to",
            ));
        }
        let jti = claim("jti")
            .and_then(Value::as_str)
            .filter(|j| !j.is_empty())
            .ok_or_else(|| dpop::invalid("proof", "the DPoP proof has no jti"))?;
        // Accepted until iat + window: remember it that long.
        let until = iat.unwrap_or_default().max(0.0) as u64 + config.dpop_window.as_secs() + 1;
        if !self.inner.proofs.first_use(jti, until.max(now), now) {
            return Err(Refusal::unauthorized(
                "dpop_proof_replayed",
                None,
                "this DPoP proof was already used",
                refusal::DPOP_INVALID_PROOF,
            ));
        }
        Ok(())
    }

    /// The URL the proof must name: the configured external URL, or the
    /// scheme and host this request came with, plus the path.
    fn expected_htu(&self, parts: &Parts) -> Option<String> {
        let path = parts.uri.path();
        if let Some(base) = &self.inner.external_url {
            return Some(format!("{base}{path}"));
        }
        let scheme = parts.uri.scheme_str().unwrap_or("http");
        let host = match &self.inner.config.expected_host {
            Some(host) => host.as_str(),
            None => request_host(parts)?,
        };
        dpop::normalize_url(&format!("{scheme}://{host}{path}"))
    }
}

/// The first of `required` scopes the token's space-separated `scope` claim
/// lacks (check 3, and C2 for countersign tokens).
fn lacking_scope<'a>(claims: &Value, required: &'a [String]) -> Option<&'a str> {
    let granted: Vec<&str> = claims
        .get("scope")
        .and_then(Value::as_str)
        .map(|s| s.split(' ').filter(|s| !s.is_empty()).collect())
        .unwrap_or_default();
    required
        .iter()
        .map(String::as_str)
        .find(|s| !granted.contains(s))
}

/// The token's `countersign_call` entries (check 5, and C3 for countersign
/// tokens): exactly one is a binding, any other number is none.
fn call_entries(claims: &Value) -> Vec<&Value> {
    claims
        .get("authorization_details")
        .and_then(Value::as_array)
        .map(|details| {
            details
                .iter()
                .filter(|d| d.get("type").and_then(Value::as_str) == Some("countersign_call"))
                .collect()
        })
        .unwrap_or_default()
}

/// The `cnf.jkt` the token is bound to, if any (check 4, and C4 for
/// countersign tokens).
fn bound_key(claims: &Value) -> Option<&Value> {
    claims.get("cnf").and_then(|cnf| cnf.get("jkt"))
}

/// The scheme and token of the one `Authorization` header, if it is one.
fn credential(parts: &Parts) -> Option<(Scheme, &str)> {
    let value = single_header(&parts.headers, &http::header::AUTHORIZATION).ok()??;
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    if token.is_empty() || token.contains(' ') {
        return None;
    }
    if scheme.eq_ignore_ascii_case("bearer") {
        Some((Scheme::Bearer, token))
    } else if scheme.eq_ignore_ascii_case("dpop") {
        Some((Scheme::DPoP, token))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(request: http::request::Builder) -> Parts {
        request.body(()).unwrap().into_parts().0
    }

    #[test]
    fn host_is_the_authority_in_http2_and_the_host_header_in_http1() {
        let h2 =
            parts(http::Request::get("https://API.example:8443/shop?x=1").version(Version::HTTP_2));
        assert_eq!(request_host(&h2), Some("API.example:8443"));
        assert_eq!(h2.uri.path_and_query().unwrap().as_str(), "/shop?x=1");
        let h1 = parts(http::Request::get("/shop").header("host", "shop.example"));
        assert_eq!(request_host(&h1), Some("shop.example"));
        let twice = parts(
            http::Request::get("/shop")
                .header("host", "a.example")
                .header("host", "b.example"),
        );
        assert_eq!(
            request_host(&twice),
            None,
            "an ambiguous Host matches nothing"
        );
    }

    #[test]
    fn credentials() {
        let with = |value: &str| parts(http::Request::get("/").header("authorization", value));
        let scheme =
            |value: &str| credential(&with(value)).map(|(s, t)| (s == Scheme::DPoP, t.to_owned()));
        assert_eq!(scheme("Bearer abc"), Some((false, "abc".into())));
        assert_eq!(scheme("bearer   abc "), Some((false, "abc".into())));
        assert_eq!(scheme("DPoP abc"), Some((true, "abc".into())));
        assert_eq!(scheme("Basic abc"), None);
        assert_eq!(scheme("Bearer"), None);
        assert_eq!(scheme("Bearer a b"), None);
    }
}
