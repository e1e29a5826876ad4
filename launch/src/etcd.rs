//! [`LocalEtcd`]: a private, single-member etcd started on free loopback ports in a temporary
//! folder, stopped (and its folder removed) when the run ends.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::error::{ErrorKind, LaunchError};

/// A running private etcd. It is killed when dropped (and, where `setpriv` is installed, when
/// this process dies); [`stop`](LocalEtcd::stop) also waits for it to exit.
///
/// The binary is `$TASKGRAPH_ETCD_BIN`, else `etcd` on the `PATH`, else `/usr/bin/etcd`.
///
/// ```no_run
/// # async fn f() -> Result<(), taskgraph_launch::LaunchError> {
/// let etcd = taskgraph_launch::LocalEtcd::start().await?;
/// println!("etcd answers at {}", etcd.endpoint());
/// etcd.stop().await;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct LocalEtcd {
    child: Child,
    dir: tempfile::TempDir,
    endpoint: String,
}

impl LocalEtcd {
    /// Starts etcd and waits until it answers. Its raft timing allows lease TTLs down to 1 s.
    /// Fails with [`ErrorKind::EtcdNotInstalled`] or [`ErrorKind::PrivateEtcd`].
    pub async fn start() -> Result<LocalEtcd, LaunchError> {
        let binary = etcd_binary()?;
        let mut last = String::new();
        // A port picked free can be taken by someone else before etcd binds it: try again.
        for _ in 0..3 {
            match Self::try_start(&binary).await {
                Ok(etcd) => return Ok(etcd),
                Err(e) => last = e,
            }
        }
        Err(ErrorKind::PrivateEtcd { reason: last }.into())
    }

    async fn try_start(binary: &Path) -> Result<LocalEtcd, String> {
        let dir = tempfile::Builder::new()
            .prefix("taskgraph-etcd-")
            .tempdir()
            .map_err(|e| format!("cannot create a folder for etcd: {e}"))?;
        let [client, peer] = free_ports()?;
        let endpoint = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = dir.path().join("etcd.log");
        let mut cmd = match setpriv() {
            // Dies with this process even if it is killed without cleaning up.
            Some(setpriv) => {
                let mut c = Command::new(setpriv);
                c.args(["--pdeathsig", "KILL", "--"]).arg(binary);
                c
            }
            None => Command::new(binary),
        };
        cmd.arg("--name=local")
            .arg(format!("--data-dir={}", dir.path().join("data").display()))
            .arg(format!("--listen-client-urls={endpoint}"))
            .arg(format!("--advertise-client-urls={endpoint}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=local={peer_url}"))
            .args(["--heartbeat-interval=10", "--election-timeout=100"])
            .args(["--logger=zap", &format!("--log-outputs={}", log.display())])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        let mut etcd = LocalEtcd {
            child,
            dir,
            endpoint,
        };
        let ready = taskgraph::JobClient::connect_with(
            std::slice::from_ref(&etcd.endpoint),
            "probe",
            Duration::from_secs(15),
        );
        tokio::select! {
            r = ready => match r {
                Ok(_) => Ok(etcd),
                Err(e) => Err(format!("the private etcd did not answer: {e}{}", etcd.log_tail())),
            },
            status = etcd.child.wait() => Err(format!(
                "the private etcd exited at start ({}){}",
                status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()),
                etcd.log_tail()
            )),
        }
    }

    /// The client URL (`http://127.0.0.1:<port>`).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The client URL as the endpoint list `Framework::builder().etcd(…)` and
    /// [`JobClient::connect`](taskgraph::JobClient::connect) take.
    pub fn endpoints(&self) -> Vec<String> {
        vec![self.endpoint.clone()]
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(10)..].join("\n");
        if tail.is_empty() {
            String::new()
        } else {
            format!("\n--- end of etcd's log ---\n{tail}")
        }
    }

    /// Stops etcd and removes its folder.
    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }
}

/// `$TASKGRAPH_ETCD_BIN`, else `etcd` on the `PATH`, else `/usr/bin/etcd`.
fn etcd_binary() -> Result<PathBuf, LaunchError> {
    if let Some(p) = std::env::var_os("TASKGRAPH_ETCD_BIN") {
        return Ok(PathBuf::from(p));
    }
    find_on_path("etcd").ok_or_else(|| ErrorKind::EtcdNotInstalled.into())
}

fn setpriv() -> Option<PathBuf> {
    find_on_path("setpriv")
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join(name)).collect())
        .unwrap_or_default();
    candidates.push(Path::new("/usr/bin").join(name));
    candidates.into_iter().find(|p| p.is_file())
}

/// Two distinct free loopback ports (held together while picked, then released for etcd).
fn free_ports() -> Result<[u16; 2], String> {
    let bind = || {
        std::net::TcpListener::bind(("127.0.0.1", 0))
            .and_then(|l| l.local_addr().map(|a| (l, a.port())))
            .map_err(|e| format!("cannot find a free port: {e}"))
    };
    let (_a, p1) = bind()?;
    let (_b, p2) = bind()?;
    Ok([p1, p2])
}
