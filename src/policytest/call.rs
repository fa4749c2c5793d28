//! A call written in a test file (or on `countersign explain`'s command
//! line) as the request head and body the gateway would receive.

use bytes::Bytes;
use pingora::http::RequestHeader;

use super::file::CallSpec;
use crate::decision::offline::OfflineIdentity;

/// The `Host` of a call that names none.
pub const DEFAULT_HOST: &str = "localhost";

/// The request head, body and identity of `spec`, or why it cannot be sent.
pub fn build(spec: &CallSpec) -> Result<(RequestHeader, Option<Bytes>, OfflineIdentity), String> {
    let method = spec.method.as_deref().unwrap_or("GET");
    let mut header = RequestHeader::build(method, spec.target.as_bytes(), None)
        .map_err(|e| format!("the call cannot be sent: {e}"))?;
    let names_header = |name: &str| spec.headers.keys().any(|k| k.eq_ignore_ascii_case(name));
    let body = match (&spec.json, &spec.body) {
        (Some(_), Some(_)) => return Err("give the body as json or as body, not both".into()),
        (Some(json), None) => Some(Bytes::from(
            serde_json::to_vec(json).map_err(|e| e.to_string())?,
        )),
        (None, Some(body)) => Some(Bytes::from(body.clone())),
        (None, None) => None,
    };
    if !names_header("host") {
        let host = match (&spec.host, spec.target.parse::<http::Uri>().ok()) {
            (Some(host), _) => host.clone(),
            (None, Some(uri)) if uri.authority().is_some() => {
                uri.authority().map(|a| a.to_string()).unwrap_or_default()
            }
            _ => DEFAULT_HOST.to_owned(),
        };
        append(&mut header, "host", &host)?;
    } else if spec.host.is_some() {
        return Err("give the host as host or as a Host header, not both".into());
    }
    for (name, values) in &spec.headers {
        for value in values.values() {
            append(&mut header, name, value)?;
        }
    }
    if spec.json.is_some() && !names_header("content-type") {
        append(&mut header, "content-type", "application/json")?;
    }
    if let Some(body) = &body {
        if !names_header("content-length") && !names_header("transfer-encoding") {
            append(&mut header, "content-length", &body.len().to_string())?;
        }
    }
    let identity = match &spec.user {
        Some(claims) => OfflineIdentity::Claims(serde_json::Value::Object(claims.clone())),
        None => OfflineIdentity::Configured,
    };
    Ok((header, body, identity))
}

fn append(header: &mut RequestHeader, name: &str, value: &str) -> Result<(), String> {
    header
        .append_header(name.to_owned(), value)
        .map(|_| ())
        .map_err(|e| format!("the header {name:?} cannot be sent: {e}"))
}
