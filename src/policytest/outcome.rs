//! What a call got, compared with what its case expects, and the diff a
//! failing case prints: the expected outcome and the one got, line by line,
//! showing only the fields the case asserts (and, when the outcomes differ
//! in kind, everything that says why).

use serde_json::Value;

use super::file::{CountersignExpect, Expect, HoldExpect, RefuseExpect};
use crate::decision::offline::Decided;
use crate::decision::{Decision, Refusal};

/// What a call got, in the terms a case asserts.
#[derive(Debug, Clone, PartialEq)]
pub enum Got {
    Pass {
        /// The policy whose conditions let it pass.
        policy: Option<String>,
    },
    Hold {
        policy: String,
        binding_message: String,
        authorization_details: Option<Value>,
        bound: bool,
        countersign: Option<CountersignExpect>,
    },
    Refuse {
        code: &'static str,
        policy: Option<String>,
        detail: String,
    },
    /// A request for an approval's status resource.
    Status,
}

impl Got {
    pub fn of(decided: &Decided) -> Self {
        match &decided.result {
            Ok(Decision::Pass | Decision::McpCancel(_)) => Self::Pass {
                policy: decided.policy.clone(),
            },
            Ok(Decision::Held(call)) => Self::Hold {
                policy: call.policy.name.clone(),
                binding_message: call.rendered.binding_message.clone(),
                authorization_details: call.rendered.authorization_details.clone(),
                bound: call.policy.bind == crate::policy::Bind::Call,
                countersign: call
                    .rendered
                    .countersigners
                    .as_ref()
                    .map(|c| CountersignExpect {
                        subjects: c.subjects.clone(),
                        min: c.min,
                        binding_message: c.binding_message.clone(),
                    }),
            },
            Ok(Decision::Status(_)) => Self::Status,
            Err(refusal) => Self::Refuse {
                code: refusal.code().as_str(),
                policy: decided.policy.clone(),
                detail: refusal_detail(refusal),
            },
        }
    }
}

fn refusal_detail(refusal: &Refusal) -> String {
    match refusal {
        Refusal::Problem(problem) if problem.detail.is_empty() => {
            problem.kind.default_detail().to_owned()
        }
        other => other.detail(),
    }
}

/// Whether `got` is what `expect` asks for.
pub fn matches(expect: &Expect, got: &Got) -> bool {
    match (expect, got) {
        (Expect::Pass, Got::Pass { .. }) => true,
        (
            Expect::Hold(e),
            Got::Hold {
                policy,
                binding_message,
                authorization_details,
                bound,
                countersign,
            },
        ) => {
            e.policy.as_ref().is_none_or(|p| p == policy)
                && &e.binding_message == binding_message
                && &e.authorization_details == authorization_details
                && e.bound.is_none_or(|b| b == *bound)
                && e.countersign
                    .as_ref()
                    .is_none_or(|c| Some(c) == countersign.as_ref())
        }
        (
            Expect::Refuse(e),
            Got::Refuse {
                code,
                policy,
                detail,
            },
        ) => {
            e.code.as_str() == *code
                && e.policy.as_ref().is_none_or(|p| Some(p) == policy.as_ref())
                && e.detail_contains
                    .as_ref()
                    .is_none_or(|d| detail.contains(d.as_str()))
        }
        _ => false,
    }
}

/// The expected outcome as lines.
pub fn expected_lines(expect: &Expect) -> Vec<String> {
    match expect {
        Expect::Pass => vec!["pass".into()],
        Expect::Hold(e) => hold_lines(e),
        Expect::Refuse(e) => refuse_lines(e),
    }
}

fn hold_lines(e: &HoldExpect) -> Vec<String> {
    let mut lines = vec!["hold".to_owned()];
    if let Some(policy) = &e.policy {
        lines.push(format!("  policy: {policy}"));
    }
    lines.push(format!("  binding_message: {:?}", e.binding_message));
    details_lines(&mut lines, e.authorization_details.as_ref());
    if let Some(bound) = e.bound {
        lines.push(format!("  bound: {bound}"));
    }
    if let Some(c) = &e.countersign {
        lines.push(format!(
            "  countersign: {} of {:?}, asked {:?}",
            c.min, c.subjects, c.binding_message
        ));
    }
    lines
}

fn refuse_lines(e: &RefuseExpect) -> Vec<String> {
    let mut lines = vec![format!("refuse {}", e.code.as_str())];
    if let Some(policy) = &e.policy {
        lines.push(format!("  policy: {policy}"));
    }
    if let Some(detail) = &e.detail_contains {
        lines.push(format!("  detail contains: {detail:?}"));
    }
    lines
}

fn details_lines(lines: &mut Vec<String>, details: Option<&Value>) {
    match details {
        None => lines.push("  authorization_details: none".into()),
        Some(details) => {
            lines.push("  authorization_details:".into());
            let pretty = serde_json::to_string_pretty(details).unwrap_or_default();
            lines.extend(pretty.lines().map(|l| format!("    {l}")));
        }
    }
}

/// What was got as lines, showing the fields `expect` asserts; when the
/// kinds differ, the fields that say what happened instead.
pub fn got_lines(expect: &Expect, got: &Got) -> Vec<String> {
    match (expect, got) {
        (Expect::Pass, Got::Pass { .. }) => vec!["pass".into()],
        (_, Got::Pass { policy }) => {
            let mut lines = vec!["pass".to_owned()];
            if let Some(policy) = policy {
                lines.push(format!(
                    "  policy: {policy} (no condition of its route took the call)"
                ));
            }
            lines
        }
        (
            _,
            Got::Hold {
                policy,
                binding_message,
                authorization_details,
                bound,
                countersign,
            },
        ) => {
            // Where a hold was expected, the optional fields it asserts;
            // otherwise all of them.
            let asserts = |field: fn(&HoldExpect) -> bool| match expect {
                Expect::Hold(e) => field(e),
                _ => true,
            };
            hold_lines(&HoldExpect {
                policy: asserts(|e| e.policy.is_some()).then(|| policy.clone()),
                binding_message: binding_message.clone(),
                authorization_details: authorization_details.clone(),
                bound: asserts(|e| e.bound.is_some()).then_some(*bound),
                countersign: countersign
                    .clone()
                    .filter(|_| asserts(|e| e.countersign.is_some())),
            })
        }
        (
            _,
            Got::Refuse {
                code,
                policy,
                detail,
            },
        ) => {
            let mut lines = vec![format!("refuse {code}")];
            let Expect::Refuse(e) = expect else {
                // Another outcome was expected: all of the refusal.
                if let Some(policy) = policy {
                    lines.push(format!("  policy: {policy}"));
                }
                lines.push(format!("  detail: {detail:?}"));
                return lines;
            };
            if e.policy.is_some() {
                lines.push(format!("  policy: {}", policy.as_deref().unwrap_or("none")));
            }
            match &e.detail_contains {
                Some(part) if detail.contains(part.as_str()) => {
                    lines.push(format!("  detail contains: {part:?}"))
                }
                _ if e.detail_contains.is_some() || e.code.as_str() != *code => {
                    lines.push(format!("  detail: {detail:?}"))
                }
                _ => {}
            }
            lines
        }
        (_, Got::Status) => vec!["status resource of an approval".into()],
    }
}

/// A line diff (longest common subsequence): `-` expected only, `+` got
/// only, ` ` both.
pub fn diff(expected: &[String], got: &[String]) -> String {
    let (n, m) = (expected.len(), got.len());
    let mut lcs = vec![vec![0usize; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if expected[i] == got[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let mut out = String::from("--- expected\n+++ got\n");
    let (mut i, mut j) = (0, 0);
    while i < n || j < m {
        if i < n && j < m && expected[i] == got[j] {
            out.push_str(&format!("  {}\n", expected[i]));
            i += 1;
            j += 1;
        } else if i < n && (j == m || lcs[i + 1][j] >= lcs[i][j + 1]) {
            out.push_str(&format!("- {}\n", expected[i]));
            i += 1;
        } else {
            out.push_str(&format!("+ {}\n", got[j]));
            j += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::problem::ProblemCode;

    fn hold(message: &str) -> Got {
        Got::Hold {
            policy: "buy".into(),
            binding_message: message.into(),
            authorization_details: None,
            bound: true,
            countersign: None,
        }
    }

    #[test]
    fn a_hold_matches_on_the_fields_asserted() {
        let mut expect = HoldExpect {
            policy: None,
            binding_message: "Buy 2".into(),
            authorization_details: None,
            bound: None,
            countersign: None,
        };
        assert!(matches(&Expect::Hold(expect.clone()), &hold("Buy 2")));
        assert!(!matches(&Expect::Hold(expect.clone()), &hold("Buy 3")));
        expect.policy = Some("other".into());
        assert!(!matches(&Expect::Hold(expect), &hold("Buy 2")));
    }

    #[test]
    fn a_refusal_matches_on_its_code_and_a_piece_of_its_detail() {
        let got = Got::Refuse {
            code: "invalid_body",
            policy: Some("buy".into()),
            detail: "The field qty is missing.".into(),
        };
        let expect = |detail: Option<&str>| {
            Expect::Refuse(RefuseExpect {
                code: ProblemCode::InvalidBody,
                policy: None,
                detail_contains: detail.map(str::to_owned),
            })
        };
        assert!(matches(&expect(None), &got));
        assert!(matches(&expect(Some("qty is missing")), &got));
        assert!(!matches(&expect(Some("price")), &got));
    }

    #[test]
    fn the_diff_marks_the_changed_line_only() {
        let expect = Expect::Hold(HoldExpect {
            policy: Some("buy".into()),
            binding_message: "Buy 2".into(),
            authorization_details: None,
            bound: None,
            countersign: None,
        });
        let got = hold("Buy 3");
        let diff = diff(&expected_lines(&expect), &got_lines(&expect, &got));
        assert_eq!(
            diff,
            "--- expected\n+++ got\n  hold\n    policy: buy\n-   binding_message: \"Buy 2\"\n+   binding_message: \"Buy 3\"\n    authorization_details: none\n"
        );
    }
}
