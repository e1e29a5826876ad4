//! The application's side of the contract: [`Task`], [`TaskBuilder`], and the [`Context`]
//! a task uses to act on the job.

use std::future::Future;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use taskgraph_topology::Links;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::error::ContextError;
use crate::etcd::lease::LeaseState;
use crate::etcd::Store;
use crate::{Epoch, TaskId, Term};

/// An error a task handler reports. Returned from [`Task::init`], it stops the node.
pub type TaskError = Box<dyn std::error::Error + Send + Sync>;

/// Why a task's slot ended on this node (see [`Task::exit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExitReason {
    /// The job finished at this epoch (someone called [`Context::shutdown_job`]).
    JobFinished {
        /// The final epoch.
        epoch: Epoch,
    },
    /// The node is stopping cleanly (its lease is revoked right after).
    Stopped,
    /// The node lost its slot: its lease ended (etcd unreachable past the TTL, or the process
    /// was paused), or another node took the slot. The task value is dropped after this; the
    /// node rejoins the job as a spare.
    SlotLost,
}

/// One task of the application: a state machine driven by the framework's events.
///
/// All handlers of one node are called from one event loop, one at a time, never
/// concurrently. A handler must not block the loop: await only short operations (the
/// context's verbs); run long work with [`Context::spawn`] and act on its result from there.
///
/// Order of calls on a task value: [`init`](Task::init) once, then [`became_primary`](Task::became_primary)
/// or [`became_backup`](Task::became_backup) (a backup may later become primary), then, as
/// primary, [`enter_epoch`](Task::enter_epoch) once for every epoch it observes in increasing
/// order — first the job's current epoch right after `became_primary` — and finally
/// [`exit`](Task::exit). A task value is built afresh by the [`TaskBuilder`] whenever a node
/// takes a slot as a spare.
#[async_trait]
pub trait Task: Send + 'static {
    /// Called once after the task value is built, before any other handler. An error stops the
    /// node (it is considered a bug in the application or its environment).
    async fn init(&mut self, _ctx: &Context) -> Result<(), TaskError> {
        Ok(())
    }

    /// This node now acts as the task's primary, with fencing token `term`. Called once per
    /// term; `enter_epoch` follows with the job's current epoch.
    async fn became_primary(&mut self, _ctx: &Context, _term: Term) {}

    /// This node is now a hot-standby backup of the task.
    async fn became_backup(&mut self, _ctx: &Context) {}

    /// The primary enters `epoch`. Called once per epoch the primary observes, in increasing
    /// order (an epoch the primary never observed, because the job moved past it while this
    /// node was not primary, is skipped).
    async fn enter_epoch(&mut self, _ctx: &Context, _epoch: Epoch) {}

    /// The task's slot on this node ends. No other handler is called afterwards.
    async fn exit(&mut self, _ctx: &Context, _reason: ExitReason) {}
}

/// Builds the [`Task`] value for a task id. Called every time a node takes a slot (primary or
/// backup) of that task as a spare; must be cheap and must not do IO that can fail (do that in
/// [`Task::init`]).
pub trait TaskBuilder: Send + Sync + 'static {
    /// The task value for `task`.
    fn build(&self, task: TaskId) -> Box<dyn Task>;
}

impl<F> TaskBuilder for F
where
    F: Fn(TaskId) -> Box<dyn Task> + Send + Sync + 'static,
{
    fn build(&self, task: TaskId) -> Box<dyn Task> {
        self(task)
    }
}

/// This node's role in a task, as the context sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SlotState {
    /// `Some(term)` while primary.
    pub primary: Option<Term>,
    /// The epoch the task last entered (primary) or observed (backup).
    pub epoch: Epoch,
}

/// Requests from a task to its node's event loop.
#[derive(Debug)]
pub(crate) enum LoopRequest {
    /// Die now, without revoking the lease (as if the process were killed).
    Kill,
}

/// A task's handle on the framework: who it is, where the job is, and the verbs it may call.
/// Cheap to clone; clones may be moved into spawned work.
#[derive(Clone)]
pub struct Context {
    inner: Arc<Inner>,
}

struct Inner {
    task: TaskId,
    num_tasks: u32,
    links: Links,
    store: Store,
    lease: watch::Receiver<LeaseState>,
    slot: watch::Receiver<SlotState>,
    requests: mpsc::UnboundedSender<LoopRequest>,
    spawned: Mutex<JoinSet<()>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("task", &self.inner.task)
            .field("slot", &*self.inner.slot.borrow())
            .finish_non_exhaustive()
    }
}

impl Context {
    pub(crate) fn new(
        task: TaskId,
        num_tasks: u32,
        links: Links,
        store: Store,
        lease: watch::Receiver<LeaseState>,
        slot: watch::Receiver<SlotState>,
        requests: mpsc::UnboundedSender<LoopRequest>,
    ) -> Self {
        Context {
            inner: Arc::new(Inner {
                task,
                num_tasks,
                links,
                store,
                lease,
                slot,
                requests,
                spawned: Mutex::new(JoinSet::new()),
            }),
        }
    }

    /// This task's id.
    pub fn task(&self) -> TaskId {
        self.inner.task
    }

    /// Number of tasks in the job.
    pub fn num_tasks(&self) -> u32 {
        self.inner.num_tasks
    }

    /// The epoch this task is in: the last one it entered as primary, or observed as backup.
    pub fn epoch(&self) -> Epoch {
        self.inner.slot.borrow().epoch
    }

    /// This node's term as the task's primary, `None` when it is not (or no longer) acting as
    /// primary — also while its lease is past its local deadline.
    pub fn term(&self) -> Option<Term> {
        let term = self.inner.slot.borrow().primary?;
        self.inner.lease.borrow().valid_now().then_some(term)
    }

    /// Whether this node acts as the task's primary right now.
    pub fn is_primary(&self) -> bool {
        self.term().is_some()
    }

    /// The application's links.
    pub fn links(&self) -> &Links {
        &self.inner.links
    }

    /// This task's neighbours in `link` at its current epoch; empty for an unknown link.
    pub fn neighbours(&self, link: &str) -> Vec<TaskId> {
        self.inner
            .links
            .get(link)
            .map(|t| t.neighbours(self.inner.task, self.epoch()))
            .unwrap_or_default()
    }

    fn acting_term(&self) -> Result<Term, ContextError> {
        let slot = *self.inner.slot.borrow();
        match slot.primary {
            Some(term) if self.inner.lease.borrow().valid_now() => Ok(term),
            Some(_) => Err(ContextError::Suspended {
                task: self.inner.task,
            }),
            None => Err(ContextError::NotPrimary {
                task: self.inner.task,
                term: 0,
            }),
        }
    }

    /// Moves the job from epoch `from` to `from + 1` (compare-and-swap in etcd, fenced by this
    /// primary's term). Returns `Ok(false)` when the job is no longer at `from` — a stale call
    /// does nothing. Every primary then enters the new epoch.
    ///
    /// Errors: [`ContextError::NotPrimary`] (do nothing: the new primary carries on),
    /// [`ContextError::Suspended`] and [`ContextError::Etcd`] (back off and retry with the same
    /// `from`).
    pub async fn inc_epoch(&self, from: Epoch) -> Result<bool, ContextError> {
        let term = self.acting_term()?;
        let moved = self
            .inner
            .store
            .inc_epoch(self.inner.task, term as i64, from)
            .await?;
        if !moved {
            // A stale `from`, or the fence failed because this node was deposed meanwhile.
            self.acting_term()?;
        }
        Ok(moved)
    }

    /// Ends the job everywhere: marks it finished in etcd (fenced by this primary's term); every
    /// node then calls [`Task::exit`], revokes its lease and stops. Returns the final epoch.
    pub async fn shutdown_job(&self) -> Result<Epoch, ContextError> {
        let term = self.acting_term()?;
        match self
            .inner
            .store
            .finish(self.inner.task, term as i64)
            .await?
        {
            Some(epoch) => Ok(epoch),
            None => Err(ContextError::NotPrimary {
                task: self.inner.task,
                term,
            }),
        }
    }

    /// Kills this node as if its process died: no handler runs any more, and the lease is
    /// *not* revoked, so other nodes notice only when it expires. For failure drills and tests.
    pub fn kill(&self) {
        let _ = self.inner.requests.send(LoopRequest::Kill);
    }

    /// Runs `work` in the background, owned by this task's slot: it is aborted when the slot
    /// ends on this node (exit, slot lost, node stopped or killed).
    pub fn spawn<F>(&self, work: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        if let Ok(mut set) = self.inner.spawned.lock() {
            // Reap finished work so the set does not grow without bound.
            while set.try_join_next().is_some() {}
            set.spawn(work);
        }
    }

    /// Aborts every piece of spawned work.
    pub(crate) fn abort_spawned(&self) {
        if let Ok(mut set) = self.inner.spawned.lock() {
            set.abort_all();
        }
    }
}
