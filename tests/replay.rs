//! Issue 25: a delivered answer is not replayed to a new call. The recorded
//! answer of an approved call answers retries of it (same fingerprint) only
//! until it has been written in full to an agent; after that the same call
//! is a new call and the person is asked again. With an `Idempotency-Key`
//! the answer is replayed within `replay_window` as often as asked.
//!
//! Through the real gateway, oidc-provider and the token-verifying shop,
//! on the default store (SQLite beside the configuration) and PostgreSQL.

mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::process::TestDatabase;
use support::*;

const APPROVAL_ID: &str = "x-countersign-approval-id";

/// One held `POST /shop` of two phones for alice, approved by her: its
/// approval id and the order the agent was given.
async fn approved_purchase(world: &World, auth_requests_before: usize) -> (String, Value) {
    let held = tokio::spawn(world.buy("alice", phones()).send());
    let auth_req_id = pending_request(world, auth_requests_before + 1).await;
    world.peer.approve(&auth_req_id).await;
    let response = held.await.unwrap().unwrap();
    order(response).await
}

/// The `auth_req_id` of the `count`th CIBA request, once it is pending.
async fn pending_request(world: &World, count: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let requests = world.peer.requests().await;
        if requests.len() >= count {
            assert_eq!(requests.len(), count, "asked more than expected");
            let pending = world.peer.wait_pending(Some("alice"), 1).await;
            return flows::auth_req_id(&pending[0]).to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "the person was asked {} times, expected {count}",
            requests.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The approval id and order of a `200` from the shop.
async fn order(response: reqwest::Response) -> (String, Value) {
    assert_eq!(response.status(), 200);
    let id = response.headers()[APPROVAL_ID].to_str().unwrap().to_owned();
    let order: Value = response.json().await.unwrap();
    assert_eq!(order["status"], "confirmed", "{order}");
    assert_eq!(order["buyer"], "alice", "{order}");
    (id, order)
}

/// The status resource of approval `id`, as alice reads it.
async fn status(world: &World, id: &str) -> Value {
    let response = world
        .agent
        .get(world.gateway.url(&format!("/.countersign/approvals/{id}")))
        .header(USER_HEADER, "alice")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

async fn a_second_identical_purchase_asks_again_and_buys_again(world: World) {
    // Alice buys two phones; five minutes later she wants two more, and the
    // agent sends the same call. It is a new purchase: she is asked again
    // and the shop sells again.
    let (first_id, first) = approved_purchase(&world, 0).await;
    assert_eq!(first["order_id"], "ord-1", "{first}");
    let delivered = status(&world, &first_id).await;
    assert_eq!(delivered["state"], "done", "{delivered}");
    assert!(
        delivered["delivered_at_ms"].as_u64().is_some(),
        "{delivered}"
    );

    let (second_id, second) = approved_purchase(&world, 1).await;
    assert_ne!(second_id, first_id, "a new approval");
    assert_eq!(second["order_id"], "ord-2", "{second}");
    assert_eq!(world.peer.requests().await.len(), 2, "asked twice");
    let received = world.shop.received();
    assert_eq!(received.len(), 2, "two purchases: {received:?}");
    assert!(received.iter().all(|r| r.claims.is_some()));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_identical_purchase_asks_again_on_sqlite() {
    let world = World::start(GatewayOptions::default()).await;
    a_second_identical_purchase_asks_again_and_buys_again(world).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_identical_purchase_asks_again_on_postgres() {
    let database = TestDatabase::create();
    let world = World::start(GatewayOptions {
        extra_config: flows::postgres_store(&database.url, None),
        ..GatewayOptions::default()
    })
    .await;
    a_second_identical_purchase_asks_again_and_buys_again(world).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_that_hung_up_gets_the_order_once_then_the_call_is_new() {
    // The agent's client gives up while alice decides. Its retry gets the
    // order it never saw (nobody is asked again); the call after that is
    // a new purchase.
    let world = World::start(GatewayOptions::default()).await;
    let stream = flows::held_call(world.gateway.proxy, "alice", &phones());
    let auth_req_id = pending_request(&world, 1).await;
    drop(stream);
    // The hold notices the hang-up (its log says so) before the approval.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    world.peer.approve(&auth_req_id).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while world.shop.received().is_empty() {
        assert!(Instant::now() < deadline, "the approved call was not made");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let approvals: Value =
        flows::get_json(format!("http://{}/approvals", world.gateway.admin)).await;
    let first_id = approvals[0]["id"].as_str().unwrap().to_owned();
    // Recorded once the shop has answered (it checks the token first).
    let mut undelivered = status(&world, &first_id).await;
    while undelivered["state"] == "forwarding" && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        undelivered = status(&world, &first_id).await;
    }
    assert_eq!(undelivered["state"], "done", "{undelivered}");
    assert!(
        undelivered["delivered_at_ms"].is_null(),
        "nobody got it: {undelivered}"
    );

    let (retry_id, replayed) = order(world.buy("alice", phones()).send().await.unwrap()).await;
    assert_eq!(retry_id, first_id, "the retry gets the recorded order");
    assert_eq!(replayed["order_id"], "ord-1", "{replayed}");
    assert_eq!(world.peer.requests().await.len(), 1, "not asked again");
    assert!(status(&world, &first_id).await["delivered_at_ms"]
        .as_u64()
        .is_some());

    let (next_id, next) = approved_purchase(&world, 1).await;
    assert_ne!(next_id, first_id);
    assert_eq!(next["order_id"], "ord-2", "{next}");
    assert_eq!(world.shop.received().len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn with_an_idempotency_key_repeats_get_the_recorded_order() {
    // The key says "this is the same operation": however often the agent
    // sends it within the replay window, it gets the one order.
    let world = World::start(GatewayOptions::default()).await;
    let keyed = || {
        world
            .buy("alice", phones())
            .header("idempotency-key", "order-7f3a")
    };
    let held = tokio::spawn(keyed().send());
    let auth_req_id = pending_request(&world, 1).await;
    world.peer.approve(&auth_req_id).await;
    let (first_id, first) = order(held.await.unwrap().unwrap()).await;
    assert!(status(&world, &first_id).await["delivered_at_ms"]
        .as_u64()
        .is_some());
    for _ in 0..3 {
        let (id, again) = order(keyed().send().await.unwrap()).await;
        assert_eq!(id, first_id);
        assert_eq!(again, first, "the recorded answer");
    }
    assert_eq!(world.peer.requests().await.len(), 1, "asked once");
    assert_eq!(world.shop.received().len(), 1, "bought once");
}
