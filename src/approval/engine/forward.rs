//! Ending an approval: recording a refusal, or claiming the approved call
//! and forwarding it once; answers too large to record.

use super::*;
use crate::approval::binding;
use crate::identity::IdentityError;
use crate::policy::Bind;
use crate::upstream::{Credentials, ForwardError, Forwarded, Overflow};

/// How long a bound call waits for the authorization server's signing keys.
const KEYS_WAIT: Duration = Duration::from_secs(30);
const KEYS_RETRY_EVERY: Duration = Duration::from_secs(5);

impl Engine {
    /// Records how the approval ended; on approval, forwards the call once.
    pub(super) async fn end(&self, approval: &Approval, outcome: Outcome, policy: Option<&Policy>) {
        let id = approval.id.as_str();
        let result = outcome.result_label();
        self.metrics
            .approvals
            .with_label_values(&[&approval.policy, result])
            .inc();
        let waited = SystemTime::now()
            .duration_since(approval.created_at)
            .unwrap_or_default();
        self.metrics
            .approval_wait
            .with_label_values(&[result])
            .observe(waited.as_secs_f64());
        tracing::info!(
            approval_id = id,
            policy = %approval.policy,
            result,
            waited_ms = waited.as_millis() as u64,
            "approval finished"
        );
        let grant = match outcome {
            Outcome::Approved(grant) => grant,
            Outcome::Denied => {
                return self
                    .refuse(approval, ApprovalState::Denied, ProblemCode::AccessDenied)
                    .await
            }
            Outcome::Expired => {
                return self
                    .refuse(
                        approval,
                        ApprovalState::Expired,
                        ProblemCode::ApprovalExpired,
                    )
                    .await
            }
            Outcome::Failed(error) => {
                let code = problem_for(&error);
                tracing::warn!(approval_id = id, %error, "approval failed");
                return self.refuse(approval, state_for(code), code).await;
            }
        };
        // Resumed after its policy was removed: nothing says which scopes
        // the call needs, so it is not forwarded (fail closed).
        let Some(policy) = policy else {
            tracing::warn!(
                approval_id = id,
                policy = %approval.policy,
                "approved, but its policy is no longer configured; the call is not forwarded"
            );
            return self
                .refuse(approval, ApprovalState::Failed, ProblemCode::ApprovalFailed)
                .await;
        };
        // The person may approve less than was asked; the call then cannot
        // be made, so it is not forwarded.
        if let Some(granted) = &grant.scope {
            let granted: Vec<&str> = granted.split_whitespace().collect();
            if let Some(missing) = policy
                .scopes
                .iter()
                .find(|s| !granted.contains(&s.as_str()))
            {
                tracing::info!(approval_id = id, %missing, "approved without a required scope");
                return self
                    .refuse(
                        approval,
                        ApprovalState::Denied,
                        ProblemCode::ScopeNotGranted,
                    )
                    .await;
            }
        }
        // Asked for a token bound to the gateway's key, it takes no other.
        if self.ciba.dpop().is_some() && !grant.dpop {
            tracing::warn!(approval_id = id, "the authorization server issued a bearer token where a DPoP-bound one was asked for; the call is not forwarded");
            return self
                .refuse(approval, ApprovalState::Failed, ProblemCode::TokenUnbound)
                .await;
        }
        // A bound call goes only with a token that names it.
        if let Err(why) = self
            .check_binding(approval, policy, &grant.access_token)
            .await
        {
            tracing::warn!(approval_id = id, %why, "the issued token does not bind the call; it is not forwarded");
            return self
                .refuse(approval, ApprovalState::Failed, ProblemCode::TokenUnbound)
                .await;
        }
        // A member of a countersigned call: its token is kept until every
        // member needed has answered; whoever records the last answer
        // forwards.
        if let Some(family) = super::quorum::family_of(approval) {
            let kept = KeptGrant {
                token: grant.access_token.clone(),
                dpop: grant.dpop,
            };
            drop(grant);
            return self.keep_and_complete(id, family, &kept).await;
        }
        self.forward(approval, &grant.access_token, grant.dpop, &[])
            .await;
    }

    /// Claims the approved call and forwards it once, with `token` (and
    /// the countersigners' tokens), recording the upstream's answer.
    pub(super) async fn forward(
        &self,
        approval: &Approval,
        token: &Secret,
        dpop: bool,
        countersignatures: &[Secret],
    ) {
        let id = approval.id.as_str();
        // The claim: only one process, once, gets past this; whoever holds
        // the token may make it (the lease is this process's from then on).
        let owner = self.owner();
        let forward_for = self.forward_timeout(&approval.upstream);
        let claimed = self
            .persist("claim the approved call", TOKEN_RETRY_FOR, || {
                self.store.claim(id, &owner, self.store.now() + forward_for)
            })
            .await;
        if claimed != Some(true) {
            if claimed.is_none() {
                tracing::error!(
                    approval_id = id,
                    "could not claim the approved call; it is not forwarded"
                );
            }
            return;
        }
        let mut span = self.traces.span(
            "forward",
            Kind::Client,
            Parent::Remote(approval.trace_parent.as_deref()),
        );
        span.set("countersign.approval_id", id.to_owned());
        span.set("countersign.policy", approval.policy.clone());
        span.set("countersign.upstream", approval.upstream.clone());
        let credentials = Credentials {
            token,
            dpop: self.ciba.dpop().filter(|_| dpop).map(|key| &**key),
            countersignatures,
        };
        let sent = self
            .upstreams
            .send(
                &approval.upstream,
                id,
                &approval.request,
                credentials,
                span.traceparent().as_deref(),
            )
            .await;
        match &sent {
            Ok(forwarded) => {
                span.set(
                    "http.response.status_code",
                    i64::from(forwarded.recorded.status),
                );
            }
            Err(error) => span.fail(error.kind()),
        }
        drop(span);
        match sent {
            Ok(Forwarded { recorded, overflow }) => {
                tracing::info!(
                    approval_id = id,
                    policy = %approval.policy,
                    status = recorded.status,
                    "approved call forwarded"
                );
                if let Some(overflow) = overflow {
                    self.hand_over_large_answer(id, &recorded, overflow);
                }
                // Kept until recorded: the row stays `forwarding` under this
                // process's lease meanwhile, and becomes `outcome_unknown`
                // only if this process dies first.
                let _ = self
                    .persist("record the upstream's answer", ANSWER_RETRY_FOR, || {
                        self.store.finish(id, &recorded)
                    })
                    .await;
            }
            Err(ForwardError::NotSent(reason) | ForwardError::UnknownUpstream(reason)) => {
                tracing::warn!(approval_id = id, %reason, "approved call could not be sent");
                let _ = self
                    .end_forwarding(
                        id,
                        "record the failed forward",
                        ApprovalState::Failed,
                        ProblemCode::UpstreamUnavailable,
                    )
                    .await;
            }
            Err(ForwardError::AnswerLost(reason)) => {
                tracing::warn!(approval_id = id, %reason, "the upstream's answer to the approved call was lost");
                let marked = self
                    .end_forwarding(
                        id,
                        "record the lost answer",
                        ApprovalState::OutcomeUnknown,
                        ProblemCode::OutcomeUnknown,
                    )
                    .await;
                // Not recorded: housekeeping marks it later, and counts it.
                if marked == Some(true) {
                    self.metrics.outcome_unknown.inc();
                }
            }
        }
    }

    /// Ends the `forwarding` approval `id` in `to` with `code`, retried for
    /// a while (`what` names the step in the log); whether it happened,
    /// `None` when the store stayed unavailable.
    async fn end_forwarding(
        &self,
        id: &str,
        what: &'static str,
        to: ApprovalState,
        code: ProblemCode,
    ) -> Option<bool> {
        self.persist(what, ANSWER_RETRY_FOR, || {
            self.store
                .transition(id, ApprovalState::Forwarding, to, Some(code.as_str()))
        })
        .await
    }

    /// Whether `token` names exactly the call the person was asked about
    /// (docs/call-binding.md), when the approval was asked with a binding or
    /// its policy binds calls. Signing keys that cannot be fetched are
    /// waited for a little: the token stays good for minutes.
    async fn check_binding(
        &self,
        approval: &Approval,
        policy: &Policy,
        token: &Secret,
    ) -> Result<(), String> {
        let expected = match (
            binding::find(approval.authorization_details.as_ref()),
            policy.bind,
        ) {
            (None, Bind::None) => return Ok(()),
            (None, Bind::Call) => {
                return Err(
                    "the person was asked without a binding, and the policy now binds calls".into(),
                )
            }
            (Some(entry), _) => entry,
        };
        let keys = self
            .issued_tokens
            .as_ref()
            .ok_or("the authorization server publishes no jwks_uri to check the token with")?;
        let audience = policy
            .audience
            .as_deref()
            .ok_or("the policy names no audience")?;
        let started = Instant::now();
        loop {
            match keys.claims(token.expose(), audience).await {
                Ok(claims) => return binding::mismatch(&claims, expected).map_or(Ok(()), Err),
                Err(IdentityError::KeysUnavailable(why)) if started.elapsed() < KEYS_WAIT => {
                    tracing::warn!(approval_id = %approval.id, %why, "the authorization server's signing keys could not be fetched; trying again");
                    tokio::time::sleep(KEYS_RETRY_EVERY).await;
                }
                Err(error) => return Err(format!("the token cannot be verified: {error}")),
            }
        }
    }

    fn lease_until(&self, after: SystemTime) -> SystemTime {
        after + self.config.lease
    }

    /// Takes (or renews) the lease on `id` until `busy_until` plus a lease,
    /// on the store's clock.
    pub(super) async fn take_lease(&self, id: &str, busy_until: SystemTime) -> bool {
        match self
            .store
            .lease(id, &self.owner(), self.lease_until(busy_until))
            .await
        {
            Ok(held) => held,
            Err(error) => {
                tracing::warn!(approval_id = id, %error, "could not renew the polling lease");
                false
            }
        }
    }

    /// An answer too large to record goes to the agent waiting for it in
    /// this process, if one is; otherwise it is read to its end and dropped
    /// (the agent gets `response_not_recorded`).
    fn hand_over_large_answer(&self, id: &str, recorded: &StoredResponse, overflow: Overflow) {
        let answer = LargeAnswer {
            status: recorded.status,
            headers: recorded.headers.clone(),
            body: overflow,
        };
        let waiter = lock(&self.large_answers).remove(id);
        let unclaimed = match waiter {
            Some(waiter) => waiter.send(answer).err(),
            None => Some(answer),
        };
        match unclaimed {
            None => tracing::info!(
                approval_id = id,
                "answer too large to record; streamed to the waiting agent"
            ),
            Some(answer) => {
                tracing::info!(
                    approval_id = id,
                    "answer too large to record and nobody waiting for it here; dropped"
                );
                self.runtime.spawn(answer.body.drain());
            }
        }
    }

    /// Registers the calling agent as the one that gets `id`'s answer should
    /// it be too large to record. Only the first waiter gets it.
    pub fn watch_large_answer(&self, id: &str) -> LargeAnswerWatch {
        let mut waiters = lock(&self.large_answers);
        if waiters.contains_key(id) {
            return LargeAnswerWatch {
                receiver: None,
                id: id.to_owned(),
                waiters: None,
            };
        }
        let (sender, receiver) = oneshot::channel();
        waiters.insert(id.to_owned(), sender);
        LargeAnswerWatch {
            receiver: Some(receiver),
            id: id.to_owned(),
            waiters: Some(self.large_answers.clone()),
        }
    }

    /// The lease of a forward must outlive the upstream call, or a slow
    /// answer would be marked unknown; past it, the forwarder is dead.
    fn forward_timeout(&self, upstream: &str) -> Duration {
        self.upstreams.longest_call(upstream)
    }

    /// Records how a pending approval ended. Should the store stay
    /// unreachable, it is left pending and leased here: housekeeping
    /// resumes it and asks the server again.
    pub(super) async fn settle(&self, id: &str, to: ApprovalState, code: ProblemCode) {
        let _ = self
            .persist("record how the approval ended", SETTLE_RETRY_FOR, || {
                self.store
                    .transition(id, ApprovalState::Pending, to, Some(code.as_str()))
            })
            .await;
    }
}

/// An approved call's answer too large to record, for the agent waiting.
#[derive(Debug)]
pub struct LargeAnswer {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Overflow,
}

pub(super) type LargeAnswerWaiters = Arc<Mutex<HashMap<String, oneshot::Sender<LargeAnswer>>>>;

/// An agent's claim on a large answer; dropping it withdraws the claim.
#[derive(Debug)]
pub struct LargeAnswerWatch {
    receiver: Option<oneshot::Receiver<LargeAnswer>>,
    id: String,
    waiters: Option<LargeAnswerWaiters>,
}

impl LargeAnswerWatch {
    /// The answer, if it came (it is handed over before the approval is
    /// recorded as done).
    pub fn take(&mut self) -> Option<LargeAnswer> {
        self.receiver.as_mut()?.try_recv().ok()
    }
}

impl Drop for LargeAnswerWatch {
    fn drop(&mut self) {
        // Ours is the entry whose receiver this was: closed once dropped.
        drop(self.receiver.take());
        if let Some(waiters) = &self.waiters {
            let mut waiters = lock(waiters);
            if waiters.get(&self.id).is_some_and(|s| s.is_closed()) {
                waiters.remove(&self.id);
            }
        }
    }
}
