//! What the example shop keeps and how it checks a call: the requests it
//! received and the verifiers that judge them. Shared by the shop's REST
//! routes (`shop.rs`) and its MCP endpoint (`mcp.rs`), so neither imports
//! the other for it.

use std::sync::Mutex;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, Method, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use crate::identity::JwtVerifier;

/// One request as the shop saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The verified claims of the bearer token, when it verified.
    pub claims: Option<Value>,
    /// Why the shop refused an order: the verifier's problem `code`
    /// (`binding_mismatch`, `approval_replayed`, ...), `None` if it took it.
    pub refused: Option<String>,
}

impl Received {
    pub fn bearer(&self) -> Option<&str> {
        self.headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
    }
}

/// A request as the shop's handlers take it, to record and verify.
#[derive(Debug)]
pub(super) struct Call {
    pub(super) method: Method,
    pub(super) uri: Uri,
    pub(super) headers: HeaderMap,
    pub(super) body: Bytes,
}

impl<S: Send + Sync> FromRequest<S> for Call {
    type Rejection = Response;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let method = request.method().clone();
        let uri = request.uri().clone();
        let headers = request.headers().clone();
        let body = Bytes::from_request(request, state)
            .await
            .map_err(IntoResponse::into_response)?;
        Ok(Self {
            method,
            uri,
            headers,
            body,
        })
    }
}

#[derive(Debug)]
pub(super) struct Shop {
    pub(super) verifier: JwtVerifier,
    /// What an order needs: the call binding's verifier.
    pub(super) orders: countersign_verify::Verifier,
    /// What a transfer needs, and a large one: one countersigner too.
    pub(super) transfers: countersign_verify::Verifier,
    pub(super) large_transfers: countersign_verify::Verifier,
    pub(super) received: Mutex<Vec<Received>>,
}

impl Shop {
    pub(super) async fn record(&self, call: &Call) -> Option<Value> {
        let token = call
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("DPoP "))
            });
        let claims = match token {
            Some(token) => self
                .verifier
                .verify(token)
                .await
                .ok()
                .map(|identity| identity.claims),
            None => None,
        };
        if let Ok(mut received) = self.received.lock() {
            received.push(Received {
                method: call.method.to_string(),
                path_and_query: call
                    .uri
                    .path_and_query()
                    .map(|p| p.to_string())
                    .unwrap_or_default(),
                headers: call.headers.clone(),
                body: call.body.clone(),
                claims: claims.clone(),
                refused: None,
            });
        }
        claims
    }

    /// Records an order and checks that its token was approved for exactly
    /// this call: its claims, or the refusal to answer.
    pub(super) async fn verified(&self, call: &Call) -> Result<Value, countersign_verify::Refusal> {
        self.verified_by(&self.orders, call)
            .await
            .map(|approval| approval.claims)
    }

    /// Records a call and checks it with `verifier`.
    pub(super) async fn verified_by(
        &self,
        verifier: &countersign_verify::Verifier,
        call: &Call,
    ) -> Result<countersign_verify::Approval, countersign_verify::Refusal> {
        self.record(call).await;
        let (mut parts, ()) = axum::http::Request::new(()).into_parts();
        parts.method = call.method.clone();
        parts.uri = call.uri.clone();
        parts.headers = call.headers.clone();
        let verdict = verifier.verify(&parts, &call.body).await;
        if let (Err(refusal), Ok(mut received)) = (&verdict, self.received.lock()) {
            if let Some(last) = received.last_mut() {
                last.refused = Some(refusal.code().to_owned());
            }
        }
        verdict
    }

    /// How many requests the shop received so far (numbers its answers).
    pub(super) fn count(&self) -> usize {
        self.received.lock().map(|r| r.len()).unwrap_or_default()
    }
}
