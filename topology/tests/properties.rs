//! Property tests for every standard topology: the declared links validate, pairs are
//! symmetric, ids are in range, and every task has the expected degree.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use proptest::prelude::*;
use taskgraph_topology::{
    Butterfly, ButterflyStep, Epoch, FullMesh, Grid, Links, ParameterServers, Ring, Star, TaskId,
    Tree,
};

/// Every link's neighbours of every task at every epoch of its period, keyed by link name.
type Snapshot = BTreeMap<String, Vec<Vec<Vec<TaskId>>>>;

/// Checks what the validator checks, independently, and returns the neighbourhoods.
fn check_links(links: &Links, n: u32) -> Snapshot {
    links.validate(n).unwrap();
    let mut snapshot = Snapshot::new();
    for (name, topo) in links.iter() {
        let period = topo.period();
        assert!(period >= 1, "{name}");
        let mut epochs = Vec::new();
        for epoch in 0..period {
            let mut rows = Vec::new();
            for task in 0..n {
                let ns = topo.neighbours(task, epoch);
                assert!(ns.windows(2).all(|w| w[0] < w[1]), "{name}: {task} {ns:?}");
                assert!(
                    ns.iter().all(|&m| m < n && m != task),
                    "{name}: {task} {ns:?}"
                );
                // The neighbourhood repeats every period.
                assert_eq!(ns, topo.neighbours(task, epoch + period), "{name}");
                rows.push(ns);
            }
            epochs.push(rows);
        }
        snapshot.insert(name.to_owned(), epochs);
    }
    for (a, b) in links.pairs() {
        let (sa, sb) = (&snapshot[a], &snapshot[b]);
        let period = sa.len().max(sb.len());
        for epoch in 0..period {
            let (ra, rb) = (&sa[epoch % sa.len()], &sb[epoch % sb.len()]);
            for i in 0..n {
                for j in 0..n {
                    let forward = ra[i as usize].contains(&j);
                    let backward = rb[j as usize].contains(&i);
                    assert_eq!(forward, backward, "{a}/{b} epoch {epoch}: {i} -> {j}");
                }
            }
        }
    }
    snapshot
}

/// Degrees of link `name` at epoch `epoch`.
fn degrees(snapshot: &Snapshot, name: &str, epoch: Epoch) -> Vec<usize> {
    let epochs = &snapshot[name];
    epochs[(epoch % epochs.len() as u64) as usize]
        .iter()
        .map(Vec::len)
        .collect()
}

/// The depth of the deepest task of a complete `fanout`-ary tree of `n` tasks: the number of
/// levels needed to hold `n` tasks, minus one.
fn expected_height(n: u32, fanout: u32) -> u32 {
    let (mut levels, mut capacity, mut level_size) = (0u32, 0u64, 1u64);
    while capacity < u64::from(n) {
        capacity += level_size;
        level_size = level_size.saturating_mul(u64::from(fanout));
        levels += 1;
    }
    levels - 1
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn tree(n in 1u32..300, fanout in 1u32..6) {
        let tree = Tree::new(n, fanout).unwrap();
        let links = tree.links();
        let snap = check_links(&links, n);
        prop_assert_eq!(links.reverse_of("parents"), Some("children"));
        let parents = &snap["parents"][0];
        let children = &snap["children"][0];
        // Exactly one root, task 0; every other task has exactly one parent.
        let roots: Vec<u32> = (0..n).filter(|&t| parents[t as usize].is_empty()).collect();
        prop_assert_eq!(roots, vec![0]);
        prop_assert!(parents.iter().skip(1).all(|p| p.len() == 1));
        // Children degrees: full inner tasks, then at most one partial one, then leaves.
        for t in 0..n {
            let first = u64::from(t) * u64::from(fanout) + 1;
            let expected = u64::from(n).saturating_sub(first).min(u64::from(fanout));
            prop_assert_eq!(children[t as usize].len() as u64, expected);
        }
        prop_assert_eq!(children.iter().map(Vec::len).sum::<usize>(), n as usize - 1);
        // Depth, measured by walking the parents link up to the root.
        let depth = |mut t: u32| {
            let mut d = 0;
            while let Some(&p) = parents[t as usize].first() {
                t = p;
                d += 1;
            }
            d
        };
        let deepest = (0..n).map(depth).max().unwrap();
        prop_assert_eq!(deepest, expected_height(n, fanout));
        prop_assert_eq!(tree.height(), deepest);
        prop_assert!((0..n).all(|t| tree.depth_of(t) == depth(t)));
        if fanout == 1 {
            prop_assert_eq!(deepest, n - 1);
        }
        links.clone().require_connected().validate(n).unwrap();
    }

    #[test]
    fn full_mesh(n in 1u32..40) {
        let links = FullMesh::new(n).unwrap().links();
        let snap = check_links(&links, n);
        prop_assert!(degrees(&snap, "peers", 0).iter().all(|&d| d == n as usize - 1));
        links.require_connected().validate(n).unwrap();
    }

    #[test]
    fn ring(n in 1u32..200) {
        let ring = Ring::new(n).unwrap();
        let snap = check_links(&ring.links(), n);
        let one = usize::from(n > 1);
        prop_assert!(degrees(&snap, "next", 0).iter().all(|&d| d == one));
        prop_assert!(degrees(&snap, "prev", 0).iter().all(|&d| d == one));
        // Following `next` visits every task once and comes back.
        let mut t = 0;
        for step in 1..=n {
            t = ring.next_of(t).unwrap_or(0);
            prop_assert_eq!(t, step % n);
        }
        let both = check_links(&ring.bidirectional_links(), n);
        let expected = (n as usize - 1).min(2);
        prop_assert!(degrees(&both, "neighbours", 0).iter().all(|&d| d == expected));
        ring.links().require_connected().validate(n).unwrap();
        ring.bidirectional_links().require_connected().validate(n).unwrap();
    }

    #[test]
    fn star(n in 1u32..200) {
        let links = Star::new(n).unwrap().links();
        let snap = check_links(&links, n);
        let master = degrees(&snap, "master", 0);
        let workers = degrees(&snap, "workers", 0);
        prop_assert_eq!(master[0], 0);
        prop_assert_eq!(workers[0], n as usize - 1);
        prop_assert!(master[1..].iter().all(|&d| d == 1));
        prop_assert!(workers[1..].iter().all(|&d| d == 0));
        links.require_connected().validate(n).unwrap();
    }

    #[test]
    fn parameter_servers(s in 1u32..20, w in 1u32..40) {
        let ps = ParameterServers::new(s, w).unwrap();
        let n = s + w;
        prop_assert_eq!(ps.num_tasks(), n);
        let links = ps.links();
        let snap = check_links(&links, n);
        let servers = degrees(&snap, "servers", 0);
        let workers = degrees(&snap, "workers", 0);
        for t in 0..n {
            let is_server = t < s;
            prop_assert_eq!(ps.is_server(t), is_server);
            prop_assert_eq!(servers[t as usize], if is_server { 0 } else { s as usize });
            prop_assert_eq!(workers[t as usize], if is_server { w as usize } else { 0 });
        }
        // Servers' neighbours are exactly the workers `s..n`, and vice versa.
        prop_assert_eq!(&snap["workers"][0][0], &(s..n).collect::<Vec<_>>());
        prop_assert_eq!(&snap["servers"][0][n as usize - 1], &(0..s).collect::<Vec<_>>());
        links.require_connected().validate(n).unwrap();
    }

    #[test]
    fn grid(rows in 1u32..15, cols in 1u32..15, torus in any::<bool>()) {
        let grid = if torus { Grid::torus(rows, cols) } else { Grid::new(rows, cols) }.unwrap();
        let n = rows * cols;
        let links = grid.links();
        let snap = check_links(&links, n);
        for t in 0..n {
            let (r, c) = grid.coords_of(t);
            prop_assert_eq!(grid.task_at(r, c), Some(t));
            let wraps_rows = torus && rows > 1;
            let wraps_cols = torus && cols > 1;
            let expected = [
                ("north", r > 0 || wraps_rows, ((r + rows - 1) % rows, c)),
                ("south", r + 1 < rows || wraps_rows, ((r + 1) % rows, c)),
                ("west", c > 0 || wraps_cols, (r, (c + cols - 1) % cols)),
                ("east", c + 1 < cols || wraps_cols, (r, (c + 1) % cols)),
            ];
            for (name, exists, (er, ec)) in expected {
                let ns = &snap[name][0][t as usize];
                if exists {
                    prop_assert_eq!(ns, &vec![er * cols + ec], "{} of {}", name, t);
                } else {
                    prop_assert!(ns.is_empty(), "{} of {}: {:?}", name, t, ns);
                }
            }
        }
        links.require_connected().validate(n).unwrap();
    }

    #[test]
    fn butterfly(n in 1u32..=128) {
        let b = Butterfly::new(n).unwrap();
        let links = b.links();
        let snap = check_links(&links, n);
        let p = b.core();
        prop_assert!(p.is_power_of_two() && p <= n && n < 2 * p);
        let k = u64::from(p.trailing_zeros());
        let period = snap["partner"].len() as u64;
        let r = n - p;
        prop_assert_eq!(period, if r == 0 { k.max(1) } else { k + 2 });
        for epoch in 0..period {
            let d = degrees(&snap, "partner", epoch);
            prop_assert!(d.iter().all(|&x| x <= 1));
            let paired = d.iter().sum::<usize>() as u32;
            match b.step(epoch) {
                ButterflyStep::Idle => prop_assert_eq!(n, 1),
                ButterflyStep::Fold | ButterflyStep::Unfold => {
                    prop_assert_eq!(paired, 2 * r);
                    for t in p..n {
                        prop_assert_eq!(&snap["partner"][epoch as usize][t as usize], &vec![t - p]);
                    }
                }
                ButterflyStep::Exchange { distance } => {
                    prop_assert_eq!(paired, p);
                    for t in 0..p {
                        prop_assert_eq!(b.partner_of(t, epoch), Some(t ^ distance));
                    }
                }
            }
            if r == 0 && n > 1 {
                // The documented rule: t XOR 2^(e mod log2 n).
                for t in 0..n {
                    prop_assert_eq!(b.partner_of(t, epoch), Some(t ^ (1 << (epoch % k))));
                }
            }
        }
        // All-reduce: exchanging with the partner at every epoch of a round gives every task
        // every task's contribution.
        let mut known: Vec<u128> = (0..n).map(|t| 1u128 << t).collect();
        for epoch in 0..period {
            let before = known.clone();
            for t in 0..n {
                if let Some(q) = b.partner_of(t, epoch) {
                    known[t as usize] |= before[q as usize];
                }
            }
        }
        let all = if n == 128 { u128::MAX } else { (1u128 << n) - 1 };
        prop_assert!(known.iter().all(|&k| k == all));
        links.require_connected_over_period().validate(n).unwrap();
    }
}
