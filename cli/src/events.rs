//! `taskgraph events`: what happens to a job, one line per event.

use std::collections::BTreeMap;
use std::time::SystemTime;

use taskgraph::etcd::admin::Change;
use taskgraph::etcd::keys::{EpochValue, Holder, JobKey, JobKeys, NodeRecord, StoredCheckpoint};
use taskgraph::{JobClient, JobSpec, JobStatus, TaskId};

/// What the stream remembers to describe changes (who held a slot before it went).
#[derive(Debug, Default)]
pub(crate) struct Memory {
    primaries: BTreeMap<TaskId, String>,
    lost: BTreeMap<TaskId, String>,
    backups: BTreeMap<(TaskId, u32), String>,
    /// Nodes that reported a stall not yet over.
    stalled: std::collections::BTreeSet<String>,
}

impl Memory {
    /// Whether it knows no slot holder.
    pub(crate) fn is_empty(&self) -> bool {
        self.primaries.is_empty() && self.backups.is_empty()
    }

    /// Learns who holds which slot now (to describe the changes that follow).
    pub(crate) fn remember(&mut self, status: &JobStatus) {
        for t in &status.tasks {
            for h in &t.holders {
                if h.slot == 0 {
                    self.primaries.insert(t.task, h.node.clone());
                } else {
                    self.backups.insert((t.task, h.slot), h.node.clone());
                }
            }
        }
    }
}

/// Prints the job's events from `since` (or from now) until the job finishes.
pub async fn stream(client: &JobClient, since: Option<i64>) -> Result<(), String> {
    let mut memory = Memory::default();
    let from = match since {
        Some(rev) if rev <= 0 => {
            return Err(format!("--since-revision must be positive, got {rev}"))
        }
        Some(rev) => rev,
        None => {
            // Start from now, knowing who holds what.
            let status = client.status().await.map_err(|e| e.to_string())?;
            memory.remember(&status);
            if status.state.is_some_and(|s| s.finished) {
                out!("{}  job {} has finished", now(), client.job());
                return Ok(());
            }
            status.revision + 1
        }
    };
    let mut changes = client.history(from).await.map_err(|e| e.to_string())?;
    while let Some(change) = changes.recv().await {
        let change = change.map_err(|e| e.to_string())?;
        let (revision, line, finished) = describe(client.keys(), &change, &mut memory);
        if let Some(line) = line {
            out!("{}  rev {revision:<8} {line}", now());
        }
        if finished {
            return Ok(());
        }
    }
    Err("the watch of the job ended".into())
}

fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// One change in words; `true` when it ends the job.
pub(crate) fn describe(
    keys: &JobKeys,
    change: &Change,
    m: &mut Memory,
) -> (i64, Option<String>, bool) {
    match change {
        Change::Put(kv) => {
            let rev = kv.mod_revision;
            let created = kv.create_revision == kv.mod_revision;
            let line = match keys.parse(&kv.key) {
                Some(JobKey::Spec) => Some(match JobSpec::decode(&kv.value) {
                    Ok(s) => format!("job created: {} tasks × {} replicas", s.tasks, s.replicas),
                    Err(e) => format!("garbage spec written: {e}"),
                }),
                Some(JobKey::Epoch) => match EpochValue::parse(&kv.value) {
                    Ok(EpochValue::Running(n)) => Some(format!("epoch {n}")),
                    Ok(EpochValue::Done(n)) => {
                        return (
                            rev,
                            Some(format!("shutdown: the job finished at epoch {n}")),
                            true,
                        )
                    }
                    Err(e) => Some(format!("garbage epoch written: {e}")),
                },
                Some(JobKey::Primary(t)) => {
                    let node = holder(&kv.value);
                    m.primaries.insert(t, node.clone());
                    Some(match m.lost.remove(&t) {
                        Some(old) => format!(
                            "failover: task {t} primary {old} → {node} (term {})",
                            kv.create_revision
                        ),
                        None => format!(
                            "election: task {t} primary {node} (term {})",
                            kv.create_revision
                        ),
                    })
                }
                Some(JobKey::Backup(t, k)) => {
                    let node = holder(&kv.value);
                    m.backups.insert((t, k), node.clone());
                    Some(format!("backup: task {t} slot {k} taken by {node}"))
                }
                Some(JobKey::Node(n)) if created => {
                    Some(match serde_json::from_slice::<NodeRecord>(&kv.value) {
                        Ok(r) => format!("node {n} joined at {}", r.addr),
                        Err(_) => format!("node {n} joined (garbage record)"),
                    })
                }
                Some(JobKey::Node(n)) => match serde_json::from_slice::<NodeRecord>(&kv.value) {
                    Ok(NodeRecord {
                        stall: Some(note), ..
                    }) => {
                        let reasons: Vec<&str> =
                            note.reasons.iter().map(|r| r.text.as_str()).collect();
                        m.stalled.insert(n.clone());
                        Some(format!(
                            "stall: node {n} sees epoch {} unmoved for {:.1} s: {}",
                            note.epoch,
                            note.for_ms as f64 / 1000.0,
                            if reasons.is_empty() {
                                "no cause seen from it".to_owned()
                            } else {
                                reasons.join("; ")
                            }
                        ))
                    }
                    Ok(_) if m.stalled.remove(&n) => {
                        Some(format!("stall over: node {n} sees the epoch move again"))
                    }
                    Ok(_) => None,
                    Err(_) => Some(format!("garbage record written for node {n}")),
                },
                Some(JobKey::Checkpoint(t)) => Some(match StoredCheckpoint::decode(&kv.value) {
                    Ok(c) => format!(
                        "checkpoint: task {t} at epoch {} ({} bytes)",
                        c.epoch,
                        c.data.len()
                    ),
                    Err(e) => format!("garbage checkpoint for task {t}: {e}"),
                }),
                Some(JobKey::Result) => Some(format!("result stored ({} bytes)", kv.value.len())),
                None => None,
            };
            (rev, line, false)
        }
        Change::Delete { key, revision } => {
            let line = match keys.parse(key) {
                Some(JobKey::Primary(t)) => {
                    let node = m.primaries.remove(&t).unwrap_or_else(|| "?".into());
                    m.lost.insert(t, node.clone());
                    Some(format!(
                        "primary lost: task {t} ({node}); its neighbours see it failed"
                    ))
                }
                Some(JobKey::Backup(t, k)) => {
                    let node = m.backups.remove(&(t, k)).unwrap_or_else(|| "?".into());
                    Some(format!("backup left: task {t} slot {k} ({node})"))
                }
                Some(JobKey::Node(n)) => Some(format!("node {n} left")),
                Some(JobKey::Spec) => Some("job deleted".into()),
                _ => None,
            };
            (*revision, line, false)
        }
    }
}

fn holder(value: &[u8]) -> String {
    serde_json::from_slice::<Holder>(value).map_or_else(|_| "<garbage>".into(), |h| h.node)
}
