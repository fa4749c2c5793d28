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
    let held = tokio::spawn(
        world
            .agent
            .post(world.gateway.url("/shop?ref=agent"))
            .header(USER_HEADER, "alice")
            .json(&phones())
            .send(),
    );
    let pending = world.peer.wait_pending(Some("alice"), 1).await;
    world
        .peer
        .approve(pending[0]["auth_req_id"].as_str().unwrap())
        .await;
    held.await.unwrap().unwrap()
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
