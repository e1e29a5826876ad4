//! Loading a task's last checkpoint for a slot just taken (or a backup promoted before it got
//! its primary's state).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::warn;

use crate::data::Checkpoint;
use crate::etcd::keys::StoredCheckpoint;
use crate::etcd::lease::LeaseState;
use crate::etcd::Store;
use crate::health::Health;
use crate::TaskId;

/// Reads task `t`'s last checkpoint; garbage is logged and ignored.
pub(super) async fn load_checkpoint(
    store: Store,
    lease: watch::Receiver<LeaseState>,
    health: Arc<Health>,
    t: TaskId,
) -> Option<Checkpoint> {
    let key = store.keys().checkpoint(t);
    let mut delays = crate::retry::ETCD.delays();
    // While etcd does not answer, the loop waits here: `/healthz` says so instead of failing.
    let mut waiting = None;
    // Retry while the slot can still be this node's: starting without a checkpoint that
    // exists would lose the task's state.
    while !matches!(*lease.borrow(), LeaseState::Expired { .. }) {
        match store.get(&key).await {
            Ok(None) => return None,
            Ok(Some(kv)) => {
                return match StoredCheckpoint::decode(&kv.value) {
                    Ok(cp) => Some(Checkpoint {
                        epoch: cp.epoch,
                        data: cp.data.into(),
                    }),
                    Err(reason) => {
                        warn!(
                            key,
                            reason, "the task's checkpoint is garbage; starting without it"
                        );
                        None
                    }
                }
            }
            Err(e) => {
                waiting.get_or_insert_with(|| health.waiting_for_etcd());
                warn!(error = %e, key, "cannot read the task's checkpoint yet; retrying");
                tokio::time::sleep(delays.next().unwrap_or(Duration::from_millis(500))).await;
            }
        }
    }
    None
}
