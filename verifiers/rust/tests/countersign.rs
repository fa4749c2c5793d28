//! Countersigned calls (four eyes, checks C1-C5): an API that requires
//! countersigners serves a call only when `Countersign-Tokens` carries valid
//! tokens of enough distinct others, for the same call and key; the handler
//! learns who they were. An API that requires none ignores the header.

mod common;

use common::*;
use countersign_verify::Config;
use serde_json::{json, Value};

const BUY: &str = "openid product:buy";

/// Alice's token as Bearer, and `countersign` as one `Countersign-Tokens` field.
fn bearer(person: &str, countersign: &[&str]) -> Vec<(&'static str, String)> {
    vec![
        ("authorization", format!("Bearer {person}")),
        ("countersign-tokens", countersign.join(", ")),
    ]
}

fn ask<'k>(entry: &Value, dpop: Option<&'k TestKey>) -> Ask<'k> {
    Ask {
        scope: BUY,
        details: Some(json!([entry])),
        dpop,
    }
}

fn invalid(field: &'static str) -> Expect {
    refused(403, "countersign_invalid", Some(field))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn countersigned_calls() {
    let peer = start_peer().await;
    // Our own key, trusted next to the peer's, signs the countersign tokens
    // no authorization server would issue on demand (expired, other entry, ...).
    let own = TestKey::new(2);
    let jwks_uri = jwks_with_own_key(&peer, &own).await;
    let issuer = peer.issuer.clone();
    let config = || Config {
        required_scopes: vec!["product:buy".into()],
        ..Config::new(&issuer, AUDIENCE, &jwks_uri)
    };
    let api = start_api(|_| Config {
        required_countersigners: 2,
        ..config()
    })
    .await;
    let lenient = start_api(|_| config()).await;

    let entry = call_entry(&uuid(), "POST", TARGET, &api.host(), BODY);
    let dpop_entry = call_entry(&uuid(), "POST", TARGET, &api.host(), BODY);
    let lenient_entry = call_entry(&uuid(), "POST", TARGET, &lenient.host(), BODY);
    let key = TestKey::new(0);
    let other_key = TestKey::new(1);
    let (alice, bob, carol, alice_dpop, bob_dpop, carol_dpop, bob_other_key, alice_lenient) = tokio::join!(
        peer.token(ask(&entry, None)),
        peer.token_of("bob", ask(&entry, None)),
        peer.token_of("carol", ask(&entry, None)),
        peer.token(ask(&dpop_entry, Some(&key))),
        peer.token_of("bob", ask(&dpop_entry, Some(&key))),
        peer.token_of("carol", ask(&dpop_entry, Some(&key))),
        peer.token_of("bob", ask(&dpop_entry, Some(&other_key))),
        peer.token(ask(&lenient_entry, None)),
    );

    // Dave's tokens, self-signed: right in every respect but the one named.
    let header = json!({"typ": "at+jwt", "alg": "ES256", "kid": "test-key"});
    let claims = |edit: &dyn Fn(&mut Value)| {
        let mut claims = json!({
            "iss": issuer, "aud": AUDIENCE, "sub": "dave", "scope": "product:buy",
            "iat": now(), "exp": now() + 300, "jti": uuid(),
            "authorization_details": [entry],
        });
        edit(&mut claims);
        claims
    };
    let signed = |edit: &dyn Fn(&mut Value)| own.sign(&header, &claims(edit));
    let expired = signed(&|c| c["exp"] = (now() - 120).into());
    let read_only = signed(&|c| c["scope"] = "product:read".into());
    let other_body =
        signed(&|c| c["authorization_details"][0]["body_sha256"] = sha256(b"{}").into());
    let other_approval = signed(&|c| c["authorization_details"][0]["approval"] = uuid().into());
    let entry_and_more = signed(&|c| {
        c["authorization_details"][0]["tool"] = "buy".into();
    });
    let bound_to_a_key = signed(&|c| c["cnf"] = json!({"jkt": "some-other-thumbprint"}));
    let unbound_for_dpop_call = signed(&|c| c["authorization_details"] = json!([dpop_entry]));
    let unknown_key = other_key.sign(
        &json!({"typ": "at+jwt", "alg": "ES256", "kid": "unknown-key"}),
        &claims(&|_| {}),
    );
    let forged = other_key.sign(&header, &claims(&|_| {}));

    let dpop = |countersign: &[&str]| {
        vec![
            ("authorization", format!("DPoP {alice_dpop}")),
            (
                "dpop",
                key.proof("POST", &api.url("/shop"), Some(&alice_dpop)),
            ),
            ("countersign-tokens", countersign.join(",")),
        ]
    };
    let missing = refused(403, "countersign_missing", None);
    let insufficient = refused(403, "countersign_insufficient", None);
    let cases = vec![
        post_case(
            "no Countersign-Tokens",
            vec![("authorization", format!("Bearer {alice}"))],
            missing,
        ),
        post_case("an empty list", bearer(&alice, &[" ", " "]), missing),
        post_case(
            "two Countersign-Tokens fields",
            vec![
                ("authorization", format!("Bearer {alice}")),
                ("countersign-tokens", bob.clone()),
                ("countersign-tokens", carol.clone()),
            ],
            missing,
        ),
        post_case(
            "not a JWT",
            bearer(&alice, &[&bob, "garbage"]),
            invalid("token"),
        ),
        post_case(
            "expired",
            bearer(&alice, &[&bob, &expired]),
            invalid("token"),
        ),
        post_case(
            "signed by a key the JWKS does not list",
            bearer(&alice, &[&unknown_key, &bob]),
            invalid("token"),
        ),
        post_case(
            "signed by another key than its kid's",
            bearer(&alice, &[&forged, &bob]),
            invalid("token"),
        ),
        post_case(
            "lacks a required scope",
            bearer(&alice, &[&bob, &read_only]),
            invalid("token"),
        ),
        post_case(
            "an entry for another body",
            bearer(&alice, &[&bob, &other_body]),
            invalid("binding"),
        ),
        post_case(
            "an entry for another approval",
            bearer(&alice, &[&other_approval, &carol]),
            invalid("binding"),
        ),
        post_case(
            "an entry with a field added",
            bearer(&alice, &[&bob, &entry_and_more]),
            invalid("binding"),
        ),
        post_case(
            "C2 on every token before C3 on any",
            bearer(&alice, &[&other_body, &expired]),
            invalid("token"),
        ),
        post_case(
            "bound to a key, the approver's token to none",
            bearer(&alice, &[&bob, &bound_to_a_key]),
            invalid("key"),
        ),
        post_case(
            "the approver's own token does not count",
            bearer(&alice, &[&alice, &bob]),
            insufficient,
        ),
        post_case(
            "the same countersigner twice counts once",
            bearer(&alice, &[&bob, &bob]),
            insufficient,
        ),
        post_case(
            "DPoP: bound to another key",
            dpop(&[&bob_dpop, &bob_other_key]),
            invalid("key"),
        ),
        post_case(
            "DPoP: unbound, the approver's token bound",
            dpop(&[&bob_dpop, &unbound_for_dpop_call]),
            invalid("key"),
        ),
        post_case(
            "two others countersigned",
            bearer(&alice, &[&bob, &carol]),
            Expect::Served,
        ),
        post_case(
            "the same call again",
            bearer(&alice, &[&bob, &carol]),
            refused(403, "approval_replayed", None),
        ),
        post_case(
            "DPoP: two others, the approver and a repeat besides",
            dpop(&[&carol_dpop, &alice_dpop, &bob_dpop, &carol_dpop]),
            Expect::Served,
        ),
    ];
    let mut failures = run_cases(&api, cases).await;
    failures.extend(
        run_cases(
            &lenient,
            vec![post_case(
                "required 0: any Countersign-Tokens is ignored",
                vec![
                    ("authorization", format!("Bearer {alice_lenient}")),
                    ("countersign-tokens", "garbage, ,".into()),
                    ("countersign-tokens", "more garbage".into()),
                ],
                Expect::Served,
            )],
        )
        .await,
    );
    assert_no_failures(failures);

    let countersigners = |api: &Api, entry: &Value| {
        let served = api.served.lock().unwrap();
        let call = served
            .iter()
            .find(|s| s.approval_id == entry["approval"])
            .expect("served");
        call.countersigners.clone()
    };
    assert_eq!(countersigners(&api, &entry), ["bob", "carol"]);
    assert_eq!(countersigners(&api, &dpop_entry), ["carol", "bob"]);
    assert!(countersigners(&lenient, &lenient_entry).is_empty());
}

/// The problem a refused call gets names the token by its position, and the
/// contract's title.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_name_the_token_and_the_count() {
    let peer = start_peer().await;
    let own = TestKey::new(2);
    let jwks_uri = jwks_with_own_key(&peer, &own).await;
    let issuer = peer.issuer.clone();
    let api = start_api(|_| Config {
        required_countersigners: 2,
        ..Config::new(&issuer, AUDIENCE, &jwks_uri)
    })
    .await;
    let entry = call_entry(&uuid(), "POST", TARGET, &api.host(), BODY);
    let header = json!({"typ": "at+jwt", "alg": "ES256", "kid": "test-key"});
    let token = |sub: &str, exp: u64| {
        own.sign(
            &header,
            &json!({
                "iss": issuer, "aud": AUDIENCE, "sub": sub, "exp": exp,
                "authorization_details": [entry],
            }),
        )
    };
    let alice = token("alice", now() + 300);
    let problem = |countersign: Vec<String>| {
        let http = reqwest::Client::new();
        let request = http
            .post(api.url(TARGET))
            .header("authorization", format!("Bearer {alice}"))
            .header("countersign-tokens", countersign.join(", "))
            .body(BODY);
        async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 403);
            response.json::<Value>().await.unwrap()
        }
    };

    let expired = problem(vec![token("bob", now() + 300), token("carol", now() - 120)]).await;
    assert_eq!(expired["title"], "Countersignature invalid");
    assert_eq!(
        expired["detail"],
        "the 2nd countersign token: the access token has expired"
    );
    let few = problem(vec![token("bob", now() + 300), alice.clone()]).await;
    assert_eq!(few["title"], "Too few countersigners");
    assert_eq!(
        few["detail"],
        "2 distinct countersigners besides alice are required; the call carries 1"
    );
    let none = problem(vec![]).await;
    assert_eq!(none["title"], "Countersignatures missing");
}
