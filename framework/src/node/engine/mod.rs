//! The node's decisions, as a pure state machine: inputs in, commands out.
//!
//! [`Engine::handle`] takes one [`Input`] (a batch of watch events, a lease state, the outcome
//! of a claim, a timer, stop) and the current time, updates the engine's state and returns the
//! [`Command`]s to carry it out, in order. The engine owns no clock, channel, client or task
//! value: it never awaits, never spawns, never reads the time, so every decision is tested by
//! asserting on command lists (see `tests`), in milliseconds and without etcd. The runtime
//! (`node::runtime`) turns the world into inputs and executes the commands.
//!
//! What lives here: the node's view of the job and how watch events change it (`view`); which
//! slot to claim, what a claim's outcome means and when to try again; which epochs the task
//! enters, once each and in order; who may reach the task and when (`admission`); neighbour
//! incidents; which slot holders to monitor; which backups to bring in step; which keys to
//! heal; what status to publish.
//!
//! Two rules the runtime keeps (the engine relies on them):
//! - **Sequencing.** The commands of one input are executed completely, in the order decided,
//!   before the next input is handled; a command that has an outcome (a claim, a new lease, a
//!   failed guard) feeds it back at once, and the commands that answer it join the end: they
//!   were decided after everything already queued ([`Agenda`]).
//! - **Guards.** A command whose [`Command::guard`] is `Some` is run only if the lease is
//!   still within its local deadline right before it runs; otherwise it is dropped and
//!   [`Input::GuardFailed`] carries it back, so the engine can undo what it planned.

mod admission;
mod agenda;
mod command;
mod neighbours;
mod staff;
mod view;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use taskgraph_topology::Links;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::etcd::keys::{term_of, EpochValue, Holder, JobKey, JobKeys, KeyRange};
use crate::etcd::lease::{LeaseId, LeaseState};
use crate::health::readiness;
use crate::retry;
use crate::role::{ExitReason, NodeExit, Role};
use crate::roles::{decide, watched, Decision, JobView, Member, MySlot, Scope, SlotKey};
use crate::{Epoch, TaskId, Term};
use neighbours::Incident;

pub(crate) use admission::{Replica, Route, When};
pub(crate) use agenda::{Agenda, Next};
pub(crate) use command::{Claim, ClaimOutcome, Command, Input, Note, Published, Removal, TaskCall};
pub(crate) use staff::Staffing;

/// A slot holder whose task talks to more tasks than this (its own, its neighbours over the
/// topology's period, task 0, others it pulled from) watches every slot key instead.
const MAX_SCOPED_TASKS: usize = 64;
/// A topology whose neighbourhoods repeat over more epochs than this is not walked to plan a
/// holder's watch: its holders watch every slot key.
const MAX_SCOPED_PERIOD: u64 = 1024;

/// What the engine keeps of the slot it holds.
#[derive(Debug)]
pub(crate) struct SlotBook {
    /// Identifies the slot among the ones the node has taken.
    pub(crate) id: u64,
    /// As primary: the last epoch entered under the current term.
    pub(crate) entered: Option<Epoch>,
    /// The epoch the slot's state shows.
    pub(crate) epoch: Epoch,
    /// As backup: the primary's term and the last index of its replication stream applied.
    pub(crate) replica: Option<(Term, u64)>,
    /// As primary: the neighbours' primaries, for neighbour incidents.
    neighbours: neighbours::NeighbourTracker,
}

/// The engine: the node's state as far as decisions need it.
pub(crate) struct Engine {
    me: Holder,
    keys: JobKeys,
    tasks: u32,
    replicas: u32,
    links: Links,
    /// The job's spec as stored (what a bad `spec` key is rewritten to).
    spec: Vec<u8>,
    /// `None` until the first snapshot of the job has arrived.
    view: Option<JobView>,
    mine: MySlot,
    lease: LeaseState,
    /// The revision of this node's registration under its current lease.
    registered_at: i64,
    slot: Option<SlotBook>,
    slots_taken: u64,
    /// Running epochs observed since the task last entered one, in order.
    observed: Vec<Epoch>,
    /// A claim failed on the current view: wait for the next change before claiming again.
    await_change: bool,
    /// A claim is out: no other until its outcome.
    claiming: Option<Claim>,
    /// etcd did not answer a claim: decide again at this time even if nothing changes.
    retry_at: Option<Instant>,
    /// Claims etcd did not answer in a row (the pause before the next grows with it).
    claim_failures: u32,
    /// Claims lost to other nodes in a row, and the time before which the next may not go
    /// out (see [`retry::CLAIM_CONTENTION`]).
    claim_losses: u32,
    claim_after: Option<Instant>,
    /// Highest term seen per task (raised by the primary keys etcd shows, and own won claims).
    fence: BTreeMap<TaskId, Term>,
    /// Fence raises not yet handed to the runtime (see [`Engine::take_raised`]).
    raised: Vec<(TaskId, Term)>,
    /// Whose slot keys the job watch follows now, and its generation (raised with every
    /// change; snapshots of older generations are ignored).
    scope: Scope,
    generation: u64,
    /// The watch was asked to read its ranges afresh and its snapshot has not come yet: the
    /// epochs that moved meanwhile were never sent (see [`Engine::reload_watch`]).
    reloading: bool,
    /// The slot the scope was planned for (`None`: a spare's, every task).
    scope_task: Option<TaskId>,
    /// Tasks outside the topology the slot's work talks to, watched until the slot ends, in
    /// the order they were first talked to (their ranges are appended in that order, so the
    /// watch grows in place).
    lazy: Vec<TaskId>,
    /// The ranges the job watch follows now (of generation `generation`).
    ranges: Vec<KeyRange>,
    /// How spares come to hold slots, and as the staffer, its bookkeeping.
    staffing: Staffing,
    staff: staff::StaffBook,
    /// The mod revision of the last own draft seen (each is taken once), and a draft not
    /// taken yet, with its revision (the slot key's create revision).
    draft_seen: i64,
    pending_draft: Option<(Claim, i64)>,
    /// The create revision of the `spec` key (when the job was created), since when the view
    /// has shown task 0 without any node, and whether it has ever shown task 0 with a node (see
    /// [`staff::bootstrap_delay`]: only the job's first staffer waits its turn).
    spec_revision: i64,
    orphan_since: Option<Instant>,
    task0_staffed_seen: bool,
    /// A claim under the current lease had no answer (etcd may have applied it): once the
    /// node holds a slot, and so no longer watches every slot key, it looks for strays by
    /// lease ([`Command::FindStrays`]).
    unanswered_claim: bool,
    /// A bad value under this node's record, by the revision to heal over (0: deleted).
    record_fault: Option<i64>,
    /// A bad value under `spec`: why, and the revision to heal over (0: deleted).
    spec_fault: Option<(String, i64)>,
    /// Heals tried, by key and guard revision (each bad value once).
    heals_tried: Vec<(&'static str, i64)>,
    rng: StdRng,
    ended: bool,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("me", &self.me.node)
            .field("mine", &self.mine)
            .field("slot", &self.slot)
            .finish_non_exhaustive()
    }
}

/// Whether `lease` lets the node act at `now`.
pub(crate) fn acting_at(lease: &LeaseState, now: Instant) -> bool {
    matches!(lease, LeaseState::Alive { deadline, .. } if now < *deadline)
}

impl Engine {
    /// A spare that has not read the job yet. `spec` is the stored form of the spec it runs
    /// with; `seed` seeds the choice among equally good slots. Its first watch follows
    /// [`Engine::ranges`] (generation 0).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        me: Holder,
        job: &str,
        tasks: u32,
        replicas: u32,
        links: Links,
        spec: Vec<u8>,
        staffing: Staffing,
        seed: u64,
    ) -> Engine {
        let keys = JobKeys::new(job);
        let (scope, ranges) = match staffing {
            Staffing::Drafted => (
                Scope::Tasks(std::sync::Arc::new([0].into_iter().collect())),
                keys.spare_watch(&me.node),
            ),
            Staffing::SelfClaimed => (Scope::All, keys.node_watch(&me.node)),
        };
        Engine {
            me,
            keys,
            tasks,
            replicas,
            links,
            spec,
            view: None,
            mine: MySlot::Spare,
            lease: LeaseState::Expired { id: LeaseId::NONE },
            registered_at: 0,
            slot: None,
            slots_taken: 0,
            observed: Vec::new(),
            await_change: false,
            claiming: None,
            retry_at: None,
            claim_failures: 0,
            claim_losses: 0,
            claim_after: None,
            fence: BTreeMap::new(),
            raised: Vec::new(),
            scope,
            generation: 0,
            reloading: false,
            scope_task: None,
            lazy: Vec::new(),
            ranges,
            staffing,
            staff: Default::default(),
            draft_seen: 0,
            pending_draft: None,
            spec_revision: 0,
            orphan_since: None,
            task0_staffed_seen: false,
            unanswered_claim: false,
            record_fault: None,
            spec_fault: None,
            heals_tried: Vec::new(),
            rng: StdRng::seed_from_u64(seed),
            ended: false,
        }
    }

    // ---- what the runtime reads ----

    /// The ranges the job watch follows now.
    pub(crate) fn ranges(&self) -> &[KeyRange] {
        &self.ranges
    }
    /// The view (`None` before the first snapshot).
    pub(crate) fn view(&self) -> Option<&JobView> {
        self.view.as_ref()
    }
    /// The slot this node holds.
    pub(crate) fn mine(&self) -> MySlot {
        self.mine
    }
    /// The slot's bookkeeping.
    pub(crate) fn slot(&self) -> Option<&SlotBook> {
        self.slot.as_ref()
    }
    /// When to feed [`Input::Retry`].
    pub(crate) fn retry_at(&self) -> Option<Instant> {
        self.retry_at
    }
    /// The highest term seen for `task` (0 if none).
    pub(crate) fn fence_seen(&self, task: TaskId) -> Term {
        self.fence.get(&task).copied().unwrap_or(0)
    }
    /// Why the `spec` key is bad, while it is.
    pub(crate) fn spec_fault(&self) -> Option<&str> {
        self.spec_fault.as_ref().map(|(r, _)| r.as_str())
    }
    /// Whether the node may act at `now`.
    pub(crate) fn acting(&self, now: Instant) -> bool {
        acting_at(&self.lease, now)
    }
    /// The task this node acts for as primary at `now`, with its term.
    pub(crate) fn acting_primary(&self, now: Instant) -> Option<(TaskId, Term)> {
        match self.mine {
            MySlot::Primary { task, term } if self.acting(now) => Some((task, term)),
            _ => None,
        }
    }
    /// The term this node was elected with, lease valid or not.
    pub(crate) fn elected(&self) -> Option<Term> {
        match self.mine {
            MySlot::Primary { term, .. } => Some(term),
            _ => None,
        }
    }
    /// `Some((task, term))` when this node speaks for the whole job (heals `epoch` and `spec`,
    /// reports a stall's job-wide causes): the primary of the lowest task that has a primary in
    /// its view (task 0's, unless task 0 has none right now).
    pub(crate) fn job_reporter(&self) -> Option<(TaskId, Term)> {
        let MySlot::Primary { task, term } = self.mine else {
            return None;
        };
        let lowest = self.view.as_ref()?.primaries.keys().next().copied();
        (lowest == Some(task)).then_some((task, term))
    }

    /// The lease as its keeper shows it now, without reacting to it (that is
    /// [`Input::Lease`]): the runtime calls this before each input and each admission, so the
    /// engine never judges by a lease the keeper has already renewed or lost.
    pub(crate) fn observe_lease(&mut self, lease: LeaseState) {
        self.lease = lease;
    }

    // ---- inputs ----

    /// Handles one input at `now` and returns what to do, in order.
    pub(crate) fn handle(&mut self, input: Input, now: Instant) -> Vec<Command> {
        let mut out = Vec::new();
        if self.ended {
            return out;
        }
        match input {
            Input::Watch(events) => {
                let before = self.view.as_ref().and_then(|v| v.epoch);
                for ev in events {
                    self.apply_event(ev, now, &mut out);
                }
                self.view_changed(before, now, &mut out);
            }
            Input::EpochCommitted { epoch, revision } => {
                let Some(view) = self.view.as_mut() else {
                    return out;
                };
                let before = view.epoch;
                // News only while the view has seen nothing at or after the put (every range
                // of the watch delivers in revision order, so no later epoch was applied) and
                // shows the epoch the swap compared against.
                if revision <= view.revision
                    || epoch == 0
                    || before != Some(EpochValue::Running(epoch - 1))
                {
                    return out;
                }
                view.epoch = Some(EpochValue::Running(epoch));
                if self.observed.last().is_none_or(|last| *last < epoch) {
                    self.observed.push(epoch);
                }
                self.view_changed(before, now, &mut out);
            }
            Input::Lease(state) => {
                self.lease = state;
                match state {
                    LeaseState::Expired { id } => {
                        self.pending_draft = None;
                        warn!(
                            lease = format!("{id:x}"),
                            "lease expired: giving up the slot and rejoining as a spare"
                        );
                        self.lose_slot(now, &mut out);
                        out.push(Command::NewLease);
                    }
                    LeaseState::Suspended { .. } => out.push(self.publish(now)),
                    LeaseState::Alive { .. } => {
                        out.push(self.publish(now));
                        self.step(now, &mut out);
                    }
                }
            }
            Input::LeaseGranted {
                lease,
                registered_at,
            } => {
                self.lease = lease;
                self.registered_at = registered_at;
                self.record_fault = None;
                // Keys under the old lease are gone with it.
                self.unanswered_claim = false;
                self.pending_draft = None;
                out.push(self.publish(now));
                self.step(now, &mut out);
            }
            Input::Claimed(claim, outcome) => {
                if self.claiming.take() != Some(claim) {
                    debug!(?claim, "an outcome of a claim not out; ignored");
                    return out;
                }
                self.claimed(claim, outcome, now, &mut out);
                self.step(now, &mut out);
            }
            Input::Drafted(outcome) => {
                self.drafted(outcome, now, &mut out);
                self.step(now, &mut out);
            }
            Input::Replicated { term, index } => {
                let Some(s) = self.slot.as_mut() else {
                    return out;
                };
                let was_in_step = s.replica.is_some();
                s.replica = Some((term, index));
                if !was_in_step {
                    // The backup can take over now: it is ready.
                    out.push(self.publish(now));
                }
            }
            Input::LeaseKeys(kvs) => {
                // The node's own draft key, read with them: the slot key its transaction
                // created (same revision) is the draft's, taken or about to be.
                let drafted_at = kvs.iter().find_map(|kv| match self.keys.parse(&kv.key) {
                    Some(JobKey::Draft(n)) if n == self.me.node => Some(kv.mod_revision),
                    _ => None,
                });
                for kv in kvs {
                    let pending =
                        self.mine == MySlot::Spare && drafted_at == Some(kv.create_revision);
                    match self.keys.parse(&kv.key) {
                        Some(key @ (JobKey::Primary(_) | JobKey::Backup(..))) if !pending => {
                            self.delete_if_stray(&key, &kv, &mut out);
                        }
                        _ => {}
                    }
                }
            }
            Input::WatchTask(task) => {
                if task < self.tasks && !self.scope.shows(task) && !self.lazy.contains(&task) {
                    self.lazy.push(task);
                    debug!(
                        task,
                        "watching the slot keys of a task outside the topology"
                    );
                    self.plan_watch(true, &mut out);
                }
            }
            Input::Retry => {
                self.retry_at = None;
                // A claim etcd did not answer is tried again on the same view; after a lost
                // race the view must show the winner first.
                if self.claim_after.is_none() {
                    self.await_change = false;
                }
                self.step(now, &mut out);
            }
            Input::Deadline => out.push(self.publish(now)),
            Input::Stop => self.end(ExitReason::Stopped, NodeExit::Stopped, now, &mut out),
            Input::GuardFailed(cmd) => {
                // The epoch was not entered, nor any planned after it (the runtime fails those
                // too): entered again, in order, once the lease is confirmed.
                if let (Command::EnterEpoch { epoch, prev }, Some(s)) = (cmd, self.slot.as_mut()) {
                    if s.entered.is_some_and(|e| e >= epoch) {
                        s.entered = prev;
                    }
                    if let Err(at) = self.observed.binary_search(&epoch) {
                        self.observed.insert(at, epoch);
                    }
                }
            }
        }
        if self.mine_task() != self.scope_task && !self.ended {
            self.plan_watch(false, &mut out);
        }
        out
    }

    /// The scope and ranges the job watch should follow for the slot of `task` (`None`: as a
    /// spare).
    fn watch_for(&self, task: Option<TaskId>) -> (Scope, Vec<KeyRange>) {
        let node = &self.me.node;
        match task {
            _ if self.watches_staff(task) => (Scope::All, self.keys.staff_watch()),
            None => match self.staffing {
                Staffing::Drafted => (
                    Scope::Tasks(std::sync::Arc::new([0].into_iter().collect())),
                    self.keys.spare_watch(node),
                ),
                Staffing::SelfClaimed => (Scope::All, self.keys.node_watch(node)),
            },
            Some(t) => match self.holder_scope(t) {
                Scope::All => (Scope::All, self.keys.node_watch(node)),
                Scope::Tasks(set) => {
                    // The topology's tasks in order (task 0's slots are in a spare's ranges,
                    // which come first), then the lazy ones as they came: a new lazy task only
                    // adds a range at the end, and the watch grows in place.
                    let tasks = set
                        .iter()
                        .copied()
                        .filter(|t| !self.lazy.contains(t))
                        .chain(self.lazy.iter().copied().filter(|t| set.contains(t)));
                    let ranges = self.keys.holder_watch(node, tasks);
                    (Scope::Tasks(set), ranges)
                }
            },
        }
    }

    /// Plans what the job watch follows: as a spare waiting to be drafted its own keys and
    /// task 0's slot keys, as a spare claiming for itself every slot key; as holder of one of
    /// task 0's slots what the staffer needs (every record, draft and slot key); as holder of
    /// task `t` the slot keys of `t`, of its neighbours over the topology's period (so that no epoch
    /// needs another watch), of task 0 (the job reporter's, see [`Engine::job_reporter`]) and
    /// of the tasks its work talked to outside the topology (`lazy`, kept while the slot is).
    /// A job whose tasks talk to more than [`MAX_SCOPED_TASKS`] others (a full mesh) watches
    /// everything. `lazy_added`: the lazy set grew (else the slot changed and it is reset).
    fn plan_watch(&mut self, lazy_added: bool, out: &mut Vec<Command>) {
        let task = self.mine_task();
        if !lazy_added {
            self.lazy.clear();
        }
        self.scope_task = task;
        let (scope, ranges) = self.watch_for(task);
        if scope == self.scope && ranges == self.ranges {
            return;
        }
        self.scope = scope;
        self.ranges = ranges;
        self.reload_watch(out);
    }

    /// Has the watch read [`Engine::ranges`] afresh under a new generation (its snapshot
    /// replaces the view): after the ranges changed, or to read the same ones again. The
    /// watch sends no event its snapshot holds (it drops its stream, or, when the ranges only
    /// grow, drops the kept watches' events up to the read), so the epoch key's changes
    /// meanwhile are never sent:
    /// its snapshot's epochs between the last one seen and the one read count as observed
    /// (every epoch the framework writes is the next one).
    pub(super) fn reload_watch(&mut self, out: &mut Vec<Command>) {
        self.generation += 1;
        self.reloading = true;
        debug!(
            generation = self.generation,
            ranges = self.ranges.len(),
            "job watch reads its ranges"
        );
        out.push(Command::Watch {
            generation: self.generation,
            ranges: self.ranges.clone(),
        });
    }

    fn holder_scope(&self, t: TaskId) -> Scope {
        let mut set: BTreeSet<TaskId> = [0, t].into_iter().collect();
        set.extend(self.lazy.iter().copied());
        for (_, topology) in self.links.iter() {
            let period = topology.period().max(1);
            if period > MAX_SCOPED_PERIOD {
                return Scope::All;
            }
            for epoch in 0..period {
                set.extend(topology.neighbours(t, epoch));
                if set.len() > MAX_SCOPED_TASKS {
                    return Scope::All;
                }
            }
        }
        set.retain(|x| *x < self.tasks);
        Scope::Tasks(std::sync::Arc::new(set))
    }

    /// Whether the job watch follows every task's slot keys (as a spare).
    pub(crate) fn watches_all(&self) -> bool {
        self.scope == Scope::All
    }

    /// Whether the view leaves out task `task`'s slot keys: its work talking to that task
    /// should ask for them ([`Input::WatchTask`]).
    pub(crate) fn unwatched(&self, task: TaskId) -> bool {
        task < self.tasks && !self.scope.shows(task)
    }

    /// After the view changed (its epoch was `before`): notes a new epoch, publishes the
    /// view, then heals and decides on it.
    fn view_changed(&mut self, before: Option<EpochValue>, now: Instant, out: &mut Vec<Command>) {
        let after = self.view.as_ref().and_then(|v| v.epoch);
        if let Some(e) = after.filter(|_| after != before) {
            out.push(Command::Note(Note::JobEpoch {
                epoch: e.epoch(),
                done: matches!(e, EpochValue::Done(_)),
            }));
        }
        if self.view.is_some() {
            out.push(Command::ViewChanged);
        }
        self.heal(now, out);
        self.step(now, out);
    }

    /// Raises the fence of task `t` to `term`, a primary key etcd showed (or this node's own
    /// won claim): O(1) per key change, never a walk over the job.
    pub(super) fn raise_fence(&mut self, t: TaskId, term: Term) {
        let seen = self.fence.entry(t).or_insert(0);
        if term > *seen {
            *seen = term;
            self.raised.push((t, term));
        }
    }

    /// The fence raises since the last call, for the shared fence of the slot's background
    /// work (taken when the view is published, [`Command::ViewChanged`]).
    pub(crate) fn take_raised(&mut self) -> Vec<(TaskId, Term)> {
        std::mem::take(&mut self.raised)
    }

    /// Decides and plans until nothing is left to do on the current view, or a claim is out.
    fn step(&mut self, now: Instant, out: &mut Vec<Command>) {
        loop {
            if self.ended || self.claiming.is_some() {
                return;
            }
            let Some(view) = self.view.as_ref() else {
                return;
            };
            if let Some(EpochValue::Done(epoch)) = view.epoch {
                self.end(
                    ExitReason::JobFinished { epoch },
                    NodeExit::JobFinished { epoch },
                    now,
                    out,
                );
                return;
            }
            if !self.acting(now) {
                out.push(self.publish(now));
                return;
            }
            let drafted_spare = self.mine == MySlot::Spare && self.staffing == Staffing::Drafted;
            if drafted_spare && self.take_draft(now, out) {
                continue;
            }
            let Some(view) = self.view.as_ref() else {
                return;
            };
            let decision = if drafted_spare {
                // Task 0's primary is the staffer: while task 0 has no node, spares claim it;
                // when the job starts, the earliest registered first (see
                // `staff::bootstrap_delay`); later (task 0 lost every node), at once.
                if view.has_no_node(0) {
                    let since = *self.orphan_since.get_or_insert(now);
                    let at =
                        since + staff::bootstrap_delay(self.registered_at - self.spec_revision);
                    if !self.task0_staffed_seen && now < at && self.claim_after.is_none() {
                        self.retry_at = Some(self.retry_at.map_or(at, |r| r.min(at)));
                        out.push(self.publish(now));
                        return;
                    }
                    Decision::ClaimPrimary(0)
                } else {
                    self.orphan_since = None;
                    self.task0_staffed_seen = true;
                    Decision::Stay
                }
            } else if matches!(self.mine, MySlot::Backup { task, .. } if !view.shows(task)) {
                // A backup whose view does not show its task yet (the watch is reading the
                // slot's ranges): it would take the task's primary for gone.
                out.push(self.publish(now));
                return;
            } else if self.mine == MySlot::Spare && view.scope != Scope::All {
                // A holder's view that does not show every task yet (the watch is reading
                // them all): a spare decides on the whole job only.
                out.push(self.publish(now));
                return;
            } else {
                let rng = &mut self.rng;
                decide(view, &self.me.node, self.mine, &mut |n| {
                    rng.random_range(0..n)
                })
            };
            let lease = self.lease.id();
            let claim = match decision {
                Decision::Stay => {
                    self.stay(now, out);
                    return;
                }
                Decision::Lost => {
                    self.lose_slot(now, out);
                    continue;
                }
                _ if self.await_change => return,
                _ if self.claim_after.is_some_and(|at| now < at) => {
                    self.retry_at = self.claim_after;
                    return;
                }
                Decision::ClaimPrimary(task) => Claim::Primary { task, lease },
                Decision::ClaimBackup(task, k) => Claim::Backup { task, k, lease },
                Decision::Promote => {
                    let MySlot::Backup {
                        task,
                        k,
                        create_revision,
                    } = self.mine
                    else {
                        return;
                    };
                    Claim::Promote {
                        task,
                        k,
                        create_revision,
                        lease,
                    }
                }
            };
            self.claim_after = None;
            self.claiming = Some(claim);
            out.push(Command::Claim(claim));
            return;
        }
    }

    /// Holding the slot it should: keep the monitors, the backups, the epoch and the
    /// neighbours up to date. The backups come first: a backup that joined, or that missed an
    /// update while the lease was unconfirmed, gets the task's state before the task acts
    /// again.
    fn stay(&mut self, now: Instant, out: &mut Vec<Command>) {
        let staffer = self.is_staffer(now);
        if let Some(view) = self.view.as_ref() {
            let mut check = watched(view, &self.me.node, self.mine);
            if staffer {
                // The spares' duty, which they cannot do without the whole job's slots: the
                // backups of tasks without a primary, whose death would block the task.
                check.extend(watched(view, &self.me.node, MySlot::Spare));
                check.sort();
                check.dedup();
            }
            out.push(Command::Monitor(check));
        }
        if let Some((task, term)) = self.acting_primary(now) {
            if let (Some(view), Some(s)) = (self.view.as_ref(), self.slot.as_ref()) {
                out.push(Command::SyncBackups {
                    task,
                    term,
                    epoch: s.entered.unwrap_or(0),
                    members: Member::all_in(view, task, &self.me.node),
                });
            }
        }
        self.enter_current_epoch(now, out);
        if let Some((task, _)) = self.acting_primary(now) {
            out.push(Command::DeliverDeferred);
            self.neighbour_incidents(task, out);
        }
        if staffer {
            self.staff(now, out);
        }
        out.push(self.publish(now));
    }

    /// Carries out the outcome of a claim.
    fn claimed(
        &mut self,
        claim: Claim,
        outcome: ClaimOutcome,
        now: Instant,
        out: &mut Vec<Command>,
    ) {
        let rev = match outcome {
            ClaimOutcome::Won(rev) => {
                self.claim_failures = 0;
                self.claim_losses = 0;
                // A draft not taken (its slot key is under this node's lease) is a stray now.
                if std::mem::take(&mut self.unanswered_claim) | self.pending_draft.take().is_some()
                {
                    out.push(Command::FindStrays);
                }
                rev
            }
            ClaimOutcome::Lost => {
                // Many spares may be after the few free slots: the next claim waits for the
                // winner's key and a jittered pause growing with the losses in a row.
                self.claim_losses += 1;
                let pause = retry::CLAIM_CONTENTION.spread(self.claim_losses, self.rng.random());
                debug!(
                    task = claim.task(),
                    what = claim.what(),
                    ?pause,
                    "lost the race; waiting for the next change and a pause"
                );
                self.await_change = true;
                self.claim_after = Some(now + pause);
                out.push(self.publish(now));
                return;
            }
            ClaimOutcome::Failed(error) => {
                // Jittered: nodes whose claims failed together (an etcd outage) do not all
                // claim again in the same instant.
                self.claim_failures += 1;
                self.unanswered_claim = true;
                let pause = retry::ETCD.pause(self.claim_failures, self.rng.random());
                warn!(
                    error,
                    task = claim.task(),
                    what = claim.what(),
                    ?pause,
                    "failed; deciding again after a pause"
                );
                self.retry_at = Some(now + pause);
                self.await_change = true;
                out.push(self.publish(now));
                return;
            }
        };
        match claim {
            Claim::Primary { task, lease } => {
                // Taking over a task whose earlier primary this node saw is a failover.
                let earlier = self.fence_seen(task) > 0;
                info!(task, term = rev, "became primary");
                if earlier {
                    out.push(Command::Note(Note::Failover(task)));
                }
                self.mine = MySlot::Primary {
                    task,
                    term: term_of(rev),
                };
                self.note_own_key(true, task, 0, rev, lease);
                self.build_slot(task, true, out);
                self.promoted(term_of(rev), now, out);
            }
            Claim::Backup { task, k, lease } => {
                info!(task, slot = k, "became backup");
                self.mine = MySlot::Backup {
                    task,
                    k,
                    create_revision: rev,
                };
                self.note_own_key(false, task, k, rev, lease);
                self.build_slot(task, false, out);
                out.push(Command::Call(TaskCall::BecameBackup));
            }
            Claim::Promote { task, k, lease, .. } => {
                info!(task, term = rev, "backup promoted to primary");
                out.push(Command::Note(Note::Failover(task)));
                self.mine = MySlot::Primary {
                    task,
                    term: term_of(rev),
                };
                if let Some(v) = self.view.as_mut() {
                    v.backups.remove(&(task, k));
                }
                self.note_own_key(true, task, 0, rev, lease);
                out.push(Command::ViewChanged);
                // A backup that never got the primary's state starts like a spare would: from
                // the task's last checkpoint.
                if self.slot.as_ref().is_some_and(|s| s.replica.is_none()) {
                    out.push(Command::RestoreCheckpoint(task));
                }
                self.promoted(term_of(rev), now, out);
            }
        }
        out.push(self.publish(now));
    }

    /// Records a key this node just wrote, so the view agrees before the watch reports it.
    fn note_own_key(&mut self, primary: bool, t: TaskId, k: u32, rev: i64, lease: LeaseId) {
        if let Some(v) = self.view.as_mut() {
            let slot = SlotKey {
                holder: self.me.clone(),
                create_revision: rev,
                lease,
            };
            if primary {
                v.primaries.insert(t, slot);
                self.raise_fence(t, term_of(rev));
            } else {
                v.backups.insert((t, k), slot);
            }
        }
    }

    fn build_slot(&mut self, task: TaskId, primary: bool, out: &mut Vec<Command>) {
        let epoch = self
            .view
            .as_ref()
            .and_then(|v| v.epoch)
            .map_or(0, EpochValue::epoch);
        self.slots_taken += 1;
        self.slot = Some(SlotBook {
            id: self.slots_taken,
            entered: None,
            epoch,
            replica: None,
            neighbours: Default::default(),
        });
        out.push(Command::BuildSlot {
            task,
            primary,
            slot: self.slots_taken,
            epoch,
        });
    }

    /// The node just became primary with `term`: tell the task, then enter the current epoch.
    fn promoted(&mut self, term: Term, now: Instant, out: &mut Vec<Command>) {
        if let Some(s) = self.slot.as_mut() {
            s.entered = None;
            out.push(Command::PrimaryTerm(term));
            out.push(Command::Call(TaskCall::BecamePrimary(term)));
        }
        self.enter_current_epoch(now, out);
    }

    /// As primary, enters every running epoch observed since the last one entered, once and
    /// in order (a new primary starts at the current one); as backup, shows the current one.
    fn enter_current_epoch(&mut self, now: Instant, out: &mut Vec<Command>) {
        let Some(EpochValue::Running(current)) = self.view.as_ref().and_then(|v| v.epoch) else {
            return;
        };
        let primary = matches!(self.mine, MySlot::Primary { .. });
        let acting = self.acting(now);
        let task = self.mine_task();
        let Some(s) = self.slot.as_mut() else {
            self.observed.clear();
            return;
        };
        if !primary {
            self.observed.clear();
            if s.epoch != current {
                s.epoch = current;
                out.push(Command::BackupEpoch(current));
            }
            return;
        }
        if !acting {
            return;
        }
        let mut todo: Vec<Epoch> = match s.entered {
            None => vec![current],
            Some(entered) => self
                .observed
                .iter()
                .copied()
                .filter(|e| *e > entered && *e <= current)
                .collect(),
        };
        if todo.last().is_none_or(|last| *last < current) && s.entered.is_none_or(|e| e < current) {
            todo.push(current);
        }
        self.observed.clear();
        for epoch in todo {
            let prev = s.entered;
            s.entered = Some(epoch);
            s.epoch = epoch;
            out.push(Command::EnterEpoch { epoch, prev });
            if let Some(task) = task {
                out.push(Command::Note(Note::EpochEntered(task)));
            }
        }
    }

    fn mine_task(&self) -> Option<TaskId> {
        match self.mine {
            MySlot::Spare => None,
            MySlot::Primary { task, .. } | MySlot::Backup { task, .. } => Some(task),
        }
    }

    /// As acting primary of `task` in an epoch: the neighbours that lost or regained a
    /// primary since the task last looked, once per incident, per link that joins them.
    fn neighbour_incidents(&mut self, task: TaskId, out: &mut Vec<Command>) {
        let (Some(view), Some(s)) = (self.view.as_ref(), self.slot.as_mut()) else {
            return;
        };
        let Some(epoch) = s.entered else {
            return;
        };
        let mut by_link: Vec<(String, BTreeSet<TaskId>)> = Vec::new();
        let mut all = BTreeSet::new();
        for (name, topology) in self.links.iter() {
            let set: BTreeSet<TaskId> = topology.neighbours(task, epoch).into_iter().collect();
            all.extend(set.iter().copied());
            by_link.push((name.to_owned(), set));
        }
        let incidents = s
            .neighbours
            .update(&all, |n| view.primaries.get(&n).map(|p| p.create_revision));
        for incident in incidents {
            let (n, failed) = match incident {
                Incident::Failed(n) => (n, true),
                Incident::Restarted(n) => (n, false),
            };
            for (link, set) in &by_link {
                if !set.contains(&n) {
                    continue;
                }
                out.push(Command::Note(Note::Neighbour(task, failed)));
                out.push(Command::Call(if failed {
                    info!(task, neighbour = n, link, "neighbour failed");
                    TaskCall::NeighbourFailed(link.clone(), n)
                } else {
                    info!(task, neighbour = n, link, "neighbour restarted");
                    TaskCall::NeighbourRestarted(link.clone(), n)
                }));
            }
        }
    }

    /// Ends the slot on this node: the task's `exit(SlotLost)`, then it is a spare.
    fn lose_slot(&mut self, now: Instant, out: &mut Vec<Command>) {
        if self.slot.take().is_some() {
            out.push(Command::DropSlot(ExitReason::SlotLost));
        }
        self.mine = MySlot::Spare;
        out.push(self.publish(now));
    }

    /// The node's end: the task's `exit`, the lease revoked, the status, the exit.
    fn end(&mut self, reason: ExitReason, exit: NodeExit, now: Instant, out: &mut Vec<Command>) {
        out.push(Command::Monitor(Vec::new()));
        if self.slot.take().is_some() {
            out.push(Command::DropSlot(reason));
        }
        out.push(Command::RevokeLease(self.lease.id()));
        self.mine = MySlot::Spare;
        self.lease = LeaseState::Expired { id: LeaseId::NONE };
        out.push(self.publish(now));
        out.push(Command::Exit(exit));
        self.ended = true;
    }

    /// What the node shows about itself at `now`.
    pub(crate) fn publish(&self, now: Instant) -> Command {
        let acting = self.acting(now);
        let role = match self.mine {
            MySlot::Spare => Role::Spare,
            MySlot::Primary { task, term } => Role::Primary { task, term },
            MySlot::Backup { task, .. } => Role::Backup { task },
        };
        let entered = self.slot.as_ref().and_then(|s| s.entered);
        let epoch = entered.or_else(|| {
            self.view
                .as_ref()
                .and_then(|v| v.epoch)
                .map(EpochValue::epoch)
        });
        let ready = readiness(
            self.view.as_ref(),
            &self.me.node,
            self.mine,
            entered,
            self.slot.as_ref().is_some_and(|s| s.replica.is_some()),
            acting,
        );
        let until = match self.lease {
            LeaseState::Alive { deadline, .. } => Some(deadline),
            _ => None,
        };
        Command::Publish(Published {
            role,
            acting,
            epoch,
            finished: self.view.as_ref().is_some_and(JobView::finished),
            ready,
            until,
        })
    }

    /// Whether a heal of `key` over revision `guard` is still to be tried (once per bad value).
    fn heal_due(&mut self, key: &'static str, guard: i64) -> bool {
        if self.heals_tried.contains(&(key, guard)) {
            return false;
        }
        if self.heals_tried.len() >= 64 {
            self.heals_tried.clear();
        }
        self.heals_tried.push((key, guard));
        true
    }

    /// Plans rewrites of keys the framework owns that hold bad values, where this node knows
    /// the truth: its own record (any node), and, as the job's reporter, the epoch (to the last
    /// good one) and the spec (to the one the job runs with). Every rewrite is guarded by the
    /// bad value's revision, so a newer write is never overwritten, and the epoch's and spec's
    /// by the reporter's term, so a deposed primary writes nothing.
    fn heal(&mut self, now: Instant, out: &mut Vec<Command>) {
        if !self.acting(now) {
            return;
        }
        if let Some(guard) = self.record_fault {
            if self.heal_due("node", guard) {
                out.push(Command::HealRecord { guard });
            }
        }
        let Some(fence) = self.job_reporter() else {
            return;
        };
        let epoch = self.view.as_ref().and_then(|v| {
            let fault = v.epoch_fault.as_ref()?;
            match v.epoch? {
                EpochValue::Running(m) => Some((fault.mod_revision, EpochValue::Running(m))),
                EpochValue::Done(_) => None,
            }
        });
        if let Some((guard, good)) = epoch {
            if self.heal_due("epoch", guard) {
                out.push(Command::Heal {
                    what: "epoch",
                    key: self.keys.epoch(),
                    guard,
                    value: good.encode().into_bytes(),
                    fence,
                });
            }
        }
        if let Some((_, guard)) = self.spec_fault.clone() {
            if self.heal_due("spec", guard) {
                out.push(Command::Heal {
                    what: "spec",
                    key: self.keys.spec(),
                    guard,
                    value: self.spec.clone(),
                    fence,
                });
            }
        }
    }
}
