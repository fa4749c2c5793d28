//! Certificates for tests, made by rcgen: a CA and the leaves it signs.

use std::path::Path;

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};

/// A CA, and what it signs.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Default for Ca {
    fn default() -> Self {
        Self::new()
    }
}

impl Ca {
    pub fn new() -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        Self { cert, key }
    }

    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A leaf for `names`: (certificate PEM, key PEM).
    pub fn leaf(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// A leaf for `names` whose subject's common name is `cn`.
    pub fn leaf_named(&self, names: &[&str], cn: &str) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Writes a leaf for `names` as `<dir>/<stem>.pem` and `<stem>.key`.
    pub fn write_leaf(&self, dir: &Path, stem: &str, names: &[&str]) {
        let (cert, key) = self.leaf(names);
        std::fs::write(dir.join(format!("{stem}.pem")), cert).unwrap();
        std::fs::write(dir.join(format!("{stem}.key")), key).unwrap();
    }
}
