//! The full mesh: every task is a neighbour of every other task.

use std::sync::Arc;

use crate::{Epoch, Links, TaskId, Topology, TopologyError};

/// A full mesh over tasks `0..num_tasks`: the `peers` of a task are all the other tasks.
///
/// Its single link, `peers`, is symmetric (it is paired with itself) and does not depend on
/// the epoch. A single task has no peers. Each task has `num_tasks - 1` neighbours, so the
/// mesh has `n*(n-1)` directed edges: validating it takes quadratic time, which is fine for
/// the sizes where an all-to-all pattern makes sense (up to a few thousand tasks).
///
/// ```
/// use taskgraph_topology::{FullMesh, Topology};
///
/// let mesh = FullMesh::new(4)?;
/// assert_eq!(mesh.peers_of(2), vec![0, 1, 3]);
///
/// let links = mesh.links();
/// links.validate(4)?;
/// assert_eq!(links.get(FullMesh::PEERS).unwrap().neighbours(0, 7), vec![1, 2, 3]);
/// # Ok::<(), taskgraph_topology::TopologyError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FullMesh {
    num_tasks: u32,
}

impl FullMesh {
    /// Name of the link declared by [`FullMesh::links`].
    pub const PEERS: &'static str = "peers";

    /// A full mesh of `num_tasks` tasks. Fails with [`TopologyError::NoTasks`] if it is 0.
    pub fn new(num_tasks: u32) -> Result<Self, TopologyError> {
        if num_tasks == 0 {
            return Err(TopologyError::NoTasks);
        }
        Ok(Self { num_tasks })
    }

    /// Number of tasks.
    pub fn num_tasks(&self) -> u32 {
        self.num_tasks
    }

    /// Every task but `task`, in ascending order (empty for tasks outside the mesh).
    pub fn peers_of(&self, task: TaskId) -> Vec<TaskId> {
        if task >= self.num_tasks {
            return Vec::new();
        }
        (0..task).chain(task + 1..self.num_tasks).collect()
    }

    /// The `peers` link.
    pub fn peers(&self) -> Arc<dyn Topology> {
        Arc::new(Peers(*self))
    }

    /// The link `peers`, paired with itself.
    pub fn links(&self) -> Links {
        Links::new()
            .link(Self::PEERS, self.peers())
            .pair(Self::PEERS, Self::PEERS)
    }
}

/// The `peers` link of a [`FullMesh`].
#[derive(Debug, Clone, Copy)]
struct Peers(FullMesh);

impl Topology for Peers {
    fn neighbours(&self, task: TaskId, _epoch: Epoch) -> Vec<TaskId> {
        self.0.peers_of(task)
    }
    fn describe(&self) -> String {
        format!("mesh(tasks={})/{}", self.0.num_tasks, FullMesh::PEERS)
    }
    fn expected_tasks(&self) -> Option<u32> {
        Some(self.0.num_tasks)
    }
}
