//! The store as the suite sees it: read directly (not through a gateway,
//! which may be down), twice a second, recording when each approval was
//! first seen and first seen in a final state, on the suite's clock. Also
//! the store faults that need a connection: a stalled SQLite writer and
//! `pg_terminate_backend`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use sqlx::{Connection, Row};

use super::now_ms;

/// Where the monitor's own PostgreSQL connections say they come from, so
/// that `pg_terminate_backend` spares them.
const MONITOR_APP: &str = "faults-monitor";

pub const FINAL_STATES: [&str; 5] = ["done", "denied", "expired", "failed", "outcome_unknown"];

/// One approval, as last read, with the suite's sightings.
#[derive(Debug, Clone)]
pub struct Seen {
    pub id: String,
    pub subject: String,
    pub binding_message: String,
    pub state: String,
    pub problem_code: Option<String>,
    pub response_status: Option<i64>,
    /// The store's times (the writing gateway's clock), unix ms.
    pub created_at: i64,
    pub expires_at: i64,
    pub decided_at: Option<i64>,
    /// Four eyes: the call a countersigner's approval belongs to, and on
    /// the call's own approval (the parent) how many must countersign.
    pub parent_id: Option<String>,
    pub countersign_min: Option<i64>,
    /// The CIBA request it asked (the first one seen: the store forgets it
    /// after the replay window), to name the authorization server's record.
    pub auth_req_id: Option<String>,
    /// The suite's clock, unix ms.
    pub first_seen_ms: i64,
    pub final_seen_ms: Option<i64>,
    /// Every state it was seen in, in order, with when (the suite's clock
    /// when it read the store: one instant for every row of a reading, so
    /// the states of several approvals at one reading can be compared).
    pub states: Vec<(i64, String)>,
}

impl Seen {
    pub fn is_final(&self) -> bool {
        FINAL_STATES.contains(&self.state.as_str())
    }

    /// Its state at the reading of instant `t` (`None`: not seen yet).
    pub fn state_at(&self, t: i64) -> Option<&str> {
        self.states
            .iter()
            .rev()
            .find(|(at, _)| *at <= t)
            .map(|(_, state)| state.as_str())
    }
}

pub enum StoreReader {
    Sqlite {
        pool: sqlx::SqlitePool,
        path: PathBuf,
    },
    Postgres(sqlx::PgPool),
}

const COLUMNS: &str = "id, subject, binding_message, state, problem_code, response_status, \
                       created_at, expires_at, decided_at, parent_id, countersign_min, \
                       ciba_auth_req_id";

impl StoreReader {
    pub async fn sqlite(path: PathBuf) -> Self {
        let options = SqliteConnectOptions::new()
            .filename(&path)
            .busy_timeout(Duration::from_secs(1));
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .expect("the gateway's SQLite store opens");
        StoreReader::Sqlite { pool, path }
    }

    /// A direct connection (not through the suite's proxy).
    pub async fn postgres(url: &str) -> Self {
        let options: PgConnectOptions = url.parse().unwrap();
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(3))
            .connect_with(options.application_name(MONITOR_APP))
            .await
            .expect("the run's PostgreSQL database opens");
        StoreReader::Postgres(pool)
    }

    async fn rows(&self) -> Result<Vec<Seen>, sqlx::Error> {
        let sql = format!("SELECT {COLUMNS} FROM approvals");
        let now = now_ms();
        macro_rules! read {
            ($rows:expr) => {
                $rows
                    .iter()
                    .map(|r| Seen {
                        id: r.get("id"),
                        subject: r.get("subject"),
                        binding_message: r.get("binding_message"),
                        state: r.get("state"),
                        problem_code: r.get("problem_code"),
                        response_status: r.get("response_status"),
                        created_at: r.get("created_at"),
                        expires_at: r.get("expires_at"),
                        decided_at: r.get("decided_at"),
                        parent_id: r.get("parent_id"),
                        countersign_min: r.get("countersign_min"),
                        auth_req_id: r.get("ciba_auth_req_id"),
                        first_seen_ms: now,
                        final_seen_ms: None,
                        states: Vec::new(),
                    })
                    .collect()
            };
        }
        Ok(match self {
            StoreReader::Sqlite { pool, .. } => read!(sqlx::query(&sql).fetch_all(pool).await?),
            StoreReader::Postgres(pool) => read!(sqlx::query(&sql).fetch_all(pool).await?),
        })
    }

    /// `pg_terminate_backend` on every other connection to the database.
    pub async fn terminate_backends(&self) -> Result<u64, sqlx::Error> {
        let StoreReader::Postgres(pool) = self else {
            return Ok(0);
        };
        let rows = sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid() \
             AND application_name <> $1",
        )
        .bind(MONITOR_APP)
        .fetch_all(pool)
        .await?;
        Ok(rows.len() as u64)
    }

    /// Holds SQLite's write lock (`BEGIN IMMEDIATE`) on a connection of its
    /// own for `lasts`: every writer of the gateway waits meanwhile.
    pub async fn stall_writers(&self, lasts: Duration) -> Result<(), sqlx::Error> {
        let StoreReader::Sqlite { path, .. } = self else {
            return Ok(());
        };
        let options = SqliteConnectOptions::new()
            .filename(path)
            .busy_timeout(Duration::from_secs(10));
        let mut conn = sqlx::SqliteConnection::connect_with(&options).await?;
        sqlx::query("BEGIN IMMEDIATE").execute(&mut conn).await?;
        tokio::time::sleep(lasts).await;
        sqlx::query("ROLLBACK").execute(&mut conn).await?;
        conn.close().await
    }
}

/// The monitor's record of every approval.
#[derive(Default)]
pub struct Sightings {
    pub approvals: Mutex<BTreeMap<String, Seen>>,
    pub read_errors: Mutex<u64>,
}

impl Sightings {
    /// Reads the store once and merges what it shows.
    pub async fn look(&self, reader: &StoreReader) {
        let rows = match reader.rows().await {
            Ok(rows) => rows,
            Err(_) => {
                *self.read_errors.lock().unwrap() += 1;
                return;
            }
        };
        let mut approvals = self.approvals.lock().unwrap();
        for row in rows {
            let now = row.first_seen_ms;
            let entry = approvals
                .entry(row.id.clone())
                .or_insert_with(|| row.clone());
            if entry.states.last().map(|(_, s)| s) != Some(&row.state) {
                entry.states.push((now, row.state.clone()));
            }
            let first_seen_ms = entry.first_seen_ms;
            let final_seen_ms = entry.final_seen_ms;
            let states = std::mem::take(&mut entry.states);
            let auth_req_id = entry.auth_req_id.take().or(row.auth_req_id.clone());
            *entry = Seen {
                auth_req_id,
                first_seen_ms,
                final_seen_ms: final_seen_ms.or(row.is_final().then_some(now)),
                states,
                ..row
            };
        }
    }

    pub fn snapshot(&self) -> Vec<Seen> {
        self.approvals.lock().unwrap().values().cloned().collect()
    }

    /// Whether every approval seen is in a final state.
    pub fn all_final(&self) -> bool {
        self.approvals.lock().unwrap().values().all(Seen::is_final)
    }
}
