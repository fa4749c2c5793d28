//! A bare pingora reverse proxy with no logic: the baseline Countersign is
//! measured against (`benches/run.sh`). Never part of the shipped binary.
//!
//! `bare_pingora <listen> <upstream host:port> [threads] [work_stealing 0|1] [keepalive_pool] [l4_read_buf] [l4_write_buf]`
//!
//! Without the optional arguments every setting is pingora's default (the
//! downstream L4 buffers included: 64 KiB read, 1460 B write, and the
//! disabled compression module pingora adds; `BARE_NO_MODULES=1` leaves it
//! out, as Countersign does).
//!
//! `BARE_TLS_CERT` and `BARE_TLS_KEY` (PEM files), both set: the listener
//! speaks TLS instead, through pingora's rustls backend (the one Countersign's
//! `listen.tls` uses), with ALPN `h2` and `http/1.1` (`benches/run.sh`'s TLS
//! rows).

use async_trait::async_trait;
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::modules::http::compression::ResponseCompressionBuilder;
use pingora::modules::http::HttpModules;
use pingora::prelude::*;
use pingora::proxy::{ProxyHttp, Session};
use pingora::server::configuration::ServerConf;
use pingora::upstreams::peer::HttpPeer;

struct Bare {
    upstream: (String, u16),
    /// `BARE_NO_MODULES=1`: no downstream modules, as Countersign runs.
    no_modules: bool,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    /// pingora's default, unless `BARE_NO_MODULES=1`.
    fn init_downstream_modules(&self, modules: &mut HttpModules) {
        if !self.no_modules {
            modules.add_module(ResponseCompressionBuilder::enable(0));
        }
    }

    async fn upstream_peer(&self, _: &mut Session, _: &mut ()) -> Result<Box<HttpPeer>> {
        let (host, port) = &self.upstream;
        Ok(Box::new(HttpPeer::new(
            (host.as_str(), *port),
            false,
            String::new(),
        )))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "bare_pingora <listen> <upstream host:port> [threads] [work_stealing 0|1] \
                 [keepalive_pool] [l4_read_buf] [l4_write_buf]";
    let listen = args.get(1).expect(usage).clone();
    let (host, port) = args.get(2).and_then(|u| u.rsplit_once(':')).expect(usage);
    let arg = |i: usize, default: usize| {
        args.get(i)
            .map(|v| v.parse::<usize>().expect(usage))
            .unwrap_or(default)
    };
    let defaults = ServerConf::default();
    let conf = ServerConf {
        threads: arg(3, 1),
        work_stealing: arg(4, defaults.work_stealing as usize) == 1,
        upstream_keepalive_pool_size: arg(5, defaults.upstream_keepalive_pool_size),
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..defaults
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let bare = Bare {
        upstream: (host.to_owned(), port.parse().expect(usage)),
        no_modules: std::env::var("BARE_NO_MODULES").is_ok_and(|v| v == "1"),
    };
    let mut proxy = pingora::proxy::http_proxy_service(&server.configuration, bare);
    let tls = match (
        std::env::var("BARE_TLS_CERT"),
        std::env::var("BARE_TLS_KEY"),
    ) {
        (Ok(cert), Ok(key)) => {
            let mut settings = TlsSettings::intermediate(&cert, &key).expect("TLS settings");
            settings.enable_h2();
            Some(settings)
        }
        _ => None,
    };
    match (args.get(6), args.get(7), tls) {
        (None, None, None) => proxy.add_tcp(&listen),
        (None, None, Some(tls)) => proxy.add_listener(ListenerConfig::tcp(listen).tls(tls)),
        (_, _, tls) => {
            let listener = ListenerConfig::tcp(listen).l4_buffer(L4BufferSettings {
                read: args.get(6).map(|_| arg(6, 0)),
                write: args.get(7).map(|_| arg(7, 0)),
            });
            proxy.add_listener(match tls {
                Some(tls) => listener.tls(tls),
                None => listener,
            })
        }
    }
    server.add_service(proxy);
    server.run_forever();
}
