//! Measures failover time on a private etcd: a task with one backup, and its primary taken
//! away. Prints median, min and max over the trials. Figures are printed, never asserted.
//!
//! Default mode, in-process nodes: (a) the primary crashed without revoking its lease, (b) the
//! primary stopped cleanly.
//!
//! `cargo run --release -p taskgraph-tests --bin failover_bench -- --trials 20 --ttl-secs 1`
//!
//! `--processes`: every trial starts a fresh job of 1 task × 2 replicas as two `testnode` child
//! processes, waits until one is primary and the other its backup, then a random 200–700 ms,
//! kills the primary with SIGKILL (its lease stays in etcd), and times from just before the
//! signal to the backup's status line saying it acts as primary with a higher term. The
//! `testnode` binary is looked up next to this executable (`--testnode` overrides);
//! `cargo run --bin failover_bench` does not build it, so build both first:
//!
//! `cargo build -p taskgraph-tests --bins && cargo run -p taskgraph-tests --bin failover_bench -- --processes --trials 20 --ttl-secs 5`

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use taskgraph_tests::cluster::{fully_staffed, Cluster, ClusterConfig};
use taskgraph_tests::etcd::Etcd;
use taskgraph_tests::process::{Line, NodeArgs, ProcessNode, StatusLine};

#[derive(Debug, Parser)]
struct Args {
    /// Trials per kind of failure.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    trials: u32,
    /// Lease TTL in seconds (default: 1 with in-process nodes, 5 with `--processes`).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=60))]
    ttl_secs: Option<u64>,
    /// Nodes as `testnode` processes; the failure is a kill -9 of the primary's process.
    #[arg(long)]
    processes: bool,
    /// The `testnode` binary (default: next to this executable).
    #[arg(long)]
    testnode: Option<PathBuf>,
}

fn summary(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    if let (Some(min), Some(max)) = (v.first(), v.last()) {
        println!(
            "{name:<28} n={:<3} median {:>8.1} ms   min {:>8.1} ms   max {:>8.1} ms",
            v.len(),
            ms(v[v.len() / 2]),
            ms(*min),
            ms(*max)
        );
    }
}

async fn trial(etcd: &Etcd, ttl: Duration, crash: bool) -> Result<Duration, String> {
    let mut cfg = ClusterConfig::new(etcd.endpoints(), &taskgraph_tests::job_name("bench"), 1, 2);
    cfg.ttl = ttl;
    let mut c = Cluster::start(cfg, 2).await.map_err(|e| e.to_string())?;
    let wait = Duration::from_secs(30) + ttl * 2;
    c.wait_until("staffed", wait, |s| fully_staffed(1, 1, s))
        .await?;
    let (victim, old) = c.primary_of(0).ok_or("no primary")?;
    let t0 = Instant::now();
    if crash {
        c.crash(victim);
    } else {
        let _ = c.stop(victim).await;
    }
    c.wait_until("backup primary", wait, |s| {
        s.iter()
            .any(|(_, s)| s.primary_of(0).is_some_and(|t| t > old))
    })
    .await?;
    let took = t0.elapsed();
    c.stop_all().await;
    Ok(took)
}

/// The `testnode` binary: `--testnode`, or the one next to this executable (both are built
/// into the same target folder).
fn testnode_path(args: &Args) -> Result<PathBuf, String> {
    if let Some(p) = &args.testnode {
        return Ok(p.clone());
    }
    let me = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
    let path = me.with_file_name(format!("testnode{}", std::env::consts::EXE_SUFFIX));
    if !path.is_file() {
        return Err(format!(
            "no testnode binary at {}: build it with `cargo build -p taskgraph-tests --bin \
             testnode` (same profile), or pass --testnode",
            path.display()
        ));
    }
    Ok(path)
}

fn last_status(lines: &[Line]) -> Option<&StatusLine> {
    lines.iter().rev().find_map(|l| match l {
        Line::Status(s) => Some(s),
        _ => None,
    })
}

/// One trial with nodes as processes: two `testnode`s of a fresh job, the primary killed with
/// SIGKILL; the time from the signal to the backup's status line saying it acts as primary.
async fn process_trial(etcd: &Etcd, bin: &str, ttl_secs: u64) -> Result<Duration, String> {
    let args = NodeArgs {
        etcd: etcd.endpoints(),
        job: taskgraph_tests::job_name("benchproc"),
        tasks: 1,
        replicas: 2,
        ttl_secs,
        drive_until: None,
        pace_ms: 0,
        dataflow_until: None,
    };
    let mut nodes = Vec::new();
    for _ in 0..2 {
        nodes.push(ProcessNode::spawn(bin, &args).map_err(|e| format!("spawn {bin}: {e}"))?);
    }
    let wait = Duration::from_secs(30 + 2 * ttl_secs);
    // Wait until one node acts as primary and the other is its backup, each by its own
    // latest status line.
    let staffed = |lines: &[Line], primary: bool| {
        last_status(lines).is_some_and(|s| {
            if primary {
                s.primary_of(0).is_some()
            } else {
                s.role == "backup" && s.task == Some(0) && s.acting
            }
        })
    };
    let mut roles = None;
    let deadline = Instant::now() + wait;
    while roles.is_none() {
        let (a, b) = (nodes[0].lines(), nodes[1].lines());
        if staffed(&a, true) && staffed(&b, false) {
            roles = Some((0, 1));
        } else if staffed(&b, true) && staffed(&a, false) {
            roles = Some((1, 0));
        } else {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "no primary and backup after {wait:?}: {:?} / {:?}",
                    last_status(&a),
                    last_status(&b)
                ));
            }
            // Wake up when either node prints another line.
            let (na, nb) = (a.len(), b.len());
            tokio::select! {
                _ = nodes[0].wait_lines("a line", left, |l| l.len() > na) => {}
                _ = nodes[1].wait_lines("a line", left, |l| l.len() > nb) => {}
            }
        }
    }
    let Some((victim, backup)) = roles else {
        return Err("unreachable: no roles".into());
    };
    let old = last_status(&nodes[victim].lines())
        .and_then(|s| s.primary_of(0))
        .ok_or("the primary's term")?;
    // Kill at a random moment 200–700 ms after staffing: killing right away would always hit
    // the same point of the backup's liveness checks (one every 50 ms from the moment it
    // became backup) and measure only that phase.
    let settle = Duration::from_millis(200 + rand::random::<u64>() % 500);
    tokio::time::sleep(settle).await;
    if last_status(&nodes[victim].lines()).and_then(|s| s.primary_of(0)) != Some(old) {
        return Err("the primary changed before the kill".into());
    }
    // Timed from just before the signal (the `kill` command takes a few ms itself).
    let t0 = Instant::now();
    nodes[victim]
        .kill9()
        .map_err(|e| format!("kill -9 {}: {e}", nodes[victim].pid()))?;
    nodes[backup]
        .wait_lines("the backup acts as primary", wait, |lines| {
            lines.iter().any(|l| match l {
                Line::Status(s) => s.primary_of(0).is_some_and(|t| t > old),
                _ => false,
            })
        })
        .await?;
    let took = t0.elapsed();
    // Stop the survivor cleanly (SIGTERM revokes its lease) and reap both.
    let _ = nodes[backup].terminate();
    for n in nodes.iter_mut() {
        let _ = n.wait_exit(Duration::from_secs(20)).await;
    }
    Ok(took)
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let etcd = match Etcd::start().await {
        Ok(e) => e,
        Err(e) => {
            eprintln!("failover_bench: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    if args.processes {
        let ttl_secs = args.ttl_secs.unwrap_or(5);
        let bin = match testnode_path(&args) {
            Ok(p) => p.to_string_lossy().into_owned(),
            Err(e) => {
                eprintln!("failover_bench: {e}");
                return std::process::ExitCode::FAILURE;
            }
        };
        println!(
            "failover after kill -9 of a primary process with a live backup, lease TTL {ttl_secs} s, \
             {} trials ({bin})",
            args.trials
        );
        let mut times = Vec::new();
        for i in 0..args.trials {
            match process_trial(&etcd, &bin, ttl_secs).await {
                Ok(t) => times.push(t),
                Err(e) => {
                    eprintln!("failover_bench: trial {i}: {e}");
                    return std::process::ExitCode::FAILURE;
                }
            }
        }
        summary("kill -9 (process)", times);
        return std::process::ExitCode::SUCCESS;
    }
    let ttl = Duration::from_secs(args.ttl_secs.unwrap_or(1));
    println!(
        "failover with in-process nodes, lease TTL {ttl:?}, {} trials each",
        args.trials
    );
    for (name, crash) in [
        ("crash (lease not revoked)", true),
        ("clean stop (lease revoked)", false),
    ] {
        let mut times = Vec::new();
        for _ in 0..args.trials {
            match trial(&etcd, ttl, crash).await {
                Ok(t) => times.push(t),
                Err(e) => {
                    eprintln!("failover_bench: {name}: {e}");
                    return std::process::ExitCode::FAILURE;
                }
            }
        }
        summary(name, times);
    }
    std::process::ExitCode::SUCCESS
}
