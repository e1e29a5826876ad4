//! Measures the framework's data exchange and its cost on etcd, with in-process nodes on a
//! private etcd. Figures are printed, never asserted.
//!
//! 1. Pull round trip on loopback for a 1 KiB payload (postcard-encoded, 1026 B, echoed back),
//!    three variants measured in the same run, interleaved in blocks of 100 sequential pulls
//!    from the same spawned work of task 0 (so machine drift weighs on all alike):
//!    * `bare`: the framework's own tonic service and client (`taskgraph::wire::serve` with a
//!      tiny loop answering every pull, `taskgraph::wire::Peers`): no event loop, no etcd;
//!    * `request`: a job of 2 tasks (1 replica each) where task 0 pulls from task 1 with the
//!      awaitable `Context::request`, from work started with `Context::spawn`;
//!    * `data_ready`: the same job, `Context::data_request` answered in `Task::data_ready`,
//!      the next pull issued from that handler.
//!
//!    The job stays at epoch 0 throughout; task 0 ends it with `shutdown_job`.
//! 2. etcd writes per epoch of a sum-like dataflow on a binary tree (3, 15, 63 tasks; 1 and 2
//!    replicas): in every epoch each task pulls from its parent and its children (the serving
//!    side holds the request until it has the data) and flags a meta to its parent; the root
//!    moves the epoch on once it has its children's answers and metas. No
//!    `checkpoint`/`replicate` calls: this is the framework's own cost. Measured over a fixed
//!    number of epochs once the job is staffed and 3 epochs have passed: the delta of etcd's
//!    revision (every write bumps it) and of etcd's `/metrics` counters, plus the epoch time
//!    (root entry to root entry), and, before any epoch moves, the revision delta and lease
//!    renewals of the staffed job sitting idle.
//!
//! `cargo run --release -p taskgraph-tests --bin exchange_bench -- [--quick] [--pulls N] [--epochs N]`
//! (`--sizes 3,15,63`, `--replicas 1,2`, `--payload BYTES` also exist.)
//!
//! Output: a readable table on stdout, then one JSON line with every figure. `RUST_LOG`
//! (default `warn`) sets the log level on stderr.

use std::collections::BTreeMap;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use taskgraph::TaskBuilder;
use taskgraph_tests::apps::{Audit, Event};
use taskgraph_tests::dataflow::DataflowBuilder;

use clap::Parser;
use serde_json::{json, Value};
use taskgraph::wire::{
    bind, serve, ClientConfig, Header, Inbound, Peers, PullAnswer, PullRequest, ServerConfig,
};
use taskgraph::{
    async_trait, Bytes, Context, ContextError, DataReply, DataRequest, Epoch, Framework, Links,
    NodeHandle, NodeStatus, Task, TaskId, Tree,
};
use taskgraph_tests::cluster::fully_staffed;
use taskgraph_tests::etcd::Etcd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, Parser)]
#[command(about = "Pull round trip (framework vs bare tonic) and etcd writes per epoch")]
struct Args {
    /// Fewer pulls, fewer epochs, one replica only: a smoke run of a few seconds.
    #[arg(long)]
    quick: bool,
    /// Timed pulls per variant (after a warm-up). Default 2000 (200 with --quick).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pulls: Option<u64>,
    /// Measured epochs per tree size (after a few warm-up epochs). Default 20 (5 with --quick).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    epochs: Option<u64>,
    /// Payload size in bytes for the pull round trip.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(0..=16_000_000))]
    payload: u64,
    /// Tree sizes (tasks) for the etcd figures.
    #[arg(long, value_delimiter = ',', default_values_t = vec![3u32, 15, 63])]
    sizes: Vec<u32>,
    /// Replicas per task for the etcd figures. Default 1,2 (1 with --quick).
    #[arg(long, value_delimiter = ',')]
    replicas: Option<Vec<u32>>,
}

/// Lease TTL of every node.
const TTL: Duration = Duration::from_secs(1);
/// Limit on any one wait (staffing, a run of pulls or epochs, nodes ending).
const WAIT: Duration = Duration::from_secs(60);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------------------------------------
// Statistics

#[derive(Debug, Clone, Copy)]
struct Stats {
    n: usize,
    median: f64,
    p90: f64,
    min: f64,
    max: f64,
    mean: f64,
}

/// Order statistics of `v` (in whatever unit the values are), nearest-rank percentiles.
fn stats(v: &[f64]) -> Option<Stats> {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let at = |q: f64| s[((q * n as f64).ceil() as usize).clamp(1, n) - 1];
    (n > 0).then(|| Stats {
        n,
        median: at(0.5),
        p90: at(0.9),
        min: s[0],
        max: s[n - 1],
        mean: s.iter().sum::<f64>() / n as f64,
    })
}

fn stats_json(s: Option<Stats>) -> Value {
    match s {
        Some(s) => {
            json!({"n": s.n, "median": s.median, "p90": s.p90, "min": s.min, "max": s.max, "mean": s.mean})
        }
        None => Value::Null,
    }
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

// ---------------------------------------------------------------------------------------------
// In-process nodes

/// Starts `tasks × replicas` in-process nodes of a binary-tree job.
async fn start_nodes(
    etcd: &Etcd,
    job: &str,
    tasks: u32,
    replicas: u32,
    builder: impl Fn(TaskId) -> Box<dyn Task> + Clone + Send + Sync + 'static,
) -> Result<Vec<NodeHandle>, BoxError> {
    let tree = Tree::new(tasks, 2)?;
    let links = Links::new()
        .link("parents", tree.parents())
        .link("children", tree.children())
        .pair("parents", "children");
    let mut nodes = Vec::new();
    for i in 0..tasks * replicas {
        let handle = Framework::builder()
            .etcd(etcd.endpoints())
            .job(job)
            .tasks(tasks)
            .replicas(replicas)
            .links(links.clone())
            .lease_ttl(TTL)
            .node_name(format!("n{i}"))
            .task_builder(builder.clone())
            .build()?
            .spawn()
            .await?;
        nodes.push(handle);
    }
    Ok(nodes)
}

fn statuses(nodes: &[NodeHandle]) -> Vec<(usize, NodeStatus)> {
    nodes
        .iter()
        .enumerate()
        .filter(|(_, h)| !h.is_finished())
        .map(|(i, h)| (i, h.status().borrow().clone()))
        .collect()
}

/// Waits until every task has one acting primary and `replicas - 1` acting backups.
async fn wait_staffed(nodes: &[NodeHandle], tasks: u32, replicas: u32) -> Result<(), BoxError> {
    let deadline = Instant::now() + WAIT;
    let backups = replicas.saturating_sub(1) as usize;
    while !fully_staffed(tasks, backups, &statuses(nodes)) {
        if Instant::now() > deadline {
            return Err(format!("job not staffed after {WAIT:?}: {:#?}", statuses(nodes)).into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Waits for every node to end by itself (after `shutdown_job`); stops the stragglers.
async fn wait_nodes(nodes: Vec<NodeHandle>) -> Result<(), BoxError> {
    let mut failed = 0;
    for h in nodes {
        let id = h.id().to_owned();
        if let Err(e) = h.stop_on(tokio::time::sleep(WAIT)).await {
            failed += 1;
            eprintln!("exchange_bench: node {id} ended with an error: {e}");
        }
    }
    if failed > 0 {
        return Err(format!("{failed} node(s) ended with an error").into());
    }
    Ok(())
}

/// Retries `shutdown_job` (or `inc_epoch`) through transient errors.
async fn retry_verb<F, Fut>(mut verb: F) -> Result<(), ContextError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), ContextError>>,
{
    let mut delay = Duration::from_millis(10);
    loop {
        match verb().await {
            Ok(()) => return Ok(()),
            Err(ContextError::Etcd(_) | ContextError::Suspended { .. }) => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(500));
            }
            Err(e) => return Err(e),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Part 1: pull round trip
//
// The three variants run interleaved, in blocks of `BLOCK` pulls (bare, `request`, `data_ready`,
// bare, …), all from the same spawned work of task 0, so that drift of a shared, noisy machine
// weighs on all of them alike.

/// Pulls per variant in one block.
const BLOCK: u64 = 100;

/// Shared state of the pull round-trip job.
#[derive(Debug)]
struct EchoProbe {
    /// Opened once the job is staffed.
    gate: watch::Receiver<bool>,
    /// The raw payload (the typed request sends it postcard-encoded).
    payload: Vec<u8>,
    /// The payload postcard-encoded: what travels in every variant.
    encoded: Bytes,
    warmup: u64,
    pulls: u64,
    /// The bare server's address and a client of its own.
    bare: (Peers, String),
    state: Mutex<EchoState>,
    /// Counts finished `data_ready` blocks.
    blocks: watch::Sender<u64>,
    done: watch::Sender<bool>,
}

#[derive(Debug, Default)]
struct EchoState {
    bare_us: Vec<f64>,
    request_us: Vec<f64>,
    data_ready_us: Vec<f64>,
    /// The `data_ready` block in progress: pulls still to issue after the one in flight,
    /// whether to record them, and when the one in flight was issued.
    remaining: u64,
    record: bool,
    started: Option<Instant>,
    errors: Vec<String>,
}

impl EchoProbe {
    fn fail(&self, what: String) {
        lock(&self.state).errors.push(what);
        self.done.send_replace(true);
    }

    /// `n` pulls to the bare server.
    async fn bare_block(&self, n: u64, record: bool, seq: &mut u64) -> Result<(), String> {
        let (peers, addr) = &self.bare;
        for _ in 0..n {
            *seq += 1;
            let req = PullRequest {
                header: Header {
                    epoch: 0,
                    from_task: 0,
                    to_task: 1,
                    term: 1,
                    ..Header::default()
                },
                seq: *seq,
                method: "echo".to_owned(),
                payload: self.encoded.clone(),
            };
            let t0 = Instant::now();
            let r = peers.pull(addr, req).await;
            let took = t0.elapsed();
            match r {
                Ok(a) if a.payload.len() == self.encoded.len() => {
                    if record {
                        lock(&self.state).bare_us.push(micros(took));
                    }
                }
                Ok(a) => return Err(format!("bare: answer of {} bytes", a.payload.len())),
                Err(e) => return Err(format!("bare: {e}")),
            }
        }
        Ok(())
    }

    /// `n` awaited `Context::request`s to task 1.
    async fn request_block(&self, ctx: &Context, n: u64, record: bool) -> Result<(), String> {
        for _ in 0..n {
            let t0 = Instant::now();
            let r = ctx.request::<[u8], Vec<u8>>(1, "echo", &self.payload).await;
            let took = t0.elapsed();
            match r {
                Ok(a) if a.len() == self.payload.len() => {
                    if record {
                        lock(&self.state).request_us.push(micros(took));
                    }
                }
                Ok(a) => return Err(format!("request: answer of {} bytes", a.len())),
                Err(e) => return Err(format!("request: {e}")),
            }
        }
        Ok(())
    }

    /// `n` pulls with `data_request`, each next one issued from `data_ready`.
    async fn data_ready_block(&self, ctx: &Context, n: u64, record: bool) -> Result<(), String> {
        if n == 0 {
            return Ok(());
        }
        let mut blocks = self.blocks.subscribe();
        let before = *blocks.borrow_and_update();
        {
            let mut st = lock(&self.state);
            st.remaining = n - 1;
            st.record = record;
            st.started = Some(Instant::now());
        }
        ctx.data_request(1, "echo", self.encoded.clone())
            .map_err(|e| format!("data_request: {e}"))?;
        blocks
            .wait_for(|b| *b > before)
            .await
            .map_err(|_| "data_ready block: the probe is gone".to_owned())?;
        Ok(())
    }

    /// Task 0's measuring work.
    async fn measure(&self, ctx: &Context) -> Result<(), String> {
        let mut seq = 0;
        // Warm-up: every variant, nothing recorded.
        self.bare_block(self.warmup, false, &mut seq).await?;
        self.request_block(ctx, self.warmup, false).await?;
        self.data_ready_block(ctx, self.warmup, false).await?;
        let mut left = self.pulls;
        while left > 0 {
            let n = left.min(BLOCK);
            left -= n;
            self.bare_block(n, true, &mut seq).await?;
            self.request_block(ctx, n, true).await?;
            self.data_ready_block(ctx, n, true).await?;
        }
        Ok(())
    }
}

struct EchoTask {
    task: TaskId,
    probe: Arc<EchoProbe>,
    started: bool,
}

#[async_trait]
impl Task for EchoTask {
    async fn enter_epoch(&mut self, ctx: &Context, _epoch: Epoch) {
        if self.task != 0 || self.started {
            return;
        }
        self.started = true;
        let (ctx, probe) = (ctx.clone(), self.probe.clone());
        ctx.clone().spawn(async move {
            let mut gate = probe.gate.clone();
            if gate.wait_for(|open| *open).await.is_err() {
                return;
            }
            if let Err(e) = probe.measure(&ctx).await {
                return probe.fail(e);
            }
            // Tell the bench first: ending the job aborts this slot's spawned work.
            probe.done.send_replace(true);
            let r = retry_verb(|| {
                let ctx = ctx.clone();
                async move { ctx.shutdown_job().await.map(|_| ()) }
            })
            .await;
            if let Err(e) = r {
                probe.fail(format!("shutdown_job: {e}"));
            }
        });
    }

    async fn serve_data(&mut self, _ctx: &Context, request: DataRequest) {
        if request.method() == "echo" {
            let input = request.input().clone();
            request.reply(input);
        } else {
            request.unknown_method();
        }
    }

    async fn data_ready(&mut self, ctx: &Context, reply: DataReply) {
        let now = Instant::now();
        let probe = &self.probe;
        match reply.result() {
            Ok(b) if b.len() == probe.encoded.len() => {}
            Ok(b) => {
                return probe.fail(format!(
                    "data_ready: answer of {} bytes, want {}",
                    b.len(),
                    probe.encoded.len()
                ))
            }
            Err(e) => return probe.fail(format!("data_ready: {e}")),
        }
        let more = {
            let mut st = lock(&probe.state);
            if let Some(t0) = st.started.take() {
                if st.record {
                    st.data_ready_us.push(micros(now - t0));
                }
            }
            if st.remaining > 0 {
                st.remaining -= 1;
                st.started = Some(Instant::now());
                true
            } else {
                false
            }
        };
        if !more {
            probe.blocks.send_modify(|b| *b += 1);
        } else if let Err(e) = ctx.data_request(1, "echo", probe.encoded.clone()) {
            probe.fail(format!("data_request: {e}"));
        }
    }
}

/// The bare server: the framework's tonic service with a loop that echoes every pull.
/// Returns its address and what stops it.
async fn bare_server(job: &str) -> Result<(String, oneshot::Sender<()>), BoxError> {
    let listener = bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let (inbound_tx, mut inbound) = mpsc::channel(1024);
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    tokio::spawn(serve(
        listener,
        ServerConfig::new(job, 2),
        inbound_tx,
        async move {
            let _ = stop_rx.await;
        },
    ));
    // Ends when the server drops its sender.
    tokio::spawn(async move {
        while let Some(msg) = inbound.recv().await {
            if let Inbound::Pull(req, reply) = msg {
                let _ = reply.send(Ok(PullAnswer {
                    payload: req.payload,
                    server_term: 1,
                }));
            }
        }
    });
    Ok((addr, stop_tx))
}

/// Round trips in microseconds: (bare, `request`, `data_ready`).
async fn pull_rtt(
    etcd: &Etcd,
    payload: &[u8],
    warmup: u64,
    pulls: u64,
) -> Result<(Vec<f64>, Vec<f64>, Vec<f64>), BoxError> {
    let job = taskgraph_tests::job_name("rtt");
    let (bare_addr, bare_stop) = bare_server(&job).await?;
    let (gate_tx, gate) = watch::channel(false);
    let (done, mut done_rx) = watch::channel(false);
    let probe = Arc::new(EchoProbe {
        gate,
        payload: payload.to_vec(),
        encoded: taskgraph::encode(payload)?,
        warmup,
        pulls,
        bare: (Peers::new(ClientConfig::new(job.clone())), bare_addr),
        state: Mutex::default(),
        blocks: watch::Sender::new(0),
        done,
    });
    let p = probe.clone();
    let nodes = start_nodes(etcd, &job, 2, 1, move |task| {
        Box::new(EchoTask {
            task,
            probe: p.clone(),
            started: false,
        }) as Box<dyn Task>
    })
    .await?;
    wait_staffed(&nodes, 2, 1).await?;
    gate_tx.send_replace(true);
    let limit = WAIT + Duration::from_millis(pulls.saturating_mul(3));
    let finished = tokio::time::timeout(limit, done_rx.wait_for(|d| *d)).await;
    let _ = bare_stop.send(());
    if finished.is_err() {
        let (a, b, c) = {
            let st = lock(&probe.state);
            (
                st.bare_us.len(),
                st.request_us.len(),
                st.data_ready_us.len(),
            )
        };
        let s = statuses(&nodes);
        for h in nodes {
            let _ = h.stop().await;
        }
        return Err(format!(
            "the pulls did not finish within {limit:?}: {a} bare, {b} `request` and {c} \
             `data_ready` round trips timed; node statuses: {s:?}"
        )
        .into());
    }
    wait_nodes(nodes).await?;
    let st = std::mem::take(&mut *lock(&probe.state));
    if let Some(e) = st.errors.first() {
        return Err(format!("pulls failed: {e}").into());
    }
    Ok((st.bare_us, st.request_us, st.data_ready_us))
}

// ---------------------------------------------------------------------------------------------
// Part 2: etcd writes per epoch

async fn etcd_metrics(url: &str) -> Result<BTreeMap<String, f64>, BoxError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or("metrics URL is not http")?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/metrics"),
    };
    let mut stream = tokio::net::TcpStream::connect(host).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .await?;
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut body)).await??;
    let mut out = BTreeMap::new();
    for line in body.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let key = match name {
            "etcd_mvcc_put_total"
            | "etcd_mvcc_delete_total"
            | "etcd_mvcc_txn_total"
            | "etcd_mvcc_range_total"
            | "etcd_debugging_mvcc_events_total"
            | "etcd_debugging_lease_renewed_total" => name.to_owned(),
            _ if name.starts_with("grpc_server_handled_total{") => {
                // Requests per method (summed over result codes).
                match label(name, "grpc_method") {
                    Some(
                        m
                        @ ("Range" | "Txn" | "Put" | "DeleteRange" | "LeaseGrant" | "LeaseRevoke"),
                    ) => {
                        format!("grpc {m}")
                    }
                    _ => continue,
                }
            }
            _ if name.starts_with("grpc_server_msg_received_total{") => {
                match label(name, "grpc_method") {
                    Some(m @ ("LeaseKeepAlive" | "Watch")) => format!("grpc {m} msgs"),
                    _ => continue,
                }
            }
            _ => continue,
        };
        *out.entry(key).or_insert(0.0) += value;
    }
    if !out.contains_key("etcd_mvcc_put_total") {
        return Err(format!("no etcd_mvcc_put_total in {url}").into());
    }
    Ok(out)
}

fn label<'a>(name: &'a str, label: &str) -> Option<&'a str> {
    let start = name.find(&format!("{label}=\""))? + label.len() + 2;
    let len = name[start..].find('"')?;
    Some(&name[start..start + len])
}

fn delta(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .collect()
}

async fn revision(client: &mut etcd_client::Client) -> Result<i64, BoxError> {
    let r = client.get("exchange-bench-probe", None).await?;
    Ok(r.header().ok_or("no header in etcd's answer")?.revision())
}

#[derive(Debug)]
struct EpochFigures {
    tasks: u32,
    replicas: u32,
    epochs: u64,
    revision_delta: i64,
    idle_revision_delta: i64,
    idle_metrics: BTreeMap<String, f64>,
    idle: Duration,
    window: Duration,
    metrics: BTreeMap<String, f64>,
    epoch_ms: Option<Stats>,
    staffing: Duration,
}

/// Collects the root's epoch entries until it has entered epoch `e`.
async fn wait_for_root(
    entries: &mut mpsc::UnboundedReceiver<(Epoch, Instant)>,
    at: &mut BTreeMap<Epoch, Instant>,
    e: Epoch,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !at.contains_key(&e) {
        match tokio::time::timeout_at(deadline, entries.recv()).await {
            Ok(Some((epoch, when))) => {
                at.insert(epoch, when);
            }
            Ok(None) => return Err(format!("the root is gone before epoch {e}")),
            Err(_) => return Err(format!("the root did not reach epoch {e} in {WAIT:?}")),
        }
    }
    Ok(())
}

async fn etcd_per_epoch(
    etcd: &Etcd,
    tasks: u32,
    replicas: u32,
    warm: u64,
    epochs: u64,
    idle: Duration,
) -> Result<EpochFigures, BoxError> {
    let job = taskgraph_tests::job_name(&format!("sum{tasks}"));
    // The dataflow test app without its replicated, checkpointed counter: pulls to parent and
    // children, a meta to the parent, the root moves the epoch. The gate holds the root.
    let (entries_tx, mut entries) = mpsc::unbounded_channel();
    let audit = Audit::with_callback(move |_, e| {
        if let Event::Enter { task: 0, epoch, .. } = e {
            let _ = entries_tx.send((*epoch, Instant::now()));
        }
    });
    audit.close_gate();
    let builder = DataflowBuilder {
        node: "bench".into(),
        audit: audit.clone(),
        until: warm + epochs,
        pace: Duration::ZERO,
        state: false,
    };
    let t0 = Instant::now();
    let nodes = start_nodes(etcd, &job, tasks, replicas, move |task| builder.build(task)).await?;
    wait_staffed(&nodes, tasks, replicas).await?;
    let staffing = t0.elapsed();
    let mut client = etcd.client().await?;
    let url = etcd.metrics_url();

    // Staffed, at epoch 0, nobody moving: background writes only.
    let r_idle = revision(&mut client).await?;
    let m_idle = etcd_metrics(&url).await?;
    tokio::time::sleep(idle).await;
    let idle_metrics = delta(&m_idle, &etcd_metrics(&url).await?);
    let idle_revision_delta = revision(&mut client).await? - r_idle;

    let mut at = BTreeMap::new();
    // Warm-up epochs, then the measured window.
    audit.open_gate_until(warm);
    wait_for_root(&mut entries, &mut at, warm).await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Revision read outside the metrics window, so that the bench's own `get`s are not counted.
    let r0 = revision(&mut client).await?;
    let m0 = etcd_metrics(&url).await?;
    let w0 = Instant::now();
    audit.open_gate_until(warm + epochs);
    wait_for_root(&mut entries, &mut at, warm + epochs).await?;
    let window = w0.elapsed();
    let m1 = etcd_metrics(&url).await?;
    let r1 = revision(&mut client).await?;
    audit.open_gate();
    wait_nodes(nodes).await?;

    // Root entry to root entry. The first epoch of the window is left out: the root entered it
    // before the window opened and waited there while the bench read etcd.
    let epoch_ms: Vec<f64> = (warm + 1..warm + epochs)
        .filter_map(|e| Some((*at.get(&(e + 1))? - *at.get(&e)?).as_secs_f64() * 1e3))
        .collect();
    let metrics = delta(&m0, &m1);
    Ok(EpochFigures {
        tasks,
        replicas,
        epochs,
        revision_delta: r1 - r0,
        idle_revision_delta,
        idle_metrics,
        idle,
        window,
        metrics,
        epoch_ms: stats(&epoch_ms),
        staffing,
    })
}

// ---------------------------------------------------------------------------------------------

async fn run(args: Args) -> Result<(), BoxError> {
    let pulls = args.pulls.unwrap_or(if args.quick { 200 } else { 2000 });
    let warmup = (pulls / 10).clamp(20, 500);
    let epochs = args.epochs.unwrap_or(if args.quick { 5 } else { 20 });
    let warm_epochs = 3;
    let replicas = args
        .replicas
        .clone()
        .unwrap_or(if args.quick { vec![1] } else { vec![1, 2] });
    let idle = if args.quick {
        Duration::from_millis(500)
    } else {
        Duration::from_secs(2)
    };
    let payload: Vec<u8> = (0..args.payload).map(|i| (i % 251) as u8).collect();
    // What travels in all three variants: the postcard encoding of the payload.
    let wire_payload = taskgraph::encode(&payload[..])?;

    let etcd = Etcd::start().await?;
    let started = Instant::now();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("exchange_bench: {cpus} CPUs, all nodes in this process, etcd 1 member on loopback");

    // Part 1.
    println!(
        "== pull round trip on loopback: {} B payload echoed ({} B on the wire each way), {pulls} sequential pulls after {warmup} warm-up",
        payload.len(),
        wire_payload.len()
    );
    let (bare, request, data_ready) = pull_rtt(&etcd, &payload, warmup, pulls).await?;
    let (bare, request, data_ready) = (stats(&bare), stats(&request), stats(&data_ready));
    println!(
        "{:<44} {:>6} {:>10} {:>10} {:>10} {:>10} {:>9}",
        format!("variant (interleaved in blocks of {BLOCK})"),
        "n",
        "median µs",
        "p90 µs",
        "min µs",
        "max µs",
        "÷ bare"
    );
    let base = bare.map(|b| b.median);
    let ratio = |s: Option<Stats>| match (s, base) {
        (Some(s), Some(b)) if b > 0.0 => Some(s.median / b),
        _ => None,
    };
    for (name, s) in [
        ("bare tonic (wire::serve + wire::Peers)", bare),
        ("framework: Context::request (spawned)", request),
        ("framework: data_request → data_ready", data_ready),
    ] {
        if let Some(s) = s {
            println!(
                "{name:<44} {:>6} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>8.2}×",
                s.n,
                s.median,
                s.p90,
                s.min,
                s.max,
                ratio(Some(s)).unwrap_or(f64::NAN)
            );
        }
    }

    // Part 2.
    println!();
    println!(
        "== etcd writes per epoch: binary tree, pulls to parent and children, meta to parent, root moves the epoch; {epochs} epochs measured after {warm_epochs}"
    );
    let mut figures = Vec::new();
    for &r in &replicas {
        for &n in &args.sizes {
            let f = etcd_per_epoch(&etcd, n, r, warm_epochs, epochs, idle).await?;
            figures.push(f);
        }
    }
    println!(
        "{:>5} {:>4} {:>5} {:>6} {:>9} {:>7} {:>7} {:>7} {:>8} {:>9} {:>9} {:>9} {:>9} | {:>9} {:>10}",
        "tasks",
        "repl",
        "nodes",
        "rev Δ",
        "writes/ep",
        "put/ep",
        "del/ep",
        "txn/ep",
        "range/ep",
        "watch ev/ep",
        "ep med ms",
        "ep p90 ms",
        "ep mean ms",
        "idle rev Δ",
        "renewals/s"
    );
    let per =
        |f: &EpochFigures, k: &str| f.metrics.get(k).copied().unwrap_or(0.0) / f.epochs as f64;
    for f in &figures {
        let (med, p90) = f
            .epoch_ms
            .map(|s| (s.median, s.p90))
            .unwrap_or((f64::NAN, f64::NAN));
        let renewals = f
            .idle_metrics
            .get("etcd_debugging_lease_renewed_total")
            .copied()
            .unwrap_or(f64::NAN);
        println!(
            "{:>5} {:>4} {:>5} {:>6} {:>9.2} {:>7.2} {:>7.2} {:>7.2} {:>8.2} {:>11.1} {:>9.2} {:>9.2} {:>10.2} | {:>10} {:>10.1}",
            f.tasks,
            f.replicas,
            f.tasks * f.replicas,
            f.revision_delta,
            f.revision_delta as f64 / f.epochs as f64,
            per(f, "etcd_mvcc_put_total"),
            per(f, "etcd_mvcc_delete_total"),
            per(f, "etcd_mvcc_txn_total"),
            per(f, "etcd_mvcc_range_total"),
            per(f, "etcd_debugging_mvcc_events_total"),
            med,
            p90,
            f.window.as_secs_f64() * 1e3 / f.epochs as f64,
            f.idle_revision_delta,
            renewals / f.idle.as_secs_f64()
        );
    }
    println!(
        "(left: over the measured window — revision Δ, etcd_mvcc_* counters, watch events sent; \
         epoch time root entry to root entry; right: staffed job idle at epoch 0 for {:.1} s)",
        idle.as_secs_f64()
    );
    println!("total {:.1} s", started.elapsed().as_secs_f64());

    let line = json!({
        "bench": "exchange",
        "cpus": cpus,
        "pull_rtt_us": {
            "payload_bytes": payload.len(),
            "wire_payload_bytes": wire_payload.len(),
            "pulls": pulls,
            "warmup": warmup,
            "interleaved_block": BLOCK,
            "bare": stats_json(bare),
            "framework_request": stats_json(request),
            "framework_data_ready": stats_json(data_ready),
            "ratio_request_over_bare": ratio(request),
            "ratio_data_ready_over_bare": ratio(data_ready),
        },
        "etcd_per_epoch": figures.iter().map(|f| json!({
            "tasks": f.tasks,
            "replicas": f.replicas,
            "epochs": f.epochs,
            "revision_delta": f.revision_delta,
            "writes_per_epoch": f.revision_delta as f64 / f.epochs as f64,
            "metrics_delta": f.metrics,
            "metrics_per_epoch": f.metrics.iter().map(|(k, v)| (k.clone(), v / f.epochs as f64)).collect::<BTreeMap<_, _>>(),
            "epoch_ms": stats_json(f.epoch_ms),
            "window_s": f.window.as_secs_f64(),
            "idle_revision_delta": f.idle_revision_delta,
            "idle_metrics_delta": f.idle_metrics,
            "idle_s": f.idle.as_secs_f64(),
            "staffing_s": f.staffing.as_secs_f64(),
        })).collect::<Vec<_>>(),
    });
    println!("{line}");
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    match run(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("exchange_bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
