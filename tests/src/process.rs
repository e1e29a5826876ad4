//! Nodes as real child processes (the `testnode` binary), for kill -9, SIGSTOP/SIGCONT and
//! SIGTERM. The child prints one JSON line per status change and per task event, stamped with
//! the wall-clock time it saw it (see [`Stamped`]), so a test can tell which lines a process
//! printed after a signal however late it reads them.

use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
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

/// A [`Line`] as `testnode` prints it: the line's own fields plus `at_us`, the wall-clock time
/// it was taken at ([`now_us`]). All processes of a test run on one machine, so stamps of the
/// child and of the test compare. A line without `at_us` (the plain [`Line`] format) still
/// parses, with `at_us: None`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamped {
    /// Microseconds since the UNIX epoch when the line was taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_us: Option<u64>,
    /// The line.
    #[serde(flatten)]
    pub line: Line,
}

/// The wall-clock time in microseconds since the UNIX epoch (0 if the clock is before it).
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// The lines of `lines` stamped (`stamps`, as [`ProcessNode::stamps`] returns them, covering
/// `lines`) strictly after `t_us`: those the process printed after that time. An unstamped
/// line counts as printed after it (so a check on the lines after a signal never misses one).
pub fn printed_after(lines: &[Line], stamps: &[Option<u64>], t_us: u64) -> Vec<Line> {
    lines
        .iter()
        .enumerate()
        .filter(|(i, _)| stamps.get(*i).copied().flatten().is_none_or(|at| at > t_us))
        .map(|(_, l)| l.clone())
        .collect()
}

/// What the reader knows about each line besides its content.
#[derive(Debug, Clone, Copy)]
struct LineMeta {
    /// Arrival number (see [`Arrivals`]).
    seq: u64,
    /// When the child printed it.
    at_us: Option<u64>,
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

/// Where a `testnode` runs, besides its [`NodeArgs`]: in a network namespace, on a given
/// listen address (see [`crate::netfault`]).
#[derive(Debug, Clone, Default)]
pub struct Placement {
    /// Run the process inside this network namespace (`ip netns exec NAME …`; needs root).
    pub netns: Option<String>,
    /// The node's gRPC listen address (`ip:port`, port 0 for any); default `127.0.0.1:0`.
    pub listen: Option<String>,
}

/// A `testnode` child process.
#[derive(Debug)]
pub struct ProcessNode {
    child: Child,
    pid: i32,
    lines: watch::Receiver<Vec<Line>>,
    meta: watch::Receiver<Vec<LineMeta>>,
    reader: Option<tokio::task::JoinHandle<()>>,
    /// The child's stdin, when it was started [held](ProcessNode::spawn_held).
    stdin: Option<ChildStdin>,
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
        Self::start(bin, args, arrivals, None, &Placement::default())
    }

    /// As [`spawn_numbered`](Self::spawn_numbered), with the node's drivers held at epoch
    /// `hold_at`: they neither move the job on from it nor end the job there until
    /// [`release`](Self::release).
    pub fn spawn_held(
        bin: &str,
        args: &NodeArgs,
        arrivals: &Arrivals,
        hold_at: u64,
    ) -> std::io::Result<Self> {
        Self::start(bin, args, arrivals, Some(hold_at), &Placement::default())
    }

    /// As [`spawn_numbered`](Self::spawn_numbered) (or [`spawn_held`](Self::spawn_held) with
    /// `hold_at`), placed as `placement` says.
    pub fn spawn_placed(
        bin: &str,
        args: &NodeArgs,
        arrivals: &Arrivals,
        hold_at: Option<u64>,
        placement: &Placement,
    ) -> std::io::Result<Self> {
        Self::start(bin, args, arrivals, hold_at, placement)
    }

    fn start(
        bin: &str,
        args: &NodeArgs,
        arrivals: &Arrivals,
        hold_at: Option<u64>,
        placement: &Placement,
    ) -> std::io::Result<Self> {
        let mut cmd = match &placement.netns {
            // `ip netns exec` execs the program in place: the child's pid is the node's.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns.as_str(), bin]);
                c
            }
            None => Command::new(bin),
        };
        if let Some(listen) = &placement.listen {
            cmd.arg("--listen").arg(listen);
        }
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
        if let Some(h) = hold_at {
            cmd.arg("--hold-at").arg(h.to_string());
        }
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .stdin(if hold_at.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .kill_on_drop(true);
        let mut child = cmd.spawn()?;
        let stdin = child.stdin.take();
        let pid = child.id().map_or(-1, |p| p as i32);
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| std::io::Error::other("no stdout"))?;
        let (tx, lines) = watch::channel(Vec::new());
        let (meta_tx, meta) = watch::channel(Vec::new());
        let counter = arrivals.0.clone();
        let reader = tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                match serde_json::from_str::<Stamped>(&line) {
                    Ok(Stamped { at_us, line: l }) => {
                        // Numbered and stamped before it is published, so `meta` always
                        // covers `lines`.
                        let seq = counter.fetch_add(1, Ordering::SeqCst);
                        meta_tx.send_modify(|v| v.push(LineMeta { seq, at_us }));
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
            meta,
            reader: Some(reader),
            stdin,
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

    /// Lets the drivers of a node started [held](Self::spawn_held) move the job on and end it.
    pub async fn release(&mut self) -> std::io::Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| std::io::Error::other("not started held"))?;
        stdin.write_all(b"release\n").await?;
        stdin.flush().await
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

    /// The arrival number (see [`Arrivals`]) of each line printed so far (at least as many as
    /// [`lines`](Self::lines) returned before).
    pub fn seqs(&self) -> Vec<u64> {
        self.meta.borrow().iter().map(|m| m.seq).collect()
    }

    /// The time stamp ([`Stamped::at_us`]) of each line printed so far (at least as many as
    /// [`lines`](Self::lines) or [`subscribe`](Self::subscribe) returned before).
    pub fn stamps(&self) -> Vec<Option<u64>> {
        self.meta.borrow().iter().map(|m| m.at_us).collect()
    }

    /// Every line printed so far that the process stamped strictly after `t_us` (see
    /// [`printed_after`]).
    pub fn lines_after(&self, t_us: u64) -> Vec<Line> {
        let lines = self.lines();
        printed_after(&lines, &self.stamps(), t_us)
    }

    /// Waits until every thread of the process is stopped (state `T` in
    /// `/proc/<pid>/task/<tid>/stat`, e.g. after [`pause`](Self::pause)), polling that kernel
    /// state, and returns the time ([`now_us`]) it was seen stopped: the process printed every
    /// line stamped up to then before it stopped, and every line stamped later after it was
    /// resumed.
    pub async fn wait_stopped(&self, timeout: Duration) -> Result<u64, String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match all_threads_stopped(self.pid) {
                Ok(true) => return Ok(now_us()),
                Ok(false) => {}
                Err(e) => return Err(format!("pid {}: {e}", self.pid)),
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "pid {} not stopped (state T) after {timeout:?}",
                    self.pid
                ));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
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

/// Whether every thread of `pid` is in state `T` (stopped by a signal).
fn all_threads_stopped(pid: i32) -> std::io::Result<bool> {
    let mut any = false;
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let entry = entry?;
        let leader = entry.file_name().to_str() == Some(pid.to_string().as_str());
        let stat = match std::fs::read_to_string(entry.path().join("stat")) {
            Ok(s) => s,
            // The thread ended meanwhile.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        // `tid (comm) S …`: the state follows the last `)` (the name may hold any character).
        let state = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next());
        match state {
            Some("T") => any = true,
            Some("Z" | "X") if leader => {
                return Err(std::io::Error::other("the process has exited"))
            }
            // A thread that is exiting does not run any more.
            Some("Z" | "X") => {}
            Some(_) => return Ok(false),
            None => return Err(std::io::Error::other(format!("unreadable stat: {stat}"))),
        }
    }
    Ok(any)
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn stamped_lines_round_trip_and_plain_lines_still_parse() {
        let lines = [
            Line::Status(StatusLine {
                role: "primary".into(),
                task: Some(1),
                term: Some(7),
                acting: true,
                epoch: Some(3),
                finished: false,
            }),
            Line::Event(Event::Backup { task: 2 }),
            Line::Exit("Ok(JobFinished { epoch: 4 })".into()),
        ];
        for line in lines {
            let stamped = Stamped {
                at_us: Some(1_700_000_000_000_001),
                line: line.clone(),
            };
            let text = serde_json::to_string(&stamped).unwrap();
            assert_eq!(serde_json::from_str::<Stamped>(&text).unwrap(), stamped);
            let plain = serde_json::to_string(&line).unwrap();
            let parsed = serde_json::from_str::<Stamped>(&plain).unwrap();
            assert_eq!((parsed.at_us, parsed.line), (None, line));
        }
    }

    #[test]
    fn printed_after_keeps_lines_stamped_later_and_unstamped_ones() {
        let l = |t| Line::Event(Event::Backup { task: t });
        let lines = [l(0), l(1), l(2), l(3)];
        let stamps = [Some(10), Some(30), Some(20), None];
        assert_eq!(printed_after(&lines, &stamps, 20), vec![l(1), l(3)]);
    }
}
