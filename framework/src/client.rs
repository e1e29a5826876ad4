//! [`JobClient`]: a handle on a job for programs that watch or wait for it without running a
//! node (launchers, operators' tools, a Kubernetes Job waiting for the result).

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;

use crate::config::{validate_job_name, JobSpec};
use crate::error::Error;
use crate::etcd::keys::{EpochValue, Holder, JobKey, JobKeys, NodeRecord, StoredCheckpoint};
pub use crate::etcd::keys::{StallNote, StallReason};
use crate::etcd::Store;
use crate::security::{EtcdAuth, EtcdSecurity, EtcdTls};
use crate::{Epoch, TaskId, Term};

/// Where a job stands, from its `epoch` key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct JobState {
    /// The job's current (or, once finished, final) epoch.
    pub epoch: Epoch,
    /// Whether a primary ended the job.
    pub finished: bool,
}

/// How a task stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// A primary and every backup slot filled.
    Healthy,
    /// A primary, but fewer backups than the job asks for: one more failure is an outage of
    /// the task until a spare restores it from its checkpoint.
    Degraded,
    /// No primary: the task is failing over (a backup promotes itself at once) or waits for
    /// a node.
    Down,
    /// The job is stalled (see [`JobStatus::stalls`]) and a node names this task as a cause:
    /// its primary is not acting, or pulls to it go unanswered.
    Stalled,
    /// The job finished.
    Finished,
}

/// A node holding a slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SlotHolder {
    /// The node's id.
    pub node: String,
    /// Where it answers gRPC.
    pub addr: String,
    /// The slot: 0 for the primary, `k` for backup slot `k`.
    pub slot: u32,
    /// The slot key's create revision (for the primary: the term).
    pub revision: i64,
}

/// One task's slots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TaskStatus {
    /// The task.
    pub task: TaskId,
    /// The primary's node id, if any.
    pub primary: Option<String>,
    /// The primary's address.
    pub addr: Option<String>,
    /// The primary's term.
    pub term: Option<Term>,
    /// The backups' node ids, by slot.
    pub backups: Vec<String>,
    /// The task's health.
    pub health: Health,
    /// The slot holders in detail (primary first, then backups by slot).
    pub holders: Vec<SlotHolder>,
}

/// A node of the job that holds no slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SpareNode {
    /// The node's id.
    pub node: String,
    /// Where it answers gRPC.
    pub addr: String,
}

/// Every slot of a job at one etcd revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobStatus {
    /// The job.
    pub job: String,
    /// The etcd revision this status was read at.
    pub revision: i64,
    /// Tasks and nodes per task.
    pub tasks_total: u32,
    /// Nodes per task the job asks for.
    pub replicas: u32,
    /// The job's epoch and whether it finished (`None`: no epoch key).
    pub state: Option<JobState>,
    /// When the job was created (ms since the UNIX epoch), if recorded.
    pub created_ms: Option<u64>,
    /// One entry per task.
    pub tasks: Vec<TaskStatus>,
    /// Registered nodes holding no slot.
    pub spares: Vec<SpareNode>,
    /// Registered nodes in all.
    pub nodes: usize,
    /// Whether the job stored a result.
    pub has_result: bool,
    /// Keys whose values could not be understood (named, then ignored).
    pub garbage: Vec<String>,
    /// Nodes that see the job stalled (its epoch unmoved for longer than their stall time),
    /// with what each can tell about why. Empty while the job moves.
    pub stalls: Vec<NodeStall>,
}

/// A node's report of a stalled job (see [`JobStatus::stalls`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeStall {
    /// The reporting node.
    pub node: String,
    /// What it reports.
    #[serde(flatten)]
    pub note: StallNote,
}

impl JobStatus {
    /// Whether some node reports the job stalled.
    pub fn stalled(&self) -> bool {
        !self.stalls.is_empty()
    }

    /// Every cause the reporting nodes name, once each (the first report's first).
    pub fn stall_reasons(&self) -> Vec<&StallReason> {
        let mut out: Vec<&StallReason> = Vec::new();
        for r in self.stalls.iter().flat_map(|s| &s.note.reasons) {
            if !out.iter().any(|o| o.text == r.text) {
                out.push(r);
            }
        }
        out
    }
}

/// A handover made by [`JobClient::hand_over`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handover {
    /// The primary that was asked to leave.
    pub from: SlotHolder,
    /// The backup expected to take over.
    pub to: SlotHolder,
}

/// Why [`JobClient::hand_over`] did nothing.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// No such task in the job.
    #[error("task {task} does not exist: the job has {tasks} tasks (0 to {})", tasks.saturating_sub(1))]
    UnknownTask {
        /// The task asked for.
        task: TaskId,
        /// The job's number of tasks.
        tasks: u32,
    },
    /// The job does not exist.
    #[error("job {0:?} does not exist")]
    UnknownJob(String),
    /// The job finished.
    #[error("job {0:?} has finished")]
    Finished(String),
    /// The task has no primary now.
    #[error("task {0} has no primary right now (it is failing over or waiting for a node)")]
    NoPrimary(TaskId),
    /// The task has no backup to hand over to.
    #[error("task {0} has no backup to hand over to (the job runs it with no live backup)")]
    NoBackup(TaskId),
    /// The slots changed while the handover was prepared.
    #[error("task {0}'s slots changed meanwhile; nothing was done, try again")]
    Raced(TaskId),
    /// etcd failed.
    #[error(transparent)]
    Etcd(#[from] Error),
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
        Self::connect_secure(endpoints, job, timeout, None, None).await
    }

    /// [`connect_with`](JobClient::connect_with) over TLS (`https://` endpoints) and/or as an
    /// etcd user. The files are read here: a missing one is an [`Error::Config`]; a wrong
    /// password, a user without access to the job's prefix or a TLS failure is an
    /// [`Error::EtcdRefused`] at once, without retrying.
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), taskgraph::Error> {
    /// use taskgraph::{EtcdAuth, EtcdTls, JobClient, Secret};
    /// let tls = EtcdTls::new("/etc/taskgraph/etcd/ca.pem");
    /// let auth = EtcdAuth::new("job-sum", Secret::from_env("TASKGRAPH_ETCD_PASSWORD")?);
    /// let client = JobClient::connect_secure(
    ///     &["https://etcd:2379".into()], "sum", std::time::Duration::from_secs(5),
    ///     Some(&tls), Some(&auth),
    /// ).await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect_secure(
        endpoints: &[String],
        job: &str,
        timeout: Duration,
        tls: Option<&EtcdTls>,
        auth: Option<&EtcdAuth>,
    ) -> Result<JobClient, Error> {
        validate_job_name(job)?;
        if endpoints.is_empty() {
            return Err(crate::ConfigError::Missing("etcd endpoints").into());
        }
        let security = EtcdSecurity::load(endpoints, tls, auth)?;
        let store =
            Store::connect_secure(endpoints, job, &security, timeout, Duration::from_secs(2))
                .await?;
        Ok(JobClient {
            store,
            job: job.to_owned(),
        })
    }

    /// The job's name.
    pub fn job(&self) -> &str {
        &self.job
    }

    /// The job's handle on etcd (for [`changes`](JobClient::changes), in `changes.rs`).
    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    /// The job's keys in etcd, for the workspace's tests (which write them directly). Not
    /// part of the API: follow the job with [`changes`](JobClient::changes).
    #[doc(hidden)]
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
    /// or `None` while there is none. Only a value written together with the job's end
    /// counts (one transaction: the same revision as `done <n>`): anything else under the
    /// `result` key was written by someone else and is refused as [`Error::Garbage`].
    pub async fn result(&self) -> Result<Option<Bytes>, Error> {
        let key = self.keys().result();
        let Some(kv) = self.store.get(&key).await? else {
            return Ok(None);
        };
        let epoch = self.store.get(&self.keys().epoch()).await?;
        let finished_with_it = epoch.as_ref().is_some_and(|e| {
            e.mod_revision == kv.mod_revision
                && matches!(EpochValue::parse(&e.value), Ok(EpochValue::Done(_)))
        });
        if !finished_with_it {
            return Err(Error::Garbage {
                key,
                reason: "not written when the job finished (the job writes its result in the same \
                         transaction as its end)"
                    .into(),
            });
        }
        Ok(Some(Bytes::from(kv.value)))
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

    /// The names of every job in the etcd at `endpoints`.
    pub async fn job_names(endpoints: &[String]) -> Result<Vec<String>, Error> {
        Self::job_names_secure(endpoints, None, None).await
    }

    /// [`job_names`](JobClient::job_names) over TLS and/or as an etcd user, who needs read
    /// access to all of `/taskgraph/jobs/` (an operator's role, not a job's).
    pub async fn job_names_secure(
        endpoints: &[String],
        tls: Option<&EtcdTls>,
        auth: Option<&EtcdAuth>,
    ) -> Result<Vec<String>, Error> {
        let client =
            Self::connect_secure(endpoints, "probe", Duration::from_secs(5), tls, auth).await?;
        Ok(client.store.job_names().await?)
    }

    /// Every slot of the job, read at one revision (checkpoint values are not read).
    pub async fn status(&self) -> Result<JobStatus, Error> {
        let (kvs, revision) = self.store.load_light().await?;
        Ok(build_status(&self.job, self.keys(), &kvs, revision))
    }

    /// Hands task `task` over from its primary to a backup (a failover drill): the primary's
    /// key is deleted in a transaction that checks both slots are unchanged; the backup
    /// promotes itself at once, and the old primary stops acting and rejoins as a spare.
    /// Refused when the task has no primary or no backup.
    pub async fn hand_over(&self, task: TaskId) -> Result<Handover, HandoverError> {
        let status = self.status().await?;
        if status.state.is_none() {
            return Err(HandoverError::UnknownJob(self.job.clone()));
        }
        if status.state.is_some_and(|s| s.finished) {
            return Err(HandoverError::Finished(self.job.clone()));
        }
        let Some(t) = status.tasks.iter().find(|t| t.task == task) else {
            return Err(HandoverError::UnknownTask {
                task,
                tasks: status.tasks_total,
            });
        };
        let Some(from) = t.holders.iter().find(|h| h.slot == 0).cloned() else {
            return Err(HandoverError::NoPrimary(task));
        };
        let Some(to) = t.holders.iter().find(|h| h.slot > 0).cloned() else {
            return Err(HandoverError::NoBackup(task));
        };
        match self
            .store
            .hand_over(task, from.revision, to.slot, to.revision)
            .await
            .map_err(Error::from)?
        {
            true => Ok(Handover { from, to }),
            false => Err(HandoverError::Raced(task)),
        }
    }

    /// Ends the job as an operator (every node runs `exit` and stops). Returns the final
    /// epoch, or `None` if the job does not exist. Ending a finished job does nothing.
    pub async fn shutdown(&self) -> Result<Option<Epoch>, Error> {
        Ok(self.store.finish_by_operator().await?)
    }

    /// Deletes every key of the job; returns how many. Check first that it is finished: a
    /// running job's nodes would recreate some keys and lose their coordination.
    pub async fn delete(&self) -> Result<i64, Error> {
        Ok(self.store.delete_job().await?)
    }
}

/// Builds a job's status from its keys (pure; the keys were read at `revision`).
pub(crate) fn build_status(
    job: &str,
    keys: &JobKeys,
    kvs: &[crate::etcd::Kv],
    revision: i64,
) -> JobStatus {
    let mut spec: Option<JobSpec> = None;
    let mut state = None;
    let mut garbage = Vec::new();
    let mut primaries: BTreeMap<TaskId, SlotHolder> = BTreeMap::new();
    let mut backups: BTreeMap<TaskId, Vec<SlotHolder>> = BTreeMap::new();
    let mut nodes: BTreeMap<String, String> = BTreeMap::new();
    let mut stalls: Vec<NodeStall> = Vec::new();
    let mut has_result = false;
    for kv in kvs {
        let name = String::from_utf8_lossy(&kv.key).into_owned();
        let holder = |slot: u32| match serde_json::from_slice::<Holder>(&kv.value) {
            Ok(h) => Some(SlotHolder {
                node: h.node,
                addr: h.addr,
                slot,
                revision: kv.create_revision,
            }),
            Err(_) => None,
        };
        match keys.parse(&kv.key) {
            Some(JobKey::Spec) => match JobSpec::decode(&kv.value) {
                Ok(s) => spec = Some(s),
                Err(e) => garbage.push(format!("{name}: {e}")),
            },
            Some(JobKey::Epoch) => match EpochValue::parse(&kv.value) {
                Ok(v) => state = Some(JobState::from(v)),
                Err(e) => garbage.push(format!("{name}: {e}")),
            },
            Some(JobKey::Primary(t)) => match holder(0) {
                Some(h) => {
                    primaries.insert(t, h);
                }
                None => garbage.push(format!("{name}: not a slot holder")),
            },
            Some(JobKey::Backup(t, k)) => match holder(k) {
                Some(h) => backups.entry(t).or_default().push(h),
                None => garbage.push(format!("{name}: not a slot holder")),
            },
            Some(JobKey::Node(n)) => match serde_json::from_slice::<NodeRecord>(&kv.value) {
                Ok(r) => {
                    if let Some(note) = r.stall {
                        stalls.push(NodeStall {
                            node: n.clone(),
                            note,
                        });
                    }
                    nodes.insert(n, r.addr);
                }
                Err(_) => garbage.push(format!("{name}: not a node record")),
            },
            Some(JobKey::Result) => has_result = true,
            Some(JobKey::Draft(_)) => {
                if serde_json::from_slice::<crate::etcd::keys::Draft>(&kv.value).is_err() {
                    garbage.push(format!("{name}: not a draft"));
                }
            }
            Some(JobKey::Checkpoint(_)) | None => {}
        }
    }
    let (tasks_total, replicas) = spec.as_ref().map_or((0, 0), |s| (s.tasks, s.replicas));
    let finished = state.is_some_and(|s: JobState| s.finished);
    let mut holding: std::collections::BTreeSet<&str> = std::collections::BTreeSet::new();
    let tasks = (0..tasks_total)
        .map(|t| {
            let primary = primaries.get(&t);
            let mut bs = backups.get(&t).cloned().unwrap_or_default();
            bs.sort_by_key(|h| h.slot);
            let named = stalls
                .iter()
                .flat_map(|s| &s.note.reasons)
                .any(|r| r.task == Some(t));
            let health = if finished {
                Health::Finished
            } else if primary.is_none() {
                Health::Down
            } else if named {
                Health::Stalled
            } else if (bs.len() as u32) + 1 < replicas {
                Health::Degraded
            } else {
                Health::Healthy
            };
            let mut holders: Vec<SlotHolder> = primary.cloned().into_iter().collect();
            holders.extend(bs.iter().cloned());
            TaskStatus {
                task: t,
                primary: primary.map(|h| h.node.clone()),
                addr: primary.map(|h| h.addr.clone()),
                term: primary.map(|h| crate::etcd::keys::term_of(h.revision)),
                backups: bs.iter().map(|h| h.node.clone()).collect(),
                health,
                holders,
            }
        })
        .collect::<Vec<_>>();
    for t in &tasks {
        for h in &t.holders {
            holding.insert(h.node.as_str());
        }
    }
    let spares = nodes
        .iter()
        .filter(|(n, _)| !holding.contains(n.as_str()))
        .map(|(n, a)| SpareNode {
            node: n.clone(),
            addr: a.clone(),
        })
        .collect();
    JobStatus {
        job: job.to_owned(),
        revision,
        tasks_total,
        replicas,
        state,
        created_ms: spec.as_ref().and_then(|s| s.created_ms),
        tasks,
        spares,
        nodes: nodes.len(),
        has_result,
        garbage,
        stalls: if finished { Vec::new() } else { stalls },
    }
}
