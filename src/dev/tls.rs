//! `countersign dev --tls`: a development CA and a certificate for
//! `localhost` and `127.0.0.1` signed by it, kept in dev mode's state
//! directory. The CA (certificate and key) is made once and reused by every
//! later run, so a CA the developer chose to trust stays trusted; the leaf is
//! made again on each run from that CA. Key files are written 0600 in a 0700
//! directory.
//!
//! DEVELOPMENT ONLY: whoever can read the CA key can impersonate any site to
//! a machine that trusts the CA.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// The names the leaf certificate is valid for.
pub const LEAF_NAMES: [&str; 2] = ["localhost", "127.0.0.1"];

const CA_NAME: &str = "Countersign development CA (countersign dev)";

/// The files of dev mode's TLS, all PEM.
#[derive(Debug, Clone)]
pub struct DevTls {
    /// The CA certificate a client trusts (`curl --cacert`).
    pub ca: PathBuf,
    /// The CA's private key (0600).
    pub ca_key: PathBuf,
    /// The gateway's certificate chain: the leaf, then the CA.
    pub cert: PathBuf,
    /// The leaf's private key (0600).
    pub key: PathBuf,
    /// Whether the CA was made by this run (false: reused).
    pub ca_created: bool,
}

/// The default state directory of dev mode: `$XDG_STATE_HOME/countersign/dev`,
/// else `~/.local/state/countersign/dev`.
pub fn default_state_dir() -> anyhow::Result<PathBuf> {
    let base = match std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        Some(state) => PathBuf::from(state),
        None => match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
            Some(home) => PathBuf::from(home).join(".local").join("state"),
            None => bail!("neither XDG_STATE_HOME nor HOME is set: give --state-dir"),
        },
    };
    Ok(base.join("countersign").join("dev"))
}

/// The CA in `state_dir/tls` (made there if absent) and a fresh leaf for
/// [`LEAF_NAMES`] signed by it.
pub fn ensure(state_dir: &Path) -> anyhow::Result<DevTls> {
    let dir = state_dir.join("tls");
    create_private_dir(&dir)?;
    let files = DevTls {
        ca: dir.join("ca.pem"),
        ca_key: dir.join("ca-key.pem"),
        cert: dir.join("localhost.pem"),
        key: dir.join("localhost-key.pem"),
        ca_created: false,
    };
    let (ca_key, ca_pem, ca_created) = match (files.ca.exists(), files.ca_key.exists()) {
        (true, true) => {
            let (key, pem) = read_ca(&files.ca, &files.ca_key)?;
            (key, pem, false)
        }
        (false, false) => {
            let key = KeyPair::generate().context("cannot generate the development CA's key")?;
            let pem = ca_params()
                .self_signed(&key)
                .context("cannot make the development CA")?
                .pem();
            write_private(&files.ca_key, key.serialize_pem().as_bytes())?;
            write_private(&files.ca, pem.as_bytes())?;
            (key, pem, true)
        }
        (true, false) | (false, true) => bail!(
            "{}: only one of ca.pem and ca-key.pem is there; remove the other to make a new CA",
            dir.display()
        ),
    };
    // The issuer as rcgen signs with it: the same name and key as the CA
    // written above (the leaf names its issuer by name and key identifier).
    let issuer = ca_params()
        .self_signed(&ca_key)
        .context("cannot read the development CA")?;
    let leaf_key = KeyPair::generate().context("cannot generate the certificate's key")?;
    let leaf = leaf_params()?
        .signed_by(&leaf_key, &issuer, &ca_key)
        .context("cannot sign the localhost certificate")?;
    write_private(&files.key, leaf_key.serialize_pem().as_bytes())?;
    write_private(&files.cert, format!("{}{ca_pem}", leaf.pem()).as_bytes())?;
    Ok(DevTls {
        ca_created,
        ..files
    })
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, CA_NAME);
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn leaf_params() -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::new(LEAF_NAMES.map(String::from).to_vec())
        .context("cannot name the localhost certificate")?;
    params
        .distinguished_name
        .push(DnType::CommonName, LEAF_NAMES[0]);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    // Made on every run, so short-lived: from a year ago to a year ahead
    // (clients refuse leaves valid for much longer).
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(365);
    params.not_after = now + time::Duration::days(365);
    Ok(params)
}

/// The stored CA: its key, and its certificate if it is that key's.
fn read_ca(ca: &Path, ca_key: &Path) -> anyhow::Result<(KeyPair, String)> {
    tighten(ca_key)?;
    let key_pem = std::fs::read_to_string(ca_key)
        .with_context(|| format!("{}: cannot be read", ca_key.display()))?;
    let key = KeyPair::from_pem(&key_pem)
        .with_context(|| format!("{}: is not a PEM private key", ca_key.display()))?;
    let pem =
        std::fs::read_to_string(ca).with_context(|| format!("{}: cannot be read", ca.display()))?;
    let der = rustls_pemfile::certs(&mut pem.as_bytes())
        .next()
        .and_then(Result::ok)
        .with_context(|| format!("{}: holds no PEM certificate", ca.display()))?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| anyhow::anyhow!("{}: cannot be parsed: {e}", ca.display()))?;
    if cert.public_key().raw != key.public_key_der().as_slice() {
        bail!(
            "{} is not the certificate of {}; remove both to make a new CA",
            ca.display(),
            ca_key.display()
        );
    }
    Ok((key, pem))
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))
}

/// Makes an existing key file readable by its owner only.
fn tighten(file: &Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot make {} private (0600)", file.display()))?;
    }
    let _ = file;
    Ok(())
}

/// Writes `bytes` to `file` (mode 0600) through a temporary file renamed
/// over it, so a reader never sees half a key.
fn write_private(file: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = file.with_extension("pem.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let written = options.open(&tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()
    });
    written
        .and_then(|()| std::fs::rename(&tmp, file))
        .with_context(|| format!("cannot write {}", file.display()))?;
    tighten(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    fn mode(file: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::metadata(file).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn the_ca_is_made_once_and_kept_private() {
        let state = tempfile::tempdir().unwrap();
        let first = ensure(state.path()).unwrap();
        assert!(first.ca_created);
        let ca = std::fs::read(&first.ca).unwrap();
        let leaf = std::fs::read(&first.cert).unwrap();
        #[cfg(unix)]
        {
            assert_eq!(mode(&first.ca_key), 0o600);
            assert_eq!(mode(&first.key), 0o600);
            assert_eq!(mode(&state.path().join("tls")), 0o700);
        }
        let second = ensure(state.path()).unwrap();
        assert!(!second.ca_created);
        assert_eq!(std::fs::read(&second.ca).unwrap(), ca, "the CA is reused");
        assert_ne!(std::fs::read(&second.cert).unwrap(), leaf, "a new leaf");
        // The chain loads as the gateway loads it, for localhost and the IP.
        let files = crate::tls::TlsFiles::new(
            [(second.cert.clone(), second.key.clone())],
            None,
            true,
            Path::new(""),
        );
        files.check().unwrap();
    }

    #[test]
    fn a_ca_that_is_not_its_keys_is_refused() {
        let state = tempfile::tempdir().unwrap();
        let first = ensure(state.path()).unwrap();
        let other = tempfile::tempdir().unwrap();
        let second = ensure(other.path()).unwrap();
        std::fs::copy(&second.ca, &first.ca).unwrap();
        let err = ensure(state.path()).unwrap_err().to_string();
        assert!(err.contains("is not the certificate of"), "{err}");
        std::fs::remove_file(&first.ca).unwrap();
        let err = ensure(state.path()).unwrap_err().to_string();
        assert!(err.contains("only one of"), "{err}");
    }
}
