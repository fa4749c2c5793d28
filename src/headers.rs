//! The headers the gateway owns on a forwarded call, below both the proxy
//! (pass-through and answers) and the approval engine (approved calls), so
//! neither imports the other for them.

/// Header naming the approval, on the forwarded call and on every answer.
/// Every `x-countersign-*` header the agent sends is removed before
/// forwarding: upstreams may trust them.
pub const APPROVAL_ID_HEADER: &str = "x-countersign-approval-id";

/// Headers only the gateway may set on a forwarded call.
pub const GATEWAY_HEADER_PREFIX: &str = "x-countersign-";

/// The countersigners' tokens of a countersigned call (docs/call-binding.md,
/// "Countersigned calls"); only the gateway sets it, like the prefix above.
pub const COUNTERSIGN_TOKENS_HEADER: &str = "countersign-tokens";

/// The W3C trace context: read from the agent, and set to the gateway's
/// `forward` span on a forwarded call when traces are on (`traces.rs`).
pub const TRACEPARENT_HEADER: &str = "traceparent";
