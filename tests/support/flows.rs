//! Set-ups and steps several test files share: a peer, a shop and a
//! gateway process on SQLite in a folder of its own; the `store:` lines and
//! the peer's `authorization_server:` section; an agent that sends a held
//! call and hangs up; the checks of a refusal; JSON and text fetches.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;

use countersign::demo::shop::ShopHandle;
use serde_json::Value;

use super::process::GatewayProcess;
use super::{start_shop, GatewayOptions, Peer, USER_HEADER};

/// `store:` on the SQLite file `approvals.db` in `dir`, with the default
/// lease (`None`) or `lease`.
pub fn sqlite_store(dir: &Path, lease: Option<&str>) -> String {
    let db = dir.join("approvals.db");
    match lease {
        Some(lease) => format!("store: {{ sqlite: \"{}\", lease: {lease} }}", db.display()),
        None => format!("store: {{ sqlite: \"{}\" }}", db.display()),
    }
}

/// `store:` on the PostgreSQL database at `url`, with the default lease
/// (`None`) or `lease`.
pub fn postgres_store(url: &str, lease: Option<&str>) -> String {
    match lease {
        Some(lease) => format!("store: {{ postgres: \"{url}\", lease: {lease} }}"),
        None => format!("store: {{ postgres: \"{url}\" }}"),
    }
}

/// The CIBA peer and the shop that trusts its tokens.
pub async fn peer_and_shop() -> (Peer, ShopHandle) {
    let peer = Peer::start();
    let shop = start_shop(&peer).await;
    (peer, shop)
}

/// The CIBA peer, the shop, and one `countersign` process whose approvals
/// are in SQLite in the returned folder (which outlives restarts of the
/// gateway): `(peer, shop, folder, gateway)`. `options` turns the `store:`
/// line (see [`sqlite_store`]) into the gateway's options.
pub async fn sqlite_gateway(
    lease: Option<&str>,
    options: impl FnOnce(String) -> GatewayOptions,
) -> (Peer, ShopHandle, tempfile::TempDir, GatewayProcess) {
    let (peer, shop) = peer_and_shop().await;
    let dir = tempfile::tempdir().unwrap();
    let gateway =
        GatewayProcess::start(&peer, &shop, options(sqlite_store(dir.path(), lease))).await;
    (peer, shop, dir, gateway)
}

/// `POST /shop` for `user` with `body`, written on a plain TCP connection to
/// the gateway at `proxy`: the agent's client, which hangs up when the
/// stream is dropped.
pub fn held_call(proxy: SocketAddr, user: &str, body: &Value) -> TcpStream {
    let body = serde_json::to_string(body).unwrap();
    let request = format!(
        "POST /shop HTTP/1.1\r\nHost: {proxy}\r\n{USER_HEADER}: {user}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut stream = TcpStream::connect(proxy).unwrap();
    std::io::Write::write_all(&mut stream, request.as_bytes()).unwrap();
    stream
}

/// The gateway's refusal: `status`, with a JSON body of that `code`.
pub async fn problem(response: reqwest::Response, status: u16, code: &str) -> Value {
    let got = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    assert_eq!(got, status, "{body}");
    assert_eq!(body["code"], code, "{body}");
    body
}

/// As [`problem`], and the body is `application/problem+json` (RFC 9457)
/// whose `status` repeats the HTTP status.
pub async fn problem_json(response: reqwest::Response, status: u16, code: &str) -> Value {
    let content_type = response.headers().get("content-type").cloned();
    let body = problem(response, status, code).await;
    assert_eq!(
        content_type.expect("a content-type"),
        "application/problem+json"
    );
    assert_eq!(body["status"], status, "{body}");
    body
}

/// Sends `request`; the JSON of its answer.
pub async fn json_of<T: serde::de::DeserializeOwned>(request: reqwest::RequestBuilder) -> T {
    request.send().await.unwrap().json().await.unwrap()
}

/// `GET url`; the JSON of its answer.
pub async fn get_json<T: serde::de::DeserializeOwned>(url: String) -> T {
    reqwest::get(url).await.unwrap().json().await.unwrap()
}

/// `GET url`; the text of its answer.
pub async fn get_text(url: String) -> String {
    reqwest::get(url).await.unwrap().text().await.unwrap()
}

/// Sends `request`; the text of its answer.
pub async fn text_of(request: reqwest::RequestBuilder) -> String {
    request.send().await.unwrap().text().await.unwrap()
}

/// The `authorization_server:` section for the CIBA peer at `issuer`, as
/// its client `countersign-post`, for a configuration written by hand.
pub fn peer_authorization_server(issuer: &str) -> String {
    format!(
        r#"authorization_server:
  issuer: {issuer}
  client_id: countersign-post
  client_auth: {{ method: client_secret_post, client_secret: countersign-secret }}
  login_hint: iss_sub
  audience_parameter: resource"#
    )
}

/// The `auth_req_id` of one of the peer's requests (see `Peer::requests`).
pub fn auth_req_id(request: &Value) -> &str {
    request["auth_req_id"].as_str().expect("an auth_req_id")
}
