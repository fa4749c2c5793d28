//! The pingora proxy: one [`Countersign`] implements `ProxyHttp`; each phase
//! does one thing, and a call's state lives in its [`CallCtx`].
//!
//! `request_filter` runs the two halves of admission: [`decide`] (the
//! canonical request, its route and policy, who approves and what they are
//! asked) and, for a policy call, [`hold`] (waiting for the approval). Only an
//! approval lets a policy call through, with the fresh token in `CallCtx`;
//! [`forward`] then builds the upstream request, and [`answer`] writes every
//! refusal as problem+json.

mod answer;
mod decide;
mod forward;
mod hold;
mod mcp;
mod shadow;
mod status;

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType};
use prometheus::IntCounter;

use crate::approval::engine::Engine;
use crate::config::{DefaultAction, Limits, UpstreamConfig};
use crate::drain::Draining;
use crate::identity::IdentitySource;
use crate::metrics::Metrics;
use crate::policy::LivePolicies;
use crate::problem::{Problem, ProblemCode};
use crate::traces::{Kind, Parent, Span, Traces};

pub use crate::route::Routes;
pub use forward::Upstream;

use crate::headers::TRACEPARENT_HEADER;
pub use crate::headers::{APPROVAL_ID_HEADER, COUNTERSIGN_TOKENS_HEADER, GATEWAY_HEADER_PREFIX};

/// The gateway's proxy logic.
#[derive(Debug)]
pub struct Countersign {
    /// The policy set in force; a reload swaps it whole.
    pub policies: Arc<LivePolicies>,
    pub routes: Routes,
    pub upstreams: crate::FastMap<String, Arc<Upstream>>,
    pub identity: IdentitySource,
    pub limits: Limits,
    pub default_action: DefaultAction,
    pub metrics: Metrics,
    /// Calls held right now, against `limits.max_pending`.
    pub held: Arc<AtomicUsize>,
    pub engine: Arc<Engine>,
    pub approvals_path: String,
    /// Held MCP calls waiting in this process, for `notifications/cancelled`
    /// naming a request that attached to an approval made by another.
    mcp_waiting: mcp::Waiting,
    /// Raised on shutdown: held calls are answered at once.
    pub draining: Draining,
    /// `countersign_calls_total{policy="none",outcome="passed"}`, the bulk of
    /// traffic, resolved once instead of by `with_label_values` per call.
    passed_unmatched: IntCounter,
    /// A span per call (off unless `traces:` is configured).
    traces: Traces,
}

impl Countersign {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        policies: Arc<LivePolicies>,
        routes: Routes,
        upstreams: impl IntoIterator<Item = (String, UpstreamConfig)>,
        identity: IdentitySource,
        limits: Limits,
        default_action: DefaultAction,
        metrics: Metrics,
        engine: Arc<Engine>,
        approvals_path: String,
    ) -> Self {
        Self {
            policies,
            routes,
            upstreams: upstreams
                .into_iter()
                .map(|(name, config)| {
                    if config.tls.as_ref().is_some_and(|t| t.insecure_skip_verify) {
                        tracing::warn!(upstream = %name, "TLS certificates of this upstream are not verified (tls.insecure_skip_verify): for development only");
                    }
                    let upstream = Upstream::new(name.clone(), config, &metrics);
                    (name, Arc::new(upstream))
                })
                .collect(),
            identity,
            limits,
            default_action,
            metrics: metrics.clone(),
            held: Arc::new(AtomicUsize::new(0)),
            engine,
            approvals_path,
            mcp_waiting: mcp::Waiting::default(),
            draining: Draining::new().1,
            passed_unmatched: metrics.calls.with_label_values(&["none", "passed"]),
            traces: Traces::off(),
        }
    }

    /// Traces calls (`traces:` in the configuration).
    pub fn with_traces(mut self, traces: Traces) -> Self {
        self.traces = traces;
        self
    }

    /// Answer held calls when `draining` is raised (the gateway's shutdown).
    pub fn with_draining(mut self, draining: Draining) -> Self {
        self.draining = draining;
        self
    }
}

/// How a call ended: the `outcome` label of `countersign_calls_total` and of
/// the call's log line. A closed list (docs/observability.md).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CallOutcome {
    /// Forwarded as it is (no policy, `default_action: pass`).
    #[default]
    Passed,
    /// A policy call whose recorded upstream answer was returned.
    Approved,
    /// `202 Accepted`: the approval is still pending.
    Accepted,
    /// A status resource was read.
    Status,
    /// The agent hung up before it was answered.
    ClientDisconnected,
    /// Answered with this problem (its code is the label).
    Refused(ProblemCode),
}

impl CallOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Passed => "passed",
            Self::Approved => "approved",
            Self::Accepted => "accepted",
            Self::Status => "status",
            Self::ClientDisconnected => "client_disconnected",
            Self::Refused(code) => code.as_str(),
        }
    }
}

/// Per-call state.
#[derive(Debug, Default)]
pub struct CallCtx {
    upstream: Option<Arc<Upstream>>,
    policy: Option<String>,
    /// The call matched a policy whose conditions let it pass without
    /// approval (`otherwise: pass`): the only policy call pingora forwards.
    passed_by_condition: bool,
    approval_id: Option<String>,
    outcome: CallOutcome,
    upstream_started: Option<Instant>,
    /// A held (or refused) MCP `tools/call`: answered in JSON-RPC.
    mcp: Option<mcp::McpCall>,
    /// The call's spans, when traces are on.
    trace: Option<Box<CallSpans>>,
}

/// The spans of one call.
#[derive(Debug)]
struct CallSpans {
    /// The whole call, in the agent's trace when it sent one.
    call: Span,
    /// A call passed through: the request pingora makes upstream.
    forward: Option<Span>,
}

/// How a call that is not passed through is answered.
enum Reply {
    Problem(Box<Problem>),
    /// JSON the gateway answers itself: `202 Accepted` for a pending
    /// approval, or a status resource.
    Json(Box<JsonReply>),
    /// The recorded answer of the upstream to the approved call.
    Replay(Box<crate::store::StoredResponse>),
    /// The upstream's answer to the approved call, too large to record,
    /// streamed to the agent that waited for it.
    Stream(Box<crate::approval::engine::LargeAnswer>),
    /// The agent went away; it is not answered (the approval goes on).
    Disconnected,
    /// A JSON-RPC error for an MCP message refused as a whole.
    Mcp(Box<mcp::McpReply>),
}

struct JsonReply {
    status: u16,
    body: serde_json::Value,
    retry_after: Option<u64>,
    location: Option<String>,
}

impl From<Problem> for Reply {
    fn from(problem: Problem) -> Self {
        Self::Problem(Box::new(problem))
    }
}

impl From<ProblemCode> for Reply {
    fn from(code: ProblemCode) -> Self {
        Self::Problem(Box::new(Problem::new(code)))
    }
}

impl Countersign {
    /// Counts a finished call; the pass-through series has its handle.
    fn count_call(&self, policy: &str, outcome: CallOutcome) {
        if policy == "none" && outcome == CallOutcome::Passed {
            self.passed_unmatched.inc();
        } else {
            let labels = [policy, outcome.as_str()];
            self.metrics.calls.with_label_values(&labels).inc();
        }
    }

    /// `Ok` passes the call through; every policy call ends in a `Reply`.
    ///
    /// The hold is boxed: its state (the held call, the wait) is the
    /// largest of any phase, and unboxed it would size, and be moved with,
    /// the future of every pass-through call too (docs/BENCHMARKS.md).
    async fn admit(&self, session: &mut Session, ctx: &mut CallCtx) -> Result<(), Reply> {
        let span = self.span_in_call(ctx, "decide");
        let decided = self.decide(session, ctx).await;
        drop(span);
        match decided? {
            None => Ok(()),
            Some(call) => {
                let _span = self.span_in_call(ctx, "hold");
                Err(Box::pin(self.hold(session, ctx, call)).await)
            }
        }
    }

    /// Opens the call's span: under the agent's `traceparent` when it sent
    /// exactly one valid one, else a new trace.
    fn start_call_span(&self, session: &Session, ctx: &mut CallCtx) {
        if !self.traces.is_on() {
            return;
        }
        let request = session.req_header();
        let mut sent = request.headers.get_all(TRACEPARENT_HEADER).iter();
        let parent = match (sent.next(), sent.next()) {
            (Some(one), None) => one.to_str().ok(),
            _ => None,
        };
        let mut call = self
            .traces
            .span("call", Kind::Server, Parent::Remote(parent));
        call.set("http.request.method", request.method.as_str().to_owned());
        call.set("url.path", request.uri.path().to_owned());
        ctx.trace = Some(Box::new(CallSpans {
            call,
            forward: None,
        }));
    }

    /// A span under the call's (a no-op when traces are off).
    fn span_in_call(&self, ctx: &CallCtx, name: &'static str) -> Option<Span> {
        let spans = ctx.trace.as_deref()?;
        Some(
            self.traces
                .span(name, Kind::Internal, Parent::Span(&spans.call)),
        )
    }

    /// Closes the call's spans with how it ended.
    fn end_call_spans(&self, session: &Session, error: Option<&Error>, ctx: &mut CallCtx) {
        let Some(mut spans) = ctx.trace.take() else {
            return;
        };
        let status = session
            .response_written()
            .map(|r| i64::from(r.status.as_u16()));
        let call = &mut spans.call;
        call.set(
            "countersign.policy",
            ctx.policy.clone().unwrap_or_else(|| "none".to_owned()),
        );
        call.set("countersign.outcome", ctx.outcome.as_str());
        if let Some(id) = &ctx.approval_id {
            call.set("countersign.approval_id", id.clone());
        }
        if let Some(status) = status {
            call.set("http.response.status_code", status);
        }
        if let Some(error) = error {
            call.fail(error.etype().as_str());
        }
        if let Some(forward) = &mut spans.forward {
            if let Some(status) = status {
                forward.set("http.response.status_code", status);
            }
            if let Some(error) = error {
                forward.fail(error.etype().as_str());
            }
        }
        // The forward ends before the call that contains it.
        spans.forward = None;
    }

    /// Writes the answer of a call the gateway ended itself. `Ok(true)`:
    /// answered, nothing goes upstream.
    async fn reply(&self, session: &mut Session, ctx: &mut CallCtx, reply: Reply) -> Result<bool> {
        let answers_approved_call = matches!(reply, Reply::Replay(_) | Reply::Stream(_));
        match reply {
            Reply::Mcp(reply) => self.answer_rpc(session, ctx, *reply).await?,
            reply if ctx.mcp.is_some() && !matches!(reply, Reply::Disconnected) => {
                self.answer_mcp(session, ctx, reply).await?
            }
            Reply::Problem(problem) => self.answer(session, ctx, *problem).await?,
            Reply::Json(reply) => self.answer_json(session, ctx, *reply).await?,
            Reply::Replay(response) => self.answer_replay(session, ctx, *response).await?,
            Reply::Stream(answer) => self.answer_stream(session, ctx, *answer).await?,
            Reply::Disconnected => {
                ctx.outcome = CallOutcome::ClientDisconnected;
                return Err(Error::explain(
                    ErrorType::ConnectionClosed,
                    "agent disconnected during the hold",
                )
                .into_down());
            }
        }
        // Every write above ends with pingora's `finish_body`, which
        // flushes: reaching here, the whole answer was handed to the
        // agent's connection. One that failed returned early, undelivered.
        if answers_approved_call {
            self.note_delivered(ctx).await;
        }
        Ok(true)
    }

    /// The approved call's answer reached an agent in full: without an
    /// Idempotency-Key, a repeat of the call is a new call (docs/agent.md,
    /// the retry contract). Awaited before the connection reads its next
    /// request, so a repeat sent on it is judged after the mark.
    async fn note_delivered(&self, ctx: &CallCtx) {
        let Some(id) = ctx.approval_id.as_deref() else {
            return;
        };
        if let Err(error) = self.engine.store().mark_delivered(id).await {
            // Not fail-open: a repeat then gets this answer again instead
            // of a new approval; nothing is forwarded.
            tracing::warn!(approval_id = id, %error, "could not record that the answer was delivered");
        }
    }
}

#[async_trait]
impl ProxyHttp for Countersign {
    type CTX = CallCtx;

    fn new_ctx(&self) -> Self::CTX {
        CallCtx::default()
    }

    /// No downstream modules. pingora's default adds a response-compression
    /// module at level 0 (disabled); it still costs an allocation and a
    /// filter call per phase on every call. Answers pass as the upstream
    /// encoded them.
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
        self.start_call_span(session, ctx);
        match self.admit(session, ctx).await {
            Ok(()) => Ok(false),
            // Boxed, like the hold: answers are off the pass path.
            Err(reply) => Box::pin(self.reply(session, ctx, reply)).await,
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        let upstream = ctx
            .upstream
            .as_ref()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "call has no upstream"))?;
        upstream.peer().await
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        request: &mut pingora::http::RequestHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        self.prepare_upstream_request(request, ctx)?;
        if let Some(spans) = ctx.trace.as_deref_mut() {
            // The upstream joins the call's trace under this span; the
            // agent's own `traceparent` names the agent's span, not ours.
            let forward = self
                .traces
                .span("forward", Kind::Client, Parent::Span(&spans.call));
            if let Some(traceparent) = forward.traceparent() {
                request.insert_header(TRACEPARENT_HEADER, traceparent)?;
            }
            spans.forward = Some(forward);
        }
        ctx.upstream_started = Some(Instant::now());
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        if let Some(id) = &ctx.approval_id {
            response.insert_header(APPROVAL_ID_HEADER, id.as_str())?;
        }
        Ok(())
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        error: &Error,
        ctx: &mut Self::CTX,
    ) -> FailToProxy {
        self.answer_failure(session, error, ctx).await
    }

    async fn logging(&self, session: &mut Session, error: Option<&Error>, ctx: &mut Self::CTX) {
        self.end_call_spans(session, error, ctx);
        let policy = ctx.policy.as_deref().unwrap_or("none");
        self.count_call(policy, ctx.outcome);
        if let (Some(started), Some(upstream)) = (ctx.upstream_started, ctx.upstream.as_ref()) {
            upstream.duration.observe(started.elapsed().as_secs_f64());
        }
        // Calls that merely passed through are the bulk of traffic and are
        // counted in metrics; their log line costs ~20% of pass-through
        // throughput (docs/BENCHMARKS.md), so it is debug. Everything the
        // gateway decided (held, refused, failed) is logged at info.
        let passed = ctx.outcome == CallOutcome::Passed && error.is_none();
        if !passed || tracing::enabled!(tracing::Level::DEBUG) {
            let status = session.response_written().map(|r| r.status.as_u16());
            let method = session.req_header().method.as_str();
            let path = session.req_header().uri.path();
            let error = error.map(|e| e.etype().as_str());
            let approval_id = ctx.approval_id.as_deref();
            let outcome = ctx.outcome.as_str();
            // The agent's client certificate, when it connected with one.
            let agent = decide::agent_of(session).and_then(|a| a.0["subject"].as_str());
            if passed {
                tracing::debug!(policy, outcome, method, path, status, agent, "call");
            } else {
                tracing::info!(
                    approval_id,
                    policy,
                    outcome,
                    method,
                    path,
                    status,
                    error,
                    agent,
                    "call"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;

    /// The size of the future `f` returns, without calling it.
    fn future_size<'a, F, Fut>(_: &F) -> usize
    where
        F: Fn(&'a Countersign, &'a mut Session, &'a mut CallCtx) -> Fut,
        Fut: Future,
    {
        std::mem::size_of::<Fut>()
    }

    fn admit<'a>(
        c: &'a Countersign,
        s: &'a mut Session,
        ctx: &'a mut CallCtx,
    ) -> impl Future<Output = Result<(), Reply>> + 'a {
        c.admit(s, ctx)
    }

    fn decide<'a>(
        c: &'a Countersign,
        s: &'a mut Session,
        ctx: &'a mut CallCtx,
    ) -> impl Future + 'a {
        c.decide(s, ctx)
    }

    /// A held call keeps its `CallCtx` (inside pingora's request future) and
    /// the `admit` future (boxed by `async_trait`) for the whole hold: a
    /// budget, so that neither grows unnoticed (docs/BENCHMARKS.md, issue 11;
    /// a debug build measured 152 B and 3,448 B).
    #[test]
    fn a_held_call_state_stays_small() {
        let (ctx, admit, decide) = (
            std::mem::size_of::<CallCtx>(),
            future_size(&admit),
            future_size(&decide),
        );
        eprintln!("CallCtx {ctx} B, admit future {admit} B, decide future {decide} B");
        assert!(ctx <= 256, "CallCtx is {ctx} B");
        assert!(admit <= 6 * 1024, "the admit future is {admit} B");
    }
}
