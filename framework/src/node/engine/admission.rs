//! Who may reach the task, and when: the term fence on senders, the admission of pulls and
//! metas (now, later, or refused), the replication stream's index rule, and what becomes of
//! the answers and outputs that come back to the slot (delivered, held until the lease is
//! confirmed, re-fetched from a newer primary, or dropped).

use tokio::time::Instant;

use super::Engine;
use crate::roles::MySlot;
use crate::wire::{Header, Rejection};
use crate::{Epoch, TaskId, Term};

/// When an admitted pull or meta reaches the task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum When {
    /// It is of the task's epoch.
    Now,
    /// It is of a later epoch: held until the task enters it.
    Later,
}

/// What to do with a replication entry a backup received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Replica {
    /// Apply it (then report [`super::Input::Replicated`]).
    Apply,
    /// A repeat of an entry already applied: acknowledge, do nothing.
    Repeat,
}

/// What becomes of something that came back to the slot (an answer to the task's pull, the
/// output of its spawned work, a timer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// Hand it to the task now.
    Deliver,
    /// Still this node's slot, but the lease is not confirmed: hold it until the renewal (a
    /// task acts only while its lease is valid).
    Defer,
    /// A newer primary of the pulled task is known: ask it instead.
    Refetch,
    /// Of another slot or another epoch: drop it.
    Drop,
}

impl Engine {
    /// Checks a sender's claimed term for `task`. Only terms etcd has shown count: a lower term
    /// than the highest seen, or the term of a primary whose key is gone, is refused as stale;
    /// a higher term than any seen is not believed (it would let one forged message fence off
    /// the real primary) — it is refused as "not primary yet", and the sender retries until
    /// this node's watch has caught up with its election. A sender whose task's slot keys
    /// the view does not show (a slot holder watches only a few tasks) is refused as "not
    /// primary yet" too, unless its term is below one etcd showed: the runtime then asks for
    /// that task's keys ([`Engine::unwatched`]), and the sender's retry finds them.
    pub(crate) fn fence_sender(&self, task: TaskId, term: Term) -> Result<(), Rejection> {
        let seen = self.fence_seen(task);
        let view = self.view.as_ref();
        let current = view.and_then(|v| v.primaries.get(&task)).map(|p| p.term());
        if term != 0 && current == Some(term) && term >= seen {
            return Ok(());
        }
        let shown = view.is_some_and(|v| v.shows(task));
        if term > seen || (term == seen && !shown) {
            return Err(Rejection::NotPrimary { task });
        }
        Err(Rejection::StaleTerm { task, term, seen })
    }

    /// Whether a pull or meta with `header` may reach this node's task at `now`: only its
    /// acting primary, from a sender whose term etcd shows, and now if it is of the task's
    /// epoch, later if of a later one.
    pub(crate) fn admit(&self, header: &Header, now: Instant) -> Result<When, Rejection> {
        let to = header.to_task;
        if self.acting_primary(now).is_none_or(|(t, _)| t != to) {
            return Err(Rejection::NotPrimary { task: to });
        }
        self.fence_sender(header.from_task, header.term)?;
        let Some(s) = self.slot.as_ref() else {
            return Err(Rejection::NotPrimary { task: to });
        };
        let epoch = header.epoch;
        match s.entered {
            Some(current) => match epoch.cmp(&current) {
                std::cmp::Ordering::Less => Err(Rejection::EpochMoved {
                    request_epoch: epoch,
                    current_epoch: current,
                }),
                std::cmp::Ordering::Equal => Ok(When::Now),
                std::cmp::Ordering::Greater => Ok(When::Later),
            },
            None => Err(Rejection::NotReady { task: to, epoch }),
        }
    }

    /// Whether a replication entry (`snapshot`, or an update with `index`) with `header` may
    /// reach this node's task at `now`: only its backup with a valid lease, from the primary
    /// whose term etcd shows; updates in order, once each.
    pub(crate) fn admit_replica(
        &self,
        header: &Header,
        snapshot: bool,
        index: u64,
        now: Instant,
    ) -> Result<Replica, Rejection> {
        let task = header.to_task;
        let is_backup = matches!(self.mine, MySlot::Backup { task: t, .. } if t == task);
        if !is_backup || !self.acting(now) {
            return Err(Rejection::NotPrimary { task });
        }
        self.fence_sender(task, header.term)?;
        let Some(s) = self.slot.as_ref() else {
            return Err(Rejection::NotPrimary { task });
        };
        let term = header.term;
        if snapshot {
            return Ok(Replica::Apply);
        }
        match s.replica {
            Some((t, last)) if t == term && last.checked_add(1) == Some(index) => {
                Ok(Replica::Apply)
            }
            Some((t, last)) if t == term && index <= last => Ok(Replica::Repeat),
            _ => Err(Rejection::NotReady {
                task,
                epoch: header.epoch,
            }),
        }
    }

    /// What becomes of something of slot `slot` and epoch `epoch` that came back at `now`
    /// (`pulled`: an answer from `Some((task, term))` to one of the task's pulls).
    pub(crate) fn route(
        &self,
        slot: u64,
        epoch: Epoch,
        pulled: Option<(TaskId, Term)>,
        now: Instant,
    ) -> Route {
        let Some(s) = self.slot.as_ref() else {
            return Route::Drop;
        };
        if slot != s.id || s.entered != Some(epoch) {
            return Route::Drop;
        }
        if self.acting_primary(now).is_none() {
            return if self.elected().is_some() {
                Route::Defer
            } else {
                Route::Drop
            };
        }
        match pulled {
            Some((task, term)) if term < self.fence_seen(task) => Route::Refetch,
            _ => Route::Deliver,
        }
    }
}
