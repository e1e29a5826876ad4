//! Operating a node (issue 6): Prometheus metrics scraped over real HTTP from running nodes,
//! `/healthz` and `/readyz` through a node's life, and the tracing spans on its log lines.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use taskgraph::{
    async_trait, Context, Epoch, Framework, FrameworkBuilder, NodeHandle, NodeStatus, Role, Task,
    TaskId,
};
use taskgraph_tests::apps::{Audit, AuditBuilder, Behaviour};
use taskgraph_tests::cluster::{fully_staffed, ClusterConfig};
use taskgraph_tests::dataflow::DataflowBuilder;
use taskgraph_tests::etcd::Etcd;
use taskgraph_tests::prometheus::Scrape;
use taskgraph_tests::{init_logs, job_name};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tracing::info;

const WAIT: Duration = Duration::from_secs(30);
/// Between two polls of an HTTP endpoint while waiting for a condition.
const POLL: Duration = Duration::from_millis(50);

async fn etcd() -> Etcd {
    init_logs();
    Etcd::start().await.expect("start etcd")
}

// ----- a bare HTTP/1.1 client -----

#[derive(Debug, Clone)]
struct HttpResponse {
    status: u16,
    content_type: String,
    body: String,
}

/// `GET path` from `addr` over a fresh connection.
async fn http_get(addr: SocketAddr, path: &str) -> Result<HttpResponse, String> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("send: {e}"))?;
        let mut raw = Vec::new();
        stream
            .read_to_end(&mut raw)
            .await
            .map_err(|e| format!("read: {e}"))?;
        parse_http(&raw)
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| format!("GET {path} from {addr}: no answer within 10 s"))?
}

fn parse_http(raw: &[u8]) -> Result<HttpResponse, String> {
    let text = String::from_utf8(raw.to_vec()).map_err(|e| format!("not UTF-8: {e}"))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no end of headers in {text:?}"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers: BTreeMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let body = if headers
        .get("transfer-encoding")
        .is_some_and(|t| t.eq_ignore_ascii_case("chunked"))
    {
        dechunk(body)?
    } else {
        body.to_owned()
    };
    if let Some(len) = headers.get("content-length") {
        let len: usize = len.parse().map_err(|_| format!("content-length {len}"))?;
        if len != body.len() {
            return Err(format!("content-length {len}, body of {}", body.len()));
        }
    }
    Ok(HttpResponse {
        status,
        content_type: headers.get("content-type").cloned().unwrap_or_default(),
        body,
    })
}

fn dechunk(mut rest: &str) -> Result<String, String> {
    let mut out = String::new();
    loop {
        let (size, after) = rest
            .split_once("\r\n")
            .ok_or("truncated chunk size".to_owned())?;
        let size = usize::from_str_radix(size.trim(), 16).map_err(|e| format!("chunk: {e}"))?;
        if size == 0 {
            return Ok(out);
        }
        let chunk = after.get(..size).ok_or("truncated chunk".to_owned())?;
        out.push_str(chunk);
        rest = after
            .get(size + 2..)
            .ok_or("truncated chunk end".to_owned())?;
    }
}

async fn scrape(addr: SocketAddr) -> Result<Scrape, String> {
    let r = http_get(addr, "/metrics").await?;
    if r.status != 200 {
        return Err(format!("/metrics answered {}: {}", r.status, r.body));
    }
    if !r.content_type.starts_with("application/openmetrics-text") {
        return Err(format!("/metrics content type {:?}", r.content_type));
    }
    if !r.body.ends_with("# EOF\n") {
        return Err("/metrics does not end with # EOF".into());
    }
    Scrape::parse(&r.body)
}

/// Scrapes `addr` until `cond` holds; the error shows the last scrape.
async fn wait_scrape(
    addr: SocketAddr,
    why: &str,
    cond: impl Fn(&Scrape) -> bool,
) -> Result<Scrape, String> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let last = scrape(addr).await;
        if let Ok(s) = &last {
            if cond(s) {
                return Ok(s.clone());
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "timed out after {WAIT:?} waiting until {why}; last scrape: {last:#?}"
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// GETs `path` from `addr` until the answer has status `code`; the error shows the last
/// answer.
async fn wait_http(
    addr: SocketAddr,
    path: &str,
    code: u16,
    why: &str,
) -> Result<HttpResponse, String> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let last = http_get(addr, path).await;
        if let Ok(r) = &last {
            if r.status == code {
                return Ok(r.clone());
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "timed out after {WAIT:?} waiting until {why}; last answer to {path}: {last:#?}"
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until `addr` refuses connections.
async fn wait_refused(addr: SocketAddr) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let last = http_get(addr, "/healthz").await;
        if last.is_err() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("{addr} still answers after {WAIT:?}: {last:#?}"));
        }
        tokio::time::sleep(POLL).await;
    }
}

// ----- in-process nodes serving metrics -----

/// In-process nodes of one job, each serving its metrics on a port of its own.
struct Nodes {
    config: ClusterConfig,
    audit: Audit,
    handles: Vec<Option<NodeHandle>>,
    statuses: Vec<watch::Receiver<NodeStatus>>,
}

impl Nodes {
    fn new(config: ClusterConfig) -> Self {
        Nodes {
            config,
            audit: Audit::default(),
            handles: Vec::new(),
            statuses: Vec::new(),
        }
    }

    fn builder(&self, i: usize) -> FrameworkBuilder {
        Framework::builder()
            .etcd(self.config.etcd.clone())
            .job(self.config.job.clone())
            .tasks(self.config.tasks)
            .replicas(self.config.replicas)
            .links(self.config.links())
            .lease_ttl(self.config.ttl)
            .node_name(format!("n{i}"))
            .metrics_addr(SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    async fn add(&mut self, builder: FrameworkBuilder) -> usize {
        let handle = builder.build().unwrap().spawn().await.unwrap();
        assert!(handle.metrics_addr().is_some_and(|a| a.port() != 0));
        self.statuses.push(handle.status());
        self.handles.push(Some(handle));
        self.handles.len() - 1
    }

    /// A node running the dataflow app (every task pulls every epoch).
    async fn add_dataflow(&mut self, until: Epoch, pace: Duration) -> usize {
        let i = self.handles.len();
        let app = DataflowBuilder {
            node: format!("n{i}"),
            audit: self.audit.clone(),
            until,
            pace,
            state: true,
        };
        self.add(self.builder(i).task_builder(app)).await
    }

    /// The audit app (nobody moves the epoch) for the next node.
    fn audit_app(&self) -> AuditBuilder {
        AuditBuilder {
            node: format!("n{}", self.handles.len()),
            audit: self.audit.clone(),
            behaviour: Behaviour::default(),
        }
    }

    /// A node running the audit app.
    async fn add_audit(&mut self) -> usize {
        let builder = self
            .builder(self.handles.len())
            .task_builder(self.audit_app());
        self.add(builder).await
    }

    fn addr(&self, i: usize) -> SocketAddr {
        self.handles[i]
            .as_ref()
            .and_then(NodeHandle::metrics_addr)
            .expect("a live node with a metrics address")
    }

    fn id(&self, i: usize) -> String {
        self.statuses[i].borrow().node_id.clone()
    }

    fn live(&self) -> Vec<(usize, NodeStatus)> {
        (0..self.handles.len())
            .filter(|i| self.handles[*i].as_ref().is_some_and(|h| !h.is_finished()))
            .map(|i| (i, self.statuses[i].borrow().clone()))
            .collect()
    }

    fn primary_of(&self, task: TaskId) -> Option<(usize, u64)> {
        self.live()
            .into_iter()
            .find_map(|(i, s)| s.primary_of(task).map(|t| (i, t)))
    }

    fn backup_of(&self, task: TaskId) -> Option<usize> {
        self.live()
            .into_iter()
            .find(|(_, s)| s.acting && s.role == Role::Backup { task })
            .map(|(i, _)| i)
    }

    /// Waits until `cond` holds for the live nodes' statuses, re-checking on every change.
    async fn wait_until(
        &self,
        why: &str,
        mut cond: impl FnMut(&[(usize, NodeStatus)]) -> bool,
    ) -> Vec<(usize, NodeStatus)> {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut rx = self.statuses.clone();
        loop {
            let now = self.live();
            if cond(&now) {
                return now;
            }
            let changes = futures::future::select_all(rx.iter_mut().map(|r| Box::pin(r.changed())));
            tokio::select! {
                _ = changes => {}
                // Nodes ending also count as a change worth re-checking.
                _ = tokio::time::sleep(POLL) => {}
                _ = tokio::time::sleep_until(deadline) => {
                    panic!("timed out after {WAIT:?} waiting until {why}; last statuses: {:#?}", self.live());
                }
            }
        }
    }

    fn crash(&mut self, i: usize) {
        if let Some(h) = self.handles[i].take() {
            h.crash();
        }
    }

    async fn stop_all(&mut self) {
        for h in self.handles.iter_mut() {
            if let Some(h) = h.take() {
                let _ = h.stop().await;
            }
        }
    }
}

fn task(t: TaskId) -> String {
    t.to_string()
}

// ----- tests -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_move_across_epochs_and_etcd_requests_are_counted() {
    let etcd = etcd().await;
    let job = job_name("metrics");
    let mut config = ClusterConfig::new(etcd.endpoints(), &job, 3, 1);
    // No lease needs to lapse here: a long one keeps a loaded machine from deposing anyone.
    config.ttl = Duration::from_secs(5);
    let mut nodes = Nodes::new(config);
    nodes.audit.close_gate();
    for _ in 0..3 {
        nodes
            .add_dataflow(1_000_000, Duration::from_millis(20))
            .await;
    }
    nodes
        .wait_until("every task has its primary", |s| fully_staffed(3, 0, s))
        .await;
    nodes.audit.open_gate();
    let (root, term) = nodes.primary_of(0).unwrap();
    let (leaf, _) = nodes.primary_of(1).unwrap();
    let addr = nodes.addr(root);
    let t0 = task(0);
    let root_task = [("task", t0.as_str())];

    // Every kind of etcd request the root makes, each counted once it has been answered.
    let ops = [
        "lease grant",
        "txn create spec",
        "txn claim primary",
        "txn inc epoch",
        "txn put checkpoint",
        "lease keep-alive",
        "watch",
    ];
    let counted = |s: &Scrape, op: &str| {
        s.sum(
            "taskgraph_etcd_requests_total",
            &[("op", op), ("outcome", "ok")],
        ) >= 1.0
    };
    info!("--- scrape the root once it is in epoch 2 and has made every kind of etcd request");
    let a = wait_scrape(addr, "the root is in epoch 2", |s| {
        s.value("taskgraph_epochs_entered_total", &root_task) >= Some(3.0)
            && ops.iter().all(|op| counted(s, op))
    })
    .await
    .unwrap();
    let job_label = [("job", job.as_str())];
    assert!(
        a.samples.iter().all(|s| s.labels.get("job") == Some(&job)),
        "every series carries the job: {a:#?}"
    );
    assert_eq!(
        a.value(
            "taskgraph_node_info",
            &[("job", job.as_str()), ("node", nodes.id(root).as_str())]
        ),
        Some(1.0)
    );
    assert_eq!(
        a.value(
            "taskgraph_role",
            &[("role", "primary"), ("task", t0.as_str())]
        ),
        Some(1.0),
        "{a:#?}"
    );
    assert_eq!(
        a.samples
            .iter()
            .filter(|s| s.name == "taskgraph_role")
            .count(),
        1,
        "one role at a time"
    );
    assert_eq!(a.value("taskgraph_term", &root_task), Some(term as f64));
    assert_eq!(
        a.value("taskgraph_lease_grants_total", &job_label),
        Some(1.0)
    );
    assert!(a.value("taskgraph_epoch", &job_label) >= Some(2.0));
    for op in ops {
        assert!(
            a.value(
                "taskgraph_etcd_request_duration_seconds_count",
                &[("op", op)]
            ) >= Some(1.0),
            "etcd latency of {op:?}"
        );
    }
    assert_eq!(
        a.types.get("taskgraph_pulls_served").map(String::as_str),
        Some("counter")
    );
    assert_eq!(
        a.types
            .get("taskgraph_pull_duration_seconds")
            .map(String::as_str),
        Some("histogram")
    );
    assert_eq!(a.sum("taskgraph_pulls_failed_total", &[]), 0.0);

    info!("--- two epochs later, every exchange counter of the root has moved");
    let entered_a = a
        .value("taskgraph_epochs_entered_total", &root_task)
        .unwrap();
    let b = wait_scrape(addr, "the root entered two more epochs", |s| {
        s.value("taskgraph_epochs_entered_total", &root_task) >= Some(entered_a + 2.0)
    })
    .await
    .unwrap();
    for name in [
        // Two `param` pulls from the children per epoch.
        "taskgraph_pulls_served_total",
        // Two `grad` pulls to the children per epoch.
        "taskgraph_pulls_sent_total",
        "taskgraph_pull_duration_seconds_count",
        // `done` from both children per epoch.
        "taskgraph_metas_received_total",
    ] {
        let (before, after) = (a.sum(name, &root_task), b.sum(name, &root_task));
        assert!(after > before, "{name} of the root: {before} then {after}");
    }
    assert!(
        b.value("taskgraph_epoch", &job_label) > a.value("taskgraph_epoch", &job_label),
        "the epoch gauge follows the job"
    );
    assert!(
        b.sum("taskgraph_pulls_served_total", &root_task)
            >= a.sum("taskgraph_pulls_served_total", &root_task) + 2.0,
        "at least one more epoch of the children's pulls was served"
    );
    info!("--- a leaf serves its gradient and sends its meta every epoch");
    let t1 = task(1);
    let leaf_task = [("task", t1.as_str())];
    // An acknowledgement may arrive after the leaf moved on (its sender is then cancelled):
    // wait for the counts rather than assume them.
    wait_scrape(nodes.addr(leaf), "the leaf served and flagged twice", |s| {
        s.sum("taskgraph_pulls_served_total", &leaf_task) >= 2.0
            && s.sum("taskgraph_metas_sent_total", &leaf_task) >= 2.0
    })
    .await
    .unwrap();

    info!("--- the lease keeps being renewed");
    let renewals = b
        .value("taskgraph_lease_renewals_total", &job_label)
        .unwrap_or(0.0);
    wait_scrape(addr, "one more lease renewal", |s| {
        s.value("taskgraph_lease_renewals_total", &job_label) > Some(renewals)
    })
    .await
    .unwrap();

    let health = http_get(addr, "/healthz").await.unwrap();
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
    let ready = http_get(addr, "/readyz").await.unwrap();
    assert_eq!(ready.status, 200, "{ready:?}");
    assert!(ready.body.starts_with("primary of task 0"), "{ready:?}");
    assert!(ready.content_type.starts_with("text/plain"), "{ready:?}");
    assert_eq!(http_get(addr, "/nothing").await.unwrap().status, 404);
    nodes.stop_all().await;
}

/// What joining a running job costs etcd, from the joining node's own request counters: its
/// spec check (the connection probe), its lease grant, and one transaction that registers it
/// and reads what it watches (the job watch's first snapshot: no read of the watch's own), then
/// one watch stream of four watches (the epoch, its record, its draft, the spec with task 0's
/// slots). 2,048 nodes joining together each pay this, so each request counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spare_joins_with_three_requests_and_one_watch_stream() {
    let etcd = etcd().await;
    let mut config = ClusterConfig::new(etcd.endpoints(), &job_name("joincost"), 1, 1);
    config.ttl = Duration::from_secs(5);
    let mut nodes = Nodes::new(config);
    nodes.add_audit().await;
    nodes
        .wait_until("task 0 has a primary", |s| fully_staffed(1, 0, s))
        .await;
    // One replica: the second node stays a spare.
    let spare = nodes.add_audit().await;
    let ok = |s: &Scrape, op: &str| {
        s.sum(
            "taskgraph_etcd_requests_total",
            &[("op", op), ("outcome", "ok")],
        )
    };
    let ranges = |s: &Scrape| s.sum("taskgraph_watched_key_ranges", &[]);
    let joined = wait_scrape(nodes.addr(spare), "the spare has joined and watches", |s| {
        s.value("taskgraph_role", &[("role", "spare")]) == Some(1.0)
            && ok(s, "watch") >= 1.0
            && ok(s, "lease grant") >= 1.0
    })
    .await
    .unwrap();
    for (op, want) in [
        ("txn create spec", 1.0),
        ("lease grant", 1.0),
        ("txn register and read", 1.0),
        ("watch", 1.0),
        ("txn get ranges", 0.0),
        ("put", 0.0),
        ("get", 0.0),
    ] {
        assert_eq!(ok(&joined, op), want, "{op:?}: {joined:#?}");
    }
    // Answered requests only: one sent again after a timeout on a slow machine is not a
    // request the node makes by design.
    let all: f64 = joined
        .samples
        .iter()
        .filter(|s| s.name == "taskgraph_etcd_requests_total")
        .filter(|s| s.labels.get("outcome").map(String::as_str) == Some("ok"))
        .filter(|s| s.labels.get("op").map(String::as_str) != Some("lease keep-alive"))
        .map(|s| s.value)
        .sum();
    assert_eq!(all, 4.0, "three requests and one watch stream: {joined:#?}");
    assert_eq!(ranges(&joined), 4.0);
    nodes.stop_all().await;
}

/// A dataflow job of 3 tasks × 2 replicas (6 nodes, epochs 20 ms apart), staffed and running.
/// The TTL is long (5 s): a crashed node's port refuses at once, so its lease is ended on
/// evidence; a long TTL only keeps a loaded machine from deposing anyone else.
async fn three_tasks_two_replicas(etcd: &Etcd, name: &str) -> Nodes {
    let mut config = ClusterConfig::new(etcd.endpoints(), &job_name(name), 3, 2);
    config.ttl = Duration::from_secs(5);
    let mut nodes = Nodes::new(config);
    nodes.audit.close_gate();
    for _ in 0..6 {
        nodes
            .add_dataflow(1_000_000, Duration::from_millis(20))
            .await;
    }
    nodes
        .wait_until("every task has a primary and a backup", |s| {
            fully_staffed(3, 1, s)
        })
        .await;
    nodes.audit.open_gate();
    nodes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_holds_its_live_primary_without_polling_and_sees_one_watch_event_per_epoch() {
    let etcd = etcd().await;
    let mut nodes = three_tasks_two_replicas(&etcd, "holds").await;
    let (root, _) = nodes.primary_of(0).unwrap();
    let t0 = task(0);
    let root_task = [("task", t0.as_str())];
    let root_entered = |s: &Scrape| {
        s.value("taskgraph_epochs_entered_total", &root_task)
            .unwrap_or(0.0)
    };
    let hold = [("kind", "hold")];
    let ping = [("kind", "ping")];
    let backups: Vec<usize> = (0..3).map(|t| nodes.backup_of(t).unwrap()).collect();
    // Every backup has its hold open once it is a backup; take the counts after that.
    let mut before = Vec::new();
    for &b in &backups {
        before.push(
            wait_scrape(nodes.addr(b), "the backup holds its primary", |s| {
                s.sum("taskgraph_liveness_checks_total", &hold) >= 1.0
            })
            .await
            .unwrap(),
        );
    }
    let start = root_entered(&scrape(nodes.addr(root)).await.unwrap());
    let watch_events = |s: &Scrape| s.sum("taskgraph_watch_events_total", &[]);

    info!("--- 20 epochs (20 ms apart) later: no backup checked its primary again");
    wait_scrape(nodes.addr(root), "the root entered 20 more epochs", |s| {
        root_entered(s) >= start + 20.0
    })
    .await
    .unwrap();
    for (&b, before) in backups.iter().zip(&before) {
        let after = scrape(nodes.addr(b)).await.unwrap();
        assert!(
            nodes
                .live()
                .iter()
                .any(|(i, s)| *i == b && s.acting && matches!(s.role, Role::Backup { .. })),
            "node {b} is still a backup"
        );
        for kind in [hold, ping] {
            assert_eq!(
                after.sum("taskgraph_liveness_checks_total", &kind),
                before.sum("taskgraph_liveness_checks_total", &kind),
                "backup {b}: {kind:?} checks while its primary lives (a poll would add one \
                 every 50 ms)"
            );
        }
        // Every task checkpoints every epoch; a backup's watch sees only the epoch moving
        // (the whole-job watch also sent it each task's checkpoint: 4 events per epoch).
        let seen = watch_events(&after) - watch_events(before);
        let moved = root_entered(&scrape(nodes.addr(root)).await.unwrap()) - start;
        assert!(
            seen >= 20.0 && seen <= moved + 2.0,
            "backup {b}: {seen} watch events over {moved} epochs"
        );
    }
    // The primaries' pulls and metas reach an idle event loop most of the time: those are
    // served on their gRPC call's own task, without the hop to the loop.
    // The answers to their pulls reach `data_ready` on the fetcher's own task likewise.
    let (mut direct, mut answered) = (0.0, 0.0);
    for t in 0..3 {
        let (p, _) = nodes.primary_of(t).unwrap();
        let s = scrape(nodes.addr(p)).await.unwrap();
        direct += s.sum("taskgraph_inbound_messages_total", &[("kind", "direct")]);
        answered += s.sum("taskgraph_pull_answers_total", &[("kind", "direct")]);
    }
    assert!(direct > 0.0, "no message was served directly");
    assert!(answered > 0.0, "no answer was handed over directly");
    nodes.stop_all().await;
}

/// A slot holder's job watch follows the slot keys of its own task, its neighbours and task 0
/// only (scale: a node's watch events do not grow with the job): a task elsewhere in the job
/// losing its primary and getting a new one sends it nothing, while that task's parent sees
/// both changes. The epoch stays put (the gate is closed), so the counts are exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_holders_watch_follows_its_neighbours_and_not_the_whole_job() {
    let etcd = etcd().await;
    let mut config = ClusterConfig::new(etcd.endpoints(), &job_name("scoped"), 7, 1);
    config.ttl = Duration::from_secs(2);
    let mut nodes = Nodes::new(config);
    nodes.audit.close_gate();
    for _ in 0..8 {
        nodes
            .add_dataflow(1_000_000, Duration::from_millis(20))
            .await;
    }
    nodes
        .wait_until("every task has a primary", |s| fully_staffed(7, 0, s))
        .await;
    // Tree of 7 (fan-out 2): task 3's neighbours are {1}, task 2's {0, 5, 6}.
    let (observer, _) = nodes.primary_of(3).unwrap();
    let (parent, _) = nodes.primary_of(2).unwrap();
    let (victim, _) = nodes.primary_of(6).unwrap();
    let ranges = |s: &Scrape| s.sum("taskgraph_watched_key_ranges", &[]);
    let events = |s: &Scrape| s.sum("taskgraph_watch_events_total", &[]);
    // epoch, own record, draft, spec with task 0, then one range per other task: {1, 3} and
    // {2, 5, 6}.
    let before = wait_scrape(nodes.addr(observer), "the observer's narrow watch", |s| {
        ranges(s) == 6.0
    })
    .await
    .unwrap();
    let parent_before = wait_scrape(nodes.addr(parent), "the parent's narrow watch", |s| {
        ranges(s) == 7.0
    })
    .await
    .unwrap();

    info!("--- task 6's primary crashes; the spare takes the task over");
    nodes.crash(victim);
    nodes
        .wait_until("task 6 has a new primary", |s| {
            s.iter()
                .any(|(i, st)| *i != victim && st.primary_of(6).is_some())
        })
        .await;
    wait_scrape(
        nodes.addr(parent),
        "the parent saw task 6's key go and come",
        |s| events(s) >= events(&parent_before) + 2.0,
    )
    .await
    .unwrap();
    let after = scrape(nodes.addr(observer)).await.unwrap();
    assert_eq!(
        events(&after),
        events(&before),
        "the observer (task 3) was sent task 6's slot changes"
    );
    assert_eq!(ranges(&after), 6.0);
    nodes.stop_all().await;
}

/// Task 3 pulls from task 6 once `go` is set, outside the topology (a tree of 7: they are
/// not neighbours), and reports the answer; every task answers with its own id.
struct FarPull {
    task: TaskId,
    go: watch::Receiver<bool>,
    done: watch::Sender<Option<Vec<u8>>>,
    started: bool,
}

#[async_trait]
impl Task for FarPull {
    async fn enter_epoch(&mut self, ctx: &Context, _epoch: Epoch) {
        if self.task != 3 || self.started {
            return;
        }
        self.started = true;
        let (ctx2, done, mut go) = (ctx.clone(), self.done.clone(), self.go.clone());
        ctx.spawn(async move {
            if go.wait_for(|go| *go).await.is_err() {
                return;
            }
            if let Ok(answer) = ctx2.request_bytes(6, "id", Vec::new()).await {
                done.send_replace(Some(answer.to_vec()));
            }
        });
    }

    async fn serve_data(&mut self, _ctx: &Context, request: taskgraph::DataRequest) {
        request.reply(vec![self.task as u8]);
    }
}

/// A pull to a task outside the topology reaches it: the puller, which watches only its
/// neighbours' slot keys, adds the pulled task's on first contact (and the pulled node adds
/// the puller's, to check its term).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_outside_the_topology_is_answered_and_its_task_watched_from_then_on() {
    let etcd = etcd().await;
    let mut config = ClusterConfig::new(etcd.endpoints(), &job_name("far"), 7, 1);
    config.ttl = Duration::from_secs(5);
    let mut nodes = Nodes::new(config);
    let (done, mut answered) = watch::channel(None);
    let (go_tx, go) = watch::channel(false);
    for i in 0..7 {
        let (done, go) = (done.clone(), go.clone());
        let app = move |task| FarPull {
            task,
            go: go.clone(),
            done: done.clone(),
            started: false,
        };
        nodes.add(nodes.builder(i).task_builder(app)).await;
    }
    nodes
        .wait_until("every task has a primary", |s| fully_staffed(7, 0, s))
        .await;
    let ranges = |s: &Scrape| s.sum("taskgraph_watched_key_ranges", &[]);
    // Watch streams opened (a change of ranges that is not a growth opens a new one).
    let streams = |s: &Scrape| {
        s.sum(
            "taskgraph_etcd_requests_total",
            &[("op", "watch"), ("outcome", "ok")],
        )
    };
    // Both ends watch only their own task's, their neighbours' and task 0's slot keys first:
    // epoch, own record, draft, spec with task 0; {1, 3} and {2, 6}.
    // One stream each: opened as a spare, grown in place when drafted.
    for task in [3, 6] {
        let (node, _) = nodes.primary_of(task).unwrap();
        wait_scrape(nodes.addr(node), "a holder's narrow watch", |s| {
            ranges(s) == 6.0 && streams(s) == 1.0
        })
        .await
        .unwrap();
    }
    go_tx.send_replace(true);
    let answer = tokio::time::timeout(WAIT, answered.wait_for(Option::is_some))
        .await
        .expect("the pull is answered")
        .unwrap()
        .clone();
    assert_eq!(answer, Some(vec![6]));
    // Each end now also watches the other's task, on the stream it had: the task's range is
    // added at the end (for task 6, task 3 sorts among its own), and the watch grows in place.
    // (Its new range's snapshot came before the answer could; a reload would have counted
    // its new stream just after sending that snapshot, so this check can miss a reload that
    // was slow to count, but never fails one that did not happen. The engine's watch_test
    // checks the order of the ranges.)
    for (task, want) in [(3, 7.0), (6, 7.0)] {
        let (node, _) = nodes.primary_of(task).unwrap();
        let s = scrape(nodes.addr(node)).await.unwrap();
        assert_eq!(ranges(&s), want, "task {task}'s watch");
        assert_eq!(streams(&s), 1.0, "task {task}'s watch grew in place");
    }
    nodes.stop_all().await;
}

/// Task 0 pulls `blob` from task 1 `PULLS` times, one after the other, and reports how many
/// answers of the right size it got; task 1 answers each with the same `size` bytes.
struct BlobTask {
    task: TaskId,
    size: usize,
    done: watch::Sender<Option<usize>>,
    started: bool,
}

const BLOB: usize = 256 << 10;
const PULLS: usize = 8;

#[async_trait]
impl Task for BlobTask {
    async fn enter_epoch(&mut self, ctx: &Context, _epoch: Epoch) {
        if self.task != 0 || self.started {
            return;
        }
        self.started = true;
        let (ctx2, done, size) = (ctx.clone(), self.done.clone(), self.size);
        ctx.spawn(async move {
            let mut got = 0;
            for i in 0..PULLS {
                match ctx2.request_bytes(1, "blob", vec![i as u8]).await {
                    Ok(answer) if answer.len() == size => got += 1,
                    other => info!(?other, "pull {i}"),
                }
            }
            done.send_replace(Some(got));
        });
    }

    async fn serve_data(&mut self, _ctx: &Context, request: taskgraph::DataRequest) {
        request.reply(vec![7u8; self.size]);
    }
}

/// Runs `PULLS` pulls of `size` bytes from task 0 to task 1 and returns the serving node's
/// metrics once they are all answered.
async fn blob_pulls(etcd: &Etcd, name: &str, size: usize) -> Scrape {
    let mut config = ClusterConfig::new(etcd.endpoints(), &job_name(name), 2, 1);
    config.ttl = Duration::from_secs(5);
    let mut nodes = Nodes::new(config);
    let (done, mut finished) = watch::channel(None);
    for i in 0..2 {
        let done = done.clone();
        let app = move |task| BlobTask {
            task,
            size,
            done: done.clone(),
            started: false,
        };
        nodes.add(nodes.builder(i).task_builder(app)).await;
    }
    let got = tokio::time::timeout(WAIT, finished.wait_for(Option::is_some))
        .await
        .expect("the pulls end")
        .unwrap()
        .unwrap();
    assert_eq!(got, PULLS, "every pull got its answer");
    let (server, _) = nodes.primary_of(1).unwrap();
    let s = scrape(nodes.addr(server)).await.unwrap();
    nodes.stop_all().await;
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_served_answer_is_kept_only_until_its_requester_acknowledges_it() {
    let etcd = etcd().await;
    let s = blob_pulls(&etcd, "kept", BLOB).await;
    let t1 = task(1);
    assert_eq!(
        s.value("taskgraph_pulls_served_total", &[("task", t1.as_str())]),
        Some(PULLS as f64)
    );
    // Each pull acknowledged the one before it: only the last answer, which no later pull
    // acknowledged, is still kept for a retry (without acknowledgements: all of them).
    assert_eq!(
        s.sum("taskgraph_kept_answer_bytes", &[]),
        BLOB as f64,
        "{s:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_answer_is_acknowledged_as_soon_as_it_arrives() {
    let etcd = etcd().await;
    // From 1 MiB on, the requester acknowledges each answer before its task sees it: the
    // server keeps none, not even the last one's.
    let size = 2 << 20;
    let s = blob_pulls(&etcd, "acked", size).await;
    let t1 = task(1);
    assert_eq!(
        s.value("taskgraph_pulls_served_total", &[("task", t1.as_str())]),
        Some(PULLS as f64)
    );
    assert_eq!(s.sum("taskgraph_kept_answer_bytes", &[]), 0.0, "{s:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_backup_counts_the_failover_and_neighbours_count_the_incident() {
    let etcd = etcd().await;
    let mut nodes = three_tasks_two_replicas(&etcd, "failover").await;
    let (victim, old_term) = nodes.primary_of(1).unwrap();
    let backup = nodes.backup_of(1).unwrap();
    let (root, _) = nodes.primary_of(0).unwrap();
    let t1 = task(1);
    let task1 = [("task", t1.as_str())];
    // The root must have looked at its children in an epoch before the crash: a primary that
    // first sees a neighbour after its failover has no incident to report.
    let t0 = task(0);
    wait_scrape(nodes.addr(root), "the root is in its second epoch", |s| {
        s.value("taskgraph_epochs_entered_total", &[("task", t0.as_str())]) >= Some(2.0)
    })
    .await
    .unwrap();
    let before = scrape(nodes.addr(backup)).await.unwrap();
    assert_eq!(
        before.value(
            "taskgraph_role",
            &[("role", "backup"), ("task", t1.as_str())]
        ),
        Some(1.0),
        "{before:#?}"
    );
    assert_eq!(before.sum("taskgraph_failovers_total", &[]), 0.0);

    info!("--- crash the primary of task 1 (node {victim}); its backup (node {backup}) takes over");
    nodes.crash(victim);
    let st = nodes
        .wait_until("the backup is primary of task 1 with a higher term", |s| {
            s.iter()
                .any(|(i, s)| *i == backup && s.primary_of(1).is_some_and(|t| t > old_term))
        })
        .await;
    let new_term = st
        .iter()
        .find_map(|(i, s)| (*i == backup).then(|| s.primary_of(1)).flatten())
        .unwrap();
    let addr = nodes.addr(backup);
    let after = wait_scrape(addr, "the promoted backup publishes its new role", |s| {
        s.value(
            "taskgraph_role",
            &[("role", "primary"), ("task", t1.as_str())],
        ) == Some(1.0)
    })
    .await
    .unwrap();
    assert_eq!(after.value("taskgraph_failovers_total", &task1), Some(1.0));
    assert_eq!(after.value("taskgraph_term", &task1), Some(new_term as f64));
    assert_eq!(
        after
            .samples
            .iter()
            .filter(|s| s.name == "taskgraph_role")
            .count(),
        1
    );
    wait_http(addr, "/readyz", 200, "the new primary is ready")
        .await
        .unwrap();

    info!("--- no other node counted a failover");
    let mut total = 0.0;
    for (i, _) in nodes.live() {
        total += scrape(nodes.addr(i))
            .await
            .unwrap()
            .sum("taskgraph_failovers_total", &[]);
    }
    assert_eq!(total, 1.0, "one failover in the whole job");

    info!("--- the parent of task 1 counted its neighbour's failure and restart");
    let root_incidents = wait_scrape(nodes.addr(root), "the root saw the incident", |s| {
        s.value(
            "taskgraph_neighbour_events_total",
            &[("task", t0.as_str()), ("event", "restarted")],
        ) >= Some(1.0)
    })
    .await
    .unwrap();
    assert_eq!(
        root_incidents.value(
            "taskgraph_neighbour_events_total",
            &[("task", t0.as_str()), ("event", "failed")]
        ),
        root_incidents.value(
            "taskgraph_neighbour_events_total",
            &[("task", t0.as_str()), ("event", "restarted")]
        ),
        "each failure is followed by its restart"
    );
    nodes.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_readiness_of_a_starting_node_a_primary_a_spare_and_an_etcd_outage() {
    let etcd = etcd().await;
    info!("--- a node that cannot reach etcd is alive but not ready, and serves its metrics");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut lost = Nodes::new(ClusterConfig::new(
        vec![format!("http://{closed}")],
        &job_name("nowhere"),
        1,
        1,
    ));
    let builder = lost
        .builder(0)
        .etcd_connect_timeout(Duration::from_secs(120))
        .task_builder(lost.audit_app());
    let i = lost.add(builder).await;
    let addr = lost.addr(i);
    let live = http_get(addr, "/healthz").await.unwrap();
    assert_eq!(
        (live.status, live.body.as_str()),
        (200, "starting: connecting to etcd\n")
    );
    let ready = http_get(addr, "/readyz").await.unwrap();
    assert_eq!(
        (ready.status, ready.body.as_str()),
        (503, "starting: connecting to etcd\n")
    );
    let s = scrape(addr).await.unwrap();
    assert_eq!(s.sum("taskgraph_node_info", &[]), 1.0);
    info!("--- crashed, the node's HTTP port closes with it");
    lost.crash(i);
    wait_refused(addr).await.unwrap();

    info!("--- one task, one replica, two nodes: a primary and a spare in reserve, both ready");
    let mut nodes = Nodes::new(ClusterConfig::new(
        etcd.endpoints(),
        &job_name("ready"),
        1,
        1,
    ));
    nodes.add_audit().await;
    nodes.add_audit().await;
    nodes
        .wait_until("a primary and a spare", |s| {
            fully_staffed(1, 0, s) && s.iter().any(|(_, s)| s.role == Role::Spare && s.acting)
        })
        .await;
    let (primary, term) = nodes.primary_of(0).unwrap();
    let spare = 1 - primary;
    let ready = wait_http(nodes.addr(primary), "/readyz", 200, "the primary is ready")
        .await
        .unwrap();
    assert_eq!(
        ready.body,
        format!("primary of task 0 (term {term}) in epoch 0\n")
    );
    let ready = wait_http(nodes.addr(spare), "/readyz", 200, "the spare is ready")
        .await
        .unwrap();
    assert_eq!(
        ready.body,
        "spare: waiting for the staffer (task 0's primary) to give it a slot\n"
    );
    let s = scrape(nodes.addr(spare)).await.unwrap();
    assert_eq!(
        s.value("taskgraph_role", &[("role", "spare"), ("task", "")]),
        Some(1.0),
        "{s:#?}"
    );

    info!("--- etcd killed: leases lapse; the nodes stay alive but are not ready");
    etcd.kill().await.unwrap();
    nodes
        .wait_until("no node acts any more", |s| {
            s.iter().all(|(_, s)| !s.acting)
        })
        .await;
    for i in [primary, spare] {
        let addr = nodes.addr(i);
        let r = wait_http(addr, "/readyz", 503, "not ready without a lease")
            .await
            .unwrap();
        assert!(r.body.contains("lease"), "node {i}: {r:?}");
        let live = http_get(addr, "/healthz").await.unwrap();
        assert_eq!(
            live.status, 200,
            "node {i}: the loop still answers: {live:?}"
        );
        // The lease keeper counts its loss once its keep-alive has failed: maybe just after
        // the loop noticed the deadline.
        wait_scrape(
            addr,
            "the suspension and failed keep-alives are counted",
            |s| {
                let failed = s.sum(
                    "taskgraph_etcd_requests_total",
                    &[("op", "lease keep-alive"), ("outcome", "error")],
                ) + s.sum(
                    "taskgraph_etcd_requests_total",
                    &[("op", "lease keep-alive"), ("outcome", "timeout")],
                );
                s.value("taskgraph_acting", &[]) == Some(0.0)
                    && s.value("taskgraph_lease_losses_total", &[("reason", "suspended")])
                        >= Some(1.0)
                    && failed >= 1.0
            },
        )
        .await
        .unwrap();
    }

    info!("--- etcd back: the task has a ready primary again");
    etcd.restart().await.unwrap();
    nodes
        .wait_until("task 0 has an acting primary again", |s| {
            fully_staffed(1, 0, s)
        })
        .await;
    let (primary, _) = nodes.primary_of(0).unwrap();
    wait_http(
        nodes.addr(primary),
        "/readyz",
        200,
        "the primary is ready again",
    )
    .await
    .unwrap();
    nodes.stop_all().await;
}

/// A task whose first `enter_epoch` waits until the test releases it: it blocks its node's
/// event loop, as a buggy handler would.
struct Stuck {
    release: watch::Receiver<bool>,
}

#[async_trait]
impl Task for Stuck {
    async fn enter_epoch(&mut self, _ctx: &Context, _epoch: Epoch) {
        let _ = self.release.wait_for(|r| *r).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_event_loop_fails_healthz_until_it_is_released() {
    let etcd = etcd().await;
    let mut nodes = Nodes::new(ClusterConfig::new(
        etcd.endpoints(),
        &job_name("stuck"),
        1,
        1,
    ));
    let (release, rx) = watch::channel(false);
    let builder = nodes
        .builder(0)
        .task_builder(move |_t: TaskId| -> Box<dyn Task> {
            Box::new(Stuck {
                release: rx.clone(),
            })
        });
    let i = nodes.add(builder).await;
    let addr = nodes.addr(i);
    info!("--- the handler blocks the loop: liveness fails after the stall limit");
    let r = wait_http(addr, "/healthz", 503, "the stalled loop is reported")
        .await
        .unwrap();
    assert!(r.body.contains("busy"), "{r:?}");
    let ready = http_get(addr, "/readyz").await.unwrap();
    assert_eq!(ready.status, 503, "{ready:?}");
    info!("--- released, the loop answers again and the primary is ready");
    release.send_replace(true);
    wait_http(addr, "/healthz", 200, "the loop is live again")
        .await
        .unwrap();
    wait_http(addr, "/readyz", 200, "the primary is ready")
        .await
        .unwrap();
    nodes.stop_all().await;
}

/// Log lines collected in memory.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A task that logs from its handler and from work it spawns.
struct Chatty {
    logged: watch::Sender<bool>,
}

#[async_trait]
impl Task for Chatty {
    async fn enter_epoch(&mut self, ctx: &Context, _epoch: Epoch) {
        tracing::info!("hello from the handler");
        let logged = self.logged.clone();
        ctx.spawn(async move {
            tracing::info!("hello from spawned work");
            logged.send_replace(true);
        });
    }
}

/// Single-threaded, so that the subscriber set for this thread sees every line of the node.
#[tokio::test(flavor = "current_thread")]
async fn log_lines_carry_job_node_task_term_and_epoch() {
    let etcd = Etcd::start().await.expect("start etcd");
    let lines = Lines::default();
    let writer = lines.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "warn,taskgraph=debug,metrics=info",
        ))
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let job = job_name("logs");
    let mut nodes = Nodes::new(ClusterConfig::new(etcd.endpoints(), &job, 1, 1));
    let (logged, mut logged_rx) = watch::channel(false);
    let builder = nodes
        .builder(0)
        .task_builder(move |_t: TaskId| -> Box<dyn Task> {
            Box::new(Chatty {
                logged: logged.clone(),
            })
        });
    let i = nodes.add(builder).await;
    tokio::time::timeout(WAIT, logged_rx.wait_for(|l| *l))
        .await
        .expect("the task logged from its spawned work")
        .unwrap();
    let (_, term) = nodes.primary_of(0).unwrap();
    let node = nodes.id(i);
    nodes.stop_all().await;

    let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let spans_of = |message: &str| -> Vec<serde_json::Value> {
        let r = records
            .iter()
            .find(|r| r["fields"]["message"] == message)
            .unwrap_or_else(|| panic!("no line {message:?} in:\n{text}"));
        r["spans"].as_array().cloned().unwrap_or_default()
    };
    let field = |span: &serde_json::Value, f: &str| match &span[f] {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    for message in [
        "hello from the handler",
        "hello from spawned work",
        "entering epoch",
    ] {
        let spans = spans_of(message);
        let names: Vec<String> = spans.iter().map(|s| field(s, "name")).collect();
        assert_eq!(names, ["node", "slot", "epoch"], "{message:?}: {spans:?}");
        assert_eq!(field(&spans[0], "job"), job, "{message:?}");
        assert_eq!(field(&spans[0], "node"), node, "{message:?}");
        assert_eq!(field(&spans[1], "task"), "0", "{message:?}");
        assert_eq!(field(&spans[1], "role"), "primary", "{message:?}");
        assert_eq!(field(&spans[1], "term"), term.to_string(), "{message:?}");
        assert_eq!(field(&spans[2], "epoch"), "0", "{message:?}");
    }
}

#[test]
fn a_metrics_address_on_the_grpc_port_is_refused() {
    let addr = SocketAddr::from(([127, 0, 0, 1], 7777));
    let err = Framework::builder()
        .etcd(["http://127.0.0.1:1"])
        .job("j")
        .tasks(1)
        .listen(addr)
        .metrics_addr(addr)
        .task_builder(|_t: TaskId| -> Box<dyn Task> {
            Box::new(Chatty {
                logged: watch::channel(false).0,
            })
        })
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("metrics address"), "{err}");
    // Port 0 means any free port for both: no clash.
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    assert!(Framework::builder()
        .etcd(["http://127.0.0.1:1"])
        .job("j")
        .tasks(1)
        .listen(any)
        .metrics_addr(any)
        .task_builder(|_t: TaskId| -> Box<dyn Task> {
            Box::new(Chatty {
                logged: watch::channel(false).0,
            })
        })
        .build()
        .is_ok());
}

/// What [`HoldTask`]s share with the test; the numbers are rounds, from 1.
#[derive(Default)]
struct HoldProbe {
    /// Set by the test: task 0 may start this round (its `stash` and `hold` pulls).
    start: watch::Sender<u32>,
    /// Set by the test: task 0 may send this round's `echo`.
    echo: watch::Sender<u32>,
    /// Set by the test: task 1's `hold` handler of this round may go on.
    release: watch::Sender<u32>,
    /// Task 1: the `stash` pull, kept unanswered.
    stash: Mutex<Option<taskgraph::DataRequest>>,
    /// Task 1 keeps this round's `stash`.
    stashed: watch::Sender<u32>,
    /// Task 1's handler of this round's `hold` runs (and holds its node's state).
    holding: watch::Sender<u32>,
    /// Task 0: each round's answers to `stash`, `hold` and `echo`.
    answers: watch::Sender<Vec<RoundAnswers>>,
}

/// A round's answers (or errors) to `stash`, `hold` and `echo`.
type RoundAnswers = Vec<Result<Vec<u8>, String>>;

/// Each round, task 0 pulls `stash` from task 1, then `hold` once task 1 keeps the stash,
/// then `echo` when the test says; every pull carries its method and round. Task 1 keeps
/// `stash` unanswered; its `hold` handler waits for the test's `release`, then answers the
/// kept `stash` from work of its own (outside a handler: the answer is a request queued for
/// the event loop) before answering `hold`. Every answer is the pull's input.
struct HoldTask {
    task: TaskId,
    probe: Arc<HoldProbe>,
    started: bool,
}

#[async_trait]
impl Task for HoldTask {
    async fn enter_epoch(&mut self, ctx: &Context, _epoch: Epoch) {
        if self.task != 0 || self.started {
            return;
        }
        self.started = true;
        let (ctx2, probe) = (ctx.clone(), self.probe.clone());
        ctx.spawn(async move {
            let pull = |method: &'static str, round: u32| {
                let ctx = ctx2.clone();
                async move {
                    ctx.request_bytes(1, method, format!("{method} {round}").into_bytes())
                        .await
                        .map(|b| b.to_vec())
                        .map_err(|e| format!("{method}: {e}"))
                }
            };
            let mut start = probe.start.subscribe();
            let mut stashed = probe.stashed.subscribe();
            let mut echo = probe.echo.subscribe();
            for round in 1.. {
                if start.wait_for(|s| *s >= round).await.is_err() {
                    return;
                }
                let (stash, (hold, echo)) = futures::join!(pull("stash", round), async {
                    let _ = stashed.wait_for(|s| *s >= round).await;
                    futures::join!(pull("hold", round), async {
                        let _ = echo.wait_for(|e| *e >= round).await;
                        pull("echo", round).await
                    })
                });
                probe
                    .answers
                    .send_modify(|a| a.push(vec![stash, hold, echo]));
            }
        });
    }

    async fn serve_data(&mut self, ctx: &Context, request: taskgraph::DataRequest) {
        let round: u32 = String::from_utf8_lossy(request.input())
            .rsplit(' ')
            .next()
            .and_then(|r| r.parse().ok())
            .unwrap_or(0);
        match request.method() {
            "stash" => {
                *self.probe.stash.lock().unwrap() = Some(request);
                self.probe.stashed.send_replace(round);
            }
            "hold" => {
                self.probe.holding.send_replace(round);
                let mut release = self.probe.release.subscribe();
                let _ = release.wait_for(|r| *r >= round).await;
                let stash = self.probe.stash.lock().unwrap().take();
                let (answered, done) = tokio::sync::oneshot::channel();
                ctx.spawn(async move {
                    if let Some(stash) = stash {
                        let input = stash.input().clone();
                        stash.reply(input);
                    }
                    let _ = answered.send(());
                });
                let _ = done.await;
                let input = request.input().clone();
                request.reply(input);
            }
            _ => {
                let input = request.input().clone();
                request.reply(input);
            }
        }
    }
}

/// A message that arrives while another handler holds the node's state waits for it on its
/// own task; when it gets it, something the event loop must take first may have come
/// meanwhile (here the answer to a kept pull, given from outside a handler): the message then
/// goes to the loop, after that, instead of being handled where it waited.
///
/// A round shows this only when the loop was idle as the echo came. If anything woke the loop
/// while the `hold` handler held the node (the watch's first read of the slot's ranges, a
/// lease renewal), the echo goes to the loop at once, without a wait; if the loop was itself
/// waiting for the node (it had just handled something), it takes the queued answer first
/// and the echo, after its wait, is rightly handled where it waited. Such rounds still check
/// the answers, and another round is run: the test needs one round where the echo waited and
/// then went to the loop (none does when the check after the wait is left out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_waited_for_a_held_node_goes_to_the_loop_when_the_loop_must_come_first() {
    const ROUNDS: u32 = 10;
    let etcd = etcd().await;
    let mut config = ClusterConfig::new(etcd.endpoints(), &job_name("waited"), 2, 1);
    // A lease renewal (every TTL / 3) while the node is held makes a round inconclusive.
    config.ttl = Duration::from_secs(30);
    let mut nodes = Nodes::new(config);
    let probe = Arc::new(HoldProbe::default());
    for i in 0..2 {
        let probe = probe.clone();
        let app = move |task| HoldTask {
            task,
            probe: probe.clone(),
            started: false,
        };
        nodes.add(nodes.builder(i).task_builder(app)).await;
    }
    let waits = |s: &Scrape| s.sum("taskgraph_runtime_waits_total", &[("kind", "message")]);
    let by_loop = |s: &Scrape| s.sum("taskgraph_inbound_messages_total", &[("kind", "loop")]);
    let (mut holding, mut answers) = (probe.holding.subscribe(), probe.answers.subscribe());
    let mut waited_in = None;
    for round in 1..=ROUNDS {
        probe.start.send_replace(round);
        tokio::time::timeout(WAIT, holding.wait_for(|h| *h >= round))
            .await
            .expect("task 1 holds its node")
            .unwrap();
        // Task 1 has a primary: its pulls are being answered.
        let (server, _) = nodes.primary_of(1).unwrap();
        let before = scrape(nodes.addr(server)).await.unwrap();
        probe.echo.send_replace(round);
        let arrived = wait_scrape(
            nodes.addr(server),
            "the echo waits or goes to the loop",
            |s| waits(s) > waits(&before) || by_loop(s) > by_loop(&before),
        )
        .await
        .unwrap();
        let waited = waits(&arrived) > waits(&before);
        probe.release.send_replace(round);
        let got = tokio::time::timeout(WAIT, answers.wait_for(|a| a.len() >= round as usize))
            .await
            .expect("the round's pulls are answered")
            .unwrap()[round as usize - 1]
            .clone();
        let want = |m: &str| Ok(format!("{m} {round}").into_bytes());
        assert_eq!(got, vec![want("stash"), want("hold"), want("echo")]);
        let after = scrape(nodes.addr(server)).await.unwrap();
        let to_loop = by_loop(&after) - by_loop(&before);
        assert!(
            to_loop <= 1.0,
            "round {round}: only the echo may have gone to the loop: {after:#?}"
        );
        if waited && to_loop == 1.0 {
            waited_in = Some(round);
            break;
        }
        info!(
            waited,
            to_loop, "--- round {round} shows nothing (see above); again"
        );
    }
    assert!(
        waited_in.is_some(),
        "in none of {ROUNDS} rounds did the echo wait for the held node and then go to the loop"
    );
    nodes.stop_all().await;
}
