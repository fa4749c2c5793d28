//! The front door over either protocol: HTTP/1.1 as the suites always
//! spoke it, and HTTP/2 over TLS (ALPN `h2`) through the same gateway
//! code. A [`Call`] is a method, target, headers and body; over HTTP/2 its
//! `Host` becomes `:authority` and the connection-only fields HTTP/2 has
//! no place for (`connection`) are left out.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rustls::pki_types::ServerName;
use serde_json::Value;

use super::certs::Ca;

/// The name the gateway's test certificate is for.
pub const TLS_NAME: &str = "shop.test";

/// Which protocol a row runs over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Http1,
    Http2,
}

/// A CA and a certificate for [`TLS_NAME`], and the `listen.tls` of a
/// gateway serving it (HTTP/2 by ALPN).
pub struct Tls {
    pub ca: Ca,
    pub listen: String,
    _dir: tempfile::TempDir,
}

impl Tls {
    pub fn new() -> Self {
        Self::for_names(&[TLS_NAME])
    }

    /// A certificate for `names` (an IP address is an IP SAN), the CA also
    /// written as `ca.pem` (see [`Tls::ca_file`]).
    pub fn for_names(names: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new();
        // A subject of its own: rcgen's default is the CA's, which OpenSSL
        // (Node) takes for a self-signed certificate.
        let (cert, key) = ca.leaf_named(names, "countersign test gateway");
        std::fs::write(dir.path().join("shop.pem"), cert).unwrap();
        std::fs::write(dir.path().join("shop.key"), key).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        let listen = format!(
            "{{ certificates: [{{ cert: {0}/shop.pem, key: {0}/shop.key }}] }}",
            dir.path().display()
        );
        Self {
            ca,
            listen,
            _dir: dir,
        }
    }

    /// The CA's certificate as a PEM file (for `NODE_EXTRA_CA_CERTS`).
    pub fn ca_file(&self) -> std::path::PathBuf {
        self._dir.path().join("ca.pem")
    }

    /// A reqwest client that speaks only HTTP/2 to the gateway at `addr`
    /// (TLS, `shop.test`, this CA only).
    pub fn reqwest_h2(&self, addr: SocketAddr) -> reqwest::Client {
        reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(self.ca.pem().as_bytes()).unwrap())
            .tls_built_in_root_certs(false)
            .use_rustls_tls()
            .http2_prior_knowledge()
            .resolve(TLS_NAME, addr)
            .build()
            .unwrap()
    }

    /// The base URL of the gateway at `addr` over TLS.
    pub fn base(&self, addr: SocketAddr) -> String {
        format!("https://{TLS_NAME}:{}", addr.port())
    }

    /// The client TLS configuration: this CA only, ALPN `h2`.
    pub fn h2_config(&self) -> Arc<rustls::ClientConfig> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut roots = rustls::RootCertStore::empty();
        for der in rustls_pemfile::certs(&mut self.ca.pem().as_bytes()) {
            roots.add(der.unwrap()).unwrap();
        }
        let mut config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    }

    /// A raw HTTP/2 connection to the gateway at `addr`, `shop.test` by SNI.
    pub async fn connect(&self, addr: SocketAddr) -> h2::client::SendRequest<Bytes> {
        connect(self.h2_config(), addr).await
    }
}

/// A raw HTTP/2 connection to the gateway at `addr` over TLS as `config`
/// says, `shop.test` by SNI; ALPN must pick `h2`.
pub async fn connect(
    config: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
) -> h2::client::SendRequest<Bytes> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from(TLS_NAME).unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (client, connection) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

impl Default for Tls {
    fn default() -> Self {
        Self::new()
    }
}

/// One call as a client sends it: the same over either protocol.
#[derive(Clone, Debug)]
pub struct Call {
    pub method: String,
    /// Origin-form (`/shop?x=1`) or `*`.
    pub target: String,
    /// In order, repeats kept; `host` among them.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Call {
    /// The HTTP/2 request: `:authority` from the first `host` (else
    /// `default_authority`), every other field as given (a second `host`
    /// too) but `connection`.
    pub fn h2_request(&self, default_authority: &str) -> http::Request<()> {
        let first_host = self
            .headers
            .iter()
            .position(|(n, _)| n.eq_ignore_ascii_case("host"));
        let authority = first_host.map_or(default_authority, |i| self.headers[i].1.as_str());
        // `:path` "*" (`OPTIONS *`, RFC 9113 §8.3.1) is no URI string's
        // path: the parts say it.
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(http::uri::Scheme::HTTPS);
        parts.authority = Some(authority.parse().unwrap());
        parts.path_and_query = Some(self.target.parse().unwrap());
        let uri = http::Uri::from_parts(parts).unwrap();
        let mut builder = http::Request::builder()
            .method(http::Method::from_bytes(self.method.as_bytes()).unwrap())
            .uri(uri);
        for (i, (name, value)) in self.headers.iter().enumerate() {
            let lower = name.to_ascii_lowercase();
            if Some(i) == first_host || lower == "connection" {
                continue;
            }
            builder = builder.header(
                http::HeaderName::from_bytes(lower.as_bytes()).unwrap(),
                http::HeaderValue::from_bytes(value.as_bytes()).unwrap(),
            );
        }
        builder.body(()).unwrap()
    }
}

/// Sends `request` with `body` (its DATA frames, then end of stream) on
/// `client`: the status and body of the answer, or the stream's error.
pub async fn h2_send(
    client: &mut h2::client::SendRequest<Bytes>,
    request: http::Request<()>,
    body: &[u8],
) -> Result<(u16, Value), h2::Error> {
    let mut client = client.clone().ready().await?;
    let (response, mut stream) = client.send_request(request, body.is_empty())?;
    if !body.is_empty() {
        stream.send_data(Bytes::copy_from_slice(body), true)?;
    }
    let response = response.await?;
    let status = response.status().as_u16();
    let mut body = response.into_body();
    let mut bytes = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        bytes.extend_from_slice(&chunk);
    }
    Ok((
        status,
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned())),
    ))
}

/// `call` over HTTP/2 on a connection of its own, waiting at most
/// `timeout`: the status and body, or why there was none.
pub async fn h2_call(
    config: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    call: &Call,
    timeout: Duration,
) -> Result<(u16, Value), String> {
    let mut client = connect(config, addr).await;
    let request = call.h2_request(TLS_NAME);
    match tokio::time::timeout(timeout, h2_send(&mut client, request, &call.body)).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(e)) => Err(format!("stream error: {e}")),
        Err(_) => Err("no answer (held?)".to_owned()),
    }
}
