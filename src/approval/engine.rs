//! Durable approvals: every approval lives in the [`ApprovalStore`]; this
//! process polls the authorization server for the approvals it holds the
//! lease of, and on approval forwards the stored call once, by itself,
//! recording the answer. Agents (held or retrying, on any replica) only read
//! the store.
//!
//! Polling costs no store write: one [`Timetable`] holds when each approval
//! is due, a bounded set of pollers polls what is due, and the leases of all
//! of this process's approvals are kept alive by one heartbeat row. The store
//! is written when an approval starts, when the server changes the interval
//! (`slow_down`), and when it ends.
//!
//! Exactly once: the only way to forward is the conditional claim
//! `pending -> forwarding` in the store; a process that dies between the
//! claim and the recorded answer leaves `forwarding` behind, which
//! [`ApprovalStore::mark_unknown_outcomes`] turns into `outcome_unknown` once
//! its heartbeat has stopped. Nothing is ever sent twice.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::sync::{oneshot, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::ping::Pings;
use super::timetable::{Due, Timetable};
use super::{Outcome, PollSchedule, Step};
use crate::ciba::{AuthorizeRequest, CibaClient, CibaError, PollAnswer};
use crate::config::StoreConfig;
use crate::metrics::Metrics;
use crate::policy::{LivePolicies, Policy};
use crate::problem::ProblemCode;
use crate::secret::Secret;
use crate::store::{
    Approval, ApprovalState, ApprovalStore, CibaProgress, NewApproval, StoreError, StoredResponse,
};
use crate::upstream::{ForwardError, Forwarded, Overflow, UpstreamClient};

/// How often a waiting agent re-reads the store when no in-process wakeup
/// comes (the approval may be driven by another replica).
const STORE_RECHECK: Duration = Duration::from_millis(500);
/// How often it does so when this process drives the approval: a safety
/// net only, as every end of driving here (`stop_driving`) wakes the agent
/// at once. Each re-read decodes the whole row on the store's threads: at
/// 5 s, 1,000 held calls made 200 reads a second, the largest part of the
/// gateway's CPU while holding (docs/BENCHMARKS.md, issue 11).
const LOCAL_RECHECK: Duration = Duration::from_secs(30);
/// Polls in flight at once. More due polls wait their turn in the
/// timetable (later, never sooner).
const POLLERS: usize = 128;
/// Every this many polls an approval's state is read back, so that one
/// cancelled on another replica stops being polled.
const STATE_CHECK_EVERY: u32 = 6;

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
    /// This process's name on leases and its heartbeat. A new name once the
    /// heartbeat has lapsed: others may have taken its approvals over.
    owner: Mutex<String>,
    /// Until when the store counts this process alive.
    alive_until: Mutex<SystemTime>,
    /// Approvals this process drives right now (polled, being resumed or
    /// being forwarded).
    driving: Mutex<HashSet<String>>,
    /// When each approval polled here is due.
    timetable: Mutex<Timetable<String, Polled>>,
    /// Raised when the earliest due time moved earlier.
    due_sooner: Notify,
    pollers: Arc<Semaphore>,
    /// Wakes agents waiting on an approval in this process.
    settled: Mutex<HashMap<String, Arc<Notify>>>,
    /// Agents waiting here for an answer too large to record.
    large_answers: LargeAnswerWaiters,
    /// The engine's runtime: pollers and forwards run there, not on the
    /// call's.
    runtime: tokio::runtime::Handle,
    /// Ping mode: the notifications awaited (`None` in poll mode).
    pings: Option<Pings>,
}

/// What polling one approval needs, and nothing more: a few hundred bytes
/// per pending approval. The call itself stays in the store until approved.
#[derive(Debug)]
struct Polled {
    /// `None`: the one of the approval's name in force when it ends.
    policy: Option<Arc<Policy>>,
    auth_req_id: Secret,
    schedule: PollSchedule,
    /// The interval last written to the store.
    stored_interval: Duration,
    /// Ping mode: the authorization server's own interval (`slow_down`
    /// growth included), for the poll that follows a notified poll the
    /// token endpoint did not answer yet.
    server_interval: Duration,
    /// Ping mode: a notification came; from then on polled at
    /// `server_interval` until the token endpoint agrees.
    notified: bool,
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
        let alive_until = SystemTime::now() + config.lease;
        Self {
            store,
            ciba,
            policies,
            upstreams,
            metrics,
            config,
            max_hold,
            owner: Mutex::new(uuid::Uuid::new_v4().to_string()),
            alive_until: Mutex::new(alive_until),
            driving: Mutex::new(HashSet::new()),
            timetable: Mutex::new(Timetable::default()),
            due_sooner: Notify::new(),
            pollers: Arc::new(Semaphore::new(POLLERS)),
            settled: Mutex::new(HashMap::new()),
            large_answers: LargeAnswerWaiters::default(),
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

    /// Asks the person about a newly stored approval and polls it in the
    /// background, under `policy` (the one its call matched, whatever a
    /// reload does meanwhile). Returns the polling interval (the agent's
    /// `Retry-After`).
    pub async fn start(
        self: &Arc<Self>,
        approval: &NewApproval,
        policy: Arc<Policy>,
    ) -> Result<Duration, StartError> {
        let id = approval.id.as_str();
        self.begin_driving(id);
        // Leased before the person is asked: nobody else may adopt it and
        // ask a second time while the authorization request is in flight.
        // The heartbeat keeps the lease from then on; should this process
        // die, another takes over one lease later.
        let leased = self
            .store
            .lease(id, &self.owner(), self.lease_until(SystemTime::now()))
            .await;
        if !matches!(leased, Ok(true)) {
            self.stop_driving(id);
            return Err(StartError::Store(leased.err().unwrap_or_else(|| {
                StoreError::Unavailable("the new approval could not be leased".into())
            })));
        }
        let started = match self
            .authorize(
                id,
                &policy,
                &approval.subject,
                &approval.binding_message,
                approval.authorization_details.as_ref(),
                approval.expires_at,
            )
            .await
        {
            Ok(started) => started,
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
                self.stop_driving(id);
                return Err(StartError::Ciba(error));
            }
        };
        let interval = started.polled.schedule.interval();
        self.poll_at(
            approval.id.clone(),
            started.polled,
            started.first_poll,
            Some(policy),
        );
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
    ) -> Result<Started, CibaError> {
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
        if let (Some(pings), Some(token)) = (&self.pings, &notification_token) {
            pings.expect_token(token, id);
        }
        let authorized = self
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
            .await;
        let authorization = match authorized {
            Ok(authorization) => authorization,
            Err(error) => {
                if let Some(pings) = &self.pings {
                    pings.forget(id);
                }
                return Err(error);
            }
        };
        let now = Instant::now();
        // Ping mode polls only as a safety net, slowly, never faster than
        // the server's interval.
        let server_interval = authorization.interval.unwrap_or(super::DEFAULT_INTERVAL);
        let interval = match (&self.pings, &notification_token) {
            (Some(pings), Some(token)) => {
                pings.expect(&authorization.auth_req_id, token);
                Some(server_interval.max(pings.safety_poll))
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
        Ok(Started {
            first_poll,
            polled: Polled {
                policy: None,
                auth_req_id: progress.auth_req_id,
                stored_interval: schedule.interval(),
                server_interval,
                notified: false,
                schedule,
            },
        })
    }

    /// The policy in force now named `name`, for an approval this process
    /// did not start.
    fn current_policy(&self, name: &str) -> Option<Arc<Policy>> {
        self.policies.load().by_name(name).cloned()
    }

    fn owner(&self) -> String {
        lock(&self.owner).clone()
    }

    fn timetable(&self) -> MutexGuard<'_, Timetable<String, Polled>> {
        lock(&self.timetable)
    }

    /// Whether this process may poll: its heartbeat has not lapsed.
    fn alive(&self) -> bool {
        *lock(&self.alive_until) > SystemTime::now()
    }

    /// Counts `id` as driven here; `false` if it already is.
    fn begin_driving(&self, id: &str) -> bool {
        if !lock(&self.driving).insert(id.to_owned()) {
            return false;
        }
        // Counted while driven here, however that ends (finished, lease
        // lost, resumed after a restart).
        self.metrics.pending_approvals.inc();
        true
    }

    /// Nothing of `id` is kept here any more; agents waiting on it re-read
    /// the store.
    fn stop_driving(&self, id: &str) {
        self.timetable().remove(&id.to_owned());
        if lock(&self.driving).remove(id) {
            self.metrics.pending_approvals.dec();
        }
        if let Some(pings) = &self.pings {
            pings.forget(id);
        }
        self.wake(id);
    }

    /// Polls `id` from `at` on (or as soon as a notification comes).
    fn poll_at(&self, id: String, mut polled: Polled, at: Instant, policy: Option<Arc<Policy>>) {
        polled.policy = policy;
        let mut timetable = self.timetable();
        timetable.add(id, polled, at, Instant::now());
        let sooner = timetable.next_due() <= Some(at);
        drop(timetable);
        if sooner {
            self.due_sooner.notify_one();
        }
    }

    /// Ping mode: the server says the person answered `id`: poll it now.
    pub fn notified(&self, id: &str) {
        if self.timetable().notify(&id.to_owned(), Instant::now()) {
            self.due_sooner.notify_one();
        }
    }

    /// Takes over `id` (after a restart, or from a replica that died) unless
    /// this process already drives it.
    pub fn adopt(self: &Arc<Self>, id: String) {
        if !self.begin_driving(&id) {
            return;
        }
        let engine = self.clone();
        self.runtime.spawn(async move {
            match engine.resume(&id).await {
                Some((polled, at)) => engine.poll_at(id, polled, at, None),
                None => engine.stop_driving(&id),
            }
        });
    }

    /// What polling a stored approval takes, and when it is next due:
    /// never sooner than the stored next poll, and a whole interval from
    /// now, since the last poll (not recorded: it cost a write) may have
    /// been made by the process that died a moment ago.
    async fn resume(&self, id: &str) -> Option<(Polled, Instant)> {
        if !self.take_lease(id, SystemTime::now()).await {
            return None;
        }
        let approval = self.store.get(id).await.ok()??;
        if approval.state != ApprovalState::Pending {
            return None;
        }
        let policy = self.current_policy(&approval.policy);
        let Some(progress) = &approval.ciba else {
            // The process that stored it died before asking.
            let Some(policy) = policy.as_deref() else {
                let error = CibaError::Config(format!(
                    "policy {} is no longer configured",
                    approval.policy
                ));
                self.end(&approval, Outcome::Failed(error), None).await;
                return None;
            };
            return match self
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
                Ok(started) => Some((started.polled, started.first_poll)),
                Err(error) => {
                    self.end(&approval, Outcome::Failed(error), Some(policy))
                        .await;
                    None
                }
            };
        };
        let deadline = to_instant(progress.deadline);
        let next = to_instant(progress.next_poll_at).max(Instant::now() + progress.interval);
        let polled = Polled {
            policy: None,
            auth_req_id: progress.auth_req_id.clone(),
            schedule: PollSchedule::resume(next, progress.interval, deadline),
            stored_interval: progress.interval,
            server_interval: progress.interval,
            notified: false,
        };
        Some((polled, next.min(deadline)))
    }

    /// Hands what is due to the pollers, at most [`POLLERS`] at a time,
    /// until the process ends.
    async fn run_pollers(self: Arc<Self>) {
        loop {
            let next = self.timetable().next_due();
            match next {
                Some(at) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => {}
                        () = self.due_sooner.notified() => {}
                    }
                }
                None => self.due_sooner.notified().await,
            }
            loop {
                let Ok(permit) = self.pollers.clone().acquire_owned().await else {
                    return;
                };
                let Some((id, polled, due)) = self.timetable().take_due(Instant::now()) else {
                    break;
                };
                let engine = self.clone();
                self.runtime
                    .spawn(async move { engine.poll(id, polled, due, permit).await });
            }
        }
    }

    /// One poll of `id`, then back into the timetable, or the end.
    async fn poll(&self, id: String, mut polled: Polled, due: Due, permit: OwnedSemaphorePermit) {
        let deadline = polled.schedule.deadline();
        if due == Due::Timer && Instant::now() >= deadline {
            // No poll may be made past the deadline.
            return self.conclude(&id, polled, Outcome::Expired).await;
        }
        if !self.alive() || !self.still_pending(&id, &polled).await {
            return self.stop_driving(&id);
        }
        let answer = self.ciba.poll(&polled.auth_req_id).await;
        match &answer {
            PollAnswer::SlowDown => {
                tracing::warn!(approval_id = id, "authorization server asked to slow down")
            }
            PollAnswer::Unreachable { reason } => {
                tracing::warn!(approval_id = id, %reason, "poll failed; the authorization server did not answer")
            }
            _ => {}
        }
        let server_expired = matches!(answer, PollAnswer::Expired);
        // A notification says the person answered, but a token endpoint
        // may lag its own ping (a replicated store, or a server that pings
        // before it has recorded the answer): ask again after the server's
        // interval (until it agrees), not the safety poll's, or a person
        // who approved would get an expiry.
        polled.notified |= due == Due::Notified;
        let unsettled_notification = polled.notified
            && self.pings.is_some()
            && matches!(answer, PollAnswer::Pending | PollAnswer::SlowDown);
        if matches!(answer, PollAnswer::SlowDown) {
            polled.server_interval = polled.server_interval.saturating_add(super::SLOW_DOWN_STEP);
        }
        let now = Instant::now();
        let next = match polled.schedule.on_answer(now, answer) {
            // Ping mode: no poll fits before the deadline, but the
            // notification may still come; it is awaited until then.
            Step::Finish(Outcome::Expired) if self.pings.is_some() && !server_expired => deadline,
            Step::PollAt(at) => at,
            // Forwards hold their permit too: the store writes of a wave of
            // approvals stay bounded, and so does how long each waits.
            Step::Finish(outcome) => return self.conclude(&id, polled, outcome).await,
        };
        let next = if unsettled_notification {
            next.min(now + polled.server_interval)
        } else {
            next
        };
        drop(permit);
        if polled.schedule.interval() != polled.stored_interval {
            self.record_interval(&id, &mut polled, next).await;
        }
        let mut timetable = self.timetable();
        if !timetable.put_back(id.clone(), polled, next, Instant::now()) {
            drop(timetable);
            return self.stop_driving(&id); // cancelled while polled
        }
        let sooner = timetable.next_due() == Some(next);
        drop(timetable);
        if sooner {
            self.due_sooner.notify_one();
        }
    }

    /// Every few polls: whether the store still has `id` pending (it may
    /// have been cancelled on another replica).
    async fn still_pending(&self, id: &str, polled: &Polled) -> bool {
        if polled.schedule.polls() % STATE_CHECK_EVERY != STATE_CHECK_EVERY - 1 {
            return true;
        }
        match self.store.get(id).await {
            Ok(Some(approval)) => approval.state == ApprovalState::Pending,
            Ok(None) => false,
            Err(_) => true, // the claim decides, should it be approved
        }
    }

    /// `slow_down` grew the interval: a restart must keep it.
    async fn record_interval(&self, id: &str, polled: &mut Polled, next: Instant) {
        let progress = CibaProgress {
            auth_req_id: polled.auth_req_id.clone(),
            interval: polled.schedule.interval(),
            next_poll_at: to_system(next),
            deadline: to_system(polled.schedule.deadline()),
        };
        match self.store.set_ciba(id, &progress).await {
            Ok(()) => polled.stored_interval = progress.interval,
            Err(error) => tracing::warn!(approval_id = id, %error, "could not record the poll"),
        }
    }

    /// The approval ended with `outcome`: records it (and on approval
    /// forwards the call) unless it already ended otherwise.
    async fn conclude(&self, id: &str, polled: Polled, outcome: Outcome) {
        let mut approval = None;
        for attempt in 0..3 {
            match self.store.get(id).await {
                Ok(found) => {
                    approval = found;
                    break;
                }
                Err(error) => {
                    tracing::warn!(approval_id = id, %error, attempt, "approval store unavailable; retrying");
                    tokio::time::sleep(STORE_RECHECK).await;
                }
            }
        }
        if let Some(approval) = approval.filter(|a| a.state == ApprovalState::Pending) {
            let policy = polled
                .policy
                .or_else(|| self.current_policy(&approval.policy));
            self.end(&approval, outcome, policy.as_deref()).await;
        }
        self.stop_driving(id);
    }

    fn lease_until(&self, after: SystemTime) -> SystemTime {
        after + self.config.lease
    }

    async fn take_lease(&self, id: &str, busy_until: SystemTime) -> bool {
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

    /// Keeps this process's leases alive; once its heartbeat has lapsed
    /// (the store was unreachable longer than a lease), others may have
    /// taken its approvals over, so it lets all of them go and comes back
    /// under a new name: what nobody took is adopted again.
    async fn beat(&self) {
        let alive_until = SystemTime::now() + self.config.lease;
        let owner = self.owner();
        match self.store.heartbeat(&owner, alive_until).await {
            Ok(()) if self.alive() => *lock(&self.alive_until) = alive_until,
            Ok(()) | Err(_) if self.alive() => {}
            _ => {
                tracing::warn!(
                    "this gateway's heartbeat lapsed; its approvals are resumed from the store"
                );
                *lock(&self.owner) = uuid::Uuid::new_v4().to_string();
                let ids: Vec<String> = lock(&self.driving).iter().cloned().collect();
                for id in ids {
                    self.stop_driving(&id);
                }
                *lock(&self.alive_until) = SystemTime::now();
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
        // Resumed after its policy was removed: nothing says which scopes
        // the call needs, so it is not forwarded (fail closed).
        let Some(policy) = policy else {
            tracing::warn!(
                approval_id = id,
                policy = %approval.policy,
                "approved, but its policy is no longer configured; the call is not forwarded"
            );
            return self
                .settle(id, ApprovalState::Failed, ProblemCode::ApprovalFailed)
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
                    .settle(id, ApprovalState::Denied, ProblemCode::ScopeNotGranted)
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
                if let Err(error) = self.store.finish(id, &recorded).await {
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
            // Polled here: no more polls (elsewhere: its poller finds out
            // within a few polls, and the claim fails).
            self.stop_driving(id);
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
            // Not kept across the wait: a decoded approval (its request's
            // headers and body, the details JSON) is ~1.4 KiB per held call
            // (docs/BENCHMARKS.md, issue 11).
            drop(approval);
            // Driven here, its end wakes this waiter; the slow re-read is
            // only a safety net then.
            let recheck = if lock(&self.driving).contains(id) {
                LOCAL_RECHECK
            } else {
                STORE_RECHECK
            };
            let recheck = (now + recheck).min(until);
            tokio::select! {
                () = woken => {}
                () = tokio::time::sleep_until(recheck) => {}
            }
        }
    }

    /// Until the process ends: polls what is due, beats the heartbeat,
    /// resumes approvals nobody drives (after a restart, or a dead
    /// replica's), turns forwards whose process died into
    /// `outcome_unknown`, and expires old records.
    pub async fn maintain(self: Arc<Self>) {
        self.runtime.spawn(self.clone().run_pollers());
        let beat_every = (self.config.lease / 3).max(Duration::from_millis(300));
        let housekeeping_every = (self.config.lease / 2).max(Duration::from_millis(500));
        let mut last_housekeeping: Option<Instant> = None;
        let mut last_sweep: Option<Instant> = None;
        loop {
            self.beat().await;
            if last_housekeeping.is_none_or(|t| t.elapsed() >= housekeeping_every) {
                last_housekeeping = Some(Instant::now());
                self.take_over().await;
            }
            if last_sweep.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                last_sweep = Some(Instant::now());
                if let Err(error) = self
                    .store
                    .sweep(
                        SystemTime::now(),
                        self.config.replay_window,
                        self.config.retention,
                    )
                    .await
                {
                    tracing::warn!(%error, "approval store housekeeping failed");
                }
            }
            tokio::time::sleep(beat_every).await;
        }
    }

    /// Whatever a dead process left: forwards become `outcome_unknown`,
    /// approvals are adopted.
    async fn take_over(self: &Arc<Self>) {
        let now = SystemTime::now();
        match self.store.mark_unknown_outcomes(now).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                count = n,
                "approved calls whose forwarder died are marked outcome_unknown"
            ),
            Err(error) => tracing::warn!(%error, "approval store unavailable"),
        }
        if !self.alive() {
            return;
        }
        match self.store.orphans(now, 1000).await {
            Ok(orphans) => {
                for approval in orphans {
                    if lock(&self.driving).contains(&approval.id) {
                        continue;
                    }
                    tracing::info!(approval_id = %approval.id, "resuming an approval nobody polls");
                    if approval.lease_owner.is_some() {
                        self.metrics.lease_takeovers.inc();
                    }
                    self.adopt(approval.id);
                }
            }
            Err(error) => tracing::warn!(%error, "approval store unavailable"),
        }
    }
}

/// Poisoning leaves these maps consistent: every change is one insert or
/// remove.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// An approved call's answer too large to record, for the agent waiting.
#[derive(Debug)]
pub struct LargeAnswer {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Overflow,
}

type LargeAnswerWaiters = Arc<Mutex<HashMap<String, oneshot::Sender<LargeAnswer>>>>;

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

/// A new approval, asked and ready to poll.
struct Started {
    polled: Polled,
    first_poll: Instant,
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
