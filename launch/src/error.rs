//! [`LaunchError`]: why a local run did not end with a finished job, and the exit code a
//! launcher's `main` should end with.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use taskgraph::Epoch;

/// Exit code for a run that failed: a node failed, the time limit passed, etcd failed, the
/// application's own check of the result failed. Also the code of bad input found at run time.
pub const EXIT_FAILED: u8 = 1;
/// Exit code for a job that stalled and did not heal within the stall limit
/// ([`ErrorKind::Stalled`]).
pub const EXIT_STALLED: u8 = 3;
/// Exit code for a job shut down before it stored its result ([`ErrorKind::ShutDown`]).
pub const EXIT_SHUT_DOWN: u8 = 4;

/// Why a run did not end with a finished job. Its `Display` is one line (plus where the node
/// logs were kept, when they were); [`exit_code`](LaunchError::exit_code) tells the class.
#[derive(Debug, thiserror::Error)]
#[error("{kind}{}", self.logs_line())]
pub struct LaunchError {
    #[source]
    kind: ErrorKind,
    node_logs: Option<PathBuf>,
}

/// What went wrong in a run (see [`LaunchError::kind`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ErrorKind {
    /// No etcd binary to start a private etcd with: install it, or give the endpoints of a
    /// running etcd.
    #[error(
        "etcd is not installed (Debian: `apt-get install etcd-server`, or run ci/setup); \
         or pass --etcd URL to use a running one"
    )]
    EtcdNotInstalled,
    /// The private etcd did not start (the reason ends with the tail of its log).
    #[error("{reason}")]
    PrivateEtcd {
        /// What failed.
        reason: String,
    },
    /// etcd refused or failed an operation, or a value in it is garbage.
    #[error(transparent)]
    Etcd(#[from] taskgraph::Error),
    /// A job of this name exists already: a local run creates its job. Choose another name
    /// (or remove the old job with `taskgraph gc`).
    #[error("job {job:?} {existing}")]
    JobExists {
        /// The job.
        job: String,
        /// What is there.
        existing: Existing,
    },
    /// A file or process operation of the launcher failed.
    #[error("{what}: {source}")]
    Io {
        /// What was tried, e.g. `cannot start a node (/path/to/program)`.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A variable the launcher sets for its nodes holds a value it could not have written
    /// (set by hand, or left over in the environment).
    #[error("{var}={value:?} is not what a launcher sets: {expected}")]
    BadEnv {
        /// The variable.
        var: &'static str,
        /// Its value (lossily decoded).
        value: String,
        /// What the launcher puts there.
        expected: &'static str,
    },
    /// The launcher's watch of the job ended.
    #[error("the watch of the job ended")]
    WatchEnded,
    /// The job's epoch stopped moving and did not move again within the stall limit.
    #[error(
        "job {job} stalled at epoch {epoch} for {:.1} s and did not heal: {cause}",
        stalled_for.as_secs_f64()
    )]
    Stalled {
        /// The job.
        job: String,
        /// The epoch it stalled at.
        epoch: Epoch,
        /// How long since the epoch last moved.
        stalled_for: Duration,
        /// The first cause the nodes name, with its task (`[task 3]`) or key (`[key …]`).
        cause: String,
    },
    /// A node process ended with a failure on its own (not killed by the chaos mode).
    #[error("node {index} failed ({status})\n--- end of {} ---\n{log_tail}", log.display())]
    NodeFailed {
        /// The node's index (`node<index>`).
        index: usize,
        /// How it ended.
        status: ExitStatus,
        /// Its log file.
        log: PathBuf,
        /// The last lines of its log.
        log_tail: String,
    },
    /// Waiting for a node process failed.
    #[error("lost track of node {index}: {source}")]
    NodeLost {
        /// The node's index.
        index: usize,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The job did not finish within the run's time limit.
    #[error("the job did not finish within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// The launcher got Ctrl-C.
    #[error("interrupted")]
    Interrupted,
    /// The job ended without a result although the run expects one
    /// ([`LocalJob::expect_result`](crate::LocalJob::expect_result)): an operator
    /// (`taskgraph shutdown`) or a task's `shutdown_job` ended it early.
    #[error(
        "job {job} was shut down at epoch {epoch} (by `taskgraph shutdown` or `shutdown_job`) \
         without a result"
    )]
    ShutDown {
        /// The job.
        job: String,
        /// Its final epoch.
        epoch: Epoch,
    },
}

/// What a run found under the job's name (see [`ErrorKind::JobExists`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Existing {
    /// A job with another spec; the sentence names each difference.
    #[error("already exists with a different spec: {0}")]
    DifferentSpec(String),
    /// The job already ran to its end.
    #[error("already ran (it finished at epoch {0}); choose another job name")]
    Finished(Epoch),
    /// The job is running.
    #[error("is already running (epoch {0}); choose another job name")]
    Running(Epoch),
    /// The job's spec is there but not its epoch.
    #[error("already exists; choose another job name")]
    Created,
}

impl LaunchError {
    /// The error, with where the node logs were kept (when they were).
    pub fn new(kind: ErrorKind, node_logs: Option<PathBuf>) -> LaunchError {
        LaunchError { kind, node_logs }
    }

    /// What went wrong.
    pub fn kind(&self) -> &ErrorKind {
        &self.kind
    }

    /// The folder where the nodes' logs were kept, if the run had launched nodes.
    pub fn node_logs(&self) -> Option<&Path> {
        self.node_logs.as_deref()
    }

    /// The process exit code for this error: [`EXIT_STALLED`] (3), [`EXIT_SHUT_DOWN`] (4),
    /// else [`EXIT_FAILED`] (1). (Code 2 is clap's, for bad flags.)
    pub fn exit_code(&self) -> u8 {
        self.kind.exit_code()
    }

    fn logs_line(&self) -> String {
        self.node_logs
            .as_ref()
            .map(|p| format!("\nnode logs: {}", p.display()))
            .unwrap_or_default()
    }
}

impl ErrorKind {
    /// The process exit code for this kind (see [`LaunchError::exit_code`]).
    pub fn exit_code(&self) -> u8 {
        match self {
            ErrorKind::Stalled { .. } => EXIT_STALLED,
            ErrorKind::ShutDown { .. } => EXIT_SHUT_DOWN,
            _ => EXIT_FAILED,
        }
    }
}

impl From<ErrorKind> for LaunchError {
    fn from(kind: ErrorKind) -> Self {
        LaunchError::new(kind, None)
    }
}

impl From<taskgraph::Error> for LaunchError {
    fn from(e: taskgraph::Error) -> Self {
        ErrorKind::Etcd(e).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_keep_their_classes() {
        let stalled = ErrorKind::Stalled {
            job: "j".into(),
            epoch: 4,
            stalled_for: Duration::from_millis(12_340),
            cause: "task 2 has no primary [task 2]".into(),
        };
        let e = LaunchError::new(stalled, Some("/tmp/logs".into()));
        assert_eq!(e.exit_code(), 3);
        assert_eq!(
            e.to_string(),
            "job j stalled at epoch 4 for 12.3 s and did not heal: task 2 has no primary \
             [task 2]\nnode logs: /tmp/logs"
        );
        let shut = LaunchError::from(ErrorKind::ShutDown {
            job: "j".into(),
            epoch: 9,
        });
        assert_eq!(shut.exit_code(), 4);
        assert_eq!(LaunchError::from(ErrorKind::Interrupted).exit_code(), 1);
        assert_eq!(
            LaunchError::from(ErrorKind::Timeout(Duration::from_secs(600))).to_string(),
            "the job did not finish within 10m"
        );
    }
}
