//! Neighbours and validation of a 100,000-task binary tree (and, for comparison, other
//! standard topologies of about the same size), timed with `std::time::Instant`.
//!
//! Run with `cargo bench -p taskgraph-topology`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use taskgraph_topology::{Butterfly, Grid, Links, Ring, TopologyError, Tree};

const RUNS: usize = 7;

/// Runs `f` `RUNS` times; returns the fastest and the median time.
fn time<T>(mut f: impl FnMut() -> T) -> (Duration, Duration) {
    let mut times: Vec<Duration> = (0..RUNS)
        .map(|_| {
            let start = Instant::now();
            black_box(f());
            start.elapsed()
        })
        .collect();
    times.sort();
    (times[0], times[RUNS / 2])
}

fn report(what: &str, (min, median): (Duration, Duration)) {
    println!("{what:<62} min {min:>10.3?}  median {median:>10.3?}");
}

/// Every neighbour of every task in every link, over each link's period.
fn all_neighbours(links: &Links, num_tasks: u32) -> usize {
    let mut edges = 0;
    for (_, topology) in links.iter() {
        for epoch in 0..topology.period() {
            for task in 0..num_tasks {
                edges += topology.neighbours(black_box(task), epoch).len();
            }
        }
    }
    edges
}

fn main() -> Result<(), TopologyError> {
    let n = 100_000;
    let tree = Tree::new(n, 2)?;
    let links = tree.links();
    println!("{RUNS} runs each");
    let edges = all_neighbours(&links, n);
    report(
        &format!("tree(100000, 2): all neighbours, both links ({edges} edges)"),
        time(|| all_neighbours(&links, n)),
    );
    report("tree(100000, 2): validate", time(|| links.validate(n)));
    let connected = links.clone().require_connected();
    report(
        "tree(100000, 2): validate + require_connected",
        time(|| connected.validate(n)),
    );
    links.validate(n)?;
    connected.validate(n)?;

    let ring = Ring::new(n)?.links().require_connected();
    report(
        "ring(100000): validate + require_connected",
        time(|| ring.validate(n)),
    );
    let torus = Grid::torus(250, 400)?.links().require_connected();
    report(
        "torus(250x400): validate + require_connected",
        time(|| torus.validate(n)),
    );
    let m = 1 << 17;
    let butterfly = Butterfly::new(m)?.links().require_connected_over_period();
    report(
        "butterfly(131072): validate 17 epochs + connected over period",
        time(|| butterfly.validate(m)),
    );
    Ok(())
}
