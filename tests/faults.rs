//! The fault-injection suite (issue 18): real processes, faults at random
//! instants from a seed, every agent operation and every upstream request
//! recorded, invariants checked over the whole history afterwards.
//!
//! `single_sqlite` runs one gateway on SQLite; `replicas_postgres` two
//! gateways on one fresh PostgreSQL database reached through a TCP proxy
//! the suite controls. `FAULT_SEED` (default: random, always printed) and
//! `FAULT_SECONDS` (default 60) choose the run, so a failing run replays
//! with `FAULT_SEED=<seed> FAULT_SECONDS=<s> cargo test --test faults
//! <scenario> -- --nocapture`. `benches/faults.sh` is the long run
//! (docs/RELIABILITY.md). The pieces are in `tests/faults/`.

mod support;

#[path = "faults/mod.rs"]
mod faults;

use faults::schedule::Scenario;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_sqlite() {
    faults::world::run(Scenario::SingleSqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_postgres() {
    faults::world::run(Scenario::ReplicasPostgres).await;
}
