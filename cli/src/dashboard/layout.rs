//! The dashboard's picture of a topology: positions for the tasks and the edges between them,
//! computed here (no Graphviz) and written as SVG. Pure code, no IO.
//!
//! The shape comes from the description the job spec stores for its links
//! ([`Links::describe`]): a tree is drawn as a tree (one row per depth), a ring, a full mesh
//! and a butterfly as a circle, a grid or torus as a grid, a star with its master in the
//! middle, parameter servers as a row of servers above a row of workers. Anything else (an
//! application's own topology) gets a layered layout: one row per breadth-first distance from
//! task 0 over all rebuilt links.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;

use taskgraph::topology::Links;
use taskgraph::{Epoch, TaskId};

/// Edges beyond this many are not drawn (a full mesh of 1,000 tasks has half a million).
pub const MAX_EDGES: usize = 4_000;
/// Above this many tasks, the task ids are not written inside the circles.
const MAX_LABELLED: u32 = 150;
/// Colours of the links' edges, in the order of link names.
const COLOURS: [&str; 6] = [
    "#5b7db1", "#b15b5b", "#4f9a5b", "#c08a2e", "#8a5bb1", "#7a7a7a",
];

/// Undirected edges `(a, b)`, `a < b`, per link name.
pub type Edges = Vec<(String, Vec<(TaskId, TaskId)>)>;

/// The shape a job's links are drawn in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// A `fanout`-ary tree in breadth-first order.
    Tree { fanout: u32 },
    /// A circle (ring, mesh, butterfly).
    Circle,
    /// Row-major cells.
    Grid { cols: u32 },
    /// Task 0 in the middle, the others around it.
    Star,
    /// `servers` in a row above the workers.
    Servers { servers: u32 },
    /// Rows by breadth-first distance from task 0.
    Layered,
}

/// A value of `name=<u32>` in a description like `tree(tasks=7,fanout=2)/children`.
fn param(description: &str, name: &str) -> Option<u32> {
    let inner = description.split_once('(')?.1.split_once(')')?.0;
    inner.split(',').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k.trim() == name).then(|| v.trim().parse().ok())?
    })
}

/// The shape for a job's link descriptions (the spec's `links` map), first recognised link
/// first (in name order).
pub fn shape_of(description: &BTreeMap<String, String>) -> Shape {
    for (key, value) in description {
        if key.starts_with("pair:") || key.starts_with("self:") {
            continue;
        }
        let kind = value.split('(').next().unwrap_or_default();
        let shape = match kind {
            "tree" => param(value, "fanout")
                .filter(|f| *f >= 1)
                .map(|fanout| Shape::Tree { fanout }),
            "ring" | "mesh" | "butterfly" => Some(Shape::Circle),
            "grid" | "torus" => param(value, "cols")
                .filter(|c| *c >= 1)
                .map(|cols| Shape::Grid { cols }),
            "star" => Some(Shape::Star),
            "ps" => param(value, "servers").map(|servers| Shape::Servers { servers }),
            _ => None,
        };
        if let Some(s) = shape {
            return s;
        }
    }
    Shape::Layered
}

/// Tasks placed in a `width` × `height` box, with the edges to draw.
#[derive(Debug, Clone, PartialEq)]
pub struct Picture {
    /// Width of the view box.
    pub width: f64,
    /// Height of the view box.
    pub height: f64,
    /// Circle radius of a task.
    pub radius: f64,
    /// Centre of each task, by id.
    pub positions: Vec<(f64, f64)>,
    /// Edges per link name: undirected pairs `(a, b)` with `a < b`, each drawn once over
    /// all links.
    pub edges: Edges,
    /// Edges left out to keep the picture light.
    pub edges_left_out: usize,
}

/// The undirected edges of `links` at `epoch`, once each, per link (name order), at most
/// [`MAX_EDGES`] in all; returns them and how many were left out.
fn edges(links: &Links, tasks: u32, epoch: Epoch) -> (Edges, usize) {
    let mut seen: BTreeSet<(TaskId, TaskId)> = BTreeSet::new();
    let mut out = Vec::new();
    let mut left_out: std::collections::HashSet<(TaskId, TaskId)> = Default::default();
    for (name, topology) in links.iter() {
        let mut mine = Vec::new();
        for t in 0..tasks {
            for n in topology.neighbours(t, epoch) {
                if n >= tasks || n == t {
                    continue;
                }
                let e = (t.min(n), t.max(n));
                if seen.contains(&e) {
                    continue;
                }
                if seen.len() >= MAX_EDGES {
                    left_out.insert(e);
                    continue;
                }
                seen.insert(e);
                mine.push(e);
            }
        }
        if !mine.is_empty() {
            out.push((name.to_owned(), mine));
        }
    }
    (out, left_out.len())
}

/// Rows of task ids for the layered layout: breadth-first distance from task 0 over every
/// edge; tasks not reached go in a last row.
fn layers(tasks: u32, edges: &Edges) -> Vec<Vec<TaskId>> {
    let mut adj: Vec<Vec<TaskId>> = vec![Vec::new(); tasks as usize];
    for (_, es) in edges {
        for &(a, b) in es {
            adj[a as usize].push(b);
            adj[b as usize].push(a);
        }
    }
    let mut depth: Vec<Option<usize>> = vec![None; tasks as usize];
    let mut rows: Vec<Vec<TaskId>> = Vec::new();
    if tasks == 0 {
        return rows;
    }
    let mut queue = VecDeque::from([0u32]);
    depth[0] = Some(0);
    while let Some(t) = queue.pop_front() {
        let d = depth[t as usize].unwrap_or(0);
        if rows.len() <= d {
            rows.resize(d + 1, Vec::new());
        }
        rows[d].push(t);
        for &n in &adj[t as usize] {
            if depth[n as usize].is_none() {
                depth[n as usize] = Some(d + 1);
                queue.push_back(n);
            }
        }
    }
    let unreached: Vec<TaskId> = (0..tasks)
        .filter(|t| depth[*t as usize].is_none())
        .collect();
    if !unreached.is_empty() {
        rows.push(unreached);
    }
    rows
}

/// Long rows are wrapped so that no row holds more than this many tasks.
const MAX_ROW: usize = 40;

/// Places rows of tasks: each row spread evenly over the width, rows evenly down.
fn place_rows(rows: &[Vec<TaskId>], tasks: u32) -> (Vec<(f64, f64)>, f64, f64) {
    let wrapped: Vec<&[TaskId]> = rows.iter().flat_map(|r| r.chunks(MAX_ROW)).collect();
    let widest = wrapped.iter().map(|r| r.len()).max().unwrap_or(1).max(1);
    let width = (widest as f64 * 40.0).max(400.0);
    let height = (wrapped.len() as f64 * 70.0).max(200.0);
    let mut pos = vec![(0.0, 0.0); tasks as usize];
    for (i, row) in wrapped.iter().enumerate() {
        let y = (i as f64 + 0.5) * height / wrapped.len() as f64;
        for (j, t) in row.iter().enumerate() {
            let x = (j as f64 + 0.5) * width / row.len() as f64;
            pos[*t as usize] = (x, y);
        }
    }
    (pos, width, height)
}

/// Lays out `tasks` tasks of the links described by `description` at `epoch`.
pub fn layout(
    description: &BTreeMap<String, String>,
    links: &Links,
    tasks: u32,
    epoch: Epoch,
) -> Picture {
    let (edges, edges_left_out) = edges(links, tasks, epoch);
    let n = tasks as usize;
    let circle = |n: usize, cx: f64, cy: f64, r: f64, offset: usize, total: usize| {
        (0..n)
            .map(|i| {
                let a = std::f64::consts::TAU * (i + offset) as f64 / total.max(1) as f64
                    - std::f64::consts::FRAC_PI_2;
                (cx + r * a.cos(), cy + r * a.sin())
            })
            .collect::<Vec<_>>()
    };
    // Circle radius so that neighbours on it do not overlap.
    let ring_radius = |n: usize| (n as f64 * 36.0 / std::f64::consts::TAU).max(150.0);
    let (positions, width, height) = match shape_of(description) {
        Shape::Tree { fanout } => {
            // Breadth-first ids: depth d holds ids [first(d), first(d) + fanout^d).
            let mut rows: Vec<Vec<TaskId>> = Vec::new();
            let (mut start, mut size) = (0u64, 1u64);
            while start < tasks as u64 {
                let end = (start + size).min(tasks as u64);
                rows.push((start as u32..end as u32).collect());
                start = end;
                size = size.saturating_mul(fanout as u64);
            }
            place_tree(&rows, tasks)
        }
        Shape::Circle => {
            let r = ring_radius(n);
            (
                circle(n, r + 30.0, r + 30.0, r, 0, n),
                2.0 * r + 60.0,
                2.0 * r + 60.0,
            )
        }
        Shape::Grid { cols } => {
            let rows: Vec<Vec<TaskId>> = (0..tasks)
                .collect::<Vec<_>>()
                .chunks(cols as usize)
                .map(<[TaskId]>::to_vec)
                .collect();
            let w = (cols as f64 * 44.0).max(200.0);
            let h = (rows.len() as f64 * 44.0).max(100.0);
            let mut pos = vec![(0.0, 0.0); n];
            for (i, row) in rows.iter().enumerate() {
                for (j, t) in row.iter().enumerate() {
                    pos[*t as usize] = (
                        (j as f64 + 0.5) * w / cols as f64,
                        (i as f64 + 0.5) * h / rows.len() as f64,
                    );
                }
            }
            (pos, w, h)
        }
        Shape::Star => {
            let r = ring_radius(n.saturating_sub(1));
            let mut pos = vec![(r + 30.0, r + 30.0)];
            let workers = n.saturating_sub(1);
            pos.extend(circle(workers, r + 30.0, r + 30.0, r, 0, workers));
            pos.truncate(n);
            (pos, 2.0 * r + 60.0, 2.0 * r + 60.0)
        }
        Shape::Servers { servers } => {
            let s = servers.min(tasks);
            place_rows(&[(0..s).collect(), (s..tasks).collect()], tasks)
        }
        Shape::Layered => place_rows(&layers(tasks, &edges), tasks),
    };
    // Radius: a third of the smallest distance between two placed tasks, within [3, 16].
    let radius = if n > 1 {
        let area = width * height / n as f64;
        (area.sqrt() / 3.2).clamp(3.0, 16.0)
    } else {
        16.0
    };
    Picture {
        width,
        height,
        radius,
        positions,
        edges,
        edges_left_out,
    }
}

/// A tree's rows: leaves spread evenly at the bottom, each parent above the middle of its
/// children, so that the picture reads as a tree.
fn place_tree(rows: &[Vec<TaskId>], tasks: u32) -> (Vec<(f64, f64)>, f64, f64) {
    let Some(last) = rows.last() else {
        return (Vec::new(), 400.0, 200.0);
    };
    if last.len() > MAX_ROW * 2 {
        // Too wide to read as a tree: wrap rows instead.
        return place_rows(rows, tasks);
    }
    let width = (last.len().max(rows.first().map_or(1, Vec::len)) as f64 * 40.0).max(400.0);
    let height = (rows.len() as f64 * 80.0).max(200.0);
    let mut pos = vec![(0.0, 0.0); tasks as usize];
    // Every row spread evenly; then parents centred over their children, bottom up.
    for (i, row) in rows.iter().enumerate() {
        let y = (i as f64 + 0.5) * height / rows.len() as f64;
        for (j, t) in row.iter().enumerate() {
            pos[*t as usize] = ((j as f64 + 0.5) * width / row.len() as f64, y);
        }
    }
    let fanout = if rows.len() > 1 {
        rows[1].len().max(1)
    } else {
        1
    } as u64;
    for row in rows.iter().rev().skip(1) {
        for &t in row {
            let first = t as u64 * fanout + 1;
            let kids: Vec<f64> = (first..first + fanout)
                .filter(|c| *c < tasks as u64)
                .map(|c| pos[c as usize].0)
                .collect();
            if !kids.is_empty() {
                pos[t as usize].0 = kids.iter().sum::<f64>() / kids.len() as f64;
            }
        }
    }
    (pos, width, height)
}

/// The picture as SVG: one `<path>` per link for its edges, one `<g class="task"
/// id="task-<t>" data-task="<t>">` per task with a circle (coloured by the page through the
/// `h-<health>` class it sets) and, for small jobs, the task id.
pub fn svg(p: &Picture) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" id="topology" viewBox="0 0 {:.0} {:.0}" preserveAspectRatio="xMidYMid meet">"#,
        p.width, p.height
    );
    for (i, (name, es)) in p.edges.iter().enumerate() {
        let _ = write!(
            out,
            r#"<path class="edges" data-link="{}" stroke="{}" d=""#,
            escape(name),
            COLOURS[i % COLOURS.len()]
        );
        for &(a, b) in es {
            let (ax, ay) = p.positions[a as usize];
            let (bx, by) = p.positions[b as usize];
            let _ = write!(out, "M{ax:.1} {ay:.1}L{bx:.1} {by:.1}");
        }
        out.push_str(r#""/>"#);
    }
    let labelled = p.positions.len() as u32 <= MAX_LABELLED;
    for (t, (x, y)) in p.positions.iter().enumerate() {
        let _ = write!(
            out,
            r#"<g class="task h-unknown" id="task-{t}" data-task="{t}"><title>task {t}</title><circle cx="{x:.1}" cy="{y:.1}" r="{:.1}"/>"#,
            p.radius
        );
        if labelled {
            let _ = write!(
                out,
                r#"<text x="{x:.1}" y="{y:.1}" dy="0.35em" font-size="{:.1}">{t}</text>"#,
                (p.radius * 0.9).max(6.0)
            );
        }
        out.push_str("</g>");
    }
    out.push_str("</svg>");
    out
}

/// Escapes text for an XML attribute or element.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use taskgraph::topology::{FullMesh, Grid, Ring, Star, Tree};

    fn lay(links: &Links, tasks: u32) -> Picture {
        layout(&links.describe(), links, tasks, 0)
    }

    #[test]
    fn a_tree_is_drawn_as_a_tree() {
        let links = Tree::new(7, 2).map(|t| t.links()).unwrap_or_default();
        assert_eq!(shape_of(&links.describe()), Shape::Tree { fanout: 2 });
        let p = lay(&links, 7);
        let y = |t: usize| p.positions[t].1;
        let x = |t: usize| p.positions[t].0;
        // The root above its children, each child above its own children.
        assert!(y(0) < y(1) && y(1) == y(2) && y(2) < y(3));
        assert!(x(1) < x(0) && x(0) < x(2));
        assert!((x(1) - (x(3) + x(4)) / 2.0).abs() < 1e-6);
        // 6 edges, once each.
        assert_eq!(p.edges.iter().map(|(_, e)| e.len()).sum::<usize>(), 6);
        assert_eq!(p.edges_left_out, 0);
    }

    #[test]
    fn a_ring_is_a_circle_and_a_grid_a_grid() {
        let links = Ring::new(12).map(|r| r.links()).unwrap_or_default();
        let p = lay(&links, 12);
        let (cx, cy) = (p.width / 2.0, p.height / 2.0);
        let d: Vec<f64> = p
            .positions
            .iter()
            .map(|(x, y)| ((x - cx).powi(2) + (y - cy).powi(2)).sqrt())
            .collect();
        assert!(d.iter().all(|r| (r - d[0]).abs() < 1e-6), "{d:?}");
        assert_eq!(p.edges.iter().map(|(_, e)| e.len()).sum::<usize>(), 12);

        let links = Grid::new(3, 4).map(|g| g.links()).unwrap_or_default();
        assert_eq!(shape_of(&links.describe()), Shape::Grid { cols: 4 });
        let p = lay(&links, 12);
        // Row-major: 5 is below 1 and right of 4.
        assert_eq!(p.positions[5].0, p.positions[1].0);
        assert!(p.positions[5].1 > p.positions[1].1);
        assert_eq!(p.positions[5].1, p.positions[4].1);
    }

    #[test]
    fn a_star_has_its_master_in_the_middle_and_unknown_links_are_layered() {
        let links = Star::new(5).map(|s| s.links()).unwrap_or_default();
        let p = lay(&links, 5);
        assert_eq!(p.positions[0], (p.width / 2.0, p.height / 2.0));

        let mut described = BTreeMap::new();
        described.insert("gossip".to_owned(), "my-gossip(fanout=3)".to_owned());
        assert_eq!(shape_of(&described), Shape::Layered);
        let links = Tree::new(7, 2).map(|t| t.links()).unwrap_or_default();
        let p = layout(&described, &links, 7, 0);
        // Rows by distance from task 0: 0 | 1 2 | 3 4 5 6.
        assert!(p.positions[0].1 < p.positions[1].1);
        assert_eq!(p.positions[3].1, p.positions[6].1);
    }

    #[test]
    fn a_thousand_task_mesh_stays_light() {
        let links = FullMesh::new(1000).map(|m| m.links()).unwrap_or_default();
        let p = lay(&links, 1000);
        assert_eq!(p.positions.len(), 1000);
        let drawn: usize = p.edges.iter().map(|(_, e)| e.len()).sum();
        assert_eq!(drawn, MAX_EDGES);
        assert_eq!(drawn + p.edges_left_out, 1000 * 999 / 2);
        let s = svg(&p);
        assert_eq!(s.matches("class=\"task ").count(), 1000);
        assert!(!s.contains("<text"), "no labels for 1,000 tasks");
    }

    #[test]
    fn names_from_outside_are_escaped() {
        assert_eq!(
            escape(r#"<a href="x">&'"#),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        assert_eq!(param("tree(tasks=7,fanout=2)/children", "fanout"), Some(2));
        assert_eq!(param("tree(tasks=7,fanout=two)/children", "fanout"), None);
        assert_eq!(param("garbage", "fanout"), None);
    }
}
