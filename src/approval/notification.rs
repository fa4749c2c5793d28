//! The client notification endpoint of CIBA ping mode, on a listener of its
//! own: `POST <path>` with `Authorization: Bearer <client_notification_token>`
//! and `{"auth_req_id": "..."}`. It parses and answers; whether the
//! notification counts is [`Pings::notify`]'s decision. Answers: 204
//! accepted, 401 anything about the token or request refused (never saying
//! which), 400 a malformed body, 404 / 405 elsewhere. Neither the token nor
//! the `auth_req_id` is logged.

use std::sync::Arc;

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde::Deserialize;

use crate::approval::engine::Engine;
use crate::metrics::Metrics;

/// The largest notification body read.
const MAX_BODY: usize = 4096;

#[derive(Debug)]
pub struct NotificationApp {
    pub engine: Arc<Engine>,
    pub path: String,
    pub metrics: Metrics,
}

#[derive(Deserialize)]
struct Notification {
    auth_req_id: String,
}

fn answer(status: StatusCode) -> Response<Vec<u8>> {
    let mut response = Response::builder()
        .status(status)
        .header(http::header::CONTENT_LENGTH, 0)
        .header(http::header::CACHE_CONTROL, "no-store");
    if status == StatusCode::UNAUTHORIZED {
        response = response.header(http::header::WWW_AUTHENTICATE, "Bearer");
    }
    response.body(Vec::new()).unwrap_or_default()
}

/// The bearer token of the one `Authorization` header, if that is what it is.
fn bearer(session: &ServerSession) -> Option<String> {
    let mut values = session
        .req_header()
        .headers
        .get_all(http::header::AUTHORIZATION)
        .iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    let text = value.to_str().ok()?;
    let (scheme, token) = text.split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| token.trim().to_owned())
}

async fn read_body(session: &mut ServerSession) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_BODY {
                    return None;
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Some(body),
            Err(_) => return None,
        }
    }
}

impl NotificationApp {
    fn count(&self, result: &str) {
        self.metrics
            .ciba_notifications
            .with_label_values(&[result])
            .inc();
    }
}

#[async_trait]
impl ServeHttp for NotificationApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        if session.req_header().uri.path() != self.path {
            return answer(StatusCode::NOT_FOUND);
        }
        if session.req_header().method != http::Method::POST {
            return answer(StatusCode::METHOD_NOT_ALLOWED);
        }
        let Some(pings) = self.engine.pings() else {
            return answer(StatusCode::NOT_FOUND);
        };
        let Some(token) = bearer(session) else {
            self.count("no_token");
            return answer(StatusCode::UNAUTHORIZED);
        };
        let notification = read_body(session)
            .await
            .and_then(|body| serde_json::from_slice::<Notification>(&body).ok());
        let Some(notification) = notification else {
            self.count("malformed");
            return answer(StatusCode::BAD_REQUEST);
        };
        match pings.notify(&notification.auth_req_id, &token) {
            Ok(approval_id) => {
                self.engine.notified(&approval_id);
                self.count("accepted");
                tracing::info!(approval_id, "ping notification accepted");
                answer(StatusCode::NO_CONTENT)
            }
            Err(refused) => {
                self.count(refused.label());
                tracing::info!(reason = refused.label(), "ping notification refused");
                answer(StatusCode::UNAUTHORIZED)
            }
        }
    }
}
