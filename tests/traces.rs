//! Traces: what the gateway exports to a real OTLP/HTTP receiver (decoded
//! with the `opentelemetry-proto` types), for an approved call, a call
//! passed through, and an approval forwarded by another replica. The shop
//! reports the `traceparent` it received, as any traced API would read it.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message as _;
use support::process::{GatewayProcess, TestDatabase};
use support::*;

/// The agent's own span.
const AGENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const AGENT_SPAN: &str = "00f067aa0ba902b7";

fn agent_traceparent() -> String {
    format!("00-{AGENT_TRACE}-{AGENT_SPAN}-01")
}

/// One exported span, as the receiver decoded it.
#[derive(Debug, Clone)]
struct Exported {
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    service: String,
    attributes: Vec<(String, String)>,
}

impl Exported {
    fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// An OTLP/HTTP receiver on a free port: every span posted to
/// `/v1/traces`, decoded.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Exported>>>,
}

impl Receiver {
    async fn start() -> (Self, SocketAddr) {
        let receiver = Self::default();
        let spans = receiver.spans.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(
                move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                    let spans = spans.clone();
                    async move {
                        assert_eq!(
                            headers.get("content-type").unwrap(),
                            "application/x-protobuf"
                        );
                        assert_eq!(headers.get("x-collector-key").unwrap(), "k-123");
                        let request = ExportTraceServiceRequest::decode(body).unwrap();
                        spans.lock().unwrap().extend(decode(request));
                        axum::http::StatusCode::OK
                    }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (receiver, addr)
    }

    /// Waits until a span named `name` of trace `trace_id` (any trace:
    /// `None`) has come.
    async fn wait_for(&self, name: &str, trace_id: Option<&str>) -> Exported {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(span) = self
                .spans
                .lock()
                .unwrap()
                .iter()
                .find(|s| s.name == name && trace_id.is_none_or(|t| s.trace_id == t))
            {
                return span.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no {name} span came; got {:#?}",
                self.spans.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn of_trace(&self, trace_id: &str) -> Vec<Exported> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect()
    }
}

fn decode(request: ExportTraceServiceRequest) -> Vec<Exported> {
    let mut spans = Vec::new();
    for resource in request.resource_spans {
        let service = resource
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|a| a.key == "service.name")
            .map(|a| value_text(a.value.as_ref()))
            .unwrap_or_default();
        for scope in resource.scope_spans {
            for span in scope.spans {
                spans.push(Exported {
                    name: span.name,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    service: service.clone(),
                    attributes: span
                        .attributes
                        .iter()
                        .map(|a| (a.key.clone(), value_text(a.value.as_ref())))
                        .collect(),
                });
            }
        }
    }
    spans
}

fn value_text(value: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The `traces:` section sending to `receiver`, and what the gateway
/// process needs to send batches at once.
fn traced(receiver: SocketAddr, extra: &str) -> (GatewayOptions, Vec<(String, String)>) {
    let options = GatewayOptions {
        extra_config: format!(
            "traces: {{ endpoint: \"http://{receiver}\", service_name: shop-gateway, headers: {{ x-collector-key: k-123 }} }}\n{extra}"
        ),
        ..GatewayOptions::default()
    };
    let env = vec![("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "100".to_owned())];
    (options, env)
}

/// The `traceparent` the shop received with its last call: (trace, span).
fn received_context(shop: &countersign::demo::shop::ShopHandle) -> (String, String) {
    let received = shop.received();
    let last = received.last().expect("the shop got the call");
    let values: Vec<_> = last.headers.get_all("traceparent").iter().collect();
    assert_eq!(values.len(), 1, "one traceparent upstream: {values:?}");
    let parts: Vec<&str> = values[0].to_str().unwrap().split('-').collect();
    (parts[1].to_owned(), parts[2].to_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_approved_call_is_one_trace_under_the_agents_span() {
    let (receiver, collector) = Receiver::start().await;
    let (peer, shop) = flows::peer_and_shop().await;
    let (options, env) = traced(collector, "");
    let gateway = GatewayProcess::start_with_env(&peer, &shop, options, env).await;
    let agent = reqwest::Client::new();

    let held = tokio::spawn(
        gateway
            .buy(&agent, "alice", phones())
            .header("traceparent", agent_traceparent())
            .send(),
    );
    let pending = peer.wait_pending(Some("alice"), 1).await;
    let auth_req_id = flows::auth_req_id(&pending[0]).to_owned();
    peer.approve(&auth_req_id).await;
    let response = held.await.unwrap().unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let approval_id = response.headers()["x-countersign-approval-id"]
        .to_str()
        .unwrap()
        .to_owned();

    let call = receiver.wait_for("call", Some(AGENT_TRACE)).await;
    assert_eq!(
        call.parent_span_id, AGENT_SPAN,
        "the call hangs under the agent"
    );
    assert_eq!(call.service, "shop-gateway");
    assert_eq!(call.attribute("countersign.policy"), Some("buy-product"));
    assert_eq!(call.attribute("countersign.outcome"), Some("approved"));
    assert_eq!(
        call.attribute("countersign.approval_id"),
        Some(approval_id.as_str())
    );
    assert_eq!(call.attribute("http.response.status_code"), Some("200"));
    for name in [
        "decide",
        "hold",
        "ciba.bc-authorize",
        "ciba.token",
        "forward",
    ] {
        let span = receiver.wait_for(name, Some(AGENT_TRACE)).await;
        assert_eq!(span.parent_span_id, call.span_id, "{name} under the call");
    }
    let poll = receiver.wait_for("ciba.token", Some(AGENT_TRACE)).await;
    assert_eq!(
        poll.attribute("countersign.approval_id"),
        Some(approval_id.as_str())
    );
    let answers: Vec<String> = receiver
        .of_trace(AGENT_TRACE)
        .iter()
        .filter(|s| s.name == "ciba.token")
        .filter_map(|s| s.attribute("countersign.answer").map(str::to_owned))
        .collect();
    assert!(answers.iter().any(|a| a == "approved"), "{answers:?}");

    // The shop joins the trace under the gateway's forward.
    let forward = receiver.wait_for("forward", Some(AGENT_TRACE)).await;
    assert_eq!(forward.attribute("http.response.status_code"), Some("200"));
    assert_eq!(
        received_context(&shop),
        (AGENT_TRACE.to_owned(), forward.span_id.clone())
    );

    // Neither the token nor what the person was asked is in any span.
    let token = shop.received().last().unwrap().bearer().unwrap().to_owned();
    let message = peer.request(&auth_req_id).await["binding_message"]
        .as_str()
        .unwrap()
        .to_owned();
    for span in receiver.of_trace(AGENT_TRACE) {
        for (key, value) in &span.attributes {
            assert!(!value.contains(&token), "token in {}.{key}", span.name);
            assert!(!value.contains(&message), "message in {}.{key}", span.name);
        }
    }
}

/// An upstream that answers 200 to anything and keeps the `traceparent`
/// values of each request it got.
async fn recording_upstream() -> (SocketAddr, Arc<Mutex<Vec<Vec<String>>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let kept = seen.clone();
    let app = axum::Router::new().fallback(move |headers: axum::http::HeaderMap| {
        let kept = kept.clone();
        async move {
            let values = headers
                .get_all("traceparent")
                .iter()
                .map(|v| v.to_str().unwrap().to_owned())
                .collect();
            kept.lock().unwrap().push(values);
            "ok"
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, seen)
}

/// (trace, span) of the one `traceparent` the upstream got with its
/// `n`th request.
fn upstream_context(seen: &Mutex<Vec<Vec<String>>>, n: usize) -> (String, String) {
    let seen = seen.lock().unwrap();
    let values = &seen[n];
    assert_eq!(values.len(), 1, "one traceparent upstream: {values:?}");
    let parts: Vec<&str> = values[0].split('-').collect();
    (parts[1].to_owned(), parts[2].to_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_passed_call_joins_a_valid_trace_and_starts_one_for_a_malformed() {
    let (receiver, collector) = Receiver::start().await;
    let (upstream, seen) = recording_upstream().await;
    let (peer, shop) = flows::peer_and_shop().await;
    let (mut options, env) = traced(collector, "");
    options.upstream = Some(upstream.to_string());
    let gateway = GatewayProcess::start_with_env(&peer, &shop, options, env).await;
    let agent = reqwest::Client::new();

    // Passed through (no policy matches a GET).
    let response = agent
        .get(gateway.url("/products"))
        .header("traceparent", agent_traceparent())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let call = receiver.wait_for("call", Some(AGENT_TRACE)).await;
    assert_eq!(call.parent_span_id, AGENT_SPAN);
    assert_eq!(call.attribute("countersign.policy"), Some("none"));
    assert_eq!(call.attribute("countersign.outcome"), Some("passed"));
    assert_eq!(call.attribute("http.response.status_code"), Some("200"));
    let forward = receiver.wait_for("forward", Some(AGENT_TRACE)).await;
    assert_eq!(forward.parent_span_id, call.span_id);
    assert_eq!(
        upstream_context(&seen, 0),
        (AGENT_TRACE.to_owned(), forward.span_id.clone()),
        "the upstream continues the trace under the gateway's forward"
    );

    // A malformed traceparent, or two of them, is not followed: a trace of
    // the gateway's own, and only its context goes upstream.
    let malformed = format!("00-{AGENT_TRACE}-{AGENT_SPAN}");
    let twice = agent_traceparent();
    for (n, sent) in [
        vec![malformed.as_str()],
        vec![twice.as_str(), twice.as_str()],
    ]
    .into_iter()
    .enumerate()
    {
        let mut request = agent.get(gateway.url("/products"));
        for value in sent {
            request = request.header("traceparent", value);
        }
        assert_eq!(request.send().await.unwrap().status(), 200);
        let (trace, span) = upstream_context(&seen, n + 1);
        assert_ne!(trace, AGENT_TRACE);
        let forward = receiver.wait_for("forward", Some(&trace)).await;
        assert_eq!(forward.span_id, span);
        let call = receiver.wait_for("call", Some(&trace)).await;
        assert_eq!(call.parent_span_id, "", "a root span");
        assert_eq!(forward.parent_span_id, call.span_id);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_approval_forwarded_by_another_replica_joins_the_agents_trace() {
    // Replica a takes the call (202) and dies; replica b takes the approval
    // over, polls and forwards it: its spans hang under a's call span.
    let (receiver, collector) = Receiver::start().await;
    let database = TestDatabase::create();
    let (peer, shop) = flows::peer_and_shop().await;
    let store = format!("store: {{ postgres: \"{}\", lease: 2s }}", database.url);
    let replica = || {
        let (mut options, env) = traced(collector, &store);
        options.extra_policies = ASYNC_POLICY;
        (options, env)
    };
    let (options, env) = replica();
    let mut a = GatewayProcess::start_with_env(&peer, &shop, options, env).await;
    let (options, env) = replica();
    let b = GatewayProcess::start_with_env(&peer, &shop, options, env).await;
    let agent = reqwest::Client::new();
    let send = |proxy: SocketAddr| {
        agent
            .post(format!("http://{proxy}/shop"))
            .header(USER_HEADER, "alice")
            .header("host", "async.shop.test")
            .header("content-type", "application/json")
            .header("traceparent", agent_traceparent())
            .body(serde_json::to_vec(&phones()).unwrap())
    };

    let first = send(a.proxy).send().await.unwrap();
    assert_eq!(first.status(), 202);
    let call = receiver.wait_for("call", Some(AGENT_TRACE)).await;
    assert_eq!(call.attribute("countersign.outcome"), Some("accepted"));
    receiver
        .wait_for("ciba.bc-authorize", Some(AGENT_TRACE))
        .await;
    let pending = peer.wait_pending(Some("alice"), 1).await;
    a.kill9();
    peer.approve(flows::auth_req_id(&pending[0])).await;

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let response = send(b.proxy).send().await.unwrap();
        if response.status() != 202 {
            assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
            break;
        }
        assert!(Instant::now() < deadline, "never forwarded");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let forward = receiver.wait_for("forward", Some(AGENT_TRACE)).await;
    assert_eq!(
        forward.parent_span_id, call.span_id,
        "b's forward hangs under a's call"
    );
    let polls: Vec<Exported> = receiver
        .of_trace(AGENT_TRACE)
        .into_iter()
        .filter(|s| s.name == "ciba.token")
        .collect();
    assert!(
        polls
            .iter()
            .any(|p| p.attribute("countersign.answer") == Some("approved")),
        "b's approving poll is in the trace: {polls:#?}"
    );
    assert!(polls.iter().all(|p| p.parent_span_id == call.span_id));
    assert_eq!(
        received_context(&shop),
        (AGENT_TRACE.to_owned(), forward.span_id.clone())
    );
}
