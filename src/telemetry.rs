//! Logging setup: `tracing` for our lines, pingora's `log` records bridged in.

use tracing_log::{AsLog, LogTracer};
use tracing_subscriber::filter::LevelFilter;
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
    let installed = if json {
        tracing::subscriber::set_global_default(builder.json().flatten_event(true).finish())
    } else {
        tracing::subscriber::set_global_default(builder.finish())
    };
    // pingora installs no logger: without this bridge its errors (a 502's
    // cause) would be silent.
    if installed.is_ok() && log::set_boxed_logger(Box::new(Bridge(LogTracer::new()))).is_ok() {
        log::set_max_level(LevelFilter::current().as_log());
    }
}

/// pingora's `log` records into tracing, as `tracing_log::LogTracer` does,
/// except that an agent hanging up is not an error: pingora logs every
/// connection a client closes mid-call at ERROR (`Fail to proxy: Downstream
/// ConnectionClosed ...`); those lines become DEBUG. The call's own line
/// (outcome `client_disconnected`) and metrics count them. Upstream failures
/// keep their level.
#[derive(Debug)]
struct Bridge(LogTracer);

impl log::Log for Bridge {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        // A hang-up arrives as ERROR and leaves as DEBUG: let it in, `log` decides.
        metadata.level() <= log::Level::Warn || self.0.enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        let hangup = record.level() <= log::Level::Warn
            && record.target().starts_with("pingora")
            && is_client_hangup(&record.args().to_string());
        if hangup {
            let args = *record.args();
            self.0.log(
                &log::Record::builder()
                    .level(log::Level::Debug)
                    .target(record.target())
                    .module_path(record.module_path())
                    .file(record.file())
                    .line(record.line())
                    .args(args)
                    .build(),
            );
        } else {
            self.0.log(record);
        }
    }

    fn flush(&self) {}
}

/// pingora's error types that mean the agent's connection went away.
const HANGUP_TYPES: [&str; 5] = [
    "ConnectionClosed",
    "ReadError",
    "WriteError",
    "ReadTimedout",
    "WriteTimedout",
];

/// Whether pingora's message reports a downstream (agent) connection that
/// closed, reset or stalled. pingora's lines are `<fixed text>: <error>`
/// (then, for calls, the request summary), and an error reads
/// `<source> <type> ...`: only the words right after the first `: ` are
/// read, so a request path later in the line cannot make an upstream
/// failure look like a hang-up.
fn is_client_hangup(message: &str) -> bool {
    let Some((_, error)) = message.split_once(": ") else {
        return false;
    };
    let mut words = error.split([' ', ',']);
    words.next() == Some("Downstream")
        && words
            .next()
            .is_some_and(|etype| HANGUP_TYPES.contains(&etype))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_hangups_are_recognised_by_the_error_not_the_request() {
        for hangup in [
            "Fail to proxy: Downstream ConnectionClosed context: agent disconnected during the hold, status: 0, tries: 1, retry: false, POST /shop, Host: x",
            "Fail to proxy: Downstream ReadError context: Connection reset by peer (os error 104), downstream session type: HTTP/1.1",
            "Fail to proxy: Downstream WriteError cause: Broken pipe (os error 32), status: 200, tries: 1, retry: false, GET /slow, Host: x",
            "HTTP server fails to write to downstream: Downstream WriteError cause: Broken pipe, GET /metrics",
            "Fail to filter request: Downstream ConnectionClosed context: agent disconnected during the hold, status: 0, POST /shop, Host: shop",
        ] {
            assert!(is_client_hangup(hangup), "{hangup}");
        }
        for failure in [
            "Fail to proxy: Upstream ConnectionClosed context: Downstream ConnectionClosed, status: 502, tries: 1, retry: false, GET /Fail to proxy: Downstream ConnectionClosed",
            "Fail to proxy: Upstream ConnectRefused, status: 502, tries: 1, retry: false, GET /downstream, Host: x",
            "Fail to proxy: Downstream InvalidHTTPHeader, downstream session type: HTTP/1.1",
            "Fail to proxy: Internal ConnectionClosed",
            "Fail to filter request:  WriteError context: flushing body, status: 502, POST /shop",
            "127.0.0.1:8080 is in use, will try again",
        ] {
            assert!(!is_client_hangup(failure), "{failure}");
        }
    }
}
