//! A fast fake CIBA authorization server (poll mode) for the held-call
//! benchmark: discovery, bc-authorize, a token endpoint that keeps every
//! request pending and records each poll, and an "approve all" switch.
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
        "backchannel_token_delivery_modes_supported": ["poll"],
        "grant_types_supported": ["urn:openid:params:grant-type:ciba"],
    }))
}

async fn bc_authorize(
    State(ciba): Shared,
    Form(_form): Form<HashMap<String, String>>,
) -> Json<serde_json::Value> {
    let id = ciba
        .next_id
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    ciba.requests.lock().unwrap().insert(
        id,
        Request {
            created: Instant::now(),
            polls: Vec::new(),
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
        now.duration_since(last) < ciba.interval
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
