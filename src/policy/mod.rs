//! The policy engine: which calls need whose approval, and what the person is
//! asked. Compiled once at load; matching is a radix-tree lookup per method,
//! so its cost does not grow with the number of policies.

pub mod body;
mod call;
pub mod condition;
pub mod countersign;
pub mod mcp;
pub mod path;
pub mod shadow;
pub mod spec;
pub mod template;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use thiserror::Error;

pub use call::{CallError, CallInput};
pub use condition::Condition;
pub use mcp::{McpEndpoint, ToolMatch};
pub use path::{normalize, NormalizedPath, PathError};
pub use spec::{Bind, Otherwise, PolicyFile, PolicySpec, WaitMode};
pub use template::RenderError;

use call::CallShape;
use condition::{CelValues, Reads};
use template::{DetailsTemplate, MessageTemplate};

/// The policy set in force, swapped whole by a reload: a call reads it once
/// (`load_full`) and keeps that set to its end.
pub type LivePolicies = arc_swap::ArcSwap<PolicySet>;

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
    /// `when`: the call needs this policy's approval only if it holds.
    pub condition: Option<Condition>,
    /// What a call no condition of its route takes gets (set on the last
    /// policy of a route only).
    pub otherwise: Otherwise,
    message: MessageTemplate,
    details: Option<DetailsTemplate>,
    /// Which parts of a call the templates show.
    shape: CallShape,
    /// The MCP tool (name or glob) this policy holds on its endpoint.
    pub mcp_tool: Option<String>,
    pub bind: Bind,
    /// Four eyes: who else must approve its calls.
    pub countersign: Option<countersign::Countersign>,
    /// `shadow`: only recorded, never acted on.
    pub mode: spec::Mode,
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

/// The router's value: the policies sharing one host, method and path, in
/// file order.
type Group = usize;

#[derive(Debug, Default)]
struct MethodRouters {
    by_method: crate::FastMap<String, matchit::Router<usize>>,
}

impl MethodRouters {
    /// `HEAD` is looked up as `GET` too: most frameworks run the GET handler
    /// for it. `PUT` and `PATCH` are looked up as each other: Rails'
    /// `resources` and Laravel's `Route::resource` route both to `update`.
    fn lookup<'p>(&self, method: &str, key: &'p str) -> Option<matchit::Match<'_, 'p, &Group>> {
        let twin = match method {
            "HEAD" => "GET",
            "PUT" => "PATCH",
            "PATCH" => "PUT",
            _ => "*",
        };
        [method, twin, "*"]
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
    policies: Vec<Arc<Policy>>,
    /// The policies in `mode: shadow`, as a set of their own: matched after
    /// the enforced set decided, only to record what they would do.
    shadow: Option<Box<PolicySet>>,
    /// Indices into `policies`, per route.
    groups: Vec<Vec<usize>>,
    by_host: crate::FastMap<String, MethodRouters>,
    any_host: MethodRouters,
    mcp: mcp::McpIndex,
}

/// A call on an MCP endpoint.
#[derive(Debug)]
pub struct McpMatch<'a> {
    pub endpoint: &'a McpEndpoint,
    /// Path parameters, percent-decoded, in their original case.
    pub params: Vec<(String, String)>,
}

/// A call that falls under a route of one or more policies.
#[derive(Debug)]
pub struct PolicyMatch<'a> {
    /// The first policy of the route (the only one, unless several share it).
    pub policy: &'a Arc<Policy>,
    /// Every policy of the route, in file order.
    pub candidates: Vec<&'a Arc<Policy>>,
    /// Path parameters, percent-decoded, in their original case.
    pub params: Vec<(String, String)>,
    /// On a route that covers format suffixes, the path parameter that
    /// ends the path with a '.' in its last segment: APIs that route
    /// suffixes read a shorter value than the gateway ([`suffixed_param`]).
    pub suffixed: Option<String>,
    /// The path carries `;params`, which the match (like Tomcat, Spring and
    /// Jetty) drops but Express, Rails and Go keep in a path parameter.
    pub matrix: bool,
}

/// What a matched call needs, once the conditions of its route have spoken.
#[derive(Debug, Clone)]
pub enum Choice<'a> {
    /// This policy's approval.
    Hold(&'a Arc<Policy>),
    /// No condition took it and the route says `otherwise: pass`: it is
    /// forwarded as it is, without approval.
    Pass(&'a Arc<Policy>),
    /// No condition took it and the route says `otherwise: deny`.
    Deny(&'a Arc<Policy>),
}

/// What the person will be asked, rendered from one call.
#[derive(Debug, Clone)]
pub struct RenderedRequest {
    pub binding_message: String,
    pub authorization_details: Option<Value>,
    /// Four eyes: who else is asked, and what.
    pub countersigners: Option<countersign::Countersigners>,
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
            shadow: None,
            groups: Vec::new(),
            by_host: crate::FastMap::default(),
            any_host: MethodRouters::default(),
            mcp: mcp::McpIndex::default(),
        }
    }

    pub fn compile(loaded: Vec<LoadedPolicy>) -> Result<Self, PolicyError> {
        let (shadow, enforced): (Vec<_>, Vec<_>) = loaded
            .into_iter()
            .partition(|l| l.spec.mode == spec::Mode::Shadow);
        let mut set = Self::compile_one(enforced)?;
        if shadow.is_empty() {
            return Ok(set);
        }
        let shadow = Self::compile_one(shadow)?;
        // One name, one policy: metrics and the audit trail name them.
        if let Some(twin) = shadow
            .policies
            .iter()
            .find(|p| set.by_name(&p.name).is_some())
        {
            return Err(PolicyError {
                file: twin.file.display().to_string(),
                index: twin.index,
                name: twin.name.clone(),
                reason: "the name is already used by an enforced policy; a shadow policy needs a name of its own".into(),
            });
        }
        set.shadow = Some(Box::new(shadow));
        Ok(set)
    }

    /// The set in `mode: shadow`, if any.
    pub fn shadow(&self) -> Option<&PolicySet> {
        self.shadow.as_deref()
    }

    /// The enforced policies and the shadow ones.
    pub fn all_policies(&self) -> impl Iterator<Item = &Arc<Policy>> {
        self.policies
            .iter()
            .chain(self.shadow.iter().flat_map(|s| s.policies.iter()))
    }

    fn compile_one(loaded: Vec<LoadedPolicy>) -> Result<Self, PolicyError> {
        let mut set = Self::empty();
        // (host, method, route) -> group.
        let mut routes: HashMap<(Option<String>, String, String), Group> = HashMap::new();
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
            let fail = |reason: String| PolicyError {
                file: file.clone(),
                index,
                name: name.clone(),
                reason,
            };
            let countersign_message = spec.countersign.as_ref().map(|c| &c.binding_message);
            let shape = CallShape::new(
                &spec.binding_message,
                countersign_message,
                spec.authorization_details.as_ref(),
                spec.body.as_ref(),
                &path_parameters(&spec.matcher.path.source),
                spec.matcher.mcp.as_ref(),
            )
            .map_err(fail)?;
            if spec.bind == Bind::Call && spec.require.audience.is_none() {
                return Err(fail(
                    "`bind: call` needs require.audience: the bound token is a JWT for that API, which checks it".into(),
                ));
            }
            if spec.otherwise.is_some() && spec.when.is_none() {
                return Err(fail(
                    "`otherwise` needs a `when`: without a condition every call needs this policy's approval".into(),
                ));
            }
            if spec.matcher.mcp.is_some() && spec.when.is_some() {
                // Not silently ignored: an operator's `otherwise: deny` would
                // become a question to the person.
                return Err(fail(
                    "`when` does not go with match.mcp yet: every call of an MCP policy's tools needs approval".into(),
                ));
            }
            let id = set.policies.len();
            let host = spec.matcher.host.as_ref().map(|h| h.0.clone());
            let methods = match (&spec.matcher.methods, &spec.matcher.mcp) {
                (None, Some(_)) => Vec::new(),
                (Some(methods), None) => methods.0.clone(),
                (Some(_), Some(_)) => return Err(fail(
                    "match.methods does not go with match.mcp: an MCP tools/call is always a POST"
                        .to_owned(),
                )),
                (None, None) => {
                    return Err(fail(
                        "match needs methods (e.g. [POST]), or mcp for MCP tool calls".to_owned(),
                    ))
                }
            };
            if let Some(tool) = &spec.matcher.mcp {
                let endpoint = set
                    .mcp
                    .endpoint(
                        host.as_deref(),
                        &spec.matcher.path.route,
                        &spec.matcher.path.source,
                    )
                    .map_err(&fail)?;
                if let Err(other) = endpoint.add(tool.tool.clone(), id) {
                    let other = set.policies[other].name.clone();
                    return Err(fail(format!(
                        "match.mcp.tool {:?} is already held on this endpoint by policy '{other}'",
                        tool.tool.0
                    )));
                }
            }
            for method in &methods {
                let route = spec.matcher.path.route.clone();
                let key = (host.clone(), method.0.clone(), route.clone());
                if let Some(&group) = routes.get(&key) {
                    set.join_group(group, id, &spec).map_err(|why| {
                        fail(format!(
                            "match.path {:?} for {} {why}",
                            spec.matcher.path.source, method.0
                        ))
                    })?;
                    continue;
                }
                let group = set.groups.len();
                let routers = match &host {
                    Some(h) => set.by_host.entry(h.clone()).or_default(),
                    None => &mut set.any_host,
                };
                let router = routers.by_method.entry(method.0.clone()).or_default();
                if let Err(error) = router.insert(route.clone(), group) {
                    let other = match &error {
                        matchit::InsertError::Conflict { with } => routes
                            .get(&(host.clone(), method.0.clone(), with.clone()))
                            .map(|&g| set.policies[set.groups[g][0]].name.clone())
                            .unwrap_or_else(|| with.clone()),
                        _ => error.to_string(),
                    };
                    return Err(fail(format!(
                        "match.path {:?} for {} overlaps policy '{other}' (policies may share a route only with the same path, spelled the same)",
                        spec.matcher.path.source, method.0
                    )));
                }
                set.groups.push(vec![id]);
                routes.insert(key, group);
            }
            let countersign = spec
                .countersign
                .map(countersign::Countersign::compile)
                .transpose()
                .map_err(fail)?;
            set.policies.push(Arc::new(Policy {
                name,
                scopes: spec.require.scopes.0.clone(),
                audience: spec.require.audience.clone(),
                requested_expiry: spec.requested_expiry,
                path_template: spec.matcher.path.source.clone(),
                methods: if spec.matcher.mcp.is_some() {
                    vec!["POST".to_owned()]
                } else {
                    methods.iter().map(|m| m.0.clone()).collect()
                },
                host,
                // An MCP endpoint is one path; `/mcp.json` is not it.
                format_suffix: spec.matcher.format_suffix && spec.matcher.mcp.is_none(),
                upstreams: spec.upstreams.clone().unwrap_or_default(),
                wait: spec.wait,
                index,
                file: source_file,
                condition: spec.when,
                otherwise: spec.otherwise.unwrap_or_default(),
                message: spec.binding_message,
                details: spec.authorization_details,
                shape,
                mcp_tool: spec.matcher.mcp.map(|m| m.tool.0),
                bind: spec.bind,
                countersign,
                mode: spec.mode,
            }));
        }
        set.check_mcp_endpoints()?;
        Ok(set)
    }

    /// An MCP endpoint is not also a REST policy's path: a POST there would
    /// fall under two policies.
    fn check_mcp_endpoints(&self) -> Result<(), PolicyError> {
        for (host, route, id) in self.mcp.routes() {
            let routers = match host {
                Some(h) => self.by_host.get(h),
                None => Some(&self.any_host),
            };
            if routers.is_some_and(|r| r.covers(route))
                || (host.is_some() && self.any_host.covers(route))
            {
                let endpoint = &self.mcp.endpoints[id];
                let policy = self
                    .policies
                    .iter()
                    .find(|p| p.mcp_tool.is_some() && p.path_template == endpoint.path_template)
                    .expect("an endpoint has a policy");
                return Err(PolicyError {
                    file: policy.file.display().to_string(),
                    index: policy.index,
                    name: policy.name.clone(),
                    reason: format!(
                        "match.path {:?} is an MCP endpoint and also the path of a policy without mcp",
                        endpoint.path_template
                    ),
                });
            }
        }
        Ok(())
    }

    /// The MCP endpoint a call's path is, if any (host-specific first).
    pub fn find_mcp(&self, host: Option<&str>, path: &NormalizedPath) -> Option<McpMatch<'_>> {
        let found = self.mcp.find(host, &path.match_key)?;
        Some(McpMatch {
            endpoint: &self.mcp.endpoints[*found.value],
            params: original_params(&found.params, path),
        })
    }

    /// The MCP endpoints on `host` (or on any host) holding a tool whose
    /// policy sends its calls to `upstream`: a held tool's call sent to
    /// another path of that upstream is refused ([`crate::mcp::stray_tool_call`]).
    pub fn mcp_endpoints_to(&self, host: Option<&str>, upstream: &str) -> Vec<&McpEndpoint> {
        self.mcp
            .routes()
            .filter(|(h, _, _)| h.is_none() || h.as_deref() == host)
            .map(|(_, _, id)| &self.mcp.endpoints[id])
            .filter(|endpoint| {
                endpoint
                    .policies()
                    .any(|p| self.policies[p].upstreams.iter().any(|u| u == upstream))
            })
            .collect()
    }

    /// The policy at `index` (as [`ToolMatch`] names it).
    pub fn at(&self, index: usize) -> &Arc<Policy> {
        &self.policies[index]
    }

    /// Adds policy `id` (not yet pushed, described by `spec`) to the route
    /// `group`: only behind policies that have a condition, and only when
    /// nothing before it on the route decides what calls no condition takes.
    fn join_group(&mut self, group: Group, id: usize, spec: &PolicySpec) -> Result<(), String> {
        let last = &self.policies[*self.groups[group].last().unwrap_or(&0)];
        let why = if last.condition.is_none() {
            "which comes first and has no `when`, so this one would never apply"
        } else if last.otherwise != Otherwise::Pass {
            "which comes first and sets `otherwise`; only the last policy of a route may set it"
        } else if last.format_suffix != spec.matcher.format_suffix {
            "whose `match.format_suffix` differs; policies sharing a route must agree on it"
        } else {
            self.groups[group].push(id);
            return Ok(());
        };
        Err(format!("overlaps policy '{}', {why}", last.name))
    }

    pub fn by_name(&self, name: &str) -> Option<&Arc<Policy>> {
        self.policies.iter().find(|p| p.name == name)
    }

    pub fn policies(&self) -> &[Arc<Policy>] {
        &self.policies
    }

    /// Finds the policy for a call. `method` is matched case-insensitively
    /// (`HEAD` also as `GET`, `PUT` and `PATCH` as each other); `host` is a [`host_key`]. Host-specific
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
                .find(|m| self.policies[self.groups[*m.value][0]].format_suffix)
        })?;
        let params = original_params(&found.params, path);
        let candidates: Vec<&Arc<Policy>> = self.groups[*found.value]
            .iter()
            .map(|&id| &self.policies[id])
            .collect();
        let suffixed = candidates[0]
            .format_suffix
            .then(|| suffixed_param(&found.params, key, &params))
            .flatten();
        let matrix = !params.is_empty() && path.forward.contains(';');
        Some(PolicyMatch {
            policy: candidates[0],
            candidates,
            params,
            suffixed,
            matrix,
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
        if let Some(shadow) = &mut self.shadow {
            shadow.bind_upstreams(default);
        }
        for policy in &mut self.policies {
            if policy.upstreams.is_empty() {
                if let Some(policy) = Arc::get_mut(policy) {
                    policy.upstreams.extend(default.map(str::to_owned));
                }
            }
        }
    }

    /// Which policy of a matched route applies to this call: the first, in
    /// file order, whose `when` holds (or that has none); if none does, the
    /// last policy's `otherwise`. A condition that cannot be evaluated, or a
    /// call the conditions would read differently from the API, is an error:
    /// the call is refused, never passed.
    pub fn choose<'a>(
        &self,
        found: &PolicyMatch<'a>,
        input: &CallInput<'_>,
    ) -> Result<Choice<'a>, CallError> {
        self.choose_observed(found, input, &mut |_, _| {})
    }

    /// [`Self::choose`], telling `observe` each condition's value as it is
    /// evaluated, in order: what `countersign explain` prints and
    /// `countersign test --coverage` counts, from the one evaluation the
    /// proxy runs too.
    pub fn choose_observed<'a>(
        &self,
        found: &PolicyMatch<'a>,
        input: &CallInput<'_>,
        observe: &mut dyn FnMut(&Policy, bool),
    ) -> Result<Choice<'a>, CallError> {
        let reads = found
            .candidates
            .iter()
            .filter_map(|p| p.condition.as_ref())
            .fold(Reads::default(), |all, c| all.union(c.reads));
        // Path parameters some APIs read otherwise than the match: refused
        // where the approval shows one or a condition tests params.
        let suffixed = found.suffixed.iter().map(|name| (name.as_str(), true));
        let matrix = found
            .params
            .iter()
            .filter(|_| found.matrix)
            .map(|(name, _)| (name.as_str(), false));
        for (name, suffix) in suffixed.chain(matrix) {
            let shown = found
                .candidates
                .iter()
                .any(|p| p.shape.shows(name, shadow::Part::Path));
            if !shown && !reads.params {
                continue;
            }
            let value = input
                .params
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            let name = name.to_owned();
            return Err(match suffix {
                true => CallError::FormatSuffixParam { name, value },
                false => CallError::MatrixParam { name, value },
            });
        }
        let sections = ConditionInput::read(reads, input)?;
        for policy in &found.candidates {
            let Some(condition) = &policy.condition else {
                return Ok(Choice::Hold(policy));
            };
            tested_in_one_place(condition, input)?;
            let holds = sections.holds(policy, condition)?;
            observe(policy, holds);
            if holds {
                return Ok(Choice::Hold(policy));
            }
        }
        let last = found.candidates[found.candidates.len() - 1];
        Ok(match last.otherwise {
            Otherwise::Pass => Choice::Pass(last),
            Otherwise::Deny => Choice::Deny(last),
        })
    }

    /// Renders the binding message and authorization details for a call,
    /// after checking that the call reads the same to any permissive API as
    /// it does to the gateway (see [`CallError`] for what is refused).
    pub fn render_call(
        &self,
        policy: &Policy,
        input: &CallInput<'_>,
    ) -> Result<RenderedRequest, CallError> {
        policy.shape.render(
            &policy.message,
            policy.details.as_ref(),
            policy.countersign.as_ref(),
            input,
        )
    }
}

/// Path parameters in the caller's spelling, percent-decoded.
fn original_params(
    params: &matchit::Params<'_, '_>,
    path: &NormalizedPath,
) -> Vec<(String, String)> {
    let key = path.match_key.as_str();
    params
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
        .collect()
}

/// The path parameter, if any, that ends the matched path and has a '.' in
/// its last segment (percent-decoded). Rails' dynamic segments take no '.'
/// and its `(.:format)` the rest, Spring's suffix pattern matching cuts at
/// the last '.', Django REST framework's format suffixes likewise: to them
/// `/orders/7.5` is order 7, while the gateway (and the message) read 7.5.
fn suffixed_param(
    found: &matchit::Params<'_, '_>,
    key: &str,
    decoded: &[(String, String)],
) -> Option<String> {
    found
        .iter()
        .zip(decoded)
        .find(|((_, value), (_, decoded))| {
            let end = value.as_ptr() as usize - key.as_ptr() as usize + value.len();
            end == key.len() && decoded.rsplit('/').next().is_some_and(|s| s.contains('.'))
        })
        .map(|((name, _), _)| name.to_owned())
}

/// One name, one place ([`shadow`]) for what a condition tests: a name it
/// uses in a section it reads may be given in no other part of the call. A
/// name absent from that section counts too: `has(body.amount)` is false
/// while Rails reads `amount` from the query.
fn tested_in_one_place(condition: &Condition, input: &CallInput<'_>) -> Result<(), CallError> {
    let reads = condition.reads;
    let parts = shadow::CallParts::new(input.headers, input.query, input.body, input.params);
    if reads.body || reads.query || reads.params {
        if let Some(encoding) = parts.encoding() {
            return Err(CallError::Encoded(encoding));
        }
    }
    for (read, part) in [
        (reads.body, shadow::Part::Body),
        (reads.query, shadow::Part::Query),
        (reads.params, shadow::Part::Path),
    ] {
        if !read {
            continue;
        }
        for name in condition.names() {
            if let Some(other) = parts.also_given(name, part) {
                return Err(CallError::TestedTwice {
                    name: name.to_owned(),
                    tested: part,
                    other,
                });
            }
        }
    }
    Ok(())
}

/// The sections of one call that the conditions of its route read, read
/// once and the way the API reads them.
struct ConditionInput {
    /// The strictly parsed body, for the spelling check.
    body: Option<Value>,
    /// Query parameter names, for the spelling check.
    query_keys: Vec<String>,
    values: CelValues,
}

impl ConditionInput {
    fn read(reads: Reads, input: &CallInput<'_>) -> Result<Self, CallError> {
        let body = reads
            .body
            .then(|| call::read_json_body(input))
            .transpose()?;
        let query = reads
            .query
            .then(|| call::read_whole_query(input.query.unwrap_or("")))
            .transpose()?;
        let values = CelValues {
            body: body.as_ref().map(condition::from_json),
            params: reads.params.then(|| condition::from_pairs(input.params)),
            query: query.as_deref().map(condition::from_pairs),
            user: reads.user.then(|| condition::from_json(input.user)),
            agent: reads.agent.then(|| condition::from_json(input.agent)),
            request: reads.request.then(|| {
                condition::from_pairs(&[
                    ("method".to_owned(), input.method.to_owned()),
                    ("path".to_owned(), input.path.to_owned()),
                ])
            }),
        };
        Ok(Self {
            body,
            query_keys: query
                .unwrap_or_default()
                .into_iter()
                .map(|(k, _)| k)
                .collect(),
            values,
        })
    }

    fn holds(&self, policy: &Policy, condition: &Condition) -> Result<bool, CallError> {
        if condition.reads.body {
            if let Some(key) = self.body.as_ref().and_then(|b| condition.misspelled_in(b)) {
                return Err(CallError::Misspelled {
                    section: "body",
                    key: key.to_owned(),
                });
            }
        }
        if condition.reads.query {
            if let Some(key) = condition.misspelled(self.query_keys.iter().map(String::as_str)) {
                return Err(CallError::Misspelled {
                    section: "query",
                    key: key.to_owned(),
                });
            }
        }
        condition
            .holds(&self.values)
            .map_err(|reason| CallError::Condition {
                policy: policy.name.clone(),
                reason: reason.to_string(),
            })
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
    // Labels of letters, digits, '-' and '_', none empty: one pass, as this
    // runs on every call.
    let mut after_dot = true;
    for b in host.bytes() {
        match b {
            b'.' if after_dot => return Err(HostError::Malformed),
            b'.' => after_dot = true,
            b if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' => after_dot = false,
            _ => return Err(HostError::Malformed),
        }
    }
    if after_dot {
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
    fn put_and_patch_cover_each_other() {
        let set = policies(
            r#"
policies:
  - { name: replace, match: { methods: [PUT], path: "/carts/{id}" }, require: { scopes: [x] }, binding_message: a }
  - { name: edit, match: { methods: [PATCH], path: "/notes/{id}" }, require: { scopes: [x] }, binding_message: b }
  - { name: exact, match: { methods: [PUT], path: /both }, require: { scopes: [x] }, binding_message: c }
  - { name: other, match: { methods: [PATCH], path: /both }, require: { scopes: [x] }, binding_message: d }
"#,
        );
        assert_eq!(find(&set, "PATCH", None, "/carts/1"), Some("replace"));
        assert_eq!(find(&set, "PUT", None, "/notes/1"), Some("edit"));
        // A policy for the method itself comes first.
        assert_eq!(find(&set, "PUT", None, "/both"), Some("exact"));
        assert_eq!(find(&set, "PATCH", None, "/both"), Some("other"));
        assert_eq!(find(&set, "POST", None, "/carts/1"), None);
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
    fn a_path_parameter_ending_in_a_suffix_is_noted_unless_suffixes_are_off() {
        let set = policies(SHOP);
        let suffixed = |set: &PolicySet, method, path| {
            set.find(method, None, &normalize(path).unwrap())
                .unwrap()
                .suffixed
        };
        assert_eq!(
            suffixed(&set, "DELETE", "/orders/7.5"),
            Some("orderId".to_owned())
        );
        assert_eq!(
            suffixed(&set, "DELETE", "/orders/7%2Ejson"),
            Some("orderId".to_owned())
        );
        assert_eq!(suffixed(&set, "DELETE", "/orders/7"), None);
        let matrix = |path| {
            set.find("DELETE", None, &normalize(path).unwrap())
                .unwrap()
                .matrix
        };
        assert!(matrix("/orders/7;8"));
        assert!(!matrix("/orders/7"));
        let strict = policies(
            r#"
policies:
  - { name: a, match: { methods: [GET], path: "/files/{*rest}" }, require: { scopes: [x] }, binding_message: a }
  - { name: b, match: { methods: [GET], path: "/docs/{name}", format_suffix: false }, require: { scopes: [x] }, binding_message: b }
"#,
        );
        assert_eq!(suffixed(&strict, "GET", "/files/a.b/c"), None);
        assert_eq!(
            suffixed(&strict, "GET", "/files/a/c.pdf"),
            Some("rest".to_owned())
        );
        assert_eq!(suffixed(&strict, "GET", "/docs/v1.2"), None);
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
            agent: &Value::Null,
            method: "POST",
            path: "/shop",
            arguments: None,
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

    fn compile_yaml(yaml: &str) -> Result<PolicySet, String> {
        let file: PolicyFile = serde_yaml::from_str(yaml).map_err(|e| e.to_string())?;
        PolicySet::compile(file.into_loaded(Path::new("p.yaml")).collect())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn mcp_policies_share_an_endpoint_and_read_arguments() {
        let set = compile_yaml(
            r#"
policies:
  - { name: buy, match: { path: /mcp, mcp: { tool: buy_product } }, require: { scopes: [x] }, binding_message: "Buy {{arguments.qty}} {{arguments.product}}" }
  - { name: sell, match: { path: /MCP/, mcp: { tool: "sell_*" } }, require: { scopes: [x] }, binding_message: "Sell {{arguments.qty}}" }
  - { name: shop, match: { methods: [POST], path: /shop }, require: { scopes: [x] }, binding_message: "Buy" }
"#,
        )
        .unwrap();
        let found = set.find_mcp(None, &normalize("/mcp").unwrap()).unwrap();
        assert_eq!(found.endpoint.tool("buy_product"), ToolMatch::Held(0));
        assert_eq!(found.endpoint.tool("sell_car"), ToolMatch::Held(1));
        assert!(set.find_mcp(None, &normalize("/shop").unwrap()).is_none());
        assert!(set
            .find_mcp(None, &normalize("/mcp.json").unwrap())
            .is_none());
        // MCP policies are not REST policies: a plain POST /mcp finds none.
        assert!(set
            .find("POST", None, &normalize("/mcp").unwrap())
            .is_none());
        assert_eq!(set.at(0).methods, ["POST"]);
        let headers = HeaderMap::new();
        let arguments = serde_json::json!({ "qty": 2, "product": "XYZ phone" });
        let input = CallInput {
            arguments: Some(&arguments),
            ..call(&headers, None, None)
        };
        let rendered = set.render_call(set.at(0), &input).unwrap();
        assert_eq!(rendered.binding_message, "Buy 2 XYZ phone");
        let missing = serde_json::json!({ "qty": 2 });
        let input = CallInput {
            arguments: Some(&missing),
            ..call(&headers, None, None)
        };
        let error = set.render_call(set.at(0), &input).unwrap_err();
        assert_eq!(error.code(), ProblemCode::InvalidBody);
        assert!(error.to_string().contains("arguments.product"), "{error}");
    }

    #[test]
    fn mcp_arguments_only_refuses_arguments_the_person_is_not_shown() {
        let set = compile_yaml(
            r#"
policies:
  - { name: buy, match: { path: /mcp, mcp: { tool: buy, arguments: { only: [product, qty] } } }, require: { scopes: [x] }, binding_message: "Buy {{arguments.qty}} {{arguments.product}}" }
"#,
        )
        .unwrap();
        let headers = HeaderMap::new();
        let render = |arguments: serde_json::Value| {
            let input = CallInput {
                arguments: Some(&arguments),
                ..call(&headers, None, None)
            };
            set.render_call(set.at(0), &input)
        };
        assert!(render(serde_json::json!({ "product": "XYZ phone", "qty": 2 })).is_ok());
        let error =
            render(serde_json::json!({ "product": "XYZ phone", "qty": 2, "giftTo": "eve" }))
                .unwrap_err();
        assert_eq!(error.code(), ProblemCode::InvalidBody);
        assert!(error.to_string().contains("'giftTo'"), "{error}");
        let error = compile_yaml(
            r#"
policies:
  - { name: buy, match: { path: /mcp, mcp: { tool: buy, arguments: { only: [qty] } } }, require: { scopes: [x] }, binding_message: "Buy {{arguments.qty}} {{arguments.product}}" }
"#,
        )
        .unwrap_err();
        assert!(
            error.contains("mcp.arguments.only does not list 'product'"),
            "{error}"
        );
    }

    #[test]
    fn mcp_policies_are_checked_at_load() {
        let policy = |matcher: &str, message: &str| {
            compile_yaml(&format!(
                "policies:\n  - {{ name: p, match: {matcher}, require: {{ scopes: [x] }}, binding_message: \"{message}\" }}"
            ))
        };
        let error = compile_yaml(
            "policies:\n  - { name: p, match: { path: /mcp, mcp: { tool: t } }, when: 'true', require: { scopes: [x] }, binding_message: a }",
        )
        .unwrap_err();
        assert!(
            error.contains("`when` does not go with match.mcp"),
            "{error}"
        );
        let error = policy("{ path: /mcp }", "a").unwrap_err();
        assert!(error.contains("match needs methods"), "{error}");
        let error = policy("{ methods: [POST], path: /mcp, mcp: { tool: t } }", "a").unwrap_err();
        assert!(error.contains("does not go with match.mcp"), "{error}");
        let error = policy("{ path: /mcp, mcp: { tool: \"bad name\" } }", "a").unwrap_err();
        assert!(error.contains("must be 1-128 characters"), "{error}");
        let error = policy("{ path: /mcp, mcp: { tool: t, name: x } }", "a").unwrap_err();
        assert!(error.contains("unknown field"), "{error}");
        let error = policy("{ methods: [POST], path: /p }", "{{arguments.qty}}").unwrap_err();
        assert!(error.contains("only a policy with match.mcp"), "{error}");
        let error = compile_yaml(
            r#"
policies:
  - { name: a, match: { path: /mcp, mcp: { tool: buy } }, require: { scopes: [x] }, binding_message: a }
  - { name: b, match: { path: /mcp, mcp: { tool: BUY } }, require: { scopes: [x] }, binding_message: b }
"#,
        )
        .unwrap_err();
        assert!(
            error.contains("already held on this endpoint by policy 'a'"),
            "{error}"
        );
        let error = compile_yaml(
            r#"
policies:
  - { name: a, match: { path: /mcp, mcp: { tool: buy } }, require: { scopes: [x] }, binding_message: a }
  - { name: b, match: { methods: ["*"], path: "/{any}" }, require: { scopes: [x] }, binding_message: b }
"#,
        )
        .unwrap_err();
        assert!(
            error.contains("is an MCP endpoint and also the path"),
            "{error}"
        );
    }

    const TIERS: &str = r#"
policies:
  - name: buy-large
    match: { methods: [POST], path: /shop }
    when: "body.qty * body.price >= 1000"
    require: { scopes: [product:buy] }
    binding_message: "LARGE: buy {{qty}} {{product}}"
  - name: buy
    match: { methods: [POST], path: /shop }
    when: "body.qty > 5"
    require: { scopes: [product:buy] }
    binding_message: "Buy {{qty}} {{product}}"
  - name: search
    match: { methods: [GET], path: /search }
    when: "query.page != '1'"
    otherwise: deny
    require: { scopes: [search] }
    binding_message: "Search"
"#;

    fn choose(
        set: &PolicySet,
        method: &str,
        path: &str,
        body: Option<&str>,
        query: Option<&str>,
    ) -> Result<String, CallError> {
        let headers = json_headers("application/json");
        let found = set.find(method, None, &normalize(path).unwrap()).unwrap();
        Ok(match set.choose(&found, &call(&headers, body, query))? {
            Choice::Hold(p) => format!("hold {}", p.name),
            Choice::Pass(p) => format!("pass {}", p.name),
            Choice::Deny(p) => format!("deny {}", p.name),
        })
    }

    #[test]
    fn the_first_policy_whose_condition_holds_wins() {
        let set = policies(TIERS);
        let buy = |body: &str| choose(&set, "POST", "/shop", Some(body), None);
        for (body, chosen) in [
            (r#"{"qty": 2, "price": 10, "product": "x"}"#, "pass buy"),
            (r#"{"qty": 6, "price": 10, "product": "x"}"#, "hold buy"),
            (
                r#"{"qty": 2, "price": 500, "product": "x"}"#,
                "hold buy-large",
            ),
            (
                r#"{"qty": 6, "price": 500, "product": "x"}"#,
                "hold buy-large",
            ),
        ] {
            assert_eq!(buy(body).unwrap(), chosen, "{body}");
        }
        let search = |query: &str| choose(&set, "GET", "/search", None, Some(query));
        assert_eq!(search("page=2").unwrap(), "hold search");
        assert_eq!(search("page=1").unwrap(), "deny search");
    }

    #[test]
    fn conditions_fail_closed() {
        let set = policies(TIERS);
        let buy = |body: &str| choose(&set, "POST", "/shop", Some(body), None).unwrap_err();
        // A missing value, a string where a number is compared.
        let error = buy(r#"{"qty": 2}"#);
        assert_eq!(error.code(), ProblemCode::ConditionFailed, "{error}");
        assert!(error.to_string().contains("'buy-large'"), "{error}");
        let error = buy(r#"{"qty": "100", "price": 1}"#);
        assert_eq!(error.code(), ProblemCode::ConditionFailed, "{error}");
        // The body is read as the API reads it.
        let error = buy(r#"{"qty": 1, "price": 1, "qty": 100}"#);
        assert_eq!(error.code(), ProblemCode::InvalidBody, "{error}");
        let error = buy(r#"{"QTY": 100, "qty": 1, "price": 1}"#);
        assert_eq!(error.code(), ProblemCode::InvalidBody, "{error}");
        let error = buy(r#"{"Qty": 100, "price": 1}"#);
        assert_eq!(
            error,
            CallError::Misspelled {
                section: "body",
                key: "Qty".into()
            }
        );
        let headers = json_headers("text/plain");
        let found = set
            .find("POST", None, &normalize("/shop").unwrap())
            .unwrap();
        let error = set
            .choose(
                &found,
                &call(&headers, Some(r#"{"qty": 100, "price": 1}"#), None),
            )
            .unwrap_err();
        assert!(matches!(error, CallError::NotJson(_)), "{error}");
        // And the query: repeated, in another case, or absent.
        let search = |query: &str| choose(&set, "GET", "/search", None, Some(query)).unwrap_err();
        assert_eq!(
            search("page=1&page=2"),
            CallError::RepeatedQuery("page".into())
        );
        assert_eq!(
            search("page=1&PAGE=2"),
            CallError::RepeatedQuery("PAGE".into())
        );
        assert_eq!(
            search("PAGE=2"),
            CallError::Misspelled {
                section: "query",
                key: "PAGE".into()
            }
        );
        assert_eq!(search("page=1;page=2"), CallError::QuerySemicolon);
        assert_eq!(search("sort=a").code(), ProblemCode::ConditionFailed);
    }

    #[test]
    fn routes_shared_by_policies_are_checked_at_load() {
        let two = |first: &str, second: &str| {
            let yaml = format!(
                "policies:\n  - {{ name: a, match: {{ methods: [POST], path: /p }}, require: {{ scopes: [x] }}, binding_message: A, {first} }}\n  - {{ name: b, match: {{ methods: [POST], path: /p }}, require: {{ scopes: [x] }}, binding_message: B, {second} }}"
            );
            let file: PolicyFile = serde_yaml::from_str(&yaml).unwrap();
            PolicySet::compile(file.into_loaded(Path::new("p.yaml")).collect()).map(|_| ())
        };
        assert!(two("when: 'body.a > 1'", "when: 'body.a > 0'").is_ok());
        assert!(two("when: 'body.a > 1'", "upstreams: []").is_ok());
        let error = two("upstreams: []", "when: 'body.a > 1'")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("policies[1] ('b')") && error.contains("never apply"),
            "{error}"
        );
        let error = two("when: 'body.a > 1', otherwise: deny", "when: 'true'")
            .unwrap_err()
            .to_string();
        assert!(error.contains("only the last policy"), "{error}");
        let error = two("otherwise: deny", "when: 'true'")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("policies[0] ('a')") && error.contains("needs a `when`"),
            "{error}"
        );
        let yaml = "policies:\n  - { name: a, match: { methods: [POST], path: /p }, require: { scopes: [x] }, binding_message: A, when: 'true' }\n  - { name: b, match: { methods: [POST], path: /p, format_suffix: false }, require: { scopes: [x] }, binding_message: B }";
        let file: PolicyFile = serde_yaml::from_str(yaml).unwrap();
        let error =
            PolicySet::compile(file.into_loaded(Path::new("p.yaml")).collect()).unwrap_err();
        assert!(error.to_string().contains("format_suffix"), "{error}");
        let yaml = "policies:\n  - { name: a, match: { methods: [POST], path: /p }, require: { scopes: [x] }, binding_message: A, when: 'qty > 1' }";
        let error = serde_yaml::from_str::<PolicyFile>(yaml)
            .unwrap_err()
            .to_string();
        assert!(error.contains("reads 'qty'"), "{error}");
    }

    #[test]
    fn host_keys_are_lower_case_without_port_or_final_dot() {
        for (raw, key) in [
            ("Shop.Example", "shop.example"),
            ("shop.example.:8443", "shop.example"),
            ("127.0.0.1:18281", "127.0.0.1"),
            ("a_b-c", "a_b-c"),
            ("[::1]:80", "[::1]"),
        ] {
            assert_eq!(host_key(raw).as_deref(), Ok(key), "{raw}");
        }
        for raw in [
            "",
            ".",
            "a..b",
            ".a",
            "a..",
            "a b",
            "a@b",
            "a:",
            "a:123456",
            "a:x",
            "é.example",
        ] {
            assert_eq!(host_key(raw), Err(HostError::Malformed), "{raw:?}");
        }
    }
}
