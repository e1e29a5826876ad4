//! The output of spawned work on its way back into the task (see
//! [`Context::spawn_then`](crate::Context::spawn_then)). A leaf module.

use std::any::Any;

use crate::Epoch;

/// Identifies a piece of work started with [`Context::spawn_then`](crate::Context::spawn_then): the epoch it belongs to
/// and a sequence number unique within that epoch on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkId {
    /// The epoch the work was started in (and is delivered in).
    pub epoch: Epoch,
    /// Sequence number within the epoch.
    pub seq: u64,
}

/// The output of work started with [`Context::spawn_then`](crate::Context::spawn_then), handed to [`Task::work_done`](crate::Task::work_done).
pub struct WorkDone {
    pub(crate) id: WorkId,
    pub(crate) output: Box<dyn Any + Send>,
}

impl std::fmt::Debug for WorkDone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkDone")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl WorkDone {
    /// Which work this is (as returned by [`Context::spawn_then`](crate::Context::spawn_then)).
    pub fn id(&self) -> WorkId {
        self.id
    }
    /// Whether the output is a `T`.
    pub fn is<T: Any>(&self) -> bool {
        self.output.is::<T>()
    }
    /// The output as the type the work returned; `Err(self)` if it is not a `T` (a task that
    /// spawns work of several output types tells them apart with [`is`](WorkDone::is), or by
    /// returning one enum from all of them).
    pub fn take<T: Any>(self) -> Result<T, WorkDone> {
        match self.output.downcast::<T>() {
            Ok(value) => Ok(*value),
            Err(output) => Err(WorkDone {
                id: self.id,
                output,
            }),
        }
    }
}
