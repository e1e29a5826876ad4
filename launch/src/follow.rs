//! Turns the job's typed changes ([`JobClient::changes`]) into what the launcher follows
//! ([`Seen`]). Everything else in this crate works on [`Seen`] only.

use taskgraph::{JobChange, JobChanges, JobClient, JobState, StallNote, TaskId, Term};

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
    changes: JobChanges,
}

impl JobFeed {
    /// Starts following the job: first everything it holds, then each change.
    pub(crate) fn new(client: &JobClient) -> JobFeed {
        JobFeed {
            changes: client.changes(),
        }
    }

    /// What the next change of the job shows (possibly nothing the launcher follows), or
    /// `None` once the stream has ended.
    pub(crate) async fn next(&mut self) -> Option<Vec<Seen>> {
        match self.changes.recv().await? {
            Ok(event) => Some(interpret(event.change)),
            Err(_) => None,
        }
    }
}

fn interpret(change: JobChange) -> Vec<Seen> {
    match change {
        JobChange::Snapshot(status) => {
            let mut out: Vec<Seen> = status.state.into_iter().map(Seen::State).collect();
            for t in &status.tasks {
                if let Some(term) = t.term {
                    out.push(Seen::Primary {
                        task: t.task,
                        term,
                        change: false,
                    });
                }
            }
            for s in status.stalls {
                out.push(Seen::Stall {
                    node: s.node,
                    note: Some(s.note),
                });
            }
            out
        }
        JobChange::EpochMoved { epoch } => vec![Seen::State(JobState {
            epoch,
            finished: false,
        })],
        JobChange::Finished { epoch } => vec![Seen::State(JobState {
            epoch,
            finished: true,
        })],
        JobChange::PrimaryUp { task, term, .. } => vec![Seen::Primary {
            task,
            term,
            change: true,
        }],
        JobChange::StallReported { node, note } => vec![Seen::Stall {
            node,
            note: Some(note),
        }],
        JobChange::StallOver { node } | JobChange::NodeLeft { node } => {
            vec![Seen::Stall { node, note: None }]
        }
        _ => Vec::new(),
    }
}
