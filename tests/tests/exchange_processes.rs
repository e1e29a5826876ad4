//! The data exchange (pulls, metas, neighbour incidents, replication, checkpoints) across
//! process-level faults: every node of a dataflow job (`taskgraph_tests::dataflow`) runs as a
//! `testnode --dataflow-until N` child process; a primary is paused past its lease (SIGSTOP,
//! SIGCONT) or killed (SIGKILL). Each process prints its events; the events of every process,
//! labelled `p0`, `p1`…, merged in the order the test read them (each process's own in the
//! order it printed them), are checked by [`check_trail`]. Every wait is on printed lines,
//! with a deadline; every child is killed when the test ends, pass or fail (`kill_on_drop`).
//! What a process printed after a signal is told by the wall-clock stamp of each line (see
//! `taskgraph_tests::process::Stamped`), never by how many lines the test had read by then.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use etcd_client::{EventType, WatchOptions};
use taskgraph::testing::etcd::keys::{JobKeys, StoredCheckpoint};
use taskgraph_tests::apps::Event;
use taskgraph_tests::dataflow::{check_trail, expected_result};
use taskgraph_tests::etcd::Etcd;
use taskgraph_tests::fleet::{
    assert_all_finish, dump, exit_line, holds_slot, statuses, trail, wait_all, Job, Proc,
};
use taskgraph_tests::process::{printed_after, Arrivals, Line, Placement, StatusLine};
use taskgraph_tests::{init_logs, job_name};
use tokio::time::Instant;
use tracing::info;

const BIN: &str = env!("CARGO_BIN_EXE_testnode");
/// Deadline for things that are not the subject of a test (start-up, staffing, the job's end).
const WAIT: Duration = Duration::from_secs(30);

fn job(etcd: &Etcd, test: &str, tasks: u32, ttl_secs: u64, until: u64, pace_ms: u64) -> Job {
    Job {
        bin: BIN.to_owned(),
        etcd: etcd.endpoints(),
        name: job_name(test),
        tasks,
        replicas: 2,
        ttl_secs,
        until,
        pace_ms,
        held: false,
    }
}

fn spawn_all(job: &Job) -> Vec<Proc> {
    let arrivals = Arrivals::default();
    (0..job.tasks * job.replicas)
        .map(|i| Proc::spawn(job, format!("p{i}"), &arrivals, &Placement::default(), None))
        .collect()
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

/// Waits until every node holds a slot and the job has entered `epoch` (a node reports it),
/// checks that each task has exactly one acting primary and that the job is still running.
/// Returns each node's status.
async fn wait_staffed_at(nodes: &[Proc], tasks: u32, epoch: u64) -> Vec<StatusLine> {
    let refs: Vec<&Proc> = nodes.iter().collect();
    let snap = wait_all(
        &refs,
        &format!("every node holds a slot and the job is in epoch {epoch}"),
        WAIT,
        |all| {
            all.iter().all(|l| holds_slot(l))
                && all
                    .iter()
                    .any(|l| last_status(l).is_some_and(|s| s.epoch.is_some_and(|e| e >= epoch)))
        },
    )
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
    assert!(
        st.iter().all(|s| !s.finished),
        "the job must still be running: {st:#?}"
    );
    st
}

/// `node`'s lines around the time `t_us`: the last `before` stamped up to it and the first
/// `after` stamped later, each with its stamp relative to `t_us` in microseconds, for failure
/// messages.
fn around(node: &Proc, t_us: u64, before: usize, after: usize) -> Vec<(Option<i64>, Line)> {
    let rel =
        |at: Option<u64>| at.map(|a| i64::try_from(a).unwrap() - i64::try_from(t_us).unwrap());
    let all: Vec<(Option<i64>, Line)> = node
        .lines()
        .into_iter()
        .zip(node.node.stamps())
        .map(|(l, at)| (rel(at), l))
        .collect();
    let (early, late): (Vec<_>, Vec<_>) = all
        .into_iter()
        .partition(|(at, _)| at.is_some_and(|a| a <= 0));
    let skip = early.len().saturating_sub(before);
    early
        .into_iter()
        .skip(skip)
        .chain(late.into_iter().take(after))
        .collect()
}

/// One value of a task's checkpoint key in etcd.
#[derive(Debug)]
struct StoredCounter {
    /// The etcd revision it was written at.
    revision: i64,
    /// The epoch stored with it.
    epoch: u64,
    /// The dataflow app's counter in it (`None`: not a counter).
    counter: Option<u64>,
}

/// Every value task `task`'s checkpoint key of job `job` held in etcd, oldest first (the
/// test's etcd keeps its whole history: nothing compacts it).
async fn checkpoint_history(etcd: &Etcd, job: &str, task: u32) -> Vec<StoredCounter> {
    let key = JobKeys::new(job).checkpoint(task);
    let mut client = etcd.client().await.expect("etcd client");
    // The key is never deleted, so its version counts every write since it was created.
    let writes = client
        .get(key.as_str(), None)
        .await
        .expect("read the checkpoint")
        .kvs()
        .first()
        .map_or(0, |kv| kv.version());
    let mut stream = client
        .watch(
            key.as_str(),
            Some(WatchOptions::new().with_start_revision(1)),
        )
        .await
        .expect("watch the checkpoint's history");
    let mut out = Vec::new();
    while (out.len() as i64) < writes {
        let resp = tokio::time::timeout(WAIT, stream.message())
            .await
            .expect("the checkpoint's history arrives")
            .expect("watch")
            .expect("watch open");
        assert_eq!(resp.compact_revision(), 0, "the history was compacted");
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            if ev.event_type() != EventType::Put {
                continue;
            }
            let stored = StoredCheckpoint::decode(kv.value()).expect("a taskgraph checkpoint");
            out.push(StoredCounter {
                revision: kv.mod_revision(),
                epoch: stored.epoch,
                counter: taskgraph::decode::<u64>(&stored.data).ok(),
            });
        }
    }
    out
}

fn assert_trail(events: &[(String, Event)], tasks: u32, until: u64) {
    let bad = check_trail(events, tasks, until);
    assert!(
        bad.is_empty(),
        "{} violations:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

/// The root's results, in the order recorded: exactly one per epoch `0..=until`, each right.
fn assert_results(events: &[(String, Event)], tasks: u32, until: u64) {
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

/// Whether `events` show, for task `task`, a `neighbour_failed` of `neighbour` followed later
/// by its `neighbour_restarted`. Returns (failed, restarted) counts and whether one restart
/// follows a failure.
fn incident(events: &[(String, Event)], task: u32, neighbour: u32) -> (usize, usize, bool) {
    let mut failed = 0;
    let mut restarted = 0;
    let mut ordered = false;
    for (_, e) in events {
        if let Event::Neighbour {
            task: t,
            neighbour: n,
            failed: f,
            ..
        } = e
        {
            if *t != task || *n != neighbour {
                continue;
            }
            if *f {
                failed += 1;
            } else {
                restarted += 1;
                ordered |= failed > 0;
            }
        }
    }
    (failed, restarted, ordered)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_primary_is_fenced_after_its_term() {
    init_logs();
    let etcd = Etcd::start().await.expect("start etcd");
    // 1 s leases; the root moves on every 50 ms (plus the epoch's exchanges). The job does not
    // end before the test has seen the paused node come back and give its slot up: it is held
    // at its last epoch until then.
    let (tasks, until) = (3, 40);
    let mut job = job(&etcd, "dfpause", tasks, 1, until, 50);
    job.held = true;
    let mut nodes = spawn_all(&job);
    let st = wait_staffed_at(&nodes, tasks, 3).await;
    let p = st.iter().position(|s| s.primary_of(1).is_some()).unwrap();
    let old_term = st[p].primary_of(1).unwrap();
    let b = st
        .iter()
        .position(|s| s.role == "backup" && s.task == Some(1))
        .unwrap_or_else(|| panic!("a backup of task 1: {st:#?}"));

    info!(
        "--- SIGSTOP the primary of task 1 ({}, pid {}, term {old_term}) for 2.5 s",
        nodes[p].name, nodes[p].pid
    );
    let t0 = Instant::now();
    nodes[p].signal("STOP");
    // Every line the node stamped up to `stopped_at` it printed before the pause, every line
    // stamped later after the resume, however late this test reads them.
    let stopped_at = match nodes[p].node.wait_stopped(Duration::from_secs(10)).await {
        Ok(t) => t,
        Err(e) => panic!("SIGSTOP {}: {e}", nodes[p].name),
    };
    // The fault itself is a pause longer than the TTL; meanwhile the backup must take over,
    // which it can only do once etcd has expired the paused node's lease.
    let snap = wait_all(
        &[&nodes[b]],
        "the backup acts as primary of task 1 with a higher term",
        Duration::from_secs(10),
        |all| statuses(&all[0]).any(|s| s.primary_of(1).is_some_and(|t| t > old_term)),
    )
    .await;
    let took = t0.elapsed();
    let new_term = statuses(&snap[0])
        .find_map(|s| s.primary_of(1).filter(|t| *t > old_term))
        .unwrap();
    println!("takeover from a paused primary (TTL 1 s): {took:?}");
    tokio::time::sleep_until(t0 + Duration::from_millis(2500)).await;
    // The paused node comes back into a running job: it cannot have ended, it is held.
    info!("--- SIGCONT {}", nodes[p].name);
    nodes[p].signal("CONT");
    wait_all(
        &[&nodes[p]],
        "the resumed node ran exit(SlotLost) for task 1",
        WAIT,
        |all| {
            let after = printed_after(&all[0], &nodes[p].node.stamps(), stopped_at);
            let lost = events(&after)
                .any(|e| matches!(e, Event::Exit { task: 1, reason } if reason == "SlotLost"));
            lost
        },
    )
    .await;

    info!("--- the job runs to its end under the new primary (term {new_term})");
    for n in nodes.iter_mut() {
        n.release().await;
    }
    {
        let mut all: Vec<&mut Proc> = nodes.iter_mut().collect();
        assert_all_finish(&mut all, until).await;
    }
    let refs: Vec<&Proc> = nodes.iter().collect();
    let ev = trail(&refs);
    assert_trail(&ev, tasks, until);
    assert_results(&ev, tasks, until);

    let after_resume = &nodes[p].node.lines_after(stopped_at)[..];
    // (a) Once resumed, the node never reports acting as primary under its old term.
    let stale: Vec<_> = statuses(after_resume)
        .filter(|s| s.primary_of(1) == Some(old_term))
        .collect();
    assert!(
        stale.is_empty(),
        "the resumed node reported acting as primary of term {old_term}: {stale:#?}\n\
         its lines around the pause (stamp in µs after the node was seen stopped, line): \
         {:#?}",
        around(&nodes[p], stopped_at, 8, 12)
    );
    // (b) …and the framework delivers nothing to its task under that term: no answer, no
    // meta, no epoch entered, no neighbour incident (so no result either).
    let around = around(&nodes[p], stopped_at, 8, 12);
    let late: Vec<&Event> = events(after_resume)
        .filter(|e| match e {
            Event::Data { term, .. }
            | Event::Meta { term, .. }
            | Event::Result { term, .. }
            | Event::Enter { term, .. }
            | Event::Neighbour { term, .. } => *term == old_term,
            _ => false,
        })
        .collect();
    assert!(
        late.is_empty(),
        "the resumed node handled events under its old term {old_term}: {late:#?}\n\
         its lines around the pause (stamp in µs after the node was seen stopped, line): \
         {around:#?}"
    );
    // (c) Nothing the resumed node started under its old term succeeds: `replicate` reports
    // success only while the lease is within its local deadline (it checks again once its
    // update is applied), and `checkpoint` is a write fenced by the term in etcd. The app
    // records `Counter { epoch: Some(e), .. }` only after both returned `Ok`. The one such
    // record the node may still print after SIGCONT is that of the `checkpoint` it was
    // waiting for when it was stopped: etcd committed that write under the old term, before
    // the pause, and only its answer was read after the resume (like a late `Moved` in
    // `processes.rs`). So a late counter must be of the epoch the node had entered before the
    // pause, stored in etcd at a revision below the new term; and nothing of the old term
    // reached etcd once the new term began.
    let new_lines = nodes[b].lines();
    let start = events(&new_lines).find_map(|e| match e {
        Event::Counter {
            task: 1,
            term,
            epoch: None,
            value,
        } if *term == new_term => Some(*value),
        _ => None,
    });
    let late_counters: Vec<(u64, u64)> = events(after_resume)
        .filter_map(|e| match e {
            Event::Counter {
                term,
                epoch: Some(epoch),
                value,
                ..
            } if *term == old_term => Some((*epoch, *value)),
            _ => None,
        })
        .collect();
    let entered_before_pause = nodes[p]
        .lines()
        .into_iter()
        .zip(nodes[p].node.stamps())
        .filter(|(_, at)| at.is_some_and(|at| at <= stopped_at))
        .filter_map(|(l, _)| match l {
            Line::Event(Event::Enter {
                task: 1,
                epoch,
                term,
            }) if term == old_term => Some(epoch),
            _ => None,
        })
        .max();
    let history = checkpoint_history(&etcd, &job.name, 1).await;
    let committed_before_new_term = |epoch: u64, value: u64| {
        history
            .iter()
            .any(|h| h.revision < new_term as i64 && h.epoch == epoch && h.counter == Some(value))
    };
    let unexplained: Vec<&(u64, u64)> = late_counters
        .iter()
        .filter(|(epoch, value)| {
            Some(*epoch) != entered_before_pause || !committed_before_new_term(*epoch, *value)
        })
        .collect();
    assert!(
        late_counters.len() <= 1 && unexplained.is_empty(),
        "after SIGCONT the paused primary's replicate()/checkpoint() succeeded under its old \
         term {old_term} for (epoch, counter) {late_counters:?}; it had entered epoch \
         {entered_before_pause:?} before the pause; the new primary (term {new_term}) started \
         from {start:?}; task 1's checkpoints in etcd: {history:?}\n\
         its lines around the pause (stamp in µs after the node was seen stopped, line): \
         {around:#?}"
    );
    // The fence in etcd: from the new term on, only the new primary wrote the checkpoint, each
    // time a count above the one it started from.
    let after_new_term: Vec<&StoredCounter> = history
        .iter()
        .filter(|h| h.revision > new_term as i64)
        .collect();
    assert!(
        after_new_term
            .iter()
            .all(|h| start.is_some_and(|s| h.counter.is_some_and(|c| c > s))),
        "task 1's checkpoints written after the new term {new_term} began (the new primary \
         started from {start:?}): {after_new_term:?}"
    );
    // (d) It gave its slot up (the task's `exit(SlotLost)`), took a slot again as a backup or
    // stayed a spare, and ended with the job.
    assert!(
        events(after_resume)
            .any(|e| matches!(e, Event::Exit { task: 1, reason } if reason == "SlotLost")),
        "the resumed node ran exit(SlotLost) for task 1{}",
        dump(&[&nodes[p]])
    );
    let mut roles: Vec<(String, Option<u32>, bool)> = statuses(after_resume)
        .map(|s| (s.role.clone(), s.task, s.acting))
        .collect();
    roles.dedup();
    println!("roles (role, task, acting) of the resumed node after SIGCONT: {roles:?}");
    // (e) The new primary took over the task's state and continued the epochs in order.
    assert!(
        start.is_some_and(|v| v >= 3),
        "the new primary starts from the replicated counter, got {start:?}"
    );
    let entered: Vec<u64> = events(&new_lines)
        .filter_map(|e| match e {
            Event::Enter {
                task: 1,
                epoch,
                term,
            } if *term == new_term => Some(*epoch),
            _ => None,
        })
        .collect();
    assert!(
        !entered.is_empty() && entered.windows(2).all(|w| w[1] == w[0] + 1),
        "the new primary's epochs: {entered:?}"
    );
    assert_eq!(
        entered.last(),
        Some(&until),
        "the new primary reached the last epoch"
    );
    // No task got an answer of task 1 from the old term for an epoch the new primary owned.
    let stale_answers: Vec<&(String, Event)> = ev
        .iter()
        .filter(|(_, e)| {
            matches!(e, Event::Data { from: 1, server_term, epoch, .. }
                if *server_term == old_term && *epoch >= entered[0])
        })
        .collect();
    assert!(
        stale_answers.is_empty(),
        "answers of the old term {old_term} in epochs from {}: {stale_answers:#?}",
        entered[0]
    );
    // (f) Task 0 saw the incident of its child 1: failed, then restarted.
    let (failed, restarted, ordered) = incident(&ev, 0, 1);
    assert!(
        failed >= 1 && restarted >= 1 && ordered,
        "task 0: {failed} failures and {restarted} restarts of task 1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_a_primary_with_backup_keeps_the_dataflow_exact() {
    init_logs();
    let etcd = Etcd::start().await.expect("start etcd");
    // 10 s leases: a takeover long before that can only come from the evidence of death (the
    // killed process's port refuses, so the backup ends its lease).
    let (tasks, until) = (7, 30);
    let job = job(&etcd, "dfkill", tasks, 10, until, 50);
    let mut nodes = spawn_all(&job);
    let st = wait_staffed_at(&nodes, tasks, 3).await;
    let victim = st.iter().position(|s| s.primary_of(1).is_some()).unwrap();
    let old_term = st[victim].primary_of(1).unwrap();
    let b = st
        .iter()
        .position(|s| s.role == "backup" && s.task == Some(1))
        .unwrap_or_else(|| panic!("a backup of task 1: {st:#?}"));

    info!(
        "--- kill -9 the primary of task 1 ({}, pid {}, term {old_term}); its lease stays in etcd",
        nodes[victim].name, nodes[victim].pid
    );
    let t0 = Instant::now();
    nodes[victim].signal("KILL");
    // A behaviour bound, half the TTL: the backup must not be waiting for the lease.
    let snap = wait_all(
        &[&nodes[b]],
        "the backup acts as primary of task 1 with a higher term",
        Duration::from_secs(5),
        |all| statuses(&all[0]).any(|s| s.primary_of(1).is_some_and(|t| t > old_term)),
    )
    .await;
    println!(
        "takeover after kill -9 with a 10 s lease, mid-job: {:?}",
        t0.elapsed()
    );
    let new_term = statuses(&snap[0])
        .find_map(|s| s.primary_of(1).filter(|t| *t > old_term))
        .unwrap();

    let status = nodes[victim].wait_exit(WAIT).await;
    assert!(!status.success(), "the killed node exited with {status}");
    assert_eq!(
        exit_line(&nodes[victim].lines()),
        None,
        "kill -9 prints no exit"
    );
    info!("--- the job runs to its end under the new primary (term {new_term})");
    {
        let mut rest: Vec<&mut Proc> = nodes
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| *i != victim)
            .map(|(_, n)| n)
            .collect();
        assert_all_finish(&mut rest, until).await;
    }
    let refs: Vec<&Proc> = nodes.iter().collect();
    let ev = trail(&refs);
    assert_trail(&ev, tasks, until);
    assert_results(&ev, tasks, until);
    // Task 1's neighbours (0 through `children`, 3 and 4 through `parents`) saw the incident:
    // a failure, then a restart.
    for n in [0, 3, 4] {
        let (failed, restarted, ordered) = incident(&ev, n, 1);
        assert!(
            failed >= 1 && restarted >= 1 && ordered,
            "task {n}: {failed} failures and {restarted} restarts of task 1"
        );
    }
    // The promoted backup continued from the replicated counter and reached the last epoch.
    let new_lines = nodes[b].lines();
    let start = events(&new_lines).find_map(|e| match e {
        Event::Counter {
            task: 1,
            term,
            epoch: None,
            value,
        } if *term == new_term => Some(*value),
        _ => None,
    });
    assert!(
        start.is_some_and(|v| v >= 3),
        "the new primary starts from the replicated counter, got {start:?}"
    );
    let entered: Vec<u64> = events(&new_lines)
        .filter_map(|e| match e {
            Event::Enter {
                task: 1,
                epoch,
                term,
            } if *term == new_term => Some(*epoch),
            _ => None,
        })
        .collect();
    assert!(
        !entered.is_empty() && entered.windows(2).all(|w| w[1] == w[0] + 1),
        "the new primary's epochs: {entered:?}"
    );
    assert_eq!(
        entered.last(),
        Some(&until),
        "the new primary reached the last epoch"
    );
}
