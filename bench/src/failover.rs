//! Failover with nodes as processes (scenario `failover`).
//!
//! A job of 2 tasks (task 0 the parent of task 1), 2 replicas each, every node a `testnode`
//! process running the dataflow test app: every epoch task 0 pulls task 1's sum, task 1
//! pulls the parameter from task 0, and task 0 moves the job on after a short pause. A trial
//! signals the primary of task 1 (SIGKILL or SIGTERM, alternating) at a random moment and
//! takes, from the child's own time stamps: when task 1's backup acts as primary with a higher
//! term, when task 0 gets `neighbour_restarted` for task 1, and when task 0 next gets an answer
//! from task 1 served by the new primary. Then a fresh process replaces the victim (it becomes
//! task 1's backup) and the next trial starts once every slot is filled again.
//!
//! A second series ([`run_pair`]) adds a spare process and SIGKILLs task 1's primary and its
//! backup together: with evidence of death applied to the whole replica set (task 0's pull
//! ends the dead primary's lease, the spare ends the dead backup's), the spare restores task
//! 1 from its checkpoint without waiting for either lease to expire.

use std::time::Duration;

use serde_json::{json, Value};
use taskgraph_tests::apps::Event;
use taskgraph_tests::etcd::Etcd;
use taskgraph_tests::process::{now_us, Line, NodeArgs, ProcessNode, StatusLine};

use crate::common::BoxError;
use crate::report::Row;

/// Pause of task 0 before moving each epoch on (the pulls run at the start of each epoch).
pub const PACE_MS: u64 = 20;

/// A signal a trial sends to the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kill {
    /// SIGKILL: the lease is left behind.
    Sigkill,
    /// SIGTERM: the node stops cleanly and revokes its lease.
    Sigterm,
}

impl Kill {
    fn name(self) -> &'static str {
        match self {
            Kill::Sigkill => "SIGKILL",
            Kill::Sigterm => "SIGTERM",
        }
    }
}

/// One trial's times from the signal, in ms (`None`: not seen before the trial's limit).
#[derive(Debug, Clone, Copy, Default)]
pub struct Trial {
    /// Backup acting as primary.
    pub primary_ms: Option<f64>,
    /// Task 0 got `neighbour_failed` for task 1.
    pub failed_ms: Option<f64>,
    /// Task 0 got `neighbour_restarted` for task 1.
    pub restarted_ms: Option<f64>,
    /// Task 0 got an answer from task 1's new primary.
    pub pull_ms: Option<f64>,
}

struct Proc {
    node: ProcessNode,
    cursor: usize,
    status: Option<StatusLine>,
}

struct Procs {
    bin: String,
    args: NodeArgs,
    procs: Vec<Proc>,
}

/// A line of interest seen by [`Procs::scan`]: process, line index, line.
type Seen = (usize, usize, Line);

impl Procs {
    fn spawn(&mut self) -> Result<(), BoxError> {
        let node = ProcessNode::spawn(&self.bin, &self.args)
            .map_err(|e| format!("cannot start {}: {e}", self.bin))?;
        self.procs.push(Proc {
            node,
            cursor: 0,
            status: None,
        });
        Ok(())
    }

    /// Reads every line printed since the last scan; keeps each process's latest status and
    /// returns the lines `keep` wants.
    fn scan(&mut self, keep: impl Fn(&Line) -> bool) -> Vec<Seen> {
        let mut out = Vec::new();
        for (p, proc) in self.procs.iter_mut().enumerate() {
            let rx = proc.node.subscribe();
            let lines = rx.borrow();
            for (i, line) in lines.iter().enumerate().skip(proc.cursor) {
                if let Line::Status(s) = line {
                    proc.status = Some(s.clone());
                }
                if keep(line) {
                    out.push((p, i, line.clone()));
                }
            }
            proc.cursor = lines.len();
        }
        out
    }

    /// The time stamp of line `i` of process `p`.
    fn stamp(&self, p: usize, i: usize) -> Option<u64> {
        self.procs.get(p)?.node.stamps().get(i).copied().flatten()
    }

    /// (primary of task 1 and its term, its acting backup) once every slot is filled.
    fn staffed(&self) -> Option<(usize, u64, usize)> {
        let st = |p: &Proc| p.status.clone();
        let primary0 = self
            .procs
            .iter()
            .filter(|p| st(p).and_then(|s| s.primary_of(0)).is_some())
            .count();
        let backups = |t: u32| {
            self.procs
                .iter()
                .filter(|p| {
                    st(p).is_some_and(|s| s.role == "backup" && s.acting && s.task == Some(t))
                })
                .count()
        };
        let (p1, term) = self
            .procs
            .iter()
            .enumerate()
            .find_map(|(i, p)| Some((i, st(p)?.primary_of(1)?)))?;
        let b1 = self.procs.iter().position(|p| {
            st(p).is_some_and(|s| s.role == "backup" && s.acting && s.task == Some(1))
        })?;
        (primary0 == 1 && backups(0) == 1 && backups(1) == 1).then_some((p1, term, b1))
    }

    /// Whether some process is an acting spare.
    fn has_spare(&self) -> bool {
        self.procs.iter().any(|p| {
            p.status
                .as_ref()
                .is_some_and(|s| s.role == "spare" && s.acting)
        })
    }

    fn describe(&self) -> String {
        self.procs
            .iter()
            .map(|p| format!("pid {}: {:?}", p.node.pid(), p.status))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Runs `trials` trials per signal (alternating) in one job with lease TTL `ttl_secs`.
pub async fn run(
    etcd: &Etcd,
    bin: &str,
    ttl_secs: u64,
    trials: usize,
    out: &mut Vec<(Kill, Trial)>,
) -> Result<(), BoxError> {
    let args = NodeArgs {
        etcd: etcd.endpoints(),
        job: taskgraph_tests::job_name(&format!("failover{ttl_secs}")),
        tasks: 2,
        replicas: 2,
        ttl_secs,
        drive_until: None,
        pace_ms: PACE_MS,
        dataflow_until: Some(1_000_000_000),
    };
    let mut procs = Procs {
        bin: bin.to_owned(),
        args,
        procs: Vec::new(),
    };
    for _ in 0..4 {
        procs.spawn()?;
    }
    let limit = Duration::from_secs(10 + 3 * ttl_secs);
    for k in 0..2 * trials {
        let kill = if k % 2 == 0 {
            Kill::Sigkill
        } else {
            Kill::Sigterm
        };
        // Every slot filled (the replacement of the last victim is task 1's backup).
        let deadline = tokio::time::Instant::now() + limit;
        let (victim, term, _backup) = loop {
            procs.scan(|_| false);
            if let Some(s) = procs.staffed() {
                break s;
            }
            if tokio::time::Instant::now() > deadline {
                return Err(format!(
                    "trial {k}: slots not all filled within {limit:?}: {}",
                    procs.describe()
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        // A random moment, so the signal does not always hit the same phase of the backup's
        // liveness checks or of the epoch.
        let settle = Duration::from_millis(200 + rand::random::<u64>() % 500);
        tokio::time::sleep(settle).await;
        procs.scan(|_| false);
        if procs.procs[victim]
            .status
            .as_ref()
            .and_then(|s| s.primary_of(1))
            != Some(term)
        {
            return Err(format!(
                "trial {k}: task 1's primary changed before the signal: {}",
                procs.describe()
            )
            .into());
        }
        let t0 = now_us();
        let node = &procs.procs[victim].node;
        match kill {
            Kill::Sigkill => node.kill9(),
            Kill::Sigterm => node.terminate(),
        }
        .map_err(|e| format!("trial {k}: {} to pid {}: {e}", kill.name(), node.pid()))?;
        let mut trial = Trial::default();
        let since = |at: Option<u64>| at.filter(|a| *a >= t0).map(|a| (a - t0) as f64 / 1e3);
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let seen = procs.scan(|l| match l {
                Line::Status(s) => s.primary_of(1).is_some_and(|t| t > term),
                Line::Event(Event::Neighbour {
                    task: 0,
                    neighbour: 1,
                    ..
                }) => true,
                Line::Event(Event::Data {
                    task: 0,
                    from: 1,
                    server_term,
                    ..
                }) => *server_term > term,
                _ => false,
            });
            for (p, i, line) in seen {
                let at = since(procs.stamp(p, i));
                match line {
                    Line::Status(_) => trial.primary_ms = trial.primary_ms.or(at),
                    Line::Event(Event::Neighbour { failed: true, .. }) => {
                        trial.failed_ms = trial.failed_ms.or(at)
                    }
                    Line::Event(Event::Neighbour { failed: false, .. }) => {
                        trial.restarted_ms = trial.restarted_ms.or(at)
                    }
                    Line::Event(Event::Data { .. }) => trial.pull_ms = trial.pull_ms.or(at),
                    _ => {}
                }
            }
            if trial.primary_ms.is_some() && trial.restarted_ms.is_some() && trial.pull_ms.is_some()
            {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                out.push((kill, trial));
                return Err(format!(
                    "trial {k} ({}, TTL {ttl_secs} s): within {limit:?} saw backup primary {:?} ms, \
                     neighbour restarted {:?} ms, next pull {:?} ms; {}",
                    kill.name(),
                    trial.primary_ms,
                    trial.restarted_ms,
                    trial.pull_ms,
                    procs.describe()
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        out.push((kill, trial));
        // Reap the victim; its replacement becomes task 1's backup.
        let mut gone = procs.procs.remove(victim);
        if let Err(e) = gone.node.wait_exit(Duration::from_secs(10)).await {
            let _ = gone.node.kill9();
            return Err(format!("trial {k}: the victim did not exit: {e}").into());
        }
        procs.spawn()?;
    }
    // SIGTERM the rest: they stop cleanly.
    for p in &procs.procs {
        let _ = p.node.terminate();
    }
    for p in procs.procs.iter_mut() {
        let _ = p.node.wait_exit(Duration::from_secs(10)).await;
    }
    Ok(())
}

/// Runs `trials` trials of SIGKILL to task 1's primary and backup together, in one job of
/// 2 tasks × 2 replicas plus a spare, with lease TTL `ttl_secs`. A trial's `primary_ms` is
/// when the spare acts as task 1's primary.
pub async fn run_pair(
    etcd: &Etcd,
    bin: &str,
    ttl_secs: u64,
    trials: usize,
    out: &mut Vec<Trial>,
) -> Result<(), BoxError> {
    let args = NodeArgs {
        etcd: etcd.endpoints(),
        job: taskgraph_tests::job_name(&format!("failover-pair{ttl_secs}")),
        tasks: 2,
        replicas: 2,
        ttl_secs,
        drive_until: None,
        pace_ms: PACE_MS,
        dataflow_until: Some(1_000_000_000),
    };
    let mut procs = Procs {
        bin: bin.to_owned(),
        args,
        procs: Vec::new(),
    };
    for _ in 0..5 {
        procs.spawn()?;
    }
    let limit = Duration::from_secs(10 + 3 * ttl_secs);
    for k in 0..trials {
        let deadline = tokio::time::Instant::now() + limit;
        let (victim, term, backup) = loop {
            procs.scan(|_| false);
            if let Some(s) = procs.staffed().filter(|_| procs.has_spare()) {
                break s;
            }
            if tokio::time::Instant::now() > deadline {
                return Err(format!(
                    "pair trial {k}: slots and a spare not all there within {limit:?}: {}",
                    procs.describe()
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let settle = Duration::from_millis(200 + rand::random::<u64>() % 500);
        tokio::time::sleep(settle).await;
        procs.scan(|_| false);
        let still = |i: usize, primary: bool| {
            procs.procs[i].status.as_ref().is_some_and(|s| {
                if primary {
                    s.primary_of(1) == Some(term)
                } else {
                    s.role == "backup" && s.acting && s.task == Some(1)
                }
            })
        };
        if !still(victim, true) || !still(backup, false) {
            return Err(format!(
                "pair trial {k}: task 1's replica set changed before the signal: {}",
                procs.describe()
            )
            .into());
        }
        let t0 = now_us();
        for i in [victim, backup] {
            let node = &procs.procs[i].node;
            node.kill9()
                .map_err(|e| format!("pair trial {k}: SIGKILL to pid {}: {e}", node.pid()))?;
        }
        let mut trial = Trial::default();
        let since = |at: Option<u64>| at.filter(|a| *a >= t0).map(|a| (a - t0) as f64 / 1e3);
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let seen = procs.scan(|l| match l {
                Line::Status(s) => s.primary_of(1).is_some_and(|t| t > term),
                Line::Event(Event::Neighbour {
                    task: 0,
                    neighbour: 1,
                    ..
                }) => true,
                Line::Event(Event::Data {
                    task: 0,
                    from: 1,
                    server_term,
                    ..
                }) => *server_term > term,
                _ => false,
            });
            for (p, i, line) in seen {
                let at = since(procs.stamp(p, i));
                match line {
                    Line::Status(_) => trial.primary_ms = trial.primary_ms.or(at),
                    Line::Event(Event::Neighbour { failed: true, .. }) => {
                        trial.failed_ms = trial.failed_ms.or(at)
                    }
                    Line::Event(Event::Neighbour { failed: false, .. }) => {
                        trial.restarted_ms = trial.restarted_ms.or(at)
                    }
                    Line::Event(Event::Data { .. }) => trial.pull_ms = trial.pull_ms.or(at),
                    _ => {}
                }
            }
            if trial.primary_ms.is_some() && trial.restarted_ms.is_some() && trial.pull_ms.is_some()
            {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                out.push(trial);
                return Err(format!(
                    "pair trial {k} (TTL {ttl_secs} s): within {limit:?} saw the spare primary \
                     {:?} ms, neighbour restarted {:?} ms, next pull {:?} ms; {}",
                    trial.primary_ms,
                    trial.restarted_ms,
                    trial.pull_ms,
                    procs.describe()
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        out.push(trial);
        // Reap both victims (the higher index first); two fresh processes become task 1's
        // backup and the next spare.
        for i in [victim.max(backup), victim.min(backup)] {
            let mut gone = procs.procs.remove(i);
            if let Err(e) = gone.node.wait_exit(Duration::from_secs(10)).await {
                let _ = gone.node.kill9();
                return Err(format!("pair trial {k}: a victim did not exit: {e}").into());
            }
        }
        procs.spawn()?;
        procs.spawn()?;
    }
    for p in &procs.procs {
        let _ = p.node.terminate();
    }
    for p in procs.procs.iter_mut() {
        let _ = p.node.wait_exit(Duration::from_secs(10)).await;
    }
    Ok(())
}

/// Rows of the trials of [`run_pair`].
pub fn pair_rows(ttl_secs: u64, trials: &[Trial]) -> Vec<Row> {
    let ttl_ms = ttl_secs as f64 * 1e3;
    let of = |f: fn(&Trial) -> Option<f64>| -> Vec<f64> { trials.iter().filter_map(f).collect() };
    [
        ("spare acts as primary", of(|t| t.primary_ms)),
        ("neighbour restarted", of(|t| t.restarted_ms)),
        ("next pull answered", of(|t| t.pull_ms)),
    ]
    .into_iter()
    .map(|(what, values)| {
        let row = Row::new(
            format!("primary and backup killed together (SIGKILL), TTL {ttl_secs} s: {what}"),
            "ms",
            &values,
        );
        let vs = row
            .median()
            .map(|m| format!("÷ TTL {:.3}×", m / ttl_ms))
            .unwrap_or_default();
        row.versus(vs)
    })
    .collect()
}

/// The pair trials as JSON.
pub fn pair_json(ttl_secs: u64, trials: &[Trial]) -> Value {
    json!({
        "ttl_s": ttl_secs,
        "pace_ms": PACE_MS,
        "signal": "SIGKILL of the primary and the backup",
        "trials": trials.iter().map(|t| json!({
            "spare_primary_ms": t.primary_ms,
            "neighbour_failed_ms": t.failed_ms,
            "neighbour_restarted_ms": t.restarted_ms,
            "next_pull_ms": t.pull_ms,
        })).collect::<Vec<_>>(),
    })
}

/// Rows of one TTL's trials.
pub fn rows(ttl_secs: u64, trials: &[(Kill, Trial)]) -> Vec<Row> {
    let ttl_ms = ttl_secs as f64 * 1e3;
    let mut rows = Vec::new();
    for kill in [Kill::Sigkill, Kill::Sigterm] {
        let of = |f: fn(&Trial) -> Option<f64>| -> Vec<f64> {
            trials
                .iter()
                .filter(|(k, _)| *k == kill)
                .filter_map(|(_, t)| f(t))
                .collect()
        };
        for (what, values) in [
            ("backup acts as primary", of(|t| t.primary_ms)),
            ("neighbour restarted", of(|t| t.restarted_ms)),
            ("next pull answered", of(|t| t.pull_ms)),
        ] {
            let row = Row::new(
                format!("{}, TTL {ttl_secs} s: {what}", kill.name()),
                "ms",
                &values,
            );
            let vs = row
                .median()
                .map(|m| format!("÷ TTL {:.3}×", m / ttl_ms))
                .unwrap_or_default();
            rows.push(row.versus(vs));
        }
    }
    rows
}

/// The trials as JSON.
pub fn json(ttl_secs: u64, trials: &[(Kill, Trial)]) -> Value {
    json!({
        "ttl_s": ttl_secs,
        "pace_ms": PACE_MS,
        "trials": trials.iter().map(|(k, t)| json!({
            "signal": k.name(),
            "backup_primary_ms": t.primary_ms,
            "neighbour_failed_ms": t.failed_ms,
            "neighbour_restarted_ms": t.restarted_ms,
            "next_pull_ms": t.pull_ms,
        })).collect::<Vec<_>>(),
    })
}
