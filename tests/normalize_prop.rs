//! Property test of `policy::normalize`, the one path normaliser: whatever
//! the agent sends is either refused, or becomes a canonical path that
//! normalises to itself under the same match key. A forwarded path that
//! still had `//`, dot segments or encoded separators in it would be read
//! differently by the upstream than by the policy that matched it; so would
//! one whose escapes are not UTF-8, not in NFKC, or hold whitespace at a
//! segment's ends or invisible characters (issue 19), or one with an encoded
//! `;`, which a server that decodes before it strips `;params` cuts at.

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
        1 => prop_oneof![Just("%5c"), Just("%5C"), Just("%00"), Just("%7E")]
            .prop_map(str::to_owned),
        2 => prop_oneof![Just("%3b"), Just("%3B"), Just(";x=1")].prop_map(str::to_owned),
        1 => any::<char>().prop_map(String::from),
        4 => unicode_piece(),
    ]
}

/// Issue 19's classes: whitespace and invisible characters, compatibility
/// forms, text not in NFC, and escapes that are not UTF-8; with legitimate
/// text in NFC beside them, raw and escaped.
fn unicode_piece() -> impl Strategy<Value = String> {
    prop_oneof![
        // Whitespace and format characters, escaped.
        3 => prop::sample::select(vec![
            "%20", "%09", "%C2%A0", "%C2%85", "%E3%80%80", "%E2%80%8B", "%EF%BB%BF", "%C2%AD",
            "%E2%80%A8", "%E1%9A%80", "%E2%80%8D", "%CD%8F", "%EF%B8%8F",
        ])
        .prop_map(str::to_owned),
        // Compatibility forms and decomposed accents, escaped.
        2 => prop::sample::select(vec![
            "%EF%BD%93", "%F0%9D%90%AC", "%E2%93%A2", "%EF%AC%80", "%CB%A2", "%C4%B3",
            "%C2%B2", "%EF%BC%8E", "%EF%BC%8F", "%CC%81", "%E2%84%AB",
        ])
        .prop_map(str::to_owned),
        // Raw characters from blocks of compatibility forms: fullwidth,
        // mathematical alphanumerics, enclosed, ligatures, super- and subscripts.
        2 => proptest::char::ranges(
            vec![
                '\u{FF01}'..='\u{FF5E}',
                '\u{1D400}'..='\u{1D7FF}',
                '\u{2460}'..='\u{24FF}',
                '\u{FB00}'..='\u{FB06}',
                '\u{2070}'..='\u{209C}',
                '\u{2000}'..='\u{206F}',
            ]
            .into(),
        )
        .prop_map(String::from),
        // Escapes that are not UTF-8 (overlong, surrogate, beyond
        // U+10FFFF), and any high byte alone.
        2 => prop::sample::select(vec![
            "%C0%AE", "%E0%80%AE", "%C1%B3", "%ED%A0%80", "%F4%90%80%80", "%E2%82", "%F0%9F%98",
        ])
        .prop_map(str::to_owned),
        2 => (0x80u8..=0xFF).prop_map(|b| format!("%{b:02X}")),
        // Any character, escaped as UTF-8 (legitimate ones included).
        3 => any::<char>().prop_map(|c| {
            let mut utf8 = [0u8; 4];
            c.encode_utf8(&mut utf8)
                .bytes()
                .map(|b| format!("%{b:02X}"))
                .collect()
        }),
        // Legitimate text in NFC.
        2 => prop::sample::select(vec!["%C3%A9", "caf%C3%A9", "%E6%9D%B1", "\u{00E9}", "\u{6771}"])
            .prop_map(str::to_owned),
    ]
}

/// Why a forwarded segment could be read as another one by a server that
/// decodes leniently, folds to NFKC, ignores invisible characters or trims
/// segments; `None` when it cannot.
fn unicode_confusion(segment: &str) -> Option<&'static str> {
    use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};
    let bytes: Vec<u8> = percent_encoding::percent_decode_str(segment).collect();
    let Ok(text) = String::from_utf8(bytes) else {
        return Some("escapes that are not UTF-8");
    };
    let key_part = text.split(';').next().unwrap_or_default();
    for part in [text.as_str(), key_part] {
        if part.starts_with(char::is_whitespace) || part.ends_with(char::is_whitespace) {
            return Some("whitespace at an end");
        }
    }
    if !unicode_normalization::is_nfkc(&text) {
        return Some("not in NFKC");
    }
    if text.chars().any(|c| {
        c.is_control()
            || c.general_category() == GeneralCategory::Format
            || (c.is_whitespace() && c != ' ')
    }) {
        return Some("a control, format or non-ASCII space character");
    }
    None
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
        for segment in forward.split('/') {
            let confusion = unicode_confusion(segment);
            prop_assert!(
                confusion.is_none(),
                "{raw:?} -> {forward:?}: {segment:?} has {}",
                confusion.unwrap_or_default()
            );
        }
        for segment in forward.split('/') {
            // Servers strip `;params` before decoding (Tomcat) or after
            // (a decoding proxy in front of it): both must read one path.
            let strip_then_decode = decoded(segment.split(';').next().unwrap_or_default());
            let decode_then_strip = decoded(segment).split(';').next().unwrap_or_default().to_owned();
            prop_assert_eq!(
                &strip_then_decode,
                &decode_then_strip,
                "{:?} -> {:?}: {:?} is another path once decoded before ';' is cut",
                raw,
                forward,
                segment
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
