//! The `sum` workload with in-process nodes: epoch latency, etcd cost per epoch, and the limit
//! model measured against the same etcd (scenarios `epoch` and `scale`).
//!
//! The workload is the dataflow test app (`taskgraph_tests::dataflow`) without its replicated
//! counter: in epoch `e` every task pulls the parameter `e` from its parent and the sums of its
//! children (a serving task holds a pull until it can answer it), answers its parent with
//! `e·id` plus its children's sums, and flags `done` to its parent; the root moves the job on
//! with `inc_epoch` once it has every child's sum and `done`. So the work of an epoch is the
//! framework's own: no `replicate`, no checkpoints.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use futures::StreamExt;
use serde_json::{json, Value};
use taskgraph::Epoch;
use taskgraph_tests::apps::{Audit, Event};
use taskgraph_tests::dataflow::DataflowBuilder;
use taskgraph_tests::etcd::Etcd;
use tokio::sync::mpsc;

use crate::baresum::BareSum;
use crate::common::{
    cpu_time, delta, echo_server, etcd_metrics, ms, revision, rss_bytes, tree_depth, BoxError,
    EchoServerHandle, Echoer, Fleet, FleetSpec,
};
use crate::report::Stats;

/// Settings of one run of the sum workload.
#[derive(Debug, Clone)]
pub struct SumRun {
    /// Tasks (binary tree).
    pub tasks: u32,
    /// Nodes per task.
    pub replicas: u32,
    /// Lease TTL.
    pub ttl: Duration,
    /// Epochs run before the measured blocks.
    pub warm: u64,
    /// Measured blocks: each a block of framework epochs, then (with `baselines`) a block of
    /// bare-sum epochs, then limit model trials, so drift of a shared machine weighs on all.
    pub blocks: u64,
    /// Epochs the root moves per block (the first of each block is not timed: the root waited
    /// at the gate in it).
    pub per_block: u64,
    /// Limit on staffing.
    pub staff_timeout: Duration,
    /// Whether a staffing that runs out of time is a figure ("did not staff in N s") rather
    /// than a failure of the run (sizes known not to staff today).
    pub staff_may_fail: bool,
    /// Limit on any one epoch.
    pub epoch_timeout: Duration,
    /// Trials of the limit model per block (0: not measured).
    pub limit_trials: usize,
    /// Whether to run the bare-sum baseline (and the bare-sum fleet beside the nodes).
    pub baselines: bool,
    /// After the blocks: nodes crashed one after another while the job runs on.
    pub churn: Option<Churn>,
}

/// The churn phase: every `every`, one running node picked at random (primary, backup or
/// spare; the staffer too) is crashed as a kill -9 on a live host would be, and a new node
/// started in its place, for `duration`, while the job runs up to `epochs` more epochs. Then
/// every slot must be filled again, and the audit trail of the whole run must be clean
/// (exactly-once data, right sums, every epoch's result, neighbour events in order): a
/// violation fails the scenario.
#[derive(Debug, Clone)]
pub struct Churn {
    /// How long nodes are crashed.
    pub duration: Duration,
    /// One crash every this long.
    pub every: Duration,
    /// Epochs the job may move during the churn (the gate holds it there).
    pub epochs: u64,
}

/// What the churn phase measured.
#[derive(Debug, Default)]
pub struct ChurnFigures {
    /// Nodes crashed, by role then: primaries (of which task 0's, the staffer), backups, spares.
    pub primaries: u32,
    pub staffers: u32,
    pub backups: u32,
    pub spares: u32,
    /// Epochs the root entered while nodes were being crashed.
    pub epochs_during: u64,
    /// From the last crash until every slot was filled again.
    pub restaffed: Option<Duration>,
    /// Epochs the audit trail covers, and what it found wrong.
    pub epochs_checked: u64,
    pub violations: Vec<String>,
}

impl ChurnFigures {
    /// Every node crashed.
    pub fn kills(&self) -> u32 {
        self.primaries + self.backups + self.spares
    }
}

impl SumRun {
    /// Epochs the framework moves in the measured blocks.
    pub fn window_epochs(&self) -> u64 {
        self.blocks * self.per_block
    }
}

/// What one run measured.
#[derive(Debug, Default)]
pub struct SumFigures {
    /// From the first node's start until every slot is filled.
    pub staffing: Option<Duration>,
    /// Staffing ran out of this time (with `staff_may_fail`), and how far it got.
    pub not_staffed: Option<(Duration, String)>,
    /// Resident memory before the nodes started and once staffed.
    pub rss_before: Option<u64>,
    /// Resident memory once staffed.
    pub rss_staffed: Option<u64>,
    /// Nodes started.
    pub nodes: usize,
    /// etcd's counters from before the first node started until every slot was filled (or
    /// staffing gave up).
    pub staffing_metrics: BTreeMap<String, f64>,
    /// Root entry to root entry, per timed epoch of the blocks, in ms.
    pub epoch_ms: Vec<f64>,
    /// Median of `epoch_ms` per block.
    pub epoch_block_ms: Vec<f64>,
    /// Epochs the framework moved in the blocks (etcd counters are per these).
    pub epochs: u64,
    /// The bare-sum baseline: root entry to root entry, per timed epoch, in ms.
    pub bare_ms: Vec<f64>,
    /// Median of `bare_ms` per block.
    pub bare_block_ms: Vec<f64>,
    /// CPU time of this process over the bare-sum blocks (the framework's nodes idle at the
    /// gate meanwhile, as the bare nodes are during the framework's blocks).
    pub bare_cpu: Option<Duration>,
    /// Epochs bare-sum moved in those blocks.
    pub bare_epochs: u64,
    /// F = CAS + max(2·depth bare RTTs, C) per limit trial, C the CPU-bound limit of its
    /// block, in ms.
    pub f_ms: Vec<f64>,
    /// Median of `f_ms` per block.
    pub f_block_ms: Vec<f64>,
    /// Median of `limit_ms` per block.
    pub limit_block_ms: Vec<f64>,
    /// Window length.
    pub window: Option<Duration>,
    /// CPU time of this process (every node) over the window.
    pub window_cpu: Option<Duration>,
    /// etcd's revision delta over the window.
    pub revision_delta: Option<i64>,
    /// etcd's counters over the window.
    pub metrics: BTreeMap<String, f64>,
    /// Limit model trials: one etcd CAS then 2·depth bare tonic round trips, in ms.
    pub limit_ms: Vec<f64>,
    /// The CAS alone, per trial, in ms.
    pub cas_ms: Vec<f64>,
    /// One bare round trip, every one of the trials, in ms.
    pub rtt_ms: Vec<f64>,
    /// Bare tonic calls per second with 64 in flight on one connection, per block.
    pub bare_calls_per_s: Vec<f64>,
    /// Node-to-node calls of one epoch (pulls and metas).
    pub calls_per_epoch: u64,
    /// The churn phase, if it ran.
    pub churn: Option<ChurnFigures>,
}

impl SumFigures {
    /// Writes per epoch: etcd's revision delta over the window ÷ epochs.
    pub fn writes_per_epoch(&self) -> Option<f64> {
        self.revision_delta.map(|d| d as f64 / self.epochs as f64)
    }

    /// Unary gRPC requests etcd handled over the window ÷ epochs (streams' messages apart).
    pub fn requests_per_epoch(&self) -> Option<f64> {
        if self.metrics.is_empty() || self.epochs == 0 {
            return None;
        }
        let unary: f64 = self
            .metrics
            .iter()
            .filter(|(k, _)| k.starts_with("grpc_server_handled_total{") && k.ends_with(",unary}"))
            .map(|(_, v)| v)
            .sum();
        Some(unary / self.epochs as f64)
    }

    /// Per-method unary requests per epoch.
    pub fn requests_by_method(&self) -> BTreeMap<String, f64> {
        self.metrics
            .iter()
            .filter_map(|(k, v)| {
                let m = k
                    .strip_prefix("grpc_server_handled_total{")?
                    .strip_suffix(",unary}")?;
                Some((m.to_owned(), v / self.epochs.max(1) as f64))
            })
            .collect()
    }

    /// Messages etcd received on a stream method (`LeaseKeepAlive`, `Watch`) per second.
    pub fn stream_msgs_per_s(&self, method: &str) -> Option<f64> {
        let w = self.window?.as_secs_f64();
        let v = self
            .metrics
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("grpc_server_msg_received_total{{{method},")))
            .map(|(_, v)| v)
            .sum::<f64>();
        (w > 0.0).then_some(v / w)
    }

    /// The throughput limit of an epoch on this machine, per block of the bare throughput
    /// measurement: the epoch's node-to-node calls made one after another at the bare tonic
    /// rate (all nodes share this process's cores), in ms.
    pub fn cpu_limit_ms(&self) -> Vec<f64> {
        self.bare_calls_per_s
            .iter()
            .map(|r| self.calls_per_epoch as f64 / r * 1e3)
            .collect()
    }

    /// CPU time of this process (all nodes) per epoch of the window, in ms.
    pub fn cpu_ms_per_epoch(&self) -> Option<f64> {
        Some(ms(self.window_cpu?) / self.epochs.max(1) as f64)
    }

    /// CPU of this process per bare-sum epoch, in ms.
    pub fn bare_cpu_ms_per_epoch(&self) -> Option<f64> {
        Some(ms(self.bare_cpu?) / (self.bare_epochs > 0).then_some(self.bare_epochs)? as f64)
    }

    /// The raw figures as JSON.
    pub fn json(&self) -> Value {
        json!({
            "nodes": self.nodes,
            "staffing_s": self.staffing.map(|d| d.as_secs_f64()),
            "not_staffed": self.not_staffed.as_ref().map(|(d, why)| json!({"limit_s": d.as_secs_f64(), "state": why})),
            "staffing_etcd_counters_delta": self.staffing_metrics,
            "rss_before_bytes": self.rss_before,
            "rss_staffed_bytes": self.rss_staffed,
            "epochs": self.epochs,
            "epoch_ms": self.epoch_ms,
            "epoch_block_ms": self.epoch_block_ms,
            "bare_sum_ms": self.bare_ms,
            "bare_sum_block_ms": self.bare_block_ms,
            "f_ms": self.f_ms,
            "f_block_ms": self.f_block_ms,
            "limit_block_ms": self.limit_block_ms,
            "ratio_per_block_vs_bare_sum": block_ratios(&self.epoch_block_ms, &self.bare_block_ms),
            "ratio_per_block_vs_f": block_ratios(&self.epoch_block_ms, &self.f_block_ms),
            "ratio_per_block_vs_limit": block_ratios(&self.epoch_block_ms, &self.limit_block_ms),
            "window_s": self.window.map(|d| d.as_secs_f64()),
            "process_cpu_ms_per_epoch": self.cpu_ms_per_epoch(),
            "bare_sum_cpu_ms_per_epoch": self.bare_cpu_ms_per_epoch(),
            "etcd_cpu_ms_per_epoch": self.metrics.get("process_cpu_seconds_total").map(|s| s * 1e3 / self.epochs.max(1) as f64),
            "revision_delta": self.revision_delta,
            "writes_per_epoch": self.writes_per_epoch(),
            "requests_per_epoch": self.requests_per_epoch(),
            "requests_per_epoch_by_method": self.requests_by_method(),
            "lease_keepalive_msgs_per_s": self.stream_msgs_per_s("LeaseKeepAlive"),
            "etcd_counters_delta": self.metrics,
            "limit_ms": self.limit_ms,
            "cas_ms": self.cas_ms,
            "rtt_ms": self.rtt_ms,
            "bare_calls_per_s": self.bare_calls_per_s,
            "calls_per_epoch": self.calls_per_epoch,
            "cpu_limit_ms": self.cpu_limit_ms(),
            "churn": self.churn.as_ref().map(|c| json!({
                "crashed": {"primaries": c.primaries, "staffers": c.staffers, "backups": c.backups, "spares": c.spares},
                "epochs_during": c.epochs_during,
                "restaffed_s": c.restaffed.map(|d| d.as_secs_f64()),
                "epochs_checked": c.epochs_checked,
                "violations": c.violations.iter().take(20).collect::<Vec<_>>(),
            })),
        })
    }
}

/// Per block, `a ÷ b`, with their median, min and max.
fn block_ratios(a: &[f64], b: &[f64]) -> Value {
    let r: Vec<f64> = a.iter().zip(b).map(|(a, b)| a / b).collect();
    json!({"ratios": r, "stats": Stats::of(&r)})
}

/// Median of `v` (`NaN` if empty).
fn median(v: &[f64]) -> f64 {
    Stats::of(v).map_or(f64::NAN, |s| s.median)
}

/// Adds `d` into `sum`, key by key.
fn add_into(sum: &mut BTreeMap<String, f64>, d: BTreeMap<String, f64>) {
    for (k, v) in d {
        *sum.entry(k).or_insert(0.0) += v;
    }
}

/// Collects the root's epoch entries until it has entered epoch `e`.
async fn wait_for_root(
    entries: &mut mpsc::UnboundedReceiver<(Epoch, Instant)>,
    at: &mut BTreeMap<Epoch, Instant>,
    e: Epoch,
    timeout: Duration,
) -> Result<(), BoxError> {
    let deadline = tokio::time::Instant::now() + timeout;
    while !at.contains_key(&e) {
        match tokio::time::timeout_at(deadline, entries.recv()).await {
            Ok(Some((epoch, when))) => {
                at.insert(epoch, when);
            }
            Ok(None) => return Err(format!("the root is gone before epoch {e}").into()),
            Err(_) => {
                let last = at.keys().next_back().copied();
                return Err(format!(
                    "the root did not reach epoch {e} within {timeout:?} (last entered: {last:?})"
                )
                .into());
            }
        }
    }
    Ok(())
}

/// Runs the sum workload once; fills `out` as it goes, so a failure keeps what was measured.
pub async fn run_sum(etcd: &Etcd, run: &SumRun, out: &mut SumFigures) -> Result<(), BoxError> {
    let job = taskgraph_tests::job_name(&format!("sum{}", run.tasks));
    let (entries_tx, mut entries) = mpsc::unbounded_channel();
    let audit = Audit::with_callback(move |_, e| {
        if let Event::Enter { task: 0, epoch, .. } = e {
            let _ = entries_tx.send((*epoch, Instant::now()));
        }
    });
    audit.close_gate();
    let until = run.warm + run.window_epochs() + run.churn.as_ref().map_or(0, |c| c.epochs);
    let builder = DataflowBuilder {
        node: "bench".into(),
        audit: audit.clone(),
        until,
        pace: Duration::ZERO,
        state: false,
    };
    let spec = FleetSpec {
        etcd: etcd.endpoints(),
        job,
        tasks: run.tasks,
        replicas: run.replicas,
        ttl: run.ttl,
        max_frame_bytes: None,
    };
    let url = etcd.metrics_url();
    let before = etcd_metrics(&url).await?;
    out.rss_before = rss_bytes();
    let t0 = Instant::now();
    let mut fleet =
        Fleet::start_until(&spec, builder.clone(), Some(t0 + run.staff_timeout)).await?;
    out.nodes = fleet.len();
    // The limit counts from the first node's start: starting 2,048 nodes is part of staffing.
    let staffed = fleet
        .wait_staffed(run.tasks, run.replicas, t0 + run.staff_timeout)
        .await;
    if let Ok(after) = etcd_metrics(&url).await {
        out.staffing_metrics = delta(&before, &after);
    }
    if let Err(e) = staffed {
        let keys = lacking_keys(etcd, &spec.job, &fleet, run.tasks).await;
        let ended: Vec<String> = fleet
            .reap_finished()
            .await
            .into_iter()
            .take(3)
            .map(|(n, how)| format!("{n}× {how}"))
            .collect();
        let why = format!(
            "{e}; in etcd: {keys}; nodes that ended: [{}]",
            ended.join("; ")
        );
        if !run.staff_may_fail {
            return Err(why.into());
        }
        out.not_staffed = Some((run.staff_timeout, why));
        out.rss_staffed = rss_bytes();
        // The nodes go first: the baselines are measured on an idle machine, as they would be
        // beside a staffed, idle fleet.
        drop(fleet);
        if run.baselines {
            let mut client = etcd.client().await?;
            let mut limit = LimitModel::start(&mut client, run.tasks).await?;
            let mut bare = BareSum::start(&etcd.endpoints(), run.tasks).await?;
            bare.run_block(run.warm.max(2), run.epoch_timeout * run.warm.max(2) as u32)
                .await?;
            for _ in 0..run.blocks {
                let b = bare
                    .run_block(run.per_block, run.epoch_timeout * run.per_block as u32)
                    .await?;
                out.bare_block_ms.push(median(&b));
                out.bare_ms.extend(b);
                limit.block(&mut client, run.limit_trials, out).await?;
            }
            bare.clean_up().await;
            limit.clean_up(&mut client).await;
        }
        return Ok(());
    }
    out.staffing = Some(t0.elapsed());
    out.rss_staffed = rss_bytes();

    let mut client = etcd.client().await?;
    let mut at = BTreeMap::new();
    audit.open_gate_until(run.warm);
    wait_for_root(
        &mut entries,
        &mut at,
        run.warm,
        run.epoch_timeout * run.warm.max(1) as u32,
    )
    .await?;
    let mut limit = if run.limit_trials > 0 {
        Some(LimitModel::start(&mut client, run.tasks).await?)
    } else {
        None
    };
    let mut bare = if run.baselines {
        let mut b = BareSum::start(&etcd.endpoints(), run.tasks).await?;
        b.run_block(run.warm.max(2), run.epoch_timeout * run.warm.max(2) as u32)
            .await?;
        Some(b)
    } else {
        None
    };
    let mut window = Duration::ZERO;
    let mut cpu = Some(Duration::ZERO);
    let mut revisions = 0;
    let mut reached = run.warm;
    for _ in 0..run.blocks {
        // The revision is read outside the counters' window, so the bench's own reads are not
        // counted as the framework's requests.
        let r0 = revision(&mut client).await?;
        let m0 = etcd_metrics(&url).await?;
        let w0 = Instant::now();
        let c0 = cpu_time();
        let from = reached;
        reached += run.per_block;
        audit.open_gate_until(reached);
        let done = wait_for_root(
            &mut entries,
            &mut at,
            reached,
            run.epoch_timeout * run.per_block as u32,
        )
        .await;
        // Epochs entered so far, root entry to root entry; the first epoch of the block is
        // left out (the root entered it before the block and waited at the gate).
        let block: Vec<f64> = (from + 1..reached)
            .filter_map(|e| Some(ms(*at.get(&(e + 1))? - *at.get(&e)?)))
            .collect();
        out.epoch_block_ms.push(median(&block));
        out.epoch_ms.extend(block);
        done?;
        window += w0.elapsed();
        cpu = match (cpu, c0, cpu_time()) {
            (Some(sum), Some(a), Some(b)) => Some(sum + b.saturating_sub(a)),
            _ => None,
        };
        let m1 = etcd_metrics(&url).await?;
        let r1 = revision(&mut client).await?;
        add_into(&mut out.metrics, delta(&m0, &m1));
        revisions += r1 - r0;
        out.epochs += run.per_block;
        out.window = Some(window);
        out.window_cpu = cpu;
        out.revision_delta = Some(revisions);

        // The baselines, against the same etcd while the nodes sit idle at the gate (their
        // leases are still kept alive, as during the epochs).
        if let Some(bare) = bare.as_mut() {
            let c0 = cpu_time();
            let b = bare
                .run_block(run.per_block, run.epoch_timeout * run.per_block as u32)
                .await?;
            // From zero at the first block; once unknown, unknown.
            let sum = if out.bare_epochs == 0 {
                Some(Duration::ZERO)
            } else {
                out.bare_cpu
            };
            out.bare_cpu = match (sum, c0, cpu_time()) {
                (Some(sum), Some(a), Some(b)) => Some(sum + b.saturating_sub(a)),
                _ => None,
            };
            out.bare_epochs += run.per_block;
            out.bare_block_ms.push(median(&b));
            out.bare_ms.extend(b);
        }
        if let Some(limit) = limit.as_mut() {
            limit.block(&mut client, run.limit_trials, out).await?;
        }
    }
    if let Some(bare) = bare {
        bare.clean_up().await;
    }
    if let Some(limit) = limit {
        limit.clean_up(&mut client).await;
    }

    if let Some(churn) = &run.churn {
        let mut c = ChurnFigures::default();
        let r = churn_phase(
            &mut fleet,
            &spec,
            &builder,
            &audit,
            (&mut entries, &mut at),
            (reached, until),
            run,
            churn,
            &mut c,
        )
        .await;
        out.churn = Some(c);
        r?;
    }

    audit.open_gate();
    fleet
        .finish(run.epoch_timeout.max(Duration::from_secs(30)))
        .await
}

/// Crashes and replaces nodes while the job runs from epoch `from` on to `until`; then checks
/// that every slot is filled again and that the audit trail is clean (see [`Churn`]).
#[allow(clippy::too_many_arguments)]
async fn churn_phase(
    fleet: &mut Fleet,
    spec: &FleetSpec,
    builder: &DataflowBuilder,
    audit: &Audit,
    (entries, at): (
        &mut mpsc::UnboundedReceiver<(Epoch, Instant)>,
        &mut BTreeMap<Epoch, Instant>,
    ),
    (from, until): (Epoch, Epoch),
    run: &SumRun,
    churn: &Churn,
    out: &mut ChurnFigures,
) -> Result<(), BoxError> {
    audit.open_gate_until(until);
    let start = Instant::now();
    let mut next = start;
    let mut replaced = 0u32;
    while next.duration_since(start) < churn.duration {
        next += churn.every;
        tokio::time::sleep_until(next.into()).await;
        while let Ok((epoch, when)) = entries.try_recv() {
            at.insert(epoch, when);
        }
        match fleet.crash_one(rand::random::<u32>() as usize) {
            Some((_, taskgraph::Role::Primary { task: 0, .. })) => {
                out.primaries += 1;
                out.staffers += 1;
            }
            Some((_, taskgraph::Role::Primary { .. })) => out.primaries += 1,
            Some((_, taskgraph::Role::Backup { .. })) => out.backups += 1,
            Some((_, taskgraph::Role::Spare)) => out.spares += 1,
            None => return Err("churn: no node left to crash".into()),
        }
        fleet
            .add(spec, builder.clone(), format!("c{replaced}"))
            .await?;
        replaced += 1;
    }
    let last = Instant::now();
    while let Ok((epoch, when)) = entries.try_recv() {
        at.insert(epoch, when);
    }
    out.epochs_during = at
        .iter()
        .filter(|(e, t)| **e > from && **t >= start && **t <= last)
        .count() as u64;
    fleet
        .wait_staffed(
            run.tasks,
            run.replicas,
            last + run.staff_timeout.max(Duration::from_secs(60)),
        )
        .await
        .map_err(|e| format!("churn: not staffed again after the last crash: {e}"))?;
    out.restaffed = Some(last.elapsed());
    wait_for_root(entries, at, until, run.epoch_timeout * 4)
        .await
        .map_err(|e| format!("churn: {e}"))?;
    out.epochs_checked = until;
    out.violations = taskgraph_tests::dataflow::check_trail(&audit.events(), run.tasks, until);
    if let Some(v) = out.violations.first() {
        return Err(format!(
            "churn: the audit trail has {} violations; the first: {v}",
            out.violations.len()
        )
        .into());
    }
    Ok(())
}

/// The limit models of one epoch, against the same etcd as the nodes:
///
/// * L: one etcd compare-and-swap (the epoch's move) plus 2·depth sequential bare tonic round
///   trips (the parameter down the tree and the sums back up), each trial timed end to end;
/// * C, the CPU-bound limit: the epoch's node-to-node calls at the bare tonic rate (64 in
///   flight on one connection; all nodes share this process's cores);
/// * F = CAS + max(2·depth RTTs, C), per trial of L with its block's C.
struct LimitModel {
    _server: EchoServerHandle,
    echo: Echoer,
    key: String,
    value: u64,
    payload: Bytes,
    hops: usize,
    tasks: u32,
}

impl LimitModel {
    async fn start(client: &mut etcd_client::Client, tasks: u32) -> Result<Self, BoxError> {
        let server = echo_server().await?;
        let echo = Echoer::connect(&server.addr).await?;
        let key = format!("taskgraph-bench-limit-{:08x}", rand::random::<u32>());
        client.put(key.as_str(), "0", None).await?;
        // What a pull of the sum carries: one postcard-encoded u64.
        let payload = Bytes::from(taskgraph::encode(&7u64)?.to_vec());
        // Warm the connection.
        for _ in 0..3 {
            echo.echo(payload.clone()).await?;
        }
        Ok(LimitModel {
            _server: server,
            echo,
            key,
            value: 0,
            payload,
            hops: 2 * tree_depth(tasks) as usize,
            tasks,
        })
    }

    /// `trials` trials of L, then one measure of the bare rate (C), into `out`.
    async fn block(
        &mut self,
        client: &mut etcd_client::Client,
        trials: usize,
        out: &mut SumFigures,
    ) -> Result<(), BoxError> {
        let mut block = Vec::new();
        for _ in 0..trials {
            let t0 = Instant::now();
            let txn = Txn::new()
                .when([Compare::value(
                    self.key.as_str(),
                    CompareOp::Equal,
                    self.value.to_string(),
                )])
                .and_then([TxnOp::put(
                    self.key.as_str(),
                    (self.value + 1).to_string(),
                    None,
                )]);
            let r = client.txn(txn).await?;
            if !r.succeeded() {
                return Err("limit model: the compare-and-swap failed".into());
            }
            self.value += 1;
            let cas = t0.elapsed();
            for _ in 0..self.hops {
                let t = Instant::now();
                self.echo.echo(self.payload.clone()).await?;
                out.rtt_ms.push(ms(t.elapsed()));
            }
            let total = ms(t0.elapsed());
            out.limit_ms.push(total);
            out.cas_ms.push(ms(cas));
            block.push((ms(cas), total));
        }
        out.limit_block_ms
            .push(median(&block.iter().map(|(_, t)| *t).collect::<Vec<_>>()));
        // Per edge of the tree, an epoch makes three calls: the child's pull of the parameter,
        // the parent's pull of the child's sum, the child's `done` meta.
        out.calls_per_epoch = 3 * u64::from(self.tasks.saturating_sub(1));
        let t0 = Instant::now();
        let calls = 1000;
        let results: Vec<Result<(), BoxError>> = futures::stream::iter(0..calls)
            .map(|_| self.echo.echo(self.payload.clone()))
            .buffer_unordered(64)
            .collect()
            .await;
        results.into_iter().collect::<Result<Vec<()>, _>>()?;
        let rate = f64::from(calls) / t0.elapsed().as_secs_f64();
        out.bare_calls_per_s.push(rate);
        let c = out.calls_per_epoch as f64 / rate * 1e3;
        let f: Vec<f64> = block
            .iter()
            .map(|(cas, total)| cas + (total - cas).max(c))
            .collect();
        out.f_block_ms.push(median(&f));
        out.f_ms.extend(f);
        Ok(())
    }

    async fn clean_up(self, client: &mut etcd_client::Client) {
        let _ = client.delete(self.key.as_str(), None).await;
    }
}

/// What etcd holds for the first tasks without an acting primary or without every backup (for
/// the error of a failed staffing): each slot key with its lease, its value, and what the node
/// named in it says it is.
async fn lacking_keys(etcd: &Etcd, job: &str, fleet: &Fleet, tasks: u32) -> String {
    let s = fleet.statuses();
    let backups = fleet.replicas().saturating_sub(1) as usize;
    let lacking: Vec<u32> = (0..tasks)
        .filter(|t| {
            let acting_backups = s
                .iter()
                .filter(|(_, st)| st.acting && st.role == taskgraph::Role::Backup { task: *t })
                .count();
            !s.iter().any(|(_, st)| st.primary_of(*t).is_some()) || acting_backups < backups
        })
        .take(3)
        .collect();
    let Ok(mut client) = etcd.client().await else {
        return "etcd unreachable".into();
    };
    let mut out = Vec::new();
    for t in lacking {
        let prefix = format!("/taskgraph/jobs/{job}/tasks/{t}/");
        match client
            .get(
                prefix.as_str(),
                Some(etcd_client::GetOptions::new().with_prefix()),
            )
            .await
        {
            Ok(r) => {
                let kvs: Vec<String> = r
                    .kvs()
                    .iter()
                    .map(|kv| {
                        let value = kv.value_str().unwrap_or("?");
                        // That node's own view of its role.
                        let view = s
                            .iter()
                            .find(|(_, st)| value.contains(&format!("\"{}\"", st.node_id)))
                            .map(|(_, st)| {
                                format!("{:?} acting={} epoch={:?}", st.role, st.acting, st.epoch)
                            })
                            .unwrap_or_else(|| "not running".into());
                        format!(
                            "{} lease={:x} create_rev={} = {value} (its status: {view})",
                            kv.key_str().unwrap_or("?").trim_start_matches(&prefix),
                            kv.lease(),
                            kv.create_revision(),
                        )
                    })
                    .collect();
                out.push(format!("task {t}: [{}]", kvs.join(", ")));
            }
            Err(e) => out.push(format!("task {t}: {e}")),
        }
    }
    out.join("; ")
}
