//! Test harness: the real CIBA peer (oidc-provider, in Node), the example
//! shop upstream that verifies tokens, and the real gateway started
//! in-process on ephemeral ports.
#![allow(dead_code)]

pub mod certs;
pub mod flows;
pub mod front;
pub mod permissive;
pub mod process;
pub mod world;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use countersign::demo::shop::{self, ShopHandle};
use countersign::gateway::{Gateway, Shutdown};
use serde_json::Value;
#[allow(unused_imports)]
pub use world::{approval_id, poll_times, problem, send_raw};

pub const REPO: &str = env!("CARGO_MANIFEST_DIR");
pub const USER_HEADER: &str = "x-countersign-user";

/// A policy (for `extra_policies`) that answers `202` at once: `POST /shop`
/// sent to host `async.shop.test` (the shop serves any host).
pub const ASYNC_POLICY: &str = r#"  - name: buy-async
    match: { methods: [POST], path: /shop, host: async.shop.test }
    require: { scopes: [product:buy], audience: "https://shop.example/api" }
    bind: call
    binding_message: "Do you want to buy {{qty}} {{product}}"
    requested_expiry: 2m
    wait: async
"#;

/// A policy (for `extra_policies`) whose request the person has 3 s to
/// answer: `POST /flash`, held.
pub const FLASH_SALE: &str = r#"  - name: flash-sale
    match: { methods: [POST], path: /flash }
    require: { scopes: [product:buy], audience: "https://shop.example/api" }
    binding_message: "Flash sale: buy {{qty}} {{product}}"
    requested_expiry: 3s
"#;

/// The text of a gateway configuration that serves no calls, for tests that
/// need only its `authorization_server` at `issuer`, with the `client` lines
/// (`client_id:`, `client_auth:`, ...; each after the first indented two spaces).
pub fn client_only_config(issuer: &str, client: &str) -> String {
    format!(
        r#"
listen: {{ proxy: "127.0.0.1:1" }}
upstreams: {{ shop: {{ url: "http://127.0.0.1:1" }} }}
authorization_server:
  issuer: "{issuer}"
  {client}
identity: {{ static: {{ subject: alice }} }}
policies: []
default_action: pass
"#
    )
}

/// The oidc-provider CIBA peer in a child process; killed on drop.
pub struct Peer {
    child: Child,
    pub issuer: String,
    http: reqwest::Client,
}

impl Peer {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    pub fn start_with(env: &[(&str, &str)]) -> Self {
        let peer_dir = Path::new(REPO).join("tests/peer");
        assert!(
            peer_dir.join("node_modules/oidc-provider").exists(),
            "the CIBA test peer is not installed: run `npm ci --prefix tests/peer` first"
        );
        let mut command = Command::new("node");
        command
            .arg(peer_dir.join("server.mjs"))
            .env("PEER_INTERVAL", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(if std::env::var_os("PEER_LOG").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            });
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command
            .spawn()
            .expect("node must be installed to run the CIBA peer");
        let stdout = child.stdout.take().expect("piped stdout");
        // A peer that never says it listens must fail the test, not hang it.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                panic!("the CIBA peer did not start within 30 s");
            }
        };
        let ready: Value =
            serde_json::from_str(&line).unwrap_or_else(|_| panic!("peer said {line:?}"));
        Self {
            child,
            issuer: ready["issuer"].as_str().expect("issuer").to_owned(),
            http: reqwest::Client::new(),
        }
    }

    pub fn jwks_uri(&self) -> url::Url {
        format!("{}/.well-known/jwks.json", self.issuer)
            .parse()
            .expect("url")
    }

    /// GET `/control/<path>` of the peer, as JSON.
    async fn read(&self, path: &str) -> Value {
        flows::json_of(self.http.get(format!("{}/control/{path}", self.issuer))).await
    }

    pub async fn requests(&self) -> Vec<Value> {
        serde_json::from_value(self.read("requests").await).unwrap()
    }

    pub async fn request(&self, auth_req_id: &str) -> Value {
        self.read(&format!("requests/{auth_req_id}")).await
    }

    /// Waits until `count` requests are pending (for `sub`, if given).
    pub async fn wait_pending(&self, sub: Option<&str>, count: usize) -> Vec<Value> {
        world::wait_count(count, "pending requests", || async {
            self.requests()
                .await
                .into_iter()
                .filter(|r| r["status"] == "pending" && sub.is_none_or(|s| r["sub"] == s))
                .collect()
        })
        .await
    }

    pub async fn control(&self, path: &str, body: Value) -> reqwest::StatusCode {
        let url = format!("{}/control/{path}", self.issuer);
        self.http
            .post(url)
            .json(&body)
            .send()
            .await
            .unwrap()
            .status()
    }

    pub async fn approve(&self, auth_req_id: &str) {
        self.answer(auth_req_id, "approve").await;
    }

    pub async fn deny(&self, auth_req_id: &str) {
        self.answer(auth_req_id, "deny").await;
    }

    /// `approve` or `deny` the request, as the person.
    async fn answer(&self, auth_req_id: &str, action: &str) {
        let path = format!("requests/{auth_req_id}/{action}");
        let status = self.control(&path, serde_json::json!({})).await;
        assert!(status.is_success(), "{action}: {status}");
    }
}

impl Peer {
    /// The peer's process id (for `kill -STOP`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the peer now: the authorization server goes away.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Makes the next `count` token answers misbehave (see tests/peer/README.md).
    pub async fn misbehave(&self, mode: &str, count: u32) {
        let status = self
            .control(
                "token-misbehave",
                serde_json::json!({ "mode": mode, "count": count }),
            )
            .await;
        assert!(status.is_success(), "token-misbehave: {status}");
    }

    /// What the forced misbehaviour did: `redirects` sent, `followed` by the client.
    pub async fn misbehaviour(&self) -> Value {
        self.read("token-misbehave").await
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The shop upstream, verifying tokens against the peer's JWKS.
pub async fn start_shop(peer: &Peer) -> ShopHandle {
    start_shop_for(&peer.issuer, peer.jwks_uri()).await
}

/// The shop upstream, verifying tokens of `issuer` against `jwks_uri`.
pub async fn start_shop_for(issuer: &str, jwks_uri: url::Url) -> ShopHandle {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    shop::serve(listener, issuer, jwks_uri).await.unwrap()
}

/// Options for a test gateway.
pub struct GatewayOptions {
    pub default_action: &'static str,
    pub identity: String,
    pub client: String,
    pub extra_policies: &'static str,
    pub limits: &'static str,
    /// Overrides the shop's address as the upstream.
    pub upstream: Option<String>,
    /// The upstream's `preserve_host`: it sees the agent's `Host`.
    pub preserve_host: bool,
    /// Top-level YAML appended to the gateway file as it is, e.g.
    /// `store: memory` or `approvals_path: /approvals`.
    pub extra_config: String,
    /// `listen.tls` of the gateway (YAML flow mapping), e.g.
    /// `{ certificates: [{ cert: a.pem, key: a.key }] }`.
    pub listen_tls: Option<String>,
    /// `listen.h2c: true`: HTTP/2 without TLS too.
    pub h2c: bool,
}

impl Default for GatewayOptions {
    fn default() -> Self {
        Self {
            default_action: "pass",
            identity: format!("header: {{ name: {USER_HEADER} }}"),
            client: "client_id: countersign-post\n  client_auth: { method: client_secret_post, client_secret: countersign-secret }".to_owned(),
            extra_policies: "",
            limits: "{ max_body_bytes: 1024, max_hold: 60s }",
            upstream: None,
            preserve_host: false,
            extra_config: String::new(),
            listen_tls: None,
            h2c: false,
        }
    }
}

impl GatewayOptions {
    /// The defaults, as the client of the development authorization server.
    pub fn dev() -> Self {
        Self {
            client: DEV_CLIENT_POST.to_owned(),
            ..Self::default()
        }
    }
}

/// The real gateway, running on its own pingora runtimes in a thread.
pub struct TestGateway {
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    shutdown: Shutdown,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl TestGateway {
    pub async fn start(peer: &Peer, shop: &ShopHandle, options: GatewayOptions) -> Self {
        Self::start_for(&peer.issuer, shop, options).await
    }

    /// A gateway that asks the authorization server `issuer`. When that
    /// server runs on the test's own runtime, the test needs a multi-thread
    /// runtime: this waits (blocking) for the gateway's discovery call.
    pub async fn start_for(issuer: &str, shop: &ShopHandle, options: GatewayOptions) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (file, proxy, admin) = write_config(dir.path(), issuer, shop, &options);
        Self::run(dir, proxy, admin, move || {
            countersign::config::load(&file).map_err(|e| e.to_string())
        })
        .await
    }

    /// A gateway of an already loaded configuration listening on `proxy`
    /// and `admin` (see [`TestGateway::start_for`] about runtimes).
    pub async fn start_loaded(
        config: countersign::config::Config,
        proxy: SocketAddr,
        admin: SocketAddr,
    ) -> Self {
        Self::run(tempfile::tempdir().unwrap(), proxy, admin, move || {
            Ok(config)
        })
        .await
    }

    /// Builds the gateway of the configuration `load` gives in a thread of
    /// its own and waits until both listeners accept.
    async fn run(
        dir: tempfile::TempDir,
        proxy: SocketAddr,
        admin: SocketAddr,
        load: impl FnOnce() -> Result<countersign::config::Config, String> + Send + 'static,
    ) -> Self {
        let shutdown = Shutdown::new();
        let (tx, rx) = std::sync::mpsc::channel();
        let signal = shutdown.clone();
        let thread = std::thread::spawn(move || {
            let gateway = load().and_then(|c| Gateway::build(c).map_err(|e| e.to_string()));
            match gateway {
                Ok(gateway) => {
                    tx.send(Ok(())).unwrap();
                    gateway.run_until(signal);
                }
                Err(e) => tx.send(Err(e)).unwrap(),
            }
        });
        rx.recv().unwrap().expect("gateway builds");
        wait_listening(proxy).await;
        wait_listening(admin).await;
        Self {
            proxy,
            admin,
            shutdown,
            thread: Some(thread),
            _dir: dir,
        }
    }

    /// POST /shop through this gateway as an agent acting for `user`.
    pub fn buy(&self, agent: &reqwest::Client, user: &str, body: Value) -> reqwest::RequestBuilder {
        agent
            .post(self.url("/shop"))
            .header(USER_HEADER, user)
            .json(&body)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy)
    }

    /// The directory holding this gateway's configuration files.
    pub fn dir(&self) -> &Path {
        self._dir.path()
    }

    /// `/metrics` once it has `line`: calls are counted when their answer
    /// has been sent, a moment after the agent has it.
    pub async fn wait_metric(&self, line: &str) -> String {
        world::wait_metric(|| self.metrics(), line).await
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.admin))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.shutdown.trigger();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Writes a gateway configuration for the authorization server `issuer`
/// and `shop` into `dir`.
pub fn write_config(
    dir: &Path,
    issuer: &str,
    shop: &ShopHandle,
    options: &GatewayOptions,
) -> (PathBuf, SocketAddr, SocketAddr) {
    let proxy: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let policies = Path::new(REPO).join("policies");
    let extra = dir.join("extra.yaml");
    let extra_text = if options.extra_policies.is_empty() {
        "  []\n"
    } else {
        options.extra_policies
    };
    std::fs::write(&extra, format!("policies:\n{extra_text}")).unwrap();
    let config = format!(
        r#"
listen: {{ proxy: "{proxy}", admin: "{admin}", threads: 2{tls}{h2c} }}
upstreams:
  shop: {{ url: "http://{shop}", connect_timeout: 2s, timeout: 10s, preserve_host: {preserve_host} }}
authorization_server:
  issuer: {issuer}
  {client}
  login_hint: iss_sub
  audience_parameter: resource
identity: {{ {identity} }}
policies: [{policies}, {extra}]
default_action: {default_action}
limits: {limits}
{extra_config}
"#,
        shop = options
            .upstream
            .clone()
            .unwrap_or_else(|| shop.addr.to_string()),
        issuer = issuer,
        client = options.client,
        identity = options.identity,
        policies = policies.display(),
        extra = extra.display(),
        default_action = options.default_action,
        limits = options.limits,
        preserve_host = options.preserve_host,
        extra_config = options.extra_config,
        h2c = if options.h2c { ", h2c: true" } else { "" },
        tls = options
            .listen_tls
            .as_ref()
            .map(|tls| format!(", tls: {tls}"))
            .unwrap_or_default(),
    );
    let file = dir.join("countersign.yaml");
    std::fs::write(&file, config).unwrap();
    (file, proxy, admin)
}

pub async fn wait_listening(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {addr}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The whole test world: peer, shop and gateway.
pub struct World {
    pub peer: Peer,
    pub shop: ShopHandle,
    pub gateway: TestGateway,
    pub agent: reqwest::Client,
}

impl World {
    pub async fn start(options: GatewayOptions) -> Self {
        let peer = Peer::start();
        let shop = start_shop(&peer).await;
        let gateway = TestGateway::start(&peer, &shop, options).await;
        Self {
            peer,
            shop,
            gateway,
            agent: reqwest::Client::new(),
        }
    }

    /// POST /shop as an agent acting for `user`.
    pub fn buy(&self, user: &str, body: Value) -> reqwest::RequestBuilder {
        self.gateway.buy(&self.agent, user, body)
    }
}

/// The policy's own `authorization_details` of a request the gateway made
/// for a `bind: call` policy, once its one `countersign_call` entry (the
/// call binding, last) is checked to be there and taken off.
pub fn without_binding(details: &Value) -> Value {
    let mut entries = details.as_array().expect("a list").clone();
    let binding = entries.pop().expect("the binding entry");
    assert_eq!(binding["type"], "countersign_call", "{details}");
    assert_eq!(binding["version"], "1", "{details}");
    assert!(
        entries.iter().all(|e| e["type"] != "countersign_call"),
        "{details}"
    );
    Value::Array(entries)
}

pub fn phones() -> Value {
    serde_json::json!({ "product": "XYZ phone", "qty": 2, "priceLimit": 900 })
}

/// A raw HTTP/1.1 exchange, for request targets an HTTP client would tidy up.
pub fn raw_request(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {response:?}"));
    (status, response)
}

pub fn repo_path(relative: &str) -> PathBuf {
    Path::new(REPO).join(relative)
}

/// The gateway client of the development authorization server
/// (`countersign::dev::DEV_CLIENT_ID` / `DEV_CLIENT_SECRET`).
pub const DEV_CLIENT_POST: &str = "client_id: countersign-dev\n  client_auth: { method: client_secret_post, client_secret: countersign-dev-secret }";
pub const DEV_CLIENT_BASIC: &str = "client_id: countersign-dev\n  client_auth: { method: client_secret_basic, client_secret: countersign-dev-secret }";

/// The test world of `countersign dev`: the development authorization
/// server in-process, the shop and the real gateway. Needs a multi-thread
/// runtime (see [`TestGateway::start_for`]).
pub struct DevWorld {
    pub authz: countersign::dev::DevAuthz,
    pub shop: ShopHandle,
    pub gateway: TestGateway,
    pub agent: reqwest::Client,
}

impl DevWorld {
    /// `options` should come from [`GatewayOptions::dev`].
    pub async fn start(options: GatewayOptions) -> Self {
        Self::start_with(options, countersign::dev::AuthzOptions::default()).await
    }

    pub async fn start_with(
        options: GatewayOptions,
        authz_options: countersign::dev::AuthzOptions,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authz = countersign::dev::authz::serve(listener, authz_options)
            .await
            .unwrap();
        let shop = start_shop_for(authz.issuer(), authz.jwks_uri()).await;
        let gateway = TestGateway::start_for(authz.issuer(), &shop, options).await;
        Self {
            authz,
            shop,
            gateway,
            agent: reqwest::Client::new(),
        }
    }

    /// As `countersign dev` runs: its gateway configuration and embedded
    /// policies (`countersign::dev::load_gateway`) for the users of
    /// `authz_options`, in front of the shop.
    pub async fn start_as_dev_mode(authz_options: countersign::dev::AuthzOptions) -> Self {
        let users = authz_options.users.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authz = countersign::dev::authz::serve(listener, authz_options)
            .await
            .unwrap();
        let shop = start_shop_for(authz.issuer(), authz.jwks_uri()).await;
        let proxy: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let config = countersign::dev::load_gateway(
            proxy,
            Some(admin),
            shop.addr,
            authz.issuer(),
            &users,
            None,
        )
        .unwrap();
        let gateway = TestGateway::start_loaded(config, proxy, admin).await;
        Self {
            authz,
            shop,
            gateway,
            agent: reqwest::Client::new(),
        }
    }

    /// POST /shop as an agent acting for `user`.
    pub fn buy(&self, user: &str, body: Value) -> reqwest::RequestBuilder {
        self.gateway.buy(&self.agent, user, body)
    }

    /// POST /transfers as an agent acting for `user`.
    pub fn transfer(&self, user: &str, amount: u64, to: &str) -> reqwest::RequestBuilder {
        self.agent
            .post(self.gateway.url("/transfers"))
            .header(USER_HEADER, user)
            .json(&serde_json::json!({ "amount": amount, "to": to }))
    }

    /// The approver page's listing of `user`'s requests.
    pub async fn listing(&self, user: &str) -> Value {
        let url = format!("{}/api/requests?user={user}", self.authz.issuer());
        flows::json_of(self.agent.get(url)).await
    }

    /// Waits until `count` requests of `user` are pending.
    pub async fn wait_pending(
        &self,
        user: &str,
        count: usize,
    ) -> Vec<countersign::dev::authz::RequestInfo> {
        let what = format!("pending requests for {user}");
        world::wait_count(count, &what, || async {
            self.authz
                .requests()
                .into_iter()
                .filter(|r| r.state == "pending" && r.subject == user)
                .collect()
        })
        .await
    }

    /// Presses Approve or Deny the way the approver page does.
    pub async fn decide(&self, id: &str, action: &str) -> reqwest::Response {
        self.agent
            .post(format!(
                "{}/api/requests/{id}/{action}",
                self.authz.issuer()
            ))
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await
            .unwrap()
    }

    pub async fn approve(&self, id: &str) {
        let response = self.decide(id, "approve").await;
        assert_eq!(response.status(), 200, "approve");
    }

    pub async fn deny(&self, id: &str) {
        let response = self.decide(id, "deny").await;
        assert_eq!(response.status(), 200, "deny");
    }

    pub fn request(&self, id: &str) -> countersign::dev::authz::RequestInfo {
        self.authz
            .requests()
            .into_iter()
            .find(|r| r.id == id)
            .expect("the request exists")
    }
}
