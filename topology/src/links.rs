//! A job's set of named links and the validator the framework runs at start.

use std::collections::btree_map::Entry;
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
    /// A declaration other than a pair names a link that was not declared.
    #[error("{context} names undeclared link {name:?}")]
    UnknownLink {
        /// The name.
        name: String,
        /// Which declaration names it, e.g. `allow_self_links`.
        context: &'static str,
    },
    /// A link's topology was built for another number of tasks than the job has.
    #[error("link {link:?} is a topology for {expected} tasks, but the job has {num_tasks} tasks")]
    TaskCountMismatch {
        /// The link.
        link: String,
        /// What [`Topology::expected_tasks`] answered.
        expected: u32,
        /// The number of tasks of the job.
        num_tasks: u32,
    },
    /// Connectivity is required ([`Links::require_connected`]) but a task cannot be reached
    /// from task 0 through the union of the links, following edges in either direction.
    #[error(
        "task {task} is not reachable from task 0 through links {links:?} {}",
        epochs_text(*first_epoch, *last_epoch)
    )]
    Disconnected {
        /// The unreachable task (the smallest one).
        task: TaskId,
        /// The links whose union was searched.
        links: Vec<String>,
        /// First epoch whose edges were included.
        first_epoch: Epoch,
        /// Last epoch whose edges were included.
        last_epoch: Epoch,
    },
    /// An entry of a description (see [`Links::from_description`]) names a topology that
    /// is not one of this crate's standard topologies: typically an application's own
    /// [`Topology`] type, which only the application can rebuild.
    #[error("link {link:?}: {description:?} does not describe a standard topology")]
    UnknownDescription {
        /// The link.
        link: String,
        /// Its description.
        description: String,
    },
    /// An entry of a description (see [`Links::from_description`]) is malformed: a standard
    /// topology with missing, misspelled or out-of-range parameters or an unknown link, a
    /// description not in the exact form [`Topology::describe`] writes, or a `self:` entry
    /// whose value is not `allowed`.
    #[error("description entry {key:?} = {value:?} is invalid: {reason}")]
    InvalidDescription {
        /// The key of the entry: a link name, `pair:<link>` or `self:<link>`.
        key: String,
        /// Its value.
        value: String,
        /// What is wrong.
        reason: String,
    },
}

fn epochs_text(first: Epoch, last: Epoch) -> String {
    if first == last {
        format!("at epoch {first}")
    } else {
        format!("over epochs {first}..={last}")
    }
}

/// Which connectivity [`Links::validate`] requires, from the weakest to the strongest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
enum Connectivity {
    /// No check.
    #[default]
    None,
    /// The union of all links over each link's period is connected.
    OverPeriod,
    /// The union of all links at epoch 0 is connected.
    AtEpochZero,
}

/// The named links of a job, and which of them are the reverse of each other.
///
/// ```
/// use std::sync::Arc;
/// use taskgraph_topology::{Links, Ring, Star, TopologyError};
///
/// // A star, plus a ring between the same tasks under other names.
/// let ring = Ring::new(4)?;
/// let links = Star::new(4)?
///     .links()
///     .merge(
///         Links::new()
///             .link("left", ring.prev())
///             .link("right", ring.next())
///             .pair("right", "left"),
///     )
///     .require_connected();
/// links.validate(4)?;
/// assert_eq!(links.reverse_of("left"), Some("right"));
/// assert_eq!(
///     links.names().collect::<Vec<_>>(),
///     vec!["left", "master", "right", "workers"]
/// );
/// # Ok::<(), TopologyError>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct Links {
    links: BTreeMap<String, Arc<dyn Topology>>,
    pairs: Vec<(String, String)>,
    self_links_allowed: BTreeSet<String>,
    connectivity: Connectivity,
    errors: Vec<TopologyError>,
}

impl Links {
    /// An empty set of links.
    pub fn new() -> Self {
        Self::default()
    }

    /// Declares a link `name` with its topology.
    ///
    /// An empty name or a name declared twice is remembered and reported by
    /// [`Links::validate`].
    pub fn link(mut self, name: impl Into<String>, topology: Arc<dyn Topology>) -> Self {
        let name = name.into();
        if name.is_empty() {
            self.errors.push(TopologyError::InvalidLinkName {
                name,
                reason: "empty",
            });
            return self;
        }
        match self.links.entry(name) {
            Entry::Vacant(entry) => {
                entry.insert(topology);
            }
            Entry::Occupied(entry) => self.errors.push(TopologyError::InvalidLinkName {
                name: entry.key().clone(),
                reason: "declared twice",
            }),
        }
        self
    }

    /// Declares that `a` and `b` are the reverse of each other: `j` is in `a(i)` exactly when
    /// `i` is in `b(j)`, at every epoch. A link paired with itself is symmetric (e.g.
    /// `peers`). [`to_dot`](crate::to_dot) draws the edges of `a` and leaves out those of `b`.
    pub fn pair(mut self, a: impl Into<String>, b: impl Into<String>) -> Self {
        self.pairs.push((a.into(), b.into()));
        self
    }

    /// Allows a task to be its own neighbour in link `name`.
    pub fn allow_self_links(mut self, name: impl Into<String>) -> Self {
        self.self_links_allowed.insert(name.into());
        self
    }

    /// Makes [`Links::validate`] also require that every task be reachable from task 0
    /// through the union of all links at epoch 0, following edges in either direction. The
    /// error names the smallest unreachable task.
    ///
    /// For topologies that are only connected over several epochs (a [`Butterfly`] pairs
    /// tasks two by two at each epoch), use [`Links::require_connected_over_period`].
    ///
    /// [`Butterfly`]: crate::Butterfly
    pub fn require_connected(mut self) -> Self {
        self.connectivity = Connectivity::AtEpochZero;
        self
    }

    /// Makes [`Links::validate`] also require that every task be reachable from task 0
    /// through the union of all links over all the epochs of their [`Topology::period`],
    /// following edges in either direction. Weaker than [`Links::require_connected`], which
    /// wins if both are asked for.
    pub fn require_connected_over_period(mut self) -> Self {
        self.connectivity = self.connectivity.max(Connectivity::OverPeriod);
        self
    }

    /// Adds the links, pairs, allowed self links and connectivity requirement of `other`.
    /// A name declared in both is reported by [`Links::validate`] as declared twice.
    pub fn merge(mut self, other: Links) -> Self {
        for (name, topology) in other.links {
            self = self.link(name, topology);
        }
        self.pairs.extend(other.pairs);
        self.self_links_allowed.extend(other.self_links_allowed);
        self.connectivity = self.connectivity.max(other.connectivity);
        self.errors.extend(other.errors);
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

    /// The names of the links, in ascending order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.links.keys().map(String::as_str)
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

    /// The link declared as the reverse of `name` by the first pair naming it (`name` itself
    /// for a symmetric link), if any.
    pub fn reverse_of(&self, name: &str) -> Option<&str> {
        self.pairs.iter().find_map(|(a, b)| {
            if a == name {
                Some(b.as_str())
            } else if b == name {
                Some(a.as_str())
            } else {
                None
            }
        })
    }

    /// Whether a task may be its own neighbour in link `name`.
    pub fn self_links_allowed(&self, name: &str) -> bool {
        self.self_links_allowed.contains(name)
    }

    /// A stable description of every link, pair and allowed self link, as stored in the job
    /// spec. Its entries:
    ///
    /// - `<link>` → the link's [`Topology::describe`], e.g. `tree(tasks=15,fanout=2)/parents`;
    /// - `pair:<a>` → `<b>` for each pair `(a, b)` (one per `a`: a later pair with the same
    ///   `a` replaces an earlier one);
    /// - `self:<link>` → `allowed` for each [`Links::allow_self_links`].
    ///
    /// The connectivity requirement ([`Links::require_connected`]) is not recorded.
    /// [`Links::from_description`] rebuilds the links of the standard topologies from it.
    pub fn describe(&self) -> BTreeMap<String, String> {
        let mut out: BTreeMap<String, String> = self
            .links
            .iter()
            .map(|(k, v)| (k.clone(), v.describe()))
            .collect();
        for (a, b) in &self.pairs {
            out.insert(format!("pair:{a}"), b.clone());
        }
        for s in &self.self_links_allowed {
            out.insert(format!("self:{s}"), "allowed".into());
        }
        out
    }

    /// The links at `epoch` as a Graphviz DOT graph; see [`to_dot`](crate::to_dot).
    pub fn to_dot(&self, num_tasks: u32, epoch: Epoch) -> String {
        crate::to_dot(self, num_tasks, epoch)
    }

    /// The links at `epoch` as a Graphviz DOT graph with extra attributes for each task's
    /// node; see [`to_dot_with`](crate::to_dot_with).
    pub fn to_dot_with(
        &self,
        num_tasks: u32,
        epoch: Epoch,
        node_attrs: impl FnMut(TaskId) -> Option<String>,
    ) -> String {
        crate::to_dot_with(self, num_tasks, epoch, node_attrs)
    }

    /// Checks every link for `num_tasks` tasks and returns the first error found, which
    /// names the link, the task and the epoch.
    ///
    /// Checks, in this order:
    ///
    /// 1. the declarations: at least one task, link names non-empty and unique, pairs and
    ///    [`Links::allow_self_links`] naming declared links, topologies built for
    ///    `num_tasks` tasks ([`Topology::expected_tasks`]);
    /// 2. epoch by epoch, every link for every task: neighbour ids below `num_tasks`,
    ///    strictly ascending (no duplicates), no self links unless allowed; then every pair
    ///    `(a, b)`: `j` in `a(i)` exactly when `i` in `b(j)`. A link is checked over its
    ///    [`Topology::period`] epochs, and a pair over the least common multiple of the
    ///    periods of its two links (so every combination of their neighbourhoods is seen);
    /// 3. if asked for, connectivity ([`Links::require_connected`],
    ///    [`Links::require_connected_over_period`]).
    ///
    /// Each link's [`Topology::neighbours`] is called once per task and epoch checked; time
    /// and memory are linear in the number of edges (times the log of the largest degree),
    /// so a tree of 100,000 tasks validates in milliseconds.
    pub fn validate(&self, num_tasks: u32) -> Result<(), TopologyError> {
        if num_tasks == 0 {
            return Err(TopologyError::NoTasks);
        }
        if let Some(e) = self.errors.first() {
            return Err(e.clone());
        }
        // Link name → (topology, period, epochs to check).
        let mut windows: BTreeMap<&str, (&dyn Topology, u64, u64)> = BTreeMap::new();
        for (name, topo) in &self.links {
            let period = topo.period().max(1);
            windows.insert(name, (topo.as_ref(), period, period));
        }
        // Pair → epochs to check.
        let mut pairs: Vec<(&str, &str, u64)> = Vec::with_capacity(self.pairs.len());
        for (a, b) in &self.pairs {
            let (Some(&(_, pa, _)), Some(&(_, pb, _))) =
                (windows.get(a.as_str()), windows.get(b.as_str()))
            else {
                let missing = if self.links.contains_key(a) { b } else { a };
                return Err(TopologyError::UnknownLinkInPair {
                    a: a.clone(),
                    b: b.clone(),
                    missing: missing.clone(),
                });
            };
            let window = lcm(pa, pb);
            for name in [a.as_str(), b.as_str()] {
                if let Some(w) = windows.get_mut(name) {
                    w.2 = w.2.max(window);
                }
            }
            pairs.push((a, b, window));
        }
        if let Some(name) = self
            .self_links_allowed
            .iter()
            .find(|s| !self.links.contains_key(*s))
        {
            return Err(TopologyError::UnknownLink {
                name: name.clone(),
                context: "allow_self_links",
            });
        }
        for (name, topo) in &self.links {
            if let Some(expected) = topo.expected_tasks() {
                if expected != num_tasks {
                    return Err(TopologyError::TaskCountMismatch {
                        link: name.clone(),
                        expected,
                        num_tasks,
                    });
                }
            }
        }

        // Epochs whose edges go into the connectivity check, per link.
        let connectivity_epochs = |period: u64| match self.connectivity {
            Connectivity::None => 0,
            Connectivity::OverPeriod => period,
            Connectivity::AtEpochZero => 1,
        };
        let mut components =
            (self.connectivity != Connectivity::None).then(|| UnionFind::new(num_tasks));
        let epochs = windows.values().map(|w| w.2).max().unwrap_or(1);
        for epoch in 0..epochs {
            let mut adjacencies: BTreeMap<&str, Adjacency> = BTreeMap::new();
            for (&name, &(topo, period, window)) in &windows {
                if epoch >= window {
                    continue;
                }
                let keep_for_pairs = pairs
                    .iter()
                    .any(|&(a, b, w)| epoch < w && (a == name || b == name));
                let keep_for_components = epoch < connectivity_epochs(period);
                let adjacency = check_link(
                    name,
                    topo,
                    epoch,
                    num_tasks,
                    self.self_links_allowed.contains(name),
                    keep_for_pairs || keep_for_components,
                )?;
                if let (true, Some(components)) = (keep_for_components, components.as_mut()) {
                    for task in 0..num_tasks {
                        for &n in adjacency.of(task) {
                            components.union(task, n);
                        }
                    }
                }
                if keep_for_pairs {
                    adjacencies.insert(name, adjacency);
                }
            }
            for &(a, b, window) in &pairs {
                if epoch >= window {
                    continue;
                }
                if let (Some(fwd), Some(rev)) = (adjacencies.get(a), adjacencies.get(b)) {
                    check_reverse(a, fwd, b, rev, epoch)?;
                    if a != b {
                        check_reverse(b, rev, a, fwd, epoch)?;
                    }
                }
            }
        }

        if let Some(mut components) = components {
            let root = components.find(0);
            if let Some(task) = (1..num_tasks).find(|&t| components.find(t) != root) {
                let periods = windows.values().map(|w| connectivity_epochs(w.1));
                return Err(TopologyError::Disconnected {
                    task,
                    links: self.links.keys().cloned().collect(),
                    first_epoch: 0,
                    last_epoch: periods.max().unwrap_or(1).max(1) - 1,
                });
            }
        }
        Ok(())
    }
}

/// Least common multiple, saturating at `u64::MAX`.
fn lcm(a: u64, b: u64) -> u64 {
    let (mut x, mut y) = (a, b);
    while y != 0 {
        (x, y) = (y, x % y);
    }
    if x == 0 {
        return 0;
    }
    (a / x).saturating_mul(b)
}

/// The neighbours of every task of one link at one epoch, in compressed sparse rows.
#[derive(Debug, Default)]
struct Adjacency {
    /// `targets[offsets[t]..offsets[t + 1]]` are the neighbours of task `t`.
    offsets: Vec<usize>,
    targets: Vec<TaskId>,
}

impl Adjacency {
    fn of(&self, task: TaskId) -> &[TaskId] {
        let t = task as usize;
        &self.targets[self.offsets[t]..self.offsets[t + 1]]
    }
}

/// Checks the neighbours of every task of one link at one epoch; returns them if `keep`.
fn check_link(
    name: &str,
    topo: &dyn Topology,
    epoch: Epoch,
    num_tasks: u32,
    allow_self: bool,
    keep: bool,
) -> Result<Adjacency, TopologyError> {
    let mut adjacency = Adjacency::default();
    if keep {
        adjacency.offsets.reserve(num_tasks as usize + 1);
        adjacency.offsets.push(0);
    }
    for task in 0..num_tasks {
        let ns = topo.neighbours(task, epoch);
        if ns.windows(2).any(|w| w[0] >= w[1]) {
            return Err(TopologyError::NotSorted {
                link: name.to_owned(),
                task,
                epoch,
                neighbours: ns,
            });
        }
        for &n in &ns {
            if n >= num_tasks {
                return Err(TopologyError::OutOfRange {
                    link: name.to_owned(),
                    task,
                    epoch,
                    neighbour: n,
                    num_tasks,
                });
            }
            if n == task && !allow_self {
                return Err(TopologyError::SelfLink {
                    link: name.to_owned(),
                    task,
                    epoch,
                });
            }
        }
        if keep {
            adjacency.targets.extend_from_slice(&ns);
            adjacency.offsets.push(adjacency.targets.len());
        }
    }
    Ok(adjacency)
}

/// Checks that for every edge `task → n` of `link`, `n → task` is an edge of `reverse`.
fn check_reverse(
    link: &str,
    fwd: &Adjacency,
    reverse: &str,
    rev: &Adjacency,
    epoch: Epoch,
) -> Result<(), TopologyError> {
    let num_tasks = fwd.offsets.len().saturating_sub(1) as TaskId;
    for task in 0..num_tasks {
        for &n in fwd.of(task) {
            if rev.of(n).binary_search(&task).is_err() {
                return Err(TopologyError::Asymmetric {
                    link: link.to_owned(),
                    reverse: reverse.to_owned(),
                    task,
                    neighbour: n,
                    epoch,
                });
            }
        }
    }
    Ok(())
}

/// Disjoint sets of tasks, for the connectivity check.
#[derive(Debug)]
struct UnionFind {
    parent: Vec<TaskId>,
    size: Vec<u32>,
}

impl UnionFind {
    fn new(num_tasks: u32) -> Self {
        Self {
            parent: (0..num_tasks).collect(),
            size: vec![1; num_tasks as usize],
        }
    }

    fn find(&mut self, mut t: TaskId) -> TaskId {
        while self.parent[t as usize] != t {
            let grandparent = self.parent[self.parent[t as usize] as usize];
            self.parent[t as usize] = grandparent;
            t = grandparent;
        }
        t
    }

    fn union(&mut self, a: TaskId, b: TaskId) {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra == rb {
            return;
        }
        let (big, small) = if self.size[ra as usize] >= self.size[rb as usize] {
            (ra, rb)
        } else {
            (rb, ra)
        };
        self.parent[small as usize] = big;
        self.size[big as usize] += self.size[small as usize];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lcm_values() {
        assert_eq!(lcm(1, 1), 1);
        assert_eq!(lcm(2, 3), 6);
        assert_eq!(lcm(4, 6), 12);
        assert_eq!(lcm(u64::MAX, u64::MAX - 1), u64::MAX);
    }

    #[test]
    fn union_find() {
        let mut uf = UnionFind::new(5);
        uf.union(0, 1);
        uf.union(3, 4);
        uf.union(1, 4);
        assert_eq!(uf.find(3), uf.find(0));
        assert_ne!(uf.find(2), uf.find(0));
    }
}
