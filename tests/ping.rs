//! CIBA ping mode against oidc-provider: the person's answer resumes the
//! held call at once (well before the polling interval), forged and
//! replayed notifications are refused, and a lost ping is caught by the
//! slow safety poll.

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

const ASYNC_POLICY: &str = r#"  - name: gift-async
    match: { methods: [POST], path: /async-gifts }
    wait: async
    require: { scopes: [product:buy], audience: https://shop.example/api }
    binding_message: "Send a gift"
"#;

struct PingWorld {
    world: World,
    notify_url: String,
}

/// A gateway as the peer's `countersign-ping` client; the peer's polling
/// interval is `interval` s and the gateway's safety poll `safety_poll`.
/// `reachable: false` points the peer's pings at a port nobody serves.
async fn ping_world(interval: u64, safety_poll: &str, reachable: bool) -> PingWorld {
    let port = free_port();
    let notify_url = format!("http://127.0.0.1:{port}/ciba/notification");
    let ping_target = if reachable {
        notify_url.clone()
    } else {
        format!("http://127.0.0.1:{}/ciba/notification", free_port())
    };
    let interval = interval.to_string();
    let peer = Peer::start_with(&[
        ("PEER_INTERVAL", interval.as_str()),
        ("PEER_PING_URL", ping_target.as_str()),
    ]);
    let shop = start_shop(&peer).await;
    let options = GatewayOptions {
        client: format!(
            "client_id: countersign-ping\n  client_auth: {{ method: client_secret_post, client_secret: countersign-secret }}\n  delivery: ping\n  notification: {{ listen: \"127.0.0.1:{port}\", safety_poll: {safety_poll} }}"
        ),
        extra_policies: ASYNC_POLICY,
        ..GatewayOptions::default()
    };
    let gateway = TestGateway::start(&peer, &shop, options).await;
    PingWorld {
        world: World {
            peer,
            shop,
            gateway,
            agent: reqwest::Client::new(),
        },
        notify_url,
    }
}

async fn notify(url: &str, bearer: Option<&str>, body: &str) -> u16 {
    let mut request = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(token) = bearer {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    request.send().await.unwrap().status().as_u16()
}

#[tokio::test]
async fn the_answer_resumes_the_call_well_before_the_polling_interval() {
    let PingWorld { world, .. } = ping_world(5, "60s", true).await;
    let call = tokio::spawn(world.buy("alice", phones()).send());
    let pending = world.peer.next("alice").await;
    let id = pending["auth_req_id"].as_str().unwrap().to_owned();
    let token = pending["client_notification_token"]
        .as_str()
        .expect("a client_notification_token was sent")
        .to_owned();
    assert!(token.len() >= 43, "256 random bits");
    assert_eq!(pending["polls"], 0, "nothing polls before the answer");

    let answered = Instant::now();
    world.peer.approve(&id).await;
    let response = call.await.unwrap().unwrap();
    let resumed = answered.elapsed();
    eprintln!("ping mode: the call was answered {resumed:?} after the person's answer");
    assert_eq!(response.status(), 200);
    let order: Value = response.json().await.unwrap();
    assert_eq!(order["buyer"], "alice");
    assert!(
        resumed < Duration::from_millis(2000),
        "resumed {resumed:?} after the answer; the interval is 5 s"
    );
    let request = world.peer.request(&id).await;
    assert_eq!(
        request["polls"], 1,
        "one token request, after the ping: {request}"
    );
    assert_eq!(request["pings"][0]["status"], 204, "{request}");
    let received = world.shop.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].claims.as_ref().unwrap()["sub"], "alice");

    // A second request gets a token of its own.
    let second = tokio::spawn(
        world
            .buy(
                "alice",
                json!({"product": "XYZ phone", "qty": 3, "priceLimit": 900}),
            )
            .send(),
    );
    let pending = world.peer.wait_pending(Some("alice"), 1).await;
    assert_ne!(
        pending[0]["client_notification_token"].as_str().unwrap(),
        token
    );
    world.peer.deny_request(&pending[0]).await;
    assert_eq!(second.await.unwrap().unwrap().status(), 403);
    let metrics = world.gateway.metrics().await;
    assert!(
        metrics.contains(r#"countersign_ciba_notifications_total{result="accepted"} 2"#),
        "{metrics}"
    );
}

/// A server may ping before its token endpoint agrees (a replicated store):
/// the gateway then asks again after the server's own interval, not the
/// 60 s safety poll, and the person's approval is not lost to an expiry.
#[tokio::test]
async fn a_ping_the_token_endpoint_does_not_agree_with_yet_is_polled_again_at_the_server_interval()
{
    let PingWorld { world, .. } = ping_world(2, "60s", true).await;
    let call = tokio::spawn(world.buy("alice", phones()).send());
    let id = world.peer.next_id("alice").await;
    // The token request that answers the ping gets slow_down (interval 2 -> 7 s).
    let status = world
        .peer
        .control(&format!("requests/{id}/slow-down"), Value::Null)
        .await;
    assert!(status.is_success(), "slow-down: {status}");
    let answered = Instant::now();
    world.peer.approve(&id).await;
    let response = tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .expect("answered well before the 60 s deadline")
        .unwrap()
        .unwrap();
    let resumed = answered.elapsed();
    assert_eq!(response.status(), 200);
    assert!(
        resumed >= Duration::from_secs(6) && resumed < Duration::from_secs(20),
        "asked again after the server's 7 s, not at once nor at the safety poll: {resumed:?}"
    );
    let request = world.peer.request(&id).await;
    assert_eq!(request["poll_results"][0], "slow_down", "{request}");
    assert_eq!(request["polls"], 2, "{request}");
    assert_eq!(world.shop.received().len(), 1);
}

#[tokio::test]
async fn forged_and_replayed_notifications_are_refused() {
    let PingWorld { world, notify_url } = ping_world(5, "60s", true).await;
    let call = tokio::spawn(world.buy("alice", phones()).send());
    let pending = world.peer.next("alice").await;
    let id = pending["auth_req_id"].as_str().unwrap().to_owned();
    let token = pending["client_notification_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let body = json!({ "auth_req_id": id }).to_string();

    // Forged: no token, another token, a token of the right length, the
    // right token for another request.
    assert_eq!(notify(&notify_url, None, &body).await, 401);
    assert_eq!(notify(&notify_url, Some("forged"), &body).await, 401);
    let lookalike: String = token.chars().rev().collect();
    assert_eq!(notify(&notify_url, Some(&lookalike), &body).await, 401);
    let other = json!({ "auth_req_id": "another-request" }).to_string();
    assert_eq!(notify(&notify_url, Some(&token), &other).await, 401);
    // Not a notification at all.
    assert_eq!(
        notify(&notify_url, Some(&token), "auth_req_id=x").await,
        400
    );
    let wrong_path = notify_url.replace("/ciba/notification", "/other");
    assert_eq!(notify(&wrong_path, Some(&token), &body).await, 404);
    let get = reqwest::get(&notify_url).await.unwrap().status();
    assert_eq!(get, 405);

    // None of them woke the driver: nothing polled, nothing forwarded.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(world.peer.request(&id).await["polls"], 0);
    assert!(world.shop.received().is_empty());
    assert!(!call.is_finished(), "still held");

    world.peer.approve(&id).await;
    assert_eq!(call.await.unwrap().unwrap().status(), 200);
    // Replayed: the request was notified already.
    assert_eq!(notify(&notify_url, Some(&token), &body).await, 401);
    assert_eq!(world.shop.received().len(), 1, "forwarded once");
    let metrics = world.gateway.metrics().await;
    for line in [
        r#"countersign_ciba_notifications_total{result="accepted"} 1"#,
        r#"countersign_ciba_notifications_total{result="no_token"} 1"#,
        r#"countersign_ciba_notifications_total{result="wrong_token"} 2"#,
        r#"countersign_ciba_notifications_total{result="unknown"} 2"#,
        r#"countersign_ciba_notifications_total{result="malformed"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
}

#[tokio::test]
async fn an_async_agent_is_told_to_come_back_soon_not_at_the_safety_poll() {
    let PingWorld { world, .. } = ping_world(1, "60s", true).await;
    let response = world.post_as("alice", "/async-gifts").send().await.unwrap();
    assert_eq!(response.status(), 202);
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=5).contains(&retry_after), "Retry-After {retry_after}");
}

#[tokio::test]
async fn a_lost_ping_is_caught_by_the_safety_poll() {
    let PingWorld { world, .. } = ping_world(2, "2s", false).await;
    let call = tokio::spawn(world.buy("alice", phones()).send());
    let id = world.peer.next_id("alice").await;
    // The peer's ping goes nowhere (its control call reports that failure).
    let _ = world
        .peer
        .control(&format!("requests/{id}/approve"), json!({}))
        .await;
    let response = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("the safety poll fetches the token")
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), 200);
    let request = world.peer.request(&id).await;
    assert!(request["polls"].as_u64().unwrap() >= 1, "{request}");
    assert_eq!(world.shop.received().len(), 1);
}
