//! Logging setup: `tracing` for our lines, pingora's `log` records bridged in.

use tracing_subscriber::EnvFilter;

/// Log targets that would print credentials below `warn`.
pub const CAPPED_TARGETS: [&str; 5] = [
    "pingora_proxy=warn",
    "pingora_core=warn",
    "h2=warn",
    "hyper=warn",
    "hyper_util=warn",
];

/// Installs the global subscriber. `json` selects one JSON object per line.
/// The filter comes from `RUST_LOG`, defaulting to `info`.
pub fn init(json: bool) {
    init_with(json, "info");
}

/// Like [`init`], with `default` as the filter when `RUST_LOG` is unset.
pub fn init_with(json: bool, default: &str) {
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    // These crates print whole request headers (Authorization included) at
    // debug/trace. Tokens never reach logs, whatever RUST_LOG asks for.
    for cap in CAPPED_TARGETS {
        if let Ok(directive) = cap.parse() {
            filter = filter.add_directive(directive);
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // `try_init` also installs the `log` bridge, so pingora's errors show up.
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}
