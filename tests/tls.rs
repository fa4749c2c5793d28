//! Issue 19: the proxy listener over TLS (certificates by SNI, reloaded
//! when their files change, client certificates) and HTTP/2, with the same
//! gate as plain HTTP/1.1. Through the real gateway, oidc-provider and the
//! shop; certificates are made by rcgen for each test.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::certs::Ca;
use support::world::WorldBuilder;
use support::*;

/// A client builder that trusts only `ca` and reaches every name at `addr`.
fn builder(ca: &Ca, addr: SocketAddr, names: &[&str]) -> reqwest::ClientBuilder {
    let mut builder = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.pem().as_bytes()).unwrap())
        .tls_built_in_root_certs(false)
        .use_rustls_tls();
    for name in names {
        builder = builder.resolve(name, addr);
    }
    builder
}

fn client(ca: &Ca, addr: SocketAddr, names: &[&str]) -> reqwest::Client {
    builder(ca, addr, names).build().unwrap()
}

/// A client of `ca` presenting the client certificate `(cert, key)`.
fn client_with(
    ca: &Ca,
    addr: SocketAddr,
    names: &[&str],
    (cert, key): (String, String),
) -> reqwest::Client {
    builder(ca, addr, names)
        .identity(reqwest::Identity::from_pem(format!("{cert}{key}").as_bytes()).unwrap())
        .build()
        .unwrap()
}

/// A world serving one certificate for `shop.test`, and its CA.
async fn shop_world() -> (tempfile::TempDir, Ca, World) {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    ca.write_leaf(dir.path(), "shop", &["shop.test"]);
    let world = tls_world(
        dir.path(),
        "{ certificates: [{ cert: DIR/shop.pem, key: DIR/shop.key }] }",
    )
    .await;
    (dir, ca, world)
}

/// A world whose gateway listens with TLS as `tls` says (file names are
/// relative to `dir`, where the certificates are).
async fn tls_world(dir: &Path, tls: &str) -> World {
    tls_world_with(dir, tls, World::builder()).await
}

/// As [`tls_world`], the rest of the world as `world` says.
async fn tls_world_with(dir: &Path, tls: &str, world: WorldBuilder) -> World {
    // Relative certificate paths are the configuration directory's: give
    // absolute ones here, the test gateway writes its file elsewhere.
    let tls = tls.replace("DIR", &dir.display().to_string());
    world.listen_tls(Some(tls)).start().await
}

/// A world serving `shop.test` that asks agents for a certificate of a CA
/// of their own, its gateway loading `policies`: the directory of the
/// certificates, the server's CA and the agents' CA.
async fn client_ca_world(policies: &'static str) -> (tempfile::TempDir, Ca, Ca, World) {
    let dir = tempfile::tempdir().unwrap();
    let (server_ca, agents_ca) = (Ca::new(), Ca::new());
    server_ca.write_leaf(dir.path(), "shop", &["shop.test"]);
    std::fs::write(dir.path().join("agents-ca.pem"), agents_ca.pem()).unwrap();
    let world = tls_world_with(
        dir.path(),
        "{ certificates: [{ cert: DIR/shop.pem, key: DIR/shop.key }], client_ca: DIR/agents-ca.pem }",
        World::builder().policies(policies),
    )
    .await;
    (dir, server_ca, agents_ca, world)
}

fn url(world: &World, host: &str, path: &str) -> String {
    format!("https://{host}:{}{path}", world.gateway.proxy.port())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_held_call_over_tls_and_http2_is_approved_and_forwarded_once() {
    let (_dir, ca, world) = shop_world().await;
    let agent = client(&ca, world.gateway.proxy, &["shop.test"]);

    let held = agent
        .post(url(&world, "shop.test", "/shop"))
        .header(USER_HEADER, "alice")
        .json(&phones());
    let response = world.approved("alice", held).await;
    assert_eq!(
        response.version(),
        reqwest::Version::HTTP_2,
        "ALPN chose h2"
    );
    assert_eq!(response.status(), 200);
    let order: Value = response.json().await.unwrap();
    assert_eq!(order["buyer"], "alice", "{order}");
    let received = world.shop.received();
    assert_eq!(received.len(), 1, "forwarded once");
    assert_eq!(received[0].refused, None, "the shop's verifier took it");

    // HTTP/1.1 over TLS too, and a call no policy holds passes.
    let http1 = builder(&ca, world.gateway.proxy, &["shop.test"])
        .http1_only()
        .build()
        .unwrap();
    let products = http1
        .get(url(&world, "shop.test", "/products"))
        .send()
        .await
        .unwrap();
    assert_eq!(products.version(), reqwest::Version::HTTP_11);
    assert_eq!(products.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn over_http2_the_gate_refuses_what_it_refuses_over_http1() {
    let (_dir, ca, world) = shop_world().await;
    let agent = client(&ca, world.gateway.proxy, &["shop.test"]);
    // Spellings of /shop that lenient frameworks read as /shop: refused,
    // never forwarded unapproved (the book's security table, docs/security.md).
    for path in [
        "/%EF%BD%93hop",
        "/shop%20",
        "/x/%C0%AE%C0%AE/shop",
        "/shop%3Bx",
    ] {
        let response = agent
            .post(url(&world, "shop.test", path))
            .header(USER_HEADER, "alice")
            .json(&phones())
            .send()
            .await
            .unwrap();
        assert_eq!(response.version(), reqwest::Version::HTTP_2);
        assert_eq!(response.status(), 400, "{path}");
        problem(response, 400, "invalid_path").await;
    }
    // The held route is held over HTTP/2 as well: nobody approves, so the
    // call is still waiting when the agent gives up.
    let held = agent
        .post(url(&world, "shop.test", "/shop"))
        .header(USER_HEADER, "alice")
        .json(&phones())
        .timeout(Duration::from_secs(3))
        .send()
        .await;
    assert!(held.is_err(), "held, not answered");
    assert!(world.shop.received().is_empty(), "nothing reached the shop");
    assert_eq!(world.peer.requests().await.len(), 1, "alice was asked");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_certificate_is_chosen_by_sni_and_reloaded_without_dropping_connections() {
    let dir = tempfile::tempdir().unwrap();
    let (ca_a, ca_b) = (Ca::new(), Ca::new());
    ca_a.write_leaf(dir.path(), "a", &["a.test"]);
    ca_b.write_leaf(dir.path(), "b", &["*.b.test"]);
    let world = tls_world(
        dir.path(),
        "{ certificates: [{ cert: DIR/a.pem, key: DIR/a.key }, { cert: DIR/b.pem, key: DIR/b.key }] }",
    )
    .await;
    let addr = world.gateway.proxy;
    let names = ["a.test", "shop.b.test"];
    let status = |client: reqwest::Client, host: &'static str| {
        let url = url(&world, host, "/products");
        async move { client.get(url).send().await.map(|r| r.status().as_u16()) }
    };
    // Each name gets its own certificate: a client that trusts only one CA
    // reaches only that name.
    assert_eq!(
        status(client(&ca_a, addr, &names), "a.test").await.unwrap(),
        200
    );
    assert_eq!(
        status(client(&ca_b, addr, &names), "shop.b.test")
            .await
            .unwrap(),
        200
    );
    assert!(status(client(&ca_a, addr, &names), "shop.b.test")
        .await
        .is_err());
    assert!(status(client(&ca_b, addr, &names), "a.test").await.is_err());

    // A connection open before the reload.
    let before = client(&ca_a, addr, &names);
    assert_eq!(status(before.clone(), "a.test").await.unwrap(), 200);

    // a.test's certificate is replaced by one of another CA.
    let ca_c = Ca::new();
    ca_c.write_leaf(dir.path(), "a", &["a.test"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(client(&ca_c, addr, &names), "a.test").await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the new certificate was not served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // New handshakes get it; the open connection keeps working.
    assert!(status(client(&ca_a, addr, &names), "a.test").await.is_err());
    assert_eq!(status(before, "a.test").await.unwrap(), 200);

    // A change that does not load (a key of another certificate) leaves
    // the last good certificates in force.
    let (_, stray_key) = ca_c.leaf(&["a.test"]);
    std::fs::write(dir.path().join("a.key"), stray_key).unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        status(client(&ca_c, addr, &names), "a.test").await.unwrap(),
        200
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn with_a_client_ca_only_agents_with_its_certificates_get_in() {
    let (_dir, server_ca, agents_ca, world) = client_ca_world("").await;
    let products = url(&world, "shop.test", "/products");
    let without = client(&server_ca, world.gateway.proxy, &["shop.test"]);
    assert!(
        without.get(&products).send().await.is_err(),
        "no client certificate"
    );

    let addr = world.gateway.proxy;
    let with = client_with(
        &server_ca,
        addr,
        &["shop.test"],
        agents_ca.leaf(&["agent-7.agents.test"]),
    );
    assert_eq!(with.get(&products).send().await.unwrap().status(), 200);

    let stranger = client_with(
        &server_ca,
        addr,
        &["shop.test"],
        Ca::new().leaf(&["stranger.test"]),
    );
    assert!(
        stranger.get(&products).send().await.is_err(),
        "another CA's certificate"
    );
}

/// A policy that reads the agent's client certificate.
const AGENT_POLICY: &str = r#"
  - name: agent-gift
    match: { methods: [POST], path: /agent-gifts }
    when: "agent.subject == 'agent-7' && agent.dns.exists(d, d.endsWith('.agents.test'))"
    otherwise: deny
    require: { scopes: [product:buy], audience: https://shop.example/api }
    binding_message: "Gift of {{qty}} by {{agent.subject}}"
"#;

#[tokio::test(flavor = "multi_thread")]
async fn conditions_and_messages_read_the_agents_client_certificate() {
    let (_dir, server_ca, agents_ca, world) = client_ca_world(AGENT_POLICY).await;
    let addr = world.gateway.proxy;
    let gifts = url(&world, "shop.test", "/agent-gifts");
    let agent_7 = client_with(
        &server_ca,
        addr,
        &["shop.test"],
        agents_ca.leaf_named(&["agent-7.agents.test"], "agent-7"),
    );
    let held = tokio::spawn(
        agent_7
            .post(&gifts)
            .header(USER_HEADER, "alice")
            .json(&serde_json::json!({ "qty": 3 }))
            .send(),
    );
    let pending = world.peer.wait_pending(Some("alice"), 1).await;
    assert_eq!(pending[0]["binding_message"], "Gift of 3 by agent-7");
    world.peer.approve_request(&pending[0]).await;
    // The shop has no such path: it answers 404, having received the call.
    assert_eq!(held.await.unwrap().unwrap().status(), 404);
    assert_eq!(world.shop.received().len(), 1);

    // Another agent of the same CA: the condition does not take it.
    let agent_9 = client_with(
        &server_ca,
        addr,
        &["shop.test"],
        agents_ca.leaf_named(&["agent-9.agents.test"], "agent-9"),
    );
    let refused = agent_9
        .post(&gifts)
        .header(USER_HEADER, "alice")
        .json(&serde_json::json!({ "qty": 3 }))
        .send()
        .await
        .unwrap();
    problem(refused, 403, "policy_denied").await;
    assert_eq!(world.shop.received().len(), 1);
}

#[test]
fn bad_certificate_files_are_refused_at_load_with_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    ca.write_leaf(dir.path(), "a", &["a.test"]);
    ca.write_leaf(dir.path(), "b", &["b.test"]);
    let check = |tls: &str| {
        let config = dir.path().join("countersign.yaml");
        std::fs::write(
            &config,
            format!(
                "listen: {{ proxy: \"127.0.0.1:0\", tls: {tls} }}\nupstreams:\n  shop: {{ url: \"http://127.0.0.1:9\" }}\nauthorization_server:\n  issuer: http://127.0.0.1:9\n  endpoints: {{ backchannel_authentication: http://127.0.0.1:9/bc, token: http://127.0.0.1:9/token }}\n  client_id: c\n  client_auth: {{ method: client_secret_post, client_secret: s }}\nidentity: {{ header: {{ name: x-user }} }}\npolicies: []\ndefault_action: pass\n"
            ),
        )
        .unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_countersign"))
            .args(["check", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = check("{ certificates: [{ cert: a.pem, key: a.key }] }");
    assert!(
        ok,
        "relative paths are the configuration's directory's: {err}"
    );
    let (ok, err) = check("{ certificates: [{ cert: a.pem, key: b.key }] }");
    assert!(!ok);
    assert!(
        err.contains("listen.tls.certificates[0]") && err.contains("is not the key of"),
        "{err}"
    );
    let (ok, err) =
        check("{ certificates: [{ cert: a.pem, key: a.key }, { cert: missing.pem, key: a.key }] }");
    assert!(!ok);
    assert!(
        err.contains("listen.tls.certificates[1]") && err.contains("cannot be read"),
        "{err}"
    );
    let (ok, err) = check("{ certificates: [{ cert: a.key, key: a.key }] }");
    assert!(!ok);
    assert!(err.contains("holds no CERTIFICATE"), "{err}");
    let (ok, err) = check("{ certificates: [{ cert: a.pem, key: a.key }], ciphers: [x] }");
    assert!(!ok);
    assert!(err.contains("ciphers"), "an unknown key: {err}");
}

/// The book's production TLS configuration (docs/tls.md), as printed there, passes
/// `countersign check` with certificates at the paths it names; and the
/// check it promises holds: a pair that does not match is named.
#[test]
fn the_books_production_tls_configuration_is_valid() {
    const CHAPTER: &str = include_str!("../docs/tls.md");
    let section = CHAPTER
        .split("\n## TLS and HTTP/2 on the proxy listener\n")
        .nth(1)
        .expect("the chapter has the section");
    let yaml = section
        .split("```yaml\n")
        .nth(1)
        .and_then(|block| block.split("```").next())
        .expect("a yaml block");
    for shown in [
        "certificates:",
        "client_ca:",
        "http2: true",
        "*.api.example",
    ] {
        assert!(yaml.contains(shown), "the configuration shows {shown}");
    }
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::create_dir_all(dir.path().join("policies")).unwrap();
    std::fs::copy(
        repo_path("policies/shop.yaml"),
        dir.path().join("policies/shop.yaml"),
    )
    .unwrap();
    let ca = Ca::new();
    ca.write_leaf(&certs, "shop.example", &["shop.example"]);
    ca.write_leaf(&certs, "wildcard.api.example", &["*.api.example"]);
    std::fs::write(certs.join("agents-ca.pem"), Ca::new().pem()).unwrap();
    let config = dir.path().join("countersign.yaml");
    std::fs::write(&config, yaml).unwrap();
    let check = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_countersign"))
            .args(["check", "--config"])
            .arg(&config)
            .envs([
                ("CIBA_ISSUER", "https://tenant.example/"),
                ("CIBA_CLIENT_ID", "countersign"),
                ("CIBA_CLIENT_SECRET", "s3cr3t"),
                (
                    "DATABASE_URL",
                    "postgres://countersign@db.internal/countersign",
                ),
            ])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, printed) = check();
    assert!(ok, "{printed}");
    assert!(printed.contains("is valid"), "{printed}");
    // The second pair's key replaced by another's: named, and refused.
    std::fs::copy(
        certs.join("shop.example.key"),
        certs.join("wildcard.api.example.key"),
    )
    .unwrap();
    let (ok, printed) = check();
    assert!(!ok);
    assert!(
        printed.contains("listen.tls.certificates[1]") && printed.contains("is not the key of"),
        "{printed}"
    );
}
