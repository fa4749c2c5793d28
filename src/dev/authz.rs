//! The development authorization server's web layer: OIDC discovery, JWKS,
//! CIBA bc-authorize and token endpoints (poll mode), and the approver page
//! with the small JSON API its buttons use.
//!
//! DEVELOPMENT ONLY. The client secret is a published constant, the signing
//! key lives in memory, and whoever can open the approver page can approve
//! any user's requests. It is strict all the same: the gateway's CIBA client
//! should meet the same refusals here as at a real provider, so every
//! parameter is checked and every error is an RFC 6749 JSON error.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::ciba_state::{self, CibaState, DecideError, NewRequest, PollResult};
use super::keys::SigningKey;
use crate::demo::shop::SHOP_AUDIENCE;

/// The one client the development server knows. Both values are public on
/// purpose: this server must never guard anything real.
pub const DEV_CLIENT_ID: &str = "countersign-dev";
pub const DEV_CLIENT_SECRET: &str = "countersign-dev-secret";

const CIBA_GRANT_TYPE: &str = "urn:openid:params:grant-type:ciba";
/// Form bodies are small; anything bigger is not a CIBA request.
const MAX_FORM_BYTES: usize = 32 * 1024;

const PAGE_HTML: &str = include_str!("page.html");
const PAGE_CSS: &str = include_str!("page.css");
const PAGE_JS: &str = include_str!("page.js");

/// How the development authorization server behaves.
#[derive(Debug, Clone)]
pub struct AuthzOptions {
    /// Subjects that exist; any other `login_hint` is `unknown_user_id`.
    pub users: Vec<String>,
    /// APIs tokens may be issued for (`audience` / `resource`).
    pub audiences: Vec<String>,
    /// The polling interval announced to clients and enforced.
    pub interval: Duration,
    /// `expires_in` when the client sends no `requested_expiry`.
    pub default_expiry: Duration,
    /// The cap on `requested_expiry`.
    pub max_expiry: Duration,
    /// Lifetime of issued access tokens.
    pub token_lifetime: Duration,
}

impl Default for AuthzOptions {
    fn default() -> Self {
        Self {
            users: vec!["alice".into(), "bob".into()],
            audiences: vec![SHOP_AUDIENCE.into()],
            interval: Duration::from_secs(2),
            default_expiry: Duration::from_secs(300),
            max_expiry: Duration::from_secs(600),
            token_lifetime: Duration::from_secs(300),
        }
    }
}

#[derive(Debug)]
struct Authz {
    issuer: String,
    jwks_uri: url::Url,
    options: AuthzOptions,
    key: SigningKey,
    state: Mutex<CibaState>,
    /// `Host` values accepted when bound to loopback, against DNS rebinding:
    /// a web page the person visits must not be able to read or press the
    /// approver page's API through a name that resolves to 127.0.0.1.
    allowed_hosts: Option<Vec<String>>,
}

impl Authz {
    fn state(&self) -> MutexGuard<'_, CibaState> {
        // The state is consistent after every method, so a panic elsewhere
        // while holding the lock leaves nothing half-done.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running development authorization server.
#[derive(Debug, Clone)]
pub struct DevAuthz {
    inner: Arc<Authz>,
    pub addr: SocketAddr,
}

/// One request as tests see it.
#[derive(Debug, Clone, Serialize)]
pub struct RequestInfo {
    /// The approver page's handle.
    pub id: String,
    pub subject: String,
    pub client_id: String,
    pub binding_message: String,
    pub scopes: Vec<String>,
    pub audience: Option<String>,
    pub authorization_details: Option<Value>,
    pub expires_in_s: u64,
    /// `pending`, `approved`, `denied` or `expired`.
    pub state: &'static str,
    pub interval_s: u64,
    pub polls: u32,
    pub slow_downs: u32,
    /// When each poll came, in ms after bc-authorize.
    pub poll_offsets_ms: Vec<u64>,
}

impl DevAuthz {
    pub fn issuer(&self) -> &str {
        &self.inner.issuer
    }

    pub fn jwks_uri(&self) -> url::Url {
        self.inner.jwks_uri.clone()
    }

    /// The approver page for `user`.
    pub fn approver_url(&self, user: &str) -> String {
        let user: String = url::form_urlencoded::byte_serialize(user.as_bytes()).collect();
        format!("{}/approve?user={user}", self.inner.issuer)
    }

    /// Every request so far, oldest first (a test hook).
    pub fn requests(&self) -> Vec<RequestInfo> {
        let now = Instant::now();
        let state = self.inner.state();
        state
            .all()
            .into_iter()
            .map(|r| RequestInfo {
                id: r.id.clone(),
                subject: r.request.subject.clone(),
                client_id: r.request.client_id.clone(),
                binding_message: r.request.binding_message.clone(),
                scopes: r.request.scopes.clone(),
                audience: r.request.audience.clone(),
                authorization_details: r.request.authorization_details.clone(),
                expires_in_s: r.request.expires_in.as_secs(),
                state: r.state_label(now),
                interval_s: r.interval.as_secs(),
                polls: r.polls,
                slow_downs: r.slow_downs,
                poll_offsets_ms: r
                    .poll_offsets
                    .iter()
                    .map(|d| d.as_millis() as u64)
                    .collect(),
            })
            .collect()
    }

    /// Makes the next poll of request `id` get `slow_down` (a test hook).
    pub fn force_slow_down(&self, id: &str) -> bool {
        self.inner.state().force_slow_down(id)
    }
}

/// Serves the development authorization server on `listener` until the
/// runtime stops. Generates its signing key first (a moment of CPU).
pub async fn serve(
    listener: tokio::net::TcpListener,
    options: AuthzOptions,
) -> std::io::Result<DevAuthz> {
    let addr = listener.local_addr()?;
    let shown = if addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    };
    let issuer = format!("http://{shown}");
    let jwks_uri = url::Url::parse(&format!("{issuer}/.well-known/jwks.json"))
        .map_err(std::io::Error::other)?;
    let allowed_hosts = addr.ip().is_loopback().then(|| {
        let port = addr.port();
        vec![
            format!("127.0.0.1:{port}"),
            format!("localhost:{port}"),
            format!("[::1]:{port}"),
        ]
    });
    let key = tokio::task::spawn_blocking(SigningKey::generate)
        .await
        .map_err(std::io::Error::other)?
        .map_err(std::io::Error::other)?;
    let inner = Arc::new(Authz {
        issuer,
        jwks_uri,
        state: Mutex::new(CibaState::new(options.interval)),
        options,
        key,
        allowed_hosts,
    });
    let app = Router::new()
        .route("/.well-known/openid-configuration", get(discovery))
        .route("/.well-known/jwks.json", get(jwks))
        .route("/bc-authorize", post(bc_authorize))
        .route("/oauth/token", post(token))
        .route("/", get(|| async { Redirect::to("/approve") }))
        .route("/approve", get(page))
        .route("/approve.css", get(css))
        .route("/approve.js", get(js))
        .route("/api/requests", get(list_requests))
        .route("/api/requests/{id}/{action}", post(decide))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_FORM_BYTES))
        .layer(middleware::from_fn_with_state(inner.clone(), check_host))
        .with_state(inner.clone());
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(%error, "development authorization server stopped");
        }
    });
    Ok(DevAuthz { inner, addr })
}

async fn check_host(State(authz): State<Arc<Authz>>, request: Request, next: Next) -> Response {
    if let Some(allowed) = &authz.allowed_hosts {
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_ascii_lowercase();
        if !allowed.contains(&host) {
            return OAuthError::new(
                StatusCode::MISDIRECTED_REQUEST,
                "invalid_request",
                "this development server answers only to 127.0.0.1, localhost and [::1]",
            )
            .into_response();
        }
    }
    next.run(request).await
}

// ---------------------------------------------------------------------------
// errors
// ---------------------------------------------------------------------------

/// An RFC 6749 section 5.2 error answer.
#[derive(Debug)]
struct OAuthError {
    status: StatusCode,
    error: &'static str,
    description: String,
    /// The `interval` Auth0 adds to `slow_down`.
    interval: Option<u64>,
    /// `WWW-Authenticate` for a failed HTTP Basic authentication.
    basic_challenge: bool,
}

impl OAuthError {
    fn new(status: StatusCode, error: &'static str, description: impl Into<String>) -> Self {
        Self {
            status,
            error,
            description: description.into(),
            interval: None,
            basic_challenge: false,
        }
    }

    fn bad(error: &'static str, description: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, error, description)
    }

    fn request(description: impl Into<String>) -> Self {
        Self::bad("invalid_request", description)
    }
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.error, "error_description": self.description });
        if let Some(interval) = self.interval {
            body["interval"] = interval.into();
        }
        let mut response = (self.status, no_store(), Json(body)).into_response();
        if self.basic_challenge {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"countersign-dev\""),
            );
        }
        response
    }
}

fn no_store() -> [(header::HeaderName, &'static str); 2] {
    [
        (header::CACHE_CONTROL, "no-store"),
        (header::PRAGMA, "no-cache"),
    ]
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({ "error": "not_found", "error_description": "no such endpoint" })),
    )
        .into_response()
}

// ---------------------------------------------------------------------------
// discovery and keys
// ---------------------------------------------------------------------------

async fn discovery(State(authz): State<Arc<Authz>>) -> Response {
    let issuer = &authz.issuer;
    Json(json!({
        "issuer": issuer,
        "backchannel_authentication_endpoint": format!("{issuer}/bc-authorize"),
        "token_endpoint": format!("{issuer}/oauth/token"),
        "jwks_uri": format!("{issuer}/.well-known/jwks.json"),
        "grant_types_supported": [CIBA_GRANT_TYPE],
        "backchannel_token_delivery_modes_supported": ["poll"],
        "backchannel_user_code_parameter_supported": false,
        "token_endpoint_auth_methods_supported": ["client_secret_post", "client_secret_basic"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "response_types_supported": [],
        "subject_types_supported": ["public"],
        "scopes_supported": ["openid"],
        "authorization_details_types_supported": ["product_purchase", "countersign_call"],
        "dpop_signing_alg_values_supported": ["ES256", "EdDSA"],
        "service_documentation": "countersign dev: DEVELOPMENT ONLY",
    }))
    .into_response()
}

async fn jwks(State(authz): State<Arc<Authz>>) -> Response {
    Json(authz.key.jwks()).into_response()
}

// ---------------------------------------------------------------------------
// forms and client authentication
// ---------------------------------------------------------------------------

/// A form body with every parameter at most once (RFC 6749 section 3.1);
/// empty values count as absent.
fn parse_form(headers: &HeaderMap, body: &[u8]) -> Result<HashMap<String, String>, OAuthError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    if !essence.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        return Err(OAuthError::request(
            "the body must be application/x-www-form-urlencoded",
        ));
    }
    let mut form = HashMap::new();
    for (key, value) in url::form_urlencoded::parse(body) {
        if value.is_empty() {
            continue;
        }
        if form.insert(key.to_string(), value.to_string()).is_some() {
            return Err(OAuthError::request(format!(
                "parameter {key} is given more than once"
            )));
        }
    }
    Ok(form)
}

/// What both endpoints start with: the form, and the client it authenticates.
fn client_form(
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(HashMap<String, String>, String), OAuthError> {
    let form = parse_form(headers, body)?;
    let client_id = authenticate(headers, &form)?;
    Ok((form, client_id))
}

/// Checks client_secret_basic or client_secret_post (never both) and
/// returns the client id.
fn authenticate(headers: &HeaderMap, form: &HashMap<String, String>) -> Result<String, OAuthError> {
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("basic").then(|| rest.trim())
        });
    let unauthorized = |basic: bool| OAuthError {
        basic_challenge: basic,
        ..OAuthError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "client authentication failed",
        )
    };
    let (client_id, secret, used_basic) = match basic {
        Some(encoded) => {
            if form.contains_key("client_secret") {
                return Err(OAuthError::request(
                    "use one client authentication method, not both",
                ));
            }
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| unauthorized(true))?;
            let (id, secret) = decoded.split_once(':').ok_or_else(|| unauthorized(true))?;
            // RFC 6749 section 2.3.1: both parts are form-urlencoded.
            let decode = |s: &str| -> String {
                url::form_urlencoded::parse(format!("x={s}").as_bytes())
                    .next()
                    .map(|(_, v)| v.into_owned())
                    .unwrap_or_default()
            };
            let (id, secret) = (decode(id), decode(secret));
            if form.get("client_id").is_some_and(|f| *f != id) {
                return Err(OAuthError::request(
                    "client_id in the body differs from the authenticated client",
                ));
            }
            (id, secret, true)
        }
        None => match (form.get("client_id"), form.get("client_secret")) {
            (Some(id), Some(secret)) => (id.clone(), secret.clone(), false),
            _ => return Err(unauthorized(false)),
        },
    };
    let id_ok = constant_time_eq(client_id.as_bytes(), DEV_CLIENT_ID.as_bytes());
    let secret_ok = constant_time_eq(secret.as_bytes(), DEV_CLIENT_SECRET.as_bytes());
    if id_ok && secret_ok {
        Ok(client_id)
    } else {
        Err(unauthorized(used_basic))
    }
}

/// The habit that matters with real secrets, kept even for a public one.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

// ---------------------------------------------------------------------------
// bc-authorize
// ---------------------------------------------------------------------------

#[derive(Deserialize)]
struct IssSubHint {
    format: String,
    iss: String,
    sub: String,
}

/// A plain subject, or Auth0's `{"format":"iss_sub","iss":...,"sub":...}`.
fn subject_of(hint: &str, authz: &Authz) -> Result<String, OAuthError> {
    let unknown = || OAuthError::bad("unknown_user_id", "the login_hint names no known user");
    let subject = if hint.trim_start().starts_with('{') {
        let parsed: IssSubHint = serde_json::from_str(hint).map_err(|_| {
            OAuthError::request("login_hint is not a valid {\"format\":\"iss_sub\"} JSON hint")
        })?;
        if parsed.format != "iss_sub" {
            return Err(OAuthError::request("login_hint format must be iss_sub"));
        }
        if parsed.iss.trim_end_matches('/') != authz.issuer {
            return Err(unknown());
        }
        parsed.sub
    } else {
        hint.to_owned()
    };
    if authz.options.users.contains(&subject) {
        Ok(subject)
    } else {
        Err(unknown())
    }
}

/// RFC 6749 section 3.3 scope tokens; CIBA requires `openid`.
fn scopes_of(form: &HashMap<String, String>) -> Result<Vec<String>, OAuthError> {
    let raw = form
        .get("scope")
        .ok_or_else(|| OAuthError::bad("invalid_scope", "scope is required"))?;
    let mut scopes: Vec<String> = Vec::new();
    for scope in raw.split(' ').filter(|s| !s.is_empty()) {
        if !scope
            .bytes()
            .all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b))
        {
            return Err(OAuthError::bad("invalid_scope", "scope is malformed"));
        }
        if !scopes.iter().any(|s| s == scope) {
            scopes.push(scope.to_owned());
        }
    }
    if !scopes.iter().any(|s| s == "openid") {
        return Err(OAuthError::bad(
            "invalid_scope",
            "scope must include openid",
        ));
    }
    Ok(scopes)
}

/// RFC 9396: a JSON array of objects, each with a string `type`.
fn authorization_details_of(raw: &str) -> Result<Value, OAuthError> {
    let invalid = |why: &str| OAuthError::bad("invalid_authorization_details", why.to_owned());
    let value: Value = serde_json::from_str(raw)
        .map_err(|_| invalid("authorization_details is not valid JSON"))?;
    let entries = value
        .as_array()
        .filter(|a| !a.is_empty())
        .ok_or_else(|| invalid("authorization_details must be a non-empty JSON array"))?;
    for entry in entries {
        let has_type = entry
            .get("type")
            .and_then(Value::as_str)
            .is_some_and(|t| !t.is_empty());
        if !entry.is_object() || !has_type {
            return Err(invalid(
                "every authorization_details entry is an object with a string type",
            ));
        }
    }
    Ok(value)
}

fn validate_authorize(
    authz: &Authz,
    client_id: String,
    form: &HashMap<String, String>,
) -> Result<NewRequest, OAuthError> {
    let scopes = scopes_of(form)?;
    if form.contains_key("login_hint_token") || form.contains_key("id_token_hint") {
        return Err(OAuthError::request(
            "this development server supports login_hint only",
        ));
    }
    if form.contains_key("client_notification_token") {
        return Err(OAuthError::request(
            "this client is registered for poll mode; client_notification_token is not used",
        ));
    }
    let hint = form
        .get("login_hint")
        .ok_or_else(|| OAuthError::request("login_hint is required"))?;
    let subject = subject_of(hint, authz)?;
    let binding_message = form
        .get("binding_message")
        .ok_or_else(|| OAuthError::bad("invalid_binding_message", "binding_message is required"))?;
    ciba_state::check_binding_message(binding_message)
        .map_err(|why| OAuthError::bad("invalid_binding_message", why))?;
    let audience = match (form.get("resource"), form.get("audience")) {
        (Some(r), Some(a)) if r != a => {
            return Err(OAuthError::request("resource and audience differ"))
        }
        (Some(one), _) | (None, Some(one)) => Some(one.clone()),
        (None, None) => None,
    };
    if let Some(audience) = &audience {
        if !authz.options.audiences.contains(audience) {
            return Err(OAuthError::bad(
                "invalid_target",
                "the requested audience is not an API this server issues tokens for",
            ));
        }
    }
    let authorization_details = form
        .get("authorization_details")
        .map(|raw| authorization_details_of(raw))
        .transpose()?;
    let expires_in = match form.get("requested_expiry") {
        None => authz.options.default_expiry,
        Some(raw) => match raw.parse::<u64>() {
            Ok(secs) if secs > 0 => Duration::from_secs(secs).min(authz.options.max_expiry),
            _ => {
                return Err(OAuthError::request(
                    "requested_expiry must be a positive whole number of seconds",
                ))
            }
        },
    };
    Ok(NewRequest {
        client_id,
        subject,
        binding_message: binding_message.clone(),
        scopes,
        audience,
        authorization_details,
        expires_in,
    })
}

async fn bc_authorize(
    State(authz): State<Arc<Authz>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, OAuthError> {
    let (form, client_id) = client_form(&headers, &body)?;
    let request = validate_authorize(&authz, client_id, &form)?;
    let (user, message) = (request.subject.clone(), request.binding_message.clone());
    let ticket = authz.state().authorize(request, Instant::now());
    tracing::info!(
        %user,
        binding_message = %message,
        expires_in_s = ticket.expires_in.as_secs(),
        "approval requested: open the approver page to answer"
    );
    Ok((
        no_store(),
        Json(json!({
            "auth_req_id": ticket.auth_req_id,
            "expires_in": ticket.expires_in.as_secs(),
            "interval": ticket.interval.as_secs(),
        })),
    )
        .into_response())
}

// ---------------------------------------------------------------------------
// token
// ---------------------------------------------------------------------------

#[derive(Serialize)]
struct AccessClaims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: String,
    scope: String,
    client_id: &'a str,
    iat: u64,
    exp: u64,
    jti: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    authorization_details: Option<&'a Value>,
    /// RFC 9449: the key a DPoP token is bound to.
    #[serde(skip_serializing_if = "Option::is_none")]
    cnf: Option<Value>,
}

#[derive(Serialize)]
struct IdClaims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
}

/// The key thumbprint a DPoP proof for a token request to `token_url`
/// proves possession of (RFC 9449 section 4.3, without nonces or `jti`
/// replay: a development server).
fn dpop_thumbprint(proof: &str, token_url: &str) -> Result<String, OAuthError> {
    use jsonwebtoken::{Algorithm, DecodingKey, Validation};
    let invalid = |why: &str| OAuthError::bad("invalid_dpop_proof", why.to_owned());
    let header =
        jsonwebtoken::decode_header(proof).map_err(|_| invalid("the DPoP proof is not a JWT"))?;
    if header.typ.as_deref() != Some("dpop+jwt") {
        return Err(invalid("the DPoP proof's typ must be dpop+jwt"));
    }
    if !matches!(header.alg, Algorithm::ES256 | Algorithm::EdDSA) {
        return Err(invalid("the DPoP proof must be signed with ES256 or EdDSA"));
    }
    let jwk = header
        .jwk
        .ok_or_else(|| invalid("the DPoP proof carries no jwk"))?;
    let public = serde_json::to_value(&jwk).unwrap_or_default();
    if public.get("d").is_some() {
        return Err(invalid("the DPoP proof's jwk is a private key"));
    }
    let key =
        DecodingKey::from_jwk(&jwk).map_err(|_| invalid("the DPoP proof's jwk is unusable"))?;
    let mut validation = Validation::new(header.alg);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_aud = false;
    let claims = jsonwebtoken::decode::<Value>(proof, &key, &validation)
        .map_err(|_| invalid("the DPoP proof's signature does not verify"))?
        .claims;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let fresh = claims["iat"]
        .as_u64()
        .is_some_and(|iat| iat.abs_diff(now) <= 60);
    if claims["htm"] != "POST" || claims["htu"] != token_url || !fresh {
        return Err(invalid(
            "the DPoP proof is not for a POST to this token endpoint, now",
        ));
    }
    crate::dpop::thumbprint_of(&public)
        .ok_or_else(|| invalid("the DPoP proof's jwk is not EC or OKP"))
}

fn issue_tokens(
    authz: &Authz,
    granted: &NewRequest,
    bound_to: Option<String>,
) -> Result<Response, OAuthError> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let lifetime = authz.options.token_lifetime.as_secs();
    let scope = granted.scopes.join(" ");
    let access = AccessClaims {
        iss: &authz.issuer,
        sub: &granted.subject,
        aud: granted
            .audience
            .clone()
            .unwrap_or_else(|| format!("{}/userinfo", authz.issuer)),
        scope: scope.clone(),
        client_id: &granted.client_id,
        iat: now,
        exp: now + lifetime,
        jti: uuid::Uuid::new_v4().to_string(),
        authorization_details: granted.authorization_details.as_ref(),
        cnf: bound_to.as_ref().map(|jkt| json!({ "jkt": jkt })),
    };
    let id = IdClaims {
        iss: &authz.issuer,
        sub: &granted.subject,
        aud: &granted.client_id,
        iat: now,
        exp: now + lifetime,
    };
    let signed = authz
        .key
        .sign("at+jwt", &access)
        .and_then(|at| Ok((at, authz.key.sign("JWT", &id)?)));
    let (access_token, id_token) = signed.map_err(|why| {
        tracing::error!(%why, "cannot sign tokens");
        OAuthError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "tokens could not be issued",
        )
    })?;
    let mut body = json!({
        "access_token": access_token,
        "token_type": if bound_to.is_some() { "DPoP" } else { "Bearer" },
        "expires_in": lifetime,
        "scope": scope,
        "id_token": id_token,
    });
    if let Some(details) = &granted.authorization_details {
        body["authorization_details"] = details.clone();
    }
    Ok((no_store(), Json(body)).into_response())
}

async fn token(
    State(authz): State<Arc<Authz>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, OAuthError> {
    let (form, client_id) = client_form(&headers, &body)?;
    match form.get("grant_type").map(String::as_str) {
        Some(CIBA_GRANT_TYPE) => {}
        Some(_) => {
            return Err(OAuthError::bad(
                "unsupported_grant_type",
                "only the CIBA grant is supported",
            ))
        }
        None => return Err(OAuthError::request("grant_type is required")),
    }
    let auth_req_id = form
        .get("auth_req_id")
        .ok_or_else(|| OAuthError::request("auth_req_id is required"))?;
    // RFC 9449: a proof makes the token a DPoP token bound to its key.
    let mut proofs = headers.get_all("dpop").iter();
    let bound_to = match (proofs.next(), proofs.next()) {
        (None, _) => None,
        (Some(proof), None) => Some(dpop_thumbprint(
            proof.to_str().unwrap_or_default(),
            &format!("{}/oauth/token", authz.issuer),
        )?),
        (Some(_), Some(_)) => {
            return Err(OAuthError::bad(
                "invalid_dpop_proof",
                "send one DPoP header",
            ))
        }
    };
    let result = authz.state().poll(&client_id, auth_req_id, Instant::now());
    match result {
        PollResult::Granted(granted) => {
            tracing::info!(user = %granted.subject, dpop = bound_to.is_some(), "approved request redeemed; token issued");
            issue_tokens(&authz, &granted, bound_to)
        }
        PollResult::Pending => Err(OAuthError::bad(
            "authorization_pending",
            "the user has not answered yet",
        )),
        PollResult::SlowDown { interval } => {
            tracing::warn!(
                interval_s = interval.as_secs(),
                "a client polled faster than the interval: slow_down"
            );
            Err(OAuthError {
                interval: Some(interval.as_secs()),
                ..OAuthError::bad(
                    "slow_down",
                    format!("poll at most every {} s", interval.as_secs()),
                )
            })
        }
        PollResult::Denied => Err(OAuthError::bad(
            "access_denied",
            "the user denied the request",
        )),
        PollResult::Expired => Err(OAuthError::bad(
            "expired_token",
            "the request expired before it was approved",
        )),
        PollResult::InvalidGrant => Err(OAuthError::bad(
            "invalid_grant",
            "auth_req_id is unknown, already used, or another client's",
        )),
    }
}

// ---------------------------------------------------------------------------
// the approver page and its API
// ---------------------------------------------------------------------------

/// The page's resources may come from this server only; agent-supplied
/// text is inserted as text, never as markup.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-store"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        body,
    )
        .into_response()
}

async fn page() -> Response {
    asset("text/html; charset=utf-8", PAGE_HTML)
}

async fn css() -> Response {
    asset("text/css; charset=utf-8", PAGE_CSS)
}

async fn js() -> Response {
    asset("text/javascript; charset=utf-8", PAGE_JS)
}

#[derive(Deserialize)]
struct UserQuery {
    #[serde(default)]
    user: Option<String>,
}

async fn list_requests(
    State(authz): State<Arc<Authz>>,
    Query(query): Query<UserQuery>,
) -> Response {
    let users = &authz.options.users;
    let user = match query.user.filter(|u| !u.is_empty()) {
        Some(user) if users.contains(&user) => user,
        Some(_) => {
            return (
                StatusCode::NOT_FOUND,
                no_store(),
                Json(json!({ "error": "unknown_user", "users": users })),
            )
                .into_response()
        }
        None => users.first().cloned().unwrap_or_default(),
    };
    let now = Instant::now();
    let state = authz.state();
    let everyone = state.all();
    let requests: Vec<Value> = state
        .for_subject(&user, now)
        .into_iter()
        .map(|r| {
            json!({
                "id": r.id,
                "state": r.state_label(now),
                "binding_message": r.request.binding_message,
                "scopes": r.request.scopes,
                "audience": r.request.audience,
                "authorization_details": r.request.authorization_details,
                "client_id": r.request.client_id,
                "expires_in_ms": r.expires_at.saturating_duration_since(now).as_millis() as u64,
                "also_asked": also_asked(r, &everyone, now),
            })
        })
        .collect();
    drop(state);
    (
        no_store(),
        Json(json!({
            "development_only": true,
            "user": user,
            "users": users,
            "requests": requests,
        })),
    )
        .into_response()
}

/// The approval id of the call a request is bound to: its
/// `countersign_call` entry (docs/call-binding.md), if it has one.
fn bound_call(request: &ciba_state::Request) -> Option<&str> {
    request
        .request
        .authorization_details
        .as_ref()?
        .as_array()?
        .iter()
        .find(|entry| entry["type"] == "countersign_call")?
        .get("approval")?
        .as_str()
}

/// Who else was asked to approve the very same call (four eyes: a gateway
/// asks the person and each countersigner with the same `countersign_call`
/// entry), with where their answer stands. Only what this server saw: the
/// entry does not say who is the person and who countersigns.
fn also_asked(
    request: &ciba_state::Request,
    everyone: &[&ciba_state::Request],
    now: Instant,
) -> Vec<Value> {
    let Some(call) = bound_call(request) else {
        return Vec::new();
    };
    everyone
        .iter()
        .filter(|other| {
            other.id != request.id
                && other.request.subject != request.request.subject
                && other.request.client_id == request.request.client_id
                && bound_call(other) == Some(call)
        })
        .map(|other| json!({ "subject": other.request.subject, "state": other.state_label(now) }))
        .collect()
}

async fn decide(
    State(authz): State<Arc<Authz>>,
    Path((id, action)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let approve = match action.as_str() {
        "approve" => true,
        "deny" => false,
        _ => return not_found().await,
    };
    // A cross-site form cannot send JSON without a CORS preflight, which
    // this server never grants: only the page itself (or a test) can press.
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Json(json!({ "error": "send Content-Type: application/json" })),
        )
            .into_response();
    }
    let now = Instant::now();
    let mut state = authz.state();
    let result = state.decide(&id, approve, now);
    let who = state
        .all()
        .into_iter()
        .find(|r| r.id == id)
        .map(|r| (r.request.subject.clone(), r.request.binding_message.clone()));
    drop(state);
    match result {
        Ok(()) => {
            let decision = if approve { "approved" } else { "denied" };
            if let Some((user, message)) = who {
                tracing::info!(%user, binding_message = %message, decision, "the approver answered");
            }
            (no_store(), Json(json!({ "state": decision }))).into_response()
        }
        Err(DecideError::NotFound) => (
            StatusCode::NOT_FOUND,
            Json(json!({ "error": "no such request" })),
        )
            .into_response(),
        Err(DecideError::Expired) => (
            StatusCode::CONFLICT,
            Json(json!({ "error": "expired", "state": "expired" })),
        )
            .into_response(),
        Err(DecideError::AlreadyDecided) => (
            StatusCode::CONFLICT,
            Json(json!({ "error": "already answered" })),
        )
            .into_response(),
    }
}
