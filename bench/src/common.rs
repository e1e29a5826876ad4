//! What the scenarios share: in-process fleets of nodes that never outlive their scenario,
//! etcd's own counters, the process's memory, and the bare tonic echo service.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use taskgraph::{Framework, Links, NodeHandle, NodeStatus, TaskBuilder, Tree};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

/// Any error of a scenario, shown as text in the report.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The links of a binary tree of `tasks` tasks (`parents` ↔ `children`).
pub fn tree_links(tasks: u32) -> Result<Links, BoxError> {
    Ok(Tree::new(tasks, 2)?.links())
}

/// Depth of the deepest task of a binary tree of `tasks` tasks (task 0 at depth 0).
pub fn tree_depth(tasks: u32) -> u32 {
    tasks.max(1).ilog2()
}

/// Milliseconds of `d`.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// In-process nodes of one job. Dropping a fleet crashes every node still running, so that a
/// scenario that fails or times out leaves no node behind to load the next one.
#[derive(Debug, Default)]
pub struct Fleet {
    nodes: Vec<NodeHandle>,
    replicas: u32,
}

/// How to start the nodes of a fleet.
#[derive(Debug, Clone)]
pub struct FleetSpec {
    /// etcd endpoints.
    pub etcd: Vec<String>,
    /// Job name.
    pub job: String,
    /// Tasks (binary tree).
    pub tasks: u32,
    /// Nodes per task.
    pub replicas: u32,
    /// Lease TTL.
    pub ttl: Duration,
    /// The nodes' frame limit (`None`: the framework's default).
    pub max_frame_bytes: Option<usize>,
}

impl Fleet {
    /// Starts `tasks × replicas` nodes of `spec`'s job.
    pub async fn start(
        spec: &FleetSpec,
        builder: impl TaskBuilder + Clone,
    ) -> Result<Self, BoxError> {
        Self::start_until(spec, builder, None).await
    }

    /// Starts `tasks × replicas` nodes of `spec`'s job, but none after `deadline`: the fleet
    /// then has fewer nodes ([`Fleet::len`]), and the caller's staffing check fails.
    pub async fn start_until(
        spec: &FleetSpec,
        builder: impl TaskBuilder + Clone,
        deadline: Option<Instant>,
    ) -> Result<Self, BoxError> {
        let links = tree_links(spec.tasks)?;
        let mut fleet = Fleet {
            nodes: Vec::new(),
            replicas: spec.replicas,
        };
        for i in 0..spec.tasks * spec.replicas {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
            let handle = Self::node(spec, &links, builder.clone(), format!("b{i}"))?.spawn();
            let handle = match deadline {
                Some(d) => match tokio::time::timeout_at(d.into(), handle).await {
                    Ok(h) => h?,
                    Err(_) => break,
                },
                None => handle.await?,
            };
            fleet.nodes.push(handle);
        }
        Ok(fleet)
    }

    fn node(
        spec: &FleetSpec,
        links: &Links,
        builder: impl TaskBuilder + Clone,
        name: String,
    ) -> Result<Framework, BoxError> {
        let mut framework = Framework::builder();
        if let Some(limit) = spec.max_frame_bytes {
            framework = framework.max_frame_bytes(limit);
        }
        Ok(framework
            .etcd(spec.etcd.clone())
            .job(spec.job.clone())
            .tasks(spec.tasks)
            .replicas(spec.replicas)
            .links(links.clone())
            .lease_ttl(spec.ttl)
            .node_name(name)
            .task_builder(builder)
            .build()?)
    }

    /// Starts one more node of `spec`'s job, named `name` (a spare until it is given a slot).
    pub async fn add(
        &mut self,
        spec: &FleetSpec,
        builder: impl TaskBuilder + Clone,
        name: String,
    ) -> Result<(), BoxError> {
        let links = tree_links(spec.tasks)?;
        let handle = Self::node(spec, &links, builder, name)?.spawn().await?;
        self.nodes.push(handle);
        Ok(())
    }

    /// Crashes the `pick`-th of the running nodes (modulo their number), as a kill -9 on a
    /// live host would: its tasks stop at once, its port closes, its lease is left to expire.
    /// Returns the node's name and role then.
    pub fn crash_one(&mut self, pick: usize) -> Option<(String, taskgraph::Role)> {
        let running: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| !self.nodes[i].is_finished())
            .collect();
        let i = *running.get(pick % running.len().max(1))?;
        let h = self.nodes.swap_remove(i);
        let role = h.status().borrow().role;
        let name = h.id().to_owned();
        h.crash();
        Some((name, role))
    }

    /// Takes the nodes that have ended out of the fleet and says how they ended: each distinct
    /// outcome with its count, most frequent first.
    pub async fn reap_finished(&mut self) -> Vec<(usize, String)> {
        let (done, running): (Vec<NodeHandle>, Vec<NodeHandle>) = std::mem::take(&mut self.nodes)
            .into_iter()
            .partition(|h| h.is_finished());
        self.nodes = running;
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for h in done {
            let text = match h.wait().await {
                Ok(exit) => format!("{exit:?}"),
                Err(e) => format!("error: {e}"),
            };
            *counts.entry(text).or_insert(0) += 1;
        }
        let mut v: Vec<(usize, String)> = counts.into_iter().map(|(t, n)| (n, t)).collect();
        v.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
        v
    }

    /// Nodes per task.
    pub fn replicas(&self) -> u32 {
        self.replicas
    }

    /// Number of nodes started.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// The statuses of the nodes still running.
    pub fn statuses(&self) -> Vec<(usize, NodeStatus)> {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(_, h)| !h.is_finished())
            .map(|(i, h)| (i, h.status().borrow().clone()))
            .collect()
    }

    /// Whether every task has exactly one acting primary and `backups` acting backups: one
    /// pass over the nodes' statuses, read in place (O(nodes), no copy), where
    /// `taskgraph_tests::cluster::fully_staffed` is O(tasks × nodes) over copies.
    pub fn is_staffed(&self, tasks: u32, backups: usize) -> bool {
        let mut primaries = vec![0u32; tasks as usize];
        let mut acting_backups = vec![0usize; tasks as usize];
        for h in &self.nodes {
            if h.is_finished() {
                continue;
            }
            let rx = h.status();
            let st = rx.borrow();
            if !st.acting {
                continue;
            }
            match st.role {
                taskgraph::Role::Primary { task, .. } => {
                    if let Some(p) = primaries.get_mut(task as usize) {
                        *p += 1;
                    }
                }
                taskgraph::Role::Backup { task } => {
                    if let Some(b) = acting_backups.get_mut(task as usize) {
                        *b += 1;
                    }
                }
                taskgraph::Role::Spare => {}
            }
        }
        primaries.iter().all(|p| *p == 1) && acting_backups.iter().all(|b| *b == backups)
    }

    /// Waits until every task has one acting primary and `replicas − 1` acting backups, until
    /// `deadline`. The error says how far staffing got.
    pub async fn wait_staffed(
        &self,
        tasks: u32,
        replicas: u32,
        deadline: Instant,
    ) -> Result<(), BoxError> {
        let backups = replicas.saturating_sub(1) as usize;
        loop {
            if self.is_staffed(tasks, backups) {
                return Ok(());
            }
            if Instant::now() > deadline {
                let s = self.statuses();
                let primaries = (0..tasks)
                    .filter(|t| s.iter().any(|(_, st)| st.primary_of(*t).is_some()))
                    .count();
                let backups_acting = s
                    .iter()
                    .filter(|(_, st)| {
                        st.acting && matches!(st.role, taskgraph::Role::Backup { .. })
                    })
                    .count();
                // The first tasks lacking an acting primary or a backup, with every node that
                // holds a slot of theirs.
                let lacking: Vec<String> = (0..tasks)
                    .filter(|t| {
                        let b = s
                            .iter()
                            .filter(|(_, st)| {
                                st.acting && st.role == taskgraph::Role::Backup { task: *t }
                            })
                            .count();
                        !s.iter().any(|(_, st)| st.primary_of(*t).is_some()) || b < backups
                    })
                    .take(3)
                    .map(|t| {
                        let holders: Vec<String> = s
                            .iter()
                            .filter(|(_, st)| match st.role {
                                taskgraph::Role::Primary { task, .. }
                                | taskgraph::Role::Backup { task } => task == t,
                                taskgraph::Role::Spare => false,
                            })
                            .map(|(_, st)| {
                                format!("{} {:?} acting={}", st.node_id, st.role, st.acting)
                            })
                            .collect();
                        format!("task {t}: [{}]", holders.join(", "))
                    })
                    .collect();
                let spares = s
                    .iter()
                    .filter(|(_, st)| st.role == taskgraph::Role::Spare)
                    .count();
                return Err(format!(
                    "not staffed: {primaries}/{tasks} tasks have an acting primary, \
                     {backups_acting}/{} backups acting, {spares} spares, {} of {} nodes still \
                     running; {}",
                    tasks as usize * backups,
                    s.len(),
                    self.nodes.len(),
                    lacking.join("; ")
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for every node to end by itself (after the job is shut down), at most `timeout`
    /// in all; crashes the stragglers and reports them.
    pub async fn finish(mut self, timeout: Duration) -> Result<(), BoxError> {
        let deadline = Instant::now() + timeout;
        let mut errors = Vec::new();
        let mut stragglers = 0;
        for h in std::mem::take(&mut self.nodes) {
            while !h.is_finished() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if h.is_finished() {
                if let Err(e) = h.wait().await {
                    errors.push(e.to_string());
                }
            } else {
                h.crash();
                stragglers += 1;
            }
        }
        if errors.is_empty() && stragglers == 0 {
            return Ok(());
        }
        Err(format!(
            "after the job was shut down, {} node(s) ended with an error (first: {}) and \
             {stragglers} did not end within {timeout:?} (crashed)",
            errors.len(),
            errors.first().map_or("-", String::as_str)
        )
        .into())
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for h in self.nodes.drain(..) {
            h.crash();
        }
    }
}

/// etcd's own counters, read from its `/metrics` (Prometheus text format): every counter
/// whose name ends in `_total`, summed over labels except `grpc_method` and `grpc_type`, which
/// are kept in the key (`grpc_server_handled_total{Range,unary}`).
pub async fn etcd_metrics(url: &str) -> Result<BTreeMap<String, f64>, BoxError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or("metrics URL is not http")?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/metrics"),
    };
    let mut stream = tokio::net::TcpStream::connect(host).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .await?;
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut body)).await??;
    let out = parse_counters(&body);
    if !out.contains_key("etcd_mvcc_put_total")
        && !out.contains_key("etcd_debugging_mvcc_put_total")
    {
        return Err(
            format!("no etcd_mvcc_put_total nor etcd_debugging_mvcc_put_total in {url}").into(),
        );
    }
    Ok(out)
}

/// The counters of a Prometheus text page, keyed as [`etcd_metrics`] keys them.
pub fn parse_counters(body: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in body.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (base, labels) = match name.find('{') {
            Some(i) => (&name[..i], &name[i..]),
            None => (name, ""),
        };
        if !base.ends_with("_total") {
            continue;
        }
        let key = match (label(labels, "grpc_method"), label(labels, "grpc_type")) {
            (Some(m), Some(t)) => format!("{base}{{{m},{t}}}"),
            (Some(m), None) => format!("{base}{{{m}}}"),
            _ => base.to_owned(),
        };
        *out.entry(key).or_insert(0.0) += value;
    }
    out
}

fn label<'a>(labels: &'a str, label: &str) -> Option<&'a str> {
    let start = labels.find(&format!("{label}=\""))? + label.len() + 2;
    let len = labels[start..].find('"')?;
    Some(&labels[start..start + len])
}

/// `after − before`, key by key.
pub fn delta(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, v)| *v != 0.0)
        .collect()
}

/// etcd's current revision (every write bumps it by one).
pub async fn revision(client: &mut etcd_client::Client) -> Result<i64, BoxError> {
    let r = client.get("taskgraph-bench-probe", None).await?;
    Ok(r.header().ok_or("no header in etcd's answer")?.revision())
}

/// Resident memory of this process in bytes (`VmRSS` of `/proc/self/status`).
pub fn rss_bytes() -> Option<u64> {
    status_kib("VmRSS:").map(|kb| kb * 1024)
}

/// Peak resident memory of this process in bytes since the last [`reset_peak_rss`] (`VmHWM`).
pub fn peak_rss_bytes() -> Option<u64> {
    status_kib("VmHWM:").map(|kb| kb * 1024)
}

/// Resets the peak of [`peak_rss_bytes`] to the current resident memory (writes `5` to
/// `/proc/self/clear_refs`, Linux 4.0 and later); `false` if that is not possible.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// CPU time used by this process so far (every thread, user and system), from the
/// scheduler's per-thread figures in `/proc/self/task/*/schedstat` (nanoseconds; threads that
/// ended are left out, so take differences over spans in which the runtime's threads live).
pub fn process_cpu() -> Option<Duration> {
    let mut total = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let Ok(task) = task else { continue };
        let Ok(stat) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(Duration::from_nanos(total))
}

fn status_kib(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU time this process has used (user + system), from `/proc/self/stat` (clock ticks
/// assumed at 100 Hz, Linux's `USER_HZ`).
pub fn cpu_time() -> Option<Duration> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    // After the name: state is field 3, utime field 14, stime field 15.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 10))
}

/// Generated code of `proto/echo.proto`.
#[allow(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    clippy::expect_used
)]
pub mod proto {
    tonic::include_proto!("taskgraph.bench");
}

use proto::echo_client::EchoClient;
use proto::echo_server::{Echo, EchoServer};
use proto::Payload;

/// Largest message of the bare echo service by default (as the framework's default frame
/// limit).
pub const ECHO_MAX: usize = taskgraph::testing::wire::DEFAULT_MAX_FRAME_BYTES;

#[derive(Debug)]
struct EchoService;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn echo(
        &self,
        request: tonic::Request<Payload>,
    ) -> Result<tonic::Response<Payload>, tonic::Status> {
        Ok(tonic::Response::new(request.into_inner()))
    }

    type EchoStreamStream = EchoStream;

    async fn echo_stream(
        &self,
        request: tonic::Request<tonic::Streaming<Payload>>,
    ) -> Result<tonic::Response<EchoStream>, tonic::Status> {
        Ok(tonic::Response::new(Box::pin(request.into_inner())))
    }
}

/// The answers of [`Echo::echo_stream`]: the requests themselves, in order.
type EchoStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<Payload, tonic::Status>> + Send + 'static>>;

/// Echoes waiting for their answer on a [`StreamEchoer`], oldest first.
type Waiting = std::collections::VecDeque<oneshot::Sender<Payload>>;

/// A client of the bare echo server that sends every echo on one long-lived stream
/// (`EchoStream`), many in flight, answers matched in order: the reference for what one stream
/// per peer pair can carry.
#[derive(Debug, Clone)]
pub struct StreamEchoer {
    requests: tokio::sync::mpsc::UnboundedSender<(Payload, oneshot::Sender<Payload>)>,
}

impl StreamEchoer {
    /// Opens the stream to `addr` (HTTP/2 as the framework's, see [`http2_settings`]).
    pub async fn connect_with(addr: &str, max_message: usize) -> Result<Self, BoxError> {
        let channel = bare_endpoint(addr)?.connect().await?;
        let mut client = EchoClient::new(channel)
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message);
        let (requests, mut queued) =
            tokio::sync::mpsc::unbounded_channel::<(Payload, oneshot::Sender<Payload>)>();
        let waiting = std::sync::Arc::new(std::sync::Mutex::new(Waiting::new()));
        let (wire, mut wire_rx) = tokio::sync::mpsc::unbounded_channel::<Payload>();
        let registered = waiting.clone();
        // Registers each echo's waiter in send order, then sends it.
        tokio::spawn(async move {
            while let Some((payload, waiter)) = queued.recv().await {
                lock_waiting(&registered).push_back(waiter);
                if wire.send(payload).is_err() {
                    break;
                }
            }
        });
        let outgoing = futures::stream::poll_fn(move |cx| wire_rx.poll_recv(cx));
        let mut answers = client.echo_stream(outgoing).await?.into_inner();
        tokio::spawn(async move {
            while let Ok(Some(answer)) = answers.message().await {
                let waiter = lock_waiting(&waiting).pop_front();
                if let Some(waiter) = waiter {
                    let _ = waiter.send(answer);
                }
            }
        });
        Ok(StreamEchoer { requests })
    }

    /// One echo on the stream; checks that the answer has the payload's length.
    pub async fn echo(&self, data: Bytes) -> Result<(), BoxError> {
        let len = data.len();
        let (waiter, answer) = oneshot::channel();
        self.requests
            .send((Payload { data }, waiter))
            .map_err(|_| "the echo stream is closed")?;
        let answer = answer.await.map_err(|_| "the echo stream ended")?;
        if answer.data.len() != len {
            return Err(format!("echo answered {} bytes, sent {len}", answer.data.len()).into());
        }
        Ok(())
    }
}

fn lock_waiting(w: &std::sync::Mutex<Waiting>) -> std::sync::MutexGuard<'_, Waiting> {
    w.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The HTTP/2 settings both sides of a comparison use: the bare services get the same windows,
/// frame size and keepalive pings as the framework's node-to-node connections
/// (`taskgraph::testing::wire::*`), so a ratio measures the framework, not a transport setting.
pub fn http2_settings() -> String {
    use taskgraph::testing::wire::{
        DEFAULT_HTTP2_KEEPALIVE, HTTP2_CONNECTION_WINDOW, HTTP2_MAX_FRAME, HTTP2_STREAM_WINDOW,
        SERVER_HTTP2_KEEPALIVE_INTERVAL, SERVER_HTTP2_KEEPALIVE_TIMEOUT,
    };
    format!(
        "HTTP/2 on both sides: stream window {} MiB, connection window {} MiB, max frame {} KiB, \
         keepalive pings every {} s (client) and {} s (server, {} s timeout), TCP_NODELAY",
        HTTP2_STREAM_WINDOW >> 20,
        HTTP2_CONNECTION_WINDOW >> 20,
        HTTP2_MAX_FRAME >> 10,
        DEFAULT_HTTP2_KEEPALIVE.as_secs(),
        SERVER_HTTP2_KEEPALIVE_INTERVAL.as_secs(),
        SERVER_HTTP2_KEEPALIVE_TIMEOUT.as_secs(),
    )
}

/// A tonic server builder with the framework's HTTP/2 settings (see [`http2_settings`]).
pub fn bare_server() -> tonic::transport::Server {
    use taskgraph::testing::wire::{
        HTTP2_CONNECTION_WINDOW, HTTP2_MAX_FRAME, HTTP2_STREAM_WINDOW,
        SERVER_HTTP2_KEEPALIVE_INTERVAL, SERVER_HTTP2_KEEPALIVE_TIMEOUT,
    };
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(SERVER_HTTP2_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(SERVER_HTTP2_KEEPALIVE_TIMEOUT))
        .initial_stream_window_size(HTTP2_STREAM_WINDOW)
        .initial_connection_window_size(HTTP2_CONNECTION_WINDOW)
        .max_frame_size(HTTP2_MAX_FRAME)
}

/// A tonic endpoint for `addr` with the framework's HTTP/2 settings (see [`http2_settings`]).
pub fn bare_endpoint(addr: &str) -> Result<tonic::transport::Endpoint, BoxError> {
    use taskgraph::testing::wire::{
        DEFAULT_HTTP2_KEEPALIVE, HTTP2_CONNECTION_WINDOW, HTTP2_MAX_FRAME, HTTP2_STREAM_WINDOW,
    };
    Ok(
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .tcp_nodelay(true)
            .http2_keep_alive_interval(DEFAULT_HTTP2_KEEPALIVE)
            .initial_stream_window_size(HTTP2_STREAM_WINDOW)
            .initial_connection_window_size(HTTP2_CONNECTION_WINDOW)
            .max_frame_size(HTTP2_MAX_FRAME),
    )
}

/// A bare tonic echo server on loopback (no event loop, no etcd): what the framework's pull
/// is compared with. Stops when dropped.
#[derive(Debug)]
pub struct EchoServerHandle {
    /// `host:port`.
    pub addr: String,
    _stop: oneshot::Sender<()>,
}

/// Starts a bare tonic echo server on a free loopback port, with the frame limit [`ECHO_MAX`].
pub async fn echo_server() -> Result<EchoServerHandle, BoxError> {
    echo_server_with(ECHO_MAX).await
}

/// Starts a bare tonic echo server on a free loopback port, refusing messages over
/// `max_message` bytes; HTTP/2 as the framework's (see [`http2_settings`]).
pub async fn echo_server_with(max_message: usize) -> Result<EchoServerHandle, BoxError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let (stop, stopped) = oneshot::channel::<()>();
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let svc = EchoServer::new(EchoService)
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    tokio::spawn(bare_server().add_service(svc).serve_with_incoming_shutdown(
        incoming,
        async move {
            let _ = stopped.await;
        },
    ));
    Ok(EchoServerHandle { addr, _stop: stop })
}

/// A client of the bare echo server: one HTTP/2 connection, cheap to clone (clones share it,
/// as the framework's calls to one peer share one connection).
#[derive(Debug, Clone)]
pub struct Echoer(EchoClient<tonic::transport::Channel>);

impl Echoer {
    /// Connects to `addr`, with the frame limit [`ECHO_MAX`].
    pub async fn connect(addr: &str) -> Result<Self, BoxError> {
        Self::connect_with(addr, ECHO_MAX).await
    }

    /// Connects to `addr`, refusing messages over `max_message` bytes; HTTP/2 as the
    /// framework's (see [`http2_settings`]).
    pub async fn connect_with(addr: &str, max_message: usize) -> Result<Self, BoxError> {
        let channel = bare_endpoint(addr)?.connect().await?;
        Ok(Echoer(
            EchoClient::new(channel)
                .max_decoding_message_size(max_message)
                .max_encoding_message_size(max_message),
        ))
    }

    /// One round trip; checks that the answer has the payload's length.
    pub async fn echo(&self, data: Bytes) -> Result<(), BoxError> {
        let len = data.len();
        let answer = self.0.clone().echo(Payload { data }).await?.into_inner();
        if answer.data.len() != len {
            return Err(format!("echo answered {} bytes, sent {len}", answer.data.len()).into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_summed_over_labels_but_method_and_type() {
        let body = "\
# HELP etcd_mvcc_put_total Total number of puts seen by this member.
# TYPE etcd_mvcc_put_total counter
etcd_mvcc_put_total 8
etcd_debugging_mvcc_current_revision 2
grpc_server_handled_total{grpc_code=\"OK\",grpc_method=\"Txn\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 5
grpc_server_handled_total{grpc_code=\"Unavailable\",grpc_method=\"Txn\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 2
grpc_server_handled_total{grpc_code=\"OK\",grpc_method=\"Range\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 1
etcd_disk_wal_write_bytes_total 1.5e+03
garbage line
";
        let c = parse_counters(body);
        assert_eq!(c.get("etcd_mvcc_put_total"), Some(&8.0));
        assert_eq!(c.get("grpc_server_handled_total{Txn,unary}"), Some(&7.0));
        assert_eq!(c.get("grpc_server_handled_total{Range,unary}"), Some(&1.0));
        assert_eq!(c.get("etcd_disk_wal_write_bytes_total"), Some(&1500.0));
        // Gauges are left out.
        assert!(!c.contains_key("etcd_debugging_mvcc_current_revision"));
        assert_eq!(c.len(), 4);
    }

    #[test]
    fn delta_keeps_changed_counters_only() {
        let before = BTreeMap::from([("a".to_owned(), 1.0), ("b".to_owned(), 2.0)]);
        let after = BTreeMap::from([
            ("a".to_owned(), 1.0),
            ("b".to_owned(), 5.0),
            ("c".to_owned(), 4.0),
        ]);
        let d = delta(&before, &after);
        assert_eq!(
            d,
            BTreeMap::from([("b".to_owned(), 3.0), ("c".to_owned(), 4.0)])
        );
    }

    #[test]
    fn depth_of_binary_trees() {
        assert_eq!(tree_depth(1), 0);
        assert_eq!(tree_depth(2), 1);
        assert_eq!(tree_depth(15), 3);
        assert_eq!(tree_depth(16), 4);
        assert_eq!(tree_depth(255), 7);
        assert_eq!(tree_depth(1024), 10);
    }
}
