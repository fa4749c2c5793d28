//! Countersigned calls, "four eyes" (docs/call-binding.md, checks C1-C5):
//! besides the person's token in `Authorization`, the call carries the
//! countersigners' tokens in `Countersign-Tokens`. Each must be a valid
//! token for this API, for the very same call (the same `countersign_call`
//! entry) and bound to the same key; enough distinct others must have signed.
//!
//! A countersign token comes with no DPoP proof of its own: C4 requires it to
//! be bound to the person's token's key, whose possession check 4 proved.

use http::request::Parts;
use http::{HeaderName, StatusCode};
use serde_json::Value;

use crate::{bound_key, call_entries, lacking_scope, single_header, Refusal, Verifier};

/// The header the gateway writes (and strips from what agents send).
const HEADER: HeaderName = HeaderName::from_static("countersign-tokens");

impl Verifier {
    /// C1-C5 for a call whose person's token has `claims` and the binding
    /// `entry` (checks 2-10 passed). Answers the distinct countersigners
    /// besides the person, in header order; nothing when none are required.
    pub(crate) async fn check_countersigners(
        &self,
        parts: &Parts,
        claims: &Value,
        entry: &Value,
    ) -> Result<Vec<String>, Refusal> {
        let required = self.inner.config.required_countersigners;
        if required == 0 {
            return Ok(Vec::new());
        }
        let tokens = countersign_tokens(parts)?;
        // Each check on every token before the next check (the contract's
        // order), so that the answer does not depend on how the tokens are
        // listed more than it must.
        let mut all_claims = Vec::with_capacity(tokens.len());
        for (index, token) in tokens.iter().enumerate() {
            all_claims.push(self.countersign_claims(index, token).await?);
        }
        for (index, countersign) in all_claims.iter().enumerate() {
            same_binding(index, countersign, entry)?;
        }
        for (index, countersign) in all_claims.iter().enumerate() {
            same_key(index, countersign, claims)?;
        }
        let person = claims
            .get("sub")
            .and_then(Value::as_str)
            .unwrap_or_default();
        enough_countersigners(&all_claims, person, required)
    }

    /// C2: the token passes checks 2 and 3, as the person's token did.
    async fn countersign_claims(&self, index: usize, token: &str) -> Result<Value, Refusal> {
        let claims = self
            .token_claims(token)
            .await
            .map_err(|detail| invalid("token", index, &detail))?;
        if let Some(lacking) = lacking_scope(&claims, &self.inner.config.required_scopes) {
            return Err(invalid(
                "token",
                index,
                &format!("the token lacks the scope {lacking}"),
            ));
        }
        Ok(claims)
    }
}

/// C1: the tokens of the one `Countersign-Tokens` field. Empty list
/// elements are ignored (RFC 9110 §5.6.1); no token at all is no
/// countersignature.
fn countersign_tokens(parts: &Parts) -> Result<Vec<&str>, Refusal> {
    let missing = |detail: &str| {
        Refusal::new(
            StatusCode::FORBIDDEN,
            "countersign_missing",
            None,
            detail.to_owned(),
        )
    };
    let value = single_header(&parts.headers, &HEADER)
        .map_err(|()| missing("send exactly one Countersign-Tokens header"))?
        .ok_or_else(|| missing("this API requires countersigned calls: send the countersigners' tokens in a Countersign-Tokens header"))?;
    let tokens: Vec<&str> = value
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect();
    if tokens.is_empty() {
        return Err(missing("the Countersign-Tokens header holds no token"));
    }
    Ok(tokens)
}

/// C3: the token was issued for exactly the person's call: its one
/// `countersign_call` entry equals the person's, every field.
fn same_binding(index: usize, claims: &Value, entry: &Value) -> Result<(), Refusal> {
    match call_entries(claims)[..] {
        [own] if own == entry => Ok(()),
        [_] => Err(invalid(
            "binding",
            index,
            "its countersign_call entry is not the approved call's",
        )),
        _ => Err(invalid(
            "binding",
            index,
            "its authorization_details do not hold exactly one countersign_call entry",
        )),
    }
}

/// C4: the token is bound to the person's token's key, or both to none.
fn same_key(index: usize, claims: &Value, person: &Value) -> Result<(), Refusal> {
    if bound_key(claims) == bound_key(person) {
        return Ok(());
    }
    Err(invalid(
        "key",
        index,
        "its cnf.jkt is not the approver's token's",
    ))
}

/// C5: at least `required` distinct subjects other than the person's.
/// Answers them in header order.
fn enough_countersigners(
    all_claims: &[Value],
    person: &str,
    required: usize,
) -> Result<Vec<String>, Refusal> {
    let mut others: Vec<String> = Vec::new();
    for sub in all_claims
        .iter()
        .filter_map(|c| c.get("sub").and_then(Value::as_str))
    {
        if sub != person && !others.iter().any(|o| o == sub) {
            others.push(sub.to_owned());
        }
    }
    if others.len() < required {
        let (noun, verb) = if required == 1 {
            ("countersigner", "is")
        } else {
            ("countersigners", "are")
        };
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            "countersign_insufficient",
            None,
            format!(
                "{required} distinct {noun} besides {person} {verb} required; the call carries {}",
                others.len()
            ),
        ));
    }
    Ok(others)
}

/// A `countersign_invalid` on `field`, naming the token by its position.
fn invalid(field: &'static str, index: usize, why: &str) -> Refusal {
    Refusal::new(
        StatusCode::FORBIDDEN,
        "countersign_invalid",
        Some(field),
        format!("the {} countersign token: {why}", ordinal(index + 1)),
    )
}

/// `1st`, `2nd`, `3rd`, `4th`, ..., `11th`, `12th`, `13th`, `21st`, ...
fn ordinal(n: usize) -> String {
    let suffix = match (n % 10, n % 100) {
        (_, 11..=13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parts(values: &[&str]) -> Parts {
        let mut request = http::Request::get("/");
        for value in values {
            request = request.header("countersign-tokens", *value);
        }
        request.body(()).unwrap().into_parts().0
    }

    #[test]
    fn ordinals() {
        let got: Vec<String> = [1, 2, 3, 4, 11, 12, 13, 21, 22, 23, 101, 111, 112]
            .into_iter()
            .map(ordinal)
            .collect();
        assert_eq!(
            got,
            [
                "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "23rd",
                "101st", "111th", "112th"
            ]
        );
    }

    #[test]
    fn header_is_one_field_of_comma_separated_tokens() {
        let tokens = |values: &[&str]| {
            countersign_tokens(&parts(values))
                .map(|t| t.into_iter().map(str::to_owned).collect::<Vec<_>>())
                .map_err(|r| r.code().to_owned())
        };
        assert_eq!(tokens(&["a.b.c"]), Ok(vec!["a.b.c".to_owned()]));
        assert_eq!(
            tokens(&[" a.b.c ,d.e.f,, "]),
            Ok(vec!["a.b.c".to_owned(), "d.e.f".to_owned()])
        );
        for missing in [&[][..], &[""], &[" , "], &["a.b.c", "d.e.f"]] {
            assert_eq!(
                tokens(missing),
                Err("countersign_missing".into()),
                "{missing:?}"
            );
        }
    }

    #[test]
    fn distinct_others_in_header_order() {
        let subs =
            |subs: &[&str]| -> Vec<Value> { subs.iter().map(|s| json!({"sub": s})).collect() };
        assert_eq!(
            enough_countersigners(&subs(&["carol", "alice", "bob", "carol"]), "alice", 2).unwrap(),
            ["carol", "bob"]
        );
        let refusal =
            enough_countersigners(&subs(&["bob", "bob", "alice"]), "alice", 2).unwrap_err();
        assert_eq!(refusal.code(), "countersign_insufficient");
        assert_eq!(
            refusal.detail(),
            "2 distinct countersigners besides alice are required; the call carries 1"
        );
        let one = enough_countersigners(&subs(&["alice"]), "alice", 1).unwrap_err();
        assert_eq!(
            one.detail(),
            "1 distinct countersigner besides alice is required; the call carries 0"
        );
    }
}
