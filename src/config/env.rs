//! `${VAR}` expansion for values that come from the environment.
//!
//! Expansion happens while the YAML node is parsed, so a missing variable is
//! reported with the file, line and key that asked for it.

use std::fmt;

use serde::{de, Deserialize, Deserializer};

use crate::secret::Secret;

/// Expands `${NAME}` from the environment; `$$` is a literal `$`. An unset or
/// empty variable is an error: a blank secret must never be sent.
pub fn expand(raw: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(tail) = after.strip_prefix('{') {
            let end = tail
                .find('}')
                .ok_or_else(|| format!("unclosed '${{' in {raw:?}"))?;
            let name = &tail[..end];
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!(
                    "'${{{name}}}' is not a valid environment variable name"
                ));
            }
            match lookup(name) {
                Some(value) if !value.is_empty() => out.push_str(&value),
                _ => return Err(format!("environment variable {name} is not set")),
            }
            rest = &tail[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn expand_from_process_env(raw: &str) -> Result<String, String> {
    expand(raw, |name| std::env::var(name).ok())
}

/// A plain configuration string that may reference the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Text(pub String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        expand_from_process_env(&raw)
            .map(Text)
            .map_err(de::Error::custom)
    }
}

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A credential from the configuration; never printed.
#[derive(Debug, Clone)]
pub struct SecretText(pub Secret);

impl<'de> Deserialize<'de> for SecretText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        expand_from_process_env(&raw)
            .map(|v| SecretText(Secret::new(v)))
            .map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "SECRET" => Some("s3cr3t".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn expands_and_refuses_missing_or_empty() {
        assert_eq!(expand("a-${SECRET}-$$-b", env).unwrap(), "a-s3cr3t-$-b");
        assert_eq!(expand("plain", env).unwrap(), "plain");
        assert!(expand("${MISSING}", env)
            .unwrap_err()
            .contains("MISSING is not set"));
        assert!(expand("${EMPTY}", env)
            .unwrap_err()
            .contains("EMPTY is not set"));
        assert!(expand("${OOPS", env).unwrap_err().contains("unclosed"));
    }
}
