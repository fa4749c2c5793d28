//! Forwarding: the upstream a call goes to, and the request it receives.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use http::HeaderValue;
use pingora::http::RequestHeader;
use pingora::prelude::*;
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType};
use prometheus::Histogram;

use super::{CallCtx, Countersign, COUNTERSIGN_TOKENS_HEADER, GATEWAY_HEADER_PREFIX};
use crate::config::UpstreamConfig;
use crate::identity::IdentitySource;
use crate::metrics::Metrics;

/// A configured upstream.
#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    pub config: UpstreamConfig,
    /// Built once when the upstream is an IP address; a name is resolved
    /// per call, asynchronously (pingora would resolve it blocking, and
    /// panic when it does not resolve).
    fixed_peer: Option<HttpPeer>,
    /// Its `countersign_upstream_request_duration_seconds` series, resolved
    /// once: `with_label_values` per call hashes the label and takes a lock.
    pub(super) duration: Histogram,
    /// The Host header it receives (unless `preserve_host`), built once: a
    /// `&str` would be validated and copied into a new value per call.
    host_header: Option<HeaderValue>,
}

impl Upstream {
    pub fn new(name: String, config: UpstreamConfig, metrics: &Metrics) -> Self {
        let fixed_peer = config
            .url
            .host
            .parse::<IpAddr>()
            .ok()
            .map(|ip| build_peer(&config, SocketAddr::new(ip, config.url.port)));
        let host_header = HeaderValue::from_str(config.url.authority()).ok();
        Self {
            host_header,
            duration: metrics
                .upstream_duration
                .with_label_values(&[name.as_str()]),
            name,
            config,
            fixed_peer,
        }
    }

    pub(super) async fn peer(&self) -> Result<Box<HttpPeer>> {
        if let Some(peer) = &self.fixed_peer {
            return Ok(Box::new(peer.clone()));
        }
        let url = &self.config.url;
        let address = tokio::net::lookup_host((url.host.as_str(), url.port))
            .await
            .ok()
            .and_then(|mut addresses| addresses.next())
            .ok_or_else(|| {
                Error::explain(
                    ErrorType::ConnectNoRoute,
                    format!("upstream {} ({}) does not resolve", self.name, url.host),
                )
                .into_up()
            })?;
        Ok(Box::new(build_peer(&self.config, address)))
    }
}

fn build_peer(config: &UpstreamConfig, address: SocketAddr) -> HttpPeer {
    let url = &config.url;
    // SNI only means something with TLS; without it an empty name saves
    // copying the host into every per-call clone of the peer.
    let sni = if url.tls {
        url.host.clone()
    } else {
        String::new()
    };
    let mut peer = HttpPeer::new(address, url.tls, sni);
    peer.options.connection_timeout = Some(config.connect_timeout);
    peer.options.total_connection_timeout = Some(config.connect_timeout + Duration::from_secs(5));
    peer.options.read_timeout = Some(config.timeout);
    peer.options.write_timeout = Some(config.timeout);
    peer.options.idle_timeout = Some(Duration::from_secs(60));
    if let Some(tls) = &config.tls_material {
        tls.configure_peer(&mut peer);
    }
    peer
}

impl Countersign {
    /// The upstream request of a pass-through call: the upstream's Host and
    /// no header only the gateway may set.
    pub(super) fn prepare_upstream_request(
        &self,
        request: &mut RequestHeader,
        ctx: &CallCtx,
    ) -> Result<()> {
        if let Some(upstream) = &ctx.upstream {
            if !upstream.config.preserve_host {
                match &upstream.host_header {
                    Some(host) => request.insert_header(http::header::HOST, host.clone())?,
                    None => request
                        .insert_header(http::header::HOST, upstream.config.url.authority())?,
                }
            }
        }
        request.remove_header(&http::header::EXPECT);
        remove_gateway_headers(request, &self.identity);
        if ctx.policy.is_some() && !ctx.passed_by_condition {
            // Fail closed: an approved call is forwarded by the approval
            // engine (src/upstream.rs), never through pingora's upstream path;
            // only a call its policy's conditions let pass comes here.
            return Err(Error::explain(
                ErrorType::InternalError,
                "a policy call reached pingora's upstream path",
            ));
        }
        Ok(())
    }
}

/// Upstreams may trust `x-countersign-*` and the identity header (in header
/// mode), so an agent's own copies never reach them, on any call; nor do
/// their `_` spellings, which CGI-style servers read as the same header
/// ([`crate::request::dashed`]).
fn remove_gateway_headers(request: &mut RequestHeader, identity: &IdentitySource) {
    let identity = match identity {
        IdentitySource::Header(name) => Some(name.as_str()),
        _ => None,
    };
    let forged: Vec<http::HeaderName> = request
        .headers
        .keys()
        .filter(|name| is_gateway_header(name.as_str(), identity))
        .cloned()
        .collect();
    for name in &forged {
        request.remove_header(name);
    }
}

/// Whether `name` (lower case) is, or is read by CGI-style servers as, a
/// header only the gateway sets.
fn is_gateway_header(name: &str, identity_header: Option<&str>) -> bool {
    let name = crate::request::dashed(name);
    name.starts_with(GATEWAY_HEADER_PREFIX)
        || name.eq_ignore_ascii_case(COUNTERSIGN_TOKENS_HEADER)
        || identity_header.is_some_and(|h| crate::request::dashed(h).eq_ignore_ascii_case(&name))
}
