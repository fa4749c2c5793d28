//! The JWKS cache: one fetch for many concurrent first calls (single
//! flight), and an unknown `kid` right after a fetch does not fetch again
//! (negative cache), so made-up key ids cannot hammer the authorization server.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::{routing::get, Json, Router};
use common::*;
use countersign_verify::{Config, Verifier};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_is_fetched_once_and_not_for_unknown_kids() {
    let key = TestKey::new(2);
    let mut jwk = key.jwk.clone();
    jwk["kid"] = "k1".into();
    let fetches = Arc::new(AtomicUsize::new(0));
    let counter = fetches.clone();
    let app = Router::new().route(
        "/jwks.json",
        get(move || {
            let jwks = json!({ "keys": [jwk.clone(), {"kty": "unknown-kind"}] });
            counter.fetch_add(1, Ordering::SeqCst);
            async move {
                // Slow enough that the concurrent calls overlap the fetch.
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                Json(jwks)
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let issuer = "https://issuer.test";
    let verifier = Verifier::new(Config::new(
        issuer,
        AUDIENCE,
        format!("http://{addr}/jwks.json"),
    ))
    .unwrap();
    let token = |kid: &str| {
        key.sign(
            &json!({"typ": "at+jwt", "alg": "ES256", "kid": kid}),
            &json!({
                "iss": issuer, "aud": AUDIENCE, "sub": "alice", "exp": now() + 300,
                "authorization_details": [call_entry(&uuid(), "POST", "/shop", "api.test", b"")],
            }),
        )
    };
    let parts = |token: &str| {
        http::Request::post("/shop")
            .header("host", "api.test")
            .header("authorization", format!("Bearer {token}"))
            .body(())
            .unwrap()
            .into_parts()
            .0
    };

    let calls = (0..8).map(|_| {
        let verifier = verifier.clone();
        let parts = parts(&token("k1"));
        tokio::spawn(async move { verifier.verify(&parts, b"").await })
    });
    for call in calls.collect::<Vec<_>>() {
        let approval = call.await.unwrap().expect("accepted");
        assert_eq!(approval.subject, "alice");
    }
    assert_eq!(fetches.load(Ordering::SeqCst), 1, "one fetch for 8 calls");

    let refusal = verifier
        .verify(&parts(&token("k2")), b"")
        .await
        .unwrap_err();
    assert_eq!(
        (refusal.status().as_u16(), refusal.code()),
        (401, "token_invalid")
    );
    assert_eq!(
        fetches.load(Ordering::SeqCst),
        1,
        "no refetch within the cooldown"
    );
}

/// Settled detail of the contract: signing keys that cannot be fetched give
/// 401 `token_invalid`, with a detail saying so (a real token of the peer,
/// checked against a JWKS address where nothing listens).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_that_cannot_be_fetched_are_token_invalid() {
    let peer = start_peer().await;
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_jwks = format!("http://{}/jwks.json", closed.local_addr().unwrap());
    drop(closed);
    let verifier = Verifier::new(Config::new(&peer.issuer, AUDIENCE, dead_jwks)).unwrap();
    let token = peer
        .token(Ask {
            scope: "openid product:buy",
            details: Some(json!([call_entry(
                &uuid(),
                "POST",
                "/shop",
                "api.test",
                b""
            )])),
            dpop: None,
        })
        .await;
    let parts = http::Request::post("/shop")
        .header("host", "api.test")
        .header("authorization", format!("Bearer {token}"))
        .body(())
        .unwrap()
        .into_parts()
        .0;
    // Twice: the first fetch fails, the second answer comes from the failure cooldown.
    for attempt in 0..2 {
        let refusal = verifier.verify(&parts, b"").await.unwrap_err();
        assert_eq!(
            (refusal.status().as_u16(), refusal.code(), refusal.title()),
            (401, "token_invalid", "Access token invalid"),
            "attempt {attempt}"
        );
        assert!(
            refusal.detail().contains("could not be fetched"),
            "attempt {attempt}: {}",
            refusal.detail()
        );
        assert_eq!(
            refusal.www_authenticate(),
            Some(r#"Bearer error="invalid_token""#)
        );
    }
}
