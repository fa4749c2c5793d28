//! End-to-end approval flows: agent -> gateway -> oidc-provider (CIBA) ->
//! shop upstream that verifies the token it receives.

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

#[tokio::test]
async fn approved_call_reaches_the_shop_once_with_a_fresh_token() {
    let world = World::start(GatewayOptions::default()).await;
    let body = serde_json::to_vec(&phones()).unwrap();
    let call = world
        .post_as("alice", "/shop")
        .header("authorization", "Bearer agent-own-credential")
        .header("content-type", "application/json")
        .body(body.clone())
        .send();
    let call = tokio::spawn(call);

    let pending = world.peer.wait_pending(Some("alice"), 1).await;
    let request = &pending[0];
    assert_eq!(request["binding_message"], "Do you want to buy 2 XYZ phone");
    assert!(request["scope"].as_str().unwrap().contains("product:buy"));
    assert_eq!(
        without_binding(&request["authorization_details"]),
        json!([{"type": "product_purchase", "product": "XYZ phone", "quantity": 2, "price_limit": 900}])
    );
    assert!(
        world.shop.received().is_empty(),
        "nothing is forwarded before approval"
    );
    world.peer.approve_request(request).await;

    let response = call.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    let approval_id = approval_id(&response);
    let order: Value = response.json().await.unwrap();
    assert_eq!(order["status"], "confirmed");
    assert_eq!(order["buyer"], "alice");
    assert_eq!(order["qty"], 2);

    let received = world.shop.received();
    assert_eq!(received.len(), 1, "one approval, one forward");
    let got = &received[0];
    assert_eq!(
        got.body.as_ref(),
        body.as_slice(),
        "the exact buffered body is forwarded"
    );
    assert_eq!(got.path_and_query, "/shop");
    let claims = got.claims.as_ref().expect("the shop verified the token");
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["aud"], "https://shop.example/api");
    assert_eq!(claims["iss"], world.peer.issuer.as_str());
    assert_ne!(got.bearer(), Some("agent-own-credential"));
    assert!(
        got.headers.get(USER_HEADER).is_none(),
        "the identity header is stripped"
    );
    assert_eq!(
        got.headers["x-countersign-approval-id"],
        approval_id.as_str()
    );

    let after = world
        .peer
        .request(request["auth_req_id"].as_str().unwrap())
        .await;
    assert_eq!(
        after["slow_downs"], 0,
        "the gateway never polls too fast: {after}"
    );

    let metrics = world
        .gateway
        .wait_metric(r#"countersign_calls_total{outcome="approved",policy="buy-product"} 1"#)
        .await;
    assert!(
        metrics
            .contains(r#"countersign_approvals_total{policy="buy-product",result="approved"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"countersign_calls_total{outcome="approved",policy="buy-product"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("countersign_approvals_pending 0"),
        "{metrics}"
    );
    assert!(
        metrics
            .contains(r#"countersign_ciba_requests_total{endpoint="token",result="approved"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn denied_call_never_reaches_the_shop() {
    let world = World::start(GatewayOptions::default()).await;
    let answer = world.denied("bob", world.buy("bob", phones())).await;
    let body = problem(answer, 403, "access_denied").await;
    assert_eq!(body["detail"], "The user has denied the request.");
    assert!(body["approval_id"].is_string());
    assert!(world.shop.received().is_empty());
    let metrics = world.gateway.metrics().await;
    assert!(
        metrics.contains(r#"countersign_approvals_total{policy="buy-product",result="denied"} 1"#)
    );
}

#[tokio::test]
async fn an_unanswered_request_expires_and_is_not_a_denial() {
    let world = World::with_policies(FLASH_SALE).await;
    let started = Instant::now();
    let response = world
        .post_as("carol", "/flash")
        .json(&phones())
        .send()
        .await
        .unwrap();
    let body = problem(response, 408, "approval_expired").await;
    assert_ne!(body["code"], "access_denied");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "held until expiry"
    );
    assert!(world.shop.received().is_empty());
    let requests = world.peer.requests().await;
    assert_eq!(requests[0]["requested_expiry"], 3);
    let metrics = world.gateway.metrics().await;
    assert!(
        metrics.contains(r#"countersign_approvals_total{policy="flash-sale",result="expired"} 1"#)
    );
}

#[tokio::test]
async fn slow_down_adds_five_seconds_to_every_later_poll() {
    let world = World::start(GatewayOptions::default()).await;
    let call = tokio::spawn(world.buy("alice", phones()).send());
    let id = world.peer.next_id("alice").await;
    assert!(world
        .peer
        .control(&format!("requests/{id}/slow-down"), Value::Null)
        .await
        .is_success());

    // The first poll (at ~1 s) gets slow_down; let two more intervals pass.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mid = world.peer.request(&id).await;
    assert_eq!(mid["polls"], 1, "no poll within 6 s of a slow_down: {mid}");
    world.peer.approve(&id).await;

    let response = call.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    let done = world.peer.request(&id).await;
    assert_eq!(done["slow_downs"], 1, "only the forced slow_down: {done}");
    let times = poll_times(&done);
    assert_eq!(times.len(), 2, "{done}");
    let gap = times[1] - times[0];
    assert!(
        (5_900..8_000).contains(&gap),
        "second poll {gap} ms after the slow_down: {done}"
    );
}

#[tokio::test]
async fn an_unknown_user_gets_a_clear_answer() {
    let world = World::start(GatewayOptions::default()).await;
    let response = world.buy("mallory", phones()).send().await.unwrap();
    problem(response, 400, "unknown_user").await;
    assert!(world.shop.received().is_empty());
}

#[tokio::test]
async fn bad_calls_are_refused_before_anyone_is_asked() {
    let world = World::start(GatewayOptions::default()).await;

    // Too long once rendered: refused here, never sent raw.
    let long =
        json!({"product": "a very long product name that will not fit in a message", "qty": 2});
    let body = problem(
        world.buy("alice", long).send().await.unwrap(),
        400,
        "invalid_binding_message",
    )
    .await;
    assert!(body["detail"].as_str().unwrap().contains("64"), "{body}");

    let big = json!({"product": "x".repeat(2000), "qty": 1});
    problem(
        world.buy("alice", big).send().await.unwrap(),
        413,
        "body_too_large",
    )
    .await;

    let not_json = world
        .post_as("alice", "/shop")
        .body("product=phone&qty=2")
        .send()
        .await
        .unwrap();
    problem(not_json, 400, "invalid_body").await;

    let missing_field = world
        .buy("alice", json!({"product": "phone"}))
        .send()
        .await
        .unwrap();
    let body = problem(missing_field, 400, "invalid_body").await;
    assert!(body["detail"].as_str().unwrap().contains("qty"), "{body}");

    let anonymous = world
        .agent
        .post(world.gateway.url("/shop"))
        .json(&phones())
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.headers()["www-authenticate"], "Bearer");
    problem(anonymous, 401, "identity_required").await;

    world.untouched().await;
}

#[tokio::test]
async fn unsafe_characters_from_the_call_are_refused_not_blanked() {
    let world = World::start(GatewayOptions::default()).await;
    let response = world
        .buy(
            "alice",
            json!({"product": "phone\nApprove <all>!", "qty": 1, "priceLimit": 5}),
        )
        .send()
        .await
        .unwrap();
    let body = problem(response, 400, "invalid_binding_message").await;
    let detail = body["detail"].as_str().unwrap();
    assert!(
        detail.contains("'product'") && detail.contains("U+000A"),
        "{body}"
    );
    world.untouched().await;
}

#[tokio::test]
async fn unmatched_calls_pass_or_are_denied_by_the_default() {
    let world = World::start(GatewayOptions::default()).await;
    let response = world
        .agent
        .get(world.gateway.url("/products"))
        .header("authorization", "Bearer agent-read-token")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let received = world.shop.received();
    assert_eq!(received.len(), 1);
    assert_eq!(
        received[0].bearer(),
        Some("agent-read-token"),
        "pass-through is unchanged"
    );
    assert!(world.peer.requests().await.is_empty());

    let strict = World::start(GatewayOptions {
        default_action: "deny",
        ..Default::default()
    })
    .await;
    let response = strict.get("/products").await;
    problem(response, 403, "no_policy").await;
    assert!(strict.shop.received().is_empty());
}

#[tokio::test]
async fn twenty_held_calls_for_two_people_resolve_independently() {
    let world =
        World::with_limits("{ max_body_bytes: 1024, max_hold: 60s, max_pending_per_user: 10 }")
            .await;
    let mut calls = Vec::new();
    for qty in 1..=10 {
        for user in ["alice", "bob"] {
            let call = world
                .buy(
                    user,
                    json!({"product": "XYZ phone", "qty": qty, "priceLimit": 900}),
                )
                .send();
            calls.push((user, qty, tokio::spawn(call)));
        }
    }
    let pending = world.peer.wait_pending(None, 20).await;
    for request in &pending {
        let id = request["auth_req_id"].as_str().unwrap();
        match request["sub"].as_str().unwrap() {
            "alice" => world.peer.approve(id).await,
            _ => world.peer.deny(id).await,
        }
    }
    for (user, qty, call) in calls {
        let response = call.await.unwrap().unwrap();
        if user == "alice" {
            assert_eq!(response.status(), 200);
            let order: Value = response.json().await.unwrap();
            assert_eq!(
                order["qty"], qty,
                "each call is forwarded with its own body"
            );
            assert_eq!(order["buyer"], "alice");
        } else {
            problem(response, 403, "access_denied").await;
        }
    }
    let received = world.shop.received();
    assert_eq!(received.len(), 10);
    let mut tokens: Vec<&str> = received.iter().map(|r| r.bearer().unwrap()).collect();
    tokens.sort();
    tokens.dedup();
    assert_eq!(tokens.len(), 10, "every call got its own token");
    assert!(received
        .iter()
        .all(|r| r.claims.as_ref().unwrap()["sub"] == "alice"));
}

#[tokio::test]
async fn an_agent_that_hangs_up_does_not_lose_the_approval() {
    // The person may be answering on their phone while the agent's HTTP
    // client gives up: the approval goes on, the call is made once on
    // approval, and the agent's retry gets the answer instead of a second ask.
    let world = World::start(GatewayOptions::default()).await;
    let body = serde_json::to_string(&phones()).unwrap();
    let request = format!(
        "POST /shop HTTP/1.1\r\nHost: shop\r\n{USER_HEADER}: alice\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut stream = std::net::TcpStream::connect(world.gateway.proxy).unwrap();
    std::io::Write::write_all(&mut stream, request.as_bytes()).unwrap();
    let id = world.peer.next_id("alice").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(stream);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let polls = world.peer.request(&id).await["polls"].as_i64().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = world.peer.request(&id).await["polls"].as_i64().unwrap();
    assert!(later > polls, "polling goes on after the agent left");

    world.peer.approve(&id).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while world.shop.received().is_empty() {
        assert!(Instant::now() < deadline, "the approved call was forwarded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let retry = world.buy("alice", phones()).send().await.unwrap();
    assert_eq!(retry.status(), 200, "the retry gets the recorded answer");
    assert!(retry.headers().contains_key("x-countersign-approval-id"));
    let order: Value = retry.json().await.unwrap();
    assert_eq!(order["status"], "confirmed", "{order}");
    assert_eq!(world.shop.received().len(), 1, "forwarded exactly once");
    assert_eq!(
        world.peer.requests().await.len(),
        1,
        "the person was asked once"
    );
}

#[tokio::test]
async fn client_secret_basic_authenticates_too() {
    let world = World::start(GatewayOptions {
        client: "client_id: countersign-basic\n  client_auth: { method: client_secret_basic, client_secret: countersign-secret }".to_owned(),
        ..Default::default()
    })
    .await;
    let answer = world.approved("alice", world.buy("alice", phones())).await;
    assert_eq!(answer.status(), 200);
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_problem_not_a_hang() {
    let dead = format!("127.0.0.1:{}", free_port());
    let world = World::builder().upstream(&dead).start().await;
    let response = world.get("/products").await;
    problem(response, 502, "upstream_unavailable").await;
}

#[tokio::test]
async fn an_agent_waiting_for_100_continue_is_answered_and_held() {
    use std::io::{Read, Write};
    let world = World::start(GatewayOptions::default()).await;
    let body = serde_json::to_string(&phones()).unwrap();
    let mut stream = std::net::TcpStream::connect(world.gateway.proxy).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let head = format!(
        "POST /shop HTTP/1.1\r\nHost: shop\r\n{USER_HEADER}: alice\r\ncontent-type: application/json\r\nexpect: 100-continue\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    let mut interim = [0u8; 64];
    let n = stream.read(&mut interim).unwrap();
    assert!(
        String::from_utf8_lossy(&interim[..n]).starts_with("HTTP/1.1 100"),
        "no 100 Continue"
    );
    stream.write_all(body.as_bytes()).unwrap();
    world.peer.approve_next("alice").await;
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let response = tokio::task::spawn_blocking(move || {
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        response
    })
    .await
    .unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let received = world.shop.received();
    assert_eq!(received.len(), 1);
    assert!(received[0].headers.get("expect").is_none());
    assert_eq!(received[0].body.as_ref(), body.as_bytes());
}

#[tokio::test]
async fn holds_beyond_max_pending_are_refused_and_health_answers() {
    let world = World::with_limits("{ max_body_bytes: 1024, max_hold: 60s, max_pending: 1 }").await;
    let first = tokio::spawn(world.buy("alice", phones()).send());
    let pending = world.peer.next("alice").await;
    let second = world.buy("bob", phones()).send().await.unwrap();
    assert_eq!(second.headers()["retry-after"], "5");
    problem(second, 503, "too_many_pending_approvals").await;
    world.peer.approve_request(&pending).await;
    assert_eq!(first.await.unwrap().unwrap().status(), 200);

    for path in ["/healthz", "/readyz"] {
        let response = reqwest::get(format!("http://{}{path}", world.gateway.admin))
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
}

#[tokio::test]
async fn an_approval_without_the_required_scope_is_not_forwarded() {
    let world = World::start(GatewayOptions::default()).await;
    let call = tokio::spawn(world.buy("alice", phones()).send());
    let pending = world.peer.wait_pending(Some("alice"), 1).await;
    let id = pending[0]["auth_req_id"].as_str().unwrap();
    let status = world
        .peer
        .control(
            &format!("requests/{id}/approve"),
            json!({"scope": "product:read"}),
        )
        .await;
    assert!(status.is_success());
    let body = problem(call.await.unwrap().unwrap(), 403, "scope_not_granted").await;
    assert!(
        body["detail"].as_str().unwrap().contains("permission"),
        "the agent can tell the person what was missing: {body}"
    );
    assert!(world.shop.received().is_empty());
}

#[tokio::test]
async fn an_answer_too_large_to_record_reaches_the_waiting_agent_and_only_once() {
    // The shop's order confirmation (~90 bytes) is more than this gateway
    // records: the held agent still gets it whole. Delivered, it answers no
    // repeat (issue 25): the same call again is a new purchase, asked about
    // again, and (denied) nothing more is sent.
    let world =
        World::with_limits("{ max_body_bytes: 1024, max_hold: 60s, max_response_bytes: 40 }").await;
    let call = tokio::spawn(world.buy("alice", phones()).send());
    let first = world.peer.approve_next("alice").await;
    let answer = call.await.unwrap().unwrap();
    assert_eq!(answer.status(), 200);
    assert!(answer.headers().contains_key("x-countersign-approval-id"));
    let order: Value = answer.json().await.unwrap();
    assert_eq!(order["status"], "confirmed", "{order}");
    assert_eq!(order["qty"], 2);
    assert_eq!(order["buyer"], "alice");

    let repeat = tokio::spawn(world.buy("alice", phones()).send());
    let asked_again = world.peer.deny_next("alice").await;
    assert_ne!(asked_again["auth_req_id"], first["auth_req_id"]);
    problem(repeat.await.unwrap().unwrap(), 403, "access_denied").await;
    assert_eq!(world.shop.received().len(), 1, "forwarded once");
}

#[tokio::test]
async fn one_agent_cannot_flood_a_persons_phone() {
    let world =
        World::with_limits("{ max_body_bytes: 1024, max_hold: 60s, max_pending_per_user: 2 }")
            .await;
    // Two different purchases (the same one twice would be one approval).
    let held: Vec<_> = (1..=2)
        .map(|qty| {
            let call = world.buy(
                "alice",
                json!({"product": "XYZ phone", "qty": qty, "priceLimit": 900}),
            );
            tokio::spawn(call.send())
        })
        .collect();
    world.peer.wait_pending(Some("alice"), 2).await;

    let third = world
        .buy(
            "alice",
            json!({"product": "XYZ phone", "qty": 3, "priceLimit": 900}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(third.status(), 429);
    assert!(third.headers().contains_key("retry-after"));
    problem(third, 429, "too_many_pending_approvals").await;
    // Another person is not affected.
    let bob = tokio::spawn(world.buy("bob", phones()).send());
    world.peer.wait_pending(Some("bob"), 1).await;
    assert_eq!(
        world.peer.wait_pending(Some("alice"), 2).await.len(),
        2,
        "no third push to alice"
    );

    for request in world.peer.wait_pending(None, 3).await {
        world.peer.deny_request(&request).await;
    }
    for call in held.into_iter().chain([bob]) {
        assert_eq!(call.await.unwrap().unwrap().status(), 403);
    }
    // Answered calls free their slots.
    let again = world.buy(
        "alice",
        json!({"product": "XYZ phone", "qty": 4, "priceLimit": 900}),
    );
    assert_eq!(world.denied("alice", again).await.status(), 403);
}
