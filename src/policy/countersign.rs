//! Four eyes: who else must approve a call a policy holds, besides the
//! person it is made for (docs/four-eyes.md). Resolved per call from the
//! policy's fixed subjects and the person's claims; never the person.

use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Value;

use super::template::MessageTemplate;

/// `countersign:` in a policy.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CountersignSpec {
    /// Subjects asked to countersign, as the authorization server knows
    /// them (each is asked by CIBA `login_hint`, like the person).
    #[serde(default)]
    pub subjects: Vec<String>,
    /// Claims of the person's identity that name countersigners (a string,
    /// or an array of strings), such as `manager`.
    #[serde(default)]
    pub from_claims: Vec<String>,
    /// How many countersigners must approve besides the person (default 1).
    #[serde(default = "one")]
    pub min: u32,
    /// What each countersigner is asked; the template language of
    /// `binding_message` ("Approve {{user.sub}}'s transfer of ...").
    pub binding_message: MessageTemplate,
}

fn one() -> u32 {
    1
}

/// A policy's countersigners, compiled.
#[derive(Debug)]
pub struct Countersign {
    pub subjects: Vec<String>,
    pub from_claims: Vec<String>,
    pub min: u32,
    pub(super) message: MessageTemplate,
}

/// Who countersigns one call, and what they are asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Countersigners {
    /// Distinct, the person excluded, in the policy's order (fixed
    /// subjects, then claims).
    pub subjects: Vec<String>,
    pub min: u32,
    pub binding_message: String,
}

impl Countersign {
    /// Checks what can be checked before any call: a quorum that fixed
    /// subjects alone could never reach is a configuration error.
    pub(super) fn compile(spec: CountersignSpec) -> Result<Self, String> {
        if spec.min == 0 {
            return Err("countersign.min must be at least 1".into());
        }
        if spec
            .subjects
            .iter()
            .any(|s| s.trim().is_empty() || s.trim() != s)
        {
            return Err(
                "countersign.subjects holds an empty subject or one with spaces around it".into(),
            );
        }
        let fixed = distinct(spec.subjects.iter().map(String::as_str)).len();
        if spec.from_claims.is_empty() && fixed < spec.min as usize {
            return Err(format!(
                "countersign.min is {} but countersign.subjects names {fixed} distinct subject(s) and no from_claims: no call could be countersigned",
                spec.min
            ));
        }
        Ok(Self {
            subjects: spec.subjects,
            from_claims: spec.from_claims,
            min: spec.min,
            message: spec.binding_message,
        })
    }

    /// The countersigners of a call made for the person with `claims`: the
    /// fixed subjects and the subjects the named claims hold, distinct,
    /// without the person (`sub`), who never counts. Values of a claim that
    /// are not strings name nobody. `Err`: fewer than `min` remain, with a
    /// sentence the agent can relay.
    pub fn resolve(&self, claims: &Value) -> Result<Vec<String>, String> {
        let person = claims.get("sub").and_then(Value::as_str).unwrap_or("");
        let from_claims = self
            .from_claims
            .iter()
            .filter_map(|name| claims.get(name))
            .flat_map(|value| match value {
                Value::String(s) => vec![s.as_str()],
                Value::Array(items) => items.iter().filter_map(Value::as_str).collect(),
                _ => Vec::new(),
            });
        let subjects: Vec<String> = distinct(
            self.subjects
                .iter()
                .map(String::as_str)
                .chain(from_claims)
                .filter(|s| !s.is_empty() && *s != person),
        );
        if subjects.len() < self.min as usize {
            return Err(format!(
                "This call needs {} countersigner(s) besides {person}, and its policy names {} other person(s) for it{}; nobody was asked.",
                self.min,
                subjects.len(),
                if self.from_claims.is_empty() {
                    String::new()
                } else {
                    format!(" (claims read: {})", self.from_claims.join(", "))
                }
            ));
        }
        Ok(subjects)
    }
}

fn distinct<'a>(subjects: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut seen: Vec<String> = Vec::new();
    for subject in subjects {
        if !seen.iter().any(|s| s == subject) {
            seen.push(subject.to_owned());
        }
    }
    seen
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn countersign(subjects: &[&str], from_claims: &[&str], min: u32) -> Countersign {
        Countersign::compile(CountersignSpec {
            subjects: subjects.iter().map(|s| s.to_string()).collect(),
            from_claims: from_claims.iter().map(|s| s.to_string()).collect(),
            min,
            binding_message: MessageTemplate::parse("Approve").unwrap(),
        })
        .unwrap()
    }

    #[test]
    fn the_person_never_countersigns_their_own_call() {
        let policy = countersign(&["alice", "bob", "bob"], &[], 1);
        assert_eq!(
            policy.resolve(&json!({"sub": "alice"})),
            Ok(vec!["bob".to_owned()])
        );
        assert_eq!(
            policy.resolve(&json!({"sub": "bob"})),
            Ok(vec!["alice".to_owned()])
        );
        assert_eq!(
            policy.resolve(&json!({"sub": "carol"})),
            Ok(vec!["alice".to_owned(), "bob".to_owned()])
        );
        let two = countersign(&["alice", "bob"], &[], 2);
        let error = two.resolve(&json!({"sub": "alice"})).unwrap_err();
        assert!(
            error.contains("needs 2 countersigner(s) besides alice"),
            "{error}"
        );
        assert!(error.contains("names 1 other"), "{error}");
    }

    #[test]
    fn claims_name_countersigners() {
        let policy = countersign(&["cfo"], &["manager", "approvers"], 2);
        let claims =
            json!({"sub": "alice", "manager": "bob", "approvers": ["carol", "alice", 7, "bob"]});
        assert_eq!(
            policy.resolve(&claims),
            Ok(vec!["cfo".to_owned(), "bob".to_owned(), "carol".to_owned()])
        );
        let error = policy.resolve(&json!({"sub": "cfo"})).unwrap_err();
        assert!(error.contains("claims read: manager, approvers"), "{error}");
    }

    #[test]
    fn a_quorum_fixed_subjects_cannot_reach_is_refused_at_load() {
        let spec = |subjects: &[&str], min| CountersignSpec {
            subjects: subjects.iter().map(|s| s.to_string()).collect(),
            from_claims: Vec::new(),
            min,
            binding_message: MessageTemplate::parse("Approve").unwrap(),
        };
        assert!(Countersign::compile(spec(&["bob", "bob"], 2))
            .unwrap_err()
            .contains("names 1 distinct"));
        assert!(Countersign::compile(spec(&["bob"], 0)).is_err());
        assert!(Countersign::compile(spec(&[" bob"], 1)).is_err());
        assert!(Countersign::compile(spec(&["bob", "carol"], 2)).is_ok());
    }
}
