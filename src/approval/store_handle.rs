//! Opening the configured store, on the engine's own runtime, and keeping
//! the gateway up while a PostgreSQL store is unreachable: until it can be
//! opened, every store call fails as unavailable (policy calls get `503
//! approval_store_unavailable`) and the next call tries again.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{Mutex, OnceCell};
use tokio::time::Instant;

use crate::config::{StoreBackend, StoreConfig};
use crate::metrics::Metrics;
use crate::store::{
    self, Approval, ApprovalState, ApprovalStore, CibaProgress, InsertTerms, Inserted, KeptGrant,
    ListFilter, NewApproval, ShadowDecision, ShadowFilter, StoreError, StoredResponse,
};

/// How often an unreachable store is tried again.
const REOPEN_AFTER: Duration = Duration::from_secs(1);

/// The store the configuration names; `countersign.db` beside `config_file`
/// when it names none.
#[derive(Debug)]
pub struct ConfiguredStore {
    backend: Backend,
    opened: OnceCell<Arc<dyn ApprovalStore>>,
    last_attempt: Mutex<Option<Instant>>,
    metrics: Option<Metrics>,
}

#[derive(Debug)]
enum Backend {
    Memory,
    Sqlite(PathBuf),
    Postgres(String),
}

impl ConfiguredStore {
    pub fn new(config: &StoreConfig, config_file: &Path) -> Self {
        let backend = match &config.backend {
            StoreBackend::Memory => Backend::Memory,
            StoreBackend::Sqlite(Some(path)) => Backend::Sqlite(
                config_file
                    .parent()
                    .unwrap_or_else(|| Path::new("."))
                    .join(path),
            ),
            StoreBackend::Sqlite(None) => Backend::Sqlite(
                config_file
                    .parent()
                    .unwrap_or_else(|| Path::new("."))
                    .join("countersign.db"),
            ),
            StoreBackend::Postgres(url) => Backend::Postgres(url.0.expose().to_owned()),
        };
        Self {
            backend,
            opened: OnceCell::new(),
            last_attempt: Mutex::new(None),
            metrics: None,
        }
    }

    /// Times every operation and counts the failed ones
    /// (`countersign_store_*`).
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    async fn timed<T>(
        &self,
        op: &'static str,
        work: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let started = Instant::now();
        let result = work.await;
        if let Some(metrics) = &self.metrics {
            metrics
                .store_duration
                .with_label_values(&[op])
                .observe(started.elapsed().as_secs_f64());
            // The operation's error series exists (at 0) once it has run,
            // so that its first failure is an increase.
            let errors = metrics.store_errors.with_label_values(&[op]);
            if matches!(result, Err(StoreError::Unavailable(_))) {
                errors.inc();
            }
        }
        result
    }

    /// Whether a failure to open at start is fatal: a local file that cannot
    /// be opened is a configuration error; a database server may come back.
    pub fn must_open_at_start(&self) -> bool {
        !matches!(self.backend, Backend::Postgres(_))
    }

    /// The SQLite file, when the store is one.
    pub fn sqlite_path(&self) -> Option<&Path> {
        match &self.backend {
            Backend::Sqlite(path) => Some(path),
            _ => None,
        }
    }

    pub fn describe(&self) -> String {
        match &self.backend {
            Backend::Memory => "memory (approvals are lost on restart)".to_owned(),
            Backend::Sqlite(path) => format!("SQLite {}", path.display()),
            Backend::Postgres(_) => "PostgreSQL".to_owned(),
        }
    }

    pub async fn open(&self) -> Result<&Arc<dyn ApprovalStore>, StoreError> {
        if let Some(store) = self.opened.get() {
            return Ok(store);
        }
        {
            let mut last = self.last_attempt.lock().await;
            if last.is_some_and(|t| t.elapsed() < REOPEN_AFTER) && self.opened.get().is_none() {
                return Err(StoreError::Unavailable("not reachable".into()));
            }
            *last = Some(Instant::now());
        }
        self.opened
            .get_or_try_init(|| async {
                match &self.backend {
                    Backend::Memory => Ok(store::memory()),
                    Backend::Sqlite(path) => store::open_sqlite(path).await,
                    Backend::Postgres(url) => store::open_postgres(url).await,
                }
            })
            .await
    }
}

#[async_trait::async_trait]
impl ApprovalStore for ConfiguredStore {
    async fn insert_or_attach(
        &self,
        a: &NewApproval,
        terms: InsertTerms<'_>,
    ) -> Result<Inserted, StoreError> {
        self.timed("insert_or_attach", async {
            self.open().await?.insert_or_attach(a, terms).await
        })
        .await
    }
    fn now(&self) -> SystemTime {
        self.opened
            .get()
            .map_or_else(SystemTime::now, |store| store.now())
    }
    async fn mark_asked(&self, id: &str, owner: &str) -> Result<bool, StoreError> {
        self.timed("mark_asked", async {
            self.open().await?.mark_asked(id, owner).await
        })
        .await
    }
    async fn mark_delivered(&self, id: &str) -> Result<bool, StoreError> {
        self.timed("mark_delivered", async {
            self.open().await?.mark_delivered(id).await
        })
        .await
    }
    async fn claim(&self, id: &str, owner: &str, until: SystemTime) -> Result<bool, StoreError> {
        self.timed("claim", async {
            self.open().await?.claim(id, owner, until).await
        })
        .await
    }
    async fn record_shadow(&self, decision: &ShadowDecision) -> Result<(), StoreError> {
        self.timed("record_shadow", async {
            self.open().await?.record_shadow(decision).await
        })
        .await
    }
    async fn list_shadow(&self, filter: &ShadowFilter) -> Result<Vec<ShadowDecision>, StoreError> {
        self.timed("list_shadow", async {
            self.open().await?.list_shadow(filter).await
        })
        .await
    }
    async fn keep_grant(&self, id: &str, grant: &KeptGrant) -> Result<bool, StoreError> {
        self.timed("keep_grant", async {
            self.open().await?.keep_grant(id, grant).await
        })
        .await
    }
    async fn family(&self, parent_id: &str) -> Result<Vec<Approval>, StoreError> {
        self.timed("family", async {
            self.open().await?.family(parent_id).await
        })
        .await
    }
    async fn end_parent(
        &self,
        id: &str,
        to: ApprovalState,
        problem_code: &str,
        detail: &str,
    ) -> Result<bool, StoreError> {
        self.timed("end_parent", async {
            self.open()
                .await?
                .end_parent(id, to, problem_code, detail)
                .await
        })
        .await
    }
    async fn close_children(
        &self,
        parent_id: &str,
        forwarded: bool,
        problem_code: &str,
    ) -> Result<(), StoreError> {
        self.timed("close_children", async {
            self.open()
                .await?
                .close_children(parent_id, forwarded, problem_code)
                .await
        })
        .await
    }
    async fn release(&self, owner: &str) -> Result<(), StoreError> {
        self.timed("release", async { self.open().await?.release(owner).await })
            .await
    }
    async fn get(&self, id: &str) -> Result<Option<Approval>, StoreError> {
        self.timed("get", async { self.open().await?.get(id).await })
            .await
    }
    async fn set_ciba(&self, id: &str, ciba: &CibaProgress) -> Result<(), StoreError> {
        self.timed("set_ciba", async {
            self.open().await?.set_ciba(id, ciba).await
        })
        .await
    }
    async fn transition(
        &self,
        id: &str,
        from: ApprovalState,
        to: ApprovalState,
        code: Option<&str>,
    ) -> Result<bool, StoreError> {
        self.timed("transition", async {
            self.open().await?.transition(id, from, to, code).await
        })
        .await
    }
    async fn finish(&self, id: &str, response: &StoredResponse) -> Result<bool, StoreError> {
        self.timed("finish", async {
            self.open().await?.finish(id, response).await
        })
        .await
    }
    async fn lease(&self, id: &str, owner: &str, until: SystemTime) -> Result<bool, StoreError> {
        self.timed("lease", async {
            self.open().await?.lease(id, owner, until).await
        })
        .await
    }
    async fn heartbeat(&self, owner: &str, alive_until: SystemTime) -> Result<(), StoreError> {
        self.timed("heartbeat", async {
            self.open().await?.heartbeat(owner, alive_until).await
        })
        .await
    }
    async fn orphans(
        &self,
        now: SystemTime,
        limit: usize,
        mine: &str,
    ) -> Result<Vec<Approval>, StoreError> {
        self.timed("orphans", async {
            self.open().await?.orphans(now, limit, mine).await
        })
        .await
    }
    async fn mark_unknown_outcomes(&self, now: SystemTime) -> Result<u64, StoreError> {
        self.timed("mark_unknown_outcomes", async {
            self.open().await?.mark_unknown_outcomes(now).await
        })
        .await
    }
    async fn sweep(&self, now: SystemTime, w: Duration, r: Duration) -> Result<(), StoreError> {
        self.timed("sweep", async { self.open().await?.sweep(now, w, r).await })
            .await
    }
    async fn list(&self, filter: &ListFilter) -> Result<Vec<Approval>, StoreError> {
        self.timed("list", async { self.open().await?.list(filter).await })
            .await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.timed("ping", async { self.open().await?.ping().await })
            .await
    }
}
