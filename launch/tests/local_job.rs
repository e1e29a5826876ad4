//! taskgraph-launch end to end, with real etcd and real node processes, and
//! `JobClient::wait_finished` against them.
//!
//! The node processes are this test binary itself, as an application's nodes are its own
//! binary: the launcher runs it with `node_process --exact --ignored --nocapture`, and the
//! ignored test `node_process` runs one node with the settings the launcher put in its
//! environment. The job: a tree of 3 tasks; in epoch `e` the root pulls `e·id` from each of
//! its two children and records the sum (`3e`); after epoch `LAST` it ends the job with the
//! sums as its result (JSON).

use std::time::Duration;

use taskgraph::{
    async_trait, Context, DataReply, DataRequest, Epoch, Finished, Framework, FrameworkBuilder,
    JobClient, JobSpec, Task, TaskId,
};
use taskgraph_launch::{launched_node, stdin_closed, ErrorKind, Existing, LocalJob};
use taskgraph_tests::etcd::Etcd;

/// The job's last epoch (an environment variable of the node processes).
const LAST_ENV: &str = "LAUNCH_TEST_LAST_EPOCH";
/// Set for nodes that must fail at once (exit code 3).
const FAIL_ENV: &str = "LAUNCH_TEST_FAIL";

struct Sums {
    last: Epoch,
    epoch: Epoch,
    got: Vec<u64>,
    sums: Vec<u64>,
}

#[async_trait]
impl Task for Sums {
    async fn enter_epoch(&mut self, ctx: &Context, epoch: Epoch) {
        self.epoch = epoch;
        self.got.clear();
        if ctx.task() == 0 {
            for child in ctx.neighbours(taskgraph::Tree::CHILDREN) {
                let _ = ctx.data_request_with(child, "value", &());
            }
        }
    }

    async fn serve_data(&mut self, ctx: &Context, request: DataRequest) {
        let value = request.epoch() * u64::from(ctx.task());
        let _ = request.reply_with(&value);
    }

    async fn data_ready(&mut self, ctx: &Context, reply: DataReply) {
        if let Ok(v) = reply.decode::<u64>() {
            self.got.push(v);
        }
        if self.got.len() < ctx.neighbours(taskgraph::Tree::CHILDREN).len() {
            return;
        }
        self.sums.push(self.got.iter().sum());
        let (ctx2, epoch) = (ctx.clone(), self.epoch);
        if epoch >= self.last {
            let result = serde_json::to_vec(&self.sums).unwrap_or_default();
            ctx.spawn(async move {
                let _ = ctx2.shutdown_job_with(result).await;
            });
        } else {
            ctx.spawn(async move {
                let _ = ctx2.inc_epoch(epoch).await;
            });
        }
    }
}

/// The nodes' configuration, and the launcher's spec.
fn framework(etcd: Vec<String>, job: &str, last: Epoch) -> FrameworkBuilder {
    let tree = taskgraph::Tree::new(3, 2).unwrap_or_else(|e| panic!("{e}"));
    Framework::builder()
        .etcd(etcd)
        .job(job)
        .tasks(3)
        .replicas(2)
        .links(tree.links())
        .lease_ttl(Duration::from_secs(2))
        .param("last", last.to_string())
        .task_builder(move |_: TaskId| Sums {
            last,
            epoch: 0,
            got: Vec::new(),
            sums: Vec::new(),
        })
}

fn spec(job: &str, last: Epoch) -> JobSpec {
    // The spec does not depend on the endpoints: any will do to build it.
    framework(vec!["http://127.0.0.1:2379".into()], job, last)
        .build()
        .unwrap_or_else(|e| panic!("{e}"))
        .config()
        .spec()
}

/// What each node process runs (ignored: it does nothing outside a launched node).
#[test]
#[ignore = "run by the launcher as a node process"]
fn node_process() {
    let Some(index) = launched_node().unwrap_or_else(|e| panic!("{e}")) else {
        return;
    };
    if std::env::var_os(FAIL_ENV).is_some() {
        eprintln!("node {index}: failing on purpose");
        std::process::exit(3);
    }
    let var = |k: &str| std::env::var(k).unwrap_or_else(|e| panic!("{k}: {e}"));
    let etcd = var("TASKGRAPH_ETCD").split(',').map(String::from).collect();
    let last = var(LAST_ENV).parse().unwrap_or_else(|e| panic!("{e}"));
    let runtime = tokio::runtime::Runtime::new().unwrap_or_else(|e| panic!("{e}"));
    runtime.block_on(async {
        let node = framework(etcd, &var("TASKGRAPH_JOB"), last)
            .node_name(var("TASKGRAPH_NODE_NAME"))
            .build()
            .unwrap_or_else(|e| panic!("{e}"))
            .spawn()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let exit = node.stop_on(stdin_closed()).await;
        eprintln!("node {index} ended: {exit:?}");
    });
}

/// The launcher running this binary's `node_process` test as its nodes.
fn local_job(job: &str, last: Epoch) -> LocalJob {
    LocalJob::new(job, spec(job, last))
        .args(["node_process", "--exact", "--ignored", "--nocapture"])
        .env(LAST_ENV, last.to_string())
        .spares(1)
        .epochs(last)
        .progress_bar(false)
        .timeout(Some(Duration::from_secs(120)))
}

fn sums(last: Epoch) -> Vec<u8> {
    let sums: Vec<u64> = (0..=last).map(|e| 3 * e).collect();
    serde_json::to_vec(&sums).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_on_a_private_etcd_and_returns_its_result() {
    tracing::info!("--- no etcd given: the run starts its own, 3 tasks × 2 replicas + 1 spare");
    let outcome = local_job("private", 5)
        .run()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(outcome.job, "private");
    assert_eq!(outcome.epoch, 5);
    assert_eq!(outcome.result.as_deref(), Some(&sums(5)[..]));
    assert_eq!(outcome.kills, 0);
    assert_eq!(outcome.nodes.len(), 7, "{:?}", outcome.nodes);
    for node in &outcome.nodes {
        assert!(
            node.status.is_some_and(|s| s.success()) && !node.killed_by_chaos && !node.forced,
            "{node:?}"
        );
        assert!(node.log.starts_with(outcome.node_logs()), "{node:?}");
    }
    let logs = outcome.node_logs().to_owned();
    assert!(logs.join("node-0.log").is_file());
    drop(outcome);
    assert!(
        !logs.exists(),
        "the temporary logs of a good run are removed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_finished_sees_the_result_and_a_second_run_of_the_name_is_refused() {
    let etcd = Etcd::start().await.unwrap_or_else(|e| panic!("{e}"));
    let job = "waited";
    let client = JobClient::connect(&etcd.endpoints(), job)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    tracing::info!("--- wait for a job that does not exist yet, while it is launched");
    let waiter = tokio::spawn({
        let client = client.clone();
        async move { client.wait_finished().await }
    });
    let outcome = local_job(job, 4)
        .etcd(etcd.endpoints())
        .run()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let want = Finished::WithResult {
        epoch: 4,
        result: sums(4).into(),
    };
    let seen = tokio::time::timeout(Duration::from_secs(30), waiter)
        .await
        .unwrap_or_else(|_| panic!("wait_finished did not return"))
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(seen, want);
    assert_eq!(outcome.result.as_ref(), seen.result());

    tracing::info!("--- the job finished already: wait_finished answers from its keys");
    let again = tokio::time::timeout(Duration::from_secs(30), client.wait_finished())
        .await
        .unwrap_or_else(|_| panic!("wait_finished did not return"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(again, want);

    tracing::info!("--- the same name again: refused, with the spec's difference or the end");
    let same = local_job(job, 4).etcd(etcd.endpoints()).run().await;
    let e = same
        .err()
        .unwrap_or_else(|| panic!("a second run was accepted"));
    assert!(
        matches!(
            e.kind(),
            ErrorKind::JobExists {
                existing: Existing::Finished(4),
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(e.exit_code(), 1);
    let other = local_job(job, 9).etcd(etcd.endpoints()).run().await;
    let e = other
        .err()
        .unwrap_or_else(|| panic!("another spec was accepted"));
    assert!(
        matches!(
            e.kind(),
            ErrorKind::JobExists { existing: Existing::DifferentSpec(d), .. } if d.contains("last")
        ),
        "{e}"
    );
}

/// Waits (on the job's watch) until its epoch is at least `epoch`.
async fn until_epoch(client: &JobClient, epoch: Epoch) {
    let mut changes = client.changes();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(s)) = client.state().await {
            if s.epoch >= epoch {
                return;
            }
        }
        let next = tokio::time::timeout_at(deadline, changes.recv()).await;
        assert!(
            matches!(next, Ok(Some(_))),
            "the job did not reach epoch {epoch}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_shutdown_is_exit_code_4_and_a_finish_without_result() {
    let etcd = Etcd::start().await.unwrap_or_else(|e| panic!("{e}"));
    let job = "stopped";
    let client = JobClient::connect(&etcd.endpoints(), job)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let run = tokio::spawn(
        local_job(job, 1_000_000)
            .etcd(etcd.endpoints())
            .expect_result(true)
            .run(),
    );
    until_epoch(&client, 2).await;
    tracing::info!("--- an operator ends the job");
    let at = client
        .shutdown()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("no job"));
    let finished = tokio::time::timeout(Duration::from_secs(30), client.wait_finished())
        .await
        .unwrap_or_else(|_| panic!("wait_finished did not return"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(finished, Finished::WithoutResult { epoch: at });
    let e = run
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .err()
        .unwrap_or_else(|| panic!("a shut-down job counted as a success"));
    assert!(
        matches!(e.kind(), ErrorKind::ShutDown { epoch, .. } if *epoch == at),
        "{e}"
    );
    assert_eq!(e.exit_code(), 4, "{e}");
    let logs = e.node_logs().unwrap_or_else(|| panic!("no logs kept: {e}"));
    assert!(logs.join("node-0.log").is_file(), "{e}");
    assert!(e
        .to_string()
        .ends_with(&format!("node logs: {}", logs.display())));
    let _ = std::fs::remove_dir_all(logs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_fails_ends_the_run_naming_it() {
    let etcd = Etcd::start().await.unwrap_or_else(|e| panic!("{e}"));
    let e = local_job("failing", 3)
        .etcd(etcd.endpoints())
        .env(FAIL_ENV, "1")
        .run()
        .await
        .err()
        .unwrap_or_else(|| panic!("failing nodes counted as a success"));
    let ErrorKind::NodeFailed {
        status, log_tail, ..
    } = e.kind()
    else {
        panic!("{e}");
    };
    assert_eq!(status.code(), Some(3), "{e}");
    assert!(log_tail.contains("failing on purpose"), "{e}");
    assert_eq!(e.exit_code(), 1);
    if let Some(logs) = e.node_logs() {
        let _ = std::fs::remove_dir_all(logs);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_kills_pairs_at_random_intervals_and_replaces_them() {
    let etcd = Etcd::start().await.unwrap_or_else(|e| panic!("{e}"));
    // The root keeps its sums in memory only, so a chaos run's result may lack some: this
    // checks the chaos mode, not the job's arithmetic (the regression example's tests do).
    let outcome = local_job("chaotic", 300)
        .etcd(etcd.endpoints())
        .spares(2)
        .chaos(Some(
            taskgraph_launch::Chaos::between(
                Duration::from_millis(100),
                Duration::from_millis(300),
            )
            .seed(5)
            .at_once(2),
        ))
        .run()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "chaos: {} kills, {} failovers in {:?}",
        outcome.kills, outcome.failovers, outcome.elapsed
    );
    assert_eq!(outcome.epoch, 300);
    assert!(outcome.kills >= 2, "no chaos: {} kills", outcome.kills);
    assert!(outcome.result.is_some());
    let killed = outcome.nodes.iter().filter(|n| n.killed_by_chaos).count();
    assert_eq!(killed as u64, outcome.kills, "{:?}", outcome.nodes);
    // Every kill was replaced: the launched nodes are the first 8 plus one per kill.
    assert_eq!(
        outcome.nodes.len() as u64,
        8 + outcome.kills,
        "{:?}",
        outcome.nodes
    );
    for node in outcome.nodes.iter().filter(|n| !n.killed_by_chaos) {
        assert!(node.status.is_some_and(|s| s.success()), "{node:?}");
    }
}
