//! Faults the approval engine survives (issue 18), each reproduced through
//! the real binary, the oidc-provider peer and a real store: a pause longer
//! than the lease, a burst past the per-person limit, a store that stalls
//! with a token in hand, a crash between asking and recording, an approval
//! resumed past its expiry, a replica whose clock runs ahead, SIGTERM with a
//! forward in flight, and a single SQLite gateway restarted after a crash.
//! The seeded fault-injection suite (tests/faults.rs) throws these at random.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::process::{GatewayProcess, TestDatabase};
use support::*;

const APPROVAL_ID: &str = "x-countersign-approval-id";
const ASYNC: &str = "async.shop.test";
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

fn options(store: String) -> GatewayOptions {
    GatewayOptions {
        extra_policies: ASYNC_POLICY,
        extra_config: store,
        ..Default::default()
    }
}

/// `POST /shop` on the async policy for `user`, buying `qty` of `product`.
fn call(
    agent: &reqwest::Client,
    proxy: SocketAddr,
    user: &str,
    product: &str,
    qty: u32,
) -> reqwest::RequestBuilder {
    agent
        .post(format!("http://{proxy}/shop"))
        .header("host", ASYNC)
        .header(USER_HEADER, user)
        .header("content-type", "application/json")
        .body(json!({ "product": product, "qty": qty }).to_string())
}

/// Sends the call; the approval id of its `202 Accepted`.
async fn accepted(request: reqwest::RequestBuilder) -> String {
    let response = request.send().await.unwrap();
    let status = response.status();
    let id = response
        .headers()
        .get(APPROVAL_ID)
        .map(|v| v.to_str().unwrap().to_owned());
    let text = response.text().await.unwrap();
    assert_eq!(status, 202, "{text}");
    id.expect("202 with an approval id")
}

/// Retries the call (as the retry contract says) until it is answered with
/// anything but 202; fails after `within`.
async fn answered(
    within: Duration,
    send: impl Fn() -> reqwest::RequestBuilder,
) -> reqwest::Response {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(response) = send().send().await {
            if response.status() != 202 {
                return response;
            }
        }
        assert!(
            Instant::now() < deadline,
            "still not answered after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Waits (up to `within`) until `check` holds; fails with `what` and the
/// last value seen.
async fn eventually<T: std::fmt::Debug, Fut: std::future::Future<Output = T>>(
    within: Duration,
    what: &str,
    mut sample: impl FnMut() -> Fut,
    check: impl Fn(&T) -> bool,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        let value = sample().await;
        if check(&value) {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: {value:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn order(response: reqwest::Response, approval_id: &str) -> Value {
    let status = response.status();
    let id = response.headers().get(APPROVAL_ID).cloned();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(id.unwrap(), approval_id);
    assert_eq!(body["status"], "confirmed", "{body}");
    body
}

/// The one pending CIBA request of `user` at the peer, once it is there.
async fn asked(peer: &Peer, user: &str) -> String {
    let pending = peer.wait_pending(Some(user), 1).await;
    flows::auth_req_id(&pending[0]).to_owned()
}

/// The state of approval `id`, as `countersign approvals show` prints it.
fn audit_state(config: &std::path::Path, id: &str) -> String {
    let out = std::process::Command::new(support::process::BIN)
        .args(["approvals", "show", id, "--config"])
        .arg(config)
        .output()
        .expect("countersign approvals runs");
    let text = String::from_utf8_lossy(&out.stdout);
    match serde_json::from_str::<Value>(&text) {
        Ok(approval) => approval["state"].as_str().unwrap_or_default().to_owned(),
        Err(_) => format!(
            "unreadable: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_paused_past_its_lease_comes_back_and_serves_new_approvals() {
    // A VM pause (or a stall of the store) longer than the lease: the
    // heartbeat lapses. Before, the engine never polled again: alice
    // approved and the agent got 202 until it gave up.
    let (peer, shop, _dir, gateway) = flows::sqlite_gateway(Some("2s"), options).await;
    gateway.pause();
    tokio::time::sleep(Duration::from_secs(5)).await;
    gateway.unpause();

    let agent = reqwest::Client::new();
    let send = || call(&agent, gateway.proxy, "alice", "XYZ phone", 2);
    // Sent the moment the gateway wakes, before its next heartbeat: the
    // call waits for it rather than being refused.
    let id = accepted(send()).await;
    peer.approve(&asked(&peer, "alice").await).await;
    order(answered(Duration::from_secs(20), send).await, &id).await;
    assert_eq!(shop.received().len(), 1);
    assert!(
        gateway.logs().contains("heartbeat lapsed") && gateway.logs().contains("heartbeat is back"),
        "the lapse and the return are logged:\n{}",
        gateway.logs()
    );
    let metrics = gateway.metrics().await;
    assert!(
        metrics.contains("countersign_heartbeat_lapses_total 1"),
        "the lapse is counted: {metrics}"
    );
}

/// Holds SQLite's write lock from another connection for `hold`: every
/// writer of the gateway waits (its busy timeout is 5 s), readers do not.
async fn stall_sqlite_writers(
    db: std::path::PathBuf,
    hold: Duration,
) -> tokio::task::JoinHandle<()> {
    use sqlx::Connection;
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut conn)
        .await
        .unwrap();
    tokio::spawn(async move {
        tokio::time::sleep(hold).await;
        sqlx::query("COMMIT").execute(&mut conn).await.unwrap();
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_says_not_ready_while_the_heartbeat_is_lapsed_and_ready_once_it_is_back() {
    let (_peer, _shop, dir, gateway) = flows::sqlite_gateway(Some("2s"), options).await;
    let ready = || gateway.readyz();
    eventually(Duration::from_secs(10), "never ready", ready, |r| {
        r.0 == 200
    })
    .await;
    let stall = stall_sqlite_writers(dir.path().join("approvals.db"), Duration::from_secs(8)).await;
    let (status, body) = eventually(
        Duration::from_secs(7),
        "still ready while the store is stalled",
        ready,
        |r| r.0 != 200,
    )
    .await;
    assert_eq!(status, 503, "not ready while lapsed: {body}");
    assert!(body.contains("approval_engine"), "{body}");
    stall.await.unwrap();
    eventually(Duration::from_secs(10), "never ready again", ready, |r| {
        r.0 == 200
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_for_one_person_pushes_no_more_than_the_limit() {
    // A runaway agent sends 20 different purchases at once for alice,
    // whose limit is 5 pending requests. Before, 16 to 20 reached her phone.
    let database = TestDatabase::create();
    let (peer, shop) = flows::peer_and_shop().await;
    let store = flows::postgres_store(&database.url, None);
    let limited = || GatewayOptions {
        limits: "{ max_body_bytes: 1024, max_hold: 60s, max_pending_per_user: 5 }",
        ..options(store.clone())
    };
    let a = GatewayProcess::start(&peer, &shop, limited()).await;
    let b = GatewayProcess::start(&peer, &shop, limited()).await;
    let agent = reqwest::Client::new();
    let mut calls = Vec::new();
    for i in 0..20u32 {
        let proxy = if i % 2 == 0 { a.proxy } else { b.proxy };
        let request = call(&agent, proxy, "alice", "XYZ phone", i + 1);
        calls.push(tokio::spawn(async move { request.send().await.unwrap() }));
    }
    let mut accepted = 0;
    let mut limited = 0;
    for task in calls {
        let response = task.await.unwrap();
        match response.status().as_u16() {
            202 => accepted += 1,
            429 => {
                flows::problem(response, 429, "too_many_pending_approvals").await;
                limited += 1;
            }
            other => panic!("{other}: {}", response.text().await.unwrap()),
        }
    }
    assert_eq!((accepted, limited), (5, 15));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(peer.requests().await.len(), 5, "pushed to alice's phone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_whose_token_arrives_while_the_store_stalls_is_still_forwarded() {
    // alice approves while SQLite's writers are stalled for 8 s (a checkpoint,
    // a backup holding the lock). Before, the claim failed once and the
    // token was dropped: nothing was bought and the agent got 202 until the
    // approval read as expired.
    let (peer, shop, dir, gateway) = flows::sqlite_gateway(Some("15s"), options).await;
    let agent = reqwest::Client::new();
    let send = || call(&agent, gateway.proxy, "alice", "XYZ phone", 2);
    let id = accepted(send()).await;
    let auth_req_id = asked(&peer, "alice").await;
    let stall = stall_sqlite_writers(dir.path().join("approvals.db"), Duration::from_secs(8)).await;
    peer.approve(&auth_req_id).await;
    stall.await.unwrap();
    order(answered(Duration::from_secs(30), send).await, &id).await;
    assert_eq!(shop.received().len(), 1, "bought once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_between_asking_and_recording_does_not_ask_again() {
    // The gateway dies after the request reached alice's phone but before it
    // learnt its auth_req_id. Before, the restarted gateway asked her a
    // second time. Now the approval ends, approval_interrupted, and the
    // agent decides whether to send the call again.
    let (peer, shop, _dir, mut gateway) = flows::sqlite_gateway(Some("2s"), options).await;
    let status = peer
        .control("bc-authorize-delay", json!({ "count": 1, "ms": 4000 }))
        .await;
    assert!(status.is_success());
    let agent = reqwest::Client::new();
    let proxy = gateway.proxy;
    let send = move || call(&agent, proxy, "alice", "XYZ phone", 2);
    let first = tokio::spawn(send().send());
    asked(&peer, "alice").await;
    gateway.kill9();
    let _ = first.await;
    gateway.restart().await;

    let body = flows::problem(
        answered(Duration::from_secs(20), send).await,
        502,
        "approval_interrupted",
    )
    .await;
    assert!(body["approval_id"].is_string(), "{body}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(peer.requests().await.len(), 1, "alice was asked once");
    assert!(shop.received().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_never_asked_is_not_pushed_after_its_expiry() {
    // A gateway stored an approval and died before asking; it is found
    // again only after it expired. Before, it was pushed anyway (with a
    // requested_expiry of 1 s). Planted with the columns of every version.
    let (peer, _shop, dir, mut gateway) = flows::sqlite_gateway(Some("2s"), options).await;
    gateway.kill9();
    let db = dir.path().join("approvals.db");
    {
        use sqlx::Connection;
        let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
            .await
            .unwrap();
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        sqlx::query(
            "INSERT INTO approvals (id, policy, subject, upstream, fingerprint, binding_message, \
             state, request_method, request_path_and_query, request_headers, request_body, \
             created_at, expires_at, updated_at) VALUES ('stale-1', 'buy-async', 'alice', 'shop', \
             'fp-stale', 'Do you want to buy 2 XYZ phone', 'pending', 'POST', '/shop', \
             CAST('[]' AS BLOB), CAST('{}' AS BLOB), $1, $2, $1)",
        )
        .bind(now_ms - 180_000)
        .bind(now_ms - 60_000)
        .execute(&mut conn)
        .await
        .unwrap();
    }
    gateway.restart().await;
    let state = || async { audit_state(&gateway.config, "stale-1") };
    eventually(Duration::from_secs(15), "state", state, |s| s == "expired").await;
    assert!(peer.requests().await.is_empty(), "nobody was pushed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_clock_runs_ahead_takes_over_nothing_live() {
    // Two replicas on PostgreSQL; b's wall clock runs 30 s ahead (faketime),
    // far past the 2 s lease. Before, b took over a's live approvals (both
    // polled; one could settle what the other was forwarding). Leases are
    // judged on the database's clock now.
    let database = TestDatabase::create();
    let (peer, shop) = flows::peer_and_shop().await;
    let store = || options(flows::postgres_store(&database.url, Some("2s")));
    let a = GatewayProcess::start(&peer, &shop, store()).await;
    // libfaketime preloaded into the gateway itself (Debian's `faketime`
    // command forks: a kill would stop the wrapper and orphan the gateway).
    assert!(
        std::path::Path::new(LIBFAKETIME).exists(),
        "{LIBFAKETIME}: install Debian's faketime"
    );
    let skewed = [
        ("LD_PRELOAD", LIBFAKETIME),
        ("FAKETIME", "+30s"),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ];
    let b = GatewayProcess::start_with_env(
        &peer,
        &shop,
        store(),
        skewed
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
    .await;
    let agent = reqwest::Client::new();
    let send = || call(&agent, a.proxy, "alice", "XYZ phone", 2);
    let id = accepted(send()).await;
    let auth_req_id = asked(&peer, "alice").await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let holder = database.query(&format!(
        "SELECT count(*) FROM approvals WHERE id = '{id}' AND lease_owner IS NOT NULL"
    ));
    assert_eq!(holder.trim(), "1");
    assert!(
        b.metrics()
            .await
            .lines()
            .any(|l| l == "countersign_lease_takeovers_total 0"),
        "b took nothing over:\n{}",
        b.logs()
    );
    peer.approve(&auth_req_id).await;
    order(answered(Duration::from_secs(20), send).await, &id).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(shop.received().len(), 1);
    let request = peer.request(&auth_req_id).await;
    assert_eq!(request["slow_downs"], 0, "one poller only: {request}");
}

/// A front for the shop that passes the request on at once and its answer
/// back `delay` late: an upstream that takes its time.
async fn slow_front(shop: SocketAddr, delay: Duration) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let upstream = tokio::net::TcpStream::connect(shop).await.unwrap();
                let (mut client_read, mut client_write) = client.into_split();
                let (mut shop_read, mut shop_write) = upstream.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_read, &mut shop_write).await;
                });
                let mut buf = vec![0u8; 65536];
                let mut first = true;
                while let Ok(n) = shop_read.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    if std::mem::take(&mut first) {
                        tokio::time::sleep(delay).await;
                    }
                    if client_write.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_forward_in_flight_finish_and_hands_the_leases_back() {
    // A rolling deploy: SIGTERM while an approved purchase is at the shop
    // (which answers after 3 s), and while bob's approval is pending.
    // Before, the forward was cut (outcome_unknown) and bob's approval
    // waited a whole lease for a new holder.
    let database = TestDatabase::create();
    let (peer, shop) = flows::peer_and_shop().await;
    let front = slow_front(shop.addr, Duration::from_secs(3)).await;
    let store = || GatewayOptions {
        upstream: Some(front.to_string()),
        ..options(flows::postgres_store(&database.url, Some("15s")))
    };
    let mut a = GatewayProcess::start(&peer, &shop, store()).await;
    let agent = reqwest::Client::new();
    let alice = accepted(call(&agent, a.proxy, "alice", "XYZ phone", 2)).await;
    let bob = accepted(call(&agent, a.proxy, "bob", "ABC tablet", 1)).await;
    let alice_request = asked(&peer, "alice").await;
    asked(&peer, "bob").await;
    peer.approve(&alice_request).await;
    let state =
        || async { database.query(&format!("SELECT state FROM approvals WHERE id = '{alice}'")) };
    eventually(Duration::from_secs(15), "never forwarded", state, |s| {
        s.trim() == "forwarding"
    })
    .await;
    let exited = a.terminate(Duration::from_secs(15)).await;
    assert!(exited.is_some(), "stopped within the drain timeout");
    assert_eq!(
        database
            .query(&format!("SELECT state FROM approvals WHERE id = '{alice}'"))
            .trim(),
        "done",
        "the forward in flight was recorded:\n{}",
        a.logs()
    );
    assert_eq!(
        database
            .query(&format!(
                "SELECT count(*) FROM approvals WHERE id = '{bob}' AND lease_owner IS NULL"
            ))
            .trim(),
        "1",
        "bob's lease was handed back"
    );
    assert_eq!(
        database
            .query("SELECT count(*) FROM gateway_heartbeats")
            .trim(),
        "0",
        "the heartbeat ended"
    );
    a.restart().await;
    let proxy = a.proxy;
    let send = || call(&agent, proxy, "alice", "XYZ phone", 2);
    order(answered(Duration::from_secs(10), send).await, &alice).await;
    assert_eq!(shop.received().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_sqlite_gateway_restarted_after_a_crash_resumes_at_once() {
    // One gateway, SQLite, the default 15 s lease: kill -9 while alice
    // decides. Before, the restarted gateway waited out its dead
    // predecessor's lease before polling again.
    let (peer, _shop, _dir, mut gateway) = flows::sqlite_gateway(None, options).await;
    let agent = reqwest::Client::new();
    let id = accepted(call(&agent, gateway.proxy, "alice", "XYZ phone", 2)).await;
    let auth_req_id = asked(&peer, "alice").await;
    gateway.kill9();
    gateway.restart().await;
    peer.approve(&auth_req_id).await;
    let started = Instant::now();
    let proxy = gateway.proxy;
    let send = || call(&agent, proxy, "alice", "XYZ phone", 2);
    order(answered(Duration::from_secs(30), send).await, &id).await;
    // The peer's interval is 5 s: adopted at once, one poll after it.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "answered after {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_from_the_authorization_server_survives_a_restart() {
    // The server answers a poll 503 with Retry-After: 20, then the gateway
    // crashes. Before, the restarted gateway polled one interval (5 s)
    // after it came back, too early for the server (slow_down).
    let (peer, _shop, _dir, mut gateway) = flows::sqlite_gateway(Some("2s"), options).await;
    let status = peer
        .control(
            "token-unavailable",
            json!({ "count": 1, "status": 503, "retry_after": 20 }),
        )
        .await;
    assert!(status.is_success());
    let agent = reqwest::Client::new();
    let id = accepted(call(&agent, gateway.proxy, "alice", "XYZ phone", 2)).await;
    let auth_req_id = asked(&peer, "alice").await;
    let polled = || peer.request(&auth_req_id);
    eventually(Duration::from_secs(15), "never polled", polled, |r| {
        r["polls"] == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    gateway.kill9();
    gateway.restart().await;
    peer.approve(&auth_req_id).await;
    let proxy = gateway.proxy;
    let send = || call(&agent, proxy, "alice", "XYZ phone", 2);
    order(answered(Duration::from_secs(40), send).await, &id).await;
    let request = peer.request(&auth_req_id).await;
    assert_eq!(
        request["slow_downs"], 0,
        "no poll before Retry-After: {request}"
    );
}
