//! What the example shop keeps and how it checks a call: the requests it
//! received and the verifiers that judge them. Shared by the shop's REST
//! routes (`shop.rs`) and its MCP endpoint (`mcp.rs`), so neither imports
//! the other for it.

use std::sync::Mutex;

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, Uri};
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
    pub(super) async fn record(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: &Bytes,
    ) -> Option<Value> {
        let token = headers
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
                method: method.to_string(),
                path_and_query: uri
                    .path_and_query()
                    .map(|p| p.to_string())
                    .unwrap_or_default(),
                headers: headers.clone(),
                body: body.clone(),
                claims: claims.clone(),
                refused: None,
            });
        }
        claims
    }

    /// Records an order and checks that its token was approved for exactly
    /// this call: its claims, or the refusal to answer.
    pub(super) async fn verified(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: &Bytes,
    ) -> Result<Value, countersign_verify::Refusal> {
        self.verified_by(&self.orders, method, uri, headers, body)
            .await
            .map(|approval| approval.claims)
    }

    /// Records a call and checks it with `verifier`.
    pub(super) async fn verified_by(
        &self,
        verifier: &countersign_verify::Verifier,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: &Bytes,
    ) -> Result<countersign_verify::Approval, countersign_verify::Refusal> {
        self.record(method, uri, headers, body).await;
        let (mut parts, ()) = axum::http::Request::new(()).into_parts();
        parts.method = method.clone();
        parts.uri = uri.clone();
        parts.headers = headers.clone();
        let verdict = verifier.verify(&parts, body).await;
        if let (Err(refusal), Ok(mut received)) = (&verdict, self.received.lock()) {
            if let Some(last) = received.last_mut() {
                last.refused = Some(refusal.code().to_owned());
            }
        }
        verdict
    }
}
