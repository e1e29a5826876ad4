//! Promises 1, 2, 4, 8 (epoch part), 9 and 10 (configuration and etcd) of the design, against
//! a real etcd: elections, failover, spares, epochs, recovery, shutdown, bad input.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use taskgraph::{ConfigError, Error, Framework, Links, NodeExit, Role, Task, TaskId, Topology};
use taskgraph_tests::apps::{Behaviour, Event};
use taskgraph_tests::cluster::{fully_staffed, Cluster, ClusterConfig};
use taskgraph_tests::etcd::Etcd;
use taskgraph_tests::keywait;
use taskgraph_tests::{init_logs, job_name};
use tracing::info;

const WAIT: Duration = Duration::from_secs(20);

async fn etcd() -> Etcd {
    init_logs();
    Etcd::start().await.expect("start etcd")
}

/// For each task, the epochs its primaries entered, in order.
fn entered(events: &[(String, Event)]) -> BTreeMap<TaskId, Vec<u64>> {
    let mut out: BTreeMap<TaskId, Vec<u64>> = BTreeMap::new();
    for (_, e) in events {
        if let Event::Enter { task, epoch, .. } = e {
            out.entry(*task).or_default().push(*epoch);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_primary_and_one_backup_per_task() {
    let etcd = etcd().await;
    let cfg = ClusterConfig::new(etcd.endpoints(), &job_name("staff"), 3, 2);
    let mut c = Cluster::start(cfg, 6).await.unwrap();
    let st = c
        .wait_until("3 tasks have 1 primary + 1 backup", WAIT, |s| {
            fully_staffed(3, 1, s)
        })
        .await
        .unwrap();
    // Every node holds exactly one slot; every primary has a term (an etcd revision: primaries
    // drafted in one transaction share it, a term orders one task's primaries only).
    assert!(st.iter().all(|(_, s)| s.role != Role::Spare), "{st:?}");
    assert!((0..3).all(|t| c.primary_of(t).is_some_and(|(_, term)| term > 0)));
    // The audit agrees: each task got exactly one became_primary and one became_backup.
    let ev = c.audit.events();
    for t in 0..3 {
        assert_eq!(
            ev.iter()
                .filter(|(_, e)| *e == Event::Backup { task: t })
                .count(),
            1
        );
        assert_eq!(
            ev.iter()
                .filter(|(_, e)| matches!(e, Event::Primary { task, .. } if *task == t))
                .count(),
            1
        );
    }
    c.stop_all().await;
}

/// 128 nodes join a job of 64 tasks × 2 together: the staffer drafts them in rounds of
/// several transactions sent at once (at most 31 primary drafts fit one transaction, so 64
/// primaries take three), which etcd may apply in any order. Every slot is still filled
/// exactly once: one primary and one backup per task, each entered once, and no backup made
/// before its task's primary (it would promote itself, and the task's primary would be seen
/// twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spares_drafted_by_transactions_sent_together_fill_each_slot_once() {
    let etcd = etcd().await;
    let tasks = 64;
    let mut cfg = ClusterConfig::new(etcd.endpoints(), &job_name("drafts"), tasks, 2);
    // 128 nodes on 2 cores: a lease long enough that a busy machine does not end one.
    cfg.ttl = Duration::from_secs(5);
    let mut c = Cluster::start(cfg, 2 * tasks as usize).await.unwrap();
    let st = c
        .wait_until("64 tasks have 1 primary + 1 backup", WAIT, |s| {
            fully_staffed(tasks, 1, s)
        })
        .await
        .unwrap();
    assert!(st.iter().all(|(_, s)| s.role != Role::Spare), "{st:?}");
    let ev = c.audit.events();
    for t in 0..tasks {
        let backups = ev
            .iter()
            .filter(|(_, e)| *e == Event::Backup { task: t })
            .count();
        let primaries = ev
            .iter()
            .filter(|(_, e)| matches!(e, Event::Primary { task, .. } if *task == t))
            .count();
        assert_eq!((primaries, backups), (1, 1), "task {t}: {ev:?}");
    }
    c.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_primary_is_replaced_by_its_backup_with_a_higher_term() {
    let etcd = etcd().await;
    let cfg = ClusterConfig::new(etcd.endpoints(), &job_name("crash"), 3, 2);
    let mut c = Cluster::start(cfg, 6).await.unwrap();
    c.wait_until("fully staffed", WAIT, |s| fully_staffed(3, 1, s))
        .await
        .unwrap();
    for round in 0..2 {
        let (victim, old_term) = c.primary_of(1).unwrap();
        let backup = c
            .live_statuses()
            .into_iter()
            .find(|(_, s)| s.role == Role::Backup { task: 1 })
            .unwrap()
            .0;
        info!("--- round {round}: crash the primary of task 1 (node {victim}), lease not revoked");
        let t0 = Instant::now();
        c.crash(victim);
        let st = c
            .wait_until("the backup is primary of task 1", WAIT, |s| {
                s.iter()
                    .any(|(i, s)| *i == backup && s.primary_of(1).is_some_and(|t| t > old_term))
            })
            .await
            .unwrap();
        println!("failover after crash (TTL 1 s): {:?}", t0.elapsed());
        // At most one acting primary per task at any observed moment.
        for t in 0..3 {
            assert!(st.iter().filter(|(_, s)| s.primary_of(t).is_some()).count() <= 1);
        }
        // Refill the backup slot with a fresh node for the next round.
        c.add_node().await.unwrap();
        c.wait_until("fully staffed again", WAIT, |s| fully_staffed(3, 1, s))
            .await
            .unwrap();
    }
    c.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_stop_hands_over_without_waiting_for_the_ttl() {
    let etcd = etcd().await;
    // A 60 s lease: a handover that waited for the lease would miss the 20 s deadline below.
    let mut cfg = ClusterConfig::new(etcd.endpoints(), &job_name("stop"), 2, 2);
    cfg.ttl = Duration::from_secs(60);
    let mut c = Cluster::start(cfg, 4).await.unwrap();
    c.wait_until("fully staffed", WAIT, |s| fully_staffed(2, 1, s))
        .await
        .unwrap();
    let (victim, old_term) = c.primary_of(0).unwrap();
    info!("--- stop the primary of task 0 cleanly");
    let t0 = Instant::now();
    assert_eq!(c.stop(victim).await.unwrap().unwrap(), NodeExit::Stopped);
    c.wait_until("a new primary of task 0", WAIT, |s| {
        s.iter()
            .any(|(_, s)| s.primary_of(0).is_some_and(|t| t > old_term))
    })
    .await
    .unwrap();
    println!("failover after clean stop (TTL 60 s): {:?}", t0.elapsed());
    let exits: Vec<_> = c
        .audit
        .events()
        .into_iter()
        .filter(|(n, e)| *n == format!("n{victim}") && matches!(e, Event::Exit { .. }))
        .collect();
    assert_eq!(
        exits.len(),
        1,
        "the stopped node's task ran exit once: {exits:?}"
    );
    c.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spare_takes_an_orphaned_task_and_a_late_node_takes_a_free_one() {
    let etcd = etcd().await;
    let cfg = ClusterConfig::new(etcd.endpoints(), &job_name("spare"), 2, 1);
    let mut c = Cluster::start(cfg, 3).await.unwrap();
    c.wait_until("2 primaries and a spare", WAIT, |s| {
        fully_staffed(2, 0, s) && s.iter().filter(|(_, s)| s.role == Role::Spare).count() == 1
    })
    .await
    .unwrap();
    let spare = c
        .live_statuses()
        .into_iter()
        .find(|(_, s)| s.role == Role::Spare)
        .unwrap()
        .0;
    let (victim, _) = c.primary_of(0).unwrap();
    info!("--- crash the primary of task 0: no backup, the spare takes it");
    c.crash(victim);
    c.wait_until("the spare is primary of task 0", WAIT, |s| {
        s.iter()
            .any(|(i, s)| *i == spare && s.primary_of(0).is_some())
    })
    .await
    .unwrap();
    // The spare's task value was built afresh and told it is primary.
    assert!(c
        .audit
        .events()
        .iter()
        .any(|(n, e)| *n == format!("n{spare}") && matches!(e, Event::Primary { task: 0, .. })));
    info!("--- crash the primary of task 1: no backup, no spare; the task stays free");
    let (victim, _) = c.primary_of(1).unwrap();
    c.crash(victim);
    let late = c.add_node().await.unwrap();
    c.wait_until("the late node is primary of task 1", WAIT, |s| {
        s.iter()
            .any(|(i, s)| *i == late && s.primary_of(1).is_some())
    })
    .await
    .unwrap();
    c.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_inc_epoch_moves_by_exactly_one_and_primaries_see_every_epoch_in_order() {
    let etcd = etcd().await;
    let mut cfg = ClusterConfig::new(etcd.endpoints(), &job_name("epochs"), 3, 1);
    // Every primary calls inc_epoch(e) on entering e: three callers race for every epoch.
    cfg.behaviour = Behaviour {
        drive_until: Some(30),
        all_drive: true,
        pace_ms: 0,
    };
    let mut c = Cluster::start_staffed(cfg, 3).await.unwrap();
    for i in 0..3 {
        assert_eq!(
            c.wait(i).await.unwrap().unwrap(),
            NodeExit::JobFinished { epoch: 30 }
        );
    }
    let ev = c.audit.events();
    let mut moved: BTreeMap<u64, usize> = BTreeMap::new();
    for (_, e) in &ev {
        if let Event::Moved { from, .. } = e {
            *moved.entry(*from).or_default() += 1;
        }
    }
    assert_eq!(
        moved,
        (0..30).map(|e| (e, 1)).collect(),
        "exactly one successful inc_epoch per epoch"
    );
    // Every task's primary entered a contiguous run of epochs from 0, in order, without
    // repeats (a node that only learns of epochs together with the job's end does not enter
    // them: the job is over); the task whose driver shut the job down entered all of them.
    let entered = entered(&ev);
    for (task, epochs) in &entered {
        let k = epochs.len() as u64;
        assert_eq!(epochs, &(0..k).collect::<Vec<_>>(), "task {task}");
    }
    assert!(entered.values().any(|e| e.len() == 31), "{entered:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_job_stops_every_node_revokes_leases_and_keeps_the_final_status() {
    let etcd = etcd().await;
    let job = job_name("shutdown");
    let mut cfg = ClusterConfig::new(etcd.endpoints(), &job, 3, 2);
    cfg.behaviour = Behaviour {
        drive_until: Some(3),
        ..Behaviour::default()
    };
    let mut c = Cluster::start_staffed(cfg, 7).await.unwrap();
    for i in 0..7 {
        assert_eq!(
            c.wait(i).await.unwrap().unwrap(),
            NodeExit::JobFinished { epoch: 3 },
            "node {i}"
        );
    }
    // Every task value that held a slot ran exit with JobFinished.
    let exits = c
        .audit
        .events()
        .into_iter()
        .filter(|(_, e)| matches!(e, Event::Exit { reason, .. } if reason.contains("JobFinished")))
        .count();
    assert_eq!(
        exits,
        6,
        "3 primaries and 3 backups exit: {:#?}",
        c.audit.events()
    );
    let mut client = etcd.client().await.unwrap();
    assert!(
        client.leases().await.unwrap().leases().is_empty(),
        "every lease revoked"
    );
    let prefix = format!("/taskgraph/jobs/{job}/");
    let kvs = client
        .get(
            prefix.clone(),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    let keys: Vec<String> = kvs
        .kvs()
        .iter()
        .map(|kv| kv.key_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        keys,
        vec![format!("{prefix}epoch"), format!("{prefix}spec")]
    );
    let epoch = client.get(format!("{prefix}epoch"), None).await.unwrap();
    assert_eq!(epoch.kvs()[0].value_str().unwrap(), "done 3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_nodes_killed_then_new_nodes_resume_at_the_stored_epoch() {
    let etcd = etcd().await;
    let job = job_name("recover");
    let mut cfg = ClusterConfig::new(etcd.endpoints(), &job, 2, 1);
    cfg.behaviour = Behaviour {
        drive_until: Some(1000),
        all_drive: false,
        pace_ms: 20,
    };
    let mut c = Cluster::start_staffed(cfg.clone(), 2).await.unwrap();
    c.wait_until("epoch 5 reached", WAIT, |s| {
        s.iter().any(|(_, s)| s.epoch.is_some_and(|e| e >= 5))
    })
    .await
    .unwrap();
    info!("--- kill every node");
    c.crash(0);
    c.crash(1);
    let mut client = etcd.client().await.unwrap();
    // A crash cannot take back a request already sent: wait until the dead nodes' leases have
    // expired (their slot keys are gone) before reading the epoch they left behind.
    let slots = format!("/taskgraph/jobs/{job}/tasks/");
    let deadline = Instant::now() + WAIT;
    while client
        .get(
            slots.clone(),
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_count_only(),
            ),
        )
        .await
        .unwrap()
        .count()
        > 0
    {
        assert!(
            Instant::now() < deadline,
            "leases of killed nodes never expired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stored: u64 = client
        .get(format!("/taskgraph/jobs/{job}/epoch"), None)
        .await
        .unwrap()
        .kvs()[0]
        .value_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(stored >= 5);
    info!("--- start new nodes: they resume at epoch {stored}");
    cfg.behaviour.drive_until = Some(stored + 3);
    let mut c2 = Cluster::start_staffed(cfg, 2).await.unwrap();
    for i in 0..2 {
        assert_eq!(
            c2.wait(i).await.unwrap().unwrap(),
            NodeExit::JobFinished { epoch: stored + 3 }
        );
    }
    for (task, epochs) in entered(&c2.audit.events()) {
        assert_eq!(
            epochs,
            (stored..=stored + 3).collect::<Vec<_>>(),
            "task {task} resumed at the stored epoch"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_killed_and_restarted_mid_job_the_job_finishes() {
    let etcd = etcd().await;
    let mut cfg = ClusterConfig::new(etcd.endpoints(), &job_name("etcdrestart"), 3, 2);
    cfg.behaviour = Behaviour {
        drive_until: Some(40),
        all_drive: false,
        pace_ms: 20,
    };
    let mut c = Cluster::start_staffed(cfg, 6).await.unwrap();
    c.wait_until("epoch 5 reached", WAIT, |s| {
        s.iter().any(|(_, s)| s.epoch.is_some_and(|e| e >= 5))
    })
    .await
    .unwrap();
    info!("--- kill -9 etcd, restart it");
    etcd.kill().await.unwrap();
    c.wait_until("primaries stop acting while etcd is gone", WAIT, |s| {
        s.iter().all(|(_, s)| !s.acting)
    })
    .await
    .unwrap();
    etcd.restart().await.unwrap();
    for i in 0..6 {
        assert_eq!(
            c.wait(i).await.unwrap().unwrap(),
            NodeExit::JobFinished { epoch: 40 },
            "node {i}"
        );
    }
    // Epochs entered by each task's primaries never repeat or go back.
    for (task, epochs) in entered(&c.audit.events()) {
        assert!(
            epochs.windows(2).all(|w| w[0] < w[1]),
            "task {task}: {epochs:?}"
        );
        assert_eq!(epochs.last(), Some(&40));
    }
}

// ----- bad input -----

#[derive(Debug)]
struct OutOfRange;
impl Topology for OutOfRange {
    fn neighbours(&self, task: TaskId, _epoch: u64) -> Vec<TaskId> {
        vec![task + 100]
    }
    fn describe(&self) -> String {
        "out-of-range".into()
    }
}

fn builder(etcd: Vec<String>, job: &str, tasks: u32, replicas: u32) -> taskgraph::FrameworkBuilder {
    Framework::builder()
        .etcd(etcd)
        .job(job)
        .tasks(tasks)
        .replicas(replicas)
        .lease_ttl(Duration::from_secs(1))
        .task_builder(|_t: TaskId| -> Box<dyn Task> {
            Box::new(
                taskgraph_tests::apps::AuditBuilder {
                    node: "x".into(),
                    audit: Default::default(),
                    behaviour: Default::default(),
                }
                .build_one(),
            )
        })
}

#[test]
fn invalid_configuration_is_refused_before_etcd() {
    let e = vec!["http://127.0.0.1:1".to_owned()];
    let err = builder(e.clone(), "j", 0, 1).build().unwrap_err();
    assert!(err.to_string().contains("tasks"), "{err}");
    let err = builder(e.clone(), "j", 3, 0).build().unwrap_err();
    assert!(err.to_string().contains("replicas"), "{err}");
    let err = builder(e.clone(), "j", 3, 1)
        .links(Links::new().link("peers", std::sync::Arc::new(OutOfRange)))
        .build()
        .unwrap_err();
    assert!(matches!(err, ConfigError::Topology(_)), "{err}");
    assert!(
        err.to_string().contains("peers") && err.to_string().contains("100"),
        "{err}"
    );
    let err = builder(e.clone(), "Bad Name", 3, 1).build().unwrap_err();
    assert!(err.to_string().contains("job name"), "{err}");
    let err = builder(e.clone(), "j", 3, 1)
        .lease_ttl(Duration::from_millis(1500))
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("lease TTL"), "{err}");
    let err = builder(vec![], "j", 3, 1).build().unwrap_err();
    assert!(err.to_string().contains("etcd"), "{err}");
    // Checkpoints must fit in one etcd request; frames must hold at least a small message.
    let err = builder(e.clone(), "j", 3, 1)
        .max_checkpoint_bytes(2 << 20)
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("max checkpoint bytes"), "{err}");
    let err = builder(e.clone(), "j", 3, 1)
        .max_checkpoint_bytes(0)
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("max checkpoint bytes"), "{err}");
    let err = builder(e, "j", 3, 1)
        .max_frame_bytes(100)
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("max frame bytes"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_etcd_is_a_clear_error() {
    init_logs();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = builder(vec![format!("http://127.0.0.1:{port}")], "j", 1, 1)
        .etcd_connect_timeout(Duration::from_secs(1))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::EtcdUnreachable { .. }), "{err}");
    assert!(err.to_string().contains(&port.to_string()), "{err}");
}

/// An etcd that answers but takes no write (its space quota exceeded: `mvcc: database space
/// exceeded`) is not called unreachable: the node that cannot join says what etcd answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_etcd_is_named_not_called_unreachable() {
    init_logs();
    // A quota below the empty database's size: the first write raises etcd's NOSPACE alarm.
    let etcd = Etcd::start_with(taskgraph_tests::etcd::EtcdOptions {
        extra_args: vec!["--quota-backend-bytes=1024".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let err = builder(etcd.endpoints(), &job_name("full"), 1, 1)
        .etcd_connect_timeout(Duration::from_secs(2))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Etcd(_)), "{err:?}");
    assert!(err.to_string().contains("space exceeded"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_spec_is_refused_with_the_difference() {
    let etcd = etcd().await;
    let job = job_name("conflict");
    let cfg = ClusterConfig::new(etcd.endpoints(), &job, 3, 2);
    let mut c = Cluster::start(cfg, 1).await.unwrap();
    c.wait_until("the first node holds a slot", WAIT, |s| {
        s.iter().any(|(_, s)| s.role != Role::Spare)
    })
    .await
    .unwrap();
    let err = builder(etcd.endpoints(), &job, 4, 1)
        .build()
        .unwrap()
        .start()
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::SpecConflict { .. }), "{msg}");
    assert!(
        msg.contains("tasks: etcd has 3, this node has 4")
            && msg.contains("replicas: etcd has 2, this node has 1"),
        "{msg}"
    );
    // The running job is untouched.
    assert!(c.live_statuses().iter().all(|(_, s)| s.acting));
    c.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_under_the_jobs_keys_is_rejected_not_obeyed() {
    let etcd = etcd().await;
    let job = job_name("garbage");
    let p = format!("/taskgraph/jobs/{job}/");
    info!("--- a garbage spec: a node refuses to join");
    etcd.etcdctl(["put", &format!("{p}spec"), "{not json"])
        .await
        .unwrap();
    let err = builder(etcd.endpoints(), &job, 2, 1)
        .build()
        .unwrap()
        .start()
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Garbage { .. }) && err.to_string().contains("spec"),
        "{err}"
    );
    etcd.etcdctl(["del", "--prefix", &p]).await.unwrap();

    info!("--- a lease-less garbage primary key before the job runs: removed, then the task is claimed");
    let cfg = ClusterConfig::new(etcd.endpoints(), &job, 2, 1);
    // Planted before the job exists: the first node creates the spec, finds the garbage slot.
    etcd.etcdctl(["put", &format!("{p}tasks/1/primary"), "\u{1}\u{2}garbage"])
        .await
        .unwrap();
    let mut c = Cluster::start(cfg, 2).await.unwrap();
    c.wait_until("both tasks staffed despite the garbage slot", WAIT, |s| {
        fully_staffed(2, 0, s)
    })
    .await
    .unwrap();

    info!(
        "--- garbage epoch, unknown keys, wrong-type node records while running: logged, ignored"
    );

    for (k, v) in [
        ("epoch", "minus one"),
        ("tasks/0/backup/9", "x"),
        ("tasks/99/primary", "{}"),
        ("tasks/zero/primary", "{}"),
        ("nodes/fake", "[1,2,3]"),
        ("whatever/else", "\u{1}"),
    ] {
        etcd.etcdctl(["put", &format!("{p}{k}"), v]).await.unwrap();
    }
    // Nobody obeys the garbage: the primary of task 0 puts the last good epoch back, and an
    // epoch further ahead than the next one, written by someone else, is healed the same way.
    let epoch = |v: Option<&[u8]>| v.and_then(|v| std::str::from_utf8(v).ok()?.parse::<u64>().ok());
    let mut client = etcd.client().await.unwrap();
    let key = format!("{p}epoch");
    keywait::until_value(&mut client, &key, WAIT, "the epoch heals", |v| {
        epoch(v).is_some()
    })
    .await
    .unwrap();
    let good = epoch(Some(
        client.get(key.as_str(), None).await.unwrap().kvs()[0].value(),
    ))
    .unwrap();
    etcd.etcdctl(["put", &key, &(good + 5).to_string()])
        .await
        .unwrap();
    keywait::until_value(&mut client, &key, WAIT, "the epoch heals", |v| {
        epoch(v) == Some(good)
    })
    .await
    .unwrap();
    c.wait_until(
        "both primaries stay acting in the last good epoch",
        WAIT,
        |s| s.len() == 2 && s.iter().all(|(_, s)| s.acting && s.epoch == Some(good)),
    )
    .await
    .unwrap();
    assert_eq!(c.live_statuses().len(), 2, "no node died");
    assert!(fully_staffed(2, 0, &c.live_statuses()));
    c.stop_all().await;
}

/// A task whose primary runs work that never ends, holding a clone of its context.
struct Busy;

#[taskgraph::async_trait]
impl Task for Busy {
    async fn became_primary(&mut self, ctx: &taskgraph::Context, _term: taskgraph::Term) {
        let ctx2 = ctx.clone();
        ctx.spawn(async move {
            loop {
                // Uses the context, as real work would.
                let _ = ctx2.epoch();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
    }
}

/// Crashing an in-process node ends everything it runs: work its task spawned (which holds a
/// clone of its context, and with it the lease's state) must not keep the lease alive, so the
/// crashed primary's key goes when its lease expires. (With no backup and no peer pulling from
/// it, nothing else ends the lease.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_node_leaves_nothing_running_that_keeps_its_lease_alive() {
    let etcd = etcd().await;
    let job = job_name("crashowned");
    let node = Framework::builder()
        .etcd(etcd.endpoints())
        .job(job.clone())
        .tasks(1)
        .links(Links::new())
        .lease_ttl(Duration::from_secs(1))
        .task_builder(|_| Box::new(Busy) as Box<dyn Task>)
        .build()
        .unwrap()
        .spawn()
        .await
        .unwrap();
    let mut status = node.status();
    tokio::time::timeout(
        WAIT,
        status.wait_for(|s| s.primary_of(0).is_some() && s.acting),
    )
    .await
    .expect("the node becomes primary")
    .unwrap();
    info!("--- crash the primary: its spawned loop must end with it");
    node.crash();
    let mut client = etcd.client().await.unwrap();
    let key = taskgraph::testing::etcd::keys::JobKeys::new(&job).primary(0);
    keywait::until_value(
        &mut client,
        &key,
        Duration::from_secs(20),
        "the crashed primary's key expires with its lease",
        |v| v.is_none(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
}

/// A task that moves the epoch the way a newcomer writes it from the README: one spawned
/// `inc_epoch` per epoch, its result ignored. The first call waits for `go`.
struct OneShot {
    go: std::sync::Arc<tokio::sync::Notify>,
    entered: tokio::sync::mpsc::UnboundedSender<u64>,
}

#[taskgraph::async_trait]
impl Task for OneShot {
    async fn enter_epoch(&mut self, ctx: &taskgraph::Context, epoch: u64) {
        let _ = self.entered.send(epoch);
        if epoch >= 2 {
            return;
        }
        let (ctx2, go) = (ctx.clone(), self.go.clone());
        ctx.spawn(async move {
            if epoch == 1 {
                go.notified().await;
            }
            let _ = ctx2.inc_epoch(epoch).await;
        });
    }
}

/// Waits until the task reports entering epoch `want`.
async fn until_entered(want: u64, entered: &mut tokio::sync::mpsc::UnboundedReceiver<u64>) {
    let reached = tokio::time::timeout(WAIT, async {
        while let Some(e) = entered.recv().await {
            if e == want {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(reached, Ok(true), "epoch {want} not entered");
}

/// `inc_epoch` resolves when decided: called while etcd is away (its request times out, the
/// lease may pass its local deadline), it waits and tries again once etcd is back, so an
/// application that ignores its result still moves on. (Before, it returned an error the
/// README's example ignored, and the job stalled for ever.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inc_epoch_called_while_etcd_is_away_resolves_once_it_is_back() {
    let etcd = etcd().await;
    let go = std::sync::Arc::new(tokio::sync::Notify::new());
    let (tx, mut entered) = tokio::sync::mpsc::unbounded_channel();
    let (go2, tx2) = (go.clone(), tx.clone());
    let node = Framework::builder()
        .etcd(etcd.endpoints())
        .job(job_name("decided"))
        .tasks(1)
        .links(Links::new())
        .lease_ttl(Duration::from_secs(5))
        .etcd_request_timeout(Duration::from_millis(500))
        .task_builder(move |_| {
            Box::new(OneShot {
                go: go2.clone(),
                entered: tx2.clone(),
            }) as Box<dyn Task>
        })
        .build()
        .unwrap()
        .spawn()
        .await
        .unwrap();
    until_entered(1, &mut entered).await;
    info!("--- etcd goes away; the task calls inc_epoch once, and ignores what it returns");
    etcd.stop().await.unwrap();
    go.notify_one();
    // Longer than the request timeout: the first attempt fails, the lease is not renewed.
    tokio::time::sleep(Duration::from_secs(2)).await;
    info!("--- etcd is back (leases keep their full TTL)");
    etcd.restart().await.unwrap();
    // Epoch 2 entered: the call resolved once etcd was back.
    until_entered(2, &mut entered).await;
    drop(tx);
    node.stop().await.unwrap();
}

/// Issue 22, item 5: the standard topologies are reachable from `taskgraph` itself, each with
/// the link names the README's table gives.
#[test]
fn standard_topologies_are_reexported_with_the_link_names_of_the_readme() {
    let names = |links: taskgraph::Links| -> Vec<String> {
        let mut v: Vec<String> = links.iter().map(|(n, _)| n.to_owned()).collect();
        v.sort();
        v
    };
    let cases: Vec<(taskgraph::Links, &[&str])> = vec![
        (
            taskgraph::Tree::new(7, 2).unwrap().links(),
            &["children", "parents"],
        ),
        (taskgraph::Ring::new(4).unwrap().links(), &["next", "prev"]),
        (
            taskgraph::Ring::new(4).unwrap().bidirectional_links(),
            &["neighbours"],
        ),
        (taskgraph::FullMesh::new(4).unwrap().links(), &["peers"]),
        (
            taskgraph::Star::new(4).unwrap().links(),
            &["master", "workers"],
        ),
        (
            taskgraph::ParameterServers::new(2, 3).unwrap().links(),
            &["servers", "workers"],
        ),
        (
            taskgraph::Grid::new(2, 3).unwrap().links(),
            &["east", "north", "south", "west"],
        ),
        (taskgraph::Butterfly::new(8).unwrap().links(), &["partner"]),
    ];
    for (links, want) in cases {
        assert_eq!(names(links), want.to_vec());
    }
}
