//! The node side of a local run: what a node process launched by [`LocalJob`](crate::LocalJob)
//! uses.

/// The environment variable holding a launched node's index (`0`, `1`, …): set by
/// [`LocalJob`](crate::LocalJob) for every node process, so one binary can tell whether it runs
/// as the launcher or as one of its nodes (see [`launched_node`]).
pub const NODE_INDEX_ENV: &str = "TASKGRAPH_LOCAL_NODE";

/// This process's node index when a [`LocalJob`](crate::LocalJob) launched it, else `None`.
pub fn launched_node() -> Option<usize> {
    std::env::var(NODE_INDEX_ENV).ok()?.parse().ok()
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
