//! The invariants, checked over a run's whole history afterwards: what the
//! agents were answered, what the upstream received, what the store holds
//! and what the authorization server was asked.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use super::agents::{message, Final, Op, QUORUM_PATH};
use super::approver::{Decision, Push};
use super::store::Seen;
use super::upstream::Arrival;
use super::BOUND;

/// Everything a run recorded.
pub struct History {
    pub ops: Vec<Op>,
    pub arrivals: Vec<Arrival>,
    pub approvals: Vec<Seen>,
    pub pushes: Vec<Push>,
    pub decisions: Vec<Decision>,
    /// `limits.max_pending_per_user`.
    pub limit: usize,
}

/// The invariants in the order the summary prints them.
pub const INVARIANTS: [&str; 8] = [
    "unfinished",
    "double_forward",
    "unapproved_forward",
    "refused_forward",
    "second_push",
    "limit_breach",
    "answer_mismatch",
    "ops_unanswered",
];

/// Observations that are not violations by themselves (a fault can cause
/// them: a paused authorization server handles queued polls at once), but
/// are worth reading: printed in the summary, never failing the run.
pub const NOTES: [&str; 2] = ["slow_down_polls", "early_expiry"];

/// What each invariant found: a count and evidence lines.
#[derive(Debug, Default)]
pub struct Report {
    pub found: BTreeMap<&'static str, Vec<String>>,
    pub notes: BTreeMap<&'static str, Vec<String>>,
}

impl Report {
    fn add(&mut self, invariant: &'static str, evidence: String) {
        debug_assert!(INVARIANTS.contains(&invariant));
        self.found.entry(invariant).or_default().push(evidence);
    }

    fn note(&mut self, what: &'static str, evidence: String) {
        debug_assert!(NOTES.contains(&what));
        self.notes.entry(what).or_default().push(evidence);
    }

    /// `name=count` for every note.
    pub fn note_counts(&self) -> String {
        NOTES
            .iter()
            .map(|n| format!("{n}={}", self.notes.get(n).map_or(0, Vec::len)))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Every note's evidence.
    pub fn note_evidence(&self) -> String {
        let mut out = String::new();
        for (what, lines) in &self.notes {
            let _ = writeln!(out, "{what}: {}", lines.len());
            for line in lines {
                let _ = writeln!(out, "  {line}");
            }
        }
        out
    }

    pub fn count(&self, invariant: &str) -> usize {
        self.found.get(invariant).map_or(0, Vec::len)
    }

    pub fn ok(&self) -> bool {
        self.found.values().all(Vec::is_empty)
    }

    /// `name=count` for every invariant.
    pub fn counts(&self) -> String {
        INVARIANTS
            .iter()
            .map(|i| format!("{i}={}", self.count(i)))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Up to `each` evidence lines per violated invariant.
    pub fn evidence(&self, each: usize) -> String {
        let mut out = String::new();
        for (invariant, lines) in &self.found {
            let _ = writeln!(out, "{invariant}: {} violation(s)", lines.len());
            for line in lines.iter().take(each) {
                let _ = writeln!(out, "  {line}");
            }
        }
        out
    }
}

fn is_approved(push: &Push) -> bool {
    matches!(push.status.as_str(), "approved" | "redeemed")
}

/// The `qty` in an `XYZ phone` body, and so the binding message.
fn body_message(arrival: &Arrival) -> Option<String> {
    arrival.body["qty"].as_u64().map(message)
}

/// Who was asked what: a binding message and the subject asked. The
/// person's question names the call; a countersigned call's countersigners
/// share one question, each asked on their own.
type Asked<'a> = (&'a str, &'a str);

/// What is wrong with `arrival`, forwarded under approval `a`, as a call of
/// its policy: on the countersigned path, the approval of a countersigned
/// call (not a countersigner's), whose verified countersigners (at least
/// `min`, as `countersign-verify` checked) were each asked for this call
/// and approved it; elsewhere, no countersigned approval and no
/// `Countersign-Tokens`.
fn quorum_wrongs(
    arrival: &Arrival,
    a: &Seen,
    members_of: &HashMap<&str, Vec<&Seen>>,
    said_yes: &dyn Fn(&Seen) -> bool,
) -> Vec<String> {
    let mut wrong = Vec::new();
    if a.parent_id.is_some() {
        wrong.push(format!(
            "forwarded under a countersigner's approval (of {:?})",
            a.parent_id
        ));
    }
    if arrival.path != QUORUM_PATH {
        if a.countersign_min.is_some() {
            wrong.push("a countersigned approval on an ordinary path".to_owned());
        }
        if arrival.countersign_tokens > 0 {
            wrong.push("Countersign-Tokens on a call nobody countersigned".to_owned());
        }
        return wrong;
    }
    let Some(min) = a.countersign_min else {
        wrong.push("not a countersigned call's approval".to_owned());
        return wrong;
    };
    let min = usize::try_from(min).unwrap_or(usize::MAX);
    if arrival.binding_refused.is_none() && arrival.countersigners.len() < min {
        wrong.push(format!(
            "{} countersigners, {min} needed: {:?}",
            arrival.countersigners.len(),
            arrival.countersigners
        ));
    }
    let members = members_of.get(a.id.as_str()).map_or(&[][..], Vec::as_slice);
    for sub in &arrival.countersigners {
        match members.iter().find(|m| &m.subject == sub) {
            None => wrong.push(format!("countersigned by {sub}, who was not asked for it")),
            Some(m) if !said_yes(m) => {
                wrong.push(format!(
                    "countersigned by {sub}, who approved no request for it"
                ));
            }
            Some(m) if !matches!(m.state.as_str(), "approved" | "done") => {
                wrong.push(format!(
                    "countersigned by {sub}, whose approval is {}",
                    m.state
                ));
            }
            Some(_) => {}
        }
    }
    wrong
}

pub fn check(history: &History) -> Report {
    let mut report = Report::default();
    let approvals: HashMap<&str, &Seen> = history
        .approvals
        .iter()
        .map(|a| (a.id.as_str(), a))
        .collect();
    let mut by_message: HashMap<Asked, Vec<&Seen>> = HashMap::new();
    for approval in &history.approvals {
        by_message
            .entry((approval.binding_message.as_str(), approval.subject.as_str()))
            .or_default()
            .push(approval);
    }
    for list in by_message.values_mut() {
        list.sort_by_key(|a| (a.created_at, a.first_seen_ms));
    }
    let mut pushes_by_message: HashMap<Asked, Vec<&Push>> = HashMap::new();
    for push in &history.pushes {
        pushes_by_message
            .entry((push.binding_message.as_str(), push.sub.as_str()))
            .or_default()
            .push(push);
    }
    for list in pushes_by_message.values_mut() {
        list.sort_by_key(|p| p.created_at_ms);
    }
    // The store names the request each approval asked, while it keeps it.
    let push_by_id: HashMap<&str, &Push> = history
        .pushes
        .iter()
        .map(|p| (p.auth_req_id.as_str(), p))
        .collect();
    let approval_by_push: HashMap<&str, &Seen> = history
        .approvals
        .iter()
        .filter_map(|a| Some((a.auth_req_id.as_deref()?, a)))
        .collect();
    // What the authorization server says became of an approval's request.
    let asked_status = |a: &Seen| -> Option<&str> {
        let push = a.auth_req_id.as_deref().and_then(|r| push_by_id.get(r));
        push.map(|p| p.status.as_str())
    };
    // Whether `a`'s subject approved a request for its question.
    let said_yes = |a: &Seen| -> bool {
        match asked_status(a) {
            Some(status) => matches!(status, "approved" | "redeemed"),
            None => pushes_by_message
                .get(&(a.binding_message.as_str(), a.subject.as_str()))
                .is_some_and(|p| p.iter().any(|p| is_approved(p))),
        }
    };
    // A countersigned call's countersigners' approvals.
    let mut members_of: HashMap<&str, Vec<&Seen>> = HashMap::new();
    for a in &history.approvals {
        if let Some(parent) = a.parent_id.as_deref() {
            members_of.entry(parent).or_default().push(a);
        }
    }
    let mut arrivals_by_id: HashMap<&str, Vec<&Arrival>> = HashMap::new();
    for arrival in &history.arrivals {
        if let Some(id) = &arrival.approval_id {
            arrivals_by_id.entry(id.as_str()).or_default().push(arrival);
        }
    }

    // 1. Every approval ended by its deadline plus the bound (on the
    // suite's clock: first seen + its expiry span + BOUND).
    for a in &history.approvals {
        let span = (a.expires_at - a.created_at).max(0);
        let deadline = a.first_seen_ms + span + BOUND.as_millis() as i64;
        match a.final_seen_ms {
            Some(at) if at <= deadline => {}
            Some(at) => report.add(
                "unfinished",
                format!(
                    "approval {} ({}, {}) final ({}) {} ms after its deadline; states {:?}",
                    a.id,
                    a.subject,
                    a.binding_message,
                    a.state,
                    at - deadline,
                    a.states
                ),
            ),
            None => report.add(
                "unfinished",
                format!(
                    "approval {} ({}, {}) still {} after its deadline; problem {:?}; states {:?}",
                    a.id, a.subject, a.binding_message, a.state, a.problem_code, a.states
                ),
            ),
        }
    }

    // 2. No approval reached the upstream twice.
    for (id, arrivals) in &arrivals_by_id {
        if arrivals.len() > 1 {
            let times: Vec<u64> = arrivals.iter().map(|a| a.at_ms).collect();
            report.add(
                "double_forward",
                format!(
                    "approval {id} reached the upstream {} times (at run ms {times:?})",
                    arrivals.len()
                ),
            );
        }
    }

    // ...nor one call (its own `qty`), under two approvals: the agents never
    // send a call again once it has a final answer.
    let mut by_call: HashMap<String, Vec<&Arrival>> = HashMap::new();
    for arrival in &history.arrivals {
        if let Some(call) = body_message(arrival) {
            by_call.entry(call).or_default().push(arrival);
        }
    }
    for (call, arrivals) in &by_call {
        let ids: Vec<Option<&str>> = arrivals.iter().map(|a| a.approval_id.as_deref()).collect();
        let mut distinct = ids.clone();
        distinct.sort();
        distinct.dedup();
        if distinct.len() > 1 {
            report.add(
                "double_forward",
                format!(
                    "the call '{call}' reached the upstream {} times, under approvals {ids:?}",
                    arrivals.len()
                ),
            );
        }
    }

    // 3. Nothing reached the upstream without its approval: a token that
    // verifies for the approval's person, an approval the store knows in a
    // state past approval, the call it is for, and the person's yes.
    for arrival in &history.arrivals {
        let Some(id) = arrival.approval_id.as_deref() else {
            report.add(
                "unapproved_forward",
                format!(
                    "a request without an approval id at run ms {}: {} {}",
                    arrival.at_ms, arrival.method, arrival.path
                ),
            );
            continue;
        };
        let mut wrong = Vec::new();
        if arrival.token_sub.is_none() || !arrival.token_buys {
            wrong.push("no valid token with product:buy".to_owned());
        }
        // The token must name exactly this call (a second arrival of one
        // approval is `double_forward`'s, and keys the upstream could not
        // fetch are the token check's above).
        // On the countersigned path, so must `COUNTERSIGN_MIN` others'
        // tokens (`countersign_*`): a partial quorum is an unapproved call.
        if let Some(code) = arrival.binding_refused.as_deref().filter(|c| {
            c.starts_with("binding_")
                || c.starts_with("insufficient_scope")
                || c.starts_with("countersign_")
        }) {
            wrong.push(format!("the token does not bind this call: {code}"));
        }
        match approvals.get(id) {
            None => wrong.push("an approval id the store does not know".to_owned()),
            Some(a) => {
                if !matches!(
                    a.state.as_str(),
                    "approved" | "forwarding" | "done" | "outcome_unknown"
                ) {
                    wrong.push(format!("the approval is {}", a.state));
                }
                if arrival.token_sub.as_deref().is_some_and(|s| s != a.subject) {
                    wrong.push(format!(
                        "token for {:?}, approval of {}",
                        arrival.token_sub, a.subject
                    ));
                }
                if body_message(arrival).as_deref() != Some(a.binding_message.as_str()) {
                    wrong.push(format!(
                        "body {} is not the call of '{}'",
                        arrival.body, a.binding_message
                    ));
                }
                if !said_yes(a) {
                    wrong.push("the person approved no request for this call".to_owned());
                }
                wrong.extend(quorum_wrongs(arrival, a, &members_of, &said_yes));
            }
        }
        if !wrong.is_empty() {
            report.add(
                "unapproved_forward",
                format!(
                    "approval {id} at run ms {}: {}",
                    arrival.at_ms,
                    wrong.join("; ")
                ),
            );
        }
    }

    // 3b. A countersigned call someone refused is never forwarded. Sound
    // whatever the timing: the person's own request denied; so many
    // countersigners' requests denied that fewer than `min` could approve;
    // or a reading of the store that showed the call unclaimed, a
    // countersigner's refusal recorded and the quorum not reached (a
    // refusal is final, so whoever completes the call later sees it; an
    // extra countersigner's "no" recorded once the quorum stands may race
    // the forward, and is not one).
    for id in arrivals_by_id.keys() {
        let Some(parent) = approvals.get(id) else {
            continue;
        };
        let Some(min) = parent.countersign_min else {
            continue;
        };
        let min = usize::try_from(min).unwrap_or(0);
        let members = members_of.get(id).map_or(&[][..], Vec::as_slice);
        let mut wrong = Vec::new();
        if asked_status(parent) == Some("denied") {
            wrong.push(format!("{} (the person) denied it", parent.subject));
        }
        let denied: Vec<&str> = members
            .iter()
            .filter(|m| asked_status(m) == Some("denied"))
            .map(|m| m.subject.as_str())
            .collect();
        if members.len() - denied.len() < min {
            wrong.push(format!(
                "countersigners {denied:?} denied it: {} of {} could approve, {min} needed",
                members.len() - denied.len(),
                members.len()
            ));
        }
        let mut instants: Vec<i64> = std::iter::once(*parent)
            .chain(members.iter().copied())
            .flat_map(|a| a.states.iter().map(|(at, _)| *at))
            .collect();
        instants.sort_unstable();
        instants.dedup();
        for t in instants {
            let person = parent.state_at(t);
            if !matches!(person, Some("pending" | "approved")) {
                continue;
            }
            let refused: Vec<String> = members
                .iter()
                .filter_map(|m| {
                    m.state_at(t)
                        .filter(|s| matches!(*s, "denied" | "expired" | "failed"))
                        .map(|s| format!("{} {s}", m.subject))
                })
                .collect();
            let approved = members
                .iter()
                .filter(|m| m.state_at(t) == Some("approved"))
                .count();
            if !refused.is_empty() && (person != Some("approved") || approved < min) {
                wrong.push(format!(
                    "the store read at unix ms {t} showed {refused:?}, the person {}, {approved} of {min} countersigners approved",
                    person.unwrap_or_default()
                ));
                break;
            }
        }
        if !wrong.is_empty() {
            report.add(
                "refused_forward",
                format!(
                    "countersigned call {id} ('{}', {}) reached the upstream: {}",
                    parent.binding_message,
                    parent.subject,
                    wrong.join("; ")
                ),
            );
        }
    }

    // 4. At most one bc-authorize per approval: a call's requests are at
    // most its approvals (a failed approval's retry is a new approval).
    for (asked, pushes) in &pushes_by_message {
        let (message, sub) = asked;
        let count = by_message.get(asked).map_or(0, Vec::len);
        if pushes.len() > count {
            let created: Vec<i64> = pushes.iter().map(|p| p.created_at_ms).collect();
            let ids: Vec<String> = by_message
                .get(asked)
                .map(|l| l.iter().map(|a| format!("{} {}", a.id, a.state)).collect())
                .unwrap_or_default();
            report.add(
                "second_push",
                format!(
                    "'{message}' to {sub}: {} bc-authorize (at unix ms {created:?}) for {count} approval(s) {ids:?}",
                    pushes.len()
                ),
            );
        }
    }

    // 5. Never more pending pushes per person than the limit. A push is
    // pending from bc-authorize until the earliest of: the person's answer,
    // its expiry, and its approval's end (the store's decided_at or the
    // suite's first sighting of a final state, whichever is earlier).
    // Each end is taken as early as it can be, so a breach is a real one.
    let decided: HashMap<&str, i64> = history
        .decisions
        .iter()
        .map(|d| (d.auth_req_id.as_str(), d.at_ms))
        .collect();
    let mut events: BTreeMap<&str, Vec<(i64, i32, &str)>> = BTreeMap::new();
    for (asked, pushes) in &pushes_by_message {
        let matched = by_message.get(asked);
        for (k, push) in pushes.iter().enumerate() {
            let mut end = push.expires_at_ms;
            if let Some(at) = decided.get(push.auth_req_id.as_str()) {
                if push.status != "pending" && push.status != "expired" {
                    end = end.min(*at);
                }
            }
            // The approval that asked it, by its auth_req_id, or else the
            // k-th of that question.
            let approval = approval_by_push
                .get(push.auth_req_id.as_str())
                .copied()
                .or_else(|| matched.and_then(|l| l.get(k)).copied());
            if let Some(a) = approval {
                for at in [a.decided_at, a.final_seen_ms].into_iter().flatten() {
                    end = end.min(at);
                }
            }
            let list = events.entry(push.sub.as_str()).or_default();
            list.push((push.created_at_ms, 1, push.auth_req_id.as_str()));
            list.push((end.max(push.created_at_ms), -1, push.auth_req_id.as_str()));
        }
    }
    let message_of: HashMap<&str, &str> = history
        .pushes
        .iter()
        .map(|p| (p.auth_req_id.as_str(), p.binding_message.as_str()))
        .collect();
    for (person, mut list) in events {
        // Ends before starts at the same instant.
        list.sort_by_key(|(at, delta, _)| (*at, *delta));
        let mut pending: Vec<&str> = Vec::new();
        let mut worst: (Vec<&str>, i64) = (Vec::new(), 0);
        for (at, delta, id) in &list {
            if *delta > 0 {
                pending.push(id);
            } else {
                pending.retain(|p| p != id);
            }
            if pending.len() > worst.0.len() {
                worst = (pending.clone(), *at);
            }
        }
        if worst.0.len() > history.limit {
            let calls: Vec<&str> = worst.0.iter().map(|id| message_of[id]).collect();
            report.add(
                "limit_breach",
                format!(
                    "{person} had {} requests pending at unix ms {} (limit {}): {calls:?}",
                    worst.0.len(),
                    worst.1,
                    history.limit
                ),
            );
        }
    }

    // 6. Every agent's last answer agrees with the upstream's log and the
    // store: 200 only if forwarded (this approval, once); outcome_unknown
    // only where the upstream may have received it (the person said yes);
    // any other answer only if the upstream never received the call.
    for op in &history.ops {
        let Final::Answer {
            status,
            code,
            approval_id,
            body,
        } = &op.result
        else {
            continue;
        };
        let call = message(op.qty);
        let received: Vec<&Arrival> = history
            .arrivals
            .iter()
            .filter(|a| body_message(a).as_deref() == Some(call.as_str()))
            .collect();
        let mut wrong = Vec::new();
        match (*status, code.as_deref()) {
            (200, _) => match approval_id {
                None => wrong.push("200 without an approval id".to_owned()),
                Some(id) => {
                    if !arrivals_by_id.contains_key(id.as_str()) {
                        wrong.push(format!("200 for {id}, which never reached the upstream"));
                    }
                    if body["approval_id"].as_str() != Some(id.as_str()) {
                        wrong.push(format!("200 for {id} with the upstream's answer {body}"));
                    }
                }
            },
            (_, Some("outcome_unknown")) => {
                let said_yes = pushes_by_message
                    .get(&(call.as_str(), op.person))
                    .is_some_and(|p| p.iter().any(|p| is_approved(p)));
                if !said_yes {
                    wrong.push("outcome_unknown, but the person never approved".to_owned());
                }
                if let Some(a) = approval_id.as_deref().and_then(|id| approvals.get(id)) {
                    if a.state != "outcome_unknown" {
                        wrong.push(format!("outcome_unknown, the store says {}", a.state));
                    }
                }
            }
            (_, Some("response_not_recorded")) => {}
            (status, code) => {
                if !received.is_empty() {
                    wrong.push(format!(
                        "{status} {code:?}, but the upstream received the call {} time(s) (approval {:?})",
                        received.len(),
                        received.iter().map(|a| a.approval_id.clone()).collect::<Vec<_>>()
                    ));
                }
            }
        }
        if !wrong.is_empty() {
            report.add(
                "answer_mismatch",
                format!(
                    "op {} ({} '{call}' via {}): {}",
                    op.id,
                    op.person,
                    op.path,
                    wrong.join("; ")
                ),
            );
        }
    }

    // 7. An agent holding an approval got a final answer by the deadline.
    for op in &history.ops {
        if let Final::GaveUp { last } = &op.result {
            let ids = op.approval_ids();
            if !ids.is_empty() {
                let last = last
                    .as_ref()
                    .map(|a| format!("{:?} {:?} {:?}", a.status, a.code, a.error))
                    .unwrap_or_default();
                let states: Vec<String> = ids
                    .iter()
                    .map(|id| {
                        approvals
                            .get(id.as_str())
                            .map_or("unknown".to_owned(), |a| a.state.clone())
                    })
                    .collect();
                report.add(
                    "ops_unanswered",
                    format!(
                        "op {} ({} '{}'): no final answer in {} s, approvals {ids:?} ({states:?}), last answer {last}",
                        op.id,
                        op.person,
                        message(op.qty),
                        (op.ended_ms - op.started_ms) / 1000
                    ),
                );
            }
        }
    }
    // Notes. Polls the authorization server answered slow_down (two
    // pollers of one request, or polls it queued while paused).
    for push in &history.pushes {
        if push.slow_downs > 0 {
            let ids: Vec<&str> = by_message
                .get(&(push.binding_message.as_str(), push.sub.as_str()))
                .map(|l| l.iter().map(|a| a.id.as_str()).collect())
                .unwrap_or_default();
            report.note(
                "slow_down_polls",
                format!(
                    "'{}' ({}): {} of {} polls answered slow_down; approvals {ids:?}",
                    push.binding_message, push.sub, push.slow_downs, push.polls
                ),
            );
        }
    }
    // Approvals ended `expired` well before they expired, while the person
    // could still answer.
    for a in &history.approvals {
        if a.state != "expired" {
            continue;
        }
        // A countersigned call's person who approved first has the answer's
        // time as `decided_at`: it ended when it was seen ended.
        let answered_first = a.states.iter().any(|(_, s)| s == "approved");
        let decided_at = a.decided_at.filter(|_| !answered_first);
        let ended = [decided_at, a.final_seen_ms].into_iter().flatten().min();
        if let Some(ended) = ended {
            if ended < a.expires_at - 2000 {
                let person = pushes_by_message
                    .get(&(a.binding_message.as_str(), a.subject.as_str()))
                    .map(|p| p.iter().map(|p| p.status.as_str()).collect::<Vec<_>>())
                    .unwrap_or_default();
                report.note(
                    "early_expiry",
                    format!(
                        "approval {} ('{}') ended expired {} ms before its expiry; the requests ended {person:?}",
                        a.id,
                        a.binding_message,
                        a.expires_at - ended
                    ),
                );
            }
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::super::agents::{countersign_message, Attempt};
    use super::super::upstream::Behaviour;
    use super::*;
    use serde_json::json;

    fn seen(id: &str, qty: u64, state: &str, created: i64) -> Seen {
        Seen {
            id: id.into(),
            subject: "alice".into(),
            binding_message: message(qty),
            state: state.into(),
            problem_code: None,
            response_status: None,
            created_at: created,
            expires_at: created + 20_000,
            decided_at: Some(created + 3_000),
            parent_id: None,
            countersign_min: None,
            auth_req_id: None,
            first_seen_ms: created,
            final_seen_ms: Some(created + 3_500),
            states: vec![],
        }
    }

    fn push(id: &str, qty: u64, created: i64, status: &str) -> Push {
        Push {
            auth_req_id: id.into(),
            sub: "alice".into(),
            binding_message: message(qty),
            created_at_ms: created,
            expires_at_ms: created + 20_000,
            status: status.into(),
            polls: 1,
            slow_downs: 0,
        }
    }

    fn arrival(id: &str, qty: u64) -> Arrival {
        Arrival {
            at_ms: 1,
            method: "POST".into(),
            path: "/buy".into(),
            approval_id: Some(id.into()),
            token_sub: Some("alice".into()),
            token_buys: true,
            binding_refused: None,
            countersign_tokens: 0,
            countersigners: vec![],
            body: json!({ "qty": qty }),
            behaviour: Behaviour::Answer,
            answered: true,
        }
    }

    fn op(qty: u64, status: u16, code: Option<&str>, id: &str) -> Op {
        Op {
            id: qty,
            agent: 0,
            person: "alice",
            qty,
            path: "/buy",
            idempotency_key: None,
            started_ms: 0,
            ended_ms: 1,
            attempts: vec![Attempt {
                at_ms: 0,
                replica: 0,
                status: Some(status),
                code: code.map(str::to_owned),
                approval_id: Some(id.into()),
                error: None,
            }],
            result: Final::Answer {
                status,
                code: code.map(str::to_owned),
                approval_id: Some(id.into()),
                body: json!({ "approval_id": id }),
            },
        }
    }

    fn history() -> History {
        History {
            ops: vec![
                op(1, 200, None, "a1"),
                op(2, 403, Some("access_denied"), "a2"),
            ],
            arrivals: vec![arrival("a1", 1)],
            approvals: vec![seen("a1", 1, "done", 1000), seen("a2", 2, "denied", 1000)],
            pushes: vec![
                push("r1", 1, 1100, "redeemed"),
                push("r2", 2, 1100, "denied"),
            ],
            decisions: vec![],
            limit: 2,
        }
    }

    /// `history()` and alice's countersigned call `Buy 10`: approval q1,
    /// countersigned by the finance lead (q2) and dave (q3) before carol
    /// (q4) answered, forwarded once with their two tokens.
    fn quorum_history() -> History {
        let mut h = history();
        let states = |list: &[(i64, &str)]| -> Vec<(i64, String)> {
            list.iter().map(|(t, s)| (*t, (*s).to_owned())).collect()
        };
        let mut parent = seen("q1", 10, "done", 10_000);
        parent.countersign_min = Some(2);
        parent.auth_req_id = Some("rq".into());
        parent.states = states(&[(10_000, "pending"), (11_000, "approved"), (12_000, "done")]);
        h.approvals.push(parent);
        h.pushes.push(push("rq", 10, 10_100, "redeemed"));
        for (id, sub, state, status) in [
            ("q2", "finance-lead", "done", "redeemed"),
            ("q3", "dave", "done", "redeemed"),
            ("q4", "carol", "failed", "expired"),
        ] {
            let mut member = seen(id, 10, state, 10_000);
            member.subject = sub.into();
            member.binding_message = countersign_message("alice", 10);
            member.parent_id = Some("q1".into());
            member.auth_req_id = Some(format!("r{id}"));
            member.states = if state == "done" {
                states(&[(10_000, "pending"), (11_000, "approved"), (12_000, "done")])
            } else {
                states(&[(10_000, "pending"), (12_000, state)])
            };
            h.approvals.push(member);
            let mut p = push(&format!("r{id}"), 10, 10_050, status);
            p.sub = sub.into();
            p.binding_message = countersign_message("alice", 10);
            h.pushes.push(p);
        }
        let mut forwarded = arrival("q1", 10);
        forwarded.path = QUORUM_PATH.into();
        forwarded.countersign_tokens = 2;
        forwarded.countersigners = vec!["finance-lead".into(), "dave".into()];
        h.arrivals.push(forwarded);
        h.ops.push(op(10, 200, None, "q1"));
        h
    }

    fn member<'a>(h: &'a mut History, id: &str) -> &'a mut Seen {
        h.approvals.iter_mut().find(|a| a.id == id).unwrap()
    }

    fn asked<'a>(h: &'a mut History, auth_req_id: &str) -> &'a mut Push {
        h.pushes
            .iter_mut()
            .find(|p| p.auth_req_id == auth_req_id)
            .unwrap()
    }

    #[test]
    fn a_clean_countersigned_history_passes() {
        let report = check(&quorum_history());
        assert!(report.ok(), "{}", report.evidence(5));
    }

    #[test]
    fn each_quorum_invariant_catches_its_violation() {
        // Forwarded on a partial quorum: the verifier refused it.
        let mut h = quorum_history();
        h.arrivals[1].binding_refused = Some("countersign_insufficient".into());
        h.arrivals[1].countersigners = vec!["dave".into()];
        let report = check(&h);
        assert_eq!(
            report.count("unapproved_forward"),
            1,
            "{}",
            report.evidence(5)
        );

        // Countersigned by someone not asked for this call.
        let mut h = quorum_history();
        h.arrivals[1].countersigners = vec!["bob".into(), "dave".into()];
        assert_eq!(check(&h).count("unapproved_forward"), 1);

        // A countersigned call forwarded twice.
        let mut h = quorum_history();
        h.arrivals.push(h.arrivals[1].clone());
        assert_eq!(check(&h).count("double_forward"), 1);

        // Forwarded though the person denied.
        let mut h = quorum_history();
        asked(&mut h, "rq").status = "denied".into();
        let report = check(&h);
        assert_eq!(report.count("refused_forward"), 1, "{}", report.evidence(5));

        // Forwarded though two of three countersigners denied.
        let mut h = quorum_history();
        asked(&mut h, "rq4").status = "denied".into();
        asked(&mut h, "rq3").status = "denied".into();
        assert_eq!(check(&h).count("refused_forward"), 1);

        // Carol's "no" was recorded before the quorum stood.
        let mut h = quorum_history();
        asked(&mut h, "rq4").status = "denied".into();
        member(&mut h, "q4").states = vec![(10_000, "pending".into()), (10_500, "denied".into())];
        let report = check(&h);
        assert_eq!(report.count("refused_forward"), 1, "{}", report.evidence(5));
        // ...not when it came once the quorum stood (it may race the forward).
        member(&mut h, "q4").states = vec![(10_000, "pending".into()), (11_500, "denied".into())];
        let report = check(&h);
        assert!(report.ok(), "{}", report.evidence(5));
    }

    #[test]
    fn a_clean_history_passes() {
        let report = check(&history());
        assert!(report.ok(), "{}", report.evidence(5));
    }

    #[test]
    fn each_invariant_catches_its_violation() {
        let mut h = history();
        h.arrivals.push(arrival("a1", 1));
        assert_eq!(check(&h).count("double_forward"), 1);
        let mut h = history();
        h.arrivals.push(arrival("a9", 1));
        assert_eq!(check(&h).count("double_forward"), 1);

        let mut h = history();
        h.arrivals.push(arrival("a2", 2));
        let report = check(&h);
        assert_eq!(
            report.count("unapproved_forward"),
            1,
            "{}",
            report.evidence(5)
        );
        assert_eq!(report.count("answer_mismatch"), 1, "{}", report.evidence(5));

        // A token that does not name exactly the call it came with.
        let mut h = history();
        h.arrivals[0].binding_refused = Some("binding_mismatch (body)".into());
        assert_eq!(check(&h).count("unapproved_forward"), 1);

        let mut h = history();
        h.pushes.push(push("r3", 1, 1200, "expired"));
        assert_eq!(check(&h).count("second_push"), 1);

        let mut h = history();
        h.approvals[0].state = "pending".into();
        h.approvals[0].final_seen_ms = None;
        assert_eq!(check(&h).count("unfinished"), 1);

        // Two pushes of alice overlap, the limit is 1.
        let mut h = history();
        h.limit = 1;
        let report = check(&h);
        assert_eq!(report.count("limit_breach"), 1, "{}", report.evidence(5));
        h.limit = 2;
        assert_eq!(check(&h).count("limit_breach"), 0);

        let mut h = history();
        h.ops[1].result = Final::GaveUp { last: None };
        assert_eq!(check(&h).count("ops_unanswered"), 1);

        let mut h = history();
        h.ops.push(op(3, 502, Some("outcome_unknown"), "a3"));
        h.approvals.push(seen("a3", 3, "outcome_unknown", 5000));
        h.pushes.push(push("r4", 3, 5100, "expired"));
        assert_eq!(check(&h).count("answer_mismatch"), 1);
    }
}
