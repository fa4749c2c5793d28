//! The agent stack users have, through the gateway: the LangGraph agent of
//! `examples/agents/langgraph/` (`@langchain/langgraph` and
//! `@langchain/core`, pinned in its `package-lock.json`, run by node as
//! README shows it) buys through the real gateway in front of the real shop,
//! and the person answers at the oidc-provider peer. Its `buy` tool is a plain
//! `fetch` to the gateway; its chat model is scripted (no LLM key): it calls
//! the tool, then writes the final answer from what the tool returned.
//! Under a `wait: async` policy the tool follows the retry contract: `202`,
//! the same call again after `Retry-After`, the order once approved.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;
use support::*;

/// `buy-product` of policies/shop.yaml answering `202` at once instead of
/// holding the call: the agent must call again until the person answered.
const ASYNC_BUY: &str = r#"  - name: buy-product-async
    match: { methods: [POST], path: /shop }
    require: { scopes: [product:buy], audience: "https://shop.example/api" }
    bind: call
    binding_message: "Do you want to buy {{qty}} {{product}}"
    body: { only: [product, qty, priceLimit] }
    requested_expiry: 2m
    wait: async
"#;

/// Runs the example agent against `gateway` for `user`, buying two phones;
/// its `--json` output (the final answer and every message of the graph).
fn run_agent(gateway: String, user: &'static str) -> tokio::task::JoinHandle<Value> {
    tokio::task::spawn_blocking(move || {
        let dir = Path::new(REPO).join("examples/agents/langgraph");
        assert!(
            dir.join("node_modules/@langchain/langgraph").exists(),
            "the example's packages are not installed: run `npm ci --prefix examples/agents/langgraph` first"
        );
        let output = Command::new("node")
            .arg(dir.join("agent.mjs"))
            .args(["--gateway", &gateway, "--user", user])
            .args([
                "--product",
                "XYZ phone",
                "--qty",
                "2",
                "--price-limit",
                "900",
            ])
            .args(["--timeout", "60", "--json"])
            .stdin(Stdio::null())
            .output()
            .expect("node runs the LangGraph agent");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "the agent failed: {}\nstdout: {stdout}\nstderr: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_str(stdout.trim()).unwrap_or_else(|_| panic!("{stdout:?}"))
    })
}

/// The messages of the graph by type, in order: the model called `buy` once.
fn assert_one_buy(run: &Value) {
    let steps = run["steps"].as_array().expect("steps");
    let types: Vec<&str> = steps.iter().map(|s| s["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["human", "ai", "tool", "ai"], "{run}");
    let call = &steps[1]["tool_calls"][0];
    assert_eq!(call["name"], "buy", "{run}");
    assert_eq!(
        call["args"],
        serde_json::json!({ "product": "XYZ phone", "qty": 2, "priceLimit": 900 })
    );
}

#[tokio::test]
async fn the_agents_purchase_is_held_until_approved_and_its_answer_has_the_order() {
    let world = World::start(GatewayOptions::default()).await;
    let agent = run_agent(world.gateway.url(""), "alice");

    let pending = world.peer.wait_pending(Some("alice"), 1).await;
    assert_eq!(
        pending[0]["binding_message"],
        "Do you want to buy 2 XYZ phone"
    );
    assert!(
        world.shop.received().is_empty(),
        "nothing reaches the shop before alice approves"
    );
    assert!(!agent.is_finished(), "the tool's call is held");
    world.peer.approve(flows::auth_req_id(&pending[0])).await;

    let run = agent.await.unwrap();
    assert_one_buy(&run);
    let received = world.shop.received();
    assert_eq!(received.len(), 1, "one approval, one order: {run}");
    let claims = received[0]
        .claims
        .as_ref()
        .expect("the shop verified the token");
    assert_eq!(claims["sub"], "alice");
    assert_eq!(received[0].refused, None, "the shop took the order");
    assert_eq!(
        run["answer"], "Order ord-1 confirmed: 2 x XYZ phone for alice.",
        "the final answer relays the shop's order: {run}"
    );
}

#[tokio::test]
async fn a_denied_purchase_is_relayed_by_the_agent_and_never_reaches_the_shop() {
    let world = World::start(GatewayOptions::default()).await;
    let agent = run_agent(world.gateway.url(""), "bob");

    let pending = world.peer.wait_pending(Some("bob"), 1).await;
    world.peer.deny(flows::auth_req_id(&pending[0])).await;

    let run = agent.await.unwrap();
    assert_one_buy(&run);
    let answer = run["answer"].as_str().expect("an answer");
    assert!(answer.contains("access_denied"), "the code: {run}");
    assert!(
        answer.contains("The user has denied the request."),
        "the problem's detail: {run}"
    );
    assert!(!answer.contains("Order ord-"), "{run}");
    assert!(world.shop.received().is_empty(), "the shop saw nothing");
}

#[tokio::test]
async fn under_an_async_policy_the_tool_calls_again_after_retry_after_and_gets_the_order() {
    let (peer, shop) = flows::peer_and_shop().await;
    // The test gateway's file with only the async policy (policies/ holds
    // the call instead, and its first matching policy wins).
    let dir = tempfile::tempdir().unwrap();
    let options = GatewayOptions {
        extra_policies: ASYNC_BUY,
        ..GatewayOptions::default()
    };
    let (file, proxy, admin) = write_config(dir.path(), &peer.issuer, &shop, &options);
    let shipped = format!("{}, ", repo_path("policies").display());
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains(&shipped), "{text}");
    std::fs::write(&file, text.replace(&shipped, "")).unwrap();
    let config = countersign::config::load(&file).expect("the configuration loads");
    let gateway = TestGateway::start_loaded(config, proxy, admin).await;

    let agent = run_agent(gateway.url(""), "alice");
    let pending = peer.wait_pending(Some("alice"), 1).await;
    // The tool has had a 202 and called again before alice answered: each
    // call attached to the one approval.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while accepted(&gateway.metrics().await) < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the tool never called again"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    peer.approve(flows::auth_req_id(&pending[0])).await;

    let run = agent.await.unwrap();
    assert_one_buy(&run);
    assert_eq!(
        run["answer"], "Order ord-1 confirmed: 2 x XYZ phone for alice.",
        "{run}"
    );
    assert_eq!(shop.received().len(), 1, "one approval, one order");
    assert_eq!(peer.requests().await.len(), 1, "alice was asked once");
}

/// How many calls the gateway answered `202 Accepted`.
fn accepted(metrics: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                r#"countersign_calls_total{outcome="accepted",policy="buy-product-async"} "#,
            )
        })
        .map_or(0, |n| n.parse().unwrap())
}
