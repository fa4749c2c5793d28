//! What the benchmark tools share: ports, the buy policy, the gateway's
//! config and the gateway as a child process, its memory, percentiles.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The policy file every benchmark holds calls under: buying a product
/// (`POST /shop`), its binding message and details templated from the
/// body. A benchmark adds the policy's own lines (expiry, wait) after it.
pub const BUY_POLICY: &str = r#"policies:
  - name: buy-product
    match: { methods: [POST], path: /shop }
    require: { scopes: [product:buy], audience: https://shop.example/api }
    binding_message: "Do you want to buy {{qty}} {{product}}"
    authorization_details:
      - type: product_purchase
        product: "{{product}}"
        quantity: "{{qty}}"
        price_limit: "{{priceLimit}}"
"#;

/// What differs between the benchmarks' gateways; the rest (the `shop`
/// upstream, the fake CIBA server as authorization server, the one person
/// `bench-user`, limits no benchmark reaches) is [`gateway_yaml`]'s.
pub struct GatewayConfig<'a> {
    pub proxy_port: u16,
    pub admin_port: u16,
    pub threads: usize,
    pub upstream_port: u16,
    pub issuer: &'a str,
    /// Lines added under `authorization_server` (the ping delivery).
    pub delivery: &'a str,
    pub max_hold: &'a str,
    /// A `store:` line, or nothing for the default.
    pub store: &'a str,
}

/// The gateway's config file, reading its policies from `policies.yaml`
/// beside it.
pub fn gateway_yaml(c: &GatewayConfig) -> String {
    format!(
        r#"listen:
  proxy: 127.0.0.1:{proxy_port}
  admin: 127.0.0.1:{admin_port}
  threads: {threads}
upstreams:
  shop:
    url: http://127.0.0.1:{upstream_port}
authorization_server:
  issuer: {issuer}
  client_id: bench
  client_auth:
    method: client_secret_post
    client_secret: bench-secret
  login_hint: subject
{delivery}identity:
  static: {{ subject: bench-user }}
policies: [policies.yaml]
default_action: pass
limits:
  max_hold: {max_hold}
  max_pending: 100000
  max_pending_per_user: 100000
{store}
"#,
        proxy_port = c.proxy_port,
        admin_port = c.admin_port,
        threads = c.threads,
        upstream_port = c.upstream_port,
        issuer = c.issuer,
        delivery = c.delivery,
        max_hold = c.max_hold,
        store = c.store,
    )
}

/// Writes `policies` and `config` into `dir`, starts the `gateway` binary
/// on them (its log in `dir/gateway.log`), and waits (30 s at most) until
/// `ready_path` on its admin port answers with success.
pub async fn start_gateway(
    gateway: &Path,
    dir: &Path,
    policies: &str,
    config: &str,
    http: &reqwest::Client,
    admin_port: u16,
    ready_path: &str,
) -> GatewayProcess {
    std::fs::write(dir.join("policies.yaml"), policies).unwrap();
    let config_path = dir.join("gateway.yaml");
    std::fs::write(&config_path, config).unwrap();
    let log = std::fs::File::create(dir.join("gateway.log")).unwrap();
    let child = Command::new(gateway)
        .args(["run", "--config"])
        .arg(&config_path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", gateway.display()));
    let process = GatewayProcess(child);
    let ready_deadline = Instant::now() + Duration::from_secs(30);
    while !http
        .get(format!("http://127.0.0.1:{admin_port}{ready_path}"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(Instant::now() < ready_deadline, "gateway did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    process
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Resident set size of `pid`, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// The gateway under test; killed on drop.
pub struct GatewayProcess(pub Child);

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}
