//! Test applications: a task that records every event it gets into an audit trail, and can
//! drive the job's epochs.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use taskgraph::{async_trait, Context, Epoch, ExitReason, Task, TaskBuilder, TaskId, Term};

/// One event a task received, and on which node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// `became_primary`.
    Primary {
        /// Task.
        task: TaskId,
        /// Term.
        term: Term,
    },
    /// `became_backup`.
    Backup {
        /// Task.
        task: TaskId,
    },
    /// `enter_epoch` as primary with `term`.
    Enter {
        /// Task.
        task: TaskId,
        /// Epoch.
        epoch: Epoch,
        /// The primary's term.
        term: Term,
    },
    /// The driver's `inc_epoch(from)` succeeded under `term`.
    Moved {
        /// Task.
        task: TaskId,
        /// Epoch moved from.
        from: Epoch,
        /// The mover's term.
        term: Term,
    },
    /// `data_ready` (dataflow app): `at_epoch` is the task's epoch at delivery.
    Data {
        /// Receiving task.
        task: TaskId,
        /// Its term.
        term: Term,
        /// Epoch at delivery.
        at_epoch: Epoch,
        /// Epoch of the request.
        epoch: Epoch,
        /// Answering task.
        from: TaskId,
        /// Sequence number of the request.
        seq: u64,
        /// Method.
        method: String,
        /// Decoded answer.
        value: Option<u64>,
        /// Term of the answering primary.
        server_term: Term,
    },
    /// `meta_ready` (dataflow app).
    Meta {
        /// Receiving task.
        task: TaskId,
        /// Its term.
        term: Term,
        /// Epoch at delivery.
        epoch: Epoch,
        /// Sender.
        from: TaskId,
        /// Link (sender's name).
        link: String,
        /// The meta.
        meta: String,
    },
    /// `neighbour_failed` (`failed`) or `neighbour_restarted`.
    Neighbour {
        /// Receiving task.
        task: TaskId,
        /// Its term.
        term: Term,
        /// Link.
        link: String,
        /// The neighbour.
        neighbour: TaskId,
        /// Failed (true) or restarted.
        failed: bool,
    },
    /// The replicated counter: at `became_primary` (`epoch: None`) or after replicating it on
    /// entering `epoch`.
    Counter {
        /// Task.
        task: TaskId,
        /// Term.
        term: Term,
        /// Epoch, or `None` at `became_primary`.
        epoch: Option<Epoch>,
        /// Value.
        value: u64,
    },
    /// `restore` got a checkpoint.
    Restored {
        /// Task.
        task: TaskId,
        /// Checkpoint's epoch.
        epoch: Epoch,
        /// Counter in it.
        counter: u64,
    },
    /// The root's result for an epoch.
    Result {
        /// Epoch.
        epoch: Epoch,
        /// Value.
        value: u64,
        /// Root's term.
        term: Term,
    },
    /// `exit`.
    Exit {
        /// Task.
        task: TaskId,
        /// Why, as text.
        reason: String,
    },
}

/// A callback run for every recorded event.
pub type OnEvent = dyn Fn(&str, &Event) + Send + Sync;

/// The audit trail shared by every task of an in-process cluster.
#[derive(Clone)]
pub struct Audit {
    events: Arc<Mutex<Vec<(String, Event)>>>,
    on_event: Option<Arc<OnEvent>>,
    /// Drivers may move the job on from epoch `e` only while `e` is below this.
    gate: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Default for Audit {
    fn default() -> Self {
        Audit {
            events: Arc::default(),
            on_event: None,
            gate: Arc::new(tokio::sync::watch::channel(u64::MAX).0),
        }
    }
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit")
            .field("events", &self.events)
            .finish_non_exhaustive()
    }
}

impl Audit {
    /// An audit trail that also calls `f` for every event (e.g. to print it).
    pub fn with_callback(f: impl Fn(&str, &Event) + Send + Sync + 'static) -> Self {
        Audit {
            on_event: Some(Arc::new(f)),
            ..Audit::default()
        }
    }
    /// Holds every driver back until [`Audit::open_gate`] (so a test can start all its nodes
    /// before the job moves).
    pub fn close_gate(&self) {
        self.gate.send_replace(0);
    }
    /// Lets drivers move the job on.
    pub fn open_gate(&self) {
        self.gate.send_replace(u64::MAX);
    }
    /// Lets drivers move the job on up to epoch `epoch`, and holds them there.
    pub fn open_gate_until(&self, epoch: u64) {
        self.gate.send_replace(epoch);
    }
    /// Waits until drivers may move the job on from `epoch`.
    pub async fn gate_open(&self, epoch: u64) {
        let mut rx = self.gate.subscribe();
        let _ = rx.wait_for(|until| epoch < *until).await;
    }
    /// Records `event` seen on `node`.
    pub fn record(&self, node: &str, event: Event) {
        if let Some(f) = &self.on_event {
            f(node, &event);
        }
        if let Ok(mut e) = self.events.lock() {
            e.push((node.to_owned(), event));
        }
    }
    /// Every event so far, with the node it happened on.
    pub fn events(&self) -> Vec<(String, Event)> {
        self.events.lock().map(|e| e.clone()).unwrap_or_default()
    }
}

/// What the test task does besides recording.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Behaviour {
    /// Task 0's primary moves the job to the next epoch on entering each epoch below this one,
    /// and shuts the job down on entering it. `None`: nobody moves the epoch.
    pub drive_until: Option<Epoch>,
    /// Every primary (not only task 0's) tries to move each epoch on: they race, and exactly
    /// one `inc_epoch` per epoch may succeed.
    pub all_drive: bool,
    /// Pause before moving on, in milliseconds (a stand-in for the epoch's work).
    pub pace_ms: u64,
}

/// A task that records its events.
#[derive(Debug)]
pub struct AuditTask {
    task: TaskId,
    node: String,
    audit: Audit,
    behaviour: Behaviour,
}

#[async_trait]
impl Task for AuditTask {
    async fn became_primary(&mut self, _ctx: &Context, term: Term) {
        self.audit.record(
            &self.node,
            Event::Primary {
                task: self.task,
                term,
            },
        );
    }
    async fn became_backup(&mut self, _ctx: &Context) {
        self.audit
            .record(&self.node, Event::Backup { task: self.task });
    }
    async fn enter_epoch(&mut self, ctx: &Context, epoch: Epoch) {
        let term = ctx.term().unwrap_or(0);
        self.audit.record(
            &self.node,
            Event::Enter {
                task: self.task,
                epoch,
                term,
            },
        );
        let Some(until) = self.behaviour.drive_until else {
            return;
        };
        if self.task != 0 && !self.behaviour.all_drive {
            return;
        }
        let pace = std::time::Duration::from_millis(self.behaviour.pace_ms);
        let (ctx, audit, node, task) = (
            ctx.clone(),
            self.audit.clone(),
            self.node.clone(),
            self.task,
        );
        // Move on from the background, as a real task would after its epoch's work.
        ctx.clone().spawn(async move {
            audit.gate_open(epoch).await;
            tokio::time::sleep(pace).await;
            // Retry while etcd is unreachable; stop when no longer primary.
            let mut delay = std::time::Duration::from_millis(20);
            loop {
                let result = if epoch < until {
                    ctx.inc_epoch(epoch).await.map(|moved| {
                        if moved {
                            audit.record(
                                &node,
                                Event::Moved {
                                    task,
                                    from: epoch,
                                    term,
                                },
                            );
                        }
                    })
                } else {
                    ctx.shutdown_job().await.map(|_| ())
                };
                match result {
                    Ok(()) => return,
                    Err(
                        e @ (taskgraph::ContextError::Etcd(_)
                        | taskgraph::ContextError::Suspended { .. }),
                    ) => {
                        tracing::info!(error = %e, epoch, "driver cannot act now, retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(std::time::Duration::from_millis(500));
                    }
                    Err(e) => {
                        tracing::info!(error = %e, epoch, "driver stops");
                        return;
                    }
                }
            }
        });
    }
    async fn exit(&mut self, _ctx: &Context, reason: ExitReason) {
        self.audit.record(
            &self.node,
            Event::Exit {
                task: self.task,
                reason: format!("{reason:?}"),
            },
        );
    }
}

/// Builds [`AuditTask`]s recording into `audit` under the node name `node`.
#[derive(Debug, Clone)]
pub struct AuditBuilder {
    /// Node label recorded with each event.
    pub node: String,
    /// Where events go.
    pub audit: Audit,
    /// What tasks do.
    pub behaviour: Behaviour,
}

impl AuditBuilder {
    /// One task value, boxed as the framework wants it.
    pub fn build_one(&self) -> AuditTask {
        AuditTask {
            task: 0,
            node: self.node.clone(),
            audit: self.audit.clone(),
            behaviour: self.behaviour,
        }
    }
}

impl TaskBuilder for AuditBuilder {
    fn build(&self, task: TaskId) -> Box<dyn Task> {
        Box::new(AuditTask {
            task,
            node: self.node.clone(),
            audit: self.audit.clone(),
            behaviour: self.behaviour,
        })
    }
}
