//! Flag groups for an application's `main` to `#[command(flatten)]`: [`LocalArgs`] (a local
//! run), [`NodeArgs`] (a node process), [`SecurityArgs`] (TLS and etcd authentication).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use taskgraph::{ConfigError, EtcdAuth, EtcdTls, FrameworkBuilder, PeerTls, Secret};
use tracing_subscriber::EnvFilter;

use crate::job::{Chaos, LocalJob};

/// Flags of a local run (none has an environment variable: they steer the launcher, not the
/// nodes). Apply them with [`apply`](LocalArgs::apply).
///
/// ```
/// use clap::Parser;
///
/// #[derive(Parser)]
/// struct Cli {
///     #[command(flatten)]
///     local: taskgraph_launch::LocalArgs,
/// }
///
/// let cli = Cli::parse_from(["app", "--spares", "2", "--chaos-kill-every", "700ms"]);
/// assert_eq!(cli.local.spares, 2);
/// let chaos = cli.local.chaos().map(|c| c.interval());
/// assert_eq!(chaos, Some((std::time::Duration::from_millis(700), std::time::Duration::from_millis(700))));
/// ```
#[derive(Debug, Clone, Args)]
pub struct LocalArgs {
    /// Nodes beyond tasks × replicas, waiting to take over a task whose nodes all died.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=10_000))]
    pub spares: u32,
    /// Kill a random node with SIGKILL at this interval (e.g. `700ms`) and start a new one,
    /// until the job ends.
    #[arg(long, value_parser = chaos_interval)]
    pub chaos_kill_every: Option<Duration>,
    /// Seed of the chaos mode's choice of victims.
    #[arg(long, default_value_t = 1)]
    pub chaos_seed: u64,
    /// Write the nodes' logs (`node-<i>.log`) into this folder and keep them; by default they
    /// go to a temporary folder, kept only when the job fails.
    #[arg(long)]
    pub node_logs: Option<PathBuf>,
    /// Give up (exit 3) when the job has stayed stalled this long after the nodes first
    /// reported it (e.g. `2m`). Default: five times the nodes' stall time, at least a minute —
    /// a stall under chaos or on a loaded machine often heals by itself.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub stall_limit: Option<Duration>,
    /// Give up (and exit non-zero) if the job has not finished after this long.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// No progress bar, only the summary.
    #[arg(long, short)]
    pub quiet: bool,
}

impl LocalArgs {
    /// The chaos mode these flags ask for.
    pub fn chaos(&self) -> Option<Chaos> {
        self.chaos_kill_every
            .map(|every| Chaos::every(every).seed(self.chaos_seed))
    }

    /// Applies every flag to `job`: spares, chaos, node logs, stall limit, time limit, and
    /// `--quiet` (no progress bar).
    pub fn apply(&self, job: LocalJob) -> LocalJob {
        job.spares(self.spares)
            .chaos(self.chaos())
            .node_logs(self.node_logs.clone())
            .stall_limit(self.stall_limit)
            .timeout(Some(self.timeout))
            .progress_bar(!self.quiet)
    }
}

fn chaos_interval(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))?;
    if d < Duration::from_millis(10) {
        return Err(format!("{s:?}: at least 10ms"));
    }
    Ok(d)
}

/// The environment variable holding the etcd password (there is deliberately no flag for the
/// password itself: a flag's value shows in `ps`).
pub const PASSWORD_ENV: &str = "TASKGRAPH_ETCD_PASSWORD";

/// TLS to etcd, etcd authentication, and mutual TLS between nodes. Files are PEM. The etcd
/// password is read from `--etcd-password-file` or from `TASKGRAPH_ETCD_PASSWORD`, never
/// from a flag's value.
#[derive(Debug, Clone, Default, Args)]
pub struct SecurityArgs {
    /// CA certificate that etcd's server certificate chains to; turns on TLS to etcd (use
    /// https:// endpoints).
    #[arg(long, env = "TASKGRAPH_ETCD_CA", help_heading = "Security")]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate presented to etcd (for etcd's --client-cert-auth); needs
    /// --etcd-key and --etcd-ca.
    #[arg(long, env = "TASKGRAPH_ETCD_CERT", requires_all = ["etcd_key", "etcd_ca"], help_heading = "Security")]
    pub etcd_cert: Option<PathBuf>,
    /// Private key of --etcd-cert.
    #[arg(
        long,
        env = "TASKGRAPH_ETCD_KEY",
        requires = "etcd_cert",
        help_heading = "Security"
    )]
    pub etcd_key: Option<PathBuf>,
    /// Name to check etcd's certificate against, instead of the endpoint's host.
    #[arg(
        long,
        env = "TASKGRAPH_ETCD_SERVER_NAME",
        requires = "etcd_ca",
        help_heading = "Security"
    )]
    pub etcd_server_name: Option<String>,
    /// etcd user; its password comes from --etcd-password-file or TASKGRAPH_ETCD_PASSWORD.
    #[arg(long, env = "TASKGRAPH_ETCD_USER", help_heading = "Security")]
    pub etcd_user: Option<String>,
    /// File holding the etcd user's password (e.g. a mounted Kubernetes Secret).
    #[arg(
        long,
        env = "TASKGRAPH_ETCD_PASSWORD_FILE",
        requires = "etcd_user",
        help_heading = "Security"
    )]
    pub etcd_password_file: Option<PathBuf>,
    /// The job's CA: turns on mutual TLS between nodes (needs --peer-cert and --peer-key).
    #[arg(long, env = "TASKGRAPH_PEER_CA", requires_all = ["peer_cert", "peer_key"], help_heading = "Security")]
    pub peer_ca: Option<PathBuf>,
    /// This node's certificate, issued by the job's CA.
    #[arg(
        long,
        env = "TASKGRAPH_PEER_CERT",
        requires = "peer_ca",
        help_heading = "Security"
    )]
    pub peer_cert: Option<PathBuf>,
    /// Private key of --peer-cert.
    #[arg(
        long,
        env = "TASKGRAPH_PEER_KEY",
        requires = "peer_ca",
        help_heading = "Security"
    )]
    pub peer_key: Option<PathBuf>,
    /// Name every node's certificate carries (e.g. `<job>.taskgraph`); checked on each peer
    /// called, instead of its address.
    #[arg(
        long,
        env = "TASKGRAPH_PEER_SERVER_NAME",
        requires = "peer_ca",
        help_heading = "Security"
    )]
    pub peer_server_name: Option<String>,
}

impl SecurityArgs {
    /// TLS to etcd, if `--etcd-ca` is given.
    pub fn etcd_tls(&self) -> Option<EtcdTls> {
        let ca = self.etcd_ca.as_ref()?;
        let mut tls = EtcdTls::new(ca);
        if let (Some(c), Some(k)) = (&self.etcd_cert, &self.etcd_key) {
            tls = tls.identity(c, k);
        }
        if let Some(n) = &self.etcd_server_name {
            tls = tls.server_name(n);
        }
        Some(tls)
    }

    /// The etcd user with its password (from the file, else the environment), if
    /// `--etcd-user` is given.
    pub fn etcd_auth(&self) -> Result<Option<EtcdAuth>, ConfigError> {
        let Some(user) = &self.etcd_user else {
            return Ok(None);
        };
        let password = match &self.etcd_password_file {
            Some(f) => Secret::from_file(f),
            None => Secret::from_env(PASSWORD_ENV).map_err(|_| {
                ConfigError::Missing(
                    "etcd password: set TASKGRAPH_ETCD_PASSWORD or --etcd-password-file",
                )
            }),
        }?;
        Ok(Some(EtcdAuth::new(user, password)))
    }

    /// Mutual TLS between nodes, if `--peer-ca` is given.
    pub fn peer_tls(&self) -> Option<PeerTls> {
        let (ca, cert, key) = (
            self.peer_ca.as_ref()?,
            self.peer_cert.as_ref()?,
            self.peer_key.as_ref()?,
        );
        let tls = PeerTls::new(ca, cert, key);
        Some(match &self.peer_server_name {
            Some(n) => tls.server_name(n),
            None => tls,
        })
    }

    /// Applies every setting to a node's builder.
    pub fn apply(&self, mut builder: FrameworkBuilder) -> Result<FrameworkBuilder, ConfigError> {
        if let Some(tls) = self.etcd_tls() {
            builder = builder.etcd_tls(tls);
        }
        if let Some(auth) = self.etcd_auth()? {
            builder = builder.etcd_auth(auth);
        }
        if let Some(tls) = self.peer_tls() {
            builder = builder.peer_tls(tls);
        }
        Ok(builder)
    }

    /// The flags that reproduce these settings (file paths and names only: the password
    /// travels in the inherited environment or its file).
    pub fn to_flags(&self) -> Vec<String> {
        let mut v = Vec::new();
        let mut path = |flag: &str, p: &Option<PathBuf>| {
            if let Some(p) = p {
                v.push(format!("--{flag}={}", p.display()));
            }
        };
        path("etcd-ca", &self.etcd_ca);
        path("etcd-cert", &self.etcd_cert);
        path("etcd-key", &self.etcd_key);
        path("etcd-password-file", &self.etcd_password_file);
        path("peer-ca", &self.peer_ca);
        path("peer-cert", &self.peer_cert);
        path("peer-key", &self.peer_key);
        for (flag, value) in [
            ("etcd-server-name", &self.etcd_server_name),
            ("etcd-user", &self.etcd_user),
            ("peer-server-name", &self.peer_server_name),
        ] {
            if let Some(value) = value {
                v.push(format!("--{flag}={value}"));
            }
        }
        v
    }
}

/// Flags of a node process (each also read from its `TASKGRAPH_*` environment variable):
/// where it listens and how it is named and logs. Apply them with
/// [`apply`](NodeArgs::apply).
#[derive(Debug, Clone, Args)]
pub struct NodeArgs {
    /// Address the node's gRPC server listens on.
    #[arg(long, default_value = "127.0.0.1:0", env = "TASKGRAPH_LISTEN")]
    pub listen: SocketAddr,
    /// `host:port` other nodes reach this one at (default: the bound address; on Kubernetes,
    /// the pod IP and the listen port).
    #[arg(long, env = "TASKGRAPH_ADVERTISE")]
    pub advertise: Option<String>,
    /// A readable prefix of the node's id (e.g. the pod name).
    #[arg(long, env = "TASKGRAPH_NODE_NAME")]
    pub node_name: Option<String>,
    /// Address to serve Prometheus metrics (`/metrics`), liveness (`/healthz`) and readiness
    /// (`/readyz`) on over HTTP, e.g. `0.0.0.0:9100`. No HTTP server without it.
    #[arg(long, env = "TASKGRAPH_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Log format on stderr: `text` or `json`. Filter with `RUST_LOG` (default `info`).
    #[arg(long, value_enum, default_value = "text", env = "TASKGRAPH_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Stop cleanly when standard input closes (the local launcher passes it, so its nodes
    /// never outlive it; see [`stdin_closed`](crate::stdin_closed)).
    #[arg(long, hide = true)]
    pub stop_on_stdin_eof: bool,
}

/// The log format of a node on stderr (see [`init_logs`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

impl NodeArgs {
    /// Applies the listen and advertised addresses, the node name and the metrics address to
    /// a node's builder.
    pub fn apply(&self, mut builder: FrameworkBuilder) -> FrameworkBuilder {
        builder = builder.listen(self.listen);
        if let Some(a) = &self.advertise {
            builder = builder.advertise(a);
        }
        if let Some(n) = &self.node_name {
            builder = builder.node_name(n);
        }
        if let Some(m) = self.metrics_addr {
            builder = builder.metrics_addr(m);
        }
        builder
    }
}

/// Sends `tracing` logs to stderr in `format`, filtered by `RUST_LOG` (else `default`, e.g.
/// `info`). Call it once, first thing in `main`.
pub fn init_logs(format: LogFormat, default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    // Colours only on a terminal: a launched node's standard error is its log file.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    #[derive(Debug, Parser)]
    struct App {
        #[command(flatten)]
        local: LocalArgs,
        #[command(flatten)]
        node: NodeArgs,
        #[command(flatten)]
        security: SecurityArgs,
    }

    #[test]
    fn the_groups_flatten_together_and_security_flags_round_trip() {
        App::command().debug_assert();
        let app = App::try_parse_from([
            "app",
            "--listen=127.0.0.1:7000",
            "--node-name=pod-3",
            "--chaos-kill-every=300ms",
            "--etcd-ca=/ca.pem",
            "--etcd-user=alice",
            "--etcd-password-file=/pw",
            "--peer-ca=/job.pem",
            "--peer-cert=/node.pem",
            "--peer-key=/node.key",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(app.node.listen.port(), 7000);
        assert_eq!(
            app.local.chaos(),
            Some(Chaos::every(Duration::from_millis(300)))
        );
        let flags = app.security.to_flags();
        let again = App::try_parse_from(std::iter::once("app".to_owned()).chain(flags.clone()))
            .unwrap_or_else(|e| panic!("{flags:?}: {e}"));
        assert_eq!(again.security.to_flags(), flags);
        assert!(again.security.peer_tls().is_some() && again.security.etcd_tls().is_some());
        // A flag that needs another is refused without it.
        assert!(App::try_parse_from(["app", "--peer-ca=/job.pem"]).is_err());
        assert!(App::try_parse_from(["app", "--chaos-kill-every=1ms"]).is_err());
    }
}
