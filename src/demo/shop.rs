//! The example shop API behind the gateway. It trusts nobody: every order
//! needs an access token that verifies against the authorization server's
//! JWKS, is meant for the shop's audience and carries scope `product:buy`.
//! It records what it received, so tests can check what crossed the gateway.
//! At `/mcp` it is also an MCP server with the tool `buy_product`
//! ([`super::mcp`]).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::identity::JwtVerifier;

pub const SHOP_AUDIENCE: &str = "https://shop.example/api";
pub const BUY_SCOPE: &str = "product:buy";

/// One request as the shop saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The verified claims of the bearer token, when it verified.
    pub claims: Option<Value>,
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
    verifier: JwtVerifier,
    received: Mutex<Vec<Received>>,
}

/// A running shop.
#[derive(Debug, Clone)]
pub struct ShopHandle {
    shop: Arc<Shop>,
    pub addr: SocketAddr,
}

impl ShopHandle {
    /// Everything received so far, oldest first.
    pub fn received(&self) -> Vec<Received> {
        self.shop
            .received
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }
}

/// Serves the shop on `listener` until the runtime stops.
pub async fn serve(
    listener: tokio::net::TcpListener,
    issuer: &str,
    jwks_uri: url::Url,
) -> std::io::Result<ShopHandle> {
    let verifier = JwtVerifier::with_keys(
        reqwest::Client::new(),
        jwks_uri,
        issuer,
        SHOP_AUDIENCE,
        "sub",
    );
    let shop = Arc::new(Shop {
        verifier,
        received: Mutex::new(Vec::new()),
    });
    let app = Router::new()
        .route("/shop", post(buy))
        .route("/products", get(products))
        .route("/mcp", axum::routing::any(super::mcp::endpoint))
        .route("/gift-cards", post(send_gift_card))
        .fallback(other)
        .with_state(shop.clone());
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(ShopHandle { shop, addr })
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
            .and_then(|v| v.strip_prefix("Bearer "));
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
            });
        }
        claims
    }
}

impl Shop {
    /// Records the call, then checks what a purchase needs: a verified token
    /// with scope `product:buy`, and a JSON body. Gives the token's claims
    /// and the body, or the refusal to answer.
    async fn purchase(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: &Bytes,
    ) -> Result<(Value, Value), Response> {
        let Some(claims) = self.record(method, uri, headers, body).await else {
            return Err(error(
                StatusCode::UNAUTHORIZED,
                "a valid access token for the shop is required",
            ));
        };
        if !grants_buy(&claims) {
            return Err(error(
                StatusCode::FORBIDDEN,
                "the token lacks scope product:buy",
            ));
        }
        let Ok(parsed) = serde_json::from_slice::<Value>(body) else {
            return Err(error(StatusCode::BAD_REQUEST, "the body must be JSON"));
        };
        Ok((claims, parsed))
    }
}

/// Whether a verified token's claims carry scope `product:buy`.
pub(super) fn grants_buy(claims: &Value) -> bool {
    let scopes = claims["scope"].as_str().unwrap_or_default();
    scopes.split(' ').any(|s| s == BUY_SCOPE)
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

async fn buy(
    State(shop): State<Arc<Shop>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (claims, order) = match shop.purchase(&method, &uri, &headers, &body).await {
        Ok(found) => found,
        Err(refused) => return refused,
    };
    let count = shop.received.lock().map(|r| r.len()).unwrap_or_default();
    Json(json!({
        "order_id": format!("ord-{count}"),
        "status": "confirmed",
        "product": order["product"],
        "qty": order["qty"],
        "buyer": claims["sub"],
    }))
    .into_response()
}

async fn send_gift_card(
    State(shop): State<Arc<Shop>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (claims, card) = match shop.purchase(&method, &uri, &headers, &body).await {
        Ok(found) => found,
        Err(refused) => return refused,
    };
    let count = shop.received.lock().map(|r| r.len()).unwrap_or_default();
    (
        StatusCode::CREATED,
        Json(json!({
            "gift_card_id": format!("gc-{count}"),
            "status": "sent",
            "amount": card["amount"],
            "to": card["to"],
            "from": claims["sub"],
        })),
    )
        .into_response()
}

async fn products(
    State(shop): State<Arc<Shop>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    shop.record(&method, &uri, &headers, &Bytes::new()).await;
    Json(json!([{ "product": "XYZ phone", "price": 450 }, { "product": "ABC tablet", "price": 700 }])).into_response()
}

async fn other(
    State(shop): State<Arc<Shop>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    shop.record(&method, &uri, &headers, &body).await;
    (
        StatusCode::NOT_FOUND,
        Json(json!({ "error": "no such resource", "path": uri.path() })),
    )
        .into_response()
}
