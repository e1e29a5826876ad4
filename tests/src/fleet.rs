//! A dataflow job whose nodes are `testnode --dataflow-until N` processes, for the fault
//! tests (`tests/tests/faults_*.rs`): spawning (optionally inside a network namespace), waiting
//! on printed lines, the merged audit trail, and the invariant "at most one acting primary per
//! task at any time" checked on the stamped status lines of every process.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::apps::Event;
use crate::dataflow::{check_trail, expected_result};
use crate::process::{Arrivals, Line, NodeArgs, Placement, ProcessNode, StatusLine};

/// Deadline for what a test is not about (start-up, staffing, the job's end).
pub const WAIT: Duration = Duration::from_secs(60);

/// One dataflow job's settings, shared by all its processes.
#[derive(Debug, Clone)]
pub struct Job {
    /// The `testnode` binary (`env!("CARGO_BIN_EXE_testnode")`).
    pub bin: String,
    /// etcd endpoints of nodes on the host.
    pub etcd: Vec<String>,
    /// Job name.
    pub name: String,
    /// Tasks (a binary tree).
    pub tasks: u32,
    /// Nodes per task.
    pub replicas: u32,
    /// Lease TTL in seconds.
    pub ttl_secs: u64,
    /// Last epoch.
    pub until: u64,
    /// Pause of the root before moving each epoch on.
    pub pace_ms: u64,
    /// Hold the job at `until` until [`Proc::release`].
    pub held: bool,
}

/// A node process with its label in the merged trail.
#[derive(Debug)]
pub struct Proc {
    /// The label of this process's events in the merged trail.
    pub name: String,
    /// The process.
    pub node: ProcessNode,
    /// Its pid.
    pub pid: i32,
}

impl Proc {
    /// Starts a node of `job` placed as `placement` says; `etcd` overrides the job's
    /// endpoints (a node in a namespace reaches etcd through another address).
    pub fn spawn(
        job: &Job,
        name: String,
        arrivals: &Arrivals,
        placement: &Placement,
        etcd: Option<Vec<String>>,
    ) -> Proc {
        let args = NodeArgs {
            etcd: etcd.unwrap_or_else(|| job.etcd.clone()),
            job: job.name.clone(),
            tasks: job.tasks,
            replicas: job.replicas,
            ttl_secs: job.ttl_secs,
            drive_until: None,
            pace_ms: job.pace_ms,
            dataflow_until: Some(job.until),
        };
        let hold = job.held.then_some(job.until);
        let node = ProcessNode::spawn_placed(&job.bin, &args, arrivals, hold, placement)
            .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", job.bin));
        let pid = node.pid();
        Proc { name, node, pid }
    }

    /// Every line printed so far.
    pub fn lines(&self) -> Vec<Line> {
        self.node.lines()
    }

    /// The latest status printed.
    pub fn last_status(&self) -> Option<StatusLine> {
        self.node.status()
    }

    /// Lets a held job end.
    pub async fn release(&mut self) {
        if let Err(e) = self.node.release().await {
            panic!("release {} (pid {}): {e}", self.name, self.pid);
        }
    }

    /// Sends `sig` (`STOP`, `CONT`, `KILL`, anything else: `TERM`) to the process.
    pub fn signal(&self, sig: &str) {
        let sent = match sig {
            "STOP" => self.node.pause(),
            "CONT" => self.node.resume(),
            "KILL" => self.node.kill9(),
            _ => self.node.terminate(),
        };
        assert!(sent.is_ok(), "kill -{sig} {} ({})", self.pid, self.name);
    }

    /// Waits for the process to exit and for everything it printed to be read.
    pub async fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        match self.node.wait_exit(timeout).await {
            Ok(status) => status,
            Err(e) => panic!("{}: {e}{}", self.name, dump(&[&*self])),
        }
    }
}

/// The status lines of `lines`.
pub fn statuses(lines: &[Line]) -> impl DoubleEndedIterator<Item = &StatusLine> {
    lines.iter().filter_map(|l| match l {
        Line::Status(s) => Some(s),
        _ => None,
    })
}

/// The exit line, if printed.
pub fn exit_line(lines: &[Line]) -> Option<&str> {
    lines.iter().find_map(|l| match l {
        Line::Exit(e) => Some(e.as_str()),
        _ => None,
    })
}

/// Whether a node's latest status shows it holding a slot: acting primary, or backup.
pub fn holds_slot(lines: &[Line]) -> bool {
    statuses(lines).last().is_some_and(|s| {
        (s.role == "primary" && s.acting && s.task.is_some())
            || (s.role == "backup" && s.task.is_some())
    })
}

/// The last 30 lines of every node, for failure messages.
pub fn dump(nodes: &[&Proc]) -> String {
    let mut out = String::new();
    for n in nodes {
        let lines = n.lines();
        let skip = lines.len().saturating_sub(30);
        out.push_str(&format!(
            "\n--- {} (pid {}, {} lines, last {}):\n",
            n.name,
            n.pid,
            lines.len(),
            lines.len() - skip
        ));
        for l in &lines[skip..] {
            out.push_str(&format!("  {l:?}\n"));
        }
    }
    out
}

/// Waits until the lines printed so far by `nodes` (one `Vec` per node) satisfy `cond`,
/// re-checking whenever a node prints. Panics with the nodes' last lines after `timeout`.
pub async fn wait_all(
    nodes: &[&Proc],
    why: &str,
    timeout: Duration,
    mut cond: impl FnMut(&[Vec<Line>]) -> bool,
) -> Vec<Vec<Line>> {
    let deadline = Instant::now() + timeout;
    let mut rxs: Vec<_> = nodes.iter().map(|n| n.node.subscribe()).collect();
    loop {
        let snap: Vec<Vec<Line>> = rxs
            .iter_mut()
            .map(|r| r.borrow_and_update().clone())
            .collect();
        if cond(&snap) {
            return snap;
        }
        let open: Vec<_> = rxs
            .iter_mut()
            .filter(|r| r.has_changed().is_ok())
            .map(|r| Box::pin(r.changed()))
            .collect();
        let more = async {
            if open.is_empty() {
                return false;
            }
            let _ = futures::future::select_all(open).await;
            true
        };
        match tokio::time::timeout_at(deadline, more).await {
            Ok(true) => {}
            Ok(false) => panic!(
                "every node has stopped printing and still not {why}{}",
                dump(nodes)
            ),
            Err(_) => panic!(
                "timed out after {timeout:?} waiting until {why}{}",
                dump(nodes)
            ),
        }
    }
}

/// The highest epoch any of `lines` reports.
pub fn max_epoch(all: &[Vec<Line>]) -> u64 {
    all.iter()
        .flat_map(|l| statuses(l))
        .filter_map(|s| s.epoch)
        .max()
        .unwrap_or(0)
}

/// Waits until every node holds a slot and some node reports epoch `epoch` or later.
pub async fn wait_staffed_at(nodes: &[&Proc], epoch: u64) -> Vec<StatusLine> {
    let snap = wait_all(
        nodes,
        &format!("every node holds a slot and the job is in epoch {epoch}"),
        WAIT,
        |all| all.iter().all(|l| holds_slot(l)) && max_epoch(all) >= epoch,
    )
    .await;
    snap.iter()
        .map(|l| statuses(l).last().cloned().unwrap_or_else(no_status))
        .collect()
}

fn no_status() -> StatusLine {
    StatusLine {
        role: "none".into(),
        task: None,
        term: None,
        acting: false,
        epoch: None,
        finished: false,
    }
}

/// The events of every node merged in the order the test read them (each node's own in its
/// order), labelled with the nodes' names.
pub fn trail(nodes: &[&Proc]) -> Vec<(String, Event)> {
    let mut all: Vec<(u64, String, Event)> = Vec::new();
    for n in nodes {
        let lines = n.lines();
        let seqs = n.node.seqs();
        for (l, seq) in lines.iter().zip(seqs) {
            if let Line::Event(e) = l {
                all.push((seq, n.name.clone(), e.clone()));
            }
        }
    }
    all.sort_by_key(|(seq, _, _)| *seq);
    all.into_iter().map(|(_, n, e)| (n, e)).collect()
}

/// Checks the merged trail of a finished job: exactly-once, right values, and the root's
/// results, one per epoch `0..=until`.
pub fn assert_trail(nodes: &[&Proc], tasks: u32, until: u64) {
    assert_trail_with_cut_root(nodes, tasks, until, None);
}

/// As [`assert_trail`], for a job whose root primary (term `cut`) was cut off while it still
/// acted: it may have recorded the result of the epoch it was in before its successor entered
/// that epoch again (as every new primary does). That one repeat is allowed: the result of
/// term `cut` for an epoch also recorded, with the same value, by a later term.
pub fn assert_trail_with_cut_root(nodes: &[&Proc], tasks: u32, until: u64, cut: Option<u64>) {
    let mut events = trail(nodes);
    if let Some(cut) = cut {
        let repeated: Vec<(u64, u64)> = events
            .iter()
            .filter_map(|(_, e)| match e {
                Event::Result { epoch, value, term } if *term > cut => Some((*epoch, *value)),
                _ => None,
            })
            .collect();
        events.retain(|(_, e)| {
            !matches!(e, Event::Result { epoch, value, term }
                if *term == cut && repeated.contains(&(*epoch, *value)))
        });
    }
    let bad = check_trail(&events, tasks, until);
    assert!(
        bad.is_empty(),
        "{} violations:\n{}",
        bad.len(),
        bad.join("\n")
    );
    let results: Vec<(u64, u64)> = events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::Result { epoch, value, .. } => Some((*epoch, *value)),
            _ => None,
        })
        .collect();
    let want: Vec<(u64, u64)> = (0..=until)
        .map(|e| (e, expected_result(tasks, e)))
        .collect();
    assert_eq!(results, want, "the root's results");
}

/// Waits for every process in `nodes` to exit successfully with the job finished at `until`,
/// and checks no process printed a panic.
pub async fn assert_all_finish(nodes: &mut [&mut Proc], until: u64) {
    let want = format!("Ok(JobFinished {{ epoch: {until} }})");
    for n in nodes.iter_mut() {
        let status = n.wait_exit(WAIT).await;
        let lines = n.lines();
        assert!(
            status.success(),
            "{} (pid {}) exited with {status}{}",
            n.name,
            n.pid,
            dump(&[&**n])
        );
        assert_eq!(
            exit_line(&lines),
            Some(want.as_str()),
            "{} (pid {}) ended{}",
            n.name,
            n.pid,
            dump(&[&**n])
        );
    }
}

/// Every span of time a node acted as primary of a task: `(task, term, node, from, to)` in
/// microseconds of the stamps (`to` is `u64::MAX` when still acting at the last line).
pub type PrimarySpan = (u32, u64, String, u64, u64);

/// The spans of acting primaries of every node, from their stamped status lines.
pub fn primary_spans(nodes: &[&Proc]) -> Vec<PrimarySpan> {
    let mut spans = Vec::new();
    for n in nodes {
        let lines = n.lines();
        let stamps = n.node.stamps();
        let mut open: Option<(u32, u64, u64)> = None;
        for (l, at) in lines.iter().zip(stamps) {
            let Line::Status(s) = l else { continue };
            let at = at.unwrap_or(0);
            let now = s.task.and_then(|t| s.primary_of(t).map(|term| (t, term)));
            match (open, now) {
                (Some((t, term, _)), Some((t2, term2))) if t == t2 && term == term2 => {}
                (prev, next) => {
                    if let Some((t, term, from)) = prev {
                        spans.push((t, term, n.name.clone(), from, at));
                    }
                    open = next.map(|(t, term)| (t, term, at));
                }
            }
        }
        if let Some((t, term, from)) = open {
            spans.push((t, term, n.name.clone(), from, u64::MAX));
        }
    }
    spans
}

/// Pairs of status spans of different nodes claiming to act as primary of the same task at
/// the same time: what an observer of the statuses saw; [`stale_actions`] checks what the
/// nodes did.
pub fn overlapping_status_spans(nodes: &[&Proc]) -> Vec<String> {
    let spans = primary_spans(nodes);
    let mut bad = Vec::new();
    let mut by_task: BTreeMap<u32, Vec<&PrimarySpan>> = BTreeMap::new();
    for s in &spans {
        by_task.entry(s.0).or_default().push(s);
    }
    for (task, spans) in by_task {
        for (i, a) in spans.iter().enumerate() {
            for b in &spans[i + 1..] {
                if a.2 != b.2 && a.3 < b.4 && b.3 < a.4 {
                    bad.push(format!(
                        "task {task}: statuses of two acting primaries overlap by {} us: {a:?} and {b:?}",
                        a.4.min(b.4) - a.3.max(b.3)
                    ));
                }
            }
        }
    }
    bad
}

/// The task and term an event was handled under, when it is something only a primary does.
fn action_of(e: &Event) -> Option<(u32, u64)> {
    match *e {
        Event::Primary { task, term }
        | Event::Enter { task, term, .. }
        | Event::Moved { task, term, .. }
        | Event::Data { task, term, .. }
        | Event::Meta { task, term, .. }
        | Event::Neighbour { task, term, .. }
        | Event::Counter { task, term, .. } => Some((task, term)),
        // Only the root's primary records results.
        Event::Result { term, .. } => Some((0, term)),
        Event::Backup { .. } | Event::Restored { .. } | Event::Exit { .. } => None,
    }
}

/// Violations of "one primary per task", checked on what the nodes did (their stamped task
/// events): a node handling an event of a task under a term after another node had already
/// handled one under a higher term of that task, or one term used by two nodes.
pub fn stale_actions(nodes: &[&Proc]) -> Vec<String> {
    // (task) -> every action: (stamp, term, node, what).
    let mut by_task: BTreeMap<u32, Vec<(u64, u64, String, String)>> = BTreeMap::new();
    for n in nodes {
        let lines = n.lines();
        let stamps = n.node.stamps();
        for (l, at) in lines.iter().zip(stamps) {
            let Line::Event(e) = l else { continue };
            if let Some((task, term)) = action_of(e) {
                by_task.entry(task).or_default().push((
                    at.unwrap_or(0),
                    term,
                    n.name.clone(),
                    format!("{e:?}"),
                ));
            }
        }
    }
    let mut bad = Vec::new();
    for (task, mut acts) in by_task {
        acts.sort();
        let mut owner: BTreeMap<u64, String> = BTreeMap::new();
        // The highest term seen so far, by whom and when.
        let mut highest: Option<(u64, String, u64)> = None;
        for (at, term, node, what) in acts {
            match owner.get(&term) {
                Some(o) if *o != node => {
                    bad.push(format!("task {task}: term {term} used by {o} and {node}"));
                }
                _ => {
                    owner.insert(term, node.clone());
                }
            }
            match &highest {
                Some((h, by, when)) if term < *h && *by != node => bad.push(format!(
                    "task {task}: {node} acted under term {term} at {at} us ({what}), after \
                     {by} acted under term {h} at {when} us"
                )),
                Some((h, _, _)) if term <= *h => {}
                _ => highest = Some((term, node, at)),
            }
        }
    }
    bad
}
