//! The regression task: what every task of the tree does in an epoch.
//!
//! * A **worker** (every task but 0) pulls the parameter from its parent, computes its shard's
//!   gradient (after `--compute-ms` of extra work), pulls its children's gradients, and answers
//!   its parent's pull with its own gradient plus its children's, added in task-id order.
//! * The **root** (task 0) pulls its children's gradients, updates the weights, replicates its
//!   state to its backups, checkpoints it, and moves the job to the next epoch; after the last
//!   epoch it ends the job with the results as the job's result.
//!
//! Each epoch's work is one async function started with [`Context::spawn`]; it pulls with
//! [`Context::request`], which the framework retries through failures and delivers exactly
//! once. Workers keep nothing across epochs (their shard is regenerated from the seed), so
//! a new primary simply redoes the epoch: the numbers are deterministic, and the serving side
//! answers a retried pull with the answer it already gave. The root's state (weights and
//! results) is replicated and checkpointed *before* the epoch moves, so a new root primary
//! knows whether the epoch's update is already applied and never applies it twice.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use backon::BackoffBuilder;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use taskgraph::{
    async_trait, Bytes, Checkpoint, Context, ContextError, DataRequest, Epoch, PullError, Task,
    TaskError, TaskId, Term,
};

use crate::workload::{Figure, Grad, Param, Shard, Workload};

const PARENTS: &str = taskgraph::Tree::PARENTS;
const CHILDREN: &str = taskgraph::Tree::CHILDREN;

/// What the job's result says, stored by the root with `shutdown_job_with` as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobResult {
    /// The workload's name.
    pub workload: String,
    /// The root's figure per epoch (`1..=epochs`): an integer for `sum`, the loss for `linreg`.
    pub per_epoch: Vec<serde_json::Value>,
    /// The learned weights (`linreg`), features first, then the bias.
    pub weights: Vec<f64>,
    /// The weights the data were generated from (`linreg`).
    pub true_weights: Vec<f64>,
    /// Set when the job could not go on (its nodes disagree about the workload, say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The root's state: replicated to its backups and checkpointed every epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct RootState {
    /// The first epoch whose update is not applied yet: the root in job epoch `e` has either
    /// `next == e` (collect the gradients) or `next == e + 1` (the update is applied; only
    /// moving the epoch on is left).
    next: Epoch,
    /// The weights for epoch `next`.
    weights: Vec<f64>,
    /// The parameter of epoch `next - 1`, still served while the job is in that epoch.
    served: Option<(Epoch, Param)>,
    /// The figure of every epoch applied so far.
    figures: Vec<Figure>,
}

/// The task values of one job (`TaskBuilder`): shared settings, one shard per task.
#[derive(Debug)]
pub struct RegressionTask {
    id: TaskId,
    workload: Arc<Workload>,
    compute: Duration,
    shard: Arc<Shard>,
    /// The root's state (unused on workers).
    state: Arc<Mutex<RootState>>,
    /// This epoch's values as they become known, for pulls that arrive before them.
    current: Option<EpochValues>,
}

#[derive(Debug)]
struct EpochValues {
    epoch: Epoch,
    param: watch::Receiver<Option<Param>>,
    total: watch::Receiver<Option<Grad>>,
}

impl RegressionTask {
    /// The task value for task `id`.
    pub fn new(id: TaskId, workload: Arc<Workload>, compute: Duration) -> Self {
        let state = RootState {
            next: 1,
            weights: workload.initial_weights(),
            served: None,
            figures: Vec::new(),
        };
        RegressionTask {
            id,
            shard: Arc::new(Shard::default()),
            workload,
            compute,
            state: Arc::new(Mutex::new(state)),
            current: None,
        }
    }
}

fn lock(state: &Mutex<RootState>) -> MutexGuard<'_, RootState> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

#[async_trait]
impl Task for RegressionTask {
    async fn init(&mut self, _ctx: &Context) -> Result<(), TaskError> {
        // Generated, not read: every node of the task builds the same shard from the seed.
        self.shard = Arc::new(self.workload.shard(self.id));
        Ok(())
    }

    async fn restore(&mut self, _ctx: &Context, checkpoint: Checkpoint) {
        match checkpoint.decode::<RootState>() {
            Ok(state) => *lock(&self.state) = state,
            Err(e) => tracing::error!(error = %e, "the root's checkpoint is unreadable"),
        }
    }

    async fn became_primary(&mut self, _ctx: &Context, term: Term) {
        tracing::info!(task = self.id, term, "primary");
    }

    async fn enter_epoch(&mut self, ctx: &Context, epoch: Epoch) {
        if self.id == 0 {
            let next = lock(&self.state).next;
            let work = Root {
                ctx: ctx.clone(),
                workload: self.workload.clone(),
                state: self.state.clone(),
                epoch,
            };
            if next == epoch + 1 {
                ctx.spawn(work.commit());
            } else if next == epoch {
                ctx.spawn(work.run());
            } else {
                ctx.spawn(work.fail(format!(
                    "the root's state is at epoch {next} but the job is at epoch {epoch}"
                )));
            }
            return;
        }
        if epoch == 0 || epoch > self.workload.epochs {
            return; // Epoch 0 only starts the job.
        }
        let (param_tx, param) = watch::channel(None);
        let (total_tx, total) = watch::channel(None);
        self.current = Some(EpochValues {
            epoch,
            param,
            total,
        });
        let work = Worker {
            ctx: ctx.clone(),
            id: self.id,
            workload: self.workload.clone(),
            shard: self.shard.clone(),
            compute: self.compute,
            epoch,
        };
        ctx.spawn(work.run(param_tx, total_tx));
    }

    async fn serve_data(&mut self, ctx: &Context, request: DataRequest) {
        match request.method() {
            "param" if self.id == 0 => {
                let state = lock(&self.state);
                let param = if state.next == request.epoch() {
                    Some(self.workload.param(&state.weights, state.next))
                } else {
                    state
                        .served
                        .as_ref()
                        .filter(|(e, _)| *e == request.epoch())
                        .map(|(_, p)| p.clone())
                };
                match param {
                    Some(p) => {
                        let _ = request.reply_with(&p);
                    }
                    // Dropped: the requester is told to retry; a new primary will answer.
                    None => tracing::error!(epoch = request.epoch(), "no parameter to serve"),
                }
            }
            "param" => self.answer_when_known(ctx, request, |v| v.param.clone()),
            "grad" => self.answer_when_known(ctx, request, |v| v.total.clone()),
            _ => request.unknown_method(),
        }
    }

    async fn apply_update(&mut self, ctx: &Context, update: Bytes) {
        // Every update is the whole (small) state: applying it is applying a snapshot.
        self.apply_snapshot(ctx, update).await;
    }

    fn snapshot(&self, _ctx: &Context) -> Bytes {
        taskgraph::encode(&*lock(&self.state)).unwrap_or_default()
    }

    async fn apply_snapshot(&mut self, _ctx: &Context, snapshot: Bytes) {
        match taskgraph::decode::<RootState>(&snapshot) {
            Ok(state) => *lock(&self.state) = state,
            Err(e) => tracing::error!(error = %e, "unreadable state from the primary"),
        }
    }
}

impl RegressionTask {
    /// Answers `request` with this epoch's value once it is known (from spawned work, so the
    /// event loop goes on meanwhile).
    fn answer_when_known<T>(
        &self,
        ctx: &Context,
        request: DataRequest,
        pick: impl FnOnce(&EpochValues) -> watch::Receiver<Option<T>>,
    ) where
        T: Serialize + Clone + Send + Sync + 'static,
    {
        let Some(values) = self.current.as_ref().filter(|v| v.epoch == request.epoch()) else {
            return; // Not an epoch this task computes: dropped, the requester retries.
        };
        let mut rx = pick(values);
        ctx.spawn(async move {
            let value = match rx.wait_for(Option::is_some).await {
                Ok(v) => v.clone(),
                Err(_) => return,
            };
            if let Some(v) = value {
                let _ = request.reply_with(&v);
            }
        });
    }
}

/// A worker's epoch.
struct Worker {
    ctx: Context,
    id: TaskId,
    workload: Arc<Workload>,
    shard: Arc<Shard>,
    compute: Duration,
    epoch: Epoch,
}

impl Worker {
    async fn run(
        self,
        param_tx: watch::Sender<Option<Param>>,
        total_tx: watch::Sender<Option<Grad>>,
    ) {
        let Some(&parent) = self.ctx.neighbours(PARENTS).first() else {
            tracing::error!(task = self.id, "a worker without a parent");
            return;
        };
        let Some(param) = pull::<Param>(&self.ctx, self.epoch, parent, "param").await else {
            return;
        };
        param_tx.send_replace(Some(param.clone()));
        let mut children = self.ctx.neighbours(CHILDREN);
        children.sort_unstable();
        let own = async {
            if !self.compute.is_zero() {
                tokio::time::sleep(self.compute).await; // Stands for real work.
            }
            self.workload.gradient(self.id, &self.shard, &param)
        };
        let theirs = futures::future::join_all(
            children
                .iter()
                .map(|&c| pull::<Grad>(&self.ctx, self.epoch, c, "grad")),
        );
        let (own, theirs) = tokio::join!(own, theirs);
        let mut total = match own {
            Ok(g) => g,
            Err(e) => return tracing::error!(task = self.id, error = %e, "cannot compute"),
        };
        for g in theirs {
            let Some(g) = g else { return };
            if let Err(e) = self.workload.combine(&mut total, &g) {
                return tracing::error!(task = self.id, error = %e, "cannot combine");
            }
        }
        total_tx.send_replace(Some(total));
    }
}

/// The root's epoch.
struct Root {
    ctx: Context,
    workload: Arc<Workload>,
    state: Arc<Mutex<RootState>>,
    epoch: Epoch,
}

impl Root {
    /// Collects the gradients, applies the update, replicates it, then commits the epoch.
    async fn run(self) {
        let mut children = self.ctx.neighbours(CHILDREN);
        children.sort_unstable();
        let grads = futures::future::join_all(
            children
                .iter()
                .map(|&c| pull::<Grad>(&self.ctx, self.epoch, c, "grad")),
        )
        .await;
        let mut total = self.workload.zero();
        for g in grads {
            let Some(g) = g else { return };
            if let Err(e) = self.workload.combine(&mut total, &g) {
                return self.fail(e.to_string()).await;
            }
        }
        let update = match self.apply(&total) {
            Ok(Some(u)) => u,
            Ok(None) => return,
            Err(e) => return self.fail(e).await,
        };
        // The backups hold the update before anything else happens: a backup promoted from
        // here on knows the epoch is applied.
        if persist("replicate", self.ctx.replicate(update))
            .await
            .is_none()
        {
            return;
        }
        self.commit().await;
    }

    /// Applies the epoch's update to the state; `None` if it already was.
    fn apply(&self, total: &Grad) -> Result<Option<Bytes>, String> {
        let mut state = lock(&self.state);
        if state.next != self.epoch {
            return Ok(None);
        }
        let param = self.workload.param(&state.weights, self.epoch);
        let mut weights = state.weights.clone();
        let figure = self
            .workload
            .update(&mut weights, total)
            .map_err(|e| e.to_string())?;
        state.weights = weights;
        state.figures.push(figure);
        state.served = Some((self.epoch, param));
        state.next = self.epoch + 1;
        taskgraph::encode(&*state)
            .map(Some)
            .map_err(|e| e.to_string())
    }

    /// With the epoch's update applied: checkpoint, then move to the next epoch or end the job.
    async fn commit(self) {
        let (bytes, result) = {
            let state = lock(&self.state);
            (taskgraph::encode(&*state), self.result(&state, None))
        };
        let bytes = match bytes {
            Ok(b) => b,
            Err(e) => return self.fail(e.to_string()).await,
        };
        // The checkpoint is what a spare restores if every node of the root dies: it must be in
        // etcd before the job moves on.
        if persist("checkpoint", self.ctx.checkpoint(bytes))
            .await
            .is_none()
        {
            return;
        }
        if self.epoch < self.workload.epochs {
            persist("move to the next epoch", self.ctx.inc_epoch(self.epoch)).await;
        } else {
            let result = serde_json::to_vec(&result).unwrap_or_default();
            if let Some(epoch) = persist("end the job", self.ctx.shutdown_job_with(result)).await {
                tracing::info!(epoch, "job finished");
            }
        }
    }

    /// Ends the job with an error as its result: better a clear failure than a stalled job.
    async fn fail(self, reason: String) {
        tracing::error!(epoch = self.epoch, reason, "the job cannot go on");
        let result = {
            let state = lock(&self.state);
            self.result(&state, Some(reason))
        };
        let result = serde_json::to_vec(&result).unwrap_or_default();
        persist("end the job", self.ctx.shutdown_job_with(result)).await;
    }

    fn result(&self, state: &RootState, error: Option<String>) -> JobResult {
        let linreg = self.workload.kind == crate::workload::WorkloadKind::Linreg;
        JobResult {
            workload: self.workload.kind.name().to_owned(),
            per_epoch: state.figures.iter().map(|f| f.to_json()).collect(),
            weights: if linreg {
                state.weights.clone()
            } else {
                Vec::new()
            },
            true_weights: if linreg {
                self.workload.true_weights()
            } else {
                Vec::new()
            },
            error,
        }
    }
}

fn backoff() -> impl Iterator<Item = Duration> {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(10))
        .with_max_delay(Duration::from_millis(500))
        .with_jitter()
        .without_max_times()
        .build()
}

/// Whether this node should keep trying on behalf of `epoch`.
fn still_mine(ctx: &Context, epoch: Epoch) -> bool {
    ctx.is_primary() && ctx.epoch() == epoch
}

/// Pulls `method` from task `to` in `epoch`; `None` when this node no longer works on that
/// epoch (it moved on, or another node took the task over — it carries on).
async fn pull<R: serde::de::DeserializeOwned>(
    ctx: &Context,
    epoch: Epoch,
    to: TaskId,
    method: &str,
) -> Option<R> {
    let mut delays = backoff();
    loop {
        match ctx.request::<(), R>(to, method, &()).await {
            Ok(v) => return Some(v),
            Err(PullError::EpochMoved(_)) => return None,
            // The lease is past its local deadline (etcd slow or away): wait for it to be
            // renewed, or for the slot to go.
            Err(PullError::NotPrimary { .. }) if still_mine(ctx, epoch) => {
                tokio::time::sleep(delays.next().unwrap_or(Duration::from_millis(500))).await;
            }
            Err(PullError::NotPrimary { .. }) => return None,
            Err(e) => {
                tracing::error!(to, method, error = %e, "pull failed");
                return None;
            }
        }
    }
}

/// Awaits an etcd-backed step. From spawned work the framework's verbs resolve only when
/// decided (they wait for the lease and retry etcd themselves), so there is nothing to retry
/// here: `None` when this node must leave it to the task's new primary (deposed, stopping) or
/// the step failed for good (logged).
async fn persist<T, Fut>(what: &str, step: Fut) -> Option<T>
where
    Fut: std::future::Future<Output = Result<T, ContextError>>,
{
    match step.await {
        Ok(v) => Some(v),
        Err(ContextError::NotPrimary { .. } | ContextError::Stopping) => None,
        Err(e) => {
            tracing::error!(what, error = %e, "giving up");
            None
        }
    }
}
