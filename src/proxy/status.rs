//! The status resource of an approval, `<approvals_path>/<id>`, on the proxy
//! listener: readable only by the person the approval belongs to.

use pingora::proxy::Session;

use super::{CallCtx, Countersign, JsonReply, Reply};
use crate::problem::{Problem, ProblemCode};
use crate::store::Approval;

impl Countersign {
    pub(super) async fn approval_status(
        &self,
        session: &Session,
        ctx: &mut CallCtx,
        id: &str,
    ) -> Reply {
        ctx.outcome = super::CallOutcome::Status;
        if session.req_header().method != http::Method::GET {
            return Problem::new(ProblemCode::NoRoute)
                .with_detail("Approval status resources are read with GET.")
                .into();
        }
        let identity = match self.identify(session, "status").await {
            Ok(identity) => identity,
            Err(reply) => return reply.into(),
        };
        let not_found = || {
            Reply::from(
                Problem::new(ProblemCode::NoRoute)
                    .with_detail("There is no approval with this id for this user."),
            )
        };
        if id.is_empty() || id.contains('/') {
            return not_found();
        }
        match self.engine.store().get(id).await {
            Ok(Some(approval)) if approval.subject == identity.subject => {
                let mut body = status_body(&approval);
                if let Some(quorum) = self.engine.quorum_status(&approval).await {
                    body["approvers"] = super::hold::approvers(&quorum);
                }
                Reply::Json(Box::new(JsonReply {
                    status: 200,
                    body,
                    retry_after: None,
                    location: None,
                }))
            }
            Ok(_) => not_found(),
            Err(error) => super::hold::store_problem(error),
        }
    }
}

fn millis(at: std::time::SystemTime) -> u64 {
    at.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn status_body(approval: &Approval) -> serde_json::Value {
    serde_json::json!({
        "approval_id": approval.id,
        "state": approval.state.as_str(),
        "policy": approval.policy,
        "binding_message": approval.binding_message,
        "created_at_ms": millis(approval.created_at),
        "decided_at_ms": approval.decided_at.map(millis),
        "problem_code": approval.problem_code,
        "problem_detail": approval.problem_detail,
        "response_status": approval.response.as_ref().map(|r| r.status),
        // When the upstream's answer first reached an agent in full; null
        // while it has not (a retry gets it).
        "delivered_at_ms": approval.delivered_at.map(millis),
    })
}
