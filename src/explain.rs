//! `countersign explain`: one call, given like curl's command line or as a
//! raw HTTP request, decided offline by the gateway's one decision
//! ([`crate::decision`]) and printed step by step: the canonical request,
//! the route, the policies tried with each condition's value, and what the
//! person would be asked, or the refusal and why.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use thiserror::Error;

use crate::config::Config;
use crate::decision::offline::{self, OfflineCall};
use crate::decision::{Decision, Refusal};
use crate::policytest::call;
use crate::policytest::file::{CallSpec, HeaderValues};

#[derive(Debug, Error)]
pub enum ExplainError {
    #[error("{0}")]
    Call(String),
    #[error("the raw request cannot be read: {0}")]
    Raw(String),
}

/// A call as curl's flags give it.
#[derive(Debug, Default, Clone)]
pub struct CurlCall {
    /// `-X`; `POST` with data and no `-X`, else `GET`.
    pub method: Option<String>,
    /// `-H "Name: value"`, in order.
    pub headers: Vec<String>,
    /// `-d`: sent as given, as `application/x-www-form-urlencoded` unless a
    /// `Content-Type` is given (as curl sends it).
    pub data: Option<String>,
    /// `--json`: sent as given, as `application/json`.
    pub json: Option<String>,
    pub url: String,
    /// The approving person's claims (JSON with a string `sub`).
    pub claims: Option<serde_json::Map<String, serde_json::Value>>,
}

impl CurlCall {
    /// The call as curl would send it: origin-form target, `Host` from the
    /// URL.
    pub fn spec(&self) -> Result<CallSpec, ExplainError> {
        let uri: http::Uri = self
            .url
            .parse()
            .map_err(|e| ExplainError::Call(format!("{:?} is not a URL: {e}", self.url)))?;
        let authority = uri
            .authority()
            .ok_or_else(|| ExplainError::Call(format!("{:?} names no host", self.url)))?;
        let target = uri
            .path_and_query()
            .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
        let mut headers: BTreeMap<String, HeaderValues> = BTreeMap::new();
        for raw in &self.headers {
            let (name, value) = raw
                .split_once(':')
                .ok_or_else(|| ExplainError::Call(format!("the header {raw:?} has no ':'")))?;
            add_header(&mut headers, name.trim(), value.trim());
        }
        let has = |headers: &BTreeMap<String, HeaderValues>, name: &str| {
            headers.keys().any(|k| k.eq_ignore_ascii_case(name))
        };
        let body = match (&self.data, &self.json) {
            (Some(_), Some(_)) => {
                return Err(ExplainError::Call("give -d or --json, not both".into()))
            }
            (Some(data), None) => {
                if !has(&headers, "content-type") {
                    add_header(
                        &mut headers,
                        "content-type",
                        "application/x-www-form-urlencoded",
                    );
                }
                Some(data.clone())
            }
            (None, Some(json)) => {
                if !has(&headers, "content-type") {
                    add_header(&mut headers, "content-type", "application/json");
                }
                if !has(&headers, "accept") {
                    add_header(&mut headers, "accept", "application/json");
                }
                Some(json.clone())
            }
            (None, None) => None,
        };
        let method = self
            .method
            .clone()
            .unwrap_or_else(|| if body.is_some() { "POST" } else { "GET" }.to_owned());
        if !has(&headers, "host") {
            add_header(&mut headers, "host", authority.as_str());
        }
        Ok(CallSpec {
            method: Some(method),
            target,
            host: None,
            headers,
            json: None,
            body,
            user: self.claims.clone(),
        })
    }
}

fn add_header(headers: &mut BTreeMap<String, HeaderValues>, name: &str, value: &str) {
    let name = name.to_ascii_lowercase();
    let values = match headers.remove(&name) {
        None => HeaderValues::One(value.to_owned()),
        Some(HeaderValues::One(first)) => HeaderValues::Many(vec![first, value.to_owned()]),
        Some(HeaderValues::Many(mut all)) => {
            all.push(value.to_owned());
            HeaderValues::Many(all)
        }
    };
    headers.insert(name, values);
}

/// A raw HTTP/1.1 request: request line, header lines, an empty line, the
/// body (as it is; a chunked body is not decoded).
pub fn parse_raw(
    raw: &[u8],
    claims: Option<serde_json::Map<String, serde_json::Value>>,
) -> Result<CallSpec, ExplainError> {
    let (head, body) = split_head(raw);
    let head =
        std::str::from_utf8(head).map_err(|_| ExplainError::Raw("the head is not UTF-8".into()))?;
    let mut lines = head.lines();
    let request_line = lines
        .next()
        .ok_or_else(|| ExplainError::Raw("it is empty".into()))?;
    let mut parts = request_line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Err(ExplainError::Raw(format!(
            "{request_line:?} is not a request line (METHOD TARGET HTTP/1.1)"
        )));
    };
    let mut headers = BTreeMap::new();
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| ExplainError::Raw(format!("the header line {line:?} has no ':'")))?;
        add_header(&mut headers, name.trim(), value.trim());
    }
    let body = (!body.is_empty())
        .then(|| String::from_utf8(body.to_vec()))
        .transpose()
        .map_err(|_| ExplainError::Raw("the body is not UTF-8".into()))?;
    Ok(CallSpec {
        method: Some(method.to_owned()),
        target: target.to_owned(),
        host: None,
        headers,
        json: None,
        body,
        user: claims,
    })
}

fn split_head(raw: &[u8]) -> (&[u8], &[u8]) {
    for (separator, len) in [(&b"\r\n\r\n"[..], 4), (&b"\n\n"[..], 2)] {
        if let Some(pos) = raw.windows(len).position(|w| w == separator) {
            return (&raw[..pos], &raw[pos + len..]);
        }
    }
    (raw, &[])
}

/// Every step the gateway takes deciding `spec`, and the result.
pub fn explain(config: &Config, spec: &CallSpec) -> Result<String, ExplainError> {
    let (header, body, identity) = call::build(spec).map_err(ExplainError::Call)?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "call: {} {} (Host: {})",
        header.method,
        String::from_utf8_lossy(header.raw_path()),
        header
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("none")
    );
    let decided = offline::decide(
        config,
        OfflineCall::new(
            header,
            body,
            config.gateway.limits.max_body_bytes,
            identity,
            &config.gateway.identity,
        ),
    );
    for (n, step) in decided.steps.iter().enumerate() {
        let mut lines = step.to_string();
        lines = lines.replace('\n', "\n   ");
        let _ = writeln!(out, "{}. {lines}", n + 1);
    }
    let forwarded = String::from_utf8_lossy(decided.request.raw_path()).into_owned();
    match &decided.result {
        Ok(Decision::Pass | Decision::McpCancel(_)) => {
            let why = match &decided.policy {
                Some(policy) => format!(", without approval (policy {policy} lets it pass)"),
                None => ", without approval".to_owned(),
            };
            let _ = writeln!(
                out,
                "result: PASS: forwarded as {} {forwarded}{why}",
                decided.request.method
            );
        }
        Ok(Decision::Held(call)) => {
            let policy = &call.policy;
            let _ = writeln!(
                out,
                "result: HOLD: policy {} asks {} to approve (scopes {}{}), then forwards {} {forwarded} to upstream {} with the token issued for it",
                policy.name,
                call.identity.subject,
                if policy.scopes.is_empty() { "none".to_owned() } else { policy.scopes.join(" ") },
                policy
                    .audience
                    .as_deref()
                    .map(|a| format!(", audience {a}"))
                    .unwrap_or_default(),
                decided.request.method,
                call.upstream,
            );
        }
        Ok(Decision::Status(id)) => {
            let _ = writeln!(
                out,
                "result: STATUS: the status resource of approval {id:?}, for its own identity only"
            );
        }
        Err(refusal) => {
            let code = refusal.code();
            let _ = writeln!(
                out,
                "result: REFUSED: {} {} ({})",
                code.status(),
                code.as_str(),
                code.title()
            );
            let detail = match refusal {
                Refusal::Problem(p) if p.detail.is_empty() => code.default_detail().to_owned(),
                other => other.detail(),
            };
            let _ = writeln!(out, "   why: {detail}");
            if let Some(policy) = &decided.policy {
                let _ = writeln!(out, "   policy: {policy}");
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curl_flags_make_the_request_curl_sends() {
        let spec = CurlCall {
            data: Some("{\"qty\":2}".into()),
            headers: vec![
                "Content-Type: application/json".into(),
                "X-A: 1".into(),
                "x-a: 2".into(),
            ],
            url: "http://127.0.0.1:8080/shop?x=1".into(),
            ..CurlCall::default()
        }
        .spec()
        .unwrap();
        assert_eq!(spec.method.as_deref(), Some("POST"));
        assert_eq!(spec.target, "/shop?x=1");
        assert_eq!(spec.headers["host"].values(), ["127.0.0.1:8080"]);
        assert_eq!(spec.headers["content-type"].values(), ["application/json"]);
        assert_eq!(spec.headers["x-a"].values(), ["1", "2"]);
        let spec = CurlCall {
            data: Some("a=1".into()),
            url: "http://h/f".into(),
            ..CurlCall::default()
        }
        .spec()
        .unwrap();
        assert_eq!(
            spec.headers["content-type"].values(),
            ["application/x-www-form-urlencoded"]
        );
    }

    #[test]
    fn a_raw_request_is_read_with_either_line_ending() {
        for raw in [
            "DELETE /orders/7 HTTP/1.1\r\nHost: shop\r\nX-User: alice\r\n\r\n",
            "DELETE /orders/7 HTTP/1.1\nHost: shop\nX-User: alice\n\n",
        ] {
            let spec = parse_raw(raw.as_bytes(), None).unwrap();
            assert_eq!(spec.method.as_deref(), Some("DELETE"));
            assert_eq!(spec.target, "/orders/7");
            assert_eq!(spec.headers["x-user"].values(), ["alice"]);
            assert!(spec.body.is_none());
        }
        let spec = parse_raw(b"POST /shop HTTP/1.1\r\nHost: a\r\n\r\n{\"qty\":2}", None).unwrap();
        assert_eq!(spec.body.as_deref(), Some("{\"qty\":2}"));
        assert!(parse_raw(b"nonsense", None).is_err());
    }
}
