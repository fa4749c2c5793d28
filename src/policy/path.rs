//! The one place a request path is normalised.
//!
//! The gateway forwards [`NormalizedPath::forward`] and matches policies on
//! [`NormalizedPath::match_key`], which is derived from that same forwarded
//! path. The key is deliberately lenient (case-insensitive, no trailing slash,
//! no `;matrix` parameters, dot segments resolved again after those are
//! stripped) so that every spelling an upstream framework might treat as the
//! same resource falls under the same policy. Ambiguous spellings that
//! frameworks disagree on (encoded `/` or `\`, NUL, `..` above the root) are
//! refused rather than guessed.

use std::fmt::Write as _;

use thiserror::Error;

/// Why a path was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PathError {
    #[error("the path must start with '/'")]
    NotAbsolute,
    #[error("the path contains an encoded '/' or '\\', which servers interpret differently")]
    EncodedSeparator,
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
    // Servers that match paths case-insensitively with Unicode folding (Java's
    // equalsIgnoreCase, Go's EqualFold) read `/%C5%BFhop` (ſ) as `/shop`.
    if key_original.contains('%') && has_ascii_lookalike(&key_original) {
        return Err(PathError::AsciiLookalike);
    }
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

fn has_ascii_lookalike(encoded: &str) -> bool {
    let decoded = percent_encoding::percent_decode_str(encoded).decode_utf8_lossy();
    decoded.chars().filter(|c| !c.is_ascii()).any(|c| {
        c.to_lowercase()
            .chain(c.to_uppercase())
            .any(|folded| folded.is_ascii_alphanumeric())
    })
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
        assert_eq!(forward("/a%3bb"), "/a%3Bb");
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
        for lookalike in ["/%C5%BFhop", "/%E2%84%AAey", "/adm%C4%B1n", "/%C4%B0d"] {
            assert_eq!(
                normalize(lookalike),
                Err(PathError::AsciiLookalike),
                "{lookalike}"
            );
        }
        assert!(normalize("/caf%C3%A9").is_ok());
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
