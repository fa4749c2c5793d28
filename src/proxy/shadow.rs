//! Shadow mode: after the enforced policies decided a call (it passes, or
//! is held), the policies in `mode: shadow` decide it too, through the same
//! decision, and what they would have done is counted and kept in the store
//! (`shadow_decisions`). Nothing of it reaches the call: no refusal, no
//! push, no token, no change to the request.

use std::time::SystemTime;

use bytes::Bytes;
use pingora::http::RequestHeader;
use pingora::proxy::Session;

use super::{hold, Countersign};
use crate::decision::{self, CallSource, Decision, Facts, Gate};
use crate::identity::Identity;
use crate::policy::PolicySet;
use crate::problem::{Problem, ProblemCode};
use crate::store::ShadowDecision;

/// The call as the shadow policies read it: the body the enforced decision
/// read (or, when it read none, the body only if reading it cannot change
/// what is forwarded), the identity asked again.
struct ShadowCall<'a> {
    gateway: &'a Countersign,
    session: &'a mut Session,
    body: Option<Option<Bytes>>,
}

impl CallSource for ShadowCall<'_> {
    fn header(&self) -> &RequestHeader {
        self.session.req_header()
    }

    /// The enforced decision already set the canonical target.
    fn set_uri(&mut self, _uri: http::Uri) {}

    /// The enforced decision already set the Host.
    fn set_host(&mut self, _authority: &str) {}

    async fn read_body(&mut self) -> Result<Option<Bytes>, Problem> {
        if let Some(body) = &self.body {
            return Ok(body.clone());
        }
        // Reading a body larger than the limit would cut what the upstream
        // gets: only a body declared small enough is read.
        let limit = self.gateway.limits.max_body_bytes;
        let declared = hold::declared_length(self.session);
        let chunked = self
            .session
            .req_header()
            .headers
            .contains_key(http::header::TRANSFER_ENCODING);
        match declared {
            Some(length) if length <= limit && !chunked => {
                let body = hold::read_body(self.session, limit).await?;
                self.body = Some(body.clone());
                Ok(body)
            }
            _ => Err(Problem::new(ProblemCode::BodyTooLarge).with_detail(UNREAD)),
        }
    }

    async fn identify(&mut self, policy: &str) -> Result<Identity, Problem> {
        self.gateway.identify(self.session, policy).await
    }

    fn agent(&self) -> serde_json::Value {
        super::decide::agent_certificate(self.session)
    }
}

/// The detail of the refusal a shadow decision gets when it would need a
/// body that was not read for it.
const UNREAD: &str = "shadow: body not read";

impl Countersign {
    /// What the shadow policies would do with the call the enforced ones
    /// let pass (`body: None`: not read) or held (`Some`: the body read).
    pub(super) async fn shadow_decide(
        &self,
        shadow: &PolicySet,
        session: &mut Session,
        body: Option<Option<Bytes>>,
    ) {
        let gate = Gate {
            policies: shadow,
            routes: &self.routes,
            upstreams: &self.upstreams,
            default_action: crate::config::DefaultAction::Pass,
            approvals_path: &self.approvals_path,
        };
        let mut facts = Facts::default();
        let mut call = ShadowCall {
            gateway: self,
            session,
            body,
        };
        let decided = decision::decide(&gate, &mut call, &mut facts).await;
        // No shadow policy matched: nothing to record.
        let Some(policy) = facts.policy else {
            return;
        };
        let header = call.session.req_header();
        let mut record = ShadowDecision {
            id: uuid::Uuid::new_v4().to_string(),
            policy,
            subject: None,
            decision: String::new(),
            problem_code: None,
            binding_message: None,
            countersigners: Vec::new(),
            method: header.method.as_str().to_owned(),
            path: header.uri.path().to_owned(),
            created_at: SystemTime::now(),
        };
        record.decision = match decided {
            Ok(Decision::Held(held)) => {
                record.subject = Some(held.identity.subject);
                record.binding_message = Some(held.rendered.binding_message);
                record.countersigners = held
                    .rendered
                    .countersigners
                    .map(|c| c.subjects)
                    .unwrap_or_default();
                "hold"
            }
            Ok(_) => "pass",
            Err(refusal) if refusal.detail() == UNREAD => {
                self.metrics
                    .shadow_decisions
                    .with_label_values(&[&record.policy, "unread"])
                    .inc();
                return;
            }
            Err(refusal) => {
                record.problem_code = Some(refusal.code().as_str().to_owned());
                "refuse"
            }
        }
        .to_owned();
        self.metrics
            .shadow_decisions
            .with_label_values(&[&record.policy, &record.decision])
            .inc();
        tracing::info!(
            policy = %record.policy,
            decision = %record.decision,
            subject = record.subject.as_deref().unwrap_or(""),
            "shadow policy decided; nobody was asked"
        );
        // Off the call's path: the call does not wait for the record.
        let store = self.engine.store().clone();
        self.engine.spawn(async move {
            if let Err(error) = store.record_shadow(&record).await {
                tracing::warn!(%error, policy = %record.policy, "could not record a shadow decision");
            }
        });
    }
}
