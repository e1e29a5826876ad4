//! Evidence of death: when the process holding a slot is evidently gone from a live host, the
//! node that notices ends its lease at once instead of waiting for the TTL.
//!
//! Evidence is what a live holder can never show: its port refuses connections, another node
//! answers at its address, or its server answers a ping with "shutting down" (its event loop
//! is gone). A call that is merely slow or unreachable proves nothing and is left to the lease.
//! A wrong suspicion is harmless: revoking a lease only ends the suspect's slot (it rejoins
//! as a spare), and fencing drops anything it sends under its old term.
//!
//! Who checks whom: a backup its primary, a spare the backups of every task that has no primary
//! (a dead backup's lease would otherwise keep the task from being taken over until the TTL;
//! see [`crate::roles::watched`]), a primary the backups it replicates to (when a call is
//! refused or answered "shutting down"), a task whose pull or meta to a primary is refused or
//! answered "shutting down" that primary, and a task whose pull or meta finds its target
//! without a primary the target's backups.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::SlotEnv;
use crate::etcd::Store;
use crate::metrics::{LivenessCheck, Metrics};
use crate::roles::{JobView, Watched};
use crate::wire::{CallError, Peers, PingReply, Rejection};
use crate::TaskId;

/// How long a liveness check (a ping, or opening a hold) may take, and the pause between
/// attempts to (re)open a hold on a holder that does not answer. A check that is merely slow
/// proves nothing and is left to the lease.
pub(crate) const MONITOR_INTERVAL: Duration = Duration::from_millis(50);
pub(crate) const MONITOR_TIMEOUT: Duration = Duration::from_millis(500);

/// Pings node `node` at `addr` once: `Some(evidence)` when its process is evidently gone.
pub(crate) async fn evidence_of_death(
    peers: &Peers,
    metrics: &Metrics,
    addr: &str,
    node: &str,
) -> Option<String> {
    metrics.liveness_check(LivenessCheck::Ping);
    match tokio::time::timeout(MONITOR_TIMEOUT, peers.ping(addr)).await {
        Ok(Ok(reply)) => other_node(addr, node, &reply),
        Ok(Err(e)) => evidence_in(addr, &e),
        // Slow: no evidence of death; the lease decides.
        Err(_) => None,
    }
}

/// Evidence of death in a call's error: the port refuses connections, or the node answers
/// that it is shutting down. Slow, unreachable or garbage prove nothing.
fn evidence_in(addr: &str, e: &CallError) -> Option<String> {
    match e {
        e if e.is_refused() => Some(format!("{addr} refuses connections")),
        CallError::Rejected(Rejection::ShuttingDown) => Some(format!("{addr} is shutting down")),
        _ => None,
    }
}

/// Evidence of death in a reply from another node than `node` at its address.
fn other_node(addr: &str, node: &str, reply: &PingReply) -> Option<String> {
    (reply.node_id != node).then(|| format!("{addr} is now answered by node {}", reply.node_id))
}

/// Watches `target` until there is evidence that its process is gone, then ends its lease and
/// returns. Stops watching once the job has finished (every node is stopping on its own then:
/// a holder going away is not a death).
///
/// The watch is a hold ([`Peers::hold`]): one call that stays open while the holder lives, so
/// a live holder costs nothing, and a process that dies (its connections reset by its kernel)
/// is noticed at once. When a hold ends, a ping tells whether the process is gone (refused,
/// shutting down, another node at the address); if not (a broken connection proves nothing),
/// the hold is opened again. The first hold is opened at once: a spare starts watching a backup
/// when its task loses its primary, which is when the backup may have died with it.
pub(crate) async fn watch_holder(
    peers: Peers,
    metrics: Metrics,
    store: Store,
    mut view: watch::Receiver<Arc<JobView>>,
    target: Watched,
) {
    let mut first = true;
    let evidence = loop {
        if !std::mem::take(&mut first) {
            tokio::time::sleep(MONITOR_INTERVAL).await;
        }
        if view.borrow().finished() {
            return;
        }
        let (addr, node) = (&target.addr, &target.node);
        metrics.liveness_check(LivenessCheck::Hold);
        let held = match tokio::time::timeout(MONITOR_TIMEOUT, peers.hold(addr)).await {
            Ok(Ok((reply, held))) => match other_node(addr, node, &reply) {
                Some(evidence) => break evidence,
                None => held,
            },
            Ok(Err(e)) => match evidence_in(addr, &e) {
                Some(evidence) => break evidence,
                None => continue,
            },
            Err(_) => continue,
        };
        let ended = tokio::select! {
            e = held.ended() => e,
            _ = view.wait_for(|v| v.finished()) => return,
        };
        if view.borrow().finished() {
            return;
        }
        tracing::debug!(holder = %node, error = %ended, "a liveness hold ended; checking the holder");
        if let Some(evidence) = evidence_in(addr, &ended) {
            break evidence;
        }
        // The connection broke, but that proves nothing yet: ask the address who is there.
        if let Some(evidence) = evidence_of_death(&peers, &metrics, addr, node).await {
            break evidence;
        }
    };
    if view.borrow().finished() {
        return;
    }
    let role = if target.primary { "primary" } else { "backup" };
    tracing::warn!(
        task = target.task,
        role,
        holder = %target.node,
        evidence,
        "a slot holder's process is gone: ending its lease"
    );
    loop {
        match store.revoke_lease(target.lease).await {
            Ok(()) => return,
            Err(e) => tracing::debug!(error = %e, "could not end a dead holder's lease; retrying"),
        }
        tokio::time::sleep(MONITOR_INTERVAL).await;
        if view.borrow().finished() {
            return;
        }
    }
}

/// Checks once every backup of `task` in the view and ends the lease of those whose process is
/// evidently gone (for a task whose pull or meta finds no primary: its backups are who should
/// take over, and a dead one's lease would keep everyone else away until the TTL).
pub(crate) async fn end_dead_backups(env: &SlotEnv, task: TaskId) {
    let backups: Vec<(String, String, crate::etcd::lease::LeaseId)> = {
        let view = env.view.borrow();
        if view.finished() || view.primaries.contains_key(&task) {
            return;
        }
        view.backups_of(task)
            .filter(|(_, s)| !s.lease.is_none() && !s.holder.addr.is_empty())
            .map(|(_, s)| (s.holder.node.clone(), s.holder.addr.clone(), s.lease))
            .collect()
    };
    for (node, addr, lease) in backups {
        if let Some(evidence) = evidence_of_death(&env.peers, &env.metrics, &addr, &node).await {
            tracing::warn!(
                task,
                backup = %node,
                evidence,
                "the backup of a task without a primary is gone: ending its lease"
            );
            if let Err(e) = env.store.revoke_lease(lease).await {
                tracing::debug!(error = %e, "could not end a dead backup's lease");
            }
        }
    }
}

/// Waits until the view changes while `task` has no primary, checking meanwhile (at once,
/// then every [`MONITOR_INTERVAL`]) whether its backups are dead. A task whose slot keys the
/// view does not show (a slot holder watches only a few) is asked for first: the loop adds
/// it to the watch. `false`: the view is gone (the node is stopping).
pub(crate) async fn await_primary(
    env: &SlotEnv,
    view: &mut watch::Receiver<Arc<JobView>>,
    task: TaskId,
) -> bool {
    if !view.borrow().shows(task) {
        let _ = env.loop_tx.send(crate::inbox::LoopRequest::WatchTask(task));
    }
    let check = async {
        loop {
            end_dead_backups(env, task).await;
            tokio::time::sleep(MONITOR_INTERVAL).await;
        }
    };
    tokio::select! {
        r = view.changed() => r.is_ok(),
        _ = check => true,
    }
}

/// After a call to `task`'s primary at `term` was answered "shutting down" (which a live node
/// also says when it drops a held call), checks with a ping whether its process is gone and,
/// if so, ends its lease.
pub(crate) async fn check_primary(env: &SlotEnv, task: TaskId, term: crate::Term) {
    let target = env
        .view
        .borrow()
        .primaries
        .get(&task)
        .filter(|p| p.term() == term && !p.lease.is_none())
        .map(|p| (p.holder.node.clone(), p.holder.addr.clone(), p.lease));
    let Some((node, addr, lease)) = target else {
        return;
    };
    if let Some(evidence) = evidence_of_death(&env.peers, &env.metrics, &addr, &node).await {
        tracing::warn!(
            task,
            term,
            evidence,
            "the primary's process is gone: ending its lease"
        );
        super::end_dead_primary(env, task, term, lease).await;
    }
}
