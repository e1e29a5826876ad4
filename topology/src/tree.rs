//! A rooted tree with any fanout: task 0 is the root, the children of task `t` are
//! `t*fanout + 1 ..= t*fanout + fanout` (those below `num_tasks`).

use std::sync::Arc;

use crate::{Epoch, TaskId, Topology, TopologyError};

/// A complete `fanout`-ary tree over tasks `0..num_tasks`, in breadth-first order.
///
/// Its two links are [`Tree::parents`] (at most one neighbour, none for the root) and
/// [`Tree::children`]; they are the reverse of each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tree {
    num_tasks: u32,
    fanout: u32,
}

impl Tree {
    /// A tree of `num_tasks` tasks where every inner task has up to `fanout` children.
    pub fn new(num_tasks: u32, fanout: u32) -> Result<Self, TopologyError> {
        if num_tasks == 0 {
            return Err(TopologyError::NoTasks);
        }
        if fanout == 0 {
            return Err(TopologyError::InvalidParameter {
                topology: "tree",
                reason: "fanout must be at least 1".into(),
            });
        }
        Ok(Self { num_tasks, fanout })
    }

    /// Number of tasks in the tree.
    pub fn num_tasks(&self) -> u32 {
        self.num_tasks
    }

    /// Children per inner task.
    pub fn fanout(&self) -> u32 {
        self.fanout
    }

    /// The parent of `task`, `None` for the root.
    pub fn parent_of(&self, task: TaskId) -> Option<TaskId> {
        (task > 0 && task < self.num_tasks).then(|| (task - 1) / self.fanout)
    }

    /// The children of `task`, in ascending order.
    pub fn children_of(&self, task: TaskId) -> Vec<TaskId> {
        if task >= self.num_tasks {
            return Vec::new();
        }
        let first = u64::from(task) * u64::from(self.fanout) + 1;
        let end = (first + u64::from(self.fanout)).min(u64::from(self.num_tasks));
        (first..end).map(|c| c as TaskId).collect()
    }

    /// The `parents` link.
    pub fn parents(&self) -> Arc<dyn Topology> {
        Arc::new(TreeParents(*self))
    }

    /// The `children` link.
    pub fn children(&self) -> Arc<dyn Topology> {
        Arc::new(TreeChildren(*self))
    }
}

/// The `parents` link of a [`Tree`].
#[derive(Debug, Clone, Copy)]
pub struct TreeParents(pub Tree);

/// The `children` link of a [`Tree`].
#[derive(Debug, Clone, Copy)]
pub struct TreeChildren(pub Tree);

impl Topology for TreeParents {
    fn neighbours(&self, task: TaskId, _epoch: Epoch) -> Vec<TaskId> {
        self.0.parent_of(task).into_iter().collect()
    }
    fn describe(&self) -> String {
        format!("tree(tasks={},fanout={})/parents", self.0.num_tasks, self.0.fanout)
    }
}

impl Topology for TreeChildren {
    fn neighbours(&self, task: TaskId, _epoch: Epoch) -> Vec<TaskId> {
        self.0.children_of(task)
    }
    fn describe(&self) -> String {
        format!("tree(tasks={},fanout={})/children", self.0.num_tasks, self.0.fanout)
    }
}
