//! Errors of the framework, typed by what the caller should do.

use std::time::Duration;

use taskgraph_topology::TopologyError;

/// Invalid configuration, refused before anything is written to etcd. Fix the configuration;
/// retrying does not help.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A required setting was not given.
    #[error("missing setting: {0}")]
    Missing(&'static str),
    /// A setting is out of its range.
    #[error("invalid {setting}: {reason}")]
    Invalid {
        /// The setting.
        setting: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The links do not form a valid topology for this many tasks.
    #[error("invalid topology: {0}")]
    Topology(#[from] TopologyError),
}

/// A failed etcd operation, with the operation and key it concerned. Usually transient: the
/// framework retries where it makes sense; a caller may back off and retry.
#[derive(Debug, thiserror::Error)]
#[error("etcd {op} on {key:?} failed: {source}")]
pub struct EtcdError {
    /// What was attempted (`get`, `txn`, `watch`, `lease grant`, ...).
    pub op: &'static str,
    /// The key or prefix concerned.
    pub key: String,
    /// The client's error.
    #[source]
    pub source: EtcdCause,
}

/// Why an etcd operation failed.
#[derive(Debug, thiserror::Error)]
pub enum EtcdCause {
    /// The client reported an error.
    #[error(transparent)]
    Client(#[from] etcd_client::Error),
    /// No answer within the operation's deadline.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// Why a node could not start or had to stop. Each of these is final for the node.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// etcd could not be reached at start.
    #[error("etcd at {endpoints:?} is unreachable: {source}")]
    EtcdUnreachable {
        /// The endpoints tried.
        endpoints: Vec<String>,
        /// The last error.
        #[source]
        source: EtcdError,
    },
    /// etcd refused this process: wrong user or password, a role without access to the job's
    /// prefix, or a TLS failure (etcd's certificate not from the given CA, this process's
    /// client certificate refused or missing). Retrying does not help; fix the settings.
    #[error("etcd at {endpoints:?} refused this process: {reason}")]
    EtcdRefused {
        /// The endpoints tried.
        endpoints: Vec<String>,
        /// What was refused, and what to check.
        reason: String,
    },
    /// The job in etcd was created with a different spec; this node's configuration differs.
    #[error("job {job:?} already exists with a different spec: {difference}")]
    SpecConflict {
        /// The job.
        job: String,
        /// What differs, e.g. `tasks: etcd has 15, this node has 7`.
        difference: String,
    },
    /// A value under the job's keys could not be understood where the node cannot go on
    /// without it (e.g. the spec).
    #[error("garbage in etcd at {key:?}: {reason}")]
    Garbage {
        /// The key.
        key: String,
        /// What is wrong with its value.
        reason: String,
    },
    /// The node's watch of the job ended (its task is gone): the node cannot follow the job.
    #[error("the node's watch of the job ended")]
    WatchEnded,
    /// An etcd operation failed in a way the node could not recover from.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// The node's listener could not be set up.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The application's task failed in a way it declared fatal.
    #[error("task {task} failed: {reason}")]
    Task {
        /// The task.
        task: u32,
        /// Its reason.
        reason: String,
    },
}

/// Errors of the verbs a task calls on its [`Context`](crate::Context).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ContextError {
    /// This node does not (or no longer) act as the task's primary: do nothing, the new
    /// primary carries on.
    #[error("task {task} is not primary on this node (term {term})")]
    NotPrimary {
        /// The task.
        task: u32,
        /// The term the caller held.
        term: u64,
    },
    /// This node is the task's primary on paper, but its lease is past its local deadline
    /// (etcd unreachable, or the process was paused), so it must not act. The `Context` verbs
    /// do not return it: they wait for the lease's renewal or loss instead (see
    /// [`Context`](crate::Context#verbs-that-write-to-etcd-resolve-when-decided)). Kept for
    /// matches written against earlier versions.
    #[error(
        "task {task}: the node's lease is past its local deadline; not acting until it is renewed"
    )]
    Suspended {
        /// The task.
        task: u32,
    },
    /// The job has finished.
    #[error("the job has finished")]
    JobFinished,
    /// etcd did not answer: back off and retry, or let the new primary carry on.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// A value is larger than allowed.
    #[error("{what} is {size} bytes, more than the limit of {limit}")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The node is stopping.
    #[error("the node is stopping")]
    Stopping,
    /// No such task in the job.
    #[error("unknown task {task}: the job has {num_tasks} tasks")]
    UnknownTask {
        /// The task asked for.
        task: u32,
        /// Number of tasks.
        num_tasks: u32,
    },
    /// No such link in the application's topology.
    #[error("unknown link {link:?}")]
    UnknownLink {
        /// The link asked for.
        link: String,
    },
    /// A typed payload could not be encoded.
    #[error("payload codec: {0}")]
    Codec(String),
}
