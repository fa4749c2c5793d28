//! The audit trail: the admin listener's `/approvals` and the
//! `countersign approvals` command show what was asked and decided, never
//! bodies, headers or `auth_req_id`s.

mod support;

use serde_json::Value;
use support::*;

const APPROVAL_ID: &str = "x-countersign-approval-id";
const MESSAGE: &str = "Do you want to buy 2 XYZ phone";

async fn admin_get(world: &World, path: &str) -> (u16, Value) {
    let response = reqwest::get(format!("http://{}{path}", world.gateway.admin))
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// Makes one held call for `user` and decides it; returns its approval id.
async fn decided_call(world: &World, user: &str, approve: bool) -> String {
    let call = tokio::spawn(world.buy(user, phones()).send());
    if approve {
        world.peer.approve_next(user).await;
    } else {
        world.peer.deny_next(user).await;
    }
    let response = call.await.unwrap().unwrap();
    assert_eq!(response.status().is_success(), approve, "{response:?}");
    response.headers()[APPROVAL_ID].to_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn operators_see_what_was_asked_and_decided() {
    let world = World::start(GatewayOptions::default()).await;
    let approved = decided_call(&world, "alice", true).await;
    let denied = decided_call(&world, "bob", false).await;
    assert_ne!(approved, denied);

    let (status, list) = admin_get(&world, "/approvals?state=denied").await;
    assert_eq!(status, 200, "{list}");
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    let entry = &list[0];
    assert_eq!(entry["id"], denied.as_str());
    assert_eq!(entry["state"], "denied");
    assert_eq!(entry["subject"], "bob");
    assert_eq!(entry["binding_message"], MESSAGE);
    assert_eq!(entry["request"]["method"], "POST");
    assert_eq!(entry["request"]["path_and_query"], "/shop");
    assert!(entry["decided_at_ms"].as_i64().is_some(), "{entry}");
    assert!(entry.get("body").is_none(), "{entry}");
    assert!(entry["request"].get("body").is_none(), "{entry}");
    assert!(entry["request"].get("headers").is_none(), "{entry}");
    assert!(entry.get("auth_req_id").is_none(), "{entry}");

    let (status, all) = admin_get(&world, "/approvals").await;
    assert_eq!(status, 200);
    let ids: Vec<_> = all.as_array().unwrap().iter().map(|e| &e["id"]).collect();
    assert_eq!(ids, [denied.as_str(), approved.as_str()], "newest first");

    let (status, one) = admin_get(&world, &format!("/approvals/{approved}")).await;
    assert_eq!(status, 200, "{one}");
    assert_eq!(one["id"], approved.as_str());
    assert_eq!(one["state"], "done");
    assert_eq!(one["response_status"], 200);
    // The held call was given the order: delivered. A denial has no answer
    // to deliver.
    assert!(one["delivered_at_ms"].as_i64().is_some(), "{one}");
    assert!(entry["delivered_at_ms"].is_null(), "{entry}");

    let (status, _) = admin_get(&world, "/approvals/no-such-approval").await;
    assert_eq!(status, 404);
    let (status, error) = admin_get(&world, "/approvals?state=maybe").await;
    assert_eq!(status, 400);
    assert!(
        error["error"].as_str().unwrap().contains("state"),
        "{error}"
    );

    // The command reads the same store (SQLite's WAL lets it read while
    // the gateway runs).
    let stdout = world.approvals_stdout(&["list"]);
    assert!(
        stdout.contains(&approved) && stdout.contains(&denied),
        "{stdout}"
    );

    let shown: Value = serde_json::from_str(&world.approvals_stdout(&["show", &denied])).unwrap();
    assert_eq!(&shown, entry);

    let output = world.approvals_command(&["show", "no-such-approval"]);
    assert_eq!(output.status.code(), Some(1));
}
