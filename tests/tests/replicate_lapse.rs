//! `Context::replicate` is decided wherever it is called: while the primary's lease is
//! unconfirmed (etcd paused past the primary's local deadline, shorter than the TTL) it
//! returns `Ok` without shipping, and at the renewal the backup gets a snapshot of the
//! primary's state. No call asks for a retry, and the backup applies each update exactly once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};

use std::time::Duration;
use tokio::sync::watch::Sender;

use taskgraph::{async_trait, Bytes, Context, Framework, NodeHandle, Task, Term};
use taskgraph_tests::etcd::Etcd;
use taskgraph_tests::{init_logs, job_name};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::info;

/// Bound on every wait (never reached unless the test fails).
const WAIT: Duration = Duration::from_secs(30);

/// What the test sees of the task values on both nodes.
#[derive(Debug, Default)]
struct Seen {
    /// The primary's state: the sum of the updates it made.
    primary_sum: u64,
    /// Every update a backup applied, in order.
    applied: Vec<u64>,
    /// Every snapshot a backup applied.
    snapshots: Vec<u64>,
    /// The backup's state.
    backup_sum: u64,
}

type Orders = mpsc::UnboundedReceiver<(u64, oneshot::Sender<String>)>;

struct Counter {
    seen: Arc<Sender<Seen>>,
    sum: u64,
    /// The test's orders to replicate an update, taken by the first primary.
    orders: Arc<Mutex<Option<Orders>>>,
}

#[async_trait]
impl Task for Counter {
    async fn became_primary(&mut self, ctx: &Context, _term: Term) {
        let Some(mut orders) = self.orders.lock().unwrap().take() else {
            return;
        };
        let (ctx, seen) = (ctx.clone(), self.seen.clone());
        ctx.clone().spawn(async move {
            while let Some((update, answer)) = orders.recv().await {
                seen.send_modify(|s| s.primary_sum += update);
                let outcome = ctx.replicate(update.to_le_bytes().to_vec()).await;
                let _ = answer.send(format!("{outcome:?}"));
            }
        });
    }
    fn snapshot(&self, _ctx: &Context) -> Bytes {
        Bytes::from(self.seen.borrow().primary_sum.to_le_bytes().to_vec())
    }
    async fn apply_snapshot(&mut self, _ctx: &Context, snapshot: Bytes) {
        let sum = u64::from_le_bytes(snapshot[..8].try_into().unwrap());
        self.sum = sum;
        self.seen.send_modify(|s| {
            s.snapshots.push(sum);
            s.backup_sum = sum;
        });
    }
    async fn apply_update(&mut self, _ctx: &Context, update: Bytes) {
        let update = u64::from_le_bytes(update[..8].try_into().unwrap());
        self.sum += update;
        let sum = self.sum;
        self.seen.send_modify(|s| {
            s.applied.push(update);
            s.backup_sum = sum;
        });
    }
}

fn signal(etcd: &Etcd, sig: &str) {
    let pid = etcd.pid().expect("etcd runs");
    let status = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{sig} {pid}");
}

async fn until(
    status: &mut watch::Receiver<taskgraph::NodeStatus>,
    why: &str,
    f: impl Fn(&taskgraph::NodeStatus) -> bool,
) {
    tokio::time::timeout(WAIT, status.wait_for(|s| f(s)))
        .await
        .unwrap_or_else(|_| panic!("timed out: {why}"))
        .unwrap_or_else(|_| panic!("node gone: {why}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicate_with_the_lease_unconfirmed_is_decided_and_each_update_applied_once() {
    init_logs();
    let etcd = Etcd::start().await.unwrap();
    let job = job_name("replicate-lapse");
    let seen = Arc::new(Sender::new(Seen::default()));
    let (order_tx, order_rx) = mpsc::unbounded_channel();
    let orders = Arc::new(Mutex::new(Some(order_rx)));
    let start = || {
        let (seen, orders) = (seen.clone(), orders.clone());
        Framework::builder()
            .etcd([etcd.endpoint()])
            .job(&job)
            .tasks(1)
            .replicas(2)
            .lease_ttl(Duration::from_secs(2))
            .task_builder(move |_| Counter {
                seen: seen.clone(),
                sum: 0,
                orders: orders.clone(),
            })
            .build()
            .unwrap()
            .spawn()
    };
    let first: NodeHandle = start().await.unwrap();
    let mut primary = first.status();
    until(&mut primary, "the first node is primary", |s| {
        s.primary_of(0).is_some()
    })
    .await;
    let second: NodeHandle = start().await.unwrap();
    let mut backup = second.status();
    until(&mut backup, "the second node is backup", |s| {
        matches!(s.role, taskgraph::Role::Backup { .. })
    })
    .await;
    let replicate = |update: u64| {
        let (tx, rx) = oneshot::channel();
        order_tx.send((update, tx)).unwrap();
        async move { tokio::time::timeout(WAIT, rx).await.unwrap().unwrap() }
    };
    // In step: the backup got a snapshot when it joined, and every update since.
    let wait_in_step = |why: &'static str| {
        let mut rx = seen.subscribe();
        async move {
            tokio::time::timeout(
                WAIT,
                rx.wait_for(|s| !s.snapshots.is_empty() && s.backup_sum == s.primary_sum),
            )
            .await
            .unwrap_or_else(|_| panic!("timed out: {why}"))
            .map(|_| ())
            .unwrap_or_else(|_| panic!("gone: {why}"));
        }
    };
    wait_in_step("the backup joined").await;
    for update in [1, 2, 3] {
        assert_eq!(replicate(update).await, "Ok(())");
    }

    info!("--- etcd paused until the primary is past its lease's local deadline");
    signal(&etcd, "STOP");
    until(&mut primary, "the primary stops acting", |s| {
        matches!(s.role, taskgraph::Role::Primary { .. }) && !s.acting
    })
    .await;
    // Decided at once, without a retry to ask for.
    for update in [4, 5] {
        assert_eq!(replicate(update).await, "Ok(())", "update {update}");
    }
    let snapshots_before = seen.borrow().snapshots.len();
    signal(&etcd, "CONT");
    until(&mut primary, "the primary acts again", |s| {
        s.primary_of(0).is_some()
    })
    .await;
    assert_eq!(replicate(6).await, "Ok(())");
    wait_in_step("the backup caught up").await;

    let s = seen.borrow();
    info!(?s, "seen");
    assert_eq!(s.primary_sum, 21);
    assert_eq!(s.backup_sum, 21, "{s:?}");
    // Each update at most once; the ones missed while the lease was unconfirmed came in a
    // snapshot taken at the renewal.
    let mut applied = s.applied.clone();
    applied.sort_unstable();
    applied.dedup();
    assert_eq!(
        applied.len(),
        s.applied.len(),
        "an update applied twice: {s:?}"
    );
    assert!(!s.applied.contains(&4) && !s.applied.contains(&5), "{s:?}");
    assert!(
        s.snapshots.len() > snapshots_before,
        "no snapshot after the renewal: {s:?}"
    );
    drop(s);
    let _ = second.stop().await;
    let _ = first.stop().await;
}
