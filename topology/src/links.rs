//! A job's set of named links and the validator the framework runs at start.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::{Epoch, TaskId, Topology};

/// Why a topology or a set of links was refused. Every variant names the offender.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TopologyError {
    /// A job needs at least one task.
    #[error("a job needs at least one task")]
    NoTasks,
    /// A topology parameter is out of its range.
    #[error("invalid {topology} topology: {reason}")]
    InvalidParameter {
        /// The kind of topology.
        topology: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A link name is empty or used twice.
    #[error("invalid link name {name:?}: {reason}")]
    InvalidLinkName {
        /// The name.
        name: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// A pair names a link that was not declared.
    #[error("pair ({a:?}, {b:?}) names undeclared link {missing:?}")]
    UnknownLinkInPair {
        /// First link of the pair.
        a: String,
        /// Second link of the pair.
        b: String,
        /// The link that is missing.
        missing: String,
    },
    /// A neighbour id is not below the number of tasks.
    #[error("link {link:?}: task {task} at epoch {epoch} names neighbour {neighbour}, but the job has only {num_tasks} tasks")]
    OutOfRange {
        /// The link.
        link: String,
        /// The task whose neighbours were asked.
        task: TaskId,
        /// The epoch.
        epoch: Epoch,
        /// The offending neighbour.
        neighbour: TaskId,
        /// The number of tasks of the job.
        num_tasks: u32,
    },
    /// A task is its own neighbour in a link that does not allow it.
    #[error("link {link:?}: task {task} at epoch {epoch} is its own neighbour")]
    SelfLink {
        /// The link.
        link: String,
        /// The task.
        task: TaskId,
        /// The epoch.
        epoch: Epoch,
    },
    /// Neighbours are not in ascending order or contain duplicates.
    #[error("link {link:?}: neighbours of task {task} at epoch {epoch} are not strictly ascending: {neighbours:?}")]
    NotSorted {
        /// The link.
        link: String,
        /// The task.
        task: TaskId,
        /// The epoch.
        epoch: Epoch,
        /// What the topology answered.
        neighbours: Vec<TaskId>,
    },
    /// `a` is `b`'s neighbour in one link of a pair but `b` is not `a`'s in the other.
    #[error("links {link:?}/{reverse:?} are not symmetric at epoch {epoch}: task {task} has {neighbour} in {link:?}, but {neighbour} does not have {task} in {reverse:?}")]
    Asymmetric {
        /// The link where the edge exists.
        link: String,
        /// The paired link where the reverse edge is missing.
        reverse: String,
        /// The task.
        task: TaskId,
        /// Its neighbour.
        neighbour: TaskId,
        /// The epoch.
        epoch: Epoch,
    },
}

/// The named links of a job, and which of them are the reverse of each other.
#[derive(Debug, Clone, Default)]
pub struct Links {
    links: BTreeMap<String, Arc<dyn Topology>>,
    pairs: Vec<(String, String)>,
    self_links_allowed: BTreeSet<String>,
    errors: Vec<TopologyError>,
}

impl Links {
    /// An empty set of links.
    pub fn new() -> Self {
        Self::default()
    }

    /// Declares a link `name` with its topology.
    pub fn link(mut self, name: impl Into<String>, topology: Arc<dyn Topology>) -> Self {
        let name = name.into();
        if name.is_empty() {
            self.errors.push(TopologyError::InvalidLinkName { name, reason: "empty" });
        } else if self.links.contains_key(&name) {
            self.errors.push(TopologyError::InvalidLinkName { name, reason: "declared twice" });
        } else {
            self.links.insert(name, topology);
        }
        self
    }

    /// Declares that `a` and `b` are the reverse of each other: `j` is in `a(i)` exactly when
    /// `i` is in `b(j)`. A link paired with itself is symmetric (e.g. `peers`).
    pub fn pair(mut self, a: impl Into<String>, b: impl Into<String>) -> Self {
        self.pairs.push((a.into(), b.into()));
        self
    }

    /// Allows a task to be its own neighbour in link `name`.
    pub fn allow_self_links(mut self, name: impl Into<String>) -> Self {
        self.self_links_allowed.insert(name.into());
        self
    }

    /// The topology of link `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Topology>> {
        self.links.get(name)
    }

    /// The links, by name in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Arc<dyn Topology>)> {
        self.links.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Number of links.
    pub fn len(&self) -> usize {
        self.links.len()
    }

    /// Whether no link is declared.
    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
    }

    /// The declared pairs.
    pub fn pairs(&self) -> &[(String, String)] {
        &self.pairs
    }

    /// A stable description of every link and pair, as stored in the job spec.
    pub fn describe(&self) -> BTreeMap<String, String> {
        let mut out: BTreeMap<String, String> =
            self.links.iter().map(|(k, v)| (k.clone(), v.describe())).collect();
        for (a, b) in &self.pairs {
            out.insert(format!("pair:{a}"), b.clone());
        }
        for s in &self.self_links_allowed {
            out.insert(format!("self:{s}"), "allowed".into());
        }
        out
    }

    /// Checks every link for `num_tasks` tasks, over each link's [`Topology::period`] epochs:
    /// ids in range, ascending without duplicates, no self links unless allowed, paired links
    /// symmetric. The first error found names the task, link and epoch.
    pub fn validate(&self, num_tasks: u32) -> Result<(), TopologyError> {
        if num_tasks == 0 {
            return Err(TopologyError::NoTasks);
        }
        if let Some(e) = self.errors.first() {
            return Err(e.clone());
        }
        for (a, b) in &self.pairs {
            for name in [a, b] {
                if !self.links.contains_key(name) {
                    return Err(TopologyError::UnknownLinkInPair {
                        a: a.clone(),
                        b: b.clone(),
                        missing: name.clone(),
                    });
                }
            }
        }
        for (name, topo) in &self.links {
            let allow_self = self.self_links_allowed.contains(name);
            for epoch in 0..topo.period().max(1) {
                for task in 0..num_tasks {
                    let ns = topo.neighbours(task, epoch);
                    if ns.windows(2).any(|w| w[0] >= w[1]) {
                        return Err(TopologyError::NotSorted {
                            link: name.clone(),
                            task,
                            epoch,
                            neighbours: ns,
                        });
                    }
                    for &n in &ns {
                        if n >= num_tasks {
                            return Err(TopologyError::OutOfRange {
                                link: name.clone(),
                                task,
                                epoch,
                                neighbour: n,
                                num_tasks,
                            });
                        }
                        if n == task && !allow_self {
                            return Err(TopologyError::SelfLink { link: name.clone(), task, epoch });
                        }
                    }
                }
            }
        }
        for (a, b) in &self.pairs {
            let (ta, tb) = (&self.links[a], &self.links[b]);
            let period = ta.period().max(tb.period()).max(1);
            for epoch in 0..period {
                for (fwd, rev, tf, tr) in [(a, b, ta, tb), (b, a, tb, ta)] {
                    for task in 0..num_tasks {
                        for n in tf.neighbours(task, epoch) {
                            if tr.neighbours(n, epoch).binary_search(&task).is_err() {
                                return Err(TopologyError::Asymmetric {
                                    link: fwd.clone(),
                                    reverse: rev.clone(),
                                    task,
                                    neighbour: n,
                                    epoch,
                                });
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }
}
