//! Shadow decisions as the audit trail shows them (`/shadow-decisions` on
//! the admin listener, `countersign approvals list --shadow`): each one,
//! and the answer to "how many prompts per person per day would this
//! policy cause": the `hold`s counted by policy, person and UTC day.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::audit;
use crate::store::{ShadowDecision, ShadowFilter};

const DAY_MS: u64 = 86_400_000;

fn ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `YYYY-MM-DD` (UTC) of `t`.
fn day(t: SystemTime) -> String {
    let midnight = UNIX_EPOCH + Duration::from_millis(ms(t) / DAY_MS * DAY_MS);
    humantime_serde::re::humantime::format_rfc3339_seconds(midnight).to_string()[..10].to_owned()
}

/// One decision.
pub fn entry(d: &ShadowDecision) -> Value {
    json!({
        "id": d.id,
        "policy": d.policy,
        "subject": d.subject,
        "decision": d.decision,
        "problem_code": d.problem_code,
        "binding_message": d.binding_message,
        "countersigners": d.countersigners,
        "request": { "method": d.method, "path": d.path },
        "created_at_ms": ms(d.created_at),
    })
}

/// Prompts that would have been sent, by policy, person (the person asked,
/// and each countersigner) and UTC day, most first.
pub fn prompts(decisions: &[ShadowDecision]) -> Vec<(String, String, String, u64)> {
    let mut counts: BTreeMap<(String, String, String), u64> = BTreeMap::new();
    for d in decisions.iter().filter(|d| d.decision == "hold") {
        let people = d.subject.iter().chain(d.countersigners.iter());
        for person in people {
            *counts
                .entry((d.policy.clone(), person.clone(), day(d.created_at)))
                .or_default() += 1;
        }
    }
    let mut rows: Vec<_> = counts
        .into_iter()
        .map(|((policy, person, day), n)| (policy, person, day, n))
        .collect();
    rows.sort_by(|a, b| {
        b.3.cmp(&a.3)
            .then_with(|| (&a.0, &a.1, &a.2).cmp(&(&b.0, &b.1, &b.2)))
    });
    rows
}

/// The admin listener's answer: the decisions and the prompt counts.
pub fn listing(decisions: &[ShadowDecision]) -> Value {
    json!({
        "decisions": decisions.iter().map(entry).collect::<Vec<_>>(),
        "prompts": prompts(decisions)
            .into_iter()
            .map(|(policy, subject, day, prompts)| json!({
                "policy": policy, "subject": subject, "day": day, "prompts": prompts,
            }))
            .collect::<Vec<_>>(),
    })
}

/// For a terminal: the prompt counts, then the decisions.
pub fn table(decisions: &[ShadowDecision]) -> String {
    let mut out = String::from("PROMPTS PER PERSON PER DAY (policy in shadow, nobody was asked)\n");
    let _ = writeln!(
        out,
        "{:<24} {:<24} {:<10} PROMPTS",
        "POLICY", "PERSON", "DAY"
    );
    for (policy, person, day, n) in prompts(decisions) {
        let _ = writeln!(out, "{policy:<24} {person:<24} {day:<10} {n}");
    }
    let _ = writeln!(
        out,
        "\n{:<20} {:<24} {:<8} {:<20} {:<24} BINDING MESSAGE / CODE",
        "AT", "POLICY", "DECISION", "SUBJECT", "CALL"
    );
    for d in decisions {
        let _ = writeln!(
            out,
            "{:<20} {:<24} {:<8} {:<20} {:<24} {}",
            humantime_serde::re::humantime::format_rfc3339_seconds(d.created_at),
            d.policy,
            d.decision,
            d.subject.as_deref().unwrap_or("-"),
            format!("{} {}", d.method, d.path),
            d.binding_message
                .as_deref()
                .or(d.problem_code.as_deref())
                .unwrap_or("-")
                .replace(['\n', '\r'], " "),
        );
    }
    if decisions.is_empty() {
        out.push_str("(no shadow decisions)\n");
    }
    out
}

/// Reads `policy`, `subject`, `since` (unix ms) and `limit` from a query.
pub fn parse_query(query: Option<&str>) -> Result<ShadowFilter, String> {
    let approvals = audit::parse_query(query)?;
    if approvals.state.is_some() {
        return Err("shadow decisions have no state; filter by policy or subject".into());
    }
    Ok(ShadowFilter {
        policy: approvals.policy,
        subject: approvals.subject,
        since: approvals.since,
        limit: approvals.limit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(person: &str, countersigners: &[&str], at_ms: u64) -> ShadowDecision {
        ShadowDecision {
            id: format!("{person}-{at_ms}"),
            policy: "buy".into(),
            subject: Some(person.into()),
            decision: "hold".into(),
            problem_code: None,
            binding_message: Some("Buy 2".into()),
            countersigners: countersigners.iter().map(|s| s.to_string()).collect(),
            method: "POST".into(),
            path: "/shop".into(),
            created_at: UNIX_EPOCH + Duration::from_millis(at_ms),
        }
    }

    #[test]
    fn prompts_are_counted_per_person_and_day_countersigners_included() {
        let mut passed = held("alice", &[], 5);
        passed.decision = "pass".into();
        let decisions = [
            held("alice", &[], 1_000),
            held("alice", &["bob"], 2_000),
            held("alice", &[], DAY_MS + 1),
            passed,
        ];
        assert_eq!(
            prompts(&decisions),
            [
                ("buy".into(), "alice".into(), "1970-01-01".into(), 2),
                ("buy".into(), "alice".into(), "1970-01-02".into(), 1),
                ("buy".into(), "bob".into(), "1970-01-01".into(), 1),
            ]
        );
        assert!(parse_query(Some("state=done")).is_err());
        assert_eq!(
            parse_query(Some("policy=buy")).unwrap().policy.as_deref(),
            Some("buy")
        );
    }
}
