//! The node's lease, kept alive in the background.
//!
//! etcd expires a lease `ttl` after the last keep-alive it *received*. The keeper records when
//! it *sent* each keep-alive; `sent + ttl` is therefore never later than etcd's expiry. The
//! node's **local deadline** is `sent + ttl - margin`: a node acts in its slot only while
//! `now < deadline`, so it stops acting as primary before etcd can expire its lease and let
//! another node take over.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::Store;
use crate::metrics::{LeaseLoss, Outcome};

/// An etcd lease id (`LeaseId::NONE`, 0, for a key without a lease).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct LeaseId(pub i64);

impl LeaseId {
    /// No lease.
    pub const NONE: LeaseId = LeaseId(0);
    /// Whether this is no lease.
    pub fn is_none(self) -> bool {
        self.0 == 0
    }
}

impl From<i64> for LeaseId {
    fn from(id: i64) -> LeaseId {
        LeaseId(id)
    }
}

impl std::fmt::LowerHex for LeaseId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::LowerHex::fmt(&self.0, f)
    }
}

impl std::fmt::Display for LeaseId {
    /// Hexadecimal, as `etcdctl` shows lease ids.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// The lease as the node knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// Renewed recently: the node may act in its slot until `deadline`.
    Alive {
        /// The lease id.
        id: LeaseId,
        /// The local deadline.
        deadline: Instant,
    },
    /// The local deadline passed without a renewal; etcd may or may not have expired the
    /// lease yet. The node must not act in its slot; if a later renewal succeeds (etcd came
    /// back in time), the lease is `Alive` again.
    Suspended {
        /// The lease id.
        id: LeaseId,
    },
    /// etcd says the lease is gone: every key attached to it has vanished.
    Expired {
        /// The lease id.
        id: LeaseId,
    },
}

impl LeaseState {
    /// Whether the node may act in its slot right now.
    pub fn valid_now(&self) -> bool {
        matches!(self, LeaseState::Alive { deadline, .. } if Instant::now() < *deadline)
    }
    /// The lease id.
    pub fn id(&self) -> LeaseId {
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

/// Keep-alives sent on one stream and not answered yet, at most: etcd answers a stream's
/// keep-alives one by one, in order, so more would only queue behind a slow one.
pub const MAX_IN_FLIGHT: usize = 4;

/// One keep-alive stream and the send times of its keep-alives not answered yet, oldest
/// first (etcd answers them in order).
struct KeepAliveStream {
    keeper: etcd_client::LeaseKeeper,
    answers: etcd_client::LeaseKeepAliveStream,
    in_flight: VecDeque<Instant>,
}

/// What happened on the stream while the keeper waited.
enum Answer {
    /// etcd renewed the lease for this many seconds (0: it no longer knows the lease).
    Renewed { sent: Instant, ttl: i64 },
    /// An answer with no keep-alive in flight: nothing to date it by, ignored.
    Unexpected,
    /// The stream broke (an error, or etcd ended it).
    Broken(etcd_client::Error),
}

/// The next event of `stream`; never resolves while there is no stream.
async fn next_answer(stream: &mut Option<KeepAliveStream>) -> Answer {
    let Some(s) = stream.as_mut() else {
        return std::future::pending().await;
    };
    match s.answers.message().await {
        Ok(Some(r)) => match s.in_flight.pop_front() {
            Some(sent) => Answer::Renewed { sent, ttl: r.ttl() },
            None => Answer::Unexpected,
        },
        Ok(None) => Answer::Broken(etcd_client::Error::LeaseKeepAliveError(
            "stream ended".into(),
        )),
        Err(e) => Answer::Broken(e),
    }
}

/// Keeps lease `id` alive every `ttl / 3` until etcd reports it gone. Publishes every change
/// on `tx`. Returns when the lease has expired (or all receivers are gone).
///
/// The grant, at `granted_at`, counts as the first renewal: the first keep-alive goes out one
/// interval later, and the keep-alive that opens a stream is that interval's renewal.
///
/// One keep-alive stream serves the lease for as long as it works: an answer that is slow (etcd
/// busy, or paused) is waited for on the same stream while the next keep-alives go out on it
/// (at most [`MAX_IN_FLIGHT`] unanswered), and each answer renews the lease from the time
/// *its* keep-alive was sent. Only a broken stream (an error, or its end) is replaced, at the
/// next keep-alive's time: reopening on every slow answer would multiply the streams, and the
/// load on etcd, exactly when etcd is slow.
pub(crate) async fn keep_alive(
    store: Store,
    id: LeaseId,
    ttl: Duration,
    granted_at: Instant,
    tx: watch::Sender<LeaseState>,
) {
    let margin = margin(ttl);
    let interval = ttl / 3;
    let mut deadline = granted_at + ttl - margin;
    let _ = tx.send(LeaseState::Alive { id, deadline });
    let mut stream: Option<KeepAliveStream> = None;
    // The grant set etcd's expiry as a keep-alive would: the first keep-alive is due one
    // interval later, not at once (2,048 nodes joining together would each send one for
    // nothing).
    let mut next = granted_at + interval;
    loop {
        let wake = if matches!(*tx.borrow(), LeaseState::Alive { .. }) {
            next
        } else {
            next.max(Instant::now() + Duration::from_millis(50))
        };
        // Answers until the next keep-alive is due; the deadline is checked as it passes (and
        // when the next keep-alive is due, so a lapse is never published late).
        loop {
            let mut due = false;
            let alive = matches!(*tx.borrow(), LeaseState::Alive { .. });
            tokio::select! {
                answer = next_answer(&mut stream) => match answer {
                    Answer::Renewed { sent, ttl: granted } if granted > 0 => {
                        store.record("lease keep-alive", Outcome::Ok, sent);
                        deadline = sent + Duration::from_secs(granted as u64) - margin;
                        renewed(&store, id, deadline, &tx);
                    }
                    Answer::Renewed { sent, .. } => {
                        store.record("lease keep-alive", Outcome::Ok, sent);
                        expired(&store, id, &tx);
                        return;
                    }
                    Answer::Unexpected => {
                        tracing::debug!(lease = format!("{id:x}"), "keep-alive answer with none in flight: ignored");
                    }
                    Answer::Broken(e) => {
                        let oldest = stream
                            .as_ref()
                            .and_then(|s| s.in_flight.front().copied())
                            .unwrap_or_else(Instant::now);
                        store.record("lease keep-alive", Outcome::Error, oldest);
                        tracing::debug!(lease = format!("{id:x}"), error = %e, "lease keep-alive stream broken");
                        stream = None;
                    }
                },
                _ = tokio::time::sleep_until(deadline), if alive => {}
                _ = tokio::time::sleep_until(wake) => due = true,
                _ = tx.closed() => return,
            }
            if Instant::now() >= deadline {
                let oldest = stream.as_ref().and_then(|s| s.in_flight.front().copied());
                suspend(&store, id, &tx, oldest);
            }
            if due {
                break;
            }
        }
        if tx.is_closed() {
            return;
        }
        let sent = Instant::now();
        next = sent + interval;
        if stream.is_none() {
            // Opening the stream sends a keep-alive and waits for its answer: that is this
            // interval's keep-alive. Never wait past the deadline: a silent etcd must not keep
            // us Alive.
            let wait = deadline
                .saturating_duration_since(sent)
                .max(interval)
                .min(ttl);
            let mut c = store.client();
            match tokio::time::timeout(wait, c.lease_keep_alive(id.0)).await {
                Ok(Ok((keeper, answers))) => {
                    stream = Some(KeepAliveStream {
                        keeper,
                        answers,
                        in_flight: VecDeque::new(),
                    });
                    // etcd answered with a TTL above 0 (etcd-client checks it): it renewed the
                    // lease for its granted TTL, `ttl`, at or after `sent`.
                    store.record("lease keep-alive", Outcome::Ok, sent);
                    deadline = sent + ttl - margin;
                    renewed(&store, id, deadline, &tx);
                    continue;
                }
                // etcd-client turns an answer of TTL 0 (etcd no longer knows the lease) into
                // this error. It is the lease's expiry, not a transient failure: a node that
                // lost its connection for longer than the TTL (a partition) must learn it, or
                // it would retry forever and never rejoin.
                Ok(Err(etcd_client::Error::LeaseKeepAliveError(m))) if m == LEASE_NOT_FOUND => {
                    store.record("lease keep-alive", Outcome::Ok, sent);
                    expired(&store, id, &tx);
                    return;
                }
                Ok(Err(e)) => {
                    store.record("lease keep-alive", Outcome::Error, sent);
                    tracing::debug!(lease = format!("{id:x}"), error = %e, "lease keep-alive stream not opened");
                    // Failed at once (a member down): try again sooner than a renewal is due,
                    // perhaps on another member.
                    next = sent + interval / 2;
                }
                Err(_) => {
                    store.record("lease keep-alive", Outcome::Timeout, sent);
                    tracing::debug!(
                        lease = format!("{id:x}"),
                        "lease keep-alive stream not opened in time"
                    );
                }
            }
        }
        if let Some(s) = stream.as_mut() {
            if s.in_flight.len() < MAX_IN_FLIGHT {
                // A send into the stream's channel (capacity 100, never full: at most
                // MAX_IN_FLIGHT are unanswered); it fails only if the stream is gone.
                match s.keeper.keep_alive().await {
                    Ok(()) => s.in_flight.push_back(sent),
                    Err(e) => {
                        store.record("lease keep-alive", Outcome::Error, sent);
                        tracing::debug!(lease = format!("{id:x}"), error = %e, "lease keep-alive stream broken");
                        stream = None;
                    }
                }
            } else {
                tracing::debug!(
                    lease = format!("{id:x}"),
                    in_flight = s.in_flight.len(),
                    "etcd is slow to answer keep-alives: waiting on the same stream"
                );
            }
        }
    }
}

/// etcd renewed the lease: the node may act in its slot until `deadline`.
fn renewed(store: &Store, id: LeaseId, deadline: Instant, tx: &watch::Sender<LeaseState>) {
    if let Some(m) = store.metrics() {
        m.lease_renewed();
    }
    tx.send_if_modified(|s| {
        let new = LeaseState::Alive { id, deadline };
        let changed = *s != new;
        *s = new;
        changed
    });
}

/// etcd reports the lease gone.
fn expired(store: &Store, id: LeaseId, tx: &watch::Sender<LeaseState>) {
    tracing::warn!(lease = format!("{id:x}"), "etcd reports the lease expired");
    if let Some(m) = store.metrics() {
        m.lease_lost(LeaseLoss::Expired);
    }
    let _ = tx.send(LeaseState::Expired { id });
}

/// The local deadline passed without a renewal: the node steps down (once per lapse). The
/// oldest keep-alive still unanswered, if any, is counted as timed out.
fn suspend(
    store: &Store,
    id: LeaseId,
    tx: &watch::Sender<LeaseState>,
    unanswered: Option<Instant>,
) {
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
        if let Some(sent) = unanswered {
            store.record("lease keep-alive", Outcome::Timeout, sent);
        }
        if let Some(m) = store.metrics() {
            m.lease_lost(LeaseLoss::Suspended);
        }
    }
}
