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
use crate::identity::JwtVerifier;
use crate::metrics::Metrics;
use crate::policy::{LivePolicies, Policy};
use crate::problem::ProblemCode;
use crate::secret::Secret;
use crate::store::{
    Approval, ApprovalState, ApprovalStore, CibaProgress, InsertTerms, Inserted, KeptGrant,
    NewApproval, StoreError, StoredRequest, StoredResponse,
};
use crate::traces::{Kind, Parent, Traces};
use crate::upstream::UpstreamClient;

mod forward;
mod poll;
mod quorum;
mod start;
mod upkeep;

use forward::LargeAnswerWaiters;
pub use forward::{LargeAnswer, LargeAnswerWatch};
pub use quorum::{Member, QuorumStatus};

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
/// How long recording a new authorization request is retried while the
/// store fails; after that, each poll tries again.
const RECORD_RETRY_FOR: Duration = Duration::from_secs(10);
/// How long recording how an approval ended is retried; after that it is
/// left pending, leased here, and housekeeping resumes it (the server's
/// answer is asked for again).
const SETTLE_RETRY_FOR: Duration = Duration::from_secs(60);
/// How long a token in hand is kept while the store cannot be reached:
/// the claim, the answer's record. Access tokens live about this long.
const TOKEN_RETRY_FOR: Duration = Duration::from_secs(600);
/// How long the outcome of a forward (the upstream's answer, or that it
/// failed) is kept while the store cannot be reached: the call was made,
/// so it is recorded whenever the store is back, or the row would stay
/// `forwarding` under this live process's lease. Shutting down stops
/// waiting (then it becomes `outcome_unknown`).
const ANSWER_RETRY_FOR: Duration = Duration::from_secs(86_400);
/// The longest pause between two attempts at a store write.
const STORE_BACKOFF_MAX: Duration = Duration::from_secs(5);

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
    /// This process's name on leases and its heartbeat, and whether the
    /// store still counts it alive.
    liveness: Mutex<Liveness>,
    /// Approvals this process drives right now (polled, being resumed or
    /// being forwarded).
    driving: Mutex<HashSet<String>>,
    /// Of those, the ones whose authorization server has answered: a token
    /// may be in hand. A lapsed heartbeat does not let them go (the claim
    /// decides), and shutting down waits for them.
    concluding: Mutex<HashSet<String>>,
    /// Raised when the last concluding approval is done.
    concluded: Notify,
    /// Shutting down: nothing new is started, polled or adopted.
    draining: std::sync::atomic::AtomicBool,
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
    /// The authorization server's signing keys, to read the issued tokens
    /// of bound calls (`None`: it publishes no JWKS).
    issued_tokens: Option<JwtVerifier>,
    /// Spans of bc-authorize, token polls and forwards, in the trace of
    /// the call each approval was made for.
    traces: Traces,
}

/// This process's standing in the store.
#[derive(Debug)]
struct Liveness {
    /// The name on its leases and heartbeat. A new name once the heartbeat
    /// has lapsed: others may have taken its approvals over.
    owner: String,
    /// Until when the store counts it alive, on this machine's monotonic
    /// clock: a heartbeat sent at `t` is good until `t + lease` at most, on
    /// any clock.
    alive_until: Instant,
    /// The heartbeat lapsed and has not been renewed under the new name.
    lapsed: bool,
    /// Shut down: leases handed back, no heartbeat any more.
    released: bool,
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
    /// Resumed here after another process (or an earlier life of this
    /// one) polled it: an answer that reads as "expired" may mean that the
    /// other process took the token, so it is not settled at once.
    resumed: bool,
    /// The `auth_req_id` could not be recorded yet (the store failed right
    /// after the person was asked): written again at the next poll.
    unrecorded: bool,
    /// The name this process leased it under. Once this process's name
    /// changed (its heartbeat lapsed), that lease is nobody's: another
    /// process, or this one under its new name, adopts it; this poller
    /// stops.
    owner: String,
    /// The call's trace context (kept with the approval), for the polls'
    /// spans.
    trace: Option<String>,
}

/// Why a new approval could not be started.
#[derive(Debug)]
pub enum StartError {
    Store(StoreError),
    /// The authorization server refused or failed: nobody was asked.
    Ciba(CibaError),
    /// The gateway is shutting down: nothing new is started.
    ShuttingDown,
    /// A countersigner already has as many approvals pending as allowed.
    CountersignerBusy(String),
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
        traces: Traces,
    ) -> Self {
        let liveness = Liveness {
            owner: uuid::Uuid::new_v4().to_string(),
            alive_until: Instant::now() + config.lease,
            lapsed: false,
            released: false,
        };
        let issued_tokens = ciba.endpoints().jwks.clone().map(|jwks| {
            let issuer = ciba.endpoints().issuer.clone();
            JwtVerifier::with_keys(ciba.http().clone(), jwks, &issuer, "", "sub")
        });
        Self {
            issued_tokens,
            store,
            ciba,
            policies,
            upstreams,
            metrics,
            config,
            max_hold,
            liveness: Mutex::new(liveness),
            driving: Mutex::new(HashSet::new()),
            concluding: Mutex::new(HashSet::new()),
            concluded: Notify::new(),
            draining: std::sync::atomic::AtomicBool::new(false),
            timetable: Mutex::new(Timetable::default()),
            due_sooner: Notify::new(),
            pollers: Arc::new(Semaphore::new(POLLERS)),
            settled: Mutex::new(HashMap::new()),
            large_answers: LargeAnswerWaiters::default(),
            runtime,
            pings,
            traces,
        }
    }

    /// Ping mode's notifications, for the notification endpoint.
    pub fn pings(&self) -> Option<&Pings> {
        self.pings.as_ref()
    }

    pub fn store(&self) -> &Arc<dyn ApprovalStore> {
        &self.store
    }

    /// Runs `work` on the engine's runtime, off the call's.
    pub fn spawn(&self, work: impl std::future::Future<Output = ()> + Send + 'static) {
        self.runtime.spawn(work);
    }

    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    /// The policy in force now named `name`, for an approval this process
    /// did not start.
    fn current_policy(&self, name: &str) -> Option<Arc<Policy>> {
        self.policies.load().by_name(name).cloned()
    }

    fn owner(&self) -> String {
        lock(&self.liveness).owner.clone()
    }

    /// Whether the engine works: its heartbeat is current (`/readyz`).
    pub fn is_live(&self) -> bool {
        self.alive() && !lock(&self.liveness).released
    }

    fn is_draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Acquire)
    }

    fn timetable(&self) -> MutexGuard<'_, Timetable<String, Polled>> {
        lock(&self.timetable)
    }

    /// Whether this process may poll: its heartbeat has not lapsed.
    fn alive(&self) -> bool {
        let liveness = lock(&self.liveness);
        !liveness.lapsed && liveness.alive_until > Instant::now()
    }

    /// Runs a store operation until it succeeds, for at most `patience`
    /// (backing off), so that a store error of a moment strands nothing.
    /// `None`: given up (logged).
    async fn persist<T, F, Fut>(&self, what: &'static str, patience: Duration, op: F) -> Option<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let give_up = Instant::now() + patience;
        let mut backoff = Duration::from_millis(200);
        loop {
            match op().await {
                Ok(value) => return Some(value),
                Err(error) if Instant::now() + backoff > give_up => {
                    tracing::error!(%error, what, "approval store unavailable; giving up");
                    return None;
                }
                Err(error) => {
                    tracing::warn!(%error, what, "approval store unavailable; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(STORE_BACKOFF_MAX);
                }
            }
        }
    }

    fn begin_concluding(&self, id: &str) {
        lock(&self.concluding).insert(id.to_owned());
    }

    fn end_concluding(&self, id: &str) {
        let mut concluding = lock(&self.concluding);
        concluding.remove(id);
        if concluding.is_empty() {
            self.concluded.notify_waiters();
        }
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
        let mut waiter = Waiter {
            settled: &self.settled,
            id,
            notify: None,
        };
        loop {
            let notify = waiter.watch();
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
}

/// One agent waiting on an approval: its wake-up entry is removed when the
/// last agent waiting on it leaves, however it leaves (answered, timed out,
/// hung up), so that the map holds only approvals waited on now.
struct Waiter<'a> {
    settled: &'a Mutex<HashMap<String, Arc<Notify>>>,
    id: &'a str,
    notify: Option<Arc<Notify>>,
}

impl Waiter<'_> {
    /// The entry to be woken by (a new one after a wake-up removed it).
    fn watch(&mut self) -> Arc<Notify> {
        self.leave();
        let notify = lock(self.settled)
            .entry(self.id.to_owned())
            .or_default()
            .clone();
        self.notify = Some(notify.clone());
        notify
    }

    fn leave(&mut self) {
        let Some(mine) = self.notify.take() else {
            return;
        };
        let mut settled = lock(self.settled);
        // Two holders: the map and this waiter (clones are only made under
        // the lock, so the count cannot grow meanwhile).
        if settled
            .get(self.id)
            .is_some_and(|entry| Arc::ptr_eq(entry, &mine) && Arc::strong_count(&mine) == 2)
        {
            settled.remove(self.id);
        }
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.leave();
    }
}

/// Poisoning leaves these maps consistent: every change is one insert or
/// remove.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wake_up_entry_lives_only_while_an_agent_waits() {
        let settled = Mutex::new(HashMap::new());
        let mut first = Waiter {
            settled: &settled,
            id: "a1",
            notify: None,
        };
        let mut second = Waiter {
            settled: &settled,
            id: "a1",
            notify: None,
        };
        let mine = first.watch();
        let theirs = second.watch();
        assert!(Arc::ptr_eq(&mine, &theirs), "one entry per approval");
        drop((mine, theirs));
        drop(first);
        assert_eq!(lock(&settled).len(), 1, "the second agent still waits");
        drop(second);
        assert!(lock(&settled).is_empty(), "no entry once nobody waits");

        // Woken (the entry removed), then left: nothing of it stays.
        let mut woken = Waiter {
            settled: &settled,
            id: "a2",
            notify: None,
        };
        drop(woken.watch());
        lock(&settled).remove("a2");
        drop(woken.watch());
        drop(woken);
        assert!(lock(&settled).is_empty());
    }
}
