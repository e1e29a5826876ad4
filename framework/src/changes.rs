//! A job's changes in etcd, typed: [`JobClient::changes`](crate::JobClient::changes) and
//! [`JobClient::changes_since`](crate::JobClient::changes_since) yield [`ChangeEvent`]s, so a
//! program that follows a job (an operator's tool, a launcher, a dashboard) never reads the
//! etcd key layout itself.
//!
//! This module holds those two methods of [`JobClient`], and is the one place outside a node
//! that turns a raw key change (key, value, revisions) into a [`JobChange`]; the
//! interpretation ([`Interpreter`]) is pure and unit-tested here.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use serde::Serialize;
use tokio::sync::mpsc;

use crate::client::{build_status, JobClient, JobStatus};
use crate::config::JobSpec;
use crate::error::{Error, EtcdError};
use crate::etcd::admin::Change;
use crate::etcd::keys::{
    term_of, Draft, EpochValue, Holder, JobKey, JobKeys, NodeRecord, StallNote, StoredCheckpoint,
};
use crate::etcd::watch::{self, JobEvent};
use crate::etcd::Kv;
use crate::{Epoch, TaskId, Term};

/// One change of a job in etcd, as [`JobClient::changes`](crate::JobClient::changes) reports
/// it. Values the framework cannot understand are reported as [`JobChange::Garbage`], never
/// as a change of the job; keys outside the job's layout are not reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum JobChange {
    /// Everything the job holds at the event's revision: the live stream's first item, and
    /// again whenever its watch had to read the job anew (etcd compacted the history it
    /// needed to resume: the changes in between are not reported one by one). It replaces
    /// whatever the consumer knew.
    Snapshot(Box<JobStatus>),
    /// The live stream lost etcd; it retries, then resumes where it stopped (or with a new
    /// [`Snapshot`](JobChange::Snapshot)). Nothing is missed.
    Disconnected,
    /// The job's spec was written: the job was created (or a node rewrote a garbage spec
    /// with the one the job runs with).
    JobCreated {
        /// The spec.
        spec: JobSpec,
    },
    /// The job's spec was deleted: its keys are being removed
    /// ([`JobClient::delete`](crate::JobClient::delete)).
    JobDeleted,
    /// The job's epoch moved (a primary's `inc_epoch`, or a heal of a garbage epoch).
    EpochMoved {
        /// The new epoch.
        epoch: Epoch,
    },
    /// The job finished (`shutdown_job`, or an operator's shutdown).
    Finished {
        /// The final epoch.
        epoch: Epoch,
    },
    /// A node became the task's primary: it won the election, or a backup promoted itself.
    PrimaryUp {
        /// The task.
        task: TaskId,
        /// The node.
        node: String,
        /// Where the node answers gRPC.
        addr: String,
        /// Its fencing term (the primary key's create revision).
        term: Term,
    },
    /// The task lost its primary (crash, lease expiry, clean stop, handover): its neighbours
    /// get `neighbour_failed`, and a backup or a spare takes over.
    PrimaryGone {
        /// The task.
        task: TaskId,
        /// The node that held it, when the stream saw it come up (or in its snapshot).
        node: Option<String>,
        /// Its term, likewise.
        term: Option<Term>,
    },
    /// A node took backup slot `slot` of the task.
    BackupUp {
        /// The task.
        task: TaskId,
        /// The backup slot (`1..replicas`).
        slot: u32,
        /// The node.
        node: String,
        /// Where the node answers gRPC.
        addr: String,
    },
    /// Backup slot `slot` of the task was freed (the backup promoted itself, stopped or died).
    BackupGone {
        /// The task.
        task: TaskId,
        /// The backup slot.
        slot: u32,
        /// The node that held it, when the stream saw it come up (or in its snapshot).
        node: Option<String>,
    },
    /// A node registered with the job.
    NodeJoined {
        /// The node's id.
        node: String,
        /// Where it answers gRPC.
        addr: String,
    },
    /// A node's registration ended with its lease (stop, crash, partition).
    NodeLeft {
        /// The node's id.
        node: String,
    },
    /// A node sees the job stalled (its epoch unmoved for longer than the node's stall time)
    /// and says what it can tell about why. Repeated while the stall lasts.
    StallReported {
        /// The reporting node.
        node: String,
        /// Its report.
        note: StallNote,
    },
    /// A node that reported a stall sees the epoch move again.
    StallOver {
        /// The node.
        node: String,
    },
    /// A task's primary wrote a checkpoint.
    CheckpointWritten {
        /// The task.
        task: TaskId,
        /// The epoch it was taken in.
        epoch: Epoch,
        /// The size of the application's bytes.
        bytes: usize,
    },
    /// A result was stored under the job's `result` key
    /// ([`JobClient::result`](crate::JobClient::result) reads it, and refuses one not written
    /// with the job's end).
    ResultWritten {
        /// Its size.
        bytes: usize,
    },
    /// A value under one of the job's keys that the framework cannot understand (someone
    /// else wrote it). The nodes ignore it, and rewrite it where they know the truth.
    Garbage {
        /// The full etcd key.
        key: String,
        /// What is wrong with the value.
        reason: String,
    },
}

/// A [`JobChange`] and the etcd revision that made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChangeEvent {
    /// The etcd revision of the change (of the read, for a
    /// [`Snapshot`](JobChange::Snapshot); the last one seen, for
    /// [`Disconnected`](JobChange::Disconnected)).
    pub revision: i64,
    /// What changed.
    pub change: JobChange,
}

/// The stream of a job's changes: from [`JobClient::changes`](crate::JobClient::changes)
/// (live, never ends while etcd comes back) or
/// [`JobClient::changes_since`](crate::JobClient::changes_since) (a replay, which ends with one
/// `Err` when etcd is lost or no longer has the history). Read it with
/// [`recv`](JobChanges::recv), [`try_recv`](JobChanges::try_recv), or as a
/// [`futures::Stream`]. Dropping it ends the watch.
#[derive(Debug)]
pub struct JobChanges {
    source: Source,
    interpreter: Interpreter,
}

#[derive(Debug)]
enum Source {
    Live(mpsc::Receiver<JobEvent>),
    Replay(mpsc::Receiver<Result<Change, EtcdError>>),
}

/// What the sources deliver, before interpretation.
enum Raw {
    Event(JobEvent),
    Failed(EtcdError),
}

impl Source {
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Raw>> {
        match self {
            Source::Live(rx) => rx.poll_recv(cx).map(|e| e.map(Raw::Event)),
            Source::Replay(rx) => rx.poll_recv(cx).map(|e| e.map(Raw::from)),
        }
    }

    fn try_recv(&mut self) -> Option<Raw> {
        match self {
            Source::Live(rx) => rx.try_recv().ok().map(Raw::Event),
            Source::Replay(rx) => rx.try_recv().ok().map(Raw::from),
        }
    }
}

impl From<Result<Change, EtcdError>> for Raw {
    fn from(r: Result<Change, EtcdError>) -> Self {
        match r {
            Ok(Change::Put(kv)) => Raw::Event(JobEvent::Put(kv)),
            Ok(Change::Delete { key, revision }) => Raw::Event(JobEvent::Delete { key, revision }),
            Err(e) => Raw::Failed(e),
        }
    }
}

impl JobChanges {
    pub(crate) fn live(job: &str, keys: JobKeys, rx: mpsc::Receiver<JobEvent>) -> Self {
        JobChanges {
            source: Source::Live(rx),
            interpreter: Interpreter::new(job, keys),
        }
    }

    pub(crate) fn replay(
        job: &str,
        keys: JobKeys,
        rx: mpsc::Receiver<Result<Change, EtcdError>>,
    ) -> Self {
        JobChanges {
            source: Source::Replay(rx),
            interpreter: Interpreter::new(job, keys),
        }
    }

    fn take(&mut self, raw: Raw) -> Option<Result<ChangeEvent, Error>> {
        match raw {
            Raw::Event(ev) => self.interpreter.event(ev).map(Ok),
            Raw::Failed(e) => Some(Err(e.into())),
        }
    }

    /// The next change, waiting for it. `None` once the stream has ended (a replay after its
    /// `Err`); the live stream yields only `Ok`.
    pub async fn recv(&mut self) -> Option<Result<ChangeEvent, Error>> {
        std::future::poll_fn(|cx| self.poll_change(cx)).await
    }

    /// The next change if one is already there (to take a burst of changes in one go).
    pub fn try_recv(&mut self) -> Option<Result<ChangeEvent, Error>> {
        loop {
            let raw = self.source.try_recv()?;
            if let Some(out) = self.take(raw) {
                return Some(out);
            }
        }
    }

    fn poll_change(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<ChangeEvent, Error>>> {
        loop {
            let Some(raw) = ready!(self.source.poll_recv(cx)) else {
                return Poll::Ready(None);
            };
            if let Some(out) = self.take(raw) {
                return Poll::Ready(Some(out));
            }
        }
    }
}

impl futures::Stream for JobChanges {
    type Item = Result<ChangeEvent, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_change(cx)
    }
}

impl JobClient {
    /// Follows the job's changes, typed (see [`JobChange`](crate::JobChange)): first a
    /// [`Snapshot`](crate::JobChange::Snapshot) of every slot, then each change with its etcd
    /// revision. The stream survives etcd restarts: it reports
    /// [`Disconnected`](crate::JobChange::Disconnected), then resumes from the last revision it
    /// saw, or with a new snapshot if etcd compacted that history away. It yields only `Ok`,
    /// and ends when dropped.
    ///
    /// ```no_run
    /// # async fn f(client: taskgraph::JobClient) -> Result<(), taskgraph::Error> {
    /// use taskgraph::JobChange;
    /// let mut changes = client.changes();
    /// while let Some(event) = changes.recv().await {
    ///     match event?.change {
    ///         JobChange::PrimaryUp { task, node, term, .. } => {
    ///             println!("task {task}: primary {node} (term {term})")
    ///         }
    ///         JobChange::PrimaryGone { task, .. } => println!("task {task} lost its primary"),
    ///         JobChange::Finished { .. } => break,
    ///         _ => {}
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub fn changes(&self) -> JobChanges {
        let (tx, rx) = mpsc::channel(256);
        // The ranges never change: their sender goes at once, the receiver keeps the value.
        let (_, ranges) = tokio::sync::watch::channel(watch::WatchRanges {
            generation: 0,
            ranges: self.keys().job_watch(),
        });
        tokio::spawn(watch::run(self.store().clone(), ranges, None, tx));
        JobChanges::live(self.job(), self.keys().clone(), rx)
    }

    /// Replays the job's changes from etcd revision `from` (while etcd keeps that history),
    /// then follows new ones, typed as by [`changes`](JobClient::changes) but without a first
    /// snapshot: a deletion names the slot's holder only if the replay saw it come. The stream
    /// yields one `Err` when the history is compacted away or etcd is lost, then ends.
    pub async fn changes_since(&self, from: i64) -> Result<JobChanges, Error> {
        let rx = self.store().history(from).await?;
        Ok(JobChanges::replay(self.job(), self.keys().clone(), rx))
    }
}

/// Turns a job's raw key changes into [`ChangeEvent`]s. Pure; it remembers who holds which
/// slot and which nodes report a stall, to say who went when a key is deleted.
#[derive(Debug)]
pub(crate) struct Interpreter {
    job: String,
    keys: JobKeys,
    /// Each task's primary: node and term.
    primaries: BTreeMap<TaskId, (String, Term)>,
    /// Each backup slot's node, and the slot key's create revision.
    backups: BTreeMap<(TaskId, u32), (String, i64)>,
    /// Nodes whose record holds a stall report.
    stalled: BTreeSet<String>,
    /// The last revision seen.
    revision: i64,
}

impl Interpreter {
    /// An interpreter for job `job`, knowing nothing yet.
    pub(crate) fn new(job: &str, keys: JobKeys) -> Self {
        Interpreter {
            job: job.to_owned(),
            keys,
            primaries: BTreeMap::new(),
            backups: BTreeMap::new(),
            stalled: BTreeSet::new(),
            revision: 0,
        }
    }

    /// One event of the job's watch; `None` when it changes nothing a consumer sees.
    pub(crate) fn event(&mut self, ev: JobEvent) -> Option<ChangeEvent> {
        match ev {
            JobEvent::Snapshot { kvs, revision, .. } => Some(self.snapshot(&kvs, revision)),
            JobEvent::Put(kv) => self.put(&kv),
            JobEvent::Delete { key, revision } => self.delete(&key, revision),
            JobEvent::Disconnected => Some(ChangeEvent {
                revision: self.revision,
                change: JobChange::Disconnected,
            }),
        }
    }

    /// Every key of the job at `revision`: forgets what it knew, learns the slots and stalls.
    pub(crate) fn snapshot(&mut self, kvs: &[Kv], revision: i64) -> ChangeEvent {
        let status = build_status(&self.job, &self.keys, kvs, revision);
        self.primaries.clear();
        self.backups.clear();
        self.stalled.clear();
        for t in &status.tasks {
            for h in &t.holders {
                if h.slot == 0 {
                    self.primaries
                        .insert(t.task, (h.node.clone(), term_of(h.revision)));
                } else {
                    self.backups
                        .insert((t.task, h.slot), (h.node.clone(), h.revision));
                }
            }
        }
        self.stalled
            .extend(status.stalls.iter().map(|s| s.node.clone()));
        self.revision = revision;
        ChangeEvent {
            revision,
            change: JobChange::Snapshot(Box::new(status)),
        }
    }

    /// A key written.
    pub(crate) fn put(&mut self, kv: &Kv) -> Option<ChangeEvent> {
        let revision = kv.mod_revision;
        self.revision = self.revision.max(revision);
        let garbage = |reason: String| JobChange::Garbage {
            key: String::from_utf8_lossy(&kv.key).into_owned(),
            reason,
        };
        let change = match self.keys.parse(&kv.key)? {
            JobKey::Spec => match JobSpec::decode(&kv.value) {
                Ok(spec) => JobChange::JobCreated { spec },
                Err(e) => garbage(e),
            },
            JobKey::Epoch => match EpochValue::parse(&kv.value) {
                Ok(EpochValue::Running(epoch)) => JobChange::EpochMoved { epoch },
                Ok(EpochValue::Done(epoch)) => JobChange::Finished { epoch },
                Err(e) => garbage(e),
            },
            JobKey::Primary(task) => match serde_json::from_slice::<Holder>(&kv.value) {
                Ok(h) => {
                    let term = term_of(kv.create_revision);
                    let now = (h.node.clone(), term);
                    if self.primaries.insert(task, now.clone()) == Some(now) {
                        // The same primary in the same term: nothing changed.
                        return None;
                    }
                    JobChange::PrimaryUp {
                        task,
                        node: h.node,
                        addr: h.addr,
                        term,
                    }
                }
                Err(e) => garbage(format!("not a slot holder: {e}")),
            },
            JobKey::Backup(task, slot) => match serde_json::from_slice::<Holder>(&kv.value) {
                Ok(h) => {
                    let now = (h.node.clone(), kv.create_revision);
                    if self.backups.insert((task, slot), now.clone()) == Some(now) {
                        // The same backup in the same slot key: nothing changed.
                        return None;
                    }
                    JobChange::BackupUp {
                        task,
                        slot,
                        node: h.node,
                        addr: h.addr,
                    }
                }
                Err(e) => garbage(format!("not a slot holder: {e}")),
            },
            JobKey::Node(node) => match serde_json::from_slice::<NodeRecord>(&kv.value) {
                Ok(r) if kv.create_revision == kv.mod_revision => {
                    if r.stall.is_some() {
                        self.stalled.insert(node.clone());
                    }
                    JobChange::NodeJoined { node, addr: r.addr }
                }
                Ok(NodeRecord {
                    stall: Some(note), ..
                }) => {
                    self.stalled.insert(node.clone());
                    JobChange::StallReported { node, note }
                }
                Ok(_) if self.stalled.remove(&node) => JobChange::StallOver { node },
                // The record rewritten as it was (a heal of a garbage record, a new address).
                Ok(_) => return None,
                Err(e) => garbage(format!("not a node record: {e}")),
            },
            JobKey::Checkpoint(task) => match StoredCheckpoint::decode(&kv.value) {
                Ok(c) => JobChange::CheckpointWritten {
                    task,
                    epoch: c.epoch,
                    bytes: c.data.len(),
                },
                Err(e) => garbage(e),
            },
            JobKey::Result => JobChange::ResultWritten {
                bytes: kv.value.len(),
            },
            // A draft shows as the slot key written with it.
            JobKey::Draft(_) => match serde_json::from_slice::<Draft>(&kv.value) {
                Ok(_) => return None,
                Err(e) => garbage(format!("not a draft: {e}")),
            },
        };
        Some(ChangeEvent { revision, change })
    }

    /// A key deleted at `revision` (or its lease ended).
    pub(crate) fn delete(&mut self, key: &[u8], revision: i64) -> Option<ChangeEvent> {
        self.revision = self.revision.max(revision);
        let change = match self.keys.parse(key)? {
            JobKey::Primary(task) => {
                let held = self.primaries.remove(&task);
                JobChange::PrimaryGone {
                    task,
                    term: held.as_ref().map(|h| h.1),
                    node: held.map(|h| h.0),
                }
            }
            JobKey::Backup(task, slot) => JobChange::BackupGone {
                task,
                slot,
                node: self.backups.remove(&(task, slot)).map(|b| b.0),
            },
            JobKey::Node(node) => {
                self.stalled.remove(&node);
                JobChange::NodeLeft { node }
            }
            JobKey::Spec => JobChange::JobDeleted,
            // Removed with the job (or by hand): nothing a node acts on.
            JobKey::Epoch | JobKey::Checkpoint(_) | JobKey::Result | JobKey::Draft(_) => {
                return None
            }
        };
        Some(ChangeEvent { revision, change })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::etcd::keys::StallReason;
    use crate::Health;

    fn kv(key: String, value: impl Into<Vec<u8>>, create: i64, modified: i64) -> Kv {
        Kv {
            key: key.into_bytes(),
            value: value.into(),
            create_revision: create,
            mod_revision: modified,
            lease: 0,
        }
    }

    fn holder(node: &str) -> Vec<u8> {
        serde_json::to_vec(&Holder {
            node: node.into(),
            addr: format!("{node}:1"),
        })
        .unwrap_or_default()
    }

    fn record(addr: &str, stall: Option<StallNote>) -> Vec<u8> {
        serde_json::to_vec(&NodeRecord {
            addr: addr.into(),
            stall,
            drafted: true,
        })
        .unwrap_or_default()
    }

    fn note() -> StallNote {
        StallNote {
            epoch: 4,
            for_ms: 2500,
            after_ms: 2000,
            reasons: vec![StallReason {
                task: Some(2),
                key: None,
                text: "task 2 has no primary".into(),
            }],
        }
    }

    fn change(i: &mut Interpreter, kv: &Kv) -> Option<JobChange> {
        i.put(kv).map(|e| e.change)
    }

    fn spec() -> Vec<u8> {
        JobSpec {
            version: JobSpec::VERSION,
            tasks: 3,
            replicas: 2,
            links: BTreeMap::new(),
            params: BTreeMap::new(),
            created_ms: None,
        }
        .encode()
        .into_bytes()
    }

    #[test]
    fn every_key_of_the_layout_reads_as_its_change() {
        let keys = JobKeys::new("j");
        let mut i = Interpreter::new("j", keys.clone());
        let put = |i: &mut Interpreter, key: String, value: Vec<u8>, rev: i64| {
            i.put(&kv(key, value, rev, rev))
        };
        let ev = put(&mut i, keys.spec(), spec(), 5);
        let Some(ChangeEvent {
            revision: 5,
            change: JobChange::JobCreated { spec },
        }) = ev
        else {
            panic!("{ev:?}")
        };
        assert_eq!((spec.tasks, spec.replicas), (3, 2));
        assert_eq!(
            put(&mut i, keys.epoch(), b"7".to_vec(), 6).map(|e| e.change),
            Some(JobChange::EpochMoved { epoch: 7 })
        );
        assert_eq!(
            put(&mut i, keys.epoch(), b"done 9".to_vec(), 7).map(|e| e.change),
            Some(JobChange::Finished { epoch: 9 })
        );
        assert_eq!(
            put(&mut i, keys.primary(1), holder("a"), 8).map(|e| e.change),
            Some(JobChange::PrimaryUp {
                task: 1,
                node: "a".into(),
                addr: "a:1".into(),
                term: 8
            })
        );
        assert_eq!(
            put(&mut i, keys.backup(1, 1), holder("b"), 9).map(|e| e.change),
            Some(JobChange::BackupUp {
                task: 1,
                slot: 1,
                node: "b".into(),
                addr: "b:1".into()
            })
        );
        assert_eq!(
            put(&mut i, keys.node("c"), record("c:1", None), 10).map(|e| e.change),
            Some(JobChange::NodeJoined {
                node: "c".into(),
                addr: "c:1".into()
            })
        );
        let cp = StoredCheckpoint {
            epoch: 3,
            data: vec![1, 2, 3, 4],
        };
        assert_eq!(
            put(&mut i, keys.checkpoint(2), cp.encode(), 11).map(|e| e.change),
            Some(JobChange::CheckpointWritten {
                task: 2,
                epoch: 3,
                bytes: 4
            })
        );
        assert_eq!(
            put(&mut i, keys.result(), b"42".to_vec(), 12).map(|e| e.change),
            Some(JobChange::ResultWritten { bytes: 2 })
        );
        // Keys outside the layout are not the job's changes.
        assert_eq!(
            put(&mut i, format!("{}other", keys.prefix()), vec![], 13),
            None
        );
        assert_eq!(put(&mut i, "/elsewhere".into(), vec![], 14), None);
    }

    #[test]
    fn deletions_name_who_held_the_slot() {
        let keys = JobKeys::new("j");
        let mut i = Interpreter::new("j", keys.clone());
        let _ = i.put(&kv(keys.primary(0), holder("a"), 20, 20));
        let _ = i.put(&kv(keys.backup(0, 1), holder("b"), 21, 21));
        assert_eq!(
            i.delete(keys.primary(0).as_bytes(), 30),
            Some(ChangeEvent {
                revision: 30,
                change: JobChange::PrimaryGone {
                    task: 0,
                    node: Some("a".into()),
                    term: Some(20)
                }
            })
        );
        assert_eq!(
            i.delete(keys.backup(0, 1).as_bytes(), 31).map(|e| e.change),
            Some(JobChange::BackupGone {
                task: 0,
                slot: 1,
                node: Some("b".into())
            })
        );
        // Gone again (or never seen): nobody to name.
        assert_eq!(
            i.delete(keys.primary(0).as_bytes(), 32).map(|e| e.change),
            Some(JobChange::PrimaryGone {
                task: 0,
                node: None,
                term: None
            })
        );
        assert_eq!(
            i.delete(keys.node("a").as_bytes(), 33).map(|e| e.change),
            Some(JobChange::NodeLeft { node: "a".into() })
        );
        assert_eq!(
            i.delete(keys.spec().as_bytes(), 34).map(|e| e.change),
            Some(JobChange::JobDeleted)
        );
        for key in [keys.epoch(), keys.result(), keys.checkpoint(0)] {
            assert_eq!(i.delete(key.as_bytes(), 34), None, "{key}");
        }
    }

    #[test]
    fn garbage_is_named_with_its_key_and_reason() {
        let keys = JobKeys::new("j");
        let mut i = Interpreter::new("j", keys.clone());
        for key in [
            keys.spec(),
            keys.epoch(),
            keys.primary(0),
            keys.backup(0, 1),
            keys.node("n"),
            keys.checkpoint(0),
        ] {
            let got = change(&mut i, &kv(key.clone(), b"\xffnot json".to_vec(), 3, 4));
            let Some(JobChange::Garbage { key: named, reason }) = got else {
                panic!("{key}: {got:?}")
            };
            assert_eq!(named, key);
            assert!(!reason.is_empty(), "{key}");
        }
        // Garbage under a slot key is no primary.
        assert_eq!(
            i.delete(keys.primary(0).as_bytes(), 5).map(|e| e.change),
            Some(JobChange::PrimaryGone {
                task: 0,
                node: None,
                term: None
            })
        );
    }

    #[test]
    fn a_stall_is_reported_while_it_lasts_and_its_end_once() {
        let keys = JobKeys::new("j");
        let mut i = Interpreter::new("j", keys.clone());
        let key = keys.node("n");
        assert_eq!(
            change(&mut i, &kv(key.clone(), record("n:1", None), 2, 2)),
            Some(JobChange::NodeJoined {
                node: "n".into(),
                addr: "n:1".into()
            })
        );
        // Rewritten as it was: nothing to report.
        assert_eq!(
            change(&mut i, &kv(key.clone(), record("n:1", None), 2, 3)),
            None
        );
        for rev in [4, 5] {
            assert_eq!(
                change(
                    &mut i,
                    &kv(key.clone(), record("n:1", Some(note())), 2, rev)
                ),
                Some(JobChange::StallReported {
                    node: "n".into(),
                    note: note()
                })
            );
        }
        assert_eq!(
            change(&mut i, &kv(key.clone(), record("n:1", None), 2, 6)),
            Some(JobChange::StallOver { node: "n".into() })
        );
        assert_eq!(
            change(&mut i, &kv(key.clone(), record("n:1", None), 2, 7)),
            None
        );
        // A node that leaves mid-stall has no stall to end when it comes back.
        let _ = change(&mut i, &kv(key.clone(), record("n:1", Some(note())), 2, 8));
        let _ = i.delete(key.as_bytes(), 9);
        let _ = change(&mut i, &kv(key.clone(), record("n:1", None), 10, 10));
        assert_eq!(change(&mut i, &kv(key, record("n:1", None), 10, 11)), None);
    }

    #[test]
    fn a_change_serializes_flat_with_its_kind() {
        let ev = ChangeEvent {
            revision: 5,
            change: JobChange::PrimaryGone {
                task: 1,
                node: Some("a".into()),
                term: Some(3),
            },
        };
        assert_eq!(
            serde_json::to_value(&ev).ok(),
            Some(serde_json::json!({
                "revision": 5,
                "change": { "kind": "primary_gone", "task": 1, "node": "a", "term": 3 }
            }))
        );
        let ev = ChangeEvent {
            revision: 6,
            change: JobChange::Disconnected,
        };
        assert_eq!(
            serde_json::to_value(&ev).ok(),
            Some(serde_json::json!({ "revision": 6, "change": { "kind": "disconnected" } }))
        );
    }

    #[test]
    fn a_primary_is_up_once_per_term() {
        let keys = JobKeys::new("j");
        let mut i = Interpreter::new("j", keys.clone());
        let up = |term| {
            Some(JobChange::PrimaryUp {
                task: 3,
                node: "a".into(),
                addr: "a:1".into(),
                term,
            })
        };
        assert_eq!(
            change(&mut i, &kv(keys.primary(3), holder("a"), 40, 40)),
            up(40)
        );
        assert_eq!(
            change(&mut i, &kv(keys.primary(3), holder("a"), 40, 41)),
            None
        );
        // Gone and won again: a new term.
        let _ = i.delete(keys.primary(3).as_bytes(), 42);
        assert_eq!(
            change(&mut i, &kv(keys.primary(3), holder("a"), 43, 43)),
            up(43)
        );
    }

    #[test]
    fn a_snapshot_is_the_status_and_seeds_what_deletions_name() {
        let keys = JobKeys::new("j");
        let mut i = Interpreter::new("j", keys.clone());
        let kvs = vec![
            kv(keys.spec(), spec(), 1, 1),
            kv(keys.epoch(), b"4".to_vec(), 1, 9),
            kv(keys.primary(0), holder("a"), 5, 5),
            kv(keys.backup(0, 1), holder("b"), 6, 6),
            kv(keys.node("a"), record("a:1", None), 2, 2),
            kv(keys.node("b"), record("b:1", Some(note())), 3, 8),
        ];
        let ev = i.snapshot(&kvs, 9);
        assert_eq!(ev.revision, 9);
        let json = serde_json::to_value(&ev).unwrap_or_default();
        assert_eq!(json["change"]["kind"], "snapshot", "{json}");
        assert_eq!(json["change"]["tasks_total"], 3, "{json}");
        let JobChange::Snapshot(status) = ev.change else {
            panic!("{ev:?}")
        };
        assert_eq!(status.revision, 9);
        assert_eq!(status.state.map(|s| s.epoch), Some(4));
        assert_eq!(status.tasks[0].primary.as_deref(), Some("a"));
        assert_eq!(status.tasks[0].term, Some(5));
        assert_eq!(status.tasks[1].health, Health::Down);
        assert!(status.stalled());
        assert_eq!(
            i.delete(keys.primary(0).as_bytes(), 10).map(|e| e.change),
            Some(JobChange::PrimaryGone {
                task: 0,
                node: Some("a".into()),
                term: Some(5)
            })
        );
        assert_eq!(
            i.delete(keys.backup(0, 1).as_bytes(), 11).map(|e| e.change),
            Some(JobChange::BackupGone {
                task: 0,
                slot: 1,
                node: Some("b".into())
            })
        );
        assert_eq!(
            change(&mut i, &kv(keys.node("b"), record("b:1", None), 3, 12)),
            Some(JobChange::StallOver { node: "b".into() })
        );
        // A disconnection carries the last revision seen.
        assert_eq!(
            i.event(JobEvent::Disconnected),
            Some(ChangeEvent {
                revision: 12,
                change: JobChange::Disconnected
            })
        );
        // A new snapshot forgets the old holders.
        let _ = i.snapshot(&[], 20);
        assert_eq!(
            i.delete(keys.backup(0, 1).as_bytes(), 21).map(|e| e.change),
            Some(JobChange::BackupGone {
                task: 0,
                slot: 1,
                node: None
            })
        );
    }
}
