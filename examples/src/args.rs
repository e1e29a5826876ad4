//! Command-line flags (each also read from a `TASKGRAPH_*` environment variable).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use taskgraph_launch::{NodeArgs, SecurityArgs};

use crate::workload::{Workload, WorkloadKind};

/// The regression example of taskgraph: a tree of tasks trains a linear regression (or sums
/// integers) epoch by epoch, and finishes with the same answer whatever fails on the way.
///
/// Without a subcommand it runs a whole job on this machine: it starts a private etcd (unless
/// `--etcd` is given), launches every node as a separate process, shows the job's progress,
/// prints a summary, stops everything it started, and exits 0 only if the job finished
/// correctly.
#[derive(Debug, Parser)]
#[command(
    name = "regression",
    version,
    args_conflicts_with_subcommands = true,
    after_help = "Exit codes of the local mode: 0 the job finished with the right answer; \
                  1 it failed (a wrong answer, a node that failed, the --timeout); 2 bad flags; \
                  3 the job stalled and did not heal (the error names the key or task); \
                  4 the job was shut down by an operator (`taskgraph shutdown`) or a task's \
                  `shutdown_job` before its last epoch."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub local: LocalMode,
    #[command(flatten)]
    pub job: JobArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Runs one node of a job against an existing etcd (what each Kubernetes pod runs).
    Node {
        #[command(flatten)]
        node: NodeArgs,
        #[command(flatten)]
        job: JobArgs,
    },
}

/// What the job computes and how it is laid out; every node of a job must get the same values
/// (they are stored with the job, and a node with different ones is refused).
#[derive(Debug, Clone, Args)]
pub struct JobArgs {
    /// The computation: `linreg` (linear regression by gradient descent) or `sum`.
    #[arg(long, value_enum, default_value = "linreg", env = "TASKGRAPH_WORKLOAD")]
    pub workload: WorkloadKind,
    /// Number of tasks in the tree (task 0 is the root).
    #[arg(long, default_value_t = 15, env = "TASKGRAPH_TASKS",
          value_parser = clap::value_parser!(u32).range(1..=(taskgraph::MAX_TASKS as i64)))]
    pub tasks: u32,
    /// Children per task in the tree.
    #[arg(long, default_value_t = 2, env = "TASKGRAPH_FANOUT",
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub fanout: u32,
    /// Nodes per task: one primary plus hot-standby backups.
    #[arg(long, default_value_t = 2, env = "TASKGRAPH_REPLICAS",
          value_parser = clap::value_parser!(u32).range(1..=(taskgraph::MAX_REPLICAS as i64)))]
    pub replicas: u32,
    /// Number of epochs to run (the job runs epochs 1 to N).
    #[arg(long, default_value_t = 30, env = "TASKGRAPH_EPOCHS",
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub epochs: u64,
    /// Seed of the synthetic data set (linreg).
    #[arg(long, default_value_t = 1, env = "TASKGRAPH_SEED")]
    pub seed: u64,
    /// Input features of the data set (linreg).
    #[arg(long, default_value_t = 8, env = "TASKGRAPH_FEATURES",
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub features: u32,
    /// Samples per worker task (linreg).
    #[arg(long, default_value_t = 1000, env = "TASKGRAPH_SAMPLES",
          value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub samples: u32,
    /// Gradient-descent step size (linreg).
    #[arg(long, default_value_t = 0.5, env = "TASKGRAPH_LEARNING_RATE", value_parser = positive_f64)]
    pub learning_rate: f64,
    /// Extra work per task and epoch, in milliseconds (so failures can land mid-epoch).
    #[arg(long, default_value_t = 0, env = "TASKGRAPH_COMPUTE_MS",
          value_parser = clap::value_parser!(u64).range(0..=3_600_000))]
    pub compute_ms: u64,
    /// Lease TTL of each node in etcd, whole seconds (e.g. `2s`): a crashed primary with no
    /// live backup is replaced within it.
    #[arg(long, default_value = "2s", env = "TASKGRAPH_LEASE_TTL", value_parser = whole_seconds)]
    pub lease_ttl: Duration,
    /// After how long without a new epoch a node reports the job as stalled, with what it can
    /// tell about why (e.g. `30s`; default: three lease TTLs plus three times the slowest epoch
    /// seen). The local launcher prints the reports, and gives up with exit code 3 when the
    /// job stays stalled past `--stall-limit`.
    #[arg(long, env = "TASKGRAPH_STALL_AFTER", value_parser = whole_seconds)]
    pub stall_after: Option<Duration>,
    /// etcd endpoints (repeat the flag or separate with commas). The local mode starts a
    /// private etcd when none is given.
    #[arg(long, env = "TASKGRAPH_ETCD", value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// The job's name: 1 to 63 characters of a-z, 0-9, '-', '_', '.'. The local mode picks a
    /// fresh one when none is given.
    #[arg(long, env = "TASKGRAPH_JOB")]
    pub job: Option<String>,
    /// TLS and etcd authentication (the local mode passes them on to its nodes).
    #[command(flatten)]
    pub security: SecurityArgs,
}

/// Flags of the local mode: the launcher's (`taskgraph_launch::LocalArgs`) and the report.
#[derive(Debug, Clone, Args)]
pub struct LocalMode {
    #[command(flatten)]
    pub run: taskgraph_launch::LocalArgs,
    /// Write a JSON report of the run to this file.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

fn positive_f64(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
        _ => Err(format!("expected a positive number, got {s:?}")),
    }
}

fn whole_seconds(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))?;
    if d < Duration::from_secs(1) || d.subsec_nanos() != 0 {
        return Err(format!("{s:?}: use a whole number of seconds, at least 1s"));
    }
    Ok(d)
}

impl JobArgs {
    /// The workload these flags describe.
    pub fn workload(&self) -> Result<Arc<Workload>, String> {
        if self.workload == WorkloadKind::Linreg && self.tasks < 2 {
            return Err(
                "linreg needs at least 2 tasks: the root holds the weights, the others the data"
                    .into(),
            );
        }
        Ok(Arc::new(Workload {
            kind: self.workload,
            tasks: self.tasks,
            epochs: self.epochs,
            seed: self.seed,
            features: self.features as usize,
            samples: self.samples as usize,
            learning_rate: self.learning_rate,
        }))
    }

    /// The job parameters stored with the spec: nodes started with other values are refused.
    pub fn params(&self) -> Vec<(&'static str, String)> {
        vec![
            ("workload", self.workload.name().to_owned()),
            ("epochs", self.epochs.to_string()),
            ("seed", self.seed.to_string()),
            ("features", self.features.to_string()),
            ("samples", self.samples.to_string()),
            ("learning-rate", self.learning_rate.to_string()),
            ("compute-ms", self.compute_ms.to_string()),
        ]
    }

    /// The flags that reproduce these values, for the nodes the local mode launches.
    pub fn to_flags(&self) -> Vec<String> {
        let mut v = vec![
            format!("--workload={}", self.workload.name()),
            format!("--tasks={}", self.tasks),
            format!("--fanout={}", self.fanout),
            format!("--replicas={}", self.replicas),
            format!("--epochs={}", self.epochs),
            format!("--seed={}", self.seed),
            format!("--features={}", self.features),
            format!("--samples={}", self.samples),
            format!("--learning-rate={}", self.learning_rate),
            format!("--compute-ms={}", self.compute_ms),
            format!("--lease-ttl={}s", self.lease_ttl.as_secs()),
        ];
        if let Some(after) = self.stall_after {
            v.push(format!("--stall-after={}s", after.as_secs()));
        }
        if !self.etcd.is_empty() {
            v.push(format!("--etcd={}", self.etcd.join(",")));
        }
        if let Some(job) = &self.job {
            v.push(format!("--job={job}"));
        }
        v.extend(self.security.to_flags());
        v
    }
}
