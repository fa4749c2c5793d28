//! Waiting: a policy call becomes a stored approval (or attaches to the one
//! its retry belongs to), and the agent waits for it as the policy says:
//! held until the person answers, answered `202 Accepted` at once, or held
//! for a while and then `202`. The approval itself goes on in the
//! [`Engine`](crate::approval::engine::Engine) whether or not the agent stays.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use pingora::proxy::Session;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use super::{CallCtx, Countersign, JsonReply, Reply};
use crate::approval::binding;
use crate::approval::engine::{QuorumStatus, StartError};
use crate::decision::HeldCall;
use crate::identity::IdentitySource;
use crate::metrics::Metrics;
use crate::policy::Bind;
use crate::policy::WaitMode;
use crate::problem::{Problem, ProblemCode};
use crate::store::{Approval, ApprovalState, Inserted, NewApproval, StoreError, StoredRequest};
use crate::upstream::{forwarded_host, keeps_request_header};

const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Decrements the held-call count however the hold ends.
struct HeldGuard {
    held: Arc<AtomicUsize>,
    metrics: Metrics,
}

impl Drop for HeldGuard {
    fn drop(&mut self) {
        self.held.fetch_sub(1, Ordering::AcqRel);
        self.metrics.held_calls.dec();
    }
}

impl Countersign {
    /// Stores (or attaches to) the approval of `call` and waits for it as its
    /// policy says. Every ending is a reply: the recorded answer of the
    /// upstream, `202`, or a problem.
    pub(super) async fn hold(
        &self,
        session: &mut Session,
        ctx: &mut CallCtx,
        call: HeldCall,
    ) -> Reply {
        match self.hold_inner(session, ctx, call).await {
            Ok(reply) | Err(reply) => reply,
        }
    }

    async fn hold_inner(
        &self,
        session: &mut Session,
        ctx: &mut CallCtx,
        call: HeldCall,
    ) -> Result<Reply, Reply> {
        let policy = call.policy.clone();
        let store = self.engine.store();
        let mut new = self.new_approval(session, &call)?;
        // Polls and the forward, here or on another replica, join the
        // call's trace.
        new.trace_parent = ctx.trace.as_ref().and_then(|t| t.call.traceparent());
        let countersigners = call.rendered.countersigners.clone();
        // Everything of the call the approval needs is in `new`: the body,
        // rendering and identity are not kept for the whole hold.
        drop(call);
        let waiting = format!(
            "Waiting for {} to approve '{}'",
            new.subject, new.binding_message
        );

        // The per-person limit counts other calls: a retry always attaches.
        // It is checked in the statement that stores the approval, so a
        // burst cannot get past it.
        let id = match self
            .engine
            .create(
                &new,
                policy.clone(),
                self.limits.max_pending_per_user,
                countersigners.as_ref(),
            )
            .await
        {
            Ok(Inserted::Created) => {
                ctx.approval_id = Some(new.id.clone());
                tracing::info!(approval_id = %new.id, policy = %policy.name, "call held for approval");
                new.id.clone()
            }
            Ok(Inserted::Existing(existing)) => {
                tracing::info!(approval_id = %existing.id, policy = %policy.name, "retry attached to its approval");
                self.metrics
                    .retries_attached
                    .with_label_values(&[&policy.name])
                    .inc();
                ctx.approval_id = Some(existing.id.clone());
                existing.id
            }
            Ok(Inserted::LimitReached) => {
                return Err(Problem::new(ProblemCode::TooManyPendingForUser)
                    .with_detail(format!(
                        "The user already has {} approval requests waiting, the most this gateway sends at once; wait for them to answer, then try again.",
                        self.limits.max_pending_per_user
                    ))
                    .with_retry_after(30)
                    .into());
            }
            Err(StartError::Store(StoreError::KeyReuse)) => {
                return Err(ProblemCode::IdempotencyKeyReused.into())
            }
            Err(StartError::Store(error)) => return Err(store_problem(error)),
            Err(StartError::Ciba(error)) => {
                return Err(super::answer::failed_approval(error).into())
            }
            Err(StartError::CountersignerBusy(subject)) => {
                return Err(Problem::new(ProblemCode::TooManyPendingForUser)
                    .with_detail(format!(
                        "{subject}, a countersigner of this call, already has {} approval requests waiting, the most this gateway sends at once; try again later.",
                        self.limits.max_pending_per_user
                    ))
                    .with_retry_after(30)
                    .into());
            }
            Err(StartError::ShuttingDown) => {
                return Err(Problem::new(ProblemCode::ShuttingDown)
                    .with_retry_after(5)
                    .into())
            }
        };
        // Stored now; a held call keeps only who approves (the copy of the
        // request's headers and body in `new` would live as long as the hold).
        let subject = new.subject.clone();
        drop(new);

        let hold_for = match policy.wait {
            WaitMode::Async => Duration::ZERO,
            WaitMode::HoldFor(limit) => limit.min(self.limits.max_hold),
            // A little past the approval's own deadline, so that it ends
            // (expired) while the agent is still here.
            WaitMode::Hold => self.limits.max_hold + Duration::from_secs(5),
        };
        // An answer too large to record can still reach the agent that is
        // here when it comes.
        let mut large_answer = None;
        let approval = if hold_for.is_zero() {
            store.get(&id).await.map_err(store_problem)?
        } else {
            if self.held.fetch_add(1, Ordering::AcqRel) >= self.limits.max_pending {
                self.held.fetch_sub(1, Ordering::AcqRel);
                return Err(Problem::new(ProblemCode::TooManyPending)
                    .with_retry_after(5)
                    .into());
            }
            self.metrics.held_calls.inc();
            let _held = HeldGuard {
                held: self.held.clone(),
                metrics: self.metrics.clone(),
            };
            let _waiting = self.note_waiting(session, ctx, &subject, &id);
            let until = Instant::now() + hold_for;
            if ctx.mcp.is_none() {
                large_answer = Some(self.engine.watch_large_answer(&id));
            }
            let waited = match self
                .wait_streaming(session, ctx, &id, until, &waiting)
                .await
            {
                Some(waited) => waited,
                None => tokio::select! {
                    approval = self.engine.wait(&id, until) => Waited::Answered(Box::new(approval)),
                    () = client_gone(session) => Waited::Gone,
                    () = self.draining.started() => Waited::Draining,
                },
            };
            match waited {
                Waited::Answered(approval) => Some((*approval).map_err(store_problem)?),
                Waited::Gone => {
                    tracing::info!(approval_id = %id, "agent disconnected during the hold; the approval goes on and a retry gets its answer");
                    return Err(Reply::Disconnected);
                }
                Waited::Draining => {
                    tracing::info!(approval_id = %id, "gateway shutting down during the hold; the approval stays pending for a retry");
                    return Err(Problem::new(ProblemCode::ShuttingDown)
                        .with_retry_after(5)
                        .into());
                }
            }
        };
        let approval = approval.ok_or(ProblemCode::ApprovalStoreUnavailable)?;
        if approval.state == ApprovalState::Done {
            if let Some(answer) = large_answer.as_mut().and_then(|w| w.take()) {
                ctx.outcome = super::CallOutcome::Approved;
                return Ok(Reply::Stream(Box::new(answer)));
            }
        }
        let quorum = self.engine.quorum_status(&approval).await;
        Ok(self.reply_for(ctx, &approval, quorum.as_ref()))
    }

    fn new_approval(&self, session: &Session, call: &HeldCall) -> Result<NewApproval, Reply> {
        let header = session.req_header();
        let identity_header = match &self.identity {
            IdentitySource::Header(name) => Some(name.as_str()),
            _ => None,
        };
        let mut keys = header.headers.get_all(IDEMPOTENCY_KEY).iter();
        let idempotency_key = match (keys.next(), keys.next()) {
            (None, _) => None,
            (Some(key), None) => match key.to_str() {
                Ok(key) if !key.trim().is_empty() && key.len() <= 255 => {
                    Some(key.trim().to_owned())
                }
                _ => {
                    return Err(Problem::new(ProblemCode::InvalidBody)
                        .with_detail(
                            "The Idempotency-Key header must be 1 to 255 visible characters.",
                        )
                        .into())
                }
            },
            (Some(_), Some(_)) => {
                return Err(Problem::new(ProblemCode::InvalidBody)
                    .with_detail("Send one Idempotency-Key header, not several.")
                    .into())
            }
        };
        let method = header.method.as_str().to_owned();
        let path_and_query = String::from_utf8_lossy(header.raw_path()).into_owned();
        let body = call.body.as_deref().unwrap_or_default().to_vec();
        let subject = call.identity.subject.clone();
        // The Host counts only where the upstream receives it.
        let preserves_host = self
            .upstreams
            .get(&call.upstream)
            .is_some_and(|u| u.config.preserve_host);
        let host = header
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .filter(|_| preserves_host)
            .and_then(|h| crate::policy::host_key(h).ok())
            .unwrap_or_default();
        let fingerprint = fingerprint(
            &[
                &call.upstream,
                &call.policy.name,
                &host,
                &method,
                &path_and_query,
            ],
            call.fingerprint_body.as_deref().unwrap_or(&body),
            &subject,
        );
        let headers: Vec<(String, Vec<u8>)> = header
            .headers
            .iter()
            .filter(|(name, _)| keeps_request_header(name.as_str(), identity_header))
            .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
            .collect();
        let now = SystemTime::now();
        let hold = call
            .policy
            .requested_expiry
            .map_or(self.limits.max_hold, |e| e.min(self.limits.max_hold));
        let id = uuid::Uuid::new_v4().to_string();
        let request = StoredRequest {
            method,
            path_and_query,
            headers,
            body,
        };
        let mut authorization_details = call.rendered.authorization_details.clone();
        if call.policy.bind == Bind::Call {
            let host = self
                .upstreams
                .get(&call.upstream)
                .map(|u| forwarded_host(&u.config, &request.headers))
                .unwrap_or_default();
            let entry = binding::entry(&id, &request, &host, call.tool.as_deref());
            authorization_details = Some(binding::with_entry(authorization_details, entry));
        }
        Ok(NewApproval {
            id,
            policy: call.policy.name.clone(),
            subject,
            upstream: call.upstream.clone(),
            fingerprint,
            idempotency_key,
            binding_message: call.rendered.binding_message.clone(),
            authorization_details,
            request,
            created_at: now,
            expires_at: now + hold,
            parent_id: None,
            countersign_min: call.rendered.countersigners.as_ref().map(|c| c.min),
            trace_parent: None,
        })
    }

    /// What an agent is told about `approval` as it stands.
    fn reply_for(
        &self,
        ctx: &mut CallCtx,
        approval: &Approval,
        quorum: Option<&QuorumStatus>,
    ) -> Reply {
        match approval.state {
            ApprovalState::Done => match &approval.response {
                Some(response) if response.body.is_some() => {
                    ctx.outcome = super::CallOutcome::Approved;
                    Reply::Replay(Box::new(response.clone()))
                }
                _ => ProblemCode::ResponseNotRecorded.into(),
            },
            state if state.is_final() => {
                let code = approval
                    .problem_code
                    .as_deref()
                    .and_then(ProblemCode::parse)
                    .unwrap_or(ProblemCode::ApprovalFailed);
                let mut problem = Problem::new(code);
                if let Some(detail) = &approval.problem_detail {
                    problem = problem.with_detail(format!("The call was not made: {detail}."));
                }
                match code {
                    ProblemCode::AuthorizationServerUnavailable => problem.with_retry_after(5),
                    _ => problem,
                }
                .into()
            }
            _ => {
                ctx.outcome = super::CallOutcome::Accepted;
                // In ping mode the stored interval is the slow safety poll;
                // the answer may come any moment, so the agent's hint is the
                // CIBA default interval at most.
                let ping_cap = if self.engine.pings().is_some() {
                    5
                } else {
                    u64::MAX
                };
                let retry_after = approval
                    .ciba
                    .as_ref()
                    .map_or(5, |c| c.interval.as_secs().clamp(1, ping_cap));
                Reply::Json(Box::new(JsonReply {
                    status: 202,
                    body: pending_body(approval, &self.approvals_path, retry_after, quorum),
                    retry_after: Some(retry_after),
                    location: Some(format!("{}/{}", self.approvals_path, approval.id)),
                }))
            }
        }
    }
}

/// The `202` body: a sentence an LLM can relay, and where to look.
fn pending_body(
    approval: &Approval,
    approvals_path: &str,
    retry_after: u64,
    quorum: Option<&QuorumStatus>,
) -> serde_json::Value {
    let detail = match quorum {
        Some(quorum) => format!(
            "Waiting for approval of '{}': {}; call again in {retry_after} s.",
            approval.binding_message,
            quorum.waiting_sentence()
        ),
        None => format!(
            "Waiting for {} to approve '{}'; call again in {retry_after} s.",
            approval.subject, approval.binding_message
        ),
    };
    let mut body = serde_json::json!({
        "status": "pending",
        "approval_id": approval.id,
        "detail": detail,
        "binding_message": approval.binding_message,
        "location": format!("{approvals_path}/{}", approval.id),
        "retry_after": retry_after,
    });
    if let Some(quorum) = quorum {
        body["approvers"] = approvers(quorum);
    }
    body
}

/// Who approves a countersigned call, and how each answered so far.
pub(super) fn approvers(quorum: &QuorumStatus) -> serde_json::Value {
    quorum
        .members
        .iter()
        .map(|m| {
            serde_json::json!({
                "subject": m.subject,
                "role": if m.countersigner { "countersigner" } else { "requester" },
                "state": m.state.as_str(),
            })
        })
        .collect()
}

/// The identity of a call across retries: upstream, policy, host (where the
/// upstream receives it), method and canonical target (`target`, in that
/// order), body and the person. The same path to two upstreams, or to two
/// virtual hosts, is two calls. SHA-256, so the body itself is not kept as
/// the key.
fn fingerprint(target: &[&str; 5], body: &[u8], subject: &str) -> String {
    let mut hash = Sha256::new();
    let digest = Sha256::digest(body);
    let parts = target
        .iter()
        .map(|p| p.as_bytes())
        .chain([&digest[..], subject.as_bytes()]);
    for part in parts {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part);
    }
    format!("{:x}", hash.finalize())
}

pub(super) fn store_problem(error: StoreError) -> Reply {
    tracing::warn!(%error, "approval store unavailable");
    match error {
        StoreError::KeyReuse => ProblemCode::IdempotencyKeyReused.into(),
        StoreError::Unavailable(_) => ProblemCode::ApprovalStoreUnavailable.into(),
    }
}

/// Reads the whole body (at most `limit` bytes) and arms pingora's retry
/// buffer so the same bytes are replayed upstream after the approval.
pub(super) async fn read_body(
    session: &mut Session,
    limit: usize,
) -> Result<Option<Bytes>, Problem> {
    let too_large = || {
        Problem::new(ProblemCode::BodyTooLarge).with_detail(format!(
            "The request body is larger than the {limit} bytes this gateway holds for approval."
        ))
    };
    if declared_length(session).is_some_and(|len| len > limit) {
        return Err(too_large());
    }
    // The agent may wait for "100 Continue" before sending the body; pingora
    // does not answer it when the body is read here.
    let expects_continue = session
        .req_header()
        .headers
        .get(http::header::EXPECT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
    if expects_continue {
        session
            .req_header_mut()
            .remove_header(&http::header::EXPECT);
        session
            .downstream_session
            .write_continue_response()
            .await
            .map_err(|_| {
                Problem::new(ProblemCode::InvalidBody)
                    .with_detail("The request body could not be read.")
            })?;
    }
    session.enable_retry_buffering();
    let mut body = BytesMut::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > limit {
                    return Err(too_large());
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(_) => {
                return Err(Problem::new(ProblemCode::InvalidBody)
                    .with_detail("The request body could not be read."))
            }
        }
    }
    if session.retry_buffer_truncated() {
        return Err(too_large());
    }
    Ok((!body.is_empty()).then(|| body.freeze()))
}

/// The body length the request's `Content-Length` declares, if readable.
pub(super) fn declared_length(session: &Session) -> Option<usize> {
    session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok())
}

/// Resolves when the agent closes its connection (after the body was read).
/// How a hold's wait ended.
pub(super) enum Waited {
    /// The approval's state when it ended or the hold ran out.
    Answered(Box<Result<Approval, StoreError>>),
    /// The agent hung up.
    Gone,
    /// The gateway is shutting down.
    Draining,
}

pub(super) async fn client_gone(session: &mut Session) {
    loop {
        match session.downstream_session.read_body_or_idle(true).await {
            Ok(Some(_)) => {
                // Bytes of a pipelined next request: the agent is still there.
                std::future::pending::<()>().await;
            }
            Ok(None) | Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fingerprint;

    #[test]
    fn a_call_is_one_call_only_on_one_host_and_upstream() {
        let call =
            |upstream, host| fingerprint(&[upstream, "buy", host, "POST", "/shop"], b"{}", "alice");
        assert_eq!(call("shop", "a.example"), call("shop", "a.example"));
        assert_ne!(call("shop", "a.example"), call("shop", "b.example"));
        assert_ne!(call("shop", "a.example"), call("other", "a.example"));
        // Parts are length-prefixed: moving a byte across a boundary differs.
        assert_ne!(call("shopa", ".example"), call("shop", "a.example"));
        assert_ne!(
            call("shop", "a.example"),
            fingerprint(
                &["shop", "refund", "a.example", "POST", "/shop"],
                b"{}",
                "alice"
            )
        );
        assert_ne!(
            call("shop", "a.example"),
            fingerprint(&["shop", "buy", "a.example", "POST", "/shop"], b"{}", "bob")
        );
    }
}
