//! Rebuilding links from their description (`Links::from_description`): every standard
//! topology round-trips, and garbage from outside is an error, never a panic.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;
use taskgraph_topology::{
    Butterfly, Epoch, FullMesh, Grid, Links, ParameterServers, Ring, Star, TaskId, Topology,
    TopologyError, Tree,
};

/// Epochs at which neighbours are compared, besides two full periods.
const FAR_EPOCHS: [Epoch; 4] = [1 << 20, (1 << 40) + 7, u64::MAX - 1, u64::MAX];

/// Describes `links`, rebuilds them, and checks that the rebuilt links are the same: same
/// description, names, pairs, self links and `to_dot`, and the same neighbours for every
/// task in `0..n` (and a few ids outside) at two periods of epochs and at far epochs.
fn assert_round_trip(links: &Links, n: u32) {
    let described = links.describe();
    let rebuilt = match Links::from_description(&described) {
        Ok(rebuilt) => rebuilt,
        Err(e) => panic!("{described:?}: {e}"),
    };
    assert_eq!(rebuilt.describe(), described);
    assert_eq!(
        rebuilt.names().collect::<Vec<_>>(),
        links.names().collect::<Vec<_>>()
    );
    let sorted = |l: &Links| {
        let mut pairs = l.pairs().to_vec();
        pairs.sort();
        pairs
    };
    assert_eq!(sorted(&rebuilt), sorted(links));
    let tasks: Vec<TaskId> = (0..n).chain([n, n.saturating_add(1), u32::MAX]).collect();
    for (name, original) in links.iter() {
        let copy = rebuilt.get(name).unwrap();
        assert_eq!(copy.period(), original.period(), "{name}");
        assert_eq!(copy.expected_tasks(), original.expected_tasks(), "{name}");
        assert_eq!(
            rebuilt.self_links_allowed(name),
            links.self_links_allowed(name)
        );
        let epochs = (0..2 * original.period() + 1).chain(FAR_EPOCHS);
        for epoch in epochs {
            for &task in &tasks {
                assert_eq!(
                    copy.neighbours(task, epoch),
                    original.neighbours(task, epoch),
                    "{name}: task {task} at epoch {epoch}"
                );
            }
        }
    }
    assert_eq!(rebuilt.to_dot(n, 0), links.to_dot(n, 0));
    assert_eq!(
        rebuilt.validate(n).is_ok(),
        links.validate(n).is_ok(),
        "{described:?}"
    );
}

/// One entry, `link` → `description`.
fn one(link: &str, description: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(link.to_owned(), description.to_owned())])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn tree_round_trips(n in 1u32..200, fanout in 1u32..6) {
        assert_round_trip(&Tree::new(n, fanout).unwrap().links(), n);
    }

    #[test]
    fn full_mesh_round_trips(n in 1u32..40) {
        assert_round_trip(&FullMesh::new(n).unwrap().links(), n);
    }

    #[test]
    fn ring_round_trips(n in 1u32..200) {
        let ring = Ring::new(n).unwrap();
        assert_round_trip(&ring.links(), n);
        assert_round_trip(&ring.bidirectional_links(), n);
        // All three links of a ring in one set.
        assert_round_trip(&ring.links().merge(ring.bidirectional_links()), n);
    }

    #[test]
    fn star_round_trips(n in 1u32..200) {
        assert_round_trip(&Star::new(n).unwrap().links(), n);
    }

    #[test]
    fn parameter_servers_round_trip(servers in 1u32..20, workers in 1u32..40) {
        let ps = ParameterServers::new(servers, workers).unwrap();
        assert_round_trip(&ps.links(), ps.num_tasks());
    }

    #[test]
    fn grid_and_torus_round_trip(rows in 1u32..15, cols in 1u32..15, torus in any::<bool>()) {
        let grid = if torus { Grid::torus(rows, cols) } else { Grid::new(rows, cols) }.unwrap();
        assert_round_trip(&grid.links(), rows * cols);
    }

    #[test]
    fn butterfly_round_trips(n in 1u32..=130) {
        assert_round_trip(&Butterfly::new(n).unwrap().links(), n);
    }

    /// Any map of strings: no panic, and whatever is accepted describes itself as given.
    #[test]
    fn arbitrary_descriptions_never_panic(
        entries in prop::collection::btree_map(
            prop_oneof![any::<String>(), "(pair:|self:)?[a-z]{0,3}"],
            prop_oneof![any::<String>(), "[a-z]{0,5}\\([a-z=0-9,]{0,12}\\)/[a-z]{0,8}"],
            0..6,
        )
    ) {
        let lenient = Links::from_description_lenient(&entries);
        match Links::from_description(&entries) {
            Ok(links) => {
                prop_assert!(lenient.skipped.is_empty());
                prop_assert_eq!(&links.describe(), &entries);
            }
            Err(e) => prop_assert_eq!(lenient.skipped.first(), Some(&e)),
        }
        // What the lenient variant keeps describes itself as the input does.
        for (name, topology) in lenient.links.iter() {
            prop_assert_eq!(Some(&topology.describe()), entries.get(name));
        }
    }

    /// One character deleted, inserted or replaced in a valid description: either an error,
    /// or another valid description that round-trips exactly.
    #[test]
    fn mutated_descriptions_are_refused_or_exact(
        which in 0usize..8,
        position in any::<prop::sample::Index>(),
        edit in 0u8..3,
        c in prop_oneof![Just('0'), Just('9'), Just(','), Just('='), Just('('), Just(')'),
                         Just('/'), Just('a'), Just(' '), Just('é'), any::<char>()],
    ) {
        let valid = [
            "tree(tasks=15,fanout=2)/parents",
            "mesh(tasks=3)/peers",
            "ring(tasks=5)/prev",
            "star(tasks=4)/master",
            "ps(servers=2,workers=3)/workers",
            "grid(rows=2,cols=3)/south",
            "torus(rows=2,cols=3)/west",
            "butterfly(tasks=6)/partner",
        ][which];
        let mut chars: Vec<char> = valid.chars().collect();
        let i = position.index(chars.len() + 1);
        match edit {
            0 if i < chars.len() => { chars.remove(i); }
            1 if i < chars.len() => chars[i] = c,
            _ => chars.insert(i, c),
        }
        let mutated: String = chars.into_iter().collect();
        let entries = one("link", &mutated);
        match Links::from_description(&entries) {
            Ok(links) => prop_assert_eq!(&links.describe(), &entries),
            Err(e) => {
                prop_assert!(e.to_string().contains("\"link\""), "{}", e);
                prop_assert!(matches!(
                    e,
                    TopologyError::InvalidDescription { .. }
                        | TopologyError::UnknownDescription { .. }
                ), "{:?}", e);
            }
        }
    }
}

#[test]
fn every_standard_topology_round_trips_at_fixed_sizes() -> Result<(), TopologyError> {
    for n in [1, 2, 3, 4, 7, 8, 9, 16, 31] {
        assert_round_trip(&Tree::new(n, 2)?.links(), n);
        assert_round_trip(&Tree::new(n, 1)?.links(), n);
        assert_round_trip(&FullMesh::new(n)?.links(), n);
        assert_round_trip(&Ring::new(n)?.links(), n);
        assert_round_trip(&Ring::new(n)?.bidirectional_links(), n);
        assert_round_trip(&Star::new(n)?.links(), n);
        assert_round_trip(&Butterfly::new(n)?.links(), n);
        assert_round_trip(&ParameterServers::new(n, 3)?.links(), n + 3);
        assert_round_trip(&Grid::new(n, 3)?.links(), n * 3);
        assert_round_trip(&Grid::torus(3, n)?.links(), n * 3);
    }
    Ok(())
}

#[test]
fn renamed_merged_and_self_links_round_trip() -> Result<(), TopologyError> {
    let ring = Ring::new(6)?;
    let links = Star::new(6)?
        .links()
        .merge(
            Links::new()
                .link("left", ring.prev())
                .link("right", ring.next())
                .link("à côté", ring.both())
                .pair("right", "left")
                .pair("à côté", "à côté"),
        )
        .merge(Butterfly::new(6)?.links())
        .link("loop", Tree::new(6, 3)?.parents())
        .allow_self_links("loop")
        .allow_self_links("master");
    assert_round_trip(&links, 6);
    let rebuilt = Links::from_description(&links.describe())?;
    assert!(rebuilt.self_links_allowed("loop") && rebuilt.self_links_allowed("master"));
    assert!(!rebuilt.self_links_allowed("left"));
    assert_eq!(rebuilt.reverse_of("left"), Some("right"));
    Ok(())
}

#[test]
fn huge_topologies_round_trip_without_enumerating_tasks() -> Result<(), TopologyError> {
    let links = Tree::new(u32::MAX, 2)?
        .links()
        .merge(Links::new().link("b", Butterfly::new(u32::MAX)?.partner()))
        .merge(Links::new().link("g", Grid::torus(65_535, 65_537)?.east()))
        .merge(Links::new().link("ps", ParameterServers::new(1, u32::MAX - 1)?.servers()));
    let described = links.describe();
    let rebuilt = Links::from_description(&described)?;
    assert_eq!(rebuilt.describe(), described);
    for (name, original) in links.iter() {
        let copy = rebuilt.get(name).unwrap();
        for task in [
            0,
            1,
            2,
            65_536,
            1 << 31,
            u32::MAX - 2,
            u32::MAX - 1,
            u32::MAX,
        ] {
            for epoch in [0, 1, 31, 32, u64::MAX] {
                assert_eq!(
                    copy.neighbours(task, epoch),
                    original.neighbours(task, epoch),
                    "{name}: {task} at {epoch}"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn empty_description_is_no_links() -> Result<(), TopologyError> {
    let links = Links::from_description(&BTreeMap::new())?;
    assert!(links.is_empty());
    assert!(links.describe().is_empty());
    Ok(())
}

#[test]
fn garbage_is_an_error_naming_the_entry() {
    let cases: &[(&str, &str, &str)] = &[
        ("l", "", "is invalid: empty"),
        ("l", "tree(tasks=7,fanout=2)", "expected `)/<link>`"),
        (
            "l",
            "tree(tasks=seven,fanout=2)/children",
            "not a decimal number",
        ),
        ("l", "tree(tasks=7)/children", "expected `fanout=<number>`"),
        (
            "l",
            "tree(fanout=2,tasks=7)/children",
            "expected parameter `tasks`",
        ),
        ("l", "tree(tasks=7,fanout=2,x=1)/children", "expected only"),
        ("l", "ring(tasks=5000000000)/next", "too large"),
        (
            "l",
            "ps(servers=4000000000,workers=4000000000)/servers",
            "too many tasks",
        ),
        ("l", "grid(rows=100000,cols=100000)/east", "too many tasks"),
        ("l", "mesh(tasks=0)/peers", "at least one task"),
        (
            "l",
            "mesh(tasks=03)/peers",
            "canonical form, expected \"mesh(tasks=3)/peers\"",
        ),
        ("l", "mesh(tasks=٣)/peers", "not a decimal number"),
        ("l", "ring(tasks=5)/sideways", "no link \"sideways\""),
        ("l", "star(tasks=5)/master\u{0}", "no link"),
        ("l", "butterfly(tasks=8)/partner ", "no link"),
        ("self:l", "yes", "expected \"allowed\""),
    ];
    for &(key, value, needle) in cases {
        let mut entries = one(key, value);
        if key != "l" {
            entries.insert("l".into(), "ring(tasks=3)/next".into());
        }
        let err = Links::from_description(&entries).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(&err, TopologyError::InvalidDescription { key: k, value: v, .. }
                if k == key && v == value),
            "{value:?}: {err:?}"
        );
        assert!(text.contains(needle), "{value:?}: {needle:?} not in {text}");
        assert!(text.contains(&format!("{key:?}")), "{text}");
    }
}

#[test]
fn unknown_topologies_are_named_with_their_description() {
    for description in [
        "table([[1], [0]])",
        "my-ring(n=3)/next",
        "rings(tasks=3)/next",
        "树(tasks=3)/x",
    ] {
        assert_eq!(
            Links::from_description(&one("custom", description)).unwrap_err(),
            TopologyError::UnknownDescription {
                link: "custom".into(),
                description: description.into(),
            },
            "{description:?}"
        );
    }
    // A standard kind, but malformed.
    for description in ["ring", "ring(", "ring/next"] {
        assert!(
            matches!(
                Links::from_description(&one("custom", description)),
                Err(TopologyError::InvalidDescription { .. })
            ),
            "{description:?}"
        );
    }
}

#[test]
fn bad_keys_pairs_and_self_links() {
    let ring = || one("next", "ring(tasks=3)/next");
    let with = |key: &str, value: &str| {
        let mut entries = ring();
        entries.insert(key.into(), value.into());
        Links::from_description(&entries)
    };
    assert_eq!(
        with("", "ring(tasks=3)/prev").unwrap_err(),
        TopologyError::InvalidLinkName {
            name: String::new(),
            reason: "empty"
        }
    );
    assert_eq!(
        with("pair:next", "prev").unwrap_err(),
        TopologyError::UnknownLinkInPair {
            a: "next".into(),
            b: "prev".into(),
            missing: "prev".into()
        }
    );
    assert_eq!(
        with("pair:", "next").unwrap_err(),
        TopologyError::UnknownLinkInPair {
            a: String::new(),
            b: "next".into(),
            missing: String::new()
        }
    );
    assert_eq!(
        with("self:prev", "allowed").unwrap_err(),
        TopologyError::UnknownLink {
            name: "prev".into(),
            context: "allow_self_links"
        }
    );
    // A non-ASCII link name is a name like any other.
    let links = with("suivant→", "ring(tasks=3)/next").unwrap();
    assert_eq!(links.names().collect::<Vec<_>>(), ["next", "suivant→"]);
}

#[test]
fn lenient_keeps_the_standard_links_and_lists_the_others() -> Result<(), TopologyError> {
    #[derive(Debug)]
    struct Custom;
    impl Topology for Custom {
        fn neighbours(&self, _task: TaskId, _epoch: Epoch) -> Vec<TaskId> {
            Vec::new()
        }
        fn describe(&self) -> String {
            "custom(k=2)/gossip".into()
        }
    }
    let tree = Tree::new(7, 2)?;
    let links = tree
        .links()
        .link("gossip", Arc::new(Custom))
        .link("echo", Arc::new(Custom))
        .pair("gossip", "echo")
        .allow_self_links("gossip");
    let mut described = links.describe();
    described.insert("broken".into(), "star(tasks=x)/master".into());
    described.insert("pair:children2".into(), "ghost".into());

    let rebuilt = Links::from_description_lenient(&described);
    assert_eq!(
        rebuilt.links.describe(),
        tree.links().describe(),
        "the tree, its pair, nothing else"
    );
    assert_eq!(rebuilt.links.to_dot(7, 0), tree.links().to_dot(7, 0));
    let skipped: Vec<String> = rebuilt.skipped.iter().map(ToString::to_string).collect();
    assert_eq!(
        skipped,
        [
            "description entry \"broken\" = \"star(tasks=x)/master\" is invalid: `tasks` is not a decimal number: \"x\"",
            "link \"echo\": \"custom(k=2)/gossip\" does not describe a standard topology",
            "link \"gossip\": \"custom(k=2)/gossip\" does not describe a standard topology",
            "pair (\"children2\", \"ghost\") names undeclared link \"children2\"",
        ]
    );
    // The strict variant fails with the first of them.
    assert_eq!(
        Links::from_description(&described).unwrap_err(),
        rebuilt.skipped[0]
    );
    Ok(())
}
