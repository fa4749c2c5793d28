//! MCP endpoints as policies see them: a path where JSON-RPC `tools/call`
//! requests for some tools are held, and everything else passes.
//!
//! A policy with `match: { path: /mcp, mcp: { tool: buy_product } }` makes
//! `/mcp` an MCP endpoint and holds calls of `buy_product` there. Several
//! policies may share one endpoint, each for its own tools. A tool name is
//! compared exactly; a name that equals a held tool only when letter case
//! is ignored is refused ([`ToolMatch::CaseVariant`]), since a server that
//! looks tools up without case would run the held tool unasked.

use std::collections::HashMap;

use super::body::fold_case;
use super::spec::ToolPattern;

/// One MCP endpoint: its path, and the tools held there.
#[derive(Debug)]
pub struct McpEndpoint {
    /// The path template, as written in the policy.
    pub path_template: String,
    /// Exact names first, then globs, each in load order: `(pattern, policy
    /// index)`.
    tools: Vec<(ToolPattern, usize)>,
}

/// How a tool name falls under an endpoint's policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolMatch {
    /// Held by the policy at this index.
    Held(usize),
    /// Equal to a held tool (of the policy at this index) only up to letter
    /// case: refused.
    CaseVariant(usize),
    /// Not held: the call passes.
    Free,
}

impl McpEndpoint {
    pub(super) fn new(path_template: String) -> Self {
        Self {
            path_template,
            tools: Vec::new(),
        }
    }

    /// Adds a policy's tool; two policies may not hold the same exact name
    /// (ignoring letter case) on one endpoint. Returns the other policy's
    /// index on a clash.
    pub(super) fn add(&mut self, tool: ToolPattern, policy: usize) -> Result<(), usize> {
        let is_glob = tool.0.contains('*');
        if !is_glob {
            let folded = fold_case(&tool.0);
            if let Some((_, other)) = self
                .tools
                .iter()
                .find(|(t, _)| !t.0.contains('*') && fold_case(&t.0) == folded)
            {
                return Err(*other);
            }
            let at = self
                .tools
                .iter()
                .take_while(|(t, _)| !t.0.contains('*'))
                .count();
            self.tools.insert(at, (tool, policy));
        } else {
            self.tools.push((tool, policy));
        }
        Ok(())
    }

    /// Which policy, if any, holds a call of the tool `name`.
    pub fn tool(&self, name: &str) -> ToolMatch {
        if let Some((_, policy)) = self.tools.iter().find(|(t, _)| glob(&t.0, name)) {
            return ToolMatch::Held(*policy);
        }
        let folded = fold_case(name);
        match self
            .tools
            .iter()
            .find(|(t, _)| glob(&fold_case(&t.0), &folded))
        {
            Some((_, policy)) => ToolMatch::CaseVariant(*policy),
            None => ToolMatch::Free,
        }
    }

    /// The tool name (or glob) the policy at `policy` holds here.
    /// The policies holding this endpoint's tools.
    pub fn policies(&self) -> impl Iterator<Item = usize> + '_ {
        self.tools.iter().map(|(_, policy)| *policy)
    }

    pub fn pattern(&self, policy: usize) -> &str {
        self.tools
            .iter()
            .find(|(_, p)| *p == policy)
            .map_or("", |(t, _)| t.0.as_str())
    }
}

/// `*` matches any run of characters (also none); everything else itself.
fn glob(pattern: &str, name: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = name.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// Every MCP endpoint, indexed like REST policies (radix trees per host).
#[derive(Debug, Default)]
pub(super) struct McpIndex {
    pub(super) endpoints: Vec<McpEndpoint>,
    by_host: crate::FastMap<String, matchit::Router<usize>>,
    any_host: matchit::Router<usize>,
    /// `(host, route)` to endpoint index.
    keys: HashMap<(Option<String>, String), usize>,
}

impl McpIndex {
    /// The endpoint at `route` for `host`, created on first use.
    pub(super) fn endpoint(
        &mut self,
        host: Option<&str>,
        route: &str,
        source: &str,
    ) -> Result<&mut McpEndpoint, String> {
        let key = (host.map(str::to_owned), route.to_owned());
        let id = match self.keys.get(&key) {
            Some(id) => *id,
            None => {
                let id = self.endpoints.len();
                let router = match host {
                    Some(h) => self.by_host.entry(h.to_owned()).or_default(),
                    None => &mut self.any_host,
                };
                router.insert(route.to_owned(), id).map_err(|e| {
                    format!("match.path {source:?} overlaps another MCP endpoint: {e}")
                })?;
                self.endpoints.push(McpEndpoint::new(source.to_owned()));
                self.keys.insert(key, id);
                id
            }
        };
        Ok(&mut self.endpoints[id])
    }

    /// The endpoint a normalised path key falls under; host-specific first.
    pub(super) fn find<'p>(
        &self,
        host: Option<&str>,
        key: &'p str,
    ) -> Option<matchit::Match<'_, 'p, &usize>> {
        host.and_then(|h| self.by_host.get(h))
            .and_then(|router| router.at(key).ok())
            .or_else(|| self.any_host.at(key).ok())
    }

    /// `(host, route)` of every endpoint.
    pub(super) fn routes(&self) -> impl Iterator<Item = (&Option<String>, &str, usize)> {
        self.keys.iter().map(|((h, r), id)| (h, r.as_str(), *id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_runs_of_characters() {
        assert!(glob("buy_product", "buy_product"));
        assert!(!glob("buy_product", "buy_products"));
        assert!(glob("buy_*", "buy_"));
        assert!(glob("buy_*", "buy_product"));
        assert!(!glob("buy_*", "sell_product"));
        assert!(glob("*", "anything"));
        assert!(glob("*_product", "buy_product"));
        assert!(glob("a*b*c", "aXbYc"));
        assert!(!glob("a*b*c", "aXcYb"));
        assert!(!glob("ab*ba", "aba"));
    }

    fn endpoint(tools: &[&str]) -> McpEndpoint {
        let mut e = McpEndpoint::new("/mcp".into());
        for (i, t) in tools.iter().enumerate() {
            e.add(ToolPattern((*t).into()), i).unwrap();
        }
        e
    }

    #[test]
    fn exact_names_win_over_globs_and_case_variants_are_refused() {
        let e = endpoint(&["buy_*", "buy_product"]);
        assert_eq!(e.tool("buy_product"), ToolMatch::Held(1));
        assert_eq!(e.tool("buy_car"), ToolMatch::Held(0));
        assert_eq!(e.tool("Buy_Product"), ToolMatch::CaseVariant(1));
        assert_eq!(e.tool("BUY_CAR"), ToolMatch::CaseVariant(0));
        // The Kelvin sign folds to k.
        let e = endpoint(&["kill"]);
        assert_eq!(e.tool("\u{212A}ill"), ToolMatch::CaseVariant(0));
        assert_eq!(e.tool("list_products"), ToolMatch::Free);
    }

    #[test]
    fn one_exact_name_is_held_by_one_policy() {
        let mut e = endpoint(&["buy_product"]);
        assert_eq!(e.add(ToolPattern("BUY_product".into()), 5), Err(0));
    }
}
