//! The local mode: one whole job on this machine with `taskgraph-launch` (each node a
//! separate process of this binary, optionally with a chaos monkey killing nodes); then a
//! summary, a report, and a verdict on the result.

use serde::Serialize;
use taskgraph_launch::{ErrorKind, Existing, LaunchError, LocalEtcd, LocalJob};

use crate::args::{JobArgs, LocalMode};
use crate::task::JobResult;
use crate::workload::WorkloadKind;

/// The JSON report of a local run (`--report`).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The job's name.
    pub job: String,
    /// `sum` or `linreg`.
    pub workload: String,
    /// Number of tasks.
    pub tasks: u32,
    /// Nodes per task.
    pub replicas: u32,
    /// Spare nodes.
    pub spares: u32,
    /// Epochs run.
    pub epochs: u64,
    /// The data set's seed.
    pub seed: u64,
    /// The root's figure per epoch: the integer for `sum`, the loss for `linreg`.
    pub per_epoch: Vec<serde_json::Value>,
    /// The learned weights (`linreg`; empty for `sum`).
    pub weights: Vec<f64>,
    /// The weights the data set was generated from (`linreg`).
    pub true_weights: Vec<f64>,
    /// Nodes killed by the chaos mode.
    pub kills: u64,
    /// Times a task got a new primary after its first one.
    pub failovers: u64,
    /// From launching the nodes to the job's end.
    pub elapsed_ms: u64,
    /// The chaos mode's interval and seed, when on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chaos: Option<Chaos>,
}

/// The chaos settings of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Chaos {
    /// Milliseconds between kills.
    pub kill_every_ms: u64,
    /// Seed of the victims' choice.
    pub seed: u64,
}

/// Why a local run did not succeed, with the process's exit code (see `regression --help`).
#[derive(Debug)]
pub struct Failure {
    /// 1: failed; 3: stalled and did not heal; 4: shut down before its last epoch.
    pub code: u8,
    /// One line (more for where the node logs are).
    pub message: String,
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Failure { code: 1, message }
    }
}

impl Failure {
    /// A launcher error, in the words of the regression's flags.
    fn launch(e: LaunchError, epochs: u64) -> Failure {
        let message = match e.kind() {
            ErrorKind::JobExists {
                job,
                existing: Existing::Finished(epoch),
            } => format!("job {job:?} already ran (it finished at epoch {epoch}); choose another --job"),
            ErrorKind::JobExists {
                job,
                existing: Existing::Running(epoch),
            } => format!("job {job:?} is already running (epoch {epoch}); choose another --job"),
            ErrorKind::JobExists {
                job,
                existing: Existing::Created,
            } => format!("job {job:?} already exists; choose another --job"),
            ErrorKind::ShutDown { job, epoch } => format!(
                "job {job} was shut down at epoch {epoch} (by `taskgraph shutdown` or `shutdown_job`) before its {epochs} epochs"
            ),
            kind => kind.to_string(),
        };
        let message = match e.node_logs() {
            Some(logs) => format!("{message}\nnode logs: {}", logs.display()),
            None => message,
        };
        Failure {
            code: e.exit_code(),
            message,
        }
    }
}

/// Runs the job; `Ok` only if it finished with a correct result.
pub async fn run(local: LocalMode, mut job: JobArgs) -> Result<Report, Failure> {
    let workload = job.workload()?;
    taskgraph::Tree::new(job.tasks, job.fanout).map_err(|e| e.to_string())?;
    let etcd = if job.etcd.is_empty() {
        let etcd = LocalEtcd::start()
            .await
            .map_err(|e| Failure::launch(e, job.epochs))?;
        job.etcd = etcd.endpoints();
        Some(etcd)
    } else {
        None
    };
    let outcome = run_on(&local, &mut job).await;
    if let Some(etcd) = etcd {
        etcd.stop().await;
    }
    let (report, result) = outcome?;
    check(&job, &workload, &result)?;
    Ok(report)
}

async fn run_on(local: &LocalMode, job: &mut JobArgs) -> Result<(Report, JobResult), Failure> {
    let name = job
        .job
        .get_or_insert_with(|| format!("regression-{:08x}", rand::random::<u32>()))
        .clone();
    // The spec the nodes create, so that a job of this name with another one is refused.
    let spec = crate::node::framework(job, &name)?
        .build()
        .map_err(|e| e.to_string())?
        .config()
        .spec();
    let run = LocalJob::new(&name, spec)
        .etcd(job.etcd.clone())
        .etcd_tls(job.security.etcd_tls())
        .etcd_auth(job.security.etcd_auth().map_err(|e| e.to_string())?)
        .arg("node")
        .args(job.to_flags())
        .node_args(|i| vec![format!("--node-name=node{i}"), "--stop-on-stdin-eof".into()])
        .epochs(job.epochs)
        // The root always ends the job with its result: an end without one is a shutdown.
        .expect_result(true);
    let mut outcome = local
        .run
        .apply(run)
        .run()
        .await
        .map_err(|e| Failure::launch(e, job.epochs))?;
    let bytes = outcome.result.clone().unwrap_or_default();
    let result = serde_json::from_slice::<JobResult>(&bytes).map_err(|e| Failure {
        code: 1,
        message: format!(
            "the job's result is not what the root writes: {e}\nnode logs: {}",
            outcome.keep_node_logs().display()
        ),
    })?;
    let report = Report {
        job: name,
        workload: job.workload.name().to_owned(),
        tasks: job.tasks,
        replicas: job.replicas,
        spares: local.run.spares,
        epochs: job.epochs,
        seed: job.seed,
        per_epoch: result.per_epoch.clone(),
        weights: result.weights.clone(),
        true_weights: result.true_weights.clone(),
        kills: outcome.kills,
        failovers: outcome.failovers,
        elapsed_ms: outcome.elapsed.as_millis() as u64,
        chaos: local.run.chaos_kill_every.map(|d| Chaos {
            kill_every_ms: d.as_millis() as u64,
            seed: local.run.chaos_seed,
        }),
    };
    Ok((report, result))
}

/// Checks the job's answer: `sum` must be exact, `linreg` must have learned.
fn check(job: &JobArgs, workload: &crate::workload::Workload, r: &JobResult) -> Result<(), String> {
    if let Some(e) = &r.error {
        return Err(format!("the job failed: {e}"));
    }
    if r.per_epoch.len() as u64 != job.epochs {
        return Err(format!(
            "the job reported {} epochs, expected {}",
            r.per_epoch.len(),
            job.epochs
        ));
    }
    match workload.kind {
        WorkloadKind::Sum => {
            let ids: u64 = (0..u64::from(job.tasks)).sum();
            for (i, v) in r.per_epoch.iter().enumerate() {
                let want = (i as u64 + 1) * ids;
                if v.as_u64() != Some(want) {
                    return Err(format!("epoch {}: the sum is {v}, expected {want}", i + 1));
                }
            }
        }
        WorkloadKind::Linreg => {
            let losses: Vec<f64> = r.per_epoch.iter().filter_map(|v| v.as_f64()).collect();
            let (Some(first), Some(last)) = (losses.first(), losses.last()) else {
                return Err("no losses reported".into());
            };
            if losses.len() != r.per_epoch.len() || losses.iter().any(|l| !l.is_finite()) {
                return Err(format!("a loss is not a number: {:?}", r.per_epoch));
            }
            if job.epochs > 1 && last >= first {
                return Err(format!(
                    "the loss did not fall: {first} at epoch 1, {last} at epoch {}",
                    job.epochs
                ));
            }
        }
    }
    Ok(())
}
