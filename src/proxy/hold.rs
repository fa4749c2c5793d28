//! Waiting: holding a call while its person decides. Buffers the body for
//! pingora's replay, enforces the pending limits (overall and per person),
//! runs the approval raced against the agent hanging up, and turns its
//! outcome into a forward (token in `CallCtx`) or a refusal.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use pingora::proxy::Session;
use tracing::Instrument;

use super::answer::failed_approval;
use super::decide::HeldCall;
use super::{CallCtx, Countersign, Refusal};
use crate::approval::{self, ApprovalRequest, Outcome};
use crate::ciba::AuthorizeRequest;
use crate::metrics::Metrics;
use crate::problem::{Problem, ProblemCode};

/// How many calls each person has held right now.
#[derive(Debug, Default)]
pub(super) struct PendingPerUser(Arc<Mutex<HashMap<String, usize>>>);

impl PendingPerUser {
    /// Counts one more held call for `subject`, unless they have `limit`.
    fn try_hold(&self, subject: &str, limit: usize) -> Option<UserSlot> {
        let mut counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let count = counts.entry(subject.to_owned()).or_insert(0);
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(UserSlot {
            counts: self.0.clone(),
            subject: subject.to_owned(),
        })
    }
}

/// One held call of one person; released however the hold ends.
struct UserSlot {
    counts: Arc<Mutex<HashMap<String, usize>>>,
    subject: String,
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = counts.get_mut(&self.subject) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.subject);
            }
        }
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
    /// Holds `call` until its approval ends. `Ok` only when the person
    /// approved, with the fresh token in `ctx`.
    pub(super) async fn hold(
        &self,
        session: &mut Session,
        ctx: &mut CallCtx,
        call: HeldCall<'_>,
    ) -> Result<(), Refusal> {
        let HeldCall {
            policy,
            identity,
            rendered,
        } = call;
        let Some(_user_slot) = self
            .pending_per_user
            .try_hold(&identity.subject, self.limits.max_pending_per_user)
        else {
            return Err(Problem::new(ProblemCode::TooManyPendingForUser)
                .with_detail(format!(
                    "The user already has {} approval requests waiting, the most this gateway sends at once; wait for them to answer, then try again.",
                    self.limits.max_pending_per_user
                ))
                .with_retry_after(30)
                .into());
        };

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
                () = client_gone(session) => None,
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
    let declared = session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok());
    if declared.is_some_and(|len| len > limit) {
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

/// Resolves when the agent closes its connection (after the body was read).
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
