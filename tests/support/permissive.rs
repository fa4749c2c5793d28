//! A permissive upstream: a raw HTTP/1.1 server that records every request
//! and reads each one as loosely as common web frameworks do.
//!
//! A gateway decides on one reading of a request; the application behind it
//! may take another. This server computes, for every request it receives,
//! the set of [`Reading`]s (method, host, path) that some common framework
//! would route it as, and checks the bearer token like the shop does. A
//! request that any framework would route to a held route, without a token
//! that verifies, got past the gateway: see
//! [`PermissiveUpstream::unapproved_arrivals`].
//!
//! The readings, and who reads a request that way:
//!
//! - target: origin-form as sent; absolute-form (`http://a/shop`) and any
//!   `scheme:/path` target (Go's `net/http`: `x:/shop` is routed by its
//!   path `/shop`); a target without a leading `/` gets one (routers that
//!   prepend it); `//host/path` read as a network-path reference (Python's
//!   `urlsplit`, WHATWG `new URL(target, base)`); `X-Original-URL` and
//!   `X-Rewrite-URL` replace the target (IIS URL Rewrite, Symfony < 5,
//!   Zend Framework 1).
//! - path: decoded zero, one or two times (double decoding), IIS `%uXXXX`
//!   escapes, `\` as `/` (IIS, ASP.NET), dot segments and `//` resolved,
//!   case-insensitive (Express's default, IIS), trailing slash ignored
//!   (Express, Laravel, Rails), `;params` stripped (Tomcat, Spring, Jetty),
//!   a format suffix dropped (`/shop.json`: Rails' `(.:format)`, Django REST
//!   framework's format suffixes), trailing dots dropped (IIS/Windows),
//!   Unicode case folding (`ſ` upper-cases to `S`: Java's
//!   `equalsIgnoreCase`, .NET's ignore-case comparisons), NFKC folding with
//!   format characters ignored (`ｓ`, `𝐬`, `ﬀ` read as ASCII: IIS's best-fit
//!   mapping; U+200B and U+00AD ignored by ICU collation), whitespace
//!   trimmed off each segment (Spring's `AntPathMatcher` with `trimTokens`,
//!   routers trimming segments), and bytes that are not UTF-8 decoded
//!   leniently (overlong `%C0%AE` is '.', invalid sequences dropped).
//! - method: as sent, upper-cased; `HEAD` is served by the `GET` handler
//!   (Express, Rails, Go, Flask, Spring); `PATCH` and `PUT` by one `update`
//!   (Rails' `resources`, Laravel's `Route::resource`); `X-HTTP-Method-Override`,
//!   `X-HTTP-Method`, `X-Method-Override`; a `_method` query parameter
//!   (Express's method-override, Laravel, Symfony; PHP ends a name at a NUL,
//!   so `_method%00x` counts); a `_method` field of an
//!   urlencoded or multipart body (Rails/Rack, Laravel, Symfony; Rack reads
//!   a POST without a Content-Type as a form) or of a JSON body, for any
//!   Content-Type or none, a UTF-8 BOM before it dropped (method-override
//!   with a `req.body` getter, as in its README, behind Express's
//!   `json({ type: '*/*' })`, whose body-parser drops a BOM; Laravel's
//!   `isJson`).
//! - headers: a name with `_` is the name with `-` (Puma, PHP's SAPIs and
//!   CGI file both as `HTTP_X_FOO`; Symfony's `HeaderBag` reads `_` as
//!   `-`), for every header below and for framing.
//! - host: every `Host` header, the authority of an absolute-form target,
//!   `X-Forwarded-Host` (Express with `trust proxy`, Symfony and Laravel
//!   behind trusted proxies, Django's `USE_X_FORWARDED_HOST`), `Forwarded:
//!   host=` (RFC 7239: Symfony, Spring); lower-cased, without port and
//!   without a trailing dot.
//!
//! Framing is lenient too: a `Transfer-Encoding` that merely contains
//! `chunked` is chunked, and it wins over `Content-Length`; head lines may
//! end in a bare LF, and a line starting with a space or tab continues the
//! header before it (obs-fold), as with Node's `insecureHTTPParser`.
//!
//! It answers `200` with a small JSON body; a request asking for an
//! `Upgrade` gets `101`, after which the connection keeps being read as
//! HTTP/1.1 (the least it takes for a tunnel to carry calls the gateway
//! never saw).

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use countersign::demo::shop::SHOP_AUDIENCE;
use countersign::identity::JwtVerifier;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One way of reading a request: what some framework would route it as.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Reading {
    /// Upper-cased.
    pub method: String,
    /// Lower-cased, without port or trailing dot; `None` when the request
    /// names no host.
    pub host: Option<String>,
    /// Canonical: decoded, resolved, lower-cased, no trailing slash.
    pub path: String,
}

impl fmt::Display for Reading {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = self.host.as_deref().unwrap_or("(no host)");
        write!(f, "{} {} {}", self.method, host, self.path)
    }
}

/// One request as it arrived.
#[derive(Debug, Clone)]
pub struct Arrival {
    /// The request line, as sent.
    pub request_line: String,
    pub method: String,
    pub target: String,
    /// Names lower-cased, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Whether the bearer token verified against the authorization server's
    /// JWKS, for the shop's audience.
    pub token_verified: bool,
    pub readings: BTreeSet<Reading>,
}

impl Arrival {
    /// The values of header `name` (lower-case), in order.
    pub fn header_values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The first value of header `name` (lower-case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The readings that are one of the `held` routes.
    pub fn held_readings(&self, held: &[(&str, Option<&str>, &str)]) -> Vec<&Reading> {
        self.readings
            .iter()
            .filter(|r| held.iter().any(|route| is_route(r, route)))
            .collect()
    }
}

impl fmt::Display for Arrival {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{:?}", self.request_line)?;
        for (name, value) in &self.headers {
            writeln!(f, "    {name}: {value}")?;
        }
        if !self.body.is_empty() {
            writeln!(f, "    body: {:?}", String::from_utf8_lossy(&self.body))?;
        }
        write!(f, "    token verified: {}", self.token_verified)
    }
}

/// A request that reached a held route without an approved token.
#[derive(Debug, Clone)]
pub struct Offence {
    pub arrival: Arrival,
    /// The readings under which it is a held route.
    pub read_as: Vec<Reading>,
}

impl fmt::Display for Offence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.arrival)?;
        let read_as: Vec<String> = self.read_as.iter().map(Reading::to_string).collect();
        write!(f, "    read as: {}", read_as.join(" | "))
    }
}

#[derive(Debug)]
struct State {
    verifier: JwtVerifier,
    received: Mutex<Vec<Arrival>>,
}

/// A running permissive upstream; it stops with the test's runtime.
#[derive(Debug, Clone)]
pub struct PermissiveUpstream {
    pub addr: SocketAddr,
    state: Arc<State>,
}

impl PermissiveUpstream {
    /// Serves on 127.0.0.1, verifying tokens of `issuer` against `jwks_uri`.
    pub async fn start(issuer: &str, jwks_uri: url::Url) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            verifier: JwtVerifier::with_keys(
                reqwest::Client::new(),
                jwks_uri,
                issuer,
                SHOP_AUDIENCE,
                "sub",
            ),
            received: Mutex::new(Vec::new()),
        });
        let serving = state.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve_connection(stream, serving.clone()));
            }
        });
        Self { addr, state }
    }

    /// Everything received so far, oldest first.
    pub fn received(&self) -> Vec<Arrival> {
        self.state.received.lock().unwrap().clone()
    }

    /// The requests that some reading routes to one of the `held` routes
    /// (method, host or `None` for any host, path template with `{param}`
    /// and `{*rest}`) while their token did not verify.
    pub fn unapproved_arrivals(&self, held: &[(&str, Option<&str>, &str)]) -> Vec<Offence> {
        self.received()
            .into_iter()
            .filter(|a| !a.token_verified)
            .filter_map(|arrival| {
                let read_as: Vec<Reading> =
                    arrival.held_readings(held).into_iter().cloned().collect();
                (!read_as.is_empty()).then_some(Offence { arrival, read_as })
            })
            .collect()
    }
}

/// Whether `reading` is the route (method, host, path template).
fn is_route(reading: &Reading, (method, host, template): &(&str, Option<&str>, &str)) -> bool {
    reading.method.eq_ignore_ascii_case(method)
        && host.is_none_or(|h| reading.host.as_deref() == Some(h.to_ascii_lowercase().as_str()))
        && path_matches(template, &reading.path)
}

/// `template` segments: literal (case-insensitive), `{name}` (one segment),
/// `{*name}` (one or more segments).
fn path_matches(template: &str, path: &str) -> bool {
    let template = template.to_lowercase();
    let mut want = template.split('/').filter(|s| !s.is_empty());
    let mut have = path.split('/').filter(|s| !s.is_empty());
    loop {
        match (want.next(), have.next()) {
            (None, None) => return true,
            (Some(w), Some(_)) if w.starts_with("{*") => return true,
            (Some(w), Some(_)) if w.starts_with('{') => {}
            (Some(w), Some(h)) if w == h => {}
            _ => return false,
        }
    }
}

async fn serve_connection(mut stream: TcpStream, state: Arc<State>) {
    let mut buf = Vec::new();
    loop {
        let Some((head, head_len)) = read_head(&mut stream, &mut buf).await else {
            return;
        };
        buf.drain(..head_len);
        let (request_line, headers) = parse_head(&head);
        let header = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| dashed(n) == name)
                .map(|(_, v)| v.as_str())
        };
        let chunked = header("transfer-encoding").is_some_and(|v| v.contains("chunked"));
        let body = if chunked {
            match read_chunked(&mut stream, &mut buf).await {
                Some(body) => body,
                None => return,
            }
        } else {
            let length: usize = header("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if !fill_to(&mut stream, &mut buf, length).await {
                return;
            }
            buf.drain(..length).collect()
        };
        let mut parts = request_line.splitn(3, ' ');
        let method = parts.next().unwrap_or_default().to_owned();
        let target = parts.next().unwrap_or_default().to_owned();
        let token_verified = match header("authorization").and_then(bearer) {
            Some(token) => state.verifier.verify(token).await.is_ok(),
            None => false,
        };
        let upgrade = header("upgrade").map(str::to_owned);
        let close = header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let readings = readings(&method, &target, &headers, &body);
        let seen = {
            let mut received = state.received.lock().unwrap();
            received.push(Arrival {
                request_line,
                method: method.clone(),
                target,
                headers,
                body,
                token_verified,
                readings,
            });
            received.len()
        };
        let response = match upgrade {
            Some(protocol) => format!(
                "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: {protocol}\r\n\r\n"
            ),
            None => {
                let json = format!(r#"{{"ok":true,"seen":{seen}}}"#);
                let body = if method.eq_ignore_ascii_case("HEAD") {
                    ""
                } else {
                    json.as_str()
                };
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{}\r\n{body}",
                    json.len(),
                    if close { "connection: close\r\n" } else { "" },
                )
            }
        };
        if stream.write_all(response.as_bytes()).await.is_err() || close {
            let _ = stream.shutdown().await;
            return;
        }
    }
}

/// A header name as CGI-style servers file it (Puma, PHP, CGI: `X_Foo` and
/// `X-Foo` are both `HTTP_X_FOO`), in the `-` spelling.
pub fn dashed(name: &str) -> String {
    name.replace('_', "-")
}

fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Reads a request head: up to the first empty line, where a line ends at
/// LF with or without a CR before it (Node's `insecureHTTPParser`, Python's
/// `http.server`). The head without its blank line, and the bytes it took.
async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(String, usize)> {
    loop {
        let end = buf.iter().enumerate().find_map(|(i, &b)| {
            (b == b'\n').then_some(())?;
            match (buf.get(i + 1), buf.get(i + 2)) {
                (Some(b'\n'), _) => Some((i, i + 2)),
                (Some(b'\r'), Some(b'\n')) => Some((i, i + 3)),
                _ => None,
            }
        });
        if let Some((head_end, len)) = end {
            let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
            return Some((head, len));
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The request line and the headers (names lower-cased) of a head, read
/// leniently: lines end at LF, a trailing CR is dropped, and a line that
/// starts with a space or tab continues the header before it (obs-fold,
/// unfolded as Node's `insecureHTTPParser` and Python's `email` parser do).
pub fn parse_head(head: &str) -> (String, Vec<(String, String)>) {
    let mut lines = head.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let request_line = lines.next().unwrap_or_default().to_owned();
    let mut headers: Vec<(String, String)> = Vec::new();
    for line in lines {
        if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = headers.last_mut() {
                if !value.is_empty() {
                    value.push(' ');
                }
                value.push_str(line.trim());
            }
            continue;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
    }
    (request_line, headers)
}

/// Reads until `buf` holds `needle`; the offset just past its first occurrence.
async fn fill_until(stream: &mut TcpStream, buf: &mut Vec<u8>, needle: &[u8]) -> Option<usize> {
    loop {
        if let Some(i) = buf.windows(needle.len()).position(|w| w == needle) {
            return Some(i + needle.len());
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Reads until `buf` holds at least `len` bytes.
async fn fill_to(stream: &mut TcpStream, buf: &mut Vec<u8>, len: usize) -> bool {
    while buf.len() < len {
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    true
}

/// Decodes a chunked body at the start of `buf`, consuming it and trailers.
async fn read_chunked(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = fill_until(stream, buf, b"\r\n").await?;
        let line = String::from_utf8_lossy(&buf[..line_end - 2]).into_owned();
        let size = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
        buf.drain(..line_end);
        if size == 0 {
            // Trailers, if any, end with an empty line.
            loop {
                let end = fill_until(stream, buf, b"\r\n").await?;
                let empty = end == 2;
                buf.drain(..end);
                if empty {
                    return Some(body);
                }
            }
        }
        if !fill_to(stream, buf, size + 2).await {
            return None;
        }
        body.extend_from_slice(&buf[..size]);
        buf.drain(..size + 2);
    }
}

const METHOD_OVERRIDE_HEADERS: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// Every (method, host, path) that some common framework reads this request as.
pub fn readings(
    method: &str,
    target: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> BTreeSet<Reading> {
    let values = |name: &'static str| {
        headers
            .iter()
            .filter(move |(n, _)| dashed(n) == name)
            .map(|(_, v)| v.as_str())
    };

    // The targets: as sent, and as rewritten by IIS-style headers.
    let mut targets = vec![target.to_owned()];
    targets.extend(values("x-original-url").map(str::to_owned));
    targets.extend(values("x-rewrite-url").map(str::to_owned));

    let mut hosts: BTreeSet<Option<String>> = BTreeSet::new();
    let mut paths: BTreeSet<String> = BTreeSet::new();
    let mut queries: Vec<String> = Vec::new();
    for target in &targets {
        let target = target.split('#').next().unwrap_or_default();
        let (target, query) = match target.split_once('?') {
            Some((t, q)) => (t, Some(q)),
            None => (target, None),
        };
        queries.extend(query.map(str::to_owned));
        if method.eq_ignore_ascii_case("CONNECT") {
            hosts.insert(host_key(target));
        }
        for (authority, path) in target_paths(target) {
            if let Some(authority) = authority {
                hosts.insert(host_key(&authority));
            }
            paths.extend(path_readings(&path));
        }
    }

    for name in ["host", "x-forwarded-host"] {
        for value in values(name) {
            hosts.extend(value.split(',').map(host_key));
        }
    }
    for value in values("forwarded") {
        for pair in value.split([',', ';']) {
            if let Some((k, v)) = pair.trim().split_once('=') {
                if k.trim().eq_ignore_ascii_case("host") {
                    hosts.insert(host_key(v.trim_matches('"')));
                }
            }
        }
    }
    hosts.retain(Option::is_some);
    if hosts.is_empty() {
        hosts.insert(None);
    }

    let mut methods: BTreeSet<String> = BTreeSet::new();
    methods.insert(method.to_ascii_uppercase());
    if method.eq_ignore_ascii_case("HEAD") {
        methods.insert("GET".into());
    }
    // Rails' `resources`, Laravel's `Route::resource`: both are `update`.
    if method.eq_ignore_ascii_case("PATCH") {
        methods.insert("PUT".into());
    }
    if method.eq_ignore_ascii_case("PUT") {
        methods.insert("PATCH".into());
    }
    for name in METHOD_OVERRIDE_HEADERS {
        methods.extend(values(name).map(|v| v.trim().to_ascii_uppercase()));
    }
    for query in &queries {
        methods.extend(form_field(query.as_bytes(), "_method"));
    }
    let content_type = values("content-type").next().unwrap_or_default();
    let media_type = content_type.to_ascii_lowercase();
    // Rack's form_data?: a POST without a Content-Type is a form.
    let no_type = values("content-type").next().is_none() && method.eq_ignore_ascii_case("POST");
    if media_type.starts_with("application/x-www-form-urlencoded") || no_type {
        methods.extend(form_field(body, "_method"));
    } else if media_type.starts_with("multipart/form-data") {
        methods.extend(multipart_field(content_type, body, "_method"));
    }
    // Any Content-Type, or none (Express's json({ type: '*/*' })), and
    // after a UTF-8 BOM (body-parser decodes through iconv-lite, which
    // drops one).
    let json_text = body.strip_prefix("\u{feff}".as_bytes()).unwrap_or(body);
    let json: Option<serde_json::Value> = serde_json::from_slice(json_text).ok();
    if let Some(m) = json.as_ref().and_then(|j| j["_method"].as_str()) {
        methods.insert(m.to_ascii_uppercase());
    }
    methods.retain(|m| !m.is_empty());

    let mut readings = BTreeSet::new();
    for method in &methods {
        for host in &hosts {
            for path in &paths {
                readings.insert(Reading {
                    method: method.clone(),
                    host: host.clone(),
                    path: path.clone(),
                });
            }
        }
    }
    readings
}

/// The (authority, path) pairs a request target (without query) is read as.
fn target_paths(target: &str) -> Vec<(Option<String>, String)> {
    let mut out = Vec::new();
    if target == "*" {
        return vec![(None, "*".into())];
    }
    if let Some(rest) = target.strip_prefix("//") {
        // As sent (most servers), and as a network-path reference.
        out.push((None, target.to_owned()));
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        out.push((Some(authority.to_owned()), with_slash(path)));
        return out;
    }
    if target.starts_with('/') {
        return vec![(None, target.to_owned())];
    }
    let scheme_len = target
        .find(':')
        .filter(|&i| {
            i > 0
                && target.as_bytes()[0].is_ascii_alphabetic()
                && target[..i]
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
        })
        .unwrap_or(0);
    if scheme_len > 0 {
        let rest = &target[scheme_len + 1..];
        if let Some(rest) = rest.strip_prefix("//") {
            // Absolute-form: routed by its path, the authority names the host.
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            out.push((Some(authority.to_owned()), with_slash(path)));
        } else {
            // Go: `x:/shop` parses with scheme `x` and is routed by `/shop`.
            out.push((None, with_slash(rest)));
        }
    }
    // Routers that prepend the missing '/'.
    out.push((None, with_slash(target)));
    out
}

fn with_slash(path: &str) -> String {
    if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/{path}")
    }
}

/// `Host`-like value -> lower-case host without port, userinfo or trailing dot.
fn host_key(raw: &str) -> Option<String> {
    let raw = raw.trim();
    let raw = raw.rsplit_once('@').map_or(raw, |(_, h)| h);
    let host = if raw.starts_with('[') {
        raw.split_once(']')
            .map_or(raw, |(h, _)| &raw[..h.len() + 1])
    } else {
        raw.rsplit_once(':').map_or(raw, |(h, _)| h)
    };
    let host = host.trim_end_matches('.').to_lowercase();
    (!host.is_empty()).then_some(host)
}

/// The canonical paths `raw` is read as, under every combination of the
/// lenient steps some framework takes.
pub fn path_readings(raw: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    if raw == "*" {
        out.insert(raw.to_owned());
        return out;
    }
    for utf8 in [Utf8::Lossy, Utf8::Lenient] {
        let mut decoded = raw.to_owned();
        for depth in 0..3 {
            if depth > 0 {
                decoded = percent_decode(&decoded, utf8);
            }
            for strip_params in [false, true] {
                for strip_suffix in [false, true] {
                    for unicode in [Unicode::Plain, Unicode::CaseFold, Unicode::Nfkc] {
                        for trim in [false, true] {
                            let steps = Steps {
                                strip_params,
                                strip_suffix,
                                unicode,
                                trim,
                            };
                            out.insert(canonical(&decoded, steps));
                        }
                    }
                }
            }
        }
    }
    out
}

/// How decoded bytes that are not UTF-8 are read.
#[derive(Clone, Copy)]
enum Utf8 {
    /// Replaced by U+FFFD (most servers).
    Lossy,
    /// Overlong forms decoded to what they encode (`%C0%AE` is '.': old
    /// IIS, Tomcat and JDK decoders); truncated sequences, lone
    /// continuation bytes, surrogates and code points beyond U+10FFFF
    /// dropped (decoders that ignore errors).
    Lenient,
}

/// How non-ASCII letters are compared.
#[derive(Clone, Copy, PartialEq)]
enum Unicode {
    /// Byte for byte, ASCII case ignored.
    Plain,
    /// Unicode case folding (`ſ` upper-cases to `S`: Java's
    /// `equalsIgnoreCase`, .NET's ignore-case comparisons).
    CaseFold,
    /// NFKC (fullwidth `ｓ`, `𝐬`, `ⓢ`, `ﬀ`, `ˢ` are `s`, `ff`; IIS's
    /// best-fit mapping), case folded, and the format and other
    /// default-ignorable characters ICU collation ignores (U+200B, U+00AD,
    /// U+FEFF) left out (culture-sensitive comparisons in .NET and Java).
    Nfkc,
}

/// The lenient steps of one reading.
#[derive(Clone, Copy)]
struct Steps {
    /// `;params` stripped (Tomcat, Spring, Jetty).
    strip_params: bool,
    /// Format suffix and trailing dots dropped (Rails, IIS).
    strip_suffix: bool,
    unicode: Unicode,
    /// Whitespace (and a BOM, as JavaScript's `trim`) trimmed off each
    /// segment: Spring's `AntPathMatcher` with `trimTokens`, routers using
    /// Go's `TrimSpace` or .NET's `Trim`.
    trim: bool,
}

fn canonical(path: &str, steps: Steps) -> String {
    let path = match steps.unicode {
        Unicode::Nfkc => {
            use unicode_normalization::UnicodeNormalization;
            path.nfkc().filter(|c| !is_ignorable(*c)).collect()
        }
        _ => path.to_owned(),
    };
    let path = path.replace('\\', "/");
    let mut segments: Vec<&str> = Vec::new();
    for segment in path.split('/') {
        let segment = if steps.strip_params {
            segment.split(';').next().unwrap_or_default()
        } else {
            segment
        };
        let segment = if steps.trim {
            segment.trim_matches(|c: char| c.is_whitespace() || c == '\u{FEFF}')
        } else {
            segment
        };
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            _ => segments.push(segment),
        }
    }
    let mut segments: Vec<String> = segments.into_iter().map(str::to_owned).collect();
    if steps.strip_suffix {
        if let Some(last) = segments.last_mut() {
            // IIS drops trailing dots; Rails reads `.json` as the format.
            let trimmed = last.trim_end_matches('.');
            let stem = match trimmed.rsplit_once('.') {
                Some((stem, ext))
                    if !stem.is_empty()
                        && !ext.is_empty()
                        && ext.bytes().all(|b| b.is_ascii_alphanumeric()) =>
                {
                    stem
                }
                _ => trimmed,
            };
            *last = stem.to_owned();
        }
        segments.retain(|s| !s.is_empty());
    }
    let path = format!("/{}", segments.join("/"));
    if steps.unicode == Unicode::Plain {
        path.to_lowercase()
    } else {
        path.to_uppercase().to_lowercase()
    }
}

/// What ICU collation ignores: format characters (U+200B, U+00AD,
/// U+FEFF) and the other default-ignorable code points.
fn is_ignorable(c: char) -> bool {
    use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};
    c.general_category() == GeneralCategory::Format
        || matches!(c, '\u{034F}' | '\u{180B}'..='\u{180F}' | '\u{FE00}'..='\u{FE0F}')
}

/// One round of percent-decoding, including IIS's `%uXXXX`; invalid
/// escapes are kept as they are.
fn percent_decode(s: &str, utf8: Utf8) -> String {
    let bytes = s.as_bytes();
    let mut out: Vec<u8> = Vec::with_capacity(bytes.len());
    let hex = |b: &[u8]| {
        std::str::from_utf8(b)
            .ok()
            .and_then(|h| u32::from_str_radix(h, 16).ok())
    };
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            if matches!(bytes.get(i + 1), Some(b'u' | b'U')) {
                if let Some(c) = bytes
                    .get(i + 2..i + 6)
                    .and_then(hex)
                    .and_then(char::from_u32)
                {
                    let mut utf8 = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
                    i += 6;
                    continue;
                }
            } else if let Some(b) = bytes.get(i + 1..i + 3).and_then(hex) {
                out.push(b as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    match utf8 {
        Utf8::Lossy => String::from_utf8_lossy(&out).into_owned(),
        Utf8::Lenient => lenient_utf8(&out),
    }
}

/// Decodes UTF-8 without checking for overlong forms, and drops whatever
/// does not decode to a scalar value.
fn lenient_utf8(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let lead = bytes[i];
        let (len, initial) = match lead {
            0x00..=0x7F => (1, u32::from(lead)),
            0xC0..=0xDF => (2, u32::from(lead & 0x1F)),
            0xE0..=0xEF => (3, u32::from(lead & 0x0F)),
            0xF0..=0xF7 => (4, u32::from(lead & 0x07)),
            _ => {
                i += 1;
                continue;
            }
        };
        let tail = bytes
            .get(i + 1..i + len)
            .filter(|t| t.len() == len - 1 && t.iter().all(|b| b & 0xC0 == 0x80));
        let Some(tail) = tail else {
            i += 1;
            continue;
        };
        let value = tail
            .iter()
            .fold(initial, |v, b| (v << 6) | u32::from(b & 0x3F));
        if let Some(c) = char::from_u32(value) {
            out.push(c);
        }
        i += len;
    }
    out
}

/// The values of `name` in an urlencoded form (or query string), upper-cased,
/// split at '&' or ';'; a name ends at a NUL, as PHP registers names as C strings (`_method%00x`
/// is `_method` to Laravel and Symfony).
fn form_field(form: &[u8], name: &str) -> Vec<String> {
    // Go before 1.17 splits at ';' as well as '&' (gorilla/handlers'
    // HTTPMethodOverrideHandler reads r.FormValue("_method")).
    let form = String::from_utf8_lossy(form).replace(';', "&");
    url::form_urlencoded::parse(form.as_bytes())
        .filter(|(k, _)| k.split('\0').next() == Some(name))
        .map(|(_, v)| v.trim().to_ascii_uppercase())
        .collect()
}

/// The values of field `name` in a multipart body, upper-cased; a part's
/// name ends at a NUL and loses its leading spaces, as PHP registers it
/// (`name="_method\0x"` is `_method` to Laravel and Symfony).
fn multipart_field(content_type: &str, body: &[u8], name: &str) -> Vec<String> {
    let Some(boundary) = content_type
        .split(';')
        .filter_map(|p| {
            let (k, v) = p.trim().split_once('=')?;
            k.eq_ignore_ascii_case("boundary").then_some(v)
        })
        .next()
    else {
        return Vec::new();
    };
    let body = String::from_utf8_lossy(body);
    let delimiter = format!("--{}", boundary.trim_matches('"'));
    body.split(delimiter.as_str())
        .filter_map(|part| part.split_once("\r\n\r\n"))
        .filter(|(head, _)| part_name(head).is_some_and(|n| n == name))
        .map(|(_, value)| value.trim_end_matches("\r\n").trim().to_ascii_uppercase())
        .collect()
}

/// The `name` parameter of a part's Content-Disposition, as PHP files it.
fn part_name(head: &str) -> Option<&str> {
    let at = head.to_ascii_lowercase().find("; name=\"")? + "; name=\"".len();
    let quoted = head[at..].split('"').next()?;
    Some(quoted.split('\0').next()?.trim_start())
}
