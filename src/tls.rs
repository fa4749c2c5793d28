//! TLS on the proxy listener: certificates chosen by SNI, read again when
//! their files change (new handshakes get the new ones; open connections
//! keep theirs), and optionally client certificates from a CA.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::TlsAccept;
use pingora::protocols::tls::TlsRef;
use pingora::tls::sign::CertifiedKey;
use pingora::tls::{ClientHello, ResolvesServerCert};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use sha2::{Digest, Sha256};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("{file}: {why}")]
    File { file: PathBuf, why: String },
}

fn file_error(file: &Path, why: impl Into<String>) -> TlsError {
    TlsError::File {
        file: file.to_owned(),
        why: why.into(),
    }
}

/// One certificate chain with its key, and the names it is served for.
#[derive(Debug)]
struct Served {
    /// DNS names of the leaf (SAN, else CN), lower case; `*.x` wildcards.
    names: Vec<String>,
    key: Arc<CertifiedKey>,
}

/// The certificates in force.
#[derive(Debug)]
struct Loaded {
    served: Vec<Served>,
    /// Digest of every file read, to notice a change.
    digest: [u8; 32],
}

/// Certificate files resolved against the configuration's directory.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pairs: Vec<(PathBuf, PathBuf)>,
    client_ca: Option<PathBuf>,
    http2: bool,
}

impl TlsFiles {
    /// Certificate `pairs` (chain, key) and the `client_ca`, relative paths
    /// taken from `base` (the directory of the configuration file).
    pub fn new(
        pairs: impl IntoIterator<Item = (PathBuf, PathBuf)>,
        client_ca: Option<&Path>,
        http2: bool,
        base: &Path,
    ) -> Self {
        Self {
            pairs: pairs
                .into_iter()
                .map(|(cert, key)| (base.join(cert), base.join(key)))
                .collect(),
            client_ca: client_ca.map(|ca| base.join(ca)),
            http2,
        }
    }

    /// Checks that every pair loads and matches (for `check` and start-up):
    /// the index of the bad pair and why.
    pub fn check(&self) -> Result<(), (usize, TlsError)> {
        for (i, (cert, key)) in self.pairs.iter().enumerate() {
            load_pair(cert, key).map_err(|e| (i, e))?;
        }
        Ok(())
    }

    fn load(&self) -> Result<Loaded, TlsError> {
        let mut hasher = Sha256::new();
        let mut served = Vec::new();
        for (cert, key) in &self.pairs {
            for file in [cert, key] {
                hasher.update(read(file)?);
            }
            served.push(load_pair(cert, key)?);
        }
        Ok(Loaded {
            served,
            digest: hasher.finalize().into(),
        })
    }

    /// The digest of the files as they are now (`None`: one is unreadable).
    fn digest(&self) -> Option<[u8; 32]> {
        let mut hasher = Sha256::new();
        for (cert, key) in &self.pairs {
            for file in [cert, key] {
                hasher.update(std::fs::read(file).ok()?);
            }
        }
        Some(hasher.finalize().into())
    }
}

fn read(file: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(file).map_err(|e| file_error(file, format!("cannot be read: {e}")))
}

fn load_pair(cert_file: &Path, key_file: &Path) -> Result<Served, TlsError> {
    let certs: Vec<CertificateDer<'static>> =
        rustls_pemfile::certs(&mut read(cert_file)?.as_slice())
            .collect::<Result<_, _>>()
            .map_err(|e| file_error(cert_file, format!("is not PEM: {e}")))?;
    let Some(leaf) = certs.first() else {
        return Err(file_error(cert_file, "holds no CERTIFICATE"));
    };
    let names = names_of(leaf).map_err(|why| file_error(cert_file, why))?;
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut read(key_file)?.as_slice())
        .map_err(|e| file_error(key_file, format!("is not PEM: {e}")))?
        .ok_or_else(|| file_error(key_file, "holds no PRIVATE KEY"))?;
    let provider = rustls::crypto::ring::default_provider();
    let key = CertifiedKey::from_der(certs, key, &provider).map_err(|e| {
        file_error(
            key_file,
            format!("is not the key of {}: {e}", cert_file.display()),
        )
    })?;
    Ok(Served {
        names,
        key: Arc::new(key),
    })
}

/// The DNS names a leaf certificate is valid for.
fn names_of(leaf: &CertificateDer<'_>) -> Result<Vec<String>, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| format!("its certificate cannot be parsed: {e}"))?;
    let mut names: Vec<String> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => {
                        Some(d.to_ascii_lowercase())
                    }
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    if names.is_empty() {
        names.extend(
            cert.subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok())
                .map(str::to_ascii_lowercase),
        );
    }
    Ok(names)
}

/// Chooses the certificate for a handshake by its SNI; the first
/// configured one when no name matches (or no SNI was sent).
#[derive(Debug)]
pub struct CertResolver {
    loaded: ArcSwap<Loaded>,
    files: TlsFiles,
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let loaded = self.loaded.load();
        let served = &loaded.served;
        let chosen = hello
            .server_name()
            .map(str::to_ascii_lowercase)
            .and_then(|sni| {
                served
                    .iter()
                    .find(|s| s.names.iter().any(|n| matches(n, &sni)))
            })
            .or_else(|| served.first());
        chosen.map(|s| s.key.clone())
    }
}

/// `name` (possibly `*.example.com`, one label) covers `sni`.
fn matches(name: &str, sni: &str) -> bool {
    match name.strip_prefix("*.") {
        Some(parent) => sni
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == parent),
        None => name == sni,
    }
}

impl CertResolver {
    pub fn new(files: TlsFiles) -> Result<Arc<Self>, TlsError> {
        let loaded = files.load()?;
        Ok(Arc::new(Self {
            loaded: ArcSwap::from_pointee(loaded),
            files,
        }))
    }

    /// Reads the files again if they changed: `Some(Ok)` when new
    /// certificates are in force, `Some(Err)` when the change did not load
    /// (the old ones stay), `None` when nothing changed.
    pub fn reload_if_changed(&self) -> Option<Result<(), TlsError>> {
        let now = self.files.digest()?;
        if now == self.loaded.load().digest {
            return None;
        }
        Some(
            self.files
                .load()
                .map(|loaded| self.loaded.store(Arc::new(loaded))),
        )
    }

    /// Watches the files every `every`, for as long as the runtime runs.
    pub async fn watch(self: Arc<Self>, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            match self.reload_if_changed() {
                None => {}
                Some(Ok(())) => tracing::info!("TLS certificates reloaded"),
                Some(Err(error)) => {
                    tracing::warn!(%error, "TLS certificates changed but do not load; the previous ones stay in force")
                }
            }
        }
    }

    /// The listener's TLS settings: this resolver, TLS 1.2 and 1.3 (all
    /// that rustls speaks), HTTP/2 by ALPN if configured, client
    /// certificates if a CA is configured.
    pub fn settings(self: &Arc<Self>) -> Result<TlsSettings, TlsError> {
        let settings = if self.files.client_ca.is_some() {
            TlsSettings::with_callbacks(Box::new(AgentCertificates))
        } else {
            TlsSettings::intermediate("", "")
        };
        let mut settings =
            settings.map_err(|e| file_error(Path::new("listen.tls"), e.to_string()))?;
        settings.set_cert_resolver(self.clone());
        if let Some(ca) = &self.files.client_ca {
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_pemfile::certs(&mut read(ca)?.as_slice()) {
                let cert = cert.map_err(|e| file_error(ca, format!("is not PEM: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| file_error(ca, format!("is not a CA certificate: {e}")))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                Arc::new(rustls::crypto::ring::default_provider()),
            )
            .build()
            .map_err(|e| file_error(ca, e.to_string()))?;
            settings.set_client_cert_verifier(verifier);
        }
        if self.files.http2 {
            settings.enable_h2();
        }
        Ok(settings)
    }
}

/// The client certificate an agent connected with, as conditions and
/// templates read it (`agent.subject`, `agent.dns`, ...): kept with the
/// connection's TLS digest.
#[derive(Debug, Clone)]
pub struct AgentCertificate(pub serde_json::Value);

/// Reads the verified client certificate once per connection.
struct AgentCertificates;

#[async_trait::async_trait]
impl TlsAccept for AgentCertificates {
    async fn handshake_complete_callback(
        &self,
        tls: &TlsRef,
    ) -> Option<Arc<dyn std::any::Any + Send + Sync>> {
        let described = describe_certificate(tls.peer_certificate_der()?)?;
        Some(Arc::new(AgentCertificate(described)))
    }
}

/// `{subject, dns, uri, email, serial}` of a client certificate: the
/// subject's CN, and the subjectAltName entries of each kind.
fn describe_certificate(der: &[u8]) -> Option<serde_json::Value> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned);
    let (mut dns, mut uri, mut email) = (Vec::new(), Vec::new(), Vec::new());
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(n) => dns.push(n.to_string()),
                GeneralName::URI(u) => uri.push(u.to_string()),
                GeneralName::RFC822Name(e) => email.push(e.to_string()),
                _ => {}
            }
        }
    }
    Some(serde_json::json!({
        "subject": subject,
        "dns": dns,
        "uri": uri,
        "email": email,
        "serial": cert.raw_serial_as_string(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_cover_one_label() {
        assert!(matches("*.example.com", "api.example.com"));
        assert!(!matches("*.example.com", "a.b.example.com"));
        assert!(!matches("*.example.com", "example.com"));
        assert!(matches("shop.example", "shop.example"));
        assert!(!matches("shop.example", "shop.example.evil"));
    }
}
