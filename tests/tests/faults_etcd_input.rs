//! Bad input under every kind of key a running job uses, written with `etcdctl` behind the
//! framework's back (see `taskgraph::testing::etcd::keys` for the layout): empty, truncated, wrong-type
//! (valid JSON of another shape), binary and non-UTF-8 values; a stale (lower) epoch. The
//! job (a dataflow over in-process nodes, audited) must keep running and finish with an exact
//! trail; no node may fail and nothing may panic. `coordination.rs` covers a garbage spec at
//! join, a garbage primary key before the job, a garbage epoch and unknown keys; `exchange.rs`
//! a garbage checkpoint at restore. This file covers the rest, while the job runs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use taskgraph::NodeExit;
use taskgraph_tests::cluster::{App, Cluster, ClusterConfig};
use taskgraph_tests::dataflow::check_trail;
use taskgraph_tests::etcd::{etcdctl_binary, Etcd};
use taskgraph_tests::{init_logs, job_name};
use tracing::info;

const WAIT: Duration = Duration::from_secs(60);
const TASKS: u32 = 7;
const UNTIL: u64 = 80;

/// Counts panics on any thread of this test process (the nodes run in it), keeping the
/// default report.
fn count_panics() -> Arc<AtomicUsize> {
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        seen.fetch_add(1, Ordering::SeqCst);
        default(info);
    }));
    count
}

/// `etcdctl put KEY VALUE [flags]` with a value of arbitrary bytes; a value holding a NUL
/// (which no command-line argument can) or too long for one goes through the etcd client.
async fn put(etcd: &Etcd, key: &str, value: &[u8], flags: &[&str]) {
    if value.contains(&0) || value.len() > 100_000 {
        let mut client = etcd.client().await.unwrap();
        let options = flags
            .contains(&"--ignore-lease")
            .then(|| etcd_client::PutOptions::new().with_ignore_lease());
        client.put(key, value, options).await.unwrap();
        return;
    }
    let bin = etcdctl_binary().unwrap();
    let mut cmd = tokio::process::Command::new(bin);
    cmd.env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", etcd.endpoint()))
        .arg("put")
        .args(flags)
        .arg("--")
        .arg(key)
        .arg(OsString::from_vec(value.to_vec()));
    let out = cmd.output().await.unwrap();
    assert!(
        out.status.success(),
        "etcdctl put {key}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn get(etcd: &Etcd, key: &str) -> Vec<u8> {
    let mut client = etcd.client().await.unwrap();
    let r = client.get(key, None).await.unwrap();
    r.kvs()
        .first()
        .map(|kv| kv.value().to_vec())
        .unwrap_or_else(|| panic!("no value under {key}"))
}

/// Garbage in every shape for a key whose real value is `real`.
fn garbage(real: &[u8]) -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b"{".to_vec(),
        b"null".to_vec(),
        b"[1,2,3]".to_vec(),
        b"\"a string\"".to_vec(),
        b"{\"node\":5,\"addr\":[]}".to_vec(),
        b"-1".to_vec(),
        b"18446744073709551616".to_vec(),
        b"done".to_vec(),
        b"done x".to_vec(),
        b"tgcp1".to_vec(),
        b"tgcp1\x01\x02\x03".to_vec(),
        vec![0xff, 0xfe, 0xfd, b'{'],
        vec![0x01; 4096],
        vec![b'x'; 200_000],
    ];
    // The real value cut short, and with a byte flipped.
    for cut in [1, real.len() / 2, real.len().saturating_sub(1)] {
        v.push(real[..cut.min(real.len())].to_vec());
    }
    if let Some((first, rest)) = real.split_first() {
        let mut flipped = vec![first ^ 0x55];
        flipped.extend_from_slice(rest);
        v.push(flipped);
    }
    v.push(vec![0; 16]);
    v
}

async fn moves_on(c: &Cluster, by: u64, why: &str) {
    c.moves_on(by, why, WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_under_every_key_of_a_running_job_is_not_obeyed() {
    init_logs();
    let panics = count_panics();
    let etcd = Etcd::start().await.expect("start etcd");
    let mut cfg = ClusterConfig::new(etcd.endpoints(), &job_name("etcdinput"), TASKS, 2);
    cfg.app = App::Dataflow {
        until: UNTIL,
        pace_ms: 20,
    };
    let p = format!("/taskgraph/jobs/{}/", cfg.job);
    let mut c = Cluster::start_staffed(cfg, (TASKS * 2) as usize)
        .await
        .unwrap();
    moves_on(&c, 3, "the job runs").await;
    let mut tried = 0usize;

    // Keys held by live nodes keep their lease (`--ignore-lease`): only the value is bad.
    let node_id = c.node_id(0).unwrap();
    for (what, key, flags) in [
        ("spec", format!("{p}spec"), &[][..]),
        (
            "a live node's record",
            format!("{p}nodes/{node_id}"),
            &["--ignore-lease"][..],
        ),
        ("a checkpoint", format!("{p}checkpoints/3"), &[][..]),
        ("a leaf's checkpoint", format!("{p}checkpoints/6"), &[][..]),
    ] {
        info!("--- garbage under {what} ({key})");
        // The job is held meanwhile, so that it does not run out of epochs while the (slow,
        // one process each) writes go on.
        c.audit.close_gate();
        let real = get(&etcd, &key).await;
        for g in garbage(&real) {
            put(&etcd, &key, &g, flags).await;
            tried += 1;
        }
        put(&etcd, &key, &real, flags).await;
        c.audit.open_gate();
        moves_on(
            &c,
            2,
            &format!("the job moves on after garbage under {what}"),
        )
        .await;
    }

    info!("--- garbage under the result key, before the job wrote one");
    c.audit.close_gate();
    for g in garbage(b"{\"result\":1}") {
        put(&etcd, &format!("{p}result"), &g, &[]).await;
        tried += 1;
    }
    c.audit.open_gate();
    moves_on(&c, 2, "the job moves on after garbage under result").await;

    info!("--- garbage and a stale value under the epoch, with the job held at one epoch");
    c.audit.close_gate();
    let held = c.max_epoch();
    // Every primary has entered the held epoch: the root moves no further.
    c.wait_until("every primary is in the held epoch", WAIT, |s| {
        s.iter()
            .filter(|(_, s)| matches!(s.role, taskgraph::Role::Primary { .. }))
            .all(|(_, s)| s.epoch >= Some(held))
    })
    .await
    .unwrap();
    let key = format!("{p}epoch");
    let real = get(&etcd, &key).await;
    let mut values = garbage(&real);
    let current: u64 = String::from_utf8_lossy(&real).trim().parse().unwrap_or(0);
    values.push(current.saturating_sub(1).to_string().into_bytes());
    values.push(b"0".to_vec());
    for g in values {
        put(&etcd, &key, &g, &[]).await;
        tried += 1;
    }
    put(&etcd, &key, &real, &[]).await;
    c.audit.open_gate();
    moves_on(&c, 2, "the job moves on after garbage under epoch").await;

    info!("--- garbage under a live primary's and a live backup's key (value only)");
    // The node holding the key gives its slot up and deletes the key; another node takes the
    // slot (a new key), and the next garbage goes under that one.
    for key in [
        format!("{p}tasks/2/primary"),
        format!("{p}tasks/5/backup/1"),
    ] {
        for g in garbage(b"{}").into_iter().step_by(4) {
            c.wait_until(&format!("{key} is held"), WAIT, |s| {
                taskgraph_tests::cluster::fully_staffed(TASKS, 1, s)
            })
            .await
            .unwrap_or_else(|e| panic!("{e}"));
            put(&etcd, &key, &g, &["--ignore-lease"]).await;
            tried += 1;
            moves_on(
                &c,
                2,
                &format!("the job moves on after garbage under {key}"),
            )
            .await;
        }
    }
    info!("{tried} bad values written");

    c.all_finish_at(UNTIL, Duration::from_secs(100)).await;
    let bad = check_trail(&c.audit.events(), TASKS, UNTIL);
    assert!(
        bad.is_empty(),
        "{} violations:\n{}",
        bad.len(),
        bad.join("\n")
    );
    assert_eq!(panics.load(Ordering::SeqCst), 0, "something panicked");
}

/// The task a node acts as primary of.
fn acting_primary(s: &taskgraph::NodeStatus) -> Option<u32> {
    match s.role {
        taskgraph::Role::Primary { task, .. } if s.acting => Some(task),
        _ => None,
    }
}

/// A claim etcd applied but whose answer the node never got (its request timed out): a valid
/// slot key under the node's live lease that is not the node's slot. The node must delete it,
/// or the task has a "primary" that never acts, and a spare never takes it, for as long as the
/// node lives. Here such a key is planted for a free task under a running primary's lease;
/// a spare that joins afterwards must get the task and the job must run to its end. (The
/// primary watches only its own and its neighbours' slot keys, so it finds the key by listing
/// the keys under its lease: at once after a claim without an answer, and every few seconds as
/// a safety net, which is what catches this planted one.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_applied_without_an_answer_does_not_block_its_slot() {
    init_logs();
    let etcd = Etcd::start().await.unwrap();
    let job = job_name("stray");
    let mut cfg = ClusterConfig::new(etcd.endpoints(), &job, 3, 1);
    cfg.app = App::Dataflow {
        until: 30,
        pace_ms: 10,
    };
    // Two nodes for three tasks: task 2 (or another) stays free until a third node comes.
    let mut c = Cluster::new(cfg);
    for _ in 0..2 {
        c.add_node().await.unwrap();
    }
    let st = c
        .wait_until("two tasks have a primary", WAIT, |s| {
            s.iter()
                .filter(|(_, s)| acting_primary(s).is_some())
                .count()
                == 2
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let served: Vec<u32> = st.iter().filter_map(|(_, s)| acting_primary(s)).collect();
    let free = (0..3).find(|t| !served.contains(t)).unwrap();
    // The holder record and lease of node 0, as its claim would have written them.
    let keys = taskgraph::testing::etcd::keys::JobKeys::new(&job);
    let node = c.node_id(0).unwrap();
    let mut client = etcd.client().await.unwrap();
    let record = client.get(keys.node(&node), None).await.unwrap();
    let record = record.kvs().first().expect("node 0's record");
    let addr: serde_json::Value = serde_json::from_slice(record.value()).unwrap();
    let holder = serde_json::json!({ "node": node, "addr": addr["addr"] });
    info!(
        free,
        node,
        lease = record.lease(),
        "planting a claim without an answer"
    );
    client
        .put(
            keys.primary(free),
            serde_json::to_vec(&holder).unwrap(),
            Some(etcd_client::PutOptions::new().with_lease(record.lease())),
        )
        .await
        .unwrap();
    // A spare joins: it can take the task only once node 0 has deleted the stray key.
    let spare = c.add_node().await.unwrap();
    c.wait_until("the new node serves the free task", WAIT, |s| {
        s.iter()
            .any(|(i, s)| *i == spare && s.primary_of(free).is_some())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    for i in 0..c.len() {
        let exit = tokio::time::timeout(WAIT, c.wait(i)).await.unwrap();
        assert_eq!(
            exit.map(|r| r.unwrap_or_else(|e| panic!("node {i}: {e}"))),
            Some(NodeExit::JobFinished { epoch: 30 }),
            "node {i}"
        );
    }
}
