//! `JobClient::changes` and `JobClient::changes_since` against real etcd: the typed change
//! stream of a running job (snapshot, failover with terms, garbage, the job's end), a replay
//! of the same history that tells the same changes, and a stream that survives an etcd
//! restart without missing a change.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use taskgraph::testing::etcd::keys::JobKeys;
use taskgraph::{ChangeEvent, JobChange, JobChanges, JobClient, JobSpec, JobStatus};
use taskgraph_tests::cluster::{App, Cluster, ClusterConfig};
use taskgraph_tests::etcd::Etcd;
use taskgraph_tests::{init_logs, job_name};
use tracing::info;

const WAIT: Duration = Duration::from_secs(60);

/// Reads `changes` into `seen` until one satisfies `done`, which it returns.
async fn until(
    changes: &mut JobChanges,
    seen: &mut Vec<ChangeEvent>,
    why: &str,
    done: impl Fn(&JobChange) -> bool,
) -> ChangeEvent {
    let read = tokio::time::timeout(WAIT, async {
        while let Some(ev) = changes.recv().await {
            let ev = ev.unwrap_or_else(|e| panic!("{why}: the stream failed: {e}"));
            seen.push(ev.clone());
            if done(&ev.change) {
                return Some(ev);
            }
        }
        None
    })
    .await;
    match read {
        Ok(Some(ev)) => ev,
        Ok(None) => panic!("{why}: the stream ended; seen {seen:#?}"),
        Err(_) => panic!(
            "{why}: not within {WAIT:?}; last seen {:#?}",
            &seen[seen.len().saturating_sub(10)..]
        ),
    }
}

/// The stream's opening snapshot.
async fn snapshot(changes: &mut JobChanges) -> (i64, JobStatus) {
    let first = tokio::time::timeout(WAIT, changes.recv()).await;
    match first {
        Ok(Some(Ok(ChangeEvent {
            revision,
            change: JobChange::Snapshot(status),
        }))) => (revision, *status),
        other => panic!("the stream must open with a snapshot, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_change_stream_tells_a_failover_with_terms_garbage_and_the_end_and_a_replay_agrees() {
    init_logs();
    let etcd = Etcd::start().await.unwrap();
    let job = job_name("changes");
    let mut cfg = ClusterConfig::new(etcd.endpoints(), &job, 3, 2);
    cfg.app = App::Dataflow {
        until: 1_000_000,
        pace_ms: 20,
    };
    let mut c = Cluster::start_staffed(cfg, 6).await.unwrap();
    let client = JobClient::connect(&etcd.endpoints(), &job).await.unwrap();

    info!("--- the stream opens with a snapshot of every slot");
    let mut changes = client.changes();
    let (snap_rev, status) = snapshot(&mut changes).await;
    assert_eq!(status.revision, snap_rev);
    assert_eq!((status.tasks_total, status.replicas), (3, 2));
    assert!(status.state.is_some_and(|s| !s.finished), "{status:#?}");
    let task1 = &status.tasks[1];
    let (Some(old), Some(old_term)) = (task1.primary.clone(), task1.term) else {
        panic!("task 1 has no primary in the snapshot: {status:#?}")
    };
    let mut seen = Vec::new();

    info!("--- stop task 1's primary {old} (term {old_term}): gone, then a new term");
    let (i, term) = c.primary_of(1).expect("task 1 has a primary");
    assert_eq!(term, old_term);
    let _ = c.stop(i).await;
    let up = until(
        &mut changes,
        &mut seen,
        "a new primary of task 1",
        |ch| matches!(ch, JobChange::PrimaryUp { task: 1, term, .. } if *term > old_term),
    )
    .await;
    let JobChange::PrimaryUp { node: new, .. } = &up.change else {
        unreachable!("matched above")
    };
    assert_ne!(*new, old, "the stopped node cannot be the new primary");
    let gone = seen.iter().position(|e| {
        e.change
            == JobChange::PrimaryGone {
                task: 1,
                node: Some(old.clone()),
                term: Some(old_term),
            }
    });
    assert!(
        gone.is_some(),
        "no PrimaryGone of task 1 naming {old} and term {old_term} before the new primary: {seen:#?}"
    );

    info!("--- garbage under task 2's checkpoint is named with its key");
    let key = JobKeys::new(&job).checkpoint(2);
    let mut etcd_client = etcd.client().await.unwrap();
    etcd_client.put(key.clone(), "garbage", None).await.unwrap();
    let garbage = until(
        &mut changes,
        &mut seen,
        "the garbage checkpoint",
        |ch| matches!(ch, JobChange::Garbage { key: k, .. } if *k == key),
    )
    .await;
    let JobChange::Garbage { reason, .. } = &garbage.change else {
        unreachable!("matched above")
    };
    assert!(!reason.is_empty());

    info!("--- the job moves on");
    until(&mut changes, &mut seen, "an epoch move", |ch| {
        matches!(ch, JobChange::EpochMoved { .. })
    })
    .await;

    info!("--- an operator ends the job: the stream says at which epoch");
    let end = client.shutdown().await.unwrap().expect("the job exists");
    let finished = until(&mut changes, &mut seen, "the job's end", |ch| {
        matches!(ch, JobChange::Finished { .. })
    })
    .await;
    assert_eq!(finished.change, JobChange::Finished { epoch: end });

    // Invariants of the whole stream: revisions never go back, epochs only move forward.
    let mut last_rev = snap_rev;
    let mut last_epoch = status.state.map(|s| s.epoch);
    for e in &seen {
        assert!(e.revision > snap_rev && e.revision >= last_rev, "{e:?}");
        last_rev = e.revision;
        if let JobChange::EpochMoved { epoch } = e.change {
            assert!(
                last_epoch.is_none_or(|l| epoch > l),
                "{e:?} after {last_epoch:?}"
            );
            last_epoch = Some(epoch);
        }
    }
    for i in 0..c.len() {
        let _ = tokio::time::timeout(WAIT, c.wait(i)).await;
    }

    info!("--- a replay of the whole history tells the same changes after the snapshot");
    let mut replay = client.changes_since(1).await.unwrap();
    let mut replayed = Vec::new();
    let created = until(&mut replay, &mut replayed, "the job's creation", |ch| {
        matches!(ch, JobChange::JobCreated { .. })
    })
    .await;
    let JobChange::JobCreated { spec } = &created.change else {
        unreachable!("matched above")
    };
    assert_eq!((spec.tasks, spec.replicas), (3, 2));
    until(
        &mut replay,
        &mut replayed,
        "the job's end in the replay",
        |ch| matches!(ch, JobChange::Finished { .. }),
    )
    .await;
    let after: Vec<&ChangeEvent> = replayed.iter().filter(|e| e.revision > snap_rev).collect();
    let live: Vec<&ChangeEvent> = seen.iter().collect();
    assert_eq!(after, live, "the replay and the live stream differ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_change_stream_survives_an_etcd_restart_without_missing_a_change() {
    init_logs();
    let etcd = Etcd::start().await.unwrap();
    let job = job_name("changesrestart");
    let keys = JobKeys::new(&job);
    let client = JobClient::connect(&etcd.endpoints(), &job).await.unwrap();
    let mut changes = client.changes();
    let (_, status) = snapshot(&mut changes).await;
    assert!(status.state.is_none(), "no job yet: {status:#?}");
    let mut seen = Vec::new();

    info!("--- the job is created (by hand, as its first node would)");
    let spec = JobSpec {
        version: JobSpec::VERSION,
        tasks: 2,
        replicas: 1,
        links: BTreeMap::new(),
        params: BTreeMap::new(),
        created_ms: None,
    };
    let mut kv = etcd.client().await.unwrap();
    kv.put(keys.spec(), spec.encode(), None).await.unwrap();
    kv.put(keys.epoch(), "1", None).await.unwrap();
    until(&mut changes, &mut seen, "epoch 1", |ch| {
        *ch == JobChange::EpochMoved { epoch: 1 }
    })
    .await;
    assert_eq!(
        seen.iter().map(|e| &e.change).collect::<Vec<_>>(),
        [
            &JobChange::JobCreated { spec: spec.clone() },
            &JobChange::EpochMoved { epoch: 1 }
        ]
    );

    info!("--- etcd restarts; the epoch moves twice while the stream reconnects");
    etcd.restart().await.unwrap();
    let mut kv = etcd.client().await.unwrap();
    kv.put(keys.epoch(), "2", None).await.unwrap();
    kv.put(keys.epoch(), "3", None).await.unwrap();
    let mut after = Vec::new();
    until(
        &mut changes,
        &mut after,
        "epoch 3 after the restart",
        |ch| *ch == JobChange::EpochMoved { epoch: 3 },
    )
    .await;
    let kinds: Vec<&JobChange> = after.iter().map(|e| &e.change).collect();
    assert_eq!(
        kinds,
        [
            &JobChange::Disconnected,
            &JobChange::EpochMoved { epoch: 2 },
            &JobChange::EpochMoved { epoch: 3 }
        ],
        "the stream reports the lost link, then every change, in order"
    );
}
