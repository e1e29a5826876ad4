//! [`LocalJob`]: one whole job on this machine, each node a process of the application's own
//! binary, optionally with a chaos monkey; and its [`Outcome`].

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use taskgraph::{Bytes, Epoch, EtcdAuth, EtcdTls, JobClient, JobSpec, JobState, TaskId, Term};

use crate::error::{ErrorKind, Existing, LaunchError};
use crate::etcd::LocalEtcd;
use crate::fleet::{Fleet, NodeCommand, NodeEnd};
use crate::follow::{JobFeed, Seen};
use crate::progress::Progress;
use crate::stalls::Stalls;

/// The time limit of a run without one (about 30 years).
const NO_LIMIT: Duration = Duration::from_secs(30 * 365 * 24 * 3600);

/// Per-node arguments (see [`LocalJob::node_args`]).
pub(crate) type NodeArgsFn = Arc<dyn Fn(usize) -> Vec<OsString> + Send + Sync>;

/// The chaos mode: SIGKILL random nodes while the job runs, and start a new node for each.
///
/// ```
/// use std::time::Duration;
/// let chaos = taskgraph_launch::Chaos::between(Duration::from_millis(200), Duration::from_secs(1))
///     .seed(7)
///     .at_once(2);
/// assert_eq!(chaos.kills_per_round(), 2);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chaos {
    min: Duration,
    max: Duration,
    seed: u64,
    at_once: u32,
}

impl Chaos {
    /// A kill every `interval` (the first one `interval` after the nodes start).
    pub fn every(interval: Duration) -> Chaos {
        Chaos::between(interval, interval)
    }

    /// A kill after a random wait between `min` and `max` (inclusive), again and again.
    pub fn between(min: Duration, max: Duration) -> Chaos {
        Chaos {
            min: min.min(max),
            max: max.max(min),
            seed: 1,
            at_once: 1,
        }
    }

    /// The seed of the choice of victims (and of the waits): the same seed, the same
    /// choices. Default 1.
    pub fn seed(mut self, seed: u64) -> Chaos {
        self.seed = seed;
        self
    }

    /// Kill `n` distinct nodes in each round (2: pairs, which can take a task's primary and
    /// its backup together and make a spare restore the task from its checkpoint). Default 1;
    /// 0 counts as 1.
    pub fn at_once(mut self, n: u32) -> Chaos {
        self.at_once = n.max(1);
        self
    }

    /// The shortest and longest wait between rounds.
    pub fn interval(&self) -> (Duration, Duration) {
        (self.min, self.max)
    }

    /// The seed.
    pub fn seed_value(&self) -> u64 {
        self.seed
    }

    /// Nodes killed per round.
    pub fn kills_per_round(&self) -> u32 {
        self.at_once
    }
}

/// A whole job run on this machine: a private etcd (unless [`etcd`](LocalJob::etcd) names
/// one), `tasks × replicas + spares` node processes of a program (by default this very
/// binary), chaos kills, a progress bar, stall reports; [`run`](LocalJob::run) waits for the
/// job's end, stops everything it started, and returns the [`Outcome`].
///
/// Every node process gets these environment variables: `TASKGRAPH_ETCD` (the endpoints,
/// comma-separated), `TASKGRAPH_JOB`, `TASKGRAPH_NODE_NAME` (`node<i>`), `RUST_LOG` (the
/// launcher's, else `info`) and [`NODE_INDEX_ENV`](crate::NODE_INDEX_ENV) (`<i>`), plus
/// whatever [`env`](LocalJob::env) adds; its arguments are [`args`](LocalJob::args) followed
/// by [`node_args`](LocalJob::node_args)`(i)`. Its standard input is a pipe that the
/// launcher closes to stop it: a node should stop cleanly when it closes (see
/// [`stdin_closed`](crate::stdin_closed)); one still running 10 s later is killed. Its
/// stdout and stderr go to `node-<i>.log` in a temporary folder (kept and named in the error
/// when the run fails), or in [`node_logs`](LocalJob::node_logs).
///
/// The run creates its job: a job of that name already in etcd is refused
/// ([`ErrorKind::JobExists`]), naming each difference when its spec is another.
#[derive(Debug, Clone)]
pub struct LocalJob {
    name: String,
    spec: JobSpec,
    etcd: Vec<String>,
    etcd_tls: Option<EtcdTls>,
    etcd_auth: Option<EtcdAuth>,
    program: Option<PathBuf>,
    command: NodeCommand,
    spares: u32,
    chaos: Option<Chaos>,
    progress: bool,
    epochs: Option<u64>,
    stall_limit: Option<Duration>,
    timeout: Option<Duration>,
    node_logs: Option<PathBuf>,
    expect_result: bool,
}

/// How a run ended: the job finished (see [`LocalJob::run`]).
#[derive(Debug)]
pub struct Outcome {
    /// The job's name.
    pub job: String,
    /// The job's final epoch.
    pub epoch: Epoch,
    /// What the job stored with its end
    /// ([`Context::shutdown_job_with`](taskgraph::Context::shutdown_job_with)); `None` when
    /// it ended without a result.
    pub result: Option<Bytes>,
    /// Nodes killed by the chaos mode.
    pub kills: u64,
    /// Times a task got a new primary after its first one.
    pub failovers: u64,
    /// From launching the nodes to the job's end.
    pub elapsed: Duration,
    /// How every node process ended, in the order they did.
    pub nodes: Vec<NodeEnd>,
    /// Whether every node still running at the end stopped by itself when asked.
    pub stopped_cleanly: bool,
    logs: NodeLogs,
}

#[derive(Debug)]
struct NodeLogs {
    dir: PathBuf,
    temp: Option<tempfile::TempDir>,
}

impl NodeLogs {
    fn keep(&mut self) -> PathBuf {
        if let Some(t) = self.temp.take() {
            return t.keep();
        }
        self.dir.clone()
    }
}

impl Outcome {
    /// The folder holding the nodes' logs (`node-<i>.log`). Unless the run was given
    /// [`node_logs`](LocalJob::node_logs), it is removed when the outcome is dropped: see
    /// [`keep_node_logs`](Outcome::keep_node_logs).
    pub fn node_logs(&self) -> &Path {
        &self.logs.dir
    }

    /// Keeps the nodes' logs after the outcome is dropped (e.g. when the application's own
    /// check of the result fails) and returns their folder.
    pub fn keep_node_logs(&mut self) -> PathBuf {
        self.logs.keep()
    }
}

impl LocalJob {
    /// A run of job `name` with `spec`: `spec.tasks × spec.replicas` nodes fill every slot.
    /// `name` is the job's name in etcd, given to every node as `TASKGRAPH_JOB` (a spec has no
    /// name: the job name of the builder that produced `spec` does not matter).
    /// The spec is the one the application's nodes create (e.g. the `config().spec()` of
    /// the application's built framework); the run refuses an existing job of that name,
    /// naming how its spec differs.
    pub fn new(name: impl Into<String>, spec: JobSpec) -> LocalJob {
        LocalJob {
            name: name.into(),
            spec,
            etcd: Vec::new(),
            etcd_tls: None,
            etcd_auth: None,
            program: None,
            command: NodeCommand {
                program: PathBuf::new(),
                args: Vec::new(),
                node_args: None,
                env: Vec::new(),
            },
            spares: 0,
            chaos: None,
            progress: true,
            epochs: None,
            stall_limit: None,
            timeout: None,
            node_logs: None,
            expect_result: false,
        }
    }

    /// Use this etcd (default: start a private one for the run, see [`LocalEtcd`]).
    pub fn etcd<S: Into<String>>(mut self, endpoints: impl IntoIterator<Item = S>) -> LocalJob {
        self.etcd = endpoints.into_iter().map(Into::into).collect();
        self
    }

    /// TLS to etcd, for the launcher's own connection (pass the nodes theirs in their
    /// arguments or environment).
    pub fn etcd_tls(mut self, tls: Option<EtcdTls>) -> LocalJob {
        self.etcd_tls = tls;
        self
    }

    /// The etcd user of the launcher's own connection.
    pub fn etcd_auth(mut self, auth: Option<EtcdAuth>) -> LocalJob {
        self.etcd_auth = auth;
        self
    }

    /// The program every node runs (default: [`std::env::current_exe`], this binary).
    pub fn program(mut self, program: impl Into<PathBuf>) -> LocalJob {
        self.program = Some(program.into());
        self
    }

    /// Adds an argument for every node.
    pub fn arg(mut self, arg: impl Into<OsString>) -> LocalJob {
        self.command.args.push(arg.into());
        self
    }

    /// Adds arguments for every node.
    pub fn args<A: Into<OsString>>(mut self, args: impl IntoIterator<Item = A>) -> LocalJob {
        self.command.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Arguments for node `i` alone, after the common ones (e.g. `--node-name=node<i>`).
    pub fn node_args<A, F>(mut self, f: F) -> LocalJob
    where
        A: Into<OsString>,
        F: Fn(usize) -> Vec<A> + Send + Sync + 'static,
    {
        self.command.node_args = Some(Arc::new(move |i| {
            f(i).into_iter().map(Into::into).collect::<Vec<OsString>>()
        }));
        self
    }

    /// Sets an environment variable of every node (after the `TASKGRAPH_*` ones, so it can
    /// override them).
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> LocalJob {
        self.command.env.push((key.into(), value.into()));
        self
    }

    /// Nodes beyond `tasks × replicas`, waiting to take over a task whose nodes all died.
    /// Default 0.
    pub fn spares(mut self, spares: u32) -> LocalJob {
        self.spares = spares;
        self
    }

    /// Kill nodes while the job runs (default: no chaos).
    pub fn chaos(mut self, chaos: Option<Chaos>) -> LocalJob {
        self.chaos = chaos;
        self
    }

    /// Show a progress bar on stderr (default `true`; it hides itself when stderr is not a
    /// terminal). Stall warnings are printed on stderr either way.
    pub fn progress_bar(mut self, on: bool) -> LocalJob {
        self.progress = on;
        self
    }

    /// The epoch at which the job is expected to end (where the task calls
    /// `shutdown_job_with`): the progress bar's length only; the job ends when a task ends it.
    pub fn epochs(mut self, epochs: u64) -> LocalJob {
        self.epochs = Some(epochs);
        self
    }

    /// Give up ([`ErrorKind::Stalled`], exit code 3) when the job has stayed stalled this
    /// long after the nodes first reported it. Default: five times the nodes' stall time, at
    /// least a minute (a stall under chaos or on a loaded machine often heals by itself).
    pub fn stall_limit(mut self, limit: Option<Duration>) -> LocalJob {
        self.stall_limit = limit;
        self
    }

    /// Give up ([`ErrorKind::Timeout`]) when the job has not finished after this long.
    /// Default: no limit.
    pub fn timeout(mut self, timeout: Option<Duration>) -> LocalJob {
        self.timeout = timeout;
        self
    }

    /// Write the nodes' logs into this folder (created if missing) and keep them.
    pub fn node_logs(mut self, dir: Option<PathBuf>) -> LocalJob {
        self.node_logs = dir;
        self
    }

    /// The job always stores a result when it finishes: ending without one is
    /// [`ErrorKind::ShutDown`] (exit code 4), not an [`Outcome`]. Default `false`.
    pub fn expect_result(mut self, expect: bool) -> LocalJob {
        self.expect_result = expect;
        self
    }

    /// The job's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs the job: starts etcd if needed, launches the nodes, follows the job until it
    /// finishes, stops every node and the private etcd, and returns the outcome. Ctrl-C ends
    /// the run with [`ErrorKind::Interrupted`] (after stopping everything).
    pub async fn run(self) -> Result<Outcome, LaunchError> {
        let etcd = if self.etcd.is_empty() {
            Some(LocalEtcd::start().await?)
        } else {
            None
        };
        let endpoints = etcd
            .as_ref()
            .map_or_else(|| self.etcd.clone(), LocalEtcd::endpoints);
        let outcome = self.run_on(&endpoints).await;
        if let Some(etcd) = etcd {
            etcd.stop().await;
        }
        outcome
    }

    async fn run_on(mut self, etcd: &[String]) -> Result<Outcome, LaunchError> {
        let name = self.name.clone();
        let client = JobClient::connect_secure(
            etcd,
            &name,
            Duration::from_secs(5),
            self.etcd_tls.as_ref(),
            self.etcd_auth.as_ref(),
        )
        .await?;
        refuse_existing(&client, &self.spec).await?;
        self.command.program = match self.program.take() {
            Some(p) => p,
            None => std::env::current_exe().map_err(|source| ErrorKind::Io {
                what: "cannot find this program to start nodes".into(),
                source,
            })?,
        };
        let mut logs = self.logs_folder()?;
        let mut fleet = Fleet::new(self.command.clone(), logs.dir.clone());
        let total = self.spec.tasks * self.spec.replicas + self.spares;
        let started = Instant::now();
        let mut failure: Option<ErrorKind> = None;
        for _ in 0..total {
            if let Err(e) = fleet.launch(etcd, &name) {
                failure = Some(e);
                break;
            }
        }
        let progress = Progress::new(self.progress, self.epochs);
        let mut feed = JobFeed::new(&client);
        let mut terms: BTreeMap<TaskId, Term> = BTreeMap::new();
        let (mut kills, mut failovers) = (0u64, 0u64);
        let chaos = self.chaos.clone();
        let mut victims = ChaCha8Rng::seed_from_u64(chaos.as_ref().map_or(0, |c| c.seed));
        let mut waits = ChaCha8Rng::seed_from_u64(chaos.as_ref().map_or(0, |c| c.seed) ^ 0x5eed);
        let wait = |rng: &mut ChaCha8Rng| match &chaos {
            Some(c) if c.min < c.max => rng.random_range(c.min..=c.max),
            Some(c) => c.min,
            None => Duration::from_secs(3600),
        };
        let first = tokio::time::Instant::now() + wait(&mut waits);
        let chaos_tick = tokio::time::sleep_until(first);
        tokio::pin!(chaos_tick);
        let deadline = tokio::time::sleep(self.timeout.unwrap_or(NO_LIMIT));
        tokio::pin!(deadline);
        let mut stalls = Stalls::default();
        // Fires when the current stall reaches the stall limit (reset as reports come and go).
        let far = tokio::time::Instant::now() + NO_LIMIT;
        let stall_limit = tokio::time::sleep_until(far);
        tokio::pin!(stall_limit);
        let finished = loop {
            if failure.is_some() {
                break None;
            }
            tokio::select! {
                seen = feed.next() => {
                    let Some(seen) = seen else {
                        failure = Some(ErrorKind::WatchEnded);
                        break None;
                    };
                    let mut done = None;
                    for s in seen {
                        match s {
                            Seen::State(state) => {
                                progress.update(state, kills, failovers);
                                if state.finished {
                                    done = Some(state);
                                }
                            }
                            Seen::Stall { node, note } => stalls.note(node, note),
                            Seen::Primary { task, term, change } => {
                                match terms.insert(task, term) {
                                    Some(old) if old != term && change => failovers += 1,
                                    _ => {}
                                }
                            }
                        }
                    }
                    if done.is_some() {
                        break done;
                    }
                    for line in stalls.news() {
                        progress.println(&line);
                    }
                    let until = stalls
                        .deadline(self.stall_limit)
                        .map_or(far, tokio::time::Instant::from_std);
                    if until != stall_limit.deadline() {
                        stall_limit.as_mut().reset(until);
                    }
                }
                () = &mut stall_limit => {
                    if let Some(stalled) = stalls.given_up(&name, self.stall_limit) {
                        failure = Some(stalled);
                        break None;
                    }
                    let until = stalls
                        .deadline(self.stall_limit)
                        .map_or(far, tokio::time::Instant::from_std);
                    stall_limit.as_mut().reset(until);
                }
                () = &mut chaos_tick, if chaos.is_some() => {
                    let next = chaos_tick.deadline() + wait(&mut waits);
                    chaos_tick.as_mut().reset(next);
                    let per_round = chaos.as_ref().map_or(1, |c| c.at_once);
                    for _ in 0..per_round {
                        if !fleet.kill_random(&mut victims) {
                            break;
                        }
                        kills += 1;
                        if let Err(e) = fleet.launch(etcd, &name) {
                            failure = Some(e);
                            break;
                        }
                    }
                }
                Some((index, status)) = fleet.exits.recv() => {
                    if let Some(problem) = fleet.exited(index, status) {
                        failure = Some(problem);
                        break None;
                    }
                }
                () = &mut deadline => {
                    failure = Some(ErrorKind::Timeout(self.timeout.unwrap_or_default()));
                    break None;
                }
                _ = tokio::signal::ctrl_c() => {
                    failure = Some(ErrorKind::Interrupted);
                    break None;
                }
            }
        };
        let elapsed = started.elapsed();
        progress.finish();
        let result = match (finished, failure) {
            (Some(state), _) => client
                .result()
                .await
                .map(|r| (state, r))
                .map_err(ErrorKind::from),
            (None, failure) => Err(failure.unwrap_or(ErrorKind::WatchEnded)),
        };
        let (nodes, stopped_cleanly) = fleet.stop().await;
        let fail =
            |kind: ErrorKind, logs: &mut NodeLogs| Err(LaunchError::new(kind, Some(logs.keep())));
        let (state, result) = match result {
            Ok((state, None)) if self.expect_result => {
                return fail(
                    ErrorKind::ShutDown {
                        job: name,
                        epoch: state.epoch,
                    },
                    &mut logs,
                );
            }
            Ok(found) => found,
            Err(kind) => return fail(kind, &mut logs),
        };
        if !stopped_cleanly {
            tracing::warn!("some nodes had to be killed after the job finished");
        }
        Ok(Outcome {
            job: name,
            epoch: state.epoch,
            result,
            kills,
            failovers,
            elapsed,
            nodes,
            stopped_cleanly,
            logs,
        })
    }

    fn logs_folder(&self) -> Result<NodeLogs, ErrorKind> {
        if let Some(dir) = &self.node_logs {
            std::fs::create_dir_all(dir).map_err(|source| ErrorKind::Io {
                what: format!("cannot create {}", dir.display()),
                source,
            })?;
            return Ok(NodeLogs {
                dir: dir.clone(),
                temp: None,
            });
        }
        let temp = tempfile::Builder::new()
            .prefix(&format!("{}-logs-", self.name))
            .tempdir()
            .map_err(|source| ErrorKind::Io {
                what: "cannot create a folder for the node logs".into(),
                source,
            })?;
        Ok(NodeLogs {
            dir: temp.path().to_owned(),
            temp: Some(temp),
        })
    }
}

/// A local run creates its job: an existing one of the same name is refused, naming what
/// differs when its spec is another.
async fn refuse_existing(client: &JobClient, mine: &JobSpec) -> Result<(), LaunchError> {
    let Some(stored) = client.spec().await? else {
        return Ok(());
    };
    let job = client.job().to_owned();
    let existing = match JobSpec::difference(&stored, mine) {
        Some(difference) => Existing::DifferentSpec(difference),
        None => match client.state().await? {
            Some(JobState {
                finished: true,
                epoch,
            }) => Existing::Finished(epoch),
            Some(JobState { epoch, .. }) => Existing::Running(epoch),
            None => Existing::Created,
        },
    };
    Err(ErrorKind::JobExists { job, existing }.into())
}
