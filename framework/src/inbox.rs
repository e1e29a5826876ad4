//! The event loop's inbox: what a task's context, its spawned work and the framework's work on
//! its behalf send to the node's event loop. Below the application's API (`app`) and the
//! exchange, which both send into it.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::Bytes;

use crate::data::{Answer, PullError, PullId, ServeKey};
use crate::work::WorkDone;
use crate::{Epoch, TaskId, Term};

/// Requests from a task (its context, its spawned work, the framework's work on its behalf) to
/// its node's event loop. Each names the slot it comes from; the loop ignores requests of a
/// slot that has ended.
#[derive(Debug)]
pub(crate) enum LoopRequest {
    /// Die now, without revoking the lease (as if the process were killed).
    Kill,
    /// The task answered (or dropped) a [`DataRequest`](crate::DataRequest).
    Answer {
        slot: u64,
        key: ServeKey,
        answer: Answer,
    },
    /// Work started with [`Context::spawn_then`](crate::Context::spawn_then) completed.
    WorkDone { slot: u64, done: WorkDone },
    /// A timer set with [`Context::after`](crate::Context::after) fired.
    Timer { slot: u64, epoch: Epoch, token: u64 },
    /// The answer to one of the task's pulls arrived.
    Pulled {
        slot: u64,
        id: PullId,
        server_term: Term,
        result: Result<Bytes, PullError>,
    },
    /// The task's `inc_epoch` moved the job to `epoch`: etcd's answer to the compare-and-swap,
    /// whose put has `revision`. The news, ahead of the watch's echo of the same put.
    EpochCommitted { epoch: Epoch, revision: i64 },
    /// The slot's work talks to this task (a pull or meta to it, or a sender from it) whose
    /// slot keys the node does not watch: watch them.
    WatchTask(TaskId),
    /// The slot keys under the node's lease, as read for `Command::FindStrays`.
    LeaseKeys(Vec<crate::etcd::Kv>),
    /// What came of the staffer's drafts (`Command::Draft`).
    Drafted(crate::etcd::DraftOutcome),
}

/// The sending side of the event loop's requests: a channel, and the [`LoopGate`] that counts
/// what is queued in it.
#[derive(Debug, Clone)]
pub(crate) struct LoopSender {
    tx: tokio::sync::mpsc::UnboundedSender<LoopRequest>,
    gate: std::sync::Arc<LoopGate>,
}

impl LoopSender {
    /// A channel to the loop and its gate.
    pub(crate) fn channel() -> (
        LoopSender,
        tokio::sync::mpsc::UnboundedReceiver<LoopRequest>,
        std::sync::Arc<LoopGate>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let gate = std::sync::Arc::new(LoopGate::default());
        (
            LoopSender {
                tx,
                gate: gate.clone(),
            },
            rx,
            gate,
        )
    }

    /// Queues `req` for the loop; fails only when the loop has ended.
    pub(crate) fn send(
        &self,
        req: LoopRequest,
    ) -> Result<(), tokio::sync::mpsc::error::SendError<LoopRequest>> {
        self.gate.queued.fetch_add(1, Ordering::SeqCst);
        let sent = self.tx.send(req);
        if sent.is_err() {
            self.gate.queued.fetch_sub(1, Ordering::SeqCst);
        }
        sent
    }

    /// The gate of this loop.
    pub(crate) fn gate(&self) -> &LoopGate {
        &self.gate
    }
}

/// Whether the event loop's runtime may be lent to another task now (see
/// [`DirectRequests`] and the runtime's `DirectServe`): not while requests wait in the loop's
/// queue (they were first: a `kill`, an epoch committed), not while the loop has woken for
/// anything but a message from another node (messages race on the network: none is owed a
/// place ahead of another) and waits for the runtime, and never again once the loop has ended
/// or a handler run elsewhere panicked.
#[derive(Debug, Default)]
pub(crate) struct LoopGate {
    /// Requests sent and not yet taken by the loop with the runtime held.
    queued: AtomicUsize,
    /// The loop woke for something that must be handled before anything is lent (anything
    /// but a message from another node), and waits for the runtime.
    waking: AtomicBool,
    /// The loop has ended, or is about to re-raise a handler's panic.
    closed: AtomicBool,
    /// The panic of a handler run outside the loop, for the loop to re-raise.
    panic: std::sync::Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

impl LoopGate {
    /// Whether the runtime may be lent now.
    pub(crate) fn open(&self) -> bool {
        self.queued.load(Ordering::SeqCst) == 0
            && !self.waking.load(Ordering::SeqCst)
            && !self.closed.load(Ordering::SeqCst)
    }
    /// The loop took a request (with the runtime held).
    pub(crate) fn taken(&self) {
        self.queued.fetch_sub(1, Ordering::SeqCst);
    }
    /// The loop woke (`true`) and waits for the runtime, or holds it now (`false`).
    pub(crate) fn waking(&self, waking: bool) {
        self.waking.store(waking, Ordering::SeqCst);
    }
    /// No more lending: the loop ends.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }
    /// Whether the gate is closed for good.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }
    /// A handler run outside the loop panicked: the loop re-raises `payload` (see
    /// [`LoopGate::take_panic`]), so the node ends as if the handler had panicked in it.
    pub(crate) fn panicked(&self, payload: Box<dyn std::any::Any + Send>) {
        self.close();
        let mut slot = self
            .panic
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        slot.get_or_insert(payload);
    }
    /// The panic to re-raise, if a handler run outside the loop panicked.
    pub(crate) fn take_panic(&self) -> Option<Box<dyn std::any::Any + Send>> {
        self.panic
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }
}

/// Takes a request into the event loop's own handling on the sender's task, while the loop
/// waits for its next event (as [`wire::Direct`](crate::wire::Direct) does for messages from
/// other nodes): one hand-off and two wake-ups fewer on the way to the task's handler.
pub(crate) trait DirectRequests: Send + Sync {
    /// Takes `req` to handle on the calling task (the work holds the node's runtime as the
    /// loop would; see [`Take`]), or gives it back to go through the loop.
    fn try_take(&self, req: LoopRequest) -> Take;
    /// Finishes work [`try_take`](DirectRequests::try_take) returned as a task of the node's
    /// own (aborted with the node), so that aborting the sender never cuts a handler short.
    fn finish(&self, work: crate::lend::Work);
}

/// What [`DirectRequests::try_take`] makes of a request.
pub(crate) type Take = crate::lend::Lent<LoopRequest>;

/// Hands `req` over: taken directly when `direct` is given and the loop is idle (the work is
/// polled once on this task, and what is left finishes as the node's), else sent to the loop.
/// Cancelling this while it waits for the node's runtime (see
/// [`Lent::After`](crate::lend::Lent::After)) drops `req`: callers are a pull's fetcher,
/// cancelled only when the epoch ends, which makes its answer void anyway.
pub(crate) async fn hand_over(
    direct: Option<&dyn DirectRequests>,
    loop_tx: &LoopSender,
    req: LoopRequest,
) {
    let req = match direct {
        Some(d) => match d.try_take(req).work().await {
            Ok(work) => {
                if let Some(work) = crate::lend::poll_once(work).await {
                    d.finish(work);
                }
                return;
            }
            Err(req) => req,
        },
        None => req,
    };
    let _ = loop_tx.send(req);
}

tokio::task_local! {
    /// Set while a node handles an event with its runtime held (on its event loop's task, or
    /// on a gRPC call's or fetcher's task that took the event directly): the node's
    /// [`node_instance`].
    static HANDLING: u64;
}

/// A number of its own for each node started in this process, for [`handling`].
pub(crate) fn node_instance() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Runs `f` as node `node`'s handling of events (see [`in_handler`]).
pub(crate) fn handling<F: std::future::Future>(
    node: u64,
    f: F,
) -> impl std::future::Future<Output = F::Output> {
    HANDLING.scope(node, f)
}

/// Whether the caller is a node's handling of an event (a task's handler awaiting a verb),
/// rather than spawned work: the loop waits for it, so it must not wait for the loop.
pub(crate) fn in_handler() -> bool {
    HANDLING.try_with(|_| ()).is_ok()
}

/// Whether the caller is node `node`'s handling of an event.
pub(crate) fn handled_by(node: u64) -> bool {
    HANDLING.try_with(|n| *n == node).unwrap_or(false)
}
