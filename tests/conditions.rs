//! Policy conditions (`when:` / `otherwise:`) through the real gateway, the
//! oidc-provider peer and the token-verifying shop. The policies are the
//! examples in `policies/conditions.yaml` (every test gateway loads
//! `policies/`), plus one reading the query.

mod support;

use support::*;

const EXPORTS: &str = r#"  - name: export
    match: { methods: [GET], path: /exports }
    when: "int(query.rows) > 1000"
    require: { scopes: [product:read], audience: https://shop.example/api }
    binding_message: "Export {{query.rows}} rows"
"#;

async fn world() -> World {
    World::builder()
        .all_scopes()
        .policies(EXPORTS)
        .start()
        .await
}

/// POST `path` as an agent for alice, with this JSON body.
fn post(world: &World, path: &str, body: &str) -> reqwest::RequestBuilder {
    world.post_json("alice", path, body)
}

#[tokio::test]
async fn a_call_below_the_threshold_passes_without_approval() {
    let world = world().await;
    let response = post(&world, "/credits", r#"{"amount": 20, "recipient": "bob"}"#)
        .header("authorization", "Bearer agent-own")
        .send()
        .await
        .unwrap();
    // The shop has no /credits: its 404 is the upstream's answer.
    assert_eq!(response.status(), 404);
    assert!(response
        .headers()
        .get("x-countersign-approval-id")
        .is_none());
    let received = world.shop.received();
    assert_eq!(received.len(), 1, "passed through once");
    assert_eq!(received[0].path_and_query, "/credits");
    assert_eq!(
        received[0].body.as_ref(),
        br#"{"amount": 20, "recipient": "bob"}"#
    );
    assert!(received[0].claims.is_none(), "no token was issued for it");
    assert!(received[0].headers.get(USER_HEADER).is_none());
    assert!(world.peer.requests().await.is_empty(), "nobody was asked");
    world
        .gateway
        .wait_metric(r#"countersign_calls_total{outcome="passed",policy="buy-credit"} 1"#)
        .await;
}

#[tokio::test]
async fn a_call_above_the_threshold_is_held_and_forwarded_with_a_fresh_token() {
    let world = world().await;
    let call =
        tokio::spawn(post(&world, "/credits", r#"{"amount": 100, "recipient": "bob"}"#).send());
    let pending = world.peer.wait_pending(Some("alice"), 1).await;
    assert_eq!(pending[0]["binding_message"], "Buy store credit worth 100");
    assert!(world.shop.received().is_empty(), "held, not forwarded");
    world.peer.approve_request(&pending[0]).await;
    let response = call.await.unwrap().unwrap();
    assert_eq!(response.status(), 404, "the shop's own answer");
    assert!(response
        .headers()
        .get("x-countersign-approval-id")
        .is_some());
    let received = world.shop.received();
    assert_eq!(received.len(), 1);
    let claims = received[0]
        .claims
        .as_ref()
        .expect("a token the shop verified");
    assert_eq!(claims["sub"], "alice");
}

#[tokio::test]
async fn the_first_tier_whose_condition_holds_asks_with_its_own_message() {
    let world = world().await;
    let large =
        tokio::spawn(post(&world, "/transfers", r#"{"amount": 20000, "to": "bob"}"#).send());
    let pending = world.peer.wait_pending(Some("alice"), 1).await;
    assert_eq!(
        pending[0]["binding_message"],
        "LARGE transfer of 20000 to bob"
    );
    let normal = tokio::spawn(post(&world, "/transfers", r#"{"amount": 600, "to": "bob"}"#).send());
    let pending = world.peer.wait_pending(Some("alice"), 2).await;
    let messages: Vec<&str> = pending
        .iter()
        .filter_map(|r| r["binding_message"].as_str())
        .collect();
    assert!(messages.contains(&"Transfer 600 to bob"), "{messages:?}");
    // Below both tiers: through at once, unapproved; the shop itself
    // refuses a transfer that carries no token.
    let small = post(&world, "/transfers", r#"{"amount": 100, "to": "bob"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(small.status(), 401);
    assert_eq!(world.shop.received().len(), 1);
    for request in &pending {
        world.peer.deny_request(request).await;
    }
    for call in [large, normal] {
        problem(call.await.unwrap().unwrap(), 403, "access_denied").await;
    }
    assert_eq!(world.shop.received().len(), 1, "denied calls are not sent");
}

#[tokio::test]
async fn a_denied_product_is_refused_outright_and_others_are_held() {
    let world = world().await;
    let response = post(&world, "/subscriptions", r#"{"product": "crypto-mining"}"#)
        .send()
        .await
        .unwrap();
    let body = problem(response, 403, "policy_denied").await;
    assert!(
        body["detail"].as_str().unwrap().contains("subscribe"),
        "{body}"
    );
    world.untouched().await;

    let asked = world
        .asked_and_denied(
            "alice",
            post(&world, "/subscriptions", r#"{"product": "news"}"#),
        )
        .await;
    assert_eq!(asked["binding_message"], "Subscribe to news");
}

#[tokio::test]
async fn a_condition_that_cannot_be_evaluated_refuses_the_call() {
    let world = world().await;
    for body in [
        r#"{"amount": "100", "recipient": "bob"}"#,
        r#"{"recipient": "bob"}"#,
        r#"{"amount": null}"#,
        r#"[100]"#,
    ] {
        let response = post(&world, "/credits", body).send().await.unwrap();
        let problem = problem(response, 422, "condition_failed").await;
        assert!(
            problem["detail"].as_str().unwrap().contains("buy-credit"),
            "{problem}"
        );
    }
    // Not a number at all: the query condition's int() fails.
    let response = world
        .get_as("alice", "/exports?rows=many")
        .send()
        .await
        .unwrap();
    problem(response, 422, "condition_failed").await;
    world.untouched().await;
    world
        .gateway
        .wait_metric(r#"countersign_calls_total{outcome="condition_failed",policy="buy-credit"} 4"#)
        .await;
}

#[tokio::test]
async fn a_body_the_condition_and_the_api_would_read_differently_is_refused() {
    let world = world().await;
    // Each of these reads as a small amount to a lenient parser (or to a
    // condition that took the first, last or exactly-spelled key), and as a
    // large one to some API.
    for body in [
        r#"{"amount": 10, "amount": 100}"#,
        r#"{"amount": 10, "Amount": 100}"#,
        r#"{"AMOUNT": 100}"#,
        r#"{"amount": 10, "recipient": {"x": 1, "x": 2}}"#,
    ] {
        let response = post(&world, "/credits", body).send().await.unwrap();
        problem(response, 400, "invalid_body").await;
    }
    // A JSON body not sent as JSON, or encoded, is not read at all.
    for (header, value) in [("content-type", "text/plain"), ("content-encoding", "gzip")] {
        let response = post(&world, "/credits", r#"{"amount": 10}"#)
            .header(header, value)
            .send()
            .await
            .unwrap();
        problem(response, 400, "invalid_body").await;
    }
    world.untouched().await;
}

#[tokio::test]
async fn a_value_the_condition_tests_given_again_in_another_part_is_refused() {
    let world = world().await;
    // The condition would see 10 in the body (or no amount at all) and let
    // the call through; Rails' params would buy for the query's 5000, PHP's
    // $_REQUEST for the cookie's.
    for (path, body, cookie) in [
        ("/credits?amount=5000", r#"{"amount": 10}"#, None),
        ("/credits?amount[]=5000", r#"{"amount": 10}"#, None),
        ("/credits", r#"{"amount": 10}"#, Some("amount=5000")),
    ] {
        let mut request = post(&world, path, body);
        if let Some(cookie) = cookie {
            request = request.header("cookie", cookie);
        }
        let body = problem(request.send().await.unwrap(), 400, "ambiguous_parameter").await;
        assert!(
            body["detail"]
                .as_str()
                .unwrap()
                .contains("'amount' is what this policy's condition tests in the body"),
            "{body}"
        );
    }
    // A query name the condition tests may not come in a form body.
    let response = world
        .get_as("alice", "/exports?rows=10")
        .header("content-type", "application/x-www-form-urlencoded")
        .body("rows=5000")
        .send()
        .await
        .unwrap();
    problem(response, 400, "ambiguous_parameter").await;
    world.untouched().await;
}

#[tokio::test]
async fn a_query_the_condition_and_the_api_would_read_differently_is_refused() {
    let world = world().await;
    let get = |query: &str| world.get_as("alice", &format!("/exports?{query}"));
    for query in [
        "rows=10&rows=5000",
        "rows=10&ROWS=5000",
        "ROWS=5000",
        "rows=10;rows=5000",
        // PHP, Rails and qs read `rows[]` as `rows`.
        "rows=10&rows[]=5000",
    ] {
        problem(get(query).send().await.unwrap(), 400, "invalid_query").await;
    }
    world.untouched().await;
    assert_eq!(get("rows=10").send().await.unwrap().status(), 404, "passes");
    assert_eq!(world.shop.received().len(), 1);
    let asked = world.asked_and_denied("alice", get("rows=5000")).await;
    assert_eq!(asked["binding_message"], "Export 5000 rows");
}

#[test]
fn a_broken_condition_is_refused_at_load_with_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("broken.yaml");
    std::fs::write(
        &policy,
        "policies:\n  - name: buy\n    match: { methods: [POST], path: /shop }\n    require: { scopes: [product:buy] }\n    when: \"body.qty >\"\n    binding_message: \"Buy\"\n",
    )
    .unwrap();
    let config = dir.path().join("countersign.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: {{ proxy: 127.0.0.1:1 }}\nupstreams: {{ shop: {{ url: http://127.0.0.1:2 }} }}\nauthorization_server: {{ issuer: http://127.0.0.1:3, client_id: c, client_auth: {{ method: client_secret_post, client_secret: s }} }}\nidentity: {{ header: {{ name: x-user }} }}\npolicies: [{}]\n",
            policy.display()
        ),
    )
    .unwrap();
    let error = countersign::config::load(&config).unwrap_err().to_string();
    let expected = format!("{}:5:5: policies[0].when: ", policy.display());
    assert!(error.starts_with(&expected), "{error}");
    assert!(error.contains("not valid CEL"), "{error}");
    // A condition reading something that is not part of a call.
    std::fs::write(
        &policy,
        "policies:\n  - name: buy\n    match: { methods: [POST], path: /shop }\n    require: { scopes: [product:buy] }\n    when: \"qty > 5\"\n    binding_message: \"Buy\"\n",
    )
    .unwrap();
    let error = countersign::config::load(&config).unwrap_err().to_string();
    assert!(error.contains("policies[0].when"), "{error}");
    assert!(error.contains("reads 'qty'"), "{error}");
}
