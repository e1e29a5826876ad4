//! A node's configuration, its validation, and the job spec stored in etcd.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use taskgraph_topology::Links;

use crate::error::ConfigError;
use crate::security::{EtcdAuth, EtcdSecurity, EtcdTls, LoadedTls, PeerTls};

/// The largest number of tasks a job may have.
pub const MAX_TASKS: u32 = 1 << 20;
/// The largest number of replicas (primary plus backups) per task.
pub const MAX_REPLICAS: u32 = 16;

/// Everything a node needs to join a job. Build it with [`FrameworkBuilder`](crate::FrameworkBuilder).
#[derive(Debug, Clone)]
pub struct Config {
    /// etcd endpoints, e.g. `http://127.0.0.1:2379`.
    pub etcd_endpoints: Vec<String>,
    /// The job's name: 1 to 63 characters of `a-z`, `0-9`, `-`, `_`, `.`.
    pub job: String,
    /// Number of tasks, `1..=MAX_TASKS`.
    pub tasks: u32,
    /// Nodes per task: 1 primary plus `replicas - 1` hot-standby backups.
    pub replicas: u32,
    /// The application's links.
    pub links: Links,
    /// The node's lease TTL in etcd: whole seconds, at least 1. A primary that cannot renew
    /// its lease steps down before this runs out; a crashed primary is replaced within it.
    pub lease_ttl: Duration,
    /// After how long without a move of the epoch a node reports a stall (`None`: derived
    /// from the lease TTL and the slowest epoch seen; see
    /// [`FrameworkBuilder::stall_after`](crate::FrameworkBuilder::stall_after)).
    pub stall_after: Option<Duration>,
    /// Where the node's gRPC server listens.
    pub listen: SocketAddr,
    /// The `host:port` other nodes use to reach this one; defaults to `listen`.
    pub advertise: Option<String>,
    /// Where the node serves its Prometheus metrics, `/healthz` and `/readyz` over HTTP
    /// (see [`crate::metrics`]); `None` for no HTTP server.
    pub metrics_addr: Option<SocketAddr>,
    /// Deadline for one etcd request.
    pub etcd_request_timeout: Duration,
    /// How long to try to reach etcd at start before giving up.
    pub etcd_connect_timeout: Duration,
    /// Largest checkpoint a task may store in etcd.
    pub max_checkpoint_bytes: usize,
    /// Largest gRPC frame a node sends or accepts.
    pub max_frame_bytes: usize,
    /// The application's own job parameters (e.g. a seed, a learning rate): stored with the
    /// spec, so every node of a job must be started with the same ones.
    pub params: BTreeMap<String, String>,
    /// TLS to etcd (`https://` endpoints); `None` for plain text.
    pub etcd_tls: Option<EtcdTls>,
    /// The etcd user and password; `None` for etcd without authentication.
    pub etcd_auth: Option<EtcdAuth>,
    /// Mutual TLS between the job's nodes; `None` for plain text (local development only).
    pub peer_tls: Option<PeerTls>,
}

impl Config {
    /// The address other nodes reach this one at.
    pub fn advertise_addr(&self) -> String {
        self.advertise
            .clone()
            .unwrap_or_else(|| self.listen.to_string())
    }

    /// The lease TTL in etcd's whole seconds.
    pub fn lease_ttl_secs(&self) -> i64 {
        self.lease_ttl.as_secs() as i64
    }

    /// The etcd TLS files, read, and the etcd user.
    pub fn etcd_security(&self) -> Result<EtcdSecurity, ConfigError> {
        EtcdSecurity::load(
            &self.etcd_endpoints,
            self.etcd_tls.as_ref(),
            self.etcd_auth.as_ref(),
        )
    }

    /// The node-to-node TLS files, read; `None` for plain text.
    pub fn peer_tls_loaded(&self) -> Result<Option<LoadedTls>, ConfigError> {
        self.peer_tls.as_ref().map(PeerTls::load).transpose()
    }

    /// Checks every setting (and reads the TLS files); nothing is written to etcd before this
    /// passes.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.etcd_endpoints.is_empty() {
            return Err(ConfigError::Missing("etcd endpoints"));
        }
        for e in &self.etcd_endpoints {
            if e.trim().is_empty() || e.contains(char::is_whitespace) {
                return Err(ConfigError::Invalid {
                    setting: "etcd endpoint",
                    reason: format!("{e:?} is not an address"),
                });
            }
        }
        validate_job_name(&self.job)?;
        if self.tasks == 0 || self.tasks > MAX_TASKS {
            return Err(ConfigError::Invalid {
                setting: "tasks",
                reason: format!("must be between 1 and {MAX_TASKS}, got {}", self.tasks),
            });
        }
        if self.replicas == 0 || self.replicas > MAX_REPLICAS {
            return Err(ConfigError::Invalid {
                setting: "replicas",
                reason: format!(
                    "must be between 1 (no backups) and {MAX_REPLICAS}, got {}",
                    self.replicas
                ),
            });
        }
        if self.lease_ttl < Duration::from_secs(1) || self.lease_ttl.subsec_nanos() != 0 {
            return Err(ConfigError::Invalid {
                setting: "lease TTL",
                reason: format!(
                    "must be a whole number of seconds, at least 1; got {:?}",
                    self.lease_ttl
                ),
            });
        }
        if self.stall_after.is_some_and(|d| d < Duration::from_secs(1)) {
            return Err(ConfigError::Invalid {
                setting: "stall time",
                reason: format!("at least one second; got {:?}", self.stall_after),
            });
        }
        if self.lease_ttl > Duration::from_secs(3600) {
            return Err(ConfigError::Invalid {
                setting: "lease TTL",
                reason: format!("at most one hour; got {:?}", self.lease_ttl),
            });
        }
        if let Some(a) = &self.advertise {
            if a.is_empty() || !a.contains(':') || a.contains(char::is_whitespace) {
                return Err(ConfigError::Invalid {
                    setting: "advertise address",
                    reason: format!("expected host:port, got {a:?}"),
                });
            }
        }
        if let Some(m) = self.metrics_addr {
            let same_port = m.port() != 0 && m.port() == self.listen.port();
            let overlap = m.ip() == self.listen.ip()
                || m.ip().is_unspecified()
                || self.listen.ip().is_unspecified();
            if same_port && overlap {
                return Err(ConfigError::Invalid {
                    setting: "metrics address",
                    reason: format!(
                        "{m} would share its port with the gRPC listen address {}",
                        self.listen
                    ),
                });
            }
        }
        if self.etcd_request_timeout.is_zero() || self.etcd_connect_timeout.is_zero() {
            return Err(ConfigError::Invalid {
                setting: "etcd timeouts",
                reason: "must be positive".into(),
            });
        }
        // etcd refuses requests over 1.5 MiB by default (`--max-request-bytes`).
        if self.max_checkpoint_bytes == 0 || self.max_checkpoint_bytes > 1_400_000 {
            return Err(ConfigError::Invalid {
                setting: "max checkpoint bytes",
                reason: format!(
                    "1 to 1400000 (etcd refuses requests over 1.5 MiB by default); got {}",
                    self.max_checkpoint_bytes
                ),
            });
        }
        if self.max_frame_bytes < 4096 || self.max_frame_bytes > (1 << 31) {
            return Err(ConfigError::Invalid {
                setting: "max frame bytes",
                reason: format!("4 KiB to 2 GiB; got {}", self.max_frame_bytes),
            });
        }
        for (k, v) in &self.params {
            let ok = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
            if k.is_empty() || k.len() > 63 || !k.chars().all(ok) || v.len() > 4096 {
                return Err(ConfigError::Invalid {
                    setting: "job parameter",
                    reason: format!(
                        "{k:?}: names are 1 to 63 characters of A-Z, a-z, 0-9, '-', '_', '.', values at most 4096 bytes"
                    ),
                });
            }
        }
        self.links.validate(self.tasks)?;
        self.etcd_security()?;
        self.peer_tls_loaded()?;
        Ok(())
    }

    /// The spec this node expects the job to have.
    pub fn spec(&self) -> JobSpec {
        JobSpec {
            version: JobSpec::VERSION,
            tasks: self.tasks,
            replicas: self.replicas,
            links: self.links.describe(),
            params: self.params.clone(),
            created_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_millis() as u64),
        }
    }
}

/// Checks a job name: 1 to 63 characters of `a-z`, `0-9`, `-`, `_`, `.`, starting with a
/// letter or digit.
pub fn validate_job_name(job: &str) -> Result<(), ConfigError> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c);
    let first_ok = job
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    if job.is_empty() || job.len() > 63 || !job.chars().all(ok_char) || !first_ok {
        return Err(ConfigError::Invalid {
            setting: "job name",
            reason: format!(
                "{job:?}: use 1 to 63 characters of a-z, 0-9, '-', '_', '.', starting with a letter or digit"
            ),
        });
    }
    Ok(())
}

/// What every node of a job must agree on; stored once under the job's `spec` key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    /// Format version of this record.
    pub version: u32,
    /// Number of tasks.
    pub tasks: u32,
    /// Nodes per task.
    pub replicas: u32,
    /// Each link's description, plus `pair:<a>` → `<b>` entries.
    pub links: BTreeMap<String, String>,
    /// The application's job parameters (see [`FrameworkBuilder::param`](crate::FrameworkBuilder::param)).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<String, String>,
    /// When the job was created (milliseconds since the UNIX epoch, by the clock of the node
    /// that created it). Informative only: not compared between nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_ms: Option<u64>,
}

impl JobSpec {
    /// The current format version. Version 2 moved checkpoints from `tasks/<t>/checkpoint` to
    /// `checkpoints/<t>` (out of what every node watches); nodes of version 1 and 2 cannot run
    /// one job together, and refuse each other's spec.
    pub const VERSION: u32 = 2;

    /// Decodes a stored spec.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let spec: JobSpec = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if spec.version == 1 {
            return Err(
                "spec version 1: the job was created by an older taskgraph (checkpoints \
                        under tasks/<t>/checkpoint); run every node and tool of a job with the \
                        same taskgraph version"
                    .to_owned(),
            );
        }
        if spec.version != Self::VERSION {
            return Err(format!("unsupported spec version {}", spec.version));
        }
        if spec.tasks == 0
            || spec.tasks > MAX_TASKS
            || spec.replicas == 0
            || spec.replicas > MAX_REPLICAS
        {
            return Err(format!(
                "out-of-range tasks {} or replicas {}",
                spec.tasks, spec.replicas
            ));
        }
        Ok(spec)
    }

    /// Encodes the spec for etcd.
    pub fn encode(&self) -> String {
        // A struct of integers and string maps always serializes.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// `None` when equal, else a sentence naming every difference (`stored` is etcd's).
    pub fn difference(stored: &JobSpec, mine: &JobSpec) -> Option<String> {
        let mut diffs = Vec::new();
        if stored.tasks != mine.tasks {
            diffs.push(format!(
                "tasks: etcd has {}, this node has {}",
                stored.tasks, mine.tasks
            ));
        }
        if stored.replicas != mine.replicas {
            diffs.push(format!(
                "replicas: etcd has {}, this node has {}",
                stored.replicas, mine.replicas
            ));
        }
        let keys: std::collections::BTreeSet<&String> =
            stored.links.keys().chain(mine.links.keys()).collect();
        for k in keys {
            match (stored.links.get(k), mine.links.get(k)) {
                (Some(a), Some(b)) if a == b => {}
                (a, b) => diffs.push(format!(
                    "link {k}: etcd has {}, this node has {}",
                    a.map_or("nothing".to_owned(), |s| format!("{s:?}")),
                    b.map_or("nothing".to_owned(), |s| format!("{s:?}"))
                )),
            }
        }
        let keys: std::collections::BTreeSet<&String> =
            stored.params.keys().chain(mine.params.keys()).collect();
        for k in keys {
            match (stored.params.get(k), mine.params.get(k)) {
                (Some(a), Some(b)) if a == b => {}
                (a, b) => diffs.push(format!(
                    "parameter {k}: etcd has {}, this node has {}",
                    a.map_or("nothing".to_owned(), |s| format!("{s:?}")),
                    b.map_or("nothing".to_owned(), |s| format!("{s:?}"))
                )),
            }
        }
        (!diffs.is_empty()).then(|| diffs.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use taskgraph_topology::Tree;

    fn spec(tasks: u32, replicas: u32) -> JobSpec {
        let tree = Tree::new(tasks, 2).unwrap_or_else(|e| panic!("{e}"));
        JobSpec {
            version: JobSpec::VERSION,
            tasks,
            replicas,
            links: Links::new().link("parents", tree.parents()).describe(),
            params: BTreeMap::new(),
            created_ms: None,
        }
    }

    #[test]
    fn spec_difference_names_each_field() {
        assert_eq!(JobSpec::difference(&spec(3, 2), &spec(3, 2)), None);
        let d = JobSpec::difference(&spec(3, 2), &spec(7, 1)).unwrap_or_default();
        assert!(d.contains("tasks: etcd has 3, this node has 7"), "{d}");
        assert!(d.contains("replicas: etcd has 2, this node has 1"), "{d}");
        assert!(d.contains("link parents"), "{d}");
        let mut later = spec(3, 2);
        later.created_ms = Some(1);
        assert_eq!(JobSpec::difference(&spec(3, 2), &later), None);
        let mut seeded = spec(3, 2);
        seeded.params.insert("seed".into(), "7".into());
        let d = JobSpec::difference(&spec(3, 2), &seeded).unwrap_or_default();
        assert_eq!(d, "parameter seed: etcd has nothing, this node has \"7\"");
    }

    #[test]
    fn spec_decode_rejects_garbage() {
        assert!(JobSpec::decode(b"not json").is_err());
        assert!(JobSpec::decode(br#"{"version":1,"tasks":0,"replicas":1,"links":{}}"#).is_err());
        assert!(JobSpec::decode(br#"{"version":9,"tasks":1,"replicas":1,"links":{}}"#).is_err());
        let old = JobSpec::decode(br#"{"version":1,"tasks":1,"replicas":1,"links":{}}"#);
        assert!(old.is_err_and(|e| e.contains("older taskgraph")));
        let s = spec(3, 2);
        assert_eq!(JobSpec::decode(s.encode().as_bytes()), Ok(s.clone()));
        // Specs stored before parameters existed still decode.
        assert!(!s.encode().contains("params"));
        let mut p = spec(3, 2);
        p.params.insert("lr".into(), "0.5".into());
        assert_eq!(JobSpec::decode(p.encode().as_bytes()), Ok(p));
    }

    #[test]
    fn job_names() {
        for ok in ["a", "job-1", "x.y_z", "0abc"] {
            assert!(validate_job_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "A", "-x", "a/b", "a b", &"x".repeat(64)] {
            assert!(validate_job_name(bad).is_err(), "{bad}");
        }
    }
}
