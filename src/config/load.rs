//! Reading and validating configuration files.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::{Config, DefaultAction, GatewayConfig, MAX_REPLAYABLE_BODY};
use crate::policy::{PolicyError, PolicyFile, PolicySet};
use crate::route::{RouteRule, Routes};

/// Where in a file a problem is.
#[derive(Debug, Clone)]
pub struct Location {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// The key path, e.g. `policies[0].binding_message`.
    pub key: String,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        if !self.key.is_empty() && self.key != "." {
            write!(f, ": {}", self.key)?;
        }
        Ok(())
    }
}

#[derive(Debug, Error)]
pub enum ConfigError {
    /// The reason is in the message, not a `source`: `main` prints the
    /// chain, which would repeat it.
    #[error("{file}: {reason}")]
    Read {
        file: String,
        reason: std::io::Error,
    },
    #[error("{location}: {message}")]
    Invalid { location: Location, message: String },
    #[error(transparent)]
    Policy(#[from] PolicyError),
}

thread_local! {
    /// Upstream names of the file being loaded, so `UpstreamRef` can refuse an
    /// unknown name while its YAML node (and so its line) is at hand.
    static KNOWN_UPSTREAMS: RefCell<Option<BTreeSet<String>>> = const { RefCell::new(None) };
}

pub(super) fn check_upstream_name(name: &str) -> Result<(), String> {
    KNOWN_UPSTREAMS.with(|known| match &*known.borrow() {
        Some(names) if !names.contains(name) => Err(format!(
            "unknown upstream {name:?}; declared upstreams: {}",
            names.iter().cloned().collect::<Vec<_>>().join(", ")
        )),
        _ => Ok(()),
    })
}

/// Only the upstream names, read in a first pass.
#[derive(serde::Deserialize)]
struct UpstreamNames {
    #[serde(default)]
    upstreams: std::collections::BTreeMap<String, serde::de::IgnoredAny>,
}

/// Loads the configuration file and every policy file it names.
pub fn load(file: &Path) -> Result<Config, ConfigError> {
    let text = read(file)?;
    load_str(file, &text)
}

/// Like [`load`], with the main file's text given (policy paths are still
/// resolved against `file`'s directory).
pub fn load_str(file: &Path, text: &str) -> Result<Config, ConfigError> {
    load_embedded(file, text, &[])
}

/// Like [`load_str`], plus policy files given as `(name, text)` pairs, loaded
/// after those the configuration names: for a configuration built in memory
/// (`countersign dev` embeds its policies so it runs from any directory).
/// The names only label errors.
pub fn load_embedded(
    file: &Path,
    text: &str,
    embedded: &[(&Path, &str)],
) -> Result<Config, ConfigError> {
    let names: UpstreamNames = parse(file, text)?;
    let known: BTreeSet<String> = names.upstreams.into_keys().collect();
    KNOWN_UPSTREAMS.with(|k| *k.borrow_mut() = Some(known));
    let parsed = parse::<GatewayConfig>(file, text);
    KNOWN_UPSTREAMS.with(|k| *k.borrow_mut() = None);
    let mut gateway = parsed?;
    validate(file, &gateway)?;
    load_upstream_tls(file, &mut gateway)?;

    let base = file.parent().unwrap_or_else(|| Path::new("."));
    let mut loaded = Vec::new();
    for entry in &gateway.policies {
        for policy_file in policy_files(&base.join(entry), file)? {
            let text = read(&policy_file)?;
            let parsed: PolicyFile = parse(&policy_file, &text)?;
            loaded.extend(parsed.into_loaded(&policy_file));
        }
    }
    for entry in &gateway.shadow_policies {
        for policy_file in policy_files(&base.join(entry), file)? {
            let text = read(&policy_file)?;
            let parsed: PolicyFile = parse(&policy_file, &text)?;
            loaded.extend(parsed.into_loaded(&policy_file).map(|mut l| {
                l.spec.mode = crate::policy::spec::Mode::Shadow;
                l
            }));
        }
    }
    for (name, text) in embedded {
        let parsed: PolicyFile = parse(name, text)?;
        loaded.extend(parsed.into_loaded(name));
    }
    let mut policies = PolicySet::compile(loaded)?;
    let rules: Vec<RouteRule<'_>> = gateway
        .routes
        .iter()
        .map(|r| RouteRule {
            host: r.host.as_deref(),
            path_prefix: &r.path_prefix,
            upstream: &r.upstream.0,
        })
        .collect();
    let routes = Routes::new(&rules, gateway.upstreams.keys().map(String::as_str));
    bind_policies_to_upstreams(&mut policies, &routes, &gateway)?;
    Ok(Config {
        file: file.to_owned(),
        gateway,
        policies,
        routes,
        text: text.to_owned(),
        reloadable: embedded.is_empty(),
    })
}

fn read(file: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(file).map_err(|reason| ConfigError::Read {
        file: file.display().to_string(),
        reason,
    })
}

/// A policy test file (`countersign test`), kept beside the policies but
/// never loaded as one.
pub fn is_policy_test_file(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with(".test.yaml") || n.ends_with(".test.yml"))
}

/// A file, or the `*.yaml` / `*.yml` files of a directory in name order
/// (without policy test files).
pub(crate) fn policy_files(path: &Path, config_file: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    if !path.is_dir() {
        if !path.exists() {
            return Err(invalid(
                config_file,
                "policies",
                format!("policy file {} does not exist", path.display()),
            ));
        }
        return Ok(vec![path.to_owned()]);
    }
    let entries = std::fs::read_dir(path).map_err(|reason| ConfigError::Read {
        file: path.display().to_string(),
        reason,
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .filter(|p| !is_policy_test_file(p))
        .collect();
    files.sort();
    Ok(files)
}

/// Parses a strict YAML file; an error names the file, line and key.
pub(crate) fn parse<T: serde::de::DeserializeOwned>(
    file: &Path,
    text: &str,
) -> Result<T, ConfigError> {
    let deserializer = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(deserializer).map_err(|error| {
        let key = error.path().to_string();
        let inner = error.into_inner();
        let location = inner.location();
        // serde_yaml appends " at line L column C"; we print it up front.
        let message = inner.to_string();
        let message = match message.find(" at line ") {
            Some(pos) if location.is_some() => message[..pos].to_owned(),
            _ => message,
        };
        // serde_yaml may also prefix the (shorter) path it knows.
        let message = match message.split_once(": ") {
            Some((prefix, rest)) if !prefix.is_empty() && key.starts_with(prefix) => {
                rest.to_owned()
            }
            _ => message,
        };
        let (line, column) = match location {
            Some(mark) => {
                let (line, column) = refine(text, mark.line(), mark.column(), &key);
                (Some(line), Some(column))
            }
            None => (None, None),
        };
        ConfigError::Invalid {
            location: Location {
                file: file.to_owned(),
                line,
                column,
                key,
            },
            message,
        }
    })
}

/// serde_yaml marks a value refused by its own `Deserialize` at the start of
/// the enclosing mapping. Point at the offending key instead: the first
/// `last_key:` at or after that mark.
fn refine(text: &str, line: usize, column: usize, key_path: &str) -> (usize, usize) {
    let Some(last) = key_path
        .rsplit('.')
        .next()
        .map(|k| k.split('[').next().unwrap_or(k))
        .filter(|k| !k.is_empty() && *k != "?")
    else {
        return (line, column);
    };
    for (index, content) in text.lines().enumerate().skip(line.saturating_sub(1)) {
        let mut from = 0;
        while let Some(pos) = content[from..].find(last) {
            let start = from + pos;
            let before = content[..start].chars().next_back();
            let after = content[start + last.len()..].trim_start();
            let boundary = before.is_none_or(|c| c.is_whitespace() || matches!(c, '{' | ',' | '-'));
            if boundary && after.starts_with(':') {
                return (index + 1, start + 1);
            }
            from = start + last.len();
        }
    }
    (line, column)
}

fn invalid(file: &Path, key: &str, message: String) -> ConfigError {
    ConfigError::Invalid {
        location: Location {
            file: file.to_owned(),
            line: None,
            column: None,
            key: key.to_owned(),
        },
        message,
    }
}

/// The fresh token of a policy may only go to the upstreams it names (or the
/// only upstream there is); a policy whose calls could be routed anywhere
/// else is refused here rather than leaking its token at run time.
fn bind_policies_to_upstreams(
    policies: &mut PolicySet,
    routes: &Routes,
    gateway: &GatewayConfig,
) -> Result<(), ConfigError> {
    let only = (gateway.upstreams.len() == 1)
        .then(|| gateway.upstreams.keys().next().map(String::as_str))
        .flatten();
    policies.bind_upstreams(only);
    for policy in policies.all_policies() {
        let error = |reason: String| {
            ConfigError::Policy(PolicyError {
                file: policy.file.display().to_string(),
                index: policy.index,
                name: policy.name.clone(),
                reason,
            })
        };
        if policy.upstreams.is_empty() {
            return Err(error(
                "upstreams: several upstreams are declared, so the policy must name the ones its token may be sent to".into(),
            ));
        }
        if let Some(unknown) = policy
            .upstreams
            .iter()
            .find(|u| !gateway.upstreams.contains_key(*u))
        {
            return Err(error(format!(
                "upstreams: unknown upstream {unknown:?}; declared upstreams: {}",
                gateway
                    .upstreams
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        if let Some(stray) = routes
            .reachable_from(policy)
            .into_iter()
            .find(|u| !policy.upstreams.iter().any(|p| p == u))
        {
            return Err(error(format!(
                "upstreams: calls this policy covers can be routed to upstream {stray:?}, which it does not name; add it to `upstreams` or narrow the policy (host) or the routes"
            )));
        }
    }
    Ok(())
}

/// Each upstream's TLS files load (and only `https` upstreams have them);
/// the material is kept in the upstream's configuration.
fn load_upstream_tls(file: &Path, config: &mut GatewayConfig) -> Result<(), ConfigError> {
    let base = file.parent().unwrap_or(Path::new("."));
    for (name, upstream) in &mut config.upstreams {
        let Some(tls) = &upstream.tls else {
            continue;
        };
        let key = format!("upstreams.{name}.tls");
        if !upstream.url.tls {
            return Err(invalid(
                file,
                &key,
                "TLS settings need an https:// url".into(),
            ));
        }
        let material = crate::upstream_tls::UpstreamTls::load(tls, base)
            .map_err(|why| invalid(file, &key, why))?;
        upstream.tls_material = Some(std::sync::Arc::new(material));
    }
    Ok(())
}

/// The proxy listener's certificates load, and each key is its certificate's.
fn validate_tls(file: &Path, config: &GatewayConfig) -> Result<(), ConfigError> {
    let Some(tls) = &config.listen.tls else {
        return Ok(());
    };
    if config.listen.h2c {
        return Err(invalid(
            file,
            "listen.h2c",
            "h2c is HTTP/2 without TLS; with listen.tls, HTTP/2 is offered by ALPN (listen.tls.http2)".into(),
        ));
    }
    if tls.certificates.is_empty() {
        return Err(invalid(
            file,
            "listen.tls.certificates",
            "at least one certificate (cert and key files) is needed".into(),
        ));
    }
    let base = file.parent().unwrap_or(Path::new("."));
    tls.files(base).check().map_err(|(i, why)| {
        invalid(
            file,
            &format!("listen.tls.certificates[{i}]"),
            why.to_string(),
        )
    })
}

/// DPoP needs its key, a usable one; a key without DPoP is a mistake.
fn validate_token_binding(file: &Path, config: &GatewayConfig) -> Result<(), ConfigError> {
    let server = &config.authorization_server;
    let key = "authorization_server.dpop_key";
    match (server.token_binding, &server.dpop_key) {
        (super::TokenBinding::Dpop, None) => Err(invalid(
            file,
            key,
            "token_binding: dpop needs `dpop_key`: an EC P-256 private key in PEM, the same for every replica".into(),
        )),
        (super::TokenBinding::Bearer, Some(_)) => Err(invalid(
            file,
            key,
            "a DPoP key is only used with `token_binding: dpop`".into(),
        )),
        (super::TokenBinding::Dpop, Some(pem)) => crate::dpop::DpopKey::from_pem(pem.0.expose())
            .map(drop)
            .map_err(|why| invalid(file, key, why)),
        (super::TokenBinding::Bearer, None) => Ok(()),
    }
}

/// Ping mode needs its notification listener, on an address of its own.
fn validate_delivery(file: &Path, config: &GatewayConfig) -> Result<(), ConfigError> {
    let server = &config.authorization_server;
    match (server.delivery, &server.notification) {
        (super::Delivery::Ping, None) => Err(invalid(
            file,
            "authorization_server.notification",
            "delivery: ping needs `notification: { listen: ADDRESS }`, where the authorization server posts its notifications".into(),
        )),
        (super::Delivery::Poll, Some(_)) => Err(invalid(
            file,
            "authorization_server.notification",
            "a notification endpoint is only used with `delivery: ping`".into(),
        )),
        (_, Some(notification)) => {
            let listen = notification.listen;
            if listen == config.listen.proxy || Some(listen) == config.listen.admin {
                return Err(invalid(
                    file,
                    "authorization_server.notification.listen",
                    format!("{listen} is already the proxy or admin listener; the notification endpoint needs a listener of its own"),
                ));
            }
            if !notification.path.starts_with('/') || notification.path.contains(['?', '#', '%']) {
                return Err(invalid(
                    file,
                    "authorization_server.notification.path",
                    format!("{:?} must be a plain path starting with '/'", notification.path),
                ));
            }
            Ok(())
        }
        (super::Delivery::Poll, None) => Ok(()),
    }
}

/// Checks that need more than one field.
fn validate(file: &Path, config: &GatewayConfig) -> Result<(), ConfigError> {
    if config.upstreams.is_empty() {
        return Err(invalid(
            file,
            "upstreams",
            "at least one upstream is required".into(),
        ));
    }
    if config.routes.is_empty() && config.upstreams.len() > 1 {
        return Err(invalid(
            file,
            "routes",
            "several upstreams are declared, so routes must say which calls go where".into(),
        ));
    }
    for (i, route) in config.routes.iter().enumerate() {
        if let Some(host) = &route.host {
            if crate::policy::host_key(host).is_err() || host.contains(':') {
                return Err(invalid(
                    file,
                    &format!("routes[{i}].host"),
                    format!("{host:?} must be a bare host name, without scheme, port or path"),
                ));
            }
        }
        if !route.path_prefix.starts_with('/') {
            return Err(invalid(
                file,
                &format!("routes[{i}].path_prefix"),
                format!("{:?} must start with '/'", route.path_prefix),
            ));
        }
    }
    validate_delivery(file, config)?;
    validate_token_binding(file, config)?;
    validate_tls(file, config)?;
    if config.limits.max_body_bytes > MAX_REPLAYABLE_BODY {
        return Err(invalid(
            file,
            "limits.max_body_bytes",
            format!("at most {MAX_REPLAYABLE_BODY} bytes can be held and replayed upstream"),
        ));
    }
    if config.policies.is_empty() && config.default_action == DefaultAction::Deny {
        return Err(invalid(
            file,
            "policies",
            "no policy files and default_action deny would refuse every call".into(),
        ));
    }
    if config.listen.threads == 0 {
        return Err(invalid(file, "listen.threads", "must be at least 1".into()));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal valid configuration, for tests here and elsewhere.
    pub(crate) const BASE: &str = r#"
listen: { proxy: "127.0.0.1:8080" }
upstreams:
  shop: { url: "http://127.0.0.1:3000" }
authorization_server:
  issuer: https://tenant.example/
  client_id: countersign
  client_auth: { method: client_secret_post, client_secret: plain }
identity: { static: { subject: alice } }
policies: []
default_action: pass
"#;

    fn error_of(text: &str) -> String {
        load_str(Path::new("gateway.yaml"), text)
            .unwrap_err()
            .to_string()
    }

    /// Loading `text` fails with an error that starts with `at` (where and
    /// what) and says each of `says`.
    fn assert_refused(text: &str, at: &str, says: &[&str]) {
        let error = error_of(text);
        assert!(error.starts_with(at), "{error}");
        for part in says {
            assert!(error.contains(part), "{error}");
        }
    }

    #[test]
    fn policy_test_files_beside_the_policies_are_not_loaded_as_policies() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["b.yaml", "a.yml", "b.test.yaml", "c.test.yml", "notes.txt"] {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        let files = policy_files(dir.path(), Path::new("gateway.yaml")).unwrap();
        let names: Vec<_> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap())
            .collect();
        assert_eq!(names, ["a.yml", "b.yaml"]);
    }

    #[test]
    fn a_minimal_config_loads() {
        let config = load_str(Path::new("gateway.yaml"), BASE).unwrap();
        assert_eq!(config.gateway.upstreams["shop"].url.port, 3000);
        assert_eq!(config.gateway.default_action, DefaultAction::Pass);
    }

    #[test]
    fn ping_delivery_needs_a_notification_listener_of_its_own() {
        let with = |extra: &str| {
            BASE.replace(
                "client_id: countersign",
                &format!("client_id: countersign\n  {extra}"),
            )
        };
        let config = load_str(
            Path::new("gateway.yaml"),
            &with("delivery: ping\n  notification: { listen: \"127.0.0.1:8443\" }"),
        )
        .unwrap();
        let notification = config.gateway.authorization_server.notification.unwrap();
        assert_eq!(notification.path, "/ciba/notification");
        assert_eq!(notification.safety_poll, std::time::Duration::from_secs(60));
        let error = error_of(&with("delivery: ping"));
        assert!(
            error.contains("authorization_server.notification"),
            "{error}"
        );
        let error = error_of(&with("notification: { listen: \"127.0.0.1:8443\" }"));
        assert!(error.contains("only used with `delivery: ping`"), "{error}");
        let error = error_of(&with(
            "delivery: ping\n  notification: { listen: \"127.0.0.1:8080\" }",
        ));
        assert!(error.contains("a listener of its own"), "{error}");
        let error = error_of(&with("delivery: push"));
        assert!(error.contains("delivery"), "{error}");
    }

    #[test]
    fn unknown_keys_name_file_line_and_key() {
        let text = BASE.replace(
            "client_id: countersign",
            "client_id: countersign\n  clientsecret: x",
        );
        assert_refused(
            &text,
            "gateway.yaml:8:",
            &["authorization_server", "unknown field `clientsecret`"],
        );
    }

    #[test]
    fn unknown_upstreams_are_refused_with_their_line() {
        let text = format!("{BASE}routes:\n  - {{ path_prefix: /, upstream: shoop }}\n");
        assert_refused(
            &text,
            "gateway.yaml:13:",
            &["routes[0].upstream", "unknown upstream \"shoop\""],
        );
    }

    #[test]
    fn missing_secrets_are_refused_with_their_line() {
        let text = BASE.replace(
            "client_secret: plain",
            "client_secret: '${COUNTERSIGN_TEST_UNSET_VAR}'",
        );
        assert_refused(
            &text,
            "gateway.yaml:8:46: authorization_server.client_auth.client_secret: environment",
            &["COUNTERSIGN_TEST_UNSET_VAR is not set"],
        );
    }

    #[test]
    fn oversized_body_limit_is_refused() {
        let text = format!("{BASE}limits: {{ max_body_bytes: 1000000 }}\n");
        assert!(error_of(&text).contains("limits.max_body_bytes"));
    }

    /// [`BASE`] with a second upstream, `mail`, which host mail.example is
    /// routed to.
    fn two_upstreams() -> String {
        let shop = "  shop: { url: \"http://127.0.0.1:3000\" }\n";
        let mail = "  mail: { url: \"http://127.0.0.1:3001\" }\n\
                    routes:\n  \
                    - { host: mail.example, upstream: mail }\n  \
                    - { path_prefix: /, upstream: shop }\n";
        assert!(BASE.contains(shop));
        BASE.replace(shop, &format!("{shop}{mail}"))
    }

    /// Loads one policy on POST /shop; `host` extends its `match`, `upstreams` adds lines.
    fn load_policy(host: &str, upstreams: &str) -> Result<Config, String> {
        let file = format!(
            "policies:\n  - name: buy\n    match: {{ methods: [POST], path: /shop{host} }}\n    require: {{ scopes: [x] }}\n    binding_message: Buy\n{upstreams}"
        );
        load_embedded(
            Path::new("gateway.yaml"),
            &two_upstreams(),
            &[(Path::new("buy.yaml"), &file)],
        )
        .map_err(|e| e.to_string())
    }

    #[test]
    fn a_policy_token_may_only_reach_the_upstreams_it_names() {
        let unnamed = load_policy("", "").unwrap_err();
        assert!(
            unnamed.starts_with("buy.yaml: policies[0] ('buy'): upstreams:"),
            "{unnamed}"
        );
        // Host mail.example routes POST /shop to mail: the shop's token would go there.
        let shop_only = "    upstreams: [shop]\n";
        let leaks = load_policy("", shop_only).unwrap_err();
        assert!(leaks.contains("routed to upstream \"mail\""), "{leaks}");
        assert!(load_policy(", host: shop.example", shop_only).is_ok());
        assert!(load_policy("", "    upstreams: [shop, mail]\n").is_ok());
        let unknown = load_policy("", "    upstreams: [shoop]\n").unwrap_err();
        assert!(unknown.contains("unknown upstream \"shoop\""), "{unknown}");
    }
}
