//! Policy evaluation: route matching with 10, 1,000 and 10,000 policies,
//! binding-message rendering, and problem+json answers.
//!
//! `cargo bench --bench policy` (benches/run.sh passes `--output-format bencher`).

// For the buy policy the held-call benchmarks hold calls under.
#[path = "bench_support.rs"]
#[allow(dead_code)]
mod bench_support;

use std::hint::black_box;

use countersign::policy::{self, CallInput, PolicyFile, PolicySet};
use countersign::problem::{Problem, ProblemCode};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use std::path::Path;

use bench_support::BUY_POLICY;

/// `n` policies in YAML, the way an operator writes them: a mix of static and
/// parameterised paths, several methods, some bound to a host.
fn policies_yaml(n: usize) -> String {
    let mut yaml = String::from("policies:\n");
    for i in 0..n {
        let (methods, path) = match i % 4 {
            0 => ("[POST]", format!("/api/v1/shop{i}/orders")),
            1 => (
                "[DELETE, PUT]",
                format!("/api/v1/shop{i}/orders/{{orderId}}"),
            ),
            2 => ("[POST]", format!("/api/v1/shop{i}/items/{{itemId}}/buy")),
            _ => ("[\"*\"]", format!("/admin{i}/{{*rest}}")),
        };
        let host = if i % 10 == 9 {
            format!(", host: api{i}.example")
        } else {
            String::new()
        };
        yaml.push_str(&format!(
            "  - name: p{i}\n    match: {{ methods: {methods}, path: \"{path}\"{host} }}\n    \
             require: {{ scopes: [product:buy], audience: https://shop.example/api }}\n    \
             binding_message: \"Do you want to buy {{{{qty}}}} {{{{product}}}}\"\n"
        ));
    }
    yaml
}

fn compile(yaml: &str) -> PolicySet {
    let file: PolicyFile = serde_yaml::from_str(yaml).expect("policy yaml");
    PolicySet::compile(file.into_loaded(Path::new("bench.yaml")).collect())
        .expect("policies compile")
}

fn matching(c: &mut Criterion) {
    let mut group = c.benchmark_group("match");
    for n in [10usize, 1_000, 10_000] {
        let set = compile(&policies_yaml(n));
        // A call to the policy in the middle of the set, with a path parameter.
        let target = (n / 2) / 4 * 4 + 1;
        let raw = format!("/api/v1/shop{target}/orders/A-1234");
        let normalized = policy::normalize(&raw).unwrap();
        assert_eq!(
            set.find("DELETE", Some("agent.example"), &normalized)
                .map(|m| m.policy.name.clone()),
            Some(format!("p{target}"))
        );
        group.bench_with_input(BenchmarkId::new("find", n), &n, |b, _| {
            b.iter(|| {
                black_box(set.find(
                    black_box("DELETE"),
                    black_box(Some("agent.example")),
                    black_box(&normalized),
                ))
            })
        });
        // What the gateway does per call: normalise the path, then match.
        group.bench_with_input(BenchmarkId::new("normalize_find", n), &n, |b, _| {
            b.iter(|| {
                let path = policy::normalize(black_box(&raw)).unwrap();
                black_box(set.find("DELETE", Some("agent.example"), &path).is_some())
            })
        });
        // An unmatched call (a pass-through read).
        let miss = policy::normalize(&format!("/api/v1/shop{target}/catalog")).unwrap();
        assert!(set.find("GET", Some("agent.example"), &miss).is_none());
        group.bench_with_input(BenchmarkId::new("miss", n), &n, |b, _| {
            b.iter(|| black_box(set.find("GET", Some("agent.example"), black_box(&miss))))
        });
    }
    group.finish();
}

fn rendering(c: &mut Criterion) {
    let set = compile(&format!("{BUY_POLICY}    requested_expiry: 2m\n"));
    let body = br#"{"product": "XYZ phone", "qty": 2, "priceLimit": 900}"#;
    let user = serde_json::json!({"sub": "alice"});
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        "application/json".parse().unwrap(),
    );
    let path = policy::normalize("/shop").unwrap();
    let found = set.find("POST", None, &path).expect("policy");
    let input = CallInput {
        headers: &headers,
        body: Some(body),
        params: &found.params,
        query: None,
        user: &user,
        agent: &serde_json::Value::Null,
        method: "POST",
        path: "/shop",
        arguments: None,
    };
    let rendered = set.render_call(found.policy, &input).unwrap();
    assert_eq!(rendered.binding_message, "Do you want to buy 2 XYZ phone");

    let mut group = c.benchmark_group("render");
    // Per call: check the content type, parse the body strictly, render the
    // binding message and the authorization details.
    group.bench_function("call", |b| {
        b.iter(|| black_box(set.render_call(found.policy, black_box(&input)).unwrap()))
    });
    group.finish();
}

fn problems(c: &mut Criterion) {
    let mut group = c.benchmark_group("problem");
    group.bench_function("to_json", |b| {
        b.iter(|| {
            black_box(
                Problem::new(black_box(ProblemCode::AccessDenied))
                    .with_approval_id("5f0c2a8e-4c1b-4a5e-9a57-0c7c0e3f8a11")
                    .to_json(),
            )
        })
    });
    group.finish();
}

criterion_group!(benches, matching, rendering, problems);
criterion_main!(benches);
