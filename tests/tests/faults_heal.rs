//! Bad values left in place under the keys the framework owns, while the job runs: unlike
//! `faults_etcd_input.rs`, the test never puts the real value back. Each key either heals
//! (the framework rewrites it, and the job's answer stays exact) or the stall is named. A
//! tampered job runs next to an untouched one on the same etcd, which must not notice.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use taskgraph::testing::etcd::keys::{EpochValue, JobKeys, NodeRecord, StoredCheckpoint};
use taskgraph::{JobClient, JobSpec, NodeExit};
use taskgraph_tests::cluster::{App, Cluster, ClusterConfig};
use taskgraph_tests::dataflow::check_trail;
use taskgraph_tests::etcd::Etcd;
use taskgraph_tests::keywait;
use taskgraph_tests::{init_logs, job_name};
use tokio::time::Instant;
use tracing::info;

const WAIT: Duration = Duration::from_secs(60);
const TASKS: u32 = 7;
const UNTIL: u64 = 60;

async fn moves_on(c: &Cluster, by: u64, why: &str) {
    c.moves_on(by, why, WAIT).await;
}

/// Holds the job at its current epoch (the root does not move it on), once every primary
/// has entered it. Returns the epoch.
async fn hold(c: &Cluster) -> u64 {
    c.audit.close_gate();
    let held = c.max_epoch();
    c.wait_until("every primary is in the held epoch", WAIT, |s| {
        s.iter()
            .filter(|(_, s)| matches!(s.role, taskgraph::Role::Primary { .. }))
            .all(|(_, s)| s.epoch >= Some(held))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    held
}

/// Waits until the value under `key` satisfies `ok` and returns how long that took from
/// `since`.
async fn until_value(
    etcd: &Etcd,
    key: &str,
    since: Instant,
    why: &str,
    ok: impl Fn(Option<&[u8]>) -> bool,
) -> Duration {
    let mut client = etcd.client().await.unwrap();
    keywait::until_value(&mut client, key, WAIT, why, ok)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    since.elapsed()
}

fn running(v: Option<&[u8]>, n: u64) -> bool {
    v.is_some_and(|v| EpochValue::parse(v) == Ok(EpochValue::Running(n)))
}

async fn finishes_exact(c: &mut Cluster, name: &str) {
    info!("--- {name}: every node ends with the job, the trail exact");
    c.all_finish_at(UNTIL, Duration::from_secs(100)).await;
    let bad = check_trail(&c.audit.events(), TASKS, UNTIL);
    assert!(
        bad.is_empty(),
        "{name}: {} violations:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_values_left_under_the_jobs_keys_heal_and_the_answer_stays_exact() {
    init_logs();
    let etcd = Etcd::start().await.expect("start etcd");
    let dataflow = |name: &str| {
        let mut cfg = ClusterConfig::new(etcd.endpoints(), &job_name(name), TASKS, 2);
        cfg.app = App::Dataflow {
            until: UNTIL,
            pace_ms: 20,
        };
        cfg
    };
    let (tampered, untouched) = (dataflow("tampered"), dataflow("untouched"));
    let keys = JobKeys::new(&tampered.job);
    let tampered_job = tampered.job.clone();
    let mut client = etcd.client().await.unwrap();
    let mut c = Cluster::start_staffed(tampered, (TASKS * 2) as usize)
        .await
        .unwrap();
    let mut other = Cluster::start_staffed(untouched, (TASKS * 2) as usize)
        .await
        .unwrap();
    moves_on(&c, 2, "the job runs").await;

    // The epoch, with the job held so that the value the framework knows stays put.
    let key = keys.epoch();
    /// The bad value for a job held at epoch `n` (`None`: delete the key).
    fn bad_epoch(what: &str, n: u64) -> Option<String> {
        match what {
            "garbage" => Some("garbage".into()),
            "an epoch set backwards" => Some((n - 2).to_string()),
            "an epoch set far ahead" => Some((n + 1000).to_string()),
            _ => None,
        }
    }
    for what in [
        "garbage",
        "an epoch set backwards",
        "an epoch set far ahead",
        "the key deleted",
    ] {
        let held = hold(&c).await;
        info!("--- under the epoch key (at epoch {held}): {what}, left in place");
        let since = Instant::now();
        match bad_epoch(what, held) {
            Some(v) => drop(client.put(key.as_str(), v, None).await.unwrap()),
            None => drop(client.delete(key.as_str(), None).await.unwrap()),
        }
        let took = until_value(
            &etcd,
            &key,
            since,
            &format!("the epoch heals after {what}"),
            |v| running(v, held),
        )
        .await;
        println!("epoch key, {what}: healed to {held} in {took:?}");
        c.audit.open_gate();
        moves_on(&c, 2, &format!("the job moves on after {what}")).await;
    }

    info!("--- garbage under the epoch key while the root is about to move it: it heals");
    let since = Instant::now();
    client.put(key.as_str(), "12x", None).await.unwrap();
    let took = until_value(&etcd, &key, since, "the epoch heals", |v| {
        v.is_some_and(|v| EpochValue::parse(v).is_ok())
    })
    .await;
    println!("epoch key, garbage while running: healed in {took:?}");
    moves_on(&c, 2, "the job moves on after garbage while running").await;

    info!("--- the spec: garbage, then a conflicting spec, then deleted; each left in place");
    let spec_key = keys.spec();
    let real = JobSpec::decode(client.get(spec_key.as_str(), None).await.unwrap().kvs()[0].value())
        .unwrap();
    let mut other_spec = real.clone();
    other_spec.tasks += 1;
    for (what, value) in [
        ("garbage", Some(b"{\"version\":".to_vec())),
        ("a conflicting spec", Some(other_spec.encode().into_bytes())),
        ("deleted", None),
    ] {
        let since = Instant::now();
        match value {
            Some(v) => drop(client.put(spec_key.as_str(), v, None).await.unwrap()),
            None => drop(client.delete(spec_key.as_str(), None).await.unwrap()),
        }
        let took = until_value(&etcd, &spec_key, since, "the spec heals", |v| {
            v.and_then(|v| JobSpec::decode(v).ok())
                .is_some_and(|s| JobSpec::difference(&s, &real).is_none())
        })
        .await;
        println!("spec key, {what}: healed in {took:?}");
    }
    moves_on(&c, 2, "the job moves on after a bad spec").await;

    info!("--- a node's record: garbage without its lease, then deleted");
    let node = c.node_id(3).unwrap();
    let node_key = keys.node(&node);
    for (what, value) in [("garbage", Some("not json")), ("deleted", None)] {
        let since = Instant::now();
        match value {
            Some(v) => drop(client.put(node_key.as_str(), v, None).await.unwrap()),
            None => drop(client.delete(node_key.as_str(), None).await.unwrap()),
        }
        let took = until_value(&etcd, &node_key, since, "the record heals", |v| {
            v.and_then(|v| serde_json::from_slice::<NodeRecord>(v).ok())
                .is_some()
        })
        .await;
        println!("node record, {what}: healed in {took:?}");
        let lease = client.get(node_key.as_str(), None).await.unwrap().kvs()[0].lease();
        assert_ne!(
            lease, 0,
            "the healed record is under the node's lease again"
        );
    }

    info!("--- garbage under a checkpoint: the task's next checkpoint overwrites it");
    let cp_key = keys.checkpoint(3);
    let since = Instant::now();
    client.put(cp_key.as_str(), "tgcp1", None).await.unwrap();
    let took = until_value(&etcd, &cp_key, since, "the checkpoint is rewritten", |v| {
        v.is_some_and(|v| StoredCheckpoint::decode(v).is_ok())
    })
    .await;
    println!("checkpoint key, garbage: overwritten in {took:?}");

    info!("--- garbage under result before the end: never taken as the job's result");
    let result_key = keys.result();
    client
        .put(result_key.as_str(), "{\"forged\":true}", None)
        .await
        .unwrap();
    let job = JobClient::connect(&etcd.endpoints(), &tampered_job)
        .await
        .unwrap();
    assert!(
        matches!(job.result().await, Err(taskgraph::Error::Garbage { .. })),
        "a result written before the end is refused"
    );

    finishes_exact(&mut c, "the tampered job").await;
    // The job ended without a result (the dataflow root uses `shutdown_job`): the forged value
    // is gone with the end, and nothing reads as the job's result.
    assert!(job.result().await.unwrap().is_none());
    finishes_exact(&mut other, "the untouched job").await;
}

/// A job that cannot move on (a task has no node to run it) is reported as stalled, naming
/// the task, by the primary of task 0 in its record: `JobClient::status` (what `taskgraph
/// status` prints) shows it, and the report goes once the job moves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stall_is_named_in_the_job_status_and_ends_when_the_job_moves() {
    init_logs();
    let etcd = Etcd::start().await.unwrap();
    let mut cfg = ClusterConfig::new(etcd.endpoints(), &job_name("stall"), 3, 1);
    cfg.app = App::Dataflow {
        until: 20,
        pace_ms: 10,
    };
    cfg.stall_after = Some(Duration::from_secs(2));
    let job = cfg.job.clone();
    // Two nodes for three tasks: one task stays without a primary.
    let mut c = Cluster::new(cfg);
    for _ in 0..2 {
        c.add_node().await.unwrap();
    }
    let client = JobClient::connect(&etcd.endpoints(), &job).await.unwrap();
    // Any change to the job's keys (a node's record included) is worth a new look.
    let mut watch = client.changes();
    let mut status = client.status().await.unwrap();
    let deadline = Instant::now() + WAIT;
    while !status.stalled() {
        assert!(Instant::now() < deadline, "no stall reported: {status:#?}");
        let _ = tokio::time::timeout_at(deadline, watch.recv()).await;
        status = client.status().await.unwrap();
    }
    let free = status
        .tasks
        .iter()
        .find(|t| t.primary.is_none())
        .expect("a task without a primary")
        .task;
    let reasons = status.stall_reasons();
    assert!(
        reasons
            .iter()
            .any(|r| r.task == Some(free) && r.text.contains("has no primary")),
        "the stall names task {free}: {reasons:#?}"
    );
    info!("--- a third node joins: the job moves, the stall report goes");
    c.add_node().await.unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let s = client.status().await.unwrap();
        if !s.stalled() {
            break;
        }
        assert!(Instant::now() < deadline, "the stall report stays: {s:#?}");
        let _ = tokio::time::timeout_at(deadline, watch.recv()).await;
    }
    for i in 0..c.len() {
        let exit = tokio::time::timeout(WAIT, c.wait(i)).await.unwrap();
        assert_eq!(
            exit.map(|r| r.unwrap_or_else(|e| panic!("node {i}: {e}"))),
            Some(NodeExit::JobFinished { epoch: 20 }),
            "node {i}"
        );
    }
}

/// An operator's shutdown of a job whose epoch key holds garbage (with no node left to heal
/// it) ends the job at the epoch before the garbage, not at 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operators_shutdown_over_a_garbage_epoch_keeps_the_epoch_before_it() {
    init_logs();
    let etcd = Etcd::start().await.unwrap();
    let job = job_name("opshutdown");
    let key = JobKeys::new(&job).epoch();
    let mut client = etcd.client().await.unwrap();
    client.put(key.as_str(), "7", None).await.unwrap();
    client.put(key.as_str(), "garbage", None).await.unwrap();
    let job = JobClient::connect(&etcd.endpoints(), &job).await.unwrap();
    assert_eq!(job.shutdown().await.unwrap(), Some(7));
    let stored = client.get(key.as_str(), None).await.unwrap();
    assert_eq!(stored.kvs()[0].value(), b"done 7");
}
