//! Network partitions: the primary of a task runs inside its own network namespace (see
//! `taskgraph_tests::netfault`), joined to the host by a veth link; the test cuts the link
//! mid-job, isolating that primary from etcd and from every peer at once, then heals it.
//! The isolated primary must stop acting by its local deadline, a backup must take over with a
//! higher term, healing must not produce two primaries, and the job must finish with an exact
//! audit trail. Needs root (CI runs as root): a namespace that cannot be made fails the test.
//! A second test cuts the primary off from etcd alone (through a forwarder the test cuts):
//! its peers still reach it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;

use taskgraph_tests::etcd::Etcd;
use taskgraph_tests::fleet::{
    assert_all_finish, assert_trail_with_cut_root, dump, holds_slot, max_epoch,
    overlapping_status_spans, stale_actions, statuses, wait_all, wait_staffed_at, Job, Proc, WAIT,
};
use taskgraph_tests::netfault::Netns;
use taskgraph_tests::process::{now_us, Arrivals, Placement};
use taskgraph_tests::proxy::Proxy;
use taskgraph_tests::{init_logs, job_name};
use tracing::info;

const BIN: &str = env!("CARGO_BIN_EXE_testnode");

/// How the test cuts the primary off.
enum Isolation {
    /// Its own network namespace: cut off from etcd and from every peer.
    Netns(Netns),
    /// etcd reached through a forwarder that is cut: peers still reach the node.
    EtcdOnly,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_primary_stops_acting_a_backup_takes_over_and_healing_makes_no_second_primary()
{
    init_logs();
    let ns = Netns::create()
        .unwrap_or_else(|e| panic!("this test needs network namespaces (root and `ip`); {e}"));
    isolate_a_primary(Isolation::Netns(ns)).await;
}

/// The same with the primary cut off from etcd alone (its peers still reach it and it them):
/// it must step down all the same, and rejoin once etcd is back. Needs no root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_cut_off_from_etcd_alone_steps_down_and_rejoins() {
    init_logs();
    isolate_a_primary(Isolation::EtcdOnly).await;
}

async fn isolate_a_primary(isolation: Isolation) {
    let etcd = Etcd::start().await.expect("start etcd");
    let host_ip: std::net::IpAddr = match &isolation {
        Isolation::Netns(ns) => ns.host_ip().into(),
        Isolation::EtcdOnly => std::net::Ipv4Addr::LOCALHOST.into(),
    };
    // The isolated node reaches etcd through a forwarder (on the host's end of the link).
    let proxy = Proxy::start(SocketAddr::new(host_ip, 0), etcd.socket_addr())
        .await
        .expect("start the etcd forwarder");
    let (tasks, until) = (3, 400);
    let job = Job {
        bin: BIN.into(),
        etcd: etcd.endpoints(),
        name: job_name("partition"),
        tasks,
        replicas: 2,
        ttl_secs: 2,
        until,
        pace_ms: 20,
        held: true,
    };
    let arrivals = Arrivals::default();
    // Host nodes listen on the host's end of the link, so the isolated node can reach them
    // (before the cut) and they it.
    let (on_host, in_ns) = match &isolation {
        Isolation::Netns(ns) => (
            Placement {
                netns: None,
                listen: Some(format!("{}:0", ns.host_ip())),
            },
            Placement {
                netns: Some(ns.name().to_owned()),
                listen: Some(format!("{}:0", ns.ns_ip())),
            },
        ),
        Isolation::EtcdOnly => (Placement::default(), Placement::default()),
    };

    info!("--- start the node in the namespace first: it takes a primary slot");
    let mut isolated = Proc::spawn(
        &job,
        "isolated".into(),
        &arrivals,
        &in_ns,
        Some(vec![format!("http://{}", proxy.addr())]),
    );
    let snap = wait_all(
        &[&isolated],
        "the namespaced node is a primary",
        WAIT,
        |all| statuses(&all[0]).any(|s| s.role == "primary" && s.acting),
    )
    .await;
    let first = statuses(&snap[0])
        .rev()
        .find(|s| s.role == "primary" && s.acting)
        .cloned()
        .unwrap();
    let (task, old_term) = (first.task.unwrap(), first.term.unwrap());
    let mut nodes: Vec<Proc> = (0..tasks * 2 - 1)
        .map(|i| Proc::spawn(&job, format!("h{i}"), &arrivals, &on_host, None))
        .collect();
    {
        let mut all: Vec<&Proc> = nodes.iter().collect();
        all.push(&isolated);
        let st = wait_staffed_at(&all, 5).await;
        assert_eq!(
            st.last().and_then(|s| s.primary_of(task)),
            Some(old_term),
            "the namespaced node still is the primary of task {task}{}",
            dump(&all)
        );
    }

    info!("--- cut the link: the primary of task {task} (term {old_term}) is isolated");
    let cut_at = now_us();
    match &isolation {
        Isolation::Netns(ns) => ns
            .cut()
            .unwrap_or_else(|e| panic!("cannot cut the link: {e}")),
        Isolation::EtcdOnly => proxy.cut(),
    }
    let snap = wait_all(
        &[&isolated],
        "the isolated primary stops acting",
        WAIT,
        |all| {
            statuses(&all[0])
                .last()
                .is_some_and(|s| s.primary_of(task).is_none())
        },
    )
    .await;
    drop(snap);
    let host: Vec<&Proc> = nodes.iter().collect();
    let snap = wait_all(
        &host,
        "a backup acts as primary with a higher term",
        WAIT,
        |all| {
            all.iter().any(|l| {
                statuses(l)
                    .last()
                    .is_some_and(|s| s.primary_of(task).is_some_and(|t| t > old_term))
            })
        },
    )
    .await;
    let at = max_epoch(&snap);
    wait_all(
        &host,
        "the job moves on without the isolated node",
        WAIT,
        |all| max_epoch(all) >= at + 5,
    )
    .await;
    // Nothing the isolated node printed after the cut shows it acting as primary past its
    // first status change (checked in full by `two_primaries` below).
    let after = isolated.node.lines_after(cut_at);
    let acting_late = statuses(&after)
        .skip_while(|s| s.primary_of(task).is_some())
        .any(|s| s.primary_of(task) == Some(old_term));
    assert!(!acting_late, "the isolated node acted again: {after:#?}");

    info!("--- heal the link");
    match &isolation {
        Isolation::Netns(ns) => ns
            .heal()
            .unwrap_or_else(|e| panic!("cannot heal the link: {e}")),
        Isolation::EtcdOnly => proxy.heal(),
    }
    wait_all(
        &[&isolated],
        "the healed node holds a slot again, not its old term",
        WAIT,
        |all| {
            holds_slot(&all[0])
                && statuses(&all[0])
                    .last()
                    .is_some_and(|s| s.primary_of(task) != Some(old_term))
        },
    )
    .await;
    let all: Vec<&Proc> = nodes.iter().chain([&isolated]).collect();
    let at = wait_all(&all, "the job moves on after healing", WAIT, |_| true).await;
    let at = max_epoch(&at);
    wait_all(&all, "the job moves on after healing", WAIT, |all| {
        max_epoch(all) >= at + 5
    })
    .await;

    info!("--- let the job end");
    for n in nodes.iter_mut().chain([&mut isolated]) {
        n.release().await;
    }
    {
        let mut all: Vec<&mut Proc> = nodes.iter_mut().chain([&mut isolated]).collect();
        assert_all_finish(&mut all, until).await;
    }
    let all: Vec<&Proc> = nodes.iter().chain([&isolated]).collect();
    let bad = stale_actions(&all);
    assert!(bad.is_empty(), "{}{}", bad.join("\n"), dump(&all));
    // ...and no observer saw two: a node shows `acting: false` from its local deadline on.
    let bad = overlapping_status_spans(&all);
    assert!(bad.is_empty(), "{}{}", bad.join("\n"), dump(&all));
    // A root cut off while it acted may have recorded the result of its epoch before its
    // successor entered that epoch again.
    let cut_root = (task == 0).then_some(old_term);
    assert_trail_with_cut_root(&all, tasks, until, cut_root);
}
