//! Staffing: who gives spares their slots.
//!
//! With [`Staffing::Drafted`] (the default) a spare watches only its own keys and task 0's
//! slot keys, and waits. Task 0's acting primary is the **staffer**: its watch holds every
//! node record, draft and slot key (one range, so one order), and whenever a spare waits and a
//! slot is free it gives slots to spares by the same rule a spare would use for itself
//! ([`decide`]: tasks without any node first, then the task with the fewest backups), many
//! per etcd transaction and several transactions at once ([`Command::Draft`]; a round
//! drafts primaries or backups, never both, since its transactions may apply in any order).
//! Each draft creates the slot key under the spare's lease and writes `drafts/<spare>` naming
//! the slot, in one transaction that checks that the staffer is still task 0's primary, that
//! the job runs, that the slot is free (and, for a primary slot, that the task has no backup),
//! that the spare is still registered under the same record and that its draft key is as the
//! staffer saw it. A spare that sees its
//! draft (under its current lease) holds the slot exactly as if it had claimed it.
//!
//! Task 0 itself, while it has no node at all, is claimed by the spares (they watch its slot
//! keys for that). A backup of task 0 takes over as primary, and so as staffer, as any backup
//! does, and it watches what the staffer watches, so staffing goes on at once.
//!
//! Cost: a spare sees O(1) events while the job staffs, however many nodes join; the staffer
//! sees every node and slot change, once; a slot needs about 1/30 of a transaction.
//! Promotion of backups never waits for the staffer.

use std::collections::{BTreeMap, BTreeSet};

use rand::Rng;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{Claim, ClaimOutcome, Command, Engine};
use crate::etcd::keys::{Draft, Holder, NodeRecord};
use crate::etcd::lease::LeaseId;
use crate::etcd::{DraftOrder, DraftOutcome, Kv};
use crate::retry;
use crate::roles::{decide, Decision, JobView, MySlot, Scope, SlotKey};

/// Draft rounds in a row that find the view stale before the staffer reads the job again.
pub(super) const STALE_DRAFTS_BEFORE_RELOAD: u32 = 5;

/// How spares come to hold slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Staffing {
    /// Task 0's primary gives spares their slots (see the module's documentation).
    Drafted,
    /// Each spare watches every slot key and claims a free one itself: no staffer to wait
    /// for, but every slot change reaches every spare (O(nodes²) events while a large job
    /// staffs).
    #[cfg_attr(not(test), allow(dead_code))]
    SelfClaimed,
}

/// A node as the staffer sees it, from its record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NodeEntry {
    addr: String,
    lease: LeaseId,
    create_revision: i64,
    drafted: bool,
}

/// The staffer's bookkeeping (empty on every other node).
#[derive(Debug, Default)]
pub(crate) struct StaffBook {
    /// Every registered node, by id (the staffer's watch holds every record).
    nodes: BTreeMap<String, NodeEntry>,
    /// The mod revision of every `drafts/<node>` key, by node.
    drafts: BTreeMap<String, i64>,
    /// A draft command is out.
    drafting: bool,
    /// Drafts are planned only on a view at or past this revision (the last applied ones).
    wait_revision: i64,
    /// Draft rounds in a row that stopped early, and the time before which the next may not go.
    setbacks: u32,
    after: Option<Instant>,
}

impl StaffBook {
    /// Forgets every node and draft (before a new snapshot is applied).
    pub(super) fn clear(&mut self) {
        self.nodes.clear();
        self.drafts.clear();
    }

    /// A node record written (`kv`) under `nodes/<node>`.
    pub(super) fn record_put(&mut self, node: &str, kv: &Kv) {
        match serde_json::from_slice::<NodeRecord>(&kv.value) {
            Ok(r) if kv.lease != 0 => {
                self.nodes.insert(
                    node.to_owned(),
                    NodeEntry {
                        addr: r.addr,
                        lease: LeaseId(kv.lease),
                        create_revision: kv.create_revision,
                        drafted: r.drafted,
                    },
                );
            }
            // Not a record its node wrote (no lease, garbage): not a node to draft.
            _ => {
                self.nodes.remove(node);
            }
        }
    }

    pub(super) fn record_deleted(&mut self, node: &str) {
        self.nodes.remove(node);
    }

    pub(super) fn draft_put(&mut self, node: &str, mod_revision: i64) {
        self.drafts.insert(node.to_owned(), mod_revision);
    }

    pub(super) fn draft_deleted(&mut self, node: &str) {
        self.drafts.remove(node);
    }
}

impl Engine {
    /// Whether this node is the staffer now: drafting, acting primary of task 0, with the
    /// staffer's view loaded.
    pub(super) fn is_staffer(&self, now: Instant) -> bool {
        self.staffing == Staffing::Drafted
            && self.scope == Scope::All
            && self.acting_primary(now).is_some_and(|(t, _)| t == 0)
    }

    /// Whether the node watches as a staffer does: a holder of one of task 0's slots.
    pub(super) fn watches_staff(&self, task: Option<crate::TaskId>) -> bool {
        self.staffing == Staffing::Drafted && task == Some(0)
    }

    /// As the staffer: gives free slots to waiting spares, if both exist and no draft is out.
    pub(super) fn staff(&mut self, now: Instant, out: &mut Vec<Command>) {
        let Some((_, term)) = self.acting_primary(now) else {
            return;
        };
        let Some(view) = self.view.as_ref() else {
            return;
        };
        let staff = &self.staff;
        if staff.drafting
            || view.scope != Scope::All
            || view.revision < staff.wait_revision
            || view.finished()
        {
            return;
        }
        if let Some(at) = staff.after {
            if now < at {
                self.retry_at = Some(self.retry_at.map_or(at, |r| r.min(at)));
                return;
            }
        }
        let slots = view.tasks as usize * view.replicas as usize;
        if view.primaries.len() + view.backups.len() >= slots {
            return;
        }
        let holding: BTreeSet<&str> = view
            .primaries
            .iter()
            .map(|(_, s)| s.holder.node.as_str())
            .chain(view.backups.iter().map(|(_, s)| s.holder.node.as_str()))
            .collect();
        let mut waiting: Vec<(&String, &NodeEntry)> = staff
            .nodes
            .iter()
            .filter(|(n, e)| e.drafted && !holding.contains(n.as_str()))
            .collect();
        if waiting.is_empty() {
            return;
        }
        // The longest-registered first.
        waiting.sort_by_key(|(n, e)| (e.create_revision, n.as_str()));
        let mut plan: JobView = view.clone();
        let mut orders = Vec::new();
        let rng = &mut self.rng;
        for (node, entry) in waiting {
            let draft = match decide(&plan, node, MySlot::Spare, &mut |n| rng.random_range(0..n)) {
                Decision::ClaimPrimary(task) => Draft { task, slot: 0 },
                Decision::ClaimBackup(task, slot) => Draft { task, slot },
                _ => break,
            };
            // A task's primary and its backup are never drafted in one round: the round's
            // transactions may apply in any order, and a backup drafted before its primary
            // would leave the task with a backup that never had one to follow (the primary's
            // draft then fails: the task has a backup). Primaries come first; their backups
            // in the next round, once the view shows the primaries.
            if orders
                .first()
                .is_some_and(|o: &DraftOrder| (o.draft.slot == 0) != (draft.slot == 0))
            {
                break;
            }
            let holder = Holder {
                node: node.clone(),
                addr: entry.addr.clone(),
            };
            let key = SlotKey {
                holder: holder.clone(),
                create_revision: i64::MAX,
                lease: entry.lease,
            };
            if draft.slot == 0 {
                plan.primaries.insert(draft.task, key);
            } else {
                plan.backups.insert((draft.task, draft.slot), key);
            }
            orders.push(DraftOrder {
                holder,
                lease: entry.lease,
                record_revision: entry.create_revision,
                draft_revision: staff.drafts.get(node).copied().unwrap_or(0),
                draft,
            });
        }
        if orders.is_empty() {
            return;
        }
        debug!(drafts = orders.len(), "drafting spares into free slots");
        self.staff.drafting = true;
        out.push(Command::Draft { term, orders });
    }

    /// The outcome of the drafts out.
    pub(super) fn drafted(&mut self, outcome: DraftOutcome, now: Instant, out: &mut Vec<Command>) {
        let staff = &mut self.staff;
        staff.drafting = false;
        if outcome.applied > 0 {
            info!(slots = outcome.applied, "drafted spares into free slots");
            staff.wait_revision = staff.wait_revision.max(outcome.revision);
        }
        match outcome.stopped {
            None => {
                staff.setbacks = 0;
                staff.after = None;
            }
            Some(error) => {
                // A stale view (a spare left, a slot was taken) shows its change soon; etcd
                // failing may have applied the drafts or not: the transactions' checks make a
                // second try on either harmless. Both wait a little, longer each time.
                staff.setbacks += 1;
                let pause = match &error {
                    None => retry::CLAIM_CONTENTION.spread(staff.setbacks, self.rng.random()),
                    Some(_) => retry::ETCD.pause(staff.setbacks, self.rng.random()),
                };
                let mut reload = false;
                match error {
                    Some(error) => warn!(error, ?pause, "drafting failed; trying again"),
                    None if staff.setbacks >= STALE_DRAFTS_BEFORE_RELOAD => {
                        // The watch should have shown what made the view stale by now; it
                        // did not. (Seen once every lease ended at once, before the runtime
                        // stopped older watch ranges from replacing newer ones: the view
                        // lacked a draft of this staffer's own, and every later draft failed
                        // on it.) A safety net: read the job again rather than trust the view.
                        warn!(
                            setbacks = staff.setbacks,
                            "drafts keep finding the view stale: reading the job again"
                        );
                        staff.setbacks = 0;
                        reload = true;
                    }
                    None => debug!(?pause, "a draft found the view stale; drafting again"),
                }
                let at = now + pause;
                staff.after = Some(at);
                self.retry_at = Some(self.retry_at.map_or(at, |r| r.min(at)));
                if reload {
                    self.reload_watch(out);
                }
            }
        }
    }

    /// This node's own `drafts/` key (`kv`, parsed as `draft`): a slot the staffer gave it,
    /// taken when the node next decides, if it is still a spare under the same lease.
    pub(super) fn own_draft(&mut self, draft: Draft, kv: &Kv) {
        if kv.mod_revision <= self.draft_seen {
            return;
        }
        self.draft_seen = kv.mod_revision;
        let lease = LeaseId(kv.lease);
        if lease.is_none() || lease != self.lease.id() {
            debug!(
                ?draft,
                "a draft under another lease: not this node's to take"
            );
            return;
        }
        if draft.task >= self.tasks || draft.slot >= self.replicas {
            warn!(?draft, "a draft of a slot the job does not have: ignored");
            return;
        }
        if self.mine != MySlot::Spare {
            // Its slot key (under this node's lease) is a stray: the lease sweep removes it.
            warn!(?draft, "drafted while holding a slot: ignored");
            self.unanswered_claim = true;
            return;
        }
        let claim = if draft.slot == 0 {
            Claim::Primary {
                task: draft.task,
                lease,
            }
        } else {
            Claim::Backup {
                task: draft.task,
                k: draft.slot,
                lease,
            }
        };
        self.pending_draft = Some((claim, kv.mod_revision));
    }

    /// As a spare: takes the slot a draft gave it. `false` when there is none to take.
    pub(super) fn take_draft(&mut self, now: Instant, out: &mut Vec<Command>) -> bool {
        let Some((claim, revision)) = self.pending_draft.take() else {
            return false;
        };
        if self.mine != MySlot::Spare || claim_lease(claim) != self.lease.id() {
            return false;
        }
        info!(
            task = claim.task(),
            what = claim.what(),
            "drafted by the staffer"
        );
        self.claimed(claim, ClaimOutcome::Won(revision), now, out);
        true
    }
}

fn claim_lease(claim: Claim) -> LeaseId {
    match claim {
        Claim::Primary { lease, .. }
        | Claim::Backup { lease, .. }
        | Claim::Promote { lease, .. } => lease,
    }
}

/// How long a spare waits before it claims task 0 (which has no node) itself: one
/// millisecond per etcd revision between the job's creation and the spare's registration, at
/// most [`BOOTSTRAP_SPREAD`]. When many nodes start together, the first registered claims at
/// once and the others see its key before their turn comes, instead of all claiming the one
/// key together.
pub(super) fn bootstrap_delay(revisions_since_created: i64) -> std::time::Duration {
    let ms = u64::try_from(revisions_since_created).unwrap_or(0);
    std::time::Duration::from_millis(ms).min(BOOTSTRAP_SPREAD)
}

/// The longest wait of [`bootstrap_delay`].
pub(super) const BOOTSTRAP_SPREAD: std::time::Duration = std::time::Duration::from_millis(500);
