//! Operating the gateway: readiness and liveness as an orchestrator probes
//! them, and the logs and metrics of agents that hang up.

mod support;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use countersign::gateway::{Gateway, Shutdown};
use serde_json::Value;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BIN: &str = env!("CARGO_BIN_EXE_countersign");

/// The development authorization server (in-process: no Node needed), the
/// shop that trusts it, and a gateway configuration for both written into
/// a temporary folder, not yet started.
struct DevConfig {
    _authz: countersign::dev::DevAuthz,
    _shop: countersign::demo::shop::ShopHandle,
    dir: tempfile::TempDir,
    file: std::path::PathBuf,
    proxy: std::net::SocketAddr,
    admin: std::net::SocketAddr,
}

impl DevConfig {
    async fn write(options: &GatewayOptions) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authz =
            countersign::dev::authz::serve(listener, countersign::dev::AuthzOptions::default())
                .await
                .unwrap();
        let shop = start_shop_for(authz.issuer(), authz.jwks_uri()).await;
        let dir = tempfile::tempdir().unwrap();
        let (file, proxy, admin) = write_config(dir.path(), authz.issuer(), &shop, options);
        Self {
            _authz: authz,
            _shop: shop,
            dir,
            file,
            proxy,
            admin,
        }
    }
}

async fn get(url: String) -> (u16, String) {
    let response = reqwest::get(url).await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

/// `/readyz` of the real gateway follows every registered check, and says
/// which one failed; `/healthz` keeps answering.
#[tokio::test(flavor = "multi_thread")]
async fn readyz_answers_503_with_the_reason_while_a_check_fails() {
    let dev = DevConfig::write(&GatewayOptions::dev()).await;
    let (file, proxy, admin) = (dev.file, dev.proxy, dev.admin);
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
    let dev = DevConfig::write(&GatewayOptions::dev()).await;
    let (config, proxy, admin) = (dev.file, dev.proxy, dev.admin);
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

/// An upstream that answers every request after `delay`.
async fn slow_upstream(delay: Duration) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                tokio::time::sleep(delay).await;
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                tokio::time::sleep(Duration::from_secs(1)).await;
            });
        }
    });
    addr
}

/// An agent that sends `request` and hangs up after `after`: with a FIN, or
/// with a reset when `reset`.
async fn hang_up(proxy: std::net::SocketAddr, request: String, after: Duration, reset: bool) {
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    tokio::time::sleep(after).await;
    if reset {
        stream.set_zero_linger().unwrap();
    }
    drop(stream);
}

fn calls_with_outcome(metrics: &str, outcome: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("countersign_calls_total{"))
        .filter(|l| l.contains(&format!("outcome=\"{outcome}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Agents that hang up mid-call (waiting for a slow upstream, held for
/// approval, or half-way through their body) are no error: the real binary
/// logs no ERROR line for 200 of them, and counts each as
/// `client_disconnected`.
#[tokio::test(flavor = "multi_thread")]
async fn agents_hanging_up_are_counted_not_logged_as_errors() {
    let slow = slow_upstream(Duration::from_millis(1500)).await;
    let options = GatewayOptions {
        upstream: Some(slow.to_string()),
        limits: "{ max_body_bytes: 1024, max_hold: 60s, max_pending_per_user: 100 }",
        ..GatewayOptions::dev()
    };
    let dev = DevConfig::write(&options).await;
    let (config, proxy, admin) = (dev.file, dev.proxy, dev.admin);
    let log_path = dev.dir.path().join("gateway.log");
    let child = KillOnDrop(
        Command::new(BIN)
            .args(["run", "--config"])
            .arg(&config)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_listening(proxy).await;
    wait_listening(admin).await;

    let body = r#"{"product":"XYZ phone","qty":2,"priceLimit":900}"#;
    let mut agents = Vec::new();
    for i in 0..200u32 {
        let reset = i % 2 == 0;
        let (request, after) = match i % 10 {
            // Held for approval, gone before anyone answers.
            0 | 1 => (
                format!(
                    "POST /shop HTTP/1.1\r\nHost: shop\r\n{USER_HEADER}: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                    if i % 20 < 10 { "alice" } else { "bob" },
                    body.len()
                ),
                Duration::from_millis(700),
            ),
            // Half-way through the body of a held route.
            2 => (
                format!(
                    "POST /shop HTTP/1.1\r\nHost: shop\r\n{USER_HEADER}: alice\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{}",
                    body.len(),
                    &body[..10]
                ),
                Duration::from_millis(200),
            ),
            // Passing through, waiting for the slow upstream.
            _ => (
                format!("GET /products?page={i} HTTP/1.1\r\nHost: shop\r\n\r\n"),
                Duration::from_millis(300),
            ),
        };
        agents.push(tokio::spawn(hang_up(proxy, request, after, reset)));
    }
    for agent in agents {
        agent.await.unwrap();
    }
    // The slow upstream answers 1.5 s after each request; holds end at once.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let metrics = loop {
        let (_, metrics) = get(format!("http://{admin}/metrics")).await;
        if calls_with_outcome(&metrics, "client_disconnected") >= 200
            || std::time::Instant::now() > deadline
        {
            break metrics;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(child);

    let logs = std::fs::read_to_string(&log_path).unwrap();
    let errors: Vec<&str> = logs.lines().filter(|l| l.contains("ERROR")).collect();
    assert!(
        errors.is_empty(),
        "{} ERROR lines:\n{}",
        errors.len(),
        errors.join("\n")
    );
    let disconnected = calls_with_outcome(&metrics, "client_disconnected");
    assert_eq!(disconnected, 200, "{metrics}");
    for policy in ["none", "buy-product"] {
        let label = format!(
            "countersign_calls_total{{outcome=\"client_disconnected\",policy=\"{policy}\"}}"
        );
        assert!(metrics.contains(&label), "{label}: {metrics}");
    }
    let lines = logs
        .lines()
        .filter(|l| l.contains("outcome=\"client_disconnected\""))
        .count();
    assert_eq!(lines, 200, "{logs}");
}

/// `countersign dev` serves the admin listener without being asked, and
/// prints where.
#[tokio::test]
async fn dev_mode_prints_a_metrics_url_that_serves_metrics() {
    let mut child = KillOnDrop(
        Command::new(BIN)
            .args([
                "dev",
                "--port",
                "0",
                "--authz-port",
                "0",
                "--shop-port",
                "0",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let printed = support::process::dev_mode_text(stdout, Duration::from_secs(30));
    let url = printed
        .lines()
        .find(|l| l.trim_start().starts_with("metrics"))
        .and_then(|l| l.split_whitespace().find(|w| w.starts_with("http://")))
        .unwrap_or_else(|| panic!("no metrics URL in:\n{printed}"))
        .to_owned();
    assert!(url.ends_with("/metrics"), "{url}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (status, body) = loop {
        match reqwest::get(&url).await {
            Ok(response) => break (response.status(), response.text().await.unwrap()),
            Err(e) if std::time::Instant::now() > deadline => panic!("{url}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    assert_eq!(status, 200);
    assert!(body.contains("countersign_build_info"), "{body}");
}

/// SIGTERM, as Kubernetes stops a pod: a held call is answered at once with
/// `shutting_down` (its approval stays pending), a call already passing
/// through finishes, no new call is accepted, the process exits 0 within a
/// few seconds, and after the restart the agent's retry attaches to the
/// same approval: the person is asked once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_answers_held_calls_lets_passing_calls_finish_and_exits_0() {
    use support::process::GatewayProcess;
    let (peer, shop) = flows::peer_and_shop().await;
    let upstream = slow_upstream(Duration::from_millis(1500)).await;
    let store = tempfile::tempdir().unwrap();
    let mut gateway = GatewayProcess::start(
        &peer,
        &shop,
        GatewayOptions {
            upstream: Some(upstream.to_string()),
            extra_config: format!(
                "store: {{ sqlite: \"{}\", lease: 2s }}",
                store.path().join("approvals.db").display()
            ),
            ..GatewayOptions::default()
        },
    )
    .await;
    let agent = reqwest::Client::new();
    let held = tokio::spawn(gateway.buy(&agent, "alice", phones()).send());
    let auth_req_id = peer.wait_pending(Some("alice"), 1).await[0]["auth_req_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let passing = tokio::spawn(agent.get(gateway.url("/products")).send());
    tokio::time::sleep(Duration::from_millis(300)).await;

    let stopping = std::time::Instant::now();
    let exit = tokio::spawn(async move {
        let status = gateway.terminate(Duration::from_secs(15)).await;
        (status, gateway)
    });

    let held = held.await.unwrap().unwrap();
    assert!(
        stopping.elapsed() < Duration::from_secs(2),
        "the held call was answered at once, not after {:?}",
        stopping.elapsed()
    );
    assert_eq!(held.status(), 503);
    assert_eq!(held.headers()["retry-after"], "5");
    assert!(held.headers().contains_key("x-countersign-approval-id"));
    let problem: Value = held.json().await.unwrap();
    assert_eq!(problem["code"], "shutting_down", "{problem}");
    assert!(problem["detail"]
        .as_str()
        .unwrap()
        .contains("send the same call again"));

    let passing = passing.await.unwrap().unwrap();
    assert_eq!(passing.status(), 200, "the passing call finished");
    assert_eq!(passing.text().await.unwrap(), "ok");

    let (status, mut gateway) = exit.await.unwrap();
    let status = status.expect("the gateway exited within 15 s of SIGTERM");
    assert!(
        status.success(),
        "exit status {status}:\n{}",
        gateway.logs()
    );
    assert!(
        TcpStream::connect(gateway.proxy).await.is_err(),
        "nothing listens after the exit"
    );
    assert!(!gateway.logs().contains("ERROR"), "{}", gateway.logs());

    gateway.restart().await;
    let retry = tokio::spawn(gateway.buy(&agent, "alice", phones()).send());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(peer.requests().await.len(), 1, "the person was asked once");
    peer.approve(&auth_req_id).await;
    let answer = retry.await.unwrap().unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.text().await.unwrap(), "ok");
}
