//! The `countersign` binary: the edge where errors become exit codes.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use countersign::config;
use countersign::gateway::Gateway;

#[derive(Parser)]
#[command(
    name = "countersign",
    version,
    about = "Hold AI agents' API calls until the person approves them (OpenID CIBA)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a configuration and its policies, and print the route table.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Try Countersign on one machine with no configuration: a development
    /// authorization server with an approver page, the example shop API and
    /// the gateway in front of it. DEVELOPMENT ONLY.
    Dev(countersign::dev::DevArgs),
    /// Print the JSON Schema of the configuration file or of a policy file
    /// (kept in the repository as schema/countersign.schema.json and
    /// schema/policies.schema.json).
    Schema {
        #[arg(value_enum, default_value_t = SchemaKind::Config)]
        file: SchemaKind,
    },
    /// Serve.
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// Log one JSON object per line.
        #[arg(long)]
        log_json: bool,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum SchemaKind {
    /// The configuration file (`--config`).
    Config,
    /// A policy file (`policies: [...]`).
    Policies,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Check { config } => {
            let loaded = config::load(&config)?;
            print!("{}", route_table(&loaded));
            Ok(())
        }
        Command::Schema { file } => {
            print!(
                "{}",
                match file {
                    SchemaKind::Config => countersign::schema::config_schema(),
                    SchemaKind::Policies => countersign::schema::policies_schema(),
                }
            );
            Ok(())
        }
        Command::Dev(args) => {
            countersign::gateway::exit_on_listener_failure();
            // pingora's start-up lines would bury the printed instructions.
            countersign::telemetry::init_with(false, "info,pingora_core=warn");
            countersign::dev::run(args)
        }
        Command::Run { config, log_json } => {
            countersign::telemetry::init(log_json);
            countersign::gateway::exit_on_listener_failure();
            let loaded = config::load(&config)?;
            let proxy = loaded.gateway.listen.proxy;
            let admin = loaded.gateway.listen.admin;
            let policies = loaded.policies.policies().len();
            let gateway = Gateway::build(loaded)?;
            tracing::info!(%proxy, admin = ?admin, policies, issuer = %gateway.endpoints.issuer, "countersign serving");
            gateway.run_forever();
            Ok(())
        }
    }
}

fn route_table(config: &config::Config) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let gateway = &config.gateway;
    let _ = writeln!(out, "configuration {} is valid", config.file.display());
    let _ = writeln!(out, "proxy listens on {}", gateway.listen.proxy);
    if let Some(admin) = gateway.listen.admin {
        let _ = writeln!(
            out,
            "admin listens on {admin} (/metrics, /healthz, /readyz)"
        );
    }
    let _ = writeln!(out, "\nupstreams:");
    for (name, upstream) in &gateway.upstreams {
        let scheme = if upstream.url.tls { "https" } else { "http" };
        let _ = writeln!(out, "  {name:<16} {scheme}://{}", upstream.url.authority());
    }
    let _ = writeln!(out, "\npolicies ({}):", config.policies.policies().len());
    let _ = writeln!(
        out,
        "  {:<20} {:<12} {:<28} {:<24} SCOPES",
        "NAME", "METHODS", "PATH", "HOST"
    );
    for p in config.policies.policies() {
        let _ = writeln!(
            out,
            "  {:<20} {:<12} {:<28} {:<24} {}{}",
            p.name,
            p.methods.join(","),
            p.path_template,
            p.host.as_deref().unwrap_or("*"),
            p.scopes.join(" "),
            p.audience
                .as_deref()
                .map(|a| format!(" (audience {a})"))
                .unwrap_or_default(),
        );
    }
    let default = match gateway.default_action {
        config::DefaultAction::Pass => "pass (forwarded without approval)",
        config::DefaultAction::Deny => "deny (refused with no_policy)",
    };
    let _ = writeln!(out, "\nunmatched calls: {default}");
    out
}
