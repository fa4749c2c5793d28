//! Who approves: a bearer JWT the agent carries, verified against a JWKS.
//! The agent's own credential never reaches the upstream on a policy route.
//! Also: `private_key_jwt` client authentication at the authorization server.

mod support;

use std::time::{SystemTime, UNIX_EPOCH};

use axum::routing::get;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use support::*;

const AGENT_ISSUER: &str = "https://agents.example";

fn agent_token(sub: &str, exp_offset: i64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("agent-key-1".into());
    let key = EncodingKey::from_rsa_pem(
        &std::fs::read(repo_path("tests/fixtures/agent-key.pem")).unwrap(),
    )
    .unwrap();
    let claims = json!({"iss": AGENT_ISSUER, "aud": "countersign", "sub": sub, "iat": now, "exp": now + exp_offset, "name": "Alice Agent"});
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

async fn serve_agent_jwks() -> String {
    let jwks: Value = serde_json::from_slice(
        &std::fs::read(repo_path("tests/fixtures/agent-jwks.json")).unwrap(),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().route("/jwks.json", get(move || async move { axum::Json(jwks) }));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/jwks.json")
}

/// The answer to a call that must be refused at once, not held.
async fn refused_not_held(
    call: impl std::future::Future<Output = reqwest::Result<reqwest::Response>>,
) -> reqwest::Response {
    tokio::time::timeout(std::time::Duration::from_secs(10), call)
        .await
        .expect("refused, not held")
        .unwrap()
}

/// A world whose gateway verifies agents' JWTs against the keys at `jwks`.
async fn jwt_world(jwks: &str) -> World {
    World::builder()
        .identity(format!(
            "jwt: {{ issuer: \"{AGENT_ISSUER}\", audience: countersign, jwks_uri: \"{jwks}\" }}"
        ))
        .start()
        .await
}

#[tokio::test]
async fn the_approver_comes_from_a_verified_agent_token_which_never_reaches_the_upstream() {
    let jwks = serve_agent_jwks().await;
    let world = jwt_world(&jwks).await;
    let token = agent_token("alice", 300);
    let shop_url = world.gateway.url("/shop");

    // Refused before anyone is asked: no token, an expired one, a forged one.
    let none = world
        .agent
        .post(&shop_url)
        .json(&phones())
        .send()
        .await
        .unwrap();
    assert_eq!(none.status(), 401);
    let expired = world
        .agent
        .post(&shop_url)
        .bearer_auth(agent_token("alice", -3600))
        .json(&phones())
        .send()
        .await
        .unwrap();
    assert_eq!(expired.status(), 401);
    let mut forged = token.clone();
    forged.replace_range(forged.len() - 6.., "AAAAAA");
    let forged = world
        .agent
        .post(&shop_url)
        .bearer_auth(forged)
        .json(&phones())
        .send()
        .await
        .unwrap();
    problem(forged, 401, "identity_required").await;
    assert!(world.peer.requests().await.is_empty());

    let call = world
        .agent
        .post(&shop_url)
        .bearer_auth(&token)
        .json(&phones());
    assert_eq!(world.approved("alice", call).await.status(), 200);

    let received = world.shop.received();
    assert_eq!(received.len(), 1);
    let got = &received[0];
    assert_eq!(got.claims.as_ref().unwrap()["sub"], "alice");
    for (name, value) in &got.headers {
        assert!(
            !value.to_str().unwrap_or_default().contains(&token),
            "agent token leaked in {name}"
        );
    }
}

#[tokio::test]
async fn private_key_jwt_client_authentication_works() {
    let jwks = std::fs::read_to_string(repo_path("tests/fixtures/agent-jwks.json")).unwrap();
    let peer = Peer::start_with(&[("PEER_CLIENT_JWKS", jwks.as_str())]);
    let shop = start_shop(&peer).await;
    let pem = std::fs::read_to_string(repo_path("tests/fixtures/agent-key.pem")).unwrap();
    let indented: String = pem.lines().map(|l| format!("      {l}\n")).collect();
    let client = format!(
        "client_id: countersign-jwt\n  client_auth:\n    method: private_key_jwt\n    key_id: agent-key-1\n    private_key: |\n{indented}"
    );
    let gateway = TestGateway::start(
        &peer,
        &shop,
        GatewayOptions {
            client,
            ..Default::default()
        },
    )
    .await;
    let call = tokio::spawn(
        reqwest::Client::new()
            .post(gateway.url("/shop"))
            .header(USER_HEADER, "bob")
            .json(&phones())
            .send(),
    );
    let pending = peer.wait_pending(Some("bob"), 1).await;
    assert_eq!(pending[0]["client_id"], "countersign-jwt");
    peer.approve(pending[0]["auth_req_id"].as_str().unwrap())
        .await;
    assert_eq!(call.await.unwrap().unwrap().status(), 200);
    assert_eq!(shop.received().len(), 1);
}

#[tokio::test]
async fn a_redirected_jwks_is_not_followed() {
    let jwks: Value = serde_json::from_slice(
        &std::fs::read(repo_path("tests/fixtures/agent-jwks.json")).unwrap(),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new()
        .route(
            "/jwks.json",
            get(|| async { axum::response::Redirect::temporary("/moved.json") }),
        )
        .route("/moved.json", get(move || async move { axum::Json(jwks) }));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let world = jwt_world(&format!("http://{addr}/jwks.json")).await;
    // Followed, the keys would verify the token and the call would be held.
    let response = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        world
            .agent
            .post(world.gateway.url("/shop"))
            .bearer_auth(agent_token("alice", 300))
            .json(&phones())
            .send(),
    )
    .await
    .expect("answered, not held")
    .unwrap();
    problem(response, 503, "authorization_server_unavailable").await;
    assert!(world.peer.requests().await.is_empty(), "nobody was asked");
}

#[tokio::test]
async fn a_repeated_credential_header_is_refused() {
    let jwks = serve_agent_jwks().await;
    let world = jwt_world(&jwks).await;
    let token = agent_token("alice", 300);
    let response = world
        .agent
        .post(world.gateway.url("/shop"))
        .header("authorization", format!("Bearer {token}"))
        .header(
            "authorization",
            format!("Bearer {}", agent_token("bob", 300)),
        )
        .json(&phones())
        .send();
    // Taking either header, the call would be held for approval.
    let response = refused_not_held(response).await;
    problem(response, 401, "identity_required").await;

    // Header identity: two users named on one call.
    let header_world = World::start(GatewayOptions::default()).await;
    let response = header_world
        .post_as("alice", "/shop")
        .header(USER_HEADER, "bob")
        .json(&phones())
        .send();
    let response = refused_not_held(response).await;
    assert_eq!(response.status(), 401);
    assert!(world.peer.requests().await.is_empty(), "nobody was asked");
    assert!(header_world.peer.requests().await.is_empty());
}
