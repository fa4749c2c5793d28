//! The recording upstream: verifies each request's bearer token as the
//! shop does (the authorization server's JWKS, the shop's audience, scope
//! `product:buy`; on the countersigned path also `Countersign-Tokens`, with
//! `COUNTERSIGN_MIN` countersigners required), logs every request it
//! receives with the approval id the
//! gateway sends, and answers; or, as a fault, answers late or hangs up
//! without an answer. A small HTTP/1.1 server on raw sockets, so that a
//! hang-up is a real one (the request was read, no answer ever comes).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use countersign::demo::shop::{BUY_SCOPE, SHOP_AUDIENCE};
use countersign::identity::JwtVerifier;
use countersign_verify::Verifier;
use serde_json::{json, Value};

use super::agents::QUORUM_PATH;
use super::COUNTERSIGN_MIN;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// `countersign-verify` as an API configures it: one verifier per route.
struct Binding {
    /// The ordinary policies' paths: the person's token alone.
    single: Verifier,
    /// The countersigned path: and `COUNTERSIGN_MIN` countersigners.
    quorum: Verifier,
}

/// What the upstream does with the requests it receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    Answer,
    /// Answer after this long.
    Slow(Duration),
    /// Read the request, log it, close the connection unanswered.
    HangUp,
}

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Arrival {
    /// Milliseconds since the run started.
    pub at_ms: u64,
    pub method: String,
    pub path: String,
    /// `x-countersign-approval-id`.
    pub approval_id: Option<String>,
    /// The verified token's `sub`; `None`: no token, or it did not verify.
    pub token_sub: Option<String>,
    /// The verified token carries `product:buy`.
    pub token_buys: bool,
    /// Why `countersign-verify` found the token not bound to exactly this
    /// call (`binding_missing`, `binding_mismatch` on a field, ...); `None`
    /// when it is (docs/call-binding.md). On the countersigned path the
    /// verifier also requires `COUNTERSIGN_MIN` countersigners' tokens for
    /// the same call (`countersign_missing`, `countersign_invalid`,
    /// `countersign_insufficient`).
    pub binding_refused: Option<String>,
    /// Tokens in `Countersign-Tokens` (0: no such header).
    pub countersign_tokens: usize,
    /// The countersigners `countersign-verify` accepted, besides the person
    /// (countersigned path only; empty when it refused).
    pub countersigners: Vec<String>,
    pub body: Value,
    pub behaviour: Behaviour,
    /// The whole answer was written to the socket.
    pub answered: bool,
}

pub struct RecordingUpstream {
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<Arrival>>>,
    behaviour: Arc<Mutex<Behaviour>>,
    task: tokio::task::JoinHandle<()>,
}

impl RecordingUpstream {
    pub async fn start(issuer: &str, jwks_uri: url::Url, epoch: Instant) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let verifier = Arc::new(JwtVerifier::with_keys(
            reqwest::Client::new(),
            jwks_uri.clone(),
            issuer,
            SHOP_AUDIENCE,
            "sub",
        ));
        let verifier_with = |countersigners: usize| {
            Verifier::new(countersign_verify::Config {
                required_scopes: vec![BUY_SCOPE.to_owned()],
                required_countersigners: countersigners,
                ..countersign_verify::Config::new(issuer, SHOP_AUDIENCE, jwks_uri.as_str())
            })
            .expect("the verifier's configuration")
        };
        let binding = Arc::new(Binding {
            single: verifier_with(0),
            quorum: verifier_with(COUNTERSIGN_MIN),
        });
        let log = Arc::new(Mutex::new(Vec::new()));
        let behaviour = Arc::new(Mutex::new(Behaviour::Answer));
        let (task_log, task_behaviour) = (log.clone(), behaviour.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let verifier = verifier.clone();
                let binding = binding.clone();
                let log = task_log.clone();
                let behaviour = *task_behaviour.lock().unwrap();
                tokio::spawn(async move {
                    serve(stream, &verifier, &binding, &log, behaviour, epoch).await;
                });
            }
        });
        Self {
            addr,
            log,
            behaviour,
            task,
        }
    }

    pub fn set(&self, behaviour: Behaviour) {
        *self.behaviour.lock().unwrap() = behaviour;
    }

    pub fn arrivals(&self) -> Vec<Arrival> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for RecordingUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads what has arrived into `chunk`: `None` once the peer has closed,
/// on an error, or after 30 s with nothing.
async fn read_chunk(stream: &mut TcpStream, chunk: &mut [u8]) -> Option<usize> {
    let n = tokio::time::timeout(Duration::from_secs(30), stream.read(chunk))
        .await
        .ok()?
        .ok()?;
    (n > 0).then_some(n)
}

/// Reads one request (head and a `Content-Length` body).
async fn read_request(stream: &mut TcpStream) -> Option<(String, Vec<(String, String)>, Vec<u8>)> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = read_chunk(stream, &mut chunk).await?;
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > 64 * 1024 {
            return None;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let request_line = lines.next()?.to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < length {
        let n = read_chunk(stream, &mut chunk).await?;
        body.extend_from_slice(&chunk[..n]);
    }
    Some((request_line, headers, body))
}

/// The request as `countersign-verify` reads it.
fn binding_of(
    method: &str,
    target: &str,
    headers: &[(String, String)],
) -> Option<http::request::Parts> {
    let mut request = http::Request::builder().method(method).uri(target);
    for (name, value) in headers {
        request = request.header(name.as_str(), value.as_str());
    }
    Some(request.body(()).ok()?.into_parts().0)
}

async fn serve(
    mut stream: TcpStream,
    verifier: &JwtVerifier,
    binding: &Binding,
    log: &Mutex<Vec<Arrival>>,
    behaviour: Behaviour,
    epoch: Instant,
) {
    let Some((request_line, headers, body)) = read_request(&mut stream).await else {
        return;
    };
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let mut parts = request_line.split(' ');
    let method = parts.next().unwrap_or_default().to_owned();
    let path = parts.next().unwrap_or_default().to_owned();
    let claims = match header("authorization")
        .as_deref()
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        Some(token) => verifier.verify(token).await.ok().map(|i| i.claims),
        None => None,
    };
    let token_sub = claims
        .as_ref()
        .and_then(|c| c["sub"].as_str())
        .map(str::to_owned);
    let token_buys = claims.as_ref().is_some_and(|c| {
        c["scope"]
            .as_str()
            .unwrap_or_default()
            .split(' ')
            .any(|s| s == BUY_SCOPE)
    });
    let verifier = if path == QUORUM_PATH {
        &binding.quorum
    } else {
        &binding.single
    };
    let (binding_refused, countersigners) = match binding_of(&method, &path, &headers) {
        Some(parts) => match verifier.verify(&parts, &body).await {
            Ok(approval) => (None, approval.countersigners),
            Err(r) => (
                Some(match r.field() {
                    Some(field) => format!("{} ({field})", r.code()),
                    None => r.code().to_owned(),
                }),
                Vec::new(),
            ),
        },
        None => (Some("an unreadable request line".to_owned()), Vec::new()),
    };
    let countersign_tokens = header("countersign-tokens")
        .map_or(0, |v| v.split(',').filter(|t| !t.trim().is_empty()).count());
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let approval_id = header("x-countersign-approval-id");
    let index = {
        let mut log = log.lock().unwrap();
        log.push(Arrival {
            at_ms: epoch.elapsed().as_millis() as u64,
            method,
            path,
            approval_id: approval_id.clone(),
            token_sub: token_sub.clone(),
            token_buys,
            binding_refused,
            countersign_tokens,
            countersigners,
            body: body.clone(),
            behaviour,
            answered: false,
        });
        log.len() - 1
    };
    let (status, answer) = if token_sub.is_some() && token_buys {
        (
            "200 OK",
            json!({ "order": index, "approval_id": approval_id, "qty": body["qty"], "buyer": token_sub }),
        )
    } else {
        (
            "401 Unauthorized",
            json!({ "error": "a valid access token for the shop is required" }),
        )
    };
    match behaviour {
        Behaviour::HangUp => {
            // Linger 0 does not block on drop: the socket is reset at once.
            #[allow(deprecated)]
            let _ = stream.set_linger(Some(Duration::ZERO));
            return;
        }
        Behaviour::Slow(delay) => tokio::time::sleep(delay).await,
        Behaviour::Answer => {}
    }
    let text = answer.to_string();
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
        text.len()
    );
    if stream.write_all(response.as_bytes()).await.is_ok() && stream.flush().await.is_ok() {
        log.lock().unwrap()[index].answered = true;
    }
}
