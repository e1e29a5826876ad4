//! The engine's view of the job: applying the job watch's events. Every value is judged before
//! it is believed: a garbage slot value counts as taken (and is deleted when no live lease owns
//! it), an epoch the framework would never write is refused (`judge_epoch`), a bad `spec` or
//! own record is noted for healing.

use tokio::time::Instant;
use tracing::{debug, error, warn};

use super::{Command, Engine, Note, Removal, Staffing};
use crate::config::JobSpec;
use crate::etcd::keys::{term_of, Draft, EpochValue, Holder, JobKey, NodeRecord};
use crate::etcd::lease::LeaseId;
use crate::etcd::watch::JobEvent;
use crate::etcd::Kv;
use crate::roles::{judge_epoch, EpochFault, EpochFaultKind, JobView, MySlot, SlotKey};

/// The most epochs a reload's snapshot may show the job moved by for the ones between to be
/// entered (see [`Engine::reload_watch`]).
pub(super) const MAX_RELOAD_GAP: u64 = 1024;

impl Engine {
    /// Applies one watch event to the view, remembering every running epoch it reveals.
    pub(super) fn apply_event(&mut self, ev: JobEvent, now: Instant, out: &mut Vec<Command>) {
        match ev {
            JobEvent::Snapshot {
                kvs,
                revision,
                generation,
            } => {
                if generation != self.generation {
                    // Of ranges the watch followed before the last change: the snapshot of
                    // the current ones follows.
                    debug!(
                        generation,
                        current = self.generation,
                        "ignoring a snapshot of earlier ranges"
                    );
                    return;
                }
                debug!(revision, keys = kvs.len(), "job snapshot");
                // The first read after a reload: the watch was connected throughout, only not
                // sent what moved while it read (a later read of the same generation follows
                // a lost history, etcd's compaction: what moved then is not known).
                let reloaded = std::mem::take(&mut self.reloading);
                let seen = self.view.as_ref().and_then(|v| v.epoch);
                let mut view = JobView::new(self.tasks, self.replicas);
                view.scope = self.scope.clone();
                self.staff.clear();
                // The last good epoch survives a new read: a bad value is judged against it.
                if let Some(old) = self.view.as_ref() {
                    view.epoch = old.epoch;
                }
                let (mut epoch, mut spec, mut record) = (false, false, false);
                for kv in kvs {
                    match self.keys.parse(&kv.key) {
                        Some(JobKey::Epoch) => epoch = true,
                        Some(JobKey::Spec) => spec = true,
                        Some(JobKey::Node(n)) if n == self.me.node => record = true,
                        _ => {}
                    }
                    self.apply_put(&mut view, kv, true, out);
                }
                if !epoch {
                    self.epoch_key_missing(&mut view, out);
                }
                if !spec {
                    self.spec_key_missing(out);
                }
                if !record
                    && revision > self.registered_at
                    && self.registered_at > 0
                    && self.acting(now)
                {
                    self.own_record_bad(0, "deleted", out);
                }
                view.revision = revision;
                if let (true, Some(EpochValue::Running(from)), Some(EpochValue::Running(to))) =
                    (reloaded, seen, view.epoch)
                {
                    // A read takes milliseconds; a wider jump is not what moved meanwhile (a
                    // value written by someone else, accepted from a read as the job's): the
                    // epoch read only, as after a lost history.
                    let fill = if to > from && to - from <= MAX_RELOAD_GAP {
                        from + 1..to
                    } else {
                        to..to
                    };
                    for e in fill {
                        if self.observed.last().is_none_or(|last| *last < e) {
                            self.observed.push(e);
                        }
                    }
                }
                self.view = Some(view);
            }
            JobEvent::Put(kv) => {
                if let Some(mut view) = self.view.take() {
                    view.revision = view.revision.max(kv.mod_revision);
                    self.apply_put(&mut view, kv, false, out);
                    self.view = Some(view);
                }
            }
            JobEvent::Delete { key, revision } => {
                if let Some(mut view) = self.view.take() {
                    view.revision = view.revision.max(revision);
                    match self.keys.parse(&key) {
                        Some(JobKey::Primary(t)) => {
                            view.primaries.remove(&t);
                        }
                        Some(JobKey::Backup(t, k)) => {
                            view.backups.remove(&(t, k));
                        }
                        Some(JobKey::Epoch) => self.epoch_key_missing(&mut view, out),
                        Some(JobKey::Spec) => self.spec_key_missing(out),
                        Some(JobKey::Node(n)) => {
                            self.staff.record_deleted(&n);
                            if n == self.me.node
                                && revision > self.registered_at
                                && self.acting(now)
                            {
                                // With the lease valid here, etcd did not end it: someone
                                // deleted the record. (When the lease ended, a new lease
                                // registers again.)
                                self.own_record_bad(0, "deleted", out);
                            }
                        }
                        Some(JobKey::Draft(n)) => self.staff.draft_deleted(&n),
                        _ => {}
                    }
                    self.view = Some(view);
                }
            }
            JobEvent::Disconnected => {
                warn!("lost the job watch; resuming when etcd answers");
                return;
            }
        }
        self.await_change = false;
        if let Some(EpochValue::Running(n)) = self.view.as_ref().and_then(|v| v.epoch) {
            if self.observed.last().is_none_or(|last| *last < n) {
                self.observed.push(n);
            }
        }
    }

    fn epoch_key_missing(&self, view: &mut JobView, out: &mut Vec<Command>) {
        error!(
            key = self.keys.epoch(),
            last_good = view.epoch.map(|e| e.encode()),
            "the job's epoch key is missing; keeping the last epoch seen"
        );
        out.push(Command::Note(Note::BadValue("epoch")));
        view.epoch_fault = Some(EpochFault {
            kind: EpochFaultKind::Missing,
            mod_revision: 0,
        });
    }

    fn spec_key_missing(&mut self, out: &mut Vec<Command>) {
        error!(
            key = self.keys.spec(),
            "the job's spec key is missing; this node keeps its own"
        );
        out.push(Command::Note(Note::BadValue("spec")));
        self.spec_fault = Some(("deleted".into(), 0));
    }

    /// This node's own record holds a value it did not write (`guard`: its revision; 0 when
    /// deleted): the node rewrites it.
    fn own_record_bad(&mut self, guard: i64, what: &str, out: &mut Vec<Command>) {
        error!(
            key = self.keys.node(&self.me.node),
            found = what,
            "this node's record holds a value it did not write"
        );
        out.push(Command::Note(Note::BadValue("node")));
        self.record_fault = Some(guard);
    }

    fn apply_put(&mut self, view: &mut JobView, kv: Kv, snapshot: bool, out: &mut Vec<Command>) {
        // Written out only if logged: most events log nothing.
        let key = KeyText(&kv.key);
        let own_lease = kv.lease != 0 && LeaseId(kv.lease) == self.lease.id();
        match self.keys.parse(&kv.key) {
            Some(JobKey::Epoch) => match judge_epoch(view.epoch, &kv.value, snapshot) {
                Ok(v) => {
                    view.epoch = Some(v);
                    view.epoch_fault = None;
                }
                Err(kind) => {
                    error!(
                        ?key,
                        found = %kind,
                        last_good = view.epoch.map(|e| e.encode()),
                        "the epoch key holds a value the framework did not write; keeping the last good epoch"
                    );
                    out.push(Command::Note(Note::BadValue("epoch")));
                    view.epoch_fault = Some(EpochFault {
                        kind,
                        mod_revision: kv.mod_revision,
                    });
                }
            },
            Some(JobKey::Primary(t)) | Some(JobKey::Backup(t, _)) if t >= view.tasks => {
                warn!(
                    ?key,
                    tasks = view.tasks,
                    "rejected slot key of a task out of range"
                );
            }
            Some(k @ (JobKey::Primary(_) | JobKey::Backup(..))) => {
                let holder = match serde_json::from_slice::<Holder>(&kv.value) {
                    Ok(h) => h,
                    Err(e) => {
                        warn!(?key, error = %e, "rejected garbage slot value; the slot counts as taken until its key goes");
                        if own_lease {
                            // Garbage under this node's own slot key (its lease holds it): the
                            // node gives the slot up (its holder is not there any more) and
                            // must delete the key, or its live lease would keep the slot
                            // blocked for ever.
                            warn!(?key, "garbage under this node's own slot key: giving the slot up and deleting the key");
                        }
                        if kv.lease == 0 || own_lease {
                            // No node writes a slot without a lease: nobody owns this one.
                            out.push(Command::DeleteKey {
                                key: kv.key.clone(),
                                mod_revision: kv.mod_revision,
                                why: Removal::Garbage,
                            });
                        }
                        Holder {
                            node: String::from("<garbage>"),
                            addr: String::new(),
                        }
                    }
                };
                if holder.node == self.me.node && !self.draft_may_follow(&kv) {
                    self.delete_if_stray(&k, &kv, out);
                }
                let slot = SlotKey {
                    holder,
                    create_revision: kv.create_revision,
                    lease: LeaseId(kv.lease),
                };
                match k {
                    JobKey::Primary(t) => {
                        self.raise_fence(t, slot.term());
                        view.primaries.insert(t, slot);
                    }
                    JobKey::Backup(t, k) if k >= 1 && k < view.replicas => {
                        view.backups.insert((t, k), slot);
                    }
                    _ => warn!(?key, "rejected backup slot out of range"),
                }
            }
            Some(JobKey::Spec) => {
                let fault = match JobSpec::decode(&kv.value) {
                    Err(reason) => Some(reason),
                    Ok(stored) => JobSpec::decode(&self.spec)
                        .ok()
                        .and_then(|mine| JobSpec::difference(&stored, &mine))
                        .map(|d| format!("differs from the spec the job runs with: {d}")),
                };
                match fault {
                    Some(reason) => {
                        error!(
                            ?key,
                            reason, "the job's spec in etcd is bad; this node keeps its own"
                        );
                        out.push(Command::Note(Note::BadValue("spec")));
                        self.spec_fault = Some((reason, kv.mod_revision));
                    }
                    None => {
                        self.spec_revision = kv.create_revision;
                        // The spec as stored (with its creation time) is what a heal restores.
                        self.spec = kv.value;
                        self.spec_fault = None;
                    }
                }
            }
            Some(JobKey::Node(n)) => {
                self.staff.record_put(&n, &kv);
                if n == self.me.node {
                    // Written under another lease (or none), or not this node's record: not
                    // this node's write. (A stall note may lag behind the record: not compared.)
                    match serde_json::from_slice::<NodeRecord>(&kv.value) {
                        Ok(r) if own_lease && r.addr == self.me.addr => self.record_fault = None,
                        Ok(_) => {
                            self.own_record_bad(kv.mod_revision, "a record it did not write", out)
                        }
                        Err(_) => self.own_record_bad(kv.mod_revision, "garbage", out),
                    }
                }
            }
            Some(JobKey::Draft(n)) => match serde_json::from_slice::<Draft>(&kv.value) {
                Ok(draft) if n == self.me.node => self.own_draft(draft, &kv),
                Ok(_) => self.staff.draft_put(&n, kv.mod_revision),
                Err(e) => {
                    warn!(?key, error = %e, "rejected garbage draft value");
                    self.staff.draft_put(&n, kv.mod_revision);
                    if kv.lease == 0 || own_lease {
                        // Nobody's draft (no lease), or garbage under this node's own key:
                        // removed, so the staffer's next draft for the node starts clean.
                        out.push(Command::DeleteKey {
                            key: kv.key.clone(),
                            mod_revision: kv.mod_revision,
                            why: Removal::Garbage,
                        });
                    }
                }
            },
            Some(JobKey::Checkpoint(_) | JobKey::Result) => {}
            None => debug!(?key, "ignoring unknown key under the job's prefix"),
        }
    }

    /// Whether slot key `kv` under this node's lease may be a slot a draft gave it whose draft
    /// the watch has not delivered yet (the draft key is in another range of the watch, whose
    /// events are not ordered with this one's): a spare waiting to be drafted, and the key
    /// not older than every draft it has seen. Not judged a stray then: the draft takes it, or the
    /// lease sweep (which reads the draft key too) judges it. (A key of the draft just seen,
    /// whose revision it shares, is the draft's, about to be taken.)
    pub(super) fn draft_may_follow(&self, kv: &Kv) -> bool {
        self.staffing == Staffing::Drafted
            && self.mine == MySlot::Spare
            && kv.create_revision >= self.draft_seen
    }

    /// Deletes `kv` (parsed as `key`) if it is a stray: a slot key under this node's lease
    /// that is not its slot (see [`Engine::stray_key`]).
    pub(super) fn delete_if_stray(&self, key: &JobKey, kv: &Kv, out: &mut Vec<Command>) {
        if self.stray_key(key, kv) {
            warn!(
                key = ?KeyText(&kv.key),
                "a slot key under this node's lease that is not its slot (a claim whose \
                 answer was lost): deleting it"
            );
            out.push(Command::DeleteKey {
                key: kv.key.clone(),
                mod_revision: kv.mod_revision,
                why: Removal::Stray,
            });
        }
    }

    /// Whether a slot key under this node's current lease is not the slot the node holds: a
    /// claim whose answer was lost although etcd applied it, or a slot the node gave up while
    /// its key stayed. Such a key blocks the slot for as long as the node lives.
    fn stray_key(&self, key: &JobKey, kv: &Kv) -> bool {
        let lease = self.lease.id();
        if kv.lease == 0 || LeaseId(kv.lease) != lease {
            return false;
        }

        match (key, self.mine) {
            (&JobKey::Primary(t), MySlot::Primary { task, term }) => {
                !(t == task && term_of(kv.create_revision) == term)
            }
            (
                &JobKey::Backup(t, k),
                MySlot::Backup {
                    task,
                    k: mk,
                    create_revision,
                },
            ) => !(t == task && k == mk && kv.create_revision == create_revision),
            _ => true,
        }
    }
}

/// A key's bytes as text, converted only when logged (shown quoted, as a `String` field is).
struct KeyText<'a>(&'a [u8]);

impl std::fmt::Debug for KeyText<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(self.0))
    }
}
