//! Held-call benchmark: N concurrent calls held pending against a fake CIBA
//! server, measured on a separate gateway process (the release binary).
//!
//! `held_calls --gateway target/release/countersign --calls 1000 [--interval 5] [--window 2] [--delivery ping]`
//!
//! With `--delivery ping` the gateway runs CIBA ping mode: on approval the
//! fake server notifies it of every request, and the result adds how long
//! each call took from its notification to the upstream.
//!
//! Prints one `RESULT held key=value ...` line (read by `benches/run.sh`) and
//! a readable summary on stderr. Every wait is bounded.

#[path = "bench_support.rs"]
mod bench_support;

#[path = "fake_ciba.rs"]
mod fake_ciba;

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bench_support::{
    free_port, gateway_yaml, percentile, rss_kib, start_gateway, GatewayConfig, BUY_POLICY,
};

use axum::extract::State;
use axum::routing::post;
use axum::Router;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// When each call reached the upstream, with its quantity.
type Arrivals = Arc<Mutex<Vec<(u64, Instant)>>>;

const BODY: &str = r#"{"product":"XYZ phone","qty":2,"priceLimit":900}"#;

struct Args {
    gateway: PathBuf,
    calls: usize,
    interval: u64,
    /// Measurement window, in intervals.
    window: u64,
    threads: usize,
    /// New calls opened per second while ramping up; by default the calls are
    /// spread over one interval, so polls (and approval delays) spread evenly.
    ramp: Option<usize>,
    ping: bool,
}

fn parse_args() -> Args {
    let mut args = Args {
        gateway: PathBuf::from("target/release/countersign"),
        calls: 1000,
        interval: 5,
        window: 2,
        threads: 2,
        ramp: None,
        ping: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        let n = || {
            value
                .parse::<u64>()
                .unwrap_or_else(|_| panic!("{flag} {value}"))
        };
        match flag.as_str() {
            "--gateway" => args.gateway = PathBuf::from(&value),
            "--calls" => args.calls = n() as usize,
            "--interval" => args.interval = n(),
            "--window" => args.window = n(),
            "--threads" => args.threads = n() as usize,
            "--ramp" => args.ramp = Some(n() as usize),
            "--delivery" => args.ping = value == "ping",
            other => panic!("unknown flag {other}"),
        }
    }
    args
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn clock_ticks_per_sec() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

fn open_files_limit() -> String {
    std::fs::read_to_string("/proc/self/limits")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .map(|l| l.split_whitespace().nth(3).unwrap_or("?").to_owned())
        .unwrap_or_default()
}

/// One held call: sends the request, waits for the whole answer; returns the status.
/// Each call buys a different quantity: identical calls are one approval.
async fn call(port: u16, qty: usize) -> Option<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let body = BODY.replace("\"qty\":2", &format!("\"qty\":{qty}"));
    let request = format!(
        "POST /shop HTTP/1.1\r\nHost: shop.bench\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.ok()?;
    let head = std::str::from_utf8(&answer[..answer.len().min(12)]).ok()?;
    head.get(9..12)?.parse().ok()
}

#[tokio::main]
async fn main() {
    let args = parse_args();
    let interval = Duration::from_secs(args.interval);
    let n = args.calls;
    eprintln!(
        "held calls: {n} calls, interval {}s, open-file limit {}",
        args.interval,
        open_files_limit()
    );

    let ciba = fake_ciba::FakeCiba::new(interval, Duration::from_secs(3600));
    let issuer = ciba.serve().await;

    // When each call reached the upstream, by its quantity (its identity).
    let arrivals: Arrivals = Arc::default();
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_port = upstream.local_addr().unwrap().port();
    let app = Router::new()
        .route(
            "/shop",
            post(
                |State(a): State<Arrivals>, body: axum::body::Bytes| async move {
                    let now = Instant::now();
                    let qty = serde_json::from_slice::<serde_json::Value>(&body)
                        .ok()
                        .and_then(|v| v["qty"].as_u64())
                        .unwrap_or(0);
                    a.lock().unwrap().push((qty, now));
                    "ok"
                },
            ),
        )
        .with_state(arrivals.clone());
    tokio::spawn(async move { axum::serve(upstream, app).await.unwrap() });

    let dir = std::env::temp_dir().join(format!("countersign-held-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (proxy_port, admin_port, notify_port) = (free_port(), free_port(), free_port());
    let delivery = if args.ping {
        format!("  delivery: ping\n  notification: {{ listen: \"127.0.0.1:{notify_port}\" }}\n")
    } else {
        String::new()
    };
    let config = gateway_yaml(&GatewayConfig {
        proxy_port,
        admin_port,
        threads: args.threads,
        upstream_port,
        issuer: &issuer,
        delivery: &delivery,
        max_hold: "10m",
        store: "",
    });
    let http = reqwest::Client::new();
    let gateway = start_gateway(
        &args.gateway,
        &dir,
        BUY_POLICY,
        &config,
        &http,
        admin_port,
        "/healthz",
    )
    .await;
    let pid = gateway.0.id();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = rss_kib(pid);

    // Open the calls, ramping up.
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    let ramp = args
        .ramp
        .unwrap_or_else(|| (n as u64 / args.interval.max(1)) as usize)
        .max(1);
    let batch = (ramp / 20).max(1);
    for i in 0..n {
        tasks.push(tokio::spawn(call(proxy_port, i + 1)));
        if (i + 1) % batch == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while ciba.pending() < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} calls reached the authorization server",
            ciba.pending()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let all_held = started.elapsed();
    eprintln!("all {n} calls held after {all_held:?}");

    // Steady state: every call has been polled at least once.
    tokio::time::sleep(interval + Duration::from_millis(500)).await;
    let rss_held_start = rss_kib(pid);
    let ticks_start = cpu_ticks(pid);
    let window_start = Instant::now();
    tokio::time::sleep(interval * args.window as u32).await;
    let window_end = Instant::now();
    let ticks_end = cpu_ticks(pid);
    let rss_held = rss_kib(pid).max(rss_held_start);
    let window = window_end - window_start;

    let (polls_in_window, min_gap) = {
        let requests = ciba.requests.lock().unwrap();
        let mut polls = 0u64;
        let mut min_gap = Duration::MAX;
        for r in requests.values() {
            polls += r
                .polls
                .iter()
                .filter(|t| **t >= window_start && **t < window_end)
                .count() as u64;
            let mut last = r.created;
            for t in &r.polls {
                min_gap = min_gap.min(t.duration_since(last));
                last = *t;
            }
        }
        (polls, min_gap)
    };
    let too_early = ciba.counters.lock().unwrap().too_early;
    let unknown = ciba.counters.lock().unwrap().unknown;
    let cpu_secs = (ticks_end - ticks_start) as f64 / clock_ticks_per_sec() as f64;
    let cpu_pct = 100.0 * cpu_secs / window.as_secs_f64();
    let polls_per_call_interval =
        polls_in_window as f64 / (n as f64 * window.as_secs_f64() / interval.as_secs_f64());

    // Approve everything; every call should reach the upstream within an interval.
    let approved_at = ciba.approve_all();
    let pinged = if args.ping {
        ciba.ping_all(&format!("http://127.0.0.1:{notify_port}/ciba/notification"))
            .await
    } else {
        Default::default()
    };
    let finish_deadline = interval * 3 + Duration::from_secs(30);
    let mut ok = 0usize;
    let mut statuses = std::collections::BTreeMap::<String, usize>::new();
    for task in tasks {
        let status = tokio::time::timeout_at((approved_at + finish_deadline).into(), async {
            task.await.ok().flatten()
        })
        .await
        .ok()
        .flatten();
        ok += usize::from(status == Some(200));
        *statuses
            .entry(status.map_or("none".to_owned(), |s| s.to_string()))
            .or_default() += 1;
    }
    let mut latencies: Vec<Duration> = arrivals
        .lock()
        .unwrap()
        .iter()
        .map(|(_, t)| t.saturating_duration_since(approved_at))
        .collect();
    latencies.sort();
    // Ping mode: from each call's notification to its arrival upstream.
    let mut resumes: Vec<Duration> = arrivals
        .lock()
        .unwrap()
        .iter()
        .filter_map(|(qty, t)| {
            let sent = pinged.get(&format!("Do you want to buy {qty} XYZ phone"))?;
            Some(t.saturating_duration_since(*sent))
        })
        .collect();
    resumes.sort();
    drop(gateway);
    let _ = std::fs::remove_dir_all(&dir);

    let per_call_kib = (rss_held as f64 - rss_before as f64) / n as f64;
    let body_kib = BODY.len() as f64 / 1024.0;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    eprintln!(
        "rss {rss_before} KiB -> {rss_held} KiB; cpu {cpu_pct:.1}% over {window:?}; \
         {polls_in_window} polls in window; min gap {min_gap:?}; too early {too_early}; \
         statuses {statuses:?}; forwarded {} of {n}",
        latencies.len()
    );
    println!(
        "RESULT held calls={n} interval_s={} rss_before_kib={rss_before} rss_held_kib={rss_held} \
         per_call_kib={per_call_kib:.2} body_kib={body_kib:.3} cpu_pct={cpu_pct:.2} \
         cpu_us_per_poll={:.1} polls_per_call_interval={polls_per_call_interval:.3} \
         min_gap_s={:.3} too_early={too_early} unknown={unknown} \
         approve_p50_ms={:.0} approve_p99_ms={:.0} approve_max_ms={:.0} forwarded={} ok={ok} \
         hold_ramp_s={:.1} delivery={} pings={} ping_resume_p50_ms={:.1} ping_resume_p99_ms={:.1} \
         ping_resume_max_ms={:.1}",
        args.interval,
        cpu_secs * 1e6 / polls_in_window.max(1) as f64,
        min_gap.as_secs_f64(),
        ms(percentile(&latencies, 0.50)),
        ms(percentile(&latencies, 0.99)),
        ms(latencies.last().copied().unwrap_or_default()),
        latencies.len(),
        all_held.as_secs_f64(),
        if args.ping { "ping" } else { "poll" },
        pinged.len(),
        ms(percentile(&resumes, 0.50)),
        ms(percentile(&resumes, 0.99)),
        ms(resumes.last().copied().unwrap_or_default()),
    );
}
