//! What you see is what you sign: calls that a permissive API could read
//! differently from the approval message are refused before anyone is
//! asked. Each attack goes through the real gateway; the CIBA peer must
//! receive no backchannel request and the shop nothing.

mod support;

use std::ops::Deref;
use std::time::Duration;

use serde_json::{json, Value};
use support::front::{self, Proto};
use support::*;

/// A policy that shows a query parameter.
const REFUND: &str = r#"  - name: refund
    match: { methods: [POST], path: /refunds }
    require: { scopes: [product:buy], audience: https://shop.example/api }
    binding_message: "Refund {{query.amount}} EUR"
  - name: report
    match: { methods: [GET], path: /reports }
    require: { scopes: [product:buy], audience: https://shop.example/api }
    binding_message: "Send the report of {{query.year}}"
"#;

/// The world of one protocol: the plain listener and reqwest over
/// HTTP/1.1 as ever, or a TLS listener (ALPN h2) and reqwest speaking only
/// HTTP/2; the same policies, peer and shop.
struct ProtoWorld {
    world: World,
    proto: Proto,
    base: String,
    tls: Option<front::Tls>,
}

impl Deref for ProtoWorld {
    type Target = World;
    fn deref(&self) -> &World {
        &self.world
    }
}

impl ProtoWorld {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// POST /shop as an agent acting for `user`.
    fn buy(&self, user: &str, body: Value) -> reqwest::RequestBuilder {
        self.agent
            .post(self.url("/shop"))
            .header(USER_HEADER, user)
            .json(&body)
    }
}

async fn world(proto: Proto) -> ProtoWorld {
    let tls = (proto == Proto::Http2).then(front::Tls::new);
    let mut world = World::builder()
        .policies(REFUND)
        .listen_tls(tls.as_ref().map(|t| t.listen.clone()))
        .start()
        .await;
    let proxy = world.gateway.proxy;
    let base = match &tls {
        Some(tls) => {
            world.agent = tls.reqwest_h2(proxy);
            tls.base(proxy)
        }
        None => format!("http://{proxy}"),
    };
    ProtoWorld {
        world,
        proto,
        base,
        tls,
    }
}

/// Each case once per protocol, in a world of its own: `<case>::http1`
/// and `<case>::http2`.
macro_rules! over_both {
    ($($case:ident),* $(,)?) => {
        $(
            mod $case {
                #[tokio::test]
                async fn http1() {
                    super::$case(super::world(super::Proto::Http1).await).await;
                }

                #[tokio::test]
                async fn http2() {
                    super::$case(super::world(super::Proto::Http2).await).await;
                }
            }
        )*
    };
}

/// POST `path` as an agent for alice, with exactly these body bytes.
async fn post(
    world: &ProtoWorld,
    path: &str,
    content_type: Option<&str>,
    body: &str,
) -> reqwest::Response {
    let mut request = world
        .agent
        .post(world.url(path))
        .header(USER_HEADER, "alice")
        .body(body.to_owned());
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    request.send().await.unwrap()
}

async fn buy_raw(world: &ProtoWorld, content_type: &str, body: &str) -> reqwest::Response {
    post(world, "/shop", Some(content_type), body).await
}

/// Asserts a 400 problem with `code` whose detail contains every one of
/// `words`, and that nobody was asked and nothing was forwarded.
async fn refused(world: &ProtoWorld, response: reqwest::Response, code: &str, words: &[&str]) {
    let version = match world.proto {
        Proto::Http1 => reqwest::Version::HTTP_11,
        Proto::Http2 => reqwest::Version::HTTP_2,
    };
    assert_eq!(response.version(), version);
    assert_eq!(response.status().as_u16(), 400);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], code, "{body}");
    let detail = body["detail"].as_str().unwrap();
    for word in words {
        assert!(detail.contains(word), "{word:?} not in {detail:?}");
    }
    assert!(
        world.peer.requests().await.is_empty(),
        "the person was asked"
    );
    assert!(world.shop.received().is_empty(), "the shop received a call");
}

async fn json_sent_as_a_form_is_refused(world: ProtoWorld) {
    // A form-reading API sees qty=100 in this body; the message would say 2.
    let body = r#"{"product":"XYZ phone","qty":2,"priceLimit":"=1&qty=100"}"#;
    for content_type in [
        "application/x-www-form-urlencoded",
        "text/plain",
        "application/json; charset=iso-8859-1",
    ] {
        let response = buy_raw(&world, content_type, body).await;
        refused(
            &world,
            response,
            "invalid_body",
            &["Content-Type: application/json"],
        )
        .await;
    }
    let response = post(&world, "/shop", None, body).await;
    refused(
        &world,
        response,
        "invalid_body",
        &["without a Content-Type"],
    )
    .await;

    let (status, response) = match &world.tls {
        None => {
            let request = format!(
                "POST /shop HTTP/1.1\r\nHost: shop\r\n{USER_HEADER}: alice\r\nContent-Type: application/json\r\n\
                 Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            send_raw(world.gateway.proxy, request).await
        }
        // Two `content-type` fields on one HTTP/2 request.
        Some(tls) => {
            let call = front::Call {
                method: "POST".to_owned(),
                target: "/shop".to_owned(),
                headers: [
                    (USER_HEADER, "alice"),
                    ("content-type", "application/json"),
                    ("content-type", "application/x-www-form-urlencoded"),
                ]
                .map(|(n, v)| (n.to_owned(), v.to_owned()))
                .to_vec(),
                body: body.as_bytes().to_vec(),
            };
            let timeout = Duration::from_secs(30);
            let (status, problem) =
                front::h2_call(tls.h2_config(), world.gateway.proxy, &call, timeout)
                    .await
                    .unwrap();
            (status, problem.to_string())
        }
    };
    assert_eq!(status, 400, "{response}");
    assert!(response.contains("invalid_body"), "{response}");
    assert!(
        response.contains("more than one Content-Type"),
        "{response}"
    );
    assert!(world.peer.requests().await.is_empty());
    assert!(world.shop.received().is_empty());
}

async fn keys_that_differ_only_in_case_are_refused(world: ProtoWorld) {
    let body = r#"{"product":"XYZ phone","qty":1,"QTY":100,"priceLimit":900}"#;
    let response = buy_raw(&world, "application/json", body).await;
    refused(&world, response, "invalid_body", &["'qty' and 'QTY'"]).await;
    // The Kelvin sign folds to k, as in Go's encoding/json.
    let body = "{\"product\":\"XYZ phone\",\"qty\":1,\"priceLimit\":900,\"\u{212A}\":1,\"k\":2}";
    let response = buy_raw(&world, "application/json", body).await;
    refused(
        &world,
        response,
        "invalid_body",
        &["differ only in letter case"],
    )
    .await;
}

async fn repeated_keys_and_inexact_numbers_are_refused(world: ProtoWorld) {
    let body = r#"{"product":"XYZ phone","qty":1,"qty":100,"priceLimit":900}"#;
    let response = buy_raw(&world, "application/json", body).await;
    refused(
        &world,
        response,
        "invalid_body",
        &["'qty' appears more than once"],
    )
    .await;
    let body = r#"{"product":"XYZ phone","qty":9007199254740993,"priceLimit":900}"#;
    let response = buy_raw(&world, "application/json", body).await;
    refused(&world, response, "invalid_body", &["2^53", "'qty'"]).await;
}

async fn a_repeated_query_parameter_is_refused(world: ProtoWorld) {
    // Go, Flask and Spring read the first value; others the last.
    for (query, word) in [
        ("amount=100&amount=1", "'amount' is given more than once"),
        ("amount=1&AMOUNT=100", "'amount' is given more than once"),
        ("amount=1&amoun%74=100", "'amount' is given more than once"),
        ("amount=1;amount=100", "';'"),
        // PHP ends a parameter name at a NUL: `amount%00x` is `amount`.
        (
            "amount=1&amount%00x=100",
            "'amount' is given more than once",
        ),
    ] {
        let response = post(&world, &format!("/refunds?{query}"), None, "").await;
        refused(&world, response, "invalid_query", &[word]).await;
    }
    // A twin of a parameter the message does not show is no one's concern.
    let twins = world
        .agent
        .post(world.url("/refunds?amount=5&note=a&note=b"))
        .header(USER_HEADER, "alice");
    let asked = world.asked_and_denied("alice", twins).await;
    assert_eq!(asked["binding_message"], "Refund 5 EUR");
}

async fn values_the_message_cannot_show_are_refused_not_blanked(world: ProtoWorld) {
    let buy = |qty: Value, product: &str| {
        world
            .buy(
                "alice",
                json!({"product": product, "qty": qty, "priceLimit": 900}),
            )
            .send()
    };
    // Arabic-Indic 100: Python's int(), Java and Jackson read it as 100.
    let response = buy(json!("\u{0661}\u{0660}\u{0660}"), "XYZ phone")
        .await
        .unwrap();
    refused(
        &world,
        response,
        "invalid_binding_message",
        &["'qty'", "U+0661"],
    )
    .await;
    for (product, character) in [
        ("XYZ \u{0440}hone", "U+0440"),  // Cyrillic er
        ("XYZ phone\u{202E}", "U+202E"), // right-to-left override
        ("XYZ\u{00A0}phone", "U+00A0"),  // no-break space
        ("phone!", "U+0021"),
        // Look-alikes by compatibility only: shown as "XYZ phone", they
        // name another product to the API (one an attacker may list).
        ("\u{FF38}YZ phone", "U+FF38"),   // fullwidth X
        ("\u{1D417}YZ phone", "U+1D417"), // mathematical bold X
        ("\u{24CD}YZ phone", "U+24CD"),   // circled X
        ("XYZ pho\u{FB00}", "U+FB00"),    // the ligature ff
    ] {
        let response = buy(json!(2), product).await.unwrap();
        refused(
            &world,
            response,
            "invalid_binding_message",
            &["'product'", character],
        )
        .await;
    }
    for qty in [json!(null), json!(""), json!("  "), json!([2])] {
        let response = buy(qty, "XYZ phone").await.unwrap();
        refused(&world, response, "invalid_body", &["'qty'"]).await;
    }
}

async fn body_fields_the_person_is_not_shown_are_refused(world: ProtoWorld) {
    let response = world
        .buy(
            "alice",
            json!({"product": "XYZ phone", "qty": 2, "priceLimit": 900, "giftTo": "mallory"}),
        )
        .send()
        .await
        .unwrap();
    refused(&world, response, "invalid_body", &["'giftTo'", "'product'"]).await;
    let response = buy_raw(
        &world,
        "application/json",
        r#"[{"product":"XYZ phone","qty":2}]"#,
    )
    .await;
    refused(&world, response, "invalid_body", &["JSON object"]).await;
}

async fn a_clean_call_is_held_with_the_message_it_will_do(world: ProtoWorld) {
    let call = world.buy(
        "alice",
        json!({"product": "Caf\u{00E9} phone", "qty": 2, "priceLimit": 900}),
    );
    let request = world.asked_and_denied("alice", call).await;
    // The accent is dropped in the message; the details keep the exact value.
    assert_eq!(
        request["binding_message"],
        "Do you want to buy 2 Cafe phone"
    );
    assert_eq!(
        without_binding(&request["authorization_details"]),
        json!([{"type": "product_purchase", "product": "Caf\u{00E9} phone", "quantity": 2, "price_limit": 900}])
    );
    assert!(world.shop.received().is_empty());
}

/// DELETE each of `paths` as alice: each is refused with `code`, its
/// detail naming every one of `words`.
async fn deletes_refused(world: &ProtoWorld, paths: &[&str], code: &str, words: &[&str]) {
    for path in paths {
        let response = world
            .agent
            .delete(world.url(path))
            .header(USER_HEADER, "alice")
            .send()
            .await
            .unwrap();
        refused(world, response, code, words).await;
    }
}

/// GET `/reports?year=2026` as alice with this body.
fn report_with_body(world: &ProtoWorld, content_type: Option<&str>) -> reqwest::RequestBuilder {
    let request = world
        .agent
        .get(world.url("/reports?year=2026"))
        .header(USER_HEADER, "alice");
    match content_type {
        Some(content_type) => request.header("content-type", content_type),
        None => request,
    }
}

/// POST `path` as alice with a JSON body and extra headers.
async fn post_json(
    world: &ProtoWorld,
    method: reqwest::Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Value,
) -> reqwest::Response {
    let mut request = world
        .agent
        .request(method, world.url(path))
        .header(USER_HEADER, "alice")
        .json(&body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap()
}

async fn a_shown_value_given_again_in_another_part_is_refused(world: ProtoWorld) {
    let order = json!({"product": "XYZ phone", "qty": 2, "priceLimit": 900});
    // Rails' params lets the query win over the body, PHP's $_REQUEST a
    // cookie, and PHP and qs read `qty[]` and ` qty` as `qty`: the person
    // would approve 2 while the shop buys 100.
    for (path, headers, other) in [
        ("/shop?qty=100", &[][..], "the query"),
        ("/shop?QTY=100", &[], "the query"),
        ("/shop?qty[]=100", &[], "the query"),
        ("/shop?%20qty=100", &[], "the query"),
        // Rack 2 (Rails 7.0) and Go before 1.17 split a query at `;` too.
        ("/shop?ref=1;qty=100", &[], "the query"),
        ("/shop?product=ABC%20tablet", &[], "the query"),
        ("/shop", &[("cookie", "session=1; qty=100")], "a cookie"),
    ] {
        let response = post_json(&world, reqwest::Method::POST, path, headers, order.clone()).await;
        refused(
            &world,
            response,
            "ambiguous_parameter",
            &["shown to the person from the body", other],
        )
        .await;
    }
    // A query the message reads may not be given twice as `amount[]` (nor
    // in a body: the next case).
    let response = post(&world, "/refunds?amount=5&amount[]=5000", None, "").await;
    refused(&world, response, "invalid_query", &["more than once"]).await;
    // A path parameter shown may not be given again in the query.
    let response = post_json(
        &world,
        reqwest::Method::DELETE,
        "/orders/7?orderId=8",
        &[],
        json!({}),
    )
    .await;
    refused(
        &world,
        response,
        "ambiguous_parameter",
        &[
            "'orderId' is shown to the person from the path",
            "the query",
        ],
    )
    .await;
    // Names that are not shown may appear anywhere.
    let unshown = world
        .agent
        .post(world.url("/shop?ref=newsletter"))
        .header(USER_HEADER, "alice")
        .header("cookie", "session=1")
        .json(&order);
    let asked = world.asked_and_denied("alice", unshown).await;
    assert_eq!(asked["binding_message"], "Do you want to buy 2 XYZ phone");
}

async fn a_shown_query_value_given_again_in_a_body_of_any_type_is_refused(world: ProtoWorld) {
    // Laravel reads JSON when the Content-Type merely contains `/json`,
    // Express's json({ type: '*/*' }) and FastAPI (no Content-Type) read any
    // JSON body, and Rack reads a POST body without a Content-Type as a
    // form: each could refund 5000 while the person approved 5.
    for (content_type, body) in [
        (Some("text/plain"), r#"{"amount":5000}"#),
        (Some("text/plain; v=/json"), r#"{"amount":5000}"#),
        (Some("text/json"), r#"{"AMOUNT":5000}"#),
        (None, r#"{"amount":5000}"#),
        (None, "amount=5000"),
        // A form body, declared: Laravel's input() lets the body win.
        (Some("application/x-www-form-urlencoded"), "amount=5000"),
        // Rack's media type ends at ',' too: a form to Rails.
        (
            Some("application/x-www-form-urlencoded, text/plain"),
            "amount=5000",
        ),
        // Go before 1.17 splits a form at ';' too, and r.FormValue lets
        // the body win over the query.
        (Some("application/x-www-form-urlencoded"), "x=1;amount=5000"),
        // PHP's at a space: a form to Laravel.
        (
            Some("application/x-www-form-urlencoded text/plain"),
            "amount=5000",
        ),
        // body-parser (iconv-lite) drops a UTF-8 BOM, .NET's readers skip
        // one; Python's json reads NaN, others comments and trailing commas.
        (Some("application/json"), "\u{feff}{\"amount\":5000}"),
        (None, "\u{feff}{\"amount\":5000}"),
        (Some("text/plain"), r#"{"note": NaN, "amount": 5000}"#),
        (Some("text/plain"), r#"{"amount": 5000, /* x */}"#),
        // PHP ends a name at a NUL, and Laravel's input() lets the body win.
        (Some("application/x-www-form-urlencoded"), "amount%00x=5000"),
    ] {
        let response = post(&world, "/refunds?amount=5", content_type, body).await;
        refused(
            &world,
            response,
            "ambiguous_parameter",
            &["from the query", "the body"],
        )
        .await;
    }
    // A GET carries a body too, which Laravel's input() and Rails' params
    // read: declared JSON or not.
    for content_type in [Some("application/json"), Some("text/plain"), None] {
        let request = report_with_body(&world, content_type).body(r#"{"year":1999}"#);
        let response = request.send().await.unwrap();
        refused(
            &world,
            response,
            "ambiguous_parameter",
            &["'year' is shown to the person from the query", "the body"],
        )
        .await;
    }
}

/// httparse accepts `#` in a request target, and Express and WHATWG URL
/// parsers end the query there. Pingora's `http::Uri` drops the fragment
/// before anything reads the target, so the gateway matches, shows and
/// forwards the same `/refunds?note=x`: the amount after `#` is neither
/// shown nor sent, and the call is refused for want of one.
///
/// HTTP/1.1 only: `:path` carries no fragment (RFC 9113 §8.3.1, and the
/// h2 crate's `http::Uri` drops it before sending), so HTTP/2 has no such
/// spelling.
#[tokio::test]
async fn an_amount_after_a_fragment_is_neither_shown_nor_sent() {
    let world = world(Proto::Http1).await;
    let proxy = world.gateway.proxy;
    for target in ["/refunds?note=x#&amount=5", "/refunds#?amount=5"] {
        let request = format!(
            "POST {target} HTTP/1.1\r\nHost: shop.example\r\n{USER_HEADER}: alice\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        );
        let (status, response) = send_raw(proxy, request).await;
        assert_eq!(status, 400, "{target}: {response}");
        assert!(
            response.contains("\"code\":\"invalid_query\"") && response.contains("'amount'"),
            "{target}: {response}"
        );
    }
    assert!(
        world.peer.requests().await.is_empty(),
        "the person was asked"
    );
    assert!(world.shop.received().is_empty(), "the shop received a call");
}

async fn a_decimal_shown_rounded_is_refused(world: ProtoWorld) {
    // serde_json reads the nearest double (3.0); a BigDecimal or Python
    // Decimal API reads 2.9999999999999999 and may truncate it to 2.
    let body = r#"{"product":"XYZ phone","qty":2.9999999999999999,"priceLimit":900}"#;
    let response = buy_raw(&world, "application/json", body).await;
    refused(
        &world,
        response,
        "invalid_body",
        &["2.9999999999999999", "3.0", "nearest double"],
    )
    .await;
}

async fn an_encoded_body_beside_a_shown_value_is_refused(world: ProtoWorld) {
    // {"year":1999}, gzipped: Express's body parsers inflate it, so an API
    // there reads year 1999 where the gateway sees no names at all.
    const GZIPPED: [u8; 33] = [
        31, 139, 8, 0, 0, 0, 0, 0, 2, 3, 171, 86, 170, 76, 77, 44, 82, 178, 50, 180, 180, 180, 172,
        5, 0, 205, 20, 164, 86, 13, 0, 0, 0,
    ];
    let response = report_with_body(&world, Some("application/json"))
        .header("content-encoding", "gzip")
        .body(GZIPPED.to_vec())
        .send()
        .await
        .unwrap();
    refused(
        &world,
        response,
        "invalid_body",
        &["Content-Encoding", "'gzip'"],
    )
    .await;
}

async fn a_body_on_a_delete_whose_approval_shows_none_is_refused(world: ProtoWorld) {
    // "Cancel order 7" is what the person sees; Laravel and Rails read the
    // body of a DELETE too, and this one asks for more than a cancel.
    let response = post_json(
        &world,
        reqwest::Method::DELETE,
        "/orders/7",
        &[],
        json!({"refund_to": "IBAN DE00 0000"}),
    )
    .await;
    refused(
        &world,
        response,
        "invalid_body",
        &["DELETE call carries a body"],
    )
    .await;
    // Nor on a GET whose approval shows only the query.
    let response = report_with_body(&world, Some("application/json"))
        .body(r#"{"format":"all-customers"}"#)
        .send()
        .await
        .unwrap();
    refused(
        &world,
        response,
        "invalid_body",
        &["GET call carries a body"],
    )
    .await;
}

async fn a_shown_path_parameter_with_a_format_suffix_or_matrix_parameters_is_refused(
    world: ProtoWorld,
) {
    for (paths, word) in [
        // Rails' `:id` takes no '.' and `(.:format)` the rest, Spring's
        // suffix pattern matching and Django REST framework's format
        // suffixes cut it too: they cancel order 7 while the person is asked
        // about "7.5".
        (
            ["/orders/7.5", "/orders/7.json", "/orders/7%2Ejson"],
            "format suffix",
        ),
        // Tomcat, Spring and Jetty drop `;8` and cancel order 7, which the
        // person is shown; Express, Rails and Go keep it: their orderId is
        // "7;8", another order.
        (
            ["/orders/7;8", "/orders/7;jsessionid=x", "/orders/7;/"],
            "';'",
        ),
    ] {
        deletes_refused(&world, &paths, "ambiguous_parameter", &["'orderId'", word]).await;
    }
}

async fn a_number_in_the_query_or_path_that_a_double_rounds_is_refused(world: ProtoWorld) {
    // Text to the gateway, but a JavaScript API's Number() reads
    // 9007199254740992 (and 3 for 2.9999999999999999): the person would
    // approve one amount, or order, and the API act on its neighbour.
    for amount in [
        "9007199254740993",
        "+9007199254740993",
        "2.9999999999999999",
    ] {
        let path = format!("/refunds?amount={}", amount.replace('+', "%2B"));
        let response = post(&world, &path, None, "").await;
        refused(
            &world,
            response,
            "invalid_query",
            &["'query.amount'", amount],
        )
        .await;
    }
    deletes_refused(
        &world,
        &["/orders/9007199254740993"],
        "invalid_path",
        &["'params.orderId'", "9007199254740993"],
    )
    .await;
}

over_both!(
    json_sent_as_a_form_is_refused,
    keys_that_differ_only_in_case_are_refused,
    repeated_keys_and_inexact_numbers_are_refused,
    a_repeated_query_parameter_is_refused,
    values_the_message_cannot_show_are_refused_not_blanked,
    body_fields_the_person_is_not_shown_are_refused,
    a_clean_call_is_held_with_the_message_it_will_do,
    a_shown_value_given_again_in_another_part_is_refused,
    a_shown_query_value_given_again_in_a_body_of_any_type_is_refused,
    a_decimal_shown_rounded_is_refused,
    an_encoded_body_beside_a_shown_value_is_refused,
    a_body_on_a_delete_whose_approval_shows_none_is_refused,
    a_shown_path_parameter_with_a_format_suffix_or_matrix_parameters_is_refused,
    a_number_in_the_query_or_path_that_a_double_rounds_is_refused,
);
