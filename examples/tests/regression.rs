//! The regression example end to end, as a user runs it: the `regression` binary in local mode
//! (private etcd, one process per node), with and without chaos, and its errors for bad input.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;
use taskgraph_tests::etcd::Etcd;

fn regression(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_regression"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap_or_else(|e| panic!("cannot run regression: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs a local job and returns its report.
fn run_job(dir: &Path, name: &str, args: &[&str]) -> Value {
    let report = dir.join(format!("{name}.json"));
    let report_arg = report.display().to_string();
    let mut all = vec!["--quiet", "--report", &report_arg];
    all.extend_from_slice(args);
    let out = regression(&all);
    assert!(out.status.success(), "{name}: {}", text(&out));
    let json = std::fs::read_to_string(&report).unwrap_or_else(|e| panic!("{name}: {e}"));
    serde_json::from_str(&json).unwrap_or_else(|e| panic!("{name}: {e}: {json}"))
}

#[test]
fn sum_over_fifteen_tasks_is_exact() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let r = run_job(
        dir.path(),
        "sum",
        &["--workload", "sum", "--tasks", "15", "--epochs", "10"],
    );
    let want: Vec<u64> = (1..=10).map(|e| 105 * e).collect();
    assert_eq!(r["per_epoch"], serde_json::json!(want), "{r}");
    assert_eq!(r["workload"], "sum");
    assert_eq!(r["tasks"], 15);
    assert_eq!(r["replicas"], 2);
    assert_eq!(r["epochs"], 10);
    assert_eq!(r["kills"], 0);
}

#[test]
fn chaos_changes_no_bit_of_the_result() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    // 40 epochs of at least 50 ms each: at least 2 s, so at least 6 kills at 300 ms.
    let job = ["--epochs", "40", "--compute-ms", "50", "--seed", "11"];
    let calm = run_job(dir.path(), "calm", &job);
    let mut chaotic_args = job.to_vec();
    chaotic_args.extend_from_slice(&["--chaos-kill-every", "300ms", "--chaos-seed", "3"]);
    let chaotic = run_job(dir.path(), "chaos", &chaotic_args);

    // The job learned something...
    let losses: Vec<f64> = calm["per_epoch"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    assert_eq!(losses.len(), 40, "{calm}");
    assert!(losses[39] < losses[0] / 100.0, "{losses:?}");
    let weights = calm["weights"].as_array().cloned().unwrap_or_default();
    let truth = calm["true_weights"].as_array().cloned().unwrap_or_default();
    assert_eq!(weights.len(), 9, "{calm}");
    for (w, t) in weights.iter().zip(&truth) {
        let (w, t) = (w.as_f64().unwrap_or(f64::NAN), t.as_f64().unwrap_or(0.0));
        assert!((w - t).abs() < 0.05, "learned {weights:?}, true {truth:?}");
    }
    // ...and nodes died while it did...
    assert_eq!(calm["kills"], 0);
    assert!(chaotic["kills"].as_u64().unwrap_or(0) >= 3, "{chaotic}");
    // ...without changing a bit: JSON floats are printed in their shortest form that reads
    // back to the same bits, so equal JSON means equal bits.
    assert_eq!(chaotic["per_epoch"], calm["per_epoch"]);
    assert_eq!(chaotic["weights"], calm["weights"]);
}

/// Runs `regression` expecting a refusal: non-zero exit and an `error:` line naming `needle`.
fn refused(args: &[&str], needle: &str) {
    let out = regression(args);
    let all = text(&out);
    assert!(!out.status.success(), "{args:?} was accepted: {all}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("{args:?}: no error line: {all}"));
    assert!(
        line.contains(needle),
        "{args:?}: {line:?} lacks {needle:?}: {all}"
    );
}

#[test]
fn bad_flags_get_one_clear_error() {
    refused(&["--tasks", "0"], "--tasks");
    refused(&["--fanout", "0"], "--fanout");
    refused(&["--epochs", "0"], "--epochs");
    refused(&["--replicas", "0"], "--replicas");
    refused(&["--learning-rate=-1"], "--learning-rate");
    refused(&["--lease-ttl", "500ms"], "--lease-ttl");
    refused(&["--chaos-kill-every", "soon"], "--chaos-kill-every");
    refused(
        &["--workload", "linreg", "--tasks", "1"],
        "at least 2 tasks",
    );
    refused(&["--job", "Not/A/Name"], "job name");
    refused(&["node", "--job", "j"], "--etcd");
    refused(
        &["--etcd", "http://127.0.0.1:1", "--epochs", "1"],
        "unreachable",
    );
}

#[tokio::test]
async fn a_job_name_in_use_by_another_spec_is_refused() {
    let etcd = Etcd::start().await.unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let endpoint = etcd.endpoint().to_owned();
    let first = run_job(
        dir.path(),
        "first",
        &[
            "--etcd",
            &endpoint,
            "--job",
            "shared",
            "--workload",
            "sum",
            "--tasks",
            "3",
            "--replicas",
            "1",
            "--spares",
            "0",
            "--epochs",
            "2",
        ],
    );
    assert_eq!(first["per_epoch"], serde_json::json!([3, 6]));
    // The local mode names the difference...
    refused(
        &[
            "--etcd",
            &endpoint,
            "--job",
            "shared",
            "--tasks",
            "3",
            "--replicas",
            "1",
        ],
        "already exists with a different spec: parameter",
    );
    // ...and so does a node (the framework checks the spec in etcd).
    refused(
        &[
            "node",
            "--etcd",
            &endpoint,
            "--job",
            "shared",
            "--workload",
            "sum",
            "--tasks",
            "5",
            "--replicas",
            "1",
        ],
        "tasks: etcd has 3, this node has 5",
    );
    // The same spec again: the job already ran.
    refused(
        &[
            "--etcd",
            &endpoint,
            "--job",
            "shared",
            "--workload",
            "sum",
            "--tasks",
            "3",
            "--replicas",
            "1",
            "--spares",
            "0",
            "--epochs",
            "2",
        ],
        "already ran",
    );
}

/// Starts a local run against `etcd` (job `job`) in the background.
fn spawn_run(etcd: &Etcd, job: &str, args: &[&str]) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_regression"))
        .args(["--quiet", "--etcd", etcd.endpoint(), "--job", job])
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run regression: {e}"))
}

/// Waits (watching the job) until its epoch is at least `epoch`.
async fn until_epoch(etcd: &Etcd, job: &str, epoch: u64) {
    let wait = std::time::Duration::from_secs(60);
    let deadline = tokio::time::Instant::now() + wait;
    let client = loop {
        match taskgraph::JobClient::connect(&etcd.endpoints(), job).await {
            Ok(c) => break c,
            Err(e) if tokio::time::Instant::now() < deadline => {
                eprintln!("not yet: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    let mut watch = client.changes();
    loop {
        if let Ok(Some(s)) = client.state().await {
            if s.epoch >= epoch {
                return;
            }
        }
        let next = tokio::time::timeout_at(deadline, watch.recv()).await;
        assert!(
            matches!(next, Ok(Some(_))),
            "job {job} did not reach epoch {epoch}"
        );
    }
}

async fn outcome(child: tokio::process::Child) -> Output {
    tokio::time::timeout(
        std::time::Duration::from_secs(120),
        child.wait_with_output(),
    )
    .await
    .unwrap_or_else(|_| panic!("the run did not end"))
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Garbage left under the running job's epoch key (an operator's typo): the job heals it and
/// finishes with the exact sums.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_left_under_the_epoch_heals_and_the_sums_stay_exact() {
    let etcd = Etcd::start().await.unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let report = dir.path().join("r.json").display().to_string();
    let job = "tampered";
    let run = spawn_run(
        &etcd,
        job,
        &[
            "--workload",
            "sum",
            "--tasks",
            "7",
            "--epochs",
            "40",
            "--compute-ms",
            "20",
            "--report",
            &report,
        ],
    );
    until_epoch(&etcd, job, 5).await;
    let mut client = etcd.client().await.unwrap_or_else(|e| panic!("{e}"));
    client
        .put(format!("/taskgraph/jobs/{job}/epoch"), "garbage", None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let out = outcome(run).await;
    assert!(out.status.success(), "{}", text(&out));
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    let want: Vec<u64> = (1..=40).map(|e| 21 * e).collect();
    assert_eq!(r["per_epoch"], serde_json::json!(want), "{r}");
}

/// `taskgraph shutdown` (here: `JobClient::shutdown`, what it calls) ends the job early: the
/// launcher says so, with the epoch, and exits 4 — not the exit code of a failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_shut_down_by_an_operator_is_told_apart_from_a_failure() {
    let etcd = Etcd::start().await.unwrap_or_else(|e| panic!("{e}"));
    let job = "stopped";
    let run = spawn_run(
        &etcd,
        job,
        &[
            "--workload",
            "sum",
            "--tasks",
            "3",
            "--epochs",
            "200",
            "--compute-ms",
            "20",
        ],
    );
    until_epoch(&etcd, job, 3).await;
    let client = taskgraph::JobClient::connect(&etcd.endpoints(), job)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let at = client
        .shutdown()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("no job"));
    let out = outcome(run).await;
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let want = format!(
        "error: job {job} was shut down at epoch {at} (by `taskgraph shutdown` or `shutdown_job`) before its 200 epochs"
    );
    assert!(stderr.contains(&want), "{}", text(&out));
}

/// A job that cannot heal (a node stopped with SIGSTOP: its task loses its primary, and there
/// is no spare) is reported while it stalls and ends the run with exit code 3 and one error
/// line naming the cause, long before the run's own time limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stall_that_does_not_heal_ends_the_run_with_exit_code_3() {
    let etcd = Etcd::start().await.unwrap_or_else(|e| panic!("{e}"));
    let job = "stuck";
    let run = spawn_run(
        &etcd,
        job,
        &[
            "--workload",
            "sum",
            "--tasks",
            "3",
            "--replicas",
            "1",
            "--spares",
            "0",
            "--epochs",
            "100000",
            "--compute-ms",
            "20",
            "--lease-ttl",
            "1s",
            "--stall-after",
            "2s",
            "--stall-limit",
            "4s",
            "--timeout",
            "10m",
        ],
    );
    until_epoch(&etcd, job, 2).await;
    // The node of task 0's primary: the one that speaks for the job while it has a primary,
    // so the stall must be reported by the others.
    let mut client = etcd.client().await.unwrap_or_else(|e| panic!("{e}"));
    let holder = client
        .get(format!("/taskgraph/jobs/{job}/tasks/0/primary"), None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let holder: Value = serde_json::from_slice(
        holder
            .kvs()
            .first()
            .unwrap_or_else(|| panic!("task 0 has no primary"))
            .value(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // Node ids are `<--node-name>-<random>`; the launcher names its nodes `node<i>`.
    let name = holder["node"]
        .as_str()
        .and_then(|n| n.rsplit_once('-'))
        .map(|(name, _)| name.to_owned())
        .unwrap_or_else(|| panic!("a node id: {holder}"));
    let pids = Command::new("pgrep")
        .args([
            "-f",
            &format!("regression node .*--job={job} .*--node-name={name} "),
        ])
        .output()
        .unwrap_or_else(|e| panic!("pgrep: {e}"));
    let pid = String::from_utf8_lossy(&pids.stdout)
        .lines()
        .next()
        .unwrap_or_else(|| panic!("no node process of {job}"))
        .trim()
        .to_owned();
    let stopped = Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap_or_else(|e| panic!("kill: {e}"));
    assert!(stopped.success());
    let out = outcome(run).await;
    // The launcher killed its nodes (the stopped one too) on its way out.
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning: the job is stalled"),
        "{}",
        text(&out)
    );
    let error = stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line: {}", text(&out)));
    assert!(
        error.contains(&format!("job {job} stalled at epoch")) && error.contains("did not heal"),
        "{error}"
    );
    assert!(
        error.contains("[task ") || error.contains("[key "),
        "{error}"
    );
}
