//! Issue 20: the token issued for an approval names the exact call
//! (docs/call-binding.md). Through the real gateway, oidc-provider issuing
//! the tokens, and the shop checking what it receives.

mod support;

use serde_json::{json, Value};
use support::*;

const APPROVAL_ID: &str = "x-countersign-approval-id";

/// Buys two phones for alice, has the peer answer with `tamper` (see
/// tests/peer/README.md, `access-token-details`) if given, and alice
/// approve: the agent's answer.
async fn approved_purchase(world: &World, tamper: Option<&str>) -> reqwest::Response {
    if let Some(mode) = tamper {
        let status = world
            .peer
            .control("access-token-details", json!({ "mode": mode, "count": 1 }))
            .await;
        assert!(status.is_success(), "access-token-details: {status}");
    }
    let held = world.post_as("alice", "/shop?ref=agent").json(&phones());
    world.approved("alice", held).await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_token_names_the_call_the_shop_received() {
    let world = World::start(GatewayOptions::default()).await;
    let response = approved_purchase(&world, None).await;
    assert_eq!(response.status(), 200);
    let approval = response.headers()[APPROVAL_ID].to_str().unwrap().to_owned();

    // What the person was asked with: the policy's own entry, then the call's.
    let asked = &world.peer.requests().await[0]["authorization_details"];
    assert_eq!(asked[0]["type"], "product_purchase", "{asked}");
    let entry = &asked[1];

    // What the shop received is exactly what the entry names, and the token
    // it got carries that entry, unchanged.
    let received = world.shop.received();
    assert_eq!(received.len(), 1, "forwarded once");
    let call = &received[0];
    let expected = json!({
        "type": "countersign_call",
        "version": "1",
        "approval": approval,
        "method": "POST",
        "target": "/shop?ref=agent",
        "host": world.shop.addr.to_string(),
        "body_sha256": countersign::approval::binding::body_digest(&call.body),
    });
    assert_eq!(entry, &expected);
    assert_eq!(call.method, "POST");
    assert_eq!(call.path_and_query, "/shop?ref=agent");
    assert_eq!(call.headers["host"], world.shop.addr.to_string().as_str());
    let claims = call.claims.as_ref().expect("the shop verified the token");
    let in_token: Vec<&Value> = claims["authorization_details"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "countersign_call")
        .collect();
    assert_eq!(in_token, vec![&expected]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_without_the_binding_is_not_forwarded() {
    let world = World::start(GatewayOptions::default()).await;
    for tamper in ["drop", "alter"] {
        let response = approved_purchase(&world, Some(tamper)).await;
        assert_eq!(response.status(), 502, "{tamper}");
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["code"], "token_unbound", "{tamper}: {problem}");
        assert!(
            world.shop.received().is_empty(),
            "{tamper}: nothing reaches the shop"
        );
    }
    let metrics = world.gateway.metrics().await;
    assert!(
        metrics
            .contains(r#"countersign_approvals_total{policy="buy-product",result="approved"} 2"#),
        "{metrics}"
    );
}

/// A world whose gateway proves possession of a DPoP key (RFC 9449), and
/// whose peer makes every proof carry a nonce it gave.
async fn dpop_world() -> (World, countersign::dpop::DpopKey) {
    let pem = std::fs::read_to_string(repo_path("tests/fixtures/dpop-key.pem")).unwrap();
    let key = countersign::dpop::DpopKey::from_pem(&pem).unwrap();
    let peer = Peer::start_with(&[("PEER_DPOP_NONCE", "1")]);
    let shop = start_shop(&peer).await;
    let options = GatewayOptions {
        client: format!(
            "{}\n  token_binding: dpop\n  dpop_key: {}",
            GatewayOptions::default().client,
            serde_json::to_string(&pem).unwrap()
        ),
        ..GatewayOptions::default()
    };
    let gateway = TestGateway::start(&peer, &shop, options).await;
    let world = World {
        peer,
        shop,
        gateway,
        agent: reqwest::Client::new(),
    };
    (world, key)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dpop_bound_token_is_forwarded_with_a_proof_the_shop_accepts() {
    let (world, key) = dpop_world().await;
    let response = approved_purchase(&world, None).await;
    assert_eq!(response.status(), 200);
    let received = world.shop.received();
    assert_eq!(received.len(), 1);
    let call = &received[0];
    assert_eq!(call.refused, None, "the shop's verifier took it");
    let authorization = call.headers["authorization"].to_str().unwrap();
    assert!(authorization.starts_with("DPoP "), "{authorization}");
    assert!(call.headers.contains_key("dpop"), "a proof came with it");
    let claims = call.claims.as_ref().unwrap();
    assert_eq!(claims["cnf"]["jkt"], key.thumbprint(), "bound to the key");

    // Replayed by whoever copied it, without the gateway's key: refused.
    let replay = reqwest::Client::new()
        .post(format!("http://{}/shop?ref=agent", world.shop.addr))
        .header("authorization", authorization)
        .header("content-type", "application/json")
        .body(call.body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(replay.status(), 401);
    let problem: Value = replay.json().await.unwrap();
    assert_eq!(problem["code"], "dpop_proof_missing", "{problem}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bearer_token_where_dpop_was_asked_for_is_not_forwarded() {
    let (world, _) = dpop_world().await;
    let status = world
        .peer
        .control(
            "token-misbehave",
            json!({ "mode": "token_type", "count": 1, "token_type": "Bearer" }),
        )
        .await;
    assert!(status.is_success());
    let response = approved_purchase(&world, None).await;
    assert_eq!(response.status(), 502);
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["code"], "token_unbound", "{problem}");
    assert!(world.shop.received().is_empty());
}
