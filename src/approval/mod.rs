//! The authorization state machine: one approval request from "ask the
//! person" to a final [`Outcome`].
//!
//! [`PollSchedule`] is pure (no I/O, no clock of its own), so the polling
//! discipline (interval, permanent +5 s per `slow_down`, `Retry-After`, expiry)
//! is unit-tested here; [`run`] drives it against a [`CibaClient`]. The proxy
//! only awaits `run`; dropping that future (the agent hung up) stops polling.

pub mod audit;
pub mod binding;
pub mod engine;
pub mod notification;
pub mod ping;
pub mod shadow_audit;
pub mod store_handle;
mod timetable;

use std::time::Duration;

use tokio::time::Instant;

use crate::ciba::{AuthorizeRequest, CibaClient, CibaError, Grant, PollAnswer};

/// What the spec says to use when the server sends no `interval`.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// The longest `interval` taken from the server; a larger one would mean
/// never polling within any sensible hold.
pub const MAX_INTERVAL: Duration = Duration::from_secs(60);
/// What every `slow_down` adds, for that poll and all later ones.
pub const SLOW_DOWN_STEP: Duration = Duration::from_secs(5);
/// Polls in a row that get no answer (connection failure, timeout, 5xx
/// without `Retry-After`) before the approval ends as unavailable.
pub const MAX_CONSECUTIVE_FAILURES: u32 = 3;
/// The longest hold representable here; longer ones are cut to it.
const MAX_HOLD: Duration = Duration::from_secs(365 * 24 * 3600);

/// How an approval ended.
#[derive(Debug)]
pub enum Outcome {
    Approved(Grant),
    Denied,
    Expired,
    Failed(CibaError),
}

impl Outcome {
    /// The metrics word for this outcome.
    pub fn result_label(&self) -> &'static str {
        match self {
            Self::Approved(_) => "approved",
            Self::Denied => "denied",
            Self::Expired => "expired",
            Self::Failed(_) => "error",
        }
    }
}

/// When to poll next.
#[derive(Debug, Clone)]
pub struct PollSchedule {
    interval: Duration,
    deadline: Instant,
    next_poll: Instant,
    polls: u32,
    failures: u32,
}

/// What to do after an answer.
#[derive(Debug)]
pub enum Step {
    /// Poll again at this instant.
    PollAt(Instant),
    Finish(Outcome),
}

impl PollSchedule {
    /// Starts a schedule at `now` for a request that expires after `expires_in`
    /// (capped by `max_hold`). The interval is taken as at least 1 s and at
    /// most [`MAX_INTERVAL`].
    pub fn new(
        now: Instant,
        interval: Option<Duration>,
        expires_in: Duration,
        max_hold: Duration,
    ) -> Self {
        let interval = interval
            .unwrap_or(DEFAULT_INTERVAL)
            .clamp(Duration::from_secs(1), MAX_INTERVAL);
        let hold = expires_in.min(max_hold).min(MAX_HOLD);
        Self {
            interval,
            deadline: now.checked_add(hold).unwrap_or(now),
            next_poll: now.checked_add(interval).unwrap_or(now),
            polls: 0,
            failures: 0,
        }
    }

    /// Continues a stored schedule: the poll due now was made with
    /// `interval` (slow_down growth included), under the same `deadline`.
    pub fn resume(now: Instant, interval: Duration, deadline: Instant) -> Self {
        Self {
            interval: interval.max(Duration::from_secs(1)),
            deadline,
            next_poll: now,
            polls: 0,
            failures: 0,
        }
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    pub fn polls(&self) -> u32 {
        self.polls
    }

    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// The next poll, or `None` when the request has expired before it.
    pub fn next_poll(&self) -> Option<Instant> {
        (self.next_poll < self.deadline).then_some(self.next_poll)
    }

    /// Feeds the answer of the poll made at `now`.
    pub fn on_answer(&mut self, now: Instant, answer: PollAnswer) -> Step {
        self.polls += 1;
        if !matches!(answer, PollAnswer::Unreachable { .. }) {
            self.failures = 0;
        }
        let remaining = self.deadline.saturating_duration_since(now);
        let wait = match answer {
            PollAnswer::Approved(grant) => return Step::Finish(Outcome::Approved(grant)),
            PollAnswer::Denied => return Step::Finish(Outcome::Denied),
            PollAnswer::Expired => return Step::Finish(Outcome::Expired),
            PollAnswer::Failed(error) => return Step::Finish(Outcome::Failed(error)),
            PollAnswer::Pending => self.interval,
            PollAnswer::SlowDown => {
                self.interval = self.interval.saturating_add(SLOW_DOWN_STEP);
                self.interval
            }
            PollAnswer::Unavailable {
                retry_after: Some(retry_after),
            } if retry_after > self.interval && retry_after >= remaining => {
                // The server will not answer before the deadline: it is
                // unavailable for this approval, not unanswered by the person.
                return Step::Finish(Outcome::Failed(CibaError::Unavailable {
                    reason: format!(
                        "asked to retry after {} s, past the approval's deadline",
                        retry_after.as_secs()
                    ),
                    retry_after: Some(retry_after.min(remaining)),
                }));
            }
            PollAnswer::Unavailable { retry_after } => {
                retry_after.map_or(self.interval, |r| r.max(self.interval))
            }
            PollAnswer::Unreachable { reason } => {
                self.failures += 1;
                if self.failures >= MAX_CONSECUTIVE_FAILURES {
                    return Step::Finish(Outcome::Failed(CibaError::Unavailable {
                        reason: format!("{} polls in a row failed: {reason}", self.failures),
                        retry_after: None,
                    }));
                }
                self.interval
            }
        };
        if wait >= remaining {
            return Step::Finish(Outcome::Expired);
        }
        // Cannot overflow: `now + remaining` is the deadline.
        self.next_poll = now + wait;
        Step::PollAt(self.next_poll)
    }
}

/// Everything needed to ask for one approval.
#[derive(Debug, Clone)]
pub struct ApprovalRequest<'a> {
    pub authorize: AuthorizeRequest<'a>,
    pub max_hold: Duration,
}

/// Asks the person and polls until they answer or the request expires.
///
/// Cancel-safe: dropping the future stops polling; nothing else holds state.
pub async fn run(client: &CibaClient, request: &ApprovalRequest<'_>) -> Outcome {
    let authorization = match client.authorize(&request.authorize).await {
        Ok(authorization) => authorization,
        Err(error) => return Outcome::Failed(error),
    };
    tracing::info!(
        expires_in_s = authorization.expires_in.as_secs(),
        interval_s = authorization.interval.map(|i| i.as_secs()),
        "approval requested; waiting for the user"
    );
    let mut schedule = PollSchedule::new(
        Instant::now(),
        authorization.interval,
        authorization.expires_in,
        request.max_hold,
    );
    loop {
        let Some(at) = schedule.next_poll() else {
            return Outcome::Expired;
        };
        tokio::time::sleep_until(at).await;
        let answer = client.poll(&authorization.auth_req_id).await;
        match &answer {
            PollAnswer::SlowDown => tracing::warn!(
                interval_s = schedule.interval().saturating_add(SLOW_DOWN_STEP).as_secs(),
                "authorization server asked to slow down"
            ),
            PollAnswer::Unreachable { reason } => {
                tracing::warn!(%reason, "poll failed; the authorization server did not answer")
            }
            _ => {}
        }
        match schedule.on_answer(Instant::now(), answer) {
            Step::PollAt(_) => continue,
            Step::Finish(outcome) => return outcome,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(interval: Option<u64>, expires_in: u64) -> (Instant, PollSchedule) {
        let now = Instant::now();
        let s = PollSchedule::new(
            now,
            interval.map(Duration::from_secs),
            Duration::from_secs(expires_in),
            Duration::from_secs(3600),
        );
        (now, s)
    }

    fn at(step: Step) -> Instant {
        match step {
            Step::PollAt(at) => at,
            Step::Finish(outcome) => panic!("finished early: {outcome:?}"),
        }
    }

    #[test]
    fn first_poll_waits_one_interval_and_defaults_to_five_seconds() {
        let (now, s) = schedule(None, 120);
        assert_eq!(s.next_poll(), Some(now + Duration::from_secs(5)));
        let (now, s) = schedule(Some(2), 120);
        assert_eq!(s.next_poll(), Some(now + Duration::from_secs(2)));
    }

    #[test]
    fn slow_down_adds_five_seconds_for_every_later_poll() {
        let (now, mut s) = schedule(Some(2), 120);
        let t1 = now + Duration::from_secs(2);
        assert_eq!(
            at(s.on_answer(t1, PollAnswer::SlowDown)),
            t1 + Duration::from_secs(7)
        );
        let t2 = t1 + Duration::from_secs(7);
        assert_eq!(
            at(s.on_answer(t2, PollAnswer::Pending)),
            t2 + Duration::from_secs(7)
        );
        let t3 = t2 + Duration::from_secs(7);
        assert_eq!(
            at(s.on_answer(t3, PollAnswer::SlowDown)),
            t3 + Duration::from_secs(12)
        );
        assert_eq!(s.polls(), 3);
    }

    #[test]
    fn retry_after_is_honoured_but_never_shortens_the_interval() {
        let (now, mut s) = schedule(Some(2), 120);
        let retry = |secs| PollAnswer::Unavailable {
            retry_after: Some(Duration::from_secs(secs)),
        };
        assert_eq!(
            at(s.on_answer(now, retry(10))),
            now + Duration::from_secs(10)
        );
        assert_eq!(at(s.on_answer(now, retry(1))), now + Duration::from_secs(2));
        assert_eq!(
            at(s.on_answer(now, PollAnswer::Unavailable { retry_after: None })),
            now + Duration::from_secs(2)
        );
    }

    #[test]
    fn a_poll_past_the_deadline_is_not_made() {
        let (now, mut s) = schedule(Some(5), 8);
        let step = s.on_answer(now + Duration::from_secs(5), PollAnswer::Pending);
        assert!(matches!(step, Step::Finish(Outcome::Expired)));
    }

    #[test]
    fn max_hold_caps_the_deadline() {
        let now = Instant::now();
        let s = PollSchedule::new(
            now,
            Some(Duration::from_secs(1)),
            Duration::from_secs(600),
            Duration::from_secs(30),
        );
        assert_eq!(s.deadline(), now + Duration::from_secs(30));
    }

    #[test]
    fn terminal_answers_finish() {
        let (now, mut s) = schedule(Some(1), 60);
        assert!(matches!(
            s.on_answer(now, PollAnswer::Denied),
            Step::Finish(Outcome::Denied)
        ));
        assert!(matches!(
            s.on_answer(now, PollAnswer::Expired),
            Step::Finish(Outcome::Expired)
        ));
    }

    #[test]
    fn huge_intervals_and_holds_are_capped_without_overflow() {
        let now = Instant::now();
        let mut s = PollSchedule::new(
            now,
            Some(Duration::from_secs(u64::MAX)),
            Duration::from_secs(u64::MAX),
            Duration::MAX,
        );
        assert_eq!(s.interval(), MAX_INTERVAL);
        assert_eq!(s.next_poll(), Some(now + MAX_INTERVAL));
        let t = now + MAX_INTERVAL;
        assert_eq!(at(s.on_answer(t, PollAnswer::Pending)), t + MAX_INTERVAL);
        assert_eq!(
            at(s.on_answer(t, PollAnswer::SlowDown)),
            t + MAX_INTERVAL + SLOW_DOWN_STEP,
            "slow_down still adds to a capped interval"
        );
    }

    #[test]
    fn a_retry_after_past_the_deadline_ends_the_approval_as_unavailable() {
        let (now, mut s) = schedule(Some(2), 120);
        let step = s.on_answer(
            now,
            PollAnswer::Unavailable {
                retry_after: Some(Duration::MAX),
            },
        );
        match step {
            Step::Finish(Outcome::Failed(CibaError::Unavailable {
                retry_after: Some(after),
                ..
            })) => assert_eq!(after, Duration::from_secs(120), "capped at the hold"),
            other => panic!("{other:?}"),
        }
        // One that still fits is waited for.
        let (now, mut s) = schedule(Some(2), 120);
        let retry = PollAnswer::Unavailable {
            retry_after: Some(Duration::from_secs(119)),
        };
        assert_eq!(at(s.on_answer(now, retry)), now + Duration::from_secs(119));
    }

    #[test]
    fn polls_that_get_no_answer_end_the_approval_after_three_in_a_row() {
        let unreachable = || PollAnswer::Unreachable {
            reason: "connection refused".into(),
        };
        let (now, mut s) = schedule(Some(2), 120);
        let t1 = now + Duration::from_secs(2);
        assert_eq!(
            at(s.on_answer(t1, unreachable())),
            t1 + Duration::from_secs(2)
        );
        let t2 = t1 + Duration::from_secs(2);
        assert_eq!(
            at(s.on_answer(t2, unreachable())),
            t2 + Duration::from_secs(2)
        );
        let t3 = t2 + Duration::from_secs(2);
        assert!(matches!(
            s.on_answer(t3, unreachable()),
            Step::Finish(Outcome::Failed(CibaError::Unavailable {
                retry_after: None,
                ..
            }))
        ));
    }

    #[test]
    fn any_answer_resets_the_count_of_failed_polls() {
        let unreachable = || PollAnswer::Unreachable {
            reason: "timed out".into(),
        };
        let (now, mut s) = schedule(Some(1), 120);
        for answer in [
            unreachable(),
            unreachable(),
            PollAnswer::Pending,
            unreachable(),
            unreachable(),
            PollAnswer::Unavailable {
                retry_after: Some(Duration::from_secs(3)),
            },
            unreachable(),
            unreachable(),
        ] {
            at(s.on_answer(now, answer));
        }
        assert!(matches!(
            s.on_answer(now, unreachable()),
            Step::Finish(Outcome::Failed(_))
        ));
    }
}
