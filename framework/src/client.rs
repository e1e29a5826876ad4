//! [`JobClient`]: a handle on a job for programs that watch or wait for it without running a
//! node (launchers, operators' tools, a Kubernetes Job waiting for the result).

use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::config::{validate_job_name, JobSpec};
use crate::error::Error;
use crate::etcd::keys::{EpochValue, JobKeys, StoredCheckpoint};
use crate::etcd::watch::{self, JobEvent};
use crate::etcd::Store;
use crate::{Epoch, TaskId};

/// Where a job stands, from its `epoch` key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobState {
    /// The job's current (or, once finished, final) epoch.
    pub epoch: Epoch,
    /// Whether a primary ended the job.
    pub finished: bool,
}

impl From<EpochValue> for JobState {
    fn from(v: EpochValue) -> Self {
        JobState {
            epoch: v.epoch(),
            finished: matches!(v, EpochValue::Done(_)),
        }
    }
}

/// A read-mostly handle on one job in etcd.
///
/// ```no_run
/// # async fn f() -> Result<(), taskgraph::Error> {
/// let client = taskgraph::JobClient::connect(&["http://127.0.0.1:2379".into()], "sum").await?;
/// if let Some(state) = client.state().await? {
///     println!("epoch {} finished {}", state.epoch, state.finished);
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct JobClient {
    store: Store,
    job: String,
}

impl JobClient {
    /// Connects to etcd (trying for up to 5 s) for job `job`. Fails with
    /// [`Error::Config`] for an invalid job name and [`Error::EtcdUnreachable`] when etcd does
    /// not answer.
    pub async fn connect(endpoints: &[String], job: &str) -> Result<JobClient, Error> {
        Self::connect_with(endpoints, job, Duration::from_secs(5)).await
    }

    /// [`connect`](JobClient::connect) trying for up to `timeout`.
    pub async fn connect_with(
        endpoints: &[String],
        job: &str,
        timeout: Duration,
    ) -> Result<JobClient, Error> {
        validate_job_name(job)?;
        if endpoints.is_empty() {
            return Err(crate::ConfigError::Missing("etcd endpoints").into());
        }
        let store = Store::connect(endpoints, job, timeout, Duration::from_secs(2)).await?;
        Ok(JobClient {
            store,
            job: job.to_owned(),
        })
    }

    /// The job's name.
    pub fn job(&self) -> &str {
        &self.job
    }

    /// The job's keys in etcd (to interpret the events of [`watch`](JobClient::watch)).
    pub fn keys(&self) -> &JobKeys {
        self.store.keys()
    }

    /// The job's spec, or `None` when no node has created the job yet.
    pub async fn spec(&self) -> Result<Option<JobSpec>, Error> {
        let key = self.keys().spec();
        match self.store.get(&key).await? {
            None => Ok(None),
            Some(kv) => JobSpec::decode(&kv.value)
                .map(Some)
                .map_err(|reason| Error::Garbage { key, reason }),
        }
    }

    /// The job's epoch and whether it finished, or `None` when the job does not exist.
    pub async fn state(&self) -> Result<Option<JobState>, Error> {
        let key = self.keys().epoch();
        match self.store.get(&key).await? {
            None => Ok(None),
            Some(kv) => EpochValue::parse(&kv.value)
                .map(|v| Some(v.into()))
                .map_err(|reason| Error::Garbage { key, reason }),
        }
    }

    /// The result stored by [`Context::shutdown_job_with`](crate::Context::shutdown_job_with),
    /// or `None` while there is none.
    pub async fn result(&self) -> Result<Option<Bytes>, Error> {
        let key = self.keys().result();
        Ok(self.store.get(&key).await?.map(|kv| Bytes::from(kv.value)))
    }

    /// Task `task`'s last checkpoint: the epoch it was taken in and the application's bytes.
    pub async fn checkpoint(&self, task: TaskId) -> Result<Option<(Epoch, Bytes)>, Error> {
        let key = self.keys().checkpoint(task);
        match self.store.get(&key).await? {
            None => Ok(None),
            Some(kv) => StoredCheckpoint::decode(&kv.value)
                .map(|c| Some((c.epoch, Bytes::from(c.data))))
                .map_err(|reason| Error::Garbage { key, reason }),
        }
    }

    /// Watches every key of the job: first a [`JobEvent::Snapshot`], then each change. The
    /// watch survives etcd restarts (it resumes from the last revision seen, or sends a new
    /// snapshot if etcd compacted it away) and ends when the receiver is dropped.
    pub fn watch(&self) -> mpsc::Receiver<JobEvent> {
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(watch::run(self.store.clone(), tx));
        rx
    }
}
