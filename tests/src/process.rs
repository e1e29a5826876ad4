//! Nodes as real child processes (the `testnode` binary), for kill -9, SIGSTOP/SIGCONT and
//! SIGTERM. The child prints one JSON line per status change and per task event.

use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use crate::apps::Event;

/// A node's status as printed by `testnode`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusLine {
    /// `spare`, `primary` or `backup`.
    pub role: String,
    /// The task of the slot.
    pub task: Option<u32>,
    /// The term, when primary.
    pub term: Option<u64>,
    /// Whether the lease is within its local deadline.
    pub acting: bool,
    /// Last epoch entered or seen.
    pub epoch: Option<u64>,
    /// Whether the job finished.
    pub finished: bool,
}

impl StatusLine {
    /// `Some(term)` when acting as primary of `task`.
    pub fn primary_of(&self, task: u32) -> Option<u64> {
        (self.role == "primary" && self.acting && self.task == Some(task))
            .then_some(self.term)
            .flatten()
    }
}

/// One line `testnode` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Line {
    /// The node's status changed.
    Status(StatusLine),
    /// A task event.
    Event(Event),
    /// The node ended.
    Exit(String),
}

/// Flags for `testnode`.
#[derive(Debug, Clone)]
pub struct NodeArgs {
    /// etcd endpoints.
    pub etcd: Vec<String>,
    /// Job name.
    pub job: String,
    /// Tasks.
    pub tasks: u32,
    /// Replicas per task.
    pub replicas: u32,
    /// Lease TTL in seconds.
    pub ttl_secs: u64,
    /// Task 0 drives the epochs up to this one, then shuts the job down.
    pub drive_until: Option<u64>,
    /// Milliseconds the driver waits before moving each epoch on.
    pub pace_ms: u64,
    /// Run the dataflow app (instead of the audit app) until this epoch.
    pub dataflow_until: Option<u64>,
}

/// A `testnode` child process.
#[derive(Debug)]
pub struct ProcessNode {
    child: Child,
    pid: i32,
    lines: watch::Receiver<Vec<Line>>,
    seqs: watch::Receiver<Vec<u64>>,
    reader: Option<tokio::task::JoinHandle<()>>,
}

/// Numbers the lines of several children in the order this process reads them, so their
/// trails can be merged (each child's own lines keep the order it printed them in).
#[derive(Debug, Clone, Default)]
pub struct Arrivals(Arc<AtomicU64>);

impl ProcessNode {
    /// Starts `testnode` (pass `env!("CARGO_BIN_EXE_testnode")` as `bin`).
    pub fn spawn(bin: &str, args: &NodeArgs) -> std::io::Result<Self> {
        Self::spawn_numbered(bin, args, &Arrivals::default())
    }

    /// Starts `testnode`, numbering its lines with the shared counter `arrivals`.
    pub fn spawn_numbered(
        bin: &str,
        args: &NodeArgs,
        arrivals: &Arrivals,
    ) -> std::io::Result<Self> {
        let mut cmd = Command::new(bin);
        cmd.arg("--etcd")
            .arg(args.etcd.join(","))
            .arg("--job")
            .arg(&args.job)
            .arg("--tasks")
            .arg(args.tasks.to_string())
            .arg("--replicas")
            .arg(args.replicas.to_string())
            .arg("--ttl-secs")
            .arg(args.ttl_secs.to_string());
        if let Some(d) = args.drive_until {
            cmd.arg("--drive-until").arg(d.to_string());
        }
        cmd.arg("--pace-ms").arg(args.pace_ms.to_string());
        if let Some(u) = args.dataflow_until {
            cmd.arg("--dataflow-until").arg(u.to_string());
        }
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let mut child = cmd.spawn()?;
        let pid = child.id().map_or(-1, |p| p as i32);
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| std::io::Error::other("no stdout"))?;
        let (tx, lines) = watch::channel(Vec::new());
        let (seq_tx, seqs) = watch::channel(Vec::new());
        let counter = arrivals.0.clone();
        let reader = tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                match serde_json::from_str::<Line>(&line) {
                    Ok(l) => {
                        // Numbered before it is published, so `seqs` always covers `lines`.
                        let n = counter.fetch_add(1, Ordering::SeqCst);
                        seq_tx.send_modify(|v| v.push(n));
                        tx.send_modify(|v| v.push(l));
                    }
                    Err(_) => eprintln!("testnode[{pid}]: {line}"),
                }
            }
        });
        Ok(ProcessNode {
            child,
            pid,
            lines,
            seqs,
            reader: Some(reader),
        })
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    fn signal(&self, sig: i32) -> std::io::Result<()> {
        // SAFETY-free: libc::kill is a plain syscall on a pid we own.
        let rc = unsafe_free_kill(self.pid, sig);
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// SIGKILL.
    pub fn kill9(&self) -> std::io::Result<()> {
        self.signal(libc::SIGKILL)
    }
    /// SIGSTOP.
    pub fn pause(&self) -> std::io::Result<()> {
        self.signal(libc::SIGSTOP)
    }
    /// SIGCONT.
    pub fn resume(&self) -> std::io::Result<()> {
        self.signal(libc::SIGCONT)
    }
    /// SIGTERM.
    pub fn terminate(&self) -> std::io::Result<()> {
        self.signal(libc::SIGTERM)
    }

    /// Every line printed so far.
    pub fn lines(&self) -> Vec<Line> {
        self.lines.borrow().clone()
    }

    /// A receiver of the lines printed so far, updated on every new line.
    pub fn subscribe(&self) -> watch::Receiver<Vec<Line>> {
        self.lines.clone()
    }

    /// The arrival number (see [`Arrivals`]) of each line printed so far.
    pub fn seqs(&self) -> Vec<u64> {
        self.seqs.borrow().clone()
    }

    /// The latest status printed.
    pub fn status(&self) -> Option<StatusLine> {
        self.lines.borrow().iter().rev().find_map(|l| match l {
            Line::Status(s) => Some(s.clone()),
            _ => None,
        })
    }

    /// Waits until the lines printed so far satisfy `cond`.
    pub async fn wait_lines(
        &self,
        why: &str,
        timeout: Duration,
        mut cond: impl FnMut(&[Line]) -> bool,
    ) -> Result<Vec<Line>, String> {
        let mut rx = self.lines.clone();
        let res = tokio::time::timeout(timeout, rx.wait_for(|l| cond(l))).await;
        match res {
            Ok(Ok(v)) => Ok(v.clone()),
            _ => Err(format!(
                "timed out after {timeout:?} waiting until {why}; lines of pid {}: {:#?}",
                self.pid,
                self.lines()
            )),
        }
    }

    /// Waits for the process to exit.
    pub async fn wait_exit(
        &mut self,
        timeout: Duration,
    ) -> Result<std::process::ExitStatus, String> {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(Ok(s)) => {
                // Read everything the process printed before it exited.
                if let Some(r) = self.reader.take() {
                    let _ = tokio::time::timeout(timeout, r).await;
                }
                Ok(s)
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("pid {} still running after {timeout:?}", self.pid)),
        }
    }
}

fn unsafe_free_kill(pid: i32, sig: i32) -> i32 {
    // Sending a signal through the `kill` command keeps the crate free of `unsafe`.
    match std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => 0,
        _ => -1,
    }
}
