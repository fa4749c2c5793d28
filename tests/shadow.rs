//! Shadow mode through the real gateway, the oidc-provider peer and the
//! example shop: a policy in `mode: shadow` (or a file under
//! `shadow_policies`) decides every call it matches, but the call goes on
//! as the enforced policies say; nobody is asked, and what it would have
//! done is counted and kept.

mod support;

use serde_json::{json, Value};
use support::{World, USER_HEADER};

const SHADOW: &str = r#"
  - name: shadow-browse
    mode: shadow
    match: { methods: [GET], path: /products }
    require: { scopes: [product:read], audience: https://shop.example/api }
    binding_message: "Show the products to {{user.sub}}"
  - name: shadow-big-buy
    mode: shadow
    match: { methods: [POST], path: /shop }
    when: "body.qty > 5"
    require: { scopes: [product:buy], audience: https://shop.example/api }
    binding_message: "Big order of {{qty}} {{product}}"
  - name: shadow-notes
    mode: shadow
    match: { methods: [POST], path: /memos }
    require: { scopes: [product:buy], audience: https://shop.example/api }
    binding_message: "Note {{title}}"
    body: { only: [title] }
"#;

async fn admin(world: &World, path: &str) -> Value {
    let url = format!("http://{}{path}", world.gateway.admin);
    support::flows::json_of(world.agent.get(url)).await
}

/// Shadow decisions are recorded off the call's path: wait for `count`.
async fn decisions(world: &World, count: usize) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let listing = admin(world, "/shadow-decisions?limit=1000").await;
        if listing["decisions"].as_array().map_or(0, Vec::len) >= count {
            return listing;
        }
        assert!(std::time::Instant::now() < deadline, "{listing}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_policy_under_load_asks_nobody_and_counts_what_it_would_have_asked() {
    let world = World::with_policies(SHADOW).await;
    let proxy = world.gateway.proxy;
    let mut calls = Vec::new();
    for i in 0..60 {
        let user = if i % 3 == 0 { "bob" } else { "alice" };
        let agent = world.agent.clone();
        calls.push(tokio::spawn(async move {
            agent
                .get(format!("http://{proxy}/products"))
                .header(USER_HEADER, user)
                .send()
                .await
                .unwrap()
                .status()
        }));
    }
    for call in calls {
        assert_eq!(call.await.unwrap(), 200, "the call went on as if unmatched");
    }
    assert!(
        world.peer.requests().await.is_empty(),
        "a shadow policy asked someone"
    );
    world
        .gateway
        .wait_metric(
            r#"countersign_shadow_decisions_total{decision="hold",policy="shadow-browse"} 60"#,
        )
        .await;
    let listing = decisions(&world, 60).await;
    let first = &listing["decisions"][0];
    assert_eq!(first["policy"], "shadow-browse");
    assert_eq!(first["decision"], "hold");
    assert!(
        first["binding_message"]
            .as_str()
            .unwrap()
            .starts_with("Show the products to "),
        "{first}"
    );
    assert_eq!(
        listing["prompts"],
        json!([
            { "policy": "shadow-browse", "subject": "alice", "day": listing["prompts"][0]["day"], "prompts": 40 },
            { "policy": "shadow-browse", "subject": "bob", "day": listing["prompts"][0]["day"], "prompts": 20 },
        ]),
        "{listing}"
    );
    let bob = admin(&world, "/shadow-decisions?subject=bob").await;
    assert_eq!(bob["decisions"].as_array().unwrap().len(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_call_is_decided_by_the_shadow_set_too_without_a_second_prompt() {
    let world = World::with_policies(SHADOW).await;
    // Enforced: buy-product holds it. Shadow: qty 2 is not big, it passes.
    let call = tokio::spawn(world.buy("alice", support::phones()).send());
    let pending = world.peer.wait_pending(Some("alice"), 1).await;
    assert_eq!(
        pending[0]["binding_message"],
        "Do you want to buy 2 XYZ phone"
    );
    world.peer.approve_request(&pending[0]).await;
    assert_eq!(call.await.unwrap().unwrap().status(), 200);
    let listing = decisions(&world, 1).await;
    assert_eq!(listing["decisions"][0]["policy"], "shadow-big-buy");
    assert_eq!(listing["decisions"][0]["decision"], "pass");
    assert_eq!(
        world.peer.requests().await.len(),
        1,
        "one prompt: the enforced one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_refusal_never_changes_the_call() {
    let world = World::with_policies(SHADOW).await;
    let proxy = world.gateway.proxy;
    let post = |body: String, content_type: &'static str| {
        world
            .agent
            .post(format!("http://{proxy}/memos"))
            .header(USER_HEADER, "alice")
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    // A field the shadow policy does not show: it would refuse; the call
    // passes (no enforced policy covers /notes) with its body intact.
    let sent = json!({ "title": "hi", "secret": "x" }).to_string();
    let json = "application/json";
    assert_eq!(post(sent.clone(), json).await.unwrap().status(), 404);
    // Whatever the shadow policy read, the upstream gets every byte.
    let received = world.shop.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].body, sent.as_bytes());
    let listing = decisions(&world, 1).await;
    assert_eq!(listing["decisions"][0]["decision"], "refuse");
    assert_eq!(listing["decisions"][0]["problem_code"], "invalid_body");
    assert!(world.peer.requests().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_policy_file_runs_in_shadow_next_to_the_live_one() {
    let dir = tempfile::tempdir().unwrap();
    let candidate = dir.path().join("candidate.yaml");
    // Written as it would be enforced: no `mode` in it.
    std::fs::write(
        &candidate,
        "policies:\n  - name: candidate-browse\n    match: { methods: [GET], path: /products }\n    require: { scopes: [product:read], audience: https://shop.example/api }\n    binding_message: \"Browse\"\n",
    )
    .unwrap();
    let world = World::builder()
        .config(format!("shadow_policies: [\"{}\"]", candidate.display()))
        .start()
        .await;
    let response = world.get_as("carol", "/products").send().await.unwrap();
    assert_eq!(response.status(), 200);
    let listing = decisions(&world, 1).await;
    assert_eq!(listing["decisions"][0]["policy"], "candidate-browse");
    assert_eq!(listing["decisions"][0]["subject"], "carol");
    assert!(world.peer.requests().await.is_empty());
    // The command line answers the same question from the same store.
    let stdout = world.approvals_stdout(&["list", "--shadow"]);
    let counts = stdout
        .lines()
        .find(|l| l.starts_with("candidate-browse"))
        .unwrap_or_else(|| panic!("{stdout}"));
    let columns: Vec<&str> = counts.split_whitespace().collect();
    assert_eq!(columns[1], "carol", "{stdout}");
    assert_eq!(columns[3], "1", "{stdout}");
}
