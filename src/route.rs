//! Which upstream a call goes to, and which upstreams a policy's calls can
//! reach (so a policy's token is only ever sent where the policy says).

use crate::policy::{host_key, Policy};

/// One configured route as the table needs it: the config types stay above
/// this module (config builds the table, never the other way round).
#[derive(Debug, Clone, Copy)]
pub struct RouteRule<'a> {
    pub host: Option<&'a str>,
    pub path_prefix: &'a str,
    pub upstream: &'a str,
}

/// Routes in configuration order; the first whose host and path prefix match wins.
#[derive(Debug)]
pub struct Routes {
    routes: Vec<Route>,
}

#[derive(Debug)]
struct Route {
    /// A [`host_key`].
    host: Option<String>,
    /// Lower-cased without trailing '/', compared against the normalised
    /// match key; empty for every path.
    prefix: String,
    upstream: String,
}

impl Routes {
    /// With no `rules`, the upstreams (by name, in order) take every call:
    /// the first one wins.
    pub fn new<'a>(rules: &[RouteRule<'_>], upstreams: impl IntoIterator<Item = &'a str>) -> Self {
        let routes = if rules.is_empty() {
            upstreams
                .into_iter()
                .map(|name| Route {
                    host: None,
                    prefix: String::new(),
                    upstream: name.to_owned(),
                })
                .collect()
        } else {
            rules
                .iter()
                .map(|r| Route {
                    host: r
                        .host
                        .map(|h| host_key(h).unwrap_or_else(|_| h.to_ascii_lowercase())),
                    prefix: r.path_prefix.trim_end_matches('/').to_ascii_lowercase(),
                    upstream: r.upstream.to_owned(),
                })
                .collect()
        };
        Self { routes }
    }

    /// `host` is a [`host_key`]; `key` is the normalised match key.
    pub fn find(&self, host: Option<&str>, key: &str) -> Option<&str> {
        self.routes
            .iter()
            .find(|r| r.host.as_deref().is_none_or(|h| Some(h) == host) && r.covers_key(key))
            .map(|r| r.upstream.as_str())
    }

    /// Every upstream some call under `policy` could be routed to. An
    /// over-approximation: a route counts when some path of the policy could
    /// fall under its prefix, and the scan stops at the first route that
    /// takes all of the policy's calls.
    pub fn reachable_from<'a>(&'a self, policy: &Policy) -> Vec<&'a str> {
        let template = policy.path_template.to_ascii_lowercase();
        let template = template.trim_end_matches('/');
        let literal = template.split('{').next().unwrap_or_default();
        let has_params = literal.len() < template.len();
        let mut reachable: Vec<&str> = Vec::new();
        for route in &self.routes {
            let host_overlaps = match (&route.host, &policy.host) {
                (Some(route_host), Some(policy_host)) => route_host == policy_host,
                _ => true,
            };
            if !host_overlaps {
                continue;
            }
            let all_paths = if has_params {
                route.prefix.is_empty()
                    || under_prefix(literal.trim_end_matches('/'), &route.prefix)
            } else {
                route.covers_key(template)
            };
            let some_paths = all_paths
                || if has_params {
                    route.prefix.starts_with(literal)
                } else {
                    policy.format_suffix && route.prefix.starts_with(&format!("{template}."))
                };
            if some_paths && !reachable.contains(&route.upstream.as_str()) {
                reachable.push(&route.upstream);
            }
            let all_hosts = route.host.is_none() || route.host == policy.host;
            if all_paths && all_hosts {
                break;
            }
        }
        reachable
    }
}

impl Route {
    fn covers_key(&self, key: &str) -> bool {
        self.prefix.is_empty() || under_prefix(key, &self.prefix)
    }
}

/// `path` is `prefix` or below it, on a segment boundary.
fn under_prefix(path: &str, prefix: &str) -> bool {
    path.starts_with(prefix) && matches!(path.as_bytes().get(prefix.len()), None | Some(b'/'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{PolicyFile, PolicySet};
    use std::path::Path;

    fn route<'a>(host: Option<&'a str>, path_prefix: &'a str, upstream: &'a str) -> RouteRule<'a> {
        RouteRule {
            host,
            path_prefix,
            upstream,
        }
    }

    #[test]
    fn prefixes_match_on_segment_boundaries() {
        let routes = Routes::new(
            &[
                route(None, "/api/", "api"),
                route(Some("Shop.Example."), "/", "shop"),
            ],
            [],
        );
        assert_eq!(routes.find(None, "/api/x"), Some("api"));
        assert_eq!(routes.find(None, "/api"), Some("api"));
        assert_eq!(routes.find(None, "/apix"), None);
        assert_eq!(routes.find(Some("shop.example"), "/apix"), Some("shop"));
    }

    fn reachable(routes: &[RouteRule<'_>], policy: &str) -> Vec<String> {
        let file: PolicyFile = serde_yaml::from_str(&format!(
            "policies:\n  - {{ name: p, require: {{ scopes: [x] }}, binding_message: m, match: {policy} }}"
        ))
        .unwrap();
        let set = PolicySet::compile(file.into_loaded(Path::new("p.yaml")).collect()).unwrap();
        let routes = Routes::new(routes, []);
        let found = routes.reachable_from(&set.policies()[0]);
        found.into_iter().map(str::to_owned).collect()
    }

    #[test]
    fn a_policy_reaches_every_route_its_calls_can_take() {
        let by_host = [
            route(Some("other.example"), "/", "other"),
            route(None, "/", "shop"),
        ];
        // Any Host may be sent with POST /shop, and other.example goes elsewhere.
        assert_eq!(
            reachable(&by_host, "{ methods: [POST], path: /shop }"),
            ["other", "shop"]
        );
        assert_eq!(
            reachable(
                &by_host,
                "{ methods: [POST], path: /shop, host: shop.example }"
            ),
            ["shop"]
        );
        let by_path = [
            route(None, "/orders/archive", "archive"),
            route(None, "/shop.json", "legacy"),
            route(None, "/", "shop"),
        ];
        assert_eq!(
            reachable(&by_path, "{ methods: [DELETE], path: \"/orders/{id}\" }"),
            ["archive", "shop"]
        );
        assert_eq!(
            reachable(&by_path, "{ methods: [POST], path: /shop }"),
            ["legacy", "shop"]
        );
        assert_eq!(
            reachable(
                &by_path,
                "{ methods: [POST], path: /shop, format_suffix: false }"
            ),
            ["shop"]
        );
    }
}
