//! The local mode: one whole job on this machine, each node a separate process, optionally
//! with a chaos monkey killing nodes; then a summary, a report, and a verdict.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use tokio::process::{ChildStdin, Command};
use tokio::sync::{mpsc, oneshot};

use taskgraph::etcd::keys::JobKey;
use taskgraph::etcd::keys::NodeRecord;
use taskgraph::etcd::watch::JobEvent;
use taskgraph::{JobClient, JobSpec, JobState, StallNote, Term};

use crate::args::{JobArgs, LocalArgs};
use crate::local_etcd::LocalEtcd;
use crate::task::JobResult;
use crate::workload::WorkloadKind;

/// The JSON report of a local run (`--report`).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The job's name.
    pub job: String,
    /// `sum` or `linreg`.
    pub workload: String,
    /// Number of tasks.
    pub tasks: u32,
    /// Nodes per task.
    pub replicas: u32,
    /// Spare nodes.
    pub spares: u32,
    /// Epochs run.
    pub epochs: u64,
    /// The data set's seed.
    pub seed: u64,
    /// The root's figure per epoch: the integer for `sum`, the loss for `linreg`.
    pub per_epoch: Vec<serde_json::Value>,
    /// The learned weights (`linreg`; empty for `sum`).
    pub weights: Vec<f64>,
    /// The weights the data set was generated from (`linreg`).
    pub true_weights: Vec<f64>,
    /// Nodes killed by the chaos mode.
    pub kills: u64,
    /// Times a task got a new primary after its first one.
    pub failovers: u64,
    /// From launching the nodes to the job's end.
    pub elapsed_ms: u64,
    /// The chaos mode's interval and seed, when on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chaos: Option<Chaos>,
}

/// The chaos settings of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Chaos {
    /// Milliseconds between kills.
    pub kill_every_ms: u64,
    /// Seed of the victims' choice.
    pub seed: u64,
}

/// Why a local run did not succeed, with the process's exit code (see `regression --help`).
#[derive(Debug)]
pub struct Failure {
    /// 1: failed; 3: stalled and did not heal; 4: shut down before its last epoch.
    pub code: u8,
    /// One line (more for where the node logs are).
    pub message: String,
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Failure { code: 1, message }
    }
}

/// Exit code: the job stalled and did not heal.
pub const EXIT_STALLED: u8 = 3;
/// Exit code: the job was shut down before its last epoch.
pub const EXIT_SHUT_DOWN: u8 = 4;

/// Runs the job; `Ok` only if it finished with a correct result.
pub async fn run(local: LocalArgs, mut job: JobArgs) -> Result<Report, Failure> {
    let workload = job.workload()?;
    taskgraph::Tree::new(job.tasks, job.fanout).map_err(|e| e.to_string())?;
    let etcd = if job.etcd.is_empty() {
        let etcd = LocalEtcd::start().await?;
        job.etcd = vec![etcd.endpoint().to_owned()];
        Some(etcd)
    } else {
        None
    };
    let outcome = run_on(&local, &mut job).await;
    if let Some(etcd) = etcd {
        etcd.stop().await;
    }
    let (report, result) = outcome?;
    check(&job, &workload, &result)?;
    Ok(report)
}

async fn run_on(local: &LocalArgs, job: &mut JobArgs) -> Result<(Report, JobResult), Failure> {
    let name = job
        .job
        .get_or_insert_with(|| format!("regression-{:08x}", rand::random::<u32>()))
        .clone();
    let client = JobClient::connect_secure(
        &job.etcd,
        &name,
        Duration::from_secs(5),
        job.security.etcd_tls().as_ref(),
        job.security.etcd_auth()?.as_ref(),
    )
    .await
    .map_err(|e| e.to_string())?;
    refuse_existing(&client, job, &name).await?;

    let logs = tempfile::Builder::new()
        .prefix("regression-logs-")
        .tempdir()
        .map_err(|e| format!("cannot create a folder for the node logs: {e}"))?;
    let logs_dir = match &local.node_logs {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            dir.clone()
        }
        None => logs.path().to_owned(),
    };
    let mut fleet = Fleet::new(job.clone(), logs_dir.clone())?;
    let total = job.tasks * job.replicas + local.spares;
    let started = Instant::now();
    for _ in 0..total {
        fleet.launch()?;
    }
    let progress = Progress::new(job.epochs, local.quiet);
    let mut watch = client.watch();
    let mut terms: BTreeMap<u32, Term> = BTreeMap::new();
    let (mut kills, mut failovers) = (0u64, 0u64);
    let mut rng = ChaCha8Rng::seed_from_u64(local.chaos_seed);
    let chaos_every = local.chaos_kill_every.unwrap_or(Duration::from_secs(3600));
    let mut chaos =
        tokio::time::interval_at(tokio::time::Instant::now() + chaos_every, chaos_every);
    let deadline = tokio::time::sleep(local.timeout);
    tokio::pin!(deadline);
    let mut failure: Option<Failure> = None;
    let mut stalls = Stalls::default();
    let mut stall_check = tokio::time::interval(Duration::from_millis(500));
    let finished = loop {
        tokio::select! {
            event = watch.recv() => {
                let Some(event) = event else {
                    failure = Some("the watch of the job ended".to_owned().into());
                    break None;
                };
                if let Some(state) = follow(&client, event, &mut terms, &mut failovers, &mut stalls) {
                    progress.update(state, kills, failovers);
                    if state.finished {
                        break Some(state);
                    }
                }
                for line in stalls.news() {
                    progress.bar.suspend(|| eprintln!("{line}"));
                }
            }
            _ = stall_check.tick() => {
                if let Some(line) = stalls.given_up(&name, local.stall_limit) {
                    failure = Some(Failure { code: EXIT_STALLED, message: line });
                    break None;
                }
            }
            _ = chaos.tick(), if local.chaos_kill_every.is_some() => {
                if fleet.kill_random(&mut rng) {
                    kills += 1;
                    fleet.launch()?;
                }
            }
            Some((index, status)) = fleet.exits.recv() => {
                if let Some(problem) = fleet.exited(index, status) {
                    failure = Some(problem.into());
                    break None;
                }
            }
            () = &mut deadline => {
                failure = Some(format!("the job did not finish within {}", humantime::format_duration(local.timeout)).into());
                break None;
            }
            _ = tokio::signal::ctrl_c() => {
                failure = Some("interrupted".to_owned().into());
                break None;
            }
        }
    };
    let elapsed = started.elapsed();
    progress.finish();
    let result = match finished {
        Some(_) => client
            .result()
            .await
            .map_err(|e| Failure::from(e.to_string())),
        None => Err(failure.unwrap_or_else(|| Failure::from(String::new()))),
    };
    let stopped_cleanly = fleet.stop().await;
    let result = match (result, finished) {
        (Ok(Some(bytes)), _) => serde_json::from_slice::<JobResult>(&bytes)
            .map_err(|e| format!("the job's result is not what the root writes: {e}").into()),
        // Ended without a result: not by the root, which always stores one.
        (Ok(None), Some(state)) => Err(Failure {
            code: EXIT_SHUT_DOWN,
            message: format!(
                "job {name} was shut down at epoch {} (by `taskgraph shutdown` or `shutdown_job`) before its {} epochs",
                state.epoch, job.epochs
            ),
        }),
        (Ok(None), None) => Err("the job finished without a result".to_owned().into()),
        (Err(e), _) => Err(e),
    };
    let result = match result {
        Ok(r) => r,
        Err(mut e) => {
            let kept = match &local.node_logs {
                Some(_) => logs_dir,
                None => logs.keep(),
            };
            e.message = format!("{}\nnode logs: {}", e.message, kept.display());
            return Err(e);
        }
    };
    if !stopped_cleanly {
        tracing::warn!("some nodes had to be killed after the job finished");
    }
    let report = Report {
        job: name,
        workload: job.workload.name().to_owned(),
        tasks: job.tasks,
        replicas: job.replicas,
        spares: local.spares,
        epochs: job.epochs,
        seed: job.seed,
        per_epoch: result.per_epoch.clone(),
        weights: result.weights.clone(),
        true_weights: result.true_weights.clone(),
        kills,
        failovers,
        elapsed_ms: elapsed.as_millis() as u64,
        chaos: local.chaos_kill_every.map(|d| Chaos {
            kill_every_ms: d.as_millis() as u64,
            seed: local.chaos_seed,
        }),
    };
    Ok((report, result))
}

/// The local mode creates its job: an existing one of the same name is refused, naming what
/// differs when its spec is another.
async fn refuse_existing(client: &JobClient, job: &JobArgs, name: &str) -> Result<(), String> {
    let Some(stored) = client.spec().await.map_err(|e| e.to_string())? else {
        return Ok(());
    };
    let mine: JobSpec = crate::node::framework(job, name)?
        .build()
        .map_err(|e| e.to_string())?
        .config()
        .spec();
    if let Some(difference) = JobSpec::difference(&stored, &mine) {
        return Err(format!(
            "job {name:?} already exists with a different spec: {difference}"
        ));
    }
    let state = client.state().await.map_err(|e| e.to_string())?;
    Err(match state {
        Some(JobState {
            finished: true,
            epoch,
        }) => {
            format!("job {name:?} already ran (it finished at epoch {epoch}); choose another --job")
        }
        Some(JobState { epoch, .. }) => {
            format!("job {name:?} is already running (epoch {epoch}); choose another --job")
        }
        None => format!("job {name:?} already exists; choose another --job"),
    })
}

/// Follows the job's keys: returns its state when the epoch key changed, and counts failovers
/// (a task's primary key created anew after the task had one).
fn follow(
    client: &JobClient,
    event: JobEvent,
    terms: &mut BTreeMap<u32, Term>,
    failovers: &mut u64,
    stalls: &mut Stalls,
) -> Option<JobState> {
    let keys = client.keys();
    let mut state = None;
    let mut seen = |kv: &taskgraph::etcd::Kv, counting: bool| match keys.parse(&kv.key) {
        Some(JobKey::Epoch) => {
            if let Ok(v) = taskgraph::etcd::keys::EpochValue::parse(&kv.value) {
                state = Some(JobState::from(v));
            }
        }
        Some(JobKey::Node(node)) => {
            let note = serde_json::from_slice::<NodeRecord>(&kv.value)
                .ok()
                .and_then(|r| r.stall);
            stalls.note(node, note);
        }
        Some(JobKey::Primary(t)) => {
            let term = kv.create_revision as Term;
            match terms.insert(t, term) {
                Some(old) if old != term && counting => *failovers += 1,
                _ => {}
            }
        }
        _ => {}
    };
    match &event {
        JobEvent::Snapshot { kvs, .. } => kvs.iter().for_each(|kv| seen(kv, false)),
        JobEvent::Put(kv) => seen(kv, true),
        JobEvent::Delete { key, .. } => {
            if let Some(JobKey::Node(node)) = keys.parse(key) {
                stalls.note(node, None);
            }
        }
        JobEvent::Disconnected => {}
    }
    state
}

/// The stall reports of the job's nodes (in their records), as the launcher follows them.
#[derive(Debug, Default)]
struct Stalls {
    notes: BTreeMap<String, StallNote>,
    /// Since when some node reports a stall.
    since: Option<Instant>,
    /// Reasons already printed during this stall.
    printed: Vec<String>,
    /// Lines to print.
    news: Vec<String>,
}

impl Stalls {
    fn note(&mut self, node: String, note: Option<StallNote>) {
        match note {
            Some(note) => {
                if self.since.is_none() {
                    self.since = Some(Instant::now());
                    self.news.push(format!(
                        "warning: the job is stalled: epoch {} has not moved for {:.1} s",
                        note.epoch,
                        note.for_ms as f64 / 1000.0
                    ));
                }
                for r in &note.reasons {
                    if !self.printed.contains(&r.text) {
                        self.printed.push(r.text.clone());
                        self.news.push(format!("warning: stalled: {}", r.text));
                    }
                }
                self.notes.insert(node, note);
            }
            None => {
                if self.notes.remove(&node).is_some() && self.notes.is_empty() {
                    self.since = None;
                    self.printed.clear();
                    self.news.push("the job moves again".into());
                }
            }
        }
    }

    fn news(&mut self) -> Vec<String> {
        std::mem::take(&mut self.news)
    }

    /// The error line once the job has stayed stalled for `limit` (default: five times the
    /// nodes' stall time, at least a minute) since the first report: it does not heal.
    fn given_up(&self, job: &str, limit: Option<Duration>) -> Option<String> {
        let since = self.since?;
        let after = self.notes.values().map(|n| n.after_ms).max()?;
        let limit = limit
            .unwrap_or_else(|| (Duration::from_millis(after) * 5).max(Duration::from_secs(60)));
        if since.elapsed() < limit {
            return None;
        }
        let epoch = self.notes.values().map(|n| n.epoch).max().unwrap_or(0);
        let stalled_for = self.notes.values().map(|n| n.for_ms).max().unwrap_or(0)
            + since.elapsed().as_millis() as u64;
        let cause = self
            .notes
            .values()
            .flat_map(|n| &n.reasons)
            .next()
            .map_or_else(
                || {
                    "no node sees a cause (an epoch longer than the stall time? see --stall-after)"
                        .to_owned()
                },
                |r| match (&r.key, r.task) {
                    (Some(key), _) => format!("{} [key {key}]", r.text),
                    (None, Some(t)) => format!("{} [task {t}]", r.text),
                    (None, None) => r.text.clone(),
                },
            );
        Some(format!(
            "job {job} stalled at epoch {epoch} for {:.1} s and did not heal: {cause}",
            stalled_for as f64 / 1000.0
        ))
    }
}

/// Checks the job's answer: `sum` must be exact, `linreg` must have learned.
fn check(job: &JobArgs, workload: &crate::workload::Workload, r: &JobResult) -> Result<(), String> {
    if let Some(e) = &r.error {
        return Err(format!("the job failed: {e}"));
    }
    if r.per_epoch.len() as u64 != job.epochs {
        return Err(format!(
            "the job reported {} epochs, expected {}",
            r.per_epoch.len(),
            job.epochs
        ));
    }
    match workload.kind {
        WorkloadKind::Sum => {
            let ids: u64 = (0..u64::from(job.tasks)).sum();
            for (i, v) in r.per_epoch.iter().enumerate() {
                let want = (i as u64 + 1) * ids;
                if v.as_u64() != Some(want) {
                    return Err(format!("epoch {}: the sum is {v}, expected {want}", i + 1));
                }
            }
        }
        WorkloadKind::Linreg => {
            let losses: Vec<f64> = r.per_epoch.iter().filter_map(|v| v.as_f64()).collect();
            let (Some(first), Some(last)) = (losses.first(), losses.last()) else {
                return Err("no losses reported".into());
            };
            if losses.len() != r.per_epoch.len() || losses.iter().any(|l| !l.is_finite()) {
                return Err(format!("a loss is not a number: {:?}", r.per_epoch));
            }
            if job.epochs > 1 && last >= first {
                return Err(format!(
                    "the loss did not fall: {first} at epoch 1, {last} at epoch {}",
                    job.epochs
                ));
            }
        }
    }
    Ok(())
}

/// The node processes of the run.
struct Fleet {
    job: JobArgs,
    logs: PathBuf,
    next: usize,
    live: BTreeMap<usize, NodeProc>,
    exits_tx: mpsc::UnboundedSender<(usize, std::io::Result<ExitStatus>)>,
    exits: mpsc::UnboundedReceiver<(usize, std::io::Result<ExitStatus>)>,
    exe: PathBuf,
}

struct NodeProc {
    /// Dropping it closes the node's standard input: the node stops cleanly.
    stdin: Option<ChildStdin>,
    kill: Option<oneshot::Sender<()>>,
    killed: bool,
}

impl Fleet {
    fn new(job: JobArgs, logs: PathBuf) -> Result<Fleet, String> {
        let exe = std::env::current_exe()
            .map_err(|e| format!("cannot find this program to start nodes: {e}"))?;
        let (exits_tx, exits) = mpsc::unbounded_channel();
        Ok(Fleet {
            job,
            logs,
            next: 0,
            live: BTreeMap::new(),
            exits_tx,
            exits,
            exe,
        })
    }

    fn log_path(&self, index: usize) -> PathBuf {
        self.logs.join(format!("node-{index}.log"))
    }

    /// Starts one more node process.
    fn launch(&mut self) -> Result<(), String> {
        let index = self.next;
        self.next += 1;
        let path = self.log_path(index);
        let log = std::fs::File::create(&path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        let log2 = log
            .try_clone()
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let mut child = Command::new(&self.exe)
            .arg("node")
            .args(self.job.to_flags())
            .arg(format!("--node-name=node{index}"))
            .arg("--stop-on-stdin-eof")
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::piped())
            .stdout(log)
            .stderr(log2)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start a node ({}): {e}", self.exe.display()))?;
        let stdin = child.stdin.take();
        let (kill_tx, kill_rx) = oneshot::channel::<()>();
        let exits = self.exits_tx.clone();
        tokio::spawn(async move {
            let status = tokio::select! {
                s = child.wait() => s,
                _ = kill_rx => {
                    let _ = child.start_kill();
                    child.wait().await
                }
            };
            let _ = exits.send((index, status));
        });
        self.live.insert(
            index,
            NodeProc {
                stdin,
                kill: Some(kill_tx),
                killed: false,
            },
        );
        Ok(())
    }

    /// SIGKILLs a random live node; `false` when there is none.
    fn kill_random(&mut self, rng: &mut ChaCha8Rng) -> bool {
        let candidates: Vec<usize> = self
            .live
            .iter()
            .filter(|(_, p)| !p.killed)
            .map(|(i, _)| *i)
            .collect();
        if candidates.is_empty() {
            return false;
        }
        let victim = candidates[rng.random_range(0..candidates.len())];
        if let Some(p) = self.live.get_mut(&victim) {
            p.killed = true;
            if let Some(k) = p.kill.take() {
                let _ = k.send(());
            }
        }
        true
    }

    /// A node process ended: `Some(problem)` if it failed on its own.
    fn exited(&mut self, index: usize, status: std::io::Result<ExitStatus>) -> Option<String> {
        let killed = self.live.remove(&index).is_some_and(|p| p.killed);
        match status {
            _ if killed => None,
            Ok(s) if s.success() => None,
            Ok(s) => Some(format!(
                "node {index} failed ({s}){}",
                tail(&self.log_path(index))
            )),
            Err(e) => Some(format!("lost track of node {index}: {e}")),
        }
    }

    /// Asks every node to stop (closing its standard input), waits up to 10 s, then kills the
    /// rest. Returns whether all stopped by themselves.
    async fn stop(&mut self) -> bool {
        for p in self.live.values_mut() {
            p.stdin = None;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !self.live.is_empty() {
            match tokio::time::timeout_at(deadline, self.exits.recv()).await {
                Ok(Some((index, _))) => {
                    self.live.remove(&index);
                }
                Ok(None) | Err(_) => break,
            }
        }
        let clean = self.live.is_empty();
        for p in self.live.values_mut() {
            if let Some(k) = p.kill.take() {
                let _ = k.send(());
            }
        }
        while !self.live.is_empty() {
            match tokio::time::timeout(Duration::from_secs(5), self.exits.recv()).await {
                Ok(Some((index, _))) => {
                    self.live.remove(&index);
                }
                Ok(None) | Err(_) => break,
            }
        }
        clean
    }
}

fn tail(path: &Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    let tail = lines[lines.len().saturating_sub(8)..].join("\n");
    format!("\n--- end of {} ---\n{tail}", path.display())
}

/// The progress bar (hidden when stderr is not a terminal, or with `--quiet`).
struct Progress {
    bar: indicatif::ProgressBar,
}

impl Progress {
    fn new(epochs: u64, quiet: bool) -> Progress {
        let bar = if quiet {
            indicatif::ProgressBar::hidden()
        } else {
            indicatif::ProgressBar::new(epochs)
        };
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{spinner} epoch {pos}/{len} [{bar:30}] {elapsed} {msg}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.enable_steady_tick(Duration::from_millis(200));
        Progress { bar }
    }

    fn update(&self, state: JobState, kills: u64, failovers: u64) {
        self.bar
            .set_position(state.epoch.min(self.bar.length().unwrap_or(0)));
        self.bar
            .set_message(format!("kills {kills}, failovers {failovers}"));
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
