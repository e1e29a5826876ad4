//! The one place that reads the job's raw keys: turns the job watch's events into what the
//! launcher follows ([`Seen`]). Everything else in this crate works on [`Seen`] only.

use taskgraph::etcd::keys::{EpochValue, JobKey, NodeRecord};
use taskgraph::etcd::watch::JobEvent;
use taskgraph::{JobClient, JobState, StallNote, TaskId, Term};
use tokio::sync::mpsc;

/// One thing the launcher learned about the job.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Seen {
    /// The job's epoch key says this.
    State(JobState),
    /// A node's record: its stall report (`None`: not stalled, or the node is gone).
    Stall {
        /// The node's id.
        node: String,
        /// Its report.
        note: Option<StallNote>,
    },
    /// Task `task` has a primary of term `term`; `change` is false when read in a full
    /// snapshot of the job (not a change as it happened).
    Primary {
        /// The task.
        task: TaskId,
        /// The primary's term.
        term: Term,
        /// Whether this is a change seen live.
        change: bool,
    },
}

/// The job's changes, as [`Seen`] values.
#[derive(Debug)]
pub(crate) struct JobFeed {
    client: JobClient,
    rx: mpsc::Receiver<JobEvent>,
}

impl JobFeed {
    /// Starts following the job: first everything it holds, then each change.
    pub(crate) fn new(client: &JobClient) -> JobFeed {
        JobFeed {
            rx: client.watch(),
            client: client.clone(),
        }
    }

    /// What the next change of the job shows (possibly nothing the launcher follows), or
    /// `None` once the watch has ended.
    pub(crate) async fn next(&mut self) -> Option<Vec<Seen>> {
        let event = self.rx.recv().await?;
        Some(interpret(&self.client, &event))
    }
}

fn interpret(client: &JobClient, event: &JobEvent) -> Vec<Seen> {
    let keys = client.keys();
    let mut out = Vec::new();
    let mut seen = |kv: &taskgraph::etcd::Kv, change: bool| match keys.parse(&kv.key) {
        Some(JobKey::Epoch) => {
            if let Ok(v) = EpochValue::parse(&kv.value) {
                out.push(Seen::State(JobState::from(v)));
            }
        }
        Some(JobKey::Node(node)) => {
            let note = serde_json::from_slice::<NodeRecord>(&kv.value)
                .ok()
                .and_then(|r| r.stall);
            out.push(Seen::Stall { node, note });
        }
        Some(JobKey::Primary(task)) => out.push(Seen::Primary {
            task,
            term: kv.create_revision as Term,
            change,
        }),
        _ => {}
    };
    match event {
        JobEvent::Snapshot { kvs, .. } => kvs.iter().for_each(|kv| seen(kv, false)),
        JobEvent::Put(kv) => seen(kv, true),
        JobEvent::Delete { key, .. } => {
            if let Some(JobKey::Node(node)) = keys.parse(key) {
                out.push(Seen::Stall { node, note: None });
            }
        }
        JobEvent::Disconnected => {}
    }
    out
}
