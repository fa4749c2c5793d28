//! The options: `require_dpop`, and `expected_host` / `external_url` for an
//! API behind another proxy; and the layer's body limit.

mod common;

use common::*;
use countersign_verify::Config;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options() {
    let peer = start_peer().await;
    let issuer = peer.issuer.clone();
    let jwks_uri = peer.jwks_uri();
    let strict = start_api(|_| Config {
        require_dpop: true,
        ..Config::new(&issuer, AUDIENCE, &jwks_uri)
    })
    .await;
    // Behind another proxy: the gateway addressed https://shop.example.
    let proxied = start_api(|_| Config {
        expected_host: Some("shop.example".into()),
        external_url: Some("https://Shop.Example:443/".into()),
        max_body_bytes: 1024,
        ..Config::new(&issuer, AUDIENCE, &jwks_uri)
    })
    .await;
    let key = TestKey::new(0);
    let ask = |host: &str, dpop| Ask {
        scope: "openid product:buy",
        details: Some(json!([call_entry(&uuid(), "POST", TARGET, host, BODY)])),
        dpop,
    };
    let (unbound, via_proxy, local_host) = tokio::join!(
        peer.token(ask(&strict.host(), None)),
        peer.token(ask("shop.example", Some(&key))),
        peer.token(ask(&proxied.host(), None)),
    );

    let missing = refused(401, "dpop_proof_missing", None);
    let strict_cases = vec![
        post_case(
            "require_dpop: no token",
            vec![],
            refused(401, "token_missing", None),
        ),
        post_case(
            "require_dpop: unbound token as Bearer",
            vec![("authorization", format!("Bearer {unbound}"))],
            missing,
        ),
        post_case(
            "require_dpop: unbound token as DPoP with a proof",
            vec![
                ("authorization", format!("DPoP {unbound}")),
                (
                    "dpop",
                    key.proof("POST", &strict.url("/shop"), Some(&unbound)),
                ),
            ],
            missing,
        ),
    ];

    let dpop = |htu: &str| {
        vec![
            ("authorization", format!("DPoP {via_proxy}")),
            ("dpop", key.proof("POST", htu, Some(&via_proxy))),
        ]
    };
    let proxied_cases = vec![
        Case {
            body: vec![b'x'; 2000],
            ..post_case(
                "body over max_body_bytes",
                dpop("https://shop.example/shop"),
                refused(413, "body_too_large", None),
            )
        },
        post_case(
            "Host as received, not the expected host",
            vec![("authorization", format!("Bearer {local_host}"))],
            refused(403, "binding_mismatch", Some("host")),
        ),
        post_case(
            "proof for the URL this server sees, not the external URL",
            dpop(&proxied.url("/shop")),
            refused(401, "dpop_proof_invalid", Some("htu")),
        ),
        post_case(
            "proof for the external URL (case and default port normalised)",
            dpop("HTTPS://shop.EXAMPLE:443/shop?ignored=1#too"),
            Expect::Served,
        ),
    ];
    let mut failures = run_cases(&strict, strict_cases).await;
    failures.extend(run_cases(&proxied, proxied_cases).await);
    assert_no_failures(failures);
}
