//! The node: a pure engine of decisions between etcd and the application's task, and the
//! executors that carry them out.
//!
//! - [`engine`]: every decision (the view of the job, which slot to claim, what a claim's
//!   outcome means, which epochs to enter, who may reach the task, neighbour incidents, which
//!   keys to heal, what to publish) as a synchronous state machine, `handle(input, now) ->
//!   commands`, tested without etcd.
//! - `runtime`: the event loop; turns the job watch, the lease keeper, the gRPC server, the
//!   task's context and timers into inputs and executes the commands in order.
//! - `slot`: the task value, its context, its serve book and spans; the only code that calls
//!   the application's handlers.
//! - `lease`, `checkpoint`: the status stepping down at the lease's deadline, and loading a
//!   task's checkpoint.
//!
//! This file starts a node ([`spawn`]) and owns what runs beside it.

pub(crate) mod engine;

mod checkpoint;
mod inbound;
mod lease;
mod report;
mod runtime;
mod slot;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, error_span, info, warn, Instrument, Span};

use crate::app::TaskBuilder;
use crate::config::Config;
use crate::error::Error;
use crate::etcd::keys::{Holder, NodeRecord};
use crate::etcd::lease::LeaseState;
use crate::etcd::watch as jobwatch;
use crate::etcd::Store;
use crate::exchange::liveness::MONITOR_TIMEOUT;
use crate::exchange::Fence;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::roles::JobView;
use crate::stall::StallWatch;
use crate::wire::{self, Peers};
use engine::{Engine, Staffing};
use lease::step_down_at_deadline;
use runtime::{main_loop, DirectServe, Runtime};

pub use crate::role::{NodeExit, NodeStatus, Role};

/// A running node. Dropping the handle does not stop the node; call [`NodeHandle::stop`],
/// [`NodeHandle::crash`] or [`NodeHandle::wait`].
#[derive(Debug)]
pub struct NodeHandle {
    node_id: String,
    metrics_addr: Option<std::net::SocketAddr>,
    status: watch::Receiver<NodeStatus>,
    stop: CancellationToken,
    join: tokio::task::JoinHandle<Result<NodeExit, Error>>,
}

impl NodeHandle {
    /// The node's id.
    pub fn id(&self) -> &str {
        &self.node_id
    }
    /// The address the node serves its metrics, `/healthz` and `/readyz` on (the bound one:
    /// with port 0 configured, the port actually taken), or `None` without
    /// [`FrameworkBuilder::metrics_addr`](crate::FrameworkBuilder::metrics_addr).
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics_addr
    }
    /// The node's status, updated on every change.
    pub fn status(&self) -> watch::Receiver<NodeStatus> {
        self.status.clone()
    }
    /// Stops the node cleanly: the task's `exit` runs and the lease is revoked, so a backup
    /// takes over at once.
    pub async fn stop(self) -> Result<NodeExit, Error> {
        self.stop.cancel();
        self.wait().await
    }
    /// Ends the node at once without revoking its lease, as a kill -9 would: other nodes only
    /// notice when the lease expires.
    pub fn crash(self) {
        self.join.abort();
    }
    /// Waits until the node ends by itself (job finished, or killed through its context).
    pub async fn wait(self) -> Result<NodeExit, Error> {
        match self.join.await {
            Ok(r) => r,
            Err(_) => Ok(NodeExit::Killed),
        }
    }
    /// Runs until the node ends by itself (job finished, or killed through its context) or
    /// `signal` completes, in which case the node stops cleanly.
    pub async fn stop_on(
        mut self,
        signal: impl std::future::Future<Output = ()>,
    ) -> Result<NodeExit, Error> {
        tokio::select! {
            r = &mut self.join => match r {
                Ok(r) => r,
                Err(_) => Ok(NodeExit::Killed),
            },
            _ = signal => self.stop().await,
        }
    }

    /// Whether the node has ended.
    pub fn is_finished(&self) -> bool {
        self.join.is_finished()
    }
}

/// Spawns a node on the current tokio runtime. `listener` is the node's bound gRPC listener,
/// `metrics_listener` the bound listener of its HTTP endpoints, if any.
pub(crate) fn spawn(
    config: Arc<Config>,
    builder: Arc<dyn TaskBuilder>,
    listener: tokio::net::TcpListener,
    metrics_listener: Option<tokio::net::TcpListener>,
    node_id: String,
) -> NodeHandle {
    let stop = CancellationToken::new();
    let (status_tx, status) = watch::channel(NodeStatus {
        node_id: node_id.clone(),
        role: Role::Spare,
        acting: false,
        epoch: None,
        finished: false,
    });
    let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());
    // Spans at ERROR level: a span's level only decides whether it exists, and the node's,
    // slot's and epoch's spans must exist whenever any line is logged (`RUST_LOG=warn`
    // included), so that every line carries the job, node, task, term and epoch.
    let span = error_span!("node", job = %config.job, node = %node_id);
    let join = tokio::spawn(
        run(
            config,
            builder,
            listener,
            metrics_listener,
            node_id.clone(),
            status_tx,
            stop.clone(),
        )
        .instrument(span),
    );
    NodeHandle {
        node_id,
        metrics_addr,
        status,
        stop,
        join,
    }
}

/// Creates the job's spec or checks it against this node's, retrying etcd errors (an etcd
/// member down, a leader election under way: the client may pick a dead endpoint first) and a
/// garbage spec (the job's reporter, normally task 0's primary, rewrites it within milliseconds) until the etcd
/// connect timeout; a conflicting spec is final at once.
///
/// `first` is the verdict of the check sent while connecting
/// ([`Store::connect_joining`]); the check is sent again only if it must be retried.
async fn ensure_spec(
    store: &Store,
    config: &Config,
    first: Result<bool, Error>,
) -> Result<bool, Error> {
    let deadline = Instant::now() + config.etcd_connect_timeout;
    let mut delays = crate::retry::ETCD.delays();
    let mut answer = Some(first);
    loop {
        let delay = delays.next().unwrap_or(crate::retry::ETCD.max);
        let verdict = match answer.take() {
            Some(verdict) => verdict,
            None => store.ensure_spec(&config.job, &config.spec()).await,
        };
        match verdict {
            Err(Error::Etcd(e)) if Instant::now() + delay < deadline => {
                warn!(error = %e, "etcd did not take the job's spec; retrying");
                tokio::time::sleep(delay).await;
            }
            Err(Error::Garbage { key, reason }) if Instant::now() + delay < deadline => {
                error!(
                    key,
                    reason, "the job's spec in etcd is garbage; waiting for the job to heal it"
                );
                tokio::time::sleep(delay).await;
            }
            other => return other,
        }
    }
}

/// How long the event loop may stay busy with one event before `/healthz` fails: three
/// lease TTLs plus the etcd request timeout (a handler may legitimately wait for a replication
/// to a slow backup, up to a TTL, and for etcd).
fn stall_limit(config: &Config) -> Duration {
    config.lease_ttl * 3 + config.etcd_request_timeout
}

async fn run(
    config: Arc<Config>,
    builder: Arc<dyn TaskBuilder>,
    listener: tokio::net::TcpListener,
    metrics_listener: Option<tokio::net::TcpListener>,
    node_id: String,
    status: watch::Sender<NodeStatus>,
    stop: CancellationToken,
) -> Result<NodeExit, Error> {
    let metrics = Metrics::new(&config.job, &node_id);
    let health = Arc::new(Health::new(stall_limit(&config)));
    let _ended = health.end_on_drop();
    // The HTTP endpoints answer from the start (the node is "starting") and end with the node
    // (the set is dropped, and its task aborted, when `run` returns or is aborted).
    let mut http = JoinSet::new();
    if let Some(l) = metrics_listener {
        http.spawn(
            crate::http::serve(l, metrics.clone(), health.clone()).instrument(Span::current()),
        );
    }
    // TLS files are read again here (validated by the builder); a file gone since is an error.
    let security = config.etcd_security()?;
    let peer_tls = config.peer_tls_loaded()?;
    info!(etcd = %security.describe(), peer_tls = peer_tls.is_some(), "connecting to etcd");
    // The spec check is the request that shows etcd answers: one request to join, not two.
    let (store, verdict) = Store::connect_joining(
        &config.etcd_endpoints,
        &config.job,
        &security,
        (config.etcd_connect_timeout, config.etcd_request_timeout),
        &config.spec(),
        metrics.clone(),
    )
    .await?;
    let created = ensure_spec(&store, &config, verdict).await?;
    info!(
        created,
        tasks = config.tasks,
        replicas = config.replicas,
        "joined job"
    );

    // Everything spawned here (and everything `node` owns: the lease keeper, the monitor, the
    // slot's work, etcd chores) is aborted when `run` returns or is aborted (crash).
    let mut background = JoinSet::new();
    let (events_tx, events) = mpsc::channel(4096);
    let holder = Holder {
        node: node_id.clone(),
        addr: config.advertise_addr(),
    };
    let engine = Engine::new(
        holder.clone(),
        &config.job,
        config.tasks,
        config.replicas,
        config.links.clone(),
        config.spec().encode().into_bytes(),
        Staffing::Drafted,
        rand::random(),
    );
    // Only what the node decides on (as a spare: the epoch, its own record and draft, the spec
    // with task 0's slot keys; the engine changes it as the node takes a slot).
    let spare_ranges = engine.ranges().to_vec();
    metrics.set_watched_ranges(spare_ranges.len());
    let (watch_ranges, wanted) = watch::channel(jobwatch::WatchRanges {
        generation: 0,
        ranges: spare_ranges,
    });
    let events_weak = events_tx.downgrade();
    // The watch's first snapshot is read by the node's registration, in the same transaction
    // (one request fewer to join; see `Runtime::new_lease`).
    let (first_read, first) = tokio::sync::oneshot::channel();
    background.spawn(jobwatch::run(store.clone(), wanted, Some(first), events_tx));
    let server_config = wire::ServerConfig {
        job: config.job.clone(),
        num_tasks: config.tasks,
        max_frame_bytes: config.max_frame_bytes,
        tls: peer_tls.clone(),
    };
    let mut client = wire::ClientConfig::new(config.job.clone());
    client.connect_timeout = MONITOR_TIMEOUT;
    client.max_frame_bytes = config.max_frame_bytes;
    client.tls = peer_tls;

    let (requests_tx, requests, gate) = crate::inbox::LoopSender::channel();
    let (lease_tx, lease_rx) = watch::channel(LeaseState::Expired {
        id: crate::etcd::lease::LeaseId::NONE,
    });
    background.spawn(step_down_at_deadline(lease_tx.subscribe(), status.clone()));
    let instance = crate::inbox::node_instance();
    let next_stray_sweep = Instant::now() + runtime::stray_sweep(config.lease_ttl);
    let node = Runtime {
        record: NodeRecord {
            addr: config.advertise_addr(),
            stall: None,
            drafted: true,
        },
        stall: StallWatch::new(Instant::now(), config.lease_ttl, config.stall_after),
        holder,
        config,
        builder,
        store,
        engine,
        slot: None,
        lease: lease_rx,
        lease_tx,
        lease_task: None,
        chores: JoinSet::new(),
        status,
        requests_tx,
        peers: Peers::new(client),
        monitors: std::collections::BTreeMap::new(),
        direct_pulled: std::sync::Weak::<runtime::DirectPulled>::new(),
        view_tx: watch::channel(Arc::new(JobView::default())).0,
        watch_ranges,
        first_read: Some(first_read),
        next_stray_sweep,
        fence: Fence::default(),
        record_dirty: false,
        metrics: metrics.clone(),
        health: health.clone(),
        node_span: Span::current(),
        instance,
    };
    // The node's gRPC server: owned by `background`, so a crash (abort) closes the port at once.
    let (inbound_tx, inbound) = mpsc::channel(1024);
    let node = Arc::new(tokio::sync::Mutex::new(node));
    // Pulls, metas and pings are served on the server's own tasks while the loop is idle.
    let direct = DirectServe::new(&node, events_weak, gate.clone(), stop.clone(), metrics);
    // ... and the answers to the slot's pulls on their fetchers' tasks. Owned here: what it
    // still runs is aborted when `run` returns or is aborted.
    let direct_pulled = Arc::new(direct.requests());
    let weak = Arc::downgrade(&direct_pulled);
    node.lock().await.direct_pulled = weak;
    let direct: Arc<dyn wire::Direct> = Arc::new(direct);
    let server_stop = CancellationToken::new();
    let _server_stop_on_return = server_stop.clone().drop_guard();
    background.spawn(
        async move {
            let stopped = server_stop.cancelled_owned();
            if let Err(e) =
                wire::serve_with(listener, server_config, inbound_tx, Some(direct), stopped).await
            {
                warn!(error = %e, "the node's gRPC server failed");
            }
        }
        .instrument(tracing::Span::current()),
    );
    // Everything the node runs in the background is owned by `node` or `background`, and
    // aborted when they drop: on return, and when this future is dropped (a crash).
    let result = crate::inbox::handling(
        instance,
        main_loop(node.clone(), events, requests, inbound, gate, stop),
    )
    .await;
    drop(node);
    background.abort_all();
    drop(direct_pulled);
    result
}
