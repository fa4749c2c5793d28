//! Path confusion: every spelling of a policy route is held for approval,
//! and the upstream receives exactly the normalised path that was matched.

mod support;

use std::time::Duration;

use support::*;

fn post(path: &str, extra_headers: &str) -> String {
    post_qty(path, extra_headers, 2)
}

/// A purchase of `qty` phones: each spelling below buys a different number,
/// so that each is its own call (spellings of one call are one approval).
fn post_qty(path: &str, extra_headers: &str, qty: usize) -> String {
    let body = format!(r#"{{"product":"XYZ phone","qty":{qty},"priceLimit":900}}"#);
    format!(
        "POST {path} HTTP/1.1\r\nHost: shop.example\r\n{USER_HEADER}: alice\r\ncontent-type: application/json\r\n{extra_headers}content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[tokio::test]
async fn no_spelling_of_a_policy_route_gets_past_its_policy() {
    let world = World::start(GatewayOptions {
        limits: "{ max_body_bytes: 1024, max_hold: 60s, max_pending_per_user: 20 }",
        ..GatewayOptions::default()
    })
    .await;
    let spellings = [
        "//shop",
        "/./shop",
        "/x/../shop",
        "/%73hop",
        "/%2e/shop",
        "/SHOP",
        "/Shop/",
        "/shop;jsessionid=1",
        "/x/..;/shop",
        "/shop?ref=99",
        "/shop.json",
        "/SHOP.xml/",
        "http://shop.example/shop",
    ];
    let proxy = world.gateway.proxy;
    let calls: Vec<_> = spellings
        .iter()
        .enumerate()
        .map(|(i, path)| tokio::spawn(send_raw(proxy, post_qty(path, "", i + 1))))
        .collect();
    let pending = world
        .peer
        .wait_pending(Some("alice"), spellings.len())
        .await;
    assert_eq!(
        pending.len(),
        spellings.len(),
        "every spelling was held for approval"
    );
    let mut messages: Vec<String> = pending
        .iter()
        .map(|r| r["binding_message"].as_str().unwrap().to_owned())
        .collect();
    messages.sort();
    let mut expected: Vec<String> = (1..=spellings.len())
        .map(|qty| format!("Do you want to buy {qty} XYZ phone"))
        .collect();
    expected.sort();
    assert_eq!(messages, expected);
    for request in &pending {
        world.peer.deny_request(request).await;
    }
    for (path, call) in spellings.iter().zip(calls) {
        let (status, response) = call.await.unwrap();
        assert_eq!(status, 403, "{path}: {response}");
        assert!(response.contains("access_denied"), "{path}: {response}");
    }
    assert!(world.shop.received().is_empty(), "nothing reached the shop");
}

#[tokio::test]
async fn ambiguous_paths_and_method_overrides_are_refused() {
    let world = World::start(GatewayOptions::default()).await;
    let proxy = world.gateway.proxy;
    let ambiguous = ["/shop%2F", "/shop%5c", "/shop%00", "/../shop", "/sh%zzop"]
        .map(|path| (path, post(path, ""), "\"code\":\"invalid_path\""));
    let overrides = [
        "X-HTTP-Method-Override",
        "X-HTTP-Method",
        "X-Method-Override",
    ]
    .map(|header| {
        let request = format!(
            "GET /shop HTTP/1.1\r\nHost: shop\r\n{USER_HEADER}: alice\r\n{header}: POST\r\nconnection: close\r\n\r\n"
        );
        (header, request, "method_override_refused")
    });
    for (spelling, request, code) in ambiguous.into_iter().chain(overrides) {
        let (status, response) = send_raw(proxy, request).await;
        assert_eq!(status, 400, "{spelling}: {response}");
        assert!(response.contains(code), "{spelling}: {response}");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(world.peer.requests().await.is_empty());
    assert!(world.shop.received().is_empty());
}

#[tokio::test]
async fn the_upstream_receives_the_normalised_path_that_was_matched() {
    let world = World::start(GatewayOptions::default()).await;
    let proxy = world.gateway.proxy;
    let request = "GET //products/./items/../%7Ecatalog/?page=2 HTTP/1.1\r\nHost: shop\r\nconnection: close\r\n\r\n".to_owned();
    let (status, _) = send_raw(proxy, request).await;
    assert_eq!(
        status, 404,
        "the shop has no such page, but it got the call"
    );
    let received = world.shop.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].path_and_query, "/products/~catalog/?page=2");
}
