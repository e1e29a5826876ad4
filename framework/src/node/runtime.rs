//! The runtime loop: turns the world (the job watch, the lease keeper, the node's gRPC server,
//! the task's context, timers, stop) into [`Input`]s for the [`Engine`], and executes the
//! [`Command`]s it returns, in order — the etcd writes, the calls into the task (through the
//! slot executor), the liveness monitors, the status. It decides nothing the engine could:
//! where it must answer at once (a pull, a meta, a replication entry, an answer coming back to
//! the task), it asks the engine's admission rules.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::{mpsc, watch, Mutex};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error_span, info, warn, Instrument, Span};

use super::checkpoint::load_checkpoint;
use super::engine::{
    Agenda, Claim, ClaimOutcome, Command, Engine, Input, Next, Note, Published, Removal, TaskCall,
};
use super::lease::AbortOnDrop;
use super::slot::SlotRuntime;
use crate::app::{Context, SlotState, TaskBuilder};
use crate::config::Config;
use crate::error::Error;
use crate::etcd::keys::{Holder, NodeRecord};
use crate::etcd::lease::{self, LeaseState};
use crate::etcd::watch::JobEvent;
use crate::etcd::Store;
use crate::exchange::liveness;
use crate::exchange::replication::{ship, Shipped};
use crate::exchange::{Fence, SlotEnv};
use crate::health::{Health, Phase};
use crate::inbox::{LoopGate, LoopRequest, Take};
use crate::lend::Lent;
use crate::metrics::{Metrics, NeighbourEvent};
use crate::role::{ExitReason, NodeExit, NodeStatus};
use crate::roles::{JobView, Member, MySlot, Watched};
use crate::stall::StallWatch;
use crate::wire::{Direct, Handling, Inbound, Peers, ReplicateKind};
use crate::{TaskId, Term};

/// How often the loop looks for a stall (the stall time is seconds at least).
const STALL_CHECK: Duration = Duration::from_millis(500);

/// How often a slot holder lists the keys under its lease for strays: 5 lease TTLs, at least
/// 5 s and at most a minute (one light etcd request; a stray normally comes from a claim
/// without an answer, which is checked at once).
pub(super) fn stray_sweep(ttl: Duration) -> Duration {
    (ttl * 5).clamp(Duration::from_secs(5), Duration::from_secs(60))
}

pub(super) enum Flow {
    Continue,
    Exit(NodeExit),
}

/// What woke the event loop.
enum Wake {
    Stop,
    Request(LoopRequest),
    Event(JobEvent),
    WatchEnded,
    Inbound(Inbound),
    /// The lease changed (`false`: its keeper is gone).
    Lease(bool),
    /// The lease's local deadline passed.
    Deadline,
    /// Time to claim again after etcd did not answer a claim.
    Retry,
    /// Time to look for a stall.
    StallCheck,
}

/// Completes at `at`, or never when there is no time.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A request or inbound message already queued, taken without building the loop's whole wait
/// (under load, one `select!` per message costs more than the message): `None` when stop, a job
/// event, a lease change or a timer is due, which the full wait then takes in its order.
fn queued_wake(
    requests: &mut mpsc::UnboundedReceiver<LoopRequest>,
    events: &mpsc::Receiver<JobEvent>,
    inbound: &mut mpsc::Receiver<Inbound>,
    stop: &CancellationToken,
    lease: &watch::Receiver<LeaseState>,
    timer: Instant,
) -> Option<Wake> {
    if stop.is_cancelled()
        || !events.is_empty()
        || lease.has_changed().unwrap_or(true)
        || Instant::now() >= timer
    {
        return None;
    }
    if let Ok(req) = requests.try_recv() {
        return Some(Wake::Request(req));
    }
    inbound.try_recv().ok().map(Wake::Inbound)
}

/// The node's executors around its engine.
pub(super) struct Runtime {
    pub(super) config: Arc<Config>,
    pub(super) builder: Arc<dyn TaskBuilder>,
    pub(super) store: Store,
    pub(super) holder: Holder,
    pub(super) engine: Engine,
    pub(super) slot: Option<SlotRuntime>,
    pub(super) lease: watch::Receiver<LeaseState>,
    pub(super) lease_tx: watch::Sender<LeaseState>,
    /// The lease keeper (aborted with the node).
    pub(super) lease_task: Option<AbortOnDrop>,
    /// Short etcd chores (deleting garbage and stray slot keys), aborted with the node.
    pub(super) chores: JoinSet<()>,
    pub(super) status: watch::Sender<NodeStatus>,
    pub(super) requests_tx: crate::inbox::LoopSender,
    /// Calls to other nodes.
    pub(super) peers: Peers,
    /// The liveness checks of other slot holders; each is aborted when dropped, so a crashed
    /// node leaves none running.
    pub(super) monitors: BTreeMap<Watched, AbortOnDrop>,
    /// Hands the answers to the slot's pulls to its handler while the loop is idle (set once
    /// the node's [`DirectPulled`] exists; owned by the node's `run`).
    pub(super) direct_pulled: Weak<dyn crate::inbox::DirectRequests>,
    /// The view, for the slot's background work (pull fetchers, meta senders, replication).
    pub(super) view_tx: watch::Sender<Arc<JobView>>,
    /// When a slot holder next looks for stray slot keys under its lease ([`Runtime::sweep_strays`]).
    pub(super) next_stray_sweep: Instant,
    /// The key ranges the job watch follows (the engine's [`Command::Watch`]).
    pub(super) watch_ranges: watch::Sender<crate::etcd::watch::WatchRanges>,
    /// Where the first registration sends its read of the watch's ranges (the job watch's
    /// first snapshot); `None` once sent.
    pub(super) first_read: Option<tokio::sync::oneshot::Sender<crate::etcd::watch::FirstRead>>,
    /// Highest term seen per task, for the slot's background work (raised from the view).
    pub(super) fence: Fence,
    /// What this node last wrote under its `nodes/<node>` key.
    pub(super) record: NodeRecord,
    /// `record` changed (a stall note cleared) and is to be written again.
    pub(super) record_dirty: bool,
    /// When the job's epoch last moved, for stall reports.
    pub(super) stall: StallWatch,
    pub(super) metrics: Metrics,
    pub(super) health: Arc<Health>,
    /// The node's span (job, node): the parent of every slot's.
    pub(super) node_span: Span,
    /// This node among the nodes of the process (see [`crate::inbox::handling`]).
    pub(super) instance: u64,
}

/// Lends the runtime to another task while the event loop waits for its next event and
/// nothing is due before what that task brings (no watch event queued, no lease change, no
/// stop): the work it runs with the runtime locked is the loop's own handling, one task hop
/// and two wake-ups sooner.
#[derive(Clone)]
struct Idle {
    runtime: Weak<Mutex<Runtime>>,
    /// The job watch's channel to the loop (weak: the loop learns that the watch ended when
    /// its last sender goes).
    events: mpsc::WeakSender<JobEvent>,
    /// The loop's requests queued, its waking, its end.
    gate: Arc<LoopGate>,
    stop: CancellationToken,
    /// Counts the waits for a held runtime.
    metrics: Metrics,
    /// Lends for answers to the node's pulls (else for messages from other nodes): the
    /// `kind` of the waits counted.
    answers: bool,
}

impl Idle {
    /// Lends the runtime for `event`, to be handled by `handle` on the calling task, if the
    /// loop is idle and may stay so; else gives the event back for the loop. A runtime held
    /// by another task (a handling lent to it, or the loop between two events) is waited for
    /// instead of refused ([`Lent::After`], in line with the loop, which also takes it in
    /// turn; the loop must still be idle then): while messages keep arriving on several gRPC
    /// tasks at once, one of them at a time holds the runtime, and sending the others to the
    /// loop would cost a hop each and wake the loop.
    fn lend<E: Send + 'static>(
        &self,
        event: E,
        handle: fn(tokio::sync::OwnedMutexGuard<Runtime>, E) -> crate::lend::Work,
    ) -> Lent<E> {
        if !self.may_lend() {
            return Lent::Back(event);
        }
        let Some(runtime) = self.runtime.upgrade() else {
            return Lent::Back(event);
        };
        match runtime.clone().try_lock_owned() {
            Ok(rt) if self.may_keep(&rt) => Lent::Now(handle(rt, event)),
            Ok(_) => Lent::Back(event),
            Err(_) => {
                self.metrics.runtime_wait(self.answers);
                let idle = self.clone();
                Lent::After(Box::pin(async move {
                    let rt = runtime.lock_owned().await;
                    if idle.may_lend() && idle.may_keep(&rt) {
                        Ok(handle(rt, event))
                    } else {
                        Err(event)
                    }
                }))
            }
        }
    }

    /// Whether the loop may be idle, judged without its runtime.
    fn may_lend(&self) -> bool {
        // Watch events are taken before any message, so that admission judges on the
        // freshest view; requests already queued (a kill, an epoch committed) come first; and
        // everything goes through the loop while the node stops.
        !self.stop.is_cancelled() && self.gate.open() && !self.events_queued()
    }

    /// Whether `rt`, just locked, may be lent.
    fn may_keep(&self, rt: &Runtime) -> bool {
        // The loop closes the gate with the runtime held when it ends: checked again here.
        // It takes a lease change before any message (a renewal brings the backups in step
        // first): leave the message to it.
        !self.gate.is_closed() && !rt.lease.has_changed().unwrap_or(true)
    }

    fn events_queued(&self) -> bool {
        self.events
            .upgrade()
            .is_none_or(|tx| tx.capacity() < tx.max_capacity())
    }
}

/// Runs `work` on `rt` as the loop runs an event's handling: the loop's span, health and view
/// of the lease, and [`inbox::handling`](crate::inbox::handling) for the task's verbs. A panic
/// in it (in a task's handler) ends the node as it would in the loop: the loop re-raises it.
fn as_loop<F>(mut rt: tokio::sync::OwnedMutexGuard<Runtime>, work: F) -> BoxFuture<'static, ()>
where
    F: for<'a> FnOnce(&'a mut Runtime) -> BoxFuture<'a, ()> + Send + 'static,
{
    use futures::FutureExt;
    let node = rt.instance;
    Box::pin(crate::inbox::handling(node, async move {
        rt.health.busy();
        let lease = *rt.lease.borrow();
        rt.engine.observe_lease(lease);
        let span = rt.span();
        let done = std::panic::AssertUnwindSafe(work(&mut rt).instrument(span))
            .catch_unwind()
            .await;
        if let Err(panic) = done {
            rt.requests_tx.gate().panicked(panic);
            // Wakes the loop, which re-raises the panic before anything else.
            let _ = rt.requests_tx.send(LoopRequest::Kill);
            return;
        }
        rt.send_made_answers();
        rt.health.idle();
    }))
}

/// Serves messages on the calling gRPC handler's own task while the loop is idle (see
/// [`wire::Direct`] and [`Idle`]).
pub(super) struct DirectServe(Idle);

impl DirectServe {
    pub(super) fn new(
        runtime: &Arc<Mutex<Runtime>>,
        events: mpsc::WeakSender<JobEvent>,
        gate: Arc<LoopGate>,
        stop: CancellationToken,
        metrics: Metrics,
    ) -> Self {
        DirectServe(Idle {
            runtime: Arc::downgrade(runtime),
            events,
            gate,
            stop,
            metrics,
            answers: false,
        })
    }

    /// The same lending of the runtime, for the answers to the task's pulls.
    pub(super) fn requests(&self) -> DirectPulled {
        DirectPulled {
            idle: Idle {
                answers: true,
                ..self.0.clone()
            },
            unfinished: crate::lend::Unfinished::default(),
        }
    }
}

impl Direct for DirectServe {
    fn try_handle(&self, msg: Inbound) -> Handling {
        // Replication entries may end in decisions (a backup's progress): through the loop.
        let lent = if matches!(msg, Inbound::Replicate(..)) {
            Lent::Back(msg)
        } else {
            self.0.lend(msg, |rt, msg| {
                as_loop(rt, move |rt| {
                    rt.metrics.inbound(true);
                    Box::pin(rt.on_direct(msg))
                })
            })
        };
        // A message for the loop is counted when it is sent there (here, at once or after
        // its wait), one handled here in its handling.
        let metrics = &self.0.metrics;
        match lent {
            Lent::Back(msg) => {
                metrics.inbound(false);
                Lent::Back(msg)
            }
            Lent::After(wait) => {
                let metrics = metrics.clone();
                Lent::After(Box::pin(async move {
                    let lent = wait.await;
                    if lent.is_err() {
                        metrics.inbound(false);
                    }
                    lent
                }))
            }
            now @ Lent::Now(_) => now,
        }
    }
}

/// Hands the answers to the task's pulls to `data_ready` on the fetcher's own task while the
/// loop is idle (see [`DirectRequests`](crate::inbox::DirectRequests) and [`Idle`]). Owned by
/// the node's `run` (the slots hold it weakly): when the node ends, what it still runs is
/// aborted.
pub(super) struct DirectPulled {
    idle: Idle,
    unfinished: crate::lend::Unfinished,
}

impl crate::inbox::DirectRequests for DirectPulled {
    fn try_take(&self, req: LoopRequest) -> Take {
        // Only answers: the loop's own requests (an epoch committed, a slot key to watch)
        // lead to decisions of the engine.
        if !matches!(req, LoopRequest::Pulled { .. }) {
            return Lent::Back(req);
        }
        self.idle.lend(req, |rt, req| {
            as_loop(rt, move |rt| {
                rt.metrics.answer_handed(true);
                Box::pin(rt.on_request(req))
            })
        })
    }

    fn finish(&self, work: crate::lend::Work) {
        self.unfinished.finish(work);
    }
}

/// The event loop: waits for the next wake without holding the runtime (so [`DirectServe`]
/// can serve meanwhile), then handles it with the runtime locked.
pub(super) async fn main_loop(
    shared: Arc<Mutex<Runtime>>,
    mut events: mpsc::Receiver<JobEvent>,
    mut requests: mpsc::UnboundedReceiver<LoopRequest>,
    mut inbound: mpsc::Receiver<Inbound>,
    gate: Arc<LoopGate>,
    stop: CancellationToken,
) -> Result<NodeExit, Error> {
    /// Closes the gate however the loop ends (dropped in a crash included); on every return
    /// below it is closed first with the runtime held, so no handler starts after the loop.
    struct CloseOnDrop(Arc<LoopGate>);
    impl Drop for CloseOnDrop {
        fn drop(&mut self) {
            self.0.close();
        }
    }
    let _close = CloseOnDrop(gate.clone());
    let ended = |flow: Result<Flow, Error>| {
        if !matches!(flow, Ok(Flow::Continue)) {
            gate.close();
        }
        flow
    };
    let mut rt = shared.lock().await;
    rt.health.set_phase(Phase::Running);
    if let Flow::Exit(exit) = ended(rt.execute(vec![Command::NewLease], &stop).await)? {
        return Ok(exit);
    }
    rt.send_made_answers();
    // The loop's own receiver for lease changes, awaited without the runtime; the runtime's
    // receiver tells whether a change is still to be taken.
    let mut lease_changes = rt.lease.clone();
    drop(rt);
    let mut stall_check = tokio::time::interval(STALL_CHECK);
    stall_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut rt = shared.lock().await;
        reraise_panic(&gate);
        let deadline = match *rt.lease.borrow() {
            LeaseState::Alive { deadline, .. } => deadline,
            _ => Instant::now() + Duration::from_secs(3600),
        };
        let retry_at = rt.engine.retry_at();
        let queued = queued_wake(
            &mut requests,
            &events,
            &mut inbound,
            &stop,
            &rt.lease,
            deadline.min(retry_at.unwrap_or(deadline)),
        );
        let wake = match queued {
            Some(wake) => {
                // As the wait would: a loop that always finds work still lets others run.
                tokio::task::coop::consume_budget().await;
                wake
            }
            None => {
                rt.health.idle();
                drop(rt);
                // Watch events first (decisions on the freshest view), then a lease change
                // before any request or message: a renewal brings the backups in step before
                // anything else reaches the task (see `Context::replicate`).
                let wake = tokio::select! {
                    biased;
                    _ = stop.cancelled() => Wake::Stop,
                    ev = events.recv() => match ev {
                        Some(ev) => Wake::Event(ev),
                        None => Wake::WatchEnded,
                    },
                    changed = lease_changes.changed() => Wake::Lease(changed.is_ok()),
                    Some(req) = requests.recv() => Wake::Request(req),
                    Some(msg) = inbound.recv() => Wake::Inbound(msg),
                    _ = tokio::time::sleep_until(deadline) => Wake::Deadline,
                    _ = sleep_until_some(retry_at) => Wake::Retry,
                    _ = stall_check.tick() => Wake::StallCheck,
                };
                // What woke the loop is handled before anything is lent; but a message from
                // another node is not ahead of the others (they race on the network): they
                // may still be handled on their own tasks while the loop waits. Nor is the
                // periodic look for a stall, which decides nothing a message depends on.
                let waking = !matches!(wake, Wake::Inbound(_) | Wake::StallCheck);
                gate.waking(waking);
                rt = shared.lock().await;
                gate.waking(false);
                reraise_panic(&gate);
                wake
            }
        };
        if matches!(wake, Wake::Request(_)) {
            gate.taken();
        }
        rt.health.busy();
        // Everything the loop does for this event is logged in the slot's current span.
        let span = rt.span();
        let flow = ended(rt.handle(wake, &mut events, &stop).instrument(span).await)?;
        rt.send_made_answers();
        if let Flow::Exit(exit) = flow {
            return Ok(exit);
        }
    }
}

/// Re-raises the panic of a handler that ran outside the loop (see `as_loop`): the node ends
/// as if it had panicked in the loop.
fn reraise_panic(gate: &LoopGate) {
    if let Some(panic) = gate.take_panic() {
        std::panic::resume_unwind(panic);
    }
}

impl Runtime {
    /// Sends the answers the task gave to held pulls in the handlers of the event just
    /// handled (see [`SlotRuntime::made`]).
    pub(super) fn send_made_answers(&mut self) {
        let Some(s) = self.slot.as_ref() else {
            return;
        };
        let made = std::mem::take(
            &mut *s
                .made
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        if made.is_empty() {
            return;
        }
        let (slot, now) = (s.id, Instant::now());
        for (key, answer) in made {
            self.answer_served(slot, key, answer, now);
        }
    }

    /// Handles one wake of the loop.
    async fn handle(
        &mut self,
        wake: Wake,
        events: &mut mpsc::Receiver<JobEvent>,
        stop: &CancellationToken,
    ) -> Result<Flow, Error> {
        // The engine judges the lease as its keeper shows it now, also when the loop is busy
        // with requests and has not taken the change as an input yet.
        self.engine.observe_lease(*self.lease.borrow());
        let input = match wake {
            Wake::Stop => Input::Stop,
            Wake::Request(LoopRequest::Kill) => {
                warn!("killed by its task: leaving without revoking the lease");
                return Ok(Flow::Exit(NodeExit::Killed));
            }
            Wake::Request(LoopRequest::WatchTask(task)) => {
                let commands = self.engine.handle(Input::WatchTask(task), Instant::now());
                return self.execute(commands, stop).await;
            }
            Wake::Request(LoopRequest::LeaseKeys(kvs)) => {
                let commands = self.engine.handle(Input::LeaseKeys(kvs), Instant::now());
                return self.execute(commands, stop).await;
            }
            Wake::Request(LoopRequest::Drafted(outcome)) => {
                let commands = self.engine.handle(Input::Drafted(outcome), Instant::now());
                return self.execute(commands, stop).await;
            }
            Wake::Request(LoopRequest::EpochCommitted { epoch, revision }) => {
                let input = Input::EpochCommitted { epoch, revision };
                let commands = self.engine.handle(input, Instant::now());
                self.epoch_seen().await;
                return self.execute(commands, stop).await;
            }
            Wake::Request(other) => {
                if matches!(other, LoopRequest::Pulled { .. }) {
                    self.metrics.answer_handed(false);
                }
                self.on_request(other).await;
                return Ok(Flow::Continue);
            }
            Wake::Event(ev) => {
                // Catch up with everything already queued before deciding anything, so
                // decisions are made on the freshest view available.
                let mut batch = vec![ev];
                while let Ok(ev) = events.try_recv() {
                    batch.push(ev);
                }
                let commands = self.engine.handle(Input::Watch(batch), Instant::now());
                self.epoch_seen().await;
                return self.execute(commands, stop).await;
            }
            Wake::WatchEnded => return Err(Error::WatchEnded),
            Wake::Inbound(msg) => {
                return self.on_inbound(msg, stop).await;
            }
            // A change the runtime has already taken (a new lease's first state) is no input.
            Wake::Lease(true) if !self.lease.has_changed().unwrap_or(false) => {
                return Ok(Flow::Continue)
            }
            Wake::Lease(true) => Input::Lease(*self.lease.borrow_and_update()),
            Wake::Lease(false) => return Ok(Flow::Continue),
            Wake::Deadline => Input::Deadline,
            Wake::Retry => Input::Retry,
            Wake::StallCheck => {
                self.sweep_strays();
                self.check_stall().await;
                return Ok(Flow::Continue);
            }
        };
        let commands = self.engine.handle(input, Instant::now());
        self.execute(commands, stop).await
    }

    /// Runs commands in the order the engine decided them (see [`Agenda`]): the commands
    /// that answer one's outcome join the end.
    pub(super) async fn execute(
        &mut self,
        commands: Vec<Command>,
        stop: &CancellationToken,
    ) -> Result<Flow, Error> {
        let mut agenda = Agenda::new(commands);
        // The lease is checked right before a guarded command runs: it may have lapsed during
        // the commands before it (a handler, an etcd call).
        while let Some(next) = agenda.next(|| self.lease.borrow().valid_now()) {
            let answer = match next {
                Next::Refuse(command) => self
                    .engine
                    .handle(Input::GuardFailed(command), Instant::now()),
                Next::Run(Command::Exit(exit)) => {
                    info!(?exit, "node stopped");
                    return Ok(Flow::Exit(exit));
                }
                Next::Run(command) => {
                    let span = self.span();
                    self.run(command, stop).instrument(span).await?
                }
            };
            agenda.answer(answer);
        }
        Ok(Flow::Continue)
    }

    /// Runs one command; returns the engine's commands for its outcome, if it has one.
    async fn run(
        &mut self,
        command: Command,
        stop: &CancellationToken,
    ) -> Result<Vec<Command>, Error> {
        match command {
            Command::Claim(claim) => {
                let outcome = match claim {
                    Claim::Primary { task, lease } => {
                        self.store
                            .claim_primary(task, self.config.replicas, &self.holder, lease)
                            .await
                    }
                    Claim::Backup { task, k, lease } => {
                        self.store.claim_backup(task, k, &self.holder, lease).await
                    }
                    Claim::Promote {
                        task,
                        k,
                        create_revision,
                        lease,
                    } => {
                        self.store
                            .promote(task, k, create_revision, &self.holder, lease)
                            .await
                    }
                };
                let outcome = match outcome {
                    Ok(Some(rev)) => ClaimOutcome::Won(rev),
                    Ok(None) => ClaimOutcome::Lost,
                    Err(e) => ClaimOutcome::Failed(e.to_string()),
                };
                self.engine.observe_lease(*self.lease.borrow());
                return Ok(self
                    .engine
                    .handle(Input::Claimed(claim, outcome), Instant::now()));
            }
            Command::DeleteKey {
                key,
                mod_revision,
                why,
            } => self.delete_key(key, mod_revision, why),
            Command::ViewChanged => {
                // The fence first: a fetcher that sees the new view must not take an answer
                // from a primary it deposes. Only the terms raised since the last view: O(1)
                // per primary key change (the slot maps themselves are shared, not copied).
                for (t, term) in self.engine.take_raised() {
                    self.fence.admit(t, term);
                }
                if let Some(view) = self.engine.view() {
                    self.view_tx.send_replace(Arc::new(view.clone()));
                }
            }
            Command::Heal {
                what,
                key,
                guard,
                value,
                fence,
            } => {
                self.heal_key(what, &key, guard, value, Some(fence), None)
                    .await
            }
            Command::HealRecord { guard } => {
                let key = self.store.keys().node(&self.holder.node);
                let value = serde_json::to_vec(&self.record).unwrap_or_default();
                let lease = self.lease.borrow().id();
                self.heal_key("node", &key, guard, value, None, Some(lease))
                    .await;
            }
            Command::BuildSlot {
                task,
                primary,
                slot,
                epoch,
            } => self.build_slot(task, primary, slot, epoch, stop).await?,
            Command::RestoreCheckpoint(task) => {
                let cp = load_checkpoint(
                    self.store.clone(),
                    self.lease.clone(),
                    self.health.clone(),
                    task,
                )
                .await;
                if let (Some(cp), Some(s)) = (cp, self.slot.as_mut()) {
                    info!(
                        task,
                        epoch = cp.epoch,
                        "promoted before getting the primary's state: restoring the checkpoint"
                    );
                    s.task.restore(&s.ctx, cp).await;
                }
            }
            Command::PrimaryTerm(term) => {
                let span = self.slot_span();
                if let Some(s) = self.slot.as_mut() {
                    s.primary_term(term, span);
                }
            }
            Command::BackupEpoch(epoch) => {
                if let Some(s) = self.slot.as_mut() {
                    s.state.send_if_modified(|st| {
                        let changed = st.epoch != epoch;
                        st.epoch = epoch;
                        changed
                    });
                }
            }
            Command::Call(call) => self.call(call).await,
            Command::EnterEpoch { epoch, .. } => {
                if let Some(s) = self.slot.as_mut() {
                    let answers = s.enter_epoch(epoch, &self.requests_tx).await;
                    let id = s.id;
                    for (key, answer) in answers {
                        self.answer_served(id, key, answer, Instant::now());
                    }
                }
            }
            Command::DeliverDeferred => {
                let (deferred, calls) = match self.slot.as_mut() {
                    Some(s) => (
                        std::mem::take(&mut s.deferred),
                        std::mem::take(&mut s.deferred_calls),
                    ),
                    None => (Vec::new(), Vec::new()),
                };
                for call in calls {
                    self.call(call).await;
                }
                for req in deferred {
                    self.on_request(req).await;
                }
            }
            Command::SyncBackups {
                task,
                term,
                epoch,
                members,
            } => self.sync_backups(task, term, epoch, members).await,
            Command::Monitor(wanted) => self.monitor(wanted),
            Command::FindStrays => self.find_strays(),
            Command::Draft { term, orders } => {
                // In the background: the staffer's own slot goes on while etcd applies them.
                let (store, requests) = (self.store.clone(), self.requests_tx.clone());
                let replicas = self.config.replicas;
                while self.chores.try_join_next().is_some() {}
                self.chores.spawn(
                    async move {
                        let outcome = store.draft(term, replicas, &orders).await;
                        let _ = requests.send(LoopRequest::Drafted(outcome));
                    }
                    .instrument(Span::current()),
                );
            }
            Command::Watch { generation, ranges } => {
                // The agenda runs them in the order decided, so generations only grow here.
                // Kept as a second line: older ranges must never replace newer ones (the watch
                // would follow them while the engine ignores their snapshots, and the view
                // would never be read again: the job once stalled so after every lease ended).
                let count = ranges.len();
                let sent = self.watch_ranges.send_if_modified(|now| {
                    let later = generation > now.generation;
                    if later {
                        *now = crate::etcd::watch::WatchRanges { generation, ranges };
                    }
                    later
                });
                if sent {
                    self.metrics.set_watched_ranges(count);
                } else {
                    debug!(
                        generation,
                        "the job watch already follows later ranges: these are not sent"
                    );
                }
            }
            Command::DropSlot(reason) => {
                if let Some(mut slot) = self.slot.take() {
                    if reason == ExitReason::SlotLost {
                        info!(task = slot.ctx.task(), "slot lost");
                    }
                    slot.state.send_modify(|st| st.primary = None);
                    slot.ctx.abort_spawned();
                    slot.task.exit(&slot.ctx, reason).await;
                    self.metrics.kept_answer_bytes(0);
                }
            }
            Command::NewLease => {
                if let Some(registered_at) = self.new_lease(stop).await {
                    let lease = *self.lease.borrow();
                    return Ok(self.engine.handle(
                        Input::LeaseGranted {
                            lease,
                            registered_at,
                        },
                        Instant::now(),
                    ));
                }
            }
            Command::RevokeLease(id) => {
                self.lease_task = None;
                if !id.is_none() {
                    if let Err(e) = self.store.revoke_lease(id).await {
                        warn!(error = %e, "could not revoke the lease; it expires after its TTL");
                    }
                }
            }
            Command::Publish(published) => self.publish(published),
            Command::Note(note) => self.note(note),
            // Taken by `execute`.
            Command::Exit(_) => {}
        }
        Ok(Vec::new())
    }

    /// The innermost span of the node's current slot (its epoch's, or the slot's), or the
    /// node's span while it has none.
    fn span(&self) -> Span {
        self.slot
            .as_ref()
            .map_or_else(|| self.node_span.clone(), SlotRuntime::span)
    }

    /// A new span for the slot this node holds (task, role, term), child of the node's.
    fn slot_span(&self) -> Span {
        match self.engine.mine() {
            MySlot::Primary { task, term } => {
                error_span!(parent: &self.node_span, "slot", task, role = "primary", term)
            }
            MySlot::Backup { task, .. } => {
                error_span!(parent: &self.node_span, "slot", task, role = "backup")
            }
            MySlot::Spare => self.node_span.clone(),
        }
    }

    fn note(&self, note: Note) {
        match note {
            Note::BadValue(key) => self.metrics.bad_value(key),
            Note::JobEpoch { epoch, done } => self.metrics.job_epoch(epoch, done),
            Note::Failover(task) => self.metrics.failover(task),
            Note::EpochEntered(task) => self.metrics.epoch_entered(task),
            Note::Neighbour(task, failed) => self.metrics.neighbour_event(
                task,
                if failed {
                    NeighbourEvent::Failed
                } else {
                    NeighbourEvent::Restarted
                },
            ),
        }
    }

    fn publish(&self, p: Published) {
        self.metrics.node_state(p.role, p.acting);
        self.health.set_ready(p.ready, p.until);
        let lease = self.lease.clone();
        self.status.send_if_modified(|s| {
            let new = NodeStatus {
                node_id: s.node_id.clone(),
                role: p.role,
                // Checked again under the status's lock: the deadline may have passed since
                // (see `step_down_at_deadline`).
                acting: p.acting && lease.borrow().valid_now(),
                epoch: p.epoch,
                finished: p.finished,
            };
            let changed = *s != new;
            *s = new;
            changed
        });
    }

    /// Grants a fresh lease (retrying while etcd is down), starts its keeper, registers the
    /// node: the revision of the registration, or `None` when stopped meanwhile. The first
    /// registration also reads the job watch's ranges in its transaction and hands the read
    /// to the watch as its first snapshot: a joining node's watch then costs etcd no read of
    /// its own.
    async fn new_lease(&mut self, stop: &CancellationToken) -> Option<i64> {
        self.lease_task = None;
        let mut delays = crate::retry::ETCD.delays();
        // While etcd does not answer, the loop waits here: `/healthz` says so instead of failing.
        let health = self.health.clone();
        let mut waiting = None;
        loop {
            let granted_at = Instant::now();
            let attempt = async {
                let (id, ttl) = self.store.grant_lease(self.config.lease_ttl_secs()).await?;
                let (registered, read) = if self.first_read.is_some() {
                    let ranges = self.watch_ranges.borrow().clone();
                    let (registered, kvs, revision) = self
                        .store
                        .register_node_reading(&self.holder.node, &self.record, id, &ranges.ranges)
                        .await?;
                    let read = crate::etcd::watch::FirstRead {
                        ranges,
                        kvs,
                        revision,
                    };
                    (registered, Some(read))
                } else {
                    let registered = self
                        .store
                        .register_node(&self.holder.node, &self.record, id)
                        .await?;
                    (registered, None)
                };
                Ok::<_, crate::error::EtcdError>((id, ttl, registered, read))
            };
            match attempt.await {
                Ok((id, ttl, registered, read)) => {
                    if let (Some(first), Some(read)) = (self.first_read.take(), read) {
                        // The watch takes it only if it still follows these ranges.
                        let _ = first.send(read);
                    }
                    let ttl = Duration::from_secs(ttl.max(1) as u64);
                    info!(lease = format!("{id:x}"), ?ttl, "lease granted");
                    self.metrics.lease_granted();
                    let (tx, rx) = (self.lease_tx.clone(), self.lease_tx.subscribe());
                    self.lease = rx;
                    self.lease_task = Some(AbortOnDrop::spawn(
                        lease::keep_alive(self.store.clone(), id, ttl, granted_at, tx)
                            .instrument(self.node_span.clone()),
                    ));
                    // Let the keeper publish `Alive` before deciding anything.
                    let _ = self.lease.wait_for(|s| s.id() == id).await;
                    self.lease.borrow_and_update();
                    return Some(registered);
                }
                Err(e) => {
                    waiting.get_or_insert_with(|| health.waiting_for_etcd());
                    warn!(error = %e, "cannot get a lease from etcd, retrying");
                    tokio::select! {
                        _ = stop.cancelled() => return None,
                        _ = tokio::time::sleep(delays.next().unwrap_or(crate::retry::ETCD.max)) => {}
                    }
                }
            }
        }
    }

    /// Reads the slot keys under the node's lease, for the engine to judge
    /// ([`Command::FindStrays`]).
    fn find_strays(&mut self) {
        let (store, requests) = (self.store.clone(), self.requests_tx.clone());
        let lease = self.lease.borrow().id();
        self.next_stray_sweep = Instant::now() + stray_sweep(self.config.lease_ttl);
        while self.chores.try_join_next().is_some() {}
        self.chores.spawn(
            async move {
                match store.lease_slot_keys(lease).await {
                    Ok(kvs) if !kvs.is_empty() => {
                        let _ = requests.send(LoopRequest::LeaseKeys(kvs));
                    }
                    Ok(_) => {}
                    Err(e) => debug!(error = %e, "could not list the keys under the lease"),
                }
            }
            .instrument(Span::current()),
        );
    }

    /// Now and then, as a slot holder that watches only a few tasks: looks for slot keys of
    /// its own elsewhere in the job (a spare sees every slot key in its watch).
    pub(super) fn sweep_strays(&mut self) {
        if self.engine.watches_all() || Instant::now() < self.next_stray_sweep {
            return;
        }
        if self.lease.borrow().valid_now() {
            self.find_strays();
        }
    }

    fn delete_key(&mut self, raw: Vec<u8>, mod_revision: i64, why: Removal) {
        let store = self.store.clone();
        let key = String::from_utf8_lossy(&raw).into_owned();
        while self.chores.try_join_next().is_some() {}
        self.chores.spawn(
            async move {
                match (store.delete_orphan(&raw, mod_revision).await, why) {
                    (Ok(true), Removal::Garbage) => {
                        warn!(key, "deleted a garbage slot key that had no lease")
                    }
                    (Ok(_), _) => {}
                    (Err(e), Removal::Garbage) => {
                        warn!(key, error = %e, "could not delete a garbage slot key")
                    }
                    (Err(e), Removal::Stray) => {
                        warn!(key, error = %e, "could not delete a stray slot key")
                    }
                }
            }
            .instrument(Span::current()),
        );
    }

    /// Keeps a liveness check on exactly the slot holders in `wanted` (a backup its primary, a
    /// spare the backups of tasks without a primary): on evidence that a holder's process is
    /// gone, its lease is ended at once.
    fn monitor(&mut self, wanted: Vec<Watched>) {
        self.monitors.retain(|w, _| wanted.contains(w));
        for target in wanted {
            if self.monitors.contains_key(&target) {
                continue;
            }
            let task = AbortOnDrop::spawn(
                liveness::watch_holder(
                    self.peers.clone(),
                    self.metrics.clone(),
                    self.store.clone(),
                    self.view_tx.subscribe(),
                    target.clone(),
                )
                .instrument(Span::current()),
            );
            self.monitors.insert(target, task);
        }
    }

    /// Builds and initialises the task value for a slot just taken as a spare; a primary's
    /// gets the task's last checkpoint.
    async fn build_slot(
        &mut self,
        t: TaskId,
        primary: bool,
        id: u64,
        epoch: crate::Epoch,
        stop: &CancellationToken,
    ) -> Result<(), Error> {
        let (state, state_rx) = watch::channel(SlotState {
            primary: None,
            epoch,
        });
        let env = SlotEnv {
            slot: id,
            task: t,
            num_tasks: self.config.tasks,
            peers: self.peers.clone(),
            store: self.store.clone(),
            view: self.view_tx.subscribe(),
            fence: self.fence.clone(),
            loop_tx: self.requests_tx.clone(),
            lease: self.lease.clone(),
            lease_ttl: self.config.lease_ttl,
            max_checkpoint_bytes: self.config.max_checkpoint_bytes,
            metrics: self.metrics.clone(),
            direct: self.direct_pulled.clone(),
            health: self.health.clone(),
            stop: stop.clone(),
        };
        let ctx = Context::new(Arc::new(env), self.config.links.clone(), state_rx);
        let span = self.slot_span();
        let mut task = self.builder.build(t);
        if let Err(e) = task.init(&ctx).instrument(span.clone()).await {
            return Err(Error::Task {
                task: t,
                reason: e.to_string(),
            });
        }
        if primary {
            if let Some(cp) = load_checkpoint(
                self.store.clone(),
                self.lease.clone(),
                self.health.clone(),
                t,
            )
            .await
            {
                info!(
                    task = t,
                    epoch = cp.epoch,
                    "restoring the task's checkpoint"
                );
                task.restore(&ctx, cp).instrument(span.clone()).await;
            }
        }
        self.slot = Some(SlotRuntime {
            task,
            ctx,
            state,
            id,
            serve: Default::default(),
            deferred: Vec::new(),
            deferred_calls: Vec::new(),
            span,
            epoch_span: None,
            made: Arc::default(),
            node: self.instance,
        });
        Ok(())
    }

    async fn call(&mut self, call: TaskCall) {
        let Some(s) = self.slot.as_mut() else {
            return;
        };
        // The engine decided on the lease as this turn began; if the keeper reported it lapsed
        // since, a primary's callback waits for the renewal (a task acts only while its lease
        // is valid) and goes with the slot if the lease is lost.
        if matches!(
            call,
            TaskCall::NeighbourFailed(..) | TaskCall::NeighbourRestarted(..)
        ) && s.ctx.term().is_none()
        {
            debug!(?call, "the lease lapsed before the task was told: deferred");
            s.deferred_calls.push(call);
            return;
        }
        let span = s.span();
        match call {
            TaskCall::BecameBackup => s.task.became_backup(&s.ctx).instrument(span).await,
            TaskCall::BecamePrimary(term) => {
                s.task.became_primary(&s.ctx, term).instrument(span).await
            }
            TaskCall::NeighbourFailed(link, n) => {
                s.task
                    .neighbour_failed(&s.ctx, &link, n)
                    .instrument(span)
                    .await
            }
            TaskCall::NeighbourRestarted(link, n) => {
                s.task
                    .neighbour_restarted(&s.ctx, &link, n)
                    .instrument(span)
                    .await
            }
        }
    }

    /// As acting primary: brings new backups in step (a snapshot, then every update) and
    /// forgets the ones that left.
    async fn sync_backups(
        &mut self,
        task: TaskId,
        term: Term,
        epoch: crate::Epoch,
        wanted: Vec<Member>,
    ) {
        let Some(s) = self.slot.as_mut() else {
            return;
        };
        let ctx = s.ctx.clone();
        let mut r = ctx.replicator().lock().await;
        r.for_term(term);
        r.members.retain(|m| wanted.contains(m));
        let new: Vec<Member> = wanted
            .into_iter()
            .filter(|m| !r.members.contains(m))
            .collect();
        if new.is_empty() {
            return;
        }
        let snapshot = s.task.snapshot(&s.ctx);
        let index = r.index;
        let env = ctx.env();
        let shipped = futures::future::join_all(new.iter().map(|m| {
            ship(
                env,
                term,
                epoch,
                m,
                ReplicateKind::Snapshot,
                index,
                snapshot.clone(),
            )
        }))
        .await;
        for (m, outcome) in new.into_iter().zip(shipped) {
            if outcome == Shipped::Applied {
                debug!(task, backup = m.node, index, "backup in step");
                r.members.push(m);
            }
        }
    }
}
