//! The node's health as `/healthz` and `/readyz` report it (see [`crate::metrics`] for the
//! definitions): the event loop's liveness, kept up to date by the loop itself, and its
//! readiness, decided by [`readiness`] from the loop's view of the job.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::etcd::keys::EpochValue;
use crate::roles::{decide, Decision, JobView, MySlot, Scope};
use crate::Epoch;

/// Where the node is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Connecting to etcd and checking the job's spec; the event loop has not started.
    Starting,
    /// The event loop runs.
    Running,
    /// The event loop waits for etcd (a lease, or a read it cannot go on without).
    WaitingForEtcd,
    /// The node has ended.
    Ended,
}

#[derive(Debug)]
struct State {
    phase: Phase,
    /// Since when the loop has been handling one event (`None`: idle, waiting for the next).
    busy_since: Option<Instant>,
    /// The last readiness the loop published, valid until the lease's local deadline.
    ready: Result<String, String>,
    ready_until: Option<Instant>,
}

/// Shared between the node's event loop (which updates it) and its HTTP endpoints.
#[derive(Debug)]
pub(crate) struct Health {
    state: Mutex<State>,
    stall_limit: Duration,
}

impl Health {
    /// A starting node's health; the loop counts as stalled once it has been busy with one
    /// event for longer than `stall_limit`.
    pub(crate) fn new(stall_limit: Duration) -> Self {
        Health {
            state: Mutex::new(State {
                phase: Phase::Starting,
                busy_since: None,
                ready: Err("starting: connecting to etcd".into()),
                ready_until: None,
            }),
            stall_limit,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn set_phase(&self, phase: Phase) {
        let mut s = self.state();
        if s.phase != Phase::Ended {
            s.phase = phase;
        }
    }

    #[cfg(test)]
    pub(crate) fn phase(&self) -> Phase {
        self.state().phase
    }

    /// The loop starts handling an event.
    pub(crate) fn busy(&self) {
        self.state().busy_since = Some(Instant::now());
    }

    /// The loop waits for the next event.
    pub(crate) fn idle(&self) {
        self.state().busy_since = None;
    }

    /// Publishes the node's readiness; a `200` expires at `until` (the lease's local deadline)
    /// unless the loop publishes again.
    pub(crate) fn set_ready(&self, ready: Result<String, String>, until: Option<Instant>) {
        let mut s = self.state();
        s.ready = ready;
        s.ready_until = until;
    }

    /// Marks the loop as waiting for etcd until the guard is dropped (then as running again).
    pub(crate) fn waiting_for_etcd(&self) -> WaitGuard<'_> {
        self.set_phase(Phase::WaitingForEtcd);
        WaitGuard(self)
    }

    /// Marks the node ended when dropped (also when the node's future is aborted).
    pub(crate) fn end_on_drop(&self) -> EndGuard<'_> {
        EndGuard(self)
    }

    /// `/healthz`: `Ok` with a short status, or `Err` with the reason it fails.
    pub(crate) fn live(&self) -> Result<String, String> {
        let s = self.state();
        match s.phase {
            Phase::Starting => Ok("starting: connecting to etcd".into()),
            Phase::WaitingForEtcd => Ok("waiting for etcd".into()),
            Phase::Ended => Err("the node has ended".into()),
            Phase::Running => match s.busy_since {
                Some(t) if t.elapsed() > self.stall_limit => Err(format!(
                    "the event loop has been busy with one event for {:.1?} (limit {:?}): a task handler may be blocking it",
                    t.elapsed(),
                    self.stall_limit
                )),
                _ => Ok("ok".into()),
            },
        }
    }

    /// `/readyz`: `Ok` with what the node does, or `Err` with why it is not ready.
    pub(crate) fn ready(&self) -> Result<String, String> {
        let s = self.state();
        if s.phase == Phase::Ended {
            return Err("the node has ended".into());
        }
        match (&s.ready, s.ready_until) {
            (Ok(_), Some(until)) if Instant::now() >= until => Err(
                "the lease was not renewed before its local deadline: not acting in its slot"
                    .into(),
            ),
            (r, _) => r.clone(),
        }
    }
}

/// See [`Health::waiting_for_etcd`].
#[derive(Debug)]
pub(crate) struct WaitGuard<'a>(&'a Health);

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        self.0.set_phase(Phase::Running);
    }
}

/// See [`Health::end_on_drop`].
#[derive(Debug)]
pub(crate) struct EndGuard<'a>(&'a Health);

impl Drop for EndGuard<'_> {
    fn drop(&mut self) {
        let mut s = self.0.state();
        s.phase = Phase::Ended;
        s.ready = Err("the node has ended".into());
    }
}

/// What `/readyz` says about node `me`: `view` is the job as last seen in etcd (`None` until
/// read), `mine` the slot it holds, `entered` the last epoch its task entered as primary,
/// `in_step` whether as backup it has applied its primary's state, `acting` whether its lease
/// is within its local deadline.
pub(crate) fn readiness(
    view: Option<&JobView>,
    me: &str,
    mine: MySlot,
    entered: Option<Epoch>,
    in_step: bool,
    acting: bool,
) -> Result<String, String> {
    let Some(view) = view else {
        return Err("starting: the job has not been read from etcd yet".into());
    };
    let current = match view.epoch {
        Some(EpochValue::Done(e)) => return Err(format!("the job finished at epoch {e}")),
        Some(EpochValue::Running(e)) => e,
        None => return Err("the job's epoch has not been read from etcd yet".into()),
    };
    if !acting {
        return Err("no valid lease (etcd unreachable?): not acting in any slot".into());
    }
    match mine {
        MySlot::Primary { task, term } => match entered {
            Some(e) if e == current => Ok(format!(
                "primary of task {task} (term {term}) in epoch {current}"
            )),
            _ => Err(format!(
                "primary of task {task} (term {term}) has not entered epoch {current} yet"
            )),
        },
        MySlot::Backup { task, .. } if in_step => {
            Ok(format!("backup of task {task}, in step with its primary"))
        }
        MySlot::Backup { task, .. } => Err(format!(
            "backup of task {task} has not received its primary's state yet"
        )),
        // A spare waiting to be drafted sees task 0's slots only: it cannot tell whether a
        // slot is free elsewhere; the staffer, task 0's primary, can.
        MySlot::Spare if view.scope != Scope::All => {
            if view.has_no_node(0) {
                Err("spare: task 0 has no node; claiming it".into())
            } else {
                Ok("spare: waiting for the staffer (task 0's primary) to give it a slot".into())
            }
        }
        MySlot::Spare => match decide(view, me, mine, &mut |_| 0) {
            Decision::Stay => Ok("spare: every slot is taken; waiting to take over".into()),
            Decision::ClaimPrimary(t) | Decision::ClaimBackup(t, _) => Err(format!(
                "spare: task {t} has a free slot this node has not taken yet"
            )),
            Decision::Promote | Decision::Lost => Err("spare: deciding on a slot".into()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::etcd::keys::Holder;
    use crate::roles::SlotKey;

    fn slot(node: &str, rev: i64) -> SlotKey {
        SlotKey {
            holder: Holder {
                node: node.into(),
                addr: "a:1".into(),
            },
            create_revision: rev,
            lease: crate::etcd::lease::LeaseId(7),
        }
    }

    /// Two tasks, two replicas; task 0 fully staffed, task 1 with a primary only.
    fn view(epoch: EpochValue) -> JobView {
        let mut v = JobView::new(2, 2);
        v.epoch = Some(epoch);
        v.primaries.insert(0, slot("p0", 10));
        v.backups.insert((0, 1), slot("b0", 11));
        v.primaries.insert(1, slot("p1", 12));
        v
    }

    #[test]
    fn a_primary_is_ready_once_it_entered_the_current_epoch() {
        let v = view(EpochValue::Running(4));
        let p = MySlot::Primary { task: 0, term: 10 };
        let r = readiness(Some(&v), "p0", p, Some(3), false, true);
        assert_eq!(
            r,
            Err("primary of task 0 (term 10) has not entered epoch 4 yet".into())
        );
        let r = readiness(Some(&v), "p0", p, Some(4), false, true);
        assert_eq!(r, Ok("primary of task 0 (term 10) in epoch 4".into()));
        let r = readiness(Some(&v), "p0", p, Some(4), false, false);
        assert!(r.is_err_and(|e| e.contains("lease")));
    }

    #[test]
    fn a_backup_is_ready_once_in_step() {
        let v = view(EpochValue::Running(4));
        let b = MySlot::Backup {
            task: 0,
            k: 1,
            create_revision: 11,
        };
        assert!(readiness(Some(&v), "b0", b, None, false, true).is_err());
        assert!(readiness(Some(&v), "b0", b, None, true, true).is_ok());
    }

    #[test]
    fn a_spare_is_ready_only_when_no_slot_is_free() {
        let mut v = view(EpochValue::Running(4));
        let r = readiness(Some(&v), "s", MySlot::Spare, None, false, true);
        assert_eq!(
            r,
            Err("spare: task 1 has a free slot this node has not taken yet".into())
        );
        v.backups.insert((1, 1), slot("b1", 13));
        let r = readiness(Some(&v), "s", MySlot::Spare, None, false, true);
        assert!(r.is_ok(), "{r:?}");
    }

    #[test]
    fn a_spare_waiting_for_a_draft_is_ready_while_task_0_has_a_node() {
        let mut v = view(EpochValue::Running(4));
        v.scope = Scope::Tasks(std::sync::Arc::new([0].into()));
        v.primaries.remove(&1);
        let r = readiness(Some(&v), "s", MySlot::Spare, None, false, true);
        assert_eq!(
            r,
            Ok("spare: waiting for the staffer (task 0's primary) to give it a slot".into())
        );
        v.primaries.remove(&0);
        assert!(readiness(Some(&v), "s", MySlot::Spare, None, false, true).is_ok());
        v.backups.remove(&(0, 1));
        let r = readiness(Some(&v), "s", MySlot::Spare, None, false, true);
        assert_eq!(r, Err("spare: task 0 has no node; claiming it".into()));
    }

    #[test]
    fn a_finished_job_or_an_unread_one_is_not_ready() {
        let v = view(EpochValue::Done(9));
        let p = MySlot::Primary { task: 0, term: 10 };
        assert_eq!(
            readiness(Some(&v), "p0", p, Some(9), false, true),
            Err("the job finished at epoch 9".into())
        );
        assert!(readiness(None, "p0", p, None, false, true).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn liveness_fails_when_the_loop_stalls_and_readiness_expires_with_the_lease() {
        let h = Health::new(Duration::from_secs(3));
        assert!(h.live().is_ok(), "starting counts as alive");
        assert!(h.ready().is_err());
        h.set_phase(Phase::Running);
        h.busy();
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(h.live().is_ok());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(h.live().is_err_and(|e| e.contains("busy")));
        h.idle();
        assert!(h.live().is_ok());
        h.set_ready(
            Ok("primary".into()),
            Some(Instant::now() + Duration::from_secs(1)),
        );
        assert!(h.ready().is_ok());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(h.ready().is_err_and(|e| e.contains("deadline")));
        drop(h.end_on_drop());
        assert_eq!(h.phase(), Phase::Ended);
        assert!(h.live().is_err() && h.ready().is_err());
    }
}
