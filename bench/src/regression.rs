//! The regression example end to end (scenario `regression`): its default local run (15 tasks,
//! linear regression, 2 replicas plus a spare, every node a process), against the bench's etcd
//! so that the epoch key can be watched for per-epoch times.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use etcd_client::WatchOptions;
use serde_json::{json, Value};
use taskgraph_tests::etcd::Etcd;

use crate::common::{ms, BoxError};

/// One run.
#[derive(Debug, Clone, Default)]
pub struct RunFigures {
    /// Wall time of the `regression` process.
    pub wall_ms: f64,
    /// `elapsed_ms` of its report.
    pub reported_ms: Option<f64>,
    /// Epochs of its report.
    pub epochs: Option<u64>,
    /// Time between successive changes of the epoch key, from epoch 1 on.
    pub epoch_ms: Vec<f64>,
}

/// Runs `regression` with its default job flags plus `extra`, once.
pub async fn run_once(
    etcd: &Etcd,
    bin: &Path,
    extra: &[String],
    dir: &Path,
    limit: Duration,
) -> Result<RunFigures, BoxError> {
    let job = taskgraph_tests::job_name("regression");
    let report = dir.join(format!("{job}.json"));
    let key = format!("/taskgraph/jobs/{job}/epoch");
    let mut client = etcd.client().await?;
    let mut stream = client
        .watch(key.as_str(), Some(WatchOptions::new()))
        .await?;
    let mut cmd = tokio::process::Command::new(bin);
    cmd.arg("--etcd")
        .arg(etcd.endpoint())
        .arg("--job")
        .arg(&job)
        .arg("--report")
        .arg(&report)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let t0 = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    let mut changes: Vec<(u64, Instant)> = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    let status = loop {
        tokio::select! {
            s = child.wait() => break s?,
            msg = stream.message() => {
                if let Ok(Some(resp)) = msg {
                    let now = Instant::now();
                    // One response may carry several epoch moves: keep the last.
                    let newest = resp
                        .events()
                        .iter()
                        .filter_map(|ev| ev.kv()?.value_str().ok())
                        .filter_map(|v| v.trim_start_matches("done ").trim().parse::<u64>().ok())
                        .max();
                    if let Some(n) = newest {
                        if changes.last().is_none_or(|(e, _)| *e < n) {
                            changes.push((n, now));
                        }
                    }
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                let _ = child.kill().await;
                return Err(format!("regression did not finish within {limit:?} ({} epoch changes seen)", changes.len()).into());
            }
        }
    };
    let wall_ms = ms(t0.elapsed());
    if !status.success() {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            use tokio::io::AsyncReadExt;
            let _ = e.read_to_string(&mut err).await;
        }
        let tail: Vec<&str> = err.lines().rev().take(5).collect();
        return Err(format!(
            "regression exited with {status}: {}",
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        )
        .into());
    }
    let parsed: Option<Value> = std::fs::read(&report)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    // Epochs seen moving together (in one watch response) share the interval evenly.
    let epoch_ms = changes
        .windows(2)
        .filter(|w| w[0].0 >= 1)
        .flat_map(|w| {
            let moved = (w[1].0 - w[0].0).max(1);
            std::iter::repeat_n(ms(w[1].1 - w[0].1) / moved as f64, moved as usize)
        })
        .collect();
    Ok(RunFigures {
        wall_ms,
        reported_ms: parsed.as_ref().and_then(|v| v.get("elapsed_ms")?.as_f64()),
        epochs: parsed.as_ref().and_then(|v| v.get("epochs")?.as_u64()),
        epoch_ms,
    })
}

/// The runs as JSON.
pub fn json(runs: &[RunFigures], extra: &[String]) -> Value {
    json!({
        "flags": extra,
        "runs": runs.iter().map(|r| json!({
            "wall_ms": r.wall_ms,
            "reported_elapsed_ms": r.reported_ms,
            "epochs": r.epochs,
            "epoch_ms": r.epoch_ms,
        })).collect::<Vec<_>>(),
    })
}
