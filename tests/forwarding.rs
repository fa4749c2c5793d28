//! Forwarding: an upstream that does not resolve is an answer, not a panic.

mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

#[tokio::test]
async fn an_upstream_name_that_does_not_resolve_is_upstream_unavailable() {
    let world = World::start(GatewayOptions {
        // `.invalid` never resolves (RFC 6761).
        upstream: Some("countersign-test.invalid:8080".to_owned()),
        ..GatewayOptions::default()
    })
    .await;
    for _ in 0..2 {
        let started = Instant::now();
        let response = world.get("/products").await;
        assert_eq!(response.status(), 502);
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["code"], "upstream_unavailable");
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
