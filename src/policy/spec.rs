//! The YAML shape of a policy file. Field types validate themselves while
//! being parsed, so errors carry the file, line and key.

use std::time::Duration;

use schemars::JsonSchema;
use serde::{de, Deserialize, Deserializer};

use super::condition::Condition;
use super::template::{DetailsTemplate, MessageTemplate};

/// One policy file: `policies: [...]`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    pub policies: Vec<PolicySpec>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    /// Also the `policy` label of metrics, so it is restricted to a small alphabet.
    pub name: PolicyName,
    #[serde(rename = "match")]
    pub matcher: MatchSpec,
    /// A CEL condition over the call (`body`, `params`, `query`, `user`,
    /// `request`): the call needs this policy's approval only when it is
    /// true. Policies sharing a route are tried in file order; the first
    /// whose condition is true wins.
    #[serde(default)]
    pub when: Option<Condition>,
    /// What happens to a call whose `when` is false (for policies sharing a
    /// route: that no policy's `when` took): `pass` (default) forwards it
    /// without approval, `deny` refuses it with `policy_denied`. Only with
    /// `when`, and only on the last policy of a route.
    #[serde(default)]
    pub otherwise: Option<Otherwise>,
    pub require: RequireSpec,
    pub binding_message: MessageTemplate,
    #[serde(default)]
    pub authorization_details: Option<DetailsTemplate>,
    /// How long the person has to answer; capped by `limits.max_hold`.
    #[serde(default, with = "humantime_serde")]
    #[schemars(with = "Option<crate::schema_shapes::HumanDuration>")]
    pub requested_expiry: Option<Duration>,
    /// The upstreams the fresh token may be sent to. May be omitted when the
    /// gateway has exactly one upstream; checked against the routes at load.
    #[serde(default)]
    pub upstreams: Option<Vec<String>>,
    /// What the JSON body may carry besides what the approval shows.
    #[serde(default)]
    pub body: Option<BodySpec>,
    /// How the agent waits for the person: `hold` (default), `async`, or
    /// `{ hold: 25s }`.
    #[serde(default)]
    pub wait: WaitMode,
    /// `call`: the token issued for the approval must name this exact call
    /// (docs/call-binding.md), so the API can check it; `none` (default).
    #[serde(default)]
    pub bind: Bind,
    /// Four eyes: countersigners who must approve the call too, besides
    /// the person (docs/four-eyes.md).
    #[serde(default)]
    pub countersign: Option<super::countersign::CountersignSpec>,
    /// `enforce` (default), or `shadow`: its calls are decided fully but go
    /// on as the enforced policies say, and what it would have done is
    /// counted and kept (docs/changing-policies.md). Never a push.
    #[serde(default)]
    pub mode: Mode,
}

/// Whether a policy acts on calls or only records what it would do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Enforce,
    Shadow,
}

/// What the token issued for an approval is bound to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Bind {
    /// Nothing beyond the policy's scopes and audience.
    #[default]
    None,
    /// The exact call: a `countersign_call` entry in `authorization_details`,
    /// checked in the issued token before the call is forwarded.
    Call,
}

/// What happens to a call a policy's condition does not take.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Otherwise {
    /// Forwarded as it is, without approval.
    #[default]
    Pass,
    /// Refused with `policy_denied`.
    Deny,
}

/// How an agent waits for an approval.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WaitMode {
    /// The call stays open until the person answers (up to `max_hold`).
    #[default]
    Hold,
    /// `202 Accepted` at once; the agent calls again.
    Async,
    /// Held for at most this long, then `202 Accepted`.
    HoldFor(Duration),
}

impl<'de> Deserialize<'de> for WaitMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct HoldFor {
            #[serde(with = "humantime_serde")]
            hold: Duration,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Shape {
            Word(String),
            Map(HoldFor),
        }
        match Shape::deserialize(d)? {
            Shape::Word(w) if w == "hold" => Ok(Self::Hold),
            Shape::Word(w) if w == "async" => Ok(Self::Async),
            Shape::Map(HoldFor { hold }) => Ok(Self::HoldFor(hold)),
            Shape::Word(w) => Err(de::Error::custom(format!(
                "wait {w:?}: use `hold`, `async` or `{{ hold: 25s }}`"
            ))),
        }
    }
}

/// `body: { only: [product, qty] }`: a call must carry a JSON body, an object
/// with no top-level fields but these (compared ignoring letter case); every
/// body field the templates show must be listed. Nested objects are not
/// constrained. Without it, body fields that the person is not shown still
/// reach the API.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BodySpec {
    pub only: BodyFields,
}

/// Top-level body field names: non-empty, none twice (ignoring letter case).
#[derive(Debug, Clone)]
pub struct BodyFields(pub Vec<String>);

impl<'de> Deserialize<'de> for BodyFields {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let names = Vec::<String>::deserialize(d)?;
        let mut folded = std::collections::HashSet::new();
        for name in &names {
            if name.is_empty() {
                return Err(de::Error::custom("body field names must not be empty"));
            }
            if !folded.insert(super::body::fold_case(name)) {
                return Err(de::Error::custom(format!(
                    "body field {name:?} is listed twice (letter case does not count)"
                )));
            }
        }
        Ok(Self(names))
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MatchSpec {
    /// Required, except with `mcp` (a `tools/call` is always a POST).
    #[serde(default)]
    pub methods: Option<Methods>,
    pub path: PathTemplate,
    #[serde(default)]
    pub host: Option<HostName>,
    /// Also cover format-suffix spellings (`/shop.json`, `/shop.xml`), which
    /// Rails and older Spring route to the same handler. On unless turned off.
    #[serde(default = "default_true")]
    pub format_suffix: bool,
    /// `mcp: { tool: buy_product }`: the path is an MCP (Streamable HTTP)
    /// endpoint, and this policy holds its JSON-RPC `tools/call` requests for
    /// the tools named; every other message on the endpoint passes.
    #[serde(default)]
    pub mcp: Option<McpSpec>,
}

/// Which MCP tool calls a policy holds.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct McpSpec {
    pub tool: ToolPattern,
    /// `arguments: { only: [product, qty] }`: a call's arguments may carry no
    /// names but these (compared ignoring letter case); every argument the
    /// templates show must be listed. Without it, arguments the person is not
    /// shown still reach the server.
    #[serde(default)]
    pub arguments: Option<BodySpec>,
}

/// An MCP tool name, or a glob of them (`*` for any run of characters):
/// `buy_product`, `buy_*`, `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolPattern(pub String);

impl<'de> Deserialize<'de> for ToolPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let tool = String::deserialize(d)?;
        let valid = !tool.is_empty()
            && tool.len() <= 128
            && tool
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/' | '*'));
        if valid {
            Ok(Self(tool))
        } else {
            Err(de::Error::custom(format!(
                "tool {tool:?} must be 1-128 characters of letters, digits, '_', '-', '.', '/' or the wildcard '*'"
            )))
        }
    }
}

fn default_true() -> bool {
    true
}

/// A non-empty list of methods.
#[derive(Debug, Clone)]
pub struct Methods(pub Vec<MethodName>);

impl<'de> Deserialize<'de> for Methods {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let methods = Vec::<MethodName>::deserialize(d)?;
        if methods.is_empty() {
            return Err(de::Error::custom(
                "at least one method is required (use [\"*\"] for every method)",
            ));
        }
        Ok(Self(methods))
    }
}

impl<'a> IntoIterator for &'a Methods {
    type Item = &'a MethodName;
    type IntoIter = std::slice::Iter<'a, MethodName>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RequireSpec {
    pub scopes: Scopes,
    #[serde(default)]
    pub audience: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PolicyName(pub String);

impl<'de> Deserialize<'de> for PolicyName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if valid {
            Ok(Self(name))
        } else {
            Err(de::Error::custom(format!(
                "policy name {name:?} must be 1-64 characters of letters, digits, '-', '_' or '.'"
            )))
        }
    }
}

/// An upper-cased HTTP method token.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MethodName(pub String);

impl<'de> Deserialize<'de> for MethodName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let method = String::deserialize(d)?.to_ascii_uppercase();
        if method == "*" || http::Method::from_bytes(method.as_bytes()).is_ok() {
            Ok(Self(method))
        } else {
            Err(de::Error::custom(format!(
                "{method:?} is not an HTTP method"
            )))
        }
    }
}

/// A lower-cased host name without port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostName(pub String);

impl<'de> Deserialize<'de> for HostName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let host = String::deserialize(d)?;
        match super::host_key(&host) {
            Ok(key) if !host.contains(':') => Ok(Self(key)),
            _ => Err(de::Error::custom(format!(
                "host {host:?} must be a bare host name, without scheme, port or path"
            ))),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Scopes(pub Vec<String>);

impl<'de> Deserialize<'de> for Scopes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let scopes = Vec::<String>::deserialize(d)?;
        if scopes.is_empty() {
            return Err(de::Error::custom("at least one scope is required"));
        }
        if let Some(bad) = scopes.iter().find(|s| {
            s.is_empty()
                || s.chars()
                    .any(|c| c.is_whitespace() || c == '"' || c == '\\')
        }) {
            return Err(de::Error::custom(format!("{bad:?} is not a valid scope")));
        }
        Ok(Self(scopes))
    }
}

/// A path template: `/shop`, `/orders/{id}`, `/files/{*rest}`.
#[derive(Debug, Clone)]
pub struct PathTemplate {
    pub source: String,
    /// Literal parts lower-cased, to be matched against a normalised path key.
    pub route: String,
}

impl PathTemplate {
    pub fn parse(source: &str) -> Result<Self, String> {
        if !source.starts_with('/') {
            return Err(format!("path {source:?} must start with '/'"));
        }
        let mut route = String::with_capacity(source.len());
        let mut in_param = false;
        for c in source.chars() {
            match c {
                '{' if !in_param => {
                    in_param = true;
                    route.push(c);
                }
                '}' if in_param => {
                    in_param = false;
                    route.push(c);
                }
                _ if in_param => route.push(c),
                _ => route.extend(c.to_lowercase()),
            }
        }
        if in_param {
            return Err(format!("path {source:?} has an unclosed '{{'"));
        }
        // Same canonical form as requests: no trailing slash, no dot segments.
        if route.len() > 1 && route.ends_with('/') {
            route.pop();
        }
        if route.split('/').any(|s| s == "." || s == "..") || route.contains("//") {
            return Err(format!(
                "path {source:?} must not contain '//', '.' or '..' segments"
            ));
        }
        // Literal text must be spelled the way requests are matched: the
        // normaliser would otherwise never produce it (`%73hop`, `;v=1`, a
        // space), and the policy would silently cover nothing.
        let literal: String = {
            let mut text = String::with_capacity(route.len());
            let mut depth = 0;
            for c in route.chars() {
                match c {
                    '{' => {
                        depth += 1;
                        text.push('p');
                    }
                    '}' => depth -= 1,
                    _ if depth == 0 => text.push(c),
                    _ => {}
                }
            }
            text
        };
        match super::normalize(&literal) {
            Ok(path) if path.match_key == literal && !literal.contains(['%', ';']) => {}
            _ => {
                return Err(format!(
                    "path {source:?} is not in canonical form: use plain unescaped segments without '%', ';', spaces or '//'"
                ))
            }
        }
        // matchit validates parameter syntax; probe it now for a load-time error.
        matchit::Router::<()>::new()
            .insert(route.as_str(), ())
            .map_err(|e| format!("path {source:?}: {e}"))?;
        Ok(Self {
            source: source.to_owned(),
            route,
        })
    }
}

impl<'de> Deserialize<'de> for PathTemplate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let source = String::deserialize(d)?;
        Self::parse(&source).map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_templates_are_lower_cased_outside_parameters() {
        let t = PathTemplate::parse("/Orders/{orderId}/").unwrap();
        assert_eq!(t.route, "/orders/{orderId}");
        assert!(PathTemplate::parse("shop").is_err());
        assert!(PathTemplate::parse("/a/{b").is_err());
        assert!(PathTemplate::parse("/a/../b").is_err());
        assert!(PathTemplate::parse("/files/{*rest}").is_ok());
        for bad in ["/%73hop", "/shop;v=1", "/sh op", "/a//b", "/shop%2F"] {
            assert!(PathTemplate::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn methods_and_hosts_are_checked() {
        assert!(serde_yaml::from_str::<Methods>("[]").is_err());
        assert!(serde_yaml::from_str::<Methods>("[get]").is_ok());
        let host: HostName = serde_yaml::from_str("Admin.Example.").unwrap();
        assert_eq!(host.0, "admin.example");
        assert!(serde_yaml::from_str::<HostName>("admin.example:80").is_err());
    }

    #[test]
    fn body_field_lists_are_checked() {
        let parse = |yaml: &str| serde_yaml::from_str::<BodySpec>(yaml).map(|b| b.only.0);
        assert_eq!(parse("only: [product, qty]").unwrap(), ["product", "qty"]);
        assert!(parse("only: [qty, '']")
            .unwrap_err()
            .to_string()
            .contains("empty"));
        assert!(parse("only: [qty, QTY]")
            .unwrap_err()
            .to_string()
            .contains("twice"));
        assert!(parse("only: [qty]\nexcept: [a]").is_err());
    }
}
