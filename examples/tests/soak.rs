//! The chaos soak: the regression example (`linreg`, 15 tasks, 2 replicas, 1 spare) run in
//! local mode with a node SIGKILLed every few hundred milliseconds for the whole run, under
//! several chaos seeds; every run must finish with a result bit-identical to the fault-free
//! run of the same job.
//!
//! By default (CI) the soak is short: three seeds of 30 epochs. Set `TASKGRAPH_SOAK=1` for the
//! long soak (20 seeds of 100 epochs, kills every 100, 250 or 400 ms in turn);
//! `TASKGRAPH_SOAK_SEEDS` and `TASKGRAPH_SOAK_EPOCHS` override the number of seeds and epochs:
//!
//! ```text
//! TASKGRAPH_SOAK=1 cargo test -p taskgraph-examples --test soak -- --nocapture
//! ```
//!
//! (`cargo test`, not `cargo nextest`: the long soak outlasts nextest's slow-test limit.)
//!
//! Every run prints its chaos seed, kill interval, kills and failovers, so a failing run can be
//! repeated with `regression --chaos-seed S --chaos-kill-every I` and the same job flags.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// The soak's shape: which chaos runs to make.
struct Plan {
    epochs: u64,
    seeds: Vec<u64>,
    intervals_ms: Vec<u64>,
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.parse()
            .unwrap_or_else(|e| panic!("{name}={v:?} is not a number: {e}")),
    )
}

fn plan() -> Plan {
    let long = std::env::var("TASKGRAPH_SOAK").is_ok_and(|v| !v.is_empty() && v != "0");
    let (epochs, seeds, intervals_ms) = if long {
        (100, 20, vec![100, 250, 400])
    } else {
        (30, 3, vec![250])
    };
    let epochs = env_u64("TASKGRAPH_SOAK_EPOCHS").unwrap_or(epochs);
    let seeds = env_u64("TASKGRAPH_SOAK_SEEDS").unwrap_or(seeds);
    Plan {
        epochs,
        seeds: (1..=seeds).collect(),
        intervals_ms,
    }
}

/// Runs the regression example in local mode and returns its report.
fn run_job(dir: &Path, name: &str, args: &[String]) -> Value {
    let report = dir.join(format!("{name}.json"));
    let out = Command::new(env!("CARGO_BIN_EXE_regression"))
        .arg("--quiet")
        .arg("--report")
        .arg(&report)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap_or_else(|e| panic!("cannot run regression: {e}"));
    assert!(
        out.status.success(),
        "{name} ({args:?}) failed: status {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let json = std::fs::read_to_string(&report).unwrap_or_else(|e| panic!("{name}: {e}"));
    serde_json::from_str(&json).unwrap_or_else(|e| panic!("{name}: {e}: {json}"))
}

#[test]
fn chaos_soak_results_are_bit_identical_to_the_calm_run() {
    let plan = plan();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let job: Vec<String> = [
        "--workload",
        "linreg",
        "--tasks",
        "15",
        "--replicas",
        "2",
        "--spares",
        "1",
        "--compute-ms",
        "50",
        "--seed",
        "11",
        "--epochs",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .chain([plan.epochs.to_string()])
    .collect();

    let calm = run_job(dir.path(), "calm", &job);
    assert_eq!(calm["kills"], 0, "{calm}");
    let per_epoch = calm["per_epoch"].as_array().cloned().unwrap_or_default();
    assert_eq!(per_epoch.len() as u64, plan.epochs, "{calm}");
    assert_eq!(calm["weights"].as_array().map(Vec::len), Some(9), "{calm}");

    let mut total_kills = 0;
    for (i, seed) in plan.seeds.iter().enumerate() {
        let every = plan.intervals_ms[i % plan.intervals_ms.len()];
        let mut args = job.clone();
        args.extend([
            "--chaos-kill-every".to_owned(),
            format!("{every}ms"),
            "--chaos-seed".to_owned(),
            seed.to_string(),
        ]);
        let chaotic = run_job(dir.path(), &format!("chaos-{seed}"), &args);
        let kills = chaotic["kills"].as_u64().unwrap_or(0);
        eprintln!(
            "soak: chaos seed {seed}, a kill every {every} ms: {kills} kills, {} failovers, {} ms",
            chaotic["failovers"], chaotic["elapsed_ms"]
        );
        // Every epoch lasts at least 50 ms of compute: a run lasts longer than a few kill
        // intervals, so the chaos did strike.
        assert!(kills >= 3, "seed {seed}: only {kills} kills: {chaotic}");
        // JSON floats print in their shortest form that reads back to the same bits: equal
        // JSON means equal bits.
        assert_eq!(
            chaotic["per_epoch"], calm["per_epoch"],
            "seed {seed}, every {every} ms: the losses differ from the calm run"
        );
        assert_eq!(
            chaotic["weights"], calm["weights"],
            "seed {seed}, every {every} ms: the weights differ from the calm run"
        );
        total_kills += kills;
    }
    eprintln!(
        "soak: {} chaos runs of {} epochs, {total_kills} kills, all bit-identical",
        plan.seeds.len(),
        plan.epochs
    );
}
