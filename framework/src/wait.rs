//! [`JobClient::wait_finished`]: waiting for a job's end, driven by the job's watch.

use bytes::Bytes;

use crate::changes::JobChange;
use crate::client::{JobClient, JobState};
use crate::error::Error;
use crate::Epoch;

/// How a job ended, as [`JobClient::wait_finished`] tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finished {
    /// A task ended the job with
    /// [`Context::shutdown_job_with`](crate::Context::shutdown_job_with): its result.
    WithResult {
        /// The job's final epoch.
        epoch: Epoch,
        /// The bytes stored with the job's end.
        result: Bytes,
    },
    /// The job ended without a result: an operator ended it ([`JobClient::shutdown`],
    /// `taskgraph shutdown`), or a task called
    /// [`Context::shutdown_job`](crate::Context::shutdown_job). The two are not told apart
    /// in etcd; an application whose tasks always end the job with a result reads this as
    /// "shut down by an operator".
    WithoutResult {
        /// The job's final epoch.
        epoch: Epoch,
    },
}

impl Finished {
    /// The job's final epoch.
    pub fn epoch(&self) -> Epoch {
        match self {
            Finished::WithResult { epoch, .. } | Finished::WithoutResult { epoch } => *epoch,
        }
    }

    /// The result, if the job ended with one.
    pub fn result(&self) -> Option<&Bytes> {
        match self {
            Finished::WithResult { result, .. } => Some(result),
            Finished::WithoutResult { .. } => None,
        }
    }
}

impl JobClient {
    /// Waits until the job has finished and returns how: its final epoch and the result a
    /// task stored with its end, if any. Returns at once for a job that already finished; a
    /// job that does not exist yet is waited for (its first node creates it).
    ///
    /// Driven by the job's [`changes`](JobClient::changes): no polling, and it rides through
    /// etcd restarts as the stream does (wrap it in a timeout to bound the wait). Fails with
    /// [`Error::Garbage`] when the `result` key holds something the job's end did not write,
    /// with another [`Error`] when etcd fails the read of the result, and with
    /// [`Error::WatchEnded`] if the watch stops.
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), taskgraph::Error> {
    /// use taskgraph::{Finished, JobClient};
    /// let client = JobClient::connect(&["http://127.0.0.1:2379".into()], "sum").await?;
    /// match client.wait_finished().await? {
    ///     Finished::WithResult { epoch, result } => println!("done at {epoch}: {result:?}"),
    ///     Finished::WithoutResult { epoch } => println!("shut down at epoch {epoch}"),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn wait_finished(&self) -> Result<Finished, Error> {
        let mut changes = self.changes();
        while let Some(event) = changes.recv().await {
            let epoch = match event?.change {
                JobChange::Finished { epoch } => epoch,
                JobChange::Snapshot(status) => match status.state {
                    Some(JobState {
                        epoch,
                        finished: true,
                    }) => epoch,
                    _ => continue,
                },
                _ => continue,
            };
            return Ok(match self.result().await? {
                Some(result) => Finished::WithResult { epoch, result },
                None => Finished::WithoutResult { epoch },
            });
        }
        Err(Error::WatchEnded)
    }
}
