//! The JSON-RPC answers the gateway gives on an MCP endpoint itself: tool
//! errors the client shows the model, JSON-RPC errors for messages refused
//! as a whole, progress notifications while a call waits, and the server's
//! recorded answer to an approved call, re-addressed to the request that
//! waits for it.

use bytes::{Bytes, BytesMut};
use serde_json::{json, Value};

use crate::problem::Problem;

/// A tool result with `isError: true`: what an MCP client hands the model
/// (the SDKs turn an HTTP error into a transport failure the model never
/// sees). `structuredContent` is left out: clients check it against the
/// tool's `outputSchema` only when the result is not an error.
pub fn tool_error(id: &Value, problem: &Problem) -> Value {
    tool_error_text(id, &problem.detail, meta(problem))
}

/// A tool error with this text; `countersign` goes under `_meta`.
pub fn tool_error_text(id: &Value, text: &str, countersign: Value) -> Value {
    json!({
        "jsonrpc": "2.0",
        "id": id,
        "result": {
            "content": [{ "type": "text", "text": text }],
            "isError": true,
            "_meta": { "countersign": countersign },
        },
    })
}

/// A JSON-RPC error response (`id` null when unknown).
pub fn rpc_error(id: Option<&Value>, code: i64, problem: &Problem) -> Value {
    json!({
        "jsonrpc": "2.0",
        "id": id.cloned().unwrap_or(Value::Null),
        "error": {
            "code": code,
            "message": problem.detail,
            "data": meta(problem),
        },
    })
}

fn meta(problem: &Problem) -> Value {
    let mut meta = json!({ "code": problem.code });
    if let Some(id) = &problem.approval_id {
        meta["approval_id"] = json!(id);
    }
    if let Some(after) = problem.retry_after {
        meta["retry_after"] = json!(after);
    }
    meta
}

/// `notifications/progress` for the call that waits (`progress` must grow).
pub fn progress(token: &Value, progress: u64, message: &str) -> Value {
    json!({
        "jsonrpc": "2.0",
        "method": "notifications/progress",
        "params": { "progressToken": token, "progress": progress, "message": message },
    })
}

/// One SSE `message` event carrying `message`.
pub fn sse_event(message: &Value) -> Bytes {
    let mut event = BytesMut::from(&b"event: message\ndata: "[..]);
    event.extend_from_slice(&serde_json::to_vec(message).unwrap_or_default());
    event.extend_from_slice(b"\n\n");
    event.freeze()
}

/// Whether a content type is `text/event-stream`.
pub fn is_event_stream(content_type: Option<&[u8]>) -> bool {
    content_type
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("text/event-stream"))
}

/// The server's answer to a JSON body, with its response addressed to `id`.
/// `None` when it is not a JSON-RPC response.
pub fn readdress_json(body: &[u8], id: &Value) -> Option<Vec<u8>> {
    let mut message: Value = serde_json::from_slice(body).ok()?;
    readdress(&mut message, id).then(|| serde_json::to_vec(&message).unwrap_or_default())
}

/// The messages of an SSE body, each as the JSON of one `message` event,
/// the response among them addressed to `id`. Comments, ids and other events
/// are dropped: the stream they belonged to is over.
pub fn readdress_events(body: &[u8], id: &Value) -> Vec<Value> {
    let text = String::from_utf8_lossy(body).replace("\r\n", "\n");
    let mut messages = Vec::new();
    for block in text.split("\n\n") {
        let mut event = "message";
        let mut data = Vec::new();
        for line in block.lines() {
            if let Some(value) = line.strip_prefix("event:") {
                event = value.trim();
            } else if let Some(value) = line.strip_prefix("data:") {
                data.push(value.strip_prefix(' ').unwrap_or(value));
            }
        }
        if event != "message" || data.is_empty() {
            continue;
        }
        if let Ok(mut message) = serde_json::from_str::<Value>(&data.join("\n")) {
            readdress(&mut message, id);
            messages.push(message);
        }
    }
    messages
}

/// Sets the id of a JSON-RPC response; whether it was one.
fn readdress(message: &mut Value, id: &Value) -> bool {
    match message.as_object_mut() {
        Some(object) if object.contains_key("result") || object.contains_key("error") => {
            object.insert("id".to_owned(), id.clone());
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::problem::ProblemCode;

    #[test]
    fn a_denial_is_a_tool_error_for_the_request() {
        let problem = Problem::new(ProblemCode::AccessDenied).with_approval_id("a1");
        let answer = tool_error(&json!(7), &problem);
        assert_eq!(answer["id"], 7);
        assert_eq!(answer["result"]["isError"], true);
        assert_eq!(
            answer["result"]["content"][0]["text"],
            "The user has denied the request."
        );
        assert_eq!(
            answer["result"]["_meta"]["countersign"]["code"],
            "access_denied"
        );
        assert_eq!(
            answer["result"]["_meta"]["countersign"]["approval_id"],
            "a1"
        );
        let error = rpc_error(None, -32600, &problem);
        assert_eq!(error["id"], Value::Null);
        assert_eq!(error["error"]["code"], -32600);
    }

    #[test]
    fn recorded_answers_are_readdressed_to_the_waiting_request() {
        let body = br#"{"jsonrpc":"2.0","id":1,"result":{"content":[]}}"#;
        let out: Value =
            serde_json::from_slice(&readdress_json(body, &json!("r-2")).unwrap()).unwrap();
        assert_eq!(out["id"], "r-2");
        assert!(readdress_json(br#"{"jsonrpc":"2.0","method":"x"}"#, &json!(1)).is_none());
        let sse = b"event: message\r\nid: e1\r\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/message\",\"params\":{}}\r\n\r\n: comment\n\nevent: message\ndata: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}\n\n";
        let messages = readdress_events(sse, &json!(9));
        assert_eq!(messages.len(), 2);
        assert_eq!(messages[0]["method"], "notifications/message");
        assert_eq!(messages[1]["id"], 9);
        assert_eq!(
            sse_event(&messages[1]),
            Bytes::from_static(
                b"event: message\ndata: {\"id\":9,\"jsonrpc\":\"2.0\",\"result\":{}}\n\n"
            )
        );
        assert!(is_event_stream(Some(b"text/event-stream; charset=utf-8")));
        assert!(!is_event_stream(Some(b"application/json")));
    }
}
