//! Promise 10 (bad input is refused, never obeyed) and the receiving half of promise 1 (term
//! fencing) on *running* nodes of a dataflow job, against a real etcd and real sockets.
//!
//! The tests talk to the nodes the way a foreign, buggy or deposed peer would: with the public
//! [`taskgraph::testing::wire`] client, and — for frames that no well-behaved client can produce — with
//! tonic's generic client and a pass-through codec ([`raw_grpc`]). Where the nodes listen, and
//! the terms of the tasks, are read from etcd (`tasks/<t>/primary`, `tasks/<t>/backup/<k>`; the
//! key's create revision is the term).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use taskgraph::testing::etcd::keys::{EpochValue, Holder, JobKeys};
use taskgraph::testing::wire::{
    Acknowledge, CallError, ClientConfig, Header, Meta, Peers, PullAnswer, PullRequest, Rejection,
    Replicate, ReplicateKind,
};
use taskgraph::{Bytes, Epoch, Framework, NodeExit, Role, TaskId, Term};
use taskgraph_tests::apps::Event;
use taskgraph_tests::cluster::{App, Cluster, ClusterConfig};
use taskgraph_tests::dataflow::{check_trail, DataflowBuilder};
use taskgraph_tests::etcd::Etcd;
use taskgraph_tests::{init_logs, job_name};

/// Bound on every wait (only reached when something is broken).
const WAIT: Duration = Duration::from_secs(20);
/// The jobs never reach their last epoch: the tests stop the nodes themselves.
const UNTIL: Epoch = 1_000_000;
/// Pause of the root per epoch: the job keeps moving, but slowly enough to aim at its epoch.
const PACE_MS: u64 = 50;
/// The frame limit of the node started with a small one.
const SMALL_LIMIT: usize = 64 * 1024;
/// Sequence numbers far above those of the job's own pulls, so a probe never aliases one.
const PROBE_SEQ: u64 = 1 << 40;

async fn etcd() -> Etcd {
    init_logs();
    Etcd::start().await.expect("start etcd")
}

fn dataflow(etcd: &Etcd, name: &str, tasks: u32, replicas: u32) -> ClusterConfig {
    let mut cfg = ClusterConfig::new(etcd.endpoints(), &job_name(name), tasks, replicas);
    cfg.app = App::Dataflow {
        until: UNTIL,
        pace_ms: PACE_MS,
    };
    cfg
}

/// Reads a job's slots and epoch straight from etcd.
struct JobInEtcd {
    client: etcd_client::Client,
    keys: JobKeys,
}

impl JobInEtcd {
    async fn new(etcd: &Etcd, job: &str) -> Self {
        JobInEtcd {
            client: etcd.client().await.expect("etcd client"),
            keys: JobKeys::new(job),
        }
    }

    /// The holder of a slot key and the key's create revision.
    async fn slot(&self, key: &str) -> Option<(Holder, Term)> {
        let resp = self.client.clone().get(key, None).await.expect("etcd get");
        let kv = resp.kvs().first()?;
        let holder: Holder = serde_json::from_slice(kv.value()).expect("a holder as JSON");
        Some((holder, Term::try_from(kv.create_revision()).unwrap()))
    }

    /// Task `t`'s primary and its term.
    async fn primary(&self, t: TaskId) -> (Holder, Term) {
        self.slot(&self.keys.primary(t))
            .await
            .unwrap_or_else(|| panic!("task {t} has a primary in etcd"))
    }

    /// The holder of task `t`'s backup slot `k`.
    async fn backup(&self, t: TaskId, k: u32) -> Holder {
        self.slot(&self.keys.backup(t, k))
            .await
            .unwrap_or_else(|| panic!("task {t} has backup {k} in etcd"))
            .0
    }

    /// The job's epoch (it is running: the tests never let it finish).
    async fn epoch(&self) -> Epoch {
        let resp = self
            .client
            .clone()
            .get(self.keys.epoch(), None)
            .await
            .expect("etcd get");
        let kv = resp.kvs().first().expect("the job has an epoch");
        match EpochValue::parse(kv.value()).expect("a valid epoch value") {
            EpochValue::Running(e) => e,
            EpochValue::Done(e) => panic!("the job finished at epoch {e}"),
        }
    }
}

fn header(job: &str, epoch: Epoch, from_task: TaskId, to_task: TaskId, term: Term) -> Header {
    Header {
        job: job.to_owned(),
        epoch,
        from_task,
        to_task,
        term,
    }
}

fn probe(header: Header, method: &str) -> PullRequest {
    PullRequest {
        header,
        seq: PROBE_SEQ,
        method: method.to_owned(),
        payload: Bytes::new(),
        delivered_below: 0,
    }
}

/// Sends `req` stamped with the job's current epoch (read from etcd just before) and returns
/// the first answer that is not about the epoch.
///
/// The job keeps moving while the test runs, so between reading the epoch and the node
/// handling the pull the node may have left that epoch (`EpochMoved`: read it again and
/// resend), or its task may not have entered any epoch yet (`NotReady`). A pull of an epoch the
/// node has not reached yet is held by the node until it gets there, so it needs no retry. A
/// node that does not watch the sender's task (not its neighbour) says "not primary" for the
/// sender until its watch shows that task, as any sender's retry finds.
async fn pull_in_current_epoch(
    peers: &Peers,
    addr: &str,
    db: &JobInEtcd,
    mut req: PullRequest,
) -> Result<PullAnswer, CallError> {
    let mut last = None;
    let sender = req.header.from_task;
    for _ in 0..50 {
        req.header.epoch = db.epoch().await;
        match peers.pull(addr, req.clone()).await {
            Err(CallError::Rejected(
                r @ (Rejection::EpochMoved { .. } | Rejection::NotReady { .. }),
            )) => {
                last = Some(r);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(CallError::Rejected(r @ Rejection::NotPrimary { task })) if task == sender => {
                last = Some(r);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            other => return other,
        }
    }
    panic!("the pull never got past the epoch checks; last refusal: {last:?}");
}

fn rejected(r: Rejection) -> CallError {
    CallError::Rejected(r)
}

/// Sends every kind of bad input to the node at `addr`, acting primary of `task` with `term`
/// in `job` of `tasks` tasks, and checks each refusal. `sender` is another task whose current
/// primary term is `sender_term` (used where a message must pass the fence).
#[allow(clippy::too_many_arguments)]
async fn refuse_bad_input(
    db: &JobInEtcd,
    job: &str,
    tasks: u32,
    addr: &str,
    task: TaskId,
    sender: TaskId,
    sender_term: Term,
    small_limit: Option<usize>,
) {
    let peers = Peers::new(ClientConfig::new(job));
    let epoch = db.epoch().await;
    let ok = header(job, epoch, sender, task, sender_term);

    // Another job: refused before anything else, for every kind of message.
    let other = "another-job";
    let mut h = ok.clone();
    h.job = other.to_owned();
    let wrong_job = rejected(Rejection::WrongJob {
        expected: job.to_owned(),
        got: other.to_owned(),
    });
    assert_eq!(
        peers
            .pull(addr, probe(h.clone(), "param"))
            .await
            .unwrap_err(),
        wrong_job
    );
    let meta = Meta {
        header: h.clone(),
        link: "parents".into(),
        meta: "done".into(),
    };
    assert_eq!(peers.meta(addr, meta).await.unwrap_err(), wrong_job);
    let ack = Acknowledge {
        header: h.clone(),
        seq: 0,
    };
    assert_eq!(peers.acknowledge(addr, ack).await.unwrap_err(), wrong_job);
    let replicate = Replicate {
        header: header(other, epoch, task, task, 1),
        index: 1,
        kind: ReplicateKind::Snapshot,
        data: Bytes::from_static(b"garbage"),
    };
    assert_eq!(
        peers.replicate(addr, replicate).await.unwrap_err(),
        wrong_job
    );
    let stranger = Peers::new(ClientConfig::new(other));
    assert_eq!(stranger.ping(addr).await.unwrap_err(), wrong_job);

    // Task ids out of range, as receiver and as sender.
    let unknown = rejected(Rejection::UnknownTask {
        task: 999,
        num_tasks: tasks,
    });
    let mut h = ok.clone();
    h.to_task = 999;
    assert_eq!(
        peers.pull(addr, probe(h, "param")).await.unwrap_err(),
        unknown
    );
    let mut h = ok.clone();
    h.from_task = 999;
    let meta = Meta {
        header: h,
        link: "parents".into(),
        meta: "done".into(),
    };
    assert_eq!(peers.meta(addr, meta).await.unwrap_err(), unknown);
    let mut h = ok.clone();
    h.to_task = 999;
    let ack = Acknowledge { header: h, seq: 0 };
    assert_eq!(peers.acknowledge(addr, ack).await.unwrap_err(), unknown);

    // A task this node does not serve.
    let mut h = ok.clone();
    h.to_task = sender;
    assert_eq!(
        peers.pull(addr, probe(h, "param")).await.unwrap_err(),
        rejected(Rejection::NotPrimary { task: sender })
    );
    // An acknowledgement of a pull to a task this node does not serve.
    let mut h = ok.clone();
    h.to_task = sender;
    let ack = Acknowledge { header: h, seq: 0 };
    assert_eq!(
        peers.acknowledge(addr, ack).await.unwrap_err(),
        rejected(Rejection::NotPrimary { task: sender })
    );
    // One of a pull never made changes nothing and is taken.
    let ack = Acknowledge {
        header: ok.clone(),
        seq: 12_345,
    };
    assert_eq!(peers.acknowledge(addr, ack).await, Ok(()));
    // Replication for a task whose backup this node is not (it is its primary).
    let replicate = Replicate {
        header: header(job, epoch, task, task, 1),
        index: 1,
        kind: ReplicateKind::Snapshot,
        data: Bytes::from_static(b"garbage"),
    };
    assert_eq!(
        peers.replicate(addr, replicate).await.unwrap_err(),
        rejected(Rejection::NotPrimary { task })
    );

    // A method the task does not have, from a genuine sender (its current term, the current
    // epoch): it passes every check of the framework and is refused by the task.
    let answer = pull_in_current_epoch(&peers, addr, db, probe(ok.clone(), "no-such-method")).await;
    assert_eq!(
        answer.unwrap_err(),
        rejected(Rejection::UnknownMethod {
            method: "no-such-method".into()
        })
    );

    // Frames that do not decode, or decode to something inconsistent.
    let pull_path = "/taskgraph.wire.Taskgraph/Pull";
    // Not a protobuf at all: a truncated varint tag.
    let status = raw_grpc::unary(addr, pull_path, b"\xff\xff\xff")
        .await
        .unwrap();
    status.assert_malformed("undecodable");
    // A valid but empty PullRequest: the required header is missing.
    let status = raw_grpc::unary(addr, pull_path, b"").await.unwrap();
    status.assert_malformed("header");
    // A replication entry whose sender and receiver differ.
    let replicate = Replicate {
        header: header(job, epoch, sender, task, sender_term),
        index: 1,
        kind: ReplicateKind::Update,
        data: Bytes::new(),
    };
    assert!(
        matches!(
            peers.replicate(addr, replicate).await,
            Err(CallError::Rejected(Rejection::Malformed { .. }))
        ),
        "a replicate with from_task != to_task is malformed"
    );

    // Frames above the node's limit, sent by a client that allows more.
    if let Some(limit) = small_limit {
        let big = Peers::new(ClientConfig {
            max_frame_bytes: 16 * limit,
            ..ClientConfig::new(job)
        });
        let too_large = |e: CallError| match e {
            CallError::Rejected(Rejection::TooLarge { size, limit: l }) => {
                assert_eq!(l, limit);
                assert!(size > 2 * limit, "size {size}");
            }
            other => panic!("expected TooLarge, got {other:?}"),
        };
        let mut req = probe(ok.clone(), "param");
        req.payload = Bytes::from(vec![7u8; 2 * limit]);
        too_large(big.pull(addr, req).await.unwrap_err());
        let meta = Meta {
            header: ok.clone(),
            link: "parents".into(),
            meta: "x".repeat(2 * limit),
        };
        too_large(big.meta(addr, meta).await.unwrap_err());
        let replicate = Replicate {
            header: header(job, epoch, task, task, 1),
            index: 1,
            kind: ReplicateKind::Snapshot,
            data: Bytes::from(vec![0u8; 2 * limit]),
        };
        too_large(big.replicate(addr, replicate).await.unwrap_err());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_are_refused_and_the_node_keeps_serving() {
    let etcd = etcd().await;
    let tasks = 3;
    let cfg = dataflow(&etcd, "bad-input", tasks, 1);
    let job = cfg.job.clone();
    let mut c = Cluster::new(cfg.clone());

    // One node with a small frame limit joins first and takes one of the tasks; two cluster
    // nodes take the others.
    let small = Framework::builder()
        .etcd(cfg.etcd.clone())
        .job(job.clone())
        .tasks(tasks)
        .replicas(1)
        .links(cfg.links())
        .lease_ttl(cfg.ttl)
        .node_name("small")
        .max_frame_bytes(SMALL_LIMIT)
        .task_builder(DataflowBuilder {
            node: "small".into(),
            audit: c.audit.clone(),
            until: UNTIL,
            pace: Duration::from_millis(PACE_MS),
            state: true,
        })
        .build()
        .unwrap()
        .spawn()
        .await
        .unwrap();
    let mut small_status = small.status();
    let (small_task, small_term) = tokio::time::timeout(
        WAIT,
        small_status.wait_for(|s| s.acting && matches!(s.role, Role::Primary { .. })),
    )
    .await
    .expect("the small node becomes a primary")
    .map(|s| match s.role {
        Role::Primary { task, term } => (task, term),
        _ => unreachable!(),
    })
    .unwrap();
    c.add_node().await.unwrap();
    c.add_node().await.unwrap();
    let others: Vec<TaskId> = (0..tasks).filter(|t| *t != small_task).collect();
    c.wait_until("every task has a primary and the job moves", WAIT, |s| {
        others
            .iter()
            .all(|t| s.iter().any(|(_, st)| st.primary_of(*t).is_some()))
            && s.iter().any(|(_, st)| st.epoch.is_some_and(|e| e >= 2))
    })
    .await
    .unwrap();

    let db = JobInEtcd::new(&etcd, &job).await;
    let mut primaries = Vec::new();
    for t in 0..tasks {
        primaries.push(db.primary(t).await);
    }
    assert_eq!(primaries[small_task as usize].0.node, small.id());
    assert_eq!(primaries[small_task as usize].1, small_term);

    // Every primary, task 0's first, refuses every kind of bad input.
    for t in 0..tasks {
        let (holder, _) = &primaries[t as usize];
        let sender = (t + 1) % tasks;
        let limit = (t == small_task).then_some(SMALL_LIMIT);
        refuse_bad_input(
            &db,
            &job,
            tasks,
            &holder.addr,
            t,
            sender,
            primaries[sender as usize].1,
            limit,
        )
        .await;
    }

    // Every node still answers, in the same role: none crashed, none lost its slot.
    let peers = Peers::new(ClientConfig::new(job.clone()));
    for t in 0..tasks {
        let (holder, term) = &primaries[t as usize];
        let reply = peers.ping(&holder.addr).await.expect("the node answers");
        assert_eq!(reply.job, job);
        assert_eq!(reply.node_id, holder.node);
        assert_eq!(reply.slots.len(), 1, "{reply:?}");
        assert_eq!(
            (
                reply.slots[0].task,
                reply.slots[0].primary,
                reply.slots[0].term
            ),
            (t, true, *term),
            "{reply:?}"
        );
        assert_eq!(db.primary(t).await, (holder.clone(), *term));
    }
    let s = small.status().borrow().clone();
    assert_eq!(s.primary_of(small_task), Some(small_term), "{s:?}");

    // The job keeps advancing.
    let before = db.epoch().await;
    c.wait_until("three more epochs", WAIT, |s| {
        s.iter()
            .any(|(_, st)| st.epoch.is_some_and(|e| e >= before + 3))
    })
    .await
    .unwrap();
    assert!(db.epoch().await >= before + 3);

    c.stop_all().await;
    assert_eq!(small.stop().await.unwrap(), NodeExit::Stopped);
    // Nothing was lost, duplicated or wrong in any epoch the job went through.
    let last = db.epoch().await;
    let events = c.audit.events();
    let bad = check_trail(&events, tasks, last);
    assert!(
        bad.is_empty(),
        "{} violations:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_terms_are_fenced() {
    let etcd = etcd().await;
    let tasks = 3;
    let cfg = dataflow(&etcd, "fence", tasks, 2);
    let job = cfg.job.clone();
    let mut c = Cluster::start_staffed(cfg, 6).await.unwrap();
    c.wait_until("epoch 1", WAIT, |s| {
        s.iter().any(|(_, st)| st.epoch.is_some_and(|e| e >= 1))
    })
    .await
    .unwrap();
    let db = JobInEtcd::new(&etcd, &job).await;

    let (_, old_term) = db.primary(1).await;
    let (victim, term) = c.primary_of(1).expect("task 1 has a primary");
    assert_eq!(
        term, old_term,
        "the term is the primary key's create revision"
    );
    let (p0, t0) = c.primary_of(0).expect("task 0 has a primary");

    // Crash task 1's primary (its lease is left to expire) and wait for its successor.
    c.crash(victim);
    let st = c
        .wait_until("a new primary for task 1", WAIT, |s| {
            s.iter()
                .any(|(_, st)| st.primary_of(1).is_some_and(|t| t > old_term))
        })
        .await
        .unwrap();
    let new_term = st
        .iter()
        .find_map(|(_, st)| st.primary_of(1))
        .expect("task 1's new primary");
    // Task 0's node raises its fence from the view in which it sees the new primary, before it
    // tells its task that neighbour 1 restarted: once the task has heard, the fence is up.
    let label = format!("n{p0}");
    let restarted = |events: &[(String, Event)]| {
        events.iter().any(|(n, e)| {
            *n == label
                && matches!(
                    e,
                    Event::Neighbour {
                        task: 0,
                        neighbour: 1,
                        failed: false,
                        ..
                    }
                )
        })
    };
    c.wait_until("task 0 hears that task 1 restarted", WAIT, |_| {
        restarted(&c.audit.events())
    })
    .await
    .unwrap();
    assert_eq!(c.primary_of(0), Some((p0, t0)), "task 0 kept its primary");
    let (p0_holder, _) = db.primary(0).await;
    assert_eq!(db.primary(1).await.1, new_term);
    let backup0 = db.backup(0, 1).await;

    let peers = Peers::new(ClientConfig::new(job.clone()));
    let epoch = db.epoch().await;
    let stale = |term| {
        rejected(Rejection::StaleTerm {
            task: 1,
            term,
            seen: new_term,
        })
    };

    // A meta and a pull from task 1's deposed primary, and one from a sender that claims no
    // term at all, are refused.
    let meta = |term| Meta {
        header: header(&job, epoch, 1, 0, term),
        link: "parents".into(),
        meta: "stale-probe".into(),
    };
    assert_eq!(
        peers
            .meta(&p0_holder.addr, meta(old_term))
            .await
            .unwrap_err(),
        stale(old_term)
    );
    assert_eq!(
        peers.meta(&p0_holder.addr, meta(0)).await.unwrap_err(),
        stale(0)
    );
    assert_eq!(
        peers
            .pull(
                &p0_holder.addr,
                probe(header(&job, epoch, 1, 0, old_term), "param")
            )
            .await
            .unwrap_err(),
        stale(old_term)
    );
    // The current term passes the fence (and the probe is refused by the task instead).
    let answer = pull_in_current_epoch(
        &peers,
        &p0_holder.addr,
        &db,
        probe(header(&job, epoch, 1, 0, new_term), "no-such-method"),
    )
    .await;
    assert_eq!(
        answer.unwrap_err(),
        rejected(Rejection::UnknownMethod {
            method: "no-such-method".into()
        })
    );

    // Replication for task 0 with a term below its current one is refused by its backup.
    let replicate = |term| Replicate {
        header: header(&job, epoch, 0, 0, term),
        // Far ahead of the stream: even if admitted, it would not be applied.
        index: u64::MAX,
        kind: ReplicateKind::Update,
        data: Bytes::from_static(b"garbage"),
    };
    for term in [t0 - 1, 0] {
        assert_eq!(
            peers
                .replicate(&backup0.addr, replicate(term))
                .await
                .unwrap_err(),
            rejected(Rejection::StaleTerm {
                task: 0,
                term,
                seen: t0
            })
        );
    }
    // With the current term it passes the fence and is refused for its index instead.
    assert!(
        matches!(
            peers.replicate(&backup0.addr, replicate(t0)).await,
            Err(CallError::Rejected(Rejection::NotReady { task: 0, .. }))
        ),
        "an out-of-order update with the current term"
    );
    // A term higher than any etcd has shown is not believed: refused (retry later), and it
    // does not raise the fence against the real primaries (the job keeps advancing below).
    let forged = u64::MAX - 1;
    assert_eq!(
        peers.meta(&p0_holder.addr, meta(forged)).await.unwrap_err(),
        rejected(Rejection::NotPrimary { task: 1 })
    );
    assert_eq!(
        peers
            .replicate(&backup0.addr, replicate(forged))
            .await
            .unwrap_err(),
        rejected(Rejection::NotPrimary { task: 0 })
    );
    // Task 0's primary is not its backup.
    assert_eq!(
        peers
            .replicate(&p0_holder.addr, replicate(t0))
            .await
            .unwrap_err(),
        rejected(Rejection::NotPrimary { task: 0 })
    );

    // The job keeps advancing, and none of the refused messages reached a task.
    let before = db.epoch().await;
    c.wait_until("three more epochs", WAIT, |s| {
        s.iter()
            .any(|(_, st)| st.epoch.is_some_and(|e| e >= before + 3))
    })
    .await
    .unwrap();
    c.stop_all().await;
    let last = db.epoch().await;
    let events = c.audit.events();
    assert!(
        !events
            .iter()
            .any(|(_, e)| matches!(e, Event::Meta { meta, .. } if meta == "stale-probe")),
        "a fenced meta was delivered"
    );
    let bad = check_trail(&events, tasks, last);
    assert!(
        bad.is_empty(),
        "{} violations:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

/// A unary gRPC call with an arbitrary body, made with tonic's generic client and a codec that
/// passes bytes through untouched: it puts on the wire frames no generated client would send.
mod raw_grpc {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use bytes::Bytes;
    use taskgraph::testing::wire::Rejection;
    use taskgraph_tests::raw_grpc::RawCodec;
    use tonic::body::Body;
    use tonic::codegen::http::uri::PathAndQuery;
    use tonic::codegen::http::{Request, Response, StatusCode};
    use tonic::codegen::{BoxFuture, Context, Poll, Service};
    use tonic::transport::{Channel, Endpoint};
    use tonic::{Code, Status};

    /// Bound on the whole call (only reached when something is broken).
    const TIMEOUT: Duration = Duration::from_secs(10);

    /// A channel that remembers the HTTP status of the last response (tonic's `Status` does
    /// not carry it).
    #[derive(Clone)]
    struct HttpStatus {
        channel: Channel,
        last: Arc<Mutex<Option<StatusCode>>>,
    }

    impl Service<Request<Body>> for HttpStatus {
        type Response = Response<Body>;
        type Error = tonic::transport::Error;
        type Future = BoxFuture<Response<Body>, tonic::transport::Error>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            self.channel.poll_ready(cx)
        }

        fn call(&mut self, request: Request<Body>) -> Self::Future {
            let response = self.channel.call(request);
            let last = Arc::clone(&self.last);
            Box::pin(async move {
                let response = response.await?;
                *last.lock().unwrap() = Some(response.status());
                Ok(response)
            })
        }
    }

    /// The refusal of one call, with the HTTP status it came with.
    #[derive(Debug)]
    pub struct Refusal {
        pub http: Option<StatusCode>,
        pub status: Status,
    }

    impl Refusal {
        /// Checks that this is the node's `Malformed` rejection: HTTP 200, gRPC code 3
        /// (`InvalidArgument`), a message and a reason (the encoded rejection in the
        /// metadata) mentioning `what`.
        pub fn assert_malformed(&self, what: &str) {
            assert_eq!(self.http, Some(StatusCode::OK), "{self:?}");
            assert_eq!(self.status.code(), Code::InvalidArgument, "{self:?}");
            let message = self.status.message();
            assert!(
                message.starts_with("malformed message:") && message.contains(what),
                "{message:?}"
            );
            match Rejection::from_status(&self.status) {
                Some(Rejection::Malformed { reason }) => {
                    assert!(reason.contains(what), "{reason:?}");
                }
                other => panic!("expected Malformed, got {other:?} from {self:?}"),
            }
        }
    }

    /// Calls `path` on `addr` with `body` as the (uncompressed) message and returns the
    /// refusal; a call that succeeds is an error.
    pub async fn unary(addr: &str, path: &'static str, body: &[u8]) -> Result<Refusal, String> {
        tokio::time::timeout(TIMEOUT, call(addr, path, Bytes::copy_from_slice(body)))
            .await
            .map_err(|_| "timed out".to_owned())?
    }

    async fn call(addr: &str, path: &'static str, body: Bytes) -> Result<Refusal, String> {
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| format!("endpoint {addr}: {e}"))?
            .connect()
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let last = Arc::new(Mutex::new(None));
        let service = HttpStatus {
            channel,
            last: Arc::clone(&last),
        };
        let mut grpc = tonic::client::Grpc::new(service);
        grpc.ready().await.map_err(|e| format!("ready: {e}"))?;
        let answer = grpc
            .unary(
                tonic::Request::new(body),
                PathAndQuery::from_static(path),
                RawCodec,
            )
            .await;
        let http = *last.lock().unwrap();
        match answer {
            Ok(reply) => Err(format!("the call succeeded: {reply:?}")),
            Err(status) => Ok(Refusal { http, status }),
        }
    }
}
