//! The audit trail for operators: what the admin listener's `/approvals`
//! and `countersign approvals` show of stored approvals.
//!
//! An entry never carries request or response bodies, headers or the
//! `auth_req_id`: only what the person was asked, the decision and its
//! times, and which call it was (method and path).

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::store::{Approval, ApprovalState, ListFilter};

/// Entries listed when no `limit` is given.
pub const DEFAULT_LIMIT: usize = 100;
/// The most entries one listing returns.
pub const MAX_LIMIT: usize = 1000;

fn ms(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(_) => 0,
    }
}

/// One approval as the audit trail shows it.
pub fn entry(approval: &Approval) -> Value {
    json!({
        "id": approval.id,
        "policy": approval.policy,
        "subject": approval.subject,
        "state": approval.state.as_str(),
        "binding_message": approval.binding_message,
        "authorization_details": approval.authorization_details,
        "fingerprint": approval.fingerprint,
        "idempotency_key": approval.idempotency_key.is_some(),
        "created_at_ms": ms(approval.created_at),
        "decided_at_ms": approval.decided_at.map(ms),
        "expires_at_ms": ms(approval.expires_at),
        "problem_code": approval.problem_code,
        "problem_detail": approval.problem_detail,
        // Four eyes: a countersigner's approval names the call's own; the
        // call's own says how many countersigners it needs.
        "countersign_of": approval.parent_id,
        "countersigners_needed": approval.countersign_min,
        "response_status": approval.response.as_ref().map(|r| r.status),
        "delivered_at_ms": approval.delivered_at.map(ms),
        "request": {
            "method": approval.request.method,
            "path_and_query": approval.request.path_and_query,
        },
    })
}

/// A listing's entries, newest first, as a JSON array.
pub fn entries(approvals: &[Approval]) -> Value {
    Value::Array(approvals.iter().map(entry).collect())
}

/// Checks a `limit`: 1 to [`MAX_LIMIT`].
pub fn limit(raw: &str) -> Result<usize, String> {
    match raw.parse::<usize>() {
        Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        _ => Err(format!(
            "limit must be a whole number from 1 to {MAX_LIMIT}, not {raw:?}"
        )),
    }
}

/// Checks a `state` name.
pub fn state(raw: &str) -> Result<ApprovalState, String> {
    ApprovalState::parse(raw).ok_or_else(|| {
        let names: Vec<_> = ApprovalState::ALL.iter().map(|s| s.as_str()).collect();
        format!("state must be one of {}, not {raw:?}", names.join(", "))
    })
}

/// Reads a listing's query string (`state`, `policy`, `subject`, `since` in
/// unix milliseconds, `limit`). The limit defaults to [`DEFAULT_LIMIT`].
pub fn parse_query(query: Option<&str>) -> Result<ListFilter, String> {
    let mut filter = ListFilter {
        limit: Some(DEFAULT_LIMIT),
        ..ListFilter::default()
    };
    for (key, value) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match key.as_ref() {
            "state" => filter.state = Some(state(&value)?),
            "policy" => filter.policy = Some(value.into_owned()),
            "subject" => filter.subject = Some(value.into_owned()),
            "since" => {
                let since = value.parse::<u64>().map_err(|_| {
                    format!("since must be unix milliseconds (a whole number), not {value:?}")
                })?;
                filter.since = UNIX_EPOCH.checked_add(Duration::from_millis(since));
                if filter.since.is_none() {
                    return Err(format!("since is out of range: {value:?}"));
                }
            }
            "limit" => filter.limit = Some(limit(&value)?),
            other => return Err(format!("unknown filter {other:?}")),
        }
    }
    Ok(filter)
}

fn time(t: SystemTime) -> String {
    humantime_serde::re::humantime::format_rfc3339_seconds(t).to_string()
}

/// A listing as a table for a terminal.
pub fn table(approvals: &[Approval]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<36} {:<20} {:<16} {:<16} {:<20} {:<20} {:<6} {:<20} BINDING MESSAGE",
        "ID", "CREATED", "STATE", "POLICY", "SUBJECT", "DECIDED", "STATUS", "DELIVERED"
    );
    for a in approvals {
        let _ = writeln!(
            out,
            "{:<36} {:<20} {:<16} {:<16} {:<20} {:<20} {:<6} {:<20} {}",
            a.id,
            time(a.created_at),
            a.state.as_str(),
            a.policy,
            a.subject,
            a.decided_at.map(time).unwrap_or_else(|| "-".to_owned()),
            a.response
                .as_ref()
                .map(|r| r.status.to_string())
                .unwrap_or_else(|| "-".to_owned()),
            a.delivered_at.map(time).unwrap_or_else(|| "-".to_owned()),
            a.binding_message.replace(['\n', '\r'], " "),
        );
    }
    if approvals.is_empty() {
        out.push_str("(no approvals)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_read_and_checked() {
        let f = parse_query(None).unwrap();
        assert_eq!(f.limit, Some(DEFAULT_LIMIT));
        let f = parse_query(Some(
            "state=denied&policy=buy&subject=a%40b&since=5&limit=7",
        ))
        .unwrap();
        assert_eq!(f.state, Some(ApprovalState::Denied));
        assert_eq!(f.policy.as_deref(), Some("buy"));
        assert_eq!(f.subject.as_deref(), Some("a@b"));
        assert_eq!(f.since, Some(UNIX_EPOCH + Duration::from_millis(5)));
        assert_eq!(f.limit, Some(7));
        for bad in [
            "state=nope",
            "limit=0",
            "limit=1001",
            "limit=x",
            "since=-1",
            "since=soon",
            "color=red",
        ] {
            assert!(parse_query(Some(bad)).is_err(), "{bad}");
        }
    }
}
