//! RFC 9457 `application/problem+json` answers to the agent.
//!
//! Every refusal the gateway makes carries a stable `code` an agent can branch
//! on and a `detail` sentence an LLM can relay to the person as it is.

use serde::Serialize;

/// Why the gateway answered instead of the upstream. The wire `code` of each
/// variant is part of the public contract: never rename one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProblemCode {
    AccessDenied,
    ApprovalExpired,
    IdentityRequired,
    UnknownUser,
    InvalidBindingMessage,
    BodyTooLarge,
    InvalidBody,
    InvalidQuery,
    InvalidPath,
    MethodOverrideRefused,
    AuthorizationServerUnavailable,
    UpstreamUnavailable,
    NoPolicy,
    NoRoute,
    ApprovalFailed,
    TooManyPending,
    /// One person already has as many approvals pending as they may.
    TooManyPendingForUser,
    InvalidHost,
    PathOverrideRefused,
    /// The call routes to an upstream its policy's token may not be sent to.
    UpstreamNotAllowed,
    UpgradeRefused,
    ApprovalStoreUnavailable,
    IdempotencyKeyReused,
    /// The gateway forwarded the call but cannot say what the API answered.
    OutcomeUnknown,
    /// The API answered more than the gateway records for replay.
    ResponseNotRecorded,
    /// A policy's `when` could not be evaluated for the call (fail closed).
    ConditionFailed,
    /// No condition of the call's route took it, and the route says
    /// `otherwise: deny`.
    PolicyDenied,
    /// A value the person is shown is also given in another part of the call.
    AmbiguousParameter,
    /// The gateway is stopping; a held call's approval stays pending.
    ShuttingDown,
    /// A POST on an MCP endpoint that cannot be read one way only.
    InvalidMcpMessage,
    /// A JSON-RPC batch that calls a held tool.
    McpBatchRefused,
    /// `Mcp-Method` / `Mcp-Name` headers that disagree with the body.
    McpHeaderMismatch,
    /// A tool name equal to a held tool's only ignoring letter case.
    McpToolNameCase,
    /// The client cancelled the held call (`notifications/cancelled`).
    ApprovalCancelled,
    /// The person approved, but the token lacks a scope the policy needs.
    ScopeNotGranted,
    /// The gateway stopped (or lost its store) between asking the person and
    /// recording the request, or between the server's answer and its record:
    /// it cannot learn the answer, and never asks twice.
    ApprovalInterrupted,
    /// The token issued for a `bind: call` approval does not name the call
    /// (docs/call-binding.md): the authorization server dropped or changed
    /// the binding, so the call is not forwarded.
    TokenUnbound,
    /// A countersigned call whose policy names fewer countersigners (the
    /// person excluded) than it needs: nobody is asked.
    CountersignersUnavailable,
    /// A countersigned call's quorum was reached without this
    /// countersigner's answer (audit trail only).
    CountersignNotNeeded,
}

impl ProblemCode {
    const ALL: [Self; 39] = [
        Self::AccessDenied,
        Self::ApprovalExpired,
        Self::IdentityRequired,
        Self::UnknownUser,
        Self::InvalidBindingMessage,
        Self::BodyTooLarge,
        Self::InvalidBody,
        Self::InvalidQuery,
        Self::InvalidPath,
        Self::MethodOverrideRefused,
        Self::AuthorizationServerUnavailable,
        Self::UpstreamUnavailable,
        Self::NoPolicy,
        Self::NoRoute,
        Self::ApprovalFailed,
        Self::TooManyPending,
        Self::TooManyPendingForUser,
        Self::InvalidHost,
        Self::PathOverrideRefused,
        Self::UpstreamNotAllowed,
        Self::UpgradeRefused,
        Self::ApprovalStoreUnavailable,
        Self::IdempotencyKeyReused,
        Self::OutcomeUnknown,
        Self::ResponseNotRecorded,
        Self::ConditionFailed,
        Self::PolicyDenied,
        Self::AmbiguousParameter,
        Self::ShuttingDown,
        Self::InvalidMcpMessage,
        Self::McpBatchRefused,
        Self::McpHeaderMismatch,
        Self::McpToolNameCase,
        Self::ApprovalCancelled,
        Self::ScopeNotGranted,
        Self::ApprovalInterrupted,
        Self::TokenUnbound,
        Self::CountersignersUnavailable,
        Self::CountersignNotNeeded,
    ];

    /// The code whose wire name is `code` (the first, for a shared name).
    pub fn parse(code: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == code)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::AccessDenied => "access_denied",
            Self::ApprovalExpired => "approval_expired",
            Self::IdentityRequired => "identity_required",
            Self::UnknownUser => "unknown_user",
            Self::InvalidBindingMessage => "invalid_binding_message",
            Self::BodyTooLarge => "body_too_large",
            Self::InvalidBody => "invalid_body",
            Self::InvalidQuery => "invalid_query",
            Self::InvalidPath => "invalid_path",
            Self::MethodOverrideRefused => "method_override_refused",
            Self::AuthorizationServerUnavailable => "authorization_server_unavailable",
            Self::UpstreamUnavailable => "upstream_unavailable",
            Self::NoPolicy => "no_policy",
            Self::NoRoute => "no_route",
            Self::ApprovalFailed => "approval_failed",
            Self::TooManyPending | Self::TooManyPendingForUser => "too_many_pending_approvals",
            Self::InvalidHost => "invalid_host",
            Self::PathOverrideRefused => "path_override_refused",
            Self::UpstreamNotAllowed => "upstream_not_allowed",
            Self::UpgradeRefused => "upgrade_refused",
            Self::ApprovalStoreUnavailable => "approval_store_unavailable",
            Self::IdempotencyKeyReused => "idempotency_key_reused",
            Self::OutcomeUnknown => "outcome_unknown",
            Self::ResponseNotRecorded => "response_not_recorded",
            Self::ConditionFailed => "condition_failed",
            Self::PolicyDenied => "policy_denied",
            Self::AmbiguousParameter => "ambiguous_parameter",
            Self::ShuttingDown => "shutting_down",
            Self::InvalidMcpMessage => "invalid_mcp_message",
            Self::McpBatchRefused => "mcp_batch_refused",
            Self::McpHeaderMismatch => "mcp_header_mismatch",
            Self::McpToolNameCase => "mcp_tool_name_case",
            Self::ApprovalCancelled => "approval_cancelled",
            Self::ApprovalInterrupted => "approval_interrupted",
            Self::TokenUnbound => "token_unbound",
            Self::CountersignersUnavailable => "countersigners_unavailable",
            Self::CountersignNotNeeded => "countersign_not_needed",
            Self::ScopeNotGranted => "scope_not_granted",
        }
    }

    pub fn status(self) -> u16 {
        match self {
            Self::AccessDenied
            | Self::NoPolicy
            | Self::UpstreamNotAllowed
            | Self::PolicyDenied
            | Self::CountersignersUnavailable
            | Self::CountersignNotNeeded
            | Self::ScopeNotGranted => 403,
            Self::ApprovalExpired => 408,
            Self::IdentityRequired => 401,
            Self::UnknownUser
            | Self::InvalidBindingMessage
            | Self::InvalidBody
            | Self::InvalidQuery
            | Self::InvalidPath
            | Self::MethodOverrideRefused
            | Self::InvalidHost
            | Self::PathOverrideRefused
            | Self::UpgradeRefused
            | Self::AmbiguousParameter
            | Self::InvalidMcpMessage
            | Self::McpBatchRefused
            | Self::McpHeaderMismatch
            | Self::McpToolNameCase => 400,
            Self::ApprovalCancelled => 409,
            Self::TooManyPendingForUser => 429,
            Self::BodyTooLarge => 413,
            Self::AuthorizationServerUnavailable | Self::TooManyPending => 503,
            Self::UpstreamUnavailable
            | Self::ApprovalFailed
            | Self::ApprovalInterrupted
            | Self::TokenUnbound
            | Self::OutcomeUnknown
            | Self::ResponseNotRecorded => 502,
            Self::ApprovalStoreUnavailable | Self::ShuttingDown => 503,
            Self::IdempotencyKeyReused | Self::ConditionFailed => 422,
            Self::NoRoute => 404,
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Self::AccessDenied => "Denied by the user",
            Self::ApprovalExpired => "Approval expired",
            Self::IdentityRequired => "Identity required",
            Self::UnknownUser => "Unknown user",
            Self::InvalidBindingMessage => "Invalid binding message",
            Self::BodyTooLarge => "Body too large",
            Self::InvalidBody => "Invalid body",
            Self::InvalidQuery => "Invalid query",
            Self::InvalidPath => "Invalid path",
            Self::MethodOverrideRefused => "Method override refused",
            Self::AuthorizationServerUnavailable => "Authorization server unavailable",
            Self::UpstreamUnavailable => "Upstream unavailable",
            Self::NoPolicy => "No policy allows this call",
            Self::NoRoute => "No route",
            Self::ApprovalFailed => "Approval failed",
            Self::TooManyPending | Self::TooManyPendingForUser => "Too many pending approvals",
            Self::InvalidHost => "Invalid host",
            Self::PathOverrideRefused => "Path override refused",
            Self::UpstreamNotAllowed => "Upstream not allowed for this policy",
            Self::UpgradeRefused => "Protocol upgrade refused",
            Self::ApprovalStoreUnavailable => "Approval store unavailable",
            Self::IdempotencyKeyReused => "Idempotency key reused",
            Self::OutcomeUnknown => "Outcome unknown",
            Self::ResponseNotRecorded => "Response not recorded",
            Self::ConditionFailed => "Policy condition failed",
            Self::PolicyDenied => "Refused by policy",
            Self::AmbiguousParameter => "Ambiguous parameter",
            Self::ShuttingDown => "Shutting down",
            Self::InvalidMcpMessage => "Invalid MCP message",
            Self::McpBatchRefused => "MCP batch refused",
            Self::McpHeaderMismatch => "MCP headers disagree with the message",
            Self::McpToolNameCase => "MCP tool name in another letter case",
            Self::ApprovalCancelled => "Cancelled by the client",
            Self::ApprovalInterrupted => "Approval interrupted",
            Self::TokenUnbound => "Token not bound to the call",
            Self::CountersignersUnavailable => "Not enough countersigners",
            Self::CountersignNotNeeded => "Countersignature not needed",
            Self::ScopeNotGranted => "Approved without a required permission",
        }
    }

    /// The default sentence for the agent; call sites may give a sharper one.
    pub fn default_detail(self) -> &'static str {
        match self {
            Self::AccessDenied => "The user has denied the request.",
            Self::ApprovalExpired => {
                "The user did not answer the approval request in time; the request was not made."
            }
            Self::IdentityRequired => {
                "This call needs the approval of a user, but the request does not say which user."
            }
            Self::UnknownUser => {
                "The authorization server does not know the user who must approve this call."
            }
            Self::InvalidBindingMessage => {
                "The approval message for this call could not be shown to the user."
            }
            Self::BodyTooLarge => "The request body is larger than this gateway accepts.",
            Self::InvalidBody => "The request body is not valid for this call.",
            Self::InvalidQuery => "The query string is not valid for this call.",
            Self::InvalidPath => "The request path is malformed or ambiguous.",
            Self::MethodOverrideRefused => {
                "Method override headers and parameters (such as X-HTTP-Method-Override or _method) are not accepted; send the real HTTP method."
            }
            Self::AuthorizationServerUnavailable => {
                "The authorization server could not be reached; try again later."
            }
            Self::UpstreamUnavailable => "The API behind the gateway could not be reached.",
            Self::NoPolicy => "No policy allows this call, so the gateway refused it.",
            Self::NoRoute => "No upstream is configured for this host and path.",
            Self::ApprovalFailed => "The approval could not be completed.",
            Self::ApprovalInterrupted => {
                "The gateway was interrupted while asking the user, so it cannot learn their answer; the call was not made, and the user may have seen a request that now has no effect. A retry of the same call gets this answer during the replay window; to ask again, send it with a new Idempotency-Key."
            }
            Self::TooManyPending => {
                "The gateway is holding as many calls as it may; try again later."
            }
            Self::TooManyPendingForUser => {
                "The user already has as many approval requests waiting as the gateway sends; wait for them to answer, then try again."
            }
            Self::InvalidHost => {
                "The Host of the request is missing, repeated, malformed or disagrees with the request target."
            }
            Self::PathOverrideRefused => {
                "Headers that override the request path (such as X-Original-URL) are not accepted; send the real path."
            }
            Self::ApprovalStoreUnavailable => {
                "The gateway cannot record approvals right now, so it cannot ask the user; try again later."
            }
            Self::IdempotencyKeyReused => {
                "This Idempotency-Key was already used for a different call; use a new key for a new call."
            }
            Self::OutcomeUnknown => {
                "The approved call was sent to the API, but the gateway stopped before it learned the answer; it will not be sent again. Check with the API whether it was done."
            }
            Self::ResponseNotRecorded => {
                "The approved call was made, but the API's answer was too large for the gateway to keep; it will not be sent again."
            }
            Self::UpgradeRefused => {
                "This gateway does not relay protocol upgrades (WebSocket, h2c) to this API."
            }
            Self::ShuttingDown => {
                "The gateway is restarting. The approval request stays open; send the same call again in a few seconds to get its answer."
            }
            Self::AmbiguousParameter => {
                "A value the approval shows is also given in another part of the call (query, body, path or cookie); give it once."
            }
            Self::UpstreamNotAllowed => {
                "This call routes to an API its policy does not allow the approval to be sent to, so the gateway refused it."
            }
            Self::ConditionFailed => {
                "The policy's condition could not be evaluated for this call, so the gateway refused it rather than let it through."
            }
            Self::PolicyDenied => {
                "A policy refuses this call outright; no approval can allow it."
            }
            Self::InvalidMcpMessage => {
                "The MCP message cannot be read one way only, so the gateway refused it."
            }
            Self::McpBatchRefused => {
                "A JSON-RPC batch that calls a tool needing approval is refused; send each tools/call on its own."
            }
            Self::McpHeaderMismatch => {
                "An Mcp-Method, Mcp-Name or Mcp-Param-* header disagrees with the message, so the call was refused."
            }
            Self::McpToolNameCase => {
                "The tool name differs from a tool that needs approval only in letter case; call the tool by its exact name."
            }
            Self::CountersignersUnavailable => {
                "This call needs countersigners besides the user, and its policy names too few for this user; nobody was asked. The gateway's operator must name more countersigners."
            }
            Self::CountersignNotNeeded => {
                "Enough other countersigners approved the call before this one answered."
            }
            Self::TokenUnbound => {
                "The user approved, but the authorization server issued a token that does not name this exact call, so the request was not made. The gateway's operator must configure the authorization server to copy authorization_details into access tokens."
            }
            Self::ScopeNotGranted => {
                "The user approved, but did not grant every permission this call needs, so the request was not made. Ask again and have the user grant all that is asked."
            }
            Self::ApprovalCancelled => {
                "The call was cancelled before the user approved it; it was not made."
            }
        }
    }
}

/// One problem document, ready to serialise.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    #[serde(rename = "type")]
    pub type_uri: String,
    pub title: &'static str,
    pub status: u16,
    pub code: &'static str,
    /// `code` as its variant.
    #[serde(skip)]
    pub kind: ProblemCode,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval_id: Option<String>,
    /// Seconds after which a retry may succeed (also sent as `Retry-After`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
}

impl Problem {
    pub fn new(code: ProblemCode) -> Self {
        Self {
            type_uri: format!("urn:countersign:problem:{}", code.as_str()),
            title: code.title(),
            status: code.status(),
            code: code.as_str(),
            kind: code,
            detail: code.default_detail().to_owned(),
            approval_id: None,
            retry_after: None,
        }
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = detail.into();
        self
    }

    pub fn with_approval_id(mut self, id: impl Into<String>) -> Self {
        self.approval_id = Some(id.into());
        self
    }

    pub fn with_retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    pub fn code(&self) -> &'static str {
        self.code
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Serialising a struct of strings and integers cannot fail.
        serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec())
    }
}

pub const CONTENT_TYPE: &str = "application/problem+json";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denied_reads_as_the_sentence_agents_relay() {
        let body: serde_json::Value =
            serde_json::from_slice(&Problem::new(ProblemCode::AccessDenied).to_json()).unwrap();
        assert_eq!(body["status"], 403);
        assert_eq!(body["code"], "access_denied");
        assert_eq!(body["detail"], "The user has denied the request.");
        assert_eq!(body["type"], "urn:countersign:problem:access_denied");
    }

    #[test]
    fn expired_is_distinct_from_denied() {
        let expired = Problem::new(ProblemCode::ApprovalExpired);
        assert_ne!(expired.status, 403);
        assert_eq!(expired.code(), "approval_expired");
    }
}
