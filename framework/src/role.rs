//! What a node is and what it publishes about itself: its role, its status, how it ended. A
//! leaf module: the metrics, the loop and the public API all name these.

use crate::{Epoch, TaskId, Term};

/// Why a task's slot ended on this node (see [`Task::exit`](crate::Task::exit)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExitReason {
    /// The job finished at this epoch (someone called [`Context::shutdown_job`](crate::Context::shutdown_job)).
    JobFinished {
        /// The final epoch.
        epoch: Epoch,
    },
    /// The node is stopping cleanly (its lease is revoked right after).
    Stopped,
    /// The node lost its slot: its lease ended (etcd unreachable past the TTL, or the process
    /// was paused), or another node took the slot. The task value is dropped after this; the
    /// node rejoins the job as a spare.
    SlotLost,
}

/// How a node ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeExit {
    /// The job finished at `epoch`; the node ran `exit` and revoked its lease.
    JobFinished {
        /// The final epoch.
        epoch: Epoch,
    },
    /// The node was stopped cleanly (its lease revoked, so its slot was handed over at once).
    Stopped,
    /// The node was killed: it stopped without revoking its lease.
    Killed,
}

/// This node's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// No slot yet: waits for one to open.
    Spare,
    /// Primary of `task` with fencing token `term`.
    Primary {
        /// The task.
        task: TaskId,
        /// The term.
        term: Term,
    },
    /// Hot-standby backup of `task`.
    Backup {
        /// The task.
        task: TaskId,
    },
}

/// What a node publishes about itself (see [`NodeHandle::status`](crate::NodeHandle::status)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    /// The node's id (its key under `nodes/` in etcd).
    pub node_id: String,
    /// Its slot.
    pub role: Role,
    /// Whether its lease is within its local deadline, i.e. it may act in its role. A primary
    /// whose lease is past the deadline holds the role on paper but does not act.
    pub acting: bool,
    /// The last epoch the node's task entered (primary) or the node observed.
    pub epoch: Option<Epoch>,
    /// Whether the node has seen the job finish.
    pub finished: bool,
}

impl NodeStatus {
    /// `Some(term)` if the node is acting as primary of `task`.
    pub fn primary_of(&self, task: TaskId) -> Option<Term> {
        match self.role {
            Role::Primary { task: t, term } if t == task && self.acting => Some(term),
            _ => None,
        }
    }
}
