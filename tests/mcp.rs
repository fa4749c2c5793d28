//! MCP tool calls through the real gateway, with MCP software nobody here
//! wrote: the official TypeScript SDK (`@modelcontextprotocol/sdk`, pinned in
//! `tests/mcp/package-lock.json`) as the client (`tests/mcp/client.mjs`,
//! StreamableHTTPClientTransport) and as the server (`tests/mcp/server.mjs`,
//! StreamableHTTPServerTransport with sessions), which verifies the bearer
//! token `buy_product` receives against the oidc-provider peer's keys and
//! records every tool call it ran. The policy is `policies/mcp.yaml`:
//! `buy_product` on `/mcp` is held, everything else passes.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use countersign::demo::shop::ShopHandle;
use serde_json::{json, Value};
use support::front::Tls;
use support::*;

const MESSAGE: &str = "Buy 2 XYZ phone";

/// The SDK-built MCP server in a child process; killed on drop.
struct McpServer {
    child: Child,
    addr: SocketAddr,
}

impl McpServer {
    fn start(peer: &Peer) -> Self {
        let dir = Path::new(REPO).join("tests/mcp");
        assert!(
            dir.join("node_modules/@modelcontextprotocol/sdk").exists(),
            "the MCP SDK is not installed: run `npm ci --prefix tests/mcp` first"
        );
        let mut child = Command::new("node")
            .arg(dir.join("server.mjs"))
            .env("MCP_ISSUER", &peer.issuer)
            // buy_product runs only with a token approved for exactly that
            // call (@countersign/verify, docs/call-binding.md).
            .env("MCP_VERIFY_BINDING", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(if std::env::var_os("MCP_LOG").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .expect("node must be installed to run the MCP server");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            let mut line = String::new();
            let _ = std::io::BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the MCP server did not start within 30 s");
        let ready: Value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("{line:?}"));
        let port = ready["port"].as_u64().expect("port");
        Self {
            child,
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
        }
    }

    /// Every tool call the server ran.
    async fn calls(&self) -> Vec<Value> {
        flows::get_json(format!("http://{}/control/calls", self.addr)).await
    }

    /// Every call-binding check the server's verifier made.
    async fn bindings(&self) -> Vec<Value> {
        flows::get_json(format!("http://{}/control/bindings", self.addr)).await
    }

    /// HTTP requests the server got on /mcp, by method.
    async fn methods(&self) -> Value {
        flows::get_json(format!("http://{}/control/methods", self.addr)).await
    }

    async fn bought(&self) -> Vec<Value> {
        let calls = self.calls().await;
        calls
            .into_iter()
            .filter(|c| c["tool"] == "buy_product")
            .collect()
    }
}

impl Drop for McpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct McpWorld {
    peer: Peer,
    _shop: ShopHandle,
    server: McpServer,
    gateway: TestGateway,
    /// When the gateway listens with TLS: its certificate (for 127.0.0.1),
    /// whose CA the SDK client trusts through `NODE_EXTRA_CA_CERTS`.
    tls: Option<Tls>,
}

/// A second held tool on the same endpoint, whose approval expires in 2 s
/// (the server has no such tool: it must never get there).
const EXPIRING: &str = r#"  - name: mcp-expiring
    match: { path: /mcp, mcp: { tool: "wire_*" } }
    require: { scopes: [product:buy], audience: "https://shop.example/api" }
    binding_message: "Wire {{arguments.amount}}"
    requested_expiry: 2s
  - name: mcp-async
    match: { path: /mcp, mcp: { tool: "later_*" } }
    require: { scopes: [product:buy], audience: "https://shop.example/api" }
    binding_message: "Later {{arguments.what}}"
    wait: async
  - name: mcp-countersigned
    match: { path: /mcp, mcp: { tool: "sign_*" } }
    require: { scopes: [product:buy], audience: "https://shop.example/api" }
    bind: call
    binding_message: "Sign {{arguments.document}}"
    countersign:
      subjects: [bob]
      binding_message: "Countersign {{arguments.document}} for {{user.sub}}"
"#;

impl McpWorld {
    async fn start() -> Self {
        Self::start_with(GatewayOptions::default()).await
    }

    /// With `options` for the gateway (its upstream is the MCP server).
    async fn start_with(options: GatewayOptions) -> Self {
        Self::start_over(options, None).await
    }

    /// The world with a TLS listener: the SDK client speaks HTTPS to it.
    async fn start_tls() -> Self {
        let tls = Tls::for_names(&["127.0.0.1"]);
        let options = GatewayOptions {
            listen_tls: Some(tls.listen.clone()),
            ..GatewayOptions::default()
        };
        Self::start_over(options, Some(tls)).await
    }

    async fn start_over(options: GatewayOptions, tls: Option<Tls>) -> Self {
        let (peer, shop) = flows::peer_and_shop().await;
        let server = McpServer::start(&peer);
        let gateway = TestGateway::start(
            &peer,
            &shop,
            GatewayOptions {
                upstream: Some(server.addr.to_string()),
                limits: "{ max_body_bytes: 4096, max_hold: 60s }",
                extra_policies: EXPIRING,
                ..options
            },
        )
        .await;
        Self {
            peer,
            _shop: shop,
            server,
            gateway,
            tls,
        }
    }

    /// The MCP endpoint through the gateway, `https` when it has TLS.
    fn url(&self) -> String {
        match &self.tls {
            Some(_) => format!("https://{}/mcp", self.gateway.proxy),
            None => self.gateway.url("/mcp"),
        }
    }

    /// Runs the SDK client on `steps` (see tests/mcp/client.mjs) for `user`;
    /// one JSON value per step.
    fn client(&self, user: Option<&str>, steps: Value) -> tokio::task::JoinHandle<Vec<Value>> {
        let scenario = json!({ "url": self.url(), "user": user, "steps": steps });
        run_scenario_with(scenario, self.tls.as_ref().map(Tls::ca_file))
    }

    /// The one pending request of `user` at the authorization server.
    async fn pending(&self, user: &str) -> Value {
        let pending = self.peer.wait_pending(Some(user), 1).await;
        assert_eq!(pending.len(), 1, "{pending:?}");
        pending[0].clone()
    }

    /// The person says yes to `request` (one of [`Self::pending`]).
    async fn approve(&self, request: &Value) {
        self.peer.approve(flows::auth_req_id(request)).await;
    }

    /// The person says no to `request`.
    async fn deny(&self, request: &Value) {
        self.peer.deny(flows::auth_req_id(request)).await;
    }

    async fn approvals(&self, query: &str) -> Vec<Value> {
        flows::get_json(format!("http://{}/approvals{query}", self.gateway.admin)).await
    }

    /// The tool call `body` (JSON-RPC `id`) sent by `method` with `headers`
    /// as a client that is not the SDK: it is held, alice is asked, says no,
    /// and the client gets a tool error for its `id`; nothing is bought.
    async fn held_and_denied(
        &self,
        method: reqwest::Method,
        headers: &[(&str, &str)],
        body: &'static str,
        id: u64,
    ) {
        let mut request = reqwest::Client::new()
            .request(method, self.gateway.url("/mcp"))
            .header(USER_HEADER, "alice")
            .header("content-type", "application/json")
            .header("accept", "application/json")
            .body(body);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let call = tokio::spawn(request.send());
        let request = self.pending("alice").await;
        assert_eq!(request["binding_message"], MESSAGE);
        self.deny(&request).await;
        let answer: Value = call.await.unwrap().unwrap().json().await.unwrap();
        assert_eq!(answer["id"], id, "{answer}");
        assert_eq!(answer["result"]["isError"], true, "{answer}");
        assert!(self.server.bought().await.is_empty());
    }

    /// A JSON-RPC message POSTed as it is, as a client that is not the SDK.
    async fn post(&self, headers: &[(&str, &str)], body: &str) -> (u16, Value) {
        let mut request = reqwest::Client::new()
            .post(self.gateway.url("/mcp"))
            .header(USER_HEADER, "alice")
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .body(body.to_owned());
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("{status} {text:?}")),
        )
    }
}

/// Runs the SDK client (tests/mcp/client.mjs) on `steps` against `url`
/// for `user`; one JSON value per step.
fn run_client(
    url: String,
    user: Option<&str>,
    steps: Value,
) -> tokio::task::JoinHandle<Vec<Value>> {
    run_scenario(json!({ "url": url, "user": user, "steps": steps }))
}

/// Runs the SDK client on a whole scenario (see tests/mcp/client.mjs).
fn run_scenario(scenario: Value) -> tokio::task::JoinHandle<Vec<Value>> {
    run_scenario_with(scenario, None)
}

/// As [`run_scenario`], trusting the CA in `ca_file` too (HTTPS).
fn run_scenario_with(
    scenario: Value,
    ca_file: Option<std::path::PathBuf>,
) -> tokio::task::JoinHandle<Vec<Value>> {
    tokio::task::spawn_blocking(move || {
        let mut command = Command::new("node");
        if let Some(ca_file) = ca_file {
            command.env("NODE_EXTRA_CA_CERTS", ca_file);
        }
        let output = command
            .arg(Path::new(REPO).join("tests/mcp/client.mjs"))
            .arg(scenario.to_string())
            .stdin(Stdio::null())
            .output()
            .expect("node runs the MCP client");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "the MCP client failed: {}\nstdout: {stdout}\nstderr: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("{l:?}")))
            .collect()
    })
}

fn buy(product: &str, qty: u64) -> Value {
    json!({ "call": "buy_product", "arguments": { "product": product, "qty": qty } })
}

fn text(result: &Value) -> &str {
    result["content"][0]["text"].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_approved_tool_call_reaches_the_server_with_a_fresh_token() {
    approved_tool_call(McpWorld::start().await).await;
}

/// The same with the gateway listening with TLS, the SDK client over HTTPS.
#[tokio::test(flavor = "multi_thread")]
async fn an_approved_tool_call_reaches_the_server_with_a_fresh_token_over_tls() {
    let world = McpWorld::start_tls().await;
    assert!(world.url().starts_with("https://"));
    approved_tool_call(world).await;
}

async fn approved_tool_call(world: McpWorld) {
    let client = world.client(
        Some("alice"),
        json!([{ "list": true }, { "call": "list_products" }, buy("XYZ phone", 2)]),
    );
    let request = world.pending("alice").await;
    assert_eq!(request["binding_message"], MESSAGE);
    assert_eq!(request["scope"], "openid product:buy", "{request}");
    world.approve(&request).await;
    let out = client.await.unwrap();

    // tools/list and the tool no policy holds passed untouched.
    let tools = out[0]["tools"].as_array().unwrap();
    assert!(tools.contains(&json!("buy_product")) && tools.contains(&json!("list_products")));
    assert_eq!(text(&out[1]["results"][0]), "XYZ phone, ABC laptop, Cable");
    // The tool result, validated by the SDK against the tool's outputSchema.
    let bought = &out[2]["results"][0];
    assert_eq!(bought["isError"], Value::Null, "{bought}");
    assert_eq!(bought["structuredContent"]["buyer"], "alice", "{bought}");
    assert_eq!(bought["structuredContent"]["qty"], 2, "{bought}");

    // The server saw the fresh token on that one call, and on no other.
    let calls = world.server.calls().await;
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[0]["tool"], "list_products");
    assert_eq!(calls[0]["token"], false, "{calls:?}");
    assert_eq!(calls[1]["tool"], "buy_product");
    assert_eq!(calls[1]["valid"], true, "{calls:?}");
    assert_eq!(calls[1]["sub"], "alice");
    assert_eq!(calls[1]["aud"], "https://shop.example/api");
    assert_eq!(
        calls[1]["arguments"],
        json!({ "product": "XYZ phone", "qty": 2 })
    );
    // Only the held tool was asked about.
    let requests = world.peer.requests().await;
    assert_eq!(requests.len(), 1);
    // Its token named that exact call, and the server's verifier took it.
    let binding = &requests[0]["authorization_details"][0];
    assert_eq!(binding["type"], "countersign_call", "{binding}");
    assert_eq!(binding["tool"], "buy_product", "{binding}");
    assert_eq!(binding["target"], "/mcp", "{binding}");
    let bindings = world.server.bindings().await;
    assert_eq!(bindings.len(), 1, "{bindings:?}");
    assert_eq!(bindings[0]["accepted"], true, "{bindings:?}");
    assert_eq!(bindings[0]["approval"], binding["approval"], "{bindings:?}");
    // Nothing else went wrong for the SDK (the GET stream, the DELETE).
    assert_eq!(out[3]["errors"], json!([]), "{out:?}");
    // The server's notification before its result was relayed too.
    assert_eq!(
        out[3]["logs"],
        json!(["charging alice for 2 XYZ phone"]),
        "{out:?}"
    );
    let methods = world.server.methods().await;
    assert!(
        methods["GET"].as_u64() >= Some(1),
        "the GET stream: {methods}"
    );
    assert_eq!(methods["DELETE"], 1, "{methods}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dpop_bound_tool_call_reaches_the_server_with_a_proof_it_accepts() {
    let pem = std::fs::read_to_string(repo_path("tests/fixtures/dpop-key.pem")).unwrap();
    let world = McpWorld::start_with(GatewayOptions {
        client: format!(
            "{}\n  token_binding: dpop\n  dpop_key: {}",
            GatewayOptions::default().client,
            serde_json::to_string(&pem).unwrap()
        ),
        ..GatewayOptions::default()
    })
    .await;
    let client = world.client(Some("alice"), json!([buy("XYZ phone", 2)]));
    let request = world.pending("alice").await;
    world.approve(&request).await;
    let out = client.await.unwrap();
    let bought = &out[0]["results"][0];
    assert_eq!(bought["isError"], Value::Null, "{bought}");
    assert_eq!(bought["structuredContent"]["buyer"], "alice", "{bought}");
    // The server's verifier checked the DPoP proof and the call binding.
    let bindings = world.server.bindings().await;
    assert_eq!(bindings.len(), 1, "{bindings:?}");
    assert_eq!(bindings[0]["accepted"], true, "{bindings:?}");
    assert_eq!(world.server.bought().await.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_denied_tool_call_is_a_tool_error_the_model_can_read() {
    denied_tool_call(McpWorld::start().await).await;
}

/// The same with the gateway listening with TLS, the SDK client over HTTPS.
#[tokio::test(flavor = "multi_thread")]
async fn a_denied_tool_call_is_a_tool_error_the_model_can_read_over_tls() {
    let world = McpWorld::start_tls().await;
    assert!(world.url().starts_with("https://"));
    denied_tool_call(world).await;
}

async fn denied_tool_call(world: McpWorld) {
    let client = world.client(Some("bob"), json!([buy("XYZ phone", 2)]));
    let request = world.pending("bob").await;
    world.deny(&request).await;
    let out = client.await.unwrap();
    let result = &out[0]["results"][0];
    assert_eq!(result["isError"], true, "{result}");
    assert_eq!(text(result), "The user has denied the request.");
    assert_eq!(result["_meta"]["countersign"]["code"], "access_denied");
    assert!(world.server.bought().await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_countersigned_tool_call_needs_both_and_a_no_is_a_tool_error_naming_who() {
    let world = McpWorld::start().await;
    let sign = json!({ "call": "sign_contract", "arguments": { "document": "NDA" } });
    let client = world.client(Some("alice"), json!([sign]));
    let bob = world.pending("bob").await;
    let alice = world.pending("alice").await;
    assert_eq!(bob["binding_message"], "Countersign NDA for alice");
    assert_eq!(alice["binding_message"], "Sign NDA");
    world.approve(&alice).await;
    world.deny(&bob).await;
    let out = client.await.unwrap();
    let result = &out[0]["results"][0];
    assert_eq!(result["isError"], true, "{result}");
    assert!(text(result).contains("denied by bob"), "{result}");
    assert_eq!(result["_meta"]["countersign"]["code"], "access_denied");
    assert!(
        world.server.calls().await.is_empty(),
        "a refused call was forwarded"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_approval_is_a_tool_error_too_also_in_the_progress_stream() {
    let world = McpWorld::start().await;
    let out = world
        .client(
            Some("alice"),
            json!([
                { "call": "wire_money", "arguments": { "amount": 100 } },
                { "call": "wire_money", "arguments": { "amount": 200 }, "timeout": 3000, "progress": true },
            ]),
        )
        .await
        .unwrap();
    for step in &out[..2] {
        let result = &step["results"][0];
        assert_eq!(result["isError"], true, "{result}");
        assert_eq!(
            result["_meta"]["countersign"]["code"], "approval_expired",
            "{result}"
        );
        assert!(text(result).contains("did not answer"), "{result}");
    }
    assert!(
        !out[1]["progress"].as_array().unwrap().is_empty(),
        "{out:?}"
    );
    assert!(world.server.calls().await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_async_policy_tells_the_model_to_call_again() {
    let world = McpWorld::start().await;
    let out = world
        .client(
            Some("alice"),
            json!([{ "call": "later_order", "arguments": { "what": "soap" } }]),
        )
        .await
        .unwrap();
    let result = &out[0]["results"][0];
    assert_eq!(result["isError"], true, "{result}");
    assert_eq!(
        result["_meta"]["countersign"]["code"], "approval_pending",
        "{result}"
    );
    assert!(
        text(result).starts_with("Waiting for alice to approve 'Later soap'; call again in"),
        "{result}"
    );
    assert!(world.server.calls().await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_call_held_longer_than_the_client_timeout_completes_thanks_to_progress() {
    let world = McpWorld::start().await;
    let started = Instant::now();
    let client = world.client(
        Some("alice"),
        json!([{ "call": "buy_product", "arguments": { "product": "ABC laptop", "qty": 1 }, "timeout": 3000, "progress": true }]),
    );
    let request = world.pending("alice").await;
    // The person takes longer than the client's 3 s timeout.
    tokio::time::sleep(Duration::from_secs(7)).await;
    world.approve(&request).await;
    let out = client.await.unwrap();
    assert!(started.elapsed() > Duration::from_secs(7));
    let result = &out[0]["results"][0];
    assert_eq!(result["isError"], Value::Null, "{result}");
    assert_eq!(
        result["structuredContent"]["product"], "ABC laptop",
        "{result}"
    );
    // Relayed in the progress stream: the server's notification, then its result.
    assert_eq!(
        out[1]["logs"],
        json!(["charging alice for 1 ABC laptop"]),
        "{out:?}"
    );
    let progress = out[0]["progress"].as_array().unwrap();
    assert!(progress.len() >= 3, "{progress:?}");
    assert_eq!(
        progress[0], "Waiting for alice to approve 'Buy 1 ABC laptop'",
        "{progress:?}"
    );
    assert_eq!(world.server.bought().await.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_held_call_is_never_forwarded() {
    let world = McpWorld::start().await;
    // No progress: the SDK gives up after 2 s and sends notifications/cancelled.
    let client = world.client(
        Some("carol"),
        json!([{ "call": "buy_product", "arguments": { "product": "Cable", "qty": 3 }, "timeout": 2000, "pause": 1500 }]),
    );
    let request = world.pending("carol").await;
    let out = client.await.unwrap();
    let error = &out[0]["results"][0]["error"];
    assert_eq!(error["code"], -32001, "{out:?}");

    let cancelled = world.approvals("?state=failed").await;
    assert_eq!(cancelled.len(), 1, "{cancelled:?}");
    assert_eq!(cancelled[0]["problem_code"], "approval_cancelled");
    // The person approves anyway: the gateway no longer polls, nothing is sent.
    let auth_req_id = flows::auth_req_id(&request);
    world.peer.approve(auth_req_id).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(world.peer.request(auth_req_id).await["status"], "approved");
    assert!(world.server.bought().await.is_empty());

    // Sent again, the call is a new approval: carol is asked again.
    let client = world.client(
        Some("carol"),
        json!([{ "call": "buy_product", "arguments": { "product": "Cable", "qty": 3 } }]),
    );
    let again = world.pending("carol").await;
    assert_ne!(again["auth_req_id"], request["auth_req_id"]);
    world.approve(&again).await;
    let out = client.await.unwrap();
    assert_eq!(
        out[0]["results"][0]["structuredContent"]["qty"], 3,
        "{out:?}"
    );
    assert_eq!(world.server.bought().await.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelling_a_retry_that_attached_cancels_the_approval() {
    let world = McpWorld::start().await;
    let call = |id: u64| {
        let url = world.gateway.url("/mcp");
        let body = json!({ "jsonrpc": "2.0", "id": id, "method": "tools/call",
            "params": { "name": "buy_product", "arguments": { "product": "Cable", "qty": 1 } } });
        tokio::spawn(async move {
            let response = reqwest::Client::new()
                .post(url)
                .header(USER_HEADER, "alice")
                .header("accept", "application/json, text/event-stream")
                .json(&body)
                .send()
                .await
                .unwrap();
            response.json::<Value>().await.unwrap()
        })
    };
    let first = call(1);
    world.pending("alice").await;
    let retry = call(2);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Only the retry's own id: the stored call is the first request (id 1).
    let cancel = reqwest::Client::new()
        .post(world.gateway.url("/mcp"))
        .header(USER_HEADER, "alice")
        .json(&json!({ "jsonrpc": "2.0", "method": "notifications/cancelled", "params": { "requestId": 2 } }))
        .send()
        .await
        .unwrap();
    // The notification went on to the server (which wants a session).
    assert_eq!(cancel.status(), 400);
    for (answer, id) in [(first.await.unwrap(), 1), (retry.await.unwrap(), 2)] {
        assert_eq!(answer["id"], id, "{answer}");
        assert_eq!(
            answer["result"]["_meta"]["countersign"]["code"], "approval_cancelled",
            "{answer}"
        );
    }
    assert_eq!(world.peer.requests().await.len(), 1);
    assert!(world.server.bought().await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retried_call_attaches_to_the_approval_and_each_request_gets_its_answer() {
    let world = McpWorld::start().await;
    let mut call = buy("XYZ phone", 2);
    call["parallel"] = json!(2);
    let client = world.client(Some("alice"), json!([call]));
    let request = world.pending("alice").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(world.peer.requests().await.len(), 1, "asked twice");
    world.approve(&request).await;
    let out = client.await.unwrap();
    let results = out[0]["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    for result in results {
        assert_eq!(result["structuredContent"]["buyer"], "alice", "{result}");
    }
    assert_eq!(
        results[0]["structuredContent"]["order"],
        results[1]["structuredContent"]["order"]
    );
    assert_eq!(world.server.bought().await.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repeated_tool_call_after_its_result_was_delivered_asks_again() {
    // The model buys two phones and gets the result; then it asks for two
    // more with the identical tools/call. That is a new purchase, asked
    // about again (issue 25), not the first result handed back.
    let world = McpWorld::start().await;
    let client = world.client(
        Some("alice"),
        json!([buy("XYZ phone", 2), buy("XYZ phone", 2)]),
    );
    let first = world.pending("alice").await;
    world.approve(&first).await;
    let second = world.pending("alice").await;
    assert_ne!(second["auth_req_id"], first["auth_req_id"], "asked again");
    assert_eq!(second["binding_message"], MESSAGE);
    world.approve(&second).await;
    let out = client.await.unwrap();
    let orders: Vec<&Value> = out[..2]
        .iter()
        .map(|step| {
            let result = &step["results"][0];
            assert_eq!(result["isError"], Value::Null, "{result}");
            &result["structuredContent"]["order"]
        })
        .collect();
    assert_ne!(orders[0], orders[1], "two purchases: {out:?}");
    assert_eq!(world.server.bought().await.len(), 2);
    assert_eq!(world.peer.requests().await.len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_that_could_be_read_another_way_are_refused() {
    let world = McpWorld::start().await;
    let buy = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"buy_product","arguments":{"product":"XYZ phone","qty":2}}}"#;

    let (status, answer) = world
        .post(
            &[],
            &format!(r#"[{{"jsonrpc":"2.0","id":0,"method":"tools/list"}},{buy}]"#),
        )
        .await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"]["code"], -32600, "{answer}");
    assert_eq!(answer["error"]["data"]["code"], "mcp_batch_refused");

    for headers in [
        [("mcp-method", "tools/list"), ("mcp-name", "buy_product")],
        [("mcp-method", "tools/call"), ("mcp-name", "list_products")],
    ] {
        let (status, answer) = world.post(&headers, buy).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["id"], 1, "{answer}");
        assert_eq!(
            answer["error"]["data"]["code"], "mcp_header_mismatch",
            "{answer}"
        );
    }

    // Another method carrying the same message is read like a POST.
    let response = reqwest::Client::new()
        .put(world.gateway.url("/mcp"))
        .header(USER_HEADER, "alice")
        .header("content-type", "application/json")
        .header("mcp-method", "tools/list")
        .body(buy)
        .send()
        .await
        .unwrap();
    let answer: Value = response.json().await.unwrap();
    assert_eq!(
        answer["error"]["data"]["code"], "mcp_header_mismatch",
        "{answer}"
    );

    let twins = r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"buy_product","arguments":{"product":"XYZ phone","qty":1,"QTY":100}}}"#;
    let (status, answer) = world.post(&[], twins).await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(
        answer["error"]["data"]["code"], "invalid_mcp_message",
        "{answer}"
    );

    // A tool name in another letter case, from the SDK client: a tool error.
    let out = world
        .client(
            Some("alice"),
            json!([{ "call": "Buy_Product", "arguments": { "product": "XYZ phone", "qty": 2 } }]),
        )
        .await
        .unwrap();
    let result = &out[0]["results"][0];
    assert_eq!(result["isError"], true, "{result}");
    assert!(text(result).contains("only in letter case"), "{result}");

    // An argument the person is not shown (mcp.arguments.only).
    let out = world
        .client(
            Some("alice"),
            json!([{ "call": "buy_product", "arguments": { "product": "XYZ phone", "qty": 2, "giftTo": "eve" } }]),
        )
        .await
        .unwrap();
    let result = &out[0]["results"][0];
    assert_eq!(result["isError"], true, "{result}");
    assert_eq!(
        result["_meta"]["countersign"]["code"], "invalid_body",
        "{result}"
    );
    assert!(text(result).contains("'giftTo'"), "{result}");

    // Any other refusal of a held call is a tool error too: here, no identity.
    let out = world
        .client(
            None,
            json!([{ "call": "buy_product", "arguments": { "product": "XYZ phone", "qty": 2 } }]),
        )
        .await
        .unwrap();
    let result = &out[0]["results"][0];
    assert_eq!(result["isError"], true, "{result}");
    assert_eq!(
        result["_meta"]["countersign"]["code"], "identity_required",
        "{result}"
    );

    assert!(world.peer.requests().await.is_empty());
    assert!(world.server.calls().await.is_empty());
}

/// The example shop's own MCP endpoint (`countersign dev` serves it), with
/// the SDK client, through the gateway.
/// Revision 2026-07-28 lets a client mirror arguments a tool marks into
/// `Mcp-Param-<Name>` headers, and a server or intermediary may read the
/// argument from there: a header that disagrees with the body would have
/// the person approve 2 while 100 are bought.
#[tokio::test(flavor = "multi_thread")]
async fn mcp_param_headers_that_disagree_with_the_arguments_are_refused() {
    let world = McpWorld::start().await;
    let url = world.gateway.url("/mcp");
    // The SDK client, sending the header on its requests.
    let out = run_scenario(json!({
        "url": url,
        "user": "alice",
        "headers": { "Mcp-Param-Qty": "100" },
        "steps": [buy("XYZ phone", 2)],
    }))
    .await
    .unwrap();
    let result = &out[0]["results"][0];
    assert_eq!(result["error"]["code"], -32600, "{result}");
    let message = result["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("mcp-param-qty") && message.contains("'100'"),
        "{message}"
    );

    let raw = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"buy_product","arguments":{"product":"XYZ phone","qty":2}}}"#;
    for headers in [
        &[("mcp-param-qty", "=?base64?MTAw?=")][..],
        &[("mcp-param-qty", "2.0")],
        &[("mcp-param-qty", "2"), ("mcp-param-qty", "100")],
        &[("mcp-param-product", "ABC laptop")],
        // No argument of that name: which one it stands for is unknown.
        &[("mcp-param-quantity", "100")],
    ] {
        let (status, answer) = world.post(headers, raw).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["id"], 1, "{answer}");
        assert_eq!(
            answer["error"]["data"]["code"], "mcp_header_mismatch",
            "{headers:?}: {answer}"
        );
    }
    assert!(
        world.peer.requests().await.is_empty(),
        "the person was asked"
    );
    assert!(world.server.bought().await.is_empty());

    // Headers that agree (the name in any case, the value as the SDKs
    // encode it) are held and forwarded as they are.
    let client = run_scenario(json!({
        "url": url,
        "user": "alice",
        "headers": { "Mcp-Param-QTY": "2", "Mcp-Param-Product": "=?base64?WFlaIHBob25l?=" },
        "steps": [buy("XYZ phone", 2)],
    }));
    let request = world.pending("alice").await;
    assert_eq!(request["binding_message"], MESSAGE);
    world.approve(&request).await;
    let out = client.await.unwrap();
    let bought = &out[0]["results"][0];
    assert_eq!(bought["structuredContent"]["qty"], 2, "{bought}");
    assert_eq!(world.server.bought().await.len(), 1);
}

/// Revision 2026-07-28 has clients send an `Mcp-Name` that cannot travel
/// as plain ASCII as `=?base64?…?=`, and servers decode it: the gateway
/// compares the decoded name with the body's, so such a call of a held tool
/// is held (not refused), and one whose decoded name is another tool's is
/// refused.
#[tokio::test(flavor = "multi_thread")]
async fn an_encoded_mcp_name_is_decoded_before_it_is_compared() {
    let world = McpWorld::start().await;
    let buy = r#"{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"buy_product","arguments":{"product":"XYZ phone","qty":2}}}"#;
    for name in [
        // "list_products": the server would be told another tool.
        "=?base64?bGlzdF9wcm9kdWN0cw==?=",
        // The wrapper in another letter case is not the encoding.
        "=?BASE64?YnV5X3Byb2R1Y3Q=?=",
    ] {
        let (status, answer) = world
            .post(&[("mcp-method", "tools/call"), ("mcp-name", name)], buy)
            .await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(
            answer["error"]["data"]["code"], "mcp_header_mismatch",
            "{name}: {answer}"
        );
    }
    assert!(
        world.peer.requests().await.is_empty(),
        "the person was asked"
    );

    // "buy_product" in Base64: the held call it names.
    world
        .held_and_denied(
            reqwest::Method::POST,
            &[
                ("mcp-method", "tools/call"),
                ("mcp-name", "=?base64?YnV5X3Byb2R1Y3Q=?="),
            ],
            buy,
            4,
        )
        .await;
}

/// A server with one handler for every method (Express's `app.all`, a Go
/// handler that never looks at the method) runs a tools/call sent as the
/// body of a GET: such a GET is read like a POST and held.
#[tokio::test(flavor = "multi_thread")]
async fn a_tool_call_in_the_body_of_a_get_is_held_too() {
    let world = McpWorld::start().await;
    let buy = r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"buy_product","arguments":{"product":"XYZ phone","qty":2}}}"#;
    world
        .held_and_denied(reqwest::Method::GET, &[], buy, 3)
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_example_shop_serves_buy_product_over_mcp() {
    let world = World::start(GatewayOptions::default()).await;
    let client = run_client(
        world.gateway.url("/mcp"),
        Some("alice"),
        json!([{ "list": true }, { "call": "list_products" }, buy("XYZ phone", 2)]),
    );
    let pending = world.peer.wait_pending(Some("alice"), 1).await;
    assert_eq!(pending[0]["binding_message"], MESSAGE);
    world.peer.approve(flows::auth_req_id(&pending[0])).await;
    let out = client.await.unwrap();
    assert_eq!(out[0]["tools"], json!(["buy_product", "list_products"]));
    assert!(text(&out[1]["results"][0]).contains("XYZ phone"), "{out:?}");
    let bought = &out[2]["results"][0];
    assert_eq!(bought["structuredContent"]["buyer"], "alice", "{bought}");
    assert_eq!(out[3]["errors"], json!([]), "{out:?}");
    let received = world.shop.received();
    assert_eq!(received.len(), 1, "{received:?}");
    assert_eq!(received[0].claims.as_ref().unwrap()["sub"], "alice");
}

/// The deprecated HTTP+SSE transport (revision 2024-11-05), which servers
/// keep beside Streamable HTTP for older clients (the SDK's
/// backwards-compatible example, FastMCP): GET /sse names another endpoint,
/// /messages?sessionId=..., and the same server runs a tools/call POSTed
/// there. A held tool's call sent to any path of an upstream behind an MCP
/// endpoint is refused: the person is never asked, and the tool never runs.
#[tokio::test]
async fn a_held_tool_called_over_the_legacy_sse_transport_is_refused() {
    let world = McpWorld::start().await;
    let proxy = world.gateway.proxy;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    // The SSE stream stays open (and read) while the messages are sent.
    let stream = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(proxy).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(8)))
            .unwrap();
        write!(
            stream,
            "GET /sse HTTP/1.1\r\nHost: shop.example\r\n{USER_HEADER}: alice\r\naccept: text/event-stream\r\n\r\n"
        )
        .unwrap();
        let mut seen = String::new();
        let mut chunk = [0u8; 4096];
        let mut sent = false;
        while let Ok(n) = stream.read(&mut chunk) {
            if n == 0 {
                break;
            }
            seen.push_str(&String::from_utf8_lossy(&chunk[..n]));
            if !sent {
                if let Some(at) = seen.find("data: /messages") {
                    let line = seen[at + "data: ".len()..]
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .to_owned();
                    tx.send(line).unwrap();
                    sent = true;
                }
            }
        }
        seen
    });
    let endpoint = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(10)))
        .await
        .unwrap()
        .expect("the server named its message endpoint through the gateway");
    let send = |body: Value| {
        reqwest::Client::new()
            .post(world.gateway.url(&endpoint))
            .header(USER_HEADER, "alice")
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
    };
    let init = send(
        json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2024-11-05", "capabilities": {},
        "clientInfo": {"name": "legacy", "version": "1"}}}),
    )
    .await
    .unwrap();
    assert_eq!(init.status(), 202, "initialize passes untouched");
    send(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
        .await
        .unwrap();
    let call = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
        "name": "buy_product", "arguments": {"product": "XYZ phone", "qty": 2}}});
    let response = send(call.clone()).await.unwrap();
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["code"], "invalid_mcp_message", "{body}");
    // The tool's name in another case, and in a batch, too.
    let mut other = call.clone();
    other["params"]["name"] = json!("BUY_PRODUCT");
    for body in [other, json!([call])] {
        let response = send(body).await.unwrap();
        assert_eq!(response.status(), 400);
    }
    // A compressed body cannot be read, while Express's json() in front
    // of a legacy handler inflates it (this server does not): refused.
    let encoded = reqwest::Client::new()
        .post(world.gateway.url(&endpoint))
        .header(USER_HEADER, "alice")
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(vec![31u8, 139, 8, 0, 0, 0, 0, 0, 0, 3])
        .send()
        .await
        .unwrap();
    let problem: Value = encoded.json().await.unwrap_or(Value::Null);
    assert_eq!(problem["code"], "invalid_mcp_message", "{problem}");
    // A call of a tool no policy holds passes.
    let free = send(json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": {"name": "list_products", "arguments": {}}}))
    .await
    .unwrap();
    assert_eq!(free.status(), 202);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        world.server.bought().await.is_empty(),
        "buy_product ran unapproved"
    );
    assert!(
        world.peer.requests().await.is_empty(),
        "the person was asked"
    );
    let listed = world.server.calls().await;
    assert!(
        listed.iter().any(|c| c["tool"] == "list_products"),
        "the legacy transport works through the gateway: {listed:?}"
    );
    drop(world);
    let _ = tokio::task::spawn_blocking(move || stream.join()).await;
}
