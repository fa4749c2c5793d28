//! Hot reload: on SIGHUP, and when the configuration file or a policy file
//! (or a policy directory's list of files) changes, the whole configuration
//! is loaded and validated again and, if nothing but policies changed, the
//! policy set is swapped at once ([`LivePolicies`]).
//!
//! - A broken edit keeps the running set: one `warn` line with the error
//!   (file:line:key), `countersign_config_reload_total{result="error"}`.
//! - A change to any key of the main file other than `policies` (listeners,
//!   upstreams, routes, the authorization server, identity, store, limits,
//!   `default_action`, `approvals_path`) needs a restart: it is reported
//!   (`result="restart_required"`, naming the keys) and nothing is applied,
//!   not even the policy changes that came with it.
//! - A call reads the set once ([`LivePolicies::load_full`]) and keeps it;
//!   an approval started under a policy finishes under that policy
//!   ([`crate::approval::engine::Engine::start`]).
//!
//! Files are watched by reading them every [`WATCH_INTERVAL`] (they are
//! small) and comparing digests, so editors that replace a file by renaming
//! and directories whose files come and go are seen alike; a change is
//! applied once two readings agree, so a file caught half-written is not
//! loaded.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use crate::config::{self, Config};
use crate::metrics::Metrics;
use crate::policy::LivePolicies;

/// How often watched files are read.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(500);

/// What a reload did: the `result` label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadResult {
    /// The new policies are in force.
    Ok { policies: usize },
    /// The configuration does not load; the running policies stay.
    Error(String),
    /// Keys that need a restart changed; nothing was applied.
    RestartRequired(Vec<String>),
}

impl ReloadResult {
    pub fn label(&self) -> &'static str {
        match self {
            Self::Ok { .. } => "ok",
            Self::Error(_) => "error",
            Self::RestartRequired(_) => "restart_required",
        }
    }
}

/// Reloads one gateway's configuration.
#[derive(Debug)]
pub struct Reloader {
    file: PathBuf,
    /// The main file as the running gateway loaded it, without `policies`.
    running: serde_yaml::Mapping,
    live: Arc<LivePolicies>,
    metrics: Metrics,
    /// One reload at a time.
    busy: Mutex<()>,
}

/// Unix seconds now.
fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// The main file's top-level keys other than `policies`; a file that is not
/// a YAML mapping reads as empty (it will not load anyway).
fn restart_keys(text: &str) -> serde_yaml::Mapping {
    let mut mapping = match serde_yaml::from_str::<serde_yaml::Value>(text) {
        Ok(serde_yaml::Value::Mapping(mapping)) => mapping,
        _ => serde_yaml::Mapping::new(),
    };
    mapping.remove("policies");
    mapping.remove("shadow_policies");
    mapping
}

impl Reloader {
    /// For a gateway started with `config`; `live` is the set it serves.
    pub fn new(config: &Config, live: Arc<LivePolicies>, metrics: Metrics) -> Self {
        Self::for_file(config.file.clone(), &config.text, live, metrics)
    }

    /// For a gateway that loaded `file` whose text was `text`.
    pub fn for_file(file: PathBuf, text: &str, live: Arc<LivePolicies>, metrics: Metrics) -> Self {
        metrics.config_last_good_load.set(now());
        Self {
            file,
            running: restart_keys(text),
            live,
            metrics,
            busy: Mutex::new(()),
        }
    }

    /// Loads and validates the configuration again and applies it if only
    /// policies changed. Blocking (file I/O); logs and counts the result.
    pub fn reload(&self, cause: &str) -> ReloadResult {
        let _one = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let result = self.try_reload();
        self.metrics
            .config_reloads
            .with_label_values(&[result.label()])
            .inc();
        match &result {
            ReloadResult::Ok { policies } => {
                self.metrics.config_last_good_load.set(now());
                tracing::info!(
                    cause,
                    policies,
                    "configuration reloaded; new calls use the new policies"
                );
            }
            ReloadResult::Error(error) => {
                tracing::warn!(cause, %error, "configuration reload failed; the running policies stay")
            }
            ReloadResult::RestartRequired(keys) => tracing::warn!(
                cause,
                keys = %keys.join(", "),
                "configuration changes need a restart; nothing was applied"
            ),
        }
        result
    }

    fn try_reload(&self) -> ReloadResult {
        let config = match config::load(&self.file) {
            Ok(config) => config,
            Err(error) => return ReloadResult::Error(error.to_string()),
        };
        let changed = changed_keys(&self.running, &restart_keys(&config.text));
        if !changed.is_empty() {
            return ReloadResult::RestartRequired(changed);
        }
        let policies = config.policies.policies().len();
        self.live.store(Arc::new(config.policies));
        ReloadResult::Ok { policies }
    }

    /// The digest of every file the configuration reads now.
    pub fn fingerprint(&self) -> Vec<u8> {
        fingerprint(&self.file)
    }

    /// Reloads on SIGHUP and whenever the watched files change, until the
    /// runtime it runs on stops.
    pub async fn run(self: Arc<Self>) {
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(signal) => Some(signal),
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGHUP; reloads follow file changes only");
                None
            }
        };
        let mut seen = self.fingerprint();
        // A change seen once, applied when the next reading agrees.
        let mut settling = false;
        let mut tick = tokio::time::interval(WATCH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let cause = tokio::select! {
                Some(()) = async {
                    match hangup.as_mut() {
                        Some(signal) => signal.recv().await,
                        None => std::future::pending().await,
                    }
                } => "SIGHUP",
                _ = tick.tick() => {
                    let now = self.blocking(|r| r.fingerprint()).await;
                    if now != seen {
                        seen = now;
                        settling = true;
                        continue;
                    }
                    if !settling {
                        continue;
                    }
                    "file changed"
                }
            };
            settling = false;
            // Read before loading: an edit made while loading is seen next.
            seen = self.blocking(|r| r.fingerprint()).await;
            self.blocking(move |r| r.reload(cause)).await;
        }
    }

    async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        work: impl FnOnce(&Self) -> T + Send + 'static,
    ) -> T {
        let this = self.clone();
        match tokio::task::spawn_blocking(move || work(&this)).await {
            Ok(value) => value,
            Err(error) => std::panic::resume_unwind(error.into_panic()),
        }
    }
}

/// Top-level keys whose values differ, in name order.
fn changed_keys(running: &serde_yaml::Mapping, new: &serde_yaml::Mapping) -> Vec<String> {
    let keys: BTreeSet<String> = running
        .keys()
        .chain(new.keys())
        .map(|k| match k {
            serde_yaml::Value::String(s) => s.clone(),
            other => format!("{other:?}"),
        })
        .collect();
    keys.into_iter()
        .filter(|k| running.get(k.as_str()) != new.get(k.as_str()))
        .collect()
}

/// A digest of the main file and of every policy file (and policy
/// directory listing) it names now; missing files count as a state too.
fn fingerprint(file: &Path) -> Vec<u8> {
    let mut digest = Sha256::new();
    let text = std::fs::read(file).ok();
    feed(&mut digest, file, text.as_deref());
    let main = text
        .as_deref()
        .and_then(|t| serde_yaml::from_slice::<serde_yaml::Value>(t).ok());
    let entries: Vec<PathBuf> = ["policies", "shadow_policies"]
        .into_iter()
        .filter_map(|key| main.as_ref().and_then(|v| v.get(key)).cloned())
        .filter_map(|p| serde_yaml::from_value::<Vec<PathBuf>>(p).ok())
        .flatten()
        .collect();
    let base = file.parent().unwrap_or_else(|| Path::new("."));
    for entry in entries {
        let path = base.join(entry);
        match config::policy_files(&path, file) {
            Ok(files) => {
                for policy in files {
                    feed(&mut digest, &policy, stamp(&policy).as_deref());
                }
            }
            Err(_) => feed(&mut digest, &path, None),
        }
    }
    digest.finalize().to_vec()
}

/// What changes whenever a policy file does, mostly without reading it:
/// reading and hashing 1,000 policy files twice a second cost as much CPU
/// as a busy proxy worker. The change time (`ctime`) moves on every write,
/// even one that keeps the size and sets the modification time back; a
/// replaced file has a new inode. File times are as coarse as the kernel's
/// clock tick, so a file changed in the last seconds is read as well: two
/// writes of the same size within one tick stay apart.
fn stamp(path: &Path) -> Option<Vec<u8>> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    let mut stamp = Vec::with_capacity(40);
    for value in [
        meta.len() as i64,
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec(),
        meta.ino() as i64,
    ] {
        stamp.extend_from_slice(&value.to_le_bytes());
    }
    let changed =
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(meta.ctime().max(0) as u64);
    let recent = std::time::SystemTime::now()
        .duration_since(changed)
        .is_ok_and(|age| age < std::time::Duration::from_secs(3));
    if recent {
        stamp.extend_from_slice(&std::fs::read(path).ok()?);
    }
    Some(stamp)
}

fn feed(digest: &mut Sha256, path: &Path, content: Option<&[u8]>) {
    let name = path.as_os_str().as_encoded_bytes();
    digest.update((name.len() as u64).to_le_bytes());
    digest.update(name);
    match content {
        Some(bytes) => {
            digest.update([1]);
            digest.update((bytes.len() as u64).to_le_bytes());
            digest.update(bytes);
        }
        None => digest.update([0]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_keys_other_than_policies_need_a_restart() {
        let running =
            restart_keys("listen: { proxy: 1 }\npolicies: [a]\nlimits: { max_hold: 1m }\n");
        let policies_only =
            restart_keys("listen: { proxy: 1 }\npolicies: [a, b]\nlimits: { max_hold: 1m }\n");
        assert!(changed_keys(&running, &policies_only).is_empty());
        let moved = restart_keys(
            "listen: { proxy: 2 }\npolicies: [a]\nstore: memory\nlimits: { max_hold: 1m }\n",
        );
        assert_eq!(changed_keys(&running, &moved), ["listen", "store"]);
    }

    #[test]
    fn the_fingerprint_follows_files_and_directories() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("c.yaml");
        std::fs::create_dir(dir.path().join("p")).unwrap();
        std::fs::write(&main, "policies: [p, one.yaml]\n").unwrap();
        let first = fingerprint(&main);
        assert_eq!(first, fingerprint(&main));
        std::fs::write(dir.path().join("one.yaml"), "policies: []\n").unwrap();
        let with_file = fingerprint(&main);
        assert_ne!(first, with_file);
        std::fs::write(dir.path().join("p/a.yaml"), "policies: []\n").unwrap();
        let with_dir_file = fingerprint(&main);
        assert_ne!(with_file, with_dir_file);
        // Not a policy file: ignored.
        std::fs::write(dir.path().join("p/notes.txt"), "x").unwrap();
        assert_eq!(with_dir_file, fingerprint(&main));
        std::fs::write(dir.path().join("p/a.yaml"), "policies: [ ]\n").unwrap();
        assert_ne!(with_dir_file, fingerprint(&main));
    }
}
