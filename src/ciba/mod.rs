//! The OpenID CIBA client (poll and ping modes; ping mode's endpoint is
//! `approval::notification`, above the engine it wakes): discovery, the backchannel
//! authentication request and token polling. It speaks the protocol and
//! classifies answers; deciding what to do next is the approval state
//! machine's job.

mod auth;
#[cfg(test)]
pub(crate) mod test_server;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::Value;
use thiserror::Error;
use url::Url;

pub use auth::ClientAuth;

use crate::config::{AudienceParameter, AuthorizationServerConfig, LoginHintFormat, TokenBinding};
use crate::dpop::DpopKey;
use crate::metrics::Metrics;
use crate::secret::Secret;

const CIBA_GRANT_TYPE: &str = "urn:openid:params:grant-type:ciba";

/// The largest bc-authorize or token response read; a larger one is an error.
pub const MAX_CIBA_RESPONSE_BYTES: usize = 64 * 1024;
/// The largest discovery document or JWKS read; a larger one is an error.
pub const MAX_METADATA_BYTES: usize = 1024 * 1024;

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

/// [`resolve_endpoints`], retrying for `config.startup_wait` while the
/// authorization server cannot be reached, with a line each time saying so.
/// A server that answers wrongly fails at once.
pub async fn resolve_endpoints_patiently(
    http: &reqwest::Client,
    config: &AuthorizationServerConfig,
) -> Result<Endpoints, CibaError> {
    let deadline = tokio::time::Instant::now() + config.startup_wait;
    let mut pause = Duration::from_millis(250);
    loop {
        match resolve_endpoints(http, config).await {
            Err(CibaError::Unavailable { reason, .. })
                if tokio::time::Instant::now() + pause < deadline =>
            {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                tracing::warn!(
                    %reason,
                    retry_in = ?pause,
                    gives_up_in = %format!("{}s", left.as_secs()),
                    "authorization server not reachable yet; retrying discovery"
                );
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            Err(CibaError::Unavailable {
                reason,
                retry_after,
            }) if !config.startup_wait.is_zero() => {
                return Err(CibaError::Unavailable {
                    reason: format!(
                    "{reason}; still not reachable after {}s (authorization_server.startup_wait)",
                    config.startup_wait.as_secs()
                ),
                    retry_after,
                })
            }
            other => return other,
        }
    }
}

/// The innermost error of a chain: reqwest's own text repeats the URL the
/// caller already names.
fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
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
        .map_err(|e| unavailable(format!("discovery at {url}: {}", root_cause(&e))))?;
    let status = response.status();
    if status.is_redirection() {
        return Err(CibaError::Protocol(format!(
            "discovery at {url}: HTTP {status}; redirects are not followed"
        )));
    }
    if !status.is_success() {
        return Err(unavailable(format!("discovery at {url}: HTTP {status}")));
    }
    let body = read_limited(response, MAX_METADATA_BYTES)
        .await
        .map_err(|e| CibaError::Protocol(format!("discovery at {url}: {e}")))?;
    let discovery: Discovery = serde_json::from_slice(&body)
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
    /// Ping mode: the bearer token the server must send with its
    /// notification about this request (fresh per request).
    pub client_notification_token: Option<&'a Secret>,
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
    /// Issued as a DPoP token (bound to the gateway's key), not a bearer one.
    pub dpop: bool,
}

#[derive(Deserialize)]
struct TokenBody {
    access_token: String,
    /// Required by RFC 6749; only `Bearer` can be forwarded as it is.
    token_type: String,
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

impl PollAnswer {
    /// The answer's kind, for a span (never the token or a reason).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::SlowDown => "slow_down",
            Self::Approved(_) => "approved",
            Self::Denied => "denied",
            Self::Expired => "expired",
            Self::Unavailable { .. } => "unavailable",
            Self::Unreachable { .. } => "unreachable",
            Self::Failed(_) => "failed",
        }
    }
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
    /// With `token_binding: dpop`: the key the tokens are bound to.
    dpop: Option<Arc<DpopKey>>,
}

impl CibaClient {
    pub fn new(
        http: reqwest::Client,
        endpoints: Endpoints,
        config: &AuthorizationServerConfig,
        metrics: Metrics,
    ) -> Result<Self, CibaError> {
        let auth = ClientAuth::from_config(&config.client_auth, &endpoints.issuer)?;
        let dpop = match (config.token_binding, &config.dpop_key) {
            (TokenBinding::Dpop, Some(pem)) => Some(Arc::new(
                DpopKey::from_pem(pem.0.expose()).map_err(CibaError::Config)?,
            )),
            (TokenBinding::Dpop, None) => {
                return Err(CibaError::Config(
                    "token_binding: dpop needs dpop_key".into(),
                ))
            }
            (TokenBinding::Bearer, _) => None,
        };
        Ok(Self {
            dpop,
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

    /// The key tokens are bound to, with `token_binding: dpop`.
    pub fn dpop(&self) -> Option<&Arc<DpopKey>> {
        self.dpop.as_ref()
    }

    /// The client that talks to the authorization server (and its JWKS).
    pub fn http(&self) -> &reqwest::Client {
        &self.http
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
        if let Some(token) = request.client_notification_token {
            form.push(("client_notification_token", token.expose().to_owned()));
        }
        let result = self
            .post_form(
                self.endpoints.backchannel_authentication.clone(),
                form,
                None,
            )
            .await;
        let (status, body, retry_after) = match result {
            Ok(parts) => parts,
            Err(error) => {
                let result = match error {
                    CibaError::Unavailable { .. } => "unavailable",
                    CibaError::Protocol(_) => "invalid_response",
                    _ => "error",
                };
                self.record("backchannel_authentication", result);
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
        let proof = self
            .dpop
            .as_ref()
            .map(|key| key.proof("POST", self.endpoints.token.as_str(), None, true));
        let (status, body, retry_after) = match self
            .post_form(self.endpoints.token.clone(), form, proof)
            .await
        {
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
            // The grant may be spent now: anything short of a usable token
            // fails the approval; polling again could only say invalid_grant.
            // A DPoP token is usable only by the key it is bound to; a bearer
            // token where DPoP was asked for is refused at the forward.
            let dpop_type = |t: &str| self.dpop.is_some() && t.eq_ignore_ascii_case("dpop");
            return match serde_json::from_slice::<TokenBody>(&body) {
                Ok(token)
                    if token.token_type.eq_ignore_ascii_case("bearer")
                        || dpop_type(&token.token_type) =>
                {
                    self.record("token", "approved");
                    PollAnswer::Approved(Grant {
                        dpop: dpop_type(&token.token_type),
                        access_token: Secret::new(token.access_token),
                        scope: token.scope,
                    })
                }
                Ok(token) => {
                    self.record("token", "invalid_response");
                    PollAnswer::Failed(CibaError::Protocol(format!(
                        "token response: token_type {:?} is not {}",
                        token.token_type,
                        if self.dpop.is_some() {
                            "DPoP or Bearer"
                        } else {
                            "Bearer"
                        }
                    )))
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
            // The nonce it wants is remembered (post_form); the next poll
            // carries it.
            "use_dpop_nonce" if self.dpop.is_some() => ("use_dpop_nonce", PollAnswer::Pending),
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

    /// Sends one form POST and reads its answer (at most
    /// [`MAX_CIBA_RESPONSE_BYTES`]). A failure to get any answer is
    /// [`CibaError::Unavailable`]; a redirect, an oversized body or an
    /// unreadable body of a success is [`CibaError::Protocol`].
    async fn post_form(
        &self,
        url: Url,
        mut form: Vec<(&'static str, String)>,
        dpop_proof: Option<String>,
    ) -> Result<(StatusCode, Vec<u8>, Option<Duration>), CibaError> {
        let mut request = self.http.post(url);
        if let Some(proof) = dpop_proof {
            request = request.header("dpop", proof);
        }
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
        if let (Some(key), Some(nonce)) = (
            &self.dpop,
            response
                .headers()
                .get("dpop-nonce")
                .and_then(|v| v.to_str().ok()),
        ) {
            key.remember_nonce(nonce);
        }
        if status.is_redirection() {
            return Err(CibaError::Protocol(format!(
                "HTTP {status} from {}; redirects are not followed",
                response.url().path()
            )));
        }
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let body = match read_limited(response, MAX_CIBA_RESPONSE_BYTES).await {
            Ok(body) => body,
            Err(BodyError::Read(reason)) if !status.is_success() => {
                return Err(CibaError::Unavailable {
                    reason,
                    retry_after,
                })
            }
            Err(error) => return Err(CibaError::Protocol(format!("HTTP {status}: {error}"))),
        };
        Ok((status, body, retry_after))
    }
}

/// Why a response body was not read.
#[derive(Debug, Error)]
pub(crate) enum BodyError {
    #[error("the response body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("the response body could not be read: {0}")]
    Read(String),
}

/// Reads a response body incrementally, refusing it once it passes `limit`
/// bytes (or announces more in `Content-Length`).
pub(crate) async fn read_limited(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, BodyError> {
    if response
        .content_length()
        .is_some_and(|length| length > limit as u64)
    {
        return Err(BodyError::TooLarge(limit));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| BodyError::Read(e.without_url().to_string()))?
    {
        if chunk.len() > limit - body.len() {
            return Err(BodyError::TooLarge(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
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

fn is_unavailable(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
}

fn parse_error(status: StatusCode, body: &[u8]) -> ErrorBody {
    serde_json::from_slice(body).unwrap_or_else(|_| ErrorBody {
        error: format!("http_{}", status.as_u16()),
        error_description: None,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use serde_json::json;

    use super::test_server::{self, TestServer};
    use super::*;

    /// Like the gateway's client: redirects are not followed.
    fn http() -> reqwest::Client {
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap()
    }

    fn config(issuer: &str) -> AuthorizationServerConfig {
        let text = format!(
            r#"
listen: {{ proxy: "127.0.0.1:1" }}
upstreams: {{ shop: {{ url: "http://127.0.0.1:1" }} }}
authorization_server:
  issuer: "{issuer}"
  client_id: countersign
  client_auth: {{ method: client_secret_post, client_secret: s3cret }}
identity: {{ static: {{ subject: alice }} }}
policies: []
default_action: pass
"#
        );
        crate::config::load_str(Path::new("test.yaml"), &text)
            .unwrap()
            .gateway
            .authorization_server
    }

    fn client(server: &TestServer) -> CibaClient {
        let issuer = format!("http://{}", server.addr);
        let endpoints = Endpoints {
            issuer: issuer.clone(),
            backchannel_authentication: server.url("/bc-authorize"),
            token: server.url("/token"),
            jwks: None,
        };
        CibaClient::new(http(), endpoints, &config(&issuer), Metrics::new()).unwrap()
    }

    async fn authorize(client: &CibaClient) -> Result<Authorization, CibaError> {
        client
            .authorize(&AuthorizeRequest {
                client_notification_token: None,
                subject: "alice",
                binding_message: "Buy 1 phone",
                scopes: &[],
                audience: None,
                authorization_details: None,
                requested_expiry: None,
            })
            .await
    }

    async fn poll_once(response: Vec<u8>) -> PollAnswer {
        let server = TestServer::start(move |_| response.clone()).await;
        client(&server).poll(&Secret::new("id")).await
    }

    fn token(token_type: &str) -> Value {
        json!({"access_token": "at", "token_type": token_type, "expires_in": 60})
    }

    /// A body past `limit`, without `Content-Length`: read until the
    /// connection closes, so only the incremental count can stop it.
    fn unframed(body: &[u8]) -> Vec<u8> {
        let mut out =
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n"
                .to_vec();
        out.extend_from_slice(body);
        out
    }

    fn padded(mut value: Value, bytes: usize) -> Vec<u8> {
        value["padding"] = Value::String("x".repeat(bytes));
        value.to_string().into_bytes()
    }

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

    #[tokio::test]
    async fn only_a_bearer_token_is_accepted() {
        assert!(matches!(
            poll_once(test_server::json(200, &token("bearer"))).await,
            PollAnswer::Approved(_)
        ));
        for refused in [token("DPoP"), token("N_A"), json!({"access_token": "at"})] {
            let answer = poll_once(test_server::json(200, &refused)).await;
            assert!(
                matches!(answer, PollAnswer::Failed(CibaError::Protocol(_))),
                "{refused}: {answer:?}"
            );
        }
    }

    #[tokio::test]
    async fn an_unreadable_token_response_fails_the_approval() {
        // The grant may be spent: polling again would only say invalid_grant.
        for response in [
            test_server::truncated(&token("Bearer")),
            test_server::response(200, &[], b"{\"access_token\": \"at"),
        ] {
            let answer = poll_once(response).await;
            assert!(
                matches!(answer, PollAnswer::Failed(CibaError::Protocol(_))),
                "{answer:?}"
            );
        }
    }

    #[tokio::test]
    async fn no_answer_is_unreachable_and_a_server_asking_to_wait_is_unavailable() {
        let answer = poll_once(test_server::response(502, &[], b"")).await;
        assert!(
            matches!(answer, PollAnswer::Unreachable { .. }),
            "{answer:?}"
        );
        let answer = poll_once(test_server::response(503, &[("retry-after", "7")], b"")).await;
        assert!(
            matches!(answer, PollAnswer::Unavailable { retry_after: Some(d) } if d == Duration::from_secs(7)),
            "{answer:?}"
        );
        let date = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(20));
        let answer = poll_once(test_server::response(429, &[("retry-after", &date)], b"")).await;
        assert!(
            matches!(answer, PollAnswer::Unavailable { retry_after: Some(d) } if d >= Duration::from_secs(18)),
            "{answer:?}"
        );
        // Nothing listens on the port any more.
        let server = TestServer::start(|_| Vec::new()).await;
        let closed = client(&server);
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead: Url = format!("http://{}/token", port.local_addr().unwrap())
            .parse()
            .unwrap();
        drop(port);
        let closed = CibaClient {
            endpoints: Endpoints {
                token: dead,
                ..closed.endpoints.clone()
            },
            ..closed
        };
        let answer = closed.poll(&Secret::new("id")).await;
        assert!(
            matches!(answer, PollAnswer::Unreachable { .. }),
            "{answer:?}"
        );
    }

    #[tokio::test]
    async fn responses_past_their_size_limit_are_refused() {
        let big = MAX_CIBA_RESPONSE_BYTES + 1;
        let authorized = json!({"auth_req_id": "id", "expires_in": 60});
        for response in [
            test_server::response(200, &[], &padded(authorized.clone(), big)),
            unframed(&padded(authorized.clone(), big)),
        ] {
            let server = TestServer::start(move |_| response.clone()).await;
            let error = authorize(&client(&server)).await.unwrap_err();
            assert!(
                matches!(&error, CibaError::Protocol(m) if m.contains("larger")),
                "{error:?}"
            );
        }
        let within = padded(authorized, MAX_CIBA_RESPONSE_BYTES - 100);
        let server = TestServer::start(move |_| unframed(&within)).await;
        authorize(&client(&server)).await.unwrap();

        for response in [
            test_server::response(200, &[], &padded(token("Bearer"), big)),
            unframed(&padded(token("Bearer"), big)),
        ] {
            let answer = poll_once(response).await;
            assert!(
                matches!(&answer, PollAnswer::Failed(CibaError::Protocol(m)) if m.contains("larger")),
                "{answer:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_discovery_document_past_one_mebibyte_is_refused() {
        for (padding, ok) in [(MAX_METADATA_BYTES + 1, false), (1000, true)] {
            // The document names its own server as the issuer.
            let issuer = Arc::new(std::sync::OnceLock::<String>::new());
            let named = issuer.clone();
            let server = TestServer::start(move |_| {
                let issuer = named.get().unwrap();
                let document = json!({
                    "issuer": issuer,
                    "backchannel_authentication_endpoint": format!("{issuer}/bc-authorize"),
                    "token_endpoint": format!("{issuer}/token"),
                });
                unframed(&padded(document, padding))
            })
            .await;
            issuer.set(format!("http://{}", server.addr)).unwrap();
            let result = resolve_endpoints(&http(), &config(issuer.get().unwrap())).await;
            match (ok, result) {
                (true, Ok(_)) => {}
                (false, Err(CibaError::Protocol(m))) if m.contains("larger") => {}
                (_, other) => panic!("padding {padding}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_redirect_is_an_error() {
        let redirect = test_server::response(307, &[("location", "/elsewhere")], b"");
        let server = TestServer::start(move |_| redirect.clone()).await;
        let client = client(&server);
        let error = authorize(&client).await.unwrap_err();
        assert!(matches!(error, CibaError::Protocol(_)), "{error:?}");
        let answer = client.poll(&Secret::new("id")).await;
        assert!(
            matches!(answer, PollAnswer::Failed(CibaError::Protocol(_))),
            "{answer:?}"
        );
        let error = resolve_endpoints(&http(), &config(&format!("http://{}", server.addr)))
            .await
            .unwrap_err();
        assert!(matches!(error, CibaError::Protocol(_)), "{error:?}");
        assert_eq!(server.hits("/elsewhere"), 0);
    }
}
