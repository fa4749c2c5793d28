//! The example shop API behind the gateway. It trusts nobody: every order
//! needs an access token that verifies against the authorization server's
//! JWKS, is meant for the shop's audience, carries scope `product:buy` and
//! was approved for exactly that call (`countersign-verify`,
//! docs/call-binding.md).
//! It records what it received, so tests can check what crossed the gateway.
//! At `/mcp` it is also an MCP server with the tool `buy_product`
//! ([`super::mcp`]).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::identity::JwtVerifier;

pub const SHOP_AUDIENCE: &str = "https://shop.example/api";
pub const BUY_SCOPE: &str = "product:buy";
pub const TRANSFER_SCOPE: &str = "payments:transfer";
/// From this amount on a transfer needs a countersigner besides the person
/// (policies/conditions.yaml, `transfer-large`); the shop checks it too.
pub const LARGE_TRANSFER: f64 = 10_000.0;

pub use super::ledger::Received;
use super::ledger::{Call, Shop};

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
        jwks_uri.clone(),
        issuer,
        SHOP_AUDIENCE,
        "sub",
    );
    let orders = countersign_verify::Verifier::new(countersign_verify::Config {
        required_scopes: vec![BUY_SCOPE.to_owned()],
        ..countersign_verify::Config::new(issuer, SHOP_AUDIENCE, jwks_uri.as_str())
    })
    .map_err(std::io::Error::other)?;
    let transfers_config = countersign_verify::Config {
        required_scopes: vec![TRANSFER_SCOPE.to_owned()],
        ..countersign_verify::Config::new(issuer, SHOP_AUDIENCE, jwks_uri.as_str())
    };
    let transfers = countersign_verify::Verifier::new(transfers_config.clone())
        .map_err(std::io::Error::other)?;
    let large_transfers = countersign_verify::Verifier::new(countersign_verify::Config {
        required_countersigners: 1,
        ..transfers_config
    })
    .map_err(std::io::Error::other)?;
    let shop = Arc::new(Shop {
        verifier,
        orders,
        transfers,
        large_transfers,
        received: Mutex::new(Vec::new()),
    });
    let app = Router::new()
        .route("/shop", post(buy))
        .route("/products", get(products))
        .route("/mcp", axum::routing::any(super::mcp::endpoint))
        .route("/gift-cards", post(send_gift_card))
        .route("/transfers", post(transfer))
        .fallback(other)
        .with_state(shop.clone());
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(ShopHandle { shop, addr })
}

impl Shop {
    /// Records the call, then checks what a purchase needs: a token approved
    /// for exactly this call, with scope `product:buy`, and a JSON body. Gives the token's claims
    /// and the body, or the refusal to answer.
    async fn purchase(&self, call: &Call) -> Result<(Value, Value), Response> {
        let claims = self
            .verified(call)
            .await
            .map_err(|refusal| refusal.into_response::<axum::body::Body>())?;
        let Ok(parsed) = serde_json::from_slice::<Value>(&call.body) else {
            return Err(error(StatusCode::BAD_REQUEST, "the body must be JSON"));
        };
        Ok((claims, parsed))
    }
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

async fn buy(State(shop): State<Arc<Shop>>, call: Call) -> Result<Response, Response> {
    let (claims, order) = shop.purchase(&call).await?;
    Ok(Json(json!({
        "order_id": format!("ord-{}", shop.count()),
        "status": "confirmed",
        "product": order["product"],
        "qty": order["qty"],
        "buyer": claims["sub"],
    }))
    .into_response())
}

async fn send_gift_card(State(shop): State<Arc<Shop>>, call: Call) -> Result<Response, Response> {
    let (claims, card) = shop.purchase(&call).await?;
    let created = Json(json!({
        "gift_card_id": format!("gc-{}", shop.count()),
        "status": "sent",
        "amount": card["amount"],
        "to": card["to"],
        "from": claims["sub"],
    }));
    Ok((StatusCode::CREATED, created).into_response())
}

/// A transfer: approved by the person for exactly this call and, from
/// [`LARGE_TRANSFER`] on, countersigned by someone else as well.
async fn transfer(State(shop): State<Arc<Shop>>, call: Call) -> Response {
    let parsed = serde_json::from_slice::<Value>(&call.body).unwrap_or(Value::Null);
    let large = parsed["amount"]
        .as_f64()
        .is_none_or(|amount| amount >= LARGE_TRANSFER);
    let verifier = if large {
        &shop.large_transfers
    } else {
        &shop.transfers
    };
    let approval = match shop.verified_by(verifier, &call).await {
        Ok(approval) => approval,
        Err(refusal) => return refusal.into_response::<axum::body::Body>(),
    };
    let created = Json(json!({
        "transfer_id": format!("tr-{}", shop.count()),
        "amount": parsed["amount"],
        "to": parsed["to"],
        "from": approval.subject,
        "countersigned_by": approval.countersigners,
    }));
    (StatusCode::CREATED, created).into_response()
}

async fn products(State(shop): State<Arc<Shop>>, call: Call) -> Response {
    shop.record(&call).await;
    Json(json!([{ "product": "XYZ phone", "price": 450 }, { "product": "ABC tablet", "price": 700 }])).into_response()
}

async fn other(State(shop): State<Arc<Shop>>, call: Call) -> Response {
    shop.record(&call).await;
    let missing = json!({ "error": "no such resource", "path": call.uri.path() });
    (StatusCode::NOT_FOUND, Json(missing)).into_response()
}
