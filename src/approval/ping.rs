//! CIBA ping mode: the notifications this process waits for.
//!
//! Each bc-authorize carries a fresh `client_notification_token` (256 random
//! bits); only its SHA-256 digest is kept, under the request's `auth_req_id`.
//! A notification is accepted once, and only with that token as its bearer
//! (digests compared in constant time): it makes the approval due at once in
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
    token_digest: [u8; 32],
    approval_id: String,
}

/// The ping-mode state of one engine.
pub struct Pings {
    /// The slow poll kept while waiting for a notification.
    pub safety_poll: Duration,
    /// `auth_req_id` -> who waits for its notification.
    waiting: Mutex<HashMap<String, Waiter>>,
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
            waiting: Mutex::new(HashMap::new()),
        }
    }

    /// A fresh `client_notification_token`: 256 random bits, base64url.
    pub fn new_token() -> Secret {
        let bytes: [u8; 32] = rand::random();
        Secret::new(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
    }

    /// From now on, one notification about `auth_req_id` carrying `token`
    /// wakes the driver of `approval_id`.
    pub fn expect(&self, auth_req_id: &Secret, token: &Secret, approval_id: &str) {
        let waiter = Waiter {
            token_digest: digest(token.expose()),
            approval_id: approval_id.to_owned(),
        };
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(auth_req_id.expose().to_owned(), waiter);
    }

    /// The driver of `approval_id` is done: nothing of it is kept.
    pub fn forget(&self, approval_id: &str) {
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, w| w.approval_id != approval_id);
    }

    /// A notification arrived: `bearer` is its `Authorization: Bearer`
    /// token. Accepted once per request; returns the approval to poll now
    /// ([`Engine::notified`](super::engine::Engine::notified)).
    pub fn notify(&self, auth_req_id: &str, bearer: &str) -> Result<String, Refused> {
        let approval_id = {
            let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
            let waiter = waiting.get(auth_req_id).ok_or(Refused::Unknown)?;
            if !constant_time_eq(&waiter.token_digest, &digest(bearer)) {
                return Err(Refused::WrongToken);
            }
            let approval_id = waiter.approval_id.clone();
            waiting.remove(auth_req_id);
            approval_id
        };
        Ok(approval_id)
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
        pings.expect(&id, &token, "approval-1");
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
}
