//! Forwarding: an upstream that does not resolve is an answer, not a panic.

mod support;

use std::time::{Duration, Instant};

use support::*;

#[tokio::test]
async fn an_upstream_name_that_does_not_resolve_is_upstream_unavailable() {
    let world = World::builder()
        // `.invalid` never resolves (RFC 6761).
        .upstream("countersign-test.invalid:8080")
        .start()
        .await;
    for _ in 0..2 {
        let started = Instant::now();
        let response = world.get("/products").await;
        problem(response, 502, "upstream_unavailable").await;
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
