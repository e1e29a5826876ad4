#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Node-to-node transport over real sockets on 127.0.0.1, with a small fake event loop.

use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes};
use taskgraph::testing::wire::{
    self, CallError, ClientConfig, Header, Inbound, Meta, Peers, PingReply, PullAnswer,
    PullRequest, Rejection, Replicate, ReplicateKind, ServerConfig, SlotInfo, WireError,
};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Endpoint;
use tonic::{Code, Status};

const JOB: &str = "job-a";
const TASKS: u32 = 4;

/// A running `wire::serve`, stopped by `stop` (or when dropped).
struct TestServer {
    addr: String,
    shutdown: oneshot::Sender<()>,
    handle: JoinHandle<Result<(), WireError>>,
}

impl TestServer {
    async fn start(config: ServerConfig) -> (TestServer, mpsc::Receiver<Inbound>) {
        let listener = wire::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (inbound_tx, inbound_rx) = mpsc::channel(64);
        let (shutdown, stop) = oneshot::channel::<()>();
        let handle = tokio::spawn(wire::serve(listener, config, inbound_tx, async move {
            let _ = stop.await;
        }));
        (
            TestServer {
                addr,
                shutdown,
                handle,
            },
            inbound_rx,
        )
    }

    async fn stop(self) {
        let _ = self.shutdown.send(());
        self.handle.await.unwrap().unwrap();
    }
}

fn server_config() -> ServerConfig {
    ServerConfig::new(JOB, TASKS)
}

fn peers() -> Peers {
    Peers::new(ClientConfig::new(JOB))
}

fn header(from_task: u32, to_task: u32) -> Header {
    Header {
        job: JOB.into(),
        epoch: 3,
        from_task,
        to_task,
        term: 5,
    }
}

fn pull(method: &str, payload: &'static [u8]) -> PullRequest {
    PullRequest {
        header: header(1, 2),
        seq: 9,
        method: method.into(),
        payload: Bytes::from_static(payload),
        delivered_below: 0,
    }
}

fn ping_reply() -> PingReply {
    PingReply {
        job: JOB.into(),
        node_id: "node-1".into(),
        slots: vec![SlotInfo {
            task: 2,
            primary: true,
            term: 7,
            epoch: 3,
        }],
    }
}

/// A fake event loop: `echo` pulls answer their payload with term 7, method `"<i>"` answers
/// with `rejections()[i]`, `hold` answers after 200 ms, `drop` drops the oneshot; metas,
/// replicas and pings succeed. Every message is also reported on the returned channel.
fn spawn_loop(mut inbound: mpsc::Receiver<Inbound>) -> mpsc::UnboundedReceiver<String> {
    let (seen_tx, seen_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(msg) = inbound.recv().await {
            let _ = seen_tx.send(format!("{msg:?}"));
            match msg {
                Inbound::Pull(req, answer) => match req.method.as_str() {
                    "echo" => {
                        let _ = answer.send(Ok(PullAnswer {
                            payload: req.payload,
                            server_term: 7,
                        }));
                    }
                    "big" => {
                        let _ = answer.send(Ok(PullAnswer {
                            payload: Bytes::from(vec![0u8; 2 << 20]),
                            server_term: 7,
                        }));
                    }
                    "hold" => {
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            let _ = answer.send(Ok(PullAnswer {
                                payload: Bytes::from_static(b"late"),
                                server_term: 8,
                            }));
                        });
                    }
                    "forever" => {
                        // Held until the server side gives up on it.
                        tokio::spawn(async move {
                            let mut answer = answer;
                            answer.closed().await;
                        });
                    }
                    "drop" => drop(answer),
                    index => {
                        let index: usize = index.parse().unwrap();
                        let _ = answer.send(Err(rejections()[index].clone()));
                    }
                },
                Inbound::Acknowledge(_, answer) => {
                    let _ = answer.send(Ok(()));
                }
                Inbound::Meta(meta, answer) => {
                    let result = if meta.meta == "refuse" {
                        Err(Rejection::NotReady {
                            task: meta.header.to_task,
                            epoch: meta.header.epoch,
                        })
                    } else {
                        Ok(())
                    };
                    let _ = answer.send(result);
                }
                Inbound::Replicate(rep, answer) => {
                    let result = if rep.index == 0 {
                        Err(Rejection::StaleTerm {
                            task: rep.header.from_task,
                            term: rep.header.term,
                            seen: rep.header.term + 1,
                        })
                    } else {
                        Ok(())
                    };
                    let _ = answer.send(result);
                }
                Inbound::Ping(answer) => {
                    let _ = answer.send(ping_reply());
                }
            }
        }
    });
    seen_rx
}

fn rejections() -> Vec<Rejection> {
    vec![
        Rejection::NotPrimary { task: 2 },
        Rejection::NotReady { task: 2, epoch: 4 },
        Rejection::EpochMoved {
            request_epoch: 3,
            current_epoch: 6,
        },
        Rejection::StaleTerm {
            task: 1,
            term: 5,
            seen: 11,
        },
        Rejection::WrongJob {
            expected: "x".into(),
            got: "y".into(),
        },
        Rejection::UnknownTask {
            task: 77,
            num_tasks: 4,
        },
        Rejection::UnknownMethod {
            method: "nope".into(),
        },
        Rejection::TooLarge {
            size: 123_456_789,
            limit: 1024,
        },
        Rejection::Malformed {
            reason: "bad ✗ utf-8 reason\nwith newline".into(),
        },
        Rejection::ShuttingDown,
    ]
}

#[tokio::test]
async fn round_trips_pull_meta_replicate_ping() {
    let (server, inbound) = TestServer::start(server_config()).await;
    let mut seen = spawn_loop(inbound);
    let peers = peers();

    let answer = peers
        .pull(&server.addr, pull("echo", b"hello"))
        .await
        .unwrap();
    assert_eq!(
        answer,
        PullAnswer {
            payload: Bytes::from_static(b"hello"),
            server_term: 7
        }
    );
    let expected = format!("{:?}", pull("echo", b"hello"));
    assert!(seen.recv().await.unwrap().contains(&expected));

    let meta = Meta {
        header: header(3, 0),
        link: "children".into(),
        meta: "done".into(),
    };
    peers.meta(&server.addr, meta.clone()).await.unwrap();
    assert!(seen.recv().await.unwrap().contains(&format!("{meta:?}")));

    let replicate = Replicate {
        header: header(2, 2),
        index: 4,
        kind: ReplicateKind::Snapshot,
        data: Bytes::from_static(b"state"),
    };
    peers
        .replicate(&server.addr, replicate.clone())
        .await
        .unwrap();
    assert!(seen
        .recv()
        .await
        .unwrap()
        .contains(&format!("{replicate:?}")));

    assert_eq!(peers.ping(&server.addr).await.unwrap(), ping_reply());

    // An empty header job is filled in from the client config.
    let mut anonymous = pull("echo", b"x");
    anonymous.header.job.clear();
    peers.pull(&server.addr, anonymous).await.unwrap();

    server.stop().await;
}

#[tokio::test]
async fn every_rejection_round_trips() {
    let (server, inbound) = TestServer::start(server_config()).await;
    let _seen = spawn_loop(inbound);
    let peers = peers();

    for (index, rejection) in rejections().into_iter().enumerate() {
        let err = peers
            .pull(&server.addr, pull(&index.to_string(), b""))
            .await
            .unwrap_err();
        assert_eq!(err, CallError::Rejected(rejection.clone()));
        assert_eq!(err.retryable(), rejection.retryable());
        assert!(!err.is_refused());
    }

    // Through the other message kinds too.
    let meta = Meta {
        header: header(1, 3),
        link: "l".into(),
        meta: "refuse".into(),
    };
    assert_eq!(
        peers.meta(&server.addr, meta).await.unwrap_err(),
        CallError::Rejected(Rejection::NotReady { task: 3, epoch: 3 })
    );
    let replicate = Replicate {
        header: header(1, 1),
        index: 0,
        kind: ReplicateKind::Update,
        data: Bytes::new(),
    };
    assert_eq!(
        peers.replicate(&server.addr, replicate).await.unwrap_err(),
        CallError::Rejected(Rejection::StaleTerm {
            task: 1,
            term: 5,
            seen: 6
        })
    );

    server.stop().await;
}

#[test]
fn rejection_codes_and_status_encoding() {
    let codes = [
        Code::Unavailable,
        Code::Unavailable,
        Code::Aborted,
        Code::FailedPrecondition,
        Code::FailedPrecondition,
        Code::InvalidArgument,
        Code::Unimplemented,
        Code::ResourceExhausted,
        Code::InvalidArgument,
        Code::Unavailable,
    ];
    for (rejection, code) in rejections().into_iter().zip(codes) {
        assert_eq!(rejection.code(), code, "{rejection:?}");
        assert_eq!(rejection.retryable(), code == Code::Unavailable);
        let status = Status::from(rejection.clone());
        assert_eq!(status.code(), code);
        assert_eq!(Rejection::from_status(&status), Some(rejection));
    }
    assert_eq!(Rejection::from_status(&Status::internal("plain")), None);

    // Client-chosen strings are cut (on a char boundary) before going into headers.
    let long = Rejection::WrongJob {
        expected: "job".into(),
        got: "é".repeat(wire::MAX_REJECTION_TEXT),
    };
    match Rejection::from_status(&Status::from(long)) {
        Some(Rejection::WrongJob { got, .. }) => {
            assert!(got.len() <= wire::MAX_REJECTION_TEXT && got.len() > 1000);
        }
        other => panic!("expected WrongJob, got {other:?}"),
    }
}

#[tokio::test]
async fn wrong_job_and_unknown_task_never_reach_the_loop() {
    let (server, mut inbound) = TestServer::start(server_config()).await;
    let peers = peers();

    let mut wrong_job = pull("echo", b"");
    wrong_job.header.job = "job-b".into();
    assert_eq!(
        peers.pull(&server.addr, wrong_job).await.unwrap_err(),
        CallError::Rejected(Rejection::WrongJob {
            expected: JOB.into(),
            got: "job-b".into()
        })
    );

    let mut unknown_to = pull("echo", b"");
    unknown_to.header.to_task = TASKS;
    assert_eq!(
        peers.pull(&server.addr, unknown_to).await.unwrap_err(),
        CallError::Rejected(Rejection::UnknownTask {
            task: TASKS,
            num_tasks: TASKS
        })
    );

    let meta = Meta {
        header: header(u32::MAX, 0),
        link: "l".into(),
        meta: "m".into(),
    };
    assert_eq!(
        peers.meta(&server.addr, meta).await.unwrap_err(),
        CallError::Rejected(Rejection::UnknownTask {
            task: u32::MAX,
            num_tasks: TASKS
        })
    );

    let replicate = Replicate {
        header: header(1, 2),
        index: 1,
        kind: ReplicateKind::Update,
        data: Bytes::new(),
    };
    assert!(matches!(
        peers.replicate(&server.addr, replicate).await.unwrap_err(),
        CallError::Rejected(Rejection::Malformed { .. })
    ));

    // A huge job name is echoed back truncated, not breaking the HTTP/2 headers.
    let mut huge_job = pull("echo", b"");
    huge_job.header.job = "j".repeat(100_000);
    match peers.pull(&server.addr, huge_job).await.unwrap_err() {
        CallError::Rejected(Rejection::WrongJob { got, .. }) => {
            assert_eq!(got.len(), wire::MAX_REJECTION_TEXT)
        }
        other => panic!("expected WrongJob, got {other:?}"),
    }

    let other_job = Peers::new(ClientConfig::new("job-b"));
    assert_eq!(
        other_job.ping(&server.addr).await.unwrap_err(),
        CallError::Rejected(Rejection::WrongJob {
            expected: JOB.into(),
            got: "job-b".into()
        })
    );

    // Every call above has been answered, so anything forwarded would be queued by now.
    assert!(matches!(
        inbound.try_recv(),
        Err(mpsc::error::TryRecvError::Empty)
    ));
    server.stop().await;
}

#[tokio::test]
async fn oversized_frames_are_refused_and_the_server_keeps_serving() {
    const LIMIT: usize = 1 << 20;
    let (server, inbound) = TestServer::start(ServerConfig {
        max_frame_bytes: LIMIT,
        ..server_config()
    })
    .await;
    let mut seen = spawn_loop(inbound);
    // This client allows more than the server does, so the big request goes out.
    let peers = Peers::new(ClientConfig {
        max_frame_bytes: 8 * LIMIT,
        ..ClientConfig::new(JOB)
    });

    let mut big = pull("echo", b"");
    big.payload = Bytes::from(vec![7u8; 2 * LIMIT]);
    match peers.pull(&server.addr, big).await.unwrap_err() {
        CallError::Rejected(Rejection::TooLarge { size, limit }) => {
            assert!(size > 2 * LIMIT, "size {size}");
            assert_eq!(limit, LIMIT);
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }

    // On the wire it is ResourceExhausted carrying the rejection, as for any gRPC client.
    let status = raw_call(
        &server.addr,
        "/taskgraph.wire.Taskgraph/Pull",
        vec![0u8; LIMIT + 1],
    )
    .await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(
        Rejection::from_status(&status),
        Some(Rejection::TooLarge {
            size: LIMIT + 1,
            limit: LIMIT
        })
    );

    // The same connection keeps serving.
    let answer = peers.pull(&server.addr, pull("echo", b"ok")).await.unwrap();
    assert_eq!(answer.payload, Bytes::from_static(b"ok"));
    assert!(seen.recv().await.unwrap().contains("echo"));

    // An answer above the server's limit is refused as well.
    match peers
        .pull(&server.addr, pull("big", b""))
        .await
        .unwrap_err()
    {
        CallError::Rejected(Rejection::TooLarge { limit, .. }) => assert_eq!(limit, LIMIT),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert!(seen.recv().await.unwrap().contains("big"));

    // A client refuses locally to send above its own limit.
    let small = Peers::new(ClientConfig {
        max_frame_bytes: 16,
        ..ClientConfig::new(JOB)
    });
    let mut req = pull("echo", b"");
    req.payload = Bytes::from(vec![1u8; 64]);
    assert!(matches!(
        small.pull(&server.addr, req).await.unwrap_err(),
        CallError::Rejected(Rejection::TooLarge { limit: 16, .. })
    ));

    assert_eq!(
        peers
            .pull(&server.addr, pull("echo", b"still"))
            .await
            .unwrap()
            .payload,
        Bytes::from_static(b"still")
    );
    server.stop().await;
}

/// Sends and receives message bodies as raw bytes, to put garbage on the wire.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// A raw gRPC client of the node at `addr`, ready for a call.
async fn raw_grpc(addr: &str) -> tonic::client::Grpc<tonic::transport::Channel> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    grpc
}

async fn raw_call(addr: &str, path: &'static str, body: impl Into<Bytes>) -> Status {
    let mut grpc = raw_grpc(addr).await;
    grpc.unary(
        tonic::Request::new(body.into()),
        PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .unwrap_err()
}

#[tokio::test]
async fn malformed_frames_are_refused_and_the_server_keeps_serving() {
    let (server, mut inbound) = TestServer::start(server_config()).await;

    // Not a protobuf at all: a truncated varint tag.
    let status = raw_call(
        &server.addr,
        "/taskgraph.wire.Taskgraph/Pull",
        &b"\xff\xff\xff"[..],
    )
    .await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(matches!(
        Rejection::from_status(&status),
        Some(Rejection::Malformed { .. })
    ));

    // A length-delimited field 1 (header) announcing more bytes than there are.
    let status = raw_call(
        &server.addr,
        "/taskgraph.wire.Taskgraph/Meta",
        &b"\x0a\x09ab"[..],
    )
    .await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    // A valid but empty PullRequest: the required header is missing.
    let status = raw_call(&server.addr, "/taskgraph.wire.Taskgraph/Pull", &b""[..]).await;
    assert_eq!(status.code(), Code::InvalidArgument);
    match Rejection::from_status(&status) {
        Some(Rejection::Malformed { reason }) => assert!(reason.contains("header"), "{reason}"),
        other => panic!("expected Malformed, got {other:?}"),
    }

    // A replicate of kind UNSPECIFIED (field 3 = 0) with a valid header.
    let status = raw_call(
        &server.addr,
        "/taskgraph.wire.Taskgraph/Replicate",
        &b"\x0a\x07\x0a\x05job-a\x18\x00"[..],
    )
    .await;
    assert!(
        matches!(
            Rejection::from_status(&status),
            Some(Rejection::Malformed { .. })
        ),
        "{status:?}"
    );

    // None of it reached the loop.
    assert!(matches!(
        inbound.try_recv(),
        Err(mpsc::error::TryRecvError::Empty)
    ));

    // The server keeps serving.
    let _seen = spawn_loop(inbound);
    let answer = peers()
        .pull(&server.addr, pull("echo", b"fine"))
        .await
        .unwrap();
    assert_eq!(answer.payload, Bytes::from_static(b"fine"));
    server.stop().await;
}

#[tokio::test]
async fn connecting_to_a_closed_port_is_refused() {
    let listener = wire::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    drop(listener);

    let peers = peers();
    let err = peers.pull(&addr, pull("echo", b"")).await.unwrap_err();
    assert!(err.is_refused(), "{err:?}");
    assert!(err.retryable());
    assert_eq!(err, CallError::Refused { addr: addr.clone() });
    // Again through the now cached channel, and with the other calls.
    assert!(peers.ping(&addr).await.unwrap_err().is_refused());
    let meta = Meta {
        header: header(0, 1),
        link: "l".into(),
        meta: "m".into(),
    };
    assert!(peers.meta(&addr, meta).await.unwrap_err().is_refused());
}

#[tokio::test]
async fn a_dead_server_behind_a_cached_channel_is_refused() {
    let (server, inbound) = TestServer::start(server_config()).await;
    let _seen = spawn_loop(inbound);
    let addr = server.addr.clone();
    let peers = peers();
    let clone = peers.clone();

    assert_eq!(peers.ping(&addr).await.unwrap(), ping_reply());
    server.stop().await;

    // The clone shares the cached (formerly connected) channel.
    for _ in 0..3 {
        let err = clone.pull(&addr, pull("echo", b"")).await.unwrap_err();
        assert_eq!(err, CallError::Refused { addr: addr.clone() });
    }
    peers.forget(&addr);
    assert!(peers.ping(&addr).await.unwrap_err().is_refused());
}

#[tokio::test]
async fn a_held_pull_is_delivered() {
    let (server, inbound) = TestServer::start(server_config()).await;
    let _seen = spawn_loop(inbound);
    let peers = peers();

    let started = Instant::now();
    let (held, quick) = tokio::join!(
        peers.pull(&server.addr, pull("hold", b"")),
        // Other calls on the same connection are not blocked by the held one.
        peers.pull(&server.addr, pull("echo", b"quick")),
    );
    assert_eq!(
        held.unwrap(),
        PullAnswer {
            payload: Bytes::from_static(b"late"),
            server_term: 8
        }
    );
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(quick.unwrap().payload, Bytes::from_static(b"quick"));
    server.stop().await;
}

#[tokio::test]
async fn a_dropped_oneshot_or_a_closed_loop_is_shutting_down() {
    let (server, inbound) = TestServer::start(server_config()).await;
    let mut seen = spawn_loop(inbound);
    let peers = peers();

    let err = peers
        .pull(&server.addr, pull("drop", b""))
        .await
        .unwrap_err();
    assert_eq!(err, CallError::Rejected(Rejection::ShuttingDown));
    assert!(err.retryable());
    assert!(seen.recv().await.unwrap().contains("drop"));
    server.stop().await;

    // A loop that is gone altogether.
    let (server, inbound) = TestServer::start(server_config()).await;
    drop(inbound);
    assert_eq!(
        peers.ping(&server.addr).await.unwrap_err(),
        CallError::Rejected(Rejection::ShuttingDown)
    );
    server.stop().await;
}

#[tokio::test]
async fn shutdown_releases_held_pulls() {
    let (server, inbound) = TestServer::start(server_config()).await;
    let mut seen = spawn_loop(inbound);
    let peers = peers();

    let addr = server.addr.clone();
    let call = tokio::spawn({
        let peers = peers.clone();
        async move { peers.pull(&addr, pull("forever", b"")).await }
    });
    // Once the loop holds the pull, shut the server down.
    assert!(seen.recv().await.unwrap().contains("forever"));
    server.stop().await;
    assert_eq!(
        call.await.unwrap().unwrap_err(),
        CallError::Rejected(Rejection::ShuttingDown)
    );
}

#[tokio::test]
async fn request_timeout_is_unreachable() {
    let (server, inbound) = TestServer::start(server_config()).await;
    let _seen = spawn_loop(inbound);
    let peers = Peers::new(ClientConfig {
        request_timeout: Some(Duration::from_millis(50)),
        ..ClientConfig::new(JOB)
    });
    let err = peers
        .pull(&server.addr, pull("forever", b""))
        .await
        .unwrap_err();
    assert!(
        matches!(err, CallError::Unreachable { .. }),
        "expected Unreachable, got {err:?}"
    );
    assert!(err.retryable());
    server.stop().await;
}

/// A peer that accepts one connection, reads the start of the request, then closes it;
/// with `close_listener` it also stops listening first (the process "died").
async fn breaking_peer(close_listener: bool) -> (String, JoinHandle<()>) {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let handle = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let listener = (!close_listener).then_some(listener);
        let mut buf = [0u8; 64];
        let _ = stream.read(&mut buf).await;
        drop(stream);
        if listener.is_some() {
            // Keep listening (without accepting) until the test is over.
            std::future::pending::<()>().await;
        }
    });
    (addr, handle)
}

#[tokio::test]
async fn a_connection_broken_mid_call_is_classified_by_a_fresh_connect() {
    let peers = peers();

    let (addr, peer) = breaking_peer(true).await;
    let err = peers.pull(&addr, pull("echo", b"")).await.unwrap_err();
    assert_eq!(err, CallError::Refused { addr: addr.clone() });
    peer.await.unwrap();

    let (addr, peer) = breaking_peer(false).await;
    let err = peers.pull(&addr, pull("echo", b"")).await.unwrap_err();
    assert!(
        matches!(err, CallError::Unreachable { .. }),
        "expected Unreachable, got {err:?}"
    );
    peer.abort();
}

#[tokio::test]
async fn a_hold_answers_once_stays_open_and_ends_when_the_server_shuts_down() {
    let (server, inbound) = TestServer::start(server_config()).await;
    let mut seen = spawn_loop(inbound);
    let peers = peers();

    let (reply, held) = peers.hold(&server.addr).await.unwrap();
    assert_eq!(reply, ping_reply());
    assert!(seen.recv().await.unwrap().starts_with("Ping"));
    let ended = tokio::spawn(held.ended());
    // The connection carries other calls meanwhile, and the hold stays open without asking
    // the loop anything more.
    assert_eq!(peers.ping(&server.addr).await.unwrap(), ping_reply());
    assert!(seen.recv().await.unwrap().starts_with("Ping"));
    assert!(!ended.is_finished(), "a hold on a live server stays open");

    // An open hold does not keep the server from draining; it ends as "shutting down".
    server.stop().await;
    assert_eq!(
        ended.await.unwrap(),
        CallError::Rejected(Rejection::ShuttingDown)
    );
    assert!(seen.try_recv().is_err(), "the loop saw only the two pings");
}

#[tokio::test]
async fn a_hold_ends_when_the_loop_is_gone_and_a_closed_port_is_refused() {
    let (server, mut inbound) = TestServer::start(server_config()).await;
    let peers = peers();
    // A loop that answers the hold's question, then goes away.
    let answered = tokio::spawn(async move {
        match inbound.recv().await {
            Some(Inbound::Ping(answer)) => answer.send(ping_reply()).unwrap(),
            other => panic!("expected a ping, got {other:?}"),
        }
        drop(inbound);
    });
    let (reply, held) = peers.hold(&server.addr).await.unwrap();
    assert_eq!(reply, ping_reply());
    answered.await.unwrap();
    assert_eq!(
        held.ended().await,
        CallError::Rejected(Rejection::ShuttingDown)
    );
    server.stop().await;

    let listener = wire::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    drop(listener);
    assert_eq!(
        peers.hold(&addr).await.unwrap_err(),
        CallError::Refused { addr: addr.clone() }
    );
    // A peer that breaks the connection and closes its port: refused too.
    let (addr, peer) = breaking_peer(true).await;
    assert_eq!(
        peers.hold(&addr).await.unwrap_err(),
        CallError::Refused { addr: addr.clone() }
    );
    peer.await.unwrap();
}

#[tokio::test]
async fn a_hold_for_another_job_is_refused() {
    let (server, inbound) = TestServer::start(server_config()).await;
    let mut seen = spawn_loop(inbound);
    let other = Peers::new(ClientConfig::new("job-b"));
    assert_eq!(
        other.hold(&server.addr).await.unwrap_err(),
        CallError::Rejected(Rejection::WrongJob {
            expected: JOB.into(),
            got: "job-b".into()
        })
    );
    server.stop().await;
    assert!(seen.recv().await.is_none(), "the loop never saw the hold");
}

/// A [`wire::Direct`] over a stand-in for the node's runtime (`runtime`): a pull finding it
/// free is answered here at once (`now:` + payload); one finding it held waits for it
/// (its payload is reported on `waiting`), then is answered here (`after:` + payload), or,
/// for the payload `back`, given back to go through the loop.
struct Gated {
    runtime: std::sync::Arc<tokio::sync::Mutex<()>>,
    waiting: mpsc::UnboundedSender<String>,
}

fn answer_here(msg: Inbound, prefix: &'static str) -> futures::future::BoxFuture<'static, ()> {
    Box::pin(async move {
        if let Inbound::Pull(req, answer) = msg {
            let mut payload = prefix.as_bytes().to_vec();
            payload.extend_from_slice(&req.payload);
            let _ = answer.send(Ok(PullAnswer {
                payload: payload.into(),
                server_term: 7,
            }));
        }
    })
}

impl wire::Direct for Gated {
    fn try_handle(&self, msg: Inbound) -> wire::Handling {
        if let Ok(_held) = self.runtime.clone().try_lock_owned() {
            return wire::Handling::Now(answer_here(msg, "now:"));
        }
        let payload = match &msg {
            Inbound::Pull(req, _) => String::from_utf8_lossy(&req.payload).into_owned(),
            _ => String::new(),
        };
        let _ = self.waiting.send(payload.clone());
        let runtime = self.runtime.clone();
        wire::Handling::After(Box::pin(async move {
            let _held = runtime.lock_owned().await;
            if payload == "back" {
                Err(msg)
            } else {
                Ok(answer_here(msg, "after:"))
            }
        }))
    }
}

/// Messages that find the node's runtime lent to another handling wait for it on their own
/// gRPC task (not in the loop's queue), and are then handled there, or handed to the loop when
/// the direct handler gives them back; a server that stops meanwhile refuses them at once.
#[tokio::test]
async fn a_message_made_to_wait_by_the_direct_handler_is_served_when_its_turn_comes() {
    let listener = wire::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (inbound_tx, inbound) = mpsc::channel(64);
    let mut seen = spawn_loop(inbound);
    let runtime = std::sync::Arc::new(tokio::sync::Mutex::new(()));
    let (waiting_tx, mut waiting) = mpsc::unbounded_channel();
    let direct = std::sync::Arc::new(Gated {
        runtime: runtime.clone(),
        waiting: waiting_tx,
    });
    let (shutdown, stop) = oneshot::channel::<()>();
    let server = tokio::spawn(wire::serve_with(
        listener,
        server_config(),
        inbound_tx,
        Some(direct),
        async move {
            let _ = stop.await;
        },
    ));
    let peers = peers();
    let free = peers.pull(&addr, pull("echo", b"a")).await.unwrap();
    assert_eq!(free.payload, Bytes::from_static(b"now:a"));

    // The runtime is held: both calls wait for it.
    let held = runtime.clone().lock_owned().await;
    let calls = tokio::spawn({
        let (peers, addr) = (peers.clone(), addr.clone());
        async move {
            tokio::join!(
                peers.pull(&addr, pull("echo", b"b")),
                peers.pull(&addr, pull("echo", b"back")),
            )
        }
    });
    let mut arrived = vec![waiting.recv().await.unwrap(), waiting.recv().await.unwrap()];
    arrived.sort();
    assert_eq!(arrived, ["b", "back"]);
    drop(held);
    let (served, given_back) = calls.await.unwrap();
    assert_eq!(served.unwrap().payload, Bytes::from_static(b"after:b"));
    // The loop (the fake one echoes) got only the message given back.
    assert_eq!(given_back.unwrap().payload, Bytes::from_static(b"back"));
    let through_loop = seen.recv().await.unwrap();
    assert!(through_loop.contains("back"), "{through_loop}");
    assert!(seen.try_recv().is_err(), "nothing else went to the loop");

    // A server stopping while a call waits for the runtime refuses it.
    let _held = runtime.clone().lock_owned().await;
    let call = tokio::spawn({
        let (peers, addr) = (peers.clone(), addr.clone());
        async move { peers.pull(&addr, pull("echo", b"d")).await }
    });
    assert_eq!(waiting.recv().await.unwrap(), "d");
    let _ = shutdown.send(());
    let refused = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("the waiting call is refused while the runtime is still held");
    assert_eq!(
        refused.unwrap().unwrap_err(),
        CallError::Rejected(Rejection::ShuttingDown)
    );
    server.await.unwrap().unwrap();
}

/// A loop that hands every pull to the test, with its answer channel.
fn pulls_to_test(mut inbound: mpsc::Receiver<Inbound>) -> LoopPulls {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(msg) = inbound.recv().await {
            match msg {
                Inbound::Pull(req, answer) => {
                    let _ = tx.send((req, answer));
                }
                other => panic!("only pulls expected, got {other:?}"),
            }
        }
    });
    rx
}

type LoopPulls =
    mpsc::UnboundedReceiver<(PullRequest, oneshot::Sender<Result<PullAnswer, Rejection>>)>;

/// Answers the next pull the loop gets with its own payload.
async fn echo_next(loop_pulls: &mut LoopPulls) {
    let (req, answer) = loop_pulls.recv().await.unwrap();
    answer
        .send(Ok(PullAnswer {
            payload: req.payload,
            server_term: 7,
        }))
        .unwrap();
}

/// `peers.pull(addr, req)` as a task of its own.
fn spawn_pull(
    peers: &Peers,
    addr: &str,
    req: PullRequest,
) -> JoinHandle<Result<PullAnswer, CallError>> {
    let (peers, addr) = (peers.clone(), addr.to_owned());
    tokio::spawn(async move { peers.pull(&addr, req).await })
}

fn numbered(seq: u64, payload: Bytes) -> PullRequest {
    PullRequest {
        seq,
        payload,
        ..pull("echo", b"")
    }
}

#[tokio::test]
async fn pulls_in_flight_together_are_answered_each_with_its_own_answer_in_any_order() {
    let (server, inbound) = TestServer::start(server_config()).await;
    let mut loop_pulls = pulls_to_test(inbound);
    let peers = peers();
    const N: u64 = 16;
    let calls: Vec<_> = (0..N)
        .map(|seq| {
            let (peers, addr) = (peers.clone(), server.addr.clone());
            tokio::spawn(async move {
                let payload = Bytes::from(format!("payload {seq}"));
                let answer = peers.pull(&addr, numbered(seq, payload)).await;
                (seq, answer)
            })
        })
        .collect();
    // Every pull reaches the loop before any is answered; the loop answers the last first.
    let mut held = Vec::new();
    for _ in 0..N {
        held.push(loop_pulls.recv().await.unwrap());
    }
    held.sort_by_key(|(req, _)| std::cmp::Reverse(req.seq));
    for (req, answer) in held {
        let payload = Bytes::from(format!("answer to {}", req.seq));
        answer
            .send(Ok(PullAnswer {
                payload,
                server_term: req.seq,
            }))
            .unwrap();
    }
    for call in calls {
        let (seq, answer) = call.await.unwrap();
        let answer = answer.unwrap();
        assert_eq!(answer.payload, Bytes::from(format!("answer to {seq}")));
        assert_eq!(answer.server_term, seq);
    }
    server.stop().await;
}

/// Pulls `seq`; it reaches the loop `times` times, each answered with `payload`, and its
/// caller gets that payload (bounded: a pull asked for once more than expected fails).
async fn pull_seen(
    peers: &Peers,
    addr: &str,
    loop_pulls: &mut LoopPulls,
    seq: u64,
    times: usize,
    payload: Bytes,
) {
    let call = spawn_pull(peers, addr, numbered(seq, Bytes::new()));
    for round in 0..times {
        let (req, answer) = tokio::time::timeout(Duration::from_secs(10), loop_pulls.recv())
            .await
            .expect("the pull reached the loop as often as expected")
            .unwrap();
        assert_eq!(req.seq, seq, "round {round}");
        answer
            .send(Ok(PullAnswer {
                payload: payload.clone(),
                server_term: 7,
            }))
            .unwrap();
    }
    let answer = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("answered after the rounds expected")
        .unwrap()
        .unwrap();
    assert_eq!(answer.payload, payload, "pull {seq}");
}

#[tokio::test]
async fn an_answer_larger_than_a_lane_takes_is_asked_for_again_as_a_call_of_its_own() {
    let (server, inbound) = TestServer::start(server_config()).await;
    let mut loop_pulls = pulls_to_test(inbound);
    let peers = peers();
    let large = Bytes::from(vec![3u8; wire::LANE_MAX_BYTES + 1]);
    // Twice: on the lane, then as a unary call (a node's serve book answers the second from
    // the answer it kept; the handler does not run again).
    let addr = server.addr.clone();
    pull_seen(&peers, &addr, &mut loop_pulls, 1, 2, large.clone()).await;
    // The method's next pull goes as a unary call at once.
    pull_seen(&peers, &addr, &mut loop_pulls, 2, 1, large.clone()).await;
    // Answered small there, the method comes back to the lane, where a large answer is again
    // asked for twice.
    pull_seen(
        &peers,
        &addr,
        &mut loop_pulls,
        3,
        1,
        Bytes::from_static(b"s"),
    )
    .await;
    pull_seen(&peers, &addr, &mut loop_pulls, 4, 2, large).await;
    server.stop().await;
    assert!(
        loop_pulls.recv().await.is_none(),
        "no pull reached the loop more often than expected"
    );
}

#[tokio::test]
async fn a_pull_its_caller_gives_up_is_cancelled_at_the_server_and_the_lane_goes_on() {
    let (server, inbound) = TestServer::start(server_config()).await;
    let mut loop_pulls = pulls_to_test(inbound);
    let peers = peers();
    let (give_up, gave_up) = oneshot::channel::<()>();
    let call = tokio::spawn({
        let (peers, addr) = (peers.clone(), server.addr.clone());
        async move {
            tokio::select! {
                r = peers.pull(&addr, numbered(1, Bytes::new())) => Some(r),
                _ = gave_up => None,
            }
        }
    });
    let (_, mut held) = loop_pulls.recv().await.unwrap();
    give_up.send(()).unwrap();
    assert!(call.await.unwrap().is_none(), "the caller gave up first");
    // The server stops handling it: the loop's answer channel closes (bounded wait, so a
    // broken cancel fails the test instead of hanging it).
    tokio::time::timeout(Duration::from_secs(10), held.closed())
        .await
        .expect("the given-up pull was cancelled at the server");
    // The lane still carries pulls.
    let call = spawn_pull(
        &peers,
        &server.addr,
        numbered(2, Bytes::from_static(b"next")),
    );
    echo_next(&mut loop_pulls).await;
    assert_eq!(
        call.await.unwrap().unwrap().payload,
        Bytes::from_static(b"next")
    );
    server.stop().await;
}

#[tokio::test]
async fn a_request_the_server_would_not_decode_is_refused_alone_and_the_others_are_answered() {
    const LIMIT: usize = 4096;
    let (server, inbound) = TestServer::start(ServerConfig {
        max_frame_bytes: LIMIT,
        ..server_config()
    })
    .await;
    let mut loop_pulls = pulls_to_test(inbound);
    // This client allows more than the server decodes.
    let peers = Peers::new(ClientConfig {
        max_frame_bytes: 16 * LIMIT,
        ..ClientConfig::new(JOB)
    });
    let held = spawn_pull(
        &peers,
        &server.addr,
        numbered(1, Bytes::from_static(b"held")),
    );
    let (req, answer) = loop_pulls.recv().await.unwrap();
    // While it is in flight, a request above the server's limit is refused on its own.
    let too_big = numbered(2, Bytes::from(vec![1u8; 2 * LIMIT]));
    match peers.pull(&server.addr, too_big).await.unwrap_err() {
        CallError::Rejected(Rejection::TooLarge { limit, .. }) => assert_eq!(limit, LIMIT),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    answer
        .send(Ok(PullAnswer {
            payload: req.payload,
            server_term: 7,
        }))
        .unwrap();
    assert_eq!(
        held.await.unwrap().unwrap().payload,
        Bytes::from_static(b"held")
    );
    server.stop().await;
}

/// A node of an older version, written at the wire level: serves the unary `Pull` (each
/// answered with its request's payload, term 7), `Meta` and `Replicate` (taken), and lanes only
/// with `lane_carries` set (what the lane names in `taskgraph-lane-carries`: `""` for a lane of
/// pulls only, as before metas rode lanes; the lane takes metas and replication entries
/// whatever it names, and serves no pulls); refuses every other method as unimplemented (or a
/// lane with `lane_refusal`, when set), counts the lanes asked for, and notes how each meta and
/// replication entry came (`"unary meta"`, `"lane replicate"`, ...).
#[derive(Clone, Default)]
struct LanelessNode {
    lanes_asked: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    lane_refusal: Option<Rejection>,
    lane_carries: Option<&'static str>,
    calls: std::sync::Arc<std::sync::Mutex<Vec<&'static str>>>,
}

impl LanelessNode {
    fn calls(&self) -> Vec<&'static str> {
        self.calls.lock().unwrap().clone()
    }
}

impl tonic::server::NamedService for LanelessNode {
    const NAME: &'static str = "taskgraph.wire.Taskgraph";
}

/// Answers a raw `PullRequest` with a raw `PullAnswer` carrying its payload.
struct RawEcho;

impl tonic::server::UnaryService<Bytes> for RawEcho {
    type Response = Bytes;
    type Future = std::future::Ready<Result<tonic::Response<Bytes>, Status>>;

    fn call(&mut self, request: tonic::Request<Bytes>) -> Self::Future {
        // PullRequest field 4 (payload): found by walking the fields (varints and
        // length-delimited ones only, as a PullRequest has).
        use prost::encoding::decode_varint;
        let mut buf = request.into_inner();
        let mut payload = Bytes::new();
        while buf.has_remaining() {
            let key = decode_varint(&mut buf).unwrap();
            if key & 7 == 0 {
                decode_varint(&mut buf).unwrap();
                continue;
            }
            let len = usize::try_from(decode_varint(&mut buf).unwrap()).unwrap();
            let value = buf.copy_to_bytes(len);
            if key == (4 << 3 | 2) {
                payload = value;
            }
        }
        let mut answer = Vec::new();
        answer.put_u8(1 << 3 | 2);
        answer.put_u8(u8::try_from(payload.len()).unwrap());
        answer.put_slice(&payload);
        answer.put_u8(2 << 3);
        answer.put_u8(7);
        std::future::ready(Ok(tonic::Response::new(Bytes::from(answer))))
    }
}

/// Takes a raw message answered by an empty `Ack`, noting it as `.1`.
struct RawAcked(
    std::sync::Arc<std::sync::Mutex<Vec<&'static str>>>,
    &'static str,
);

impl tonic::server::UnaryService<Bytes> for RawAcked {
    type Response = Bytes;
    type Future = std::future::Ready<Result<tonic::Response<Bytes>, Status>>;

    fn call(&mut self, _: tonic::Request<Bytes>) -> Self::Future {
        self.0.lock().unwrap().push(self.1);
        std::future::ready(Ok(tonic::Response::new(Bytes::new())))
    }
}

/// A raw lane: acknowledges each meta and replication entry on it (`LaneAnswer { call, ack }`),
/// noting it; ends the lane at anything else. Names its frame limit, and `carries`.
struct RawLane {
    carries: &'static str,
    seen: std::sync::Arc<std::sync::Mutex<Vec<&'static str>>>,
}

type RawStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<Bytes, Status>> + Send>>;

impl tonic::server::StreamingService<Bytes> for RawLane {
    type Response = Bytes;
    type ResponseStream = RawStream;
    type Future = std::future::Ready<Result<tonic::Response<RawStream>, Status>>;

    fn call(&mut self, request: tonic::Request<tonic::Streaming<Bytes>>) -> Self::Future {
        use futures::StreamExt;
        use prost::encoding::decode_varint;
        let seen = self.seen.clone();
        let answers = request.into_inner().map(move |frame| {
            // LanePull: call (field 1), then the call: a meta is field 5, a replication entry 6.
            let mut buf = frame?;
            let (mut call, mut kind) = (None, None);
            while buf.has_remaining() {
                let key = decode_varint(&mut buf).unwrap();
                let value = decode_varint(&mut buf).unwrap();
                if key & 7 == 2 {
                    buf.advance(usize::try_from(value).unwrap());
                }
                match key >> 3 {
                    1 => call = Some(value),
                    5 => kind = Some("lane meta"),
                    6 => kind = Some("lane replicate"),
                    _ => {}
                }
            }
            let Some(kind) = kind else {
                return Err(Status::unimplemented(
                    "this lane takes metas and replicas only",
                ));
            };
            seen.lock().unwrap().push(kind);
            let mut answer = Vec::new();
            pb_uint(1, call.unwrap_or(0), &mut answer);
            pb_bytes(5, &[], &mut answer);
            Ok(Bytes::from(answer))
        });
        let mut response = tonic::Response::new(Box::pin(answers) as RawStream);
        let md = response.metadata_mut();
        md.insert("taskgraph-lane-limit", "2097152".parse().unwrap());
        if !self.carries.is_empty() {
            md.insert("taskgraph-lane-carries", self.carries.parse().unwrap());
        }
        std::future::ready(Ok(response))
    }
}

impl tonic::codegen::Service<tonic::codegen::http::Request<tonic::body::Body>> for LanelessNode {
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: tonic::codegen::http::Request<tonic::body::Body>) -> Self::Future {
        let node = self.clone();
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(RawCodec);
            match request.uri().path() {
                "/taskgraph.wire.Taskgraph/Pull" => Ok(grpc.unary(RawEcho, request).await),
                "/taskgraph.wire.Taskgraph/Meta" => Ok(grpc
                    .unary(RawAcked(node.calls.clone(), "unary meta"), request)
                    .await),
                "/taskgraph.wire.Taskgraph/Replicate" => Ok(grpc
                    .unary(RawAcked(node.calls.clone(), "unary replicate"), request)
                    .await),
                path => {
                    if path.ends_with("/Lane") {
                        node.lanes_asked
                            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        if let Some(rejection) = node.lane_refusal {
                            return Ok(Status::from(rejection).into_http());
                        }
                        if let Some(carries) = node.lane_carries {
                            let lane = RawLane {
                                carries,
                                seen: node.calls.clone(),
                            };
                            return Ok(grpc.streaming(lane, request).await);
                        }
                    }
                    Ok(Status::unimplemented(path.to_owned()).into_http())
                }
            }
        })
    }
}

/// Serves `node` on a free port; its address and the server's task.
async fn serve_raw(
    node: LanelessNode,
) -> (String, JoinHandle<Result<(), tonic::transport::Error>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(node)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    (addr, server)
}

#[tokio::test]
async fn a_lane_the_server_ends_fails_its_calls_for_a_retry_not_for_good() {
    // The lane's status is about the lane: a pull on it is not refused as malformed (which
    // would fail it for good), it is to be retried.
    let node = LanelessNode {
        lane_refusal: Some(Rejection::Malformed {
            reason: "a frame on this lane did not decode".into(),
        }),
        ..LanelessNode::default()
    };
    let (addr, server) = serve_raw(node.clone()).await;
    let peers = peers();
    let err = peers
        .pull(&addr, numbered(1, Bytes::from_static(b"x")))
        .await
        .unwrap_err();
    assert!(
        matches!(err, CallError::Unreachable { .. }) && err.retryable(),
        "expected a retryable Unreachable, got {err:?}"
    );
    // The next pull asks for a new lane.
    let _ = peers
        .pull(&addr, numbered(2, Bytes::from_static(b"y")))
        .await;
    assert_eq!(
        node.lanes_asked.load(std::sync::atomic::Ordering::SeqCst),
        2
    );
    server.abort();
}

#[tokio::test]
async fn a_peer_without_lanes_is_pulled_with_unary_calls() {
    let node = LanelessNode::default();
    let (addr, server) = serve_raw(node.clone()).await;
    let peers = peers();
    for round in 0..3u8 {
        let payload = Bytes::from(vec![round; 5]);
        let answer = peers
            .pull(&addr, numbered(u64::from(round), payload.clone()))
            .await
            .unwrap();
        assert_eq!(answer.payload, payload, "round {round}");
        assert_eq!(answer.server_term, 7);
    }
    assert_eq!(
        node.lanes_asked.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "a lane is asked for once; the peer's answer is remembered"
    );
    server.abort();
}

/// Protobuf fields, for raw lane messages.
fn pb_uint(field: u64, v: u64, out: &mut Vec<u8>) {
    prost::encoding::encode_varint(field << 3, out);
    prost::encoding::encode_varint(v, out);
}

fn pb_bytes(field: u64, v: &[u8], out: &mut Vec<u8>) {
    prost::encoding::encode_varint(field << 3 | 2, out);
    prost::encoding::encode_varint(v.len() as u64, out);
    out.extend_from_slice(v);
}

/// A raw `LanePull` carrying the pull of `pull("echo", b"")` with sequence `seq` as `call`.
fn raw_lane_request(call: u64, seq: u64) -> Bytes {
    let h = header(1, 2);
    let mut head = Vec::new();
    pb_bytes(1, h.job.as_bytes(), &mut head);
    pb_uint(2, h.epoch, &mut head);
    pb_uint(3, u64::from(h.from_task), &mut head);
    pb_uint(4, u64::from(h.to_task), &mut head);
    pb_uint(5, h.term, &mut head);
    let mut request = Vec::new();
    pb_bytes(1, &head, &mut request);
    pb_uint(2, seq, &mut request);
    pb_bytes(3, b"echo", &mut request);
    let mut frame = Vec::new();
    pb_uint(1, call, &mut frame);
    pb_bytes(2, &request, &mut frame);
    pb_uint(4, 1 << 20, &mut frame);
    Bytes::from(frame)
}

/// A raw `LanePull` cancelling `call`.
fn raw_lane_cancel(call: u64) -> Bytes {
    let mut frame = Vec::new();
    pb_uint(1, call, &mut frame);
    pb_bytes(3, &[], &mut frame);
    Bytes::from(frame)
}

#[tokio::test]
async fn a_call_number_reused_after_its_cancel_names_the_new_call() {
    let (server, inbound) = TestServer::start(server_config()).await;
    let mut loop_pulls = pulls_to_test(inbound);
    let mut grpc = raw_grpc(&server.addr).await;
    let (frames, rx) = mpsc::unbounded_channel::<Bytes>();
    let mut rx = rx;
    let outgoing = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let _answers = grpc
        .streaming(
            tonic::Request::new(outgoing),
            PathAndQuery::from_static("/taskgraph.wire.Taskgraph/Lane"),
            RawCodec,
        )
        .await
        .unwrap();
    let bounded =
        |what: &'static str| move |r: Result<(), tokio::time::error::Elapsed>| r.expect(what);
    // Call 7 is held by the loop.
    frames.send(raw_lane_request(7, 1)).unwrap();
    let (_, mut first) = loop_pulls.recv().await.unwrap();
    // Cancelled, and at once call 7 again, a new pull: the first call's end must not make the
    // lane forget the second.
    frames.send(raw_lane_cancel(7)).unwrap();
    frames.send(raw_lane_request(7, 2)).unwrap();
    let (req, mut second) = loop_pulls.recv().await.unwrap();
    assert_eq!(req.seq, 2);
    bounded("the first call was cancelled")(
        tokio::time::timeout(Duration::from_secs(10), first.closed()).await,
    );
    // Cancelling call 7 now cancels the second pull.
    frames.send(raw_lane_cancel(7)).unwrap();
    bounded("the second call was cancelled")(
        tokio::time::timeout(Duration::from_secs(10), second.closed()).await,
    );
    server.stop().await;
}

#[tokio::test]
async fn metas_and_replicas_ride_the_lane_only_to_a_peer_whose_lanes_carry_them() {
    let meta = Meta {
        header: header(3, 0),
        link: "children".into(),
        meta: "done".into(),
    };
    let entry = |data: Vec<u8>| Replicate {
        header: header(2, 2),
        index: 4,
        kind: ReplicateKind::Update,
        data: Bytes::from(data),
    };
    // A peer without lanes; one whose lanes carry pulls only (the version before metas rode
    // them); one whose lanes carry metas only; one whose lanes carry both (and an unknown
    // kind, ignored). A replication entry above the lane's limit goes alone either way.
    for (carries, expected) in [
        (None, ["unary meta", "unary replicate", "unary replicate"]),
        (
            Some(""),
            ["unary meta", "unary replicate", "unary replicate"],
        ),
        (
            Some("meta"),
            ["lane meta", "unary replicate", "unary replicate"],
        ),
        (
            Some("pulse, replicate,meta"),
            ["lane meta", "lane replicate", "unary replicate"],
        ),
    ] {
        let node = LanelessNode {
            lane_carries: carries,
            ..LanelessNode::default()
        };
        let (addr, server) = serve_raw(node.clone()).await;
        let peers = peers();
        peers.meta(&addr, meta.clone()).await.unwrap();
        peers.replicate(&addr, entry(vec![1; 16])).await.unwrap();
        peers
            .replicate(&addr, entry(vec![2; 3 << 20]))
            .await
            .unwrap();
        assert_eq!(node.calls(), expected, "the lane carries {carries:?}");
        assert_eq!(
            node.lanes_asked.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "one lane asked for ({carries:?})"
        );
        server.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_at_its_bound_refuses_a_call_as_retryable_and_still_reads_cancels() {
    let (server, mut inbound) = TestServer::start(server_config()).await;
    // The loop: pulls to the test, replication entries taken (and reported).
    let (pulls_tx, mut loop_pulls) = mpsc::unbounded_channel();
    let (entries_tx, mut entries) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(msg) = inbound.recv().await {
            match msg {
                Inbound::Pull(req, answer) => {
                    let _ = pulls_tx.send((req, answer));
                }
                Inbound::Replicate(entry, answer) => {
                    let _ = answer.send(Ok(()));
                    let _ = entries_tx.send(entry.index);
                }
                other => panic!("only pulls and entries expected, got {other:?}"),
            }
        }
    });
    let peers = peers();
    // As many pulls as a lane handles at once, all held by the loop.
    let bound = wire::LANE_MAX_CALLS;
    let pulls: Vec<_> = (0..bound as u64)
        .map(|seq| spawn_pull(&peers, &server.addr, numbered(seq, Bytes::new())))
        .collect();
    let mut replies = std::collections::HashMap::new();
    for _ in 0..bound {
        let (req, reply) = loop_pulls.recv().await.unwrap();
        replies.insert(req.seq, reply);
    }
    // One more is refused at once as "not ready", to be retried: the lane is still read.
    let extra = numbered(u64::MAX, Bytes::new());
    let err = tokio::time::timeout(
        Duration::from_secs(30),
        peers.pull(&server.addr, extra.clone()),
    )
    .await
    .expect("a call past the lane's bound was answered")
    .unwrap_err();
    assert_eq!(
        err,
        CallError::Rejected(Rejection::NotReady {
            task: extra.header.to_task,
            epoch: extra.header.epoch,
        })
    );
    assert!(err.retryable());
    // A replication entry is not refused (its primary would take the backup for out of step):
    // it goes as a unary call of its own.
    let entry = Replicate {
        header: header(1, 1),
        index: 9,
        kind: ReplicateKind::Update,
        data: Bytes::from_static(b"state"),
    };
    tokio::time::timeout(
        Duration::from_secs(30),
        peers.replicate(&server.addr, entry),
    )
    .await
    .expect("an entry past the lane's bound was answered")
    .unwrap();
    assert_eq!(entries.recv().await, Some(9));
    // A pull its caller gives up is cancelled at the server even at the bound.
    pulls[7].abort();
    let mut cancelled = replies.remove(&7).unwrap();
    tokio::time::timeout(Duration::from_secs(30), cancelled.closed())
        .await
        .expect("the cancel was read at the lane's bound");
    // One more call on the lane after the cancel (refused, or taken in the freed place):
    // the cancel's handling is over, and it cancelled nothing else.
    let probe = spawn_pull(&peers, &server.addr, numbered(u64::MAX - 1, Bytes::new()));
    tokio::select! {
        taken = loop_pulls.recv() => assert_eq!(taken.unwrap().0.seq, u64::MAX - 1),
        refused = probe => assert!(refused.unwrap().unwrap_err().retryable()),
    }
    assert!(
        replies.values().all(|r| !r.is_closed()),
        "only the given-up pull was cancelled"
    );
    for p in &pulls {
        p.abort();
    }
    server.stop().await;
}
