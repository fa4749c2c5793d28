//! Deciding what one call gets: its canonical request, route and upstream,
//! the policy it matches, the conditions of that policy's route, and what
//! the person is asked (or why the call is refused).
//!
//! This is the one implementation of the decision. The proxy runs it on a
//! live request (`proxy::decide`), `countersign test` and `countersign
//! explain` on a call written in a file ([`offline`]); so what a policy test
//! says is what the gateway does. It does no I/O of its own: the body and
//! the identity come from a [`CallSource`], read only when a step needs
//! them (a pass-through call's body is never read), and each step can be
//! reported to the source ([`Step`]) for `explain` and `--coverage`.

pub mod offline;
mod refusal;
mod step;

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use pingora::http::RequestHeader;
use serde_json::Value;

use crate::config::{DefaultAction, UpstreamConfig};
use crate::identity::Identity;
use crate::mcp::{self, Classified, McpRefusal};
use crate::policy::{self, Choice, McpMatch, Policy, PolicyMatch, PolicySet, RenderedRequest};
use crate::problem::{Problem, ProblemCode};
use crate::request::{self, CanonicalRequest};
use crate::route::Routes;

pub use refusal::request_problem;
pub use step::Step;

/// Where a call's body and identity come from, and who hears about each
/// step. The proxy's source reads them from the agent's connection; the
/// offline one has them written down.
pub trait CallSource {
    fn header(&self) -> &RequestHeader;
    /// The canonical target, when the received one differs: the upstream
    /// receives exactly the target matched.
    fn set_uri(&mut self, uri: http::Uri);
    /// The Host header of a request that has none: its target's authority.
    fn set_host(&mut self, authority: &str);
    /// The whole body, at most the configured limit (`body_too_large`).
    /// Called at most once per call.
    fn read_body(&mut self) -> impl Future<Output = Result<Option<Bytes>, Problem>> + Send;
    /// Who must approve a call under `policy`.
    fn identify(&mut self, policy: &str) -> impl Future<Output = Result<Identity, Problem>> + Send;
    /// A step taken; built only when the source keeps steps.
    fn note(&mut self, _step: impl FnOnce() -> Step) {}
    /// The agent's client certificate as `agent.*` reads it (`null`:
    /// none; only a TLS listener with `client_ca` has one).
    fn agent(&self) -> Value {
        Value::Null
    }
}

/// The settings of an upstream that the decision reads.
pub trait UpstreamSettings {
    fn settings(&self, name: &str) -> Option<&UpstreamConfig>;
}

impl UpstreamSettings for std::collections::BTreeMap<String, UpstreamConfig> {
    fn settings(&self, name: &str) -> Option<&UpstreamConfig> {
        self.get(name)
    }
}

/// The read-only tables a decision reads: one snapshot for the whole call.
pub struct Gate<'a> {
    pub policies: &'a PolicySet,
    pub routes: &'a Routes,
    pub upstreams: &'a (dyn UpstreamSettings + Sync),
    pub default_action: DefaultAction,
    /// The status resources' path on the proxy listener.
    pub approvals_path: &'a str,
}

impl std::fmt::Debug for Gate<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("default_action", &self.default_action)
            .finish_non_exhaustive()
    }
}

/// What the decision learnt about a call on the way, whatever it decided:
/// the proxy's logs, metrics and answer shape read it.
#[derive(Debug, Default)]
pub struct Facts<'a> {
    pub upstream: Option<&'a str>,
    /// The policy the call fell under (or whose refusal it got).
    pub policy: Option<String>,
    /// Its route's conditions let it pass without approval.
    pub passed_by_condition: bool,
    /// A held (or refused) MCP `tools/call`: answered in JSON-RPC.
    pub mcp: Option<McpFacts>,
}

/// The held `tools/call` an MCP answer goes to.
#[derive(Debug, Clone)]
pub struct McpFacts {
    pub id: Value,
    pub progress_token: Option<Value>,
}

/// A call that must wait for its person's approval, under the policy it
/// matched (a reload does not change it).
#[derive(Debug)]
pub struct HeldCall {
    pub policy: Arc<Policy>,
    pub identity: Identity,
    pub rendered: RenderedRequest,
    pub body: Option<Bytes>,
    pub upstream: String,
    /// What identifies the call across retries in place of its body (an
    /// MCP tool call's method and params, without its JSON-RPC id).
    pub fingerprint_body: Option<Vec<u8>>,
    /// The MCP tool called, named in the call's binding.
    pub tool: Option<String>,
}

/// What a call gets, short of a refusal.
#[derive(Debug)]
pub enum Decision {
    /// Forwarded as it is (already rewritten to its canonical target).
    Pass,
    /// Needs this approval.
    Held(Box<HeldCall>),
    /// A request for the status resource of approval `id`.
    Status(String),
    /// `notifications/cancelled` on an MCP endpoint naming these request
    /// ids: forwarded, and the held calls they name stop.
    McpCancel(Vec<Value>),
}

/// Why a call is refused.
#[derive(Debug)]
pub enum Refusal {
    Problem(Box<Problem>),
    /// A POST on an MCP endpoint, refused as MCP answers it.
    Mcp(McpRefusal),
}

impl Refusal {
    /// The stable problem code.
    pub fn code(&self) -> ProblemCode {
        match self {
            Self::Problem(problem) => problem.kind,
            Self::Mcp(refusal) => refusal.code(),
        }
    }

    /// The sentence the agent is given.
    pub fn detail(&self) -> String {
        match self {
            Self::Problem(problem) => problem.detail.clone(),
            Self::Mcp(refusal) => refusal.to_string(),
        }
    }
}

impl From<Problem> for Refusal {
    fn from(problem: Problem) -> Self {
        Self::Problem(Box::new(problem))
    }
}

impl From<ProblemCode> for Refusal {
    fn from(code: ProblemCode) -> Self {
        Problem::new(code).into()
    }
}

/// A token never goes anywhere its policy does not name. Load-time checks
/// make a refusal here unreachable.
fn check_upstream(policy: &Policy, upstream: &str) -> Result<(), Refusal> {
    if policy.upstreams.iter().any(|u| u == upstream) {
        return Ok(());
    }
    tracing::error!(policy = %policy.name, %upstream, "policy call routed to an upstream the policy does not name");
    Err(ProblemCode::UpstreamNotAllowed.into())
}

/// Decides one call. Steps that only policy calls take are boxed: their
/// states would otherwise size every pass-through call's future.
pub async fn decide<'g, S: CallSource + Send>(
    gate: &Gate<'g>,
    call: &mut S,
    facts: &mut Facts<'g>,
) -> Result<Decision, Refusal> {
    let mut request = CanonicalRequest::from_header(call.header()).map_err(request_problem)?;
    // Over HTTP/2 (and HTTP/1.1's absolute-form without a Host) the host is
    // the target's authority (`CanonicalRequest` checked any Host agrees). It
    // becomes the Host header once, here, so every later step sees the host
    // the decision was made for: the origin-form rewrite, the stored approval
    // and its call binding, `preserve_host`'s forward (RFC 9113 §8.3.1).
    if !call.header().headers.contains_key(http::header::HOST) {
        if let Some(authority) = call.header().uri.authority().map(|a| a.as_str().to_owned()) {
            call.set_host(&authority);
        }
    }
    let method = call.header().method.clone();
    call.note(|| Step::canonical(method.as_str(), &request));
    if let Some(id) = request.path.forward.strip_prefix(gate.approvals_path) {
        if id.is_empty() || id.starts_with('/') {
            return Ok(Decision::Status(id.trim_start_matches('/').to_owned()));
        }
    }
    let routes: &'g Routes = gate.routes;
    let upstream = routes
        .find(Some(&request.host), &request.path.match_key)
        .ok_or(ProblemCode::NoRoute)?;
    let settings = gate
        .upstreams
        .settings(upstream)
        .ok_or(ProblemCode::NoRoute)?;
    request
        .check_encoded_percent(settings.allow_encoded_percent)
        .and_then(|()| request.check_upgrade(settings.allow_upgrade))
        .map_err(request_problem)?;
    // Normalise once: the upstream receives exactly the target matched.
    if let Some(uri) = request.rewrite.take() {
        call.set_uri(uri);
    }
    facts.upstream = Some(upstream);
    call.note(|| Step::Route {
        upstream: upstream.to_owned(),
        url: format!(
            "{}://{}",
            if settings.url.tls { "https" } else { "http" },
            settings.url.authority()
        ),
    });

    let policies = gate.policies;
    if let Some(found) = policies.find_mcp(Some(&request.host), &request.path) {
        return Box::pin(decide_mcp(policies, call, facts, found, &request, upstream)).await;
    }
    let body = refuse_form_method_field(policies, call, &request).await?;
    let body = refuse_stray_tool_call(policies, call, &request, upstream, body).await?;
    let Some(found) = policies.find(method.as_str(), Some(&request.host), &request.path) else {
        call.note(|| Step::Unmatched {
            default_action: gate.default_action,
        });
        return match gate.default_action {
            DefaultAction::Pass => Ok(Decision::Pass),
            DefaultAction::Deny => Err(ProblemCode::NoPolicy.into()),
        };
    };
    facts.policy = Some(found.policy.name.clone());
    call.note(|| Step::matched(&found));
    let identity = Box::pin(identify(call, &found.policy.name)).await?;
    let body = match body {
        Some(body) => body,
        None => Box::pin(call.read_body()).await?,
    };
    let Some((policy, rendered)) = choose(
        policies,
        &found,
        body.as_deref(),
        &request,
        &identity,
        call,
        facts,
    )?
    else {
        return Ok(Decision::Pass);
    };
    check_upstream(&policy, upstream)?;
    Ok(Decision::Held(Box::new(HeldCall {
        policy,
        identity,
        rendered,
        body,
        upstream: upstream.to_owned(),
        fingerprint_body: None,
        tool: None,
    })))
}

/// Rails and Rack take the method from a `_method` field of a form POST
/// (Rack reads a POST without a Content-Type as a form too), Laravel
/// also from a JSON one (any Content-Type containing `/json` or `+json`),
/// and Express's method-override with `methods: null` from the body of
/// a call of any method: on a path some policy covers, such a body is
/// read and refused, whatever the method. Every Content-Type header
/// counts. Returns the body when it was read.
async fn refuse_form_method_field<S: CallSource + Send>(
    policies: &PolicySet,
    call: &mut S,
    request: &CanonicalRequest,
) -> Result<Option<Option<Bytes>>, Refusal> {
    let checks = request::method_field_readers(&call.header().headers);
    if checks.is_empty() {
        return Ok(None);
    }
    if !policies.covers(Some(&request.host), &request.path) {
        return Ok(None);
    }
    let body = Box::pin(call.read_body()).await?;
    let bytes = body.as_deref().unwrap_or_default();
    let encoding = policy::body::content_encoding(&call.header().headers);
    if let Some(encoding) = encoding.filter(|_| !bytes.is_empty()) {
        // Express's body parsers inflate it and find a `_method` there.
        let encoding: String = encoding.chars().take(64).collect();
        return Err(Problem::new(ProblemCode::InvalidBody)
            .with_detail(format!(
                "A body sent to this path must be sent without Content-Encoding (it was sent with '{encoding}'), so that the gateway can see it names no _method field."
            ))
            .into());
    }
    let overrides = checks.iter().any(|check| check(bytes));
    if overrides {
        return Err(Problem::new(ProblemCode::MethodOverrideRefused)
            .with_detail(format!(
                "The request was refused: the {} form field is not accepted; send the real HTTP method.",
                request::METHOD_PARAMETER
            ))
            .into());
    }
    Ok(Some(body))
}

/// A held tool's `tools/call` sent to another path of its upstream than
/// the MCP endpoint (the deprecated HTTP+SSE transport's
/// `/messages?sessionId=...`, which servers keep beside Streamable
/// HTTP) would run unapproved: on a host and upstream behind an MCP
/// endpoint, every body is read and such a call refused, and so is a
/// body with a Content-Encoding, which the gateway cannot read. Returns
/// the body when it was read.
async fn refuse_stray_tool_call<S: CallSource + Send>(
    policies: &PolicySet,
    call: &mut S,
    request: &CanonicalRequest,
    upstream: &str,
    body: Option<Option<Bytes>>,
) -> Result<Option<Option<Bytes>>, Refusal> {
    let endpoints = policies.mcp_endpoints_to(Some(&request.host), upstream);
    if endpoints.is_empty() {
        return Ok(body);
    }
    let body = match body {
        Some(body) => body,
        None => call.read_body().await?,
    };
    let bytes = body.as_deref().unwrap_or_default();
    if !bytes.is_empty() && policy::body::content_encoding(&call.header().headers).is_some() {
        // Express's json() inflates it for a legacy transport's handler.
        return Err(Problem::new(ProblemCode::InvalidMcpMessage)
            .with_detail(
                "A body sent to this upstream, which serves an MCP endpoint, must be sent without Content-Encoding, so that the gateway can see it calls no tool that needs a person's approval.",
            )
            .into());
    }
    if let Some((tool, endpoint)) = mcp::stray_tool_call(&endpoints, bytes) {
        return Err(Problem::new(ProblemCode::InvalidMcpMessage)
            .with_detail(format!(
                "This request carries a tools/call of the tool '{tool}', which needs a person's approval, but was sent to another path than the MCP endpoint {endpoint}; send it there (Streamable HTTP), where the gateway holds it."
            ))
            .into());
    }
    Ok(Some(body))
}

/// Which policy of the route applies (its conditions, in file order)
/// and what its person is asked. `Ok(None)`: no condition took the call
/// and the route lets it pass without approval.
fn choose<S: CallSource>(
    policies: &PolicySet,
    found: &PolicyMatch<'_>,
    body: Option<&[u8]>,
    request: &CanonicalRequest,
    identity: &Identity,
    call: &mut S,
    facts: &mut Facts<'_>,
) -> Result<Option<(Arc<Policy>, RenderedRequest)>, Refusal> {
    let agent = call.agent();
    let header = call.header();
    let input = policy::CallInput {
        headers: &header.headers,
        body,
        params: &found.params,
        query: request.query.as_deref(),
        user: &identity.claims,
        agent: &agent,
        method: header.method.as_str(),
        path: &request.path.forward,
        arguments: None,
    };
    let mut tested = Vec::new();
    let chosen = policies.choose_observed(found, &input, &mut |policy, holds| {
        tested.push((policy.index, holds));
    });
    // The input borrows the header; the steps are noted after.
    let chosen = chosen.map_err(Problem::from);
    let rendered = match &chosen {
        Ok(Choice::Hold(policy)) => Some(policies.render_call(policy, &input)),
        _ => None,
    };
    for (index, holds) in tested {
        call.note(|| Step::condition(policies.at(index), holds));
    }
    let policy = match chosen? {
        Choice::Hold(policy) => policy,
        Choice::Pass(policy) => {
            facts.policy = Some(policy.name.clone());
            facts.passed_by_condition = true;
            call.note(|| Step::Otherwise {
                policy: policy.name.clone(),
                otherwise: policy.otherwise,
            });
            return Ok(None);
        }
        Choice::Deny(policy) => {
            facts.policy = Some(policy.name.clone());
            call.note(|| Step::Otherwise {
                policy: policy.name.clone(),
                otherwise: policy.otherwise,
            });
            return Err(Problem::new(ProblemCode::PolicyDenied)
                .with_detail(format!(
                    "Policy '{}' refuses this call: its condition does not allow it, and no approval can.",
                    policy.name
                ))
                .into());
        }
    };
    facts.policy = Some(policy.name.clone());
    call.note(|| Step::Chosen {
        policy: policy.name.clone(),
    });
    let Some(rendered) = rendered else {
        unreachable!("a held call is rendered")
    };
    let rendered = rendered.map_err(Problem::from)?;
    call.note(|| Step::rendered(policy, &rendered));
    Ok(Some((policy.clone(), rendered)))
}

/// A call on an MCP endpoint: a held `tools/call` needs an approval;
/// everything else passes untouched.
/// Who sends the call, as `policy` identifies people; noted as a step.
async fn identify<S: CallSource + Send>(call: &mut S, policy: &str) -> Result<Identity, Problem> {
    let identity = call.identify(policy).await?;
    call.note(|| Step::Identity {
        subject: identity.subject.clone(),
    });
    Ok(identity)
}

async fn decide_mcp<'g, S: CallSource + Send>(
    policies: &PolicySet,
    call: &mut S,
    facts: &mut Facts<'g>,
    found: McpMatch<'_>,
    request: &CanonicalRequest,
    upstream: &'g str,
) -> Result<Decision, Refusal> {
    let endpoint = found.endpoint.path_template.clone();
    // GET opens the server's stream; a POST carries a message. Any
    // other method with a body, GET included, is read like a POST: a
    // lenient server (one handler for every method) might take a
    // tools/call from it.
    if mcp::is_bodiless_stream_request(call.header()) {
        call.note(|| Step::McpPass {
            endpoint,
            why: "a request without a body (the server's stream, the end of a session)".into(),
        });
        return Ok(Decision::Pass);
    }
    let body = call.read_body().await?;
    let tool = match mcp::classify(found.endpoint, &call.header().headers, body.as_deref()) {
        Ok(Classified::Pass) => {
            call.note(|| Step::McpPass {
                endpoint,
                why: "not a tools/call of a tool a policy holds".into(),
            });
            return Ok(Decision::Pass);
        }
        Ok(Classified::Cancel(ids)) => return Ok(Decision::McpCancel(ids)),
        Ok(Classified::Held(tool)) => tool,
        Err(refusal) => {
            if let Some(policy) = refusal.policy() {
                facts.policy = Some(policies.at(policy).name.clone());
            }
            return Err(Refusal::Mcp(refusal));
        }
    };
    let policy = policies.at(tool.policy).clone();
    facts.policy = Some(policy.name.clone());
    facts.mcp = Some(McpFacts {
        id: tool.id.clone(),
        progress_token: tool.progress_token.clone(),
    });
    call.note(|| Step::McpTool {
        endpoint,
        tool: tool.name.clone(),
        policy: policy.name.clone(),
    });
    check_upstream(&policy, upstream)?;
    let identity = identify(call, &policy.name).await?;
    let agent = call.agent();
    let header = call.header();
    let input = policy::CallInput {
        headers: &header.headers,
        body: body.as_deref(),
        params: &found.params,
        query: request.query.as_deref(),
        user: &identity.claims,
        agent: &agent,
        method: header.method.as_str(),
        path: &request.path.forward,
        arguments: Some(&tool.arguments),
    };
    let rendered = policies
        .render_call(&policy, &input)
        .map_err(Problem::from)?;
    call.note(|| Step::rendered(&policy, &rendered));
    Ok(Decision::Held(Box::new(HeldCall {
        policy,
        identity,
        rendered,
        body,
        upstream: upstream.to_owned(),
        tool: Some(tool.name),
        fingerprint_body: Some(tool.fingerprint),
    })))
}
