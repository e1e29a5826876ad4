//! SIGTERM on a `regression node` process, as Kubernetes sends it when it deletes a pod: the
//! node stops cleanly and revokes its lease, so its backup becomes primary at once instead of
//! after the lease's TTL, the process exits 0, and the job still finishes with the exact sum.
//!
//! The lease TTL is 10 s, so the lease expiring cannot explain a quick takeover. The test checks
//! the revocation itself rather than timing: the node reports a clean stop (`exit=Stopped`) with
//! no failed revocation, it exits 0, and its lease is gone from etcd as soon as it has exited.
//! (On one machine a SIGKILLed node is also replaced quickly, because its peers find its port
//! refusing connections and end its lease for it; a deleted Kubernetes pod's address usually
//! just goes silent, so there the node's own revocation on SIGTERM is what makes the handover
//! immediate.) It prints how long the takeover took, without asserting on it; see the figure
//! with `cargo nextest run -p taskgraph-examples --test sigterm --no-capture`.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use taskgraph::{ChangeEvent, JobChange, JobChanges, JobClient, JobStatus, TaskStatus};
use taskgraph_tests::etcd::Etcd;
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

const JOB: &str = "sigterm";
const TASKS: u32 = 3;
const REPLICAS: u32 = 2;
const EPOCHS: u64 = 100;
/// Long enough that a takeover within it can only come from the revoked lease.
const LEASE_TTL: &str = "10s";
/// How long any one step may take before the test gives up (a failure, never a success).
const STEP_TIMEOUT: Duration = Duration::from_secs(90);

/// One `regression node` process; killed if the test ends early.
struct NodeProcess {
    name: String,
    child: Child,
    log: PathBuf,
}

impl NodeProcess {
    fn spawn(dir: &Path, etcd: &str, name: &str) -> NodeProcess {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap_or_else(|e| panic!("{name}: {e}"));
        let child = Command::new(env!("CARGO_BIN_EXE_regression"))
            .args(["node", "--etcd", etcd, "--job", JOB, "--workload", "sum"])
            .args(["--tasks", &TASKS.to_string()])
            .args(["--replicas", &REPLICAS.to_string()])
            .args(["--epochs", &EPOCHS.to_string()])
            .args(["--compute-ms", "30", "--lease-ttl", LEASE_TTL])
            .args(["--node-name", name, "--log-format", "json"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        NodeProcess {
            name: name.to_owned(),
            child,
            log,
        }
    }

    /// Whether `node_id` (the name plus a random suffix) is this process's node.
    fn is(&self, node_id: &str) -> bool {
        node_id
            .strip_prefix(&self.name)
            .is_some_and(|rest| rest.starts_with('-'))
    }

    fn sigterm(&self) {
        let pid = self
            .child
            .id()
            .unwrap_or_else(|| panic!("{} has already exited", self.name));
        // The `kill` command keeps the workspace free of `unsafe`.
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap_or_else(|e| panic!("cannot run kill: {e}"));
        assert!(status.success(), "kill -TERM {pid} failed: {status}");
    }

    async fn exit(&mut self) -> ExitStatus {
        match tokio::time::timeout(STEP_TIMEOUT, self.child.wait()).await {
            Ok(Ok(status)) => status,
            Ok(Err(e)) => panic!("{}: {e}", self.name),
            Err(_) => panic!("{} did not exit: {}", self.name, self.log_tail()),
        }
    }

    /// The node's log lines, parsed (lines that are not JSON are skipped).
    fn log_lines(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(30)..].join("\n");
        format!("\n--- last lines of {}:\n{tail}", self.log.display())
    }
}

/// Task `t`'s slots, once the job exists.
fn task(status: &JobStatus, t: u32) -> Option<&TaskStatus> {
    status.tasks.iter().find(|s| s.task == t)
}

/// Re-reads the job's status on every change until `cond` holds; panics (with the last status
/// and the nodes' logs) if it does not within [`STEP_TIMEOUT`].
async fn wait_until(
    client: &JobClient,
    events: &mut JobChanges,
    nodes: &[NodeProcess],
    why: &str,
    cond: impl Fn(&JobStatus) -> bool,
) -> JobStatus {
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    loop {
        let status = client
            .status()
            .await
            .unwrap_or_else(|e| panic!("{why}: status: {e}"));
        if cond(&status) {
            return status;
        }
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("{why}: the watch of the job ended"),
            Err(_) => {
                let logs: String = nodes.iter().map(NodeProcess::log_tail).collect();
                panic!("{why}: not within {STEP_TIMEOUT:?}; last status {status:#?}{logs}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_the_primary_over_at_once_and_the_job_stays_exact() {
    let etcd = Etcd::start().await.unwrap_or_else(|e| panic!("{e}"));
    let endpoint = etcd.endpoint().to_owned();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let client = JobClient::connect(&etcd.endpoints(), JOB)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut events = client.changes();

    eprintln!("--- start {TASKS} tasks × {REPLICAS} replicas as processes");
    let mut nodes: Vec<NodeProcess> = (0..TASKS * REPLICAS)
        .map(|i| NodeProcess::spawn(dir.path(), &endpoint, &format!("n{i}")))
        .collect();

    eprintln!("--- wait until the root task has a primary and a backup");
    let before = wait_until(
        &client,
        &mut events,
        &nodes,
        "root with a primary and a backup",
        |s| {
            s.state.is_some_and(|st| !st.finished)
                && task(s, 0).is_some_and(|t| t.primary.is_some() && !t.backups.is_empty())
        },
    )
    .await;
    let Some(root) = task(&before, 0) else {
        panic!("the condition above checked task 0: {before:#?}");
    };
    let (Some(old_primary), Some(old_term)) = (root.primary.clone(), root.term) else {
        panic!("the condition above checked a primary: {root:?}");
    };
    let backup = root.backups[0].clone();
    let victim = nodes
        .iter()
        .position(|n| n.is(&old_primary))
        .unwrap_or_else(|| panic!("no process runs {old_primary}"));
    // The lease that holds the old primary's key: revoked on SIGTERM, or else alive for 10 s.
    let mut etcd_client = etcd.client().await.unwrap_or_else(|e| panic!("{e}"));
    let got = etcd_client
        .get(client.keys().primary(0), None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let lease = match got.kvs().first() {
        Some(kv) if kv.lease() != 0 && u64::try_from(kv.create_revision()) == Ok(old_term) => {
            kv.lease()
        }
        other => panic!("the root's primary key is not {old_primary}'s with a lease: {other:?}"),
    };

    // When the old primary's key goes (its lease revoked): for the figures only.
    let mut spy = client.changes();
    match tokio::time::timeout(STEP_TIMEOUT, spy.recv()).await {
        Ok(Some(Ok(ChangeEvent {
            change: JobChange::Snapshot(_),
            ..
        }))) => {}
        other => panic!("the watch must open with a snapshot, got {other:?}"),
    }
    let (deleted_tx, deleted) = oneshot::channel();
    tokio::spawn(async move {
        while let Some(ev) = spy.recv().await {
            if matches!(
                &ev,
                Ok(ChangeEvent {
                    change: JobChange::PrimaryGone { task: 0, .. },
                    ..
                })
            ) {
                let _ = deleted_tx.send(Instant::now());
                return;
            }
        }
    });

    eprintln!("--- SIGTERM the root's primary {old_primary} (term {old_term}, backup {backup})");
    let sent = Instant::now();
    nodes[victim].sigterm();
    let after = wait_until(
        &client,
        &mut events,
        &nodes,
        "the backup takes over the root",
        |s| {
            let primary = task(s, 0).and_then(|t| t.primary.as_deref());
            primary.is_some_and(|p| p != old_primary) || s.has_result
        },
    )
    .await;
    let took = sent.elapsed();
    let Some(root) = task(&after, 0) else {
        panic!("task 0 vanished: {after:#?}");
    };
    assert_eq!(
        root.primary.as_deref(),
        Some(backup.as_str()),
        "the backup must be the new primary: {after:#?}"
    );
    assert!(
        root.term.is_some_and(|t| t > old_term),
        "the new primary's term must be higher than {old_term}: {root:?}"
    );
    // The spy's watch sees the deletion before the new primary's key (unless it had to
    // reconnect and got a snapshot instead: then the figure is missing, nothing else).
    let revoked = match tokio::time::timeout(Duration::from_secs(5), deleted).await {
        Ok(Ok(at)) => format!("{} ms", at.duration_since(sent).as_millis()),
        _ => "? ms (not seen)".to_owned(),
    };
    eprintln!(
        "handover after SIGTERM: {} ms (old primary's key deleted after {revoked}; lease TTL \
         {LEASE_TTL})",
        took.as_millis()
    );

    eprintln!("--- the stopped node exits 0, and its lease is gone (revoked, not expired)");
    let status = nodes[victim].exit().await;
    assert!(
        status.success(),
        "SIGTERM must end the node with exit code 0, got {status}{}",
        nodes[victim].log_tail()
    );
    let lines = nodes[victim].log_lines();
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "node stopped" && l["fields"]["exit"] == "Stopped"),
        "the node did not report a clean stop{}",
        nodes[victim].log_tail()
    );
    assert!(
        !lines.iter().any(|l| l["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("could not revoke"))),
        "the node could not revoke its lease{}",
        nodes[victim].log_tail()
    );
    let ttl = etcd_client
        .lease_time_to_live(lease, None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        ttl.ttl(),
        -1,
        "the old primary's lease {lease:x} is still alive after its node exited: it was not \
         revoked (remaining TTL {} s){}",
        ttl.ttl(),
        nodes[victim].log_tail()
    );
    let now = client.status().await.unwrap_or_else(|e| panic!("{e}"));
    assert!(
        now.tasks
            .iter()
            .flat_map(|t| &t.holders)
            .all(|h| h.node != old_primary)
            && now.spares.iter().all(|s| s.node != old_primary),
        "{old_primary} still holds a key: {now:#?}"
    );

    eprintln!("--- the job finishes with the exact sums");
    wait_until(&client, &mut events, &nodes, "the job finishes", |s| {
        s.state.is_some_and(|st| st.finished)
    })
    .await;
    let bytes = client
        .result()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("the job finished without a result"));
    let result: serde_json::Value =
        serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{e}: {bytes:?}"));
    // Task `i` adds `epoch · i`: 0 + 1 + 2 = 3 per epoch.
    let want: Vec<u64> = (1..=EPOCHS).map(|e| 3 * e).collect();
    assert_eq!(result["per_epoch"], serde_json::json!(want), "{result}");
    assert!(result.get("error").is_none(), "{result}");
    for (i, node) in nodes.iter_mut().enumerate() {
        if i == victim {
            continue;
        }
        let status = node.exit().await;
        assert!(
            status.success(),
            "{} ended with {status}{}",
            node.name,
            node.log_tail()
        );
    }
}
