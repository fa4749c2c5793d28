//! Which upstream a call goes to.

use crate::config::{RouteConfig, UpstreamConfig};
use std::collections::BTreeMap;

/// Routes in configuration order; the first whose host and path prefix match wins.
#[derive(Debug)]
pub struct Routes {
    routes: Vec<Route>,
}

#[derive(Debug)]
struct Route {
    host: Option<String>,
    /// Lower-cased, compared against the normalised match key.
    prefix: String,
    upstream: String,
}

impl Routes {
    pub fn new(routes: &[RouteConfig], upstreams: &BTreeMap<String, UpstreamConfig>) -> Self {
        let routes = if routes.is_empty() {
            upstreams
                .keys()
                .map(|name| Route {
                    host: None,
                    prefix: "/".into(),
                    upstream: name.clone(),
                })
                .collect()
        } else {
            routes
                .iter()
                .map(|r| Route {
                    host: r.host.as_ref().map(|h| h.to_ascii_lowercase()),
                    prefix: r.path_prefix.trim_end_matches('/').to_ascii_lowercase(),
                    upstream: r.upstream.0.clone(),
                })
                .collect()
        };
        Self { routes }
    }

    /// `host` is lower-cased without port; `key` is the normalised match key.
    pub fn find(&self, host: Option<&str>, key: &str) -> Option<&str> {
        self.routes
            .iter()
            .find(|r| {
                let host_ok = r.host.as_deref().is_none_or(|h| Some(h) == host);
                let path_ok = r.prefix.is_empty()
                    || r.prefix == "/"
                    || (key.starts_with(&r.prefix)
                        && matches!(key.as_bytes().get(r.prefix.len()), None | Some(b'/')));
                host_ok && path_ok
            })
            .map(|r| r.upstream.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UpstreamRef;

    #[test]
    fn prefixes_match_on_segment_boundaries() {
        let upstreams = BTreeMap::new();
        let routes = Routes::new(
            &[
                RouteConfig {
                    host: None,
                    path_prefix: "/api/".into(),
                    upstream: UpstreamRef("api".into()),
                },
                RouteConfig {
                    host: Some("Shop.Example".into()),
                    path_prefix: "/".into(),
                    upstream: UpstreamRef("shop".into()),
                },
            ],
            &upstreams,
        );
        assert_eq!(routes.find(None, "/api/x"), Some("api"));
        assert_eq!(routes.find(None, "/api"), Some("api"));
        assert_eq!(routes.find(None, "/apix"), None);
        assert_eq!(routes.find(Some("shop.example"), "/apix"), Some("shop"));
    }
}
