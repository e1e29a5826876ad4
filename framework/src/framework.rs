//! The entry point of a driver: configure a node with [`Framework::builder`], then run it with
//! [`Framework::start`] (or [`Framework::spawn`] to keep a handle).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use taskgraph_topology::Links;

use crate::app::TaskBuilder;
use crate::config::Config;
use crate::error::{ConfigError, Error};
use crate::node::{self, NodeExit, NodeHandle};
use crate::security::{EtcdAuth, EtcdTls, PeerTls};

/// One node of a job, configured and validated, ready to start.
pub struct Framework {
    config: Arc<Config>,
    builder: Arc<dyn TaskBuilder>,
    node_name: Option<String>,
}

impl std::fmt::Debug for Framework {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Framework")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Builds a [`Framework`]; every setting is checked by [`FrameworkBuilder::build`] before
/// anything touches etcd.
pub struct FrameworkBuilder {
    etcd: Vec<String>,
    job: Option<String>,
    tasks: Option<u32>,
    replicas: u32,
    links: Links,
    lease_ttl: Duration,
    stall_after: Option<Duration>,
    listen: SocketAddr,
    advertise: Option<String>,
    metrics_addr: Option<SocketAddr>,
    etcd_request_timeout: Duration,
    etcd_connect_timeout: Duration,
    max_checkpoint_bytes: usize,
    max_frame_bytes: usize,
    builder: Option<Arc<dyn TaskBuilder>>,
    node_name: Option<String>,
    params: BTreeMap<String, String>,
    etcd_tls: Option<EtcdTls>,
    etcd_auth: Option<EtcdAuth>,
    peer_tls: Option<PeerTls>,
}

impl std::fmt::Debug for FrameworkBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameworkBuilder")
            .field("job", &self.job)
            .finish_non_exhaustive()
    }
}

impl Framework {
    /// A builder with defaults: 1 replica (no backups), lease TTL 5 s, listening on
    /// `127.0.0.1:0`, etcd requests timing out after 2 s, 10 s to reach etcd at start.
    pub fn builder() -> FrameworkBuilder {
        FrameworkBuilder {
            etcd: Vec::new(),
            job: None,
            tasks: None,
            replicas: 1,
            links: Links::new(),
            lease_ttl: Duration::from_secs(5),
            stall_after: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise: None,
            metrics_addr: None,
            etcd_request_timeout: Duration::from_secs(2),
            etcd_connect_timeout: Duration::from_secs(10),
            max_checkpoint_bytes: 1 << 20,
            max_frame_bytes: 64 << 20,
            builder: None,
            node_name: None,
            params: BTreeMap::new(),
            etcd_tls: None,
            etcd_auth: None,
            peer_tls: None,
        }
    }

    /// The validated configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Binds the listener (and the metrics listener, if configured) and runs the node in the
    /// background; returns a handle to watch, stop or crash it.
    pub async fn spawn(self) -> Result<NodeHandle, Error> {
        let listener = bind(self.config.listen).await?;
        let mut config = (*self.config).clone();
        if config.advertise.is_none() {
            // Port 0 means "any": advertise the port actually bound.
            if let Ok(addr) = listener.local_addr() {
                config.advertise = Some(addr.to_string());
            }
        }
        let metrics_listener = match self.config.metrics_addr {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        let base = self.node_name.unwrap_or_else(|| "node".to_owned());
        let node_id = format!("{base}-{:016x}", rand::random::<u64>());
        Ok(node::spawn(
            Arc::new(config),
            self.builder,
            listener,
            metrics_listener,
            node_id,
        ))
    }

    /// Runs the node until the job finishes or the process is asked to stop (SIGTERM or
    /// Ctrl-C: the node stops cleanly, revoking its lease so a backup takes over at once).
    pub async fn start(self) -> Result<NodeExit, Error> {
        let handle = self.spawn().await?;
        handle.stop_on(stop_signal()).await
    }
}

async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, Error> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Listen {
            addr: addr.to_string(),
            source,
        })
}

/// Completes on SIGTERM or Ctrl-C.
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            tracing::info!("asked to stop: handing over and leaving");
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
    tracing::info!("asked to stop: handing over and leaving");
}

impl FrameworkBuilder {
    /// etcd endpoints, e.g. `["http://127.0.0.1:2379"]`.
    pub fn etcd<I, S>(mut self, endpoints: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.etcd = endpoints.into_iter().map(Into::into).collect();
        self
    }
    /// The job's name (1 to 63 characters of `a-z0-9-_.`).
    pub fn job(mut self, job: impl Into<String>) -> Self {
        self.job = Some(job.into());
        self
    }
    /// Number of tasks.
    pub fn tasks(mut self, tasks: u32) -> Self {
        self.tasks = Some(tasks);
        self
    }
    /// Nodes per task: 1 primary plus `replicas - 1` backups.
    pub fn replicas(mut self, replicas: u32) -> Self {
        self.replicas = replicas;
        self
    }
    /// The application's links.
    pub fn links(mut self, links: Links) -> Self {
        self.links = links;
        self
    }
    /// The lease TTL (whole seconds, at least 1).
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }
    /// After how long without a move of the job's epoch the node reports the job as stalled
    /// (logged at error level with what it can tell about why, and written into its record in
    /// etcd for `taskgraph status`, `taskgraph events` and launchers). Default: three lease
    /// TTLs plus three times the slowest epoch the node has seen. Set it above your longest
    /// epoch when a first epoch alone may take longer than that. At least one second.
    pub fn stall_after(mut self, after: Duration) -> Self {
        self.stall_after = Some(after);
        self
    }
    /// Where the node's gRPC server listens (default `127.0.0.1:0`).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }
    /// The `host:port` other nodes use to reach this node (default: the bound address).
    pub fn advertise(mut self, addr: impl Into<String>) -> Self {
        self.advertise = Some(addr.into());
        self
    }
    /// Serves the node's Prometheus metrics (`GET /metrics`), liveness (`GET /healthz`) and
    /// readiness (`GET /readyz`) over HTTP on `addr` (port 0: any free port; see
    /// [`NodeHandle::metrics_addr`](crate::NodeHandle::metrics_addr)). Default: no HTTP server.
    /// The metrics and both checks are described in [`crate::metrics`]. Refused by
    /// [`build`](FrameworkBuilder::build) if it would share the gRPC listen port.
    pub fn metrics_addr(mut self, addr: SocketAddr) -> Self {
        self.metrics_addr = Some(addr);
        self
    }
    /// Deadline of one etcd request (default 2 s).
    pub fn etcd_request_timeout(mut self, t: Duration) -> Self {
        self.etcd_request_timeout = t;
        self
    }
    /// How long to try reaching etcd at start (default 10 s).
    pub fn etcd_connect_timeout(mut self, t: Duration) -> Self {
        self.etcd_connect_timeout = t;
        self
    }
    /// Largest checkpoint a task may store in etcd (default 1 MiB; etcd refuses requests over
    /// 1.5 MiB by default).
    pub fn max_checkpoint_bytes(mut self, bytes: usize) -> Self {
        self.max_checkpoint_bytes = bytes;
        self
    }
    /// Largest gRPC frame (pull, answer, meta, replication entry) a node sends or accepts
    /// (default 64 MiB). Larger ones are refused with a clear status.
    pub fn max_frame_bytes(mut self, bytes: usize) -> Self {
        self.max_frame_bytes = bytes;
        self
    }
    /// A readable prefix for the node's id (e.g. the pod name); a random suffix is added.
    pub fn node_name(mut self, name: impl Into<String>) -> Self {
        self.node_name = Some(name.into());
        self
    }
    /// An application parameter of the job (a seed, a learning rate, a data set's name...).
    /// Parameters are stored with the job's spec: a node started with different ones is
    /// refused with [`Error::SpecConflict`](crate::Error::SpecConflict) naming the difference,
    /// so all nodes of a job compute with the same settings.
    pub fn param(mut self, name: impl Into<String>, value: impl ToString) -> Self {
        self.params.insert(name.into(), value.to_string());
        self
    }
    /// Talks to etcd over TLS (the endpoints must be `https://`): verifies etcd's certificate
    /// with the CA in [`EtcdTls::ca_file`] and, if given, presents a client certificate (for
    /// an etcd started with `--client-cert-auth`). See [`EtcdTls`], and the README's
    /// "Security" section.
    pub fn etcd_tls(mut self, tls: EtcdTls) -> Self {
        self.etcd_tls = Some(tls);
        self
    }
    /// Authenticates to etcd as `auth.user` with its password (read it with
    /// [`Secret::from_file`](crate::Secret::from_file) or
    /// [`Secret::from_env`](crate::Secret::from_env); it is never logged). A wrong password,
    /// or a user whose roles do not grant readwrite on the job's prefix, fails the start with
    /// [`Error::EtcdRefused`](crate::Error::EtcdRefused).
    pub fn etcd_auth(mut self, auth: EtcdAuth) -> Self {
        self.etcd_auth = Some(auth);
        self
    }
    /// Mutual TLS between the job's nodes: this node presents [`PeerTls::cert_file`], accepts
    /// calls only from peers whose certificate chains to [`PeerTls::ca_file`], and checks the
    /// certificate of every peer it calls. All nodes of a job must use it (a plain-text node
    /// cannot talk to a TLS one). Without it the transport is plain text, logged as a warning
    /// at start.
    pub fn peer_tls(mut self, tls: PeerTls) -> Self {
        self.peer_tls = Some(tls);
        self
    }
    /// The application's task builder.
    pub fn task_builder(mut self, builder: impl TaskBuilder) -> Self {
        self.builder = Some(Arc::new(builder));
        self
    }

    /// Checks every setting and returns the framework, or the first problem found.
    pub fn build(self) -> Result<Framework, ConfigError> {
        let config = Config {
            etcd_endpoints: self.etcd,
            job: self.job.ok_or(ConfigError::Missing("job name"))?,
            tasks: self.tasks.ok_or(ConfigError::Missing("number of tasks"))?,
            replicas: self.replicas,
            links: self.links,
            lease_ttl: self.lease_ttl,
            stall_after: self.stall_after,
            listen: self.listen,
            advertise: self.advertise,
            metrics_addr: self.metrics_addr,
            etcd_request_timeout: self.etcd_request_timeout,
            etcd_connect_timeout: self.etcd_connect_timeout,
            max_checkpoint_bytes: self.max_checkpoint_bytes,
            max_frame_bytes: self.max_frame_bytes,
            params: self.params,
            etcd_tls: self.etcd_tls,
            etcd_auth: self.etcd_auth,
            peer_tls: self.peer_tls,
        };
        config.validate()?;
        let builder = self.builder.ok_or(ConfigError::Missing("task builder"))?;
        if let Some(name) = &self.node_name {
            let ok = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
            if name.is_empty() || name.len() > 100 || !name.chars().all(ok) {
                return Err(ConfigError::Invalid {
                    setting: "node name",
                    reason: format!(
                        "{name:?}: use 1 to 100 characters of A-Z, a-z, 0-9, '-', '_', '.'"
                    ),
                });
            }
        }
        Ok(Framework {
            config: Arc::new(config),
            builder,
            node_name: self.node_name,
        })
    }
}
