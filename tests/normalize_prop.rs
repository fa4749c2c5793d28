//! Property test of `policy::normalize`, the one path normaliser: whatever
//! the agent sends is either refused, or becomes a canonical path that
//! normalises to itself under the same match key. A forwarded path that
//! still had `//`, dot segments or encoded separators in it would be read
//! differently by the upstream than by the policy that matched it.

use countersign::policy::normalize;
use proptest::prelude::*;

fn hex_digit() -> impl Strategy<Value = char> {
    proptest::char::ranges(vec!['0'..='9', 'a'..='f', 'A'..='F'].into())
}

/// Pieces of paths, biased toward what path confusion is made of.
fn piece() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => Just("/".to_owned()),
        4 => Just(".".to_owned()),
        2 => Just("..".to_owned()),
        1 => Just("%".to_owned()),
        3 => (hex_digit(), hex_digit()).prop_map(|(a, b)| format!("%{a}{b}")),
        3 => hex_digit().prop_map(String::from),
        2 => Just(";".to_owned()),
        4 => proptest::char::ranges(vec!['a'..='z', 'A'..='Z'].into()).prop_map(String::from),
        1 => Just("\\".to_owned()),
        2 => prop_oneof![Just("%2e"), Just("%2E")].prop_map(str::to_owned),
        2 => prop_oneof![Just("%2f"), Just("%2F")].prop_map(str::to_owned),
        2 => Just("%25".to_owned()),
        1 => prop_oneof![Just("%5c"), Just("%5C"), Just("%3b"), Just("%00"), Just("%7E")]
            .prop_map(str::to_owned),
        1 => any::<char>().prop_map(String::from),
    ]
}

/// A path of up to 24 pieces, usually starting with '/'.
fn raw_path() -> impl Strategy<Value = String> {
    (
        prop::bool::weighted(0.9),
        prop::collection::vec(piece(), 0..24),
    )
        .prop_map(|(slash, pieces)| {
            let mut path = if slash { "/".to_owned() } else { String::new() };
            path.extend(pieces);
            path
        })
}

/// The segment after percent-decoding, to spot `%2e%2E` spelt dot segments.
fn decoded(segment: &str) -> String {
    percent_encoding::percent_decode_str(segment)
        .decode_utf8_lossy()
        .into_owned()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    #[test]
    fn normalize_is_refused_or_canonical_and_idempotent(raw in raw_path()) {
        let Ok(path) = normalize(&raw) else {
            return Ok(());
        };
        let forward = &path.forward;
        prop_assert!(forward.starts_with('/'), "{raw:?} -> {forward:?}: not absolute");
        prop_assert!(!forward.contains("//"), "{raw:?} -> {forward:?}: has '//'");
        for segment in forward.split('/') {
            let segment = decoded(segment);
            prop_assert!(
                segment != "." && segment != "..",
                "{raw:?} -> {forward:?}: has a dot segment"
            );
        }
        let upper = forward.to_ascii_uppercase();
        prop_assert!(
            !upper.contains("%2F") && !upper.contains("%5C"),
            "{raw:?} -> {forward:?}: has an encoded separator"
        );

        let again = normalize(forward);
        prop_assert!(again.is_ok(), "{raw:?} -> {forward:?} is refused: {again:?}");
        let again = again.unwrap();
        prop_assert_eq!(&again.forward, forward, "{:?}: forward is not idempotent", raw);
        prop_assert_eq!(&again.match_key, &path.match_key, "{:?}: match key changed", raw);
    }
}
