//! The job watch against a real etcd: ranges that only grow keep their watches on the open
//! stream (a drafted spare's), and the event loop still sees what a full read would show: the
//! new generation's snapshot, then every later change of every range once, in order.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use taskgraph::testing::etcd::keys::JobKeys;
use taskgraph::testing::watch::{follow, follow_registered, JobEvent, KeyRange, WatchRanges};
use taskgraph_tests::etcd::Etcd;
use taskgraph_tests::prometheus::Scrape;
use taskgraph_tests::{http_get, init_logs, job_name};
use tokio::sync::{mpsc, watch};

const WAIT: Duration = Duration::from_secs(20);

/// Changes of the kept range.
const LAST: u64 = 200;

fn single(key: String) -> KeyRange {
    KeyRange { key, end: None }
}

/// Watch creations (and any other message) etcd received on watch streams.
async fn watch_messages(etcd: &Etcd) -> f64 {
    let response = http_get(&etcd.metrics_url()).await;
    let page = response.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    Scrape::parse(page).expect("etcd's metrics").sum(
        "grpc_server_msg_received_total",
        &[("grpc_method", "Watch")],
    )
}

async fn next(rx: &mut mpsc::Receiver<JobEvent>) -> JobEvent {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("a watch event in time")
        .expect("the watch runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_that_grow_keep_their_watches_and_every_later_change_arrives_once() {
    init_logs();
    let etcd = Etcd::start().await.expect("start etcd");
    let job = job_name("watch");
    let keys = JobKeys::new(&job);
    let (a, b, c) = (keys.epoch(), keys.spec(), keys.node("n"));
    let mut client = etcd.client().await.unwrap();
    client.put(a.as_str(), "0", None).await.unwrap();
    client.put(b.as_str(), "b0", None).await.unwrap();
    let before = watch_messages(&etcd).await;

    let (ranges, wanted) = watch::channel(WatchRanges {
        generation: 0,
        ranges: vec![single(a.clone()), single(b.clone())],
    });
    let (mut rx, task) = follow(&etcd.endpoints(), &job, wanted).await.unwrap();
    match next(&mut rx).await {
        JobEvent::Snapshot {
            kvs, generation: 0, ..
        } => assert_eq!(kvs.len(), 2, "{kvs:?}"),
        other => panic!("first a snapshot of generation 0: {other:?}"),
    }

    // A kept range changes all the time while the ranges grow by `c`: the watch's stream holds
    // changes of it that the new snapshot holds too (those must not be sent again).
    let (written_tx, mut written) = watch::channel(0u64);
    let writer = {
        let (mut client, a) = (etcd.client().await.unwrap(), a.clone());
        tokio::spawn(async move {
            for i in 1..=LAST {
                client.put(a.as_str(), i.to_string(), None).await.unwrap();
                written_tx.send_replace(i);
            }
        })
    };
    written.wait_for(|n| *n >= LAST / 4).await.unwrap();
    ranges.send_replace(WatchRanges {
        generation: 1,
        ranges: vec![single(a.clone()), single(b.clone()), single(c.clone())],
    });
    writer.await.unwrap();
    client.put(c.as_str(), "c1", None).await.unwrap();
    client.delete(b.as_str(), None).await.unwrap();

    // Read until the last changes of all three keys came after the new snapshot.
    let mut events = Vec::new();
    let mut snapshot: Option<(i64, Vec<taskgraph::testing::watch::Kv>)> = None;
    let (mut last_a, mut seen_c, mut seen_b_gone) = (false, false, false);
    while !(last_a && seen_c && seen_b_gone) {
        let ev = next(&mut rx).await;
        match &ev {
            JobEvent::Snapshot {
                generation: 1,
                revision,
                kvs,
            } => {
                assert!(snapshot.is_none(), "one snapshot of generation 1");
                snapshot = Some((*revision, kvs.clone()));
            }
            JobEvent::Snapshot { .. } | JobEvent::Disconnected => panic!("{ev:?}"),
            JobEvent::Put(kv) if snapshot.is_some() => {
                last_a |= kv.key == a.as_bytes() && kv.value == LAST.to_string().as_bytes();
                seen_c |= kv.key == c.as_bytes();
            }
            JobEvent::Delete { key, .. } if snapshot.is_some() => {
                seen_b_gone |= key.as_slice() == b.as_bytes();
            }
            _ => {}
        }
        events.push(ev);
    }
    let (x, kvs) = snapshot.expect("a snapshot of generation 1");
    let split = events
        .iter()
        .position(|e| matches!(e, JobEvent::Snapshot { .. }))
        .unwrap();
    // Before the snapshot: changes of `a` only (the ranges then), in order.
    let value = |v: &[u8]| -> u64 { std::str::from_utf8(v).unwrap().parse().unwrap() };
    let mut last = 0;
    for e in &events[..split] {
        let JobEvent::Put(kv) = e else {
            panic!("before the snapshot: {e:?}")
        };
        assert_eq!(kv.key, a.as_bytes());
        assert!(value(&kv.value) > last, "in order: {events:?}");
        last = value(&kv.value);
    }
    // After it: only changes past its revision, each once, `a`'s following on from the value
    // the snapshot holds without a gap.
    let in_snapshot = kvs
        .iter()
        .find(|kv| kv.key == a.as_bytes())
        .map(|kv| value(&kv.value))
        .expect("a in the snapshot");
    let mut next_a = in_snapshot + 1;
    let (mut cs, mut deletes) = (0, 0);
    for e in &events[split + 1..] {
        match e {
            JobEvent::Put(kv) => {
                assert!(
                    kv.mod_revision > x,
                    "a change the snapshot holds: {e:?} (read at {x})"
                );
                if kv.key == a.as_bytes() {
                    assert_eq!(value(&kv.value), next_a, "after the snapshot: {events:?}");
                    next_a += 1;
                } else {
                    assert_eq!(kv.key, c.as_bytes(), "{e:?}");
                    cs += 1;
                }
            }
            JobEvent::Delete { key, revision } => {
                assert!(*revision > x, "{e:?} (read at {x})");
                assert_eq!(key.as_slice(), b.as_bytes());
                deletes += 1;
            }
            other => panic!("after the snapshot: {other:?}"),
        }
    }
    assert_eq!(next_a, LAST + 1, "every change of a: {events:?}");
    assert_eq!((cs, deletes), (1, 1), "{events:?}");

    // etcd was asked for three watches (a and b, then c on the same stream), not five.
    task.abort();
    drop(rx);
    assert_eq!(watch_messages(&etcd).await - before, 3.0);
}

/// A joining node's watch starts from its registration's read: the registration and the read
/// of its ranges are one transaction, whose revision is the first snapshot's; the snapshot holds
/// the record just written, and every change after it arrives once, in order, with none lost
/// between the read and the watches' creation (another client writes all the while).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_that_starts_from_the_registrations_read_loses_and_repeats_nothing() {
    init_logs();
    let etcd = Etcd::start().await.expect("start etcd");
    let job = job_name("firstread");
    let keys = JobKeys::new(&job);
    let epoch = keys.epoch();
    let mut client = etcd.client().await.unwrap();
    client.put(epoch.as_str(), "0", None).await.unwrap();
    client.put(keys.spec().as_str(), "{}", None).await.unwrap();
    // Writes the epoch key 1, 2, … until told to stop; returns the last value written.
    let (stop_tx, stop) = watch::channel(false);
    let (written_tx, mut written) = watch::channel(0u64);
    let writer = {
        let (mut client, epoch) = (etcd.client().await.unwrap(), epoch.clone());
        tokio::spawn(async move {
            let mut i = 0;
            while !*stop.borrow() {
                i += 1;
                client
                    .put(epoch.as_str(), i.to_string(), None)
                    .await
                    .unwrap();
                written_tx.send_replace(i);
            }
            i
        })
    };
    written.wait_for(|n| *n >= 10).await.unwrap();
    let before = watch_messages(&etcd).await;
    let (_ranges, wanted) = watch::channel(WatchRanges {
        generation: 0,
        ranges: keys.spare_watch("n1"),
    });
    let (registered, mut rx, task) = follow_registered(&etcd.endpoints(), &job, "n1", 10, wanted)
        .await
        .unwrap();
    let value = |v: &[u8]| -> u64 { std::str::from_utf8(v).unwrap().parse().unwrap() };
    let first = match next(&mut rx).await {
        JobEvent::Snapshot {
            kvs,
            revision,
            generation: 0,
        } => {
            assert_eq!(revision, registered, "the registration's read");
            let record = kvs
                .iter()
                .find(|kv| kv.key == keys.node("n1").as_bytes())
                .expect("the record just written is in the read");
            assert_eq!(record.mod_revision, registered);
            assert_ne!(record.lease, 0, "written under its lease");
            assert!(kvs.iter().any(|kv| kv.key == keys.spec().as_bytes()));
            let e = kvs
                .iter()
                .find(|kv| kv.key == epoch.as_bytes())
                .expect("the epoch in the read");
            assert!(e.mod_revision < registered);
            value(&e.value)
        }
        other => panic!("first the registration's read: {other:?}"),
    };
    // Every change after the read, once and in order: 50 while the writer goes on, then the
    // rest once it stopped.
    let mut expected = first + 1;
    let mut writer = Some(writer);
    let mut last = None;
    loop {
        if expected == first + 50 {
            if let Some(writer) = writer.take() {
                stop_tx.send_replace(true);
                last = Some(writer.await.unwrap());
            }
        }
        if last.is_some_and(|last| expected > last) {
            break;
        }
        match next(&mut rx).await {
            JobEvent::Put(kv) if kv.key == epoch.as_bytes() => {
                assert!(kv.mod_revision > registered);
                assert_eq!(value(&kv.value), expected, "each change once, in order");
                expected += 1;
            }
            other => panic!("only the epoch changes (waiting for {expected}): {other:?}"),
        }
    }
    // Its watches were created once, on one stream, with no read of its own: four watches.
    assert_eq!(watch_messages(&etcd).await - before, 4.0);
    task.abort();
}
