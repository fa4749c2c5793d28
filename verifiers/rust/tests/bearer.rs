//! Bearer tokens: the approved call is served, once; the same token for any
//! other call, and tokens that are not valid or not bound, are refused with
//! the contract's code and field, and never reach the handler.

mod common;

use common::*;
use countersign_verify::Config;
use serde_json::{json, Value};

fn bearer(token: &str) -> Vec<(&'static str, String)> {
    vec![("authorization", format!("Bearer {token}"))]
}

fn case(name: &'static str, token: &str, expect: Expect) -> Case {
    post_case(name, bearer(token), expect)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_tokens() {
    let peer = start_peer().await;
    // Our own key, added to the JWKS the API trusts, signs the tokens no
    // real authorization server would issue on demand (expired, ...).
    let own = TestKey::new(2);
    let jwks_uri = jwks_with_own_key(&peer, &own).await;
    let issuer = peer.issuer.clone();
    let api = start_api(|_| Config {
        required_scopes: vec!["product:buy".into()],
        ..Config::new(&issuer, AUDIENCE, &jwks_uri)
    })
    .await;
    let host = api.host();
    let entry = |approval: &str| call_entry(approval, "POST", TARGET, &host, BODY);
    let dpop_key = TestKey::new(0);

    let buy = "openid product:buy";
    let mut version_2 = entry(&uuid());
    version_2["version"] = "2".into();
    let (bound, unbound, plain, read_only, two, version, dpop_bound) = tokio::join!(
        peer.token(Ask {
            scope: buy,
            details: Some(json!([entry(&uuid())])),
            dpop: None
        }),
        peer.token(Ask {
            scope: buy,
            details: Some(json!([{"type": "product_purchase", "item": "x"}])),
            dpop: None
        }),
        peer.token(Ask {
            scope: buy,
            details: None,
            dpop: None
        }),
        peer.token(Ask {
            scope: "openid product:read",
            details: Some(json!([entry(&uuid())])),
            dpop: None
        }),
        peer.token(Ask {
            scope: buy,
            details: Some(json!([entry(&uuid()), entry(&uuid())])),
            dpop: None
        }),
        peer.token(Ask {
            scope: buy,
            details: Some(json!([version_2])),
            dpop: None
        }),
        peer.token(Ask {
            scope: buy,
            details: Some(json!([entry(&uuid())])),
            dpop: Some(&dpop_key)
        }),
    );

    // Self-signed tokens: right in every respect but the one named.
    let claims = |edit: &dyn Fn(&mut Value)| {
        let mut claims = json!({
            "iss": issuer, "aud": AUDIENCE, "sub": "alice", "scope": "product:buy",
            "iat": now(), "exp": now() + 300, "jti": uuid(),
            "authorization_details": [entry(&uuid())],
        });
        edit(&mut claims);
        claims
    };
    let own_header = json!({"typ": "at+jwt", "alg": "ES256", "kid": "test-key"});
    let signed = |edit: &dyn Fn(&mut Value)| own.sign(&own_header, &claims(edit));
    let own_valid = signed(&|_| {});
    let expired = signed(&|c| c["exp"] = (now() - 120).into());
    let other_issuer = signed(&|c| c["iss"] = format!("{issuer}/other").into());
    let other_audience = signed(&|c| c["aud"] = "https://other.example/api".into());
    let not_yet = signed(&|c| c["nbf"] = (now() + 600).into());
    // The contract's settled details: a string `sub` is required; an entry
    // without a string `approval` is binding_missing; another bound field
    // missing or not a string is binding_mismatch on that field.
    let no_sub = signed(&|c| {
        c.as_object_mut().unwrap().remove("sub");
    });
    let numeric_sub = signed(&|c| c["sub"] = 42.into());
    let no_approval = signed(&|c| {
        c["authorization_details"][0]
            .as_object_mut()
            .unwrap()
            .remove("approval");
    });
    let numeric_approval = signed(&|c| c["authorization_details"][0]["approval"] = 7.into());
    let no_method = signed(&|c| {
        c["authorization_details"][0]
            .as_object_mut()
            .unwrap()
            .remove("method");
    });
    let numeric_version = signed(&|c| c["authorization_details"][0]["version"] = 1.into());
    // Claims the peer's key id, signed by another key.
    let forged = own.sign(
        &json!({"typ": "at+jwt", "alg": "ES256", "kid": "peer-test-key"}),
        &claims(&|_| {}),
    );
    // The peer's token with its payload changed (sub), the signature kept.
    let tampered = {
        let parts: Vec<&str> = bound.split('.').collect();
        let mut payload: Value = serde_json::from_slice(
            &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, parts[1])
                .unwrap(),
        )
        .unwrap();
        payload["sub"] = "mallory".into();
        format!(
            "{}.{}.{}",
            parts[0],
            b64(payload.to_string().as_bytes()),
            parts[2]
        )
    };
    let unsigned = format!(
        "{}.{}.",
        b64(br#"{"alg":"none"}"#),
        b64(claims(&|_| {}).to_string().as_bytes())
    );

    let cases = vec![
        Case {
            headers: vec![],
            ..case("no Authorization", "", refused(401, "token_missing", None))
        },
        Case {
            headers: vec![("authorization", "Basic YWxpY2U6c2VjcmV0".into())],
            ..case("Basic scheme", "", refused(401, "token_missing", None))
        },
        Case {
            headers: vec![
                ("authorization", format!("Bearer {bound}")),
                ("authorization", format!("Bearer {bound}")),
            ],
            ..case(
                "two Authorization headers",
                "",
                refused(401, "token_missing", None),
            )
        },
        case(
            "not a JWT",
            "not-a-jwt",
            refused(401, "token_invalid", None),
        ),
        case("alg none", &unsigned, refused(401, "token_invalid", None)),
        case(
            "tampered signature",
            &tampered,
            refused(401, "token_invalid", None),
        ),
        case(
            "signed by another key",
            &forged,
            refused(401, "token_invalid", None),
        ),
        case(
            "wrong issuer",
            &other_issuer,
            refused(401, "token_invalid", None),
        ),
        case(
            "wrong audience",
            &other_audience,
            refused(401, "token_invalid", None),
        ),
        case("expired", &expired, refused(401, "token_invalid", None)),
        case(
            "nbf in the future",
            &not_yet,
            refused(401, "token_invalid", None),
        ),
        case("no sub", &no_sub, refused(401, "token_invalid", None)),
        case(
            "sub not a string",
            &numeric_sub,
            refused(401, "token_invalid", None),
        ),
        case(
            "entry without approval",
            &no_approval,
            refused(403, "binding_missing", None),
        ),
        case(
            "approval not a string",
            &numeric_approval,
            refused(403, "binding_missing", None),
        ),
        case(
            "entry without method",
            &no_method,
            refused(403, "binding_mismatch", Some("method")),
        ),
        case(
            "version a number",
            &numeric_version,
            refused(403, "binding_mismatch", Some("version")),
        ),
        case(
            "missing scope",
            &read_only,
            refused(403, "insufficient_scope", None),
        ),
        case(
            "no authorization_details",
            &plain,
            refused(403, "binding_missing", None),
        ),
        case(
            "only another type of details",
            &unbound,
            refused(403, "binding_missing", None),
        ),
        case(
            "two countersign_call entries",
            &two,
            refused(403, "binding_missing", None),
        ),
        case(
            "version 2",
            &version,
            refused(403, "binding_mismatch", Some("version")),
        ),
        Case {
            body: br#"{"item":"phone","qty":200}"#.to_vec(),
            ..case(
                "another body",
                &bound,
                refused(403, "binding_mismatch", Some("body")),
            )
        },
        Case {
            body: vec![],
            ..case(
                "empty body",
                &bound,
                refused(403, "binding_mismatch", Some("body")),
            )
        },
        Case {
            target: "/shop?x=2".into(),
            ..case(
                "another query",
                &bound,
                refused(403, "binding_mismatch", Some("target")),
            )
        },
        Case {
            target: "/shop?x=%31".into(),
            ..case(
                "the same target percent-encoded (compared raw)",
                &bound,
                refused(403, "binding_mismatch", Some("target")),
            )
        },
        Case {
            target: "/shop".into(),
            ..case(
                "no query",
                &bound,
                refused(403, "binding_mismatch", Some("target")),
            )
        },
        Case {
            method: "PUT",
            ..case(
                "another method",
                &bound,
                refused(403, "binding_mismatch", Some("method")),
            )
        },
        Case {
            headers: vec![
                ("authorization", format!("Bearer {bound}")),
                ("host", "shop.example".into()),
            ],
            ..case(
                "another host",
                &bound,
                refused(403, "binding_mismatch", Some("host")),
            )
        },
        case(
            "DPoP-bound token sent as Bearer",
            &dpop_bound,
            refused(401, "dpop_proof_missing", None),
        ),
        case("the approved call", &bound, Expect::Served),
        case(
            "the approved call again",
            &bound,
            refused(403, "approval_replayed", None),
        ),
        Case {
            headers: vec![("authorization", format!("bearer  {own_valid}"))],
            ..case("a valid token of our own key (control)", "", Expect::Served)
        },
    ];
    assert_no_failures(run_cases(&api, cases).await);
}
