//! `taskgraph events`: what happens to a job, one line per event.

use std::collections::BTreeMap;
use std::time::SystemTime;

use taskgraph::{ChangeEvent, JobChange, JobClient, TaskId};

/// What the stream remembers to describe changes (whose primary went, to name a failover).
#[derive(Debug, Default)]
pub(crate) struct Memory {
    /// Tasks whose primary went, and the node that held it.
    lost: BTreeMap<TaskId, String>,
}

/// Prints the job's events from `since` (or from now) until the job finishes. A job that does
/// not exist yet is waited for (its creation is then the first line), so the stream can be
/// started before the job's nodes; a warning on stderr says so, in case the name is wrong.
pub async fn stream(client: &JobClient, since: Option<i64>) -> Result<(), String> {
    let mut memory = Memory::default();
    let mut changes = match since {
        Some(rev) if rev <= 0 => {
            return Err(format!("--since-revision must be positive, got {rev}"))
        }
        Some(rev) => client.changes_since(rev).await.map_err(|e| e.to_string())?,
        // From now: the stream opens with the job's state (who holds what).
        None => client.changes(),
    };
    let mut first = true;
    while let Some(change) = changes.recv().await {
        let change = change.map_err(|e| e.to_string())?;
        match &change.change {
            JobChange::Snapshot(status) if status.state.is_some_and(|s| s.finished) => {
                out!("{}  job {} has finished", now(), client.job());
                return Ok(());
            }
            JobChange::Snapshot(_) if !first => out!(
                "{}  rev {:<8} etcd no longer has the changes since the last one shown: \
                 following on from the job's state at this revision",
                now(),
                change.revision
            ),
            JobChange::Disconnected => eprintln!("(etcd unreachable; retrying)"),
            JobChange::Snapshot(status) if first && status.tasks_total == 0 => eprintln!(
                "warning: job {:?} does not exist (yet); waiting for it \
                 (`taskgraph jobs` lists the jobs)",
                client.job()
            ),
            _ => {}
        }
        first = false;
        let (revision, line, finished) = describe(&change, &mut memory);
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
pub(crate) fn describe(event: &ChangeEvent, m: &mut Memory) -> (i64, Option<String>, bool) {
    let rev = event.revision;
    let line = match &event.change {
        JobChange::Snapshot(_) => {
            m.lost.clear();
            None
        }
        JobChange::Disconnected => None,
        JobChange::JobCreated { spec } => Some(format!(
            "job created: {} tasks × {} replicas",
            spec.tasks, spec.replicas
        )),
        JobChange::JobDeleted => Some("job deleted".into()),
        JobChange::EpochMoved { epoch } => Some(format!("epoch {epoch}")),
        JobChange::Finished { epoch } => {
            return (
                rev,
                Some(format!("shutdown: the job finished at epoch {epoch}")),
                true,
            )
        }
        JobChange::PrimaryUp {
            task, node, term, ..
        } => Some(match m.lost.remove(task) {
            Some(old) => format!("failover: task {task} primary {old} → {node} (term {term})"),
            None => format!("election: task {task} primary {node} (term {term})"),
        }),
        JobChange::PrimaryGone { task, node, .. } => {
            let node = node.clone().unwrap_or_else(|| "?".into());
            m.lost.insert(*task, node.clone());
            Some(format!(
                "primary lost: task {task} ({node}); its neighbours see it failed"
            ))
        }
        JobChange::BackupUp {
            task, slot, node, ..
        } => Some(format!("backup: task {task} slot {slot} taken by {node}")),
        JobChange::BackupGone { task, slot, node } => Some(format!(
            "backup left: task {task} slot {slot} ({})",
            node.as_deref().unwrap_or("?")
        )),
        JobChange::NodeJoined { node, addr } => Some(format!("node {node} joined at {addr}")),
        JobChange::NodeLeft { node } => Some(format!("node {node} left")),
        JobChange::StallReported { node, note } => {
            let reasons: Vec<&str> = note.reasons.iter().map(|r| r.text.as_str()).collect();
            Some(format!(
                "stall: node {node} sees epoch {} unmoved for {:.1} s: {}",
                note.epoch,
                note.for_ms as f64 / 1000.0,
                if reasons.is_empty() {
                    "no cause seen from it".to_owned()
                } else {
                    reasons.join("; ")
                }
            ))
        }
        JobChange::StallOver { node } => {
            Some(format!("stall over: node {node} sees the epoch move again"))
        }
        JobChange::CheckpointWritten { task, epoch, bytes } => Some(format!(
            "checkpoint: task {task} at epoch {epoch} ({bytes} bytes)"
        )),
        JobChange::ResultWritten { bytes } => Some(format!("result stored ({bytes} bytes)")),
        JobChange::Garbage { key, reason } => Some(format!("garbage under {key}: {reason}")),
        // A kind of change this version does not know: nothing to say.
        _ => None,
    };
    (rev, line, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(revision: i64, change: JobChange) -> ChangeEvent {
        ChangeEvent { revision, change }
    }

    #[test]
    fn a_primary_gone_then_up_reads_as_a_failover_and_the_end_ends() {
        let mut m = Memory::default();
        let gone = at(
            7,
            JobChange::PrimaryGone {
                task: 3,
                node: Some("a".into()),
                term: Some(5),
            },
        );
        let (rev, line, end) = describe(&gone, &mut m);
        assert_eq!(rev, 7);
        assert_eq!(
            line.as_deref(),
            Some("primary lost: task 3 (a); its neighbours see it failed")
        );
        assert!(!end);
        let up = |term| {
            at(
                8,
                JobChange::PrimaryUp {
                    task: 3,
                    node: "b".into(),
                    addr: "b:1".into(),
                    term,
                },
            )
        };
        assert_eq!(
            describe(&up(8), &mut m).1.as_deref(),
            Some("failover: task 3 primary a → b (term 8)")
        );
        // The next one is an election: nobody lost the task in between.
        assert_eq!(
            describe(&up(9), &mut m).1.as_deref(),
            Some("election: task 3 primary b (term 9)")
        );
        let (_, line, end) = describe(&at(10, JobChange::Finished { epoch: 4 }), &mut m);
        assert_eq!(
            line.as_deref(),
            Some("shutdown: the job finished at epoch 4")
        );
        assert!(end);
    }
}
