//! Policy bypass: no spelling of a held route reaches the upstream without
//! an approval, however loosely the application behind the gateway reads it.
//!
//! The upstream here is [`PermissiveUpstream`]: it reads every request the
//! way some common framework would (see its module documentation) and
//! reports requests that some framework routes to a held route while they
//! carry no token that verifies. Nobody approves anything in these tests,
//! so every such request got past the gateway.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use countersign::demo::shop::ShopHandle;
use support::front::{self, Proto};
use support::permissive::{Offence, PermissiveUpstream};
use support::*;

/// The held routes: (method, host or any, path template).
const HELD: &[(&str, Option<&str>, &str)] = &[
    ("POST", None, "/shop"),
    ("DELETE", None, "/orders/{orderId}"),
    ("GET", Some("admin.example"), "/admin/{*rest}"),
    ("PUT", None, "/carts/{cartId}"),
    ("POST", None, "/offers"),
];

const ADMIN_POLICY: &str = r#"  - name: admin
    match: { methods: [GET], path: "/admin/{*rest}", host: admin.example }
    require: { scopes: [product:read], audience: "https://shop.example/api" }
    binding_message: "Admin call"
  - name: replace-cart
    match: { methods: [PUT], path: "/carts/{cartId}" }
    require: { scopes: [product:buy], audience: "https://shop.example/api" }
    binding_message: "Replace cart {{params.cartId}}"
  - name: accept-offer
    match: { methods: [POST], path: "/offers" }
    require: { scopes: [product:buy], audience: "https://shop.example/api" }
    binding_message: "Accept an offer"
"#;

const BODY: &str = r#"{"product":"XYZ phone","qty":2,"priceLimit":900}"#;
const SHOP: &str = "Host: shop.example";
const ADMIN: &str = "Host: admin.example";
const OTHER: &str = "Host: other.example";
/// Replaced by the spelling's two-digit index, so arrivals can be told apart.
const PROBE: &str = "x-probe: ??";

/// How long a client waits for an answer; held calls are left hanging.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(4);

/// One way of spelling a call to a held route.
struct Spelling {
    name: &'static str,
    /// The bytes sent first.
    request: String,
    /// Sent once the first answer's head arrived: what travels through a
    /// tunnel, or a request pipelined behind one the gateway refuses.
    then: Option<String>,
    /// Whether a permissive upstream, asked directly, routes it to a held
    /// route (false for rows that are no route at all).
    reaches_held: bool,
    /// Why HTTP/2 cannot carry this spelling; `None`: it runs over both.
    h1_only: Option<&'static str>,
}

fn spelling(name: &'static str, request: String) -> Spelling {
    Spelling {
        name,
        request,
        then: None,
        reaches_held: true,
        h1_only: None,
    }
}

impl Spelling {
    fn then(mut self, bytes: String) -> Self {
        self.then = Some(bytes);
        self
    }

    /// HTTP/2 has no way to say it: `why`.
    fn h1_only(mut self, why: &'static str) -> Self {
        self.h1_only = Some(why);
        self
    }

    fn no_route(mut self) -> Self {
        self.reaches_held = false;
        self
    }

    fn tagged(&self, index: usize) -> (String, Option<String>) {
        let tag = format!("x-probe: {index:02}");
        (
            self.request.replace(PROBE, &tag),
            self.then.as_ref().map(|t| t.replace(PROBE, &tag)),
        )
    }

    /// The same call over HTTP/2, tagged `index`: the request line's
    /// method and target, every header field, the body (read from the
    /// HTTP/1.1 bytes, which the rows over both protocols keep plain).
    /// `None` for rows HTTP/2 cannot carry.
    fn h2_call(&self, index: usize) -> Option<front::Call> {
        if self.h1_only.is_some() {
            return None;
        }
        let (request, _) = self.tagged(index);
        let (head, body) = request
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("{}: no end of head", self.name));
        let mut lines = head.split("\r\n");
        let line = lines.next().unwrap();
        let mut parts = line.split(' ');
        let (method, target, version) = (parts.next(), parts.next(), parts.next());
        assert!(
            version == Some("HTTP/1.1") && parts.next().is_none(),
            "{}: mark it h1_only",
            self.name
        );
        let target = target.unwrap();
        assert!(
            target.starts_with('/') || target == "*",
            "{}: not origin-form, mark it h1_only",
            self.name
        );
        let headers = lines
            .map(|l| {
                assert!(
                    !l.starts_with([' ', '\t']) && !l.contains('\n'),
                    "{}: folded or bare LF, mark it h1_only",
                    self.name
                );
                let (name, value) = l.split_once(':').unwrap();
                (name.to_owned(), value.trim().to_owned())
            })
            .collect();
        Some(front::Call {
            method: method.unwrap().to_owned(),
            target: target.to_owned(),
            headers,
            body: body.as_bytes().to_vec(),
        })
    }
}

/// `line` ("POST /shop"), then `headers` (Host only when given), the
/// identity header and the probe tag, and `body` as `content_type`.
fn request(line: &str, headers: &[&str], body: Option<(&str, &str)>) -> String {
    let mut out = format!("{line} HTTP/1.1\r\n");
    for header in headers {
        out.push_str(header);
        out.push_str("\r\n");
    }
    out.push_str(&format!("{USER_HEADER}: alice\r\n{PROBE}\r\n"));
    if !headers
        .iter()
        .any(|h| h.to_ascii_lowercase().starts_with("connection:"))
    {
        out.push_str("connection: close\r\n");
    }
    match body {
        Some((content_type, body)) => out.push_str(&format!(
            "content-type: {content_type}\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )),
        None => out.push_str("\r\n"),
    }
    out
}

/// With the purchase as JSON body.
fn json(line: &str, headers: &[&str]) -> String {
    request(line, headers, Some(("application/json", BODY)))
}

/// Without a body.
fn bare(line: &str, headers: &[&str]) -> String {
    request(line, headers, None)
}

/// With an urlencoded form body.
fn form(line: &str, headers: &[&str], body: &str) -> String {
    request(
        line,
        headers,
        Some(("application/x-www-form-urlencoded", body)),
    )
}

/// `POST /products` whose body, by Content-Length, is a whole chunked
/// body (`0`) followed by a `POST /shop`: whoever reads it as chunked sees
/// two requests.
fn smuggle(transfer_encoding: &str) -> String {
    let body = format!("0\r\n\r\n{}", json("POST /shop", &[SHOP]));
    format!(
        "POST /products HTTP/1.1\r\n{SHOP}\r\n{USER_HEADER}: alice\r\n{PROBE}\r\ncontent-type: application/json\r\ncontent-length: {}\r\ntransfer-encoding: {transfer_encoding}\r\n\r\n{body}",
        body.len()
    )
}

/// Every spelling, with who reads it how.
fn spellings() -> Vec<Spelling> {
    let multipart =
        "--XyZ\r\ncontent-disposition: form-data; name=\"_method\"\r\n\r\nDELETE\r\n--XyZ--\r\n";
    vec![
        // ---- POST /shop ----
        // Go net/http: ParseRequestURI("x:/shop") has scheme "x" and path
        // "/shop", and ServeMux routes by the path.
        spelling("POST x:/shop", json("POST x:/shop", &[SHOP]))
            .h1_only("`:path` is origin-form or `*` (RFC 9113 §8.3.1): no scheme in it"),
        // Routers that prepend a missing leading '/' (Go's cleanPath,
        // Node routers reading req.url).
        spelling("POST shop", json("POST shop", &[SHOP]))
            .h1_only("`:path` starts with `/` (RFC 9113 §8.3.1)"),
        // RFC 9112 absolute-form: every server routes it by its path.
        spelling(
            "POST http://shop.example/shop, with Host",
            json("POST http://shop.example/shop", &[SHOP]),
        )
        .h1_only("absolute-form is HTTP/1.1's: HTTP/2 names the authority in `:authority` (the plain row; a `host` disagreeing with it is tests/http2.rs's)"),
        spelling(
            "POST http://shop.example/shop, no Host",
            json("POST http://shop.example/shop", &[]),
        )
        .h1_only("absolute-form is HTTP/1.1's: HTTP/2 names the authority in `:authority` (the plain row; a `host` disagreeing with it is tests/http2.rs's)"),
        // Absolute-form whose authority disagrees with Host: RFC 9112 says
        // the authority wins; servers that take Host see other.example.
        spelling(
            "POST http://shop.example/shop, Host: other.example",
            json("POST http://shop.example/shop", &[OTHER]),
        )
        .h1_only("absolute-form is HTTP/1.1's: HTTP/2 names the authority in `:authority` (the plain row; a `host` disagreeing with it is tests/http2.rs's)"),
        // Python's urlsplit, WHATWG `new URL(target, base)`: `//a/b` is
        // host a, path /b.
        spelling(
            "POST //shop.example/shop",
            json("POST //shop.example/shop", &[SHOP]),
        ),
        // IIS URL Rewrite, Symfony before 5, Zend Framework 1: the header
        // replaces the path.
        spelling(
            "POST /other + X-Original-URL: /shop",
            json("POST /other", &[SHOP, "X-Original-URL: /shop"]),
        ),
        // IIS ISAPI_Rewrite, Symfony before 5: likewise.
        spelling(
            "POST /other + X-Rewrite-URL: /shop",
            json("POST /other", &[SHOP, "X-Rewrite-URL: /shop"]),
        ),
        // Express's method-override('_method', { methods: null }), and any
        // override middleware not limited to POST.
        spelling(
            "GET /shop?_method=POST",
            json("GET /shop?_method=POST", &[SHOP]),
        ),
        // Double decoding (%2573 -> %73 -> s): IIS with double escaping
        // allowed, a decoding proxy in front of a decoding framework.
        spelling("POST /%2573hop", json("POST /%2573hop", &[SHOP])),
        // Double-decoded dot segment: /x/%2e%2e/shop -> /x/../shop -> /shop.
        spelling(
            "POST /x/%252e%252e/shop",
            json("POST /x/%252e%252e/shop", &[SHOP]),
        ),
        // IIS: %uXXXX escapes.
        spelling("POST /%u0073hop", json("POST /%u0073hop", &[SHOP])),
        // Rails routes /shop(.:format); Django REST framework's format
        // suffixes.
        spelling("POST /shop.json", json("POST /shop.json", &[SHOP])),
        // Rails' format, case-insensitive routing (Express's default, IIS)
        // and a trailing slash (Express, Laravel).
        spelling("POST /SHOP.JSON/", json("POST /SHOP.JSON/", &[SHOP])),
        // IIS and Windows drop the trailing dots of a segment.
        spelling("POST /shop.", json("POST /shop.", &[SHOP])),
        // U+017F 'ſ' upper-cases to 'S': Java's equalsIgnoreCase and .NET's
        // ignore-case comparisons match it against "shop".
        spelling("POST /%C5%BFhop", json("POST /%C5%BFhop", &[SHOP])),
        // Method names are case-sensitive, but some servers upper-case them.
        spelling("post /shop", json("post /shop", &[SHOP])),
        // CL.TE request smuggling: read as chunked, the body ends at once
        // and a POST /shop follows.
        spelling(
            "POST /products, CL + TE: chunked, POST /shop smuggled",
            smuggle("chunked"),
        )
        .h1_only("`transfer-encoding` is connection-specific: HTTP/2 frames the body itself and a request carrying it is malformed (RFC 9113 §8.2.2)"),
        // The same with an obfuscated Transfer-Encoding, read as chunked by
        // servers that search the value for "chunked".
        spelling(
            "POST /products, CL + TE: xchunked, POST /shop smuggled",
            smuggle("xchunked"),
        )
        .h1_only("`transfer-encoding` is connection-specific: HTTP/2 frames the body itself and a request carrying it is malformed (RFC 9113 §8.2.2)"),
        // A chunked Transfer-Encoding that is not the last coding, or is
        // preceded by another: read as chunked by servers that search the
        // value (Node's llhttp reads `identity, chunked` as chunked).
        spelling(
            "POST /products, CL + TE: chunked, identity, POST /shop smuggled",
            smuggle("chunked, identity"),
        )
        .h1_only("`transfer-encoding` is connection-specific: HTTP/2 frames the body itself and a request carrying it is malformed (RFC 9113 §8.2.2)"),
        spelling(
            "POST /products, CL + TE: identity, chunked, POST /shop smuggled",
            smuggle("identity, chunked"),
        )
        .h1_only("`transfer-encoding` is connection-specific: HTTP/2 frames the body itself and a request carrying it is malformed (RFC 9113 §8.2.2)"),
        // Bare LF line endings: Node's insecureHTTPParser, Python's
        // http.server and httparse (so pingora) end a line at LF alone.
        spelling(
            "POST /shop, bare LF line endings",
            json("POST /shop", &[SHOP]).replace("\r\n", "\n"),
        )
        .h1_only("HTTP/2 has no line endings: fields are HPACK-coded"),
        // A Transfer-Encoding ended by a bare LF inside a CRLF head: a
        // CRLF-only parser reads it as part of the header before it and
        // frames by Content-Length; an LF-accepting one reads it as chunked,
        // and a POST /shop follows.
        spelling("POST /products, TE after a bare LF, POST /shop smuggled", {
            let body = format!("0\r\n\r\n{}", json("POST /shop", &[SHOP]));
            format!(
                "POST /products HTTP/1.1\r\n{SHOP}\r\n{USER_HEADER}: alice\r\n{PROBE}\r\ncontent-type: application/json\ntransfer-encoding: chunked\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
        })
        .h1_only("HTTP/2 has no line endings, and no `transfer-encoding` (RFC 9113 §8.2.2)"),
        // obs-fold: a line starting with a space continues the header before
        // it. Unfolded (Node's insecureHTTPParser, Python's email parser),
        // `transfer-encoding:` + ` chunked` is chunked.
        spelling(
            "POST /products, CL + TE folded onto a continuation line, POST /shop smuggled",
            smuggle("\r\n chunked"),
        )
        .h1_only("obs-fold is HTTP/1.1's: an HTTP/2 field is one HPACK string, no continuation lines"),
        // A folded override header: GET /shop read as POST.
        spelling(
            "GET /shop, X-HTTP-Method-Override folded",
            bare("GET /shop", &[SHOP, "X-HTTP-Method-Override:\r\n\tPOST"]),
        )
        .h1_only("obs-fold is HTTP/1.1's: an HTTP/2 field is one HPACK string, no continuation lines"),
        // A folded Host: the held host on a continuation line.
        spelling(
            "GET /admin/x, Host folded",
            bare("GET /admin/x", &["Host:\r\n admin.example"]),
        )
        .h1_only("obs-fold is HTTP/1.1's: an HTTP/2 field is one HPACK string, no continuation lines"),
        // `_` for `-`: Puma, PHP and CGI file `Transfer_Encoding` as
        // `HTTP_TRANSFER_ENCODING`, so they read the body as chunked.
        spelling(
            "POST /products, CL + Transfer_Encoding: chunked, POST /shop smuggled",
            smuggle("chunked").replace("transfer-encoding:", "Transfer_Encoding:"),
        ),
        // Rack::MethodOverride under Puma reads HTTP_X_HTTP_METHOD_OVERRIDE.
        spelling(
            "POST /orders/7, X_HTTP_Method_Override: DELETE",
            json("POST /orders/7", &[SHOP, "X_HTTP_Method_Override: DELETE"]),
        ),
        // Symfony under PHP reads HTTP_X_ORIGINAL_URL (IIS).
        spelling(
            "POST /other, X_Original_URL: /shop",
            json("POST /other", &[SHOP, "X_Original_URL: /shop"]),
        ),
        // Rails behind a trusted proxy, under Puma.
        spelling(
            "GET /admin/x, Host: other.example, X_Forwarded_Host: admin.example",
            bare("GET /admin/x", &[OTHER, "X_Forwarded_Host: admin.example"]),
        ),
        // Two Content-Lengths: whoever reads the first (0) sees the body as
        // a second request.
        spelling(
            "POST /products, CL: 0 + CL: n, POST /shop as the body",
            {
                let body = json("POST /shop", &[SHOP]);
                format!(
                    "POST /products HTTP/1.1\r\n{SHOP}\r\n{USER_HEADER}: alice\r\n{PROBE}\r\ncontent-type: application/json\r\ncontent-length: 0\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                )
            },
        )
        .h1_only("HTTP/2 frames the body by DATA frames; a `content-length` they do not match is tests/http2.rs's case"),
        // The same smuggling over HTTP/1.0, where Transfer-Encoding has no
        // meaning to RFC 9112 but some servers still honour it.
        spelling(
            "POST /products HTTP/1.0, CL + TE: chunked, POST /shop smuggled",
            smuggle("chunked").replacen("HTTP/1.1", "HTTP/1.0", 1),
        )
        .h1_only("HTTP/1.0 and `transfer-encoding`: neither exists in HTTP/2"),
        // One Content-Length line listing two values: a server that takes
        // the first (0) sees the body as a second request.
        spelling(
            "POST /products, CL: 0, n in one line, POST /shop as the body",
            {
                let body = json("POST /shop", &[SHOP]);
                format!(
                    "POST /products HTTP/1.1\r\n{SHOP}\r\n{USER_HEADER}: alice\r\n{PROBE}\r\ncontent-type: application/json\r\ncontent-length: 0, {}\r\n\r\n{body}",
                    body.len()
                )
            },
        )
        .h1_only("HTTP/2 frames the body by DATA frames; a `content-length` they do not match is tests/http2.rs's case"),
        // Pipelining: an HTTP/1.0 keep-alive pass-through call and a POST
        // /shop behind it in the same write; the second is a call of its own.
        spelling(
            "GET /products HTTP/1.0 keep-alive + POST /shop in one write",
            format!(
                "GET /products HTTP/1.0\r\n{SHOP}\r\n{USER_HEADER}: alice\r\n{PROBE}\r\nconnection: keep-alive\r\n\r\n{}",
                json("POST /shop", &[SHOP])
            ),
        )
        .h1_only("no pipelining in HTTP/2: each request is a stream of its own"),
        // A WebSocket upgrade on a pass-through route: once the upstream
        // answers 101 the gateway relays bytes, and the tunnel carries a
        // POST /shop the gateway never reads.
        spelling(
            "GET /products + Upgrade: websocket, POST /shop through the tunnel",
            bare(
                "GET /products",
                &[
                    SHOP,
                    "Connection: Upgrade",
                    "Upgrade: websocket",
                    "Sec-WebSocket-Version: 13",
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                ],
            ),
        )
        .then(json("POST /shop", &[SHOP]))
        .h1_only("no Upgrade in HTTP/2 (RFC 9113 §8.6)"),
        // h2c smuggling: the same with an HTTP/2 cleartext upgrade.
        spelling(
            "GET /products + Upgrade: h2c, POST /shop through the tunnel",
            bare(
                "GET /products",
                &[
                    SHOP,
                    "Connection: Upgrade, HTTP2-Settings",
                    "Upgrade: h2c",
                    "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
                ],
            ),
        )
        .then(json("POST /shop", &[SHOP]))
        .h1_only("no Upgrade in HTTP/2 (RFC 9113 §8.6)"),
        // CONNECT, then a POST /shop: through a tunnel if the gateway opens
        // one, as the next request if it does not.
        spelling(
            "CONNECT shop.example:80, then POST /shop",
            bare(
                "CONNECT shop.example:80",
                &["Host: shop.example:80", "Connection: keep-alive"],
            ),
        )
        .then(json("POST /shop", &[SHOP]))
        .h1_only("CONNECT over HTTP/2 is tests/http2.rs's case; a stream is never read as a next request"),
        // ---- DELETE /orders/{orderId} ----
        // Rails (Rack::MethodOverride), Laravel, Symfony: `_method` in an
        // urlencoded POST body.
        spelling(
            "POST /orders/7, form _method=DELETE",
            form("POST /orders/7", &[SHOP], "_method=DELETE"),
        ),
        // The same in a multipart form.
        spelling(
            "POST /orders/7, multipart _method=DELETE",
            request(
                "POST /orders/7",
                &[SHOP],
                Some(("multipart/form-data; boundary=XyZ", multipart)),
            ),
        ),
        // PHP ends a multipart part's name at a NUL too.
        spelling(
            "POST /orders/7, multipart _method\\0x=DELETE",
            request(
                "POST /orders/7",
                &[SHOP],
                Some((
                    "multipart/form-data; boundary=XyZ",
                    "--XyZ\r\ncontent-disposition: form-data; name=\"_method\0x\"\r\n\r\nDELETE\r\n--XyZ--\r\n",
                )),
            ),
        ),
        // Express's method-override('_method') (POST only, its default),
        // Laravel, Symfony: `_method` in the query.
        spelling(
            "POST /orders/7?_method=DELETE",
            json("POST /orders/7?_method=DELETE", &[SHOP]),
        ),
        // PHP registers names as C strings: `_method%00x` is `_method` to
        // Laravel and Symfony, in the query and in a form body.
        spelling(
            "POST /orders/7?_method%00x=DELETE",
            json("POST /orders/7?_method%00x=DELETE", &[SHOP]),
        ),
        spelling(
            "POST /orders/7, form _method%00x=DELETE",
            form("POST /orders/7", &[SHOP], "_method%00x=DELETE"),
        ),
        // method-override with a req.body getter (its README's example),
        // behind a JSON body parser.
        spelling(
            "POST /orders/7, JSON _method: DELETE",
            request(
                "POST /orders/7",
                &[SHOP],
                Some(("application/json", r#"{"_method":"DELETE"}"#)),
            ),
        ),
        // Rack's form_data?: a POST without a Content-Type is read as a
        // form, so Rack::MethodOverride finds `_method` in it.
        spelling(
            "POST /orders/7, no Content-Type, _method=DELETE",
            format!(
                "POST /orders/7 HTTP/1.1\r\n{SHOP}\r\n{USER_HEADER}: alice\r\n{PROBE}\r\nconnection: close\r\ncontent-length: 14\r\n\r\n_method=DELETE"
            ),
        ),
        // Laravel's isJson: a Content-Type that merely contains `/json`
        // (`text/json`, or in a parameter) is JSON input, `_method` included.
        spelling(
            "POST /orders/7, Content-Type: text/plain; v=/json, JSON _method: DELETE",
            request(
                "POST /orders/7",
                &[SHOP],
                Some(("text/plain; v=/json", r#"{"_method":"DELETE"}"#)),
            ),
        ),
        spelling(
            "POST /orders/7, Content-Type: text/json, JSON _method: DELETE",
            request(
                "POST /orders/7",
                &[SHOP],
                Some(("text/json", r#"{"_method":"DELETE"}"#)),
            ),
        ),
        // body-parser decodes a JSON body through iconv-lite, which drops a
        // UTF-8 BOM, so method-override reads `_method` behind it.
        spelling(
            "POST /orders/7, JSON _method: DELETE after a UTF-8 BOM",
            request(
                "POST /orders/7",
                &[SHOP],
                Some(("application/json", "\u{feff}{\"_method\":\"DELETE\"}")),
            ),
        ),
        // Express's json({ type: '*/*' }) reads JSON whatever the
        // Content-Type says, or without one.
        spelling(
            "POST /orders/7, Content-Type: text/plain, JSON _method: DELETE",
            request(
                "POST /orders/7",
                &[SHOP],
                Some(("text/plain", r#"{"_method":"DELETE"}"#)),
            ),
        ),
        spelling(
            "POST /orders/7, no Content-Type, JSON _method: DELETE",
            format!(
                "POST /orders/7 HTTP/1.1\r\n{SHOP}\r\n{USER_HEADER}: alice\r\n{PROBE}\r\nconnection: close\r\ncontent-length: 20\r\n\r\n{{\"_method\":\"DELETE\"}}"
            ),
        ),
        // Rack's media type ends at ',' as well as ';' (Rack 2's
        // `\s*[;,]\s*`), so this is a form to Rack::MethodOverride.
        spelling(
            "POST /orders/7, Content-Type: application/x-www-form-urlencoded, text/plain",
            request(
                "POST /orders/7",
                &[SHOP],
                Some((
                    "application/x-www-form-urlencoded, text/plain",
                    "_method=DELETE",
                )),
            ),
        ),
        // PHP ends the media type at a space too (SAPI's content type
        // scan), so Laravel and Symfony read this body as $_POST.
        spelling(
            "POST /orders/7, Content-Type: application/x-www-form-urlencoded text/plain",
            request(
                "POST /orders/7",
                &[SHOP],
                Some((
                    "application/x-www-form-urlencoded text/plain",
                    "_method=DELETE",
                )),
            ),
        ),
        // Go before 1.17 splits a query and a form at ';' too, and
        // gorilla/handlers' HTTPMethodOverrideHandler reads
        // r.FormValue("_method").
        spelling(
            "POST /orders/7?a=1;_method=DELETE",
            json("POST /orders/7?a=1;_method=DELETE", &[SHOP]),
        ),
        spelling(
            "POST /orders/7, form a=1;_method=DELETE",
            form("POST /orders/7", &[SHOP], "a=1;_method=DELETE"),
        ),
        // Express's method-override with `methods: null` (as in the query
        // row above) takes a body's `_method` on any method, not only POST.
        spelling(
            "PUT /orders/7, form _method=DELETE",
            form("PUT /orders/7", &[SHOP], "_method=DELETE"),
        ),
        spelling(
            "PATCH /orders/7, JSON _method: DELETE",
            request(
                "PATCH /orders/7",
                &[SHOP],
                Some(("application/json", r#"{"_method":"DELETE"}"#)),
            ),
        ),
        spelling(
            "GET /shop, form _method=POST",
            form("GET /shop", &[SHOP], "_method=POST"),
        ),
        // ---- GET admin.example /admin/{*rest} ----
        // HEAD is served by the GET handler (Express, Rails, Go, Flask,
        // Spring).
        spelling("HEAD /admin/x", bare("HEAD /admin/x", &[ADMIN])),
        // The same DNS name; nginx and Django drop the trailing dot.
        spelling(
            "GET /admin/x, Host: admin.example.",
            bare("GET /admin/x", &["Host: admin.example."]),
        ),
        // Host names are case-insensitive; virtual hosts ignore the port.
        spelling(
            "GET /admin/x, Host: ADMIN.EXAMPLE:8080",
            bare("GET /admin/x", &["Host: ADMIN.EXAMPLE:8080"]),
        ),
        // Absolute-form names the host when there is no Host header.
        spelling(
            "GET http://admin.example/admin/x, no Host",
            bare("GET http://admin.example/admin/x", &[]),
        )
        .h1_only("absolute-form is HTTP/1.1's: HTTP/2 names the authority in `:authority` (the plain row; a `host` disagreeing with it is tests/http2.rs's)"),
        // RFC 9112: the absolute-form authority wins over Host.
        spelling(
            "GET http://admin.example/admin/x, Host: other.example",
            bare("GET http://admin.example/admin/x", &[OTHER]),
        )
        .h1_only("absolute-form is HTTP/1.1's: HTTP/2 names the authority in `:authority` (the plain row; a `host` disagreeing with it is tests/http2.rs's)"),
        // Servers that take Host over the authority.
        spelling(
            "GET http://other.example/admin/x, Host: admin.example",
            bare("GET http://other.example/admin/x", &[ADMIN]),
        )
        .h1_only("absolute-form is HTTP/1.1's: HTTP/2 names the authority in `:authority` (the plain row; a `host` disagreeing with it is tests/http2.rs's)"),
        // Express (trust proxy), Symfony and Laravel (trusted proxies),
        // Django (USE_X_FORWARDED_HOST).
        spelling(
            "GET /admin/x, Host: other.example, X-Forwarded-Host: admin.example",
            bare("GET /admin/x", &[OTHER, "X-Forwarded-Host: admin.example"]),
        ),
        // RFC 7239 Forwarded: Symfony, Spring's ForwardedHeaderFilter.
        spelling(
            "GET /admin/x, Host: other.example, Forwarded: host=admin.example",
            bare("GET /admin/x", &[OTHER, "Forwarded: host=admin.example"]),
        ),
        // A repeated Host: CGI-style environments keep the last one.
        spelling(
            "GET /admin/x, Host: other.example, Host: admin.example",
            bare("GET /admin/x", &[OTHER, ADMIN]),
        ),
        // Laravel, Symfony, Rack: a POST whose `_method` says GET.
        spelling(
            "POST /admin/x?_method=GET",
            json("POST /admin/x?_method=GET", &[ADMIN]),
        ),
        // ---- PUT /carts/{cartId} ----
        // Rails' `resources` and Laravel's `Route::resource` route PATCH and
        // PUT alike to `update`.
        spelling("PATCH /carts/1", json("PATCH /carts/1", &[SHOP])),
        // ---- no route at all ----
        // The server-wide OPTIONS: nothing may be routed for it.
        spelling("OPTIONS *", bare("OPTIONS *", &[SHOP])).no_route(),
    ]
    .into_iter()
    .chain(unicode_spellings())
    .chain(encoded_semicolon_spellings())
    .chain(encoded_delimiter_spellings())
    .collect()
}

/// Spellings with an encoded `;`: a server that decodes before it strips
/// `;params` (a decoding proxy in front of Tomcat, Spring's `UrlPathHelper`
/// when it decodes first) reads `/shop%3Bx` as `/shop;x`, so `/shop`, while
/// the gateway's key cut only at a literal `;`. Each is refused,
/// `invalid_path`, on every path.
fn encoded_semicolon_spellings() -> Vec<Spelling> {
    vec![
        spelling("POST /shop%3Bx", json("POST /shop%3Bx", &[SHOP])),
        spelling(
            "POST /shop%3bjsessionid=1",
            json("POST /shop%3bjsessionid=1", &[SHOP]),
        ),
        // /x/..;/shop climbs back to /shop once ';' is cut.
        spelling("POST /x/..%3B/shop", json("POST /x/..%3B/shop", &[SHOP])),
        spelling(
            "DELETE /orders%3Bx/7",
            bare("DELETE /orders%3Bx/7", &[SHOP]),
        ),
        spelling("GET /admin%3b/x", bare("GET /admin%3b/x", &[ADMIN])),
    ]
}

/// Spellings with an encoded `?` or `#`: a server that decodes the whole
/// target before it splits off the query (a rewriting proxy in front of
/// it, `decodeURI(req.url)` routers) reads `/shop%3Fx=1` as `/shop`. Each
/// is refused, `invalid_path`, on every path.
fn encoded_delimiter_spellings() -> Vec<Spelling> {
    vec![
        spelling("POST /shop%3Fx=1", json("POST /shop%3Fx=1", &[SHOP])),
        spelling("POST /shop%3f", json("POST /shop%3f", &[SHOP])),
        spelling("POST /shop%23top", json("POST /shop%23top", &[SHOP])),
    ]
}

/// Spellings whose escapes spell something other than plain UTF-8 text in
/// NFKC without whitespace at a segment's ends (issue 19): each is refused,
/// `invalid_path`, on every path.
fn unicode_spellings() -> Vec<Spelling> {
    let post = |path: &'static str| spelling(path, json(&format!("POST {path}"), &[SHOP]));
    vec![
        // Compatibility forms: IIS's best-fit mapping and stacks that
        // fold to NFKC read them as ASCII letters.
        post("/%EF%BD%93hop"),              // fullwidth s
        post("/%F0%9D%90%AChop"),           // mathematical bold s
        post("/%E2%93%A2hop"),              // circled s
        post("/o%EF%AC%80ers"),             // ligature ff
        post("/%CB%A2hop"),                 // modifier (superscript) s
        post("/x/%EF%BC%8E%EF%BC%8E/shop"), // fullwidth full stops
        spelling(
            "POST /\u{FF53}hop (raw UTF-8)",
            json("POST /\u{FF53}hop", &[SHOP]),
        ),
        spelling(
            "DELETE /%EF%BD%8Frders/7",
            bare("DELETE /%EF%BD%8Frders/7", &[SHOP]),
        ),
        // Whitespace at a segment's ends: Spring's trimTokens, routers
        // that trim; invisible characters, which ICU collation ignores.
        post("/shop%20"),
        post("/%20shop"),
        post("/shop%09"),
        post("/shop%C2%A0"),    // no-break space
        post("/shop%E3%80%80"), // ideographic space
        post("/shop%E2%80%8B"), // zero-width space
        post("/%EF%BB%BFshop"), // BOM
        post("/sh%C2%ADop"),    // soft hyphen, inside
        post("/shop%20;jsessionid=1"),
        spelling("DELETE /orders%20/7", bare("DELETE /orders%20/7", &[SHOP])),
        spelling(
            "GET /admin%E2%80%8B/x",
            bare("GET /admin%E2%80%8B/x", &[ADMIN]),
        ),
        // Escapes that are not UTF-8: lenient decoders read overlong forms
        // as what they encode and drop the rest.
        post("/x/%C0%AE%C0%AE/shop"),       // overlong '.'
        post("/x/%E0%80%AE%E0%80%AE/shop"), // overlong '.', three bytes
        post("/%C1%B3hop"),                 // overlong 's'
        post("/shop%80"),                   // lone continuation byte
        post("/shop%E2%82"),                // truncated
        post("/shop%ED%A0%80"),             // surrogate
        post("/shop%F4%90%80%80"),          // beyond U+10FFFF
    ]
}

/// Calls that are no held route under any reading: the control that the
/// permissive upstream does not see held routes everywhere.
fn innocents() -> Vec<Spelling> {
    vec![
        spelling("GET /products", bare("GET /products", &[SHOP])),
        spelling("GET /shop", bare("GET /shop", &[SHOP])),
        spelling("POST /shopping", json("POST /shopping", &[SHOP])),
        spelling("POST /shop/x", json("POST /shop/x", &[SHOP])),
        spelling("POST /orders/7", json("POST /orders/7", &[SHOP])),
        spelling("DELETE /orders", bare("DELETE /orders", &[SHOP])),
        spelling(
            "GET /admin/x, Host: other.example",
            bare("GET /admin/x", &[OTHER]),
        ),
        spelling("GET /administrator", bare("GET /administrator", &[ADMIN])),
    ]
    .into_iter()
    .map(Spelling::no_route)
    .collect()
}

/// The test world, with the permissive upstream behind the gateway.
struct BypassWorld {
    peer: Peer,
    upstream: PermissiveUpstream,
    gateway: TestGateway,
    _shop: ShopHandle,
    /// Over HTTP/2: the gateway listens with TLS (ALPN h2), for this CA.
    tls: Option<front::Tls>,
}

impl BypassWorld {
    async fn start() -> Self {
        Self::start_over(Proto::Http1).await
    }

    /// The world for `proto`: a plain listener for HTTP/1.1 as ever, TLS
    /// with HTTP/2 by ALPN for HTTP/2; the same upstream, policies and peer.
    async fn start_over(proto: Proto) -> Self {
        let tls = (proto == Proto::Http2).then(front::Tls::new);
        let peer = Peer::start();
        let shop = start_shop(&peer).await;
        let upstream = PermissiveUpstream::start(&peer.issuer, peer.jwks_uri()).await;
        let gateway = TestGateway::start(
            &peer,
            &shop,
            GatewayOptions {
                default_action: "pass",
                extra_policies: ADMIN_POLICY,
                upstream: Some(upstream.addr.to_string()),
                // The upstream routes by the Host the agent sent.
                preserve_host: true,
                // Every held spelling is held, not turned away by the per-person limit.
                limits: "{ max_body_bytes: 1024, max_hold: 60s, max_pending_per_user: 100 }",
                listen_tls: tls.as_ref().map(|t| t.listen.clone()),
                ..Default::default()
            },
        )
        .await;
        Self {
            peer,
            upstream,
            gateway,
            _shop: shop,
            tls,
        }
    }

    /// Sends every spelling over `proto` at once; their answers in order
    /// (HTTP/1.1's raw, HTTP/2's as `HTTP/2 <status>` and the body), `None`
    /// for rows HTTP/2 cannot carry.
    async fn send_all(&self, proto: Proto, spellings: &[Spelling]) -> Vec<Option<String>> {
        let Some(tls) = &self.tls else {
            assert_eq!(proto, Proto::Http1);
            return send_all(self.gateway.proxy, spellings)
                .await
                .into_iter()
                .map(Some)
                .collect();
        };
        let config = tls.h2_config();
        let proxy = self.gateway.proxy;
        let calls: Vec<_> = spellings
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let call = s.h2_call(i);
                let config = config.clone();
                tokio::spawn(async move {
                    let call = call?;
                    let answer = front::h2_call(config, proxy, &call, CLIENT_TIMEOUT).await;
                    Some(h2_answer(answer))
                })
            })
            .collect();
        let mut answers = Vec::new();
        for call in calls {
            answers.push(call.await.unwrap());
        }
        answers
    }
}

/// An HTTP/2 answer written like a raw HTTP/1.1 one, for [`statuses`].
fn h2_answer(answer: Result<(u16, serde_json::Value), String>) -> String {
    match answer {
        Ok((status, body)) => format!("HTTP/2 {status} \r\n\r\n{body}"),
        Err(why) => why,
    }
}

/// Whether `answer` is a 400 problem `invalid_path`, over either protocol.
fn invalid_path(answer: &str) -> bool {
    (answer.starts_with("HTTP/1.1 400") || answer.starts_with("HTTP/2 400"))
        && answer.contains(r#""code":"invalid_path""#)
}

impl BypassWorld {
    /// Denies every request still pending: nobody approves in these tests.
    async fn deny_pending(&self) {
        for request in self.peer.requests().await {
            if request["status"] == "pending" {
                let id = request["auth_req_id"].as_str().unwrap();
                self.peer.deny(id).await;
            }
        }
    }
}

/// A raw exchange that tolerates no answer: `request`, then (once an
/// answer's head arrived) `then`; whatever came back within the timeout.
fn exchange(addr: SocketAddr, request: &str, then: Option<&str>) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(CLIENT_TIMEOUT)).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut then = then;
    loop {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => response.extend_from_slice(&chunk[..n]),
        }
        if response.windows(4).any(|w| w == b"\r\n\r\n") {
            if let Some(bytes) = then.take() {
                if stream.write_all(bytes.as_bytes()).is_err() {
                    break;
                }
            }
        }
    }
    String::from_utf8_lossy(&response).into_owned()
}

/// The status lines of a raw answer, or "no answer".
fn statuses(response: &str) -> String {
    let lines: Vec<&str> = response
        .split("\r\n")
        .filter(|l| l.starts_with("HTTP/1.") || l.starts_with("HTTP/2 "))
        .map(|l| {
            l.get(if l.starts_with("HTTP/2") { 7 } else { 9 }..)
                .unwrap_or(l)
        })
        .collect();
    if lines.is_empty() {
        "no answer (held?)".to_owned()
    } else {
        lines.join(", ")
    }
}

/// The spelling an arrival belongs to, by its probe tag.
fn probe(offence: &Offence) -> Option<usize> {
    offence.arrival.header("x-probe")?.parse().ok()
}

fn report(spellings: &[Spelling], offences: &[Offence]) -> String {
    offences
        .iter()
        .map(|o| {
            let name = probe(o)
                .and_then(|i| spellings.get(i))
                .map_or("(untagged)", |s| s.name);
            format!("- {name}:\n  {o}\n")
        })
        .collect()
}

/// Sends every spelling to `addr` at once; their answers, in order.
async fn send_all(addr: SocketAddr, spellings: &[Spelling]) -> Vec<String> {
    let calls: Vec<_> = spellings
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let (request, then) = s.tagged(i);
            tokio::task::spawn_blocking(move || exchange(addr, &request, then.as_deref()))
        })
        .collect();
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.unwrap());
    }
    answers
}

/// The control: asked directly, the permissive upstream routes every
/// spelling to a held route, and the innocent calls to none. Without this,
/// a passing bypass test could merely mean the upstream failed to see what
/// it was sent.
#[tokio::test]
async fn the_permissive_upstream_routes_every_spelling_to_a_held_route() {
    let jwks: url::Url = "http://127.0.0.1:9/jwks".parse().unwrap();
    let upstream = PermissiveUpstream::start("http://127.0.0.1:9", jwks).await;
    let mut spellings = spellings();
    spellings.extend(innocents());
    send_all(upstream.addr, &spellings).await;
    let offences = upstream.unapproved_arrivals(HELD);
    let caught: Vec<usize> = offences.iter().filter_map(probe).collect();
    let missed: Vec<&str> = spellings
        .iter()
        .enumerate()
        .filter(|(i, s)| s.reaches_held != caught.contains(i))
        .map(|(_, s)| s.name)
        .collect();
    assert!(
        missed.is_empty(),
        "read other than the table says: {missed:#?}\n{}",
        report(&spellings, &offences)
    );
}

#[tokio::test]
async fn no_spelling_of_a_held_route_reaches_the_upstream_unapproved() {
    no_spelling_reaches_the_upstream_unapproved(Proto::Http1).await;
}

/// The same rows over HTTP/2 (TLS, ALPN h2), but those HTTP/2 cannot carry.
#[tokio::test]
async fn no_spelling_of_a_held_route_reaches_the_upstream_unapproved_over_http2() {
    no_spelling_reaches_the_upstream_unapproved(Proto::Http2).await;
}

async fn no_spelling_reaches_the_upstream_unapproved(proto: Proto) {
    let world = BypassWorld::start_over(proto).await;
    let spellings = spellings();
    let answers = world.send_all(proto, &spellings).await;
    let sent = answers.iter().flatten().count();
    eprintln!("{proto:?}: {sent} of {} spellings sent", spellings.len());
    world.deny_pending().await;
    // Let anything already on its way arrive.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let offences = world.upstream.unapproved_arrivals(HELD);
    let caught: Vec<usize> = offences.iter().filter_map(probe).collect();
    for (i, (s, answer)) in spellings.iter().zip(&answers).enumerate() {
        let Some(answer) = answer else { continue };
        let verdict = if caught.contains(&i) {
            "GOT THROUGH"
        } else {
            "ok"
        };
        eprintln!("{verdict:>11}  {:<70} {}", s.name, statuses(answer));
    }
    assert!(
        offences.is_empty(),
        "{} calls reached a held route without an approval:\n{}",
        offences.len(),
        report(&spellings, &offences)
    );
}

/// Each spelling of issue 19, and each encoded `;`, is refused with
/// `invalid_path` (on every path: the gateway cannot know what an upstream
/// aliases) and nothing of it arrives upstream, held route or not.
#[tokio::test]
async fn unicode_invalid_utf8_and_encoded_semicolon_spellings_are_refused_as_invalid_path() {
    refused_as_invalid_path(Proto::Http1).await;
}

#[tokio::test]
async fn unicode_invalid_utf8_and_encoded_semicolon_spellings_are_refused_as_invalid_path_over_http2(
) {
    refused_as_invalid_path(Proto::Http2).await;
}

async fn refused_as_invalid_path(proto: Proto) {
    let world = BypassWorld::start_over(proto).await;
    let mut spellings = unicode_spellings();
    spellings.extend(encoded_semicolon_spellings());
    let answers = world.send_all(proto, &spellings).await;
    world.deny_pending().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let wrong: Vec<String> = spellings
        .iter()
        .zip(&answers)
        .filter_map(|(s, answer)| match answer {
            Some(answer) if invalid_path(answer) => None,
            Some(answer) => Some(format!("{}: {}", s.name, statuses(answer))),
            None => Some(format!("{}: not sent over {proto:?}", s.name)),
        })
        .collect();
    let arrived: Vec<String> = world
        .upstream
        .received()
        .iter()
        .map(|a| a.request_line.clone())
        .collect();
    assert!(
        wrong.is_empty() && arrived.is_empty(),
        "not refused as invalid_path: {wrong:#?}\nreached the upstream: {arrived:#?}"
    );
}

/// The control: text in NFC and a space inside a segment are legitimate
/// paths, forwarded as sent.
#[tokio::test]
async fn paths_in_nfc_and_inner_spaces_pass_unchanged() {
    nfc_and_inner_spaces_pass_unchanged(Proto::Http1).await;
}

#[tokio::test]
async fn paths_in_nfc_and_inner_spaces_pass_unchanged_over_http2() {
    nfc_and_inner_spaces_pass_unchanged(Proto::Http2).await;
}

/// Sends `row` alone over `proto`: its answer.
async fn send_one(world: &BypassWorld, proto: Proto, row: Spelling) -> String {
    let answers = world.send_all(proto, std::slice::from_ref(&row)).await;
    answers
        .into_iter()
        .next()
        .flatten()
        .unwrap_or_else(|| panic!("{}: not sent over {proto:?}", row.name))
}

async fn nfc_and_inner_spaces_pass_unchanged(proto: Proto) {
    let world = BypassWorld::start_over(proto).await;
    let targets = [
        "/caf%C3%A9",
        "/files/my%20doc",
        "/%E6%9D%B1%E4%BA%AC/%E2%82%AC",
    ];
    for target in targets {
        let row = spelling("pass", bare(&format!("GET {target}"), &[SHOP]));
        let answer = send_one(&world, proto, row).await;
        assert!(statuses(&answer).starts_with("200"), "{target}: {answer}");
    }
    let received: Vec<String> = world
        .upstream
        .received()
        .iter()
        .map(|a| a.target.clone())
        .collect();
    assert_eq!(received, targets);
}

/// A pass-through call whose target the gateway rewrites (`//products`
/// is forwarded as `/products`) keeps the host the gateway decided on: over
/// HTTP/2 the host is `:authority`, which the rewritten origin-form target
/// no longer carries, and an upstream that reads `Host` (virtual hosts, and
/// this one, `preserve_host`) must not see it empty.
#[tokio::test]
async fn a_rewritten_target_keeps_its_host() {
    rewritten_target_keeps_its_host(Proto::Http1).await;
}

#[tokio::test]
async fn a_rewritten_target_keeps_its_host_over_http2() {
    rewritten_target_keeps_its_host(Proto::Http2).await;
}

async fn rewritten_target_keeps_its_host(proto: Proto) {
    let world = BypassWorld::start_over(proto).await;
    let rows = [spelling("GET //products", bare("GET //products", &[SHOP])).no_route()];
    let answers = world.send_all(proto, &rows).await;
    let answer = answers[0].as_deref().unwrap();
    assert!(statuses(answer).starts_with("200"), "{answer}");
    let received = world.upstream.received();
    let arrivals: Vec<(String, Vec<String>)> = received
        .iter()
        .map(|a| {
            let hosts = a.header_values("host").map(str::to_owned).collect();
            (a.target.clone(), hosts)
        })
        .collect();
    assert_eq!(
        arrivals,
        [("/products".to_owned(), vec!["shop.example".to_owned()])],
        "{proto:?}"
    );
}

/// Headers the gateway owns never reach the upstream from the agent: not a
/// forged approval id, not the header that names the user.
#[tokio::test]
async fn pass_through_calls_carry_no_forged_approval_id_or_identity_header() {
    no_forged_gateway_headers(Proto::Http1).await;
}

#[tokio::test]
async fn pass_through_calls_carry_no_forged_approval_id_or_identity_header_over_http2() {
    no_forged_gateway_headers(Proto::Http2).await;
}

async fn no_forged_gateway_headers(proto: Proto) {
    let world = BypassWorld::start_over(proto).await;
    // `request` adds the identity header.
    let forged = [
        "x-countersign-approval-id: forged",
        // Read as the same headers by CGI-style servers (Puma, PHP).
        "x_countersign_approval_id: forged",
        "X_Countersign_User: eve",
        SHOP,
    ];
    let calls = [bare("GET /products", &forged), json("POST /cart", &forged)];
    for call in calls {
        let answer = send_one(&world, proto, spelling("pass", call)).await;
        assert!(statuses(&answer).starts_with("200"), "{answer}");
    }
    let received = world.upstream.received();
    assert_eq!(received.len(), 2, "both calls passed");
    let leaks: Vec<String> = received
        .iter()
        .flat_map(|arrival| {
            arrival
                .headers
                .iter()
                .map(|(name, _)| name)
                .filter(|name| {
                    let name = support::permissive::dashed(name);
                    name == "x-countersign-approval-id" || name == USER_HEADER
                })
                .map(|name| format!("{name} reached the upstream on {:?}", arrival.request_line))
        })
        .collect();
    assert!(leaks.is_empty(), "{leaks:#?}");
}

/// `_method=DELETE` in a gzipped form: Express's body parsers inflate it
/// before method-override reads `req.body._method`, while the gateway would
/// see no field at all. Refused on a path a policy covers.
#[tokio::test]
async fn an_encoded_post_body_on_a_covered_path_is_refused() {
    let world = BypassWorld::start().await;
    const GZIPPED: [u8; 34] = [
        31, 139, 8, 0, 0, 0, 0, 0, 2, 3, 139, 207, 77, 45, 201, 200, 79, 177, 117, 113, 245, 113,
        13, 113, 5, 0, 101, 252, 38, 176, 14, 0, 0, 0,
    ];
    let response = reqwest::Client::new()
        .post(format!("http://{}/orders/7", world.gateway.proxy))
        .header("host", "shop.example")
        .header(USER_HEADER, "alice")
        .header("content-type", "application/x-www-form-urlencoded")
        .header("content-encoding", "gzip")
        .body(GZIPPED.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["code"], "invalid_body", "{body}");
    assert!(
        world.upstream.received().is_empty(),
        "it reached the upstream"
    );
}

/// The same gzipped `_method=DELETE` form over HTTP/2.
#[tokio::test]
async fn an_encoded_post_body_on_a_covered_path_is_refused_over_http2() {
    let world = BypassWorld::start_over(Proto::Http2).await;
    const GZIPPED: [u8; 34] = [
        31, 139, 8, 0, 0, 0, 0, 0, 2, 3, 139, 207, 77, 45, 201, 200, 79, 177, 117, 113, 245, 113,
        13, 113, 5, 0, 101, 252, 38, 176, 14, 0, 0, 0,
    ];
    let call = front::Call {
        method: "POST".to_owned(),
        target: "/orders/7".to_owned(),
        headers: [
            ("host", "shop.example"),
            (USER_HEADER, "alice"),
            ("content-type", "application/x-www-form-urlencoded"),
            ("content-encoding", "gzip"),
        ]
        .map(|(n, v)| (n.to_owned(), v.to_owned()))
        .to_vec(),
        body: GZIPPED.to_vec(),
    };
    let tls = world.tls.as_ref().unwrap();
    let (status, body) =
        front::h2_call(tls.h2_config(), world.gateway.proxy, &call, CLIENT_TIMEOUT)
            .await
            .unwrap();
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["code"], "invalid_body", "{body}");
    assert!(
        world.upstream.received().is_empty(),
        "it reached the upstream"
    );
}

/// An approved call over HTTP/2 reaches an upstream with `preserve_host`
/// with the host it was decided and approved for (`:authority`), as it
/// does over HTTP/1.1 with the agent's `Host`: not the upstream's own
/// address, which a virtual-hosting upstream could route elsewhere.
#[tokio::test]
async fn an_approved_call_keeps_its_host_over_http2() {
    let world = BypassWorld::start_over(Proto::Http2).await;
    let call = spelling("POST /shop", json("POST /shop", &[SHOP]))
        .h2_call(0)
        .unwrap();
    let config = world.tls.as_ref().unwrap().h2_config();
    let proxy = world.gateway.proxy;
    let answer =
        tokio::spawn(
            async move { front::h2_call(config, proxy, &call, Duration::from_secs(30)).await },
        );
    let pending = world.peer.wait_pending(Some("alice"), 1).await;
    let id = pending[0]["auth_req_id"].as_str().unwrap();
    world.peer.approve(id).await;
    let (status, body) = answer.await.unwrap().unwrap();
    assert_eq!(status, 200, "{body}");
    let received = world.upstream.received();
    let arrivals: Vec<(String, Vec<&str>, bool)> = received
        .iter()
        .map(|a| {
            let hosts = a.header_values("host").collect();
            (a.target.clone(), hosts, a.token_verified)
        })
        .collect();
    assert_eq!(arrivals, [("/shop".to_owned(), vec!["shop.example"], true)]);
}
