//! Four eyes against the real oidc-provider peer with three people: the
//! person (alice), the finance lead who countersigns large transfers
//! (policies/conditions.yaml, `transfer-large`) and bob; the example shop
//! takes a large transfer only with a countersigner's token for exactly the
//! same call (countersign-verify, `required_countersigners: 1`).

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};
use support::{flows, start_shop, GatewayOptions, Peer, World, USER_HEADER};

const LEAD: &str = "finance-lead";

fn transfer(
    agent: &reqwest::Client,
    proxy: SocketAddr,
    user: &str,
    amount: u32,
) -> reqwest::RequestBuilder {
    agent
        .post(format!("http://{proxy}/transfers"))
        .header(USER_HEADER, user)
        .json(&json!({ "amount": amount, "to": "carol" }))
}

/// The pending CIBA request of `user` at the peer, once it is there.
async fn asked(peer: &Peer, user: &str) -> Value {
    peer.wait_pending(Some(user), 1).await.remove(0)
}

fn id(request: &Value) -> &str {
    flows::auth_req_id(request)
}

/// The transfers that reached the shop, with what it answered them.
fn transfers(
    world_shop: &countersign::demo::shop::ShopHandle,
) -> Vec<countersign::demo::shop::Received> {
    world_shop
        .received()
        .into_iter()
        .filter(|r| r.path_and_query == "/transfers")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approved_by_the_person_and_the_countersigner_it_is_forwarded_once_with_both_tokens() {
    let world = World::start(GatewayOptions::default()).await;
    let call = tokio::spawn(transfer(&world.agent, world.gateway.proxy, "alice", 25_000).send());
    // Both asked at once, each with their own question.
    let lead = asked(&world.peer, LEAD).await;
    let alice = asked(&world.peer, "alice").await;
    assert_eq!(
        lead["binding_message"],
        "Countersign: alice sends 25000 to carol"
    );
    assert_eq!(alice["binding_message"], "LARGE transfer of 25000 to carol");
    // The countersigner first: nothing is forwarded on a partial quorum.
    world.peer.approve(id(&lead)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        transfers(&world.shop).is_empty(),
        "forwarded on a partial quorum"
    );
    world.peer.approve(id(&alice)).await;

    let response = call.await.unwrap().unwrap();
    assert_eq!(response.status(), 201);
    let approval_id = response.headers()["x-countersign-approval-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["from"], "alice", "{body}");
    assert_eq!(body["countersigned_by"], json!([LEAD]), "{body}");
    let arrived = transfers(&world.shop);
    assert_eq!(arrived.len(), 1, "forwarded once");
    assert_eq!(arrived[0].refused, None);
    let tokens = arrived[0]
        .headers
        .get_all("countersign-tokens")
        .iter()
        .count();
    assert_eq!(tokens, 1);
    assert_eq!(world.peer.requests().await.len(), 2, "nobody asked twice");
    // The audit trail: who was asked, who answered what.
    let trail: Value = reqwest::get(format!("http://{}/approvals", world.gateway.admin))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let trail = trail.as_array().expect("a list");
    let call = trail
        .iter()
        .find(|e| e["id"] == approval_id.as_str())
        .unwrap();
    assert_eq!(call["state"], "done", "{call}");
    assert_eq!(call["countersigners_needed"], 1, "{call}");
    let countersign = trail
        .iter()
        .find(|e| e["countersign_of"] == approval_id.as_str())
        .unwrap();
    assert_eq!(countersign["subject"], LEAD, "{countersign}");
    assert_eq!(countersign["state"], "done", "{countersign}");
    assert!(countersign["decided_at_ms"].is_i64(), "{countersign}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_no_from_either_refuses_the_call_and_nothing_is_forwarded() {
    let world = World::start(GatewayOptions::default()).await;
    for (amount, alice_says_yes, detail_names) in [
        // The person approves, the countersigner denies.
        (20_000, true, "denied by finance-lead"),
        // The person denies, the countersigner approves.
        (30_000, false, "alice denied"),
    ] {
        let call =
            tokio::spawn(transfer(&world.agent, world.gateway.proxy, "alice", amount).send());
        let lead = asked(&world.peer, LEAD).await;
        let alice = asked(&world.peer, "alice").await;
        let (yes, no) = match alice_says_yes {
            true => (&alice, &lead),
            false => (&lead, &alice),
        };
        world.peer.approve(id(yes)).await;
        world.peer.deny(id(no)).await;
        let body = flows::problem(call.await.unwrap().unwrap(), 403, "access_denied").await;
        let detail = body["detail"].as_str().unwrap();
        assert!(detail.contains(detail_names), "{detail}");
    }

    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        transfers(&world.shop).is_empty(),
        "a refused call was forwarded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_countersigner_who_never_answers_ends_in_expiry_naming_them() {
    let world = World::start(GatewayOptions {
        limits: "{ max_body_bytes: 1024, max_hold: 5s }",
        ..Default::default()
    })
    .await;
    let call = tokio::spawn(transfer(&world.agent, world.gateway.proxy, "alice", 20_000).send());
    asked(&world.peer, LEAD).await;
    let alice = asked(&world.peer, "alice").await;
    world.peer.approve(id(&alice)).await;
    let body = flows::problem(call.await.unwrap().unwrap(), 408, "approval_expired").await;
    let detail = body["detail"].as_str().unwrap();
    assert!(
        detail.contains("finance-lead, a countersigner, did not answer in time"),
        "{detail}"
    );
    assert!(transfers(&world.shop).is_empty());
}

/// A policy listing the person among its countersigners.
const LISTED: &str = r#"
  - name: wire
    match: { methods: [POST], path: /wire }
    require: { scopes: [product:buy], audience: https://shop.example/api }
    bind: call
    binding_message: "Wire {{amount}}"
    countersign:
      subjects: [alice, bob]
      min: 1
      binding_message: "Countersign wire of {{amount}} by {{user.sub}}"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_person_listed_as_countersigner_is_not_asked_twice_and_does_not_count() {
    let world = World::start(GatewayOptions {
        extra_policies: LISTED,
        ..Default::default()
    })
    .await;
    let proxy = world.gateway.proxy;
    let call = tokio::spawn(
        world
            .agent
            .post(format!("http://{proxy}/wire"))
            .header(USER_HEADER, "alice")
            .json(&json!({ "amount": 70 }))
            .send(),
    );
    let bob = asked(&world.peer, "bob").await;
    let alice = asked(&world.peer, "alice").await;
    assert_eq!(alice["binding_message"], "Wire 70");
    assert_eq!(bob["binding_message"], "Countersign wire of 70 by alice");
    world.peer.approve(id(&alice)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        world.shop.received().is_empty(),
        "alice's own approval counted as a countersignature"
    );
    world.peer.approve(id(&bob)).await;
    // The shop has no /wire: it answers 404, but it got the call once, with
    // bob's token alone besides alice's.
    let response = call.await.unwrap().unwrap();
    assert_eq!(response.status(), 404);
    let received = world.shop.received();
    assert_eq!(received.len(), 1);
    let header = received[0].headers.get("countersign-tokens").unwrap();
    assert_eq!(header.to_str().unwrap().split(',').count(), 1);
    assert_eq!(world.peer.requests().await.len(), 2, "alice asked once");

    // Nobody but the person can countersign a large transfer of the
    // finance lead's: refused before anyone is asked.
    let body = flows::problem(
        transfer(&world.agent, proxy, LEAD, 50_000)
            .send()
            .await
            .unwrap(),
        403,
        "countersigners_unavailable",
    )
    .await;
    assert!(body["detail"]
        .as_str()
        .unwrap()
        .contains("besides finance-lead"));
    assert_eq!(world.peer.requests().await.len(), 2, "nobody was asked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cannot_forge_countersignatures() {
    let world = World::start(GatewayOptions::default()).await;
    // Above 500 a transfer is the person's alone to approve; the agent's
    // own Countersign-Tokens header never reaches the shop.
    let call = tokio::spawn(
        transfer(&world.agent, world.gateway.proxy, "alice", 700)
            .header("countersign-tokens", "forged.token.value")
            .send(),
    );
    let alice = asked(&world.peer, "alice").await;
    world.peer.approve(id(&alice)).await;
    assert_eq!(call.await.unwrap().unwrap().status(), 201);
    let arrived = transfers(&world.shop);
    assert_eq!(arrived.len(), 1);
    assert!(arrived[0].headers.get("countersign-tokens").is_none());
    // Nor on a call that passes unapproved (the shop refuses it itself).
    let passed = transfer(&world.agent, world.gateway.proxy, "alice", 100)
        .header("Countersign_Tokens", "forged.token.value")
        .header("countersign-tokens", "forged.token.value")
        .send()
        .await
        .unwrap();
    assert_eq!(passed.status(), 401);
    let arrived = transfers(&world.shop);
    assert_eq!(arrived.len(), 2);
    assert!(arrived[1].headers.get("countersign-tokens").is_none());
    assert!(arrived[1].headers.get("countersign_tokens").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_between_the_two_answers_still_forwards_once() {
    let (peer, shop, _dir, mut gateway) =
        flows::sqlite_gateway(Some("2s"), |store| GatewayOptions {
            extra_config: store,
            ..Default::default()
        })
        .await;
    let agent = reqwest::Client::new();
    let proxy = gateway.proxy;
    let first = tokio::spawn(transfer(&agent, proxy, "alice", 40_000).send());
    let lead = asked(&peer, LEAD).await;
    let alice = asked(&peer, "alice").await;
    peer.approve(id(&alice)).await;
    // alice's answer is taken and kept (her token in the store) ...
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while peer.request(id(&alice)).await["status"] != "redeemed" {
        assert!(
            std::time::Instant::now() < deadline,
            "alice's token was never taken"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // ... then the gateway dies before the countersigner answers.
    gateway.kill9();
    let _ = first.await;
    gateway.restart().await;
    peer.approve(id(&lead)).await;

    // The retry of the same call gets the one forward's answer.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let response = loop {
        let response = transfer(&agent, proxy, "alice", 40_000)
            .send()
            .await
            .unwrap();
        if response.status() != 202 {
            break response;
        }
        assert!(std::time::Instant::now() < deadline, "never forwarded");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(response.status(), 201);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["countersigned_by"], json!([LEAD]), "{body}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(transfers(&shop).len(), 1, "forwarded once");
    assert_eq!(peer.requests().await.len(), 2, "nobody asked twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_it_waits_the_status_says_who_has_not_answered_yet() {
    let world = World::start(GatewayOptions {
        extra_config: "approvals_path: /approvals".into(),
        ..Default::default()
    })
    .await;
    let call = tokio::spawn(transfer(&world.agent, world.gateway.proxy, "alice", 15_000).send());
    let lead = asked(&world.peer, LEAD).await;
    let alice = asked(&world.peer, "alice").await;
    // The binding names the call's approval: its status resource.
    let approval_id = alice["authorization_details"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["type"] == "countersign_call")
        .unwrap()["approval"]
        .as_str()
        .unwrap()
        .to_owned();
    world.peer.approve(id(&alice)).await;
    let status_url = world.gateway.url(&format!("/approvals/{approval_id}"));
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let status = loop {
        let status: Value =
            flows::json_of(world.agent.get(&status_url).header(USER_HEADER, "alice")).await;
        if status["approvers"][0]["state"] == "approved" {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "{status}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        status["approvers"],
        json!([
            { "subject": "alice", "role": "requester", "state": "approved" },
            { "subject": LEAD, "role": "countersigner", "state": "pending" },
        ]),
        "{status}"
    );
    // Only the person's own approvals are hers to read.
    let other = world
        .agent
        .get(&status_url)
        .header(USER_HEADER, LEAD)
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 404);
    world.peer.deny(id(&lead)).await;
    flows::problem(call.await.unwrap().unwrap(), 403, "access_denied").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_ping_mode_every_approver_is_notified_and_the_call_goes_at_once() {
    let port = support::free_port();
    let notify_url = format!("http://127.0.0.1:{port}/ciba/notification");
    // Polled every 30 s: only the notifications can make it quick.
    let peer = Peer::start_with(&[
        ("PEER_INTERVAL", "30"),
        ("PEER_PING_URL", notify_url.as_str()),
    ]);
    let shop = start_shop(&peer).await;
    let options = GatewayOptions {
        client: format!(
            "client_id: countersign-ping\n  client_auth: {{ method: client_secret_post, client_secret: countersign-secret }}\n  delivery: ping\n  notification: {{ listen: \"127.0.0.1:{port}\", safety_poll: 60s }}"
        ),
        ..GatewayOptions::default()
    };
    let gateway = support::TestGateway::start(&peer, &shop, options).await;
    let agent = reqwest::Client::new();
    let call = tokio::spawn(transfer(&agent, gateway.proxy, "alice", 12_000).send());
    let lead = asked(&peer, LEAD).await;
    let alice = asked(&peer, "alice").await;
    let started = std::time::Instant::now();
    peer.approve(id(&alice)).await;
    peer.approve(id(&lead)).await;
    let response = call.await.unwrap().unwrap();
    assert_eq!(response.status(), 201);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "answered after {:?}: not by the notifications",
        started.elapsed()
    );
    assert_eq!(transfers(&shop).len(), 1);
}
