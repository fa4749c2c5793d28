//! Strict configuration: every type refuses unknown keys, and values that can
//! be wrong (URLs, templates, upstream names, secrets) are checked while the
//! YAML is parsed, so errors point at a file, line and key.

pub mod env;
mod load;
/// A minimal valid configuration, for unit tests.
#[cfg(test)]
pub(crate) use load::tests::BASE as TEST_CONFIG;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{de, Deserialize, Deserializer};
use url::Url;

pub use env::{SecretText, Text};
pub(crate) use load::parse as parse_yaml;
pub(crate) use load::policy_files;
pub use load::{is_policy_test_file, load, load_embedded, load_str, ConfigError};

use crate::policy::PolicySet;
use crate::route::Routes;
pub use crate::upstream_tls::UpstreamTlsConfig;

/// The whole loaded configuration, policies compiled.
#[derive(Debug)]
pub struct Config {
    pub file: PathBuf,
    pub gateway: GatewayConfig,
    pub policies: PolicySet,
    /// Built from `gateway.routes`; policies were checked against it.
    pub routes: Routes,
    /// The main file's text as loaded: a reload compares the keys that need
    /// a restart against it.
    pub text: String,
    /// Loaded from files only (no embedded policies), so it can be reloaded
    /// from them.
    pub reloadable: bool,
}

/// The main configuration file.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    pub listen: ListenConfig,
    #[schemars(extend("minProperties" = 1))]
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    /// Where calls go. May be omitted when there is exactly one upstream.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    pub authorization_server: AuthorizationServerConfig,
    pub identity: IdentityConfig,
    /// Policy files or directories of `*.yaml`, relative to this file.
    pub policies: Vec<PathBuf>,
    /// Policy files or directories whose policies all run in shadow
    /// (`mode: shadow`): a new set tried next to the live one, recording
    /// what it would do and never asking anyone.
    #[serde(default)]
    pub shadow_policies: Vec<PathBuf>,
    /// What happens to a call no policy matches. Fail closed: `deny` unless set.
    #[serde(default)]
    pub default_action: DefaultAction,
    #[serde(default)]
    pub limits: Limits,
    /// Where approvals are kept. Default: SQLite `countersign.db` beside
    /// this file.
    #[serde(default)]
    pub store: StoreConfig,
    /// Prefix of the status resource of each approval on the proxy
    /// listener (`<prefix>/<id>`); reserved: calls under it never reach an
    /// upstream.
    #[serde(default = "default_approvals_path")]
    pub approvals_path: ApprovalsPath,
    /// Traces (OpenTelemetry, OTLP/HTTP): off unless set.
    #[serde(default)]
    pub traces: Option<TracesConfig>,
}

/// Where and how spans are exported.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TracesConfig {
    /// The collector's OTLP/HTTP endpoint: `http://collector:4318` (spans
    /// go to `/v1/traces` under it) or the full URL of its traces path.
    #[schemars(with = "String")]
    pub endpoint: OtlpEndpoint,
    /// `service.name` of the spans.
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// The share of new traces recorded, 0 to 1; a call that comes with
    /// the agent's `traceparent` follows the agent's sampling decision.
    #[serde(default = "default_sample_ratio")]
    #[schemars(with = "f64", range(min = 0.0, max = 1.0))]
    pub sample_ratio: SampleRatio,
    /// Headers sent with each export (a collector's API key; `${ENV}`
    /// works; never logged).
    #[serde(default)]
    #[schemars(with = "BTreeMap<String, String>")]
    pub headers: BTreeMap<String, SecretText>,
}

fn default_service_name() -> String {
    "countersign".to_owned()
}

fn default_sample_ratio() -> SampleRatio {
    SampleRatio(1.0)
}

/// An `http(s)` URL, with `/v1/traces` when it names no path.
#[derive(Debug, Clone)]
pub struct OtlpEndpoint(pub Url);

impl<'de> Deserialize<'de> for OtlpEndpoint {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = Text::deserialize(d)?.0;
        let mut url = Url::parse(&raw).map_err(|e| de::Error::custom(format!("{raw:?}: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(de::Error::custom(format!(
                "{raw:?}: the OTLP endpoint must be an http or https URL"
            )));
        }
        if url.path() == "/" || url.path().is_empty() {
            url.set_path("/v1/traces");
        }
        Ok(Self(url))
    }
}

/// A share between 0 and 1.
#[derive(Debug, Clone, Copy)]
pub struct SampleRatio(pub f64);

impl<'de> Deserialize<'de> for SampleRatio {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let ratio = f64::deserialize(d)?;
        if !(0.0..=1.0).contains(&ratio) {
            return Err(de::Error::custom(format!(
                "sample_ratio {ratio} is not between 0 and 1"
            )));
        }
        Ok(Self(ratio))
    }
}

/// A reserved path prefix: absolute, canonical, no trailing slash.
#[derive(Debug, Clone)]
pub struct ApprovalsPath(pub String);

fn default_approvals_path() -> ApprovalsPath {
    ApprovalsPath("/.countersign/approvals".to_owned())
}

impl<'de> Deserialize<'de> for ApprovalsPath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        let trimmed = raw.trim_end_matches('/');
        match crate::policy::normalize(trimmed) {
            Ok(path)
                if path.forward == trimmed
                    && trimmed.len() > 1
                    && !trimmed.contains(['%', ';']) =>
            {
                Ok(Self(trimmed.to_owned()))
            }
            _ => Err(de::Error::custom(format!(
                "{raw:?} must be a canonical absolute path such as /.countersign/approvals"
            ))),
        }
    }
}

/// Which store keeps approvals, and for how long.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub backend: StoreBackend,
    /// A retried call that already finished gets its recorded answer for
    /// this long; after it, the same call is a new one. Without an
    /// Idempotency-Key, only until the answer was delivered to an agent.
    pub replay_window: Duration,
    /// How long approvals are kept for the audit trail.
    pub retention: Duration,
    /// How long one gateway's claim to poll an approval lasts; another
    /// replica takes over an approval whose holder died after this.
    pub lease: Duration,
    /// On SIGTERM, how long approved calls already being forwarded may take
    /// to be answered and recorded before the process stops (their leases
    /// are then handed back).
    pub drain_timeout: Duration,
}

#[derive(Debug, Clone)]
pub enum StoreBackend {
    /// Only for tests and trials: approvals are lost on restart.
    Memory,
    /// `None`: `countersign.db` beside the configuration file.
    Sqlite(Option<PathBuf>),
    Postgres(SecretText),
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            backend: StoreBackend::Sqlite(None),
            replay_window: Duration::from_secs(600),
            retention: Duration::from_secs(30 * 86400),
            lease: Duration::from_secs(15),
            drain_timeout: Duration::from_secs(10),
        }
    }
}

impl<'de> Deserialize<'de> for StoreConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Fields {
            #[serde(default)]
            sqlite: Option<PathBuf>,
            #[serde(default)]
            postgres: Option<SecretText>,
            #[serde(default, with = "humantime_serde")]
            replay_window: Option<Duration>,
            #[serde(default, with = "humantime_serde")]
            retention: Option<Duration>,
            #[serde(default, with = "humantime_serde")]
            lease: Option<Duration>,
            #[serde(default, with = "humantime_serde")]
            drain_timeout: Option<Duration>,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Shape {
            Word(String),
            Map(Fields),
        }
        let defaults = Self::default();
        let fields = match Shape::deserialize(d)? {
            Shape::Word(word) if word == "memory" => {
                return Ok(Self {
                    backend: StoreBackend::Memory,
                    ..defaults
                })
            }
            Shape::Word(word) => {
                return Err(de::Error::custom(format!(
                    "store {word:?}: use `memory`, `{{ sqlite: PATH }}` or `{{ postgres: URL }}`"
                )))
            }
            Shape::Map(fields) => fields,
        };
        let backend = match (fields.sqlite, fields.postgres) {
            (Some(path), None) => StoreBackend::Sqlite(Some(path)),
            (None, Some(url)) => StoreBackend::Postgres(url),
            (None, None) => StoreBackend::Sqlite(None),
            (Some(_), Some(_)) => {
                return Err(de::Error::custom(
                    "store takes one of `sqlite` or `postgres`",
                ))
            }
        };
        let lease = fields.lease.unwrap_or(defaults.lease);
        if lease < Duration::from_secs(1) {
            return Err(de::Error::custom("store.lease must be at least 1s"));
        }
        Ok(Self {
            backend,
            replay_window: fields.replay_window.unwrap_or(defaults.replay_window),
            retention: fields.retention.unwrap_or(defaults.retention),
            lease,
            drain_timeout: fields.drain_timeout.unwrap_or(defaults.drain_timeout),
        })
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    #[schemars(with = "crate::schema_shapes::ListenAddr")]
    pub proxy: SocketAddr,
    /// `/metrics`, `/healthz` and `/readyz`; keep it off the public network.
    #[serde(default)]
    #[schemars(with = "Option<crate::schema_shapes::ListenAddr>")]
    pub admin: Option<SocketAddr>,
    /// Worker threads of the proxy.
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// Serve the proxy listener over TLS (and HTTP/2) instead of plain
    /// HTTP/1.1.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Also accept HTTP/2 without TLS (prior knowledge, "h2c") on a
    /// listener without `tls`: for agents on a private network.
    #[serde(default)]
    pub h2c: bool,
}

/// TLS on the proxy listener. Files are PEM; relative paths are taken from
/// the configuration file's directory; they are read again when they
/// change (new connections get the new certificates, open ones keep theirs).
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate chains (leaf first) and their private keys. A client's
    /// SNI picks the one whose names (subjectAltName DNS, else CN) match;
    /// the first serves clients that send no SNI or an unknown one.
    pub certificates: Vec<CertificateFiles>,
    /// Require a client certificate issued by this CA (agents as workloads).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// Offer HTTP/2 by ALPN besides HTTP/1.1 (default true).
    #[serde(default = "default_true")]
    pub http2: bool,
}

impl TlsConfig {
    /// The files to serve, relative paths taken from `base` (the directory
    /// of the configuration file).
    pub fn files(&self, base: &std::path::Path) -> crate::tls::TlsFiles {
        crate::tls::TlsFiles::new(
            self.certificates
                .iter()
                .map(|c| (c.cert.clone(), c.key.clone())),
            self.client_ca.as_deref(),
            self.http2,
            base,
        )
    }
}

/// One certificate chain and its key.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CertificateFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn default_true() -> bool {
    true
}

fn default_threads() -> usize {
    2
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub url: UpstreamUrl,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    #[schemars(with = "crate::schema_shapes::HumanDuration")]
    pub connect_timeout: Duration,
    /// Longest wait for the upstream between reads or writes.
    #[serde(default = "default_io_timeout", with = "humantime_serde")]
    #[schemars(with = "crate::schema_shapes::HumanDuration")]
    pub timeout: Duration,
    /// Send the agent's `Host` header instead of the upstream URL's authority.
    #[serde(default)]
    pub preserve_host: bool,
    /// Forward paths containing `%25` (an encoded '%'). Off by default: an
    /// upstream that decodes twice reads `/%2573hop` as `/shop`.
    #[serde(default)]
    pub allow_encoded_percent: bool,
    /// Relay protocol upgrades (WebSocket). Off by default: after the
    /// upgrade the gateway no longer sees requests on that connection.
    #[serde(default)]
    pub allow_upgrade: bool,
    /// TLS to an `https` upstream: a private CA, a client certificate.
    #[serde(default)]
    pub tls: Option<UpstreamTlsConfig>,
    /// `tls`, read and checked by [`load`] (files relative to the
    /// configuration file).
    #[serde(skip)]
    #[schemars(skip)]
    pub tls_material: Option<std::sync::Arc<crate::upstream_tls::UpstreamTls>>,
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_io_timeout() -> Duration {
    Duration::from_secs(60)
}

/// An `http` or `https` URL with a host and no path, query or fragment.
#[derive(Debug, Clone)]
pub struct UpstreamUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// `host[:port]`, computed once: it is the Host header of every forwarded call.
    authority: String,
}

impl UpstreamUrl {
    pub fn authority(&self) -> &str {
        &self.authority
    }
}

impl<'de> Deserialize<'de> for UpstreamUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        let url = Url::parse(&raw).map_err(|e| de::Error::custom(format!("{raw:?}: {e}")))?;
        let tls = match url.scheme() {
            "http" => false,
            "https" => true,
            other => {
                return Err(de::Error::custom(format!(
                    "upstream scheme {other:?} is not supported; use http or https"
                )))
            }
        };
        if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
            return Err(de::Error::custom(format!(
                "{raw:?}: an upstream URL has no path, query or fragment"
            )));
        }
        let host = url
            .host_str()
            .ok_or_else(|| de::Error::custom(format!("{raw:?} has no host")))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = url
            .port_or_known_default()
            .ok_or_else(|| de::Error::custom(format!("{raw:?} has no port")))?;
        let default_port = if tls { 443 } else { 80 };
        let authority = if port == default_port {
            host.clone()
        } else {
            format!("{host}:{port}")
        };
        Ok(Self {
            tls,
            host,
            port,
            authority,
        })
    }
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default = "default_prefix")]
    pub path_prefix: String,
    pub upstream: UpstreamRef,
}

fn default_prefix() -> String {
    "/".to_owned()
}

/// The name of an upstream declared under `upstreams`.
#[derive(Debug, Clone)]
pub struct UpstreamRef(pub String);

impl<'de> Deserialize<'de> for UpstreamRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        load::check_upstream_name(&name).map_err(de::Error::custom)?;
        Ok(Self(name))
    }
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationServerConfig {
    /// The issuer; its `/.well-known/openid-configuration` is read at start
    /// unless `endpoints` is given.
    pub issuer: Text,
    #[serde(default)]
    pub endpoints: Option<EndpointsConfig>,
    pub client_id: Text,
    pub client_auth: ClientAuthConfig,
    #[serde(default)]
    pub login_hint: LoginHintFormat,
    /// The bc-authorize parameter that carries a policy's audience.
    #[serde(default)]
    pub audience_parameter: AudienceParameter,
    /// Scopes added to every request; `openid` is always sent.
    #[serde(default)]
    pub extra_scopes: Vec<String>,
    #[serde(default = "default_as_timeout", with = "humantime_serde")]
    #[schemars(with = "crate::schema_shapes::HumanDuration")]
    pub request_timeout: Duration,
    /// How the gateway learns the person answered: `poll` (default) polls
    /// the token endpoint at the server's interval; `ping` waits for the
    /// server's notification (CIBA ping mode, `notification` required) and
    /// polls only slowly, in case one is lost.
    #[serde(default)]
    pub delivery: Delivery,
    /// The client notification endpoint of ping mode.
    #[serde(default)]
    pub notification: Option<NotificationConfig>,
    /// How long start-up keeps retrying discovery while the authorization
    /// server cannot be reached (it may be starting beside the gateway).
    #[serde(default = "default_startup_wait", with = "humantime_serde")]
    #[schemars(with = "crate::schema_shapes::HumanDuration")]
    pub startup_wait: Duration,
    /// `dpop`: tokens are bound to the gateway's key (RFC 9449): the gateway
    /// proves it when it polls and when it forwards. `bearer` (default).
    #[serde(default)]
    pub token_binding: TokenBinding,
    /// The gateway's DPoP key: an EC P-256 private key in PEM, the same for
    /// every replica (`${ENV}` works). Needed with `token_binding: dpop`.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub dpop_key: Option<SecretText>,
}

/// What an issued access token is bound to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TokenBinding {
    /// A bearer token: whoever holds it may use it.
    #[default]
    Bearer,
    /// Bound to the gateway's DPoP key (`cnf.jkt`); sent with a proof.
    Dpop,
}

fn default_as_timeout() -> Duration {
    Duration::from_secs(10)
}

/// CIBA token delivery modes the gateway supports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Delivery {
    #[default]
    Poll,
    Ping,
}

/// Where the authorization server notifies the gateway (ping mode): a
/// listener of its own, serving only `POST <path>`. Register
/// `http(s)://<this host>:<port><path>` as the client's
/// `backchannel_client_notification_endpoint` (behind TLS termination in
/// production: most servers require https).
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NotificationConfig {
    #[schemars(with = "crate::schema_shapes::ListenAddr")]
    pub listen: SocketAddr,
    /// The path notifications are posted to.
    #[serde(default = "default_notification_path")]
    pub path: String,
    /// The slow poll kept in case a notification is lost: at most this
    /// often, and never faster than the server's interval.
    #[serde(default = "default_safety_poll", with = "humantime_serde")]
    #[schemars(with = "crate::schema_shapes::HumanDuration")]
    pub safety_poll: Duration,
}

fn default_notification_path() -> String {
    "/ciba/notification".to_owned()
}

fn default_safety_poll() -> Duration {
    Duration::from_secs(60)
}

fn default_startup_wait() -> Duration {
    Duration::from_secs(60)
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EndpointsConfig {
    pub backchannel_authentication: Url,
    pub token: Url,
    #[serde(default)]
    pub jwks: Option<Url>,
}

/// How Countersign authenticates to the authorization server.
#[derive(Debug, Clone)]
pub enum ClientAuthConfig {
    ClientSecretPost {
        client_secret: SecretText,
    },
    ClientSecretBasic {
        client_secret: SecretText,
    },
    PrivateKeyJwt {
        /// PEM-encoded RSA or EC private key.
        private_key: SecretText,
        key_id: Option<String>,
        algorithm: String,
        /// The assertion's `aud`; defaults to the issuer.
        audience: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum ClientAuthMethod {
    ClientSecretPost,
    ClientSecretBasic,
    PrivateKeyJwt,
}

impl<'de> Deserialize<'de> for ClientAuthConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // A flat struct rather than a tagged enum: serde buffers tagged enums,
        // which loses the line of a bad field.
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Fields {
            method: ClientAuthMethod,
            #[serde(default)]
            client_secret: Option<SecretText>,
            #[serde(default)]
            private_key: Option<SecretText>,
            #[serde(default)]
            key_id: Option<String>,
            #[serde(default)]
            algorithm: Option<String>,
            #[serde(default)]
            audience: Option<String>,
        }
        let f = Fields::deserialize(d)?;
        let secret_only = f.private_key.is_none()
            && f.key_id.is_none()
            && f.algorithm.is_none()
            && f.audience.is_none();
        match (f.method, f.client_secret) {
            (ClientAuthMethod::ClientSecretPost, Some(client_secret)) if secret_only => {
                Ok(Self::ClientSecretPost { client_secret })
            }
            (ClientAuthMethod::ClientSecretBasic, Some(client_secret)) if secret_only => {
                Ok(Self::ClientSecretBasic { client_secret })
            }
            (ClientAuthMethod::PrivateKeyJwt, None) => {
                let private_key = f.private_key.ok_or_else(|| {
                    de::Error::custom("private_key_jwt needs `private_key` (PEM)")
                })?;
                let algorithm = f.algorithm.unwrap_or_else(default_signing_alg);
                if !matches!(
                    algorithm.as_str(),
                    "RS256" | "RS384" | "RS512" | "PS256" | "ES256" | "ES384"
                ) {
                    return Err(de::Error::custom(format!(
                        "algorithm {algorithm:?} is not supported; use RS256, PS256 or ES256"
                    )));
                }
                Ok(Self::PrivateKeyJwt {
                    private_key,
                    key_id: f.key_id,
                    algorithm,
                    audience: f.audience,
                })
            }
            (ClientAuthMethod::PrivateKeyJwt, Some(_)) => Err(de::Error::custom(
                "private_key_jwt takes `private_key`, not `client_secret`",
            )),
            (_, None) => Err(de::Error::custom("this method needs `client_secret`")),
            (_, Some(_)) => Err(de::Error::custom(
                "client secret methods take only `client_secret`",
            )),
        }
    }
}

fn default_signing_alg() -> String {
    "RS256".to_owned()
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LoginHintFormat {
    /// Auth0: `{"format":"iss_sub","iss":"<issuer>","sub":"<subject>"}`.
    #[default]
    IssSub,
    /// The bare subject.
    Subject,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AudienceParameter {
    /// Auth0's `audience`.
    #[default]
    Audience,
    /// RFC 8707 `resource`.
    Resource,
}

/// How the person who must approve a call is identified: exactly one of
/// `jwt`, `header` or `static`.
#[derive(Debug, Clone)]
pub enum IdentityConfig {
    /// A bearer JWT the agent carries, verified against a JWKS.
    Jwt(JwtIdentityConfig),
    /// A header set by a trusted component in front of the gateway.
    Header(HeaderIdentityConfig),
    /// Every call is approved by one person.
    Static(StaticIdentityConfig),
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HeaderIdentityConfig {
    pub name: String,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StaticIdentityConfig {
    pub subject: Text,
}

impl<'de> Deserialize<'de> for IdentityConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct OneOf {
            #[serde(default)]
            jwt: Option<JwtIdentityConfig>,
            #[serde(default)]
            header: Option<HeaderIdentityConfig>,
            #[serde(default, rename = "static")]
            fixed: Option<StaticIdentityConfig>,
        }
        let one_of = OneOf::deserialize(d)?;
        match (one_of.jwt, one_of.header, one_of.fixed) {
            (Some(jwt), None, None) => Ok(Self::Jwt(jwt)),
            (None, Some(header), None) => {
                if http::HeaderName::from_bytes(header.name.as_bytes()).is_err() {
                    return Err(de::Error::custom(format!(
                        "{:?} is not a valid header name",
                        header.name
                    )));
                }
                Ok(Self::Header(header))
            }
            (None, None, Some(fixed)) => Ok(Self::Static(fixed)),
            _ => Err(de::Error::custom(
                "identity needs exactly one of `jwt`, `header` or `static`",
            )),
        }
    }
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JwtIdentityConfig {
    /// Defaults to the authorization server's issuer.
    #[serde(default)]
    pub issuer: Option<Text>,
    pub audience: Text,
    /// Defaults to the authorization server's `jwks_uri`.
    #[serde(default)]
    pub jwks_uri: Option<Url>,
    #[serde(default = "default_subject_claim")]
    pub subject_claim: String,
}

fn default_subject_claim() -> String {
    "sub".to_owned()
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DefaultAction {
    #[default]
    Deny,
    Pass,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest body of a held call; at most 64 KiB (pingora's replay buffer).
    #[serde(default = "default_max_body")]
    #[schemars(range(max = 65536))]
    pub max_body_bytes: usize,
    /// Longest a call is held; also caps a policy's `requested_expiry`.
    #[serde(default = "default_max_hold", with = "humantime_serde")]
    #[schemars(with = "crate::schema_shapes::HumanDuration")]
    pub max_hold: Duration,
    /// Most calls held at once; more are answered 503.
    #[serde(default = "default_max_pending")]
    pub max_pending: usize,
    /// Most calls held at once for one person; more are answered 429, so
    /// one agent cannot flood a phone (Auth0 allows 5 requests a minute per
    /// user).
    #[serde(default = "default_max_pending_per_user")]
    pub max_pending_per_user: usize,
    /// Largest upstream answer recorded for replay to retries; a larger one
    /// is streamed to the agent held for it, and retries get
    /// `response_not_recorded`.
    #[serde(default = "default_max_response")]
    pub max_response_bytes: usize,
}

fn default_max_response() -> usize {
    1024 * 1024
}

fn default_max_pending_per_user() -> usize {
    5
}

/// pingora replays at most this many body bytes to the upstream.
pub const MAX_REPLAYABLE_BODY: usize = 64 * 1024;

fn default_max_body() -> usize {
    MAX_REPLAYABLE_BODY
}

fn default_max_hold() -> Duration {
    Duration::from_secs(300)
}

fn default_max_pending() -> usize {
    10_000
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: default_max_body(),
            max_hold: default_max_hold(),
            max_pending: default_max_pending(),
            max_pending_per_user: default_max_pending_per_user(),
            max_response_bytes: default_max_response(),
        }
    }
}
