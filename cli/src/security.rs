//! TLS and authentication to etcd: the flags (each also a `TASKGRAPH_*` environment variable)
//! and the connection they make. The password comes from `--etcd-password-file` or
//! `TASKGRAPH_ETCD_PASSWORD`, never from a flag's value (which would show in `ps`).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use taskgraph::{EtcdAuth, EtcdTls, JobClient, Secret};

/// The environment variable holding the etcd password.
pub const PASSWORD_ENV: &str = "TASKGRAPH_ETCD_PASSWORD";

/// etcd TLS and authentication flags.
#[derive(Debug, Clone, Default, Args)]
pub struct EtcdSecurityArgs {
    /// CA certificate (PEM) that etcd's server certificate chains to; turns on TLS to etcd
    /// (use https:// endpoints).
    #[arg(
        long,
        global = true,
        env = "TASKGRAPH_ETCD_CA",
        help_heading = "Security"
    )]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) presented to etcd, for etcd's --client-cert-auth.
    #[arg(
        long,
        global = true,
        env = "TASKGRAPH_ETCD_CERT",
        help_heading = "Security"
    )]
    pub etcd_cert: Option<PathBuf>,
    /// Private key (PEM) of --etcd-cert.
    #[arg(
        long,
        global = true,
        env = "TASKGRAPH_ETCD_KEY",
        help_heading = "Security"
    )]
    pub etcd_key: Option<PathBuf>,
    /// Name to check etcd's certificate against, instead of the endpoint's host.
    #[arg(
        long,
        global = true,
        env = "TASKGRAPH_ETCD_SERVER_NAME",
        help_heading = "Security"
    )]
    pub etcd_server_name: Option<String>,
    /// etcd user; the password comes from --etcd-password-file or TASKGRAPH_ETCD_PASSWORD.
    #[arg(
        long,
        global = true,
        env = "TASKGRAPH_ETCD_USER",
        help_heading = "Security"
    )]
    pub etcd_user: Option<String>,
    /// File holding the etcd user's password.
    #[arg(
        long,
        global = true,
        env = "TASKGRAPH_ETCD_PASSWORD_FILE",
        help_heading = "Security"
    )]
    pub etcd_password_file: Option<PathBuf>,
}

/// Where etcd is and how to reach it.
#[derive(Debug, Clone)]
pub struct EtcdConn {
    endpoints: Vec<String>,
    tls: Option<EtcdTls>,
    auth: Option<EtcdAuth>,
}

impl EtcdConn {
    /// Checks the flags and reads the password.
    pub fn new(endpoints: Vec<String>, args: &EtcdSecurityArgs) -> Result<EtcdConn, String> {
        let tls = match (&args.etcd_ca, &args.etcd_cert, &args.etcd_key) {
            (None, None, None) => {
                if args.etcd_server_name.is_some() {
                    return Err("--etcd-server-name needs --etcd-ca".into());
                }
                None
            }
            (None, _, _) => return Err("--etcd-cert and --etcd-key need --etcd-ca".into()),
            (Some(ca), cert, key) => {
                let mut tls = EtcdTls::new(ca);
                match (cert, key) {
                    (Some(c), Some(k)) => tls = tls.identity(c, k),
                    (None, None) => {}
                    _ => return Err("give both --etcd-cert and --etcd-key, or neither".into()),
                }
                if let Some(n) = &args.etcd_server_name {
                    tls = tls.server_name(n);
                }
                Some(tls)
            }
        };
        let auth = match &args.etcd_user {
            None if args.etcd_password_file.is_some() => {
                return Err("--etcd-password-file needs --etcd-user".into())
            }
            None => None,
            Some(user) => {
                let password = match &args.etcd_password_file {
                    Some(f) => Secret::from_file(f).map_err(|e| e.to_string())?,
                    None => Secret::from_env(PASSWORD_ENV).map_err(|_| {
                        format!("--etcd-user {user:?} needs {PASSWORD_ENV} or --etcd-password-file")
                    })?,
                };
                Some(EtcdAuth::new(user, password))
            }
        };
        Ok(EtcdConn {
            endpoints,
            tls,
            auth,
        })
    }

    /// A client for `job` (trying for up to 5 s while etcd is unreachable).
    pub async fn connect(&self, job: &str) -> Result<JobClient, taskgraph::Error> {
        JobClient::connect_secure(
            &self.endpoints,
            job,
            Duration::from_secs(5),
            self.tls.as_ref(),
            self.auth.as_ref(),
        )
        .await
    }

    /// Every job's name (the user needs read access to all of `/taskgraph/jobs/`).
    pub async fn job_names(&self) -> Result<Vec<String>, taskgraph::Error> {
        JobClient::job_names_secure(&self.endpoints, self.tls.as_ref(), self.auth.as_ref()).await
    }
}
