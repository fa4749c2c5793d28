//! `countersign dev`: the whole approval flow on one machine, in one process,
//! with no configuration, the way `vault server -dev` works. It starts a
//! development authorization server ([`authz`]) with its approver page (the
//! stand-in for the person's phone), the example shop API, and the real
//! gateway with the example shop policies and two transfer policies, the
//! large one countersigned by another dev user (four eyes), then says what
//! to try.
//!
//! DEVELOPMENT ONLY: the client secret is public, the signing key dies with
//! the process, and whoever can open the approver page approves.

pub mod authz;
pub mod ciba_state;
pub mod keys;
pub mod tls;

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};

use crate::config;
use crate::demo::shop;
use crate::gateway::{Gateway, Shutdown};

pub use authz::{AuthzOptions, DevAuthz, DEV_CLIENT_ID, DEV_CLIENT_SECRET};
pub use tls::DevTls;

/// The example shop policies, embedded so `countersign dev` runs from any
/// directory (and from an installed binary).
pub const SHOP_POLICIES: &str = include_str!("../../policies/shop.yaml");

/// The example MCP policy: `buy_product` on the shop's `/mcp` endpoint.
pub const MCP_POLICIES: &str = include_str!("../../policies/mcp.yaml");

/// The transfer policies of dev mode, the tiers of `policies/conditions.yaml`
/// with the dev users as countersigners: from [`shop::LARGE_TRANSFER`] on
/// (where the shop wants a countersigner's token too) the person and another
/// dev user must approve; any smaller transfer needs the person alone.
const TRANSFER_POLICIES: &str = r#"policies:
  # Four eyes: a large transfer needs the person's approval and another dev
  # user's. Everyone is asked at once, each with their own message; the
  # person never countersigns their own call, even though listed.
  - name: transfer-large
    match: { methods: [POST], path: /transfers }
    when: "body.amount >= {large}"
    require: { scopes: [payments:transfer], audience: "https://shop.example/api" }
    bind: call
    binding_message: "LARGE transfer of {{amount}} to {{to}}"
    body: { only: [amount, to] }
    countersign:
      subjects: {subjects}
      min: 1
      binding_message: "Countersign: {{user.sub}} sends {{amount}} to {{to}}"
    requested_expiry: 5m
  # Any smaller transfer: the person's approval alone.
  - name: transfer
    match: { methods: [POST], path: /transfers }
    require: { scopes: [payments:transfer], audience: "https://shop.example/api" }
    bind: call
    binding_message: "Transfer {{amount}} to {{to}}"
    body: { only: [amount, to] }
    requested_expiry: 2m
"#;

/// [`TRANSFER_POLICIES`] for the dev users `users` (checked by
/// [`check_users`], so each is a plain YAML scalar once quoted).
pub fn transfer_policies(users: &[String]) -> String {
    let subjects = serde_json::Value::from(users.to_vec()).to_string();
    TRANSFER_POLICIES
        .replace("{large}", &shop::LARGE_TRANSFER.to_string())
        .replace("{subjects}", &subjects)
}

/// The header that names the user in dev mode (a trusted component in front
/// of the gateway would set it in production).
pub const USER_HEADER: &str = "x-countersign-user";

/// `countersign dev` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct DevArgs {
    /// Port of the gateway that agents call (0: any free port).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Port of the development authorization server and its approver page (0: any free port).
    #[arg(long, default_value_t = 8081)]
    pub authz_port: u16,
    /// Port of the example shop API behind the gateway (0: any free port).
    #[arg(long, default_value_t = 8082)]
    pub shop_port: u16,
    /// Port of the gateway's /metrics, /healthz and /readyz (0: any free port).
    #[arg(long, default_value_t = 0)]
    pub admin_port: u16,
    /// The users who exist at the development authorization server.
    #[arg(long, value_delimiter = ',', default_value = "alice,bob")]
    pub users: Vec<String>,
    /// Address of the authorization server and approver page. Loopback by
    /// default: anyone who can open the page can approve. Give your LAN
    /// address to open the page on a real phone.
    #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    pub bind: IpAddr,
    /// Polling interval the authorization server announces, in seconds.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=60))]
    pub interval: u64,
    /// Serve the gateway over TLS (HTTP/2 by ALPN, HTTP/1.1 too) with a
    /// certificate for localhost and 127.0.0.1 from a development CA kept
    /// in the state directory (made on the first run, then reused).
    #[arg(long)]
    pub tls: bool,
    /// Where dev mode keeps what outlives a run (the development CA of
    /// --tls). Default: $XDG_STATE_HOME/countersign/dev, else
    /// ~/.local/state/countersign/dev.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
}

fn check_users(users: &[String]) -> anyhow::Result<()> {
    if users.is_empty() {
        bail!("--users needs at least one user");
    }
    for (i, user) in users.iter().enumerate() {
        let valid = !user.is_empty()
            && user.len() <= 64
            && user
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._@-".contains(c));
        if !valid {
            bail!("user {user:?}: use 1-64 letters, digits, '.', '_', '@' or '-'");
        }
        if users[..i].contains(user) {
            bail!("user {user:?} is listed twice");
        }
    }
    Ok(())
}

/// A free loopback port, for the one listener pingora binds itself. Racy in
/// principle; the clear error below covers the rare loser.
fn resolve_port(port: u16) -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port)).with_context(|| {
        format!("cannot listen on 127.0.0.1:{port}; is it in use? choose another port with a flag")
    })?;
    Ok(listener.local_addr()?.port())
}

async fn bind(ip: IpAddr, port: u16, flag: &str) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind((ip, port))
        .await
        .with_context(|| format!("cannot listen on {ip}:{port}; is it in use? try {flag} <port>"))
}

/// The gateway configuration of dev mode, as a user would write it.
pub fn gateway_config(
    proxy: SocketAddr,
    admin: Option<SocketAddr>,
    shop: SocketAddr,
    issuer: &str,
    tls: Option<&DevTls>,
) -> String {
    // A JSON string is a YAML double-quoted scalar.
    let quoted = |path: &Path| serde_json::Value::String(path.display().to_string()).to_string();
    let tls = tls
        .map(|tls| {
            format!(
                ", tls: {{ certificates: [{{ cert: {}, key: {} }}], http2: true }}",
                quoted(&tls.cert),
                quoted(&tls.key)
            )
        })
        .unwrap_or_default();
    let admin = admin
        .map(|a| format!(", admin: \"{a}\""))
        .unwrap_or_default();
    let dpop_key = serde_json::Value::String(crate::dpop::DpopKey::generate_pem()).to_string();
    format!(
        r#"listen: {{ proxy: "{proxy}"{admin}, threads: 2{tls} }}
upstreams:
  shop: {{ url: "http://{shop}", connect_timeout: 2s, timeout: 30s }}
authorization_server:
  issuer: "{issuer}"
  client_id: {DEV_CLIENT_ID}
  client_auth: {{ method: client_secret_post, client_secret: {DEV_CLIENT_SECRET} }}
  login_hint: iss_sub
  audience_parameter: audience
  # Tokens are bound to this key (DPoP, RFC 9449), made for this run.
  token_binding: dpop
  dpop_key: {dpop_key}
identity: {{ header: {{ name: {USER_HEADER} }} }}
policies: []
default_action: pass
limits: {{ max_hold: 5m }}
# Dev mode keeps nothing: approvals live in memory and end with the process.
store: memory
"#
    )
}

/// The gateway of dev mode: [`gateway_config`] with the embedded shop, MCP
/// and transfer policies, over TLS with `tls`'s certificate if given.
pub fn load_gateway(
    proxy: SocketAddr,
    admin: Option<SocketAddr>,
    shop: SocketAddr,
    issuer: &str,
    users: &[String],
    tls: Option<&DevTls>,
) -> anyhow::Result<config::Config> {
    let text = gateway_config(proxy, admin, shop, issuer, tls);
    let transfers = transfer_policies(users);
    Ok(config::load_embedded(
        Path::new("<countersign dev>"),
        &text,
        &[
            (Path::new("<embedded>/policies/shop.yaml"), SHOP_POLICIES),
            (Path::new("<embedded>/policies/mcp.yaml"), MCP_POLICIES),
            (Path::new("<embedded>/policies/transfers.yaml"), &transfers),
        ],
    )?)
}

/// Runs dev mode until Ctrl-C (or SIGTERM).
pub fn run(args: DevArgs) -> anyhow::Result<()> {
    check_users(&args.users)?;
    let tls = if args.tls {
        let state_dir = match &args.state_dir {
            Some(dir) => dir.clone(),
            None => tls::default_state_dir()?,
        };
        Some(tls::ensure(&state_dir)?)
    } else {
        None
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the runtime")?;

    let options = AuthzOptions {
        users: args.users.clone(),
        interval: Duration::from_secs(args.interval),
        ..AuthzOptions::default()
    };
    let (authz, shop) = runtime.block_on(async {
        let listener = bind(args.bind, args.authz_port, "--authz-port").await?;
        let authz = authz::serve(listener, options)
            .await
            .context("cannot start the development authorization server")?;
        let listener = bind(Ipv4Addr::LOCALHOST.into(), args.shop_port, "--shop-port").await?;
        let shop = shop::serve(listener, authz.issuer(), authz.jwks_uri())
            .await
            .context("cannot start the example shop")?;
        anyhow::Ok((authz, shop))
    })?;

    let proxy = SocketAddr::from((Ipv4Addr::LOCALHOST, resolve_port(args.port)?));
    let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, resolve_port(args.admin_port)?));
    let loaded = load_gateway(
        proxy,
        Some(admin),
        shop.addr,
        authz.issuer(),
        &args.users,
        tls.as_ref(),
    )?;
    // Outside the runtime: the gateway builds its own.
    let gateway = Gateway::build(loaded).context("cannot start the gateway")?;

    let shutdown = Shutdown::new();
    let signal = shutdown.clone();
    runtime.spawn(async move {
        stop_signal().await;
        eprintln!("\nstopping countersign dev");
        signal.trigger();
    });

    print!(
        "{}",
        instructions(&authz, proxy, shop.addr, admin, &args.users, tls.as_ref())
    );
    gateway.run_until(shutdown);
    runtime.shutdown_timeout(Duration::from_secs(2));
    Ok(())
}

async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// What to do next, printed on start.
fn instructions(
    authz: &DevAuthz,
    proxy: SocketAddr,
    shop: SocketAddr,
    admin: SocketAddr,
    users: &[String],
    tls: Option<&DevTls>,
) -> String {
    let user = users.first().map(String::as_str).unwrap_or("alice");
    // Over TLS the gateway is named as its certificate names it, and curl
    // trusts the development CA alone.
    let (gateway, curl) = match tls {
        Some(tls) => (
            format!("https://localhost:{}", proxy.port()),
            format!(
                "curl --cacert {} -i",
                shell_quote(&tls.ca.display().to_string())
            ),
        ),
        None => (format!("http://{proxy}"), "curl -i".to_owned()),
    };
    let page = authz.approver_url(user);
    // The curl line of an agent's call as `user`, posting `body` to `path`.
    let post = |path: &str, body: &str| {
        format!(
            "     {curl} -X POST {gateway}{path} \\\n       \
             -H '{USER_HEADER}: {user}' \\\n       \
             -H 'content-type: application/json' \\\n       \
             -d '{body}'\n"
        )
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\ncountersign dev: DEVELOPMENT ONLY (public client secret, throwaway signing key;\n\
         whoever can open the approver page approves)\n"
    );
    let _ = writeln!(out, "  gateway (agents call this)        {gateway}");
    if let Some(tls) = tls {
        let _ = writeln!(
            out,
            "  TLS: HTTP/2 and HTTP/1.1; its CA  {}   ({}; trust only this CA)",
            tls.ca.display(),
            if tls.ca_created {
                "made now, kept for later runs"
            } else {
                "kept from an earlier run"
            }
        );
    }
    let _ = writeln!(out, "  example shop API behind it        http://{shop}");
    let _ = writeln!(
        out,
        "  dev authorization server          {}   (CIBA poll mode; users: {})",
        authz.issuer(),
        users.join(", ")
    );
    let _ = writeln!(
        out,
        "  metrics (Prometheus)              http://{admin}/metrics   (also /healthz, /readyz)"
    );
    let _ = writeln!(out, "  approver page (the user's phone)  {page}");
    if !authz.addr.ip().is_loopback() {
        let _ = writeln!(
            out,
            "\n  WARNING: the approver page listens on {}: anyone who can reach it can approve.",
            authz.addr
        );
    }
    let _ = writeln!(out, "\nTry it:");
    let _ = writeln!(out, "  1. Open the approver page: {page}");
    let _ = writeln!(
        out,
        "  2. Buy 2 XYZ phones as an agent would; the call waits until {user} answers:\n"
    );
    let _ = writeln!(
        out,
        "{}",
        post(
            "/shop",
            r#"{"product":"XYZ phone","qty":2,"priceLimit":900}"#
        )
    );
    let _ = writeln!(
        out,
        "  3. Approve or Deny on the page: curl prints the order, or 403 access_denied."
    );
    let _ = writeln!(
        out,
        "  4. Send bob a gift card without waiting on the line (policy wait: async):\n"
    );
    let _ = writeln!(
        out,
        "{}",
        post("/gift-cards", r#"{"amount":25,"to":"bob"}"#)
    );
    let _ = writeln!(
        out,
        "     It answers 202 Accepted at once (Location, Retry-After). Approve on the page,\n     \
         then send the same curl again: it answers the shop's 201 with the gift card."
    );
    let others: Vec<&str> = users
        .iter()
        .map(String::as_str)
        .filter(|u| *u != user)
        .collect();
    match others.first() {
        Some(other) => {
            let _ = writeln!(
                out,
                "  5. Four eyes: a transfer of {} or more needs a second person, here {}:\n",
                shop::LARGE_TRANSFER,
                others.join(" or ")
            );
            let _ = writeln!(
                out,
                "{}",
                post("/transfers", r#"{"amount":20000,"to":"carol"}"#)
            );
            let _ = writeln!(
                out,
                "     It waits for both. {user}'s page asks \"LARGE transfer of 20000 to carol\";\n     \
                 {other}'s page asks \"Countersign: {user} sends 20000 to carol\":\n       \
                 {}\n     \
                 Approve on both: curl prints the shop's 201 with \"countersigned_by\":[\"{other}\"].",
                authz.approver_url(other)
            );
        }
        None => {
            let _ = writeln!(
                out,
                "  5. Four eyes: a transfer of {} or more needs a second person; with one\n     \
                 user it is refused (403 countersigners_unavailable). Try --users {user},bob.",
                shop::LARGE_TRANSFER
            );
        }
    }
    // The example agent trusts the system's CAs only: over TLS it is not
    // offered.
    if tls.is_none() {
        let gateway_flag = if proxy.port() == 8080 {
            String::new()
        } else {
            format!(" --gateway {gateway}")
        };
        let _ = writeln!(
            out,
            "\n  Or run the example agent:\n     cargo run --example agent --{gateway_flag} --product \"XYZ phone\" --qty 2 --price-limit 900 --user {user}"
        );
    }
    let _ = writeln!(
        out,
        "\n  Or as an MCP client: the shop's MCP server (tool buy_product) is behind\n     {gateway}/mcp   (send the header {USER_HEADER}: {user})"
    );
    let _ = writeln!(out, "\nPress Ctrl-C to stop.");
    out
}

/// `word` as one shell word: as it is when it has nothing the shell reads,
/// else in single quotes.
fn shell_quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+,:=@%".contains(c));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_checked() {
        assert!(check_users(&["alice".into(), "bob".into()]).is_ok());
        assert!(check_users(&[]).is_err());
        assert!(check_users(&["al ice".into()]).is_err());
        assert!(check_users(&["alice".into(), "alice".into()]).is_err());
    }

    #[test]
    fn the_dev_gateway_configuration_loads_with_the_embedded_policies() {
        let users = ["alice".to_owned(), "bob".to_owned()];
        let loaded = load_gateway(
            "127.0.0.1:8080".parse().unwrap(),
            None,
            "127.0.0.1:8082".parse().unwrap(),
            "http://127.0.0.1:8081",
            &users,
            None,
        )
        .unwrap();
        // shop.yaml 3, mcp.yaml 1, the two transfer tiers.
        assert_eq!(loaded.policies.policies().len(), 6);
        let large = loaded
            .policies
            .policies()
            .iter()
            .find(|p| p.name == "transfer-large")
            .unwrap();
        let countersign = large.countersign.as_ref().expect("four eyes");
        assert_eq!(countersign.subjects, users);
        assert_eq!(countersign.min, 1);
        assert_eq!(large.scopes, ["payments:transfer"]);
        assert_eq!(loaded.gateway.default_action, config::DefaultAction::Pass);
        assert!(loaded.gateway.listen.tls.is_none());
    }

    #[test]
    fn with_tls_the_dev_gateway_serves_its_certificate_with_http2() {
        let state = tempfile::tempdir().unwrap();
        let tls = tls::ensure(&state.path().join("a dir with 'quotes'")).unwrap();
        let loaded = load_gateway(
            "127.0.0.1:8080".parse().unwrap(),
            None,
            "127.0.0.1:8082".parse().unwrap(),
            "http://127.0.0.1:8081",
            &["alice".to_owned()],
            Some(&tls),
        )
        .unwrap();
        let served = loaded.gateway.listen.tls.as_ref().expect("tls");
        assert!(served.http2);
        assert_eq!(served.certificates[0].cert, tls.cert);
        assert_eq!(served.certificates[0].key, tls.key);
    }

    #[test]
    fn shell_words_are_quoted() {
        assert_eq!(shell_quote("/home/a/ca.pem"), "/home/a/ca.pem");
        assert_eq!(shell_quote("/x y/it's"), "'/x y/it'\\''s'");
    }
}
