//! The request body as the approval message reads it: JSON that no
//! permissive API can read differently.
//!
//! `serde_json::from_slice` keeps the last of two equal keys, and treats `qty`
//! and `QTY` as different keys, while Go's `encoding/json` and ASP.NET bind
//! keys case-insensitively and other parsers keep the first duplicate. The
//! person would approve one value while the API acts on another. This parser
//! builds the same [`Value`] but refuses, at every nesting level, duplicate
//! keys and keys equal up to Unicode case folding, integers too large to
//! be read exactly everywhere, and decimals a double rounds (`2.9999999999999999`
//! is shown as `3.0`, the double serde_json reads, while a BigDecimal reads
//! it as written).

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};
use thiserror::Error;

/// 2^53: beyond it, JSON parsers that read numbers as doubles round integers.
pub const MAX_EXACT_INTEGER: u64 = 1 << 53;

/// Why a body was refused. Each reads as the end of a sentence that starts
/// "The JSON body was refused: ".
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BodyError {
    #[error("it is not valid JSON ({0})")]
    Syntax(String),
    #[error("the key '{key}' appears more than once in {place}; APIs disagree on which one counts, so send it once")]
    DuplicateKey { key: String, place: Place },
    #[error("the keys '{first}' and '{second}' in {place} differ only in letter case; some APIs read them as one key, so send only one")]
    CaseTwin {
        first: String,
        second: String,
        place: Place,
    },
    #[error("the number {number} in {place} is beyond 2^53, where APIs round numbers differently; it cannot be shown exactly")]
    InexactNumber { number: String, place: Place },
    #[error("the number {number} would be shown as {shown}, the nearest double, while APIs that read decimals exactly (BigDecimal, Python's Decimal) read {number}; send it with at most 15 significant digits")]
    RoundedNumber { number: String, shown: String },
}

/// Where in the body an error is: the object or array holding it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place(String);

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("the top-level value")
        } else {
            write!(f, "'{}'", self.0)
        }
    }
}

/// The form under which two keys count as the same: Unicode upper- then
/// lower-casing, so that the Kelvin sign `K` equals `k` and the long `ſ`
/// equals `s`, as in Go's `encoding/json`.
pub fn fold_case(key: &str) -> String {
    key.to_uppercase().to_lowercase()
}

/// The request's `Content-Encoding`, when it is other than `identity`: a
/// body so encoded cannot be read by the gateway, while some APIs inflate it
/// (Express's body parsers inflate gzip and deflate).
pub fn content_encoding(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get_all(http::header::CONTENT_ENCODING)
        .iter()
        .find(|v| {
            !v.to_str()
                .is_ok_and(|v| v.trim().eq_ignore_ascii_case("identity"))
        })
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

/// Parses a JSON body strictly (see the module documentation).
pub fn parse(bytes: &[u8]) -> Result<Value, BodyError> {
    let state = State::default();
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let parsed = Strict { state: &state }
        .deserialize(&mut deserializer)
        .and_then(|value| deserializer.end().map(|()| value));
    match parsed {
        Ok(value) => {
            check_decimals(bytes)?;
            Ok(value)
        }
        Err(error) => Err(state
            .error
            .into_inner()
            .unwrap_or_else(|| BodyError::Syntax(error.to_string()))),
    }
}

/// Every number written with a fraction or an exponent must be exactly the
/// number shown for it (the shortest text of its nearest double): as a
/// decimal, `2.50` and `25e-1` are `2.5`, but `2.9999999999999999` is not
/// `3.0`. Runs on bytes already parsed as JSON, so only strings need care.
fn check_decimals(bytes: &[u8]) -> Result<(), BodyError> {
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < bytes.len()
                    && matches!(bytes[i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
                {
                    i += 1;
                }
                let literal = std::str::from_utf8(&bytes[start..i]).unwrap_or_default();
                if !literal.contains(['.', 'e', 'E']) {
                    continue;
                }
                let shown = literal
                    .parse::<f64>()
                    .ok()
                    .and_then(Number::from_f64)
                    .map(|n| n.to_string());
                let faithful = shown.as_deref().is_some_and(|shown| {
                    decimal(shown).is_some() && decimal(shown) == decimal(literal)
                });
                if !faithful {
                    return Err(BodyError::RoundedNumber {
                        number: literal.to_owned(),
                        shown: shown.unwrap_or_else(|| "no number".to_owned()),
                    });
                }
            }
            _ => i += 1,
        }
    }
    Ok(())
}

/// Whether `text` (a query or path value), read as a number the way
/// JavaScript's `Number()`, PHP and Python's `float()` read text (an
/// optional sign, digits, an optional fraction and exponent, leading zeros
/// allowed), is a number every parser reads the same: `false` for an
/// integer beyond 2^53 or a decimal its nearest double does not show as
/// written (`9007199254740993` is 9007199254740992 to `Number()`). Text
/// that is no such number is `true`: there is nothing to round.
pub fn text_number_is_exact(text: &str) -> bool {
    let bytes = text.as_bytes();
    let mut i = usize::from(matches!(bytes.first(), Some(b'+' | b'-')));
    let digits = |i: &mut usize| {
        let start = *i;
        while bytes.get(*i).is_some_and(u8::is_ascii_digit) {
            *i += 1;
        }
        *i - start
    };
    let whole = digits(&mut i);
    let mut fraction = 0;
    if bytes.get(i) == Some(&b'.') {
        i += 1;
        fraction = digits(&mut i);
    }
    if whole + fraction == 0 {
        return true;
    }
    if matches!(bytes.get(i), Some(b'e' | b'E')) {
        i += 1;
        i += usize::from(matches!(bytes.get(i), Some(b'+' | b'-')));
        if digits(&mut i) == 0 {
            return true;
        }
    }
    if i != bytes.len() {
        return true;
    }
    let literal = text.trim_start_matches('+');
    let Ok(value) = literal.parse::<f64>() else {
        return false;
    };
    if value.abs() > MAX_EXACT_INTEGER as f64 {
        return false;
    }
    if !literal.contains(['.', 'e', 'E']) {
        // An integer of at most 2^53 (as its double says) is exact, unless
        // the double rounded it down to 2^53.
        let magnitude = literal.trim_start_matches('-').trim_start_matches('0');
        return magnitude.len() < 16
            || magnitude
                .parse::<u64>()
                .is_ok_and(|m| m <= MAX_EXACT_INTEGER);
    }
    let shown = Number::from_f64(value).map(|n| n.to_string());
    shown.is_some_and(|shown| decimal(&shown).is_some() && decimal(&shown) == decimal(literal))
}

/// A JSON number as an exact decimal: (negative, significant digits without
/// leading or trailing zeros, power of ten of the last digit); zero is
/// `(_, "", 0)`.
fn decimal(text: &str) -> Option<(bool, String, i64)> {
    let (negative, text) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (mantissa, exponent) = match text.find(['e', 'E']) {
        Some(at) => (&text[..at], text[at + 1..].parse::<i64>().ok()?),
        None => (text, 0),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = format!("{whole}{fraction}");
    let mut exponent = exponent.checked_sub(i64::try_from(fraction.len()).ok()?)?;
    let trimmed = digits.trim_start_matches('0');
    let significant = trimmed.trim_end_matches('0');
    if significant.is_empty() {
        return Some((negative, String::new(), 0));
    }
    exponent = exponent.checked_add(i64::try_from(trimmed.len() - significant.len()).ok()?)?;
    Some((negative, significant.to_owned(), exponent))
}

#[derive(Default)]
struct State {
    /// The keys and indices leading to the value being parsed.
    path: RefCell<Vec<String>>,
    /// The refusal that stopped the parse, if it was not a syntax error.
    error: RefCell<Option<BodyError>>,
}

impl State {
    fn place(&self) -> Place {
        let path = self.path.borrow();
        let mut text = String::new();
        for segment in path.iter() {
            if segment.starts_with('[') || text.is_empty() {
                text.push_str(segment);
            } else {
                text.push('.');
                text.push_str(segment);
            }
        }
        Place(text)
    }

    fn refuse<E: de::Error>(&self, error: BodyError) -> E {
        *self.error.borrow_mut() = Some(error);
        E::custom("refused")
    }

    fn check_integer<E: de::Error>(&self, magnitude: u64, number: Number) -> Result<Value, E> {
        if magnitude > MAX_EXACT_INTEGER {
            let number = number.to_string();
            return Err(self.refuse(BodyError::InexactNumber {
                number,
                place: self.place(),
            }));
        }
        Ok(Value::Number(number))
    }
}

#[derive(Clone, Copy)]
struct Strict<'s> {
    state: &'s State,
}

impl<'de> DeserializeSeed<'de> for Strict<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        self.state.check_integer(v.unsigned_abs(), v.into())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        self.state.check_integer(v, v.into())
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        // serde_json reads integers beyond 64 bits as doubles, rounded.
        match Number::from_f64(v) {
            Some(number) if v.abs() <= MAX_EXACT_INTEGER as f64 => Ok(Value::Number(number)),
            _ => Err(self.state.refuse(BodyError::InexactNumber {
                number: v.to_string(),
                place: self.state.place(),
            })),
        }
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        loop {
            self.state
                .path
                .borrow_mut()
                .push(format!("[{}]", items.len()));
            let item = seq.next_element_seed(self);
            self.state.path.borrow_mut().pop();
            match item? {
                Some(item) => items.push(item),
                None => return Ok(Value::Array(items)),
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut fields = Map::new();
        // Folded key -> the key as sent.
        let mut seen: HashMap<String, String> = HashMap::new();
        while let Some(key) = map.next_key::<String>()? {
            let folded = fold_case(&key);
            if let Some(first) = seen.get(&folded) {
                let place = self.state.place();
                let error = if *first == key {
                    BodyError::DuplicateKey { key, place }
                } else {
                    BodyError::CaseTwin {
                        first: first.clone(),
                        second: key,
                        place,
                    }
                };
                return Err(self.state.refuse(error));
            }
            self.state.path.borrow_mut().push(key.clone());
            let value = map.next_value_seed(self);
            self.state.path.borrow_mut().pop();
            seen.insert(folded, key.clone());
            fields.insert(key, value?);
        }
        Ok(Value::Object(fields))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn refused(text: &str) -> String {
        parse(text.as_bytes()).unwrap_err().to_string()
    }

    #[test]
    fn builds_the_same_value_as_serde_json() {
        let text = r#"{"product":"XYZ phone","qty":2,"price":-1.5,"ok":true,"n":null,
            "items":[{"a":[1,2]},"x"],"max":9007199254740992,"min":-9007199254740992}"#;
        let strict = parse(text.as_bytes()).unwrap();
        assert_eq!(strict, serde_json::from_str::<Value>(text).unwrap());
        assert_eq!(parse(b" [] ").unwrap(), json!([]));
    }

    #[test]
    fn duplicate_keys_are_refused_at_every_level() {
        let error = refused(r#"{"qty":1,"qty":100}"#);
        assert!(error.contains("'qty' appears more than once"), "{error}");
        assert!(error.contains("the top-level value"), "{error}");
        let error = refused(r#"{"items":[{"a":1},{"b":{"c":1,"c":2}}]}"#);
        assert!(
            error.contains("'c' appears more than once in 'items[1].b'"),
            "{error}"
        );
    }

    #[test]
    fn keys_equal_up_to_case_are_refused() {
        let error = refused(r#"{"qty":1,"QTY":100}"#);
        assert!(error.contains("'qty' and 'QTY'"), "{error}");
        // The Kelvin sign and the long s fold like Go's encoding/json.
        assert!(refused("{\"kind\":1,\"\u{212A}ind\":2}").contains("differ only in letter case"));
        assert!(refused("{\"size\":1,\"\u{017F}ize\":2}").contains("differ only in letter case"));
        assert!(refused(r#"{"a":{"Qty":1,"qTY":2}}"#).contains("in 'a'"));
        // Distinct keys stay distinct.
        assert!(parse(br#"{"qty":1,"qty2":2}"#).is_ok());
    }

    #[test]
    fn integers_that_would_be_rounded_are_refused() {
        for text in [
            "9007199254740993",
            "-9007199254740993",
            "18446744073709551615",
            "123456789012345678901234567890",
            "1e300",
        ] {
            let error = refused(&format!(r#"{{"qty":{text}}}"#));
            assert!(error.contains("beyond 2^53"), "{text}: {error}");
            assert!(error.contains("'qty'"), "{text}: {error}");
        }
    }

    #[test]
    fn decimals_a_double_would_round_are_refused() {
        for text in [
            "2.9999999999999999",
            "1.0000000000000001",
            "0.30000000000000001e1",
        ] {
            let error = refused(&format!(r#"{{"qty":{text}}}"#));
            assert!(error.contains("nearest double"), "{text}: {error}");
            assert!(error.contains(text), "{text}: {error}");
        }
        // Written another way, but exactly the number shown.
        for text in [
            "2.0", "2.50", "25e-1", "2E0", "1e2", "-0.0", "0.1", "1e-7", "-1.5",
        ] {
            let body = format!(r#"{{"a":"1.00000000000000001","qty":[{text}]}}"#);
            assert!(parse(body.as_bytes()).is_ok(), "{text}");
        }
    }

    #[test]
    fn numbers_written_as_text_are_exact_or_not() {
        for exact in [
            "2",
            "-2",
            "+2",
            "007",
            "9007199254740992",
            "2.5",
            "25e-1",
            "0.1",
            "XYZ",
            "1e",
            "",
            "-",
            ".",
            "2 000",
            "1_000",
        ] {
            assert!(text_number_is_exact(exact), "{exact}");
        }
        for inexact in [
            "9007199254740993",
            "+9007199254740993",
            "-9007199254740993",
            "0009007199254740993",
            "18446744073709551616",
            "2.9999999999999999",
            "1e300",
        ] {
            assert!(!text_number_is_exact(inexact), "{inexact}");
        }
    }

    #[test]
    fn syntax_errors_and_trailing_data_are_refused() {
        assert!(refused("product=phone&qty=2").contains("not valid JSON"));
        assert!(refused(r#"{"qty":1} {"qty":2}"#).contains("not valid JSON"));
        assert!(refused("").contains("not valid JSON"));
        assert!(refused("\u{feff}{}").contains("not valid JSON"));
        assert!(refused(r#"{"a":"\ud800"}"#).contains("not valid JSON"));
    }
}
