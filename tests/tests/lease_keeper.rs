//! The lease keeper (`taskgraph::testing::lease::keep_alive`) against a real etcd: a slow answer
//! is not a broken stream. etcd paused (SIGSTOP) past the keeper's local deadline but shorter
//! than the TTL: the keeper steps down locally, keeps its ONE keep-alive stream, and the lease
//! survives in etcd and is `Alive` again once etcd answers. etcd killed and restarted (a broken
//! stream): the keeper opens a new stream and keeps the lease (etcd restores leases on restart).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use taskgraph::testing::lease::{keep_alive, LeaseState};
use taskgraph_tests::etcd::Etcd;
use taskgraph_tests::{http_get, init_logs, job_name};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::info;

/// Bound on every wait for the keeper (never reached unless the test fails).
const WAIT: Duration = Duration::from_secs(30);

/// The sum of etcd's counter `name` over every label set whose labels contain `labels`.
async fn etcd_counter(etcd: &Etcd, name: &str, labels: &str) -> f64 {
    let body = http_get(&etcd.metrics_url()).await;
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| l.contains(labels))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// LeaseKeepAlive streams etcd has started since it was started.
async fn keepalive_streams(etcd: &Etcd) -> f64 {
    etcd_counter(
        etcd,
        "grpc_server_started_total",
        "grpc_method=\"LeaseKeepAlive\"",
    )
    .await
}

/// Waits until the keeper publishes `Alive` with a deadline later than `after`; returns that
/// deadline.
async fn renewed_after(rx: &mut watch::Receiver<LeaseState>, after: Instant) -> Instant {
    let state = *tokio::time::timeout(
        WAIT,
        rx.wait_for(|s| matches!(s, LeaseState::Alive { deadline, .. } if *deadline > after)),
    )
    .await
    .expect("the keeper renewed the lease")
    .expect("the keeper is running");
    match state {
        LeaseState::Alive { deadline, .. } => deadline,
        other => panic!("not alive: {other:?}"),
    }
}

/// Waits until the keeper publishes `Alive`; returns its deadline.
async fn alive(rx: &mut watch::Receiver<LeaseState>) -> Instant {
    let state = *tokio::time::timeout(WAIT, rx.wait_for(|s| matches!(s, LeaseState::Alive { .. })))
        .await
        .expect("the keeper published the grant")
        .expect("the keeper is running");
    match state {
        LeaseState::Alive { deadline, .. } => deadline,
        other => panic!("not alive: {other:?}"),
    }
}

/// Sends `sig` (`STOP`, `CONT`) to etcd, through the `kill` command (no `unsafe`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_etcd_is_slow_not_broken_the_keeper_keeps_one_stream_and_the_lease() {
    init_logs();
    let etcd = Etcd::start().await.unwrap();
    // TTL 10 s: keep-alives every 3.3 s, local deadline 8 s after a keep-alive's send, etcd's
    // expiry 10 s after it received one.
    let ttl = Duration::from_secs(10);
    let (id, granted, mut rx, keeper) =
        keep_alive(&etcd.endpoints(), &job_name("leasekeeper"), ttl)
            .await
            .unwrap();
    assert_eq!(granted, 10);
    // The keeper's first state is `Suspended` until its task has published the grant's
    // deadline; a renewal is a later deadline than that. (Waiting for any deadline past `grant
    // time + ttl − margin` instead matched the grant's own state at once, before the keeper had
    // opened its stream: CI saw zero streams.)
    let granted_deadline = alive(&mut rx).await;
    info!("--- the keeper renews the lease twice on its stream");
    let first = renewed_after(&mut rx, granted_deadline).await;
    let streams_before = keepalive_streams(&etcd).await;
    assert_eq!(
        streams_before, 1.0,
        "one keep-alive stream since etcd started"
    );
    let expired_before = etcd_counter(&etcd, "etcd_debugging_server_lease_expired_total", "").await;
    // Right after a renewal: its keep-alive was sent at `deadline − (ttl − margin)`, and etcd
    // received it at about that time, so etcd keeps the lease until about `deadline + margin`.
    let deadline = renewed_after(&mut rx, first).await;

    info!("--- etcd paused past the keeper's local deadline, resumed before etcd's expiry");
    etcd.signal("STOP");
    // The keeper, not etcd, must notice the deadline: it steps down while etcd is paused.
    let suspended = tokio::time::timeout(
        WAIT,
        rx.wait_for(|s| matches!(s, LeaseState::Suspended { .. })),
    )
    .await;
    // Resumed 0.8 s after the local deadline (the TTL's margin is 2 s): the keep-alives sent
    // during the pause were not answered in time, which the keeper before this test treated as
    // a broken stream.
    tokio::time::sleep_until(deadline + Duration::from_millis(800)).await;
    etcd.signal("CONT");
    assert!(
        suspended.is_ok_and(|r| r.is_ok()),
        "the keeper stepped down at its local deadline while etcd was paused"
    );

    info!("--- etcd answers the keep-alives queued on the same stream: the lease is alive again");
    renewed_after(&mut rx, deadline).await;
    assert_eq!(
        keepalive_streams(&etcd).await,
        streams_before,
        "the keeper kept its one keep-alive stream across the slow answers"
    );
    let mut client = etcd.client().await.unwrap();
    let ttl_left = client.lease_time_to_live(id.0, None).await.unwrap().ttl();
    assert!(
        ttl_left > 0,
        "the lease survived in etcd (TTL left {ttl_left})"
    );
    assert_eq!(
        etcd_counter(&etcd, "etcd_debugging_server_lease_expired_total", "").await,
        expired_before,
        "no lease expired"
    );

    info!("--- etcd killed and restarted (a broken stream): the keeper opens a new one");
    let before_kill = renewed_after(&mut rx, Instant::now()).await;
    etcd.kill().await.unwrap();
    etcd.restart().await.unwrap();
    // etcd restores its leases with their full TTL on restart; the new process counts its
    // streams from zero.
    renewed_after(&mut rx, before_kill).await;
    assert!(
        keepalive_streams(&etcd).await >= 1.0,
        "a new keep-alive stream after the restart"
    );
    assert!(!keeper.is_finished(), "the keeper still runs");
    keeper.abort();
}

/// Keep-alive messages etcd has received since it was started.
async fn keepalives_received(etcd: &Etcd) -> f64 {
    etcd_counter(
        etcd,
        "grpc_server_msg_received_total",
        "grpc_method=\"LeaseKeepAlive\"",
    )
    .await
}

/// One keep-alive per interval, none for nothing: the grant sets etcd's expiry, so the first
/// keep-alive goes out one interval after it, and the one that opens the stream is that
/// interval's renewal (the keeper does not send a second at once). 2,048 nodes joining a job
/// together each sent two keep-alives in their first second for nothing before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_renewal_costs_one_keep_alive_the_stream_opens_with_the_first() {
    init_logs();
    let etcd = Etcd::start().await.unwrap();
    // TTL 6 s: a keep-alive every 2 s, ample time to read etcd's counter between two.
    let ttl = Duration::from_secs(6);
    let (_id, granted, mut rx, keeper) =
        keep_alive(&etcd.endpoints(), &job_name("keepalives"), ttl)
            .await
            .unwrap();
    assert_eq!(granted, 6);
    let granted_deadline = alive(&mut rx).await;
    assert_eq!(
        keepalives_received(&etcd).await,
        0.0,
        "no keep-alive right after the grant"
    );
    let first = renewed_after(&mut rx, granted_deadline).await;
    assert_eq!(
        keepalives_received(&etcd).await,
        1.0,
        "the first renewal is the keep-alive that opened the stream"
    );
    assert_eq!(keepalive_streams(&etcd).await, 1.0);
    renewed_after(&mut rx, first).await;
    assert_eq!(
        keepalives_received(&etcd).await,
        2.0,
        "the second renewal is the stream's second keep-alive"
    );
    assert_eq!(keepalive_streams(&etcd).await, 1.0, "still one stream");
    keeper.abort();
}

/// The keep-alive that opens the stream renews the lease from the time it was *sent*, not from
/// its answer: etcd renewed the lease at some instant between the two, so only the send is a
/// safe start for the local deadline. etcd is paused across the first keep-alive's send and
/// resumed 2 s later. A deadline taken from the answer would be at least
/// `resumed + ttl − margin`: later than the send allows by the whole pause, so a primary could
/// still act in its slot after etcd expired its lease and a backup took over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keep_alive_that_opens_the_stream_renews_from_its_send_not_its_answer() {
    init_logs();
    let etcd = Etcd::start().await.unwrap();
    // TTL 12 s: margin 2.4 s, the first keep-alive 4 s after the grant (it opens the stream),
    // the grant's deadline 9.6 s after it. etcd resumes 6 s after the grant: the stream's open
    // waits for an answer until the grant's deadline (3.6 s more), and the next keep-alive is
    // due 8 s after the grant, so etcd's counter is read between the two.
    let ttl = Duration::from_secs(12);
    let margin = taskgraph::testing::lease::margin(ttl);
    let (_id, granted, mut rx, keeper) = keep_alive(&etcd.endpoints(), &job_name("opensend"), ttl)
        .await
        .unwrap();
    assert_eq!(granted, 12);
    let granted_deadline = alive(&mut rx).await;
    // The grant was sent at `granted_deadline − (ttl − margin)` at the latest; its first
    // keep-alive goes out one interval (4 s) later, while etcd is paused.
    let granted_at = granted_deadline - (ttl - margin);
    etcd.signal("STOP");
    tokio::time::sleep_until(granted_at + Duration::from_secs(6)).await;
    let resumed = Instant::now();
    etcd.signal("CONT");
    let deadline = renewed_after(&mut rx, granted_deadline).await;
    assert_eq!(
        keepalives_received(&etcd).await,
        1.0,
        "the renewal is the keep-alive that opened the stream"
    );
    assert!(
        deadline < resumed + ttl - margin,
        "the deadline ({:?} after the resume) counts from the keep-alive's send, before the \
         resume, not from its answer",
        deadline.saturating_duration_since(resumed)
    );
    keeper.abort();
}
