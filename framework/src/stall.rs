//! Stall detection: when the job's epoch has not moved for longer than the *stall time*, a node
//! says why as far as it can tell, in its log and in its record in etcd (where `taskgraph
//! status`, `taskgraph events` and launchers read it). Pure: the clock is an argument.
//!
//! The stall time is [`FrameworkBuilder::stall_after`](crate::FrameworkBuilder::stall_after)
//! when set, else three lease TTLs plus three times the slowest epoch this node has seen, so a
//! job whose epochs are long by nature is not reported as stalled after its first long epoch.

use std::time::Duration;

use tokio::time::Instant;

use crate::etcd::keys::{EpochValue, Holder, JobKey, JobKeys, StallReason};
use crate::etcd::lease::LeaseId;
use crate::etcd::Kv;
use crate::roles::{JobView, SlotKey};
use crate::TaskId;

/// At most this many tasks without a primary are named one by one in a stall's reasons.
const NAMED_TASKS: usize = 8;

/// When the job's epoch last moved, as one node sees it.
#[derive(Debug)]
pub(crate) struct StallWatch {
    configured: Option<Duration>,
    lease_ttl: Duration,
    epoch: Option<EpochValue>,
    moved_at: Instant,
    slowest: Duration,
    /// When the current stall was last reported (logged, and published when this node is a
    /// reporter); `None` while the job moves.
    reported_at: Option<Instant>,
}

impl StallWatch {
    pub(crate) fn new(now: Instant, lease_ttl: Duration, configured: Option<Duration>) -> Self {
        Self {
            configured,
            lease_ttl,
            epoch: None,
            moved_at: now,
            slowest: Duration::ZERO,
            reported_at: None,
        }
    }

    /// The stall time now.
    pub(crate) fn after(&self) -> Duration {
        self.configured
            .unwrap_or(self.lease_ttl * 3 + self.slowest * 3)
    }

    /// Notes the job's (last good) epoch. Returns `true` when it moved while a stall was
    /// reported: the stall is over.
    pub(crate) fn epoch_seen(&mut self, epoch: Option<EpochValue>, now: Instant) -> bool {
        if epoch == self.epoch {
            return false;
        }
        if self.epoch.is_some() {
            self.slowest = self
                .slowest
                .max(now.saturating_duration_since(self.moved_at));
        }
        self.epoch = epoch;
        self.moved_at = now;
        self.reported_at.take().is_some()
    }

    /// `Some((epoch, for))` when the running job's epoch has not moved for longer than the
    /// stall time and the stall is due to be reported (first, then once per stall time).
    pub(crate) fn due(&mut self, now: Instant) -> Option<(u64, Duration)> {
        let Some(EpochValue::Running(epoch)) = self.epoch else {
            return None;
        };
        let still = now.saturating_duration_since(self.moved_at);
        let after = self.after();
        if still <= after {
            return None;
        }
        if self
            .reported_at
            .is_some_and(|at| now.saturating_duration_since(at) < after)
        {
            return None;
        }
        self.reported_at = Some(now);
        Some((epoch, still))
    }

    /// Whether a stall is being reported.
    #[cfg(test)]
    pub(crate) fn reported(&self) -> bool {
        self.reported_at.is_some()
    }
}

/// `view` with every task's slot keys from `kvs` (a read of the job's slot keys): what a slot
/// holder, which watches only a few tasks, judges a stall's job-wide causes on. Only which
/// slots are taken matters there; the holders' values are not parsed.
pub(crate) fn slots_view(view: &JobView, keys: &JobKeys, kvs: &[Kv]) -> JobView {
    let mut full = JobView::new(view.tasks, view.replicas);
    full.epoch = view.epoch;
    full.epoch_fault = view.epoch_fault.clone();
    full.revision = view.revision;
    for kv in kvs {
        let slot = || SlotKey {
            holder: Holder {
                node: String::new(),
                addr: String::new(),
            },
            create_revision: kv.create_revision,
            lease: LeaseId(kv.lease),
        };
        match keys.parse(&kv.key) {
            Some(JobKey::Primary(t)) if t < view.tasks => {
                full.primaries.insert(t, slot());
            }
            Some(JobKey::Backup(t, k)) if t < view.tasks && k >= 1 && k < view.replicas => {
                full.backups.insert((t, k), slot());
            }
            _ => {}
        }
    }
    full
}

/// What the job's view shows as causes of a stall: keys the framework owns that hold bad
/// values, tasks without a primary.
pub(crate) fn view_reasons(
    view: &JobView,
    keys: &JobKeys,
    spec_fault: Option<&str>,
) -> Vec<StallReason> {
    let mut reasons = Vec::new();
    if let Some(fault) = &view.epoch_fault {
        let known = view.epoch.map_or("none seen".to_owned(), |e| e.encode());
        reasons.push(StallReason {
            task: None,
            key: Some(keys.epoch()),
            text: format!(
                "the epoch key holds {}, not written by the framework (last good value: {known}); \
                 the job's reporter (task 0's primary, normally) and the epoch's driver rewrite it, or put the last good value back",
                fault.kind
            ),
        });
    }
    if let Some(fault) = spec_fault {
        reasons.push(StallReason {
            task: None,
            key: Some(keys.spec()),
            text: format!("the job's spec in etcd is bad: {fault}"),
        });
    }
    // Only tasks whose slot keys the view shows (see `slots_view` for a full one).
    let down: Vec<TaskId> = (0..view.tasks)
        .filter(|t| view.shows(*t) && !view.primaries.contains_key(t))
        .collect();
    for &t in down.iter().take(NAMED_TASKS) {
        let backups = view.backups_of(t).count();
        let text = if backups > 0 {
            format!("task {t} has no primary; its {backups} backup(s) have not taken over")
        } else {
            format!("task {t} has no primary and no backup: it waits for a spare node to restore it from its checkpoint")
        };
        reasons.push(StallReason {
            task: Some(t),
            key: Some(keys.primary(t)),
            text,
        });
    }
    if down.len() > NAMED_TASKS {
        reasons.push(StallReason {
            task: None,
            key: None,
            text: format!("{} more tasks have no primary", down.len() - NAMED_TASKS),
        });
    }
    reasons
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::roles::{EpochFault, EpochFaultKind};

    #[test]
    fn a_stall_is_due_after_the_stall_time_and_again_once_per_stall_time() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut w = StallWatch::new(t0, s, None);
        assert!(!w.epoch_seen(Some(EpochValue::Running(0)), t0));
        assert_eq!(w.after(), 3 * s);
        assert_eq!(w.due(t0 + 2 * s), None);
        // A slow epoch raises the stall time.
        assert!(!w.epoch_seen(Some(EpochValue::Running(1)), t0 + 2 * s));
        assert_eq!(w.after(), 9 * s);
        assert_eq!(w.due(t0 + 10 * s), None);
        assert_eq!(w.due(t0 + 12 * s), Some((1, 10 * s)));
        assert!(w.reported());
        // Not again before another stall time has passed.
        assert_eq!(w.due(t0 + 15 * s), None);
        assert_eq!(w.due(t0 + 21 * s), Some((1, 19 * s)));
        // The epoch moves: the stall is over.
        assert!(w.epoch_seen(Some(EpochValue::Running(2)), t0 + 22 * s));
        assert!(!w.reported());
        // A finished job never stalls.
        w.epoch_seen(Some(EpochValue::Done(2)), t0 + 23 * s);
        assert_eq!(w.due(t0 + 1000 * s), None);
    }

    #[test]
    fn a_configured_stall_time_wins() {
        let t0 = Instant::now();
        let mut w = StallWatch::new(t0, Duration::from_secs(10), Some(Duration::from_secs(2)));
        w.epoch_seen(Some(EpochValue::Running(5)), t0);
        assert_eq!(
            w.due(t0 + Duration::from_secs(3)),
            Some((5, Duration::from_secs(3)))
        );
    }

    #[test]
    fn reasons_name_bad_keys_and_tasks_without_a_primary() {
        let keys = JobKeys::new("j");
        let mut v = JobView::new(12, 2);
        v.epoch = Some(EpochValue::Running(4));
        // Eight tasks named, the other four counted.
        assert_eq!(view_reasons(&v, &keys, None).len(), 9);
        v.epoch_fault = Some(EpochFault {
            kind: EpochFaultKind::Garbage("x".into()),
            mod_revision: 9,
        });
        let r = view_reasons(&v, &keys, Some("not JSON"));
        assert_eq!(r[0].key.as_deref(), Some("/taskgraph/jobs/j/epoch"));
        assert!(r[0].text.contains("last good value: 4"), "{}", r[0].text);
        assert_eq!(r[1].key.as_deref(), Some("/taskgraph/jobs/j/spec"));
        assert_eq!(r[2].task, Some(0));
        assert!(r
            .last()
            .is_some_and(|l| l.text == "4 more tasks have no primary"));
    }
}
