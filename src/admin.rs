//! The admin listener: `/metrics`, `/healthz` (liveness), `/readyz`
//! (readiness, see [`crate::readiness`]). Keep it off the
//! public network; it answers anyone who reaches it.

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::metrics::Metrics;
use crate::readiness::Readiness;

#[derive(Debug)]
pub struct AdminApp {
    pub metrics: Metrics,
    pub readiness: Readiness,
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
        match session.req_header().uri.path() {
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
