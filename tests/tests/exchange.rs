//! Promises 3, 5, 6, 7 and 8 of the design against a real etcd and real sockets: exactly-once
//! pulls and metas, neighbour incidents, fencing, hot standby, checkpoints — checked on the
//! audit trail of the dataflow app (see `taskgraph_tests::dataflow`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use taskgraph::NodeExit;
use taskgraph_tests::apps::Event;
use taskgraph_tests::cluster::{App, Cluster, ClusterConfig};
use taskgraph_tests::dataflow::{check_trail, expected_result};
use taskgraph_tests::etcd::Etcd;
use taskgraph_tests::{init_logs, job_name};

const WAIT: Duration = Duration::from_secs(30);

async fn etcd() -> Etcd {
    init_logs();
    Etcd::start().await.expect("start etcd")
}

fn dataflow(etcd: &Etcd, name: &str, tasks: u32, replicas: u32, until: u64) -> ClusterConfig {
    let mut cfg = ClusterConfig::new(etcd.endpoints(), &job_name(name), tasks, replicas);
    cfg.app = App::Dataflow { until, pace_ms: 0 };
    cfg
}

/// Deadline for a job to run to its end on every node (not the subject of these tests). A
/// dataflow job makes several etcd writes per epoch (the move, each task's checkpoint), so on a
/// heavily loaded 2-core machine a 20-epoch job that takes well under a second alone has taken
/// over 30 s. Generous, but below nextest's termination of a slow test (`.config/nextest.toml`:
/// 30 s × 4), so that a job that hangs fails here, with every node's status.
const JOB_END: Duration = Duration::from_secs(100);

/// Waits until every live node has ended (all within [`JOB_END`]) and returns how they ended.
async fn wait_all(c: &mut Cluster) -> Vec<NodeExit> {
    let deadline = tokio::time::Instant::now() + JOB_END;
    let mut out = Vec::new();
    for i in 0..c.len() {
        match tokio::time::timeout_at(deadline, c.wait(i)).await {
            Ok(Some(r)) => out.push(r.expect("node ok")),
            Ok(None) => {}
            Err(_) => {
                let statuses: Vec<_> = (0..c.len()).map(|j| (j, c.status(j))).collect();
                let events = c.audit.events();
                let last: Vec<_> = events[events.len().saturating_sub(80)..]
                    .iter()
                    .map(|(node, e)| format!("{node}: {e:?}"))
                    .collect();
                panic!(
                    "the job did not end on every node within {JOB_END:?} (node {i} still \
                     runs); every node's last status: {statuses:?}\nthe last {} of {} events:\n{}",
                    last.len(),
                    events.len(),
                    last.join("\n")
                );
            }
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

fn count(events: &[(String, Event)], f: impl Fn(&Event) -> bool) -> usize {
    events.iter().filter(|(_, e)| f(e)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tree_pulls_and_metas_are_exactly_once_over_20_epochs() {
    let etcd = etcd().await;
    let (tasks, until) = (7, 20);
    let cfg = dataflow(&etcd, "tree", tasks, 2, until);
    let mut c = Cluster::start_staffed(cfg, 14).await.unwrap();
    let t0 = tokio::time::Instant::now();
    let exits = wait_all(&mut c).await;
    println!("{} epochs ran in {:?}", until + 1, t0.elapsed());
    assert!(exits
        .iter()
        .all(|e| *e == NodeExit::JobFinished { epoch: until }));
    let ev = c.audit.events();
    assert_trail(&ev, tasks, until);
    // Every epoch (the last one, `until`, included: the root shuts down once it has its
    // result): 6 param answers, 6 grad answers; no failures, so no incidents.
    let epochs = until as usize + 1;
    let data = count(&ev, |e| matches!(e, Event::Data { .. }));
    assert_eq!(data, 12 * epochs, "data events");
    // Metas: every task but the root flags `done` to its parent once per epoch, and a meta is
    // delivered at most once, in its epoch (a later epoch cancels it). Only the root waits for
    // its children's metas before the job moves on (a middle task answers its parent's pull
    // once it has its children's gradients, whether or not their metas arrived), so only
    // those are certain to arrive: exactly one from each child of the root in every epoch.
    // A leaf's meta to a middle task may legitimately be cancelled by the next epoch.
    let mut metas: BTreeMap<(u32, u32, u64), usize> = BTreeMap::new();
    for (_, e) in &ev {
        if let Event::Meta {
            task, epoch, from, ..
        } = e
        {
            *metas.entry((*task, *from, *epoch)).or_default() += 1;
        }
    }
    let repeated: Vec<_> = metas.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        repeated.is_empty(),
        "metas delivered more than once ((to, from, epoch), times): {repeated:?}"
    );
    let beyond: Vec<_> = metas.keys().filter(|(_, _, e)| *e > until).collect();
    assert!(beyond.is_empty(), "metas after the last epoch: {beyond:?}");
    let to_root: Vec<(u32, u64)> = metas
        .keys()
        .filter(|(to, _, _)| *to == 0)
        .map(|(_, from, e)| (*from, *e))
        .collect();
    let want: Vec<(u32, u64)> = [1, 2]
        .into_iter()
        .flat_map(|from| (0..=until).map(move |e| (from, e)))
        .collect();
    assert_eq!(to_root, want, "metas received by the root ((from, epoch))");
    assert_eq!(count(&ev, |e| matches!(e, Event::Neighbour { .. })), 0);
    let results: Vec<u64> = ev
        .iter()
        .filter_map(|(_, e)| match e {
            Event::Result { value, .. } => Some(*value),
            _ => None,
        })
        .collect();
    let want: Vec<u64> = (0..=until).map(|e| expected_result(tasks, e)).collect();
    assert_eq!(results, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashing_a_middle_primary_every_few_epochs_changes_nothing() {
    let etcd = etcd().await;
    let (tasks, until) = (7, 20);
    let mut cfg = dataflow(&etcd, "crash", tasks, 2, until);
    cfg.app = App::Dataflow { until, pace_ms: 20 };
    let mut c = Cluster::start_staffed(cfg, 14).await.unwrap();
    let mut crashes = 0;
    for at in [3, 7, 11, 15] {
        // Wait for the epoch, crash task 1's primary (its lease is not revoked), and start a
        // replacement node so the task gets a backup again.
        let st = c
            .wait_until(&format!("epoch {at}"), WAIT, |s| {
                s.iter().any(|(_, s)| s.epoch.is_some_and(|e| e >= at))
            })
            .await
            .unwrap();
        if st.iter().any(|(_, s)| s.finished) {
            break;
        }
        let (victim, term) = c.primary_of(1).expect("task 1 has a primary");
        c.crash(victim);
        crashes += 1;
        c.wait_until("a new primary for task 1", WAIT, |s| {
            s.iter()
                .any(|(_, s)| s.primary_of(1).is_some_and(|t| t > term))
        })
        .await
        .unwrap();
        c.add_node().await.unwrap();
    }
    let exits = wait_all(&mut c).await;
    assert!(exits
        .iter()
        .all(|e| *e == NodeExit::JobFinished { epoch: until }));
    let ev = c.audit.events();
    assert_trail(&ev, tasks, until);
    assert_eq!(crashes, 4);
    // Task 1's neighbours (0 through `children`, 3 and 4 through `parents`) saw each incident:
    // a failure, then a restart.
    for n in [0, 3, 4] {
        let failed = count(
            &ev,
            |e| matches!(e, Event::Neighbour { task, neighbour: 1, failed: true, .. } if *task == n),
        );
        let restarted = count(
            &ev,
            |e| matches!(e, Event::Neighbour { task, neighbour: 1, failed: false, .. } if *task == n),
        );
        assert!(
            failed >= crashes && restarted >= crashes,
            "task {n}: {failed} failures, {restarted} restarts for {crashes} crashes"
        );
    }
    // The replicated counter went on: task 1's new primaries started from the count.
    let starts: Vec<u64> = ev
        .iter()
        .filter_map(|(_, e)| match e {
            Event::Counter {
                task: 1,
                epoch: None,
                value,
                ..
            } => Some(*value),
            _ => None,
        })
        .collect();
    assert_eq!(starts.len(), crashes + 1, "{starts:?}");
    assert!(starts[1..].iter().all(|v| *v > 0), "{starts:?}");
}

/// The audit trail with answers of 8 MiB (each checked byte for byte by its receiver) while the
/// middle primary crashes twice: large payloads shared between the serving side's kept answers
/// and the wire stay exact across retries and failovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_answers_stay_exact_and_exactly_once_across_crashes() {
    let etcd = etcd().await;
    let (tasks, until) = (7, 8);
    let mut cfg = dataflow(&etcd, "large", tasks, 2, until);
    cfg.app = App::Dataflow { until, pace_ms: 20 };
    cfg.answer_bytes = 8 << 20;
    let mut c = Cluster::start_staffed(cfg, 14).await.unwrap();
    let mut crashes = 0;
    for at in [2, 5] {
        tracing::info!("--- crash the primary of task 1 at epoch {at}");
        let st = c
            .wait_until(&format!("epoch {at}"), WAIT, |s| {
                s.iter().any(|(_, s)| s.epoch.is_some_and(|e| e >= at))
            })
            .await
            .unwrap();
        if st.iter().any(|(_, s)| s.finished) {
            break;
        }
        let (victim, term) = c.primary_of(1).expect("task 1 has a primary");
        c.crash(victim);
        crashes += 1;
        c.wait_until("a new primary for task 1", WAIT, |s| {
            s.iter()
                .any(|(_, s)| s.primary_of(1).is_some_and(|t| t > term))
        })
        .await
        .unwrap();
        c.add_node().await.unwrap();
    }
    let exits = wait_all(&mut c).await;
    assert!(exits
        .iter()
        .all(|e| *e == NodeExit::JobFinished { epoch: until }));
    let ev = c.audit.events();
    // Among others: every delivered answer has its value (an answer that was cut, mixed up or
    // stale would have none), exactly once, in its epoch.
    assert_trail(&ev, tasks, until);
    assert_eq!(crashes, 2);
    let data = count(&ev, |e| matches!(e, Event::Data { value: Some(_), .. }));
    assert!(
        data >= 12 * (until as usize + 1),
        "{data} answers delivered intact"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spare_restores_the_checkpoint_when_every_node_of_a_task_died() {
    let etcd = etcd().await;
    let (tasks, until) = (3, 12);
    let mut cfg = dataflow(&etcd, "ckpt", tasks, 2, until);
    cfg.app = App::Dataflow { until, pace_ms: 30 };
    let mut c = Cluster::start_staffed(cfg, 6).await.unwrap();
    c.wait_until("epoch 4", WAIT, |s| {
        s.iter().any(|(_, s)| s.epoch.is_some_and(|e| e >= 4))
    })
    .await
    .unwrap();
    // Kill both nodes of task 2 at once, then add a spare.
    let nodes: Vec<usize> = c
        .live_statuses()
        .into_iter()
        .filter(|(_, s)| match s.role {
            taskgraph::Role::Primary { task, .. } | taskgraph::Role::Backup { task } => task == 2,
            taskgraph::Role::Spare => false,
        })
        .map(|(i, _)| i)
        .collect();
    assert_eq!(nodes.len(), 2);
    for i in nodes {
        c.crash(i);
    }
    c.add_node().await.unwrap();
    let exits = wait_all(&mut c).await;
    assert!(exits
        .iter()
        .all(|e| *e == NodeExit::JobFinished { epoch: until }));
    let ev = c.audit.events();
    assert_trail(&ev, tasks, until);
    let restored: Vec<(u64, u64)> = ev
        .iter()
        .filter_map(|(_, e)| match e {
            Event::Restored {
                task: 2,
                epoch,
                counter,
            } => Some((*epoch, *counter)),
            _ => None,
        })
        .collect();
    assert_eq!(restored.len(), 1, "{restored:?}");
    assert!(restored[0].0 >= 3 && restored[0].1 >= 4, "{restored:?}");
}

/// Issue 22, item 4: when a task's primary and backup die together on live hosts (their ports
/// refuse, or their servers say their loops are gone), the whole replica set's leases are ended
/// on that evidence — the primary's by its neighbour's pull, the backup's by the spare that
/// would otherwise wait for it — and the spare restores the task from its checkpoint without
/// waiting for a lease to expire. Without it the spare waits for the dead backup's lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_set_crashed_together_is_restored_before_its_leases_could_expire() {
    let etcd = etcd().await;
    let (tasks, until) = (3, 12);
    let ttl = 30;
    let mut cfg = dataflow(&etcd, "wholeset", tasks, 2, until);
    cfg.app = App::Dataflow { until, pace_ms: 30 };
    cfg.ttl = Duration::from_secs(ttl);
    // Six slots and one spare.
    let mut c = Cluster::start_staffed(cfg, 7).await.unwrap();
    c.wait_until("epoch 4", WAIT, |s| {
        s.iter().any(|(_, s)| s.epoch.is_some_and(|e| e >= 4))
    })
    .await
    .unwrap();
    let spare = c
        .live_statuses()
        .into_iter()
        .find(|(_, s)| s.role == taskgraph::Role::Spare)
        .expect("a spare")
        .0;
    let nodes: Vec<usize> = c
        .live_statuses()
        .into_iter()
        .filter(|(_, s)| match s.role {
            taskgraph::Role::Primary { task, .. } | taskgraph::Role::Backup { task } => task == 2,
            taskgraph::Role::Spare => false,
        })
        .map(|(i, _)| i)
        .collect();
    assert_eq!(nodes.len(), 2);
    // A witness lease granted just before the crash, with half the nodes' TTL. The dead nodes
    // renewed their leases at most TTL/3 before the crash, so theirs end no earlier than
    // 2/3 TTL after it: while the witness lives, neither dead lease could have expired.
    let mut client = etcd.client().await.unwrap();
    let witness = client.lease_grant(ttl as i64 / 2, None).await.unwrap().id();
    tracing::info!("--- crash the primary and the backup of task 2 together");
    for i in nodes {
        c.crash(i);
    }
    c.wait_until(
        "the spare is primary of task 2",
        Duration::from_secs(3 * ttl),
        |s| {
            s.iter()
                .any(|(i, s)| *i == spare && s.primary_of(2).is_some())
        },
    )
    .await
    .unwrap();
    let left = client
        .lease_time_to_live(witness, None)
        .await
        .unwrap()
        .ttl();
    assert!(
        left > 0,
        "task 2 was taken over only after the witness lease expired: the dead nodes' leases \
         were waited out instead of ended"
    );
    let exits = wait_all(&mut c).await;
    assert!(exits
        .iter()
        .all(|e| *e == NodeExit::JobFinished { epoch: until }));
    let ev = c.audit.events();
    assert_trail(&ev, tasks, until);
    let restored: Vec<&String> = ev
        .iter()
        .filter(|(_, e)| matches!(e, Event::Restored { task: 2, .. }))
        .map(|(n, _)| n)
        .collect();
    assert_eq!(
        restored,
        vec![&format!("n{spare}")],
        "restored once, by the spare"
    );
}

/// What [`WorkProbe`] saw: (epoch the task was in, what was delivered).
type WorkLog = tokio::sync::mpsc::UnboundedSender<(u64, String)>;

/// Exercises `Context::spawn_then` and `Context::after`. Epoch 0: a work returning 42 and a
/// timer 7; once both are back, an "old" work that finishes only once the task is in epoch 1,
/// and an old timer 8, then the epoch moves. Epoch 1: releases the old work, starts a "new"
/// work (finishing well after the old one would) and a timer 9; once both are back, the job
/// ends.
struct WorkProbe {
    log: WorkLog,
    pending: usize,
    release: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
}

impl WorkProbe {
    async fn progress(&mut self, ctx: &taskgraph::Context) {
        self.pending -= 1;
        if self.pending > 0 {
            return;
        }
        match ctx.epoch() {
            0 => {
                let mut released = self.release.subscribe();
                ctx.spawn_then(async move {
                    let _ = released.wait_for(|r| *r).await;
                    "old"
                })
                .unwrap();
                ctx.after(Duration::from_millis(500), 8).unwrap();
                assert!(ctx.inc_epoch(0).await.unwrap());
            }
            _ => {
                ctx.shutdown_job().await.unwrap();
            }
        }
    }
}

#[taskgraph::async_trait]
impl taskgraph::Task for WorkProbe {
    async fn enter_epoch(&mut self, ctx: &taskgraph::Context, epoch: u64) {
        self.pending = 2;
        if epoch == 0 {
            // Item 5: the first epoch is 0, and an undeclared link is an error when checked
            // (and no neighbours, with a warning, when not).
            assert_eq!(ctx.epoch(), 0);
            assert!(matches!(
                ctx.try_neighbours("typo"),
                Err(taskgraph::ContextError::UnknownLink { link }) if link == "typo"
            ));
            assert!(ctx.neighbours("typo").is_empty());
            let id = ctx.spawn_then(async { 42u32 }).unwrap();
            assert_eq!(id.epoch, 0);
            ctx.after(Duration::from_millis(1), 7).unwrap();
            return;
        }
        self.release.send_replace(true);
        let mut released = self.release.subscribe();
        ctx.spawn_then(async move {
            let _ = released.wait_for(|r| *r).await;
            // Well after the old work would have reported, had it survived the epoch.
            tokio::time::sleep(Duration::from_millis(300)).await;
            "new"
        })
        .unwrap();
        ctx.after(Duration::from_millis(1500), 9).unwrap();
    }
    async fn work_done(&mut self, ctx: &taskgraph::Context, done: taskgraph::WorkDone) {
        let started = done.id().epoch;
        let what = match done.take::<u32>() {
            Ok(n) => format!("work {n} of epoch {started}"),
            Err(done) => match done.take::<&'static str>() {
                Ok(s) => format!("work {s} of epoch {started}"),
                Err(done) => format!("work of another type: {done:?}"),
            },
        };
        let old = what.contains("old");
        let _ = self.log.send((ctx.epoch(), what));
        if !old {
            self.progress(ctx).await;
        }
    }
    async fn timer(&mut self, ctx: &taskgraph::Context, token: u64) {
        let _ = self.log.send((ctx.epoch(), format!("timer {token}")));
        if token != 8 {
            self.progress(ctx).await;
        }
    }
}

/// Issue 22, item 1: work spawned with `spawn_then` and timers set with `after` come back to
/// the task once each, in the epoch they were started in, and never into a later epoch. (Also
/// item 5: the task builder is a closure returning a concrete task type, no `Box<dyn Task>`
/// cast; the first epoch is 0; `try_neighbours` refuses an undeclared link.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawned_work_and_timers_come_back_once_in_their_epoch_and_never_later() {
    let etcd = etcd().await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let release = std::sync::Arc::new(tokio::sync::watch::channel(false).0);
    let node = taskgraph::Framework::builder()
        .etcd(etcd.endpoints())
        .job(job_name("work"))
        .tasks(1)
        .replicas(1)
        .lease_ttl(Duration::from_secs(2))
        .task_builder(move |_| WorkProbe {
            log: tx.clone(),
            pending: 0,
            release: release.clone(),
        })
        .build()
        .unwrap()
        .spawn()
        .await
        .unwrap();
    let exit = tokio::time::timeout(JOB_END, node.wait())
        .await
        .expect("the job ends")
        .unwrap();
    assert_eq!(exit, NodeExit::JobFinished { epoch: 1 });
    let mut log = Vec::new();
    while let Ok(entry) = rx.try_recv() {
        log.push(entry);
    }
    let mut seen: Vec<(u64, String)> = log.clone();
    seen.sort();
    // The old timer may have fired while the epoch was still moving (it is then of its own
    // epoch, 0); the old work cannot: it finishes only once the task is in epoch 1.
    seen.retain(|(e, w)| !(*e == 0 && w == "timer 8"));
    assert_eq!(
        seen,
        vec![
            (0, "timer 7".to_owned()),
            (0, "work 42 of epoch 0".to_owned()),
            (1, "timer 9".to_owned()),
            (1, "work new of epoch 1".to_owned()),
        ],
        "every delivery in order: {log:?}"
    );
}

/// A task that tries an oversized checkpoint, then a small one, then ends the job.
struct CheckpointProbe {
    results: tokio::sync::mpsc::UnboundedSender<Result<(), String>>,
}

#[taskgraph::async_trait]
impl taskgraph::Task for CheckpointProbe {
    async fn enter_epoch(&mut self, ctx: &taskgraph::Context, _epoch: u64) {
        let too_big = ctx.checkpoint(vec![7u8; 4097]).await;
        let _ = self.results.send(too_big.map_err(|e| e.to_string()));
        let small = ctx.checkpoint(vec![7u8; 4096]).await;
        let _ = self.results.send(small.map_err(|e| e.to_string()));
        let _ = ctx.shutdown_job().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_checkpoint_is_refused_with_a_clear_error() {
    let etcd = etcd().await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let node = taskgraph::Framework::builder()
        .etcd(etcd.endpoints())
        .job(job_name("ckpt-size"))
        .tasks(1)
        .replicas(1)
        .max_checkpoint_bytes(4096)
        .lease_ttl(Duration::from_secs(1))
        .task_builder(move |_| {
            Box::new(CheckpointProbe {
                results: tx.clone(),
            }) as Box<dyn taskgraph::Task>
        })
        .build()
        .unwrap()
        .spawn()
        .await
        .unwrap();
    let too_big = rx.recv().await.unwrap();
    let small = rx.recv().await.unwrap();
    assert_eq!(
        too_big,
        Err("checkpoint is 4097 bytes, more than the limit of 4096".to_owned())
    );
    assert_eq!(small, Ok(()));
    let exit = tokio::time::timeout(WAIT, node.wait()).await.unwrap();
    assert!(matches!(exit, Ok(NodeExit::JobFinished { .. })), "{exit:?}");
}

/// Waits until the audit trail has an event matching `f` (polling the trail).
async fn wait_event(c: &Cluster, why: &str, f: impl Fn(&str, &Event) -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if c.audit.events().iter().any(|(n, e)| f(n, e)) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {why}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metas_reach_a_new_receiver_once_and_a_restarted_sender_is_not_repeated() {
    let etcd = etcd().await;
    let (tasks, until) = (3, 2);
    let cfg = dataflow(&etcd, "metas", tasks, 2, until);
    // The gate stays closed: the root does not move epoch 0 on until the test says so.
    let mut c = Cluster::new(cfg);
    c.audit.close_gate();
    for _ in 0..6 {
        c.add_node().await.unwrap();
    }
    c.wait_until("staffed", WAIT, |s| {
        taskgraph_tests::cluster::fully_staffed(tasks, 1, s)
    })
    .await
    .unwrap();
    let meta_from = |from_task: u32, term: u64| {
        move |_: &str, e: &Event| {
            matches!(e, Event::Meta { task: 0, from, term: t, meta, .. }
                if *from == from_task && *t == term && meta == "done")
        }
    };
    let (_, root_term) = c.primary_of(0).unwrap();
    wait_event(&c, "done from 1 at the root", meta_from(1, root_term)).await;
    // The sender restarts: task 1's new primary re-enters epoch 0 and flags `done` again.
    let (victim, t1) = c.primary_of(1).unwrap();
    c.crash(victim);
    c.wait_until("task 1 fails over", WAIT, |s| {
        s.iter()
            .any(|(_, s)| s.primary_of(1).is_some_and(|t| t > t1))
    })
    .await
    .unwrap();
    let (_, t1_new) = c.primary_of(1).unwrap();
    wait_event(
        &c,
        "task 1's new primary got its parameter",
        |_, e| matches!(e, Event::Data { task: 1, term, .. } if *term == t1_new),
    )
    .await;
    // The receiver restarts: the root's new primary must get `done` from both children once.
    let (root, _) = c.primary_of(0).unwrap();
    c.crash(root);
    c.wait_until("the root fails over", WAIT, |s| {
        s.iter()
            .any(|(_, s)| s.primary_of(0).is_some_and(|t| t > root_term))
    })
    .await
    .unwrap();
    let (_, root_new) = c.primary_of(0).unwrap();
    wait_event(&c, "done from 1 at the new root", meta_from(1, root_new)).await;
    wait_event(&c, "done from 2 at the new root", meta_from(2, root_new)).await;
    c.add_node().await.unwrap();
    c.add_node().await.unwrap();
    c.audit.open_gate();
    let exits = wait_all(&mut c).await;
    assert!(exits
        .iter()
        .all(|e| *e == NodeExit::JobFinished { epoch: until }));
    let ev = c.audit.events();
    assert_trail(&ev, tasks, until);
    // Exactly one `done` from task 1 per root primary in epoch 0, whatever was re-flagged.
    for term in [root_term, root_new] {
        let n = count(
            &ev,
            |e| matches!(e, Event::Meta { task: 0, from: 1, epoch: 0, term: t, .. } if *t == term),
        );
        assert_eq!(n, 1, "root term {term}: {n} deliveries of task 1's meta");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbage_checkpoint_is_ignored_and_a_valid_one_restored() {
    let etcd = etcd().await;
    let (tasks, until) = (3, 4);
    let cfg = dataflow(&etcd, "ckpt-garbage", tasks, 1, until);
    let keys = taskgraph::testing::etcd::keys::JobKeys::new(&cfg.job);
    let valid = taskgraph::testing::etcd::keys::StoredCheckpoint {
        epoch: 9,
        data: taskgraph::encode(&41u64).unwrap().to_vec(),
    }
    .encode();
    let mut client = etcd.client().await.unwrap();
    client.put(keys.checkpoint(1), valid, None).await.unwrap();
    client
        .put(keys.checkpoint(2), "garbage", None)
        .await
        .unwrap();
    let mut c = Cluster::start_staffed(cfg, 3).await.unwrap();
    let exits = wait_all(&mut c).await;
    assert!(exits
        .iter()
        .all(|e| *e == NodeExit::JobFinished { epoch: until }));
    let ev = c.audit.events();
    assert_trail(&ev, tasks, until);
    let restored: Vec<(u32, u64, u64)> = ev
        .iter()
        .filter_map(|(_, e)| match e {
            Event::Restored {
                task,
                epoch,
                counter,
            } => Some((*task, *epoch, *counter)),
            _ => None,
        })
        .collect();
    assert_eq!(restored, vec![(1, 9, 41)]);
}

/// What [`HandlerProbe`] reports to the test.
#[derive(Debug)]
enum Probe {
    /// Task 1 was asked for data (its answer waits for `release`).
    Asked,
    /// Task 0's `data_ready` runs (and waits for `go`).
    Ready,
    /// What the `inc_epoch` awaited in `data_ready` returned.
    Moved(Result<bool, String>),
}

/// Task 0 pulls from task 1 in epoch 0; task 1 answers once released. Task 0's `data_ready`
/// reports, waits for `go`, then awaits `inc_epoch` itself (a handler's verb: one request) or,
/// with `panic`, panics.
struct HandlerProbe {
    task: u32,
    panic: bool,
    log: tokio::sync::mpsc::UnboundedSender<Probe>,
    release: tokio::sync::watch::Receiver<bool>,
    go: tokio::sync::watch::Receiver<bool>,
}

#[taskgraph::async_trait]
impl taskgraph::Task for HandlerProbe {
    async fn enter_epoch(&mut self, ctx: &taskgraph::Context, epoch: u64) {
        if self.task == 0 && epoch == 0 {
            ctx.data_request(1, "x", vec![1u8]).unwrap();
        }
    }
    async fn serve_data(&mut self, _ctx: &taskgraph::Context, request: taskgraph::DataRequest) {
        let _ = self.log.send(Probe::Asked);
        let mut release = self.release.clone();
        tokio::spawn(async move {
            let _ = release.wait_for(|r| *r).await;
            request.reply(vec![2u8]);
        });
    }
    async fn data_ready(&mut self, ctx: &taskgraph::Context, _reply: taskgraph::DataReply) {
        let _ = self.log.send(Probe::Ready);
        let _ = self.go.wait_for(|g| *g).await;
        if self.panic {
            panic!("the application's data_ready panics (on purpose)");
        }
        let moved = ctx.inc_epoch(0).await.map_err(|e| e.to_string());
        let _ = self.log.send(Probe::Moved(moved));
    }
}

/// A job of two [`HandlerProbe`] nodes (lease TTL 20 s: it stays valid, and the node acts,
/// for the rest of a test even with etcd down), driven until task 0's `data_ready` runs, with
/// the answer handed to it on its fetcher's own task: the job is quiet then (no watch event,
/// request or message waits for the loop), and the test checks that the direct path was taken.
/// Returns the nodes, the probe's log and the `go` switch.
struct Handled {
    nodes: Vec<taskgraph::NodeHandle>,
    log: tokio::sync::mpsc::UnboundedReceiver<Probe>,
    go: tokio::sync::watch::Sender<bool>,
}

async fn until_data_ready_runs_directly(etcd: &Etcd, name: &str, panic: bool) -> Handled {
    let (log_tx, mut log) = tokio::sync::mpsc::unbounded_channel();
    let (release_tx, release) = tokio::sync::watch::channel(false);
    let (go_tx, go) = tokio::sync::watch::channel(false);
    let job = job_name(name);
    let mut nodes = Vec::new();
    for _ in 0..2 {
        let (log_tx, release, go) = (log_tx.clone(), release.clone(), go.clone());
        let node = taskgraph::Framework::builder()
            .etcd(etcd.endpoints())
            .job(job.clone())
            .tasks(2)
            .replicas(1)
            .lease_ttl(Duration::from_secs(20))
            .metrics_addr("127.0.0.1:0".parse().unwrap())
            .task_builder(move |task| HandlerProbe {
                task,
                panic,
                log: log_tx.clone(),
                release: release.clone(),
                go: go.clone(),
            })
            .build()
            .unwrap()
            .spawn()
            .await
            .unwrap();
        nodes.push(node);
    }
    let got = tokio::time::timeout(WAIT, log.recv()).await;
    assert!(
        matches!(got, Ok(Some(Probe::Asked))),
        "task 1 asked: {got:?}"
    );
    release_tx.send_replace(true);
    let got = tokio::time::timeout(WAIT, log.recv()).await;
    assert!(
        matches!(got, Ok(Some(Probe::Ready))),
        "data_ready ran: {got:?}"
    );
    let mut direct = 0.0;
    for node in &nodes {
        let addr = node.metrics_addr().unwrap();
        let page = taskgraph_tests::http_get(&format!("http://{addr}/metrics")).await;
        let body = page
            .split_once("\r\n\r\n")
            .map_or(page.as_str(), |(_, b)| b);
        let scrape = taskgraph_tests::prometheus::Scrape::parse(body).unwrap();
        direct += scrape.sum("taskgraph_pull_answers_total", &[("kind", "direct")]);
    }
    assert_eq!(
        direct, 1.0,
        "the answer went to data_ready on its fetcher's task"
    );
    Handled {
        nodes,
        log,
        go: go_tx,
    }
}

/// A verb awaited in `data_ready` is a handler's (one etcd request; an error is returned, not
/// retried), also when the answer was handed to `data_ready` on the fetcher's own task while
/// the event loop was idle: etcd is killed while the handler runs, and its `inc_epoch` must come
/// back with the error while etcd is still down. (Were it treated as spawned work, it would
/// retry while holding the node's runtime, and the node would wait for etcd.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verb_awaited_in_data_ready_is_a_handlers_wherever_the_answer_was_handed_over() {
    let etcd = etcd().await;
    let mut h = until_data_ready_runs_directly(&etcd, "handlerverb", false).await;
    etcd.kill().await.unwrap();
    h.go.send_replace(true);
    let got = tokio::time::timeout(WAIT, h.log.recv()).await;
    match got {
        Ok(Some(Probe::Moved(Err(e)))) => assert!(e.contains("etcd"), "an etcd error: {e}"),
        other => panic!("the handler's inc_epoch returned while etcd was down: {other:?}"),
    }
    for node in h.nodes {
        node.crash();
    }
}

/// A handler that panics ends its node as a crash would, wherever it ran: also `data_ready`
/// handed an answer on its fetcher's own task (the panic is re-raised by the node's loop), not
/// only on the loop. The other node carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_data_ready_ends_its_node_wherever_it_ran() {
    let etcd = etcd().await;
    let mut h = until_data_ready_runs_directly(&etcd, "handlerpanic", true).await;
    let victim = h
        .nodes
        .iter()
        .position(|n| {
            matches!(
                n.status().borrow().role,
                taskgraph::Role::Primary { task: 0, .. }
            )
        })
        .expect("task 0 has a primary");
    let node = h.nodes.remove(victim);
    h.go.send_replace(true);
    let exit = tokio::time::timeout(WAIT, node.wait()).await;
    assert!(
        matches!(exit, Ok(Ok(NodeExit::Killed))),
        "task 0's node ended as a crash: {exit:?}"
    );
    assert!(!h.nodes[0].is_finished(), "the other node carries on");
    for node in h.nodes {
        node.crash();
    }
}
