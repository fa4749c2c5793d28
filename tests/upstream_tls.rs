//! TLS to the upstream, through the real gateway binary: a private CA is
//! trusted for its upstream (and nothing else is), a client certificate is
//! presented where the upstream requires one, on pass-through calls
//! (pingora) and on approved calls (the approval engine) alike; turning
//! verification off is for development only.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::{Arc, Mutex};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use support::certs::Ca;
use support::process::GatewayProcess;
use support::{flows, free_port, Peer, REPO, USER_HEADER};

/// What the TLS upstream saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    request_line: String,
    authorization: Option<String>,
    /// Whether the client presented a certificate.
    client_certificate: bool,
}

/// A minimal HTTP/1.1 server over TLS (rustls, a thread per connection):
/// answers every request `200 {"ok":true}` and records it.
struct TlsUpstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

fn pem_certs(pem: &str) -> Vec<CertificateDer<'static>> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap()
}

impl TlsUpstream {
    /// Serves `localhost` with a leaf of `ca`; with `client_ca`, a client
    /// certificate from it is required.
    fn start(ca: &Ca, client_ca: Option<&Ca>) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (cert, key) = ca.leaf(&["localhost"]);
        let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut key.as_bytes())
            .unwrap()
            .unwrap();
        let builder = rustls::ServerConfig::builder();
        let builder = match client_ca {
            Some(client_ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for der in pem_certs(&client_ca.pem()) {
                    roots.add(der).unwrap();
                }
                builder.with_client_cert_verifier(
                    rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
                        .build()
                        .unwrap(),
                )
            }
            None => builder.with_no_client_auth(),
        };
        let config = Arc::new(builder.with_single_cert(pem_certs(&cert), key).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let config = config.clone();
                let record = record.clone();
                std::thread::spawn(move || serve(stream, config, record));
            }
        });
        Self { addr, seen }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn serve(
    stream: std::net::TcpStream,
    config: Arc<rustls::ServerConfig>,
    record: Arc<Mutex<Vec<Seen>>>,
) {
    let Ok(connection) = rustls::ServerConnection::new(config) else {
        return;
    };
    let mut tls = rustls::StreamOwned::new(connection, stream);
    let mut reader = BufReader::new(&mut tls);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return; // closed, or the handshake failed
        }
        let mut authorization = None;
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').unwrap_or((line, ""));
            match name.to_ascii_lowercase().as_str() {
                "authorization" => authorization = Some(value.trim().to_owned()),
                "content-length" => length = value.trim().parse().unwrap_or(0),
                _ => {}
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let client_certificate = reader.get_ref().conn.peer_certificates().is_some();
        record.lock().unwrap().push(Seen {
            request_line: request_line.trim_end().to_owned(),
            authorization,
            client_certificate,
        });
        let answer = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"ok\":true}";
        if reader.get_mut().write_all(answer).is_err() || reader.get_mut().flush().is_err() {
            return;
        }
    }
}

/// Writes a configuration for an upstream at `https://localhost:<port>`
/// with `tls` (a YAML flow mapping, or nothing).
fn write_config(
    dir: &Path,
    peer: &Peer,
    upstream: SocketAddr,
    tls: &str,
) -> (std::path::PathBuf, SocketAddr, SocketAddr) {
    let proxy: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let tls = if tls.is_empty() {
        String::new()
    } else {
        format!(", tls: {tls}")
    };
    let config = format!(
        r#"
listen: {{ proxy: "{proxy}", admin: "{admin}", threads: 2 }}
upstreams:
  shop: {{ url: "https://localhost:{port}", connect_timeout: 2s, timeout: 10s{tls} }}
{authorization_server}
identity: {{ header: {{ name: {USER_HEADER} }} }}
policies: ["{policies}"]
default_action: pass
limits: {{ max_body_bytes: 1024, max_hold: 60s }}
store: memory
"#,
        port = upstream.port(),
        authorization_server = flows::peer_authorization_server(&peer.issuer),
        policies = Path::new(REPO).join("policies").display(),
    );
    let file = dir.join("countersign.yaml");
    std::fs::write(&file, config).unwrap();
    (file, proxy, admin)
}

/// The binary on a configuration from [`write_config`].
async fn gateway_to(dir: &Path, peer: &Peer, upstream: SocketAddr, tls: &str) -> GatewayProcess {
    let (config, proxy, admin) = write_config(dir, peer, upstream, tls);
    GatewayProcess::on(config, proxy, admin).await
}

async fn get_products(proxy: SocketAddr) -> u16 {
    reqwest::Client::new()
        .get(format!("http://{proxy}/products"))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_ca_is_trusted_for_its_upstream_and_without_it_nothing_is_sent() {
    let peer = Peer::start();
    let ca = Ca::new();
    let upstream = TlsUpstream::start(&ca, None);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();

    let gateway = gateway_to(dir.path(), &peer, upstream.addr, "{ ca: ca.pem }").await;
    assert_eq!(get_products(gateway.proxy).await, 200);
    assert_eq!(upstream.seen().len(), 1);
    drop(gateway);

    // The public roots do not know the private CA: verification is on.
    let other = tempfile::tempdir().unwrap();
    let gateway = gateway_to(other.path(), &peer, upstream.addr, "").await;
    assert_eq!(get_products(gateway.proxy).await, 502);
    assert_eq!(
        upstream.seen().len(),
        1,
        "a request reached an unverified upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_is_presented_on_passed_and_approved_calls() {
    let peer = Peer::start();
    let ca = Ca::new();
    let clients = Ca::new();
    let upstream = TlsUpstream::start(&ca, Some(&clients));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
    clients.write_leaf(dir.path(), "gateway", &["countersign.internal"]);
    let gateway = gateway_to(
        dir.path(),
        &peer,
        upstream.addr,
        "{ ca: ca.pem, client_cert: gateway.pem, client_key: gateway.key }",
    )
    .await;
    // Pass-through, by pingora.
    assert_eq!(get_products(gateway.proxy).await, 200);
    // Approved, by the approval engine.
    let call = tokio::spawn(
        reqwest::Client::new()
            .post(format!("http://{}/shop", gateway.proxy))
            .header(USER_HEADER, "alice")
            .json(&support::phones())
            .send(),
    );
    let pending = peer.wait_pending(Some("alice"), 1).await;
    peer.approve(flows::auth_req_id(&pending[0])).await;
    assert_eq!(call.await.unwrap().unwrap().status(), 200);
    let seen = upstream.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen.iter().all(|s| s.client_certificate), "{seen:?}");
    assert!(seen[1].request_line.starts_with("POST /shop "), "{seen:?}");
    assert!(
        seen[1]
            .authorization
            .as_deref()
            .is_some_and(|a| a.starts_with("Bearer ")),
        "{seen:?}"
    );
    drop(gateway);

    // Without the certificate the upstream refuses the handshake.
    let other = tempfile::tempdir().unwrap();
    std::fs::write(other.path().join("ca.pem"), ca.pem()).unwrap();
    let gateway = gateway_to(other.path(), &peer, upstream.addr, "{ ca: ca.pem }").await;
    assert_eq!(get_products(gateway.proxy).await, 502);
    assert_eq!(upstream.seen().len(), 2);
}

fn check(config: &Path, production: bool) -> (bool, String) {
    let mut command = std::process::Command::new(support::process::BIN);
    command.args(["check", "--config"]).arg(config);
    if production {
        command.arg("--production");
    }
    let output = command.output().unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skipping_verification_is_for_development_only() {
    let peer = Peer::start();
    let upstream = TlsUpstream::start(&Ca::new(), None);
    let dir = tempfile::tempdir().unwrap();
    let (config, proxy, admin) = write_config(
        dir.path(),
        &peer,
        upstream.addr,
        "{ insecure_skip_verify: true }",
    );
    assert!(check(&config, false).0);
    let (ok, error) = check(&config, true);
    assert!(!ok);
    assert!(
        error.contains("upstreams.shop.tls.insecure_skip_verify is for development only"),
        "{error}"
    );
    let gateway = GatewayProcess::on(config, proxy, admin).await;
    assert_eq!(get_products(gateway.proxy).await, 200);
    assert!(
        gateway
            .logs()
            .contains("not verified (tls.insecure_skip_verify)"),
        "{}",
        gateway.logs()
    );
}

#[test]
fn broken_upstream_tls_settings_are_refused_at_load_with_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let base = "listen: { proxy: \"127.0.0.1:1\" }\nauthorization_server: { issuer: https://tenant.example/, client_id: a, client_auth: { method: client_secret_post, client_secret: b } }\nidentity: { header: { name: x-user } }\npolicies: []\ndefault_action: pass\n";
    let ca = Ca::new();
    ca.write_leaf(dir.path(), "mine", &["a.example"]);
    ca.write_leaf(dir.path(), "other", &["b.example"]);
    let cases = [
        (
            "{ url: \"http://a.example\", tls: { ca: mine.pem } }",
            "upstreams.shop.tls: TLS settings need an https:// url",
        ),
        (
            "{ url: \"https://a.example\", tls: { ca: missing.pem } }",
            "cannot be read",
        ),
        (
            "{ url: \"https://a.example\", tls: { client_cert: mine.pem } }",
            "client_cert and client_key go together",
        ),
        (
            "{ url: \"https://a.example\", tls: { client_cert: mine.pem, client_key: other.key } }",
            "is not the key of",
        ),
        (
            "{ url: \"https://a.example\", tls: { ca: mine.pem, insecure_skip_verify: true } }",
            "drop one of them",
        ),
        (
            "{ url: \"https://a.example\", tls: { cafile: mine.pem } }",
            "unknown field",
        ),
    ];
    for (upstream, expected) in cases {
        let file = dir.path().join("countersign.yaml");
        std::fs::write(&file, format!("{base}upstreams:\n  shop: {upstream}\n")).unwrap();
        let error = countersign::config::load(&file).unwrap_err().to_string();
        assert!(error.contains(expected), "{upstream}: {error}");
    }
}
