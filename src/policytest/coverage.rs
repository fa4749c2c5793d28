//! `countersign test --coverage`: the policies no case reaches, and the
//! condition branches (a `when` true, a `when` false) no case takes, read
//! from the steps the decision reported for every case.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use super::Report;
use crate::decision::Step;
use crate::policy::PolicySet;

/// What the cases of a report exercised.
#[derive(Debug, Default)]
pub struct Coverage {
    /// Policies some case reached (tested its condition, or chose it).
    pub policies: BTreeSet<String>,
    /// `(policy, value)` of every condition evaluated.
    pub branches: BTreeSet<(String, bool)>,
}

impl Coverage {
    pub fn of(report: &Report) -> Self {
        let mut coverage = Self::default();
        for step in report.cases().flat_map(|c| &c.steps) {
            match step {
                Step::Condition { policy, holds, .. } => {
                    coverage.policies.insert(policy.clone());
                    coverage.branches.insert((policy.clone(), *holds));
                }
                Step::Chosen { policy }
                | Step::McpTool { policy, .. }
                | Step::Rendered { policy, .. } => {
                    coverage.policies.insert(policy.clone());
                }
                _ => {}
            }
        }
        coverage
    }

    /// The summary and one line per policy or branch not exercised.
    pub fn text(&self, policies: &PolicySet) -> String {
        let mut missed = Vec::new();
        let mut branches = 0;
        let mut covered_branches = 0;
        for policy in policies.policies() {
            let place = policy.file.display();
            if !self.policies.contains(&policy.name) {
                missed.push(format!(
                    "policy {} ({place}): no case reaches it",
                    policy.name
                ));
            }
            let Some(condition) = &policy.condition else {
                continue;
            };
            for value in [true, false] {
                branches += 1;
                if self.branches.contains(&(policy.name.clone(), value)) {
                    covered_branches += 1;
                } else if self.policies.contains(&policy.name) {
                    missed.push(format!(
                        "policy {} ({place}): when {:?} is never {value}",
                        policy.name,
                        condition.source()
                    ));
                }
            }
        }
        let total = policies.policies().len();
        let reached = policies
            .policies()
            .iter()
            .filter(|p| self.policies.contains(&p.name))
            .count();
        let mut out = format!(
            "coverage: {reached} of {total} policies exercised, {covered_branches} of {branches} condition branches\n"
        );
        for line in missed {
            let _ = writeln!(out, "  not exercised: {line}");
        }
        out
    }
}
