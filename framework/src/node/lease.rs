//! The lease's executors: the status steps down at the local deadline even while the loop is
//! busy, and background work the node owns is aborted when its owner drops.

use tokio::sync::watch;

use crate::etcd::lease::LeaseState;
use crate::role::NodeStatus;

/// Publishes `acting: false` as soon as the lease passes its local deadline, also while the
/// event loop is busy with one event (e.g. awaiting etcd across a partition): the loop only
/// publishes between events, so without this the status would claim the node acts past its
/// deadline, while another node may already have taken its slot. (What the node *does* is
/// gated on the lease by the loop itself; this keeps what it *shows* as strict.)
pub(super) async fn step_down_at_deadline(
    mut lease: watch::Receiver<LeaseState>,
    status: watch::Sender<NodeStatus>,
) {
    loop {
        let deadline = match *lease.borrow_and_update() {
            LeaseState::Alive { deadline, .. } => Some(deadline),
            LeaseState::Suspended { .. } | LeaseState::Expired { .. } => None,
        };
        if let Some(deadline) = deadline {
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => {}
                changed = lease.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    continue;
                }
            }
        }
        if !lease.borrow().valid_now() {
            status.send_if_modified(|s| std::mem::replace(&mut s.acting, false));
        }
        if lease.changed().await.is_err() {
            return;
        }
    }
}

/// Background work owned by a value of the node: aborted when it is dropped, also when the
/// node's future is dropped without returning (a crash), so nothing outlives the node.
#[derive(Debug)]
pub(super) struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl AbortOnDrop {
    pub(super) fn spawn(work: impl std::future::Future<Output = ()> + Send + 'static) -> Self {
        AbortOnDrop(tokio::spawn(work))
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
