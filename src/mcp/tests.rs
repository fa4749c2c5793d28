use std::path::Path;

use http::{HeaderMap, HeaderValue};
use serde_json::json;

use super::*;
use crate::policy::{PolicyFile, PolicySet};

fn policies() -> PolicySet {
    let file: PolicyFile = serde_yaml::from_str(
        r#"
policies:
  - name: buy
    match: { path: /mcp, mcp: { tool: buy_product } }
    require: { scopes: [product:buy] }
    binding_message: "Buy {{arguments.qty}} {{arguments.product}}"
  - name: admin
    match: { path: /mcp, mcp: { tool: "admin_*" } }
    require: { scopes: [admin] }
    binding_message: "Admin {{arguments.what}}"
"#,
    )
    .unwrap();
    PolicySet::compile(file.into_loaded(Path::new("p.yaml")).collect()).unwrap()
}

fn classify_with(headers: &HeaderMap, body: &str) -> Result<Classified, McpRefusal> {
    let set = policies();
    let path = crate::policy::normalize("/MCP/").unwrap();
    let found = set.find_mcp(None, &path).expect("an MCP endpoint");
    classify(found.endpoint, headers, Some(body.as_bytes()))
}

fn classify_body(body: &str) -> Result<Classified, McpRefusal> {
    classify_with(&HeaderMap::new(), body)
}

const BUY: &str = r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"buy_product","arguments":{"product":"XYZ phone","qty":2},"_meta":{"progressToken":7}}}"#;

#[test]
fn a_held_tool_call_is_read_with_its_arguments_and_progress_token() {
    let Ok(Classified::Held(call)) = classify_body(BUY) else {
        panic!("held")
    };
    assert_eq!(call.policy, 0);
    assert_eq!(call.id, json!(7));
    assert_eq!(call.arguments, json!({"product": "XYZ phone", "qty": 2}));
    assert_eq!(call.progress_token, Some(json!(7)));
    let Ok(Classified::Held(glob)) = classify_body(
        r#"{"jsonrpc":"2.0","id":"a","method":"tools/call","params":{"name":"admin_reset"}}"#,
    ) else {
        panic!("held by the glob")
    };
    assert_eq!(glob.policy, 1);
    assert_eq!(glob.arguments, json!({}));
}

#[test]
fn a_retry_with_another_id_and_token_is_the_same_call() {
    let retry = BUY
        .replace("\"id\":7", "\"id\":8")
        .replace("\"progressToken\":7", "\"progressToken\":8");
    let (Ok(Classified::Held(a)), Ok(Classified::Held(b))) =
        (classify_body(BUY), classify_body(&retry))
    else {
        panic!("both held")
    };
    assert_ne!(a.id, b.id);
    assert_eq!(a.fingerprint, b.fingerprint);
    let other = BUY.replace("\"qty\":2", "\"qty\":3");
    let Ok(Classified::Held(c)) = classify_body(&other) else {
        panic!("held")
    };
    assert_ne!(a.fingerprint, c.fingerprint);
}

#[test]
fn everything_else_passes() {
    for body in [
        r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"c","version":"1"}}}"#,
        r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
        r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#,
        r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"list_products","arguments":{}}}"#,
        r#"{"jsonrpc":"2.0","id":4,"result":{}}"#,
        r#"[{"jsonrpc":"2.0","id":2,"method":"tools/list"},{"jsonrpc":"2.0","method":"notifications/initialized"}]"#,
        "",
    ] {
        assert_eq!(classify_body(body), Ok(Classified::Pass), "{body}");
    }
    assert_eq!(
        classify_body(
            r#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":7,"reason":"timeout"}}"#
        ),
        Ok(Classified::Cancel(vec![json!(7)]))
    );
}

#[test]
fn what_a_lenient_server_could_read_differently_is_refused() {
    // Duplicate and case-twin keys, at the top and in the arguments.
    for body in [
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","method":"tools/call","params":{"name":"buy_product"}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","Method":"tools/call","params":{"name":"buy_product"}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"buy_product","arguments":{"qty":1,"QTY":100}}}"#,
    ] {
        assert!(
            matches!(classify_body(body), Err(McpRefusal::Body(_))),
            "{body}"
        );
    }
    // A member in another letter case is read as a lenient server would.
    assert!(matches!(
        classify_body(
            r#"{"jsonrpc":"2.0","id":1,"Method":"tools/call","Params":{"Name":"buy_product"}}"#
        ),
        Ok(Classified::Held(_))
    ));
    let case = classify_body(
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"Buy_Product"}}"#,
    );
    assert!(
        matches!(&case, Err(refusal @ McpRefusal::ToolNameCase { .. }) if refusal.is_tool_error()),
        "{case:?}"
    );
    assert!(matches!(
        classify_body(
            r#"{"jsonrpc":"2.0","id":1,"method":"Tools/Call","params":{"name":"buy_product"}}"#
        ),
        Err(McpRefusal::MethodCase { .. })
    ));
    assert!(matches!(
        classify_body(r#"{"jsonrpc":"2.0","method":"tools/call","params":{"name":"buy_product"}}"#),
        Err(McpRefusal::Malformed(..))
    ));
    assert!(matches!(
        classify_body(
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":["buy_product"]}}"#
        ),
        Err(McpRefusal::Malformed(..))
    ));
    assert!(matches!(
        classify_body(
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"buy_product","arguments":[2]}}"#
        ),
        Err(McpRefusal::Malformed(..))
    ));
    assert!(matches!(
        classify_body("{not json"),
        Err(McpRefusal::Body(BodyError::Syntax(_)))
    ));
}

#[test]
fn a_batch_with_a_held_call_is_refused() {
    let batch = format!(r#"[{{"jsonrpc":"2.0","id":2,"method":"tools/list"}},{BUY}]"#);
    assert_eq!(
        classify_body(&batch),
        Err(McpRefusal::Batch("buy_product".into()))
    );
    let case =
        r#"[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"BUY_PRODUCT"}}]"#;
    assert!(matches!(classify_body(case), Err(McpRefusal::Batch(_))));
}

#[test]
fn mcp_headers_must_agree_with_the_body() {
    let headers = |method: &str, name: Option<&str>| {
        let mut h = HeaderMap::new();
        h.insert(METHOD_HEADER, HeaderValue::from_str(method).unwrap());
        if let Some(name) = name {
            h.insert(NAME_HEADER, HeaderValue::from_str(name).unwrap());
        }
        h
    };
    assert!(matches!(
        classify_with(&headers("tools/call", Some("buy_product")), BUY),
        Ok(Classified::Held(_))
    ));
    for (method, name) in [
        ("tools/list", None),
        ("tools/call", Some("list_products")),
        ("tools/call", Some("Buy_Product")),
    ] {
        let refused = classify_with(&headers(method, name), BUY);
        assert!(
            matches!(refused, Err(McpRefusal::HeaderMismatch { .. })),
            "{method} {name:?}: {refused:?}"
        );
    }
    // The other way round: headers naming the held tool on another message.
    let list = r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#;
    assert!(matches!(
        classify_with(&headers("tools/call", Some("buy_product")), list),
        Err(McpRefusal::HeaderMismatch { .. })
    ));
    // A name sent as the specification has clients encode it: decoded
    // ("buy_product", "list_products" in Base64); the wrapper in another
    // case, or Base64 that is no UTF-8, is refused.
    assert!(matches!(
        classify_with(
            &headers("tools/call", Some("=?base64?YnV5X3Byb2R1Y3Q=?=")),
            BUY
        ),
        Ok(Classified::Held(_))
    ));
    for name in [
        "=?base64?bGlzdF9wcm9kdWN0cw==?=",
        "=?BASE64?YnV5X3Byb2R1Y3Q=?=",
        "=?base64?/w==?=",
        "=?base64?not base64?=",
    ] {
        let refused = classify_with(&headers("tools/call", Some(name)), BUY);
        assert!(
            matches!(refused, Err(McpRefusal::HeaderMismatch { .. })),
            "{name}: {refused:?}"
        );
    }
    let mut twice = headers("tools/call", None);
    twice.append(METHOD_HEADER, HeaderValue::from_static("tools/call"));
    assert!(matches!(
        classify_with(&twice, BUY),
        Err(McpRefusal::HeaderMismatch { .. })
    ));
}

#[test]
fn mcp_param_headers_must_agree_with_the_arguments() {
    let call = |arguments: &str| {
        format!(
            r#"{{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{{"name":"buy_product","arguments":{arguments}}}}}"#
        )
    };
    let with = |pairs: &[(&str, &str)], arguments: &str| {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_bytes(value.as_bytes()).unwrap(),
            );
        }
        classify_with(&h, &call(arguments))
    };
    let args = r#"{"product":"XYZ phone","qty":2,"gift":true,"Region":"eu west"}"#;
    for agreeing in [
        vec![("mcp-param-qty", "2")],
        vec![("Mcp-Param-QTY", " 2 ")],
        vec![
            ("mcp-param-product", "XYZ phone"),
            ("mcp-param-gift", "true"),
        ],
        vec![("mcp-param-region", "eu west")],
        // "XYZ phone" in Base64.
        vec![("mcp-param-product", "=?base64?WFlaIHBob25l?=")],
    ] {
        assert!(
            matches!(with(&agreeing, args), Ok(Classified::Held(_))),
            "{agreeing:?}"
        );
    }
    for refused in [
        vec![("mcp-param-qty", "100")],
        vec![("mcp-param-qty", "02")],
        vec![("mcp-param-qty", "2.0")],
        vec![("mcp-param-qty", "2e0")],
        vec![("mcp-param-qty", "=?base64?MTAw?=")],
        // Not Base64, and the wrapper in another case (a lenient decoder's).
        vec![("mcp-param-qty", "=?base64?!!?=")],
        vec![("mcp-param-qty", "=?BASE64?Mg==?=")],
        vec![("mcp-param-qty", "2"), ("mcp-param-qty", "2")],
        vec![("mcp-param-gift", "True")],
        vec![("mcp-param-product", "xyz phone")],
        // A header naming no argument: the gateway cannot tell what it is.
        vec![("mcp-param-quantity", "2")],
        vec![("mcp-param-", "2")],
        vec![("mcp-param-qty", "2"), ("mcp-param-price", "1")],
    ] {
        let answer = with(&refused, args);
        assert!(
            matches!(&answer, Err(r @ McpRefusal::HeaderMismatch { id: Some(id), .. })
                if *id == json!(7) && r.code() == ProblemCode::McpHeaderMismatch),
            "{refused:?}: {answer:?}"
        );
    }
    for (arguments, value) in [
        (r#"{"qty":null}"#, "null"),
        (r#"{"qty":[2]}"#, "2"),
        (r#"{"qty":{"n":2}}"#, "2"),
        (r#"{"qty":2.5}"#, "2.5"),
        (r#"{}"#, "2"),
    ] {
        assert!(
            matches!(
                with(&[("mcp-param-qty", value)], arguments),
                Err(McpRefusal::HeaderMismatch { .. })
            ),
            "{arguments} {value}"
        );
    }
    // Calls the gateway does not hold keep their headers unread.
    let free = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"list_products","arguments":{"qty":2}}}"#;
    let mut h = HeaderMap::new();
    h.insert("mcp-param-qty", HeaderValue::from_static("100"));
    assert_eq!(classify_with(&h, free), Ok(Classified::Pass));
}

#[test]
fn event_stream_acceptance_is_read_from_accept() {
    let mut h = HeaderMap::new();
    assert!(!accepts_event_stream(&h));
    h.insert(
        "accept",
        HeaderValue::from_static("application/json, text/event-stream"),
    );
    assert!(accepts_event_stream(&h));
}

#[test]
fn a_held_tool_call_on_another_path_is_found_however_it_is_spelled() {
    let set = policies();
    let path = crate::policy::normalize("/mcp").unwrap();
    let endpoint = set.find_mcp(None, &path).unwrap().endpoint;
    let found = |body: &str| stray_tool_call(&[endpoint], body.as_bytes()).map(|(name, _)| name);
    assert_eq!(found(BUY).as_deref(), Some("buy_product"));
    for body in [
        format!("[{BUY}]"),
        format!("\u{feff}{BUY}"),
        BUY.replace("buy_product", "BUY_PRODUCT"),
        BUY.replace("\"method\"", "\"Method\"")
            .replace("tools/call", "Tools/Call"),
        BUY.replace("tools/call", "tools\\/call"),
        r#"{"method":"tools/call","params":["admin_drop",{}]}"#.to_owned(),
        // Not strict JSON: a trailing comma, which a lenient parser takes.
        BUY.replace("}}}", "}},}"),
    ] {
        assert!(found(&body).is_some(), "{body}");
    }
    for body in [
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"list_products"}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"name":"buy_product"}}"#,
        r#"{"product":"buy_product","note":"tools/call"}"#,
        "product=buy_product&method=tools/call",
    ] {
        assert_eq!(found(body), None, "{body}");
    }
    assert_eq!(stray_tool_call(&[], BUY.as_bytes()), None);
}
