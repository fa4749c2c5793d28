//! Deciding what a call needs: its canonical request, route and policy,
//! who must approve it, and what they are asked.

use std::sync::Arc;

use bytes::Bytes;
use pingora::proxy::Session;

use super::answer::request_problem;
use super::{hold, CallCtx, Countersign, Reply};
use crate::config::DefaultAction;
use crate::identity::{Identity, IdentityError, IdentitySource};
use crate::policy::{self, Choice, Policy, PolicyMatch, PolicySet, RenderedRequest};
use crate::problem::{Problem, ProblemCode};
use crate::request::{self, CanonicalRequest};

/// A call that must wait for its person's approval, under the policy it
/// matched (a reload does not change it).
pub(super) struct HeldCall {
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

/// A token never goes anywhere its policy does not name. Load-time checks
/// make a refusal here unreachable.
pub(super) fn check_upstream(policy: &Policy, upstream: &str) -> Result<(), Reply> {
    if policy.upstreams.iter().any(|u| u == upstream) {
        return Ok(());
    }
    tracing::error!(policy = %policy.name, %upstream, "policy call routed to an upstream the policy does not name");
    Err(ProblemCode::UpstreamNotAllowed.into())
}

impl Countersign {
    /// `Ok(None)`: the call passes through as it is (already rewritten to
    /// its canonical target). `Ok(Some)`: it needs an approval.
    pub(super) async fn decide(
        &self,
        session: &mut Session,
        ctx: &mut CallCtx,
    ) -> Result<Option<HeldCall>, Reply> {
        let mut request =
            CanonicalRequest::from_header(session.req_header()).map_err(request_problem)?;
        if let Some(id) = request
            .path
            .forward
            .strip_prefix(self.approvals_path.as_str())
        {
            if id.is_empty() || id.starts_with('/') {
                return Err(Box::pin(self.approval_status(
                    session,
                    ctx,
                    id.trim_start_matches('/'),
                ))
                .await);
            }
        }
        let upstream_name = self
            .routes
            .find(Some(&request.host), &request.path.match_key)
            .ok_or(ProblemCode::NoRoute)?;
        let upstream = self
            .upstreams
            .get(upstream_name)
            .ok_or(ProblemCode::NoRoute)?;
        request
            .check_encoded_percent(upstream.config.allow_encoded_percent)
            .and_then(|()| request.check_upgrade(upstream.config.allow_upgrade))
            .map_err(request_problem)?;
        // Normalise once: the upstream receives exactly the target matched.
        if let Some(uri) = request.rewrite.take() {
            session.req_header_mut().set_uri(uri);
        }
        ctx.upstream = Some(upstream.clone());

        // One policy set for the whole call, however a reload swaps it.
        let policies = self.policies.load_full();
        if let Some(found) = policies.find_mcp(Some(&request.host), &request.path) {
            // Boxed, like every step only policy calls take: their states
            // would otherwise size every pass-through call's future.
            return Box::pin(self.decide_mcp(
                session,
                ctx,
                &policies,
                found,
                &request,
                &upstream.name,
            ))
            .await;
        }
        let method = session.req_header().method.clone();
        let body = self
            .refuse_form_method_field(session, &request, &policies)
            .await?;
        let body = self
            .refuse_stray_tool_call(session, &request, &policies, &upstream.name, body)
            .await?;
        let Some(found) = policies.find(method.as_str(), Some(&request.host), &request.path) else {
            return match self.default_action {
                DefaultAction::Pass => Ok(None),
                DefaultAction::Deny => Err(ProblemCode::NoPolicy.into()),
            };
        };
        ctx.policy = Some(found.policy.name.clone());
        let identity = Box::pin(self.identify(session, &found.policy.name)).await?;
        let body = match body {
            Some(body) => body,
            None => Box::pin(hold::read_body(session, self.limits.max_body_bytes)).await?,
        };
        let Some((policy, rendered)) = self.choose(
            &policies,
            &found,
            body.as_deref(),
            &request,
            &identity,
            session,
            ctx,
        )?
        else {
            return Ok(None);
        };
        check_upstream(&policy, &upstream.name)?;
        Ok(Some(HeldCall {
            policy,
            identity,
            rendered,
            body,
            upstream: upstream.name.clone(),
            fingerprint_body: None,
            tool: None,
        }))
    }

    /// Rails and Rack take the method from a `_method` field of a form POST
    /// (Rack reads a POST without a Content-Type as a form too), Laravel
    /// also from a JSON one (any Content-Type containing `/json` or `+json`),
    /// and Express's method-override with `methods: null` from the body of
    /// a call of any method: on a path some policy covers, such a body is
    /// read and refused, whatever the method. Every Content-Type header
    /// counts. Returns the body when it was read.
    async fn refuse_form_method_field(
        &self,
        session: &mut Session,
        request: &CanonicalRequest,
        policies: &PolicySet,
    ) -> Result<Option<Option<Bytes>>, Reply> {
        let header = session.req_header();
        let checks = request::method_field_readers(&header.headers);
        if checks.is_empty() {
            return Ok(None);
        }
        if !policies.covers(Some(&request.host), &request.path) {
            return Ok(None);
        }
        let body = Box::pin(hold::read_body(session, self.limits.max_body_bytes)).await?;
        let bytes = body.as_deref().unwrap_or_default();
        let encoding = policy::body::content_encoding(&session.req_header().headers);
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
    async fn refuse_stray_tool_call(
        &self,
        session: &mut Session,
        request: &CanonicalRequest,
        policies: &PolicySet,
        upstream: &str,
        body: Option<Option<Bytes>>,
    ) -> Result<Option<Option<Bytes>>, Reply> {
        let endpoints = policies.mcp_endpoints_to(Some(&request.host), upstream);
        if endpoints.is_empty() {
            return Ok(body);
        }
        let body = match body {
            Some(body) => body,
            None => hold::read_body(session, self.limits.max_body_bytes).await?,
        };
        let bytes = body.as_deref().unwrap_or_default();
        if !bytes.is_empty()
            && policy::body::content_encoding(&session.req_header().headers).is_some()
        {
            // Express's json() inflates it for a legacy transport's handler.
            return Err(Problem::new(ProblemCode::InvalidMcpMessage)
                .with_detail(
                    "A body sent to this upstream, which serves an MCP endpoint, must be sent without Content-Encoding, so that the gateway can see it calls no tool that needs a person's approval.",
                )
                .into());
        }
        if let Some((tool, endpoint)) = crate::mcp::stray_tool_call(&endpoints, bytes) {
            return Err(Problem::new(ProblemCode::InvalidMcpMessage)
                .with_detail(format!(
                    "This request carries a tools/call of the tool '{tool}', which needs a person's approval, but was sent to another path than the MCP endpoint {endpoint}; send it there (Streamable HTTP), where the gateway holds it."
                ))
                .into());
        }
        Ok(Some(body))
    }

    pub(super) async fn identify(
        &self,
        session: &Session,
        policy: &str,
    ) -> Result<Identity, Reply> {
        match self.identity.identify(session.req_header()).await {
            Ok(identity) => Ok(identity),
            Err(IdentityError::Missing) => Err(ProblemCode::IdentityRequired.into()),
            Err(IdentityError::Invalid(reason)) => {
                tracing::info!(policy, %reason, "identity refused");
                let detail = match &self.identity {
                    IdentitySource::Header(name) => {
                        format!("The {name} header that names the user must be sent once.")
                    }
                    _ => "The bearer token that identifies the user is not valid.".to_owned(),
                };
                Err(Problem::new(ProblemCode::IdentityRequired)
                    .with_detail(detail)
                    .into())
            }
            Err(IdentityError::KeysUnavailable(reason)) => {
                tracing::warn!(%reason, "cannot fetch the keys that verify identities");
                Err(ProblemCode::AuthorizationServerUnavailable.into())
            }
        }
    }

    /// Which policy of the route applies (its conditions, in file order)
    /// and what its person is asked. `Ok(None)`: no condition took the call
    /// and the route lets it pass without approval.
    #[allow(clippy::too_many_arguments)]
    fn choose(
        &self,
        policies: &PolicySet,
        found: &PolicyMatch<'_>,
        body: Option<&[u8]>,
        request: &CanonicalRequest,
        identity: &Identity,
        session: &Session,
        ctx: &mut CallCtx,
    ) -> Result<Option<(Arc<Policy>, RenderedRequest)>, Reply> {
        let header = session.req_header();
        let input = policy::CallInput {
            headers: &header.headers,
            body,
            params: &found.params,
            query: request.query.as_deref(),
            user: &identity.claims,
            method: header.method.as_str(),
            path: &request.path.forward,
            arguments: None,
        };
        let policy = match policies.choose(found, &input).map_err(Problem::from)? {
            Choice::Hold(policy) => policy,
            Choice::Pass(policy) => {
                ctx.policy = Some(policy.name.clone());
                ctx.passed_by_condition = true;
                return Ok(None);
            }
            Choice::Deny(policy) => {
                ctx.policy = Some(policy.name.clone());
                return Err(Problem::new(ProblemCode::PolicyDenied)
                    .with_detail(format!(
                        "Policy '{}' refuses this call: its condition does not allow it, and no approval can.",
                        policy.name
                    ))
                    .into());
            }
        };
        ctx.policy = Some(policy.name.clone());
        let rendered = policies
            .render_call(policy, &input)
            .map_err(Problem::from)?;
        Ok(Some((policy.clone(), rendered)))
    }
}
