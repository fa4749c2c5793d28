//! Readiness: named checks that `/readyz` runs on every probe. The gateway
//! registers its own; any component the gateway depends on (an approval
//! store, say) registers one more, and `/readyz` answers 200 only while all
//! of them pass.

use std::future::Future;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// How long one check may take before it counts as failed.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

type CheckFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;
type CheckFn = Arc<dyn Fn() -> CheckFuture + Send + Sync>;

/// The registered checks; cheap to clone, every clone shares them.
#[derive(Clone, Default)]
pub struct Readiness {
    checks: Arc<RwLock<Vec<(String, CheckFn)>>>,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self
            .checks
            .read()
            .map(|checks| checks.iter().map(|(name, _)| name.clone()).collect())
            .unwrap_or_default();
        f.debug_struct("Readiness").field("checks", &names).finish()
    }
}

/// The outcome of one probe: each check's name and its error, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub checks: Vec<(String, Result<(), String>)>,
}

impl Report {
    pub fn ready(&self) -> bool {
        self.checks.iter().all(|(_, result)| result.is_ok())
    }

    /// `{"status":"ready"|"not_ready","reason":…,"checks":{name:"ok"|error}}`;
    /// `reason` (only when not ready) names the first failed check.
    pub fn to_json(&self) -> String {
        let checks: serde_json::Map<String, serde_json::Value> = self
            .checks
            .iter()
            .map(|(name, result)| {
                let value = match result {
                    Ok(()) => "ok".to_owned(),
                    Err(error) => error.clone(),
                };
                (name.clone(), value.into())
            })
            .collect();
        let mut body = serde_json::json!({
            "status": if self.ready() { "ready" } else { "not_ready" },
            "checks": checks,
        });
        if let Some((name, Err(error))) = self.checks.iter().find(|(_, r)| r.is_err()) {
            body["reason"] = format!("{name}: {error}").into();
        }
        body.to_string()
    }
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a check. It runs on every probe (with [`CHECK_TIMEOUT`]), so it
    /// should be cheap: a local connection, a ping, a flag.
    pub fn register<F, Fut>(&self, name: impl Into<String>, check: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        let check: CheckFn = Arc::new(move || Box::pin(check()) as CheckFuture);
        if let Ok(mut checks) = self.checks.write() {
            checks.push((name.into(), check));
        }
    }

    /// Runs every check, concurrently. Must be called within a tokio runtime.
    pub async fn report(&self) -> Report {
        let checks: Vec<(String, CheckFn)> = self
            .checks
            .read()
            .map(|checks| checks.clone())
            .unwrap_or_default();
        let running: Vec<_> = checks
            .into_iter()
            .map(|(name, check)| {
                let task = tokio::spawn(tokio::time::timeout(CHECK_TIMEOUT, check()));
                (name, task)
            })
            .collect();
        let mut results = Vec::with_capacity(running.len());
        for (name, task) in running {
            let result = match task.await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(format!("no answer within {} s", CHECK_TIMEOUT.as_secs())),
                Err(e) => Err(format!("the check failed: {e}")),
            };
            results.push((name, result));
        }
        Report { checks: results }
    }
}

/// Whether something accepts TCP connections on `listen` (an unspecified
/// address is probed on loopback).
pub async fn accepts_connections(listen: SocketAddr) -> Result<(), String> {
    let mut addr = listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
        });
    }
    tokio::net::TcpStream::connect(addr)
        .await
        .map(drop)
        .map_err(|e| format!("nothing accepts connections on {listen}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ready_only_while_every_check_passes() {
        let readiness = Readiness::new();
        assert!(readiness.report().await.ready());
        readiness.register("always", || async { Ok(()) });
        let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = flag.clone();
        readiness.register("store", move || {
            let up = seen.load(std::sync::atomic::Ordering::SeqCst);
            async move {
                if up {
                    Ok(())
                } else {
                    Err("unreachable".to_owned())
                }
            }
        });
        let report = readiness.clone().report().await;
        assert!(!report.ready());
        let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        assert_eq!(json["status"], "not_ready");
        assert_eq!(json["reason"], "store: unreachable");
        assert_eq!(json["checks"]["always"], "ok");
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
        let json: serde_json::Value =
            serde_json::from_str(&readiness.report().await.to_json()).unwrap();
        assert_eq!(json["status"], "ready");
        assert!(json.get("reason").is_none());
    }

    #[tokio::test]
    async fn a_check_that_hangs_fails() {
        let readiness = Readiness::new();
        readiness.register("slow", std::future::pending);
        let report = readiness.report().await;
        assert!(!report.ready());
        assert!(report.to_json().contains("no answer within"));
    }

    #[tokio::test]
    async fn a_closed_port_does_not_accept() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        assert!(accepts_connections(addr).await.is_ok());
        let unspecified = SocketAddr::from((Ipv4Addr::UNSPECIFIED, addr.port()));
        assert!(accepts_connections(unspecified).await.is_ok());
        drop(listener);
        let error = accepts_connections(addr).await.unwrap_err();
        assert!(error.contains(&addr.to_string()), "{error}");
    }
}
