//! Operating the gateway: readiness and liveness as an orchestrator probes
//! them, and the logs and metrics of agents that hang up.

mod support;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use countersign::gateway::{Gateway, Shutdown};
use serde_json::Value;
use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_countersign");

/// The development authorization server, in-process: no Node needed.
async fn dev_authz() -> countersign::dev::DevAuthz {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    countersign::dev::authz::serve(listener, countersign::dev::AuthzOptions::default())
        .await
        .unwrap()
}

async fn get(url: String) -> (u16, String) {
    let response = reqwest::get(url).await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

/// `/readyz` of the real gateway follows every registered check, and says
/// which one failed; `/healthz` keeps answering.
#[tokio::test(flavor = "multi_thread")]
async fn readyz_answers_503_with_the_reason_while_a_check_fails() {
    let authz = dev_authz().await;
    let shop = start_shop_for(authz.issuer(), authz.jwks_uri()).await;
    let dir = tempfile::tempdir().unwrap();
    let (file, proxy, admin) =
        write_config(dir.path(), authz.issuer(), &shop, &GatewayOptions::dev());
    let store_up = Arc::new(AtomicBool::new(true));
    let shutdown = Shutdown::new();
    let (signal, up) = (shutdown.clone(), store_up.clone());
    let thread = std::thread::spawn(move || {
        let gateway = Gateway::build(countersign::config::load(&file).unwrap()).unwrap();
        // What an approval store would register.
        gateway.readiness.register("store", move || {
            let reachable = up.load(Ordering::SeqCst);
            async move {
                match reachable {
                    true => Ok(()),
                    false => Err("connection refused".to_owned()),
                }
            }
        });
        gateway.run_until(signal);
    });
    wait_listening(proxy).await;
    wait_listening(admin).await;

    let (status, body) = get(format!("http://{admin}/readyz")).await;
    assert_eq!(status, 200, "{body}");
    let report: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["status"], "ready");
    for check in ["proxy_listener", "authorization_server", "store"] {
        assert_eq!(report["checks"][check], "ok", "{body}");
    }

    store_up.store(false, Ordering::SeqCst);
    let (status, body) = get(format!("http://{admin}/readyz")).await;
    assert_eq!(status, 503, "{body}");
    let report: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["status"], "not_ready");
    assert_eq!(report["reason"], "store: connection refused");
    assert_eq!(report["checks"]["proxy_listener"], "ok");
    assert_eq!(get(format!("http://{admin}/healthz")).await.0, 200);

    store_up.store(true, Ordering::SeqCst);
    assert_eq!(get(format!("http://{admin}/readyz")).await.0, 200);
    shutdown.trigger();
    thread.join().unwrap();
}

/// `countersign run` as a process: ready once it serves, live throughout.
#[tokio::test(flavor = "multi_thread")]
async fn the_binary_is_ready_once_it_serves() {
    let authz = dev_authz().await;
    let shop = start_shop_for(authz.issuer(), authz.jwks_uri()).await;
    let dir = tempfile::tempdir().unwrap();
    let (config, proxy, admin) =
        write_config(dir.path(), authz.issuer(), &shop, &GatewayOptions::dev());
    let child = KillOnDrop(
        Command::new(BIN)
            .args(["run", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_listening(proxy).await;
    wait_listening(admin).await;
    let (status, body) = get(format!("http://{admin}/readyz")).await;
    assert_eq!(status, 200, "{body}");
    let report: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["checks"]["proxy_listener"], "ok", "{body}");
    assert_eq!(
        get(format!("http://{admin}/healthz")).await,
        (200, "ok\n".into())
    );
    drop(child);
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
