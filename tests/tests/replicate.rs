//! `Context::replicate` while the primary's lease is unconfirmed: it never asks the caller to
//! try again. Called from a handler and from spawned work while etcd is paused (SIGSTOP) past
//! the primary's local deadline, it waits, and once etcd is back it returns `Ok` with the
//! backup holding each update exactly once. Called while the primary is cut off from etcd for
//! longer than the lease (through a forwarder the test cuts), it ships nothing and ends with
//! `NotPrimary` once the node learns its lease is gone; the promoted backup never saw it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use taskgraph::{
    Context, ContextError, Epoch, Framework, Links, NodeHandle, NodeStatus, Role, Task, TaskId,
    WorkDone,
};
use taskgraph_tests::etcd::Etcd;
use taskgraph_tests::proxy::Proxy;
use taskgraph_tests::{http_get, init_logs, job_name};
use tokio::sync::watch;
use tracing::info;

const WAIT: Duration = Duration::from_secs(30);

/// What the nodes' tasks did, for the test to wait on and assert about.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Seen {
    /// `(node, what)` for each replicate call that started: `"handler"` or `"spawned"`.
    started: Vec<(String, &'static str)>,
    /// `(node, what, outcome)` for each replicate call that returned.
    returned: Vec<(String, &'static str, Result<(), String>)>,
    /// `(node, update)` for each `apply_update`.
    applied: Vec<(String, Bytes)>,
    /// Nodes whose backup got the primary's snapshot.
    synced: Vec<String>,
    /// The primary's `work_done` handler was called (it then waits for `go`).
    handler_called: bool,
}

#[derive(Clone)]
struct Shared {
    seen: watch::Sender<Seen>,
    /// Set by the test: the primary's `work_done` handler is called.
    arm: watch::Receiver<bool>,
    /// Set by the test: the primary replicates.
    go: watch::Receiver<bool>,
}

impl Shared {
    /// The shared record, with the test's `arm` and `go` switches (both off).
    fn new() -> (Shared, watch::Sender<bool>, watch::Sender<bool>) {
        let (arm, arm_rx) = watch::channel(false);
        let (go, go_rx) = watch::channel(false);
        let shared = Shared {
            seen: watch::channel(Seen::default()).0,
            arm: arm_rx,
            go: go_rx,
        };
        (shared, arm, go)
    }

    fn record(&self, f: impl FnOnce(&mut Seen)) {
        self.seen.send_modify(f);
    }
}

/// The outcome recorded for spawned work aborted with its slot.
const ABORTED: &str = "aborted with the slot";

/// Records how a spawned replicate call ended when dropped: returned, or aborted.
struct Ended {
    shared: Shared,
    node: String,
    outcome: Result<(), String>,
}

impl Drop for Ended {
    fn drop(&mut self) {
        let (node, outcome) = (std::mem::take(&mut self.node), self.outcome.clone());
        self.shared
            .record(|s| s.returned.push((node, "spawned", outcome)));
    }
}

struct Replicating {
    node: String,
    shared: Shared,
}

fn outcome(r: Result<(), ContextError>) -> Result<(), String> {
    r.map_err(|e| match e {
        ContextError::NotPrimary { .. } => "NotPrimary".to_owned(),
        other => other.to_string(),
    })
}

#[async_trait]
impl Task for Replicating {
    async fn enter_epoch(&mut self, ctx: &Context, epoch: Epoch) {
        // Only the first primary replicates: the backup promoted in its place must not.
        if epoch != 0 || !ctx.is_primary() || self.node != "p" {
            return;
        }
        // One replicate from a handler (`work_done`, on the event loop) and one from spawned
        // work. The handler is called once the test arms it (with the backup in step and the
        // lease valid: a deferred handler is not called while the lease is unconfirmed), then
        // holds the loop until the test says go.
        let mut arm = self.shared.arm.clone();
        let _ = ctx.spawn_then(async move {
            let _ = arm.wait_for(|a| *a).await;
        });
        let (c, shared, node) = (ctx.clone(), self.shared.clone(), self.node.clone());
        let mut go = self.shared.go.clone();
        ctx.spawn(async move {
            let _ = go.wait_for(|g| *g).await;
            shared.record(|s| s.started.push((node.clone(), "spawned")));
            // Spawned work ends with its slot: if the slot is dropped first, the call is
            // recorded as aborted.
            let mut ended = Ended {
                shared,
                node,
                outcome: Err(ABORTED.to_owned()),
            };
            ended.outcome = outcome(c.replicate(Bytes::from_static(b"spawned")).await);
        });
    }

    async fn work_done(&mut self, ctx: &Context, _done: WorkDone) {
        let node = self.node.clone();
        self.shared.record(|s| s.handler_called = true);
        let mut go = self.shared.go.clone();
        let _ = go.wait_for(|g| *g).await;
        self.shared
            .record(|s| s.started.push((node.clone(), "handler")));
        let r = outcome(ctx.replicate(Bytes::from_static(b"handler")).await);
        self.shared
            .record(|s| s.returned.push((node, "handler", r)));
    }

    async fn apply_update(&mut self, _ctx: &Context, update: Bytes) {
        let node = self.node.clone();
        self.shared.record(|s| s.applied.push((node, update)));
    }

    async fn apply_snapshot(&mut self, _ctx: &Context, _snapshot: Bytes) {
        let node = self.node.clone();
        self.shared.record(|s| s.synced.push(node));
    }
}

/// A one-task job with a primary and a backup, a `ttl` lease, the nodes' etcd endpoints given.
async fn node(
    job: &str,
    name: &str,
    etcd: Vec<String>,
    ttl: Duration,
    shared: &Shared,
) -> NodeHandle {
    let (shared, node) = (shared.clone(), name.to_owned());
    Framework::builder()
        .etcd(etcd)
        .job(job.to_owned())
        .tasks(1)
        .replicas(2)
        .links(Links::new())
        .lease_ttl(ttl)
        .node_name(name.to_owned())
        .metrics_addr(SocketAddr::from(([127, 0, 0, 1], 0)))
        .task_builder(move |_t: TaskId| -> Box<dyn Task> {
            Box::new(Replicating {
                node: node.clone(),
                shared: shared.clone(),
            })
        })
        .build()
        .unwrap()
        .spawn()
        .await
        .unwrap()
}

async fn wait_status(node: &NodeHandle, why: &str, f: impl Fn(&NodeStatus) -> bool) {
    let mut rx = node.status();
    tokio::time::timeout(WAIT, rx.wait_for(|s| f(s)))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting: {why}"))
        .unwrap();
}

async fn wait_seen(shared: &Shared, why: &str, f: impl Fn(&Seen) -> bool) -> Seen {
    let mut rx = shared.seen.subscribe();
    let seen = tokio::time::timeout(WAIT, rx.wait_for(|s| f(s)))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting: {why}; seen {:?}", *shared.seen.borrow()))
        .unwrap()
        .clone();
    seen
}

fn is_primary(s: &NodeStatus) -> bool {
    matches!(s.role, Role::Primary { .. }) && s.acting
}

/// Starts the primary (`p`, through `p_etcd`) and, once it leads, the backup (`b`); returns
/// when the backup holds the primary's snapshot.
async fn primary_and_backup(
    job: &str,
    p_etcd: Vec<String>,
    b_etcd: Vec<String>,
    ttl: Duration,
    shared: &Shared,
) -> (NodeHandle, NodeHandle) {
    let p = node(job, "p", p_etcd, ttl, shared).await;
    wait_status(&p, "p is the primary", is_primary).await;
    let b = node(job, "b", b_etcd, ttl, shared).await;
    wait_seen(shared, "the backup is in step", |s| {
        s.synced.contains(&"b".to_owned())
    })
    .await;
    (p, b)
}

/// Has the primary's `work_done` handler called: it holds the event loop until `go`.
async fn arm_handler(arm: &watch::Sender<bool>, shared: &Shared) {
    arm.send_replace(true);
    wait_seen(shared, "the primary's handler is called", |s| {
        s.handler_called
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicate_while_etcd_is_paused_waits_for_the_renewal_and_each_update_is_applied_once() {
    init_logs();
    let etcd = Etcd::start().await.unwrap();
    // A 10 s lease: local deadline 8 s after a keep-alive's send, etcd's expiry 2 s later. The
    // test resumes etcd inside that window, so the lease survives the pause.
    let ttl = Duration::from_secs(10);
    let (shared, arm, go) = Shared::new();
    let job = job_name("replicate-paused");
    let (p, b) = primary_and_backup(&job, etcd.endpoints(), etcd.endpoints(), ttl, &shared).await;

    arm_handler(&arm, &shared).await;

    info!("--- etcd paused until the primary steps down at its local deadline");
    etcd.signal("STOP");
    wait_status(&p, "the primary stops acting", |s| !s.acting).await;
    info!("--- the primary replicates from a handler and from spawned work, unconfirmed");
    go.send_replace(true);
    let during = wait_seen(&shared, "both replicate calls started", |s| {
        s.started.len() == 2
    })
    .await;
    // The handler holds the event loop while it waits: liveness says so instead of failing.
    // The handler records that it started just before it calls `replicate`, so poll /healthz
    // until the wait shows (within a second: etcd must resume before the lease's expiry, 2 s
    // after the local deadline); every answer meanwhile must be healthy.
    let addr = p.metrics_addr().expect("the primary serves /healthz");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    loop {
        let health = http_get(&format!("http://{addr}/healthz")).await;
        assert!(
            health.starts_with("HTTP/1.1 200") || health.starts_with("HTTP/1.0 200"),
            "a handler waiting for the lease is not a stalled loop: {health}"
        );
        if health.contains("waiting for etcd") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/healthz never said the handler waits for etcd: {health}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    etcd.signal("CONT");
    assert!(
        during.applied.is_empty(),
        "nothing is shipped while the lease is unconfirmed: {during:?}"
    );

    info!("--- etcd back: the lease is renewed and both calls return Ok");
    let after = wait_seen(&shared, "both replicate calls returned", |s| {
        s.returned.len() == 2
    })
    .await;
    for (node, what, r) in &after.returned {
        assert_eq!(node, "p");
        assert_eq!(r, &Ok(()), "replicate from {what} waits out the pause");
    }
    let mut applied = after.applied.clone();
    applied.sort();
    assert_eq!(
        applied,
        vec![
            ("b".to_owned(), Bytes::from_static(b"handler")),
            ("b".to_owned(), Bytes::from_static(b"spawned")),
        ],
        "the backup applied each update exactly once"
    );
    let term = |n: &NodeHandle| match n.status().borrow().role {
        Role::Primary { term, .. } => Some(term),
        _ => None,
    };
    let before = term(&p);
    wait_status(&p, "the primary acts again, in its slot", is_primary).await;
    assert_eq!(term(&p), before, "the primary kept its slot and term");
    p.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicate_from_a_primary_cut_off_from_etcd_ends_not_primary_and_ships_nothing() {
    init_logs();
    let etcd = Etcd::start().await.unwrap();
    let proxy = Proxy::start("127.0.0.1:0".parse().unwrap(), etcd.socket_addr())
        .await
        .unwrap();
    let ttl = Duration::from_secs(1);
    let (shared, arm, go) = Shared::new();
    let job = job_name("replicate-cut");
    let through_proxy = vec![format!("http://{}", proxy.addr())];
    let (p, b) = primary_and_backup(&job, through_proxy, etcd.endpoints(), ttl, &shared).await;

    arm_handler(&arm, &shared).await;

    info!("--- the primary is cut off from etcd; it steps down and replicates, unconfirmed");
    proxy.cut();
    wait_status(&p, "the cut-off primary stops acting", |s| !s.acting).await;
    go.send_replace(true);
    wait_seen(&shared, "both replicate calls started", |s| {
        s.started.len() == 2
    })
    .await;
    info!("--- the lease expires in etcd: the backup takes over");
    wait_status(&b, "the backup is promoted", is_primary).await;
    assert!(
        shared.seen.borrow().returned.is_empty(),
        "replicate does not return while the lease is undecided: {:?}",
        *shared.seen.borrow()
    );

    info!("--- healed: the old primary learns its lease is gone; replicate ends NotPrimary");
    proxy.heal();
    let after = wait_seen(&shared, "both replicate calls returned", |s| {
        s.returned.len() == 2
    })
    .await;
    for (node, what, r) in &after.returned {
        assert_eq!(node, "p");
        // Spawned work may instead be aborted with the slot, as the loop drops it.
        let lost = r == &Err("NotPrimary".to_owned())
            || (*what == "spawned" && r == &Err(ABORTED.to_owned()));
        assert!(lost, "replicate from {what} ends with the slot lost: {r:?}");
    }
    assert!(
        after.applied.is_empty(),
        "the promoted backup never saw an update of the deposed primary: {after:?}"
    );
    p.stop().await.unwrap();
    b.stop().await.unwrap();
}
