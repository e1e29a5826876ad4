//! Task-to-task exchange on top of the wire: the requesting side of pulls, metas on their way
//! to neighbours, replication to backups and the term fence.
//!
//! Everything here runs beside the event loop (in tasks owned by a slot) or is pure state the
//! loop consults; only the loop calls application handlers.

pub(crate) mod fetch;
pub(crate) mod liveness;
pub(crate) mod metas;
pub(crate) mod replication;
pub(crate) mod serve;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;

use crate::data::{DataReply, PullId};
use crate::etcd::lease::LeaseId;
use crate::etcd::Store;
use crate::metrics::Metrics;
use crate::roles::JobView;
use crate::wire::{CallError, Peers, Rejection};

use crate::{Epoch, TaskId, Term};
pub(crate) use fetch::fetch;
pub(crate) use metas::send_metas;

/// The highest term this node has seen per task in etcd (raised only from the watched view:
/// a term claimed by a message is never believed on its own). Anything carrying a lower term
/// comes from a deposed primary and is dropped.
#[derive(Debug, Clone, Default)]
pub(crate) struct Fence(Arc<Mutex<HashMap<TaskId, Term>>>);

impl Fence {
    fn map(&self) -> MutexGuard<'_, HashMap<TaskId, Term>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
    /// The highest term seen for `task` (0 if none).
    pub(crate) fn seen(&self, task: TaskId) -> Term {
        self.map().get(&task).copied().unwrap_or(0)
    }
    /// Records `term` for `task`; `false` (and nothing recorded) if a higher term was seen.
    pub(crate) fn admit(&self, task: TaskId, term: Term) -> bool {
        let mut map = self.map();
        let seen = map.entry(task).or_insert(0);
        if term < *seen {
            return false;
        }
        *seen = term;
        true
    }
}

/// What a slot's background work needs: who it is, how to reach others, the job as seen in
/// etcd, and the way back to the event loop.
#[derive(Debug)]
pub(crate) struct SlotEnv {
    /// Identifies the slot on this node (a counter): messages from a slot that has ended are
    /// ignored.
    pub(crate) slot: u64,
    pub(crate) task: TaskId,
    pub(crate) num_tasks: u32,
    pub(crate) peers: Peers,
    pub(crate) store: Store,
    pub(crate) view: watch::Receiver<Arc<JobView>>,
    pub(crate) fence: Fence,
    pub(crate) loop_tx: crate::inbox::LoopSender,
    pub(crate) lease: watch::Receiver<crate::etcd::lease::LeaseState>,
    pub(crate) lease_ttl: Duration,
    pub(crate) max_checkpoint_bytes: usize,
    pub(crate) metrics: Metrics,
    /// Takes an answer into the loop's handling on the fetcher's own task while the loop is
    /// idle (weak: the node owns it, and aborts what it runs when it ends).
    pub(crate) direct: std::sync::Weak<dyn crate::inbox::DirectRequests>,
    /// The node's liveness report: a handler that waits for the lease's confirmation marks
    /// the loop as waiting for etcd rather than stalled.
    pub(crate) health: Arc<crate::health::Health>,
    /// Cancelled when the node is asked to stop: a handler waiting for the lease gives up.
    pub(crate) stop: tokio_util::sync::CancellationToken,
}

/// A pull waiting for its answer.
#[derive(Debug)]
pub(crate) struct PendingPull {
    pub(crate) method: String,
    pub(crate) input: Bytes,
    pub(crate) term: Term,
    /// For [`Context::request`](crate::Context::request): the answer goes here instead of to
    /// `data_ready`.
    pub(crate) waiter: Option<oneshot::Sender<DataReply>>,
    /// When the task asked (for `taskgraph_pull_duration_seconds`).
    pub(crate) started: tokio::time::Instant,
}

/// The requesting side's state of one epoch: pulls waiting for answers, metas flagged, and the
/// background work delivering them. Reset (work aborted) when the task enters another epoch
/// or its slot ends.
#[derive(Debug, Default)]
pub(crate) struct EpochBook {
    pub(crate) epoch: Epoch,
    next_seq: u64,
    next_work: u64,
    pending: HashMap<PullId, PendingPull>,
    /// The pending pulls by (target, seq), for [`EpochBook::delivered_below`].
    open: BTreeSet<(TaskId, u64)>,
    pub(crate) flagged: HashSet<(String, String)>,
    pub(crate) outboxes: HashMap<TaskId, watch::Sender<Vec<(String, String)>>>,
    work: JoinSet<()>,
}

impl EpochBook {
    /// Starts epoch `epoch`: everything of the previous one is cancelled. Returns the number
    /// of pulls cancelled without their answer.
    pub(crate) fn reset(&mut self, epoch: Epoch) -> usize {
        self.work.abort_all();
        let cancelled = self.pending.len();
        self.pending.clear();
        self.open.clear();
        self.flagged.clear();
        self.outboxes.clear();
        self.next_seq = 0;
        self.next_work = 0;
        self.epoch = epoch;
        cancelled
    }

    /// The next pull id of this epoch.
    pub(crate) fn next_id(&mut self, from: TaskId, to: TaskId) -> PullId {
        let seq = self.next_seq;
        self.next_seq += 1;
        PullId {
            epoch: self.epoch,
            from,
            to,
            seq,
        }
    }

    /// The pulls of this epoch waiting for their answer.
    pub(crate) fn pending(&self) -> &HashMap<PullId, PendingPull> {
        &self.pending
    }

    /// Records a pull waiting for its answer.
    pub(crate) fn insert_pending(&mut self, id: PullId, pull: PendingPull) {
        self.open.insert((id.to, id.seq));
        self.pending.insert(id, pull);
    }

    /// Takes a pull out of the waiting ones: it is being delivered.
    pub(crate) fn remove_pending(&mut self, id: &PullId) -> Option<PendingPull> {
        self.open.remove(&(id.to, id.seq));
        self.pending.remove(id)
    }

    /// The acknowledgement a pull to `to` carries (`PullRequest::delivered_below`): the
    /// lowest sequence number of this epoch's pulls to `to` still waiting for their answer
    /// (every lower one was delivered, or went to another task).
    pub(crate) fn delivered_below(&self, to: TaskId) -> u64 {
        self.open
            .range((to, 0)..=(to, u64::MAX))
            .next()
            .map_or(self.next_seq, |&(_, seq)| seq)
    }

    /// The next id of work started with `Context::spawn_then` in this epoch.
    pub(crate) fn next_work(&mut self) -> u64 {
        let seq = self.next_work;
        self.next_work += 1;
        seq
    }

    /// Runs `work` until the epoch ends, in the current span (the task's slot and epoch).
    pub(crate) fn spawn(&mut self, work: impl std::future::Future<Output = ()> + Send + 'static) {
        while self.work.try_join_next().is_some() {}
        self.work.spawn(tracing::Instrument::in_current_span(work));
    }
}

/// Locks a book, whatever a panicking holder left behind.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What a caller should do after a failed call to another node.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// Wait (back off, or until the target's primary changes) and retry.
    Retry,
    /// The target's process is evidently gone (its port refuses): end its lease, then retry.
    Dead,
    /// The target answered "shutting down": its process may be gone (its event loop is) or it
    /// merely dropped a held call; check with a ping (see [`liveness`]), then retry.
    Suspect,
    /// Give up quietly: this sender was deposed, or the receiver has left the epoch.
    Stop,
    /// Give up and report: the receiver refuses this message for good.
    Fail(String),
}

pub(crate) fn verdict(err: CallError) -> Verdict {
    match err {
        CallError::Refused { .. } => Verdict::Dead,
        CallError::Unreachable { .. } | CallError::Protocol { .. } => Verdict::Retry,
        CallError::Rejected(r) => match r {
            Rejection::NotPrimary { .. } | Rejection::NotReady { .. } => Verdict::Retry,
            Rejection::ShuttingDown => Verdict::Suspect,
            Rejection::EpochMoved { .. }
            | Rejection::StaleTerm { .. }
            | Rejection::Delivered { .. } => Verdict::Stop,
            other => Verdict::Fail(other.to_string()),
        },
    }
}

/// The current primary of `task` in the view: address, term, lease.
pub(crate) fn primary_of(view: &JobView, task: TaskId) -> Option<(String, Term, LeaseId)> {
    view.primaries
        .get(&task)
        .map(|p| (p.holder.addr.clone(), p.term(), p.lease))
}

/// Completes when the view shows another primary for `task` than the one at `term` (or none).
pub(crate) async fn primary_changed(
    view: &mut watch::Receiver<Arc<JobView>>,
    task: TaskId,
    term: Term,
) {
    let gone = view
        .wait_for(|v| v.primaries.get(&task).map(|p| p.term()) != Some(term))
        .await
        .is_err();
    if gone {
        // The node is going away; its work is aborted with it.
        std::future::pending::<()>().await;
    }
}

/// Waits until this node's lease is confirmed (within its local deadline): nothing leaves a
/// primary whose lease may have ended. Never returns once the lease keeper is gone (the slot
/// ends then, and its work is aborted).
pub(crate) async fn lease_confirmed(env: &SlotEnv) {
    let mut lease = env.lease.clone();
    loop {
        if lease.borrow_and_update().valid_now() {
            return;
        }
        if lease.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Waits `delay`, or less if `task`'s primary changes meanwhile.
pub(crate) async fn pause(
    view: &mut watch::Receiver<Arc<JobView>>,
    task: TaskId,
    term: Term,
    delay: Duration,
) {
    tokio::select! {
        () = tokio::time::sleep(delay) => {}
        () = primary_changed(view, task, term) => {}
    }
}

/// Ends the lease of a primary whose process is evidently gone, if the view still shows it.
pub(crate) async fn end_dead_primary(env: &SlotEnv, task: TaskId, term: Term, lease: LeaseId) {
    let still = env
        .view
        .borrow()
        .primaries
        .get(&task)
        .is_some_and(|p| p.term() == term);
    if !still || lease.is_none() {
        return;
    }
    tracing::warn!(
        task,
        term,
        "the primary's process is gone (its port refuses, or its loop is gone): ending its lease"
    );
    if let Err(e) = env.store.revoke_lease(lease).await {
        tracing::debug!(error = %e, "could not end a dead primary's lease");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending() -> PendingPull {
        PendingPull {
            method: "m".into(),
            input: Bytes::new(),
            term: 1,
            waiter: None,
            started: tokio::time::Instant::now(),
        }
    }

    #[test]
    fn a_pull_acknowledges_only_what_its_target_delivered_before_the_oldest_pull_waiting() {
        let mut book = EpochBook::default();
        book.reset(4);
        let ids: Vec<PullId> = [1, 2, 1, 1, 2]
            .into_iter()
            .map(|to| {
                let id = book.next_id(0, to);
                book.insert_pending(id, pending());
                id
            })
            .collect();
        // seqs: 0→1, 1→2, 2→1, 3→1, 4→2
        assert_eq!(book.delivered_below(1), 0);
        book.remove_pending(&ids[2]);
        // Out of order: pull 0 still waits, so nothing is acknowledged to task 1.
        assert_eq!(book.delivered_below(1), 0);
        book.remove_pending(&ids[0]);
        assert_eq!(book.delivered_below(1), 3);
        assert_eq!(book.delivered_below(2), 1);
        book.remove_pending(&ids[3]);
        // Nothing waits for task 1: every pull so far is covered.
        assert_eq!(book.delivered_below(1), 5);
        // A task never pulled acknowledges nothing it could be sent later.
        assert_eq!(book.delivered_below(3), 5);
        book.reset(5);
        assert_eq!(book.delivered_below(2), 0);
    }
}
