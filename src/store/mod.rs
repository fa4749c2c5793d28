//! TEMPORARY interface stub with an in-memory backend, replaced by the
//! `store` branch (SQLite and PostgreSQL) at merge.
#![allow(missing_docs)]

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

pub use crate::secret::Secret;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApprovalState {
    Pending,
    Approved,
    Denied,
    Expired,
    Failed,
    Forwarding,
    Done,
    OutcomeUnknown,
}

impl ApprovalState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Approved => "approved",
            Self::Denied => "denied",
            Self::Expired => "expired",
            Self::Failed => "failed",
            Self::Forwarding => "forwarding",
            Self::Done => "done",
            Self::OutcomeUnknown => "outcome_unknown",
        }
    }
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Denied | Self::Expired | Self::Failed | Self::Done | Self::OutcomeUnknown
        )
    }
}

#[derive(Debug, Clone)]
pub struct StoredRequest {
    pub method: String,
    pub path_and_query: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct StoredResponse {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Option<Vec<u8>>,
}

#[derive(Debug, Clone)]
pub struct NewApproval {
    pub id: String,
    pub policy: String,
    pub subject: String,
    pub upstream: String,
    pub fingerprint: String,
    pub idempotency_key: Option<String>,
    pub binding_message: String,
    pub authorization_details: Option<serde_json::Value>,
    pub request: StoredRequest,
    pub created_at: SystemTime,
    pub expires_at: SystemTime,
}

#[derive(Debug, Clone)]
pub struct CibaProgress {
    pub auth_req_id: Secret,
    pub interval: Duration,
    pub next_poll_at: SystemTime,
    pub deadline: SystemTime,
}

#[derive(Debug, Clone)]
pub struct Approval {
    pub id: String,
    pub policy: String,
    pub subject: String,
    pub upstream: String,
    pub fingerprint: String,
    pub idempotency_key: Option<String>,
    pub binding_message: String,
    pub authorization_details: Option<serde_json::Value>,
    pub request: StoredRequest,
    pub created_at: SystemTime,
    pub expires_at: SystemTime,
    pub state: ApprovalState,
    pub ciba: Option<CibaProgress>,
    pub response: Option<StoredResponse>,
    pub problem_code: Option<String>,
    pub updated_at: SystemTime,
    pub decided_at: Option<SystemTime>,
    pub lease_owner: Option<String>,
    pub lease_until: Option<SystemTime>,
}

#[derive(Debug)]
pub enum Inserted {
    Created,
    Existing(Box<Approval>),
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("approval store unavailable: {0}")]
    Unavailable(String),
    #[error("the Idempotency-Key was used for a different call")]
    KeyReuse,
}

#[derive(Debug, Default, Clone)]
pub struct ListFilter {
    pub state: Option<ApprovalState>,
    pub policy: Option<String>,
    pub subject: Option<String>,
    pub since: Option<SystemTime>,
    pub limit: Option<usize>,
}

#[async_trait::async_trait]
pub trait ApprovalStore: Send + Sync + std::fmt::Debug {
    async fn insert_or_attach(
        &self,
        approval: &NewApproval,
        replay_window: Duration,
    ) -> Result<Inserted, StoreError>;
    async fn get(&self, id: &str) -> Result<Option<Approval>, StoreError>;
    async fn set_ciba(&self, id: &str, ciba: &CibaProgress) -> Result<(), StoreError>;
    async fn transition(
        &self,
        id: &str,
        from: ApprovalState,
        to: ApprovalState,
        problem_code: Option<&str>,
    ) -> Result<bool, StoreError>;
    async fn finish(&self, id: &str, response: &StoredResponse) -> Result<bool, StoreError>;
    async fn lease(&self, id: &str, owner: &str, until: SystemTime) -> Result<bool, StoreError>;
    async fn orphans(&self, now: SystemTime, limit: usize) -> Result<Vec<Approval>, StoreError>;
    async fn mark_unknown_outcomes(&self, now: SystemTime) -> Result<u64, StoreError>;
    async fn sweep(
        &self,
        now: SystemTime,
        replay_window: Duration,
        retention: Duration,
    ) -> Result<(), StoreError>;
    async fn list(&self, filter: &ListFilter) -> Result<Vec<Approval>, StoreError>;
    async fn ping(&self) -> Result<(), StoreError>;
}

pub async fn open_sqlite(_path: &Path) -> Result<Arc<dyn ApprovalStore>, StoreError> {
    Ok(memory())
}

pub async fn open_postgres(_url: &str) -> Result<Arc<dyn ApprovalStore>, StoreError> {
    Err(StoreError::Unavailable("not built yet".into()))
}

pub fn memory() -> Arc<dyn ApprovalStore> {
    Arc::new(Memory::default())
}

#[derive(Debug, Default)]
struct Memory(Mutex<HashMap<String, Approval>>);

impl Memory {
    fn with<T>(&self, f: impl FnOnce(&mut HashMap<String, Approval>) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

#[async_trait::async_trait]
impl ApprovalStore for Memory {
    async fn insert_or_attach(
        &self,
        a: &NewApproval,
        replay_window: Duration,
    ) -> Result<Inserted, StoreError> {
        self.with(|all| {
            let now = SystemTime::now();
            let existing = all.values().find(|e| {
                e.subject == a.subject
                    && match (&a.idempotency_key, &e.idempotency_key) {
                        (Some(k), Some(ek)) => k == ek,
                        (Some(_), None) => false,
                        (None, _) => e.fingerprint == a.fingerprint,
                    }
                    && e.state != ApprovalState::Failed
                    && (!e.state.is_final() || e.updated_at + replay_window > now)
            });
            if let Some(e) = existing {
                if a.idempotency_key.is_some() && e.fingerprint != a.fingerprint {
                    return Err(StoreError::KeyReuse);
                }
                return Ok(Inserted::Existing(Box::new(e.clone())));
            }
            all.insert(
                a.id.clone(),
                Approval {
                    id: a.id.clone(),
                    policy: a.policy.clone(),
                    subject: a.subject.clone(),
                    upstream: a.upstream.clone(),
                    fingerprint: a.fingerprint.clone(),
                    idempotency_key: a.idempotency_key.clone(),
                    binding_message: a.binding_message.clone(),
                    authorization_details: a.authorization_details.clone(),
                    request: a.request.clone(),
                    created_at: a.created_at,
                    expires_at: a.expires_at,
                    state: ApprovalState::Pending,
                    ciba: None,
                    response: None,
                    problem_code: None,
                    updated_at: a.created_at,
                    decided_at: None,
                    lease_owner: None,
                    lease_until: None,
                },
            );
            Ok(Inserted::Created)
        })
    }
    async fn get(&self, id: &str) -> Result<Option<Approval>, StoreError> {
        Ok(self.with(|all| all.get(id).cloned()))
    }
    async fn set_ciba(&self, id: &str, ciba: &CibaProgress) -> Result<(), StoreError> {
        self.with(|all| {
            if let Some(a) = all.get_mut(id) {
                a.ciba = Some(ciba.clone());
            }
        });
        Ok(())
    }
    async fn transition(
        &self,
        id: &str,
        from: ApprovalState,
        to: ApprovalState,
        problem_code: Option<&str>,
    ) -> Result<bool, StoreError> {
        Ok(self.with(|all| match all.get_mut(id) {
            Some(a) if a.state == from => {
                a.state = to;
                a.updated_at = SystemTime::now();
                if to.is_final() || to == ApprovalState::Approved {
                    a.decided_at = Some(a.updated_at);
                }
                if let Some(code) = problem_code {
                    a.problem_code = Some(code.to_owned());
                }
                true
            }
            _ => false,
        }))
    }
    async fn finish(&self, id: &str, response: &StoredResponse) -> Result<bool, StoreError> {
        Ok(self.with(|all| match all.get_mut(id) {
            Some(a) if a.state == ApprovalState::Forwarding => {
                a.state = ApprovalState::Done;
                a.response = Some(response.clone());
                a.request.body.clear();
                a.updated_at = SystemTime::now();
                a.decided_at = Some(a.updated_at);
                true
            }
            _ => false,
        }))
    }
    async fn lease(&self, id: &str, owner: &str, until: SystemTime) -> Result<bool, StoreError> {
        Ok(self.with(|all| match all.get_mut(id) {
            Some(a) if !a.state.is_final() => {
                let free = a.lease_owner.as_deref().is_none_or(|o| o == owner)
                    || a.lease_until.is_none_or(|u| u <= SystemTime::now());
                if free {
                    a.lease_owner = Some(owner.to_owned());
                    a.lease_until = Some(until);
                }
                free
            }
            _ => false,
        }))
    }
    async fn orphans(&self, now: SystemTime, limit: usize) -> Result<Vec<Approval>, StoreError> {
        Ok(self.with(|all| {
            all.values()
                .filter(|a| matches!(a.state, ApprovalState::Pending | ApprovalState::Approved))
                .filter(|a| a.lease_until.is_none_or(|u| u <= now))
                .take(limit)
                .cloned()
                .collect()
        }))
    }
    async fn mark_unknown_outcomes(&self, now: SystemTime) -> Result<u64, StoreError> {
        Ok(self.with(|all| {
            let mut n = 0;
            for a in all.values_mut() {
                if a.state == ApprovalState::Forwarding && a.lease_until.is_some_and(|u| u <= now) {
                    a.state = ApprovalState::OutcomeUnknown;
                    a.problem_code = Some("outcome_unknown".into());
                    n += 1;
                }
            }
            n
        }))
    }
    async fn sweep(&self, _: SystemTime, _: Duration, _: Duration) -> Result<(), StoreError> {
        Ok(())
    }
    async fn list(&self, filter: &ListFilter) -> Result<Vec<Approval>, StoreError> {
        Ok(self.with(|all| {
            all.values()
                .filter(|a| filter.state.is_none_or(|s| a.state == s))
                .filter(|a| filter.subject.as_ref().is_none_or(|s| &a.subject == s))
                .filter(|a| filter.policy.as_ref().is_none_or(|s| &a.policy == s))
                .take(filter.limit.unwrap_or(usize::MAX))
                .cloned()
                .collect()
        }))
    }
    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
