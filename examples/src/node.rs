//! `regression node`: one node of a job — the driver `main` of a taskgraph application.

use std::sync::Arc;
use std::time::Duration;

use taskgraph::{Framework, FrameworkBuilder, NodeExit, Task, TaskId, Tree};

use taskgraph_launch::NodeArgs;

use crate::args::JobArgs;
use crate::task::RegressionTask;

/// The framework configured for this job: the tree topology, the job's parameters, and a task
/// builder making one [`RegressionTask`] per task id.
pub fn framework(job: &JobArgs, job_name: &str) -> Result<FrameworkBuilder, String> {
    let workload = job.workload()?;
    let tree = Tree::new(job.tasks, job.fanout).map_err(|e| e.to_string())?;
    let compute = Duration::from_millis(job.compute_ms);
    let mut builder = Framework::builder()
        .etcd(job.etcd.clone())
        .job(job_name)
        .tasks(job.tasks)
        .replicas(job.replicas)
        .links(tree.links())
        .lease_ttl(job.lease_ttl);
    if let Some(after) = job.stall_after {
        builder = builder.stall_after(after);
    }
    for (name, value) in job.params() {
        builder = builder.param(name, value);
    }
    let builder = job.security.apply(builder).map_err(|e| e.to_string())?;
    let task_workload = Arc::clone(&workload);
    Ok(builder.task_builder(move |task: TaskId| {
        Box::new(RegressionTask::new(task, task_workload.clone(), compute)) as Box<dyn Task>
    }))
}

/// Runs one node until the job finishes or the process is told to stop.
pub async fn run(node: NodeArgs, job: JobArgs) -> Result<(), String> {
    if job.etcd.is_empty() {
        return Err("`regression node` needs --etcd (or TASKGRAPH_ETCD)".into());
    }
    let Some(job_name) = job.job.clone() else {
        return Err("`regression node` needs --job (or TASKGRAPH_JOB)".into());
    };
    let builder = node.apply(framework(&job, &job_name)?);
    let framework = builder.build().map_err(|e| e.to_string())?;
    let handle = framework.spawn().await.map_err(|e| e.to_string())?;
    let stop = async move {
        if node.stop_on_stdin_eof {
            tokio::select! {
                () = taskgraph_launch::stdin_closed() => tracing::info!("the launcher is gone; stopping"),
                () = stop_signal() => {}
            }
        } else {
            stop_signal().await;
        }
    };
    match handle.stop_on(stop).await.map_err(|e| e.to_string())? {
        NodeExit::JobFinished { epoch } => {
            tracing::info!(epoch, "the job finished");
            Ok(())
        }
        exit => {
            tracing::info!(?exit, "node stopped");
            Ok(())
        }
    }
}

async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
