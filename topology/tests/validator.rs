//! The validator refuses broken topologies with an error naming the offender.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use taskgraph_topology::{
    Butterfly, Epoch, Links, Ring, Star, TaskId, Topology, TopologyError, Tree,
};

/// A hand-written topology: `table[epoch % period][task]` are the neighbours, as written
/// (possibly unsorted, out of range, or asymmetric on purpose).
#[derive(Debug)]
struct Table(Vec<Vec<Vec<TaskId>>>);

impl Table {
    fn fixed(rows: &[&[TaskId]]) -> Arc<dyn Topology> {
        Arc::new(Table(vec![rows.iter().map(|r| r.to_vec()).collect()]))
    }
    fn by_epoch(epochs: &[&[&[TaskId]]]) -> Arc<dyn Topology> {
        Arc::new(Table(
            epochs
                .iter()
                .map(|e| e.iter().map(|r| r.to_vec()).collect())
                .collect(),
        ))
    }
}

impl Topology for Table {
    fn neighbours(&self, task: TaskId, epoch: Epoch) -> Vec<TaskId> {
        let rows = &self.0[(epoch % self.0.len() as u64) as usize];
        rows.get(task as usize).cloned().unwrap_or_default()
    }
    fn describe(&self) -> String {
        format!("table({:?})", self.0)
    }
    fn period(&self) -> u64 {
        self.0.len() as u64
    }
}

/// Asserts that `links.validate(num_tasks)` fails with a message containing every needle.
fn refused(links: &Links, num_tasks: u32, needles: &[&str]) -> TopologyError {
    let err = links.validate(num_tasks).unwrap_err();
    let text = err.to_string();
    for needle in needles {
        assert!(text.contains(needle), "{needle:?} not in {text:?}");
    }
    err
}

#[test]
fn out_of_range_neighbour() {
    let links = Links::new().link("up", Table::fixed(&[&[1], &[2], &[5]]));
    let err = refused(
        &links,
        3,
        &["\"up\"", "task 2", "epoch 0", "neighbour 5", "only 3 tasks"],
    );
    assert_eq!(
        err,
        TopologyError::OutOfRange {
            link: "up".into(),
            task: 2,
            epoch: 0,
            neighbour: 5,
            num_tasks: 3
        }
    );
}

#[test]
fn out_of_range_at_a_later_epoch() {
    let links = Links::new().link(
        "hop",
        Table::by_epoch(&[&[&[1], &[0]], &[&[1], &[0]], &[&[1], &[2]]]),
    );
    refused(&links, 2, &["\"hop\"", "task 1", "epoch 2", "neighbour 2"]);
}

#[test]
fn asymmetric_pair() {
    // `down` has 0 -> 2 at epoch 1, but `up` does not have 2 -> 0 then.
    let down = Table::by_epoch(&[&[&[1, 2], &[], &[]], &[&[1, 2], &[], &[]]]);
    let up = Table::by_epoch(&[&[&[], &[0], &[0]], &[&[], &[0], &[]]]);
    let links = Links::new()
        .link("down", down)
        .link("up", up)
        .pair("down", "up");
    let err = refused(
        &links,
        3,
        &["\"down\"", "\"up\"", "epoch 1", "task 0", "has 2"],
    );
    assert_eq!(
        err,
        TopologyError::Asymmetric {
            link: "down".into(),
            reverse: "up".into(),
            task: 0,
            neighbour: 2,
            epoch: 1
        }
    );
}

#[test]
fn asymmetric_in_the_reverse_direction() {
    // Every edge of `a` is in `b` reversed, but `b` has an extra edge 2 -> 1.
    let a = Table::fixed(&[&[1], &[], &[]]);
    let b = Table::fixed(&[&[], &[0], &[1]]);
    let links = Links::new().link("a", a).link("b", b).pair("a", "b");
    refused(&links, 3, &["\"b\"", "\"a\"", "task 2 has 1", "epoch 0"]);
}

#[test]
fn asymmetric_self_paired_link() {
    let links = Links::new()
        .link("peers", Table::fixed(&[&[1, 2], &[0], &[]]))
        .pair("peers", "peers");
    refused(&links, 3, &["\"peers\"", "task 0 has 2", "epoch 0"]);
}

#[test]
fn pair_checked_over_the_lcm_of_periods() {
    // `a` has 0 -> 1 at even epochs; `b` has 1 -> 0 at epochs 0 and 2 mod 3. They agree at
    // epochs 0, 1 and 2, and first disagree at epoch 3.
    let a = Table::by_epoch(&[&[&[1], &[]], &[&[], &[]]]);
    let b = Table::by_epoch(&[&[&[], &[0]], &[&[], &[]], &[&[], &[0]]]);
    let links = Links::new().link("a", a).link("b", b).pair("a", "b");
    refused(&links, 2, &["\"b\"", "task 1 has 0", "epoch 3"]);
}

#[test]
fn self_link() {
    let links = Links::new().link("loop", Table::fixed(&[&[1], &[0], &[1, 2]]));
    let err = refused(
        &links,
        3,
        &["\"loop\"", "task 2", "epoch 0", "its own neighbour"],
    );
    assert_eq!(
        err,
        TopologyError::SelfLink {
            link: "loop".into(),
            task: 2,
            epoch: 0
        }
    );
    links.clone().allow_self_links("loop").validate(3).unwrap();
    assert!(links.allow_self_links("loop").self_links_allowed("loop"));
}

#[test]
fn unsorted_neighbours() {
    let links = Links::new().link("mess", Table::fixed(&[&[2, 1], &[], &[]]));
    refused(
        &links,
        3,
        &[
            "\"mess\"",
            "task 0",
            "epoch 0",
            "[2, 1]",
            "not strictly ascending",
        ],
    );
}

#[test]
fn duplicate_neighbours() {
    let links = Links::new().link("twice", Table::fixed(&[&[], &[0, 0]]));
    refused(&links, 2, &["\"twice\"", "task 1", "epoch 0", "[0, 0]"]);
}

#[test]
fn pair_naming_an_undeclared_link() {
    let links = Tree::new(3, 2).unwrap().links().pair("children", "kids");
    let err = refused(
        &links,
        3,
        &["\"children\"", "\"kids\"", "undeclared link \"kids\""],
    );
    assert!(matches!(err, TopologyError::UnknownLinkInPair { missing, .. } if missing == "kids"));
    let links = Tree::new(3, 2).unwrap().links().pair("kids", "parents");
    refused(&links, 3, &["undeclared link \"kids\""]);
}

#[test]
fn self_links_allowed_on_an_undeclared_link() {
    let links = Tree::new(3, 2).unwrap().links().allow_self_links("loops");
    refused(
        &links,
        3,
        &["allow_self_links", "undeclared link \"loops\""],
    );
}

#[test]
fn bad_link_names() {
    let tree = Tree::new(3, 2).unwrap();
    refused(
        &tree.links().link("children", tree.children()),
        3,
        &["\"children\"", "twice"],
    );
    refused(
        &Links::new().link("", tree.children()),
        3,
        &["\"\"", "empty"],
    );
}

#[test]
fn no_tasks() {
    assert_eq!(Links::new().validate(0), Err(TopologyError::NoTasks));
}

#[test]
fn topology_built_for_another_task_count() {
    let links = Tree::new(7, 2).unwrap().links();
    refused(&links, 8, &["\"children\"", "7 tasks", "8 tasks"]);
}

#[test]
fn disconnected_task() {
    // Tasks 0..3 are a chain, task 3 is alone.
    let next = Table::fixed(&[&[1], &[2], &[], &[]]);
    let prev = Table::fixed(&[&[], &[0], &[1], &[]]);
    let links = Links::new()
        .link("next", next)
        .link("prev", prev)
        .pair("next", "prev");
    links.validate(4).unwrap();
    let links = links.require_connected();
    let err = refused(
        &links,
        4,
        &["task 3", "not reachable", "\"next\"", "\"prev\"", "epoch 0"],
    );
    assert_eq!(
        err,
        TopologyError::Disconnected {
            task: 3,
            links: vec!["next".into(), "prev".into()],
            first_epoch: 0,
            last_epoch: 0
        }
    );
}

#[test]
fn connectivity_follows_edges_backwards() {
    // Only edges towards task 0: still connected.
    let links = Links::new()
        .link("up", Table::fixed(&[&[], &[0], &[1]]))
        .require_connected();
    links.validate(3).unwrap();
}

#[test]
fn connectivity_over_the_period() {
    let butterfly = Butterfly::new(8).unwrap();
    // At epoch 0 the butterfly is four separate pairs; over its period it is a hypercube.
    refused(
        &butterfly.links().require_connected(),
        8,
        &["task 2", "\"partner\"", "at epoch 0"],
    );
    butterfly
        .links()
        .require_connected_over_period()
        .validate(8)
        .unwrap();
    // Epoch-0 connectivity is the stronger requirement and wins.
    let both = butterfly
        .links()
        .require_connected_over_period()
        .require_connected();
    assert!(both.validate(8).is_err());
    // Over the period, an isolated task is named with the epochs searched.
    let links = Links::new()
        .link(
            "hop",
            Table::by_epoch(&[&[&[1], &[0], &[]], &[&[], &[], &[]]]),
        )
        .require_connected_over_period();
    refused(&links, 3, &["task 2", "\"hop\"", "over epochs 0..=1"]);
}

#[test]
fn every_standard_topology_is_connected() {
    Tree::new(100, 3)
        .unwrap()
        .links()
        .require_connected()
        .validate(100)
        .unwrap();
    Ring::new(100)
        .unwrap()
        .links()
        .require_connected()
        .validate(100)
        .unwrap();
    Star::new(100)
        .unwrap()
        .links()
        .require_connected()
        .validate(100)
        .unwrap();
}

#[test]
fn merged_links_keep_pairs_and_requirements() {
    let tree = Tree::new(4, 2).unwrap().links();
    let other = Links::new()
        .link("alone", Table::fixed(&[&[], &[], &[], &[]]))
        .require_connected();
    let merged = tree.merge(other);
    assert_eq!(merged.len(), 3);
    assert_eq!(merged.reverse_of("parents"), Some("children"));
    assert_eq!(merged.reverse_of("alone"), None);
    merged.validate(4).unwrap();
    let clash = Tree::new(4, 2)
        .unwrap()
        .links()
        .merge(Tree::new(4, 2).unwrap().links());
    refused(&clash, 4, &["\"children\"", "declared twice"]);
}

#[test]
fn describe_is_stable() {
    let links = Tree::new(15, 2)
        .unwrap()
        .links()
        .allow_self_links("parents");
    let described: Vec<(String, String)> = links.describe().into_iter().collect();
    assert_eq!(
        described,
        vec![
            ("children".into(), "tree(tasks=15,fanout=2)/children".into()),
            ("pair:children".into(), "parents".into()),
            ("parents".into(), "tree(tasks=15,fanout=2)/parents".into()),
            ("self:parents".into(), "allowed".into()),
        ]
    );
}

#[test]
fn validates_a_big_tree() {
    let n = 100_000;
    Tree::new(n, 2)
        .unwrap()
        .links()
        .require_connected()
        .validate(n)
        .unwrap();
}
