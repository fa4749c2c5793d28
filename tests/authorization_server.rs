//! A misbehaving or vanishing authorization server: the real gateway against
//! the oidc-provider peer told (through its control API) to misbehave. Every
//! such hold ends with a clear problem and nothing forwarded, and none waits
//! out the whole hold or reads as "the person did not answer".

mod support;

use std::time::{Duration, Instant};

use axum::response::Redirect;
use axum::routing::get;
use serde_json::json;
use support::*;

/// One held call for alice, approved as soon as it is pending.
async fn approved_call(world: &World) -> reqwest::Response {
    world.approved("alice", world.buy("alice", phones())).await
}

/// The poll times of alice's only request.
async fn alices_poll_times(world: &World) -> Vec<i64> {
    let requests = world.peer.requests().await;
    assert_eq!(requests.len(), 1);
    poll_times(&requests[0])
}

#[tokio::test]
async fn an_unreadable_or_unusable_token_response_after_approval_is_a_failure_not_an_expiry() {
    let world = World::start(GatewayOptions::default()).await;
    for (mode, what) in [
        (
            "truncate",
            "a 200 whose body stops half-way (the connection dies)",
        ),
        ("garbage", "a 200 that is not JSON"),
        ("token_type", "a token type other than Bearer: a DPoP token"),
        ("oversize", "a token response past the size limit"),
    ] {
        world.peer.misbehave(mode, 1).await;
        let response = approved_call(&world).await;
        problem(response, 502, "approval_failed").await;
        assert!(world.shop.received().is_empty(), "{what} is not forwarded");
    }
}

#[tokio::test]
async fn a_redirect_from_the_token_endpoint_is_not_followed() {
    let world = World::start(GatewayOptions::default()).await;
    // Followed, the 307 would lead to a normal poll and the call would go through.
    world.peer.misbehave("redirect", 1).await;
    problem(approved_call(&world).await, 502, "approval_failed").await;
    let misbehaviour = world.peer.misbehaviour().await;
    assert_eq!(misbehaviour["redirects"], 1, "{misbehaviour}");
    assert_eq!(misbehaviour["followed"], 0, "{misbehaviour}");
    assert!(world.shop.received().is_empty());
}

#[tokio::test]
async fn an_authorization_server_gone_mid_hold_is_unavailable_within_three_polls() {
    let mut world = World::with_limits("{ max_body_bytes: 1024, max_hold: 30s }").await;
    let call = tokio::spawn(world.buy("alice", phones()).send());
    world.peer.wait_pending(Some("alice"), 1).await;
    let gone = Instant::now();
    world.peer.kill();
    let response = call.await.unwrap().unwrap();
    let waited = gone.elapsed();
    problem(response, 503, "authorization_server_unavailable").await;
    // Three refused polls one interval (1 s) apart, not the 30 s hold.
    assert!(waited < Duration::from_secs(8), "answered after {waited:?}");
    assert!(world.shop.received().is_empty());
    let metrics = world.gateway.metrics().await;
    assert!(
        metrics.contains(r#"countersign_approvals_total{policy="buy-product",result="error"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn server_errors_without_retry_after_end_the_hold_after_three_polls() {
    let world = World::with_limits("{ max_body_bytes: 1024, max_hold: 30s }").await;
    world
        .peer
        .token_unavailable(json!({"count": 100, "status": 502, "retry_after": null}))
        .await;
    let started = Instant::now();
    let response = world.buy("alice", phones()).send().await.unwrap();
    problem(response, 503, "authorization_server_unavailable").await;
    assert!(started.elapsed() < Duration::from_secs(8));
    let times = alices_poll_times(&world).await;
    assert_eq!(times.len(), 3, "{times:?}");
    assert!(
        times.windows(2).all(|w| w[1] - w[0] >= 900),
        "failed polls keep the interval: {times:?}"
    );
}

#[tokio::test]
async fn transient_failures_followed_by_an_answer_still_go_through() {
    let world = World::start(GatewayOptions::default()).await;
    // The first poll's connection is dropped, the second gets a bare 502.
    world.peer.misbehave("drop", 1).await;
    world
        .peer
        .token_unavailable(json!({"count": 1, "status": 502, "retry_after": null}))
        .await;
    let response = approved_call(&world).await;
    assert_eq!(response.status(), 200);
    assert_eq!(world.shop.received().len(), 1);
    let requests = world.peer.requests().await;
    assert_eq!(
        requests[0]["poll_results"],
        json!(["temporarily_unavailable", "token"]),
        "the dropped poll is not recorded: {requests:?}"
    );
}

#[tokio::test]
async fn retry_after_from_an_unavailable_token_endpoint_is_honoured_in_seconds_or_as_an_http_date()
{
    for (retry_after, at_least) in [
        (json!({"retry_after": 3}), 2_900),
        // The date has whole seconds: 3 to 4 s away when sent (the
        // interval is 1 s).
        (json!({"retry_after_date_in": 4}), 2_500),
    ] {
        let world = World::start(GatewayOptions::default()).await;
        let mut unavailable = json!({"count": 1, "status": 503});
        unavailable
            .as_object_mut()
            .unwrap()
            .extend(retry_after.as_object().unwrap().clone());
        world.peer.token_unavailable(unavailable).await;
        let response = approved_call(&world).await;
        assert_eq!(response.status(), 200);
        let requests = world.peer.requests().await;
        let times = alices_poll_times(&world).await;
        assert_eq!(times.len(), 2, "{times:?}");
        assert!(
            times[1] - times[0] >= at_least,
            "waited {retry_after}: {times:?}"
        );
        assert_eq!(requests[0]["slow_downs"], 0, "{requests:?}");
    }
}

#[tokio::test]
async fn a_retry_after_beyond_any_clock_ends_the_hold_without_a_panic() {
    let world = World::start(GatewayOptions::default()).await;
    world
        .peer
        .token_unavailable(json!({"count": 1, "status": 503, "retry_after": u64::MAX.to_string()}))
        .await;
    let started = Instant::now();
    let response = world.buy("alice", phones()).send().await.unwrap();
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (1..=60).contains(&retry_after),
        "capped at the hold: {retry_after}"
    );
    problem(response, 503, "authorization_server_unavailable").await;
    assert!(started.elapsed() < Duration::from_secs(8));
    assert!(world.shop.received().is_empty());
}

/// Gateway start-up reads discovery with the gateway's own HTTP client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirected_discovery_document_is_not_followed() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let document = move |issuer: String| {
        json!({
            "issuer": issuer,
            "backchannel_authentication_endpoint": format!("{issuer}/bc-authorize"),
            "token_endpoint": format!("{issuer}/token"),
        })
    };
    let (direct, moved) = (format!("{base}/direct"), format!("{base}/moved"));
    let app = axum::Router::new()
        .route(
            "/direct/.well-known/openid-configuration",
            get({
                let doc = document(direct.clone());
                move || async move { axum::Json(doc) }
            }),
        )
        .route(
            "/moved/.well-known/openid-configuration",
            get(|| async { Redirect::temporary("/moved-document") }),
        )
        .route(
            "/moved-document",
            get({
                let doc = document(moved.clone());
                move || async move { axum::Json(doc) }
            }),
        );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let resolve = |issuer: String| {
        tokio::task::spawn_blocking(move || {
            let text = client_only_config(
                &issuer,
                "client_id: countersign\n  client_auth: { method: client_secret_post, client_secret: s3cret }",
            );
            let config =
                countersign::config::load_str(std::path::Path::new("t.yaml"), &text).unwrap();
            countersign::gateway::resolve_endpoints(&config).map_err(|e| e.to_string())
        })
    };
    resolve(direct).await.unwrap().expect("served directly");
    let error = resolve(moved).await.unwrap().unwrap_err();
    assert!(error.contains("redirects are not followed"), "{error}");
}
