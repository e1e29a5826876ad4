//! The node: its event loop between etcd (roles, epochs) and the application's task.
//!
//! The loop owns the node's view of the job, its slot, and the task value; it is the only code
//! that calls the application's handlers. It reacts to the job watch, the lease keeper, and
//! requests from the task's context, asks [`roles::decide`] what to do, and carries the decision
//! out through the etcd [`Store`].

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, error_span, info, warn, Instrument, Span};

use crate::app::{Context, ExitReason, SlotState, Task, TaskBuilder};
use crate::config::Config;
use crate::config::JobSpec;
use crate::data::{Checkpoint, DataReply, DataRequest, Responder, ServeKey};
use crate::error::Error;
use crate::etcd::keys::{
    EpochValue, Holder, JobKey, NodeRecord, StallNote, StallReason, StoredCheckpoint,
};
use crate::etcd::lease::{self, LeaseState};
use crate::etcd::watch::{self as jobwatch, JobEvent};
use crate::etcd::{Kv, Store};
use crate::exchange::liveness::{self, MONITOR_TIMEOUT};
use crate::exchange::neighbours::{Incident, NeighbourTracker};
use crate::exchange::replication::{ship, Member, Shipped};
use crate::exchange::serve::{Lookup, Reply, ServeBook};
use crate::exchange::{Fence, SlotEnv};
use crate::health::{readiness, Health, Phase};
use crate::inbox::LoopRequest;
use crate::metrics::{Metrics, NeighbourEvent};
use crate::roles::{
    decide, judge_epoch, watched, Decision, EpochFault, EpochFaultKind, JobView, MySlot, SlotKey,
    Watched,
};
use crate::stall::{view_reasons, StallWatch};
use crate::wire::{
    self, Inbound, Meta, Peers, PingReply, PullRequest, Rejection, Replicate, ReplicateKind,
    SlotInfo,
};
use crate::{Epoch, TaskId, Term};

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
async fn ensure_spec(store: &Store, config: &Config) -> Result<bool, Error> {
    let deadline = Instant::now() + config.etcd_connect_timeout;
    let mut delay = Duration::from_millis(50);
    loop {
        match store.ensure_spec(&config.job, &config.spec()).await {
            Err(Error::Etcd(e)) if Instant::now() + delay < deadline => {
                warn!(error = %e, "etcd did not take the job's spec; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
            Err(Error::Garbage { key, reason }) if Instant::now() + delay < deadline => {
                error!(
                    key,
                    reason, "the job's spec in etcd is garbage; waiting for the job to heal it"
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
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
    let store = Store::connect_secure(
        &config.etcd_endpoints,
        &config.job,
        &security,
        config.etcd_connect_timeout,
        config.etcd_request_timeout,
    )
    .await?
    .with_metrics(metrics.clone());
    let created = ensure_spec(&store, &config).await?;
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
    background.spawn(jobwatch::run(store.clone(), events_tx));
    // The node's gRPC server: owned by `background`, so a crash (abort) closes the port at once.
    let (inbound_tx, inbound) = mpsc::channel(1024);
    let server_config = wire::ServerConfig {
        job: config.job.clone(),
        num_tasks: config.tasks,
        max_frame_bytes: config.max_frame_bytes,
        tls: peer_tls.clone(),
    };
    let server_stop = CancellationToken::new();
    let _server_stop_on_return = server_stop.clone().drop_guard();
    background.spawn(
        async move {
            let stopped = server_stop.cancelled_owned();
            if let Err(e) = wire::serve(listener, server_config, inbound_tx, stopped).await {
                warn!(error = %e, "the node's gRPC server failed");
            }
        }
        .instrument(tracing::Span::current()),
    );
    let mut client = wire::ClientConfig::new(config.job.clone());
    client.connect_timeout = MONITOR_TIMEOUT;
    client.max_frame_bytes = config.max_frame_bytes;
    client.tls = peer_tls;

    let (requests_tx, requests) = mpsc::unbounded_channel();
    let (lease_tx, lease_rx) = watch::channel(LeaseState::Expired { id: 0 });
    background.spawn(step_down_at_deadline(lease_tx.subscribe(), status.clone()));
    let (config_spec, node_addr) = (config.spec().encode().into_bytes(), config.advertise_addr());
    let (stall_ttl, stall_after) = (config.lease_ttl, config.stall_after);
    let mut node = Node {
        holder: Holder {
            node: node_id.clone(),
            addr: config.advertise_addr(),
        },
        config,
        builder,
        store,
        view: None,
        mine: MySlot::Spare,
        slot: None,
        lease: lease_rx,
        lease_tx,
        lease_task: None,
        chores: JoinSet::new(),
        status,
        requests_tx,
        await_change: false,
        retry_at: None,
        retry_pause: RETRY_PAUSE,
        observed: Vec::new(),
        peers: Peers::new(client),
        monitors: std::collections::BTreeMap::new(),
        view_tx: watch::channel(Arc::new(JobView::default())).0,
        fence: Fence::default(),
        slots_taken: 0,
        spec: config_spec,
        record: NodeRecord {
            addr: node_addr,
            stall: None,
        },
        registered_at: 0,
        record_fault: None,
        record_dirty: false,
        spec_fault: None,
        heals_tried: Vec::new(),
        stall: StallWatch::new(Instant::now(), stall_ttl, stall_after),
        metrics,
        health: health.clone(),
        node_span: Span::current(),
    };
    // Everything the node runs in the background is owned by `node` or `background`, and
    // aborted when they drop: on return, and when this future is dropped (a crash).
    let result = node.main_loop(events, requests, inbound, stop).await;
    drop(node);
    background.abort_all();
    result
}

/// Publishes `acting: false` as soon as the lease passes its local deadline, also while the
/// event loop is busy with one event (e.g. awaiting etcd across a partition): the loop only
/// publishes between events, so without this the status would claim the node acts past its
/// deadline, while another node may already have taken its slot. (What the node *does* is
/// gated on the lease by the loop itself; this keeps what it *shows* as strict.)
async fn step_down_at_deadline(
    mut lease: watch::Receiver<LeaseState>,
    status: watch::Sender<NodeStatus>,
) {
    loop {
        let deadline = match *lease.borrow_and_update() {
            LeaseState::Alive { deadline, .. } => Some(deadline),
            LeaseState::Suspended { .. } | LeaseState::Expired { .. } => None,
        };
        if let Some(deadline) = deadline {
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => {}
                changed = lease.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    continue;
                }
            }
        }
        if !lease.borrow().valid_now() {
            status.send_if_modified(|s| std::mem::replace(&mut s.acting, false));
        }
        if lease.changed().await.is_err() {
            return;
        }
    }
}

/// The task value this node holds, with its context and the channel feeding the context.
struct SlotRuntime {
    task: Box<dyn Task>,
    ctx: Context,
    state: watch::Sender<SlotState>,
    /// Last epoch entered as primary under the current term.
    entered: Option<Epoch>,
    /// Identifies this slot among the ones the node has taken.
    id: u64,
    /// As primary: answers and early arrivals of the current epoch.
    serve: ServeBook,
    /// As primary: the neighbours' primaries, for neighbour incidents.
    neighbours: NeighbourTracker,
    /// As backup: the primary term and last index of the replication stream applied.
    replica: Option<(Term, u64)>,
    /// As primary: answers to the task's pulls that arrived while the lease was past its local
    /// deadline; delivered once it is renewed (or dropped with the slot).
    deferred: Vec<LoopRequest>,
    /// The slot's span (task, role, term), child of the node's.
    span: Span,
    /// As primary: the span of the epoch the task is in (child of `span`).
    epoch_span: Option<Span>,
}

impl Drop for SlotRuntime {
    /// The slot's work (the task's spawned work, its pulls and metas) ends with the slot, also
    /// when the node is dropped without stopping (a crash): work that keeps a clone of the
    /// context must not keep the node's lease alive.
    fn drop(&mut self) {
        self.ctx.abort_spawned();
    }
}

impl SlotRuntime {
    /// The innermost span of the slot: its epoch's, or its own.
    fn span(&self) -> Span {
        self.epoch_span.clone().unwrap_or_else(|| self.span.clone())
    }
}

struct Node {
    config: Arc<Config>,
    builder: Arc<dyn TaskBuilder>,
    store: Store,
    holder: Holder,
    /// `None` until the first snapshot of the job has arrived.
    view: Option<JobView>,
    mine: MySlot,
    slot: Option<SlotRuntime>,
    lease: watch::Receiver<LeaseState>,
    lease_tx: watch::Sender<LeaseState>,
    /// The lease keeper (aborted with the node).
    lease_task: Option<AbortOnDrop>,
    /// Short etcd chores (deleting garbage and stray slot keys), aborted with the node.
    chores: JoinSet<()>,
    status: watch::Sender<NodeStatus>,
    requests_tx: mpsc::UnboundedSender<LoopRequest>,
    /// A claim failed on the current view: wait for the next change before claiming again.
    await_change: bool,
    /// A claim failed because etcd did not answer: decide again at this time even if nothing
    /// changes (in a quiet job no change would come, and the slot would stay free).
    retry_at: Option<Instant>,
    /// Pause before the next such retry (doubles up to a second; reset by a won claim).
    retry_pause: Duration,
    /// Running epochs observed since the task last entered one, in order.
    observed: Vec<Epoch>,
    /// Calls to other nodes.
    peers: Peers,
    /// The liveness checks of other slot holders (see [`watched`]); each is aborted when
    /// dropped, so a crashed node leaves none running.
    monitors: std::collections::BTreeMap<Watched, AbortOnDrop>,
    /// The view, for the slot's background work (pull fetchers, meta senders, replication).
    view_tx: watch::Sender<Arc<JobView>>,
    /// Highest term seen per task.
    fence: Fence,
    /// Slots taken so far (ids of [`SlotRuntime`]).
    slots_taken: u64,
    /// The job's spec as this node joined it (the stored form): what a bad `spec` key is
    /// rewritten to.
    spec: Vec<u8>,
    /// What this node last wrote under its `nodes/<node>` key.
    record: NodeRecord,
    /// The etcd revision of this node's registration with its current lease.
    registered_at: i64,
    /// A bad value under this node's record, by the revision to heal over (0: deleted).
    record_fault: Option<i64>,
    /// `record` changed (a stall note cleared) and is to be written again.
    record_dirty: bool,
    /// A bad value under the `spec` key: why, and the revision to heal over (0: deleted).
    spec_fault: Option<(String, i64)>,
    /// Heals tried, by key and guard revision: a heal that failed is not tried again until
    /// the key changes.
    heals_tried: Vec<(&'static str, i64)>,
    /// When the job's epoch last moved, for stall reports.
    stall: StallWatch,
    metrics: Metrics,
    health: Arc<Health>,
    /// The node's span (job, node): the parent of every slot's.
    node_span: Span,
}

/// How often the loop looks for a stall (the stall time is seconds at least).
const STALL_CHECK: Duration = Duration::from_millis(500);

/// Background work owned by a value of the node: aborted when it is dropped, also when the
/// node's future is dropped without returning (a crash), so nothing outlives the node.
#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl AbortOnDrop {
    fn spawn(work: impl std::future::Future<Output = ()> + Send + 'static) -> Self {
        AbortOnDrop(tokio::spawn(work))
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reads task `t`'s last checkpoint; garbage is logged and ignored.
async fn load_checkpoint(
    store: Store,
    lease: watch::Receiver<LeaseState>,
    health: Arc<Health>,
    t: TaskId,
) -> Option<Checkpoint> {
    let key = store.keys().checkpoint(t);
    let mut delays = crate::exchange::backoff();
    // While etcd does not answer, the loop waits here: `/healthz` says so instead of failing.
    let mut waiting = None;
    // Retry while the slot can still be this node's: starting without a checkpoint that
    // exists would lose the task's state.
    while !matches!(*lease.borrow(), LeaseState::Expired { .. }) {
        match store.get(&key).await {
            Ok(None) => return None,
            Ok(Some(kv)) => {
                return match StoredCheckpoint::decode(&kv.value) {
                    Ok(cp) => Some(Checkpoint {
                        epoch: cp.epoch,
                        data: cp.data.into(),
                    }),
                    Err(reason) => {
                        warn!(
                            key,
                            reason, "the task's checkpoint is garbage; starting without it"
                        );
                        None
                    }
                }
            }
            Err(e) => {
                waiting.get_or_insert_with(|| health.waiting_for_etcd());
                warn!(error = %e, key, "cannot read the task's checkpoint yet; retrying");
                tokio::time::sleep(delays.next().unwrap_or(Duration::from_millis(500))).await;
            }
        }
    }
    None
}

/// When an admitted pull or meta reaches the task.
enum When {
    /// It is of the task's epoch.
    Now,
    /// It is of a later epoch: held until the task enters it.
    Later,
}

enum Flow {
    Continue,
    Exit(NodeExit),
}

/// Completes at `at`, or never when there is no time.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The first pause before deciding again after a claim etcd did not answer.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// What woke the event loop.
enum Wake {
    Stop,
    Request(LoopRequest),
    Event(JobEvent),
    WatchEnded,
    Inbound(Inbound),
    /// The lease changed (`false`: its keeper is gone).
    Lease(bool),
    /// The lease's local deadline passed.
    Deadline,
    /// Time to claim again after etcd did not answer a claim.
    Retry,
    /// Time to look for a stall.
    StallCheck,
}

/// A request or inbound message already queued, taken without building the loop's whole wait
/// (under load, one `select!` per message costs more than the message): `None` when stop, a job
/// event, a lease change or a timer is due, which the full wait then takes in its order.
fn queued_wake(
    requests: &mut mpsc::UnboundedReceiver<LoopRequest>,
    events: &mpsc::Receiver<JobEvent>,
    inbound: &mut mpsc::Receiver<Inbound>,
    stop: &CancellationToken,
    lease: &watch::Receiver<LeaseState>,
    timer: Instant,
) -> Option<Wake> {
    if stop.is_cancelled()
        || !events.is_empty()
        || lease.has_changed().unwrap_or(true)
        || Instant::now() >= timer
    {
        return None;
    }
    if let Ok(req) = requests.try_recv() {
        return Some(Wake::Request(req));
    }
    inbound.try_recv().ok().map(Wake::Inbound)
}

impl Node {
    async fn main_loop(
        &mut self,
        mut events: mpsc::Receiver<JobEvent>,
        mut requests: mpsc::UnboundedReceiver<LoopRequest>,
        mut inbound: mpsc::Receiver<Inbound>,
        stop: CancellationToken,
    ) -> Result<NodeExit, Error> {
        self.health.set_phase(Phase::Running);
        self.new_lease(&stop).await?;
        let mut stall_check = tokio::time::interval(STALL_CHECK);
        stall_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let deadline = match *self.lease.borrow() {
                LeaseState::Alive { deadline, .. } => deadline,
                _ => Instant::now() + Duration::from_secs(3600),
            };
            self.health.idle();
            let retry_at = self.retry_at;
            let queued = queued_wake(
                &mut requests,
                &events,
                &mut inbound,
                &stop,
                &self.lease,
                deadline.min(retry_at.unwrap_or(deadline)),
            );
            if let Some(wake) = queued {
                // As the wait would: a loop that always finds work still lets others run.
                tokio::task::coop::consume_budget().await;
                self.health.busy();
                let span = self.span();
                if let Flow::Exit(exit) = self
                    .handle(wake, &mut events, &stop)
                    .instrument(span)
                    .await?
                {
                    return Ok(exit);
                }
                continue;
            }
            let wake = tokio::select! {
                biased;
                _ = stop.cancelled() => Wake::Stop,
                Some(req) = requests.recv() => Wake::Request(req),
                ev = events.recv() => match ev {
                    Some(ev) => Wake::Event(ev),
                    None => Wake::WatchEnded,
                },
                Some(msg) = inbound.recv() => Wake::Inbound(msg),
                changed = self.lease.changed() => Wake::Lease(changed.is_ok()),
                _ = tokio::time::sleep_until(deadline) => Wake::Deadline,
                _ = sleep_until_some(retry_at) => Wake::Retry,
                _ = stall_check.tick() => Wake::StallCheck,
            };
            self.health.busy();
            // Everything the loop does for this event is logged in the slot's current span.
            let span = self.span();
            let flow = self
                .handle(wake, &mut events, &stop)
                .instrument(span)
                .await?;
            if let Flow::Exit(exit) = flow {
                return Ok(exit);
            }
        }
    }

    /// Handles one event of the loop.
    async fn handle(
        &mut self,
        wake: Wake,
        events: &mut mpsc::Receiver<JobEvent>,
        stop: &CancellationToken,
    ) -> Result<Flow, Error> {
        Ok(match wake {
            Wake::Stop => Flow::Exit(
                self.clean_stop(ExitReason::Stopped, NodeExit::Stopped)
                    .await,
            ),
            Wake::Request(LoopRequest::Kill) => {
                warn!("killed by its task: leaving without revoking the lease");
                Flow::Exit(NodeExit::Killed)
            }
            Wake::Request(other) => {
                self.on_request(other).await;
                Flow::Continue
            }
            Wake::Event(ev) => {
                // Catch up with everything already queued before deciding anything, so
                // decisions are made on the freshest view available.
                self.apply(ev);
                while let Ok(ev) = events.try_recv() {
                    self.apply(ev);
                }
                self.publish_view();
                self.heal().await;
                self.step().await?
            }
            Wake::WatchEnded => return Err(Error::WatchEnded),
            Wake::Inbound(msg) => {
                self.on_inbound(msg).await;
                Flow::Continue
            }
            Wake::Lease(true) => self.on_lease(stop).await?,
            Wake::Lease(false) => Flow::Continue,
            Wake::Deadline => {
                self.publish();
                Flow::Continue
            }
            Wake::Retry => {
                self.retry_at = None;
                self.await_change = false;
                self.step().await?
            }
            Wake::StallCheck => {
                self.check_stall().await;
                Flow::Continue
            }
        })
    }

    /// The innermost span of the node's current slot (its epoch's, or the slot's), or the
    /// node's span while it has none.
    fn span(&self) -> Span {
        self.slot
            .as_ref()
            .map_or_else(|| self.node_span.clone(), SlotRuntime::span)
    }

    /// A new span for the slot this node holds (task, role, term), child of the node's.
    fn slot_span(&self) -> Span {
        match self.mine {
            MySlot::Primary { task, term } => {
                error_span!(parent: &self.node_span, "slot", task, role = "primary", term)
            }
            MySlot::Backup { task, .. } => {
                error_span!(parent: &self.node_span, "slot", task, role = "backup")
            }
            MySlot::Spare => self.node_span.clone(),
        }
    }

    /// Grants a fresh lease (retrying while etcd is down), starts its keeper, registers the node.
    async fn new_lease(&mut self, stop: &CancellationToken) -> Result<(), Error> {
        self.lease_task = None;
        let mut delay = Duration::from_millis(50);
        // While etcd does not answer, the loop waits here: `/healthz` says so instead of failing.
        let health = self.health.clone();
        let mut waiting = None;
        loop {
            let granted_at = Instant::now();
            let attempt = async {
                let (id, ttl) = self.store.grant_lease(self.config.lease_ttl_secs()).await?;
                let registered = self
                    .store
                    .register_node(&self.holder.node, &self.record, id)
                    .await?;
                Ok::<_, crate::error::EtcdError>((id, ttl, registered))
            };
            match attempt.await {
                Ok((id, ttl, registered)) => {
                    self.registered_at = registered;
                    self.record_fault = None;
                    let ttl = Duration::from_secs(ttl.max(1) as u64);
                    info!(lease = format!("{id:x}"), ?ttl, "lease granted");
                    self.metrics.lease_granted();
                    let (tx, rx) = (self.lease_tx.clone(), self.lease_tx.subscribe());
                    self.lease = rx;
                    self.lease_task = Some(AbortOnDrop::spawn(
                        lease::keep_alive(self.store.clone(), id, ttl, granted_at, tx)
                            .instrument(self.node_span.clone()),
                    ));
                    // Let the keeper publish `Alive` before deciding anything.
                    let _ = self.lease.wait_for(|s| s.id() == id).await;
                    self.publish();
                    return Ok(());
                }
                Err(e) => {
                    waiting.get_or_insert_with(|| health.waiting_for_etcd());
                    warn!(error = %e, "cannot get a lease from etcd, retrying");
                    tokio::select! {
                        _ = stop.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// The task this node acts for as primary right now, with its term.
    fn acting_primary(&self) -> Option<(TaskId, Term)> {
        match self.mine {
            MySlot::Primary { task, term } if self.lease_valid() => Some((task, term as Term)),
            _ => None,
        }
    }

    /// Answers a message from another node.
    async fn on_inbound(&mut self, msg: Inbound) {
        match msg {
            Inbound::Ping(reply) => {
                let _ = reply.send(self.ping_reply());
            }
            Inbound::Pull(req, reply) => self.on_pull(req, reply).await,
            Inbound::Meta(msg, reply) => {
                let outcome = self.on_meta(msg).await;
                let _ = reply.send(outcome);
            }
            Inbound::Replicate(msg, reply) => {
                let in_step = |n: &Node| n.slot.as_ref().is_some_and(|s| s.replica.is_some());
                let was_in_step = in_step(self);
                let outcome = self.on_replicate(msg).await;
                let _ = reply.send(outcome);
                if !was_in_step && in_step(self) {
                    // The backup can take over now: it is ready.
                    self.publish();
                }
            }
        }
    }

    fn ping_reply(&self) -> PingReply {
        let slots = match (self.mine, &self.slot) {
            (MySlot::Spare, _) | (_, None) => vec![],
            (MySlot::Primary { task, term }, Some(s)) => vec![SlotInfo {
                task,
                primary: true,
                term: term as u64,
                epoch: s.entered.unwrap_or(0),
            }],
            (MySlot::Backup { task, .. }, Some(s)) => vec![SlotInfo {
                task,
                primary: false,
                term: 0,
                epoch: s.state.borrow().epoch,
            }],
        };
        PingReply {
            job: self.config.job.clone(),
            node_id: self.holder.node.clone(),
            slots,
        }
    }

    /// Checks a sender's claimed term for `task`. Only terms etcd has shown count: a lower term
    /// than the highest seen, or the term of a primary whose key is gone, is refused as stale;
    /// a higher term than any seen is not believed (it would let one forged message fence off
    /// the real primary) — it is refused as "not primary yet", and the sender retries until
    /// this node's watch has caught up with its election.
    fn fence_sender(&self, task: TaskId, term: Term) -> Result<(), Rejection> {
        let seen = self.fence.seen(task);
        let current = self
            .view
            .as_ref()
            .and_then(|v| v.primaries.get(&task))
            .map(|p| p.create_revision as Term);
        if term != 0 && current == Some(term) && term >= seen {
            return Ok(());
        }
        if term > seen {
            return Err(Rejection::NotPrimary { task });
        }
        Err(Rejection::StaleTerm { task, term, seen })
    }

    /// A pull for this node's task: answered only by the acting primary, in the request's
    /// epoch; early requests wait for the epoch, late ones are told it moved.
    async fn on_pull(&mut self, req: PullRequest, reply: Reply) {
        let (to, epoch) = (req.header.to_task, req.header.epoch);
        let when = self.admit(&req.header);
        let Some(s) = self.slot.as_mut() else {
            let _ = reply.send(Err(Rejection::NotPrimary { task: to }));
            return;
        };
        match when {
            Ok(When::Now) => Self::serve_pull(s, req, reply, &self.requests_tx).await,
            Ok(When::Later) => {
                if let Err((_, reply)) = s.serve.hold_pull(req, reply) {
                    let _ = reply.send(Err(Rejection::NotReady { task: to, epoch }));
                }
            }
            Err(r) => {
                let _ = reply.send(Err(r));
            }
        }
    }

    /// Whether a pull or meta with `header` may reach this node's task: only its acting
    /// primary, from a sender whose term etcd shows, and now if it is of the task's epoch,
    /// later if of a later one.
    fn admit(&self, header: &wire::Header) -> Result<When, Rejection> {
        let to = header.to_task;
        if self.acting_primary().is_none_or(|(t, _)| t != to) {
            return Err(Rejection::NotPrimary { task: to });
        }
        self.fence_sender(header.from_task, header.term)?;
        let Some(s) = self.slot.as_ref() else {
            return Err(Rejection::NotPrimary { task: to });
        };
        let epoch = header.epoch;
        match s.serve.epoch() {
            Some(current) if s.entered == Some(current) => match epoch.cmp(&current) {
                std::cmp::Ordering::Less => Err(Rejection::EpochMoved {
                    request_epoch: epoch,
                    current_epoch: current,
                }),
                std::cmp::Ordering::Equal => Ok(When::Now),
                std::cmp::Ordering::Greater => Ok(When::Later),
            },
            _ => Err(Rejection::NotReady { task: to, epoch }),
        }
    }

    /// Runs the task's `serve_data` for a pull of its current epoch, unless this request was
    /// already handed to it.
    async fn serve_pull(
        s: &mut SlotRuntime,
        req: PullRequest,
        reply: Reply,
        requests: &mpsc::UnboundedSender<LoopRequest>,
    ) {
        let id = crate::data::PullId {
            epoch: req.header.epoch,
            from: req.header.from_task,
            to: req.header.to_task,
            seq: req.seq,
        };
        let key = ServeKey {
            id,
            requester_term: req.header.term,
        };
        if let Lookup::New = s.serve.lookup(key, reply) {
            let request = DataRequest {
                id,
                method: req.method,
                input: req.payload,
                responder: Some({
                    let (slot, tx) = (s.id, requests.clone());
                    Responder(Box::new(move |answer| {
                        let _ = tx.send(LoopRequest::Answer { slot, key, answer });
                    }))
                }),
            };
            s.task.serve_data(&s.ctx, request).await;
        }
    }

    /// A meta for this node's task: delivered once per (sender, link, meta) in the task's
    /// epoch; early ones wait for the epoch.
    async fn on_meta(&mut self, msg: Meta) -> Result<(), Rejection> {
        let (to, epoch) = (msg.header.to_task, msg.header.epoch);
        let when = self.admit(&msg.header)?;
        let Some(s) = self.slot.as_mut() else {
            return Err(Rejection::NotPrimary { task: to });
        };
        match when {
            When::Now => Self::deliver_meta(s, msg).await,
            When::Later if s.serve.hold_meta(msg) => {}
            When::Later => return Err(Rejection::NotReady { task: to, epoch }),
        }
        Ok(())
    }

    async fn deliver_meta(s: &mut SlotRuntime, msg: Meta) {
        if s.serve
            .first_meta(msg.header.from_task, &msg.link, &msg.meta)
        {
            s.ctx.env().metrics.meta_received(s.ctx.task());
            s.task
                .meta_ready(&s.ctx, msg.header.from_task, &msg.link, &msg.meta)
                .await;
        }
    }

    /// A replication entry for this node's task, as its backup.
    async fn on_replicate(&mut self, msg: Replicate) -> Result<(), Rejection> {
        let task = msg.header.to_task;
        let is_backup = matches!(self.mine, MySlot::Backup { task: t, .. } if t == task);
        if !is_backup || !self.lease_valid() {
            return Err(Rejection::NotPrimary { task });
        }
        self.fence_sender(task, msg.header.term)?;
        let Some(s) = self.slot.as_mut() else {
            return Err(Rejection::NotPrimary { task });
        };
        let term = msg.header.term;
        match msg.kind {
            ReplicateKind::Snapshot => {
                s.task.apply_snapshot(&s.ctx, msg.data).await;
                s.replica = Some((term, msg.index));
                Ok(())
            }
            ReplicateKind::Update => match s.replica {
                Some((t, last)) if t == term && msg.index == last + 1 => {
                    s.task.apply_update(&s.ctx, msg.data).await;
                    s.replica = Some((t, msg.index));
                    Ok(())
                }
                // A repeat of an entry already applied.
                Some((t, last)) if t == term && msg.index <= last => Ok(()),
                _ => Err(Rejection::NotReady {
                    task,
                    epoch: msg.header.epoch,
                }),
            },
        }
    }

    /// Requests from the task's side: answers to pulls it served, answers to its pulls.
    async fn on_request(&mut self, req: LoopRequest) {
        let term = self.acting_primary().map(|(_, t)| t);
        // The term this node was elected with, valid lease or not: an answer is stamped with
        // it, and sent only while the lease is valid.
        let elected = match self.mine {
            MySlot::Primary { term, .. } => Some(term as Term),
            _ => None,
        };
        let Some(s) = self.slot.as_mut() else {
            return;
        };
        match req {
            LoopRequest::Kill => {}
            LoopRequest::Answer { slot, key, answer } => {
                if slot != s.id {
                    return;
                }
                let Some(elected) = elected else {
                    // Not this slot's primary any more: the calls retry against the new one.
                    s.serve
                        .abandon(key, Rejection::NotPrimary { task: key.id.to });
                    return;
                };
                if s.serve.answer(key, answer, elected, term.is_some()) {
                    s.ctx.env().metrics.pull_served(s.ctx.task());
                }
            }
            LoopRequest::WorkDone { slot, done } => {
                if slot != s.id || s.entered != Some(done.id().epoch) {
                    return;
                }
                if term.is_none() {
                    if elected.is_some() {
                        // Delivered once the lease is renewed, like an answer.
                        s.deferred.push(LoopRequest::WorkDone { slot, done });
                    }
                    return;
                }
                s.task.work_done(&s.ctx, done).await;
            }
            LoopRequest::Timer { slot, epoch, token } => {
                if slot != s.id || s.entered != Some(epoch) {
                    return;
                }
                if term.is_none() {
                    if elected.is_some() {
                        s.deferred.push(LoopRequest::Timer { slot, epoch, token });
                    }
                    return;
                }
                s.task.timer(&s.ctx, token).await;
            }
            LoopRequest::Pulled {
                slot,
                id,
                server_term,
                result,
            } => {
                if slot != s.id || s.entered != Some(id.epoch) {
                    return;
                }
                if term.is_none() {
                    if elected.is_some() {
                        // Still this node's slot, but the lease is not confirmed: the answer
                        // waits for the renewal (a task acts only while its lease is valid).
                        s.deferred.push(LoopRequest::Pulled {
                            slot,
                            id,
                            server_term,
                            result,
                        });
                    }
                    return;
                }
                if result.is_ok() && server_term < self.fence.seen(id.to) {
                    // A newer primary of the pulled task is known now: ask it instead.
                    s.ctx.refetch(id);
                    return;
                }
                let Some(pending) = s.ctx.take_pending(id) else {
                    return;
                };
                s.ctx.env().metrics.pull_delivered(
                    id.from,
                    pending.started.elapsed(),
                    result.is_ok(),
                );
                let reply = DataReply {
                    id,
                    method: pending.method,
                    server_term,
                    result,
                };
                s.task.data_ready(&s.ctx, reply).await;
            }
        }
    }

    /// As acting primary: delivers the answers that arrived while the lease was unconfirmed.
    async fn deliver_deferred(&mut self) {
        if self.acting_primary().is_none() {
            return;
        }
        let deferred = match self.slot.as_mut() {
            Some(s) => std::mem::take(&mut s.deferred),
            None => return,
        };
        for req in deferred {
            self.on_request(req).await;
        }
    }

    /// Publishes the view to the slot's background work, and raises the fence to every term
    /// it shows.
    fn publish_view(&mut self) {
        let Some(view) = self.view.as_ref() else {
            return;
        };
        for (t, p) in &view.primaries {
            self.fence.admit(*t, p.create_revision as Term);
        }
        self.view_tx.send_replace(Arc::new(view.clone()));
    }

    /// As acting primary: brings new backups in step (a snapshot, then every update) and
    /// forgets the ones that left.
    async fn sync_backups(&mut self) {
        let Some((task, term)) = self.acting_primary() else {
            return;
        };
        let (Some(view), Some(s)) = (self.view.as_ref(), self.slot.as_mut()) else {
            return;
        };
        let wanted = Member::all_in(view, task, &self.holder.node);
        let ctx = s.ctx.clone();
        let mut r = ctx.replicator().lock().await;
        r.for_term(term);
        r.members.retain(|m| wanted.contains(m));
        let new: Vec<Member> = wanted
            .into_iter()
            .filter(|m| !r.members.contains(m))
            .collect();
        if new.is_empty() {
            return;
        }
        let snapshot = s.task.snapshot(&s.ctx);
        let index = r.index;
        let epoch = s.entered.unwrap_or(0);
        let env = ctx.env();
        let shipped = futures::future::join_all(new.iter().map(|m| {
            ship(
                env,
                term,
                epoch,
                m,
                ReplicateKind::Snapshot,
                index,
                snapshot.clone(),
            )
        }))
        .await;
        for (m, outcome) in new.into_iter().zip(shipped) {
            if outcome == Shipped::Applied {
                debug!(task, backup = m.node, index, "backup in step");
                r.members.push(m);
            }
        }
    }

    /// As acting primary in an epoch: tells the task about neighbours that lost or regained a
    /// primary since it last looked.
    async fn neighbour_incidents(&mut self) {
        if self.acting_primary().is_none() {
            return;
        }
        let (Some(view), Some(s)) = (self.view.as_ref(), self.slot.as_mut()) else {
            return;
        };
        let Some(epoch) = s.entered else {
            return;
        };
        let task = s.ctx.task();
        let mut by_link: Vec<(String, std::collections::BTreeSet<TaskId>)> = Vec::new();
        let mut all = std::collections::BTreeSet::new();
        for (name, topology) in self.config.links.iter() {
            let set: std::collections::BTreeSet<TaskId> =
                topology.neighbours(task, epoch).into_iter().collect();
            all.extend(set.iter().copied());
            by_link.push((name.to_owned(), set));
        }
        let incidents = s
            .neighbours
            .update(&all, |n| view.primaries.get(&n).map(|p| p.create_revision));
        for incident in incidents {
            let n = match incident {
                Incident::Failed(n) | Incident::Restarted(n) => n,
            };
            for (link, set) in &by_link {
                if !set.contains(&n) {
                    continue;
                }
                match incident {
                    Incident::Failed(_) => {
                        info!(task, neighbour = n, link, "neighbour failed");
                        self.metrics.neighbour_event(task, NeighbourEvent::Failed);
                        s.task.neighbour_failed(&s.ctx, link, n).await;
                    }
                    Incident::Restarted(_) => {
                        info!(task, neighbour = n, link, "neighbour restarted");
                        self.metrics
                            .neighbour_event(task, NeighbourEvent::Restarted);
                        s.task.neighbour_restarted(&s.ctx, link, n).await;
                    }
                }
            }
        }
    }

    /// Keeps a liveness check on every slot holder this node watches in its role (a backup
    /// its primary, a spare the backups of tasks without a primary; see [`watched`]): on evidence that the holder's process is gone, its lease is ended at once.
    fn update_monitor(&mut self) {
        let wanted = match self.view.as_ref() {
            Some(view) => watched(view, &self.holder.node, self.mine),
            None => Vec::new(),
        };
        self.monitors.retain(|w, _| wanted.contains(w));
        for target in wanted {
            if self.monitors.contains_key(&target) {
                continue;
            }
            let task = AbortOnDrop::spawn(
                liveness::watch_holder(
                    self.peers.clone(),
                    self.store.clone(),
                    self.view_tx.subscribe(),
                    target.clone(),
                )
                .instrument(tracing::Span::current()),
            );
            self.monitors.insert(target, task);
        }
    }

    fn lease_valid(&self) -> bool {
        self.lease.borrow().valid_now()
    }

    fn publish(&self) {
        let acting = self.lease_valid();
        let role = match self.mine {
            MySlot::Spare => Role::Spare,
            MySlot::Primary { task, term } => Role::Primary {
                task,
                term: term as Term,
            },
            MySlot::Backup { task, .. } => Role::Backup { task },
        };
        let epoch = match (&self.slot, &self.view) {
            (Some(s), _) if s.entered.is_some() => s.entered,
            (_, Some(v)) => v.epoch.map(EpochValue::epoch),
            _ => None,
        };
        let finished = self.view.as_ref().is_some_and(JobView::finished);
        self.metrics.node_state(role, acting);
        let ready = readiness(
            self.view.as_ref(),
            &self.holder.node,
            self.mine,
            self.slot.as_ref().and_then(|s| s.entered),
            self.slot.as_ref().is_some_and(|s| s.replica.is_some()),
            acting,
        );
        let until = match *self.lease.borrow() {
            LeaseState::Alive { deadline, .. } => Some(deadline),
            _ => None,
        };
        self.health.set_ready(ready, until);
        let lease = self.lease.clone();
        self.status.send_if_modified(|s| {
            let new = NodeStatus {
                node_id: s.node_id.clone(),
                role,
                // Checked again under the status's lock: the deadline may have passed since
                // (see `step_down_at_deadline`).
                acting: acting && lease.borrow().valid_now(),
                epoch,
                finished,
            };
            let changed = *s != new;
            *s = new;
            changed
        });
    }

    /// Applies one watch event to the view, remembering every running epoch it reveals.
    fn apply(&mut self, ev: JobEvent) {
        self.apply_event(ev);
        let epoch = self.view.as_ref().and_then(|v| v.epoch);
        if self.stall.epoch_seen(epoch, Instant::now()) {
            info!("the job's epoch moves again: the stall is over");
            self.metrics.stalled(false);
            self.record_dirty |= self.record.stall.take().is_some();
        }
        if let Some(epoch) = epoch {
            self.metrics
                .job_epoch(epoch.epoch(), matches!(epoch, EpochValue::Done(_)));
        }
        if let Some(EpochValue::Running(n)) = self.view.as_ref().and_then(|v| v.epoch) {
            if self.observed.last().is_none_or(|last| *last < n) {
                self.observed.push(n);
            }
        }
    }

    fn apply_event(&mut self, ev: JobEvent) {
        let keys = self.store.keys().clone();
        match ev {
            JobEvent::Snapshot { kvs, revision } => {
                debug!(revision, keys = kvs.len(), "job snapshot");
                let mut view = JobView::new(self.config.tasks, self.config.replicas);
                // The last good epoch survives a new read: a bad value is judged against it.
                if let Some(old) = self.view.as_ref() {
                    view.epoch = old.epoch;
                }
                let (mut epoch, mut spec, mut record) = (false, false, false);
                for kv in kvs {
                    match keys.parse(&kv.key) {
                        Some(JobKey::Epoch) => epoch = true,
                        Some(JobKey::Spec) => spec = true,
                        Some(JobKey::Node(n)) if n == self.holder.node => record = true,
                        _ => {}
                    }
                    self.apply_put(&mut view, &keys, kv, true);
                }
                if !epoch {
                    self.epoch_key_missing(&mut view, &keys);
                }
                if !spec {
                    self.spec_key_missing(&keys);
                }
                if !record
                    && revision > self.registered_at
                    && self.registered_at > 0
                    && self.lease_valid()
                {
                    self.own_record_bad(&keys, 0, "deleted");
                }
                view.revision = revision;
                self.view = Some(view);
                self.await_change = false;
            }
            JobEvent::Put(kv) => {
                if let Some(mut view) = self.view.take() {
                    view.revision = view.revision.max(kv.mod_revision);
                    self.apply_put(&mut view, &keys, kv, false);
                    self.view = Some(view);
                }
                self.await_change = false;
            }
            JobEvent::Delete { key, revision } => {
                if let Some(mut view) = self.view.take() {
                    view.revision = view.revision.max(revision);
                    match keys.parse(&key) {
                        Some(JobKey::Primary(t)) => {
                            view.primaries.remove(&t);
                        }
                        Some(JobKey::Backup(t, k)) => {
                            view.backups.remove(&(t, k));
                        }
                        Some(JobKey::Epoch) => self.epoch_key_missing(&mut view, &keys),
                        Some(JobKey::Spec) => self.spec_key_missing(&keys),
                        Some(JobKey::Node(n))
                            if n == self.holder.node
                                && revision > self.registered_at
                                && self.lease_valid() =>
                        {
                            // With the lease valid here, etcd did not end it: someone deleted
                            // the record. (When the lease ended, `new_lease` registers again.)
                            self.own_record_bad(&keys, 0, "deleted");
                        }
                        _ => {}
                    }
                    self.view = Some(view);
                }
                self.await_change = false;
            }
            JobEvent::Disconnected => {
                warn!("lost the job watch; resuming when etcd answers");
            }
        }
    }

    fn epoch_key_missing(&self, view: &mut JobView, keys: &crate::etcd::keys::JobKeys) {
        error!(
            key = keys.epoch(),
            last_good = view.epoch.map(|e| e.encode()),
            "the job's epoch key is missing; keeping the last epoch seen"
        );
        self.metrics.bad_value("epoch");
        view.epoch_fault = Some(EpochFault {
            kind: EpochFaultKind::Missing,
            mod_revision: 0,
        });
    }

    fn spec_key_missing(&mut self, keys: &crate::etcd::keys::JobKeys) {
        error!(
            key = keys.spec(),
            "the job's spec key is missing; this node keeps its own"
        );
        self.metrics.bad_value("spec");
        self.spec_fault = Some(("deleted".into(), 0));
    }

    /// This node's own record holds a value it did not write (`guard`: its revision; 0 when
    /// deleted): the node rewrites it (see [`Node::heal`]).
    fn own_record_bad(&mut self, keys: &crate::etcd::keys::JobKeys, guard: i64, what: &str) {
        error!(
            key = keys.node(&self.holder.node),
            found = what,
            "this node's record holds a value it did not write"
        );
        self.metrics.bad_value("node");
        self.record_fault = Some(guard);
    }

    fn apply_put(
        &mut self,
        view: &mut JobView,
        keys: &crate::etcd::keys::JobKeys,
        kv: Kv,
        snapshot: bool,
    ) {
        let key = String::from_utf8_lossy(&kv.key).into_owned();
        match keys.parse(&kv.key) {
            Some(JobKey::Epoch) => match judge_epoch(view.epoch, &kv.value, snapshot) {
                Ok(v) => {
                    view.epoch = Some(v);
                    view.epoch_fault = None;
                }
                Err(kind) => {
                    error!(
                        key,
                        found = %kind,
                        last_good = view.epoch.map(|e| e.encode()),
                        "the epoch key holds a value the framework did not write; keeping the last good epoch"
                    );
                    self.metrics.bad_value("epoch");
                    view.epoch_fault = Some(EpochFault {
                        kind,
                        mod_revision: kv.mod_revision,
                    });
                }
            },
            Some(JobKey::Primary(t)) | Some(JobKey::Backup(t, _)) if t >= view.tasks => {
                warn!(
                    key,
                    tasks = view.tasks,
                    "rejected slot key of a task out of range"
                );
            }
            Some(k @ (JobKey::Primary(_) | JobKey::Backup(..))) => {
                let holder = match serde_json::from_slice::<Holder>(&kv.value) {
                    Ok(h) => h,
                    Err(e) => {
                        warn!(key, error = %e, "rejected garbage slot value; the slot counts as taken until its key goes");
                        let mine = kv.lease != 0 && kv.lease == self.lease.borrow().id();
                        if mine {
                            // Garbage under this node's own slot key (its lease holds it): the
                            // node gives the slot up (its holder is not there any more) and
                            // must delete the key, or its live lease would keep the slot
                            // blocked for ever.
                            warn!(key, "garbage under this node's own slot key: giving the slot up and deleting the key");
                        }
                        if kv.lease == 0 || mine {
                            // No node writes a slot without a lease: nobody owns this one.
                            let store = self.store.clone();
                            let key = key.clone();
                            let (raw, rev) = (kv.key.clone(), kv.mod_revision);
                            self.chores.spawn(async move {
                                match store.delete_orphan(&raw, rev).await {
                                    Ok(true) => {
                                        warn!(key, "deleted a garbage slot key that had no lease")
                                    }
                                    Ok(false) => {}
                                    Err(e) => {
                                        warn!(key, error = %e, "could not delete a garbage slot key")
                                    }
                                }
                            });
                        }
                        Holder {
                            node: String::from("<garbage>"),
                            addr: String::new(),
                        }
                    }
                };
                if holder.node == self.holder.node && self.stray_key(&k, &kv) {
                    warn!(
                        key,
                        "a slot key under this node's lease that is not its slot (a claim whose \
                         answer was lost): deleting it"
                    );
                    let store = self.store.clone();
                    let key = key.clone();
                    let (raw, rev) = (kv.key.clone(), kv.mod_revision);
                    while self.chores.try_join_next().is_some() {}
                    self.chores.spawn(async move {
                        if let Err(e) = store.delete_orphan(&raw, rev).await {
                            warn!(key, error = %e, "could not delete a stray slot key");
                        }
                    });
                }
                let slot = SlotKey {
                    holder,
                    create_revision: kv.create_revision,
                    lease: kv.lease,
                };
                match k {
                    JobKey::Primary(t) => {
                        view.primaries.insert(t, slot);
                    }
                    JobKey::Backup(t, k) if k >= 1 && k < view.replicas => {
                        view.backups.insert((t, k), slot);
                    }
                    _ => warn!(key, "rejected backup slot out of range"),
                }
            }
            Some(JobKey::Spec) => {
                let fault = match JobSpec::decode(&kv.value) {
                    Err(reason) => Some(reason),
                    Ok(stored) => JobSpec::decode(&self.spec)
                        .ok()
                        .and_then(|mine| JobSpec::difference(&stored, &mine))
                        .map(|d| format!("differs from the spec the job runs with: {d}")),
                };
                match fault {
                    Some(reason) => {
                        error!(
                            key,
                            reason, "the job's spec in etcd is bad; this node keeps its own"
                        );
                        self.metrics.bad_value("spec");
                        self.spec_fault = Some((reason, kv.mod_revision));
                    }
                    None => {
                        // The spec as stored (with its creation time) is what a heal restores.
                        self.spec = kv.value;
                        self.spec_fault = None;
                    }
                }
            }
            Some(JobKey::Node(n)) if n == self.holder.node => {
                // Written under another lease (or none), or not this node's record: not this
                // node's write. (A stall note may lag behind `self.record`: not compared.)
                let own_lease = kv.lease != 0 && kv.lease == self.lease.borrow().id();
                match serde_json::from_slice::<NodeRecord>(&kv.value) {
                    Ok(r) if own_lease && r.addr == self.record.addr => self.record_fault = None,
                    Ok(_) => {
                        self.own_record_bad(keys, kv.mod_revision, "a record it did not write")
                    }
                    Err(_) => self.own_record_bad(keys, kv.mod_revision, "garbage"),
                }
            }
            Some(JobKey::Node(_) | JobKey::Checkpoint(_) | JobKey::Result) => {}
            None => debug!(key, "ignoring unknown key under the job's prefix"),
        }
    }

    /// Whether a heal of `key` over revision `guard` is still to be tried (once per bad value).
    fn heal_due(&mut self, key: &'static str, guard: i64) -> bool {
        if self.heals_tried.contains(&(key, guard)) {
            return false;
        }
        if self.heals_tried.len() >= 64 {
            self.heals_tried.clear();
        }
        self.heals_tried.push((key, guard));
        true
    }

    /// Rewrites keys the framework owns that hold bad values, where this node knows the truth:
    /// its own record (any node), and, as the job's reporter (see [`Node::job_reporter`]), the epoch (to the last
    /// good epoch) and the spec (to the spec the job runs with). Every rewrite is guarded by
    /// the bad value's revision, so a newer write is never overwritten, and the epoch's and
    /// spec's by the reporter's term, so a deposed primary writes nothing.
    async fn heal(&mut self) {
        if !self.lease_valid() {
            return;
        }
        let keys = self.store.keys().clone();
        if std::mem::take(&mut self.record_dirty) {
            let id = self.lease.borrow().id();
            if let Err(e) = self
                .store
                .register_node(&self.holder.node, &self.record, id)
                .await
            {
                warn!(error = %e, "could not clear the stall from this node's record");
            }
        }
        if let Some(guard) = self.record_fault {
            if self.heal_due("node", guard) {
                let key = keys.node(&self.holder.node);
                let value = serde_json::to_vec(&self.record).unwrap_or_default();
                let lease = self.lease.borrow().id();
                self.heal_key("node", &key, guard, value, None, Some(lease))
                    .await;
            }
        }
        let Some((task, term)) = self.job_reporter() else {
            return;
        };
        let epoch = self.view.as_ref().and_then(|v| {
            let fault = v.epoch_fault.as_ref()?;
            match v.epoch? {
                EpochValue::Running(m) => Some((fault.mod_revision, EpochValue::Running(m))),
                EpochValue::Done(_) => None,
            }
        });
        if let Some((guard, good)) = epoch {
            if self.heal_due("epoch", guard) {
                self.heal_key(
                    "epoch",
                    &keys.epoch(),
                    guard,
                    good.encode().into_bytes(),
                    Some((task, term)),
                    None,
                )
                .await;
            }
        }
        if let Some((_, guard)) = self.spec_fault.clone() {
            if self.heal_due("spec", guard) {
                let spec = self.spec.clone();
                self.heal_key("spec", &keys.spec(), guard, spec, Some((task, term)), None)
                    .await;
            }
        }
    }

    async fn heal_key(
        &mut self,
        what: &'static str,
        key: &str,
        guard: i64,
        value: Vec<u8>,
        fence: Option<(TaskId, i64)>,
        lease: Option<i64>,
    ) {
        let text = String::from_utf8_lossy(&value).into_owned();
        match self.store.heal(key, guard, value, fence, lease).await {
            Ok(true) => {
                self.metrics.key_healed(what);
                error!(
                    key,
                    wrote = text,
                    "healed a key the framework owns: rewrote its last good value"
                );
            }
            // Changed meanwhile (healed by another, or a newer write): judged when it arrives.
            Ok(false) => debug!(key, "the bad value changed before the heal"),
            Err(e) => warn!(key, error = %e, "could not heal the key"),
        }
    }

    /// `Some((task, term))` when this node speaks for the whole job — heals the keys only the
    /// job knows (epoch, spec) and reports a stall's job-wide causes: it is the primary of the
    /// lowest task that has a primary in its view (task 0's, unless task 0 has none right now:
    /// then the job still has one such node).
    fn job_reporter(&self) -> Option<(TaskId, i64)> {
        let MySlot::Primary { task, term } = self.mine else {
            return None;
        };
        let lowest = self.view.as_ref()?.primaries.keys().next().copied();
        (lowest == Some(task)).then_some((task, term))
    }

    /// Reports a stall when one is due: the job's epoch has not moved for longer than the
    /// stall time. The node logs what it can tell at error level; the acting primary of task
    /// 0, and any node that sees a cause in its own slot, also writes it into its record in
    /// etcd (one write per stall time), where operators' tools read it.
    async fn check_stall(&mut self) {
        if self.view.as_ref().is_none_or(JobView::finished) {
            return;
        }
        let now = Instant::now();
        let Some((epoch, still)) = self.stall.due(now) else {
            return;
        };
        let keys = self.store.keys().clone();
        let own = self.own_stall_reasons(now);
        let reporter = self.job_reporter().is_some();
        let mut reasons = own.clone();
        if reporter {
            if let Some(view) = self.view.as_ref() {
                let spec = self.spec_fault.as_ref().map(|(r, _)| r.as_str());
                reasons.extend(view_reasons(view, &keys, spec));
            }
        }
        let text = if reasons.is_empty() {
            "no cause seen from this node".to_owned()
        } else {
            reasons
                .iter()
                .map(|r| r.text.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        };
        error!(
            epoch,
            for_s = still.as_secs_f64(),
            stall_after_s = self.stall.after().as_secs_f64(),
            reasons = text,
            "the job is stalled: its epoch has not moved"
        );
        self.metrics.stalled(true);
        let publishes = reporter || !own.is_empty();
        if !publishes || !self.lease_valid() {
            return;
        }
        self.record.stall = Some(StallNote {
            epoch,
            for_ms: u64::try_from(still.as_millis()).unwrap_or(u64::MAX),
            after_ms: u64::try_from(self.stall.after().as_millis()).unwrap_or(u64::MAX),
            reasons,
        });
        let id = self.lease.borrow().id();
        if let Err(e) = self
            .store
            .register_node(&self.holder.node, &self.record, id)
            .await
        {
            warn!(error = %e, "could not publish the stall in this node's record");
        }
    }

    /// What this node sees in its own slot that holds the job up: a primary past its lease's
    /// local deadline, pulls retried for longer than half the stall time.
    fn own_stall_reasons(&self, now: Instant) -> Vec<StallReason> {
        let mut reasons = Vec::new();
        let (MySlot::Primary { task, .. }, Some(slot)) = (self.mine, self.slot.as_ref()) else {
            return reasons;
        };
        if !self.lease_valid() {
            reasons.push(StallReason {
                task: Some(task),
                key: None,
                text: format!(
                    "task {task}: its primary {} is not acting: its lease is past its local deadline (etcd slow or unreachable from it)",
                    self.holder.node
                ),
            });
        }
        let older = self.stall.after() / 2;
        for (id, method, waited) in slot.ctx.stuck_pulls(now, older) {
            let target = match self.view.as_ref().and_then(|v| v.primaries.get(&id.to)) {
                Some(p) => format!("its primary {} at {}", p.holder.node, p.holder.addr),
                None => "it has no primary".to_owned(),
            };
            reasons.push(StallReason {
                task: Some(id.to),
                key: None,
                text: format!(
                    "task {task}: {id} (method {method:?}) to task {} retried for {:.1} s; {target}",
                    id.to,
                    waited.as_secs_f64()
                ),
            });
        }
        reasons
    }

    async fn on_lease(&mut self, stop: &CancellationToken) -> Result<Flow, Error> {
        let state = *self.lease.borrow_and_update();
        match state {
            LeaseState::Expired { id } => {
                warn!(
                    lease = format!("{id:x}"),
                    "lease expired: giving up the slot and rejoining as a spare"
                );
                self.lose_slot().await;
                self.new_lease(stop).await?;
                self.publish();
                self.step().await
            }
            LeaseState::Suspended { .. } => {
                self.publish();
                Ok(Flow::Continue)
            }
            LeaseState::Alive { .. } => {
                self.publish();
                self.step().await
            }
        }
    }

    /// Ends the slot on this node: the task's `exit(SlotLost)` runs and the value is dropped.
    async fn lose_slot(&mut self) {
        if let Some(mut slot) = self.slot.take() {
            info!(task = slot.ctx.task(), "slot lost");
            slot.state.send_modify(|st| st.primary = None);
            slot.ctx.abort_spawned();
            slot.task.exit(&slot.ctx, ExitReason::SlotLost).await;
        }
        self.mine = MySlot::Spare;
        self.publish();
    }

    /// Decides and acts until nothing is left to do on the current view.
    async fn step(&mut self) -> Result<Flow, Error> {
        loop {
            // Each decision in the span of the slot as it is then.
            let span = self.span();
            if let Some(flow) = self.step_once().instrument(span).await? {
                return Ok(flow);
            }
        }
    }

    /// Decides and acts once: `Some(flow)` when done for now, `None` to decide again.
    async fn step_once(&mut self) -> Result<Option<Flow>, Error> {
        {
            let Some(view) = self.view.as_ref() else {
                return Ok(Some(Flow::Continue));
            };
            if let Some(EpochValue::Done(epoch)) = view.epoch {
                return Ok(Some(Flow::Exit(
                    self.clean_stop(
                        ExitReason::JobFinished { epoch },
                        NodeExit::JobFinished { epoch },
                    )
                    .await,
                )));
            }
            if !self.lease_valid() {
                self.publish();
                return Ok(Some(Flow::Continue));
            }
            let decision = {
                let mut rng = rand::rng();
                decide(view, &self.holder.node, self.mine, &mut |n| {
                    rng.random_range(0..n)
                })
            };
            let lease = self.lease.borrow().id();
            let tasks_replicas = self.config.replicas;
            match decision {
                Decision::Stay => {
                    self.update_monitor();
                    self.enter_current_epoch().await;
                    self.deliver_deferred().await;
                    self.sync_backups().await;
                    self.neighbour_incidents().await;
                    self.publish();
                    return Ok(Some(Flow::Continue));
                }
                Decision::Lost => self.lose_slot().await,
                _ if self.await_change => return Ok(Some(Flow::Continue)),
                Decision::ClaimPrimary(t) => {
                    // Taking over a task whose earlier primary this node saw is a failover.
                    let earlier = self.fence.seen(t) > 0;
                    let won = self
                        .store
                        .claim_primary(t, tasks_replicas, &self.holder, lease)
                        .await;
                    if let Some(term) = self.won("claim primary", t, won) {
                        info!(task = t, term, "became primary");
                        if earlier {
                            self.metrics.failover(t);
                        }
                        self.mine = MySlot::Primary { task: t, term };
                        self.note_own_key(true, t, 0, term, lease);
                        self.take_slot(t, true).await?;
                        self.promoted(term).await;
                    }
                }
                Decision::ClaimBackup(t, k) => {
                    let won = self.store.claim_backup(t, k, &self.holder, lease).await;
                    if let Some(rev) = self.won("claim backup", t, won) {
                        info!(task = t, slot = k, "became backup");
                        self.mine = MySlot::Backup {
                            task: t,
                            k,
                            create_revision: rev,
                        };
                        self.note_own_key(false, t, k, rev, lease);
                        self.take_slot(t, false).await?;
                        if let Some(s) = self.slot.as_mut() {
                            let span = s.span();
                            s.task.became_backup(&s.ctx).instrument(span).await;
                        }
                    }
                }
                Decision::Promote => {
                    let MySlot::Backup {
                        task,
                        k,
                        create_revision,
                    } = self.mine
                    else {
                        return Ok(Some(Flow::Continue));
                    };
                    let won = self
                        .store
                        .promote(task, k, create_revision, &self.holder, lease)
                        .await;
                    if let Some(term) = self.won("promotion", task, won) {
                        info!(task, term, "backup promoted to primary");
                        self.metrics.failover(task);
                        self.mine = MySlot::Primary { task, term };
                        if let Some(v) = self.view.as_mut() {
                            v.backups.remove(&(task, k));
                        }
                        self.note_own_key(true, task, 0, term, lease);
                        self.publish_view();
                        // A backup that never got the primary's state starts like a spare
                        // would: from the task's last checkpoint.
                        let unsynced = self.slot.as_ref().is_some_and(|s| s.replica.is_none());
                        if unsynced {
                            if let Some(cp) = load_checkpoint(
                                self.store.clone(),
                                self.lease.clone(),
                                self.health.clone(),
                                task,
                            )
                            .await
                            {
                                if let Some(s) = self.slot.as_mut() {
                                    info!(task, epoch = cp.epoch, "promoted before getting the primary's state: restoring the checkpoint");
                                    s.task.restore(&s.ctx, cp).await;
                                }
                            }
                        }
                        self.promoted(term).await;
                    }
                }
            }
            self.publish();
            Ok(None)
        }
    }

    /// The revision of a won claim. A lost race means the view was stale: wait for the next
    /// change before claiming again. An etcd error leaves the outcome unknown: decide again
    /// after a pause (or sooner, on a change). Had the claim been applied, its key — under this
    /// node's lease, but not the slot this node holds — is deleted when the watch shows it
    /// (see `Node::stray_key`).
    fn won(
        &mut self,
        what: &'static str,
        task: TaskId,
        outcome: Result<Option<i64>, crate::error::EtcdError>,
    ) -> Option<i64> {
        match outcome {
            Ok(Some(rev)) => {
                self.retry_pause = RETRY_PAUSE;
                return Some(rev);
            }
            Ok(None) => debug!(task, what, "lost the race; waiting for the next change"),
            Err(e) => {
                let pause = self.retry_pause;
                warn!(error = %e, task, what, ?pause, "failed; deciding again after a pause");
                self.retry_at = Some(Instant::now() + pause);
                self.retry_pause = (pause * 2).min(Duration::from_secs(1));
            }
        }
        self.await_change = true;
        None
    }

    /// Whether a slot key under this node's current lease is not the slot the node holds: a
    /// claim whose answer was lost although etcd applied it, or a slot the node gave up while
    /// its key stayed. Such a key blocks the slot for as long as the node lives.
    fn stray_key(&self, key: &JobKey, kv: &Kv) -> bool {
        let lease = self.lease.borrow().id();
        if kv.lease == 0 || kv.lease != lease {
            return false;
        }
        match (key, self.mine) {
            (&JobKey::Primary(t), MySlot::Primary { task, term }) => {
                !(t == task && kv.create_revision == term)
            }
            (
                &JobKey::Backup(t, k),
                MySlot::Backup {
                    task,
                    k: mk,
                    create_revision,
                },
            ) => !(t == task && k == mk && kv.create_revision == create_revision),
            _ => true,
        }
    }

    /// Records a key this node just wrote, so the view agrees before the watch reports it.
    fn note_own_key(&mut self, primary: bool, t: TaskId, k: u32, rev: i64, lease: i64) {
        if let Some(v) = self.view.as_mut() {
            let slot = SlotKey {
                holder: self.holder.clone(),
                create_revision: rev,
                lease,
            };
            if primary {
                v.primaries.insert(t, slot);
            } else {
                v.backups.insert((t, k), slot);
            }
        }
    }

    /// Builds and initialises the task value for a slot just taken as a spare; a primary's
    /// gets the task's last checkpoint.
    async fn take_slot(&mut self, t: TaskId, primary: bool) -> Result<(), Error> {
        let epoch = self
            .view
            .as_ref()
            .and_then(|v| v.epoch)
            .map_or(0, EpochValue::epoch);
        let (state, state_rx) = watch::channel(SlotState {
            primary: None,
            epoch,
        });
        self.slots_taken += 1;
        let env = SlotEnv {
            slot: self.slots_taken,
            task: t,
            num_tasks: self.config.tasks,
            peers: self.peers.clone(),
            store: self.store.clone(),
            view: self.view_tx.subscribe(),
            fence: self.fence.clone(),
            loop_tx: self.requests_tx.clone(),
            lease: self.lease.clone(),
            lease_ttl: self.config.lease_ttl,
            max_checkpoint_bytes: self.config.max_checkpoint_bytes,
            metrics: self.metrics.clone(),
            // This code runs in the node's event loop: its task id tells the context whether
            // a verb is awaited by a handler (on the loop) or by spawned work.
            loop_task: tokio::task::try_id(),
        };
        let ctx = Context::new(Arc::new(env), self.config.links.clone(), state_rx);
        let span = self.slot_span();
        let mut task = self.builder.build(t);
        if let Err(e) = task.init(&ctx).instrument(span.clone()).await {
            return Err(Error::Task {
                task: t,
                reason: e.to_string(),
            });
        }
        if primary {
            if let Some(cp) = load_checkpoint(
                self.store.clone(),
                self.lease.clone(),
                self.health.clone(),
                t,
            )
            .await
            {
                info!(
                    task = t,
                    epoch = cp.epoch,
                    "restoring the task's checkpoint"
                );
                task.restore(&ctx, cp).instrument(span.clone()).await;
            }
        }
        self.slot = Some(SlotRuntime {
            task,
            ctx,
            state,
            entered: None,
            id: self.slots_taken,
            serve: ServeBook::default(),
            neighbours: NeighbourTracker::default(),
            replica: None,
            deferred: Vec::new(),
            span,
            epoch_span: None,
        });
        Ok(())
    }

    /// The node just became primary with `term`: tell the task, then enter the current epoch.
    async fn promoted(&mut self, term: i64) {
        let span = self.slot_span();
        if let Some(s) = self.slot.as_mut() {
            s.entered = None;
            s.span = span.clone();
            s.epoch_span = None;
            s.state.send_modify(|st| st.primary = Some(term as Term));
            s.task
                .became_primary(&s.ctx, term as Term)
                .instrument(span)
                .await;
        }
        self.enter_current_epoch().await;
    }

    /// As primary, enters the job's current epoch if the task has not entered it yet.
    async fn enter_current_epoch(&mut self) {
        let Some(EpochValue::Running(current)) = self.view.as_ref().and_then(|v| v.epoch) else {
            return;
        };
        let primary = matches!(self.mine, MySlot::Primary { .. });
        let acting = self.lease_valid();
        let Some(s) = self.slot.as_mut() else {
            self.observed.clear();
            return;
        };
        if !primary {
            self.observed.clear();
            s.state.send_if_modified(|st| {
                let changed = st.epoch != current;
                st.epoch = current;
                changed
            });
            return;
        }
        if !acting {
            return;
        }
        // A primary enters every epoch it observed, once and in order; a new primary starts at
        // the current one.
        let mut todo: Vec<Epoch> = match s.entered {
            None => vec![current],
            Some(entered) => self
                .observed
                .iter()
                .copied()
                .filter(|e| *e > entered && *e <= current)
                .collect(),
        };
        if todo.last().is_none_or(|last| *last < current) && s.entered.is_none_or(|e| e < current) {
            todo.push(current);
        }
        self.observed.clear();
        let requests_tx = &self.requests_tx;
        for epoch in todo {
            if !self.lease.borrow().valid_now() {
                break;
            }
            s.entered = Some(epoch);
            s.state.send_modify(|st| st.epoch = epoch);
            s.ctx.begin_epoch(epoch);
            self.metrics.epoch_entered(s.ctx.task());
            // Everything of this epoch (handlers, pulls and metas started from them, spawned
            // work) is logged in its span.
            let span = error_span!(parent: &s.span, "epoch", epoch);
            s.epoch_span = Some(span.clone());
            let (early_pulls, early_metas) = s.serve.enter(epoch);
            async {
                debug!("entering epoch");
                s.task.enter_epoch(&s.ctx, epoch).await;
                for meta in early_metas {
                    Self::deliver_meta(s, meta).await;
                }
                for (req, reply) in early_pulls {
                    Self::serve_pull(s, req, reply, requests_tx).await;
                }
            }
            .instrument(span)
            .await;
        }
    }

    /// Runs the task's `exit` and revokes the lease.
    async fn clean_stop(&mut self, reason: ExitReason, exit: NodeExit) -> NodeExit {
        self.monitors.clear();
        if let Some(mut slot) = self.slot.take() {
            slot.state.send_modify(|st| st.primary = None);
            slot.ctx.abort_spawned();
            slot.task.exit(&slot.ctx, reason).await;
        }
        self.lease_task = None;
        let id = self.lease.borrow().id();
        if id != 0 {
            if let Err(e) = self.store.revoke_lease(id).await {
                warn!(error = %e, "could not revoke the lease; it expires after its TTL");
            }
        }
        self.mine = MySlot::Spare;
        self.publish();
        info!(?exit, "node stopped");
        exit
    }
}
