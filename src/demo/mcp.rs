//! The example shop as an MCP server, at `/mcp` on the shop's listener:
//! Streamable HTTP without sessions, each POST answered with one JSON
//! message, tools `buy_product` (needs the same token as `POST /shop`) and
//! `list_products` (needs none). Small and hand-written, for `countersign
//! dev` and the tests; the tests' MCP server built with the official SDK is
//! `tests/mcp/server.mjs`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::ledger::{Call, Shop};

const PROTOCOL_VERSIONS: [&str; 4] = ["2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05"];

/// `/mcp`: POST carries one JSON-RPC message; GET (no server stream) and
/// DELETE (no sessions) are 405, which clients take as "not offered".
pub(super) async fn endpoint(State(shop): State<Arc<Shop>>, call: Call) -> Response {
    if call.method != Method::POST {
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    }
    let Ok(message) = serde_json::from_slice::<Value>(&call.body) else {
        return (
            StatusCode::BAD_REQUEST,
            Json(error(&Value::Null, -32700, "Parse error")),
        )
            .into_response();
    };
    let (Some(id), Some(name)) = (message.get("id"), message["method"].as_str()) else {
        // A notification or a response: nothing to answer.
        return StatusCode::ACCEPTED.into_response();
    };
    let params = &message["params"];
    let answer = match name {
        "initialize" => {
            let asked = params["protocolVersion"].as_str().unwrap_or_default();
            let version = PROTOCOL_VERSIONS
                .into_iter()
                .find(|v| *v == asked)
                .unwrap_or(PROTOCOL_VERSIONS[1]);
            result(
                id,
                json!({
                    "protocolVersion": version,
                    "capabilities": { "tools": {} },
                    "serverInfo": { "name": "countersign-example-shop", "version": env!("CARGO_PKG_VERSION") },
                }),
            )
        }
        "ping" => result(id, json!({})),
        "tools/list" => result(id, json!({ "tools": tools() })),
        "tools/call" => {
            let arguments = &params["arguments"];
            match params["name"].as_str() {
                Some("buy_product") => {
                    let claims = shop.verified(&call).await;
                    result(id, buy(claims, arguments))
                }
                Some("list_products") => result(
                    id,
                    json!({ "content": [{ "type": "text", "text": "XYZ phone (450), ABC tablet (700)" }] }),
                ),
                _ => error(id, -32602, "Unknown tool"),
            }
        }
        _ => error(id, -32601, "Method not found"),
    };
    Json(answer).into_response()
}

fn buy(claims: Result<Value, countersign_verify::Refusal>, arguments: &Value) -> Value {
    let refused =
        |text: &str| json!({ "content": [{ "type": "text", "text": text }], "isError": true });
    let claims = match claims {
        Ok(claims) => claims,
        Err(refusal) => {
            return refused(&format!(
                "The shop refused ({}): {}",
                refusal.code(),
                refusal.detail()
            ))
        }
    };
    let (Some(product), Some(qty)) = (arguments["product"].as_str(), arguments["qty"].as_u64())
    else {
        return refused("buy_product needs a product (text) and a qty (a whole number).");
    };
    let buyer = claims["sub"].as_str().unwrap_or_default();
    json!({
        "content": [{ "type": "text", "text": format!("Bought {qty} {product} for {buyer}.") }],
        "structuredContent": { "product": product, "qty": qty, "buyer": buyer },
    })
}

fn tools() -> Value {
    json!([
        {
            "name": "buy_product",
            "description": "Buy a quantity of a product from the shop. Needs the approval of the user.",
            "inputSchema": {
                "type": "object",
                "properties": { "product": { "type": "string" }, "qty": { "type": "integer", "minimum": 1 } },
                "required": ["product", "qty"],
            },
            "outputSchema": {
                "type": "object",
                "properties": { "product": { "type": "string" }, "qty": { "type": "integer" }, "buyer": { "type": "string" } },
                "required": ["product", "qty", "buyer"],
            },
        },
        {
            "name": "list_products",
            "description": "The products the shop sells.",
            "inputSchema": { "type": "object", "properties": {} },
        },
    ])
}

fn result(id: &Value, result: Value) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "result": result })
}

fn error(id: &Value, code: i64, message: &str) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "error": { "code": code, "message": message } })
}
