//! The one place a request path is normalised.
//!
//! The gateway forwards [`NormalizedPath::forward`] and matches policies on
//! [`NormalizedPath::match_key`], which is derived from that same forwarded
//! path. The key is deliberately lenient (case-insensitive, no trailing slash,
//! no `;matrix` parameters, dot segments resolved again after those are
//! stripped) so that every spelling an upstream framework might treat as the
//! same resource falls under the same policy. Ambiguous spellings that
//! frameworks disagree on (encoded `/`, `\` or `;`, NUL, `..` above the root)
//! are refused rather than guessed.
//!
//! What a segment's escapes spell is checked too ([`check_spelled_text`]):
//! it must be UTF-8, in NFKC, without invisible characters and without
//! whitespace at its ends. Servers that decode leniently, fold to NFKC
//! (IIS's best-fit mapping), compare with ICU collation (which ignores
//! format characters) or trim segments (Spring's `trimTokens`) read such a
//! spelling as another path, one the gateway did not match.

use std::fmt::Write as _;

use thiserror::Error;
use unicode_normalization::char::is_public_assigned;
use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};

/// Why a path was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PathError {
    #[error("the path must start with '/'")]
    NotAbsolute,
    #[error("the path contains an encoded '/' or '\\', which servers interpret differently")]
    EncodedSeparator,
    #[error("the path contains an encoded ';' (%3B), which servers that decode before they strip ';params' read as the start of a path parameter")]
    EncodedSemicolon,
    #[error("the path contains a backslash")]
    Backslash,
    #[error("the path contains a control character or NUL")]
    ControlCharacter,
    #[error("the path contains a malformed percent-encoding")]
    BadPercentEncoding,
    #[error("the path climbs above the root with '..'")]
    AboveRoot,
    #[error("the path contains a character that case-folds to a different ASCII letter (such as 'ſ' or the Kelvin sign)")]
    AsciiLookalike,
    #[error("the path contains percent-escapes that are not UTF-8 (overlong, surrogate, truncated or beyond U+10FFFF), which lenient decoders read as other characters")]
    InvalidUtf8,
    #[error("a path segment starts or ends with whitespace (such as %20 or %C2%A0), which routers that trim segments drop")]
    EdgeWhitespace,
    #[error("the path contains a Unicode compatibility form or a spelling not in NFC (such as fullwidth 'ｓ' or mathematical '𝐬'), which servers that normalise Unicode read as another character")]
    CompatibilityForm,
    #[error("the path contains an invisible character or a space other than ' ' (such as U+200B, U+FEFF, U+00AD or U+2028), which some servers ignore or trim")]
    InvisibleCharacter,
    #[error("the path contains an unassigned or private-use character, which another Unicode version may fold to something else")]
    UnassignedCharacter,
}

/// A request path after normalisation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalizedPath {
    /// What the upstream receives: dot segments resolved, `//` collapsed,
    /// unreserved characters decoded, other escapes upper-cased.
    pub forward: String,
    /// What policies are matched against: lower-cased `key_original`.
    pub match_key: String,
    /// `match_key` before lower-casing; same byte length, so offsets of path
    /// parameters found in `match_key` address their original spelling here.
    pub key_original: String,
}

/// Normalises the path part of a request target (no query string).
pub fn normalize(raw: &str) -> Result<NormalizedPath, PathError> {
    if !raw.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    match already_normal(raw) {
        Some(path) => Ok(path),
        None => normalize_general(raw),
    }
}

/// Every path, segment by segment.
fn normalize_general(raw: &str) -> Result<NormalizedPath, PathError> {
    let trailing_slash = raw.len() > 1 && raw.ends_with('/');

    let mut segments: Vec<String> = Vec::new();
    for raw_segment in raw.split('/') {
        let segment = canonical_segment(raw_segment)?;
        // Only escapes spell anything but plain ASCII (raw bytes that are
        // not are escaped by `canonical_segment`).
        if segment.contains('%') {
            check_spelled_text(&segment)?;
        }
        push_segment(&mut segments, segment)?;
    }
    let forward = join(&segments, trailing_slash);

    // The match key strips `;params` (Tomcat, Spring and Jetty do) and
    // resolves dot segments once more, so `/..;/shop` cannot dodge `/shop`.
    let mut key_segments: Vec<String> = Vec::new();
    for segment in &segments {
        let bare = segment.split(';').next().unwrap_or_default().to_owned();
        push_segment(&mut key_segments, bare)?;
    }
    let key_original = join(&key_segments, false);
    let match_key = key_original.to_ascii_lowercase();
    Ok(NormalizedPath {
        forward,
        match_key,
        key_original,
    })
}

/// The common case without the per-segment work: a path of plain
/// characters (unreserved or sub-delims, no `%`, `;` or backslash), without empty,
/// `.` or `..` segments, is its own forwarded form, and its key is itself
/// without a trailing slash. Exactly what the general path computes for it
/// (`fast_path_agrees_with_the_general_one`).
fn already_normal(raw: &str) -> Option<NormalizedPath> {
    let plain = raw
        .bytes()
        .all(|b| b == b'/' || (b != b';' && (is_unreserved(b) || is_path_char(b))));
    if !plain || raw.contains("//") {
        return None;
    }
    let body = raw.strip_suffix('/').unwrap_or(raw);
    if body.split('/').skip(1).any(|s| s == "." || s == "..") {
        return None;
    }
    let key_original = if body.is_empty() { "/" } else { body };
    Some(NormalizedPath {
        forward: raw.to_owned(),
        match_key: key_original.to_ascii_lowercase(),
        key_original: key_original.to_owned(),
    })
}

/// Checks the text a canonical segment's escapes spell, so that no server
/// reads the segment as another one. Refused, in this order:
/// - bytes that are not UTF-8: lenient decoders read the overlong
///   `%C0%AE` as '.', or drop truncated sequences, lone continuation
///   bytes, surrogates and code points beyond U+10FFFF;
/// - control characters (C1 ones here; ASCII ones are already refused);
/// - whitespace at either end of the segment, or of its part before ';'
///   (what the match key keeps): Spring's `AntPathMatcher` with
///   `trimTokens` (CVE-2016-5007), and routers trimming with Go's
///   `TrimSpace`, .NET's `Trim` or JavaScript's `trim`, read `/shop%20` and
///   `/shop%C2%A0` as `/shop`. A space inside a segment (`/files/my%20doc`)
///   is nobody's separator and stays;
/// - letters that case-fold to ASCII (`ſ`, the Kelvin sign): Java's
///   `equalsIgnoreCase` and Go's `EqualFold` read `/%C5%BFhop` as `/shop`;
/// - text that is not its own NFKC: fullwidth `ｓ`, mathematical `𝐬`,
///   circled `ⓢ`, ligatures, superscripts, the no-break and ideographic
///   spaces, and decomposed accents (`e` + U+0301) are another path to
///   servers that normalise (IIS's best-fit mapping, NFKC or NFC folding);
/// - invisible characters anywhere (format characters such as U+200B,
///   U+FEFF, U+00AD, and the other default-ignorable code points), which
///   ICU collation and culture-sensitive comparisons ignore, and spaces
///   other than ' ' that NFKC keeps (U+1680, U+2028, U+2029);
/// - unassigned and private-use code points, which a newer Unicode version
///   may fold.
///
/// Legitimate text in NFC (`/caf%C3%A9`, `/%E6%9D%B1%E4%BA%AC`) passes.
fn check_spelled_text(segment: &str) -> Result<(), PathError> {
    let bytes: Vec<u8> = percent_encoding::percent_decode_str(segment).collect();
    let text = std::str::from_utf8(&bytes).map_err(|_| PathError::InvalidUtf8)?;
    if text.chars().any(|c| c.is_control()) {
        return Err(PathError::ControlCharacter);
    }
    let key_part = text.split(';').next().unwrap_or_default();
    let trimmable =
        |s: &str| s.starts_with(char::is_whitespace) || s.ends_with(char::is_whitespace);
    if trimmable(text) || trimmable(key_part) {
        return Err(PathError::EdgeWhitespace);
    }
    if text.is_ascii() {
        return Ok(());
    }
    if has_ascii_lookalike(text) {
        return Err(PathError::AsciiLookalike);
    }
    if !unicode_normalization::is_nfkc(text) {
        return Err(PathError::CompatibilityForm);
    }
    for c in text.chars().filter(|c| !c.is_ascii()) {
        if !is_public_assigned(c) {
            return Err(PathError::UnassignedCharacter);
        }
        if is_invisible(c) {
            return Err(PathError::InvisibleCharacter);
        }
    }
    Ok(())
}

/// Whether some non-ASCII letter of `text` case-folds to an ASCII one.
fn has_ascii_lookalike(text: &str) -> bool {
    text.chars().filter(|c| !c.is_ascii()).any(|c| {
        c.to_lowercase()
            .chain(c.to_uppercase())
            .any(|folded| folded.is_ascii_alphanumeric())
    })
}

/// Format characters, the default-ignorable code points that are not
/// (Unicode's `Default_Ignorable_Code_Point`: the combining grapheme
/// joiner, Hangul fillers, Khmer inherent vowels, Mongolian and other
/// variation selectors), and separators other than ' '.
fn is_invisible(c: char) -> bool {
    match c.general_category() {
        GeneralCategory::Format
        | GeneralCategory::SpaceSeparator
        | GeneralCategory::LineSeparator
        | GeneralCategory::ParagraphSeparator => true,
        _ => matches!(
            c,
            '\u{034F}'
                | '\u{115F}'..='\u{1160}'
                | '\u{17B4}'..='\u{17B5}'
                | '\u{180B}'..='\u{180F}'
                | '\u{3164}'
                | '\u{FE00}'..='\u{FE0F}'
                | '\u{FFA0}'
                | '\u{E0100}'..='\u{E01EF}'
        ),
    }
}

fn push_segment(segments: &mut Vec<String>, segment: String) -> Result<(), PathError> {
    match segment.as_str() {
        "" | "." => Ok(()),
        ".." => segments.pop().map(|_| ()).ok_or(PathError::AboveRoot),
        _ => {
            segments.push(segment);
            Ok(())
        }
    }
}

fn join(segments: &[String], trailing_slash: bool) -> String {
    let mut path = String::with_capacity(segments.iter().map(|s| s.len() + 1).sum::<usize>() + 1);
    for segment in segments {
        path.push('/');
        path.push_str(segment);
    }
    if path.is_empty() || (trailing_slash && !segments.is_empty()) {
        path.push('/');
    }
    path
}

/// RFC 3986 section 6.2.2: decode escapes of unreserved characters, upper-case
/// the others, and escape raw bytes that may not appear in a path.
fn canonical_segment(raw: &str) -> Result<String, PathError> {
    let bytes = raw.as_bytes();
    let mut out = String::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        let byte = bytes[i];
        if byte == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .ok_or(PathError::BadPercentEncoding)?;
            let value = decode_hex_pair(hex).ok_or(PathError::BadPercentEncoding)?;
            match value {
                b'/' | b'\\' => return Err(PathError::EncodedSeparator),
                // Literal `;` starts a parameter the match key drops; an
                // encoded one is data to some servers and, decoded first,
                // a parameter to others (`/shop%3Bx` is `/shop` there).
                // Which one is the upstream's choice, so it is refused.
                b';' => return Err(PathError::EncodedSemicolon),
                0..=0x1f | 0x7f => return Err(PathError::ControlCharacter),
                _ if is_unreserved(value) => out.push(value as char),
                _ => {
                    let _ = write!(out, "%{value:02X}");
                }
            }
            i += 3;
            continue;
        }
        match byte {
            b'\\' => return Err(PathError::Backslash),
            0..=0x1f | 0x7f => return Err(PathError::ControlCharacter),
            _ if is_unreserved(byte) || is_path_char(byte) => out.push(byte as char),
            _ => {
                let _ = write!(out, "%{byte:02X}");
            }
        }
        i += 1;
    }
    Ok(out)
}

fn decode_hex_pair(hex: &[u8]) -> Option<u8> {
    let digit = |b: u8| (b as char).to_digit(16);
    Some((digit(hex[0])? * 16 + digit(hex[1])?) as u8)
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Sub-delims plus ':' and '@': allowed raw in a path segment.
fn is_path_char(b: u8) -> bool {
    matches!(
        b,
        b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'=' | b':' | b'@'
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(raw: &str) -> String {
        normalize(raw).unwrap().match_key
    }

    fn forward(raw: &str) -> String {
        normalize(raw).unwrap().forward
    }

    #[test]
    fn spellings_of_shop_all_match_shop() {
        for raw in [
            "/shop",
            "//shop",
            "/./shop",
            "/x/../shop",
            "/%73hop",
            "/%2e/shop",
            "/x/%2e%2e/shop",
            "/SHOP",
            "/Shop/",
            "/shop;jsessionid=1",
            "/x/..;/shop",
            "/shop/.",
        ] {
            assert_eq!(key(raw), "/shop", "{raw}");
        }
    }

    #[test]
    fn forwarded_path_is_the_canonical_spelling() {
        assert_eq!(forward("//shop/./items/../orders/"), "/shop/orders/");
        assert_eq!(forward("/%73hop"), "/shop");
        assert_eq!(forward("/a%3fb"), "/a%3Fb");
        assert_eq!(forward("/"), "/");
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        assert_eq!(normalize("/shop%2fx"), Err(PathError::EncodedSeparator));
        assert_eq!(normalize("/shop%5Cx"), Err(PathError::EncodedSeparator));
        assert_eq!(normalize("/shop\\x"), Err(PathError::Backslash));
        assert_eq!(normalize("/shop%00"), Err(PathError::ControlCharacter));
        assert_eq!(normalize("/shop%zz"), Err(PathError::BadPercentEncoding));
        assert_eq!(normalize("/shop%4"), Err(PathError::BadPercentEncoding));
        assert_eq!(normalize("/../shop"), Err(PathError::AboveRoot));
        assert_eq!(normalize("shop"), Err(PathError::NotAbsolute));
        for lookalike in [
            "/%C5%BFhop",
            "/%E2%84%AAey",
            "/adm%C4%B1n",
            "/%C4%B0d",
            "/o%EF%AC%80ers", // the ligature ﬀ upper-cases to "FF"
        ] {
            assert_eq!(
                normalize(lookalike),
                Err(PathError::AsciiLookalike),
                "{lookalike}"
            );
        }
        assert!(normalize("/caf%C3%A9").is_ok());
    }

    #[test]
    fn escapes_that_are_not_utf8_are_refused() {
        for raw in [
            "/x/%C0%AE%C0%AE/shop", // overlong '.'
            "/x/%E0%80%AE/shop",    // overlong '.', three bytes
            "/%C1%B3hop",           // overlong 's'
            "/shop%80",             // lone continuation byte
            "/shop%E2%82",          // truncated
            "/sh%E2%82op",
            "/shop%ED%A0%80",    // surrogate U+D800
            "/shop%F4%90%80%80", // U+110000
            "/shop%FF",
            "/shop%F8%88%80%80%80", // five-byte form
        ] {
            assert_eq!(normalize(raw), Err(PathError::InvalidUtf8), "{raw}");
        }
    }

    #[test]
    fn whitespace_at_a_segment_end_is_refused() {
        for raw in [
            "/shop%20",
            "/%20shop",
            "/shop%20/x",
            "/shop%20;jsessionid=1",
            "/shop%C2%A0",
            "/shop%E3%80%80",
            "/shop%E2%80%83",
            "/shop%E1%9A%80", // Ogham space mark, which NFKC keeps
            "/shop%E2%80%A8", // line separator
            "/x/%20",
            "/shop%20/",
        ] {
            assert_eq!(normalize(raw), Err(PathError::EdgeWhitespace), "{raw}");
        }
        // Inside a segment a space is a space.
        assert_eq!(forward("/files/my%20doc"), "/files/my%20doc");
        assert_eq!(forward("/files/my doc"), "/files/my%20doc");
        // A trailing space is refused after a `;param` too.
        assert_eq!(normalize("/x;a=%20"), Err(PathError::EdgeWhitespace));
    }

    /// Decoded before `;params` are stripped, `%3B` cuts the segment where
    /// the match key (which cuts at a literal `;` only) did not.
    #[test]
    fn an_encoded_semicolon_is_refused() {
        for raw in [
            "/shop%3Bx",
            "/shop%3bjsessionid=1",
            "/shop%3B",
            "/x/..%3B/shop",
            "/orders%3Bx/7",
            "/a%3bb",
            "/shop;a=%3B",
            "/shop%20%3Bx",
        ] {
            assert_eq!(normalize(raw), Err(PathError::EncodedSemicolon), "{raw}");
        }
        // A literal `;` is a parameter to the key, as to Tomcat and Spring.
        assert_eq!(key("/shop;x"), "/shop");
        assert_eq!(forward("/shop;x"), "/shop;x");
    }

    #[test]
    fn c1_controls_are_refused() {
        assert_eq!(normalize("/shop%C2%85"), Err(PathError::ControlCharacter));
        assert_eq!(normalize("/sh%C2%9Fop"), Err(PathError::ControlCharacter));
    }

    #[test]
    fn compatibility_forms_and_unnormalised_text_are_refused() {
        for raw in [
            "/%EF%BD%93hop",              // fullwidth s
            "/%F0%9D%90%AChop",           // mathematical bold s
            "/%E2%93%A2hop",              // circled s
            "/%C4%B3s",                   // ligature ij (ﬀ upper-cases to FF: a lookalike)
            "/%CB%A2hop",                 // modifier letter small s
            "/x%C2%B2",                   // superscript two
            "/my%C2%A0doc",               // no-break space inside
            "/my%E3%80%80doc",            // ideographic space inside
            "/cafe%CC%81",                // e + combining acute: NFC is U+00E9
            "/%E2%84%AB",                 // Angstrom sign: NFC is U+00C5
            "/%EF%BC%8Fshop",             // fullwidth solidus
            "/x/%EF%BC%8E%EF%BC%8E/shop", // fullwidth full stops
        ] {
            assert_eq!(normalize(raw), Err(PathError::CompatibilityForm), "{raw}");
        }
        // Raw (unescaped) UTF-8 bytes are escaped first, then checked alike.
        assert_eq!(normalize("/ｓhop"), Err(PathError::CompatibilityForm));
    }

    #[test]
    fn invisible_and_unassigned_characters_are_refused_anywhere() {
        for raw in [
            "/shop%E2%80%8B", // zero-width space
            "/sh%E2%80%8Bop",
            "/%EF%BB%BFshop",    // BOM
            "/sh%C2%ADop",       // soft hyphen
            "/sh%E2%80%8Dop",    // zero-width joiner
            "/sh%E2%81%A0op",    // word joiner
            "/sh%E2%80%AEop",    // right-to-left override
            "/sh%CD%8Fop",       // combining grapheme joiner (Mn)
            "/sh%EF%B8%8Fop",    // variation selector 16 (Mn)
            "/sh%F3%A0%80%81op", // language tag
            "/sh%E2%80%A8op",    // line separator
        ] {
            assert_eq!(normalize(raw), Err(PathError::InvisibleCharacter), "{raw}");
        }
        for raw in ["/sh%EF%BF%B0op", "/sh%EE%80%80op", "/%F3%B0%80%80"] {
            assert_eq!(normalize(raw), Err(PathError::UnassignedCharacter), "{raw}");
        }
    }

    #[test]
    fn text_in_nfc_passes_unchanged() {
        for raw in [
            "/caf%C3%A9",
            "/%E6%9D%B1%E4%BA%AC",                         // 東京
            "/%D0%BC%D0%B0%D0%B3%D0%B0%D0%B7%D0%B8%D0%BD", // магазин
            "/%E2%82%AC",                                  // euro sign
            "/%F0%9F%98%80",                               // emoji
            "/x;a=%20y",
        ] {
            assert_eq!(forward(raw), raw, "{raw}");
        }
        assert_eq!(forward("/café"), "/caf%C3%A9");
    }

    #[test]
    fn fast_path_agrees_with_the_general_one() {
        for raw in [
            "/",
            "/shop",
            "/Shop/",
            "/a/b/c",
            "/a/b/",
            "/a.b/c.json",
            "/x/..",
            "/x/.",
            "/.",
            "/..",
            "/a//b",
            "//",
            "/a;b",
            "/~u/x-y_z",
            "/a:b@c!$&'()*+,=",
            "/.a/..b/",
        ] {
            if let Some(fast) = already_normal(raw) {
                assert_eq!(Ok(fast), normalize_general(raw), "{raw}");
            }
        }
        assert!(already_normal("/shop/orders").is_some());
        for not_plain in ["/x/..", "/.", "/a//b", "/a;b", "/%73hop", "/a\\b"] {
            assert!(already_normal(not_plain).is_none(), "{not_plain}");
        }
    }

    #[test]
    fn key_keeps_byte_offsets_of_the_original_spelling() {
        let path = normalize("/Orders/AbC").unwrap();
        assert_eq!(path.key_original, "/Orders/AbC");
        assert_eq!(path.match_key, "/orders/abc");
    }
}
