//! Four eyes: a countersigned call is the person's approval (the parent,
//! `countersign_min` set) and one approval per countersigner (its
//! children), each stored, leased, asked and polled like any other, so
//! restarts, replicas, ping mode and the per-person limit cover every
//! approver. An approved member's token is kept in the store; whoever
//! records the last answer needed forwards the call through the same
//! exactly-once claim. Any refusal refuses the call: the person and the
//! countersigners are asked at once and share one deadline, so waiting for
//! a second "no" would only keep the agent waiting.

use super::*;
use crate::policy::countersign::Countersigners;
use crate::store::KeptGrant;

/// The call a member of a countersigned call belongs to: the parent's id
/// (the member's own, for the parent).
pub(super) fn family_of(approval: &Approval) -> Option<&str> {
    match (&approval.parent_id, approval.countersign_min) {
        (Some(parent), _) => Some(parent),
        (None, Some(_)) => Some(&approval.id),
        (None, None) => None,
    }
}

/// The countersigners' approvals of a new call: the call's question in
/// their words, the same `authorization_details` (so every token names the
/// same call), the same deadline. No request is kept: only the parent
/// forwards.
pub(super) fn countersign_requests(
    parent: &NewApproval,
    countersigners: &Countersigners,
) -> Vec<NewApproval> {
    countersigners
        .subjects
        .iter()
        .map(|subject| NewApproval {
            id: uuid::Uuid::new_v4().to_string(),
            policy: parent.policy.clone(),
            subject: subject.clone(),
            upstream: parent.upstream.clone(),
            // Unique per call and countersigner: never attached to by an
            // agent's call (whose fingerprints are hex digests).
            fingerprint: format!("countersign:{}:{subject}", parent.id),
            idempotency_key: None,
            binding_message: countersigners.binding_message.clone(),
            authorization_details: parent.authorization_details.clone(),
            request: StoredRequest {
                method: parent.request.method.clone(),
                path_and_query: parent.request.path_and_query.clone(),
                headers: Vec::new(),
                body: Vec::new(),
            },
            created_at: parent.created_at,
            expires_at: parent.expires_at,
            parent_id: Some(parent.id.clone()),
            countersign_min: None,
            trace_parent: parent.trace_parent.clone(),
        })
        .collect()
}

/// Where a countersigned call stands, for the agent.
#[derive(Debug)]
pub struct QuorumStatus {
    pub members: Vec<Member>,
}

/// One approver of a countersigned call.
#[derive(Debug)]
pub struct Member {
    pub subject: String,
    pub countersigner: bool,
    pub state: ApprovalState,
}

impl QuorumStatus {
    /// "bob has not answered yet (alice approved)".
    pub fn waiting_sentence(&self) -> String {
        let names = |state: ApprovalState| -> Vec<&str> {
            self.members
                .iter()
                .filter(|m| m.state == state)
                .map(|m| m.subject.as_str())
                .collect()
        };
        let pending = names(ApprovalState::Pending);
        let approved = names(ApprovalState::Approved);
        let mut sentence = match pending.len() {
            0 => "Everyone needed has approved; the call is being made".to_owned(),
            1 => format!("{} has not answered yet", pending[0]),
            _ => format!("{} have not answered yet", join(&pending)),
        };
        if !approved.is_empty() && !pending.is_empty() {
            sentence.push_str(&format!(" ({} approved)", join(&approved)));
        }
        sentence
    }
}

fn join(names: &[&str]) -> String {
    match names {
        [] => String::new(),
        [one] => (*one).to_owned(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

impl Engine {
    /// Stores the countersigners' approvals of the new call `parent` (just
    /// inserted, leased here), under the same per-person limit as anyone's.
    /// On any failure the call is ended before anyone is asked.
    pub(super) async fn store_countersigners(
        &self,
        parent: &NewApproval,
        children: &[NewApproval],
        terms: InsertTerms<'_>,
    ) -> Result<(), StartError> {
        for child in children {
            self.begin_driving(&child.id);
            let failure = match self.store.insert_or_attach(child, terms).await {
                Ok(Inserted::Created) => continue,
                Ok(Inserted::LimitReached) => StartError::CountersignerBusy(child.subject.clone()),
                Ok(Inserted::Existing(_)) => StartError::Store(StoreError::Unavailable(
                    "a countersign request attached to another".into(),
                )),
                Err(error) => StartError::Store(error),
            };
            let detail = match &failure {
                StartError::CountersignerBusy(subject) => {
                    format!("{subject} already has as many approval requests waiting as they may")
                }
                _ => "the countersign requests could not be stored".to_owned(),
            };
            let _ = self
                .persist("refuse the call", SETTLE_RETRY_FOR, || {
                    self.store.end_parent(
                        &parent.id,
                        ApprovalState::Failed,
                        ProblemCode::ApprovalFailed.as_str(),
                        &detail,
                    )
                })
                .await;
            let _ = self
                .store
                .close_children(&parent.id, false, ProblemCode::ApprovalFailed.as_str())
                .await;
            for child in children {
                self.forget(&child.id);
            }
            self.forget(&parent.id);
            return Err(failure);
        }
        Ok(())
    }

    /// A member approved: its token is kept in the store, then the call is
    /// forwarded if it was the last answer needed.
    pub(super) async fn keep_and_complete(&self, id: &str, family: &str, grant: &KeptGrant) {
        let kept = self
            .persist("keep the approved token", TOKEN_RETRY_FOR, || {
                self.store.keep_grant(id, grant)
            })
            .await;
        if kept.is_none() {
            tracing::error!(
                approval_id = id,
                "could not keep the approved token; the call is not forwarded"
            );
            return;
        }
        self.complete(family).await;
    }

    /// Records a member's refusal; the call it belongs to is refused with it.
    pub(super) async fn refuse(&self, approval: &Approval, to: ApprovalState, code: ProblemCode) {
        match family_of(approval) {
            None => self.settle(&approval.id, to, code).await,
            Some(family) if family == approval.id => {
                let detail = match to {
                    ApprovalState::Denied => format!("{} denied the request", approval.subject),
                    ApprovalState::Expired => {
                        format!("{} did not answer in time", approval.subject)
                    }
                    _ => format!("the request to {} failed", approval.subject),
                };
                let _ = self
                    .persist("record how the approval ended", SETTLE_RETRY_FOR, || {
                        self.store
                            .end_parent(&approval.id, to, code.as_str(), &detail)
                    })
                    .await;
                self.complete(family).await;
            }
            Some(family) => {
                self.settle(&approval.id, to, code).await;
                self.complete(family).await;
            }
        }
    }

    /// Whatever a countersigned call's members' answers now allow: refused
    /// on any refusal, forwarded once the person and `min` countersigners
    /// approved, closed (no token kept) once it ended. Safe to run any
    /// number of times, in any process: the store's conditional writes
    /// decide.
    pub(super) async fn complete(&self, family: &str) {
        let Some(Some(parent)) = self
            .persist("read the countersigned call", SETTLE_RETRY_FOR, || {
                self.store.get(family)
            })
            .await
        else {
            return;
        };
        let Some(children) = self
            .persist("read the countersigners", SETTLE_RETRY_FOR, || {
                self.store.family(family)
            })
            .await
        else {
            return;
        };
        let open =
            |a: &&Approval| matches!(a.state, ApprovalState::Pending | ApprovalState::Approved);
        if parent.state.is_final() || parent.state == ApprovalState::Forwarding {
            if children.iter().any(|c| open(&c)) {
                self.close_family(&parent).await;
            }
            self.wake(family);
            return;
        }
        if let Some((to, code, detail)) = refusal(&children) {
            tracing::info!(approval_id = family, %detail, "countersigned call refused");
            let _ = self
                .persist("refuse the countersigned call", SETTLE_RETRY_FOR, || {
                    self.store.end_parent(family, to, code, &detail)
                })
                .await;
            if let Ok(Some(parent)) = self.store.get(family).await {
                self.close_family(&parent).await;
            }
            self.wake(family);
            return;
        }
        let needed = parent.countersign_min.unwrap_or(u32::MAX) as usize;
        let approved: Vec<Secret> = children
            .iter()
            .filter(|c| c.state == ApprovalState::Approved)
            .filter_map(|c| c.grant.as_ref().map(|g| g.token.clone()))
            .collect();
        let (ApprovalState::Approved, Some(grant)) = (parent.state, &parent.grant) else {
            return; // the person has not answered yet
        };
        if approved.len() < needed {
            return;
        }
        tracing::info!(
            approval_id = family,
            countersigners = approved.len(),
            "countersigned call approved by everyone needed"
        );
        self.forward(&parent, &grant.token, grant.dpop, &approved)
            .await;
        if let Ok(Some(parent)) = self.store.get(family).await {
            self.close_family(&parent).await;
        }
        self.wake(family);
    }

    /// No token of a call that ended is kept: its countersigners' approvals
    /// still open end with it.
    async fn close_family(&self, parent: &Approval) {
        let forwarded = matches!(
            parent.state,
            ApprovalState::Done | ApprovalState::Forwarding | ApprovalState::OutcomeUnknown
        );
        let code = if forwarded {
            ProblemCode::CountersignNotNeeded.as_str().to_owned()
        } else {
            parent
                .problem_code
                .clone()
                .unwrap_or_else(|| ProblemCode::ApprovalFailed.as_str().to_owned())
        };
        let _ = self
            .persist("close the countersign requests", SETTLE_RETRY_FOR, || {
                self.store.close_children(&parent.id, forwarded, &code)
            })
            .await;
    }

    /// Where the countersigned call `id` stands (`None`: not one).
    pub async fn quorum_status(&self, parent: &Approval) -> Option<QuorumStatus> {
        parent.countersign_min?;
        let children = self.store.family(&parent.id).await.ok()?;
        let members = std::iter::once(Member {
            subject: parent.subject.clone(),
            countersigner: false,
            state: parent.state,
        })
        .chain(children.into_iter().map(|c| Member {
            subject: c.subject,
            countersigner: true,
            state: c.state,
        }))
        .collect();
        Some(QuorumStatus { members })
    }
}

/// The refusal among the countersigners' answers, if any: a denial first,
/// then who let the request expire, then a failure.
fn refusal(children: &[Approval]) -> Option<(ApprovalState, &'static str, String)> {
    let with = |state: ApprovalState| children.iter().find(|c| c.state == state);
    if let Some(child) = with(ApprovalState::Denied) {
        let code = child
            .problem_code
            .as_deref()
            .and_then(ProblemCode::parse)
            .unwrap_or(ProblemCode::AccessDenied);
        return Some((
            ApprovalState::Denied,
            code.as_str(),
            format!("denied by {}, a countersigner", child.subject),
        ));
    }
    if let Some(child) = with(ApprovalState::Expired) {
        return Some((
            ApprovalState::Expired,
            ProblemCode::ApprovalExpired.as_str(),
            format!("{}, a countersigner, did not answer in time", child.subject),
        ));
    }
    let child = with(ApprovalState::Failed)?;
    let code = child
        .problem_code
        .as_deref()
        .and_then(ProblemCode::parse)
        .unwrap_or(ProblemCode::ApprovalFailed);
    Some((
        state_for(code),
        code.as_str(),
        format!("the countersign request to {} failed", child.subject),
    ))
}
