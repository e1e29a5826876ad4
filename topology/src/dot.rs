//! Graphviz DOT pictures of a set of links at one epoch.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::{Epoch, Links, TaskId};

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
    to_dot_with(links, num_tasks, epoch, |_| None)
}

/// Renders `links` at `epoch` like [`to_dot`], with extra Graphviz attributes for the node
/// of each task: `node_attrs(task)` returns the text to put between the brackets of the
/// node's statement, e.g. `style=filled, fillcolor="red"`, or `None` (or an empty string)
/// for a plain node. It is called once per task, in ascending order.
///
/// The caller provides valid DOT attribute text: `name=value` items separated by `,` or
/// `;`, where each value is an identifier, a number, a double-quoted string or an HTML
/// string `<…>`. Quote any text that comes from outside (node names, states) with
/// [`dot_quote`]. Attribute text that could end the node's statement, open a comment or
/// otherwise break the syntax (outside strings: any character other than letters, digits,
/// `_`, `.`, `-`, `=`, `,`, `;`, spaces and tabs, or `--`; an unclosed quote or HTML
/// string) is not written: the node is drawn plain, after a comment line saying so, so
/// that one bad value cannot break or alter the rest of the picture.
///
/// ```
/// use taskgraph_topology::{dot_quote, to_dot_with, Ring};
///
/// let links = Ring::new(3)?.links();
/// let primaries = ["n1", "n2 \"old\"", "n1"];
/// let dot = to_dot_with(&links, 3, 0, |task| {
///     let node = primaries.get(task as usize)?;
///     let label = dot_quote(&format!("{task}\nprimary {node}"));
///     Some(if task == 1 {
///         format!("style=filled, fillcolor=red, label={label}")
///     } else {
///         format!("label={label}")
///     })
/// });
/// assert!(dot.contains("  0 [label=\"0\\nprimary n1\"];\n"));
/// assert!(dot.contains(r#"  1 [style=filled, fillcolor=red, label="1\nprimary n2 \"old\""];"#));
/// // Without attributes, the same picture as `to_dot`.
/// assert_eq!(to_dot_with(&links, 3, 0, |_| None), links.to_dot(3, 0));
/// # Ok::<(), taskgraph_topology::TopologyError>(())
/// ```
pub fn to_dot_with(
    links: &Links,
    num_tasks: u32,
    epoch: Epoch,
    mut node_attrs: impl FnMut(TaskId) -> Option<String>,
) -> String {
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
        // A line break in a link name would end the comment.
        let comment: String = description
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        let _ = writeln!(body, "  // {comment}");
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
        match node_attrs(task).filter(|attrs| !attrs.trim().is_empty()) {
            None => {
                let _ = writeln!(out, "  {task};");
            }
            Some(attrs) if is_attribute_list(&attrs) => {
                let _ = writeln!(out, "  {task} [{attrs}];");
            }
            Some(_) => {
                let _ = writeln!(
                    out,
                    "  // task {task}: attributes left out, not a valid DOT attribute list"
                );
                let _ = writeln!(out, "  {task};");
            }
        }
    }
    out.push_str(&body);
    out.push_str("}\n");
    out
}

/// Quotes `text` as a DOT double-quoted string that Graphviz shows as `text` when used as
/// a label (or any other escString attribute: `xlabel`, `tooltip`…): `"` and `\` are
/// escaped, a line break becomes `\n` (a centred line break in the label), a tab a space,
/// and other control characters, which have no place in a label, are removed. The result,
/// quotes included, is a valid attribute value for [`to_dot_with`] whatever `text` holds.
///
/// ```
/// use taskgraph_topology::dot_quote;
///
/// assert_eq!(dot_quote("primary n1"), r#""primary n1""#);
/// assert_eq!(dot_quote("say \"hi\"\nC:\\"), r#""say \"hi\"\nC:\\""#);
/// assert_eq!(dot_quote("a\tb\r\u{0}"), r#""a b""#);
/// assert_eq!(dot_quote("tâche"), r#""tâche""#);
/// ```
pub fn dot_quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '\n' => out.push_str("\\n"),
            '\t' => out.push(' '),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Whether `attrs` is safe between the brackets of a node statement: outside double-quoted
/// and HTML strings, only identifiers, numbers, `=`, `,`, `;`, spaces and tabs (no `--`);
/// every string closed.
fn is_attribute_list(attrs: &str) -> bool {
    let mut chars = attrs.chars();
    let mut previous = ' ';
    while let Some(c) = chars.next() {
        match c {
            '"' => loop {
                match chars.next() {
                    None => return false,
                    Some('"') => break,
                    Some('\\') => {
                        if chars.next().is_none() {
                            return false;
                        }
                    }
                    Some(_) => {}
                }
            },
            '<' => {
                let mut depth = 1usize;
                while depth > 0 {
                    match chars.next() {
                        None => return false,
                        Some('<') => depth += 1,
                        Some('>') => depth -= 1,
                        Some(_) => {}
                    }
                }
            }
            '-' if previous == '-' => return false,
            c if c.is_alphanumeric()
                || matches!(c, '_' | '.' | '-' | '=' | ',' | ';' | ' ' | '\t') => {}
            _ => return false,
        }
        previous = c;
    }
    true
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

    #[test]
    fn node_attributes_are_written_and_unsafe_ones_left_out() -> Result<(), crate::TopologyError> {
        let links = Ring::new(9)?.links();
        let attrs = [
            Some("style=filled, fillcolor=red"),
            Some(r#"label="3\nprimary \"n1\"", tooltip="a]; 8 -> 0; // {x}""#),
            Some("label=<<b>2</b> <i>x</i>>; shape=box"),
            Some("  "),
            None,
            Some("color=red]; 8 -> 0; 0 [color=blue"),
            Some("label=\"unclosed"),
            Some("label=<<b>unclosed</b>"),
            Some("a--b=1"),
        ];
        let dot = to_dot_with(&links, 9, 0, |task| {
            attrs
                .get(task as usize)
                .copied()
                .flatten()
                .map(String::from)
        });
        for line in [
            "  0 [style=filled, fillcolor=red];\n",
            "  1 [label=\"3\\nprimary \\\"n1\\\"\", tooltip=\"a]; 8 -> 0; // {x}\"];\n",
            "  2 [label=<<b>2</b> <i>x</i>>; shape=box];\n",
            "  3;\n",
            "  4;\n",
        ] {
            assert!(dot.contains(line), "{line:?} not in {dot}");
        }
        for task in 5..9 {
            let plain = format!(
                "  // task {task}: attributes left out, not a valid DOT attribute list\n  {task};\n"
            );
            assert!(dot.contains(&plain), "{task}: {dot}");
        }
        // Nothing of the unsafe attributes made it into the output.
        assert!(
            !dot.contains("0 [color=blue") && !dot.contains("unclosed") && !dot.contains("a--b")
        );
        assert_eq!(dot.matches(" -> ").count(), 9 + 1, "{dot}");
        Ok(())
    }

    #[test]
    fn without_attributes_the_output_is_to_dot() -> Result<(), crate::TopologyError> {
        let links = Grid::torus(3, 4)?.links().merge(Tree::new(12, 3)?.links());
        let expected = to_dot(&links, 12, 5);
        assert_eq!(to_dot_with(&links, 12, 5, |_| None), expected);
        assert_eq!(links.to_dot_with(12, 5, |_| Some(String::new())), expected);
        Ok(())
    }

    #[test]
    fn a_line_break_in_a_link_name_stays_in_its_comment() -> Result<(), crate::TopologyError> {
        let links = Links::new().link("a\n}\ndigraph x {", Ring::new(2)?.next());
        let dot = to_dot(&links, 2, 0);
        // In the legend, the name is inside a quoted string, where a line break is valid.
        assert!(
            dot.contains("  // a } digraph x {: blue solid\n  subgraph {\n"),
            "{dot}"
        );
        Ok(())
    }

    #[test]
    fn dot_quote_escapes() {
        for (text, quoted) in [
            ("", r#""""#),
            ("n1", r#""n1""#),
            (r#"a "b" c"#, r#""a \"b\" c""#),
            (r"C:\dir\", r#""C:\\dir\\""#),
            ("\\\"", r#""\\\"""#),
            ("two\nlines\r\n", r#""two\nlines\n""#),
            ("tab\there", r#""tab here""#),
            ("nul\u{0}bell\u{7}del\u{7f}", r#""nulbelldel""#),
            ("]; 0 -> 1; //", r#""]; 0 -> 1; //""#),
            ("tâche ✓", r#""tâche ✓""#),
        ] {
            assert_eq!(dot_quote(text), quoted, "{text:?}");
        }
    }

    #[test]
    fn attribute_lists() {
        for ok in [
            "a=1",
            "a=1, b=2; c=-3.5",
            r##"label="x\"y", color="#ff0000""##,
            r#"label="ends with backslash\\""#,
            "label=<<table><tr><td>x</td></tr></table>>",
            "fillcolor=gray90\tstyle=filled",
            "label=tâche",
        ] {
            assert!(is_attribute_list(ok), "{ok:?}");
        }
        for bad in [
            "a=1]",
            "a=1 [b=2",
            "a={",
            "a=1 }",
            "color=#ff0000",
            "a=1 // comment",
            "a=1 /* comment */",
            "a=1\nb=2",
            "a=1\r",
            "label=\"open",
            r#"label="escaped end\""#,
            r#"label="trailing backslash\"#,
            "label=<<b>x</b>",
            "label=>",
            "a -- b",
            "a->b",
            "a=1:2",
        ] {
            assert!(!is_attribute_list(bad), "{bad:?}");
        }
    }

    proptest::proptest! {
        /// Whatever the text, its quoted form is one safe attribute value on one line, and
        /// undoing the escapes gives the text back (line breaks as `\n`, tabs as spaces,
        /// other control characters removed).
        #[test]
        fn quoted_text_is_always_a_safe_value(text in proptest::prelude::any::<String>()) {
            let quoted = dot_quote(&text);
            let attrs = format!("label={quoted}, x=1");
            proptest::prop_assert!(is_attribute_list(&attrs), "{}", attrs);
            proptest::prop_assert!(!quoted.contains('\n'));
            let inner = &quoted[1..quoted.len() - 1];
            let mut unescaped = String::new();
            let mut chars = inner.chars();
            while let Some(c) = chars.next() {
                match (c, c == '\\') {
                    (_, true) => match chars.next() {
                        Some('n') => unescaped.push('\n'),
                        Some(e) => unescaped.push(e),
                        None => proptest::prop_assert!(false, "dangling backslash"),
                    },
                    (c, false) => {
                        proptest::prop_assert!(c != '"');
                        unescaped.push(c);
                    }
                }
            }
            let expected: String = text
                .chars()
                .filter_map(|c| match c {
                    '\n' => Some('\n'),
                    '\t' => Some(' '),
                    c if c.is_control() => None,
                    c => Some(c),
                })
                .collect();
            proptest::prop_assert_eq!(unescaped, expected);
        }
    }
}
