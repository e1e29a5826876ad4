//! The event loop's inbox: what a task's context, its spawned work and the framework's work on
//! its behalf send to the node's event loop. Below the application's API (`app`) and the
//! exchange, which both send into it.

use bytes::Bytes;

use crate::data::{Answer, PullError, PullId, ServeKey};
use crate::work::WorkDone;
use crate::{Epoch, TaskId, Term};

/// Requests from a task (its context, its spawned work, the framework's work on its behalf) to
/// its node's event loop. Each names the slot it comes from; the loop ignores requests of a
/// slot that has ended.
#[derive(Debug)]
pub(crate) enum LoopRequest {
    /// Die now, without revoking the lease (as if the process were killed).
    Kill,
    /// The task answered (or dropped) a [`DataRequest`](crate::DataRequest).
    Answer {
        slot: u64,
        key: ServeKey,
        answer: Answer,
    },
    /// Work started with [`Context::spawn_then`](crate::Context::spawn_then) completed.
    WorkDone { slot: u64, done: WorkDone },
    /// A timer set with [`Context::after`](crate::Context::after) fired.
    Timer { slot: u64, epoch: Epoch, token: u64 },
    /// The answer to one of the task's pulls arrived.
    Pulled {
        slot: u64,
        id: PullId,
        server_term: Term,
        result: Result<Bytes, PullError>,
    },
    /// The task's `inc_epoch` moved the job to `epoch`: etcd's answer to the compare-and-swap,
    /// whose put has `revision`. The news, ahead of the watch's echo of the same put.
    EpochCommitted { epoch: Epoch, revision: i64 },
    /// The slot's work talks to this task (a pull or meta to it, or a sender from it) whose
    /// slot keys the node does not watch: watch them.
    WatchTask(TaskId),
    /// The slot keys under the node's lease, as read for `Command::FindStrays`.
    LeaseKeys(Vec<crate::etcd::Kv>),
    /// What came of the staffer's drafts (`Command::Draft`).
    Drafted(crate::etcd::DraftOutcome),
}
