//! Deciding what a call needs, on a live request: the one decision
//! ([`crate::decision::decide`]) with the agent's connection as its source
//! of the body and the identity, and its facts copied into the call's
//! context.

use bytes::Bytes;
use pingora::http::RequestHeader;
use pingora::proxy::Session;

use super::{hold, CallCtx, Countersign, Reply, Upstream};
use crate::decision::{self, CallSource, Decision, Facts, Gate, HeldCall, Refusal};
use crate::identity::{Identity, IdentityError, IdentitySource};
use crate::problem::{Problem, ProblemCode};

impl decision::UpstreamSettings for crate::FastMap<String, std::sync::Arc<Upstream>> {
    fn settings(&self, name: &str) -> Option<&crate::config::UpstreamConfig> {
        self.get(name).map(|u| &u.config)
    }
}

/// The agent's request as the decision's source.
struct LiveCall<'a> {
    gateway: &'a Countersign,
    session: &'a mut Session,
    /// The body once read (shadow policies read the same bytes).
    body: Option<Option<Bytes>>,
}

impl CallSource for LiveCall<'_> {
    fn header(&self) -> &RequestHeader {
        self.session.req_header()
    }

    fn set_uri(&mut self, uri: http::Uri) {
        self.session.req_header_mut().set_uri(uri);
    }

    fn set_host(&mut self, authority: &str) {
        let header = self.session.req_header_mut();
        if header
            .insert_header(http::header::HOST, authority.to_owned())
            .is_err()
        {
            // Unreachable for a parsed authority; the upstream's own Host
            // (or none, with `preserve_host`) is forwarded.
            tracing::warn!("the request's authority is no Host value");
        }
    }

    async fn read_body(&mut self) -> Result<Option<Bytes>, Problem> {
        let body = hold::read_body(self.session, self.gateway.limits.max_body_bytes).await?;
        self.body = Some(body.clone());
        Ok(body)
    }

    async fn identify(&mut self, policy: &str) -> Result<Identity, Problem> {
        self.gateway.identify(self.session, policy).await
    }

    fn agent(&self) -> serde_json::Value {
        agent_certificate(self.session)
    }
}

/// The agent's verified client certificate (`null`: none).
pub(super) fn agent_certificate(session: &Session) -> serde_json::Value {
    agent_of(session).map_or(serde_json::Value::Null, |agent| agent.0.clone())
}

/// The agent's verified client certificate, as the TLS handshake kept it.
pub(super) fn agent_of(session: &Session) -> Option<&crate::tls::AgentCertificate> {
    session
        .digest()
        .and_then(|d| d.ssl_digest.as_ref())
        .and_then(|ssl| ssl.extension.get::<crate::tls::AgentCertificate>())
}

impl Countersign {
    /// `Ok(None)`: the call passes through as it is (already rewritten to
    /// its canonical target). `Ok(Some)`: it needs an approval.
    pub(super) async fn decide(
        &self,
        session: &mut Session,
        ctx: &mut CallCtx,
    ) -> Result<Option<HeldCall>, Reply> {
        // One policy set for the whole call, however a reload swaps it.
        let policies = self.policies.load_full();
        let gate = Gate {
            policies: &policies,
            routes: &self.routes,
            upstreams: &self.upstreams,
            default_action: self.default_action,
            approvals_path: &self.approvals_path,
        };
        let mut facts = Facts::default();
        let mut live = LiveCall {
            gateway: self,
            session,
            body: None,
        };
        let decided = decision::decide(&gate, &mut live, &mut facts).await;
        let (session, body) = (live.session, live.body);
        if let Some(shadow) = policies.shadow() {
            if matches!(decided, Ok(Decision::Pass | Decision::Held(_))) {
                Box::pin(self.shadow_decide(shadow, session, body)).await;
            }
        }
        if let Some(name) = facts.upstream {
            ctx.upstream = self.upstreams.get(name).cloned();
        }
        if facts.policy.is_some() {
            ctx.policy = facts.policy;
        }
        ctx.passed_by_condition = facts.passed_by_condition;
        if let Some(call) = facts.mcp {
            ctx.mcp = Some(super::mcp::McpCall {
                id: call.id,
                progress_token: call.progress_token,
                accepts_stream: crate::mcp::accepts_event_stream(&session.req_header().headers),
                streaming: false,
            });
        }
        match decided {
            Ok(Decision::Pass) => Ok(None),
            Ok(Decision::Held(call)) => Ok(Some(*call)),
            Ok(Decision::Status(id)) => {
                Err(Box::pin(self.approval_status(session, ctx, &id)).await)
            }
            Ok(Decision::McpCancel(ids)) => {
                Box::pin(self.cancel_held(session, &ids)).await;
                Ok(None)
            }
            Err(Refusal::Problem(problem)) => Err(Reply::Problem(problem)),
            Err(Refusal::Mcp(refusal)) => Err(super::mcp::refuse_mcp(ctx, refusal)),
        }
    }

    pub(super) async fn identify(
        &self,
        session: &Session,
        policy: &str,
    ) -> Result<Identity, Problem> {
        match self.identity.identify(session.req_header()).await {
            Ok(identity) => Ok(identity),
            Err(IdentityError::Missing) => Err(Problem::new(ProblemCode::IdentityRequired)),
            Err(IdentityError::Invalid(reason)) => {
                tracing::info!(policy, %reason, "identity refused");
                let detail = match &self.identity {
                    IdentitySource::Header(name) => {
                        format!("The {name} header that names the user must be sent once.")
                    }
                    _ => "The bearer token that identifies the user is not valid.".to_owned(),
                };
                Err(Problem::new(ProblemCode::IdentityRequired).with_detail(detail))
            }
            Err(IdentityError::KeysUnavailable(reason)) => {
                tracing::warn!(%reason, "cannot fetch the keys that verify identities");
                Err(Problem::new(ProblemCode::AuthorizationServerUnavailable))
            }
        }
    }
}
