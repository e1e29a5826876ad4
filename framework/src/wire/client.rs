//! The calling side: [`Peers`], a cache of one HTTP/2 channel per peer address.

use std::collections::{HashMap, HashSet};
use std::error::Error as StdError;
use std::io;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prost::Message;
use tokio::net::TcpStream;
use tonic::codegen::http::Uri;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use super::codec::LocalDecodeError;
use super::error::CallError;
use super::lane::{is_remote, Lane, Outcome};
use super::proto;
use super::proto::taskgraph_client::TaskgraphClient;
use super::rejection::{tonic_size_limit, Rejection};
use super::types::{Acknowledge, Meta, PingReply, PullAnswer, PullRequest, Replicate};
use super::{
    DEFAULT_MAX_FRAME_BYTES, HTTP2_CONNECTION_WINDOW, HTTP2_MAX_FRAME, HTTP2_STREAM_WINDOW,
};
use crate::security::LoadedTls;

/// Configuration of [`Peers`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// The caller's job: sent with pings, and filled into any [`Header`](super::Header) whose
    /// `job` is empty.
    pub job: String,
    /// Largest encoded message sent or accepted, in bytes. A request larger than this is
    /// refused locally with [`Rejection::TooLarge`] without being sent. Default
    /// [`DEFAULT_MAX_FRAME_BYTES`].
    pub max_frame_bytes: usize,
    /// Limit on establishing a TCP connection (also used by the refused-connection probe).
    /// Default 3 s.
    pub connect_timeout: Duration,
    /// Limit on a whole call, `None` (the default) for none. Note that the server's event loop
    /// may legitimately hold a pull until the pulled task can answer.
    pub request_timeout: Option<Duration>,
    /// Interval of HTTP/2 keepalive pings on a connection with calls in flight; a peer that
    /// does not acknowledge within 20 s is considered dead. Default 10 s (should stay >= 6 s).
    pub http2_keepalive: Duration,
    /// TLS: peers' certificates must chain to `ca_pem` (and match `server_name` if set, else
    /// the address's host); `identity` is presented as the client certificate. `None` (the
    /// default): plain text.
    pub tls: Option<LoadedTls>,
}

/// Default of [`ClientConfig::connect_timeout`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Default of [`ClientConfig::http2_keepalive`].
pub const DEFAULT_HTTP2_KEEPALIVE: Duration = Duration::from_secs(10);

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            job: String::new(),
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: None,
            http2_keepalive: DEFAULT_HTTP2_KEEPALIVE,
            tls: None,
        }
    }
}

impl ClientConfig {
    /// A configuration for `job` with default limits.
    pub fn new(job: impl Into<String>) -> Self {
        ClientConfig {
            job: job.into(),
            ..ClientConfig::default()
        }
    }
}

/// Calls other nodes. Keeps one lazily connected tonic `Channel` per address, shared by all
/// clones; a channel reconnects by itself after its connection broke.
///
/// Addresses are `host:port` (or a full `http://host:port` URI).
#[derive(Debug, Clone)]
pub struct Peers {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: ClientConfig,
    channels: Mutex<HashMap<String, Channel>>,
    lanes: Mutex<HashMap<String, LaneTo>>,
    /// Per address, the methods whose last answer was too large for the lane.
    large_answers: Mutex<HashMap<String, HashSet<String>>>,
}

/// The lane to one address.
#[derive(Debug, Clone)]
enum LaneTo {
    Open(Arc<Lane>),
    /// The peer does not serve lanes (as of `since`): unary calls, and a lane is asked for
    /// again after [`LANE_RETRY_UNSUPPORTED`] (the peer may have been upgraded in place).
    Unsupported {
        since: std::time::Instant,
    },
}

/// How long a peer that served no lane is pulled with unary calls before it is asked again.
const LANE_RETRY_UNSUPPORTED: Duration = Duration::from_secs(60);

impl Peers {
    /// A client with an empty connection cache. Calls must be made inside a tokio runtime.
    pub fn new(config: ClientConfig) -> Self {
        Peers {
            inner: Arc::new(Inner {
                config,
                channels: Mutex::new(HashMap::new()),
                lanes: Mutex::new(HashMap::new()),
                large_answers: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The configuration this client was built with.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// Sends a pull to the node at `addr` and waits for its answer (the server may hold it).
    ///
    /// Pulls to one address share a lane: one long-lived stream carrying many pulls at once,
    /// so a pull costs no HTTP/2 stream of its own. A request or an answer larger than
    /// [`LANE_MAX_BYTES`](super::LANE_MAX_BYTES) goes as a unary call instead (an answer
    /// found too large is asked for again, and the server answers from the answer it kept;
    /// the method's next pulls to that address go as unary calls at once, until one is
    /// answered small enough for the lane). So does every pull to a peer that does not serve
    /// lanes. Dropping the future cancels the pull at the server either way.
    pub async fn pull(&self, addr: &str, mut req: PullRequest) -> Result<PullAnswer, CallError> {
        self.fill_job(&mut req.header.job);
        let msg = proto::PullRequest::from(req);
        let size = msg.encoded_len();
        self.check_size(size)?;
        let limit = self.lane_limit();
        // A method whose last answer from `addr` was too large for the lane goes straight to
        // a unary call (no round trip to learn it again); a small answer to it there brings
        // it back to the lane.
        let large_before = self.answers_large(addr, &msg.method);
        if size <= limit && !large_before {
            let call = || proto::lane_pull::What::Request(msg.clone());
            match self.on_lane(addr, call, size, limit).await? {
                Some(Outcome::Answer(answer)) => return Ok(PullAnswer::from(answer)),
                Some(Outcome::Rejected(rejection)) => return Err(CallError::Rejected(rejection)),
                Some(Outcome::Failed(error)) => return Err(error),
                Some(Outcome::Broken(status)) => return Err(self.lane_broken(addr, status).await),
                Some(Outcome::LargeAnswer) => self.note_large_answers(addr, &msg.method, true),
                Some(Outcome::Acked) => return Err(wrong_answer("pull")),
                Some(Outcome::Unary | Outcome::Unsupported) | None => {}
            }
        }
        let method = large_before.then(|| msg.method.clone());
        let mut client = self.client(addr)?;
        match client.pull(msg).await {
            Ok(answer) => {
                let answer = answer.into_inner();
                if let Some(method) = method.filter(|_| answer.encoded_len() <= limit) {
                    self.note_large_answers(addr, &method, false);
                }
                Ok(PullAnswer::from(answer))
            }
            Err(status) => Err(self.classify(addr, status).await),
        }
    }

    /// Whether the last answer to `method` from `addr` was too large for the lane.
    fn answers_large(&self, addr: &str, method: &str) -> bool {
        let large = self.large_answers();
        !large.is_empty() && large.get(addr).is_some_and(|m| m.contains(method))
    }

    fn note_large_answers(&self, addr: &str, method: &str, large: bool) {
        let mut map = self.large_answers();
        if large {
            map.entry(addr.to_owned())
                .or_default()
                .insert(method.to_owned());
        } else if let Some(methods) = map.get_mut(addr) {
            methods.remove(method);
            if methods.is_empty() {
                map.remove(addr);
            }
        }
    }

    fn large_answers(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashSet<String>>> {
        self.inner
            .large_answers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The largest encoded request or answer a lane of this client carries.
    fn lane_limit(&self) -> usize {
        let frame = self.inner.config.max_frame_bytes;
        super::LANE_MAX_BYTES.min(frame.saturating_sub(super::LANE_OVERHEAD))
    }

    /// A call (made by `call`, of encoded size `size`) on the lane to `addr` (opened, or
    /// opened again after it ended); `None` when the peer serves no lanes.
    async fn on_lane(
        &self,
        addr: &str,
        call: impl Fn() -> proto::lane_pull::What,
        size: usize,
        limit: usize,
    ) -> Result<Option<Outcome>, CallError> {
        // A lane found ended while the call registers is replaced once; beyond, unary.
        for _ in 0..2 {
            let lane = match self.lane(addr)? {
                LaneTo::Open(lane) => lane,
                LaneTo::Unsupported { .. } => return Ok(None),
            };
            let call = lane.call(call(), size, limit);
            let outcome = match self.inner.config.request_timeout {
                None => call.await,
                Some(timeout) => match tokio::time::timeout(timeout, call).await {
                    Ok(outcome) => outcome,
                    Err(_) => {
                        return Err(CallError::Unreachable {
                            addr: addr.to_owned(),
                            reason: format!("no answer within {timeout:?}"),
                        })
                    }
                },
            };
            match outcome {
                Some(Outcome::Unsupported) => {
                    tracing::debug!(%addr, "wire: the peer serves no lanes; unary pulls");
                    let since = std::time::Instant::now();
                    self.lanes()
                        .insert(addr.to_owned(), LaneTo::Unsupported { since });
                    return Ok(None);
                }
                Some(outcome) => return Ok(Some(outcome)),
                None => continue,
            }
        }
        Ok(None)
    }

    /// The lane to `addr`, opened if there is none or the last one ended.
    fn lane(&self, addr: &str) -> Result<LaneTo, CallError> {
        // Opened under the map's lock, so callers racing after a lane ended open one lane, and
        // `forget` cannot slip in between (the channels' lock is taken inside, never the other
        // way round).
        let mut lanes = self.lanes();
        match lanes.get(addr) {
            Some(LaneTo::Open(l)) if !l.ended() => return Ok(LaneTo::Open(l.clone())),
            Some(LaneTo::Unsupported { since }) if since.elapsed() < LANE_RETRY_UNSUPPORTED => {
                return Ok(LaneTo::Unsupported { since: *since })
            }
            _ => {}
        }
        let lane = LaneTo::Open(Lane::open(self.client(addr)?, addr));
        lanes.insert(addr.to_owned(), lane.clone());
        Ok(lane)
    }

    /// What a lane that ended means for a call on it. The server's status is about the lane,
    /// not the call: unless the node is shutting down, the call is retried (on a new lane),
    /// never refused for good. A status from this side (the connection broke) is classified
    /// as a unary call's.
    async fn lane_broken(&self, addr: &str, status: Status) -> CallError {
        if !is_remote(&status) {
            return self.classify(addr, status).await;
        }
        match Rejection::from_status(&status) {
            Some(Rejection::ShuttingDown) => CallError::Rejected(Rejection::ShuttingDown),
            _ => CallError::Unreachable {
                addr: addr.to_owned(),
                reason: format!("the lane ended: {:?}: {}", status.code(), status.message()),
            },
        }
    }

    fn lanes(&self) -> std::sync::MutexGuard<'_, HashMap<String, LaneTo>> {
        self.inner
            .lanes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Tells the node at `addr` that the answer to a pull arrived (see [`Acknowledge`]).
    pub async fn acknowledge(&self, addr: &str, mut msg: Acknowledge) -> Result<(), CallError> {
        self.fill_job(&mut msg.header.job);
        let msg = proto::AcknowledgeRequest::from(msg);
        let mut client = self.client(addr)?;
        match client.acknowledge(msg).await {
            Ok(_) => Ok(()),
            Err(status) => Err(self.classify(addr, status).await),
        }
    }

    /// Sends a meta flag to the node at `addr`, on the lane its pulls take (see
    /// [`Peers::pull`]) if the peer's lanes carry metas, else as a unary call.
    pub async fn meta(&self, addr: &str, mut msg: Meta) -> Result<(), CallError> {
        self.fill_job(&mut msg.header.job);
        let msg = proto::MetaRequest::from(msg);
        let size = msg.encoded_len();
        self.check_size(size)?;
        let call = || proto::lane_pull::What::Meta(msg.clone());
        if let Some(done) = self.acked_on_lane(addr, call, size, "meta").await {
            return done;
        }
        let mut client = self.client(addr)?;
        match client.meta(msg).await {
            Ok(_) => Ok(()),
            Err(status) => Err(self.classify(addr, status).await),
        }
    }

    /// A call answered by an acknowledgement (a meta or a replication entry, made by `call`, of
    /// encoded size `size`) on the lane to `addr`; `None`: send it as a unary call (too large
    /// for the lane, the peer's lanes do not carry it, or the lane is at its bound).
    async fn acked_on_lane(
        &self,
        addr: &str,
        call: impl Fn() -> proto::lane_pull::What,
        size: usize,
        kind: &str,
    ) -> Option<Result<(), CallError>> {
        let limit = self.lane_limit();
        if size > limit {
            return None;
        }
        match self.on_lane(addr, call, size, limit).await {
            Ok(Some(Outcome::Acked)) => Some(Ok(())),
            Ok(Some(Outcome::Rejected(rejection))) => Some(Err(CallError::Rejected(rejection))),
            Ok(Some(Outcome::Failed(error))) | Err(error) => Some(Err(error)),
            Ok(Some(Outcome::Broken(status))) => Some(Err(self.lane_broken(addr, status).await)),
            Ok(Some(Outcome::Answer(_))) => Some(Err(wrong_answer(kind))),
            // `LargeAnswer` to a meta or an entry: the lane is at its bound, go alone.
            Ok(Some(Outcome::Unary | Outcome::LargeAnswer | Outcome::Unsupported) | None) => None,
        }
    }

    /// Sends a replication entry to the backup at `addr`, on the lane (see [`Peers::pull`]) if
    /// it fits and the peer's lanes carry replication, else as a unary call.
    pub async fn replicate(&self, addr: &str, mut msg: Replicate) -> Result<(), CallError> {
        self.fill_job(&mut msg.header.job);
        let msg = proto::ReplicateRequest::from(msg);
        let size = msg.encoded_len();
        self.check_size(size)?;
        let call = || proto::lane_pull::What::Replicate(msg.clone());
        if let Some(done) = self
            .acked_on_lane(addr, call, size, "replication entry")
            .await
        {
            return done;
        }
        let mut client = self.client(addr)?;
        match client.replicate(msg).await {
            Ok(_) => Ok(()),
            Err(status) => Err(self.classify(addr, status).await),
        }
    }

    /// Asks the node at `addr` who it is. Refused with [`Rejection::WrongJob`] when it serves
    /// another job than [`ClientConfig::job`] (unless that is empty).
    pub async fn ping(&self, addr: &str) -> Result<PingReply, CallError> {
        let msg = proto::PingRequest {
            job: self.inner.config.job.clone(),
        };
        let mut client = self.client(addr)?;
        match client.ping(msg).await {
            Ok(reply) => Ok(PingReply::from(reply.into_inner())),
            Err(status) => Err(self.classify(addr, status).await),
        }
    }

    /// Opens a liveness hold on the node at `addr`: returns who it is (as [`Peers::ping`]) and
    /// a [`Held`] stream that stays open, carrying nothing, until that node shuts down or the
    /// connection breaks. Watching a peer this way costs no calls while it lives; a broken
    /// connection is noticed as soon as the transport sees it.
    pub async fn hold(&self, addr: &str) -> Result<(PingReply, Held), CallError> {
        let msg = proto::PingRequest {
            job: self.inner.config.job.clone(),
        };
        let mut client = self.client(addr)?;
        let mut stream = match client.hold(msg).await {
            Ok(response) => response.into_inner(),
            Err(status) => return Err(self.classify(addr, status).await),
        };
        match stream.message().await {
            Ok(Some(first)) => Ok((
                PingReply::from(first),
                Held {
                    peers: self.clone(),
                    addr: addr.to_owned(),
                    stream,
                },
            )),
            Ok(None) => Err(CallError::Protocol {
                reason: "a hold ended before its first reply".into(),
            }),
            Err(status) => Err(self.classify(addr, status).await),
        }
    }

    /// Drops the cached channel to `addr` (e.g. after the address changed owner); the next
    /// call connects afresh. Calls in flight on the old channel are not affected.
    pub fn forget(&self, addr: &str) {
        self.channels().remove(addr);
        self.lanes().remove(addr);
        self.large_answers().remove(addr);
    }

    fn channels(&self) -> std::sync::MutexGuard<'_, HashMap<String, Channel>> {
        // The map stays consistent even if a holder panicked.
        self.inner
            .channels
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn fill_job(&self, job: &mut String) {
        if job.is_empty() {
            job.clone_from(&self.inner.config.job);
        }
    }

    fn check_size(&self, size: usize) -> Result<(), CallError> {
        let limit = self.inner.config.max_frame_bytes;
        if size > limit {
            Err(CallError::Rejected(Rejection::TooLarge { size, limit }))
        } else {
            Ok(())
        }
    }

    fn client(&self, addr: &str) -> Result<TaskgraphClient<Channel>, CallError> {
        let limit = self.inner.config.max_frame_bytes;
        Ok(TaskgraphClient::new(self.channel(addr)?)
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit))
    }

    fn channel(&self, addr: &str) -> Result<Channel, CallError> {
        let mut channels = self.channels();
        if let Some(channel) = channels.get(addr) {
            return Ok(channel.clone());
        }
        let channel = self.endpoint(addr)?.connect_lazy();
        channels.insert(addr.to_owned(), channel.clone());
        Ok(channel)
    }

    fn endpoint(&self, addr: &str) -> Result<Endpoint, CallError> {
        let config = &self.inner.config;
        let uri = match &config.tls {
            Some(_) => tls_uri_of(addr),
            None => uri_of(addr),
        };
        let mut endpoint = Endpoint::from_shared(uri).map_err(|err| CallError::Unreachable {
            addr: addr.to_owned(),
            reason: format!("invalid address: {err}"),
        })?;
        if let Some(tls) = &config.tls {
            endpoint =
                endpoint
                    .tls_config(tls.client_config())
                    .map_err(|err| CallError::Unreachable {
                        addr: addr.to_owned(),
                        reason: format!("TLS settings: {err}"),
                    })?;
        }
        let endpoint = endpoint
            .connect_timeout(config.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(config.http2_keepalive)
            .initial_stream_window_size(HTTP2_STREAM_WINDOW)
            .initial_connection_window_size(HTTP2_CONNECTION_WINDOW)
            .max_frame_size(HTTP2_MAX_FRAME);
        Ok(match config.request_timeout {
            Some(timeout) => endpoint.timeout(timeout),
            None => endpoint,
        })
    }

    /// Turns a failed call's status into a [`CallError`].
    async fn classify(&self, addr: &str, status: Status) -> CallError {
        classify(addr, self.inner.config.connect_timeout, status).await
    }
}

/// Turns a failed call's status into a [`CallError`] (a broken connection is told from a
/// refused one by a fresh TCP connect, bounded by `connect_timeout`).
async fn classify(addr: &str, connect_timeout: Duration, status: Status) -> CallError {
    let addr_owned = || addr.to_owned();
    // A status with a source was produced in this process (transport or local decoding);
    // statuses received from the server never have one.
    if let Some(source) = status.source() {
        if find_in_chain::<LocalDecodeError>(source).is_some() {
            return CallError::Protocol {
                reason: format!("undecodable answer: {}", status.message()),
            };
        }
        if chain_has_io_kind(source, io::ErrorKind::ConnectionRefused) {
            return CallError::Refused { addr: addr_owned() };
        }
        let timed_out = matches!(status.code(), Code::Cancelled | Code::DeadlineExceeded)
            || chain_has_io_kind(source, io::ErrorKind::TimedOut);
        let reason = format!("{}: {}", status.message(), chain_text(source));
        // A broken connection: the channel's next reconnect would tell whether the peer
        // process is gone, so find out now with a plain TCP connect.
        if !timed_out && probe_refused(addr, connect_timeout).await {
            return CallError::Refused { addr: addr_owned() };
        }
        return CallError::Unreachable {
            addr: addr_owned(),
            reason,
        };
    }
    if let Some(rejection) = Rejection::from_status(&status) {
        return CallError::Rejected(rejection);
    }
    if let Some(rejection) = tonic_size_limit(&status) {
        return CallError::Rejected(rejection);
    }
    match status.code() {
        Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded => CallError::Unreachable {
            addr: addr_owned(),
            reason: format!("{:?}: {}", status.code(), status.message()),
        },
        code => CallError::Protocol {
            reason: format!("unexpected status {code:?}: {}", status.message()),
        },
    }
}

/// Whether a fresh TCP connect to `addr` is refused.
async fn probe_refused(addr: &str, connect_timeout: Duration) -> bool {
    let Some(target) = socket_target(addr) else {
        return false;
    };
    let connect = TcpStream::connect(target);
    match tokio::time::timeout(connect_timeout, connect).await {
        Ok(Err(err)) => err.kind() == io::ErrorKind::ConnectionRefused,
        Ok(Ok(_)) | Err(_) => false,
    }
}

/// A lane's answer of the other kind than its call (a pull acknowledged, or a meta or a
/// replication entry answered with data).
fn wrong_answer(call: &str) -> CallError {
    CallError::Protocol {
        reason: format!("a lane answered a {call} with the other kind of answer"),
    }
}

fn uri_of(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    }
}

/// The `https://` URI of an address (a given `http://` scheme is replaced: TLS is not
/// optional once configured).
fn tls_uri_of(addr: &str) -> String {
    match addr.split_once("://") {
        Some((_, rest)) => format!("https://{rest}"),
        None => format!("https://{addr}"),
    }
}

/// `host:port` of an address, for a raw TCP connect.
fn socket_target(addr: &str) -> Option<String> {
    let uri: Uri = uri_of(addr).parse().ok()?;
    let host = uri.host()?;
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    Some(format!("{host}:{port}"))
}

fn chain<'a>(
    err: &'a (dyn StdError + 'static),
) -> impl Iterator<Item = &'a (dyn StdError + 'static)> {
    std::iter::successors(Some(err), |e: &&'a (dyn StdError + 'static)| (*e).source())
}

fn find_in_chain<'a, E: StdError + 'static>(err: &'a (dyn StdError + 'static)) -> Option<&'a E> {
    chain(err).find_map(|e| e.downcast_ref::<E>())
}

fn chain_has_io_kind(err: &(dyn StdError + 'static), kind: io::ErrorKind) -> bool {
    chain(err).any(|e| {
        e.downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == kind)
    })
}

fn chain_text(err: &(dyn StdError + 'static)) -> String {
    chain(err)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}

/// An open liveness hold from [`Peers::hold`]. Dropping it ends the hold.
#[derive(Debug)]
pub struct Held {
    peers: Peers,
    addr: String,
    stream: tonic::Streaming<proto::PingReply>,
}

impl Held {
    /// Waits until the hold ends and says why: [`Rejection::ShuttingDown`] when the node shut
    /// down (or its event loop is gone), [`CallError::Refused`] when its connection broke and
    /// its port now refuses connections, [`CallError::Unreachable`] for a connection that broke
    /// otherwise (which proves nothing about the process).
    pub async fn ended(mut self) -> CallError {
        loop {
            match self.stream.message().await {
                // Replies after the first are allowed (newer servers may send news); none
                // carries anything this side needs.
                Ok(Some(_)) => continue,
                Ok(None) => {
                    return CallError::Protocol {
                        reason: "a hold ended without a status".into(),
                    }
                }
                Err(status) => return self.peers.classify(&self.addr, status).await,
            }
        }
    }
}
