//! The node's lease, kept alive in the background.
//!
//! etcd expires a lease `ttl` after the last keep-alive it *received*. The keeper records when
//! it *sent* each keep-alive; `sent + ttl` is therefore never later than etcd's expiry. The
//! node's **local deadline** is `sent + ttl - margin`: a node acts in its slot only while
//! `now < deadline`, so it stops acting as primary before etcd can expire its lease and let
//! another node take over.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::Store;
use crate::metrics::{LeaseLoss, Outcome};

/// The lease as the node knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// Renewed recently: the node may act in its slot until `deadline`.
    Alive {
        /// The lease id.
        id: i64,
        /// The local deadline.
        deadline: Instant,
    },
    /// The local deadline passed without a renewal; etcd may or may not have expired the
    /// lease yet. The node must not act in its slot; if a later renewal succeeds (etcd came
    /// back in time), the lease is `Alive` again.
    Suspended {
        /// The lease id.
        id: i64,
    },
    /// etcd says the lease is gone: every key attached to it has vanished.
    Expired {
        /// The lease id.
        id: i64,
    },
}

impl LeaseState {
    /// Whether the node may act in its slot right now.
    pub fn valid_now(&self) -> bool {
        matches!(self, LeaseState::Alive { deadline, .. } if Instant::now() < *deadline)
    }
    /// The lease id.
    pub fn id(&self) -> i64 {
        match *self {
            LeaseState::Alive { id, .. }
            | LeaseState::Suspended { id }
            | LeaseState::Expired { id } => id,
        }
    }
}

/// The message of the error etcd-client returns when opening a keep-alive stream for a lease
/// etcd no longer knows (`LeaseKeepAliveError`).
const LEASE_NOT_FOUND: &str = "lease not found";

/// The local safety margin for a TTL: a fifth of it, at least 100 ms.
pub fn margin(ttl: Duration) -> Duration {
    (ttl / 5).max(Duration::from_millis(100)).min(ttl / 2)
}

/// Keeps lease `id` alive every `ttl / 3` until etcd reports it gone. Publishes every change
/// on `tx`. Returns when the lease has expired (or all receivers are gone).
pub(crate) async fn keep_alive(
    store: Store,
    id: i64,
    ttl: Duration,
    granted_at: Instant,
    tx: watch::Sender<LeaseState>,
) {
    let margin = margin(ttl);
    let interval = ttl / 3;
    let mut deadline = granted_at + ttl - margin;
    let _ = tx.send(LeaseState::Alive { id, deadline });
    let mut stream: Option<(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream)> = None;
    loop {
        let sent = Instant::now();
        let attempt = async {
            if stream.is_none() {
                let mut c = store.client();
                match c.lease_keep_alive(id).await {
                    Ok(s) => stream = Some(s),
                    // Opening the stream sends a first keep-alive; etcd-client turns an answer
                    // of TTL 0 (etcd no longer knows the lease) into this error. It is the
                    // lease's expiry, not a transient failure: a node that lost its
                    // connection for longer than the TTL (a partition) must learn it, or it
                    // would retry forever and never rejoin.
                    Err(etcd_client::Error::LeaseKeepAliveError(m)) if m == LEASE_NOT_FOUND => {
                        return Ok(0)
                    }
                    Err(e) => return Err(e),
                }
            }
            let Some((keeper, responses)) = stream.as_mut() else {
                return Err(etcd_client::Error::LeaseKeepAliveError("no stream".into()));
            };
            keeper.keep_alive().await?;
            match responses.message().await? {
                Some(r) => Ok(r.ttl()),
                None => Err(etcd_client::Error::LeaseKeepAliveError(
                    "stream ended".into(),
                )),
            }
        };
        // Never wait for an answer past the deadline: a silent etcd must not keep us Alive.
        let wait = deadline
            .saturating_duration_since(sent)
            .max(interval)
            .min(ttl);
        let outcome = tokio::time::timeout(wait, attempt).await;
        store.record(
            "lease keep-alive",
            match &outcome {
                Ok(Ok(_)) => Outcome::Ok,
                Ok(Err(_)) => Outcome::Error,
                Err(_) => Outcome::Timeout,
            },
            sent,
        );
        match outcome {
            Ok(Ok(granted)) if granted > 0 => {
                if let Some(m) = store.metrics() {
                    m.lease_renewed();
                }
                deadline = sent + Duration::from_secs(granted as u64) - margin;
                tx.send_if_modified(|s| {
                    let new = LeaseState::Alive { id, deadline };
                    let changed = *s != new;
                    *s = new;
                    changed
                });
            }
            Ok(Ok(_)) => {
                tracing::warn!(lease = format!("{id:x}"), "etcd reports the lease expired");
                if let Some(m) = store.metrics() {
                    m.lease_lost(LeaseLoss::Expired);
                }
                let _ = tx.send(LeaseState::Expired { id });
                return;
            }
            Ok(Err(e)) => {
                tracing::debug!(lease = format!("{id:x}"), error = %e, "lease keep-alive failed");
                stream = None;
            }
            Err(_) => {
                tracing::debug!(lease = format!("{id:x}"), "lease keep-alive timed out");
                stream = None;
            }
        }
        if Instant::now() >= deadline {
            let suspended = tx.send_if_modified(|s| {
                let changed = matches!(s, LeaseState::Alive { .. });
                if changed {
                    tracing::warn!(
                        lease = format!("{id:x}"),
                        "lease not renewed before its local deadline: stepping down"
                    );
                    *s = LeaseState::Suspended { id };
                }
                changed
            });
            if suspended {
                if let Some(m) = store.metrics() {
                    m.lease_lost(LeaseLoss::Suspended);
                }
            }
        }
        if tx.is_closed() {
            return;
        }
        let next = sent + interval;
        if tx.is_closed() {
            return;
        }
        let alive = matches!(*tx.borrow(), LeaseState::Alive { .. });
        if alive {
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
        } else {
            tokio::time::sleep_until(next.max(Instant::now() + Duration::from_millis(50))).await;
        }
    }
}
