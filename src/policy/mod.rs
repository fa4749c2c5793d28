//! The policy engine: which calls need whose approval, and what the person is
//! asked. Compiled once at load; matching is a radix-tree lookup per method,
//! so its cost does not grow with the number of policies.

pub mod body;
pub mod path;
pub mod spec;
pub mod template;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Map, Value};
use thiserror::Error;

pub use path::{normalize, NormalizedPath, PathError};
pub use spec::{PolicyFile, PolicySpec};
pub use template::{RenderError, TemplateEngine};

use template::RegisteredDetails;

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
    pub file: PathBuf,
    message_key: String,
    details: Option<RegisteredDetails>,
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
    fn lookup<'p>(&self, method: &str, key: &'p str) -> Option<matchit::Match<'_, 'p, &usize>> {
        [method, "*"]
            .into_iter()
            .filter_map(|m| self.by_method.get(m))
            .find_map(|router| router.at(key).ok())
    }
}

/// Every policy, indexed for matching.
#[derive(Debug)]
pub struct PolicySet {
    policies: Vec<Policy>,
    by_host: HashMap<String, MethodRouters>,
    any_host: MethodRouters,
    templates: TemplateEngine,
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

impl PolicySet {
    pub fn empty() -> Self {
        Self {
            policies: Vec::new(),
            by_host: HashMap::new(),
            any_host: MethodRouters::default(),
            templates: TemplateEngine::new(),
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
            let id = set.policies.len();
            let host = spec.matcher.host.as_ref().map(|h| h.0.clone());
            let routers = match &host {
                Some(h) => set.by_host.entry(h.clone()).or_default(),
                None => &mut set.any_host,
            };
            for method in &spec.matcher.methods {
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
            let message_key = format!("policy-{id}");
            set.templates
                .add_message(&message_key, &spec.binding_message);
            let details = spec
                .authorization_details
                .as_ref()
                .map(|d| set.templates.add_details(&message_key, d));
            set.policies.push(Policy {
                name,
                scopes: spec.require.scopes.0.clone(),
                audience: spec.require.audience.clone(),
                requested_expiry: spec.requested_expiry,
                path_template: spec.matcher.path.source.clone(),
                methods: spec.matcher.methods.iter().map(|m| m.0.clone()).collect(),
                host,
                file: source_file,
                message_key,
                details,
            });
        }
        Ok(set)
    }

    pub fn policies(&self) -> &[Policy] {
        &self.policies
    }

    /// Finds the policy for a call. `method` is matched case-insensitively;
    /// `host` is a [`host_key`]. Host-specific policies win over host-less ones.
    pub fn find(
        &self,
        method: &str,
        host: Option<&str>,
        path: &NormalizedPath,
    ) -> Option<PolicyMatch<'_>> {
        let method = method.to_ascii_uppercase();
        let key = path.match_key.as_str();
        let found = host
            .and_then(|h| self.by_host.get(h))
            .and_then(|routers| routers.lookup(&method, key))
            .or_else(|| self.any_host.lookup(&method, key))?;
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

    /// Renders the binding message and authorization details for a call.
    pub fn render(&self, policy: &Policy, context: &Value) -> Result<RenderedRequest, RenderError> {
        let binding_message = self
            .templates
            .render_message(&policy.message_key, context)?;
        let authorization_details = policy
            .details
            .as_ref()
            .map(|d| self.templates.render_details(d, context))
            .transpose()?;
        Ok(RenderedRequest {
            binding_message,
            authorization_details,
        })
    }
}

/// A `Host` header (or authority) as policies and routes compare it:
/// lower-cased, without port. IPv6 literals keep their brackets.
pub fn host_key(raw: &str) -> String {
    let host = if raw.starts_with('[') {
        raw.split_once(']')
            .map_or(raw, |(h, _)| &raw[..h.len() + 1])
    } else {
        raw.rsplit_once(':').map_or(raw, |(h, _)| h)
    };
    host.to_ascii_lowercase()
}

/// The values a template can read. Body fields sit at the top level for
/// brevity (`{{qty}}`); the named sections below win over body fields of the
/// same name.
pub fn template_context(
    body: Option<&Value>,
    params: &[(String, String)],
    query: Option<&str>,
    user: &Value,
    method: &str,
    path: &str,
) -> Value {
    let mut root = match body {
        Some(Value::Object(fields)) => fields.clone(),
        _ => Map::new(),
    };
    root.insert("body".into(), body.cloned().unwrap_or(Value::Null));
    root.insert(
        "params".into(),
        Value::Object(
            params
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect(),
        ),
    );
    let query: Map<String, Value> = url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), Value::String(v.into_owned())))
        .collect();
    root.insert("query".into(), Value::Object(query));
    root.insert("user".into(), user.clone());
    root.insert(
        "request".into(),
        serde_json::json!({ "method": method, "path": path }),
    );
    Value::Object(root)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let host = host.map(host_key);
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
    }

    #[test]
    fn path_parameters_keep_their_spelling() {
        let set = policies(SHOP);
        let m = set
            .find("DELETE", None, &normalize("/ORDERS/AbC%20d").unwrap())
            .unwrap();
        assert_eq!(m.params, vec![("orderId".to_owned(), "AbC d".to_owned())]);
        let context = template_context(None, &m.params, None, &Value::Null, "DELETE", "/");
        let rendered = set.render(m.policy, &context).unwrap();
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
    fn body_fields_and_sections_feed_templates() {
        let body = serde_json::json!({"product": "XYZ phone", "qty": 2, "user": "spoof"});
        let user = serde_json::json!({"sub": "alice"});
        let context = template_context(Some(&body), &[], Some("a=1"), &user, "POST", "/shop");
        assert_eq!(context["qty"], 2);
        assert_eq!(context["user"]["sub"], "alice");
        assert_eq!(context["query"]["a"], "1");
    }
}
