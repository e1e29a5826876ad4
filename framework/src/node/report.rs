//! What the runtime reports and repairs beside the engine's decisions: rewriting bad keys the
//! engine asked to heal, and naming a stall (the job's epoch not moving) in the log, the
//! metrics and this node's record.

use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use super::runtime::Runtime;
use crate::etcd::keys::{StallNote, StallReason};
use crate::roles::{JobView, MySlot, Scope};
use crate::stall::{slots_view, view_reasons};
use crate::TaskId;

impl Runtime {
    pub(super) async fn heal_key(
        &mut self,
        what: &'static str,
        key: &str,
        guard: i64,
        value: Vec<u8>,
        fence: Option<(TaskId, crate::Term)>,
        lease: Option<crate::etcd::lease::LeaseId>,
    ) {
        let text = String::from_utf8_lossy(&value).into_owned();
        match self.store.heal(key, guard, value, fence, lease).await {
            Ok(true) => {
                self.metrics.key_healed(what);
                error!(
                    key,
                    wrote = text,
                    "healed a key the framework owns: rewrote its last good value"
                );
            }
            // Changed meanwhile (healed by another, or a newer write): judged when it arrives.
            Ok(false) => debug!(key, "the bad value changed before the heal"),
            Err(e) => warn!(key, error = %e, "could not heal the key"),
        }
    }

    /// After a batch of watch events: a stall ends when the epoch moves, and the note in this
    /// node's record is cleared.
    pub(super) async fn epoch_seen(&mut self) {
        let epoch = self.engine.view().and_then(|v| v.epoch);
        if self.stall.epoch_seen(epoch, Instant::now()) {
            info!("the job's epoch moves again: the stall is over");
            self.metrics.stalled(false);
            self.record_dirty |= self.record.stall.take().is_some();
        }
        if self.record_dirty && self.lease.borrow().valid_now() {
            self.record_dirty = false;
            let id = self.lease.borrow().id();
            if let Err(e) = self
                .store
                .register_node(&self.holder.node, &self.record, id)
                .await
            {
                warn!(error = %e, "could not clear the stall from this node's record");
            }
        }
    }

    /// Reports a stall when one is due: the job's epoch has not moved for longer than the
    /// stall time. The node logs what it can tell at error level; the job's reporter, and any
    /// node that sees a cause in its own slot, also writes it into its record in etcd (one
    /// write per stall time), where operators' tools read it.
    pub(super) async fn check_stall(&mut self) {
        if self.engine.view().is_none_or(JobView::finished) {
            return;
        }
        let now = Instant::now();
        let Some((epoch, still)) = self.stall.due(now) else {
            return;
        };
        let keys = self.store.keys().clone();
        let own = self.own_stall_reasons(now);
        let reporter = self.engine.job_reporter().is_some();
        let mut reasons = own.clone();
        if let Some(view) = self.engine.view().filter(|_| reporter) {
            // A slot holder watches a few tasks only: the job-wide causes are judged on a
            // read of every slot key (one read per stall time, by the reporter only).
            let full = match view.scope {
                Scope::All => None,
                Scope::Tasks(_) => match self.store.load_ranges(&[keys.all_slots()]).await {
                    Ok((kvs, _)) => Some(slots_view(view, &keys, &kvs)),
                    Err(e) => {
                        warn!(error = %e, "could not read the job's slot keys for the stall report");
                        None
                    }
                },
            };
            let view = full.as_ref().unwrap_or(view);
            reasons.extend(view_reasons(view, &keys, self.engine.spec_fault()));
        }
        let text = if reasons.is_empty() {
            "no cause seen from this node".to_owned()
        } else {
            reasons
                .iter()
                .map(|r| r.text.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        };
        error!(
            epoch,
            for_s = still.as_secs_f64(),
            stall_after_s = self.stall.after().as_secs_f64(),
            reasons = text,
            "the job is stalled: its epoch has not moved"
        );
        self.metrics.stalled(true);
        let publishes = reporter || !own.is_empty();
        if !publishes || !self.lease.borrow().valid_now() {
            return;
        }
        self.record.stall = Some(StallNote {
            epoch,
            for_ms: u64::try_from(still.as_millis()).unwrap_or(u64::MAX),
            after_ms: u64::try_from(self.stall.after().as_millis()).unwrap_or(u64::MAX),
            reasons,
        });
        let id = self.lease.borrow().id();
        if let Err(e) = self
            .store
            .register_node(&self.holder.node, &self.record, id)
            .await
        {
            warn!(error = %e, "could not publish the stall in this node's record");
        }
    }

    /// What this node sees in its own slot that holds the job up: a primary past its lease's
    /// local deadline, pulls retried for longer than half the stall time.
    pub(super) fn own_stall_reasons(&self, now: Instant) -> Vec<StallReason> {
        let mut reasons = Vec::new();
        let (MySlot::Primary { task, .. }, Some(slot)) = (self.engine.mine(), self.slot.as_ref())
        else {
            return reasons;
        };
        if !self.lease.borrow().valid_now() {
            reasons.push(StallReason {
                task: Some(task),
                key: None,
                text: format!(
                    "task {task}: its primary {} is not acting: its lease is past its local deadline (etcd slow or unreachable from it)",
                    self.holder.node
                ),
            });
        }
        let older = self.stall.after() / 2;
        for (id, method, waited) in slot.ctx.stuck_pulls(now, older) {
            let target = match self.engine.view().and_then(|v| v.primaries.get(&id.to)) {
                Some(p) => format!("its primary {} at {}", p.holder.node, p.holder.addr),
                None => "it has no primary".to_owned(),
            };
            reasons.push(StallReason {
                task: Some(id.to),
                key: None,
                text: format!(
                    "task {task}: {id} (method {method:?}) to task {} retried for {:.1} s; {target}",
                    id.to,
                    waited.as_secs_f64()
                ),
            });
        }
        reasons
    }
}
