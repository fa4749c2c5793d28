//! Who must approve a call: from a verified bearer JWT, a trusted header, or
//! one configured subject.

use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use pingora::http::RequestHeader;
use serde_json::Value;
use thiserror::Error;
use tokio::sync::RwLock;
use url::Url;

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

    pub async fn identify(&self, request: &RequestHeader) -> Result<Identity, IdentityError> {
        match self {
            Self::Static(subject) => Ok(Identity::from_subject(subject)),
            Self::Header(name) => {
                let subject = request
                    .headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::trim)
                    .filter(|v| !v.is_empty())
                    .ok_or(IdentityError::Missing)?;
                Ok(Identity::from_subject(subject))
            }
            Self::Jwt(verifier) => {
                let token = request
                    .headers
                    .get(http::header::AUTHORIZATION)
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

impl Identity {
    fn from_subject(subject: &str) -> Self {
        Self {
            subject: subject.to_owned(),
            claims: serde_json::json!({ "sub": subject }),
        }
    }
}

/// Verifies bearer JWTs against a JWKS, refetching it on an unknown `kid`
/// (key rotation) at most once every [`JwtVerifier::REFRESH_COOLDOWN`].
#[derive(Debug)]
pub struct JwtVerifier {
    http: reqwest::Client,
    jwks_uri: Url,
    issuer: String,
    audience: String,
    subject_claim: String,
    keys: RwLock<Option<(JwkSet, Instant)>>,
}

impl JwtVerifier {
    const REFRESH_COOLDOWN: Duration = Duration::from_secs(30);

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
            keys: RwLock::new(None),
        }
    }

    async fn fetch(&self) -> Result<JwkSet, IdentityError> {
        let response = self
            .http
            .get(self.jwks_uri.clone())
            .send()
            .await
            .map_err(|e| IdentityError::KeysUnavailable(e.to_string()))?;
        if !response.status().is_success() {
            return Err(IdentityError::KeysUnavailable(format!(
                "HTTP {}",
                response.status()
            )));
        }
        response
            .json()
            .await
            .map_err(|e| IdentityError::KeysUnavailable(e.to_string()))
    }

    async fn key_for(&self, kid: Option<&str>) -> Result<DecodingKey, IdentityError> {
        let find = |set: &JwkSet| match kid {
            Some(kid) => set.find(kid).cloned(),
            None if set.keys.len() == 1 => set.keys.first().cloned(),
            None => None,
        };
        let stale = {
            let guard = self.keys.read().await;
            if let Some((set, fetched)) = guard.as_ref() {
                if let Some(jwk) = find(set) {
                    return DecodingKey::from_jwk(&jwk)
                        .map_err(|e| IdentityError::Invalid(e.to_string()));
                }
                fetched.elapsed() >= Self::REFRESH_COOLDOWN
            } else {
                true
            }
        };
        if !stale {
            return Err(IdentityError::Invalid("unknown signing key".into()));
        }
        let set = self.fetch().await?;
        let jwk = find(&set);
        *self.keys.write().await = Some((set, Instant::now()));
        let jwk = jwk.ok_or_else(|| IdentityError::Invalid("unknown signing key".into()))?;
        DecodingKey::from_jwk(&jwk).map_err(|e| IdentityError::Invalid(e.to_string()))
    }

    pub async fn verify(&self, token: &str) -> Result<Identity, IdentityError> {
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
        validation.set_audience(&[self.audience.as_str()]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.leeway = 30;
        let data = jsonwebtoken::decode::<Value>(token, &key, &validation)
            .map_err(|e| IdentityError::Invalid(e.to_string()))?;
        let subject = data
            .claims
            .get(&self.subject_claim)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                IdentityError::Invalid(format!("the token has no {} claim", self.subject_claim))
            })?
            .to_owned();
        Ok(Identity {
            subject,
            claims: data.claims,
        })
    }
}
