//! A small job end to end on a private etcd: 7 tasks in a binary tree, 2 replicas each plus a
//! spare, 20 epochs driven by task 0, and the primary of task 3 crashed (lease not revoked)
//! along the way. Exits 0 only if every node saw the job finish and every task's primaries
//! entered epochs in increasing order without repeats.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use taskgraph::NodeExit;
use taskgraph_tests::apps::{Behaviour, Event};
use taskgraph_tests::cluster::{fully_staffed, Cluster, ClusterConfig};
use taskgraph_tests::etcd::Etcd;

#[derive(Debug, Parser)]
#[command(about = "Run a small taskgraph job end to end on a private etcd")]
struct Args {
    /// Number of tasks.
    #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u32).range(2..=1000))]
    tasks: u32,
    /// Epochs to run.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(2..))]
    epochs: u64,
    /// Lease TTL in seconds.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=60))]
    ttl_secs: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let start = Instant::now();
    let etcd = Etcd::start().await.map_err(|e| e.to_string())?;
    println!("started a private etcd at {}", etcd.endpoint());
    let mut cfg = ClusterConfig::new(
        etcd.endpoints(),
        &taskgraph_tests::job_name("demo"),
        args.tasks,
        2,
    );
    cfg.ttl = Duration::from_secs(args.ttl_secs);
    cfg.behaviour = Behaviour {
        drive_until: Some(args.epochs),
        all_drive: false,
        pace_ms: 100,
    };
    let nodes = 2 * args.tasks as usize + 1;
    let mut c = Cluster::start(cfg, nodes)
        .await
        .map_err(|e| e.to_string())?;
    let wait = Duration::from_secs(30);
    c.wait_until("every task has a primary and a backup", wait, |s| {
        fully_staffed(args.tasks, 1, s)
    })
    .await?;
    println!("{nodes} nodes: every task has a primary and a backup, one spare waits");
    let victim_task = args.tasks / 2;
    let crash_at = args.epochs / 4;
    c.wait_until("the job reaches the crash epoch", wait, |s| {
        s.iter()
            .any(|(_, s)| s.epoch.is_some_and(|e| e >= crash_at))
    })
    .await?;
    let (victim, old_term) = c.primary_of(victim_task).ok_or("no primary to crash")?;
    let t0 = Instant::now();
    c.crash(victim);
    println!("epoch {crash_at}: crashed the primary of task {victim_task} (term {old_term}), lease not revoked");
    let audit = c.audit.clone();
    let took_over = move || {
        audit.events().iter().any(|(_, e)| matches!(e, Event::Primary { task, term } if *task == victim_task && *term > old_term))
    };
    c.wait_until("a backup takes over", wait, |_| took_over())
        .await?;
    println!(
        "  backup took over after {:?} (lease TTL {} s)",
        t0.elapsed(),
        args.ttl_secs
    );
    for i in 0..c.len() {
        match c.wait(i).await {
            None => {}
            Some(Ok(NodeExit::JobFinished { epoch })) if epoch == args.epochs => {}
            Some(other) => return Err(format!("node {i} ended with {other:?}")),
        }
    }
    let mut entered: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for (_, e) in c.audit.events() {
        if let Event::Enter { task, epoch, .. } = e {
            entered.entry(task).or_default().push(epoch);
        }
    }
    for (task, epochs) in &entered {
        if !epochs.windows(2).all(|w| w[0] < w[1]) || epochs.last() != Some(&args.epochs) {
            return Err(format!("task {task} entered epochs {epochs:?}"));
        }
    }
    println!(
        "job finished at epoch {}: {} tasks entered every epoch in order; {} nodes exited cleanly in {:?}",
        args.epochs,
        entered.len(),
        nodes - 1,
        start.elapsed()
    );
    Ok(())
}
