//! Handling an event on the task that brought it, with the node's runtime lent to that task
//! while the event loop is idle: what the lender makes of the event ([`Lent`]), and how the
//! borrowing task runs the work ([`Lent::work`], [`poll_once`]). Shared by the wire server
//! (messages from other nodes) and the loop's inbox (answers to the node's pulls), which must
//! not import each other.

use futures::future::BoxFuture;

/// The work that handles an event with the node's runtime held.
pub type Work = BoxFuture<'static, ()>;

/// What the lender of the node's runtime makes of an event `E` brought by another task.
pub enum Lent<E> {
    /// The work that handles the event: run it now.
    Now(Work),
    /// The node is handling something else on another task: wait for it (this future), then
    /// run the work it yields, or send the event it gives back to the loop. Dropping the future
    /// before it is ready drops the event unhandled.
    After(BoxFuture<'static, Result<Work, E>>),
    /// Not now: through the loop.
    Back(E),
}

impl<E> Lent<E> {
    /// The work to run on the calling task, waiting for the runtime if needed; or the event,
    /// to send to the loop.
    pub async fn work(self) -> Result<Work, E> {
        match self {
            Lent::Now(work) => Ok(work),
            Lent::After(wait) => wait.await,
            Lent::Back(event) => Err(event),
        }
    }
}

impl<E: std::fmt::Debug> std::fmt::Debug for Lent<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Lent::Now(_) => f.write_str("Now(..)"),
            Lent::After(_) => f.write_str("After(..)"),
            Lent::Back(event) => f.debug_tuple("Back").field(event).finish(),
        }
    }
}

/// Polls `work` once on the calling task; returns it when it is not done, to be finished as a
/// task of the node's own (so that a caller that gives up never cuts a handling short).
pub async fn poll_once(mut work: Work) -> Option<Work> {
    if futures::poll!(&mut work).is_pending() {
        Some(work)
    } else {
        None
    }
}

/// Lent work that was not done in its first poll ([`poll_once`]), finished as tasks of their
/// owner's: aborted when this is dropped (the server stops, the node ends).
#[derive(Debug, Default)]
pub struct Unfinished(std::sync::Mutex<tokio::task::JoinSet<()>>);

impl Unfinished {
    /// Finishes `work` as a task (reaping the ones already done).
    pub fn finish(&self, work: Work) {
        let mut set = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while set.try_join_next().is_some() {}
        set.spawn(work);
    }
}
