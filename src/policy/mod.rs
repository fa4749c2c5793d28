//! The policy engine: which calls need whose approval, and what the person is
//! asked. Compiled once at load; matching is a radix-tree lookup per method,
//! so its cost does not grow with the number of policies.

pub mod body;
mod call;
pub mod path;
pub mod shadow;
pub mod spec;
pub mod template;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use thiserror::Error;

pub use call::{CallError, CallInput};
pub use path::{normalize, NormalizedPath, PathError};
pub use spec::{PolicyFile, PolicySpec, WaitMode};
pub use template::RenderError;

use call::CallShape;
use template::{DetailsTemplate, MessageTemplate};

/// A policy as loaded from a file, remembering where it came from.
#[derive(Debug)]
pub struct LoadedPolicy {
    pub spec: PolicySpec,
    pub file: PathBuf,
    /// `policies[N]` within its file, for error messages.
    pub index: usize,
}

impl PolicyFile {
    /// Its policies, each remembering `file` and its index there.
    pub fn into_loaded(self, file: &Path) -> impl Iterator<Item = LoadedPolicy> + '_ {
        self.policies
            .into_iter()
            .enumerate()
            .map(move |(index, spec)| LoadedPolicy {
                spec,
                file: file.to_path_buf(),
                index,
            })
    }
}

/// A compiled policy.
#[derive(Debug)]
pub struct Policy {
    pub name: String,
    pub scopes: Vec<String>,
    pub audience: Option<String>,
    pub requested_expiry: Option<Duration>,
    pub path_template: String,
    pub methods: Vec<String>,
    pub host: Option<String>,
    /// Whether `/shop.json` falls under a `/shop` policy.
    pub format_suffix: bool,
    /// Where the fresh token may go; empty until bound by the configuration
    /// (see [`PolicySet::bind_upstreams`]).
    pub upstreams: Vec<String>,
    pub wait: WaitMode,
    pub index: usize,
    pub file: PathBuf,
    message: MessageTemplate,
    details: Option<DetailsTemplate>,
    /// Which parts of a call the templates show.
    shape: CallShape,
}

/// A policy that cannot be compiled alongside the others.
#[derive(Debug, Error)]
#[error("{file}: policies[{index}] ('{name}'): {reason}")]
pub struct PolicyError {
    pub file: String,
    pub index: usize,
    pub name: String,
    pub reason: String,
}

#[derive(Debug, Default)]
struct MethodRouters {
    by_method: HashMap<String, matchit::Router<usize>>,
}

impl MethodRouters {
    /// `HEAD` is looked up as `GET` too: most frameworks run the GET handler
    /// for it.
    fn lookup<'p>(&self, method: &str, key: &'p str) -> Option<matchit::Match<'_, 'p, &usize>> {
        let head_as_get = if method == "HEAD" { "GET" } else { "*" };
        [method, head_as_get, "*"]
            .into_iter()
            .filter_map(|m| self.by_method.get(m))
            .find_map(|router| router.at(key).ok())
    }

    fn covers(&self, key: &str) -> bool {
        self.by_method.values().any(|router| router.at(key).is_ok())
    }
}

/// Every policy, indexed for matching.
#[derive(Debug)]
pub struct PolicySet {
    policies: Vec<Policy>,
    by_host: HashMap<String, MethodRouters>,
    any_host: MethodRouters,
}

/// A call that falls under a policy.
#[derive(Debug)]
pub struct PolicyMatch<'a> {
    pub policy: &'a Policy,
    /// Path parameters, percent-decoded, in their original case.
    pub params: Vec<(String, String)>,
}

/// What the person will be asked, rendered from one call.
#[derive(Debug, Clone)]
pub struct RenderedRequest {
    pub binding_message: String,
    pub authorization_details: Option<Value>,
}

/// The parameter names of a path template: `id` of `/orders/{id}`, `rest`
/// of `/files/{*rest}`.
fn path_parameters(template: &str) -> Vec<String> {
    template
        .split('{')
        .skip(1)
        .filter_map(|s| s.split_once('}'))
        .map(|(name, _)| name.trim_start_matches('*').to_owned())
        .collect()
}

impl PolicySet {
    pub fn empty() -> Self {
        Self {
            policies: Vec::new(),
            by_host: HashMap::new(),
            any_host: MethodRouters::default(),
        }
    }

    pub fn compile(loaded: Vec<LoadedPolicy>) -> Result<Self, PolicyError> {
        let mut set = Self::empty();
        let mut routes: HashMap<(Option<String>, String, String), String> = HashMap::new();
        for LoadedPolicy { spec, file, index } in loaded {
            let name = spec.name.0.clone();
            let source_file = file.clone();
            let file = file.display().to_string();
            if set.policies.iter().any(|p| p.name == name) {
                let reason = "the name is already used by another policy".to_owned();
                return Err(PolicyError {
                    file,
                    index,
                    name,
                    reason,
                });
            }
            let shape = CallShape::new(
                &spec.binding_message,
                spec.authorization_details.as_ref(),
                spec.body.as_ref(),
                &path_parameters(&spec.matcher.path.source),
            )
            .map_err(|reason| PolicyError {
                file: file.clone(),
                index,
                name: name.clone(),
                reason,
            })?;
            let id = set.policies.len();
            let host = spec.matcher.host.as_ref().map(|h| h.0.clone());
            let routers = match &host {
                Some(h) => set.by_host.entry(h.clone()).or_default(),
                None => &mut set.any_host,
            };
            for method in &spec.matcher.methods.0 {
                let router = routers.by_method.entry(method.0.clone()).or_default();
                let route = spec.matcher.path.route.clone();
                if let Err(error) = router.insert(route.clone(), id) {
                    let other = match &error {
                        matchit::InsertError::Conflict { with } => routes
                            .get(&(host.clone(), method.0.clone(), with.clone()))
                            .cloned()
                            .unwrap_or_else(|| with.clone()),
                        _ => error.to_string(),
                    };
                    let reason = format!(
                        "match.path {:?} for {} overlaps policy '{other}'",
                        spec.matcher.path.source, method.0
                    );
                    return Err(PolicyError {
                        file,
                        index,
                        name,
                        reason,
                    });
                }
                routes.insert((host.clone(), method.0.clone(), route), name.clone());
            }
            set.policies.push(Policy {
                name,
                scopes: spec.require.scopes.0.clone(),
                audience: spec.require.audience.clone(),
                requested_expiry: spec.requested_expiry,
                path_template: spec.matcher.path.source.clone(),
                methods: spec.matcher.methods.0.iter().map(|m| m.0.clone()).collect(),
                host,
                format_suffix: spec.matcher.format_suffix,
                upstreams: spec.upstreams.clone().unwrap_or_default(),
                wait: spec.wait,
                index,
                file: source_file,
                message: spec.binding_message,
                details: spec.authorization_details,
                shape,
            });
        }
        Ok(set)
    }

    pub fn by_name(&self, name: &str) -> Option<&Policy> {
        self.policies.iter().find(|p| p.name == name)
    }

    pub fn policies(&self) -> &[Policy] {
        &self.policies
    }

    /// Finds the policy for a call. `method` is matched case-insensitively
    /// (`HEAD` also as `GET`); `host` is a [`host_key`]. Host-specific
    /// policies win over host-less ones. A path that matches nothing is tried
    /// again without a format suffix (`/shop.json` as `/shop`) for policies
    /// that cover those spellings.
    pub fn find(
        &self,
        method: &str,
        host: Option<&str>,
        path: &NormalizedPath,
    ) -> Option<PolicyMatch<'_>> {
        let upper;
        let method = if method.bytes().any(|b| b.is_ascii_lowercase()) {
            upper = method.to_ascii_uppercase();
            upper.as_str()
        } else {
            method
        };
        let key = path.match_key.as_str();
        let lookup = |key| {
            host.and_then(|h| self.by_host.get(h))
                .and_then(|routers| routers.lookup(method, key))
                .or_else(|| self.any_host.lookup(method, key))
        };
        let found = lookup(key).or_else(|| {
            format_suffix_cuts(key)
                .filter_map(|cut| lookup(&key[..cut]))
                .find(|m| self.policies[*m.value].format_suffix)
        })?;
        let params = found
            .params
            .iter()
            .map(|(name, value)| {
                // `value` borrows from `key`; the same bytes of `key_original`
                // hold the caller's spelling.
                let start = value.as_ptr() as usize - key.as_ptr() as usize;
                let original = &path.key_original[start..start + value.len()];
                let decoded = percent_encoding::percent_decode_str(original)
                    .decode_utf8_lossy()
                    .into_owned();
                (name.to_owned(), decoded)
            })
            .collect();
        Some(PolicyMatch {
            policy: &self.policies[*found.value],
            params,
        })
    }

    /// Whether any policy, for any method, covers this host and path (with
    /// format suffixes): a call there may not change its method by a
    /// `_method` form field.
    pub fn covers(&self, host: Option<&str>, path: &NormalizedPath) -> bool {
        let key = path.match_key.as_str();
        let covers = |key: &str| {
            host.and_then(|h| self.by_host.get(h))
                .is_some_and(|routers| routers.covers(key))
                || self.any_host.covers(key)
        };
        covers(key) || format_suffix_cuts(key).any(|cut| covers(&key[..cut]))
    }

    /// Gives each policy the upstreams its token may go to: those it names,
    /// or `default` when it names none.
    pub fn bind_upstreams(&mut self, default: Option<&str>) {
        for policy in &mut self.policies {
            if policy.upstreams.is_empty() {
                policy.upstreams.extend(default.map(str::to_owned));
            }
        }
    }

    /// Renders the binding message and authorization details for a call,
    /// after checking that the call reads the same to any permissive API as
    /// it does to the gateway (see [`CallError`] for what is refused).
    pub fn render_call(
        &self,
        policy: &Policy,
        input: &CallInput<'_>,
    ) -> Result<RenderedRequest, CallError> {
        policy
            .shape
            .render(&policy.message, policy.details.as_ref(), input)
    }
}

/// Why a host was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HostError {
    #[error("the host is empty or malformed")]
    Malformed,
}

/// A `Host` header (or authority) as policies and routes compare it:
/// lower-cased, without port and without the trailing dot of a fully
/// qualified name (`Admin.Example.:8080` is `admin.example`). IPv6 literals
/// keep their brackets. Anything that is not a plain DNS name or IP literal
/// (user info, spaces, percent-escapes, empty labels) is refused, so no two
/// spellings of one host can reach different policies.
pub fn host_key(raw: &str) -> Result<String, HostError> {
    let (host, port) = if raw.starts_with('[') {
        let end = raw.find(']').ok_or(HostError::Malformed)?;
        let (host, rest) = raw.split_at(end + 1);
        let valid = host[1..end]
            .bytes()
            .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
        if !valid || end < 3 {
            return Err(HostError::Malformed);
        }
        (host, rest.strip_prefix(':'))
    } else {
        match raw.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (raw, None),
        }
    };
    if port.is_some_and(|p| p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit())) {
        return Err(HostError::Malformed);
    }
    if host.starts_with('[') {
        return Ok(host.to_ascii_lowercase());
    }
    let host = host.strip_suffix('.').unwrap_or(host);
    let valid = !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if !valid {
        return Err(HostError::Malformed);
    }
    Ok(host.to_ascii_lowercase())
}

/// Where a format suffix may be cut off the last segment of `key`: at each
/// '.' after its first character, longest remainder first (`/a.b.json`
/// yields `/a.b` then `/a`).
fn format_suffix_cuts(key: &str) -> impl Iterator<Item = usize> + '_ {
    let segment_start = key.rfind('/').map_or(0, |i| i + 1);
    key[segment_start..]
        .char_indices()
        .rev()
        .filter(|&(i, c)| c == '.' && i > 0)
        .map(move |(i, _)| segment_start + i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::problem::ProblemCode;
    use http::header::CONTENT_TYPE;
    use http::HeaderMap;

    fn policies(yaml: &str) -> PolicySet {
        let file: PolicyFile = serde_yaml::from_str(yaml).unwrap();
        PolicySet::compile(file.into_loaded(Path::new("test.yaml")).collect()).unwrap()
    }

    const SHOP: &str = r#"
policies:
  - name: buy
    match: { methods: [POST], path: /shop }
    require: { scopes: [product:buy], audience: https://shop.example/api }
    binding_message: "Do you want to buy {{qty}} {{product}}"
  - name: cancel
    match: { methods: [delete, POST], path: "/orders/{orderId}" }
    require: { scopes: [order:cancel] }
    binding_message: "Cancel order {{params.orderId}}"
  - name: admin
    match: { methods: ["*"], path: "/admin/{*rest}", host: admin.example }
    require: { scopes: [admin] }
    binding_message: "Admin call"
"#;

    fn find<'a>(
        set: &'a PolicySet,
        method: &str,
        host: Option<&str>,
        raw: &str,
    ) -> Option<&'a str> {
        let host = host.map(|h| host_key(h).unwrap());
        set.find(method, host.as_deref(), &normalize(raw).unwrap())
            .map(|m| m.policy.name.as_str())
    }

    #[test]
    fn matches_method_path_and_host() {
        let set = policies(SHOP);
        assert_eq!(find(&set, "POST", None, "/shop"), Some("buy"));
        assert_eq!(find(&set, "post", None, "/SHOP/"), Some("buy"));
        assert_eq!(find(&set, "GET", None, "/shop"), None);
        assert_eq!(find(&set, "DELETE", None, "/orders/7"), Some("cancel"));
        assert_eq!(
            find(&set, "PATCH", Some("admin.example:8443"), "/admin/x/y"),
            Some("admin")
        );
        assert_eq!(
            find(&set, "PATCH", Some("other.example"), "/admin/x/y"),
            None
        );
        assert_eq!(
            find(&set, "GET", Some("Admin.Example."), "/admin/x"),
            Some("admin")
        );
    }

    #[test]
    fn head_is_covered_by_get_policies() {
        let set = policies(
            r#"
policies:
  - { name: read, match: { methods: [GET], path: /secrets }, require: { scopes: [x] }, binding_message: a }
"#,
        );
        assert_eq!(find(&set, "HEAD", None, "/secrets"), Some("read"));
        assert_eq!(find(&set, "head", None, "/secrets"), Some("read"));
    }

    #[test]
    fn format_suffixes_are_covered_unless_turned_off() {
        let set = policies(SHOP);
        assert_eq!(find(&set, "POST", None, "/shop.json"), Some("buy"));
        assert_eq!(find(&set, "POST", None, "/SHOP.tar.gz/"), Some("buy"));
        assert_eq!(find(&set, "DELETE", None, "/orders/7.json"), Some("cancel"));
        assert_eq!(find(&set, "POST", None, "/shopping"), None);
        assert_eq!(find(&set, "POST", None, "/.shop"), None);
        let strict = policies(
            r#"
policies:
  - { name: a, match: { methods: [POST], path: /shop, format_suffix: false }, require: { scopes: [x] }, binding_message: a }
"#,
        );
        assert_eq!(find(&strict, "POST", None, "/shop.json"), None);
        assert!(set.covers(None, &normalize("/orders/7").unwrap()));
        assert!(set.covers(None, &normalize("/shop.xml").unwrap()));
        assert!(!set.covers(None, &normalize("/products").unwrap()));
    }

    #[test]
    fn path_parameters_keep_their_spelling() {
        let set = policies(SHOP);
        let m = set
            .find("DELETE", None, &normalize("/ORDERS/AbC%20d").unwrap())
            .unwrap();
        assert_eq!(m.params, vec![("orderId".to_owned(), "AbC d".to_owned())]);
        let headers = HeaderMap::new();
        let input = CallInput {
            params: &m.params,
            ..call(&headers, None, None)
        };
        let rendered = set.render_call(m.policy, &input).unwrap();
        assert_eq!(rendered.binding_message, "Cancel order AbC d");
    }

    #[test]
    fn overlapping_policies_are_refused() {
        let file: PolicyFile = serde_yaml::from_str(
            r#"
policies:
  - { name: a, match: { methods: [POST], path: /shop }, require: { scopes: [x] }, binding_message: a }
  - { name: b, match: { methods: [POST], path: /Shop/ }, require: { scopes: [x] }, binding_message: b }
"#,
        )
        .unwrap();
        let loaded = file.into_loaded(Path::new("p.yaml")).collect();
        let error = PolicySet::compile(loaded).unwrap_err().to_string();
        assert!(error.contains("policies[1] ('b')"), "{error}");
        assert!(error.contains("overlaps policy 'a'"), "{error}");
    }

    #[test]
    fn a_value_shown_from_the_body_or_query_that_the_path_also_names_is_refused() {
        for message in ["Cancel {{body.orderid}}", "Cancel {{query.ORDERID}}"] {
            let yaml = format!(
                "policies:\n  - {{ name: a, match: {{ methods: [POST], path: '/orders/{{orderId}}' }}, require: {{ scopes: [x] }}, binding_message: '{message}' }}\n"
            );
            let file: PolicyFile = serde_yaml::from_str(&yaml).unwrap();
            let loaded = file.into_loaded(Path::new("p.yaml")).collect();
            let error = PolicySet::compile(loaded).unwrap_err().to_string();
            assert!(error.contains("the path also has a parameter"), "{error}");
        }
    }

    static ALICE: std::sync::LazyLock<Value> =
        std::sync::LazyLock::new(|| serde_json::json!({"sub": "alice"}));

    fn json_headers(content_type: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, content_type.parse().unwrap());
        headers
    }

    fn call<'a>(
        headers: &'a HeaderMap,
        body: Option<&'a str>,
        query: Option<&'a str>,
    ) -> CallInput<'a> {
        CallInput {
            headers,
            body: body.map(str::as_bytes),
            params: &[],
            query,
            user: &ALICE,
            method: "POST",
            path: "/shop",
        }
    }

    fn render(
        set: &PolicySet,
        name: &str,
        headers: &HeaderMap,
        body: Option<&str>,
        query: Option<&str>,
    ) -> Result<RenderedRequest, CallError> {
        let policy = set.policies().iter().find(|p| p.name == name).unwrap();
        set.render_call(policy, &call(headers, body, query))
    }

    const SHOWN: &str = r#"
policies:
  - name: buy
    match: { methods: [POST], path: /shop }
    require: { scopes: [product:buy] }
    binding_message: "Buy {{qty}} {{product}} for {{user.sub}} {{request.method}}"
  - name: search
    match: { methods: [GET], path: /search }
    require: { scopes: [search] }
    binding_message: "Search page {{query.page}}"
    authorization_details: { type: search, sort: "{{query.sort}}" }
  - name: strict
    match: { methods: [POST], path: /strict }
    require: { scopes: [product:buy] }
    binding_message: "Buy {{qty}} {{product}}"
    authorization_details: [{ type: product_purchase, price_limit: "{{body.priceLimit}}" }]
    body: { only: [product, QTY, priceLimit] }
  - name: cancel
    match: { methods: [DELETE], path: "/orders/{id}" }
    require: { scopes: [order:cancel] }
    binding_message: "Cancel order {{params.id}}"
"#;

    #[test]
    fn body_fields_and_sections_feed_templates() {
        let set = policies(SHOWN);
        let headers = json_headers("application/json");
        let body = r#"{"product": "XYZ phone", "qty": 2, "user": {"sub": "spoof"}}"#;
        let rendered = render(&set, "buy", &headers, Some(body), Some("a=1")).unwrap();
        assert_eq!(rendered.binding_message, "Buy 2 XYZ phone for alice POST");
    }

    #[test]
    fn a_body_the_message_reads_must_be_declared_json() {
        let set = policies(SHOWN);
        let body = Some(r#"{"product": "XYZ phone", "qty": 2}"#);
        for accepted in [
            "application/json",
            "Application/JSON; charset=utf-8",
            "application/json;charset=\"UTF-8\"",
            "application/vnd.shop+json",
            "application/json; version=2",
        ] {
            let headers = json_headers(accepted);
            assert!(
                render(&set, "buy", &headers, body, None).is_ok(),
                "{accepted}"
            );
        }
        for refused in [
            "application/x-www-form-urlencoded",
            "text/plain",
            "multipart/form-data; boundary=x",
            "application/jsonx",
            "application/+json",
            "text/json",
            "application/json; charset=latin1",
            "application/json; charset=utf-16",
            "application/json; garbage",
        ] {
            let headers = json_headers(refused);
            let error = render(&set, "buy", &headers, body, None).unwrap_err();
            assert!(matches!(error, CallError::NotJson(_)), "{refused}: {error}");
            assert_eq!(error.code(), ProblemCode::InvalidBody);
            assert!(error.to_string().contains("application/json"), "{error}");
        }
        let error = render(&set, "buy", &HeaderMap::new(), body, None).unwrap_err();
        assert!(
            error.to_string().contains("without a Content-Type"),
            "{error}"
        );
        let mut twice = json_headers("application/json");
        twice.append(CONTENT_TYPE, "text/plain".parse().unwrap());
        let error = render(&set, "buy", &twice, body, None).unwrap_err();
        assert!(error.to_string().contains("more than one"), "{error}");
        let mut gzip = json_headers("application/json");
        gzip.insert(http::header::CONTENT_ENCODING, "gzip".parse().unwrap());
        let error = render(&set, "buy", &gzip, body, None).unwrap_err();
        assert!(matches!(error, CallError::Encoded(_)), "{error}");
        let headers = json_headers("application/json");
        assert_eq!(
            render(&set, "buy", &headers, None, None).unwrap_err(),
            CallError::MissingBody
        );
        // A policy that shows no body field does not read the body at all.
        let form = json_headers("application/x-www-form-urlencoded");
        let m = set
            .find("DELETE", None, &normalize("/orders/7").unwrap())
            .unwrap();
        let input = CallInput {
            params: &m.params,
            ..call(&form, Some("reason=x"), None)
        };
        assert!(set.render_call(m.policy, &input).is_ok());
    }

    #[test]
    fn the_body_is_parsed_strictly() {
        let set = policies(SHOWN);
        let headers = json_headers("application/json");
        let error = render(
            &set,
            "buy",
            &headers,
            Some(r#"{"product": "XYZ phone", "qty": 1, "QTY": 100}"#),
            None,
        )
        .unwrap_err();
        assert!(matches!(error, CallError::Body(_)), "{error}");
        assert_eq!(error.code(), ProblemCode::InvalidBody);
        assert!(error.to_string().contains("'qty' and 'QTY'"), "{error}");
    }

    #[test]
    fn a_query_parameter_the_templates_read_must_be_given_once() {
        let set = policies(SHOWN);
        let headers = HeaderMap::new();
        let rendered = render(
            &set,
            "search",
            &headers,
            None,
            Some("page=2&sort=price&x=1&x=2"),
        );
        let rendered = rendered.unwrap();
        assert_eq!(rendered.binding_message, "Search page 2");
        assert_eq!(
            rendered.authorization_details,
            Some(serde_json::json!({"type": "search", "sort": "price"}))
        );
        for query in [
            "page=100&page=1&sort=a",
            "page=1&PAGE=100&sort=a",
            "pa%67e=100&page=1&sort=a",
            "page=1&sort=a&Sort=b",
        ] {
            let error = render(&set, "search", &headers, None, Some(query)).unwrap_err();
            assert!(
                matches!(error, CallError::RepeatedQuery(_)),
                "{query}: {error}"
            );
            assert_eq!(error.code(), ProblemCode::InvalidQuery);
        }
        let error = render(
            &set,
            "search",
            &headers,
            None,
            Some("page=1;page=100&sort=a"),
        );
        assert_eq!(error.unwrap_err(), CallError::QuerySemicolon);
        let error = render(&set, "search", &headers, None, Some("PAGE=1&sort=a")).unwrap_err();
        assert_eq!(error.code(), ProblemCode::InvalidQuery);
        assert!(error.to_string().contains("no parameter 'page'"), "{error}");
        let error = render(&set, "search", &headers, None, Some("page=%FF&sort=a"));
        assert_eq!(
            error.unwrap_err(),
            CallError::QueryNotUtf8("page".to_owned())
        );
    }

    #[test]
    fn body_only_refuses_fields_the_approval_does_not_show() {
        let set = policies(SHOWN);
        let headers = json_headers("application/json");
        let strict = |body: &str| render(&set, "strict", &headers, Some(body), None);
        let rendered = strict(r#"{"product": "XYZ phone", "qty": 2, "priceLimit": 900}"#).unwrap();
        assert_eq!(rendered.binding_message, "Buy 2 XYZ phone");
        let error =
            strict(r#"{"product": "XYZ phone", "qty": 2, "giftTo": "mallory"}"#).unwrap_err();
        assert_eq!(
            error,
            CallError::UnshownField {
                field: "giftTo".to_owned(),
                allowed: "'product', 'QTY', 'priceLimit'".to_owned()
            }
        );
        assert_eq!(error.code(), ProblemCode::InvalidBody);
        let error = strict(r#"[{"product": "XYZ phone", "qty": 2}]"#).unwrap_err();
        assert!(matches!(error, CallError::NotAnObject(_)), "{error}");
    }

    fn load_error(policy: &str) -> String {
        let yaml = format!(
            "policies:\n  - {{ name: p, match: {{ methods: [POST], path: /p }}, require: {{ scopes: [x] }}, {policy} }}"
        );
        let file: PolicyFile = serde_yaml::from_str(&yaml).unwrap();
        PolicySet::compile(file.into_loaded(Path::new("p.yaml")).collect())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn body_only_must_list_every_body_field_the_approval_shows() {
        let error =
            load_error(r#"binding_message: "Buy {{qty}} {{product}}", body: { only: [qty] }"#);
        assert!(error.contains("does not list 'product'"), "{error}");
        let error = load_error(
            r#"binding_message: "Buy {{qty}}", authorization_details: { p: "{{body.product.name}}" }, body: { only: [qty] }"#,
        );
        assert!(error.contains("does not list 'product'"), "{error}");
        let error =
            load_error(r#"binding_message: "Buy", authorization_details: { q: "{{query}}" }"#);
        assert!(error.contains("whole section"), "{error}");
    }
}
