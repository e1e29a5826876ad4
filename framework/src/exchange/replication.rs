//! Hot standby, the primary's side: the backups it keeps in step, and shipping one entry
//! (snapshot or update) to one backup until it is applied — or until the backup is shown to be
//! gone, in which case it is removed from etcd so it can never be promoted with stale state.

use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::{verdict, SlotEnv, Verdict};
use crate::roles::Member;
use crate::wire::{CallError, Header, Rejection, Replicate, ReplicateKind};
use crate::{Epoch, Term};

/// The primary's replication stream under one term: the last index shipped, and the backups
/// that have everything up to it.
#[derive(Debug, Default)]
pub(crate) struct Replicator {
    pub(crate) term: Term,
    pub(crate) index: u64,
    pub(crate) members: Vec<Member>,
}

impl Replicator {
    /// Starts afresh when the primary's term is new (every backup first gets a snapshot).
    pub(crate) fn for_term(&mut self, term: Term) {
        if self.term != term {
            *self = Replicator {
                term,
                ..Replicator::default()
            };
        }
    }
}

/// How shipping an entry to a backup ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shipped {
    /// The backup applied it.
    Applied,
    /// The backup is gone (its slot is no longer in etcd, or was removed now).
    Gone,
    /// A newer primary of the task exists (etcd or the backup said so).
    Deposed,
    /// This node's lease is past its local deadline: it may not act until it is renewed.
    Lapsed,
}

/// Ships one entry to `member` until it is applied. A backup that cannot apply it within the
/// lease TTL (unreachable, paused, or out of step) is removed from etcd first, so that it can
/// never be promoted without the entry.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn ship(
    env: &SlotEnv,
    term: Term,
    epoch: Epoch,
    member: &Member,
    kind: ReplicateKind,
    index: u64,
    data: Bytes,
) -> Shipped {
    let deadline = Instant::now() + env.lease_ttl;
    let mut delays = crate::retry::PEER.delays();
    let mut view = env.view.clone();
    loop {
        if !env.lease.borrow().valid_now() {
            return Shipped::Lapsed;
        }
        if !member.in_view(&view.borrow_and_update(), env.task) {
            return Shipped::Gone;
        }
        let msg = Replicate {
            header: Header {
                job: String::new(),
                epoch,
                from_task: env.task,
                to_task: env.task,
                term,
            },
            index,
            kind,
            data: data.clone(),
        };
        let sent = tokio::select! {
            r = env.peers.replicate(&member.addr, msg) => r,
            () = tokio::time::sleep_until(deadline) => Err(CallError::Unreachable {
                addr: member.addr.clone(),
                reason: "no answer within the lease TTL".into(),
            }),
        };
        let give_up = match sent {
            Ok(()) => return Shipped::Applied,
            Err(CallError::Rejected(Rejection::StaleTerm { .. })) => return Shipped::Deposed,
            Err(CallError::Rejected(Rejection::NotReady { .. })) => {
                Some("the backup is out of step")
            }
            Err(e) => match verdict(e) {
                Verdict::Dead => {
                    tracing::warn!(
                        backup = member.node,
                        "the backup's port refuses connections: ending its lease"
                    );
                    match env.store.revoke_lease(member.lease).await {
                        Ok(()) => return Shipped::Gone,
                        Err(_) => Some("the backup's process is gone"),
                    }
                }
                Verdict::Suspect => {
                    match super::liveness::evidence_of_death(
                        &env.peers,
                        &env.metrics,
                        &member.addr,
                        &member.node,
                    )
                    .await
                    {
                        Some(evidence) => {
                            tracing::warn!(
                                backup = member.node,
                                evidence,
                                "the backup's process is gone: ending its lease"
                            );
                            match env.store.revoke_lease(member.lease).await {
                                Ok(()) => return Shipped::Gone,
                                Err(_) => Some("the backup's process is gone"),
                            }
                        }
                        None if Instant::now() < deadline => None,
                        None => Some("the backup did not apply the entry within the lease TTL"),
                    }
                }
                Verdict::Retry | Verdict::Stop if Instant::now() < deadline => None,
                Verdict::Retry | Verdict::Stop => {
                    Some("the backup did not apply the entry within the lease TTL")
                }
                Verdict::Fail(_) => Some("the backup refused the entry"),
            },
        };
        if let Some(reason) = give_up {
            // After this process was paused the deadline has passed at once: whether this
            // node may still act decides first.
            if !env.lease.borrow().valid_now() {
                return Shipped::Lapsed;
            }
            if let Some(outcome) = eject(env, term, member, reason).await {
                return outcome;
            }
        }
        let delay = delays.next().unwrap_or(Duration::from_millis(500));
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = view.changed() => {}
        }
    }
}

/// Removes `member`'s slot from etcd (fenced by the primary's term). `None`: etcd did not
/// answer; the caller retries.
async fn eject(env: &SlotEnv, term: Term, member: &Member, reason: &str) -> Option<Shipped> {
    tracing::warn!(
        backup = member.node,
        reason,
        "removing the backup from its slot"
    );
    match env
        .store
        .eject_backup(env.task, member.k, member.create_revision, term)
        .await
    {
        Ok(true) => Some(Shipped::Gone),
        Ok(false) => {
            // Either the backup's key is gone already, or this node is no longer primary.
            let primary = env.lease.borrow().valid_now()
                && env
                    .view
                    .borrow()
                    .primaries
                    .get(&env.task)
                    .is_some_and(|p| p.term() == term);
            Some(if primary {
                Shipped::Gone
            } else {
                Shipped::Deposed
            })
        }
        Err(e) => {
            tracing::debug!(error = %e, "could not remove a backup; retrying");
            None
        }
    }
}
