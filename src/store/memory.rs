//! The memory backend: the SQL backends' semantics over a `HashMap`, for
//! tests (and only where `store: memory` is asked for). Times are kept at
//! millisecond precision, as the databases keep them.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use super::{
    attach_key, attachable, duration_ms, from_ms, now_ms, to_ms, Approval, ApprovalState,
    ApprovalStore, CibaProgress, InsertTerms, Inserted, KeptGrant, ListFilter, NewApproval,
    ShadowDecision, ShadowFilter, StoreError, StoredResponse,
};

#[derive(Debug, Default)]
pub(super) struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    approvals: HashMap<String, Record>,
    /// attach key -> id
    attach: HashMap<String, String>,
    /// lease owner -> alive until (ms)
    heartbeats: HashMap<String, i64>,
    shadow: Vec<ShadowDecision>,
}

#[derive(Debug)]
struct Record {
    approval: Approval,
    attach_key: Option<String>,
}

impl Inner {
    fn detach(&mut self, id: &str) {
        if let Some(record) = self.approvals.get_mut(id) {
            if let Some(key) = record.attach_key.take() {
                self.attach.remove(&key);
            }
        }
    }

    /// As the SQL backends' `holder_gone`.
    fn holder_gone(heartbeats: &HashMap<String, i64>, a: &Approval, now: i64) -> bool {
        let Some(holder) = &a.lease_owner else {
            return true;
        };
        a.lease_until.is_none_or(|t| to_ms(t) <= now)
            && heartbeats.get(holder).is_none_or(|&alive| alive <= now)
    }

    fn approval_mut(&mut self, id: &str) -> Option<&mut Approval> {
        self.approvals
            .get_mut(id)
            .map(|record| &mut record.approval)
    }

    fn remove(&mut self, id: &str) {
        self.detach(id);
        self.approvals.remove(id);
    }
}

impl MemoryStore {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere while holding the lock leaves consistent data:
        // every change below is a few field writes.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A time as the databases keep it.
fn ms(t: SystemTime) -> SystemTime {
    from_ms(to_ms(t))
}

fn now() -> SystemTime {
    from_ms(now_ms())
}

/// Newest first, as SQL's `ORDER BY created_at DESC, id DESC`.
fn newest_first(a: &Approval, b: &Approval) -> std::cmp::Ordering {
    (b.created_at, &b.id).cmp(&(a.created_at, &a.id))
}

#[async_trait::async_trait]
impl ApprovalStore for MemoryStore {
    async fn insert_or_attach(
        &self,
        approval: &NewApproval,
        terms: InsertTerms<'_>,
    ) -> Result<Inserted, StoreError> {
        let replay_window = terms.replay_window;
        let key = attach_key(approval);
        let now = to_ms(approval.created_at);
        let mut inner = self.lock();
        if let Some(id) = inner.attach.get(&key).cloned() {
            let existing = &inner.approvals[&id].approval;
            if attachable(existing, now, replay_window) {
                if approval.idempotency_key.is_some()
                    && existing.fingerprint != approval.fingerprint
                {
                    return Err(StoreError::KeyReuse);
                }
                return Ok(Inserted::Existing(Box::new(existing.clone())));
            }
            inner.detach(&id);
        }
        if inner.approvals.contains_key(&approval.id) {
            return Err(StoreError::Unavailable("insert: duplicate id".into()));
        }
        let pending = inner
            .approvals
            .values()
            .filter(|r| {
                r.approval.subject == approval.subject && r.approval.state == ApprovalState::Pending
            })
            .count();
        if pending >= terms.max_pending {
            return Ok(Inserted::LimitReached);
        }
        let mut record = Approval::new(approval, ms(approval.created_at));
        record.created_at = ms(record.created_at);
        record.expires_at = ms(record.expires_at);
        record.lease_owner = Some(terms.lease_owner.to_owned());
        record.lease_until = Some(ms(terms.lease_until));
        inner.attach.insert(key.clone(), approval.id.clone());
        inner.approvals.insert(
            approval.id.clone(),
            Record {
                approval: record,
                attach_key: Some(key),
            },
        );
        Ok(Inserted::Created)
    }

    fn now(&self) -> SystemTime {
        now()
    }

    async fn mark_asked(&self, id: &str, owner: &str) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        let Some(a) = inner.approval_mut(id) else {
            return Ok(false);
        };
        if a.state != ApprovalState::Pending
            || a.asked_at.is_some()
            || a.lease_owner.as_deref() != Some(owner)
        {
            return Ok(false);
        }
        let now = now();
        a.asked_at = Some(now);
        a.updated_at = now;
        Ok(true)
    }

    async fn mark_delivered(&self, id: &str) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        let Some(a) = inner.approval_mut(id) else {
            return Ok(false);
        };
        if a.state != ApprovalState::Done || a.delivered_at.is_some() {
            return Ok(false);
        }
        a.delivered_at = Some(now());
        if a.idempotency_key.is_none() {
            inner.detach(id);
        }
        Ok(true)
    }

    async fn claim(&self, id: &str, owner: &str, until: SystemTime) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        let Some(a) = inner.approval_mut(id) else {
            return Ok(false);
        };
        if !matches!(a.state, ApprovalState::Pending | ApprovalState::Approved) {
            return Ok(false);
        }
        a.state = ApprovalState::Forwarding;
        a.updated_at = now();
        a.lease_owner = Some(owner.to_owned());
        a.lease_until = Some(ms(until));
        Ok(true)
    }

    async fn record_shadow(&self, decision: &ShadowDecision) -> Result<(), StoreError> {
        let mut decision = decision.clone();
        decision.created_at = ms(decision.created_at);
        self.lock().shadow.push(decision);
        Ok(())
    }

    async fn list_shadow(&self, filter: &ShadowFilter) -> Result<Vec<ShadowDecision>, StoreError> {
        let inner = self.lock();
        let mut found: Vec<ShadowDecision> = inner
            .shadow
            .iter()
            .filter(|d| filter.policy.as_ref().is_none_or(|p| &d.policy == p))
            .filter(|d| filter.subject.is_none() || d.subject == filter.subject)
            .filter(|d| filter.since.is_none_or(|t| d.created_at >= t))
            .cloned()
            .collect();
        found.sort_by(|a, b| (b.created_at, &b.id).cmp(&(a.created_at, &a.id)));
        found.truncate(filter.limit.unwrap_or(usize::MAX));
        Ok(found)
    }

    async fn keep_grant(&self, id: &str, grant: &KeptGrant) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        let Some(a) = inner.approval_mut(id) else {
            return Ok(false);
        };
        if a.state != ApprovalState::Pending {
            return Ok(false);
        }
        let now = now();
        a.state = ApprovalState::Approved;
        a.grant = Some(grant.clone());
        a.updated_at = now;
        a.decided_at.get_or_insert(now);
        Ok(true)
    }

    async fn family(&self, parent_id: &str) -> Result<Vec<Approval>, StoreError> {
        let inner = self.lock();
        let mut found: Vec<Approval> = inner
            .approvals
            .values()
            .map(|r| &r.approval)
            .filter(|a| a.parent_id.as_deref() == Some(parent_id))
            .cloned()
            .collect();
        found.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(found)
    }

    async fn end_parent(
        &self,
        id: &str,
        to: ApprovalState,
        problem_code: &str,
        detail: &str,
    ) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        let Some(a) = inner.approval_mut(id) else {
            return Ok(false);
        };
        if !to.is_final() || !matches!(a.state, ApprovalState::Pending | ApprovalState::Approved) {
            return Ok(false);
        }
        let now = now();
        a.state = to;
        a.updated_at = now;
        a.decided_at.get_or_insert(now);
        a.problem_code = Some(problem_code.to_owned());
        a.problem_detail = Some(detail.to_owned());
        a.lease_owner = None;
        a.lease_until = None;
        a.request.body = Vec::new();
        a.request.headers = Vec::new();
        a.grant = None;
        if to == ApprovalState::Failed {
            inner.detach(id);
        }
        Ok(true)
    }

    async fn close_children(
        &self,
        parent_id: &str,
        forwarded: bool,
        problem_code: &str,
    ) -> Result<(), StoreError> {
        let now = now();
        for record in self.lock().approvals.values_mut() {
            let a = &mut record.approval;
            if a.parent_id.as_deref() != Some(parent_id)
                || !matches!(a.state, ApprovalState::Pending | ApprovalState::Approved)
            {
                continue;
            }
            if forwarded && a.state == ApprovalState::Approved {
                a.state = ApprovalState::Done;
            } else {
                a.state = ApprovalState::Failed;
                a.problem_code = Some(problem_code.to_owned());
            }
            a.updated_at = now;
            a.decided_at.get_or_insert(now);
            a.grant = None;
            a.lease_owner = None;
            a.lease_until = None;
        }
        Ok(())
    }

    async fn release(&self, owner: &str) -> Result<(), StoreError> {
        let mut inner = self.lock();
        for record in inner.approvals.values_mut() {
            let a = &mut record.approval;
            if a.lease_owner.as_deref() == Some(owner)
                && matches!(a.state, ApprovalState::Pending | ApprovalState::Approved)
            {
                a.lease_owner = None;
                a.lease_until = None;
            }
        }
        inner.heartbeats.remove(owner);
        Ok(())
    }

    async fn get(&self, id: &str) -> Result<Option<Approval>, StoreError> {
        Ok(self.lock().approvals.get(id).map(|r| r.approval.clone()))
    }

    async fn set_ciba(&self, id: &str, ciba: &CibaProgress) -> Result<(), StoreError> {
        if let Some(a) = self.lock().approval_mut(id) {
            a.ciba = Some(CibaProgress {
                auth_req_id: ciba.auth_req_id.clone(),
                interval: Duration::from_millis(duration_ms(ciba.interval).unsigned_abs()),
                next_poll_at: ms(ciba.next_poll_at),
                deadline: ms(ciba.deadline),
            });
            a.updated_at = now();
        }
        Ok(())
    }

    async fn transition(
        &self,
        id: &str,
        from: ApprovalState,
        to: ApprovalState,
        problem_code: Option<&str>,
    ) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        let Some(a) = inner.approval_mut(id) else {
            return Ok(false);
        };
        if a.state != from || from.is_final() {
            return Ok(false);
        }
        let now = now();
        a.state = to;
        a.updated_at = now;
        if to.is_final() || to == ApprovalState::Approved {
            a.decided_at.get_or_insert(now);
        }
        if let Some(code) = problem_code {
            a.problem_code = Some(code.to_owned());
        }
        if to.is_final() {
            a.lease_owner = None;
            a.lease_until = None;
            a.request.body = Vec::new();
            a.request.headers = Vec::new();
            a.grant = None;
        }
        if to == ApprovalState::Failed && problem_code != Some("approval_interrupted") {
            // Not replayed to retries: they start a new approval.
            inner.detach(id);
        }
        Ok(true)
    }

    async fn finish(&self, id: &str, response: &StoredResponse) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        let Some(a) = inner.approval_mut(id) else {
            return Ok(false);
        };
        if a.state != ApprovalState::Forwarding {
            return Ok(false);
        }
        let now = now();
        a.state = ApprovalState::Done;
        a.response = Some(response.clone());
        a.grant = None;
        a.request.body = Vec::new();
        a.request.headers = Vec::new();
        a.updated_at = now;
        a.decided_at.get_or_insert(now);
        a.lease_owner = None;
        a.lease_until = None;
        Ok(true)
    }

    async fn lease(&self, id: &str, owner: &str, until: SystemTime) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let Some(record) = inner.approvals.get_mut(id) else {
            return Ok(false);
        };
        let a = &mut record.approval;
        let free = a.lease_owner.as_deref() == Some(owner)
            || Inner::holder_gone(&inner.heartbeats, a, now_ms());
        if a.state.is_final() || !free {
            return Ok(false);
        }
        a.lease_owner = Some(owner.to_owned());
        a.lease_until = Some(ms(until));
        Ok(true)
    }

    async fn heartbeat(&self, owner: &str, alive_until: SystemTime) -> Result<(), StoreError> {
        self.lock()
            .heartbeats
            .insert(owner.to_owned(), to_ms(alive_until));
        Ok(())
    }

    async fn orphans(
        &self,
        now: SystemTime,
        limit: usize,
        mine: &str,
    ) -> Result<Vec<Approval>, StoreError> {
        let now = to_ms(now);
        let inner = self.lock();
        let mut found: Vec<Approval> = inner
            .approvals
            .values()
            .map(|r| &r.approval)
            .filter(|a| matches!(a.state, ApprovalState::Pending | ApprovalState::Approved))
            .filter(|a| {
                a.lease_owner.as_deref() == Some(mine)
                    || Inner::holder_gone(&inner.heartbeats, a, now)
            })
            .cloned()
            .collect();
        found.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        found.truncate(limit);
        Ok(found)
    }

    async fn mark_unknown_outcomes(&self, now: SystemTime) -> Result<u64, StoreError> {
        let now_ms = to_ms(now);
        let mut marked = 0;
        let mut inner = self.lock();
        let inner = &mut *inner;
        for record in inner.approvals.values_mut() {
            let a = &mut record.approval;
            if a.state == ApprovalState::Forwarding
                && Inner::holder_gone(&inner.heartbeats, a, now_ms)
            {
                a.state = ApprovalState::OutcomeUnknown;
                a.problem_code = Some("outcome_unknown".into());
                a.updated_at = ms(now);
                a.decided_at.get_or_insert(ms(now));
                a.lease_owner = None;
                a.lease_until = None;
                a.request.body = Vec::new();
                a.request.headers = Vec::new();
                a.grant = None;
                marked += 1;
            }
        }
        Ok(marked)
    }

    async fn sweep(
        &self,
        now: SystemTime,
        replay_window: Duration,
        retention: Duration,
    ) -> Result<(), StoreError> {
        let now = to_ms(now);
        let replay_before = now.saturating_sub(duration_ms(replay_window));
        let retain_after = now.saturating_sub(duration_ms(retention));
        let mut inner = self.lock();
        inner
            .heartbeats
            .retain(|_, alive| *alive > now.saturating_sub(3_600_000));
        inner.shadow.retain(|d| to_ms(d.created_at) > retain_after);
        let mut detach = Vec::new();
        let mut delete = Vec::new();
        for (id, record) in inner.approvals.iter_mut() {
            let a = &mut record.approval;
            let updated = to_ms(a.updated_at);
            if a.state.is_final() {
                a.request.body = Vec::new();
                a.request.headers = Vec::new();
                if updated <= replay_before {
                    if let Some(response) = &mut a.response {
                        response.body = None;
                    }
                    a.ciba = None;
                    detach.push(id.clone());
                }
            }
            if updated <= retain_after
                && (a.state.is_final() || to_ms(a.expires_at) <= retain_after)
            {
                delete.push(id.clone());
            }
        }
        for id in detach {
            inner.detach(&id);
        }
        for id in delete {
            inner.remove(&id);
        }
        Ok(())
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<Approval>, StoreError> {
        let since = filter.since.map(to_ms);
        let mut found: Vec<Approval> = self
            .lock()
            .approvals
            .values()
            .map(|r| &r.approval)
            .filter(|a| filter.state.is_none_or(|s| a.state == s))
            .filter(|a| filter.policy.as_ref().is_none_or(|p| &a.policy == p))
            .filter(|a| filter.subject.as_ref().is_none_or(|s| &a.subject == s))
            .filter(|a| since.is_none_or(|t| to_ms(a.created_at) >= t))
            .cloned()
            .collect();
        found.sort_by(newest_first);
        if let Some(limit) = filter.limit {
            found.truncate(limit);
        }
        Ok(found)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
