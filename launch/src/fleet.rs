//! The node processes of a run: started, killed by the chaos mode, replaced, stopped.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use tokio::process::{ChildStdin, Command};
use tokio::sync::{mpsc, oneshot};

use crate::error::ErrorKind;
use crate::job::NodeArgsFn;

/// How one node process of a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeEnd {
    /// The node's index: nodes are `node0`, `node1`, … in launch order (a replacement gets
    /// the next index).
    pub index: usize,
    /// Its log file (stdout and stderr).
    pub log: PathBuf,
    /// Killed with SIGKILL by the chaos mode.
    pub killed_by_chaos: bool,
    /// Killed by the launcher because it did not stop within 10 s of being asked to.
    pub forced: bool,
    /// Its exit status; `None` when it could not be collected.
    pub status: Option<ExitStatus>,
}

/// What the program of every node is and gets.
#[derive(Clone)]
pub(crate) struct NodeCommand {
    pub(crate) program: PathBuf,
    pub(crate) args: Vec<OsString>,
    pub(crate) node_args: Option<NodeArgsFn>,
    pub(crate) env: Vec<(OsString, OsString)>,
}

impl std::fmt::Debug for NodeCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCommand")
            .field("program", &self.program)
            .field("args", &self.args)
            .field("node_args", &self.node_args.as_ref().map(|_| "Fn(usize)"))
            .field("env", &self.env.iter().map(|(k, _)| k).collect::<Vec<_>>())
            .finish()
    }
}

#[derive(Debug)]
pub(crate) struct Fleet {
    command: NodeCommand,
    logs: PathBuf,
    next: usize,
    live: BTreeMap<usize, NodeProc>,
    exits_tx: mpsc::UnboundedSender<(usize, std::io::Result<ExitStatus>)>,
    pub(crate) exits: mpsc::UnboundedReceiver<(usize, std::io::Result<ExitStatus>)>,
    ended: Vec<NodeEnd>,
}

#[derive(Debug)]
struct NodeProc {
    /// Dropping it closes the node's standard input: the node stops cleanly.
    stdin: Option<ChildStdin>,
    kill: Option<oneshot::Sender<()>>,
    killed: bool,
}

impl Fleet {
    pub(crate) fn new(command: NodeCommand, logs: PathBuf) -> Fleet {
        let (exits_tx, exits) = mpsc::unbounded_channel();
        Fleet {
            command,
            logs,
            next: 0,
            live: BTreeMap::new(),
            exits_tx,
            exits,
            ended: Vec::new(),
        }
    }

    fn log_path(&self, index: usize) -> PathBuf {
        self.logs.join(format!("node-{index}.log"))
    }

    /// Starts one more node process.
    pub(crate) fn launch(&mut self, etcd: &[String], job: &str) -> Result<(), ErrorKind> {
        let index = self.next;
        self.next += 1;
        let path = self.log_path(index);
        let io = |what: String| move |source| ErrorKind::Io { what, source };
        let log = std::fs::File::create(&path)
            .map_err(io(format!("cannot create {}", path.display())))?;
        let log2 = log
            .try_clone()
            .map_err(io(format!("cannot open {}", path.display())))?;
        let c = &self.command;
        let mut cmd = Command::new(&c.program);
        cmd.args(&c.args);
        if let Some(f) = &c.node_args {
            cmd.args(f(index));
        }
        cmd.env("TASKGRAPH_ETCD", etcd.join(","))
            .env("TASKGRAPH_JOB", job)
            .env("TASKGRAPH_NODE_NAME", format!("node{index}"))
            .env(crate::NODE_INDEX_ENV, index.to_string())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(c.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(log)
            .stderr(log2)
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(io(format!("cannot start a node ({})", c.program.display())))?;
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
    pub(crate) fn kill_random(&mut self, rng: &mut ChaCha8Rng) -> bool {
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
    pub(crate) fn exited(
        &mut self,
        index: usize,
        status: std::io::Result<ExitStatus>,
    ) -> Option<ErrorKind> {
        let killed = self.live.remove(&index).is_some_and(|p| p.killed);
        self.record(index, killed, false, status.as_ref().ok().copied());
        match status {
            _ if killed => None,
            Ok(s) if s.success() => None,
            Ok(status) => {
                let log = self.log_path(index);
                Some(ErrorKind::NodeFailed {
                    index,
                    status,
                    log_tail: tail(&log),
                    log,
                })
            }
            Err(source) => Some(ErrorKind::NodeLost { index, source }),
        }
    }

    fn record(&mut self, index: usize, killed: bool, forced: bool, status: Option<ExitStatus>) {
        self.ended.push(NodeEnd {
            index,
            log: self.log_path(index),
            killed_by_chaos: killed,
            forced,
            status,
        });
    }

    /// Asks every node to stop (closing its standard input), waits up to 10 s, then kills the
    /// rest. Returns how every node of the run ended, in the order they did, and whether all
    /// of the last ones stopped by themselves.
    pub(crate) async fn stop(&mut self) -> (Vec<NodeEnd>, bool) {
        for p in self.live.values_mut() {
            p.stdin = None;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !self.live.is_empty() {
            match tokio::time::timeout_at(deadline, self.exits.recv()).await {
                Ok(Some((index, status))) => {
                    let killed = self.live.remove(&index).is_some_and(|p| p.killed);
                    self.record(index, killed, false, status.ok());
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
                Ok(Some((index, status))) => {
                    let killed = self.live.remove(&index).is_some_and(|p| p.killed);
                    self.record(index, killed, !killed, status.ok());
                }
                Ok(None) | Err(_) => break,
            }
        }
        let lost: Vec<usize> = std::mem::take(&mut self.live).into_keys().collect();
        for index in lost {
            self.record(index, false, true, None);
        }
        (std::mem::take(&mut self.ended), clean)
    }
}

fn tail(path: &Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(8)..].join("\n")
}
