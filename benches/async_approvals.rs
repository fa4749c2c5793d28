//! Durable-approval benchmark: N calls under a `wait: async` policy against
//! a fake CIBA server, on a separate gateway process (the release binary),
//! with the store given on the command line.
//!
//! `async_approvals --gateway target/release/countersign --calls 10000 --store sqlite|postgres=URL|memory`
//!
//! Measures: how fast calls are accepted (each is a store insert and a
//! bc-authorize, answered 202), resident memory per pending approval, how
//! fast approved calls are forwarded and recorded by the engine itself, and
//! the latency of a retry that gets the recorded answer. Prints one
//! `RESULT async key=value ...` line (read by `benches/run.sh`).

// Shared with held_calls, which uses its ping mode too.
#[path = "bench_support.rs"]
mod bench_support;

#[path = "fake_ciba.rs"]
#[allow(dead_code)]
mod fake_ciba;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bench_support::{
    free_port, gateway_yaml, percentile, rss_kib, start_gateway, GatewayConfig, BUY_POLICY,
};

use axum::extract::State;
use axum::routing::post;
use axum::Router;
use tokio::sync::Semaphore;

const BODY: &str = r#"{"product":"XYZ phone","qty":2,"priceLimit":900}"#;
/// Calls in flight at once: an agent fleet, not a flood of sockets.
const CONCURRENCY: usize = 64;

struct Args {
    gateway: PathBuf,
    calls: usize,
    interval: u64,
    store: String,
    retries: usize,
}

fn parse_args() -> Args {
    let mut args = Args {
        gateway: PathBuf::from("target/release/countersign"),
        calls: 10_000,
        interval: 5,
        store: "sqlite".to_owned(),
        retries: 500,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        let n = || {
            value
                .parse::<usize>()
                .unwrap_or_else(|_| panic!("{flag} {value}"))
        };
        match flag.as_str() {
            "--gateway" => args.gateway = PathBuf::from(&value),
            "--calls" => args.calls = n(),
            "--interval" => args.interval = n() as u64,
            "--store" => args.store = value,
            "--retries" => args.retries = n(),
            other => panic!("unknown flag {other}"),
        }
    }
    args
}

/// One agent call buying `qty` phones: each quantity is its own approval.
async fn call(http: &reqwest::Client, port: u16, qty: usize) -> (u16, Duration) {
    let body = BODY.replace("\"qty\":2", &format!("\"qty\":{qty}"));
    let started = Instant::now();
    let status = http
        .post(format!("http://127.0.0.1:{port}/shop"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0);
    (status, started.elapsed())
}

/// Runs `calls` for quantities `1..=n`, `CONCURRENCY` at a time; returns
/// each call's status and latency.
async fn run_calls(http: &reqwest::Client, port: u16, qtys: Vec<usize>) -> Vec<(u16, Duration)> {
    let gate = Arc::new(Semaphore::new(CONCURRENCY));
    let mut tasks = Vec::with_capacity(qtys.len());
    for qty in qtys {
        let permit = gate.clone().acquire_owned().await.unwrap();
        let http = http.clone();
        tasks.push(tokio::spawn(async move {
            let result = call(&http, port, qty).await;
            drop(permit);
            result
        }));
    }
    let mut results = Vec::with_capacity(tasks.len());
    for task in tasks {
        results.push(task.await.unwrap());
    }
    results
}

fn store_yaml(store: &str, dir: &std::path::Path) -> String {
    match store.split_once('=') {
        None if store == "memory" => "store: memory".to_owned(),
        None if store == "sqlite" => {
            format!(
                "store: {{ sqlite: \"{}\" }}",
                dir.join("approvals.db").display()
            )
        }
        Some(("postgres", url)) => format!("store: {{ postgres: \"{url}\" }}"),
        _ => panic!("--store memory | sqlite | postgres=URL, not {store}"),
    }
}

#[tokio::main]
async fn main() {
    let args = parse_args();
    let n = args.calls;
    let interval = Duration::from_secs(args.interval);
    let store_kind = args.store.split('=').next().unwrap().to_owned();
    eprintln!("async approvals: {n} calls, store {store_kind}");

    let ciba = fake_ciba::FakeCiba::new(interval, Duration::from_secs(3600));
    let issuer = ciba.serve().await;

    let arrivals: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_port = upstream.local_addr().unwrap().port();
    let app = Router::new()
        .route(
            "/shop",
            post(|State(a): State<Arc<Mutex<Vec<Instant>>>>| async move {
                a.lock().unwrap().push(Instant::now());
                "{\"status\":\"confirmed\"}"
            }),
        )
        .with_state(arrivals.clone());
    tokio::spawn(async move { axum::serve(upstream, app).await.unwrap() });

    let dir = std::env::temp_dir().join(format!("countersign-async-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (proxy_port, admin_port) = (free_port(), free_port());
    let policies = format!("{BUY_POLICY}    requested_expiry: 50m\n    wait: async\n");
    let config = gateway_yaml(&GatewayConfig {
        proxy_port,
        admin_port,
        threads: 2,
        upstream_port,
        issuer: &issuer,
        delivery: "",
        max_hold: "1h",
        store: &store_yaml(&args.store, &dir),
    });
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(CONCURRENCY)
        .build()
        .unwrap();
    let gateway = start_gateway(
        &args.gateway,
        &dir,
        &policies,
        &config,
        &http,
        admin_port,
        "/readyz",
    )
    .await;
    let pid = gateway.0.id();
    // Warm the connection pool and the store.
    let _ = run_calls(&http, proxy_port, vec![n + 1]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = rss_kib(pid);

    let started = Instant::now();
    let accepted = run_calls(&http, proxy_port, (1..=n).collect()).await;
    let accept_time = started.elapsed();
    let accepted_ok = accepted.iter().filter(|(s, _)| *s == 202).count();
    // Each accepted call is one push to the phone (the warm-up call too).
    let asked = ciba.pending().saturating_sub(1);
    let mut accept_latency: Vec<Duration> = accepted.iter().map(|(_, d)| *d).collect();
    accept_latency.sort();
    // Steady state: every approval polled at least once.
    tokio::time::sleep(interval + Duration::from_secs(1)).await;
    let rss_pending = rss_kib(pid);

    let approved_at = ciba.approve_all();
    let forward_deadline = approved_at + interval * 2 + Duration::from_secs(120);
    while arrivals.lock().unwrap().len() < n + 1 && Instant::now() < forward_deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let forwarded = arrivals.lock().unwrap().len().saturating_sub(1);
    let last_arrival = arrivals.lock().unwrap().iter().max().copied();
    let forward_span =
        last_arrival.map_or(Duration::ZERO, |t| t.saturating_duration_since(approved_at));
    // The answers are recorded right after the upstream's; let them land.
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Retries of recorded answers (sequential: latency, not throughput).
    let mut retry_latency = Vec::with_capacity(args.retries);
    let mut retries_ok = 0usize;
    for qty in (1..=n)
        .step_by((n / args.retries.max(1)).max(1))
        .take(args.retries)
    {
        let (status, took) = call(&http, proxy_port, qty).await;
        retries_ok += usize::from(status == 200);
        retry_latency.push(took);
    }
    retry_latency.sort();
    drop(gateway);
    let _ = std::fs::remove_dir_all(&dir);

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let per_pending_kib = (rss_pending as f64 - rss_before as f64) / n as f64;
    let accept_rate = n as f64 / accept_time.as_secs_f64();
    // Forwarding starts only once a poll sees the approval: up to one
    // interval after approve_all. The rate is over the span after that.
    let first_arrival = arrivals.lock().unwrap().iter().min().copied();
    let forward_rate = match first_arrival.zip(last_arrival) {
        Some((first, last)) if last > first => {
            (forwarded + 1) as f64 / (last - first).as_secs_f64()
        }
        _ => 0.0,
    };
    eprintln!(
        "accepted {accepted_ok}/{n} in {accept_time:?}; rss {rss_before} -> {rss_pending} KiB; \
         forwarded {forwarded} within {forward_span:?}; retries ok {retries_ok}/{}",
        retry_latency.len()
    );
    println!(
        "RESULT async store={store_kind} calls={n} accepted={accepted_ok} accept_per_s={accept_rate:.0} \
         accept_p50_ms={:.1} accept_p99_ms={:.1} rss_before_kib={rss_before} rss_pending_kib={rss_pending} \
         per_pending_kib={per_pending_kib:.2} asked={asked} forwarded={forwarded} forward_per_s={forward_rate:.0} \
         forward_span_ms={:.0} retries={} retries_ok={retries_ok} retry_p50_ms={:.2} retry_p99_ms={:.2}",
        ms(percentile(&accept_latency, 0.5)),
        ms(percentile(&accept_latency, 0.99)),
        ms(forward_span),
        retry_latency.len(),
        ms(percentile(&retry_latency, 0.5)),
        ms(percentile(&retry_latency, 0.99)),
    );
}
