//! `bench`: the benchmark suite of taskgraph. Every figure is printed, never asserted.
//!
//! Run it through `ci/bench` (builds in release, raises the open-files limit, writes
//! `target/bench/report.json`); `ci/bench --quick` is the short smoke run CI uses. Scenarios,
//! each against a private etcd of its own started on free loopback ports:
//!
//! * `epoch`: epoch latency of the `sum` workload with in-process nodes (15, 63, 255 and
//!   1,023 tasks) against baselines measured interleaved with it in the same run: bare-sum
//!   (the same tree data flow on bare tonic, one etcd CAS per epoch, each bare node learning
//!   the epoch from a single-key etcd watch), the latency limit L (one etcd compare-and-swap
//!   plus 2·depth bare tonic round trips), the CPU-bound limit C (the epoch's calls at the
//!   bare tonic rate) and F = CAS + max(2·depth RTTs, C); and etcd's writes and requests per
//!   epoch from its `/metrics`;
//! * `failover`: nodes as processes, SIGKILL and SIGTERM of a primary with one backup, at
//!   lease TTLs of 1 s and 5 s, and SIGKILL of a primary and its backup together (a spare
//!   restores the task from its checkpoint) at 5 s;
//! * `pulls`: pull latency and throughput, 1 KiB at 1 and 16 in flight, 16, 64 and 256 MiB,
//!   framework vs a bare tonic echo service (same bytes, same HTTP/2 settings), and the
//!   process's peak memory per large pull;
//! * `scale`: 128, 512 and 1,024 tasks × 2 replicas in-process against one etcd each (128
//!   with `--quick`): time to staff (or "did not staff in N s"), etcd watch events and
//!   requests ÷ nodes, leases expired during staffing, memory per node, and the sum epoch;
//!   then, at the largest size, churn: a node (any role, the staffer too) crashed and a new
//!   one started every 300 ms for a minute (10 s with `--quick`) while the job runs: epochs
//!   made meanwhile, time to fill every slot again, and the audit trail of the whole run
//!   (exactly-once data, right sums), whose violations fail the scenario;
//! * `regression`: the regression example's default run end to end.
//!
//! Each scenario has a time limit; one that fails or runs out of time is reported as FAILED
//! with what it saw (its nodes are stopped) and the suite goes on. The exit code is non-zero
//! when a scenario failed.

mod baresum;
mod common;
mod epoch;
mod failover;
mod pulls;
mod regression;
mod report;

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{json, Value};
use taskgraph_tests::etcd::Etcd;

use crate::common::BoxError;
use crate::report::{ratio_text, Row, ScenarioReport};

#[derive(Debug, Parser)]
#[command(about = "taskgraph's benchmark suite: prints a table, writes a JSON report")]
struct Args {
    /// The short smoke run (under 2 minutes): fewer trials and epochs, no 1,023-task epoch,
    /// 128 tasks at scale.
    #[arg(long)]
    quick: bool,
    /// Run only these scenarios (epoch, failover, pulls, scale, regression).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Where the JSON report goes.
    #[arg(long, default_value = "target/bench/report.json")]
    json: PathBuf,
    /// The `testnode` binary of taskgraph-tests (default: next to this executable).
    #[arg(long)]
    testnode: Option<PathBuf>,
    /// The `regression` binary of taskgraph-examples (default: next to this executable).
    #[arg(long)]
    regression: Option<PathBuf>,
    /// Tasks of the epoch scenario (default 15, 63, 255 and 1,023; no 1,023 with --quick).
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u32).range(2..=65_536))]
    epoch_tasks: Vec<u32>,
    /// Tasks of the scale scenario (default 128, 512 then 1024, 128 with --quick).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    scale_tasks: Option<u32>,
    /// Payload sizes of the pulls scenario to run, in KiB (default all: 1, 16384, 65536,
    /// 262144).
    #[arg(long, value_delimiter = ',')]
    pull_kib: Vec<usize>,
    /// Limit on staffing in the scale scenario, from the first node's start, in seconds
    /// (default 45, 30 with --quick); a size that does not staff in time is reported as such.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=3600))]
    scale_staff_secs: Option<u64>,
    /// Churn of the scale scenario's largest size, in seconds (default 60, 10 with --quick;
    /// 0: none): a node crashed and replaced every 300 ms while the job runs; the audit trail
    /// must stay clean and every slot be filled again.
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=3600))]
    scale_churn_secs: Option<u64>,
}

/// Settings of one suite run.
#[derive(Debug, Clone)]
struct Plan {
    quick: bool,
    sizes: Vec<u32>,
    epoch_replicas: u32,
    blocks: u64,
    per_block: u64,
    limit_trials: usize,
    epoch_staff: Duration,
    failover_trials: usize,
    failover_ttls: Vec<u64>,
    failover_pair_trials: usize,
    pull_rounds: usize,
    pull_cases: Vec<pulls::Case>,
    scale_sizes: Vec<u32>,
    scale_blocks: u64,
    scale_staff: Duration,
    scale_churn: Duration,
    regression_runs: usize,
    regression_flags: Vec<String>,
}

impl Plan {
    fn new(args: &Args) -> Plan {
        let q = args.quick;
        Plan {
            quick: q,
            // 1,023 tasks in the full run only: its staffing alone may take the quick run's time.
            sizes: if !args.epoch_tasks.is_empty() {
                args.epoch_tasks.clone()
            } else if q {
                vec![15, 63, 255]
            } else {
                vec![15, 63, 255, 1023]
            },
            // The epoch's own cost: backups take no part in an epoch of this workload (no
            // `replicate`); replicated nodes are measured by the scale scenario.
            epoch_replicas: 1,
            // Interleaved blocks: framework, bare-sum, limit models; 6 timed epochs per block.
            blocks: if q { 3 } else { 5 },
            per_block: if q { 4 } else { 7 },
            limit_trials: if q { 4 } else { 6 },
            epoch_staff: Duration::from_secs(if q { 20 } else { 45 }),
            failover_trials: if q { 3 } else { 20 },
            failover_ttls: vec![1, 5],
            failover_pair_trials: if q { 3 } else { 10 },
            pull_rounds: if q { 3 } else { 10 },
            pull_cases: vec![
                pulls::Case {
                    bytes: 1024,
                    concurrency: 1,
                    per_block: if q { 100 } else { 300 },
                },
                pulls::Case {
                    bytes: 1024,
                    concurrency: 16,
                    per_block: if q { 400 } else { 1600 },
                },
                pulls::Case {
                    bytes: 16 << 20,
                    concurrency: 1,
                    per_block: if q { 2 } else { 4 },
                },
                // One pull per block from here on: the peak-memory figure is then that of one
                // pull (answers kept earlier in the epoch would add to it).
                pulls::Case {
                    bytes: 64 << 20,
                    concurrency: 1,
                    per_block: 1,
                },
                pulls::Case {
                    bytes: 256 << 20,
                    concurrency: 1,
                    per_block: 1,
                },
            ]
            .into_iter()
            .filter(|c| args.pull_kib.is_empty() || args.pull_kib.contains(&(c.bytes >> 10)))
            .collect(),
            scale_sizes: match (args.scale_tasks, q) {
                (Some(n), _) => vec![n],
                (None, true) => vec![128],
                (None, false) => vec![128, 512, 1024],
            },
            scale_blocks: 2,
            scale_staff: Duration::from_secs(args.scale_staff_secs.unwrap_or(if q {
                30
            } else {
                45
            })),
            scale_churn: Duration::from_secs(args.scale_churn_secs.unwrap_or(if q {
                10
            } else {
                60
            })),
            regression_runs: if q { 2 } else { 10 },
            regression_flags: Vec::new(),
        }
    }
}

/// Runs one scenario under a time limit; `body` fills `rows` and `details` as it measures, so
/// a failure keeps what was measured before it.
async fn scenario<F, Fut>(name: &str, setup: String, limit: Duration, body: F) -> ScenarioReport
where
    F: FnOnce(Sink) -> Fut,
    Fut: Future<Output = Result<(), BoxError>>,
{
    eprintln!("bench: {name}: {setup}");
    let t0 = Instant::now();
    let sink = Sink::default();
    let result = tokio::time::timeout(limit, body(sink.clone())).await;
    let error = match result {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some(format!(
            "did not finish within {limit:?} (stopped; figures so far kept)"
        )),
    };
    if let Some(e) = &error {
        eprintln!("bench: {name}: FAILED: {e}");
    }
    let (rows, details) = sink.take();
    ScenarioReport {
        name: name.to_owned(),
        setup,
        ok: error.is_none(),
        error,
        seconds: t0.elapsed().as_secs_f64(),
        rows,
        details,
    }
}

/// Where a scenario puts its figures as soon as it has them.
#[derive(Debug, Clone, Default)]
struct Sink(std::sync::Arc<std::sync::Mutex<Collected>>);

/// Rows and details collected by a scenario.
type Collected = (Vec<Row>, serde_json::Map<String, Value>);

impl Sink {
    fn rows(&self, rows: impl IntoIterator<Item = Row>) {
        if let Ok(mut g) = self.0.lock() {
            g.0.extend(rows);
        }
    }
    fn detail(&self, key: &str, v: Value) {
        if let Ok(mut g) = self.0.lock() {
            g.1.insert(key.to_owned(), v);
        }
    }
    fn take(&self) -> (Vec<Row>, Value) {
        match self.0.lock() {
            Ok(mut g) => (
                std::mem::take(&mut g.0),
                Value::Object(std::mem::take(&mut g.1)),
            ),
            Err(_) => (Vec::new(), Value::Null),
        }
    }
}

fn next_to_me(name: &str, given: &Option<PathBuf>, build: &str) -> Result<PathBuf, BoxError> {
    if let Some(p) = given {
        return Ok(p.clone());
    }
    let me = std::env::current_exe()?;
    let path = me.with_file_name(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if !path.is_file() {
        return Err(format!(
            "no {name} binary at {} (build it with `{build}`, or pass --{name})",
            path.display()
        )
        .into());
    }
    Ok(path)
}

async fn epoch_scenario(plan: &Plan, sink: Sink) -> Result<(), BoxError> {
    let etcd = Etcd::start().await?;
    let mut base_requests = None;
    let mut first_error = None;
    let mut all_cas = Vec::new();
    let mut all_rtt = Vec::new();
    for &n in &plan.sizes {
        let run = epoch::SumRun {
            tasks: n,
            replicas: plan.epoch_replicas,
            ttl: Duration::from_secs(if n > 255 { 5 } else { 2 }),
            warm: 3,
            blocks: plan.blocks,
            per_block: plan.per_block,
            staff_timeout: plan.epoch_staff,
            // Up to 255 tasks staff in seconds today; 1,023 may not (issue 18).
            staff_may_fail: n > 255,
            epoch_timeout: Duration::from_secs(20),
            limit_trials: plan.limit_trials,
            baselines: true,
            churn: None,
        };
        let mut f = epoch::SumFigures::default();
        let r = epoch::run_sum(&etcd, &run, &mut f).await;
        let d = common::tree_depth(n);
        let fw = Row::new(
            format!("sum epoch, {n} tasks × {}", run.replicas),
            "ms",
            &f.epoch_ms,
        );
        let fw_median = fw.median();
        let bare = Row::new(
            format!("bare-sum: same tree on bare tonic, {n} tasks"),
            "ms",
            &f.bare_ms,
        );
        let limit = Row::new(
            format!("limit L: 1 CAS + {} bare RTTs (depth {d})", 2 * d),
            "ms",
            &f.limit_ms,
        );
        let cpu = Row::new(
            format!("limit, CPU-bound C: {} bare calls", f.calls_per_epoch),
            "ms",
            &f.cpu_limit_ms(),
        );
        let fl = Row::new("F = CAS + max(2·depth RTTs, C)", "ms", &f.f_ms);
        let vs = format!(
            "{}, {}, {}",
            ratio_text("÷ limit", fw.median(), limit.median()),
            ratio_text("÷ bare-sum", fw.median(), bare.median()),
            ratio_text("÷ F", fw.median(), fl.median()),
        );
        let requests = f.requests_per_epoch();
        if base_requests.is_none() {
            base_requests = requests;
        }
        let mut rows = Vec::new();
        if let Some((limit, _)) = &f.not_staffed {
            rows.push(
                Row::new(
                    format!("sum epoch, {n} tasks × {}", run.replicas),
                    "ms",
                    &[],
                )
                .versus(format!("did not staff in {} s", limit.as_secs())),
            );
        } else {
            rows.push(fw.versus(vs));
        }
        rows.extend([
            {
                let vs = ratio_text("÷ F", bare.median(), fl.median());
                bare.versus(vs)
            },
            limit,
            cpu,
            fl,
        ]);
        if let Some(w) = f.writes_per_epoch() {
            rows.push(Row::single(
                format!("etcd writes per epoch, {n} tasks"),
                "writes",
                w,
            ));
        }
        if let Some(q) = requests {
            rows.push(
                Row::single(format!("etcd requests per epoch, {n} tasks"), "requests", q).versus(
                    ratio_text(
                        &format!("÷ {} tasks", plan.sizes[0]),
                        Some(q),
                        base_requests,
                    ),
                ),
            );
        }
        if let Some(c) = f.cpu_ms_per_epoch() {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
            rows.push(
                Row::single(format!("CPU of all nodes per epoch, {n} tasks"), "ms", c).versus(
                    ratio_text(
                        &format!("÷ (epoch × {cores} cores)"),
                        Some(c),
                        fw_median.map(|m| m * cores),
                    ),
                ),
            );
            if let Some(b) = f.bare_cpu_ms_per_epoch() {
                rows.push(
                    Row::single(format!("CPU of bare-sum per epoch, {n} tasks"), "ms", b)
                        .versus(ratio_text("framework ÷ bare-sum", Some(c), Some(b))),
                );
            }
        }
        if let Some(ev) = f.metrics.get("etcd_debugging_mvcc_events_total") {
            rows.push(
                Row::single(
                    format!("etcd watch events sent per epoch, {n} tasks"),
                    "events",
                    ev / f.epochs.max(1) as f64,
                )
                .versus(format!(
                    "÷ nodes {:.2}",
                    ev / f.epochs.max(1) as f64 / f.nodes.max(1) as f64
                )),
            );
        }
        sink.rows(rows);
        all_cas.extend_from_slice(&f.cas_ms);
        all_rtt.extend_from_slice(&f.rtt_ms);
        sink.detail(&format!("tasks_{n}"), f.json());
        if let Err(e) = r {
            // The next size still runs; the scenario reports the first failure.
            eprintln!("bench: epoch: {n} tasks: {e}");
            first_error.get_or_insert(format!("{n} tasks: {e}"));
        }
    }
    sink.rows([
        Row::new("etcd CAS (txn) alone", "ms", &all_cas),
        Row::new("bare tonic round trip, 8 B", "ms", &all_rtt),
    ]);
    match first_error {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

async fn failover_scenario(plan: &Plan, bin: PathBuf, sink: Sink) -> Result<(), BoxError> {
    let etcd = Etcd::start().await?;
    let bin = bin.to_string_lossy().into_owned();
    for &ttl in &plan.failover_ttls {
        let mut trials = Vec::new();
        let r = failover::run(&etcd, &bin, ttl, plan.failover_trials, &mut trials).await;
        sink.rows(failover::rows(ttl, &trials));
        sink.detail(&format!("ttl_{ttl}s"), failover::json(ttl, &trials));
        r?;
    }
    // The whole replica set at once, at the longest TTL: ended on evidence, not waited out.
    let ttl = plan.failover_ttls.iter().copied().max().unwrap_or(5);
    let mut trials = Vec::new();
    let r = failover::run_pair(&etcd, &bin, ttl, plan.failover_pair_trials, &mut trials).await;
    sink.rows(failover::pair_rows(ttl, &trials));
    sink.detail(
        &format!("pair_ttl_{ttl}s"),
        failover::pair_json(ttl, &trials),
    );
    r
}

async fn pulls_scenario(plan: &Plan, sink: Sink) -> Result<(), BoxError> {
    let etcd = Etcd::start().await?;
    let mut figures = Vec::new();
    let r = pulls::run(&etcd, &plan.pull_cases, plan.pull_rounds, &mut figures).await;
    sink.rows(pulls::rows(&plan.pull_cases, &figures));
    sink.detail(
        "pulls",
        pulls::json(&plan.pull_cases, &figures, plan.pull_rounds),
    );
    r
}

/// The scale scenario, one child process (this executable with `--scale-tasks`) per size: a
/// fresh process makes the RSS delta the nodes' own, and a size that hangs is stopped with
/// its process.
async fn scale_in_children(plan: &Plan, sink: Sink) -> Result<(), BoxError> {
    let me = std::env::current_exe()?;
    let dir = tempdir()?;
    let mut first_error = None;
    for &n in &plan.scale_sizes {
        let json = dir.join(format!("scale-{n}.json"));
        let mut cmd = tokio::process::Command::new(&me);
        cmd.arg("--only")
            .arg("scale")
            .arg("--scale-tasks")
            .arg(n.to_string())
            .arg("--scale-staff-secs")
            .arg(plan.scale_staff.as_secs().to_string())
            .arg("--scale-churn-secs")
            .arg(if Some(&n) == plan.scale_sizes.iter().max() {
                plan.scale_churn.as_secs().to_string()
            } else {
                "0".into()
            })
            .arg("--json")
            .arg(&json)
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true);
        if plan.quick {
            cmd.arg("--quick");
        }
        let status = cmd.status().await?;
        let doc: Option<Value> = std::fs::read(&json)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let child = doc
            .as_ref()
            .and_then(|d| d.get("scenarios")?.get(0))
            .cloned();
        let Some(child) = child else {
            first_error.get_or_insert(format!(
                "{n} tasks: the child bench exited with {status} and no report"
            ));
            continue;
        };
        if let Some(rows) = child.get("rows").cloned() {
            sink.rows(serde_json::from_value::<Vec<Row>>(rows).unwrap_or_default());
        }
        sink.detail(
            &format!("tasks_{n}"),
            child
                .get("details")
                .and_then(|d| d.get(format!("tasks_{n}")))
                .cloned()
                .unwrap_or(Value::Null),
        );
        if let Some(e) = child.get("error").and_then(Value::as_str) {
            first_error.get_or_insert(e.to_owned());
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    match first_error {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

async fn scale_scenario(plan: &Plan, sink: Sink) -> Result<(), BoxError> {
    let mut first_error = None;
    for &n in &plan.scale_sizes {
        // A fresh etcd per size: what a failed size left behind does not weigh on the next.
        let etcd = Etcd::start().await?;
        let run = epoch::SumRun {
            tasks: n,
            replicas: 2,
            ttl: Duration::from_secs(5),
            warm: 2,
            blocks: plan.scale_blocks,
            per_block: 6,
            staff_timeout: plan.scale_staff,
            // Not staffing in time is a figure of a size measured for its staffing alone; with
            // churn asked for (CI's run of the largest size) it fails the scenario: the churn
            // and its audit would not run.
            staff_may_fail: plan.scale_churn.is_zero(),
            epoch_timeout: Duration::from_secs(30),
            limit_trials: plan.limit_trials,
            baselines: false,
            churn: (!plan.scale_churn.is_zero()).then(|| epoch::Churn {
                duration: plan.scale_churn,
                every: Duration::from_millis(300),
                // About 3 epochs a second at 1,024 tasks between crashes; the gate holds the
                // job at the last one if it gets there before the churn ends.
                epochs: plan.scale_churn.as_secs().max(1) * 3,
            }),
        };
        let mut f = epoch::SumFigures::default();
        let r = epoch::run_sum(&etcd, &run, &mut f).await;
        let nodes = f.nodes.max(1) as f64;
        let planned = 2 * n as usize;
        let label = if f.nodes < planned {
            format!("{n} tasks × 2 ({} of {planned} nodes started)", f.nodes)
        } else {
            format!("{n} tasks × 2 ({planned} nodes)")
        };
        let mut rows = Vec::new();
        match (f.staffing, &f.not_staffed) {
            (Some(s), _) => rows.push(Row::single(
                format!("{n} tasks × 2: every slot filled"),
                "s",
                s.as_secs_f64(),
            )),
            (None, Some((limit, _))) => rows.push(
                Row::new(format!("{n} tasks × 2: every slot filled"), "s", &[])
                    .versus(format!("did not staff in {} s", limit.as_secs())),
            ),
            (None, None) => rows.push(
                Row::new(format!("{n} tasks × 2: every slot filled"), "s", &[])
                    .versus("not measured (see the error)"),
            ),
        }
        let m = &f.staffing_metrics;
        let until = if f.staffing.is_some() {
            "until staffed"
        } else {
            "until given up"
        };
        if let Some(events) = m.get("etcd_debugging_mvcc_events_total") {
            rows.push(
                Row::single(
                    format!("{label}: etcd watch events {until} ÷ nodes"),
                    "events",
                    events / nodes,
                )
                .versus(format!("total {events:.0}")),
            );
        }
        let unary: f64 = m
            .iter()
            .filter(|(k, _)| k.starts_with("grpc_server_handled_total{") && k.ends_with(",unary}"))
            .map(|(_, v)| v)
            .sum();
        if !m.is_empty() {
            let txns = m
                .get("grpc_server_handled_total{Txn,unary}")
                .copied()
                .unwrap_or(0.0);
            rows.push(
                Row::single(
                    format!("{label}: etcd requests {until} ÷ nodes"),
                    "requests",
                    unary / nodes,
                )
                .versus(format!("total {unary:.0}, Txn {txns:.0}")),
            );
            // Every node sends one transaction to join (the spec's create-if-absent); the rest
            // are two per node (its registration, which also reads its spare's ranges, and its
            // watch's read of its holder's ranges once drafted), the spares' claims of task 0
            // (the staffer's slot), the staffer's drafts (about 30 slots each), promotions.
            let slots = f64::from(n) * 2.0;
            let rest = (txns - nodes).max(0.0);
            let beyond = (rest - 2.0 * nodes).max(0.0);
            rows.push(
                Row::single(
                    format!("{label}: transactions after joining {until} ÷ slots"),
                    "txns",
                    rest / slots,
                )
                .versus(format!(
                    "{rest:.0} for {slots:.0} slots; {beyond:.0} beyond two watch reads per node (claims, drafts, reloads)"
                )),
            );
            let counter = |k: &str| m.get(k).copied().unwrap_or(0.0);
            let expired = counter("etcd_debugging_server_lease_expired_total");
            rows.push(
                Row::single(
                    format!("{label}: leases expired {until}"),
                    "leases",
                    expired,
                )
                .versus(format!(
                    "{}; granted {:.0}, keep-alive streams opened {:.0}",
                    if expired > 0.0 {
                        "some expired"
                    } else {
                        "none expired"
                    },
                    counter("etcd_debugging_lease_granted_total"),
                    counter("grpc_server_started_total{LeaseKeepAlive,bidi_stream}"),
                )),
            );
        }
        if let (Some(a), Some(b)) = (f.rss_before, f.rss_staffed) {
            rows.push(Row::single(
                format!("{label}: memory per node (RSS Δ ÷ nodes)"),
                "KiB",
                (b.saturating_sub(a)) as f64 / nodes / 1024.0,
            ));
        }
        let fw = Row::new(format!("sum epoch, {n} tasks × 2"), "ms", &f.epoch_ms);
        let d = common::tree_depth(n);
        let limit = Row::new(
            format!("limit L: 1 CAS + {} bare RTTs (depth {d})", 2 * d),
            "ms",
            &f.limit_ms,
        );
        let cpu = Row::new(
            format!("limit, CPU-bound C: {} bare calls", f.calls_per_epoch),
            "ms",
            &f.cpu_limit_ms(),
        );
        let fl = Row::new("F = CAS + max(2·depth RTTs, C)", "ms", &f.f_ms);
        let vs = format!(
            "{}, {}",
            ratio_text("÷ limit", fw.median(), limit.median()),
            ratio_text("÷ F", fw.median(), fl.median())
        );
        if !f.epoch_ms.is_empty() {
            rows.push(fw.versus(vs));
            rows.push(limit);
            rows.push(cpu);
            rows.push(fl);
        }
        if let Some(q) = f.requests_per_epoch() {
            rows.push(Row::single(
                format!("etcd requests per epoch, {n} tasks"),
                "requests",
                q,
            ));
        }
        if let Some(c) = &f.churn {
            let secs = plan.scale_churn.as_secs();
            rows.push(
                Row::single(
                    format!("churn, {n} tasks × 2: nodes crashed (one every 300 ms, {secs} s)"),
                    "nodes",
                    f64::from(c.kills()),
                )
                .versus(format!(
                    "{} primaries ({} the staffer), {} backups, {} spares; each replaced by a new node",
                    c.primaries, c.staffers, c.backups, c.spares
                )),
            );
            rows.push(Row::single(
                format!("churn, {n} tasks × 2: epochs made while crashing"),
                "epochs",
                c.epochs_during as f64,
            ));
            if let Some(d) = c.restaffed {
                rows.push(Row::single(
                    format!("churn, {n} tasks × 2: every slot filled again after the last crash"),
                    "s",
                    d.as_secs_f64(),
                ));
            }
            if c.epochs_checked > 0 {
                rows.push(
                    Row::single(
                        format!("churn, {n} tasks × 2: audit trail violations"),
                        "violations",
                        c.violations.len() as f64,
                    )
                    .versus(format!(
                        "epochs 0..{}: exactly-once data, right sums, every result",
                        c.epochs_checked
                    )),
                );
            }
        }
        sink.rows(rows);
        sink.detail(&format!("tasks_{n}"), f.json());
        if let Err(e) = r {
            eprintln!("bench: scale: {n} tasks: {e}");
            first_error.get_or_insert(format!("{n} tasks: {e}"));
        }
    }
    match first_error {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

async fn regression_scenario(plan: &Plan, bin: PathBuf, sink: Sink) -> Result<(), BoxError> {
    let etcd = Etcd::start().await?;
    let dir = tempdir()?;
    let mut runs = Vec::new();
    let limit = Duration::from_secs(if plan.quick { 60 } else { 150 });
    let mut result = Ok(());
    for _ in 0..plan.regression_runs {
        match regression::run_once(&etcd, &bin, &plan.regression_flags, &dir, limit).await {
            Ok(r) => runs.push(r),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let wall: Vec<f64> = runs.iter().map(|r| r.wall_ms / 1e3).collect();
    let per_epoch: Vec<f64> = runs
        .iter()
        .flat_map(|r| r.epoch_ms.iter().copied())
        .collect();
    let epochs = runs.first().and_then(|r| r.epochs).unwrap_or(0);
    sink.rows([
        Row::new(
            format!("default run ({epochs} epochs): wall time"),
            "s",
            &wall,
        ),
        Row::new("per epoch (epoch key changes)", "ms", &per_epoch),
    ]);
    sink.detail(
        "regression",
        regression::json(&runs, &plan.regression_flags),
    );
    result
}

fn tempdir() -> Result<PathBuf, BoxError> {
    let dir = std::env::temp_dir().join(format!("taskgraph-bench-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn machine() -> Value {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let etcd = std::process::Command::new("etcd")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_owned));
    json!({
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "loadavg_at_start": load.trim(),
        "etcd": etcd,
        "unix_time": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
    })
}

async fn run(args: Args) -> Result<bool, BoxError> {
    let plan = Plan::new(&args);
    let wanted = |s: &str| args.only.is_empty() || args.only.iter().any(|o| o == s);
    let machine = machine();
    let started = Instant::now();
    let mut reports = Vec::new();
    let q = plan.quick;
    let secs = |full: u64, quick: u64| Duration::from_secs(if q { quick } else { full });
    if wanted("epoch") {
        let setup = format!(
            "sum workload, binary tree, {:?} tasks × {} replicas in-process; after 3 epochs, {} interleaved blocks of {} framework epochs, {} bare-sum epochs and {} limit-model trials; staffing limit {} s",
            plan.sizes, plan.epoch_replicas, plan.blocks, plan.per_block, plan.per_block, plan.limit_trials, plan.epoch_staff.as_secs()
        );
        reports.push(scenario("epoch", setup, secs(360, 75), |s| epoch_scenario(&plan, s)).await);
    }
    if wanted("failover") {
        let setup = format!(
            "2 tasks × 2 replicas as testnode processes, {} trials per signal at TTL {:?} s, then {} trials of SIGKILL to task 1's primary and backup together (plus a spare), task 0 pausing {} ms per epoch",
            plan.failover_trials, plan.failover_ttls, plan.failover_pair_trials, failover::PACE_MS
        );
        let r = match next_to_me(
            "testnode",
            &args.testnode,
            "cargo build --release -p taskgraph-tests --bin testnode",
        ) {
            Ok(bin) => {
                scenario("failover", setup, secs(400, 90), |s| {
                    failover_scenario(&plan, bin, s)
                })
                .await
            }
            Err(e) => scenario("failover", setup, secs(1, 1), |_| async move { Err(e) }).await,
        };
        reports.push(r);
    }
    if wanted("pulls") {
        let setup = format!(
            "2 tasks × 1 in-process, Context::request_bytes (pulls up to {} KiB on the \
             node pair's lane, larger ones unary) vs bare tonic echo (a unary call per pull), \
             same payload bytes, {} rounds; frame limit {} MiB and {}",
            taskgraph::testing::wire::LANE_MAX_BYTES >> 10,
            plan.pull_rounds,
            pulls::FRAME_LIMIT >> 20,
            common::http2_settings()
        );
        reports.push(scenario("pulls", setup, secs(240, 60), |s| pulls_scenario(&plan, s)).await);
    }
    if wanted("scale") {
        let setup = format!(
            "{:?} tasks × 2 replicas in-process against one etcd each, lease TTL 5 s, staffing limit {} s from the first node's start{}",
            plan.scale_sizes,
            plan.scale_staff.as_secs(),
            if q {
                " (--quick: smaller than the full run's 512 and 1,024)"
            } else {
                ""
            }
        );
        // The churn: its own time, then up to a minute to staff again and four epoch limits.
        let limit = plan.scale_staff * plan.scale_sizes.len() as u32
            + secs(120, 30)
            + plan.scale_churn
            + Duration::from_secs(if plan.scale_churn.is_zero() {
                0
            } else {
                60 + 120
            });
        let r = if args.scale_tasks.is_some() {
            scenario("scale", setup, limit, |s| scale_scenario(&plan, s)).await
        } else {
            scenario("scale", setup, limit, |s| scale_in_children(&plan, s)).await
        };
        reports.push(r);
    }
    if wanted("regression") {
        let setup = format!(
            "regression (default flags) as processes, {} runs",
            plan.regression_runs
        );
        let r = match next_to_me(
            "regression",
            &args.regression,
            "cargo build --release -p taskgraph-examples --bin regression",
        ) {
            Ok(bin) => {
                scenario("regression", setup, secs(400, 60), |s| {
                    regression_scenario(&plan, bin, s)
                })
                .await
            }
            Err(e) => scenario("regression", setup, secs(1, 1), |_| async move { Err(e) }).await,
        };
        reports.push(r);
    }
    let total = started.elapsed().as_secs_f64();
    println!("{}", report::table(&reports));
    println!(
        "taskgraph bench{}: {total:.0} s; medians over repeated trials with min and max; ratios measured in the same run; report: {}",
        if q { " --quick" } else { "" },
        args.json.display()
    );
    let ok = reports.iter().all(|r| r.ok);
    let doc = json!({
        "quick": q,
        "machine": machine,
        "total_s": total,
        "ok": ok,
        "scenarios": reports,
    });
    if let Some(dir) = args.json.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir)?;
        }
    }
    std::fs::write(&args.json, serde_json::to_vec_pretty(&doc)?)?;
    Ok(ok)
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    match run(Args::parse()).await {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("bench: some scenarios FAILED (see the table)");
            std::process::ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
