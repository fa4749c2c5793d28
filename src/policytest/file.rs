//! The shape of a policy test file (`policies/*.test.yaml`): strict like
//! the configuration (an unknown key is an error with file, line and key).

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use crate::problem::ProblemCode;

/// A test file: the cases, in order.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestFile {
    pub cases: Vec<Case>,
}

/// One call and what it must get.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    pub call: CallSpec,
    pub expect: Expect,
}

/// A call as an agent would send it to the gateway.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallSpec {
    /// `GET` when absent.
    #[serde(default)]
    pub method: Option<String>,
    /// The request target: origin-form (`/shop?x=1`) or an absolute URL,
    /// as it would appear on the request line.
    pub target: String,
    /// The `Host` header; `localhost` when absent (and no `host` header is
    /// given in `headers`).
    #[serde(default)]
    pub host: Option<String>,
    /// Header values; a list sends the header once per value.
    #[serde(default)]
    pub headers: BTreeMap<String, HeaderValues>,
    /// A JSON body, sent with `Content-Type: application/json` unless
    /// `headers` name another.
    #[serde(default)]
    pub json: Option<Value>,
    /// A body sent byte for byte as written.
    #[serde(default)]
    pub body: Option<String>,
    /// The approving person's claims (a string `sub` at least), as a
    /// verified JWT would give them. Without it the call's identity is read
    /// as the configuration says (its header, or the static subject).
    #[serde(default)]
    pub user: Option<serde_json::Map<String, Value>>,
}

/// One header value or several.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum HeaderValues {
    One(String),
    Many(Vec<String>),
}

impl HeaderValues {
    pub fn values(&self) -> Vec<&str> {
        match self {
            Self::One(value) => vec![value.as_str()],
            Self::Many(values) => values.iter().map(String::as_str).collect(),
        }
    }
}

/// What a call must get: `pass`, `{ hold: … }` or `{ refuse: … }`.
#[derive(Debug, Clone, PartialEq)]
pub enum Expect {
    /// Forwarded without approval (no policy, or its conditions let it go).
    Pass,
    /// Held for approval.
    Hold(HoldExpect),
    /// Refused.
    Refuse(RefuseExpect),
}

impl<'de> Deserialize<'de> for Expect {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        const KINDS: &[&str] = &["pass", "hold", "refuse"];
        struct Kind;
        impl<'de> Visitor<'de> for Kind {
            type Value = Expect;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("pass, { hold: … } or { refuse: … }")
            }
            fn visit_str<E: de::Error>(self, raw: &str) -> Result<Self::Value, E> {
                match raw {
                    "pass" => Ok(Expect::Pass),
                    other => Err(E::unknown_variant(other, KINDS)),
                }
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let key: String = map
                    .next_key()?
                    .ok_or_else(|| de::Error::custom("expected one of hold, refuse"))?;
                let expect = match key.as_str() {
                    "hold" => Expect::Hold(map.next_value()?),
                    "refuse" => Expect::Refuse(map.next_value()?),
                    "pass" => {
                        map.next_value::<de::IgnoredAny>()?;
                        return Err(de::Error::custom("write `expect: pass`"));
                    }
                    other => return Err(de::Error::unknown_variant(other, KINDS)),
                };
                if let Some(extra) = map.next_key::<String>()? {
                    return Err(de::Error::custom(format!(
                        "one outcome only: {key} and {extra} are both given"
                    )));
                }
                Ok(expect)
            }
        }
        d.deserialize_any(Kind)
    }
}

/// A held call: the message and details are compared exactly.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HoldExpect {
    /// The policy whose approval it needs (not compared when absent).
    #[serde(default)]
    pub policy: Option<String>,
    pub binding_message: String,
    /// The policy's own rendered `authorization_details`, without the
    /// `countersign_call` entry `bind: call` adds when the call is held (its
    /// approval id is new each time). Absent: the policy renders none.
    #[serde(default)]
    pub authorization_details: Option<Value>,
    /// Whether the policy binds the token to the call (`bind: call`); not
    /// compared when absent.
    #[serde(default)]
    pub bound: Option<bool>,
    /// Four eyes: who countersigns and what they are asked; not compared
    /// when absent.
    #[serde(default)]
    pub countersign: Option<CountersignExpect>,
}

/// The countersigners of a held call, in the policy's order, the person
/// excluded.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CountersignExpect {
    pub subjects: Vec<String>,
    pub min: u32,
    pub binding_message: String,
}

/// A refusal, by its problem code: `refuse: invalid_body`, or a map with
/// `code` and optionally the `policy` it fell under and a piece of the
/// `detail` the agent is given.
#[derive(Debug, Clone, PartialEq)]
pub struct RefuseExpect {
    pub code: ProblemCode,
    pub policy: Option<String>,
    pub detail_contains: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RefuseMap {
    code: Code,
    #[serde(default)]
    policy: Option<String>,
    #[serde(default)]
    detail_contains: Option<String>,
}

/// A problem code the gateway answers with.
struct Code(ProblemCode);

impl<'de> Deserialize<'de> for Code {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        ProblemCode::parse(&raw)
            .map(Code)
            .ok_or_else(|| de::Error::custom(format!("unknown problem code {raw:?}")))
    }
}

impl<'de> Deserialize<'de> for RefuseExpect {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Refuse;
        impl<'de> Visitor<'de> for Refuse {
            type Value = RefuseExpect;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a problem code, or a map with code, policy, detail_contains")
            }
            fn visit_str<E: de::Error>(self, raw: &str) -> Result<Self::Value, E> {
                let code = ProblemCode::parse(raw)
                    .ok_or_else(|| E::custom(format!("unknown problem code {raw:?}")))?;
                Ok(RefuseExpect {
                    code,
                    policy: None,
                    detail_contains: None,
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                let map = RefuseMap::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(RefuseExpect {
                    code: map.code.0,
                    policy: map.policy,
                    detail_contains: map.detail_contains,
                })
            }
        }
        d.deserialize_any(Refuse)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn parse(text: &str) -> Result<TestFile, String> {
        crate::config::parse_yaml(Path::new("t.test.yaml"), text).map_err(|e| e.to_string())
    }

    #[test]
    fn reads_each_kind_of_expectation() {
        let file = parse(
            "cases:\n  - name: a\n    call: { target: /x }\n    expect: pass\n  - name: b\n    call: { method: POST, target: /shop, json: { qty: 2 } }\n    expect:\n      hold:\n        policy: buy\n        binding_message: Buy 2\n        bound: true\n  - name: c\n    call: { target: /x }\n    expect: { refuse: invalid_body }\n  - name: d\n    call: { target: /x }\n    expect: { refuse: { code: policy_denied, policy: p } }\n",
        )
        .unwrap();
        assert_eq!(file.cases[0].expect, Expect::Pass);
        assert!(
            matches!(&file.cases[1].expect, Expect::Hold(h) if h.binding_message == "Buy 2" && h.bound == Some(true))
        );
        assert!(
            matches!(&file.cases[2].expect, Expect::Refuse(r) if r.code == ProblemCode::InvalidBody)
        );
        assert!(
            matches!(&file.cases[3].expect, Expect::Refuse(r) if r.policy.as_deref() == Some("p"))
        );
    }

    #[test]
    fn unknown_keys_and_codes_name_file_line_and_key() {
        let error = parse(
            "cases:\n  - name: a\n    call: { target: /x }\n    expect: pass\n    colour: red\n",
        )
        .unwrap_err();
        assert!(
            error.starts_with("t.test.yaml:5:5: cases[0].colour: unknown field `colour`"),
            "{error}"
        );
        let error =
            parse("cases:\n  - name: a\n    call: { target: /x, metod: GET }\n    expect: pass\n")
                .unwrap_err();
        assert!(error.starts_with("t.test.yaml:3:"), "{error}");
        assert!(
            error.contains("cases[0].call.metod: unknown field `metod`"),
            "{error}"
        );
        let error = parse("cases:\n  - name: a\n    call: { target: /x }\n    expect: { refuse: invalid_bodyy }\n").unwrap_err();
        assert!(
            error.contains("unknown problem code \"invalid_bodyy\""),
            "{error}"
        );
        let error = parse("cases:\n  - name: a\n    call: { target: /x }\n    expect:\n      hold: { binding_message: x, details: [] }\n").unwrap_err();
        assert!(error.contains("unknown field `details`"), "{error}");
    }
}
