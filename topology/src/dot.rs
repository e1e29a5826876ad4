//! Graphviz DOT pictures of a set of links at one epoch.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::{Epoch, Links};

/// Edge colours, one per drawn link, in the order of link names.
const COLOURS: [&str; 10] = [
    "blue",
    "red",
    "darkgreen",
    "orange",
    "purple",
    "brown",
    "magenta",
    "gray40",
    "gold3",
    "cyan4",
];
/// Edge styles, changing once every colour has been used.
const STYLES: [&str; 4] = ["solid", "dashed", "dotted", "bold"];

/// How a link is drawn.
enum Role<'a> {
    /// Its edges are drawn as arrows; `Some(reverse)` if it is paired with another link.
    Directed(Option<&'a str>),
    /// Paired with itself: each edge `{i, j}` is drawn once, without arrow.
    Symmetric,
    /// The reverse of a drawn link: not drawn.
    Reverse,
}

/// Renders `links` at `epoch` for tasks `0..num_tasks` as a Graphviz DOT graph.
///
/// Every task is a node, named by its id. Every link gets its own edge colour (and, past ten
/// links, style), listed in the graph's label. A pair `(a, b)` of distinct links (as declared
/// by [`Links::pair`]) is drawn once, as the arrows of `a`; a link paired with itself is
/// drawn with one undirected edge per pair of neighbours; other links are drawn as arrows.
/// The output depends only on the arguments: links in name order, tasks and neighbours in
/// ascending order. Neighbour ids at or above `num_tasks` are left out (validate first).
///
/// A tree of 7 tasks, as declared by [`Tree::links`](crate::Tree::links):
///
/// ```
/// use taskgraph_topology::{to_dot, Tree};
///
/// let links = Tree::new(7, 2)?.links();
/// let expected = r#"digraph topology {
///   graph [label="epoch 0\nchildren (reverse: parents): blue solid", labelloc=t];
///   node [shape=circle];
///   0;
///   1;
///   2;
///   3;
///   4;
///   5;
///   6;
///   // children (reverse: parents): blue solid
///   subgraph {
///     edge [color=blue, style=solid];
///     0 -> 1;
///     0 -> 2;
///     1 -> 3;
///     1 -> 4;
///     2 -> 5;
///     2 -> 6;
///   }
/// }
/// "#;
/// assert_eq!(to_dot(&links, 7, 0), expected);
/// assert_eq!(links.to_dot(7, 0), expected);
/// # Ok::<(), taskgraph_topology::TopologyError>(())
/// ```
///
/// The butterfly of 8 tasks at epoch 0 ([`Butterfly::links`](crate::Butterfly::links)):
///
/// ```
/// use taskgraph_topology::{to_dot, Butterfly};
///
/// let links = Butterfly::new(8)?.links();
/// let expected = r#"digraph topology {
///   graph [label="epoch 0\npartner (symmetric): blue solid", labelloc=t];
///   node [shape=circle];
///   0;
///   1;
///   2;
///   3;
///   4;
///   5;
///   6;
///   7;
///   // partner (symmetric): blue solid
///   subgraph {
///     edge [color=blue, style=solid, dir=none];
///     0 -> 1;
///     2 -> 3;
///     4 -> 5;
///     6 -> 7;
///   }
/// }
/// "#;
/// assert_eq!(to_dot(&links, 8, 0), expected);
/// # Ok::<(), taskgraph_topology::TopologyError>(())
/// ```
pub fn to_dot(links: &Links, num_tasks: u32, epoch: Epoch) -> String {
    // Decide each link's role from the pairs, first declaration first.
    let mut roles: BTreeMap<&str, Role<'_>> = BTreeMap::new();
    for (a, b) in links.pairs() {
        let (a, b) = (a.as_str(), b.as_str());
        if links.get(a).is_none() || links.get(b).is_none() {
            continue;
        }
        if a == b {
            roles.entry(a).or_insert(Role::Symmetric);
        } else if !roles.contains_key(a) && !roles.contains_key(b) {
            roles.insert(a, Role::Directed(Some(b)));
            roles.insert(b, Role::Reverse);
        }
    }

    let mut legend = vec![format!("epoch {epoch}")];
    let mut body = String::new();
    let mut drawn = 0usize;
    for (name, topology) in links.iter() {
        let role = roles.remove(name).unwrap_or(Role::Directed(None));
        let (colour, style) = (
            COLOURS[drawn % COLOURS.len()],
            STYLES[(drawn / COLOURS.len()) % STYLES.len()],
        );
        let description = match role {
            Role::Reverse => continue,
            Role::Directed(None) => format!("{name}: {colour} {style}"),
            Role::Directed(Some(reverse)) => {
                format!("{name} (reverse: {reverse}): {colour} {style}")
            }
            Role::Symmetric => format!("{name} (symmetric): {colour} {style}"),
        };
        drawn += 1;
        legend.push(description.clone());
        let symmetric = matches!(role, Role::Symmetric);
        let _ = writeln!(body, "  // {description}");
        let _ = writeln!(body, "  subgraph {{");
        let dir = if symmetric { ", dir=none" } else { "" };
        let _ = writeln!(body, "    edge [color={colour}, style={style}{dir}];");
        for task in 0..num_tasks {
            for n in topology.neighbours(task, epoch) {
                if n >= num_tasks || (symmetric && n < task) {
                    continue;
                }
                let _ = writeln!(body, "    {task} -> {n};");
            }
        }
        let _ = writeln!(body, "  }}");
    }

    let mut out = String::new();
    let _ = writeln!(out, "digraph topology {{");
    let label: Vec<String> = legend.iter().map(|l| escape(l)).collect();
    let _ = writeln!(
        out,
        "  graph [label=\"{}\", labelloc=t];",
        label.join("\\n")
    );
    let _ = writeln!(out, "  node [shape=circle];");
    for task in 0..num_tasks {
        let _ = writeln!(out, "  {task};");
    }
    out.push_str(&body);
    out.push_str("}\n");
    out
}

/// Escapes a DOT double-quoted string.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '"' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FullMesh, Grid, Ring, Tree};

    #[test]
    fn unpaired_links_are_drawn_as_arrows() -> Result<(), crate::TopologyError> {
        let ring = Ring::new(3)?;
        let links = Links::new().link("a \"quoted\" link", ring.next());
        let dot = to_dot(&links, 3, 0);
        assert!(
            dot.contains("label=\"epoch 0\\na \\\"quoted\\\" link: blue solid\""),
            "{dot}"
        );
        assert!(dot.contains("    2 -> 0;\n"), "{dot}");
        Ok(())
    }

    #[test]
    fn deterministic_and_one_colour_per_drawn_link() -> Result<(), crate::TopologyError> {
        let links = Grid::torus(3, 3)?
            .links()
            .merge(FullMesh::new(9)?.links())
            .merge(Tree::new(9, 3)?.links());
        let dot = to_dot(&links, 9, 0);
        assert_eq!(dot, to_dot(&links, 9, 0));
        // children, east, peers, south drawn; parents, west, north left out.
        for (name, colour) in [
            ("children", "blue"),
            ("east", "red"),
            ("peers", "darkgreen"),
            ("south", "orange"),
        ] {
            assert!(dot.contains(&format!("// {name} ")), "{name}: {dot}");
            assert!(
                dot.contains(&format!(": {colour} solid")),
                "{colour}: {dot}"
            );
        }
        assert!(!dot.contains("// parents"));
        assert_eq!(dot.matches("subgraph").count(), 4);
        // 9 tasks * 8 peers / 2 undirected edges.
        assert_eq!(dot.matches("dir=none").count(), 1);
        Ok(())
    }
}
