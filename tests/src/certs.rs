//! Throwaway certificate authorities and certificates, generated at test time with `rcgen`
//! (no key is ever committed to the repository).
//!
//! ```no_run
//! use taskgraph_tests::certs::TestCa;
//! let ca = TestCa::new("job-a")?;
//! // A server+client certificate for 127.0.0.1 and `localhost`, with CN `node-1`.
//! let node = ca.issue("node-1", &["127.0.0.1", "localhost"])?;
//! assert!(node.cert_path().exists() && node.key_path().exists() && ca.cert_path().exists());
//! # Ok::<(), taskgraph_tests::certs::CertError>(())
//! ```

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tempfile::TempDir;

/// Why a certificate could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// rcgen refused the parameters.
    #[error("generating a certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// A file could not be written.
    #[error("writing {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// A certificate authority living in its own temporary directory (removed on drop), which
/// writes each certificate it issues, and its key, as PEM files there.
pub struct TestCa {
    name: String,
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    dir: TempDir,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa")
            .field("name", &self.name)
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

/// A certificate and its private key, as PEM text and as files.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate (PEM).
    pub cert_pem: String,
    /// The private key (PEM, PKCS#8).
    pub key_pem: String,
    cert_path: PathBuf,
    key_path: PathBuf,
}

impl Issued {
    /// The certificate's file.
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }
    /// The key's file.
    pub fn key_path(&self) -> &Path {
        &self.key_path
    }
}

fn write(path: PathBuf, text: &str) -> Result<PathBuf, CertError> {
    std::fs::write(&path, text).map_err(|source| CertError::Io {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

impl TestCa {
    /// A new CA whose certificate names it `taskgraph test CA <name>`; its certificate is
    /// written to `ca.pem` in its directory.
    pub fn new(name: &str) -> Result<TestCa, CertError> {
        let dir = tempfile::Builder::new()
            .prefix("taskgraph-certs-")
            .tempdir()
            .map_err(|source| CertError::Io {
                path: std::env::temp_dir(),
                source,
            })?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("taskgraph test CA {name}"));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        write(dir.path().join("ca.pem"), &cert_pem)?;
        Ok(TestCa {
            name: name.to_owned(),
            issuer: Issuer::new(params, key),
            cert_pem,
            dir,
        })
    }

    /// The CA's certificate (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate's file.
    pub fn cert_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The directory holding every file of this CA.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Issues a certificate with common name `cn` for the names and IP addresses `sans`
    /// (usable as a TLS server and as a TLS client), written to `<cn>.pem` and `<cn>-key.pem`.
    pub fn issue(&self, cn: &str, sans: &[&str]) -> Result<Issued, CertError> {
        let key = KeyPair::generate()?;
        let mut params =
            CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())?;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.issuer)?;
        let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
        let cert_path = write(self.dir.path().join(format!("{cn}.pem")), &cert_pem)?;
        let key_path = write(self.dir.path().join(format!("{cn}-key.pem")), &key_pem)?;
        Ok(Issued {
            cert_pem,
            key_pem,
            cert_path,
            key_path,
        })
    }
}

/// Starts an etcd whose TLS listener requires client certificates from `ca` (its server
/// certificate, for 127.0.0.1 and `localhost`, is issued by `ca` and lives as long as it), with
/// `options` for the rest, and enables authentication with user `root` / `root_password`.
///
/// # Errors
/// A certificate that cannot be issued, an etcd that does not start, or `auth enable` failing.
pub async fn secured_etcd(
    ca: &TestCa,
    root_password: &str,
    options: crate::etcd::EtcdOptions,
) -> Result<crate::etcd::Etcd, String> {
    let server = ca
        .issue("etcd-server", &["127.0.0.1", "localhost"])
        .map_err(|e| e.to_string())?;
    let options = options.with_tls(crate::etcd::EtcdServerTls {
        cert_file: server.cert_path().to_owned(),
        key_file: server.key_path().to_owned(),
        client_ca_file: ca.cert_path(),
        client_cert_auth: true,
    });
    let etcd = crate::etcd::Etcd::start_with(options)
        .await
        .map_err(|e| e.to_string())?;
    etcd.enable_auth(root_password)
        .await
        .map_err(|e| e.to_string())?;
    Ok(etcd)
}
