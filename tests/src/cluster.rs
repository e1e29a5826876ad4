//! In-process nodes: many nodes of one job in the test's own runtime. A node can be stopped
//! cleanly (lease revoked) or crashed (dropped without revoking its lease, as kill -9 would).

use std::time::Duration;

use taskgraph::{
    Framework, Links, NodeExit, NodeHandle, NodeStatus, TaskBuilder, TaskId, Term, Tree,
};
use tokio::sync::watch;

use crate::apps::{Audit, AuditBuilder, Behaviour};

/// Settings shared by every node of a cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// etcd endpoints.
    pub etcd: Vec<String>,
    /// Job name.
    pub job: String,
    /// Tasks.
    pub tasks: u32,
    /// Nodes per task.
    pub replicas: u32,
    /// Lease TTL.
    pub ttl: Duration,
    /// The nodes' stall time (`None`: the framework's default).
    pub stall_after: Option<Duration>,
    /// What the tasks do (audit app).
    pub behaviour: Behaviour,
    /// Which application the nodes run.
    pub app: App,
    /// [`App::Dataflow`]: the size of every answer in bytes (0, the default: the encoded value
    /// alone; see [`large_answer`](crate::dataflow::large_answer)).
    pub answer_bytes: usize,
}

/// The application a cluster's nodes run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum App {
    /// [`AuditTask`](crate::apps::AuditTask), driven by [`Behaviour`].
    #[default]
    Audit,
    /// [`DataflowTask`](crate::dataflow::DataflowTask): the root shuts the job down on
    /// entering `until`, pausing `pace_ms` before moving each epoch on.
    Dataflow {
        /// Last epoch.
        until: u64,
        /// Pause per epoch.
        pace_ms: u64,
    },
}

impl ClusterConfig {
    /// A binary tree job of `tasks` tasks with `replicas` per task and a 1 s lease.
    pub fn new(etcd: Vec<String>, job: &str, tasks: u32, replicas: u32) -> Self {
        ClusterConfig {
            etcd,
            job: job.to_owned(),
            tasks,
            replicas,
            ttl: Duration::from_secs(1),
            stall_after: None,
            behaviour: Behaviour::default(),
            app: App::Audit,
            answer_bytes: 0,
        }
    }

    /// The links of a binary tree over the job's tasks.
    pub fn links(&self) -> Links {
        match Tree::new(self.tasks, 2) {
            Ok(t) => Links::new()
                .link("parents", t.parents())
                .link("children", t.children())
                .pair("parents", "children"),
            Err(_) => Links::new(),
        }
    }
}

/// A set of in-process nodes of one job, with a shared audit trail.
#[derive(Debug)]
pub struct Cluster {
    config: ClusterConfig,
    /// Every event every task received.
    pub audit: Audit,
    nodes: Vec<Option<NodeHandle>>,
    statuses: Vec<watch::Receiver<NodeStatus>>,
}

impl Cluster {
    /// A cluster with no node yet.
    pub fn new(config: ClusterConfig) -> Self {
        Cluster {
            config,
            audit: Audit::default(),
            nodes: Vec::new(),
            statuses: Vec::new(),
        }
    }

    /// Starts `n` nodes.
    pub async fn start(config: ClusterConfig, n: usize) -> Result<Self, taskgraph::Error> {
        let mut c = Cluster::new(config);
        for _ in 0..n {
            c.add_node().await?;
        }
        Ok(c)
    }

    /// Starts `n` nodes and waits until every slot is filled (`replicas` nodes per task)
    /// before letting the drivers move the job.
    pub async fn start_staffed(config: ClusterConfig, n: usize) -> Result<Self, String> {
        let (tasks, backups) = (config.tasks, config.replicas.saturating_sub(1) as usize);
        let mut c = Cluster::new(config);
        c.audit.close_gate();
        for _ in 0..n {
            c.add_node().await.map_err(|e| e.to_string())?;
        }
        c.wait_until("every slot is filled", Duration::from_secs(30), |s| {
            fully_staffed(tasks, backups, s)
        })
        .await?;
        c.audit.open_gate();
        Ok(c)
    }

    /// Starts one more node; returns its index.
    pub async fn add_node(&mut self) -> Result<usize, taskgraph::Error> {
        let i = self.nodes.len();
        let builder: Box<dyn Fn(TaskId) -> Box<dyn taskgraph::Task> + Send + Sync> =
            match self.config.app {
                App::Audit => {
                    let b = AuditBuilder {
                        node: format!("n{i}"),
                        audit: self.audit.clone(),
                        behaviour: self.config.behaviour,
                    };
                    Box::new(move |t| b.build(t))
                }
                App::Dataflow { until, pace_ms } => {
                    let b = crate::dataflow::DataflowBuilder {
                        node: format!("n{i}"),
                        audit: self.audit.clone(),
                        until,
                        pace: Duration::from_millis(pace_ms),
                        state: true,
                    };
                    let answer_bytes = self.config.answer_bytes;
                    Box::new(move |t| b.build_with_answers(t, answer_bytes))
                }
            };
        let mut framework = Framework::builder();
        if let Some(after) = self.config.stall_after {
            framework = framework.stall_after(after);
        }
        let handle = framework
            .etcd(self.config.etcd.clone())
            .job(self.config.job.clone())
            .tasks(self.config.tasks)
            .replicas(self.config.replicas)
            .links(self.config.links())
            .lease_ttl(self.config.ttl)
            .node_name(format!("n{i}"))
            .task_builder(builder)
            .build()?
            .spawn()
            .await?;
        self.statuses.push(handle.status());
        self.nodes.push(Some(handle));
        Ok(i)
    }

    /// Number of nodes ever started.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether no node was started.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The latest status of node `i`.
    pub fn status(&self, i: usize) -> NodeStatus {
        self.statuses[i].borrow().clone()
    }

    /// The id of node `i` (as it appears in etcd), while it runs.
    pub fn node_id(&self, i: usize) -> Option<String> {
        self.nodes
            .get(i)
            .and_then(|n| n.as_ref())
            .map(|h| h.id().to_owned())
    }

    /// The statuses of the nodes still running.
    pub fn live_statuses(&self) -> Vec<(usize, NodeStatus)> {
        (0..self.nodes.len())
            .filter(|i| self.nodes[*i].as_ref().is_some_and(|h| !h.is_finished()))
            .map(|i| (i, self.status(i)))
            .collect()
    }

    /// The node acting as primary of `task`, with its term.
    pub fn primary_of(&self, task: TaskId) -> Option<(usize, Term)> {
        self.live_statuses()
            .into_iter()
            .find_map(|(i, s)| s.primary_of(task).map(|t| (i, t)))
    }

    /// Crashes node `i`: it stops at once and its lease is left to expire.
    pub fn crash(&mut self, i: usize) {
        if let Some(h) = self.nodes[i].take() {
            h.crash();
        }
    }

    /// Stops node `i` cleanly.
    pub async fn stop(&mut self, i: usize) -> Option<Result<NodeExit, taskgraph::Error>> {
        match self.nodes[i].take() {
            Some(h) => Some(h.stop().await),
            None => None,
        }
    }

    /// Waits for node `i` to end by itself.
    pub async fn wait(&mut self, i: usize) -> Option<Result<NodeExit, taskgraph::Error>> {
        match self.nodes[i].take() {
            Some(h) => Some(h.wait().await),
            None => None,
        }
    }

    /// Waits until `cond` holds for the live nodes' statuses, re-checking on every status
    /// change. The error names `why` and shows the last statuses seen.
    pub async fn wait_until(
        &self,
        why: &str,
        timeout: Duration,
        mut cond: impl FnMut(&[(usize, NodeStatus)]) -> bool,
    ) -> Result<Vec<(usize, NodeStatus)>, String> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut rx: Vec<watch::Receiver<NodeStatus>> = self.statuses.clone();
        loop {
            let now = self.live_statuses();
            if cond(&now) {
                return Ok(now);
            }
            let changes = futures::future::select_all(rx.iter_mut().map(|r| Box::pin(r.changed())));
            // Nodes ending also count as a change worth re-checking.
            let tick = tokio::time::sleep(Duration::from_millis(50));
            tokio::select! {
                _ = changes => {}
                _ = tick => {}
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(format!("timed out after {timeout:?} waiting until {why}; last statuses: {:#?}", self.live_statuses()));
                }
            }
        }
    }

    /// The highest epoch any live node reports (0 before any).
    pub fn max_epoch(&self) -> u64 {
        self.live_statuses()
            .iter()
            .filter_map(|(_, s)| s.epoch)
            .max()
            .unwrap_or(0)
    }

    /// Waits until some node is `by` epochs past the highest epoch reported now, or the job
    /// finished; panics naming `why` after `timeout`.
    pub async fn moves_on(&self, by: u64, why: &str, timeout: Duration) {
        let at = self.max_epoch();
        self.wait_until(why, timeout, |s| {
            s.iter()
                .any(|(_, s)| s.epoch.is_some_and(|e| e >= at + by) || s.finished)
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Waits until every node ended with the job finished at `epoch`; panics naming the node
    /// that failed or ended otherwise, or showing every status after `timeout`.
    pub async fn all_finish_at(&mut self, epoch: u64, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        for i in 0..self.len() {
            match tokio::time::timeout_at(deadline, self.wait(i)).await {
                Ok(Some(r)) => assert_eq!(
                    r.unwrap_or_else(|e| panic!("node {i} failed: {e}")),
                    NodeExit::JobFinished { epoch },
                    "node {i}"
                ),
                Ok(None) => {}
                Err(_) => {
                    let statuses: Vec<_> = (0..self.len()).map(|j| (j, self.status(j))).collect();
                    panic!("the job did not end within {timeout:?}: {statuses:#?}");
                }
            }
        }
    }

    /// Stops every live node cleanly.
    pub async fn stop_all(&mut self) {
        for i in 0..self.nodes.len() {
            let _ = self.stop(i).await;
        }
    }
}

/// True when every task has exactly one acting primary and `backups` acting backups.
pub fn fully_staffed(tasks: u32, backups: usize, statuses: &[(usize, NodeStatus)]) -> bool {
    (0..tasks).all(|t| {
        let p = statuses
            .iter()
            .filter(|(_, s)| s.primary_of(t).is_some())
            .count();
        let b = statuses
            .iter()
            .filter(|(_, s)| s.acting && s.role == taskgraph::Role::Backup { task: t })
            .count();
        p == 1 && b == backups
    })
}
