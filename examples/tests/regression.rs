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
