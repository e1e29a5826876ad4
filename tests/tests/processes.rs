//! Process-level faults against a real etcd: nodes run as `testnode` child processes and are
//! paused (SIGSTOP/SIGCONT), killed (SIGKILL) or stopped (SIGTERM). Every wait is on lines the
//! children print, with a deadline; every child is killed when the test ends, pass or fail
//! (the nodes live in a `Vec<ProcessNode>` whose children are `kill_on_drop`). What a process
//! printed after a signal is told by the wall-clock stamp of each line (see
//! `taskgraph_tests::process::Stamped`), never by how many lines the test had read by then.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use taskgraph_tests::apps::Event;
use taskgraph_tests::etcd::Etcd;
use taskgraph_tests::process::{printed_after, Line, NodeArgs, ProcessNode, StatusLine};
use taskgraph_tests::{init_logs, job_name};
use tracing::info;

const BIN: &str = env!("CARGO_BIN_EXE_testnode");
/// Deadline for things that are not the subject of a test (start-up, shutdown, staffing).
const WAIT: Duration = Duration::from_secs(20);

async fn etcd() -> Etcd {
    init_logs();
    Etcd::start().await.expect("start etcd")
}

fn node_args(etcd: &Etcd, job: &str, tasks: u32, replicas: u32, ttl_secs: u64) -> NodeArgs {
    NodeArgs {
        etcd: etcd.endpoints(),
        job: job.to_owned(),
        tasks,
        replicas,
        ttl_secs,
        drive_until: None,
        pace_ms: 0,
        dataflow_until: None,
    }
}

fn spawn_nodes(args: &NodeArgs, n: usize) -> Vec<ProcessNode> {
    (0..n)
        .map(|_| ProcessNode::spawn(BIN, args).expect("spawn testnode"))
        .collect()
}

fn statuses(lines: &[Line]) -> impl Iterator<Item = &StatusLine> {
    lines.iter().filter_map(|l| match l {
        Line::Status(s) => Some(s),
        _ => None,
    })
}

fn events(lines: &[Line]) -> impl Iterator<Item = &Event> {
    lines.iter().filter_map(|l| match l {
        Line::Event(e) => Some(e),
        _ => None,
    })
}

fn last_status(lines: &[Line]) -> Option<&StatusLine> {
    statuses(lines).last()
}

/// Whether a node's latest status shows it holding a slot: acting primary, or backup.
fn holds_slot(lines: &[Line]) -> bool {
    last_status(lines).is_some_and(|s| {
        (s.role == "primary" && s.acting && s.task.is_some())
            || (s.role == "backup" && s.task.is_some())
    })
}

/// The last `n` lines of every node, for failure messages.
fn dump(nodes: &[&ProcessNode]) -> String {
    let mut out = String::new();
    for n in nodes {
        let lines = n.lines();
        let skip = lines.len().saturating_sub(30);
        out.push_str(&format!(
            "\n--- pid {} ({} lines, last {}):\n",
            n.pid(),
            lines.len(),
            lines.len() - skip
        ));
        for l in &lines[skip..] {
            out.push_str(&format!("  {l:?}\n"));
        }
    }
    out
}

/// Waits until the lines printed so far by `nodes` (one `Vec` per node, in order) satisfy
/// `cond`, re-checking whenever any node prints a line. Panics with the nodes' last lines
/// after `timeout`. Returns the lines that satisfied `cond`.
async fn wait_all(
    nodes: &[&ProcessNode],
    why: &str,
    timeout: Duration,
    mut cond: impl FnMut(&[Vec<Line>]) -> bool,
) -> Vec<Vec<Line>> {
    let deadline = Instant::now() + timeout;
    loop {
        let snap: Vec<Vec<Line>> = nodes.iter().map(|n| n.lines()).collect();
        if cond(&snap) {
            return snap;
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            panic!(
                "timed out after {timeout:?} waiting until {why}{}",
                dump(nodes)
            );
        }
        // Wake up as soon as any node prints a line past what `cond` saw (or at the deadline).
        let more = nodes.iter().zip(&snap).map(|(n, seen)| {
            let seen = seen.len();
            Box::pin(n.wait_lines(why, remaining, move |l| l.len() > seen))
        });
        let _ = futures::future::select_all(more).await;
    }
}

/// Waits until every node holds a slot, then checks that each of `tasks` tasks has exactly
/// one acting primary. Returns each node's status.
async fn wait_staffed(nodes: &[ProcessNode], tasks: u32) -> Vec<StatusLine> {
    let refs: Vec<&ProcessNode> = nodes.iter().collect();
    let snap = wait_all(&refs, "every node holds a slot", WAIT, |all| {
        all.iter().all(|l| holds_slot(l))
    })
    .await;
    let st: Vec<StatusLine> = snap
        .iter()
        .map(|l| last_status(l).unwrap().clone())
        .collect();
    for t in 0..tasks {
        assert_eq!(
            st.iter().filter(|s| s.primary_of(t).is_some()).count(),
            1,
            "one acting primary of task {t}: {st:#?}"
        );
    }
    st
}

async fn read_epoch(etcd: &Etcd, job: &str) -> u64 {
    let mut client = etcd.client().await.unwrap();
    let resp = client
        .get(format!("/taskgraph/jobs/{job}/epoch"), None)
        .await
        .unwrap();
    let value = resp.kvs()[0].value_str().unwrap().to_owned();
    value
        .parse()
        .unwrap_or_else(|_| panic!("epoch key holds {value:?}, expected a running epoch"))
}

/// SIGTERMs every node still running and checks each ends cleanly, printing its exit.
async fn terminate_all(nodes: &mut [ProcessNode]) {
    for n in nodes.iter() {
        n.terminate().unwrap();
    }
    for n in nodes.iter_mut() {
        let status = n.wait_exit(WAIT).await.unwrap();
        assert!(status.success(), "pid {} exited with {status}", n.pid());
        // The child has exited, but its last lines may still be on their way through the pipe.
        wait_all(&[n], "the node printed its exit", WAIT, |all| {
            all[0].iter().any(|l| matches!(l, Line::Exit(_)))
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_primary_stops_acting_and_its_late_work_is_fenced() {
    let etcd = etcd().await;
    let job = job_name("pause");
    let mut args = node_args(&etcd, &job, 1, 2, 1);
    // Task 0's primary moves the epoch on every 20 ms, for as long as the test runs.
    args.drive_until = Some(1_000_000);
    args.pace_ms = 20;
    let mut nodes = spawn_nodes(&args, 2);
    let st = wait_staffed(&nodes, 1).await;
    let p = st.iter().position(|s| s.primary_of(0).is_some()).unwrap();
    let b = 1 - p;
    let old_term = st[p].primary_of(0).unwrap();
    assert_eq!(st[b].role, "backup", "{st:#?}");
    // Let the primary drive a few epochs first, so it is mid-work when paused.
    wait_all(&[&nodes[p]], "the primary moved 3 epochs", WAIT, |all| {
        events(&all[0])
            .filter(|e| matches!(e, Event::Moved { term, .. } if *term == old_term))
            .count()
            >= 3
    })
    .await;

    info!(
        "--- pause the primary (pid {}, term {old_term})",
        nodes[p].pid()
    );
    // Timed from just before the signal (the `kill` command takes a few ms itself).
    let t0 = Instant::now();
    nodes[p].pause().unwrap();
    // Every line the node stamped up to `stopped_at` it printed before the pause, every line
    // stamped later after the resume, however late this test reads them.
    let stopped_at = nodes[p]
        .wait_stopped(Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("SIGSTOP: {e}"));
    // The backup can only take over once etcd has expired the paused node's lease, i.e. once
    // the pause has lasted longer than the TTL.
    let snap = wait_all(
        &[&nodes[b]],
        "the backup is acting primary with a higher term",
        Duration::from_secs(10),
        |all| statuses(&all[0]).any(|s| s.primary_of(0).is_some_and(|t| t > old_term)),
    )
    .await;
    println!(
        "takeover from a paused primary (TTL 1 s): {:?}",
        t0.elapsed()
    );
    let new_term = statuses(&snap[0])
        .find_map(|s| s.primary_of(0).filter(|t| *t > old_term))
        .unwrap();

    info!("--- resume the paused node");
    nodes[p].resume().unwrap();
    wait_all(
        &[&nodes[p]],
        "the resumed node reports that it no longer acts as primary",
        Duration::from_secs(10),
        |all| {
            let after = printed_after(&all[0], &nodes[p].stamps(), stopped_at);
            let released = statuses(&after).any(|s| {
                !(s.role == "primary" && s.acting && s.task == Some(0) && s.term == Some(old_term))
            });
            released
        },
    )
    .await;
    wait_all(
        &[&nodes[p]],
        "the resumed node gave up its slot and rejoined as backup",
        WAIT,
        |all| {
            let after = &printed_after(&all[0], &nodes[p].stamps(), stopped_at)[..];
            events(after)
                .any(|e| matches!(e, Event::Exit { task: 0, reason } if reason == "SlotLost"))
                && last_status(after).is_some_and(|s| s.role == "backup")
        },
    )
    .await;

    info!("--- the epoch keeps moving under the new primary (term {new_term})");
    let e1 = read_epoch(&etcd, &job).await;
    wait_all(
        &[&nodes[b]],
        "the new primary entered 3 more epochs",
        WAIT,
        |all| {
            events(&all[0]).any(
                |e| matches!(e, Event::Enter { task: 0, epoch, term } if *term == new_term && *epoch >= e1 + 3),
            )
        },
    )
    .await;
    let e2 = read_epoch(&etcd, &job).await;
    assert!(e2 >= e1 + 3, "epoch in etcd moved from {e1} to {e2}");

    let old_lines = nodes[p].lines();
    let new_lines = nodes[b].lines();
    let after_resume = &nodes[p].lines_after(stopped_at)[..];
    // (a) Once resumed, the node never claims to act as primary under its old term.
    let stale: Vec<_> = statuses(after_resume)
        .filter(|s| s.primary_of(0) == Some(old_term))
        .collect();
    assert!(
        stale.is_empty(),
        "the resumed node reported acting as primary of term {old_term}: {stale:#?}"
    );
    // (b) No inc_epoch of the old term succeeded after the new primary took over. A `Moved` of
    // the old term may still be printed after the resume when its transaction was committed
    // before the pause and only its answer was read after it; such a move comes before the
    // first epoch the new primary entered.
    let new_entered: Vec<u64> = events(&new_lines)
        .filter_map(|e| match e {
            Event::Enter { epoch, term, .. } if *term == new_term => Some(*epoch),
            _ => None,
        })
        .collect();
    let first_new = new_entered[0];
    let late_moves: Vec<_> = events(after_resume)
        .filter(|e| matches!(e, Event::Moved { term, from, .. } if *term == old_term && *from >= first_new))
        .collect();
    assert!(
        late_moves.is_empty(),
        "the resumed node moved an epoch the new primary (first epoch {first_new}) owned: \
         {late_moves:?}"
    );
    // (c) The new primary entered every epoch once, in order; each epoch moved exactly once.
    assert!(
        new_entered.windows(2).all(|w| w[1] == w[0] + 1),
        "new primary's epochs: {new_entered:?}"
    );
    // Nobody but the new primary moved the epochs it entered: a move it did not make (e.g. a
    // late inc_epoch of the old term whose answer was lost when the old slot was dropped)
    // would leave a gap here. The move into the last epoch entered may not be recorded yet.
    let new_moved: Vec<u64> = events(&new_lines)
        .filter_map(|e| match e {
            Event::Moved { from, term, .. } if *term == new_term => Some(*from),
            _ => None,
        })
        .collect();
    let missing: Vec<u64> = new_entered[..new_entered.len().saturating_sub(2)]
        .iter()
        .copied()
        .filter(|e| !new_moved.contains(e))
        .collect();
    assert!(
        missing.is_empty(),
        "the new primary entered {new_entered:?} but did not move on from {missing:?} \
         (moved: {new_moved:?})"
    );
    let mut moved: BTreeMap<u64, usize> = BTreeMap::new();
    for e in events(&old_lines).chain(events(&new_lines)) {
        if let Event::Moved { from, .. } = e {
            *moved.entry(*from).or_default() += 1;
        }
    }
    assert!(
        moved.values().all(|n| *n == 1),
        "an epoch moved twice: {moved:?}"
    );

    info!("--- stop both nodes");
    terminate_all(&mut nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_primary_process_is_replaced_within_the_ttl() {
    let etcd = etcd().await;
    let args = node_args(&etcd, &job_name("kill"), 2, 2, 1);
    let mut nodes = spawn_nodes(&args, 4);
    let st = wait_staffed(&nodes, 2).await;
    let victim = st.iter().position(|s| s.primary_of(0).is_some()).unwrap();
    let old_term = st[victim].primary_of(0).unwrap();
    let backup = st
        .iter()
        .position(|s| s.role == "backup" && s.task == Some(0))
        .unwrap_or_else(|| panic!("a backup of task 0: {st:#?}"));

    info!(
        "--- kill -9 the primary of task 0 (pid {})",
        nodes[victim].pid()
    );
    // Timed from just before the signal (the `kill` command takes a few ms itself).
    let t0 = Instant::now();
    nodes[victim].kill9().unwrap();
    wait_all(
        &[&nodes[backup]],
        "the backup is acting primary of task 0 with a higher term",
        Duration::from_secs(5),
        |all| statuses(&all[0]).any(|s| s.primary_of(0).is_some_and(|t| t > old_term)),
    )
    .await;
    println!("takeover after kill -9 (TTL 1 s): {:?}", t0.elapsed());
    let status = nodes[victim].wait_exit(WAIT).await.unwrap();
    assert!(!status.success(), "the killed node exited with {status}");
    assert!(
        !nodes[victim]
            .lines()
            .iter()
            .any(|l| matches!(l, Line::Exit(_))),
        "a node killed with SIGKILL cannot print its exit"
    );

    info!("--- stop the other nodes");
    nodes.remove(victim);
    terminate_all(&mut nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_over_at_once() {
    let etcd = etcd().await;
    // A 30 s lease: a handover that waited for the lease to expire would miss the deadline.
    let args = node_args(&etcd, &job_name("sigterm"), 1, 2, 30);
    let mut nodes = spawn_nodes(&args, 2);
    let st = wait_staffed(&nodes, 1).await;
    let victim = st.iter().position(|s| s.primary_of(0).is_some()).unwrap();
    let backup = 1 - victim;
    let old_term = st[victim].primary_of(0).unwrap();
    assert_eq!(st[backup].role, "backup", "{st:#?}");

    info!("--- SIGTERM the primary (pid {})", nodes[victim].pid());
    // Timed from just before the signal (the `kill` command takes a few ms itself).
    let t0 = Instant::now();
    nodes[victim].terminate().unwrap();
    wait_all(
        &[&nodes[backup]],
        "the backup is acting primary with a higher term",
        Duration::from_secs(10),
        |all| statuses(&all[0]).any(|s| s.primary_of(0).is_some_and(|t| t > old_term)),
    )
    .await;
    println!("takeover after SIGTERM (TTL 30 s): {:?}", t0.elapsed());
    let status = nodes[victim].wait_exit(WAIT).await.unwrap();
    assert!(status.success(), "the terminated node exited with {status}");
    let lines = wait_all(
        &[&nodes[victim]],
        "the node printed its exit",
        WAIT,
        |all| all[0].iter().any(|l| matches!(l, Line::Exit(_))),
    )
    .await
    .remove(0);
    let exits: Vec<&String> = lines
        .iter()
        .filter_map(|l| match l {
            Line::Exit(e) => Some(e),
            _ => None,
        })
        .collect();
    assert_eq!(exits, vec!["Ok(Stopped)"], "{}", dump(&[&nodes[victim]]));
    assert!(
        events(&lines).any(|e| matches!(e, Event::Exit { task: 0, reason } if reason == "Stopped")),
        "the terminated node's task ran exit(Stopped){}",
        dump(&[&nodes[victim]])
    );

    info!("--- stop the new primary");
    nodes.remove(victim);
    terminate_all(&mut nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spare_process_takes_over_when_task_has_no_backup() {
    let etcd = etcd().await;
    let args = node_args(&etcd, &job_name("spareproc"), 1, 1, 1);
    let mut nodes = spawn_nodes(&args, 2);
    let refs: Vec<&ProcessNode> = nodes.iter().collect();
    // One primary; the other node has a lease and has seen the job (it knows the epoch) but
    // there is no slot left for it.
    let snap = wait_all(&refs, "one primary and one joined spare", WAIT, |all| {
        let st: Vec<Option<&StatusLine>> = all.iter().map(|l| last_status(l)).collect();
        st.iter().flatten().any(|s| s.primary_of(0).is_some())
            && st
                .iter()
                .flatten()
                .any(|s| s.role == "spare" && s.acting && s.epoch.is_some())
    })
    .await;
    let st: Vec<StatusLine> = snap
        .iter()
        .map(|l| last_status(l).unwrap().clone())
        .collect();
    let victim = st.iter().position(|s| s.primary_of(0).is_some()).unwrap();
    let spare = 1 - victim;
    let old_term = st[victim].primary_of(0).unwrap();
    assert_eq!(st[spare].role, "spare", "{st:#?}");

    info!("--- kill -9 the primary (pid {})", nodes[victim].pid());
    // Timed from just before the signal (the `kill` command takes a few ms itself).
    let t0 = Instant::now();
    nodes[victim].kill9().unwrap();
    wait_all(
        &[&nodes[spare]],
        "the spare is acting primary of task 0",
        Duration::from_secs(5),
        |all| {
            events(&all[0])
                .any(|e| matches!(e, Event::Primary { task: 0, term } if *term > old_term))
                && statuses(&all[0]).any(|s| s.primary_of(0).is_some_and(|t| t > old_term))
        },
    )
    .await;
    println!("spare takeover after kill -9 (TTL 1 s): {:?}", t0.elapsed());
    assert!(
        !events(&nodes[spare].lines()).any(|e| matches!(e, Event::Backup { .. })),
        "the spare never was a backup (1 replica per task)"
    );

    info!("--- stop the new primary");
    nodes.remove(victim);
    terminate_all(&mut nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_primary_process_is_replaced_long_before_its_lease_expires() {
    let etcd = etcd().await;
    // A 10 s lease: only the evidence of death (the dead process's port refuses) can explain a
    // takeover before the deadline below.
    let args = node_args(&etcd, &job_name("evident"), 1, 2, 10);
    let mut nodes = spawn_nodes(&args, 2);
    let st = wait_staffed(&nodes, 1).await;
    let victim = st.iter().position(|s| s.primary_of(0).is_some()).unwrap();
    let backup = 1 - victim;
    let old_term = st[victim].primary_of(0).unwrap();

    info!(
        "--- kill -9 the primary (pid {}); its lease stays in etcd",
        nodes[victim].pid()
    );
    let t0 = Instant::now();
    nodes[victim].kill9().unwrap();
    wait_all(
        &[&nodes[backup]],
        "the backup is acting primary with a higher term",
        Duration::from_secs(5),
        |all| statuses(&all[0]).any(|s| s.primary_of(0).is_some_and(|t| t > old_term)),
    )
    .await;
    println!(
        "takeover after kill -9 with a 10 s lease (evident death): {:?}",
        t0.elapsed()
    );
    nodes.remove(victim);
    terminate_all(&mut nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn briefly_paused_primary_is_not_replaced() {
    let etcd = etcd().await;
    // A 5 s lease and a 1 s pause: the primary is slow, not dead. Its port still accepts
    // connections (the kernel answers), so the backup has no evidence and must wait for the
    // lease, which the primary renews after the pause.
    let args = node_args(&etcd, &job_name("slow"), 1, 2, 5);
    let mut nodes = spawn_nodes(&args, 2);
    let st = wait_staffed(&nodes, 1).await;
    let victim = st.iter().position(|s| s.primary_of(0).is_some()).unwrap();
    let backup = 1 - victim;
    let term = st[victim].primary_of(0).unwrap();

    info!("--- SIGSTOP the primary for 1 s (the fault itself), then SIGCONT");
    nodes[victim].pause().unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    nodes[victim].resume().unwrap();
    // The resumed primary answers pings again: ask the etcd key who is primary now, after the
    // backup has had many monitor rounds (every 50 ms) against the resumed node.
    let mut client = etcd.client().await.unwrap();
    let key = format!("/taskgraph/jobs/{}/tasks/0/primary", args.job);
    let deadline = Instant::now() + Duration::from_millis(500);
    while Instant::now() < deadline {
        let kv = client.get(key.clone(), None).await.unwrap();
        let rev = kv.kvs().first().map(|kv| kv.create_revision() as u64);
        assert_eq!(rev, Some(term), "the primary's term must not change");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let backup_lines = nodes[backup].lines();
    assert!(
        statuses(&backup_lines).all(|s| s.role != "primary"),
        "the backup never became primary{}",
        dump(&[&nodes[backup]])
    );
    assert_eq!(
        last_status(&nodes[victim].lines()).and_then(|s| s.primary_of(0)),
        Some(term),
        "{}",
        dump(&[&nodes[victim]])
    );
    terminate_all(&mut nodes).await;
}
