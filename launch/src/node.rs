//! The node side of a local run: what a node process launched by [`LocalJob`](crate::LocalJob)
//! uses.

/// The environment variable holding a launched node's index (`0`, `1`, …): set by
/// [`LocalJob`](crate::LocalJob) for every node process, so one binary can tell whether it runs
/// as the launcher or as one of its nodes (see [`launched_node`]).
pub const NODE_INDEX_ENV: &str = "TASKGRAPH_LOCAL_NODE";

use crate::{ErrorKind, LaunchError};

/// This process's node index when a [`LocalJob`](crate::LocalJob) launched it, `None` when
/// [`NODE_INDEX_ENV`] is not set (the process is the launcher).
///
/// # Errors
/// [`ErrorKind::BadEnv`](crate::ErrorKind::BadEnv) when the variable is set to anything but a
/// node index: a process must not guess whether it is a node.
pub fn launched_node() -> Result<Option<usize>, LaunchError> {
    node_index(std::env::var_os(NODE_INDEX_ENV))
}

/// Reads a value of [`NODE_INDEX_ENV`] (see [`launched_node`]).
fn node_index(value: Option<std::ffi::OsString>) -> Result<Option<usize>, LaunchError> {
    let Some(value) = value else {
        return Ok(None);
    };
    match value.to_str().map(str::parse::<usize>) {
        Some(Ok(index)) => Ok(Some(index)),
        _ => Err(ErrorKind::BadEnv {
            var: NODE_INDEX_ENV,
            value: value.to_string_lossy().into_owned(),
            expected: "a node index (0, 1, …)",
        }
        .into()),
    }
}

/// Resolves when standard input closes (or fails): the launcher closes a node's standard
/// input to stop it, and its end closes it too, so a node that stops on this never outlives
/// its launcher. Pass it (or a `select!` of it and the usual signals) to
/// `NodeHandle::stop_on`.
pub async fn stdin_closed() {
    use tokio::io::AsyncReadExt;
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 64];
    while let Ok(n) = stdin.read(&mut buf).await {
        if n == 0 {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_index_variable_is_an_index_absent_or_an_error() {
        assert_eq!(node_index(None).ok(), Some(None), "unset: the launcher");
        assert_eq!(node_index(Some("3".into())).ok(), Some(Some(3)));
        for bad in ["", "x", "-1", " 2", "1.5"] {
            let e = node_index(Some(bad.into())).err().map(|e| e.to_string());
            let text = e.unwrap_or_default();
            assert!(
                text.contains("TASKGRAPH_LOCAL_NODE") && text.contains("node index"),
                "{bad:?}: {text}"
            );
        }
    }
}
