//! The development authorization server's CIBA state machine, kept apart from
//! HTTP so its rules (polling discipline, expiry, single use) are plain,
//! clock-injected functions that unit tests can drive.
//!
//! A request is born [`Status::Pending`] at bc-authorize, is decided on the
//! approver page ([`CibaState::decide`]), and ends at the first poll that
//! sees the decision or its expiry: that answer is given once, and the
//! request is then [`Status::Consumed`], so every later poll of the same
//! `auth_req_id` is `invalid_grant` (single use).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

/// What every `slow_down` adds to that request's interval, for good.
pub const SLOW_DOWN_STEP: Duration = Duration::from_secs(5);
/// Slack for a client that polls right on the interval: its clock started
/// when it read our response, a little after ours.
const POLL_TOLERANCE: Duration = Duration::from_millis(200);
/// How long finished requests stay visible on the approver page.
const FINISHED_RETENTION: Duration = Duration::from_secs(60);

/// Auth0's binding message limit.
pub const BINDING_MESSAGE_MAX_CHARS: usize = 64;

/// Auth0's binding message rule: 1-64 letters, digits, spaces and `+ - _ . , : #`.
pub fn check_binding_message(message: &str) -> Result<(), String> {
    let count = message.chars().count();
    if count == 0 {
        return Err("binding_message is required".into());
    }
    if count > BINDING_MESSAGE_MAX_CHARS {
        return Err(format!(
            "binding_message has {count} characters; at most {BINDING_MESSAGE_MAX_CHARS} are allowed"
        ));
    }
    if let Some(bad) = message
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || " +-_.,:#".contains(*c)))
    {
        return Err(format!(
            "binding_message contains {bad:?}; allowed are letters, digits, space and + - _ . , : #"
        ));
    }
    Ok(())
}

/// Where a request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Pending,
    Approved,
    Denied,
    /// Its final answer (token, denial or expiry) has been given.
    Consumed,
}

/// A validated bc-authorize request, as the web layer hands it over.
#[derive(Debug, Clone, PartialEq)]
pub struct NewRequest {
    pub client_id: String,
    pub subject: String,
    pub binding_message: String,
    pub scopes: Vec<String>,
    pub audience: Option<String>,
    pub authorization_details: Option<Value>,
    /// Already capped by the web layer.
    pub expires_in: Duration,
}

/// One backchannel authentication request.
#[derive(Debug, Clone)]
pub struct Request {
    /// The polling handle given to the client only.
    auth_req_id: String,
    /// The handle the approver page uses, so the page never sees the
    /// `auth_req_id` a client polls with.
    pub id: String,
    pub request: NewRequest,
    pub status: Status,
    /// What the request ended as, for the page ("approved", "denied", "expired").
    pub outcome: Option<&'static str>,
    pub created: Instant,
    pub expires_at: Instant,
    pub finished_at: Option<Instant>,
    pub interval: Duration,
    pub last_poll: Option<Instant>,
    pub polls: u32,
    pub slow_downs: u32,
    /// Offsets of every poll from `created`, for tests of client discipline.
    pub poll_offsets: Vec<Duration>,
    force_slow_down: bool,
}

/// What bc-authorize returns.
#[derive(Debug, Clone)]
pub struct Ticket {
    pub auth_req_id: String,
    pub expires_in: Duration,
    pub interval: Duration,
}

/// What one poll of the token endpoint gets.
#[derive(Debug, Clone, PartialEq)]
pub enum PollResult {
    Pending,
    SlowDown {
        interval: Duration,
    },
    Denied,
    Expired,
    /// Issue tokens for this request (it is now consumed).
    Granted(Box<NewRequest>),
    /// Unknown, already used, or another client's request.
    InvalidGrant,
}

/// Why the approver's decision was not recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecideError {
    NotFound,
    Expired,
    AlreadyDecided,
}

/// All requests of the development authorization server.
#[derive(Debug)]
pub struct CibaState {
    interval: Duration,
    requests: HashMap<String, Request>,
    /// Page id -> auth_req_id.
    by_id: HashMap<String, String>,
}

impl CibaState {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval: interval.max(Duration::from_secs(1)),
            requests: HashMap::new(),
            by_id: HashMap::new(),
        }
    }

    /// Records a request the web layer has validated.
    pub fn authorize(&mut self, request: NewRequest, now: Instant) -> Ticket {
        self.purge(now);
        let auth_req_id = random_id();
        let id = uuid::Uuid::new_v4().to_string();
        let expires_in = request.expires_in;
        self.by_id.insert(id.clone(), auth_req_id.clone());
        self.requests.insert(
            auth_req_id.clone(),
            Request {
                auth_req_id: auth_req_id.clone(),
                id,
                request,
                status: Status::Pending,
                outcome: None,
                created: now,
                expires_at: now + expires_in,
                finished_at: None,
                interval: self.interval,
                last_poll: None,
                polls: 0,
                slow_downs: 0,
                poll_offsets: Vec::new(),
                force_slow_down: false,
            },
        );
        Ticket {
            auth_req_id,
            expires_in,
            interval: self.interval,
        }
    }

    /// One poll by `client_id` at `now`.
    pub fn poll(&mut self, client_id: &str, auth_req_id: &str, now: Instant) -> PollResult {
        let Some(request) = self.requests.get_mut(auth_req_id) else {
            return PollResult::InvalidGrant;
        };
        if request.request.client_id != client_id || request.status == Status::Consumed {
            return PollResult::InvalidGrant;
        }
        let earliest = request.last_poll.unwrap_or(request.created) + request.interval;
        request.polls += 1;
        request.poll_offsets.push(now - request.created);
        request.last_poll = Some(now);
        if request.force_slow_down || now + POLL_TOLERANCE < earliest {
            request.force_slow_down = false;
            request.slow_downs += 1;
            request.interval += SLOW_DOWN_STEP;
            return PollResult::SlowDown {
                interval: request.interval,
            };
        }
        let expired = now >= request.expires_at;
        let result = match request.status {
            Status::Pending if !expired => return PollResult::Pending,
            Status::Pending => {
                request.outcome = Some("expired");
                PollResult::Expired
            }
            // An approval must be collected before the request expires.
            Status::Approved if expired => PollResult::Expired,
            Status::Approved => PollResult::Granted(Box::new(request.request.clone())),
            Status::Denied => PollResult::Denied,
            Status::Consumed => return PollResult::InvalidGrant,
        };
        request.status = Status::Consumed;
        request.finished_at.get_or_insert(now);
        result
    }

    /// The approver's answer to the request the page knows as `id`.
    pub fn decide(&mut self, id: &str, approve: bool, now: Instant) -> Result<(), DecideError> {
        let request = self
            .by_id
            .get(id)
            .and_then(|auth_req_id| self.requests.get_mut(auth_req_id))
            .ok_or(DecideError::NotFound)?;
        if request.status != Status::Pending {
            return Err(DecideError::AlreadyDecided);
        }
        if now >= request.expires_at {
            return Err(DecideError::Expired);
        }
        request.status = if approve {
            Status::Approved
        } else {
            Status::Denied
        };
        request.outcome = Some(if approve { "approved" } else { "denied" });
        request.finished_at = Some(now);
        Ok(())
    }

    /// Makes the next poll of the request the page knows as `id` get
    /// `slow_down`, whatever its timing (a test hook).
    pub fn force_slow_down(&mut self, id: &str) -> bool {
        let found = self
            .by_id
            .get(id)
            .and_then(|auth_req_id| self.requests.get_mut(auth_req_id));
        match found {
            Some(request) => {
                request.force_slow_down = true;
                true
            }
            None => false,
        }
    }

    /// Requests to show on the approver page for `subject`, oldest first:
    /// pending ones and those finished within the last minute.
    pub fn for_subject(&self, subject: &str, now: Instant) -> Vec<&Request> {
        let mut found: Vec<&Request> = self
            .requests
            .values()
            .filter(|r| r.request.subject == subject)
            .filter(|r| match r.finished_at.or_else(|| expired_at(r, now)) {
                None => true,
                Some(at) => now.saturating_duration_since(at) < FINISHED_RETENTION,
            })
            .collect();
        found.sort_by_key(|r| r.created);
        found
    }

    /// Every request, oldest first.
    pub fn all(&self) -> Vec<&Request> {
        let mut all: Vec<&Request> = self.requests.values().collect();
        all.sort_by_key(|r| r.created);
        all
    }

    /// Forgets requests that ended long ago, so memory stays bounded.
    fn purge(&mut self, now: Instant) {
        let keep = |r: &Request| match r.finished_at.or_else(|| expired_at(r, now)) {
            None => true,
            Some(at) => now.saturating_duration_since(at) < FINISHED_RETENTION * 10,
        };
        self.requests.retain(|_, r| keep(r));
        let requests = &self.requests;
        self.by_id
            .retain(|_, auth_req_id| requests.contains_key(auth_req_id));
    }
}

impl Request {
    /// What the page shows: the decision, or `expired`, or `pending`.
    pub fn state_label(&self, now: Instant) -> &'static str {
        match (self.outcome, self.status) {
            (Some(outcome), _) => outcome,
            (None, Status::Pending) if now >= self.expires_at => "expired",
            (None, _) => "pending",
        }
    }

    pub fn auth_req_id(&self) -> &str {
        &self.auth_req_id
    }
}

fn expired_at(request: &Request, now: Instant) -> Option<Instant> {
    (request.status == Status::Pending && now >= request.expires_at).then_some(request.expires_at)
}

/// 128 random bits, URL-safe: an `auth_req_id` must not be guessable.
fn random_id() -> String {
    use base64::Engine as _;
    let bytes: [u8; 16] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(expires_in: u64) -> NewRequest {
        NewRequest {
            client_id: "client".into(),
            subject: "alice".into(),
            binding_message: "Buy 2 phones".into(),
            scopes: vec!["openid".into(), "product:buy".into()],
            audience: Some("https://shop.example/api".into()),
            authorization_details: None,
            expires_in: Duration::from_secs(expires_in),
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn page_id(state: &CibaState) -> String {
        state.all()[0].id.clone()
    }

    #[test]
    fn polling_faster_than_the_interval_slows_the_request_down_for_good() {
        let t0 = Instant::now();
        let mut state = CibaState::new(secs(2));
        let ticket = state.authorize(request(120), t0);
        assert_eq!(ticket.interval, secs(2));
        let id = ticket.auth_req_id.as_str();
        assert_eq!(
            state.poll("client", id, t0 + secs(1)),
            PollResult::SlowDown { interval: secs(7) }
        );
        // 2 s later would have been fine before; now 7 s are needed.
        assert_eq!(
            state.poll("client", id, t0 + secs(3)),
            PollResult::SlowDown { interval: secs(12) }
        );
        assert_eq!(state.poll("client", id, t0 + secs(15)), PollResult::Pending);
        assert_eq!(state.all()[0].slow_downs, 2);
        assert_eq!(state.all()[0].polls, 3);
    }

    #[test]
    fn a_forced_slow_down_hits_the_next_poll_only() {
        let t0 = Instant::now();
        let mut state = CibaState::new(secs(1));
        let id = state.authorize(request(120), t0).auth_req_id;
        assert!(state.force_slow_down(&page_id(&state)));
        assert!(matches!(
            state.poll("client", &id, t0 + secs(1)),
            PollResult::SlowDown { .. }
        ));
        assert_eq!(state.poll("client", &id, t0 + secs(7)), PollResult::Pending);
    }

    #[test]
    fn an_unanswered_request_expires_once_then_is_gone() {
        let t0 = Instant::now();
        let mut state = CibaState::new(secs(1));
        let id = state.authorize(request(3), t0).auth_req_id;
        assert_eq!(state.poll("client", &id, t0 + secs(1)), PollResult::Pending);
        assert_eq!(state.poll("client", &id, t0 + secs(3)), PollResult::Expired);
        assert_eq!(
            state.poll("client", &id, t0 + secs(5)),
            PollResult::InvalidGrant
        );
        let page = page_id(&state);
        assert_eq!(
            state.decide(&page, true, t0 + secs(6)),
            Err(DecideError::AlreadyDecided)
        );
    }

    #[test]
    fn the_approver_cannot_approve_an_expired_request() {
        let t0 = Instant::now();
        let mut state = CibaState::new(secs(1));
        state.authorize(request(3), t0);
        let page = page_id(&state);
        assert_eq!(
            state.decide(&page, true, t0 + secs(3)),
            Err(DecideError::Expired)
        );
        assert_eq!(state.all()[0].state_label(t0 + secs(3)), "expired");
    }

    #[test]
    fn an_approval_is_redeemed_once_and_only_by_its_client() {
        let t0 = Instant::now();
        let mut state = CibaState::new(secs(1));
        let id = state.authorize(request(60), t0).auth_req_id;
        state.decide(&page_id(&state), true, t0).unwrap();
        assert_eq!(
            state.poll("other-client", &id, t0 + secs(1)),
            PollResult::InvalidGrant
        );
        match state.poll("client", &id, t0 + secs(2)) {
            PollResult::Granted(granted) => assert_eq!(granted.subject, "alice"),
            other => panic!("expected a grant, got {other:?}"),
        }
        assert_eq!(
            state.poll("client", &id, t0 + secs(4)),
            PollResult::InvalidGrant
        );
        assert_eq!(
            state.poll("client", "no-such-id", t0),
            PollResult::InvalidGrant
        );
    }

    #[test]
    fn a_denial_is_answered_once() {
        let t0 = Instant::now();
        let mut state = CibaState::new(secs(1));
        let id = state.authorize(request(60), t0).auth_req_id;
        state.decide(&page_id(&state), false, t0).unwrap();
        assert_eq!(state.poll("client", &id, t0 + secs(1)), PollResult::Denied);
        assert_eq!(
            state.poll("client", &id, t0 + secs(2)),
            PollResult::InvalidGrant
        );
        assert_eq!(state.for_subject("alice", t0 + secs(2)).len(), 1);
        assert!(state.for_subject("alice", t0 + secs(120)).is_empty());
    }

    #[test]
    fn binding_messages_follow_auth0s_rules() {
        assert!(check_binding_message("Do you want to buy 2 XYZ phone").is_ok());
        assert!(check_binding_message("Order #12: 3.5 kg, A+B_c-d").is_ok());
        assert!(check_binding_message("").is_err());
        assert!(check_binding_message(&"a".repeat(65)).is_err());
        assert!(check_binding_message(&"a".repeat(64)).is_ok());
        assert!(check_binding_message("Approve <all>!").is_err());
        assert!(check_binding_message("two\nlines").is_err());
    }
}
