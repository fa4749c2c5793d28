//! MCP over Streamable HTTP, as the gateway reads it: each POST to an MCP
//! endpoint carries one JSON-RPC message (or, in older revisions, a batch),
//! and the gateway holds a `tools/call` of a tool some policy names.
//!
//! [`classify`] reads a POST body the one way any MCP server could read it:
//! strictly parsed JSON ([`crate::policy::body`]: no duplicate or case-twin
//! keys at any level), member names compared ignoring letter case (so that a
//! lenient server finds no `Method` the gateway missed), tool names compared
//! exactly (a name that equals a held tool only ignoring case is refused),
//! batches holding a held call refused, and the `Mcp-Method` / `Mcp-Name`
//! headers of newer clients checked against the body (`Mcp-Name` decoded
//! from `=?base64?…?=` first), and so is every
//! `Mcp-Param-<Name>` header of a held call ([`check_param_headers`]).
//! Everything it does not hold or refuse passes untouched. [`jsonrpc`]
//! shapes the answers.

pub mod jsonrpc;

use base64::Engine as _;
use http::header::CONTENT_ENCODING;
use http::HeaderMap;
use serde_json::{Map, Value};
use thiserror::Error;

use crate::policy::body::{self, fold_case, BodyError};
use crate::policy::{McpEndpoint, ToolMatch};
use crate::problem::ProblemCode;

pub const TOOLS_CALL: &str = "tools/call";
pub const CANCELLED: &str = "notifications/cancelled";
pub const METHOD_HEADER: &str = "mcp-method";
pub const NAME_HEADER: &str = "mcp-name";
pub const SESSION_HEADER: &str = "mcp-session-id";
/// `Mcp-Param-<Name>`: an argument a tool marks (`x-mcp-header`) mirrored
/// into a header (revision 2026-07-28), lower case as `http` keeps names.
pub const PARAM_HEADER_PREFIX: &str = "mcp-param-";

/// What the gateway does with one POST on an MCP endpoint.
#[derive(Debug, PartialEq)]
pub enum Classified {
    /// Forwarded untouched: initialize, tools/list, notifications,
    /// responses, calls of tools no policy holds.
    Pass,
    /// `notifications/cancelled` for these request ids: forwarded, and the
    /// held calls they name are stopped.
    Cancel(Vec<Value>),
    /// A `tools/call` of a held tool.
    Held(ToolCall),
}

/// A held `tools/call`.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    /// The index of the policy that holds it ([`crate::policy::PolicySet::at`]).
    pub policy: usize,
    /// The JSON-RPC request id (a string or a number).
    pub id: Value,
    pub name: String,
    /// `params.arguments` (an object, or `{}` when absent).
    pub arguments: Value,
    /// `params._meta.progressToken`, if the client asked for progress.
    pub progress_token: Option<Value>,
    /// What makes two calls the same call: the method and the params without
    /// `_meta` (canonical JSON, keys sorted). Not the request id nor the
    /// progress token, which a client's retry changes.
    pub fingerprint: Vec<u8>,
}

/// Why a POST on an MCP endpoint is refused. `Display` is a sentence an
/// agent (or its model) can relay.
#[derive(Debug, Error, PartialEq)]
pub enum McpRefusal {
    #[error("The MCP message was refused: {0}.")]
    Body(BodyError),
    #[error("The MCP message must be sent without Content-Encoding, so that the gateway can read which tool it calls.")]
    Encoded,
    #[error("A JSON-RPC batch that calls the tool '{0}' is refused: that tool needs a person's approval, so send each tools/call in a request of its own.")]
    Batch(String),
    #[error("The {header} header says '{sent}' but the message says '{body}'; they must agree, so the call was refused.")]
    HeaderMismatch {
        id: Option<Value>,
        header: String,
        sent: String,
        body: String,
    },
    #[error(
        "The method '{method}' differs from tools/call only in letter case; send it as tools/call."
    )]
    MethodCase { id: Option<Value>, method: String },
    #[error("The tool '{name}' is refused: it differs from the tool '{held}' only in letter case. Call '{held}' exactly as the server lists it.")]
    ToolNameCase {
        policy: usize,
        id: Value,
        name: String,
        held: String,
    },
    #[error("This tools/call is malformed ({0}), so the gateway cannot tell which tool it calls.")]
    Malformed(&'static str, Option<Value>),
}

impl McpRefusal {
    /// The request id the answer goes to (`None`: unknown, JSON-RPC `null`).
    pub fn id(&self) -> Option<&Value> {
        match self {
            Self::Body(_) | Self::Encoded | Self::Batch(_) => None,
            Self::HeaderMismatch { id, .. } | Self::MethodCase { id, .. } => id.as_ref(),
            Self::Malformed(_, id) => id.as_ref(),
            Self::ToolNameCase { id, .. } => Some(id),
        }
    }

    pub fn code(&self) -> ProblemCode {
        match self {
            Self::Body(_) | Self::Encoded | Self::Malformed(..) | Self::MethodCase { .. } => {
                ProblemCode::InvalidMcpMessage
            }
            Self::Batch(_) => ProblemCode::McpBatchRefused,
            Self::HeaderMismatch { .. } => ProblemCode::McpHeaderMismatch,
            Self::ToolNameCase { .. } => ProblemCode::McpToolNameCase,
        }
    }

    /// The policy whose tool this concerns, if known.
    pub fn policy(&self) -> Option<usize> {
        match self {
            Self::ToolNameCase { policy, .. } => Some(*policy),
            _ => None,
        }
    }

    /// Whether the model is told as a tool result (`isError: true`) rather
    /// than a JSON-RPC error: only for a call the model chose (a tool name
    /// it can correct). The others are messages a client should never send
    /// (a batch, headers that contradict the body, broken JSON): JSON-RPC
    /// errors, as the specification has them for protocol errors.
    pub fn is_tool_error(&self) -> bool {
        matches!(self, Self::ToolNameCase { .. })
    }

    /// The JSON-RPC error code: -32700 for unreadable JSON, -32600 for
    /// messages refused as a whole, -32602 for bad `tools/call` params.
    pub fn rpc_code(&self) -> i64 {
        match self {
            Self::Body(BodyError::Syntax(_)) => -32700,
            Self::Malformed(..) => -32602,
            _ => -32600,
        }
    }
}

/// Reads one POST body on `endpoint` (see the module documentation).
pub fn classify(
    endpoint: &McpEndpoint,
    headers: &HeaderMap,
    body: Option<&[u8]>,
) -> Result<Classified, McpRefusal> {
    if headers.get_all(CONTENT_ENCODING).iter().any(|v| {
        !v.to_str()
            .is_ok_and(|v| v.trim().eq_ignore_ascii_case("identity"))
    }) {
        return Err(McpRefusal::Encoded);
    }
    let method_header = one_header(headers, METHOD_HEADER)?;
    let name_header = one_header(headers, NAME_HEADER)?;
    let Some(bytes) = body.filter(|b| !b.iter().all(u8::is_ascii_whitespace)) else {
        return match method_header.or(name_header) {
            Some((header, sent)) => Err(McpRefusal::HeaderMismatch {
                id: None,
                header: header.to_owned(),
                sent,
                body: "nothing".to_owned(),
            }),
            None => Ok(Classified::Pass),
        };
    };
    let value = body::parse(bytes).map_err(McpRefusal::Body)?;
    match value {
        Value::Array(items) => {
            if let Some((header, sent)) = method_header.or(name_header) {
                return Err(McpRefusal::HeaderMismatch {
                    id: None,
                    header: header.to_owned(),
                    sent,
                    body: "a batch".to_owned(),
                });
            }
            let mut cancelled = Vec::new();
            for item in &items {
                match one(endpoint, item, None, None) {
                    Ok(Classified::Pass) => {}
                    Ok(Classified::Cancel(ids)) => cancelled.extend(ids),
                    Ok(Classified::Held(call)) => return Err(McpRefusal::Batch(call.name)),
                    Err(McpRefusal::ToolNameCase { name, .. }) => {
                        return Err(McpRefusal::Batch(name))
                    }
                    Err(refusal) => return Err(refusal),
                }
            }
            Ok(match cancelled.is_empty() {
                true => Classified::Pass,
                false => Classified::Cancel(cancelled),
            })
        }
        value => match one(endpoint, &value, method_header, name_header)? {
            Classified::Held(call) => {
                check_param_headers(headers, &call)?;
                Ok(Classified::Held(call))
            }
            other => Ok(other),
        },
    }
}

/// Every `Mcp-Param-<Name>` header of a held call must agree with the
/// argument `<Name>` of its body, or the call is refused: a server (or an
/// intermediary before it) may read the argument from the header, while the
/// person is shown the body's.
///
/// - Names: the header's `<Name>` is compared with the argument names
///   ignoring letter case (header names have no case; strict parsing leaves
///   no two arguments equal ignoring case). A header naming no argument is
///   refused: the gateway does not know the tool's `x-mcp-header` mapping,
///   so it cannot tell which argument it stands for. So is `Mcp-Param-`
///   with no name, and a header sent twice.
/// - Values: the header's text (surrounding spaces trimmed, as HTTP does),
///   decoded first when it is exactly `=?base64?<standard Base64>?=` (UTF-8;
///   an undecodable one is refused, and so is the wrapper in any other
///   letter case, which a lenient server might decode too), must equal the
///   argument written the way clients write it: a string as it is, `true` /
///   `false`, an integer in plain decimal (`2`, not `02`, `2.0` or `2e0`).
///   A null, object, array or non-integer argument, or a missing one, agrees
///   with no header.
pub fn check_param_headers(headers: &HeaderMap, call: &ToolCall) -> Result<(), McpRefusal> {
    let Value::Object(arguments) = &call.arguments else {
        return Ok(());
    };
    for name in headers.keys() {
        let Some(param) = name.as_str().strip_prefix(PARAM_HEADER_PREFIX) else {
            continue;
        };
        let refuse = |sent: String, body: &str| McpRefusal::HeaderMismatch {
            id: Some(call.id.clone()),
            header: name.as_str().to_owned(),
            sent,
            body: body.to_owned(),
        };
        let mut values = headers.get_all(name).iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            return Err(refuse("several values".to_owned(), "one"));
        };
        let Ok(text) = value.to_str() else {
            return Err(refuse(
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
                "plain text",
            ));
        };
        let sent = decode_param(text.trim_matches([' ', '\t']))
            .ok_or_else(|| refuse(text.to_owned(), "a value that decodes one way only"))?;
        let argument = match param.is_empty() {
            true => None,
            false => arguments
                .iter()
                .find(|(key, _)| fold_case(key) == param)
                .map(|(_, value)| value),
        };
        let body = match argument {
            None => return Err(refuse(sent, "no argument of that name")),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Bool(b)) => b.to_string(),
            Some(Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
            Some(Value::Null) => return Err(refuse(sent, "null")),
            Some(_) => return Err(refuse(sent, "a value no header can carry")),
        };
        if sent != body {
            return Err(refuse(sent, &body));
        }
    }
    Ok(())
}

/// An `Mcp-Name` or `Mcp-Param-*` value as the specification has clients write it: the
/// text, or `=?base64?...?=` around the UTF-8 of a value that cannot travel
/// as plain ASCII. `None`: it cannot be read one way only.
fn decode_param(text: &str) -> Option<String> {
    const OPEN: &str = "=?base64?";
    const CLOSE: &str = "?=";
    let wrapped = text.len() >= OPEN.len() + CLOSE.len()
        && text.is_char_boundary(OPEN.len())
        && text[..OPEN.len()].eq_ignore_ascii_case(OPEN)
        && text.ends_with(CLOSE);
    if !wrapped {
        return Some(text.to_owned());
    }
    if !text.starts_with(OPEN) {
        return None;
    }
    let payload = &text[OPEN.len()..text.len() - CLOSE.len()];
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(payload)
        .ok()?;
    String::from_utf8(bytes).ok()
}

/// A header sent at most once, as text.
fn one_header(
    headers: &HeaderMap,
    name: &'static str,
) -> Result<Option<(&'static str, String)>, McpRefusal> {
    let mut values = headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (None, _) => Ok(None),
        (Some(value), None) => match value.to_str() {
            Ok(text) => Ok(Some((name, text.trim().to_owned()))),
            Err(_) => Err(McpRefusal::HeaderMismatch {
                id: None,
                header: name.to_owned(),
                sent: String::from_utf8_lossy(value.as_bytes()).into_owned(),
                body: "plain text".to_owned(),
            }),
        },
        (Some(_), Some(_)) => Err(McpRefusal::HeaderMismatch {
            id: None,
            header: name.to_owned(),
            sent: "several values".to_owned(),
            body: "one".to_owned(),
        }),
    }
}

/// A member of an object by name, ignoring letter case (strict parsing
/// leaves at most one).
fn member<'v>(object: &'v Map<String, Value>, name: &str) -> Option<&'v Value> {
    object.get(name).or_else(|| {
        object
            .iter()
            .find(|(k, _)| fold_case(k) == name)
            .map(|(_, v)| v)
    })
}

fn one(
    endpoint: &McpEndpoint,
    message: &Value,
    method_header: Option<(&'static str, String)>,
    name_header: Option<(&'static str, String)>,
) -> Result<Classified, McpRefusal> {
    let Value::Object(message) = message else {
        return match method_header.or(name_header) {
            Some((header, sent)) => Err(McpRefusal::HeaderMismatch {
                id: None,
                header: header.to_owned(),
                sent,
                body: "no JSON-RPC message".to_owned(),
            }),
            None => Ok(Classified::Pass),
        };
    };
    let id = member(message, "id").filter(|id| !id.is_null()).cloned();
    let method = member(message, "method").and_then(Value::as_str);
    let params = member(message, "params");
    let mismatch = |header: &str, sent: String, body: &str| McpRefusal::HeaderMismatch {
        id: id.clone(),
        header: header.to_owned(),
        sent,
        body: body.to_owned(),
    };
    if let Some((header, sent)) = method_header {
        let body = method.unwrap_or("no method");
        if sent != body {
            return Err(mismatch(header, sent, body));
        }
    }
    let params_object = params.and_then(Value::as_object);
    if let Some((header, sent)) = name_header {
        let body = params_object
            .and_then(|p| member(p, "name").or_else(|| member(p, "uri")))
            .and_then(Value::as_str)
            .unwrap_or("no name");
        // A name that cannot travel as plain ASCII is sent as `=?base64?…?=`
        // (revision 2026-07-28), and servers decode it before comparing: so
        // does the gateway, with the rules of `Mcp-Param-*` values. A name
        // only spelled like the wrapper is no name a client sends as it is.
        if decode_param(&sent).as_deref() != Some(body) {
            return Err(mismatch(header, sent, body));
        }
    }
    let Some(method) = method else {
        return Ok(Classified::Pass);
    };
    if method != TOOLS_CALL {
        if fold_case(method) == TOOLS_CALL {
            return Err(McpRefusal::MethodCase {
                id,
                method: method.to_owned(),
            });
        }
        if method == CANCELLED {
            let ids = params_object
                .and_then(|p| member(p, "requestid"))
                .filter(|id| id.is_string() || id.is_number())
                .cloned();
            return Ok(ids.map_or(Classified::Pass, |id| Classified::Cancel(vec![id])));
        }
        return Ok(Classified::Pass);
    }
    let params = params_object.ok_or(McpRefusal::Malformed(
        "params must be an object",
        id.clone(),
    ))?;
    let name = member(params, "name")
        .and_then(Value::as_str)
        .ok_or(McpRefusal::Malformed(
            "params.name must be a string",
            id.clone(),
        ))?;
    let policy = match endpoint.tool(name) {
        ToolMatch::Free => return Ok(Classified::Pass),
        ToolMatch::Held(policy) => policy,
        ToolMatch::CaseVariant(policy) => {
            return Err(McpRefusal::ToolNameCase {
                policy,
                id: id.unwrap_or(Value::Null),
                name: name.to_owned(),
                held: endpoint.pattern(policy).to_owned(),
            })
        }
    };
    // A tools/call without an id is a notification no server should run;
    // a lenient one might: refused rather than passed.
    let id = id
        .filter(|id| id.is_string() || id.is_i64() || id.is_u64())
        .ok_or(McpRefusal::Malformed(
            "a held tool's call needs a string or integer id",
            None,
        ))?;
    let arguments = match member(params, "arguments") {
        None => Value::Object(Map::new()),
        Some(Value::Object(arguments)) => Value::Object(arguments.clone()),
        Some(_) => {
            return Err(McpRefusal::Malformed(
                "params.arguments must be an object",
                Some(id),
            ))
        }
    };
    let progress_token = member(params, "_meta")
        .and_then(Value::as_object)
        .and_then(|meta| member(meta, "progresstoken"))
        .filter(|t| t.is_string() || t.is_number())
        .cloned();
    let without_meta: Map<String, Value> = params
        .iter()
        .filter(|(k, _)| fold_case(k) != "_meta")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let fingerprint = serde_json::to_vec(&serde_json::json!({
        "method": TOOLS_CALL,
        "params": without_meta,
    }))
    .unwrap_or_default();
    Ok(Classified::Held(ToolCall {
        policy,
        id,
        name: name.to_owned(),
        arguments,
        progress_token,
        fingerprint,
    }))
}

/// The held tool a body calls, if it carries a JSON-RPC `tools/call` (or a
/// batch holding one) of a tool one of `endpoints` holds, in any letter
/// case: `(tool name as sent, endpoint path)`. For a call sent to another
/// path than the endpoint: servers that keep the deprecated HTTP+SSE
/// transport (revision 2024-11-05) beside Streamable HTTP run a tools/call
/// POSTed to `/messages?sessionId=...` as well. Read as leniently as any
/// server might: a UTF-8 BOM dropped, member names in any case, and a body
/// that looks like JSON but is not strict JSON counts when any of its
/// strings is `tools/call` (in any case) and any other names a held tool.
pub fn stray_tool_call<'e>(
    endpoints: &[&'e McpEndpoint],
    body: &[u8],
) -> Option<(String, &'e str)> {
    if endpoints.is_empty() {
        return None;
    }
    let body = body.strip_prefix("\u{feff}".as_bytes()).unwrap_or(body);
    let held = |name: &str| {
        endpoints
            .iter()
            .find(|e| e.tool(name) != ToolMatch::Free)
            .map(|e| (name.chars().take(64).collect(), e.path_template.as_str()))
    };
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Array(items)) => items.iter().find_map(|item| stray_call(item, &held)),
        Ok(value) => stray_call(&value, &held),
        Err(_) => {
            if !matches!(body.trim_ascii_start().first(), Some(b'{' | b'[')) {
                return None;
            }
            let strings: Vec<String> = crate::policy::shadow::json_string_literals(body)
                .into_iter()
                .map(|(literal, _)| literal)
                .collect();
            strings
                .iter()
                .any(|s| fold_case(s) == TOOLS_CALL)
                .then(|| strings.iter().find_map(|s| held(s)))
                .flatten()
        }
    }
}

fn stray_call<'e>(
    message: &Value,
    held: &impl Fn(&str) -> Option<(String, &'e str)>,
) -> Option<(String, &'e str)> {
    let message = message.as_object()?;
    let method = message
        .iter()
        .find(|(k, _)| fold_case(k) == "method")
        .and_then(|(_, v)| v.as_str())?;
    if fold_case(method) != TOOLS_CALL {
        return None;
    }
    let params = message
        .iter()
        .find(|(k, _)| fold_case(k) == "params")
        .map(|(_, v)| v)?;
    match params {
        Value::Object(params) => params
            .iter()
            .filter(|(k, _)| fold_case(k) == "name")
            .filter_map(|(_, v)| v.as_str())
            .find_map(held),
        // Positional params: any string in them may be the name.
        Value::Array(items) => items.iter().filter_map(Value::as_str).find_map(held),
        _ => None,
    }
}

/// Whether a request on an MCP endpoint passes without being read: a GET,
/// HEAD or OPTIONS that announces no body (no `Transfer-Encoding`, no
/// `Content-Length` but `0`). One with a body is read like a POST.
pub fn is_bodiless_stream_request(header: &http::request::Parts) -> bool {
    let headers = &header.headers;
    [http::Method::GET, http::Method::HEAD, http::Method::OPTIONS].contains(&header.method)
        && !headers.contains_key(http::header::TRANSFER_ENCODING)
        && headers
            .get_all(http::header::CONTENT_LENGTH)
            .iter()
            .all(|v| v.as_bytes().trim_ascii() == b"0")
}

/// Whether a client accepts an SSE answer (`Accept` names
/// `text/event-stream`).
pub fn accepts_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get_all(http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            t.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .eq_ignore_ascii_case("text/event-stream")
        })
}

#[cfg(test)]
mod tests;
