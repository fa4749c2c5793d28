//! The one canonical view of a request, computed once per call before
//! anything is routed or matched.
//!
//! Everything an upstream framework might read to pick a handler is settled
//! here: the request target (only origin-form, or an `http`/`https`
//! absolute-form whose authority agrees with `Host`), the path (normalised by
//! [`crate::policy::normalize`]), the host, and the second channels some
//! frameworks honour for the method or path (override headers and `_method`
//! parameters), which are refused. The gateway then matches and forwards
//! exactly this request, so a permissive upstream cannot read it as another.

use http::{HeaderMap, HeaderName};
use pingora::http::RequestHeader;
use thiserror::Error;

use crate::policy::{self, HostError, NormalizedPath, PathError};

/// Headers some frameworks honour to change the method after routing
/// (Express method-override, Symfony, ASP.NET, Google APIs).
pub const METHOD_OVERRIDE_HEADERS: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// Headers some servers honour to replace the path after routing (IIS URL
/// Rewrite and Symfony read `X-Original-URL` and `X-Rewrite-URL`).
pub const PATH_OVERRIDE_HEADERS: [&str; 4] = [
    "x-original-url",
    "x-rewrite-url",
    "x-original-uri",
    "x-override-url",
];

/// The query parameter and form field Express, Laravel, Symfony, Rails and
/// Rack read as the method.
pub const METHOD_PARAMETER: &str = "_method";

/// Why a request was refused before it was routed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("the request target must be a path starting with '/' (or an http/https URL)")]
    NotOriginForm,
    #[error("the request target is not valid UTF-8")]
    NotUtf8,
    #[error("{0}")]
    Path(#[from] PathError),
    #[error(
        "the path contains '%25', an encoded '%', which servers that decode twice read differently"
    )]
    EncodedPercent,
    #[error("{0}")]
    Host(#[from] HostError),
    #[error("the request has no Host")]
    MissingHost,
    #[error("the request has more than one Host header")]
    RepeatedHost,
    #[error("the host of the request target ({target}) is not the Host header ({header})")]
    HostMismatch { target: String, header: String },
    #[error("the {0} header names another host than the request")]
    ForwardedHostMismatch(&'static str),
    #[error("the {0} header is not accepted; send the real HTTP method")]
    MethodOverrideHeader(&'static str),
    #[error("the {METHOD_PARAMETER} parameter is not accepted; send the real HTTP method")]
    MethodOverrideParameter,
    #[error("the {0} header is not accepted; send the real path")]
    PathOverrideHeader(&'static str),
    #[error("protocol upgrades (Upgrade header) are not accepted by this upstream: the tunnelled bytes would not be checked")]
    Upgrade,
    #[error("the {sent} header is read as {reads_as} by servers that take '_' (or other punctuation) for '-' in header names (Puma, PHP, CGI); send {reads_as} itself, or rename the header")]
    HeaderTwin {
        sent: String,
        reads_as: &'static str,
    },
}

/// A request as the gateway matches and forwards it.
#[derive(Debug)]
pub struct CanonicalRequest {
    /// The [`policy::host_key`] of the request's host.
    pub host: String,
    pub path: NormalizedPath,
    /// The query exactly as received (it is forwarded unchanged).
    pub query: Option<String>,
    /// The origin-form target to send upstream, when it differs from the
    /// bytes received; `None` means the received target is already canonical.
    pub rewrite: Option<http::Uri>,
    /// The request asks for a protocol upgrade (WebSocket, h2c).
    pub upgrade: bool,
}

impl CanonicalRequest {
    /// Reads the canonical request out of `header`, or says why it is refused.
    pub fn from_header(header: &RequestHeader) -> Result<Self, RequestError> {
        let names = scan_header_names(&header.headers)?;
        if !header.raw_path_is_utf8() {
            return Err(RequestError::NotUtf8);
        }
        let raw = std::str::from_utf8(header.raw_path()).map_err(|_| RequestError::NotUtf8)?;
        let target = Target::parse(raw)?;
        let host = request_host(header, target.authority)?;
        if names.forwarded_host {
            refuse_forwarded_host(&header.headers, &host)?;
        }

        let (raw_path, query) = match target.path_and_query.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (target.path_and_query, None),
        };
        let path = policy::normalize(raw_path)?;
        if let Some(query) = query {
            if has_method_parameter(query) {
                return Err(RequestError::MethodOverrideParameter);
            }
        }
        // Compare what pingora will send, not a parsed view of it.
        let canonical_len = path.forward.len() + query.map_or(0, |q| q.len() + 1);
        let unchanged = target.authority.is_none()
            && raw.len() == canonical_len
            && raw.starts_with(path.forward.as_str());
        let rewrite = if unchanged {
            None
        } else {
            let forward = match query {
                Some(q) => format!("{}?{q}", path.forward),
                None => path.forward.clone(),
            };
            Some(
                forward
                    .parse::<http::Uri>()
                    .map_err(|_| RequestError::Path(PathError::BadPercentEncoding))?,
            )
        };
        Ok(Self {
            host,
            path,
            query: query.map(str::to_owned),
            rewrite,
            upgrade: names.upgrade,
        })
    }

    /// After an upgrade pingora relays raw bytes both ways, so a fake `101`
    /// from a permissive upstream would let later requests through unchecked;
    /// refused unless the upstream opts in.
    pub fn check_upgrade(&self, allowed: bool) -> Result<(), RequestError> {
        if self.upgrade && !allowed {
            return Err(RequestError::Upgrade);
        }
        Ok(())
    }

    /// Double percent-encoding (`/%2573hop`) reaches a twice-decoding
    /// upstream as another path; refused unless the upstream opts in.
    pub fn check_encoded_percent(&self, allowed: bool) -> Result<(), RequestError> {
        if !allowed && self.path.forward.contains("%25") {
            return Err(RequestError::EncodedPercent);
        }
        Ok(())
    }
}

/// The request target split into its parts.
struct Target<'a> {
    /// The authority of an absolute-form target.
    authority: Option<&'a str>,
    /// Starts with '/'.
    path_and_query: &'a str,
}

impl<'a> Target<'a> {
    fn parse(raw: &'a str) -> Result<Self, RequestError> {
        if raw.starts_with('/') {
            return Ok(Self {
                authority: None,
                path_and_query: raw,
            });
        }
        // RFC 9112 3.2.2: absolute-form, which a server must accept. Only
        // http and https: `x:/shop` is routed as `/shop` by Go's net/http.
        let rest = strip_prefix_ignore_case(raw, "http://")
            .or_else(|| strip_prefix_ignore_case(raw, "https://"))
            .ok_or(RequestError::NotOriginForm)?;
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path_and_query) = rest.split_at(end);
        if authority.is_empty() || authority.contains('@') || !path_and_query.starts_with('/') {
            // `http://host?q` has no path; `user@host` smuggles a second name.
            return Err(RequestError::NotOriginForm);
        }
        Ok(Self {
            authority: Some(authority),
            path_and_query,
        })
    }
}

fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &text[prefix.len()..])
}

/// The host key of the request: its one Host header, the authority of an
/// absolute-form target, or HTTP/2's `:authority`; where several are given
/// they must agree. A call without any host is refused, so a host policy is
/// never skipped for want of one.
fn request_host(header: &RequestHeader, target: Option<&str>) -> Result<String, RequestError> {
    let mut values = header.headers.get_all(http::header::HOST).iter();
    let host_header = match (values.next(), values.next()) {
        (Some(_), Some(_)) => return Err(RequestError::RepeatedHost),
        (Some(value), None) => Some(value.to_str().map_err(|_| HostError::Malformed)?),
        (None, _) => None,
    };
    let authority = target.or_else(|| header.uri.authority().map(|a| a.as_str()));
    match (host_header, authority) {
        (None, None) => Err(RequestError::MissingHost),
        (Some(host), None) => Ok(policy::host_key(host)?),
        (None, Some(authority)) => Ok(policy::host_key(authority)?),
        (Some(host), Some(authority)) => {
            let host_key = policy::host_key(host)?;
            if policy::host_key(authority)? != host_key {
                return Err(RequestError::HostMismatch {
                    target: authority.to_owned(),
                    header: host.to_owned(),
                });
            }
            Ok(host_key)
        }
    }
}

/// What one pass over the request's header names found: the checks below
/// look names up in a map that usually holds a handful of headers, so one
/// walk over them is cheaper than a hashed lookup per name (eight per call).
#[derive(Default)]
struct HeaderNames {
    forwarded_host: bool,
    upgrade: bool,
}

/// Refuses a method or path override header, or a twin of a header that
/// matters (in that order of precedence); notes the headers read later.
fn scan_header_names(headers: &HeaderMap) -> Result<HeaderNames, RequestError> {
    let mut found = HeaderNames::default();
    let (mut method, mut path, mut twin) = (None, None, None);
    for name in headers.keys() {
        let name = name.as_str();
        if let Some(h) = METHOD_OVERRIDE_HEADERS.iter().find(|h| **h == name) {
            method = method.or(Some(*h));
        } else if let Some(h) = PATH_OVERRIDE_HEADERS.iter().find(|h| **h == name) {
            path = path.or(Some(*h));
        } else if name == "x-forwarded-host" || name == "forwarded" {
            found.forwarded_host = true;
        } else if name == "upgrade" {
            found.upgrade = true;
        } else if twin.is_none() && has_twin_punctuation(name) {
            twin = header_twin(name);
        }
    }
    if let Some(h) = method {
        return Err(RequestError::MethodOverrideHeader(h));
    }
    if let Some(h) = path {
        return Err(RequestError::PathOverrideHeader(h));
    }
    if let Some(twin) = twin {
        return Err(twin);
    }
    Ok(found)
}

/// Headers the gateway frames, reads or refuses a call by. CGI-style
/// servers (Puma, PHP's SAPIs, CGI and some WSGI servers) file `X_Foo` and
/// `X-Foo` alike as `HTTP_X_FOO`, and Symfony's `HeaderBag` reads `_` as
/// `-`: behind them `Transfer_Encoding: chunked` frames the body (a smuggled
/// request) and `X_HTTP_Method_Override: DELETE` changes the method, while
/// the gateway sees a header of no meaning. Such a twin is refused.
pub const TWINNED_HEADERS: [&str; 12] = [
    "content-length",
    "transfer-encoding",
    "content-type",
    "content-encoding",
    "x-forwarded-host",
    METHOD_OVERRIDE_HEADERS[0],
    METHOD_OVERRIDE_HEADERS[1],
    METHOD_OVERRIDE_HEADERS[2],
    PATH_OVERRIDE_HEADERS[0],
    PATH_OVERRIDE_HEADERS[1],
    PATH_OVERRIDE_HEADERS[2],
    PATH_OVERRIDE_HEADERS[3],
];

/// Families of headers refused as twins too: the MCP headers checked
/// against the message (`Mcp-Method`, `Mcp-Name`, `Mcp-Param-*`).
const TWINNED_PREFIXES: [&str; 1] = ["mcp-"];

/// A header name as CGI-style servers read it: every `_` a `-`, and so is
/// any other punctuation (Apache 2.2 filed every byte that is not a letter
/// or digit as `_`; PHP turns `.` in a variable name into `_`).
pub fn dashed(name: &str) -> std::borrow::Cow<'_, str> {
    if !has_twin_punctuation(name) {
        return name.into();
    }
    name.chars()
        .map(|c| match c.is_ascii_alphanumeric() {
            true => c,
            false => '-',
        })
        .collect::<String>()
        .into()
}

fn has_twin_punctuation(name: &str) -> bool {
    name.bytes()
        .any(|b| !b.is_ascii_alphanumeric() && b != b'-')
}

/// The refusal of `name` (with punctuation other than `-`) when CGI-style
/// servers read it as a header that matters.
fn header_twin(name: &str) -> Option<RequestError> {
    let dashed = dashed(name);
    let reads_as = TWINNED_HEADERS
        .iter()
        .find(|h| **h == dashed)
        .or_else(|| TWINNED_PREFIXES.iter().find(|p| dashed.starts_with(**p)))
        .copied()?;
    Some(RequestError::HeaderTwin {
        sent: name.to_owned(),
        reads_as,
    })
}

const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Frameworks behind a trusted proxy (Rails, Symfony, Express with
/// `trust proxy`) route on `X-Forwarded-Host` / `Forwarded: host=`: one that
/// names another host than the one matched would dodge a host policy.
fn refuse_forwarded_host(headers: &HeaderMap, host: &str) -> Result<(), RequestError> {
    for value in headers.get_all(&X_FORWARDED_HOST) {
        let agrees = value.to_str().ok().is_some_and(|v| {
            v.split(',')
                .all(|h| policy::host_key(h.trim()).is_ok_and(|k| k == host))
        });
        if !agrees {
            return Err(RequestError::ForwardedHostMismatch("X-Forwarded-Host"));
        }
    }
    for value in headers.get_all(http::header::FORWARDED) {
        let Ok(value) = value.to_str() else {
            return Err(RequestError::ForwardedHostMismatch("Forwarded"));
        };
        let hosts = value
            .split([',', ';'])
            .filter_map(|pair| pair.trim().split_once('='))
            .filter(|(name, _)| name.trim().eq_ignore_ascii_case("host"))
            .map(|(_, v)| v.trim().trim_matches('"'));
        for forwarded in hosts {
            if policy::host_key(forwarded).ok().as_deref() != Some(host) {
                return Err(RequestError::ForwardedHostMismatch("Forwarded"));
            }
        }
    }
    Ok(())
}

/// Whether a query or urlencoded form names `_method` in any spelling
/// (`_METHOD`, `%5Fmethod`, and `_method%00x`, which PHP, so Laravel and
/// Symfony, reads as `_method`: it ends names at a NUL), also after a `;`
/// (Go before 1.17 and Rack 2 split at `;` as well as `&`, and
/// gorilla/handlers' method override reads `r.FormValue("_method")`).
pub fn has_method_parameter(query: &str) -> bool {
    // Cheap test first: every spelling contains "method" or an escape.
    let may_contain = query.contains('%')
        || query
            .as_bytes()
            .windows(6)
            .any(|w| w.eq_ignore_ascii_case(b"method"));
    may_contain
        && query.split(';').any(|part| {
            url::form_urlencoded::parse(part.as_bytes()).any(|(name, _)| is_method_name(&name))
        })
}

/// Whether some framework reads a field `name` as `_method`: in any case,
/// with spaces around it, or as PHP files it (cut at a NUL or `[`, leading
/// spaces dropped).
fn is_method_name(name: &str) -> bool {
    name.trim().eq_ignore_ascii_case(METHOD_PARAMETER)
        || crate::policy::shadow::merge_key(name) == METHOD_PARAMETER
}

/// A reader of a POST body that answers whether it names `_method`.
pub type MethodFieldCheck = fn(&[u8]) -> bool;

/// The ways frameworks read a POST body with these headers for a `_method`
/// field, one per format: a form for `application/x-www-form-urlencoded` or
/// no Content-Type at all (Rack's `form_data?`), multipart for
/// `multipart/*` (a media type ends at ',' too, as Rack reads it), and
/// JSON whatever the Content-Type says or without one
/// (Laravel's `isJson` reads the whole header, so `text/plain; x=/json` is
/// JSON to it; Express's `json({ type: '*/*' })` reads any body, and
/// method-override then takes `req.body._method`). Every Content-Type
/// header counts, as servers disagree on which of several wins.
pub fn method_field_readers(headers: &HeaderMap) -> Vec<MethodFieldCheck> {
    let (form, multipart) = crate::policy::shadow::form_formats(headers);
    let readers: [(bool, MethodFieldCheck); 3] = [
        (form, form_has_method_field),
        (multipart, multipart_has_method_field),
        (true, json_has_method_field),
    ];
    readers
        .into_iter()
        .filter_map(|(read, check)| read.then_some(check))
        .collect()
}

/// Whether an urlencoded form body names `_method` in any spelling.
pub fn form_has_method_field(body: &[u8]) -> bool {
    has_method_parameter(&String::from_utf8_lossy(body))
}

/// Whether a body some JSON reader takes for an object has a `_method`
/// member (Laravel reads it from JSON input too), after a UTF-8 BOM or in
/// JSON only a lenient parser reads
/// ([`crate::policy::shadow::json_member_names`]).
pub fn json_has_method_field(body: &[u8]) -> bool {
    crate::policy::shadow::json_member_names(body)
        .iter()
        .any(|k| is_method_name(k))
}

/// Whether a `multipart/form-data` body has a `_method` part, in any
/// spelling some reader takes for it (`name="_method\0x"` is `_method` to
/// PHP). Conservative: any `name=` in the body counts.
pub fn multipart_has_method_field(body: &[u8]) -> bool {
    crate::policy::shadow::multipart_raw_names(body)
        .iter()
        .any(|name| is_method_name(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(target: &[u8], headers: &[(&str, &str)]) -> RequestHeader {
        let mut header = RequestHeader::build("POST", target, None).unwrap();
        for (name, value) in headers {
            header.append_header(name.to_string(), *value).unwrap();
        }
        header
    }

    fn canonical(
        target: &[u8],
        headers: &[(&str, &str)],
    ) -> Result<CanonicalRequest, RequestError> {
        CanonicalRequest::from_header(&header(target, headers))
    }

    const HOST: (&str, &str) = ("host", "shop.example");

    #[test]
    fn targets_that_are_not_origin_form_are_refused() {
        for target in [
            &b"x:/shop"[..],
            b"shop",
            b"*",
            b"shop.example:80",
            b"ftp://shop.example/shop",
            b"http://user@shop.example/shop",
            b"http://shop.example?x=1",
        ] {
            let label = String::from_utf8_lossy(target);
            assert_eq!(
                canonical(target, &[HOST]).map(|c| c.path.forward),
                Err(RequestError::NotOriginForm),
                "{label}"
            );
        }
    }

    #[test]
    fn absolute_form_is_forwarded_as_origin_form_and_its_host_counts() {
        let c = canonical(b"http://Shop.Example./shop?qty=2", &[]).unwrap();
        assert_eq!(c.host, "shop.example");
        assert_eq!(c.rewrite.unwrap().to_string(), "/shop?qty=2");
        let c = canonical(b"HTTPS://shop.example:443/x/../shop", &[HOST]).unwrap();
        assert_eq!(c.path.match_key, "/shop");
        assert!(matches!(
            canonical(b"http://admin.example/shop", &[HOST]),
            Err(RequestError::HostMismatch { .. })
        ));
    }

    #[test]
    fn a_canonical_target_is_left_alone_and_others_are_rewritten() {
        assert!(canonical(b"/shop?qty=2", &[HOST])
            .unwrap()
            .rewrite
            .is_none());
        assert!(canonical(b"/shop", &[HOST]).unwrap().rewrite.is_none());
        let c = canonical(b"//shop/./?qty=2", &[HOST]).unwrap();
        assert_eq!(c.rewrite.unwrap().to_string(), "/shop/?qty=2");
    }

    #[test]
    fn hosts_are_required_single_and_normalised() {
        assert_eq!(
            canonical(b"/shop", &[]).unwrap_err(),
            RequestError::MissingHost
        );
        assert_eq!(
            canonical(b"/shop", &[HOST, ("host", "admin.example")]).unwrap_err(),
            RequestError::RepeatedHost
        );
        let c = canonical(b"/shop", &[("host", "ADMIN.example.:8080")]).unwrap();
        assert_eq!(c.host, "admin.example");
        assert!(canonical(b"/shop", &[("host", "a b")]).is_err());
        assert!(canonical(b"/shop", &[("host", "user@admin.example")]).is_err());
        // Unicode spellings of a host name are no DNS name: fullwidth
        // letters, a zero-width space, a trailing no-break space, escapes.
        for host in [
            "\u{FF41}dmin.example",
            "admin\u{200B}.example",
            "admin.example\u{00A0}",
            "%61dmin.example",
        ] {
            assert_eq!(
                canonical(b"/shop", &[("host", host)]).unwrap_err(),
                RequestError::Host(HostError::Malformed),
                "{host}"
            );
        }
    }

    #[test]
    fn forwarded_hosts_must_agree() {
        assert!(canonical(b"/shop", &[HOST, ("x-forwarded-host", "shop.example:443")]).is_ok());
        assert_eq!(
            canonical(b"/shop", &[HOST, ("x-forwarded-host", "admin.example")]).unwrap_err(),
            RequestError::ForwardedHostMismatch("X-Forwarded-Host")
        );
        assert_eq!(
            canonical(
                b"/shop",
                &[HOST, ("forwarded", "for=1.2.3.4;host=admin.example")]
            )
            .unwrap_err(),
            RequestError::ForwardedHostMismatch("Forwarded")
        );
    }

    #[test]
    fn second_channels_for_method_and_path_are_refused() {
        assert_eq!(
            canonical(b"/other", &[HOST, ("X-Original-URL", "/shop")]).unwrap_err(),
            RequestError::PathOverrideHeader("x-original-url")
        );
        assert_eq!(
            canonical(b"/other", &[HOST, ("x-rewrite-url", "/shop")]).unwrap_err(),
            RequestError::PathOverrideHeader("x-rewrite-url")
        );
        assert_eq!(
            canonical(b"/shop", &[HOST, ("x-http-method-override", "POST")]).unwrap_err(),
            RequestError::MethodOverrideHeader("x-http-method-override")
        );
        for query in [
            "_method=POST",
            "a=1&_METHOD=post",
            "%5Fmethod=POST",
            "_m%65thod=POST",
            "_method%00x=POST",
            "%20_method[]=POST",
            "a=1;_method=POST",
        ] {
            let target = format!("/shop?{query}");
            assert_eq!(
                canonical(target.as_bytes(), &[HOST]).unwrap_err(),
                RequestError::MethodOverrideParameter,
                "{query}"
            );
        }
        assert!(canonical(b"/shop?method=card&payment_method=x", &[HOST]).is_ok());
    }

    #[test]
    fn underscore_twins_of_headers_that_matter_are_refused() {
        for (name, reads_as) in [
            ("X_HTTP_Method_Override", "x-http-method-override"),
            ("transfer_encoding", "transfer-encoding"),
            ("Content_Length", "content-length"),
            ("x_forwarded-host", "x-forwarded-host"),
            ("X_Original_URL", "x-original-url"),
            ("Mcp_Param_Qty", "mcp-"),
            ("X.HTTP.Method.Override", "x-http-method-override"),
        ] {
            assert_eq!(
                canonical(b"/shop", &[HOST, (name, "1")]).unwrap_err(),
                RequestError::HeaderTwin {
                    sent: name.to_ascii_lowercase(),
                    reads_as
                },
                "{name}"
            );
        }
        assert!(canonical(b"/shop", &[HOST, ("x_api_key", "k")]).is_ok());
    }

    #[test]
    fn double_encoding_is_refused_unless_allowed() {
        let c = canonical(b"/%2573hop", &[HOST]).unwrap();
        assert_eq!(
            c.check_encoded_percent(false),
            Err(RequestError::EncodedPercent)
        );
        assert_eq!(c.check_encoded_percent(true), Ok(()));
    }

    #[test]
    fn json_method_fields_are_found_after_a_bom_and_in_lenient_json() {
        for body in [
            &br#"{"_method":"DELETE"}"#[..],
            "\u{feff}{\"_method\":\"DELETE\"}".as_bytes(),
            br#"{"a": NaN, "_method": "DELETE"}"#,
            br#"{"a": 1, /* c */ "\u005fmethod" : "DELETE",}"#,
        ] {
            assert!(
                json_has_method_field(body),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        assert!(!json_has_method_field(
            br#"{"method":"card","a":"_method"}"#
        ));
        assert!(!json_has_method_field(br#"["_method"]"#));
        // Any Content-Type, or none, is read as JSON too.
        let mut headers = HeaderMap::new();
        assert!(method_field_readers(&headers).len() == 2);
        headers.insert("content-type", "text/plain".parse().unwrap());
        let readers = method_field_readers(&headers);
        assert!(readers
            .iter()
            .any(|check| check(br#"{"_method":"DELETE"}"#)));
    }

    #[test]
    fn multipart_method_fields_are_found() {
        let body =
            b"--b\r\nContent-Disposition: form-data; NAME=\"_Method\"\r\n\r\nDELETE\r\n--b--";
        assert!(multipart_has_method_field(body));
        assert!(!multipart_has_method_field(
            b"--b\r\nContent-Disposition: form-data; name=\"method\"\r\n\r\nx"
        ));
        for name in [
            "\"_method\0x\"",
            "\" _method\"",
            "\"_method[]\"",
            "_METHOD",
            "'_method'",
        ] {
            let body = format!("--b\r\nContent-Disposition: form-data; name={name}\r\n\r\nDELETE");
            assert!(multipart_has_method_field(body.as_bytes()), "{name}");
        }
        let extended =
            b"--b\r\nContent-Disposition: form-data; name*=utf-8''%5Fmethod\r\n\r\nDELETE";
        assert!(multipart_has_method_field(extended));
        // A file part named otherwise is not a method field.
        assert!(!multipart_has_method_field(
            b"--b\r\nContent-Disposition: form-data; name=\"doc\"; filename=\"_method.txt\"\r\n\r\nx"
        ));
    }
}
