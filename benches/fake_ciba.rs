//! A fast fake CIBA authorization server (poll and ping modes) for the
//! held-call benchmark: discovery, bc-authorize, a token endpoint that keeps
//! every request pending and records each poll, and an "approve all" switch
//! (which, in ping mode, also notifies the gateway of every request).
//!
//! It enforces and measures the polling discipline: a poll sooner than
//! `interval` after the request was created or last polled is answered
//! `slow_down` (what a strict server does) and counted, so two polls in
//! flight at once for one `auth_req_id` are counted too.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use serde_json::json;

/// One backchannel authentication request.
#[derive(Debug)]
pub struct Request {
    pub created: Instant,
    pub polls: Vec<Instant>,
    /// Ping mode: the bearer the gateway sent for its notification.
    pub notification_token: Option<String>,
    /// The binding message the person would see.
    pub binding_message: String,
}

#[derive(Debug, Default)]
pub struct Counters {
    pub too_early: u64,
    pub unknown: u64,
}

#[derive(Debug)]
pub struct FakeCiba {
    pub interval: Duration,
    pub expires_in: Duration,
    pub requests: Mutex<HashMap<u64, Request>>,
    pub counters: Mutex<Counters>,
    approved_at: Mutex<Option<Instant>>,
    next_id: std::sync::atomic::AtomicU64,
    issuer: Mutex<String>,
}

impl FakeCiba {
    pub fn new(interval: Duration, expires_in: Duration) -> Arc<Self> {
        Arc::new(Self {
            interval,
            expires_in,
            requests: Mutex::new(HashMap::new()),
            counters: Mutex::new(Counters::default()),
            approved_at: Mutex::new(None),
            next_id: Default::default(),
            issuer: Mutex::new(String::new()),
        })
    }

    /// From now on every poll is answered with an access token.
    pub fn approve_all(&self) -> Instant {
        let now = Instant::now();
        *self.approved_at.lock().unwrap() = Some(now);
        now
    }

    /// Ping mode: notifies `endpoint` of every request that asked for it,
    /// 64 at a time; returns when each notification was sent, by the
    /// request's binding message.
    pub async fn ping_all(&self, endpoint: &str) -> HashMap<String, Instant> {
        let targets: Vec<(u64, String, String)> = self
            .requests
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(id, r)| {
                let token = r.notification_token.clone()?;
                Some((*id, token, r.binding_message.clone()))
            })
            .collect();
        let http = reqwest::Client::new();
        let gate = Arc::new(tokio::sync::Semaphore::new(64));
        let mut tasks = Vec::new();
        for (id, token, message) in targets {
            let permit = gate.clone().acquire_owned().await.unwrap();
            let request = http
                .post(endpoint)
                .bearer_auth(token)
                .json(&json!({ "auth_req_id": format!("bench-{id}") }));
            tasks.push(tokio::spawn(async move {
                let sent = Instant::now();
                let ok = request.send().await.is_ok_and(|r| r.status().is_success());
                drop(permit);
                (message, sent, ok)
            }));
        }
        let mut sent = HashMap::new();
        for task in tasks {
            let (message, at, ok) = task.await.unwrap();
            if ok {
                sent.insert(message, at);
            }
        }
        sent
    }

    pub fn pending(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    /// Serves on an ephemeral port of 127.0.0.1 and returns the issuer URL.
    pub async fn serve(self: &Arc<Self>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let issuer = format!("http://{addr}");
        *self.issuer.lock().unwrap() = issuer.clone();
        let app = Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/bc-authorize", post(bc_authorize))
            .route("/token", post(token))
            .route("/control/approve-all", post(control_approve_all))
            .with_state(self.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        issuer
    }
}

type Shared = State<Arc<FakeCiba>>;

async fn discovery(State(ciba): Shared) -> Json<serde_json::Value> {
    let issuer = ciba.issuer.lock().unwrap().clone();
    Json(json!({
        "issuer": issuer,
        "backchannel_authentication_endpoint": format!("{issuer}/bc-authorize"),
        "token_endpoint": format!("{issuer}/token"),
        "backchannel_token_delivery_modes_supported": ["poll", "ping"],
        "grant_types_supported": ["urn:openid:params:grant-type:ciba"],
    }))
}

async fn bc_authorize(
    State(ciba): Shared,
    Form(form): Form<HashMap<String, String>>,
) -> Json<serde_json::Value> {
    let id = ciba
        .next_id
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    ciba.requests.lock().unwrap().insert(
        id,
        Request {
            created: Instant::now(),
            polls: Vec::new(),
            notification_token: form.get("client_notification_token").cloned(),
            binding_message: form.get("binding_message").cloned().unwrap_or_default(),
        },
    );
    Json(json!({
        "auth_req_id": format!("bench-{id}"),
        "expires_in": ciba.expires_in.as_secs(),
        "interval": ciba.interval.as_secs(),
    }))
}

fn oauth_error(error: &str) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({ "error": error }))).into_response()
}

async fn token(State(ciba): Shared, Form(form): Form<HashMap<String, String>>) -> Response {
    let now = Instant::now();
    let Some(id) = form
        .get("auth_req_id")
        .and_then(|v| v.strip_prefix("bench-"))
        .and_then(|v| v.parse::<u64>().ok())
    else {
        ciba.counters.lock().unwrap().unknown += 1;
        return oauth_error("invalid_grant");
    };
    let too_early = {
        let mut requests = ciba.requests.lock().unwrap();
        let Some(request) = requests.get_mut(&id) else {
            drop(requests);
            ciba.counters.lock().unwrap().unknown += 1;
            return oauth_error("invalid_grant");
        };
        let last = request.polls.last().copied().unwrap_or(request.created);
        request.polls.push(now);
        // In ping mode the client asks for the token when notified.
        let notified = request.notification_token.is_some()
            && ciba.approved_at.lock().unwrap().is_some_and(|at| now >= at);
        !notified && now.duration_since(last) < ciba.interval
    };
    if too_early {
        ciba.counters.lock().unwrap().too_early += 1;
    }
    let approved = ciba.approved_at.lock().unwrap().is_some_and(|at| now >= at);
    let response = if too_early {
        oauth_error("slow_down")
    } else if approved {
        Json(json!({
            "access_token": format!("bench-token-{id}"),
            "token_type": "Bearer",
            "expires_in": 300,
        }))
        .into_response()
    } else {
        oauth_error("authorization_pending")
    };
    response
}

async fn control_approve_all(State(ciba): Shared) -> StatusCode {
    ciba.approve_all();
    StatusCode::NO_CONTENT
}
