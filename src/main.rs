//! The `countersign` binary: the edge where errors become exit codes.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use countersign::approval::audit;
use countersign::approval::store_handle::ConfiguredStore;
use countersign::config;
use countersign::gateway::Gateway;
use countersign::store::{ApprovalState, ListFilter};

/// pingora allocates and frees several times per request; with glibc's
/// malloc that was a fifth of a pass-through call's instructions
/// (docs/BENCHMARKS.md, "Allocator").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// The audit trail: approvals kept in the configured store.
    Approvals {
        #[command(subcommand)]
        command: ApprovalsCommand,
    },
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

#[derive(Subcommand)]
enum ApprovalsCommand {
    /// List approvals, newest first.
    List {
        #[arg(long, short)]
        config: PathBuf,
        /// pending, approved, denied, expired, failed, forwarding, done or
        /// outcome_unknown.
        #[arg(long, value_parser = audit::state)]
        state: Option<ApprovalState>,
        #[arg(long)]
        policy: Option<String>,
        /// The person the agent acted for.
        #[arg(long)]
        subject: Option<String>,
        /// At most this many (1 to 1000).
        #[arg(long, default_value_t = audit::DEFAULT_LIMIT, value_parser = audit::limit)]
        limit: usize,
    },
    /// Print one approval as JSON.
    Show {
        id: String,
        #[arg(long, short)]
        config: PathBuf,
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
        Command::Approvals { command } => approvals(command),
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

/// Reads the configured store on a runtime of its own (the store runs its
/// I/O on its own runtime too; this one only awaits it).
fn approvals(command: ApprovalsCommand) -> anyhow::Result<()> {
    let file = match &command {
        ApprovalsCommand::List { config, .. } | ApprovalsCommand::Show { config, .. } => config,
    };
    let loaded = config::load(file)?;
    let store = ConfiguredStore::new(&loaded.gateway.store, &loaded.file);
    // Reading must not create an empty database where none was kept.
    if let Some(path) = store.sqlite_path().filter(|path| !path.exists()) {
        anyhow::bail!("cannot open {}: no such file", path.display());
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let opened = store
            .open()
            .await
            .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", store.describe()))?;
        match command {
            ApprovalsCommand::List {
                state,
                policy,
                subject,
                limit,
                ..
            } => {
                let filter = ListFilter {
                    state,
                    policy,
                    subject,
                    since: None,
                    limit: Some(limit),
                };
                print!("{}", audit::table(&opened.list(&filter).await?));
            }
            ApprovalsCommand::Show { id, .. } => match opened.get(&id).await? {
                Some(approval) => println!(
                    "{}",
                    serde_json::to_string_pretty(&audit::entry(&approval))?
                ),
                None => anyhow::bail!("no approval {id:?} in {}", store.describe()),
            },
        }
        Ok(())
    })
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
            "admin listens on {admin} (/metrics, /healthz, /readyz, /approvals)"
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
        let path = match &p.mcp_tool {
            Some(tool) => format!("{} (MCP tool {tool})", p.path_template),
            None => p.path_template.clone(),
        };
        let _ = writeln!(
            out,
            "  {:<20} {:<12} {:<28} {:<24} {}{}",
            p.name,
            p.methods.join(","),
            path,
            p.host.as_deref().unwrap_or("*"),
            p.scopes.join(" "),
            p.audience
                .as_deref()
                .map(|a| format!(" (audience {a})"))
                .unwrap_or_default(),
        );
        if let Some(condition) = &p.condition {
            let otherwise = match p.otherwise {
                countersign::policy::Otherwise::Pass => "",
                countersign::policy::Otherwise::Deny => ", otherwise deny",
            };
            let _ = writeln!(out, "  {:<20} when {}{otherwise}", "", condition.source());
        }
    }
    let default = match gateway.default_action {
        config::DefaultAction::Pass => "pass (forwarded without approval)",
        config::DefaultAction::Deny => "deny (refused with no_policy)",
    };
    let _ = writeln!(out, "\nunmatched calls: {default}");
    out
}
