//! The `countersign` binary: `check` validates and prints the route table;
//! `run` serves, and its logs never carry tokens, secrets or bodies.

mod support;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_countersign");

fn check(config: &std::path::Path, env: &[(&str, &str)]) -> (bool, String, String) {
    let output = Command::new(BIN)
        .args(["check", "--config"])
        .arg(config)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

const EXAMPLE_ENV: [(&str, &str); 3] = [
    ("CIBA_ISSUER", "https://tenant.example/"),
    ("CIBA_CLIENT_ID", "countersign"),
    ("CIBA_CLIENT_SECRET", "s3cr3t"),
];

#[test]
fn every_example_configuration_is_valid() {
    let mut checked = 0;
    for entry in std::fs::read_dir(repo_path("examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let (ok, stdout, stderr) = check(&path, &EXAMPLE_ENV);
            assert!(ok, "{}: {stderr}", path.display());
            assert!(stdout.contains("is valid"), "{stdout}");
            checked += 1;
        }
    }
    assert!(checked > 0, "no example configuration found");
}

#[test]
fn check_prints_the_route_table() {
    let (ok, stdout, _) = check(&repo_path("examples/shop.yaml"), &EXAMPLE_ENV);
    assert!(ok);
    let row = stdout
        .lines()
        .find(|l| l.contains("buy-product"))
        .expect("buy-product row");
    for column in ["POST", "/shop", "product:buy", "https://shop.example/api"] {
        assert!(row.contains(column), "{row}");
    }
    assert!(stdout.contains("unmatched calls: pass"), "{stdout}");
}

#[test]
fn check_names_file_line_and_key_of_a_broken_policy() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("broken.yaml");
    std::fs::write(
        &policy,
        "policies:\n  - name: buy\n    match: { methods: [POST], path: /shop }\n    require: { scopes: [product:buy] }\n    binding_message: \"Buy {{qty\"\n",
    )
    .unwrap();
    let config = dir.path().join("countersign.yaml");
    let main = std::fs::read_to_string(repo_path("examples/shop.yaml"))
        .unwrap()
        .replace("  - ../policies", &format!("  - {}", policy.display()));
    std::fs::write(&config, main).unwrap();
    let (ok, _, stderr) = check(&config, &EXAMPLE_ENV);
    assert!(!ok);
    let expected = format!(
        "{}:5:5: policies[0].binding_message: broken template",
        policy.display()
    );
    assert!(stderr.contains(&expected), "{stderr}");

    std::fs::write(&policy, "policies:\n  - name: buy\n    match: { methods: [POST], path: /shop }\n    require: { scopes: [product:buy] }\n    binding_message: Buy\n    colour: red\n").unwrap();
    let (ok, _, stderr) = check(&config, &EXAMPLE_ENV);
    assert!(!ok);
    assert!(
        stderr.contains(&format!(
            "{}:6:5: policies[0].colour: unknown field `colour`",
            policy.display()
        )),
        "{stderr}"
    );
}

#[test]
fn check_refuses_a_missing_secret() {
    let (ok, _, stderr) = check(&repo_path("examples/shop.yaml"), &EXAMPLE_ENV[..2]);
    assert!(!ok);
    assert!(stderr.contains("authorization_server.client_auth.client_secret: environment variable CIBA_CLIENT_SECRET is not set"), "{stderr}");
}

#[test]
fn a_missing_file_is_one_line_naming_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere.yaml");
    let (ok, _, stderr) = check(&missing, &[]);
    assert!(!ok);
    let line = format!("error: {}: ", missing.display());
    assert!(stderr.starts_with(&line), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert_eq!(
        stderr.matches("os error 2").count(),
        1,
        "the reason said once: {stderr}"
    );
}

/// `countersign run --config <config>`, logging at `level` into `log`.
fn run_logged(config: &Path, level: &str, log: &Path) -> std::process::Child {
    Command::new(BIN)
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", level)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

#[tokio::test]
async fn logs_carry_the_approval_id_but_never_tokens_secrets_or_bodies() {
    let peer = Peer::start();
    let shop = start_shop(&peer).await;
    let dir = tempfile::tempdir().unwrap();
    let (config, proxy, admin) =
        write_config(dir.path(), &peer.issuer, &shop, &GatewayOptions::default());
    let log_path = dir.path().join("gateway.log");
    let mut child = run_logged(&config, "debug", &log_path);
    wait_listening(proxy).await;
    wait_listening(admin).await;

    let marker = serde_json::json!({"product": "Zebra42 phone", "qty": 3, "priceLimit": 9876543});
    let call = tokio::spawn(
        reqwest::Client::new()
            .post(format!("http://{proxy}/shop"))
            .header(USER_HEADER, "alice")
            .json(&marker)
            .send(),
    );
    let asked = peer.approve_next("alice").await;
    let response = call.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    let approval_id = approval_id(&response);
    tokio::time::sleep(Duration::from_millis(300)).await;
    child.kill().unwrap();
    child.wait().unwrap();

    let mut logs = String::new();
    std::fs::File::open(&log_path)
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    let token = shop.received()[0].bearer().unwrap().to_owned();
    assert!(logs.contains("call held for approval"), "{logs}");
    let held_lines: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("approval") && l.contains("policy=buy-product"))
        .collect();
    assert!(held_lines.len() >= 3, "{logs}");
    assert!(
        held_lines.iter().all(|l| l.contains(&approval_id)),
        "every line of the held call names its approval: {logs}"
    );
    for secret in [token.as_str(), "countersign-secret", "Zebra42", "9876543"] {
        if let Some(line) = logs.lines().find(|l| l.contains(secret)) {
            panic!("{secret:?} leaked into the logs: {line}");
        }
    }
    let auth_req_id = asked["auth_req_id"].as_str().unwrap();
    assert!(
        !logs.contains(auth_req_id),
        "auth_req_id leaked into the logs"
    );
}

/// A configuration that loads without any network; the authorization server
/// at `127.0.0.1:9` is never reached when a listener cannot be bound.
fn offline_config(dir: &std::path::Path, proxy: &str, admin: &str) -> std::path::PathBuf {
    let file = dir.join("countersign.yaml");
    std::fs::write(
        &file,
        format!(
            r#"listen: {{ proxy: "{proxy}", admin: "{admin}" }}
upstreams: {{ shop: {{ url: "http://127.0.0.1:9" }} }}
authorization_server:
  issuer: http://127.0.0.1:9
  client_id: countersign
  client_auth: {{ method: client_secret_post, client_secret: s3cr3t }}
identity: {{ static: {{ subject: alice }} }}
policies: []
default_action: pass
"#
        ),
    )
    .unwrap();
    file
}

/// Runs `countersign run` and waits at most `limit` for it to exit.
fn run_expecting_exit(
    config: &std::path::Path,
    limit: Duration,
) -> (Option<std::process::ExitStatus>, String) {
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(config)
        .env_remove("RUST_LOG")
        .env("RUST_BACKTRACE", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (status, stderr)
}

#[test]
fn a_listener_that_cannot_be_bound_ends_the_start_with_one_line() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    let free = || format!("127.0.0.1:{}", free_port());
    let dir = tempfile::tempdir().unwrap();
    // 192.0.2.1 (TEST-NET-1) is no address of this host.
    let cases = [
        (
            "proxy in use",
            taken.clone(),
            free(),
            taken.clone(),
            "in use",
        ),
        (
            "admin in use",
            free(),
            taken.clone(),
            taken.clone(),
            "in use",
        ),
        (
            "not this host's address",
            "192.0.2.1:8080".to_owned(),
            free(),
            "192.0.2.1:8080".to_owned(),
            "address",
        ),
    ];
    for (case, proxy, admin, named, reason) in cases {
        let config = offline_config(dir.path(), &proxy, &admin);
        let started = std::time::Instant::now();
        let (status, stderr) = run_expecting_exit(&config, Duration::from_secs(5));
        let status = status.unwrap_or_else(|| panic!("{case}: still running after 5 s"));
        assert!(!status.success(), "{case}: exit status {status}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{case}: took {:?}",
            started.elapsed()
        );
        assert_eq!(stderr.trim().lines().count(), 1, "{case}: {stderr}");
        assert!(stderr.contains(&named), "{case}: {stderr}");
        assert!(stderr.to_lowercase().contains(reason), "{case}: {stderr}");
        assert!(!stderr.contains("panicked"), "{case}: {stderr}");
    }
}

/// A gateway started before its authorization server (both started by one
/// script, say) waits for it, saying so, and serves once it is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_waits_for_an_authorization_server_that_is_still_starting() {
    let port = free_port();
    let issuer = format!("http://127.0.0.1:{port}");
    let jwks = url::Url::parse(&format!("{issuer}/.well-known/jwks.json")).unwrap();
    let shop = start_shop_for(&issuer, jwks).await;
    let dir = tempfile::tempdir().unwrap();
    let (config, proxy, admin) = write_config(dir.path(), &issuer, &shop, &GatewayOptions::dev());
    let log = dir.path().join("gateway.log");
    let mut child = run_logged(&config, "info", &log);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(child.try_wait().unwrap().is_none(), "the gateway waits");
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let _authz =
        countersign::dev::authz::serve(listener, countersign::dev::AuthzOptions::default())
            .await
            .unwrap();
    wait_listening(proxy).await;
    wait_listening(admin).await;
    let ready = reqwest::get(format!("http://{admin}/readyz"))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let _ = child.kill();
    let _ = child.wait();
    let logs = std::fs::read_to_string(&log).unwrap();
    let waiting: Vec<_> = logs
        .lines()
        .filter(|l| l.contains("authorization server not reachable yet; retrying discovery"))
        .collect();
    assert!(!waiting.is_empty(), "{logs}");
    assert!(waiting[0].contains("WARN"), "{logs}");
    assert!(!logs.contains("ERROR"), "{logs}");
}

/// One that never comes up ends the start after `startup_wait` with one
/// line naming the URL once and the reason.
#[test]
fn an_authorization_server_that_never_answers_ends_the_start_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let free = || format!("127.0.0.1:{}", free_port());
    let config = offline_config(dir.path(), &free(), &free());
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "  client_id: countersign\n",
        "  client_id: countersign\n  startup_wait: 2s\n",
    );
    std::fs::write(&config, text).unwrap();
    let started = std::time::Instant::now();
    let (status, stderr) = run_expecting_exit(&config, Duration::from_secs(15));
    let status = status.expect("the gateway exits");
    assert!(!status.success());
    assert!(started.elapsed() < Duration::from_secs(10));
    let error: Vec<_> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(error.len(), 1, "{stderr}");
    let url = "http://127.0.0.1:9/.well-known/openid-configuration";
    assert_eq!(error[0].matches(url).count(), 1, "{stderr}");
    assert!(
        error[0].contains("still not reachable after 2s"),
        "{stderr}"
    );
    assert!(error[0].contains("refused"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
