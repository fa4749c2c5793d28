//! The pingora proxy: one [`Countersign`] implements `ProxyHttp`; each phase
//! does one thing, and a call's state lives in its [`CallCtx`].
//!
//! `request_filter` decides. It normalises the path once (and rewrites the
//! request to that path), finds the route and policy, and for a policy route
//! holds the call: it buffers the body, renders what the person is asked,
//! runs the approval and, only on approval, lets the call through with the
//! fresh token in `CallCtx`. Every other ending is a problem+json answer.

mod hold;
pub mod route;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorSource, ErrorType};
use tracing::Instrument;

use crate::approval::{self, ApprovalRequest, Outcome};
use crate::ciba::{AuthorizeRequest, CibaClient, CibaError};
use crate::config::{DefaultAction, Limits, UpstreamConfig};
use crate::identity::{IdentityError, IdentitySource};
use crate::metrics::Metrics;
use crate::policy::{self, PolicySet};
use crate::problem::{Problem, ProblemCode, CONTENT_TYPE};
use crate::secret::Secret;

pub use route::Routes;

/// Headers some frameworks honour to change the method after routing; a
/// policy on `POST` must not be dodged with `GET` + `X-HTTP-Method-Override: POST`.
const METHOD_OVERRIDE_HEADERS: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// Header naming the approval, on the forwarded call and on every answer.
pub const APPROVAL_ID_HEADER: &str = "x-countersign-approval-id";

/// The gateway's proxy logic.
#[derive(Debug)]
pub struct Countersign {
    pub policies: PolicySet,
    pub routes: Routes,
    pub upstreams: HashMap<String, UpstreamConfig>,
    pub identity: IdentitySource,
    pub ciba: CibaClient,
    pub limits: Limits,
    pub default_action: DefaultAction,
    pub metrics: Metrics,
    pub held: Arc<AtomicUsize>,
}

/// Per-call state.
#[derive(Debug, Default)]
pub struct CallCtx {
    upstream: Option<String>,
    policy: Option<String>,
    approval_id: Option<String>,
    /// The token issued for exactly this call; dropped with the call.
    access_token: Option<Secret>,
    outcome: &'static str,
    upstream_started: Option<Instant>,
}

/// Why the hold ended without a forward.
enum Refusal {
    Answer(Problem),
    /// The agent went away; nothing is forwarded and nobody is answered.
    Disconnected,
}

impl From<Problem> for Refusal {
    fn from(problem: Problem) -> Self {
        Self::Answer(problem)
    }
}

impl From<ProblemCode> for Refusal {
    fn from(code: ProblemCode) -> Self {
        Self::Answer(Problem::new(code))
    }
}

/// Decrements the held-call count however the hold ends.
struct HeldGuard {
    held: Arc<AtomicUsize>,
    metrics: Metrics,
}

impl Drop for HeldGuard {
    fn drop(&mut self) {
        self.held.fetch_sub(1, Ordering::AcqRel);
        self.metrics.pending_approvals.dec();
    }
}

impl Countersign {
    async fn admit(&self, session: &mut Session, ctx: &mut CallCtx) -> Result<(), Refusal> {
        let header = session.req_header();
        if let Some(name) = METHOD_OVERRIDE_HEADERS
            .iter()
            .find(|h| header.headers.contains_key(**h))
        {
            return Err(Problem::new(ProblemCode::MethodOverrideRefused)
                .with_detail(format!(
                    "The {name} header is not accepted; send the real HTTP method."
                ))
                .into());
        }
        let path = policy::normalize(header.uri.path()).map_err(|e| {
            Problem::new(ProblemCode::InvalidPath)
                .with_detail(format!("The request path was refused: {e}."))
        })?;
        let query = header.uri.query().map(str::to_owned);
        let host = request_host(session);
        let method = session.req_header().method.as_str().to_owned();

        // Normalise once: the upstream receives exactly the path we matched.
        // An origin-form target that is already normal is left as it is.
        let uri = &session.req_header().uri;
        let already_normal =
            uri.scheme().is_none() && uri.authority().is_none() && uri.path() == path.forward;
        if !already_normal {
            let forward = match &query {
                Some(q) => format!("{}?{q}", path.forward),
                None => path.forward.clone(),
            };
            let uri: http::Uri = forward
                .parse()
                .map_err(|_| Refusal::from(ProblemCode::InvalidPath))?;
            session.req_header_mut().set_uri(uri);
        }

        let upstream = self
            .routes
            .find(host.as_deref(), &path.match_key)
            .ok_or(ProblemCode::NoRoute)?;
        ctx.upstream = Some(upstream.to_owned());

        let Some(found) = self.policies.find(&method, host.as_deref(), &path) else {
            return match self.default_action {
                DefaultAction::Pass => {
                    ctx.outcome = "passed";
                    Ok(())
                }
                DefaultAction::Deny => Err(ProblemCode::NoPolicy.into()),
            };
        };
        let policy = found.policy;
        ctx.policy = Some(policy.name.clone());

        let identity = match self.identity.identify(session.req_header()).await {
            Ok(identity) => identity,
            Err(IdentityError::Missing) => return Err(ProblemCode::IdentityRequired.into()),
            Err(IdentityError::Invalid(reason)) => {
                tracing::info!(policy = %policy.name, %reason, "identity refused");
                return Err(Problem::new(ProblemCode::IdentityRequired)
                    .with_detail("The bearer token that identifies the user is not valid.")
                    .into());
            }
            Err(IdentityError::KeysUnavailable(reason)) => {
                tracing::warn!(%reason, "cannot fetch the keys that verify identities");
                return Err(ProblemCode::AuthorizationServerUnavailable.into());
            }
        };

        let body = hold::read_body(session, self.limits.max_body_bytes).await?;
        let rendered = self
            .policies
            .render_call(
                policy,
                &policy::CallInput {
                    headers: &session.req_header().headers,
                    body: body.as_deref(),
                    params: &found.params,
                    query: query.as_deref(),
                    user: &identity.claims,
                    method: &method,
                    path: &path.forward,
                },
            )
            .map_err(Problem::from)?;
        // Not needed while the call is held (pingora's retry buffer keeps the
        // body for the replay): free it before a hold of possibly minutes.
        drop(body);

        let approval_id = uuid::Uuid::new_v4().to_string();
        ctx.approval_id = Some(approval_id.clone());
        let span =
            tracing::info_span!("approval", approval_id = %approval_id, policy = %policy.name);
        if self.held.fetch_add(1, Ordering::AcqRel) >= self.limits.max_pending {
            self.held.fetch_sub(1, Ordering::AcqRel);
            return Err(Problem::new(ProblemCode::TooManyPending)
                .with_retry_after(5)
                .into());
        }
        self.metrics.pending_approvals.inc();
        let _held = HeldGuard {
            held: self.held.clone(),
            metrics: self.metrics.clone(),
        };

        let requested_expiry = policy
            .requested_expiry
            .map(|e| e.min(self.limits.max_hold))
            .or(Some(self.limits.max_hold));
        let request = ApprovalRequest {
            authorize: AuthorizeRequest {
                subject: &identity.subject,
                binding_message: &rendered.binding_message,
                scopes: &policy.scopes,
                audience: policy.audience.as_deref(),
                authorization_details: rendered.authorization_details.as_ref(),
                requested_expiry,
            },
            max_hold: self.limits.max_hold,
        };
        let started = Instant::now();
        let outcome = async {
            tracing::info!("call held for approval");
            tokio::select! {
                outcome = approval::run(&self.ciba, &request) => Some(outcome),
                () = hold::client_gone(session) => None,
            }
        }
        .instrument(span.clone())
        .await;
        let waited = started.elapsed();

        let Some(outcome) = outcome else {
            span.in_scope(|| {
                tracing::info!(
                    "agent disconnected during the hold; polling stopped, nothing forwarded"
                )
            });
            self.metrics
                .approvals
                .with_label_values(&[&policy.name, "abandoned"])
                .inc();
            return Err(Refusal::Disconnected);
        };
        let result = outcome.result_label();
        self.metrics
            .approvals
            .with_label_values(&[&policy.name, result])
            .inc();
        self.metrics
            .approval_wait
            .with_label_values(&[result])
            .observe(waited.as_secs_f64());
        span.in_scope(|| {
            tracing::info!(
                result,
                waited_ms = waited.as_millis() as u64,
                "approval finished"
            )
        });

        match outcome {
            Outcome::Approved(grant) => {
                // The person may approve less than was asked; the call then
                // cannot be made, so it is not forwarded.
                if let Some(granted) = &grant.scope {
                    let granted: Vec<&str> = granted.split_whitespace().collect();
                    if let Some(missing) = policy
                        .scopes
                        .iter()
                        .find(|s| !granted.contains(&s.as_str()))
                    {
                        span.in_scope(
                            || tracing::info!(%missing, "approved without a required scope"),
                        );
                        return Err(Problem::new(ProblemCode::AccessDenied)
                            .with_detail(format!(
                                "The user approved the request without the {missing} permission it needs."
                            ))
                            .into());
                    }
                }
                ctx.access_token = Some(grant.access_token);
                ctx.outcome = "approved";
                Ok(())
            }
            Outcome::Denied => Err(ProblemCode::AccessDenied.into()),
            Outcome::Expired => Err(ProblemCode::ApprovalExpired.into()),
            Outcome::Failed(error) => Err(failed_approval(error).into()),
        }
    }

    async fn answer(
        &self,
        session: &mut Session,
        ctx: &mut CallCtx,
        problem: Problem,
    ) -> Result<()> {
        ctx.outcome = problem.code();
        let problem = match &ctx.approval_id {
            Some(id) => problem.with_approval_id(id.clone()),
            None => problem,
        };
        let body = Bytes::from(problem.to_json());
        let mut header = ResponseHeader::build(problem.status, Some(6))?;
        header.insert_header(http::header::CONTENT_TYPE, CONTENT_TYPE)?;
        header.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
        header.insert_header(http::header::CACHE_CONTROL, "no-store")?;
        if let Some(seconds) = problem.retry_after {
            header.insert_header(http::header::RETRY_AFTER, seconds.to_string())?;
        }
        if problem.status == 401 {
            header.insert_header(http::header::WWW_AUTHENTICATE, "Bearer")?;
        }
        if let Some(id) = &ctx.approval_id {
            header.insert_header(APPROVAL_ID_HEADER, id.as_str())?;
        }
        // A body we did not read would be parsed as the next request.
        if !session.is_body_done() {
            session.set_keepalive(None);
        }
        session
            .write_response_header(Box::new(header), false)
            .await?;
        session.write_response_body(Some(body), true).await
    }
}

fn failed_approval(error: CibaError) -> Problem {
    match error {
        CibaError::UnknownUser => Problem::new(ProblemCode::UnknownUser),
        CibaError::InvalidBindingMessage(reason) => {
            tracing::warn!(%reason, "authorization server refused the binding message");
            Problem::new(ProblemCode::InvalidBindingMessage)
        }
        CibaError::Unavailable {
            reason,
            retry_after,
        } => {
            tracing::warn!(%reason, "authorization server unavailable");
            let problem = Problem::new(ProblemCode::AuthorizationServerUnavailable);
            match retry_after {
                Some(after) => problem.with_retry_after(after.as_secs().max(1)),
                None => problem,
            }
        }
        other => {
            tracing::error!(error = %other, "approval failed");
            Problem::new(ProblemCode::ApprovalFailed)
        }
    }
}

/// The [`policy::host_key`] of the Host header, or of the authority of an
/// absolute-form target.
fn request_host(session: &Session) -> Option<String> {
    let header = session.req_header();
    let raw = header
        .headers
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| header.uri.authority().map(|a| a.as_str()))?;
    Some(policy::host_key(raw))
}

#[async_trait]
impl ProxyHttp for Countersign {
    type CTX = CallCtx;

    fn new_ctx(&self) -> Self::CTX {
        CallCtx {
            outcome: "passed",
            ..CallCtx::default()
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
        match self.admit(session, ctx).await {
            Ok(()) => Ok(false),
            Err(Refusal::Answer(problem)) => {
                self.answer(session, ctx, problem).await?;
                Ok(true)
            }
            Err(Refusal::Disconnected) => {
                ctx.outcome = "client_disconnected";
                Err(Error::explain(
                    ErrorType::ConnectionClosed,
                    "agent disconnected during the hold",
                )
                .into_down())
            }
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        let name = ctx.upstream.as_deref().unwrap_or_default();
        let upstream = self
            .upstreams
            .get(name)
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "call has no upstream"))?;
        let url = &upstream.url;
        let mut peer = HttpPeer::new((url.host.as_str(), url.port), url.tls, url.host.clone());
        peer.options.connection_timeout = Some(upstream.connect_timeout);
        peer.options.total_connection_timeout =
            Some(upstream.connect_timeout + Duration::from_secs(5));
        peer.options.read_timeout = Some(upstream.timeout);
        peer.options.write_timeout = Some(upstream.timeout);
        peer.options.idle_timeout = Some(Duration::from_secs(60));
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        request: &mut pingora::http::RequestHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        if let Some(upstream) = ctx.upstream.as_deref().and_then(|n| self.upstreams.get(n)) {
            if !upstream.preserve_host {
                request.insert_header(http::header::HOST, upstream.url.authority())?;
            }
        }
        request.remove_header(&http::header::EXPECT);
        if ctx.policy.is_some() {
            // Fail closed: a policy call leaves only with its own fresh token.
            let token = ctx.access_token.as_ref().ok_or_else(|| {
                Error::explain(
                    ErrorType::InternalError,
                    "policy call without an approved token",
                )
            })?;
            request.remove_header(&http::header::AUTHORIZATION);
            request.remove_header(&http::header::PROXY_AUTHORIZATION);
            if let Some(name) = self.identity.credential_header() {
                request.remove_header(name);
            }
            request.insert_header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", token.expose()),
            )?;
            if let Some(id) = &ctx.approval_id {
                request.insert_header(APPROVAL_ID_HEADER, id.as_str())?;
            }
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
        let code = match error.esource() {
            ErrorSource::Downstream => None,
            ErrorSource::Upstream => Some(ProblemCode::UpstreamUnavailable),
            _ => match error.etype() {
                ErrorType::HTTPStatus(status) if *status < 500 => {
                    let _ = session.respond_error(*status).await;
                    return FailToProxy {
                        error_code: *status,
                        can_reuse_downstream: false,
                    };
                }
                _ => Some(ProblemCode::UpstreamUnavailable),
            },
        };
        let Some(code) = code else {
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        };
        tracing::warn!(
            approval_id = ctx.approval_id.as_deref(),
            upstream = ctx.upstream.as_deref(),
            error = %error,
            "forwarding failed"
        );
        let problem = Problem::new(code);
        let status = problem.status;
        if let Err(e) = self.answer(session, ctx, problem).await {
            tracing::debug!(error = %e, "could not answer the agent");
        }
        FailToProxy {
            error_code: status,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, error: Option<&Error>, ctx: &mut Self::CTX) {
        let policy = ctx.policy.as_deref().unwrap_or("none");
        self.metrics
            .calls
            .with_label_values(&[policy, ctx.outcome])
            .inc();
        if let (Some(started), Some(upstream)) = (ctx.upstream_started, ctx.upstream.as_deref()) {
            self.metrics
                .upstream_duration
                .with_label_values(&[upstream])
                .observe(started.elapsed().as_secs_f64());
        }
        // Calls that merely passed through are the bulk of traffic and are
        // counted in metrics; their log line costs ~20% of pass-through
        // throughput (docs/BENCHMARKS.md), so it is debug. Everything the
        // gateway decided (held, refused, failed) is logged at info.
        let passed = ctx.outcome == "passed" && error.is_none();
        if !passed || tracing::enabled!(tracing::Level::DEBUG) {
            let status = session.response_written().map(|r| r.status.as_u16());
            let method = session.req_header().method.as_str();
            let path = session.req_header().uri.path();
            let error = error.map(|e| e.etype().as_str());
            let approval_id = ctx.approval_id.as_deref();
            let outcome = ctx.outcome;
            if passed {
                tracing::debug!(policy, outcome, method, path, status, "call");
            } else {
                tracing::info!(
                    approval_id,
                    policy,
                    outcome,
                    method,
                    path,
                    status,
                    error,
                    "call"
                );
            }
        }
        // The token is single-use: never carried past this call.
        ctx.access_token = None;
    }
}
