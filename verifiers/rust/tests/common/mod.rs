//! Test harness: the real authorization server (oidc-provider, via
//! tests/peer/server.mjs), real tokens from it, a real axum API behind
//! `VerifyLayer` on an ephemeral port, and real HTTP requests.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::{Extension, Json, Router};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use countersign_verify::{Approval, Config, Verifier, VerifyLayer};
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub const AUDIENCE: &str = "https://shop.example/api";

/// The call the tests bind their tokens to: `POST TARGET` with `BODY`.
pub const BODY: &[u8] = br#"{"item":"phone","qty":2}"#;
pub const TARGET: &str = "/shop?x=1";

/// Throwaway P-256 keys made for these tests only.
pub const KEY_PEMS: [&str; 3] = [
    "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg1IIY1CEir0aV50G+
VlvG74bReskWaEieyJs2h4zTGy+hRANCAARGf1wJltjJ+i6zWpgvb3DsZnmi+Xb1
l/xhSoSeJSrCZt8KyUvffgAVB2+NkaYusf+11OUY/bRCv8diX7WjZgif
-----END PRIVATE KEY-----
",
    "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgSXHhgbWroR6zbmat
V00l95CcKHUmuWA46yCRz+3zgyuhRANCAATQvj+AasZS0y4YL/YVil71ATltHx3B
mfj1+20blPXocMB+WI/wWUPaI5Bj0WUxgRYQpbaIUr4i5YkhnN59p5cH
-----END PRIVATE KEY-----
",
    "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQglGDmQItqI/DRyw42
GiZMx1fEZnQggQP1d1Goq/Hy1MChRANCAAQ6GNGkQeUVfQQbpYxvm2k5mcC1R8pt
ItuhkU+am0WMZDyNey/5Vezosa/0R3DCJDiYWYpZ0Op62IeK0vIHDA1H
-----END PRIVATE KEY-----
",
];

pub fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

pub fn sha256(bytes: &[u8]) -> String {
    b64(&Sha256::digest(bytes))
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub fn uuid() -> String {
    // Unique enough for approval ids and jtis within one test run.
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{:08x}-0000-4000-8000-{:012x}", n, t & 0xffff_ffff_ffff)
}

/// An ES256 key: to sign DPoP proofs or test tokens.
pub struct TestKey {
    pub encoding: EncodingKey,
    /// The public JWK.
    pub jwk: Value,
}

impl TestKey {
    pub fn new(index: usize) -> Self {
        let encoding = EncodingKey::from_ec_pem(KEY_PEMS[index].as_bytes()).unwrap();
        let mut jwk =
            serde_json::to_value(Jwk::from_encoding_key(&encoding, Algorithm::ES256).unwrap())
                .unwrap();
        jwk.as_object_mut().unwrap().remove("alg");
        Self { encoding, jwk }
    }

    /// Signs any header and claims (so tests can make malformed ones too).
    pub fn sign(&self, header: &Value, claims: &Value) -> String {
        let message = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let signature =
            jsonwebtoken::crypto::sign(message.as_bytes(), &self.encoding, Algorithm::ES256)
                .unwrap();
        format!("{message}.{signature}")
    }

    /// A DPoP proof for `method` `url`, for `token` when given.
    pub fn proof(&self, method: &str, url: &str, token: Option<&str>) -> String {
        self.proof_with(method, url, token, |_, _| {})
    }

    /// A DPoP proof, altered by `edit(header, claims)` before signing.
    pub fn proof_with(
        &self,
        method: &str,
        url: &str,
        token: Option<&str>,
        edit: impl FnOnce(&mut Value, &mut Value),
    ) -> String {
        let mut header = json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": self.jwk});
        let mut claims = json!({"htm": method, "htu": url, "iat": now(), "jti": uuid()});
        if let Some(token) = token {
            claims["ath"] = sha256(token.as_bytes()).into();
        }
        edit(&mut header, &mut claims);
        self.sign(&header, &claims)
    }
}

/// The running oidc-provider peer. Killed when dropped.
pub struct Peer {
    _child: Child,
    pub issuer: String,
    pub http: reqwest::Client,
}

pub async fn start_peer() -> Peer {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/peer/server.mjs");
    let mut child = Command::new("node")
        .arg(script)
        .env("PEER_PORT", "0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("node runs tests/peer/server.mjs (npm ci --prefix tests/peer first)");
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(30),
        BufReader::new(stdout).read_line(&mut line),
    )
    .await
    .expect("the peer starts within 30 s")
    .unwrap();
    let hello: Value = serde_json::from_str(&line).expect("the peer's first line is JSON");
    Peer {
        _child: child,
        issuer: hello["issuer"].as_str().unwrap().to_owned(),
        http: reqwest::Client::new(),
    }
}

/// What to ask the person to approve.
pub struct Ask<'a> {
    pub scope: &'a str,
    pub details: Option<Value>,
    /// Bind the token to this key (DPoP on the token request).
    pub dpop: Option<&'a TestKey>,
}

impl Peer {
    /// Where the peer serves its signing keys.
    pub fn jwks_uri(&self) -> String {
        format!("{}/.well-known/jwks.json", self.issuer)
    }

    /// A real access token of alice: bc-authorize, she approves, one poll
    /// after the interval.
    pub async fn token(&self, ask: Ask<'_>) -> String {
        self.token_of("alice", ask).await
    }

    /// A real access token of `user` (alice, bob or carol: the peer's users).
    pub async fn token_of(&self, user: &str, ask: Ask<'_>) -> String {
        let mut form = vec![
            ("client_id", "countersign-post".to_owned()),
            ("client_secret", "countersign-secret".to_owned()),
            ("scope", ask.scope.to_owned()),
            ("login_hint", user.to_owned()),
            ("binding_message", "Buy 2 phones".to_owned()),
            ("resource", AUDIENCE.to_owned()),
        ];
        if let Some(details) = &ask.details {
            form.push(("authorization_details", details.to_string()));
        }
        let asked = tokio::time::Instant::now();
        let bc_authorize = format!("{}/bc-authorize", self.issuer);
        let answer = json_of(self.http.post(bc_authorize).form(&form)).await;
        let auth_req_id = answer["auth_req_id"]
            .as_str()
            .unwrap_or_else(|| panic!("bc-authorize answered {answer}"))
            .to_owned();
        let approved = self
            .http
            .post(format!(
                "{}/control/requests/{auth_req_id}/approve",
                self.issuer
            ))
            .send()
            .await
            .unwrap();
        assert!(
            approved.status().is_success(),
            "approve: {}",
            approved.status()
        );
        tokio::time::sleep_until(asked + Duration::from_millis(1100)).await;
        let token_url = format!("{}/oauth/token", self.issuer);
        let mut request = self.http.post(&token_url).form(&[
            ("grant_type", "urn:openid:params:grant-type:ciba"),
            ("auth_req_id", &auth_req_id),
            ("client_id", "countersign-post"),
            ("client_secret", "countersign-secret"),
        ]);
        if let Some(key) = ask.dpop {
            request = request.header("DPoP", key.proof("POST", &token_url, None));
        }
        let answer = json_of(request).await;
        let expected_type = if ask.dpop.is_some() { "DPoP" } else { "Bearer" };
        assert_eq!(
            answer["token_type"], expected_type,
            "token answer {}",
            answer["error"]
        );
        answer["access_token"].as_str().unwrap().to_owned()
    }

    /// The peer's JWKS with `extra` keys added: served by [`serve_jwks`] so
    /// that tests can sign their own tokens (expired, other issuer, ...).
    pub async fn jwks_with(&self, extra: Vec<Value>) -> Value {
        let mut jwks = json_of(self.http.get(self.jwks_uri())).await;
        jwks["keys"].as_array_mut().unwrap().extend(extra);
        jwks
    }
}

/// The peer's JWKS with `own`'s key added as kid `test-key`, served: for
/// the tokens no real authorization server would issue on demand, which
/// the tests sign themselves (expired, other issuer, ...).
pub async fn jwks_with_own_key(peer: &Peer, own: &TestKey) -> String {
    let mut own_jwk = own.jwk.clone();
    own_jwk["kid"] = "test-key".into();
    serve_jwks(peer.jwks_with(vec![own_jwk]).await).await
}

/// Sends `request` and reads its answer as JSON.
async fn json_of(request: reqwest::RequestBuilder) -> Value {
    request.send().await.unwrap().json().await.unwrap()
}

/// A `countersign_call` entry (as the gateway would add it).
pub fn call_entry(approval: &str, method: &str, target: &str, host: &str, body: &[u8]) -> Value {
    json!({
        "type": "countersign_call",
        "version": "1",
        "approval": approval,
        "method": method,
        "target": target,
        "host": host,
        "body_sha256": sha256(body),
    })
}

/// Serves `jwks` at `http://<addr>/jwks.json`.
pub async fn serve_jwks(jwks: Value) -> String {
    let app = Router::new().route(
        "/jwks.json",
        axum::routing::get(move || {
            let jwks = jwks.clone();
            async move { Json(jwks) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/jwks.json")
}

/// What the API's handler saw, per call it served.
#[derive(Debug, Clone)]
pub struct Served {
    pub approval_id: String,
    pub subject: String,
    pub body_sha256: String,
    pub countersigners: Vec<String>,
}

/// An axum API with `VerifyLayer` in front of every path.
pub struct Api {
    pub addr: SocketAddr,
    pub require_dpop: bool,
    pub served: Arc<Mutex<Vec<Served>>>,
}

impl Api {
    /// `host:port` as a client sends it in `Host`.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn url(&self, target: &str) -> String {
        format!("http://{}{target}", self.addr)
    }

    pub fn served(&self) -> usize {
        self.served.lock().unwrap().len()
    }
}

/// Binds first (the tokens must name the port), then configures and serves.
pub async fn start_api(configure: impl FnOnce(&str) -> Config) -> Api {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = configure(&addr.to_string());
    let require_dpop = config.require_dpop;
    let verifier = Verifier::new(config).unwrap();
    let served = Arc::new(Mutex::new(Vec::new()));
    let seen = served.clone();
    let handler = move |Extension(approval): Extension<Approval>, body: Bytes| {
        let seen = seen.clone();
        async move {
            let record = Served {
                approval_id: approval.approval_id.clone(),
                subject: approval.subject.clone(),
                body_sha256: sha256(&body),
                countersigners: approval.countersigners.clone(),
            };
            seen.lock().unwrap().push(record);
            Json(json!({"approval": approval.approval_id, "sub": approval.subject}))
        }
    };
    let app = Router::new()
        .route("/shop", axum::routing::any(handler.clone()))
        .fallback(handler)
        .layer(VerifyLayer::new(verifier));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Api {
        addr,
        require_dpop,
        served,
    }
}

/// One request of a table and what must come of it.
pub struct Case {
    pub name: &'static str,
    pub method: &'static str,
    pub target: String,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
    /// 200, or the refusal's status, code and field.
    pub expect: Expect,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    Served,
    Refused(u16, &'static str, Option<&'static str>),
}

/// The bound call (`POST TARGET` with `BODY`) sent with `headers`.
pub fn post_case(name: &'static str, headers: Vec<(&'static str, String)>, expect: Expect) -> Case {
    Case {
        name,
        method: "POST",
        target: TARGET.into(),
        headers,
        body: BODY.to_vec(),
        expect,
    }
}

pub fn refused(status: u16, code: &'static str, field: Option<&'static str>) -> Expect {
    Expect::Refused(status, code, field)
}

/// Sends every case in order (order matters: approvals and proofs are used
/// up) and returns what went wrong, all of it.
pub async fn run_cases(api: &Api, cases: Vec<Case>) -> Vec<String> {
    let http = reqwest::Client::new();
    let mut failures = Vec::new();
    for case in cases {
        let before = api.served();
        let mut request = http
            .request(case.method.parse().unwrap(), api.url(&case.target))
            .body(case.body.clone());
        for (name, value) in &case.headers {
            request = request.header(*name, value);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let challenge = response
            .headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap().to_owned());
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned());
        let body: Value = response.json().await.unwrap_or(Value::Null);
        let handled = api.served() - before;
        let mut fail = |what: String| failures.push(format!("{}: {what}", case.name));
        match case.expect {
            Expect::Served => {
                if status != 200 || handled != 1 {
                    fail(format!(
                        "expected served, got {status} {body} (handler ran {handled}x)"
                    ));
                    continue;
                }
                let served = api.served.lock().unwrap().last().cloned().unwrap();
                if served.body_sha256 != sha256(&case.body) {
                    fail("the handler got other body bytes".into());
                }
                if served.subject != "alice" || body["approval"] != served.approval_id.as_str() {
                    fail(format!("handler saw {served:?}"));
                }
            }
            Expect::Refused(want_status, code, field) => {
                let got = (status, body["code"].as_str(), body["field"].as_str());
                if got != (want_status, Some(code), field) || handled != 0 {
                    fail(format!(
                        "expected {want_status} {code} {field:?}, got {got:?} (handler ran {handled}x), detail {}",
                        body["detail"]
                    ));
                    continue;
                }
                if content_type.as_deref() != Some("application/problem+json")
                    || body["type"] != format!("urn:countersign:problem:{code}")
                    || body["status"] != want_status
                    || !body["title"].is_string()
                    || !body["detail"].is_string()
                {
                    fail(format!(
                        "not the contract's problem+json: {content_type:?} {body}"
                    ));
                }
                let dpop_in_use = api.require_dpop
                    || case.headers.iter().any(|(n, v)| {
                        n.eq_ignore_ascii_case("authorization") && v.starts_with("DPoP ")
                    });
                let want_challenge = match (want_status, code) {
                    (401, c) if c.starts_with("dpop_") => {
                        Some(r#"DPoP error="invalid_dpop_proof""#)
                    }
                    (401, _) if dpop_in_use => Some(r#"DPoP error="invalid_token""#),
                    (401, _) => Some(r#"Bearer error="invalid_token""#),
                    _ => None,
                };
                if challenge.as_deref() != want_challenge {
                    fail(format!(
                        "WWW-Authenticate {challenge:?}, expected {want_challenge:?}"
                    ));
                }
            }
        }
    }
    failures
}

pub fn assert_no_failures(failures: Vec<String>) {
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
}
