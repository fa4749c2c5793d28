//! DPoP-bound tokens (RFC 9449): the approved call with a fresh proof by the
//! bound key is served; no proof, a proof for another request, by another
//! key, or replayed, is refused with the contract's code and field.

mod common;

use common::*;
use countersign_verify::Config;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dpop_bound_tokens() {
    let peer = start_peer().await;
    let issuer = peer.issuer.clone();
    let jwks_uri = peer.jwks_uri();
    let api = start_api(|_| Config {
        required_scopes: vec!["product:buy".into()],
        ..Config::new(&issuer, AUDIENCE, &jwks_uri)
    })
    .await;
    let (key, other_key) = (TestKey::new(0), TestKey::new(1));
    let entry = call_entry(&uuid(), "POST", TARGET, &api.host(), BODY);
    let token = peer
        .token(Ask {
            scope: "openid product:buy",
            details: Some(json!([entry])),
            dpop: Some(&key),
        })
        .await;

    // htu is the URL without the query.
    let htu = api.url("/shop");
    let proof = |edit: &dyn Fn(&mut serde_json::Value, &mut serde_json::Value)| {
        key.proof_with("POST", &htu, Some(&token), edit)
    };
    let with = |proofs: &[String]| {
        let mut headers = vec![("authorization", format!("DPoP {token}"))];
        headers.extend(proofs.iter().map(|p| ("dpop", p.clone())));
        headers
    };
    let case = |name, proofs: &[String], expect| post_case(name, with(proofs), expect);
    let invalid = |field| refused(401, "dpop_proof_invalid", Some(field));

    let good = proof(&|_, _| {});
    let cases = vec![
        case("no proof", &[], refused(401, "dpop_proof_missing", None)),
        case(
            "two proofs",
            &[proof(&|_, _| {}), proof(&|_, _| {})],
            refused(401, "dpop_proof_missing", None),
        ),
        Case {
            headers: vec![
                ("authorization", format!("Bearer {token}")),
                ("dpop", proof(&|_, _| {})),
            ],
            ..case(
                "bound token sent as Bearer, with a proof",
                &[],
                refused(401, "dpop_proof_missing", None),
            )
        },
        case("not a JWT", &["garbage".into()], invalid("proof")),
        case(
            "typ JWT",
            &[proof(&|h, _| h["typ"] = "JWT".into())],
            invalid("proof"),
        ),
        case(
            "no jwk",
            &[proof(&|h, _| {
                h.as_object_mut().unwrap().remove("jwk");
            })],
            invalid("proof"),
        ),
        case(
            "private key in the jwk",
            &[proof(&|h, _| h["jwk"]["d"] = "AAAA".into())],
            invalid("proof"),
        ),
        case(
            "signature by another key than its jwk",
            &[proof(&|h, _| h["jwk"] = other_key.jwk.clone())],
            invalid("proof"),
        ),
        case(
            "proof for another method",
            &[proof(&|_, c| c["htm"] = "GET".into())],
            invalid("htm"),
        ),
        case(
            "proof for another path",
            &[proof(&|_, c| c["htu"] = api.url("/admin").into())],
            invalid("htu"),
        ),
        case(
            "proof for another host",
            &[proof(&|_, c| c["htu"] = "http://shop.example/shop".into())],
            invalid("htu"),
        ),
        case(
            "proof for https",
            &[proof(&|_, c| {
                c["htu"] = format!("https://{}/shop", api.host()).into()
            })],
            invalid("htu"),
        ),
        case(
            "proof made 10 minutes ago",
            &[proof(&|_, c| c["iat"] = (now() - 600).into())],
            invalid("iat"),
        ),
        case(
            "proof made for in 10 minutes",
            &[proof(&|_, c| c["iat"] = (now() + 600).into())],
            invalid("iat"),
        ),
        case(
            "proof without ath",
            &[proof(&|_, c| {
                c.as_object_mut().unwrap().remove("ath");
            })],
            invalid("ath"),
        ),
        case(
            "proof for another token",
            &[proof(&|_, c| c["ath"] = sha256(b"another token").into())],
            invalid("ath"),
        ),
        case(
            "valid proof by another key",
            &[other_key.proof("POST", &htu, Some(&token))],
            invalid("key"),
        ),
        case(
            "the approved call, fresh proof",
            std::slice::from_ref(&good),
            Expect::Served,
        ),
        case(
            "the same proof again",
            &[good],
            refused(401, "dpop_proof_replayed", None),
        ),
        case(
            "the approved call again, fresh proof",
            &[proof(&|_, _| {})],
            refused(403, "approval_replayed", None),
        ),
    ];
    assert_no_failures(run_cases(&api, cases).await);
}

/// RFC 9449 §7.1, as the contract says: a token presented with the `DPoP`
/// scheme is checked as DPoP even when it is not bound to a key (no
/// `cnf.jkt`), so even a proof that is right in every other way fails on `key`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbound_token_presented_as_dpop() {
    let peer = start_peer().await;
    let issuer = peer.issuer.clone();
    let jwks_uri = peer.jwks_uri();
    let api = start_api(|_| Config::new(&issuer, AUDIENCE, &jwks_uri)).await;
    let key = TestKey::new(0);
    let entry = call_entry(&uuid(), "POST", TARGET, &api.host(), BODY);
    let token = peer
        .token(Ask {
            scope: "openid product:buy",
            details: Some(json!([entry])),
            dpop: None,
        })
        .await;
    let htu = api.url("/shop");
    let as_dpop = |proof: Option<String>| {
        let mut headers = vec![("authorization", format!("DPoP {token}"))];
        headers.extend(proof.map(|p| ("dpop", p)));
        headers
    };
    let cases = vec![
        post_case(
            "unbound token as DPoP, no proof",
            as_dpop(None),
            refused(401, "dpop_proof_missing", None),
        ),
        post_case(
            "unbound token as DPoP, proof for another method",
            as_dpop(Some(key.proof("GET", &htu, Some(&token)))),
            refused(401, "dpop_proof_invalid", Some("htm")),
        ),
        post_case(
            "unbound token as DPoP, proof otherwise right",
            as_dpop(Some(key.proof("POST", &htu, Some(&token)))),
            refused(401, "dpop_proof_invalid", Some("key")),
        ),
        post_case(
            "the same token as Bearer",
            vec![("authorization", format!("Bearer {token}"))],
            Expect::Served,
        ),
    ];
    assert_no_failures(run_cases(&api, cases).await);
}
