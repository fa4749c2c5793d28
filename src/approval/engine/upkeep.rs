//! The heartbeat and housekeeping: keeping this process's leases alive,
//! coming back after a lapse, adopting approvals nobody drives, marking
//! dead forwards, sweeping; and shutting down (drain, leases handed back).

use super::*;

/// How many orphans one round of housekeeping adopts at most.
const ADOPT_BATCH: usize = 1000;

impl Engine {
    /// Takes over `id` (after a restart, from a replica that died, or one
    /// this process could not carry on) unless this process drives it.
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

    /// Keeps this process's leases alive. Once its heartbeat has lapsed (a
    /// pause, or a store unreachable for longer than a lease), others may
    /// have taken its approvals over: it lets go of what it polls, takes a
    /// new name, and comes back as soon as the store answers a heartbeat
    /// under it. Whether it just came back (housekeeping is due at once).
    async fn beat(&self) -> bool {
        if lock(&self.liveness).released {
            return false;
        }
        if !self.alive() {
            self.lapse();
        }
        let owner = self.owner();
        let sent = Instant::now();
        let alive_until = self.store.now() + self.config.lease;
        if let Err(error) = self.store.heartbeat(&owner, alive_until).await {
            tracing::warn!(%error, "heartbeat failed; the approval store is unavailable");
            return false;
        }
        let mut liveness = lock(&self.liveness);
        if liveness.owner != owner || liveness.released {
            return false; // renamed or shut down meanwhile
        }
        // Good until one lease after it was sent, on any clock.
        liveness.alive_until = sent + self.config.lease;
        if !std::mem::take(&mut liveness.lapsed) {
            return false;
        }
        drop(liveness);
        tracing::info!("this gateway's heartbeat is back; resuming approvals nobody drives");
        true
    }

    /// The heartbeat ran out: what is polled here may be polled elsewhere
    /// now. Approvals with a token in hand stay (their claim decides).
    fn lapse(&self) {
        let mut liveness = lock(&self.liveness);
        if liveness.lapsed {
            return;
        }
        liveness.lapsed = true;
        liveness.owner = uuid::Uuid::new_v4().to_string();
        drop(liveness);
        self.metrics.heartbeat_lapses.inc();
        tracing::warn!(
            "this gateway's heartbeat lapsed; it stops polling until the store answers, then resumes what nobody else took"
        );
        let concluding = lock(&self.concluding).clone();
        let ids: Vec<String> = lock(&self.driving)
            .iter()
            .filter(|id| !concluding.contains(*id))
            .cloned()
            .collect();
        for id in ids {
            self.stop_driving(&id);
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
            if lock(&self.liveness).released {
                return;
            }
            if self.beat().await {
                last_housekeeping = None;
            }
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
    /// approvals are adopted; so are this process's own that it could not
    /// carry on (a store error at the wrong moment).
    async fn take_over(self: &Arc<Self>) {
        let now = self.store.now();
        match self.store.mark_unknown_outcomes(now).await {
            Ok(0) => {}
            Ok(n) => {
                self.metrics.outcome_unknown.inc_by(n);
                tracing::warn!(
                    count = n,
                    "approved calls whose forwarder died are marked outcome_unknown"
                )
            }
            Err(error) => tracing::warn!(%error, "approval store unavailable"),
        }
        if !self.alive() || self.is_draining() {
            return;
        }
        let owner = self.owner();
        match self.store.orphans(now, ADOPT_BATCH, &owner).await {
            Ok(orphans) => {
                for approval in orphans {
                    if lock(&self.driving).contains(&approval.id) {
                        continue;
                    }
                    let mine = approval.lease_owner.as_deref() == Some(owner.as_str());
                    if mine && approval.state == ApprovalState::Approved {
                        // A member of a countersigned call waiting for the
                        // others, still ours: its completion is looked at
                        // again (a safety net for a completion the store
                        // lost), but only once it has waited a lease.
                        if approval.updated_at + self.config.lease > now {
                            continue;
                        }
                        tracing::debug!(approval_id = %approval.id, "looking again at a countersigned call's approved member");
                    } else {
                        tracing::info!(approval_id = %approval.id, "resuming an approval nobody polls");
                    }
                    if approval
                        .lease_owner
                        .as_ref()
                        .is_some_and(|holder| *holder != owner)
                    {
                        self.metrics.lease_takeovers.inc();
                    }
                    self.adopt(approval.id);
                }
            }
            Err(error) => tracing::warn!(%error, "approval store unavailable"),
        }
    }

    /// Shutting down: starts, polls and adopts nothing more; lets the
    /// approvals whose token is in hand be forwarded and recorded, for at
    /// most `grace`; then hands its leases back, so that another process
    /// (or this one, restarted) adopts them at once. Forwards still in
    /// flight after `grace` end as `outcome_unknown` once their lease runs
    /// out.
    pub async fn drain(&self, grace: Duration) {
        self.draining
            .store(true, std::sync::atomic::Ordering::Release);
        let until = Instant::now() + grace;
        loop {
            let waited = self.concluded.notified();
            tokio::pin!(waited);
            waited.as_mut().enable();
            let left = lock(&self.concluding).len();
            if left == 0 {
                break;
            }
            tracing::info!(
                count = left,
                "shutting down: waiting for approved calls in flight"
            );
            if tokio::time::timeout_at(until, waited).await.is_err() {
                tracing::warn!(
                    count = left,
                    "shutting down before approved calls in flight were recorded; they end as outcome_unknown"
                );
                break;
            }
        }
        let owner = {
            let mut liveness = lock(&self.liveness);
            liveness.released = true;
            liveness.owner.clone()
        };
        let ids: Vec<String> = lock(&self.driving).iter().cloned().collect();
        for id in ids {
            self.stop_driving(&id);
        }
        match self.store.release(&owner).await {
            Ok(()) => tracing::info!("approval leases handed back"),
            Err(error) => {
                tracing::warn!(%error, "could not hand the approval leases back; they are adopted once they run out")
            }
        }
    }
}
