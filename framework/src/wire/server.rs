//! The receiving side: a tonic server that validates frames and hands them to the node's
//! event loop as [`Inbound`] messages.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use std::sync::Arc;

use futures::StreamExt;
use prost::Message;
use tokio::net::{TcpListener, ToSocketAddrs};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::codegen::{http, Service};
use tonic::server::NamedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Server, ServerTlsConfig};
use tonic::{Code, Request, Response, Status};

use super::error::WireError;
use super::lane::{LANE_CARRIES, LANE_CARRIES_METADATA_KEY, LANE_LIMIT_METADATA_KEY};
use super::proto;
use super::proto::taskgraph_server::{Taskgraph, TaskgraphServer};
use super::rejection::{tonic_size_limit, Rejection};
use super::types::{Acknowledge, Header, Meta, PingReply, PullAnswer, PullRequest, Replicate};
use super::{
    DEFAULT_MAX_FRAME_BYTES, HTTP2_CONNECTION_WINDOW, HTTP2_MAX_FRAME, HTTP2_STREAM_WINDOW,
    LANE_MAX_CALLS, LANE_OVERHEAD,
};
pub use crate::lend::Lent;
use crate::lend::{poll_once, Unfinished, Work};
use crate::security::LoadedTls;

/// Interval of the server's HTTP/2 keepalive pings (detects dead clients holding pulls).
pub const SERVER_HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long the server waits for a keepalive ping to be acknowledged before closing the
/// connection.
pub const SERVER_HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a connecting peer may take to complete the TLS handshake.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Configuration of [`serve`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// The job this node serves; messages for other jobs are refused with
    /// [`Rejection::WrongJob`].
    pub job: String,
    /// Number of tasks of the job; task ids `>= num_tasks` are refused with
    /// [`Rejection::UnknownTask`].
    pub num_tasks: u32,
    /// Largest encoded message accepted or sent, in bytes (tonic's
    /// `max_decoding_message_size`/`max_encoding_message_size`). Larger requests are refused
    /// with [`Rejection::TooLarge`] (`ResourceExhausted`); so are answers from the loop that
    /// would exceed it. Default [`DEFAULT_MAX_FRAME_BYTES`].
    pub max_frame_bytes: usize,
    /// Mutual TLS: the server presents `identity` (required) and accepts only connections
    /// whose client certificate chains to `ca_pem`; with a `server_name`, every call's client
    /// certificate must also be valid for that name (else `PermissionDenied`). `None` (the
    /// default): plain text, logged as a warning.
    pub tls: Option<LoadedTls>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            job: String::new(),
            num_tasks: 0,
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            tls: None,
        }
    }
}

impl ServerConfig {
    /// A configuration for `job` with `num_tasks` tasks and the default frame limit.
    pub fn new(job: impl Into<String>, num_tasks: u32) -> Self {
        ServerConfig {
            job: job.into(),
            num_tasks,
            ..ServerConfig::default()
        }
    }
}

/// A validated message handed by [`serve`] to the node's event loop, with the channel on which
/// the loop answers.
///
/// The loop may hold a `Pull`'s sender for as long as it needs (until the task can answer).
/// Dropping a sender without answering refuses the message with [`Rejection::ShuttingDown`].
/// If the caller gives up (timeout, cancelled call, dropped connection, server shutdown) the
/// receiving half is dropped and the loop's `send` fails; the loop must tolerate that.
#[derive(Debug)]
pub enum Inbound {
    /// A pull for task `header.to_task`; answer with the data or a rejection.
    Pull(PullRequest, oneshot::Sender<Result<PullAnswer, Rejection>>),
    /// A meta flag for task `header.to_task`.
    Meta(Meta, oneshot::Sender<Result<(), Rejection>>),
    /// The requester of a pull to task `header.to_task` received its answer.
    Acknowledge(Acknowledge, oneshot::Sender<Result<(), Rejection>>),
    /// A replication entry for the backup of task `header.to_task`.
    Replicate(Replicate, oneshot::Sender<Result<(), Rejection>>),
    /// "Who are you?"
    Ping(oneshot::Sender<PingReply>),
}

/// A way for the server to handle a message on the gRPC handler's own task instead of handing
/// it to the event loop, when the loop is idle: one task hop and two wake-ups less per call.
pub trait Direct: Send + Sync + 'static {
    /// Takes `msg` to handle on the calling task (see [`Handling`]), or gives it back to go
    /// through the loop. The server polls the work once on the calling task and, if it is not
    /// done, finishes it as a task of its own (so a caller that gives up never cuts the
    /// handling short); a call waiting for the node's runtime ([`Lent::After`]) is refused at
    /// once when the server stops.
    fn try_handle(&self, msg: Inbound) -> Handling;
}

/// What [`Direct::try_handle`] makes of a message.
pub type Handling = Lent<Inbound>;

/// Binds a listener for [`serve`] (e.g. `"0.0.0.0:0"` for any free port).
pub async fn bind(addr: impl ToSocketAddrs) -> Result<TcpListener, WireError> {
    TcpListener::bind(addr).await.map_err(WireError::Bind)
}

/// Serves the node-to-node protocol on `listener` until `shutdown` completes.
///
/// Checks done here, without the event loop: the job name ([`Rejection::WrongJob`]), task ids
/// `< num_tasks` ([`Rejection::UnknownTask`]), frame size ([`Rejection::TooLarge`]) and
/// decodability/required fields ([`Rejection::Malformed`]). Everything else is forwarded on
/// `inbound`; a closed `inbound` channel refuses with [`Rejection::ShuttingDown`].
///
/// With [`ServerConfig::tls`], every connection must complete a TLS handshake presenting a
/// client certificate that chains to the configured CA; others are dropped during the
/// handshake, before any message is read.
///
/// When `shutdown` completes, the listening socket is closed at once, calls still waiting for
/// the loop are refused with `ShuttingDown`, and the function returns once the open
/// connections have drained.
pub async fn serve(
    listener: TcpListener,
    config: ServerConfig,
    inbound: mpsc::Sender<Inbound>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), WireError> {
    serve_with(listener, config, inbound, None, shutdown).await
}

/// [`serve`], handling what `direct` takes on the gRPC handler's task (see [`Direct`]); the
/// rest goes to `inbound`. Work `direct` started and did not finish in one poll is aborted
/// when this returns.
pub async fn serve_with(
    listener: TcpListener,
    config: ServerConfig,
    inbound: mpsc::Sender<Inbound>,
    direct: Option<Arc<dyn Direct>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), WireError> {
    let local = listener.local_addr().map_err(WireError::Bind)?;
    let stop = CancellationToken::new();
    // Also release held calls if we return for any other reason.
    let _stop_on_return = stop.clone().drop_guard();
    let limit = config.max_frame_bytes;
    let tls = config.tls.clone();
    let node = Node {
        peer_name: tls.as_ref().and_then(|t| t.server_name.clone()),
        job: config.job,
        num_tasks: config.num_tasks,
        max_frame_bytes: limit,
        inbound,
        direct,
        unfinished: Arc::default(),
        stop: stop.clone(),
    };
    let grpc = TaskgraphServer::new(node)
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let signal = async move {
        shutdown.await;
        stop.cancel();
    };
    let mut server = Server::builder()
        .http2_keepalive_interval(Some(SERVER_HTTP2_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(SERVER_HTTP2_KEEPALIVE_TIMEOUT))
        .initial_stream_window_size(HTTP2_STREAM_WINDOW)
        .initial_connection_window_size(HTTP2_CONNECTION_WINDOW)
        .max_frame_size(HTTP2_MAX_FRAME);
    match &tls {
        Some(tls) => {
            let identity = tls.tonic_identity().ok_or_else(|| {
                WireError::Tls("a TLS server needs a certificate and its key".into())
            })?;
            let tls_config = ServerTlsConfig::new()
                .identity(identity)
                .client_ca_root(tls.tonic_ca())
                .timeout(TLS_HANDSHAKE_TIMEOUT);
            server = server
                .tls_config(tls_config)
                .map_err(|e| WireError::Tls(e.to_string()))?;
            tracing::info!(%local, "node transport: mutual TLS (peers need a certificate from the job's CA)");
        }
        None => tracing::warn!(
            %local,
            "node transport: PLAIN TEXT, no TLS; anyone who can reach this port can pull data \
             (use peer TLS outside local development)"
        ),
    }
    tracing::debug!(%local, "wire server listening");
    let result = server
        .add_service(SizeLimitStatus { inner: grpc })
        .serve_with_incoming_shutdown(incoming, signal)
        .await
        .map_err(WireError::Serve);
    tracing::debug!(%local, ok = result.is_ok(), "wire server stopped");
    result
}

/// The generated service's implementation (cloned once per lane, for the lane's tasks).
#[derive(Clone)]
struct Node {
    /// With TLS: the name every caller's certificate must be valid for.
    peer_name: Option<String>,
    job: String,
    num_tasks: u32,
    max_frame_bytes: usize,
    inbound: mpsc::Sender<Inbound>,
    direct: Option<Arc<dyn Direct>>,
    /// Direct work not finished in its first poll (aborted when the server ends).
    unfinished: Arc<Unfinished>,
    stop: CancellationToken,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("job", &self.job)
            .field("num_tasks", &self.num_tasks)
            .field("direct", &self.direct.is_some())
            .finish_non_exhaustive()
    }
}

impl Node {
    /// Answers "who are you" through the event loop (refused when `job` names another job; an
    /// empty job asks without claiming one).
    async fn who_am_i(&self, request: proto::PingRequest) -> Result<proto::PingReply, Rejection> {
        if !request.job.is_empty() {
            self.check_job(&request.job)?;
        }
        let reply = proto::PingReply::from(self.dispatch(Inbound::Ping).await?);
        self.check_answer_size(reply.encoded_len())?;
        Ok(reply)
    }

    /// With TLS and a configured peer name: the caller's certificate (already verified to
    /// chain to the job's CA during the handshake) must be valid for that name.
    fn check_peer<T>(&self, rpc: &'static str, request: &Request<T>) -> Result<(), Status> {
        let Some(name) = &self.peer_name else {
            return Ok(());
        };
        let refuse = |why: String| {
            tracing::debug!(rpc, peer = ?request.remote_addr(), %why, "wire: refusing peer");
            Err(Status::permission_denied(format!(
                "peer certificate refused: {why}"
            )))
        };
        let Some(certs) = request.peer_certs() else {
            return refuse("no client certificate".into());
        };
        let Some(leaf) = certs.first() else {
            return refuse("no client certificate".into());
        };
        let server_name = match rustls_pki_types::ServerName::try_from(name.as_str()) {
            Ok(n) => n,
            Err(e) => return refuse(format!("invalid peer name {name:?}: {e}")),
        };
        match webpki::EndEntityCert::try_from(leaf)
            .and_then(|cert| cert.verify_is_valid_for_subject_name(&server_name))
        {
            Ok(()) => Ok(()),
            Err(e) => refuse(format!("not valid for {name:?}: {e}")),
        }
    }

    fn check_job(&self, job: &str) -> Result<(), Rejection> {
        if job == self.job {
            Ok(())
        } else {
            Err(Rejection::WrongJob {
                expected: self.job.clone(),
                got: job.to_owned(),
            })
        }
    }

    fn check_header(&self, header: &Header) -> Result<(), Rejection> {
        self.check_job(&header.job)?;
        for task in [header.to_task, header.from_task] {
            if task >= self.num_tasks {
                return Err(Rejection::UnknownTask {
                    task,
                    num_tasks: self.num_tasks,
                });
            }
        }
        Ok(())
    }

    /// A pull's answer, from the loop or handled here: the part a unary pull and a lane's
    /// pull share.
    async fn handle_pull(
        &self,
        request: proto::PullRequest,
    ) -> Result<proto::PullAnswer, Rejection> {
        let req = PullRequest::try_from(request)?;
        self.check_header(&req.header)?;
        let answer = self.dispatch(|tx| Inbound::Pull(req, tx)).await??;
        Ok(proto::PullAnswer::from(answer))
    }

    fn check_answer_size(&self, size: usize) -> Result<(), Rejection> {
        if size > self.max_frame_bytes {
            Err(Rejection::TooLarge {
                size,
                limit: self.max_frame_bytes,
            })
        } else {
            Ok(())
        }
    }

    /// Hands a message to the loop (or handles it here, see [`Direct`]) and waits for its
    /// answer, or for shutdown.
    /// A call answered by an empty [`proto::Ack`] (meta, acknowledgement, replication): the
    /// caller's certificate, the message and its header are checked, then the message goes
    /// to the node as `inbound`.
    async fn acked<P, M>(
        &self,
        rpc: &'static str,
        request: Request<P>,
        header: fn(&M) -> &Header,
        inbound: fn(M, oneshot::Sender<Result<(), Rejection>>) -> Inbound,
    ) -> Result<Response<proto::Ack>, Status>
    where
        M: TryFrom<P, Error = Rejection>,
    {
        self.check_peer(rpc, &request)?;
        self.handle_acked(request.into_inner(), header, inbound)
            .await
            .map(|()| Response::new(proto::Ack {}))
            .map_err(|r| refuse(rpc, r))
    }

    /// A message answered by an empty acknowledgement, checked and handed to the node: the
    /// part a unary call and a lane's call share.
    async fn handle_acked<P, M>(
        &self,
        request: P,
        header: fn(&M) -> &Header,
        inbound: fn(M, oneshot::Sender<Result<(), Rejection>>) -> Inbound,
    ) -> Result<(), Rejection>
    where
        M: TryFrom<P, Error = Rejection>,
    {
        let msg = M::try_from(request)?;
        self.check_header(header(&msg))?;
        self.dispatch(|tx| inbound(msg, tx)).await?
    }

    async fn dispatch<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Inbound,
    ) -> Result<T, Rejection> {
        let (tx, rx) = oneshot::channel();
        let mut msg = make(tx);
        if let Some(direct) = &self.direct {
            let work = match direct.try_handle(msg) {
                // Only a wait for the runtime is raced with the stop (the others are ready).
                Lent::After(wait) => tokio::select! {
                    biased;
                    () = self.stop.cancelled() => return Err(Rejection::ShuttingDown),
                    work = wait => work,
                },
                lent => lent.work().await,
            };
            match work {
                Ok(work) => {
                    self.run_direct(work).await;
                    return self.answer(rx).await;
                }
                Err(back) => msg = back,
            }
        }
        let exchange = async {
            self.inbound
                .send(msg)
                .await
                .map_err(|_| Rejection::ShuttingDown)?;
            rx.await.map_err(|_| Rejection::ShuttingDown)
        };
        tokio::select! {
            biased;
            () = self.stop.cancelled() => Err(Rejection::ShuttingDown),
            answer = exchange => answer,
        }
    }

    /// The answer of direct work: mostly given already, else awaited until shutdown.
    async fn answer<T>(&self, mut rx: oneshot::Receiver<T>) -> Result<T, Rejection> {
        match rx.try_recv() {
            Ok(answer) => Ok(answer),
            Err(oneshot::error::TryRecvError::Closed) => Err(Rejection::ShuttingDown),
            Err(oneshot::error::TryRecvError::Empty) => tokio::select! {
                biased;
                () = self.stop.cancelled() => Err(Rejection::ShuttingDown),
                answer = rx => answer.map_err(|_| Rejection::ShuttingDown),
            },
        }
    }

    /// Polls direct work once here; what is left runs as a task of the server's.
    async fn run_direct(&self, work: Work) {
        if let Some(work) = poll_once(work).await {
            self.unfinished.finish(work);
        }
    }
}

/// Logs a refusal and turns it into the status sent to the client.
fn refuse(rpc: &'static str, rejection: Rejection) -> Status {
    tracing::debug!(rpc, %rejection, "wire: refusing");
    Status::from(rejection)
}

#[tonic::async_trait]
impl Taskgraph for Node {
    async fn pull(
        &self,
        request: Request<proto::PullRequest>,
    ) -> Result<Response<proto::PullAnswer>, Status> {
        self.check_peer("pull", &request)?;
        let answer = async {
            let answer = self.handle_pull(request.into_inner()).await?;
            self.check_answer_size(answer.encoded_len())?;
            Ok(answer)
        };
        answer
            .await
            .map(Response::new)
            .map_err(|r| refuse("pull", r))
    }

    type LaneStream = LaneStream;

    async fn lane(
        &self,
        request: Request<tonic::Streaming<proto::LanePull>>,
    ) -> Result<Response<LaneStream>, Status> {
        self.check_peer("lane", &request)?;
        let pulls = request.into_inner();
        let (answers, rx) = mpsc::channel(LANE_QUEUE);
        tokio::spawn(run_lane(Arc::new(self.clone()), pulls, answers));
        let mut response = Response::new(lane_stream(rx, self.stop.clone()));
        // The caller sends on the lane only what this side decodes, and metas and replication
        // entries only when told they ride it too (see `LanePull`).
        if let Ok(limit) = self.max_frame_bytes.to_string().parse() {
            response
                .metadata_mut()
                .insert(LANE_LIMIT_METADATA_KEY, limit);
        }
        response.metadata_mut().insert(
            LANE_CARRIES_METADATA_KEY,
            tonic::metadata::MetadataValue::from_static(LANE_CARRIES),
        );
        Ok(response)
    }

    async fn meta(
        &self,
        request: Request<proto::MetaRequest>,
    ) -> Result<Response<proto::Ack>, Status> {
        self.acked("meta", request, |m: &Meta| &m.header, Inbound::Meta)
            .await
    }

    async fn acknowledge(
        &self,
        request: Request<proto::AcknowledgeRequest>,
    ) -> Result<Response<proto::Ack>, Status> {
        self.acked(
            "acknowledge",
            request,
            |m: &Acknowledge| &m.header,
            Inbound::Acknowledge,
        )
        .await
    }

    async fn replicate(
        &self,
        request: Request<proto::ReplicateRequest>,
    ) -> Result<Response<proto::Ack>, Status> {
        self.acked(
            "replicate",
            request,
            |m: &Replicate| &m.header,
            Inbound::Replicate,
        )
        .await
    }

    async fn ping(
        &self,
        request: Request<proto::PingRequest>,
    ) -> Result<Response<proto::PingReply>, Status> {
        self.check_peer("ping", &request)?;
        self.who_am_i(request.into_inner())
            .await
            .map(Response::new)
            .map_err(|r| refuse("ping", r))
    }

    type HoldStream = HoldStream;

    async fn hold(
        &self,
        request: Request<proto::PingRequest>,
    ) -> Result<Response<HoldStream>, Status> {
        self.check_peer("hold", &request)?;
        let first = self
            .who_am_i(request.into_inner())
            .await
            .map_err(|r| refuse("hold", r))?;
        // Nothing more is sent until the node shuts down or its event loop is gone; the
        // stream's end (or its connection breaking with the process) is the watcher's news.
        let stop = self.stop.clone();
        let inbound = self.inbound.clone();
        let end = async move {
            tokio::select! {
                () = stop.cancelled() => {}
                () = inbound.closed() => {}
            }
            Err(refuse("hold", Rejection::ShuttingDown))
        };
        let stream =
            futures::stream::once(std::future::ready(Ok(first))).chain(futures::stream::once(end));
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Answers queued on one lane before its handlers wait for the connection to take them.
const LANE_QUEUE: usize = 256;

/// The handling of one call of a lane, until its answer.
type LaneWork = Pin<Box<dyn Future<Output = proto::LaneAnswer> + Send + 'static>>;

/// The stream of a [`Taskgraph::lane`] call.
type LaneStream =
    Pin<Box<dyn futures::Stream<Item = Result<proto::LaneAnswer, Status>> + Send + 'static>>;

/// The answers of a lane, in the order they are ready; once the server stops and every call
/// in flight is answered or dropped, the stream ends with [`Rejection::ShuttingDown`] (the
/// caller's cue to fail what it still waits for).
fn lane_stream(
    mut rx: mpsc::Receiver<Result<proto::LaneAnswer, Status>>,
    stop: CancellationToken,
) -> LaneStream {
    let mut ended = false;
    Box::pin(futures::stream::poll_fn(move |cx| {
        if ended {
            return Poll::Ready(None);
        }
        match rx.poll_recv(cx) {
            Poll::Ready(Some(item)) => Poll::Ready(Some(item)),
            Poll::Ready(None) => {
                ended = true;
                if stop.is_cancelled() {
                    Poll::Ready(Some(Err(refuse("lane", Rejection::ShuttingDown))))
                } else {
                    Poll::Ready(None)
                }
            }
            Poll::Pending => Poll::Pending,
        }
    }))
}

/// Reads a lane's calls (pulls, metas and replication entries) and handles each (polled once here, then as a task
/// of its own if not done), until the caller's side ends or the server stops; then the calls
/// still in flight are dropped (as a unary call's handling is when its caller goes) and the
/// answer stream ends.
async fn run_lane(
    node: Arc<Node>,
    mut pulls: tonic::Streaming<proto::LanePull>,
    answers: mpsc::Sender<Result<proto::LaneAnswer, Status>>,
) {
    use proto::lane_pull::What;
    let mut calls = tokio::task::JoinSet::new();
    let mut running: std::collections::HashMap<u64, tokio::task::AbortHandle> =
        std::collections::HashMap::new();
    let mut call_of: std::collections::HashMap<tokio::task::Id, u64> =
        std::collections::HashMap::new();
    loop {
        let frame = tokio::select! {
            biased;
            () = node.stop.cancelled() => break,
            Some(done) = calls.join_next_with_id(), if !calls.is_empty() => {
                let id = match done {
                    Ok((id, ())) => id,
                    // A handler panicked: its caller would wait for ever. End the lane; its
                    // calls fail and are retried on a new one.
                    Err(e) if e.is_panic() => {
                        tracing::warn!("wire: a lane's call panicked; the lane ends");
                        break;
                    }
                    Err(e) => e.id(),
                };
                if let Some(call) = call_of.remove(&id) {
                    // Only this task's entry (the call number may have been reused since).
                    if running.get(&call).is_some_and(|task| task.id() == id) {
                        running.remove(&call);
                    }
                }
                continue;
            }
            // At the bound with no room for a refusal either (the caller does not read its
            // answers): wait for room, then read again.
            permit = answers.reserve(), if blocked(&calls, &answers) => {
                // Gone: the caller's side of the lane is.
                if permit.is_err() {
                    break;
                }
                continue;
            }
            // Otherwise always read, so a cancel is never stuck behind calls: one past the
            // bound is refused at once (below).
            frame = pulls.next(), if !blocked(&calls, &answers) => frame,
        };
        let pull = match frame {
            Some(Ok(pull)) => pull,
            // The caller's side broke, or sent an undecodable frame (told why, if there is
            // room): its calls go.
            Some(Err(status)) => {
                tracing::debug!(%status, "wire: a lane ended by its caller's side");
                let _ = answers.try_send(Err(status));
                break;
            }
            None => break,
        };
        let call = pull.call;
        // At the bound (every task of the lane counts, answers waiting for room too), a call
        // is refused as retryable, as the node refuses early pulls past its own bound: a flood
        // costs a bounded amount of memory, and its caller retries later.
        if calls.len() >= LANE_MAX_CALLS {
            if let Some(busy) = lane_busy(call, pull.what.as_ref()) {
                // Room was checked before the read; another task may have taken it since.
                let sent = match answers.try_send(Ok(busy)) {
                    Ok(()) => Ok(()),
                    Err(mpsc::error::TrySendError::Full(busy)) => tokio::select! {
                        biased;
                        () = node.stop.cancelled() => break,
                        sent = answers.send(busy) => sent.map_err(drop),
                    },
                    Err(mpsc::error::TrySendError::Closed(_)) => Err(()),
                };
                if sent.is_err() {
                    break;
                }
                continue;
            }
        }
        let mut answer: LaneWork = match pull.what {
            Some(What::Request(_) | What::Meta(_) | What::Replicate(_))
                if running.contains_key(&call) =>
            {
                // A peer that breaks the lane's rules, and does not even read its answers,
                // loses the lane (never a wait here: the loop must keep watching the stop).
                let rejection = Rejection::Malformed {
                    reason: format!("lane call {call} is already in flight"),
                };
                if answers.try_send(Ok(lane_refusal(call, rejection))).is_err() {
                    break;
                }
                continue;
            }
            Some(What::Request(request)) => {
                let limit = usize::try_from(pull.answer_limit).unwrap_or(usize::MAX);
                Box::pin(lane_call(node.clone(), call, request, limit))
            }
            Some(What::Meta(meta)) => Box::pin(lane_acked(
                node.clone(),
                call,
                meta,
                |m: &Meta| &m.header,
                Inbound::Meta,
            )),
            Some(What::Replicate(entry)) => Box::pin(lane_acked(
                node.clone(),
                call,
                entry,
                |r: &Replicate| &r.header,
                Inbound::Replicate,
            )),
            Some(What::Cancel(_)) => {
                if let Some(task) = running.remove(&call) {
                    task.abort();
                }
                continue;
            }
            None => {
                let rejection = Rejection::Malformed {
                    reason: "a lane message without a call or a cancel".into(),
                };
                if answers.try_send(Ok(lane_refusal(call, rejection))).is_err() {
                    break;
                }
                continue;
            }
        };
        // Polled once here: most calls are answered at once (the node handles them on this
        // task when it is idle), and then cost no task of their own.
        if let Poll::Ready(answer) = futures::poll!(answer.as_mut()) {
            match answers.try_send(Ok(answer)) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(answer)) => {
                    let answers = answers.clone();
                    calls.spawn(async move {
                        let _ = answers.send(answer).await;
                    });
                }
                Err(mpsc::error::TrySendError::Closed(_)) => break,
            }
            continue;
        }
        let answers = answers.clone();
        let task = calls.spawn(async move {
            let _ = answers.send(Ok(answer.await)).await;
        });
        call_of.insert(task.id(), call);
        running.insert(call, task);
    }
    calls.abort_all();
}

/// The answer to call `call` of a lane: the pull's answer, its refusal, or "ask with the unary
/// call" when the answer is larger than `limit` (what the caller takes on the lane) or than
/// this side sends in one frame with the lane's own fields.
async fn lane_call(
    node: Arc<Node>,
    call: u64,
    request: proto::PullRequest,
    limit: usize,
) -> proto::LaneAnswer {
    use proto::lane_answer::Outcome;
    let limit = limit.min(node.max_frame_bytes.saturating_sub(LANE_OVERHEAD));
    let answer = node.handle_pull(request).await.and_then(|answer| {
        let size = answer.encoded_len();
        node.check_answer_size(size)?;
        Ok((answer, size))
    });
    let outcome = match answer {
        Ok((_, size)) if size > limit => Outcome::Unary(proto::LaneTooLarge {
            size: u64::try_from(size).unwrap_or(u64::MAX),
        }),
        Ok((answer, _)) => Outcome::Answer(answer),
        Err(rejection) => return lane_refusal(call, rejection),
    };
    proto::LaneAnswer {
        call,
        outcome: Some(outcome),
    }
}

/// The answer to call `call` of a lane that carries a meta or a replication entry: taken, or
/// refused.
async fn lane_acked<P, M>(
    node: Arc<Node>,
    call: u64,
    request: P,
    header: fn(&M) -> &Header,
    inbound: fn(M, oneshot::Sender<Result<(), Rejection>>) -> Inbound,
) -> proto::LaneAnswer
where
    M: TryFrom<P, Error = Rejection>,
{
    match node.handle_acked(request, header, inbound).await {
        Ok(()) => proto::LaneAnswer {
            call,
            outcome: Some(proto::lane_answer::Outcome::Ack(proto::Ack {})),
        },
        Err(rejection) => lane_refusal(call, rejection),
    }
}

/// Whether a lane at its bound has no room for an answer either: it is not read until there is.
fn blocked(
    calls: &tokio::task::JoinSet<()>,
    answers: &mpsc::Sender<Result<proto::LaneAnswer, Status>>,
) -> bool {
    calls.len() >= LANE_MAX_CALLS && answers.capacity() == 0
}

/// The answer to call `call` (`what`) that arrived while its lane handles [`LANE_MAX_CALLS`]
/// calls; `None` for a cancel (or nothing), which is always taken. A pull is refused as not
/// ready yet, to be retried (what the node answers a pull past its bound of early pulls). A
/// meta or a replication entry is sent back to go as a unary call of its own: a backup that
/// refuses an entry as not ready is out of step, and its primary would remove it.
fn lane_busy(call: u64, what: Option<&proto::lane_pull::What>) -> Option<proto::LaneAnswer> {
    use proto::lane_pull::What;
    let header = match what? {
        What::Request(r) => r.header.as_ref(),
        What::Meta(_) | What::Replicate(_) => {
            return Some(proto::LaneAnswer {
                call,
                outcome: Some(proto::lane_answer::Outcome::Unary(proto::LaneTooLarge {
                    size: 0,
                })),
            })
        }
        What::Cancel(_) => return None,
    };
    let rejection = match header {
        Some(h) => Rejection::NotReady {
            task: h.to_task,
            epoch: h.epoch,
        },
        None => Rejection::Malformed {
            reason: "a lane call without a header".into(),
        },
    };
    Some(lane_refusal(call, rejection))
}

/// A lane's refusal of call `call` (logged as a unary call's is).
fn lane_refusal(call: u64, rejection: Rejection) -> proto::LaneAnswer {
    tracing::debug!(rpc = "lane", call, %rejection, "wire: refusing");
    proto::LaneAnswer {
        call,
        outcome: Some(proto::lane_answer::Outcome::Rejection(
            proto::Rejection::from(rejection.truncated()),
        )),
    }
}

/// The stream of a [`Taskgraph::hold`] call: one reply, then an error status at shutdown.
type HoldStream =
    Pin<Box<dyn futures::Stream<Item = Result<proto::PingReply, Status>> + Send + 'static>>;

/// Wraps the generated server so that tonic's own "message too large" refusal (code
/// `OutOfRange` in tonic 0.14, produced before our handler runs) goes out as
/// [`Rejection::TooLarge`] with code `ResourceExhausted` like every other rejection.
#[derive(Debug, Clone)]
struct SizeLimitStatus<S> {
    inner: S,
}

impl<S> NamedService for SizeLimitStatus<S>
where
    S: NamedService,
{
    const NAME: &'static str = S::NAME;
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S> Service<http::Request<Body>> for SizeLimitStatus<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let response = self.inner.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            rewrite_size_limit(&mut response);
            Ok(response)
        })
    }
}

fn rewrite_size_limit(response: &mut http::Response<Body>) {
    let out_of_range = response
        .headers()
        .get("grpc-status")
        .is_some_and(|code| code.as_bytes() == b"11");
    if !out_of_range {
        return;
    }
    let Some(status) = Status::from_header_map(response.headers()) else {
        return;
    };
    debug_assert_eq!(status.code(), Code::OutOfRange);
    let Some(rejection) = tonic_size_limit(&status) else {
        return;
    };
    tracing::debug!(%rejection, "wire: refusing oversized request");
    let headers = response.headers_mut();
    headers.remove("grpc-message");
    if Status::from(rejection.clone()).add_header(headers).is_ok() {
        response.extensions_mut().insert(Status::from(rejection));
    }
}
