//! TLS to an upstream (`https` URL): trusting a private CA instead of the
//! public roots, presenting a client certificate (mTLS), and, for
//! development only, not verifying at all (logged at start, refused by
//! `countersign check --production`). The same material configures both
//! ways a call reaches the upstream: pingora's peer (pass-through calls)
//! and the approval engine's HTTP client (approved calls).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use pingora::upstreams::peer::HttpPeer;
use pingora::utils::tls::{parse_x509, CertKey, WrappedX509};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use schemars::JsonSchema;
use serde::Deserialize;

/// `upstreams.<name>.tls`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    /// PEM bundle of the CA(s) that issue the upstream's certificate; only
    /// they are trusted for it (not the public roots).
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// PEM certificate chain the gateway presents (mTLS), with its key.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    /// Development only: accept any certificate. Logged at start; refused
    /// by `countersign check --production`.
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

/// An upstream's TLS material, read and checked at load.
pub struct UpstreamTls {
    /// DER certificates of the CA bundle; empty: the public roots.
    ca: Vec<Vec<u8>>,
    client: Option<ClientCertificate>,
    pub insecure_skip_verify: bool,
}

/// The gateway's certificate chain and key for mTLS to the upstream.
struct ClientCertificate {
    /// DER, leaf first.
    chain: Vec<Vec<u8>>,
    /// DER (PKCS#8, SEC1 or PKCS#1).
    key: Vec<u8>,
    /// The chain and key as PEM, as reqwest reads an identity.
    pem: Vec<u8>,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("ca_certificates", &self.ca.len())
            .field("client_certificate", &self.client.is_some())
            .field("insecure_skip_verify", &self.insecure_skip_verify)
            .finish()
    }
}

fn read(base: &Path, file: &Path) -> Result<(Vec<u8>, String), String> {
    let path = base.join(file);
    let shown = path.display().to_string();
    std::fs::read(&path)
        .map(|bytes| (bytes, shown.clone()))
        .map_err(|e| format!("{shown} cannot be read: {e}"))
}

fn certificates(pem: &[u8], shown: &str) -> Result<Vec<Vec<u8>>, String> {
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{shown} is not PEM: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{shown} holds no CERTIFICATE"));
    }
    Ok(certs.into_iter().map(|c| c.to_vec()).collect())
}

impl UpstreamTls {
    /// Reads the files `config` names, relative paths from `base` (the
    /// configuration's directory): every certificate parses, the key is
    /// the client certificate's.
    pub fn load(config: &UpstreamTlsConfig, base: &Path) -> Result<Self, String> {
        let ca = match &config.ca {
            None => Vec::new(),
            Some(file) => {
                let (pem, shown) = read(base, file)?;
                certificates(&pem, &shown)?
            }
        };
        let client = match (&config.client_cert, &config.client_key) {
            (None, None) => None,
            (Some(_), None) | (None, Some(_)) => {
                return Err("client_cert and client_key go together".into())
            }
            (Some(cert_file), Some(key_file)) => {
                let (cert_pem, cert_shown) = read(base, cert_file)?;
                let (key_pem, key_shown) = read(base, key_file)?;
                let chain = certificates(&cert_pem, &cert_shown)?;
                let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut &key_pem[..])
                    .map_err(|e| format!("{key_shown} is not PEM: {e}"))?
                    .ok_or_else(|| format!("{key_shown} holds no PRIVATE KEY"))?;
                let provider = rustls::crypto::ring::default_provider();
                let certs = chain.iter().cloned().map(CertificateDer::from).collect();
                rustls::sign::CertifiedKey::from_der(certs, key.clone_key(), &provider)
                    .map_err(|e| format!("{key_shown} is not the key of {cert_shown}: {e}"))?;
                let mut pem = cert_pem;
                pem.push(b'\n');
                pem.extend_from_slice(&key_pem);
                Some(ClientCertificate {
                    chain,
                    key: key.secret_der().to_vec(),
                    pem,
                })
            }
        };
        if config.insecure_skip_verify && !ca.is_empty() {
            return Err("insecure_skip_verify turns verification off: a CA bundle would not be used; drop one of them".into());
        }
        Ok(Self {
            ca,
            client,
            insecure_skip_verify: config.insecure_skip_verify,
        })
    }

    /// Pass-through calls: pingora verifies with this CA bundle (only),
    /// presents the client certificate, or skips verification.
    pub fn configure_peer(&self, peer: &mut HttpPeer) {
        if !self.ca.is_empty() {
            let bundle: Vec<WrappedX509> = self
                .ca
                .iter()
                .map(|der| WrappedX509::new(der.clone(), parse_x509))
                .collect();
            peer.options.ca = Some(Arc::from(bundle));
        }
        if let Some(client) = &self.client {
            peer.client_cert_key = Some(Arc::new(CertKey::new(
                client.chain.clone(),
                client.key.clone(),
            )));
        }
        if self.insecure_skip_verify {
            peer.options.verify_cert = false;
            peer.options.verify_hostname = false;
        }
    }

    /// Approved calls: the engine's client trusts the same CA bundle
    /// (instead of the public roots) and presents the same certificate.
    pub fn configure_client(
        &self,
        mut builder: reqwest::ClientBuilder,
    ) -> Result<reqwest::ClientBuilder, String> {
        if !self.ca.is_empty() {
            builder = builder.tls_built_in_root_certs(false);
            for der in &self.ca {
                let certificate =
                    reqwest::Certificate::from_der(der).map_err(|e| format!("CA bundle: {e}"))?;
                builder = builder.add_root_certificate(certificate);
            }
        }
        if let Some(client) = &self.client {
            let identity = reqwest::Identity::from_pem(&client.pem)
                .map_err(|e| format!("client certificate: {e}"))?;
            builder = builder.identity(identity);
        }
        if self.insecure_skip_verify {
            builder = builder.danger_accept_invalid_certs(true);
        }
        Ok(builder)
    }
}
