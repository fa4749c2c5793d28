//! Durable approvals: every approval lives in the [`ApprovalStore`]; a
//! driver task per approval polls the authorization server under a lease,
//! and on approval forwards the stored call once, by itself, recording the
//! answer. Agents (held or retrying, on any replica) only read the store.
//!
//! Exactly once: the only way to forward is the conditional claim
//! `pending -> forwarding` in the store; a driver that dies between the claim
//! and the recorded answer leaves `forwarding` behind, which
//! [`ApprovalStore::mark_unknown_outcomes`] turns into `outcome_unknown` once
//! its lease has run out. Nothing is ever sent twice.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio::time::Instant;

use super::ping::Pings;
use super::{Outcome, PollSchedule, Step};
use crate::ciba::{AuthorizeRequest, CibaClient, CibaError, PollAnswer};
use crate::config::StoreConfig;
use crate::metrics::Metrics;
use crate::policy::{LivePolicies, Policy};
use crate::problem::ProblemCode;
use crate::store::{Approval, ApprovalState, ApprovalStore, CibaProgress, NewApproval, StoreError};
use crate::upstream::{ForwardError, UpstreamClient};

/// How often a waiting agent re-reads the store when no in-process wakeup
/// comes (the approval may be driven by another replica).
const STORE_RECHECK: Duration = Duration::from_millis(500);

/// The durable approval engine of one gateway process.
#[derive(Debug)]
pub struct Engine {
    store: Arc<dyn ApprovalStore>,
    ciba: CibaClient,
    /// The policy set in force: read for approvals this process did not
    /// start (resumed after a restart); an approval started here keeps the
    /// policy its call matched.
    policies: Arc<LivePolicies>,
    upstreams: UpstreamClient,
    metrics: Metrics,
    config: StoreConfig,
    max_hold: Duration,
    /// This process's name on leases.
    owner: String,
    /// Approvals this process drives right now.
    driving: Mutex<HashSet<String>>,
    /// Wakes agents waiting on an approval in this process.
    settled: Mutex<HashMap<String, Arc<Notify>>>,
    /// The engine's runtime: drivers run there, not on the call's.
    runtime: tokio::runtime::Handle,
    /// Ping mode: the notifications awaited (`None` in poll mode).
    pings: Option<Pings>,
}

/// Why a new approval could not be started.
#[derive(Debug)]
pub enum StartError {
    Store(StoreError),
    /// The authorization server refused or failed: nobody was asked.
    Ciba(CibaError),
}

impl Engine {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<dyn ApprovalStore>,
        ciba: CibaClient,
        policies: Arc<LivePolicies>,
        upstreams: UpstreamClient,
        metrics: Metrics,
        config: StoreConfig,
        max_hold: Duration,
        runtime: tokio::runtime::Handle,
        pings: Option<Pings>,
    ) -> Self {
        Self {
            store,
            ciba,
            policies,
            upstreams,
            metrics,
            config,
            max_hold,
            owner: uuid::Uuid::new_v4().to_string(),
            driving: Mutex::new(HashSet::new()),
            settled: Mutex::new(HashMap::new()),
            runtime,
            pings,
        }
    }

    /// Ping mode's notifications, for the notification endpoint.
    pub fn pings(&self) -> Option<&Pings> {
        self.pings.as_ref()
    }

    pub fn store(&self) -> &Arc<dyn ApprovalStore> {
        &self.store
    }

    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    /// Asks the person about a newly stored approval and starts polling in
    /// the background, under `policy` (the one its call matched, whatever a
    /// reload does meanwhile). Returns the polling interval (the agent's
    /// `Retry-After`).
    pub async fn start(
        self: &Arc<Self>,
        approval: &NewApproval,
        policy: Arc<Policy>,
    ) -> Result<Duration, StartError> {
        let id = approval.id.as_str();
        let progress = match self
            .authorize(
                approval.id.as_str(),
                &policy,
                &approval.subject,
                &approval.binding_message,
                approval.authorization_details.as_ref(),
                approval.expires_at,
            )
            .await
        {
            Ok(progress) => progress,
            Err(error) => {
                let code = problem_for(&error);
                let to = state_for(code);
                if let Err(e) = self
                    .store
                    .transition(id, ApprovalState::Pending, to, Some(code.as_str()))
                    .await
                {
                    tracing::warn!(error = %e, "could not record the failed approval");
                }
                self.metrics
                    .approvals
                    .with_label_values(&[&approval.policy, "error"])
                    .inc();
                return Err(StartError::Ciba(error));
            }
        };
        let interval = progress.interval;
        self.spawn_driver(approval.id.clone(), Some(policy));
        Ok(interval)
    }

    /// bc-authorize for a stored approval; records the CIBA progress.
    async fn authorize(
        &self,
        id: &str,
        policy: &Policy,
        subject: &str,
        binding_message: &str,
        details: Option<&serde_json::Value>,
        expires_at: SystemTime,
    ) -> Result<CibaProgress, CibaError> {
        // Whole seconds on the wire: round the time left up, or a 3 s
        // expiry would be asked as 2 s a moment after the call arrived.
        let remaining = expires_at
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        let remaining = Duration::from_secs(remaining.as_secs_f64().ceil() as u64);
        let requested_expiry = policy
            .requested_expiry
            .unwrap_or(self.max_hold)
            .min(remaining)
            .max(Duration::from_secs(1));
        let notification_token = self.pings.as_ref().map(|_| Pings::new_token());
        let authorization = self
            .ciba
            .authorize(&AuthorizeRequest {
                client_notification_token: notification_token.as_ref(),
                subject,
                binding_message,
                scopes: &policy.scopes,
                audience: policy.audience.as_deref(),
                authorization_details: details,
                requested_expiry: Some(requested_expiry),
            })
            .await?;
        let now = Instant::now();
        // Ping mode polls only as a safety net, slowly, never faster than
        // the server's interval.
        let interval = match (&self.pings, &notification_token) {
            (Some(pings), Some(token)) => {
                pings.expect(&authorization.auth_req_id, token, id);
                let server = authorization.interval.unwrap_or(super::DEFAULT_INTERVAL);
                Some(server.max(pings.safety_poll))
            }
            _ => authorization.interval,
        };
        let schedule = PollSchedule::new(now, interval, authorization.expires_in, remaining);
        // No poll before the deadline: poll mode polls once now, ping mode
        // awaits the notification until the deadline.
        let first_poll = match schedule.next_poll() {
            Some(at) => at,
            None if self.pings.is_some() => schedule.deadline(),
            None => now,
        };
        let progress = CibaProgress {
            auth_req_id: authorization.auth_req_id,
            interval: schedule.interval(),
            next_poll_at: to_system(first_poll),
            deadline: to_system(schedule.deadline()),
        };
        if let Err(error) = self.store.set_ciba(id, &progress).await {
            if let Some(pings) = &self.pings {
                pings.forget(id);
            }
            return Err(CibaError::Config(error.to_string()));
        }
        tracing::info!(
            approval_id = id,
            policy = %policy.name,
            expires_in_s = authorization.expires_in.as_secs(),
            interval_s = progress.interval.as_secs(),
            "approval requested; waiting for the user"
        );
        Ok(progress)
    }

    /// The policy in force now named `name`, for an approval this process
    /// did not start.
    fn current_policy(&self, name: &str) -> Option<Arc<Policy>> {
        self.policies.load().by_name(name).cloned()
    }

    /// Starts driving `id` in this process unless it already does, under
    /// `policy` (for `None`, the one of that name in force now).
    pub fn spawn_driver(self: &Arc<Self>, id: String, policy: Option<Arc<Policy>>) {
        {
            let mut driving = self.driving.lock().unwrap_or_else(|e| e.into_inner());
            if !driving.insert(id.clone()) {
                return;
            }
        }
        // Counted while driven here, however the driver ends (finished,
        // lease lost, resumed after a restart).
        self.metrics.pending_approvals.inc();
        let engine = self.clone();
        self.runtime.spawn(async move {
            engine.drive(&id, policy).await;
            if let Some(pings) = &engine.pings {
                pings.forget(&id);
            }
            engine.metrics.pending_approvals.dec();
            engine
                .driving
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            engine.wake(&id);
        });
    }

    fn lease_until(&self, after: SystemTime) -> SystemTime {
        after + self.config.lease
    }

    /// Polls `id` until it ends, while this process holds its lease.
    async fn drive(&self, id: &str, mut policy: Option<Arc<Policy>>) {
        // Kept across polls: it counts consecutive unanswered polls.
        let mut schedule: Option<PollSchedule> = None;
        loop {
            let approval = match self.store.get(id).await {
                Ok(Some(approval)) => approval,
                Ok(None) => return,
                Err(error) => {
                    tracing::warn!(approval_id = id, %error, "approval store unavailable; retrying");
                    tokio::time::sleep(self.config.lease / 2).await;
                    continue;
                }
            };
            if approval.state != ApprovalState::Pending {
                return;
            }
            if policy.is_none() {
                policy = self.current_policy(&approval.policy);
            }
            let progress = match &approval.ciba {
                Some(progress) => progress.clone(),
                None => {
                    // The process that stored it died before asking.
                    if !self.take_lease(id, SystemTime::now()).await {
                        return;
                    }
                    let Some(policy) = policy.as_deref() else {
                        let error = CibaError::Config(format!(
                            "policy {} is no longer configured",
                            approval.policy
                        ));
                        self.end(&approval, Outcome::Failed(error), None).await;
                        return;
                    };
                    match self
                        .authorize(
                            id,
                            policy,
                            &approval.subject,
                            &approval.binding_message,
                            approval.authorization_details.as_ref(),
                            approval.expires_at,
                        )
                        .await
                    {
                        Ok(progress) => progress,
                        Err(error) => {
                            self.end(&approval, Outcome::Failed(error), Some(policy))
                                .await;
                            return;
                        }
                    }
                }
            };
            // Hold the lease until the next poll is done (and `lease` past
            // it): one store write per poll, not one before and after the
            // sleep.
            let busy_until = progress.next_poll_at + self.ciba_timeout();
            if !self.take_lease(id, busy_until).await {
                return;
            }
            let leased_until = self.lease_until(busy_until);
            let next_poll = to_instant(progress.next_poll_at);
            let deadline = to_instant(progress.deadline);
            if !self.wait_for_poll(id, next_poll, deadline).await {
                self.end(&approval, Outcome::Expired, policy.as_deref())
                    .await;
                return;
            }
            // It may have been cancelled meanwhile: no poll for it then.
            match self.store.get(id).await {
                Ok(Some(now)) if now.state == ApprovalState::Pending => {}
                Ok(_) => return,
                Err(_) => {}
            }
            // Woken late (a loaded machine)? Renew unless the lease taken
            // above still covers this poll with `lease / 2` to spare.
            let poll_done = SystemTime::now() + self.ciba_timeout();
            if poll_done + self.config.lease / 2 > leased_until
                && !self.take_lease(id, poll_done).await
            {
                return;
            }
            let answer = self.ciba.poll(&progress.auth_req_id).await;
            match &answer {
                PollAnswer::SlowDown => {
                    tracing::warn!(approval_id = id, "authorization server asked to slow down")
                }
                PollAnswer::Unreachable { reason } => {
                    tracing::warn!(approval_id = id, %reason, "poll failed; the authorization server did not answer")
                }
                _ => {}
            }
            let now = Instant::now();
            let schedule = schedule
                .get_or_insert_with(|| PollSchedule::resume(now, progress.interval, deadline));
            let server_expired = matches!(answer, PollAnswer::Expired);
            match schedule.on_answer(now, answer) {
                // Ping mode: no poll fits before the deadline, but the
                // notification may still come; it is awaited until then.
                Step::Finish(Outcome::Expired) if self.pings.is_some() && !server_expired => {
                    let next = CibaProgress {
                        interval: schedule.interval(),
                        next_poll_at: to_system(deadline),
                        ..progress
                    };
                    if let Err(error) = self.store.set_ciba(id, &next).await {
                        tracing::warn!(approval_id = id, %error, "could not record the poll");
                    }
                }
                Step::PollAt(at) => {
                    let next = CibaProgress {
                        interval: schedule.interval(),
                        next_poll_at: to_system(at),
                        ..progress
                    };
                    if let Err(error) = self.store.set_ciba(id, &next).await {
                        tracing::warn!(approval_id = id, %error, "could not record the poll");
                    }
                }
                Step::Finish(outcome) => {
                    self.end(&approval, outcome, policy.as_deref()).await;
                    return;
                }
            }
        }
    }

    /// Waits until the next poll is due: at `next_poll`, or in ping mode as
    /// soon as the server's notification for `id` arrives. `false`: the
    /// deadline comes first (no poll may be made past it).
    async fn wait_for_poll(&self, id: &str, next_poll: Instant, deadline: Instant) -> bool {
        let Some(pings) = &self.pings else {
            if next_poll >= deadline {
                return false;
            }
            tokio::time::sleep_until(next_poll).await;
            return true;
        };
        let wakeup = pings.wakeup(id);
        tokio::select! {
            _ = wakeup.notified() => {
                tracing::debug!(approval_id = id, "notified by the authorization server; fetching the token");
                true
            }
            _ = tokio::time::sleep_until(next_poll.min(deadline)) => next_poll < deadline,
        }
    }

    fn ciba_timeout(&self) -> Duration {
        self.config.lease + Duration::from_secs(10)
    }

    async fn take_lease(&self, id: &str, busy_until: SystemTime) -> bool {
        match self
            .store
            .lease(id, &self.owner, self.lease_until(busy_until))
            .await
        {
            Ok(held) => held,
            Err(error) => {
                tracing::warn!(approval_id = id, %error, "could not renew the polling lease");
                false
            }
        }
    }

    /// Records how the approval ended; on approval, forwards the call once.
    async fn end(&self, approval: &Approval, outcome: Outcome, policy: Option<&Policy>) {
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
                    .settle(id, ApprovalState::Denied, ProblemCode::AccessDenied)
                    .await
            }
            Outcome::Expired => {
                return self
                    .settle(id, ApprovalState::Expired, ProblemCode::ApprovalExpired)
                    .await
            }
            Outcome::Failed(error) => {
                let code = problem_for(&error);
                tracing::warn!(approval_id = id, %error, "approval failed");
                return self.settle(id, state_for(code), code).await;
            }
        };
        // The person may approve less than was asked; the call then cannot
        // be made, so it is not forwarded.
        if let (Some(granted), Some(policy)) = (&grant.scope, policy) {
            let granted: Vec<&str> = granted.split_whitespace().collect();
            if let Some(missing) = policy
                .scopes
                .iter()
                .find(|s| !granted.contains(&s.as_str()))
            {
                tracing::info!(approval_id = id, %missing, "approved without a required scope");
                return self
                    .settle(id, ApprovalState::Denied, ProblemCode::AccessDenied)
                    .await;
            }
        }
        // The claim: only one process, once, gets past this.
        if !self
            .take_lease(
                id,
                SystemTime::now() + self.forward_timeout(&approval.upstream),
            )
            .await
        {
            return;
        }
        match self
            .store
            .transition(id, ApprovalState::Pending, ApprovalState::Forwarding, None)
            .await
        {
            Ok(true) => {}
            Ok(false) => return,
            Err(error) => {
                tracing::error!(approval_id = id, %error, "could not claim the approved call; it is not forwarded");
                return;
            }
        }
        let sent = self
            .upstreams
            .send(
                &approval.upstream,
                id,
                &approval.request,
                &grant.access_token,
            )
            .await;
        drop(grant);
        match sent {
            Ok(response) => {
                tracing::info!(
                    approval_id = id,
                    policy = %approval.policy,
                    status = response.status,
                    "approved call forwarded"
                );
                if let Err(error) = self.store.finish(id, &response).await {
                    tracing::error!(approval_id = id, %error, "could not record the upstream's answer");
                }
            }
            Err(ForwardError::NotSent(reason) | ForwardError::UnknownUpstream(reason)) => {
                tracing::warn!(approval_id = id, %reason, "approved call could not be sent");
                let _ = self
                    .store
                    .transition(
                        id,
                        ApprovalState::Forwarding,
                        ApprovalState::Failed,
                        Some(ProblemCode::UpstreamUnavailable.as_str()),
                    )
                    .await;
            }
            Err(ForwardError::AnswerLost(reason)) => {
                tracing::warn!(approval_id = id, %reason, "the upstream's answer to the approved call was lost");
                let _ = self
                    .store
                    .transition(
                        id,
                        ApprovalState::Forwarding,
                        ApprovalState::OutcomeUnknown,
                        Some(ProblemCode::OutcomeUnknown.as_str()),
                    )
                    .await;
            }
        }
    }

    /// The lease of a forward must outlive the upstream call, or a slow
    /// answer would be marked unknown; past it, the forwarder is dead.
    fn forward_timeout(&self, upstream: &str) -> Duration {
        self.upstreams.longest_call(upstream)
    }

    async fn settle(&self, id: &str, to: ApprovalState, code: ProblemCode) {
        if let Err(error) = self
            .store
            .transition(id, ApprovalState::Pending, to, Some(code.as_str()))
            .await
        {
            tracing::warn!(approval_id = id, %error, "could not record how the approval ended");
        }
    }

    fn wake(&self, id: &str) {
        let notify = self
            .settled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        if let Some(notify) = notify {
            notify.notify_waiters();
        }
    }

    /// Ends a pending approval because its agent gave up (an MCP client's
    /// `notifications/cancelled`): it is never forwarded, and its driver
    /// polls no more. Whether it was still pending.
    pub async fn cancel(&self, id: &str) -> Result<bool, StoreError> {
        let cancelled = self
            .store
            .transition(
                id,
                ApprovalState::Pending,
                ApprovalState::Failed,
                Some(ProblemCode::ApprovalCancelled.as_str()),
            )
            .await?;
        if cancelled {
            self.metrics
                .approvals
                .with_label_values(&[&self.policy_of(id).await, "cancelled"])
                .inc();
            self.wake(id);
        }
        Ok(cancelled)
    }

    async fn policy_of(&self, id: &str) -> String {
        match self.store.get(id).await {
            Ok(Some(approval)) => approval.policy,
            _ => "unknown".to_owned(),
        }
    }

    /// The approval once it is final, or as it is at `until`.
    pub async fn wait(&self, id: &str, until: Instant) -> Result<Approval, StoreError> {
        loop {
            let notify = self
                .settled
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(id.to_owned())
                .or_default()
                .clone();
            let woken = notify.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let approval = self
                .store
                .get(id)
                .await?
                .ok_or_else(|| StoreError::Unavailable("the approval disappeared".into()))?;
            let now = Instant::now();
            if approval.state.is_final() || now >= until {
                return Ok(approval);
            }
            let recheck = (now + STORE_RECHECK).min(until);
            tokio::select! {
                () = woken => {}
                () = tokio::time::sleep_until(recheck) => {}
            }
        }
    }

    /// Housekeeping until the process ends: resumes approvals nobody drives
    /// (after a restart, or a dead replica's), turns forwards whose driver
    /// died into `outcome_unknown`, and expires old records.
    pub async fn maintain(self: Arc<Self>) {
        let period = (self.config.lease / 2).max(Duration::from_millis(500));
        let mut last_sweep: Option<Instant> = None;
        loop {
            let now = SystemTime::now();
            match self.store.mark_unknown_outcomes(now).await {
                Ok(0) => {}
                Ok(n) => tracing::warn!(
                    count = n,
                    "approved calls whose forwarder died are marked outcome_unknown"
                ),
                Err(error) => tracing::warn!(%error, "approval store unavailable"),
            }
            match self.store.orphans(now, 100).await {
                Ok(orphans) => {
                    for approval in orphans {
                        tracing::info!(approval_id = %approval.id, "resuming an approval nobody polls");
                        self.spawn_driver(approval.id, None);
                    }
                }
                Err(error) => tracing::warn!(%error, "approval store unavailable"),
            }
            if last_sweep.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                last_sweep = Some(Instant::now());
                if let Err(error) = self
                    .store
                    .sweep(now, self.config.replay_window, self.config.retention)
                    .await
                {
                    tracing::warn!(%error, "approval store housekeeping failed");
                }
            }
            tokio::time::sleep(period).await;
        }
    }
}

/// The agent-facing code of a failed approval.
pub fn problem_for(error: &CibaError) -> ProblemCode {
    match error {
        CibaError::UnknownUser => ProblemCode::UnknownUser,
        CibaError::InvalidBindingMessage(_) => ProblemCode::InvalidBindingMessage,
        CibaError::Unavailable { .. } => ProblemCode::AuthorizationServerUnavailable,
        _ => ProblemCode::ApprovalFailed,
    }
}

fn state_for(code: ProblemCode) -> ApprovalState {
    match code {
        ProblemCode::AccessDenied => ApprovalState::Denied,
        ProblemCode::ApprovalExpired => ApprovalState::Expired,
        _ => ApprovalState::Failed,
    }
}

fn to_system(at: Instant) -> SystemTime {
    let now = Instant::now();
    if at >= now {
        SystemTime::now() + (at - now)
    } else {
        SystemTime::now() - (now - at)
    }
}

fn to_instant(at: SystemTime) -> Instant {
    let now = SystemTime::now();
    match at.duration_since(now) {
        Ok(ahead) => Instant::now() + ahead,
        Err(behind) => Instant::now()
            .checked_sub(behind.duration())
            .unwrap_or_else(Instant::now),
    }
}
