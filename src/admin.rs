//! The admin listener: `/metrics`, `/healthz` (liveness), `/readyz`
//! (readiness, see [`crate::readiness`]) and the audit trail
//! (`/approvals`, `/approvals/{id}`, see [`crate::approval::audit`]). Keep
//! it off the public network; it answers anyone who reaches it.

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use std::sync::Arc;

use crate::approval::{audit, shadow_audit};
use crate::metrics::Metrics;
use crate::readiness::Readiness;
use crate::store::ApprovalStore;

#[derive(Debug)]
pub struct AdminApp {
    pub metrics: Metrics,
    pub readiness: Readiness,
    pub store: Arc<dyn ApprovalStore>,
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Vec<u8>> {
    let mut body = serde_json::to_vec_pretty(value).unwrap_or_default();
    body.push(b'\n');
    respond(status, "application/json", body)
}

fn error(status: StatusCode, message: &str) -> Response<Vec<u8>> {
    json(status, &serde_json::json!({ "error": message }))
}

impl AdminApp {
    async fn approvals(&self, query: Option<&str>) -> Response<Vec<u8>> {
        let filter = match audit::parse_query(query) {
            Ok(filter) => filter,
            Err(message) => return error(StatusCode::BAD_REQUEST, &message),
        };
        match self.store.list(&filter).await {
            Ok(approvals) => json(StatusCode::OK, &audit::entries(&approvals)),
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
        }
    }

    async fn shadow_decisions(&self, query: Option<&str>) -> Response<Vec<u8>> {
        let filter = match shadow_audit::parse_query(query) {
            Ok(filter) => filter,
            Err(message) => return error(StatusCode::BAD_REQUEST, &message),
        };
        match self.store.list_shadow(&filter).await {
            Ok(decisions) => json(StatusCode::OK, &shadow_audit::listing(&decisions)),
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
        }
    }

    async fn approval(&self, id: &str) -> Response<Vec<u8>> {
        match self.store.get(id).await {
            Ok(Some(approval)) => json(StatusCode::OK, &audit::entry(&approval)),
            Ok(None) => error(StatusCode::NOT_FOUND, "no such approval"),
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
        }
    }
}

fn respond(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::CONTENT_LENGTH, body.len())
        .body(body)
        .unwrap_or_default()
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let uri = session.req_header().uri.clone();
        let is_get = session.req_header().method == http::Method::GET;
        match uri.path() {
            "/approvals" | "/approvals/" if is_get => self.approvals(uri.query()).await,
            "/shadow-decisions" if is_get => self.shadow_decisions(uri.query()).await,
            path if is_get && path.starts_with("/approvals/") => {
                self.approval(&path["/approvals/".len()..]).await
            }
            "/approvals" => error(StatusCode::METHOD_NOT_ALLOWED, "only GET"),
            path if path.starts_with("/approvals/") => {
                error(StatusCode::METHOD_NOT_ALLOWED, "only GET")
            }
            "/metrics" => respond(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                self.metrics.render().into_bytes(),
            ),
            // Liveness: this process answers. Restarting it would not help
            // with anything `/readyz` reports.
            "/healthz" => respond(StatusCode::OK, "text/plain", b"ok\n".to_vec()),
            // Readiness: every registered check passes (the proxy listener
            // accepts, the authorization server's endpoints are known, ...).
            "/readyz" => {
                let report = self.readiness.report().await;
                let status = if report.ready() {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                respond(status, "application/json", report.to_json().into_bytes())
            }
            _ => respond(StatusCode::NOT_FOUND, "text/plain", b"not found\n".to_vec()),
        }
    }
}
