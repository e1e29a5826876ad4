//! Measures failover time with in-process nodes on a private etcd: a task with one backup,
//! (a) its primary crashed without revoking the lease, (b) its primary stopped cleanly. Prints
//! median, min and max over the trials. Figures are printed, never asserted.
//!
//! `cargo run --release -p taskgraph-tests --bin failover_bench -- --trials 20 --ttl-secs 1`

use std::time::{Duration, Instant};

use clap::Parser;
use taskgraph_tests::cluster::{fully_staffed, Cluster, ClusterConfig};
use taskgraph_tests::etcd::Etcd;

#[derive(Debug, Parser)]
struct Args {
    /// Trials per kind of failure.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    trials: u32,
    /// Lease TTL in seconds.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=60))]
    ttl_secs: u64,
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

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let ttl = Duration::from_secs(args.ttl_secs);
    let etcd = match Etcd::start().await {
        Ok(e) => e,
        Err(e) => {
            eprintln!("failover_bench: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
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
