//! Starting an approval: storing it (leased, under the per-person limit),
//! asking the person (bc-authorize) at most once, and resuming one this
//! process did not start.

use super::*;
use crate::policy::countersign::Countersigners;

/// How long a new call waits for a lapsed heartbeat to come back before it
/// is refused (`approval_store_unavailable`, to be retried).
const LIVENESS_WAIT: Duration = Duration::from_secs(3);

impl Engine {
    /// Stores the approval of a call, or finds the one a retry attaches to;
    /// a new one is asked about at once and polled in the background, under
    /// `policy` (the one its call matched, whatever a reload does
    /// meanwhile). The insert, the lease and the per-person limit are one
    /// statement: nobody may adopt the approval before it is asked about,
    /// and a burst of calls cannot push more than `max_pending` requests.
    pub async fn create(
        self: &Arc<Self>,
        approval: &NewApproval,
        policy: Arc<Policy>,
        max_pending: usize,
        countersigners: Option<&Countersigners>,
    ) -> Result<Inserted, StartError> {
        if self.is_draining() {
            return Err(StartError::ShuttingDown);
        }
        let id = approval.id.as_str();
        if !self.await_alive().await {
            // Lapsed: a row leased under a name nobody keeps alive would be
            // taken over while this process polls it.
            return Err(StartError::Store(StoreError::Unavailable(
                "the approval engine's heartbeat has lapsed".into(),
            )));
        }
        // Driven here before it exists: housekeeping, which adopts what
        // this process leased but does not drive, must not take it.
        self.begin_driving(id);
        let owner = self.owner();
        let terms = InsertTerms {
            replay_window: self.config.replay_window,
            lease_owner: &owner,
            lease_until: self.store.now() + self.config.lease,
            max_pending,
        };
        let inserted = match self.store.insert_or_attach(approval, terms).await {
            Ok(inserted) => inserted,
            Err(error) => {
                self.forget(id);
                return Err(StartError::Store(error));
            }
        };
        if !matches!(inserted, Inserted::Created) {
            self.forget(id);
            return Ok(inserted);
        }
        let Some(countersigners) = countersigners else {
            self.ask(approval, policy, &owner).await?;
            return Ok(Inserted::Created);
        };
        let children = super::quorum::countersign_requests(approval, countersigners);
        self.store_countersigners(approval, &children, terms)
            .await?;
        // The countersigners first: one who cannot be asked (unknown to the
        // authorization server) ends the call before the person is bothered.
        for (asked, child) in children.iter().enumerate() {
            if self.ask(child, policy.clone(), &owner).await.is_err() {
                self.complete(id).await;
                for child in &children[asked..] {
                    self.forget(&child.id);
                }
                self.forget(id);
                return Ok(Inserted::Created); // the agent is told why
            }
        }
        if let Err(error) = self.ask(approval, policy, &owner).await {
            self.complete(id).await;
            return Err(error);
        }
        Ok(Inserted::Created)
    }

    /// Asks the person about a new approval leased to `owner`, and polls it.
    async fn ask(
        self: &Arc<Self>,
        approval: &NewApproval,
        policy: Arc<Policy>,
        owner: &str,
    ) -> Result<(), StartError> {
        let id = approval.id.as_str();
        // Recorded before the request leaves: should this process die
        // while it is in flight, nobody asks again.
        match self.store.mark_asked(id, owner).await {
            Ok(true) => {}
            Ok(false) => {
                // Taken over (this process's heartbeat lapsed meanwhile):
                // the new holder asks.
                self.stop_driving(id);
                return Ok(());
            }
            Err(error) => {
                // Never asked, still leased here: housekeeping adopts and
                // asks once the store answers; a retry attaches to it.
                self.stop_driving(id);
                return Err(StartError::Store(error));
            }
        }
        let started = match self
            .authorize(id, owner, &policy, Question::of_new(approval))
            .await
        {
            Ok(started) => started,
            Err(error) => {
                let code = problem_for(&error);
                self.settle(id, state_for(code), code).await;
                self.metrics
                    .approvals
                    .with_label_values(&[&approval.policy, "error"])
                    .inc();
                self.stop_driving(id);
                return Err(StartError::Ciba(error));
            }
        };
        self.poll_at(
            approval.id.clone(),
            started.polled,
            started.first_poll,
            Some(policy),
        );
        Ok(())
    }

    /// bc-authorize for a stored approval; records the CIBA progress (if
    /// the store fails right then, the approval is polled anyway and the
    /// record written at a later poll: the person has been asked).
    async fn authorize(
        &self,
        id: &str,
        owner: &str,
        policy: &Policy,
        question: Question<'_>,
    ) -> Result<Started, CibaError> {
        let Question {
            subject,
            binding_message,
            details,
            expires_at,
            trace,
        } = question;
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
        let mut span = self.traces.span(
            "ciba.bc-authorize",
            Kind::Client,
            Parent::Remote(question.trace),
        );
        span.set("countersign.approval_id", id.to_owned());
        span.set("countersign.policy", policy.name.clone());
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
                span.fail(problem_for(&error).as_str());
                if let Some(pings) = &self.pings {
                    pings.forget(id);
                }
                return Err(error);
            }
        };
        drop(span);
        let now = Instant::now();
        // Ping mode polls only as a safety net, slowly, never faster than
        // the server's interval.
        let server_interval = authorization
            .interval
            .unwrap_or(super::super::DEFAULT_INTERVAL);
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
        let unrecorded = self
            .persist("record the authorization request", RECORD_RETRY_FOR, || {
                self.store.set_ciba(id, &progress)
            })
            .await
            .is_none();
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
                resumed: false,
                unrecorded,
                owner: owner.to_owned(),
                schedule,
                trace: trace.map(str::to_owned),
            },
        })
    }

    /// What polling a stored approval takes, and when it is next due:
    /// never sooner than the stored next poll, and a whole interval from
    /// now, since the last poll (not recorded: it cost a write) may have
    /// been made by the process that died a moment ago.
    pub(super) async fn resume(&self, id: &str) -> Option<(Polled, Instant)> {
        let owner = self.owner();
        if !self.take_lease(id, self.store.now()).await {
            return None;
        }
        let approval = self.store.get(id).await.ok()??;
        if approval.state != ApprovalState::Pending {
            // A member of a countersigned call that approved, left by a
            // process that died before the call was forwarded or refused.
            if approval.state == ApprovalState::Approved {
                if let Some(family) = super::quorum::family_of(&approval) {
                    self.complete(family).await;
                }
            }
            return None;
        }
        let policy = self.current_policy(&approval.policy);
        let Some(progress) = &approval.ciba else {
            return self.ask_resumed(&approval, policy.as_deref()).await;
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
            resumed: true,
            unrecorded: false,
            owner,
            trace: approval.trace_parent.clone(),
        };
        Some((polled, next.min(deadline)))
    }

    /// A resumed approval with no authorization request on record: asked
    /// now if nobody ever was, ended if someone may have been.
    async fn ask_resumed(
        &self,
        approval: &Approval,
        policy: Option<&Policy>,
    ) -> Option<(Polled, Instant)> {
        let id = approval.id.as_str();
        if approval.asked_at.is_some() {
            // The process that asked died (or lost the store) before it
            // recorded the request: the person may have it on their phone,
            // and it cannot be polled. Asking again would push twice.
            tracing::warn!(
                approval_id = id,
                "the gateway that asked the user stopped before recording the request; the approval ends without asking again"
            );
            self.settle(id, ApprovalState::Failed, ProblemCode::ApprovalInterrupted)
                .await;
            return None;
        }
        if approval.expires_at <= SystemTime::now() {
            // Never asked, and too late to: nobody is pushed for it.
            self.end(approval, Outcome::Expired, policy).await;
            return None;
        }
        let Some(policy) = policy else {
            let error = CibaError::Config(format!(
                "policy {} is no longer configured",
                approval.policy
            ));
            self.end(approval, Outcome::Failed(error), None).await;
            return None;
        };
        let owner = self.owner();
        if !matches!(self.store.mark_asked(id, &owner).await, Ok(true)) {
            return None; // another process asks, or the store will say later
        }
        match self
            .authorize(id, &owner, policy, Question::of_stored(approval))
            .await
        {
            Ok(started) => Some((started.polled, started.first_poll)),
            Err(error) => {
                self.end(approval, Outcome::Failed(error), Some(policy))
                    .await;
                None
            }
        }
    }

    /// Whether the heartbeat is current, waiting a little for it when it
    /// is not: right after a pause the next beat comes within moments if
    /// the store answers.
    async fn await_alive(&self) -> bool {
        let until = Instant::now() + self.config.lease.min(LIVENESS_WAIT);
        while !self.alive() {
            if Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }

    /// Lets go of `id` before it was ever asked about (it attached, hit the
    /// limit, or was not stored): nothing to wake, nothing to count.
    pub(super) fn forget(&self, id: &str) {
        if lock(&self.driving).remove(id) {
            self.metrics.pending_approvals.dec();
        }
    }
}

/// A new approval, asked and ready to poll.
pub(super) struct Started {
    pub(super) polled: Polled,
    pub(super) first_poll: Instant,
}

/// What the person is asked about.
#[derive(Clone, Copy)]
struct Question<'a> {
    subject: &'a str,
    binding_message: &'a str,
    details: Option<&'a serde_json::Value>,
    expires_at: SystemTime,
    /// The call's trace context.
    trace: Option<&'a str>,
}

/// The question of a new or a stored approval: the fields both have.
macro_rules! question_of {
    ($approval:expr) => {
        Question {
            subject: &$approval.subject,
            binding_message: &$approval.binding_message,
            details: $approval.authorization_details.as_ref(),
            expires_at: $approval.expires_at,
            trace: $approval.trace_parent.as_deref(),
        }
    };
}

impl<'a> Question<'a> {
    fn of_new(approval: &'a NewApproval) -> Self {
        question_of!(approval)
    }

    fn of_stored(approval: &'a Approval) -> Self {
        question_of!(approval)
    }
}
