//! A rooted tree with any fanout: task 0 is the root, the children of task `t` are
//! `t*fanout + 1 ..= t*fanout + fanout` (those below `num_tasks`).

use std::sync::Arc;

use crate::{Epoch, Links, TaskId, Topology, TopologyError};

/// A complete `fanout`-ary tree over tasks `0..num_tasks`, in breadth-first order.
///
/// Task `0` is the root; the children of task `t` are `t*fanout + 1 ..= t*fanout + fanout`
/// (those below `num_tasks`), so the parent of `t > 0` is `(t - 1) / fanout`. Every level is
/// full except possibly the last, which is filled from the left. A fanout of 1 is a chain
/// `0 → 1 → 2 → …`.
///
/// Its two links are [`Tree::parents`] (named `parents`: one neighbour, none for the root)
/// and [`Tree::children`] (named `children`: up to `fanout` neighbours, none for a leaf);
/// they are the reverse of each other. Neither depends on the epoch.
///
/// ```
/// use taskgraph_topology::{Topology, Tree};
///
/// //        0
/// //     1     2
/// //    3 4   5 6
/// let tree = Tree::new(7, 2)?;
/// assert_eq!(tree.children_of(1), vec![3, 4]);
/// assert_eq!(tree.parent_of(6), Some(2));
/// assert_eq!(tree.parent_of(0), None);
/// assert_eq!(tree.depth_of(6), 2);
/// assert_eq!(tree.height(), 2);
///
/// let links = tree.links();
/// links.validate(7)?;
/// let children = links.get(Tree::CHILDREN).unwrap();
/// assert_eq!(children.neighbours(2, 0), vec![5, 6]);
/// assert_eq!(children.describe(), "tree(tasks=7,fanout=2)/children");
/// # Ok::<(), taskgraph_topology::TopologyError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tree {
    num_tasks: u32,
    fanout: u32,
}

impl Tree {
    /// Name of the link from a task to its parent, as declared by [`Tree::links`].
    pub const PARENTS: &'static str = "parents";
    /// Name of the link from a task to its children, as declared by [`Tree::links`].
    pub const CHILDREN: &'static str = "children";

    /// A tree of `num_tasks` tasks where every inner task has up to `fanout` children.
    ///
    /// Fails with [`TopologyError::NoTasks`] if `num_tasks` is 0 and with
    /// [`TopologyError::InvalidParameter`] if `fanout` is 0.
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

    /// The parent of `task`, `None` for the root (and for tasks outside the tree).
    pub fn parent_of(&self, task: TaskId) -> Option<TaskId> {
        (task > 0 && task < self.num_tasks).then(|| (task - 1) / self.fanout)
    }

    /// The children of `task`, in ascending order (empty for leaves and tasks outside the
    /// tree).
    pub fn children_of(&self, task: TaskId) -> Vec<TaskId> {
        self.children_range(task).collect()
    }

    /// The children of `task` as a range, without allocating.
    fn children_range(&self, task: TaskId) -> std::ops::Range<TaskId> {
        if task >= self.num_tasks {
            return 0..0;
        }
        let first = u64::from(task) * u64::from(self.fanout) + 1;
        let end = (first + u64::from(self.fanout)).min(u64::from(self.num_tasks));
        let first = first.min(end);
        // Both bounds are at most `num_tasks`, so they fit a `TaskId`.
        (first as TaskId)..(end as TaskId)
    }

    /// The depth of `task`: 0 for the root, 1 for its children, and so on.
    pub fn depth_of(&self, task: TaskId) -> u32 {
        if self.fanout == 1 {
            return task;
        }
        let mut depth = 0;
        let mut t = task;
        while t > 0 {
            t = (t - 1) / self.fanout;
            depth += 1;
        }
        depth
    }

    /// The depth of the deepest task: one less than the number of levels of a complete
    /// `fanout`-ary tree holding `num_tasks` tasks (0 for a single task, `num_tasks - 1` for a
    /// chain).
    pub fn height(&self) -> u32 {
        self.depth_of(self.num_tasks - 1)
    }

    /// The `parents` link.
    pub fn parents(&self) -> Arc<dyn Topology> {
        Arc::new(TreeParents(*self))
    }

    /// The `children` link.
    pub fn children(&self) -> Arc<dyn Topology> {
        Arc::new(TreeChildren(*self))
    }

    /// The links `parents` and `children`, declared as a pair.
    pub fn links(&self) -> Links {
        Links::new()
            .link(Self::PARENTS, self.parents())
            .link(Self::CHILDREN, self.children())
            .pair(Self::CHILDREN, Self::PARENTS)
    }

    fn describe(&self, link: &str) -> String {
        format!(
            "tree(tasks={},fanout={})/{link}",
            self.num_tasks, self.fanout
        )
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
        self.0.describe(Tree::PARENTS)
    }
    fn expected_tasks(&self) -> Option<u32> {
        Some(self.0.num_tasks)
    }
}

impl Topology for TreeChildren {
    fn neighbours(&self, task: TaskId, _epoch: Epoch) -> Vec<TaskId> {
        self.0.children_of(task)
    }
    fn describe(&self) -> String {
        self.0.describe(Tree::CHILDREN)
    }
    fn expected_tasks(&self) -> Option<u32> {
        Some(self.0.num_tasks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_and_big_fanout() -> Result<(), TopologyError> {
        let chain = Tree::new(4, 1)?;
        assert_eq!(chain.children_of(0), vec![1]);
        assert_eq!(chain.children_of(3), Vec::<TaskId>::new());
        assert_eq!(chain.height(), 3);
        let wide = Tree::new(5, u32::MAX)?;
        assert_eq!(wide.children_of(0), vec![1, 2, 3, 4]);
        assert_eq!(wide.children_of(1), Vec::<TaskId>::new());
        assert_eq!(wide.parent_of(4), Some(0));
        assert_eq!(wide.height(), 1);
        let max = Tree::new(u32::MAX, 2)?;
        assert_eq!(max.children_of(u32::MAX - 1), Vec::<TaskId>::new());
        assert_eq!(max.height(), 31);
        Ok(())
    }

    #[test]
    fn refuses_bad_parameters() {
        assert_eq!(Tree::new(0, 2), Err(TopologyError::NoTasks));
        assert!(matches!(
            Tree::new(3, 0),
            Err(TopologyError::InvalidParameter { .. })
        ));
    }
}
