//! Two-dimensional grids and tori.

use std::sync::Arc;

use crate::{Epoch, Links, TaskId, Topology, TopologyError};

/// A two-dimensional grid of `rows × cols` tasks, optionally wrapping around as a torus.
///
/// Id layout: row-major, task `t = row * cols + col` for `row in 0..rows`, `col in 0..cols`.
/// Row 0 is the northern edge, column 0 the western edge.
///
/// Links, none depending on the epoch, each with at most one neighbour:
///
/// - `north`: the task in the row above (`t - cols`), `south`: the row below (`t + cols`);
///   they are the reverse of each other;
/// - `west`: the task in the column to the left (`t - 1`), `east`: to the right (`t + 1`);
///   they are the reverse of each other.
///
/// In a plain grid ([`Grid::new`]) a task on an edge has no neighbour across that edge. In a
/// torus ([`Grid::torus`]) the edges wrap around: the `north` of row 0 is the last row, the
/// `east` of the last column is column 0, and so on. A dimension of size 1 never wraps (a
/// task would be its own neighbour), so a `1 × n` torus is a ring along `east`/`west` only.
///
/// ```
/// use taskgraph_topology::{Grid, Topology};
///
/// //  0 1 2
/// //  3 4 5
/// let grid = Grid::new(2, 3)?;
/// assert_eq!(grid.coords_of(4), (1, 1));
/// assert_eq!(grid.task_at(1, 2), Some(5));
/// assert_eq!(grid.north_of(4), Some(1));
/// assert_eq!(grid.east_of(5), None);
/// grid.links().validate(6)?;
///
/// let torus = Grid::torus(2, 3)?;
/// assert_eq!(torus.east_of(5), Some(3));
/// let links = torus.links();
/// links.validate(6)?;
/// assert_eq!(links.get(Grid::WEST).unwrap().neighbours(0, 0), vec![2]);
/// # Ok::<(), taskgraph_topology::TopologyError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Grid {
    rows: u32,
    cols: u32,
    torus: bool,
}

/// A direction of a [`Grid`], one per link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    North,
    South,
    East,
    West,
}

impl Direction {
    fn name(self) -> &'static str {
        match self {
            Direction::North => Grid::NORTH,
            Direction::South => Grid::SOUTH,
            Direction::East => Grid::EAST,
            Direction::West => Grid::WEST,
        }
    }
}

impl Grid {
    /// Name of the link to the row above, as declared by [`Grid::links`].
    pub const NORTH: &'static str = "north";
    /// Name of the link to the row below, as declared by [`Grid::links`].
    pub const SOUTH: &'static str = "south";
    /// Name of the link to the column on the right, as declared by [`Grid::links`].
    pub const EAST: &'static str = "east";
    /// Name of the link to the column on the left, as declared by [`Grid::links`].
    pub const WEST: &'static str = "west";

    /// A plain grid of `rows × cols` tasks. Fails with [`TopologyError::InvalidParameter`]
    /// if a dimension is 0 or if `rows * cols` does not fit a [`TaskId`].
    pub fn new(rows: u32, cols: u32) -> Result<Self, TopologyError> {
        Self::build(rows, cols, false)
    }

    /// A torus of `rows × cols` tasks: a grid whose edges wrap around. Same errors as
    /// [`Grid::new`].
    pub fn torus(rows: u32, cols: u32) -> Result<Self, TopologyError> {
        Self::build(rows, cols, true)
    }

    fn build(rows: u32, cols: u32, torus: bool) -> Result<Self, TopologyError> {
        let topology = if torus { "torus" } else { "grid" };
        let invalid = |reason: &str| TopologyError::InvalidParameter {
            topology,
            reason: reason.into(),
        };
        if rows == 0 || cols == 0 {
            return Err(invalid("rows and columns must be at least 1"));
        }
        if rows.checked_mul(cols).is_none() {
            return Err(invalid("too many tasks"));
        }
        Ok(Self { rows, cols, torus })
    }

    /// Number of rows.
    pub fn rows(&self) -> u32 {
        self.rows
    }

    /// Number of columns.
    pub fn cols(&self) -> u32 {
        self.cols
    }

    /// Whether the edges wrap around.
    pub fn is_torus(&self) -> bool {
        self.torus
    }

    /// Number of tasks, `rows * cols`.
    pub fn num_tasks(&self) -> u32 {
        self.rows * self.cols
    }

    /// The `(row, col)` of `task`.
    pub fn coords_of(&self, task: TaskId) -> (u32, u32) {
        (task / self.cols, task % self.cols)
    }

    /// The task at `(row, col)`, `None` outside the grid.
    pub fn task_at(&self, row: u32, col: u32) -> Option<TaskId> {
        (row < self.rows && col < self.cols).then(|| row * self.cols + col)
    }

    /// The neighbour of `task` in the row above.
    pub fn north_of(&self, task: TaskId) -> Option<TaskId> {
        self.step(task, Direction::North)
    }

    /// The neighbour of `task` in the row below.
    pub fn south_of(&self, task: TaskId) -> Option<TaskId> {
        self.step(task, Direction::South)
    }

    /// The neighbour of `task` in the column on the right.
    pub fn east_of(&self, task: TaskId) -> Option<TaskId> {
        self.step(task, Direction::East)
    }

    /// The neighbour of `task` in the column on the left.
    pub fn west_of(&self, task: TaskId) -> Option<TaskId> {
        self.step(task, Direction::West)
    }

    fn step(&self, task: TaskId, direction: Direction) -> Option<TaskId> {
        if task >= self.num_tasks() {
            return None;
        }
        let (row, col) = self.coords_of(task);
        // Moves `x` by one in `0..size`, wrapping only in a torus of size >= 2.
        let back = |x: u32, size: u32| match x {
            0 if self.torus && size > 1 => Some(size - 1),
            0 => None,
            _ => Some(x - 1),
        };
        let forward = |x: u32, size: u32| {
            if x + 1 < size {
                Some(x + 1)
            } else if self.torus && size > 1 {
                Some(0)
            } else {
                None
            }
        };
        let (row, col) = match direction {
            Direction::North => (back(row, self.rows)?, col),
            Direction::South => (forward(row, self.rows)?, col),
            Direction::West => (row, back(col, self.cols)?),
            Direction::East => (row, forward(col, self.cols)?),
        };
        self.task_at(row, col)
    }

    fn link(&self, direction: Direction) -> Arc<dyn Topology> {
        Arc::new(GridLink(*self, direction))
    }

    /// The `north` link.
    pub fn north(&self) -> Arc<dyn Topology> {
        self.link(Direction::North)
    }

    /// The `south` link.
    pub fn south(&self) -> Arc<dyn Topology> {
        self.link(Direction::South)
    }

    /// The `east` link.
    pub fn east(&self) -> Arc<dyn Topology> {
        self.link(Direction::East)
    }

    /// The `west` link.
    pub fn west(&self) -> Arc<dyn Topology> {
        self.link(Direction::West)
    }

    /// The links `north`, `south`, `east` and `west`, with the pairs `south` ↔ `north` and
    /// `east` ↔ `west` declared.
    pub fn links(&self) -> Links {
        Links::new()
            .link(Self::NORTH, self.north())
            .link(Self::SOUTH, self.south())
            .link(Self::EAST, self.east())
            .link(Self::WEST, self.west())
            .pair(Self::EAST, Self::WEST)
            .pair(Self::SOUTH, Self::NORTH)
    }
}

/// One link of a [`Grid`].
#[derive(Debug, Clone, Copy)]
struct GridLink(Grid, Direction);

impl Topology for GridLink {
    fn neighbours(&self, task: TaskId, _epoch: Epoch) -> Vec<TaskId> {
        self.0.step(task, self.1).into_iter().collect()
    }
    fn describe(&self) -> String {
        let kind = if self.0.torus { "torus" } else { "grid" };
        format!(
            "{kind}(rows={},cols={})/{}",
            self.0.rows,
            self.0.cols,
            self.1.name()
        )
    }
    fn expected_tasks(&self) -> Option<u32> {
        Some(self.0.num_tasks())
    }
}
