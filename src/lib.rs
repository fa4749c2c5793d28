//! Countersign: a reverse proxy that holds an AI agent's API call until the
//! person it acts for approves it over OpenID CIBA, then forwards it with the
//! freshly issued access token.
//!
//! Data flows one way: [`config`] is loaded and validated once, [`policy`]
//! decides what a call needs, [`identity`] says who must approve it, the
//! [`approval`] state machine drives the [`ciba`] client to an outcome, and the
//! [`proxy`] holds the call and forwards or answers with a [`problem`].
//! [`metrics`] observes every step; [`gateway`] wires it all into pingora.
//! [`store`] keeps approvals durable (SQLite, PostgreSQL) across restarts and
//! replicas.
#![forbid(unsafe_code)]
#![warn(rust_2018_idioms, missing_debug_implementations, unreachable_pub)]
#![deny(clippy::dbg_macro)]

pub mod admin;
pub mod approval;
pub mod ciba;
pub mod config;
pub mod decision;
pub mod demo;
pub mod dev;
pub mod dpop;
pub mod drain;
pub mod explain;
pub mod gateway;
pub mod headers;
pub mod identity;
pub mod mcp;
pub mod metrics;
pub mod policy;
pub mod policytest;
pub mod problem;
pub mod proxy;
pub mod readiness;
pub mod reload;
pub mod request;
pub mod route;
pub mod schema;
mod schema_shapes;
pub mod secret;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod traces;
pub mod upstream;
pub mod upstream_tls;

/// A map looked up on every call and filled only from the configuration:
/// foldhash instead of SipHash, whose resistance to hostile keys guards
/// insertions, which never come from a request here.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
