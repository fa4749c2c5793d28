//! The `countersign` binary: the edge where errors become exit codes.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use countersign::approval::store_handle::ConfiguredStore;
use countersign::approval::{audit, shadow_audit};
use countersign::config;
use countersign::explain;
use countersign::gateway::Gateway;
use countersign::policytest;
use countersign::store::{ApprovalState, ListFilter, ShadowFilter};

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
        /// Also refuse what is for development only (an upstream with
        /// `tls.insecure_skip_verify`).
        #[arg(long)]
        production: bool,
    },
    /// Decide one call offline and print every step: canonical request,
    /// route, the policies tried with each condition's value, the message
    /// and details the person would see, or the refusal and why. The call
    /// is given like curl's (`-X`, `-H`, `-d`, `--json`, the URL) or as a
    /// raw HTTP request (`--raw FILE`, `-` for stdin).
    Explain {
        #[arg(long, short)]
        config: PathBuf,
        /// The method (curl's -X); POST with data, else GET.
        #[arg(short = 'X', long = "request")]
        method: Option<String>,
        /// A header, "Name: value"; repeat for more.
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
        /// A body (sent as a form unless -H gives a Content-Type, as curl
        /// does); @FILE reads it from a file.
        #[arg(short = 'd', long = "data")]
        data: Option<String>,
        /// A JSON body (sent as application/json); @FILE reads it.
        #[arg(long)]
        json: Option<String>,
        /// The approving person's claims, a JSON object with a string sub
        /// (needed under `identity: jwt`, which cannot be verified offline).
        #[arg(long)]
        claims: Option<String>,
        /// A raw HTTP/1.1 request (request line, headers, body) from FILE,
        /// or `-` for stdin, instead of the flags.
        #[arg(long, conflicts_with_all = ["method", "headers", "data", "json", "url"])]
        raw: Option<PathBuf>,
        /// The URL, as given to curl (http://gateway:8080/shop).
        #[arg(required_unless_present = "raw")]
        url: Option<String>,
    },
    /// Run policy test files offline through the gateway's decision: by
    /// default the *.test.yaml beside the policies the configuration loads.
    Test {
        #[arg(long, short)]
        config: PathBuf,
        /// Also write the results as JUnit XML to FILE.
        #[arg(long)]
        junit: Option<PathBuf>,
        /// List the policies and condition branches no case exercises.
        #[arg(long)]
        coverage: bool,
        /// Test files to run instead of those beside the policies.
        files: Vec<PathBuf>,
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
        /// What policies in shadow mode would have done, and the prompts
        /// per person per day they would have caused (instead of approvals).
        #[arg(long, conflicts_with = "state")]
        shadow: bool,
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
        Command::Check { config, production } => {
            let loaded = config::load(&config)?;
            if production {
                let insecure: Vec<&str> = loaded
                    .gateway
                    .upstreams
                    .iter()
                    .filter(|(_, u)| u.tls.as_ref().is_some_and(|t| t.insecure_skip_verify))
                    .map(|(name, _)| name.as_str())
                    .collect();
                if !insecure.is_empty() {
                    anyhow::bail!(
                        "{}: upstreams.{}.tls.insecure_skip_verify is for development only: the gateway would send tokens to whoever answers",
                        config.display(),
                        insecure.join(", upstreams.")
                    );
                }
            }
            print!("{}", route_table(&loaded));
            Ok(())
        }
        Command::Explain {
            config,
            method,
            headers,
            data,
            json,
            claims,
            raw,
            url,
        } => {
            let loaded = config::load(&config)?;
            let claims = claims.map(|c| parse_claims(&c)).transpose()?;
            let spec = match raw {
                Some(raw) => {
                    let bytes = if raw.as_os_str() == "-" {
                        let mut bytes = Vec::new();
                        std::io::Read::read_to_end(&mut std::io::stdin(), &mut bytes)?;
                        bytes
                    } else {
                        std::fs::read(&raw)
                            .map_err(|e| anyhow::anyhow!("{}: {e}", raw.display()))?
                    };
                    explain::parse_raw(&bytes, claims)?
                }
                None => explain::CurlCall {
                    method,
                    headers,
                    data: data.map(|d| read_at_file(&d)).transpose()?,
                    json: json.map(|d| read_at_file(&d)).transpose()?,
                    url: url.unwrap_or_default(),
                    claims,
                }
                .spec()?,
            };
            print!("{}", explain::explain(&loaded, &spec)?);
            Ok(())
        }
        Command::Test {
            config,
            junit,
            coverage,
            files,
        } => {
            let loaded = config::load(&config)?;
            let files = if files.is_empty() {
                policytest::default_files(&loaded)
            } else {
                files
            };
            let report = policytest::run(&loaded, &files)?;
            print!("{}", report.text());
            if coverage {
                print!(
                    "\n{}",
                    policytest::coverage::Coverage::of(&report).text(&loaded.policies)
                );
            }
            if let Some(junit) = junit {
                std::fs::write(&junit, policytest::junit::xml(&report))
                    .map_err(|e| anyhow::anyhow!("{}: {e}", junit.display()))?;
            }
            if !report.passed() {
                anyhow::bail!("{} of {} cases failed", report.failed(), report.total());
            }
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
                policy,
                subject,
                limit,
                shadow: true,
                ..
            } => {
                let filter = ShadowFilter {
                    policy,
                    subject,
                    since: None,
                    limit: Some(limit),
                };
                print!(
                    "{}",
                    shadow_audit::table(&opened.list_shadow(&filter).await?)
                );
            }
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

/// The claims `--claims` gives: a JSON object.
fn parse_claims(raw: &str) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    match serde_json::from_str(raw) {
        Ok(serde_json::Value::Object(claims)) => Ok(claims),
        _ => anyhow::bail!("--claims must be a JSON object, such as {{\"sub\":\"alice\"}}"),
    }
}

/// curl's `@FILE`: the value read from a file.
fn read_at_file(value: &str) -> anyhow::Result<String> {
    match value.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{path}: {e}")),
        None => Ok(value.to_owned()),
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
            "admin listens on {admin} (/metrics, /healthz, /readyz, /approvals, /shadow-decisions)"
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
