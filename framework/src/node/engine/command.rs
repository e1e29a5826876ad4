//! The engine's vocabulary: the inputs it reacts to and the commands it returns.

use tokio::time::Instant;

use crate::etcd::keys::KeyRange;
use crate::etcd::lease::{LeaseId, LeaseState};
use crate::etcd::watch::JobEvent;
use crate::role::{ExitReason, NodeExit, Role};
use crate::roles::{Member, Watched};
use crate::{Epoch, TaskId, Term};

/// What the engine reacts to.
#[derive(Debug)]
pub(crate) enum Input {
    /// Watch events of the job, in order (everything queued at the time: decisions are made
    /// on the freshest view available).
    Watch(Vec<JobEvent>),
    /// The lease keeper published a new state.
    Lease(LeaseState),
    /// A fresh lease was granted and the node registered under it (after [`Command::NewLease`]).
    LeaseGranted {
        /// The lease's state, as its keeper first published it.
        lease: LeaseState,
        /// The revision of the node's registration.
        registered_at: i64,
    },
    /// This node's compare-and-swap moved the job's epoch to `epoch`, written at `revision`:
    /// etcd's answer is the news, and the watch's later echo of the same put changes nothing.
    EpochCommitted {
        /// The new epoch.
        epoch: Epoch,
        /// The revision of the put.
        revision: i64,
    },
    /// The outcome of a [`Command::Claim`].
    Claimed(Claim, ClaimOutcome),
    /// What came of a [`Command::Draft`].
    Drafted(crate::etcd::DraftOutcome),
    /// As backup: a replication entry was applied (`term`, `index`).
    Replicated {
        /// The primary's term.
        term: Term,
        /// The entry's index.
        index: u64,
    },
    /// The slot's work talks to `task` (a pull, a meta, a sender it must fence) but the view
    /// does not show that task's slot keys: watch them too.
    WatchTask(TaskId),
    /// The slot keys of this job under the node's lease ([`Command::FindStrays`]).
    LeaseKeys(Vec<crate::etcd::Kv>),
    /// The time set by [`Engine::retry_at`] came.
    Retry,
    /// The lease's local deadline passed.
    Deadline,
    /// The node is asked to stop.
    Stop,
    /// A guarded command was not run: the lease was past its local deadline.
    GuardFailed(Command),
}

/// A claim of a slot in etcd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Claim {
    /// Task `task`'s primary slot, as a spare.
    Primary {
        /// The task.
        task: TaskId,
        /// The lease the key is put under.
        lease: LeaseId,
    },
    /// Backup slot `k` of `task`, as a spare.
    Backup {
        /// The task.
        task: TaskId,
        /// The backup slot.
        k: u32,
        /// The lease.
        lease: LeaseId,
    },
    /// As backup `k` of `task` (created at `create_revision`): the primary slot.
    Promote {
        /// The task.
        task: TaskId,
        /// The backup slot held.
        k: u32,
        /// Its create revision.
        create_revision: i64,
        /// The lease.
        lease: LeaseId,
    },
}

impl Claim {
    pub(super) fn task(self) -> TaskId {
        match self {
            Claim::Primary { task, .. }
            | Claim::Backup { task, .. }
            | Claim::Promote { task, .. } => task,
        }
    }
    pub(super) fn what(self) -> &'static str {
        match self {
            Claim::Primary { .. } => "claim primary",
            Claim::Backup { .. } => "claim backup",
            Claim::Promote { .. } => "promotion",
        }
    }
}

/// What etcd said to a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ClaimOutcome {
    /// Won: the key's create revision (a primary's term).
    Won(i64),
    /// Lost the race: the view was stale.
    Lost,
    /// etcd did not answer (the outcome is unknown): the error, for the log.
    Failed(String),
}

/// A call into the task value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TaskCall {
    /// `became_backup`.
    BecameBackup,
    /// `became_primary(term)`, after the slot's state shows the term.
    BecamePrimary(Term),
    /// `neighbour_failed(link, n)`.
    NeighbourFailed(String, TaskId),
    /// `neighbour_restarted(link, n)`.
    NeighbourRestarted(String, TaskId),
}

/// A key the engine wants gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Removal {
    /// A slot key holding garbage that no live lease owns (or this node's own).
    Garbage,
    /// A slot key under this node's lease that is not its slot.
    Stray,
}

/// What the node publishes about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Published {
    /// Its role.
    pub(crate) role: Role,
    /// Whether it may act (lease within its local deadline).
    pub(crate) acting: bool,
    /// The epoch its task entered, or the job's.
    pub(crate) epoch: Option<Epoch>,
    /// Whether it saw the job finish.
    pub(crate) finished: bool,
    /// `/readyz`: ready, with a description, or why not.
    pub(crate) ready: Result<String, String>,
    /// Until when the readiness holds (the lease's local deadline).
    pub(crate) until: Option<Instant>,
}

/// A fact for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Note {
    /// A key held a value the framework did not write.
    BadValue(&'static str),
    /// The job's epoch as seen.
    JobEpoch {
        /// The epoch.
        epoch: Epoch,
        /// Whether it is the final one.
        done: bool,
    },
    /// This node took over a task whose earlier primary it saw.
    Failover(TaskId),
    /// The task entered an epoch.
    EpochEntered(TaskId),
    /// A neighbour incident was raised (`true`: failed, `false`: restarted).
    Neighbour(TaskId, bool),
}

/// What the runtime does, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Command {
    /// Try the claim in etcd; feed the outcome back as [`Input::Claimed`].
    Claim(Claim),
    /// As the staffer (task 0's primary in `term`): give these slots to these spares, in
    /// order, many per transaction; [`Input::Drafted`] carries the outcome back. Runs in the
    /// background: the node goes on meanwhile.
    Draft {
        /// The staffer's term (every transaction checks it).
        term: Term,
        /// The drafts.
        orders: Vec<crate::etcd::DraftOrder>,
    },
    /// Delete `key` if its mod revision is still `mod_revision`.
    DeleteKey {
        /// The raw key.
        key: Vec<u8>,
        /// Its mod revision when judged.
        mod_revision: i64,
        /// Why.
        why: Removal,
    },
    /// The view changed: publish it to the slot's background work and raise the shared fence
    /// to every term it shows.
    ViewChanged,
    /// Rewrite a bad `epoch` or `spec` value, guarded by its mod revision `guard` and fenced by
    /// the job reporter's (task, term).
    Heal {
        /// `epoch` or `spec`.
        what: &'static str,
        /// The key.
        key: String,
        /// The bad value's mod revision (0: deleted).
        guard: i64,
        /// The good value.
        value: Vec<u8>,
        /// The reporter's primary slot.
        fence: (TaskId, Term),
    },
    /// Rewrite this node's record (it holds a value the node did not write), over `guard`.
    HealRecord {
        /// The bad value's mod revision (0: deleted).
        guard: i64,
    },
    /// Build the task value for a slot just taken (`init`; a primary's also restores the
    /// task's last checkpoint). `slot` identifies it among the slots this node took.
    BuildSlot {
        /// The task.
        task: TaskId,
        /// Whether taken as primary.
        primary: bool,
        /// The slot's id.
        slot: u64,
        /// The job's epoch when taken.
        epoch: Epoch,
    },
    /// As a backup just promoted without its primary's state: restore the last checkpoint.
    RestoreCheckpoint(TaskId),
    /// The slot now serves as primary under `term`: a new slot span, the slot's state shows
    /// the term (before any handler runs), and nothing is entered yet.
    PrimaryTerm(Term),
    /// As backup: the slot's state shows the job's epoch.
    BackupEpoch(Epoch),
    /// Call the task.
    Call(TaskCall),
    /// Enter `epoch` (its state, the serve book, the span; `enter_epoch`; early messages).
    /// Guarded. `prev` is the epoch entered before, restored if the guard fails.
    EnterEpoch {
        /// The epoch.
        epoch: Epoch,
        /// The epoch entered before it.
        prev: Option<Epoch>,
    },
    /// Deliver the answers held while the lease was unconfirmed.
    DeliverDeferred,
    /// As primary of `task` under `term` in `epoch`: bring these backups in step and forget
    /// the others.
    SyncBackups {
        /// The task.
        task: TaskId,
        /// The term.
        term: Term,
        /// The epoch entered.
        epoch: Epoch,
        /// The backups to keep in step.
        members: Vec<Member>,
    },
    /// Keep liveness checks on exactly these slot holders.
    Monitor(Vec<Watched>),
    /// Read the slot keys under the node's lease and feed them back as [`Input::LeaseKeys`]:
    /// a slot key of its own outside what the node watches (a claim etcd applied whose answer
    /// was lost) is found there.
    FindStrays,
    /// Follow these key ranges with the job watch from now on, as generation `generation`
    /// (the watch reads them and sends a snapshot of that generation).
    Watch {
        /// The generation.
        generation: u64,
        /// The ranges.
        ranges: Vec<KeyRange>,
    },
    /// End the slot: the task's `exit(reason)`, then the value is dropped.
    DropSlot(ExitReason),
    /// Grant a new lease and register; feed [`Input::LeaseGranted`] back.
    NewLease,
    /// Revoke lease `id` (a clean stop).
    RevokeLease(LeaseId),
    /// Publish the node's status.
    Publish(Published),
    /// A fact for the metrics.
    Note(Note),
    /// The node ends.
    Exit(NodeExit),
}

impl Command {
    /// `Some(term)`: run only while the lease is within its local deadline.
    pub(crate) fn guard(&self) -> Option<()> {
        matches!(self, Command::EnterEpoch { .. }).then_some(())
    }
}
