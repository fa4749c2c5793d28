//! A call written down (a policy test case, `countersign explain`'s
//! arguments) as the decision's source: its body and identity are given,
//! nothing is read from a network, and every step is kept.

use bytes::Bytes;
use pingora::http::RequestHeader;
use serde_json::Value;

use super::{CallSource, Step};
use crate::config::IdentityConfig;
use crate::identity::{Identity, IdentityError, IdentitySource};
use crate::problem::{Problem, ProblemCode};

/// Who approves a written-down call.
#[derive(Debug, Clone)]
pub enum OfflineIdentity {
    /// These claims (an object with a string `sub`), as a verified JWT
    /// would give them.
    Claims(Value),
    /// As the configuration's `identity:` reads the request: a header or
    /// the static subject. A JWT cannot be verified offline, so under
    /// `identity: { jwt: … }` the call has no identity unless its claims
    /// are given.
    Configured,
}

/// A call with everything the decision reads given up front.
#[derive(Debug)]
pub struct OfflineCall<'a> {
    header: RequestHeader,
    body: Option<Bytes>,
    max_body_bytes: usize,
    identity: OfflineIdentity,
    config: &'a IdentityConfig,
    steps: Vec<Step>,
}

impl<'a> OfflineCall<'a> {
    pub fn new(
        header: RequestHeader,
        body: Option<Bytes>,
        max_body_bytes: usize,
        identity: OfflineIdentity,
        config: &'a IdentityConfig,
    ) -> Self {
        Self {
            header,
            body: body.filter(|b| !b.is_empty()),
            max_body_bytes,
            identity,
            config,
            steps: Vec::new(),
        }
    }

    /// The steps taken, in order.
    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    /// The request as it would be forwarded (its target canonical).
    pub fn request(&self) -> &RequestHeader {
        &self.header
    }
}

impl CallSource for OfflineCall<'_> {
    fn header(&self) -> &RequestHeader {
        &self.header
    }

    fn set_uri(&mut self, uri: http::Uri) {
        self.header.set_uri(uri);
    }

    fn set_host(&mut self, authority: &str) {
        // A parsed authority is always a Host value.
        let _ = self
            .header
            .insert_header(http::header::HOST, authority.to_owned());
    }

    async fn read_body(&mut self) -> Result<Option<Bytes>, Problem> {
        let len = self.body.as_ref().map_or(0, Bytes::len);
        if len > self.max_body_bytes {
            return Err(Problem::new(ProblemCode::BodyTooLarge).with_detail(format!(
                "The request body is larger than the {} bytes this gateway holds for approval.",
                self.max_body_bytes
            )));
        }
        Ok(self.body.clone())
    }

    async fn identify(&mut self, _policy: &str) -> Result<Identity, Problem> {
        let missing =
            |detail: &str| Problem::new(ProblemCode::IdentityRequired).with_detail(detail);
        match (&self.identity, self.config) {
            (OfflineIdentity::Claims(claims), _) => match claims.get("sub") {
                Some(Value::String(sub)) => Ok(Identity {
                    subject: sub.clone(),
                    claims: claims.clone(),
                }),
                _ => Err(missing("The user's claims need a string sub.")),
            },
            (OfflineIdentity::Configured, IdentityConfig::Jwt(_)) => Err(missing(
                "A bearer JWT cannot be verified offline: give the user's claims instead.",
            )),
            (OfflineIdentity::Configured, IdentityConfig::Static(config)) => {
                Ok(Identity::from_subject(&config.subject.0))
            }
            (OfflineIdentity::Configured, IdentityConfig::Header(config)) => {
                let Ok(name) = http::HeaderName::try_from(config.name.as_str()) else {
                    return Err(missing("The identity header's name is not valid."));
                };
                let name_text = name.to_string();
                match IdentitySource::Header(name).identify(&self.header).await {
                    Ok(identity) => Ok(identity),
                    Err(IdentityError::Invalid(_)) => Err(missing(&format!(
                        "The {name_text} header that names the user must be sent once."
                    ))),
                    Err(_) => Err(Problem::new(ProblemCode::IdentityRequired)),
                }
            }
        }
    }

    fn note(&mut self, step: impl FnOnce() -> Step) {
        self.steps.push(step());
    }
}

/// What a written-down call got, with every step on the way.
#[derive(Debug)]
pub struct Decided {
    pub result: Result<super::Decision, super::Refusal>,
    /// The policy the call fell under, whatever it got.
    pub policy: Option<String>,
    pub steps: Vec<Step>,
    /// The request as it would be forwarded (its target canonical).
    pub request: RequestHeader,
}

/// Decides `call` against a loaded configuration, as the proxy would.
/// Nothing here waits on anything: the runtime only drives the decision's
/// future, whose body and identity are already at hand.
pub fn decide(config: &crate::config::Config, mut call: OfflineCall<'_>) -> Decided {
    let gate = super::Gate {
        policies: &config.policies,
        routes: &config.routes,
        upstreams: &config.gateway.upstreams,
        default_action: config.gateway.default_action,
        approvals_path: &config.gateway.approvals_path.0,
    };
    let mut facts = super::Facts::default();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime without I/O builds");
    let result = runtime.block_on(super::decide(&gate, &mut call, &mut facts));
    Decided {
        result,
        policy: facts.policy,
        steps: call.steps,
        request: call.header,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::decision::{Decision, Refusal};

    use crate::config::TEST_CONFIG as CONFIG;

    const POLICIES: &str = r#"
policies:
  - name: transfer
    match: { methods: [POST], path: /transfers }
    when: "body.amount > 500"
    require: { scopes: [pay] }
    binding_message: "Transfer {{amount}}"
"#;

    fn decided(method: &str, target: &str, body: Option<&str>) -> Decided {
        let config = crate::config::load_embedded(
            Path::new("gateway.yaml"),
            CONFIG,
            &[(Path::new("p.yaml"), POLICIES)],
        )
        .unwrap();
        let mut header = RequestHeader::build(method, target.as_bytes(), None).unwrap();
        header.append_header("host", "shop.example").unwrap();
        header
            .append_header("content-type", "application/json")
            .unwrap();
        let call = OfflineCall::new(
            header,
            body.map(|b| Bytes::from(b.to_owned())),
            1024,
            OfflineIdentity::Configured,
            &config.gateway.identity,
        );
        decide(&config, call)
    }

    #[test]
    fn a_held_call_is_rendered_with_its_steps() {
        let d = decided("POST", "/transfers", Some(r#"{"amount": 700}"#));
        let Ok(Decision::Held(call)) = &d.result else {
            panic!("{:?}", d.result)
        };
        assert_eq!(call.rendered.binding_message, "Transfer 700");
        assert_eq!(call.identity.subject, "alice");
        assert!(d.steps.contains(&Step::Condition {
            policy: "transfer".into(),
            when: "body.amount > 500".into(),
            holds: true
        }));
    }

    #[test]
    fn a_condition_that_lets_go_passes_and_an_unmatched_call_follows_the_default() {
        let d = decided("POST", "/transfers", Some(r#"{"amount": 7}"#));
        assert!(matches!(d.result, Ok(Decision::Pass)));
        assert_eq!(d.policy.as_deref(), Some("transfer"));
        let d = decided("GET", "/other", None);
        assert!(matches!(d.result, Ok(Decision::Pass)));
        assert!(d.steps.contains(&Step::Unmatched {
            default_action: crate::config::DefaultAction::Pass
        }));
    }

    #[test]
    fn a_body_over_the_limit_is_refused() {
        let big = format!(r#"{{"amount": 700, "pad": "{}"}}"#, "x".repeat(2000));
        let d = decided("POST", "/transfers", Some(&big));
        assert!(
            matches!(&d.result, Err(Refusal::Problem(p)) if p.code == "body_too_large"),
            "{:?}",
            d.result
        );
    }
}
