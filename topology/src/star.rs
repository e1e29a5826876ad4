//! The star: one master, every other task a worker.

use std::sync::Arc;

use crate::{Epoch, Links, TaskId, Topology, TopologyError};

/// A star (master–workers) over tasks `0..num_tasks`: task `0` is the master, tasks
/// `1..num_tasks` are the workers.
///
/// Links, the reverse of each other, neither depending on the epoch:
///
/// - `master`: a worker's neighbour is the master, `[0]`; the master has none;
/// - `workers`: the master's neighbours are all the workers, `1..num_tasks`; a worker has
///   none.
///
/// A star of one task is a master without workers.
///
/// ```
/// use taskgraph_topology::{Star, Topology};
///
/// let star = Star::new(4)?;
/// assert_eq!(star.master_of(3), Some(0));
/// assert_eq!(star.workers_of(0), vec![1, 2, 3]);
///
/// let links = star.links();
/// links.validate(4)?;
/// assert_eq!(links.get(Star::MASTER).unwrap().neighbours(2, 0), vec![0]);
/// assert!(links.get(Star::WORKERS).unwrap().neighbours(2, 0).is_empty());
/// # Ok::<(), taskgraph_topology::TopologyError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Star {
    num_tasks: u32,
}

impl Star {
    /// Name of the link from a worker to the master, as declared by [`Star::links`].
    pub const MASTER: &'static str = "master";
    /// Name of the link from the master to the workers, as declared by [`Star::links`].
    pub const WORKERS: &'static str = "workers";
    /// The id of the master.
    pub const MASTER_ID: TaskId = 0;

    /// A star of `num_tasks` tasks: one master and `num_tasks - 1` workers. Fails with
    /// [`TopologyError::NoTasks`] if it is 0.
    pub fn new(num_tasks: u32) -> Result<Self, TopologyError> {
        if num_tasks == 0 {
            return Err(TopologyError::NoTasks);
        }
        Ok(Self { num_tasks })
    }

    /// Number of tasks, master included.
    pub fn num_tasks(&self) -> u32 {
        self.num_tasks
    }

    /// The master of `task`: `Some(0)` for a worker, `None` for the master (and outside the
    /// star).
    pub fn master_of(&self, task: TaskId) -> Option<TaskId> {
        (task != Self::MASTER_ID && task < self.num_tasks).then_some(Self::MASTER_ID)
    }

    /// The workers of `task`: all of them for the master, none for a worker.
    pub fn workers_of(&self, task: TaskId) -> Vec<TaskId> {
        if task == Self::MASTER_ID {
            (1..self.num_tasks).collect()
        } else {
            Vec::new()
        }
    }

    /// The `master` link.
    pub fn master(&self) -> Arc<dyn Topology> {
        Arc::new(StarLink(*self, false))
    }

    /// The `workers` link.
    pub fn workers(&self) -> Arc<dyn Topology> {
        Arc::new(StarLink(*self, true))
    }

    /// The links `master` and `workers`, declared as a pair.
    pub fn links(&self) -> Links {
        Links::new()
            .link(Self::MASTER, self.master())
            .link(Self::WORKERS, self.workers())
            .pair(Self::WORKERS, Self::MASTER)
    }
}

/// One link of a [`Star`]: `workers` if the flag is set, else `master`.
#[derive(Debug, Clone, Copy)]
struct StarLink(Star, bool);

impl Topology for StarLink {
    fn neighbours(&self, task: TaskId, _epoch: Epoch) -> Vec<TaskId> {
        if self.1 {
            self.0.workers_of(task)
        } else {
            self.0.master_of(task).into_iter().collect()
        }
    }
    fn describe(&self) -> String {
        let link = if self.1 { Star::WORKERS } else { Star::MASTER };
        format!("star(tasks={})/{link}", self.0.num_tasks)
    }
    fn expected_tasks(&self) -> Option<u32> {
        Some(self.0.num_tasks)
    }
}
