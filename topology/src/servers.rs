//! Parameter servers and workers: a complete bipartite graph.

use std::sync::Arc;

use crate::{Epoch, Links, TaskId, Topology, TopologyError};

/// Parameter servers ↔ workers: the complete bipartite graph between `servers` server tasks
/// and `workers` worker tasks.
///
/// Id layout: the servers are tasks `0..servers`, the workers are tasks
/// `servers..servers + workers`; the job has `servers + workers` tasks.
///
/// Links, the reverse of each other, neither depending on the epoch:
///
/// - `servers`: a worker's neighbours are all the servers, `0..servers`; a server has none;
/// - `workers`: a server's neighbours are all the workers; a worker has none.
///
/// Servers are not linked to each other, nor workers to each other.
///
/// ```
/// use taskgraph_topology::{ParameterServers, Topology};
///
/// // Servers 0 and 1, workers 2, 3 and 4.
/// let ps = ParameterServers::new(2, 3)?;
/// assert_eq!(ps.num_tasks(), 5);
/// assert!(ps.is_server(1) && !ps.is_server(2));
/// assert_eq!(ps.servers_of(4), vec![0, 1]);
/// assert_eq!(ps.workers_of(0), vec![2, 3, 4]);
///
/// let links = ps.links();
/// links.validate(5)?;
/// assert_eq!(links.get(ParameterServers::WORKERS).unwrap().neighbours(1, 0), vec![2, 3, 4]);
/// # Ok::<(), taskgraph_topology::TopologyError>(())
/// ```
#[doc(alias = "bipartite")]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ParameterServers {
    servers: u32,
    workers: u32,
}

impl ParameterServers {
    /// Name of the link from a worker to the servers, as declared by
    /// [`ParameterServers::links`].
    pub const SERVERS: &'static str = "servers";
    /// Name of the link from a server to the workers, as declared by
    /// [`ParameterServers::links`].
    pub const WORKERS: &'static str = "workers";

    /// `servers` servers and `workers` workers. Fails with
    /// [`TopologyError::InvalidParameter`] if either is 0 or if their sum does not fit a
    /// [`TaskId`].
    pub fn new(servers: u32, workers: u32) -> Result<Self, TopologyError> {
        let invalid = |reason: &str| TopologyError::InvalidParameter {
            topology: "parameter servers",
            reason: reason.into(),
        };
        if servers == 0 {
            return Err(invalid("there must be at least one server"));
        }
        if workers == 0 {
            return Err(invalid("there must be at least one worker"));
        }
        if servers.checked_add(workers).is_none() {
            return Err(invalid("too many tasks"));
        }
        Ok(Self { servers, workers })
    }

    /// Number of servers.
    pub fn num_servers(&self) -> u32 {
        self.servers
    }

    /// Number of workers.
    pub fn num_workers(&self) -> u32 {
        self.workers
    }

    /// Number of tasks: servers and workers.
    pub fn num_tasks(&self) -> u32 {
        self.servers + self.workers
    }

    /// Whether `task` is a server (`task < num_servers()`).
    pub fn is_server(&self, task: TaskId) -> bool {
        task < self.servers
    }

    /// Whether `task` is a worker.
    pub fn is_worker(&self, task: TaskId) -> bool {
        task >= self.servers && task < self.num_tasks()
    }

    /// The servers of `task`: all of them for a worker, none for a server.
    pub fn servers_of(&self, task: TaskId) -> Vec<TaskId> {
        if self.is_worker(task) {
            (0..self.servers).collect()
        } else {
            Vec::new()
        }
    }

    /// The workers of `task`: all of them for a server, none for a worker.
    pub fn workers_of(&self, task: TaskId) -> Vec<TaskId> {
        if self.is_server(task) {
            (self.servers..self.num_tasks()).collect()
        } else {
            Vec::new()
        }
    }

    /// The `servers` link.
    pub fn servers(&self) -> Arc<dyn Topology> {
        Arc::new(PsLink(*self, false))
    }

    /// The `workers` link.
    pub fn workers(&self) -> Arc<dyn Topology> {
        Arc::new(PsLink(*self, true))
    }

    /// The links `servers` and `workers`, declared as a pair.
    pub fn links(&self) -> Links {
        Links::new()
            .link(Self::SERVERS, self.servers())
            .link(Self::WORKERS, self.workers())
            .pair(Self::WORKERS, Self::SERVERS)
    }
}

/// One link of [`ParameterServers`]: `workers` if the flag is set, else `servers`.
#[derive(Debug, Clone, Copy)]
struct PsLink(ParameterServers, bool);

impl Topology for PsLink {
    fn neighbours(&self, task: TaskId, _epoch: Epoch) -> Vec<TaskId> {
        if self.1 {
            self.0.workers_of(task)
        } else {
            self.0.servers_of(task)
        }
    }
    fn describe(&self) -> String {
        let link = if self.1 {
            ParameterServers::WORKERS
        } else {
            ParameterServers::SERVERS
        };
        format!(
            "ps(servers={},workers={})/{link}",
            self.0.servers, self.0.workers
        )
    }
    fn expected_tasks(&self) -> Option<u32> {
        Some(self.0.num_tasks())
    }
}
