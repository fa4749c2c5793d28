//! Client authentication at the authorization server.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

use super::CibaError;
use crate::config::ClientAuthConfig;
use crate::secret::Secret;

/// A ready-to-use client authentication method.
#[derive(Clone)]
pub enum ClientAuth {
    SecretPost(Secret),
    SecretBasic(Secret),
    PrivateKeyJwt {
        key: EncodingKey,
        key_id: Option<String>,
        algorithm: Algorithm,
        audience: String,
    },
}

impl std::fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::SecretPost(_) => "ClientAuth::SecretPost",
            Self::SecretBasic(_) => "ClientAuth::SecretBasic",
            Self::PrivateKeyJwt { .. } => "ClientAuth::PrivateKeyJwt",
        })
    }
}

#[derive(Serialize)]
struct Assertion<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    jti: String,
    iat: u64,
    exp: u64,
}

impl ClientAuth {
    pub fn from_config(config: &ClientAuthConfig, issuer: &str) -> Result<Self, CibaError> {
        Ok(match config {
            ClientAuthConfig::ClientSecretPost { client_secret } => {
                Self::SecretPost(client_secret.0.clone())
            }
            ClientAuthConfig::ClientSecretBasic { client_secret } => {
                Self::SecretBasic(client_secret.0.clone())
            }
            ClientAuthConfig::PrivateKeyJwt {
                private_key,
                key_id,
                algorithm,
                audience,
            } => {
                let algorithm: Algorithm = algorithm
                    .parse()
                    .map_err(|_| CibaError::Config(format!("unknown algorithm {algorithm}")))?;
                let pem = private_key.0.expose().as_bytes();
                let key = match algorithm {
                    Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(pem),
                    _ => EncodingKey::from_rsa_pem(pem),
                }
                .map_err(|e| {
                    CibaError::Config(format!("private_key is not a usable PEM key: {e}"))
                })?;
                Self::PrivateKeyJwt {
                    key,
                    key_id: key_id.clone(),
                    algorithm,
                    audience: audience.clone().unwrap_or_else(|| issuer.to_owned()),
                }
            }
        })
    }

    /// Adds this method's credentials to a form request.
    pub fn apply(
        &self,
        client_id: &str,
        form: &mut Vec<(&'static str, String)>,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::RequestBuilder, CibaError> {
        match self {
            Self::SecretPost(secret) => {
                form.push(("client_id", client_id.to_owned()));
                form.push(("client_secret", secret.expose().to_owned()));
                Ok(request)
            }
            Self::SecretBasic(secret) => {
                // RFC 6749 section 2.3.1: both parts are form-urlencoded first.
                let encode = |s: &str| {
                    url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>()
                };
                let credentials = format!("{}:{}", encode(client_id), encode(secret.expose()));
                let value = base64::engine::general_purpose::STANDARD.encode(credentials);
                Ok(request.header(reqwest::header::AUTHORIZATION, format!("Basic {value}")))
            }
            Self::PrivateKeyJwt {
                key,
                key_id,
                algorithm,
                audience,
            } => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or_default();
                let mut header = Header::new(*algorithm);
                header.kid = key_id.clone();
                let claims = Assertion {
                    iss: client_id,
                    sub: client_id,
                    aud: audience,
                    jti: uuid::Uuid::new_v4().to_string(),
                    iat: now,
                    exp: now + 60,
                };
                let assertion = jsonwebtoken::encode(&header, &claims, key)
                    .map_err(|e| CibaError::Config(format!("cannot sign client assertion: {e}")))?;
                form.push(("client_id", client_id.to_owned()));
                form.push((
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".to_owned(),
                ));
                form.push(("client_assertion", assertion));
                Ok(request)
            }
        }
    }
}
