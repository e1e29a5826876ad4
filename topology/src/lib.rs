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
//!
//! // The same links in one line:
//! let links = Tree::new(7, 2).unwrap().links();
//! links.validate(7).unwrap();
//! ```
//!
//! # Standard topologies
//!
//! Every standard topology is a small `Copy` type built with a checked constructor. Its
//! `links()` method returns a [`Links`] set with its links declared under the names below and
//! its pairs already declared, ready for [`Links::validate`]; its link methods (e.g.
//! [`Tree::children`]) return one link as an `Arc<dyn Topology>` for applications that want
//! other names or to combine topologies (see [`Links::merge`]).
//!
//! | Type | Task ids | Links (pairs) | Neighbours |
//! |------|----------|---------------|------------|
//! | [`Tree`] | breadth-first: `0` is the root, the children of `t` are `t*f+1 ..= t*f+f` | `parents` ↔ `children` | parent: `(t-1)/f`; children: up to `f` |
//! | [`FullMesh`] | `0..n` | `peers` (symmetric) | every other task |
//! | [`Ring`] ([`Ring::links`]) | `0..n` around the ring | `prev` ↔ `next` | `next`: `(t+1) mod n`; `prev`: `(t-1) mod n` |
//! | [`Ring`] ([`Ring::bidirectional_links`]) | `0..n` around the ring | `neighbours` (symmetric) | `{prev, next}` |
//! | [`Star`] | `0` is the master, `1..n` the workers | `master` ↔ `workers` | a worker has `[0]` in `master`; the master has `1..n` in `workers` |
//! | [`ParameterServers`] | servers `0..s`, workers `s..s+w` | `servers` ↔ `workers` | a worker has every server in `servers`; a server has every worker in `workers` |
//! | [`Grid`] (plain or torus) | row-major: `t = row*cols + col`, row 0 is the north edge, column 0 the west edge | `north` ↔ `south`, `east` ↔ `west` | the adjacent cell; a torus wraps around |
//! | [`Butterfly`] | `0..n` | `partner` (symmetric, changes every epoch) | recursive doubling: `t XOR 2^(e mod log2 n)` when `n` is a power of two; otherwise tasks `p..n` (`p` the largest power of two below `n`) first fold onto `t - p` |
//!
//! In every topology a task is never its own neighbour, and degenerate sizes (one task, a
//! ring of two, a torus of one row) are documented on each type.
//!
//! # Validation
//!
//! [`Links::validate`] checks, for every task and every epoch of each link's
//! [`Topology::period`]: neighbour ids in range, neighbours strictly ascending, no self links
//! unless [`Links::allow_self_links`], and paired links symmetric. With
//! [`Links::require_connected`] it also checks that every task is reachable from task 0
//! through the union of all links (in either direction). Each error names the link, the task
//! and the epoch. Validation takes time and memory linear in the number of edges.
//!
//! # Pictures
//!
//! [`to_dot`] (or [`Links::to_dot`]) renders a set of links at one epoch as a Graphviz DOT
//! graph, one edge colour per link; its documentation shows the DOT text of a 7-task tree and
//! of an 8-task butterfly at epoch 0. [`to_dot_with`] adds attributes to each task's node
//! (colours, labels), with [`dot_quote`] to quote text from outside.
//!
//! # Descriptions
//!
//! [`Links::describe`] writes a stable description of a set of links (stored in a job
//! spec); [`Links::from_description`] rebuilds the links of the standard topologies from
//! it, and [`Links::from_description_lenient`] rebuilds what it can and lists the links of
//! other topology types, e.g. for a tool that draws a running job's links.

mod butterfly;
mod dot;
mod grid;
mod links;
mod mesh;
mod rebuild;
mod ring;
mod servers;
mod star;
mod tree;

pub use butterfly::{Butterfly, ButterflyStep};
pub use dot::{dot_quote, to_dot, to_dot_with};
pub use grid::Grid;
pub use links::{Links, TopologyError};
pub use mesh::FullMesh;
pub use rebuild::RebuiltLinks;
pub use ring::Ring;
pub use servers::ParameterServers;
pub use star::Star;
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
    /// The neighbours at epoch `e` must be those at epoch `e mod period()`.
    fn period(&self) -> u64 {
        1
    }

    /// The number of tasks this topology was built for, if it was built for one. When it
    /// returns `Some(n)`, [`Links::validate`] refuses a job whose number of tasks is not `n`.
    /// Defaults to `None` (no check).
    fn expected_tasks(&self) -> Option<u32> {
        None
    }
}
