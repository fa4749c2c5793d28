//! The pieces of the fault-injection suite (`tests/faults.rs`).
// Some recorded fields are only read through `Debug`, in the history file.
#![allow(dead_code)]

pub mod agents;
pub mod approver;
pub mod check;
pub mod proxy;
pub mod schedule;
pub mod store;
pub mod upstream;
pub mod world;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use crate::support::USER_HEADER;

/// The people agents act for (users the CIBA peer knows).
pub const PEOPLE: [&str; 3] = ["alice", "bob", "carol"];

/// Who countersigns the countersigned policy's calls (fixed subjects; one
/// is a person agents act for, so carol's own calls have two candidates,
/// everyone else's three) and how many must approve besides the person.
pub const COUNTERSIGNERS: [&str; 3] = ["finance-lead", "dave", "carol"];
pub const COUNTERSIGN_MIN: usize = 2;

/// Every policy's `requested_expiry`.
pub const EXPIRY: Duration = Duration::from_secs(20);

/// How long past its deadline (first seen + its expiry) an approval may
/// take to reach a final state: the lease (2 s) for a takeover, a poll
/// interval (1 s), the upstream's longest call (2 s connect + 3 s + the
/// client's 5 s), and the faults' own durations (a pause or a stall of up
/// to 8 s ends no later than that).
pub const BOUND: Duration = Duration::from_secs(20);

/// `limits.max_pending_per_user`.
pub const LIMIT: usize = 3;

/// The suite's clock: unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
