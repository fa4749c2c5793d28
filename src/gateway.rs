//! Wiring: a loaded [`Config`] becomes a pingora [`Server`] with the proxy
//! and admin services.

use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use pingora::apps::http_app::HttpServer;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::server::configuration::ServerConf;
use pingora::server::{
    RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, UnixShutdownSignalWatch,
};
use pingora::services::listening::Service;
use thiserror::Error;
use tokio::sync::Notify;

use crate::admin::AdminApp;
use crate::approval::engine::Engine;
use crate::approval::store_handle::ConfiguredStore;
use crate::ciba::{self, CibaClient, CibaError, Endpoints};
use crate::config::Config;
use crate::drain::{DrainFirst, DrainSwitch, Draining};
use crate::identity::IdentitySource;
use crate::metrics::Metrics;
use crate::proxy::Countersign;
use crate::readiness::{self, Readiness};
use crate::reload::Reloader;
use crate::traces::Traces;
use crate::upstream::UpstreamClient;

#[derive(Debug, Error)]
pub enum GatewayError {
    #[error(transparent)]
    AuthorizationServer(#[from] CibaError),
    #[error("identity: {0}")]
    Identity(String),
    /// A listener address that cannot be bound: in use, not permitted, or
    /// not an address of this host.
    #[error("cannot listen on {addr} ({name}): {reason}")]
    Listen {
        name: &'static str,
        addr: SocketAddr,
        reason: std::io::Error,
    },
    #[error("{0}")]
    Startup(String),
}

/// pingora's default L4 write buffer (one TCP segment); kept.
const DOWNSTREAM_WRITE_BUFFER: usize = 1460;

/// How often the proxy listener's certificate files are checked for change.
const TLS_WATCH_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// A built, not yet running, gateway.
pub struct Gateway {
    server: Server,
    pub metrics: Metrics,
    pub endpoints: Endpoints,
    /// Runs the approval engine (drivers, housekeeping, store I/O) for as
    /// long as the gateway lives.
    _engine_runtime: tokio::runtime::Runtime,
    /// What `/readyz` checks; register more before running.
    pub readiness: Readiness,
    /// Reloads the policies (SIGHUP, changed files); `None` for a
    /// configuration with embedded policies (`countersign dev`).
    pub reloader: Option<Arc<Reloader>>,
    /// Raised first on shutdown: held calls are answered, `/readyz` fails.
    drain: DrainSwitch,
    /// Drained on shutdown, after the held calls are answered.
    engine: Arc<Engine>,
    drain_timeout: std::time::Duration,
    /// Spans not yet exported are sent when the server stops.
    traces: Traces,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("endpoints", &self.endpoints)
            .finish()
    }
}

fn http_client(config: &Config) -> Result<reqwest::Client, GatewayError> {
    reqwest::Client::builder()
        .timeout(config.gateway.authorization_server.request_timeout)
        // Below common server keep-alive timeouts (Node: 5 s): a poll every
        // 5 s must not race the server closing the pooled connection.
        .pool_idle_timeout(std::time::Duration::from_secs(4))
        .user_agent(concat!("countersign/", env!("CARGO_PKG_VERSION")))
        // A redirect would resend client credentials (307/308 keep the form
        // body) to wherever it points: a 3xx is an error, never followed.
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| GatewayError::Startup(format!("HTTP client: {e}")))
}

/// Resolves the authorization server's endpoints (OIDC discovery) on a
/// short-lived runtime: pingora builds its own runtimes later.
pub fn resolve_endpoints(config: &Config) -> Result<Endpoints, GatewayError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| GatewayError::Startup(format!("runtime: {e}")))?;
    let client = http_client(config)?;
    Ok(runtime.block_on(ciba::resolve_endpoints_patiently(
        &client,
        &config.gateway.authorization_server,
    ))?)
}

/// Opens the approval store and starts the engine's housekeeping on a
/// runtime of its own: pingora's runtimes exist only once the server runs,
/// and store connections must live on a runtime that outlives every call.
fn start_engine(
    config_file: &std::path::Path,
    gateway: &crate::config::GatewayConfig,
    ciba: CibaClient,
    policies: Arc<crate::policy::LivePolicies>,
    metrics: Metrics,
    traces: Traces,
) -> Result<(Arc<Engine>, tokio::runtime::Runtime), GatewayError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("countersign-approvals")
        .enable_all()
        .build()
        .map_err(|e| GatewayError::Startup(format!("runtime: {e}")))?;
    let store = ConfiguredStore::new(&gateway.store, config_file).with_metrics(metrics.clone());
    match runtime.block_on(store.open()) {
        Ok(_) => tracing::info!(store = %store.describe(), "approval store open"),
        Err(error) if store.must_open_at_start() => {
            return Err(GatewayError::Startup(format!(
                "approval store {}: {error}",
                store.describe()
            )))
        }
        Err(error) => {
            tracing::warn!(%error, store = %store.describe(), "approval store not reachable yet; policy calls are refused until it is")
        }
    }
    let upstreams =
        UpstreamClient::new(gateway.upstreams.clone(), gateway.limits.max_response_bytes)
            .map_err(GatewayError::Startup)?;
    let pings = gateway
        .authorization_server
        .notification
        .as_ref()
        .map(|n| crate::approval::ping::Pings::new(n.safety_poll));
    let engine = Arc::new(Engine::new(
        Arc::new(store),
        ciba,
        policies,
        upstreams,
        metrics,
        gateway.store.clone(),
        gateway.limits.max_hold,
        runtime.handle().clone(),
        pings,
        traces,
    ));
    runtime.spawn(engine.clone().maintain());
    Ok((engine, runtime))
}

/// Tries to bind `addr`, so that a listener address that cannot be served
/// ends the start at once with the address and the reason. pingora binds its
/// listeners only once its services run, retries an address in use for 30 s,
/// then panics in its service thread while the rest of the process (the
/// admin listener included) keeps running.
///
/// The socket is bound but never listens, and is closed at once: holding the
/// port until pingora binds it would accept connections nobody serves (and
/// fool TCP probes) while discovery runs, and pingora takes no socket from
/// us. So the check is honest but not airtight: another process that binds
/// the port between this check and pingora's bind (the discovery call lies
/// in between) is caught only by [`exit_on_listener_failure`], after
/// pingora's 30 s of retries.
fn check_bindable(name: &'static str, addr: SocketAddr) -> Result<(), GatewayError> {
    let error = |reason| GatewayError::Listen { name, addr, reason };
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .map_err(error)?;
    // As pingora does: connections of a previous run in TIME_WAIT do not
    // count, a socket listening on the address does.
    socket.set_reuseaddr(true).map_err(error)?;
    socket.bind(addr).map_err(error)
}

/// Installs a panic hook that turns pingora's failure to bind a listener
/// (see [`check_bindable`]) into one line on stderr and exit status 1, instead of a
/// backtrace in one thread and a process that keeps running without its
/// listener. Other panics keep the previous hook. For binaries only.
pub fn exit_on_listener_failure() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        // pingora-core's `listening.rs`: `.expect("Failed to build listeners")`.
        if payload.starts_with("Failed to build listeners") {
            eprintln!("error: cannot listen: {}", listener_failure(payload));
            std::process::exit(1);
        }
        previous(info);
    }));
}

/// The readable part of pingora's listener error (its `Debug` form):
/// `bind() failed, after retries, 127.0.0.1:8080 still in use: Address already in use`.
fn listener_failure(payload: &str) -> String {
    let quoted = |key: &str| {
        let rest = &payload[payload.find(key)? + key.len()..];
        rest.find('"').map(|end| &rest[..end])
    };
    let context = quoted("context: Some(Owned(\"").or_else(|| quoted("context: Some(Static(\""));
    match (context, quoted("message: \"")) {
        (Some(context), Some(cause)) => format!("{context}: {cause}"),
        (Some(context), None) => context.to_owned(),
        _ => payload.to_owned(),
    }
}

impl Gateway {
    /// Builds the server. Must not be called inside a tokio runtime.
    pub fn build(config: Config) -> Result<Self, GatewayError> {
        let listen = &config.gateway.listen;
        check_bindable("proxy", listen.proxy)?;
        if let Some(admin) = listen.admin {
            check_bindable("admin", admin)?;
        }
        if let Some(notification) = &config.gateway.authorization_server.notification {
            check_bindable("notification", notification.listen)?;
        }
        let endpoints = resolve_endpoints(&config)?;
        let readiness = Readiness::new();
        let proxy_addr = config.gateway.listen.proxy;
        readiness.register("proxy_listener", move || {
            readiness::accepts_connections(proxy_addr)
        });
        // A gateway is built only with its configuration loaded and the
        // authorization server's endpoints known (discovery done, or given),
        // so this holds from the first probe. It is the place to report them
        // once endpoints can be (re)discovered while serving.
        readiness.register("authorization_server", || async { Ok(()) });
        let metrics = Metrics::new();
        let http = http_client(&config)?;
        let reload_source = config
            .reloadable
            .then(|| (config.file.clone(), config.text.clone()));
        let config_dir = config
            .file
            .parent()
            .map_or_else(|| std::path::PathBuf::from("."), |d| d.to_path_buf());
        let gateway = config.gateway;
        let ciba = CibaClient::new(
            http.clone(),
            endpoints.clone(),
            &gateway.authorization_server,
            metrics.clone(),
        )?;
        let identity = IdentitySource::new(
            &gateway.identity,
            &endpoints.issuer,
            endpoints.jwks.as_ref(),
            http,
        )
        .map_err(GatewayError::Identity)?;

        let conf = ServerConf {
            threads: gateway.listen.threads,
            grace_period_seconds: Some(1),
            graceful_shutdown_timeout_seconds: Some(5),
            ..ServerConf::default()
        };
        let mut server = Server::new_with_opt_and_conf(None, conf);
        server.bootstrap();

        let policies = Arc::new(crate::policy::LivePolicies::from_pointee(config.policies));
        let traces = match &gateway.traces {
            Some(traces) => {
                Traces::start(traces).map_err(|e| GatewayError::Startup(e.to_string()))?
            }
            None => Traces::off(),
        };
        let (engine, engine_runtime) = start_engine(
            &config.file,
            &gateway,
            ciba,
            policies.clone(),
            metrics.clone(),
            traces.clone(),
        )?;
        let reloader = reload_source.map(|(file, text)| {
            let reloader = Arc::new(Reloader::for_file(
                file,
                &text,
                policies.clone(),
                metrics.clone(),
            ));
            engine_runtime.spawn(reloader.clone().run());
            reloader
        });
        let notification_service = gateway.authorization_server.notification.as_ref().map(|n| {
            let mut service = Service::new(
                "countersign ciba notification".to_owned(),
                HttpServer::new_app(crate::approval::notification::NotificationApp {
                    engine: engine.clone(),
                    path: n.path.clone(),
                    metrics: metrics.clone(),
                }),
            );
            service.add_tcp(&n.listen.to_string());
            service
        });
        let store = engine.store().clone();
        let audit_store = store.clone();
        readiness.register("approval_engine", {
            let engine = engine.clone();
            move || {
                let live = engine.is_live();
                async move {
                    match live {
                        true => Ok(()),
                        false => Err("the approval engine's heartbeat has lapsed; it resumes once the store answers".to_owned()),
                    }
                }
            }
        });
        readiness.register("approval_store", move || {
            let store = store.clone();
            async move { store.ping().await.map_err(|e| e.to_string()) }
        });
        let (drain, draining) = Draining::new();
        readiness.register("not_shutting_down", {
            let draining = draining.clone();
            move || {
                let draining = draining.is_draining();
                async move {
                    match draining {
                        true => Err("the gateway is shutting down".to_owned()),
                        false => Ok(()),
                    }
                }
            }
        });
        let countersign = Countersign::new(
            policies,
            config.routes,
            gateway.upstreams.clone(),
            identity,
            gateway.limits.clone(),
            gateway.default_action,
            metrics.clone(),
            engine.clone(),
            gateway.approvals_path.0.clone(),
        )
        .with_draining(draining)
        .with_traces(traces.clone());
        let mut proxy = pingora::proxy::http_proxy_service_with_name(
            &server.configuration,
            countersign,
            "countersign proxy",
        );
        if gateway.listen.h2c {
            if let Some(app) = proxy.app_logic_mut() {
                let mut options = pingora::apps::HttpServerOptions::default();
                options.h2c = true;
                app.server_options = Some(options);
            }
        }
        // No L4 read buffer on agent connections: pingora's default is a
        // zero-filled 64 KiB buffer per connection, which dominated the memory
        // of a held call (docs/BENCHMARKS.md); HTTP/1 parsing keeps its own
        // buffers, and pass-through throughput did not change without it.
        let mut listener = ListenerConfig::tcp(gateway.listen.proxy.to_string())
            .l4_buffer(L4BufferSettings::new(0, DOWNSTREAM_WRITE_BUFFER));
        if let Some(tls) = &gateway.listen.tls {
            let base = config_dir.as_path();
            let resolver = crate::tls::CertResolver::new(tls.files(base))
                .map_err(|e| GatewayError::Startup(format!("listen.tls: {e}")))?;
            listener = listener.tls(
                resolver
                    .settings()
                    .map_err(|e| GatewayError::Startup(format!("listen.tls: {e}")))?,
            );
            engine_runtime.spawn(resolver.watch(TLS_WATCH_EVERY));
        }
        proxy.add_listener(listener);
        server.add_service(proxy);
        if let Some(service) = notification_service {
            server.add_service(service);
        }

        if let Some(admin) = gateway.listen.admin {
            let mut service = Service::new(
                "countersign admin".to_owned(),
                HttpServer::new_app(AdminApp {
                    metrics: metrics.clone(),
                    readiness: readiness.clone(),
                    store: audit_store,
                }),
            );
            service.add_tcp(&admin.to_string());
            server.add_service(service);
        }
        Ok(Self {
            server,
            metrics,
            endpoints,
            _engine_runtime: engine_runtime,
            readiness,
            reloader,
            drain,
            engine,
            drain_timeout: gateway.store.drain_timeout,
            traces,
        })
    }

    /// Serves until SIGTERM (graceful) or SIGINT (quick); either way, held
    /// calls are answered first.
    pub fn run_forever(self) {
        self.run_on(UnixShutdownSignalWatch);
    }

    /// Serves until `shutdown` is triggered; blocks the calling thread.
    pub fn run_until(self, shutdown: Shutdown) {
        self.run_on(shutdown);
    }

    /// Serves until `signal`, answering held calls before pingora stops.
    fn run_on<S: ShutdownSignalWatch + Send + Sync + 'static>(self, signal: S) {
        self.server.run(RunArgs {
            shutdown_signal: Box::new(DrainFirst {
                signal,
                switch: self.drain,
                engine: Some((self.engine, self.drain_timeout)),
            }),
        });
        self.traces.flush();
    }
}

/// A shutdown trigger for embedding the gateway (tests, `countersign dev`).
#[derive(Debug, Clone, Default)]
pub struct Shutdown(Arc<Notify>);

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn trigger(&self) {
        self.0.notify_one();
    }
}

#[async_trait]
impl ShutdownSignalWatch for Shutdown {
    async fn recv(&self) -> ShutdownSignal {
        self.0.notified().await;
        ShutdownSignal::FastShutdown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pingora_listener_failures_read_as_one_line() {
        let payload = r#"Failed to build listeners: Error { etype: BindError, esource: Unset, retry: Decided(false), cause: Some(Os { code: 98, kind: AddrInUse, message: "Address already in use" }), context: Some(Owned("bind() failed, after retries, 127.0.0.1:18998 still in use")) }"#;
        assert_eq!(
            listener_failure(payload),
            "bind() failed, after retries, 127.0.0.1:18998 still in use: Address already in use"
        );
        assert_eq!(
            listener_failure("Failed to build listeners"),
            "Failed to build listeners"
        );
    }
}
