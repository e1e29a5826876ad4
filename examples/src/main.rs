//! The regression example of taskgraph. See `regression --help`, and the README.
//!
//! * `regression [flags]` runs a whole job locally (private etcd, one process per node,
//!   progress bar, summary, optional chaos and JSON report).
//! * `regression node [flags]` runs one node of a job against an existing etcd.

mod args;
mod launcher;
mod node;
mod task;
mod workload;

use std::process::ExitCode;

use clap::Parser;

use args::{Cli, Command};
use taskgraph_launch::{init_logs, LogFormat};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = match cli.command {
        Some(Command::Node { node, job }) => {
            init_logs(node.log_format, "info");
            runtime
                .block_on(node::run(node, job))
                .map_err(launcher::Failure::from)
        }
        None => {
            init_logs(LogFormat::Text, "warn");
            runtime.block_on(local(cli.local, cli.job))
        }
    };
    // Node processes and etcd are children with kill-on-drop: do not wait for stray work.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", e.message);
            ExitCode::from(e.code)
        }
    }
}

async fn local(local: args::LocalMode, job: args::JobArgs) -> Result<(), launcher::Failure> {
    let report_path = local.report.clone();
    let report = launcher::run(local, job).await?;
    print_summary(&report);
    if let Some(path) = report_path {
        let json = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(&path, json + "\n")
            .map_err(|e| format!("cannot write the report to {}: {e}", path.display()))?;
        println!("report: {}", path.display());
    }
    Ok(())
}

fn print_summary(r: &launcher::Report) {
    println!(
        "job {} finished: {} epochs of {} over {} tasks × {} replicas (+{} spare) in {:.1} s; {} nodes killed, {} failovers",
        r.job,
        r.epochs,
        r.workload,
        r.tasks,
        r.replicas,
        r.spares,
        r.elapsed_ms as f64 / 1000.0,
        r.kills,
        r.failovers
    );
    let first = r
        .per_epoch
        .first()
        .map(ToString::to_string)
        .unwrap_or_default();
    let last = r
        .per_epoch
        .last()
        .map(ToString::to_string)
        .unwrap_or_default();
    match r.workload.as_str() {
        "sum" => println!(
            "sums: epoch 1 = {first}, epoch {} = {last} (all exact)",
            r.epochs
        ),
        _ => {
            println!("loss: epoch 1 = {first}, epoch {} = {last}", r.epochs);
            let error = r
                .weights
                .iter()
                .zip(&r.true_weights)
                .map(|(w, t)| (w - t).abs())
                .fold(0.0, f64::max);
            println!("weights: largest distance from the true weights {error:.2e}");
        }
    }
}
