//! CIBA ping mode: the notifications this process waits for.
//!
//! Each bc-authorize carries a fresh `client_notification_token` (256 random
//! bits); only its SHA-256 digest is kept, from before bc-authorize is sent
//! (a server may notify before its answer is read), and under the request's
//! `auth_req_id` once known. A notification is accepted once, and only with
//! that token as its bearer (digests compared in constant time where the
//! `auth_req_id` is known): it makes the approval due at once in
//! the engine's timetable, which fetches the token. A forged, replayed or late
//! notification is refused and wakes nothing. The engine keeps a slow safety poll in case a
//! notification is lost (or went to another replica).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine as _;
use sha2::{Digest, Sha256};

use crate::secret::Secret;

/// Why a notification was refused. Nothing is said to the sender beyond 401.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// No request is waiting under that `auth_req_id` (unknown, already
    /// notified, or over).
    Unknown,
    /// The bearer token is not the one sent with the request.
    WrongToken,
}

impl Refused {
    pub fn label(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::WrongToken => "wrong_token",
        }
    }
}

struct Waiter {
    approval_id: String,
    /// Known once bc-authorize has answered; `None` while it is in flight.
    auth_req_id: Option<String>,
}

#[derive(Default)]
struct Waiting {
    /// Token digest -> who waits for its notification. Registered before
    /// bc-authorize is sent: a server may notify (a person who denies at
    /// once) before its answer to bc-authorize has been read here.
    by_token: HashMap<[u8; 32], Waiter>,
    /// `auth_req_id` -> token digest, once known.
    by_auth_req_id: HashMap<String, [u8; 32]>,
}

/// The ping-mode state of one engine.
pub struct Pings {
    /// The slow poll kept while waiting for a notification.
    pub safety_poll: Duration,
    waiting: Mutex<Waiting>,
}

impl std::fmt::Debug for Pings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pings")
            .field("safety_poll", &self.safety_poll)
            .finish_non_exhaustive()
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Equal, in time that does not depend on where they differ.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Pings {
    pub fn new(safety_poll: Duration) -> Self {
        Self {
            safety_poll,
            waiting: Mutex::new(Waiting::default()),
        }
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fresh `client_notification_token`: 256 random bits, base64url.
    pub fn new_token() -> Secret {
        let bytes: [u8; 32] = rand::random();
        Secret::new(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
    }

    /// Before bc-authorize is sent with `token`: one notification carrying
    /// it wakes the driver of `approval_id`, even one that comes before
    /// bc-authorize's answer (its `auth_req_id` cannot be checked then; an
    /// early wake costs one poll at most).
    pub fn expect_token(&self, token: &Secret, approval_id: &str) {
        let waiter = Waiter {
            approval_id: approval_id.to_owned(),
            auth_req_id: None,
        };
        self.waiting()
            .by_token
            .insert(digest(token.expose()), waiter);
    }

    /// bc-authorize answered `auth_req_id` for `token`: from now on a
    /// notification must name it. Nothing is kept if the notification
    /// already came.
    pub fn expect(&self, auth_req_id: &Secret, token: &Secret) {
        let token_digest = digest(token.expose());
        let mut waiting = self.waiting();
        if let Some(waiter) = waiting.by_token.get_mut(&token_digest) {
            waiter.auth_req_id = Some(auth_req_id.expose().to_owned());
            waiting
                .by_auth_req_id
                .insert(auth_req_id.expose().to_owned(), token_digest);
        }
    }

    /// The driver of `approval_id` is done: nothing of it is kept.
    pub fn forget(&self, approval_id: &str) {
        let mut waiting = self.waiting();
        let Waiting {
            by_token,
            by_auth_req_id,
        } = &mut *waiting;
        by_token.retain(|_, w| {
            let keep = w.approval_id != approval_id;
            if !keep {
                if let Some(auth_req_id) = &w.auth_req_id {
                    by_auth_req_id.remove(auth_req_id);
                }
            }
            keep
        });
    }

    /// A notification arrived: `bearer` is its `Authorization: Bearer`
    /// token. Accepted once per request; returns the approval to poll now
    /// ([`Engine::notified`](super::engine::Engine::notified)).
    pub fn notify(&self, auth_req_id: &str, bearer: &str) -> Result<String, Refused> {
        let bearer_digest = digest(bearer);
        let mut waiting = self.waiting();
        if let Some(expected) = waiting.by_auth_req_id.get(auth_req_id) {
            if !constant_time_eq(expected, &bearer_digest) {
                return Err(Refused::WrongToken);
            }
            waiting.by_auth_req_id.remove(auth_req_id);
        } else {
            // Only a request whose bc-authorize has not answered yet may be
            // notified under an `auth_req_id` not known here.
            let early = waiting
                .by_token
                .get(&bearer_digest)
                .is_some_and(|w| w.auth_req_id.is_none());
            if !early {
                return Err(Refused::Unknown);
            }
        }
        let waiter = waiting
            .by_token
            .remove(&bearer_digest)
            .ok_or(Refused::Unknown)?;
        Ok(waiter.approval_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notification_is_accepted_once_with_its_own_token() {
        let pings = Pings::new(Duration::from_secs(60));
        let token = Pings::new_token();
        assert_ne!(
            token.expose(),
            Pings::new_token().expose(),
            "fresh per request"
        );
        assert!(token.expose().len() >= 43);
        let id = Secret::new("req-1");
        pings.expect_token(&token, "approval-1");
        pings.expect(&id, &token);
        let other = Pings::new_token();
        assert_eq!(
            pings.notify("req-1", other.expose()),
            Err(Refused::WrongToken)
        );
        assert_eq!(pings.notify("req-1", ""), Err(Refused::WrongToken));
        assert_eq!(pings.notify("req-2", token.expose()), Err(Refused::Unknown));
        assert_eq!(
            pings.notify("req-1", token.expose()),
            Ok("approval-1".to_owned())
        );
        // Replayed: refused.
        assert_eq!(pings.notify("req-1", token.expose()), Err(Refused::Unknown));
    }

    #[test]
    fn a_notification_before_bc_authorize_answers_is_accepted_by_its_token() {
        let pings = Pings::new(Duration::from_secs(60));
        let token = Pings::new_token();
        pings.expect_token(&token, "approval-1");
        assert_eq!(
            pings.notify("req-1", Pings::new_token().expose()),
            Err(Refused::Unknown)
        );
        assert_eq!(
            pings.notify("req-1", token.expose()),
            Ok("approval-1".to_owned())
        );
        // bc-authorize answers after it: nothing more is accepted.
        pings.expect(&Secret::new("req-1"), &token);
        assert_eq!(pings.notify("req-1", token.expose()), Err(Refused::Unknown));
    }

    #[test]
    fn forgotten_approvals_accept_nothing() {
        let pings = Pings::new(Duration::from_secs(60));
        let (early, known) = (Pings::new_token(), Pings::new_token());
        pings.expect_token(&early, "approval-1");
        pings.expect_token(&known, "approval-2");
        pings.expect(&Secret::new("req-2"), &known);
        pings.forget("approval-1");
        pings.forget("approval-2");
        assert_eq!(pings.notify("req-1", early.expose()), Err(Refused::Unknown));
        assert_eq!(pings.notify("req-2", known.expose()), Err(Refused::Unknown));
    }
}
