//! One run of a scenario: start the processes, let agents and the approver
//! work while the nemesis injects the scheduled faults, heal, wait for
//! every approval to end, then check the history.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::agents::{Agents, ASYNC_PATH, HELD_PATH, QUORUM_PATH};
use super::approver::Approver;
use super::check::{check, History};
use super::proxy::TcpProxy;
use super::schedule::{schedule, Fault, Planned, Scenario, LEASE};
use super::store::{Sightings, StoreReader};
use super::upstream::{Behaviour, RecordingUpstream};
use super::{now_ms, BOUND, COUNTERSIGNERS, COUNTERSIGN_MIN, EXPIRY, LIMIT};
use crate::support::process::{GatewayProcess, TestDatabase, PG_HOST, PG_PORT};
use crate::support::{free_port, Peer};

const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// Agents making calls at once.
const AGENTS: usize = 6;

/// A fault as it was applied.
#[derive(Debug, Clone)]
struct Applied {
    /// Seconds since the run started.
    at_s: f64,
    fault: Fault,
    note: String,
}

fn env_u64(name: &str) -> Option<u64> {
    let raw = std::env::var(name).ok()?;
    Some(
        raw.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={raw:?} is not a whole number")),
    )
}

fn policies() -> String {
    let policy = |name: &str, path: &str, wait: &str| {
        format!(
            r#"  - name: {name}
    match: {{ methods: [POST], path: {path} }}
    require: {{ scopes: [product:buy], audience: "https://shop.example/api" }}
    bind: call
    binding_message: "Buy {{{{qty}}}} {{{{product}}}}"
    body: {{ only: [product, qty, priceLimit] }}
    requested_expiry: {expiry}s
    wait: {wait}
"#,
            expiry = EXPIRY.as_secs()
        )
    };
    // Four eyes: the person and COUNTERSIGN_MIN of the countersigners.
    let countersign = format!(
        r#"    countersign:
      subjects: [{subjects}]
      min: {COUNTERSIGN_MIN}
      binding_message: "Countersign: {{{{user.sub}}}} buys {{{{qty}}}} {{{{product}}}}"
"#,
        subjects = COUNTERSIGNERS.join(", ")
    );
    format!(
        "policies:\n{}{}{}{countersign}",
        policy("fault-buy-async", ASYNC_PATH, "async"),
        policy("fault-buy-held", HELD_PATH, "{ hold: 3s }"),
        policy("fault-buy-countersigned", QUORUM_PATH, "{ hold: 3s }")
    )
}

fn gateway_config(
    dir: &Path,
    issuer: &str,
    upstream: SocketAddr,
    store: &str,
) -> (PathBuf, SocketAddr, SocketAddr) {
    std::fs::create_dir_all(dir).unwrap();
    let proxy: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let policies_file = dir.join("policies.yaml");
    std::fs::write(&policies_file, policies()).unwrap();
    let config = format!(
        r#"listen: {{ proxy: "{proxy}", admin: "{admin}", threads: 2 }}
upstreams:
  shop: {{ url: "http://{upstream}", connect_timeout: 2s, timeout: 3s }}
{authorization_server}
identity: {{ header: {{ name: {user_header} }} }}
policies: [{policies}]
default_action: deny
limits: {{ max_body_bytes: 1024, max_hold: 60s, max_pending_per_user: {LIMIT} }}
store: {{ {store}, lease: {lease}s }}
"#,
        authorization_server = crate::support::flows::peer_authorization_server(issuer),
        user_header = super::USER_HEADER,
        policies = policies_file.display(),
        lease = LEASE.as_secs(),
    );
    let file = dir.join("countersign.yaml");
    std::fs::write(&file, config).unwrap();
    (file, proxy, admin)
}

fn kill(signal: &str, pid: u32) -> bool {
    std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success())
}

/// The processes and servers of a run.
struct World {
    peer: Peer,
    upstream: RecordingUpstream,
    gateways: Vec<GatewayProcess>,
    reader: Arc<StoreReader>,
    proxy: Option<TcpProxy>,
    _database: Option<TestDatabase>,
    _dir: tempfile::TempDir,
}

impl World {
    async fn start(scenario: Scenario, epoch: Instant) -> Self {
        let peer = Peer::start();
        let upstream = RecordingUpstream::start(&peer.issuer, peer.jwks_uri(), epoch).await;
        let dir = tempfile::tempdir().unwrap();
        let (store, database, proxy) = match scenario {
            Scenario::SingleSqlite => {
                let path = dir.path().join("approvals.db");
                (format!("sqlite: \"{}\"", path.display()), None, None)
            }
            Scenario::ReplicasPostgres => {
                assert!(
                    Path::new(LIBFAKETIME).exists(),
                    "{LIBFAKETIME} is missing: the clock-skew fault needs Debian's faketime \
                     (apt-get install faketime)"
                );
                let database = TestDatabase::create();
                let target: SocketAddr = format!("{PG_HOST}:{PG_PORT}").parse().unwrap();
                let proxy = TcpProxy::start(target).await;
                let url = format!("postgres://root@{}/{}", proxy.addr, database.name);
                (format!("postgres: \"{url}\""), Some(database), Some(proxy))
            }
        };
        let mut gateways = Vec::new();
        for replica in 0..scenario.replicas() {
            let (config, proxy_addr, admin) = gateway_config(
                &dir.path().join(format!("gw{replica}")),
                &peer.issuer,
                upstream.addr,
                &store,
            );
            gateways.push(GatewayProcess::on(config, proxy_addr, admin).await);
        }
        let reader = match &database {
            None => StoreReader::sqlite(dir.path().join("approvals.db")).await,
            Some(database) => StoreReader::postgres(&database.url).await,
        };
        Self {
            peer,
            upstream,
            gateways,
            reader: Arc::new(reader),
            proxy,
            _database: database,
            _dir: dir,
        }
    }

    /// Applies one fault, healing it before returning; says what happened.
    async fn apply(&mut self, fault: &Fault) -> String {
        match fault {
            Fault::Kill9 { replica } => {
                let gateway = &mut self.gateways[*replica];
                gateway.kill9();
                gateway.restart().await;
                String::new()
            }
            Fault::Pause { replica, pause } => {
                let gateway = &self.gateways[*replica];
                gateway.pause();
                tokio::time::sleep(*pause).await;
                gateway.unpause();
                String::new()
            }
            Fault::Terminate { replica } => {
                let gateway = &mut self.gateways[*replica];
                let started = Instant::now();
                let exited = gateway.terminate(Duration::from_secs(15)).await;
                let note = match exited {
                    Some(status) => format!(
                        "exited {status} after {:.1}s",
                        started.elapsed().as_secs_f64()
                    ),
                    None => "still running 15 s after SIGTERM; killed".to_owned(),
                };
                gateway.restart().await;
                note
            }
            Fault::ClockSkew {
                replica,
                offset_s,
                lasts,
            } => {
                let gateway = &mut self.gateways[*replica];
                gateway.set_env(vec![
                    ("LD_PRELOAD".into(), LIBFAKETIME.into()),
                    ("FAKETIME".into(), format!("{offset_s:+}s")),
                    ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
                ]);
                gateway.terminate(Duration::from_secs(15)).await;
                gateway.restart().await;
                tokio::time::sleep(*lasts).await;
                gateway.set_env(Vec::new());
                gateway.terminate(Duration::from_secs(15)).await;
                gateway.restart().await;
                String::new()
            }
            Fault::PgCut => {
                if let Some(proxy) = &self.proxy {
                    proxy.cut();
                }
                String::new()
            }
            Fault::PgBlackhole { lasts } => {
                if let Some(proxy) = &self.proxy {
                    proxy.black_hole();
                    tokio::time::sleep(*lasts).await;
                    proxy.heal();
                }
                String::new()
            }
            Fault::PgTerminate => match self.reader.terminate_backends().await {
                Ok(n) => format!("{n} backends terminated"),
                Err(e) => format!("pg_terminate_backend failed: {e}"),
            },
            Fault::SqliteStall { lasts } => match self.reader.stall_writers(*lasts).await {
                Ok(()) => String::new(),
                Err(e) => format!("could not stall the writers: {e}"),
            },
            Fault::PeerPause { lasts } => {
                let pid = self.peer.pid();
                kill("STOP", pid);
                tokio::time::sleep(*lasts).await;
                kill("CONT", pid);
                String::new()
            }
            Fault::PeerSlow { count, delay } => {
                let status = self
                    .peer
                    .control(
                        "bc-authorize-delay",
                        serde_json::json!({ "count": count, "ms": delay.as_millis() as u64 }),
                    )
                    .await;
                // Stays until `count` requests came; the next fault starts
                // after `delay` in the schedule.
                tokio::time::sleep(*delay).await;
                format!("control answered {status}")
            }
            Fault::CrashWhileAsking { replica, delay } => {
                let before = self.peer.requests().await.len();
                self.peer
                    .control(
                        "bc-authorize-delay",
                        serde_json::json!({ "count": 1, "ms": delay.as_millis() as u64 }),
                    )
                    .await;
                // Kill while the delayed answer is on its way: as soon as
                // a new request shows, or halfway through the delay.
                let deadline = Instant::now() + *delay / 2;
                let mut asked = false;
                while Instant::now() < deadline {
                    if self.peer.requests().await.len() > before {
                        asked = true;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                let gateway = &mut self.gateways[*replica];
                gateway.kill9();
                gateway.restart().await;
                // The delay is left to come or be used by the next request.
                tokio::time::sleep(delay.saturating_sub(Duration::from_secs(1))).await;
                if asked {
                    "killed while a bc-authorize was held".to_owned()
                } else {
                    "no bc-authorize came before the kill".to_owned()
                }
            }
            Fault::UpstreamSlow { delay, lasts } => {
                self.upstream.set(Behaviour::Slow(*delay));
                tokio::time::sleep(*lasts).await;
                self.upstream.set(Behaviour::Answer);
                String::new()
            }
            Fault::UpstreamHangUp { lasts } => {
                self.upstream.set(Behaviour::HangUp);
                tokio::time::sleep(*lasts).await;
                self.upstream.set(Behaviour::Answer);
                String::new()
            }
        }
    }

    /// Each gateway's distinct WARN and ERROR lines (without their time),
    /// with how often each came, most frequent first.
    fn warnings(&self, each: usize) -> String {
        let mut out = String::new();
        for (i, gateway) in self.gateways.iter().enumerate() {
            let mut counts: BTreeMap<String, usize> = BTreeMap::new();
            for line in gateway.logs().lines() {
                let Some((_, rest)) = line.split_once(' ') else {
                    continue;
                };
                let rest = rest.trim_start();
                if rest.starts_with("WARN") || rest.starts_with("ERROR") {
                    let mut key: String = rest.chars().take(240).collect();
                    // One line per message, whatever approval it names.
                    if let Some(at) = key.find("approval_id=") {
                        key.replace_range(at.., "approval_id=...");
                    }
                    *counts.entry(key).or_default() += 1;
                }
            }
            let mut counts: Vec<_> = counts.into_iter().collect();
            counts.sort_by_key(|c| std::cmp::Reverse(c.1));
            let _ = writeln!(out, "gw{i}:");
            for (line, n) in counts.into_iter().take(each) {
                let _ = writeln!(out, "  {n:>5}x {line}");
            }
        }
        out
    }

    /// Copies every gateway's log into `to`.
    fn keep_logs(&self, to: &Path) {
        for (i, gateway) in self.gateways.iter().enumerate() {
            let _ = std::fs::write(to.join(format!("gw{i}.log")), gateway.logs());
        }
    }
}

fn schedule_text(planned: &[Planned]) -> String {
    let mut out = String::new();
    for p in planned {
        let _ = writeln!(out, "  {:>8.1}s {}", p.at.as_secs_f64(), p.fault);
    }
    out
}

/// Runs `scenario` with the seed and length from the environment
/// (`FAULT_SEED`, default random; `FAULT_SECONDS`, default 60) and fails
/// with the seed, the schedule and the evidence when an invariant breaks.
pub async fn run(scenario: Scenario) {
    let seed = env_u64("FAULT_SEED").unwrap_or_else(rand::random);
    let seconds = env_u64("FAULT_SECONDS").unwrap_or(60);
    let name = scenario.name();
    let planned = schedule(seed, scenario, seconds);
    let replay =
        format!("FAULT_SEED={seed} FAULT_SECONDS={seconds} cargo test --test faults {name}");
    eprintln!(
        "faults {name}: seed {seed}, {seconds} s, {} faults planned (replay: {replay})",
        planned.len()
    );
    let out = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("faults")
        .join(format!("{name}-{seed}"));
    std::fs::create_dir_all(&out).unwrap();

    let epoch = Instant::now();
    let started_ms = now_ms();
    let mut world = World::start(scenario, epoch).await;
    let sightings = Arc::new(Sightings::default());
    let (stop_tx, stop) = watch::channel(false);

    let monitor = {
        let (sightings, reader, mut stop) = (sightings.clone(), world.reader.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                sightings.look(&reader).await;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = stop.changed() => { sightings.look(&reader).await; return; }
                }
            }
        })
    };
    let approver = Arc::new(Approver::new(world.peer.issuer.clone(), seed));
    let approving = tokio::spawn(approver.clone().run(stop.clone()));
    let agents = Arc::new(Agents {
        proxies: world.gateways.iter().map(|g| g.proxy).collect(),
        ops: Mutex::new(Vec::new()),
        next_qty: AtomicU64::new(1),
        stop_new_at: epoch + Duration::from_secs(seconds),
        seed,
    });
    let agent_tasks: Vec<_> = (0..AGENTS)
        .map(|i| tokio::spawn(agents.clone().run(i)))
        .collect();

    // The nemesis.
    let mut applied = Vec::new();
    for p in &planned {
        let due = epoch + p.at;
        tokio::time::sleep_until(due.into()).await;
        let at_s = epoch.elapsed().as_secs_f64();
        let note = world.apply(&p.fault).await;
        applied.push(Applied {
            at_s,
            fault: p.fault.clone(),
            note,
        });
    }
    tokio::time::sleep_until((epoch + Duration::from_secs(seconds)).into()).await;
    let faults_over_s = epoch.elapsed().as_secs_f64();

    // Healed: the agents finish what they started, then every approval
    // gets until its deadline plus the bound to end.
    for task in agent_tasks {
        task.await.unwrap();
    }
    loop {
        let seen = sightings.snapshot();
        let last_deadline = seen
            .iter()
            .map(|a| a.first_seen_ms + (a.expires_at - a.created_at).max(0))
            .max()
            .unwrap_or(0)
            + BOUND.as_millis() as i64;
        if sightings.all_final() || now_ms() > last_deadline + 1000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let _ = stop_tx.send(true);
    monitor.await.unwrap();
    approving.await.unwrap();
    let mut pushes = None;
    for _ in 0..10 {
        match approver.pushes().await {
            Ok(p) => {
                pushes = Some(p);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
    let pushes = pushes.expect("the authorization server lists its requests");

    let mut ops = agents.ops.lock().unwrap().clone();
    ops.sort_by_key(|o| o.id);
    let history = History {
        ops,
        arrivals: world.upstream.arrivals(),
        approvals: sightings.snapshot(),
        pushes,
        decisions: approver.decisions.lock().unwrap().clone(),
        limit: LIMIT,
    };
    let report = check(&history);

    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for a in &applied {
        *kinds.entry(a.fault.kind()).or_default() += 1;
    }
    let kinds = kinds
        .iter()
        .map(|(k, n)| format!("{k}:{n}"))
        .collect::<Vec<_>>()
        .join(",");
    let answered = history
        .ops
        .iter()
        .filter(|o| matches!(o.result, super::agents::Final::Answer { .. }))
        .count();
    // Four eyes: the countersigned calls, their countersigners' requests,
    // how many reached the upstream and how many were refused.
    let quorum_ops = history.ops.iter().filter(|o| o.path == QUORUM_PATH).count();
    let countersign_pushes = history
        .pushes
        .iter()
        .filter(|p| p.binding_message.starts_with("Countersign:"))
        .count();
    let quorum_forwards = history
        .arrivals
        .iter()
        .filter(|a| a.path == QUORUM_PATH)
        .count();
    let quorum_refused = history
        .approvals
        .iter()
        .filter(|a| a.countersign_min.is_some() && a.parent_id.is_none())
        .filter(|a| matches!(a.state.as_str(), "denied" | "expired"))
        .count();
    let summary = format!(
        "faults {name} seed={seed} seconds={seconds} ran={:.0}s faults={} [{kinds}] ops={} answered={answered} approvals={} pushes={} forwards={} quorum_ops={quorum_ops} countersign_pushes={countersign_pushes} quorum_forwards={quorum_forwards} quorum_refused={quorum_refused} store_read_errors={} | {} | notes: {}",
        epoch.elapsed().as_secs_f64(),
        applied.len(),
        history.ops.len(),
        history.approvals.len(),
        history.pushes.len(),
        history.arrivals.len(),
        *sightings.read_errors.lock().unwrap(),
        report.counts(),
        report.note_counts()
    );
    eprintln!("{summary}");

    // The whole history, for reading a failure (and the long run).
    let mut text = format!("{summary}\n\nreplay: {replay}\nrun started at unix ms {started_ms}; faults over at {faults_over_s:.1}s\n\napplied faults:\n");
    for a in &applied {
        let _ = writeln!(text, "  {:>8.1}s {} {}", a.at_s, a.fault, a.note);
    }
    let _ = writeln!(text, "\nviolations:\n{}", report.evidence(usize::MAX));
    let _ = writeln!(text, "notes:\n{}", report.note_evidence());
    let _ = writeln!(text, "ops:\n{:#?}\n", history.ops);
    let _ = writeln!(text, "approvals:\n{:#?}\n", history.approvals);
    let _ = writeln!(text, "pushes:\n{:#?}\n", history.pushes);
    let _ = writeln!(text, "decisions:\n{:#?}\n", history.decisions);
    let _ = writeln!(text, "upstream:\n{:#?}\n", history.arrivals);
    std::fs::write(out.join("history.txt"), text).unwrap();
    world.keep_logs(&out);
    let _ = std::fs::write(out.join("summary.txt"), format!("{summary}\n"));
    eprintln!("faults {name}: history: {}", out.display());

    assert!(
        report.ok(),
        "{summary}\n\nreplay: {replay}\n\nfault schedule:\n{}\n{}\ngateway warnings:\n{}\nhistory and gateway logs: {}",
        schedule_text(&planned),
        report.evidence(10),
        world.warnings(8),
        out.display()
    );
}
