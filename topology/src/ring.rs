//! The ring: tasks `0, 1, …, n-1` in a circle.

use std::sync::Arc;

use crate::{Epoch, Links, TaskId, Topology, TopologyError};

/// A ring over tasks `0..num_tasks`: task `t` is followed by `(t + 1) mod n` and preceded by
/// `(t - 1) mod n`. None of its links depends on the epoch.
///
/// It offers two sets of links:
///
/// - the directed ring, [`Ring::links`]: `next` (the one successor) and `prev` (the one
///   predecessor), the reverse of each other;
/// - the bidirectional ring, [`Ring::bidirectional_links`]: `neighbours`, the predecessor and
///   the successor in ascending order, paired with itself.
///
/// Small rings: a single task has no neighbours in any link (it is not its own neighbour);
/// in a ring of two tasks, `next` and `prev` of each task are both the other task, and
/// `neighbours` holds it once.
///
/// ```
/// use taskgraph_topology::{Ring, Topology};
///
/// let ring = Ring::new(5)?;
/// assert_eq!(ring.next_of(4), Some(0));
/// assert_eq!(ring.prev_of(0), Some(4));
/// assert_eq!(ring.neighbours_of(0), vec![1, 4]);
///
/// let links = ring.links();
/// links.validate(5)?;
/// assert_eq!(links.get(Ring::NEXT).unwrap().neighbours(2, 0), vec![3]);
///
/// let both = ring.bidirectional_links();
/// both.validate(5)?;
/// assert_eq!(both.get(Ring::NEIGHBOURS).unwrap().neighbours(2, 0), vec![1, 3]);
/// # Ok::<(), taskgraph_topology::TopologyError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ring {
    num_tasks: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Prev,
    Next,
    Both,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Prev => Ring::PREV,
            Kind::Next => Ring::NEXT,
            Kind::Both => Ring::NEIGHBOURS,
        }
    }
}

impl Ring {
    /// Name of the link to the predecessor, as declared by [`Ring::links`].
    pub const PREV: &'static str = "prev";
    /// Name of the link to the successor, as declared by [`Ring::links`].
    pub const NEXT: &'static str = "next";
    /// Name of the link to both, as declared by [`Ring::bidirectional_links`].
    pub const NEIGHBOURS: &'static str = "neighbours";

    /// A ring of `num_tasks` tasks. Fails with [`TopologyError::NoTasks`] if it is 0.
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

    /// The successor of `task`: `None` in a ring of one task or outside the ring.
    pub fn next_of(&self, task: TaskId) -> Option<TaskId> {
        (self.num_tasks > 1 && task < self.num_tasks).then(|| {
            if task + 1 == self.num_tasks {
                0
            } else {
                task + 1
            }
        })
    }

    /// The predecessor of `task`: `None` in a ring of one task or outside the ring.
    pub fn prev_of(&self, task: TaskId) -> Option<TaskId> {
        (self.num_tasks > 1 && task < self.num_tasks).then(|| {
            if task == 0 {
                self.num_tasks - 1
            } else {
                task - 1
            }
        })
    }

    /// The predecessor and the successor of `task`, ascending, without duplicates.
    pub fn neighbours_of(&self, task: TaskId) -> Vec<TaskId> {
        let mut out: Vec<TaskId> = self
            .prev_of(task)
            .into_iter()
            .chain(self.next_of(task))
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The `prev` link.
    pub fn prev(&self) -> Arc<dyn Topology> {
        Arc::new(RingLink(*self, Kind::Prev))
    }

    /// The `next` link.
    pub fn next(&self) -> Arc<dyn Topology> {
        Arc::new(RingLink(*self, Kind::Next))
    }

    /// The bidirectional `neighbours` link.
    pub fn both(&self) -> Arc<dyn Topology> {
        Arc::new(RingLink(*self, Kind::Both))
    }

    /// The directed ring: links `prev` and `next`, declared as a pair.
    pub fn links(&self) -> Links {
        Links::new()
            .link(Self::NEXT, self.next())
            .link(Self::PREV, self.prev())
            .pair(Self::NEXT, Self::PREV)
    }

    /// The bidirectional ring: link `neighbours`, paired with itself.
    pub fn bidirectional_links(&self) -> Links {
        Links::new()
            .link(Self::NEIGHBOURS, self.both())
            .pair(Self::NEIGHBOURS, Self::NEIGHBOURS)
    }
}

/// One link of a [`Ring`].
#[derive(Debug, Clone, Copy)]
struct RingLink(Ring, Kind);

impl Topology for RingLink {
    fn neighbours(&self, task: TaskId, _epoch: Epoch) -> Vec<TaskId> {
        match self.1 {
            Kind::Prev => self.0.prev_of(task).into_iter().collect(),
            Kind::Next => self.0.next_of(task).into_iter().collect(),
            Kind::Both => self.0.neighbours_of(task),
        }
    }
    fn describe(&self) -> String {
        format!("ring(tasks={})/{}", self.0.num_tasks, self.1.name())
    }
    fn expected_tasks(&self) -> Option<u32> {
        Some(self.0.num_tasks)
    }
}
