//! Wiring: a loaded [`Config`] becomes a pingora [`Server`] with the proxy
//! and admin services.

use std::sync::Arc;

use async_trait::async_trait;
use pingora::apps::http_app::HttpServer;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use pingora::services::listening::Service;
use thiserror::Error;
use tokio::sync::Notify;

use crate::admin::AdminApp;
use crate::approval::engine::Engine;
use crate::approval::store_handle::ConfiguredStore;
use crate::ciba::{self, CibaClient, CibaError, Endpoints};
use crate::config::Config;
use crate::identity::IdentitySource;
use crate::metrics::Metrics;
use crate::proxy::Countersign;
use crate::upstream::UpstreamClient;

#[derive(Debug, Error)]
pub enum GatewayError {
    #[error("authorization server: {0}")]
    AuthorizationServer(#[from] CibaError),
    #[error("identity: {0}")]
    Identity(String),
    #[error("{0}")]
    Startup(String),
}

/// pingora's default L4 write buffer (one TCP segment); kept.
const DOWNSTREAM_WRITE_BUFFER: usize = 1460;

/// A built, not yet running, gateway.
pub struct Gateway {
    server: Server,
    pub metrics: Metrics,
    pub endpoints: Endpoints,
    /// Runs the approval engine (drivers, housekeeping, store I/O) for as
    /// long as the gateway lives.
    _engine_runtime: tokio::runtime::Runtime,
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
    Ok(runtime.block_on(ciba::resolve_endpoints(
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
    policies: Arc<crate::policy::PolicySet>,
    metrics: Metrics,
) -> Result<(Arc<Engine>, tokio::runtime::Runtime), GatewayError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("countersign-approvals")
        .enable_all()
        .build()
        .map_err(|e| GatewayError::Startup(format!("runtime: {e}")))?;
    let store = ConfiguredStore::new(&gateway.store, config_file);
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
    let engine = Arc::new(Engine::new(
        Arc::new(store),
        ciba,
        policies,
        upstreams,
        metrics,
        gateway.store.clone(),
        gateway.limits.max_hold,
        runtime.handle().clone(),
    ));
    runtime.spawn(engine.clone().maintain());
    Ok((engine, runtime))
}

impl Gateway {
    /// Builds the server. Must not be called inside a tokio runtime.
    pub fn build(config: Config) -> Result<Self, GatewayError> {
        let endpoints = resolve_endpoints(&config)?;
        let metrics = Metrics::new();
        let http = http_client(&config)?;
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

        let policies = Arc::new(config.policies);
        let (engine, engine_runtime) = start_engine(
            &config.file,
            &gateway,
            ciba,
            policies.clone(),
            metrics.clone(),
        )?;
        let countersign = Countersign::new(
            policies,
            config.routes,
            gateway.upstreams.clone(),
            identity,
            gateway.limits.clone(),
            gateway.default_action,
            metrics.clone(),
            engine,
            gateway.approvals_path.0.clone(),
        );
        let mut proxy = pingora::proxy::http_proxy_service_with_name(
            &server.configuration,
            countersign,
            "countersign proxy",
        );
        // No L4 read buffer on agent connections: pingora's default is a
        // zero-filled 64 KiB buffer per connection, which dominated the memory
        // of a held call (docs/BENCHMARKS.md); HTTP/1 parsing keeps its own
        // buffers, and pass-through throughput did not change without it.
        proxy.add_listener(
            ListenerConfig::tcp(gateway.listen.proxy.to_string())
                .l4_buffer(L4BufferSettings::new(0, DOWNSTREAM_WRITE_BUFFER)),
        );
        server.add_service(proxy);

        if let Some(admin) = gateway.listen.admin {
            let mut service = Service::new(
                "countersign admin".to_owned(),
                HttpServer::new_app(AdminApp {
                    metrics: metrics.clone(),
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
        })
    }

    /// Serves until SIGINT/SIGTERM.
    pub fn run_forever(self) {
        self.server.run(RunArgs::default());
    }

    /// Serves until `shutdown` is triggered; blocks the calling thread.
    pub fn run_until(self, shutdown: Shutdown) {
        self.server.run(RunArgs {
            shutdown_signal: Box::new(shutdown),
        });
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
