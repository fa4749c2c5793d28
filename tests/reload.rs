//! Hot reload through the real gateway: a changed policy file takes effect
//! for new calls (file watching, SIGHUP), a held call finishes under the
//! policy it matched, a broken edit keeps the running policies, and changes
//! that need a restart are reported, not applied.

mod support;

use std::path::Path;

use support::process::GatewayProcess;
use support::world::wait_metric;
use support::*;

/// `/vouchers`: approval above `threshold`, requiring `scopes`.
fn vouchers(threshold: u32, version: &str, scopes: &str) -> String {
    format!(
        r#"policies:
  - name: voucher
    match: {{ methods: [POST], path: /vouchers }}
    when: "body.amount > {threshold}"
    require: {{ scopes: [{scopes}], audience: https://shop.example/api }}
    binding_message: "Voucher {{{{amount}}}} {version}"
"#
    )
}

const INITIAL: &str = r#"  - name: voucher
    match: { methods: [POST], path: /vouchers }
    when: "body.amount > 100"
    require: { scopes: [product:buy], audience: https://shop.example/api }
    binding_message: "Voucher {{amount}} v1"
"#;

/// Replaces a file the way editors do: write a new one, rename it over.
fn replace(path: &Path, text: &str) {
    let temporary = path.with_extension("yaml.tmp");
    std::fs::write(&temporary, text).unwrap();
    std::fs::rename(&temporary, path).unwrap();
}

fn reloads(result: &str, count: u32) -> String {
    format!(r#"countersign_config_reload_total{{result="{result}"}} {count}"#)
}

fn last_good_load(metrics: &str) -> i64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("countersign_config_last_reload_success_timestamp_seconds "))
        .expect("the last good load gauge")
        .parse()
        .unwrap()
}

fn voucher(agent: &reqwest::Client, url: String, amount: u32) -> reqwest::RequestBuilder {
    agent
        .post(url)
        .header(USER_HEADER, "alice")
        .header("content-type", "application/json")
        .body(format!(r#"{{"amount": {amount}}}"#))
}

async fn world() -> World {
    World::builder()
        .all_scopes()
        .policies(INITIAL)
        .start()
        .await
}

#[tokio::test]
async fn an_edit_applies_to_new_calls_while_a_held_call_keeps_its_policy() {
    let world = world().await;
    let metrics = || world.gateway.metrics();
    let started = last_good_load(&metrics().await);
    assert!(started > 0);
    let url = || world.gateway.url("/vouchers");

    // Held under v1.
    let held = tokio::spawn(voucher(&world.agent, url(), 500).send());
    let pending = world.peer.wait_pending(Some("alice"), 1).await;
    assert_eq!(pending[0]["binding_message"], "Voucher 500 v1");
    let first = pending[0]["auth_req_id"].as_str().unwrap().to_owned();
    // Under v1, 50 passes.
    let response = voucher(&world.agent, url(), 50).send().await.unwrap();
    assert_eq!(response.status(), 404, "passed to the shop");

    // v2: a lower threshold, and a scope the first approval was not asked for.
    replace(
        &world.gateway.dir().join("extra.yaml"),
        &vouchers(10, "v2", "product:buy, payments:transfer"),
    );
    let text = wait_metric(metrics, &reloads("ok", 1)).await;
    assert!(last_good_load(&text) >= started);

    // New calls follow v2: 50 is held now, with the new message.
    let second = tokio::spawn(voucher(&world.agent, url(), 50).send());
    let pending = world.peer.wait_pending(Some("alice"), 2).await;
    let new = pending
        .iter()
        .find(|r| r["auth_req_id"] != first.as_str())
        .unwrap();
    assert_eq!(new["binding_message"], "Voucher 50 v2");
    assert!(new["scope"].as_str().unwrap().contains("payments:transfer"));

    // The first call finishes under v1: approved for product:buy only, it
    // is forwarded (v2 would refuse it for the missing payments:transfer).
    world.peer.approve(&first).await;
    let response = held.await.unwrap().unwrap();
    assert_eq!(response.status(), 404, "forwarded to the shop");
    let forwarded = world.shop.received();
    assert_eq!(forwarded.len(), 2, "the v1 pass and the approved call");
    assert_eq!(
        forwarded[1].claims.as_ref().expect("a verified token")["sub"],
        "alice"
    );

    world.peer.deny(new["auth_req_id"].as_str().unwrap()).await;
    let response = second.await.unwrap().unwrap();
    assert_eq!(response.status(), 403);
}

#[tokio::test]
async fn a_broken_edit_keeps_the_running_policies() {
    let world = world().await;
    let metrics = || world.gateway.metrics();
    let extra = world.gateway.dir().join("extra.yaml");
    let started = last_good_load(&metrics().await);
    // A condition that does not compile.
    replace(
        &extra,
        &vouchers(10, "v2", "product:buy").replace("body.amount > 10", "body.amount >"),
    );
    let text = wait_metric(metrics, &reloads("error", 1)).await;
    assert!(
        text.contains(r#"countersign_config_reload_total{result="ok"} 0"#),
        "nothing was applied: {text}"
    );
    assert_eq!(last_good_load(&text), started);
    // The running set is v1: 50 passes, 500 is held with v1's message.
    let url = world.gateway.url("/vouchers");
    let response = voucher(&world.agent, url.clone(), 50).send().await.unwrap();
    assert_eq!(response.status(), 404);
    let asked = world
        .peer
        .asked_and_denied("alice", voucher(&world.agent, url.clone(), 500))
        .await;
    assert_eq!(asked["binding_message"], "Voucher 500 v1");

    // Two policies on one route in an order that cannot work: refused too.
    let unreachable = format!(
        "{}  - {{ name: late, match: {{ methods: [POST], path: /vouchers }}, require: {{ scopes: [product:buy] }}, binding_message: Late }}\n",
        vouchers(10, "v2", "product:buy").replace("    when: \"body.amount > 10\"\n", "")
    );
    replace(&extra, &unreachable);
    wait_metric(metrics, &reloads("error", 2)).await;

    // Fixed: applied.
    replace(&extra, &vouchers(10, "v3", "product:buy"));
    wait_metric(metrics, &reloads("ok", 1)).await;
    let asked = world
        .peer
        .asked_and_denied("alice", voucher(&world.agent, url, 50))
        .await;
    assert_eq!(asked["binding_message"], "Voucher 50 v3");
}

#[tokio::test]
async fn sighup_reloads_the_binary_and_restart_only_changes_are_reported() {
    let peer = Peer::start();
    let shop = start_shop(&peer).await;
    let options = GatewayOptions {
        extra_policies: INITIAL,
        extra_config: "store: memory".to_owned(),
        ..GatewayOptions::default()
    };
    let mut gateway = GatewayProcess::start(&peer, &shop, options).await;
    let agent = reqwest::Client::new();
    let metrics = || gateway.metrics();

    // A SIGHUP with nothing changed reloads, and the process lives on.
    gateway.sighup();
    wait_metric(metrics, &reloads("ok", 1)).await;
    assert!(gateway.is_running());

    // An edit and SIGHUP at once: applied by the signal.
    std::fs::write(
        gateway.dir().join("extra.yaml"),
        vouchers(10, "v2", "product:buy"),
    )
    .unwrap();
    gateway.sighup();
    wait_metric(|| gateway.metrics(), &reloads("ok", 2)).await;
    let asked = peer
        .asked_and_denied("alice", voucher(&agent, gateway.url("/vouchers"), 50))
        .await;
    assert_eq!(asked["binding_message"], "Voucher 50 v2");
    let logs = gateway.logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("configuration reloaded") && l.contains("SIGHUP")),
        "{logs}"
    );

    // A broken edit: the log names the file, line and key.
    let extra = gateway.dir().join("extra.yaml");
    std::fs::write(
        &extra,
        vouchers(10, "v3", "product:buy").replace("body.amount > 10", "amount > 10"),
    )
    .unwrap();
    gateway.sighup();
    wait_metric(|| gateway.metrics(), &reloads("error", 1)).await;
    let logs = gateway.logs();
    let expected = format!("{}:4:5: policies[0].when", extra.display());
    assert!(
        logs.lines()
            .any(|l| l.contains("reload failed") && l.contains(&expected)),
        "{expected} in {logs}"
    );

    // A change that needs a restart, with a policy edit: nothing applied.
    std::fs::write(&extra, vouchers(1000, "v4", "product:buy")).unwrap();
    let config = std::fs::read_to_string(&gateway.config).unwrap();
    std::fs::write(
        &gateway.config,
        config.replace("max_hold: 60s", "max_hold: 30s"),
    )
    .unwrap();
    gateway.sighup();
    wait_metric(|| gateway.metrics(), &reloads("restart_required", 1)).await;
    let logs = gateway.logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("need a restart") && l.contains("limits")),
        "{logs}"
    );
    // v2 still runs: 60 is held (v4 would pass it). (Not 50 again: that
    // call would attach to its denied approval.)
    let held = voucher(&agent, gateway.url("/vouchers"), 60);
    let asked = peer.asked_and_denied("alice", held).await;
    assert_eq!(asked["binding_message"], "Voucher 60 v2");
    assert!(gateway.is_running());
}
