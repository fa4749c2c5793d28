//! Polling: the pollers fed by the timetable, one poll, and concluding an
//! approval once the authorization server has answered.

use super::*;

impl Engine {
    /// Hands what is due to the pollers, at most [`POLLERS`] at a time,
    /// until the process ends.
    pub(super) async fn run_pollers(self: Arc<Self>) {
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
        if !self.alive()
            || polled.owner != self.owner()
            || self.is_draining()
            || !self.still_pending(&id, &polled).await
        {
            // Lapsed: another process may poll it now. Shutting down: it
            // is handed back. Either way the store has it.
            return self.stop_driving(&id);
        }
        if polled.unrecorded {
            polled.unrecorded = self
                .store
                .set_ciba(
                    &id,
                    &progress_of(&polled, polled.schedule.next_poll().unwrap_or(deadline)),
                )
                .await
                .is_err();
        }
        let mut span = self.traces.span(
            "ciba.token",
            Kind::Client,
            Parent::Remote(polled.trace.as_deref()),
        );
        span.set("countersign.approval_id", id.clone());
        let answer = self.ciba.poll(&polled.auth_req_id).await;
        span.set("countersign.answer", answer.kind());
        drop(span);
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
            polled.server_interval = polled
                .server_interval
                .saturating_add(super::super::SLOW_DOWN_STEP);
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
        // A `slow_down` (interval) or a `Retry-After` (the next poll is later
        // than one interval) must survive a restart, or the resumed poll
        // comes too early.
        if polled.schedule.interval() != polled.stored_interval
            || next > now + polled.schedule.interval() + Duration::from_secs(1)
        {
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

    /// `slow_down` grew the interval, or `Retry-After` put the next poll
    /// off: a restart must keep it.
    async fn record_interval(&self, id: &str, polled: &mut Polled, next: Instant) {
        let progress = progress_of(polled, next);
        match self.store.set_ciba(id, &progress).await {
            Ok(()) => {
                polled.stored_interval = progress.interval;
                polled.unrecorded = false;
            }
            Err(error) => tracing::warn!(approval_id = id, %error, "could not record the poll"),
        }
    }

    /// The approval ended with `outcome`: records it (and on approval
    /// forwards the call) unless it already ended otherwise. A token in
    /// hand is kept while the store is unreachable, for as long as it can
    /// be used; shutting down waits for this.
    async fn conclude(&self, id: &str, polled: Polled, outcome: Outcome) {
        self.begin_concluding(id);
        let patience = match &outcome {
            Outcome::Approved(_) => TOKEN_RETRY_FOR,
            _ => SETTLE_RETRY_FOR,
        };
        // Resumed from another process: an "expired" or failed answer
        // before the deadline may mean that the other process took the
        // token. It gets a lease to claim the call before this one settles.
        let early = polled.resumed
            && matches!(outcome, Outcome::Expired | Outcome::Failed(_))
            && Instant::now() + Duration::from_secs(1) < polled.schedule.deadline();
        if early {
            tokio::time::sleep(self.config.lease).await;
        }
        // Still pending then: the server's answer was spent by a process
        // that died before recording it (approved or denied, nobody can
        // tell now). Not "expired": the person did answer.
        let spent = early && matches!(outcome, Outcome::Expired);
        let found = self
            .persist("read the approval", patience, || self.store.get(id))
            .await;
        if let Some(approval) = found
            .flatten()
            .filter(|a| a.state == ApprovalState::Pending)
        {
            if spent {
                tracing::warn!(
                    approval_id = id,
                    "the authorization server's answer was taken by a gateway that stopped before recording it; the approval ends without forwarding"
                );
                self.metrics
                    .approvals
                    .with_label_values(&[&approval.policy, "error"])
                    .inc();
                self.settle(id, ApprovalState::Failed, ProblemCode::ApprovalInterrupted)
                    .await;
            } else {
                let policy = polled
                    .policy
                    .or_else(|| self.current_policy(&approval.policy));
                self.end(&approval, outcome, policy.as_deref()).await;
            }
        }
        self.end_concluding(id);
        self.stop_driving(id);
    }
}

/// The CIBA progress of `polled`, next polled at `next`.
fn progress_of(polled: &Polled, next: Instant) -> CibaProgress {
    CibaProgress {
        auth_req_id: polled.auth_req_id.clone(),
        interval: polled.schedule.interval(),
        next_poll_at: to_system(next),
        deadline: to_system(polled.schedule.deadline()),
    }
}
