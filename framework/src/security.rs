//! Security settings: TLS to etcd, etcd authentication, and mutual TLS between nodes.
//!
//! * [`EtcdTls`]: the CA that etcd's server certificate must chain to, and optionally the
//!   client certificate and key this process presents to etcd (when etcd runs with
//!   `--client-cert-auth`). Endpoints must then be `https://`.
//! * [`EtcdAuth`]: an etcd user and its password. The password is a [`Secret`], read from a
//!   file ([`Secret::from_file`]) or an environment variable ([`Secret::from_env`]); it is never
//!   printed (its `Debug` shows `<redacted>`) nor logged.
//! * [`PeerTls`]: the node-to-node transport's mutual TLS. Every node presents a certificate
//!   issued by the job's CA and accepts pulls, metas, replication and pings only from peers
//!   whose certificate chains to that CA; it checks the certificate of every node it calls
//!   the same way; with [`PeerTls::server_name`], certificates must also carry that name,
//!   both ways.
//!
//! All files are PEM. They are read once, when the [`FrameworkBuilder`](crate::FrameworkBuilder)
//! builds (a missing or unreadable file is a [`ConfigError`] before anything touches etcd).
//! Without [`PeerTls`] the transport is plain-text HTTP/2, for local development only: each
//! node then logs a warning at start.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::ConfigError;

/// A secret string (an etcd password). Its `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    /// A secret given by the program itself (e.g. from its own secret store).
    pub fn new(secret: impl Into<String>) -> Secret {
        Secret(Arc::from(secret.into()))
    }

    /// Reads the secret from a file, without a trailing line break (as a Kubernetes Secret
    /// mounted as a file holds it). An empty file is refused.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Secret, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Invalid {
            setting: "password file",
            reason: format!("cannot read {}: {e}", path.display()),
        })?;
        let text = text.trim_end_matches(['\n', '\r']);
        if text.is_empty() {
            return Err(ConfigError::Invalid {
                setting: "password file",
                reason: format!("{} is empty", path.display()),
            });
        }
        Ok(Secret::new(text))
    }

    /// Reads the secret from environment variable `var`; unset or empty is refused.
    pub fn from_env(var: &str) -> Result<Secret, ConfigError> {
        match std::env::var(var) {
            Ok(v) if !v.is_empty() => Ok(Secret::new(v)),
            Ok(_) => Err(ConfigError::Invalid {
                setting: "password",
                reason: format!("environment variable {var} is empty"),
            }),
            Err(e) => Err(ConfigError::Invalid {
                setting: "password",
                reason: format!("environment variable {var}: {e}"),
            }),
        }
    }

    /// The secret itself, for the one place that sends it.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// An etcd user and its password (etcd's `--auth-token` may be `simple` or `jwt`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdAuth {
    /// The etcd user.
    pub user: String,
    /// Its password.
    pub password: Secret,
}

impl EtcdAuth {
    /// `user` with `password`.
    pub fn new(user: impl Into<String>, password: Secret) -> EtcdAuth {
        EtcdAuth {
            user: user.into(),
            password,
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.user.is_empty() || self.user.contains(char::is_control) {
            return Err(ConfigError::Invalid {
                setting: "etcd user",
                reason: format!("{:?} is not a user name", self.user),
            });
        }
        Ok(())
    }
}

/// TLS to etcd: the CA to verify etcd's certificate with, and the optional client certificate
/// and key presented to etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTls {
    /// PEM file of the CA (or CAs) etcd's server certificate chains to.
    pub ca_file: PathBuf,
    /// PEM file of this process's client certificate (with `key_file`), for an etcd started
    /// with `--client-cert-auth`.
    pub cert_file: Option<PathBuf>,
    /// PEM file of the client certificate's private key.
    pub key_file: Option<PathBuf>,
    /// The name to check etcd's certificate against instead of the endpoint's host.
    pub server_name: Option<String>,
}

impl EtcdTls {
    /// Verifies etcd with the CA in `ca_file`, presenting no client certificate.
    pub fn new(ca_file: impl Into<PathBuf>) -> EtcdTls {
        EtcdTls {
            ca_file: ca_file.into(),
            cert_file: None,
            key_file: None,
            server_name: None,
        }
    }

    /// Also presents the client certificate `cert_file` with its key `key_file`.
    pub fn identity(mut self, cert_file: impl Into<PathBuf>, key_file: impl Into<PathBuf>) -> Self {
        self.cert_file = Some(cert_file.into());
        self.key_file = Some(key_file.into());
        self
    }

    /// Checks etcd's certificate against `name` instead of the endpoint's host.
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// Reads and checks the files.
    pub(crate) fn load(&self) -> Result<LoadedTls, ConfigError> {
        let loaded = self.read()?;
        loaded.check_client("etcd TLS")?;
        Ok(loaded)
    }

    fn read(&self) -> Result<LoadedTls, ConfigError> {
        let identity = match (&self.cert_file, &self.key_file) {
            (Some(c), Some(k)) => Some(load_identity("etcd", c, k)?),
            (None, None) => None,
            _ => {
                return Err(ConfigError::Invalid {
                    setting: "etcd TLS",
                    reason: "give both a client certificate and its key, or neither".into(),
                })
            }
        };
        Ok(LoadedTls {
            ca_pem: read_pem("etcd CA file", &self.ca_file, "CERTIFICATE")?,
            identity,
            server_name: checked_name("etcd TLS server name", &self.server_name)?,
        })
    }
}

/// Mutual TLS between the nodes of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerTls {
    /// PEM file of the job's CA: peers' certificates must chain to it (and nothing else).
    pub ca_file: PathBuf,
    /// PEM file of this node's certificate, issued by the job's CA. It is presented both as a
    /// server certificate (to nodes calling this one) and as a client certificate.
    pub cert_file: PathBuf,
    /// PEM file of its private key.
    pub key_file: PathBuf,
    /// The name every node's certificate of the job carries (e.g. `<job>.taskgraph`), checked
    /// both ways: a node checks the certificate of each peer it calls against it, and refuses
    /// calls whose client certificate is not valid for it (so one CA can serve several jobs,
    /// each with its own name). Without it, a server's certificate is checked against the
    /// peer's advertised host (usually an IP address), so certificates must name each node's
    /// address — impractical where addresses change (Kubernetes pods): set it there — and
    /// callers are checked only for chaining to the CA.
    pub server_name: Option<String>,
}

impl PeerTls {
    /// The job's CA, this node's certificate and key.
    pub fn new(
        ca_file: impl Into<PathBuf>,
        cert_file: impl Into<PathBuf>,
        key_file: impl Into<PathBuf>,
    ) -> PeerTls {
        PeerTls {
            ca_file: ca_file.into(),
            cert_file: cert_file.into(),
            key_file: key_file.into(),
            server_name: None,
        }
    }

    /// Checks each called peer's certificate against `name` (see [`PeerTls::server_name`]).
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// Reads and checks the files.
    pub(crate) fn load(&self) -> Result<LoadedTls, ConfigError> {
        let loaded = LoadedTls {
            ca_pem: read_pem("peer CA file", &self.ca_file, "CERTIFICATE")?,
            identity: Some(load_identity("peer", &self.cert_file, &self.key_file)?),
            server_name: checked_name("peer TLS server name", &self.server_name)?,
        };
        loaded.check_client("peer TLS")?;
        loaded.check_server("peer TLS")?;
        Ok(loaded)
    }
}

/// PEM contents of a TLS configuration, read from its files. `Debug` never shows the key.
#[derive(Clone, PartialEq, Eq)]
pub struct LoadedTls {
    /// The trusted CA certificate(s).
    pub ca_pem: Vec<u8>,
    /// The certificate and key presented, if any.
    pub identity: Option<(Vec<u8>, Secret)>,
    /// The name to check the server's certificate against, if not its host; for the node
    /// transport, also the name every caller's certificate must be valid for.
    pub server_name: Option<String>,
}

impl LoadedTls {
    /// From PEM text: the trusted CA, and this side's certificate and key if any.
    pub fn from_pem(
        ca_pem: impl Into<Vec<u8>>,
        identity: Option<(Vec<u8>, String)>,
        server_name: Option<String>,
    ) -> LoadedTls {
        LoadedTls {
            ca_pem: ca_pem.into(),
            identity: identity.map(|(c, k)| (c, Secret::new(k))),
            server_name,
        }
    }

    /// Builds the client side once, so that unusable PEM (a certificate or key that does not
    /// parse, a key that does not match) is a [`ConfigError`] at build time.
    pub(crate) fn check_client(&self, setting: &'static str) -> Result<(), ConfigError> {
        tonic::transport::Endpoint::from_static("https://localhost")
            .tls_config(self.client_config())
            .map(|_| ())
            .map_err(|e| ConfigError::Invalid {
                setting,
                reason: format!("unusable certificate, key or CA: {}", error_chain(&e)),
            })
    }

    /// Builds the server side once (see [`LoadedTls::check_client`]).
    pub(crate) fn check_server(&self, setting: &'static str) -> Result<(), ConfigError> {
        let Some(identity) = self.tonic_identity() else {
            return Err(ConfigError::Invalid {
                setting,
                reason: "a server needs a certificate and its key".into(),
            });
        };
        let config = tonic::transport::ServerTlsConfig::new()
            .identity(identity)
            .client_ca_root(self.tonic_ca());
        tonic::transport::Server::builder()
            .tls_config(config)
            .map(|_| ())
            .map_err(|e| ConfigError::Invalid {
                setting,
                reason: format!("unusable certificate, key or CA: {}", error_chain(&e)),
            })
    }

    pub(crate) fn tonic_identity(&self) -> Option<tonic::transport::Identity> {
        self.identity
            .as_ref()
            .map(|(cert, key)| tonic::transport::Identity::from_pem(cert, key.expose()))
    }

    pub(crate) fn tonic_ca(&self) -> tonic::transport::Certificate {
        tonic::transport::Certificate::from_pem(&self.ca_pem)
    }

    /// The client side: trusts only the CA, presents the identity if any.
    pub(crate) fn client_config(&self) -> tonic::transport::ClientTlsConfig {
        let mut config = tonic::transport::ClientTlsConfig::new().ca_certificate(self.tonic_ca());
        if let Some(id) = self.tonic_identity() {
            config = config.identity(id);
        }
        if let Some(name) = &self.server_name {
            config = config.domain_name(name.clone());
        }
        config
    }
}

impl fmt::Debug for LoadedTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedTls")
            .field("ca_pem_bytes", &self.ca_pem.len())
            .field("identity", &self.identity.as_ref().map(|_| "<redacted>"))
            .field("server_name", &self.server_name)
            .finish()
    }
}

fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![err.to_string()];
    let mut next = err.source();
    while let Some(e) = next {
        let t = e.to_string();
        if !parts.last().is_some_and(|l| l.contains(&t)) {
            parts.push(t);
        }
        next = e.source();
    }
    parts.join(": ")
}

fn read_pem(setting: &'static str, path: &Path, label: &str) -> Result<Vec<u8>, ConfigError> {
    let bytes = std::fs::read(path).map_err(|e| ConfigError::Invalid {
        setting,
        reason: format!("cannot read {}: {e}", path.display()),
    })?;
    let text = String::from_utf8_lossy(&bytes);
    let found = text
        .lines()
        .any(|l| l.starts_with("-----BEGIN ") && l.trim_end().ends_with(&format!("{label}-----")));
    if !found {
        return Err(ConfigError::Invalid {
            setting,
            reason: format!("{} holds no PEM {label}", path.display()),
        });
    }
    Ok(bytes)
}

fn load_identity(
    what: &'static str,
    cert: &Path,
    key: &Path,
) -> Result<(Vec<u8>, Secret), ConfigError> {
    let (cert_setting, key_setting) = match what {
        "etcd" => ("etcd client certificate", "etcd client key"),
        _ => ("peer certificate", "peer key"),
    };
    let cert = read_pem(cert_setting, cert, "CERTIFICATE")?;
    let key_bytes = read_pem(key_setting, key, "PRIVATE KEY")?;
    let key_text = String::from_utf8(key_bytes).map_err(|_| ConfigError::Invalid {
        setting: key_setting,
        reason: format!("{} is not PEM text", key.display()),
    })?;
    Ok((cert, Secret::new(key_text)))
}

fn checked_name(
    setting: &'static str,
    name: &Option<String>,
) -> Result<Option<String>, ConfigError> {
    if let Some(n) = name {
        let ok = |c: char| c.is_ascii_alphanumeric() || "-.:".contains(c);
        if n.is_empty() || n.len() > 253 || !n.chars().all(ok) {
            return Err(ConfigError::Invalid {
                setting,
                reason: format!("{n:?} is not a DNS name or IP address"),
            });
        }
    }
    Ok(name.clone())
}

/// The security settings of a node or client, validated and loaded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EtcdSecurity {
    /// TLS to etcd, loaded.
    pub tls: Option<LoadedTls>,
    /// The etcd user.
    pub auth: Option<EtcdAuth>,
}

impl EtcdSecurity {
    /// Loads the TLS files and checks the settings against the endpoints: `https://` needs
    /// TLS settings, TLS settings need `https://` (or scheme-less) endpoints.
    pub fn load(
        endpoints: &[String],
        tls: Option<&EtcdTls>,
        auth: Option<&EtcdAuth>,
    ) -> Result<EtcdSecurity, ConfigError> {
        if let Some(a) = auth {
            a.validate()?;
        }
        let tls = tls.map(EtcdTls::load).transpose()?;
        for e in endpoints {
            if tls.is_some() && e.starts_with("http://") {
                return Err(ConfigError::Invalid {
                    setting: "etcd endpoint",
                    reason: format!("{e:?}: with etcd TLS settings, use https:// endpoints"),
                });
            }
            if tls.is_none() && e.starts_with("https://") {
                return Err(ConfigError::Invalid {
                    setting: "etcd endpoint",
                    reason: format!("{e:?}: an https:// endpoint needs the etcd CA file"),
                });
            }
        }
        Ok(EtcdSecurity {
            tls,
            auth: auth.cloned(),
        })
    }

    /// How the connection is protected, for a start-up log line (no secret in it).
    pub fn describe(&self) -> String {
        let tls = match &self.tls {
            None => "plain text (no TLS)",
            Some(t) if t.identity.is_some() => "TLS with a client certificate",
            Some(_) => "TLS",
        };
        match &self.auth {
            Some(a) => format!("{tls}, as etcd user {:?}", a.user),
            None => format!("{tls}, without etcd user"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "Secret(<redacted>) <redacted>");
        let auth = EtcdAuth::new("alice", s.clone());
        assert!(!format!("{auth:?}").contains("hunter2"));
        let tls = LoadedTls::from_pem(
            b"ca".to_vec(),
            Some((b"cert".to_vec(), "KEYMATERIAL".into())),
            None,
        );
        assert!(!format!("{tls:?}").contains("KEYMATERIAL"));
        let sec = EtcdSecurity {
            tls: Some(tls),
            auth: Some(auth),
        };
        assert!(!format!("{sec:?} {}", sec.describe()).contains("hunter2"));
    }

    #[test]
    fn secret_from_file_and_env() {
        let dir = std::env::temp_dir().join(format!("tg-secret-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap_or_default();
        let f = dir.join("pw");
        std::fs::write(&f, "s3cret\n").unwrap_or_default();
        assert_eq!(
            Secret::from_file(&f).map(|s| s.expose().to_owned()).ok(),
            Some("s3cret".into())
        );
        std::fs::write(&f, "\n").unwrap_or_default();
        assert!(Secret::from_file(&f).is_err());
        assert!(Secret::from_file(dir.join("missing")).is_err());
        assert!(Secret::from_env("TASKGRAPH_TEST_SURELY_UNSET_VARIABLE").is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn endpoints_must_match_tls() {
        let plain = ["http://127.0.0.1:2379".to_owned()];
        let secure = ["https://127.0.0.1:2379".to_owned()];
        assert!(EtcdSecurity::load(&plain, None, None).is_ok());
        assert!(EtcdSecurity::load(&secure, None, None).is_err());
        let missing = EtcdTls::new("/nonexistent/ca.pem");
        let e = EtcdSecurity::load(&secure, Some(&missing), None).map(|_| ());
        assert!(format!("{e:?}").contains("cannot read"), "{e:?}");
        let half = EtcdTls {
            cert_file: Some("/x".into()),
            ..EtcdTls::new("/y")
        };
        assert!(half.load().is_err());
    }
}
