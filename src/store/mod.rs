//! The approval store: durable approvals, so that restarts and replicas lose
//! nothing and nothing is done twice.
//!
//! One trait, [`ApprovalStore`], with three backends: embedded SQLite (the
//! default), PostgreSQL (several gateways sharing one store) and memory
//! (tests). The store only keeps and conditionally changes records; what the
//! states mean is decided by its user. Two operations carry the guarantees:
//!
//! - [`ApprovalStore::insert_or_attach`] makes a retried call attach to the
//!   approval already made for it (one push to the person's phone), race-free
//!   across processes: an `attach_key` column that is `UNIQUE` while set, and
//!   `INSERT ... ON CONFLICT DO NOTHING` followed by a read.
//! - [`ApprovalStore::transition`] is a conditional update; `Approved ->
//!   Forwarding` is the exactly-once claim (a single forward across processes).
//!
//! Times are stored as unix milliseconds. Leases and heartbeats are judged
//! on the store's clock ([`ApprovalStore::now`]: PostgreSQL's own clock,
//! read at every heartbeat), so that a replica whose clock runs ahead cannot
//! take over live work; the store reads that clock for `updated_at`,
//! `decided_at` and lease checks, and takes `now` from its caller elsewhere.
//! Errors never carry bodies, headers or `auth_req_id`s.

mod memory;
mod sql;

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::secret::Redacted;
pub use crate::secret::Secret;

/// Where an approval is in its life. Final states never change again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApprovalState {
    /// Waiting for the person (CIBA polling).
    Pending,
    /// The person approved; the call has not been claimed for forwarding yet.
    Approved,
    Denied,
    Expired,
    /// Ended by an error (authorization server, unreadable token, ...).
    Failed,
    /// Claimed by one forwarder; the upstream's answer is not recorded yet.
    Forwarding,
    /// Forwarded once; the upstream's answer is recorded.
    Done,
    /// The forwarder died between the claim and the answer: the upstream may
    /// have acted, so the call is never sent again.
    OutcomeUnknown,
}

impl ApprovalState {
    pub const ALL: [ApprovalState; 8] = [
        Self::Pending,
        Self::Approved,
        Self::Denied,
        Self::Expired,
        Self::Failed,
        Self::Forwarding,
        Self::Done,
        Self::OutcomeUnknown,
    ];

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

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|state| state.as_str() == s)
    }

    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Denied | Self::Expired | Self::Failed | Self::Done | Self::OutcomeUnknown
        )
    }
}

impl fmt::Display for ApprovalState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The call as it will be forwarded. `Debug` shows header names and the body
/// length only: values may carry credentials.
#[derive(Clone)]
pub struct StoredRequest {
    pub method: String,
    pub path_and_query: String,
    pub headers: Vec<(String, Vec<u8>)>,
    /// Empty once dropped: after the forward, or when the approval is final.
    pub body: Vec<u8>,
}

/// The upstream's answer, replayed to retries. `Debug` shows header names and
/// the body length only.
#[derive(Clone)]
pub struct StoredResponse {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    /// `None`: too large to replay.
    pub body: Option<Vec<u8>>,
}

/// A new approval. `Debug` leaves out the binding message and
/// `authorization_details` (rendered messages are not logged).
#[derive(Clone)]
pub struct NewApproval {
    pub id: String,
    pub policy: String,
    pub subject: String,
    pub upstream: String,
    /// Hex SHA-256 of the call.
    pub fingerprint: String,
    pub idempotency_key: Option<String>,
    pub binding_message: String,
    pub authorization_details: Option<serde_json::Value>,
    pub request: StoredRequest,
    /// Also the "now" against which attachability is judged.
    pub created_at: SystemTime,
    /// Hard deadline of the whole approval.
    pub expires_at: SystemTime,
    /// A countersigner's approval: the call's own (the person's) approval.
    pub parent_id: Option<String>,
    /// A countersigned call's own approval: how many countersigners must
    /// approve besides the person.
    pub countersign_min: Option<u32>,
    /// The W3C `traceparent` of the call's span, when traces are on.
    pub trace_parent: Option<String>,
}

/// The approved access token of a member of a countersigned call, kept
/// until the call is forwarded or refused. `Debug` shows neither.
#[derive(Clone)]
pub struct KeptGrant {
    pub token: Secret,
    /// Bound to the gateway's DPoP key.
    pub dpop: bool,
}

impl fmt::Debug for KeptGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeptGrant")
            .field("token", &Redacted)
            .field("dpop", &self.dpop)
            .finish()
    }
}

/// The CIBA request in flight.
#[derive(Debug, Clone)]
pub struct CibaProgress {
    pub auth_req_id: Secret,
    /// Including `slow_down` growth.
    pub interval: Duration,
    pub next_poll_at: SystemTime,
    pub deadline: SystemTime,
}

/// A stored approval. `Debug` leaves out the binding message and
/// `authorization_details`.
#[derive(Clone)]
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
    /// Stable problem code of a failed/denied/expired/unknown ending, e.g.
    /// `access_denied`.
    pub problem_code: Option<String>,
    pub updated_at: SystemTime,
    /// When it was decided (approved, denied, expired, failed); kept through
    /// forwarding and done.
    pub decided_at: Option<SystemTime>,
    pub lease_owner: Option<String>,
    pub lease_until: Option<SystemTime>,
    /// When the person was asked, or was about to be (recorded before
    /// bc-authorize is sent): an approval with this set and no `ciba` may
    /// have reached the person's phone, so it is never asked again.
    pub asked_at: Option<SystemTime>,
    /// When the recorded answer (of a `Done` approval) was first written in
    /// full and flushed to an agent. Without an `idempotency_key` such an
    /// approval answers no further call ([`ApprovalStore::mark_delivered`]).
    pub delivered_at: Option<SystemTime>,
    /// A countersigner's approval: the call's own approval.
    pub parent_id: Option<String>,
    /// A countersigned call's own approval: countersigners needed.
    pub countersign_min: Option<u32>,
    /// An approved member of a countersigned call: its token, until the
    /// call is forwarded or refused.
    pub grant: Option<KeptGrant>,
    /// The sentence told with `problem_code` ("denied by carol").
    pub problem_detail: Option<String>,
    /// The W3C `traceparent` of the call's span, when traces were on.
    pub trace_parent: Option<String>,
}

/// What a policy in `mode: shadow` would have done with a call (the call
/// itself went on as the enforced policies said). No body, header or token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShadowDecision {
    pub id: String,
    pub policy: String,
    /// Who would have been asked; `None` when the call named nobody.
    pub subject: Option<String>,
    /// `hold`, `pass` or `refuse`.
    pub decision: String,
    pub problem_code: Option<String>,
    /// What the person would have been shown (Debug prints its length).
    pub binding_message: Option<String>,
    pub countersigners: Vec<String>,
    pub method: String,
    pub path: String,
    pub created_at: SystemTime,
}

/// Filters for [`ApprovalStore::list_shadow`]. Results are newest first.
#[derive(Debug, Default, Clone)]
pub struct ShadowFilter {
    pub policy: Option<String>,
    pub subject: Option<String>,
    /// Recorded at or after.
    pub since: Option<SystemTime>,
    pub limit: Option<usize>,
}

/// What [`ApprovalStore::insert_or_attach`] did.
#[derive(Debug)]
pub enum Inserted {
    /// Inserted, leased to the inserting process.
    Created,
    /// An approval the call attaches to.
    Existing(Box<Approval>),
    /// The person already has as many pending approvals as allowed.
    LimitReached,
}

/// The lease a new approval is inserted with, and the per-person limit it
/// is inserted under.
#[derive(Debug, Clone, Copy)]
pub struct InsertTerms<'a> {
    pub replay_window: Duration,
    pub lease_owner: &'a str,
    pub lease_until: SystemTime,
    /// Pending approvals of the same subject there may be at most, this one
    /// included; checked in the statement that inserts.
    pub max_pending: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("approval store unavailable: {0}")]
    Unavailable(String),
    #[error("the Idempotency-Key was used for a different call")]
    KeyReuse,
}

/// Filters for [`ApprovalStore::list`]. Results are newest first.
#[derive(Debug, Default, Clone)]
pub struct ListFilter {
    pub state: Option<ApprovalState>,
    pub policy: Option<String>,
    pub subject: Option<String>,
    /// Created at or after.
    pub since: Option<SystemTime>,
    pub limit: Option<usize>,
}

#[async_trait::async_trait]
pub trait ApprovalStore: Send + Sync + std::fmt::Debug {
    /// Atomically inserts, or returns the approval the call must attach to:
    /// an approval of the same subject whose attach key matches and that is
    /// still attachable (non-final, or final and updated less than
    /// `replay_window` before `approval.created_at` and, unless it has an
    /// idempotency key, its answer not yet delivered). The attach key is
    /// `key:{subject}:{idempotency_key}` when a key is given, else
    /// `fp:{subject}:{fingerprint}`. The same idempotency key with a
    /// different fingerprint is [`StoreError::KeyReuse`]. Race-free across
    /// processes. A new approval is inserted leased to `terms.lease_owner`
    /// (nobody may adopt it before its process asks), and only while its
    /// subject has fewer than `terms.max_pending` pending approvals, atomically
    /// across processes ([`Inserted::LimitReached`]); a call that attaches is
    /// never limited.
    async fn insert_or_attach(
        &self,
        approval: &NewApproval,
        terms: InsertTerms<'_>,
    ) -> Result<Inserted, StoreError>;

    /// The store's clock: the one leases and heartbeats are judged by.
    fn now(&self) -> SystemTime;

    /// Records that `owner` is about to ask the person about `id`: only if it
    /// is pending, never asked, and leased to `owner`. Whether it was
    /// recorded (`false`: do not ask).
    async fn mark_asked(&self, id: &str, owner: &str) -> Result<bool, StoreError>;

    /// Records that the recorded answer of `id` (a `Done` approval) was
    /// written in full to an agent: the first time only (`false` after, or
    /// when not done). Without an idempotency key the approval then answers
    /// no further call, in the same statement (its attach key is cleared),
    /// so the next identical call is a new approval and the person is asked
    /// again; with one, retries keep getting the answer within the replay
    /// window.
    async fn mark_delivered(&self, id: &str) -> Result<bool, StoreError>;

    /// A member of a countersigned call approved: `Pending -> Approved`,
    /// keeping its token until the call is forwarded or refused (another
    /// process may forward it). Whether it happened.
    async fn keep_grant(&self, id: &str, grant: &KeptGrant) -> Result<bool, StoreError>;

    /// The countersigners' approvals of the call `parent_id`, oldest first.
    async fn family(&self, parent_id: &str) -> Result<Vec<Approval>, StoreError>;

    /// Ends a countersigned call's own approval (pending or approved) in the
    /// final state `to`, with the code and the sentence the agent is told;
    /// its kept token is dropped. Whether it happened.
    async fn end_parent(
        &self,
        id: &str,
        to: ApprovalState,
        problem_code: &str,
        detail: &str,
    ) -> Result<bool, StoreError>;

    /// Ends the countersigners' approvals still pending or approved: once
    /// the call was `forwarded`, the approved ones are done; otherwise every
    /// one fails with `problem_code`. Their kept tokens are dropped.
    async fn close_children(
        &self,
        parent_id: &str,
        forwarded: bool,
        problem_code: &str,
    ) -> Result<(), StoreError>;

    /// The exactly-once claim of an approved call: `Pending -> Forwarding`
    /// (`Approved -> Forwarding` for a countersigned call, whose tokens are
    /// kept in the store),
    /// leased to `owner` until `until` (the forward's longest time), whoever
    /// held the lease (the holder of the token is the one that may forward).
    async fn claim(&self, id: &str, owner: &str, until: SystemTime) -> Result<bool, StoreError>;

    /// Hands back `owner`'s leases on pending approvals and ends its
    /// heartbeat, so that another process adopts them at once (shutdown).
    async fn release(&self, owner: &str) -> Result<(), StoreError>;

    async fn get(&self, id: &str) -> Result<Option<Approval>, StoreError>;

    async fn set_ciba(&self, id: &str, ciba: &CibaProgress) -> Result<(), StoreError>;

    /// Conditional state change (the exactly-once claim is `Approved ->
    /// Forwarding`). Returns whether it happened. Sets `decided_at` (if not
    /// yet set) when moving to a final state or `Approved`; records
    /// `problem_code` if given. Moving to a final state releases the lease and
    /// drops the request body.
    async fn transition(
        &self,
        id: &str,
        from: ApprovalState,
        to: ApprovalState,
        problem_code: Option<&str>,
    ) -> Result<bool, StoreError>;

    /// `Forwarding -> Done` with the upstream's answer; drops the stored
    /// request body (no longer needed) and releases the lease.
    async fn finish(&self, id: &str, response: &StoredResponse) -> Result<bool, StoreError>;

    /// Takes or renews the polling lease on a non-final approval if free,
    /// ours, or its holder is gone (neither `lease_until` nor the holder's
    /// [heartbeat](ApprovalStore::heartbeat) is later than now). Returns
    /// whether we hold it. A forwarder must hold the lease while
    /// `Forwarding`: see [`ApprovalStore::mark_unknown_outcomes`].
    async fn lease(&self, id: &str, owner: &str, until: SystemTime) -> Result<bool, StoreError>;

    /// Keeps every lease `owner` holds alive until `alive_until`, in one
    /// write whatever their number: a process polling thousands of
    /// approvals renews them all with this instead of one write per poll.
    async fn heartbeat(&self, owner: &str, alive_until: SystemTime) -> Result<(), StoreError>;

    /// Pending/Approved approvals whose holder is gone (for takeover after a
    /// crash or by another replica), or leased to `mine` (an approval this
    /// process could not carry on after a store error), oldest first, at
    /// most `limit`.
    async fn orphans(
        &self,
        now: SystemTime,
        limit: usize,
        mine: &str,
    ) -> Result<Vec<Approval>, StoreError>;

    /// Forwarding approvals whose holder is gone (or that were never
    /// leased): the forwarder died between claim and answer ->
    /// `OutcomeUnknown` (problem_code `outcome_unknown`). Returns how many.
    async fn mark_unknown_outcomes(&self, now: SystemTime) -> Result<u64, StoreError>;

    /// Housekeeping, in bounded batches (each its own statement, so that a
    /// large sweep never holds SQLite's write lock for long): clear attach
    /// keys, recorded answers and `auth_req_id`s of final approvals updated
    /// `replay_window` or longer before `now` (no retry can need them any
    /// more); delete approvals not updated for `retention` that are final or
    /// whose `expires_at` is that old too; drop request bodies of final
    /// approvals.
    async fn sweep(
        &self,
        now: SystemTime,
        replay_window: Duration,
        retention: Duration,
    ) -> Result<(), StoreError>;

    /// Newest first.
    async fn list(&self, filter: &ListFilter) -> Result<Vec<Approval>, StoreError>;

    /// Records what a shadow policy would have done.
    async fn record_shadow(&self, decision: &ShadowDecision) -> Result<(), StoreError>;

    /// Shadow decisions, newest first. Swept with the approvals' retention.
    async fn list_shadow(&self, filter: &ShadowFilter) -> Result<Vec<ShadowDecision>, StoreError>;

    async fn ping(&self) -> Result<(), StoreError>;
}

/// Opens (creating if missing, and migrating) an SQLite store at `path`:
/// WAL journal, `synchronous = FULL` (a committed claim survives a power
/// loss), a 5 s busy timeout, one writer connection and a few readers.
///
/// Runtimes: every database operation runs on a small tokio runtime the
/// store owns (one worker thread), so the store may be opened on one runtime
/// (e.g. a short-lived one before pingora starts) and used from any other,
/// or from several at once; connections never outlive the runtime that
/// drives them. Open it after any `fork` (pingora's daemon mode), since
/// threads do not survive one.
pub async fn open_sqlite(path: &Path) -> Result<Arc<dyn ApprovalStore>, StoreError> {
    sql::open_sqlite(path).await
}

/// Opens (and migrates, under PostgreSQL's advisory lock, so replicas may
/// start together) a PostgreSQL store from a URL such as
/// `postgres://user@host/db?sslmode=require`. The same runtime rules as
/// [`open_sqlite`] apply: the pool lives on the store's own runtime.
pub async fn open_postgres(url: &str) -> Result<Arc<dyn ApprovalStore>, StoreError> {
    sql::open_postgres(url).await
}

/// A store in memory with the same semantics, for tests.
pub fn memory() -> Arc<dyn ApprovalStore> {
    Arc::new(memory::MemoryStore::default())
}

/// `key:{subject}:{idempotency_key}` or `fp:{subject}:{fingerprint}`.
pub fn attach_key(approval: &NewApproval) -> String {
    match &approval.idempotency_key {
        Some(key) => format!("key:{}:{key}", approval.subject),
        None => format!("fp:{}:{}", approval.subject, approval.fingerprint),
    }
}

/// Whether a retry made at `now_ms` may attach to `existing`: while it is
/// under way; once final, within the replay window, unless its answer was
/// delivered to a call that named no Idempotency-Key (a repeat of that call
/// is a new one, not a retry).
fn attachable(existing: &Approval, now_ms: i64, replay_window: Duration) -> bool {
    if !existing.state.is_final() {
        return true;
    }
    let within_window =
        to_ms(existing.updated_at) > now_ms.saturating_sub(duration_ms(replay_window));
    let replayable = existing.idempotency_key.is_some() || existing.delivered_at.is_none();
    within_window && replayable
}

/// Unix milliseconds, saturating.
fn to_ms(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => duration_ms(d),
        Err(e) => duration_ms(e.duration()).saturating_neg(),
    }
}

fn from_ms(ms: i64) -> SystemTime {
    let d = Duration::from_millis(ms.unsigned_abs());
    if ms >= 0 {
        UNIX_EPOCH.checked_add(d).unwrap_or(UNIX_EPOCH)
    } else {
        UNIX_EPOCH.checked_sub(d).unwrap_or(UNIX_EPOCH)
    }
}

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn now_ms() -> i64 {
    to_ms(SystemTime::now())
}

/// Header names only: values may be credentials.
struct HeaderNames<'a>(&'a [(String, Vec<u8>)]);

impl fmt::Debug for HeaderNames<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(name, _)| name))
            .finish()
    }
}

/// A length instead of the bytes.
struct Len(usize);

impl fmt::Debug for Len {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{} bytes]", self.0)
    }
}

impl fmt::Debug for StoredRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoredRequest")
            .field("method", &self.method)
            .field("path_and_query", &self.path_and_query)
            .field("headers", &HeaderNames(&self.headers))
            .field("body", &Len(self.body.len()))
            .finish()
    }
}

impl fmt::Debug for StoredResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoredResponse")
            .field("status", &self.status)
            .field("headers", &HeaderNames(&self.headers))
            .field("body", &self.body.as_ref().map(|b| Len(b.len())))
            .finish()
    }
}

/// The fields a new approval and a stored one share, shown alike: the
/// binding message by its length, the authorization details not at all.
macro_rules! call_fields {
    ($f:expr, $name:literal, $call:expr) => {
        $f.debug_struct($name)
            .field("id", &$call.id)
            .field("policy", &$call.policy)
            .field("subject", &$call.subject)
            .field("upstream", &$call.upstream)
            .field("fingerprint", &$call.fingerprint)
            .field("idempotency_key", &$call.idempotency_key)
            .field("binding_message", &Len($call.binding_message.len()))
            .field(
                "authorization_details",
                &$call.authorization_details.as_ref().map(|_| Redacted),
            )
            .field("request", &$call.request)
            .field("created_at", &$call.created_at)
            .field("expires_at", &$call.expires_at)
    };
}

impl fmt::Debug for NewApproval {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        call_fields!(f, "NewApproval", self)
            .field("parent_id", &self.parent_id)
            .field("countersign_min", &self.countersign_min)
            .field("trace_parent", &self.trace_parent)
            .finish()
    }
}

impl fmt::Debug for Approval {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        call_fields!(f, "Approval", self)
            .field("state", &self.state)
            .field("ciba", &self.ciba)
            .field("response", &self.response)
            .field("problem_code", &self.problem_code)
            .field("updated_at", &self.updated_at)
            .field("decided_at", &self.decided_at)
            .field("lease_owner", &self.lease_owner)
            .field("lease_until", &self.lease_until)
            .field("asked_at", &self.asked_at)
            .field("delivered_at", &self.delivered_at)
            .field("parent_id", &self.parent_id)
            .field("countersign_min", &self.countersign_min)
            .field("grant", &self.grant)
            .field("problem_detail", &self.problem_detail)
            .field("trace_parent", &self.trace_parent)
            .finish()
    }
}

impl Approval {
    /// The record a new approval starts as.
    fn new(approval: &NewApproval, updated_at: SystemTime) -> Self {
        let a = approval.clone();
        Approval {
            id: a.id,
            policy: a.policy,
            subject: a.subject,
            upstream: a.upstream,
            fingerprint: a.fingerprint,
            idempotency_key: a.idempotency_key,
            binding_message: a.binding_message,
            authorization_details: a.authorization_details,
            request: a.request,
            created_at: a.created_at,
            expires_at: a.expires_at,
            state: ApprovalState::Pending,
            ciba: None,
            response: None,
            problem_code: None,
            updated_at,
            decided_at: None,
            lease_owner: None,
            lease_until: None,
            asked_at: None,
            delivered_at: None,
            parent_id: a.parent_id,
            countersign_min: a.countersign_min,
            grant: None,
            problem_detail: None,
            trace_parent: a.trace_parent,
        }
    }
}

#[cfg(test)]
mod tests;
