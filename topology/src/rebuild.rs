//! Rebuilding the links of the standard topologies from their description, as stored in a
//! job spec by [`Links::describe`].
//!
//! A description comes from outside the process (etcd): every malformed entry is an error,
//! never a panic, and an entry is accepted only in the exact form [`Topology::describe`]
//! writes, so that the rebuilt links describe themselves exactly as the input.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::{
    Butterfly, FullMesh, Grid, Links, ParameterServers, Ring, Star, Topology, TopologyError, Tree,
};

/// Prefix of the keys of the pair entries written by [`Links::describe`].
const PAIR: &str = "pair:";
/// Prefix of the keys of the allowed-self-link entries written by [`Links::describe`].
const SELF: &str = "self:";
/// The value of an allowed-self-link entry.
const ALLOWED: &str = "allowed";
/// The kinds of the standard topologies: what their descriptions start with, before `(`.
const KINDS: [&str; 8] = [
    "tree",
    "mesh",
    "ring",
    "star",
    "ps",
    "grid",
    "torus",
    "butterfly",
];

/// What [`Links::from_description_lenient`] could rebuild from a description, and what it
/// left out.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct RebuiltLinks {
    /// The links of standard topologies, with the pairs and allowed self links between
    /// them.
    pub links: Links,
    /// Why each other entry of the description was left out, in the order of the keys, link
    /// entries first: [`TopologyError::UnknownDescription`] for a link of an application's
    /// own topology type, [`TopologyError::InvalidDescription`] for a malformed entry,
    /// [`TopologyError::InvalidLinkName`] for an empty link name,
    /// [`TopologyError::UnknownLinkInPair`] and [`TopologyError::UnknownLink`] for a `pair:`
    /// or `self:` entry naming a link that the description does not have. Pairs and allowed
    /// self links of a link that is itself left out are dropped without an error of their
    /// own.
    pub skipped: Vec<TopologyError>,
}

impl Links {
    /// Rebuilds the links described by `description`, the output of [`Links::describe`]
    /// (e.g. as stored in a job spec): every link of a standard topology ([`Tree`],
    /// [`FullMesh`], [`Ring`], [`Star`], [`ParameterServers`], [`Grid`] and torus,
    /// [`Butterfly`]), under the name it was declared with, and the pairs (`pair:` entries)
    /// and allowed self links (`self:` entries).
    ///
    /// The rebuilt links give the same neighbours as the described ones, for every task and
    /// epoch, and [`Links::describe`] of the result equals `description`. What the
    /// description does not record is not rebuilt: the connectivity requirement
    /// ([`Links::require_connected`]), nor the number of tasks of the job, so call
    /// [`Links::validate`] with it to check that each topology was built for it. A link
    /// whose name starts with `pair:` or `self:` cannot be told apart from such an entry.
    ///
    /// Fails, with the first problem in the order of the keys (link entries first), if an
    /// entry cannot be rebuilt; see [`RebuiltLinks::skipped`] for the errors. An application's
    /// own [`Topology`] gives [`TopologyError::UnknownDescription`]: to draw the links that
    /// can be rebuilt anyway, use [`Links::from_description_lenient`].
    ///
    /// ```
    /// use taskgraph_topology::{Links, Tree, TopologyError};
    ///
    /// // The description a job spec holds.
    /// let described = Tree::new(7, 2)?.links().allow_self_links("parents").describe();
    /// assert_eq!(described["children"], "tree(tasks=7,fanout=2)/children");
    /// assert_eq!(described["pair:children"], "parents");
    ///
    /// let links = Links::from_description(&described)?;
    /// links.validate(7)?;
    /// assert_eq!(links.describe(), described);
    /// assert_eq!(links.reverse_of("parents"), Some("children"));
    /// assert_eq!(links.get("children").map(|c| c.neighbours(1, 0)), Some(vec![3, 4]));
    ///
    /// // Garbage from outside is an error naming the entry.
    /// let mut garbage = described.clone();
    /// garbage.insert("children".into(), "tree(tasks=7,fanout=two)/children".into());
    /// let err = Links::from_description(&garbage).unwrap_err();
    /// assert!(matches!(err, TopologyError::InvalidDescription { ref key, .. } if key == "children"));
    /// # Ok::<(), TopologyError>(())
    /// ```
    pub fn from_description(
        description: &BTreeMap<String, String>,
    ) -> Result<Links, TopologyError> {
        let RebuiltLinks { links, skipped } = Self::from_description_lenient(description);
        match skipped.into_iter().next() {
            Some(error) => Err(error),
            None => Ok(links),
        }
    }

    /// Rebuilds what [`Links::from_description`] can and lists what it cannot, instead of
    /// failing: for a tool that draws a job's links, some of which may be of an
    /// application's own topology type. Never fails and never panics, whatever the input.
    ///
    /// ```
    /// use taskgraph_topology::{Links, Ring, TopologyError};
    ///
    /// let mut described = Ring::new(4)?.links().describe();
    /// described.insert("gossip".into(), "my-gossip(fanout=3)".into());
    ///
    /// let rebuilt = Links::from_description_lenient(&described);
    /// assert_eq!(rebuilt.links.names().collect::<Vec<_>>(), ["next", "prev"]);
    /// assert_eq!(rebuilt.links.reverse_of("next"), Some("prev"));
    /// assert_eq!(
    ///     rebuilt.skipped,
    ///     [TopologyError::UnknownDescription {
    ///         link: "gossip".into(),
    ///         description: "my-gossip(fanout=3)".into(),
    ///     }]
    /// );
    /// assert_eq!(
    ///     Links::from_description(&described).unwrap_err().to_string(),
    ///     r#"link "gossip": "my-gossip(fanout=3)" does not describe a standard topology"#
    /// );
    /// # Ok::<(), TopologyError>(())
    /// ```
    pub fn from_description_lenient(description: &BTreeMap<String, String>) -> RebuiltLinks {
        let mut links = Links::new();
        let mut skipped = Vec::new();
        // Every link the description has, rebuilt or not.
        let mut described: BTreeSet<&str> = BTreeSet::new();
        let mut pairs: Vec<(&str, &str)> = Vec::new();
        let mut self_links: Vec<(&str, &str, &str)> = Vec::new();
        for (key, value) in description {
            if let Some(a) = key.strip_prefix(PAIR) {
                pairs.push((a, value));
                continue;
            }
            if let Some(name) = key.strip_prefix(SELF) {
                self_links.push((key, name, value));
                continue;
            }
            if key.is_empty() {
                skipped.push(TopologyError::InvalidLinkName {
                    name: key.clone(),
                    reason: "empty",
                });
                continue;
            }
            described.insert(key);
            match rebuild(value) {
                Ok(topology) => links = links.link(key.clone(), topology),
                Err(Refusal::Unknown) => skipped.push(TopologyError::UnknownDescription {
                    link: key.clone(),
                    description: value.clone(),
                }),
                Err(Refusal::Invalid(reason)) => skipped.push(TopologyError::InvalidDescription {
                    key: key.clone(),
                    value: value.clone(),
                    reason,
                }),
            }
        }
        for (a, b) in pairs {
            if links.get(a).is_some() && links.get(b).is_some() {
                links = links.pair(a, b);
            } else if let Some(missing) = [a, b].into_iter().find(|l| !described.contains(l)) {
                skipped.push(TopologyError::UnknownLinkInPair {
                    a: a.to_owned(),
                    b: b.to_owned(),
                    missing: missing.to_owned(),
                });
            }
        }
        for (key, name, value) in self_links {
            if value != ALLOWED {
                skipped.push(TopologyError::InvalidDescription {
                    key: key.to_owned(),
                    value: value.to_owned(),
                    reason: format!("expected {ALLOWED:?}"),
                });
            } else if links.get(name).is_some() {
                links = links.allow_self_links(name);
            } else if !described.contains(name) {
                skipped.push(TopologyError::UnknownLink {
                    name: name.to_owned(),
                    context: "allow_self_links",
                });
            }
        }
        RebuiltLinks { links, skipped }
    }
}

/// Why a link description was not rebuilt.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    /// Not a standard topology.
    Unknown,
    /// A standard topology, but malformed: what is wrong.
    Invalid(String),
}

fn invalid<T>(reason: impl Into<String>) -> Result<T, Refusal> {
    Err(Refusal::Invalid(reason.into()))
}

/// Rebuilds one link from its [`Topology::describe`]: `<kind>(<name>=<value>,…)/<link>`.
fn rebuild(description: &str) -> Result<Arc<dyn Topology>, Refusal> {
    if description.is_empty() {
        return invalid("empty");
    }
    // `find` returns a character boundary, so `split_at` cannot panic.
    let kind_end = description.find(['(', '/']).unwrap_or(description.len());
    let (kind, rest) = description.split_at(kind_end);
    if !KINDS.contains(&kind) {
        return Err(Refusal::Unknown);
    }
    let Some(rest) = rest.strip_prefix('(') else {
        return invalid(format!("expected `(` after `{kind}`"));
    };
    let Some((params, link)) = rest.split_once(")/") else {
        return invalid("expected `)/<link>` after the parameters");
    };
    let built = |e: TopologyError| Refusal::Invalid(e.to_string());
    let topology = match kind {
        "tree" => {
            let [tasks, fanout] = parameters(params, ["tasks", "fanout"])?;
            let tree = Tree::new(tasks, fanout).map_err(built)?;
            pick(
                kind,
                link,
                [
                    (Tree::PARENTS, tree.parents()),
                    (Tree::CHILDREN, tree.children()),
                ],
            )?
        }
        "mesh" => {
            let [tasks] = parameters(params, ["tasks"])?;
            let mesh = FullMesh::new(tasks).map_err(built)?;
            pick(kind, link, [(FullMesh::PEERS, mesh.peers())])?
        }
        "ring" => {
            let [tasks] = parameters(params, ["tasks"])?;
            let ring = Ring::new(tasks).map_err(built)?;
            pick(
                kind,
                link,
                [
                    (Ring::PREV, ring.prev()),
                    (Ring::NEXT, ring.next()),
                    (Ring::NEIGHBOURS, ring.both()),
                ],
            )?
        }
        "star" => {
            let [tasks] = parameters(params, ["tasks"])?;
            let star = Star::new(tasks).map_err(built)?;
            pick(
                kind,
                link,
                [
                    (Star::MASTER, star.master()),
                    (Star::WORKERS, star.workers()),
                ],
            )?
        }
        "ps" => {
            let [servers, workers] = parameters(params, ["servers", "workers"])?;
            let ps = ParameterServers::new(servers, workers).map_err(built)?;
            pick(
                kind,
                link,
                [
                    (ParameterServers::SERVERS, ps.servers()),
                    (ParameterServers::WORKERS, ps.workers()),
                ],
            )?
        }
        "grid" | "torus" => {
            let [rows, cols] = parameters(params, ["rows", "cols"])?;
            let grid = if kind == "torus" {
                Grid::torus(rows, cols)
            } else {
                Grid::new(rows, cols)
            }
            .map_err(built)?;
            pick(
                kind,
                link,
                [
                    (Grid::NORTH, grid.north()),
                    (Grid::SOUTH, grid.south()),
                    (Grid::EAST, grid.east()),
                    (Grid::WEST, grid.west()),
                ],
            )?
        }
        "butterfly" => {
            let [tasks] = parameters(params, ["tasks"])?;
            let butterfly = Butterfly::new(tasks).map_err(built)?;
            pick(kind, link, [(Butterfly::PARTNER, butterfly.partner())])?
        }
        _ => return Err(Refusal::Unknown),
    };
    // The parser is strict, but only this guarantees the round trip (e.g. `tasks=07`).
    let canonical = topology.describe();
    if canonical != description {
        return invalid(format!("not in canonical form, expected {canonical:?}"));
    }
    Ok(topology)
}

/// The values of the comma-separated `name=value` parameters `text`, which must be exactly
/// `names`, in this order.
fn parameters<const N: usize>(text: &str, names: [&str; N]) -> Result<[u32; N], Refusal> {
    let mut values = [0; N];
    let mut parts = text.split(',');
    for (value, name) in values.iter_mut().zip(names) {
        let Some((key, text)) = parts.next().and_then(|part| part.split_once('=')) else {
            return invalid(format!("expected `{name}=<number>`"));
        };
        if key != name {
            return invalid(format!("expected parameter `{name}`, found {key:?}"));
        }
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            return invalid(format!("`{name}` is not a decimal number: {text:?}"));
        }
        let Ok(parsed) = text.parse() else {
            return invalid(format!("`{name}` is too large: {text}"));
        };
        *value = parsed;
    }
    if parts.next().is_some() {
        return invalid(format!("expected only the parameters {names:?}"));
    }
    Ok(values)
}

/// The topology named `link` among the links of a `kind` of topology.
fn pick<const N: usize>(
    kind: &str,
    link: &str,
    links: [(&str, Arc<dyn Topology>); N],
) -> Result<Arc<dyn Topology>, Refusal> {
    let names: Vec<&str> = links.iter().map(|(name, _)| *name).collect();
    match links.into_iter().find(|(name, _)| *name == link) {
        Some((_, topology)) => Ok(topology),
        None => invalid(format!("`{kind}` has no link {link:?}, only {names:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(description: &str) -> Refusal {
        match rebuild(description) {
            Ok(topology) => panic!("{description:?} rebuilt as {topology:?}"),
            Err(refusal) => refusal,
        }
    }

    fn reason(description: &str) -> String {
        match refusal(description) {
            Refusal::Invalid(reason) => reason,
            Refusal::Unknown => panic!("{description:?} refused as unknown"),
        }
    }

    #[test]
    fn every_kind_is_rebuilt() {
        for description in [
            "tree(tasks=7,fanout=2)/children",
            "mesh(tasks=3)/peers",
            "ring(tasks=5)/neighbours",
            "star(tasks=4)/workers",
            "ps(servers=2,workers=3)/servers",
            "grid(rows=2,cols=3)/east",
            "torus(rows=2,cols=3)/north",
            "butterfly(tasks=6)/partner",
        ] {
            let kind = description.split('(').next().unwrap_or_default();
            assert!(KINDS.contains(&kind), "{kind}");
            match rebuild(description) {
                Ok(topology) => assert_eq!(topology.describe(), description),
                Err(refusal) => panic!("{description:?}: {refusal:?}"),
            }
        }
    }

    #[test]
    fn unknown_kinds() {
        for description in [
            "my-topology(x=1)",
            "Tree(tasks=7,fanout=2)/children",
            "trees(tasks=7,fanout=2)/children",
            " tree(tasks=7,fanout=2)/children",
            "árbol(tasks=7)/children",
            "(tasks=7)/children",
            "/children",
        ] {
            assert_eq!(refusal(description), Refusal::Unknown, "{description:?}");
        }
    }

    #[test]
    fn malformed_standard_descriptions() {
        for (description, needle) in [
            ("", "empty"),
            ("tree", "expected `(` after `tree`"),
            ("tree/children", "expected `(` after `tree`"),
            ("tree(tasks=7,fanout=2)", "expected `)/<link>`"),
            ("tree(tasks=7,fanout=2)children", "expected `)/<link>`"),
            ("tree(tasks=7)/children", "expected `fanout=<number>`"),
            ("tree()/children", "expected `tasks=<number>`"),
            (
                "tree(fanout=2,tasks=7)/children",
                "expected parameter `tasks`",
            ),
            ("tree(tasks=7,fanout=2,depth=3)/children", "expected only"),
            ("tree(tasks=,fanout=2)/children", "not a decimal number"),
            ("tree(tasks=-7,fanout=2)/children", "not a decimal number"),
            ("tree(tasks=+7,fanout=2)/children", "not a decimal number"),
            ("tree(tasks=7 ,fanout=2)/children", "not a decimal number"),
            ("tree(tasks=٧,fanout=2)/children", "not a decimal number"),
            ("tree(tasks=4294967296,fanout=2)/children", "too large"),
            (
                "tree(tasks=99999999999999999999999999,fanout=2)/children",
                "too large",
            ),
            ("tree(tasks=07,fanout=2)/children", "canonical"),
            ("tree(tasks=7,fanout=2)/children/", "no link"),
            ("tree(tasks=7,fanout=2)/Children", "no link"),
            ("tree(tasks=7,fanout=2)/", "no link"),
            ("tree(tasks=0,fanout=2)/children", "at least one task"),
            ("tree(tasks=7,fanout=0)/children", "fanout"),
            ("ps(servers=4294967295,workers=1)/servers", "too many tasks"),
            ("grid(rows=65536,cols=65536)/east", "too many tasks"),
            ("torus(rows=0,cols=3)/east", "at least 1"),
            ("ring(tasks=5)/next)/prev", "no link"),
            ("mesh(tasks=3)/peers\n", "no link"),
        ] {
            let reason = reason(description);
            assert!(reason.contains(needle), "{description:?}: {reason}");
        }
    }

    #[test]
    fn parameters_are_checked_in_order() {
        assert_eq!(parameters("a=1,b=2", ["a", "b"]), Ok([1, 2]));
        assert_eq!(parameters("a=4294967295", ["a"]), Ok([u32::MAX]));
        assert!(parameters("a=1", ["a", "b"]).is_err());
        assert!(parameters("b=2,a=1", ["a", "b"]).is_err());
        assert!(parameters("a=1,", ["a"]).is_err());
        assert!(parameters("a==1", ["a"]).is_err());
    }
}
