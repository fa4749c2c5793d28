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
use crate::store::{
    self, Approval, ApprovalState, ApprovalStore, CibaProgress, Inserted, ListFilter, NewApproval,
    StoreError, StoredResponse,
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
        }
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
    async fn insert_or_attach(&self, a: &NewApproval, w: Duration) -> Result<Inserted, StoreError> {
        self.open().await?.insert_or_attach(a, w).await
    }
    async fn get(&self, id: &str) -> Result<Option<Approval>, StoreError> {
        self.open().await?.get(id).await
    }
    async fn set_ciba(&self, id: &str, ciba: &CibaProgress) -> Result<(), StoreError> {
        self.open().await?.set_ciba(id, ciba).await
    }
    async fn transition(
        &self,
        id: &str,
        from: ApprovalState,
        to: ApprovalState,
        code: Option<&str>,
    ) -> Result<bool, StoreError> {
        self.open().await?.transition(id, from, to, code).await
    }
    async fn finish(&self, id: &str, response: &StoredResponse) -> Result<bool, StoreError> {
        self.open().await?.finish(id, response).await
    }
    async fn lease(&self, id: &str, owner: &str, until: SystemTime) -> Result<bool, StoreError> {
        self.open().await?.lease(id, owner, until).await
    }
    async fn orphans(&self, now: SystemTime, limit: usize) -> Result<Vec<Approval>, StoreError> {
        self.open().await?.orphans(now, limit).await
    }
    async fn mark_unknown_outcomes(&self, now: SystemTime) -> Result<u64, StoreError> {
        self.open().await?.mark_unknown_outcomes(now).await
    }
    async fn sweep(&self, now: SystemTime, w: Duration, r: Duration) -> Result<(), StoreError> {
        self.open().await?.sweep(now, w, r).await
    }
    async fn count_pending(&self, subject: &str) -> Result<usize, StoreError> {
        self.open().await?.count_pending(subject).await
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<Approval>, StoreError> {
        self.open().await?.list(filter).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.open().await?.ping().await
    }
}
