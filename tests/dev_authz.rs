//! The gateway's CIBA client against `countersign dev`'s development
//! authorization server: the same cases as against oidc-provider
//! (tests/approval.rs), plus the dev server's own strictness. Approvals are
//! given through the HTTP endpoints the approver page's buttons use.
//!
//! Multi-thread runtimes: the dev server runs on the test's runtime while
//! the gateway's start blocks a worker on its discovery call.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use countersign::ciba::{self, AuthorizeRequest, CibaClient, CibaError, PollAnswer};
use countersign::demo::shop::SHOP_AUDIENCE;
use countersign::dev::{AuthzOptions, DEV_CLIENT_ID, DEV_CLIENT_SECRET};
use countersign::metrics::Metrics;
use serde_json::{json, Value};
use support::*;

fn fast() -> AuthzOptions {
    AuthzOptions {
        interval: Duration::from_secs(1),
        ..AuthzOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approved_call_reaches_the_shop_with_a_token_of_the_dev_server() {
    let world = DevWorld::start_with(GatewayOptions::dev(), fast()).await;
    let body = serde_json::to_vec(&phones()).unwrap();
    let call = tokio::spawn(
        world
            .agent
            .post(world.gateway.url("/shop"))
            .header(USER_HEADER, "alice")
            .header("authorization", "Bearer agent-own-credential")
            .header("content-type", "application/json")
            .body(body.clone())
            .send(),
    );
    let pending = world.wait_pending("alice", 1).await;
    let request = &pending[0];
    assert_eq!(request.binding_message, "Do you want to buy 2 XYZ phone");
    assert_eq!(request.client_id, DEV_CLIENT_ID);
    assert!(request.scopes.iter().any(|s| s == "product:buy"));
    assert_eq!(request.audience.as_deref(), Some(SHOP_AUDIENCE));
    assert_eq!(
        request.expires_in_s, 60,
        "the policy's requested_expiry (2m), capped by max_hold"
    );
    assert_eq!(
        request.authorization_details.as_ref().map(without_binding),
        Some(
            json!([{"type": "product_purchase", "product": "XYZ phone", "quantity": 2, "price_limit": 900}])
        )
    );
    assert!(world.shop.received().is_empty(), "held until approved");
    world.approve(&request.id).await;

    let response = call.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    let order: Value = response.json().await.unwrap();
    assert_eq!(order["status"], "confirmed");
    assert_eq!(order["buyer"], "alice");

    let received = world.shop.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].body.as_ref(), body.as_slice(), "the exact body");
    assert_ne!(received[0].bearer(), Some("agent-own-credential"));
    let claims = received[0]
        .claims
        .as_ref()
        .expect("the token verified against the dev server's JWKS");
    assert_eq!(claims["iss"], world.authz.issuer());
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["aud"], SHOP_AUDIENCE);
    assert_eq!(claims["client_id"], DEV_CLIENT_ID);
    assert!(claims["scope"]
        .as_str()
        .unwrap()
        .split(' ')
        .any(|s| s == "product:buy"));
    assert!(claims["jti"].is_string() && claims["exp"].is_u64());
    assert_eq!(claims["authorization_details"][0]["quantity"], 2);

    let done = world.request(&request.id);
    assert_eq!(done.slow_downs, 0, "the gateway never polls too fast");
    assert_eq!(done.state, "approved");
    // Single use: the page cannot answer twice.
    assert_eq!(world.decide(&request.id, "deny").await.status(), 409);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_call_never_reaches_the_shop() {
    let world = DevWorld::start_with(GatewayOptions::dev(), fast()).await;
    let call = tokio::spawn(world.buy("bob", phones()).send());
    let pending = world.wait_pending("bob", 1).await;
    world.deny(&pending[0].id).await;
    let body = flows::problem_json(call.await.unwrap().unwrap(), 403, "access_denied").await;
    assert_eq!(body["detail"], "The user has denied the request.");
    assert!(world.shop.received().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_request_expires_and_is_not_a_denial() {
    let world = DevWorld::start_with(
        GatewayOptions {
            extra_policies: FLASH_SALE,
            ..GatewayOptions::dev()
        },
        fast(),
    )
    .await;
    let started = Instant::now();
    let response = world
        .agent
        .post(world.gateway.url("/flash"))
        .header(USER_HEADER, "alice")
        .json(&phones())
        .send()
        .await
        .unwrap();
    flows::problem_json(response, 408, "approval_expired").await;
    assert!(started.elapsed() >= Duration::from_secs(2));
    // The gateway gives up once its next poll would be too late; the server
    // expires the request at exactly 3 s.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let requests = world.authz.requests();
    assert_eq!(requests[0].expires_in_s, 3, "requested_expiry honoured");
    assert_eq!(requests[0].state, "expired");
    assert!(world.shop.received().is_empty());
    // Too late for the approver, too.
    assert_eq!(world.decide(&requests[0].id, "approve").await.status(), 409);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_down_adds_five_seconds_to_every_later_poll() {
    let world = DevWorld::start_with(GatewayOptions::dev(), fast()).await;
    let call = tokio::spawn(world.buy("alice", phones()).send());
    let id = world.wait_pending("alice", 1).await[0].id.clone();
    assert!(world.authz.force_slow_down(&id));

    // The first poll (at ~1 s) gets slow_down; the next must wait 6 s.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        world.request(&id).polls,
        1,
        "no poll within 6 s of slow_down"
    );
    world.approve(&id).await;

    assert_eq!(call.await.unwrap().unwrap().status(), 200);
    let done = world.request(&id);
    assert_eq!(done.slow_downs, 1, "only the forced slow_down: {done:?}");
    assert_eq!(done.poll_offsets_ms.len(), 2, "{done:?}");
    let gap = done.poll_offsets_ms[1] - done.poll_offsets_ms[0];
    assert!((5_900..8_000).contains(&gap), "second poll after {gap} ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_user_gets_a_clear_answer() {
    let world = DevWorld::start(GatewayOptions::dev()).await;
    let response = world.buy("mallory", phones()).send().await.unwrap();
    flows::problem_json(response, 400, "unknown_user").await;
    assert!(world.authz.requests().is_empty());
    assert!(world.shop.received().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_secret_basic_authenticates_too() {
    let world = DevWorld::start_with(
        GatewayOptions {
            client: DEV_CLIENT_BASIC.to_owned(),
            ..GatewayOptions::dev()
        },
        fast(),
    )
    .await;
    let call = tokio::spawn(world.buy("bob", phones()).send());
    let pending = world.wait_pending("bob", 1).await;
    world.approve(&pending[0].id).await;
    assert_eq!(call.await.unwrap().unwrap().status(), 200);
}

/// The gateway refuses a message it cannot send; the dev server refuses
/// one the gateway's client does send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_binding_messages_are_refused() {
    let world = DevWorld::start(GatewayOptions::dev()).await;
    let long =
        json!({"product": "a very long product name that will not fit in a message", "qty": 2});
    flows::problem_json(
        world.buy("alice", long).send().await.unwrap(),
        400,
        "invalid_binding_message",
    )
    .await;
    assert!(world.authz.requests().is_empty(), "nobody was asked");

    let client = ciba_client(world.authz.issuer()).await;
    let scopes = vec!["product:buy".to_owned()];
    let mut request = shop_request("alice", "Approve <all>!", &scopes);
    let refused = client.authorize(&request).await.unwrap_err();
    assert!(
        matches!(refused, CibaError::InvalidBindingMessage(_)),
        "{refused}"
    );
    request.binding_message = "Buy 2 phones";
    request.subject = "mallory";
    let refused = client.authorize(&request).await.unwrap_err();
    assert!(matches!(refused, CibaError::UnknownUser), "{refused}");
}

/// The client side of the polling rules, without the gateway's schedule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_polling_too_fast_is_slowed_down_and_ids_are_single_use() {
    let world = DevWorld::start(GatewayOptions::dev()).await;
    let client = ciba_client(world.authz.issuer()).await;
    let scopes = vec!["product:buy".to_owned()];
    let request = shop_request("alice", "Buy 2 phones", &scopes);
    let authorization = client.authorize(&request).await.unwrap();
    assert_eq!(authorization.interval, Some(Duration::from_secs(2)));
    assert_eq!(authorization.expires_in, Duration::from_secs(30));
    assert!(matches!(
        client.poll(&authorization.auth_req_id).await,
        PollAnswer::SlowDown
    ));
    let page = world.wait_pending("alice", 1).await[0].id.clone();
    assert_eq!(world.request(&page).interval_s, 7, "+5 s for good");
    world.approve(&page).await;
    tokio::time::sleep(Duration::from_secs(7)).await;
    let answer = client.poll(&authorization.auth_req_id).await;
    let PollAnswer::Approved(grant) = answer else {
        panic!("expected a token, got {answer:?}");
    };
    assert!(grant.scope.unwrap().contains("product:buy"));
    tokio::time::sleep(Duration::from_secs(7)).await;
    // A redeemed auth_req_id is spent (the gateway reads it as expired).
    assert!(matches!(
        client.poll(&authorization.auth_req_id).await,
        PollAnswer::Expired
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dev_server_answers_bad_requests_with_oauth_errors() {
    let world = DevWorld::start(GatewayOptions::dev()).await;
    let issuer = world.authz.issuer().to_owned();
    let http = reqwest::Client::new();

    let discovery: Value =
        flows::json_of(http.get(format!("{issuer}/.well-known/openid-configuration"))).await;
    assert_eq!(discovery["issuer"], issuer.as_str());
    assert_eq!(
        discovery["grant_types_supported"],
        json!(["urn:openid:params:grant-type:ciba"])
    );
    assert_eq!(
        discovery["backchannel_token_delivery_modes_supported"],
        json!(["poll"])
    );
    let jwks: Value = flows::json_of(http.get(discovery["jwks_uri"].as_str().unwrap())).await;
    assert_eq!(jwks["keys"][0]["kty"], "RSA");
    assert!(jwks["keys"][0]["n"].is_string() && jwks["keys"][0]["e"] == "AQAB");
    assert!(jwks["keys"][0].get("d").is_none(), "no private parts");

    let bc = format!("{issuer}/bc-authorize");
    let token = format!("{issuer}/oauth/token");
    fn form<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        let mut form = vec![
            ("client_id", DEV_CLIENT_ID),
            ("client_secret", DEV_CLIENT_SECRET),
        ];
        form.extend_from_slice(extra);
        form
    }
    let error_of = |response: reqwest::Response| async move {
        let status = response.status().as_u16();
        assert_eq!(response.headers()["cache-control"], "no-store");
        let body: Value = response.json().await.unwrap();
        (
            status,
            body["error"].as_str().unwrap_or_default().to_owned(),
        )
    };
    /// Endpoint, form, expected status and `error`.
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, u16, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (
            &bc,
            vec![("client_id", DEV_CLIENT_ID), ("client_secret", "wrong")],
            401,
            "invalid_client",
        ),
        (
            &bc,
            form(&[
                ("scope", "product:buy"),
                ("login_hint", "alice"),
                ("binding_message", "Hi"),
            ]),
            400,
            "invalid_scope",
        ),
        (
            &bc,
            form(&[("scope", "openid"), ("binding_message", "Hi")]),
            400,
            "invalid_request",
        ),
        (
            &bc,
            form(&[
                ("scope", "openid"),
                ("login_hint", "{not json"),
                ("binding_message", "Hi"),
            ]),
            400,
            "invalid_request",
        ),
        (
            &bc,
            form(&[
                ("scope", "openid"),
                ("login_hint", "mallory"),
                ("binding_message", "Hi"),
            ]),
            400,
            "unknown_user_id",
        ),
        (
            &bc,
            form(&[
                ("scope", "openid"),
                ("login_hint", "alice"),
                ("binding_message", "Hi\nthere"),
            ]),
            400,
            "invalid_binding_message",
        ),
        (
            &bc,
            form(&[
                ("scope", "openid"),
                ("login_hint", "alice"),
                ("binding_message", "Hi"),
                ("audience", "https://evil.example/"),
            ]),
            400,
            "invalid_target",
        ),
        (
            &bc,
            form(&[
                ("scope", "openid"),
                ("login_hint", "alice"),
                ("binding_message", "Hi"),
                ("authorization_details", "{\"type\":1}"),
            ]),
            400,
            "invalid_authorization_details",
        ),
        (
            &bc,
            form(&[
                ("scope", "openid"),
                ("login_hint", "alice"),
                ("binding_message", "Hi"),
                ("requested_expiry", "-5"),
            ]),
            400,
            "invalid_request",
        ),
        (
            &token,
            form(&[("grant_type", "client_credentials")]),
            400,
            "unsupported_grant_type",
        ),
        (
            &token,
            form(&[
                ("grant_type", "urn:openid:params:grant-type:ciba"),
                ("auth_req_id", "forged"),
            ]),
            400,
            "invalid_grant",
        ),
    ];
    for (url, fields, status, error) in cases {
        let response = http.post(url).form(&fields).send().await.unwrap();
        assert_eq!(
            error_of(response).await,
            (status, error.to_owned()),
            "{url} {fields:?}"
        );
    }
    // One method of client authentication at a time.
    let both = http
        .post(&bc)
        .basic_auth(DEV_CLIENT_ID, Some(DEV_CLIENT_SECRET))
        .form(&form(&[("scope", "openid")]))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(both).await, (400, "invalid_request".to_owned()));
    // A repeated parameter is refused, not resolved either way.
    let twice = http
        .post(&bc)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("client_id={DEV_CLIENT_ID}&client_secret={DEV_CLIENT_SECRET}&scope=openid&login_hint=alice&login_hint=bob&binding_message=Hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(twice).await, (400, "invalid_request".to_owned()));
    // The login_hint of Auth0 works too.
    let hint = json!({"format": "iss_sub", "iss": format!("{issuer}/"), "sub": "bob"}).to_string();
    let ok = http
        .post(&bc)
        .form(&form(&[
            ("scope", "openid"),
            ("login_hint", &hint),
            ("binding_message", "Hi"),
        ]))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let ok: Value = ok.json().await.unwrap();
    assert_eq!(ok["interval"], 2);
    assert_eq!(ok["expires_in"], 300);
    assert!(world.authz.requests().iter().all(|r| r.subject == "bob"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_approver_page_is_served_safely() {
    let world = DevWorld::start(GatewayOptions::dev()).await;
    let issuer = world.authz.issuer();
    let page = reqwest::get(format!("{issuer}/approve?user=alice"))
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    let html = page.text().await.unwrap();
    assert!(html.contains("Development only"));

    let listing: Value = reqwest::get(format!("{issuer}/api/requests"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listing["user"], "alice", "the first user by default");
    assert_eq!(listing["users"], json!(["alice", "bob"]));
    let unknown = reqwest::get(format!("{issuer}/api/requests?user=mallory"))
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);

    // A form post (what another site could make the browser send) is refused.
    let form_post = reqwest::Client::new()
        .post(format!("{issuer}/api/requests/x/approve"))
        .form(&[("a", "b")])
        .send()
        .await
        .unwrap();
    assert_eq!(form_post.status(), 415);
    // DNS rebinding: a foreign Host is refused.
    let (status, _) = raw_request(
        world.authz.addr,
        "GET /api/requests HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 421);
}

/// A CIBA request for the shop's audience that expires in 30 s.
fn shop_request<'a>(
    subject: &'a str,
    binding_message: &'a str,
    scopes: &'a [String],
) -> AuthorizeRequest<'a> {
    AuthorizeRequest {
        client_notification_token: None,
        subject,
        binding_message,
        scopes,
        audience: Some(SHOP_AUDIENCE),
        authorization_details: None,
        requested_expiry: Some(Duration::from_secs(30)),
    }
}

async fn ciba_client(issuer: &str) -> CibaClient {
    let text = client_only_config(issuer, &format!("{DEV_CLIENT_POST}\n  login_hint: subject"));
    let config = countersign::config::load_str(Path::new("client.yaml"), &text).unwrap();
    let server = &config.gateway.authorization_server;
    let http = reqwest::Client::new();
    let endpoints = ciba::resolve_endpoints(&http, server).await.unwrap();
    CibaClient::new(http, endpoints, server, Metrics::new()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_binds_tokens_to_the_gateways_dpop_key() {
    // As `countersign dev` runs: `token_binding: dpop` with a key of its own.
    let pem = countersign::dpop::DpopKey::generate_pem();
    let key = countersign::dpop::DpopKey::from_pem(&pem).unwrap();
    let options = GatewayOptions {
        client: format!(
            "{DEV_CLIENT_POST}\n  token_binding: dpop\n  dpop_key: {}",
            serde_json::to_string(&pem).unwrap()
        ),
        ..GatewayOptions::dev()
    };
    let world = DevWorld::start_with(options, fast()).await;
    let call = tokio::spawn(world.buy("alice", phones()).send());
    let pending = world.wait_pending("alice", 1).await;
    world.approve(&pending[0].id).await;
    let response = call.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);

    let received = world.shop.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].refused, None, "the shop's verifier took it");
    let authorization = received[0].headers["authorization"].to_str().unwrap();
    assert!(authorization.starts_with("DPoP "), "{authorization}");
    let claims = received[0].claims.as_ref().unwrap();
    assert_eq!(claims["cnf"]["jkt"], key.thumbprint());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dev_server_refuses_a_dpop_proof_for_another_endpoint() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let authz = countersign::dev::authz::serve(listener, fast())
        .await
        .unwrap();
    let key = countersign::dpop::DpopKey::generate();
    let response = reqwest::Client::new()
        .post(format!("{}/oauth/token", authz.issuer()))
        .header(
            "dpop",
            key.proof(
                "POST",
                &format!("{}/bc-authorize", authz.issuer()),
                None,
                false,
            ),
        )
        .form(&[
            ("grant_type", "urn:openid:params:grant-type:ciba"),
            ("auth_req_id", "unknown"),
            ("client_id", DEV_CLIENT_ID),
            ("client_secret", DEV_CLIENT_SECRET),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "invalid_dpop_proof", "{body}");
}

/// The claims of a compact JWS, unverified (the shop verified it).
fn payload(jwt: &str) -> Value {
    use base64::Engine as _;
    let part = jwt.split('.').nth(1).expect("a compact JWS");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

/// `countersign dev`'s world, where alice's transfer of `amount` to carol
/// (held in the returned task) is waiting for bob and for her: the call,
/// bob's request and alice's.
async fn four_eyes_transfer(
    amount: u64,
) -> (
    DevWorld,
    tokio::task::JoinHandle<reqwest::Result<reqwest::Response>>,
    countersign::dev::authz::RequestInfo,
    countersign::dev::authz::RequestInfo,
) {
    let world = DevWorld::start_as_dev_mode(fast()).await;
    let call = tokio::spawn(world.transfer("alice", amount, "carol").send());
    let bob = world.wait_pending("bob", 1).await.remove(0);
    let alice = world.wait_pending("alice", 1).await.remove(0);
    (world, call, bob, alice)
}

/// Four eyes as `countersign dev` runs it (its own configuration and
/// embedded policies): a large transfer asks alice and bob, each with their
/// own message; the approver page's listing shows each who else was asked
/// for the same call; the shop gets the call once both approved, with bob's
/// token in `Countersign-Tokens`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_four_eyes_a_large_transfer_needs_alice_and_bob() {
    let (world, call, bob, alice) = four_eyes_transfer(20_000).await;
    assert_eq!(
        bob.binding_message,
        "Countersign: alice sends 20000 to carol"
    );
    assert_eq!(alice.binding_message, "LARGE transfer of 20000 to carol");
    for request in [&alice, &bob] {
        assert!(request.scopes.iter().any(|s| s == "payments:transfer"));
        assert_eq!(request.audience.as_deref(), Some(SHOP_AUDIENCE));
        // The dev policy's 5m, within dev mode's max_hold.
        assert!((295..=300).contains(&request.expires_in_s), "{request:?}");
    }
    assert_eq!(
        alice.authorization_details, bob.authorization_details,
        "the same call binding for both"
    );
    without_binding(alice.authorization_details.as_ref().unwrap());

    // What the approver page shows each of them.
    let listing = world.listing("bob").await;
    let shown = &listing["requests"][0];
    assert_eq!(shown["id"], bob.id.as_str());
    assert_eq!(
        shown["binding_message"],
        "Countersign: alice sends 20000 to carol"
    );
    assert_eq!(
        shown["also_asked"],
        json!([{ "subject": "alice", "state": "pending" }])
    );

    world.approve(&alice.id).await;
    // Alice's answer alone is not enough: nothing reaches the shop.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(!call.is_finished(), "answered on a partial quorum");
    assert!(
        world.shop.received().is_empty(),
        "forwarded on a partial quorum"
    );
    let listing = world.listing("bob").await;
    assert_eq!(
        listing["requests"][0]["also_asked"],
        json!([{ "subject": "alice", "state": "approved" }])
    );
    world.approve(&bob.id).await;

    let response = call.await.unwrap().unwrap();
    assert_eq!(response.status(), 201);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["from"], "alice", "{body}");
    assert_eq!(body["countersigned_by"], json!(["bob"]), "{body}");
    assert_eq!(body["amount"], 20_000, "{body}");

    let received = world.shop.received();
    assert_eq!(received.len(), 1, "forwarded once");
    assert_eq!(received[0].refused, None, "the shop's verifier took it");
    assert_eq!(received[0].claims.as_ref().unwrap()["sub"], "alice");
    let tokens = received[0].headers["countersign-tokens"].to_str().unwrap();
    let tokens: Vec<&str> = tokens.split(',').map(str::trim).collect();
    assert_eq!(tokens.len(), 1, "{tokens:?}");
    let countersigned = payload(tokens[0]);
    assert_eq!(countersigned["sub"], "bob");
    assert_eq!(countersigned["iss"], world.authz.issuer());
    assert_eq!(
        countersigned["authorization_details"],
        received[0].claims.as_ref().unwrap()["authorization_details"],
        "the same call"
    );
    assert_eq!(
        world.authz.requests().len(),
        2,
        "nobody asked twice: {:?}",
        world.authz.requests()
    );
}

/// In dev mode a countersigner's no refuses the call, and a smaller
/// transfer needs the person alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_four_eyes_bobs_no_refuses_and_small_transfers_ask_the_person_only() {
    let (world, call, bob, alice) = four_eyes_transfer(15_000).await;
    world.approve(&alice.id).await;
    world.deny(&bob.id).await;
    let body = flows::problem_json(call.await.unwrap().unwrap(), 403, "access_denied").await;
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains("bob"), "{detail}");
    assert!(world.shop.received().is_empty());

    let call = tokio::spawn(world.transfer("bob", 700, "carol").send());
    let asked = world.wait_pending("bob", 1).await.remove(0);
    assert_eq!(asked.binding_message, "Transfer 700 to carol");
    let listing = world.listing("bob").await;
    let shown = listing["requests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == asked.id.as_str())
        .unwrap();
    assert_eq!(shown["also_asked"], json!([]), "nobody else");
    world.approve(&asked.id).await;
    let response = call.await.unwrap().unwrap();
    assert_eq!(response.status(), 201);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["countersigned_by"], json!([]), "{body}");
    assert_eq!(world.shop.received().len(), 1);
}

/// `countersign dev --tls` as a developer runs it: the real binary, its
/// printed text read as they would read it.
struct DevProcess {
    child: std::process::Child,
    printed: String,
}

impl Drop for DevProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl DevProcess {
    fn start(state_dir: &Path) -> Self {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_countersign"));
        command.args(["dev", "--state-dir"]).arg(state_dir);
        Self::start_with(command)
    }

    /// With the default state directory, under `home`.
    fn start_at_home(home: &Path) -> Self {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_countersign"));
        command
            .arg("dev")
            .env("HOME", home)
            .env_remove("XDG_STATE_HOME");
        Self::start_with(command)
    }

    /// `command` (the binary with `dev` and its first flags) with `--tls`.
    fn start_with(mut command: std::process::Command) -> Self {
        use std::process::Stdio;
        let mut child = command
            .args(["--tls", "--interval", "1"])
            .args(["--port", "0", "--authz-port", "0", "--shop-port", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let process = Self {
            child,
            printed: support::process::dev_mode_text(stdout, Duration::from_secs(60)),
        };
        // The text is printed as the gateway starts to listen.
        let port = process.gateway().rsplit(':').next().unwrap().to_owned();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(format!("127.0.0.1:{port}")).is_err() {
            assert!(Instant::now() < deadline, "the gateway never listened");
            std::thread::sleep(Duration::from_millis(50));
        }
        process
    }

    /// The first word after `label` on the line that starts with it.
    fn printed_after(&self, label: &str) -> String {
        self.printed
            .lines()
            .find_map(|l| l.trim_start().strip_prefix(label))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no {label:?} in:\n{}", self.printed))
            .to_owned()
    }

    fn gateway(&self) -> String {
        self.printed_after("gateway (agents call this)")
    }

    /// The CA's path: what follows the label up to the note in brackets.
    fn ca(&self) -> std::path::PathBuf {
        let label = "TLS: HTTP/2 and HTTP/1.1; its CA";
        self.printed
            .lines()
            .find_map(|l| l.trim_start().strip_prefix(label))
            .and_then(|rest| rest.trim_start().split("   (").next())
            .unwrap_or_else(|| panic!("no CA in:\n{}", self.printed))
            .into()
    }

    fn issuer(&self) -> String {
        self.printed_after("dev authorization server")
    }

    /// The printed curl command that starts with `curl` and calls `path`,
    /// with its continuation lines joined, as a shell reads it pasted.
    fn curl(&self, path: &str) -> String {
        let lines: Vec<&str> = self.printed.lines().map(str::trim).collect();
        let start = lines
            .iter()
            .position(|l| l.starts_with("curl ") && l.contains(path))
            .unwrap_or_else(|| panic!("no curl for {path} in:\n{}", self.printed));
        let mut command = String::new();
        for line in &lines[start..] {
            match line.strip_suffix('\\') {
                Some(part) => command.push_str(part),
                None => {
                    command.push_str(line);
                    break;
                }
            }
        }
        command
    }

    /// Approves `user`'s one pending request on the approver page's API.
    async fn approve_pending(&self, user: &str) {
        support::process::approve_dev_pending(&self.issuer(), user).await;
    }
}

/// Alice approves while `curl` (running the pasted `command`) is held;
/// curl then has the shop's 200, over HTTP/2, for the phone.
async fn approved_curl_buys(
    dev: &DevProcess,
    curl: tokio::task::JoinHandle<std::io::Result<std::process::Output>>,
    command: &str,
) {
    dev.approve_pending("alice").await;
    let output = curl.await.unwrap().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{command}: {output:?}");
    assert!(stdout.starts_with("HTTP/2 200"), "{stdout}");
    assert!(stdout.contains("\"product\":\"XYZ phone\""), "{stdout}");
}

/// A client that trusts the CA at `ca` and nothing else.
fn trusting_only(ca: &Path, http1: bool) -> reqwest::Client {
    let pem = std::fs::read(ca).unwrap();
    let builder = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap());
    let builder = if http1 { builder.http1_only() } else { builder };
    builder.build().unwrap()
}

/// A held call through `countersign dev --tls`, approved on the approver
/// page, answered to `client` with the shop's order.
async fn held_call_over(dev: &DevProcess, client: &reqwest::Client) -> reqwest::Version {
    let call = tokio::spawn(
        client
            .post(format!("{}/shop", dev.gateway()))
            .header("x-countersign-user", "alice")
            .json(&json!({"product": "XYZ phone", "qty": 2, "priceLimit": 900}))
            .send(),
    );
    dev.approve_pending("alice").await;
    let response = call.await.unwrap().unwrap();
    let version = response.version();
    assert_eq!(response.status(), 200);
    let order: Value = response.json().await.unwrap();
    assert_eq!(order["product"], "XYZ phone", "{order}");
    assert_eq!(order["qty"], 2, "{order}");
    version
}

/// `countersign dev --tls`: the gateway is `https://localhost:PORT`; a
/// client trusting only the printed CA completes a held call over HTTP/1.1
/// and over HTTP/2 (ALPN); a client without it cannot connect; and a second
/// run keeps the CA, so a client that trusted it still does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_over_tls_serves_held_calls_to_clients_trusting_its_ca() {
    let state = tempfile::tempdir().unwrap();
    let dev = DevProcess::start(state.path());
    let gateway = dev.gateway();
    assert!(gateway.starts_with("https://localhost:"), "{gateway}");
    let ca = dev.ca();
    assert_eq!(ca, state.path().join("tls").join("ca.pem"));
    assert!(dev.printed.contains("made now"), "{}", dev.printed);

    let untrusting = reqwest::Client::new();
    let refused = untrusting
        .get(format!("{gateway}/products"))
        .send()
        .await
        .expect_err("a client without the dev CA does not trust the gateway");
    let why = format!("{refused:?}");
    assert!(why.contains("UnknownIssuer"), "{why}");

    let http1 = trusting_only(&ca, true);
    assert_eq!(
        held_call_over(&dev, &http1).await,
        reqwest::Version::HTTP_11
    );
    let http2 = trusting_only(&ca, false);
    assert_eq!(held_call_over(&dev, &http2).await, reqwest::Version::HTTP_2);
    let first_ca = std::fs::read(&ca).unwrap();
    drop(dev);

    let again = DevProcess::start(state.path());
    assert_eq!(again.ca(), ca);
    assert!(again.printed.contains("kept from an earlier run"));
    assert_eq!(std::fs::read(&ca).unwrap(), first_ca, "the same CA");
    // The client made for the first run, trusting the CA it printed.
    assert_eq!(
        held_call_over(&again, &http2).await,
        reqwest::Version::HTTP_2
    );
}

/// The curl command `countersign dev --tls` prints, pasted into a shell
/// as it is: it trusts the printed CA alone, waits for the approval, and
/// prints the shop's order over HTTP/2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_over_tls_prints_a_curl_command_that_works_pasted() {
    // A state directory whose path needs quoting in a shell.
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().join("dev state's dir");
    let dev = DevProcess::start(&state_dir);
    let command = dev.curl("/shop");
    let ca = dev.ca();
    assert_eq!(ca, state_dir.join("tls").join("ca.pem"));
    let gateway = dev.gateway();
    assert!(
        command.starts_with("curl --cacert '"),
        "the CA path is quoted: {command}"
    );
    assert!(command.contains(&format!("{gateway}/shop")), "{command}");
    let curl = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(&command)
        .output();
    let curl = tokio::spawn(curl);
    approved_curl_buys(&dev, curl, &command).await;
    // The printed CA is the one it trusts: without --cacert curl refuses.
    let bare = command.replacen(
        &format!(
            "--cacert '{}' ",
            ca.display().to_string().replace('\'', "'\\''")
        ),
        "",
        1,
    );
    assert_ne!(bare, command);
    let output = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(&bare)
        .output()
        .await
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(60),
        "curl: certificate not trusted"
    );
}

/// README's quickstart step 6 as pasted, in a shell whose home is the one
/// dev mode ran with (default state directory), the gateway's port being
/// this run's instead of 8080.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readmes_quickstart_curl_over_tls_works_pasted() {
    const README: &str = include_str!("../README.md");
    let quickstart = README
        .split("\n## Quickstart")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .unwrap();
    let command = quickstart
        .split("```sh\n")
        .map(|block| block.split("```").next().unwrap())
        .find(|block| block.contains("--cacert"))
        .expect("the quickstart's curl over TLS")
        .to_owned();
    assert!(command.contains("https://localhost:8080/shop"), "{command}");
    let home = tempfile::tempdir().unwrap();
    let dev = DevProcess::start_at_home(home.path());
    let port = dev.gateway().rsplit(':').next().unwrap().to_owned();
    let command = command.replace("localhost:8080", &format!("localhost:{port}"));
    let curl = tokio::spawn(
        tokio::process::Command::new("bash")
            .args(["-c", &command])
            .env("HOME", home.path())
            .env_remove("XDG_STATE_HOME")
            .output(),
    );
    approved_curl_buys(&dev, curl, &command).await;
}
