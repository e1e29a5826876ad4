//! The application's side of the contract: [`Task`], [`TaskBuilder`], and the [`Context`]
//! a task uses to act on the job.

use std::any::Any;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use taskgraph_topology::Links;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;

pub use crate::role::ExitReason;
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::data::{encode, Checkpoint, DataReply, DataRequest, PullError, PullId};
use crate::error::ContextError;
use crate::etcd::keys::EpochValue;
use crate::exchange::replication::{ship, Replicator, Shipped};
use crate::exchange::{lock, EpochBook, PendingPull, SlotEnv};
use crate::inbox::LoopRequest;
use crate::roles::{EpochFaultKind, Member};
use crate::wire::ReplicateKind;
use crate::work::{WorkDone, WorkId};
use crate::{Epoch, TaskId, Term};

/// An error a task handler reports. Returned from [`Task::init`], it stops the node.
pub type TaskError = Box<dyn std::error::Error + Send + Sync>;

/// One task of the application: a state machine driven by the framework's events.
///
/// All handlers of one node are called from one event loop, one at a time, never
/// concurrently. A handler must not block the loop: await only short operations (the
/// context's verbs); run long work with [`Context::spawn_then`] (its output comes back to
/// [`work_done`](Task::work_done) in the same epoch) or [`Context::spawn`] (fire and forget).
///
/// Order of calls on a task value: [`init`](Task::init) once; [`restore`](Task::restore) if the
/// value was built to take over as primary and the task has a checkpoint; then
/// [`became_primary`](Task::became_primary) or [`became_backup`](Task::became_backup) (a backup
/// gets [`apply_snapshot`](Task::apply_snapshot) and [`apply_update`](Task::apply_update)s, and
/// may later become primary); then, as primary, [`enter_epoch`](Task::enter_epoch) once for
/// every epoch it observes in increasing order — first the job's current epoch right after
/// `became_primary` — with [`serve_data`](Task::serve_data), [`data_ready`](Task::data_ready),
/// [`meta_ready`](Task::meta_ready), [`work_done`](Task::work_done), [`timer`](Task::timer)
/// and the neighbour events of that epoch in between; and finally [`exit`](Task::exit). A task
/// value is built afresh by the [`TaskBuilder`] whenever a node takes a slot as a spare.
///
/// The job's first epoch is `0`: a new job's primaries first enter epoch 0, and every
/// [`Context::inc_epoch`] moves it by one.
///
/// Between `enter_epoch(e)` and the next `enter_epoch`, the handlers of epoch `e` come in the
/// order their events reach the node's loop; there is no order among different kinds (a
/// `data_ready` may come before or after a `meta_ready` of the same epoch). Nothing started in
/// epoch `e` — pulls, metas, [`Context::spawn_then`] work, [`Context::after`] timers — is
/// delivered in another epoch.
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

    /// The primary enters `epoch`. Called once per epoch *and term* the primary observes, in
    /// increasing order: first the job's current epoch, then every epoch the job moves through
    /// while the node follows it. An epoch the primary never observed is skipped: one the job
    /// moved past while this node was not primary, or while it had lost etcd's history (a
    /// partition longer than etcd keeps its history).
    ///
    /// **A new primary enters the job's current epoch again.** A promoted backup's state may
    /// already hold what the old primary [`replicate`](Context::replicate)d during that epoch
    /// (and a value restored from a checkpoint what was checkpointed in it), so the epoch's
    /// step must be idempotent: keep in the task's state which epoch it last applied (e.g.
    /// `if self.applied < epoch { … self.applied = epoch; }`, with `applied` replicated), rather
    /// than counting calls.
    async fn enter_epoch(&mut self, _ctx: &Context, _epoch: Epoch) {}

    /// A task value built afresh to take over as primary gets the task's last checkpoint
    /// (see [`Context::checkpoint`]) here, after [`init`](Task::init) and before
    /// [`became_primary`](Task::became_primary). Not called when there is no checkpoint, nor on
    /// a promoted backup (it has the primary's replicated state instead).
    async fn restore(&mut self, _ctx: &Context, _checkpoint: Checkpoint) {}

    /// Answers a pull from another task (or this one). Called at most once per request on a
    /// given primary, only while this node is the task's acting primary and in the request's
    /// epoch; retries of the request get the same answer without calling it again. Answer with
    /// [`DataRequest::reply`] now or later (keep the request until the data is there). The
    /// default refuses every method.
    async fn serve_data(&mut self, _ctx: &Context, request: DataRequest) {
        request.unknown_method();
    }

    /// The answer to a [`Context::data_request`] of this task: called exactly once per request,
    /// while the task is still in the request's epoch (requests of an epoch the task has left
    /// are cancelled and never answered).
    async fn data_ready(&mut self, _ctx: &Context, _reply: DataReply) {}

    /// A neighbour flagged `meta` on `link` (the link as the *sender* named it) in this task's
    /// current epoch. Called once per (sender, link, meta, epoch), however often the sender
    /// flags it and whatever fails in between.
    async fn meta_ready(&mut self, _ctx: &Context, _from: TaskId, _link: &str, _meta: &str) {}

    /// `neighbour`, a neighbour of this task in `link` at the current epoch, lost its primary.
    /// Called once per incident (and per link the neighbour is in), always before the matching
    /// [`neighbour_restarted`](Task::neighbour_restarted). Pulls to it keep being retried.
    async fn neighbour_failed(&mut self, _ctx: &Context, _link: &str, _neighbour: TaskId) {}

    /// A new primary serves `neighbour` (after [`neighbour_failed`](Task::neighbour_failed)).
    /// It starts at the job's current epoch with its backup's replicated state or its last
    /// checkpoint.
    async fn neighbour_restarted(&mut self, _ctx: &Context, _link: &str, _neighbour: TaskId) {}

    /// The output of work started with [`Context::spawn_then`] in this task's current epoch:
    /// called exactly once per piece of work that completes while the task is still in the
    /// epoch it was started in, on the node that started it. Work of an epoch the task has left,
    /// or of a slot that ended, is aborted and never delivered. Get the value back with
    /// [`WorkDone::take`]. The default drops it.
    async fn work_done(&mut self, _ctx: &Context, _done: WorkDone) {}

    /// A timer set with [`Context::after`] in this task's current epoch fired: called exactly
    /// once per timer, with its `token`, if the task is still in the epoch the timer was set
    /// in; timers of an epoch the task has left, or of a slot that ended, never fire.
    async fn timer(&mut self, _ctx: &Context, _token: u64) {}

    /// As a backup: apply an update the primary shipped with [`Context::replicate`]. Updates
    /// arrive once each, in the order the primary replicated them, after a snapshot.
    async fn apply_update(&mut self, _ctx: &Context, _update: Bytes) {}

    /// As primary: the task's whole replicated state, shipped to a backup that joins (or to
    /// every backup after a failover) before any further update. The default is empty.
    fn snapshot(&self, _ctx: &Context) -> Bytes {
        Bytes::new()
    }

    /// As a backup: replace the task's state by a primary's [`snapshot`](Task::snapshot).
    async fn apply_snapshot(&mut self, _ctx: &Context, _snapshot: Bytes) {}

    /// The task's slot on this node ends. No other handler is called afterwards.
    async fn exit(&mut self, _ctx: &Context, _reason: ExitReason) {}
}

/// Builds the [`Task`] value for a task id. Called every time a node takes a slot (primary or
/// backup) of that task as a spare; must be cheap and must not do IO that can fail (do that in
/// [`Task::init`]).
///
/// Any `Fn(TaskId) -> T` closure is a task builder, for any [`Task`] type `T` — a concrete
/// one (`|id| MyTask::new(id)`) or a `Box<dyn Task>` (to pick a task type per id).
pub trait TaskBuilder: Send + Sync + 'static {
    /// The task value for `task`.
    fn build(&self, task: TaskId) -> Box<dyn Task>;
}

impl<F, T> TaskBuilder for F
where
    F: Fn(TaskId) -> T + Send + Sync + 'static,
    T: Task,
{
    fn build(&self, task: TaskId) -> Box<dyn Task> {
        Box::new(self(task))
    }
}

/// A boxed task is a task: every handler is the boxed value's.
#[async_trait]
impl Task for Box<dyn Task> {
    async fn init(&mut self, ctx: &Context) -> Result<(), TaskError> {
        (**self).init(ctx).await
    }
    async fn became_primary(&mut self, ctx: &Context, term: Term) {
        (**self).became_primary(ctx, term).await
    }
    async fn became_backup(&mut self, ctx: &Context) {
        (**self).became_backup(ctx).await
    }
    async fn enter_epoch(&mut self, ctx: &Context, epoch: Epoch) {
        (**self).enter_epoch(ctx, epoch).await
    }
    async fn restore(&mut self, ctx: &Context, checkpoint: Checkpoint) {
        (**self).restore(ctx, checkpoint).await
    }
    async fn serve_data(&mut self, ctx: &Context, request: DataRequest) {
        (**self).serve_data(ctx, request).await
    }
    async fn data_ready(&mut self, ctx: &Context, reply: DataReply) {
        (**self).data_ready(ctx, reply).await
    }
    async fn meta_ready(&mut self, ctx: &Context, from: TaskId, link: &str, meta: &str) {
        (**self).meta_ready(ctx, from, link, meta).await
    }
    async fn neighbour_failed(&mut self, ctx: &Context, link: &str, neighbour: TaskId) {
        (**self).neighbour_failed(ctx, link, neighbour).await
    }
    async fn neighbour_restarted(&mut self, ctx: &Context, link: &str, neighbour: TaskId) {
        (**self).neighbour_restarted(ctx, link, neighbour).await
    }
    async fn work_done(&mut self, ctx: &Context, done: WorkDone) {
        (**self).work_done(ctx, done).await
    }
    async fn timer(&mut self, ctx: &Context, token: u64) {
        (**self).timer(ctx, token).await
    }
    async fn apply_update(&mut self, ctx: &Context, update: Bytes) {
        (**self).apply_update(ctx, update).await
    }
    fn snapshot(&self, ctx: &Context) -> Bytes {
        (**self).snapshot(ctx)
    }
    async fn apply_snapshot(&mut self, ctx: &Context, snapshot: Bytes) {
        (**self).apply_snapshot(ctx, snapshot).await
    }
    async fn exit(&mut self, ctx: &Context, reason: ExitReason) {
        (**self).exit(ctx, reason).await
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

/// A task's handle on the framework: who it is, where the job is, and the verbs it may call.
/// Cheap to clone; clones may be moved into spawned work.
///
/// # Verbs that write to etcd resolve when decided
///
/// [`replicate`](Context::replicate), [`inc_epoch`](Context::inc_epoch),
/// [`shutdown_job`](Context::shutdown_job), [`shutdown_job_with`](Context::shutdown_job_with)
/// and [`checkpoint`](Context::checkpoint) never ask the caller to try again later. While this
/// node's lease is past its local deadline (etcd slow or unreachable, the process was paused)
/// they wait for the lease keeper's verdict: renewed, and they go on; lost (etcd says the lease
/// expired, a newer primary, the node is stopping), and they end with
/// [`ContextError::NotPrimary`] — do nothing then: the new primary carries on. The keeper runs
/// beside the event loop, so this holds in a handler as in spawned work; a handler that waits
/// holds the node's event loop, and `/healthz` reports it as waiting for etcd.
///
/// `Ok` from any of them means done *and* this node still the task's acting primary when it
/// returned: an answer that arrives after the lease lapsed (the process was paused while etcd
/// answered) waits for the verdict too, and ends in `NotPrimary` if the slot is gone — the
/// fenced write took effect, but a deposed caller must not act on it.
///
/// Called from work spawned with [`spawn`](Context::spawn) or
/// [`spawn_then`](Context::spawn_then), the etcd writers also send a request etcd did not
/// answer again, for as long as this node holds the slot under the same term, so they end
/// with the outcome or `NotPrimary`. Each is fenced by the primary's term in etcd and safe to
/// repeat, so a spawned `inc_epoch` whose result is ignored is correct. Awaited directly in a
/// handler they make one request, and may also return [`ContextError::Etcd`]: the event loop
/// must not retry a request etcd refuses (it answers other nodes meanwhile) — spawn them when
/// the outcome matters. `replicate` talks to backups, not etcd, and resolves in both places.
#[derive(Clone)]
pub struct Context {
    inner: Arc<Inner>,
}

struct Inner {
    env: Arc<SlotEnv>,
    links: Links,
    slot: watch::Receiver<SlotState>,
    book: Arc<Mutex<EpochBook>>,
    replicator: tokio::sync::Mutex<Replicator>,
    spawned: Mutex<JoinSet<()>>,
    /// Undeclared links asked for (warned about once each).
    unknown_links: Mutex<std::collections::HashSet<String>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("task", &self.inner.env.task)
            .field("slot", &*self.inner.slot.borrow())
            .finish_non_exhaustive()
    }
}

impl Context {
    pub(crate) fn new(env: Arc<SlotEnv>, links: Links, slot: watch::Receiver<SlotState>) -> Self {
        Context {
            inner: Arc::new(Inner {
                env,
                links,
                slot,
                book: Arc::default(),
                replicator: tokio::sync::Mutex::default(),
                spawned: Mutex::new(JoinSet::new()),
                unknown_links: Mutex::default(),
            }),
        }
    }

    pub(crate) fn env(&self) -> &Arc<SlotEnv> {
        &self.inner.env
    }

    pub(crate) fn replicator(&self) -> &tokio::sync::Mutex<Replicator> {
        &self.inner.replicator
    }

    /// This task's id.
    pub fn task(&self) -> TaskId {
        self.inner.env.task
    }

    /// Number of tasks in the job.
    pub fn num_tasks(&self) -> u32 {
        self.inner.env.num_tasks
    }

    /// The epoch this task is in: the last one it entered as primary, or observed as backup.
    pub fn epoch(&self) -> Epoch {
        self.inner.slot.borrow().epoch
    }

    /// This node's term as the task's primary, `None` when it is not (or no longer) acting as
    /// primary — also while its lease is past its local deadline.
    pub fn term(&self) -> Option<Term> {
        let term = self.inner.slot.borrow().primary?;
        self.inner.env.lease.borrow().valid_now().then_some(term)
    }

    /// Whether this node acts as the task's primary right now.
    pub fn is_primary(&self) -> bool {
        self.term().is_some()
    }

    /// The application's links.
    pub fn links(&self) -> &Links {
        &self.inner.links
    }

    /// This task's neighbours in `link` at its current epoch. A link the application did not
    /// declare has none: it is logged as a warning (once per link name and slot), since it is
    /// almost always a typo; use [`try_neighbours`](Context::try_neighbours) to get an error
    /// instead. (An empty list is also a legitimate answer of a declared link — a leaf's
    /// children — so it cannot tell the two apart.)
    pub fn neighbours(&self, link: &str) -> Vec<TaskId> {
        self.try_neighbours(link).unwrap_or_else(|_| {
            let first = lock(&self.inner.unknown_links).insert(link.to_owned());
            if first {
                tracing::warn!(
                    link,
                    declared = ?self.inner.links.iter().map(|(name, _)| name).collect::<Vec<_>>(),
                    "neighbours of a link the application did not declare: none"
                );
            }
            Vec::new()
        })
    }

    /// This task's neighbours in `link` at its current epoch, or
    /// [`ContextError::UnknownLink`] for a link the application did not declare.
    pub fn try_neighbours(&self, link: &str) -> Result<Vec<TaskId>, ContextError> {
        match self.inner.links.get(link) {
            Some(t) => Ok(t.neighbours(self.inner.env.task, self.epoch())),
            None => Err(ContextError::UnknownLink {
                link: link.to_owned(),
            }),
        }
    }

    /// The term of this slot's election, whether or not the lease is confirmed right now (for
    /// work that waits for the confirmation before it leaves the node: pulls and metas).
    fn elected_term(&self) -> Result<Term, ContextError> {
        match self.inner.slot.borrow().primary {
            Some(term) => Ok(term),
            None => Err(ContextError::NotPrimary {
                task: self.inner.env.task,
                term: 0,
            }),
        }
    }

    fn acting_term(&self) -> Result<Term, ContextError> {
        let slot = *self.inner.slot.borrow();
        match slot.primary {
            Some(term) if self.inner.env.lease.borrow().valid_now() => Ok(term),
            Some(_) => Err(ContextError::Suspended {
                task: self.inner.env.task,
            }),
            None => Err(ContextError::NotPrimary {
                task: self.inner.env.task,
                term: 0,
            }),
        }
    }

    /// Moves the job from epoch `from` to `from + 1` (compare-and-swap in etcd, fenced by this
    /// primary's term). Returns `Ok(false)` when the job is no longer at `from` — a stale call
    /// does nothing. Every primary then enters the new epoch.
    ///
    /// When the `epoch` key holds a value the framework did not write (garbage, a deleted key,
    /// an epoch lower than `from`, or one further ahead than any primary entered — an
    /// operator's typo, a restored backup), and `from` is the epoch this primary is in, the
    /// call heals the key: it writes `from + 1` over the bad value (guarded by the bad value's
    /// revision and fenced by this primary's term), logs it at error level and returns
    /// `Ok(true)`. A job never stalls because one value in etcd went bad.
    ///
    /// From spawned work the call resolves only when decided (see [the verbs that write to
    /// etcd](Context#verbs-that-write-to-etcd-resolve-when-decided)): `Ok(true)` moved,
    /// `Ok(false)` stale (also when an earlier attempt whose answer etcd lost had moved it),
    /// [`ContextError::NotPrimary`] when this node lost the slot meanwhile (do nothing: the new
    /// primary carries on); spawned, its result may be ignored. Awaited in a handler it waits
    /// for the lease too but makes one request, and may also return [`ContextError::Etcd`].
    pub async fn inc_epoch(&self, from: Epoch) -> Result<bool, ContextError> {
        self.until_decided(|| self.try_inc_epoch(from)).await
    }

    /// Runs an etcd-backed verb until it is decided. While this node's lease is past its
    /// local deadline (etcd slow or unreachable) it waits for the renewal ([`confirmed`]), and
    /// from spawned work an etcd error is tried again after a backoff, for as long as this node
    /// holds the slot under the same term. If the node loses the slot meanwhile (its lease
    /// expired, a newer primary), the verb ends with [`ContextError::NotPrimary`].
    ///
    /// [`confirmed`]: Context::confirmed
    async fn until_decided<T, F, Fut>(&self, mut op: F) -> Result<T, ContextError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, ContextError>>,
    {
        let term = self.elected_term()?;
        let mut delays = crate::retry::PEER.delays();
        loop {
            match op().await {
                Err(ContextError::Suspended { .. }) => self.confirmed(term).await?,
                // Awaited by a handler, an etcd error is reported: the handler runs in the
                // node's event loop, which must not retry a request etcd refuses (it answers
                // other nodes meanwhile).
                Err(ContextError::Etcd(e)) if !self.on_loop() => {
                    if self.inner.slot.borrow().primary != Some(term) {
                        return Err(ContextError::NotPrimary {
                            task: self.inner.env.task,
                            term,
                        });
                    }
                    tracing::warn!(error = %e, "etcd did not decide; trying again");
                    let pause = delays
                        .next()
                        .unwrap_or(std::time::Duration::from_millis(500));
                    tokio::time::sleep(pause).await;
                }
                // Done, and the caller will act on it: only while this node still acts as the
                // task's primary. An answer that arrives after the lease lapsed (the process
                // was paused while etcd answered) waits for the lease's verdict: the write was
                // fenced and took effect, but a deposed caller must not act on it.
                Ok(v) => {
                    self.confirmed(term).await?;
                    return Ok(v);
                }
                other => return other,
            }
        }
    }

    /// Whether the caller runs in the node's event loop (a handler) rather than in spawned work.
    fn on_loop(&self) -> bool {
        crate::inbox::in_handler()
    }

    /// Waits until this node's lease is confirmed for `term`: returns at once while the lease
    /// is within its local deadline, else waits for the keeper's renewal. Ends with
    /// [`ContextError::NotPrimary`] when the slot is lost instead: etcd reports the lease
    /// expired, a new lease replaced it, the slot moved on, or the node is stopping.
    ///
    /// Nothing else can decide it, so a handler waits here too: the lease keeper runs beside
    /// the event loop and learns either outcome as soon as etcd answers (within one keep-alive
    /// interval of etcd being reachable). While a handler waits, `/healthz` reports the loop as
    /// waiting for etcd, not stalled.
    async fn confirmed(&self, term: Term) -> Result<(), ContextError> {
        let env = &self.inner.env;
        let lost = || ContextError::NotPrimary {
            task: env.task,
            term,
        };
        let mut lease = env.lease.clone();
        let mut slot = self.inner.slot.clone();
        let id = lease.borrow().id();
        let mut guard = None;
        loop {
            if slot.borrow_and_update().primary != Some(term) {
                return Err(lost());
            }
            match *lease.borrow_and_update() {
                s if s.id() != id => return Err(lost()),
                s if s.valid_now() => return Ok(()),
                crate::etcd::lease::LeaseState::Expired { .. } => return Err(lost()),
                _ => {}
            }
            if guard.is_none() && self.on_loop() {
                tracing::warn!(
                    task = env.task,
                    "a handler waits for this node's lease to be confirmed (etcd slow or away)"
                );
                guard = Some(env.health.waiting_for_etcd());
            }
            tokio::select! {
                r = lease.changed() => r.map_err(|_| lost())?,
                r = slot.changed() => r.map_err(|_| lost())?,
                _ = env.stop.cancelled() => return Err(lost()),
            }
        }
    }

    async fn try_inc_epoch(&self, from: Epoch) -> Result<bool, ContextError> {
        let env = &self.inner.env;
        let key = env.store.keys().epoch();
        // Each round that neither moves nor heals was overtaken by another write to the key.
        for _ in 0..8 {
            let term = self.acting_term()?;
            let current = match env.store.inc_epoch(env.task, term, from).await? {
                Ok(revision) => {
                    // This node's loop enters the new epoch on etcd's answer, without waiting
                    // for the watch to echo the put back (the echo then changes nothing).
                    if revision > 0 {
                        let _ = env.loop_tx.send(LoopRequest::EpochCommitted {
                            epoch: from + 1,
                            revision,
                        });
                    }
                    return Ok(true);
                }
                Err(current) => current,
            };
            // A stale `from`, or the fence failed because this node was deposed meanwhile.
            self.acting_term()?;
            if self.inner.slot.borrow().epoch != from
                || env
                    .view
                    .borrow()
                    .epoch
                    .is_some_and(|last| last.epoch() > from)
            {
                return Ok(false);
            }
            let (guard, fault) = match &current {
                None => (0, EpochFaultKind::Missing),
                Some(kv) => match EpochValue::parse(&kv.value) {
                    Err(reason) => (kv.mod_revision, EpochFaultKind::Garbage(reason)),
                    Ok(EpochValue::Done(_)) => return Ok(false),
                    // Back to `from` meanwhile (healed by another node): move it now.
                    Ok(EpochValue::Running(n)) if n == from => continue,
                    Ok(EpochValue::Running(n)) if n == from + 1 => return Ok(false),
                    Ok(EpochValue::Running(n)) if n < from => {
                        (kv.mod_revision, EpochFaultKind::Backwards(n))
                    }
                    // Further ahead: only the watch, which saw every value in order, can tell
                    // a run of moves unseen here from a value written by someone else.
                    Ok(EpochValue::Running(n)) => {
                        if !self.watch_refused(kv.mod_revision).await {
                            return Ok(false);
                        }
                        (kv.mod_revision, EpochFaultKind::Ahead(n))
                    }
                },
            };
            env.metrics.bad_value("epoch");
            let to = EpochValue::Running(from + 1);
            if env
                .store
                .heal(&key, guard, to.encode(), Some((env.task, term)), None)
                .await?
            {
                env.metrics.key_healed("epoch");
                tracing::error!(
                    key,
                    found = %fault,
                    wrote = %to.encode(),
                    "the epoch key held a value the framework did not write: healed it and moved the job on"
                );
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Whether this node's job watch refused the epoch key's value at `mod_revision` as not
    /// written by the framework. From spawned work it waits (up to a lease TTL) for the watch
    /// to reach that revision; `false` if it does not (in a handler it does not wait).
    async fn watch_refused(&self, mod_revision: i64) -> bool {
        let mut view = self.inner.env.view.clone();
        let refused = |v: &crate::roles::JobView| {
            v.epoch_fault
                .as_ref()
                .is_some_and(|f| f.mod_revision == mod_revision)
        };
        // In a handler the watch cannot move meanwhile (the loop that feeds it is the one
        // waiting): judge by what it has seen.
        if self.on_loop() {
            let v = view.borrow();
            return v.revision >= mod_revision && refused(&v);
        }
        let reached = tokio::time::timeout(
            self.inner.env.lease_ttl,
            view.wait_for(|v| v.revision >= mod_revision),
        )
        .await;
        match reached {
            Ok(Ok(v)) => refused(&v),
            _ => false,
        }
    }

    /// Ends the job everywhere: marks it finished in etcd (fenced by this primary's term); every
    /// node then calls [`Task::exit`], revokes its lease and stops. Returns the final epoch.
    /// Calling it again, or after another primary ended the job, returns the same epoch.
    ///
    /// Resolves when decided, like [`inc_epoch`](Context::inc_epoch): the final epoch, or
    /// [`ContextError::NotPrimary`] (this node lost the slot: let the new primary decide).
    pub async fn shutdown_job(&self) -> Result<Epoch, ContextError> {
        self.finish_job(None).await
    }

    /// [`shutdown_job`](Context::shutdown_job), storing `result` under the job's `result` key
    /// in the same etcd transaction: whoever watches the job (a launcher, the `taskgraph`
    /// CLI, [`JobClient::result`](crate::JobClient::result)) reads the job's outcome there.
    /// Only the call that ends the job stores its result. Refused with
    /// [`ContextError::TooLarge`] above the checkpoint limit.
    pub async fn shutdown_job_with(&self, result: impl Into<Bytes>) -> Result<Epoch, ContextError> {
        let result: Bytes = result.into();
        let limit = self.inner.env.max_checkpoint_bytes;
        if result.len() > limit {
            return Err(ContextError::TooLarge {
                what: "job result",
                size: result.len(),
                limit,
            });
        }
        self.finish_job(Some(result.to_vec())).await
    }

    async fn finish_job(&self, result: Option<Vec<u8>>) -> Result<Epoch, ContextError> {
        self.until_decided(|| self.try_finish_job(result.clone()))
            .await
    }

    async fn try_finish_job(&self, result: Option<Vec<u8>>) -> Result<Epoch, ContextError> {
        let term = self.acting_term()?;
        match self
            .inner
            .env
            .store
            .finish(self.inner.env.task, term, result, self.epoch())
            .await?
        {
            Some(epoch) => Ok(epoch),
            None => Err(ContextError::NotPrimary {
                task: self.inner.env.task,
                term,
            }),
        }
    }

    /// Asks task `to` for data: calls method `method` of its current primary's
    /// [`Task::serve_data`] with `input`. Returns at once with the request's id; the answer
    /// arrives exactly once as [`Task::data_ready`] while this task is still in the current
    /// epoch. The framework retries across connection errors, restarts and failovers of `to`
    /// (following its current primary), and cancels the request when the epoch moves on.
    /// While this node's lease is past its local deadline (etcd slow or unreachable) the
    /// request waits, and is sent once the lease is renewed; an answer that arrives meanwhile
    /// is delivered after the renewal.
    ///
    /// Errors: [`ContextError::NotPrimary`] (only a primary pulls),
    /// [`ContextError::UnknownTask`].
    pub fn data_request(
        &self,
        to: TaskId,
        method: &str,
        input: impl Into<Bytes>,
    ) -> Result<PullId, ContextError> {
        self.start_pull(to, method, input.into(), None)
    }

    /// [`data_request`](Context::data_request) with a typed argument (encoded with postcard;
    /// decode it on the serving side with [`DataRequest::decode`]).
    pub fn data_request_with<T: Serialize + ?Sized>(
        &self,
        to: TaskId,
        method: &str,
        input: &T,
    ) -> Result<PullId, ContextError> {
        let input = encode(input).map_err(|e| ContextError::Codec(e.0))?;
        self.start_pull(to, method, input, None)
    }

    /// Asks task `to` for data and waits for the typed answer: the awaitable form of
    /// [`data_request`](Context::data_request), with the same retries and exactly-once
    /// guarantee; the answer is returned here instead of going to [`Task::data_ready`].
    ///
    /// Await it in work started with [`Context::spawn`], not inside a handler: while a handler
    /// waits, the node's event loop waits too (it cannot serve pulls or follow failovers).
    /// Returns [`PullError::EpochMoved`] when the task leaves the epoch first.
    pub async fn request<T, R>(&self, to: TaskId, method: &str, input: &T) -> Result<R, PullError>
    where
        T: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let input = encode(input)?;
        self.await_pull(to, method, input).await?.decode()
    }

    /// [`request`](Context::request) with bytes in and bytes out, no codec: the answer is the
    /// serving task's [`DataRequest::reply`] bytes as they came off the wire (not copied). The
    /// form for large binary payloads (model weights, gradients): postcard writes a
    /// `Vec<u8>`/`[u8]` one element at a time, so a typed pull of many megabytes of bytes costs
    /// far more in encoding than on the wire.
    pub async fn request_bytes(
        &self,
        to: TaskId,
        method: &str,
        input: impl Into<Bytes>,
    ) -> Result<Bytes, PullError> {
        self.await_pull(to, method, input.into())
            .await?
            .into_result()
    }

    /// The awaitable pull: the fetcher runs inside this future rather than as a task of its
    /// own (one task and one wake-up less per pull). It stops when the answer is handed over;
    /// when the epoch ends first, the book drops the waiter and this returns
    /// [`PullError::EpochMoved`].
    async fn await_pull(
        &self,
        to: TaskId,
        method: &str,
        input: Bytes,
    ) -> Result<DataReply, PullError> {
        let (tx, mut rx) = oneshot::channel();
        let (id, fetch) = self
            .register_pull(to, method, input, Some(tx))
            .map_err(|_| PullError::NotPrimary {
                task: self.inner.env.task,
            })?;
        let fetch = std::pin::pin!(fetch);
        tokio::select! {
            biased;
            reply = &mut rx => reply.map_err(|_| PullError::EpochMoved(id)),
            // The fetcher gave up without an answer (its sender was deposed or the server left
            // the epoch): the waiter stays registered until the epoch ends, as for a
            // `data_request`.
            () = fetch => rx.await.map_err(|_| PullError::EpochMoved(id)),
        }
    }

    /// Pulls of the current epoch still waiting for their answer after `older_than`: their
    /// ids, methods and how long they have waited (for stall reports).
    pub(crate) fn stuck_pulls(
        &self,
        now: tokio::time::Instant,
        older_than: std::time::Duration,
    ) -> Vec<(PullId, String, std::time::Duration)> {
        let book = lock(&self.inner.book);
        let mut stuck: Vec<_> = book
            .pending()
            .iter()
            .filter_map(|(id, p)| {
                let waited = now.saturating_duration_since(p.started);
                (waited > older_than).then(|| (*id, p.method.clone(), waited))
            })
            .collect();
        stuck.sort_by_key(|(id, _, _)| (id.to, id.seq));
        stuck.truncate(8);
        stuck
    }

    fn start_pull(
        &self,
        to: TaskId,
        method: &str,
        input: Bytes,
        waiter: Option<oneshot::Sender<DataReply>>,
    ) -> Result<PullId, ContextError> {
        let (id, fetch) = self.register_pull(to, method, input, waiter)?;
        lock(&self.inner.book).spawn(fetch);
        Ok(id)
    }

    /// Records a pending pull of the current epoch and returns its id with the fetcher that
    /// delivers it (to be run until the epoch ends).
    fn register_pull(
        &self,
        to: TaskId,
        method: &str,
        input: Bytes,
        waiter: Option<oneshot::Sender<DataReply>>,
    ) -> Result<(PullId, impl Future<Output = ()> + Send + 'static), ContextError> {
        let term = self.elected_term()?;
        let env = &self.inner.env;
        if to >= env.num_tasks {
            return Err(ContextError::UnknownTask {
                task: to,
                num_tasks: env.num_tasks,
            });
        }
        let mut book = lock(&self.inner.book);
        let id = book.next_id(env.task, to);
        book.insert_pending(
            id,
            PendingPull {
                method: method.to_owned(),
                input: input.clone(),
                term,
                waiter,
                started: tokio::time::Instant::now(),
            },
        );
        env.metrics.pull_sent(env.task);
        let fetch = crate::exchange::fetch(
            env.clone(),
            Arc::downgrade(&self.inner.book),
            id,
            term,
            method.to_owned(),
            input,
        );
        Ok((id, fetch))
    }

    /// Starts fetching a pending pull again (its answer was fenced off at delivery).
    pub(crate) fn refetch(&self, id: PullId) {
        let mut book = lock(&self.inner.book);
        if book.epoch != id.epoch {
            return;
        }
        let Some(p) = book.pending().get(&id) else {
            return;
        };
        let work = crate::exchange::fetch(
            self.inner.env.clone(),
            Arc::downgrade(&self.inner.book),
            id,
            p.term,
            p.method.clone(),
            p.input.clone(),
        );
        book.spawn(work);
    }

    /// Takes a pending pull of the current epoch for delivery (`None`: already delivered, or
    /// of another epoch).
    pub(crate) fn take_pending(&self, id: PullId) -> Option<PendingPull> {
        let mut book = lock(&self.inner.book);
        if book.epoch != id.epoch {
            return None;
        }
        book.remove_pending(&id)
    }

    /// Starts `epoch` on the requesting side: pulls and metas of other epochs are cancelled.
    pub(crate) fn begin_epoch(&self, epoch: Epoch) {
        let mut book = lock(&self.inner.book);
        if book.epoch != epoch {
            let cancelled = book.reset(epoch);
            self.inner
                .env
                .metrics
                .pulls_cancelled(self.inner.env.task, cancelled);
        }
    }

    /// Raises `meta` towards every neighbour of `link` at the current epoch. Each of them gets
    /// [`Task::meta_ready`] exactly once in this epoch — also a neighbour whose primary changes
    /// later in the epoch; flagging the same meta again in the epoch (for instance by a new
    /// primary of this task) delivers nothing more. Metas travel node to node (no etcd
    /// writes). While this node's lease is past its local deadline the metas wait, and are sent
    /// once it is renewed.
    ///
    /// Errors: [`ContextError::NotPrimary`], [`ContextError::UnknownLink`].
    pub fn flag_meta(&self, link: &str, meta: &str) -> Result<(), ContextError> {
        let term = self.elected_term()?;
        let env = &self.inner.env;
        let epoch = self.epoch();
        let Some(topology) = self.inner.links.get(link) else {
            return Err(ContextError::UnknownLink {
                link: link.to_owned(),
            });
        };
        let mut book = lock(&self.inner.book);
        if book.epoch != epoch {
            let cancelled = book.reset(epoch);
            env.metrics.pulls_cancelled(env.task, cancelled);
        }
        if !book.flagged.insert((link.to_owned(), meta.to_owned())) {
            return Ok(());
        }
        for to in topology.neighbours(env.task, epoch) {
            let entry = (link.to_owned(), meta.to_owned());
            if let Some(outbox) = book.outboxes.get(&to) {
                outbox.send_modify(|v| v.push(entry));
                continue;
            }
            let (tx, rx) = watch::channel(vec![entry]);
            book.outboxes.insert(to, tx);
            book.spawn(crate::exchange::send_metas(
                env.clone(),
                epoch,
                term,
                to,
                rx,
            ));
        }
        Ok(())
    }

    /// As primary, ships `update` to every live backup and returns once each has applied it
    /// ([`Task::apply_update`]), so a backup promoted later starts from this state. Call it
    /// from the handler that changes the state the update describes (snapshots for joining
    /// backups are taken between handlers). A backup that cannot apply it within the lease TTL
    /// is removed from its slot first (it rejoins and gets a snapshot).
    ///
    /// Resolves when decided, in a handler as in spawned work: while this node's lease is
    /// unconfirmed (etcd slow or unreachable) it waits for the renewal before it ships, and
    /// again before it returns, so `Ok` always means an acting primary's update reached every
    /// live backup. It never asks the caller to try again, and each backup applies each update
    /// exactly once (updates are numbered per term; a repeat is ignored).
    ///
    /// Errors: [`ContextError::NotPrimary`] only — this node lost the slot (its lease expired,
    /// a newer primary, or the node is stopping): do not act on the update; the new primary
    /// carries on from its own state.
    pub async fn replicate(&self, update: impl Into<Bytes>) -> Result<(), ContextError> {
        let term = self.elected_term()?;
        self.confirmed(term).await?;
        let env = &self.inner.env;
        let data = update.into();
        let mut r = self.inner.replicator.lock().await;
        r.for_term(term);
        r.index += 1;
        let index = r.index;
        let epoch = self.epoch();
        let shipped = futures::future::join_all(
            r.members
                .iter()
                .map(|m| self.ship_confirmed(term, epoch, m, index, data.clone())),
        )
        .await;
        let mut deposed = false;
        let members = std::mem::take(&mut r.members);
        for (m, outcome) in members.into_iter().zip(shipped) {
            match outcome {
                Ok(Shipped::Applied) => r.members.push(m),
                Ok(Shipped::Gone) => {}
                Ok(Shipped::Deposed | Shipped::Lapsed) | Err(_) => deposed = true,
            }
        }
        if deposed {
            return Err(ContextError::NotPrimary {
                task: env.task,
                term,
            });
        }
        // Only an acting primary's replication counts: if the lease lapsed meanwhile (etcd
        // away, process paused), a backup may have been promoted without this entry. Wait for
        // the lease to be renewed or lost.
        self.confirmed(term).await
    }

    /// Ships update `index` to backup `m`; when this node's lapsed lease interrupted it, ships
    /// it again once the lease is renewed (the backup ignores a repeat of an index it applied).
    async fn ship_confirmed(
        &self,
        term: Term,
        epoch: Epoch,
        m: &Member,
        index: u64,
        data: Bytes,
    ) -> Result<Shipped, ContextError> {
        let env = &self.inner.env;
        loop {
            match ship(
                env,
                term,
                epoch,
                m,
                ReplicateKind::Update,
                index,
                data.clone(),
            )
            .await
            {
                Shipped::Lapsed => self.confirmed(term).await?,
                other => return Ok(other),
            }
        }
    }

    /// Stores `data` as this task's checkpoint in etcd, tagged with the current epoch. A task
    /// value built afresh to take over the task (all its nodes died) gets the last one in
    /// [`Task::restore`]. Keep it small: it is refused above the configured limit (default
    /// 1 MiB, see `FrameworkBuilder::max_checkpoint_bytes`); every call is one etcd write.
    ///
    /// Resolves when decided, like [`inc_epoch`](Context::inc_epoch). Errors:
    /// [`ContextError::TooLarge`], [`ContextError::NotPrimary`] (also when a newer primary
    /// exists: the write is fenced by this primary's term).
    pub async fn checkpoint(&self, data: impl Into<Bytes>) -> Result<(), ContextError> {
        let data: Bytes = data.into();
        self.until_decided(|| self.try_checkpoint(data.clone()))
            .await
    }

    async fn try_checkpoint(&self, data: Bytes) -> Result<(), ContextError> {
        let env = &self.inner.env;
        if data.len() > env.max_checkpoint_bytes {
            return Err(ContextError::TooLarge {
                what: "checkpoint",
                size: data.len(),
                limit: env.max_checkpoint_bytes,
            });
        }
        let term = self.acting_term()?;
        let value = crate::etcd::keys::StoredCheckpoint {
            epoch: self.epoch(),
            data: data.to_vec(),
        }
        .encode();
        if env.store.put_checkpoint(env.task, term, value).await? {
            Ok(())
        } else {
            Err(ContextError::NotPrimary {
                task: env.task,
                term,
            })
        }
    }

    /// [`checkpoint`](Context::checkpoint) of a typed value (postcard); read it back with
    /// [`Checkpoint::decode`].
    pub async fn checkpoint_with<T: Serialize + ?Sized>(
        &self,
        value: &T,
    ) -> Result<(), ContextError> {
        let data = encode(value).map_err(|e| ContextError::Codec(e.0))?;
        self.checkpoint(data).await
    }

    /// Kills this node as if its process died: no handler runs any more, and the lease is
    /// *not* revoked, so other nodes notice only when it expires. For failure drills and tests.
    pub fn kill(&self) {
        let _ = self.inner.env.loop_tx.send(LoopRequest::Kill);
    }

    /// Runs `work` in the background, owned by this task's slot: it is aborted when the slot
    /// ends on this node (exit, slot lost, node stopped or killed). It runs in the caller's
    /// tracing span, so its log lines carry the node, task, term and epoch as the handler's do.
    pub fn spawn<F>(&self, work: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        if let Ok(mut set) = self.inner.spawned.lock() {
            // Reap finished work so the set does not grow without bound.
            while set.try_join_next().is_some() {}
            set.spawn(tracing::Instrument::in_current_span(work));
        }
    }

    /// Runs `work` in the background for the task's current epoch and hands its output back to
    /// the task: [`Task::work_done`] is called exactly once with it, in the event loop, if the
    /// task is still in the epoch it was started in. When the task leaves the epoch (or its
    /// slot ends) first, the work is aborted and nothing is delivered. Use it for long
    /// computations or IO a handler must not wait for; await [`Context::request`] and other
    /// verbs inside it freely. Returns the work's id, which [`WorkDone::id`] repeats.
    ///
    /// Call it from [`Task::enter_epoch`] or a later handler of the epoch: work started
    /// before the task entered its first epoch as primary (in `became_primary`, say) belongs to
    /// no epoch it will be in, and is dropped when it enters one.
    ///
    /// Errors: [`ContextError::NotPrimary`] (only a primary runs epochs).
    pub fn spawn_then<F, T>(&self, work: F) -> Result<WorkId, ContextError>
    where
        F: Future<Output = T> + Send + 'static,
        T: Any + Send,
    {
        self.elected_term()?;
        let env = self.inner.env.clone();
        let mut book = lock(&self.inner.book);
        let id = WorkId {
            epoch: book.epoch,
            seq: book.next_work(),
        };
        book.spawn(async move {
            let output = work.await;
            let _ = env.loop_tx.send(LoopRequest::WorkDone {
                slot: env.slot,
                done: WorkDone {
                    id,
                    output: Box::new(output),
                },
            });
        });
        Ok(id)
    }

    /// Sets a timer for the task's current epoch: after `delay`, [`Task::timer`] is called once
    /// with `token` (an application-chosen tag, to tell timers apart) if the task is still in
    /// the epoch the timer was set in. A timer of an epoch the task has left, or of a slot that
    /// ended, never fires. Like [`spawn_then`](Context::spawn_then), set it from
    /// [`Task::enter_epoch`] or a later handler of the epoch.
    ///
    /// Errors: [`ContextError::NotPrimary`].
    pub fn after(&self, delay: Duration, token: u64) -> Result<(), ContextError> {
        self.elected_term()?;
        let env = self.inner.env.clone();
        let mut book = lock(&self.inner.book);
        let epoch = book.epoch;
        book.spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = env.loop_tx.send(LoopRequest::Timer {
                slot: env.slot,
                epoch,
                token,
            });
        });
        Ok(())
    }

    /// Aborts every piece of spawned work, and the framework's work for this slot.
    pub(crate) fn abort_spawned(&self) {
        if let Ok(mut set) = self.inner.spawned.lock() {
            set.abort_all();
        }
        let cancelled = lock(&self.inner.book).reset(u64::MAX);
        self.inner
            .env
            .metrics
            .pulls_cancelled(self.inner.env.task, cancelled);
    }
}
