//! Durable approvals: an agent that cannot or will not wait gets `202
//! Accepted`, its retry is the same call (no second push to the phone), the
//! approved call is forwarded exactly once by the gateway itself and its
//! answer replayed to retries; approvals survive `kill -9`, move between
//! replicas on PostgreSQL, and a store that is down fails closed.
//!
//! The policies under test sit on their own host names so that the shop's
//! `/shop` serves them all: `async.shop.test` answers 202 at once,
//! `patient.shop.test` holds 2 s then answers 202, `brief.shop.test` is async
//! with a 3 s expiry. Plain `/shop` is `buy-product` from `policies/`, which
//! has no `wait:` key and so holds (the default).

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use countersign::demo::shop::ShopHandle;
use serde_json::{json, Value};
use support::process::{unreachable_postgres_url, GatewayProcess, TestDatabase};
use support::*;

const APPROVAL_ID: &str = "x-countersign-approval-id";
const MESSAGE: &str = "Do you want to buy 2 XYZ phone";

const ASYNC: &str = "async.shop.test";
const PATIENT: &str = "patient.shop.test";
const BRIEF: &str = "brief.shop.test";

/// A `bind: call` purchase policy on its own host, like support's
/// `ASYNC_POLICY` (which is `async.shop.test`) but for its expiry and `wait:`.
fn buy_policy(name: &str, host: &str, expiry: &str, wait: &str) -> String {
    format!(
        r#"  - name: {name}
    match: {{ methods: [POST], path: /shop, host: {host} }}
    require: {{ scopes: [product:buy], audience: "https://shop.example/api" }}
    bind: call
    binding_message: "Do you want to buy {{{{qty}}}} {{{{product}}}}"
    requested_expiry: {expiry}
    wait: {wait}
"#
    )
}

/// The three policies of the module doc.
static WAIT_POLICIES: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    [
        ASYNC_POLICY.to_owned(),
        buy_policy("buy-hold-2s", PATIENT, "2m", "{ hold: 2s }"),
        buy_policy("buy-async-brief", BRIEF, "3s", "async"),
    ]
    .concat()
});

/// Peer, shop and a gateway with the wait policies and nothing else.
async fn wait_world() -> World {
    World::start(options(String::new())).await
}

fn options(extra_config: String) -> GatewayOptions {
    GatewayOptions {
        extra_policies: WAIT_POLICIES.as_str(),
        extra_config,
        ..Default::default()
    }
}

/// The agent's call: `POST /shop` for `user` with exactly the bytes of
/// `body`, sent to `host` (`None`: the gateway's own address) through the
/// gateway at `proxy`. Sending it again is the agent's retry.
fn call(
    agent: &reqwest::Client,
    proxy: SocketAddr,
    host: Option<&str>,
    user: &str,
    body: &Value,
) -> reqwest::RequestBuilder {
    let request = agent
        .post(format!("http://{proxy}/shop"))
        .header(USER_HEADER, user)
        .header("content-type", "application/json")
        .body(serde_json::to_vec(body).unwrap());
    match host {
        Some(host) => request.header("host", host),
        None => request,
    }
}

/// Alice's purchase of `phones()` at `host` through the gateway at `proxy`,
/// as a function: calling it again is the agent's retry.
fn alice_buys_phones<'a>(
    agent: &'a reqwest::Client,
    proxy: SocketAddr,
    host: &'a str,
) -> impl Fn() -> reqwest::RequestBuilder + Copy + 'a {
    move || call(agent, proxy, Some(host), "alice", &phones())
}

/// A `202 Accepted` as the contract describes it.
struct Accepted {
    id: String,
    location: String,
    retry_after: u64,
    body: Value,
}

async fn accepted(response: reqwest::Response) -> Accepted {
    let status = response.status();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap();
    assert_eq!(status, 202, "{text}");
    let header = |name: &str| {
        headers
            .get(name)
            .unwrap_or_else(|| panic!("202 without {name}: {headers:?}"))
            .to_str()
            .unwrap()
            .to_owned()
    };
    assert!(header("content-type").contains("json"), "{headers:?}");
    let id = header(APPROVAL_ID);
    let location = header("location");
    let retry_after: u64 = header("retry-after")
        .parse()
        .expect("Retry-After in seconds");
    assert!(retry_after >= 1, "Retry-After: {retry_after}");
    assert!(location.ends_with(&format!("/{id}")), "{location}");
    let body: Value = serde_json::from_str(&text).expect("a JSON body");
    assert_eq!(body["status"], "pending", "{body}");
    assert_eq!(body["approval_id"], id.as_str(), "{body}");
    assert_eq!(body["location"], location.as_str(), "{body}");
    assert_eq!(body["retry_after"], retry_after, "{body}");
    Accepted {
        id,
        location,
        retry_after,
        body,
    }
}

/// The call's `202`, checked to come after a time within `within`.
async fn accepted_within(
    send: &impl Fn() -> reqwest::RequestBuilder,
    within: std::ops::Range<Duration>,
) -> Accepted {
    let started = Instant::now();
    let first = accepted(send().send().await.unwrap()).await;
    let took = started.elapsed();
    assert!(
        within.contains(&took),
        "202 after {took:?}, not within {within:?}"
    );
    first
}

/// Sends the call until it is answered with anything but 202, as an agent
/// following `Retry-After` would (faster, to keep the tests short).
async fn answered(send: impl Fn() -> reqwest::RequestBuilder) -> reqwest::Response {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let response = send().send().await.unwrap();
        if response.status() != 202 {
            return response;
        }
        assert!(
            Instant::now() < deadline,
            "still 202 after 30 s: {}",
            response.text().await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The order the agent is given, checked against what the shop confirmed.
async fn order(response: reqwest::Response, approval_id: &str) -> Value {
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()[APPROVAL_ID], approval_id);
    let order: Value = response.json().await.unwrap();
    assert_eq!(order["status"], "confirmed", "{order}");
    assert_eq!(order["buyer"], "alice", "{order}");
    assert_eq!(order["qty"], 2, "{order}");
    order
}

/// Waits until the shop has received `count` calls.
async fn forwarded(shop: &ShopHandle, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while shop.received().len() < count {
        assert!(
            Instant::now() < deadline,
            "the shop received {} calls, expected {count}",
            shop.received().len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Exactly one order reached the shop, and no second one follows.
async fn exactly_one_order(shop: &ShopHandle) {
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let received = shop.received();
    assert_eq!(received.len(), 1, "one approval, one forward: {received:?}");
    let claims = received[0].claims.as_ref().expect("a token that verifies");
    assert_eq!(claims["sub"], "alice");
}

async fn pending_request(peer: &Peer, user: &str) -> String {
    let pending = peer.wait_pending(Some(user), 1).await;
    assert_eq!(pending[0]["binding_message"], MESSAGE);
    flows::auth_req_id(&pending[0]).to_owned()
}

async fn status_of(
    agent: &reqwest::Client,
    proxy: SocketAddr,
    location: &str,
    user: &str,
) -> reqwest::Response {
    agent
        .get(format!("http://{proxy}{location}"))
        .header(USER_HEADER, user)
        .send()
        .await
        .unwrap()
}

/// The status resource's `state`, once it is `want` (fails after 20 s).
async fn wait_state(
    agent: &reqwest::Client,
    proxy: SocketAddr,
    location: &str,
    want: &str,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let response = status_of(agent, proxy, location, "alice").await;
        assert_eq!(response.status(), 200);
        let status: Value = response.json().await.unwrap();
        if status["state"] == want {
            return status;
        }
        assert!(Instant::now() < deadline, "never {want}: {status}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn an_async_call_is_accepted_at_once_and_the_retry_gets_the_order() {
    // The agent is not kept waiting: it hears at once, in words it can
    // relay, who must approve what and when to call again. Once alice
    // approves, the purchase happens without the agent, once, and the
    // retry gets that order; once it has it, the same call is a new
    // purchase (issue 25), which alice is asked about again.
    let world = wait_world().await;
    let send = alice_buys_phones(&world.agent, world.gateway.proxy, ASYNC);

    // Answered at once.
    let first = accepted_within(&send, Duration::ZERO..Duration::from_secs(2)).await;
    assert_eq!(
        first.location,
        format!("/.countersign/approvals/{}", first.id),
        "the default approvals_path"
    );
    assert_eq!(first.body["binding_message"], MESSAGE);
    assert_eq!(
        first.body["detail"],
        format!(
            "Waiting for alice to approve '{MESSAGE}'; call again in {} s.",
            first.retry_after
        )
    );

    let auth_req_id = pending_request(&world.peer, "alice").await;
    assert!(world.shop.received().is_empty(), "nothing before approval");
    world.peer.approve(&auth_req_id).await;
    // The gateway forwards by itself: the agent has not called again yet.
    forwarded(&world.shop, 1).await;

    let replay = answered(send).await;
    let got = order(replay, &first.id).await;
    let metrics = world.gateway.metrics().await;
    assert!(
        metrics.contains(
            "countersign_store_operation_duration_seconds_count{op=\"insert_or_attach\"}"
        ),
        "{metrics}"
    );
    assert_eq!(got["order_id"], "ord-1", "{got}");
    let again = accepted(send().send().await.unwrap()).await;
    assert_ne!(again.id, first.id, "a new approval, not the delivered one");
    exactly_one_order(&world.shop).await;
    assert_eq!(
        world.peer.requests().await.len(),
        2,
        "asked again about the new purchase"
    );
}

#[tokio::test]
async fn a_retry_before_approval_attaches_and_does_not_ask_again() {
    // An impatient agent calling again does not buzz alice's phone a
    // second time: it is told the same approval is still pending.
    let world = wait_world().await;
    let send = alice_buys_phones(&world.agent, world.gateway.proxy, ASYNC);
    let first = accepted(send().send().await.unwrap()).await;
    pending_request(&world.peer, "alice").await;

    for _ in 0..3 {
        let retry = accepted(send().send().await.unwrap()).await;
        assert_eq!(retry.id, first.id, "the same approval");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(world.peer.requests().await.len(), 1, "asked once");
    assert!(world.shop.received().is_empty());
}

#[tokio::test]
async fn a_denied_async_call_is_refused_to_the_retry() {
    // Alice says no: the agent's retry hears so, and nothing was bought.
    let world = wait_world().await;
    let send = alice_buys_phones(&world.agent, world.gateway.proxy, ASYNC);
    let first = accepted(send().send().await.unwrap()).await;
    world
        .peer
        .deny(&pending_request(&world.peer, "alice").await)
        .await;

    let body = flows::problem_json(answered(send).await, 403, "access_denied").await;
    assert_eq!(body["approval_id"], first.id.as_str(), "{body}");
    assert!(world.shop.received().is_empty());
    assert_eq!(world.peer.requests().await.len(), 1);
}

#[tokio::test]
async fn an_unanswered_async_call_expires() {
    // Alice never answers: after the expiry the retry is told the approval
    // expired (not that it was denied), and nothing was bought.
    let world = wait_world().await;
    let send = alice_buys_phones(&world.agent, world.gateway.proxy, BRIEF);
    accepted(send().send().await.unwrap()).await;
    pending_request(&world.peer, "alice").await;

    flows::problem_json(answered(send).await, 408, "approval_expired").await;
    assert!(world.shop.received().is_empty());
    assert_eq!(world.peer.requests().await.len(), 1);
}

#[tokio::test]
async fn an_idempotency_key_names_one_call_only() {
    // An agent that reuses its Idempotency-Key for a different purchase is
    // told so (422) instead of being handed the first purchase's approval;
    // the same key with the same call is the same approval.
    let world = wait_world().await;
    let keyed = |body: &Value| {
        call(
            &world.agent,
            world.gateway.proxy,
            Some(ASYNC),
            "alice",
            body,
        )
        .header("idempotency-key", "order-7f3a")
    };
    let first = accepted(keyed(&phones()).send().await.unwrap()).await;
    pending_request(&world.peer, "alice").await;

    let three = json!({ "product": "XYZ phone", "qty": 3, "priceLimit": 900 });
    flows::problem_json(
        keyed(&three).send().await.unwrap(),
        422,
        "idempotency_key_reused",
    )
    .await;

    let same = accepted(keyed(&phones()).send().await.unwrap()).await;
    assert_eq!(same.id, first.id);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(world.peer.requests().await.len(), 1, "asked once");
    assert!(world.shop.received().is_empty());
}

#[tokio::test]
async fn a_held_agent_that_hangs_up_still_gets_its_order_on_retry() {
    // The agent's HTTP client gives up while alice is still deciding. Her
    // approval is not wasted: the purchase happens once, and the agent's
    // retry gets the order instead of a second request to her phone.
    // (Plain `/shop`: a policy without `wait:` holds.)
    let world = World::start(GatewayOptions::default()).await;
    let stream = flows::held_call(world.gateway.proxy, "alice", &phones());
    let auth_req_id = pending_request(&world.peer, "alice").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    drop(stream);
    tokio::time::sleep(Duration::from_millis(1500)).await;

    world.peer.approve(&auth_req_id).await;
    forwarded(&world.shop, 1).await;

    let retry = call(&world.agent, world.gateway.proxy, None, "alice", &phones())
        .send()
        .await
        .unwrap();
    let id = retry.headers()[APPROVAL_ID].to_str().unwrap().to_owned();
    order(retry, &id).await;
    exactly_one_order(&world.shop).await;
    assert_eq!(world.peer.requests().await.len(), 1, "asked once");
}

#[tokio::test]
async fn a_hold_with_a_limit_answers_202_when_the_limit_is_reached() {
    // A policy may hold the agent for a while (most approvals are quick)
    // and then let it go with a 202 rather than keep it hanging.
    let world = wait_world().await;
    let send = alice_buys_phones(&world.agent, world.gateway.proxy, PATIENT);
    // Held ~2 s, then let go.
    let first = accepted_within(&send, Duration::from_millis(1800)..Duration::from_secs(8)).await;
    let auth_req_id = pending_request(&world.peer, "alice").await;
    world.peer.approve(&auth_req_id).await;

    order(answered(send).await, &first.id).await;
    exactly_one_order(&world.shop).await;
    assert_eq!(world.peer.requests().await.len(), 1);
}

#[tokio::test]
async fn the_status_resource_is_readable_only_by_its_own_identity() {
    // The agent (or its operator) can look up where an approval stands at
    // the URL the 202 gave; another identity cannot even learn it exists.
    let world = World::start(options(
        "approvals_path: /_countersign/approvals".to_owned(),
    ))
    .await;
    let proxy = world.gateway.proxy;
    let send = alice_buys_phones(&world.agent, proxy, ASYNC);
    let first = accepted(send().send().await.unwrap()).await;
    assert_eq!(
        first.location,
        format!("/_countersign/approvals/{}", first.id),
        "approvals_path is configurable"
    );
    let auth_req_id = pending_request(&world.peer, "alice").await;

    let own = status_of(&world.agent, proxy, &first.location, "alice").await;
    assert_eq!(own.status(), 200);
    let status: Value = own.json().await.unwrap();
    assert_eq!(status["approval_id"], first.id.as_str(), "{status}");
    assert_eq!(status["state"], "pending", "{status}");
    assert_eq!(status["binding_message"], MESSAGE, "{status}");

    let other = status_of(&world.agent, proxy, &first.location, "bob").await;
    assert_eq!(other.status(), 404, "another identity sees nothing");
    let unknown = status_of(
        &world.agent,
        proxy,
        "/_countersign/approvals/no-such-approval",
        "alice",
    )
    .await;
    assert_eq!(unknown.status(), 404);

    world.peer.approve(&auth_req_id).await;
    wait_state(&world.agent, proxy, &first.location, "done").await;
    assert_eq!(world.shop.received().len(), 1);
}

#[tokio::test]
async fn without_a_store_key_approvals_are_kept_in_sqlite_beside_the_config() {
    // An operator who configures nothing gets durable approvals anyway: a
    // countersign.db next to the configuration file holds the pending one.
    let world = World::start(GatewayOptions::default()).await;
    let held = tokio::spawn(world.buy("alice", phones()).send());
    let auth_req_id = pending_request(&world.peer, "alice").await;
    let db = world.gateway.dir().join("countersign.db");
    assert!(db.is_file(), "{} was not created", db.display());
    world.peer.approve(&auth_req_id).await;
    assert_eq!(held.await.unwrap().unwrap().status(), 200);
}

/// A store that is down: policy calls are refused, the rest flows.
#[tokio::test]
async fn with_the_store_down_policy_calls_fail_closed_and_pass_through_works() {
    // PostgreSQL is unreachable: no purchase can be approved (503, so the
    // agent knows to try later), nobody's phone buzzes, and reading the
    // catalogue, which needs no approval, still works.
    let world = World::start(options(format!(
        "store: {{ postgres: \"{}\" }}",
        unreachable_postgres_url()
    )))
    .await;
    for host in [Some(ASYNC), None] {
        let response = call(&world.agent, world.gateway.proxy, host, "alice", &phones())
            .send()
            .await
            .unwrap();
        flows::problem_json(response, 503, "approval_store_unavailable").await;
    }
    let catalogue = world
        .agent
        .get(world.gateway.url("/products"))
        .send()
        .await
        .unwrap();
    assert_eq!(catalogue.status(), 200);
    assert!(world.peer.requests().await.is_empty(), "nobody was asked");
    let received = world.shop.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].path_and_query, "/products");
    // Operators see it: failed store operations are counted.
    let metrics = world.gateway.metrics().await;
    let errors: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("countersign_store_errors_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(errors >= 2, "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_approval_survives_kill_9_and_a_restart() {
    // The gateway crashes (or is redeployed) while alice is deciding. When
    // it is back, her approval still buys the phones, once, and the
    // agent's retry gets the order.
    let (peer, shop, _dir, mut gateway) = flows::sqlite_gateway(Some("2s"), options).await;
    let agent = reqwest::Client::new();
    let send = alice_buys_phones(&agent, gateway.proxy, ASYNC);
    let first = accepted(send().send().await.unwrap()).await;
    let auth_req_id = pending_request(&peer, "alice").await;

    gateway.kill9();
    gateway.restart().await;
    peer.approve(&auth_req_id).await;

    let proxy = gateway.proxy;
    let send = alice_buys_phones(&agent, proxy, ASYNC);
    order(answered(send).await, &first.id).await;
    exactly_one_order(&shop).await;
    assert_eq!(peer.requests().await.len(), 1, "asked once");
    let request = peer.request(&auth_req_id).await;
    assert_eq!(
        request["slow_downs"], 0,
        "polling resumed without polling too fast: {request}"
    );
}

/// An upstream that reads a request, counts it and never answers.
async fn silent_upstream() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = std::sync::Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                if matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {
                    seen.fetch_add(1, Ordering::SeqCst);
                }
                // Hold the connection open, never answering.
                tokio::time::sleep(Duration::from_secs(600)).await;
                drop(stream);
            });
        }
    });
    (addr, count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_while_forwarding_is_reported_as_unknown_and_never_resent() {
    // The gateway dies after sending the approved purchase but before the
    // shop answered. The shop may have acted: the agent is told the outcome
    // is unknown, and the purchase is never sent a second time.
    use std::sync::atomic::Ordering;
    let (upstream, arrivals) = silent_upstream().await;
    let (peer, _shop, _dir, mut gateway) =
        flows::sqlite_gateway(Some("2s"), |store| GatewayOptions {
            upstream: Some(upstream.to_string()),
            ..options(store)
        })
        .await;
    let agent = reqwest::Client::new();
    let send = alice_buys_phones(&agent, gateway.proxy, ASYNC);
    let first = accepted(send().send().await.unwrap()).await;
    peer.approve(&pending_request(&peer, "alice").await).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while arrivals.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the approved call was not sent");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    gateway.kill9();
    gateway.restart().await;
    let proxy = gateway.proxy;
    let send = alice_buys_phones(&agent, proxy, ASYNC);
    let body = flows::problem_json(answered(send).await, 502, "outcome_unknown").await;
    assert_eq!(body["approval_id"], first.id.as_str(), "{body}");
    let status = wait_state(&agent, proxy, &first.location, "outcome_unknown").await;
    assert_eq!(status["approval_id"], first.id.as_str());
    // Past the lease, nobody picks the call up again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(arrivals.load(Ordering::SeqCst), 1, "never sent twice");
    assert_eq!(peer.requests().await.len(), 1);
    let metrics = gateway.metrics().await;
    assert!(
        metrics.contains("countersign_outcome_unknown_total 1"),
        "the restarted gateway counts the approval it marked: {metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_on_one_postgres_lose_nothing_when_one_dies() {
    // Two replicas behind a load balancer share PostgreSQL. The one that
    // took the call dies while alice decides; the other takes the approval
    // over, buys the phones once, and answers the agent's retry.
    let database = TestDatabase::create();
    let (peer, shop) = flows::peer_and_shop().await;
    let store = || options(flows::postgres_store(&database.url, Some("2s")));
    let mut a = GatewayProcess::start(&peer, &shop, store()).await;
    let b = GatewayProcess::start(&peer, &shop, store()).await;
    let agent = reqwest::Client::new();

    let send = alice_buys_phones(&agent, a.proxy, ASYNC);
    let first = accepted(send().send().await.unwrap()).await;
    let auth_req_id = pending_request(&peer, "alice").await;
    a.kill9();
    peer.approve(&auth_req_id).await;

    let send = alice_buys_phones(&agent, b.proxy, ASYNC);
    order(answered(send).await, &first.id).await;
    exactly_one_order(&shop).await;
    assert_eq!(peer.requests().await.len(), 1, "asked once");
    let status = wait_state(&agent, b.proxy, &first.location, "done").await;
    assert_eq!(status["approval_id"], first.id.as_str());
    assert!(
        b.metrics()
            .await
            .lines()
            .any(|l| l == "countersign_lease_takeovers_total 1"),
        "the survivor counts the takeover"
    );
}

#[tokio::test]
async fn the_example_gift_card_policy_is_asynchronous() {
    // policies/shop.yaml's send-gift-card (`wait: async`), as dev mode
    // shows it: 202 at once, then the shop's 201 to the same call, made
    // with a token the shop verified.
    let world = World::start(GatewayOptions::default()).await;
    let send = || {
        world
            .agent
            .post(world.gateway.url("/gift-cards"))
            .header(USER_HEADER, "alice")
            .json(&json!({"amount": 25, "to": "bob"}))
    };
    let first = accepted(send().send().await.unwrap()).await;
    assert_eq!(
        first.body["binding_message"],
        "Send a 25 EUR gift card to bob"
    );
    let pending = world.peer.wait_pending(Some("alice"), 1).await;
    assert_eq!(
        pending[0]["binding_message"],
        "Send a 25 EUR gift card to bob"
    );
    world.peer.approve(flows::auth_req_id(&pending[0])).await;
    let answer = answered(send).await;
    assert_eq!(answer.status(), 201);
    let card: Value = answer.json().await.unwrap();
    assert_eq!(card["status"], "sent", "{card}");
    assert_eq!(card["from"], "alice", "{card}");
    let received = world.shop.received();
    assert_eq!(received.len(), 1);
    assert!(received[0].claims.is_some(), "the shop verified the token");
}
