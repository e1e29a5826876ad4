//! Fault injection on etcd itself, under a running dataflow job (in-process nodes, real etcd):
//! the leader of a three-member cluster killed with SIGKILL mid-job, then a second member
//! (quorum lost), both restarted; a single etcd killed and restarted within a second; a single
//! etcd down for longer than the lease TTL. Every job must finish with an exact audit trail
//! (see `taskgraph_tests::dataflow::check_trail`), and while etcd is gone no node may act.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use taskgraph_tests::apps::Event;
use taskgraph_tests::cluster::{App, Cluster, ClusterConfig};
use taskgraph_tests::dataflow::check_trail;
use taskgraph_tests::etcd::{Etcd, EtcdCluster};
use taskgraph_tests::{init_logs, job_name};
use tracing::info;

const WAIT: Duration = Duration::from_secs(30);
/// Deadline for the job to end on every node once etcd is back (generous for a loaded 2-core
/// machine; below nextest's termination of a slow test).
const JOB_END: Duration = Duration::from_secs(100);

const TASKS: u32 = 7;
const UNTIL: u64 = 40;

fn dataflow(etcd: Vec<String>, name: &str) -> ClusterConfig {
    let mut cfg = ClusterConfig::new(etcd, &job_name(name), TASKS, 2);
    cfg.app = App::Dataflow {
        until: UNTIL,
        pace_ms: 20,
    };
    cfg
}

async fn wait_epoch(c: &Cluster, epoch: u64, why: &str) {
    c.wait_until(why, WAIT, |s| {
        s.iter().any(|(_, s)| s.epoch.is_some_and(|e| e >= epoch))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
}

/// Waits until every node ended with the job finished at [`UNTIL`], then checks the trail.
async fn finish_exactly(c: &mut Cluster) {
    c.all_finish_at(UNTIL, JOB_END).await;
    let events = c.audit.events();
    let bad = check_trail(&events, TASKS, UNTIL);
    assert!(
        bad.is_empty(),
        "{} violations:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

/// Whether an event is something only an acting node does (an action, a delivery, a result).
fn is_action(e: &Event) -> bool {
    matches!(
        e,
        Event::Primary { .. }
            | Event::Enter { .. }
            | Event::Moved { .. }
            | Event::Data { .. }
            | Event::Meta { .. }
            | Event::Neighbour { .. }
            | Event::Counter { .. }
            | Event::Result { .. }
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_member_etcd_loses_its_leader_then_its_quorum_and_the_job_stays_exact() {
    init_logs();
    let etcd = EtcdCluster::start(3).await.expect("start a 3-member etcd");
    let mut c = Cluster::start_staffed(dataflow(etcd.endpoints(), "etcd3"), 14)
        .await
        .unwrap();
    wait_epoch(&c, 5, "epoch 5 reached").await;

    info!("--- kill -9 the etcd leader");
    let leader = etcd.wait_for_leader(WAIT).await.unwrap();
    etcd.kill(leader).await.unwrap();
    let new_leader = etcd.wait_for_leader(WAIT).await.unwrap();
    assert_ne!(leader, new_leader);
    // Two members of three keep a quorum: the job moves on.
    let at = c.max_epoch();
    wait_epoch(&c, at + 3, "the job moves on with two members of three").await;

    info!("--- kill -9 a second member: no quorum");
    etcd.kill(new_leader).await.unwrap();
    c.wait_until("no node acts without an etcd quorum", WAIT, |s| {
        s.iter().all(|(_, s)| !s.acting)
    })
    .await
    .unwrap();

    info!("--- restart both members");
    etcd.restart_all().await.unwrap();
    finish_exactly(&mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_etcd_killed_and_restarted_at_once_the_job_stays_exact() {
    init_logs();
    let etcd = Etcd::start().await.expect("start etcd");
    let mut c = Cluster::start_staffed(dataflow(etcd.endpoints(), "etcdbounce"), 14)
        .await
        .unwrap();
    for round in 0..3 {
        let at = c.max_epoch();
        wait_epoch(&c, at + 3, "the job moves on").await;
        info!("--- kill -9 etcd and restart it at once (round {round})");
        etcd.kill().await.unwrap();
        etcd.restart().await.unwrap();
    }
    finish_exactly(&mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_longer_than_the_ttl_no_node_acts_and_the_job_resumes() {
    init_logs();
    let etcd = Etcd::start().await.expect("start etcd");
    let cfg = dataflow(etcd.endpoints(), "etcdlong");
    let ttl = cfg.ttl;
    let mut c = Cluster::start_staffed(cfg, 14).await.unwrap();
    wait_epoch(&c, 5, "epoch 5 reached").await;

    info!("--- kill -9 etcd and keep it down for twice the TTL");
    etcd.kill().await.unwrap();
    c.wait_until("every node stops acting", WAIT, |s| {
        s.iter().all(|(_, s)| !s.acting)
    })
    .await
    .unwrap();
    let before = c.audit.events().len();
    // The fault itself lasts a fixed time: while it does, watch that no node acts again.
    let outage_end = tokio::time::Instant::now() + 2 * ttl;
    while tokio::time::Instant::now() < outage_end {
        let acting: Vec<_> = c
            .live_statuses()
            .into_iter()
            .filter(|(_, s)| s.acting)
            .collect();
        assert!(acting.is_empty(), "acting without etcd: {acting:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let events = c.audit.events();
    let late: Vec<_> = events[before..]
        .iter()
        .filter(|(_, e)| is_action(e))
        .collect();
    assert!(
        late.is_empty(),
        "nodes acted on stale roles while etcd was down: {late:#?}"
    );

    info!("--- restart etcd: the job resumes");
    etcd.restart().await.unwrap();
    finish_exactly(&mut c).await;
}

/// An operator's reads (`JobClient`) while an etcd member is down and right after it was
/// restarted: the client's connection to it is refused before the client moves on; every read
/// must still answer (reads that never reached etcd are sent again within the request
/// deadline).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_right_after_etcd_members_restart_answer() {
    init_logs();
    let cluster = EtcdCluster::start(3).await.unwrap();
    let cfg = dataflow(cluster.endpoints(), "readsbounce");
    let job = cfg.job.clone();
    let mut c = Cluster::start_staffed(cfg, 14)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let client = taskgraph::JobClient::connect(&cluster.endpoints(), &job)
        .await
        .unwrap();
    for round in 0..3 {
        for i in 0..cluster.len() {
            cluster.kill(i).await.unwrap();
            // Two of three members keep the quorum: reads go on while one is down…
            for _ in 0..5 {
                let state = client.state().await;
                assert!(state.is_ok(), "round {round}, member {i} down: {state:?}");
            }
            cluster.restart(i).await.unwrap();
            // …and right after it is back.
            for _ in 0..5 {
                let state = client.state().await;
                assert!(
                    state.is_ok(),
                    "round {round}, member {i} restarted: {state:?}"
                );
                let spec = client.spec().await;
                assert!(spec.is_ok(), "round {round}, member {i}: {spec:?}");
            }
        }
    }
    c.stop_all().await;
}

/// Every lease ends at once (revoked in etcd, as if all of them expired together: a long
/// stall of every node's keep-alives): every node gives its slot up and rejoins as a spare,
/// task 0 is claimed again, its primary drafts the others, and the job finishes exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_lease_ending_at_once_the_job_is_staffed_again_and_stays_exact() {
    init_logs();
    let etcd = Etcd::start().await.expect("start etcd");
    let cfg = dataflow(etcd.endpoints(), "allexpire");
    let mut c = Cluster::start_staffed(cfg, 14).await.unwrap();
    wait_epoch(&c, 5, "epoch 5 reached").await;
    let mut client = etcd.client().await.unwrap();
    for round in 0..2 {
        info!("--- round {round}: revoke every lease");
        let leases = client.leases().await.unwrap();
        let ids: Vec<i64> = leases.leases().iter().map(|l| l.id()).collect();
        assert!(!ids.is_empty());
        for id in ids {
            let _ = client.lease_revoke(id).await;
        }
        let reached = c.max_epoch() + 3;
        wait_epoch(&c, reached, "the job moves on after every lease ended").await;
    }
    finish_exactly(&mut c).await;
}
