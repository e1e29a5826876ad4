//! Hostile peers on the wire, beyond `exchange_input.rs` (another job, unknown tasks,
//! malformed, inconsistent and oversized frames, stale terms): forged *higher* terms on metas,
//! pulls and replication (they must not fence off the real primary), epochs far in the future
//! and at `u64::MAX` (held or refused, never answered early), and a flood of future-epoch pulls
//! and metas past the node's bound on held messages. The job (dataflow, in-process nodes) must
//! keep running and finish with an exact audit trail; nothing may panic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use taskgraph::testing::etcd::keys::{EpochValue, Holder, JobKeys};
use taskgraph::testing::wire::{
    CallError, ClientConfig, Header, Meta, Peers, PullRequest, Rejection, Replicate, ReplicateKind,
};
use taskgraph::{Bytes, Epoch, NodeExit, TaskId, Term};
use taskgraph_tests::cluster::{App, Cluster, ClusterConfig};
use taskgraph_tests::dataflow::check_trail;
use taskgraph_tests::etcd::Etcd;
use taskgraph_tests::{init_logs, job_name};
use tracing::info;

const WAIT: Duration = Duration::from_secs(60);
const TASKS: u32 = 3;
const UNTIL: Epoch = 60;
/// Sequence numbers far above the job's own, so a probe never aliases one of its pulls.
const PROBE_SEQ: u64 = 1 << 40;
/// More than the node holds of later epochs (`MAX_EARLY` in the framework).
const FLOOD: usize = 4200;

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

async fn slot(client: &etcd_client::Client, key: &str) -> (Holder, Term) {
    let resp = client.clone().get(key, None).await.expect("etcd get");
    let kv = resp.kvs().first().unwrap_or_else(|| panic!("no {key}"));
    let holder: Holder = serde_json::from_slice(kv.value()).expect("a holder as JSON");
    (holder, Term::try_from(kv.create_revision()).unwrap())
}

async fn epoch(client: &etcd_client::Client, keys: &JobKeys) -> Epoch {
    let resp = client.clone().get(keys.epoch(), None).await.unwrap();
    let kv = resp.kvs().first().expect("an epoch");
    EpochValue::parse(kv.value())
        .expect("a valid epoch")
        .epoch()
}

fn header(job: &str, epoch: Epoch, from: TaskId, to: TaskId, term: Term) -> Header {
    Header {
        job: job.to_owned(),
        epoch,
        from_task: from,
        to_task: to,
        term,
    }
}

fn pull(h: Header, seq: u64, method: &str) -> PullRequest {
    PullRequest {
        header: h,
        seq,
        method: method.to_owned(),
        payload: Bytes::new(),
        delivered_below: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_terms_and_future_epochs_are_refused_and_the_job_stays_exact() {
    init_logs();
    let panics = count_panics();
    let etcd = Etcd::start().await.expect("start etcd");
    let mut cfg = ClusterConfig::new(etcd.endpoints(), &job_name("wire"), TASKS, 2);
    cfg.app = App::Dataflow {
        until: UNTIL,
        pace_ms: 20,
    };
    let job = cfg.job.clone();
    let mut c = Cluster::start_staffed(cfg, (TASKS * 2) as usize)
        .await
        .unwrap();
    c.wait_until("epoch 3", WAIT, |s| {
        s.iter().any(|(_, s)| s.epoch.is_some_and(|e| e >= 3))
    })
    .await
    .unwrap();

    info!("--- hold the job at one epoch while the probes run");
    c.audit.close_gate();
    let client = etcd.client().await.unwrap();
    let keys = JobKeys::new(&job);
    let (p0, t0) = slot(&client, &keys.primary(0)).await;
    let (_, t1) = slot(&client, &keys.primary(1)).await;
    let (b0, _) = slot(&client, &keys.backup(0, 1)).await;
    let peers = Peers::new(ClientConfig::new(job.clone()));
    let e = epoch(&client, &keys).await;

    info!("--- forged higher terms: not believed");
    for forged in [t1 + 1, t1 + 1_000_000, Term::MAX] {
        let meta = Meta {
            header: header(&job, e, 1, 0, forged),
            link: "parents".into(),
            meta: "forged".into(),
        };
        assert_eq!(
            peers.meta(&p0.addr, meta).await.unwrap_err(),
            CallError::Rejected(Rejection::NotPrimary { task: 1 }),
            "a meta under forged term {forged}"
        );
        let r = peers
            .pull(
                &p0.addr,
                pull(header(&job, e, 1, 0, forged), PROBE_SEQ, "param"),
            )
            .await;
        assert_eq!(
            r.unwrap_err(),
            CallError::Rejected(Rejection::NotPrimary { task: 1 }),
            "a pull under forged term {forged}"
        );
    }
    for forged in [t0 + 1, t0 + 1_000_000, Term::MAX] {
        for kind in [ReplicateKind::Snapshot, ReplicateKind::Update] {
            let msg = Replicate {
                header: header(&job, e, 0, 0, forged),
                index: 1,
                kind,
                data: Bytes::from_static(b"\xffforged state"),
            };
            assert_eq!(
                peers.replicate(&b0.addr, msg).await.unwrap_err(),
                CallError::Rejected(Rejection::NotPrimary { task: 0 }),
                "replication under forged term {forged}"
            );
        }
    }
    // The real term still passes: the forged ones fenced nothing off.
    let real = peers
        .pull(
            &p0.addr,
            pull(header(&job, e, 1, 0, t1), PROBE_SEQ, "param"),
        )
        .await;
    assert!(
        real.is_ok() || matches!(real, Err(CallError::Rejected(Rejection::EpochMoved { .. }))),
        "a pull under task 1's real term {t1}: {real:?}"
    );

    info!("--- epochs far ahead and at u64::MAX: held (no answer) or refused, never answered");
    for future in [e + 1000, Epoch::MAX - 1, Epoch::MAX] {
        let r = tokio::time::timeout(
            Duration::from_millis(300),
            peers.pull(
                &p0.addr,
                pull(header(&job, future, 1, 0, t1), PROBE_SEQ + 1, "param"),
            ),
        )
        .await;
        match r {
            Err(_) | Ok(Err(CallError::Rejected(Rejection::NotReady { .. }))) => {}
            Ok(other) => panic!("a pull of epoch {future} was answered: {other:?}"),
        }
    }

    info!("--- a flood of {FLOOD} future-epoch metas, then as many pulls");
    use futures::StreamExt;
    let outcomes = |results: Vec<Result<(), CallError>>, what: &str, bounded: bool| {
        let (mut held, mut refused) = (0usize, 0usize);
        for r in results {
            match r {
                Ok(()) => held += 1,
                Err(CallError::Rejected(Rejection::NotReady { .. })) => refused += 1,
                Err(other) => panic!("a future-epoch {what}: {other:?}"),
            }
        }
        eprintln!("flood of {FLOOD} future-epoch {what}: {held} held, {refused} refused");
        if bounded {
            assert!(refused > 0, "the node held all {FLOOD} {what}");
        }
    };
    let metas: Vec<Result<(), CallError>> = futures::stream::iter(0..FLOOD)
        .map(|i| {
            let meta = Meta {
                header: header(&job, e + 500 + (i as u64 % 7), 1, 0, t1),
                link: "parents".into(),
                meta: format!("flood-{i}"),
            };
            let (peers, addr) = (peers.clone(), p0.addr.clone());
            async move { peers.meta(&addr, meta).await }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    outcomes(metas, "metas", true);
    // Held pulls stay open: each is given up after a while (the node then drops it). Given
    // up all at once, they may trip the server's HTTP/2 guard against mass stream resets,
    // which closes this client's connection: counted as held.
    // A fresh connection: the probes above gave up pulls (stream resets) on the first one.
    let flooder = Peers::new(ClientConfig::new(job.clone()));
    let pulls: Vec<Result<(), CallError>> = futures::future::join_all((0..FLOOD).map(|i| {
        let (peers, addr) = (flooder.clone(), p0.addr.clone());
        let req = pull(
            header(&job, e + 500 + (i as u64 % 7), 1, 0, t1),
            PROBE_SEQ + 10 + i as u64,
            "param",
        );
        async move {
            match tokio::time::timeout(Duration::from_secs(5), peers.pull(&addr, req)).await {
                Err(_) | Ok(Err(CallError::Unreachable { .. })) => Ok(()),
                Ok(Ok(answer)) => panic!("a future-epoch pull was answered: {answer:?}"),
                Ok(Err(e)) => Err(e),
            }
        }
    }))
    .await;
    // (Not asserted bounded: on a loaded machine some pulls reach the node only after the
    // client gave up on them, and count as held. The bound is the same as for metas.)
    outcomes(pulls, "pulls", false);

    info!("--- let the job run to its end");
    c.audit.open_gate();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(100);
    for i in 0..c.len() {
        match tokio::time::timeout_at(deadline, c.wait(i)).await {
            Ok(Some(r)) => assert_eq!(
                r.unwrap_or_else(|e| panic!("node {i} failed: {e}")),
                NodeExit::JobFinished { epoch: UNTIL },
                "node {i}"
            ),
            Ok(None) => {}
            Err(_) => {
                let statuses: Vec<_> = (0..c.len()).map(|j| (j, c.status(j))).collect();
                panic!("the job did not end: {statuses:#?}");
            }
        }
    }
    let events = c.audit.events();
    let bad = check_trail(&events, TASKS, UNTIL);
    assert!(
        bad.is_empty(),
        "{} violations:\n{}",
        bad.len(),
        bad.join("\n")
    );
    // Nothing forged reached a task.
    let forged: Vec<_> = events
        .iter()
        .filter(|(_, e)| format!("{e:?}").contains("forged") || format!("{e:?}").contains("flood-"))
        .collect();
    assert!(forged.is_empty(), "forged input reached a task: {forged:?}");
    assert_eq!(panics.load(Ordering::SeqCst), 0, "something panicked");
}

/// Raw gRPC frames: bodies sent as they are, answers read as bytes.
mod raw {
    use bytes::Bytes;
    use taskgraph_tests::raw_grpc::RawCodec;
    use tonic::codegen::http::uri::PathAndQuery;
    use tonic::transport::Channel;
    use tonic::Status;

    /// Sends `body` as one unary call to `path` at `addr`.
    pub async fn unary(
        channel: Channel,
        path: &'static str,
        body: Vec<u8>,
    ) -> Result<Bytes, Status> {
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        grpc.unary(
            tonic::Request::new(Bytes::from(body)),
            PathAndQuery::from_static(path),
            RawCodec,
        )
        .await
        .map(tonic::Response::into_inner)
    }

    /// Opens a lane at `path`, sends `frames` on it (then keeps it open) and reads answers
    /// until as many came as frames were sent, or the lane ended; their count.
    pub async fn lane(
        channel: Channel,
        path: &'static str,
        frames: Vec<Vec<u8>>,
    ) -> Result<usize, Status> {
        use futures::StreamExt;
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let sent = frames.len();
        let outgoing = futures::stream::iter(frames.into_iter().map(Bytes::from))
            .chain(futures::stream::pending());
        let mut answers = grpc
            .streaming(
                tonic::Request::new(outgoing),
                PathAndQuery::from_static(path),
                RawCodec,
            )
            .await?
            .into_inner();
        let mut count = 0;
        while count < sent {
            match answers.message().await? {
                Some(_) => count += 1,
                None => break,
            }
        }
        Ok(count)
    }
}

/// Protobuf wire-format pieces, to build frames field by field (valid, odd, or broken).
mod pb {
    pub fn varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    pub fn uint(field: u32, v: u64, out: &mut Vec<u8>) {
        varint(u64::from(field) << 3, out);
        varint(v, out);
    }
    pub fn bytes(field: u32, v: &[u8], out: &mut Vec<u8>) {
        varint((u64::from(field) << 3) | 2, out);
        varint(v.len() as u64, out);
        out.extend_from_slice(v);
    }
}

/// A random frame for one of the node's four methods: every field present or not, of a random
/// value (strings not always UTF-8, numbers at their extremes), unknown fields, and at times cut
/// short or with bytes flipped. The term is never a real one, so no frame can pass the fence.
fn random_frame(rng: &mut impl rand::Rng, job: &str, epoch: Epoch) -> Vec<u8> {
    let text = |rng: &mut dyn rand::RngCore| -> Vec<u8> {
        match rng.next_u32() % 5 {
            0 => job.as_bytes().to_vec(),
            1 => Vec::new(),
            2 => vec![0xff, 0xfe, b'x'],
            3 => "parents".into(),
            _ => (0..rng.next_u32() % 300)
                .map(|_| rng.next_u32() as u8)
                .collect(),
        }
    };
    let num = |rng: &mut dyn rand::RngCore| -> u64 {
        match rng.next_u32() % 6 {
            0 => 0,
            1 => u64::MAX,
            2 => epoch,
            3 => epoch + 1,
            4 => u64::from(rng.next_u32() % 8),
            _ => rng.next_u64(),
        }
    };
    let mut header = Vec::new();
    for field in 1..=5u32 {
        if rng.random_bool(0.8) {
            match field {
                1 => pb::bytes(1, &text(rng), &mut header),
                5 => {
                    let term = match rng.random_range(0..3) {
                        0 => 0,
                        1 => u64::MAX,
                        _ => (1 << 40) + u64::from(rng.next_u32()),
                    };
                    pb::uint(5, term, &mut header);
                }
                f => pb::uint(f, num(rng), &mut header),
            }
        }
    }
    let mut frame = Vec::new();
    if rng.random_bool(0.9) {
        pb::bytes(1, &header, &mut frame);
    }
    for field in 2..=4u32 {
        if rng.random_bool(0.7) {
            if rng.random_bool(0.5) {
                pb::uint(field, num(rng), &mut frame);
            } else {
                pb::bytes(field, &text(rng), &mut frame);
            }
        }
    }
    if rng.random_bool(0.2) {
        pb::uint(rng.random_range(5..1000), num(rng), &mut frame);
    }
    if rng.random_bool(0.15) && !frame.is_empty() {
        let cut = rng.random_range(0..frame.len());
        frame.truncate(cut);
    }
    if rng.random_bool(0.15) && !frame.is_empty() {
        let i = rng.random_range(0..frame.len());
        frame[i] ^= 1 << rng.random_range(0..8);
    }
    frame
}

/// A random message of a lane: a call number (often repeated), a random pull, meta or
/// replication entry (as [`random_frame`]), a cancel, or none of them, an answer limit; at
/// times random bytes.
fn random_lane_frame(rng: &mut impl rand::Rng, job: &str, epoch: Epoch) -> Vec<u8> {
    if rng.random_bool(0.05) {
        return (0..rng.random_range(0..64)).map(|_| rng.random()).collect();
    }
    let mut frame = Vec::new();
    if rng.random_bool(0.9) {
        pb::uint(1, rng.random_range(0..8), &mut frame);
    }
    match rng.random_range(0..7) {
        0..=2 => pb::bytes(2, &random_frame(rng, job, epoch), &mut frame),
        3 => pb::bytes(5, &random_frame(rng, job, epoch), &mut frame),
        4 => pb::bytes(6, &random_frame(rng, job, epoch), &mut frame),
        5 => pb::bytes(3, &[], &mut frame),
        _ => {}
    }
    if rng.random_bool(0.5) {
        let limit = match rng.random_range(0..3) {
            0 => 0,
            1 => u64::MAX,
            _ => u64::from(rng.next_u32()),
        };
        pb::uint(4, limit, &mut frame);
    }
    frame
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_raw_frames_are_refused_and_the_job_stays_exact() {
    use rand::{Rng, SeedableRng};
    init_logs();
    let panics = count_panics();
    let seed: u64 = std::env::var("TASKGRAPH_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let cases: usize = std::env::var("TASKGRAPH_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(800);
    eprintln!("raw frame fuzz: seed {seed} (TASKGRAPH_FUZZ_SEED), {cases} frames");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let etcd = Etcd::start().await.expect("start etcd");
    let mut cfg = ClusterConfig::new(etcd.endpoints(), &job_name("wirefuzz"), TASKS, 2);
    cfg.app = App::Dataflow {
        until: UNTIL,
        pace_ms: 20,
    };
    let job = cfg.job.clone();
    let mut c = Cluster::start_staffed(cfg, (TASKS * 2) as usize)
        .await
        .unwrap();
    c.wait_until("epoch 2", WAIT, |s| {
        s.iter().any(|(_, s)| s.epoch.is_some_and(|e| e >= 2))
    })
    .await
    .unwrap();
    c.audit.close_gate();
    let client = etcd.client().await.unwrap();
    let keys = JobKeys::new(&job);
    let mut targets = Vec::new();
    for t in 0..TASKS {
        targets.push(slot(&client, &keys.primary(t)).await.0.addr);
        targets.push(slot(&client, &keys.backup(t, 1)).await.0.addr);
    }
    let mut channels = Vec::new();
    for addr in &targets {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap();
        channels.push(endpoint.connect().await.unwrap());
    }
    let e = epoch(&client, &keys).await;
    const PATHS: [&str; 4] = [
        "/taskgraph.wire.Taskgraph/Pull",
        "/taskgraph.wire.Taskgraph/Meta",
        "/taskgraph.wire.Taskgraph/Replicate",
        "/taskgraph.wire.Taskgraph/Ping",
    ];
    let (mut refused, mut answered) = (0usize, 0usize);
    // Lanes: answers read on them, and lanes the node ended.
    let (mut lane_answers, mut lanes_ended) = (0usize, 0usize);
    for _ in 0..cases {
        if rng.random_bool(0.2) {
            // A lane carrying a few random messages.
            let frames = (0..rng.random_range(1..6))
                .map(|_| random_lane_frame(&mut rng, &job, e))
                .collect();
            let channel = channels[rng.random_range(0..channels.len())].clone();
            let lane = raw::lane(channel, "/taskgraph.wire.Taskgraph/Lane", frames);
            match tokio::time::timeout(Duration::from_millis(500), lane).await {
                Err(_) => answered += 1,
                Ok(Ok(n)) => {
                    lane_answers += n;
                    answered += 1;
                }
                Ok(Err(status)) => {
                    lanes_ended += 1;
                    assert_ne!(
                        status.code(),
                        tonic::Code::Internal,
                        "a node failed on a lane: {status:?}"
                    );
                    refused += 1;
                }
            }
            continue;
        }
        let frame = random_frame(&mut rng, &job, e);
        let path = PATHS[rng.random_range(0..PATHS.len())];
        let channel = channels[rng.random_range(0..channels.len())].clone();
        match tokio::time::timeout(Duration::from_millis(500), raw::unary(channel, path, frame))
            .await
        {
            // Held (a later epoch), or answered: a ping, or an empty ack.
            Err(_) | Ok(Ok(_)) => answered += 1,
            Ok(Err(status)) => {
                assert_ne!(
                    status.code(),
                    tonic::Code::Internal,
                    "a node failed on a frame: {status:?}"
                );
                refused += 1;
            }
        }
    }
    eprintln!(
        "raw frame fuzz: {refused} refused, {answered} answered or held; lanes: {lane_answers} \
         answers read, {lanes_ended} ended by the node"
    );

    c.audit.open_gate();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(100);
    for i in 0..c.len() {
        match tokio::time::timeout_at(deadline, c.wait(i)).await {
            Ok(Some(r)) => assert_eq!(
                r.unwrap_or_else(|e| panic!("node {i} failed (seed {seed}): {e}")),
                NodeExit::JobFinished { epoch: UNTIL },
                "node {i} (seed {seed})"
            ),
            Ok(None) => {}
            Err(_) => panic!("the job did not end (seed {seed})"),
        }
    }
    let bad = check_trail(&c.audit.events(), TASKS, UNTIL);
    assert!(bad.is_empty(), "seed {seed}: {}", bad.join("\n"));
    assert_eq!(
        panics.load(Ordering::SeqCst),
        0,
        "something panicked (seed {seed})"
    );
}
