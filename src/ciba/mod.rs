//! The OpenID CIBA client (poll mode): discovery, the backchannel
//! authentication request and token polling. It speaks the protocol and
//! classifies answers; deciding what to do next is the approval state
//! machine's job.

mod auth;

use std::time::{Duration, SystemTime};

use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::Value;
use thiserror::Error;
use url::Url;

pub use auth::ClientAuth;

use crate::config::{AudienceParameter, AuthorizationServerConfig, LoginHintFormat};
use crate::metrics::Metrics;
use crate::secret::Secret;

const CIBA_GRANT_TYPE: &str = "urn:openid:params:grant-type:ciba";

#[derive(Debug, Error)]
pub enum CibaError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("the authorization server does not know the user")]
    UnknownUser,
    #[error("the authorization server refused the binding message: {0}")]
    InvalidBindingMessage(String),
    #[error("the authorization server refused the request: {error}{}", description.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Rejected {
        status: u16,
        error: String,
        description: Option<String>,
    },
    #[error("the authorization server is unavailable: {reason}")]
    Unavailable {
        reason: String,
        retry_after: Option<Duration>,
    },
    #[error("the authorization server answered something unexpected: {0}")]
    Protocol(String),
}

/// Where the authorization server's endpoints are.
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub issuer: String,
    pub backchannel_authentication: Url,
    pub token: Url,
    pub jwks: Option<Url>,
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    backchannel_authentication_endpoint: Option<Url>,
    token_endpoint: Url,
    jwks_uri: Option<Url>,
}

/// Reads the endpoints from the configuration or from OIDC discovery.
pub async fn resolve_endpoints(
    http: &reqwest::Client,
    config: &AuthorizationServerConfig,
) -> Result<Endpoints, CibaError> {
    let issuer = config.issuer.0.clone();
    if let Some(explicit) = &config.endpoints {
        return Ok(Endpoints {
            issuer,
            backchannel_authentication: explicit.backchannel_authentication.clone(),
            token: explicit.token.clone(),
            jwks: explicit.jwks.clone(),
        });
    }
    let url = format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    );
    let unavailable = |reason: String| CibaError::Unavailable {
        reason,
        retry_after: None,
    };
    let response = http
        .get(&url)
        .send()
        .await
        .map_err(|e| unavailable(format!("discovery at {url}: {e}")))?;
    if !response.status().is_success() {
        return Err(unavailable(format!(
            "discovery at {url}: HTTP {}",
            response.status()
        )));
    }
    let discovery: Discovery = response
        .json()
        .await
        .map_err(|e| CibaError::Protocol(format!("discovery at {url}: {e}")))?;
    if discovery.issuer.trim_end_matches('/') != issuer.trim_end_matches('/') {
        return Err(CibaError::Protocol(format!(
            "discovery at {url} names issuer {:?}, not the configured {issuer:?}",
            discovery.issuer
        )));
    }
    let backchannel = discovery
        .backchannel_authentication_endpoint
        .ok_or_else(|| {
            CibaError::Protocol(format!(
                "{issuer} does not advertise backchannel_authentication_endpoint: is CIBA enabled?"
            ))
        })?;
    Ok(Endpoints {
        issuer: discovery.issuer,
        backchannel_authentication: backchannel,
        token: discovery.token_endpoint,
        jwks: discovery.jwks_uri,
    })
}

/// One backchannel authentication request.
#[derive(Debug, Clone)]
pub struct AuthorizeRequest<'a> {
    pub subject: &'a str,
    pub binding_message: &'a str,
    pub scopes: &'a [String],
    pub audience: Option<&'a str>,
    pub authorization_details: Option<&'a Value>,
    pub requested_expiry: Option<Duration>,
}

/// The authorization server's acknowledgement: the person is being asked.
#[derive(Debug, Clone)]
pub struct Authorization {
    /// Not a credential by itself, but it identifies the pending grant; kept
    /// out of logs all the same.
    pub auth_req_id: Secret,
    pub expires_in: Duration,
    /// `None` means the client must use 5 seconds.
    pub interval: Option<Duration>,
}

#[derive(Deserialize)]
struct AuthorizeBody {
    auth_req_id: String,
    expires_in: u64,
    #[serde(default)]
    interval: Option<u64>,
}

/// The access token issued on approval.
#[derive(Debug, Clone)]
pub struct Grant {
    pub access_token: Secret,
    pub scope: Option<String>,
}

#[derive(Deserialize)]
struct TokenBody {
    access_token: String,
    #[serde(default)]
    scope: Option<String>,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: String,
    #[serde(default)]
    error_description: Option<String>,
}

/// What one poll of the token endpoint said.
#[derive(Debug)]
pub enum PollAnswer {
    Pending,
    SlowDown,
    Approved(Grant),
    Denied,
    Expired,
    /// 429, or a 5xx with `Retry-After`: the server is there and asks to
    /// be asked again later.
    Unavailable {
        retry_after: Option<Duration>,
    },
    /// No answer at all: the connection failed or timed out, or a 5xx came
    /// without `Retry-After`. The approval ends after a few in a row.
    Unreachable {
        reason: String,
    },
    /// Anything else; the request cannot succeed.
    Failed(CibaError),
}

/// A CIBA client for one authorization server.
#[derive(Debug, Clone)]
pub struct CibaClient {
    http: reqwest::Client,
    endpoints: Endpoints,
    client_id: String,
    auth: ClientAuth,
    login_hint: LoginHintFormat,
    audience_parameter: AudienceParameter,
    extra_scopes: Vec<String>,
    metrics: Metrics,
}

impl CibaClient {
    pub fn new(
        http: reqwest::Client,
        endpoints: Endpoints,
        config: &AuthorizationServerConfig,
        metrics: Metrics,
    ) -> Result<Self, CibaError> {
        let auth = ClientAuth::from_config(&config.client_auth, &endpoints.issuer)?;
        Ok(Self {
            http,
            endpoints,
            client_id: config.client_id.0.clone(),
            auth,
            login_hint: config.login_hint,
            audience_parameter: config.audience_parameter,
            extra_scopes: config.extra_scopes.clone(),
            metrics,
        })
    }

    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    fn login_hint(&self, subject: &str) -> String {
        match self.login_hint {
            LoginHintFormat::Subject => subject.to_owned(),
            LoginHintFormat::IssSub => serde_json::json!({
                "format": "iss_sub",
                "iss": self.endpoints.issuer,
                "sub": subject,
            })
            .to_string(),
        }
    }

    fn record(&self, endpoint: &str, result: &str) {
        self.metrics
            .ciba_requests
            .with_label_values(&[endpoint, result])
            .inc();
    }

    /// Asks the authorization server to ask the person.
    pub async fn authorize(
        &self,
        request: &AuthorizeRequest<'_>,
    ) -> Result<Authorization, CibaError> {
        let mut scopes = vec!["openid".to_owned()];
        for scope in request.scopes.iter().chain(&self.extra_scopes) {
            if !scopes.contains(scope) {
                scopes.push(scope.clone());
            }
        }
        let mut form: Vec<(&'static str, String)> = vec![
            ("scope", scopes.join(" ")),
            ("login_hint", self.login_hint(request.subject)),
            ("binding_message", request.binding_message.to_owned()),
        ];
        if let Some(audience) = request.audience {
            let key = match self.audience_parameter {
                AudienceParameter::Audience => "audience",
                AudienceParameter::Resource => "resource",
            };
            form.push((key, audience.to_owned()));
        }
        if let Some(details) = request.authorization_details {
            form.push(("authorization_details", details.to_string()));
        }
        if let Some(expiry) = request.requested_expiry {
            form.push(("requested_expiry", expiry.as_secs().max(1).to_string()));
        }
        let result = self
            .post_form(self.endpoints.backchannel_authentication.clone(), form)
            .await;
        let (status, body, retry_after) = match result {
            Ok(parts) => parts,
            Err(error) => {
                self.record("backchannel_authentication", "unavailable");
                return Err(error);
            }
        };
        if status.is_success() {
            let parsed: AuthorizeBody = serde_json::from_slice(&body).map_err(|e| {
                self.record("backchannel_authentication", "invalid_response");
                CibaError::Protocol(format!("bc-authorize response: {e}"))
            })?;
            self.record("backchannel_authentication", "ok");
            return Ok(Authorization {
                auth_req_id: Secret::new(parsed.auth_req_id),
                expires_in: Duration::from_secs(parsed.expires_in),
                interval: parsed.interval.map(Duration::from_secs),
            });
        }
        if is_unavailable(status) {
            self.record("backchannel_authentication", "unavailable");
            return Err(CibaError::Unavailable {
                reason: format!("HTTP {status}"),
                retry_after,
            });
        }
        let error = parse_error(status, &body);
        let (result, error) = match error {
            ErrorBody { error, .. } if error == "unknown_user_id" => {
                ("unknown_user_id", CibaError::UnknownUser)
            }
            ErrorBody {
                error,
                error_description,
            } if error == "invalid_binding_message" => (
                "invalid_binding_message",
                CibaError::InvalidBindingMessage(error_description.unwrap_or_default()),
            ),
            ErrorBody {
                error,
                error_description,
            } => (
                "error",
                CibaError::Rejected {
                    status: status.as_u16(),
                    error,
                    description: error_description,
                },
            ),
        };
        self.record("backchannel_authentication", result);
        Err(error)
    }

    /// Polls the token endpoint once.
    pub async fn poll(&self, auth_req_id: &Secret) -> PollAnswer {
        let form = vec![
            ("grant_type", CIBA_GRANT_TYPE.to_owned()),
            ("auth_req_id", auth_req_id.expose().to_owned()),
        ];
        let (status, body, retry_after) =
            match self.post_form(self.endpoints.token.clone(), form).await {
                Ok(parts) => parts,
                Err(CibaError::Unavailable { reason, .. }) => {
                    self.record("token", "unavailable");
                    return PollAnswer::Unreachable { reason };
                }
                Err(other) => {
                    self.record("token", "error");
                    return PollAnswer::Failed(other);
                }
            };
        if status.is_success() {
            return match serde_json::from_slice::<TokenBody>(&body) {
                Ok(token) => {
                    self.record("token", "approved");
                    PollAnswer::Approved(Grant {
                        access_token: Secret::new(token.access_token),
                        scope: token.scope,
                    })
                }
                Err(e) => {
                    self.record("token", "invalid_response");
                    PollAnswer::Failed(CibaError::Protocol(format!("token response: {e}")))
                }
            };
        }
        if is_unavailable(status) {
            self.record("token", "unavailable");
            if status.is_server_error() && retry_after.is_none() {
                return PollAnswer::Unreachable {
                    reason: format!("HTTP {status}"),
                };
            }
            return PollAnswer::Unavailable { retry_after };
        }
        let error = parse_error(status, &body);
        let (result, answer) = match error.error.as_str() {
            "authorization_pending" => ("authorization_pending", PollAnswer::Pending),
            "slow_down" => ("slow_down", PollAnswer::SlowDown),
            "access_denied" => ("access_denied", PollAnswer::Denied),
            // oidc-provider answers invalid_grant once an expired request is purged.
            "expired_token" | "invalid_grant" => (
                if error.error == "expired_token" {
                    "expired_token"
                } else {
                    "invalid_grant"
                },
                PollAnswer::Expired,
            ),
            _ => (
                "error",
                PollAnswer::Failed(CibaError::Rejected {
                    status: status.as_u16(),
                    error: error.error,
                    description: error.error_description,
                }),
            ),
        };
        self.record("token", result);
        answer
    }

    async fn post_form(
        &self,
        url: Url,
        mut form: Vec<(&'static str, String)>,
    ) -> Result<(StatusCode, bytes::Bytes, Option<Duration>), CibaError> {
        let request = self.http.post(url);
        let request = self.auth.apply(&self.client_id, &mut form, request)?;
        let response = request
            .form(&form)
            .send()
            .await
            .map_err(|e| CibaError::Unavailable {
                // reqwest's error names the URL, never the form body.
                reason: e.without_url().to_string(),
                retry_after: None,
            })?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let body = response.bytes().await.map_err(|e| CibaError::Unavailable {
            reason: e.without_url().to_string(),
            retry_after,
        })?;
        Ok((status, body, retry_after))
    }
}

fn is_unavailable(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
}

fn parse_error(status: StatusCode, body: &[u8]) -> ErrorBody {
    serde_json::from_slice(body).unwrap_or_else(|_| ErrorBody {
        error: format!("http_{}", status.as_u16()),
        error_description: None,
    })
}

/// `Retry-After` as delta-seconds or an HTTP date (RFC 9110 section 10.2.3).
/// A number too large for `u64` saturates; a date in the past is zero.
fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_seconds_or_an_http_date_and_saturates() {
        let now = SystemTime::now();
        let parse = |v: &str| parse_retry_after(v, now);
        assert_eq!(parse(" 120 "), Some(Duration::from_secs(120)));
        assert_eq!(
            parse("99999999999999999999999999"),
            Some(Duration::from_secs(u64::MAX))
        );
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        let wait = parse(&later).unwrap();
        assert!(
            (Duration::from_secs(29)..=Duration::from_secs(30)).contains(&wait),
            "{wait:?}"
        );
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse(&earlier), Some(Duration::ZERO));
        assert_eq!(parse("soon"), None);
        assert_eq!(parse("-5"), None);
    }
}
