//! Topologies for taskgraph: for a task id and an epoch, the neighbours of one link.
//!
//! A [`Topology`] is a pure function of `(task, epoch)`. An application declares its links
//! in a [`Links`] set (a name per link, and which links are the reverse of each other), and
//! the framework validates that set at start with [`Links::validate`].
//!
//! ```
//! use taskgraph_topology::{Links, Tree, Topology};
//!
//! let tree = Tree::new(7, 2).unwrap();
//! let links = Links::new()
//!     .link("parents", tree.parents())
//!     .link("children", tree.children())
//!     .pair("parents", "children");
//! links.validate(7).unwrap();
//! assert_eq!(tree.children().neighbours(0, 0), vec![1, 2]);
//! assert_eq!(tree.parents().neighbours(5, 0), vec![2]);
//! ```

mod links;
mod tree;

pub use links::{Links, TopologyError};
pub use tree::{Tree, TreeChildren, TreeParents};

/// Identifier of a task: `0..num_tasks`.
pub type TaskId = u32;
/// Job-wide iteration counter.
pub type Epoch = u64;

/// One link of a job's topology: which tasks are the neighbours of a task at an epoch.
///
/// Implementations must be pure: the same `(task, epoch)` always gives the same answer, on
/// every node. The framework calls [`Topology::neighbours`] from its event loop, so it must be
/// cheap (no IO, no locks held for long).
pub trait Topology: Send + Sync + std::fmt::Debug + 'static {
    /// The neighbours of `task` at `epoch`, in ascending order and without duplicates.
    fn neighbours(&self, task: TaskId, epoch: Epoch) -> Vec<TaskId>;

    /// A stable, human-readable description of the topology and its parameters, e.g.
    /// `tree(tasks=15,fanout=2)/children`. It is stored in the job spec in etcd: two nodes
    /// whose descriptions differ refuse to run the same job. Two topologies with the same
    /// description must give the same neighbours.
    fn describe(&self) -> String;

    /// How many consecutive epochs the validator has to check to have seen every distinct
    /// neighbourhood: `1` for topologies that do not depend on the epoch (the default).
    fn period(&self) -> u64 {
        1
    }
}
