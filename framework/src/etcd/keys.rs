//! The etcd key layout of a job. Every key of a job sits under one prefix, so a job can be
//! listed, watched and removed as a whole, and access can be limited to it with etcd's
//! role-based access control.
//!
//! | key (under `/taskgraph/jobs/<job>/`) | value | written by | lease |
//! | --- | --- | --- | --- |
//! | `spec` | [`JobSpec`](crate::JobSpec) as JSON | the first node, once (create-if-absent, in the same transaction as `epoch`) | none |
//! | `epoch` | `<n>` while running, `done <n>` once finished | primaries: `inc_epoch` (compare-and-swap, fenced by the caller's term), `shutdown_job` | none |
//! | `nodes/<node>` | [`NodeRecord`] as JSON | each node, at start | the node's |
//! | `drafts/<node>` | [`Draft`] as JSON: the slot the staffer gave the node; its mod revision is the slot key's create revision | the staffer (task 0's primary), in the transaction that creates the slot key | the drafted node's |
//! | `tasks/<t>/primary` | [`Holder`] as JSON; its create revision is the task's **term** | the node that wins the election (create-if-absent) | the node's |
//! | `tasks/<t>/backup/<k>` (`k` in `1..replicas`) | [`Holder`] as JSON | a node taking backup slot `k` (create-if-absent) | the node's |
//! | `checkpoints/<t>` | [`StoredCheckpoint`] (binary) | the task's primary (`Context::checkpoint`, fenced by its term) | none |
//! | `result` | the application's bytes | the primary that ends the job with `Context::shutdown_job_with`, in the same transaction as `done <n>` | none |
//!
//! What a node watches is only what its decisions read. A spare waiting to be drafted
//! ([`JobKeys::spare_watch`]) watches `epoch`, its own record, its own `drafts/` key, and `spec`
//! with task 0's slot keys in one range (it claims task 0's primary itself when that task has
//! no node: task 0's primary is the **staffer**, who gives every other slot to a spare). The
//! holders of task 0's slots ([`JobKeys::staff_watch`]) watch every key from `drafts/` to the
//! end of `tasks/` (every node record, draft and slot key, in one range so in one order). A
//! spare that claims a slot itself ([`JobKeys::node_watch`], see `Staffing::SelfClaimed`)
//! watches `epoch`, the range from `spec` to the end of `tasks/` and its own record. A slot
//! holder ([`JobKeys::holder_watch`]) watches what a spare does and the slot keys of a few more
//! tasks only: its own, its neighbours' over the topology's period and those it pulls from or
//! hears from outside the topology. Checkpoints and the other nodes' records sit outside every node's
//! ranges (`checkpoints/` sorts before `epoch`, `nodes/` between `epoch` and `spec`), so a
//! checkpoint written every epoch by every task, or a node joining, costs the other nodes
//! nothing. [`JobKeys::job_watch`] (the whole prefix) is for tools following the job.
//!
//! A node holds at most one slot (one `primary` or one `backup/<k>` key) at a time. All keys
//! written with a lease vanish when the node's lease ends (crash, partition, clean stop).
//!
//! The framework owns every key. A value it did not write is never obeyed, and is rewritten
//! where the framework knows the truth: the `spec` and the `epoch` by the acting primary of
//! the lowest-numbered task that has one (to the spec the job runs with, to the last good epoch), the `epoch` also by
//! `inc_epoch`, a node's record by that node; each rewrite is a compare-and-swap on the bad
//! value's revision, and the `spec`'s and `epoch`'s are fenced by the healer's term. A bad
//! checkpoint is never restored and is overwritten by the next one; a `result` counts only when
//! written in the same transaction as `done <n>`. The README's "etcd key layout" has the table.

use serde::{Deserialize, Serialize};

use crate::TaskId;

/// The root of every job's keys.
pub const ROOT: &str = "/taskgraph/jobs/";

/// The keys of one job.
#[derive(Debug, Clone)]
pub struct JobKeys {
    prefix: String,
}

/// A key under a job's prefix, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobKey {
    /// `spec`
    Spec,
    /// `epoch`
    Epoch,
    /// `nodes/<node>`
    Node(String),
    /// `drafts/<node>`
    Draft(String),
    /// `tasks/<t>/primary`
    Primary(TaskId),
    /// `tasks/<t>/backup/<k>`
    Backup(TaskId, u32),
    /// `checkpoints/<t>`
    Checkpoint(TaskId),
    /// `result`
    Result,
}

impl JobKeys {
    /// The keys of job `job` (whose name is already validated).
    pub fn new(job: &str) -> Self {
        Self {
            prefix: format!("{ROOT}{job}/"),
        }
    }
    /// The job's prefix, ending in `/`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    /// The spec key.
    pub fn spec(&self) -> String {
        format!("{}spec", self.prefix)
    }
    /// The epoch key.
    pub fn epoch(&self) -> String {
        format!("{}epoch", self.prefix)
    }
    /// A node's registration key.
    pub fn node(&self, node: &str) -> String {
        format!("{}nodes/{node}", self.prefix)
    }
    /// The key under which the staffer tells node `node` the slot it gave it.
    pub fn draft(&self, node: &str) -> String {
        format!("{}drafts/{node}", self.prefix)
    }
    /// The primary (election) key of task `t`.
    pub fn primary(&self, t: TaskId) -> String {
        format!("{}tasks/{t}/primary", self.prefix)
    }
    /// Backup slot `k` of task `t`.
    pub fn backup(&self, t: TaskId, k: u32) -> String {
        format!("{}tasks/{t}/backup/{k}", self.prefix)
    }
    /// The job's result (written once, when the job finishes).
    pub fn result(&self) -> String {
        format!("{}result", self.prefix)
    }
    /// The checkpoint of task `t`.
    pub fn checkpoint(&self, t: TaskId) -> String {
        format!("{}checkpoints/{t}", self.prefix)
    }

    /// What node `node` watches: the `epoch` key, the range from `spec` through every slot key
    /// under `tasks/`, and the node's own record. Nothing else a node decides on lives in the
    /// job, and nothing in these ranges is written per epoch except the epoch itself.
    pub fn node_watch(&self, node: &str) -> Vec<KeyRange> {
        vec![
            KeyRange::key(self.epoch()),
            KeyRange {
                key: self.spec(),
                end: Some(format!("{}tasks0", self.prefix)),
            },
            KeyRange::key(self.node(node)),
        ]
    }

    /// What a spare waiting to be drafted watches: the `epoch` key, its own record, its own
    /// `drafts/` key (where the staffer gives it a slot), and the `spec` key with task 0's slot
    /// keys (task 0's primary is the staffer; a spare claims it itself when task 0 has no node).
    /// Nothing here changes when another node joins or takes a slot elsewhere. Four ranges, so
    /// four watches on one stream: etcd spends on each watch it creates about what it spends on
    /// a request, and 2,048 spares join a large job together.
    pub fn spare_watch(&self, node: &str) -> Vec<KeyRange> {
        vec![
            KeyRange::key(self.epoch()),
            KeyRange::key(self.node(node)),
            KeyRange::key(self.draft(node)),
            self.spec_and_task_0(),
        ]
    }

    /// The `spec` key and task 0's slot keys in one range: nothing the framework writes sorts
    /// between `spec` and `tasks/0/` (a key someone else put there is watched and ignored:
    /// [`JobKeys::parse`] names no slot by a task number with a sign or a leading zero).
    pub fn spec_and_task_0(&self) -> KeyRange {
        KeyRange {
            key: self.spec(),
            end: Some(format!("{}tasks/00", self.prefix)),
        }
    }

    /// What the holders of task 0's slots watch (its primary is the staffer, its backups are
    /// ready to be): every key from `drafts/` to the end of `tasks/` in one range, so in one
    /// order: drafts, the epoch, node records, the result, the spec and every slot key (not
    /// the checkpoints, which sort before `drafts/`).
    pub fn staff_watch(&self) -> Vec<KeyRange> {
        vec![KeyRange {
            key: format!("{}drafts/", self.prefix),
            end: Some(format!("{}tasks0", self.prefix)),
        }]
    }

    /// Every slot key of the job (`tasks/…`).
    pub fn all_slots(&self) -> KeyRange {
        KeyRange {
            key: format!("{}tasks/", self.prefix),
            end: Some(format!("{}tasks0", self.prefix)),
        }
    }

    /// Every slot key of task `t`: its primary and its backups (`tasks/<t>/…`).
    pub fn task_slots(&self, t: TaskId) -> KeyRange {
        // `tasks/<t>/` ends in '/': the range ends where '/' is followed by '0', so task 1's
        // range holds none of task 10's keys.
        KeyRange {
            key: format!("{}tasks/{t}/", self.prefix),
            end: Some(format!("{}tasks/{t}0", self.prefix)),
        }
    }

    /// What node `node` watches while it holds a slot: the `epoch` key, its own record and
    /// `drafts/` key, the `spec` key with task 0's slot keys (every holder watches task 0: its
    /// primary reports the job), and the slot keys of the other `tasks` only (its own task, its
    /// neighbours' and the few others it talks to), not the whole job's: a slot change
    /// elsewhere costs it nothing. A spare's ranges ([`JobKeys::spare_watch`]) are the first of
    /// these, so a drafted spare's watch keeps its watches and adds the others.
    pub fn holder_watch(
        &self,
        node: &str,
        tasks: impl IntoIterator<Item = TaskId>,
    ) -> Vec<KeyRange> {
        let mut ranges = self.spare_watch(node);
        ranges.extend(
            tasks
                .into_iter()
                .filter(|t| *t != 0)
                .map(|t| self.task_slots(t)),
        );
        ranges
    }

    /// Every key of the job (for tools following the whole job).
    pub fn job_watch(&self) -> Vec<KeyRange> {
        // The prefix ends in '/': the range ends where '/' is followed by '0'.
        let end = format!("{}0", self.prefix.trim_end_matches('/'));
        vec![KeyRange {
            key: self.prefix.clone(),
            end: Some(end),
        }]
    }

    /// Parses a full key of this job; `None` for keys of other jobs or unknown shapes.
    pub fn parse(&self, key: &[u8]) -> Option<JobKey> {
        let key = std::str::from_utf8(key).ok()?;
        let rest = key.strip_prefix(&self.prefix)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            ["spec"] => Some(JobKey::Spec),
            ["epoch"] => Some(JobKey::Epoch),
            ["result"] => Some(JobKey::Result),
            ["nodes", node] if !node.is_empty() => Some(JobKey::Node((*node).to_owned())),
            ["drafts", node] if !node.is_empty() => Some(JobKey::Draft((*node).to_owned())),
            ["tasks", t, "primary"] => Some(JobKey::Primary(number(t)?)),
            ["checkpoints", t] => Some(JobKey::Checkpoint(number(t)?)),
            ["tasks", t, "backup", k] => Some(JobKey::Backup(number(t)?, number(k)?)),
            _ => None,
        }
    }
}

/// A task or slot number as the framework writes it in a key: decimal, no sign, no leading
/// zero. `+3` or `03` would parse as 3 but is another key (one that sorts elsewhere: `tasks/+0/`
/// lies in a spare's range from `spec` to task 0's slots), so it names no slot.
fn number(s: &str) -> Option<u32> {
    s.parse().ok().filter(|n: &u32| n.to_string() == s)
}

/// Keys `key..end` (etcd's range: `end` excluded), or the single key `key` when `end` is `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRange {
    /// The first key.
    pub key: String,
    /// The end of the range, excluded.
    pub end: Option<String>,
}

impl KeyRange {
    fn key(key: String) -> Self {
        KeyRange { key, end: None }
    }

    /// Whether `k` lies in the range.
    pub fn contains(&self, k: &[u8]) -> bool {
        match &self.end {
            None => k == self.key.as_bytes(),
            Some(end) => self.key.as_bytes() <= k && k < end.as_bytes(),
        }
    }
}

/// A task's checkpoint as stored in etcd: the magic `tgcp1`, the epoch (8 bytes, little
/// endian), then the application's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCheckpoint {
    /// The epoch the primary was in.
    pub epoch: u64,
    /// The application's bytes.
    pub data: Vec<u8>,
}

impl StoredCheckpoint {
    const MAGIC: &'static [u8] = b"tgcp1";

    /// The stored form.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::MAGIC.len() + 8 + self.data.len());
        v.extend_from_slice(Self::MAGIC);
        v.extend_from_slice(&self.epoch.to_le_bytes());
        v.extend_from_slice(&self.data);
        v
    }

    /// Parses a stored value; an error names what is wrong.
    pub fn decode(v: &[u8]) -> Result<Self, String> {
        let rest = v
            .strip_prefix(Self::MAGIC)
            .ok_or_else(|| "not a taskgraph checkpoint (bad magic)".to_owned())?;
        let (epoch, data) = rest
            .split_first_chunk::<8>()
            .ok_or_else(|| "truncated checkpoint (no epoch)".to_owned())?;
        Ok(StoredCheckpoint {
            epoch: u64::from_le_bytes(*epoch),
            data: data.to_vec(),
        })
    }
}

/// Who holds a slot: stored as the value of `primary` and `backup/<k>` keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// The node's id.
    pub node: String,
    /// Where the node answers gRPC (`host:port`).
    pub addr: String,
}

/// A node's registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Where the node answers gRPC (`host:port`).
    pub addr: String,
    /// Set while the node sees the job stalled: the epoch has not moved for longer than the
    /// stall time, and what the node can tell about why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stall: Option<StallNote>,
    /// Whether the node, as a spare, waits for the staffer to give it a slot (under
    /// `drafts/<node>`) rather than claiming one itself. Only such nodes are drafted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub drafted: bool,
}

/// A slot the staffer gave a node (the value of `drafts/<node>`). The key is written in the
/// transaction that creates the slot key under the drafted node's lease, so its mod revision
/// is the slot key's create revision (for a primary slot, the term).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Draft {
    /// The task.
    pub task: TaskId,
    /// The slot: 0 for the primary, `k` for backup slot `k`.
    pub slot: u32,
}

/// What a node tells about a stalled job (in its [`NodeRecord`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StallNote {
    /// The epoch the job is stuck in.
    pub epoch: u64,
    /// How long the node had seen the epoch unmoved when it wrote the note (ms).
    pub for_ms: u64,
    /// The node's stall time: after how long without a move it reports (ms).
    pub after_ms: u64,
    /// What the node sees as the causes; empty when it sees none.
    pub reasons: Vec<StallReason>,
}

/// One cause of a stall, as far as one node can tell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StallReason {
    /// The task concerned, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<TaskId>,
    /// The key concerned (full etcd key), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// What is wrong, for a person.
    pub text: String,
}

impl std::fmt::Display for StallReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// The value of the `epoch` key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EpochValue {
    /// The job runs in this epoch.
    Running(u64),
    /// The job finished in this epoch.
    Done(u64),
}

impl EpochValue {
    /// Parses the text stored under `epoch`.
    pub fn parse(v: &[u8]) -> Result<Self, String> {
        let s = std::str::from_utf8(v).map_err(|_| "not UTF-8".to_owned())?;
        let bad = || format!("expected `<n>` or `done <n>`, found {s:?}");
        match s.strip_prefix("done ") {
            Some(n) => n.parse().map(EpochValue::Done).map_err(|_| bad()),
            None => s.parse().map(EpochValue::Running).map_err(|_| bad()),
        }
    }
    /// The stored text.
    pub fn encode(self) -> String {
        match self {
            EpochValue::Running(n) => n.to_string(),
            EpochValue::Done(n) => format!("done {n}"),
        }
    }
    /// The epoch number.
    pub fn epoch(self) -> u64 {
        match self {
            EpochValue::Running(n) | EpochValue::Done(n) => n,
        }
    }
}

/// A primary's term: the create revision of its key (etcd revisions start at 1). The one
/// place a revision becomes a term.
pub(crate) fn term_of(create_revision: i64) -> crate::Term {
    crate::Term::try_from(create_revision).unwrap_or(0)
}

/// The create revision a term stands for, to compare against in etcd. The one place a term
/// becomes a revision.
pub(crate) fn revision_of(term: crate::Term) -> i64 {
    i64::try_from(term).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_round_trip_and_garbage_is_refused() {
        let cp = StoredCheckpoint {
            epoch: 7,
            data: b"state".to_vec(),
        };
        assert_eq!(StoredCheckpoint::decode(&cp.encode()), Ok(cp));
        assert!(StoredCheckpoint::decode(b"garbage").is_err());
        assert!(StoredCheckpoint::decode(b"tgcp1\x01\x02").is_err());
        let empty = StoredCheckpoint {
            epoch: 0,
            data: vec![],
        };
        assert_eq!(StoredCheckpoint::decode(&empty.encode()), Ok(empty));
    }

    #[test]
    fn keys_round_trip() {
        let k = JobKeys::new("j1");
        assert_eq!(k.parse(k.spec().as_bytes()), Some(JobKey::Spec));
        assert_eq!(k.parse(k.epoch().as_bytes()), Some(JobKey::Epoch));
        assert_eq!(k.parse(k.result().as_bytes()), Some(JobKey::Result));
        assert_eq!(k.parse(k.primary(7).as_bytes()), Some(JobKey::Primary(7)));
        assert_eq!(
            k.parse(k.backup(7, 2).as_bytes()),
            Some(JobKey::Backup(7, 2))
        );
        assert_eq!(
            k.parse(k.node("n1").as_bytes()),
            Some(JobKey::Node("n1".into()))
        );
        assert_eq!(
            k.parse(k.checkpoint(3).as_bytes()),
            Some(JobKey::Checkpoint(3))
        );
        assert_eq!(k.parse(b"/taskgraph/jobs/j1/tasks/x/primary"), None);
        assert_eq!(k.parse(b"/taskgraph/jobs/j2/spec"), None);
        assert_eq!(k.parse(b"/taskgraph/jobs/j1/tasks/-1/primary"), None);
        for other in ["+0", "00", "03", "+3", " 3", ""] {
            let key = format!("/taskgraph/jobs/j1/tasks/{other}/primary");
            assert_eq!(k.parse(key.as_bytes()), None, "{key}");
            let key = format!("/taskgraph/jobs/j1/tasks/3/backup/{other}");
            assert_eq!(k.parse(key.as_bytes()), None, "{key}");
            let key = format!("/taskgraph/jobs/j1/checkpoints/{other}");
            assert_eq!(k.parse(key.as_bytes()), None, "{key}");
        }
        assert_eq!(
            k.parse(b"/taskgraph/jobs/j1/tasks/0/backup/10"),
            Some(JobKey::Backup(0, 10))
        );
        assert_eq!(k.parse(&[0xff, 0xfe]), None);
    }

    #[test]
    fn a_node_watches_its_decisions_keys_and_not_checkpoints_or_other_records() {
        let k = JobKeys::new("j1");
        let watched = |key: &str| {
            k.node_watch("n1")
                .iter()
                .any(|r| r.contains(key.as_bytes()))
        };
        for key in [
            k.epoch(),
            k.spec(),
            k.primary(0),
            k.primary(1023),
            k.backup(7, 2),
            k.node("n1"),
        ] {
            assert!(watched(&key), "{key} must be watched");
        }
        for key in [
            k.checkpoint(0),
            k.checkpoint(7),
            k.node("n2"),
            k.node("n1x"),
            k.result(),
            "/taskgraph/jobs/j10/spec".to_owned(),
            "/taskgraph/jobs/j1/tasks0".to_owned(),
        ] {
            assert!(!watched(&key), "{key} must not be watched");
        }
        let job = k.job_watch();
        for key in [k.checkpoint(3), k.node("n2"), k.result(), k.spec()] {
            assert!(job.iter().any(|r| r.contains(key.as_bytes())));
        }
        assert!(!job.iter().any(|r| r.contains(b"/taskgraph/jobs/j10/spec")));
    }

    #[test]
    fn a_spare_watches_its_own_keys_the_spec_and_task_0s_slots_in_four_ranges() {
        let k = JobKeys::new("j1");
        let ranges = k.spare_watch("n1");
        assert_eq!(ranges.len(), 4);
        let watched = |key: &str| ranges.iter().any(|r| r.contains(key.as_bytes()));
        for key in [
            k.epoch(),
            k.spec(),
            k.node("n1"),
            k.draft("n1"),
            k.primary(0),
            k.backup(0, 1),
            k.backup(0, 12),
        ] {
            assert!(watched(&key), "{key} must be watched");
        }
        for key in [
            k.primary(1),
            k.primary(10),
            k.backup(1, 1),
            k.node("n2"),
            k.draft("n2"),
            k.draft("n1x"),
            k.checkpoint(0),
            k.result(),
            "/taskgraph/jobs/j1/tasks/00/primary".to_owned(),
            "/taskgraph/jobs/j10/spec".to_owned(),
        ] {
            assert!(!watched(&key), "{key} must not be watched");
        }
    }

    #[test]
    fn a_slot_holder_watches_only_the_slot_keys_of_its_tasks_and_task_0s() {
        let k = JobKeys::new("j1");
        let ranges = k.holder_watch("n1", [0, 1, 7]);
        assert_eq!(
            ranges,
            k.holder_watch("n1", [1, 7]),
            "task 0 is always watched"
        );
        assert_eq!(
            ranges.len(),
            6,
            "epoch, record, draft, spec and task 0, 1, 7"
        );
        assert!(ranges.starts_with(&k.spare_watch("n1")));
        let watched = |key: &str| ranges.iter().any(|r| r.contains(key.as_bytes()));
        for key in [
            k.epoch(),
            k.spec(),
            k.node("n1"),
            k.draft("n1"),
            k.primary(0),
            k.backup(0, 1),
            k.primary(1),
            k.backup(1, 1),
            k.primary(7),
            k.backup(7, 2),
        ] {
            assert!(watched(&key), "{key} must be watched");
        }
        for key in [
            k.primary(10),
            k.backup(11, 1),
            k.primary(2),
            k.primary(17),
            k.draft("n2"),
            k.backup(70, 1),
            k.node("n2"),
            k.checkpoint(1),
            k.result(),
        ] {
            assert!(!watched(&key), "{key} must not be watched");
        }
    }

    #[test]
    fn epoch_values() {
        assert_eq!(EpochValue::parse(b"12"), Ok(EpochValue::Running(12)));
        assert_eq!(EpochValue::parse(b"done 3"), Ok(EpochValue::Done(3)));
        assert!(EpochValue::parse(b"-1").is_err());
        assert!(EpochValue::parse(b"done").is_err());
        assert!(EpochValue::parse(b"\xff").is_err());
        for v in [EpochValue::Running(0), EpochValue::Done(u64::MAX)] {
            assert_eq!(EpochValue::parse(v.encode().as_bytes()), Ok(v));
        }
    }
}
