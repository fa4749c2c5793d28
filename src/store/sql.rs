//! The SQLite and PostgreSQL backends: one set of SQL statements (both accept
//! `$N` parameters, `ON CONFLICT DO NOTHING` and the same types as used
//! here), runtime queries only, every operation on the store's own runtime.

use std::borrow::Cow;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use sqlx::error::BoxDynError;
use sqlx::migrate::{MigrateError, Migration, MigrationSource, MigrationType, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{ColumnIndex, Decode, Row, Type};

use super::{
    attach_key, attachable, duration_ms, from_ms, now_ms, to_ms, Approval, ApprovalState,
    ApprovalStore, CibaProgress, InsertTerms, Inserted, KeptGrant, ListFilter, NewApproval, Secret,
    ShadowDecision, ShadowFilter, StoreError, StoredRequest, StoredResponse,
};

/// Longest a single store operation may take before it is reported as
/// unavailable (a hung connection must not hold a call forever).
const OP_TIMEOUT: Duration = Duration::from_secs(10);
/// Waiting for a pooled connection.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// Waiting for SQLite's write lock (another process, or a checkpoint).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
const SQLITE_READERS: u32 = 4;
const POSTGRES_CONNECTIONS: u32 = 8;
/// `insert_or_attach` retries when the approval it conflicted with vanished
/// or stopped being attachable in between; more than this is contention no
/// real workload has.
const ATTACH_ATTEMPTS: usize = 8;
/// A process's heartbeat row is deleted this long after it stopped beating.
const HEARTBEAT_KEPT_MS: i64 = 3_600_000;
/// Rows one sweep statement changes at most: each batch is its own
/// statement, so the write lock is let go between them.
const SWEEP_BATCH: i64 = 500;
/// Batches of each kind one sweep makes at most; the rest waits for the
/// next sweep.
const SWEEP_BATCHES: usize = 20;

/// sqlx warns on every acquire that waited over 2 s: under load that is a
/// line per store operation (700,000 in ten minutes of the SQLite
/// benchmark). A busy store shows in `countersign_store_duration_seconds`;
/// an unreachable one in its errors and `/readyz`.
const QUIET: log::LevelFilter = log::LevelFilter::Debug;

macro_rules! columns {
    () => {
        "id, policy, subject, upstream, fingerprint, idempotency_key, binding_message, \
         authorization_details, state, request_method, request_path_and_query, \
         request_headers, request_body, ciba_auth_req_id, ciba_interval_ms, \
         ciba_next_poll_at, ciba_deadline, response_status, response_headers, response_body, \
         problem_code, created_at, expires_at, updated_at, decided_at, lease_owner, lease_until, \
         ciba_asked_at, delivered_at, parent_id, countersign_min, grant_token, grant_kind, \
         problem_detail, trace_parent"
    };
}

macro_rules! final_states {
    () => {
        "('denied', 'expired', 'failed', 'done', 'outcome_unknown')"
    };
}

/// Leased to its process from the start, and only while the person has
/// fewer than `$18` pending approvals: the count and the insert are one
/// statement (SQLite: one write transaction; PostgreSQL: under the
/// subject's advisory lock, see [`Backend::exec_for_subject`]).
const INSERT: &str = "INSERT INTO approvals (id, policy, subject, upstream, fingerprint, \
     idempotency_key, attach_key, binding_message, authorization_details, state, request_method, \
     request_path_and_query, request_headers, request_body, created_at, expires_at, updated_at, \
     lease_owner, lease_until, parent_id, countersign_min, trace_parent) \
     SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, 'pending', $10, $11, $12, $13, $14, $15, $14, \
     $16, $17, $19, $20, $21 \
     WHERE (SELECT COUNT(*) FROM approvals WHERE subject = $3 AND state = 'pending') < $18 \
     ON CONFLICT (attach_key) DO NOTHING";

const COUNT_PENDING: &str =
    "SELECT COUNT(*) FROM approvals WHERE subject = $1 AND state = 'pending'";

/// The first delivery of a done approval's answer. Without an
/// Idempotency-Key the approval stops answering calls: its attach key is
/// cleared, so the next identical call inserts a new approval. `updated_at`
/// stays: a keyed approval's replay window still runs from its ending.
const MARK_DELIVERED: &str = "UPDATE approvals SET delivered_at = $2, \
     attach_key = CASE WHEN idempotency_key IS NULL THEN NULL ELSE attach_key END \
     WHERE id = $1 AND state = 'done' AND delivered_at IS NULL";

const MARK_ASKED: &str = "UPDATE approvals SET ciba_asked_at = $3, updated_at = $3 \
     WHERE id = $1 AND state = 'pending' AND ciba_asked_at IS NULL AND lease_owner = $2";

/// The exactly-once claim, by whoever holds the token (a countersigned
/// call's from `approved`: its tokens are kept in the store).
const CLAIM: &str = "UPDATE approvals SET state = 'forwarding', updated_at = $4, \
     lease_owner = $2, lease_until = $3 WHERE id = $1 AND state IN ('pending', 'approved')";

/// A member of a countersigned call approved: its token is kept until the
/// call is forwarded or refused.
const KEEP_GRANT: &str = "UPDATE approvals SET state = 'approved', grant_token = $2, \
     grant_kind = $3, updated_at = $4, decided_at = COALESCE(decided_at, $4) \
     WHERE id = $1 AND state = 'pending'";

const FAMILY: &str = concat!(
    "SELECT ",
    columns!(),
    " FROM approvals WHERE parent_id = $1 ORDER BY created_at, id"
);

/// A countersigned call refused (whichever member refused): as
/// `TRANSITION_FINAL`, from pending or approved, with the sentence.
const END_PARENT: &str = "UPDATE approvals SET state = $2, updated_at = $3, \
     decided_at = COALESCE(decided_at, $3), problem_code = $4, problem_detail = $5, \
     lease_owner = NULL, lease_until = NULL, request_body = NULL, grant_token = NULL, \
     request_headers = substr(request_headers, 1, 0), \
     attach_key = CASE WHEN $2 = 'failed' THEN NULL ELSE attach_key END \
     WHERE id = $1 AND state IN ('pending', 'approved')";

/// The countersigners of a call that was forwarded (`$2` true: their
/// approvals are done) or refused: no token is kept past this.
const CLOSE_CHILDREN: &str = "UPDATE approvals SET \
     state = CASE WHEN state = 'approved' AND $2 = 1 THEN 'done' ELSE 'failed' END, \
     problem_code = CASE WHEN state = 'approved' AND $2 = 1 THEN NULL ELSE $3 END, \
     updated_at = $4, decided_at = COALESCE(decided_at, $4), grant_token = NULL, \
     lease_owner = NULL, lease_until = NULL \
     WHERE parent_id = $1 AND state IN ('pending', 'approved')";

const RELEASE: &str = "UPDATE approvals SET lease_owner = NULL, lease_until = NULL \
     WHERE lease_owner = $1 AND state IN ('pending', 'approved')";

const END_HEARTBEAT: &str = "DELETE FROM gateway_heartbeats WHERE owner = $1";

/// A single SQLite gateway that holds the database's lock is alone: every
/// lease and heartbeat left is a dead process's.
const FORGET_DEAD_LEASES: &str = "UPDATE approvals SET lease_owner = NULL, lease_until = NULL \
     WHERE lease_owner IS NOT NULL";
const FORGET_DEAD_HEARTBEATS: &str = "DELETE FROM gateway_heartbeats";

const BY_ATTACH_KEY: &str = concat!(
    "SELECT ",
    columns!(),
    " FROM approvals WHERE attach_key = $1"
);

const DETACH: &str = "UPDATE approvals SET attach_key = NULL WHERE id = $1 AND attach_key = $2";

const GET: &str = concat!("SELECT ", columns!(), " FROM approvals WHERE id = $1");

const SET_CIBA: &str = "UPDATE approvals SET ciba_auth_req_id = $2, ciba_interval_ms = $3, \
     ciba_next_poll_at = $4, ciba_deadline = $5, updated_at = $6 WHERE id = $1";

/// To a final state: decided, lease released, body dropped. A failed
/// approval (the authorization server or the upstream could not be reached)
/// is not replayed to retries: they start a new one. Except an interrupted
/// one: the person may have its request on their phone, so a retry of the
/// same call is told, not asked again.
const TRANSITION_FINAL: &str = "UPDATE approvals SET state = $3, updated_at = $4, \
     decided_at = COALESCE(decided_at, $4), problem_code = COALESCE($5, problem_code), \
     lease_owner = NULL, lease_until = NULL, request_body = NULL, grant_token = NULL, \
     request_headers = substr(request_headers, 1, 0), attach_key = CASE WHEN $3 = 'failed' AND COALESCE($5, '') <> 'approval_interrupted' THEN NULL ELSE attach_key END \
     WHERE id = $1 AND state = $2";

const TRANSITION_APPROVED: &str = "UPDATE approvals SET state = $3, updated_at = $4, \
     decided_at = COALESCE(decided_at, $4), problem_code = COALESCE($5, problem_code) \
     WHERE id = $1 AND state = $2";

const TRANSITION_OTHER: &str = "UPDATE approvals SET state = $3, updated_at = $4, \
     problem_code = COALESCE($5, problem_code) WHERE id = $1 AND state = $2";

const FINISH: &str = "UPDATE approvals SET state = 'done', response_status = $2, \
     response_headers = $3, response_body = $4, request_body = NULL, updated_at = $5, \
     grant_token = NULL, \
     request_headers = substr(request_headers, 1, 0), \
     decided_at = COALESCE(decided_at, $5), lease_owner = NULL, lease_until = NULL \
     WHERE id = $1 AND state = 'forwarding'";

/// Whether the lease holder of an approval is gone at `$N`: no holder, or
/// neither its lease on the approval nor its process's heartbeat is still
/// running.
macro_rules! holder_gone {
    ($now:literal) => {
        concat!(
            "(lease_owner IS NULL OR ((lease_until IS NULL OR lease_until <= ",
            $now,
            ") AND NOT EXISTS (SELECT 1 FROM gateway_heartbeats h \
             WHERE h.owner = approvals.lease_owner AND h.alive_until > ",
            $now,
            ")))"
        )
    };
}

const LEASE: &str = concat!(
    "UPDATE approvals SET lease_owner = $2, lease_until = $3 WHERE id = $1 \
     AND state NOT IN ",
    final_states!(),
    " AND (lease_owner = $2 OR ",
    holder_gone!("$4"),
    ")"
);

const ORPHANS: &str = concat!(
    "SELECT ",
    columns!(),
    " FROM approvals WHERE state IN ('pending', 'approved') AND (lease_owner = $3 OR ",
    holder_gone!("$1"),
    ") ORDER BY created_at, id LIMIT $2"
);

const MARK_UNKNOWN: &str = concat!(
    "UPDATE approvals SET state = 'outcome_unknown', \
     problem_code = 'outcome_unknown', updated_at = $1, decided_at = COALESCE(decided_at, $1), \
     lease_owner = NULL, lease_until = NULL, request_body = NULL, grant_token = NULL, \
     request_headers = substr(request_headers, 1, 0) \
     WHERE state = 'forwarding' AND ",
    holder_gone!("$1")
);

const HEARTBEAT: &str = "INSERT INTO gateway_heartbeats (owner, alive_until) VALUES ($1, $2) \
     ON CONFLICT (owner) DO UPDATE SET alive_until = excluded.alive_until";

/// Heartbeats of processes gone for longer than any lease.
const SWEEP_HEARTBEATS: &str = "DELETE FROM gateway_heartbeats WHERE alive_until <= $1";

/// Past the replay window no retry attaches: the attach key, the recorded
/// answer's body and the `auth_req_id` have no use left.
const SWEEP_DETACH: &str = concat!(
    "UPDATE approvals SET attach_key = NULL, response_body = NULL, ciba_auth_req_id = NULL \
     WHERE id IN (SELECT id FROM approvals WHERE updated_at <= $1 AND state IN ",
    final_states!(),
    " AND (attach_key IS NOT NULL OR response_body IS NOT NULL OR ciba_auth_req_id IS NOT NULL) \
     LIMIT $2)"
);

const SWEEP_DELETE: &str = concat!(
    "DELETE FROM approvals WHERE id IN (SELECT id FROM approvals WHERE updated_at <= $1 \
     AND (state IN ",
    final_states!(),
    " OR expires_at <= $1) LIMIT $2)"
);

const SWEEP_BODIES: &str = concat!(
    "UPDATE approvals SET request_body = NULL, request_headers = substr(request_headers, 1, 0) \
     WHERE id IN (SELECT id FROM approvals WHERE request_body IS NOT NULL AND updated_at <= $1 \
     AND state IN ",
    final_states!(),
    " LIMIT $2)"
);

const INSERT_SHADOW: &str = "INSERT INTO shadow_decisions (id, policy, subject, decision, \
     problem_code, binding_message, countersigners, request_method, request_path, created_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)";

const SWEEP_SHADOW: &str = "DELETE FROM shadow_decisions WHERE id IN \
     (SELECT id FROM shadow_decisions WHERE created_at <= $1 LIMIT $2)";

const MIGRATIONS_SQLITE: Embedded = Embedded(&[
    (
        1,
        "approvals",
        include_str!("../../migrations/sqlite/0001_approvals.sql"),
    ),
    (
        2,
        "gateway heartbeats",
        include_str!("../../migrations/sqlite/0002_gateway_heartbeats.sql"),
    ),
    (
        3,
        "asked once, bounded sweeps",
        include_str!("../../migrations/sqlite/0003_faults.sql"),
    ),
    (
        4,
        "delivered answers",
        include_str!("../../migrations/sqlite/0004_delivered.sql"),
    ),
    (
        5,
        "countersigned calls",
        include_str!("../../migrations/sqlite/0005_countersign.sql"),
    ),
    (
        6,
        "shadow decisions",
        include_str!("../../migrations/sqlite/0006_shadow.sql"),
    ),
    (
        7,
        "trace context",
        include_str!("../../migrations/sqlite/0007_traces.sql"),
    ),
]);

const MIGRATIONS_POSTGRES: Embedded = Embedded(&[
    (
        1,
        "approvals",
        include_str!("../../migrations/postgres/0001_approvals.sql"),
    ),
    (
        2,
        "gateway heartbeats",
        include_str!("../../migrations/postgres/0002_gateway_heartbeats.sql"),
    ),
    (
        3,
        "asked once, bounded sweeps",
        include_str!("../../migrations/postgres/0003_faults.sql"),
    ),
    (
        4,
        "delivered answers",
        include_str!("../../migrations/postgres/0004_delivered.sql"),
    ),
    (
        5,
        "countersigned calls",
        include_str!("../../migrations/postgres/0005_countersign.sql"),
    ),
    (
        6,
        "shadow decisions",
        include_str!("../../migrations/postgres/0006_shadow.sql"),
    ),
    (
        7,
        "trace context",
        include_str!("../../migrations/postgres/0007_traces.sql"),
    ),
]);

/// Migrations shipped in the binary: (version, description, SQL).
#[derive(Debug)]
struct Embedded(&'static [(i64, &'static str, &'static str)]);

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

impl MigrationSource<'static> for Embedded {
    fn resolve(self) -> BoxFuture<'static, Result<Vec<Migration>, BoxDynError>> {
        Box::pin(async move {
            Ok(self
                .0
                .iter()
                .map(|&(version, description, sql)| {
                    Migration::new(
                        version,
                        Cow::Borrowed(description),
                        MigrationType::Simple,
                        Cow::Borrowed(sql),
                        false,
                    )
                })
                .collect())
        })
    }
}

async fn migrator(source: Embedded) -> Result<Migrator, StoreError> {
    Migrator::new(source).await.map_err(migrate_error)
}

/// A bound value.
#[derive(Debug, Clone)]
enum Param {
    Int(Option<i64>),
    Text(Option<String>),
    Bytes(Option<Vec<u8>>),
}

fn int(v: i64) -> Param {
    Param::Int(Some(v))
}

fn text(v: impl Into<String>) -> Param {
    Param::Text(Some(v.into()))
}

macro_rules! bind_all {
    ($query:expr, $params:expr) => {{
        let mut query = $query;
        for param in $params {
            query = match param {
                Param::Int(v) => query.bind(*v),
                Param::Text(v) => query.bind(v.as_deref()),
                Param::Bytes(v) => query.bind(v.as_deref()),
            };
        }
        query
    }};
}

/// Runs a statement on `$pool`; the number of rows it changed.
macro_rules! execute {
    ($pool:expr, $op:expr, $sql:expr, $params:expr) => {
        bind_all!(sqlx::query($sql), $params)
            .execute($pool)
            .await
            .map(|done| done.rows_affected())
            .map_err(|e| db_error($op, &e))
    };
}

/// Runs a query on `$pool`; its rows, each read by `$decode`.
macro_rules! fetch_decoded {
    ($pool:expr, $op:expr, $sql:expr, $params:expr, $decode:expr) => {
        bind_all!(sqlx::query($sql), $params)
            .fetch_all($pool)
            .await
            .map_err(|e| db_error($op, &e))?
            .iter()
            .map($decode)
            .collect()
    };
}

/// One database: runs a statement, or a query returning approvals.
#[async_trait::async_trait]
trait Backend: Send + Sync + 'static {
    async fn exec(&self, op: &'static str, sql: &str, params: &[Param]) -> Result<u64, StoreError>;
    async fn fetch(
        &self,
        op: &'static str,
        sql: &str,
        params: &[Param],
    ) -> Result<Vec<Approval>, StoreError>;
    /// A statement on a connection of its own, so that it never waits
    /// behind the work queued in the pool: the heartbeat must arrive while
    /// the store is busiest, or others take over work that is going on.
    async fn exec_apart(
        &self,
        op: &'static str,
        sql: &str,
        params: &[Param],
    ) -> Result<u64, StoreError>;
    /// A query returning one integer (a `COUNT(*)`).
    async fn scalar(
        &self,
        op: &'static str,
        sql: &str,
        params: &[Param],
    ) -> Result<i64, StoreError>;
    async fn fetch_shadow(
        &self,
        op: &'static str,
        sql: &str,
        params: &[Param],
    ) -> Result<Vec<ShadowDecision>, StoreError>;
    /// A statement that must not run beside another of the same `subject`
    /// (the per-person limit's count and insert). SQLite: every write
    /// statement holds the database's write lock from its start.
    async fn exec_for_subject(
        &self,
        op: &'static str,
        subject: &str,
        sql: &str,
        params: &[Param],
    ) -> Result<u64, StoreError>;
    /// The database's own clock in unix milliseconds, where it is not this
    /// machine's (`None`: SQLite lives on this machine).
    async fn clock_ms(&self) -> Result<Option<i64>, StoreError>;
}

/// A [`Backend`] on sqlx pools: the statements and queries both databases run
/// alike, `exec` on the `writer` pool, `exec_apart` on the `apart` one, the
/// reads on the `reader` one; each database writes the rest (`exec_for_subject`,
/// `clock_ms`) in the braces.
macro_rules! backend {
    ($backend:ty, writer: $writer:ident, reader: $reader:ident, apart: $apart:ident, { $($own:tt)* }) => {
        #[async_trait::async_trait]
        impl Backend for $backend {
            async fn exec(
                &self,
                op: &'static str,
                sql: &str,
                params: &[Param],
            ) -> Result<u64, StoreError> {
                execute!(&self.$writer, op, sql, params)
            }

            async fn exec_apart(
                &self,
                op: &'static str,
                sql: &str,
                params: &[Param],
            ) -> Result<u64, StoreError> {
                execute!(&self.$apart, op, sql, params)
            }

            async fn fetch(
                &self,
                op: &'static str,
                sql: &str,
                params: &[Param],
            ) -> Result<Vec<Approval>, StoreError> {
                fetch_decoded!(&self.$reader, op, sql, params, decode)
            }

            async fn fetch_shadow(
                &self,
                op: &'static str,
                sql: &str,
                params: &[Param],
            ) -> Result<Vec<ShadowDecision>, StoreError> {
                fetch_decoded!(&self.$reader, op, sql, params, decode_shadow)
            }

            async fn scalar(
                &self,
                op: &'static str,
                sql: &str,
                params: &[Param],
            ) -> Result<i64, StoreError> {
                let row = bind_all!(sqlx::query(sql), params)
                    .fetch_one(&self.$reader)
                    .await
                    .map_err(|e| db_error(op, &e))?;
                row.try_get::<i64, _>(0).map_err(|e| db_error(op, &e))
            }

            $($own)*
        }
    };
}

/// One writer connection (SQLite has one writer at a time anyway; waiting in
/// the pool is cheaper than on the file lock), readers beside it (WAL).
struct Sqlite {
    writer: SqlitePool,
    reader: SqlitePool,
    /// For [`Backend::exec_apart`]: waits on SQLite's lock, not the pool.
    apart: SqlitePool,
    /// An exclusive lock on `<database>.lock` while this is the only
    /// process on the database (it dies with the process, kill -9 too).
    _alone: Option<std::fs::File>,
}

backend!(Sqlite, writer: writer, reader: reader, apart: apart, {
    async fn exec_for_subject(
        &self,
        op: &'static str,
        _subject: &str,
        sql: &str,
        params: &[Param],
    ) -> Result<u64, StoreError> {
        execute!(&self.writer, op, sql, params)
    }

    async fn clock_ms(&self) -> Result<Option<i64>, StoreError> {
        Ok(None)
    }
});

struct Postgres {
    pool: PgPool,
    /// For [`Backend::exec_apart`].
    apart: PgPool,
}

// PostgreSQL reads on the one pool it writes on.
backend!(Postgres, writer: pool, reader: pool, apart: apart, {
    async fn exec_for_subject(
        &self,
        op: &'static str,
        subject: &str,
        sql: &str,
        params: &[Param],
    ) -> Result<u64, StoreError> {
        let failed = |e: sqlx::Error| db_error(op, &e);
        let mut tx = self.pool.begin().await.map_err(failed)?;
        // Released at commit or rollback (a dropped transaction rolls back).
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(format!("countersign subject {subject}"))
            .execute(&mut *tx)
            .await
            .map_err(failed)?;
        let changed = bind_all!(sqlx::query(sql), params)
            .execute(&mut *tx)
            .await
            .map_err(failed)?
            .rows_affected();
        tx.commit().await.map_err(failed)?;
        Ok(changed)
    }

    async fn clock_ms(&self) -> Result<Option<i64>, StoreError> {
        let row = sqlx::query("SELECT (EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT")
            .fetch_one(&self.apart)
            .await
            .map_err(|e| db_error("clock", &e))?;
        Ok(Some(
            row.try_get::<i64, _>(0)
                .map_err(|e| db_error("clock", &e))?,
        ))
    }
});

/// The store's own tokio runtime: connections are created, driven and
/// dropped there, whichever runtime (pingora's, a test's, a short-lived one
/// at start) the caller is on.
#[derive(Debug)]
struct Driver {
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
}

impl Driver {
    fn new() -> Result<Self, StoreError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(2)
            .thread_name("countersign-store")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Unavailable(format!("store runtime: {e}")))?;
        let handle = runtime.handle().clone();
        Ok(Self {
            runtime: Some(runtime),
            handle,
        })
    }

    /// Runs `work` on the store's runtime, within [`OP_TIMEOUT`]. The work
    /// completes even if the caller stops waiting (a state change is either
    /// made or not, never half).
    async fn run<T, F>(&self, op: &'static str, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let task = self.handle.spawn(async move {
            match tokio::time::timeout(OP_TIMEOUT, work).await {
                Ok(result) => result,
                Err(_) => Err(StoreError::Unavailable(format!("{op}: timed out"))),
            }
        });
        task.await
            .map_err(|_| StoreError::Unavailable(format!("{op}: store task failed")))?
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // Dropping a runtime inside another one panics; this does not wait.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// An SQL store. Field order matters: the backend (the pools) is dropped
/// before the runtime that drives its connections.
struct SqlStore<B> {
    backend: Arc<B>,
    driver: Driver,
    kind: &'static str,
    /// The database's clock minus this machine's, in milliseconds, as last
    /// measured (at open and at every heartbeat).
    clock_offset: Arc<AtomicI64>,
}

impl<B: Backend> SqlStore<B> {
    fn new(backend: B, driver: Driver, kind: &'static str) -> Self {
        Self {
            backend: Arc::new(backend),
            driver,
            kind,
            clock_offset: Arc::new(AtomicI64::new(0)),
        }
    }

    /// A conditional change of one approval: whether it happened (the row
    /// matched its condition).
    async fn change_one(
        &self,
        op: &'static str,
        sql: &'static str,
        params: Vec<Param>,
    ) -> Result<bool, StoreError> {
        let backend = self.backend.clone();
        self.driver
            .run(
                op,
                async move { Ok(backend.exec(op, sql, &params).await? == 1) },
            )
            .await
    }

    /// The approvals query `sql` finds, run on the store's own runtime.
    async fn fetch(
        &self,
        op: &'static str,
        sql: &'static str,
        params: Vec<Param>,
    ) -> Result<Vec<Approval>, StoreError> {
        let backend = self.backend.clone();
        self.driver
            .run(op, async move { backend.fetch(op, sql, &params).await })
            .await
    }

    /// Now on the store's clock.
    fn now_ms(&self) -> i64 {
        now_ms().saturating_add(self.clock_offset.load(Ordering::Relaxed))
    }

    /// Reads the database's clock (PostgreSQL) and keeps its offset from
    /// this machine's: half the round trip either way at most.
    async fn measure_clock(&self) -> Result<(), StoreError> {
        let backend = self.backend.clone();
        let offset = self.clock_offset.clone();
        self.driver
            .run("clock", async move {
                let before = now_ms();
                if let Some(db) = backend.clock_ms().await? {
                    let after = now_ms();
                    let local = before + (after - before) / 2;
                    offset.store(db - local, Ordering::Relaxed);
                }
                Ok(())
            })
            .await
    }
}

impl<B> std::fmt::Debug for SqlStore<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlStore")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

pub(super) async fn open_sqlite(path: &Path) -> Result<Arc<dyn ApprovalStore>, StoreError> {
    let driver = Driver::new()?;
    let path = path.to_owned();
    let backend = driver
        .run("open", async move {
            let cannot = |e: sqlx::Error| {
                StoreError::Unavailable(format!("cannot open {}: {}", path.display(), describe(&e)))
            };
            let options = SqliteConnectOptions::new()
                .filename(&path)
                .busy_timeout(BUSY_TIMEOUT);
            let writer = SqlitePoolOptions::new()
                .max_connections(1)
                .acquire_slow_level(QUIET)
                .acquire_timeout(ACQUIRE_TIMEOUT)
                .connect_with(
                    options
                        .clone()
                        .create_if_missing(true)
                        .journal_mode(SqliteJournalMode::Wal)
                        .synchronous(SqliteSynchronous::Full),
                )
                .await
                .map_err(cannot)?;
            migrator(MIGRATIONS_SQLITE)
                .await?
                .run(&writer)
                .await
                .map_err(migrate_error)?;
            let apart = SqlitePoolOptions::new()
                .max_connections(1)
                .acquire_slow_level(QUIET)
                .acquire_timeout(ACQUIRE_TIMEOUT)
                .connect_with(options.clone().synchronous(SqliteSynchronous::Full))
                .await
                .map_err(cannot)?;
            let reader = SqlitePoolOptions::new()
                .max_connections(SQLITE_READERS)
                .acquire_slow_level(QUIET)
                .acquire_timeout(ACQUIRE_TIMEOUT)
                .connect_with(options.read_only(true))
                .await
                .map_err(cannot)?;
            let alone = lock_alone(&path);
            if alone.is_some() {
                // Every other process on this file is dead: what they leased
                // is adopted (or marked unknown) at once, not a lease later.
                execute!(&writer, "open", FORGET_DEAD_LEASES, &[])?;
                execute!(&writer, "open", FORGET_DEAD_HEARTBEATS, &[])?;
            }
            Ok(Sqlite {
                writer,
                reader,
                apart,
                _alone: alone,
            })
        })
        .await?;
    Ok(Arc::new(SqlStore::new(backend, driver, "sqlite")))
}

/// An exclusive lock on `<database>.lock`, if no other process holds it.
fn lock_alone(database: &Path) -> Option<std::fs::File> {
    let mut name = database.as_os_str().to_owned();
    name.push(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(std::path::PathBuf::from(name))
        .ok()?;
    file.try_lock().ok()?;
    Some(file)
}

pub(super) async fn open_postgres(url: &str) -> Result<Arc<dyn ApprovalStore>, StoreError> {
    // The URL may hold a password: never in a message.
    let options = PgConnectOptions::from_str(url)
        .map_err(|_| StoreError::Unavailable("invalid PostgreSQL URL".into()))?
        .application_name("countersign");
    let driver = Driver::new()?;
    let backend = driver
        .run("open", async move {
            let connect = |connections: u32| {
                PgPoolOptions::new()
                    .acquire_slow_level(QUIET)
                    .max_connections(connections)
                    .acquire_timeout(ACQUIRE_TIMEOUT)
                    .connect_with(options.clone())
            };
            let cannot = |e: sqlx::Error| {
                StoreError::Unavailable(format!("cannot connect to PostgreSQL: {}", describe(&e)))
            };
            let pool = connect(POSTGRES_CONNECTIONS).await.map_err(cannot)?;
            migrator(MIGRATIONS_POSTGRES)
                .await?
                .run(&pool)
                .await
                .map_err(migrate_error)?;
            let apart = connect(1).await.map_err(cannot)?;
            Ok(Postgres { pool, apart })
        })
        .await?;
    let store = SqlStore::new(backend, driver, "postgres");
    store.measure_clock().await?;
    Ok(Arc::new(store))
}

#[async_trait::async_trait]
impl<B: Backend> ApprovalStore for SqlStore<B> {
    async fn insert_or_attach(
        &self,
        approval: &NewApproval,
        terms: InsertTerms<'_>,
    ) -> Result<Inserted, StoreError> {
        let backend = self.backend.clone();
        let key = attach_key(approval);
        let now = to_ms(approval.created_at);
        let replay_window = terms.replay_window;
        let with_key = approval.idempotency_key.is_some();
        let fingerprint = approval.fingerprint.clone();
        let subject = approval.subject.clone();
        let details = approval
            .authorization_details
            .as_ref()
            .map(|v| v.to_string());
        let a = approval.clone();
        let insert = vec![
            text(a.id),
            text(a.policy),
            text(a.subject),
            text(a.upstream),
            text(a.fingerprint),
            Param::Text(a.idempotency_key),
            text(key.clone()),
            text(a.binding_message),
            Param::Text(details),
            text(a.request.method),
            text(a.request.path_and_query),
            Param::Bytes(Some(encode_headers(&a.request.headers))),
            Param::Bytes(Some(a.request.body)),
            int(now),
            int(to_ms(a.expires_at)),
            text(terms.lease_owner),
            int(to_ms(terms.lease_until)),
            int(limit_param(terms.max_pending)),
            Param::Text(a.parent_id),
            Param::Int(a.countersign_min.map(i64::from)),
            Param::Text(a.trace_parent),
        ];
        let max_pending = limit_param(terms.max_pending);
        self.driver
            .run("insert", async move {
                for _ in 0..ATTACH_ATTEMPTS {
                    if backend
                        .exec_for_subject("insert", &subject, INSERT, &insert)
                        .await?
                        == 1
                    {
                        return Ok(Inserted::Created);
                    }
                    let found = backend
                        .fetch("insert", BY_ATTACH_KEY, &[text(key.clone())])
                        .await?;
                    let Some(existing) = found.into_iter().next() else {
                        // No approval to attach to: the person is at the
                        // limit, or it was swept or detached in between.
                        let pending = backend
                            .scalar("insert", COUNT_PENDING, &[text(subject.clone())])
                            .await?;
                        if pending >= max_pending {
                            return Ok(Inserted::LimitReached);
                        }
                        continue;
                    };
                    if !attachable(&existing, now, replay_window) {
                        // Past its replay window but not yet swept.
                        backend
                            .exec("insert", DETACH, &[text(existing.id), text(key.clone())])
                            .await?;
                        continue;
                    }
                    if with_key && existing.fingerprint != fingerprint {
                        return Err(StoreError::KeyReuse);
                    }
                    return Ok(Inserted::Existing(Box::new(existing)));
                }
                Err(StoreError::Unavailable("insert: contention".into()))
            })
            .await
    }

    fn now(&self) -> SystemTime {
        from_ms(self.now_ms())
    }

    async fn mark_asked(&self, id: &str, owner: &str) -> Result<bool, StoreError> {
        let params = vec![text(id), text(owner), int(self.now_ms())];
        self.change_one("mark_asked", MARK_ASKED, params).await
    }

    async fn mark_delivered(&self, id: &str) -> Result<bool, StoreError> {
        let params = vec![text(id), int(self.now_ms())];
        self.change_one("mark_delivered", MARK_DELIVERED, params)
            .await
    }

    async fn claim(&self, id: &str, owner: &str, until: SystemTime) -> Result<bool, StoreError> {
        let params = vec![text(id), text(owner), int(to_ms(until)), int(self.now_ms())];
        self.change_one("claim", CLAIM, params).await
    }

    async fn keep_grant(&self, id: &str, grant: &KeptGrant) -> Result<bool, StoreError> {
        let kind = if grant.dpop { "dpop" } else { "bearer" };
        let params = vec![
            text(id),
            text(grant.token.expose()),
            text(kind),
            int(self.now_ms()),
        ];
        self.change_one("keep_grant", KEEP_GRANT, params).await
    }

    async fn family(&self, parent_id: &str) -> Result<Vec<Approval>, StoreError> {
        self.fetch("family", FAMILY, vec![text(parent_id)]).await
    }

    async fn end_parent(
        &self,
        id: &str,
        to: ApprovalState,
        problem_code: &str,
        detail: &str,
    ) -> Result<bool, StoreError> {
        if !to.is_final() {
            return Ok(false);
        }
        let params = vec![
            text(id),
            text(to.as_str()),
            int(self.now_ms()),
            text(problem_code),
            text(detail),
        ];
        self.change_one("end_parent", END_PARENT, params).await
    }

    async fn close_children(
        &self,
        parent_id: &str,
        forwarded: bool,
        problem_code: &str,
    ) -> Result<(), StoreError> {
        let backend = self.backend.clone();
        let params = [
            text(parent_id),
            int(i64::from(forwarded)),
            text(problem_code),
            int(self.now_ms()),
        ];
        self.driver
            .run("close_children", async move {
                backend
                    .exec("close_children", CLOSE_CHILDREN, &params)
                    .await?;
                Ok(())
            })
            .await
    }

    async fn release(&self, owner: &str) -> Result<(), StoreError> {
        let backend = self.backend.clone();
        let params = [text(owner)];
        self.driver
            .run("release", async move {
                backend.exec("release", RELEASE, &params).await?;
                backend
                    .exec_apart("release", END_HEARTBEAT, &params)
                    .await?;
                Ok(())
            })
            .await
    }

    async fn get(&self, id: &str) -> Result<Option<Approval>, StoreError> {
        Ok(self
            .fetch("get", GET, vec![text(id)])
            .await?
            .into_iter()
            .next())
    }

    async fn set_ciba(&self, id: &str, ciba: &CibaProgress) -> Result<(), StoreError> {
        let backend = self.backend.clone();
        let params = [
            text(id),
            text(ciba.auth_req_id.expose()),
            int(duration_ms(ciba.interval)),
            int(to_ms(ciba.next_poll_at)),
            int(to_ms(ciba.deadline)),
            int(self.now_ms()),
        ];
        self.driver
            .run("set_ciba", async move {
                backend.exec("set_ciba", SET_CIBA, &params).await?;
                Ok(())
            })
            .await
    }

    async fn transition(
        &self,
        id: &str,
        from: ApprovalState,
        to: ApprovalState,
        problem_code: Option<&str>,
    ) -> Result<bool, StoreError> {
        if from.is_final() {
            return Ok(false); // final states never change
        }
        let sql = if to.is_final() {
            TRANSITION_FINAL
        } else if to == ApprovalState::Approved {
            TRANSITION_APPROVED
        } else {
            TRANSITION_OTHER
        };
        let params = vec![
            text(id),
            text(from.as_str()),
            text(to.as_str()),
            int(self.now_ms()),
            Param::Text(problem_code.map(str::to_owned)),
        ];
        self.change_one("transition", sql, params).await
    }

    async fn finish(&self, id: &str, response: &StoredResponse) -> Result<bool, StoreError> {
        let params = vec![
            text(id),
            int(i64::from(response.status)),
            Param::Bytes(Some(encode_headers(&response.headers))),
            Param::Bytes(response.body.clone()),
            int(self.now_ms()),
        ];
        self.change_one("finish", FINISH, params).await
    }

    async fn lease(&self, id: &str, owner: &str, until: SystemTime) -> Result<bool, StoreError> {
        let params = vec![text(id), text(owner), int(to_ms(until)), int(self.now_ms())];
        self.change_one("lease", LEASE, params).await
    }

    async fn heartbeat(&self, owner: &str, alive_until: SystemTime) -> Result<(), StoreError> {
        let backend = self.backend.clone();
        let params = [text(owner), int(to_ms(alive_until))];
        self.driver
            .run("heartbeat", async move {
                backend.exec_apart("heartbeat", HEARTBEAT, &params).await?;
                Ok(())
            })
            .await?;
        self.measure_clock().await
    }

    async fn orphans(
        &self,
        now: SystemTime,
        limit: usize,
        mine: &str,
    ) -> Result<Vec<Approval>, StoreError> {
        let params = vec![int(to_ms(now)), int(limit_param(limit)), text(mine)];
        self.fetch("orphans", ORPHANS, params).await
    }

    async fn mark_unknown_outcomes(&self, now: SystemTime) -> Result<u64, StoreError> {
        let backend = self.backend.clone();
        let params = [int(to_ms(now))];
        self.driver
            .run("mark_unknown_outcomes", async move {
                backend
                    .exec("mark_unknown_outcomes", MARK_UNKNOWN, &params)
                    .await
            })
            .await
    }

    async fn sweep(
        &self,
        now: SystemTime,
        replay_window: Duration,
        retention: Duration,
    ) -> Result<(), StoreError> {
        let backend = self.backend.clone();
        let now = to_ms(now);
        let replay_before = now.saturating_sub(duration_ms(replay_window));
        let retain_after = now.saturating_sub(duration_ms(retention));
        let gone_before = [int(now.saturating_sub(HEARTBEAT_KEPT_MS))];
        self.driver
            .run("sweep", async move {
                backend
                    .exec("sweep", SWEEP_HEARTBEATS, &gone_before)
                    .await?;
                for (sql, before) in [
                    (SWEEP_DETACH, &replay_before),
                    (SWEEP_DELETE, &retain_after),
                    (SWEEP_BODIES, &replay_before),
                    (SWEEP_SHADOW, &retain_after),
                ] {
                    let params = [int(*before), int(SWEEP_BATCH)];
                    for _ in 0..SWEEP_BATCHES {
                        let changed = backend.exec("sweep", sql, &params).await?;
                        if changed < SWEEP_BATCH.unsigned_abs() {
                            break;
                        }
                        // Writers waiting for the lock go first.
                        tokio::task::yield_now().await;
                    }
                }
                Ok(())
            })
            .await
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<Approval>, StoreError> {
        let (sql, params) = listing(
            concat!("SELECT ", columns!(), " FROM approvals"),
            &[
                ("state", "=", filter.state.map(|s| text(s.as_str()))),
                ("policy", "=", filter.policy.as_deref().map(text)),
                ("subject", "=", filter.subject.as_deref().map(text)),
                ("created_at", ">=", filter.since.map(|t| int(to_ms(t)))),
            ],
            filter.limit,
        );
        let backend = self.backend.clone();
        self.driver
            .run(
                "list",
                async move { backend.fetch("list", &sql, &params).await },
            )
            .await
    }

    async fn record_shadow(&self, decision: &ShadowDecision) -> Result<(), StoreError> {
        let backend = self.backend.clone();
        let d = decision.clone();
        let countersigners = (!d.countersigners.is_empty())
            .then(|| serde_json::Value::from(d.countersigners).to_string());
        let params = [
            text(d.id),
            text(d.policy),
            Param::Text(d.subject),
            text(d.decision),
            Param::Text(d.problem_code),
            Param::Text(d.binding_message),
            Param::Text(countersigners),
            text(d.method),
            text(d.path),
            int(to_ms(d.created_at)),
        ];
        self.driver
            .run("record_shadow", async move {
                backend
                    .exec_apart("record_shadow", INSERT_SHADOW, &params)
                    .await?;
                Ok(())
            })
            .await
    }

    async fn list_shadow(&self, filter: &ShadowFilter) -> Result<Vec<ShadowDecision>, StoreError> {
        let (sql, params) = listing(
            "SELECT id, policy, subject, decision, problem_code, binding_message, \
             countersigners, request_method, request_path, created_at FROM shadow_decisions",
            &[
                ("policy", "=", filter.policy.as_deref().map(text)),
                ("subject", "=", filter.subject.as_deref().map(text)),
                ("created_at", ">=", filter.since.map(|t| int(to_ms(t)))),
            ],
            filter.limit,
        );
        let backend = self.backend.clone();
        self.driver
            .run("list_shadow", async move {
                backend.fetch_shadow("list_shadow", &sql, &params).await
            })
            .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let backend = self.backend.clone();
        self.driver
            .run("ping", async move {
                backend.exec("ping", "SELECT 1", &[]).await?;
                Ok(())
            })
            .await
    }
}

fn limit_param(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// A header value as JSON: a string when it is UTF-8 (nearly always), else
/// the bytes.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum HeaderValue {
    Text(String),
    Bytes(Vec<u8>),
}

fn encode_headers(headers: &[(String, Vec<u8>)]) -> Vec<u8> {
    let values: Vec<(&str, HeaderValue)> = headers
        .iter()
        .map(|(name, value)| {
            let value = match std::str::from_utf8(value) {
                Ok(s) => HeaderValue::Text(s.to_owned()),
                Err(_) => HeaderValue::Bytes(value.clone()),
            };
            (name.as_str(), value)
        })
        .collect();
    serde_json::to_vec(&values).unwrap_or_default()
}

fn decode_headers(bytes: &[u8]) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
    // Emptied when the approval ended: nothing will be forwarded any more.
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    let values: Vec<(String, HeaderValue)> = serde_json::from_slice(bytes)
        .map_err(|_| StoreError::Unavailable("unreadable stored headers".into()))?;
    Ok(values
        .into_iter()
        .map(|(name, value)| {
            let value = match value {
                HeaderValue::Text(s) => s.into_bytes(),
                HeaderValue::Bytes(b) => b,
            };
            (name, value)
        })
        .collect())
}

/// A listing query: `select`, the filters given (`column op $n`), newest
/// first, at most `limit`.
fn listing(
    select: &str,
    filters: &[(&str, &str, Option<Param>)],
    limit: Option<usize>,
) -> (String, Vec<Param>) {
    let mut sql = format!("{select} WHERE TRUE");
    let mut params = Vec::new();
    for (column, op, param) in filters {
        if let Some(param) = param {
            params.push(param.clone());
            sql.push_str(&format!(" AND {column} {op} ${}", params.len()));
        }
    }
    sql.push_str(" ORDER BY created_at DESC, id DESC");
    if let Some(limit) = limit {
        params.push(int(limit_param(limit)));
        sql.push_str(&format!(" LIMIT ${}", params.len()));
    }
    (sql, params)
}

/// A row of `shadow_decisions`; the same code for both databases.
fn decode_shadow<'r, R>(row: &'r R) -> Result<ShadowDecision, StoreError>
where
    R: Row,
    &'static str: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
{
    let failed =
        |column: &str| StoreError::Unavailable(format!("unreadable stored column {column}"));
    let text = |column: &'static str| -> Result<String, StoreError> {
        row.try_get(column).map_err(|_| failed(column))
    };
    let optional = |column: &'static str| -> Result<Option<String>, StoreError> {
        row.try_get(column).map_err(|_| failed(column))
    };
    let countersigners = match optional("countersigners")? {
        Some(list) => serde_json::from_str(&list).map_err(|_| failed("countersigners"))?,
        None => Vec::new(),
    };
    Ok(ShadowDecision {
        id: text("id")?,
        policy: text("policy")?,
        subject: optional("subject")?,
        decision: text("decision")?,
        problem_code: optional("problem_code")?,
        binding_message: optional("binding_message")?,
        countersigners,
        method: text("request_method")?,
        path: text("request_path")?,
        created_at: from_ms(
            row.try_get::<i64, _>("created_at")
                .map_err(|_| failed("created_at"))?,
        ),
    })
}

/// A row of [`columns!`] as an approval; the same code for both databases.
fn decode<'r, R>(row: &'r R) -> Result<Approval, StoreError>
where
    R: Row,
    &'static str: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    Vec<u8>: Decode<'r, R::Database> + Type<R::Database>,
{
    fn get<'r, R, T>(row: &'r R, column: &'static str) -> Result<T, StoreError>
    where
        R: Row,
        &'static str: ColumnIndex<R>,
        T: Decode<'r, R::Database> + Type<R::Database>,
    {
        row.try_get(column)
            .map_err(|_| StoreError::Unavailable(format!("unreadable stored column {column}")))
    }
    let time = |column| get::<R, i64>(row, column).map(from_ms);
    let opt_time = |column| get::<R, Option<i64>>(row, column).map(|t| t.map(from_ms));

    let state: String = get(row, "state")?;
    let state = ApprovalState::parse(&state)
        .ok_or_else(|| StoreError::Unavailable("unknown stored state".into()))?;
    let authorization_details = get::<R, Option<String>>(row, "authorization_details")?
        .map(|s| serde_json::from_str(&s))
        .transpose()
        .map_err(|_| StoreError::Unavailable("unreadable stored authorization_details".into()))?;
    let ciba = match get::<R, Option<String>>(row, "ciba_auth_req_id")? {
        None => None,
        Some(auth_req_id) => Some(CibaProgress {
            auth_req_id: Secret::new(auth_req_id),
            interval: Duration::from_millis(
                get::<R, Option<i64>>(row, "ciba_interval_ms")?
                    .unwrap_or(0)
                    .max(0)
                    .unsigned_abs(),
            ),
            next_poll_at: opt_time("ciba_next_poll_at")?.unwrap_or(std::time::UNIX_EPOCH),
            deadline: opt_time("ciba_deadline")?.unwrap_or(std::time::UNIX_EPOCH),
        }),
    };
    let response = match get::<R, Option<i64>>(row, "response_status")? {
        None => None,
        Some(status) => Some(StoredResponse {
            status: u16::try_from(status)
                .map_err(|_| StoreError::Unavailable("unreadable stored status".into()))?,
            headers: match get::<R, Option<Vec<u8>>>(row, "response_headers")? {
                Some(bytes) => decode_headers(&bytes)?,
                None => Vec::new(),
            },
            body: get(row, "response_body")?,
        }),
    };
    Ok(Approval {
        id: get(row, "id")?,
        policy: get(row, "policy")?,
        subject: get(row, "subject")?,
        upstream: get(row, "upstream")?,
        fingerprint: get(row, "fingerprint")?,
        idempotency_key: get(row, "idempotency_key")?,
        binding_message: get(row, "binding_message")?,
        authorization_details,
        request: StoredRequest {
            method: get(row, "request_method")?,
            path_and_query: get(row, "request_path_and_query")?,
            headers: decode_headers(&get::<R, Vec<u8>>(row, "request_headers")?)?,
            body: get::<R, Option<Vec<u8>>>(row, "request_body")?.unwrap_or_default(),
        },
        created_at: time("created_at")?,
        expires_at: time("expires_at")?,
        state,
        ciba,
        response,
        problem_code: get(row, "problem_code")?,
        updated_at: time("updated_at")?,
        decided_at: opt_time("decided_at")?,
        lease_owner: get(row, "lease_owner")?,
        lease_until: opt_time("lease_until")?,
        asked_at: opt_time("ciba_asked_at")?,
        delivered_at: opt_time("delivered_at")?,
        parent_id: get(row, "parent_id")?,
        countersign_min: get::<R, Option<i64>>(row, "countersign_min")?
            .and_then(|n| u32::try_from(n).ok()),
        trace_parent: get(row, "trace_parent")?,
        grant: get::<R, Option<String>>(row, "grant_token")?.map(|token| KeptGrant {
            token: Secret::new(token),
            dpop: matches!(
                get::<R, Option<String>>(row, "grant_kind")
                    .ok()
                    .flatten()
                    .as_deref(),
                Some("dpop")
            ),
        }),
        problem_detail: get(row, "problem_detail")?,
    })
}

/// A short description of a database error: never values, bodies or
/// `auth_req_id`s (database messages and details can quote them).
fn describe(e: &sqlx::Error) -> String {
    use sqlx::Error as E;
    match e {
        E::Database(d) => match d.code() {
            Some(code) => format!("database error {code}"),
            None => "database error".into(),
        },
        E::Io(io) => format!("I/O error: {}", io.kind()),
        E::Tls(_) => "TLS error".into(),
        E::PoolTimedOut => "timed out waiting for a connection".into(),
        E::PoolClosed => "connection pool closed".into(),
        E::WorkerCrashed => "database worker crashed".into(),
        E::Protocol(_) => "protocol error".into(),
        E::Configuration(_) => "configuration error".into(),
        E::Migrate(m) => describe_migrate(m),
        E::ColumnDecode { .. }
        | E::Decode(_)
        | E::ColumnNotFound(_)
        | E::ColumnIndexOutOfBounds { .. }
        | E::TypeNotFound { .. }
        | E::RowNotFound => "unexpected data".into(),
        _ => "driver error".into(),
    }
}

fn db_error(op: &'static str, e: &sqlx::Error) -> StoreError {
    StoreError::Unavailable(format!("{op}: {}", describe(e)))
}

fn describe_migrate(e: &MigrateError) -> String {
    match e {
        MigrateError::Execute(e) => describe(e),
        MigrateError::VersionMissing(v) => format!(
            "migration {v} is applied but unknown to this version (a newer gateway's database?)"
        ),
        MigrateError::VersionMismatch(v) => format!("migration {v} differs from the one applied"),
        MigrateError::Dirty(v) => format!("migration {v} was partially applied"),
        _ => "migration failed".into(),
    }
}

fn migrate_error(e: MigrateError) -> StoreError {
    StoreError::Unavailable(format!("migrate: {}", describe_migrate(&e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_final_states_in_sql_are_the_final_states() {
        let finals: Vec<String> = ApprovalState::ALL
            .into_iter()
            .filter(|s| s.is_final())
            .map(|s| format!("'{}'", s.as_str()))
            .collect();
        assert_eq!(final_states!(), format!("({})", finals.join(", ")));
    }

    #[test]
    fn headers_round_trip_text_and_bytes() {
        let headers = vec![
            ("content-type".to_owned(), b"application/json".to_vec()),
            ("x-binary".to_owned(), vec![0xff, 0x00, 0x80]),
            ("x-empty".to_owned(), Vec::new()),
        ];
        let bytes = encode_headers(&headers);
        assert!(String::from_utf8_lossy(&bytes).contains("\"application/json\""));
        assert_eq!(decode_headers(&bytes).unwrap(), headers);
    }
}
