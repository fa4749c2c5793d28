//! Call binding (docs/call-binding.md): the `authorization_details` entry
//! that names the exact call a person approves, so that the token issued for
//! it is good for that call only, and the check that the token carries it.

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::store::StoredRequest;

/// The entry's `type`.
pub const TYPE: &str = "countersign_call";
/// The version of docs/call-binding.md this gateway speaks.
pub const VERSION: &str = "1";

/// The entry naming `request` as it will be forwarded: method, target and
/// body byte for byte, and the `Host` the upstream will receive.
pub fn entry(approval_id: &str, request: &StoredRequest, host: &str, tool: Option<&str>) -> Value {
    let mut entry = json!({
        "type": TYPE,
        "version": VERSION,
        "approval": approval_id,
        "method": request.method,
        "target": request.path_and_query,
        "host": host,
        "body_sha256": body_digest(&request.body),
    });
    if let Some(tool) = tool {
        entry["tool"] = Value::String(tool.to_owned());
    }
    entry
}

/// SHA-256, base64url without padding.
pub fn body_digest(body: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(body))
}

/// The policy's own details with `entry` after them, as the list RFC 9396
/// asks for (a policy's single map becomes the list's first entry).
pub fn with_entry(details: Option<Value>, entry: Value) -> Value {
    match details {
        Some(Value::Array(mut entries)) => {
            entries.push(entry);
            Value::Array(entries)
        }
        Some(one) => Value::Array(vec![one, entry]),
        None => Value::Array(vec![entry]),
    }
}

/// The binding entry among the details an approval was asked with.
pub fn find(details: Option<&Value>) -> Option<&Value> {
    details?
        .as_array()?
        .iter()
        .find(|e| e.get("type").and_then(Value::as_str) == Some(TYPE))
}

/// Why an issued token does not bind the call: `None` when its
/// `authorization_details` claim holds exactly one binding entry, equal to
/// `expected` in every field.
pub fn mismatch(claims: &Value, expected: &Value) -> Option<String> {
    let Some(details) = claims.get("authorization_details") else {
        return Some("the token has no authorization_details claim".into());
    };
    let Some(entries) = details.as_array() else {
        return Some("the token's authorization_details is not a list".into());
    };
    let bound: Vec<&Value> = entries
        .iter()
        .filter(|e| e.get("type").and_then(Value::as_str) == Some(TYPE))
        .collect();
    match bound.as_slice() {
        [] => Some(format!(
            "the token's authorization_details has no {TYPE} entry"
        )),
        [one] if *one == expected => None,
        [one] => {
            let field = changed_field(one, expected);
            Some(format!(
                "the token's {TYPE} entry differs from the one asked for (in {field})"
            ))
        }
        _ => Some(format!(
            "the token's authorization_details has {} {TYPE} entries",
            bound.len()
        )),
    }
}

/// The first field in which `got` differs from `expected`, for the log.
fn changed_field(got: &Value, expected: &Value) -> String {
    let (Some(got), Some(expected)) = (got.as_object(), expected.as_object()) else {
        return "its shape".into();
    };
    expected
        .iter()
        .find(|(k, v)| got.get(*k) != Some(*v))
        .map(|(k, _)| k.clone())
        .or_else(|| got.keys().find(|k| !expected.contains_key(*k)).cloned())
        .unwrap_or_else(|| "its shape".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(body: &[u8]) -> StoredRequest {
        StoredRequest {
            method: "POST".into(),
            path_and_query: "/shop?ref=agent".into(),
            headers: vec![],
            body: body.to_vec(),
        }
    }

    #[test]
    fn the_empty_body_digest_is_the_one_the_specification_gives() {
        assert_eq!(
            body_digest(b""),
            "47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU"
        );
    }

    #[test]
    fn the_entry_goes_after_the_policys_own_details() {
        let bound = entry("a1", &request(b"{}"), "shop.example", None);
        let one = json!({"type": "product_purchase"});
        assert_eq!(
            with_entry(Some(one.clone()), bound.clone()),
            json!([one, bound])
        );
        assert_eq!(
            with_entry(Some(json!([one])), bound.clone()),
            json!([one, bound])
        );
        assert_eq!(with_entry(None, bound.clone()), json!([bound]));
        assert_eq!(find(Some(&json!([one, bound]))), Some(&bound));
    }

    #[test]
    fn a_token_binds_only_with_exactly_the_entry_asked_for() {
        let expected = entry("a1", &request(b"{\"qty\":2}"), "shop.example", None);
        let claims = |details: Value| json!({ "authorization_details": details });
        assert_eq!(
            mismatch(&claims(json!([expected.clone()])), &expected),
            None
        );
        let mut other_body = expected.clone();
        other_body["body_sha256"] = json!(body_digest(b"{\"qty\":20}"));
        let why = mismatch(&claims(json!([other_body])), &expected).unwrap();
        assert!(why.contains("body_sha256"), "{why}");
        let mut added = expected.clone();
        added["note"] = json!("x");
        assert!(mismatch(&claims(json!([added])), &expected).is_some());
        assert!(mismatch(&json!({}), &expected).is_some());
        assert!(mismatch(&claims(json!([{"type": "product_purchase"}])), &expected).is_some());
        assert!(mismatch(&claims(json!([expected, expected])), &expected).is_some());
    }
}
