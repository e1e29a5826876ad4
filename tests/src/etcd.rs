//! A private, real etcd for tests: one single-member server ([`Etcd`]) or a
//! multi-member cluster on loopback ([`EtcdCluster`]).
//!
//! Every fixture runs the real `etcd` binary (Debian's `etcd-server`, etcd 3.4)
//! as a child process with its own temporary data directory and its own free
//! `127.0.0.1` ports. etcd's stdout and stderr go to a log file in that
//! directory; start-up failures and time-outs quote the tail of that log.
//!
//! Servers are started with `--heartbeat-interval 10 --election-timeout 100`
//! (so leases with a 1 s TTL are granted as 1 s: etcd's minimum TTL is
//! `ceil(1.5 × election timeout)`) and `--grpc-keepalive-min-time 1s` (so
//! clients may send HTTP/2 keep-alive pings every second or two without being
//! disconnected). [`EtcdOptions`] changes these.
//!
//! Dropping a fixture kills its processes with `SIGKILL` and removes the data.
//!
//! ```no_run
//! # async fn demo() -> Result<(), taskgraph_tests::etcd::FixtureError> {
//! use taskgraph_tests::etcd::Etcd;
//! let etcd = Etcd::start().await?;
//! let mut client = etcd.client().await?;
//! client.put("k", "v", None).await.ok();
//! etcd.kill().await?;     // crash it
//! etcd.restart().await?;  // same ports, same data
//! # Ok(()) }
//! ```

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions};
use tempfile::TempDir;

/// Environment variable that, when set, names the `etcd` binary to run.
pub const ETCD_BIN_ENV: &str = "TASKGRAPH_ETCD_BIN";
/// Environment variable that, when set, names the `etcdctl` binary to run.
pub const ETCDCTL_BIN_ENV: &str = "TASKGRAPH_ETCDCTL_BIN";

/// How many times a start is retried when etcd cannot bind its ports.
const BIND_ATTEMPTS: usize = 5;
/// How many lines of etcd's log are quoted in errors.
const LOG_TAIL_LINES: usize = 40;
/// Time allowed to one readiness probe (connect + `status()`).
const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);
/// Pause between readiness probes.
const PROBE_INTERVAL: Duration = Duration::from_millis(50);
/// How long [`Etcd::stop`] waits after `SIGTERM` before it sends `SIGKILL`.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long we wait for a killed process to be reaped.
const REAP_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed to one `etcdctl` invocation.
const ETCDCTL_TIMEOUT: Duration = Duration::from_secs(15);

/// Errors of the etcd fixtures.
#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    /// A binary (`etcd` or `etcdctl`) was not found.
    #[error(
        "`{binary}` binary not found (looked at ${env_var}, in $PATH and in /usr/bin); \
         install Debian's `{package}` package (`apt-get install {package}`) \
         or set ${env_var} to its path"
    )]
    BinaryNotFound {
        /// Name of the binary, `etcd` or `etcdctl`.
        binary: &'static str,
        /// Debian package providing it.
        package: &'static str,
        /// Environment variable that overrides the lookup.
        env_var: &'static str,
    },

    /// An I/O operation failed.
    #[error("I/O error while {context}: {source}")]
    Io {
        /// What the fixture was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// Something did not happen in time.
    #[error("timed out after {waited:?} waiting for {what}; last error: {last_error}{log_tail}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long the fixture waited.
        waited: Duration,
        /// The last error seen while polling.
        last_error: String,
        /// The tail of the relevant etcd log(s), with a header line; may be empty.
        log_tail: String,
    },

    /// An etcd process exited while the fixture expected it to run.
    #[error("{what} exited unexpectedly ({status}){log_tail}")]
    Exited {
        /// Which process.
        what: String,
        /// Its exit status.
        status: String,
        /// The tail of its log, with a header line.
        log_tail: String,
    },

    /// An etcd client call made by the fixture failed.
    #[error("etcd client error while {context}: {source}")]
    Client {
        /// What the fixture was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: etcd_client::Error,
    },

    /// `etcdctl` failed.
    #[error("`etcdctl {args}` failed ({status}): {stderr}")]
    Etcdctl {
        /// The arguments given (endpoints excluded).
        args: String,
        /// Its exit status, or "timed out".
        status: String,
        /// Its standard error (and standard output, when stderr is empty).
        stderr: String,
    },

    /// The fixture was used wrongly (e.g. a member index out of range).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl FixtureError {
    fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        FixtureError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Settings for starting etcd servers ([`Etcd::start_with`],
/// [`EtcdCluster::start_with`]).
///
/// Build it with struct-update syntax or the `with_*` methods:
///
/// ```
/// use taskgraph_tests::etcd::EtcdOptions;
/// let opts = EtcdOptions::default().with_arg("--auth-token").with_arg("simple");
/// assert_eq!(opts.extra_args.len(), 2);
/// ```
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// `--heartbeat-interval` (whole milliseconds). Default 10 ms.
    pub heartbeat_interval: Duration,
    /// `--election-timeout` (whole milliseconds). Default 100 ms; etcd's
    /// smallest lease TTL is `ceil(1.5 × election timeout)`, so anything up
    /// to 666 ms still allows 1 s TTLs.
    pub election_timeout: Duration,
    /// `--grpc-keepalive-min-time`. Default 1 s. Clients pinging more often
    /// than this are disconnected by etcd (`too_many_pings`).
    pub grpc_keepalive_min_time: Duration,
    /// Extra command-line arguments appended to every start of every member.
    pub extra_args: Vec<String>,
    /// Extra environment variables for the etcd processes. (All inherited
    /// `ETCD_*` variables are removed.)
    pub env: Vec<(String, String)>,
    /// How long a start or restart may take before it fails. Default 10 s.
    pub ready_timeout: Duration,
    /// A second, TLS client listener (single-member [`Etcd`] only; ignored by
    /// [`EtcdCluster`]). The plain `http://` listener stays, for the harness's
    /// readiness probe; tests of TLS use [`Etcd::tls_endpoints`]. Default none.
    pub tls: Option<EtcdServerTls>,
}

/// The PEM files of an etcd TLS client listener (`--cert-file`, `--key-file`,
/// `--trusted-ca-file`, `--client-cert-auth`). Make them with
/// [`TestCa`](crate::certs::TestCa).
#[derive(Debug, Clone)]
pub struct EtcdServerTls {
    /// The server's certificate (`--cert-file`); it must name `127.0.0.1`.
    pub cert_file: PathBuf,
    /// Its key (`--key-file`).
    pub key_file: PathBuf,
    /// The CA that client certificates must chain to (`--trusted-ca-file`).
    pub client_ca_file: PathBuf,
    /// Whether a client certificate is required (`--client-cert-auth`).
    pub client_cert_auth: bool,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            heartbeat_interval: Duration::from_millis(10),
            election_timeout: Duration::from_millis(100),
            grpc_keepalive_min_time: Duration::from_secs(1),
            extra_args: Vec::new(),
            env: Vec::new(),
            ready_timeout: Duration::from_secs(10),
            tls: None,
        }
    }
}

impl EtcdOptions {
    /// Appends one extra command-line argument.
    #[must_use]
    pub fn with_arg(mut self, arg: impl Into<String>) -> Self {
        self.extra_args.push(arg.into());
        self
    }

    /// Adds one environment variable for the etcd processes.
    #[must_use]
    pub fn with_env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Sets heartbeat interval and election timeout.
    #[must_use]
    pub fn with_raft_timing(mut self, heartbeat: Duration, election: Duration) -> Self {
        self.heartbeat_interval = heartbeat;
        self.election_timeout = election;
        self
    }

    /// Sets how long a start or restart may take.
    #[must_use]
    pub fn with_ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// Adds a TLS client listener (see [`EtcdOptions::tls`]).
    #[must_use]
    pub fn with_tls(mut self, tls: EtcdServerTls) -> Self {
        self.tls = Some(tls);
        self
    }
}

/// Client options used by the fixtures' `client()` helpers: connect timeout
/// 1 s, request timeout 2 s, HTTP/2 keep-alive every 2 s with a 1 s timeout
/// (allowed by the servers' `--grpc-keepalive-min-time 1s`).
///
/// Note that the request timeout of tonic (and so of etcd-client) bounds the
/// wait for the response *headers*: a watch or lease keep-alive stream is not
/// cut after 2 s.
pub fn connect_options() -> ConnectOptions {
    ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(1))
        .with_timeout(Duration::from_secs(2))
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(1))
}

// ---------------------------------------------------------------------------
// Binaries
// ---------------------------------------------------------------------------

fn find_binary(
    binary: &'static str,
    package: &'static str,
    env_var: &'static str,
) -> Result<PathBuf, FixtureError> {
    let not_found = FixtureError::BinaryNotFound {
        binary,
        package,
        env_var,
    };
    if let Some(path) = std::env::var_os(env_var) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(not_found)
        };
    }
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join(binary)).collect())
        .unwrap_or_default();
    candidates.push(Path::new("/usr/bin").join(binary));
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .ok_or(not_found)
}

/// Path of the `etcd` binary: `$TASKGRAPH_ETCD_BIN`, else `etcd` in `$PATH`,
/// else `/usr/bin/etcd`.
///
/// # Errors
/// [`FixtureError::BinaryNotFound`] when there is none.
pub fn etcd_binary() -> Result<PathBuf, FixtureError> {
    find_binary("etcd", "etcd-server", ETCD_BIN_ENV)
}

/// Path of the `etcdctl` binary: `$TASKGRAPH_ETCDCTL_BIN`, else `etcdctl` in
/// `$PATH`, else `/usr/bin/etcdctl`.
///
/// # Errors
/// [`FixtureError::BinaryNotFound`] when there is none.
pub fn etcdctl_binary() -> Result<PathBuf, FixtureError> {
    find_binary("etcdctl", "etcd-client", ETCDCTL_BIN_ENV)
}

// ---------------------------------------------------------------------------
// Spawning: etcd must not outlive the test process
// ---------------------------------------------------------------------------

/// `setpriv` (util-linux), used to give etcd a parent-death signal so that it
/// dies with the test process even when that is killed without running
/// destructors (e.g. by a test-runner timeout).
fn setpriv() -> Option<PathBuf> {
    static SETPRIV: OnceLock<Option<PathBuf>> = OnceLock::new();
    SETPRIV
        .get_or_init(|| {
            let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
                .map(|p| {
                    std::env::split_paths(&p)
                        .map(|d| d.join("setpriv"))
                        .collect()
                })
                .unwrap_or_default();
            candidates.push(PathBuf::from("/usr/bin/setpriv"));
            candidates.into_iter().find(|p| p.is_file())
        })
        .clone()
}

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawns `cmd` from one thread that lives as long as the process.
///
/// Linux delivers the parent-death signal when the *thread* that forked the
/// child exits, not the process: spawning from a tokio worker or blocking
/// thread would kill etcd when that thread ends (e.g. at the end of one
/// test's runtime). Falls back to spawning on the calling thread.
fn spawn_from_long_lived_thread(mut cmd: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<Option<Mutex<mpsc::Sender<SpawnRequest>>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("etcd-fixture-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .ok()
            .map(|_| Mutex::new(tx))
    });
    let Some(spawner) = spawner else {
        return cmd.spawn();
    };
    let (reply_tx, reply_rx) = mpsc::channel();
    let sent = spawner
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, reply_tx));
    match sent {
        Ok(()) => reply_rx
            .recv()
            .unwrap_or_else(|_| Err(std::io::Error::other("etcd spawner thread is gone"))),
        Err(mpsc::SendError((mut cmd, _))) => cmd.spawn(),
    }
}

// ---------------------------------------------------------------------------
// Ports
// ---------------------------------------------------------------------------

/// Next candidate port offset; 0 means "not yet seeded".
static NEXT_PORT: AtomicU32 = AtomicU32::new(0);

/// The range fixture ports are taken from: below the kernel's ephemeral range
/// (so that ports of killed servers are not handed out as source ports of
/// outgoing connections or by `bind(0)` in other tests before a restart).
fn port_range() -> Option<(u32, u32)> {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .next()
                .and_then(|w| w.parse::<u32>().ok())
        })
        .unwrap_or(32768);
    let (start, end) = (15_000u32, low.min(65_000));
    (end > start + 2_000).then_some((start, end))
}

/// Picks `n` distinct free loopback ports. All are held bound until all are
/// found, then released: etcd binds them a moment later; a clash with
/// another process in between is handled by retrying the start.
fn pick_ports(n: usize) -> Result<Vec<u16>, FixtureError> {
    let mut held: Vec<TcpListener> = Vec::with_capacity(n);
    if let Some((start, end)) = port_range() {
        let span = end - start;
        if NEXT_PORT.load(Ordering::Relaxed) == 0 {
            let seed = rand::random_range(1..span);
            let _ = NEXT_PORT.compare_exchange(0, seed, Ordering::Relaxed, Ordering::Relaxed);
        }
        let mut tries = 0;
        while held.len() < n && tries < 4 * span {
            tries += 1;
            let offset = NEXT_PORT.fetch_add(1, Ordering::Relaxed) % span;
            let Ok(port) = u16::try_from(start + offset) else {
                continue;
            };
            if let Ok(listener) = TcpListener::bind(("127.0.0.1", port)) {
                held.push(listener);
            }
        }
    }
    while held.len() < n {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .map_err(|e| FixtureError::io("binding 127.0.0.1:0 to find a free port", e))?;
        held.push(listener);
    }
    held.iter()
        .map(|l| {
            l.local_addr()
                .map(|a| a.port())
                .map_err(|e| FixtureError::io("reading a listener's local address", e))
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Logs
// ---------------------------------------------------------------------------

/// The last `lines` lines of `path` from byte `from` on.
fn read_log_tail(path: &Path, from: u64, lines: usize) -> String {
    let mut text = Vec::new();
    let read = File::open(path).and_then(|mut f| {
        f.seek(SeekFrom::Start(from))?;
        f.read_to_end(&mut text)
    });
    if let Err(e) = read {
        return format!("(could not read {}: {e})", path.display());
    }
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn format_log_tail(path: &Path, from: u64) -> String {
    format!(
        "\n--- tail of {} ---\n{}",
        path.display(),
        read_log_tail(path, from, LOG_TAIL_LINES)
    )
}

// ---------------------------------------------------------------------------
// One etcd process
// ---------------------------------------------------------------------------

#[derive(Debug, Default)]
struct ProcState {
    /// The running (or exited but not yet reaped) process.
    child: Option<Child>,
    /// Length of the log file when the current process was started.
    log_offset: u64,
    /// How many times this member was started.
    starts: u32,
}

/// Why waiting for a member failed.
enum StartFailure {
    /// etcd exited because one of its ports was taken: retry with other ports.
    AddrInUse(FixtureError),
    /// Anything else.
    Other(FixtureError),
}

impl StartFailure {
    fn into_error(self) -> FixtureError {
        match self {
            StartFailure::AddrInUse(e) | StartFailure::Other(e) => e,
        }
    }
}

/// One etcd member: its configuration and its process.
#[derive(Debug)]
struct Member {
    name: String,
    binary: PathBuf,
    client_url: String,
    /// The TLS client listener's URL, if any.
    tls_url: Option<String>,
    data_dir: PathBuf,
    log_path: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    proc: Mutex<ProcState>,
}

impl Member {
    /// Describes a member; nothing is started.
    #[allow(clippy::too_many_arguments)]
    fn new(
        binary: &Path,
        dir: &Path,
        name: &str,
        client_port: u16,
        tls_port: Option<u16>,
        peer_port: u16,
        initial_cluster: &str,
        cluster_token: &str,
        options: &EtcdOptions,
    ) -> Member {
        let client_url = format!("http://127.0.0.1:{client_port}");
        let tls = tls_port.zip(options.tls.as_ref());
        let tls_url = tls.map(|(port, _)| format!("https://127.0.0.1:{port}"));
        let client_urls = match &tls_url {
            Some(t) => format!("{client_url},{t}"),
            None => client_url.clone(),
        };
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let data_dir = dir.join(format!("{name}.data"));
        let log_path = dir.join(format!("{name}.log"));
        let mut args: Vec<String> = [
            "--name",
            name,
            "--data-dir",
            &data_dir.to_string_lossy(),
            "--listen-client-urls",
            &client_urls,
            "--advertise-client-urls",
            &client_urls,
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
            "--initial-cluster",
            initial_cluster,
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            cluster_token,
            "--heartbeat-interval",
            &options.heartbeat_interval.as_millis().to_string(),
            "--election-timeout",
            &options.election_timeout.as_millis().to_string(),
            "--grpc-keepalive-min-time",
            &format!("{}ms", options.grpc_keepalive_min_time.as_millis()),
            "--logger",
            "zap",
            "--log-outputs",
            "stderr",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        if let Some((_, tls)) = tls {
            args.extend([
                "--cert-file".to_owned(),
                tls.cert_file.to_string_lossy().into_owned(),
                "--key-file".to_owned(),
                tls.key_file.to_string_lossy().into_owned(),
                "--trusted-ca-file".to_owned(),
                tls.client_ca_file.to_string_lossy().into_owned(),
                format!("--client-cert-auth={}", tls.client_cert_auth),
            ]);
        }
        args.extend(options.extra_args.iter().cloned());
        Member {
            name: name.to_owned(),
            binary: binary.to_owned(),
            client_url,
            tls_url,
            data_dir,
            log_path,
            args,
            env: options.env.clone(),
            proc: Mutex::new(ProcState::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ProcState> {
        self.proc.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn what(&self) -> String {
        format!("etcd member `{}` ({})", self.name, self.client_url)
    }

    /// Starts the process. A process still registered is killed first.
    fn spawn(&self) -> Result<(), FixtureError> {
        let mut state = self.lock();
        if let Some(mut old) = state.child.take() {
            let _ = old.kill();
            let _ = old.wait();
        }
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(|e| FixtureError::io(format!("opening log {}", self.log_path.display()), e))?;
        let offset = log
            .metadata()
            .map(|m| m.len())
            .map_err(|e| FixtureError::io("reading the log's length", e))?;
        let _ = writeln!(
            log,
            "=== taskgraph fixture: start #{} of {} {} ===",
            state.starts + 1,
            self.binary.display(),
            self.args.join(" ")
        );
        let stderr = log
            .try_clone()
            .map_err(|e| FixtureError::io("duplicating the log file handle", e))?;
        let mut cmd = match setpriv() {
            Some(setpriv) => {
                let mut cmd = Command::new(setpriv);
                cmd.args(["--pdeathsig", "KILL", "--"]).arg(&self.binary);
                cmd
            }
            None => Command::new(&self.binary),
        };
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(stderr));
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ETCD_") {
                cmd.env_remove(key);
            }
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        let child = spawn_from_long_lived_thread(cmd)
            .map_err(|e| FixtureError::io(format!("spawning {}", self.binary.display()), e))?;
        state.child = Some(child);
        state.log_offset = offset;
        state.starts += 1;
        Ok(())
    }

    /// `Some(status)` when the process has exited (it is then reaped and forgotten).
    fn exited(&self) -> Option<ExitStatus> {
        let mut state = self.lock();
        let status = state
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten());
        if status.is_some() {
            state.child = None;
        }
        status
    }

    fn is_running(&self) -> bool {
        let mut state = self.lock();
        match state.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(Ok(Some(_))) => {
                state.child = None;
                false
            }
            Some(Err(_)) | None => false,
        }
    }

    fn pid(&self) -> Option<u32> {
        if self.is_running() {
            self.lock().child.as_ref().map(Child::id)
        } else {
            None
        }
    }

    fn log_offset(&self) -> u64 {
        self.lock().log_offset
    }

    fn log_tail(&self) -> String {
        format_log_tail(&self.log_path, self.log_offset())
    }

    /// Polls until `child` is reaped.
    async fn reap(&self, mut child: Child, timeout: Duration) -> Result<(), FixtureError> {
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return Ok(()),
                Ok(None) => {}
                Err(e) => return Err(FixtureError::io(format!("waiting for {}", self.what()), e)),
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                return tokio::task::spawn_blocking(move || child.wait())
                    .await
                    .map_err(|e| {
                        FixtureError::io("joining a reaper task", std::io::Error::other(e))
                    })?
                    .map(|_| ())
                    .map_err(|e| FixtureError::io(format!("waiting for {}", self.what()), e));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// SIGKILL and reap; no-op if not running.
    async fn kill(&self) -> Result<(), FixtureError> {
        let child = self.lock().child.take();
        let Some(mut child) = child else {
            return Ok(());
        };
        // Fails only if already reaped, which cannot be: we own the handle.
        let _ = child.kill();
        self.reap(child, REAP_TIMEOUT).await
    }

    /// SIGTERM, wait (SIGKILL after a grace period); no-op if not running.
    async fn stop(&self) -> Result<(), FixtureError> {
        let child = self.lock().child.take();
        let Some(child) = child else {
            return Ok(());
        };
        let status = tokio::process::Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
        if !matches!(status, Ok(s) if s.success()) {
            // No `kill` binary or the process is gone already: fall back to SIGKILL.
            let mut child = child;
            let _ = child.kill();
            return self.reap(child, REAP_TIMEOUT).await;
        }
        // `reap` sends SIGKILL when the grace period ends.
        self.reap(child, STOP_GRACE).await
    }

    /// Kills synchronously (used by `Drop`).
    fn kill_now(&self) {
        if let Some(mut child) = self.lock().child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Removes the data directory (before a fresh first start).
    fn wipe_data(&self) -> Result<(), FixtureError> {
        match std::fs::remove_dir_all(&self.data_dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(FixtureError::io(
                format!("removing {}", self.data_dir.display()),
                e,
            )),
        }
    }

    /// Waits until the member answers `status()` and knows a leader, or
    /// exits, or `timeout` passes.
    async fn wait_ready(&self, timeout: Duration) -> Result<(), StartFailure> {
        let started = Instant::now();
        let deadline = started + timeout;
        loop {
            if let Some(status) = self.exited() {
                let tail = read_log_tail(&self.log_path, self.log_offset(), usize::MAX);
                let err = FixtureError::Exited {
                    what: self.what(),
                    status: status.to_string(),
                    log_tail: self.log_tail(),
                };
                return Err(if tail.contains("address already in use") {
                    StartFailure::AddrInUse(err)
                } else {
                    StartFailure::Other(err)
                });
            }
            let last_error = match probe(&self.client_url).await {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                return Err(StartFailure::Other(FixtureError::Timeout {
                    what: format!("{} to become ready", self.what()),
                    waited: started.elapsed(),
                    last_error,
                    log_tail: self.log_tail(),
                }));
            }
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill_now();
    }
}

/// What one member says about itself.
#[derive(Debug, Clone, Copy)]
struct MemberStatus {
    member_id: u64,
    leader: u64,
    raft_term: u64,
}

/// One `status()` call on one endpoint, bounded by [`PROBE_TIMEOUT`];
/// fails when the member knows no leader.
async fn probe(url: &str) -> Result<MemberStatus, String> {
    let status = status_of(url).await?;
    if status.leader == 0 {
        return Err(format!("{url} answers but knows no leader"));
    }
    Ok(status)
}

async fn status_of(url: &str) -> Result<MemberStatus, String> {
    let options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_millis(500))
        .with_timeout(Duration::from_secs(1));
    let call = async {
        let mut client = Client::connect([url], Some(options))
            .await
            .map_err(|e| format!("connecting to {url}: {e}"))?;
        let status = client
            .status()
            .await
            .map_err(|e| format!("status() on {url}: {e}"))?;
        let member_id = status
            .header()
            .map(|h| h.member_id())
            .ok_or_else(|| format!("status() on {url} returned no header"))?;
        Ok(MemberStatus {
            member_id,
            leader: status.leader(),
            raft_term: status.raft_term(),
        })
    };
    tokio::time::timeout(PROBE_TIMEOUT, call)
        .await
        .map_err(|_| format!("status() on {url} took longer than {PROBE_TIMEOUT:?}"))?
}

/// Waits for several members at once; the first failure wins (an
/// address clash takes precedence so that the caller retries).
async fn wait_all_ready(members: &[Member], timeout: Duration) -> Result<(), StartFailure> {
    let results = futures::future::join_all(members.iter().map(|m| m.wait_ready(timeout))).await;
    let mut first: Option<StartFailure> = None;
    for failure in results.into_iter().filter_map(Result::err) {
        match (&first, &failure) {
            (None, _) | (Some(StartFailure::Other(_)), StartFailure::AddrInUse(_)) => {
                first = Some(failure);
            }
            _ => {}
        }
    }
    first.map_or(Ok(()), Err)
}

fn unique_token() -> String {
    format!(
        "taskgraph-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    )
}

fn make_tempdir(prefix: &str) -> Result<TempDir, FixtureError> {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .map_err(|e| FixtureError::io("creating a temporary directory", e))
}

async fn connect(endpoints: &[String], options: ConnectOptions) -> Result<Client, FixtureError> {
    Client::connect(endpoints, Some(options))
        .await
        .map_err(|source| FixtureError::Client {
            context: format!("connecting to {}", endpoints.join(",")),
            source,
        })
}

/// Restarts one member on its ports and data, retrying on a port clash.
async fn restart_member(member: &Member, timeout: Duration) -> Result<(), FixtureError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        member.spawn()?;
        match member.wait_ready(timeout).await {
            Ok(()) => return Ok(()),
            Err(StartFailure::AddrInUse(e)) if attempt < BIND_ATTEMPTS => {
                tracing::warn!(error = %e, "etcd restart hit a port clash; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(failure) => {
                member.kill().await?;
                return Err(failure.into_error());
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Etcd
// ---------------------------------------------------------------------------

/// One single-member etcd server on loopback, with its own data directory.
///
/// All methods take `&self`, so the fixture can be shared (e.g. in an `Arc`)
/// between the test body and a task that crashes and restarts etcd.
/// Dropping it kills the process (`SIGKILL`) and removes its files.
#[derive(Debug)]
pub struct Etcd {
    // Field order matters: the process dies before its directory is removed.
    member: Member,
    options: EtcdOptions,
    dir: TempDir,
}

impl Etcd {
    /// Starts an etcd with [`EtcdOptions::default`] and waits until it
    /// answers.
    ///
    /// # Errors
    /// See [`Etcd::start_with`].
    pub async fn start() -> Result<Etcd, FixtureError> {
        Etcd::start_with(EtcdOptions::default()).await
    }

    /// Starts an etcd with `options` on fresh free loopback ports and a fresh
    /// temporary data directory, and waits (at most `options.ready_timeout`)
    /// until it answers `status()` and has elected itself leader.
    ///
    /// # Errors
    /// [`FixtureError::BinaryNotFound`] without an `etcd` binary;
    /// [`FixtureError::Exited`] or [`FixtureError::Timeout`] (with the tail of
    /// etcd's log) when it does not come up; [`FixtureError::Io`].
    pub async fn start_with(options: EtcdOptions) -> Result<Etcd, FixtureError> {
        let binary = etcd_binary()?;
        let dir = make_tempdir("taskgraph-etcd-")?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let ports = pick_ports(if options.tls.is_some() { 3 } else { 2 })?;
            let (client_port, peer_port, tls_port) = match ports[..] {
                [c, p] => (c, p, None),
                [c, p, t] => (c, p, Some(t)),
                _ => return Err(FixtureError::InvalidArgument("port picking failed".into())),
            };
            let initial_cluster = format!("etcd0=http://127.0.0.1:{peer_port}");
            let member = Member::new(
                &binary,
                dir.path(),
                "etcd0",
                client_port,
                tls_port,
                peer_port,
                &initial_cluster,
                &unique_token(),
                &options,
            );
            member.wipe_data()?;
            member.spawn()?;
            match member.wait_ready(options.ready_timeout).await {
                Ok(()) => {
                    return Ok(Etcd {
                        member,
                        options,
                        dir,
                    })
                }
                Err(StartFailure::AddrInUse(e)) if attempt < BIND_ATTEMPTS => {
                    tracing::warn!(error = %e, "etcd start hit a port clash; retrying");
                    member.kill().await?;
                }
                Err(failure) => {
                    member.kill().await?;
                    return Err(failure.into_error());
                }
            }
        }
    }

    /// The client URLs, e.g. `["http://127.0.0.1:23456"]`.
    pub fn endpoints(&self) -> Vec<String> {
        vec![self.member.client_url.clone()]
    }

    /// The client URL, e.g. `http://127.0.0.1:23456`.
    pub fn endpoint(&self) -> &str {
        &self.member.client_url
    }

    /// The TLS client URLs (`https://127.0.0.1:<port>`), empty unless
    /// started with [`EtcdOptions::tls`].
    pub fn tls_endpoints(&self) -> Vec<String> {
        self.member.tls_url.iter().cloned().collect()
    }

    /// Turns on etcd's authentication: adds user `root` (role `root`) with
    /// `root_password`, then `etcdctl auth enable`. From then on every request
    /// needs a user (pass `--user=root:<password>` to [`Etcd::etcdctl`]).
    ///
    /// # Errors
    /// As [`etcdctl`].
    pub async fn enable_auth(&self, root_password: &str) -> Result<(), FixtureError> {
        let pw = format!("--new-user-password={root_password}");
        self.etcdctl(["user", "add", "root", pw.as_str()]).await?;
        self.etcdctl(["auth", "enable"]).await?;
        Ok(())
    }

    /// Creates role `job-<job>` granting read and write on the job's prefix
    /// `/taskgraph/jobs/<job>/` only, and user `user` with `password` holding
    /// just that role — the commands the README's security section shows.
    /// Needs auth enabled with [`Etcd::enable_auth`] (`root_password`).
    ///
    /// # Errors
    /// As [`etcdctl`].
    pub async fn add_job_user(
        &self,
        root_password: &str,
        job: &str,
        user: &str,
        password: &str,
    ) -> Result<(), FixtureError> {
        let root = format!("--user=root:{root_password}");
        let role = format!("job-{job}");
        let prefix = format!("/taskgraph/jobs/{job}/");
        let pw = format!("--new-user-password={password}");
        for args in [
            vec!["role", "add", role.as_str()],
            vec![
                "role",
                "grant-permission",
                "--prefix=true",
                role.as_str(),
                "readwrite",
                prefix.as_str(),
            ],
            vec!["user", "add", user, pw.as_str()],
            vec!["user", "grant-role", user, role.as_str()],
        ] {
            self.etcdctl(std::iter::once(root.as_str()).chain(args))
                .await?;
        }
        Ok(())
    }

    /// A client for this etcd with [`connect_options`].
    ///
    /// # Errors
    /// [`FixtureError::Client`] if the client cannot be built. (Connecting is
    /// lazy: this succeeds while etcd is down; requests then fail.)
    pub async fn client(&self) -> Result<Client, FixtureError> {
        self.client_with(connect_options()).await
    }

    /// A client for this etcd with the given options.
    ///
    /// # Errors
    /// As [`Etcd::client`].
    pub async fn client_with(&self, options: ConnectOptions) -> Result<Client, FixtureError> {
        connect(&self.endpoints(), options).await
    }

    /// URL of etcd's Prometheus metrics (served on the client port),
    /// e.g. `http://127.0.0.1:23456/metrics`.
    pub fn metrics_url(&self) -> String {
        format!("{}/metrics", self.member.client_url)
    }

    /// Runs `etcdctl` against this etcd; see [`etcdctl`].
    ///
    /// # Errors
    /// As [`etcdctl`].
    pub async fn etcdctl<I, S>(&self, args: I) -> Result<String, FixtureError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        etcdctl(&self.endpoints(), args).await
    }

    /// Kills etcd with `SIGKILL` (a crash) and reaps it. No-op when it is
    /// not running.
    ///
    /// # Errors
    /// [`FixtureError::Io`] if waiting for the process fails.
    pub async fn kill(&self) -> Result<(), FixtureError> {
        self.member.kill().await
    }

    /// Stops etcd with `SIGTERM` and waits for it to exit (`SIGKILL` after
    /// 10 s). No-op when it is not running.
    ///
    /// # Errors
    /// [`FixtureError::Io`] if waiting for the process fails.
    pub async fn stop(&self) -> Result<(), FixtureError> {
        self.member.stop().await
    }

    /// Starts etcd again on the same ports with the same data directory and
    /// waits until it answers. A still-running process is killed first
    /// (`SIGKILL`). Leases survive a restart with their full TTL restored.
    ///
    /// # Errors
    /// [`FixtureError::Exited`] / [`FixtureError::Timeout`] with the log tail
    /// when it does not come up (e.g. a port was taken meanwhile); the
    /// process is then killed.
    pub async fn restart(&self) -> Result<(), FixtureError> {
        restart_member(&self.member, self.options.ready_timeout).await
    }

    /// Whether the etcd process is alive.
    pub fn is_running(&self) -> bool {
        self.member.is_running()
    }

    /// The process id of the running etcd.
    pub fn pid(&self) -> Option<u32> {
        self.member.pid()
    }

    /// The client endpoint as a socket address (e.g. for a [`Proxy`](crate::proxy::Proxy)
    /// in front of it). Panics if the endpoint is not `http://ip:port` (test helper).
    pub fn socket_addr(&self) -> std::net::SocketAddr {
        let url = self.endpoint();
        url.trim_start_matches("http://")
            .parse()
            .unwrap_or_else(|e| panic!("etcd endpoint {url}: {e}"))
    }

    /// Sends signal `sig` (a name `kill` knows: `STOP`, `CONT`, …) to the running etcd, through
    /// the `kill` command. Panics when etcd is not running or the signal cannot be sent (test
    /// helper).
    pub fn signal(&self, sig: &str) {
        let Some(pid) = self.pid() else {
            panic!("kill -{sig}: etcd is not running")
        };
        let status = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .unwrap_or_else(|e| panic!("kill -{sig} {pid}: {e}"));
        assert!(status.success(), "kill -{sig} {pid}");
    }

    /// The log file receiving etcd's stdout and stderr (all starts appended).
    pub fn log_path(&self) -> &Path {
        &self.member.log_path
    }

    /// The last `lines` lines of etcd's log since the latest (re)start.
    pub fn log_tail(&self, lines: usize) -> String {
        read_log_tail(&self.member.log_path, self.member.log_offset(), lines)
    }

    /// etcd's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.member.data_dir
    }

    /// The temporary directory holding data and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The options this etcd was started with.
    pub fn options(&self) -> &EtcdOptions {
        &self.options
    }
}

// ---------------------------------------------------------------------------
// EtcdCluster
// ---------------------------------------------------------------------------

/// A multi-member etcd cluster on loopback (usually three members), each
/// member with its own ports, data directory and log file.
///
/// Members are addressed by index `0..len()`. Methods taking an index panic
/// when it is out of range. Dropping the cluster kills all members.
#[derive(Debug)]
pub struct EtcdCluster {
    // Field order matters: processes die before their directory is removed.
    members: Vec<Member>,
    member_ids: Vec<u64>,
    options: EtcdOptions,
    dir: TempDir,
}

impl EtcdCluster {
    /// Starts a cluster of `size` members with [`EtcdOptions::default`] and
    /// waits until every member answers and a leader is elected.
    ///
    /// # Errors
    /// See [`EtcdCluster::start_with`].
    pub async fn start(size: usize) -> Result<EtcdCluster, FixtureError> {
        EtcdCluster::start_with(size, EtcdOptions::default()).await
    }

    /// Starts a cluster of `size` members (`--initial-cluster-state new`)
    /// with `options`, and waits until every member answers and knows a
    /// leader.
    ///
    /// # Errors
    /// [`FixtureError::InvalidArgument`] for `size == 0`; otherwise as
    /// [`Etcd::start_with`].
    pub async fn start_with(
        size: usize,
        options: EtcdOptions,
    ) -> Result<EtcdCluster, FixtureError> {
        if size == 0 {
            return Err(FixtureError::InvalidArgument(
                "a cluster needs at least one member".into(),
            ));
        }
        let binary = etcd_binary()?;
        let dir = make_tempdir("taskgraph-etcd-cluster-")?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let ports = pick_ports(2 * size)?;
            let (client_ports, peer_ports) = ports.split_at(size);
            let names: Vec<String> = (0..size).map(|i| format!("etcd{i}")).collect();
            let initial_cluster = names
                .iter()
                .zip(peer_ports)
                .map(|(n, p)| format!("{n}=http://127.0.0.1:{p}"))
                .collect::<Vec<_>>()
                .join(",");
            let token = unique_token();
            let members: Vec<Member> = names
                .iter()
                .zip(client_ports.iter().zip(peer_ports))
                .map(|(name, (c, p))| {
                    Member::new(
                        &binary,
                        dir.path(),
                        name,
                        *c,
                        None,
                        *p,
                        &initial_cluster,
                        &token,
                        &options,
                    )
                })
                .collect();
            for m in &members {
                m.wipe_data()?;
                m.spawn()?;
            }
            match wait_all_ready(&members, options.ready_timeout).await {
                Ok(()) => {
                    let mut member_ids = Vec::with_capacity(size);
                    for m in &members {
                        let status = status_of(&m.client_url).await.map_err(|e| {
                            FixtureError::io(
                                format!("reading the member id of {}", m.what()),
                                std::io::Error::other(e),
                            )
                        })?;
                        member_ids.push(status.member_id);
                    }
                    return Ok(EtcdCluster {
                        members,
                        member_ids,
                        options,
                        dir,
                    });
                }
                Err(failure) => {
                    for m in &members {
                        m.kill().await?;
                    }
                    match failure {
                        StartFailure::AddrInUse(e) if attempt < BIND_ATTEMPTS => {
                            tracing::warn!(error = %e, "etcd cluster start hit a port clash; retrying");
                        }
                        failure => return Err(failure.into_error()),
                    }
                }
            }
        }
    }

    fn member(&self, i: usize) -> &Member {
        match self.members.get(i) {
            Some(m) => m,
            None => panic!(
                "etcd cluster member index {i} out of range (cluster of {})",
                self.members.len()
            ),
        }
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Always `false`: a cluster has at least one member.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The client URLs of all members, in member order.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// The client URL of member `i`.
    pub fn endpoint(&self, i: usize) -> &str {
        &self.member(i).client_url
    }

    /// etcd's member id of member `i` (stable across restarts).
    pub fn member_id(&self, i: usize) -> u64 {
        self.member_ids[i]
    }

    /// A client for all members with [`connect_options`].
    ///
    /// # Errors
    /// [`FixtureError::Client`] if the client cannot be built.
    pub async fn client(&self) -> Result<Client, FixtureError> {
        connect(&self.endpoints(), connect_options()).await
    }

    /// A client for member `i` only, with [`connect_options`].
    ///
    /// # Errors
    /// [`FixtureError::Client`] if the client cannot be built.
    pub async fn member_client(&self, i: usize) -> Result<Client, FixtureError> {
        connect(&[self.member(i).client_url.clone()], connect_options()).await
    }

    /// URL of member `i`'s Prometheus metrics.
    pub fn metrics_url(&self, i: usize) -> String {
        format!("{}/metrics", self.member(i).client_url)
    }

    /// Runs `etcdctl` against all members; see [`etcdctl`].
    ///
    /// # Errors
    /// As [`etcdctl`].
    pub async fn etcdctl<I, S>(&self, args: I) -> Result<String, FixtureError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        etcdctl(&self.endpoints(), args).await
    }

    /// Kills member `i` with `SIGKILL` and reaps it; no-op if not running.
    ///
    /// # Errors
    /// [`FixtureError::Io`] if waiting for the process fails.
    pub async fn kill(&self, i: usize) -> Result<(), FixtureError> {
        self.member(i).kill().await
    }

    /// Kills all members.
    ///
    /// # Errors
    /// [`FixtureError::Io`] if waiting for a process fails.
    pub async fn kill_all(&self) -> Result<(), FixtureError> {
        for m in &self.members {
            m.kill().await?;
        }
        Ok(())
    }

    /// Stops member `i` with `SIGTERM` and waits; no-op if not running.
    ///
    /// # Errors
    /// [`FixtureError::Io`] if waiting for the process fails.
    pub async fn stop(&self, i: usize) -> Result<(), FixtureError> {
        self.member(i).stop().await
    }

    /// Starts member `i` again (same ports, same data; killed first if
    /// still running) and waits until it answers and knows a leader.
    ///
    /// etcd serves clients only once the member has rejoined through a
    /// quorum, so this times out when a majority is down (the port accepts
    /// connections but requests hang): use [`EtcdCluster::restart_all`] then.
    ///
    /// # Errors
    /// [`FixtureError::Exited`] / [`FixtureError::Timeout`] with the log tail;
    /// the member is then killed.
    pub async fn restart(&self, i: usize) -> Result<(), FixtureError> {
        restart_member(self.member(i), self.options.ready_timeout).await
    }

    /// Starts every member that is not running, all at once, and waits
    /// until all members answer and know a leader.
    ///
    /// # Errors
    /// As [`EtcdCluster::restart`].
    pub async fn restart_all(&self) -> Result<(), FixtureError> {
        for m in &self.members {
            if !m.is_running() {
                m.spawn()?;
            }
        }
        wait_all_ready(&self.members, self.options.ready_timeout)
            .await
            .map_err(StartFailure::into_error)
    }

    /// Whether member `i`'s process is alive.
    pub fn is_running(&self, i: usize) -> bool {
        self.member(i).is_running()
    }

    /// The process id of member `i`, if running.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.member(i).pid()
    }

    /// The log file of member `i`.
    pub fn log_path(&self, i: usize) -> &Path {
        &self.member(i).log_path
    }

    /// The last `lines` lines of member `i`'s log since its latest (re)start.
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        let m = self.member(i);
        read_log_tail(&m.log_path, m.log_offset(), lines)
    }

    /// The temporary directory holding all members' data and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The index of the current leader: the member that answers `status()`
    /// (within 1.5 s) naming itself as leader. `None` when no running member
    /// claims leadership (e.g. during an election). If two claim it
    /// (transiently, across terms) the one with the higher raft term wins.
    pub async fn leader(&self) -> Option<usize> {
        let statuses = futures::future::join_all(
            self.members
                .iter()
                .map(|m| async move { m.is_running().then_some(status_of(&m.client_url).await) }),
        )
        .await;
        statuses
            .into_iter()
            .enumerate()
            .filter_map(|(i, s)| match s {
                Some(Ok(s)) if s.leader != 0 && s.leader == s.member_id => Some((i, s.raft_term)),
                _ => None,
            })
            .max_by_key(|(_, term)| *term)
            .map(|(i, _)| i)
    }

    /// Polls [`EtcdCluster::leader`] until a leader is found or `timeout`
    /// passes.
    ///
    /// # Errors
    /// [`FixtureError::Timeout`] with the tails of the running members' logs.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<usize, FixtureError> {
        let started = Instant::now();
        loop {
            if let Some(i) = self.leader().await {
                return Ok(i);
            }
            if started.elapsed() >= timeout {
                let log_tail = self
                    .members
                    .iter()
                    .filter(|m| m.is_running())
                    .map(|m| {
                        format!(
                            "\n--- tail of {} ---\n{}",
                            m.log_path.display(),
                            read_log_tail(&m.log_path, m.log_offset(), 15)
                        )
                    })
                    .collect();
                return Err(FixtureError::Timeout {
                    what: "an etcd cluster leader".into(),
                    waited: started.elapsed(),
                    last_error: "no running member claims leadership".into(),
                    log_tail,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The options the cluster was started with.
    pub fn options(&self) -> &EtcdOptions {
        &self.options
    }
}

// ---------------------------------------------------------------------------
// etcdctl
// ---------------------------------------------------------------------------

/// Runs the real `etcdctl` (API v3) against `endpoints` with `args`
/// (e.g. `["put", "key", "value"]`) and returns its standard output.
///
/// `--endpoints`, `--dial-timeout=2s` and `--command-timeout=5s` are added
/// before `args`; the whole run is bounded by 15 s.
///
/// # Errors
/// [`FixtureError::Etcdctl`] (with stderr) when it exits unsuccessfully or
/// times out; [`FixtureError::BinaryNotFound`]; [`FixtureError::Io`].
pub async fn etcdctl<I, S>(endpoints: &[String], args: I) -> Result<String, FixtureError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    etcdctl_with_stdin(endpoints, args, None).await
}

/// Like [`etcdctl`], feeding `stdin` to the process. `etcdctl put KEY` with
/// no value argument reads the value from stdin, which is how to store
/// arbitrary bytes (including NUL or invalid UTF-8) under a key.
///
/// # Errors
/// As [`etcdctl`].
pub async fn etcdctl_with_stdin<I, S>(
    endpoints: &[String],
    args: I,
    stdin: Option<&[u8]>,
) -> Result<String, FixtureError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    use tokio::io::AsyncWriteExt;

    let binary = etcdctl_binary()?;
    let args: Vec<std::ffi::OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let shown = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    let mut cmd = tokio::process::Command::new(&binary);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("ETCDCTL_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", endpoints.join(",")))
        .arg("--dial-timeout=2s")
        .arg("--command-timeout=5s")
        .args(&args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| FixtureError::io(format!("spawning {}", binary.display()), e))?;
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(data)
            .await
            .map_err(|e| FixtureError::io("writing etcdctl's stdin", e))?;
        drop(pipe);
    }
    let output = match tokio::time::timeout(ETCDCTL_TIMEOUT, child.wait_with_output()).await {
        Ok(output) => output.map_err(|e| FixtureError::io("waiting for etcdctl", e))?,
        Err(_) => {
            return Err(FixtureError::Etcdctl {
                args: shown,
                status: format!("timed out after {ETCDCTL_TIMEOUT:?}"),
                stderr: String::new(),
            })
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        Ok(stdout)
    } else {
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        Err(FixtureError::Etcdctl {
            args: shown,
            status: output.status.to_string(),
            stderr: if stderr.is_empty() { stdout } else { stderr },
        })
    }
}
