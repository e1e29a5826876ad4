//! The `taskgraph` binary against a real etcd with a running job (in-process nodes of the
//! tests crate's dataflow application).

use std::process::{Output, Stdio};
use std::time::Duration;

use serde_json::Value;
use taskgraph::{JobClient, NodeExit};
use taskgraph_tests::cluster::{fully_staffed, App, Cluster, ClusterConfig};
use taskgraph_tests::etcd::Etcd;
use taskgraph_tests::job_name;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const WAIT: Duration = Duration::from_secs(30);

async fn cli(etcd: &Etcd, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_taskgraph"))
        .arg("--etcd")
        .arg(etcd.endpoint())
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run taskgraph: {e}"))
}

fn show(out: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A job of `tasks` tasks × `replicas`, every slot filled, running long enough for the test
/// (the root paces each epoch; the test ends the job itself).
async fn running_job(etcd: &Etcd, name: &str, tasks: u32, replicas: u32) -> (Cluster, String) {
    let job = job_name(name);
    let mut cfg = ClusterConfig::new(etcd.endpoints(), &job, tasks, replicas);
    cfg.app = App::Dataflow {
        until: 100_000,
        pace_ms: 20,
    };
    let nodes = (tasks * replicas) as usize;
    let c = Cluster::start_staffed(cfg, nodes)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    (c, job)
}

async fn status_json(etcd: &Etcd, job: &str) -> Value {
    let out = cli(etcd, &["status", job, "--json"]).await;
    assert!(out.status.success(), "{}", show(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", show(&out)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_lists_every_task_with_exactly_one_primary() {
    let etcd = Etcd::start().await.unwrap_or_else(|e| panic!("{e}"));
    let (mut c, job) = running_job(&etcd, "clistatus", 7, 2).await;
    let s = status_json(&etcd, &job).await;
    let tasks = s["tasks"].as_array().cloned().unwrap_or_default();
    assert_eq!(tasks.len(), 7, "{s}");
    for (i, t) in tasks.iter().enumerate() {
        assert_eq!(t["task"], i, "{t}");
        // Exactly one primary: a node id, and the same node as the cluster reports.
        let primary = t["primary"]
            .as_str()
            .unwrap_or_else(|| panic!("no primary: {t}"));
        let (node, term) = c.primary_of(i as u32).unwrap_or_else(|| panic!("task {i}"));
        assert_eq!(Some(primary), c.node_id(node).as_deref(), "{t}");
        assert_eq!(t["term"], term, "{t}");
        let backups = t["backups"].as_array().cloned().unwrap_or_default();
        assert_eq!(backups.len(), 1, "{t}");
        assert_ne!(backups[0].as_str(), Some(primary), "{t}");
        assert_eq!(t["health"], "healthy", "{t}");
    }
    // The table has one row per task and a summary.
    let out = cli(&etcd, &["status", &job]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", show(&out));
    assert!(text.contains("7 healthy, 0 degraded, 0 down"), "{text}");
    // `jobs` lists it as running.
    let out = cli(&etcd, &["jobs", "--json"]).await;
    let jobs: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let row = jobs
        .as_array()
        .and_then(|a| a.iter().find(|j| j["job"] == job.as_str()).cloned())
        .unwrap_or_else(|| panic!("{}", show(&out)));
    assert_eq!(row["state"], "running", "{row}");
    assert_eq!(row["tasks"], 7, "{row}");
    // `graph`: the tree's DOT text, every task filled with its health's colour and labelled
    // with its primary.
    let out = cli(&etcd, &["graph", &job]).await;
    let dot = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", show(&out));
    assert!(dot.contains("digraph"), "{dot}");
    assert_eq!(dot.matches("fillcolor=palegreen").count(), 7, "{dot}");
    assert_eq!(
        dot.matches(" -> ").count(),
        6,
        "a 7-task tree has 6 edges: {dot}"
    );
    let primary0 = tasks[0]["primary"].as_str().unwrap_or_default();
    assert!(dot.contains(primary0), "{dot}");
    // Output into a pipe closed early (`taskgraph status JOB | head -1`): a quiet success.
    let mut child = Command::new(env!("CARGO_BIN_EXE_taskgraph"))
        .args(["--etcd", etcd.endpoint(), "status", &job])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run taskgraph: {e}"));
    drop(child.stdout.take());
    let out = child
        .wait_with_output()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(out.status.success(), "{}", show(&out));
    assert!(out.stderr.is_empty(), "{}", show(&out));
    c.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_moves_the_primary_and_events_show_it() {
    let etcd = Etcd::start().await.unwrap_or_else(|e| panic!("{e}"));
    let (mut c, job) = running_job(&etcd, "clifailover", 3, 2).await;
    let before = status_json(&etcd, &job).await;
    let old = before["tasks"][1]["primary"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let backup = before["tasks"][1]["backups"][0]
        .as_str()
        .unwrap_or_default()
        .to_owned();

    // Follow the events while the drill runs.
    let mut events = Command::new(env!("CARGO_BIN_EXE_taskgraph"))
        .args(["--etcd", etcd.endpoint(), "events", &job])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    let mut lines =
        BufReader::new(events.stdout.take().unwrap_or_else(|| panic!("no stdout"))).lines();
    // The stream is live once it reports an epoch.
    let first = tokio::time::timeout(WAIT, lines.next_line()).await;
    assert!(matches!(first, Ok(Ok(Some(_)))), "{first:?}");

    let out = cli(&etcd, &["failover", &job, "1"]).await;
    assert!(out.status.success(), "{}", show(&out));
    let after = status_json(&etcd, &job).await;
    assert_eq!(
        after["tasks"][1]["primary"].as_str(),
        Some(backup.as_str()),
        "{after}"
    );
    assert!(
        after["tasks"][1]["term"].as_u64() > before["tasks"][1]["term"].as_u64(),
        "{after}"
    );
    // The event stream names the failover, from the old primary to the backup.
    let want = format!("failover: task 1 primary {old} → {backup}");
    let seen = tokio::time::timeout(WAIT, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains(&want) {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(seen, Ok(true), "no {want:?} in the event stream");
    // The old primary rejoins: the task is fully staffed again.
    c.wait_until("the old primary rejoined as a backup", WAIT, |s| {
        fully_staffed(3, 1, s)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let _ = events.kill().await;
    c.stop_all().await;
}

/// A job that cannot move on (three tasks, two nodes: one task has no node to run it) shows as
/// `stalled` in `taskgraph status`, with the reason naming the task, and `taskgraph events`
/// prints the stall; both go once a third node joins and the job moves again. The events
/// stream is started before the job exists and waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_job_shows_stalled_with_its_reason_and_events_print_it() {
    let etcd = Etcd::start().await.unwrap_or_else(|e| panic!("{e}"));
    let job = job_name("clistall");
    let mut cfg = ClusterConfig::new(etcd.endpoints(), &job, 3, 1);
    cfg.app = App::Dataflow {
        until: 100_000,
        pace_ms: 20,
    };
    cfg.stall_after = Some(Duration::from_secs(2));
    let mut c = Cluster::new(cfg);
    // The stream starts before the job exists: it says so and waits for it.
    let mut events = Command::new(env!("CARGO_BIN_EXE_taskgraph"))
        .args(["--etcd", etcd.endpoint(), "events", &job])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    let mut lines =
        BufReader::new(events.stdout.take().unwrap_or_else(|| panic!("no stdout"))).lines();
    let mut errors =
        BufReader::new(events.stderr.take().unwrap_or_else(|| panic!("no stderr"))).lines();
    let warning = tokio::time::timeout(WAIT, errors.next_line()).await;
    assert!(
        matches!(&warning, Ok(Ok(Some(w))) if w.contains("does not exist (yet); waiting")),
        "{warning:?}"
    );
    for _ in 0..2 {
        c.add_node().await.unwrap_or_else(|e| panic!("{e}"));
    }
    let mut created = false;
    let stall = tokio::time::timeout(WAIT, async {
        while let Ok(Some(line)) = lines.next_line().await {
            created |= line.contains("job created: 3 tasks");
            if line.contains("stall: node") {
                return Some(line);
            }
        }
        None
    })
    .await;
    let Ok(Some(stall)) = stall else {
        panic!("no stall in the event stream: {stall:?}")
    };
    assert!(created, "the stream did not show the job's creation");
    assert!(stall.contains("has no primary"), "{stall}");

    let out = cli(&etcd, &["status", &job]).await;
    assert!(out.status.success(), "{}", show(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("stalled at epoch 0"), "{}", show(&out));
    assert!(
        text.lines()
            .any(|l| l.starts_with("stalled: ") && l.contains("has no primary")),
        "{}",
        show(&out)
    );
    let s = status_json(&etcd, &job).await;
    assert!(s["stalls"].as_array().is_some_and(|a| !a.is_empty()), "{s}");

    // A third node: the job moves, the stall is over in the events and in the status.
    c.add_node().await.unwrap_or_else(|e| panic!("{e}"));
    let over = tokio::time::timeout(WAIT, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("stall over") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(over, Ok(true), "no end of the stall in the event stream");
    let s = status_json(&etcd, &job).await;
    assert!(s["stalls"].as_array().is_some_and(|a| a.is_empty()), "{s}");
    let _ = events.kill().await;
    c.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_the_job_and_gc_removes_its_keys() {
    let etcd = Etcd::start().await.unwrap_or_else(|e| panic!("{e}"));
    let (mut c, job) = running_job(&etcd, "clishutdown", 3, 1).await;
    // A running job's keys are not deleted without --force.
    let out = cli(&etcd, &["gc", &job]).await;
    assert!(!out.status.success(), "{}", show(&out));
    assert!(show(&out).contains("still running"), "{}", show(&out));

    let out = cli(&etcd, &["shutdown", &job]).await;
    assert!(out.status.success(), "{}", show(&out));
    for i in 0..c.len() {
        let exit = tokio::time::timeout(WAIT, c.wait(i)).await;
        assert!(
            matches!(exit, Ok(Some(Ok(NodeExit::JobFinished { .. })))),
            "node {i}: {exit:?}"
        );
    }
    let s = status_json(&etcd, &job).await;
    assert_eq!(s["state"]["finished"], true, "{s}");

    let out = cli(&etcd, &["gc", &job]).await;
    assert!(out.status.success(), "{}", show(&out));
    let client = JobClient::connect(&etcd.endpoints(), &job)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let left = client.status().await.unwrap_or_else(|e| panic!("{e}"));
    assert!(left.state.is_none() && left.nodes == 0, "{left:?}");
    assert_eq!(client.spec().await.ok().flatten(), None);
    let out = cli(&etcd, &["jobs", "--json"]).await;
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains(&job),
        "{}",
        show(&out)
    );
}

/// Expects a non-zero exit and exactly one line on stderr, containing `needle`.
async fn refused(etcd: &Etcd, args: &[&str], needle: &str) {
    let out = cli(etcd, args).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?}: {}", show(&out));
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "{args:?}: {}",
        show(&out)
    );
    assert!(
        stderr.starts_with("error: ") && stderr.contains(needle),
        "{args:?}: {}",
        show(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_arguments_get_one_line_and_a_non_zero_exit() {
    let etcd = Etcd::start().await.unwrap_or_else(|e| panic!("{e}"));
    let (mut c, job) = running_job(&etcd, "clibad", 3, 1).await;
    refused(&etcd, &["status", "no-such-job"], "does not exist").await;
    refused(&etcd, &["failover", "no-such-job", "0"], "does not exist").await;
    refused(&etcd, &["failover", &job, "3"], "task 3 does not exist").await;
    refused(&etcd, &["failover", &job, "0"], "no backup").await;
    refused(&etcd, &["status", "Bad/Name"], "job name").await;
    refused(&etcd, &["result", &job], "still running").await;
    refused(
        &etcd,
        &["events", &job, "--since-revision", "0"],
        "positive",
    )
    .await;
    // No etcd there: refused quickly with the endpoint named.
    let out = Command::new(env!("CARGO_BIN_EXE_taskgraph"))
        .args(["--etcd", "http://127.0.0.1:1", "status", &job])
        .output()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("unreachable"),
        "{}",
        show(&out)
    );
    assert_eq!(stderr.trim_end().lines().count(), 1, "{}", show(&out));
    c.stop_all().await;
}
