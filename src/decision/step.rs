//! The steps of a decision as `countersign explain` prints them and
//! `countersign test --coverage` counts them. Built only for a source that
//! keeps them, never on the proxy's path.

use std::fmt;

use serde_json::Value;

use crate::config::DefaultAction;
use crate::policy::countersign::Countersigners;
use crate::policy::{Bind, Otherwise, Policy, PolicyMatch, RenderedRequest};
use crate::request::CanonicalRequest;

/// One step the gateway took deciding a call.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// The canonical request: what is matched and forwarded.
    Canonical {
        method: String,
        /// The origin-form target forwarded (path and query).
        target: String,
        host: String,
        /// The received target differed and is rewritten.
        rewritten: bool,
    },
    Route {
        upstream: String,
        url: String,
    },
    /// A request on an MCP endpoint that passes untouched.
    McpPass {
        endpoint: String,
        why: String,
    },
    /// A `tools/call` of a held tool.
    McpTool {
        endpoint: String,
        tool: String,
        policy: String,
    },
    /// No policy covers the call.
    Unmatched {
        default_action: DefaultAction,
    },
    /// The route of policies the call falls under, in the order tried.
    Matched {
        methods: Vec<String>,
        path: String,
        candidates: Vec<String>,
        params: Vec<(String, String)>,
    },
    Identity {
        subject: String,
    },
    /// A policy's `when`, evaluated.
    Condition {
        policy: String,
        when: String,
        holds: bool,
    },
    /// No condition of the route took the call: its last policy's
    /// `otherwise` applies.
    Otherwise {
        policy: String,
        otherwise: Otherwise,
    },
    /// The policy whose approval the call needs.
    Chosen {
        policy: String,
    },
    /// What the person would be asked.
    Rendered {
        policy: String,
        binding_message: String,
        authorization_details: Option<Value>,
        /// `bind: call`: the call's binding entry is added when it is held.
        bound: bool,
        /// Four eyes: who else is asked, how many must approve, and what.
        countersigners: Option<Countersigners>,
    },
}

impl Step {
    pub(super) fn canonical(method: &str, request: &CanonicalRequest) -> Self {
        let target = match &request.query {
            Some(query) => format!("{}?{query}", request.path.forward),
            None => request.path.forward.clone(),
        };
        Self::Canonical {
            method: method.to_owned(),
            target,
            host: request.host.clone(),
            rewritten: request.rewrite.is_some(),
        }
    }

    pub(super) fn matched(found: &PolicyMatch<'_>) -> Self {
        Self::Matched {
            methods: found.policy.methods.clone(),
            path: found.policy.path_template.clone(),
            candidates: found.candidates.iter().map(|p| p.name.clone()).collect(),
            params: found.params.clone(),
        }
    }

    pub(super) fn condition(policy: &Policy, holds: bool) -> Self {
        Self::Condition {
            policy: policy.name.clone(),
            when: policy
                .condition
                .as_ref()
                .map(|c| c.source().to_owned())
                .unwrap_or_default(),
            holds,
        }
    }

    pub(super) fn rendered(policy: &Policy, rendered: &RenderedRequest) -> Self {
        Self::Rendered {
            policy: policy.name.clone(),
            binding_message: rendered.binding_message.clone(),
            authorization_details: rendered.authorization_details.clone(),
            bound: policy.bind == Bind::Call,
            countersigners: rendered.countersigners.clone(),
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Canonical {
                method,
                target,
                host,
                rewritten,
            } => {
                write!(f, "canonical request: {method} {target}, host {host}")?;
                if *rewritten {
                    f.write_str(" (the target is rewritten to this before it is forwarded)")?;
                }
                Ok(())
            }
            Self::Route { upstream, url } => write!(f, "route: upstream {upstream} ({url})"),
            Self::McpPass { endpoint, why } => {
                write!(f, "MCP endpoint {endpoint}: passes untouched: {why}")
            }
            Self::McpTool {
                endpoint,
                tool,
                policy,
            } => write!(
                f,
                "MCP endpoint {endpoint}: tools/call of {tool}, held by policy {policy}"
            ),
            Self::Unmatched { default_action } => match default_action {
                DefaultAction::Pass => {
                    f.write_str("no policy covers this call: default_action pass")
                }
                DefaultAction::Deny => {
                    f.write_str("no policy covers this call: default_action deny")
                }
            },
            Self::Matched {
                methods,
                path,
                candidates,
                params,
            } => {
                write!(
                    f,
                    "policy route: {} {path}, policies in order: {}",
                    methods.join(","),
                    candidates.join(", ")
                )?;
                if !params.is_empty() {
                    let params: Vec<String> =
                        params.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
                    write!(f, " (path parameters {})", params.join(", "))?;
                }
                Ok(())
            }
            Self::Identity { subject } => write!(f, "identity: {subject}"),
            Self::Condition {
                policy,
                when,
                holds,
            } => write!(f, "policy {policy}: when {when} -> {holds}"),
            Self::Otherwise { policy, otherwise } => write!(
                f,
                "no condition took the call: the last policy {policy} says otherwise: {}",
                match otherwise {
                    Otherwise::Pass => "pass",
                    Otherwise::Deny => "deny",
                }
            ),
            Self::Chosen { policy } => write!(f, "policy {policy} applies"),
            Self::Rendered {
                binding_message,
                authorization_details,
                bound,
                countersigners,
                ..
            } => {
                write!(f, "binding message: {binding_message:?}")?;
                if let Some(details) = authorization_details {
                    write!(f, "\nauthorization_details: {details}")?;
                }
                if *bound {
                    f.write_str("\nbind: call: a countersign_call entry (approval id, method, target, host, body_sha256) is added to authorization_details when the call is held")?;
                }
                if let Some(c) = countersigners {
                    write!(
                        f,
                        "\ncountersign: {} of {} must approve too (never the person), each asked {:?}",
                        c.min,
                        c.subjects.join(", "),
                        c.binding_message
                    )?;
                }
                Ok(())
            }
        }
    }
}
